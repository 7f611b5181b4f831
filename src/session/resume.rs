//! Resuming a console (VNC, or a SPICE session's main channel) after a network blip.
//!
//! While a console relays, its connection has a [`Slot`] here: a resume credential
//! (the connection's id and 32 random bytes), known to vizor's memory alone and handed
//! to the console page in a text message on the console's own WebSocket, so only the
//! page holding that connection has it. When the browser's connection drops without a
//! close frame, the session parks (its QEMU connection closes, as when any client
//! leaves): the page may come back with the credential within `[tokens]
//! resume_window`, from the connection's own client address, and the session goes on
//! under the same id on a new connection each way. A resume that succeeds hands out
//! the next credential (before ServerInit, or SPICE's first message after the link,
//! so a page that speaks on the new connection has it); the one it used stays good
//! until then. A newer claim of a
//! credential replaces an older one still under way (its connection may be dead).
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
}

impl ResumeError {
    /// Every label, for metrics at zero.
    pub const ALL: [ResumeError; 3] = [
        ResumeError::Invalid,
        ResumeError::WrongClient,
        ResumeError::Expired,
    ];

    /// The `token_refused` reason (`vizor_auth_refusals_total{stage="token"}`).
    pub fn reason(self) -> &'static str {
        match self {
            ResumeError::Invalid => "resume_invalid",
            ResumeError::WrongClient => "resume_wrong_client",
            ResumeError::Expired => "resume_expired",
        }
    }

    /// A stable label (`vizor_session_resumes_total{outcome}`).
    pub fn label(self) -> &'static str {
        match self {
            ResumeError::Invalid => "invalid",
            ResumeError::WrongClient => "wrong_client",
            ResumeError::Expired => "expired",
        }
    }
}

/// A new browser connection for a parked (or still attached) console, its
/// browser-side handshake as far as vizor goes before the VM's part ([`Hello`]).
pub struct Attach {
    /// The new connection's reader.
    pub rx: BrowserRx,
    /// Its writer.
    pub tx: BrowserTx,
    /// Its address.
    pub client: SocketAddr,
    /// The credential it came with, claimed: committed once the session took it.
    pub claim: Claim,
    /// The console as libvirt tells it now (the VM may have gone or restarted while
    /// the session was parked, or its password changed).
    pub console: Result<crate::libvirt::Console, crate::libvirt::LookupError>,
    /// Dropped when the session is done with this connection.
    pub done: oneshot::Sender<()>,
    /// How far the browser's handshake went.
    pub hello: Hello,
}

/// What a resuming connection brings besides its connection, once the session took
/// that ([`Attach::take_over`]).
pub struct Taken {
    /// Its address.
    pub client: SocketAddr,
    /// The credential it came with, claimed.
    pub claim: Claim,
    /// Dropped when the session is done with this connection.
    pub done: oneshot::Sender<()>,
    /// How far the browser's handshake went.
    pub hello: Hello,
}

impl Attach {
    /// The console as libvirt tells it now, if it is the run of the VM the session had
    /// (`was`) at the same place; or why the session cannot go on (the VM is gone or
    /// was restarted: another VM may even listen on its port).
    pub fn same_run(
        &self,
        was: &crate::libvirt::Console,
    ) -> Result<crate::libvirt::Console, super::End> {
        match &self.console {
            Ok(c) if c.instance == was.instance && c.target == was.target => Ok(c.clone()),
            Ok(_) => Err(super::End::vm(
                super::VmFailure::Connect,
                "the VM was restarted while its console was away",
            )),
            Err(e) => Err(super::End::lookup(e)),
        }
    }

    /// Makes this the session's browser connection (`rx`, `tx`), whatever follows: its
    /// close frame says how the session ends.
    pub fn take_over(self, rx: &mut BrowserRx, tx: &mut BrowserTx) -> Taken {
        drop(std::mem::replace(rx, self.rx));
        *tx = self.tx;
        Taken {
            client: self.client,
            claim: self.claim,
            done: self.done,
            hello: self.hello,
        }
    }
}

