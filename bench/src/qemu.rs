//! Time to the first full frame from a real QEMU (a running libvirt domain on
//! qemu:///system): connect, handshake, ask for the whole screen in Raw, and wait for
//! the complete update, directly (the client authenticates with the password libvirt
//! stores) and through vizor (which looks the domain up and authenticates itself).

use crate::cases::Bench;
use crate::client::Session;
use crate::proxy::{Proxy, Way};
use crate::report::{Case, Cell, Row};
use crate::upstream::Console;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

const URI: &str = "qemu:///system";

/// The value of attribute `name` in an XML start tag.
pub(crate) fn attribute(tag: &str, name: &str) -> Option<String> {
    let at = tag.find(&format!(" {name}="))? + name.len() + 2;
    let quote = tag[at..].chars().next()?;
    let rest = &tag[at + 1..];
    let end = rest.find(quote)?;
    Some(
        rest[..end]
            .replace("&apos;", "'")
            .replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

/// The domain's live port and password of its `kind` graphics ("vnc", "spice"), from
/// `virsh dumpxml --security-info`.
pub(crate) fn console_of(domain: &str, kind: &str) -> Result<Console, String> {
    let out = std::process::Command::new("virsh")
        .args(["-c", URI, "dumpxml", "--security-info", domain])
        .output()
        .map_err(|e| format!("virsh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "virsh dumpxml {domain}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let xml = String::from_utf8_lossy(&out.stdout);
    let tag = xml
        .split("<graphics")
        .skip(1)
        .map(|t| t.split('>').next().unwrap_or(""))
        .find(|t| attribute(t, "type").as_deref() == Some(kind))
        .ok_or_else(|| format!("{domain} has no {kind} graphics"))?;
    let port = attribute(tag, "port")
        .and_then(|p| p.parse::<i32>().ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{domain}'s {kind} has no live TCP port (is it running?)"))?;
    let password = attribute(tag, "passwd").ok_or_else(|| {
        format!("{domain}'s {kind} has no password (the benchmark's clients all authenticate)")
    })?;
    Ok(Console {
        domain: domain.to_owned(),
        port: port as u16,
        password,
    })
}

/// The domain's UUID, which a token names (vizor checks it against libvirt's).
pub(crate) fn domain_uuid(domain: &str) -> Result<[u8; 16], String> {
    let out = std::process::Command::new("virsh")
        .args(["-c", URI, "domuuid", domain])
        .output()
        .map_err(|e| format!("virsh: {e}"))?;
    vizor::token::parse_uuid(String::from_utf8_lossy(&out.stdout).trim())
        .ok_or_else(|| format!("virsh domuuid {domain}: no UUID"))
}

/// Time to the first full frame, direct and through vizor.
pub async fn first_frame(b: &Bench, domain: &str) -> Case {
    let mut case = Case::new(
        "qemu",
        "time to first full frame from a real QEMU, connect to complete Raw update",
    );
    let samples = b.settings.qemu_samples;
    let console = match console_of(domain, "vnc") {
        Ok(c) => c,
        Err(e) => {
            case.errors.push(e);
            return case;
        }
    };
    case.notes.push(format!(
        "domain {domain} (VNC port {}), {samples} sessions per path, interleaved, one at a time \
         (QEMU listens with a backlog of 1); Raw only, whole screen, non-incremental",
        console.port
    ));
    let uuid = match domain_uuid(domain) {
        Ok(u) => u,
        Err(e) => {
            case.errors.push(e);
            return case;
        }
    };
    let consoles = vec![console];
    let mut proxies = Vec::new();
    for way in [Way::Direct, Way::Vizor] {
        match Proxy::start(
            way,
            &b.programs,
            &consoles,
            0,
            URI,
            &b.dir.join("qemu").join(way.name()),
        ) {
            Ok(p) => proxies.push(p),
            Err(e) => case.errors.push(format!("{}: {e}", way.name())),
        }
    }
    let mut ms: BTreeMap<Way, Vec<f64>> = BTreeMap::new();
    let mut frames: BTreeMap<Way, Vec<String>> = BTreeMap::new();
    let src = IpAddr::V4(Ipv4Addr::LOCALHOST);
    for i in 0..samples {
        for p in &proxies {
            // A token names the domain by its real UUID.
            let route = match p.way {
                Way::Vizor => crate::client::Route::Ws {
                    addr: p.addr,
                    path: format!(
                        "/websockify?token={}",
                        p.token(domain, uuid).unwrap_or_default()
                    ),
                    password: None,
                },
                _ => p.route(i),
            };
            let r = tokio::time::timeout(Duration::from_secs(30), async {
                let t = Instant::now();
                let mut s = Session::open(&route, src).await?;
                s.set_encodings_raw().await?;
                let (w, h) = (s.server_init.width, s.server_init.height);
                s.request(false, 0, 0, w, h).await?;
                s.wait_updates(1).await?;
                Ok::<_, String>((
                    t.elapsed(),
                    format!("{w}x{h}, {} bytes", s.stream.received.bytes),
                ))
            })
            .await
            .unwrap_or_else(|_| Err("no full frame within 30 s".into()));
            match r {
                Ok((d, frame)) => {
                    ms.entry(p.way).or_default().push(d.as_secs_f64() * 1e3);
                    frames.entry(p.way).or_default().push(frame);
                }
                Err(e) => case
                    .errors
                    .push(format!("{} sample {i}: {e}", p.way.name())),
            }
            // QEMU's listen backlog is 1: let the last connection go first.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for (w, f) in &frames {
        let mut distinct = f.clone();
        distinct.sort();
        distinct.dedup();
        case.checks.push(format!(
            "{}: first frames {}",
            w.name(),
            distinct.join("; ")
        ));
    }
    let mut row = Row::new("first full frame", "ms", false);
    for way in [Way::Direct, Way::Vizor] {
        match ms.get(&way) {
            Some(v) => row.set(way, Cell::of(v.clone())),
            None => row.without(way, "failed"),
        }
    }
    for way in [Way::Websockify, Way::Websocat] {
        row.without(way, "not run");
    }
    let row = row.finish();
    if let (Some(v), Some(d)) = (row.cells.get("vizor"), row.cells.get("direct")) {
        case.notes.push(format!(
            "vizor adds {:.2} ms to the median",
            v.median - d.median
        ));
    }
    case.rows.push(row);
    case
}
