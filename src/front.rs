//! The HTTP and WebSocket front: `GET /websockify?token=` (the console),
//! `GET /api/v1/domains/{name-or-uuid}/console` (tokens for a management plane),
//! `GET /console?token=` (the console page, see [`crate::console`]), `GET /healthz`, and
//! static files from `web_root`.
//!
//! A token is checked before anything else happens: a refused one never costs a
//! libvirt lookup or a connection to QEMU. Refusals reach the browser as a WebSocket
//! close frame with a short reason; the log and the audit record say precisely why.

use crate::audit::{Audit, Event};
use crate::config::Config;
use crate::console;
use crate::libvirt::{Console, DomainRef, Libvirt, LookupError};
use crate::limits::{self, Connections, FailedTokens, Slot, Slots};
use crate::live::{Direction, Latency, LiveSessions};
use crate::metrics::Metrics;
use crate::session::{self, End};
use crate::token::{Claims, ConsoleKind, ReplayCache, TokenError, TokenKey};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn, Instrument};
use zeroize::Zeroizing;

/// Everything the front shares between connections.
pub struct App {
    /// The configuration.
    pub config: Config,
    /// Seals and opens tokens.
    pub key: TokenKey,
    /// Tokens already used on this replica.
    pub replay: Mutex<ReplayCache>,
    /// The libvirt connection.
    pub libvirt: Arc<Libvirt>,
    /// The audit sink.
    pub audit: Arc<Audit>,
    /// The management API's bearer key, if the API is enabled.
    pub admin_key: Option<Zeroizing<String>>,
    /// The `[metrics] key_file` bearer key, which reads `/metrics` here.
    pub metrics_key: Option<Zeroizing<String>>,
    /// Codec bounds for what browsers send.
    pub browser_limits: vizor_rfb::Limits,
    /// Codec bounds for what VMs send.
    pub vm_limits: vizor_rfb::Limits,
    /// Session slots (`[limits] max_sessions*`).
    pub slots: Arc<Slots>,
    /// HTTP connections not (yet) sessions (`[limits] max_connections*`).
    pub connections: Arc<Connections>,
    /// Failed token attempts per client.
    pub failed_tokens: FailedTokens,
    /// Refusals of unauthenticated clients, aggregated per client and interval.
    pub refusals: crate::refusals::Refusals,
    /// TLS toward QEMU, when `[upstream_tls]` is configured.
    pub upstream_tls: Option<Arc<crate::tls::UpstreamTls>>,
    /// Set to true to close every live session (after the shutdown grace).
    pub close_sessions: watch::Receiver<bool>,
    /// Live sessions.
    pub sessions: SessionCount,
    /// vizor's RSA key for SPICE links with browsers.
    pub spice_key: Arc<session::spice::LinkKey>,
    /// Linked SPICE sessions (which channels a token admits).
    pub spice_sessions: Arc<session::spice::Sessions>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Live sessions, for `GET /api/v1/sessions` and per-session series.
    pub live: Arc<LiveSessions>,
    /// The keyboards of VMs with live sessions, as QEMU keeps them.
    pub vm_keyboards: session::keyboards::VmKeyboards,
    /// `GET /readyz`.
    pub readiness: Arc<Readiness>,
    next_session: AtomicU64,
}

/// Whether vizor is ready for consoles (`GET /readyz`): libvirt contacted since start.
#[derive(Debug, Default)]
pub struct Readiness {
    ready: std::sync::atomic::AtomicBool,
    waiting: Mutex<String>,
}

impl Readiness {
    /// libvirt answered: ready from now on.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Not ready: `why` says for what vizor waits.
    pub fn set_waiting(&self, why: String) {
        if let Ok(mut w) = self.waiting.lock() {
            *w = why;
        }
    }

    /// Whether ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The `/readyz` answer; with `detail` (the metrics listener, on a private
    /// address) it says why, else only that it is not (libvirt's words name its URI,
    /// which may hold a user and host, and are not for anyone who reaches the console
    /// port).
    pub fn response(&self, detail: bool) -> Resp {
        if self.is_ready() {
            return text(StatusCode::OK, "ready\n");
        }
        if !detail {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: waiting for libvirt (see vizor's log)\n",
            );
        }
        let why = self.waiting.lock().map(|w| w.clone()).unwrap_or_default();
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("not ready: {why}\n"),
        )
    }
}

/// Counts live sessions so shutdown can wait for them.
#[derive(Clone, Default)]
pub struct SessionCount(Arc<(AtomicUsize, Notify)>);

struct SessionGuard(SessionCount);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if (self.0).0 .0.fetch_sub(1, Ordering::SeqCst) == 1 {
            (self.0).0 .1.notify_waiters();
        }
    }
}

impl SessionCount {
    fn enter(&self) -> SessionGuard {
        self.0 .0.fetch_add(1, Ordering::SeqCst);
        SessionGuard(self.clone())
    }

    /// Live sessions now.
    pub fn live(&self) -> usize {
        self.0 .0.load(Ordering::SeqCst)
    }