/// How far a resuming browser's handshake went before the session takes it.
pub enum Hello {
    /// RFB up to ClientInit: the session answers ServerInit.
    Rfb,
    /// SPICE: the main channel's link message (connection id 0) and any bytes after
    /// it; the session links to QEMU and answers the link.
    Spice {
        /// The browser's link message, read.
        linking: Box<vizor_spice::handshake::server::Linking>,
        /// What the browser sent after it.
        early: Vec<u8>,
    },
}

/// The connections that can be resumed, by connection id.
pub struct Resumes {
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    window: Duration,
}

/// One connection that can be resumed.
pub struct Slot {
    id: u64,
    kind: crate::token::ConsoleKind,
    client: IpAddr,
    /// The domain's UUID, to look its console up again on a resume.
    uuid: [u8; 16],
    /// The libvirt host the domain is on.
    host: String,
    state: Mutex<State>,
    attach: mpsc::Sender<Attach>,
}

struct State {
    secret: Zeroizing<[u8; SECRET_LEN]>,
    /// The secret a resume used, good until the page shows it has the next one (it
    /// speaks RFB on the new connection, which comes after the credential).
    previous: Option<Zeroizing<[u8; SECRET_LEN]>>,
    rotation: u32,
    /// When the browser's connection dropped, while it is parked.
    dropped: Option<Instant>,
    /// Claims made so far: only the latest may commit.
    claims: u64,
}

/// A resume under way with the slot's credential. A newer claim replaces it (the
/// page tried again: this one's connection may be dead); the credential is spent only
/// when a claim commits.
pub struct Claim {
    slot: Arc<Slot>,
    number: u64,
    /// The secret it came with: what the page holds for sure.
    used: Zeroizing<[u8; SECRET_LEN]>,
}

impl std::fmt::Debug for Claim {
    /// Never the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("slot", &self.slot)
            .field("number", &self.number)
            .finish_non_exhaustive()
    }
}

