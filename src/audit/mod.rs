//! The audit trail: JSON Lines appended to `[audit] path`, one object per event, each
//! sealed into an HMAC chain ([`chain`]) by one writer thread. A key event is written
//! before the relay forwards it to the VM.
//!
//! Records carry no secret: tokens appear by id only, clipboard contents by length and
//! SHA-256, and key events as `[audit] keystrokes` allows.

pub mod chain;
pub mod follow;
pub mod review;
pub mod spent;
mod writer;

pub use chain::ChainKey;

use crate::config::{AuditConfig, ClipboardAudit, Keystrokes, OnError};
use crate::token::ConsoleKind;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use vizor_rfb::keysym::{keysym_class, keysym_name};

/// One audit record.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event<'a> {
    /// A console session began.
    SessionStart {
        /// Session id.
        session: u64,
        /// Token id (never the token).
        token_id: &'a str,
        /// User the token was issued to.
        user: &'a str,
        /// Domain name.
        domain: &'a str,
        /// Domain UUID.
        uuid: &'a str,
        /// Console kind.
        kind: ConsoleKind,
        /// The browser's address.
        client: &'a str,
        /// The libvirt host the domain is on; absent for the host `default`
        /// (`[libvirt] uri`).
        #[serde(skip_serializing_if = "Option::is_none")]
        host: Option<&'a str>,
        /// Where the console listens.
        upstream: &'a str,
        /// Whether vizor's connection to it is inside TLS with QEMU's certificate
        /// verified (`[upstream_tls]`).
        upstream_tls: bool,
        /// Whether vizor opened the console with the password libvirt stores: false
        /// for a console without one, which anyone reaching its port opens too.
        vm_password: bool,
        /// The SPICE channel (`spice:main:0`...); absent for VNC.
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
        /// A participant's connection: its role (`operator`, `observer`); absent for
        /// a session's owner.
        #[serde(skip_serializing_if = "Option::is_none")]
        role: Option<&'static str>,
        /// A participant's connection: the session it joined.
        #[serde(skip_serializing_if = "Option::is_none")]
        joins: Option<u64>,
        /// A participant the others are not told about (`[oversight] announce =
        /// false`).
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        unannounced: bool,
    },
    /// A key was pressed or released: named by the key QEMU acts on.
    Key {
        /// Session id.
        session: u64,
        /// Pressed (true) or released.
        down: bool,
        /// The X11 keysym the browser sent (VNC; absent when keystrokes are redacted).
        #[serde(skip_serializing_if = "Option::is_none")]
        keysym: Option<u32>,
        /// The name of the key QEMU acts on (`a`, `Shift_L`, `KP_8`, `Up`), as a US
        /// layout labels it; absent when keystrokes are redacted or the number names no
        /// key. With a keymap vizor does not model, the keysym's name.
        #[serde(skip_serializing_if = "Option::is_none")]
        key: Option<String>,
        /// printable, control, function, modifier or unknown: of the key QEMU acts on.
        class: &'static str,
        /// QEMU's number for the key it acts on (PC set 1, 0x80 added for 0xE0 keys).
        #[serde(skip_serializing_if = "Option::is_none")]
        scancode: Option<u32>,
        /// How QEMU read the event: `keycode` (VNC extended key event), `keysym` (VNC,
        /// through QEMU's keymap), `scancode` (SPICE); absent for a release QEMU or
        /// vizor made when a client left.
        #[serde(skip_serializing_if = "Option::is_none")]
        via: Option<&'static str>,
        /// The keysym is not one a US layout produces with the key QEMU acts on: the
        /// browser's keysym and the key that reached the VM disagree (absent when
        /// keystrokes are redacted: on a non-US layout it marks which keys differ).
        #[serde(skip_serializing_if = "is_false")]
        mismatch: bool,
        /// The keysym's name, when it disagrees with the key (`mismatch`).
        #[serde(skip_serializing_if = "Option::is_none")]
        keysym_name: Option<String>,
        /// Why QEMU passed nothing to the guest for it: `no_key`, `not_pressed`
        /// (a release of a key not down) or `console_switch` (Ctrl+Alt+digit over VNC).
        #[serde(skip_serializing_if = "Option::is_none")]
        ignored: Option<&'static str>,
        /// Not the browser's own event: `console_switch` (QEMU released the key
        /// itself), `lock_request` (vizor's presses for a SPICE KEY_MODIFIERS request),
        /// `disconnect` (QEMU or spice-server released it as a client left) or `reset`
        /// (vizor cleared QEMU's scancode decoder as a SPICE inputs channel linked).
        #[serde(skip_serializing_if = "Option::is_none")]
        origin: Option<&'static str>,
        /// The console's keymap, when it is one vizor does not model (QEMU then maps the
        /// keysym by it; `key` is the keysym's name).
        #[serde(skip_serializing_if = "Option::is_none")]
        keymap: Option<&'a str>,
    },
    /// The keyboard lock state reported to vizor (at the start and on each change).
    Locks {
        /// Session id.
        session: u64,
        /// Who reported it: `qemu` (the guest's LEDs: QEMU's VNC LED state, SPICE's
        /// INPUTS_INIT) or `spice_server` (SPICE's KEY_MODIFIERS, which may be
        /// spice-server's own view of the locks rather than the guest's LEDs).
        source: &'static str,
        /// Caps Lock.
        caps: bool,
        /// Num Lock.
        num: bool,
        /// Scroll Lock.
        scroll: bool,
    },
    /// Clipboard contents crossed the proxy.
    Clipboard {
        /// Session id.
        session: u64,
        /// browser_to_vm or vm_to_browser.
        direction: &'static str,
        /// RFB: text, rtf, html, dib, files (plain cut text is text); SPICE: text, png, bmp, tiff, jpeg, files, none, unknown
        /// (the `VD_AGENT_CLIPBOARD_*` type).
        format: &'static str,
        /// Bytes of clipboard contents.
        length: usize,
        /// SHA-256 of the contents, hex.
        sha256: String,
        /// The contents, with `[audit] clipboard = "content"`, for text formats.
        #[serde(skip_serializing_if = "Option::is_none")]
        content: Option<String>,
    },
    /// Clipboard contents beyond `[limits] vm_message_max` were dropped: they did not
    /// reach the other side, and the session went on.
    ClipboardDropped {
        /// Session id.
        session: u64,
        /// vm_to_browser.
        direction: &'static str,
        /// Bytes of contents dropped.
        length: u64,
    },
    /// A console session ended.
    SessionEnd {
        /// Session id.
        session: u64,
        /// How long it lasted, in milliseconds.
        duration_ms: u64,
        /// Bytes from the browser to the VM.
        bytes_browser_to_vm: u64,
        /// Bytes from the VM to the browser.
        bytes_vm_to_browser: u64,
        /// Why it ended, in words.
        reason: std::borrow::Cow<'a, str>,
        /// Why it ended, as a stable label (`browser_closed`, `upstream_auth`, ...).
        cause: &'static str,
        /// Who ended it: browser, vm, vizor or administrator.
        ended_by: &'static str,
        /// Median server-ping to client-pong round trip (SPICE main channel).
        #[serde(skip_serializing_if = "Option::is_none")]
        round_trip_ms: Option<f64>,
        /// The session's recording (`[audit] record_dir`): file, length, SHA-256.
        #[serde(skip_serializing_if = "Option::is_none")]
        recording: Option<crate::recording::Finished>,
        /// The SPICE channel that ended (`spice:main:0`...); absent for VNC. A SPICE
        /// session ends when its main channel does.
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
        /// The administrator who ended it, when one did.
        #[serde(skip_serializing_if = "Option::is_none")]
        admin: Option<&'a str>,
    },
    /// The browser's connection dropped without a close frame (a network blip): its
    /// connection to QEMU has closed (QEMU's key releases are on record before this),
    /// and the session waits for its console page to resume it.
    SessionDrop {
        /// Session id (the connection that dropped).
        session: u64,
        /// The browser's address.
        client: &'a str,
        /// What was seen: `browser_closed` (the connection ended without a close
        /// frame), `browser_stalled` (it took nothing for the send timeout),
        /// `replaced` (a resume came while it still looked open).
        cause: &'static str,
        /// How long the session waits to be resumed, in milliseconds.
        window_ms: u64,
        /// The recording of the connection that dropped (`[audit] record_dir`).
        #[serde(skip_serializing_if = "Option::is_none")]
        recording: Option<crate::recording::Finished>,
    },
    /// A console page resumed its session on a new connection, with the credential
    /// vizor gave it; the session id stays the same.
    SessionResume {
        /// Session id.
        session: u64,
        /// The new connection's address (the same as the session's).
        client: &'a str,
        /// Which resume of the session this is (1 for the first).
        rotation: u32,
        /// How long the session was parked, in milliseconds.
        parked_ms: u64,
        /// The new connection to QEMU is TLS (VeNCrypt X.509).
        upstream_tls: bool,
        /// QEMU checked the password libvirt stores.
        vm_password: bool,
    },
    /// Input a participant may not give (an observer's, or a view-only token's) was
    /// dropped: one record per burst of it.
    InputDropped {
        /// Session id (the participant's connection).
        session: u64,
        /// Key events dropped.
        keys: u32,
        /// Pointer events dropped.
        pointer: u32,
        /// Other input dropped (desktop size, xvp).
        other: u32,
        /// Clipboard contents toward the VM dropped.
        clipboard: u32,
        /// Their bytes.
        clipboard_bytes: u64,
        /// From the burst's first event to its last, in milliseconds.
        duration_ms: u64,
    },
    /// A paste typed as keys ("Paste as keys") started or ended; its keys are `key`
    /// records with `origin: "paste"` between the two.
    Paste {
        /// Session id (the connection that typed it).
        session: u64,
        /// `started`, `done`, `cancelled`, or `interrupted` (the session ended first).
        status: &'static str,
        /// The guest layout it was typed for (`us`, `de`, `fr`).
        layout: &'static str,
        /// Characters in the text.
        chars: usize,
        /// Characters typed (at the end).
        #[serde(skip_serializing_if = "Option::is_none")]
        typed: Option<usize>,
        /// SHA-256 of the text, hex (at the start).
        #[serde(skip_serializing_if = "Option::is_none")]
        sha256: Option<&'a str>,
    },
    /// A pointer button was pressed (motion and releases are not recorded).
    Button {
        /// Session id.
        session: u64,
        /// left, middle, right, wheel_up, wheel_down, wheel_left, wheel_right, back,
        /// forward, or "button N".
        button: &'static str,
        /// Pointer position (RFB; SPICE sends positions separately).
        #[serde(skip_serializing_if = "Option::is_none")]
        x: Option<u16>,
        /// Pointer position.
        #[serde(skip_serializing_if = "Option::is_none")]
        y: Option<u16>,
    },
    /// A peer broke the protocol; the session ended.
    ProtocolError {
        /// Session id.
        session: u64,
        /// browser_to_vm or vm_to_browser.
        direction: &'a str,
        /// A stable cause.
        reason: &'a str,
        /// What was wrong.
        detail: &'a str,
    },
    /// Something failed toward the VM: its lookup, connection, authentication, or the
    /// connection itself; the session ended or never started.
    UpstreamFailure {
        /// Session id.
        session: u64,
        /// The domain.
        domain: &'a str,
        /// A stable cause (`upstream_auth`, `not_running`, `upstream_connect`...).
        reason: &'a str,
        /// What happened.
        detail: &'a str,
    },
    /// A token was spent: it opens no other session, on this process nor, restored
    /// from this record at start, after a restart. Written before the session goes on.
    TokenUsed {
        /// The token's id.
        token_id: &'a str,
        /// When it expires (RFC 3339): until then it stays spent.
        expires_at: String,
        /// The user it was issued to.
        user: &'a str,
        /// The domain it names.
        domain: &'a str,
        /// Its console kind.
        kind: ConsoleKind,
        /// The browser's address.
        client: &'a str,
    },
    /// A token was refused.
    TokenRefused {
        /// The browser's address.
        client: &'a str,
        /// Why (a stable label).
        reason: &'static str,
        /// The token's id, when it opened.
        #[serde(skip_serializing_if = "Option::is_none")]
        token_id: Option<&'a str>,
    },
    /// A WebSocket upgrade from a page of a foreign origin was refused.
    OriginRefused {
        /// The browser's address.
        client: &'a str,
        /// The page's origin (at most 200 characters).
        origin: &'a str,
    },
    /// A session with a good token was refused by a `[limits]` bound.
    SessionRefused {
        /// The session id it would have had.
        session: u64,
        /// The browser's address.
        client: &'a str,
        /// The token's user.
        user: &'a str,
        /// The domain.
        domain: &'a str,
        /// The token's id.
        token_id: &'a str,
        /// Which limit (a stable label).
        reason: &'static str,
    },
    /// A SPICE channel vizor does not relay (`[spice] allow_channels`) was refused at
    /// its link; nothing of it reached the VM.
    ChannelRefused {
        /// The session it would have joined.
        session: u64,
        /// The browser's address.
        client: &'a str,
        /// The channel, as `type:id` (such as `usbredir:0`).
        channel: &'a str,
    },
    /// A file moved through the SPICE guest agent: one record when it starts (before
    /// any of it reaches the receiver), one when it ends.
    FileTransfer {
        /// Session id.
        session: u64,
        /// browser_to_vm or vm_to_browser.
        direction: &'static str,
        /// The sender's id of the transfer (absent on a refusal that came before the
        /// whole start message).
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u32>,
        /// The file's name, as the sender's key file gives it (at most 255 bytes).
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<&'a str>,
        /// The file's size, as the sender's key file gives it.
        #[serde(skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
        /// started, refused, incomplete, or the receiver's (or a cancelling
        /// sender's) final status: success, cancelled, error, not_enough_space...
        status: &'a str,
        /// File bytes that passed.
        bytes: u64,
        /// SHA-256 of those bytes, hex (end records).
        #[serde(skip_serializing_if = "Option::is_none")]
        sha256: Option<&'a str>,
    },
    /// Refusals of one unauthenticated client in one interval (`[audit]
    /// refusal_summary_interval`) beyond the first, which has its own record.
    RefusalSummary {
        /// The client (an address; IPv6: its /64), or `*` for clients beyond the
        /// number vizor counts apart.
        client: &'a str,
        /// The interval, in seconds.
        interval_s: u64,
        /// Refusals in it, the recorded first one included.
        refused: u64,
        /// Those by reason (the labels of `token_refused`, `origin_not_allowed`,
        /// `throttled`).
        reasons: std::collections::BTreeMap<&'static str, u64>,
        /// Detailed records that were not written (the audit queue was half full).
        #[serde(skip_serializing_if = "is_zero")]
        not_recorded: u64,
    },
    /// The management API issued a token (before the answer carrying it is sent).
    TokenIssued {
        /// The token's id.
        token_id: &'a str,
        /// Who asked: `api` (the admin key).
        by: &'static str,
        /// The address the request came from.
        requester: &'a str,
        /// The user the token names.
        user: &'a str,
        /// The domain it opens, and its UUID.
        domain: &'a str,
        /// The domain's UUID.
        uuid: &'a str,
        /// The libvirt host the domain is on; absent for the host `default`.
        #[serde(skip_serializing_if = "Option::is_none")]
        host: Option<&'a str>,
        /// Its console kind.
        kind: ConsoleKind,
        /// Its lifetime, in seconds.
        ttl_s: u64,
        /// When it expires (RFC 3339).
        expires_at: String,
        /// The browser address it admits alone, when bound.
        #[serde(skip_serializing_if = "Option::is_none")]
        bound_client: Option<String>,
        /// The administrator who asked (their name), for the management API.
        #[serde(skip_serializing_if = "Option::is_none")]
        admin: Option<&'a str>,
        /// A participant's token: its role.
        #[serde(skip_serializing_if = "Option::is_none")]
        role: Option<&'static str>,
        /// A participant's token: the session it joins.
        #[serde(skip_serializing_if = "Option::is_none")]
        joins: Option<u64>,
        /// The holder's input reaches nothing.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        view_only: bool,
        /// Which ways clipboard contents pass, when not both.
        #[serde(skip_serializing_if = "Option::is_none")]
        clipboard: Option<&'static str>,
        /// The session ends this long after it started, in seconds.
        #[serde(skip_serializing_if = "Option::is_none")]
        max_duration_s: Option<u64>,
    },
    /// An administrator acted on a live session through the management API.
    AdminAction {
        /// The administrator's name.
        admin: &'a str,
        /// The address the request came from.
        client: &'a str,
        /// `participant` (a join token minted), `watch` (an observer token for the
        /// administrator) or `end`.
        action: &'static str,
        /// The live session acted on.
        session: u64,
        /// The minted token's id, for `participant` and `watch`.
        #[serde(skip_serializing_if = "Option::is_none")]
        token_id: Option<&'a str>,
        /// The minted token's role and user.
        #[serde(skip_serializing_if = "Option::is_none")]
        role: Option<&'static str>,
        /// The user the minted token names.
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a str>,
        /// Why, for `end`.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
        /// Whether the participant is announced to the others.
        #[serde(skip_serializing_if = "Option::is_none")]
        announced: Option<bool>,
        /// The replica the administrator asked, when another than this one (which
        /// holds the session) passed the request on (`[state]`).
        #[serde(skip_serializing_if = "Option::is_none")]
        asked_at: Option<&'a str>,
    },
    /// A request to the management API or the metrics endpoint was refused: a missing
    /// or wrong key (unauthenticated: per client and interval, like token refusals),
    /// or an admin's request that failed.
    ApiRefused {
        /// The address the request came from.
        client: &'a str,
        /// Which endpoint: `console`, `sessions` or `metrics`.
        endpoint: &'static str,
        /// The HTTP status answered.
        status: u16,
        /// Why (a stable label).
        reason: &'static str,
        /// The domain asked for (at most 200 characters), for `console`.
        #[serde(skip_serializing_if = "Option::is_none")]
        domain: Option<&'a str>,
    },
    /// A client made too many failed token attempts: it is refused unheard for a
    /// while (`[limits] failed_tokens_per_client`).
    ClientThrottled {
        /// The client's address (IPv6: its /64).
        client: &'a str,
        /// The failures that filled its allowance.
        failures: u32,
        /// How long until it is heard again, in seconds.
        retry_after_s: u64,
    },
}

