//! Following a live session in the audit records as they are sealed, sans-IO: which
//! records belong to it (its own, its participants' connections, the administrators'
//! actions on it) and the text each key record types. The management API's event
//! stream and `vizor audit tail --follow` both read records through this.

use super::review::Typist;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// The most participants' connections followed at once besides the session itself;
/// more are passed over (their records are not shown).
const MAX_FOLLOWED: usize = 256;

/// What a followed record gives.
#[derive(Debug, Clone, PartialEq)]
pub enum Shown {
    /// The record, as sealed.
    Record,
    /// Text the record typed, with the connection that typed it and its user.
    Text {
        /// The connection (a session id: the session's own or a participant's).
        session: u64,
        /// Its user, when its start was seen.
        user: Option<String>,
        /// What it typed: a character, or a marker such as `<Escape>`.
        text: String,
    },
}

/// Follows one session, or every session, through a stream of records.
#[derive(Default)]
pub struct Follow {
    /// The session followed; `None`: all.
    root: Option<u64>,
    /// The participants' connections seen joining it.
    members: BTreeSet<u64>,
    /// Each connection's user and typist, from its start to its end.
    typists: BTreeMap<u64, (Option<String>, Typist)>,
    /// Runs of vizor seen (`audit_open`, or a new chain).
    runs: u64,
}

impl Follow {
    /// Follows the session `root`, or every session.
    pub fn new(root: Option<u64>) -> Follow {
        Follow {
            root,
            ..Follow::default()
        }
    }

    /// How many runs of vizor the records so far began.
    pub fn runs(&self) -> u64 {
        self.runs
    }

    /// Says that `session` is `user`'s connection, a participant's when `member`: for
    /// what started before the following did.
    pub fn knows(&mut self, session: u64, user: &str, member: bool) {
        if member && self.members.len() < MAX_FOLLOWED {
            self.members.insert(session);
        }
        if self.typists.len() <= MAX_FOLLOWED {
            self.typists
                .entry(session)
                .or_insert_with(|| (Some(user.to_owned()), Typist::default()));
        }
    }

    /// Whether `session`'s typist is kept: it is, or there is room for one more.
    fn room_for(&self, session: u64) -> bool {
        self.typists.len() <= MAX_FOLLOWED || self.typists.contains_key(&session)
    }

    fn belongs(&mut self, r: &Value) -> bool {
        // Session ids start again with each run of vizor: a new run forgets who was
        // who (a `--session` of the run that writes now).
        let new_run =
            r["event"] == "audit_open" || (r["event"] == "chain_start" && r["reason"] == "new");
        if new_run {
            self.members.clear();
            self.typists.clear();
            self.runs += 1;
        }
        let Some(root) = self.root else {
            return true;
        };
        let session = r["session"].as_u64();
        if r["event"] == "session_start" && r["joins"].as_u64() == Some(root) {
            if let Some(s) = session {
                if self.members.len() < MAX_FOLLOWED {
                    self.members.insert(s);
                } else {
                    return false;
                }
            }
            return true;
        }
        if r["joins"].as_u64() == Some(root) {
            return true;
        }
        match session {
            Some(s) => s == root || self.members.contains(&s),
            None => false,
        }
    }

