//! The RFB session: vizor is the RFB server toward the browser and the RFB client
//! toward QEMU, then relays framed messages both ways.
//!
//! The browser is offered security type None only: its token already authenticated it.
//! vizor authenticates to QEMU with the password libvirt stores. Security types are
//! offered to the browser only once QEMU has accepted vizor, so a failure toward the VM
//! reaches the browser as an RFB refusal with a reason, whatever its protocol version.

use super::browser::{BrowserRx, BrowserTx};
use super::keyboards::VmKeyboard;
use super::{
    audit_failed, close_upstream, connect, read_handshake, read_upstream, write_upstream, Conn,
    End, Meter, Refusal, VmFailure, VmLink,
};
use crate::audit::{Audit, Clipboard, Event, KeyEvent};
use crate::libvirt::Console;
use crate::limits::Idle;
use crate::live::{Direction, Identity, Latency, LiveSessions};
use crate::record::Recorder;
use crate::token::Claims;
use bytes::BytesMut;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::watch;
use tracing::{debug, info, warn};
use vizor_keys::vnc::{self, Keymap};
use vizor_keys::{Locks, Origin};
use vizor_rfb::client::{write_set_encodings, ClientDecoder, ClientMessage, Confirmations};
use vizor_rfb::handshake::client::{self, Authenticate, SendClientInit, VencryptChosen};
use vizor_rfb::handshake::server::{self, SecurityChosen};
use vizor_rfb::handshake::{Progress, SecurityType, ServerInit, VencryptSubtype, Version};
use vizor_rfb::server::{RectInfo, ServerDecoder, ServerEvent};
use vizor_rfb::{Encoding, Limits};

/// What a session needs from the proxy.
pub struct Ctx {
    /// Session id (unique in this process).
    pub id: u64,
    /// The token's claims.
    pub claims: Claims,
    /// The browser's address.
    pub client: SocketAddr,
    /// The console libvirt reported.
    pub console: Console,
    /// The audit sink.
    pub audit: Arc<Audit>,
    /// Codec bounds for what the browser sends.
    pub browser_limits: Limits,
    /// Codec bounds for what QEMU sends.
    pub vm_limits: Limits,
    /// A session without input for this long is closed.
    pub idle_timeout: Option<Duration>,
    /// TLS toward QEMU (`[upstream_tls]`).
    pub upstream_tls: Option<Arc<crate::tls::UpstreamTls>>,
    /// Bound on the handshake, both legs together.
    pub handshake_timeout: Duration,
    /// Bound on connecting to QEMU.
    pub dial: super::Dial,
    /// Prometheus metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Live sessions, for the API and per-session series.
    pub live: Arc<LiveSessions>,
    /// Where sessions are recorded (`[audit] record_dir`), if they are.
    pub record_dir: Option<std::path::PathBuf>,
    /// The VM's keyboard as QEMU keeps it, shared with the VM's other sessions.
    pub keyboard: Arc<Mutex<VmKeyboard>>,
    /// `[libvirt] require_password`: refuse a console QEMU opens without a password,
    /// whatever libvirt stores.
    pub require_password: bool,
}

/// Starts a session's recording with the ServerInit the browser received.
fn start_recording(ctx: &Ctx, dir: &std::path::Path, si: &[u8]) -> std::io::Result<Recorder> {
    let header = serde_json::json!({
        "session": ctx.id,
        "kind": ctx.claims.kind.as_str(),
        "domain": ctx.console.domain,
        "user": ctx.claims.user,
        "started": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
    });
    let mut r = Recorder::create(dir, &header, ctx.id)?;
    r.frame(si)?;
    Ok(r)
}

/// A source of bytes for the handshake helpers.
pub(crate) trait Source {
    fn fill(&mut self, buf: &mut Vec<u8>) -> impl Future<Output = Result<(), End>> + Send;
}

impl Source for BrowserRx {
    async fn fill(&mut self, buf: &mut Vec<u8>) -> Result<(), End> {
        self.read_into(buf).await.map(|_| ())
    }
}

struct Upstream<R>(R);

impl<R: AsyncRead + Unpin + Send> Source for Upstream<R> {
    async fn fill(&mut self, buf: &mut Vec<u8>) -> Result<(), End> {
        read_handshake(&mut self.0, buf, "handshake").await
    }
}

