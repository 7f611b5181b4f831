//! What replicas of vizor share, through Redis (`[state]`): for now, that a token is
//! admitted once across all of them (docs/fleet-design.md has the rest of the plan).
//!
//! The client is redis-rs's `ConnectionManager`: one multiplexed connection, opened
//! lazily and reopened by itself when it drops. Every operation is bounded by
//! `[state] timeout`; a Redis that does not answer makes the state unavailable, and
//! vizor then refuses what needs it (fail closed) until it answers again.

use crate::config::StateConfig;
use std::time::Duration;
use zeroize::Zeroizing;

/// The shared state of a replica.
pub struct Shared {
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
    metrics: std::sync::Arc<crate::metrics::Metrics>,
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
        let client = redis::Client::open(info).map_err(|e| format!("[state] redis: {e}"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn =
            redis::aio::ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                .map_err(|e| format!("[state] redis: {e}"))?;
        let mut mark = [0u8; 8];
        getrandom::getrandom(&mut mark).map_err(|e| format!("[state]: no randomness: {e}"))?;
        let replica = cfg.replica.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "vizor".into())
        });
        let mark = format!(
            "{replica}/{}",
            mark.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        Ok(Shared {
            client,
            manager: config,
            conn: std::sync::Mutex::new(conn),
            prefix: cfg.prefix.clone(),
            mark,
            replica,
            timeout: cfg.timeout,
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
        let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
        let key = format!("{}:used:{hex}", self.prefix);
        let secs = expires_at.saturating_sub(now).max(1) + CLOCK_MARGIN_SECS;
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key)
            .arg(&self.mark)
            .arg("NX")
            .arg("GET")
            .arg("EX")
            .arg(secs);
        let before: Option<String> = self.run("spend", &cmd).await?;
        Ok(before.is_none_or(|v| v == self.mark))
    }

    /// Asks Redis whether it answers (at start, for the log and the metric).
    pub async fn ping(&self) -> Result<(), Unavailable> {
        let pong: String = self.run("ping", &redis::cmd("PING")).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(Unavailable(format!("PING answered {pong:?}")))
        }
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, Unavailable> {
        let started = std::time::Instant::now();
        let Ok(mut conn) = self.conn.lock().map(|c| c.clone()) else {
            return Err(Unavailable("its connection's lock is poisoned".into()));
        };
        let r = tokio::time::timeout(self.timeout, cmd.query_async::<T>(&mut conn)).await;
        if let Ok(Err(e)) = &r {
            // The manager reconnects on a dropped connection only: anything else
            // (a refused password, READONLY after a failover) gets a new one.
            if !e.is_io_error() && !e.is_timeout() {
                self.renew();
            }
        }
        self.metrics
            .state_seconds
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
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
