//! Load: 1,000 concurrent VNC sessions through one vizor, every byte of both directions
//! checked end to end: nothing lost, nothing mixed between sessions. Loopback only,
//! bounded in count ([`SESSIONS`]) and time ([`BOUND`]).
//!
//! The VMs are a test double, not QEMU: a thousand QEMU consoles do not fit on a CI
//! machine, so each is vizor-testkit's synthetic RFB 3.8 server (`vizor_testkit::vnc`),
//! demanding VNC authentication with its domain's password, on which [`vm_session`]
//! plays a script. libvirt is
//! real: its built-in test driver (`test:///.../node.xml`, in-process, no daemon) holds
//! [`DOMAINS`] running domains whose VNC graphics point at the doubles with their
//! passwords, and vizor looks every session up there as it does in production.
//!
//! Each console connection gets a fresh random nonce, which the VM puts in its
//! ServerInit desktop name. From the nonce both ends derive the whole session
//! ([`Script`]): what the browser sends (pixel format, encodings, clipboard, keys,
//! pointer, update requests, cut into WebSocket messages at random points) and what the
//! VM answers (bells, clipboard, updates of random Raw and CopyRect rectangles, written
//! in pieces). Each end compares every byte it receives with the script and keeps
//! SHA-256 digests of both directions; the test then matches both ends' digests session
//! by session, and vizor's own account (sessions API, audit records, metrics) against
//! the scripts.
//!
//! The same load runs a second time over a fleet: two vizor replicas sharing a real
//! Redis (`[state]`: single use, limits and the session list across replicas) in front
//! of two libvirt hosts (`[[libvirt.hosts]]`, each its own test-driver node holding
//! half the domains), each browser on one replica with a token naming its host.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::{Browser, Closed, Vizor};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use vizor::token::ConsoleKind;
use vizor_rfb::client::{write_set_encodings, ClientMessage, CutText};
use vizor_rfb::handshake::ServerInit;
use vizor_rfb::server::{write_rect_header, write_update_header};
use vizor_rfb::{Encoding, PixelFormat};
use vizor_testkit::vnc::{Auth, Conn, Double, Served, Stats};

/// Sessions open at once.
const SESSIONS: usize = 1000;
/// Domains in libvirt, each with its own double, port and password: 10 sessions each,
/// within the default `max_sessions_per_domain` (16).
const DOMAINS: usize = 100;
/// Token users: 50 sessions each.
const USERS: usize = 20;
/// Browser source addresses (127.77.0.0/16): 20 connections each, within the default
/// `max_connections_per_client` (64).
const SOURCES: usize = 50;
/// Update request / update exchanges per session.
const ROUNDS: usize = 8;
/// The doubles' framebuffer: small, so that a thousand sessions are cheap.
const WIDTH: u16 = 64;
const HEIGHT: u16 = 48;
/// The whole test, vizor's start to its last check.
const BOUND: Duration = Duration::from_secs(240);
/// Open files this process and vizor each need: a socket per browser and per console
/// connection, and some to spare.
const OPEN_FILES: u64 = 4096;

/// What vizor tells a browser whose VM closed the console.
const VM_CLOSED: &str = "the VM closed the console connection";

/// SplitMix64: the scripts' deterministic randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Appends `n` random bytes.
    fn fill(&mut self, out: &mut Vec<u8>, n: usize) {
        let end = out.len() + n;
        while out.len() < end {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(end);
    }
}

/// Everything one session exchanges after ServerInit, derived from its domain and nonce.
struct Script {
    /// What the browser sends.
    browser: Vec<u8>,
    /// Where each round's part of `browser` ends (after its update request).
    browser_rounds: Vec<usize>,
    /// What vizor sends the VM for it: first its own request for QEMU's LED state (so
    /// QEMU never presses lock keys itself), then the browser's messages, with LED state
    /// added to its encodings.
    to_vm: Vec<u8>,
    /// Where each round's part of `to_vm` ends.
    to_vm_rounds: Vec<usize>,
    /// What the VM sends.
    vm: Vec<u8>,
    /// Where each round's part of `vm` ends (after its update).
    vm_rounds: Vec<usize>,
    /// The key events, in order: (down, keysym).
    keys: Vec<(bool, u32)>,
    /// The browser's clipboard text.
    browser_clip: Vec<u8>,
    /// The VM's clipboard text.
    vm_clip: Vec<u8>,
}

fn message(m: ClientMessage<'_>, out: &mut Vec<u8>) {
    m.write(out).unwrap();
}