impl Event<'_> {
    /// Every [`Event::name`], for metrics to export at zero.
    pub const NAMES: &'static [&'static str] = &[
        "session_start",
        "key",
        "locks",
        "clipboard",
        "session_end",
        "token_used",
        "token_refused",
        "origin_refused",
        "session_refused",
        "client_throttled",
        "token_issued",
        "admin_action",
        "api_refused",
        "channel_refused",
        "refusal_summary",
        "clipboard_dropped",
        "file_transfer",
        "paste",
        "button",
        "input_dropped",
        "protocol_error",
        "upstream_failure",
        "session_drop",
        "session_resume",
    ];

    /// The `event` field's value.
    pub fn name(&self) -> &'static str {
        match self {
            Event::SessionStart { .. } => "session_start",
            Event::Key { .. } => "key",
            Event::Locks { .. } => "locks",
            Event::Clipboard { .. } => "clipboard",
            Event::SessionEnd { .. } => "session_end",
            Event::TokenUsed { .. } => "token_used",
            Event::TokenRefused { .. } => "token_refused",
            Event::OriginRefused { .. } => "origin_refused",
            Event::SessionRefused { .. } => "session_refused",
            Event::ClientThrottled { .. } => "client_throttled",
            Event::TokenIssued { .. } => "token_issued",
            Event::AdminAction { .. } => "admin_action",
            Event::ApiRefused { .. } => "api_refused",
            Event::ChannelRefused { .. } => "channel_refused",
            Event::RefusalSummary { .. } => "refusal_summary",
            Event::ClipboardDropped { .. } => "clipboard_dropped",
            Event::FileTransfer { .. } => "file_transfer",
            Event::Paste { .. } => "paste",
            Event::Button { .. } => "button",
            Event::InputDropped { .. } => "input_dropped",
            Event::ProtocolError { .. } => "protocol_error",
            Event::UpstreamFailure { .. } => "upstream_failure",
            Event::SessionDrop { .. } => "session_drop",
            Event::SessionResume { .. } => "session_resume",
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    #[serde(flatten)]
    event: &'a Event<'a>,
}