impl Claim {
    /// The slot claimed.
    pub fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }

    /// Whether no newer claim replaced this one.
    pub fn is_latest(&self) -> bool {
        self.slot
            .state
            .lock()
            .is_ok_and(|s| s.claims == self.number)
    }

    /// The resume succeeded: the next credential is made, and the one this claim used
    /// stays good until [`Slot::confirmed`] (the page may not have read the next one). Returns which resume this was (1 for the first);
    /// `None` when a newer claim replaced this one, or there is no randomness.
    pub fn commit(self) -> Option<u32> {
        let next = secret().ok()?;
        let mut state = self.slot.state.lock().ok()?;
        if state.claims != self.number {
            return None;
        }
        state.secret = next;
        state.previous = Some(self.used);
        state.rotation += 1;
        state.dropped = None;
        Some(state.rotation)
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
    let mut c = Zeroizing::new(format!("{id}."));
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(secret, &mut c);
    c
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

    /// Makes connection `id` (a console of `kind`) from `client` to the domain `uuid`
    /// resumable: its place, and where its new browser connections arrive. `None`
    /// when resuming is off (or no randomness).
    pub fn open(
        self: &Arc<Self>,
        id: u64,
        kind: crate::token::ConsoleKind,
        client: IpAddr,
        uuid: [u8; 16],
        host: &str,
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
        // Room for a few: a claim replaced while its connection was on the way.
        let (attach, arrivals) = mpsc::channel(4);
        let slot = Arc::new(Slot {
            id,
            kind,
            client,
            uuid,
            host: host.to_owned(),
            state: Mutex::new(State {
                secret,
                previous: None,
                rotation: 0,
                dropped: None,
                claims: 0,
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

    /// [`Resumes::open`] when the page asked for resuming (`asked`): the place, if
    /// any, and where new connections arrive, apart.
    pub fn open_if(
        self: &Arc<Self>,
        asked: bool,
        id: u64,
        kind: crate::token::ConsoleKind,
        client: IpAddr,
        uuid: [u8; 16],
        host: &str,
    ) -> (Option<Held>, Option<mpsc::Receiver<Attach>>) {
        match asked
            .then(|| self.open(id, kind, client, uuid, host))
            .flatten()
        {
            Some((h, a)) => (Some(h), Some(a)),
            None => (None, None),
        }
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
        let is = |s: &[u8; SECRET_LEN]| {
            given_secret.len() == SECRET_LEN && bool::from(given_secret.as_slice().ct_eq(&s[..]))
        };
        // Both compared, whichever matches.
        let current = is(&state.secret);
        let previous = state.previous.as_deref().is_some_and(is);
        let used = match (current, &state.previous) {
            (true, _) => state.secret.clone(),
            (false, Some(p)) if previous => p.clone(),
            _ => return Err(ResumeError::Invalid),
        };
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
        state.claims += 1;
        let number = state.claims;
        drop(state);
        Ok(Claim { slot, number, used })
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

    /// The console's kind: a resume speaks its protocol.
    pub fn kind(&self) -> crate::token::ConsoleKind {
        self.kind
    }

    /// The connection's client address: resumes come from it alone.
    pub fn client(&self) -> IpAddr {
        self.client
    }

    /// The domain's UUID.
    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }

    /// The libvirt host the domain is on.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The page spoke on the connection that was sent the current credential: the one
    /// it resumed with is spent.
    pub fn confirmed(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.previous = None;
        }
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
        self.attach
            .try_send(a)
            .map_err(|e| Box::new(e.into_inner()))
    }
}

/// A session whose browser connection was lost, as it waits for its page.
pub(super) struct Parking<'a> {
    /// What every session shares.
    pub env: &'a super::Env,
    /// The session's id.
    pub session: u64,
    /// The connection's client address.
    pub client: SocketAddr,
    /// The live session.
    pub live: &'a Arc<crate::live::Live>,
    /// The owner's connection (not a participant's): the session is listed as parked.
    pub owner: bool,
    /// The token's `max_duration`, counted by `age`.
    pub max: Option<Duration>,
    /// The session's input clock.
    pub idle: &'a crate::limits::Idle,
    /// `[limits] idle_timeout`, for the owner's connection.
    pub idle_timeout: Option<Duration>,
}

/// How waiting for a parked session's page ended.
enum Waited {
    Back(Box<Attach>),
    Over(super::End),
}

/// A parked session: since when, and until when it waits.
pub(super) struct Parked {
    /// When the browser's connection was let go.
    pub at: Instant,
    deadline: tokio::time::Instant,
}

impl Parking<'_> {
    /// Parks the connection of `slot`: the page's connection is let go (`rx`, `tx`:
    /// a page still there sees it drop) and the drop (`cause`) goes on record. `Err`:
    /// the session cannot go on (its audit failed).
    pub(super) async fn park(
        &self,
        slot: &Slot,
        (rx, tx): (&mut BrowserRx, &BrowserTx),
        cause: &'static str,
        recording: Option<crate::recording::Finished>,
    ) -> Result<Parked, super::End> {
        let env = self.env;
        let window = env.resumes.window();
        tx.abort().await;
        rx.shut();
        let at = Instant::now();
        slot.parked(Some(at));
        if self.owner {
            self.live.set_parked(Some(std::time::SystemTime::now()));
        }
        env.metrics
            .session_resumes_total
            .with_label_values(&["dropped"])
            .inc();
        tracing::info!(
            session = self.session,
            cause,
            "browser connection lost: waiting for the page to resume"
        );
        let client = self.client.to_string();
        env.audit
            .record(&crate::audit::Event::SessionDrop {
                session: self.session,
                client: &client,
                cause,
                window_ms: window.as_millis() as u64,
                recording,
            })
            .await
            .map_err(super::audit_failed)?;
        Ok(Parked {
            at,
            deadline: tokio::time::Instant::now() + window,
        })
    }

    /// Waits for the page within the window (`next`: one that already arrived):
    /// the latest claim's connection, or how the session ended meanwhile, with a
    /// connection still to be told why.
    pub(super) async fn wait(
        &self,
        parked: &Parked,
        arrivals: &mut mpsc::Receiver<Attach>,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
        age: impl Fn() -> Duration,
        mut next: Option<Attach>,
    ) -> Result<Attach, (super::End, Option<Attach>)> {
        let env = self.env;
        let window = env.resumes.window();
        loop {
            let back = match next.take() {
                Some(a) => a,
                None => {
                    let waited = tokio::select! {
                        biased;
                        end = super::stopped(shutdown, self.live.state(), self.owner, self.max, age()) => Waited::Over(end),
                        _ = self.idle.expired(self.idle_timeout) => Waited::Over(super::End::Idle(self.idle.idle_for())),
                        _ = tokio::time::sleep_until(parked.deadline) => {
                            env.metrics
                                .session_resumes_total
                                .with_label_values(&["window_expired"])
                                .inc();
                            tracing::info!(session = self.session, window = %humantime::format_duration(window), "not resumed within the window");
                            Waited::Over(super::End::BrowserClosed)
                        }
                        Some(a) = arrivals.recv() => Waited::Back(Box::new(a)),
                    };
                    match waited {
                        Waited::Back(a) => *a,
                        Waited::Over(end) => return Err((end, None)),
                    }
                }
            };
            // A claim a newer one replaced: its page tried again.
            if !back.claim.is_latest() {
                let mut a = back;
                tokio::spawn(async move {
                    let why = "replaced by a newer resume of this console";
                    a.tx.close(1008, why).await;
                    a.rx.linger(super::browser::CLOSE_LINGER).await;
                });
                continue;
            }
            return Ok(back);
        }
    }
}

impl Parking<'_> {
    /// The page is back on a new connection from `client`, with a new connection to
    /// QEMU (`upstream_tls`, `vm_password`) and the claim committed (`rotation`): on
    /// record before anything of QEMU's reaches the page.
    pub(super) async fn resumed(
        &self,
        parked: &Parked,
        client: SocketAddr,
        rotation: u32,
        upstream_tls: bool,
        vm_password: bool,
    ) -> Result<(), super::End> {
        let client = client.to_string();
        self.env
            .audit
            .record(&crate::audit::Event::SessionResume {
                session: self.session,
                client: &client,
                rotation,
                parked_ms: parked.at.elapsed().as_millis() as u64,
                upstream_tls,
                vm_password,
            })
            .await
            .map_err(super::audit_failed)?;
        self.env
            .metrics
            .session_resumes_total
            .with_label_values(&["resumed"])
            .inc();
        Ok(())
    }
}

/// Whether a resume that failed with `end` leaves the session parked for the rest of
/// its window: it failed on the browser's side (its connection lost again, its
/// handshake broken or too slow, or a newer try of the page replacing it). One the VM
/// failed ends the session.
pub(super) fn try_again(end: &super::End) -> bool {
    end.side() == super::Side::Browser
        || matches!(
            end,
            super::End::Refused {
                why: super::Refusal::HandshakeTimeout,
                ..
            }
        )
}

/// A resumable connection's session ended: no more resumes (`held` dropped), and the
/// connections on their way (`left`, and any still in `arrivals`) are told how it
/// ended.
pub(super) fn refuse_the_rest(
    end: &super::End,
    held: Option<Held>,
    left: Option<Attach>,
    arrivals: Option<&mut mpsc::Receiver<Attach>>,
) {
    drop(held);
    let told = end.told().to_string();
    let code = end.close_code();
    let mut refused: Vec<Attach> = left.into_iter().collect();
    if let Some(a) = arrivals {
        a.close();
        while let Ok(x) = a.try_recv() {
            refused.push(x);
        }
    }
    for a in refused {
        let told = told.clone();
        tokio::spawn(async move {
            let mut a = a;
            a.tx.close(code, &told).await;
            a.rx.linger(super::browser::CLOSE_LINGER).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::ConsoleKind;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn current(slot: &Slot) -> String {
        slot.credential().unwrap().to_string()
    }

    #[test]
    fn a_credential_is_good_until_the_page_has_the_next_and_the_latest_claim_wins() {
        let r = Resumes::new(Duration::from_secs(30));
        let (held, _arrivals) = r
            .open(7, ConsoleKind::Vnc, ip("127.0.0.1"), [0; 16], "default")
            .unwrap();
        let slot = held.slot().clone();
        let first = current(&slot);
        assert!(first.starts_with("7."), "{first}");
        let now = Instant::now();
        // A resume that failed before the session took it: the credential stays good.
        drop(r.claim(&first, ip("127.0.0.1"), now).unwrap());
        let older = r.claim(&first, ip("127.0.0.1"), now).unwrap();
        // The page tried again (the older one's connection died on the way): the
        // newer claim is the one that may commit.
        let newer = r.claim(&first, ip("127.0.0.1"), now).unwrap();
        assert!(!older.is_latest() && newer.is_latest());
        assert_eq!(older.commit(), None);
        assert_eq!(newer.commit(), Some(1));
        let second = current(&slot);
        assert_ne!(first, second);
        // Until the page speaks on the new connection, it may not have the next one.
        let again = r.claim(&first, ip("127.0.0.1"), now).unwrap();
        drop(again);
        slot.confirmed();
        assert_eq!(
            r.claim(&first, ip("127.0.0.1"), now).unwrap_err(),
            ResumeError::Invalid
        );
        let rotation = r
            .claim(&second, ip("127.0.0.1"), now)
            .unwrap()
            .commit()
            .unwrap();
        assert_eq!(rotation, 2);
    }

    #[test]
    fn another_address_is_refused_and_does_not_use_it_up() {
        let r = Resumes::new(Duration::from_secs(30));
        let (held, _arrivals) = r
            .open(1, ConsoleKind::Vnc, ip("127.0.0.1"), [0; 16], "default")
            .unwrap();
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
        let (held, _arrivals) = r
            .open(3, ConsoleKind::Spice, ip("10.0.0.1"), [0; 16], "default")
            .unwrap();
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
        let (held, _arrivals) = r
            .open(5, ConsoleKind::Vnc, ip("127.0.0.1"), [0; 16], "default")
            .unwrap();
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
    fn a_resume_the_browser_failed_leaves_the_session_parked_and_one_the_vm_failed_ends_it() {
        use crate::end::{End, Refusal, VmFailure};
        assert!(try_again(&End::BrowserClosed));
        assert!(try_again(&End::refused(Refusal::HandshakeTimeout, "slow")));
        assert!(try_again(&End::spice_protocol(
            crate::live::Direction::BrowserToVm,
            &vizor_spice::Error::Malformed {
                what: "SPICE link",
                why: "broken"
            }
        )));
        assert!(!try_again(&End::vm(VmFailure::Auth, "wrong password")));
        assert!(!try_again(&End::VmClosed));
        assert!(!try_again(&End::Audit("disk full".into())));
        assert!(!try_again(&End::Shutdown));
    }

    #[test]
    fn a_connection_that_ended_takes_no_resume_and_off_means_off() {
        let r = Resumes::new(Duration::from_secs(30));
        let (held, _arrivals) = r
            .open(9, ConsoleKind::Vnc, ip("127.0.0.1"), [0; 16], "default")
            .unwrap();
        let c = current(held.slot());
        drop(held);
        assert!(r.get(9).is_none());
        assert_eq!(
            r.claim(&c, ip("127.0.0.1"), Instant::now()).err(),
            Some(ResumeError::Invalid)
        );
        assert!(Resumes::new(Duration::ZERO)
            .open(1, ConsoleKind::Vnc, ip("127.0.0.1"), [0; 16], "default")
            .is_none());
    }
}
