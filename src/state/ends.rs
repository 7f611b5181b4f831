//! An administrator's end of a session another replica holds.
//!
//! Each process subscribes to two channels: `{prefix}:end:{replica}`, where ends of
//! its replica's sessions are asked, and `{prefix}:reply:{mark}`, where the answers to
//! what it asked come. A request names the session by its member (the process's mark
//! and its id), so only the process holding that very session acts on it: another
//! process of the same replica name, or one started since, stays silent. Requests and
//! answers are signed with a key derived from the token key the replicas share, so
//! someone who can only write to Redis cannot end a session or forge an answer.

use super::{Shared, Unavailable};
use crate::audit::chain::{hex, unhex};
use crate::front::unix_now;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// How long an end asked of another replica waits for its answer.
pub const END_WAIT: Duration = Duration::from_secs(5);

/// How many ends asked of this replica are handled at once; more are dropped (and
/// their askers time out).
pub(super) const HANDLING: usize = 16;

/// How old (or how far ahead, by the clocks' difference) a request may be.
const FRESH_SECS: u64 = 60;

/// How many end requests' ids are remembered, at most.
const SEEN_MAX: usize = 4096;

/// How often a message nobody signed is warned of, at most (seconds).
pub(super) const WARN_EVERY: u64 = 10;

/// An administrator's request to end a session, sent to the replica holding it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EndAsked {
    /// The request's id, in its answer.
    pub id: String,
    /// Where the answer goes (the asking process's reply channel).
    pub reply_to: String,
    /// The replica that asked.
    pub from: String,
    /// The session's member: its process's mark and its id.
    pub member: String,
    /// The session's id, as its process numbers it.
    pub session: u64,
    /// The administrator.
    pub admin: String,
    /// Why.
    pub reason: String,
    /// The address the administrator's request came from.
    pub requester: String,
    /// When it was asked (Unix seconds).
    pub sent_at: u64,
}

/// The holding replica's answer to an [`EndAsked`]: the API's status and answer.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EndAnswer {
    /// The request's id.
    pub id: String,
    /// The HTTP status the holding replica would have answered.
    pub status: u16,
    /// Its JSON answer.
    pub body: serde_json::Value,
}

/// What came of asking another replica to end a session.
#[derive(Debug)]
pub enum EndReply {
    /// Its answer.
    Answered(EndAnswer),
    /// No process listens for that replica's ends.
    NoSuchReplica,
    /// No answer in time (the session's process may be gone).
    NoAnswer,
}

/// Handles an end another replica asked of this one.
pub type EndHandler = Arc<
    dyn Fn(EndAsked) -> std::pin::Pin<Box<dyn Future<Output = EndAnswer> + Send>> + Send + Sync,
>;

/// A message between replicas: its JSON, and the HMAC-SHA256 of it in hex.
#[derive(serde::Serialize, serde::Deserialize)]
struct Signed {
    m: String,
    s: String,
}

type HmacSha256 = Hmac<Sha256>;

/// The replica a member belongs to (its first part).
pub fn member_replica(member: &str) -> Option<&str> {
    let mut parts = member.split('/');
    let (Some(replica), Some(mark), Some(id), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    (!replica.is_empty() && !mark.is_empty() && id.parse::<u64>().is_ok()).then_some(replica)
}

/// The session id a member names (its last part).
pub fn member_session(member: &str) -> Option<u64> {
    member_replica(member)?;
    member.rsplit('/').next()?.parse().ok()
}

/// Removes a waiting ask from the map however its wait ends (an answer, a timeout, the
/// HTTP request dropped).
struct Waiting<'a> {
    shared: &'a Shared,
    id: String,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Ok(mut a) = self.shared.asked.lock() {
            a.remove(&self.id);
        }
    }
}

impl Shared {
    fn end_channel(&self, replica: &str) -> String {
        format!("{}:end:{replica}", self.prefix)
    }

    fn reply_channel(&self) -> String {
        format!("{}:reply:{}", self.prefix, self.mark)
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length; 32 bytes cannot fail.
        <HmacSha256 as Mac>::new_from_slice(&*self.sign_key).unwrap_or_else(|_| unreachable!())
    }

    fn sign<T: serde::Serialize>(&self, what: &T) -> Result<String, Unavailable> {
        let m = serde_json::to_string(what).map_err(|e| Unavailable(e.to_string()))?;
        Ok(self.seal(m))
    }

    /// `m`, signed: what a replica writes for another to trust.
    pub(super) fn seal(&self, m: String) -> String {
        let mut mac = self.mac();
        mac.update(m.as_bytes());
        let s = hex(&mac.finalize().into_bytes());
        // Two strings: serializing cannot fail.
        serde_json::to_string(&Signed { m, s }).unwrap_or_default()
    }

