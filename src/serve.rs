//! `vizor serve`: loads everything the proxy needs, listens, and shuts down gracefully
//! on SIGTERM or SIGINT (stop accepting, let sessions run for `shutdown_grace`, then
//! close them with a reason).

use crate::audit::{Audit, ChainKey};
use crate::config::Config;
use crate::front::{self, App, CLOSE_WAIT};
use crate::libvirt::hosts::{Host, Hosts, PROBE_EVERY};
use crate::tls::Tls;
use crate::token::TokenKey;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};
use zeroize::Zeroizing;

/// Loads a bearer key file (`what`: "admin key file", "metrics key file").
pub(crate) fn load_bearer_key(
    path: &std::path::Path,
    what: &str,
) -> Result<Zeroizing<String>, String> {
    let shown = path.display();
    let text = read_private(path, what)?;
    let key = Zeroizing::new(text.trim().to_owned());
    if key.len() < 16 || key.contains(char::is_whitespace) {
        return Err(format!(
            "{what} {shown}: the key must be one word of at least 16 characters \
             (for example: head -c 32 /dev/urandom | base64 > {shown})"
        ));
    }
    Ok(key)
}

/// Reads a file of secrets (`what`, for messages): refused when group or others may
/// read it.
pub(crate) fn read_private(
    path: &std::path::Path,
    what: &str,
) -> Result<Zeroizing<String>, String> {
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("{what} {shown}: {e}"))?
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{what} {shown} is readable by group or others (mode {mode:o}); run: chmod 600 {shown}"
        ));
    }
    Ok(Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("{what} {shown}: {e}"))?,
    ))
}

/// The audit key must not be the token key: whoever verifies the log could mint tokens.
pub(crate) fn keys_apart(
    config: &Config,
    token: &TokenKey,
    chain: &ChainKey,
) -> Result<(), String> {
    if *chain == ChainKey::from_token_key(token) {
        return Err(format!(
            "[audit] key_file {} holds the same key as [tokens] key_file: whoever verifies the log could mint tokens. Create a separate one with `vizor keygen`",
            config.audit.key_file.display()
        ));
    }
    Ok(())
}

/// The largest request head (request line and headers) vizor reads.
const MAX_HEADER_SIZE: usize = 32 * 1024;

/// Serves HTTP/1.1 (and WebSocket upgrades) on one connection, plain or TLS. A client
/// must send each request's head within `handshake_timeout`, idle between requests
/// too: a slow or silent client holds its connection that long at most.
async fn serve_http<I>(
    app: Arc<App>,
    peer: std::net::SocketAddr,
    io: I,
    counted: crate::limits::Connection,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let timeout = app.config.server.handshake_timeout;
    // The connection's place among the counted ones: a long-lived stream with limits
    // of its own (the console page's presence) gives it back.
    let counted = front::Counted::new(counted);
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(counted.clone());
        front::handle(app.clone(), peer, req)
    });
    let conn = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(timeout)
        .max_header_size(MAX_HEADER_SIZE)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        debug!(client = %peer, error = %e, "HTTP connection ended with an error");
    }
}

/// Answers a plain HTTP request sent to the TLS listener with a 400 that says to use
/// https, and closes.
async fn plain_http_to_tls(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    const BODY: &str = "This port speaks HTTPS (TLS): use https:// (and wss:// for WebSockets).\n";
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    // Then a little of the request is read, so that closing with it unread does not
    // reset the connection before the client reads the answer; 2 s in all at most.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        use tokio::io::AsyncReadExt;
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
        let mut drained = [0u8; 4096];
        let mut left = 16 * 1024;
        while left > 0 {
            match stream.read(&mut drained).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n.min(left),
            }
        }
    })
    .await;
}

/// Connections the metrics listener serves at once; more are closed at accept.
const METRICS_CONNECTIONS: usize = 64;

