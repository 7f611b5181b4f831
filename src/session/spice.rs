//! The SPICE relay: one browser WebSocket per SPICE channel, each linked by vizor to
//! the same channel of QEMU's spice-server.
//!
//! The browser links to vizor, which answers with its own RSA key and QEMU's
//! capabilities and ignores the browser's ticket: the token is the credential. vizor
//! links to QEMU with the browser's capabilities (minus SASL) and a ticket made from
//! the password libvirt stores, encrypted with QEMU's key (RSA-OAEP with SHA-1). After
//! the link, messages are framed both ways; inputs are audited before they are
//! forwarded, agent clipboard traffic is audited both ways, and the main channel's
//! MAIN_INIT gives the session id that admits the session's other channels.

use super::browser::{BrowserRx, BrowserTx};
use super::{
    audit_failed, close_upstream, connect, drive, write_upstream, Conn, End, Meter, Refusal,
    Source, Upstream, VmFailure, VmLink, VmReader, CLOSE_GRACE,
};
use crate::audit::Event;
use crate::end::ChannelRefusal;
use crate::libvirt::{Console, Target};
use crate::limits::Idle;
use crate::live::{Direction, Identity, Latency, Live};
use crate::policy::spice::{relays, Ping, Rules};
use crate::policy::{Participant, Verdict};
use crate::token::Claims;
use bytes::BytesMut;
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info, warn, Instrument};
use vizor_keys::spice::Keyboard;
use vizor_spice::channel::HeaderKind;
use vizor_spice::handshake::{self, Progress};
use vizor_spice::link::{self, channel_type, link_error};
use zeroize::Zeroizing;

/// vizor's own RSA key, offered to browsers in place of QEMU's.
pub struct LinkKey {
    der: Vec<u8>,
}

impl LinkKey {
    /// A fresh 1024-bit key (the size SPICE's link reply carries).
    pub fn generate() -> Result<LinkKey, String> {
        let key = RsaPrivateKey::new(&mut rand::thread_rng(), 1024)
            .map_err(|e| format!("RSA key: {e}"))?;
        let der = RsaPublicKey::from(&key)
            .to_public_key_der()
            .map_err(|e| format!("RSA key: {e}"))?
            .as_bytes()
            .to_vec();
        // The browser's ticket is never decrypted, so the private half is not kept.
        Ok(LinkKey { der })
    }
}

/// SPICE sessions whose main channel is linked: a token admits the session's other
/// channels, and only those. Each maps to QEMU's session id once MAIN_INIT gave it, and
/// to vizor's session id (the main channel's), which every channel is audited under.
#[derive(Default)]
pub struct Sessions {
    by_nonce: Mutex<HashMap<[u8; 16], Linked>>,
}

/// A SPICE session whose main channel is linked.
struct Linked {
    /// QEMU's session id, from MAIN_INIT.
    qemu: Option<u32>,
    /// The main channel's browser: the session's other channels come from it.
    client: IpAddr,
    /// What the session's other channels share with it.
    shared: Joined,
}

impl Sessions {
    fn register(&self, nonce: [u8; 16], client: IpAddr, shared: &Joined) {
        if let Ok(mut m) = self.by_nonce.lock() {
            m.insert(
                nonce,
                Linked {
                    qemu: None,
                    client: client.to_canonical(),
                    shared: shared.clone(),
                },
            );
        }
    }

    fn set_session_id(&self, nonce: [u8; 16], id: u32) {
        if let Ok(mut m) = self.by_nonce.lock() {
            if let Some(entry) = m.get_mut(&nonce) {
                entry.qemu = Some(id);
            }
        }
    }

    /// Whether the session the token of `nonce` opened is live (its main channel
    /// linked, or parked).
    pub fn is_live(&self, nonce: &[u8; 16]) -> bool {
        self.by_nonce.lock().is_ok_and(|m| m.contains_key(nonce))
    }

    /// The session's main channel was lost: no channel joins it until a resumed main
    /// channel is given a new session id.
    fn unlink(&self, nonce: [u8; 16]) {
        if let Ok(mut m) = self.by_nonce.lock() {
            if let Some(entry) = m.get_mut(&nonce) {
                entry.qemu = None;
            }
        }
    }

    /// The session's main channel is back, linked to a new spice-server session: the
    /// channels that join it (once its MAIN_INIT gives the session id) share `shared`.
    fn relink(&self, nonce: [u8; 16], shared: &Joined) {
        if let Ok(mut m) = self.by_nonce.lock() {
            if let Some(entry) = m.get_mut(&nonce) {
                entry.qemu = None;
                entry.shared = shared.clone();
            }
        }
    }

    fn forget(&self, nonce: &[u8; 16]) {
        if let Ok(mut m) = self.by_nonce.lock() {
            m.remove(nonce);
        }
    }

    /// Admits another channel of the token's session: it names QEMU's session id and
    /// comes from the main channel's address, while that main channel lives. Gives
    /// vizor's session id, its input clock and its console.
    fn admits(
        &self,
        nonce: &[u8; 16],
        connection_id: u32,
        client: IpAddr,
    ) -> Result<Joined, ChannelRefusal> {
        let m = self
            .by_nonce
            .lock()
            .map_err(|_| ChannelRefusal::NoSession)?;
        let l = m.get(nonce).ok_or(ChannelRefusal::NoSession)?;
        if l.qemu != Some(connection_id) {
            return Err(ChannelRefusal::WrongSession);
        }
        if l.client != client.to_canonical() {
            return Err(ChannelRefusal::WrongClient);
        }
        Ok(l.shared.clone())
    }
}

