//! Live sessions: what `GET /api/v1/sessions` lists, and what the opt-in per-session
//! Prometheus series (`[metrics] per_session`) export.
//!
//! A session is one console: a VNC WebSocket, or every channel of one SPICE session
//! (they share the main channel's session id, as in the audit log). An entry exists
//! while at least one of its relays runs, so nothing outlives its session. Everything
//! kept per session is bounded: bytes, a 10-second rate ring and, once a quantity is
//! first observed, a one-minute latency window of fixed size.

use crate::token::{ConsoleKind, Role};
use prometheus::core::{Collector, Desc};
use prometheus::{GaugeVec, IntCounterVec, IntGauge, Opts};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

/// The most participants (operators and observers) one session takes besides its
/// owner: each is its own connection to QEMU, encoded on QEMU's one VNC worker thread.
pub const MAX_PARTICIPANTS: usize = 8;

/// Where a live session stands, for every connection in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Relaying.
    Live,
    /// An administrator ended it.
    Terminated {
        /// Who, as the management API knows them.
        by: String,
        /// Why, in their words.
        reason: String,
    },
    /// Its owner's connection ended: the participants' end with it.
    OwnerLeft,
}

/// Someone on a live session besides its owner.
#[derive(Debug, Clone)]
pub struct Member {
    /// The participant's connection: its own session id in the audit log.
    pub session: u64,
    /// Who.
    pub user: String,
    /// Operator or observer.
    pub role: Role,
    /// The browser's address.
    pub client: SocketAddr,
    /// Their token's id.
    pub token_id: String,
    /// When they joined.
    pub since: SystemTime,
    /// Whether the others are told they are there (always, for now: unannounced
    /// watching is not built yet).
    pub announced: bool,
}

/// Why a participant cannot join a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// No live session has that id and owner.
    #[error("the session is not live (it ended, or never started here)")]
    NotLive,
    /// The session is ending.
    #[error("the session is ending")]
    Ending,
    /// [`MAX_PARTICIPANTS`] are on it.
    #[error("the session has {MAX_PARTICIPANTS} participants already")]
    Full,
}

impl JoinError {
    /// Every join error.
    pub const ALL: [JoinError; 3] = [JoinError::NotLive, JoinError::Ending, JoinError::Full];

    /// A stable label, for metrics and audit records.
    pub fn label(self) -> &'static str {
        match self {
            JoinError::NotLive => "session_not_live",
            JoinError::Ending => "session_ending",
            JoinError::Full => "session_full",
        }
    }
}

/// Which way bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the browser to the VM.
    BrowserToVm = 0,
    /// From the VM to the browser.
    VmToBrowser = 1,
}

impl Direction {
    /// The label used in metrics and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::BrowserToVm => "browser_to_vm",
            Direction::VmToBrowser => "vm_to_browser",
        }
    }
}

/// A latency measured per session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latency {
    /// RFB: update request to the update relayed; SPICE: main channel ping to pong.
    Frame = 0,
    /// RFB: key or pointer event to the next update relayed.
    InputToDisplay = 1,
    /// WebSocket ping to pong with the browser.
    ClientRtt = 2,
}

impl Latency {
    const ALL: [Latency; 3] = [Latency::Frame, Latency::InputToDisplay, Latency::ClientRtt];

    fn name(self) -> &'static str {
        match self {
            Latency::Frame => "frame_latency",
            Latency::InputToDisplay => "input_to_display",
            Latency::ClientRtt => "client_rtt",
        }
    }
}

/// Seconds in the rate ring: rates are averaged over this long.
const RATE_SECONDS: u64 = 10;
/// The latency window: six slots of ten seconds make the last minute.
const WINDOW_SLOTS: usize = 6;
const SLOT_SECONDS: u64 = 10;
/// Log-scale buckets, four per doubling, from 10 µs: a quantile is reported as the
/// geometric middle of its bucket, within 9% of the true value, up to 10 s.
const BUCKETS: usize = 80;
const BUCKET_MIN: f64 = 10e-6;
const BUCKETS_PER_DOUBLING: f64 = 4.0;

