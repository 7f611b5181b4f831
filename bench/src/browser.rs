//! What a browser feels: noVNC 1.7 in headless Chromium (`bench/browser.mjs`, driven
//! over its stdin), connected through vizor, websockify and, against a real QEMU,
//! QEMU's own WebSocket VNC server (no proxy at all: the limit for a browser). Each
//! measurement is made inside the page: updates noVNC finished drawing per second,
//! WebSocket bytes per second, and input to display (a pointer event to the end of the
//! first update that began after it), p50 and p99; beside it the proxy's CPU.
//!
//! Every path is measured on an idle machine and with one CPU-bound process beside it
//! (a hypervisor host is busy with its VMs), in interleaved rounds.
//!
//! Three cases: `browser` against the synthetic server (full-screen 1920x1080 Raw
//! updates, as fast as noVNC asks for them), which also sweeps vizor's
//! `ws_message_size`; `browser-qemu` against a running libvirt domain whose guest
//! changes every pixel (`test-host.sh domain NAME --pattern-disk`), with noVNC's
//! default encodings; `browser-spice`: spice-html5 against the same kind of domain's
//! SPICE console, through vizor and websockify.

use crate::cases::Bench;
use crate::proxy::{Proxy, Way};
use crate::report::{num, quantile, Case, Cell, Goal, Row};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// The page driver: node with headless Chromium, one page per measurement.
struct Page {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

/// One measurement, as the page reports it.
#[derive(Debug, serde::Deserialize)]
struct Measured {
    #[serde(default)]
    updates: u64,
    #[serde(default)]
    seconds: f64,
    #[serde(default)]
    bytes: u64,
    #[serde(default)]
    bytes_all: u64,
    #[serde(default)]
    messages: u64,
    #[serde(default)]
    largest: u64,
    #[serde(default)]
    latency_ms: Vec<f64>,
    #[serde(default)]
    unanswered: u64,
    #[serde(default)]
    next_ms: Vec<f64>,
    error: Option<String>,
}

impl Page {
    async fn start(root: &Path, port: u16) -> Result<Page, String> {
        let script = root.join("bench/browser.mjs");
        let mut child = Command::new("node")
            .arg(&script)
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("node {}: {e}", script.display()))?;
        let stdin = child.stdin.take().ok_or("node: no stdin")?;
        let stdout = child.stdout.take().ok_or("node: no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .map_err(|_| "Chromium did not start within 60 s".to_owned())?
            .map_err(|e| format!("node: {e}"))?;
        if ready.as_deref() != Some("ready") {
            return Err(format!(
                "node bench/browser.mjs did not start ({ready:?}): scripts/web-deps.sh --browser \
                 installs Chromium and playwright-core"
            ));
        }
        Ok(Page {
            child,
            stdin,
            lines,
        })
    }