impl Script {
    fn new(domain: &str, nonce: u64) -> Script {
        let mut rng = Rng(nonce);
        let mut browser = Vec::new();
        let mut vm = Vec::new();
        let (mut browser_rounds, mut vm_rounds, mut keys) = (Vec::new(), Vec::new(), Vec::new());
        // Half the sessions switch to 16 bits per pixel before their first request: vizor
        // must frame their updates with the browser's format, not the VM's.
        let bytes_per_pixel = if rng.next() & 1 == 0 {
            4
        } else {
            message(
                ClientMessage::SetPixelFormat(PixelFormat::RGB565),
                &mut browser,
            );
            2
        };
        let encodings_at = browser.len();
        write_set_encodings([Encoding::RAW, Encoding::COPY_RECT], &mut browser);
        let encodings_end = browser.len();
        let browser_clip =
            format!("from the browser of {domain} session {nonce:016x}").into_bytes();
        message(
            ClientMessage::ClientCutText(CutText::Latin1(&browser_clip)),
            &mut browser,
        );
        let vm_clip = format!("from the VM {domain} session {nonce:016x}").into_bytes();
        for round in 0..ROUNDS {
            for _ in 0..1 + rng.below(2) {
                let keysym = match rng.below(4) {
                    0 => 0x30 + rng.below(10) as u32,
                    1 | 2 => 0x61 + rng.below(26) as u32,
                    _ => [0xff0d, 0xff08, 0xffe1, 0x20][rng.below(4) as usize],
                };
                for down in [true, false] {
                    message(ClientMessage::KeyEvent { down, keysym }, &mut browser);
                    keys.push((down, keysym));
                }
                message(
                    ClientMessage::PointerEvent {
                        buttons: 0,
                        x: rng.below(u64::from(WIDTH)) as u16,
                        y: rng.below(u64::from(HEIGHT)) as u16,
                    },
                    &mut browser,
                );
            }
            message(
                ClientMessage::FramebufferUpdateRequest {
                    incremental: round > 0,
                    x: 0,
                    y: 0,
                    width: WIDTH,
                    height: HEIGHT,
                },
                &mut browser,
            );
            browser_rounds.push(browser.len());
            // The answer: perhaps a bell, the clipboard in the first round, one update.
            if rng.below(3) == 0 {
                vm.push(2);
            }
            if round == 0 {
                vm.extend_from_slice(&[3, 0, 0, 0]);
                vm.extend_from_slice(&(vm_clip.len() as u32).to_be_bytes());
                vm.extend_from_slice(&vm_clip);
            }
            let rects = 1 + rng.below(3) as u16;
            write_update_header(rects, &mut vm);
            for _ in 0..rects {
                let w = 1 + rng.below(u64::from(WIDTH)) as u16;
                let h = 1 + rng.below(u64::from(HEIGHT)) as u16;
                let x = rng.below(u64::from(WIDTH - w + 1)) as u16;
                let y = rng.below(u64::from(HEIGHT - h + 1)) as u16;
                if rng.below(5) == 0 {
                    write_rect_header(x, y, w, h, Encoding::COPY_RECT, &mut vm);
                    let sx = rng.below(u64::from(WIDTH - w + 1)) as u16;
                    let sy = rng.below(u64::from(HEIGHT - h + 1)) as u16;
                    vm.extend_from_slice(&sx.to_be_bytes());
                    vm.extend_from_slice(&sy.to_be_bytes());
                } else {
                    write_rect_header(x, y, w, h, Encoding::RAW, &mut vm);
                    rng.fill(&mut vm, usize::from(w) * usize::from(h) * bytes_per_pixel);
                }
            }
            vm_rounds.push(vm.len());
        }
        let mut to_vm = Vec::new();
        write_set_encodings([Encoding::QEMU_LED_STATE], &mut to_vm);
        to_vm.extend_from_slice(&browser[..encodings_at]);
        write_set_encodings(
            [Encoding::RAW, Encoding::COPY_RECT, Encoding::QEMU_LED_STATE],
            &mut to_vm,
        );
        to_vm.extend_from_slice(&browser[encodings_end..]);
        let added = to_vm.len() - browser.len();
        let to_vm_rounds = browser_rounds.iter().map(|r| r + added).collect();
        Script {
            browser,
            browser_rounds,
            to_vm,
            to_vm_rounds,
            vm,
            vm_rounds,
            keys,
            browser_clip,
            vm_clip,
        }
    }
}

/// `data` cut at up to two random points: how it goes over the wire.
fn pieces<'a>(data: &'a [u8], rng: &mut Rng) -> Vec<&'a [u8]> {
    let mut cuts = vec![0, data.len()];
    for _ in 0..rng.below(3) {
        cuts.push(rng.below(data.len() as u64 + 1) as usize);
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2).map(|w| &data[w[0]..w[1]]).collect()
}

