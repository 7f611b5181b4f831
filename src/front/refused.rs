//! Refusals of clients before they hold a session: a refused token, a throttled
//! client, an interval's refusals summed up. Each is counted, and recorded once per
//! client and reason an interval, so a flood costs a bounded amount.

use super::*;

/// Counts and audits a refused token, wherever it was presented (`what`: the console
/// page, a console, a SPICE channel), and counts it against the client's allowance of
/// failures. It is logged with its record: a flood is summed up, not logged per line.
pub(super) fn token_refused(
    app: &App,
    peer: SocketAddr,
    reason: &'static str,
    token_id: Option<&str>,
    what: &'static str,
    detail: &str,
) {
    app.metrics()
        .auth_refusals_total
        .with_label_values(&["token", reason])
        .inc();
    let record = || {
        warn!(client = %peer, reason, detail, token = token_id.unwrap_or("-"),
            "{what} refused (more of this client and reason this interval are counted, not logged)");
        app.audit().record_refusal(&Event::TokenRefused {
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
pub(super) fn refusal(
    app: &App,
    peer: SocketAddr,
    reason: &'static str,
    detail: impl FnOnce() -> bool,
) {
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
        app.audit().record_refusal(&Event::RefusalSummary {
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
pub(super) fn failed_attempt(app: &App, peer: SocketAddr) {
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
        app.audit().record_nowait(&Event::ClientThrottled {
            client: &client,
            failures: app.config.limits.failed_tokens_per_client,
            retry_after_s: retry.as_secs(),
        });
    }
}

/// A `429 Too Many Requests` for a client that failed too many tokens lately; its
/// token is not even read.
pub(super) fn throttled(app: &App, peer: SocketAddr) -> Option<Resp> {
    let wait = app
        .failed_tokens
        .check(peer.ip(), std::time::Instant::now())
        .err()?;
    app.metrics()
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
pub(super) fn token_message(e: &TokenError) -> &'static str {
    match e {
        TokenError::Expired { .. } => "token expired",
        TokenError::Replayed => "token already used",
        TokenError::ReplayCacheFull => "too many sessions starting; try again",
        TokenError::StateUnavailable => "vizor cannot start sessions now; try again",
        TokenError::WrongClient { .. } => "token issued for another address",
        _ => "invalid token",
    }
}
