//! The TOML configuration, parsed once at start into typed structs; nothing below
//! reads raw configuration. Relative paths are taken relative to the config file.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why the configuration could not be loaded. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for vizor (the message names the key and line).
    #[error("config {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, and where.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[server]`
    pub server: ServerConfig,
    /// `[libvirt]`
    pub libvirt: LibvirtConfig,
    /// `[tokens]`
    pub tokens: TokensConfig,
    /// `[audit]`
    pub audit: AuditConfig,
    /// `[api]` (optional)
    #[serde(default)]
    pub api: ApiConfig,
    /// `[log]` (optional)
    #[serde(default)]
    pub log: LogConfig,
    /// `[metrics]` (optional)
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[console]`: the browser clients the console page loads.
    #[serde(default)]
    pub console: ConsoleConfig,
    /// `[limits]`: how much any one client, user or VM may take.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// `[upstream_tls]`: TLS toward QEMU (VNC VeNCrypt X.509, SPICE's TLS port).
    pub upstream_tls: Option<UpstreamTlsConfig>,
    /// `[spice]`: which SPICE channels and agent features reach the VM.
    #[serde(default)]
    pub spice: SpiceConfig,
    /// `[oversight]`: how participants of a live session are shown.
    #[serde(default)]
    pub oversight: OversightConfig,
    /// `[upstream]`: where vizor may connect for a console.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// `[state]`: what replicas share (through Redis); without it, each vizor keeps its
    /// own.
    pub state: Option<StateConfig>,
}

/// `[state]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `redis`: the Redis server replicas share, `redis://HOST:PORT/DB` (a user may
    /// be named; the password goes in `password_file`, never in this file).
    #[serde(deserialize_with = "redis_url")]
    pub redis: String,
    /// `password_file`: Redis's password (or the ACL user's), on its first line.
    pub password_file: Option<PathBuf>,
    /// `prefix`: of every key vizor writes (default `vizor`): replicas that share state
    /// use the same.
    #[serde(default = "default_state_prefix")]
    pub prefix: String,
    /// `replica`: this replica's name, in what it writes (default: the host name).
    pub replica: Option<String>,
    /// `timeout`: how long one operation may take before the state counts as
    /// unavailable (default 2 s).
    #[serde(default = "default_state_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// `lease`: how long a session's slot (and its entry in the list of sessions)
    /// outlives its replica unrenewed; renewed every third of it (default 30 s, at
    /// least 3 s). A replica that dies frees its slots within it.
    #[serde(default = "default_state_lease", deserialize_with = "duration")]
    pub lease: Duration,
    /// `on_unavailable`: what happens to a new session while Redis does not answer.
    /// `"refuse"` (the default and the only choice: fail closed).
    /// `ca`: PEM certificates of the CA that signed Redis's certificate, for a
    /// `rediss://` URL (default: the system's trusted roots).
    pub ca: Option<PathBuf>,
    /// `client_cert`: vizor's PEM certificate chain, for a Redis that verifies its
    /// clients (`tls-auth-clients yes`); with `client_key`, and a `rediss://` URL.
    pub client_cert: Option<PathBuf>,
    /// `client_key`: the PEM private key of `client_cert` (not readable by others).
    pub client_key: Option<PathBuf>,
    #[serde(default)]
    pub on_unavailable: OnUnavailable,
}

/// `[state] on_unavailable`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    /// New sessions are refused; live sessions go on.
    #[default]
    Refuse,
}

impl StateConfig {
    fn check(&self) -> Result<(), String> {
        if self.lease < Duration::from_secs(3) {
            return Err(format!(
                "[state] lease = {}: it must be at least 3s (it is renewed every third of it)",
                humantime::format_duration(self.lease)
            ));
        }
        if self.timeout.is_zero() || self.timeout * 4 > self.lease {
            return Err(format!(
                "[state] timeout = {} must be longer than 0s and at most a quarter of lease ({}), so that after a renewal that waited it out the next still comes before the lease ends",
                humantime::format_duration(self.timeout),
                humantime::format_duration(self.lease)
            ));
        }
        let tls = self.redis.starts_with("rediss://");
        if !tls && (self.ca.is_some() || self.client_cert.is_some() || self.client_key.is_some()) {
            return Err(
                "[state] ca, client_cert and client_key are for TLS to Redis: use a rediss:// URL"
                    .into(),
            );
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(
                "[state] client_cert and client_key go together: set both or neither".into(),
            );
        }
        if let Some(r) = &self.replica {
            if !is_replica_name(r) {
                return Err(format!(
                    "[state] replica = {r:?}: use 1 to 63 letters, digits, '-', '_' or '.'"
                ));
            }
        }
        Ok(())
    }
}

/// Whether `name` may name a replica: 1 to 63 letters, digits, '-', '_' or '.'.
pub fn is_replica_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn default_state_lease() -> Duration {
    Duration::from_secs(30)
}

fn default_state_prefix() -> String {
    "vizor".into()
}

fn default_state_timeout() -> Duration {
    Duration::from_secs(2)
}

fn redis_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let url = String::deserialize(d)?;
    let bad = |why: &str| serde::de::Error::custom(format!("redis: {why}"));
    let rest =
        match url.split_once("://") {
            Some(("redis" | "rediss", rest)) => rest,
            _ => return Err(bad(
                "must start with redis:// or rediss:// (TLS), like \"redis://127.0.0.1:6379/0\"",
            )),
        };
    if url.contains('#') {
        return Err(bad(
            "a URL fragment (such as #insecure) is refused: vizor always verifies Redis's certificate (set ca for a private CA)",
        ));
    }
    let authority = rest.split('/').next().unwrap_or("");
    if authority
        .rsplit_once('@')
        .is_some_and(|(cred, _)| cred.contains(':'))
    {
        return Err(bad(
            "a password in the URL would sit in the config file: put it in password_file",
        ));
    }
    if authority.is_empty() {
        return Err(bad("names no host"));
    }
    Ok(url)
}

/// `[upstream]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `allow`: the addresses, networks and socket directories vizor connects to for a
    /// console, whatever a domain's XML says ("10.0.0.0/8", "127.0.0.1",
    /// "unix:/run/libvirt/qemu/"). Default: loopback, libvirt's socket directories and
    /// the libvirt host's addresses ([`crate::upstream::Allow::default_for`]).
    #[serde(default, deserialize_with = "allow")]
    pub allow: Option<crate::upstream::Allow>,
}

fn allow<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<crate::upstream::Allow>, D::Error> {
    let entries = Vec::<String>::deserialize(d)?;
    if entries.is_empty() {
        return Err(serde::de::Error::custom(
            "allow: an empty list refuses every console; leave allow out for the default (loopback, libvirt's socket directories, the libvirt host)",
        ));
    }
    crate::upstream::Allow::parse(&entries)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("allow: {e}")))
}