/// Checks `got`, which arrived at offset `at` of a stream, against `want`, the whole
/// expected stream.
fn check(what: &str, want: &[u8], at: usize, got: &[u8]) -> Result<(), String> {
    let Some(expected) = want.get(at..at + got.len()) else {
        return Err(format!(
            "{what}: {} bytes arrived at offset {at} of a {}-byte stream",
            got.len(),
            want.len()
        ));
    };
    match expected.iter().zip(got).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: byte {} is {:#04x}, the script says {:#04x}",
            at + i,
            got[i],
            expected[i]
        )),
    }
}

fn domain_name(d: usize) -> String {
    format!("load-{d:03}")
}

/// A fresh password: eight characters (VNC authentication uses eight), one of them
/// one that XML must escape. Registered for the run's secret check.
fn password() -> String {
    use rand::distributions::{Alphanumeric, DistString};
    let p = format!(
        "&{}",
        Alphanumeric.sample_string(&mut rand::thread_rng(), 7)
    );
    common::run::secret("load test VNC password", &p);
    p
}

/// What a VM double saw of one console connection.
struct VmReport {
    domain: String,
    nonce: u64,
    received: usize,
    received_sha: [u8; 32],
    sent: usize,
    sent_sha: [u8; 32],
}

/// The doubles' shared state.
#[derive(Default)]
struct Vms {
    /// Every nonce handed out.
    nonces: Mutex<HashSet<u64>>,
    /// Connections accepted, and sessions that went wrong and why.
    stats: Arc<Stats>,
    /// Sessions played to their end.
    reports: Mutex<Vec<VmReport>>,
}

impl Vms {
    fn fresh_nonce(&self) -> u64 {
        let mut nonces = self.nonces.lock().unwrap();
        loop {
            let n: u64 = rand::random();
            if nonces.insert(n) {
                return n;
            }
        }
    }
}

/// One console connection to the double of `domain`, past VNC authentication with its
/// password: ServerInit naming a fresh nonce, then the nonce's script, every byte from
/// vizor checked; the VM closes the console after its last update.
async fn vm_session(conn: Conn, domain: &str, vms: &Vms) -> Result<VmReport, String> {
    let Conn {
        stream: mut s,
        mut buf,
        ..
    } = conn;
    let mut out = Vec::new();
    let nonce = vms.fresh_nonce();
    ServerInit {
        width: WIDTH,
        height: HEIGHT,
        pixel_format: PixelFormat::RGB888,
        name: format!("vizor-load {domain} {nonce:016x}").into_bytes(),
    }
    .write(&mut out);
    s.write_all(&out).await.map_err(|e| e.to_string())?;

    let script = Script::new(domain, nonce);
    let what = format!("{domain} session {nonce:016x}, browser to VM");
    let mut cut = Rng(nonce.rotate_left(17));
    let (mut received, mut received_sha, mut sent_sha) = (0, Sha256::new(), Sha256::new());
    let mut vm_at = 0;
    for round in 0..ROUNDS {
        while received < script.to_vm_rounds[round] {
            if buf.is_empty() && s.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                return Err(format!(
                    "{what}: vizor closed after {received} of {} bytes",
                    script.to_vm.len()
                ));
            }
            check(&what, &script.to_vm, received, &buf)?;
            received_sha.update(&buf);
            received += buf.len();
            buf.clear();
        }
        if received != script.to_vm_rounds[round] {
            return Err(format!(
                "{what}: bytes past the update request of round {round}"
            ));
        }
        let answer = &script.vm[vm_at..script.vm_rounds[round]];
        vm_at = script.vm_rounds[round];
        for piece in pieces(answer, &mut cut) {
            s.write_all(piece).await.map_err(|e| e.to_string())?;
            tokio::task::yield_now().await;
        }
        sent_sha.update(answer);
    }
    // The VM closes the console; vizor must then close the session, sending nothing more.
    s.shutdown().await.map_err(|e| e.to_string())?;
    let n = s.read_buf(&mut buf).await.map_err(|e| e.to_string())?;
    if n != 0 {
        return Err(format!("{what}: {n} bytes after the last round"));
    }
    Ok(VmReport {
        domain: domain.to_owned(),
        nonce,
        received,
        received_sha: received_sha.finalize().into(),
        sent: vm_at,
        sent_sha: sent_sha.finalize().into(),
    })
}

/// Serves one domain's double: VNC authentication with `password`, then
/// [`vm_session`] on each console connection.
async fn vm_listen(domain: String, password: &str, vms: Arc<Vms>) -> Served {
    Double::new(Auth::Password(password.to_owned()))
        .label(&domain)
        .stats(vms.stats.clone())
        .listen(move |conn| {
            let (domain, vms) = (domain.clone(), vms.clone());
            async move {
                let report = vm_session(conn, &domain, &vms).await?;
                vms.reports.lock().unwrap().push(report);
                Ok(())
            }
        })
        .await
        .unwrap()
}

