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
use crate::libvirt::hosts::Hosts;
use crate::libvirt::{Console, DomainRef, LookupError};
use crate::limits::{Connections, FailedTokens, Slots};
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

mod admission;
mod api;
mod events;
mod files;
mod oversight;
mod paste;
mod refused;
mod resume;
mod upgrade;

use admission::*;
pub(crate) use api::listed;
use api::*;
use events::*;
pub use events::{Body, Streamed, MAX_STREAMS};
pub(crate) use files::static_file;
pub(crate) use oversight::end_asked;
use oversight::*;
pub use oversight::{check_reason, MAX_REASON_LEN};
use paste::*;
pub use refused::record_summaries;
use refused::*;
use upgrade::*;

/// Everything the front shares between connections.
pub struct App {
    /// The configuration.
    pub config: Config,
    /// Seals and opens tokens.
    pub key: TokenKey,
    /// Tokens already used on this replica.
    pub replay: Mutex<ReplayCache>,
    /// What replicas share (`[state]`), if they do.
    pub shared: Option<Arc<crate::state::Shared>>,
    /// The libvirt hosts.
    pub hosts: Arc<Hosts>,
    /// What every session shares: audit, metrics, limits, keys.
    pub env: Arc<session::Env>,
    /// The management API's administrators, by key, if the API is enabled (read again
    /// on SIGHUP).
    pub admins: std::sync::RwLock<Option<Arc<crate::admins::Admins>>>,
    /// The `[metrics] key_file` bearer key, which reads `/metrics` here.
    pub metrics_key: Option<Zeroizing<String>>,
    /// HTTP connections not (yet) sessions (`[limits] max_connections*`).
    pub connections: Arc<Connections>,
    /// Failed token attempts per client.
    pub failed_tokens: FailedTokens,
    /// Refusals of unauthenticated clients, aggregated per client and interval.
    pub refusals: crate::refusals::Refusals,
    /// Set to true to close every live session (after the shutdown grace).
    pub close_sessions: watch::Receiver<bool>,
    /// Live sessions.
    pub sessions: SessionCount,
    /// `GET /readyz`.
    pub readiness: Arc<Readiness>,
    /// Event streams open now (`GET /api/v1/sessions/{id}/events`).
    pub event_streams: AtomicUsize,
    /// Console pages' presence streams open now (`GET /console/events`).
    pub presence_streams: AtomicUsize,
    /// The same, per token id.
    pub presence_per_token: Mutex<std::collections::HashMap<String, usize>>,
    next_session: AtomicU64,
}

/// A connection's place among the counted ones (`[limits] max_connections*`), shared
/// by its requests: held until the connection ends or is upgraded, or given back by a
/// long-lived stream that has limits of its own.
#[derive(Clone)]
pub struct Counted(Arc<Mutex<Option<crate::limits::Connection>>>);

impl Counted {
    /// Shares `c` among a connection's requests.
    pub fn new(c: crate::limits::Connection) -> Counted {
        Counted(Arc::new(Mutex::new(Some(c))))
    }

    /// Gives the place back now.
    pub fn release(&self) {
        if let Ok(mut c) = self.0.lock() {
            c.take();
        }
    }
}

/// Whether vizor is ready for consoles (`GET /readyz`): while at least one libvirt
/// host answers.
#[derive(Debug, Default)]
pub struct Readiness {
    ready: std::sync::atomic::AtomicBool,
    waiting: Mutex<String>,
    /// Each host, up or down and why, when there are several.
    hosts: Mutex<Vec<(String, bool, String)>>,
}

impl Readiness {
    /// Ready or not as `hosts` answer now.
    pub fn update(&self, hosts: &Hosts) {
        let all = hosts.all();
        if let Ok(mut h) = self.hosts.lock() {
            *h = if all.len() > 1 {
                all.iter()
                    .map(|h| (h.name().to_owned(), h.is_up(), h.why_down()))
                    .collect()
            } else {
                Vec::new()
            };
        }
        if let Ok(mut w) = self.waiting.lock() {
            *w = match all {
                [one] => one.why_down(),
                _ => "no libvirt host answers".into(),
            };
        }
        self.ready.store(hosts.any_up(), Ordering::SeqCst);
    }

