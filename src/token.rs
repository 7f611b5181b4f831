//! Sealed, short-lived, single-use console tokens.
//!
//! A token is what the browser holds instead of the VNC or SPICE password. Its claims
//! (domain, console kind, user, expiry, a random nonce) are encrypted with AES-256 in
//! CTR mode and authenticated with HMAC-SHA256 over the version byte, the IV and the
//! ciphertext (encrypt-then-MAC), then written in URL-safe base64. The browser can
//! neither read nor forge one; any vizor replica holding the same key file can open
//! it, with no shared state. Single use is enforced per replica by [`ReplayCache`],
//! which remembers each nonce until its token expires.
//!
//! Wire layout (before base64): `version (1) | IV (16) | ciphertext | tag (32)`.
//! Plaintext, version 3: `kind (1) | expires_at (U64, Unix seconds) | nonce (16) |
//! domain UUID (16) | domain name length (U16) | domain name | user length (U16) | user
//! | role (1) | view_only (1) | clipboard (1) | max_duration (U32 seconds, 0: none)
//! [| joined session (U64) | its owner's token id (8)] [| client address (4 or 16)]`.
//! The joined session is there exactly when the role is not the owner's (a
//! participant's token joins a live session); the client address only in a token
//! bound to one client. Version 2 (sealed by builds before participants) is the same
//! up to the user, then the client address: it still opens, as an owner's token with
//! the default policy. Version 4 is version 3 with the libvirt host's name after the
//! user (`host length (U16) | host`): a token of any other version opens a console on
//! the host `default` (`[libvirt] uri`), and a token for that host is still sealed as
//! version 3.
//!
//! A token opens the console of the domain with its UUID, whatever that domain is now
//! named: a domain deleted and defined again under the same name is another domain,
//! and the tokens issued for the old one do not open it. (Version 1 named the domain by
//! name alone; such tokens are refused.)

use aes::cipher::{KeyIvInit, StreamCipher};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use zeroize::Zeroizing;

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;
type HmacSha256 = Hmac<Sha256>;

const VERSION: u8 = 3;
/// Version 3 with the libvirt host named.
const VERSION_4: u8 = 4;
/// The version before participants and policy, still opened.
const VERSION_2: u8 = 2;
/// The longest `max_duration` a token carries.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);
const IV_LEN: usize = 16;
const TAG_LEN: usize = 32;
const NONCE_LEN: usize = 16;
/// Longest domain name a token may carry.
pub const MAX_DOMAIN_LEN: usize = 1024;
/// Longest user id a token may carry.
pub const MAX_USER_LEN: usize = 256;
/// The longest token lifetime allowed: tokens are meant to be used within seconds.
pub const MAX_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// Longest token text accepted; anything longer is refused before decoding.
pub const MAX_TOKEN_LEN: usize = 4096;
const KEY_FILE_HEADER: &str = "vizor-token-key-v1";

/// Why a token was refused. Precise for logs and metrics; the client is told less.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not base64, too short, too long, or claims that do not parse.
    #[error("malformed token")]
    Malformed,
    /// A version byte this build does not know.
    #[error("unknown token version {0}")]
    UnknownVersion(u8),
    /// The authentication tag does not match: forged, altered, or sealed with another key.
    #[error("token authentication failed (forged, altered or another key)")]
    BadSignature,
    /// The token's lifetime is over.
    #[error("token expired at {} ({} ago)", rfc3339(*expires_at), ago(*expires_at, *now))]
    Expired {
        /// When it expired, in Unix seconds.
        expires_at: u64,
        /// When it was checked, in Unix seconds.
        now: u64,
    },
    /// The token would open for longer than any vizor issues ([`MAX_LIFETIME`]): not
    /// minted by vizor's rules, or by a clock far ahead.
    #[error("token lifetime too long: it expires at {}, more than 24h from now", rfc3339(*expires_at))]
    TooLong {
        /// When it would expire, in Unix seconds.
        expires_at: u64,
    },
    /// The token was already used.
    #[error("token already used")]
    Replayed,
    /// The replay cache is full of unexpired tokens.
    #[error("too many unexpired tokens in use")]
    ReplayCacheFull,
    /// Whether another replica admitted it cannot be known now (`[state]`: Redis did
    /// not answer): refused until it does.
    #[error("vizor's shared state is unavailable")]
    StateUnavailable,
    /// The token is bound to another client address.
    #[error("token bound to client {bound}, presented by {presented}")]
    WrongClient {
        /// The address the token admits.
        bound: IpAddr,
        /// The address it came from.
        presented: IpAddr,
    },
}