/// `[oversight]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OversightConfig {
    /// `announce`: whether an observer is shown to the others on the console
    /// (default true). With false, observers watch unannounced, and the audit says so;
    /// operators, who act on the VM, are always shown.
    #[serde(default = "yes")]
    pub announce: bool,
}

impl Default for OversightConfig {
    fn default() -> Self {
        OversightConfig { announce: true }
    }
}

/// `[spice]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpiceConfig {
    /// `allow_channels`: channel types vizor relays without parsing their contents
    /// (`usbredir`, `webdav`, `smartcard`, `port`). Default: none; each can reach the
    /// VM with input vizor cannot audit (a redirected USB keyboard types unrecorded),
    /// so each is refused at link and left out of the channels list.
    #[serde(default)]
    pub allow_channels: Vec<OpaqueChannel>,
    /// `file_transfer`: "refuse" (default: a file sent to the agent ends the session)
    /// or "audit" (each transfer's name, size, bytes and SHA-256 are recorded).
    #[serde(default)]
    pub file_transfer: FileTransfer,
}

/// A SPICE channel type whose contents vizor does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpaqueChannel {
    /// USB redirection (9).
    Usbredir,
    /// Folder sharing (11).
    Webdav,
    /// Smartcard (8).
    Smartcard,
    /// spiceport character devices (10).
    Port,
}

impl OpaqueChannel {
    /// The SPICE channel type number.
    pub fn channel_type(self) -> u8 {
        match self {
            OpaqueChannel::Smartcard => 8,
            OpaqueChannel::Usbredir => 9,
            OpaqueChannel::Port => 10,
            OpaqueChannel::Webdav => 11,
        }
    }
}

/// `[spice] file_transfer`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileTransfer {
    /// A transfer's start ends the session before any of it reaches the VM.
    #[default]
    Refuse,
    /// Transfers pass; each is recorded at its start and at its end.
    Audit,
}

/// `[upstream_tls]`: how vizor verifies QEMU's certificate, and proves itself to a
/// QEMU that verifies its clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// `ca`: PEM certificates of the CA that signed QEMU's certificates (libvirt's
    /// `ca-cert.pem`).
    pub ca: PathBuf,
    /// `client_cert`: vizor's PEM certificate chain, for a QEMU that verifies clients
    /// (libvirt's `vnc_tls_x509_verify`, the default). With `client_key`.
    pub client_cert: Option<PathBuf>,
    /// `client_key`: the PEM private key of `client_cert` (not readable by others).
    pub client_key: Option<PathBuf>,
    /// `server_name`: the name QEMU's certificates must carry (default: the address
    /// vizor connects to, from the domain XML; required for consoles on UNIX sockets).
    pub server_name: Option<String>,
    /// `require`: refuse consoles that do not offer TLS (default true: a VM that
    /// offers only plain VNC authentication could be an impostor collecting the
    /// password's challenge-response).
    #[serde(default = "yes")]
    pub require: bool,
}

fn yes() -> bool {
    true
}

/// `[limits]`: bounds that keep one client, user or VM from starving the others. Each
/// has a default; 0 turns a count or a duration off where the key says so.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// `max_sessions`: console sessions at once, in all (default 1000). A SPICE
    /// session counts once, whatever its channels.
    pub max_sessions: usize,
    /// `max_sessions_per_domain`: sessions on one VM at once (default 16).
    pub max_sessions_per_domain: usize,
    /// `max_sessions_per_user`: sessions of one user (the token's `user`) at once
    /// (default 1000, as many as `max_sessions`: set it when tokens name their users;
    /// the management API's tokens name the user it is given, else "api").
    pub max_sessions_per_user: usize,
    /// `idle_timeout`: a session with no key, pointer or clipboard input from its
    /// browser for this long is closed (default "30m"; "0s": never).
    #[serde(deserialize_with = "optional_duration")]
    pub idle_timeout: Option<Duration>,
    /// `send_timeout`: a browser that takes no data for this long, while vizor has
    /// some for it, is disconnected (default "30s"); so is a session whose recording
    /// cannot be written for this long.
    #[serde(deserialize_with = "any_duration")]
    pub send_timeout: Duration,
    /// `vm_stall_timeout`: a TCP connection to a VM's console that leaves vizor's
    /// data or keepalive probes unacknowledged this long (the network to the host
    /// stalled) ends its session (default "30s"; at least "2s").
    #[serde(deserialize_with = "any_duration")]
    pub vm_stall_timeout: Duration,
    /// `browser_message_max`: the largest message (WebSocket message, RFB or SPICE
    /// message held whole) a browser may send (default "1MiB").
    #[serde(deserialize_with = "message_size")]
    pub browser_message_max: usize,
    /// `vm_message_max`: the largest message held whole from the VM (framebuffer
    /// updates and display data are streamed, not held; default "1MiB").
    #[serde(deserialize_with = "message_size")]
    pub vm_message_max: usize,
    /// `failed_tokens_per_client`: failed token attempts a client address (IPv6: its
    /// /64) may make per `failed_tokens_window` before it is refused unheard (default
    /// 20; 0: no limit).
    pub failed_tokens_per_client: u32,
    /// `failed_tokens_window`: see `failed_tokens_per_client` (default "1m").
    #[serde(deserialize_with = "any_duration")]
    pub failed_tokens_window: Duration,
    /// `max_connections`: HTTP connections at once that are not (yet) console
    /// sessions (default 4096).
    pub max_connections: usize,
    /// `max_connections_per_client`: such connections from one client address
    /// (default 64).
    pub max_connections_per_client: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_sessions: 1000,
            max_sessions_per_domain: 16,
            max_sessions_per_user: 1000,
            idle_timeout: Some(Duration::from_secs(30 * 60)),
            send_timeout: Duration::from_secs(30),
            vm_stall_timeout: Duration::from_secs(30),
            browser_message_max: 1 << 20,
            vm_message_max: 1 << 20,
            failed_tokens_per_client: 20,
            failed_tokens_window: Duration::from_secs(60),
            max_connections: 4096,
            max_connections_per_client: 64,
        }
    }
}

impl LimitsConfig {
    fn check(&self) -> Result<(), String> {
        let counts = [
            ("max_sessions", self.max_sessions),
            ("max_sessions_per_domain", self.max_sessions_per_domain),
            ("max_sessions_per_user", self.max_sessions_per_user),
            ("max_connections", self.max_connections),
            (
                "max_connections_per_client",
                self.max_connections_per_client,
            ),
        ];
        for (key, n) in counts {
            if n == 0 {
                return Err(format!("[limits] {key} must be at least 1"));
            }
        }
        if self.send_timeout.is_zero() || self.failed_tokens_window.is_zero() {
            return Err(
                "[limits] send_timeout and failed_tokens_window must be longer than 0s".into(),
            );
        }
        if self.vm_stall_timeout < Duration::from_secs(2) {
            return Err(format!(
                "[limits] vm_stall_timeout = {}: it must be at least 2s (TCP keepalive counts whole seconds)",
                humantime::format_duration(self.vm_stall_timeout)
            ));
        }
        Ok(())
    }
}

