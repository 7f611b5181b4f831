//! A host's libvirt connections: long-lived, each used by one call at a time, kept
//! alive by libvirt's keepalive, and reopened with a backoff.
//!
//! Why several connections and not one shared: libvirt's client (9.0, Debian 12)
//! crashes in GLib (`g_main_loop_quit` from `virNetClientIOEventLoop`) when several
//! threads wait on one connection while keepalive closes it. Shown with a freeze of the
//! server under four threads sharing a connection: a crash three times in three; with
//! each connection used by one thread at a time, none in fifteen freezes. So each call
//! takes a connection of its own from the pool and gives it back; a host has at most
//! as many as it runs calls at once (its lookups' turns and a probe).
//!
//! Why keepalive: a host that vanishes without closing its connections (power lost, a
//! link cut, a frozen libvirtd) would otherwise hold every call waiting on it until the
//! kernel gives up on the socket, up to about fifteen minutes. With keepalive a dead
//! connection is closed within [`KEEPALIVE_INTERVAL`] × ([`KEEPALIVE_COUNT`] + 1)
//! seconds and its call fails. Keepalive needs libvirt's event loop, registered
//! before the first connection is opened and run on a thread of its own
//! ([`event_loop`]).
//!
//! Opening is bounded too: libvirt has no time limit on opening a connection (and
//! keepalive starts only once it is open), so a libvirtd that accepts and never
//! answers, or a link cut during an open, would hold the opener until the kernel gives
//! up. So a connection is opened on a thread of its own, at most [`OPENERS_MAX`] at
//! once per host, and a call waits at most [`OPEN_WAIT`] for a connection (a call whose
//! connection died tries once more, so twice that). An open older than that makes the
//! host's calls fail at once (it hangs), except the prober's, which opens anew past
//! the hung ones (up to [`OPENERS_HUNG_MAX`] in all), so that a host that comes back is
//! used again within a probe; opens that started before one that succeeded no longer
//! count as the host hanging. Two opens that fail in a row set a backoff: calls within
//! it fail at once with the last error, and only the prober tries sooner.

use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use virt::connect::Connect;

/// Seconds between keepalive messages on an idle connection.
pub const KEEPALIVE_INTERVAL: i32 = 5;

/// Keepalive messages left unanswered before libvirt closes the connection.
pub const KEEPALIVE_COUNT: u32 = 3;

/// How long a call waits for a connection, in all.
pub const OPEN_WAIT: Duration = Duration::from_secs(10);

/// Opens under way at once per host, beside those that hang.
pub const OPENERS_MAX: usize = 4;

/// Opens under way per host at most, hung ones included: the threads a host can hold
/// when its opens never end (a libvirtd frozen after accepting, then its machine reset:
/// the connection has nothing left to send, so the kernel never gives up on it).
pub const OPENERS_HUNG_MAX: usize = 16;

/// The backoff after two failed opens in a row; it doubles with each further one, up
/// to [`BACKOFF_MAX`].
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);

/// The longest backoff (below the prober's period, which ignores it).
pub const BACKOFF_MAX: Duration = Duration::from_secs(8);

/// Idle connections kept per host at most (more than a host runs at once).
const IDLE_MAX: usize = 16;

/// Registers libvirt's default event loop and runs it on a thread of its own, once
/// per process: what keepalive needs. `Err`: why not (connections then work without
/// keepalive).
pub fn event_loop() -> Result<(), &'static str> {
    static STARTED: OnceLock<Result<(), &'static str>> = OnceLock::new();
    *STARTED.get_or_init(|| {
        let started = start_event_loop();
        if let Err(why) = started {
            tracing::error!(
                "{why}: libvirt connections have no keepalive, and a host that hangs \
                 holds its lookups until the kernel gives up on the connection"
            );
        }
        started
    })
}

