//! What replicas of vizor share, through Redis (`[state]`): that a token is admitted
//! once across all of them (here), the session limits counted across them with leases
//! and the list of every replica's sessions ([`slots`]), and an administrator's end
//! of a session another replica holds ([`ends`]). docs/fleet-design.md has the plan.
//!
//! Each process has a mark, `{replica}/{random}`, new at every start: what it writes
//! is told apart from what an earlier process of the same replica wrote.
//!
//! The client is redis-rs's `ConnectionManager`: one multiplexed connection, opened
//! lazily and reopened by itself when it drops. Every operation is bounded by
//! `[state] timeout`; a Redis that does not answer makes the state unavailable, and
//! vizor then refuses what needs it (fail closed) until it answers again.

use crate::config::StateConfig;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;
use zeroize::Zeroizing;

pub mod ends;
pub mod slots;

pub use ends::{EndAnswer, EndAsked, EndHandler, EndReply, END_WAIT};
pub use slots::{Begin, Bounds, Hit, Lease};

/// Every operation on the shared state, as `vizor_state_seconds{op}` names them.
pub const OPS: [&str; 10] = [
    "spend",
    "ping",
    "begin",
    "namesakes",
    "take_slot",
    "renew",
    "give_back",
    "list",
    "ask_end",
    "answer_end",
];