    /// What `text` carries, if a replica signed it.
    pub(super) fn unseal(&self, text: &str) -> Option<String> {
        let signed: Signed = serde_json::from_str(text).ok()?;
        let tag = unhex(&signed.s)?;
        let mut mac = self.mac();
        mac.update(signed.m.as_bytes());
        mac.verify_slice(&tag).ok()?;
        Some(signed.m)
    }

    /// The message `text` carries, if a replica signed it.
    fn verified<T: serde::de::DeserializeOwned>(&self, text: &str) -> Option<T> {
        serde_json::from_str(&self.unseal(text)?).ok()
    }

    /// Says that something in Redis was not written by a replica (or not as it
    /// should be): at most once per [`WARN_EVERY`] seconds, so whoever writes to
    /// Redis cannot flood the log.
    pub(super) fn unsigned(&self, what: &str) {
        use std::sync::atomic::Ordering;
        let now = unix_now();
        let last = self.warned.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= WARN_EVERY
            && self
                .warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                "shared state: {what}, ignored (more of these in the next {WARN_EVERY} s are not logged): is something other than vizor writing to Redis?"
            );
        }
    }

    /// Whether end request `id` is new: remembered for twice the time a request
    /// counts as fresh, at most [`SEEN_MAX`] of them (a flood beyond that is refused,
    /// not forgotten).
    fn first_time(&self, id: &str, now: u64) -> bool {
        let Ok(mut seen) = self.seen.lock() else {
            return false;
        };
        if seen.len() >= SEEN_MAX {
            seen.retain(|_, at| now.saturating_sub(*at) <= 2 * FRESH_SECS);
        }
        if seen.len() >= SEEN_MAX || seen.contains_key(id) {
            return false;
        }
        seen.insert(id.to_owned(), now);
        true
    }

    /// How many processes listen for this replica's ends (before this one does): more
    /// than none means another process uses its name.
    pub async fn namesakes(&self) -> Result<usize, Unavailable> {
        let mut cmd = redis::cmd("PUBSUB");
        cmd.arg("NUMSUB").arg(self.end_channel(&self.replica));
        let answer: Vec<(String, usize)> = self
            .run(
                "namesakes",
                |mut c| async move { cmd.query_async(&mut c).await },
            )
            .await?;
        Ok(answer.first().map_or(0, |(_, n)| *n))
    }

    /// Asks the process holding `member` to end that session, and waits (up to
    /// [`END_WAIT`]) for its answer.
    pub async fn ask_end(
        &self,
        member: &str,
        admin: &str,
        reason: &str,
        requester: &str,
    ) -> Result<EndReply, Unavailable> {
        let (Some(replica), Some(session)) = (member_replica(member), member_session(member))
        else {
            return Err(Unavailable(format!("{member:?} is not a session's member")));
        };
        // An answer sent before this process subscribed would be lost.
        let mut listening = self.listening.subscribe();
        if tokio::time::timeout(self.timeout, listening.wait_for(|l| *l))
            .await
            .is_err()
        {
            return Err(Unavailable(
                "this replica is not subscribed to its answers yet".into(),
            ));
        }
        let mut id = [0u8; 12];
        getrandom::getrandom(&mut id).map_err(|e| Unavailable(format!("no randomness: {e}")))?;
        let asked = EndAsked {
            id: hex(&id),
            reply_to: self.reply_channel(),
            from: self.replica.clone(),
            member: member.to_owned(),
            session,
            admin: admin.to_owned(),
            reason: reason.to_owned(),
            requester: requester.to_owned(),
            sent_at: unix_now(),
        };
        let text = self.sign(&asked)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Ok(mut a) = self.asked.lock() {
            a.insert(asked.id.clone(), tx);
        }
        let _waiting = Waiting {
            shared: self,
            id: asked.id.clone(),
        };
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(self.end_channel(replica)).arg(text);
        let heard: usize = self
            .run(
                "ask_end",
                |mut c| async move { cmd.query_async(&mut c).await },
            )
            .await?;
        if heard == 0 {
            return Ok(EndReply::NoSuchReplica);
        }
        match tokio::time::timeout(END_WAIT, rx).await {
            Ok(Ok(answer)) => Ok(EndReply::Answered(answer)),
            _ => Ok(EndReply::NoAnswer),
        }
    }

    /// Listens for ends other replicas ask of this one's sessions (handled by
    /// `handle`, answered on the asker's channel) and for the answers to those this one
    /// asked; subscribes again, after a pause growing to 5 s, whenever the connection
    /// drops. Runs until the process ends.
    pub async fn listen(self: Arc<Self>, handle: EndHandler) {
        let mut pause = Duration::from_millis(100);
        let mut failed = 0u32;
        loop {
            let e = self.listen_once(&handle).await;
            if self.listening.send_replace(false) {
                // It had subscribed: start again at once, the pause from the start.
                pause = Duration::from_millis(100);
                failed = 0;
            }
            // The first failure of a run is said (an ACL that refuses the channels
            // shows here), the rest while it lasts at debug.
            if failed == 0 {
                tracing::warn!(error = %e, "shared state: not subscribed for ends of this replica's sessions; trying again");
            } else {
                tracing::debug!(error = %e, "shared state: not subscribed for ends");
            }
            failed = failed.saturating_add(1);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// Subscribes and handles what comes until the connection drops: why it did.
    async fn listen_once(self: &Arc<Self>, handle: &EndHandler) -> Unavailable {
        use futures_util::StreamExt;
        let mut pubsub =
            match super::bounded(self.timeout, "connect", self.client.get_async_pubsub()).await {
                Ok(p) => p,
                Err(e) => return e,
            };
        let ends = self.end_channel(&self.replica);
        let replies = self.reply_channel();
        if let Err(e) = super::bounded(
            self.timeout,
            "subscribe",
            pubsub.subscribe(&[&ends, &replies]),
        )
        .await
        {
            return e;
        }
        self.listening.send_replace(true);
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            let Ok(text) = msg.get_payload::<String>() else {
                continue;
            };
            if msg.get_channel_name() == replies {
                let Some(answer) = self.verified::<EndAnswer>(&text) else {
                    self.unsigned("an answer to an end that no replica signed");
                    continue;
                };
                let waiting = self
                    .asked
                    .lock()
                    .ok()
                    .and_then(|mut a| a.remove(&answer.id));
                if let Some(tx) = waiting {
                    let _ = tx.send(answer);
                }
            } else if msg.get_channel_name() == ends {
                self.asked_to_end(&text, handle);
            }
        }
        Unavailable("the subscription ended".into())
    }

    /// A request to end a session of this replica's, handled if it is signed, fresh,
    /// answered on a reply channel, and of this very process's sessions.
    fn asked_to_end(self: &Arc<Self>, text: &str, handle: &EndHandler) {
        let Some(asked) = self.verified::<EndAsked>(text) else {
            self.unsigned("an end request that no replica signed");
            return;
        };
        match self.judge(&asked, unix_now()) {
            Judged::Handle => {}
            // Another process of this replica's name holds it (or held it, before a
            // restart): that one answers, or none does.
            Judged::NotMine => return,
            Judged::Refused(why) => {
                tracing::warn!(from = %asked.from, why, "shared state: an end request ignored");
                return;
            }
        }
        if !self.first_time(&asked.id, unix_now()) {
            self.unsigned("an end request seen before (replayed)");
            return;
        }
        let Ok(permit) = self.handling.clone().try_acquire_owned() else {
            tracing::warn!(from = %asked.from, "shared state: too many end requests at once, one ignored");
            return;
        };
        let shared = self.clone();
        let handle = handle.clone();
        tokio::spawn(async move {
            let reply_to = asked.reply_to.clone();
            let answer = handle(asked).await;
            drop(permit);
            let text = match shared.sign(&answer) {
                Ok(t) => t,
                Err(e) => {
                    return tracing::warn!(error = %e, "shared state: an end's answer was not sent")
                }
            };
            let mut cmd = redis::cmd("PUBLISH");
            cmd.arg(reply_to).arg(text);
            let sent: Result<usize, _> = shared
                .run("answer_end", |mut c| async move {
                    cmd.query_async(&mut c).await
                })
                .await;
            if let Err(e) = sent {
                tracing::warn!(error = %e, "shared state: an end's answer was not sent");
            }
        });
    }
}