/// Latency samples of the last minute, in fixed memory.
struct Window {
    slots: [(u64, [u32; BUCKETS]); WINDOW_SLOTS],
}

impl Window {
    fn new() -> Box<Window> {
        Box::new(Window {
            slots: [(u64::MAX, [0; BUCKETS]); WINDOW_SLOTS],
        })
    }

    fn bucket(seconds: f64) -> usize {
        if seconds.is_nan() || seconds <= BUCKET_MIN {
            return 0;
        }
        let i = ((seconds / BUCKET_MIN).log2() * BUCKETS_PER_DOUBLING).floor();
        (i as usize).min(BUCKETS - 1)
    }

    fn observe(&mut self, slot: u64, seconds: f64) {
        let s = &mut self.slots[(slot % WINDOW_SLOTS as u64) as usize];
        if s.0 != slot {
            *s = (slot, [0; BUCKETS]);
        }
        let b = &mut s.1[Self::bucket(seconds)];
        *b = b.saturating_add(1);
    }

    /// The samples of the current slot and the five before it.
    fn counts(&self, slot: u64) -> [u64; BUCKETS] {
        let mut sum = [0u64; BUCKETS];
        for (at, counts) in &self.slots {
            if *at <= slot && slot - *at < WINDOW_SLOTS as u64 {
                for (s, c) in sum.iter_mut().zip(counts) {
                    *s += u64::from(*c);
                }
            }
        }
        sum
    }
}

/// Quantiles of one minute of samples, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantiles {
    /// Samples in the window.
    pub samples: u64,
    /// The median.
    pub p50: f64,
    /// The 99th percentile.
    pub p99: f64,
}

fn quantile(counts: &[u64; BUCKETS], total: u64, q: f64) -> f64 {
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    let mut bucket = BUCKETS - 1;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            bucket = i;
            break;
        }
    }
    BUCKET_MIN * ((bucket as f64 + 0.5) / BUCKETS_PER_DOUBLING).exp2()
}

/// What changes while a session runs.
struct Stats {
    bytes: [u64; 2],
    /// Bytes per second of session time, for the last [`RATE_SECONDS`].
    rate: [(u64, [u64; 2]); RATE_SECONDS as usize],
    latency: [Option<Box<Window>>; 3],
    channels: Vec<String>,
}

/// One live session.
pub struct Live {
    /// The session id, as in the audit log.
    pub id: u64,
    /// VNC or SPICE.
    pub kind: ConsoleKind,
    /// The token's user.
    pub user: String,
    /// The domain's name.
    pub domain: String,
    /// The domain's UUID.
    pub uuid: String,
    /// The libvirt host it runs on.
    pub host: String,
    /// The token's id (never the token).
    pub token_id: String,
    /// The browser's address.
    pub client: SocketAddr,
    /// When the session started, for people.
    pub started: SystemTime,
    clock: Instant,
    stats: Mutex<Stats>,
    members: Mutex<Vec<Member>>,
    /// Counts changes to `members`, for whoever shows who is on the session.
    roster: watch::Sender<u64>,
    state: watch::Sender<State>,
    /// The input of everyone on the session (owner and operators): the owner's
    /// connection ends when it has seen none for `[limits] idle_timeout`.
    pub idle: crate::limits::Idle,
    /// Where each connection that can type takes pastes, by its session id.
    seats: Mutex<std::collections::HashMap<u64, crate::paste::Seat>>,
    /// Since when the owner's browser connection is lost and the session waits for
    /// its page to resume it.
    parked: Mutex<Option<SystemTime>>,
}

/// A connection's paste seat, on its session while held.
pub struct Seated<'a> {
    live: &'a Live,
    session: u64,
}

impl Drop for Seated<'_> {
    fn drop(&mut self) {
        if let Ok(mut seats) = self.live.seats.lock() {
            seats.remove(&self.session);
        }
    }
}