fn optional_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let d = any_duration(d)?;
    Ok((!d.is_zero()).then_some(d))
}

/// The smallest and largest message bounds: a cursor image (QEMU's are up to 64x64
/// pixels with their mask) must fit, and nothing is held beyond 64 MiB.
const MESSAGE_MAX_RANGE: (u64, u64) = (64 << 10, 64 << 20);

fn message_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = parse_size(d)?;
    let (lo, hi) = MESSAGE_MAX_RANGE;
    if !(lo..=hi).contains(&n) {
        return Err(serde::de::Error::custom(format!(
            "message size {n} is out of range (64KiB to 64MiB)"
        )));
    }
    Ok(n as usize)
}

/// The most sessions `[metrics] per_session_max` may allow: series per session
/// are for a handful of sessions under study, not for a fleet.
pub const MAX_PER_SESSION_SERIES: usize = 10_000;

/// `[metrics]`: opt-in per-session series.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `per_session`: export series labelled by session id (default false).
    #[serde(default)]
    pub per_session: bool,
    /// `per_session_max`: how many live sessions (the oldest) get them (default 100).
    #[serde(
        default = "default_per_session_max",
        deserialize_with = "per_session_max"
    )]
    pub per_session_max: usize,
    /// `key_file`: a bearer key (one word of 16+ characters, mode 0600) that reads
    /// `/metrics` on the main listener; the admin key does too. Without either, the
    /// main listener serves no metrics: they name users and domains and count
    /// keystrokes as they happen. `metrics_listen` serves them without a key.
    pub key_file: Option<PathBuf>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            per_session: false,
            per_session_max: default_per_session_max(),
            key_file: None,
        }
    }
}

fn default_per_session_max() -> usize {
    100
}

fn per_session_max<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = i64::deserialize(d)?;
    if !(1..=MAX_PER_SESSION_SERIES as i64).contains(&n) {
        return Err(serde::de::Error::custom(format!(
            "per_session_max {n} is out of range (1 to {MAX_PER_SESSION_SERIES})"
        )));
    }
    Ok(n as usize)
}

/// `[console]`: where the console page (`GET /console?token=`) loads its clients from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// `novnc`: the root of noVNC's npm package `@novnc/novnc` (it holds `core/rfb.js`),
    /// served under `/novnc/` for VNC tokens.
    pub novnc: Option<PathBuf>,
    /// `spice_html5`: the spice-html5 directory (it holds `main.js`; Debian's is
    /// `/usr/share/spice-html5`), served under `/spice-html5/` for SPICE tokens.
    pub spice_html5: Option<PathBuf>,
    /// `frame_ancestors`: origins of web apps that may show the console page in a
    /// frame (`https://app.example.com`, `https://*.example.com`). Default none: the
    /// page refuses every frame.
    #[serde(default, deserialize_with = "frame_ancestors")]
    pub frame_ancestors: Vec<String>,
}

/// Origins for a Content-Security-Policy `frame-ancestors`: scheme and host (a leading
/// `*.` allowed), optional port, nothing that could end the directive.
fn frame_ancestors<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    origin_list(
        Vec::deserialize(d)?,
        "frame_ancestors",
        "https://app.example.com",
        |h| {
            let h = h.strip_prefix("*.").unwrap_or(h);
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        },
    )
    .map_err(serde::de::Error::custom)
}

/// `[api]`: the management API.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// `admin_key_file`: a file holding the bearer key of `/api/v1/...` (written like a
    /// token key: mode 0600): the administrator `admin`. Without it or
    /// `admin_keys_file` the API answers 404.
    pub admin_key_file: Option<PathBuf>,
    /// `admin_keys_file`: named administrators, one `NAME KEY` per line (mode 0600),
    /// read again on SIGHUP. Every action an administrator takes is audited under the
    /// name.
    pub admin_keys_file: Option<PathBuf>,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `format`: "human" (default) or "json".
    #[serde(default)]
    pub format: LogFormat,
    /// `level`: a tracing filter such as "info" or "vizor=debug" (default "info").
    #[serde(default = "default_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
            level: default_level(),
        }
    }
}

fn default_level() -> String {
    "info".to_owned()
}

/// `[log] format`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per event.
    Json,
}

/// `[server]`: where vizor listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// `listen`: address of the HTTP/WebSocket front (an IP address and port).
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// `metrics_listen`: a separate address for `/metrics`.
    #[serde(default, deserialize_with = "optional_socket_addr")]
    pub metrics_listen: Option<SocketAddr>,
    /// `web_root`: static files served under `/`.
    pub web_root: Option<PathBuf>,
    /// `shutdown_grace`: on SIGTERM, how long live sessions may go on (default "10s").
    #[serde(default = "default_grace", deserialize_with = "any_duration")]
    pub shutdown_grace: Duration,
    /// `handshake_timeout`: the whole RFB handshake on both legs (default "15s").
    #[serde(default = "default_handshake", deserialize_with = "any_duration")]
    pub handshake_timeout: Duration,
    /// `connect_timeout`: connecting to QEMU (default "5s").
    #[serde(default = "default_connect", deserialize_with = "any_duration")]
    pub connect_timeout: Duration,
    /// `ping_interval`: how often vizor pings each browser to measure its round trip
    /// (default "10s").
    #[serde(default = "default_ping", deserialize_with = "any_duration")]
    pub ping_interval: Duration,
    /// `allowed_origins`: pages of other origins (`scheme://host[:port]`) that may open
    /// consoles. A browser's WebSocket upgrade from any other origin than vizor's own
    /// (its `Host`) is refused: cross-site WebSocket hijacking.
    #[serde(default, deserialize_with = "origins")]
    pub allowed_origins: Vec<String>,
    /// `trusted_proxies`: addresses (CIDRs, such as "10.0.0.0/8" or "::1/128") of
    /// reverse proxies whose `Forwarded` / `X-Forwarded-For` names the client. The
    /// client is the rightmost address not in these ranges; it is the client for
    /// limits, token address binding, logs and audit. Default: none (the TCP peer is
    /// the client, and forwarding headers are ignored).
    #[serde(default, deserialize_with = "cidrs")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `tls_cert`: a PEM certificate chain; with `tls_key`, `listen` speaks only TLS
    /// (`https://`, `wss://`). Both are read again on SIGHUP.
    pub tls_cert: Option<PathBuf>,
    /// `tls_key`: the PEM private key of `tls_cert` (not readable by others).
    pub tls_key: Option<PathBuf>,
    /// `worker_threads`: threads running sessions, 1 to 1024 (default: one per CPU).
    /// Fewer threads wake each other less: one uses about an eighth less CPU per small
    /// update but adds to the latency tail (BENCHMARKS.md, "Tried and not kept").
    #[serde(default, deserialize_with = "worker_threads")]
    pub worker_threads: Option<usize>,
    /// `ws_message_size`: the largest WebSocket message vizor sends a browser (default
    /// "256KiB"; "4KiB" to "32MiB": noVNC refuses a message over 40 MiB). A browser
    /// hands a message to the page only once all of it arrived: a framebuffer update
    /// goes as several, which noVNC decodes as they come (BENCHMARKS.md, "Messages
    /// sized for browsers"). `vizor replay` uses the default.
    #[serde(
        default = "default_ws_message_size",
        deserialize_with = "ws_message_size"
    )]
    pub ws_message_size: usize,
    /// `splice`: move long display payloads (a VNC rectangle's, a SPICE drawing's)
    /// from the VM's socket to the browser's with splice(2), never reading them into
    /// vizor, when both connections are plain TCP and the session is not recorded
    /// (default true). `false` reads every byte, for a kernel or sandbox that refuses
    /// splice(2) or to compare the two (BENCHMARKS.md).
    #[serde(default = "yes")]
    pub splice: bool,
}

