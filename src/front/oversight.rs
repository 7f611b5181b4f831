//! Live oversight through the management API: `POST /api/v1/sessions/{id}/participants`
//! (a token that joins a live session as an operator or an observer), `POST
//! /api/v1/sessions/{id}/watch` (an observer token for the administrator asking) and
//! `DELETE /api/v1/sessions/{id}` (end it, for every participant). Each is on record,
//! with the administrator's name and address, before it is answered.

use super::*;
use crate::live::Live;
use crate::state::EndReply;
use crate::token::{ClipboardWays, Joins, Policy, Role};
use http_body_util::BodyExt;

/// The largest request body the API reads.
const MAX_BODY: usize = 8 * 1024;

/// The longest reason an administrator gives for ending a session.
pub const MAX_REASON_LEN: usize = 200;

/// What `/api/v1/sessions/{id}...` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SessionAction {
    /// `POST .../participants`.
    Participant,
    /// `POST .../watch`.
    Watch,
    /// `DELETE /api/v1/sessions/{id}`.
    End,
}

impl SessionAction {
    fn as_str(self) -> &'static str {
        match self {
            SessionAction::Participant => "participant",
            SessionAction::Watch => "watch",
            SessionAction::End => "end",
        }
    }
}

/// A session route refused before the API: the status, and the words.
pub(super) type RouteRefusal = (StatusCode, &'static str);

/// Routes `/api/v1/sessions/{rest}`: `None` when the path is none of these; `Err`
/// with the status and words for a wrong method or a bad id.
pub(super) fn session_route(
    method: &Method,
    rest: &str,
) -> Option<Result<(u64, SessionAction), RouteRefusal>> {
    let (id, tail) = match rest.split_once('/') {
        Some((id, tail)) => (id, Some(tail)),
        None => (rest, None),
    };
    let action = match (method, tail) {
        (&Method::POST, Some("participants")) => SessionAction::Participant,
        (&Method::POST, Some("watch")) => SessionAction::Watch,
        (&Method::DELETE, None) => SessionAction::End,
        (_, Some("participants" | "watch")) => {
            return Some(Err((StatusCode::METHOD_NOT_ALLOWED, "use POST")))
        }
        (_, None) => {
            return Some(Err((
                StatusCode::METHOD_NOT_ALLOWED,
                "use DELETE to end a session",
            )))
        }
        _ => return None,
    };
    Some(match id.parse::<u64>() {
        Ok(id) => Ok((id, action)),
        Err(_) => Err((StatusCode::BAD_REQUEST, "the session id must be a number")),
    })
}

/// A participant's token, as asked for.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinRequest {
    /// `operator` or `observer` (participants only).
    role: Option<String>,
    /// Who the participant is (participants only; a watch is the administrator's).
    user: Option<String>,
    /// The one browser address the token admits.
    client: Option<String>,
    /// The token's lifetime: a duration such as "60s" (default `[tokens] ttl`).
    ttl: Option<String>,
    /// The participant's keyboard and pointer reach nothing.
    view_only: Option<bool>,
    /// `none`, `to_vm`, `from_vm` or `both` (default both; an observer's is none).
    clipboard: Option<String>,
    /// The participant's connection ends this long after it joined, such as "30m".
    max_duration: Option<String>,
}

/// `DELETE`'s body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EndRequest {
    /// Why, for the participants and the record.
    reason: String,
}

fn bad(error: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", error)
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes; an empty body is `T::default()`
/// when `empty` gives one.
async fn body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    empty: Option<T>,
) -> Result<T, ApiError> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    let bytes = match limited.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the request body is over {MAX_BODY} bytes"),
            ))
        }
        Err(e) => return Err(bad(format!("the request body could not be read: {e}"))),
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        if let Some(d) = empty {
            return Ok(d);
        }
        return Err(bad("a JSON body is required"));
    }
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("bad JSON body: {e}")))
}

/// Serves `/api/v1/sessions/{id}` actions: the client's allowance, the admin key, then
/// the action; every answer counted, every refusal audited.
pub(super) async fn session_api(
    app: &App,
    peer: SocketAddr,
    req: Request<Incoming>,
    id: u64,
    action: SessionAction,
) -> Resp {
    let name = action.as_str();
    if let Some(refused) = api_throttled(app, peer, name) {
        return refused;
    }
    let answer = match admin_check(app, &req).and_then(|admin| Ok((admin, whose(app, &req, id)?))) {
        Err(e) => Err(e),
        Ok((admin, whose)) => match (action, whose) {
            (SessionAction::Participant | SessionAction::Watch, Whose::Here) => {
                join_token(app, peer, req, id, action, &admin).await
            }
            (SessionAction::Participant | SessionAction::Watch, Whose::Elsewhere(m)) => {
                Err(held_elsewhere(&m))
            }
            (SessionAction::End, whose) => end_session(app, peer, req, id, whose, &admin).await,
        },
    };
    api_answer(app, peer, name, None, answer)
}