fn start_event_loop() -> Result<(), &'static str> {
    if virt::event::event_register_default_impl().is_err() {
        return Err("libvirt's event loop could not be registered");
    }
    std::thread::Builder::new()
        .name("vizor-libvirt-events".into())
        .spawn(|| loop {
            if let Err(e) = virt::event::event_run_default_impl() {
                tracing::warn!(error = %e.message(), "libvirt event loop");
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .map(|_| ())
        .map_err(|_| "no thread for libvirt's event loop")
}

#[derive(Default)]
struct State {
    idle: Vec<Connect>,
    /// The opens under way: each one's number and start.
    opening: Vec<(u64, Instant)>,
    /// The next open's number.
    next_open: u64,
    /// After failed opens: how many in a row, the last one's words, and until when
    /// calls do not open another.
    failures: u32,
    last_error: String,
    backoff_until: Option<Instant>,
    /// Whether a refused keepalive was said already.
    said_no_keepalive: bool,
    /// When the last open that succeeded started: opens started before it hang on a
    /// connection the host forgot, not on the host as it is now.
    last_good_open: Option<Instant>,
    /// Whether running out of room for hung opens was said already.
    said_hung_max: bool,
}

impl State {
    /// How long each open under way that counts has waited: those started since the
    /// last open that succeeded.
    fn current_opens(&self) -> impl Iterator<Item = Duration> + '_ {
        self.opening
            .iter()
            .filter(|(_, since)| self.last_good_open.is_none_or(|good| *since >= good))
            .map(|(_, since)| since.elapsed())
    }

    /// Since when the oldest open under way that counts has waited, if it has waited
    /// longer than [`OPEN_WAIT`]: the host hangs on opens.
    fn hung_open(&self) -> Option<Duration> {
        self.current_opens().max().filter(|d| *d >= OPEN_WAIT)
    }

    /// Whether another open may start: fewer than [`OPENERS_MAX`] under way that count,
    /// or, for the prober, all of them hung; never more than [`OPENERS_HUNG_MAX`].
    fn may_open(&self, probe: bool) -> bool {
        if self.opening.len() >= OPENERS_HUNG_MAX {
            return false;
        }
        let (count, all_hung) = self
            .current_opens()
            .fold((0, true), |(n, hung), d| (n + 1, hung && d >= OPEN_WAIT));
        count < OPENERS_MAX || (probe && all_hung)
    }
}

/// One host's connections.
pub struct Pool(Arc<Inner>);

/// What a pool shares with its opener threads, which may outlive a call (and the pool).
struct Inner {
    uri: String,
    state: Mutex<State>,
    /// Told when an open ends or a connection is given back.
    changed: Condvar,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("uri", &self.0.uri).finish()
    }
}

impl Pool {
    /// The pool of `uri`; nothing is opened yet.
    pub fn new(uri: &str) -> Pool {
        // libvirt prints every error to stderr unless told otherwise; vizor reports
        // them itself.
        virt::error::clear_error_callback();
        Pool(Arc::new(Inner {
            uri: uri.to_owned(),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }))
    }

    /// A connection for one call, within [`OPEN_WAIT`]: an idle one that is alive,
    /// else one opened now. `probe`: the prober's call, which opens even within the
    /// backoff and while an open hangs. Blocking.
    pub fn take(&self, probe: bool) -> Result<Connect, String> {
        self.0.take(probe, false)
    }

    /// A connection opened now, not an idle one: for the retry after a connection
    /// failed as dead, since the idle ones were opened to the same libvirt before and
    /// libvirt may not have seen them die yet (a restarted libvirtd). Blocking.
    pub fn take_new(&self, probe: bool) -> Result<Connect, String> {
        self.0.take(probe, true)
    }

    /// Gives back a connection after its call, if it is alive.
    pub fn give_back(&self, c: Connect) {
        self.0.give_back(c)
    }
}

/// Ends an open's entry however its thread ends (a panic in libvirt included), so
/// that the pool never waits for an open that is over.
struct OpenEntry {
    pool: Arc<Inner>,
    id: u64,
}

impl Drop for OpenEntry {
    fn drop(&mut self) {
        if let Ok(mut s) = self.pool.state.lock() {
            s.opening.retain(|(id, _)| *id != self.id);
        }
        self.pool.changed.notify_all();
    }
}