/// `[server] ws_message_size` by default.
pub const DEFAULT_WS_MESSAGE_SIZE: usize = 256 << 10;

fn default_ws_message_size() -> usize {
    DEFAULT_WS_MESSAGE_SIZE
}

fn ws_message_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = parse_size(d)?;
    if !(4 << 10..=32 << 20).contains(&n) {
        return Err(serde::de::Error::custom(format!(
            "WebSocket message size {n} is out of range (4KiB to 32MiB)"
        )));
    }
    Ok(n as usize)
}

fn worker_threads<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    let n = i64::deserialize(d)?;
    if (1..=1024).contains(&n) {
        Ok(Some(n as usize))
    } else {
        Err(serde::de::Error::custom(format!(
            "worker_threads = {n}: use 1 to 1024, or leave it out for one per CPU"
        )))
    }
}

fn cidrs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|c| {
            c.parse::<ipnet::IpNet>()
                .or_else(|_| c.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "trusted_proxies: {c:?} is not an address or CIDR like \"10.0.0.0/8\""
                    ))
                })
        })
        .collect()
}

fn origins<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    origin_list(
        Vec::deserialize(d)?,
        "allowed_origins",
        "https://console.example.com",
        |host| !host.contains(['/', '?', '#', '@', ' ']),
    )
    .map_err(serde::de::Error::custom)
}

/// Origins (`scheme://host[:port]`, lowercased) from `list`, each host part checked by
/// `host_ok`; an error names `key` and shows `example`.
fn origin_list(
    list: Vec<String>,
    key: &str,
    example: &str,
    host_ok: impl Fn(&str) -> bool,
) -> Result<Vec<String>, String> {
    list.into_iter()
        .map(|o| {
            let lower = o.to_ascii_lowercase();
            let host = lower
                .strip_prefix("https://")
                .or_else(|| lower.strip_prefix("http://"));
            match host {
                Some(h) if !h.is_empty() && host_ok(h) => Ok(lower.clone()),
                _ => Err(format!(
                    "{key}: {o:?} is not an origin like \"{example}\" \
                     (scheme and host, optional port, no path)"
                )),
            }
        })
        .collect()
}

fn default_ping() -> Duration {
    Duration::from_secs(10)
}

/// An IP address and port. A host name is refused with a clear message rather than
/// resolved: which of its addresses vizor would listen on would depend on the resolver.
fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = text.parse() {
        return Ok(a);
    }
    let host_port = text
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && !h.contains(':') && p.parse::<u16>().is_ok());
    match host_port {
        Some((host, port)) if host.parse::<std::net::IpAddr>().is_err() => Err(format!(
            "{text:?}: a host name is not accepted; give an IP address and port, such as \"127.0.0.1:{port}\", \"0.0.0.0:{port}\" or \"[::1]:{port}\""
        )),
        _ => Err(format!(
            "{text:?} is not an IP address and port (such as \"127.0.0.1:6080\" or \"[::1]:6080\")"
        )),
    }
}

fn socket_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    parse_socket_addr(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

fn optional_socket_addr<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    socket_addr(d).map(Some)
}

fn default_grace() -> Duration {
    Duration::from_secs(10)
}

fn default_handshake() -> Duration {
    Duration::from_secs(15)
}

fn default_connect() -> Duration {
    Duration::from_secs(5)
}

fn any_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {text:?}: {e} (examples: \"10s\", \"500ms\")"
        ))
    })
}

/// `[libvirt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtConfig {
    /// `uri`: any libvirt URI: the one host, named `default`. Empty when `hosts` names
    /// the hosts instead (one or the other, not both).
    #[serde(default)]
    pub uri: String,
    /// `[[libvirt.hosts]]`: many libvirt hosts, each with its name.
    #[serde(default)]
    pub hosts: Vec<HostConfig>,
    /// `require_password`: refuse a console whose graphics have no password in libvirt
    /// (default false: such a console opens, with a warning in the log and
    /// `vm_password: false` on record).
    #[serde(default)]
    pub require_password: bool,
    /// `wait`: when libvirt cannot be reached at start, serve anyway and keep trying,
    /// with `/readyz` answering 503 until it connects (default false: an unreachable
    /// libvirt is an error at start).
    #[serde(default)]
    pub wait: bool,
}

/// The name of the host `[libvirt] uri` is: tokens of that host name none.
pub const DEFAULT_HOST: &str = "default";

/// The longest host name.
pub const MAX_HOST_NAME: usize = 63;

/// One `[[libvirt.hosts]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// `name`: 1 to 63 of `a-z`, `0-9` and `-`, unique; tokens and the console API
    /// name the host by it.
    pub name: String,
    /// `uri`: the host's libvirt URI (`qemu+tls://node1/system`, `qemu+ssh://...`).
    pub uri: String,
    /// `console_address`: where this host's consoles that listen on a wildcard
    /// address (`0.0.0.0`, `::`) are reached. Default: the URI's host (loopback for a
    /// local URI).
    pub console_address: Option<String>,
    /// `[libvirt.hosts.upstream_tls]`: TLS toward this host's QEMU, in place of
    /// `[upstream_tls]`.
    pub upstream_tls: Option<UpstreamTlsConfig>,
}