impl TokenError {
    /// Every [`TokenError::reason`], for metrics to export at zero.
    pub const REASONS: &'static [&'static str] = &[
        "malformed",
        "unknown_version",
        "bad_signature",
        "expired",
        "too_long",
        "replayed",
        "replay_cache_full",
        "wrong_client",
        "state_unavailable",
    ];

    /// A short, stable label for metrics and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::UnknownVersion(_) => "unknown_version",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired { .. } => "expired",
            TokenError::TooLong { .. } => "too_long",
            TokenError::Replayed => "replayed",
            TokenError::ReplayCacheFull => "replay_cache_full",
            TokenError::StateUnavailable => "state_unavailable",
            TokenError::WrongClient { .. } => "wrong_client",
        }
    }
}

/// Why a key file could not be read or written. `what` names the key by its use
/// ("token key", "audit key", or "key" when it has none yet).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing the file failed.
    #[error("{what} file {path}: {source}")]
    Io {
        /// The key's use.
        what: &'static str,
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a vizor key.
    #[error("{what} file {path}: {why}")]
    Invalid {
        /// The key's use.
        what: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Group or others may read the file.
    #[error(
        "{what} file {path} is readable by group or others (mode {mode:o}); run: chmod 600 {path}"
    )]
    TooOpen {
        /// The key's use.
        what: &'static str,
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The operating system's random source failed.
    #[error("no randomness for a new key: {0}")]
    Random(getrandom::Error),
}

impl KeyError {
    /// The same error, naming the key by its use `what` ("audit key").
    pub fn named(mut self, what: &'static str) -> KeyError {
        match &mut self {
            KeyError::Io { what: w, .. }
            | KeyError::Invalid { what: w, .. }
            | KeyError::TooOpen { what: w, .. } => *w = what,
            KeyError::Random(_) => {}
        }
        self
    }
}

/// Which console a token opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleKind {
    /// VNC (RFB).
    Vnc,
    /// SPICE.
    Spice,
}

impl ConsoleKind {
    /// The lowercase name used in URLs, config and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ConsoleKind::Vnc => "vnc",
            ConsoleKind::Spice => "spice",
        }
    }
}

impl fmt::Display for ConsoleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ConsoleKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vnc" => Ok(ConsoleKind::Vnc),
            "spice" => Ok(ConsoleKind::Spice),
            other => Err(format!(
                "unknown console kind {other:?} (expected vnc or spice)"
            )),
        }
    }
}

/// Who a token's holder is on its console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Opened the console: the session is theirs.
    Owner,
    /// Joined someone's session, and may type and point.
    Operator,
    /// Joined someone's session to watch: sees the screen, reaches nothing.
    Observer,
}

impl Role {
    /// The lowercase name used in the API, audit records and pages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Operator => "operator",
            Role::Observer => "observer",
        }
    }

    fn byte(self) -> u8 {
        match self {
            Role::Owner => 0,
            Role::Operator => 1,
            Role::Observer => 2,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "operator" => Ok(Role::Operator),
            "observer" => Ok(Role::Observer),
            "owner" => Err("owner is the role of the token that opens a session; a participant is an operator or an observer".to_owned()),
            other => Err(format!("unknown role {other:?} (expected operator or observer)")),
        }
    }
}

/// Which ways clipboard contents pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClipboardWays {
    /// From the browser to the VM.
    pub to_vm: bool,
    /// From the VM to the browser.
    pub from_vm: bool,
}

impl ClipboardWays {
    /// Both ways.
    pub const BOTH: ClipboardWays = ClipboardWays {
        to_vm: true,
        from_vm: true,
    };
    /// Neither way.
    pub const NONE: ClipboardWays = ClipboardWays {
        to_vm: false,
        from_vm: false,
    };

    /// The name used in the API and the CLI: `none`, `to_vm`, `from_vm`, `both`.
    pub fn as_str(self) -> &'static str {
        match (self.to_vm, self.from_vm) {
            (false, false) => "none",
            (true, false) => "to_vm",
            (false, true) => "from_vm",
            (true, true) => "both",
        }
    }

    fn byte(self) -> u8 {
        u8::from(self.to_vm) | u8::from(self.from_vm) << 1
    }
}

impl std::str::FromStr for ClipboardWays {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (to_vm, from_vm) = match s {
            "none" => (false, false),
            "to_vm" => (true, false),
            "from_vm" => (false, true),
            "both" => (true, true),
            other => {
                return Err(format!(
                    "unknown clipboard policy {other:?} (expected none, to_vm, from_vm or both)"
                ))
            }
        };
        Ok(ClipboardWays { to_vm, from_vm })
    }
}