fn not_live(id: u64) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "session_not_live",
        format!("no live session {id} on this vizor"),
    )
}

/// The console kind a participant of `live` connects to: the session's own for VNC;
/// for SPICE, the domain's VNC display (spice-server serves one client at a time, and
/// a second would disconnect the owner), for observers only.
async fn participant_kind(app: &App, live: &Live, role: Role) -> Result<ConsoleKind, ApiError> {
    if live.kind == ConsoleKind::Vnc {
        return Ok(ConsoleKind::Vnc);
    }
    let refuse = |error: String| ApiError::new(StatusCode::CONFLICT, "spice_not_watchable", error);
    if role != Role::Observer {
        return Err(refuse(
            "a SPICE session takes observers only: they watch through the domain's VNC display, whose keyboard is not SPICE's".into(),
        ));
    }
    let uuid = crate::token::parse_uuid(&live.uuid)
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "bad UUID"))?;
    match lookup(app, &live.host, DomainRef::Uuid(uuid), ConsoleKind::Vnc).await {
        Ok(_) => Ok(ConsoleKind::Vnc),
        Err(LookupError::NoGraphics { .. }) => Err(refuse(format!(
            "domain {} has no VNC display to watch its SPICE session through: spice-server serves one client at a time, and a second SPICE client would disconnect the owner. Add a VNC <graphics> to the domain to make its SPICE sessions watchable",
            live.domain
        ))),
        Err(e) => Err(api_lookup_failed(e)),
    }
}

/// `POST .../participants` and `POST .../watch`: a token that joins the live session.
async fn join_token(
    app: &App,
    peer: SocketAddr,
    req: Request<Incoming>,
    id: u64,
    action: SessionAction,
    admin: &str,
) -> Result<Resp, ApiError> {
    let watch = action == SessionAction::Watch;
    let asked: JoinRequest = body(req, watch.then(JoinRequest::default)).await?;
    let (role, user) = if watch {
        if asked.role.is_some() || asked.user.is_some() {
            return Err(bad(
                "a watch is the administrator's, as an observer: role and user are not taken",
            ));
        }
        (Role::Observer, admin.to_owned())
    } else {
        let role = asked
            .role
            .as_deref()
            .ok_or_else(|| bad("role is required: operator or observer"))?
            .parse::<Role>()
            .map_err(bad)?;
        let user = asked
            .user
            .clone()
            .ok_or_else(|| bad("user is required: who the participant is"))?;
        (role, user)
    };
    crate::token::check_user(&user).map_err(|e| bad(e.to_string()))?;
    let client = asked
        .client
        .as_deref()
        .map(|c| c.parse::<std::net::IpAddr>())
        .transpose()
        .map_err(|_| bad("client must be an IPv4 or IPv6 address"))?;
    let ttl = match asked.ttl.as_deref() {
        None => app.config.tokens.ttl,
        Some(t) => humantime::parse_duration(t).map_err(|e| bad(format!("ttl {t:?}: {e}")))?,
    };
    crate::token::check_ttl(ttl).map_err(bad)?;
    let clipboard = match asked.clipboard.as_deref() {
        None if role == Role::Observer => ClipboardWays::NONE,
        None => ClipboardWays::BOTH,
        Some(c) => c.parse::<ClipboardWays>().map_err(bad)?,
    };
    let view_only = asked.view_only.unwrap_or(false);
    if role == Role::Observer
        && (clipboard != ClipboardWays::NONE || asked.view_only == Some(false))
    {
        return Err(bad(
            "an observer reaches nothing: no clipboard, no input (ask for an operator)",
        ));
    }
    let max_duration = asked
        .max_duration
        .as_deref()
        .map(|d| humantime::parse_duration(d).map_err(|e| bad(format!("max_duration {d:?}: {e}"))))
        .transpose()?;
    let live = app.live().get(id).ok_or_else(|| not_live(id))?;
    if *live.state().borrow() != crate::live::State::Live {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "session_ending",
            format!("session {id} is ending"),
        ));
    }
    let kind = participant_kind(app, &live, role).await?;
    let uuid = crate::token::parse_uuid(&live.uuid)
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "bad UUID"))?;
    let owner = crate::token::parse_token_id(&live.token_id).ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "bad token id",
        )
    })?;
    let joins = Joins { session: id, owner };
    let policy = Policy::asked(
        kind,
        view_only || role == Role::Observer,
        clipboard,
        max_duration,
    )
    .map_err(bad)?;
    let grant = crate::token::Grant {
        host: &live.host,
        domain: &live.domain,
        uuid,
        kind,
        user: &user,
        client,
        ttl,
        role,
        joins: Some(joins),
        policy,
    };
    let crate::token::Issued { token, claims } =
        app.key.issue(&grant, unix_now()).map_err(|e| match e {
            crate::token::IssueError::Seal(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            }
            e => bad(e.to_string()),
        })?;
    let expires = UNIX_EPOCH + Duration::from_secs(claims.expires_at);
    let token_id = claims.token_id();
    let requester = peer.to_string();
    let audit_down = |e: std::io::Error| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_error",
            format!("the audit log cannot be written, so no token is issued: {e}"),
        )
    };
    // On record before anyone holds it: who asked, and what the token lets its holder do.
    app.audit()
        .record(&Event::AdminAction {
            admin,
            client: &requester,
            action: action.as_str(),
            session: id,
            token_id: Some(&token_id),
            role: Some(role.as_str()),
            user: Some(&user),
            reason: None,
            announced: Some(role != Role::Observer || app.config.oversight.announce),
            asked_at: None,
        })
        .await
        .map_err(audit_down)?;
    app.audit()
        .record(&Event::TokenIssued {
            token_id: &token_id,
            by: "api",
            requester: &requester,
            user: &user,
            domain: &live.domain,
            uuid: &live.uuid,
            host: (live.host != crate::config::DEFAULT_HOST).then_some(live.host.as_str()),
            kind,
            ttl_s: ttl.as_secs(),
            expires_at: humantime::format_rfc3339_seconds(expires).to_string(),
            bound_client: client.map(|c| c.to_string()),
            admin: Some(admin),
            role: Some(role.as_str()),
            joins: Some(id),
            view_only: policy.view_only,
            clipboard: (policy.clipboard != ClipboardWays::BOTH).then(|| policy.clipboard.as_str()),
            max_duration_s: policy.max_duration.map(|d| d.as_secs()),
        })
        .await
        .map_err(audit_down)?;
    app.metrics()
        .admin_actions_total
        .with_label_values(&[action.as_str()])
        .inc();
    info!(session = id, admin, role = %role, user, token = %token_id, requester = %peer, "participant token issued");
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "session": id,
            "role": role.as_str(),
            "user": user,
            "kind": kind.as_str(),
            "token": token,
            "ws_path": format!("/websockify?token={token}"),
            "console_url": format!("/console?token={token}"),
            "expires_at": humantime::format_rfc3339_seconds(expires).to_string(),
        }),
    ))
}

