//! The management API: `GET /api/v1/domains/{name-or-uuid}/console` (tokens) and
//! `GET /api/v1/sessions`, behind the admin bearer key.

use super::*;

/// The bearer key a request carries.
pub(super) fn bearer(req: &Request<Incoming>) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

pub(super) fn bearer_matches(req: &Request<Incoming>, key: &str) -> bool {
    let Some(given) = bearer(req) else {
        return false;
    };
    // Constant time in the key's content; lengths differing is not a secret.
    given.len() == key.len() && bool::from(given.as_bytes().ct_eq(key.as_bytes()))
}

/// A management API endpoint.
#[derive(Clone, Copy)]
pub(super) enum Endpoint<'a> {
    /// `GET /api/v1/sessions`.
    Sessions,
    /// `GET /api/v1/domains/{name-or-uuid}/console`.
    Console(&'a str),
    /// `GET /api/v1/hosts`.
    Hosts,
}

/// Why an API request was not answered with what it asked for.
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    /// A stable label: the answer's `reason`, the audit record's and the metrics'.
    pub(super) reason: &'static str,
    pub(super) error: String,
    /// The hosts the answer is about (an ambiguous name's, the unreachable ones).
    pub(super) hosts: Option<Vec<String>>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, reason: &'static str, error: impl Into<String>) -> Self {
        ApiError {
            status,
            reason,
            error: error.into(),
            hosts: None,
        }
    }

    /// The same, naming `hosts` (`"hosts"` in the answer).
    fn with_hosts(self, hosts: Vec<String>) -> Self {
        ApiError {
            hosts: Some(hosts),
            ..self
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
pub(super) fn api_refused(
    app: &App,
    peer: SocketAddr,
    endpoint: &'static str,
    domain: Option<&str>,
    e: &ApiError,
) {
    app.metrics()
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
        app.metrics()
            .auth_refusals_total
            .with_label_values(&["api", e.reason])
            .inc();
        refusal(app, peer, e.reason, || {
            warn!(client = %peer, endpoint, status = e.status.as_u16(), reason = e.reason,
                "API request refused (more of this client and reason this interval are counted, not logged)");
            app.audit().record_refusal(&event)
        });
        if e.reason == "bad_key" {
            failed_attempt(app, peer);
        }
    } else {
        warn!(client = %peer, endpoint, status = e.status.as_u16(), reason = e.reason, domain, error = %e.error, "API request failed");
        app.audit().record_nowait(&event);
    }
}

/// The client's allowance for an API request to `endpoint`: the refusal (counted)
/// when it has none left.
pub(super) fn api_throttled(app: &App, peer: SocketAddr, endpoint: &str) -> Option<Resp> {
    let refused = throttled(app, peer)?;
    app.metrics()
        .api_requests_total
        .with_label_values(&[endpoint, StatusCode::TOO_MANY_REQUESTS.as_str()])
        .inc();
    Some(refused)
}

/// The answer to an API request to `endpoint`: counted; a refusal also audited and
/// answered as `{"error","reason"}`.
pub(super) fn api_answer(
    app: &App,
    peer: SocketAddr,
    endpoint: &'static str,
    domain: Option<&str>,
    answer: Result<Resp, ApiError>,
) -> Resp {
    match answer {
        Ok(resp) => {
            app.metrics()
                .api_requests_total
                .with_label_values(&[endpoint, resp.status().as_str()])
                .inc();
            resp
        }
        Err(e) => {
            api_refused(app, peer, endpoint, domain, &e);
            let mut body = serde_json::json!({"error": e.error, "reason": e.reason});
            if let Some(hosts) = &e.hosts {
                body["hosts"] = serde_json::json!(hosts);
            }
            json(e.status, &body)
        }
    }
}

/// Serves a management API request: the client's allowance, then the admin key, then
/// the endpoint; every answer counted, every refusal audited.
pub(super) async fn api(
    app: &App,
    peer: SocketAddr,
    req: &Request<Incoming>,
    endpoint: Endpoint<'_>,
) -> Resp {
    let (name, domain) = match endpoint {
        Endpoint::Sessions => ("sessions", None),
        Endpoint::Console(d) => ("console", Some(d)),
        Endpoint::Hosts => ("hosts", None),
    };
    if let Some(refused) = api_throttled(app, peer, name) {
        return refused;
    }
    let answer = match admin_check(app, req) {
        Err(e) => Err(e),
        Ok(admin) => match endpoint {
            Endpoint::Sessions => Ok(api_sessions(app).await),
            Endpoint::Console(domain) => api_console(app, peer, domain, req, &admin).await,
            Endpoint::Hosts => Ok(api_hosts(app)),
        },
    };
    api_answer(app, peer, name, domain, answer)
}

/// Checks the admin bearer key; returns the administrator's name.
pub(super) fn admin_check(app: &App, req: &Request<Incoming>) -> Result<String, ApiError> {
    let Some(admins) = app.admins() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "api_disabled",
            "the management API is disabled (no [api] admin_key_file or admin_keys_file)",
        ));
    };
    match bearer(req).and_then(|given| admins.who(given)) {
        Some(name) => Ok(name.to_owned()),
        None => Err(ApiError::bad_key(
            "a valid Authorization: Bearer <admin key> header is required",
        )),
    }
}

