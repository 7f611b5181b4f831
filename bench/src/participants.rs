//! What each participant of a console costs QEMU (issue 19): N VNC clients of one real
//! QEMU, as vizor connects a session's owner and each participant, each asking for the
//! whole screen again as soon as it has it, so every frame is a full encode (the screen
//! changing as fast as QEMU sends it: the worst case). With noVNC's preferred
//! encoding (Tight, zlib-compressed per client) and with Raw (copying only). QEMU's CPU
//! and memory come from `/proc` while they run. Direct to QEMU: what vizor adds per
//! participant is one more session's relay, which the other cases measure.

use crate::cases::Bench;
use crate::client::{Route, Session};
use crate::proxy::Way;
use crate::report::{Case, Cell, Row};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use vizor_rfb::Encoding;

/// Participants counts measured (the first is the owner alone).
const COUNTS: [usize; 4] = [1, 2, 4, 8];

/// How long each count is measured, after a second of warm-up.
const WINDOW: Duration = Duration::from_secs(5);

/// QEMU's CPU time so far, in seconds, and its resident memory in MiB.
fn qemu_usage(pid: u32) -> Result<(f64, f64), String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    // Fields after the command (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after state.
    // USER_HZ: 100 on Linux.
    let hz = 100.0;
    let cpu = (ticks(11) + ticks(12)) / hz;
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    Ok((cpu, rss_kib / 1024.0))
}

/// One count of clients with one encoding list: QEMU's cores, frames per second per
/// client, QEMU's RSS.
async fn measure(
    route: &Route,
    pid: u32,
    clients: usize,
    encodings: &'static [Encoding],
) -> Result<(f64, f64, f64), String> {
    let src = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut sessions = Vec::new();
    for _ in 0..clients {
        let s = tokio::time::timeout(Duration::from_secs(10), Session::open(route, src))
            .await
            .map_err(|_| "no ServerInit within 10 s".to_owned())?
            .map_err(|e| e.to_string())?;
        sessions.push(s);
        // QEMU listens with a backlog of 1: joiners come one at a time.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let warm = Instant::now() + Duration::from_secs(1);
    let end = warm + WINDOW;
    let mut tasks = Vec::new();
    for mut s in sessions {
        tasks.push(tokio::spawn(async move {
            let before = s.full_frames(encodings, warm).await?;
            let total = s.full_frames(encodings, end).await?;
            Ok::<_, crate::client::ClientError>((before, total))
        }));
    }
    tokio::time::sleep_until(warm.into()).await;
    let (cpu0, _) = qemu_usage(pid)?;
    tokio::time::sleep_until(end.into()).await;
    let (cpu1, rss) = qemu_usage(pid)?;
    let mut frames = 0u64;
    for t in tasks {
        let (_, during) = t
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        frames += during;
    }
    let secs = WINDOW.as_secs_f64();
    Ok((
        (cpu1 - cpu0) / secs,
        frames as f64 / secs / clients as f64,
        rss,
    ))
}

/// The case.
pub async fn participants(_bench: &Bench, domain: &str) -> Case {
    let mut case = Case::new(
        "participants",
        "what each participant costs QEMU: N clients of one console, each re-asking for the whole screen",
    );
    let console = match crate::qemu::console_of(domain, "vnc") {
        Ok(c) => c,
        Err(e) => {
            case.errors.push(e);
            return case;
        }
    };
    let pid = match std::fs::read_to_string(format!("/run/libvirt/qemu/{domain}.pid"))
        .map_err(|e| e.to_string())
        .and_then(|p| p.trim().parse::<u32>().map_err(|e| e.to_string()))
    {
        Ok(p) => p,
        Err(e) => {
            case.errors.push(format!("QEMU's pid for {domain}: {e}"));
            return case;
        }
    };
    let route = Route::Tcp {
        addr: SocketAddr::from(([127, 0, 0, 1], console.port)),
        password: console.password.clone(),
    };
    case.notes.push(format!(
        "domain {domain} (QEMU pid {pid}); {} s per count after 1 s of warm-up; every client asks for the whole screen (non-incremental) again as soon as the last answer is whole",
        WINDOW.as_secs()
    ));
    for (name, encodings) in [
        ("tight", &[Encoding::TIGHT, Encoding::RAW][..]),
        ("raw", &[Encoding::RAW][..]),
    ] {
        let mut cores = Vec::new();
        for n in COUNTS {
            match measure(&route, pid, n, encodings).await {
                Ok((c, fps, rss)) => {
                    case.notes.push(format!(
                        "{name}, {n} client(s): QEMU {c:.3} cores, {fps:.1} full frames/s per client, RSS {rss:.1} MiB"
                    ));
                    let mut row =
                        Row::new(&format!("QEMU CPU, {n} client(s), {name}"), "cores", false);
                    row.set(Way::Direct, Cell::of(vec![c]));
                    for way in [Way::Vizor, Way::Websockify, Way::Websocat] {
                        row.without(way, "QEMU's side only");
                    }
                    case.rows.push(row.finish());
                    cores.push((n, c, fps));
                }
                Err(e) => case.errors.push(format!("{name}, {n} client(s): {e}")),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if let (Some(first), Some(last)) = (cores.first(), cores.last()) {
            if last.0 > first.0 {
                case.notes.push(format!(
                    "{name}: each client beyond the first adds {:.3} cores of QEMU at full-frame rate ({:.1} frames/s per client with {} clients against {:.1} alone)",
                    (last.1 - first.1) / (last.0 - first.0) as f64,
                    last.2,
                    last.0,
                    first.2
                ));
            }
        }
    }
    case
}
