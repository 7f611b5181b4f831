//! Finding a domain's console in libvirt: the graphics device of the requested kind,
//! where it listens now, and the password libvirt stores for it.
//!
//! The password is read from the live XML with `VIR_DOMAIN_XML_SECURE` (which needs a
//! read-write connection) and goes nowhere but to QEMU. libvirt calls block, so they run
//! on tokio's blocking pool, never on the executor threads. Connections are long-lived,
//! one per call running at once, kept alive by libvirt's keepalive and reopened when
//! they die (libvirtd restarted, network lost): see [`pool`].

use crate::token::ConsoleKind;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use xmltree::Element;
use zeroize::Zeroizing;

/// Where a console listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A TCP port on a host.
    Tcp {
        /// Host name or address to connect to.
        host: String,
        /// Port.
        port: u16,
    },
    /// A UNIX socket on this host.
    Unix(PathBuf),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Target::Tcp { host, port } => write!(f, "{host}:{port}"),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A running domain's console.
#[derive(Clone)]
pub struct Console {
    /// The domain's name.
    pub domain: String,
    /// The domain's UUID.
    pub uuid: String,
    /// VNC or SPICE.
    pub kind: ConsoleKind,
    /// Where it listens.
    pub target: Target,
    /// Where it listens for TLS: SPICE's `tlsPort` (VNC negotiates TLS in-band).
    pub tls_target: Option<Target>,
    /// The password libvirt stores, if any. Never logged.
    pub password: Option<Zeroizing<String>>,
    /// The keyboard layout libvirt gives QEMU (`-k`, from any graphics' `keymap`): QEMU
    /// then maps every VNC keysym by it, even in extended key events.
    pub keymap: Option<String>,
    /// libvirt's id of the running domain: a new one each time it starts.
    pub instance: Option<u32>,
    /// The libvirt host it runs on (`[[libvirt.hosts]]` name; `default` for
    /// `[libvirt] uri`).
    pub host: String,
}

impl fmt::Debug for Console {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Console")
            .field("domain", &self.domain)
            .field("uuid", &self.uuid)
            .field("kind", &self.kind)
            .field("target", &self.target)
            .field("tls_target", &self.tls_target)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("keymap", &self.keymap)
            .field("instance", &self.instance)
            .field("host", &self.host)
            .finish()
    }
}

/// Why a console could not be found. Each says what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// No domain of that name or UUID.
    #[error("no domain named {0:?} in libvirt")]
    NoSuchDomain(String),
    /// The domain exists but is not running.
    #[error("domain {0:?} is not running")]
    NotRunning(String),
    /// The domain has no graphics device of that kind.
    #[error("domain {domain:?} has no {kind} graphics ({})", kinds_it_has(has))]
    NoGraphics {
        /// The domain.
        domain: String,
        /// The kind asked for.
        kind: ConsoleKind,
        /// The kinds of console it has.
        has: Vec<ConsoleKind>,
    },
    /// The graphics device does not listen anywhere vizor can reach.
    #[error("domain {domain:?}: {kind} graphics do not listen on a port or socket")]
    NoListener {
        /// The domain.
        domain: String,
        /// The kind asked for.
        kind: ConsoleKind,
    },
    /// The password libvirt stores is past its `passwdValidTo`.
    #[error("domain {domain:?}: the {kind} password expired at {valid_to} UTC")]
    PasswordExpired {
        /// The domain.
        domain: String,
        /// The kind asked for.
        kind: ConsoleKind,
        /// `passwdValidTo` as libvirt gives it.
        valid_to: String,
    },
    /// The console has no password in libvirt, and `[libvirt] require_password` is set.
    #[error("domain {domain:?}: its {kind} graphics have no password, and [libvirt] require_password is set")]
    NoPassword {
        /// The domain.
        domain: String,
        /// The kind asked for.
        kind: ConsoleKind,
    },
    /// libvirt could not be reached or refused the query.
    #[error("libvirt at {uri} is unreachable: {message}")]
    Unreachable {
        /// The URI.
        uri: String,
        /// libvirt's message.
        message: String,
    },
    /// The domain XML is not what libvirt documents.
    #[error("domain {domain:?}: unexpected domain XML: {why}")]
    BadXml {
        /// The domain.
        domain: String,
        /// What is wrong.
        why: String,
    },
    /// A domain on a host apart from vizor's machine whose console listens on that
    /// host's loopback or on a UNIX socket: vizor would reach its own machine's instead.
    #[error("domain {domain:?} on host {host}: its console listens on {target}, that host's own (loopback or a UNIX socket), which vizor on another machine cannot reach: set the graphics listen address to one vizor reaches")]
    ListensLocally {
        /// The domain.
        domain: String,
        /// Its host.
        host: String,
        /// Where it listens.
        target: String,
    },
    /// A token or request names a host that is not in `[[libvirt.hosts]]`.
    #[error("no libvirt host named {0:?} is configured")]
    UnknownHost(String),
    /// A name found on more than one host: the request must name the host.
    #[error("domain {domain:?} is on several hosts ({}): name one with host=", hosts.join(", "))]
    Ambiguous {
        /// The domain.
        domain: String,
        /// The hosts that have it.
        hosts: Vec<String>,
    },
    /// Not found on the hosts that answered, and some did not: it may be on those.
    #[error("domain {domain:?} is on no host that answered; unreachable: {}", hosts.join(", "))]
    HostsUnreachable {
        /// The domain.
        domain: String,
        /// The hosts that did not answer.
        hosts: Vec<String>,
    },
}

