//! The console WebSocket: origin check, upgrade, the console page, and one console
//! connection from its token to its close frame.

use super::*;

/// Logs how a session ended: at warn, with what to do, when QEMU refused the password
/// libvirt stores (the one line that says so).
pub(super) fn log_end(end: &End) {
    if end.upstream_failure() == Some(session::VmFailure::Auth) {
        warn!(reason = %end, label = end.label(),
            "session ended: QEMU refused vizor's authentication. If the console's password was changed outside libvirt (QEMU's monitor: set_password, change vnc password), libvirt still holds the old one: set it through libvirt (virsh update-device) or restart the domain");
    } else {
        info!(reason = %end, label = end.label(), ended_by = end.side().as_str(), "session ended");
    }
}

/// Counts how a session (a SPICE channel) ended, and audits a protocol error or a
/// failure toward the VM.
pub(super) fn record_end(app: &App, kind: ConsoleKind, session: u64, domain: &str, end: &End) {
    if let Some((direction, reason)) = end.protocol() {
        app.audit().record_nowait(&Event::ProtocolError {
            session,
            direction: direction.as_str(),
            reason,
            detail: &end.reason(),
        });
    } else if let Some(failure) = end.upstream_failure() {
        app.audit().record_nowait(&Event::UpstreamFailure {
            session,
            domain,
            reason: failure.label(),
            detail: &end.reason(),
        });
    } else if matches!(end, End::Internal(_)) {
        app.audit().record_nowait(&Event::UpstreamFailure {
            session,
            domain,
            reason: end.label(),
            detail: &end.reason(),
        });
    }
    let m = app.metrics();
    m.sessions_total
        .with_label_values(&[kind.as_str(), end.label()])
        .inc();
    if let Some((direction, cause)) = end.protocol() {
        m.protocol_errors_total
            .with_label_values(&[kind.as_str(), direction.as_str(), cause])
            .inc();
    }
    if end.upstream_failure() == Some(session::VmFailure::Auth) {
        m.auth_refusals_total
            .with_label_values(&["upstream", end.label()])
            .inc();
    }
}

/// Stops a background task when dropped.
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts a participant (`vizor_session_participants{role}`) while it is held.
pub(super) struct Participating<'a>(&'a Metrics, crate::token::Role);

impl<'a> Participating<'a> {
    fn new(m: &'a Metrics, role: crate::token::Role) -> Self {
        m.session_participants
            .with_label_values(&[role.as_str()])
            .inc();
        Participating(m, role)
    }
}

impl Drop for Participating<'_> {
    fn drop(&mut self) {
        self.0
            .session_participants
            .with_label_values(&[self.1.as_str()])
            .dec();
    }
}

/// Counts a session as live while it is held.
pub(super) struct Active<'a>(&'a Metrics, ConsoleKind);

impl<'a> Active<'a> {
    fn new(m: &'a Metrics, kind: ConsoleKind) -> Self {
        m.sessions_active.with_label_values(&[kind.as_str()]).inc();
        Active(m, kind)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0
            .sessions_active
            .with_label_values(&[self.1.as_str()])
            .dec();
    }
}

/// Browsers name the page that opens a WebSocket in `Origin`. A console may be opened
/// from vizor's own origin (`Origin`'s host and port are the request's `Host`) or from
/// one `allowed_origins` lists; a request without `Origin` does not come from a web
/// page and is let through to the token check. `Err` holds the refused origin (at most
/// 200 characters, for the log).
pub(super) fn origin_allowed(allowed: &[String], req: &Request<Incoming>) -> Result<(), String> {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return Ok(());
    };
    let shown = || {
        String::from_utf8_lossy(origin.as_bytes())
            .chars()
            .take(200)
            .collect::<String>()
    };
    let Ok(origin) = origin.to_str() else {
        return Err(shown());
    };
    let origin = origin.to_ascii_lowercase();
    if allowed.contains(&origin) {
        return Ok(());
    }
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_ascii_lowercase);
    match (authority, host) {
        (Some(a), Some(h)) if !a.is_empty() && a == h => Ok(()),
        _ => Err(shown()),
    }
}