    /// Waits until no session is live.
    pub async fn idle(&self) {
        loop {
            let notified = self.0 .1.notified();
            if self.live() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl App {
    /// Builds the shared state.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        key: TokenKey,
        libvirt: Arc<Libvirt>,
        audit: Arc<Audit>,
        admin_key: Option<Zeroizing<String>>,
        close_sessions: watch::Receiver<bool>,
        spice_key: session::spice::LinkKey,
        metrics: Arc<Metrics>,
    ) -> App {
        let l = &config.limits;
        let browser_limits = vizor_rfb::Limits {
            max_message_len: l.browser_message_max,
        };
        let vm_limits = vizor_rfb::Limits {
            max_message_len: l.vm_message_max,
        };
        let slots = Slots::new(
            l.max_sessions,
            l.max_sessions_per_domain,
            l.max_sessions_per_user,
        );
        let connections = Connections::new(l.max_connections, l.max_connections_per_client);
        let refusals = crate::refusals::Refusals::new(
            config.audit.refusal_summary_interval,
            FAILED_TOKEN_CLIENTS,
            std::time::Instant::now(),
        );
        let failed_tokens = FailedTokens::new(
            l.failed_tokens_per_client,
            l.failed_tokens_window,
            FAILED_TOKEN_CLIENTS,
        );
        App {
            config,
            key,
            replay: Mutex::new(ReplayCache::new(1_000_000)),
            libvirt,
            audit,
            admin_key,
            metrics_key: None,
            browser_limits,
            vm_limits,
            slots,
            connections,
            failed_tokens,
            refusals,
            upstream_tls: None,
            close_sessions,
            sessions: SessionCount::default(),
            spice_key: Arc::new(spice_key),
            spice_sessions: Arc::default(),
            metrics,
            live: Arc::default(),
            vm_keyboards: Default::default(),
            readiness: Arc::default(),
            next_session: AtomicU64::new(1),
        }
    }

    /// How sessions connect to consoles.
    fn dial(&self) -> session::Dial {
        session::Dial {
            timeout: self.config.server.connect_timeout,
            stall: self.config.limits.vm_stall_timeout,
        }
    }
}

/// How many clients with recent failed token attempts are remembered at once.
const FAILED_TOKEN_CLIENTS: usize = 100_000;

type Resp = Response<Full<Bytes>>;

fn text(status: StatusCode, body: &str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, value: &serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

/// The first value of query parameter `name`, percent-decoded.
fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    form_urlencoded::parse(req.uri().query()?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Routes one request; every response carries the security headers.
pub async fn handle(
    app: Arc<App>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Resp, std::convert::Infallible> {
    let Ok(mut r) = route(app, peer, req).await;
    secure(&mut r);
    Ok(r)
}

/// The headers every response carries, unless it set its own (the console page has a
/// stricter Content-Security-Policy): no MIME sniffing, no framing by any page (noVNC's
/// own vnc.html takes its settings from its URL and must not be steered from a frame),
/// no referrer (a console URL holds a token), no plugins, no `<base>`.
pub fn secure(r: &mut Resp) {
    let h = r.headers_mut();
    // A response whose own policy says who may frame it (the console page, under
    // `[console] frame_ancestors`) gets no X-Frame-Options contradicting it.
    let framing_decided = h
        .get(header::CONTENT_SECURITY_POLICY)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|csp| csp.contains("frame-ancestors "));
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (
            header::CONTENT_SECURITY_POLICY,
            "frame-ancestors 'none'; base-uri 'none'; object-src 'none'",
        ),
    ] {
        if name == header::X_FRAME_OPTIONS && framing_decided {
            continue;
        }
        if !h.contains_key(&name) {
            h.insert(name, header::HeaderValue::from_static(value));
        }
    }
}

/// Routes one request.
async fn route(
    app: Arc<App>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Resp, std::convert::Infallible> {
    // Behind a trusted reverse proxy, the client its headers name (from here on the
    // client for limits, token binding, logs and audit); the port is the proxy's.
    let trusted = &app.config.server.trusted_proxies;
    let peer = if trusted.is_empty() {
        peer
    } else {
        let values = |name: &str| -> Vec<&str> {
            req.headers()
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect()
        };
        let client = crate::forwarded::client(
            peer.ip(),
            trusted,
            &values("forwarded"),
            &values("x-forwarded-for"),
        );
        SocketAddr::new(client, peer.port())
    };
    let path = req.uri().path().to_owned();
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n"));
    }
    if path == "/healthz" {
        return Ok(text(StatusCode::OK, "ok\n"));
    }
    if path == "/readyz" {
        return Ok(app.readiness.response(false));
    }
    if path == "/metrics" {
        return Ok(metrics_here(&app, peer, &req));
    }
    if path == "/websockify" {
        if !fastwebsockets::upgrade::is_upgrade_request(&req) {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                "this endpoint needs a WebSocket upgrade\n",
            ));
        }
        // A client refused unheard is not even asked for its origin.
        if let Some(refused) = throttled(&app, peer) {
            return Ok(refused);
        }
        if let Err(origin) = origin_allowed(&app.config.server.allowed_origins, &req) {
            app.metrics
                .auth_refusals_total
                .with_label_values(&["origin", "origin_not_allowed"])
                .inc();
            refusal(&app, peer, "origin_not_allowed", || {
                warn!(client = %peer, origin = %origin, "WebSocket upgrade refused: origin not allowed (more from this client this interval are counted, not logged)");
                app.audit.record_refusal(&Event::OriginRefused {
                    client: &peer.to_string(),
                    origin: &origin,
                })
            });
            // Not counted against the client's allowance: the token is never read,
            // so nothing is guessed, and any page a user visits could otherwise open
            // twenty such upgrades and lock that user out.
            return Ok(text(
                StatusCode::FORBIDDEN,
                "this page's origin may not open consoles here\n",
            ));
        }
        return Ok(websocket(app, peer, &mut req));
    }
    if path == "/console" {
        if let Some(refused) = throttled(&app, peer) {
            return Ok(refused);
        }
        let mut page = console_page(&app, peer, &req);
        console::allow_framing(&mut page, &app.config.console.frame_ancestors);
        return Ok(page);
    }
    if let Some(r) = console::asset(&path) {
        return Ok(r);
    }
    if let Some((dir, rest)) = console::client_dir(&app.config.console, &path) {
        return Ok(static_file(dir, rest).await);
    }
    if path == "/api/v1/sessions" {
        return Ok(api(&app, peer, &req, Endpoint::Sessions).await);
    }
    if let Some(rest) = path.strip_prefix("/api/v1/domains/") {
        if let Some(domain) = rest.strip_suffix("/console") {
            return Ok(api(&app, peer, &req, Endpoint::Console(domain)).await);
        }
    }
    match &app.config.server.web_root {
        Some(root) => Ok(static_file(root, &path).await),
        None => Ok(text(StatusCode::NOT_FOUND, "not found\n")),
    }
}

/// `/metrics` on the main listener: only for the metrics or admin bearer key. The
/// series name users and domains, and the key counter moves with every keystroke.
fn metrics_here(app: &App, peer: SocketAddr, req: &Request<Incoming>) -> Resp {
    let count = |code: StatusCode| {
        app.metrics
            .api_requests_total
            .with_label_values(&["metrics", code.as_str()])
            .inc();
    };
    let keys: Vec<&str> = [&app.metrics_key, &app.admin_key]
        .into_iter()
        .flatten()
        .map(|k| k.as_str())
        .collect();
    if keys.is_empty() {
        count(StatusCode::NOT_FOUND);
        return text(
            StatusCode::NOT_FOUND,
            "metrics are not served here: read them on [server] metrics_listen, or set [metrics] key_file and send it as Authorization: Bearer\n",
        );
    }
    if let Some(refused) = throttled(app, peer) {
        count(StatusCode::TOO_MANY_REQUESTS);
        return refused;
    }
    // Every key is compared, so the time taken does not say which one matched.
    let matched = keys
        .iter()
        .fold(false, |any, k| bearer_matches(req, k) | any);
    if !matched {
        let e = ApiError::bad_key("a valid Authorization: Bearer <metrics key> header is required");
        api_refused(app, peer, "metrics", None, &e);
        return text(e.status, &format!("{}\n", e.error));
    }
    count(StatusCode::OK);
    metrics_response(&app.metrics)
}

/// The Prometheus text exposition.
pub fn metrics_response(metrics: &Metrics) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(metrics.render())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// Looks up a console, timing the call and counting failures.
async fn lookup(app: &App, domain: DomainRef, kind: ConsoleKind) -> Result<Console, LookupError> {
    let started = std::time::Instant::now();
    let r = app.libvirt.lookup(domain, kind).await;
    app.metrics
        .libvirt_lookup_seconds
        .observe(started.elapsed().as_secs_f64());
    let r = r.and_then(|c| unprotected(app, c));
    if let Err(e) = &r {
        app.metrics
            .libvirt_errors_total
            .with_label_values(&[e.reason()])
            .inc();
    }
    r
}

/// A console without a password in libvirt opens for anyone who reaches its port:
/// refused under `[libvirt] require_password`, and said loudly otherwise.
fn unprotected(app: &App, console: Console) -> Result<Console, LookupError> {
    if console.password.is_some() {
        return Ok(console);
    }
    if app.config.libvirt.require_password {
        return Err(LookupError::NoPassword {
            domain: console.domain,
            kind: console.kind,
        });
    }
    warn!(domain = %console.domain, kind = %console.kind,
        "the VM console has no password in libvirt: anyone who reaches its port opens it, past vizor and its audit log; set passwd on the domain's graphics, or [libvirt] require_password = true to refuse it");
    Ok(console)
}

/// Logs how a session ended: at warn, with what to do, when QEMU refused the password
/// libvirt stores (the one line that says so).
fn log_end(end: &End) {
    if end.upstream_failure() == Some(session::VmFailure::Auth) {
        warn!(reason = %end, label = end.label(),
            "session ended: QEMU refused vizor's authentication. If the console's password was changed outside libvirt (QEMU's monitor: set_password, change vnc password), libvirt still holds the old one: set it through libvirt (virsh update-device) or restart the domain");
    } else {
        info!(reason = %end, label = end.label(), ended_by = end.side().as_str(), "session ended");
    }
}

/// Counts how a session (a SPICE channel) ended, and audits a protocol error or a
/// failure toward the VM.
fn record_end(app: &App, kind: ConsoleKind, session: u64, domain: &str, end: &End) {
    if let Some((direction, reason)) = end.protocol() {
        app.audit.record_nowait(&Event::ProtocolError {
            session,
            direction: direction.as_str(),
            reason,
            detail: &end.reason(),
        });
    } else if let Some(failure) = end.upstream_failure() {
        app.audit.record_nowait(&Event::UpstreamFailure {
            session,
            domain,
            reason: failure.label(),
            detail: &end.reason(),
        });
    } else if matches!(end, End::Internal(_)) {
        app.audit.record_nowait(&Event::UpstreamFailure {
            session,
            domain,
            reason: end.label(),
            detail: &end.reason(),
        });
    }
    let m = &app.metrics;
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
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts a session as live while it is held.
struct Active<'a>(&'a Metrics, ConsoleKind);

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
fn origin_allowed(allowed: &[String], req: &Request<Incoming>) -> Result<(), String> {
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

fn websocket(app: Arc<App>, peer: SocketAddr, req: &mut Request<Incoming>) -> Resp {
    let token = query_param(req, "token");
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
        match upgrade.await {
            Ok(ws) => console(app, peer, token, ws).await,
            Err(e) => warn!(client = %peer, error = %e, "WebSocket upgrade failed"),
        }
    });
    resp
}

