//! Resuming a VNC console after a network blip.
//!
//! While a console relays, its connection has a [`Slot`] here: a resume credential
//! (the connection's id and 32 random bytes), known to vizor's memory alone and handed
//! to the console page in a text message on the console's own WebSocket, so only the
//! page holding that connection has it. When the browser's connection drops without a
//! close frame, the session parks (its QEMU connection closes, as when any client
//! leaves): the page may come back with the credential within `[tokens]
//! resume_window`, from the connection's own client address, and the session goes on
//! under the same id on a new connection each way. A credential stays good until a
//! resume with it succeeds, which hands out the next one; one resume at a time.
//!
//! A credential is checked in constant time; one that names no connection, or the
//! wrong secret, is refused alike ([`ResumeError::Invalid`]), so a guess learns
//! nothing. The window is the connection's: while attached, the credential is good
//! (the browser may see a dead connection before vizor does); once parked, for the
//! window from the drop.

use super::browser::{BrowserRx, BrowserTx};
use base64::Engine;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

/// Random bytes in a credential.
const SECRET_LEN: usize = 32;

/// Why a resume is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    /// Not a credential, none of a live connection, or spent already.
    #[error("this console session can no longer be resumed")]
    Invalid,
    /// The credential's connection is from another client address.
    #[error("the console was opened from another address")]
    WrongClient,
    /// The connection dropped longer than the window ago.
    #[error("the console was not resumed in time")]
    Expired,
    /// Another resume of the same console is under way.
    #[error("the console is being resumed by another connection")]
    Busy,
}

impl ResumeError {
    /// Every label, for metrics at zero.
    pub const ALL: [ResumeError; 4] = [
        ResumeError::Invalid,
        ResumeError::WrongClient,
        ResumeError::Expired,
        ResumeError::Busy,
    ];

    /// The `token_refused` reason (`vizor_auth_refusals_total{stage="token"}`).
    pub fn reason(self) -> &'static str {
        match self {
            ResumeError::Invalid => "resume_invalid",
            ResumeError::WrongClient => "resume_wrong_client",
            ResumeError::Expired => "resume_expired",
            ResumeError::Busy => "resume_busy",
        }
    }

    /// A stable label (`vizor_session_resumes_total{outcome}`).
    pub fn label(self) -> &'static str {
        match self {
            ResumeError::Invalid => "invalid",
            ResumeError::WrongClient => "wrong_client",
            ResumeError::Expired => "expired",
            ResumeError::Busy => "busy",
        }
    }
}

/// A new browser connection for a parked (or still attached) console, its
/// browser-side RFB handshake done up to ClientInit: the session answers ServerInit.
pub struct Attach {
    /// The new connection's reader.
    pub rx: BrowserRx,
    /// Its writer.
    pub tx: BrowserTx,
    /// Its address.
    pub client: SocketAddr,
    /// The credential it came with, claimed: committed once the session took it.
    pub claim: Claim,
    /// Dropped when the session is done with this connection.
    pub done: oneshot::Sender<()>,
}

/// The connections that can be resumed, by connection id.
pub struct Resumes {
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    window: Duration,
}

/// One connection that can be resumed.
pub struct Slot {
    id: u64,
    client: IpAddr,
    state: Mutex<State>,
    attach: mpsc::Sender<Attach>,
}

struct State {
    secret: Zeroizing<[u8; SECRET_LEN]>,
    rotation: u32,
    /// When the browser's connection dropped, while it is parked.
    dropped: Option<Instant>,
    /// A resume with the credential is under way.
    resuming: bool,
}

/// A resume under way with the slot's credential: the credential stays good, and no
/// other resume is taken, until it is committed (the next credential is handed out)
/// or dropped (the credential may be tried again).
#[derive(Debug)]
pub struct Claim {
    slot: Arc<Slot>,
    committed: bool,
}

impl Claim {
    /// The slot claimed.
    pub fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }

    /// The resume succeeded: the credential is spent. Returns which resume this was
    /// (1 for the first) and the next credential.
    pub fn commit(mut self) -> Result<(u32, Zeroizing<String>), ResumeError> {
        let next = secret().map_err(|_| ResumeError::Invalid)?;
        let mut state = self.slot.state.lock().map_err(|_| ResumeError::Invalid)?;
        state.secret = next;
        state.rotation += 1;
        state.resuming = false;
        state.dropped = None;
        self.committed = true;
        Ok((state.rotation, credential(self.slot.id, &state.secret)))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.committed {
            if let Ok(mut s) = self.slot.state.lock() {
                s.resuming = false;
            }
        }
    }
}