/// Whether `name` may name a libvirt host: 1 to 63 of `a-z`, `0-9` and `-`.
pub fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HOST_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl LibvirtConfig {
    /// The hosts: `[[libvirt.hosts]]`, or `[libvirt] uri` as the one host `default`.
    pub fn hosts(&self) -> Vec<HostConfig> {
        if self.hosts.is_empty() {
            vec![HostConfig {
                name: DEFAULT_HOST.to_owned(),
                uri: self.uri.clone(),
                console_address: None,
                upstream_tls: None,
            }]
        } else {
            self.hosts.clone()
        }
    }

    fn check(&self) -> Result<(), String> {
        match (self.uri.is_empty(), self.hosts.is_empty()) {
            (true, true) => {
                return Err("[libvirt] names no host: set uri = \"qemu:///system\" for one host, or [[libvirt.hosts]] entries (name, uri) for many".into())
            }
            (false, false) => {
                return Err("[libvirt] has both uri and [[libvirt.hosts]]: keep one. For many hosts, move uri into a [[libvirt.hosts]] entry (name = \"default\" keeps the tokens already issued working)".into())
            }
            _ => {}
        }
        let mut seen = std::collections::HashSet::new();
        for h in &self.hosts {
            if !is_host_name(&h.name) {
                return Err(format!(
                    "[[libvirt.hosts]] name = {:?}: use 1 to {MAX_HOST_NAME} of a-z, 0-9 and '-'",
                    h.name
                ));
            }
            if !seen.insert(h.name.as_str()) {
                return Err(format!(
                    "[[libvirt.hosts]] name = {:?} is given twice: each host has its own name",
                    h.name
                ));
            }
            if h.uri.trim().is_empty() {
                return Err(format!("[[libvirt.hosts]] {:?} has no uri", h.name));
            }
            if let Some(a) = &h.console_address {
                if a.is_empty() || a.contains(['/', ' ', '@']) {
                    return Err(format!(
                        "[[libvirt.hosts]] {:?}: console_address = {a:?} is not a host name or address",
                        h.name
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `[tokens]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensConfig {
    /// `key_file`: written by `vizor keygen`.
    pub key_file: PathBuf,
    /// `ttl`: lifetime of issued tokens, such as "60s" (default 60 s, at most 24 h).
    #[serde(default = "default_ttl", deserialize_with = "duration")]
    pub ttl: Duration,
    /// `resume_window`: how long a console whose browser connection dropped (no
    /// close frame: a network blip) waits for its page to come back with the resume
    /// credential vizor gave it, such as "30s" (default 30 s, at most 10 min; "0s":
    /// a dropped connection ends its session).
    #[serde(default = "default_resume_window", deserialize_with = "resume_window")]
    pub resume_window: Duration,
}

/// `[audit]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// `path`: the JSON Lines file audit records are appended to.
    pub path: PathBuf,
    /// `keystrokes`: how much of each key event is recorded.
    #[serde(default)]
    pub keystrokes: Keystrokes,
    /// `key_file`: the key of the records' HMAC chain (a `vizor keygen` file),
    /// required and apart from `[tokens] key_file`: those who verify the log hold it,
    /// and must not be able to mint tokens.
    #[serde(default)]
    pub key_file: PathBuf,
    /// `fsync`: "always" (default), "session", or `"interval:<duration>"`.
    #[serde(default, deserialize_with = "fsync")]
    pub fsync: Fsync,
    /// `rotate_size`: start a new file (the chain carried over) once the log is this
    /// big, such as "100MiB" (default: never).
    #[serde(default, deserialize_with = "size")]
    pub rotate_size: Option<u64>,
    /// `on_error`: "close" (default) or "continue".
    #[serde(default)]
    pub on_error: OnError,
    /// `clipboard`: "digest" (default: length and SHA-256) or "content" (the text too).
    #[serde(default)]
    pub clipboard: ClipboardAudit,
    /// `record_dir`: record each VNC session's screen here (for `vizor replay`).
    pub record_dir: Option<PathBuf>,
    /// `refusal_summary_interval`: per client and interval, an unauthenticated
    /// client's first refusal is recorded and the rest summed up in one
    /// `refusal_summary` record (1s to 1h; default "1m").
    #[serde(
        default = "default_refusal_interval",
        deserialize_with = "refusal_interval"
    )]
    pub refusal_summary_interval: Duration,
}

fn default_refusal_interval() -> Duration {
    Duration::from_secs(60)
}

fn refusal_interval<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let t = any_duration(d)?;
    if t < Duration::from_secs(1) || t > Duration::from_secs(3600) {
        return Err(serde::de::Error::custom(format!(
            "refusal_summary_interval {} is out of range (1s to 1h)",
            humantime::format_duration(t)
        )));
    }
    Ok(t)
}

/// `[audit] clipboard`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClipboardAudit {
    /// Length and SHA-256 only.
    #[default]
    Digest,
    /// Text contents too.
    Content,
}

/// `[audit] fsync`: when records are forced to disk. Every record is written (in the
/// kernel's hands, safe from a crash of vizor) before the event it records is relayed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Fsync {
    /// After every write (records written together share one sync).
    #[default]
    Always,
    /// At session starts and ends.
    Session,
    /// At most this long after a write.
    Interval(Duration),
}

fn fsync<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Fsync, D::Error> {
    let text = String::deserialize(d)?;
    match text.as_str() {
        "always" => Ok(Fsync::Always),
        "session" => Ok(Fsync::Session),
        other => other
            .strip_prefix("interval:")
            .and_then(|t| humantime::parse_duration(t).ok())
            .filter(|d| !d.is_zero() && *d <= Duration::from_secs(3600))
            .map(Fsync::Interval)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid fsync {text:?}: use \"always\", \"session\" or \"interval:<duration>\" (up to 1h, such as \"interval:1s\")"
                ))
            }),
    }
}

fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let n = parse_size(d)?;
    if n < 4096 {
        return Err(serde::de::Error::custom(format!(
            "rotate_size {n} is too small (at least 4KiB)"
        )));
    }
    Ok(Some(n))
}

/// A size: a number of bytes, or a string with B, KiB, MiB or GiB.
fn parse_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    let n = match Size::deserialize(d)? {
        Size::Bytes(n) => n,
        Size::Text(t) => {
            let (num, unit) = t.trim().split_at(
                t.trim()
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(t.trim().len()),
            );
            let mult: u64 = match unit.trim() {
                "" | "B" => 1,
                "KiB" => 1 << 10,
                "MiB" => 1 << 20,
                "GiB" => 1 << 30,
                _ => {
                    return Err(serde::de::Error::custom(format!(
                        "invalid size {t:?}: a number of bytes, or with KiB, MiB or GiB"
                    )))
                }
            };
            num.parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(mult))
                .ok_or_else(|| serde::de::Error::custom(format!("invalid size {t:?}")))?
        }
    };
    Ok(n)
}