/// `GET /console?token=`: the console page for a good token, or a page saying in words
/// why there is none. The token is checked but not spent: the page's WebSocket spends it.
fn console_page(app: &App, peer: SocketAddr, req: &Request<Incoming>) -> Resp {
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
    console::client_page(&app.config.console, claims.kind, &claims.domain)
}

fn console_refused(app: &App, peer: SocketAddr, e: &TokenError, token_id: Option<&str>) -> Resp {
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

/// Counts and audits a refused token, wherever it was presented (`what`: the console
/// page, a console, a SPICE channel), and counts it against the client's allowance of
/// failures. It is logged with its record: a flood is summed up, not logged per line.
fn token_refused(
    app: &App,
    peer: SocketAddr,
    reason: &'static str,
    token_id: Option<&str>,
    what: &'static str,
    detail: &str,
) {
    app.metrics
        .auth_refusals_total
        .with_label_values(&["token", reason])
        .inc();
    let record = || {
        warn!(client = %peer, reason, detail, token = token_id.unwrap_or("-"),
            "{what} refused (more of this client and reason this interval are counted, not logged)");
        app.audit.record_refusal(&Event::TokenRefused {
            client: &peer.to_string(),
            reason,
            token_id,
        })
    };
    // A token that opened (replayed, for another client, a SPICE channel of another
    // session) is a real token: each gets its record, so an earlier refusal of the
    // same kind cannot hide which token was tried. Only its holder can send it, so
    // these cannot flood.
    if token_id.is_some() {
        refusal(app, peer, reason, || true);
        if !record() {
            app.refusals.not_recorded(peer.ip());
        }
    } else {
        refusal(app, peer, reason, record);
    }
    failed_attempt(app, peer);
}

/// Counts one refusal of an unauthenticated client: `detail` records it (and logs it)
/// only when it is the client's first for `reason` in the interval, and returns
/// whether its record was queued. An interval that ended is summed up first.
fn refusal(app: &App, peer: SocketAddr, reason: &'static str, detail: impl FnOnce() -> bool) {
    use crate::refusals::Verdict;
    let (verdict, ended) = app
        .refusals
        .refused(peer.ip(), reason, std::time::Instant::now());
    record_summaries(app, ended);
    if verdict == Verdict::Detail && !detail() {
        app.refusals.not_recorded(peer.ip());
    }
}

/// Records the summaries of an interval's refusals (from `refusal`, or the timer
/// that ends intervals when refusals stop).
pub fn record_summaries(app: &App, summaries: Vec<crate::refusals::Summary>) {
    let interval_s = app.config.audit.refusal_summary_interval.as_secs();
    for s in summaries {
        warn!(client = %s.client, refused = s.refused, interval_s, "refusals of one client summed up");
        app.audit.record_refusal(&Event::RefusalSummary {
            client: &s.client,
            interval_s,
            refused: s.refused,
            reasons: s.reasons.iter().copied().collect(),
            not_recorded: s.not_recorded,
        });
    }
}

/// Counts a failed attempt (a bad token, a foreign origin) against the client's
/// allowance; the one that fills it is logged and recorded.
fn failed_attempt(app: &App, peer: SocketAddr) {
    let now = std::time::Instant::now();
    if app.failed_tokens.failed(peer.ip(), now) {
        let retry = app
            .failed_tokens
            .check(peer.ip(), now)
            .err()
            .unwrap_or_default();
        let client = crate::limits::ClientKey::of(peer.ip()).to_string();
        warn!(client = %client, retry_after = %humantime::format_duration(retry),
            "too many failed token attempts: the client is refused unheard for a while");
        app.audit.record_nowait(&Event::ClientThrottled {
            client: &client,
            failures: app.config.limits.failed_tokens_per_client,
            retry_after_s: retry.as_secs(),
        });
    }
}

/// SPICE codec bounds with `[limits]`' largest whole message. Clipboard transfers are
/// followed across chunks, not held, and keep the codec's own bound.
fn spice_limits(max_message_len: usize) -> vizor_spice::Limits {
    vizor_spice::Limits {
        max_message_len,
        ..vizor_spice::Limits::default()
    }
}

/// Logs and audits a session refused by a `[limits]` bound: the end to close it with.
fn session_refused(
    app: &App,
    id: u64,
    peer: SocketAddr,
    claims: &Claims,
    domain: &str,
    full: limits::Full,
) -> End {
    warn!(client = %peer, user = %claims.user, domain, reason = full.label(), "session refused: limit reached");
    app.audit.record_nowait(&Event::SessionRefused {
        session: id,
        client: &peer.to_string(),
        user: &claims.user,
        domain,
        token_id: &claims.token_id(),
        reason: full.label(),
    });
    End::limit(full)
}

/// A `429 Too Many Requests` for a client that failed too many tokens lately; its
/// token is not even read.
fn throttled(app: &App, peer: SocketAddr) -> Option<Resp> {
    let wait = app
        .failed_tokens
        .check(peer.ip(), std::time::Instant::now())
        .err()?;
    app.metrics
        .auth_refusals_total
        .with_label_values(&["token", "throttled"])
        .inc();
    // Recorded once when the allowance ran out (client_throttled); counted here.
    refusal(app, peer, "throttled", || true);
    debug!(client = %peer, "refused unheard: too many failed token attempts");
    let mut r = text(
        StatusCode::TOO_MANY_REQUESTS,
        "too many failed console links from this address; try again later\n",
    );
    r.headers_mut().insert(
        header::RETRY_AFTER,
        header::HeaderValue::from(wait.as_secs().max(1)),
    );
    Some(r)
}

/// What the browser is told when its token is refused: enough to act on, no more.
fn token_message(e: &TokenError) -> &'static str {
    match e {
        TokenError::Expired { .. } => "token expired",
        TokenError::Replayed => "token already used",
        TokenError::ReplayCacheFull => "too many sessions starting; try again",
        TokenError::WrongClient { .. } => "token issued for another address",
        _ => "invalid token",
    }
}

