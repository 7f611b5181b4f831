//! `POST /console/paste?token=` and `DELETE /console/paste?token=`: a console page's
//! "Paste as keys" ([`crate::paste`]). The page's token names its live connection, as
//! for its presence stream; the connection types the text.

use super::*;
use crate::paste::{Busy, MAX_CHARS};
use crate::token::Role;
use http_body_util::BodyExt;
use vizor_keys::layout::Layout;

/// The largest body: the text at four bytes a character, and the rest of the JSON.
const MAX_BODY: usize = MAX_CHARS * 4 + 1024;

/// What the page asks to be typed.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PasteRequest {
    text: String,
    /// `us`, `de` or `fr`: the guest's layout.
    layout: String,
}

pub(super) fn paste_route(method: &Method, path: &str) -> bool {
    (method == Method::POST || method == Method::DELETE) && path == "/console/paste"
}

fn refuse(status: StatusCode, reason: &str, error: impl Into<String>) -> Resp {
    json(
        status,
        &serde_json::json!({"error": error.into(), "reason": reason}),
    )
}

/// Serves a paste or its cancel.
pub(super) async fn console_paste(app: Arc<App>, peer: SocketAddr, req: Request<Incoming>) -> Resp {
    // A page of another origin must not type into a console whose link it learnt.
    if let Err(origin) = origin_allowed(&app.config.server.allowed_origins, &req) {
        warn!(client = %peer, origin = %origin, "paste refused: origin not allowed");
        return refuse(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this page's origin may not type into consoles",
        );
    }
    let (claims, live, me) = match console_connection(&app, peer, &req, "console paste") {
        Ok(c) => c,
        Err(refused) => return *refused,
    };
    let session = me.as_ref().map_or(live.id, |m| m.session);
    let role = me.as_ref().map_or(Role::Owner, |m| m.role);
    // The link is spent: what admits it is the connection it opened, and typing comes
    // from that connection's address alone (a copied link, from anywhere else, types
    // nothing).
    let client = me.as_ref().map_or(live.client, |m| m.client);
    if client.ip() != peer.ip() {
        warn!(client = %peer, session, "paste refused: not from the console's address");
        return refuse(
            StatusCode::FORBIDDEN,
            "wrong_client",
            "a paste comes from the computer whose console it is",
        );
    }
    // Typing is input; the text is the participant's clipboard going to the VM.
    if role == Role::Observer || claims.policy.view_only {
        return refuse(
            StatusCode::FORBIDDEN,
            "no_input",
            "this console is view only: it cannot type",
        );
    }
    if !claims.policy.clipboard.to_vm {
        return refuse(
            StatusCode::FORBIDDEN,
            "clipboard_not_to_vm",
            "this link does not let the clipboard reach the VM",
        );
    }
    let Some(seat) = live.seat_of(session) else {
        return refuse(
            StatusCode::CONFLICT,
            "cannot_type",
            "this console cannot take a paste now (it is not connected to the VM's keyboard)",
        );
    };
    if req.method() == Method::DELETE {
        let cancelled = seat.cancel();
        info!(session, cancelled, "paste cancel asked");
        return json(StatusCode::OK, &serde_json::json!({"cancelled": cancelled}));
    }
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    let bytes = match limited.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_long",
                format!("a paste is at most {MAX_CHARS} characters"),
            )
        }
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the request body could not be read: {e}"),
            )
        }
    };
    let asked: PasteRequest = match serde_json::from_slice(&bytes) {
        Ok(a) => a,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("bad JSON body: {e}"),
            )
        }
    };
    let Some(layout) = Layout::from_name(&asked.layout) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "bad_layout",
            "the layout is one of us, de, fr",
        );
    };
    let chars = crate::paste::chars(&asked.text);
    if chars == 0 {
        return refuse(StatusCode::BAD_REQUEST, "empty", "there is nothing to type");
    }
    if chars > MAX_CHARS {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_long",
            format!("a paste is at most {MAX_CHARS} characters, this is {chars}"),
        );
    }
    if !seat.accepts(layout) {
        let why = if seat.accepts(Layout::Us) {
            "libvirt gives this console QEMU's en-us keymap: only the US layout types right"
        } else {
            "libvirt gives this console a keymap vizor does not model: it cannot take a paste"
        };
        return refuse(StatusCode::CONFLICT, "keymap", why);
    }
    if let Err(e) = layout.plan(&asked.text, false) {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "untypeable",
            e.to_string(),
        );
    }
    match seat.paste(asked.text, layout) {
        Ok(()) => {
            info!(session, chars, layout = layout.name(), "paste queued");
            json(
                StatusCode::ACCEPTED,
                &serde_json::json!({"chars": chars, "layout": layout.name()}),
            )
        }
        Err(Busy::Typing) => refuse(
            StatusCode::CONFLICT,
            "typing",
            "a paste is being typed: wait for it, or cancel it",
        ),
        Err(Busy::Gone) => refuse(StatusCode::GONE, "ended", "the console has ended"),
    }
}