/// What a token's holder may do, carried by the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The holder's keyboard and pointer reach nothing.
    pub view_only: bool,
    /// Which ways clipboard contents pass.
    pub clipboard: ClipboardWays,
    /// The session ends this long after it started.
    pub max_duration: Option<std::time::Duration>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            view_only: false,
            clipboard: ClipboardWays::BOTH,
            max_duration: None,
        }
    }
}

impl Policy {
    /// The policy asked for a token of `kind`, checked: `max_duration` in range, and no
    /// view-only or clipboard limit on SPICE, whose agent stream does not apply them yet.
    pub fn asked(
        kind: ConsoleKind,
        view_only: bool,
        clipboard: ClipboardWays,
        max_duration: Option<std::time::Duration>,
    ) -> Result<Policy, String> {
        if let Some(d) = max_duration {
            check_max_duration(d)?;
        }
        if kind == ConsoleKind::Spice && (view_only || clipboard != ClipboardWays::BOTH) {
            return Err(
                "view_only and clipboard limits apply to VNC consoles only (SPICE's agent stream does not apply them yet)"
                    .to_owned(),
            );
        }
        Ok(Policy {
            view_only,
            clipboard,
            max_duration,
        })
    }
}

/// Checks a `max_duration`: at least a second, at most [`MAX_DURATION`].
pub fn check_max_duration(d: std::time::Duration) -> Result<(), String> {
    if d < std::time::Duration::from_secs(1) || d > MAX_DURATION {
        return Err(format!(
            "max_duration {} is out of range (1s to 7days)",
            humantime::format_duration(d)
        ));
    }
    Ok(())
}

/// The live session a participant's token joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joins {
    /// The session's id on the vizor that issued the token.
    pub session: u64,
    /// The token id of the session's owner: a session of the same id after a restart
    /// is another session, and the token does not join it.
    pub owner: [u8; 8],
}

impl Joins {
    /// The owner's token id, as logs and audit records write it.
    pub fn owner_token_id(&self) -> String {
        self.owner.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// What a token is issued for.
#[derive(Debug, Clone)]
pub struct Grant<'a> {
    /// The libvirt host the domain is on ([`crate::config::DEFAULT_HOST`] for
    /// `[libvirt] uri`).
    pub host: &'a str,
    /// The domain's name (as libvirt gave it, for pages and logs).
    pub domain: &'a str,
    /// The domain's UUID: the console the token opens.
    pub uuid: [u8; 16],
    /// Console kind.
    pub kind: ConsoleKind,
    /// Whose session it is (audited, and counted by `[limits] max_sessions_per_user`).
    pub user: &'a str,
    /// The one browser address the token admits, if any.
    pub client: Option<IpAddr>,
    /// How long the token is good for.
    pub ttl: std::time::Duration,
    /// The holder's role; a participant's names the session it joins.
    pub role: Role,
    /// The session a participant's token joins (`None` for an owner's).
    pub joins: Option<Joins>,
    /// What the holder may do.
    pub policy: Policy,
}

/// A token just issued, with its claims.
pub struct Issued {
    /// The sealed token, for the browser.
    pub token: String,
    /// What it asserts.
    pub claims: Claims,
}

/// Why no token was issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    /// A lifetime out of range.
    #[error("{0}")]
    Ttl(String),
    /// An empty, too long or unprintable user.
    #[error("user must be 1 to {MAX_USER_LEN} bytes, no control characters")]
    User,
    /// An empty or too long domain name.
    #[error("domain name must be 1 to {MAX_DOMAIN_LEN} bytes")]
    Domain,
    /// A host name that no `[[libvirt.hosts]]` entry could have.
    #[error("host must be 1 to 63 of a-z, 0-9 and '-'")]
    Host,
    /// A `max_duration` out of range.
    #[error("{0}")]
    MaxDuration(String),
    /// An owner's token that joins a session, or a participant's that joins none.
    #[error("a participant's token (operator or observer) joins a session; an owner's joins none")]
    Role,
    /// No randomness, or claims that cannot be sealed.
    #[error("cannot seal a token: {0}")]
    Seal(String),
}

/// Checks whose a token is: 1 to [`MAX_USER_LEN`] bytes, no control characters.
pub fn check_user(user: &str) -> Result<(), IssueError> {
    if user.is_empty() || user.len() > MAX_USER_LEN || user.chars().any(char::is_control) {
        return Err(IssueError::User);
    }
    Ok(())
}

