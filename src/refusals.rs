//! Refusals of unauthenticated clients (a foreign origin, a bad token, a client
//! refused unheard), aggregated: per client and interval, the first refusal is
//! recorded in detail for each reason and the rest only counted, then summed up in
//! one `refusal_summary` record. A flood of refused requests costs a few records, not one
//! each: it cannot fill the disk or crowd live sessions' records out of the audit
//! queue.

use crate::limits::ClientKey;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Clients with their own summary per interval; the rest share the `*` one.
pub const MAX_SUMMARIES: usize = 1000;

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The client's first for its reason in this interval: record it in detail, and
    /// log it.
    Detail,
    /// Counted for the interval's summary.
    Counted,
}

/// One client's refusals in one interval, beyond its detailed first one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The client (an address; IPv6: its /64), or `*` for clients beyond the tracked
    /// number.
    pub client: String,
    /// Refusals in the interval, the detailed one included.
    pub refused: u64,
    /// Those by reason, most frequent first.
    pub reasons: Vec<(&'static str, u64)>,
    /// Detailed records that could not be written (the audit queue was busy).
    pub not_recorded: u64,
}

#[derive(Debug, Default)]
struct Counts {
    refused: u64,
    reasons: Vec<(&'static str, u64)>,
    not_recorded: u64,
}

impl Counts {
    /// Counts one; whether it is the first for its reason.
    fn add(&mut self, reason: &'static str) -> bool {
        self.refused += 1;
        match self.reasons.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => {
                *n += 1;
                false
            }
            // Reasons are a small fixed set of labels: the list stays short.
            None => {
                self.reasons.push((reason, 1));
                true
            }
        }
    }

    /// Whether some refusal went unrecorded: counted only, or its record lost.
    fn unrecorded(&self) -> bool {
        self.refused > self.reasons.len() as u64 || self.not_recorded > 0
    }

    fn summary(mut self, client: String) -> Summary {
        self.reasons
            .sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        Summary {
            client,
            refused: self.refused,
            reasons: self.reasons,
            not_recorded: self.not_recorded,
        }
    }
}

struct State {
    since: Instant,
    clients: HashMap<ClientKey, Counts>,
    /// Clients beyond `max_clients`, counted together.
    others: Counts,
}

/// The refusals of the current interval.
pub struct Refusals {
    interval: Duration,
    max_clients: usize,
    state: Mutex<State>,
}

impl Refusals {
    /// Intervals of `interval`; at most `max_clients` clients counted apart.
    pub fn new(interval: Duration, max_clients: usize, now: Instant) -> Refusals {
        Refusals {
            interval,
            max_clients,
            state: Mutex::new(State {
                since: now,
                clients: HashMap::new(),
                others: Counts::default(),
            }),
        }
    }

    /// Counts a refusal of `ip` for `reason`. Returns what to do with it, and the
    /// summaries of an interval that ended before it (to be recorded first).
    pub fn refused(
        &self,
        ip: IpAddr,
        reason: &'static str,
        now: Instant,
    ) -> (Verdict, Vec<Summary>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let ended = Self::roll(&mut s, self.interval, now);
        let key = ClientKey::of(ip);
        let room = s.clients.len() < self.max_clients;
        let first = match s.clients.get_mut(&key) {
            Some(c) => c.add(reason),
            None if room => {
                let mut c = Counts::default();
                c.add(reason);
                s.clients.insert(key, c);
                true
            }
            // Clients beyond the bound count together: the first of them for each
            // reason is recorded.
            None => s.others.add(reason),
        };
        let verdict = if first {
            Verdict::Detail
        } else {
            Verdict::Counted
        };
        (verdict, ended)
    }

