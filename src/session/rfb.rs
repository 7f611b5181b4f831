//! The RFB session: vizor is the RFB server toward the browser and the RFB client
//! toward QEMU, then relays framed messages both ways.
//!
//! The browser is offered security type None only: its token already authenticated it.
//! vizor authenticates to QEMU with the password libvirt stores. Security types are
//! offered to the browser only once QEMU has accepted vizor, so a failure toward the VM
//! reaches the browser as an RFB refusal with a reason, whatever its protocol version.

use super::browser::{BrowserRx, BrowserTx};
use super::{
    audit_failed, close_upstream, connect, drive, write_upstream, Conn, End, Meter, Refusal,
    Upstream, VmFailure, VmLink, VmReader,
};
use crate::audit::{Event, KeyEvent};
use crate::libvirt::Console;
use crate::live::{Direction, Identity, Latency};
use crate::policy::keyboards::VmKeyboard;
use crate::policy::rfb::Rules;
use crate::policy::{Participant, Verdict};
use crate::recording::Recorder;
use crate::token::Claims;
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::AsyncWrite;
use tokio::sync::watch;
use tracing::{debug, info, warn};
use vizor_rfb::handshake::client::{self, Authenticate, SendClientInit, VencryptChosen};
use vizor_rfb::handshake::server::{self, SecurityChosen};
use vizor_rfb::handshake::{SecurityType, ServerInit, VencryptSubtype, Version};

/// One RFB session: what it shares with every session, and what is its own.
pub struct Ctx {
    /// What every session shares.
    pub env: Arc<super::Env>,
    /// Session id (unique in this process).
    pub id: u64,
    /// The token's claims.
    pub claims: Claims,
    /// The browser's address.
    pub client: SocketAddr,
    /// The console libvirt reported.
    pub console: Console,
    /// The VM's keyboard as QEMU keeps it, shared with the VM's other sessions.
    pub keyboard: Arc<Mutex<VmKeyboard>>,
    /// What the browser may do.
    pub participant: Participant,
    /// A participant's place on the live session it joined; `None` for the owner.
    pub joined: Option<crate::live::Joined>,
    /// The page asked for resuming (`/websockify?...&resumable=1`, vizor's console
    /// page): it is sent the credential, and a lost connection parks the session.
    pub resumable: bool,
}

/// Starts a session's recording with the ServerInit the browser received.
/// A resumed session's connections are recorded one file each (`resumed`: which
/// resume made it), as each starts with its own ServerInit.
async fn start_recording(
    ctx: &Ctx,
    dir: &std::path::Path,
    si: &[u8],
    resumed: u32,
) -> std::io::Result<Recorder> {
    let mut header = serde_json::json!({
        "session": ctx.id,
        "kind": ctx.claims.kind.as_str(),
        "domain": ctx.console.domain,
        "user": ctx.claims.user,
        "started": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
    });
    if resumed > 0 {
        header["resumed"] = resumed.into();
    }
    let r = Recorder::start(dir, &header, ctx.id, ctx.env.send_timeout).await?;
    r.frame(bytes::Bytes::copy_from_slice(si)).await?;
    Ok(r)
}

/// The browser's side of the handshake after its version: security type None offered
/// (the token authenticated it), accepted, then its ClientInit.
pub(crate) async fn browser_security_none(
    brx: &mut BrowserRx,
    buf: &mut Vec<u8>,
    offer: server::OfferSecurity,
    btx: &BrowserTx,
) -> Result<vizor_rfb::handshake::ClientInit, End> {
    let mut out = Vec::new();
    let choice = offer
        .offer(&[SecurityType::NONE], &mut out)
        .map_err(|e| End::from_browser(&e))?;
    btx.binary(std::mem::take(&mut out)).await;
    let (chosen, _) = drive(brx, buf, choice, End::from_browser, |s, b| s.receive(b)).await?;
    let SecurityChosen::None(result) = chosen else {
        return Err(End::browser_violation(
            "a security type vizor did not offer",
            "security_type_not_offered",
        ));
    };
    let expect_ci = result.accept(&mut out);
    btx.binary(out).await;
    let (ci, _) = drive(brx, buf, expect_ci, End::from_browser, |s, b| s.receive(b)).await?;
    Ok(ci)
}