fn kinds_it_has(has: &[ConsoleKind]) -> String {
    if has.is_empty() {
        return "it has no VNC or SPICE graphics".into();
    }
    let names: Vec<&str> = has.iter().map(|k| k.as_str()).collect();
    format!("it has: {}", names.join(", "))
}

impl LookupError {
    /// What the browser is told: enough to act on, no more.
    pub fn told(&self) -> &'static str {
        match self {
            LookupError::NoSuchDomain(_) => "no such VM",
            LookupError::NotRunning(_) => "the VM is not running",
            LookupError::NoGraphics { .. } | LookupError::NoListener { .. } => {
                "the VM has no console of this kind"
            }
            LookupError::PasswordExpired { .. } => "the VM console password has expired",
            LookupError::NoPassword { .. } => {
                "the VM console has no password, which vizor requires"
            }
            LookupError::Unreachable { .. }
            | LookupError::BadXml { .. }
            | LookupError::UnknownHost(_)
            | LookupError::ListensLocally { .. }
            | LookupError::HostsUnreachable { .. } => "the VM console cannot be reached",
            LookupError::Ambiguous { .. } => "the VM's name is on several hosts",
        }
    }

    /// Every [`LookupError::reason`], for metrics to export at zero.
    pub const REASONS: &'static [&'static str] = &[
        "no_such_domain",
        "not_running",
        "no_graphics",
        "no_listener",
        "password_expired",
        "no_password",
        "unreachable",
        "bad_xml",
        "listens_locally",
        "unknown_host",
        "ambiguous_domain",
        "hosts_unreachable",
    ];

    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            LookupError::NoSuchDomain(_) => "no_such_domain",
            LookupError::NotRunning(_) => "not_running",
            LookupError::NoGraphics { .. } => "no_graphics",
            LookupError::NoListener { .. } => "no_listener",
            LookupError::PasswordExpired { .. } => "password_expired",
            LookupError::NoPassword { .. } => "no_password",
            LookupError::Unreachable { .. } => "unreachable",
            LookupError::BadXml { .. } => "bad_xml",
            LookupError::ListensLocally { .. } => "listens_locally",
            LookupError::UnknownHost(_) => "unknown_host",
            LookupError::Ambiguous { .. } => "ambiguous_domain",
            LookupError::HostsUnreachable { .. } => "hosts_unreachable",
        }
    }
}

/// The host part of a libvirt URI, or `None` for a local one (`qemu:///system`).
pub fn uri_host(uri: &str) -> Option<String> {
    let rest = uri.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    (!host.is_empty()).then(|| host.to_owned())
}

