//! The cases of issue 8. Each runs its paths in interleaved rounds (direct, vizor,
//! websockify, websocat, then again), so that the machine's drift (it is shared)
//! falls on every path alike, and checks the client's account of every measurement
//! against what the synthetic server sent.

use crate::client::{Received, Session};
use crate::machine::proc_number;
use crate::pool::{Growth, Pool};
use crate::proxy::{Programs, Proxy, Way};
use crate::report::{quantile, Case, Cell, Goal, Row};
use crate::upstream::{update_len, Sent, Upstream, DESKTOP, HEIGHT, TILE, WIDTH};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How much each case does.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Settings {
    /// Interleaved rounds of the bulk, small and setup cases.
    pub rounds: usize,
    /// Full-screen updates per bulk measurement.
    pub bulk_updates: u64,
    /// Round trips per small-update measurement (one round of one path).
    pub small_round_trips: usize,
    /// Sequential sessions per setup measurement.
    pub setup_sessions: usize,
    /// Session counts at which idle memory is read.
    pub idle_levels: Vec<usize>,
    /// Sessions of the many-sessions case.
    pub many_sessions: usize,
    /// Length of each of its runs.
    pub many_seconds: u64,
    /// Updates per second each of its sessions asks for: the rate first, then
    /// lower ones this machine can carry (the same sessions run once per rate).
    pub many_rates: Vec<u32>,
    /// Sessions opened at once when growing a pool.
    pub concurrency: usize,
    /// How long growing a pool of the largest size may take.
    pub grow_seconds: u64,
    /// Time-to-first-frame samples per path against QEMU.
    pub qemu_samples: usize,
    /// Why the session counts are lower than the issue's, when they are.
    pub session_cap: Option<String>,
    /// Interleaved rounds of the browser cases.
    pub browser_rounds: usize,
    /// Seconds each browser measurement lasts (after 2 s of warm-up).
    pub browser_seconds: u64,
}

impl Settings {
    /// The full run: the sizes.
    pub fn full() -> Settings {
        Settings {
            rounds: 5,
            // 260 x 8,294,416 bytes: 2.0 GiB per measurement.
            bulk_updates: 260,
            small_round_trips: 20_000,
            setup_sessions: 200,
            idle_levels: vec![1, 1_000, 10_000],
            many_sessions: 10_000,
            many_seconds: 60,
            many_rates: vec![10, 1],
            concurrency: 64,
            grow_seconds: 240,
            qemu_samples: 10,
            session_cap: None,
            browser_rounds: 3,
            browser_seconds: 8,
        }
    }

    /// A smoke run of a minute or two.
    pub fn quick() -> Settings {
        Settings {
            rounds: 2,
            bulk_updates: 24,
            small_round_trips: 3_000,
            setup_sessions: 100,
            idle_levels: vec![1, 100, 1_000],
            many_sessions: 500,
            many_seconds: 5,
            many_rates: vec![10, 1],
            concurrency: 32,
            grow_seconds: 60,
            qemu_samples: 3,
            session_cap: None,
            browser_rounds: 1,
            browser_seconds: 3,
        }
    }
}

/// What every case shares.
pub struct Bench {
    /// The synthetic VMs.
    pub upstream: Upstream,
    /// The libvirt test driver's URI for the node file naming them.
    pub libvirt_uri: String,
    /// Where the proxies are.
    pub programs: Programs,
    /// The paths measured.
    pub ways: Vec<Way>,
    /// Paths left out, and why.
    pub unavailable: Vec<(Way, String)>,
    /// Sizes.
    pub settings: Settings,
    /// Where proxies keep their files.
    pub dir: PathBuf,
    /// Loopback addresses the client connects from.
    pub sources: Vec<IpAddr>,
}

/// The splicers forward to this console; vizor spreads sessions over all of them.
const SPLICER_TARGET: usize = 0;

impl Bench {
    fn start(&self, way: Way, case: &str) -> Result<Proxy, String> {
        Proxy::start(
            way,
            &self.programs,
            &self.upstream.consoles,
            SPLICER_TARGET,
            &self.libvirt_uri,
            &self.dir.join(case).join(way.name()),
        )
    }