/// Connects and authenticates to QEMU, stopping before ClientInit (which waits for the
/// browser's shared flag). With `[upstream_tls]`, a console offering VeNCrypt is
/// wrapped in TLS with QEMU's X.509 certificate verified, before any password is used.
async fn authenticate_upstream(
    ctx: &Ctx,
    console: &Console,
) -> Result<(VmLink, Vec<u8>, SendClientInit), End> {
    let connecting = Instant::now();
    let mut up = connect(&console.target, &ctx.env.dial_for(&console.host)).await?;
    ctx.env
        .metrics
        .upstream_connect_seconds
        .with_label_values(&["vnc"])
        .observe(connecting.elapsed().as_secs_f64());
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let password = console.password.as_ref();
    let tls = ctx.env.upstream_tls_for(&console.host);
    let (rd, mut wr) = tokio::io::split(up.as_stream());
    let mut src = Upstream(rd, "handshake");
    let (sec, _) = drive(
        &mut src,
        &mut buf,
        client::ExpectServerVersion::new(ctx.env.vm_limits),
        End::from_vm,
        |s, b| s.receive(b, &mut out),
    )
    .await?;
    write_up(&mut wr, &mut out).await?;
    let (choose, _) = drive(&mut src, &mut buf, sec, End::from_vm, |s, b| s.receive(b)).await?;
    let offered = choose.offered().to_vec();
    let names = || {
        let names: Vec<String> = offered.iter().map(|t| t.0.to_string()).collect();
        names.join(", ")
    };
    let vencrypt = offered.contains(&SecurityType::VENCRYPT);
    let step = match tls {
        Some(tls) if vencrypt => {
            let v = choose
                .choose_vencrypt(&mut out)
                .map_err(|e| End::from_vm(&e))?;
            write_up(&mut wr, &mut out).await?;
            let (ack, _) = drive(&mut src, &mut buf, v, End::from_vm, |s, b| {
                s.receive(b, &mut out)
            })
            .await?;
            write_up(&mut wr, &mut out).await?;
            let (subtypes, _) =
                drive(&mut src, &mut buf, ack, End::from_vm, |s, b| s.receive(b)).await?;
            let (list, _) = drive(&mut src, &mut buf, subtypes, End::from_vm, |s, b| {
                s.receive(b)
            })
            .await?;
            let sub = x509_subtype(list.offered(), password.is_some())?;
            let chosen = list.choose(sub, &mut out).map_err(|e| End::from_vm(&e))?;
            let VencryptChosen::Tls(ack) = chosen else {
                return Err(End::vm(VmFailure::Tls, "VeNCrypt sub-type without TLS"));
            };
            write_up(&mut wr, &mut out).await?;
            let (start, _) =
                drive(&mut src, &mut buf, ack, End::from_vm, |s, b| s.receive(b)).await?;
            if !buf.is_empty() {
                return Err(End::vm(
                    VmFailure::Tls,
                    "the VM console sent data before the TLS handshake",
                ));
            }
            drop(src);
            drop(wr);
            let tls = tls
                .connect(up.boxed(), &console.target)
                .await
                .map_err(|e| End::vm(VmFailure::Tls, e))?;
            up = Conn::Other(Box::new(tls));
            debug!(
                subtype = sub.0,
                "TLS to the VM console established (VeNCrypt X.509)"
            );
            start.tls_established()
        }
        Some(tls) if tls.require => {
            return Err(End::vm(
                VmFailure::Tls,
                format!(
                "the VM console offers no TLS (security types {}), and [upstream_tls] requires it",
                names()
            ),
            ))
        }
        _ if offered.contains(&SecurityType::VNC_AUTH) && password.is_some() => {
            let ch = choose
                .choose_vnc_auth(&mut out)
                .map_err(|e| End::from_vm(&e))?;
            write_up(&mut wr, &mut out).await?;
            Authenticate::VncAuth(ch)
        }
        _ if offered.contains(&SecurityType::NONE) => {
            let r = choose.choose_none(&mut out).map_err(|e| End::from_vm(&e))?;
            write_up(&mut wr, &mut out).await?;
            Authenticate::None(r)
        }
        _ if offered.contains(&SecurityType::VNC_AUTH) => {
            return Err(End::vm(
                VmFailure::Auth,
                "the VM console asks for a password, but libvirt stores none for it",
            ));
        }
        None if vencrypt => {
            return Err(End::vm(
                VmFailure::Tls,
                "the VM console requires TLS (VeNCrypt); configure [upstream_tls] with the CA of its certificate",
            ));
        }
        _ => {
            return Err(End::vm(
                VmFailure::Auth,
                format!(
                    "the VM console offers only security types vizor does not support: {}",
                    names()
                ),
            ));
        }
    };
    let step_tls = tls.is_some() && vencrypt;
    // Authentication proper: on the plain stream, or inside TLS.
    let (rd, mut wr) = tokio::io::split(up.as_stream());
    let mut src = Upstream(rd, "handshake");
    // QEMU refusing vizor's certificate (or its lack of one) shows after the handshake,
    // as a closed connection on the first read.
    let in_tls = |e: End| {
        match e {
        End::Vm {
            why: VmFailure::Io | VmFailure::Closed,
            detail,
        } if step_tls => End::vm(
            VmFailure::Tls,
            format!(
                "{detail} (after the TLS handshake: does QEMU demand a client certificate vizor did not give? see [upstream_tls] client_cert)"
            ),
        ),
        e => e,
    }
    };
    // VNC authentication, or VeNCrypt's X.509 with it: QEMU checked a password.
    let sent_password = matches!(step, Authenticate::VncAuth(_));
    // libvirt may store a password QEMU does not ask for (changed behind libvirt's
    // back, or VeNCrypt X.509 without VNC authentication): what QEMU checks decides.
    if ctx.env.require_password && !sent_password {
        return Err(End::vm(
            VmFailure::NoPassword,
            format!(
                "the VM console asks for no password (security types {}), and [libvirt] require_password is set",
                names()
            ),
        ));
    }
    let result = match step {
        Authenticate::None(r) => r,
        Authenticate::VncAuth(ch) => {
            let (respond, _) = drive(&mut src, &mut buf, ch, End::from_vm, |s, b| s.receive(b))
                .await
                .map_err(in_tls)?;
            let pw = password.map(|p| p.as_bytes()).unwrap_or_default();
            let r = respond.respond(pw, &mut out);
            write_up(&mut wr, &mut out).await?;
            r
        }
    };
    let (init, _) = drive(&mut src, &mut buf, result, auth_refused, |s, b| {
        s.receive(b)
    })
    .await
    .map_err(in_tls)?;
    let link = VmLink {
        stream: up,
        tls: step_tls,
        password: sent_password,
    };
    Ok((link, buf, init))
}