/// What a browser saw of its session.
struct BrowserReport {
    domain: String,
    user: String,
    local: SocketAddr,
    nonce: u64,
    sent: usize,
    sent_sha: [u8; 32],
    received: usize,
    received_sha: [u8; 32],
}

/// Browser `i` is in its session, with its address and nonce.
type Ready = (usize, SocketAddr, u64);

/// The loopback address browser `i` connects from.
fn source(i: usize) -> IpAddr {
    let s = i % SOURCES;
    IpAddr::V4(Ipv4Addr::new(127, 77, (s / 250) as u8, (s % 250 + 1) as u8))
}

/// Browser `i`: opens its console (all of them at once), says it is ready, waits for
/// `go`, then plays its script, checking every byte from vizor.
async fn browser(
    i: usize,
    fleet: Arc<Fleet>,
    ready: mpsc::UnboundedSender<Ready>,
    mut go: watch::Receiver<bool>,
) -> Result<BrowserReport, String> {
    let d = i % DOMAINS;
    let domain = domain_name(d);
    let user = format!("user{:02}", i % USERS);
    let v = fleet.replica_of(i);
    let token = fleet.token(d, &user);
    let tcp = common::tcp_from(source(i), v.addr).await;
    let local = tcp.local_addr().map_err(|e| e.to_string())?;
    let mut b = Browser::connect_over(tcp, v.addr, &format!("/websockify?token={token}")).await;
    let si = common::rfb::rfb_handshake(&mut b)
        .await
        .map_err(|e| format!("browser {i} ({domain}): handshake: {e}"))?;
    let name = si.name_lossy();
    let nonce = name
        .strip_prefix(&format!("vizor-load {domain} "))
        .and_then(|n| u64::from_str_radix(n, 16).ok())
        .ok_or_else(|| format!("browser {i} of {domain} got the desktop {name:?}"))?;
    if (si.width, si.height, si.pixel_format) != (WIDTH, HEIGHT, PixelFormat::RGB888)
        || !b.pending.is_empty()
    {
        return Err(format!("browser {i}: unexpected ServerInit {si:?}"));
    }
    ready.send((i, local, nonce)).map_err(|e| e.to_string())?;
    go.wait_for(|go| *go).await.map_err(|e| e.to_string())?;

    let script = Script::new(&domain, nonce);
    let what = format!("{domain} session {nonce:016x}, VM to browser");
    let mut cut = Rng(!nonce);
    let (mut received, mut received_sha, mut sent_sha) = (0, Sha256::new(), Sha256::new());
    b.received.clear();
    let mut browser_at = 0;
    for round in 0..ROUNDS {
        let part = &script.browser[browser_at..script.browser_rounds[round]];
        browser_at = script.browser_rounds[round];
        for piece in pieces(part, &mut cut) {
            b.send(piece).await;
        }
        sent_sha.update(part);
        while received < script.vm_rounds[round] {
            b.read().await.map_err(|c| {
                format!(
                    "{what}: closed ({} {}) after {received} of {} bytes",
                    c.code,
                    c.reason,
                    script.vm.len()
                )
            })?;
            let data = std::mem::take(&mut b.pending);
            b.received.clear();
            check(&what, &script.vm, received, &data)?;
            received_sha.update(&data);
            received += data.len();
        }
        if received != script.vm_rounds[round] {
            return Err(format!("{what}: bytes past the update of round {round}"));
        }
    }
    match b.read().await {
        Err(c)
            if c == Closed {
                code: 1000,
                reason: VM_CLOSED.into(),
            } => {}
        Err(c) => return Err(format!("{what}: closed with {c:?}")),
        Ok(()) => return Err(format!("{what}: bytes after the last round")),
    }
    Ok(BrowserReport {
        domain,
        user,
        local,
        nonce,
        sent: browser_at,
        sent_sha: sent_sha.finalize().into(),
        received,
        received_sha: received_sha.finalize().into(),
    })
}

/// The soft and hard limits on open files of this process.
fn open_files_limit() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let n = |s: &str| s.parse().unwrap_or(u64::MAX); // "unlimited"
    let mut f = line["Max open files".len()..].split_whitespace();
    (n(f.next().unwrap()), n(f.next().unwrap()))
}