/// A snapshot of a session, as the API shows it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Bytes each way since the start, by [`Direction`].
    pub bytes: [u64; 2],
    /// Bytes per second each way over the last 10 s.
    pub rate: [f64; 2],
    /// One minute of each [`Latency`], if any was observed.
    pub latency: [Option<Quantiles>; 3],
    /// SPICE: the channels relaying now ("main:0", "display:0", ...).
    pub channels: Vec<String>,
}

impl Live {
    /// Ends the session for every connection in it: `false` when it was ending
    /// already.
    pub fn terminate(&self, by: &str, reason: &str) -> bool {
        self.state.send_if_modified(|s| {
            if *s != State::Live {
                return false;
            }
            *s = State::Terminated {
                by: by.to_owned(),
                reason: reason.to_owned(),
            };
            true
        })
    }

    /// Where the session stands, and changes to it.
    pub fn state(&self) -> watch::Receiver<State> {
        self.state.subscribe()
    }

    /// How long the session has been live.
    pub fn age(&self) -> Duration {
        self.clock.elapsed()
    }

    /// Whether one more participant can join now.
    pub fn has_room(&self) -> Result<(), JoinError> {
        if *self.state.borrow() != State::Live {
            return Err(JoinError::Ending);
        }
        match self.members.lock() {
            Ok(m) if m.len() < MAX_PARTICIPANTS => Ok(()),
            Ok(_) => Err(JoinError::Full),
            Err(_) => Err(JoinError::NotLive),
        }
    }

    /// Changes to who is on the session.
    pub fn roster(&self) -> watch::Receiver<u64> {
        self.roster.subscribe()
    }

    /// Seats the connection of audit session `session` for pastes while the guard is
    /// held.
    pub fn seat(&self, session: u64, seat: crate::paste::Seat) -> Seated<'_> {
        if let Ok(mut seats) = self.seats.lock() {
            seats.insert(session, seat);
        }
        // Presence streams opened before it look again.
        self.roster.send_modify(|n| *n += 1);
        Seated {
            live: self,
            session,
        }
    }

    /// The owner's connection was lost at `since` (`None`: it is back, or a new one).
    pub fn set_parked(&self, since: Option<SystemTime>) {
        if let Ok(mut p) = self.parked.lock() {
            *p = since;
        }
    }

    /// Since when the session waits for its page to resume it, if it does.
    pub fn parked_since(&self) -> Option<SystemTime> {
        self.parked.lock().ok().and_then(|p| *p)
    }

    /// The paste seat of the connection of audit session `session`, while it types.
    pub fn seat_of(&self, session: u64) -> Option<crate::paste::Seat> {
        self.seats.lock().ok()?.get(&session).cloned()
    }

    /// The participants besides the owner, in the order they joined.
    pub fn members(&self) -> Vec<Member> {
        self.members.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Puts a participant on the session while the guard is held.
    pub fn join(self: &Arc<Self>, member: Member) -> Result<Joined, JoinError> {
        if *self.state.borrow() != State::Live {
            return Err(JoinError::Ending);
        }
        let mut members = self.members.lock().map_err(|_| JoinError::NotLive)?;
        if members.len() >= MAX_PARTICIPANTS {
            return Err(JoinError::Full);
        }
        let (session, announced) = (member.session, member.announced);
        members.push(member);
        drop(members);
        self.roster.send_modify(|n| *n += 1);
        Ok(Joined {
            live: self.clone(),
            session,
            announced,
        })
    }

    fn stats(&self) -> Option<MutexGuard<'_, Stats>> {
        self.stats.lock().ok()
    }

    fn now(&self) -> Duration {
        self.clock.elapsed()
    }

    /// Counts relayed bytes.
    pub fn bytes(&self, dir: Direction, n: u64) {
        let second = self.now().as_secs();
        if let Some(mut s) = self.stats() {
            let d = dir as usize;
            s.bytes[d] += n;
            let slot = &mut s.rate[(second % RATE_SECONDS) as usize];
            if slot.0 != second {
                *slot = (second, [0; 2]);
            }
            slot.1[d] += n;
        }
    }

    /// Records a latency sample.
    pub fn observe(&self, what: Latency, d: Duration) {
        let slot = self.now().as_secs() / SLOT_SECONDS;
        if let Some(mut s) = self.stats() {
            s.latency[what as usize]
                .get_or_insert_with(Window::new)
                .observe(slot, d.as_secs_f64());
        }
    }

    /// The session now.
    pub fn snapshot(&self) -> Snapshot {
        let now = self.now();
        let second = now.as_secs();
        let slot = second / SLOT_SECONDS;
        let Some(s) = self.stats() else {
            return Snapshot {
                bytes: [0; 2],
                rate: [0.0; 2],
                latency: [None; 3],
                channels: Vec::new(),
            };
        };
        let mut recent = [0u64; 2];
        for (at, bytes) in &s.rate {
            if *at <= second && second - *at < RATE_SECONDS {
                recent[0] += bytes[0];
                recent[1] += bytes[1];
            }
        }
        // A young session is averaged over its life, not over ten seconds.
        let span = now.as_secs_f64().clamp(1.0, RATE_SECONDS as f64);
        let latency = Latency::ALL.map(|l| {
            let w = s.latency[l as usize].as_ref()?;
            let counts = w.counts(slot);
            let samples: u64 = counts.iter().sum();
            (samples > 0).then(|| Quantiles {
                samples,
                p50: quantile(&counts, samples, 0.5),
                p99: quantile(&counts, samples, 0.99),
            })
        });
        Snapshot {
            bytes: s.bytes,
            rate: recent.map(|b| b as f64 / span),
            latency,
            channels: s.channels.clone(),
        }
    }
}