/// SHA-256 of `data`, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    chain::hex(&Sha256::digest(data))
}

/// Clipboard contents, as recorded: format, length, SHA-256 and, when configured, the
/// text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clipboard {
    /// The format's name.
    pub format: &'static str,
    /// Bytes of contents.
    pub length: usize,
    /// SHA-256, hex.
    pub sha256: String,
    /// The text, when recorded.
    pub content: Option<String>,
}

/// How a clipboard's bytes are text, if they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipText {
    /// ISO 8859-1 (RFB's original cut text).
    Latin1,
    /// UTF-8.
    Utf8,
    /// Not text.
    Binary,
}

impl Clipboard {
    /// The record of `data` in `format`: its content only if `keep` and it is text.
    pub fn of(format: &'static str, data: &[u8], text: ClipText, keep: bool) -> Clipboard {
        let content = match (keep, text) {
            (false, _) | (_, ClipText::Binary) => None,
            (true, ClipText::Latin1) => Some(data.iter().map(|b| char::from(*b)).collect()),
            (true, ClipText::Utf8) => Some(String::from_utf8_lossy(data).into_owned()),
        };
        Clipboard {
            format,
            length: data.len(),
            sha256: chain::hex(&Sha256::digest(data)),
            content,
        }
    }

    /// Its event in `session`, going `direction`.
    pub fn event(&self, session: u64, direction: &'static str) -> Event<'static> {
        Event::Clipboard {
            session,
            direction,
            format: self.format,
            length: self.length,
            sha256: self.sha256.clone(),
            content: self.content.clone(),
        }
    }

    /// The records of an RFB cut text message: one per format it transfers (none for
    /// extended clipboard control messages).
    pub fn of_cut_text(
        text: &vizor_rfb::client::CutText<'_>,
        keep: bool,
    ) -> Result<Vec<Clipboard>, vizor_rfb::Error> {
        use vizor_rfb::client::{clipboard, CutText};
        let latin1 = matches!(text, CutText::Latin1(_));
        Ok(text
            .contents(MAX_CLIPBOARD)?
            .iter()
            .map(|clip| {
                let kind = match clip.format {
                    _ if latin1 => ClipText::Latin1,
                    clipboard::TEXT | clipboard::RTF | clipboard::HTML => ClipText::Utf8,
                    _ => ClipText::Binary,
                };
                Clipboard::of(clip.format_name(), &clip.data, kind, keep)
            })
            .collect())
    }
}

/// One key transition as QEMU takes it, with how it read the browser's event.
#[derive(Debug, Clone, Copy)]
pub struct KeyEvent {
    /// What reaches the guest (or why nothing does).
    pub stroke: vizor_keys::Stroke,
    /// How QEMU read the event: `keycode`, `keysym` or `scancode`; `None` for a release
    /// made when a client left.
    pub via: Option<&'static str>,
    /// The keysym the browser sent (VNC).
    pub keysym: Option<u32>,
    /// The keysym disagrees with the key.
    pub mismatch: bool,
}

/// The most clipboard contents one message may inflate to.
pub const MAX_CLIPBOARD: usize = 16 << 20;

/// The audit log: records queued to the writer thread, sealed into the chain, written
/// and synced as configured.
pub struct Audit {
    tx: std::sync::mpsc::SyncSender<writer::Msg>,
    /// Records queued and not yet taken by the writer.
    queued: Arc<std::sync::atomic::AtomicUsize>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    keystrokes: Keystrokes,
    clipboard: ClipboardAudit,
    on_error: OnError,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    feed: tokio::sync::broadcast::Sender<Arc<str>>,
}

/// Sealed lines a follower of the log may fall behind by before it misses some.
pub const FEED: usize = 4096;

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("keystrokes", &self.keystrokes)
            .finish()
    }
}