    /// Whether ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The `/readyz` answer; with `detail` (the metrics listener, on a private
    /// address) it says why, and how each host is when there are several, else only
    /// whether it is ready (libvirt's words name its URI, which may hold a user and
    /// host, and are not for anyone who reaches the console port).
    pub fn response(&self, detail: bool) -> Resp {
        let hosts = || {
            self.hosts
                .lock()
                .map(|h| {
                    h.iter()
                        .map(|(name, up, why)| match up {
                            true => format!("host {name}: up\n"),
                            false => format!("host {name}: down: {why}\n"),
                        })
                        .collect::<String>()
                })
                .unwrap_or_default()
        };
        if self.is_ready() {
            if !detail {
                return text(StatusCode::OK, "ready\n");
            }
            return text(StatusCode::OK, &format!("ready\n{}", hosts()));
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
            &format!("not ready: {why}\n{}", hosts()),
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
        hosts: Arc<Hosts>,
        audit: Arc<Audit>,
        admins: Option<crate::admins::Admins>,
        close_sessions: watch::Receiver<bool>,
        spice_key: session::spice::LinkKey,
        metrics: Arc<Metrics>,
        upstream_tls: Option<Arc<crate::tls::UpstreamTls>>,
    ) -> App {
        let l = &config.limits;
        let spice_limits = |max_message_len| vizor_spice::Limits {
            max_message_len,
            // Clipboard transfers are followed across chunks, not held, and keep the
            // codec's own bound.
            ..vizor_spice::Limits::default()
        };
        let env = session::Env {
            audit,
            metrics,
            live: Arc::default(),
            slots: Slots::new(
                l.max_sessions,
                l.max_sessions_per_domain,
                l.max_sessions_per_user,
            ),
            browser_limits: vizor_rfb::Limits {
                max_message_len: l.browser_message_max,
            },
            vm_limits: vizor_rfb::Limits {
                max_message_len: l.vm_message_max,
            },
            spice_browser_limits: spice_limits(l.browser_message_max),
            spice_vm_limits: spice_limits(l.vm_message_max),
            send_timeout: l.send_timeout,
            idle_timeout: l.idle_timeout,
            handshake_timeout: config.server.handshake_timeout,
            dial: session::Dial {
                timeout: config.server.connect_timeout,
                allow: Arc::new(crate::upstream::in_force(
                    config.upstream.allow.as_ref(),
                    &config.libvirt.hosts(),
                )),
                stall: l.vm_stall_timeout,
            },
            upstream_tls,
            host_allow: match &config.upstream.allow {
                Some(_) => Default::default(),
                None => config
                    .libvirt
                    .hosts()
                    .into_iter()
                    .map(|h| {
                        let allow = crate::upstream::in_force(None, std::slice::from_ref(&h));
                        (h.name, Arc::new(allow))
                    })
                    .collect(),
            },
            host_tls: hosts
                .all()
                .iter()
                .filter_map(|h| Some((h.name().to_owned(), h.upstream_tls.clone()?)))
                .collect(),
            record_dir: config.audit.record_dir.clone(),
            require_password: config.libvirt.require_password,
            spice: config.spice.clone(),
            spice_key,
            spice_sessions: Default::default(),
            vm_keyboards: Default::default(),
            resumes: session::resume::Resumes::new(config.tokens.resume_window),
        };
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
            shared: None,
            hosts,
            env: Arc::new(env),
            admins: std::sync::RwLock::new(admins.map(Arc::new)),
            metrics_key: None,
            connections,
            failed_tokens,
            refusals,
            close_sessions,
            sessions: SessionCount::default(),
            readiness: Arc::default(),
            event_streams: AtomicUsize::new(0),
            presence_streams: AtomicUsize::new(0),
            presence_per_token: Mutex::default(),
            next_session: AtomicU64::new(1),
        }
    }

    /// The audit sink.
    pub fn audit(&self) -> &Audit {
        &self.env.audit
    }

    /// The administrators, if the API is on.
    pub fn admins(&self) -> Option<Arc<crate::admins::Admins>> {
        self.admins.read().ok().and_then(|a| a.clone())
    }

    /// Reads the administrators' key files again (SIGHUP); on an error the keys in use
    /// stay.
    pub fn reload_admins(&self) -> Result<usize, String> {
        let api = &self.config.api;
        let admins = crate::admins::Admins::load(
            api.admin_key_file.as_deref(),
            api.admin_keys_file.as_deref(),
        )?;
        let n = admins.as_ref().map_or(0, |a| a.len());
        if let Ok(mut a) = self.admins.write() {
            *a = admins.map(Arc::new);
        }
        Ok(n)
    }