/// Failed accepts (out of open files, most often) on one listener: counted, logged at
/// most once per interval, and waited out with a growing pause instead of retried at
/// once (an accept loop that retries at once spins a CPU and floods the log).
pub struct AcceptErrors {
    listener: &'static str,
    metrics: Arc<crate::metrics::Metrics>,
    backoff: Duration,
    last_log: Option<Instant>,
    since_log: u64,
}

impl AcceptErrors {
    /// The first pause.
    pub const FIRST: Duration = Duration::from_millis(10);
    /// The longest pause.
    pub const MAX: Duration = Duration::from_secs(1);
    /// At most one log line per this long.
    pub const LOG_EVERY: Duration = Duration::from_secs(10);

    /// For the listener named `listener` (`main`, `metrics`).
    pub fn new(listener: &'static str, metrics: Arc<crate::metrics::Metrics>) -> AcceptErrors {
        AcceptErrors {
            listener,
            metrics,
            backoff: Self::FIRST,
            last_log: None,
            since_log: 0,
        }
    }

    /// An accept succeeded: the next failure pauses briefly again.
    pub fn ok(&mut self) {
        self.backoff = Self::FIRST;
    }

    /// An accept failed with `e`: counts and perhaps logs it; returns how long to
    /// pause before the next accept. Only running out of a resource (open files,
    /// buffers, memory) pauses; an error of one connection (aborted, a network
    /// error the kernel passes on) is retried at once.
    pub fn failed(&mut self, e: &std::io::Error, now: Instant) -> Duration {
        use nix::errno::Errno;
        let exhausted = e.raw_os_error().is_some_and(|n| {
            [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM]
                .contains(&Errno::from_raw(n))
        });
        if !exhausted {
            debug!(listener = self.listener, error = %e, "accept failed for one connection");
            return Duration::ZERO;
        }
        self.metrics
            .accept_errors_total
            .with_label_values(&[self.listener])
            .inc();
        self.since_log += 1;
        if self
            .last_log
            .is_none_or(|t| now.saturating_duration_since(t) >= Self::LOG_EVERY)
        {
            warn!(listener = self.listener, error = %e, failures = self.since_log,
                "accept failed; pausing before the next (out of open files? see the limit logged at start)");
            self.last_log = Some(now);
            self.since_log = 0;
        }
        let pause = self.backoff;
        self.backoff = (self.backoff * 2).min(Self::MAX);
        pause
    }
}

/// Serves `/metrics` (and `/healthz`, `/readyz`) alone, on `metrics_listen`: each request head
/// within `header_timeout`, at most [`METRICS_CONNECTIONS`] connections at once.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<crate::metrics::Metrics>,
    readiness: Arc<front::Readiness>,
    header_timeout: Duration,
) {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut errors = AcceptErrors::new("metrics", metrics.clone());
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                errors.ok();
                stream
            }
            Err(e) => {
                tokio::time::sleep(errors.failed(&e, Instant::now())).await;
                continue;
            }
        };
        use std::sync::atomic::Ordering;
        if open.fetch_add(1, Ordering::Relaxed) >= METRICS_CONNECTIONS {
            open.fetch_sub(1, Ordering::Relaxed);
            metrics
                .connections_refused_total
                .with_label_values(&["metrics_connections"])
                .inc();
            drop(stream);
            continue;
        }
        let metrics = metrics.clone();
        let readiness = readiness.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                let readiness = readiness.clone();
                async move {
                    let mut resp = match req.uri().path() {
                        "/metrics" => front::metrics_response(&metrics),
                        "/readyz" => readiness.response(true),
                        "/healthz" => hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"ok\n"),
                        )),
                        _ => {
                            let mut r = hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from_static(b"not found\n"),
                            ));
                            *r.status_mut() = hyper::StatusCode::NOT_FOUND;
                            r
                        }
                    };
                    front::secure(&mut resp);
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_header_size(MAX_HEADER_SIZE)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Raises the soft open-files limit to the hard one, and says when `[limits]` may not
/// fit in it: each console session holds about four descriptors (browser and VM
/// sockets, a splice pipe), each connection not yet a session one.
fn raise_open_files(config: &Config) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    // An unlimited hard limit cannot be the soft one: the kernel caps open files at
    // fs.nr_open, and refuses a soft limit above it.
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let target = hard.min(nr_open);
    let limit = if soft < target && setrlimit(Resource::RLIMIT_NOFILE, target, hard).is_ok() {
        target
    } else {
        soft
    };
    // Each browser connection (a SPICE session has one per channel) holds its socket
    // and its QEMU socket; a session may hold a recording file.
    let l = &config.limits;
    let needed = (l.max_connections as u64)
        .saturating_mul(2)
        .saturating_add(l.max_sessions as u64)
        .saturating_add(64);
    if limit < needed {
        warn!(open_files = limit, needed, max_connections = l.max_connections, max_sessions = l.max_sessions,
            "the open-files limit (RLIMIT_NOFILE) is below what [limits] max_connections and max_sessions can take: raise it (systemd LimitNOFILE=) or lower them");
    } else {
        info!(open_files = limit, "open-files limit");
    }
}

