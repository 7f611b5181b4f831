//! Session slots counted across replicas, and the list of every replica's sessions.
//!
//! A slot is a member `{replica}/{random}/{session}` (the process's mark and its
//! session id) of three sorted sets: all sessions, the domain's, the user's, each
//! scored by when the member's lease runs out in Redis's own clock (replicas' clocks
//! play no part). Taking one is one script: drop the members whose lease ran out,
//! compare each count with its limit, add to all three. The replica renews its members
//! every third of a lease and gives each back when its session ends, so a replica that
//! dies holds its slots for one lease at most. The renewal also writes each session's
//! entry for `GET /api/v1/sessions` (`{prefix}:session:{member}`), which lives as long
//! as the lease; the set of all sessions is the list's index.
//!
//! A Redis that lost all its data (restarted without persistence, flushed, a new empty
//! primary) would count no sessions while the replicas still hold theirs. A key without
//! expiry, `{prefix}:slots:epoch`, says since when the count is whole: a Redis without
//! it starts one, and takes no slot for one lease, the time every live replica needs to
//! renew (and so count again) what it holds. That needs one lease for all replicas:
//! `{prefix}:slots:lease` holds it while any replica runs, and a replica with another
//! refuses to start. (A failover that lost only the last writes keeps the epoch: the
//! slots taken in them are counted again at their replica's next renewal.)
//!
//! A slot given back leaves a tombstone for a lease, so a renewal already on its way
//! with a copy of the slots held does not bring it back. Registry entries are signed
//! like the messages between replicas (`ends`): what the list shows, and the member an
//! administrator acts on, was written by a replica.

use super::{lease_ms, Shared, Unavailable};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// Why a replica's start on the shared state went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Begin {
    /// Redis did not answer (the replica starts, refusing sessions until it does).
    #[error(transparent)]
    Unavailable(Unavailable),
    /// The running replicas have another lease.
    #[error("the replicas on this Redis run with [state] lease = {}: every replica needs the same lease (the count of sessions after Redis lost its data relies on it)", humantime::format_duration(*.0))]
    OtherLease(Duration),
}

/// A slot this replica holds across replicas.
#[derive(Debug, Clone)]
pub(super) struct Held {
    session: u64,
    keys: [String; 3],
    /// Its registry entry was written (by a renewal since it was taken): a session
    /// just listed needs only its own written, not every slot renewed again.
    listed: bool,
}

/// The limits a slot is taken under: all sessions, one domain's, one user's.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// `[limits] max_sessions`.
    pub all: usize,
    /// `[limits] max_sessions_per_domain`.
    pub domain: usize,
    /// `[limits] max_sessions_per_user`.
    pub user: usize,
}

/// Which bound a slot across replicas hit: 0 all sessions, 1 the domain's, 2 the
/// user's (the order of `limits::Full::ALL`).
pub type Hit = usize;

/// A session's slot across replicas; dropping it gives the slot back (and, if that
/// fails, its lease runs out).
pub struct Lease {
    shared: Arc<Shared>,
    member: String,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("member", &self.member)
            .finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let held = self
            .shared
            .leases
            .lock()
            .ok()
            .and_then(|mut l| l.remove(&self.member));
        if let Some(held) = held {
            self.shared
                .give_back_later(std::mem::take(&mut self.member), held.keys);
        }
    }
}

/// A take on its way: if it does not finish (an error, a timeout, the session's task
/// dropped), what Redis may have added is given back rather than left for its lease.
struct Taking<'a> {
    shared: &'a Arc<Shared>,
    member: String,
    keys: Option<[String; 3]>,
}

impl Taking<'_> {
    fn settled(mut self) {
        self.keys = None;
    }
}

impl Drop for Taking<'_> {
    fn drop(&mut self) {
        if let Some(keys) = self.keys.take() {
            self.shared
                .give_back_later(std::mem::take(&mut self.member), keys);
        }
    }
}

/// Lua that sets `now`: Redis's clock in milliseconds (replicas' clocks play no
/// part), for the scripts that start with it.
macro_rules! lua_now {
    () => {
        "
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)"
    };
}

/// Takes a slot: refuses (-1) while the count is not known whole (no epoch, one
/// younger than a lease, or one ahead of Redis's clock, which went back); drops the
/// members whose lease ran out; then, unless the member is there already, refuses at
/// the first set that is full (its 1-based index) or adds the member to all three
/// (0). KEYS: the three sets, the epoch; ARGV: member, lease (ms), the three limits.
static TAKE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        lua_now!(),
        r"