/// Records queued and not yet written, at most: a disk that stops answering makes
/// sessions fail (closed) rather than grow memory.
const QUEUE: usize = 65_536;

impl Audit {
    /// Opens (creating, mode 0600) the log at `config.path`, continuing its chain when
    /// its last record verifies with `key`, and starts the writer thread.
    pub fn open(
        config: &AuditConfig,
        key: ChainKey,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> std::io::Result<Audit> {
        let feed = tokio::sync::broadcast::channel(FEED).0;
        let (w, note) = writer::Writer::open(
            &config.path,
            key,
            config.fsync,
            config.rotate_size,
            metrics.clone(),
            feed.clone(),
        )?;
        if let Some(note) = note {
            tracing::warn!("{note}");
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let taken = queued.clone();
        let thread = std::thread::Builder::new()
            .name("vizor-audit".into())
            .spawn(move || w.run(rx, taken))?;
        Ok(Audit {
            tx,
            queued,
            thread: Mutex::new(Some(thread)),
            keystrokes: config.keystrokes,
            clipboard: config.clipboard,
            on_error: config.on_error,
            metrics,
            feed,
        })
    }

    /// Each record from now on, as its sealed line, once it is written: for the live
    /// event stream. A follower more than [`FEED`] lines behind misses some (and is
    /// told how many).
    pub fn follow(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.feed.subscribe()
    }

    /// How key events are recorded.
    pub fn keystrokes(&self) -> Keystrokes {
        self.keystrokes
    }

    /// Queues a job; a record that cannot even be queued is counted as lost.
    fn enqueue(&self, job: writer::Job) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.try_send(writer::Msg::Job(job)).map_err(|e| {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            if let Some(m) = &self.metrics {
                m.audit_write_errors_total.inc();
            }
            match e {
                std::sync::mpsc::TrySendError::Full(_) => {
                    std::io::Error::other("audit queue full: the log is not being written")
                }
                std::sync::mpsc::TrySendError::Disconnected(_) => {
                    std::io::Error::other("audit log closed")
                }
            }
        })
    }

    fn job(
        event: &Event<'_>,
        ack: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    ) -> std::io::Result<writer::Job> {
        let line = Line {
            ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event,
        };
        Ok(writer::Job {
            members: chain::Members::of(&line)?,
            event: event.name(),
            session_boundary: matches!(
                event,
                Event::SessionStart { .. } | Event::SessionEnd { .. }
            ),
            ack,
        })
    }

    /// Appends one record and waits until it is written (and synced, as `fsync` says).
    /// With `on_error = "continue"` a failure is logged and counted, not returned.
    pub async fn record(&self, event: &Event<'_>) -> std::io::Result<()> {
        let result = async {
            let (ack, done) = tokio::sync::oneshot::channel();
            self.enqueue(Self::job(event, Some(ack))?)?;
            done.await
                .map_err(|_| std::io::Error::other("audit writer stopped"))?
                .map_err(std::io::Error::other)
        }
        .await;
        match (result, self.on_error) {
            (Err(e), OnError::Continue) => {
                tracing::warn!(error = %e, event = event.name(), "audit record lost (on_error = continue)");
                Ok(())
            }
            (r, _) => r,
        }
    }

    /// Records that the token of `claims` was spent by the browser at `client`: before
    /// its session goes on, so single use holds across a restart.
    pub async fn token_used(
        &self,
        claims: &crate::token::Claims,
        client: std::net::SocketAddr,
    ) -> std::io::Result<()> {
        let expires = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(claims.expires_at);
        self.record(&Event::TokenUsed {
            token_id: &claims.token_id(),
            expires_at: humantime::format_rfc3339_seconds(expires).to_string(),
            user: &claims.user,
            domain: &claims.domain,
            kind: claims.kind,
            client: &client.to_string(),
        })
        .await
    }

    /// Queues one record without waiting (for refusals, where nothing waits on it);
    /// a failure is logged and counted.
    pub fn record_nowait(&self, event: &Event<'_>) {
        match Self::job(event, None) {
            Ok(job) => {
                if let Err(e) = self.enqueue(job) {
                    tracing::warn!(error = %e, event = event.name(), "audit record lost");
                }
            }
            Err(e) => tracing::warn!(error = %e, "audit record not serialised"),
        }
    }

    /// Queues the record of a refused, unauthenticated request, unless the queue is
    /// half full: live sessions' records (which they wait on) keep the other half.
    /// Returns whether it was queued; one that was not is counted
    /// (`vizor_audit_refusals_dropped_total`) and its summary says so.
    pub fn record_refusal(&self, event: &Event<'_>) -> bool {
        if self.queued.load(std::sync::atomic::Ordering::Relaxed) >= QUEUE / 2 {
            if let Some(m) = &self.metrics {
                m.audit_refusals_dropped_total.inc();
            }
            return false;
        }
        match Self::job(event, None).and_then(|job| self.enqueue(job)) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, event = event.name(), "refusal record lost");
                false
            }
        }
    }

    /// Writes what is queued, a closing record, syncs, and stops the writer.
    pub fn close(&self) {
        let _ = self.tx.send(writer::Msg::Close);
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }

    /// Records what QEMU does with one key event (`via`: how it read it), as
    /// `[audit] keystrokes` allows; `Ok` without writing when key events are off.
    pub async fn stroke(&self, session: u64, key: &KeyEvent) -> std::io::Result<()> {
        let full = match self.keystrokes {
            Keystrokes::Off => return Ok(()),
            Keystrokes::Full => true,
            Keystrokes::Redacted => false,
        };
        let s = &key.stroke;
        self.record(&Event::Key {
            session,
            down: s.down,
            keysym: key.keysym.filter(|_| full),
            key: s.key.name().filter(|_| full).map(str::to_owned),
            class: s.key.class().as_str(),
            scancode: full.then_some(u32::from(s.key.number())),
            via: key.via,
            mismatch: full && key.mismatch,
            keysym_name: key
                .keysym
                .filter(|_| full && key.mismatch)
                .map(|k| keysym_name(k).into_owned()),
            ignored: s.ignored.map(vizor_keys::Ignored::as_str),
            origin: s.origin.as_str(),
            keymap: None,
        })
        .await
    }

    /// Records a VNC key event on a console whose keymap vizor does not model: QEMU
    /// maps the keysym by that keymap, so the keysym names the key.
    pub async fn keysym_key(
        &self,
        session: u64,
        down: bool,
        keysym: u32,
        keymap: &str,
    ) -> std::io::Result<()> {
        let full = match self.keystrokes {
            Keystrokes::Off => return Ok(()),
            Keystrokes::Full => true,
            Keystrokes::Redacted => false,
        };
        self.record(&Event::Key {
            session,
            down,
            keysym: full.then_some(keysym),
            key: full.then(|| keysym_name(keysym).into_owned()),
            class: keysym_class(keysym).as_str(),
            scancode: None,
            via: Some("keysym"),
            mismatch: false,
            keysym_name: None,
            ignored: None,
            origin: None,
            keymap: Some(keymap),
        })
        .await
    }

    /// Records a lock state `source` reported (unless key events are off).
    pub async fn locks(
        &self,
        session: u64,
        locks: vizor_keys::Locks,
        source: &'static str,
    ) -> std::io::Result<()> {
        if self.keystrokes == Keystrokes::Off {
            return Ok(());
        }
        self.record(&Event::Locks {
            session,
            source,
            caps: locks.caps,
            num: locks.num,
            scroll: locks.scroll,
        })
        .await
    }

    /// Whether clipboard text is recorded (`[audit] clipboard = "content"`).
    pub fn clipboard_content(&self) -> bool {
        self.clipboard == ClipboardAudit::Content
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Fsync;
    use std::path::{Path, PathBuf};

    /// `NAMES` holds the name of every arm of `Event::name`, in order (read from this
    /// file: an event with a dozen fields is a poor thing to build just for its name).
    #[test]
    fn every_event_name_is_listed() {
        let src = include_str!("mod.rs");
        let body = src
            .split_once("pub fn name(&self) -> &'static str {")
            .expect("Event::name")
            .1;
        let body = body.split_once("\n    }\n").expect("its end").0;
        let names: Vec<&str> = body
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Event::"))
            .map(|l| l.rsplit('"').nth(1).expect("a quoted name"))
            .collect();
        assert_eq!(names, Event::NAMES);
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// A VNC extended key event with `keysym` QEMU takes as key number `number`.
    fn typed(down: bool, keysym: u32, number: u8) -> KeyEvent {
        let key = vizor_keys::Key::from_number(number);
        KeyEvent {
            stroke: vizor_keys::Stroke {
                key,
                down,
                ignored: None,
                origin: vizor_keys::Origin::Browser,
            },
            via: Some("keycode"),
            keysym: Some(keysym),
            mismatch: !key.produces(keysym),
        }
    }

    fn another_key() -> ChainKey {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        crate::token::TokenKey::write_new(&path).unwrap();
        ChainKey::load(&path).unwrap()
    }

    struct Log {
        dir: tempfile::TempDir,
        key_file: PathBuf,
    }

    impl Log {
        fn new() -> Log {
            let dir = tempfile::tempdir().unwrap();
            let key_file = dir.path().join("audit.key");
            crate::token::TokenKey::write_new(&key_file).unwrap();
            Log { dir, key_file }
        }

        fn path(&self) -> PathBuf {
            self.dir.path().join("audit.jsonl")
        }

        fn config(&self, keystrokes: Keystrokes, rotate_size: Option<u64>) -> AuditConfig {
            AuditConfig {
                path: self.path(),
                keystrokes,
                key_file: self.key_file.clone(),
                fsync: Fsync::Always,
                rotate_size,
                on_error: OnError::Close,
                clipboard: ClipboardAudit::Digest,
                record_dir: None,
                refusal_summary_interval: std::time::Duration::from_secs(60),
            }
        }

        fn open(&self, keystrokes: Keystrokes, rotate_size: Option<u64>) -> Audit {
            let key = ChainKey::load(&self.key_file).unwrap();
            Audit::open(&self.config(keystrokes, rotate_size), key, None).unwrap()
        }

        fn verify(&self, files: &[PathBuf]) -> chain::Report {
            chain::verify(&ChainKey::load(&self.key_file).unwrap(), files).unwrap()
        }

        /// Appends `bytes` to the log behind vizor's back.
        fn append(&self, bytes: &[u8]) {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .open(self.path())
                .and_then(|mut f| f.write_all(bytes))
                .unwrap();
        }

        /// Rotated files, oldest first, then the current one.
        fn files(&self) -> Vec<PathBuf> {
            let mut v: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| {
                    p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with("audit.jsonl.")
                })
                .collect();
            v.sort();
            v.push(self.path());
            v
        }
    }

    #[tokio::test]
    async fn records_are_sealed_json_lines() {
        let log = Log::new();
        let a = log.open(Keystrokes::Full, None);
        a.stroke(7, &typed(true, 0xff1b, 0x01)).await.unwrap();
        a.stroke(7, &typed(false, 0x61, 0x1e)).await.unwrap();
        a.record(
            &Clipboard::of("text", b"hello", ClipText::Latin1, false).event(7, "browser_to_vm"),
        )
        .await
        .unwrap();
        a.record(
            &Clipboard::of("text", b"caf\xe9", ClipText::Latin1, true).event(7, "vm_to_browser"),
        )
        .await
        .unwrap();
        a.close();
        let l = lines(&log.path());
        assert_eq!(l[0]["event"], "chain_start");
        assert_eq!(l[0]["reason"], "new");
        assert_eq!(l[1]["event"], "key");
        assert_eq!(l[1]["key"], "Escape");
        assert_eq!(l[1]["class"], "control");
        assert_eq!(l[2]["key"], "a");
        assert_eq!(l[2]["scancode"], 0x1e);
        assert_eq!(l[3]["length"], 5);
        assert_eq!(
            l[3]["sha256"],
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(l[3]["format"], "text");
        assert!(l[3].get("content").is_none(), "digest only by default");
        assert_eq!(l[4]["content"], "caf\u{e9}");
        assert_eq!(l[5]["event"], "audit_close");
        for (i, r) in l.iter().enumerate() {
            assert_eq!(r["v"], 2);
            assert_eq!(r["seq"], i as u64);
            assert!(r["ts"].as_str().unwrap().ends_with('Z'));
            assert_eq!(r["chain"].as_str().unwrap().len(), 64);
        }
        let report = log.verify(&[log.path()]);
        assert!(report.broken.is_none(), "{report:?}");
        assert_eq!(report.records, 6);
        assert_eq!(report.last.as_ref().unwrap().0, 5);
        // Another key does not verify it.
        let other = chain::verify(&another_key(), &[log.path()]).unwrap();
        assert_eq!(other.broken.unwrap().1, 1);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(log.path()).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[tokio::test]
    async fn redacted_and_off() {
        let log = Log::new();
        let a = log.open(Keystrokes::Redacted, None);
        a.stroke(1, &typed(true, 0x41, 0x1e)).await.unwrap();
        a.close();
        let l = lines(&log.path());
        assert_eq!(l[1]["class"], "printable");
        assert!(
            l[1].get("key").is_none()
                && l[1].get("keysym").is_none()
                && l[1].get("scancode").is_none()
        );
        let log = Log::new();
        let a = log.open(Keystrokes::Off, None);
        a.stroke(1, &typed(true, 0x41, 0x1e)).await.unwrap();
        a.close();
        assert!(lines(&log.path()).iter().all(|r| r["event"] != "key"));
    }

    /// Writes `n` key records through a fresh `Audit` and closes it.
    async fn write_keys(log: &Log, n: usize, rotate: Option<u64>) {
        let a = log.open(Keystrokes::Full, rotate);
        for i in 0..n {
            a.stroke(1, &typed(i % 2 == 0, 0x61, 0x1e + (i % 10) as u8))
                .await
                .unwrap();
        }
        a.close();
    }

    #[tokio::test]
    async fn a_restart_continues_the_chain_and_verify_finds_every_tampering() {
        let log = Log::new();
        write_keys(&log, 3, None).await;
        write_keys(&log, 3, None).await;
        let l = lines(&log.path());
        assert_eq!(l[5]["event"], "audit_open");
        assert_eq!(l[5]["reason"], "restart");
        assert_eq!(l[5]["seq"], 5);
        let report = log.verify(&[log.path()]);
        assert!(report.broken.is_none(), "{report:?}");
        assert_eq!(report.records, 10);

        let original = std::fs::read_to_string(log.path()).unwrap();
        let rows: Vec<&str> = original.lines().collect();
        let tampered = |rows: Vec<String>| {
            std::fs::write(log.path(), rows.join("\n") + "\n").unwrap();
            let r = log.verify(&[log.path()]);
            std::fs::write(log.path(), &original).unwrap();
            r.broken.expect("tampering found")
        };
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // One byte edited: a key's name.
        let mut edited = own(&rows);
        edited[2] = edited[2].replace("\"key\":\"s\"", "\"key\":\"d\"");
        assert_ne!(edited[2], rows[2]);
        assert_eq!(tampered(edited).1, 3);
        // A record deleted.
        let mut deleted = own(&rows);
        deleted.remove(3);
        let (_, line, why) = tampered(deleted);
        assert_eq!(line, 4);
        assert!(why.contains("seq"), "{why}");
        // Two records swapped.
        let mut swapped = own(&rows);
        swapped.swap(2, 3);
        assert_eq!(tampered(swapped).1, 3);
        // The first record deleted.
        let mut headless = own(&rows);
        headless.remove(0);
        assert_eq!(tampered(headless).1, 1);
        assert!(log.verify(&[log.path()]).broken.is_none());
    }

    #[tokio::test]
    async fn rotation_carries_the_chain_across_files() {
        let log = Log::new();
        write_keys(&log, 100, Some(4096)).await;
        let files = log.files();
        assert!(files.len() >= 3, "{files:?}");
        let report = log.verify(&files);
        assert!(report.broken.is_none(), "{report:?}");
        assert_eq!(report.records, lines_in(&files));
        let second = lines(&files[1]);
        assert_eq!(second[0]["event"], "chain_start");
        assert_eq!(second[0]["reason"], "rotated");
        assert_eq!(
            second[0]["prev_file"],
            files[0].file_name().unwrap().to_str().unwrap()
        );
        // The current file alone verifies, noting where it continues from.
        let alone = log.verify(&files[files.len() - 1..]);
        assert!(alone.broken.is_none(), "{alone:?}");
        assert!(alone.notes[0].contains("continues"), "{:?}", alone.notes);
        // A missing middle file is found.
        let gap = [files[0].clone(), files[2].clone()];
        let r = log.verify(&gap);
        assert!(r.broken.unwrap().2.contains("does not continue"));
    }

    fn lines_in(files: &[PathBuf]) -> u64 {
        files.iter().map(|f| lines(f).len() as u64).sum()
    }

    #[tokio::test]
    async fn an_incomplete_last_record_is_sealed_over_on_restart() {
        let log = Log::new();
        write_keys(&log, 2, None).await;
        log.append(b"{\"v\":1,\"seq\":4,\"ts\":\"2026");
        let pending = log.verify(&[log.path()]);
        assert!(pending.broken.is_none());
        assert!(pending.notes[0].contains("incomplete last record"));
        write_keys(&log, 1, None).await;
        let text = std::fs::read_to_string(log.path()).unwrap();
        let open: serde_json::Value = serde_json::from_str(text.lines().nth(5).unwrap()).unwrap();
        assert_eq!(open["event"], "audit_open");
        assert_eq!(open["torn_tail"], true);
        let report = log.verify(&[log.path()]);
        assert!(report.broken.is_none(), "{report:?}");
        assert!(report.notes[0].contains("incomplete record from a crash"));
    }

    #[tokio::test]
    async fn a_complete_but_unsealed_last_line_is_sealed_over_too() {
        let log = Log::new();
        write_keys(&log, 1, None).await;
        // What a failed restart could leave: the newline of its record, not the rest.
        log.append(b"{\"v\":1,\"seq\":3,\"ts\"\n");
        write_keys(&log, 1, None).await;
        let report = log.verify(&[log.path()]);
        assert!(report.broken.is_none(), "{report:?}");
        // Readers given the key see only sealed records.
        log.append(b"{\"event\":\"key\",\"session\":1,\"down\":true,\"key\":\"x\"}");
        let key = ChainKey::load(&log.key_file).unwrap();
        let (report, records) = chain::verified_records(&key, &[log.path()]).unwrap();
        assert!(report.broken.is_none());
        assert_eq!(records.len() as u64, report.records);
        assert!(records.iter().all(|r| r.get("chain").is_some()));
        assert!(!records.iter().any(|r| r["key"] == "x"));
    }

    #[tokio::test]
    async fn a_log_this_key_cannot_continue_is_moved_aside() {
        let log = Log::new();
        std::fs::write(
            log.path(),
            "{\"ts\":\"2026-01-01T00:00:00Z\",\"event\":\"key\"}\n",
        )
        .unwrap();
        write_keys(&log, 1, None).await;
        let files = log.files();
        assert_eq!(files.len(), 2, "{files:?}");
        assert!(
            files[0].to_string_lossy().contains(".unverified-"),
            "{files:?}"
        );
        let l = lines(&log.path());
        assert_eq!(l[0]["event"], "chain_start");
        assert_eq!(
            l[0]["previous_file_not_continued"],
            files[0].file_name().unwrap().to_str().unwrap()
        );
        assert!(log.verify(&[log.path()]).broken.is_none());
    }
}
