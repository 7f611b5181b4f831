//! Shared by the integration tests: the live test host that `scripts/test.sh` starts.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod events;
pub mod guest;
pub mod redis;
pub mod relay;
pub mod rfb;
pub mod spice;

/// A full test run (`scripts/test.sh`) names a directory in `VIZOR_TEST_RUN_DIR`:
/// every secret the tests use is registered there, every vizor's log and audit log is
/// kept there, and at the end `scripts/check-secrets.sh` greps the logs for the
/// secrets. Without the variable (a single `cargo test`) nothing is kept.
pub mod run {
    use std::io::Write;
    use std::path::PathBuf;

    fn dir() -> Option<PathBuf> {
        std::env::var_os("VIZOR_TEST_RUN_DIR").map(PathBuf::from)
    }

    /// Registers `value` (a password, token, key) under `label`.
    pub fn secret(label: &str, value: &str) {
        let Some(dir) = dir() else { return };
        let value = value.trim();
        if value.is_empty() || value.contains(['\n', '\t']) {
            return;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("secrets.tsv"))
            .expect("VIZOR_TEST_RUN_DIR/secrets.tsv");
        // One write per line: appends from parallel tests do not interleave.
        f.write_all(format!("{label}\t{value}\n").as_bytes())
            .unwrap();
    }

    /// Registers the body lines of a PEM private key or of a key file (a short last
    /// line of base64 could turn up anywhere by chance).
    pub fn secret_lines(label: &str, text: &str) {
        let body = |l: &&str| !l.starts_with('-') && !l.starts_with('#') && l.len() >= 16;
        for line in text.lines().filter(body) {
            secret(label, line);
        }
    }

    /// A file of the run's logs, named after `name`, or `None` outside a full run.
    pub fn log_file(name: &str) -> Option<std::fs::File> {
        let dir = dir()?.join("logs");
        std::fs::create_dir_all(&dir).ok()?;
        std::fs::File::create(dir.join(name)).ok()
    }

    /// Keeps a copy of `file` among the run's logs as `name`.
    pub fn keep(file: &std::path::Path, name: &str) {
        if let Some(mut out) = log_file(name) {
            if let Ok(bytes) = std::fs::read(file) {
                let _ = out.write_all(&bytes);
            }
        }
    }
}

/// The libvirt of [`Vizor::start`]: the test host's with one (`VIZOR_TEST_VNC_*` set),
/// else libvirt's test driver, so that tests which need no VM pass without a host
/// (vizor asks libvirt at start).
pub fn default_uri() -> &'static str {
    if std::env::var("VIZOR_TEST_VNC_ADDR").is_ok_and(|v| !v.is_empty()) {
        "qemu:///system"
    } else {
        "test:///default"
    }
}

/// The QEMU test domain `scripts/test.sh` starts, from the environment.
pub struct LiveDomain {
    /// Host and port of its VNC server.
    pub vnc_addr: String,
    /// The VNC password libvirt stores for it.
    pub vnc_password: String,
    /// Its libvirt name.
    pub name: String,
}

/// The live domain, from the environment `scripts/test.sh` sets. Live tests are
/// `#[ignore]`d (scripts/test.sh runs them with `--include-ignored`); one run without a
/// test host fails here, never passes unseen.
pub fn live_domain() -> LiveDomain {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (
        get("VIZOR_TEST_VNC_ADDR"),
        get("VIZOR_TEST_VNC_PASSWORD"),
        get("VIZOR_TEST_VNC_DOMAIN"),
    ) {
        (Some(vnc_addr), Some(vnc_password), Some(name)) => LiveDomain {
            vnc_password: {
                run::secret("live domain VNC password", &vnc_password);
                vnc_password
            },
            vnc_addr,
            name,
        },
        _ => panic!(
            "a live test without its test host: run scripts/test.sh, or set \
             VIZOR_TEST_VNC_ADDR, VIZOR_TEST_VNC_PASSWORD and VIZOR_TEST_VNC_DOMAIN \
             (scripts/test-host.sh sets up the host)"
        ),
    }
}

/// `args` with the value after each `--*-passwd` flag hidden, for messages.
pub fn redacted(args: &[&str]) -> Vec<String> {
    let mut hide = false;
    args.iter()
        .map(|a| {
            let shown = if hide {
                "<redacted>".to_owned()
            } else {
                (*a).to_owned()
            };
            hide = a.ends_with("-passwd");
            shown
        })
        .collect()
}