/// `GET /api/v1/hosts`: each libvirt host, whether it answers, and what its last
/// answer said.
fn api_hosts(app: &App) -> Resp {
    let hosts: Vec<_> = app
        .hosts
        .all()
        .iter()
        .map(|h| {
            let mut v = serde_json::json!({
                "name": h.name(),
                "uri": h.libvirt().uri(),
                "console_address": h.libvirt().console_address(),
                "reachable": h.is_up(),
            });
            if let Some(p) = h.last_probe() {
                v["libvirt_version"] = p.version.into();
                v["hostname"] = p.hostname.into();
                v["running_domains"] = p.running.into();
                v["stopped_domains"] = p.stopped.into();
            }
            if !h.is_up() {
                v["error"] = h.why_down().into();
            }
            v
        })
        .collect();
    json(StatusCode::OK, &serde_json::json!({ "hosts": hosts }))
}

/// `GET /api/v1/sessions`: the live sessions, oldest first; with `[state]`, every
/// replica's (each naming its replica), and whether the others could be listed.
pub(super) async fn api_sessions(app: &App) -> Resp {
    let Some(shared) = &app.shared else {
        let sessions: Vec<_> = app.live().list().iter().map(|l| session_json(l)).collect();
        return json(StatusCode::OK, &serde_json::json!({"sessions": sessions}));
    };
    // This replica's sessions as they are now; the others' as their replicas last
    // wrote them (at most a third of a lease ago).
    let mut sessions: Vec<serde_json::Value> = app
        .live()
        .list()
        .iter()
        .map(|l| listed(shared, l))
        .collect();
    let others = match shared.sessions().await {
        Ok(entries) => {
            for v in entries {
                if v["member"].as_str().is_some_and(|m| !shared.is_mine(m)) {
                    sessions.push(v);
                }
            }
            serde_json::Value::Null
        }
        Err(e) => serde_json::Value::String(e.to_string()),
    };
    sessions.sort_by(|a, b| {
        let at = |v: &serde_json::Value| v["started_at"].as_str().unwrap_or("").to_owned();
        at(a).cmp(&at(b))
    });
    json(
        StatusCode::OK,
        &serde_json::json!({"sessions": sessions, "other_replicas_unlisted": others}),
    )
}

/// A session's entry for the list of every replica's sessions: its own entry, with
/// its replica and the member its slot is held under.
pub(crate) fn listed(shared: &crate::state::Shared, l: &crate::live::Live) -> serde_json::Value {
    let mut v = session_json(l);
    v["replica"] = shared.replica().into();
    v["member"] = shared.member(l.id).into();
    v
}

