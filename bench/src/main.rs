//! vizor-bench: vizor side by side with websockify, websocat and direct TCP (issue 8).
//!
//! One invocation, loopback only, bounded in time: a synthetic RFB server that demands
//! VNC authentication (`upstream`), libvirt's test driver naming it, the proxies as
//! processes (`proxy`), a Rust RFB-over-WebSocket client that parses every update
//! without copying pixels (`client`), the cases of the issue (`cases`, `pool`, `qemu`),
//! and one table printed and written as JSON (`report`, `machine`).
//! `scripts/bench.sh` installs what it needs, builds and runs it.

mod browser;
mod cases;
mod client;
mod machine;
mod participants;
mod pool;
mod proxy;
mod qemu;
mod report;
mod spice;
mod upstream;

use cases::{Bench, Settings};
use clap::Parser;
use proxy::{Programs, Way};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Benchmarks vizor against direct TCP, websockify and websocat on loopback.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// A smoke run of a minute or two: every case, small sizes.
    #[arg(long)]
    quick: bool,
    /// Where to write the results as JSON [default: target/bench/results.json].
    #[arg(long)]
    json: Option<PathBuf>,
    /// Cases to run, comma-separated: bulk, small, setup, idle, many, spice (synthetic
    /// SPICE drawings), browser (noVNC in headless Chromium) (and qemu, participants,
    /// browser-qemu, browser-spice (spice-html5; the domain needs SPICE graphics with a
    /// password), with --qemu).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "bulk,small,setup,idle,many,spice"
    )]
    cases: Vec<String>,
    /// Paths to compare, comma-separated: direct, vizor, websockify, websocat.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,vizor,websockify,websocat"
    )]
    paths: Vec<String>,
    /// Interleaved rounds of bulk, small and setup.
    #[arg(long)]
    rounds: Option<usize>,
    /// Sessions of the many-sessions case (and the largest idle level).
    #[arg(long)]
    sessions: Option<usize>,
    /// Length of the many-sessions case, in seconds.
    #[arg(long)]
    many_seconds: Option<u64>,
    /// Also time the first full frame from the real QEMU of this running libvirt
    /// domain (qemu:///system), direct and through vizor.
    #[arg(long, value_name = "DOMAIN")]
    qemu: Option<String>,
    /// The vizor binary [default: `vizor` beside this program].
    #[arg(long)]
    vizor: Option<PathBuf>,
    /// The websockify program.
    #[arg(long, default_value = "websockify")]
    websockify: PathBuf,
    /// The websocat program [default: websocat on PATH, else ~/.cargo/bin/websocat].
    #[arg(long)]
    websocat: Option<PathBuf>,
    /// Where the proxies' configs and logs go [default: target/bench/run].
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// This repository.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// `name` found on PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn program(p: &Path) -> Option<PathBuf> {
    if p.components().count() > 1 {
        p.is_file().then(|| p.to_path_buf())
    } else {
        on_path(&p.to_string_lossy())
    }
}

/// Open files this process (and the proxies it starts) may hold: 10,000 sessions cost
/// the harness two sockets each (client and synthetic server) and a proxy two more.
const OPEN_FILES: u64 = 262_144;

fn open_files() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| machine::proc_number(&l, "Max open files"))
        .unwrap_or(1024)
}