/// Raises this process's soft limit on open files to [`OPEN_FILES`] if it is lower
/// (vizor, started after, inherits it), or fails the test saying why it cannot run.
fn raise_open_files() {
    let (soft, hard) = open_files_limit();
    if soft >= OPEN_FILES {
        return;
    }
    assert!(
        hard >= OPEN_FILES,
        "the load test needs {OPEN_FILES} open files, and the hard limit is {hard} (ulimit -Hn)"
    );
    // prlimit(1): the crate forbids unsafe code, and setrlimit(2) has no safe wrapper here.
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={OPEN_FILES}:{hard}"))
        .status()
        .expect("run prlimit (util-linux) to raise the open files limit");
    assert!(status.success(), "prlimit failed: {status}");
    let (soft, _) = open_files_limit();
    assert!(soft >= OPEN_FILES, "open files limit still {soft}");
}

/// A metric that must have a value.
fn metric(text: &str, series: &str) -> f64 {
    common::metric(text, series).unwrap_or_else(|| panic!("no {series} in /metrics"))
}

/// How the load is served: one vizor and one libvirt, or two replicas sharing Redis
/// in front of two libvirt hosts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    One,
    Fleet,
}

/// The vizors under load, and where each domain is.
struct Fleet {
    replicas: Vec<Arc<Vizor>>,
    layout: Layout,
    _redis: Option<common::redis::Redis>,
    _nodes: Vec<tempfile::TempDir>,
}

impl Fleet {
    /// The libvirt host of domain `d`: the first half on `a`, the rest on `b` (one
    /// host, `default`, in the one-vizor layout).
    fn host_of(&self, d: usize) -> &'static str {
        match (self.layout, d < DOMAINS / 2) {
            (Layout::One, _) => "default",
            (Layout::Fleet, true) => "a",
            (Layout::Fleet, false) => "b",
        }
    }

    /// The replica browser `i` goes to.
    fn replica_of(&self, i: usize) -> Arc<Vizor> {
        self.replicas[i % self.replicas.len()].clone()
    }

    /// A token of `user` for domain `d` on its host, valid for a minute (every replica
    /// has the same key).
    fn token(&self, d: usize, user: &str) -> String {
        let domain = domain_name(d);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let uuid = vizor::token::parse_uuid(&common::uuid_of(&domain)).unwrap();
        let claims = vizor::token::Claims::new(&domain, uuid, ConsoleKind::Vnc, user, now + 60)
            .unwrap()
            .on_host(self.host_of(d));
        self.replicas[0].seal(&claims)
    }

    /// Starts the vizors for `domains` (name, port, password).
    fn start(layout: Layout, domains: &[(String, u16, String)]) -> Fleet {
        let limits = format!("[limits]\nmax_sessions = {SESSIONS}\n");
        if layout == Layout::One {
            let (node, uri) = common::test_node(domains);
            let v = Vizor::start_uri(
                &uri,
                "",
                "",
                &format!("{}{limits}", common::ADMIN_API),
                common::write_admin_key,
            );
            return Fleet {
                replicas: vec![Arc::new(v)],
                layout,
                _redis: None,
                _nodes: vec![node],
            };
        }
        let (node_a, uri_a) = common::test_node(&domains[..DOMAINS / 2]);
        let (node_b, uri_b) = common::test_node(&domains[DOMAINS / 2..]);
        let hosts = format!(
            "[[libvirt.hosts]]\nname = \"a\"\nuri = \"{uri_a}\"\n\
             [[libvirt.hosts]]\nname = \"b\"\nuri = \"{uri_b}\"\n"
        );
        let redis = common::redis::Redis::start();
        let tail = |name| {
            format!(
                "{}lease = \"{}s\"\n{}{limits}",
                redis.state_table(name),
                LEASE.as_secs(),
                common::ADMIN_API
            )
        };
        let first = Vizor::start_libvirt("", &hosts, &tail("r1"), |dir| {
            redis.write_password(dir);
            common::write_admin_key(dir);
        });
        let key = first.dir.path().join("token.key");
        let second = Vizor::start_libvirt("", &hosts, &tail("r2"), |dir| {
            redis.write_password(dir);
            common::write_admin_key(dir);
            std::fs::copy(&key, dir.join("token.key")).unwrap();
        });
        Fleet {
            replicas: vec![Arc::new(first), Arc::new(second)],
            layout,
            _redis: Some(redis),
            _nodes: vec![node_a, node_b],
        }
    }
}

/// The replicas' `[state] lease` in the fleet layout (short: a new Redis admits no
/// session for a lease).
const LEASE: Duration = Duration::from_secs(4);