/// How long a closed console waits for the browser's close frame before its
/// connection is dropped.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

async fn console(
    app: Arc<App>,
    peer: SocketAddr,
    token: Option<String>,
    ws: fastwebsockets::WebSocket<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
) {
    let (mut brx, btx) = session::browser::split(
        ws,
        app.browser_limits.max_message_len + 64,
        app.config.limits.send_timeout,
    );
    // Whatever ended it, vizor's close frame is out: the browser's answer is awaited
    // before the connection closes (a session still counts as live meanwhile, so a
    // shutdown waits for it too).
    let guard = console_session(app, peer, token, &mut brx, btx).await;
    brx.linger(CLOSE_LINGER).await;
    drop(guard);
}

/// One console connection, from its token to its close frame; holds the session's
/// place among the live ones, if it became one.
async fn console_session(
    app: Arc<App>,
    peer: SocketAddr,
    token: Option<String>,
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
    let claims: Claims = match app.key.open(&token, now) {
        Ok(c) => c,
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
    // The token is good: measure this browser's round trip while it is connected.
    let pings = brx.pings();
    pings.measure_into(
        app.metrics
            .client_rtt_seconds
            .with_label_values(&[claims.kind.as_str()]),
    );
    let pinger = AbortOnDrop(btx.start_pinging(pings, app.config.server.ping_interval));
    if claims.kind == ConsoleKind::Spice {
        let guard = spice_console(app, peer, claims, brx, btx).await;
        drop(pinger);
        return Some(guard);
    }
    let admitted = app
        .replay
        .lock()
        .map_err(|_| TokenError::ReplayCacheFull)
        .and_then(|mut r| r.admit(&claims, now));
    if let Err(e) = admitted {
        return refuse_token(e).await;
    }
    let id = app.next_session.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("session", id, domain = %claims.domain, kind = %claims.kind, client = %peer, token = %token_id);
    let guard = app.sessions.enter();
    let kind = claims.kind;
    let domain = claims.domain.clone();
    let end = async {
        // Spent: on record before anything of the session goes on.
        if let Err(e) = app.audit.token_used(&claims, peer).await {
            let end = session::audit_failed(e);
            btx.close(end.close_code(), &end.told()).await;
            return end;
        }
        let console = match lookup(&app, DomainRef::Uuid(claims.uuid), claims.kind).await {
            Ok(c) => c,
            Err(e) => {
                warn!(reason = e.reason(), error = %e, "console lookup failed");
                let end = End::lookup(&e);
                btx.close(end.close_code(), &end.told()).await;
                return end;
            }
        };
        let _slot = match app.slots.acquire(&console.domain, &claims.user) {
            Ok(slot) => slot,
            Err(full) => {
                let end = session_refused(&app, id, peer, &claims, &console.domain, full);
                btx.close(end.close_code(), &end.told()).await;
                return end;
            }
        };
        let _active = Active::new(&app.metrics, kind);
        info!(upstream = %console.target, user = %claims.user, "session starting");
        let keyboard = app.vm_keyboards.of(&console);
        let ctx = session::rfb::Ctx {
            id,
            claims,
            client: peer,
            console,
            audit: app.audit.clone(),
            browser_limits: app.browser_limits,
            vm_limits: app.vm_limits,
            idle_timeout: app.config.limits.idle_timeout,
            upstream_tls: app.upstream_tls.clone(),
            handshake_timeout: app.config.server.handshake_timeout,
            dial: app.dial(),
            metrics: app.metrics.clone(),
            live: app.live.clone(),
            record_dir: app.config.audit.record_dir.clone(),
            keyboard,
            require_password: app.config.libvirt.require_password,
        };
        let end = session::rfb::run(ctx, brx, btx, app.close_sessions.clone()).await;
        log_end(&end);
        end
    }
    .instrument(span)
    .await;
    record_end(&app, kind, id, &domain, &end);
    Some(guard)
}

/// A SPICE channel: admission needs the browser's link message (which channel, which
/// session), so the single-use check happens inside the SPICE session.
async fn spice_console(
    app: Arc<App>,
    peer: SocketAddr,
    claims: Claims,
    brx: &mut session::browser::BrowserRx,
    btx: session::browser::BrowserTx,
) -> SessionGuard {
    // A secondary channel takes its main channel's session id, known after its link.
    let id = app.next_session.fetch_add(1, Ordering::Relaxed);
    let token_id = claims.token_id();
    let span = tracing::info_span!("session", domain = %claims.domain, kind = %claims.kind, client = %peer, token = %token_id);
    let guard = app.sessions.enter();
    let admit_app = app.clone();
    // A main channel (a new session) spends the token and takes a session slot; the
    // session's other channels ride on both.
    let admit = move |c: &Claims, domain: &str| -> Result<Slot, End> {
        let now = unix_now();
        let r = admit_app
            .replay
            .lock()
            .map_err(|_| TokenError::ReplayCacheFull)
            .and_then(|mut r| r.admit(c, now));
        if let Err(e) = r {
            token_refused(
                &admit_app,
                peer,
                e.reason(),
                Some(&c.token_id()),
                "SPICE main channel",
                &e.to_string(),
            );
            return Err(End::refused(
                session::Refusal::TokenSpent,
                token_message(&e),
            ));
        }
        admit_app
            .slots
            .acquire(domain, &c.user)
            .map_err(|full| session_refused(&admit_app, id, peer, c, domain, full))
    };
    let ctx = session::spice::Ctx {
        id,
        claims,
        client: peer,
        audit: app.audit.clone(),
        key: app.spice_key.clone(),
        sessions: app.spice_sessions.clone(),
        handshake_timeout: app.config.server.handshake_timeout,
        dial: app.dial(),
        metrics: app.metrics.clone(),
        live: app.live.clone(),
        browser_limits: spice_limits(app.browser_limits.max_message_len),
        vm_limits: spice_limits(app.vm_limits.max_message_len),
        idle_timeout: app.config.limits.idle_timeout,
        upstream_tls: app.upstream_tls.clone(),
        spice: Arc::new(app.config.spice.clone()),
    };
    // An unspent token is for a session's first main channel: its console is looked up
    // at once (a SPICE token for a domain without SPICE is refused before anything is
    // linked, and a refused lookup leaves the token unspent). A spent one can only join
    // its session's channels, which link to that session's console: no lookup.
    let spent = app
        .replay
        .lock()
        .map(|r| r.is_used(&ctx.claims, unix_now()))
        .unwrap_or(true);
    let console = if spent {
        None
    } else {
        match lookup(&app, DomainRef::Uuid(ctx.claims.uuid), ctx.claims.kind).await {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(client = %peer, reason = e.reason(), error = %e, "console lookup failed");
                let end = End::lookup(&e);
                btx.close(end.close_code(), &end.told()).await;
                record_end(&app, ConsoleKind::Spice, id, &ctx.claims.domain, &end);
                return guard;
            }
        }
    };
    let refused_app = app.clone();
    let refused = move |why: session::spice::ChannelRefusal| {
        token_refused(
            &refused_app,
            peer,
            why.label(),
            Some(&token_id),
            "SPICE channel",
            why.label(),
        );
    };
    let (end, session, domain) = async {
        let _active = Active::new(&app.metrics, ConsoleKind::Spice);
        let (end, session, domain) = session::spice::run(
            ctx,
            console,
            brx,
            btx,
            admit,
            refused,
            app.close_sessions.clone(),
        )
        .await;
        log_end(&end);
        (end, session, domain)
    }
    .instrument(span)
    .await;
    record_end(&app, ConsoleKind::Spice, session, &domain, &end);
    guard
}