/// A participant's place on a session: it leaves when this goes.
pub struct Joined {
    live: Arc<Live>,
    session: u64,
    announced: bool,
}

impl Joined {
    /// The session joined.
    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    /// Whether the others are told about this participant.
    pub fn announced(&self) -> bool {
        self.announced
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        if let Ok(mut m) = self.live.members.lock() {
            m.retain(|x| x.session != self.session);
        }
        self.live.roster.send_modify(|n| *n += 1);
    }
}

/// A relay's hold on its session's entry: the entry goes when the last hold does,
/// and with it every participant's connection.
pub struct Hold {
    registry: Arc<LiveSessions>,
    live: Arc<Live>,
    channel: Option<String>,
}

impl Hold {
    /// The session.
    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut map = self.registry.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut s) = self.live.stats() {
            if let Some(c) = &self.channel {
                if let Some(i) = s.channels.iter().position(|x| x == c) {
                    s.channels.remove(i);
                }
            }
        }
        let holds = map
            .get_mut(&self.live.id)
            .map(|(_, n)| {
                *n -= 1;
                *n
            })
            .unwrap_or(0);
        if holds == 0 {
            map.remove(&self.live.id);
            self.live.state.send_if_modified(|s| {
                let live = *s == State::Live;
                if live {
                    *s = State::OwnerLeft;
                }
                live
            });
        }
    }
}

/// Who a session is, for [`LiveSessions::hold`].
pub struct Identity<'a> {
    /// The session id.
    pub id: u64,
    /// VNC or SPICE.
    pub kind: ConsoleKind,
    /// The token's user.
    pub user: &'a str,
    /// The domain's name.
    pub domain: &'a str,
    /// The domain's UUID.
    pub uuid: &'a str,
    /// The libvirt host it runs on.
    pub host: &'a str,
    /// The token's id.
    pub token_id: &'a str,
    /// The browser's address.
    pub client: SocketAddr,
}

/// Every live session, by id.
#[derive(Default)]
pub struct LiveSessions {
    map: Mutex<BTreeMap<u64, (Arc<Live>, usize)>>,
}