local lease = tonumber(ARGV[2])
local epoch = redis.call('GET', KEYS[4])
if not epoch or now < tonumber(epoch) then
  redis.call('SET', KEYS[4], now)
  return -1
end
if now - tonumber(epoch) < lease then return -1 end
for i = 1, 3 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  if not redis.call('ZSCORE', KEYS[i], ARGV[1]) and redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[2 + i]) then
    return i
  end
end
for i = 1, 3 do
  redis.call('ZADD', KEYS[i], now + lease, ARGV[1])
  if redis.call('PTTL', KEYS[i]) < lease then redis.call('PEXPIRE', KEYS[i], lease) end
end
return 0
",
    ))
});

/// Starts the count's epoch if Redis has none (a new or emptied Redis), and the
/// replicas' lease if none runs: {1 when this call started the epoch, the replicas'
/// lease in ms}. KEYS: the epoch, the lease; ARGV: this replica's lease (ms).
static BEGIN: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        lua_now!(),
        r"
local started = 0
if redis.call('SET', KEYS[1], now, 'NX') then started = 1 end
local lease = redis.call('GET', KEYS[2])
if not lease then
  lease = ARGV[1]
  redis.call('SET', KEYS[2], lease, 'PX', 2 * tonumber(lease))
end
return {started, tonumber(lease)}
",
    ))
});

/// Renews members (but those given back: a tombstone) and writes their registry
/// entries, and the replicas' lease. KEYS: the lease, then three sets and the
/// tombstone per member; ARGV: lease (ms), registry prefix, then member and entry
/// (empty: none) per member. Returns the members that had run out (taken again, over a
/// limit perhaps).
static RENEW: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        lua_now!(),
        r"
local lease = tonumber(ARGV[1])
redis.call('SET', KEYS[1], lease, 'PX', 2 * lease)
local lapsed = {}
local n = (#ARGV - 2) / 2
for m = 0, n - 1 do
  local member = ARGV[3 + 2 * m]
  local entry = ARGV[4 + 2 * m]
  if redis.call('EXISTS', KEYS[4 * m + 5]) == 0 then
    local added = 0
    for k = 2, 4 do
      local key = KEYS[4 * m + k]
      added = added + redis.call('ZADD', key, now + lease, member)
      if redis.call('PTTL', key) < lease then redis.call('PEXPIRE', key, lease) end
    end
    if added > 0 then table.insert(lapsed, member) end
    if entry ~= '' then
      redis.call('SET', ARGV[2] .. member, entry, 'PX', lease)
    end
  end
end
return lapsed
",
    ))
});

/// Gives slots back, leaving a tombstone for a lease. KEYS: three sets, the registry
/// entry and the tombstone per member; ARGV: lease (ms), then the members.
static GIVE_BACK: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local lease = tonumber(ARGV[1])
for m = 0, #ARGV - 2 do
  local member = ARGV[m + 2]
  for k = 1, 3 do redis.call('ZREM', KEYS[5 * m + k], member) end
  redis.call('DEL', KEYS[5 * m + 4])
  redis.call('SET', KEYS[5 * m + 5], 1, 'PX', lease)
end
return 0
",
    )
});

/// Every replica's registry entries whose lease runs, as {member, entry, ...}. KEYS:
/// the set of all sessions; ARGV: registry prefix.
static LIST: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        lua_now!(),
        r"
local out = {}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')) do
  local entry = redis.call('GET', ARGV[1] .. member)
  if entry then
    table.insert(out, member)
    table.insert(out, entry)
  end
end
return out
",
    ))
});

impl Shared {
    /// The three sets a slot of `user` on `domain` is a member of.
    fn slot_keys(&self, domain: &str, user: &str) -> [String; 3] {
        let p = &self.prefix;
        [
            format!("{p}:slots:all"),
            format!("{p}:slots:domain:{domain}"),
            format!("{p}:slots:user:{user}"),
        ]
    }

    fn epoch_key(&self) -> String {
        format!("{}:slots:epoch", self.prefix)
    }

    fn lease_key(&self) -> String {
        format!("{}:slots:lease", self.prefix)
    }

    fn tombstone_key(&self, member: &str) -> String {
        format!("{}:gone:{member}", self.prefix)
    }