fn bearer_matches(req: &Request<Incoming>, key: &str) -> bool {
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    // Constant time in the key's content; lengths differing is not a secret.
    given.len() == key.len() && bool::from(given.as_bytes().ct_eq(key.as_bytes()))
}

/// A management API endpoint.
#[derive(Clone, Copy)]
enum Endpoint<'a> {
    /// `GET /api/v1/sessions`.
    Sessions,
    /// `GET /api/v1/domains/{name-or-uuid}/console`.
    Console(&'a str),
}

/// Why an API request was not answered with what it asked for.
struct ApiError {
    status: StatusCode,
    /// A stable label: the answer's `reason`, the audit record's and the metrics'.
    reason: &'static str,
    error: String,
}

impl ApiError {
    fn new(status: StatusCode, reason: &'static str, error: impl Into<String>) -> Self {
        ApiError {
            status,
            reason,
            error: error.into(),
        }
    }

    fn bad_key(error: &str) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "bad_key", error)
    }

    /// Whether the request was not authenticated (the key was missing or wrong, or
    /// there is no API): refused like a bad token, per client and interval.
    fn unauthenticated(&self) -> bool {
        matches!(self.reason, "bad_key" | "api_disabled")
    }
}

/// Counts, logs and audits a refused API (or `/metrics`) request. Unauthenticated
/// ones are handled as refused tokens are: recorded once per client, reason and
/// interval and summed up after, counted against the client's failed-attempt
/// allowance (a wrong key); an admin's failed requests are each recorded.
fn api_refused(
    app: &App,
    peer: SocketAddr,
    endpoint: &'static str,
    domain: Option<&str>,
    e: &ApiError,
) {
    app.metrics
        .api_requests_total
        .with_label_values(&[endpoint, e.status.as_str()])
        .inc();
    let domain = domain.map(|d| {
        let mut end = d.len().min(200);
        while !d.is_char_boundary(end) {
            end -= 1;
        }
        &d[..end]
    });
    let event = Event::ApiRefused {
        client: &peer.to_string(),
        endpoint,
        status: e.status.as_u16(),
        reason: e.reason,
        domain,
    };
    if e.unauthenticated() {
        app.metrics
            .auth_refusals_total
            .with_label_values(&["api", e.reason])
            .inc();
        refusal(app, peer, e.reason, || {
            warn!(client = %peer, endpoint, status = e.status.as_u16(), reason = e.reason,
                "API request refused (more of this client and reason this interval are counted, not logged)");
            app.audit.record_refusal(&event)
        });
        if e.reason == "bad_key" {
            failed_attempt(app, peer);
        }
    } else {
        warn!(client = %peer, endpoint, status = e.status.as_u16(), reason = e.reason, domain, error = %e.error, "API request failed");
        app.audit.record_nowait(&event);
    }
}

