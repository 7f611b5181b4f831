//! `GET /api/v1/sessions/{id}/events`: a live session's audit records as they are
//! sealed, as Server-Sent Events, with the text its keys type (admin bearer). The
//! stream ends a moment after the session does.

use super::*;
use crate::audit::follow::{Follow, Shown};
use std::pin::Pin;
use std::task::{Context, Poll};

/// A response body written by a task: each message one chunk. It holds the stream's
/// place among the open ones until the connection lets go of it, so a reader that
/// stopped reading keeps counting.
pub struct Streamed {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    _open: Open,
}

impl hyper::body::Body for Streamed {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// Every response body: whole, or streamed.
pub type Body = http_body_util::Either<Full<Bytes>, Streamed>;

/// Event streams open at once, at most: each holds a follower of the audit feed.
pub const MAX_STREAMS: usize = 32;

/// How long a stream goes on after its session ended, for the records of its end.
const DRAIN: Duration = Duration::from_secs(2);

/// A comment line this often keeps proxies from closing a quiet stream.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// The answer of an event stream whose task writes to `rx`: not cached, not buffered by
/// a reverse proxy (nginx's `X-Accel-Buffering`); `open` counts it while it lasts.
fn sse_response(rx: tokio::sync::mpsc::Receiver<Bytes>, open: Open) -> Response<Body> {
    let mut r = Response::new(http_body_util::Either::Right(Streamed { rx, _open: open }));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    h.insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    r
}

/// Whether `path` and `method` ask for a session's event stream: its id.
pub(super) fn events_route<'a>(method: &Method, path: &'a str) -> Option<&'a str> {
    let rest = path.strip_prefix("/api/v1/sessions/")?;
    let id = rest.strip_suffix("/events")?;
    (method == Method::GET && !id.contains('/')).then_some(id)
}

