//! `[upstream] allow`: the only places vizor connects to for a console.
//!
//! A console's address comes from the domain's XML, which a guest owner who may edit
//! it, or a compromised host, controls: without a list, vizor would connect wherever
//! that says (a port scanner with vizor's network position). Every connection to a
//! console is checked here first ([`crate::session`]'s `connect`):
//! - a TCP address must be inside one of the networks, or be an address the libvirt
//!   host's name resolves to now (by default). An address is checked as written; a
//!   name is resolved and only its addresses inside the list are tried, and a name
//!   that does not resolve is refused alike, so the refusal tells nothing of the name.
//! - a UNIX socket must be under one of the directories both as written and with
//!   every symbolic link resolved, and is then opened along that resolved path with
//!   no symbolic link followed ([`Allow::open_socket`]): a socket replaced by a link
//!   meanwhile is refused, not followed.
//!
//! The list restricts addresses and sockets, not ports.

use ipnet::IpNet;
use std::fmt;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

/// Where vizor may connect for a console.
#[derive(Clone, PartialEq, Eq)]
pub struct Allow {
    nets: Vec<IpNet>,
    dirs: Vec<PathBuf>,
    /// Host names whose addresses, resolved when vizor connects, are allowed too: the
    /// libvirt host's (the default list's), whose address may change.
    names: Vec<String>,
}

/// The directories libvirt keeps QEMU's console sockets in (`unix` graphics listens;
/// its own are under `/var/lib/libvirt/qemu/domain-N-NAME/`): allowed by default for a
/// local libvirt.
pub const LIBVIRT_SOCKET_DIRS: [&str; 3] = [
    "/run/libvirt/qemu/",
    "/var/run/libvirt/qemu/",
    "/var/lib/libvirt/qemu/",
];

/// Why a socket was not opened.
#[derive(Debug)]
pub enum SocketRefused {
    /// Outside the list (as written, or with its links resolved).
    NotAllowed,
    /// Inside, but it could not be opened (or is not a socket).
    Io(std::io::Error),
}