/// Parses libvirt's `passwdValidTo` (`YYYY-MM-DDTHH:MM:SS`, UTC) into Unix seconds.
fn parse_valid_to(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// An address that means "every address of the host" (however it is written).
fn is_wildcard(addr: &str) -> bool {
    let bare = addr.trim_start_matches('[').trim_end_matches(']');
    bare.is_empty()
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_unspecified())
}

/// Reads the console of `kind` from a domain's live XML.
///
/// `uri_host` is the libvirt host (see [`uri_host`]): a console listening on a wildcard
/// address is reached there, or on loopback for a local URI. `now` decides whether
/// `passwdValidTo` has passed.
pub fn console_from_xml(
    xml: &str,
    kind: ConsoleKind,
    uri_host: Option<&str>,
    now: SystemTime,
) -> Result<Console, LookupError> {
    let mut root = Element::parse(xml.as_bytes()).map_err(|e| LookupError::BadXml {
        domain: String::new(),
        why: e.to_string(),
    })?;
    let mut passwords = take_passwords(&mut root);
    let text = |name: &str| {
        root.get_child(name)
            .and_then(|e| e.get_text())
            .map(|t| t.trim().to_owned())
            .unwrap_or_default()
    };
    let domain = text("name");
    let uuid = text("uuid");
    // A running domain's id: libvirt gives each start of a domain a new one, so it names
    // this run of QEMU (whose keyboard state vizor models).
    let instance = root.attributes.get("id").and_then(|i| i.parse().ok());
    let bad = |why: String| LookupError::BadXml {
        domain: domain.clone(),
        why,
    };
    let all_graphics = || {
        root.get_child("devices")
            .into_iter()
            .flat_map(|d| d.children.iter())
            .filter_map(|n| n.as_element())
            .filter(|e| e.name == "graphics")
    };
    // libvirt passes `-k` for each graphics that names a keymap; QEMU keeps the last.
    let keymap = all_graphics()
        .filter_map(|g| g.attributes.get("keymap"))
        .next_back()
        .filter(|k| !k.is_empty())
        .cloned();
    let graphics = root
        .get_child("devices")
        .into_iter()
        .flat_map(|d| d.children.iter())
        .filter_map(|n| n.as_element())
        .find(|e| {
            e.name == "graphics"
                && e.attributes.get("type").map(String::as_str) == Some(kind.as_str())
        })
        .ok_or_else(|| LookupError::NoGraphics {
            domain: domain.clone(),
            kind,
            has: [ConsoleKind::Vnc, ConsoleKind::Spice]
                .into_iter()
                .filter(|k| {
                    all_graphics()
                        .any(|g| g.attributes.get("type").map(String::as_str) == Some(k.as_str()))
                })
                .collect(),
        })?;
    let listens: Vec<&Element> = graphics
        .children
        .iter()
        .filter_map(|n| n.as_element())
        .filter(|e| e.name == "listen")
        .collect();
    let socket = graphics.attributes.get("socket").cloned().or_else(|| {
        listens
            .iter()
            .find(|l| l.attributes.get("type").map(String::as_str) == Some("socket"))
            .and_then(|l| l.attributes.get("socket").cloned())
    });
    // A port attribute: `None` when absent or not assigned (-1, 0: shut off, or
    // autoport not resolved).
    let port_attr = |name: &str| -> Result<Option<u16>, LookupError> {
        let Some(p) = graphics.attributes.get(name) else {
            return Ok(None);
        };
        let n: i64 = p
            .parse()
            .map_err(|_| bad(format!("graphics {name} {p:?} is not a number")))?;
        Ok(u16::try_from(n).ok().filter(|&n| n > 0))
    };
    let port = port_attr("port")?;
    // VNC has no TLS port: it negotiates TLS in-band (VeNCrypt).
    let tls_port = match kind {
        ConsoleKind::Spice => port_attr("tlsPort")?,
        ConsoleKind::Vnc => None,
    };
    let address = graphics.attributes.get("listen").cloned().or_else(|| {
        listens
            .iter()
            .find(|l| {
                matches!(
                    l.attributes.get("type").map(String::as_str),
                    Some("address" | "network")
                )
            })
            .and_then(|l| l.attributes.get("address").cloned())
    });
    let host = match address.as_deref() {
        Some(a) if !is_wildcard(a) => a.to_owned(),
        wildcard => match uri_host {
            Some(h) => h.to_owned(),
            None if matches!(wildcard, Some(a) if a.contains(':')) => "::1".to_owned(),
            None => "127.0.0.1".to_owned(),
        },
    };
    let tls_target = tls_port.map(|port| Target::Tcp {
        host: host.clone(),
        port,
    });
    let target = match (socket, port, &tls_target) {
        (Some(path), _, _) => Target::Unix(PathBuf::from(path)),
        (None, Some(port), _) => Target::Tcp { host, port },
        // A SPICE console that listens on its TLS port only (defaultMode='secure').
        (None, None, Some(tls)) => tls.clone(),
        (None, None, None) => {
            return Err(LookupError::NoListener {
                domain: domain.clone(),
                kind,
            })
        }
    };
    if let Some(valid_to) = graphics.attributes.get("passwdValidTo") {
        let until = parse_valid_to(valid_to).ok_or_else(|| {
            bad(format!(
                "passwdValidTo {valid_to:?} is not YYYY-MM-DDTHH:MM:SS"
            ))
        })?;
        let now = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        if now >= until {
            return Err(LookupError::PasswordExpired {
                domain,
                kind,
                valid_to: valid_to.clone(),
            });
        }
    }
    // The graphics element found above is the first of its kind, and so is this.
    let password = passwords
        .iter_mut()
        .find(|(k, _)| k == kind.as_str())
        .and_then(|(_, p)| p.take());
    Ok(Console {
        domain,
        uuid,
        kind,
        target,
        tls_target,
        password,
        keymap,
        instance,
        host: crate::config::DEFAULT_HOST.to_owned(),
    })
}