/// The end of a session whose VM refused vizor's authentication, in QEMU's own words;
/// any other error in the SecurityResult is the VM's protocol error.
fn auth_refused(e: &vizor_rfb::Error) -> End {
    match e {
        vizor_rfb::Error::AuthenticationFailed { reason } => End::vm(
            VmFailure::Auth,
            format!("authentication to the VM failed (QEMU said: {reason})"),
        ),
        e => End::from_vm(e),
    }
}

/// The VeNCrypt sub-type to use: X.509 with VNC authentication when there is a password
/// to give, X.509 alone otherwise. Anonymous TLS is refused: it verifies nobody.
fn x509_subtype(offered: &[VencryptSubtype], has_password: bool) -> Result<VencryptSubtype, End> {
    let pick = |t: VencryptSubtype| offered.contains(&t).then_some(t);
    let choice = if has_password {
        pick(VencryptSubtype::X509_VNC).or_else(|| pick(VencryptSubtype::X509_NONE))
    } else {
        pick(VencryptSubtype::X509_NONE)
    };
    choice.ok_or_else(|| {
        let names: Vec<String> = offered.iter().map(|t| t.0.to_string()).collect();
        let why = if offered.contains(&VencryptSubtype::X509_VNC) {
            "asks for a password, but libvirt stores none for it"
        } else {
            "offers no X.509 sub-type (anonymous TLS verifies nobody)"
        };
        End::vm(
            VmFailure::Tls,
            format!(
                "the VM console {why}: VeNCrypt sub-types {}",
                names.join(", ")
            ),
        )
    })
}

/// Writes and clears `out`.
async fn write_up(wr: &mut (impl AsyncWrite + Unpin), out: &mut Vec<u8>) -> Result<(), End> {
    let r = write_upstream(wr, out).await;
    out.clear();
    r
}

/// Both handshakes; returns the upstream stream and any bytes QEMU sent after
/// ServerInit, and the ServerInit (not yet sent to the browser).
async fn handshake(ctx: &Ctx, brx: &mut BrowserRx, btx: &BrowserTx) -> Result<Opened, End> {
    let mut out = Vec::new();
    let browser_hs = server::start(Version::V3_8, ctx.env.browser_limits, &mut out);
    if !btx.binary(std::mem::take(&mut out)).await {
        return Err(End::BrowserClosed);
    }
    // QEMU first: its outcome decides what the browser is offered.
    let upstream = authenticate_upstream(ctx, &ctx.console).await;
    let mut bbuf = Vec::new();
    let (offer, _) = drive(brx, &mut bbuf, browser_hs, End::from_browser, |s, b| {
        s.receive(b)
    })
    .await?;
    let (up, ubuf, init) = match upstream {
        Ok(u) => u,
        Err(end) => {
            let told = match end.upstream_failure() {
                Some(VmFailure::Auth) => "authentication to the VM failed",
                Some(VmFailure::NoPassword) => {
                    "the VM console has no password, which vizor requires"
                }
                Some(VmFailure::NotAllowed) => {
                    "the VM console's address is outside [upstream] allow"
                }
                _ => "the VM console cannot be reached",
            };
            offer.refuse(told, &mut out);
            btx.binary(out).await;
            return Err(end);
        }
    };
    let ci = browser_security_none(brx, &mut bbuf, offer, btx).await?;
    if !bbuf.is_empty() {
        return Err(End::browser_violation(
            "messages sent before ServerInit",
            "early_message",
        ));
    }
    // Always shared toward QEMU: with its default share policy an exclusive ClientInit
    // disconnects every other client of the VM, so one token holder could end the
    // console sessions of every other user of that VM.
    if !ci.shared {
        debug!("the browser asked for exclusive access; the console is shared all the same");
    }
    vm_init(up, ubuf, init).await
}

/// What a handshake with QEMU ends with: its connection, what it sent after
/// ServerInit, the ServerInit and its bytes (not yet sent to the browser).
type Opened = (VmLink, Vec<u8>, ServerInit, Vec<u8>);

/// The end of the handshake with QEMU: ClientInit (shared, whatever the browser
/// asked), then QEMU's ServerInit.
async fn vm_init(mut up: VmLink, mut ubuf: Vec<u8>, init: SendClientInit) -> Result<Opened, End> {
    let mut out = Vec::new();
    let expect_si = init.send(true, &mut out);
    let (rd, mut wr) = tokio::io::split(up.stream.as_stream());
    write_up(&mut wr, &mut out).await?;
    let mut src = Upstream(rd, "handshake");
    let (si, si_bytes) = drive(&mut src, &mut ubuf, expect_si, End::from_vm, |s, b| {
        s.receive(b)
    })
    .await?;
    Ok((up, ubuf, si, si_bytes))
}