/// Tells systemd (`Type=notify`) about a state change; nothing without `NOTIFY_SOCKET`.
fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        warn!(error = %e, "could not notify the service manager (NOTIFY_SOCKET)");
    }
}

/// Probes the host `h` for as long as vizor runs: every [`PROBE_EVERY`], or every
/// 2 s while no host answers. Each change is logged, and readiness follows; the
/// first time vizor becomes ready after a start without libvirt (`[libvirt] wait`),
/// systemd hears it.
async fn keep_probing(
    hosts: Arc<Hosts>,
    h: Arc<Host>,
    readiness: Arc<front::Readiness>,
    serving: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut was_up = h.is_up();
    let mut last_warn = Instant::now();
    loop {
        let pause = if hosts.any_up() {
            PROBE_EVERY
        } else {
            Duration::from_secs(2)
        };
        tokio::time::sleep(pause).await;
        let r = hosts.probe(&h).await;
        match (&r, was_up) {
            (Ok(p), false) => {
                info!(host = h.name(), libvirt = h.libvirt().uri(), version = %p.version, running = p.running, "libvirt host reachable")
            }
            (Err(e), true) => {
                warn!(host = h.name(), error = %e, "libvirt host unreachable: its consoles cannot open until it answers again");
                last_warn = Instant::now();
            }
            (Err(e), false) if last_warn.elapsed() >= Duration::from_secs(60) => {
                warn!(host = h.name(), error = %e, "libvirt host still unreachable");
                last_warn = Instant::now();
            }
            _ => {}
        }
        was_up = r.is_ok();
        readiness.update(&hosts);
        if readiness.is_ready() && !serving.swap(true, std::sync::atomic::Ordering::SeqCst) {
            info!("a libvirt host answers: ready");
            notify(&[sd_notify::NotifyState::Status("serving")]);
        }
    }
}