/// Moves the password out of every `<graphics>` element of `root`, in document order
/// with its type: no copy of a password stays in the parsed tree, which is dropped as
/// ordinary memory, while these are zeroized when dropped.
fn take_passwords(root: &mut Element) -> Vec<(String, Option<Zeroizing<String>>)> {
    let Some(devices) = root.get_mut_child("devices") else {
        return Vec::new();
    };
    devices
        .children
        .iter_mut()
        .filter_map(|n| n.as_mut_element())
        .filter(|e| e.name == "graphics")
        .map(|e| {
            let kind = e.attributes.get("type").cloned().unwrap_or_default();
            (kind, e.attributes.remove("passwd").map(Zeroizing::new))
        })
        .collect()
}

fn looks_like_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// Whether a libvirt error says the domain stopped or went away meanwhile.
fn gone(e: &virt::error::Error) -> bool {
    matches!(
        e.code().unwrap_or(ErrorNumber::InternalError),
        ErrorNumber::NoDomain | ErrorNumber::OperationInvalid
    )
}

/// What [`Libvirt::probe_blocking`] found.
#[derive(Debug, Clone)]
pub struct Probe {
    /// libvirt's version (of the daemon behind the URI), as `9.0.0`.
    pub version: String,
    /// The host's name as libvirt gives it (empty if it would not).
    pub hostname: String,
    /// Running domains.
    pub running: u32,
    /// Defined domains not running.
    pub stopped: u32,
}

/// What to do about a libvirt error that denies vizor access, if `message` is one
/// (libvirt's own words say only what failed).
pub fn access_hint(message: &str) -> Option<&'static str> {
    let m = message.to_ascii_lowercase();
    let denied = [
        "system bus",
        "polkit",
        "permission denied",
        "authentication unavailable",
        "authentication failed",
        "access denied",
        "not authorized",
    ];
    denied.iter().any(|d| m.contains(d)).then_some(
        "vizor's user needs read-write access to libvirt: add it to the libvirt group \
         (usermod -aG libvirt vizor, then restart vizor) or allow it org.libvirt.unix.manage \
         with a polkit rule",
    )
}