/// A connection's place in [`Resumes`]: gone when dropped.
pub struct Held {
    resumes: Arc<Resumes>,
    slot: Arc<Slot>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.resumes.slots.lock() {
            slots.remove(&self.slot.id);
        }
    }
}

impl Held {
    /// The slot.
    pub fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }
}

fn secret() -> Result<Zeroizing<[u8; SECRET_LEN]>, getrandom::Error> {
    let mut s = Zeroizing::new([0u8; SECRET_LEN]);
    getrandom::getrandom(&mut s[..])?;
    Ok(s)
}

fn credential(id: u64, secret: &[u8; SECRET_LEN]) -> Zeroizing<String> {
    Zeroizing::new(format!(
        "{id}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    ))
}

impl Resumes {
    /// Connections wait `window` for their browser to come back (zero: resuming off).
    pub fn new(window: Duration) -> Arc<Resumes> {
        Arc::new(Resumes {
            slots: Mutex::new(HashMap::new()),
            window,
        })
    }

    /// `[tokens] resume_window`.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Makes connection `id` from `client` resumable: its place, and where its new
    /// browser connections arrive. `None` when resuming is off (or no randomness).
    pub fn open(
        self: &Arc<Self>,
        id: u64,
        client: IpAddr,
    ) -> Option<(Held, mpsc::Receiver<Attach>)> {
        if self.window.is_zero() {
            return None;
        }
        let secret = match secret() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "no randomness for a resume credential: this console cannot be resumed");
                return None;
            }
        };
        let (attach, arrivals) = mpsc::channel(1);
        let slot = Arc::new(Slot {
            id,
            client,
            state: Mutex::new(State {
                secret,
                rotation: 0,
                dropped: None,
                resuming: false,
            }),
            attach,
        });
        self.slots.lock().ok()?.insert(id, slot.clone());
        Some((
            Held {
                resumes: self.clone(),
                slot,
            },
            arrivals,
        ))
    }

    /// Connection `id`'s slot, while it can be resumed.
    pub fn get(&self, id: u64) -> Option<Arc<Slot>> {
        self.slots.lock().ok()?.get(&id).cloned()
    }

    /// Checks `given` from `peer` and claims it for a resume.
    pub fn claim(&self, given: &str, peer: IpAddr, now: Instant) -> Result<Claim, ResumeError> {
        let (id, encoded) = given.split_once('.').ok_or(ResumeError::Invalid)?;
        let id: u64 = id.parse().map_err(|_| ResumeError::Invalid)?;
        let given_secret = Zeroizing::new(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(encoded)
                .map_err(|_| ResumeError::Invalid)?,
        );
        let slot = self.get(id).ok_or(ResumeError::Invalid)?;
        let mut state = slot.state.lock().map_err(|_| ResumeError::Invalid)?;
        let matches = given_secret.len() == SECRET_LEN
            && bool::from(given_secret.as_slice().ct_eq(&state.secret[..]));
        if !matches {
            return Err(ResumeError::Invalid);
        }
        // Not from another address: whoever copied it cannot use it, nor block it.
        if peer != slot.client {
            return Err(ResumeError::WrongClient);
        }
        if state
            .dropped
            .is_some_and(|t| now.saturating_duration_since(t) > self.window)
        {
            return Err(ResumeError::Expired);
        }
        if state.resuming {
            return Err(ResumeError::Busy);
        }
        state.resuming = true;
        drop(state);
        Ok(Claim {
            slot,
            committed: false,
        })
    }
}

impl std::fmt::Debug for Slot {
    /// The connection and its address; never the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("id", &self.id)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl Slot {
    /// The connection's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The connection's client address: resumes come from it alone.
    pub fn client(&self) -> IpAddr {
        self.client
    }

    /// The current credential, for the console page on the connection itself.
    pub fn credential(&self) -> Option<Zeroizing<String>> {
        let state = self.state.lock().ok()?;
        Some(credential(self.id, &state.secret))
    }

    /// The browser's connection dropped (`Some`), or a new one took its place.
    pub fn parked(&self, at: Option<Instant>) {
        if let Ok(mut s) = self.state.lock() {
            s.dropped = at;
        }
    }