impl LiveSessions {
    /// Enters a relay into its session, creating the session on its first relay.
    /// `channel` names a SPICE channel.
    pub fn hold(self: &Arc<Self>, who: Identity<'_>, channel: Option<String>) -> Hold {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let (live, holds) = map.entry(who.id).or_insert_with(|| {
            let live = Live {
                id: who.id,
                kind: who.kind,
                user: who.user.to_owned(),
                domain: who.domain.to_owned(),
                uuid: who.uuid.to_owned(),
                host: who.host.to_owned(),
                token_id: who.token_id.to_owned(),
                client: who.client,
                started: SystemTime::now(),
                clock: Instant::now(),
                stats: Mutex::new(Stats {
                    bytes: [0; 2],
                    rate: [(u64::MAX, [0; 2]); RATE_SECONDS as usize],
                    latency: [None, None, None],
                    channels: Vec::new(),
                }),
                members: Mutex::new(Vec::new()),
                roster: watch::channel(0).0,
                state: watch::channel(State::Live).0,
                idle: crate::limits::Idle::default(),
                seats: Mutex::new(std::collections::HashMap::new()),
                parked: Mutex::new(None),
            };
            (Arc::new(live), 0)
        });
        *holds += 1;
        if let (Some(c), Some(mut s)) = (&channel, live.stats()) {
            s.channels.push(c.clone());
        }
        Hold {
            registry: self.clone(),
            live: live.clone(),
            channel,
        }
    }

    /// The live session `id`.
    pub fn get(&self, id: u64) -> Option<Arc<Live>> {
        self.map
            .lock()
            .ok()
            .and_then(|m| m.get(&id).map(|(l, _)| l.clone()))
    }

    /// The live session `id` whose owner's token is `owner`, for a participant to join.
    pub fn joinable(&self, id: u64, owner: &str) -> Result<Arc<Live>, JoinError> {
        match self.get(id) {
            Some(l) if l.token_id == owner => Ok(l),
            _ => Err(JoinError::NotLive),
        }
    }

    /// The live sessions, oldest first.
    pub fn list(&self) -> Vec<Arc<Live>> {
        self.map
            .lock()
            .map(|m| m.values().map(|(l, _)| l.clone()).collect())
            .unwrap_or_default()
    }

    /// How many sessions are live.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The opt-in per-session Prometheus series, made at each scrape from the live
/// sessions, so a session's series go when it does. At most `max` sessions (the
/// oldest) get series; `vizor_per_session_omitted` counts the rest.
pub struct PerSession {
    sessions: Arc<LiveSessions>,
    max: usize,
    descs: Vec<Desc>,
}

fn info_vec() -> prometheus::Result<GaugeVec> {
    GaugeVec::new(
        Opts::new(
            "vizor_per_session_info",
            "A live session (per_session series): always 1, labelled with who and what.",
        ),
        &["session", "kind", "domain", "user"],
    )
}

fn bytes_vec() -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(
        Opts::new(
            "vizor_per_session_bytes_total",
            "Bytes a live session relayed, by direction (per_session series).",
        ),
        &["session", "direction"],
    )
}

fn latency_vec(what: Latency) -> prometheus::Result<GaugeVec> {
    let help = match what {
        Latency::Frame => {
            "Frame latency of a live session over the last minute (per_session series)."
        }
        Latency::InputToDisplay => {
            "Input-to-display latency of a live session over the last minute (per_session series)."
        }
        Latency::ClientRtt => {
            "Browser round trip of a live session over the last minute (per_session series)."
        }
    };
    GaugeVec::new(
        Opts::new(format!("vizor_per_session_{}_seconds", what.name()), help),
        &["session", "quantile"],
    )
}

fn omitted_gauge() -> prometheus::Result<IntGauge> {
    IntGauge::new(
        "vizor_per_session_omitted",
        "Live sessions without per_session series because of [metrics] per_session_max.",
    )
}

impl PerSession {
    /// The collector for `sessions`, capped at `max` sessions.
    pub fn new(sessions: Arc<LiveSessions>, max: usize) -> prometheus::Result<PerSession> {
        let mut descs = Vec::new();
        descs.extend(info_vec()?.desc().into_iter().cloned());
        descs.extend(bytes_vec()?.desc().into_iter().cloned());
        for l in Latency::ALL {
            descs.extend(latency_vec(l)?.desc().into_iter().cloned());
        }
        descs.extend(omitted_gauge()?.desc().into_iter().cloned());
        Ok(PerSession {
            sessions,
            max,
            descs,
        })
    }