    async fn measure(
        &mut self,
        url: &str,
        password: Option<&str>,
        seconds: u64,
        client: Client,
    ) -> Result<Measured, String> {
        let req = serde_json::json!({
            "url": url,
            "password": password,
            "seconds": seconds,
            "warmup": 2,
            "input_ms": 100,
            "client": match client {
                Client::NoVnc => "vnc",
                Client::SpiceHtml5 => "spice",
            },
        });
        let mut line = req.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .map_err(|e| format!("to the page driver: {e}"))?;
        let answer =
            tokio::time::timeout(Duration::from_secs(seconds + 40), self.lines.next_line())
                .await
                .map_err(|_| "no answer from the page".to_owned())?
                .map_err(|e| format!("from the page driver: {e}"))?
                .ok_or("the page driver exited")?;
        let m: Measured = serde_json::from_str(&answer).map_err(|e| format!("{e}: {answer}"))?;
        match &m.error {
            Some(e) => Err(e.clone()),
            None if m.updates == 0 => Err("no update was drawn".into()),
            None => Ok(m),
        }
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A CPU-bound process beside the measurement while it lives.
struct Load(Option<std::process::Child>);

impl Load {
    fn start(on: bool) -> Load {
        Load(
            on.then(|| {
                std::process::Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .spawn()
                    .ok()
            })
            .flatten(),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The console client in the page.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Client {
    /// noVNC 1.7.
    NoVnc,
    /// Debian's spice-html5.
    SpiceHtml5,
}

/// One path a page connects through.
struct Target {
    name: String,
    url: Url,
    password: Option<String>,
    /// The proxy's index in the case's proxies, for its CPU.
    proxy: Option<usize>,
}

/// Where a page connects: vizor's tokens are single-use, so each measurement gets one.
enum Url {
    Fixed(String),
    /// vizor in front of the synthetic server.
    Synthetic,
    /// vizor in front of a libvirt domain's VNC console.
    Domain(String, [u8; 16]),
    /// vizor in front of a libvirt domain's SPICE console.
    SpiceDomain(String, [u8; 16]),
}

impl Target {
    fn url(&self, proxies: &[Proxy], n: usize) -> String {
        let proxy = self.proxy.map(|i| &proxies[i]);
        match (&self.url, proxy) {
            (Url::Fixed(u), _) => u.clone(),
            (Url::Synthetic, Some(p)) => match p.route(n) {
                crate::client::Route::Ws { addr, path, .. } => format!("ws://{addr}{path}"),
                crate::client::Route::Tcp { addr, .. } => format!("ws://{addr}/"),
            },
            (Url::Domain(d, uuid), Some(p)) => format!(
                "ws://{}/websockify?token={}",
                p.addr,
                p.token(d, *uuid).unwrap_or_default()
            ),
            (Url::SpiceDomain(d, uuid), Some(p)) => format!(
                "ws://{}/websockify?token={}",
                p.addr,
                p.token_for(d, *uuid, vizor::token::ConsoleKind::Spice)
                    .unwrap_or_default()
            ),
            (_, None) => String::new(),
        }
    }
}

/// Per target, per condition: each round's measurements.
type Results = BTreeMap<(String, &'static str), Vec<(Measured, Option<Cpu>)>>;

/// The proxy's CPU over one measurement (its warm-up included).
#[derive(Debug, Clone, Copy)]
struct Cpu {
    seconds: f64,
    wall: f64,
}

const CONDITIONS: [(&str, bool); 2] = [("idle", false), ("loaded", true)];

/// `rounds` interleaved rounds, each every target in each condition, with `pause`
/// after each round.
async fn measure(
    case: &mut Case,
    page: &mut Page,
    targets: &[Target],
    proxies: &[Proxy],
    (rounds, seconds): (usize, u64),
    pause: Duration,
    client: Client,
) -> Results {
    let mut results: Results = BTreeMap::new();
    for round in 0..rounds {
        for (condition, loaded) in CONDITIONS {
            let load = Load::start(loaded);
            for t in targets {
                let cpu0 = t.proxy.map(|i| proxies[i].cpu_seconds());
                let url = t.url(proxies, round);
                let t0 = std::time::Instant::now();
                let r = page
                    .measure(&url, t.password.as_deref(), seconds, client)
                    .await;
                let cpu = t.proxy.zip(cpu0).map(|(i, c0)| Cpu {
                    seconds: proxies[i].cpu_seconds() - c0,
                    wall: t0.elapsed().as_secs_f64(),
                });
                match r {
                    Ok(m) => {
                        eprintln!(
                            "vizor-bench: {} round {round} {condition} {}: {:.1} updates/s, \
                             {:.0} MB/s in {} messages, largest {} KiB",
                            case.name,
                            t.name,
                            m.updates as f64 / m.seconds,
                            m.bytes as f64 / m.seconds / 1e6,
                            m.messages,
                            m.largest >> 10
                        );
                        results
                            .entry((t.name.clone(), condition))
                            .or_default()
                            .push((m, cpu));
                    }
                    Err(e) => case
                        .errors
                        .push(format!("{} round {round} {condition}: {e}", t.name)),
                }
            }
            drop(load);
        }
        tokio::time::sleep(pause).await;
    }
    results
}

/// How a case times input.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Input {
    /// The server draws the input: from sending it to the frame that shows it.
    Drawn,
    /// Nothing shows it: from sending it to the next update begun after it.
    NextUpdate,
}

/// The case's rows from its results, with vizor's targets; its table printed and kept
/// in its notes.
fn report(
    case: &mut Case,
    targets: &[Target],
    results: &Results,
    input: Input,
    updates_goal: (&str, Goal),
    latency_goal: (&str, Goal),
) {
    let timed = match input {
        Input::Drawn => "input to display",
        Input::NextUpdate => "input to next update",
    };
    for (condition, _) in CONDITIONS {
        let mut updates = Row::new(&format!("updates drawn/s, {condition}"), "1/s", true)
            .target(updates_goal.0, updates_goal.1);
        let mut rate = Row::new(&format!("received, {condition}"), "MB/s", true);
        let mut p50 = Row::new(&format!("{timed} p50, {condition}"), "ms", false);
        let mut p99 = Row::new(&format!("{timed} p99, {condition}"), "ms", false)
            .target(latency_goal.0, latency_goal.1);
        let mut lost = Row::new(&format!("inputs never shown, {condition}"), "count", false);
        let mut cpu = Row::new(&format!("proxy CPU, {condition}"), "% of a core", false);
        let mut per_mb = Row::new(&format!("proxy CPU per MB, {condition}"), "ms", false);
        let mut largest = Row::new(&format!("largest message, {condition}"), "KiB", false);
        for t in targets {
            let Some(ms) = results.get(&(t.name.clone(), condition)) else {
                for row in [
                    &mut updates,
                    &mut rate,
                    &mut p50,
                    &mut p99,
                    &mut lost,
                    &mut cpu,
                    &mut per_mb,
                    &mut largest,
                ] {
                    row.missing.insert(t.name.clone(), "failed".into());
                }
                continue;
            };
            let each = |f: &dyn Fn(&Measured) -> f64| -> Cell {
                Cell::of(ms.iter().map(|(m, _)| f(m)).collect())
            };
            updates
                .cells
                .insert(t.name.clone(), each(&|m| m.updates as f64 / m.seconds));
            rate.cells
                .insert(t.name.clone(), each(&|m| m.bytes as f64 / m.seconds / 1e6));
            let times = |m: &Measured| -> Vec<f64> {
                match input {
                    Input::Drawn => m.latency_ms.clone(),
                    Input::NextUpdate => m.next_ms.clone(),
                }
            };
            p50.cells
                .insert(t.name.clone(), each(&|m| quantile(&times(m), 0.5)));
            p99.cells
                .insert(t.name.clone(), each(&|m| quantile(&times(m), 0.99)));
            lost.cells
                .insert(t.name.clone(), each(&|m| m.unanswered as f64));
            largest
                .cells
                .insert(t.name.clone(), each(&|m| m.largest as f64 / 1024.0));
            let used: Vec<(f64, f64)> = ms
                .iter()
                .filter_map(|(m, c)| {
                    // Per MB over the whole page: its warm-up streams too.
                    c.map(|c| {
                        (
                            c.seconds / c.wall * 100.0,
                            c.seconds * 1e3 / (m.bytes_all.max(1) as f64 / 1e6),
                        )
                    })
                })
                .collect();
            if !used.is_empty() {
                cpu.cells
                    .insert(t.name.clone(), Cell::of(used.iter().map(|u| u.0).collect()));
                per_mb
                    .cells
                    .insert(t.name.clone(), Cell::of(used.iter().map(|u| u.1).collect()));
            }
        }
        let lost = (input == Input::Drawn).then_some(lost);
        for row in [updates, rate, p50, p99]
            .into_iter()
            .chain(lost)
            .chain([cpu, per_mb, largest])
        {
            case.rows.push(row.finish());
        }
    }
    let t = table(case, targets);
    println!("{t}");
    case.notes.push(format!("table:\n{t}"));
}

/// The case's own table: one column per path (the harness's table has the four
/// standard paths only).
fn table(case: &Case, targets: &[Target]) -> String {
    let mut out = format!("| {} | measure |", case.name);
    for t in targets {
        out.push_str(&format!(" {} |", t.name));
    }
    out.push_str(" target (vizor) | met |\n|---|---|");
    for _ in targets {
        out.push_str("---|");
    }
    out.push_str("---|---|\n");
    for row in &case.rows {
        out.push_str(&format!("| | {} ({}) |", row.measure, row.unit));
        for t in targets {
            let c = row.cells.get(&t.name).map_or("-".into(), |c| {
                format!("{} ({}-{})", num(c.median), num(c.min), num(c.max))
            });
            out.push_str(&format!(" {c} |"));
        }
        let target = row.target.as_ref().map_or("", |t| t.text.as_str());
        let met = match (row.met, &row.miss) {
            (Some(true), _) => "yes".to_owned(),
            (Some(false), Some(m)) => format!("NO: {m}"),
            (Some(false), None) => "NO".into(),
            (None, _) => String::new(),
        };
        out.push_str(&format!(" {target} | {met} |\n"));
    }
    out
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

/// vizor's message sizes compared against the synthetic server: the default first.
const SWEEP: [(&str, &str); 6] = [
    ("vizor", ""),
    ("vizor 64KiB", "64KiB"),
    ("vizor 128KiB", "128KiB"),
    ("vizor 512KiB", "512KiB"),
    ("vizor 1MiB", "1MiB"),
    ("vizor whole", "32MiB"),
];

/// noVNC against the synthetic server's full-screen Raw updates.
pub async fn synthetic(b: &Bench, root: &Path) -> Case {
    let mut case = Case::new(
        "browser",
        "noVNC 1.7 in headless Chromium, full-screen 1920x1080 Raw updates as fast as it asks",
    );
    let (rounds, seconds) = (b.settings.browser_rounds, b.settings.browser_seconds);
    let port = match free_port() {
        Ok(p) => p,
        Err(e) => {
            case.errors.push(e);
            return case;
        }
    };
    let origin = format!("allowed_origins = [\"http://127.0.0.1:{port}\"]");
    let mut proxies = Vec::new();
    let mut targets = Vec::new();
    for (name, size) in SWEEP {
        let extra = if size.is_empty() {
            origin.clone()
        } else {
            format!("{origin}\nws_message_size = \"{size}\"")
        };
        let dir = b.dir.join("browser").join(name.replace(' ', "-"));
        match Proxy::start_with(
            Way::Vizor,
            &b.programs,
            &b.upstream.consoles,
            0,
            &b.libvirt_uri,
            &dir,
            &extra,
        ) {
            Ok(p) => {
                targets.push(Target {
                    name: name.into(),
                    url: Url::Synthetic,
                    password: None,
                    proxy: Some(proxies.len()),
                });
                proxies.push(p);
            }
            Err(e) => case.errors.push(format!("{name}: {e}")),
        }
    }
    match Proxy::start(
        Way::Websockify,
        &b.programs,
        &b.upstream.consoles,
        0,
        &b.libvirt_uri,
        &b.dir.join("browser").join("websockify"),
    ) {
        Ok(p) => {
            targets.push(Target {
                name: "websockify".into(),
                url: Url::Fixed(format!("ws://{}/websockify", p.addr)),
                password: Some(b.upstream.consoles[0].password.clone()),
                proxy: Some(proxies.len()),
            });
            proxies.push(p);
        }
        Err(e) => case.errors.push(format!("websockify: {e}")),
    }
    // vizor's tokens are single-use: each measurement needs its own.
    let mut page = match Page::start(root, port).await {
        Ok(p) => p,
        Err(e) => {
            case.errors.push(e);
            return case;
        }
    };
    case.notes.push(format!(
        "{rounds} interleaved rounds of {seconds} s per path and condition after 2 s of warm-up; \
         loaded: one CPU-bound process beside it; vizor's ws_message_size: the default (vizor), \
         64KiB to 1MiB, and 32MiB (whole: one message per 8 MB rectangle, as before)"
    ));
    let sizes = (rounds, seconds);
    let results = measure(
        &mut case,
        &mut page,
        &targets,
        &proxies,
        sizes,
        Duration::ZERO,
        Client::NoVnc,
    )
    .await;
    report(
        &mut case,
        &targets,
        &results,
        Input::Drawn,
        (">= websockify", Goal::RatioToAtLeast("websockify", 1.0)),
        ("<= websockify", Goal::RatioToAtMost("websockify", 1.0)),
    );
    case
}

/// The domain's live VNC WebSocket port (libvirt `websocket='-1'`).
fn websocket_port(domain: &str) -> Result<u16, String> {
    let out = std::process::Command::new("virsh")
        .args(["-c", "qemu:///system", "dumpxml", domain])
        .output()
        .map_err(|e| format!("virsh: {e}"))?;
    let xml = String::from_utf8_lossy(&out.stdout);
    xml.split("<graphics")
        .skip(1)
        .map(|t| t.split('>').next().unwrap_or(""))
        .find(|t| t.contains("type='vnc'"))
        .and_then(|t| crate::qemu::attribute(t, "websocket"))
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(|| {
            format!("{domain}'s VNC has no WebSocket port (libvirt <graphics websocket='-1'>)")
        })
}

/// vizor (at `vizor`) and websockify in front of a real QEMU's `console`, the page's
/// origin (port `port`) allowed; the paths that did not start are the case's errors.
fn vizor_and_websockify(
    b: &Bench,
    case: &mut Case,
    console: &crate::upstream::Console,
    port: u16,
    vizor: Url,
) -> (Vec<Proxy>, Vec<Target>) {
    let consoles = vec![console.clone()];
    let mut proxies = Vec::new();
    let mut targets = Vec::new();
    let origin = format!("allowed_origins = [\"http://127.0.0.1:{port}\"]");
    let mut vizor = Some(vizor);
    for way in [Way::Vizor, Way::Websockify] {
        let dir = b.dir.join(&case.name).join(way.name());
        match Proxy::start_with(
            way,
            &b.programs,
            &consoles,
            0,
            "qemu:///system",
            &dir,
            &origin,
        ) {
            Ok(p) => {
                let (url, password) = match (way, vizor.take()) {
                    (Way::Vizor, Some(url)) => (url, None),
                    _ => (
                        Url::Fixed(format!("ws://{}/websockify", p.addr)),
                        Some(console.password.clone()),
                    ),
                };
                targets.push(Target {
                    name: way.name().into(),
                    url,
                    password,
                    proxy: Some(proxies.len()),
                });
                proxies.push(p);
            }
            Err(e) => case.errors.push(format!("{}: {e}", way.name())),
        }
    }
    (proxies, targets)
}

/// noVNC against a real QEMU whose guest changes the whole screen.
pub async fn qemu(b: &Bench, root: &Path, domain: &str) -> Case {
    let mut case = Case::new(
        "browser-qemu",
        "noVNC 1.7 in headless Chromium, a real QEMU whose guest changes the whole screen",
    );
    let (rounds, seconds) = (b.settings.browser_rounds, b.settings.browser_seconds);
    let setup = (|| {
        let console = crate::qemu::console_of(domain, "vnc")?;
        let ws = websocket_port(domain)?;
        let uuid = crate::qemu::domain_uuid(domain)?;
        Ok::<_, String>((console, ws, uuid))
    })();
    let (console, ws_port, uuid) = match setup {
        Ok(s) => s,
        Err(e) => {
            case.errors.push(e);
            return case;
        }
    };
    let port = match free_port() {
        Ok(p) => p,
        Err(e) => {
            case.errors.push(e);
            return case;
        }
    };
    let (proxies, mut targets) = vizor_and_websockify(
        b,
        &mut case,
        &console,
        port,
        Url::Domain(domain.to_owned(), uuid),
    );
    targets.push(Target {
        name: "qemu-ws".into(),
        url: Url::Fixed(format!("ws://127.0.0.1:{ws_port}/")),
        password: Some(console.password.clone()),
        proxy: None,
    });
    let mut page = match Page::start(root, port).await {
        Ok(p) => p,
        Err(e) => {
            case.errors.push(e);
            return case;
        }
    };
    case.notes.push(format!(
        "domain {domain}: VNC port {}, WebSocket port {ws_port}; {rounds} interleaved rounds of \
         {seconds} s per path and condition after 2 s of warm-up; noVNC's default encodings; \
         loaded: one CPU-bound process beside it",
        console.port
    ));
    // QEMU's listen backlog is 1: a pause after each round.
    let sizes = (rounds, seconds);
    let pause = Duration::from_millis(200);
    let results = measure(
        &mut case,
        &mut page,
        &targets,
        &proxies,
        sizes,
        pause,
        Client::NoVnc,
    )
    .await;
    report(
        &mut case,
        &targets,
        &results,
        Input::NextUpdate,
        (">= 0.9x qemu-ws", Goal::RatioToAtLeast("qemu-ws", 0.9)),
        ("<= 1.1x qemu-ws", Goal::RatioToAtMost("qemu-ws", 1.1)),
    );
    case
}

/// spice-html5 against a real QEMU whose guest changes the whole screen, through vizor
/// and websockify (QEMU has no SPICE WebSocket of its own).
pub async fn spice(b: &Bench, root: &Path, domain: &str) -> Case {
    let mut case = Case::new(
        "browser-spice",
        "spice-html5 in headless Chromium, a real QEMU whose guest changes the whole screen",
    );
    let (rounds, seconds) = (b.settings.browser_rounds, b.settings.browser_seconds);
    let setup = (|| {
        let console = crate::qemu::console_of(domain, "spice")?;
        let uuid = crate::qemu::domain_uuid(domain)?;
        let port = free_port()?;
        Ok::<_, String>((console, uuid, port))
    })();
    let (console, uuid, port) = match setup {
        Ok(s) => s,
        Err(e) => {
            case.errors.push(e);
            return case;
        }
    };
    let (proxies, targets) = vizor_and_websockify(
        b,
        &mut case,
        &console,
        port,
        Url::SpiceDomain(domain.to_owned(), uuid),
    );
    let mut page = match Page::start(root, port).await {
        Ok(p) => p,
        Err(e) => {
            case.errors.push(e);
            return case;
        }
    };
    case.notes.push(format!(
        "domain {domain}: SPICE port {}; {rounds} interleaved rounds of {seconds} s per path \
         and condition after 2 s of warm-up; updates: animation frames in which spice-html5 \
         drew; input: a pointer move to the next drawing (the guest draws nothing for it); \
         loaded: one CPU-bound process beside it",
        console.port
    ));
    let sizes = (rounds, seconds);
    let pause = Duration::from_millis(200);
    let results = measure(
        &mut case,
        &mut page,
        &targets,
        &proxies,
        sizes,
        pause,
        Client::SpiceHtml5,
    )
    .await;
    report(
        &mut case,
        &targets,
        &results,
        Input::NextUpdate,
        (">= websockify", Goal::RatioToAtLeast("websockify", 1.0)),
        ("<= 1.1x websockify", Goal::RatioToAtMost("websockify", 1.1)),
    );
    case
}
