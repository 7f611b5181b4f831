//! The proxies under test, as processes of their own: vizor (this repository's release
//! build, on a libvirt `test:///` node file naming the synthetic consoles), Debian's
//! websockify and websocat. Each is started in its own process group, so that its
//! CPU time and memory are read over every process it forked (websockify forks one per
//! connection), and so that stopping it stops them all.

use crate::client::Route;
use crate::machine::proc_number;
use crate::upstream::Console;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vizor::token::{Claims, ConsoleKind, TokenKey};

/// A path from the client to the console ("way": `Path` is the file system's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Way {
    /// The client speaks RFB to the synthetic server itself.
    Direct,
    /// vizor.
    Vizor,
    /// Debian's websockify.
    Websockify,
    /// websocat.
    Websocat,
}

impl Way {
    /// All of them, in the order of every table.
    pub const ALL: [Way; 4] = [Way::Direct, Way::Vizor, Way::Websockify, Way::Websocat];

    /// Its name in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Way::Direct => "direct",
            Way::Vizor => "vizor",
            Way::Websockify => "websockify",
            Way::Websocat => "websocat",
        }
    }

    /// The way named `s`.
    pub fn parse(s: &str) -> Option<Way> {
        Way::ALL.into_iter().find(|w| w.name() == s)
    }
}

/// Where the proxies' programs are.
#[derive(Debug, Clone)]
pub struct Programs {
    /// `vizor`.
    pub vizor: PathBuf,
    /// `websockify`.
    pub websockify: PathBuf,
    /// `websocat`.
    pub websocat: PathBuf,
}

/// Limits for vizor high enough for every case: 10,000 sessions on a few domains from
/// a few addresses.
const VIZOR_LIMITS: &str = "[limits]\nmax_sessions = 100000\nmax_sessions_per_domain = 100000\n\
     max_sessions_per_user = 100000\nmax_connections = 100000\nmax_connections_per_client = 100000\n";

/// A running proxy (or none, for [`Way::Direct`]).
pub struct Proxy {
    /// Which.
    pub way: Way,
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// For vizor: the key its tokens are sealed with.
    key: Option<TokenKey>,
    consoles: Vec<Console>,
    /// The console a splicer forwards to (a splicer has one target).
    target: usize,
    /// Its config and logs.
    dir: PathBuf,
}

/// The UUID of console number `d` in the node file (a token names its domain by it).
fn console_uuid(d: usize) -> [u8; 16] {
    let mut u = *b"bench\0@\0\x80\0\0\0\0\0\0\0";
    u[8..].copy_from_slice(&(0x8000_0000_0000_0000 | d as u64).to_be_bytes());
    u
}

/// The libvirt node file for `consoles`: one running test domain each, whose VNC (or
/// SPICE) graphics names its port and password.
pub fn write_node_file(
    path: &Path,
    consoles: &[Console],
    graphics: vizor_testkit::libvirt::Graphics,
) -> std::io::Result<()> {
    let domains: Vec<_> = consoles
        .iter()
        .enumerate()
        .map(|(d, c)| vizor_testkit::libvirt::Domain {
            name: c.domain.clone(),
            uuid: console_uuid(d),
            port: c.port,
            password: c.password.clone(),
            graphics,
        })
        .collect();
    vizor_testkit::libvirt::write_node(path, &domains).map(drop)
}