/// A resuming browser's side of the handshake: version, security type None (its
/// resume credential authenticated it) and ClientInit, within the handshake timeout.
/// The session it joins answers ServerInit, from a new connection to QEMU.
pub async fn resume_handshake(
    env: &super::Env,
    brx: &mut BrowserRx,
    btx: &BrowserTx,
) -> Result<(), End> {
    let hs = async {
        let mut out = Vec::new();
        let browser_hs = server::start(Version::V3_8, env.browser_limits, &mut out);
        if !btx.binary(out).await {
            return Err(End::BrowserClosed);
        }
        let mut buf = Vec::new();
        let (offer, _) = drive(brx, &mut buf, browser_hs, End::from_browser, |s, b| {
            s.receive(b)
        })
        .await?;
        // Whether it asks to share or not, the console is shared (as at the start).
        let _ci = browser_security_none(brx, &mut buf, offer, btx).await?;
        if !buf.is_empty() {
            return Err(End::browser_violation(
                "messages sent before ServerInit",
                "early_message",
            ));
        }
        Ok(())
    };
    tokio::time::timeout(env.handshake_timeout, hs)
        .await
        .unwrap_or_else(|_| Err(handshake_timeout(env.handshake_timeout)))
}

fn handshake_timeout(t: std::time::Duration) -> End {
    End::refused(
        Refusal::HandshakeTimeout,
        format!(
            "handshake did not complete within {}",
            humantime::format_duration(t)
        ),
    )
}