/// Serves a management API request: the client's allowance, then the admin key, then
/// the endpoint; every answer counted, every refusal audited.
async fn api(app: &App, peer: SocketAddr, req: &Request<Incoming>, endpoint: Endpoint<'_>) -> Resp {
    let (name, domain) = match endpoint {
        Endpoint::Sessions => ("sessions", None),
        Endpoint::Console(d) => ("console", Some(d)),
    };
    if let Some(refused) = throttled(app, peer) {
        app.metrics
            .api_requests_total
            .with_label_values(&[name, StatusCode::TOO_MANY_REQUESTS.as_str()])
            .inc();
        return refused;
    }
    let answer = match admin_check(app, req) {
        Err(e) => Err(e),
        Ok(()) => match endpoint {
            Endpoint::Sessions => Ok(api_sessions(app)),
            Endpoint::Console(domain) => api_console(app, peer, domain, req).await,
        },
    };
    match answer {
        Ok(resp) => {
            app.metrics
                .api_requests_total
                .with_label_values(&[name, resp.status().as_str()])
                .inc();
            resp
        }
        Err(e) => {
            api_refused(app, peer, name, domain, &e);
            json(
                e.status,
                &serde_json::json!({"error": e.error, "reason": e.reason}),
            )
        }
    }
}

/// Checks the admin bearer key.
fn admin_check(app: &App, req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(key) = &app.admin_key else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "api_disabled",
            "the management API is disabled (no [api] admin_key_file)",
        ));
    };
    if !bearer_matches(req, key) {
        return Err(ApiError::bad_key(
            "a valid Authorization: Bearer <admin key> header is required",
        ));
    }
    Ok(())
}