/// Raises the open files limit with prlimit(1) (the workspace forbids unsafe code, and
/// setrlimit has no safe wrapper in std); returns the soft limit in force.
fn raise_open_files() -> u64 {
    if open_files() < OPEN_FILES {
        let _ = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={OPEN_FILES}:{OPEN_FILES}"))
            .stderr(std::process::Stdio::null())
            .status();
    }
    open_files()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("vizor-bench: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Runs the benchmark; `Ok(false)` when a case failed (a check or a path broke).
async fn run(args: Args) -> Result<bool, String> {
    let began = Instant::now();
    let mut settings = if args.quick {
        Settings::quick()
    } else {
        Settings::full()
    };
    if let Some(r) = args.rounds {
        settings.rounds = r.max(1);
    }
    if let Some(n) = args.sessions {
        settings.many_sessions = n.max(1);
        settings.idle_levels.retain(|&l| l < n);
        settings.idle_levels.push(n.max(1));
    }
    if let Some(s) = args.many_seconds {
        settings.many_seconds = s.max(1);
    }
    let root = repo();
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| root.join("target/bench/run"));
    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| root.join("target/bench/results.json"));
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;

    let files = raise_open_files();
    let largest = settings
        .many_sessions
        .max(settings.idle_levels.iter().copied().max().unwrap_or(0));
    // Each session holds two sockets in this process (client and synthetic server)
    // and two in the proxy, which inherits this limit: what is left after some
    // room for everything else, in hundreds.
    let room = (files.saturating_sub(400) / 2 / 100 * 100) as usize;
    if largest > room {
        let note = format!(
            "sessions capped at {room}, not {largest}: the open files limit is {files} and cannot \
             be raised here (prlimit needs CAP_SYS_RESOURCE for a higher hard limit), and a \
             proxy holds 2 sockets per session"
        );
        eprintln!("vizor-bench: {note}");
        settings.session_cap = Some(note);
        settings.many_sessions = settings.many_sessions.min(room);
        for l in &mut settings.idle_levels {
            *l = (*l).min(room);
        }
        settings.idle_levels.dedup();
    }

    let vizor = args.vizor.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("vizor")))
            .unwrap_or_else(|| root.join("target/release/vizor"))
    });
    let websocat = args
        .websocat
        .clone()
        .and_then(|p| program(&p))
        .or_else(|| on_path("websocat"))
        .or_else(|| {
            let p = PathBuf::from(std::env::var_os("HOME")?).join(".cargo/bin/websocat");
            p.is_file().then_some(p)
        })
        .unwrap_or_else(|| PathBuf::from("websocat"));
    let programs = Programs {
        vizor: vizor.clone(),
        websockify: program(&args.websockify).unwrap_or_else(|| args.websockify.clone()),
        websocat: websocat.clone(),
    };
    let mut ways = Vec::new();
    let mut unavailable = Vec::new();
    for name in &args.paths {
        let Some(way) = Way::parse(name.trim()) else {
            return Err(format!(
                "unknown path {name:?} (direct, vizor, websockify, websocat)"
            ));
        };
        let missing = match way {
            Way::Direct => None,
            Way::Vizor => (!programs.vizor.is_file()).then(|| {
                format!(
                    "{} not found (cargo build --release -p vizor)",
                    programs.vizor.display()
                )
            }),
            Way::Websockify => (!programs.websockify.is_file())
                .then(|| "websockify not found (apt-get install websockify)".to_owned()),
            Way::Websocat => (!programs.websocat.is_file())
                .then(|| "websocat not found (cargo install websocat --locked)".to_owned()),
        };
        match missing {
            Some(why) => {
                eprintln!("vizor-bench: leaving out {}: {why}", way.name());
                unavailable.push((way, why));
            }
            None if !ways.contains(&way) => ways.push(way),
            None => {}
        }
    }
    ways.sort();

    let mut machine = machine::Machine::read(&root, &websocat);
    let upstream = upstream::Upstream::start(8)
        .await
        .map_err(|e| format!("synthetic server: {e}"))?;
    let node_file = work.join("node.xml");
    proxy::write_node_file(&node_file, &upstream.consoles, Default::default())
        .map_err(|e| format!("{}: {e}", node_file.display()))?;
    let sources: Vec<IpAddr> = (0..64u8)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 88, 0, i + 1)))
        .collect();
    let bench = Bench {
        upstream,
        libvirt_uri: format!("test://{}", node_file.display()),
        programs,
        ways: ways.clone(),
        unavailable,
        settings: settings.clone(),
        dir: work.clone(),
        sources,
    };
    eprintln!(
        "vizor-bench: {} run; paths {}; open files {files}; {}",
        if args.quick { "quick" } else { "full" },
        ways.iter().map(|w| w.name()).collect::<Vec<_>>().join(", "),
        machine.loadavg_start
    );

    let mut cases = Vec::new();
    let mut wanted: Vec<String> = args.cases.iter().map(|c| c.trim().to_owned()).collect();
    if args.qemu.is_some() && !wanted.iter().any(|c| c == "qemu" || c == "participants") {
        wanted.push("qemu".into());
    }
    for name in &wanted {
        let started = Instant::now();
        eprintln!(
            "vizor-bench: case {name} ({:.0} s in)",
            began.elapsed().as_secs_f64()
        );
        // Every case bounds its own steps; this only guards against a bug there.
        let bound = Duration::from_secs(40 * 60);
        let case = match name.as_str() {
            "bulk" => tokio::time::timeout(bound, cases::bulk(&bench)).await,
            "small" => tokio::time::timeout(bound, cases::small(&bench)).await,
            "setup" => tokio::time::timeout(bound, cases::setup(&bench)).await,
            "idle" => tokio::time::timeout(bound, cases::idle(&bench)).await,
            "many" => tokio::time::timeout(bound, cases::many(&bench)).await,
            "spice" => tokio::time::timeout(bound, spice::spice(&bench)).await,
            "qemu" => match &args.qemu {
                Some(d) => tokio::time::timeout(bound, qemu::first_frame(&bench, d)).await,
                None => return Err("the qemu case needs --qemu DOMAIN".into()),
            },
            "browser" => tokio::time::timeout(bound, browser::synthetic(&bench, &root)).await,
            "browser-qemu" => match &args.qemu {
                Some(d) => tokio::time::timeout(bound, browser::qemu(&bench, &root, d)).await,
                None => return Err("the browser-qemu case needs --qemu DOMAIN".into()),
            },
            "browser-spice" => match &args.qemu {
                Some(d) => tokio::time::timeout(bound, browser::spice(&bench, &root, d)).await,
                None => return Err("the browser-spice case needs --qemu DOMAIN".into()),
            },
            "participants" => match &args.qemu {
                Some(d) => tokio::time::timeout(bound, participants::participants(&bench, d)).await,
                None => return Err("the participants case needs --qemu DOMAIN".into()),
            },
            other => return Err(format!("unknown case {other:?}")),
        };
        let mut case = case.unwrap_or_else(|_| {
            let mut c = report::Case::new(name, "did not finish");
            c.errors
                .push(format!("the case took longer than {bound:?}"));
            c
        });
        case.seconds = started.elapsed().as_secs_f64();
        for e in &case.errors {
            eprintln!("vizor-bench: {name}: ERROR {e}");
        }
        println!("{}", report::table(std::slice::from_ref(&case), &ways));
        cases.push(case);
    }
    machine.loadavg_end = machine::loadavg();

    let table = report::table(&cases, &ways);
    println!("\n## vizor-bench results\n");
    println!("{table}");
    for c in &cases {
        for n in c.notes.iter().filter(|n| !n.starts_with("readings:")) {
            println!("- {}: {n}", c.name);
        }
        for e in &c.errors {
            println!("- {}: ERROR {e}", c.name);
        }
    }
    println!(
        "\nmachine: {} x {}, Linux {}, {} MiB; load {} -> {}; vizor {}, websockify {}, {}; {:.0} s",
        machine.nproc,
        machine.cpu_model,
        machine.kernel,
        machine.memory_mib,
        machine.loadavg_start,
        machine.loadavg_end,
        machine.versions.vizor_git_rev,
        machine.versions.websockify,
        machine.versions.websocat,
        began.elapsed().as_secs_f64()
    );
    let ok = cases.iter().all(|c| c.errors.is_empty());
    let json = serde_json::json!({
        "harness": format!("vizor-bench {}", env!("CARGO_PKG_VERSION")),
        "command": std::env::args().collect::<Vec<_>>(),
        "quick": args.quick,
        "seconds": began.elapsed().as_secs_f64(),
        "ok": ok,
        "machine": machine,
        "settings": settings,
        "paths": ways.iter().map(|w| w.name()).collect::<Vec<_>>(),
        "unavailable": bench.unavailable.iter().map(|(w, why)| (w.name(), why.clone())).collect::<std::collections::BTreeMap<_, _>>(),
        "cases": cases,
        "table_markdown": table,
    });
    if let Some(dir) = json_path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
    std::fs::write(&json_path, text).map_err(|e| format!("{}: {e}", json_path.display()))?;
    println!("results: {}", json_path.display());
    Ok(ok)
}