/// One browser connection's part of a session, with its own connection to QEMU.
struct Leg {
    up: Conn,
    /// What QEMU sent after ServerInit.
    early: Vec<u8>,
    si: ServerInit,
    si_bytes: Vec<u8>,
    /// Which resume made it (0: the session's start).
    rotation: u32,
    /// A resumed connection's hand-back to the request that brought it.
    _done: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Runs the session to its end, closes the browser with the reason, and writes the
/// session's audit records. A page that asked for resuming (`ctx.resumable`) and whose
/// connection drops without a close frame may come back within `[tokens]
/// resume_window`: the session goes on under its id, on a new connection each way.
pub async fn run(
    ctx: Ctx,
    brx: &mut BrowserRx,
    mut btx: BrowserTx,
    mut shutdown: watch::Receiver<bool>,
) -> End {
    let started = Instant::now();
    let hs = tokio::time::timeout(ctx.env.handshake_timeout, handshake(&ctx, brx, &btx));
    let hs = tokio::select! {
        r = hs => r.unwrap_or_else(|_| Err(handshake_timeout(ctx.env.handshake_timeout))),
        _ = shutdown.wait_for(|s| *s) => Err(End::Shutdown),
    };
    let end = match hs {
        Err(end) => end,
        Ok((up, early, si, si_bytes)) => {
            let upstream = ctx.console.target.to_string();
            let client = ctx.client.to_string();
            let started_ok = ctx
                .env
                .audit
                .record(&Event::SessionStart {
                    session: ctx.id,
                    token_id: &ctx.claims.token_id(),
                    user: &ctx.claims.user,
                    domain: &ctx.console.domain,
                    uuid: &ctx.console.uuid,
                    kind: ctx.claims.kind,
                    client: &client,
                    host: (ctx.console.host != crate::config::DEFAULT_HOST)
                        .then_some(ctx.console.host.as_str()),
                    upstream: &upstream,
                    upstream_tls: up.tls,
                    vm_password: up.password,
                    channel: None,
                    role: ctx.joined.as_ref().map(|_| ctx.claims.role.as_str()),
                    joins: ctx.joined.as_ref().map(|j| j.live().id),
                    unannounced: ctx.joined.as_ref().is_some_and(|j| !j.announced()),
                })
                .await;
            ctx.env
                .metrics
                .handshake_seconds
                .with_label_values(&["vnc"])
                .observe(started.elapsed().as_secs_f64());
            match started_ok {
                Err(e) => audit_failed(e),
                Ok(()) => {
                    info!(desktop = %si.name_lossy(), width = si.width, height = si.height, "session relaying");
                    // An owner's connection makes the live session; a participant's
                    // counts its bytes there.
                    let (live, _hold) = match &ctx.joined {
                        Some(j) => (j.live().clone(), None),
                        None => {
                            let hold = ctx.env.live.hold(
                                Identity {
                                    id: ctx.id,
                                    kind: ctx.claims.kind,
                                    user: &ctx.claims.user,
                                    domain: &ctx.console.domain,
                                    uuid: &ctx.console.uuid,
                                    host: &ctx.console.host,
                                    token_id: &ctx.claims.token_id(),
                                    client: ctx.client,
                                },
                                None,
                            );
                            brx.pings().measure_live(hold.live().clone());
                            ctx.env.slots.listed_soon();
                            (hold.live().clone(), Some(hold))
                        }
                    };
                    let meter = Meter::new(&ctx.env.metrics, "vnc", live.clone());
                    let leg = Leg {
                        up: up.stream,
                        early,
                        si,
                        si_bytes,
                        rotation: 0,
                        _done: None,
                    };
                    let (end, recording) =
                        legs(&ctx, leg, brx, &mut btx, &meter, &mut shutdown).await;
                    let record = ctx
                        .env
                        .audit
                        .record(&meter.session_end(ctx.id, started, &end, None, recording, None))
                        .await;
                    if let Err(e) = record {
                        warn!(error = %e, "audit log: session end not written");
                    }
                    end
                }
            }
        }
    };
    btx.close(end.close_code(), &end.told()).await;
    end
}

/// Relays a session's browser connections in turn, from its first to its end: a
/// connection that drops parks the session until its page comes back (or the window
/// ends). Returns the end and the last connection's recording. A resuming connection
/// the session did not take is told how it ended.
async fn legs(
    ctx: &Ctx,
    leg: Leg,
    brx: &mut BrowserRx,
    btx: &mut BrowserTx,
    meter: &Meter,
    shutdown: &mut watch::Receiver<bool>,
) -> (End, Option<crate::recording::Finished>) {
    // Resumable when the page asked for it and resuming is on.
    let (held, mut arrivals) = ctx.env.resumes.open_if(
        ctx.resumable,
        ctx.id,
        ctx.claims.kind,
        ctx.client.ip(),
        ctx.claims.uuid,
        &ctx.claims.host,
    );
    let slot = held.as_ref().map(|h| h.slot().clone());
    let mut left = None;
    let ended = legs_in_turn(
        ctx,
        leg,
        brx,
        btx,
        meter,
        shutdown,
        slot.as_deref(),
        arrivals.as_mut(),
        &mut left,
    )
    .await;
    super::resume::refuse_the_rest(&ended.0, held, left, arrivals.as_mut());
    ended
}

/// Closes a leg's connection to QEMU that was not relayed: what QEMU releases as it
/// goes is on record first, as at a relay's end.
async fn discard(ctx: &Ctx, up: Conn) {
    record_disconnect(ctx).await;
    let (mut rd, mut wr) = tokio::io::split(up.boxed());
    close_upstream(&mut wr, Some(&mut rd)).await;
}

#[allow(clippy::too_many_arguments)]
async fn legs_in_turn(
    ctx: &Ctx,
    mut leg: Leg,
    brx: &mut BrowserRx,
    btx: &mut BrowserTx,
    meter: &Meter,
    shutdown: &mut watch::Receiver<bool>,
    slot: Option<&super::resume::Slot>,
    mut arrivals: Option<&mut tokio::sync::mpsc::Receiver<super::resume::Attach>>,
    left: &mut Option<super::resume::Attach>,
) -> (End, Option<crate::recording::Finished>) {
    let live = meter.live();
    let owner = ctx.joined.is_none();
    let max = ctx.claims.policy.max_duration;
    // An owner's max_duration counts from the session's start, a participant's from
    // its own.
    let joined_at = Instant::now();
    let age = || {
        if owner {
            live.age()
        } else {
            joined_at.elapsed()
        }
    };
    let idle_timeout = if owner { ctx.env.idle_timeout } else { None };
    loop {
        // The owner's connections are recorded, one file each; participants see the
        // same screen.
        let recorder = match &ctx.env.record_dir {
            Some(dir) if owner => {
                match start_recording(ctx, dir, &leg.si_bytes, leg.rotation).await {
                    Ok(r) => Some(r),
                    Err(e) => {
                        discard(ctx, leg.up).await;
                        return (audit_failed(e), None);
                    }
                }
            }
            _ => None,
        };
        // The page's resume credential comes first, in a text message noVNC never
        // sees (the page keeps it): a page that speaks RFB after ServerInit has it.
        // The browser sees the console only once it is on record and listed:
        // ServerInit goes last.
        let credential = slot.and_then(|s| s.credential());
        let told = match credential {
            Some(c) => {
                let mut words = zeroize::Zeroizing::new(String::with_capacity(c.len() + 16));
                words.push_str("{\"resume\":\"");
                words.push_str(&c);
                words.push_str("\"}");
                btx.text(std::mem::take(&mut *words)).await
            }
            None => true,
        };
        let sent = told && btx.binary(leg.si_bytes).await;
        let (end, arrived) = if sent {
            let stop = super::stopped(shutdown, live.state(), owner, max, age());
            relay(
                ctx,
                leg.up,
                leg.early,
                &leg.si,
                brx,
                btx,
                meter,
                recorder.as_ref(),
                stop,
                slot,
                arrivals.as_deref_mut(),
            )
            .await
        } else {
            discard(ctx, leg.up).await;
            (End::BrowserClosed, None)
        };
        let recording = match recorder {
            None => None,
            Some(r) => match r.finish().await {
                Ok(f) => Some(f),
                Err(e) => {
                    warn!(error = %e, "recording not finished");
                    None
                }
            },
        };
        // Parked only when the connection was lost (not left with a close frame) or a
        // resume took its place.
        let Some(slot) = slot else {
            return (end, recording);
        };
        let lost = end.browser_gone() && !brx.said_goodbye();
        if !lost && arrived.is_none() {
            *left = arrived;
            return (end, recording);
        }
        let cause = if arrived.is_some() {
            "replaced"
        } else {
            end.label()
        };
        let Some(arrivals) = arrivals.as_deref_mut() else {
            return (end, recording);
        };
        let parking = super::resume::Parking {
            env: &ctx.env,
            session: ctx.id,
            client: ctx.client,
            live,
            owner,
            max,
            idle: &live.idle,
            idle_timeout,
        };
        let parked = match parking.park(slot, (brx, btx), cause, recording).await {
            Ok(p) => p,
            Err(end) => {
                *left = arrived;
                return (end, None);
            }
        };
        let mut next = arrived;
        loop {
            let back = match parking
                .wait(&parked, arrivals, shutdown, age, next.take())
                .await
            {
                Ok(a) => a,
                Err((end, rejected)) => {
                    *left = rejected;
                    return (end, None);
                }
            };
            let reattached = tokio::select! {
                biased;
                end = super::stopped(shutdown, live.state(), owner, max, age()) => Err((end, None)),
                r = reattach(ctx, &parking, &parked, back, brx, btx) => r,
            };
            match reattached {
                Ok(next_leg) => {
                    leg = next_leg;
                    if owner {
                        live.set_parked(None);
                    }
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
                    return (end, None);
                }
            }
        }
    }
}

/// A page came back: a new connection to QEMU, authenticated as at the start with the
/// console libvirt describes now (the same run of the VM), and the page's connection
/// in the place of the lost one, on record before QEMU's ServerInit reaches it. A
/// failure ends the session, but for one on the browser's side
/// ([`super::resume::try_again`]); a VM that is gone or restarted hands the page back
/// to be told why.
async fn reattach(
    ctx: &Ctx,
    parking: &super::resume::Parking<'_>,
    parked: &super::resume::Parked,
    back: super::resume::Attach,
    brx: &mut BrowserRx,
    btx: &mut BrowserTx,
) -> Result<Leg, (End, Option<super::resume::Attach>)> {
    let console = match back.same_run(&ctx.console) {
        Ok(c) => c,
        Err(end) => return Err((end, Some(back))),
    };
    let taken = back.take_over(brx, btx);
    if ctx.joined.is_none() {
        brx.pings().measure_live(parking.live.clone());
    }
    let opened = async {
        let (link, ubuf, init) = authenticate_upstream(ctx, &console).await?;
        vm_init(link, ubuf, init).await
    };
    let (up, early, si, si_bytes) = tokio::time::timeout(ctx.env.handshake_timeout, opened)
        .await
        .unwrap_or_else(|_| Err(handshake_timeout(ctx.env.handshake_timeout)))
        .map_err(|e| (e, None))?;
    let Some(rotation) = taken.claim.commit() else {
        // A newer try of the page replaced this one (or no randomness for the next
        // credential): the session waits on for it.
        discard(ctx, up.stream).await;
        return Err((End::BrowserClosed, None));
    };
    let resumed = parking
        .resumed(parked, taken.client, rotation, up.tls, up.password)
        .await;
    if let Err(end) = resumed {
        discard(ctx, up.stream).await;
        return Err((end, None));
    }
    info!(session = ctx.id, rotation, desktop = %si.name_lossy(), width = si.width, height = si.height, "session resumed");
    Ok(Leg {
        up: up.stream,
        early,
        si,
        si_bytes,
        rotation,
        _done: Some(taken.done),
    })
}

#[allow(clippy::too_many_arguments)]
async fn relay(
    ctx: &Ctx,
    up: Conn,
    early: Vec<u8>,
    si: &ServerInit,
    brx: &mut BrowserRx,
    btx: &BrowserTx,
    meter: &Meter,
    recorder: Option<&Recorder>,
    stop: impl std::future::Future<Output = End>,
    resumable: Option<&super::resume::Slot>,
    arrivals: Option<&mut tokio::sync::mpsc::Receiver<super::resume::Attach>>,
) -> (End, Option<super::resume::Attach>) {
    let live = meter.live();
    // The session's input clock: an operator's input counts for it too. A participant
    // ends with the session, never idle on its own.
    let idle = &live.idle;
    let idle_timeout = match ctx.joined {
        None => ctx.env.idle_timeout,
        Some(_) => None,
    };
    // Long payloads from the VM are spliced to the browser when both connections are
    // plain TCP and the session is not recorded (a recording needs the bytes).
    let recorded = recorder.is_some();
    let (mut up_rd, up_wr) = VmReader::split(up, btx.can_splice() && !recorded);
    // Both directions' rules in one place: each direction's framing depends on what
    // the other negotiated.
    let rules = Mutex::new(Rules::new(
        si,
        ctx.env.browser_limits,
        ctx.env.vm_limits,
        ctx.participant,
        ctx.env.audit.clipboard_content(),
    ));
    let frame_latency = ctx
        .env
        .metrics
        .frame_latency_seconds
        .with_label_values(&["vnc"]);
    let input_latency = ctx
        .env
        .metrics
        .input_to_display_seconds
        .with_label_values(&["vnc"]);
    // The VM's writer, shared by the browser's input and a paste being typed: each
    // holds it from judging a message to writing it, so the audit's order is the
    // order QEMU receives.
    let writer = tokio::sync::Mutex::new(up_wr);
    // Where this connection takes pastes ("Paste as keys"), while it relays: for any
    // layout when QEMU acts on key numbers; with a keymap QEMU maps keysyms itself,
    // which for en-us types what a US layout does and for another keymap is not
    // modelled.
    let layouts: &'static [vizor_keys::layout::Layout] =
        match lock(&ctx.keyboard).map(|k| k.vnc.keymap().clone()) {
            Ok(vizor_keys::vnc::Keymap::Default) => &vizor_keys::layout::Layout::ALL,
            Ok(vizor_keys::vnc::Keymap::EnUs) => &[vizor_keys::layout::Layout::Us],
            _ => &[],
        };
    let (seat, mut typing) = crate::paste::Seat::new(layouts);
    let progress = seat.progress();
    let seated = live.seat(ctx.id, seat);
    let arrived = Mutex::new(None);
    let browser_to_vm = async {
        let mut out = lock(&rules)?.start();
        let len = out.len() as u64;
        write_up(&mut *writer.lock().await, &mut out).await?;
        // The session's bytes toward the VM are what vizor wrote there for it.
        meter.add(Direction::BrowserToVm, len);
        let mut buf = Vec::with_capacity(4096);
        let mut arrivals = arrivals;
        let mut spoke = false;
        loop {
            // A page resuming while this connection still looks open (its browser saw
            // it dead first) takes its place: heard only here, between two messages,
            // so whatever was read is on record and written whole.
            tokio::select! {
                biased;
                Some(a) = async { arrivals.as_deref_mut()?.recv().await } => {
                    if let Ok(mut taken) = arrived.lock() {
                        *taken = Some(a);
                    }
                    return Err(End::BrowserClosed);
                }
                r = brx.read_into(&mut buf) => { r?; }
            }
            // The page speaks RFB on this connection, which it was sent the current
            // resume credential on before ServerInit: it has it.
            if !spoke {
                spoke = true;
                if let Some(slot) = resumable {
                    slot.confirmed();
                }
            }
            let mut up_wr = writer.lock().await;
            let up_wr = &mut *up_wr;
            let mut pos = 0;
            loop {
                let judged =
                    lock(&rules)?.from_browser(&buf[pos..], &ctx.keyboard, Instant::now())?;
                let Some(judged) = judged else { break };
                if judged.input {
                    idle.touch();
                }
                // On record before it moves.
                for note in &judged.notes {
                    super::record_note(&ctx.env.audit, ctx.id, note)
                        .await
                        .map_err(audit_failed)?;
                }
                if let Some(queued) = judged.queued_keys {
                    pace(&ctx.keyboard, queued, up_wr, &mut out, meter).await?;
                }
                match judged.verdict {
                    Verdict::Forward => out.extend_from_slice(&buf[pos..pos + judged.len]),
                    Verdict::Rewrite(bytes) => out.extend_from_slice(&bytes),
                    Verdict::Drop(why) => debug!(?why, "browser message dropped"),
                }
                pos += judged.len;
            }
            buf.drain(..pos);
            if !out.is_empty() {
                let len = out.len() as u64;
                write_up(up_wr, &mut out).await?;
                meter.add(Direction::BrowserToVm, len);
            }
        }
    };
    let mut keys = VncKeys {
        ctx,
        rules: &rules,
        writer: &writer,
        meter,
    };
    let pasting = typing.serve(&ctx.env.audit, ctx.id, &mut keys);
    let vm_to_browser = async {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        // Bytes QEMU sent along with ServerInit are decoded before the first read.
        buf.extend_from_slice(&early);
        loop {
            let step = lock(&rules)?.from_vm(&buf, Instant::now())?;
            for (which, d) in &step.latencies {
                match which {
                    Latency::Frame => frame_latency.observe(d.as_secs_f64()),
                    Latency::InputToDisplay => input_latency.observe(d.as_secs_f64()),
                    _ => {}
                }
                live.observe(*which, *d);
            }
            for note in &step.notes {
                super::record_note(&ctx.env.audit, ctx.id, note)
                    .await
                    .map_err(audit_failed)?;
            }
            // Everything decoded goes to the browser as read, without a copy, but for an
            // incomplete header and an update that may be LED state alone.
            if step.send > 0 {
                to_browser(buf.split_to(step.send), recorder, btx, meter).await?;
            }
            let _ = buf.split_to(step.skip);
            if step.again {
                continue;
            }
            // The rest of a long rectangle goes from socket to socket; the decoder,
            // told its length, then stands after it.
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
    let result: Result<(), End> = tokio::select! {
        biased;
        end = stop => Err(end),
        _ = idle.expired(idle_timeout) => Err(End::Idle(idle.idle_for())),
        r = browser_to_vm => r,
        r = vm_to_browser => r,
        r = pasting => r,
    };
    // No paste is taken from now on.
    drop(seated);
    drop(typing);
    let mut up_wr = writer.into_inner();
    // A paste the session's end stopped: how far it got (its keys are on record).
    let interrupted = *progress.borrow();
    crate::paste::interrupted(&ctx.env.audit, ctx.id, interrupted).await;
    let closing = lock(&rules).map(|mut r| r.closing()).unwrap_or_default();
    for note in &closing {
        if let Err(e) = super::record_note(&ctx.env.audit, ctx.id, note).await {
            warn!(error = %e, "audit log: dropped input not written");
        }
    }
    // When this connection closes (below, with the sockets), QEMU releases every key
    // of the VM's VNC keyboard, whichever session pressed it: on record first.
    record_disconnect(ctx).await;
    let end = result.err().unwrap_or(End::VmClosed);
    if !end.vm_gone() {
        close_upstream(&mut up_wr, up_rd.as_read()).await;
    }
    (end, arrived.into_inner().ok().flatten())
}

/// The VM's writer, shared by the browser's input and a paste.
type VmWriter = tokio::sync::Mutex<super::VmWrite>;

/// A paste's keys into a VNC session.
struct VncKeys<'a> {
    ctx: &'a Ctx,
    rules: &'a Mutex<Rules>,
    writer: &'a VmWriter,
    meter: &'a Meter,
}

impl crate::paste::Keys for VncKeys<'_> {
    /// As QEMU's LED state last said.
    fn caps_lock(&self) -> Result<bool, End> {
        Ok(lock(self.rules)?.caps_lock())
    }

    async fn key(&mut self, ev: vizor_keys::layout::Event) -> Result<(), End> {
        type_key(self.ctx, ev, self.rules, self.writer, self.meter).await
    }
}

/// One key event of a paste, judged, on record, paced and written while the VM's
/// writer is held.
async fn type_key(
    ctx: &Ctx,
    ev: vizor_keys::layout::Event,
    rules: &Mutex<Rules>,
    writer: &VmWriter,
    meter: &Meter,
) -> Result<(), End> {
    let mut up_wr = writer.lock().await;
    let up_wr = &mut *up_wr;
    let (bytes, judged) = lock(rules)?.from_paste(ev, &ctx.keyboard, Instant::now())?;
    if judged.input {
        meter.live().idle.touch();
    }
    for note in &judged.notes {
        super::record_note(&ctx.env.audit, ctx.id, note)
            .await
            .map_err(audit_failed)?;
    }
    let mut out = Vec::new();
    if let Some(queued) = judged.queued_keys {
        pace(&ctx.keyboard, queued, up_wr, &mut out, meter).await?;
    }
    match judged.verdict {
        Verdict::Forward => out.extend_from_slice(&bytes),
        Verdict::Rewrite(b) => out.extend_from_slice(&b),
        Verdict::Drop(_) => {}
    }
    if !out.is_empty() {
        let len = out.len() as u64;
        write_up(up_wr, &mut out).await?;
        meter.add(Direction::BrowserToVm, len);
    }
    Ok(())
}

/// Records the keys QEMU releases when this session's connection closes.
async fn record_disconnect(ctx: &Ctx) {
    let lifted = match ctx.keyboard.lock() {
        Ok(mut k) => {
            let lifted = k.vnc.disconnect();
            // Each goes through QEMU's key queue too.
            k.pacer.sent(Instant::now(), lifted.len() as u32);
            lifted
        }
        Err(_) => return,
    };
    for stroke in lifted {
        let event = KeyEvent {
            stroke,
            via: None,
            keysym: None,
            mismatch: false,
        };
        if let Err(e) = ctx.env.audit.stroke(ctx.id, &event).await {
            warn!(error = %e, "audit log: a key QEMU releases at disconnect not written");
        }
    }
}

/// Holds key events back while QEMU's key queue is full by [`Pacer`]'s count: what is
/// ready goes first, then vizor waits (and reads nothing from the browser meanwhile).
///
/// [`Pacer`]: vizor_keys::vnc::Pacer
async fn pace(
    keyboard: &Mutex<VmKeyboard>,
    queued: u32,
    up_wr: &mut (impl AsyncWrite + Unpin),
    out: &mut Vec<u8>,
    meter: &Meter,
) -> Result<(), End> {
    loop {
        // The queue is the VM's: the room is taken under the lock that found it.
        let wait = {
            let mut k = lock(keyboard)?;
            let now = Instant::now();
            let wait = k.pacer.wait(now, queued);
            if wait.is_zero() {
                k.pacer.sent(now, queued);
            }
            wait
        };
        if wait.is_zero() {
            return Ok(());
        }
        if !out.is_empty() {
            let len = out.len() as u64;
            write_up(up_wr, out).await?;
            meter.add(Direction::BrowserToVm, len);
        }
        tokio::time::sleep(wait).await;
    }
}

/// Sends decoded bytes from the VM to the browser, the recording first.
async fn to_browser(
    chunk: BytesMut,
    recorder: Option<&Recorder>,
    btx: &BrowserTx,
    meter: &Meter,
) -> Result<(), End> {
    let len = chunk.len() as u64;
    if let Some(r) = recorder {
        // A copy for the recording's writer: the browser's writer takes the chunk.
        r.frame(bytes::Bytes::copy_from_slice(&chunk))
            .await
            .map_err(|e| End::Audit(format!("recording: {e}")))?;
    }
    btx.bytes(chunk).await?;
    meter.add(Direction::VmToBrowser, len);
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, End> {
    m.lock()
        .map_err(|_| End::Internal("a session lock was poisoned"))
}