/// Runs the proxy until SIGTERM or SIGINT; `config_path` is where `config` came from.
pub async fn serve(
    config: Config,
    config_path: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    crate::console::check(&config.console)?;
    raise_open_files(&config);
    let tls = match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(Tls::load(cert, key)?)),
        (None, None) => None,
        _ => return Err("[server] tls_cert and tls_key go together: set both or neither".into()),
    };
    let upstream_tls = config
        .upstream_tls
        .as_ref()
        .map(crate::tls::UpstreamTls::load)
        .transpose()?
        .map(Arc::new);
    let key = TokenKey::load(&config.tokens.key_file)?;
    let metrics = Arc::new(crate::metrics::Metrics::new()?);
    let chain_key =
        ChainKey::load(&config.audit.key_file).map_err(|e| format!("[audit] key_file: {e}"))?;
    keys_apart(&config, &key, &chain_key)?;
    // libvirt answers before anything is served (or, with `wait`, vizor serves and
    // says it is not ready until a host does). With many hosts, one answering is
    // enough: the others are probed on, and their consoles open once they answer.
    let hosts = Arc::new(Hosts::new(&config.libvirt.hosts(), metrics.clone())?);
    let readiness = Arc::new(front::Readiness::default());
    let probes = hosts.probe_all().await;
    let mut down = Vec::new();
    for (h, p) in hosts.all().iter().zip(&probes) {
        match p {
            Ok(p) => info!(host = h.name(), libvirt = h.libvirt().uri(), version = %p.version,
                hostname = %p.hostname, running = p.running, stopped = p.stopped, "libvirt reachable"),
            Err(e) => {
                warn!(host = h.name(), error = %e, "libvirt host unreachable at start; vizor tries it again every 10s");
                down.push(if hosts.all().len() > 1 {
                    format!("host {}: {e}", h.name())
                } else {
                    e.clone()
                });
            }
        }
    }
    readiness.update(&hosts);
    let waiting = match readiness.is_ready() {
        true => false,
        false if config.libvirt.wait => {
            warn!(error = %down.join("; "), "libvirt unreachable at start; serving, and trying again ([libvirt] wait = true): /readyz answers 503 until it connects");
            true
        }
        false => {
            return Err(format!(
                "{}\n(vizor needs libvirt at start; set [libvirt] wait = true to start without it)",
                down.join("\n")
            )
            .into())
        }
    };
    // One vizor per recording directory and audit log (the log's lock is the
    // writer's): held until serve returns.
    let _record_lock = match &config.audit.record_dir {
        Some(dir) => {
            let meta = std::fs::metadata(dir)
                .map_err(|e| format!("[audit] record_dir {}: {e}", dir.display()))?;
            if !meta.is_dir() {
                return Err(
                    format!("[audit] record_dir {} is not a directory", dir.display()).into(),
                );
            }
            let lock = crate::lockfile::Lock::take(&crate::lockfile::of_dir(dir))
                .map_err(|e| format!("[audit] record_dir {}: {e}", dir.display()))?;
            Some(lock)
        }
        None => None,
    };
    let audit = Audit::open(&config.audit, chain_key, Some(metrics.clone()))
        .map_err(|e| format!("audit log {}: {e}", config.audit.path.display()))?;
    // Tokens spent before this start stay spent: the log's token_used records say
    // which (read with the log locked, so none is being written elsewhere).
    let read_from = std::time::Instant::now();
    let spent = crate::audit::spent::spent_tokens(&config.audit.path, crate::front::unix_now())
        .map_err(|e| {
            format!(
                "audit log {}: reading the spent tokens: {e}",
                config.audit.path.display()
            )
        })?;
    if spent.unreadable > 0 {
        warn!(
            unreadable = spent.unreadable,
            "audit log: token_used records that could not be read (those tokens are not known to be spent)"
        );
    }
    info!(
        tokens = spent.tokens.len(),
        files = spent.files,
        ms = read_from.elapsed().as_millis() as u64,
        "spent tokens restored from the audit log"
    );
    let admins = crate::admins::Admins::load(
        config.api.admin_key_file.as_deref(),
        config.api.admin_keys_file.as_deref(),
    )?;
    let metrics_key = config
        .metrics
        .key_file
        .as_deref()
        .map(|p| load_bearer_key(p, "metrics key file"))
        .transpose()?;
    let listen = config.server.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr()?;
    let grace = config.server.shutdown_grace;
    let (close_tx, close_rx) = watch::channel(false);
    let spice_key = crate::session::spice::LinkKey::generate()?;
    let mut app = App::new(
        config,
        key,
        hosts.clone(),
        Arc::new(audit),
        admins,
        close_rx,
        spice_key,
        metrics.clone(),
        upstream_tls,
    );
    app.metrics_key = metrics_key;
    app.readiness = readiness.clone();
    // Replicas' shared state: connected on first use, and again whenever it drops;
    // asked once here so that the log says at once whether it answers.
    if let Some(cfg) = &app.config.state {
        let shared = crate::state::Shared::open(cfg, &app.key, metrics.clone())?;
        match shared.ping().await {
            Ok(()) => info!(replica = shared.replica(), "shared state (Redis) answers"),
            Err(e) => {
                warn!(replica = shared.replica(), error = %e, "shared state unavailable at start: sessions are refused until it answers")
            }
        }
        match shared.namesakes().await {
            Ok(0) | Err(_) => {}
            Ok(n) => error!(replica = shared.replica(), others = n, "another vizor process uses this [state] replica name on this Redis: give each replica its own (ends of sessions still reach the right process, but the names in the list of sessions and the records are ambiguous)"),
        }
        match shared.begin().await {
            Ok(true) => {
                warn!(lease = %humantime::format_duration(cfg.lease), "the shared state counted no sessions yet (a new Redis, or one that lost its data): new sessions are refused for one lease while the replicas count theirs")
            }
            Ok(false) => {}
            Err(e @ crate::state::Begin::OtherLease(_)) => return Err(e.to_string().into()),
            // Said above; checked again at the next start.
            Err(crate::state::Begin::Unavailable(_)) => {}
        }
        let shared = Arc::new(shared);
        app.env.slots.share(shared.clone());
        app.shared = Some(shared);
    }
    if let Ok(mut r) = app.replay.lock() {
        r.restore(spent.tokens);
    }
    let app = Arc::new(app);
    if let Some(shared) = &app.shared {
        // Slots across replicas are renewed, and the sessions listed for the other
        // replicas, for as long as the process runs.
        let live = app.live().clone();
        let listed = shared.clone();
        tokio::spawn(shared.clone().keep_leases(move |id| {
            let l = live.get(id)?;
            Some(crate::front::listed(&listed, &l).to_string())
        }));
        // Ends other replicas' administrators ask of this one's sessions.
        let holder = app.clone();
        let handle: crate::state::EndHandler = Arc::new(move |asked| {
            let app = holder.clone();
            Box::pin(async move { crate::front::end_asked(&app, asked).await })
        });
        tokio::spawn(shared.clone().listen(handle));
    }
    if app.config.metrics.per_session {
        metrics.register(Box::new(crate::live::PerSession::new(
            app.live().clone(),
            app.config.metrics.per_session_max,
        )?))?;
    }
    let mut metrics_local = None;
    if let Some(addr) = app.config.server.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} (metrics_listen): {e}"))?;
        metrics_local = Some(listener.local_addr()?);
        tokio::spawn(serve_metrics(
            listener,
            metrics.clone(),
            readiness.clone(),
            app.config.server.handshake_timeout,
        ));
    }
    let mut accept_errors = AcceptErrors::new("main", metrics.clone());
    // Refusals are summed up when their interval ends, also when they stop.
    {
        let app = app.clone();
        let every = app.config.audit.refusal_summary_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                front::record_summaries(&app, app.refusals.flush(std::time::Instant::now()));
            }
        });
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let c = &app.config;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %config_path.display(),
        libvirt = %c.libvirt.hosts().iter().map(|h| format!("{}={}", h.name, h.uri)).collect::<Vec<_>>().join(", "),
        %local,
        tls = tls.is_some(),
        metrics = %metrics_local.map(|a| a.to_string()).unwrap_or_else(|| "main listener, with [metrics] key_file".into()),
        api = c.api.admin_key_file.is_some() || c.api.admin_keys_file.is_some(),
        audit = %c.audit.path.display(),
        record_dir = %c.audit.record_dir.as_ref().map(|d| d.display().to_string()).unwrap_or_else(|| "-".into()),
        upstream_allow = %app.env.dial.allow,
        "vizor listening"
    );
    // A line for scripts and tests that asked for port 0.
    println!("listening on {local}");
    // Started: libvirt answered, or (with `wait`) vizor serves and says in /readyz
    // and its status that it waits. Holding READY back until libvirt answers would have
    // systemd kill a vizor told to wait once TimeoutStartSec passed.
    if waiting {
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("waiting for libvirt"),
        ]);
    } else {
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("serving"),
        ]);
    }
    let serving = Arc::new(std::sync::atomic::AtomicBool::new(!waiting));
    for h in hosts.all() {
        tokio::spawn(keep_probing(
            hosts.clone(),
            h.clone(),
            readiness.clone(),
            serving.clone(),
        ));
    }

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    accept_errors.ok();
                    a
                }
                Err(e) => {
                    tokio::time::sleep(accept_errors.failed(&e, Instant::now())).await;
                    continue;
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                match &tls {
                    Some(t) => match t.reload() {
                        Ok(()) => info!("TLS certificate reloaded"),
                        Err(e) => warn!(error = %e, "TLS reload failed; keeping the certificate in use"),
                    },
                    None => info!("SIGHUP: no TLS certificate to reload"),
                }
                if app.admins().is_some() {
                    match app.reload_admins() {
                        Ok(n) => info!(administrators = n, "admin keys reloaded"),
                        Err(e) => warn!(error = %e, "admin keys not reloaded; keeping the keys in use"),
                    }
                }
                continue;
            }
        };
        // Counted until the connection ends or becomes a console session.
        // A trusted reverse proxy carries many clients: the per-client cap applies to
        // each once its request names it (limits keyed on the forwarded client).
        let proxy = app
            .config
            .server
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&peer.ip().to_canonical()));
        let entered = if proxy {
            app.connections.enter_proxy()
        } else {
            app.connections.enter(peer.ip())
        };
        let counted = match entered {
            Ok(c) => c,
            Err(full) => {
                app.metrics()
                    .connections_refused_total
                    .with_label_values(&[full.label()])
                    .inc();
                debug!(client = %peer, limit = full.label(), "connection refused: limit reached");
                drop(stream);
                continue;
            }
        };
        // Consoles are interactive: a short write (an update's last rows, a cursor)
        // goes out at once, not held back by Nagle's algorithm until the browser
        // acknowledges what went before (which a delayed ACK can hold 40 ms or more).
        if let Err(e) = stream.set_nodelay(true) {
            debug!(client = %peer, error = %e, "TCP_NODELAY not set");
        }
        let app = app.clone();
        let Some(tls) = &tls else {
            tokio::spawn(async move {
                serve_http(app, peer, stream, counted).await;
            });
            continue;
        };
        let acceptor = tls.acceptor();
        tokio::spawn(async move {
            // A client that never finishes its TLS handshake holds nothing for long.
            let timeout = app.config.server.handshake_timeout;
            // Plain HTTP to the TLS port: told so in a line it can show, not a TLS
            // alert a browser shows as a broken connection. A ClientHello starts with
            // 0x16; a request line with a letter.
            // One deadline for the first byte and the TLS handshake together.
            let deadline = tokio::time::Instant::now() + timeout;
            let mut first = [0u8; 1];
            if let Ok(Ok(1)) = tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
                if first[0].is_ascii_alphabetic() {
                    plain_http_to_tls(stream).await;
                    drop(counted);
                    return;
                }
            }
            match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => serve_http(app, peer, stream, counted).await,
                Ok(Err(e)) => debug!(client = %peer, error = %e, "TLS handshake failed"),
                Err(_) => debug!(client = %peer, "TLS handshake timed out"),
            }
        });
    }
    drop(listener);
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("shutting down"),
    ]);
    let live = app.sessions.live();
    info!(live, grace = %humantime::format_duration(grace), "shutting down: no new connections");
    if tokio::time::timeout(grace, app.sessions.idle())
        .await
        .is_err()
    {
        info!(
            live = app.sessions.live(),
            "shutdown grace over: closing sessions"
        );
        let _ = close_tx.send(true);
        if tokio::time::timeout(CLOSE_WAIT, app.sessions.idle())
            .await
            .is_err()
        {
            warn!(live = app.sessions.live(), "sessions still open at exit");
        }
    }
    // Slots across replicas given back now, not left for their lease.
    if let Some(shared) = &app.shared {
        shared.give_all_back().await;
    }
    // Every queued record written and synced, and the log's closing record.
    app.audit().close();
    info!("stopped");
    Ok(())
}
