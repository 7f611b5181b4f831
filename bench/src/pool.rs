//! Thousands of console sessions held open at once through one proxy: opened with
//! bounded concurrency, each then holds its connection (answering the proxy's pings)
//! until told to run a paced exchange (after which it holds again) or to stop.
//! Growth stops early, with the reason, when sessions fail, when memory runs short or
//! when its time is up: a proxy that cannot hold 10,000 sessions on this machine is
//! reported, never waited for.

use crate::client::{Route, Session};
use crate::proxy::mem_available_kib;
use crate::upstream::{update_len, TILE};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

/// What the sessions are told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Hold the connection.
    Hold,
    /// Ask for a 16x16 update every `period` until `until`, timing each, then report
    /// and hold again.
    Run {
        /// Between two requests of a session.
        period: Duration,
        /// End of the run.
        until: Instant,
        /// Which run (each is done once).
        run: u32,
    },
    /// Close.
    Stop,
}

/// What one session did in a run.
#[derive(Debug, Default)]
pub struct Ran {
    /// Which run of the pool it belongs to.
    run: u32,
    /// Request-to-update times, microseconds.
    pub latencies_us: Vec<u32>,
    /// Whether its byte and update counts matched its requests.
    pub counted_right: bool,
}

/// Session counts, shared with the session tasks.
#[derive(Debug, Default)]
struct Counts {
    /// Opened and holding (or running).
    live: AtomicUsize,
    /// Failed to open.
    failed_to_open: AtomicUsize,
    /// Failed after they were open.
    failed_later: AtomicUsize,
    /// The first errors.
    errors: Mutex<Vec<String>>,
}

impl Counts {
    fn error(&self, e: &str) {
        if let Ok(mut errors) = self.errors.lock() {
            if errors.len() < 5 {
                errors.push(e.to_owned());
            }
        }
    }
}

/// Sessions held open through one proxy.
pub struct Pool {
    phase: watch::Sender<Phase>,
    runs: u32,
    results: mpsc::UnboundedSender<Ran>,
    ran: mpsc::UnboundedReceiver<Ran>,
    tasks: JoinSet<()>,
    counts: Arc<Counts>,
    opening: Arc<Semaphore>,
    spawned: usize,
}

/// Bounds on growing a pool.
#[derive(Debug, Clone, Copy)]
pub struct Growth {
    /// Stop when /proc/meminfo's MemAvailable falls below this, KiB.
    pub min_available_kib: u64,
    /// Stop when this many sessions failed to open.
    pub max_failures: usize,
}

impl Pool {
    /// An empty pool that opens `concurrency` sessions at a time.
    pub fn new(concurrency: usize) -> Pool {
        let (results, ran) = mpsc::unbounded_channel();
        Pool {
            phase: watch::channel(Phase::Hold).0,
            runs: 0,
            results,
            ran,
            tasks: JoinSet::new(),
            counts: Arc::default(),
            opening: Arc::new(Semaphore::new(concurrency)),
            spawned: 0,
        }
    }

    /// Sessions open now.
    pub fn live(&self) -> usize {
        self.counts.live.load(Ordering::Relaxed)
    }

    /// Sessions that failed, to open or later.
    pub fn failed(&self) -> usize {
        self.counts.failed_to_open.load(Ordering::Relaxed)
            + self.counts.failed_later.load(Ordering::Relaxed)
    }

    /// Sessions that failed after they were open.
    pub fn failed_later(&self) -> usize {
        self.counts.failed_later.load(Ordering::Relaxed)
    }

