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
//! Opening is bounded too: libvirt has no time limit on opening a connection, and a
//! libvirtd that accepts and never answers would hold the opener for as long as it is
//! stuck. So a connection is opened on a thread of its own, one at a time per host;
//! a call waits for it at most [`OPEN_WAIT`], and a stuck opener ties up that one
//! thread, not the host's calls. An open that fails sets a backoff: calls within it
//! fail at once with the last error, and only the prober tries sooner.

use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use virt::connect::Connect;

/// Seconds between keepalive messages on an idle connection.
pub const KEEPALIVE_INTERVAL: i32 = 5;

/// Keepalive messages left unanswered before libvirt closes the connection.
pub const KEEPALIVE_COUNT: u32 = 3;

/// How long a call waits for a connection being opened.
pub const OPEN_WAIT: Duration = Duration::from_secs(10);

/// The first backoff after a failed open; it doubles up to [`BACKOFF_MAX`].
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
    })
}

#[derive(Default)]
struct State {
    idle: Vec<Connect>,
    /// Since when a connection has been opening (one at a time).
    opening: Option<Instant>,
    /// After failed opens: how many in a row, the last one's words, and until when
    /// calls do not open another.
    failures: u32,
    last_error: String,
    backoff_until: Option<Instant>,
}

/// One host's connections.
pub struct Pool(Arc<Inner>);

/// What a pool shares with its opener thread, which may outlive a call (and the pool).
struct Inner {
    uri: String,
    state: Mutex<State>,
    /// Told when an open ends.
    opened: Condvar,
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
            opened: Condvar::new(),
        }))
    }

    /// A connection for one call: an idle one that is alive, else one opened now.
    /// `probe`: the prober's call, which opens even within the backoff. Blocking.
    pub fn take(&self, probe: bool) -> Result<Connect, String> {
        self.0.take(probe)
    }

    /// Gives back a connection after its call, if it is alive.
    pub fn give_back(&self, c: Connect) {
        self.0.give_back(c)
    }

    /// Drops every idle connection: one failed as dead, so the others opened to the
    /// same libvirt before are suspect too.
    pub fn forget_idle(&self) {
        self.0.forget_idle()
    }
}

impl Inner {
    fn lock(&self) -> Result<MutexGuard<'_, State>, String> {
        self.state
            .lock()
            .map_err(|_| "connection pool lock poisoned".to_owned())
    }

    fn take(self: &Arc<Self>, probe: bool) -> Result<Connect, String> {
        let mut s = self.lock()?;
        loop {
            while let Some(c) = s.idle.pop() {
                if c.is_alive().unwrap_or(false) {
                    return Ok(c);
                }
            }
            if let Some(since) = s.opening {
                let left = OPEN_WAIT.saturating_sub(since.elapsed());
                if left.is_zero() {
                    return Err(format!(
                        "no answer to opening a connection for {}",
                        humantime::format_duration(Duration::from_secs(since.elapsed().as_secs()))
                    ));
                }
                s = self
                    .opened
                    .wait_timeout(s, left)
                    .map_err(|_| "connection pool lock poisoned".to_owned())?
                    .0;
                continue;
            }
            if let Some(until) = s.backoff_until.filter(|u| !probe && *u > Instant::now()) {
                return Err(format!(
                    "{} (not tried again for {} ms)",
                    s.last_error,
                    until.saturating_duration_since(Instant::now()).as_millis()
                ));
            }
            s.opening = Some(Instant::now());
            drop(s);
            return self.open();
        }
    }

    /// Opens a connection on a thread of its own and waits for it at most
    /// [`OPEN_WAIT`]; one that comes later is kept for the next call.
    fn open(self: &Arc<Self>) -> Result<Connect, String> {
        let _ = event_loop();
        let (tx, rx) = mpsc::sync_channel::<Connect>(1);
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("vizor-libvirt-open".into())
            .spawn(move || {
                let opened = Connect::open(Some(&me.uri)).inspect(|c| {
                    // Refused by drivers that need none (test:///, in-process).
                    let _ = c.set_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT);
                });
                me.opened(opened, tx);
            });
        if let Err(e) = spawned {
            if let Ok(mut s) = self.lock() {
                s.opening = None;
            }
            self.opened.notify_all();
            return Err(format!("no thread to open a connection: {e}"));
        }
        match rx.recv_timeout(OPEN_WAIT) {
            Ok(c) => Ok(c),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "no answer to opening a connection within {}",
                humantime::format_duration(OPEN_WAIT)
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(self
                .lock()
                .map(|s| s.last_error.clone())
                .unwrap_or_else(|e| e)),
        }
    }

    /// An open ended: its connection goes to the call that asked (or, gone, to the
    /// idle ones); its failure sets the backoff.
    fn opened(&self, opened: Result<Connect, virt::error::Error>, tx: mpsc::SyncSender<Connect>) {
        // A connection no one keeps is closed after the lock is let go: closing a live
        // one asks libvirt.
        let mut surplus = None;
        if let Ok(mut s) = self.state.lock() {
            s.opening = None;
            match opened {
                Ok(c) => {
                    s.failures = 0;
                    s.backoff_until = None;
                    s.last_error.clear();
                    if let Err(mpsc::TrySendError::Disconnected(c) | mpsc::TrySendError::Full(c)) =
                        tx.try_send(c)
                    {
                        if s.idle.len() < IDLE_MAX {
                            s.idle.push(c);
                        } else {
                            surplus = Some(c);
                        }
                    }
                }
                Err(e) => {
                    s.failures = s.failures.saturating_add(1);
                    let backoff = BACKOFF_FIRST
                        .saturating_mul(1 << (s.failures - 1).min(8))
                        .min(BACKOFF_MAX);
                    s.backoff_until = Some(Instant::now() + backoff);
                    s.last_error = e.message().to_owned();
                }
            }
        }
        self.opened.notify_all();
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
        drop(surplus);
    }

    fn forget_idle(&self) {
        let idle = self
            .state
            .lock()
            .map(|mut s| std::mem::take(&mut s.idle))
            .unwrap_or_default();
        drop(idle);
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
    fn a_failed_open_backs_off_calls_but_not_the_prober() {
        let pool = Pool::new("vizor-no-such-driver:///");
        let first = pool.take(false).unwrap_err();
        assert!(!first.contains("not tried again"), "{first}");
        // Within the backoff: at once, with the last error.
        let again = pool.take(false).unwrap_err();
        assert!(again.starts_with(&first), "{again}");
        assert!(again.contains("not tried again"), "{again}");
        // The prober tries anyway, and its failure doubles the backoff.
        let probe = pool.take(true).unwrap_err();
        assert!(!probe.contains("not tried again"), "{probe}");
        let s = pool.0.state.lock().unwrap();
        assert_eq!(s.failures, 2);
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
        for _ in 0..10 {
            pool.take(true).unwrap_err();
            let s = pool.0.state.lock().unwrap();
            last = s.backoff_until.unwrap() - Instant::now();
            assert!(last <= BACKOFF_MAX, "{last:?}");
        }
        assert!(last > BACKOFF_MAX / 2, "{last:?}");
    }
}