/// A live session as `GET /api/v1/sessions` shows it.
fn session_json(l: &crate::live::Live) -> serde_json::Value {
    let ms = |q: Option<crate::live::Quantiles>| match q {
        Some(q) => serde_json::json!({
            "p50": q.p50 * 1000.0,
            "p99": q.p99 * 1000.0,
            "samples": q.samples,
        }),
        None => serde_json::Value::Null,
    };
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
        "host": l.host,
        "kind": l.kind.as_str(),
        "client": l.client.to_string(),
        "token_id": l.token_id,
        "started_at": humantime::format_rfc3339_seconds(l.started).to_string(),
        "parked_since": l.parked_since().map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        "channels": s.channels,
        "bytes": each(s.bytes),
        "bytes_per_second": each(s.rate),
        "frame_latency_ms": ms(s.latency[Latency::Frame as usize]),
        "input_to_display_ms": ms(s.latency[Latency::InputToDisplay as usize]),
        "client_rtt_ms": ms(s.latency[Latency::ClientRtt as usize]),
        "participants": l.members().iter().map(|m| serde_json::json!({
            "session": m.session,
            "user": m.user,
            "role": m.role.as_str(),
            "client": m.client.to_string(),
            "since": humantime::format_rfc3339_seconds(m.since).to_string(),
            "announced": m.announced,
        })).collect::<Vec<_>>(),
    })
}

/// `GET /api/v1/domains/{name-or-uuid}/console`: a token for the domain's console,
/// on record before it is answered.
pub(super) async fn api_console(
    app: &App,
    peer: SocketAddr,
    domain: &str,
    req: &Request<Incoming>,
    admin: &str,
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
    let user = query_param(req, "user").unwrap_or_else(|| "api".to_owned());
    crate::token::check_user(&user).map_err(|e| bad(&e.to_string()))?;
    // `?client=`: the token admits the browser at this address alone.
    let client = match query_param(req, "client").map(|c| c.parse::<std::net::IpAddr>()) {
        None => None,
        Some(Ok(ip)) => Some(ip),
        Some(Err(_)) => return Err(bad("client must be an IPv4 or IPv6 address")),
    };
    // The holder's policy: `?view_only=true`, `?clipboard=`, `?max_duration=`.
    let view_only = match query_param(req, "view_only").as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(_) => return Err(bad("view_only must be true or false")),
    };
    let clipboard = query_param(req, "clipboard")
        .map(|c| c.parse::<crate::token::ClipboardWays>())
        .transpose()
        .map_err(|e| bad(&e))?
        .unwrap_or(crate::token::ClipboardWays::BOTH);
    let max_duration = query_param(req, "max_duration")
        .map(|d| {
            humantime::parse_duration(&d).map_err(|e| bad(&format!("max_duration {d:?}: {e}")))
        })
        .transpose()?;
    // `?host=`: the libvirt host the domain is on; without it, whichever host has it.
    let host = query_param(req, "host");
    if let Some(h) = &host {
        if !crate::config::is_host_name(h) {
            return Err(bad("host must be 1 to 63 of a-z, 0-9 and '-'"));
        }
    }
    let named = DomainRef::NameOrUuid(domain.to_owned());
    let console = match find(
        app,
        host.as_deref(),
        named.clone(),
        asked.unwrap_or(ConsoleKind::Vnc),
    )
    .await
    {
        Err(LookupError::NoGraphics { has, .. }) if asked.is_none() && has.len() == 1 => {
            find(app, host.as_deref(), named, has[0]).await
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
    let policy = crate::token::Policy::asked(kind, view_only, clipboard, max_duration)
        .map_err(|e| bad(&e))?;
    let ttl = app.config.tokens.ttl;
    // The token opens this domain, by UUID: another domain defined later under the same
    // name is not it.
    let domain = console.domain.as_str();
    let grant = crate::token::Grant {
        host: &console.host,
        domain,
        uuid,
        kind,
        user: &user,
        client,
        ttl,
        role: crate::token::Role::Owner,
        joins: None,
        policy,
    };
    let crate::token::Issued { token, claims } =
        app.key.issue(&grant, unix_now()).map_err(|e| match e {
            crate::token::IssueError::User => bad(&e.to_string()),
            e => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        })?;
    let expires = UNIX_EPOCH + Duration::from_secs(claims.expires_at);
    let token_id = claims.token_id();
    // On record before anyone holds it.
    app.audit()
        .record(&Event::TokenIssued {
            token_id: &token_id,
            by: "api",
            requester: &peer.to_string(),
            user: &user,
            domain,
            uuid: &console.uuid,
            host: (console.host != crate::config::DEFAULT_HOST).then_some(console.host.as_str()),
            kind,
            ttl_s: ttl.as_secs(),
            expires_at: humantime::format_rfc3339_seconds(expires).to_string(),
            bound_client: client.map(|c| c.to_string()),
            admin: Some(admin),
            role: None,
            joins: None,
            view_only: policy.view_only,
            clipboard: (policy.clipboard != crate::token::ClipboardWays::BOTH)
                .then(|| policy.clipboard.as_str()),
            max_duration_s: policy.max_duration.map(|d| d.as_secs()),
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
            "host": console.host,
            "token": token,
            "ws_path": format!("/websockify?token={token}"),
            "console_url": format!("/console?token={token}"),
            "expires_at": humantime::format_rfc3339_seconds(expires).to_string(),
            "view_only": policy.view_only,
            "clipboard": policy.clipboard.as_str(),
            "max_duration_s": policy.max_duration.map(|d| d.as_secs()),
        }),
    ))
}