/// A free port on 127.0.0.1 (for the splicers, which take a port on their command
/// line): bound once, released, then given to them.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until `addr` accepts connections.
fn wait_listening(addr: SocketAddr, child: &mut Child, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{what} exited at start: {status}"));
        }
        if Instant::now() > deadline {
            return Err(format!("{what} did not listen on {addr} within 20 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn log_file(dir: &Path, name: &str) -> Result<std::fs::File, String> {
    std::fs::File::create(dir.join(name)).map_err(|e| format!("{}: {e}", dir.join(name).display()))
}

impl Proxy {
    /// Starts the proxy of `way` toward `consoles` (splicers: toward console `target`;
    /// vizor: looking them up in the libvirt at `libvirt_uri`), with its files
    /// (config, logs) in `dir`.
    pub fn start(
        way: Way,
        programs: &Programs,
        consoles: &[Console],
        target: usize,
        libvirt_uri: &str,
        dir: &Path,
    ) -> Result<Proxy, String> {
        Self::start_with(way, programs, consoles, target, libvirt_uri, dir, "")
    }

    /// As [`Proxy::start`], with `server_extra` in vizor's `[server]` (such as its
    /// `ws_message_size` or `allowed_origins`).
    pub fn start_with(
        way: Way,
        programs: &Programs,
        consoles: &[Console],
        target: usize,
        libvirt_uri: &str,
        dir: &Path,
        server_extra: &str,
    ) -> Result<Proxy, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let up = &consoles[target];
        let upstream = format!("127.0.0.1:{}", up.port);
        let mut proxy = Proxy {
            way,
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], up.port)),
            key: None,
            consoles: consoles.to_vec(),
            target,
            dir: dir.to_path_buf(),
        };
        match way {
            Way::Direct => {}
            Way::Vizor => {
                let key_path = dir.join("token.key");
                let _ = std::fs::remove_file(&key_path);
                TokenKey::write_new(&key_path).map_err(|e| format!("vizor token key: {e}"))?;
                let audit_key = dir.join("audit.key");
                let _ = std::fs::remove_file(&audit_key);
                TokenKey::write_new(&audit_key).map_err(|e| format!("vizor audit key: {e}"))?;
                let config = dir.join("vizor.toml");
                std::fs::write(
                    &config,
                    format!(
                        "[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n\
                         [libvirt]\nuri = \"{libvirt_uri}\"\n\
                         [tokens]\nkey_file = \"token.key\"\nttl = \"10m\"\n\
                         [audit]\npath = \"audit.jsonl\"\nkey_file = \"audit.key\"\n\
                         [log]\nlevel = \"warn\"\n{VIZOR_LIMITS}"
                    ),
                )
                .map_err(|e| format!("{}: {e}", config.display()))?;
                let _ = std::fs::remove_file(dir.join("audit.jsonl"));
                let mut child = Command::new(&programs.vizor)
                    .args(["serve", "--config"])
                    .arg(&config)
                    .stdout(Stdio::piped())
                    .stderr(log_file(dir, "vizor.log")?)
                    .process_group(0)
                    .spawn()
                    .map_err(|e| format!("start {}: {e}", programs.vizor.display()))?;
                let mut line = String::new();
                if let Some(out) = child.stdout.take() {
                    let _ = BufReader::new(out).read_line(&mut line);
                }
                let Some(addr) = line
                    .trim()
                    .strip_prefix("listening on ")
                    .and_then(|a| a.parse().ok())
                else {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = std::fs::read_to_string(dir.join("vizor.log")).unwrap_or_default();
                    return Err(format!("vizor did not start: {line:?}\n{log}"));
                };
                proxy.addr = addr;
                proxy.key =
                    Some(TokenKey::load(&key_path).map_err(|e| format!("vizor token key: {e}"))?);
                proxy.child = Some(child);
            }
            Way::Websockify => {
                let port = free_port().map_err(|e| format!("free port: {e}"))?;
                let mut child = Command::new(&programs.websockify)
                    .arg(format!("127.0.0.1:{port}"))
                    .arg(&upstream)
                    .stdout(log_file(dir, "websockify.log")?)
                    .stderr(log_file(dir, "websockify.err")?)
                    .process_group(0)
                    .spawn()
                    .map_err(|e| format!("start {}: {e}", programs.websockify.display()))?;
                proxy.addr = SocketAddr::from(([127, 0, 0, 1], port));
                wait_listening(proxy.addr, &mut child, "websockify")?;
                proxy.child = Some(child);
            }
            Way::Websocat => {
                let port = free_port().map_err(|e| format!("free port: {e}"))?;
                // -b: binary messages; -E: a closed side closes the other;
                // --server-protocol: answer noVNC's `binary` like the others do.
                let mut child = Command::new(&programs.websocat)
                    .args(["--binary", "-E", "--server-protocol", "binary"])
                    .arg(format!("ws-l:127.0.0.1:{port}"))
                    .arg(format!("tcp:{upstream}"))
                    .stdout(log_file(dir, "websocat.log")?)
                    .stderr(log_file(dir, "websocat.err")?)
                    .process_group(0)
                    .spawn()
                    .map_err(|e| format!("start {}: {e}", programs.websocat.display()))?;
                proxy.addr = SocketAddr::from(([127, 0, 0, 1], port));
                wait_listening(proxy.addr, &mut child, "websocat")?;
                proxy.child = Some(child);
            }
        }
        Ok(proxy)
    }

    /// The route of session number `i`: vizor spreads sessions over the domains, each
    /// with a fresh token; the others go to their one console.
    pub fn route(&self, i: usize) -> Route {
        self.route_to(i, ConsoleKind::Vnc)
    }

    /// As [`Proxy::route`], to consoles of `kind`.
    pub fn route_to(&self, i: usize, kind: ConsoleKind) -> Route {
        match (self.way, &self.key) {
            (Way::Vizor, Some(_)) => {
                let d = i % self.consoles.len();
                let token = self
                    .token_for(&self.consoles[d].domain, console_uuid(d), kind)
                    .unwrap_or_default();
                Route::Ws {
                    addr: self.addr,
                    path: format!("/websockify?token={token}"),
                    password: None,
                }
            }
            (Way::Direct, _) => {
                let console = &self.consoles[self.target];
                Route::Tcp {
                    addr: self.addr,
                    password: console.password.clone(),
                }
            }
            _ => Route::Ws {
                addr: self.addr,
                path: "/websockify".into(),
                password: Some(self.consoles[self.target].password.clone()),
            },
        }
    }

    /// For vizor: a token for the domain `domain` of UUID `uuid` (a real one, looked up
    /// in libvirt, as vizor checks it).
    pub fn token(&self, domain: &str, uuid: [u8; 16]) -> Option<String> {
        self.token_for(domain, uuid, ConsoleKind::Vnc)
    }

    /// As [`Proxy::token`], for a console of `kind`.
    pub fn token_for(&self, domain: &str, uuid: [u8; 16], kind: ConsoleKind) -> Option<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs();
        let claims = Claims::new(domain, uuid, kind, "bench", now + 600).ok()?;
        self.key.as_ref()?.seal(&claims).ok()
    }

    /// The proxy's processes (none for direct).
    pub fn pids(&self) -> Vec<u32> {
        match &self.child {
            Some(c) => group_pids(c.id()),
            None => Vec::new(),
        }
    }

    /// CPU time of all its processes so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        self.pids().into_iter().map(cpu_seconds).sum()
    }

    /// Resident and proportional memory of all its processes, in KiB.
    pub fn memory_kib(&self) -> Memory {
        let mut m = Memory::default();
        for pid in self.pids() {
            let r = memory_kib(pid);
            m.rss += r.rss;
            m.pss += r.pss;
            m.processes += 1;
        }
        m
    }

    /// The most frequent error line of the proxy's logs, as a hint of why sessions
    /// failed (websockify says what it ran into there, the client only sees an EOF).
    pub fn log_hint(&self) -> Option<String> {
        let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
        for name in ["vizor.log", "websockify.err", "websocat.err"] {
            let Ok(text) = std::fs::read_to_string(self.dir.join(name)) else {
                continue;
            };
            for l in text.lines().filter(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("error") || l.contains("exception") || l.contains("warn")
            }) {
                // Timestamps and addresses differ line by line; the tail says what.
                let key: String = l
                    .chars()
                    .rev()
                    .take(120)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                *counts.entry(key).or_default() += 1;
            }
        }
        counts
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(l, n)| format!("{n}x in its log: {}", l.trim()))
    }

    /// Stops the proxy and every process it forked.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let group = format!("-{}", child.id());
            // kill(1) on our own process group: the crate forbids unsafe code, and
            // the standard library kills a single process only.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &group])
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Memory of a set of processes.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Memory {
    /// Resident set, KiB.
    pub rss: u64,
    /// Proportional set (shared pages divided among their users), KiB.
    pub pss: u64,
    /// How many processes.
    pub processes: u64,
}