/// The shared state of a replica.
pub struct Shared {
    /// The runtime every request to Redis runs on (one thread of its own): its answers
    /// are read, and its timeouts measured, there, so a replica busy with a burst of
    /// sessions starting does not take its own slowness for Redis's.
    rt: tokio::runtime::Handle,
    /// Dropped with this, it ends the state runtime's thread.
    _stop: tokio::sync::oneshot::Sender<()>,
    client: redis::Client,
    manager: redis::aio::ConnectionManagerConfig,
    /// The connection, replaced by a new one when Redis answers with an error that
    /// the manager does not reconnect on (a refused password, a read-only replica).
    conn: std::sync::Mutex<redis::aio::ConnectionManager>,
    prefix: String,
    replica: String,
    /// What this process writes as a spend's value: its own is recognised on a retry
    /// whose first try Redis took but did not answer in time.
    mark: String,
    timeout: Duration,
    /// How long a slot and a registry entry last unrenewed (`[state] lease`).
    lease: Duration,
    /// The slots this replica holds across replicas, by member.
    leases: Mutex<HashMap<String, slots::Held>>,
    /// Wakes the renewal early: a new session's entry is listed soon after it starts.
    poke: tokio::sync::Notify,
    /// Ends this replica asked others for, by request id, waiting for the answer.
    asked: Mutex<HashMap<String, tokio::sync::oneshot::Sender<EndAnswer>>>,
    /// Whether this process is subscribed (and so hears answers to what it asks).
    listening: tokio::sync::watch::Sender<bool>,
    /// The end requests handled lately, by id, with when (Unix seconds): one replayed
    /// is not handled twice.
    seen: Mutex<HashMap<String, u64>>,
    /// When a message nobody signed was last warned of (Unix seconds): at most one
    /// warning per [`ends::WARN_EVERY`], however many come.
    warned: std::sync::atomic::AtomicU64,
    /// Ends asked of this replica being handled now, at most [`ends::HANDLING`].
    handling: std::sync::Arc<tokio::sync::Semaphore>,
    /// The key messages between replicas are signed with (derived from the token key
    /// they share): only a replica can ask another to end a session.
    sign_key: Zeroizing<[u8; 32]>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("replica", &self.replica)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// How long a spent token's key outlives the token: the clock difference between
/// replicas that a token's lifetime check allows (`token::MAX_LIFETIME`'s margin).
const CLOCK_MARGIN_SECS: u64 = 300;

/// The state could not be reached or answered wrongly (the error says which).
#[derive(Debug, thiserror::Error)]
#[error("the shared state (Redis) is unavailable: {0}")]
pub struct Unavailable(String);

impl Shared {
    /// A replica's shared state as `[state]` says; nothing is connected yet.
    pub fn open(
        cfg: &StateConfig,
        token_key: &crate::token::TokenKey,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Result<Shared, String> {
        let mut info: redis::ConnectionInfo = cfg
            .redis
            .as_str()
            .parse()
            .map_err(|e| format!("[state] redis: {e}"))?;
        if let Some(path) = &cfg.password_file {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(path)
                .map_err(|e| format!("[state] password_file {}: {e}", path.display()))?;
            if meta.mode() & 0o077 != 0 {
                return Err(format!(
                    "[state] password_file {} is readable by group or others (mode {:o}): chmod 600 it",
                    path.display(),
                    meta.mode() & 0o777
                ));
            }
            let text = Zeroizing::new(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("[state] password_file {}: {e}", path.display()))?,
            );
            // The first line, as written (but its line end).
            let password = text.lines().next().unwrap_or("");
            if password.is_empty() {
                return Err(format!("[state] password_file {} is empty", path.display()));
            }
            let redis_info = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(redis_info);
        }
        // A connection that dies without a word (a NAT's timeout, a host gone) is
        // noticed within about 25 s, so the subscription for ends is made anew.
        let keepalive = redis::io::tcp::socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(10))
            .with_interval(Duration::from_secs(5))
            .with_retries(3);
        info = info.set_tcp_settings(
            redis::io::tcp::TcpSettings::default()
                .set_nodelay(true)
                .set_keepalive(keepalive)
                .set_user_timeout(Duration::from_secs(25)),
        );
        let client = if cfg.redis.starts_with("rediss://") {
            crate::tls::check_redis_tls(
                cfg.ca.as_deref(),
                cfg.client_cert.as_deref().zip(cfg.client_key.as_deref()),
            )?;
            let read = |key: &str, path: &std::path::Path| {
                std::fs::read(path).map_err(|e| format!("[state] {key} {}: {e}", path.display()))
            };
            let root_cert = cfg.ca.as_deref().map(|p| read("ca", p)).transpose()?;
            let client_tls = match (&cfg.client_cert, &cfg.client_key) {
                // The key's mode was checked with the rest, just above.
                (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                    client_cert: read("client_cert", cert)?,
                    client_key: read("client_key", key)?,
                }),
                _ => None,
            };
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls,
                    root_cert,
                },
            )
            .map_err(|e| format!("[state] redis (TLS): {e}"))?
        } else {
            redis::Client::open(info).map_err(|e| format!("[state] redis: {e}"))?
        };
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let (rt, stop) = state_runtime()?;
        // Made on the state runtime: what the manager spawns (its watch for a server's
        // disconnect notice, and the reconnects it starts) runs there too.
        let conn = {
            let _on = rt.enter();
            redis::aio::ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                .map_err(|e| format!("[state] redis: {e}"))?
        };
        let mut mark = [0u8; 8];
        getrandom::getrandom(&mut mark).map_err(|e| format!("[state]: no randomness: {e}"))?;
        let replica = cfg.replica.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| crate::config::is_replica_name(h))
                .unwrap_or_else(|| "vizor".into())
        });
        let mark = format!("{replica}/{}", crate::audit::chain::hex(&mark));
        Ok(Shared {
            rt,
            _stop: stop,
            client,
            manager: config,
            conn: std::sync::Mutex::new(conn),
            prefix: cfg.prefix.clone(),
            mark,
            replica,
            timeout: cfg.timeout,
            lease: cfg.lease,
            leases: Mutex::default(),
            poke: tokio::sync::Notify::new(),
            asked: Mutex::default(),
            listening: tokio::sync::watch::Sender::new(false),
            seen: Mutex::default(),
            warned: std::sync::atomic::AtomicU64::new(0),
            handling: std::sync::Arc::new(tokio::sync::Semaphore::new(ends::HANDLING)),
            sign_key: token_key.derive(b"vizor replicas' messages"),
            metrics,
        })
    }

    /// This replica's name.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Spends the token of `nonce` for this replica, until it expires (`expires_at`,
    /// `now`: Unix seconds) and a clock margin after: `true` when no replica had (or
    /// this process had, on a try whose answer was lost), `false` when another had.
    /// (`SET NX GET`: Redis 7.0 or later.)
    pub async fn spend(
        &self,
        nonce: &[u8],
        expires_at: u64,
        now: u64,
    ) -> Result<bool, Unavailable> {
        let hex = crate::audit::chain::hex(nonce);
        let key = format!("{}:used:{hex}", self.prefix);
        let secs = expires_at.saturating_sub(now).max(1) + CLOCK_MARGIN_SECS;
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key)
            .arg(&self.mark)
            .arg("NX")
            .arg("GET")
            .arg("EX")
            .arg(secs);
        let before: Option<String> = self
            .run(
                "spend",
                |mut c| async move { cmd.query_async(&mut c).await },
            )
            .await?;
        Ok(before.is_none_or(|v| v == self.mark))
    }

    /// Asks Redis whether it answers (at start, for the log and the metric, and
    /// while no slot is renewed).
    pub async fn ping(&self) -> Result<(), Unavailable> {
        let cmd = redis::cmd("PING");
        let pong: String = self
            .run("ping", |mut c| async move { cmd.query_async(&mut c).await })
            .await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(Unavailable(format!("PING answered {pong:?}")))
        }
    }

    async fn run<T, F, Fut>(&self, op: &'static str, query: F) -> Result<T, Unavailable>
    where
        F: FnOnce(redis::aio::ConnectionManager) -> Fut + Send + 'static,
        Fut: Future<Output = redis::RedisResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        let Ok(conn) = self.conn.lock().map(|c| c.clone()) else {
            return Err(Unavailable("its connection's lock is poisoned".into()));
        };
        // On the state runtime: the request is written, its answer read and the
        // timeout counted there, whatever this runtime is busy with.
        // A caller that gives up (its session gone) takes its request with it if it
        // was not sent yet; one already sent goes before the guard's give-back on the
        // same connection (a reconnect between the two could leave a slot held for a
        // lease at most).
        let timeout = self.timeout;
        let asked = AbortOnDrop(self.rt.spawn(async move {
            let started = std::time::Instant::now();
            let r = tokio::time::timeout(timeout, query(conn)).await;
            (r, started.elapsed())
        }));
        // A backstop: the state runtime answers within its own timeout.
        let (r, took) = match tokio::time::timeout(timeout * 2, asked).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => (
                Ok(Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "the request's task failed",
                    e.to_string(),
                )))),
                timeout,
            ),
            Err(elapsed) => (Err(elapsed), timeout * 2),
        };
        if let Ok(Err(e)) = &r {
            // The manager reconnects on a dropped connection only: a refused password
            // or a primary turned replica (READONLY after a failover) gets a new one.
            // (Nor on a TLS connection that could not be set up: made anew, the next
            // try reads the certificates again.)
            let stale = matches!(
                e.kind(),
                redis::ErrorKind::AuthenticationFailed
                    | redis::ErrorKind::Client
                    | redis::ErrorKind::InvalidClientConfig
            ) || matches!(e.code(), Some("READONLY" | "NOAUTH" | "WRONGPASS"));
            if stale {
                self.renew();
            }
        }
        self.metrics
            .state_seconds
            .with_label_values(&[op])
            .observe(took.as_secs_f64());
        let r = match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Unavailable(e.to_string())),
            Err(_) => Err(Unavailable(format!(
                "no answer within {}",
                humantime::format_duration(self.timeout)
            ))),
        };
        self.metrics.state_up.set(i64::from(r.is_ok()));
        if r.is_err() {
            self.metrics
                .state_errors_total
                .with_label_values(&[op])
                .inc();
        }
        r
    }

    fn renew(&self) {
        let _on = self.rt.enter();
        match redis::aio::ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            self.manager.clone(),
        ) {
            Ok(fresh) => {
                if let Ok(mut c) = self.conn.lock() {
                    *c = fresh;
                }
            }
            Err(e) => tracing::debug!(error = %e, "shared state: no new connection"),
        }
    }
}

/// A runtime of its own for the requests to Redis, on a thread named `vizor-state`
/// that runs until the sender returned is dropped.
fn state_runtime() -> Result<(tokio::runtime::Handle, tokio::sync::oneshot::Sender<()>), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("[state]: no runtime for Redis: {e}"))?;
    let handle = rt.handle().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("vizor-state".into())
        .spawn(move || {
            let _ = rt.block_on(stopped);
        })
        .map_err(|e| format!("[state]: no thread for Redis: {e}"))?;
    Ok((handle, stop))
}

/// A task aborted when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

fn lease_ms(lease: Duration) -> u64 {
    u64::try_from(lease.as_millis()).unwrap_or(u64::MAX)
}

/// `step`, within `timeout`.
async fn bounded<T>(
    timeout: Duration,
    what: &str,
    step: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, Unavailable> {
    match tokio::time::timeout(timeout, step).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Unavailable(format!("{what}: {e}"))),
        Err(_) => Err(Unavailable(format!("{what}: no answer in time"))),
    }
}