    fn entry_key(&self, member: &str) -> String {
        format!("{}:session:{member}", self.prefix)
    }

    /// The member a session of this process holds its slot under, and is listed and
    /// ended by.
    pub fn member(&self, session: u64) -> String {
        format!("{}/{session}", self.mark)
    }

    /// Whether `member` names a session of this process.
    pub fn is_mine(&self, member: &str) -> bool {
        member
            .strip_prefix(self.mark.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .is_some_and(|id| id.parse::<u64>().is_ok())
    }

    /// At start: starts the count's epoch if Redis has none, so that the lease a new or
    /// emptied Redis takes no slot for begins now (`true` when it did), and checks that
    /// this replica's lease is the one the running replicas have.
    pub async fn begin(&self) -> Result<bool, Begin> {
        let mut inv = BEGIN.prepare_invoke();
        inv.key(self.epoch_key())
            .key(self.lease_key())
            .arg(lease_ms(self.lease));
        let (started, lease): (i64, u64) = self
            .run(
                "begin",
                |mut c| async move { inv.invoke_async(&mut c).await },
            )
            .await
            .map_err(Begin::Unavailable)?;
        if lease != lease_ms(self.lease) {
            return Err(Begin::OtherLease(Duration::from_millis(lease)));
        }
        Ok(started == 1)
    }

    /// Takes a slot for `session` of `user` on `domain` across replicas: `Ok(Err(i))`
    /// when bound `i` is full.
    pub async fn take_slot(
        self: &Arc<Self>,
        session: u64,
        domain: &str,
        user: &str,
        bounds: Bounds,
    ) -> Result<Result<Lease, Hit>, Unavailable> {
        let member = self.member(session);
        let keys = self.slot_keys(domain, user);
        let mut inv = TAKE.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        inv.key(self.epoch_key())
            .arg(&member)
            .arg(lease_ms(self.lease))
            .arg(bounds.all)
            .arg(bounds.domain)
            .arg(bounds.user);
        let taking = Taking {
            shared: self,
            member: member.clone(),
            keys: Some(keys.clone()),
        };
        let hit: i64 = self
            .run("take_slot", |mut c| async move {
                inv.invoke_async(&mut c).await
            })
            .await?;
        taking.settled();
        match hit {
            0 => {}
            -1 => {
                return Err(Unavailable(format!(
                    "Redis is counting the replicas' sessions anew (it had lost them, or is new) for {}",
                    humantime::format_duration(self.lease)
                )))
            }
            i => return Ok(Err(usize::try_from(i - 1).unwrap_or(0))),
        }
        if let Ok(mut l) = self.leases.lock() {
            l.insert(
                member.clone(),
                Held {
                    session,
                    keys,
                    listed: false,
                },
            );
        }
        Ok(Ok(Lease {
            shared: self.clone(),
            member,
        }))
    }

    /// Lists this session soon (its live entry exists now).
    pub fn listed_soon(&self) {
        self.poke.notify_one();
    }

    /// Gives `member`'s slot back, from a task of its own (nothing if there is no
    /// runtime any more: its lease runs out).
    fn give_back_later(self: &Arc<Self>, member: String, keys: [String; 3]) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.clone();
        rt.spawn(async move {
            if let Err(e) = shared.give_back(&[(member, keys)]).await {
                tracing::debug!(error = %e, "a slot across replicas was not given back: its lease runs out");
            }
        });
    }

    async fn give_back(&self, slots: &[(String, [String; 3])]) -> Result<(), Unavailable> {
        if slots.is_empty() {
            return Ok(());
        }
        let mut inv = GIVE_BACK.prepare_invoke();
        inv.arg(lease_ms(self.lease));
        for (member, keys) in slots {
            for k in keys {
                inv.key(k);
            }
            inv.key(self.entry_key(member))
                .key(self.tombstone_key(member))
                .arg(member);
        }
        let _: i64 = self
            .run("give_back", |mut c| async move {
                inv.invoke_async(&mut c).await
            })
            .await?;
        Ok(())
    }

    /// Gives back every slot this process holds (at shutdown, once its sessions
    /// closed), within `[state] timeout`.
    pub async fn give_all_back(&self) {
        let all: Vec<(String, [String; 3])> = match self.leases.lock() {
            Ok(mut l) => l.drain().map(|(m, h)| (m, h.keys)).collect(),
            Err(_) => return,
        };
        if let Err(e) = self.give_back(&all).await {
            tracing::warn!(error = %e, slots = all.len(), "slots across replicas not given back at shutdown: they run out with their lease");
        }
    }