/// One Server-Sent Event.
fn sse(event: &str, data: &str) -> Bytes {
    // `data` is one line of JSON: no newline to split.
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// Console pages' presence streams open at once, at most (one per console
/// connection is the use).
pub const MAX_PRESENCE_STREAMS: usize = 4096;

/// The most presence streams one console link opens at once.
pub const MAX_PRESENCE_PER_TOKEN: usize = 4;

/// Counts an open stream while held: an administrator's event stream, or a console
/// page's presence stream (then also per token id).
pub struct Open(Arc<App>, bool, Option<String>);

impl Open {
    fn counter(app: &App, presence: bool) -> &AtomicUsize {
        if presence {
            &app.presence_streams
        } else {
            &app.event_streams
        }
    }

    /// Takes a place, if there is one under `max` (and, for a presence stream, under
    /// [`MAX_PRESENCE_PER_TOKEN`] for `token_id`).
    fn take(app: &Arc<App>, presence: bool, max: usize, token_id: Option<String>) -> Option<Open> {
        if let Some(t) = &token_id {
            let mut per = app.presence_per_token.lock().ok()?;
            let n = per.entry(t.clone()).or_default();
            if *n >= MAX_PRESENCE_PER_TOKEN {
                return None;
            }
            *n += 1;
        }
        let open = Open(app.clone(), presence, token_id);
        let c = Self::counter(app, presence);
        if c.fetch_add(1, Ordering::Relaxed) >= max {
            // Dropping `open` gives both back.
            return None;
        }
        Some(open)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        Self::counter(&self.0, self.1).fetch_sub(1, Ordering::Relaxed);
        if let Some(t) = &self.2 {
            if let Ok(mut per) = self.0.presence_per_token.lock() {
                if let Some(n) = per.get_mut(t) {
                    *n -= 1;
                    if *n == 0 {
                        per.remove(t);
                    }
                }
            }
        }
    }
}

/// Sends `chunk` unless the reader took nothing for `within`: false when the stream
/// is over.
async fn send(tx: &tokio::sync::mpsc::Sender<Bytes>, chunk: Bytes, within: Duration) -> bool {
    matches!(
        tokio::time::timeout(within, tx.send(chunk)).await,
        Ok(Ok(()))
    )
}

/// Serves `GET /api/v1/sessions/{id}/events`.
pub(super) async fn events(
    app: Arc<App>,
    peer: SocketAddr,
    req: &Request<Incoming>,
    id: &str,
) -> Response<Body> {
    let whole = |r: Resp| r.map(http_body_util::Either::Left);
    if let Some(refused) = throttled(&app, peer) {
        return whole(refused);
    }
    let answer = |e: ApiError| whole(api_answer(&app, peer, "events", None, Err(e)));
    let admin = match admin_check(&app, req) {
        Ok(a) => a,
        Err(e) => return answer(e),
    };
    let Ok(id) = id.parse::<u64>() else {
        return answer(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the session id must be a number",
        ));
    };
    match whose(&app, req, id) {
        Ok(Whose::Here) => {}
        Ok(Whose::Elsewhere(m)) => return answer(held_elsewhere(&m)),
        Err(e) => return answer(e),
    }
    let Some(live) = app.live().get(id) else {
        return answer(ApiError::new(
            StatusCode::NOT_FOUND,
            "session_not_live",
            format!("no live session {id} on this vizor"),
        ));
    };
    let Some(open) = Open::take(&app, false, MAX_STREAMS, None) else {
        return answer(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            format!("{MAX_STREAMS} event streams are open already"),
        ));
    };
    // Subscribed before the answer: nothing sealed from now on is missed.
    let mut feed = app.audit().follow();
    // Watching what is typed is an administrator's action like any other: on record
    // before the first event.
    let requester = peer.to_string();
    let recorded = app
        .audit()
        .record(&Event::AdminAction {
            admin: &admin,
            client: &requester,
            action: "follow",
            session: id,
            token_id: None,
            role: None,
            user: None,
            reason: None,
            announced: None,
            asked_at: None,
        })
        .await;
    if let Err(e) = recorded {
        return answer(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_error",
            format!("the audit log cannot be written, so the session is not followed: {e}"),
        ));
    }
    app.metrics()
        .admin_actions_total
        .with_label_values(&["follow"])
        .inc();
    let mut follow = Follow::new(Some(id));
    // Who is on it already: their starts were sealed before this stream.
    let seed = |follow: &mut Follow, live: &crate::live::Live| {
        follow.knows(live.id, &live.user, false);
        for m in live.members() {
            follow.knows(m.session, &m.user, true);
        }
    };
    seed(&mut follow, &live);
    let mut state = live.state();
    let ended_already = *state.borrow() != crate::live::State::Live;
    let within = app.config.limits.send_timeout;
    app.metrics()
        .api_requests_total
        .with_label_values(&["events", "200"])
        .inc();
    info!(session = id, admin, requester = %peer, "event stream opened");
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let task_app = app.clone();
    tokio::spawn(async move {
        let app = task_app;
        let hello = serde_json::json!({"session": id}).to_string();
        if !send(&tx, sse("open", &hello), within).await {
            return;
        }
        let mut ends = ended_already.then(|| tokio::time::Instant::now() + DRAIN);
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        loop {
            let drained = async {
                match ends {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                line = feed.recv() => {
                    let line = match line {
                        Ok(line) => line,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            // Whoever joined meanwhile is followed from now on.
                            seed(&mut follow, &live);
                            let missed = serde_json::json!({"missed": n}).to_string();
                            if !send(&tx, sse("lagged", &missed), within).await {
                                return;
                            }
                            continue;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    };
                    let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) else {
                        continue;
                    };
                    for shown in follow.record(&record) {
                        let out = match shown {
                            Shown::Record => sse("record", &line),
                            Shown::Text { session, user, text } => sse(
                                "text",
                                &serde_json::json!({"session": session, "user": user, "text": text})
                                    .to_string(),
                            ),
                        };
                        if !send(&tx, out, within).await {
                            return;
                        }
                    }
                }
                changed = state.changed(), if ends.is_none() => {
                    if changed.is_err() || *state.borrow() != crate::live::State::Live {
                        ends = Some(tokio::time::Instant::now() + DRAIN);
                    }
                }
                _ = drained => break,
                _ = keepalive.tick() => {
                    // An administrator whose key went (SIGHUP) follows no more.
                    if !app.admins().is_some_and(|a| a.named(&admin)) {
                        let gone = serde_json::json!({"admin": admin}).to_string();
                        let _ = send(&tx, sse("revoked", &gone), within).await;
                        return;
                    }
                    if !send(&tx, Bytes::from_static(b": keepalive\n\n"), within).await {
                        return;
                    }
                }
            }
        }
        let end = serde_json::json!({"session": id}).to_string();
        let _ = send(&tx, sse("end", &end), within).await;
    });
    sse_response(rx, open)
}

