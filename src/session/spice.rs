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
use super::transfers::{self, Transfers, Way};
use super::{
    audit_failed, close_upstream, connect, read_upstream, write_upstream, Conn, End, Meter,
    Refusal, Source, Stream, Upstream, VmFailure, VmLink, CLOSE_GRACE,
};
use crate::audit::{Event, KeyEvent};
use crate::config::{FileTransfer, SpiceConfig};
use crate::libvirt::{Console, Target};
use crate::limits::Idle;
use crate::live::{Direction, Identity, Latency, Live};
use crate::token::Claims;
use bytes::BytesMut;
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info, warn, Instrument};
use vizor_keys::{spice::Keyboard, Locks, Origin, Stroke};
use vizor_spice::agent::{self, AgentEvent, AgentStream};
use vizor_spice::channel::{write_message, Decoder, Frame, HeaderKind};
use vizor_spice::handshake::{self, Progress};
use vizor_spice::link::{self, channel_type, link_error};
use vizor_spice::msg;
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

/// Why a channel that is not a session's first main channel was refused. Each counts
/// as a failed token, like a refused token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelRefusal {
    /// A main channel for a new session, with a token spent already.
    Spent,
    /// A main channel that names a session (spice-server takes it for a migration
    /// target and drops the live client).
    SecondMain,
    /// The token's session is not linked (not yet, or no more).
    NoSession,
    /// Another session id than QEMU gave the token's session.
    WrongSession,
    /// From another address than the session's main channel.
    WrongClient,
}

impl ChannelRefusal {
    /// A stable label for metrics and audit records.
    pub fn label(self) -> &'static str {
        match self {
            ChannelRefusal::Spent => "replayed",
            ChannelRefusal::SecondMain => "spice_second_main",
            ChannelRefusal::NoSession => "spice_no_session",
            ChannelRefusal::WrongSession => "spice_wrong_session",
            ChannelRefusal::WrongClient => "spice_wrong_client",
        }
    }

    /// What the browser is told.
    pub(crate) fn told(self) -> &'static str {
        match self {
            ChannelRefusal::Spent => "token already used",
            ChannelRefusal::SecondMain => "a second SPICE main channel is not allowed",
            ChannelRefusal::NoSession | ChannelRefusal::WrongSession => {
                "token already used (not for this SPICE session)"
            }
            ChannelRefusal::WrongClient => "this SPICE session belongs to another address",
        }
    }
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
}

/// Whether vizor relays channels of type `t`: the ones it parses always, the ones
/// whose contents it cannot audit (USB redirection, WebDAV, smartcard, port) only
/// when `[spice] allow_channels` names them.
pub fn relays(config: &SpiceConfig, t: u8) -> bool {
    matches!(t, channel_type::MAIN..=channel_type::RECORD)
        || config.allow_channels.iter().any(|c| c.channel_type() == t)
}

fn link_refusal(code: u32) -> Vec<u8> {
    let mut out = Vec::new();
    handshake::write_refusal(code, &mut out);
    out
}