    /// A detailed record of `ip`'s could not be written: the summary says so. Should
    /// the interval have ended between [`Refusals::refused`] and this call, the loss
    /// is told in the next interval's summary of the same client (`refused` 0 there).
    pub fn not_recorded(&self, ip: IpAddr) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let key = ClientKey::of(ip);
        let room = s.clients.len() < self.max_clients;
        match s.clients.get_mut(&key) {
            Some(c) => c.not_recorded += 1,
            None if room => {
                let c = Counts {
                    not_recorded: 1,
                    ..Counts::default()
                };
                s.clients.insert(key, c);
            }
            None => s.others.not_recorded += 1,
        }
    }

    /// The summaries of the interval, if it has ended by `now` (a timer calls this, so
    /// a flood that stops is summed up too).
    pub fn flush(&self, now: Instant) -> Vec<Summary> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Self::roll(&mut s, self.interval, now)
    }

    /// Clients counted apart now.
    pub fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clients
            .len()
    }

    /// Ends the interval when it is over: summaries for every client with refusals
    /// not recorded in detail (counted only, or their record lost).
    fn roll(s: &mut State, interval: Duration, now: Instant) -> Vec<Summary> {
        if now.saturating_duration_since(s.since) < interval {
            return Vec::new();
        }
        s.since = now;
        let mut out: Vec<Summary> = std::mem::take(&mut s.clients)
            .into_iter()
            .filter(|(_, c)| c.unrecorded())
            .map(|(k, c)| c.summary(k.to_string()))
            .collect();
        out.sort_by(|a, b| b.refused.cmp(&a.refused).then(a.client.cmp(&b.client)));
        let mut others = std::mem::take(&mut s.others);
        // The busiest clients get their own summary; the rest are summed up together,
        // so many addresses (a /48 holds 65,536 /64s) cost a bounded burst of records.
        for rest in out.drain(out.len().min(MAX_SUMMARIES)..) {
            others.refused += rest.refused;
            others.not_recorded += rest.not_recorded;
            for (reason, n) in rest.reasons {
                match others.reasons.iter_mut().find(|(r, _)| *r == reason) {
                    Some((_, m)) => *m += n,
                    None => others.reasons.push((reason, n)),
                }
            }
        }
        if others.unrecorded() {
            out.push(others.summary("*".to_owned()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_first_refusal_is_recorded_the_rest_summed_up() {
        let t0 = Instant::now();
        let r = Refusals::new(Duration::from_secs(60), 100, t0);
        let a = ip("192.0.2.1");
        assert_eq!(
            r.refused(a, "origin_not_allowed", t0),
            (Verdict::Detail, vec![])
        );
        for _ in 0..99_999 {
            assert_eq!(r.refused(a, "origin_not_allowed", t0).0, Verdict::Counted);
        }
        // Another reason is recorded once too.
        assert_eq!(r.refused(a, "throttled", t0).0, Verdict::Detail);
        assert_eq!(r.refused(a, "throttled", t0).0, Verdict::Counted);
        // Another client has its own first record.
        assert_eq!(
            r.refused(ip("192.0.2.2"), "bad_signature", t0).0,
            Verdict::Detail
        );
        // IPv6 clients count by /64.
        assert_eq!(
            r.refused(ip("2001:db8::1"), "expired", t0).0,
            Verdict::Detail
        );
        assert_eq!(
            r.refused(ip("2001:db8::2"), "expired", t0).0,
            Verdict::Counted
        );
        assert!(r.flush(t0 + Duration::from_secs(59)).is_empty());
        let sums = r.flush(t0 + Duration::from_secs(60));
        assert_eq!(
            sums.len(),
            2,
            "one refusal alone needs no summary: {sums:?}"
        );
        assert_eq!(sums[0].client, "192.0.2.1");
        assert_eq!(sums[0].refused, 100_002);
        assert_eq!(
            sums[0].reasons,
            [("origin_not_allowed", 100_000), ("throttled", 2)]
        );
        assert_eq!(sums[1].client, "2001:db8::/64");
        // A new interval: the client's first refusal is recorded again.
        let t1 = t0 + Duration::from_secs(61);
        assert_eq!(r.refused(a, "origin_not_allowed", t1).0, Verdict::Detail);
    }

    #[test]
    fn summaries_per_interval_are_bounded() {
        let t0 = Instant::now();
        let r = Refusals::new(Duration::from_secs(10), 100_000, t0);
        for i in 0..5000u32 {
            let a = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            r.refused(a, "malformed", t0);
            r.refused(a, "malformed", t0);
        }
        let sums = r.flush(t0 + Duration::from_secs(10));
        assert_eq!(sums.len(), MAX_SUMMARIES + 1);
        let all = sums.last().unwrap();
        assert_eq!((all.client.as_str(), all.refused), ("*", 2 * 4000));
        assert_eq!(sums.iter().map(|s| s.refused).sum::<u64>(), 10_000);
    }

    #[test]
    fn an_interval_ends_at_the_next_refusal_too_and_clients_are_bounded() {
        let t0 = Instant::now();
        let r = Refusals::new(Duration::from_secs(10), 2, t0);
        for c in ["10.0.0.1", "10.0.0.2"] {
            r.refused(ip(c), "malformed", t0);
            r.refused(ip(c), "malformed", t0);
        }
        // Beyond two clients: counted together, the first of them recorded.
        assert_eq!(
            r.refused(ip("10.0.0.3"), "malformed", t0).0,
            Verdict::Detail
        );
        assert_eq!(
            r.refused(ip("10.0.0.4"), "malformed", t0).0,
            Verdict::Counted
        );
        assert_eq!(r.tracked(), 2);
        r.not_recorded(ip("10.0.0.1"));
        let (v, ended) = r.refused(ip("10.0.0.1"), "malformed", t0 + Duration::from_secs(10));
        assert_eq!(v, Verdict::Detail);
        let by: Vec<(&str, u64, u64)> = ended
            .iter()
            .map(|s| (s.client.as_str(), s.refused, s.not_recorded))
            .collect();
        assert_eq!(by, [("10.0.0.1", 2, 1), ("10.0.0.2", 2, 0), ("*", 2, 0)]);
    }

    #[test]
    fn a_record_lost_as_the_interval_ends_is_told_in_the_next() {
        let t0 = Instant::now();
        let r = Refusals::new(Duration::from_secs(10), 2, t0);
        let a = ip("10.0.0.9");
        assert_eq!(r.refused(a, "malformed", t0).0, Verdict::Detail);
        // The timer ends the interval before the record's loss is told.
        assert!(r.flush(t0 + Duration::from_secs(10)).is_empty());
        r.not_recorded(a);
        let sums = r.flush(t0 + Duration::from_secs(20));
        let by: Vec<(&str, u64, u64)> = sums
            .iter()
            .map(|s| (s.client.as_str(), s.refused, s.not_recorded))
            .collect();
        assert_eq!(by, [("10.0.0.9", 0, 1)], "not under `*`");
    }
}