    /// The first errors seen.
    pub fn errors(&self) -> Vec<String> {
        self.counts
            .errors
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    /// Opens sessions (`route(i)`, from `sources[i % len]`) until `target` are open;
    /// `Err` says why it stopped short.
    pub async fn grow_to(
        &mut self,
        target: usize,
        route: &dyn Fn(usize) -> Route,
        sources: &[IpAddr],
        growth: Growth,
        deadline: Instant,
    ) -> Result<(), String> {
        let stopped = |pool: &Pool| -> Option<String> {
            if pool.failed() >= growth.max_failures {
                return Some(format!(
                    "{} sessions failed, the first: {}",
                    pool.failed(),
                    pool.errors().first().cloned().unwrap_or_default()
                ));
            }
            let avail = mem_available_kib();
            if avail < growth.min_available_kib {
                return Some(format!(
                    "stopped: only {} MiB of memory left available",
                    avail / 1024
                ));
            }
            if Instant::now() > deadline {
                return Some("stopped: out of time".into());
            }
            None
        };
        while self.spawned < target {
            if let Some(why) = stopped(self) {
                return Err(why);
            }
            let Ok(permit) = tokio::time::timeout(
                Duration::from_millis(500),
                self.opening.clone().acquire_owned(),
            )
            .await
            else {
                continue;
            };
            let Ok(permit) = permit else {
                return Err("internal: semaphore closed".into());
            };
            let i = self.spawned;
            self.spawned += 1;
            let (route, src) = (route(i), sources[i % sources.len()]);
            let counts = self.counts.clone();
            let phase = self.phase.subscribe();
            let results = self.results.clone();
            self.tasks.spawn(async move {
                let mut s = match open(&route, src).await {
                    Ok(s) => s,
                    Err(e) => {
                        counts.failed_to_open.fetch_add(1, Ordering::Relaxed);
                        counts.error(&e);
                        return;
                    }
                };
                drop(permit);
                counts.live.fetch_add(1, Ordering::Relaxed);
                let r = follow(&mut s, phase, results).await;
                counts.live.fetch_sub(1, Ordering::Relaxed);
                if let Err(e) = r {
                    counts.failed_later.fetch_add(1, Ordering::Relaxed);
                    counts.error(&e);
                }
            });
        }
        // The last ones finish opening.
        while self.live() + self.failed() < self.spawned {
            if let Some(why) = stopped(self) {
                return Err(why);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match self.failed() {
            0 => Ok(()),
            n => Err(format!(
                "{n} sessions failed, the first: {}",
                self.errors().first().cloned().unwrap_or_default()
            )),
        }
    }

    /// Runs every open session at one request per `period` for `duration`; returns
    /// what they did (sessions that failed meanwhile are counted in
    /// [`Pool::failed_later`]). The sessions hold again afterwards.
    pub async fn run(&mut self, period: Duration, duration: Duration) -> Vec<Ran> {
        let until = Instant::now() + duration;
        self.runs += 1;
        let (live, failed_before) = (self.live(), self.failed_later());
        let _ = self.phase.send(Phase::Run {
            period,
            until,
            run: self.runs,
        });
        let mut ran = Vec::new();
        let grace = until + Duration::from_secs(15);
        while ran.len() + (self.failed_later() - failed_before) < live {
            match tokio::time::timeout_at(grace.into(), self.ran.recv()).await {
                // A session that missed an earlier run's grace reports late: not this run.
                Ok(Some(r)) if r.run != self.runs => {}
                Ok(Some(r)) => ran.push(r),
                _ => break,
            }
        }
        let _ = self.phase.send(Phase::Hold);
        ran
    }

    /// Closes every session.
    pub async fn close(mut self) {
        let _ = self.phase.send(Phase::Stop);
        let _ = tokio::time::timeout(Duration::from_secs(20), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
    }
}

/// Opens a pooled session and takes one 16x16 update (so every buffer on the way is
/// in use once).
async fn open(route: &Route, src: IpAddr) -> Result<Session, String> {
    let opened = tokio::time::timeout(Duration::from_secs(30), async {
        let mut s = Session::open(route, src).await?;
        s.set_encodings_raw().await?;
        s.request(false, 0, 0, TILE, TILE).await?;
        s.wait_updates(1).await?;
        Ok::<_, crate::client::ClientError>(s)
    })
    .await;
    match opened {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(e.0),
        Err(_) => Err("not open within 30 s".into()),
    }
}

/// Follows the phase until told to stop: holds, runs each run once, reports it.
async fn follow(
    s: &mut Session,
    mut phase: watch::Receiver<Phase>,
    results: mpsc::UnboundedSender<Ran>,
) -> Result<(), String> {
    let mut done = 0;
    loop {
        let (period, until, run) = loop {
            match *phase.borrow_and_update() {
                Phase::Stop => return Ok(()),
                Phase::Run { period, until, run } if run != done => break (period, until, run),
                Phase::Run { .. } | Phase::Hold => {}
            }
            tokio::select! {
                e = s.idle() => return Err(format!("while idle: {e}")),
                changed = phase.changed() => if changed.is_err() { return Ok(()) },
            }
        };
        done = run;
        let ran = paced(s, period, until).await?;
        let _ = results.send(Ran { run, ..ran });
    }
}

/// One request every `period` until `until`, each timed to its complete update.
async fn paced(s: &mut Session, period: Duration, until: Instant) -> Result<Ran, String> {
    // Sessions start at random points of the period, as real ones would.
    let offset = rand::random::<f64>() * period.as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(offset)).await;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let expected = until
        .saturating_duration_since(Instant::now())
        .as_secs_f64()
        / period.as_secs_f64();
    let mut latencies_us = Vec::with_capacity(expected as usize + 2);
    let start = s.stream.received;
    let mut n = start.updates;
    loop {
        tick.tick().await;
        let t = Instant::now();
        if t >= until {
            break;
        }
        s.request(true, 0, 0, TILE, TILE).await?;
        n += 1;
        s.wait_updates(n).await?;
        latencies_us.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }
    let asked = latencies_us.len() as u64;
    let got = s.stream.received;
    let counted_right = got.updates - start.updates == asked
        && got.bytes - start.bytes == asked * update_len(TILE, TILE);
    Ok(Ran {
        run: 0,
        latencies_us,
        counted_right,
    })
}