/// Whether `path` is the console page's presence stream.
pub(super) fn console_events_route(method: &Method, path: &str) -> bool {
    method == Method::GET && path == "/console/events"
}

/// The live connection a spent token holds: its session, and its own place there
/// (`None` for the owner).
fn connection_of(
    app: &App,
    claims: &Claims,
) -> Option<(Arc<crate::live::Live>, Option<crate::live::Member>)> {
    let token_id = claims.token_id();
    match &claims.joins {
        None => app
            .live()
            .list()
            .into_iter()
            .find(|l| l.token_id == token_id)
            .map(|l| (l, None)),
        Some(j) => {
            let live = app.live().joinable(j.session, &j.owner_token_id()).ok()?;
            let me = live
                .members()
                .into_iter()
                .find(|m| m.token_id == token_id)?;
            Some((live, Some(me)))
        }
    }
}

/// What a console page is told: who it is on the console, what it may do, how long
/// it has, and who else is there (announced participants).
fn presence(
    live: &crate::live::Live,
    me: Option<&crate::live::Member>,
    claims: &Claims,
) -> serde_json::Value {
    let ends_in_ms = claims.policy.max_duration.map(|d| {
        let age = match me {
            None => live.age(),
            Some(m) => m.since.elapsed().unwrap_or_default(),
        };
        d.saturating_sub(age).as_millis() as u64
    });
    let mut others = Vec::new();
    if me.is_some() {
        others.push(serde_json::json!({"user": live.user, "role": "owner"}));
    }
    for m in live.members() {
        if m.announced && me.is_none_or(|me| me.session != m.session) {
            others.push(serde_json::json!({"user": m.user, "role": m.role.as_str()}));
        }
    }
    serde_json::json!({
        "you": {
            "user": claims.user,
            "role": claims.role.as_str(),
            "view_only": claims.policy.view_only || claims.role == crate::token::Role::Observer,
            "clipboard": claims.policy.clipboard.as_str(),
            "ends_in_ms": ends_in_ms,
        },
        "others": others,
    })
}

/// The live connection a console page's request names by its token (`?token=`): the
/// token's claims, its session, and the participant it is (`None`: the owner). Refused
/// (answered) when the client is throttled, or no live connection holds the token.
pub(super) fn console_connection(
    app: &App,
    peer: SocketAddr,
    req: &Request<Incoming>,
    what: &'static str,
) -> Result<(Claims, Arc<crate::live::Live>, Option<crate::live::Member>), Box<Resp>> {
    if let Some(refused) = throttled(app, peer) {
        return Err(Box::new(refused));
    }
    let Some(token) = query_param(req, "token").filter(|t| !t.is_empty()) else {
        return Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            "a token is required\n",
        )));
    };
    // Spent already, and perhaps past its expiry: what admits it here is a live
    // connection holding it.
    let claims = match app.key.open_spent(&token) {
        Ok(c) => c,
        Err(e) => {
            token_refused(app, peer, e.reason(), None, what, &e.to_string());
            return Err(Box::new(text(
                StatusCode::FORBIDDEN,
                "not a valid console link\n",
            )));
        }
    };
    // A token bound to an address is heard from that address alone, as on its socket.
    if let Err(e) = claims.admits(peer.ip()) {
        token_refused(
            app,
            peer,
            e.reason(),
            Some(&claims.token_id()),
            what,
            &e.to_string(),
        );
        return Err(Box::new(text(
            StatusCode::FORBIDDEN,
            "not a valid console link\n",
        )));
    }
    let Some((live, me)) = connection_of(app, &claims) else {
        return Err(Box::new(text(
            StatusCode::NOT_FOUND,
            "no live console holds this link\n",
        )));
    };
    Ok((claims, live, me))
}

