//! The SPICE case: full-screen drawings from a synthetic SPICE server
//! (`vizor_testkit::spice`, a test double for load generation: spice-server draws only
//! what a guest draws) through each path to a client that frames and checks every
//! drawing, acknowledging as spice-html5 does. vizor runs twice: as configured by
//! default (a drawing's pixels spliced from socket to socket), and with `[server]
//! splice = false` (every byte read through vizor), to show what splicing is worth.

use crate::cases::Bench;
use crate::client::{Link, Route};
use crate::proxy::{write_node_file, Proxy, Way};
use crate::report::{Case, Cell, Row};
use crate::upstream::Console;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vizor::token::ConsoleKind;
use vizor_spice::link::{channel_type, link_error, LinkReply};
use vizor_testkit::spice::{self as double, DisplayStream, Drawn, Screen, Spice};

/// The synthetic screen, as the VNC cases' (1920x1080, 32 bits).
const WIDTH: u32 = 1920;
/// The synthetic screen.
const HEIGHT: u32 = 1080;

/// A linked channel: its transport and the bytes that came after the link result.
struct Channel {
    link: Link,
    early: Vec<u8>,
}

/// Links a channel of `channel` in session `session` along `route`, giving `password`
/// when the path wants the client's own ticket (vizor ignores the browser's).
async fn link(
    route: &Route,
    src: IpAddr,
    session: u32,
    channel: u8,
    password: &str,
) -> Result<Channel, String> {
    let (mut link, _) = Link::open(route, src).await?;
    link.send(&double::link_mess(session, channel)).await?;
    let mut buf = Vec::new();
    let reply = loop {
        if let Some((r, n)) = LinkReply::parse(&buf, &vizor_spice::Limits::default())
            .map_err(|e| format!("SPICE link reply: {e}"))?
        {
            buf.drain(..n);
            break r;
        }
        link.recv_into(&mut buf).await?;
    };
    if reply.error != link_error::OK {
        return Err(format!(
            "SPICE link refused: {}",
            link_error::describe(reply.error)
        ));
    }
    link.send(&double::ticket(&reply, password)?).await?;
    while buf.len() < 4 {
        link.recv_into(&mut buf).await?;
    }
    let result = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if result != link_error::OK {
        return Err(format!(
            "SPICE link result: {}",
            link_error::describe(result)
        ));
    }
    buf.drain(..4);
    Ok(Channel { link, early: buf })
}

/// A SPICE session's main and display channels, the display initialised.
struct Session {
    /// Held open: the display channel lives as long as its main channel.
    _main: Link,
    display: Link,
    stream: DisplayStream,
    answer: Vec<u8>,
}

impl Session {
    async fn open(
        route: &Route,
        src: IpAddr,
        password: &str,
        draw_len: u64,
    ) -> Result<Session, String> {
        let mut main = link(route, src, 0, channel_type::MAIN, password).await?;
        let mut buf = main.early;
        let session = loop {
            if buf.len() >= 10 {
                break double::main_init_session(&buf)
                    .ok_or("the main channel's first message is no MAIN_INIT")?;
            }
            main.link.recv_into(&mut buf).await?;
        };
        let mut display = link(route, src, session, channel_type::DISPLAY, password).await?;
        display.link.send(&double::display_init()).await?;
        let mut stream = DisplayStream::new(draw_len);
        let mut answer = Vec::new();
        stream.feed(&display.early, &mut answer)?;
        Ok(Session {
            _main: main.link,
            display: display.link,
            stream,
            answer,
        })
    }

    /// Reads until `draws` drawings in all came whole and checked.
    async fn until(&mut self, draws: u64) -> Result<(), String> {
        while self.stream.drawn.draws < draws {
            if !self.answer.is_empty() {
                let answer = std::mem::take(&mut self.answer);
                self.display.send(&answer).await?;
            }
            let (stream, answer) = (&mut self.stream, &mut self.answer);
            self.display.recv(|b| stream.feed(b, answer)).await??;
        }
        Ok(())
    }
}