impl Inner {
    fn lock(&self) -> Result<MutexGuard<'_, State>, String> {
        self.state
            .lock()
            .map_err(|_| "connection pool lock poisoned".to_owned())
    }

    fn take(self: &Arc<Self>, probe: bool, new: bool) -> Result<Connect, String> {
        let deadline = Instant::now() + OPEN_WAIT;
        let mut s = self.lock()?;
        loop {
            while let Some(c) = if new { None } else { s.idle.pop() } {
                if c.is_alive().unwrap_or(false) {
                    return Ok(c);
                }
            }
            let hung = s.hung_open();
            if let (Some(d), false) = (hung, probe) {
                return Err(format!(
                    "no answer to opening a connection for {}",
                    humantime::format_duration(Duration::from_secs(d.as_secs()))
                ));
            }
            if s.opening.len() >= OPENERS_HUNG_MAX {
                let first = !std::mem::replace(&mut s.said_hung_max, true);
                drop(s);
                if first {
                    tracing::error!(uri = %self.uri,
                        "{OPENERS_HUNG_MAX} opens of a connection to libvirt hang: no more \
                         are tried until one ends (restart vizor once the host is back)");
                }
                return Err(format!(
                    "{OPENERS_HUNG_MAX} opens of a connection hang; none more is tried"
                ));
            }
            if s.may_open(probe) {
                if let Some(until) = s.backoff_until.filter(|u| !probe && *u > Instant::now()) {
                    return Err(format!(
                        "{} (not tried again for {} ms)",
                        s.last_error,
                        until.saturating_duration_since(Instant::now()).as_millis()
                    ));
                }
                let id = s.next_open;
                s.next_open += 1;
                s.opening.push((id, Instant::now()));
                drop(s);
                return self.open(id, deadline);
            }
            // As many opens as may be are under way: wait for one of them, or for a
            // connection given back.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "no connection within {}: {} opens under way",
                    humantime::format_duration(OPEN_WAIT),
                    s.opening.len()
                ));
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .map_err(|_| "connection pool lock poisoned".to_owned())?
                .0;
        }
    }

    /// Opens a connection on a thread of its own and waits for it until `deadline`;
    /// one that comes later is kept for the next call.
    fn open(self: &Arc<Self>, id: u64, deadline: Instant) -> Result<Connect, String> {
        let keepalive = event_loop().is_ok();
        let (tx, rx) = mpsc::sync_channel::<Result<Connect, String>>(1);
        let entry = OpenEntry {
            pool: self.clone(),
            id,
        };
        let spawned = std::thread::Builder::new()
            .name("vizor-libvirt-open".into())
            .spawn(move || {
                let opened = Connect::open(Some(&entry.pool.uri));
                if let (Ok(c), true) = (&opened, keepalive) {
                    if let Err(e) = c.set_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT) {
                        entry.pool.no_keepalive(&e);
                    }
                }
                entry.pool.opened(entry.id, opened, tx);
                drop(entry);
            });
        // Not spawned: the entry went with the closure and is dropped already.
        if let Err(e) = spawned {
            return Err(format!("no thread to open a connection: {e}"));
        }
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(opened) => opened,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "no answer to opening a connection within {}",
                humantime::format_duration(OPEN_WAIT)
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err("the open of a connection ended without an answer".into())
            }
        }
    }

    /// Says once per host that keepalive was refused, unless the driver needs none
    /// (`test:///` and other drivers in the process).
    fn no_keepalive(&self, e: &virt::error::Error) {
        if e.code().unwrap_or(virt::error::ErrorNumber::InternalError)
            == virt::error::ErrorNumber::NoSupport
        {
            return;
        }
        let first = self
            .state
            .lock()
            .map(|mut s| !std::mem::replace(&mut s.said_no_keepalive, true))
            .unwrap_or(false);
        if first {
            tracing::warn!(uri = %self.uri, error = %e.message(),
                "libvirt refused keepalive: a host that hangs holds its lookups longer");
        }
    }

    /// An open ended: its connection goes to the call that asked (or, gone, to the
    /// idle ones); its failure sets the backoff.
    fn opened(
        &self,
        id: u64,
        opened: Result<Connect, virt::error::Error>,
        tx: mpsc::SyncSender<Result<Connect, String>>,
    ) {
        // A connection no one keeps is closed after the lock is let go: closing a live
        // one asks libvirt.
        let mut surplus = None;
        if let Ok(mut s) = self.state.lock() {
            match opened {
                Ok(c) => {
                    s.failures = 0;
                    s.backoff_until = None;
                    s.last_error.clear();
                    let started = s.opening.iter().find(|(i, _)| *i == id).map(|e| e.1);
                    s.last_good_open = s.last_good_open.max(started);
                    s.said_hung_max = false;
                    if let Err(
                        mpsc::TrySendError::Disconnected(Ok(c)) | mpsc::TrySendError::Full(Ok(c)),
                    ) = tx.try_send(Ok(c))
                    {
                        if s.idle.len() < IDLE_MAX {
                            s.idle.push(c);
                        } else {
                            surplus = Some(c);
                        }
                    }
                }
                Err(e) => {
                    // One failure is tried again at once (a libvirtd restarting is
                    // back in a moment); from the second in a row, the backoff.
                    s.failures = s.failures.saturating_add(1);
                    s.backoff_until = (s.failures >= 2).then(|| {
                        Instant::now()
                            + BACKOFF_FIRST
                                .saturating_mul(1 << (s.failures - 2).min(8))
                                .min(BACKOFF_MAX)
                    });
                    s.last_error = e.message().to_owned();
                    let _ = tx.try_send(Err(s.last_error.clone()));
                }
            }
        }
        drop(surplus);
    }

    fn give_back(&self, c: Connect) {
        if !c.is_alive().unwrap_or(false) {
            return;
        }
        let surplus = match self.state.lock() {
            Ok(mut s) if s.idle.len() < IDLE_MAX => {
                s.idle.push(c);
                None
            }
            _ => Some(c),
        };
        // All: a waiter for a new connection cannot use it and would swallow the call.
        self.changed.notify_all();
        drop(surplus);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_serves_one_call_at_a_time_and_is_kept_after() {
        let pool = Pool::new("test:///default");
        let a = pool.take(false).unwrap();
        // Taken: the next call gets a connection of its own.
        let b = pool.take(false).unwrap();
        assert_ne!(format!("{a:?}"), format!("{b:?}"));
        let kept = format!("{a:?}"); // its pointer
        pool.give_back(a);
        let c = pool.take(false).unwrap();
        assert_eq!(format!("{c:?}"), kept, "the idle connection is used again");
        drop((b, c));
    }

    #[test]
    fn failed_opens_back_off_calls_but_not_the_prober() {
        let pool = Pool::new("vizor-no-such-driver:///");
        let first = pool.take(false).unwrap_err();
        assert!(!first.contains("not tried again"), "{first}");
        // One failure is tried again at once; two in a row set the backoff.
        let second = pool.take(false).unwrap_err();
        assert_eq!(second, first);
        // Within the backoff: at once, with the last error.
        let again = pool.take(false).unwrap_err();
        assert!(again.starts_with(&first), "{again}");
        assert!(again.contains("not tried again"), "{again}");
        // The prober tries anyway, and its failure doubles the backoff.
        let probe = pool.take(true).unwrap_err();
        assert!(!probe.contains("not tried again"), "{probe}");
        let s = pool.0.state.lock().unwrap();
        assert_eq!(s.failures, 3);
        let left = s.backoff_until.unwrap() - Instant::now();
        assert!(
            left > BACKOFF_FIRST && left <= 2 * BACKOFF_FIRST,
            "{left:?}"
        );
    }

    #[test]
    fn the_backoff_doubles_up_to_its_bound() {
        let pool = Pool::new("vizor-no-such-driver:///");
        let mut last = Duration::ZERO;
        pool.take(true).unwrap_err();
        for _ in 0..10 {
            pool.take(true).unwrap_err();
            let s = pool.0.state.lock().unwrap();
            last = s.backoff_until.unwrap() - Instant::now();
            assert!(last <= BACKOFF_MAX, "{last:?}");
        }
        assert!(last > BACKOFF_MAX / 2, "{last:?}");
    }

    /// Puts opens under way into `pool` that no thread runs: how a hung libvirtd looks.
    fn opens_under_way(pool: &Pool, since: &[Duration]) {
        let mut s = pool.0.state.lock().unwrap();
        for d in since {
            let id = s.next_open;
            s.next_open += 1;
            s.opening
                .push((id, Instant::now().checked_sub(*d).unwrap()));
        }
    }

    #[test]
    fn an_open_that_hangs_fails_calls_at_once_but_not_the_prober() {
        let pool = Pool::new("test:///default");
        opens_under_way(&pool, &[OPEN_WAIT + Duration::from_secs(1)]);
        let since = Instant::now();
        let e = pool.take(false).unwrap_err();
        assert!(
            e.starts_with("no answer to opening a connection for 11s"),
            "{e}"
        );
        assert!(since.elapsed() < OPEN_WAIT / 2, "{:?}", since.elapsed());
        // The prober opens anew beside it: a host that is back is found.
        let c = pool.take(true).unwrap();
        // An idle connection is taken first, whatever opens are under way.
        opens_under_way(&pool, &[Duration::ZERO; OPENERS_MAX - 1]);
        pool.give_back(c);
        assert!(pool.take(false).is_ok());
    }

    #[test]
    fn the_retry_after_a_dead_connection_opens_a_new_one() {
        let pool = Pool::new("test:///default");
        let c = pool.take(false).unwrap();
        let idle = format!("{c:?}"); // its pointer
        pool.give_back(c);
        let n = pool.take_new(false).unwrap();
        assert_ne!(format!("{n:?}"), idle);
        // The idle one is still there for the next call.
        assert_eq!(format!("{:?}", pool.take(false).unwrap()), idle);
    }

    const HUNG: Duration = Duration::from_secs(11);

    #[test]
    fn the_prober_opens_past_hung_opens_up_to_a_bound() {
        let pool = Pool::new("test:///default");
        opens_under_way(&pool, &[HUNG; OPENERS_MAX]);
        let since = Instant::now();
        assert!(
            pool.take_new(true).is_ok(),
            "the prober opens past hung opens"
        );
        assert!(since.elapsed() < OPEN_WAIT / 2, "{:?}", since.elapsed());
        // Until the bound: then nothing more is tried, at once.
        opens_under_way(&pool, &[HUNG; OPENERS_HUNG_MAX - OPENERS_MAX]);
        let since = Instant::now();
        let e = pool.take_new(true).unwrap_err();
        assert!(e.contains("hang"), "{e}");
        assert!(since.elapsed() < OPEN_WAIT / 2, "{:?}", since.elapsed());
    }

    #[test]
    fn opens_older_than_one_that_succeeded_do_not_count_as_the_host_hanging() {
        let pool = Pool::new("test:///default");
        opens_under_way(&pool, &[HUNG]);
        assert!(
            pool.take_new(false).is_err(),
            "an open hangs: calls fail at once"
        );
        drop(pool.take_new(true).unwrap());
        // The host answered since: the old open is one it forgot.
        let c = pool.take_new(false);
        assert!(c.is_ok(), "{c:?}");
    }

    #[test]
    fn a_connection_given_back_wakes_a_call_that_can_use_it() {
        let pool = std::sync::Arc::new(Pool::new("test:///default"));
        let c = pool.take(false).unwrap();
        opens_under_way(&pool, &[Duration::ZERO; OPENERS_MAX]);
        // A waiter for a new connection, which cannot use the one given back.
        let new_waiter = {
            let pool = pool.clone();
            std::thread::spawn(move || drop(pool.take_new(false)))
        };
        let giver = {
            let pool = pool.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                pool.give_back(c);
            })
        };
        let since = Instant::now();
        assert!(pool.take(false).is_ok());
        assert!(since.elapsed() < OPEN_WAIT / 2, "{:?}", since.elapsed());
        giver.join().unwrap();
        // The waiter for a new connection ends at its own bound.
        pool.0.state.lock().unwrap().opening.clear();
        pool.0.changed.notify_all();
        new_waiter.join().unwrap();
    }
}