    /// Renews this replica's slots every third of a lease (and soon after a session
    /// is listed), writing each session's entry as `describe` gives it (`None`: not
    /// listed, such as a participant's); with none, pings. Runs until the process
    /// ends.
    pub async fn keep_leases(self: Arc<Self>, describe: impl Fn(u64) -> Option<String>) {
        let mut every = tokio::time::interval(self.lease / 3);
        // A renewal that took long (up to `[state] timeout`, a quarter of a lease at
        // most) does not push the next tick later (a tick missed altogether, the
        // process stalled, comes at once, and the next a third of a lease after it).
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A tick renews every slot; a poke writes the entries of the sessions
            // listed since (a thousand sessions starting would otherwise renew all the
            // others a thousand times, and Redis's answers to every replica would
            // queue behind that).
            let all = tokio::select! {
                biased;
                _ = every.tick() => true,
                () = self.poke.notified() => false,
            };
            if let Err(e) = self.renew_leases(&describe, all).await {
                tracing::debug!(error = %e, "slots across replicas not renewed");
            }
        }
    }

    async fn renew_leases(
        &self,
        describe: &impl Fn(u64) -> Option<String>,
        all: bool,
    ) -> Result<(), Unavailable> {
        let held: Vec<(String, Held)> = match self.leases.lock() {
            Ok(l) => l
                .iter()
                .filter(|(_, h)| all || !h.listed)
                .map(|(m, h)| (m.clone(), h.clone()))
                .collect(),
            Err(_) => return Err(Unavailable("the leases' lock is poisoned".into())),
        };
        if held.is_empty() {
            if !all {
                return Ok(());
            }
            // Nothing to renew: asked anyway, so `vizor_state_up` says how it is.
            return self.ping().await;
        }
        let mut written = Vec::new();
        let mut inv = RENEW.prepare_invoke();
        inv.key(self.lease_key())
            .arg(lease_ms(self.lease))
            .arg(self.entry_key(""));
        for (member, h) in &held {
            let entry = describe(h.session)
                .map(|e| self.seal(e))
                .unwrap_or_default();
            if entry.is_empty() {
                // A poke writes entries alone: a slot without one (a participant's,
                // a session not live yet) was just taken, and ticks renew it.
                if !all {
                    continue;
                }
            } else {
                written.push(member.clone());
            }
            for k in &h.keys {
                inv.key(k);
            }
            inv.key(self.tombstone_key(member));
            inv.arg(member).arg(entry);
        }
        if !all && written.is_empty() {
            return Ok(());
        }
        let lapsed: Vec<String> = self
            .run(
                "renew",
                |mut c| async move { inv.invoke_async(&mut c).await },
            )
            .await?;
        for member in lapsed {
            tracing::warn!(member, "a session's slot across replicas had run out (Redis did not answer for longer than a lease, or lost it): taken again, over its limits if they filled meanwhile");
        }
        if let Ok(mut l) = self.leases.lock() {
            for member in written {
                if let Some(h) = l.get_mut(&member) {
                    h.listed = true;
                }
            }
        }
        Ok(())
    }

    /// The registry entries of every replica's sessions, as written (and signed) by
    /// their replica under the member they are listed by, this process's included;
    /// any other is left out (and counted).
    pub async fn sessions(&self) -> Result<Vec<serde_json::Value>, Unavailable> {
        let mut inv = LIST.prepare_invoke();
        inv.key(format!("{}:slots:all", self.prefix))
            .arg(self.entry_key(""));
        let pairs: Vec<String> = self
            .run(
                "list",
                |mut c| async move { inv.invoke_async(&mut c).await },
            )
            .await?;
        let mut out = Vec::with_capacity(pairs.len() / 2);
        for pair in pairs.chunks_exact(2) {
            let entry = self
                .unseal(&pair[1])
                .and_then(|e| serde_json::from_str::<serde_json::Value>(&e).ok())
                .filter(|v| v["member"].as_str() == Some(pair[0].as_str()));
            match entry {
                Some(v) => out.push(v),
                None => self.unsigned(
                    "a session's list entry that no replica signed, or under another member",
                ),
            }
        }
        Ok(out)
    }
}