/// `[audit] on_error`: what a failed audit write does to sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Close the session with a reason; refuse new ones while writes fail.
    #[default]
    Close,
    /// Go on; `vizor_audit_write_errors_total` counts what was lost.
    Continue,
}

/// `[audit] keystrokes`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keystrokes {
    /// Every key with its name.
    #[default]
    Full,
    /// Timing and key class, not the character.
    Redacted,
    /// No key events.
    Off,
}

fn default_ttl() -> Duration {
    Duration::from_secs(60)
}

fn default_resume_window() -> Duration {
    Duration::from_secs(30)
}

/// The longest `[tokens] resume_window`: a parked console holds its VM connection and
/// its session slot while it waits.
pub const MAX_RESUME_WINDOW: Duration = Duration::from_secs(600);

fn resume_window<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    let window = humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {text:?}: {e} (examples: \"30s\", \"0s\" to turn resuming off)"
        ))
    })?;
    if window > MAX_RESUME_WINDOW {
        return Err(serde::de::Error::custom(format!(
            "resume_window {text:?} is longer than the most, 10m: a console waiting to be resumed holds its VM connection and session slot"
        )));
    }
    Ok(window)
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    let ttl = humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {text:?}: {e} (examples: \"60s\", \"5m\")"
        ))
    })?;
    crate::token::check_ttl(ttl).map_err(serde::de::Error::custom)?;
    Ok(ttl)
}