/// A libvirt connection for one URI, opened on first use and reopened when it dies.
pub struct Libvirt {
    uri: String,
    /// The host's name (`default` for `[libvirt] uri`).
    host: String,
    /// Where consoles listening on a wildcard address are reached (default: the
    /// URI's host).
    console_address: Option<String>,
    conns: pool::Pool,
}

impl fmt::Debug for Libvirt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Libvirt")
            .field("host", &self.host)
            .field("uri", &self.uri)
            .finish()
    }
}

enum Failure {
    Lookup(LookupError),
    Connection(String),
}

/// How a lookup names its domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainRef {
    /// A name, or a UUID (tried as a UUID first): what an administrator types.
    NameOrUuid(String),
    /// The domain with this UUID alone: what a token names.
    Uuid([u8; 16]),
}

impl fmt::Display for DomainRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainRef::NameOrUuid(n) => f.write_str(n),
            DomainRef::Uuid(u) => f.write_str(&crate::token::uuid_string(u)),
        }
    }
}

impl Libvirt {
    /// A client for `uri`, the host `default`; nothing is opened yet.
    pub fn new(uri: &str) -> Arc<Libvirt> {
        Libvirt::for_host(crate::config::DEFAULT_HOST, uri, None)
    }

    /// A client for the host `host` at `uri`, whose consoles listening on a wildcard
    /// address are at `console_address` (default: the URI's host).
    pub fn for_host(host: &str, uri: &str, console_address: Option<&str>) -> Arc<Libvirt> {
        Arc::new(Libvirt {
            uri: uri.to_owned(),
            host: host.to_owned(),
            console_address: console_address.map(str::to_owned),
            conns: pool::Pool::new(uri),
        })
    }