/// The API's answer to a failed lookup.
pub(super) fn api_lookup_failed(e: LookupError) -> ApiError {
    let status = match e {
        LookupError::NoSuchDomain(_) => StatusCode::NOT_FOUND,
        LookupError::UnknownHost(_) => StatusCode::NOT_FOUND,
        LookupError::Unreachable { .. }
        | LookupError::BadXml { .. }
        | LookupError::ListensLocally { .. } => StatusCode::BAD_GATEWAY,
        LookupError::HostsUnreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::CONFLICT,
    };
    let reason = match e {
        LookupError::UnknownHost(_) => "no_such_host",
        _ => e.reason(),
    };
    let mut error = ApiError::new(status, reason, e.to_string());
    if let LookupError::Ambiguous { hosts, .. } | LookupError::HostsUnreachable { hosts, .. } = e {
        error = error.with_hosts(hosts);
    }
    error
}

/// `/metrics` on the main listener: only for the metrics or admin bearer key. The
/// series name users and domains, and the key counter moves with every keystroke.
pub(super) fn metrics_here(app: &App, peer: SocketAddr, req: &Request<Incoming>) -> Resp {
    let count = |code: StatusCode| {
        app.metrics()
            .api_requests_total
            .with_label_values(&["metrics", code.as_str()])
            .inc();
    };
    let admins = app.admins();
    if app.metrics_key.is_none() && admins.is_none() {
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
    let metrics = app
        .metrics_key
        .as_ref()
        .is_some_and(|k| bearer_matches(req, k));
    let admin = match (&admins, bearer(req)) {
        (Some(a), Some(given)) => a.who(given).is_some(),
        _ => false,
    };
    let matched = metrics | admin;
    if !matched {
        let e = ApiError::bad_key("a valid Authorization: Bearer <metrics key> header is required");
        api_refused(app, peer, "metrics", None, &e);
        return text(e.status, &format!("{}\n", e.error));
    }
    count(StatusCode::OK);
    metrics_response(app.metrics())
}