impl Allow {
    /// The list from `[upstream] allow` entries: addresses and networks ("10.0.0.0/8",
    /// "127.0.0.1", "::1/128") and socket directories ("unix:/var/lib/libvirt/qemu/").
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Allow, String> {
        let mut allow = Allow::nothing();
        for e in entries {
            let e = e.as_ref().trim();
            if let Some(dir) = e.strip_prefix("unix:") {
                let path = Path::new(dir);
                if !path.is_absolute() || !plain(path) {
                    return Err(format!(
                        "{e:?}: a socket directory must be an absolute path without \".\" or \"..\", like \"unix:/var/lib/libvirt/qemu/\""
                    ));
                }
                allow.dir(path);
            } else {
                let net = e
                    .parse::<IpNet>()
                    .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        format!(
                            "{e:?} is not an address, a network like \"10.0.0.0/8\", or a socket directory like \"unix:/var/lib/libvirt/qemu/\""
                        )
                    })?;
                if let IpNet::V6(v6) = net {
                    if v6.addr().to_ipv4_mapped().is_some() {
                        return Err(format!(
                            "{e:?}: write an IPv4-mapped address as the IPv4 address it maps"
                        ));
                    }
                }
                allow.nets.push(net.trunc());
            }
        }
        Ok(allow)
    }

    fn nothing() -> Allow {
        Allow {
            nets: Vec::new(),
            dirs: Vec::new(),
            names: Vec::new(),
        }
    }

    /// Adds a socket directory, and the same with its links resolved (so that
    /// `/var/run/libvirt/qemu/` also covers `/run/libvirt/qemu/`, which it is).
    fn dir(&mut self, path: &Path) {
        self.dirs.push(path.to_path_buf());
        if let Ok(real) = std::fs::canonicalize(path) {
            if !self.dirs.contains(&real) {
                self.dirs.push(real);
            }
        }
    }

    /// The default: the libvirt host's addresses (`hosts`, and `names` resolved when
    /// vizor connects); for a libvirt on this machine (`local`), loopback and
    /// libvirt's socket directories too.
    pub fn default_for(local: bool, hosts: &[IpAddr], names: &[String]) -> Allow {
        let mut allow = Allow::nothing();
        if local {
            allow.nets.extend(
                ["127.0.0.0/8", "::1/128"]
                    .iter()
                    .filter_map(|n| n.parse::<IpNet>().ok()),
            );
            for d in LIBVIRT_SOCKET_DIRS {
                allow.dir(Path::new(d));
            }
        }
        for ip in hosts {
            let net = IpNet::from(ip.to_canonical());
            if !allow.nets.iter().any(|n| n.contains(&ip.to_canonical())) {
                allow.nets.push(net);
            }
        }
        allow.names = names.to_vec();
        allow
    }

    /// Adds what `other` allows.
    fn add(&mut self, other: Allow) {
        for n in other.nets {
            if !self.nets.contains(&n) {
                self.nets.push(n);
            }
        }
        for d in other.dirs {
            if !self.dirs.contains(&d) {
                self.dirs.push(d);
            }
        }
        for n in other.names {
            if !self.names.contains(&n) {
                self.names.push(n);
            }
        }
    }

    /// Whether `ip` is inside the networks (an IPv4-mapped IPv6 address as its IPv4
    /// one).
    pub fn ip(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// Whether `ip` may be connected to: inside the networks, or an address of one of
    /// the names as they resolve now.
    pub async fn permits(&self, ip: IpAddr) -> bool {
        if self.ip(ip) {
            return true;
        }
        let ip = ip.to_canonical();
        for name in &self.names {
            if let Ok(addrs) = tokio::net::lookup_host((name.as_str(), 0)).await {
                if addrs.into_iter().any(|a| a.ip().to_canonical() == ip) {
                    return true;
                }
            }
        }
        false
    }

    /// Whether the socket `path` is under one of the directories as written (whole
    /// components; a path with "." or ".." is never allowed).
    pub fn path(&self, path: &Path) -> bool {
        path.is_absolute() && plain(path) && self.dirs.iter().any(|d| path.starts_with(d))
    }

    /// Opens the socket `path` for connecting, if it is allowed: under a directory as
    /// written and with its links resolved, then opened along the resolved path with
    /// no link followed (`openat2`, `RESOLVE_NO_SYMLINKS`), and a socket. Connect to
    /// it through `/proc/self/fd/N`: whatever changes at `path` meanwhile, this is
    /// the socket that was checked.
    pub fn open_socket(&self, path: &Path) -> Result<OwnedFd, SocketRefused> {
        use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
        if !self.path(path) {
            return Err(SocketRefused::NotAllowed);
        }
        let real = std::fs::canonicalize(path).map_err(SocketRefused::Io)?;
        if !self.path(&real) {
            return Err(SocketRefused::NotAllowed);
        }
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
        let fd = openat2(nix::fcntl::AT_FDCWD, &real, how)
            .map_err(|e| SocketRefused::Io(std::io::Error::from(e)))?;
        let st = nix::sys::stat::fstat(&fd).map_err(|e| SocketRefused::Io(e.into()))?;
        if st.st_mode & libc_mode_mask() != nix::sys::stat::SFlag::S_IFSOCK.bits() {
            return Err(SocketRefused::Io(std::io::Error::other("not a socket")));
        }
        Ok(fd)
    }
}

/// The file-type bits of `st_mode`.
fn libc_mode_mask() -> nix::libc::mode_t {
    nix::sys::stat::SFlag::S_IFMT.bits()
}

/// The list in force: `[upstream] allow` as configured, or else the default for the
/// libvirt `hosts` (see [`Allow::default_for`]), each by its console address (its
/// `console_address`, else its URI's host): local when that names no host or a host
/// that is this machine's loopback.
pub fn in_force(configured: Option<&Allow>, hosts: &[crate::config::HostConfig]) -> Allow {
    if let Some(a) = configured {
        return a.clone();
    }
    let mut allow = Allow::nothing();
    for h in hosts {
        let address = h
            .console_address
            .clone()
            .or_else(|| crate::libvirt::uri_host(&h.uri));
        allow.add(default_for_address(address));
    }
    allow
}