    fn gather(&self) -> prometheus::Result<Vec<prometheus::proto::MetricFamily>> {
        let info = info_vec()?;
        let bytes = bytes_vec()?;
        let latency = Latency::ALL.map(latency_vec);
        let omitted = omitted_gauge()?;
        let live = self.sessions.list();
        omitted.set(live.len().saturating_sub(self.max) as i64);
        for l in live.iter().take(self.max) {
            let id = l.id.to_string();
            info.with_label_values(&[id.as_str(), l.kind.as_str(), &l.domain, &l.user])
                .set(1.0);
            let snap = l.snapshot();
            for dir in [Direction::BrowserToVm, Direction::VmToBrowser] {
                bytes
                    .with_label_values(&[id.as_str(), dir.as_str()])
                    .inc_by(snap.bytes[dir as usize]);
            }
            for (vec, q) in latency.iter().zip(snap.latency) {
                if let (Ok(vec), Some(q)) = (vec, q) {
                    vec.with_label_values(&[id.as_str(), "0.5"]).set(q.p50);
                    vec.with_label_values(&[id.as_str(), "0.99"]).set(q.p99);
                }
            }
        }
        let mut families = info.collect();
        families.extend(bytes.collect());
        for vec in latency.into_iter().flatten() {
            families.extend(vec.collect());
        }
        families.extend(omitted.collect());
        Ok(families)
    }
}