/// What a channel that joins its session shares with it.
#[derive(Clone)]
struct Joined {
    /// vizor's session id.
    session: u64,
    /// The session's last input, on any channel.
    idle: Arc<Idle>,
    /// The console the main channel linked to: the other channels link to the same,
    /// with no lookup of their own.
    console: Arc<Console>,
    /// The session's keyboard as QEMU and spice-server keep it.
    keyboard: Arc<Mutex<Keyboard>>,
    /// The session's inputs channels still open toward spice-server.
    inputs: Arc<OpenInputs>,
}

/// How many of a session's inputs channels are still open toward spice-server. When
/// the main channel goes, spice-server drops the client's other channels with what
/// it has not read yet: the main channel closes after them, so input on record
/// reaches the VM.
struct OpenInputs(tokio::sync::watch::Sender<usize>);

impl OpenInputs {
    fn new() -> Self {
        OpenInputs(tokio::sync::watch::Sender::new(0))
    }

    /// Counts one open until the guard drops.
    fn open(self: &Arc<Self>) -> InputsOpen {
        self.0.send_modify(|n| *n += 1);
        InputsOpen(self.clone())
    }

    /// Waits (up to `CLOSE_GRACE`) until every inputs channel has closed.
    async fn closed(&self) {
        let mut rx = self.0.subscribe();
        let _ = tokio::time::timeout(CLOSE_GRACE, rx.wait_for(|n| *n == 0)).await;
    }
}

/// An inputs channel open toward spice-server.
struct InputsOpen(Arc<OpenInputs>);