pub(super) fn websocket(app: Arc<App>, peer: SocketAddr, req: &mut Request<Incoming>) -> Resp {
    let token = query_param(req, "token");
    // A console page coming back after a network blip, with its resume credential;
    // or asking for one (vizor's console page: it keeps text messages from noVNC).
    let resume = query_param(req, "resume").filter(|r| !r.is_empty());
    let resumable = query_param(req, "resumable").as_deref() == Some("1");
    let wants_binary = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "binary");
    // RFC 6455 4.4: a version the server does not speak gets 426 naming the one it does.
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut r = text(
            StatusCode::UPGRADE_REQUIRED,
            "bad WebSocket upgrade: Sec-WebSocket-Version must be 13\n",
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            header::HeaderValue::from_static("13"),
        );
        return r;
    }
    let (resp, upgrade) = match fastwebsockets::upgrade::upgrade(&mut *req) {
        Ok(x) => x,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("bad WebSocket upgrade: {e}\n"),
            )
        }
    };
    let mut resp = resp.map(|_| Full::new(Bytes::new()));
    if wants_binary {
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            header::HeaderValue::from_static("binary"),
        );
    }
    tokio::spawn(async move {
        match (upgrade.await, resume) {
            (Ok(ws), Some(credential)) => super::resume::resume(app, peer, credential, ws).await,
            (Ok(ws), None) => console(app, peer, token, resumable, ws).await,
            (Err(e), _) => warn!(client = %peer, error = %e, "WebSocket upgrade failed"),
        }
    });
    resp
}

/// `GET /console?token=`: the console page for a good token, or a page saying in words
/// why there is none. The token is checked but not spent: the page's WebSocket spends it.
pub(super) fn console_page(app: &App, peer: SocketAddr, req: &Request<Incoming>) -> Resp {
    let Some(token) = query_param(req, "token").filter(|t| !t.is_empty()) else {
        return console::error_page(
            StatusCode::BAD_REQUEST,
            "This console link has no token",
            "Open the console with the whole link you were given.",
        );
    };
    let now = unix_now();
    let claims = match app.key.open(&token, now) {
        Ok(c) => c,
        Err(e) => return console_refused(app, peer, &e, None),
    };
    if let Err(e) = claims.admits(peer.ip()) {
        return console_refused(app, peer, &e, Some(&claims.token_id()));
    }
    let used = app
        .replay
        .lock()
        .map(|r| r.is_used(&claims, now))
        .unwrap_or(true);
    if used {
        return console_refused(app, peer, &TokenError::Replayed, Some(&claims.token_id()));
    }
    if let Some(j) = &claims.joins {
        if let Err(e) = joinable(app, &claims, j) {
            token_refused(
                app,
                peer,
                e.label(),
                Some(&claims.token_id()),
                "console page",
                &e.to_string(),
            );
            return console::error_page(
                StatusCode::GONE,
                "This console session has ended",
                "The session this link joins is over, or was ended. Ask for a new link.",
            );
        }
    }
    console::client_page(&app.config.console, claims.kind, &claims.domain)
}

pub(super) fn console_refused(
    app: &App,
    peer: SocketAddr,
    e: &TokenError,
    token_id: Option<&str>,
) -> Resp {
    token_refused(
        app,
        peer,
        e.reason(),
        token_id,
        "console page",
        &e.to_string(),
    );
    let (heading, detail) = match e {
        TokenError::Expired { .. } => (
            "This console link has expired",
            "Console links are good for a short time only. Ask for a new one.",
        ),
        TokenError::Replayed => (
            "This console link was already used",
            "Each console link opens one session. Ask for a new one.",
        ),
        TokenError::ReplayCacheFull => ("Too many consoles are starting", "Try again in a moment."),
        TokenError::WrongClient { .. } => (
            "This console link is for another computer",
            "It was issued for another network address. Ask for a new one.",
        ),
        _ => (
            "This console link is not valid",
            "It may be incomplete or damaged. Ask for a new one.",
        ),
    };
    console::error_page(StatusCode::FORBIDDEN, heading, detail)
}