impl Collector for PerSession {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.gather().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(id: u64) -> Identity<'static> {
        Identity {
            id,
            kind: ConsoleKind::Vnc,
            user: "alice",
            domain: "web1",
            uuid: "5a5a5a5a-5a5a-5a5a-5a5a-5a5a5a5a5a5a",
            host: "default",
            token_id: "0011223344556677",
            client: "127.0.0.1:5000".parse().unwrap(),
        }
    }

    fn member(session: u64, role: Role) -> Member {
        Member {
            session,
            user: format!("user{session}"),
            role,
            client: "127.0.0.1:6000".parse().unwrap(),
            token_id: format!("{session:016x}"),
            since: SystemTime::now(),
            announced: true,
        }
    }

    #[test]
    fn participants_join_the_owners_session_and_leave_with_it() {
        let reg = Arc::new(LiveSessions::default());
        let hold = reg.hold(who(3), None);
        assert_eq!(
            reg.joinable(3, "ffffffffffffffff").err(),
            Some(JoinError::NotLive),
            "another owner's token does not join it"
        );
        assert_eq!(
            reg.joinable(4, "0011223344556677").err(),
            Some(JoinError::NotLive)
        );
        let live = reg.joinable(3, "0011223344556677").unwrap();
        let state = live.state();
        let a = live.join(member(10, Role::Observer)).unwrap();
        let joined: Vec<Joined> = (11..11 + MAX_PARTICIPANTS as u64 - 1)
            .map(|s| live.join(member(s, Role::Operator)).unwrap())
            .collect();
        assert_eq!(
            live.join(member(99, Role::Operator)).err(),
            Some(JoinError::Full)
        );
        drop(joined);
        assert_eq!(live.members().len(), 1);
        drop(a);
        assert!(live.members().is_empty());
        let _b = live.join(member(20, Role::Observer)).unwrap();
        // The owner's last relay goes: the session goes, its participants with it.
        drop(hold);
        assert_eq!(*state.borrow(), State::OwnerLeft);
        assert!(reg.get(3).is_none());
        assert_eq!(
            live.join(member(21, Role::Observer)).err(),
            Some(JoinError::Ending)
        );
        assert!(!live.terminate("admin", "too late"), "it ended already");
    }

    #[test]
    fn an_administrator_ends_a_session_once() {
        let reg = Arc::new(LiveSessions::default());
        let hold = reg.hold(who(5), None);
        let live = hold.live().clone();
        assert!(live.terminate("ops", "maintenance"));
        assert!(!live.terminate("ops", "again"));
        let want = State::Terminated {
            by: "ops".into(),
            reason: "maintenance".into(),
        };
        assert_eq!(*live.state().borrow(), want);
        drop(hold);
        // Ended by the administrator it stays, after its owner's relay goes.
        assert_eq!(*live.state().borrow(), want);
    }

    #[test]
    fn quantiles_are_within_a_bucket_of_the_truth() {
        let mut w = Window::new();
        // 1..=1000 ms: p50 500 ms, p99 990 ms.
        for ms in 1..=1000u64 {
            w.observe(0, ms as f64 / 1000.0);
        }
        let counts = w.counts(0);
        let total: u64 = counts.iter().sum();
        assert_eq!(total, 1000);
        let p50 = quantile(&counts, total, 0.5);
        let p99 = quantile(&counts, total, 0.99);
        assert!((p50 / 0.5 - 1.0).abs() < 0.1, "p50 {p50}");
        assert!((p99 / 0.99 - 1.0).abs() < 0.1, "p99 {p99}");
        // Out of range values land in the end buckets; NaN does not panic.
        w.observe(0, 1e6);
        w.observe(0, f64::NAN);
        w.observe(0, -1.0);
        assert_eq!(w.counts(0).iter().sum::<u64>(), 1003);
    }

    #[test]
    fn the_window_forgets_samples_older_than_a_minute() {
        let mut w = Window::new();
        w.observe(0, 0.001);
        w.observe(5, 0.002);
        assert_eq!(w.counts(5).iter().sum::<u64>(), 2);
        assert_eq!(w.counts(6).iter().sum::<u64>(), 1, "slot 0 is a minute old");
        w.observe(6, 0.003);
        assert_eq!(w.counts(6).iter().sum::<u64>(), 2);
        assert_eq!(w.counts(11).iter().sum::<u64>(), 1);
    }

    #[test]
    fn a_session_lives_while_any_relay_holds_it() {
        let reg = Arc::new(LiveSessions::default());
        let main = reg.hold(who(7), Some("main:0".into()));
        let display = reg.hold(who(7), Some("display:0".into()));
        let other = reg.hold(who(8), None);
        assert_eq!(reg.len(), 2);
        main.live().bytes(Direction::VmToBrowser, 100);
        display.live().bytes(Direction::VmToBrowser, 50);
        display.live().bytes(Direction::BrowserToVm, 3);
        let snap = reg.list()[0].snapshot();
        assert_eq!(snap.bytes, [3, 150]);
        assert_eq!(snap.channels, ["main:0", "display:0"]);
        assert!(snap.rate[1] > 0.0);
        drop(main);
        assert_eq!(reg.list()[0].snapshot().channels, ["display:0"]);
        drop(display);
        assert_eq!(reg.len(), 1);
        drop(other);
        assert!(reg.is_empty());
    }

    #[test]
    fn per_session_series_are_capped_and_go_with_their_session() {
        let reg = Arc::new(LiveSessions::default());
        let r = prometheus::Registry::new();
        r.register(Box::new(PerSession::new(reg.clone(), 2).unwrap()))
            .unwrap();
        let a = reg.hold(who(1), None);
        let b = reg.hold(who(2), None);
        let c = reg.hold(who(3), None);
        a.live().bytes(Direction::BrowserToVm, 42);
        a.live().observe(Latency::Frame, Duration::from_millis(3));
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&r.gather())
            .unwrap();
        assert!(text.contains(
            "vizor_per_session_bytes_total{direction=\"browser_to_vm\",session=\"1\"} 42"
        ));
        assert!(text.contains(
            "vizor_per_session_frame_latency_seconds{quantile=\"0.5\",session=\"1\"} 0.00"
        ));
        assert!(text.contains("session=\"2\""));
        assert!(!text.contains("session=\"3\""), "over the cap");
        assert!(text.contains("vizor_per_session_omitted 1"));
        drop((a, b, c));
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&r.gather())
            .unwrap();
        assert!(!text.contains("session=\""), "{text}");
        assert!(text.contains("vizor_per_session_omitted 0"));
    }
}