    /// Prometheus metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.env.metrics
    }

    /// Live sessions.
    pub fn live(&self) -> &Arc<LiveSessions> {
        &self.env.live
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
) -> Result<Response<Body>, std::convert::Infallible> {
    if paste_route(req.method(), req.uri().path()) {
        let peer = client_of(&app, peer, &req);
        let mut r = console_paste(app, peer, req)
            .await
            .map(http_body_util::Either::Left);
        secure(&mut r);
        return Ok(r);
    }
    if console_events_route(req.method(), req.uri().path()) {
        let peer = client_of(&app, peer, &req);
        let mut r = console_events(app, peer, &req).await;
        secure(&mut r);
        return Ok(r);
    }
    if let Some(id) = events_route(req.method(), req.uri().path()) {
        let id = id.to_owned();
        let peer = client_of(&app, peer, &req);
        let mut r = events(app, peer, &req, &id).await;
        secure(&mut r);
        return Ok(r);
    }
    let Ok(mut r) = route(app, peer, req).await;
    secure(&mut r);
    Ok(r.map(http_body_util::Either::Left))
}

/// The client a request comes from: behind a trusted reverse proxy, the one its
/// headers name (from there on the client for limits, token binding, logs and audit;
/// the port is the proxy's).
fn client_of(app: &App, peer: SocketAddr, req: &Request<Incoming>) -> SocketAddr {
    let trusted = &app.config.server.trusted_proxies;
    if trusted.is_empty() {
        return peer;
    }
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
}

/// The headers every response carries, unless it set its own (the console page has a
/// stricter Content-Security-Policy): no MIME sniffing, no framing by any page (noVNC's
/// own vnc.html takes its settings from its URL and must not be steered from a frame),
/// no referrer (a console URL holds a token), no plugins, no `<base>`.
pub fn secure<B>(r: &mut Response<B>) {
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
    let peer = client_of(&app, peer, &req);
    let path = req.uri().path().to_owned();
    if let Some(rest) = path.strip_prefix("/api/v1/sessions/") {
        return Ok(match session_route(req.method(), rest) {
            Some(Ok((id, action))) => session_api(&app, peer, req, id, action).await,
            Some(Err((status, e))) => text(status, &format!("{e}\n")),
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        });
    }
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
            app.metrics()
                .auth_refusals_total
                .with_label_values(&["origin", "origin_not_allowed"])
                .inc();
            refusal(&app, peer, "origin_not_allowed", || {
                warn!(client = %peer, origin = %origin, "WebSocket upgrade refused: origin not allowed (more from this client this interval are counted, not logged)");
                app.audit().record_refusal(&Event::OriginRefused {
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
    if path == "/admin" {
        return Ok(console::admin_page(app.admins().is_some()));
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
    if path == "/api/v1/hosts" {
        return Ok(api(&app, peer, &req, Endpoint::Hosts).await);
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

/// The Prometheus text exposition.
pub fn metrics_response(metrics: &Metrics) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(metrics.render())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// How long a shutdown waits for sessions to write their end records after they are
/// told to close.
pub const CLOSE_WAIT: Duration = Duration::from_secs(3);

#[cfg(test)]
mod readiness_tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(r: Resp) -> (u16, String) {
        let status = r.status().as_u16();
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn ready_while_one_host_answers_with_a_line_per_host_in_private() {
        let host = |name: &str, uri: &str| crate::config::HostConfig {
            name: name.into(),
            uri: uri.into(),
            console_address: None,
            upstream_tls: None,
        };
        let hosts = Hosts::new(
            &[
                host("a", "test:///default"),
                host("b", "test:///nonexistent/node.xml"),
            ],
            Arc::new(Metrics::new().unwrap()),
        )
        .unwrap();
        let r = Readiness::default();
        r.update(&hosts);
        assert!(!r.is_ready(), "no host probed yet");
        hosts.probe_all().await;
        r.update(&hosts);
        assert!(r.is_ready());
        assert_eq!(body(r.response(false)).await, (200, "ready\n".into()));
        let (status, text) = body(r.response(true)).await;
        assert_eq!(status, 200);
        assert!(
            text.starts_with("ready\nhost a: up\nhost b: down: libvirt at test:///nonexistent"),
            "{text}"
        );
        // Neither answers: not ready, and the public answer names no URI.
        let down = Hosts::new(
            &[host("b", "test:///nonexistent/node.xml")],
            Arc::new(Metrics::new().unwrap()),
        )
        .unwrap();
        down.probe_all().await;
        r.update(&down);
        let (status, text) = body(r.response(false)).await;
        assert_eq!(status, 503);
        assert!(!text.contains("test:"), "{text}");
        let (status, text) = body(r.response(true)).await;
        assert!(
            status == 503 && text.contains("test:///nonexistent"),
            "{text}"
        );
    }
}