    /// Hands a new browser connection to the session; it comes back when the session
    /// ended meanwhile. (One resume at a time: the channel has room.)
    pub fn attach(&self, a: Attach) -> Result<(), Box<Attach>> {
        self.attach.try_send(a).map_err(|e| Box::new(e.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn current(slot: &Slot) -> String {
        slot.credential().unwrap().to_string()
    }

    #[test]
    fn a_credential_is_good_until_its_resume_commits_and_the_next_is_handed_out() {
        let r = Resumes::new(Duration::from_secs(30));
        let (held, _arrivals) = r.open(7, ip("127.0.0.1")).unwrap();
        let first = current(held.slot());
        assert!(first.starts_with("7."), "{first}");
        let now = Instant::now();
        // A resume that failed before the session took it: the credential stays good.
        drop(r.claim(&first, ip("127.0.0.1"), now).unwrap());
        let claim = r.claim(&first, ip("127.0.0.1"), now).unwrap();
        assert_eq!(claim.slot().id(), 7);
        // One at a time.
        assert_eq!(
            r.claim(&first, ip("127.0.0.1"), now).unwrap_err(),
            ResumeError::Busy
        );
        let (rotation, second) = claim.commit().unwrap();
        assert_eq!(rotation, 1);
        assert_eq!(*second, current(held.slot()));
        assert_ne!(first, *second);
        assert_eq!(
            r.claim(&first, ip("127.0.0.1"), now).unwrap_err(),
            ResumeError::Invalid
        );
        let (rotation, _) = r
            .claim(&second, ip("127.0.0.1"), now)
            .unwrap()
            .commit()
            .unwrap();
        assert_eq!(rotation, 2);
    }

    #[test]
    fn another_address_is_refused_and_does_not_use_it_up() {
        let r = Resumes::new(Duration::from_secs(30));
        let (held, _arrivals) = r.open(1, ip("127.0.0.1")).unwrap();
        let c = current(held.slot());
        let now = Instant::now();
        assert_eq!(
            r.claim(&c, ip("127.0.0.2"), now).unwrap_err(),
            ResumeError::WrongClient
        );
        assert!(r.claim(&c, ip("127.0.0.1"), now).is_ok());
    }

    #[test]
    fn a_wrong_secret_an_unknown_console_and_garbage_are_refused_alike() {
        let r = Resumes::new(Duration::from_secs(30));
        let (held, _arrivals) = r.open(3, ip("10.0.0.1")).unwrap();
        let c = current(held.slot());
        let now = Instant::now();
        let mut wrong = c.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == 'A' { 'B' } else { 'A' });
        let other = c.replacen("3.", "4.", 1);
        for bad in [
            wrong.as_str(),
            other.as_str(),
            "",
            ".",
            "3.",
            "3.!!",
            "x.AAAA",
            "3.AAAA",
        ] {
            assert_eq!(
                r.claim(bad, ip("10.0.0.1"), now).unwrap_err(),
                ResumeError::Invalid,
                "{bad:?}"
            );
        }
        // Still good after all that.
        assert!(r.claim(&c, ip("10.0.0.1"), now).is_ok());
    }

    #[test]
    fn a_parked_console_waits_the_window_and_no_longer() {
        let r = Resumes::new(Duration::from_secs(30));
        let (held, _arrivals) = r.open(5, ip("127.0.0.1")).unwrap();
        let c = current(held.slot());
        let t = Instant::now();
        held.slot().parked(Some(t));
        assert_eq!(
            r.claim(&c, ip("127.0.0.1"), t + Duration::from_secs(31))
                .err(),
            Some(ResumeError::Expired)
        );
        assert!(r
            .claim(&c, ip("127.0.0.1"), t + Duration::from_secs(30))
            .is_ok());
    }

    #[test]
    fn a_connection_that_ended_takes_no_resume_and_off_means_off() {
        let r = Resumes::new(Duration::from_secs(30));
        let (held, _arrivals) = r.open(9, ip("127.0.0.1")).unwrap();
        let c = current(held.slot());
        drop(held);
        assert!(r.get(9).is_none());
        assert_eq!(
            r.claim(&c, ip("127.0.0.1"), Instant::now()).err(),
            Some(ResumeError::Invalid)
        );
        assert!(Resumes::new(Duration::ZERO)
            .open(1, ip("127.0.0.1"))
            .is_none());
    }
}