/// Feeds a handshake state until it completes; returns the next state and the bytes
/// the completed message spanned.
pub(crate) async fn drive<S, N>(
    src: &mut impl Source,
    buf: &mut Vec<u8>,
    mut state: S,
    fail: fn(&vizor_rfb::Error) -> End,
    mut step: impl FnMut(S, &[u8]) -> Result<Progress<S, N>, vizor_rfb::Error>,
) -> Result<(N, Vec<u8>), End> {
    loop {
        match step(state, buf) {
            Ok(Progress::Done { next, consumed }) => {
                return Ok((next, buf.drain(..consumed).collect()))
            }
            Ok(Progress::NeedMore(s)) => state = s,
            Err(e) => return Err(fail(&e)),
        }
        src.fill(buf).await?;
    }
}

/// Connects and authenticates to QEMU, stopping before ClientInit (which waits for the
/// browser's shared flag). With `[upstream_tls]`, a console offering VeNCrypt is
/// wrapped in TLS with QEMU's X.509 certificate verified, before any password is used.
async fn authenticate_upstream(ctx: &Ctx) -> Result<(VmLink, Vec<u8>, SendClientInit), End> {
    let connecting = Instant::now();
    let mut up = connect(&ctx.console.target, ctx.dial).await?;
    ctx.metrics
        .upstream_connect_seconds
        .with_label_values(&["vnc"])
        .observe(connecting.elapsed().as_secs_f64());
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let password = ctx.console.password.as_ref();
    let tls = ctx.upstream_tls.as_deref();
    let (rd, mut wr) = tokio::io::split(up.as_stream());
    let mut src = Upstream(rd);
    let (sec, _) = drive(
        &mut src,
        &mut buf,
        client::ExpectServerVersion::new(ctx.vm_limits),
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
            up = Conn::Other(tls.connect(up.boxed(), &ctx.console.target).await?);
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
    let mut src = Upstream(rd);
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
    if ctx.require_password && !sent_password {
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
async fn handshake(
    ctx: &Ctx,
    brx: &mut BrowserRx,
    btx: &BrowserTx,
) -> Result<(VmLink, Vec<u8>, ServerInit, Vec<u8>), End> {
    let mut out = Vec::new();
    let browser_hs = server::start(Version::V3_8, ctx.browser_limits, &mut out);
    if !btx.binary(std::mem::take(&mut out)).await {
        return Err(End::BrowserClosed);
    }
    // QEMU first: its outcome decides what the browser is offered.
    let upstream = authenticate_upstream(ctx).await;
    let mut bbuf = Vec::new();
    let (offer, _) = drive(brx, &mut bbuf, browser_hs, End::from_browser, |s, b| {
        s.receive(b)
    })
    .await?;
    let (mut up, mut ubuf, init) = match upstream {
        Ok(u) => u,
        Err(end) => {
            let told = match end.upstream_failure() {
                Some(VmFailure::Auth) => "authentication to the VM failed",
                Some(VmFailure::NoPassword) => {
                    "the VM console has no password, which vizor requires"
                }
                _ => "the VM console cannot be reached",
            };
            offer.refuse(told, &mut out);
            btx.binary(out).await;
            return Err(end);
        }
    };
    let choice = offer
        .offer(&[SecurityType::NONE], &mut out)
        .map_err(|e| End::from_browser(&e))?;
    btx.binary(std::mem::take(&mut out)).await;
    let (chosen, _) = drive(brx, &mut bbuf, choice, End::from_browser, |s, b| {
        s.receive(b)
    })
    .await?;
    let SecurityChosen::None(result) = chosen else {
        return Err(End::browser_violation(
            "a security type vizor did not offer",
            "security_type_not_offered",
        ));
    };
    let expect_ci = result.accept(&mut out);
    btx.binary(std::mem::take(&mut out)).await;
    let (ci, _) = drive(brx, &mut bbuf, expect_ci, End::from_browser, |s, b| {
        s.receive(b)
    })
    .await?;
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
    let expect_si = init.send(true, &mut out);
    let (rd, mut wr) = tokio::io::split(up.stream.as_stream());
    write_up(&mut wr, &mut out).await?;
    let mut src = Upstream(rd);
    let (si, si_bytes) = drive(&mut src, &mut ubuf, expect_si, End::from_vm, |s, b| {
        s.receive(b)
    })
    .await?;
    Ok((up, ubuf, si, si_bytes))
}

/// Runs the session to its end, closes the browser with the reason, and writes the
/// session's audit records.
pub async fn run(
    ctx: Ctx,
    brx: &mut BrowserRx,
    btx: BrowserTx,
    mut shutdown: watch::Receiver<bool>,
) -> End {
    let started = Instant::now();
    let hs = tokio::time::timeout(ctx.handshake_timeout, handshake(&ctx, brx, &btx));
    let hs = tokio::select! {
        r = hs => r.unwrap_or_else(|_| Err(End::refused(
            Refusal::HandshakeTimeout,
            format!("handshake did not complete within {}", humantime::format_duration(ctx.handshake_timeout)),
        ))),
        _ = shutdown.wait_for(|s| *s) => Err(End::Shutdown),
    };
    let end = match hs {
        Err(end) => end,
        Ok((up, early, si, si_bytes)) => {
            let upstream = ctx.console.target.to_string();
            let client = ctx.client.to_string();
            let started_ok = ctx
                .audit
                .record(&Event::SessionStart {
                    session: ctx.id,
                    token_id: &ctx.claims.token_id(),
                    user: &ctx.claims.user,
                    domain: &ctx.console.domain,
                    uuid: &ctx.console.uuid,
                    kind: ctx.claims.kind,
                    client: &client,
                    upstream: &upstream,
                    upstream_tls: up.tls,
                    vm_password: up.password,
                    channel: None,
                })
                .await;
            ctx.metrics
                .handshake_seconds
                .with_label_values(&["vnc"])
                .observe(started.elapsed().as_secs_f64());
            let recorder = match (&started_ok, &ctx.record_dir) {
                (Ok(()), Some(dir)) => start_recording(&ctx, dir, &si_bytes).map(Some),
                _ => Ok(None),
            };
            match started_ok.and(recorder) {
                Err(e) => audit_failed(e),
                Ok(recorder) => {
                    let recorder = Mutex::new(recorder);
                    info!(desktop = %si.name_lossy(), width = si.width, height = si.height, "session relaying");
                    let hold = ctx.live.hold(
                        Identity {
                            id: ctx.id,
                            kind: ctx.claims.kind,
                            user: &ctx.claims.user,
                            domain: &ctx.console.domain,
                            token_id: &ctx.claims.token_id(),
                            client: ctx.client,
                        },
                        None,
                    );
                    brx.pings().measure_live(hold.live().clone());
                    let meter = Meter::new(&ctx.metrics, "vnc", hold.live().clone());
                    // The browser sees the console only once the session is on record
                    // and listed: ServerInit goes last.
                    let end = if btx.binary(si_bytes).await {
                        tokio::select! {
                            end = relay(&ctx, up.stream, early, &si, brx, &btx, &meter, &recorder) => end,
                            _ = shutdown.wait_for(|s| *s) => End::Shutdown,
                        }
                    } else {
                        End::BrowserClosed
                    };
                    let recording =
                        recorder
                            .into_inner()
                            .ok()
                            .flatten()
                            .and_then(|r| match r.finish() {
                                Ok(f) => Some(f),
                                Err(e) => {
                                    warn!(error = %e, "recording not finished");
                                    None
                                }
                            });
                    let record = ctx
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

#[allow(clippy::too_many_arguments)]
async fn relay(
    ctx: &Ctx,
    up: Conn,
    early: Vec<u8>,
    si: &ServerInit,
    brx: &mut BrowserRx,
    btx: &BrowserTx,
    meter: &Meter,
    recorder: &Mutex<Option<Recorder>>,
) -> End {
    let live = meter.live();
    let idle = Idle::default();
    // Long payloads from the VM are spliced to the browser when both connections are
    // plain TCP and the session is not recorded (a recording needs the bytes).
    let recorded = recorder.lock().map_or(true, |r| r.is_some());
    let (mut up_rd, mut up_wr): (VmReader, Box<dyn AsyncWrite + Unpin + Send>) = match up {
        Conn::Tcp(tcp) if btx.can_splice() && !recorded => {
            let (rd, wr) = tcp.into_split();
            (VmReader::Tcp(Some(rd)), Box::new(wr))
        }
        other => {
            let (rd, wr) = tokio::io::split(other.boxed());
            (VmReader::Other(Box::new(rd)), Box::new(wr))
        }
    };
    let server = Mutex::new(ServerDecoder::new(si, ctx.vm_limits));
    // What QEMU confirmed (extended mouse buttons, fence...), for the browser's decoder.
    let confirmed = AtomicU8::new(0);
    let timing = Mutex::new(Timing::default());
    let frame_latency = ctx
        .metrics
        .frame_latency_seconds
        .with_label_values(&["vnc"]);
    let input_latency = ctx
        .metrics
        .input_to_display_seconds
        .with_label_values(&["vnc"]);
    // Whether the browser asked for QEMU's LED state itself (else vizor drops it).
    let browser_leds = AtomicBool::new(false);
    let browser_to_vm = async {
        with_led_state(&server, &mut up_wr, meter).await?;
        let mut dec = ClientDecoder::new(ctx.browser_limits);
        let mut buf = Vec::with_capacity(4096);
        let mut out = Vec::with_capacity(4096);
        let mut requested = false;
        let mut offered_ext_desktop = false;
        let mut buttons_down = 0u16;
        loop {
            brx.read_into(&mut buf).await?;
            dec.confirm(Confirmations::from_bits(confirmed.load(Ordering::Relaxed)));
            let mut pos = 0;
            while let Some((msg, n)) = dec.decode(&buf[pos..]).map_err(|e| End::from_browser(&e))? {
                let raw = &buf[pos..pos + n];
                match msg {
                    ClientMessage::SetPixelFormat(pf) => {
                        // After the first request an update in the old format may be on
                        // its way (QEMU also sends cursors unasked): the proxy could no
                        // longer tell where the server's messages begin.
                        if requested {
                            return Err(End::refused(
                                Refusal::PixelFormatChange,
                                "changing the pixel format after the first update request is not supported",
                            ));
                        }
                        lock(&server)?.set_pixel_format(pf);
                        out.extend_from_slice(raw);
                    }
                    ClientMessage::SetEncodings(list) => {
                        let kept: Vec<Encoding> = list.iter().filter(|e| e.is_framable()).collect();
                        if kept.len() != list.len() {
                            debug!(
                                dropped = list.len() - kept.len(),
                                "SetEncodings: encodings vizor cannot frame removed"
                            );
                        }
                        offered_ext_desktop = kept.contains(&Encoding::EXTENDED_DESKTOP_SIZE);
                        let mut upstream = kept;
                        browser_leds.store(
                            upstream.contains(&Encoding::QEMU_LED_STATE),
                            Ordering::Relaxed,
                        );
                        if !upstream.contains(&Encoding::QEMU_LED_STATE) {
                            // See `with_led_state`: QEMU must never press lock keys itself.
                            upstream.push(Encoding::QEMU_LED_STATE);
                        }
                        // The decoder learns the list before QEMU can answer it.
                        lock(&server)?.set_encodings(upstream.iter().copied());
                        write_set_encodings(upstream, &mut out);
                    }
                    ClientMessage::FramebufferUpdateRequest { .. } => {
                        requested = true;
                        lock(&timing)?.request();
                        out.extend_from_slice(raw);
                    }
                    ClientMessage::PointerEvent { buttons, x, y } => {
                        idle.touch();
                        lock(&timing)?.input();
                        let pressed = buttons & !buttons_down;
                        buttons_down = buttons;
                        for bit in (0..16).filter(|b| pressed & (1 << b) != 0) {
                            ctx.audit
                                .record(&Event::Button {
                                    session: ctx.id,
                                    button: crate::audit::rfb_button(bit),
                                    x: Some(x),
                                    y: Some(y),
                                })
                                .await
                                .map_err(audit_failed)?;
                        }
                        out.extend_from_slice(raw);
                    }
                    ClientMessage::KeyEvent { down, keysym } => {
                        idle.touch();
                        lock(&timing)?.input();
                        let (outcome, keymap) = {
                            let mut k = lock(&ctx.keyboard)?;
                            (k.vnc.key_event(down, keysym), k.vnc.keymap().clone())
                        };
                        record_keys(ctx, &keymap, &outcome, down, keysym).await?;
                        pace(&ctx.keyboard, outcome.queued(), &mut up_wr, &mut out, meter).await?;
                        out.extend_from_slice(raw);
                    }
                    ClientMessage::QemuExtendedKeyEvent {
                        down,
                        keysym,
                        keycode,
                    } => {
                        idle.touch();
                        lock(&timing)?.input();
                        let (outcome, keymap) = {
                            let mut k = lock(&ctx.keyboard)?;
                            (
                                k.vnc.ext_key_event(down, keysym, keycode),
                                k.vnc.keymap().clone(),
                            )
                        };
                        record_keys(ctx, &keymap, &outcome, down, keysym).await?;
                        pace(&ctx.keyboard, outcome.queued(), &mut up_wr, &mut out, meter).await?;
                        out.extend_from_slice(raw);
                    }
                    ClientMessage::ClientCutText(text) => {
                        idle.touch();
                        let clips = Clipboard::of_cut_text(&text, ctx.audit.clipboard_content())
                            .map_err(|e| End::from_browser(&e))?;
                        for clip in clips {
                            ctx.audit
                                .record(&clip.event(ctx.id, "browser_to_vm"))
                                .await
                                .map_err(audit_failed)?;
                        }
                        out.extend_from_slice(raw);
                    }
                    // QEMU answers SetDesktopSize with an ExtendedDesktopSize rectangle
                    // even to a client that never offered it, which the decoder would
                    // rightly refuse: such a request is dropped instead.
                    ClientMessage::SetDesktopSize { .. } if !offered_ext_desktop => {
                        debug!("SetDesktopSize without ExtendedDesktopSize dropped");
                    }
                    _ => out.extend_from_slice(raw),
                }
                pos += n;
            }
            buf.drain(..pos);
            if !out.is_empty() {
                let len = out.len() as u64;
                write_up(&mut up_wr, &mut out).await?;
                meter.add(Direction::BrowserToVm, len);
            }
        }
    };
    let vm_to_browser = async {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        // Bytes QEMU sent along with ServerInit are decoded before the first read.
        buf.extend_from_slice(&early);
        // Bytes at the front of `buf` already decoded but held back: an update that may
        // turn out to carry nothing but the LED state the browser did not ask for.
        let mut held = 0;
        let mut leds = LedUpdates::default();
        loop {
            let mut consumed = held;
            let mut clips = Vec::new();
            let mut changed = Vec::new();
            let mut cut = None;
            let mut clip_dropped = None;
            let browser_wants_leds = browser_leds.load(Ordering::Relaxed);
            // Payload of the current rectangle still to come, read while the decoder
            // is locked anyway.
            let pending = {
                let mut dec = lock(&server)?;
                while let Some((ev, n)) =
                    dec.decode(&buf[consumed..]).map_err(|e| End::from_vm(&e))?
                {
                    let confirms = Confirmations::of(&ev);
                    if confirms != Confirmations::default() {
                        confirmed.fetch_or(confirms.bits(), Ordering::Relaxed);
                    }
                    // A guest clipboard beyond vm_message_max is not held: it goes
                    // nowhere, on record with its size, and the session goes on.
                    match ev {
                        ServerEvent::ServerCutTextDropped { len } => {
                            clip_dropped = Some(len);
                            cut = Some((consumed, consumed + n));
                            break;
                        }
                        ServerEvent::Dropped(_) => {
                            cut = Some((consumed, consumed + n));
                            break;
                        }
                        _ => {}
                    }
                    match leds.event(&ev, consumed, n, browser_wants_leds) {
                        LedStep::Changed(v) => changed.push(v),
                        LedStep::Drop(range) => {
                            cut = Some(range);
                            break;
                        }
                        LedStep::None => {}
                    }
                    match ev {
                        ServerEvent::UpdateEnd => {
                            let (frame, input) = lock(&timing)?.update_relayed();
                            if let Some(d) = frame {
                                frame_latency.observe(d.as_secs_f64());
                                live.observe(Latency::Frame, d);
                            }
                            if let Some(d) = input {
                                input_latency.observe(d.as_secs_f64());
                                live.observe(Latency::InputToDisplay, d);
                            }
                        }
                        // Recorded below, once the decoder is unlocked.
                        ServerEvent::ServerCutText(text) => {
                            match Clipboard::of_cut_text(&text, ctx.audit.clipboard_content()) {
                                Ok(c) => clips.extend(c),
                                // An extended clipboard that inflates past the bound
                                // is dropped like one too long on the wire.
                                Err(vizor_rfb::Error::LengthTooLarge { len, .. }) => {
                                    clip_dropped = Some(len);
                                    cut = Some((consumed, consumed + n));
                                    break;
                                }
                                Err(e) => return Err(End::from_vm(&e)),
                            }
                        }
                        _ => {}
                    }
                    consumed += n;
                }
                dec.pending_payload()
            };
            for v in changed {
                ctx.audit
                    .locks(ctx.id, Locks::from_bits(u16::from(v)), "qemu")
                    .await
                    .map_err(audit_failed)?;
            }
            for clip in clips {
                ctx.audit
                    .record(&clip.event(ctx.id, "vm_to_browser"))
                    .await
                    .map_err(audit_failed)?;
            }
            if let Some(length) = clip_dropped {
                ctx.audit
                    .record(&Event::ClipboardDropped {
                        session: ctx.id,
                        direction: "vm_to_browser",
                        length,
                    })
                    .await
                    .map_err(audit_failed)?;
            }
            if let Some((from, to)) = cut {
                // What came before goes on; the LED update goes nowhere.
                if from > 0 {
                    to_browser(buf.split_to(from), recorder, btx, meter).await?;
                }
                let _ = buf.split_to(to - from);
                held = 0;
                continue;
            }
            // Everything decoded goes to the browser as read, without a copy, but for an
            // incomplete header and an update that may be LED state alone.
            let upto = leds.held_from().unwrap_or(consumed);
            if upto > 0 {
                to_browser(buf.split_to(upto), recorder, btx, meter).await?;
                leds.advanced(upto);
            }
            held = consumed - upto;
            // The rest of a long rectangle goes from socket to socket; the decoder,
            // told its length, then stands after it.
            let splice_now = buf.is_empty() && pending >= SPLICE_MIN;
            if let (true, VmReader::Tcp(slot)) = (splice_now, &mut up_rd) {
                if let Some(from) = slot.take() {
                    let (from, sent) = btx.splice(from, pending).await?;
                    *slot = Some(from);
                    if sent {
                        lock(&server)?
                            .consume_payload(pending)
                            .map_err(|e| End::from_vm(&e))?;
                        meter.add_spliced(pending);
                        continue;
                    }
                    // No pipe (out of open files): this much is read instead.
                }
            }
            up_rd.read(&mut buf).await?;
        }
    };
    let result: Result<(), End> = tokio::select! {
        r = browser_to_vm => r,
        r = vm_to_browser => r,
        _ = idle.expired(ctx.idle_timeout) => Err(End::Idle(idle.idle_for())),
    };
    // When this connection closes (below, with the sockets), QEMU releases every key
    // of the VM's VNC keyboard, whichever session pressed it: on record first.
    record_disconnect(ctx).await;
    let end = result.err().unwrap_or(End::VmClosed);
    if !end.vm_gone() {
        let rd = match &mut up_rd {
            VmReader::Tcp(rd) => rd
                .as_mut()
                .map(|r| r as &mut (dyn AsyncRead + Unpin + Send)),
            VmReader::Other(rd) => Some(&mut **rd as &mut (dyn AsyncRead + Unpin + Send)),
        };
        close_upstream(&mut up_wr, rd).await;
    }
    end
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
        if let Err(e) = ctx.audit.stroke(ctx.id, &event).await {
            warn!(error = %e, "audit log: a key QEMU releases at disconnect not written");
        }
    }
}

/// Asks QEMU for its LED state before the browser says anything. Without that
/// extension QEMU presses Caps Lock and Num Lock itself (`lock-key-sync`) whenever a
/// keysym's case or keypad meaning disagrees with what it believes the locks are: key
/// presses no browser sent, from a lock state no one can see. With it QEMU injects
/// nothing, and reports the guest's LED state, which the audit records. The browser's
/// own SetEncodings keeps it (see the relay).
async fn with_led_state(
    server: &Mutex<ServerDecoder>,
    up_wr: &mut (impl AsyncWrite + Unpin),
    meter: &Meter,
) -> Result<(), End> {
    let mut out = Vec::new();
    write_set_encodings([Encoding::QEMU_LED_STATE], &mut out);
    lock(server)?.set_encodings([Encoding::QEMU_LED_STATE]);
    let len = out.len() as u64;
    write_up(up_wr, &mut out).await?;
    // The session's bytes toward the VM are what vizor wrote there for it.
    meter.add(Direction::BrowserToVm, len);
    Ok(())
}

/// Holds key events back while QEMU's key queue is full by [`Pacer`]'s count: what is
/// ready goes first, then vizor waits (and reads nothing from the browser meanwhile).
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
    recorder: &Mutex<Option<Recorder>>,
    btx: &BrowserTx,
    meter: &Meter,
) -> Result<(), End> {
    let len = chunk.len() as u64;
    if let Some(r) = lock(recorder)?.as_mut() {
        r.frame(&chunk)
            .map_err(|e| End::Audit(format!("recording: {e}")))?;
    }
    btx.bytes(chunk).await?;
    meter.add(Direction::VmToBrowser, len);
    Ok(())
}

/// Records and keeps the browser's keys as QEMU takes them: one record per stroke the
/// guest's keyboard gets (or is denied), the browser's keysym on its own.
async fn record_keys(
    ctx: &Ctx,
    keymap: &Keymap,
    outcome: &vnc::Outcome,
    down: bool,
    keysym: u32,
) -> Result<(), End> {
    if outcome.strokes.is_empty() {
        if let Keymap::Other(name) = keymap {
            ctx.audit
                .keysym_key(ctx.id, down, keysym, name)
                .await
                .map_err(audit_failed)?;
        }
        return Ok(());
    }
    for stroke in &outcome.strokes {
        let own = stroke.origin == Origin::Browser;
        let event = KeyEvent {
            stroke: *stroke,
            via: Some(outcome.via.as_str()),
            keysym: own.then_some(keysym),
            mismatch: own && outcome.mismatch,
        };
        ctx.audit
            .stroke(ctx.id, &event)
            .await
            .map_err(audit_failed)?;
    }
    Ok(())
}

/// QEMU's keyboard LED state reaches vizor as an update of one LED rectangle. vizor asks
/// QEMU for it on every connection (`with_led_state`), so such an update goes to the
/// browser only if the browser asked for it too; its values are audited either way.
#[derive(Debug, Default)]
struct LedUpdates {
    /// Where an update of one rectangle begins, while it may be LED state alone and
    /// the browser did not ask for it.
    start: Option<usize>,
    /// The update's rectangle is LED state.
    led: bool,
    /// The last state seen.
    last: Option<u8>,
}

/// What an event means for LED updates.
#[derive(Debug, PartialEq, Eq)]
enum LedStep {
    None,
    /// The guest's lock state is new.
    Changed(u8),
    /// The update in this range (of the buffer the events came from) is LED state the
    /// browser did not ask for: drop it.
    Drop((usize, usize)),
}

impl LedUpdates {
    /// `ev` was decoded from `at`, `n` bytes long.
    fn event(&mut self, ev: &ServerEvent<'_>, at: usize, n: usize, browser_asked: bool) -> LedStep {
        match ev {
            ServerEvent::UpdateBegin { rects: 1 } if !browser_asked => {
                self.start = Some(at);
                self.led = false;
            }
            ServerEvent::UpdateBegin { .. } => self.start = None,
            ServerEvent::Rect(r) => {
                if let RectInfo::LedState(v) = r.info {
                    self.led = true;
                    if self.last != Some(v) {
                        self.last = Some(v);
                        return LedStep::Changed(v);
                    }
                } else {
                    self.start = None;
                }
            }
            ServerEvent::UpdateEnd => {
                if let (Some(start), true) = (self.start.take(), std::mem::take(&mut self.led)) {
                    return LedStep::Drop((start, at + n));
                }
            }
            _ => {}
        }
        LedStep::None
    }

    /// Where bytes must be held back from: the start of an update that may be dropped.
    fn held_from(&self) -> Option<usize> {
        self.start
    }

    /// `n` bytes left the front of the buffer.
    fn advanced(&mut self, n: usize) {
        if let Some(s) = &mut self.start {
            *s = s.saturating_sub(n);
        }
    }
}

/// The shortest payload worth splicing: below it a read and a write cost less than
/// the pipe's system calls and the hand-over to the browser's writer.
const SPLICE_MIN: u64 = 64 * 1024;

/// The VM's side of a relay: a TCP reader, which the browser's writer can borrow to
/// splice from, or any other stream (TLS, a UNIX socket, or a TCP one read whole).
enum VmReader {
    /// `None` only while lent.
    Tcp(Option<OwnedReadHalf>),
    Other(Box<dyn AsyncRead + Unpin + Send>),
}

impl VmReader {
    async fn read(&mut self, buf: &mut BytesMut) -> Result<(), End> {
        match self {
            VmReader::Tcp(Some(rd)) => read_upstream(rd, buf).await,
            VmReader::Other(rd) => read_upstream(rd, buf).await,
            VmReader::Tcp(None) => Err(End::Internal("the VM's reader was not given back")),
        }
    }
}

/// When update requests and input went to QEMU, for the latency histograms.
#[derive(Default)]
struct Timing {
    /// The oldest update request not yet answered (one update answers every request
    /// received before it).
    requested: Option<Instant>,
    /// The first key or pointer event since the last update.
    input: Option<Instant>,
}

impl Timing {
    fn request(&mut self) {
        self.requested.get_or_insert_with(Instant::now);
    }

    fn input(&mut self) {
        self.input.get_or_insert_with(Instant::now);
    }

    /// An update was relayed: how long since the request it answers, and since the
    /// input it may show.
    fn update_relayed(&mut self) -> (Option<Duration>, Option<Duration>) {
        (
            self.requested.take().map(|t| t.elapsed()),
            self.input.take().map(|t| t.elapsed()),
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, End> {
    m.lock().map_err(|_| End::Internal("decoder lock poisoned"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vizor_rfb::server::{write_rect_header, write_update_header};
    use vizor_rfb::PixelFormat;

    /// What the relay forwards of `stream`, fed to the LED filter in pieces of `cut`
    /// bytes as the relay would: (bytes to the browser, lock states seen).
    fn relay_leds(stream: &[u8], cut: usize, browser_asked: bool) -> (Vec<u8>, Vec<u8>) {
        let si = ServerInit {
            width: 4,
            height: 4,
            pixel_format: PixelFormat::RGB888,
            name: Vec::new(),
        };
        let mut dec = ServerDecoder::new(&si, Limits::default());
        dec.set_encodings([Encoding::RAW, Encoding::QEMU_LED_STATE]);
        let mut leds = LedUpdates::default();
        let (mut buf, mut sent, mut seen) = (Vec::new(), Vec::new(), Vec::new());
        let mut held = 0;
        for piece in stream.chunks(cut) {
            buf.extend_from_slice(piece);
            loop {
                let mut consumed = held;
                let mut drop = None;
                while let Some((ev, n)) = dec.decode(&buf[consumed..]).unwrap() {
                    match leds.event(&ev, consumed, n, browser_asked) {
                        LedStep::Changed(v) => seen.push(v),
                        LedStep::Drop(r) => {
                            drop = Some(r);
                            break;
                        }
                        LedStep::None => {}
                    }
                    consumed += n;
                }
                if let Some((from, to)) = drop {
                    sent.extend(buf.drain(..from));
                    buf.drain(..to - from);
                    held = 0;
                    continue;
                }
                let upto = leds.held_from().unwrap_or(consumed);
                sent.extend(buf.drain(..upto));
                leds.advanced(upto);
                held = consumed - upto;
                break;
            }
        }
        (sent, seen)
    }

    fn led_update(state: u8) -> Vec<u8> {
        let mut v = Vec::new();
        write_update_header(1, &mut v);
        write_rect_header(0, 0, 1, 1, Encoding::QEMU_LED_STATE, &mut v);
        v.push(state);
        v
    }

    fn pixel_update() -> Vec<u8> {
        let mut v = Vec::new();
        write_update_header(1, &mut v);
        write_rect_header(0, 0, 1, 1, Encoding::RAW, &mut v);
        v.extend_from_slice(&[1, 2, 3, 4]);
        v
    }

    #[test]
    fn led_state_the_browser_did_not_ask_for_is_audited_and_dropped() {
        let mut stream = pixel_update();
        stream.extend(led_update(4));
        stream.extend(pixel_update());
        stream.extend(led_update(4));
        stream.extend(led_update(6));
        stream.push(2); // Bell
        let mut expected = pixel_update();
        expected.extend(pixel_update());
        expected.push(2);
        // Whatever the reads' boundaries.
        for cut in [1, 2, 3, 5, 7, 13, 64, 4096] {
            let (sent, seen) = relay_leds(&stream, cut, false);
            assert_eq!(sent, expected, "cut {cut}");
            assert_eq!(seen, [4, 6], "cut {cut}: changes only");
            // A browser that asked gets them all.
            let (sent, seen) = relay_leds(&stream, cut, true);
            assert_eq!(sent, stream, "cut {cut}");
            assert_eq!(seen, [4, 6]);
        }
    }
}