/// Checks an administrator's reason for ending a session: 1 to [`MAX_REASON_LEN`]
/// bytes, no control characters.
pub fn check_reason(reason: &str) -> Result<(), String> {
    if reason.trim().is_empty()
        || reason.len() > MAX_REASON_LEN
        || reason.chars().any(char::is_control)
    {
        return Err(format!(
            "reason must be 1 to {MAX_REASON_LEN} bytes, no control characters"
        ));
    }
    Ok(())
}

/// `DELETE /api/v1/sessions/{id}`: ends the session for every participant, on record
/// first.
async fn end_session(
    app: &App,
    peer: SocketAddr,
    req: Request<Incoming>,
    id: u64,
    whose: Whose,
    admin: &str,
) -> Result<Resp, ApiError> {
    let asked: EndRequest = body(req, None).await?;
    check_reason(&asked.reason).map_err(bad)?;
    let requester = peer.to_string();
    let member = match whose {
        Whose::Here => {
            return ended(end_here(app, &requester, id, admin, &asked.reason, None).await)
        }
        Whose::Elsewhere(member) => member,
    };
    let Some(shared) = &app.shared else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no shared state",
        ));
    };
    let replica = crate::state::ends::member_replica(&member).unwrap_or("?");
    match shared
        .ask_end(&member, admin, &asked.reason, &requester)
        .await
    {
        Ok(EndReply::Answered(answer)) => {
            let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
            if status.is_success() {
                warn!(session = id, replica, admin, reason = %asked.reason, requester = %peer, "a session of another replica ended by an administrator");
                return Ok(json(status, &answer.body));
            }
            // The holding replica's refusal, in its words (an end that cannot happen,
            // an audit log it cannot write).
            let reason = match answer.body["reason"].as_str() {
                Some("session_not_live") => "session_not_live",
                Some("session_ending") => "session_ending",
                Some("audit_error") => "audit_error",
                _ => "replica_refused",
            };
            let error = answer.body["error"].as_str().unwrap_or("refused");
            Err(ApiError::new(
                status,
                reason,
                format!("replica {replica}: {error}"),
            ))
        }
        Ok(EndReply::NoSuchReplica) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "replica_not_listening",
            format!("no process of replica {replica:?} listens on the shared state"),
        )),
        Ok(EndReply::NoAnswer) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "replica_no_answer",
            format!(
                "replica {replica} did not answer within {}: the session may or may not have ended, or its process is gone",
                humantime::format_duration(crate::state::END_WAIT)
            ),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "state_unavailable",
            e.to_string(),
        )),
    }
}