/// One load at a time: each is as much as the machine takes.
static ONE_LOAD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_sessions_lose_and_mix_nothing() {
    let _one = ONE_LOAD.lock().await;
    tokio::time::timeout(BOUND, load(Layout::One))
        .await
        .unwrap_or_else(|_| panic!("the load test took longer than {BOUND:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (scripts/test.sh installs it and runs it with --include-ignored)"]
async fn a_thousand_sessions_over_two_replicas_and_two_hosts_lose_and_mix_nothing() {
    let _one = ONE_LOAD.lock().await;
    tokio::time::timeout(BOUND, load(Layout::Fleet))
        .await
        .unwrap_or_else(|_| panic!("the load test took longer than {BOUND:?}"));
}

async fn load(layout: Layout) {
    raise_open_files();
    let began = Instant::now();
    let vms = Arc::new(Vms::default());
    let mut domains = Vec::new();
    let mut listeners = Vec::new();
    for d in 0..DOMAINS {
        let password = password();
        let served = vm_listen(domain_name(d), &password, vms.clone()).await;
        domains.push((domain_name(d), served.port(), password));
        listeners.push(served);
    }
    let fleet = Arc::new(Fleet::start(layout, &domains));
    if layout == Layout::Fleet {
        // A new Redis counts the replicas' sessions for a lease before it admits any.
        tokio::time::sleep(LEASE + Duration::from_millis(500)).await;
    }
    let replicas = fleet.replicas.clone();
    let fds_idle: Vec<usize> = replicas.iter().map(|v| v.open_fds()).collect();

    // Ramp up: every browser opens its console and waits.
    let started = Instant::now();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let (go_tx, go_rx) = watch::channel(false);
    let mut browsers = tokio::task::JoinSet::new();
    for i in 0..SESSIONS {
        browsers.spawn(browser(i, fleet.clone(), ready_tx.clone(), go_rx.clone()));
    }
    drop(ready_tx);
    let mut ready: Vec<Ready> = Vec::new();
    while ready.len() < SESSIONS {
        tokio::select! {
            Some(r) = ready_rx.recv() => ready.push(r),
            Some(done) = browsers.join_next() => panic!(
                "a browser ended before all {SESSIONS} were in their sessions \
                 ({} were): {:?}\nVM doubles: {:?}",
                ready.len(),
                done.map(|r| r.err()),
                vms.stats.failures(),
            ),
        }
    }
    let ramped = started.elapsed();

    // All of them at once: vizor relays them all, and refuses one more. A browser gets
    // ServerInit only once its session is on record and listed on its replica; the
    // other replica's sessions are listed as their replica writes them to Redis (as
    // soon as each is live).
    let first = &replicas[0];
    let mut sessions = first.sessions().await;
    for _ in 0..100 {
        if sessions.len() >= SESSIONS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        sessions = first.sessions().await;
    }
    assert_eq!(sessions.len(), SESSIONS, "sessions in /api/v1/sessions");
    let listed: HashMap<String, (String, String, String)> = sessions
        .iter()
        .map(|s| {
            (
                s["client"].as_str().unwrap().to_owned(),
                (
                    s["domain"].as_str().unwrap().to_owned(),
                    s["user"].as_str().unwrap().to_owned(),
                    s["replica"].as_str().unwrap_or("").to_owned(),
                ),
            )
        })
        .collect();
    for (i, local, _) in &ready {
        let replica = match layout {
            Layout::One => "",
            Layout::Fleet => ["r1", "r2"][i % 2],
        };
        assert_eq!(
            listed.get(&local.to_string()),
            Some(&(
                domain_name(i % DOMAINS),
                format!("user{:02}", i % USERS),
                replica.to_owned()
            )),
            "browser {i} at {local} in /api/v1/sessions"
        );
    }
    let mut active = 0.0;
    for v in &replicas {
        active += metric(&v.metrics().await, "vizor_sessions_active{kind=\"vnc\"}");
    }
    assert_eq!(active, SESSIONS as f64);
    let fds_peak: Vec<usize> = replicas.iter().map(|v| v.open_fds()).collect();
    let rss_peak: Vec<u64> = replicas.iter().map(|v| v.rss_kib()).collect();
    {
        // On the last replica, which holds only its share: the limit counts all.
        let v = replicas.last().unwrap();
        let token = fleet.token(0, "one-too-many");
        let mut b = Browser::connect(v.addr, &format!("/websockify?token={token}")).await;
        assert_eq!(
            common::rfb::rfb_handshake(&mut b).await.unwrap_err(),
            "closed 1008: vizor has as many sessions as it allows; try again later"
        );
    }

    // Go: every session plays its script at once.
    let relaying = Instant::now();
    go_tx.send(true).unwrap();
    let mut reports = Vec::new();
    let mut errors = Vec::new();
    while let Some(done) = browsers.join_next().await {
        match done {
            Ok(Ok(r)) => reports.push(r),
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(format!("browser task: {e}")),
        }
    }
    let relayed = relaying.elapsed();
    assert!(
        errors.is_empty(),
        "{} of {SESSIONS} browsers failed, the first: {:?}\nVM doubles: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)],
        vms.stats.failures(),
    );
    // The doubles finish once vizor has closed their consoles.
    for _ in 0..100 {
        if vms.reports.lock().unwrap().len() + vms.stats.failures().len() >= SESSIONS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(listeners);
    let failures = vms.stats.failures();
    assert!(failures.is_empty(), "VM doubles: {failures:?}");
    assert_eq!(
        vms.stats.accepted.load(Ordering::Relaxed),
        SESSIONS,
        "console connections: one per session, none for the refused one"
    );

    // Both ends of every session agree on every byte, and no nonce is in two sessions.
    let vm_reports: HashMap<u64, VmReport> = std::mem::take(&mut *vms.reports.lock().unwrap())
        .into_iter()
        .map(|r| (r.nonce, r))
        .collect();
    assert_eq!(vm_reports.len(), SESSIONS, "sessions the VM doubles played");
    let mut seen = HashSet::new();
    for b in &reports {
        assert!(
            seen.insert(b.nonce),
            "nonce {:016x} in two browsers",
            b.nonce
        );
        let vm = &vm_reports[&b.nonce];
        assert_eq!(vm.domain, b.domain, "session {:016x}", b.nonce);
        // The VM got the browser's bytes as vizor passes them on (its LED request
        // added), every one checked against the script as it came.
        let script = Script::new(&b.domain, b.nonce);
        let digest = |d: &[u8]| -> [u8; 32] { Sha256::digest(d).into() };
        assert_eq!(
            (b.sent, b.sent_sha),
            (script.browser.len(), digest(&script.browser)),
            "session {:016x}: the browser's bytes",
            b.nonce
        );
        assert_eq!(
            (vm.received, vm.received_sha),
            (script.to_vm.len(), digest(&script.to_vm)),
            "session {:016x}: browser to VM",
            b.nonce
        );
        assert_eq!(
            (vm.sent, vm.sent_sha),
            (b.received, b.received_sha),
            "session {:016x}: VM to browser",
            b.nonce
        );
    }
    let by_client: HashMap<String, &BrowserReport> =
        reports.iter().map(|b| (b.local.to_string(), b)).collect();

    // vizor's own account: each replica's audit log, record by record (each replica
    // numbers its own sessions).
    let mut script_of: HashMap<(usize, u64), (&BrowserReport, Script)> = HashMap::new();
    let mut keys: HashMap<(usize, u64), Vec<(bool, u32)>> = HashMap::new();
    let mut clips: HashMap<(usize, u64), Vec<(String, String)>> = HashMap::new();
    let mut ends: HashMap<(usize, u64), serde_json::Value> = HashMap::new();
    let hex = |b: &[u8]| -> String { b.iter().map(|x| format!("{x:02x}")).collect() };
    let mut lifted = 0usize;
    let mut spent = std::collections::HashSet::new();
    let mut refused = 0;
    for (n, v) in replicas.iter().enumerate() {
        let share = (0..SESSIONS).filter(|i| i % replicas.len() == n).count();
        let audit = tokio::task::block_in_place(|| v.wait_for_records("session_end", share));
        for r in audit {
            let session = r["session"].as_u64().map(|s| (n, s));
            match r["event"].as_str().unwrap() {
                // Each browser's token, spent once, before its session.
                "token_used" => assert!(
                    spent.insert(r["token_id"].as_str().unwrap().to_owned()),
                    "{r}"
                ),
                "session_start" => {
                    let b = by_client[r["client"].as_str().unwrap()];
                    assert_eq!(
                        (r["domain"].as_str(), r["user"].as_str()),
                        (Some(b.domain.as_str()), Some(b.user.as_str())),
                        "{r}"
                    );
                    let d: usize = b.domain.strip_prefix("load-").unwrap().parse().unwrap();
                    match fleet.host_of(d) {
                        "default" => assert!(r.get("host").is_none(), "{r}"),
                        host => assert_eq!(r["host"], host, "{r}"),
                    }
                    let script = Script::new(&b.domain, b.nonce);
                    assert!(script_of.insert(session.unwrap(), (b, script)).is_none());
                }
                // Sessions of one domain share its keyboard, as QEMU's is shared: when
                // one ends, QEMU releases every key still down, other sessions' too;
                // vizor records those releases (origin "disconnect") under the session
                // that ended. Every other key record is the browser's own event.
                "key" if r["origin"] == "disconnect" => {
                    assert_eq!(r["down"], false, "{r}");
                    assert!(r.get("keysym").is_none(), "{r}");
                    lifted += 1;
                }
                "key" => keys.entry(session.unwrap()).or_default().push((
                    r["down"].as_bool().unwrap(),
                    r["keysym"].as_u64().unwrap() as u32,
                )),
                "clipboard" => clips.entry(session.unwrap()).or_default().push((
                    r["direction"].as_str().unwrap().to_owned(),
                    r["sha256"].as_str().unwrap().to_owned(),
                )),
                "session_end" => assert!(ends.insert(session.unwrap(), r).is_none()),
                "session_refused" => {
                    assert_eq!(r["reason"], "limit_sessions", "{r}");
                    refused += 1;
                }
                other => panic!("unexpected {other} record: {r}"),
            }
        }
        let (chained, why) = v.verify(&[v.audit_path()]);
        assert!(chained, "vizor audit verify: {why}");
    }
    assert_eq!(refused, 1, "session_refused records");
    assert_eq!(script_of.len(), SESSIONS, "session_start records");
    assert!(
        spent.len() >= SESSIONS,
        "{} token_used records",
        spent.len()
    );
    for (session, (b, script)) in &script_of {
        let end = &ends[session];
        assert_eq!(end["reason"], VM_CLOSED, "{end}");
        assert_eq!(
            (
                end["bytes_browser_to_vm"].as_u64(),
                end["bytes_vm_to_browser"].as_u64()
            ),
            (Some(script.to_vm.len() as u64), Some(b.received as u64)),
            "{end}"
        );
        assert_eq!(
            keys.get(session),
            Some(&script.keys),
            "keys of session {session:?}"
        );
        assert_eq!(
            clips.get(session),
            Some(&vec![
                (
                    "browser_to_vm".to_owned(),
                    hex(Sha256::digest(&script.browser_clip).as_slice())
                ),
                (
                    "vm_to_browser".to_owned(),
                    hex(Sha256::digest(&script.vm_clip).as_slice())
                ),
            ]),
            "clipboard of session {session:?}"
        );
    }

    // ... and the metrics, summed over the replicas.
    let mut m = Vec::new();
    for (n, v) in replicas.iter().enumerate() {
        let share = (0..SESSIONS).filter(|i| i % replicas.len() == n).count();
        v.wait_for_metric(
            "vizor_sessions_total{kind=\"vnc\",outcome=\"vm_closed\"}",
            share as f64,
        )
        .await;
        m.push(v.metrics().await);
    }
    let summed = |series: &str| m.iter().map(|text| metric(text, series)).sum::<f64>();
    let total = |f: fn(&BrowserReport) -> usize| reports.iter().map(f).sum::<usize>() as f64;
    for (series, want) in [
        ("vizor_sessions_active{kind=\"vnc\"}", 0.0),
        (
            "vizor_sessions_total{kind=\"vnc\",outcome=\"limit_sessions\"}",
            1.0,
        ),
        (
            "vizor_session_bytes_total{direction=\"browser_to_vm\",kind=\"vnc\"}",
            // What vizor wrote to the VMs: each browser's bytes and vizor's 12 more.
            script_of
                .values()
                .map(|(_, s)| s.to_vm.len())
                .sum::<usize>() as f64,
        ),
        (
            "vizor_session_bytes_total{direction=\"vm_to_browser\",kind=\"vnc\"}",
            total(|b| b.received),
        ),
        // One update answers each round's request, after each round's input.
        (
            "vizor_frame_latency_seconds_count{kind=\"vnc\"}",
            (SESSIONS * ROUNDS) as f64,
        ),
        (
            "vizor_input_to_display_seconds_count{kind=\"vnc\"}",
            (SESSIONS * ROUNDS) as f64,
        ),
        (
            "vizor_audit_events_total{event=\"key\"}",
            (script_of.values().map(|(_, s)| s.keys.len()).sum::<usize>() + lifted) as f64,
        ),
    ] {
        assert_eq!(summed(series), want, "{series}");
    }
    // Every session's sockets are closed again.
    for (n, v) in replicas.iter().enumerate() {
        let fds_after = v.open_fds();
        assert!(
            fds_after <= fds_idle[n] + 8,
            "replica {n} holds {fds_after} files after the load, {} before",
            fds_idle[n]
        );
    }
    eprintln!(
        "load ({layout:?}): {SESSIONS} sessions on {DOMAINS} domains over {} vizor(s), {} bytes \
         browser to VM and {} VM to browser, all checked; ramp-up {ramped:?}, relaying \
         {relayed:?}, whole test {:?}; vizor at the peak: {fds_peak:?} files, {:?} MiB resident",
        replicas.len(),
        total(|b| b.sent),
        total(|b| b.received),
        began.elapsed(),
        rss_peak.iter().map(|r| r / 1024).collect::<Vec<_>>(),
    );
}