/// The default for one host whose consoles are at `address` (`None`: this machine).
fn default_for_address(address: Option<String>) -> Allow {
    let Some(host) = address else {
        return Allow::default_for(true, &[], &[]);
    };
    let (hosts, names) = match host.trim_matches(['[', ']']).parse::<IpAddr>() {
        Ok(ip) => (vec![ip], Vec::new()),
        Err(_) => {
            let resolved: Vec<IpAddr> = match std::net::ToSocketAddrs::to_socket_addrs(&(
                host.as_str(),
                0,
            )) {
                Ok(addrs) => addrs.map(|a| a.ip()).collect(),
                Err(e) => {
                    tracing::warn!(host, error = %e, "the libvirt host's name does not resolve now: its consoles are allowed once it does");
                    Vec::new()
                }
            };
            (resolved, vec![host])
        }
    };
    let local = !hosts.is_empty() && hosts.iter().all(|ip| ip.to_canonical().is_loopback());
    Allow::default_for(local, &hosts, &names)
}

/// No "." or ".." component: the path means what it says. (`Path::components` drops
/// a "." that is not first, so the text is looked at too.)
fn plain(path: &Path) -> bool {
    let text = path.as_os_str().as_encoded_bytes();
    let dot = text.windows(3).any(|w| w == b"/./") || text.ends_with(b"/.");
    !dot && path
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

impl fmt::Display for Allow {
    /// As configured: `10.0.0.0/8, unix:/var/lib/libvirt/qemu/, (libvirt host) hv1`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items = self
            .nets
            .iter()
            .map(|n| n.to_string())
            .chain(self.dirs.iter().map(|d| format!("unix:{}", d.display())))
            .chain(self.names.iter().map(|n| format!("(libvirt host) {n}")))
            .collect::<Vec<_>>();
        if items.is_empty() {
            f.write_str("nothing")
        } else {
            f.write_str(&items.join(", "))
        }
    }
}