    /// What the record `r` shows: nothing when it is not the followed session's; the
    /// record, then the text it typed, if any.
    pub fn record(&mut self, r: &Value) -> Vec<Shown> {
        if !self.belongs(r) {
            return Vec::new();
        }
        let mut shown = vec![Shown::Record];
        let Some(session) = r["session"].as_u64() else {
            return shown;
        };
        match r["event"].as_str() {
            Some("session_start") if self.room_for(session) => {
                let user = r["user"].as_str().map(str::to_owned);
                self.typists
                    .entry(session)
                    .or_insert_with(|| (user, Typist::default()));
            }
            Some("session_end") => {
                // A SPICE session's channels end one by one, in any order: its typist
                // stays (bounded) for whichever channel comes last.
                if r.get("channel").is_none() {
                    self.typists.remove(&session);
                }
                if self.root != Some(session) {
                    self.members.remove(&session);
                }
            }
            Some("key" | "locks") if self.room_for(session) => {
                let (user, typist) = self
                    .typists
                    .entry(session)
                    .or_insert_with(|| (None, Typist::default()));
                if let Some(text) = typist.typed(r) {
                    shown.push(Shown::Text {
                        session,
                        user: user.clone(),
                        text,
                    });
                }
            }
            _ => {}
        }
        shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(session: u64, down: bool, name: &str, scancode: u64) -> Value {
        json!({"event": "key", "session": session, "down": down, "key": name,
            "scancode": scancode, "via": "keycode", "class": "printable"})
    }

    fn texts(shown: &[Shown]) -> Vec<(u64, Option<&str>, &str)> {
        shown
            .iter()
            .filter_map(|s| match s {
                Shown::Text {
                    session,
                    user,
                    text,
                } => Some((*session, user.as_deref(), text.as_str())),
                Shown::Record => None,
            })
            .collect()
    }

    #[test]
    fn a_session_is_followed_with_its_participants_and_their_text() {
        let mut f = Follow::new(Some(3));
        let records = [
            json!({"event": "session_start", "session": 3, "user": "alice"}),
            json!({"event": "session_start", "session": 4, "user": "mallory"}),
            json!({"event": "admin_action", "session": 3, "action": "participant"}),
            json!({"event": "token_issued", "token_id": "x", "joins": 3}),
            json!({"event": "token_issued", "token_id": "y", "joins": 4}),
            json!({"event": "session_start", "session": 5, "user": "op1", "joins": 3}),
            key(3, true, "h", 0x23),
            key(3, false, "h", 0x23),
            key(4, true, "x", 0x2d),
            json!({"event": "key", "session": 5, "down": true, "key": "Shift_L", "scancode": 0x2a, "via": "keycode"}),
            key(5, true, "i", 0x17),
            json!({"event": "input_dropped", "session": 5, "keys": 1}),
            json!({"event": "session_end", "session": 5}),
            key(5, true, "j", 0x24),
            json!({"event": "refusal_summary", "client": "1.2.3.4"}),
        ];
        let mut shown_records = Vec::new();
        let mut all_texts = Vec::new();
        for r in &records {
            let s = f.record(r);
            if s.contains(&Shown::Record) {
                shown_records
                    .push(r["event"].as_str().unwrap().to_owned() + &r["session"].to_string());
            }
            all_texts.extend(
                texts(&s)
                    .into_iter()
                    .map(|(s, u, t)| (s, u.map(str::to_owned), t.to_owned())),
            );
        }
        assert_eq!(
            shown_records,
            [
                "session_start3",
                "admin_action3",
                "token_issuednull",
                "session_start5",
                "key3",
                "key3",
                "key5",
                "key5",
                "input_dropped5",
                "session_end5",
            ]
        );
        assert_eq!(
            all_texts,
            [
                (3, Some("alice".to_owned()), "h".to_owned()),
                (5, Some("op1".to_owned()), "I".to_owned()),
            ]
        );
    }

    #[test]
    fn a_new_run_of_vizor_starts_its_session_ids_afresh() {
        let mut f = Follow::new(Some(1));
        f.record(&json!({"event": "session_start", "session": 1, "user": "old"}));
        f.record(&json!({"event": "session_start", "session": 2, "joins": 1, "user": "p"}));
        assert_eq!(f.runs(), 0);
        f.record(&json!({"event": "audit_open", "reason": "restart"}));
        assert_eq!(f.runs(), 1);
        // Session 2 of the new run is not the old run's participant.
        assert!(f.record(&key(2, true, "a", 0x1e)).is_empty());
        f.record(&json!({"event": "session_start", "session": 1, "user": "new"}));
        let s = f.record(&key(1, true, "a", 0x1e));
        assert_eq!(texts(&s), [(1, Some("new"), "a")]);
    }

    #[test]
    fn following_everything_shows_every_record() {
        let mut f = Follow::new(None);
        assert_eq!(
            f.record(&json!({"event": "chain_start", "reason": "new"})),
            [Shown::Record]
        );
        let s = f.record(&key(9, true, "a", 0x1e));
        assert_eq!(texts(&s), [(9, None, "a")]);
    }

    #[test]
    fn what_is_followed_stays_bounded() {
        let mut f = Follow::new(Some(1));
        for s in 2..2 + 2 * MAX_FOLLOWED as u64 {
            f.record(&json!({"event": "session_start", "session": s, "joins": 1, "user": "u"}));
            f.record(&key(s, true, "a", 0x1e));
        }
        assert!(f.members.len() <= MAX_FOLLOWED);
        assert!(f.typists.len() <= MAX_FOLLOWED + 1);
    }
}