    /// Starts every path's proxy; a path whose proxy does not start is reported.
    fn start_all(&self, case: &mut Case) -> Vec<Proxy> {
        let mut proxies = Vec::new();
        for &way in &self.ways {
            match self.start(way, &case.name) {
                Ok(p) => proxies.push(p),
                Err(e) => case.errors.push(format!("{}: {e}", way.name())),
            }
        }
        proxies
    }

    fn src(&self, i: usize) -> IpAddr {
        self.sources[i % self.sources.len()]
    }

    /// Waits (up to 2 s: the server counts a write after the client may have read
    /// it) until the server's counters have moved by `want` since `before`.
    async fn sent_since(&self, before: Sent, want: Received) -> Sent {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let now = self.upstream.screen.sent();
            let d = Sent {
                updates: now.updates - before.updates,
                bytes: now.bytes - before.bytes,
            };
            if (d.updates, d.bytes) == (want.updates, want.bytes) || Instant::now() > deadline {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn minus(a: Received, b: Received) -> Received {
    Received {
        updates: a.updates - b.updates,
        bytes: a.bytes - b.bytes,
    }
}

/// Per path: one value per round, or why there is none.
#[derive(Default)]
struct Series(BTreeMap<Way, Vec<f64>>);

impl Series {
    fn push(&mut self, way: Way, v: f64) {
        self.0.entry(way).or_default().push(v);
    }

    fn row(&self, mut row: Row, ways: &[Way], failed: &BTreeMap<Way, String>) -> Row {
        for &w in ways {
            match (self.0.get(&w), failed.get(&w)) {
                (_, Some(why)) => row.without(w, why.clone()),
                (Some(v), None) => row.set(w, Cell::of(v.clone())),
                (None, None) => row.without(w, "n/a"),
            }
        }
        row.finish()
    }

    /// Each path's values less direct's, paired by round (the rounds ran side by side).
    fn minus_direct(&self) -> Series {
        let mut out = Series::default();
        if let Some(direct) = self.0.get(&Way::Direct) {
            for (&w, v) in &self.0 {
                for (x, d) in v.iter().zip(direct) {
                    out.push(w, x - d);
                }
            }
        }
        out
    }
}

/// Records the check of one measurement: what the client counted against what it
/// expected and what the server sent.
fn check(
    case: &mut Case,
    failed: &mut BTreeMap<Way, String>,
    way: Way,
    round: usize,
    got: Received,
    want: Received,
    sent: Sent,
) -> bool {
    if got == want && (sent.updates, sent.bytes) == (want.updates, want.bytes) {
        return true;
    }
    let e = format!(
        "{} round {round}: client counted {} updates / {} bytes, expected {} / {}, server sent {} / {}",
        way.name(),
        got.updates,
        got.bytes,
        want.updates,
        want.bytes,
        sent.updates,
        sent.bytes
    );
    case.errors.push(e.clone());
    failed.insert(way, "check failed".into());
    false
}

fn fail(case: &mut Case, failed: &mut BTreeMap<Way, String>, way: Way, round: usize, e: String) {
    case.errors
        .push(format!("{} round {round}: {e}", way.name()));
    failed.entry(way).or_insert_with(|| "failed".into());
}

/// Bulk VM-to-browser: full-screen Raw updates, two requests kept outstanding.
pub async fn bulk(b: &Bench) -> Case {
    let mut case = Case::new(
        "bulk",
        "full-screen Raw updates 1920x1080x32, VM to browser",
    );
    let n = b.settings.bulk_updates;
    let full = update_len(WIDTH, HEIGHT);
    case.notes.push(format!(
        "{n} updates of {full} bytes ({:.2} GiB) per measurement, {} interleaved rounds, 2 requests outstanding",
        (n * full) as f64 / f64::from(1u32 << 30),
        b.settings.rounds
    ));
    let proxies = b.start_all(&mut case);
    let mut series = Series::default();
    let mut failed = BTreeMap::new();
    for round in 0..b.settings.rounds {
        for p in &proxies {
            if failed.contains_key(&p.way) {
                continue;
            }
            let r = tokio::time::timeout(Duration::from_secs(180), async {
                let mut s = Session::open(&p.route(round), b.src(round)).await?;
                s.set_encodings_raw().await?;
                // One update first: every buffer on the way grown to size.
                s.request(false, 0, 0, WIDTH, HEIGHT).await?;
                s.wait_updates(1).await?;
                let (start, before) = (s.stream.received, b.upstream.screen.sent());
                let t0 = Instant::now();
                let mut asked = 0;
                while asked < n.min(2) {
                    s.request(true, 0, 0, WIDTH, HEIGHT).await?;
                    asked += 1;
                }
                for done in 1..=n {
                    s.wait_updates(start.updates + done).await?;
                    if asked < n {
                        s.request(true, 0, 0, WIDTH, HEIGHT).await?;
                        asked += 1;
                    }
                }
                let secs = t0.elapsed().as_secs_f64();
                let got = minus(s.stream.received, start);
                let sent = b.sent_since(before, got).await;
                Ok::<_, String>((secs, got, sent))
            })
            .await
            .unwrap_or_else(|_| Err("no result within 180 s".into()));
            match r {
                Ok((secs, got, sent)) => {
                    let want = Received {
                        updates: n,
                        bytes: n * full,
                    };
                    if check(&mut case, &mut failed, p.way, round, got, want, sent) {
                        series.push(p.way, got.bytes as f64 / secs / f64::from(1u32 << 30));
                    }
                }
                Err(e) => fail(&mut case, &mut failed, p.way, round, e),
            }
        }
    }
    for &w in &b.ways {
        if !failed.contains_key(&w) && series.0.contains_key(&w) {
            case.checks.push(format!(
                "{}: every round {n} updates, {} bytes, as sent",
                w.name(),
                n * full
            ));
        }
    }
    case.rows.push(
        series.row(
            Row::new("throughput", "GiB/s", true)
                .target(">= 0.75x direct", Goal::RatioToDirectAtLeast(0.75)),
            &b.ways,
            &failed,
        ),
    );
    case
}

/// Small updates: one 16x16 update per request, timed request to update.
pub async fn small(b: &Bench) -> Case {
    let mut case = Case::new("small", "16x16 update per request, round trip");
    let k = b.settings.small_round_trips;
    case.notes.push(format!(
        "{k} round trips per measurement ({} per path in all), {} interleaved rounds, after 500 unmeasured",
        k * b.settings.rounds,
        b.settings.rounds
    ));
    let proxies = b.start_all(&mut case);
    let (mut p50, mut p99) = (Series::default(), Series::default());
    let mut failed = BTreeMap::new();
    for round in 0..b.settings.rounds {
        for p in &proxies {
            if failed.contains_key(&p.way) {
                continue;
            }
            let r = tokio::time::timeout(Duration::from_secs(300), async {
                let mut s = Session::open(&p.route(round), b.src(round)).await?;
                s.set_encodings_raw().await?;
                let mut n = 0;
                for _ in 0..500 {
                    s.request(true, 0, 0, TILE, TILE).await?;
                    n += 1;
                    s.wait_updates(n).await?;
                }
                let (start, before) = (s.stream.received, b.upstream.screen.sent());
                let mut us = Vec::with_capacity(k);
                for _ in 0..k {
                    let t = Instant::now();
                    s.request(true, 0, 0, TILE, TILE).await?;
                    n += 1;
                    s.wait_updates(n).await?;
                    us.push(t.elapsed().as_secs_f64() * 1e6);
                }
                let got = minus(s.stream.received, start);
                let sent = b.sent_since(before, got).await;
                Ok::<_, String>((us, got, sent))
            })
            .await
            .unwrap_or_else(|_| Err("no result within 300 s".into()));
            match r {
                Ok((mut us, got, sent)) => {
                    let want = Received {
                        updates: k as u64,
                        bytes: k as u64 * update_len(TILE, TILE),
                    };
                    if check(&mut case, &mut failed, p.way, round, got, want, sent) {
                        us.sort_by(f64::total_cmp);
                        p50.push(p.way, quantile(&us, 0.5));
                        p99.push(p.way, quantile(&us, 0.99));
                    }
                }
                Err(e) => fail(&mut case, &mut failed, p.way, round, e),
            }
        }
    }
    for &w in &b.ways {
        if !failed.contains_key(&w) && p50.0.contains_key(&w) {
            case.checks.push(format!(
                "{}: every round {k} updates of {} bytes, as sent",
                w.name(),
                update_len(TILE, TILE)
            ));
        }
    }
    case.rows
        .push(p50.row(Row::new("round trip p50", "us", false), &b.ways, &failed));
    case.rows
        .push(p99.row(Row::new("round trip p99", "us", false), &b.ways, &failed));
    case.rows.push(p50.minus_direct().row(
        Row::new("added p50 vs direct", "us", false).target("<= 10 us", Goal::AtMost(10.0)),
        &b.ways,
        &failed,
    ));
    case.rows.push(p99.minus_direct().row(
        Row::new("added p99 vs direct", "us", false).target("<= 50 us", Goal::AtMost(50.0)),
        &b.ways,
        &failed,
    ));
    case
}

/// Session setup: connect (and WebSocket open) to ServerInit, sequentially.
pub async fn setup(b: &Bench) -> Case {
    let mut case = Case::new("setup", "session setup, connect to ServerInit, sequential");
    let m = b.settings.setup_sessions;
    case.notes.push(format!(
        "{m} sequential sessions per measurement ({} per path in all), {} interleaved rounds; \
         vizor's time includes its libvirt lookup (test driver), the token check and its \
         audit record (fsync \"always\", its default)",
        m * b.settings.rounds,
        b.settings.rounds
    ));
    let proxies = b.start_all(&mut case);
    let (mut p50, mut p99) = (Series::default(), Series::default());
    let mut failed = BTreeMap::new();
    let mut opened = 0usize;
    for round in 0..b.settings.rounds {
        for p in &proxies {
            if failed.contains_key(&p.way) {
                continue;
            }
            let r = tokio::time::timeout(Duration::from_secs(300), async {
                let mut ms = Vec::with_capacity(m);
                for i in 0..m {
                    // The token is minted before the clock starts: a management plane's work.
                    let route = p.route(opened + i);
                    let src = b.src(opened + i);
                    let t = Instant::now();
                    let s = Session::open(&route, src).await?;
                    let dt = t.elapsed();
                    if s.server_init.name != DESKTOP.as_bytes()
                        || (s.server_init.width, s.server_init.height) != (WIDTH, HEIGHT)
                    {
                        return Err(format!("unexpected ServerInit {:?}", s.server_init));
                    }
                    ms.push(dt.as_secs_f64() * 1e3);
                }
                Ok::<_, String>(ms)
            })
            .await
            .unwrap_or_else(|_| Err("no result within 300 s".into()));
            opened += m;
            match r {
                Ok(mut ms) => {
                    ms.sort_by(f64::total_cmp);
                    p50.push(p.way, quantile(&ms, 0.5));
                    p99.push(p.way, quantile(&ms, 0.99));
                }
                Err(e) => fail(&mut case, &mut failed, p.way, round, e),
            }
        }
    }
    for &w in &b.ways {
        if !failed.contains_key(&w) && p50.0.contains_key(&w) {
            case.checks.push(format!(
                "{}: every session reached the synthetic server's ServerInit",
                w.name()
            ));
        }
    }
    case.rows
        .push(p50.row(Row::new("setup p50", "ms", false), &b.ways, &failed));
    case.rows
        .push(p99.row(Row::new("setup p99", "ms", false), &b.ways, &failed));
    case.rows.push(p50.minus_direct().row(
        Row::new("added p50 vs direct", "ms", false).target("<= 2 ms", Goal::AtMost(2.0)),
        &b.ways,
        &failed,
    ));
    case.rows.push(p99.minus_direct().row(
        Row::new("added p99 vs direct", "ms", false),
        &b.ways,
        &failed,
    ));
    case
}

fn growth() -> Growth {
    Growth {
        // Leave the machine (shared) a quarter of its memory, and at least 3 GiB.
        min_available_kib: (total_memory_kib() / 4).max(3 << 20),
        max_failures: 20,
    }
}

fn total_memory_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| proc_number(&t, "MemTotal:"))
        .unwrap_or(0)
}

/// Idle sessions: proxy memory per session at each level.
pub async fn idle(b: &Bench) -> Case {
    let mut case = Case::new(
        "idle",
        "idle sessions: proxy memory (all its processes) per session",
    );
    let levels = b.settings.idle_levels.clone();
    case.notes.push(format!(
        "one fresh proxy per path; sessions opened {} at a time, each takes one 16x16 update \
         and then idles; per session = (memory at N - memory before the first) / N; RSS and \
         PSS summed over the proxy's process group (from /proc/PID/smaps_rollup); one round",
        b.settings.concurrency
    ));
    case.notes.extend(b.settings.session_cap.clone());
    let g = growth();
    let mut rss: BTreeMap<usize, Series> = BTreeMap::new();
    let mut pss: BTreeMap<usize, Series> = BTreeMap::new();
    let mut notes: BTreeMap<(usize, Way), String> = BTreeMap::new();
    let mut failed = BTreeMap::new();
    let mut raw = Vec::new();
    for &way in &b.ways {
        if way == Way::Direct {
            continue;
        }
        let mut proxy = match b.start(way, "idle") {
            Ok(p) => p,
            Err(e) => {
                fail(&mut case, &mut failed, way, 0, e);
                continue;
            }
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let base = proxy.memory_kib();
        let mut pool = Pool::new(b.settings.concurrency);
        let started = Instant::now();
        for &level in &levels {
            let deadline = Instant::now()
                + Duration::from_secs(
                    (b.settings.grow_seconds * level as u64
                        / levels.iter().max().copied().unwrap_or(1).max(1) as u64)
                        .max(30),
                );
            let route = |i: usize| proxy.route(i);
            let grown = pool.grow_to(level, &route, &b.sources, g, deadline).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let held = pool.live();
            let m = proxy.memory_kib();
            raw.push(serde_json::json!({
                "path": way.name(), "target": level, "sessions": held,
                "rss_kib": m.rss, "pss_kib": m.pss, "processes": m.processes,
                "base_rss_kib": base.rss, "base_pss_kib": base.pss,
                "seconds_since_start": started.elapsed().as_secs_f64(),
            }));
            if held > 0 {
                let per = |now: u64, then: u64| now.saturating_sub(then) as f64 / held as f64;
                rss.entry(level)
                    .or_default()
                    .push(way, per(m.rss, base.rss));
                pss.entry(level)
                    .or_default()
                    .push(way, per(m.pss, base.pss));
            }
            if let Err(mut why) = grown {
                if let Some(hint) = proxy.log_hint() {
                    why.push_str(&format!("; {} {hint}", way.name()));
                }
                notes.insert((level, way), format!("{held} of {level} held"));
                for &later in levels.iter().filter(|&&l| l > level) {
                    notes.insert((later, way), format!("not tried: {held} of {level} held"));
                }
                case.notes.push(format!(
                    "{} at {level}: held {held} sessions; {why}",
                    way.name()
                ));
                break;
            }
        }
        let most = pool.live();
        if pool.failed_later() == 0 {
            case.checks.push(format!(
                "{}: {most} sessions held, each took its 16x16 update ({} bytes) and none \
                 was closed while idle",
                way.name(),
                update_len(TILE, TILE)
            ));
        } else {
            case.errors.push(format!(
                "{}: {} sessions were closed while idle, the first: {:?}",
                way.name(),
                pool.failed_later(),
                pool.errors().first()
            ));
        }
        pool.close().await;
        proxy.stop();
    }
    case.notes
        .push(format!("readings: {}", serde_json::Value::Array(raw)));
    for &level in &levels {
        for (series, what) in [(&rss, "RSS"), (&pss, "PSS")] {
            let mut row = Row::new(&format!("{what} per session at {level}"), "KiB", false);
            if level == *levels.iter().max().unwrap_or(&0) {
                row = row.target("<= 64 KiB", Goal::AtMost(64.0));
            }
            let mut row = series
                .get(&level)
                .unwrap_or(&Series::default())
                .row(row, &b.ways, &failed);
            for ((l, w), note) in &notes {
                if *l == level {
                    if let Some(c) = row.cells.get_mut(w.name()) {
                        c.note = Some(note.clone());
                    } else {
                        row.missing.insert(w.name().into(), note.clone());
                    }
                }
            }
            row.missing
                .insert(Way::Direct.name().into(), "no proxy".into());
            case.rows.push(row);
        }
    }
    case
}

/// What one run of the many-sessions case measured on one path.
struct Run {
    cpu: Option<f64>,
    harness_cpu: f64,
    idle: f64,
    niced: f64,
    p50: f64,
    p99: f64,
    rate: f64,
}

/// Many sessions, each asking for a 16x16 update at each of `many_rates` in turn.
pub async fn many(b: &Bench) -> Case {
    let s = &b.settings;
    let mut case = Case::new(
        "many",
        "many sessions, each receiving small updates at a steady rate",
    );
    case.notes.push(format!(
        "{} sessions, each requesting a 16x16 update {} times a second, {} s per rate, the same \
         sessions (started at random points of the period); latency is request to complete \
         update; proxy CPU is utime+stime of its process group over the run (/proc/PID/stat); \
         one fresh proxy per path",
        s.many_sessions,
        s.many_rates
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", then "),
        s.many_seconds
    ));
    case.notes.extend(s.session_cap.clone());
    let g = growth();
    let mut runs: BTreeMap<(u32, Way), Run> = BTreeMap::new();
    let mut notes: BTreeMap<Way, String> = BTreeMap::new();
    let mut failed = BTreeMap::new();
    for &way in &b.ways {
        let mut proxy = match b.start(way, "many") {
            Ok(p) => p,
            Err(e) => {
                fail(&mut case, &mut failed, way, 0, e);
                continue;
            }
        };
        let mut pool = Pool::new(s.concurrency);
        let route = |i: usize| proxy.route(i);
        let deadline = Instant::now() + Duration::from_secs(s.grow_seconds);
        let grown = pool
            .grow_to(s.many_sessions, &route, &b.sources, g, deadline)
            .await;
        let held = pool.live();
        if let Err(why) = &grown {
            let why = match proxy.log_hint() {
                Some(hint) => format!("{why}; {} {hint}", way.name()),
                None => why.clone(),
            };
            notes.insert(way, format!("{held} of {} held", s.many_sessions));
            case.notes.push(format!(
                "{}: held {held} of {} sessions ({why}); ran with those",
                way.name(),
                s.many_sessions
            ));
        }
        if held == 0 {
            fail(&mut case, &mut failed, way, 0, "no session opened".into());
            pool.close().await;
            continue;
        }
        for &rate in &s.many_rates {
            eprintln!(
                "vizor-bench: many: {} x {held} sessions at {rate}/s",
                way.name()
            );
            let period = Duration::from_secs_f64(1.0 / f64::from(rate));
            let before = b.upstream.screen.sent();
            let failed_before = pool.failed_later();
            let me = std::process::id();
            let (cpu0, me0, m0, t0) = (
                proxy.cpu_seconds(),
                crate::proxy::cpu_seconds(me),
                crate::proxy::machine_cpu_seconds(),
                Instant::now(),
            );
            let ran = pool.run(period, Duration::from_secs(s.many_seconds)).await;
            let (cpu1, me1, m1, secs) = (
                proxy.cpu_seconds(),
                crate::proxy::cpu_seconds(me),
                crate::proxy::machine_cpu_seconds(),
                t0.elapsed().as_secs_f64(),
            );
            let failed_now = pool.failed_later() - failed_before;
            let mut all: Vec<f64> = ran
                .iter()
                .flat_map(|r| r.latencies_us.iter().map(|&u| f64::from(u) / 1e3))
                .collect();
            all.sort_by(f64::total_cmp);
            let updates = all.len() as u64;
            let wrong = ran.iter().filter(|r| !r.counted_right).count();
            let want = Received {
                updates,
                bytes: updates * update_len(TILE, TILE),
            };
            let sent = b.sent_since(before, want).await;
            if wrong > 0
                || failed_now > 0
                || ran.len() != held
                || (sent.updates, sent.bytes) != (want.updates, want.bytes)
            {
                case.errors.push(format!(
                    "{} at {rate}/s: {} of {held} sessions reported, {wrong} miscounted, \
                     {failed_now} failed ({:?}), {updates} updates timed, server sent {} \
                     ({} bytes, {} expected)",
                    way.name(),
                    ran.len(),
                    pool.errors().first(),
                    sent.updates,
                    sent.bytes,
                    want.bytes
                ));
                failed.insert(way, "check failed".into());
            } else {
                case.checks.push(format!(
                    "{} at {rate}/s: {updates} updates; every session's bytes and updates as \
                     it asked, as the server sent",
                    way.name()
                ));
            }
            runs.insert(
                (rate, way),
                Run {
                    cpu: (way != Way::Direct).then(|| (cpu1 - cpu0) / secs),
                    harness_cpu: (me1 - me0) / secs,
                    idle: (m1.0 - m0.0) / secs,
                    niced: (m1.1 - m0.1) / secs,
                    p50: quantile(&all, 0.5),
                    p99: quantile(&all, 0.99),
                    rate: updates as f64 / s.many_seconds as f64,
                },
            );
        }
        pool.close().await;
        proxy.stop();
    }
    let cell = |v: f64, way: Way| {
        let mut c = Cell::of(vec![v]);
        c.note = notes.get(&way).cloned();
        c
    };
    for (i, &rate) in s.many_rates.iter().enumerate() {
        let asked = s.many_sessions as f64 * f64::from(rate);
        let at = format!("at {rate}/s");
        let mut rows = vec![
            Row::new(&format!("proxy CPU {at}"), "cores", false),
            Row::new(&format!("frame latency p50 {at}"), "ms", false),
            Row::new(&format!("frame latency p99 {at}"), "ms", false),
            Row::new(&format!("updates/s {at} (asked {asked})"), "1/s", true),
            Row::new(&format!("harness CPU {at}"), "cores", false),
            Row::new(
                &format!("proxy CPU per 100k updates/s {at}"),
                "cores",
                false,
            ),
            Row::new(&format!("machine idle {at}"), "cores", true),
            Row::new(&format!("niced (other) work {at}"), "cores", false),
        ];
        if i == 0 {
            rows[0] = rows[0].clone().target("<= 1 core", Goal::AtMost(1.0));
            rows[2] = rows[2].clone().target("<= 5 ms", Goal::AtMost(5.0));
        }
        for &way in &b.ways {
            let Some(r) = runs.get(&(rate, way)) else {
                let why = failed.get(&way).cloned().unwrap_or_else(|| "n/a".into());
                for row in &mut rows {
                    row.without(way, why.clone());
                }
                continue;
            };
            match r.cpu {
                Some(c) => {
                    rows[0].set(way, cell(c, way));
                    rows[5].set(way, cell(c / r.rate * 100_000.0, way));
                }
                None => {
                    rows[0].without(way, "no proxy");
                    rows[5].without(way, "no proxy");
                }
            }
            rows[1].set(way, cell(r.p50, way));
            rows[2].set(way, cell(r.p99, way));
            rows[3].set(way, cell(r.rate, way));
            rows[4].set(way, cell(r.harness_cpu, way));
            rows[6].set(way, cell(r.idle, way));
            rows[7].set(way, cell(r.niced, way));
            if failed.contains_key(&way) {
                for row in &mut rows {
                    if let Some(c) = row.cells.get_mut(way.name()) {
                        c.note = Some("check failed".into());
                    }
                }
            }
        }
        case.rows.extend(rows.into_iter().map(Row::finish));
    }
    case
}