/// Checks a token lifetime: at least a second, at most [`MAX_TOKEN_TTL`].
pub fn check_ttl(ttl: std::time::Duration) -> Result<(), String> {
    if ttl < std::time::Duration::from_secs(1) || ttl > MAX_TOKEN_TTL {
        return Err(format!(
            "token ttl {} is out of range (1s to 24h)",
            humantime::format_duration(ttl)
        ));
    }
    Ok(())
}

/// What a token asserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The libvirt host the domain is on ([`crate::config::DEFAULT_HOST`] for
    /// `[libvirt] uri`).
    pub host: String,
    /// The libvirt domain's name when the token was issued (for pages and logs).
    pub domain: String,
    /// The libvirt domain's UUID: the console the token opens.
    pub uuid: [u8; 16],
    /// Console kind.
    pub kind: ConsoleKind,
    /// Who the token was issued to.
    pub user: String,
    /// End of validity, Unix seconds.
    pub expires_at: u64,
    /// Random, unique per token.
    pub nonce: [u8; NONCE_LEN],
    /// The one client address the token admits, when it is bound to one.
    pub client: Option<IpAddr>,
    /// The holder's role.
    pub role: Role,
    /// The live session a participant's token joins; `None` exactly for an owner.
    pub joins: Option<Joins>,
    /// What the holder may do.
    pub policy: Policy,
}