    /// The host's name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether the host is vizor's own machine: its URI names no host, or loopback
    /// (a name other than `localhost` counts as another machine, so that a domain
    /// there can never point vizor at this machine's consoles).
    pub fn is_local(&self) -> bool {
        let loopback = |h: &str| {
            h.trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.to_canonical().is_loopback())
        };
        // An operator who says this host's consoles are reached on loopback (a tunnel)
        // means it.
        if self.console_address.as_deref().is_some_and(loopback) {
            return true;
        }
        match uri_host(&self.uri) {
            None => true,
            Some(h) => h == "localhost" || loopback(&h),
        }
    }

    /// Where consoles listening on a wildcard address are reached: the configured
    /// `console_address`, else the URI's host (`None`: loopback, a local URI).
    pub fn console_address(&self) -> Option<String> {
        self.console_address.clone().or_else(|| uri_host(&self.uri))
    }

    /// The URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Opens the connection (or finds it alive) and says what is behind it: what vizor
    /// checks at start and `vizor check` reports. Blocking.
    pub fn probe_blocking(&self) -> Result<Probe, LookupError> {
        self.with_connection(true, |conn| {
            let failed = |e: virt::error::Error| {
                if conn.is_alive().unwrap_or(false) {
                    Failure::Lookup(LookupError::Unreachable {
                        uri: self.uri.clone(),
                        message: e.message().to_owned(),
                    })
                } else {
                    Failure::Connection(e.message().to_owned())
                }
            };
            let version = conn.lib_version().map_err(failed)?;
            let hostname = conn.hostname().unwrap_or_default();
            let running = conn.num_of_domains().map_err(failed)?;
            let defined = conn.num_of_defined_domains().map_err(failed)?;
            // What every console lookup needs: a running domain's XML with its
            // passwords (refused on a read-only connection or by a libvirt ACL).
            if let Some(dom) = conn
                .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
                .map_err(failed)?
                .into_iter()
                .next()
            {
                if let Err(e) = dom.xml_desc(virt::sys::VIR_DOMAIN_XML_SECURE) {
                    if !gone(&e) {
                        return Err(Failure::Lookup(LookupError::Unreachable {
                            uri: self.uri.clone(),
                            message: format!(
                                "{} (reading a domain's graphics passwords, which every console needs)",
                                e.message()
                            ),
                        }));
                    }
                }
            }
            Ok(Probe {
                version: format!(
                    "{}.{}.{}",
                    version / 1_000_000,
                    version / 1000 % 1000,
                    version % 1000
                ),
                hostname,
                running,
                stopped: defined,
            })
        })
    }

    /// The running domains' graphics that have no password in libvirt, as
    /// (domain, graphics type): consoles anyone reaching their port opens. Blocking.
    pub fn unprotected_blocking(&self) -> Result<Vec<(String, String)>, LookupError> {
        self.with_connection(false, |conn| {
            let unreachable = |e: virt::error::Error| {
                Failure::Lookup(LookupError::Unreachable {
                    uri: self.uri.clone(),
                    message: e.message().to_owned(),
                })
            };
            let domains = conn
                .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
                .map_err(unreachable)?;
            let mut open = Vec::new();
            for dom in domains {
                let name = dom.name().map_err(unreachable)?;
                // A domain that stopped or went meanwhile has no console to report;
                // any other refusal is one every lookup would meet.
                let xml = match dom.xml_desc(virt::sys::VIR_DOMAIN_XML_SECURE) {
                    Ok(xml) => xml,
                    Err(e) if gone(&e) => continue,
                    Err(e) => return Err(unreachable(e)),
                };
                let xml = Zeroizing::new(xml);
                let Ok(mut root) = Element::parse(xml.as_bytes()) else {
                    continue;
                };
                for (kind, password) in take_passwords(&mut root) {
                    if password.is_none() && (kind == "vnc" || kind == "spice") {
                        open.push((name.clone(), kind));
                    }
                }
            }
            Ok(open)
        })
    }

    /// Looks up `domain` and its console of `kind`, off the executor.
    pub async fn lookup(
        self: &Arc<Self>,
        domain: DomainRef,
        kind: ConsoleKind,
    ) -> Result<Console, LookupError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.lookup_blocking(&domain, kind, SystemTime::now()))
            .await
            .unwrap_or_else(|e| {
                Err(LookupError::Unreachable {
                    uri: self.uri.clone(),
                    message: format!("lookup task failed: {e}"),
                })
            })
    }

    /// The blocking lookup; call it from a blocking context only.
    pub fn lookup_blocking(
        &self,
        domain: &DomainRef,
        kind: ConsoleKind,
        now: SystemTime,
    ) -> Result<Console, LookupError> {
        self.with_connection(false, |conn| self.query(conn, domain, kind, now))
    }

    /// The name and UUID of `domain` (a name or a UUID), running or not; blocking.
    pub fn identify_blocking(&self, domain: &str) -> Result<(String, [u8; 16]), LookupError> {
        let domain = DomainRef::NameOrUuid(domain.to_owned());
        self.with_connection(false, |conn| {
            let dom = self.find(conn, &domain)?;
            let classify = |e: virt::error::Error| self.classify(conn, &domain, e);
            let name = dom.name().map_err(classify)?;
            let uuid = dom.uuid_string().map_err(classify)?;
            let uuid = crate::token::parse_uuid(&uuid).ok_or_else(|| {
                Failure::Lookup(LookupError::BadXml {
                    domain: name.clone(),
                    why: format!("libvirt gave the UUID {uuid:?}"),
                })
            })?;
            Ok((name, uuid))
        })
    }

    /// Runs `f` on a connection of its own (see [`pool`]); one retry on a connection
    /// opened anew, since the first failure may be a connection that died since last
    /// use. `probe`: the prober's call, which reconnects even within the backoff.
    fn with_connection<T>(
        &self,
        probe: bool,
        f: impl Fn(&Connect) -> Result<T, Failure>,
    ) -> Result<T, LookupError> {
        let unreachable = |message: String| LookupError::Unreachable {
            uri: self.uri.clone(),
            message,
        };
        for attempt in 0..2 {
            let conn = if attempt == 0 {
                self.conns.take(probe)
            } else {
                self.conns.take_new(probe)
            }
            .map_err(unreachable)?;
            match f(&conn) {
                Ok(v) => {
                    self.conns.give_back(conn);
                    return Ok(v);
                }
                Err(Failure::Lookup(e)) => {
                    self.conns.give_back(conn);
                    return Err(e);
                }
                Err(Failure::Connection(message)) => {
                    // Dead: dropped, not given back (closing it asks libvirt nothing).
                    drop(conn);
                    let then = if attempt == 0 {
                        "trying another"
                    } else {
                        "giving up"
                    };
                    tracing::warn!(host = %self.host, uri = %self.uri, error = %message,
                        "libvirt connection lost; {then}");
                    if attempt == 1 {
                        return Err(unreachable(message));
                    }
                }
            }
        }
        Err(unreachable("lookup failed".into()))
    }

    fn classify(&self, conn: &Connect, domain: &DomainRef, e: virt::error::Error) -> Failure {
        match e.code().unwrap_or(ErrorNumber::InternalError) {
            ErrorNumber::NoDomain => Failure::Lookup(LookupError::NoSuchDomain(domain.to_string())),
            ErrorNumber::OperationInvalid => {
                Failure::Lookup(LookupError::NotRunning(domain.to_string()))
            }
            ErrorNumber::OperationDenied => Failure::Lookup(LookupError::Unreachable {
                uri: self.uri.clone(),
                message: format!("{e} (reading graphics passwords needs a read-write connection)"),
            }),
            _ if conn.is_alive().unwrap_or(false) => Failure::Lookup(LookupError::Unreachable {
                uri: self.uri.clone(),
                message: e.message().to_owned(),
            }),
            _ => Failure::Connection(e.message().to_owned()),
        }
    }

    /// The domain `domain` names. A UUID-bound reference finds that domain alone.
    fn find(&self, conn: &Connect, domain: &DomainRef) -> Result<Domain, Failure> {
        let classify = |e| self.classify(conn, domain, e);
        match domain {
            DomainRef::Uuid(uuid) => conn
                .lookup_domain_by_uuid_string(&crate::token::uuid_string(uuid))
                .map_err(classify),
            DomainRef::NameOrUuid(name) if looks_like_uuid(name) => conn
                .lookup_domain_by_uuid_string(name)
                .or_else(|_| conn.lookup_domain_by_name(name))
                .map_err(classify),
            DomainRef::NameOrUuid(name) => conn.lookup_domain_by_name(name).map_err(classify),
        }
    }

    fn query(
        &self,
        conn: &Connect,
        domain: &DomainRef,
        kind: ConsoleKind,
        now: SystemTime,
    ) -> Result<Console, Failure> {
        let classify = |e| self.classify(conn, domain, e);
        let dom = self.find(conn, domain)?;
        if !dom.is_active().map_err(classify)? {
            return Err(Failure::Lookup(LookupError::NotRunning(domain.to_string())));
        }
        let xml = Zeroizing::new(
            dom.xml_desc(virt::sys::VIR_DOMAIN_XML_SECURE)
                .map_err(classify)?,
        );
        let mut console = console_from_xml(&xml, kind, self.console_address().as_deref(), now)
            .map_err(Failure::Lookup)?;
        console.host = self.host.clone();
        if !self.is_local() {
            let local = |t: &Target| match t {
                Target::Unix(_) => true,
                Target::Tcp { host, .. } => {
                    host == "localhost"
                        || host
                            .trim_matches(['[', ']'])
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| ip.to_canonical().is_loopback())
                }
            };
            if let Some(t) = std::iter::once(&console.target)
                .chain(&console.tls_target)
                .find(|t| local(t))
            {
                return Err(Failure::Lookup(LookupError::ListensLocally {
                    domain: console.domain.clone(),
                    host: self.host.clone(),
                    target: t.to_string(),
                }));
            }
        }
        if let DomainRef::Uuid(uuid) = domain {
            if crate::token::parse_uuid(&console.uuid) != Some(*uuid) {
                return Err(Failure::Lookup(LookupError::BadXml {
                    domain: console.domain.clone(),
                    why: format!("its UUID {:?} is not the one looked up", console.uuid),
                }));
            }
        }
        Ok(console)
    }
}

pub mod hosts;
pub mod pool;

#[cfg(test)]
mod tests;