/// Runs `scripts/test-host.sh` with `args`, failing the test if it fails. Calls are
/// serialised: libvirt can kill a QEMU whose start races another domain's start for
/// the same autoport range.
pub fn test_host(args: &[&str]) -> String {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for pair in args.windows(2) {
        if pair[0].ends_with("-passwd") {
            run::secret(&format!("test-host {}", pair[0]), pair[1]);
        }
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-host.sh");
    let out = std::process::Command::new(script)
        .args(args)
        .output()
        .expect("run test-host.sh");
    assert!(
        out.status.success(),
        "test-host.sh {:?}: {}",
        redacted(args),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An address the test adds to this machine (on `lo`, root only), for a console that
/// listens somewhere else than 127.0.0.0/8; removed when dropped.
pub struct TestAddress {
    cidr: String,
}

impl TestAddress {
    /// Adds `addr` (a /32; one left by an earlier run is replaced).
    pub fn add(addr: &str) -> TestAddress {
        let cidr = format!("{addr}/32");
        let ip = |verb: &str| {
            std::process::Command::new("ip")
                .args(["addr", verb, &cidr, "dev", "lo"])
                .output()
                .expect("run ip")
        };
        ip("del");
        let out = ip("add");
        assert!(
            out.status.success(),
            "ip addr add {cidr} dev lo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TestAddress { cidr }
    }
}

impl Drop for TestAddress {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["addr", "del", &self.cidr, "dev", "lo"])
            .output();
    }
}

/// The Grafana dashboard.
pub const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/vizor.json");

/// The metric names a PromQL expression reads (`vizor_...`).
pub fn metric_names(expr: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("vizor_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(&tail[..end]);
        rest = &tail[end..];
    }
    out
}

/// Runs `virsh` on qemu:///system, failing the test if it fails; returns its standard
/// output. The arguments are not shown: they may carry a password.
pub fn virsh(args: &[&str]) -> String {
    let out = std::process::Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "virsh {}: {}",
        args.first().unwrap_or(&""),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a QEMU monitor (HMP) command on `domain` through libvirt, failing the test if
/// it fails.
pub fn hmp(domain: &str, command: &str) {
    virsh(&["qemu-monitor-command", domain, "--hmp", command]);
}

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use vizor::token::{Claims, ConsoleKind, TokenKey};

/// The management API key of a vizor started with [`Vizor::start_admin`].
pub const ADMIN_KEY: &str = "k3y-0123456789abcdef-admin";

/// The config table that turns the management API on with [`write_admin_key`]'s key.
pub const ADMIN_API: &str = "[api]\nadmin_key_file = \"admin.key\"\n";

/// Writes [`ADMIN_KEY`] to `dir/admin.key` (mode 0600), for [`ADMIN_API`].
pub fn write_admin_key(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("admin.key");
    std::fs::write(&path, format!("{ADMIN_KEY}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// The `[metrics] key_file` key of every test vizor but [`Vizor::start_keyless`]'s.
pub const METRICS_KEY: &str = "m3trics-0123456789abcdef";

/// The header that reads `/metrics` on a test vizor's main listener.
pub const METRICS_AUTH: (&str, &str) = ("Authorization", "Bearer m3trics-0123456789abcdef");

/// Lines a test adds to the config's tables.
#[derive(Default, Clone, Copy)]
struct Extra<'a> {
    server: &'a str,
    libvirt: &'a str,
    tokens: &'a str,
    audit: &'a str,
}

/// A `vizor serve` process with its own config, key and audit log.
pub struct Vizor {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its directory (config, key, audit log).
    pub dir: tempfile::TempDir,
    /// Everything it logged.
    pub log: Arc<Mutex<String>>,
    key: TokenKey,
    /// Its libvirt.
    uri: String,
    /// vizor's pid when `child` is a wrapper around it (strace).
    wrapped_pid: Option<u32>,
}

impl Vizor {
    /// Starts vizor against qemu:///system with `extra` appended to `[server]`.
    pub fn start(server_extra: &str) -> Vizor {
        Self::start_with(server_extra, "", |_| {})
    }

    /// Starts vizor with `server_extra` in `[server]`, `tail` appended to the config,
    /// after `prepare` ran on its (still empty but for the key) directory.
    pub fn start_with(
        server_extra: &str,
        tail: &str,
        prepare: impl FnOnce(&std::path::Path),
    ) -> Vizor {
        Self::start_full(server_extra, "", tail, prepare)
    }

    /// As [`Vizor::start_with`], with `audit_extra` in `[audit]` too.
    pub fn start_full(
        server_extra: &str,
        audit_extra: &str,
        tail: &str,
        prepare: impl FnOnce(&std::path::Path),
    ) -> Vizor {
        Self::start_uri(default_uri(), server_extra, audit_extra, tail, prepare)
    }

    /// As [`Vizor::start_full`], against the libvirt at `uri`.
    pub fn start_uri(
        uri: &str,
        server_extra: &str,
        audit_extra: &str,
        tail: &str,
        prepare: impl FnOnce(&std::path::Path),
    ) -> Vizor {
        let extra = Extra {
            server: server_extra,
            audit: audit_extra,
            ..Extra::default()
        };
        Self::start_inner(uri, extra, tail, prepare, true)
    }

    /// As [`Vizor::start_with`], with `tokens_extra` in `[tokens]` (such as a
    /// `resume_window`).
    pub fn start_tokens(
        tokens_extra: &str,
        tail: &str,
        prepare: impl FnOnce(&std::path::Path),
    ) -> Vizor {
        let extra = Extra {
            tokens: tokens_extra,
            ..Extra::default()
        };
        Self::start_inner(default_uri(), extra, tail, prepare, true)
    }

    /// As [`Vizor::start_uri`], with `libvirt_extra` in `[libvirt]`.
    pub fn start_libvirt(
        uri: &str,
        libvirt_extra: &str,
        tail: &str,
        prepare: impl FnOnce(&std::path::Path),
    ) -> Vizor {
        let extra = Extra {
            libvirt: libvirt_extra,
            ..Extra::default()
        };
        Self::start_inner(uri, extra, tail, prepare, true)
    }

    /// A vizor (against test:///default) without a metrics key or an admin key: its
    /// main listener serves no metrics.
    pub fn start_keyless(server_extra: &str) -> Vizor {
        let extra = Extra {
            server: server_extra,
            ..Extra::default()
        };
        Self::start_inner("test:///default", extra, "", |_| {}, false)
    }

    fn start_inner(
        uri: &str,
        extra: Extra<'_>,
        tail: &str,
        prepare: impl FnOnce(&std::path::Path),
        metrics_key: bool,
    ) -> Vizor {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("token.key");
        TokenKey::write_new(&key_path).unwrap();
        // The key file: a header line, then the key.
        let key_file = std::fs::read_to_string(&key_path).unwrap();
        run::secret("token key", key_file.lines().nth(1).unwrap());
        let audit_key = dir.path().join("audit.key");
        TokenKey::write_new(&audit_key).unwrap();
        let audit_key = std::fs::read_to_string(&audit_key).unwrap();
        run::secret("audit key", audit_key.lines().nth(1).unwrap());
        run::secret("admin key", ADMIN_KEY);
        run::secret("metrics key", METRICS_KEY);
        // The metrics key goes into the test's own [metrics] table, or a new one.
        let tail = if !metrics_key {
            tail.to_owned()
        } else {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.path().join("metrics.key");
            std::fs::write(&path, METRICS_KEY).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let line = "key_file = \"metrics.key\"\n";
            if tail.contains("[metrics]\n") {
                tail.replace("[metrics]\n", &format!("[metrics]\n{line}"))
            } else {
                format!("{tail}\n[metrics]\n{line}")
            }
        };
        prepare(dir.path());
        let config = dir.path().join("vizor.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n{}\n\
                 [libvirt]\nuri = \"{uri}\"\n{}\n\
                 [tokens]\nkey_file = \"token.key\"\nttl = \"60s\"\n{}\n\
                 [audit]\npath = \"audit.jsonl\"\nkey_file = \"audit.key\"\nkeystrokes = \"full\"\n{}\n\
                 [log]\nlevel = \"debug\"\n{tail}\n",
                extra.server, extra.libvirt, extra.tokens, extra.audit
            ),
        )
        .unwrap();
        let (child, addr, log) = Self::spawn(&config, &[]);
        let key = TokenKey::load(&key_path).unwrap();
        Vizor {
            child,
            addr,
            dir,
            log,
            key,
            uri: uri.to_owned(),
            wrapped_pid: None,
        }
    }

    /// Stops this vizor (SIGTERM, as a service manager would) and starts it again on
    /// the same config and files.
    pub fn restart(&mut self) {
        self.terminate();
        self.start_again();
    }

    /// Starts this vizor again, once it has ended, on the same config and files.
    pub fn start_again(&mut self) {
        self.start_again_under(&[]);
    }

    /// Starts this vizor again as a program run by `wrapper` (such as `strace -f -o
    /// FILE`): signals go to vizor itself, the wrapper ends with it.
    pub fn start_again_under(&mut self, wrapper: &[&str]) {
        let (child, addr, log) = Self::spawn(&self.dir.path().join("vizor.toml"), wrapper);
        self.wrapped_pid = (!wrapper.is_empty()).then(|| {
            let children = format!("/proc/{0}/task/{0}/children", child.id());
            let text = std::fs::read_to_string(&children).unwrap();
            text.split_whitespace().next().unwrap().parse().unwrap()
        });
        self.child = child;
        self.addr = addr;
        self.log = log;
    }

    /// `vizor serve --config CONFIG` (run by `wrapper`, if any), once it listens.
    fn spawn(config: &Path, wrapper: &[&str]) -> (Child, SocketAddr, Arc<Mutex<String>>) {
        let vizor = env!("CARGO_BIN_EXE_vizor");
        let mut command = match wrapper {
            [] => Command::new(vizor),
            [program, args @ ..] => {
                let mut c = Command::new(program);
                c.args(args).arg(vizor);
                c
            }
        };
        let mut child = command
            .args(["serve", "--config", config.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vizor serve");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        let mut kept = run::log_file(&format!("vizor-{}.log", child.id()));
        std::thread::spawn(move || {
            use std::io::Write;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(f) = kept.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("vizor did not start: {line:?}\n{}", log.lock().unwrap()))
            .parse()
            .unwrap();
        (child, addr, log)
    }

    /// Starts vizor with the management API enabled (key [`ADMIN_KEY`]).
    pub fn start_admin(server_extra: &str, tail: &str) -> Vizor {
        Self::start_with(server_extra, &format!("{ADMIN_API}{tail}"), write_admin_key)
    }

    /// `GET /api/v1/sessions` with the admin key: the live sessions.
    pub async fn sessions(&self) -> Vec<serde_json::Value> {
        let bearer = format!("Bearer {ADMIN_KEY}");
        let (status, _, body) =
            http_get(self.addr, "/api/v1/sessions", &[("Authorization", &bearer)]).await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["sessions"].as_array().unwrap().clone()
    }

    /// A participant's token for live session `id` (`POST .../participants` with
    /// `body`).
    pub async fn participant(&self, id: u64, body: serde_json::Value) -> String {
        let (status, answer) = self
            .api(
                "POST",
                &format!("/api/v1/sessions/{id}/participants"),
                &body.to_string(),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        answer["token"].as_str().unwrap().to_owned()
    }

    /// A management API request with the admin key and a JSON `body`: the status and
    /// the answer. A token in the answer is a secret of the run.
    pub async fn api(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let bearer = format!("Bearer {ADMIN_KEY}");
        let (status, _, text) =
            http_request(self.addr, method, path, &[("Authorization", &bearer)], body).await;
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: {status} {text:?}: {e}"));
        if let Some(t) = v["token"].as_str() {
            run::secret("token", t);
        }
        (status, v)
    }

    /// `GET /metrics` on the main listener, with the metrics key.
    pub async fn metrics(&self) -> String {
        let (status, _, body) = http_get(self.addr, "/metrics", &[METRICS_AUTH]).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Waits (up to 5 s) for `series` to read `value`: a session is counted once its
    /// browser has its close frame, after its audit record.
    pub async fn wait_for_metric(&self, series: &str, value: f64) {
        let mut last = None;
        for _ in 0..50 {
            last = metric(&self.metrics().await, series);
            if last == Some(value) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("{series} is {last:?}, not {value}");
    }

    /// A token for `domain`, valid for `ttl_secs` (negative: already expired).
    pub fn token(&self, domain: &str, kind: ConsoleKind, ttl_secs: i64) -> String {
        self.token_as(domain, kind, "tester", ttl_secs)
    }

    /// A token of `user` for `domain`, valid for `ttl_secs`.
    pub fn token_as(&self, domain: &str, kind: ConsoleKind, user: &str, ttl_secs: i64) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let uuid = domain_uuid(&self.uri, domain);
        let claims = Claims::new(domain, uuid, kind, user, (now + ttl_secs).max(0) as u64).unwrap();
        let token = self.key.seal(&claims).unwrap();
        run::secret("token", &token);
        token
    }

    /// `claims` sealed with this vizor's key.
    pub fn seal(&self, claims: &Claims) -> String {
        let token = self.key.seal(claims).unwrap();
        run::secret("token", &token);
        token
    }

    /// The claims of a token of `tester` for `domain`, valid for a minute.
    fn claims(&self, domain: &str, kind: ConsoleKind) -> Claims {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let uuid = domain_uuid(&self.uri, domain);
        Claims::new(domain, uuid, kind, "tester", now + 60).unwrap()
    }

    /// A token of `tester` for `domain`, valid for a minute, with `policy`.
    pub fn token_with(
        &self,
        domain: &str,
        kind: ConsoleKind,
        policy: vizor::token::Policy,
    ) -> String {
        self.seal(&self.claims(domain, kind).with_policy(policy))
    }

    /// A token for `domain` that admits `client` alone.
    pub fn token_bound(&self, domain: &str, kind: ConsoleKind, client: std::net::IpAddr) -> String {
        self.seal(&self.claims(domain, kind).bound_to(client))
    }

    /// The vizor process's id.
    pub fn pid(&self) -> u32 {
        self.wrapped_pid.unwrap_or_else(|| self.child.id())
    }

    /// The file descriptors the vizor process holds open now.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// How many of the vizor process's threads are named `name`.
    pub fn threads_named(&self, name: &str) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.trim_end() == name)
            .count()
    }

    /// The vizor process's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// The audit records so far, without the log's own records (`chain_start`,
    /// `audit_open`, `audit_close`).
    pub fn audit(&self) -> Vec<serde_json::Value> {
        self.audit_all()
            .into_iter()
            .filter(|r| {
                !matches!(
                    r["event"].as_str(),
                    Some("chain_start" | "audit_open" | "audit_close")
                )
            })
            .collect()
    }

    /// Every complete record of the audit log so far: a last line the writer is still
    /// appending (no newline yet) is left for the next read; any other line must parse.
    pub fn audit_all(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.audit_path()).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// Runs `vizor audit verify --config ... FILES`: success, and what it printed.
    pub fn verify(&self, files: &[PathBuf]) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_vizor"))
            .args(["audit", "verify", "--config"])
            .arg(self.dir.path().join("vizor.toml"))
            .args(files)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// The audit log's path.
    pub fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    /// Waits (up to 10 s) until the audit log holds `n` records of `event`; returns
    /// the records.
    pub fn wait_for_records(&self, event: &str, n: usize) -> Vec<serde_json::Value> {
        for _ in 0..100 {
            let audit = self.audit();
            if audit.iter().filter(|r| r["event"] == event).count() >= n {
                return audit;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("{n} {event} records expected: {:?}", self.audit());
    }

    /// The records of `event` alone, once there are `n` of them.
    pub fn records(&self, event: &str, n: usize) -> Vec<serde_json::Value> {
        self.wait_for_records(event, n)
            .into_iter()
            .filter(|r| r["event"] == event)
            .collect()
    }

    /// Kills vizor with SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        self.kill_wrapped();
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGKILL to vizor under a wrapper: the wrapper's death would leave it running.
    fn kill_wrapped(&self) {
        if let Some(pid) = self.wrapped_pid {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }

    /// `vizor audit text --session ID` over this vizor's audit log, keyed by its
    /// config: what was typed in that session.
    pub fn audit_text(&self, session: &str) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_vizor"))
            .args(["audit", "text", "--config"])
            .arg(self.dir.path().join("vizor.toml"))
            .args(["--session", session])
            .arg(self.audit_path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sends `signal` (such as `HUP`).
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().to_string();
        let sig = format!("-{signal}");
        assert!(Command::new("kill")
            .args([sig.as_str(), &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.pid().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }

    /// Whether vizor's log contains `needle` now.
    pub fn logged(&self, needle: &str) -> bool {
        self.log.lock().unwrap().contains(needle)
    }

    /// Waits (up to 10 s) until vizor's log contains `needle`; vizor logs a session's
    /// end after the browser has seen it.
    pub fn wait_for_log(&self, needle: &str) -> bool {
        for _ in 0..100 {
            if self.log.lock().unwrap().contains(needle) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        false
    }

    /// Waits (up to 10 s) until the audit log holds an `event` record.
    pub fn wait_for_audit(&self, event: &str) -> Vec<serde_json::Value> {
        for _ in 0..100 {
            let audit = self.audit();
            if audit.iter().any(|r| r["event"] == event) {
                return audit;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("no {event} record in the audit log: {:?}", self.audit());
    }

    /// Asserts that `secret` appears neither in vizor's log nor in its audit log.
    pub fn assert_never_logged(&self, secret: &str) {
        assert!(
            !self.log.lock().unwrap().contains(secret),
            "secret in the log"
        );
        let audit = std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap();
        assert!(!audit.contains(secret), "secret in the audit log");
    }

    /// The config directory.
    pub fn path(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for Vizor {
    fn drop(&mut self) {
        self.kill_wrapped();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its audit logs (rotated ones too) join the run's logs.
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                // Not its audit key: a secret the run's logs must not hold.
                if name.starts_with("audit") && !name.ends_with(".key") {
                    run::keep(&e.path(), &format!("vizor-{}-{name}", self.child.id()));
                }
            }
        }
    }
}

/// A browser's view: a WebSocket to vizor carrying RFB.
pub struct Browser {
    ws: fastwebsockets::WebSocket<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
    /// Every byte received from vizor.
    pub received: Vec<u8>,
    /// Received but not yet consumed.
    pub pending: Vec<u8>,
    /// The longest binary message received.
    pub largest: usize,
    /// Text messages received (vizor's words to its console page).
    pub texts: Vec<String>,
}

/// How the WebSocket ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// Close code.
    pub code: u16,
    /// Close reason.
    pub reason: String,
}

struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

/// A TCP connection to `addr` from the loopback address `src` (any of 127.0.0.0/8:
/// to vizor, a client of its own).
pub async fn tcp_from(src: std::net::IpAddr, addr: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(src, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

impl Browser {
    /// Opens `path` (such as `/websockify?token=...`) on vizor.
    pub async fn connect(addr: SocketAddr, path: &str) -> Browser {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        Self::connect_over(stream, addr, path).await
    }

    /// Opens `path` on vizor from the loopback address `src`.
    pub async fn connect_from(src: std::net::IpAddr, addr: SocketAddr, path: &str) -> Browser {
        Self::connect_over(tcp_from(src, addr).await, addr, path).await
    }

    /// Opens `path` over `stream` (such as a TLS stream) to vizor at `addr`.
    pub async fn connect_over<S>(stream: S, addr: SocketAddr, path: &str) -> Browser
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        Self::connect_with(stream, addr, path, &[]).await
    }

    /// As [`Browser::connect_over`], with `headers` (such as a page's `Origin`) added.
    pub async fn connect_with<S>(
        stream: S,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Browser
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        // Whatever token a test opens a console with, minted here or by vizor's API.
        if let Some((_, token)) = path.split_once("token=") {
            run::secret("token", token.split('&').next().unwrap_or(token));
        }
        let req = hyper::Request::builder()
            .method("GET")
            .uri(format!("http://{addr}{path}"))
            .header("Host", addr.to_string())
            .header(hyper::header::UPGRADE, "websocket")
            .header(hyper::header::CONNECTION, "upgrade")
            .header(
                "Sec-WebSocket-Key",
                fastwebsockets::handshake::generate_key(),
            )
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Protocol", "binary");
        let req = headers
            .iter()
            .fold(req, |r, (k, v)| r.header(*k, *v))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let (ws, resp) = fastwebsockets::handshake::client(&SpawnExecutor, req, stream)
            .await
            .unwrap();
        assert_eq!(
            resp.headers()
                .get("Sec-WebSocket-Protocol")
                .map(|v| v.to_str().unwrap()),
            Some("binary"),
            "the binary subprotocol is answered"
        );
        Browser {
            ws,
            received: Vec::new(),
            pending: Vec::new(),
            largest: 0,
            texts: Vec::new(),
        }
    }

    /// Reads one message: a binary one into `pending`, a text one into `texts`; `Err`
    /// with the close frame when vizor closed.
    pub async fn read(&mut self) -> Result<(), Closed> {
        loop {
            let frame = self.ws.read_frame().await.map_err(|e| Closed {
                code: 0,
                reason: format!("WebSocket error: {e}"),
            })?;
            match frame.opcode {
                fastwebsockets::OpCode::Binary => {
                    self.largest = self.largest.max(frame.payload.len());
                    self.received.extend_from_slice(&frame.payload);
                    self.pending.extend_from_slice(&frame.payload);
                    return Ok(());
                }
                fastwebsockets::OpCode::Text => {
                    self.texts
                        .push(String::from_utf8_lossy(&frame.payload).into_owned());
                    return Ok(());
                }
                fastwebsockets::OpCode::Close => {
                    let p = &frame.payload[..];
                    let code = if p.len() >= 2 {
                        u16::from_be_bytes([p[0], p[1]])
                    } else {
                        1005
                    };
                    let reason = String::from_utf8_lossy(p.get(2..).unwrap_or(&[])).into_owned();
                    return Err(Closed { code, reason });
                }
                _ => continue,
            }
        }
    }

    /// Sends binary bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.ws
            .write_frame(fastwebsockets::Frame::binary(
                fastwebsockets::Payload::Owned(bytes.to_vec()),
            ))
            .await
            .unwrap();
    }

    /// Sends a WebSocket ping and waits for its pong; other frames are kept.
    pub async fn ping(&mut self, payload: &[u8]) -> Vec<u8> {
        self.ws
            .write_frame(fastwebsockets::Frame::new(
                true,
                fastwebsockets::OpCode::Ping,
                None,
                fastwebsockets::Payload::Owned(payload.to_vec()),
            ))
            .await
            .unwrap();
        loop {
            let frame = self.ws.read_frame().await.unwrap();
            match frame.opcode {
                fastwebsockets::OpCode::Pong => return frame.payload.to_vec(),
                fastwebsockets::OpCode::Binary => {
                    self.largest = self.largest.max(frame.payload.len());
                    self.received.extend_from_slice(&frame.payload);
                    self.pending.extend_from_slice(&frame.payload);
                }
                other => panic!("unexpected {other:?} while waiting for a pong"),
            }
        }
    }

    /// Sends a close frame: the browser leaves on purpose.
    pub async fn close(&mut self, code: u16, reason: &str) {
        self.ws
            .write_frame(fastwebsockets::Frame::close(code, reason.as_bytes()))
            .await
            .unwrap();
    }

    /// Waits for vizor to close the connection; returns the close frame.
    pub async fn closed(&mut self) -> Closed {
        loop {
            if let Err(c) = self.read().await {
                return c;
            }
        }
    }

    /// Drives a handshake state (vizor-rfb's or vizor-spice's) over `pending`, reading
    /// messages while it needs more; see [`vizor_testkit::drive()`].
    pub async fn drive<S, P, E>(
        &mut self,
        state: S,
        step: impl FnMut(S, &[u8]) -> Result<P, E>,
    ) -> Result<P::Next, vizor_testkit::DriveError<E, Closed>>
    where
        P: vizor_testkit::Stepped<State = S>,
    {
        // The driver's buffer is `pending`; what arrives goes to it (see `more`).
        let mut buf = std::mem::take(&mut self.pending);
        let done = vizor_testkit::drive(self, &mut buf, state, step).await;
        self.pending = buf;
        done
    }

    /// Reads messages until `parse` finds its whole message at the start of `pending`,
    /// drains it and returns it; see [`vizor_testkit::until`].
    pub async fn until<T, E>(
        &mut self,
        mut parse: impl FnMut(&[u8]) -> Result<Option<(T, usize)>, E>,
    ) -> Result<T, vizor_testkit::DriveError<E, Closed>> {
        self.drive((), |(), b| parse(b)).await
    }
}

/// The WebSocket as a byte source: one binary message at a time, moved from `pending`
/// to the driver's buffer (`received` keeps it too).
impl vizor_testkit::Source for Browser {
    type Error = Closed;

    async fn more(&mut self, buf: &mut Vec<u8>) -> Result<(), Closed> {
        self.read().await?;
        buf.append(&mut self.pending);
        Ok(())
    }
}

/// A plain HTTP/1.1 GET; returns status, headers and body.
pub async fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    http_get_over(s, addr, path, headers).await
}

/// As [`http_get`], over `s`.
pub async fn http_get_over(
    mut s: tokio::net::TcpStream,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
    {
        req.push_str("Connection: close\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).unwrap_or("0").parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

/// A plain HTTP/1.1 request with `method` and a JSON `body` (none when empty);
/// returns status, headers and body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).unwrap_or("0").parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

/// The audited key events, in order, as (down, key name).
pub fn audited_keys(audit: &[serde_json::Value]) -> Vec<(bool, String)> {
    audit
        .iter()
        .filter(|r| r["event"] == "key")
        .map(|r| {
            (
                r["down"].as_bool().unwrap(),
                // A number QEMU maps to no key has no name.
                r["key"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// The UUID libvirt at `uri` gives `domain` (a token names its domain by UUID), or
/// zeros for a domain it does not know (a token for no domain).
pub fn domain_uuid(uri: &str, domain: &str) -> [u8; 16] {
    // A node file of [`test_node`]: its UUIDs are known without asking (the load test
    // mints a thousand tokens).
    if uri.starts_with("test:///") && uri != "test:///default" {
        return vizor::token::parse_uuid(&uuid_of(domain)).unwrap_or([0; 16]);
    }
    let out = std::process::Command::new("virsh")
        .args(["-c", uri, "domuuid", domain])
        .output();
    out.ok()
        .filter(|o| o.status.success())
        .and_then(|o| vizor::token::parse_uuid(String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or([0; 16])
}

/// A stable UUID for a test domain named `name`.
pub fn uuid_of(name: &str) -> String {
    vizor_testkit::libvirt::uuid_string(&vizor_testkit::libvirt::uuid_of(name))
}

/// A node file for libvirt's test driver naming VNC consoles on 127.0.0.1, each as
/// (domain, port, the password libvirt stores): vizor looks them up as it would any
/// domain. Returns the directory holding the file (it lives as long as the caller keeps
/// it) and the `test://` URI.
pub fn test_node(domains: &[(String, u16, String)]) -> (tempfile::TempDir, String) {
    let domains: Vec<_> = domains
        .iter()
        .map(|(name, port, password)| vizor_testkit::libvirt::Domain::named(name, *port, password))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let uri = vizor_testkit::libvirt::write_node(&dir.path().join("node.xml"), &domains).unwrap();
    (dir, uri)
}

/// A loopback port nothing listens on now (for a server a test starts itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether `haystack` holds `needle` anywhere.
pub fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The value of one series (`name{labels}` exactly as exported) in a Prometheus text
/// exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}

/// TLS for tests: a self-signed certificate for 127.0.0.1 and a client trusting it.
pub mod tls {
    use std::path::Path;
    use std::sync::Arc;

    /// A fresh certificate: (certificate PEM, key PEM, certificate DER).
    pub fn certificate() -> (String, String, Vec<u8>) {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        super::run::secret_lines("TLS private key", &ck.key_pair.serialize_pem());
        (
            ck.cert.pem(),
            ck.key_pair.serialize_pem(),
            ck.cert.der().to_vec(),
        )
    }

    /// Writes `cert` and `key` as `tls.crt` and `tls.key` (0600) in `dir`.
    pub fn write(dir: &Path, cert: &str, key: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(dir.join("tls.crt"), cert).unwrap();
        let key_path = dir.join("tls.key");
        std::fs::write(&key_path, key).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// Opens TLS to `addr`, trusting only `trusted` (DER).
    pub async fn connect(
        addr: std::net::SocketAddr,
        trusted: &[u8],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        connect_over(tcp, addr, trusted).await
    }

    /// Opens TLS to `addr` over `tcp`, trusting only `trusted` (DER).
    pub async fn connect_over(
        tcp: tokio::net::TcpStream,
        addr: std::net::SocketAddr,
        trusted: &[u8],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(trusted.to_vec()))
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        connector.connect(name, tcp).await
    }
}