/// What to do with a signed end request.
#[derive(Debug, PartialEq, Eq)]
enum Judged {
    /// End the session, and answer.
    Handle,
    /// Not a session of this process: stay silent.
    NotMine,
    /// Stale or malformed (why).
    Refused(&'static str),
}

impl Shared {
    /// Whether this process handles `asked`, received at `now` (Unix seconds).
    fn judge(&self, asked: &EndAsked, now: u64) -> Judged {
        if now.abs_diff(asked.sent_at) > FRESH_SECS {
            return Judged::Refused("sent too long ago (or the clocks differ)");
        }
        if asked
            .reply_to
            .strip_prefix(&format!("{}:reply:", self.prefix))
            .is_none_or(str::is_empty)
        {
            return Judged::Refused("its answer would go to no reply channel");
        }
        if member_session(&asked.member) != Some(asked.session) {
            return Judged::Refused("its member and session disagree");
        }
        if self.is_mine(&asked.member) {
            Judged::Handle
        } else {
            Judged::NotMine
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replica's state with its own token key; nothing is connected.
    fn shared(replica: &str, key: &crate::token::TokenKey) -> Shared {
        let cfg: crate::config::StateConfig = toml::from_str(&format!(
            "redis = \"redis://127.0.0.1:1/0\"\nreplica = \"{replica}\""
        ))
        .unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::new().unwrap());
        Shared::open(&cfg, key, metrics).unwrap()
    }

    fn asked(by: &Shared, member: String, session: u64) -> EndAsked {
        EndAsked {
            id: "01".into(),
            reply_to: by.reply_channel(),
            from: by.replica.clone(),
            member,
            session,
            admin: "admin".into(),
            reason: "r".into(),
            requester: "127.0.0.1:1".into(),
            sent_at: 1_000,
        }
    }

    // A runtime, as the Redis client wants one to exist (nothing connects).
    #[tokio::test]
    async fn only_a_replica_holding_the_key_signs_what_others_act_on() {
        let key = crate::token::TokenKey::generate().unwrap();
        let (a, b) = (shared("a", &key), shared("b", &key));
        let other = shared("a", &crate::token::TokenKey::generate().unwrap());
        let msg = asked(&b, a.member(7), 7);
        let text = b.sign(&msg).unwrap();
        let got: EndAsked = a.verified(&text).expect("signed by a replica");
        assert_eq!((got.member, got.session), (a.member(7), 7));
        // Another key, a changed message, a changed or missing tag: not acted on.
        assert!(other.verified::<EndAsked>(&text).is_none());
        let mut signed: serde_json::Value = serde_json::from_str(&text).unwrap();
        let m = signed["m"].as_str().unwrap().replace("\"r\"", "\"x\"");
        signed["m"] = m.into();
        assert!(a.verified::<EndAsked>(&signed.to_string()).is_none());
        for tag in ["", "00", &"00".repeat(32)] {
            let forged = serde_json::json!({"m": serde_json::to_string(&msg).unwrap(), "s": tag});
            assert!(
                a.verified::<EndAsked>(&forged.to_string()).is_none(),
                "{tag}"
            );
        }
        assert!(a
            .verified::<EndAsked>(&serde_json::to_string(&msg).unwrap())
            .is_none());
    }

    #[tokio::test]
    async fn a_request_is_handled_by_the_process_holding_the_session_alone() {
        let key = crate::token::TokenKey::generate().unwrap();
        let (a, b) = (shared("a", &key), shared("b", &key));
        // A namesake of a (another process, or a's earlier one).
        let namesake = shared("a", &key);
        let msg = asked(&b, a.member(7), 7);
        assert_eq!(a.judge(&msg, 1_000), Judged::Handle);
        assert_eq!(a.judge(&msg, 1_060), Judged::Handle);
        assert_eq!(namesake.judge(&msg, 1_000), Judged::NotMine);
        assert!(matches!(a.judge(&msg, 1_061), Judged::Refused(_)));
        assert!(matches!(a.judge(&msg, 939), Judged::Refused(_)));
        let mut elsewhere = msg.clone();
        elsewhere.reply_to = "vizor:end:a".into();
        assert!(matches!(a.judge(&elsewhere, 1_000), Judged::Refused(_)));
        elsewhere.reply_to = "vizor:reply:".into();
        assert!(matches!(a.judge(&elsewhere, 1_000), Judged::Refused(_)));
        let disagree = asked(&b, a.member(7), 8);
        assert!(matches!(a.judge(&disagree, 1_000), Judged::Refused(_)));
    }

    #[test]
    fn members_name_their_replica_and_session() {
        assert_eq!(member_replica("a/0f3c/17"), Some("a"));
        assert_eq!(member_session("a/0f3c/17"), Some(17));
        for bad in ["", "a", "a/0f3c", "a/0f3c/x", "/0f3c/1", "a//1", "a/0f/1/2"] {
            assert_eq!(member_replica(bad), None, "{bad}");
            assert_eq!(member_session(bad), None, "{bad}");
        }
        assert_eq!(unhex(&"ab".repeat(32)).map(|v| v.len()), Some(32));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex(&"zz".repeat(32)), None);
    }
}