/// `GET /api/v1/sessions`: the live sessions, oldest first.
fn api_sessions(app: &App) -> Resp {
    let ms = |q: Option<crate::live::Quantiles>| match q {
        Some(q) => serde_json::json!({
            "p50": q.p50 * 1000.0,
            "p99": q.p99 * 1000.0,
            "samples": q.samples,
        }),
        None => serde_json::Value::Null,
    };
    let sessions: Vec<serde_json::Value> = app
        .live
        .list()
        .iter()
        .map(|l| {
            let s = l.snapshot();
            fn each<T: serde::Serialize + Copy>(v: [T; 2]) -> serde_json::Value {
                serde_json::json!({
                    Direction::BrowserToVm.as_str(): v[Direction::BrowserToVm as usize],
                    Direction::VmToBrowser.as_str(): v[Direction::VmToBrowser as usize],
                })
            }
            serde_json::json!({
                "id": l.id,
                "user": l.user,
                "domain": l.domain,
                "kind": l.kind.as_str(),
                "client": l.client.to_string(),
                "token_id": l.token_id,
                "started_at": humantime::format_rfc3339_seconds(l.started).to_string(),
                "channels": s.channels,
                "bytes": each(s.bytes),
                "bytes_per_second": each(s.rate),
                "frame_latency_ms": ms(s.latency[Latency::Frame as usize]),
                "input_to_display_ms": ms(s.latency[Latency::InputToDisplay as usize]),
                "client_rtt_ms": ms(s.latency[Latency::ClientRtt as usize]),
            })
        })
        .collect();
    json(StatusCode::OK, &serde_json::json!({"sessions": sessions}))
}