impl Claims {
    /// New claims for the domain `uuid` (named `domain`), with a fresh random nonce.
    pub fn new(
        domain: &str,
        uuid: [u8; 16],
        kind: ConsoleKind,
        user: &str,
        expires_at: u64,
    ) -> Result<Claims, KeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(KeyError::Random)?;
        Ok(Claims {
            host: crate::config::DEFAULT_HOST.to_owned(),
            domain: domain.to_owned(),
            uuid,
            kind,
            user: user.to_owned(),
            expires_at,
            nonce,
            client: None,
            role: Role::Owner,
            joins: None,
            policy: Policy::default(),
        })
    }

    /// The same claims, for a participant of `role` in the session `joins`.
    pub fn joining(self, role: Role, joins: Joins) -> Claims {
        Claims {
            role,
            joins: Some(joins),
            ..self
        }
    }

    /// The same claims, for a domain on the libvirt host `host`.
    pub fn on_host(self, host: &str) -> Claims {
        Claims {
            host: host.to_owned(),
            ..self
        }
    }

    /// The same claims, with `policy`.
    pub fn with_policy(self, policy: Policy) -> Claims {
        Claims { policy, ..self }
    }

    /// The same claims, admitting `client` alone.
    pub fn bound_to(self, client: IpAddr) -> Claims {
        Claims {
            client: Some(client.to_canonical()),
            ..self
        }
    }

    /// Whether a connection from `peer` may use the token: any peer, unless the token
    /// is bound to one address (an IPv4 client over an IPv6 socket is still itself).
    pub fn admits(&self, peer: IpAddr) -> Result<(), TokenError> {
        match self.client {
            Some(bound) if bound != peer.to_canonical() => Err(TokenError::WrongClient {
                bound,
                presented: peer.to_canonical(),
            }),
            _ => Ok(()),
        }
    }

    /// The domain's UUID as libvirt writes it.
    pub fn uuid_string(&self) -> String {
        uuid_string(&self.uuid)
    }

    /// An identifier for logs and audit records: part of the nonce, which says nothing
    /// about the key and cannot be turned back into the token.
    pub fn token_id(&self) -> String {
        self.nonce[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The version these claims are sealed as: 3, or 4 when they name a host other
    /// than the default.
    fn version(&self) -> u8 {
        if self.host == crate::config::DEFAULT_HOST {
            VERSION
        } else {
            VERSION_4
        }
    }

    fn encode(&self) -> Result<Vec<u8>, TokenError> {
        let max_duration = match self.policy.max_duration {
            None => 0,
            Some(d) if check_max_duration(d).is_ok() => d.as_secs() as u32,
            Some(_) => return Err(TokenError::Malformed),
        };
        if self.domain.is_empty()
            || self.domain.len() > MAX_DOMAIN_LEN
            || self.user.len() > MAX_USER_LEN
            || !crate::config::is_host_name(&self.host)
            || (self.role == Role::Owner) != self.joins.is_none()
        {
            return Err(TokenError::Malformed);
        }
        let mut v = Vec::with_capacity(29 + 16 + 23 + self.domain.len() + self.user.len());
        v.push(match self.kind {
            ConsoleKind::Vnc => 0,
            ConsoleKind::Spice => 1,
        });
        v.extend_from_slice(&self.expires_at.to_be_bytes());
        v.extend_from_slice(&self.nonce);
        v.extend_from_slice(&self.uuid);
        let mut strings = vec![&self.domain, &self.user];
        if self.version() == VERSION_4 {
            strings.push(&self.host);
        }
        for s in strings {
            v.extend_from_slice(&(s.len() as u16).to_be_bytes());
            v.extend_from_slice(s.as_bytes());
        }
        v.push(self.role.byte());
        v.push(u8::from(self.policy.view_only));
        v.push(self.policy.clipboard.byte());
        v.extend_from_slice(&max_duration.to_be_bytes());
        if let Some(j) = &self.joins {
            v.extend_from_slice(&j.session.to_be_bytes());
            v.extend_from_slice(&j.owner);
        }
        match self.client {
            None => {}
            Some(IpAddr::V4(a)) => v.extend_from_slice(&a.octets()),
            Some(IpAddr::V6(a)) => v.extend_from_slice(&a.octets()),
        }
        Ok(v)
    }

    fn decode(version: u8, b: &[u8]) -> Result<Claims, TokenError> {
        let kind = match b.first() {
            Some(0) => ConsoleKind::Vnc,
            Some(1) => ConsoleKind::Spice,
            _ => return Err(TokenError::Malformed),
        };
        let expires_at = u64::from_be_bytes(
            b.get(1..9)
                .ok_or(TokenError::Malformed)?
                .try_into()
                .map_err(|_| TokenError::Malformed)?,
        );
        let nonce: [u8; NONCE_LEN] = b
            .get(9..25)
            .ok_or(TokenError::Malformed)?
            .try_into()
            .map_err(|_| TokenError::Malformed)?;
        let uuid: [u8; 16] = b
            .get(25..41)
            .ok_or(TokenError::Malformed)?
            .try_into()
            .map_err(|_| TokenError::Malformed)?;
        let mut rest = b.get(41..).ok_or(TokenError::Malformed)?;
        let mut string = |max: usize| -> Result<String, TokenError> {
            let len_bytes: [u8; 2] = rest
                .get(..2)
                .ok_or(TokenError::Malformed)?
                .try_into()
                .map_err(|_| TokenError::Malformed)?;
            let len = usize::from(u16::from_be_bytes(len_bytes));
            if len > max {
                return Err(TokenError::Malformed);
            }
            let s = rest.get(2..2 + len).ok_or(TokenError::Malformed)?;
            rest = &rest[2 + len..];
            String::from_utf8(s.to_vec()).map_err(|_| TokenError::Malformed)
        };
        let domain = string(MAX_DOMAIN_LEN)?;
        let user = string(MAX_USER_LEN)?;
        if domain.is_empty() {
            return Err(TokenError::Malformed);
        }
        let host = if version == VERSION_4 {
            let host = string(crate::config::MAX_HOST_NAME)?;
            // The default host is sealed as version 3 alone: one token, one encoding.
            if !crate::config::is_host_name(&host) || host == crate::config::DEFAULT_HOST {
                return Err(TokenError::Malformed);
            }
            host
        } else {
            crate::config::DEFAULT_HOST.to_owned()
        };
        let (role, joins, policy) = if version == VERSION_2 {
            (Role::Owner, None, Policy::default())
        } else {
            let mut take = |n: usize| -> Result<&[u8], TokenError> {
                let (head, tail) = rest.split_at_checked(n).ok_or(TokenError::Malformed)?;
                rest = tail;
                Ok(head)
            };
            let role = match take(1)?[0] {
                0 => Role::Owner,
                1 => Role::Operator,
                2 => Role::Observer,
                _ => return Err(TokenError::Malformed),
            };
            let view_only = match take(1)?[0] {
                0 => false,
                1 => true,
                _ => return Err(TokenError::Malformed),
            };
            let ways = take(1)?[0];
            if ways > 3 {
                return Err(TokenError::Malformed);
            }
            let clipboard = ClipboardWays {
                to_vm: ways & 1 != 0,
                from_vm: ways & 2 != 0,
            };
            let secs = u32::from_be_bytes(take(4)?.try_into().map_err(|_| TokenError::Malformed)?);
            let max_duration = match secs {
                0 => None,
                s => {
                    let d = std::time::Duration::from_secs(u64::from(s));
                    check_max_duration(d).map_err(|_| TokenError::Malformed)?;
                    Some(d)
                }
            };
            let joins = match role {
                Role::Owner => None,
                _ => {
                    let session =
                        u64::from_be_bytes(take(8)?.try_into().map_err(|_| TokenError::Malformed)?);
                    let owner: [u8; 8] = take(8)?.try_into().map_err(|_| TokenError::Malformed)?;
                    Some(Joins { session, owner })
                }
            };
            let policy = Policy {
                view_only,
                clipboard,
                max_duration,
            };
            (role, joins, policy)
        };
        let client = match rest.len() {
            0 => None,
            4 => <[u8; 4]>::try_from(rest).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(rest).ok().map(IpAddr::from),
            _ => return Err(TokenError::Malformed),
        };
        Ok(Claims {
            host,
            domain,
            uuid,
            kind,
            user,
            expires_at,
            nonce,
            client,
            role,
            joins,
            policy,
        })
    }
}

/// A UUID as libvirt writes it: 32 lowercase hex digits in groups of 8-4-4-4-12.
pub fn uuid_string(uuid: &[u8; 16]) -> String {
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Parses a token id (16 hex digits, as [`Claims::token_id`] writes it).
pub fn parse_token_id(s: &str) -> Option<[u8; 8]> {
    if s.len() != 16 {
        return None;
    }
    let mut out = [0u8; 8];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// Parses a UUID as libvirt writes it (hyphens optional, any case).
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = s.bytes().filter(|b| *b != b'-').collect();
    if hex.len() != 32 || s.len() > 36 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// The secret that seals and opens tokens: an AES-256 key and an HMAC-SHA256 key.
pub struct TokenKey {
    enc: Zeroizing<[u8; 32]>,
    mac: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

impl TokenKey {
    /// A fresh random key.
    pub fn generate() -> Result<TokenKey, KeyError> {
        let mut raw = Zeroizing::new([0u8; 64]);
        getrandom::getrandom(&mut *raw).map_err(KeyError::Random)?;
        Ok(Self::from_bytes(&raw))
    }

    fn from_bytes(raw: &[u8; 64]) -> TokenKey {
        let mut enc = Zeroizing::new([0u8; 32]);
        let mut mac = Zeroizing::new([0u8; 32]);
        enc.copy_from_slice(&raw[..32]);
        mac.copy_from_slice(&raw[32..]);
        TokenKey { enc, mac }
    }

    fn file_contents(&self) -> Zeroizing<String> {
        let mut raw = Zeroizing::new([0u8; 64]);
        raw[..32].copy_from_slice(&*self.enc);
        raw[32..].copy_from_slice(&*self.mac);
        Zeroizing::new(format!(
            "{KEY_FILE_HEADER}\n{}\n",
            URL_SAFE_NO_PAD.encode(*raw)
        ))
    }

    fn parse(path: &str, text: &str) -> Result<TokenKey, KeyError> {
        let invalid = |why| KeyError::Invalid {
            what: "token key",
            path: path.to_owned(),
            why,
        };
        let mut lines = text.lines();
        if lines.next() != Some(KEY_FILE_HEADER) {
            return Err(invalid(
                "not a vizor key file (its first line must be vizor-token-key-v1; create one with `vizor keygen`)",
            ));
        }
        let body = lines.next().ok_or_else(|| invalid("key line missing"))?;
        if lines.any(|l| !l.trim().is_empty()) {
            return Err(invalid("unexpected lines after the key"));
        }
        let raw = Zeroizing::new(
            URL_SAFE_NO_PAD
                .decode(body.trim())
                .map_err(|_| invalid("key is not base64url"))?,
        );
        let raw: &[u8; 64] = raw
            .as_slice()
            .try_into()
            .map_err(|_| invalid("key must be 64 bytes"))?;
        Ok(Self::from_bytes(raw))
    }

    /// Writes a fresh key to `path`, readable by the owner only. Refuses to overwrite.
    pub fn write_new(path: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let shown = path.display().to_string();
        let key = Self::generate()?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| KeyError::Io {
                what: "key",
                path: shown.clone(),
                source,
            })?;
        file.write_all(key.file_contents().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|source| KeyError::Io {
                what: "key",
                path: shown,
                source,
            })
    }

    /// Reads the key at `path`; refuses a file that group or others can read.
    pub fn load(path: &Path) -> Result<TokenKey, KeyError> {
        use std::os::unix::fs::MetadataExt;
        let shown = path.display().to_string();
        let io = |source| KeyError::Io {
            what: "token key",
            path: shown.clone(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(io)?.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::TooOpen {
                what: "token key",
                path: shown,
                mode,
            });
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
        Self::parse(&shown, &text)
    }

    /// A 32-byte key for another purpose, derived from this one and `label`
    /// (HMAC-SHA256 keyed with the whole key), so one key file can serve several uses
    /// without any two sharing a key.
    pub fn derive(&self, label: &[u8]) -> Zeroizing<[u8; 32]> {
        let mut raw = Zeroizing::new([0u8; 64]);
        raw[..32].copy_from_slice(&*self.enc);
        raw[32..].copy_from_slice(&*self.mac);
        // HMAC takes keys of any length; 64 bytes cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&*raw).unwrap_or_else(|_| unreachable!());
        mac.update(label);
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&mac.finalize().into_bytes());
        out
    }

    fn tag(&self, version_iv_ct: &[u8]) -> HmacSha256 {
        // HMAC takes keys of any length; 32 bytes cannot fail.
        let mut mac =
            <HmacSha256 as Mac>::new_from_slice(&*self.mac).unwrap_or_else(|_| unreachable!());
        mac.update(version_iv_ct);
        mac
    }

    /// Issues a token for `grant`, valid from `now` (Unix seconds) for the grant's
    /// lifetime: the one way vizor makes tokens (`vizor token` and the console API).
    pub fn issue(&self, grant: &Grant<'_>, now: u64) -> Result<Issued, IssueError> {
        check_ttl(grant.ttl).map_err(IssueError::Ttl)?;
        check_user(grant.user)?;
        if grant.domain.is_empty() || grant.domain.len() > MAX_DOMAIN_LEN {
            return Err(IssueError::Domain);
        }
        if !crate::config::is_host_name(grant.host) {
            return Err(IssueError::Host);
        }
        if let Some(d) = grant.policy.max_duration {
            check_max_duration(d).map_err(IssueError::MaxDuration)?;
        }
        if (grant.role == Role::Owner) != grant.joins.is_none() {
            return Err(IssueError::Role);
        }
        let expires_at = now.saturating_add(grant.ttl.as_secs());
        let mut claims = Claims::new(grant.domain, grant.uuid, grant.kind, grant.user, expires_at)
            .map_err(|e| IssueError::Seal(e.to_string()))?
            .on_host(grant.host)
            .with_policy(grant.policy);
        if let Some(joins) = grant.joins {
            claims = claims.joining(grant.role, joins);
        }
        if let Some(ip) = grant.client {
            claims = claims.bound_to(ip);
        }
        let token = self
            .seal(&claims)
            .map_err(|e| IssueError::Seal(e.to_string()))?;
        Ok(Issued { token, claims })
    }

    /// Seals `claims` into a token.
    pub fn seal(&self, claims: &Claims) -> Result<String, TokenError> {
        let mut iv = [0u8; IV_LEN];
        getrandom::getrandom(&mut iv).map_err(|_| TokenError::Malformed)?;
        self.seal_with_iv(claims, iv)
    }

    fn seal_with_iv(&self, claims: &Claims, iv: [u8; IV_LEN]) -> Result<String, TokenError> {
        let mut body = Zeroizing::new(claims.encode()?);
        Aes256Ctr::new((&*self.enc).into(), (&iv).into()).apply_keystream(&mut body);
        let mut out = Vec::with_capacity(1 + IV_LEN + body.len() + TAG_LEN);
        out.push(claims.version());
        out.extend_from_slice(&iv);
        out.extend_from_slice(&body);
        let tag = self.tag(&out).finalize().into_bytes();
        out.extend_from_slice(&tag);
        Ok(URL_SAFE_NO_PAD.encode(out))
    }

    /// Opens a token whatever its expiry: for a token already spent on a connection
    /// that is still live, which its holder's page asks about (the console page's
    /// presence stream). The caller must find that live connection, by token id.
    pub fn open_spent(&self, token: &str) -> Result<Claims, TokenError> {
        self.unseal(token)
    }

    /// Opens a token: checks its tag in constant time, decrypts it, and refuses it if
    /// it expired at or before `now` (Unix seconds). Replay is the caller's
    /// [`ReplayCache`].
    pub fn open(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let claims = self.unseal(token)?;
        if claims.expires_at <= now {
            return Err(TokenError::Expired {
                expires_at: claims.expires_at,
                now,
            });
        }
        if claims.expires_at > now.saturating_add(MAX_LIFETIME.as_secs()) {
            return Err(TokenError::TooLong {
                expires_at: claims.expires_at,
            });
        }
        Ok(claims)
    }

    /// Checks a token's tag in constant time and decrypts it, whatever its expiry.
    fn unseal(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TokenError::Malformed)?;
        // The version first: a token of another version is named as such, whatever
        // its length.
        let version = match raw.first() {
            Some(&v @ (VERSION | VERSION_2 | VERSION_4)) => v,
            Some(&other) if raw.len() >= 1 + IV_LEN + TAG_LEN => {
                return Err(TokenError::UnknownVersion(other))
            }
            _ => return Err(TokenError::Malformed),
        };
        if raw.len() < 1 + IV_LEN + 41 + 4 + TAG_LEN {
            return Err(TokenError::Malformed);
        }
        let (signed, tag) = raw.split_at(raw.len() - TAG_LEN);
        // verify_slice compares in constant time.
        self.tag(signed)
            .verify_slice(tag)
            .map_err(|_| TokenError::BadSignature)?;
        let iv: [u8; IV_LEN] = signed[1..1 + IV_LEN]
            .try_into()
            .map_err(|_| TokenError::Malformed)?;
        let mut body = Zeroizing::new(signed[1 + IV_LEN..].to_vec());
        Aes256Ctr::new((&*self.enc).into(), (&iv).into()).apply_keystream(&mut body);
        Claims::decode(version, &body)
    }
}

/// The longest a token opens after any check of it: the longest ttl vizor issues
/// ([`MAX_TOKEN_TTL`]) and 5 minutes for replicas' clocks apart. A
/// token used longer ago than this has expired (the restart rebuild of the spent set
/// relies on it).
pub const MAX_LIFETIME: std::time::Duration =
    std::time::Duration::from_secs(MAX_TOKEN_TTL.as_secs() + 300);

fn rfc3339(unix: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn ago(then: u64, now: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(now.saturating_sub(then))).to_string()
}

/// Remembers the nonces of tokens used on this replica until they expire, so each
/// token admits one session.
#[derive(Debug)]
pub struct ReplayCache {
    seen: HashMap<[u8; NONCE_LEN], u64>,
    by_expiry: BinaryHeap<Reverse<(u64, [u8; NONCE_LEN])>>,
    max_entries: usize,
    /// Tokens spent before this process started, by token id (the audit log names
    /// them so), with their expiry; emptied once the last has expired.
    restored: HashMap<[u8; 8], u64>,
    restored_until: u64,
}

impl ReplayCache {
    /// A cache holding at most `max_entries` unexpired nonces.
    pub fn new(max_entries: usize) -> Self {
        ReplayCache {
            seen: HashMap::new(),
            by_expiry: BinaryHeap::new(),
            max_entries,
            restored: HashMap::new(),
            restored_until: 0,
        }
    }

    /// Marks the tokens of `spent` (token id, expiry) as used: spent before this
    /// process started. They do not count against the bound.
    pub fn restore(&mut self, spent: impl IntoIterator<Item = ([u8; 8], u64)>) {
        for (id, expires) in spent {
            let e = self.restored.entry(id).or_insert(expires);
            *e = (*e).max(expires);
            self.restored_until = self.restored_until.max(expires);
        }
    }

    fn restored_use(&self, claims: &Claims, now: u64) -> bool {
        let mut id = [0u8; 8];
        id.copy_from_slice(&claims.nonce[..8]);
        self.restored.get(&id).is_some_and(|&expires| expires > now)
    }

    /// Records the token's use; refuses it if it was used before.
    pub fn admit(&mut self, claims: &Claims, now: u64) -> Result<(), TokenError> {
        self.evict(now);
        if self.seen.contains_key(&claims.nonce) || self.restored_use(claims, now) {
            return Err(TokenError::Replayed);
        }
        if self.seen.len() >= self.max_entries {
            return Err(TokenError::ReplayCacheFull);
        }
        self.seen.insert(claims.nonce, claims.expires_at);
        self.by_expiry
            .push(Reverse((claims.expires_at, claims.nonce)));
        Ok(())
    }

    /// Whether [`ReplayCache::admit`] would take the token now (without using it):
    /// for a check before the token is spent elsewhere (the shared state).
    pub fn would_admit(&mut self, claims: &Claims, now: u64) -> Result<(), TokenError> {
        self.evict(now);
        if self.seen.contains_key(&claims.nonce) || self.restored_use(claims, now) {
            return Err(TokenError::Replayed);
        }
        if self.seen.len() >= self.max_entries {
            return Err(TokenError::ReplayCacheFull);
        }
        Ok(())
    }

    /// Whether the token was used already (without using it).
    pub fn is_used(&self, claims: &Claims, now: u64) -> bool {
        self.seen
            .get(&claims.nonce)
            .is_some_and(|&expires| expires > now)
            || self.restored_use(claims, now)
    }

    /// Unexpired nonces held.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no nonce is held.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn evict(&mut self, now: u64) {
        while let Some(Reverse((exp, nonce))) = self.by_expiry.peek().copied() {
            if exp > now {
                break;
            }
            self.by_expiry.pop();
            self.seen.remove(&nonce);
        }
        if !self.restored.is_empty() && self.restored_until <= now {
            self.restored = HashMap::new();
        }
    }
}

#[cfg(test)]
mod tests;