impl fmt::Debug for Allow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Allow({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_addresses_and_mapped_addresses() {
        let a = Allow::parse(&["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]).unwrap();
        assert!(a.ip(ip("10.1.2.3")));
        assert!(a.ip(ip("192.0.2.7")));
        assert!(!a.ip(ip("192.0.2.8")));
        assert!(a.ip(ip("::ffff:10.0.0.1")), "IPv4-mapped counts as IPv4");
        assert!(a.ip(ip("2001:db8::1")));
        assert!(!a.ip(ip("127.0.0.1")), "loopback only when listed");
        assert!(
            !a.ip(ip("0.0.0.0")) && !a.ip(ip("::")),
            "nor the unspecified"
        );
        assert!(!a.ip(ip("11.0.0.1")));
        // A network written with host bits is the network.
        let b = Allow::parse(&["10.9.9.9/8"]).unwrap();
        assert!(b.ip(ip("10.0.0.1")));
    }

    #[test]
    fn socket_directories_by_whole_components() {
        let a = Allow::parse(&["unix:/run/libvirt/qemu/"]).unwrap();
        assert!(a.path(Path::new("/run/libvirt/qemu/vnc-1.sock")));
        assert!(a.path(Path::new("/run/libvirt/qemu/d/vnc.sock")));
        assert!(!a.path(Path::new("/run/libvirt/qemuX/vnc.sock")));
        assert!(!a.path(Path::new("/run/libvirt/qemu/../../../tmp/x.sock")));
        assert!(!a.path(Path::new("/run/libvirt/qemu/./x.sock")));
        assert!(!a.path(Path::new("/run/libvirt/qemu/.")));
        assert!(!a.path(Path::new("run/libvirt/qemu/x.sock")));
        assert!(!a.path(Path::new("/tmp/vnc.sock")));
    }

    #[test]
    fn a_socket_is_opened_along_its_real_path_and_a_link_out_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("allowed");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let a = Allow::parse(&[format!("unix:{}", allowed.display())]).unwrap();
        let sock = allowed.join("vnc.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(a.open_socket(&sock).is_ok());
        // A link inside that points outside: refused, not followed.
        let far = outside.join("other.sock");
        let _o = std::os::unix::net::UnixListener::bind(&far).unwrap();
        let link = allowed.join("link.sock");
        std::os::unix::fs::symlink(&far, &link).unwrap();
        assert!(matches!(
            a.open_socket(&link),
            Err(SocketRefused::NotAllowed)
        ));
        // Inside, but not a socket.
        let file = allowed.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(a.open_socket(&file), Err(SocketRefused::Io(_))));
        assert!(matches!(
            a.open_socket(&outside.join("other.sock")),
            Err(SocketRefused::NotAllowed)
        ));
    }

    #[test]
    fn bad_entries_say_what_is_expected() {
        for (bad, says) in [
            ("10.0.0.0/33", "not an address"),
            ("host.example", "not an address"),
            ("unix:relative/dir", "absolute path"),
            ("unix:/run/../tmp", "absolute path"),
            ("::ffff:10.0.0.0/104", "IPv4-mapped"),
        ] {
            let e = Allow::parse(&[bad]).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_default_is_loopback_and_libvirts_sockets_for_a_local_libvirt_only() {
        let a = in_force(None, &one("qemu:///system"));
        assert!(a.ip(ip("127.0.0.1")) && a.ip(ip("::1")));
        assert!(!a.ip(ip("192.0.2.10")) && !a.ip(ip("10.0.0.1")));
        for d in LIBVIRT_SOCKET_DIRS {
            assert!(a.path(&Path::new(d).join("vnc.sock")), "{d}");
        }
        // A remote libvirt: its consoles are there, never on vizor's own loopback.
        let r = in_force(None, &one("qemu+tcp://192.0.2.10/system"));
        assert!(r.ip(ip("192.0.2.10")));
        assert!(!r.ip(ip("127.0.0.1")) && !r.path(Path::new("/run/libvirt/qemu/x.sock")));
        assert_eq!(r.to_string(), "192.0.2.10/32");
        // Configured: as configured.
        let c = Allow::parse(&["10.0.0.0/8"]).unwrap();
        assert_eq!(in_force(Some(&c), &one("qemu:///system")), c);
        assert_eq!(Allow::parse::<&str>(&[]).unwrap().to_string(), "nothing");
    }

    fn host(name: &str, uri: &str, console_address: Option<&str>) -> crate::config::HostConfig {
        crate::config::HostConfig {
            name: name.into(),
            uri: uri.into(),
            console_address: console_address.map(Into::into),
            upstream_tls: None,
        }
    }

    fn one(uri: &str) -> Vec<crate::config::HostConfig> {
        vec![host("default", uri, None)]
    }

    #[test]
    fn the_default_for_many_hosts_is_each_hosts_console_address() {
        let a = in_force(
            None,
            &[
                host("local", "qemu:///system", None),
                host("n2", "qemu+tcp://10.213.0.2/system", None),
                host("n3", "qemu+ssh://root@mgmt-n3/system", Some("192.0.2.30")),
            ],
        );
        assert!(a.ip(ip("127.0.0.1")) && a.ip(ip("10.213.0.2")) && a.ip(ip("192.0.2.30")));
        assert!(a.path(Path::new("/run/libvirt/qemu/x.sock")));
        // Not the management name the console address stands in for, nor a neighbour.
        assert!(!a.ip(ip("10.213.0.3")));
        assert!(!a.to_string().contains("mgmt-n3"), "{a}");
        // Only remote hosts: no loopback.
        let r = in_force(None, &[host("n2", "qemu+tcp://10.213.0.2/system", None)]);
        assert!(!r.ip(ip("127.0.0.1")) && r.ip(ip("10.213.0.2")));
    }

    #[tokio::test]
    async fn the_libvirt_hosts_name_is_resolved_when_vizor_connects() {
        let a = Allow::default_for(false, &[], &["localhost".to_owned()]);
        assert!(!a.ip(ip("127.0.0.1")));
        assert!(a.permits(ip("127.0.0.1")).await);
        assert!(!a.permits(ip("192.0.2.1")).await);
    }
}