/// `GET /api/v1/domains/{name-or-uuid}/console`: a token for the domain's console,
/// on record before it is answered.
async fn api_console(
    app: &App,
    peer: SocketAddr,
    domain: &str,
    req: &Request<Incoming>,
) -> Result<Resp, ApiError> {
    let bad = |error: &str| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", error);
    // Without `?kind=`: VNC, or the only kind of console the domain has.
    let asked = query_param(req, "kind")
        .map(|k| k.parse::<ConsoleKind>())
        .transpose()
        .map_err(|e| bad(&e))?;
    if domain.is_empty() || domain.contains('/') {
        return Err(bad("a domain name or UUID is required"));
    }
    // The management plane says whose session it is: audited, and counted by
    // `[limits] max_sessions_per_user`.
    let user = match query_param(req, "user") {
        None => "api".to_owned(),
        Some(u)
            if !u.is_empty()
                && u.len() <= crate::token::MAX_USER_LEN
                && !u.chars().any(char::is_control) =>
        {
            u
        }
        Some(_) => return Err(bad("user must be 1 to 256 bytes, no control characters")),
    };
    // `?client=`: the token admits the browser at this address alone.
    let client = match query_param(req, "client").map(|c| c.parse::<std::net::IpAddr>()) {
        None => None,
        Some(Ok(ip)) => Some(ip),
        Some(Err(_)) => return Err(bad("client must be an IPv4 or IPv6 address")),
    };
    let named = DomainRef::NameOrUuid(domain.to_owned());
    let console = match lookup(app, named.clone(), asked.unwrap_or(ConsoleKind::Vnc)).await {
        Err(LookupError::NoGraphics { has, .. }) if asked.is_none() && has.len() == 1 => {
            lookup(app, named, has[0]).await
        }
        r => r,
    }
    .map_err(api_lookup_failed)?;
    let kind = console.kind;
    let Some(uuid) = crate::token::parse_uuid(&console.uuid) else {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "bad_uuid",
            format!(
                "libvirt gave domain {:?} the UUID {:?}",
                console.domain, console.uuid
            ),
        ));
    };
    let ttl = app.config.tokens.ttl;
    let expires_at = unix_now() + ttl.as_secs();
    let expires = UNIX_EPOCH + Duration::from_secs(expires_at);
    // The token opens this domain, by UUID: another domain defined later under the same
    // name is not it.
    let domain = console.domain.as_str();
    let internal = |e: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e);
    let claims = Claims::new(domain, uuid, kind, &user, expires_at)
        .map(|c| match client {
            Some(ip) => c.bound_to(ip),
            None => c,
        })
        .map_err(|e| internal(e.to_string()))?;
    let token = app.key.seal(&claims).map_err(|e| internal(e.to_string()))?;
    let token_id = claims.token_id();
    // On record before anyone holds it.
    app.audit
        .record(&Event::TokenIssued {
            token_id: &token_id,
            by: "api",
            requester: &peer.to_string(),
            user: &user,
            domain,
            uuid: &console.uuid,
            kind,
            ttl_s: ttl.as_secs(),
            expires_at: humantime::format_rfc3339_seconds(expires).to_string(),
            bound_client: client.map(|c| c.to_string()),
        })
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_error",
                format!("the audit log cannot be written, so no token is issued: {e}"),
            )
        })?;
    info!(domain, %kind, token = %token_id, user, client = ?client, requester = %peer, "token issued by the API");
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "kind": kind.as_str(),
            "token": token,
            "ws_path": format!("/websockify?token={token}"),
            "console_url": format!("/console?token={token}"),
            "expires_at": humantime::format_rfc3339_seconds(expires).to_string(),
        }),
    ))
}

/// The API's answer to a failed lookup.
fn api_lookup_failed(e: LookupError) -> ApiError {
    let status = match e {
        LookupError::NoSuchDomain(_) => StatusCode::NOT_FOUND,
        LookupError::Unreachable { .. } | LookupError::BadXml { .. } => StatusCode::BAD_GATEWAY,
        _ => StatusCode::CONFLICT,
    };
    ApiError::new(status, e.reason(), e.to_string())
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "png" => "image/png",
        "svg" => "image/svg+xml",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "ogg" | "oga" => "audio/ogg",
        "mp3" => "audio/mpeg",
        _ => "application/octet-stream",
    }
}

/// Serves a file under `root`, refusing anything that would leave it.
pub(crate) async fn static_file(root: &Path, url_path: &str) -> Resp {
    let mut rel = PathBuf::new();
    for part in url_path.split('/').filter(|p| !p.is_empty()) {
        let c = Path::new(part).components().next();
        // Paths are not percent-decoded, so "%2e%2e" names a file and cannot climb.
        if part.contains('\\') || part.contains('\0') || !matches!(c, Some(Component::Normal(_))) {
            return text(StatusCode::BAD_REQUEST, "bad path\n");
        }
        // No dotfile or dot-directory (.git, .env, .htpasswd) is served.
        if part.starts_with('.') {
            return text(StatusCode::NOT_FOUND, "not found\n");
        }
        rel.push(part);
    }
    let mut path = root.join(&rel);
    if url_path.ends_with('/') || rel.as_os_str().is_empty() {
        path.push("index.html");
    }
    let (Ok(real), Ok(real_root)) = (
        tokio::fs::canonicalize(&path).await,
        tokio::fs::canonicalize(root).await,
    ) else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    // Nor through a symlink: what it resolves to must hold no dot component either.
    let hidden = real.strip_prefix(&real_root).map_or(true, |rel| {
        rel.components()
            .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
    });
    if hidden {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    match tokio::fs::read(&real).await {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(content_type(&real)),
            );
            r
        }
        Err(_) => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// How long a shutdown waits for sessions to write their end records after they are
/// told to close.
pub const CLOSE_WAIT: Duration = Duration::from_secs(3);