impl Drop for InputsOpen {
    fn drop(&mut self) {
        self.0 .0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// One SPICE channel: what it shares with every session, and what is its own.
pub struct Ctx {
    /// What every session shares.
    pub env: Arc<super::Env>,
    /// A fresh id (unique in this process): the session's id when this is its main
    /// channel; a secondary channel takes its main channel's.
    pub id: u64,
    /// The token's claims.
    pub claims: Claims,
    /// The browser's address.
    pub client: SocketAddr,
    /// What the browser may do.
    pub participant: Participant,
    /// The page asked for resuming (`resumable=1`): a session's main channel is sent
    /// a resume credential, and its lost connection parks the session.
    pub resumable: bool,
}

fn link_refusal(code: u32) -> Vec<u8> {
    let mut out = Vec::new();
    handshake::write_refusal(code, &mut out);
    out
}

/// Feeds a link state from `src` until it completes ([`drive`]); what it consumed
/// leaves `buf`, and a broken message is `from`'s protocol error.
async fn link_step<S, N>(
    src: &mut impl Source,
    buf: &mut Vec<u8>,
    state: S,
    from: Direction,
    step: impl FnMut(S, &[u8]) -> Result<Progress<S, N>, vizor_spice::Error>,
) -> Result<N, End> {
    let fail = |e: &vizor_spice::Error| End::spice_protocol(from, e);
    drive(src, buf, state, fail, step)
        .await
        .map(|(next, _)| next)
}

/// The ticket for QEMU: the password and a NUL, RSA-OAEP(SHA-1) with QEMU's key.
fn ticket(pub_key_der: &[u8], password: &[u8]) -> Result<Vec<u8>, End> {
    let key = RsaPublicKey::from_public_key_der(pub_key_der).map_err(|e| End::Protocol {
        dir: Direction::VmToBrowser,
        cause: "spice",
        detail: format!("SPICE protocol error: its link key is not an RSA key: {e}"),
    })?;
    if password.len() > link::MAX_PASSWORD_LEN {
        return Err(End::vm(
            VmFailure::Auth,
            "the SPICE password libvirt stores is longer than SPICE allows",
        ));
    }
    let mut plain = Zeroizing::new(password.to_vec());
    plain.push(0);
    key.encrypt(&mut rand::thread_rng(), Oaep::new::<sha1::Sha1>(), &plain)
        .map_err(|_| End::Internal("encrypting the ticket failed"))
}

/// Runs one channel to its end; closes the browser with the reason. Returns how it
/// ended, the session id it ran under (a secondary channel's is its main's) and the
/// domain.
///
/// The token's first connection (`first`: its token just spent, its console looked up)
/// must be a session's main channel, and takes a session slot; every other channel
/// joins that session, from the same address, while it lives, with its console. Any
/// other channel is refused with [`Refusal::Channel`], which the caller counts like a
/// failed token.
pub async fn run(
    mut ctx: Ctx,
    first: Option<Console>,
    brx: &mut BrowserRx,
    mut btx: BrowserTx,
    mut shutdown: watch::Receiver<bool>,
) -> (End, u64, String) {
    let started = Instant::now();
    let mut bbuf = Vec::new();
    let limits = ctx.env.spice_browser_limits;
    let mut domain = ctx.claims.domain.clone();
    // The browser's link message first: it says which channel, of which session.
    let linking = tokio::time::timeout(
        ctx.env.handshake_timeout,
        link_step(
            brx,
            &mut bbuf,
            handshake::server::ExpectLinkMess::new(limits),
            Direction::BrowserToVm,
            |s, b| s.receive(b),
        ),
    )
    .await;
    let linking = match linking {
        Ok(Ok(m)) => m,
        Ok(Err(end)) => return (close(&btx, end).await, ctx.id, domain),
        Err(_) => {
            let end = End::refused(Refusal::HandshakeTimeout, "no SPICE link message in time");
            return (close(&btx, end).await, ctx.id, domain);
        }
    };
    let mess = linking.mess().clone();
    let chan = channel_type::name(mess.channel_type);
    let refuse = |why: ChannelRefusal, code: u32| {
        let btx = btx.clone();
        async move {
            btx.binary(link_refusal(code)).await;
            close(&btx, End::refused(Refusal::Channel(why), why.told())).await
        }
    };
    if !channel_type::exists(mess.channel_type) {
        btx.binary(link_refusal(link_error::CHANNEL_NOT_AVAILABLE))
            .await;
        let end = End::spice_protocol(
            Direction::BrowserToVm,
            &vizor_spice::Error::Malformed {
                what: "SPICE link",
                why: "a channel type spice-server does not have",
            },
        );
        return (close(&btx, end).await, ctx.id, domain);
    }
    // A session's main channel holds its slot until it ends; its other channels ride
    // on it.
    let (main_channel, joined) = match (mess.channel_type, mess.connection_id) {
        (channel_type::MAIN, 0) => {
            // Not the token's first connection: a replay.
            let Some(console) = first.map(Arc::new) else {
                let end = refuse(ChannelRefusal::Spent, link_error::PERMISSION_DENIED).await;
                return (end, ctx.id, domain);
            };
            domain = console.domain.clone();
            let slot = match ctx
                .env
                .take_slot(ctx.id, ctx.client, &ctx.claims, &console.domain)
                .await
            {
                Ok(slot) => slot,
                Err(end) => {
                    btx.binary(link_refusal(link_error::PERMISSION_DENIED))
                        .await;
                    return (close(&btx, end).await, ctx.id, domain);
                }
            };
            let joined = Joined {
                session: ctx.id,
                idle: Arc::new(Idle::default()),
                console,
                keyboard: Arc::new(Mutex::new(Keyboard::new())),
                inputs: Arc::new(OpenInputs::new()),
            };
            ctx.env
                .spice_sessions
                .register(ctx.claims.nonce, ctx.client.ip(), &joined);
            let main = MainChannel {
                env: ctx.env.clone(),
                nonce: ctx.claims.nonce,
                _slot: slot,
            };
            (Some(main), joined)
        }
        (channel_type::MAIN, _) => {
            let end = refuse(ChannelRefusal::SecondMain, link_error::PERMISSION_DENIED).await;
            return (end, ctx.id, domain);
        }
        (_, 0) => {
            btx.binary(link_refusal(link_error::BAD_CONNECTION_ID))
                .await;
            let end = End::spice_protocol(
                Direction::BrowserToVm,
                &vizor_spice::Error::Malformed {
                    what: "SPICE link",
                    why: "a channel other than main that names no session",
                },
            );
            return (close(&btx, end).await, ctx.id, domain);
        }
        (_, connection_id) => {
            match ctx
                .env
                .spice_sessions
                .admits(&ctx.claims.nonce, connection_id, ctx.client.ip())
            {
                Ok(joined) => {
                    ctx.id = joined.session;
                    domain = joined.console.domain.clone();
                    (None, joined)
                }
                Err(why) => {
                    let end = refuse(why, link_error::BAD_CONNECTION_ID).await;
                    return (end, ctx.id, domain);
                }
            }
        }
    };
    if !relays(&ctx.env.spice, mess.channel_type) {
        // After admission, so the refusal is the session's, on record; before any
        // link toward QEMU, so nothing of the channel reaches the VM.
        btx.binary(link_refusal(link_error::CHANNEL_NOT_AVAILABLE))
            .await;
        let channel = format!("{chan}:{}", mess.channel_id);
        let client = ctx.client.ip().to_string();
        if let Err(e) = ctx
            .env
            .audit
            .record(&Event::ChannelRefused {
                session: ctx.id,
                client: &client,
                channel: &channel,
            })
            .await
        {
            warn!(error = %e, "audit log: channel refusal not written");
        }
        let end = End::refused(
            Refusal::ChannelRefused,
            format!("SPICE {chan} channels are not relayed by this vizor ([spice] allow_channels)"),
        );
        return (close(&btx, end).await, ctx.id, domain);
    }
    let span = tracing::info_span!("channel", session = ctx.id, channel = chan);
    let end = relay_channel(
        &ctx,
        &joined,
        linking,
        bbuf,
        brx,
        &mut btx,
        &mut shutdown,
        chan,
        started,
    )
    .instrument(span)
    .await;
    drop(main_channel);
    (close(&btx, end).await, ctx.id, domain)
}

/// A session's main channel while it lives: its slot taken, its session open to the
/// session's other channels. Dropped however the channel ends.
struct MainChannel {
    env: Arc<super::Env>,
    nonce: [u8; 16],
    _slot: crate::limits::Slot,
}

impl Drop for MainChannel {
    fn drop(&mut self) {
        self.env.spice_sessions.forget(&self.nonce);
    }
}

async fn close(btx: &BrowserTx, end: End) -> End {
    btx.close(end.close_code(), &end.told()).await;
    end
}

#[allow(clippy::too_many_arguments)]
async fn relay_channel(
    ctx: &Ctx,
    joined: &Joined,
    linking: handshake::server::Linking,
    mut bbuf: Vec<u8>,
    brx: &mut BrowserRx,
    btx: &mut BrowserTx,
    shutdown: &mut watch::Receiver<bool>,
    chan: &'static str,
    started: Instant,
) -> End {
    let console = &*joined.console;
    let mess = linking.mess().clone();
    let linked = tokio::time::timeout(
        ctx.env.handshake_timeout,
        link_both(ctx, console, linking, &mut bbuf, brx, btx),
    )
    .await;
    let (up, target, ubuf, kind) = match linked {
        Ok(Ok(x)) => x,
        Ok(Err(end)) => return end,
        Err(_) => {
            return End::refused(
                Refusal::HandshakeTimeout,
                "SPICE link did not complete in time",
            )
        }
    };
    let upstream = target.to_string();
    let client = ctx.client.to_string();
    let channel_label = format!("spice:{chan}:{}", mess.channel_id);
    if let Err(e) = ctx
        .env
        .audit
        .record(&Event::SessionStart {
            session: ctx.id,
            token_id: &ctx.claims.token_id(),
            user: &ctx.claims.user,
            domain: &console.domain,
            uuid: &console.uuid,
            kind: ctx.claims.kind,
            client: &client,
            host: (console.host != crate::config::DEFAULT_HOST).then_some(console.host.as_str()),
            upstream: &upstream,
            upstream_tls: up.tls,
            vm_password: up.password,
            channel: Some(&channel_label),
            role: None,
            joins: None,
            unannounced: false,
        })
        .await
    {
        return audit_failed(e);
    }
    info!(header = ?kind, "SPICE channel relaying");
    let hold = ctx.env.live.hold(
        Identity {
            id: ctx.id,
            kind: ctx.claims.kind,
            user: &ctx.claims.user,
            domain: &console.domain,
            uuid: &console.uuid,
            host: &console.host,
            token_id: &ctx.claims.token_id(),
            client: ctx.client,
        },
        Some(format!("{chan}:{}", mess.channel_id)),
    );
    brx.pings().measure_live(hold.live().clone());
    ctx.env.slots.listed_soon();
    let meter = Meter::new(&ctx.env.metrics, "spice", hold.live().clone());
    ctx.env
        .metrics
        .handshake_seconds
        .with_label_values(&["spice"])
        .observe(started.elapsed().as_secs_f64());
    let rtt = RoundTrips {
        histogram: Some(
            ctx.env
                .metrics
                .frame_latency_seconds
                .with_label_values(&["spice"]),
        ),
        live: Some(hold.live().clone()),
        ..RoundTrips::default()
    };
    // A session's main channel can be resumed when its page asked for it and resuming
    // is on: the other channels come back with it.
    let (held, mut arrivals) = ctx.env.resumes.open_if(
        ctx.resumable && mess.channel_type == channel_type::MAIN,
        ctx.id,
        ctx.claims.kind,
        ctx.client.ip(),
        ctx.claims.uuid,
        &ctx.claims.host,
    );
    let slot = held.as_ref().map(|h| h.slot().clone());
    let mut left = None;
    let leg = Leg {
        up: up.stream,
        early_up: ubuf,
        early_browser: bbuf,
        kind,
        _done: None,
    };
    let end = legs(
        ctx,
        joined,
        mess.channel_type,
        leg,
        (brx, btx),
        shutdown,
        (&meter, &rtt),
        slot.as_deref().zip(arrivals.as_mut()),
        &mut left,
    )
    .await;
    super::resume::refuse_the_rest(&end, held, left, arrivals.as_mut());
    if let Err(e) = ctx
        .env
        .audit
        .record(&meter.session_end(
            ctx.id,
            started,
            &end,
            rtt.median_ms(),
            None,
            Some(&channel_label),
        ))
        .await
    {
        warn!(error = %e, "audit log: session end not written");
    }
    end
}

/// One browser connection of a channel, linked, with its own link to spice-server.
struct Leg {
    up: Conn,
    /// What QEMU sent after the link.
    early_up: Vec<u8>,
    /// What the browser sent after the link.
    early_browser: Vec<u8>,
    kind: HeaderKind,
    /// A resumed connection's hand-back to the request that brought it.
    _done: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Relays a channel's browser connections in turn: a main channel whose connection is
/// lost parks the session until its page comes back with the channel's credential
/// (or the window ends), and links to spice-server anew; the session's other channels
/// then link again under the new session id. A resuming connection the session did
/// not take is left in `left`.
#[allow(clippy::too_many_arguments)]
async fn legs(
    ctx: &Ctx,
    joined: &Joined,
    channel: u8,
    mut leg: Leg,
    (brx, btx): (&mut BrowserRx, &mut BrowserTx),
    shutdown: &mut watch::Receiver<bool>,
    (meter, rtt): (&Meter, &RoundTrips),
    mut resume: Option<(
        &super::resume::Slot,
        &mut tokio::sync::mpsc::Receiver<super::resume::Attach>,
    )>,
    left: &mut Option<super::resume::Attach>,
) -> End {
    // What the session's channels share; a resume gives it a new spice-server session.
    let mut joined = joined.clone();
    let clock = joined.idle.clone();
    let idle = &*clock;
    let live = meter.live();
    let max = ctx.claims.policy.max_duration;
    loop {
        // The page's resume credential comes first, in a text message spice-html5
        // never sees (the page keeps it), before anything of the session.
        if let Some(c) = resume.as_ref().and_then(|(s, _)| s.credential()) {
            let mut words = Zeroizing::new(String::with_capacity(c.len() + 16));
            words.push_str("{\"resume\":\"");
            words.push_str(&c);
            words.push_str("\"}");
            btx.text(std::mem::take(&mut *words)).await;
        }
        // Whatever stops the relay, it closes the way a client leaves, with what the
        // VM does then on record.
        let stop = async {
            tokio::select! {
                end = super::stopped(shutdown, live.state(), true, max, live.age()) => end,
                _ = idle.expired(ctx.env.idle_timeout) => End::Idle(idle.idle_for()),
            }
        };
        let (end, arrived) = relay(
            ctx,
            channel,
            leg.kind,
            leg.up,
            leg.early_up,
            leg.early_browser,
            brx,
            btx,
            meter,
            rtt,
            idle,
            &joined,
            stop,
            resume.as_mut().map(|(s, a)| (*s, &mut **a)),
        )
        .await;
        let Some((slot, arrivals)) = resume.as_mut() else {
            return end;
        };
        // Parked only when the connection was lost (not left with a close frame) or a
        // resume took its place.
        let lost = end.browser_gone() && !brx.said_goodbye();
        if !lost && arrived.is_none() {
            *left = arrived;
            return end;
        }
        let cause = if arrived.is_some() {
            "replaced"
        } else {
            end.label()
        };
        // spice-server dropped the session's other channels with its main channel: none
        // joins until the main channel is back with a new session id.
        ctx.env.spice_sessions.unlink(ctx.claims.nonce);
        let parking = super::resume::Parking {
            env: &ctx.env,
            session: ctx.id,
            client: ctx.client,
            live,
            owner: true,
            max,
            idle,
            idle_timeout: ctx.env.idle_timeout,
        };
        let parked = match parking.park(slot, (&mut *brx, &*btx), cause, None).await {
            Ok(p) => p,
            Err(end) => {
                *left = arrived;
                return end;
            }
        };
        let mut next = arrived;
        loop {
            let back = match parking
                .wait(&parked, arrivals, shutdown, || live.age(), next.take())
                .await
            {
                Ok(a) => a,
                Err((end, rejected)) => {
                    *left = rejected;
                    return end;
                }
            };
            let reattached = tokio::select! {
                biased;
                end = super::stopped(shutdown, live.state(), true, max, live.age()) => Err((end, None)),
                r = reattach(ctx, &joined, &parking, &parked, back, (&mut *brx, &mut *btx)) => r,
            };
            match reattached {
                Ok((next_leg, console)) => {
                    leg = next_leg;
                    // A new spice-server session: the channels that join it link to the
                    // console as it is now, and model its keyboard afresh (spice-server
                    // released the last session's keys), apart from any channel of the
                    // last session still closing.
                    joined.console = console;
                    joined.keyboard = Arc::new(Mutex::new(Keyboard::new()));
                    joined.inputs = Arc::new(OpenInputs::new());
                    ctx.env.spice_sessions.relink(ctx.claims.nonce, &joined);
                    rtt.restart();
                    live.set_parked(None);
                    break;
                }
                Err((end, None)) if super::resume::try_again(&end) => {
                    // Its credential is still good: the session waits on.
                    info!(session = ctx.id, reason = %end, "a resume failed on the browser's side");
                    btx.abort().await;
                    brx.shut();
                }
                Err((end, rejected)) => {
                    // The VM is gone or changed: the session ends, and the page is told.
                    *left = rejected;
                    return end;
                }
            }
        }
    }
}

/// A page came back to a parked SPICE session with its main channel's link: a new
/// link to spice-server, authenticated as at the start with the console libvirt
/// describes now (the same run of the VM), and the page's connection in the place of
/// the lost one, on record before anything from QEMU reaches it. A failure ends the
/// session, but for one on the browser's side ([`super::resume::try_again`]): the
/// browser's part of the link is done here, after spice-server's reply. A VM that is
/// gone or restarted hands the page back to be told why.
async fn reattach(
    ctx: &Ctx,
    joined: &Joined,
    parking: &super::resume::Parking<'_>,
    parked: &super::resume::Parked,
    back: super::resume::Attach,
    (brx, btx): (&mut BrowserRx, &mut BrowserTx),
) -> Result<(Leg, Arc<Console>), (End, Option<super::resume::Attach>)> {
    let console = match back.same_run(&joined.console) {
        Ok(c) => Arc::new(c),
        Err(end) => return Err((end, Some(back))),
    };
    let taken = back.take_over(brx, btx);
    let super::resume::Hello::Spice { linking, early } = taken.hello else {
        return Err((End::Internal("a resume of another console kind"), None));
    };
    brx.pings().measure_live(parking.live.clone());
    let mut bbuf = early;
    let linked = tokio::time::timeout(
        ctx.env.handshake_timeout,
        link_both(ctx, &console, *linking, &mut bbuf, brx, btx),
    )
    .await
    .unwrap_or_else(|_| {
        Err(End::refused(
            Refusal::HandshakeTimeout,
            "SPICE link did not complete in time",
        ))
    });
    let (up, _, ubuf, kind) = linked.map_err(|e| (e, None))?;
    let close = |up: VmLink| async move {
        let (mut rd, mut wr) = tokio::io::split(up.stream.boxed());
        close_upstream(&mut wr, Some(&mut rd)).await;
    };
    let Some(rotation) = taken.claim.commit() else {
        // A newer try of the page replaced this one (or no randomness for the next
        // credential): the session waits on for it.
        close(up).await;
        return Err((End::BrowserClosed, None));
    };
    let resumed = parking
        .resumed(parked, taken.client, rotation, up.tls, up.password)
        .await;
    if let Err(end) = resumed {
        close(up).await;
        return Err((end, None));
    }
    info!(session = ctx.id, rotation, "SPICE session resumed");
    let leg = Leg {
        up: up.stream,
        early_up: ubuf,
        early_browser: bbuf,
        kind,
        _done: Some(taken.done),
    };
    Ok((leg, console))
}

/// A resuming page's SPICE main channel, up to its link message (within the handshake
/// timeout): the session it resumes links it to spice-server. Anything but a new main
/// channel (connection id 0) is refused.
pub async fn resume_link(
    env: &super::Env,
    brx: &mut BrowserRx,
    btx: &BrowserTx,
) -> Result<super::resume::Hello, End> {
    let mut bbuf = Vec::new();
    let linking = tokio::time::timeout(
        env.handshake_timeout,
        link_step(
            brx,
            &mut bbuf,
            handshake::server::ExpectLinkMess::new(env.spice_browser_limits),
            Direction::BrowserToVm,
            |s, b| s.receive(b),
        ),
    )
    .await
    .unwrap_or_else(|_| {
        Err(End::refused(
            Refusal::HandshakeTimeout,
            "no SPICE link message in time",
        ))
    })?;
    let mess = linking.mess();
    if mess.channel_type != channel_type::MAIN || mess.connection_id != 0 {
        btx.binary(link_refusal(link_error::BAD_CONNECTION_ID))
            .await;
        return Err(End::spice_protocol(
            Direction::BrowserToVm,
            &vizor_spice::Error::Malformed {
                what: "SPICE link",
                why: "a resume is a session's new main channel",
            },
        ));
    }
    Ok(super::resume::Hello::Spice {
        linking: Box::new(linking),
        early: bbuf,
    })
}

/// Links vizor to QEMU and the browser to vizor; returns the upstream stream, bytes
/// QEMU sent after the link result, and the header both legs use.
async fn link_both(
    ctx: &Ctx,
    console: &Console,
    linking: handshake::server::Linking,
    bbuf: &mut Vec<u8>,
    brx: &mut BrowserRx,
    btx: &BrowserTx,
) -> Result<(VmLink, Target, Vec<u8>, HeaderKind), End> {
    let limits = ctx.env.spice_vm_limits;
    let connecting = Instant::now();
    let (mut up, target, tls) = match (ctx.env.upstream_tls_for(&console.host), &console.tls_target) {
        // SPICE's TLS port speaks TLS from the first byte.
        (Some(tls), Some(target)) => {
            let plain = connect(target, &ctx.env.dial_for(&console.host)).await?;
            let tls = tls
                .connect(plain.boxed(), target)
                .await
                .map_err(|e| End::vm(VmFailure::Tls, e))?;
            (Conn::Other(Box::new(tls)), target.clone(), true)
        }
        (Some(tls), None) if tls.require => {
            return Err(End::vm(
                VmFailure::Tls,
                "the VM's SPICE console has no TLS port, and [upstream_tls] requires TLS",
            ))
        }
        (None, Some(tls_target)) if *tls_target == console.target => {
            return Err(End::vm(
                VmFailure::Tls,
                "the VM's SPICE console listens on its TLS port only; configure [upstream_tls] with the CA of its certificate",
            ))
        }
        _ => (
            connect(&console.target, &ctx.env.dial_for(&console.host)).await?,
            console.target.clone(),
            false,
        ),
    };
    ctx.env
        .metrics
        .upstream_connect_seconds
        .with_label_values(&["spice"])
        .observe(connecting.elapsed().as_secs_f64());
    let mut ubuf = Vec::new();
    let mut out = Vec::new();
    let expect_reply = handshake::client::start(linking.mess(), limits, &mut out);
    write_upstream(&mut up.as_stream(), &out).await?;
    let mut vm = Upstream(up.as_stream(), "SPICE link");
    let replied = link_step(
        &mut vm,
        &mut ubuf,
        expect_reply,
        Direction::VmToBrowser,
        |s, b| s.receive(b),
    )
    .await?;
    if let Some(code) = replied.refused() {
        btx.binary(link_refusal(code)).await;
        return Err(End::vm(
            VmFailure::Link,
            format!(
                "the VM refused the SPICE link: {}",
                link_error::describe(code)
            ),
        ));
    }
    if !replied.takes_ticket() {
        btx.binary(link_refusal(link_error::PERMISSION_DENIED))
            .await;
        return Err(End::vm(
            VmFailure::Auth,
            "the VM's SPICE server takes SASL authentication only; vizor authenticates with the password libvirt stores, so turn SPICE SASL off (qemu.conf spice_sasl) for consoles behind vizor",
        ));
    }
    out.clear();
    let expect_auth = linking.reply(replied.reply(), &ctx.env.spice_key.der, &mut out);
    if !btx.binary(std::mem::take(&mut out)).await {
        return Err(End::BrowserClosed);
    }
    // The browser's ticket is read and dropped: its token already authenticated it.
    let mut refusal = Vec::new();
    let expect_ticket = match link_step(brx, bbuf, expect_auth, Direction::BrowserToVm, |s, b| {
        s.receive(b, &mut refusal)
    })
    .await
    {
        Ok(t) => t,
        Err(end) => {
            if !refusal.is_empty() {
                btx.binary(refusal).await;
            }
            return Err(end);
        }
    };
    let ticketed = link_step(brx, bbuf, expect_ticket, Direction::BrowserToVm, |s, b| {
        Ok(s.receive(b))
    })
    .await?;
    let password = console
        .password
        .as_ref()
        .map(|p| p.as_bytes())
        .unwrap_or_default();
    let encrypted = ticket(&replied.reply().pub_key, password)?;
    out.clear();
    let expect_result = replied.send_ticket(&encrypted, &mut out);
    write_upstream(&mut vm.0, &out).await?;
    let result = link_step(
        &mut vm,
        &mut ubuf,
        expect_result,
        Direction::VmToBrowser,
        |s, b| Ok(s.receive(b)),
    )
    .await?;
    out.clear();
    let header = ticketed.result(result, &mut out);
    if !btx.binary(out).await {
        return Err(End::BrowserClosed);
    }
    let Some(kind) = header else {
        return Err(if result == link_error::PERMISSION_DENIED {
            End::vm(VmFailure::Auth, "authentication to the VM failed")
        } else {
            End::vm(
                VmFailure::Link,
                format!(
                    "the VM refused the SPICE link: {}",
                    link_error::describe(result)
                ),
            )
        });
    };
    let link = VmLink {
        stream: up,
        tls,
        // spice-server checks the ticket unless ticketing is off (no password).
        password: console.password.is_some(),
    };
    Ok((link, target, ubuf, kind))
}

#[allow(clippy::too_many_arguments)]
async fn relay(
    ctx: &Ctx,
    channel: u8,
    kind: HeaderKind,
    up: Conn,
    early_up: Vec<u8>,
    early_browser: Vec<u8>,
    brx: &mut BrowserRx,
    btx: &BrowserTx,
    meter: &Meter,
    rtt: &RoundTrips,
    idle: &Idle,
    joined: &Joined,
    stop: impl std::future::Future<Output = End>,
    resume: Option<(
        &super::resume::Slot,
        &mut tokio::sync::mpsc::Receiver<super::resume::Attach>,
    )>,
) -> (End, Option<super::resume::Attach>) {
    let keyboard = &*joined.keyboard;
    // The rest of a long display message goes from socket to socket when both
    // connections are plain TCP (SPICE sessions are not recorded).
    let (mut up_rd, up_wr) = VmReader::split(up, btx.can_splice());
    // The VM's writer, shared by the browser's input and a paste being typed: each
    // holds it from judging a message to writing it, so the audit's order is the
    // order QEMU receives.
    let writer: SpiceWriter = tokio::sync::Mutex::new(up_wr);
    // Counted open from here until it has closed toward spice-server.
    let _inputs_open = (channel == channel_type::INPUTS).then(|| joined.inputs.open());
    let rules = Mutex::new(Rules::new(
        channel,
        kind,
        ctx.env.spice_browser_limits,
        ctx.env.spice_vm_limits,
        ctx.participant,
        &ctx.env.spice,
        ctx.env.audit.clipboard_content(),
    ));
    let started = async {
        let (first, notes) = lock(&rules)?.start(keyboard)?;
        record(ctx, &notes).await?;
        if !first.is_empty() {
            write_upstream(&mut *writer.lock().await, &first).await?;
        }
        Ok::<(), End>(())
    };
    if let Err(end) = started.await {
        return (end, None);
    }
    // The inputs channel takes the page's pastes ("Paste as keys"): SPICE carries
    // scancodes, which QEMU does not map through a keymap, so every layout types.
    let inputs = channel == channel_type::INPUTS;
    let (seat, mut typing) = crate::paste::Seat::new(if inputs {
        &vizor_keys::layout::Layout::ALL
    } else {
        &[]
    });
    let progress = seat.progress();
    let seated = inputs.then(|| meter.live().seat(ctx.id, seat));
    let arrived = Mutex::new(None);
    let browser_to_vm = async {
        let mut buf = early_browser;
        let mut resume = resume;
        let mut spoke = false;
        loop {
            let mut held = writer.lock().await;
            let up_wr = &mut *held;
            let mut pos = 0;
            loop {
                let Some(step) = lock(&rules)?.from_browser(&buf[pos..], keyboard)? else {
                    break;
                };
                record(ctx, &step.notes).await?;
                if let Some(end) = step.end {
                    return Err(end);
                }
                if step.input {
                    idle.touch();
                }
                if let Some(Ping::Answered(id)) = step.ping {
                    rtt.pong(id);
                }
                let instead = match step.verdict {
                    Verdict::Forward => {
                        pos += step.len;
                        continue;
                    }
                    Verdict::Rewrite(out) => out,
                    Verdict::Drop(_) => Vec::new(),
                };
                write_upstream(up_wr, &buf[..pos]).await?;
                write_upstream(up_wr, &instead).await?;
                meter.add(Direction::BrowserToVm, (pos + instead.len()) as u64);
                buf.drain(..pos + step.len);
                pos = 0;
            }
            if pos > 0 {
                write_upstream(up_wr, &buf[..pos]).await?;
                meter.add(Direction::BrowserToVm, pos as u64);
                buf.drain(..pos);
            }
            drop(held);
            // A page resuming while this main channel still looks open (its browser
            // saw it dead first) takes its place: heard only here, between two
            // messages, so whatever was read is on record and written whole.
            tokio::select! {
                biased;
                Some(a) = async { resume.as_mut()?.1.recv().await } => {
                    if let Ok(mut taken) = arrived.lock() {
                        *taken = Some(a);
                    }
                    return Err(End::BrowserClosed);
                }
                r = brx.read_into(&mut buf) => { r?; }
            }
            // The page speaks on this connection, which it was sent the current resume
            // credential on before anything of the session: it has it.
            if !spoke {
                spoke = true;
                if let Some((slot, _)) = &resume {
                    slot.confirmed();
                }
            }
        }
    };
    let mut keys = SpiceKeys {
        ctx,
        rules: &rules,
        writer: &writer,
        keyboard,
        meter,
        idle,
    };
    let pasting = typing.serve(&ctx.env.audit, ctx.id, &mut keys);
    let vm_to_browser = async {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        buf.extend_from_slice(&early_up);
        loop {
            let mut consumed = 0;
            loop {
                let Some(step) = lock(&rules)?.from_vm(&buf[consumed..], keyboard)? else {
                    break;
                };
                record(ctx, &step.notes).await?;
                if let Some(end) = step.end {
                    return Err(end);
                }
                if let Some(session_id) = step.session_id {
                    ctx.env
                        .spice_sessions
                        .set_session_id(ctx.claims.nonce, session_id);
                    debug!(session_id, "SPICE session linked");
                }
                if let Some(Ping::Sent(id)) = step.ping {
                    rtt.ping(id);
                }
                let instead = match step.verdict {
                    Verdict::Forward => {
                        consumed += step.len;
                        continue;
                    }
                    Verdict::Rewrite(out) => out,
                    Verdict::Drop(_) => Vec::new(),
                };
                if consumed > 0 {
                    btx.bytes(buf.split_to(consumed)).await?;
                }
                let _ = buf.split_to(step.len);
                meter.add(Direction::VmToBrowser, (consumed + instead.len()) as u64);
                if !instead.is_empty() {
                    btx.bytes(BytesMut::from(&instead[..])).await?;
                }
                consumed = 0;
            }
            if consumed > 0 {
                btx.bytes(buf.split_to(consumed)).await?;
                meter.add(Direction::VmToBrowser, consumed as u64);
            }
            // The rest of a long display message goes from socket to socket; the
            // decoder, told its length, then stands after it.
            let pending = lock(&rules)?.may_splice(buf.len(), super::SPLICE_MIN);
            if up_rd
                .splice(btx, pending, meter, |n| lock(&rules)?.spliced(n))
                .await?
            {
                continue;
            }
            // Not spliced: read (with no pipe to be had, this much is read instead).
            up_rd.read(&mut buf).await?;
        }
    };
    // A stop goes first: after it, nothing more is judged or relayed (a splice under
    // way may finish its frame: the browser's writer holds the VM's reader until then,
    // and the VM's leg closes without draining it).
    let r: Result<(), End> = tokio::select! {
        biased;
        end = stop => Err(end),
        r = browser_to_vm => r,
        r = vm_to_browser => r,
        r = pasting => r,
    };
    // No paste is taken from now on.
    drop(seated);
    drop(typing);
    let mut up_wr = writer.into_inner();
    // A paste the channel's end stopped: how far it got (its keys are on record).
    let interrupted = *progress.borrow();
    crate::paste::interrupted(&ctx.env.audit, ctx.id, interrupted).await;
    let end = r.err().unwrap_or(End::VmClosed);
    let vm_gone = end.vm_gone();
    let closing = rules
        .lock()
        .map(|mut r| r.closing(keyboard, vm_gone))
        .unwrap_or_default();
    for note in &closing.notes {
        // Each on its own: one that is not written does not keep the others out.
        if let Err(e) = super::record_note(&ctx.env.audit, ctx.id, note).await {
            warn!(error = %e, "audit log: a record of the channel's close not written");
        }
    }
    if let Some(init) = closing.display_init {
        // The reader is in hand: spice-server sends a display channel nothing over
        // 64 KiB (nothing is spliced) before DISPLAY_INIT (dcc.cpp, dcc_start).
        if let (Ok(()), Some(rd)) = (up_wr.write_all(&init).await, up_rd.as_read()) {
            // Let the display worker take it (it answers) before the socket closes.
            let mut tmp = [0u8; 4096];
            let _ = tokio::time::timeout(Duration::from_millis(500), rd.read(&mut tmp)).await;
            debug!("DISPLAY_INIT completed for a display channel the browser left early");
        }
    }
    if !vm_gone {
        if channel == channel_type::MAIN {
            joined.inputs.closed().await;
        }
        close_upstream(&mut up_wr, up_rd.as_read()).await;
    }
    let arrived = arrived.into_inner().ok().flatten();
    (end, arrived)
}

/// The VM's writer of a channel, shared by the browser's input and a paste.
type SpiceWriter = tokio::sync::Mutex<super::VmWrite>;

/// A paste's keys into a SPICE inputs channel: each judged as the browser's own, on
/// record, then written while the VM's writer is held.
struct SpiceKeys<'a> {
    ctx: &'a Ctx,
    rules: &'a Mutex<Rules>,
    writer: &'a SpiceWriter,
    keyboard: &'a Mutex<vizor_keys::spice::Keyboard>,
    meter: &'a Meter,
    idle: &'a Idle,
}

impl crate::paste::Keys for SpiceKeys<'_> {
    /// As spice-server sees the locks, the presses vizor judged included.
    fn caps_lock(&self) -> Result<bool, End> {
        Ok(lock(self.keyboard)?.locks().caps)
    }

    async fn key(&mut self, ev: vizor_keys::layout::Event) -> Result<(), End> {
        let mut up_wr = self.writer.lock().await;
        let (bytes, step) = lock(self.rules)?.from_paste(ev, self.keyboard)?;
        record(self.ctx, &step.notes).await?;
        if let Some(end) = step.end {
            return Err(end);
        }
        if step.input {
            self.idle.touch();
        }
        let out = match step.verdict {
            Verdict::Forward => bytes,
            Verdict::Rewrite(out) => out,
            Verdict::Drop(_) => Vec::new(),
        };
        if !out.is_empty() {
            write_upstream(&mut *up_wr, &out).await?;
            self.meter.add(Direction::BrowserToVm, out.len() as u64);
        }
        Ok(())
    }
}

/// Records `notes`, in order, before what they come from moves on.
async fn record(ctx: &Ctx, notes: &[crate::policy::Note]) -> Result<(), End> {
    for note in notes {
        super::record_note(&ctx.env.audit, ctx.id, note)
            .await
            .map_err(audit_failed)?;
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, End> {
    m.lock()
        .map_err(|_| End::Internal("SPICE rules lock poisoned"))
}

/// Server-ping to client-pong round trips on the main channel: the session's network
/// round trip as the browser experiences it. Bounded: a client that never answers
/// cannot grow it.
#[derive(Default)]
pub struct RoundTrips {
    inner: Mutex<(HashMap<u32, Instant>, Vec<Duration>)>,
    histogram: Option<prometheus::Histogram>,
    live: Option<Arc<Live>>,
}

impl RoundTrips {
    const MAX_OUTSTANDING: usize = 64;
    const MAX_SAMPLES: usize = 256;

    fn ping(&self, id: u32) {
        if let Ok(mut g) = self.inner.lock() {
            if g.0.len() < Self::MAX_OUTSTANDING {
                g.0.insert(id, Instant::now());
            }
        }
    }

    fn pong(&self, id: u32) {
        if let Ok(mut g) = self.inner.lock() {
            if let Some(sent) = g.0.remove(&id) {
                if g.1.len() == Self::MAX_SAMPLES {
                    g.1.remove(0);
                }
                g.1.push(sent.elapsed());
                if let Some(h) = &self.histogram {
                    h.observe(sent.elapsed().as_secs_f64());
                }
                if let Some(live) = &self.live {
                    live.observe(Latency::Frame, sent.elapsed());
                }
                debug!(
                    rtt_ms = sent.elapsed().as_secs_f64() * 1000.0,
                    "SPICE ping answered"
                );
            }
        }
    }

    /// A new connection to spice-server numbers its pings afresh: those of the last
    /// are forgotten.
    fn restart(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.0.clear();
        }
    }

    /// The median round trip, in milliseconds, if any ping was answered.
    pub fn median_ms(&self) -> Option<f64> {
        let g = self.inner.lock().ok()?;
        let mut v = g.1.clone();
        v.sort();
        v.get(v.len() / 2).map(|d| d.as_secs_f64() * 1000.0)
    }
}