/// `GET /console/events?token=`: for the console page whose token holds a live
/// connection, Server-Sent Events `presence` (who it is, what it may do, time left,
/// who else is on the console) at once and at every change, until the connection ends.
pub(super) async fn console_events(
    app: Arc<App>,
    peer: SocketAddr,
    req: &Request<Incoming>,
) -> Response<Body> {
    let whole = |r: Resp| r.map(http_body_util::Either::Left);
    let (claims, live, me) = match console_connection(&app, peer, req, "console events") {
        Ok(c) => c,
        Err(refused) => return whole(*refused),
    };
    let Some(open) = Open::take(&app, true, MAX_PRESENCE_STREAMS, Some(claims.token_id())) else {
        return whole(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many console pages are open\n",
        ));
    };
    // Counted by its own limits (per link, and in all) from now on, not as one of the
    // client's connections: a user with many consoles open keeps room for more.
    if let Some(c) = req.extensions().get::<Counted>() {
        c.release();
    }
    let within = app.config.limits.send_timeout;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    tokio::spawn(async move {
        let mut roster = live.roster();
        let mut state = live.state();
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        let session = me.as_ref().map(|m| m.session);
        // A paste this page's connection types: how far it is, as it goes.
        // (`_hold` keeps `still` open: a receiver that never changes.) The seat comes
        // when the connection starts relaying, which may be after this stream opens:
        // seating wakes this loop (the roster changes).
        let (_hold, still) = watch::channel(None);
        let mut paste = still.clone();
        let mut seated = false;
        // Sent when it changes, and only then: an unannounced observer's coming and
        // going changes nothing a page is told.
        let mut told = String::new();
        loop {
            if !seated {
                if let Some(seat) = live.seat_of(session.unwrap_or(live.id)) {
                    paste = seat.progress();
                    seated = true;
                }
            }
            // Still on the console?
            let here = *state.borrow() == crate::live::State::Live
                && session.is_none_or(|s| live.members().iter().any(|m| m.session == s));
            if !here {
                break;
            }
            let now = live
                .members()
                .into_iter()
                .find(|m| Some(m.session) == session);
            let info = presence(&live, now.as_ref(), &claims).to_string();
            if info != told {
                if !send(&tx, sse("presence", &info), within).await {
                    return;
                }
                told = info;
            }
            tokio::select! {
                r = roster.changed() => if r.is_err() { break },
                r = state.changed() => if r.is_err() { break },
                r = paste.changed() => {
                    if r.is_err() {
                        // The connection's seat is gone: it is ending, or its browser
                        // dropped and may come back on a new connection, which takes
                        // a new seat (and wakes this loop).
                        paste = still.clone();
                        seated = false;
                        continue;
                    }
                    let now = *paste.borrow_and_update();
                    let data = match now {
                        Some(p) => serde_json::json!({"typed": p.typed, "total": p.total}),
                        None => serde_json::json!({"done": true}),
                    };
                    if !send(&tx, sse("paste", &data.to_string()), within).await {
                        return;
                    }
                }
                _ = keepalive.tick() => {
                    if !send(&tx, Bytes::from_static(b": keepalive\n\n"), within).await {
                        return;
                    }
                }
            }
        }
        let _ = send(&tx, sse("end", "{}"), within).await;
    });
    sse_response(rx, open)
}