/// Feeds a link state from `src` until it completes; what it consumed leaves `buf`.
async fn link_step<S, N>(
    src: &mut impl Source,
    buf: &mut Vec<u8>,
    mut state: S,
    from: Direction,
    mut step: impl FnMut(S, &[u8]) -> Result<Progress<S, N>, vizor_spice::Error>,
) -> Result<N, End> {
    loop {
        match step(state, buf).map_err(|e| End::spice_protocol(from, &e))? {
            Progress::Done { next, consumed } => {
                buf.drain(..consumed);
                return Ok(next);
            }
            Progress::NeedMore(s) => state = s,
        }
        src.fill(buf).await?;
    }
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
    btx: BrowserTx,
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
        &btx,
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
    btx: &BrowserTx,
    shutdown: &mut watch::Receiver<bool>,
    chan: &'static str,
    started: Instant,
) -> End {
    let console = &*joined.console;
    let idle = &*joined.idle;
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
            upstream: &upstream,
            upstream_tls: up.tls,
            vm_password: up.password,
            channel: Some(&channel_label),
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
            token_id: &ctx.claims.token_id(),
            client: ctx.client,
        },
        Some(format!("{chan}:{}", mess.channel_id)),
    );
    brx.pings().measure_live(hold.live().clone());
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
    let end = tokio::select! {
        end = relay(ctx, mess.channel_type, kind, up.stream.boxed(), ubuf, bbuf, brx, btx, &meter, &rtt, idle, joined) => end,
        _ = shutdown.wait_for(|s| *s) => End::Shutdown,
        _ = idle.expired(ctx.env.idle_timeout) => End::Idle(idle.idle_for()),
    };
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
    let (mut up, target, tls) = match (ctx.env.upstream_tls.as_deref(), &console.tls_target) {
        // SPICE's TLS port speaks TLS from the first byte.
        (Some(tls), Some(target)) => {
            let plain = connect(target, ctx.env.dial).await?;
            let tls = tls
                .connect(plain.boxed(), target)
                .await
                .map_err(|e| End::vm(VmFailure::Tls, e))?;
            (Box::new(tls) as Box<dyn Stream>, target.clone(), true)
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
            connect(&console.target, ctx.env.dial).await?.boxed(),
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
    write_upstream(&mut up, &out).await?;
    let mut vm = Upstream(&mut up, "SPICE link");
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
        stream: Conn::Other(up),
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
    up: Box<dyn Stream>,
    early_up: Vec<u8>,
    early_browser: Vec<u8>,
    brx: &mut BrowserRx,
    btx: &BrowserTx,
    meter: &Meter,
    rtt: &RoundTrips,
    idle: &Idle,
    joined: &Joined,
) -> End {
    let keyboard = &*joined.keyboard;
    let (mut up_rd, mut up_wr) = tokio::io::split(up);
    // Counted open from here until it has closed toward spice-server.
    let _inputs_open = (channel == channel_type::INPUTS).then(|| joined.inputs.open());
    // spice-server 0.15 can crash (taking QEMU down) when a display channel closes
    // before the client sent DISPLAY_INIT; vizor completes it for a browser that left
    // too early. Full headers need the next client serial.
    let display_init_seen = AtomicBool::new(channel != channel_type::DISPLAY);
    let last_serial = AtomicU64::new(0);
    let agent = AgentShared::new(ctx.env.spice.file_transfer);
    if channel == channel_type::INPUTS {
        // An earlier client may have left a prefix half-sent in QEMU's decoder, which
        // outlives clients: cleared first, so vizor's model is QEMU's.
        if let Err(end) = send_scancodes(
            ctx,
            kind,
            0,
            &[vizor_keys::spice::RESET],
            Origin::Reset,
            keyboard,
            &mut up_wr,
        )
        .await
        {
            return end;
        }
    }
    let browser_to_vm = async {
        let mut strokes = Vec::new();
        let mut dec = Decoder::new(kind, ctx.env.spice_browser_limits);
        let mut agent_in = AgentStream::new(ctx.env.spice_browser_limits);
        let mut follower = AgentFollower::default();
        let mut buf = early_browser;
        loop {
            let mut pos = 0;
            while let Some((frame, n)) = dec
                .decode(&buf[pos..])
                .map_err(|e| End::spice_protocol(Direction::BrowserToVm, &e))?
            {
                // Whatever the browser sends is parsed (and audited) whole: a message
                // beyond the bound is refused, not streamed on unread.
                if let Frame::Begin { header } = &frame {
                    return Err(End::spice_protocol(
                        Direction::BrowserToVm,
                        &vizor_spice::Error::LengthTooLarge {
                            what: "SPICE message",
                            len: u64::from(header.size),
                            max: ctx.env.spice_browser_limits.max_message_len as u64,
                        },
                    ));
                }
                if let Frame::Whole { header, .. } = &frame {
                    if let Some(serial) = header.serial {
                        last_serial.store(serial, Ordering::Relaxed);
                    }
                    if channel == channel_type::DISPLAY
                        && header.msg_type == msg::display::MSGC_INIT
                    {
                        display_init_seen.store(true, Ordering::Relaxed);
                    }
                }
                // A message vizor sends in place of the browser's.
                let mut instead = None;
                if let Frame::Whole { header, body } = frame {
                    let message = msg::parse_client(channel, header.msg_type, body)
                        .map_err(|e| End::spice_protocol(Direction::BrowserToVm, &e))?;
                    if message.is_input() {
                        idle.touch();
                    }
                    match message {
                        msg::ClientMessage::KeyDown(code) => {
                            lock(keyboard)?.key_down(code, &mut strokes);
                            record_strokes(ctx, &mut strokes).await?;
                        }
                        msg::ClientMessage::KeyUp(code) => {
                            lock(keyboard)?.key_up(code, &mut strokes);
                            record_strokes(ctx, &mut strokes).await?;
                        }
                        msg::ClientMessage::KeyScancode(bytes) => {
                            lock(keyboard)?.scancodes(bytes, Origin::Browser, &mut strokes);
                            record_strokes(ctx, &mut strokes).await?;
                        }
                        // spice-server would press the lock keys that differ from its
                        // view of them, unrecorded: vizor sends those presses itself, as
                        // scancodes, so the guest gets exactly what is on record.
                        msg::ClientMessage::KeyModifiers(requested) => {
                            let presses = {
                                let mut k = lock(keyboard)?;
                                let presses = k.lock_request(requested);
                                k.scancodes(presses.bytes(), Origin::LockRequest, &mut strokes);
                                presses
                            };
                            record_strokes(ctx, &mut strokes).await?;
                            let mut out = Vec::new();
                            // Nothing to press: nothing goes (an empty KEY_SCANCODE would
                            // do nothing either).
                            if !presses.bytes().is_empty() {
                                write_message(
                                    kind,
                                    header.serial.unwrap_or(0),
                                    msg::inputs::MSGC_KEY_SCANCODE,
                                    presses.bytes(),
                                    &mut out,
                                )
                                .map_err(|e| End::spice_protocol(Direction::BrowserToVm, &e))?;
                            }
                            instead = Some(out);
                        }
                        msg::ClientMessage::AgentStart { .. } => follower.started = true,
                        msg::ClientMessage::AgentData(chunk) => {
                            follow_agent(
                                ctx,
                                &mut follower,
                                &mut agent_in,
                                chunk,
                                AgentSide::Browser,
                                &agent,
                            )
                            .await?;
                        }
                        msg::ClientMessage::MousePress { button, .. } => {
                            ctx.env
                                .audit
                                .record(&Event::Button {
                                    session: ctx.id,
                                    button: crate::audit::spice_button(button),
                                    x: None,
                                    y: None,
                                })
                                .await
                                .map_err(audit_failed)?;
                        }
                        msg::ClientMessage::Pong { id, .. } if channel == channel_type::MAIN => {
                            rtt.pong(id)
                        }
                        _ => {}
                    }
                }
                if let Some(out) = instead {
                    write_upstream(&mut up_wr, &buf[..pos]).await?;
                    write_upstream(&mut up_wr, &out).await?;
                    meter.add(Direction::BrowserToVm, (pos + out.len()) as u64);
                    buf.drain(..pos + n);
                    pos = 0;
                    continue;
                }
                pos += n;
            }
            if pos > 0 {
                write_upstream(&mut up_wr, &buf[..pos]).await?;
                meter.add(Direction::BrowserToVm, pos as u64);
                buf.drain(..pos);
            }
            brx.read_into(&mut buf).await?;
        }
    };
    let vm_to_browser = async {
        let mut dec = Decoder::new(kind, ctx.env.spice_vm_limits);
        let mut agent_out = AgentStream::new(ctx.env.spice_vm_limits);
        let mut follower = AgentFollower::default();
        let mut buf = BytesMut::with_capacity(64 * 1024);
        buf.extend_from_slice(&early_up);
        let mut last_locks = None;
        loop {
            let mut consumed = 0;
            while let Some((frame, n)) = dec
                .decode(&buf[consumed..])
                .map_err(|e| End::spice_protocol(Direction::VmToBrowser, &e))?
            {
                // A message vizor sends in place of QEMU's.
                let mut instead = None;
                if let Frame::Whole { header, body } = frame {
                    match msg::parse_server(channel, header.msg_type, body)
                        .map_err(|e| End::spice_protocol(Direction::VmToBrowser, &e))?
                    {
                        // The channels vizor refuses are not offered: a browser does
                        // not try them (spice-html5 links every port channel listed).
                        msg::ServerMessage::ChannelsList(list)
                            if list.iter().any(|(t, _)| !relays(&ctx.env.spice, t)) =>
                        {
                            let body = list.filtered(|t| relays(&ctx.env.spice, t));
                            let mut out = Vec::new();
                            write_message(
                                kind,
                                header.serial.unwrap_or(0),
                                msg::main::MSG_CHANNELS_LIST,
                                &body,
                                &mut out,
                            )
                            .map_err(|e| End::spice_protocol(Direction::VmToBrowser, &e))?;
                            instead = Some(out);
                        }
                        msg::ServerMessage::MainInit { session_id, .. } => {
                            ctx.env
                                .spice_sessions
                                .set_session_id(ctx.claims.nonce, session_id);
                            debug!(session_id, "SPICE session linked");
                        }
                        msg::ServerMessage::AgentData(chunk) => {
                            follow_agent(
                                ctx,
                                &mut follower,
                                &mut agent_out,
                                chunk,
                                AgentSide::Vm,
                                &agent,
                            )
                            .await?;
                        }
                        msg::ServerMessage::Ping { id, .. } if channel == channel_type::MAIN => {
                            rtt.ping(id)
                        }
                        // INPUTS_INIT carries the guest's LEDs; KEY_MODIFIERS may carry
                        // spice-server's own view, and repeats it after input: the
                        // audit keeps changes, and says which.
                        msg::ServerMessage::InputsInit(bits) => {
                            locks_reported(ctx, keyboard, &mut last_locks, bits, "qemu").await?;
                        }
                        msg::ServerMessage::KeyModifiers(bits) => {
                            locks_reported(ctx, keyboard, &mut last_locks, bits, "spice_server")
                                .await?;
                        }
                        _ => {}
                    }
                }
                if let Some(out) = instead {
                    if consumed > 0 {
                        btx.bytes(buf.split_to(consumed)).await?;
                    }
                    let _ = buf.split_to(n);
                    meter.add(Direction::VmToBrowser, (consumed + out.len()) as u64);
                    btx.bytes(BytesMut::from(&out[..])).await?;
                    consumed = 0;
                    continue;
                }
                consumed += n;
            }
            if consumed > 0 {
                btx.bytes(buf.split_to(consumed)).await?;
                meter.add(Direction::VmToBrowser, consumed as u64);
            }
            read_upstream(&mut up_rd, &mut buf).await?;
        }
    };
    let r: Result<(), End> = tokio::select! {
        r = browser_to_vm => r,
        r = vm_to_browser => r,
    };
    let end = r.err().unwrap_or(End::VmClosed);
    let vm_gone = end.vm_gone();
    if channel == channel_type::INPUTS || channel == channel_type::MAIN {
        // When this connection closes (the inputs channel, or the main channel and with
        // it the client), spice-server releases the keys it holds, through QEMU's
        // decoder: on record first.
        let mut strokes = Vec::new();
        if let Ok(mut k) = keyboard.lock() {
            k.disconnect(&mut strokes);
        }
        if let Err(e) = record_strokes(ctx, &mut strokes).await {
            warn!(reason = %e, "audit log: keys spice-server releases not written");
        }
    }
    if channel == channel_type::MAIN {
        // Transfers the session's end cut short: on record with what passed.
        let open = agent
            .transfers
            .lock()
            .map(|mut t| t.end_all())
            .unwrap_or_default();
        for r in &open {
            if let Err(e) = record_transfer(ctx, r).await {
                warn!(reason = %e, "audit log: an incomplete file transfer not written");
            }
        }
    }
    if !display_init_seen.load(Ordering::Relaxed) && !vm_gone {
        let mut out = Vec::new();
        let serial = last_serial.load(Ordering::Relaxed) + 1;
        let init = msg::display::default_init();
        if write_message(kind, serial, msg::display::MSGC_INIT, &init, &mut out).is_ok()
            && up_wr.write_all(&out).await.is_ok()
        {
            // Let the display worker take it (it answers) before the socket closes.
            let mut tmp = [0u8; 4096];
            let _ = tokio::time::timeout(Duration::from_millis(500), up_rd.read(&mut tmp)).await;
            debug!("DISPLAY_INIT completed for a display channel the browser left early");
        }
    }
    if !vm_gone {
        if channel == channel_type::MAIN {
            joined.inputs.closed().await;
        }
        close_upstream(&mut up_wr, Some(&mut up_rd)).await;
    }
    end
}

/// vizor's own KEY_SCANCODE to the VM: the strokes it makes go on record first.
#[allow(clippy::too_many_arguments)]
async fn send_scancodes(
    ctx: &Ctx,
    kind: HeaderKind,
    serial: u64,
    bytes: &[u8],
    origin: Origin,
    keyboard: &Mutex<Keyboard>,
    up_wr: &mut (impl tokio::io::AsyncWrite + Unpin),
) -> Result<(), End> {
    let mut strokes = Vec::new();
    lock(keyboard)?.scancodes(bytes, origin, &mut strokes);
    record_strokes(ctx, &mut strokes).await?;
    let mut out = Vec::new();
    write_message(
        kind,
        serial,
        msg::inputs::MSGC_KEY_SCANCODE,
        bytes,
        &mut out,
    )
    .map_err(|e| End::spice_protocol(Direction::BrowserToVm, &e))?;
    write_upstream(up_wr, &out).await
}

/// A lock state from the VM's side: spice-server's view of the locks, and a record
/// when it changed.
async fn locks_reported(
    ctx: &Ctx,
    keyboard: &Mutex<Keyboard>,
    last: &mut Option<Locks>,
    bits: u16,
    source: &'static str,
) -> Result<(), End> {
    lock(keyboard)?.server_locks(bits);
    let locks = Locks::from_bits(bits);
    if last.replace(locks) != Some(locks) {
        ctx.env
            .audit
            .locks(ctx.id, locks, source)
            .await
            .map_err(audit_failed)?;
    }
    Ok(())
}

/// Records the strokes QEMU takes from an inputs message, and empties `strokes`.
async fn record_strokes(ctx: &Ctx, strokes: &mut Vec<Stroke>) -> Result<(), End> {
    for stroke in strokes.drain(..) {
        let event = KeyEvent {
            stroke,
            via: Some("scancode"),
            keysym: None,
            mismatch: false,
        };
        ctx.env
            .audit
            .stroke(ctx.id, &event)
            .await
            .map_err(audit_failed)?;
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, End> {
    m.lock()
        .map_err(|_| End::Internal("keyboard lock poisoned"))
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

    /// The median round trip, in milliseconds, if any ping was answered.
    pub fn median_ms(&self) -> Option<f64> {
        let g = self.inner.lock().ok()?;
        let mut v = g.1.clone();
        v.sort();
        v.get(v.len() / 2).map(|d| d.as_secs_f64() * 1000.0)
    }
}

/// Whether the browser announced `VD_AGENT_CAP_CLIPBOARD_SELECTION`. The guest agent
/// (spice-vdagentd) decides by the client's announcement alone, both ways: it reads a
/// selection word in the client's clipboard messages, and writes one in its own, when
/// the client announced the capability (its own announcement does not matter). vizor
/// reads both directions by the same rule, so it reads what the agent reads and writes.
#[derive(Default)]
struct AgentCaps(AtomicBool);

impl AgentCaps {
    fn browser_announced(&self, selection: bool) {
        self.0.store(selection, Ordering::Relaxed);
    }

    fn selection_word(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// What both directions of the main channel's agent stream share.
struct AgentShared {
    caps: AgentCaps,
    transfers: Mutex<Transfers>,
    file_transfer: FileTransfer,
}

impl AgentShared {
    fn new(file_transfer: FileTransfer) -> AgentShared {
        AgentShared {
            caps: AgentCaps::default(),
            transfers: Mutex::new(Transfers::default()),
            file_transfer,
        }
    }
}

/// One clipboard transfer in flight.
struct Transfer {
    reader: agent::ClipboardReader,
    hasher: sha2::Sha256,
    length: usize,
    /// The contents, kept for `[audit] clipboard = "content"` (bounded by the agent
    /// message limit).
    kept: Option<Vec<u8>>,
}

/// What following an agent stream records.
#[derive(Debug)]
enum AgentRecord {
    Clipboard(crate::audit::Clipboard),
    FileTransfer(transfers::Record),
    /// A file transfer refused by `[spice] file_transfer`.
    Refused {
        way: Way,
        start: Option<(u32, String, u64)>,
    },
}

/// What one chunk of an agent stream gave: records to write, in order, then the
/// session's end when the chunk is refused (none of it is relayed).
#[derive(Debug, Default)]
struct Fed {
    records: Vec<AgentRecord>,
    end: Option<End>,
}

/// Follows one direction of the guest agent's message stream, sans-IO: clipboard
/// contents as they cross (format, length, SHA-256 of the contents alone, and the
/// text when the audit keeps it), file transfers (see [`Transfers`]), and, from the
/// browser, only the message types a browser has reason to send
/// ([`agent::FromClient`]): a pointer event sent as MOUSE_STATE would reach the guest
/// through spice-vdagentd, past the inputs channel and its audit.
#[derive(Default)]
struct AgentFollower {
    transfer: Option<Transfer>,
    caps: Option<agent::CapsReader>,
    xfer: agent::XferReader,
    /// The browser sent AGENT_START: spice-server discards agent data before it, so
    /// vizor refuses any (its stream would start where spice-server's does not).
    started: bool,
}

/// Which way agent messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentSide {
    Browser,
    Vm,
}

impl AgentSide {
    fn direction(self) -> &'static str {
        match self {
            AgentSide::Browser => "browser_to_vm",
            AgentSide::Vm => "vm_to_browser",
        }
    }

    fn name(self) -> &'static str {
        match self {
            AgentSide::Browser => "browser",
            AgentSide::Vm => "VM",
        }
    }

    /// The direction of what this side sends.
    fn dir(self) -> Direction {
        match self {
            AgentSide::Browser => Direction::BrowserToVm,
            AgentSide::Vm => Direction::VmToBrowser,
        }
    }

    fn way(self) -> Way {
        match self {
            AgentSide::Browser => Way::ToVm,
            AgentSide::Vm => Way::ToBrowser,
        }
    }
}

impl AgentFollower {
    /// Feeds an AGENT_DATA chunk sent by `from`.
    fn feed(
        &mut self,
        stream: &mut AgentStream,
        chunk: &[u8],
        from: AgentSide,
        shared: &AgentShared,
        keep: bool,
    ) -> Fed {
        let mut fed = Fed::default();
        if let Err(end) = self.follow(stream, chunk, from, shared, keep, &mut fed) {
            fed.end = Some(end);
        }
        fed
    }

    fn follow(
        &mut self,
        stream: &mut AgentStream,
        chunk: &[u8],
        from: AgentSide,
        shared: &AgentShared,
        keep: bool,
        fed: &mut Fed,
    ) -> Result<(), End> {
        let side = from.name();
        if from == AgentSide::Browser && !self.started {
            return Err(End::refused(
                Refusal::AgentRefused,
                "the browser sent agent data before AGENT_START",
            ));
        }
        let mut events = Vec::new();
        stream
            .feed(chunk, &mut events)
            .map_err(|e| End::spice_protocol(from.dir(), &e))?;
        // A file transfer start under `file_transfer = "refuse"`: the chunk is read to
        // its end (for the file's name, when the start is whole in it), then refused.
        let mut refusing = false;
        let mut refused_start = None;
        for ev in events {
            if let AgentEvent::Begin { msg_type, .. } = ev {
                if from == AgentSide::Browser
                    && agent::FromClient::of(msg_type) == agent::FromClient::Refuse
                {
                    return Err(End::refused(
                        Refusal::AgentRefused,
                        format!(
                            "the browser sent the guest agent a {} message (type {msg_type}), which vizor does not pass",
                            agent::kind::name(msg_type)
                        ),
                    ));
                }
                if msg_type == agent::kind::FILE_XFER_START
                    && shared.file_transfer == FileTransfer::Refuse
                {
                    refusing = true;
                }
            }
            let mut xfers = Vec::new();
            self.xfer
                .feed(&ev, &mut xfers)
                .map_err(|e| End::spice_protocol(from.dir(), &e))?;
            for x in xfers {
                if refusing {
                    if let agent::XferEvent::Start { id, name, size } = x {
                        refused_start = Some((id, name, size));
                    }
                    continue;
                }
                let mut t = lock(&shared.transfers)?;
                match t.on(from.way(), x) {
                    Ok(Some(r)) => fed.records.push(AgentRecord::FileTransfer(r)),
                    Ok(None) => {}
                    Err(refusal) => {
                        return Err(End::refused(
                            Refusal::FileTransferRefused,
                            format!("{side} agent stream: {refusal}"),
                        ))
                    }
                }
            }
            self.clipboard(ev, from, &shared.caps, keep, fed)?;
        }
        if refusing {
            fed.records.push(AgentRecord::Refused {
                way: from.way(),
                start: refused_start,
            });
            return Err(End::refused(
                Refusal::FileTransferRefused,
                "file transfer through the guest agent is not allowed here ([spice] file_transfer)",
            ));
        }
        Ok(())
    }

    fn clipboard(
        &mut self,
        ev: AgentEvent<'_>,
        from: AgentSide,
        caps: &AgentCaps,
        keep: bool,
        fed: &mut Fed,
    ) -> Result<(), End> {
        use sha2::Digest;
        match ev {
            AgentEvent::Begin { msg_type, .. } if msg_type == agent::kind::CLIPBOARD => {
                self.transfer = Some(Transfer {
                    reader: agent::ClipboardReader::new(caps.selection_word()),
                    hasher: sha2::Sha256::new(),
                    length: 0,
                    kept: keep.then(Vec::new),
                });
            }
            AgentEvent::Begin { msg_type, .. }
                if msg_type == agent::kind::ANNOUNCE_CAPABILITIES =>
            {
                self.caps = Some(agent::CapsReader::default());
            }
            AgentEvent::Data {
                msg_type,
                bytes,
                last,
            } if msg_type == agent::kind::ANNOUNCE_CAPABILITIES => {
                if let Some(c) = &mut self.caps {
                    c.feed(bytes);
                }
                if last {
                    if let Some(c) = self.caps.take() {
                        if from == AgentSide::Browser {
                            caps.browser_announced(c.has(agent::cap::CLIPBOARD_SELECTION));
                        }
                    }
                }
            }
            AgentEvent::Data {
                msg_type,
                bytes,
                last,
            } if msg_type == agent::kind::CLIPBOARD => {
                let Some(t) = &mut self.transfer else {
                    return Ok(());
                };
                let contents = t.reader.feed(bytes);
                t.hasher.update(contents);
                t.length += contents.len();
                if let Some(k) = &mut t.kept {
                    k.extend_from_slice(contents);
                }
                if !last {
                    return Ok(());
                }
                let Some(t) = self.transfer.take() else {
                    return Ok(());
                };
                let clip_type = t
                    .reader
                    .clip_type()
                    .map_err(|e| End::spice_protocol(from.dir(), &e))?;
                let content = match t.kept {
                    Some(k) if clip_type == agent::CLIPBOARD_UTF8_TEXT => {
                        Some(String::from_utf8_lossy(&k).into_owned())
                    }
                    _ => None,
                };
                fed.records
                    .push(AgentRecord::Clipboard(crate::audit::Clipboard {
                        format: agent::clipboard_format(clip_type),
                        length: t.length,
                        sha256: crate::audit::chain::hex(&t.hasher.finalize()),
                        content,
                    }));
            }
            _ => {}
        }
        Ok(())
    }
}

/// Writes what an agent transfer record says.
async fn record_transfer(ctx: &Ctx, r: &transfers::Record) -> Result<(), End> {
    ctx.env
        .audit
        .record(&Event::FileTransfer {
            session: ctx.id,
            direction: r.way.direction(),
            id: Some(r.id),
            name: Some(&r.name),
            size: Some(r.size),
            status: r.status,
            bytes: r.bytes,
            sha256: r.sha256.as_deref(),
        })
        .await
        .map_err(audit_failed)
}

/// Feeds `chunk` to `follower`, records what it completed, and refuses what it
/// refused (after recording it).
async fn follow_agent(
    ctx: &Ctx,
    follower: &mut AgentFollower,
    stream: &mut AgentStream,
    chunk: &[u8],
    from: AgentSide,
    shared: &AgentShared,
) -> Result<(), End> {
    let keep = ctx.env.audit.clipboard_content();
    let fed = follower.feed(stream, chunk, from, shared, keep);
    for r in &fed.records {
        match r {
            AgentRecord::Clipboard(clip) => ctx
                .env
                .audit
                .record(&clip.event(ctx.id, from.direction()))
                .await
                .map_err(audit_failed)?,
            AgentRecord::FileTransfer(t) => record_transfer(ctx, t).await?,
            AgentRecord::Refused { way, start } => {
                let (id, name, size) = match start {
                    Some((id, name, size)) => (Some(*id), Some(name.as_str()), Some(*size)),
                    None => (None, None, None),
                };
                ctx.env
                    .audit
                    .record(&Event::FileTransfer {
                        session: ctx.id,
                        direction: way.direction(),
                        id,
                        name,
                        size,
                        status: "refused",
                        bytes: 0,
                        sha256: None,
                    })
                    .await
                    .map_err(audit_failed)?
            }
        }
    }
    match fed.end {
        Some(end) => Err(end),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vizor_spice::agent::{cap, kind, write_message};

    fn caps_message(selection: bool) -> Vec<u8> {
        let mut bits = 1u32 << cap::CLIPBOARD_SELECTION.min(31);
        if !selection {
            bits = 1; // VD_AGENT_CAP_MOUSE_STATE alone
        }
        // VDAgentAnnounceCapabilities: request (u32), then the capability words.
        let mut body = 0u32.to_le_bytes().to_vec();
        body.extend_from_slice(&bits.to_le_bytes());
        let mut out = Vec::new();
        write_message(kind::ANNOUNCE_CAPABILITIES, &body, &mut out);
        out
    }

    fn clipboard_message(selection: Option<u8>, text: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        if let Some(s) = selection {
            body.extend_from_slice(&[s, 0, 0, 0]);
        }
        body.extend_from_slice(&1u32.to_le_bytes()); // UTF-8 text
        body.extend_from_slice(text);
        let mut out = Vec::new();
        write_message(kind::CLIPBOARD, &body, &mut out);
        out
    }

    struct Sides {
        shared: AgentShared,
        browser: (AgentFollower, AgentStream),
        vm: (AgentFollower, AgentStream),
    }

    impl Sides {
        fn new() -> Sides {
            Sides::with(FileTransfer::Audit)
        }

        fn with(file_transfer: FileTransfer) -> Sides {
            let l = vizor_spice::Limits::default();
            let started = AgentFollower {
                started: true,
                ..AgentFollower::default()
            };
            Sides {
                shared: AgentShared::new(file_transfer),
                browser: (started, AgentStream::new(l)),
                vm: (AgentFollower::default(), AgentStream::new(l)),
            }
        }

        fn feed(&mut self, side: AgentSide, bytes: &[u8]) -> Fed {
            let (c, s) = match side {
                AgentSide::Browser => &mut self.browser,
                AgentSide::Vm => &mut self.vm,
            };
            c.feed(s, bytes, side, &self.shared, true)
        }

        fn from(&mut self, side: AgentSide, bytes: &[u8]) -> Vec<crate::audit::Clipboard> {
            let fed = self.feed(side, bytes);
            assert!(fed.end.is_none(), "{:?}", fed.end);
            fed.records
                .into_iter()
                .filter_map(|r| match r {
                    AgentRecord::Clipboard(c) => Some(c),
                    _ => None,
                })
                .collect()
        }
    }

    fn xfer(t: u32, id: u32, rest: &[u8]) -> Vec<u8> {
        let mut body = id.to_le_bytes().to_vec();
        if t == kind::FILE_XFER_DATA {
            body.extend_from_slice(&(rest.len() as u64).to_le_bytes());
        }
        body.extend_from_slice(rest);
        let mut out = Vec::new();
        write_message(t, &body, &mut out);
        out
    }

    fn start(id: u32) -> Vec<u8> {
        xfer(
            kind::FILE_XFER_START,
            id,
            b"[vdagent-file-xfer]\nname=notes.txt\nsize=5\n",
        )
    }

    #[test]
    fn the_agent_stream_cannot_be_put_out_of_step_with_spice_servers() {
        // The review's sequence: before AGENT_START spice-server discards agent data
        // whole; a reader that took it would expect 33 clipboard bytes next, and read
        // a MOUSE_STATE after AGENT_START as clipboard.
        let mut first = Vec::new();
        write_message(kind::CLIPBOARD_RELEASE, &[], &mut first);
        first.extend_from_slice(
            &{
                let mut h = Vec::new();
                write_message(kind::CLIPBOARD, &[0; 33], &mut h);
                h
            }[..20],
        );
        let mut s = Sides::new();
        s.browser.0.started = false;
        let end = s.feed(AgentSide::Browser, &first).end.expect("refused");
        assert_eq!(end.label(), "agent_refused");
        assert!(end.reason().contains("AGENT_START"), "{}", end.reason());
        // After AGENT_START, the same chunk breaks spice-server's framing: refused.
        let mut s = Sides::new();
        let end = s.feed(AgentSide::Browser, &first).end.expect("refused");
        assert_eq!(end.label(), "protocol_error", "{}", end.reason());
    }

    #[test]
    fn the_browser_cannot_point_or_speak_for_the_agent() {
        // MOUSE_STATE would move and click the guest's pointer through spice-vdagentd,
        // past the inputs channel: refused, with every other type a browser has no
        // reason to send.
        for t in [
            kind::MOUSE_STATE,
            kind::REPLY,
            kind::CLIENT_DISCONNECTED,
            16,
            17,
            999,
        ] {
            let mut s = Sides::new();
            let mut m = Vec::new();
            write_message(t, &[0; 16], &mut m);
            let fed = s.feed(AgentSide::Browser, &m);
            assert!(fed.records.is_empty());
            let end = fed.end.expect("refused");
            assert_eq!(end.label(), "agent_refused", "type {t}");
            // The guest's agent may send them (to the browser, not to the guest).
            let mut s = Sides::new();
            assert!(s.feed(AgentSide::Vm, &m).end.is_none(), "type {t}");
        }
    }

    #[test]
    fn file_transfers_are_refused_by_default_with_what_was_refused() {
        let mut s = Sides::with(FileTransfer::Refuse);
        let fed = s.feed(AgentSide::Browser, &start(3));
        assert_eq!(fed.end.expect("refused").label(), "file_transfer_refused");
        match &fed.records[..] {
            [AgentRecord::Refused { way, start }] => {
                assert_eq!(*way, Way::ToVm);
                assert_eq!(start, &Some((3, "notes.txt".to_owned(), 5)));
            }
            other => panic!("{other:?}"),
        }
        // Refused at the chunk that begins it, whole or not.
        let mut s = Sides::with(FileTransfer::Refuse);
        let m = start(3);
        let fed = s.feed(AgentSide::Browser, &m[..25]);
        assert!(fed.end.is_some());
        assert!(matches!(
            &fed.records[..],
            [AgentRecord::Refused { start: None, .. }]
        ));
        // File bytes for no transfer that started: refused either way.
        for policy in [FileTransfer::Refuse, FileTransfer::Audit] {
            let mut s = Sides::with(policy);
            let fed = s.feed(AgentSide::Browser, &xfer(kind::FILE_XFER_DATA, 1, b"abc"));
            assert_eq!(fed.end.expect("refused").label(), "file_transfer_refused");
        }
    }

    #[test]
    fn an_audited_file_transfer_is_recorded_at_start_and_end() {
        use AgentSide::{Browser, Vm};
        let mut s = Sides::new();
        let fed = s.feed(Browser, &start(3));
        assert!(fed.end.is_none());
        let started = match &fed.records[..] {
            [AgentRecord::FileTransfer(r)] => r.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            (started.status, started.name.as_str(), started.size),
            ("started", "notes.txt", 5)
        );
        // The guest's agent is ready, the bytes pass, the guest says it is done.
        assert!(s
            .feed(Vm, &xfer(kind::FILE_XFER_STATUS, 3, &0u32.to_le_bytes()))
            .records
            .is_empty());
        let data = xfer(kind::FILE_XFER_DATA, 3, b"hello");
        let (a, b) = data.split_at(27);
        assert!(s.feed(Browser, a).records.is_empty());
        assert!(s.feed(Browser, b).records.is_empty());
        let fed = s.feed(Vm, &xfer(kind::FILE_XFER_STATUS, 3, &3u32.to_le_bytes()));
        let done = match &fed.records[..] {
            [AgentRecord::FileTransfer(r)] => r.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            (done.status, done.bytes, done.way),
            ("success", 5, Way::ToVm)
        );
        // SHA-256("hello").
        assert_eq!(
            done.sha256.as_deref(),
            Some("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
        );
        // One more, cut short by the session's end.
        s.feed(Browser, &start(4));
        s.feed(Browser, &xfer(kind::FILE_XFER_DATA, 4, b"he"));
        let open = s.shared.transfers.lock().unwrap().end_all();
        assert_eq!(
            (open[0].id, open[0].status, open[0].bytes),
            (4, "incomplete", 2)
        );
    }

    #[test]
    fn the_selection_word_follows_the_browsers_announcement_both_ways() {
        use AgentSide::{Browser, Vm};
        // The case: the guest agent announces the selection capability, the
        // browser does not. The agent then reads no selection word from the browser,
        // and writes none: nor does vizor.
        let mut s = Sides::new();
        assert!(s.from(Vm, &caps_message(true)).is_empty());
        assert!(s.from(Browser, &caps_message(false)).is_empty());
        let clip = s.from(Browser, &clipboard_message(None, b"secret"));
        assert_eq!((clip[0].format, clip[0].length), ("text", 6));
        assert_eq!(clip[0].content.as_deref(), Some("secret"));
        let clip = s.from(Vm, &clipboard_message(None, b"from the guest"));
        assert_eq!(clip[0].content.as_deref(), Some("from the guest"));
        // The browser announced it (the agent's own announcement aside): both ways
        // carry the word.
        let mut s = Sides::new();
        s.from(Browser, &caps_message(true));
        let clip = s.from(Browser, &clipboard_message(Some(0), b"abc"));
        assert_eq!(
            (clip[0].length, clip[0].content.as_deref()),
            (3, Some("abc"))
        );
        let clip = s.from(Vm, &clipboard_message(Some(0), b"xyz"));
        assert_eq!(
            (clip[0].length, clip[0].content.as_deref()),
            (3, Some("xyz"))
        );
        // A later announcement without it takes it back.
        s.from(Browser, &caps_message(false));
        let clip = s.from(Browser, &clipboard_message(None, b"plain"));
        assert_eq!(clip[0].content.as_deref(), Some("plain"));
    }
}