/// Full-screen drawings, VM to browser.
pub async fn spice(b: &Bench) -> Case {
    let mut case = Case::new(
        "spice",
        "full-screen SPICE drawings 1920x1080x32 (DRAW_COPY, uncompressed), VM to browser",
    );
    let n = b.settings.bulk_updates;
    let screen = Arc::new(Screen::new(WIDTH, HEIGHT));
    let draw_len = screen.draw_len();
    case.notes.push(format!(
        "{n} drawings of {draw_len} bytes ({:.2} GiB) per measurement, {} interleaved rounds; \
         the client acknowledges every {} messages and the server keeps two windows ahead, \
         as spice-server does",
        (n * draw_len) as f64 / f64::from(1u32 << 30),
        b.settings.rounds,
        double::WINDOW
    ));
    let password = "spice-bench";
    let served = match Spice::new(password, screen.clone()) {
        Ok(s) => s.listen().await,
        Err(e) => Err(e),
    };
    let served = match served {
        Ok(s) => s,
        Err(e) => {
            case.errors.push(format!("synthetic SPICE server: {e}"));
            return case;
        }
    };
    let consoles = [Console {
        domain: "bench-spice".into(),
        port: served.port(),
        password: password.into(),
    }];
    let dir = b.dir.join("spice");
    let node = dir.join("node.xml");
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| write_node_file(&node, &consoles, vizor_testkit::libvirt::Graphics::Spice));
    if let Err(e) = written {
        case.errors.push(format!("{}: {e}", node.display()));
        return case;
    }
    let uri = format!("test://{}", node.display());
    // Each path, and vizor a second time reading every byte.
    let mut proxies: Vec<(&'static str, Proxy)> = Vec::new();
    for &way in &b.ways {
        let p = Proxy::start(way, &b.programs, &consoles, 0, &uri, &dir.join(way.name()));
        match p {
            Ok(p) => proxies.push((way.name(), p)),
            Err(e) => case.errors.push(format!("{}: {e}", way.name())),
        }
        if way == Way::Vizor {
            match Proxy::start_with(
                way,
                &b.programs,
                &consoles,
                0,
                &uri,
                &dir.join("vizor-read"),
                "splice = false",
            ) {
                Ok(p) => proxies.push((READ, p)),
                Err(e) => case.errors.push(format!("vizor, splice = false: {e}")),
            }
        }
    }
    let mut gibs: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut cpu: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut failed: BTreeMap<&str, String> = BTreeMap::new();
    for round in 0..b.settings.rounds {
        for (name, p) in &proxies {
            if failed.contains_key(name) {
                continue;
            }
            let route = p.route_to(round, ConsoleKind::Spice);
            let r = tokio::time::timeout(Duration::from_secs(180), async {
                let mut s = Session::open(&route, b.sources[0], password, draw_len).await?;
                // One drawing first: every buffer on the way grown to size.
                s.until(1).await?;
                let (start, cpu0) = (s.stream.drawn, p.cpu_seconds());
                let t0 = Instant::now();
                s.until(start.draws + n).await?;
                let secs = t0.elapsed().as_secs_f64();
                let cpu = p.cpu_seconds() - cpu0;
                let got = Drawn {
                    draws: s.stream.drawn.draws - start.draws,
                    bytes: s.stream.drawn.bytes - start.bytes,
                };
                Ok::<_, String>((secs, cpu, got))
            })
            .await
            .unwrap_or_else(|_| Err("no result within 180 s".into()));
            match r {
                Ok((secs, cpu_s, got)) if got.bytes == n * draw_len => {
                    let gib = got.bytes as f64 / f64::from(1u32 << 30);
                    gibs.entry(name).or_default().push(gib / secs);
                    cpu.entry(name).or_default().push(cpu_s / gib);
                }
                Ok((_, _, got)) => {
                    case.errors.push(format!(
                        "{name} round {round}: {} drawings, {} bytes, {} expected",
                        got.draws,
                        got.bytes,
                        n * draw_len
                    ));
                    failed.insert(name, "check failed".into());
                }
                Err(e) => {
                    case.errors.push(format!("{name} round {round}: {e}"));
                    failed.insert(name, "failed".into());
                }
            }
        }
    }
    for (name, _) in &proxies {
        if !failed.contains_key(name) && gibs.contains_key(name) {
            case.checks.push(format!(
                "{name}: every round {n} drawings whole, in order, of {draw_len} bytes"
            ));
        }
    }
    case.rows.push(row(
        "throughput",
        "GiB/s",
        true,
        &gibs,
        "vizor",
        &b.ways,
        &failed,
    ));
    case.rows.push(row(
        "throughput, vizor with splice = false",
        "GiB/s",
        true,
        &gibs,
        READ,
        &b.ways,
        &failed,
    ));
    case.rows.push(row(
        "proxy CPU per GiB",
        "s",
        false,
        &cpu,
        "vizor",
        &b.ways,
        &failed,
    ));
    case.rows.push(row(
        "proxy CPU per GiB, vizor with splice = false",
        "s",
        false,
        &cpu,
        READ,
        &b.ways,
        &failed,
    ));
    drop(served);
    for (_, mut p) in proxies {
        p.stop();
    }
    case
}

/// vizor with `[server] splice = false`.
const READ: &str = "vizor-read";

/// One measure across the paths, vizor's column from the run named `vizor`.
fn row(
    measure: &str,
    unit: &str,
    higher_is_better: bool,
    values: &BTreeMap<&str, Vec<f64>>,
    vizor: &str,
    ways: &[Way],
    failed: &BTreeMap<&str, String>,
) -> Row {
    let mut row = Row::new(measure, unit, higher_is_better);
    for &w in ways {
        let name = if w == Way::Vizor { vizor } else { w.name() };
        match (values.get(name), failed.get(name)) {
            (_, Some(why)) => row.without(w, why.clone()),
            (Some(v), None) => row.set(w, Cell::of(v.clone())),
            (None, None) => row.without(w, "n/a"),
        }
    }
    row.finish()
}