/// Why a configuration without `[audit] key_file` is refused, and what to do.
pub const AUDIT_KEY_REQUIRED: &str = "[audit] key_file is required: the audit chain's own key, apart from [tokens] key_file, so that whoever verifies the log cannot mint tokens. Create it with `vizor keygen /etc/vizor/audit.key` and set key_file = \"/etc/vizor/audit.key\"";

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: shown.clone(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: shown,
            message,
        })?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(config)
    }

    /// Parses configuration text.
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        config.limits.check()?;
        config.libvirt.check()?;
        if let Some(s) = &config.state {
            s.check()?;
        }
        if config.audit.key_file.as_os_str().is_empty() {
            return Err(AUDIT_KEY_REQUIRED.to_owned());
        }
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.tokens.key_file);
        if let Some(k) = &mut self.api.admin_key_file {
            resolve(k);
        }
        if let Some(k) = &mut self.api.admin_keys_file {
            resolve(k);
        }
        if let Some(k) = &mut self.metrics.key_file {
            resolve(k);
        }
        resolve(&mut self.audit.path);
        resolve(&mut self.audit.key_file);
        if let Some(d) = &mut self.audit.record_dir {
            resolve(d);
        }
        if let Some(w) = &mut self.server.web_root {
            resolve(w);
        }
        if let Some(p) = &mut self.server.tls_cert {
            resolve(p);
        }
        if let Some(p) = &mut self.server.tls_key {
            resolve(p);
        }
        if let Some(d) = &mut self.console.novnc {
            resolve(d);
        }
        if let Some(d) = &mut self.console.spice_html5 {
            resolve(d);
        }
        if let Some(t) = &mut self.upstream_tls {
            resolve(&mut t.ca);
            for p in [&mut t.client_cert, &mut t.client_key]
                .into_iter()
                .flatten()
            {
                resolve(p);
            }
        }
        for t in self
            .libvirt
            .hosts
            .iter_mut()
            .filter_map(|h| h.upstream_tls.as_mut())
        {
            resolve(&mut t.ca);
            for p in [&mut t.client_cert, &mut t.client_key]
                .into_iter()
                .flatten()
            {
                resolve(p);
            }
        }
        if let Some(s) = self.state.as_mut() {
            for p in [
                &mut s.password_file,
                &mut s.ca,
                &mut s.client_cert,
                &mut s.client_key,
            ]
            .into_iter()
            .flatten()
            {
                resolve(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:6080"
metrics_listen = "127.0.0.1:9180"
web_root = "/usr/share/novnc"

[libvirt]
uri = "qemu:///system"

[tokens]
key_file = "token.key"
ttl = "60s"

[audit]
path = "/var/log/vizor/audit.jsonl"
key_file = "audit.key"
keystrokes = "full"
"#;

    #[test]
    fn frame_ancestors_takes_origins_and_nothing_that_ends_the_directive() {
        let with = |list: &str| {
            Config::parse(&format!("{MINIMAL}\n[console]\nframe_ancestors = {list}\n"))
                .map(|c| c.console.frame_ancestors)
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            with(r#"["HTTPS://App.Example.com", "https://*.example.org:8443"]"#).unwrap(),
            ["https://app.example.com", "https://*.example.org:8443"]
        );
        for bad in [
            r#"["app.example.com"]"#,
            r#"["https://a.example.com; script-src *"]"#,
            r#"["https://a.example.com/path"]"#,
            r#"["'self'"]"#,
            r#"["https://"]"#,
        ] {
            let e = with(bad).unwrap_err();
            assert!(e.contains("frame_ancestors"), "{bad}: {e}");
        }
        assert!(with("[]").unwrap().is_empty());
    }

    #[test]
    fn upstream_allow_takes_networks_and_socket_directories_and_refuses_nothing_listed() {
        let with = |list: &str| {
            Config::parse(&format!("{MINIMAL}\n[upstream]\nallow = {list}\n"))
                .map(|c| c.upstream.allow.map(|a| a.to_string()))
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            with(r#"["10.0.0.0/8", "192.0.2.1", "unix:/var/lib/libvirt/qemu/"]"#).unwrap(),
            Some("10.0.0.0/8, 192.0.2.1/32, unix:/var/lib/libvirt/qemu/".to_owned())
        );
        for (bad, says) in [
            ("[]", "an empty list refuses every console"),
            (r#"["hv1.example"]"#, "is not an address"),
            (r#"["unix:run/x"]"#, "absolute path"),
        ] {
            let e = with(bad).unwrap_err();
            assert!(e.contains("allow") && e.contains(says), "{bad}: {e}");
        }
        assert!(Config::parse(MINIMAL).unwrap().upstream.allow.is_none());
    }

    #[test]
    fn state_takes_a_redis_url_without_a_password_in_it() {
        let with = |table: &str| {
            Config::parse(&format!("{MINIMAL}\n[state]\n{table}\n")).map_err(|e| e.to_string())
        };
        let c = with("redis = \"redis://10.0.0.5:6379/0\"\npassword_file = \"p\"").unwrap();
        let s = c.state.unwrap();
        assert_eq!(s.redis, "redis://10.0.0.5:6379/0");
        assert_eq!(
            (s.prefix.as_str(), s.timeout, s.lease, s.on_unavailable),
            (
                "vizor",
                Duration::from_secs(2),
                Duration::from_secs(30),
                OnUnavailable::Refuse
            )
        );
        for (bad, says) in [
            ("redis = \"redis://:pw@10.0.0.5/0\"", "password_file"),
            ("redis = \"redis://u:pw@10.0.0.5/0\"", "password_file"),
            (
                "redis = \"rediss://10.0.0.5/0#insecure\"",
                "always verifies",
            ),
            (
                "redis = \"redis://10.0.0.5/0\"\nca = \"ca.pem\"",
                "use a rediss:// URL",
            ),
            (
                "redis = \"rediss://10.0.0.5/0\"\nclient_cert = \"c.pem\"",
                "go together",
            ),
            ("redis = \"10.0.0.5:6379\"", "must start with redis://"),
            ("redis = \"redis:///0\"", "names no host"),
            ("", "missing field `redis`"),
            ("redis = \"redis://h/0\"\nlease = \"2s\"", "at least 3s"),
            (
                "redis = \"redis://h/0\"\nlease = \"7s\"",
                "at most a quarter of lease",
            ),
            (
                "redis = \"redis://h/0\"\nreplica = \"a/b\"",
                "letters, digits",
            ),
            (
                "redis = \"redis://h/0\"\non_unavailable = \"admit\"",
                "unknown variant",
            ),
        ] {
            let e = with(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(with("redis = \"redis://vizor@10.0.0.5:6379/0\"").is_ok());
        let tls = with(
            "redis = \"rediss://10.0.0.5:6380/0\"\nca = \"ca.pem\"\nclient_cert = \"c.pem\"\nclient_key = \"k.pem\"",
        )
        .unwrap();
        let state = tls.state.unwrap();
        assert_eq!(state.ca.as_deref(), Some(Path::new("ca.pem")));
        assert!(state.client_cert.is_some() && state.client_key.is_some());
        assert!(Config::parse(MINIMAL).unwrap().state.is_none());
    }

    #[test]
    fn listen_takes_an_ip_address_and_says_why_not_a_host_name() {
        for good in ["127.0.0.1:6080", "[::1]:6080", "0.0.0.0:0"] {
            assert_eq!(parse_socket_addr(good), Ok(good.parse().unwrap()), "{good}");
        }
        let e = parse_socket_addr("localhost:6444").unwrap_err();
        assert!(
            e.contains("a host name is not accepted") && e.contains("\"127.0.0.1:6444\""),
            "{e}"
        );
        for bad in ["6080", "127.0.0.1", "127.0.0.1:99999", "::1:6080", ""] {
            let e = parse_socket_addr(bad).unwrap_err();
            assert!(e.contains("is not an IP address and port"), "{bad}: {e}");
        }
        let e = Config::parse(&MINIMAL.replace("127.0.0.1:9180", "metrics.local:9180"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("metrics_listen") && e.contains("host name"),
            "{e}"
        );
    }

    #[test]
    fn the_design_documents_minimal_config_parses() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:6080".parse().unwrap());
        assert_eq!(c.tokens.ttl, Duration::from_secs(60));
        assert_eq!(c.tokens.resume_window, Duration::from_secs(30));
        assert_eq!(c.audit.keystrokes, Keystrokes::Full);
        assert_eq!(c.libvirt.uri, "qemu:///system");
        assert!(!c.metrics.per_session);
        assert_eq!(c.audit.fsync, Fsync::Always);
        assert_eq!(c.audit.on_error, OnError::Close);
        assert_eq!(c.audit.rotate_size, None);
        let c = Config::parse(&MINIMAL.replace(
            "keystrokes = \"full\"",
            "fsync = \"interval:250ms\"\nrotate_size = \"64MiB\"\non_error = \"continue\"",
        ))
        .unwrap();
        assert_eq!(c.audit.fsync, Fsync::Interval(Duration::from_millis(250)));
        assert_eq!(c.audit.rotate_size, Some(64 << 20));
        assert_eq!(c.audit.on_error, OnError::Continue);
        let c = Config::parse(&format!(
            "{MINIMAL}\n[metrics]\nper_session = true\nper_session_max = 20\n"
        ))
        .unwrap();
        assert!(c.metrics.per_session);
        assert_eq!(c.metrics.per_session_max, 20);
        assert_eq!(c.server.worker_threads, None);
        let c = Config::parse(&MINIMAL.replace(
            "web_root = \"/usr/share/novnc\"",
            "web_root = \"/usr/share/novnc\"\nworker_threads = 1",
        ))
        .unwrap();
        assert_eq!(c.server.worker_threads, Some(1));
        assert_eq!(c.server.ws_message_size, DEFAULT_WS_MESSAGE_SIZE);
        assert!(c.server.splice, "splicing is on by default");
        let c = Config::parse(&MINIMAL.replace(
            "web_root = \"/usr/share/novnc\"",
            "web_root = \"/usr/share/novnc\"\nws_message_size = \"64KiB\"\nsplice = false",
        ))
        .unwrap();
        assert_eq!(c.server.ws_message_size, 64 << 10);
        assert!(!c.server.splice);
        let bad = Config::parse(&MINIMAL.replace(
            "web_root = \"/usr/share/novnc\"",
            "web_root = \"/usr/share/novnc\"\nsplice = \"no\"",
        ));
        assert!(bad.is_err(), "splice takes true or false");
    }

    #[test]
    fn resume_window_parses_turns_off_and_is_bounded() {
        let with = |w: &str| {
            Config::parse(&MINIMAL.replace(
                "ttl = \"60s\"",
                &format!("ttl = \"60s\"\nresume_window = \"{w}\""),
            ))
        };
        assert_eq!(
            with("5s").unwrap().tokens.resume_window,
            Duration::from_secs(5)
        );
        assert_eq!(with("0s").unwrap().tokens.resume_window, Duration::ZERO);
        assert_eq!(
            with("10m").unwrap().tokens.resume_window,
            Duration::from_secs(600)
        );
        let e = with("11m").unwrap_err();
        assert!(e.contains("resume_window") && e.contains("10m"), "{e}");
        let e = with("soon").unwrap_err();
        assert!(e.contains("invalid duration"), "{e}");
    }

    #[test]
    fn limits_have_defaults_and_parse() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.limits.max_sessions, 1000);
        assert_eq!(c.limits.idle_timeout, Some(Duration::from_secs(1800)));
        assert_eq!(c.limits.browser_message_max, 1 << 20);
        let c = Config::parse(&format!(
            "{MINIMAL}\n[limits]\nmax_sessions_per_user = 2\nidle_timeout = \"0s\"\n\
             browser_message_max = \"64KiB\"\nvm_message_max = 65536\n\
             failed_tokens_per_client = 0\n"
        ))
        .unwrap();
        assert_eq!(c.limits.max_sessions_per_user, 2);
        assert_eq!(c.limits.idle_timeout, None);
        assert_eq!(c.limits.browser_message_max, 64 << 10);
        assert_eq!(c.limits.vm_message_max, 65536);
        assert_eq!(c.limits.failed_tokens_per_client, 0);
        for (tail, expected) in [
            ("max_sessions = 0", "max_sessions must be at least 1"),
            ("browser_message_max = \"4KiB\"", "out of range"),
            ("vm_message_max = \"1GiB\"", "out of range"),
            ("send_timeout = \"0s\"", "longer than 0s"),
            ("vm_stall_timeout = \"1s\"", "at least 2s"),
            ("idle_timeout = \"forever\"", "invalid duration"),
            ("max_session = 3", "max_session"),
        ] {
            let err = Config::parse(&format!("{MINIMAL}\n[limits]\n{tail}\n")).unwrap_err();
            assert!(err.contains(expected), "{tail}: {err}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (MINIMAL.replace("ttl = \"60s\"", "ttl = \"soon\""), "ttl"),
            (
                MINIMAL.replace("ttl = \"60s\"", "ttl = \"3d\""),
                "out of range",
            ),
            (
                MINIMAL.replace("keystrokes = \"full\"", "keystrokes = \"some\""),
                "keystrokes",
            ),
            (
                MINIMAL.replace("listen = \"127.0.0.1:6080\"", "listen = \"nowhere\""),
                "listen",
            ),
            (MINIMAL.replace("uri = ", "url = "), "url"),
            (
                MINIMAL.replace("keystrokes = \"full\"", "fsync = \"sometimes\""),
                "invalid fsync",
            ),
            (
                MINIMAL.replace("keystrokes = \"full\"", "fsync = \"interval:0s\""),
                "invalid fsync",
            ),
            (
                MINIMAL.replace("keystrokes = \"full\"", "rotate_size = \"10 parsecs\""),
                "invalid size",
            ),
            (
                MINIMAL.replace("keystrokes = \"full\"", "rotate_size = 100"),
                "too small",
            ),
            (
                MINIMAL.replace("keystrokes = \"full\"", "on_error = \"ignore\""),
                "on_error",
            ),
            (
                format!("{MINIMAL}\n[metrics]\nper_session_max = 0\n"),
                "per_session_max 0 is out of range",
            ),
            (
                format!("{MINIMAL}\n[metrics]\nper_sessions = true\n"),
                "per_sessions",
            ),
            (
                MINIMAL.replace("[libvirt]\nuri = \"qemu:///system\"", ""),
                "libvirt",
            ),
            (
                MINIMAL.replace("[libvirt]", "worker_threads = 0\n[libvirt]"),
                "worker_threads = 0: use 1 to 1024",
            ),
            (
                MINIMAL.replace("[libvirt]", "worker_threads = 5000\n[libvirt]"),
                "worker_threads = 5000: use 1 to 1024",
            ),
            (
                MINIMAL.replace("[libvirt]", "worker_threads = \"many\"\n[libvirt]"),
                "worker_threads",
            ),
            (
                MINIMAL.replace("[libvirt]", "ws_message_size = \"1KiB\"\n[libvirt]"),
                "ws_message_size",
            ),
            (
                MINIMAL.replace("[libvirt]", "ws_message_size = \"1GiB\"\n[libvirt]"),
                "out of range (4KiB to 32MiB)",
            ),
        ];
        for (text, key) in cases {
            let err = Config::parse(&text).unwrap_err();
            assert!(err.contains(key), "expected {key:?} in: {err}");
        }
    }

    #[test]
    fn many_hosts_are_named_and_the_one_uri_is_the_host_default() {
        let c = Config::parse(MINIMAL).unwrap();
        let hosts = c.libvirt.hosts();
        assert_eq!(hosts.len(), 1);
        assert_eq!(
            (hosts[0].name.as_str(), hosts[0].uri.as_str()),
            (DEFAULT_HOST, "qemu:///system")
        );
        let many = |entries: &str| {
            Config::parse(&MINIMAL.replace(
                "[libvirt]\nuri = \"qemu:///system\"",
                &format!("[libvirt]\n{entries}"),
            ))
        };
        let c = many(
            "[[libvirt.hosts]]\nname = \"node1\"\nuri = \"qemu+tls://node1/system\"\n\
             [[libvirt.hosts]]\nname = \"node-2\"\nuri = \"qemu+ssh://root@n2/system\"\n\
             console_address = \"10.0.0.2\"\n\
             [libvirt.hosts.upstream_tls]\nca = \"n2-ca.pem\"\n",
        )
        .unwrap();
        let hosts = c.libvirt.hosts();
        assert_eq!(
            hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(),
            ["node1", "node-2"]
        );
        assert_eq!(hosts[1].console_address.as_deref(), Some("10.0.0.2"));
        assert!(hosts[1].upstream_tls.is_some() && hosts[0].upstream_tls.is_none());
        for (entries, says) in [
            (
                "uri = \"qemu:///system\"\n[[libvirt.hosts]]\nname = \"a\"\nuri = \"qemu:///system\"\n",
                "keep one",
            ),
            ("require_password = true\n", "names no host"),
            (
                "[[libvirt.hosts]]\nname = \"Node1\"\nuri = \"qemu:///system\"\n",
                "a-z, 0-9",
            ),
            (
                "[[libvirt.hosts]]\nname = \"a\"\nuri = \"qemu:///system\"\n\
                 [[libvirt.hosts]]\nname = \"a\"\nuri = \"qemu+tcp://b/system\"\n",
                "given twice",
            ),
            ("[[libvirt.hosts]]\nname = \"a\"\nuri = \"\"\n", "no uri"),
            (
                "[[libvirt.hosts]]\nname = \"a\"\nuri = \"qemu:///system\"\nconsole_address = \"10.0.0.1/8\"\n",
                "console_address",
            ),
            (
                "[[libvirt.hosts]]\nname = \"a\"\nuri = \"qemu:///system\"\nport = 1\n",
                "port",
            ),
        ] {
            let e = many(entries).unwrap_err();
            assert!(e.contains(says), "{entries}: {e}");
        }
    }

    #[test]
    fn the_audit_key_is_required() {
        let err = Config::parse(&MINIMAL.replace("key_file = \"audit.key\"\n", "")).unwrap_err();
        assert_eq!(err, AUDIT_KEY_REQUIRED);
        assert!(err.contains("vizor keygen"));
    }

    #[test]
    fn load_names_the_file_and_resolves_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vizor.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.tokens.key_file, dir.path().join("token.key"));
        assert_eq!(c.audit.key_file, dir.path().join("audit.key"));
        assert_eq!(c.audit.path, PathBuf::from("/var/log/vizor/audit.jsonl"));
        std::fs::write(&path, "[server]\nlisten = 1\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("vizor.toml") && err.contains("listen"),
            "{err}"
        );
        let err = Config::load(&dir.path().join("absent.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("absent.toml"), "{err}");
    }
}