pub(super) use session::browser::CLOSE_LINGER;

pub(super) async fn console(
    app: Arc<App>,
    peer: SocketAddr,
    token: Option<String>,
    resumable: bool,
    ws: fastwebsockets::WebSocket<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
) {
    let (mut brx, btx) = session::browser::split(
        ws,
        app.env.browser_limits.max_message_len + 64,
        app.config.server.ws_message_size,
        app.config.limits.send_timeout,
        app.config.server.splice,
    );
    // Whatever ended it, vizor's close frame is out: the browser's answer is awaited
    // before the connection closes (a session still counts as live meanwhile, so a
    // shutdown waits for it too).
    let guard = console_session(app, peer, token, resumable, &mut brx, btx).await;
    brx.linger(CLOSE_LINGER).await;
    drop(guard);
}

/// One console connection, from its token to its close frame; holds the session's
/// place among the live ones, if it became one.
pub(super) async fn console_session(
    app: Arc<App>,
    peer: SocketAddr,
    token: Option<String>,
    resumable: bool,
    brx: &mut session::browser::BrowserRx,
    btx: session::browser::BrowserTx,
) -> Option<SessionGuard> {
    let refuse = |reason: &'static str, token_id: Option<&str>, told: &str, detail: &str| {
        token_refused(&app, peer, reason, token_id, "console", detail);
        let told = told.to_owned();
        let btx = btx.clone();
        async move {
            btx.close(1008, &told).await;
            None
        }
    };
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return refuse(
            "missing_token",
            None,
            "missing token",
            "no token in the URL",
        )
        .await;
    };
    let now = unix_now();
    // A SPICE session's channels come with its token, spent by the main channel and
    // perhaps expired since (a resumed session links them again): such a token still
    // joins its own live session's channels, and nothing else (`session::spice`).
    let (claims, rejoins): (Claims, bool) = match app.key.open(&token, now) {
        Ok(c) => (c, false),
        Err(e @ TokenError::Expired { .. }) => match app.key.open_spent(&token) {
            Ok(c) if c.kind == ConsoleKind::Spice && app.env.spice_sessions.is_live(&c.nonce) => {
                (c, true)
            }
            _ => return refuse(e.reason(), None, token_message(&e), &e.to_string()).await,
        },
        Err(e) => return refuse(e.reason(), None, token_message(&e), &e.to_string()).await,
    };
    let token_id = claims.token_id();
    // A token bound to another address is refused before it is spent: whoever
    // copied it cannot use it, nor use it up for its holder.
    let refuse_token = |e: TokenError| {
        refuse(
            e.reason(),
            Some(&token_id),
            token_message(&e),
            &e.to_string(),
        )
    };
    if let Err(e) = claims.admits(peer.ip()) {
        return refuse_token(e).await;
    }
    // Viewing only and clipboard ways are not applied to SPICE's agent stream yet: a
    // SPICE token asking for them is refused rather than let through.
    if claims.kind == ConsoleKind::Spice
        && (claims.policy.view_only || claims.policy.clipboard != crate::token::ClipboardWays::BOTH)
    {
        let why = "this vizor cannot apply view-only or clipboard limits to SPICE consoles";
        return refuse("policy_unsupported", Some(&token_id), why, why).await;
    }
    // A participant's token joins a live session: refused before it is spent when
    // that session is not live here (it ended: its join tokens went with it).
    let joining = match &claims.joins {
        None => None,
        Some(j) => match joinable(&app, &claims, j) {
            Ok(live) => Some(live),
            Err(e) => {
                return refuse(e.label(), Some(&token_id), &e.to_string(), &e.to_string()).await
            }
        },
    };
    // The token is good: measure this browser's round trip while it is connected.
    let pings = brx.pings();
    pings.measure_into(
        app.metrics()
            .client_rtt_seconds
            .with_label_values(&[claims.kind.as_str()]),
    );
    let pinger = AbortOnDrop(btx.start_pinging(pings, app.config.server.ping_interval));
    // The token's first connection spends it. A SPICE token then admits its session's
    // other channels too (each names the session its main channel was given), so a
    // spent SPICE token goes on to its session's channels, where it is checked.
    let admitted = if rejoins {
        Err(TokenError::Replayed)
    } else {
        admit(&app, &claims, now).await
    };
    let joins = match admitted {
        Ok(()) => false,
        Err(TokenError::Replayed) if claims.kind == ConsoleKind::Spice => true,
        Err(e @ TokenError::StateUnavailable) => {
            // Not the client's doing: counted, and on record as refusals are (summed
            // up per client and interval), but not a failed attempt.
            app.metrics()
                .auth_refusals_total
                .with_label_values(&["token", e.reason()])
                .inc();
            super::refused::refusal(&app, peer, e.reason(), || {
                warn!(client = %peer, token = %token_id, "session refused: {e}");
                app.audit().record_refusal(&Event::TokenRefused {
                    client: &peer.to_string(),
                    reason: e.reason(),
                    token_id: Some(&token_id),
                })
            });
            btx.close(1013, token_message(&e)).await;
            return None;
        }
        Err(e) => return refuse_token(e).await,
    };
    let id = app.next_session.fetch_add(1, Ordering::Relaxed);
    let kind = claims.kind;
    // A SPICE channel other than a session's first main channel takes its session's
    // id, known after its link: its span names the channel's session then.
    let span = match kind {
        ConsoleKind::Vnc => {
            tracing::info_span!("session", id, domain = %claims.domain, kind = %kind, client = %peer, token = %token_id)
        }
        ConsoleKind::Spice => {
            tracing::info_span!("session", domain = %claims.domain, kind = %kind, client = %peer, token = %token_id)
        }
    };
    let guard = app.sessions.enter();
    let (end, session, domain) = async {
        let env = app.env.clone();
        let shutdown = app.close_sessions.clone();
        let domain = claims.domain.clone();
        let ended = match kind {
            ConsoleKind::Vnc => {
                let console = match spend(&app, &claims, peer, &btx).await {
                    Ok(console) => console,
                    Err(end) => return (end, id, domain),
                };
                let domain = console.domain.clone();
                let _slot = match env.take_slot(id, peer, &claims, &console.domain).await {
                    Ok(slot) => slot,
                    Err(end) => {
                        btx.close(end.close_code(), &end.told()).await;
                        return (end, id, domain);
                    }
                };
                // A participant takes its place on the session it joins (its end ends
                // this connection too).
                let joined = match joining {
                    None => None,
                    Some(live) => {
                        let member = crate::live::Member {
                            session: id,
                            user: claims.user.clone(),
                            role: claims.role,
                            client: peer,
                            token_id: token_id.clone(),
                            since: SystemTime::now(),
                            announced: claims.role != crate::token::Role::Observer
                                || app.config.oversight.announce,
                        };
                        match live.join(member) {
                            Ok(j) => Some(j),
                            Err(e) => {
                                // Spent, then refused (the session ended or filled up
                                // meanwhile): on record as a refused session.
                                warn!(reason = e.label(), "participant refused: {e}");
                                app.audit().record_nowait(&Event::SessionRefused {
                                    session: id,
                                    client: &peer.to_string(),
                                    user: &claims.user,
                                    domain: &domain,
                                    token_id: &token_id,
                                    reason: e.label(),
                                });
                                let end = End::refused(session::Refusal::Join(e), e.to_string());
                                btx.close(end.close_code(), &end.told()).await;
                                return (end, id, domain);
                            }
                        }
                    }
                };
                let _participating = joined
                    .as_ref()
                    .map(|_| Participating::new(app.metrics(), claims.role));
                let _active = Active::new(app.metrics(), kind);
                match &joined {
                    None => {
                        info!(upstream = %console.target, user = %claims.user, "session starting")
                    }
                    Some(j) => {
                        info!(upstream = %console.target, user = %claims.user, role = %claims.role, joins = j.live().id, "participant joining")
                    }
                }
                let keyboard = env.vm_keyboards.of(&console);
                let ctx = session::rfb::Ctx {
                    env,
                    id,
                    participant: crate::policy::Participant::of(&claims),
                    claims,
                    client: peer,
                    console,
                    keyboard,
                    joined,
                    resumable,
                };
                (session::rfb::run(ctx, brx, btx, shutdown).await, id, domain)
            }
            ConsoleKind::Spice => {
                // A spent token joins its session's channels, which link to that
                // session's console; a fresh one opens the session, whose slot is taken
                // when its main channel links.
                let first = if joins {
                    None
                } else {
                    match spend(&app, &claims, peer, &btx).await {
                        Ok(console) => Some(console),
                        Err(end) => return (end, id, domain),
                    }
                };
                let _active = Active::new(app.metrics(), kind);
                let ctx = session::spice::Ctx {
                    env,
                    id,
                    participant: crate::policy::Participant::of(&claims),
                    claims,
                    client: peer,
                    resumable,
                };
                session::spice::run(ctx, first, brx, btx, shutdown).await
            }
        };
        log_end(&ended.0);
        ended
    }
    .instrument(span)
    .await;
    if let End::Refused {
        why: session::Refusal::Channel(why),
        ..
    } = &end
    {
        // A SPICE channel its token does not admit counts as a failed token.
        token_refused(
            &app,
            peer,
            why.label(),
            Some(&token_id),
            "SPICE channel",
            why.label(),
        );
    }
    record_end(&app, kind, session, &domain, &end);
    drop(pinger);
    Some(guard)
}