/// Where the session an administrator names is held.
pub(super) enum Whose {
    /// By this process.
    Here,
    /// By another process (of another replica, or of this one's name): its member.
    Elsewhere(String),
}

/// Which process holds session `id`: with `[state]`, sessions are named by the member
/// `GET /api/v1/sessions` lists (`?member=`), since every process numbers its own;
/// without, by the id alone.
pub(super) fn whose(app: &App, req: &Request<Incoming>, id: u64) -> Result<Whose, ApiError> {
    let member = super::query_param(req, "member");
    let Some(shared) = &app.shared else {
        return match member {
            None => Ok(Whose::Here),
            Some(_) => Err(bad(
                "this vizor shares no state ([state]): name the session by its id alone",
            )),
        };
    };
    let Some(member) = member else {
        return Err(bad(
            "with [state], name the session by the member GET /api/v1/sessions lists for it: ?member=REPLICA/MARK/ID (ids are each replica's own)",
        ));
    };
    if crate::state::ends::member_session(&member) != Some(id) {
        return Err(bad(format!(
            "the member {member:?} does not name session {id}"
        )));
    }
    Ok(if shared.is_mine(&member) {
        Whose::Here
    } else {
        Whose::Elsewhere(member)
    })
}

/// A session another process holds, for what only that process can do.
pub(super) fn held_elsewhere(member: &str) -> ApiError {
    let replica = crate::state::ends::member_replica(member).unwrap_or("?");
    ApiError::new(
        StatusCode::CONFLICT,
        "session_on_other_replica",
        format!("session {member} is held by replica {replica}: ask that replica (its own address) for this"),
    )
}

fn ended(answer: Result<serde_json::Value, ApiError>) -> Result<Resp, ApiError> {
    answer.map(|v| json(StatusCode::OK, &v))
}

/// Ends live session `id` of this replica, as administrator `admin` asked from
/// `requester` (through replica `asked_at`, when another passed it on): on record
/// first, then ended. The API's answer.
async fn end_here(
    app: &App,
    requester: &str,
    id: u64,
    admin: &str,
    reason: &str,
    asked_at: Option<&str>,
) -> Result<serde_json::Value, ApiError> {
    let live = app.live().get(id).ok_or_else(|| not_live(id))?;
    let ending = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "session_ending",
            format!("session {id} is ending already"),
        )
    };
    // An end that cannot happen is not put on record as one.
    if *live.state().borrow() != crate::live::State::Live {
        return Err(ending());
    }
    app.audit()
        .record(&Event::AdminAction {
            admin,
            client: requester,
            action: "end",
            session: id,
            token_id: None,
            role: None,
            user: None,
            reason: Some(reason),
            announced: None,
            asked_at,
        })
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_error",
                format!("the audit log cannot be written, so the session is not ended: {e}"),
            )
        })?;
    if !live.terminate(admin, reason) {
        // Its owner left between the check and now: on record as asked, and ended.
        return Err(ending());
    }
    app.metrics()
        .admin_actions_total
        .with_label_values(&["end"])
        .inc();
    warn!(
        session = id,
        admin, reason, requester, asked_at, "session ended by an administrator"
    );
    let participants = live.members().len();
    let mut answer = serde_json::json!({
        "session": id,
        "ended": true,
        "participants": participants,
    });
    if let Some(shared) = &app.shared {
        answer["replica"] = shared.replica().into();
    }
    Ok(answer)
}

/// Ends a session another replica asked this one to end, and says how it went (the
/// answer the API would have given).
pub(crate) async fn end_asked(app: &App, asked: crate::state::EndAsked) -> crate::state::EndAnswer {
    let (status, body) = match end_here(
        app,
        &asked.requester,
        asked.session,
        &asked.admin,
        &asked.reason,
        Some(&asked.from),
    )
    .await
    {
        Ok(body) => (StatusCode::OK.as_u16(), body),
        Err(e) => (
            e.status.as_u16(),
            serde_json::json!({"error": e.error, "reason": e.reason}),
        ),
    };
    crate::state::EndAnswer {
        id: asked.id,
        status,
        body,
    }
}