/// The processes whose process group is `pgid`.
pub fn group_pids(pgid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| stat_fields(pid).and_then(|f| f.get(2)?.parse::<u32>().ok()) == Some(pgid))
        .collect()
}

/// The fields of /proc/PID/stat after the command name (field 3, the state, first).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Clock ticks per second of /proc/PID/stat (`getconf CLK_TCK`, 100 on Linux).
pub fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime of one process and of its children it reaped (websockify forks one
/// per connection: gone when it closes, its time is its parent's cutime), in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Some(f) = stat_fields(pid) else {
        return 0.0;
    };
    // Fields 14 to 17 of stat (utime, stime, cutime, cstime): 11 to 14 counting from
    // the state.
    let ticks: u64 = [11, 12, 13, 14]
        .iter()
        .filter_map(|&i| f.get(i)?.parse::<u64>().ok())
        .sum();
    ticks as f64 / clock_ticks()
}

/// Rss and Pss of one process from /proc/PID/smaps_rollup, in KiB.
pub fn memory_kib(pid: u32) -> Memory {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| proc_number(&text, name).unwrap_or(0);
    Memory {
        rss: field("Rss:"),
        pss: field("Pss:"),
        processes: 1,
    }
}

/// MemAvailable of /proc/meminfo, in KiB.
pub fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| proc_number(&t, "MemAvailable:"))
        .unwrap_or(u64::MAX)
}

/// Machine-wide CPU time from the first line of /proc/stat, in seconds: (idle, niced).
/// Niced time is other work on a shared machine (such as a fuzzer at nice 10).
pub fn machine_cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0) as f64 / clock_ticks();
    // user nice system idle iowait ...
    (at(3) + at(4), at(1))
}