/// Admits a token on its first connection. When replicas share state: first whether
/// this replica would take it (a token it spent, a SPICE session's channels, a full
/// cache: no trip to Redis), then across replicas (a failure there leaves it unspent
/// here), then here.
async fn admit(app: &App, claims: &Claims, now: u64) -> Result<(), TokenError> {
    let local = |admit: bool| {
        app.replay
            .lock()
            .map_err(|_| TokenError::ReplayCacheFull)
            .and_then(|mut r| {
                if admit {
                    r.admit(claims, now)
                } else {
                    r.would_admit(claims, now)
                }
            })
    };
    if let Some(shared) = &app.shared {
        local(false)?;
        match shared.spend(&claims.nonce, claims.expires_at, now).await {
            Ok(true) => {}
            Ok(false) => return Err(TokenError::Replayed),
            Err(e) => {
                debug!(error = %e, "a token could not be admitted");
                return Err(TokenError::StateUnavailable);
            }
        }
    }
    local(true)
}

/// The live session a participant's token joins, if it can be joined: live here, with
/// the owner, domain and console kind the token names (participants connect by VNC).
pub(super) fn joinable(
    app: &App,
    claims: &Claims,
    joins: &crate::token::Joins,
) -> Result<Arc<crate::live::Live>, crate::live::JoinError> {
    let live = app
        .live()
        .joinable(joins.session, &joins.owner_token_id())?;
    if live.uuid != claims.uuid_string()
        || live.host != claims.host
        || claims.kind != ConsoleKind::Vnc
    {
        return Err(crate::live::JoinError::NotLive);
    }
    live.has_room()?;
    Ok(live)
}

/// Spends a token that opened its first connection: on record before anything of the
/// session goes on, then its console looked up. `Err`: the end the browser was told.
async fn spend(
    app: &App,
    claims: &Claims,
    peer: SocketAddr,
    btx: &session::browser::BrowserTx,
) -> Result<Console, End> {
    let end = match app.audit().token_used(claims, peer).await {
        Err(e) => session::audit_failed(e),
        Ok(()) => {
            match lookup(app, &claims.host, DomainRef::Uuid(claims.uuid), claims.kind).await {
                Ok(console) => return Ok(console),
                Err(e) => {
                    warn!(reason = e.reason(), error = %e, "console lookup failed");
                    End::lookup(&e)
                }
            }
        }
    };
    btx.close(end.close_code(), &end.told()).await;
    Err(end)
}
