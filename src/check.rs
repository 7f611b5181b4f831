//! `vizor check --config FILE`: everything `vizor serve` would refuse at start, and
//! what it would warn about, reported item by item without serving (like `nginx -t`).
//!
//! It reads the configuration, the key files, the TLS files and the console clients'
//! directories, looks at the audit log's and recording directory's places (without
//! creating anything there, so files keep the service user's ownership), and asks
//! libvirt what `vizor serve` will ask it. It does not listen.

use crate::audit::ChainKey;
use crate::config::Config;
use crate::libvirt::Libvirt;
use crate::lockfile::Lock;
use crate::token::TokenKey;
use std::path::Path;
use std::time::Duration;

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Checked and fine.
    Ok(String),
    /// Works, but an operator should know.
    Warn(String),
    /// `vizor serve` would refuse to start (or fail at once).
    Fail(String),
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Ok(t) => write!(f, "ok    {t}"),
            Finding::Warn(t) => write!(f, "warn  {t}"),
            Finding::Fail(t) => write!(f, "FAIL  {t}"),
        }
    }
}

/// How long `vizor check` waits for libvirt.
const LIBVIRT_TIMEOUT: Duration = Duration::from_secs(30);

/// Checks the configuration at `path`; each finding in order. A configuration that
/// cannot be read is one failure and nothing else.
pub fn check(path: &Path) -> Vec<Finding> {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return vec![Finding::Fail(e.to_string())],
    };
    let mut out = vec![Finding::Ok(format!("configuration {}", path.display()))];
    if nix::unistd::getuid().is_root() {
        out.push(Finding::Warn(
            "checked as root, who may read and write what the service's user cannot: \
             run it as that user (sudo -u vizor vizor check --config ...)"
                .into(),
        ));
    }
    let mut note = |r: Result<String, String>| {
        out.push(match r {
            Ok(t) => Finding::Ok(t),
            Err(t) => Finding::Fail(t),
        })
    };
    let token = TokenKey::load(&config.tokens.key_file).map_err(|e| e.to_string());
    note(
        token
            .as_ref()
            .map(|_| format!("[tokens] key_file {}", config.tokens.key_file.display()))
            .map_err(Clone::clone),
    );
    let chain = ChainKey::load(&config.audit.key_file).map_err(|e| e.to_string());
    note(match (&token, &chain) {
        (_, Err(e)) => Err(e.clone()),
        (Ok(t), Ok(c)) => crate::serve::keys_apart(&config, t, c).map(|()| {
            format!(
                "[audit] key_file {} (apart from the token key)",
                config.audit.key_file.display()
            )
        }),
        (Err(_), Ok(_)) => Ok(format!(
            "[audit] key_file {}",
            config.audit.key_file.display()
        )),
    });
    if config.api.admin_key_file.is_some() || config.api.admin_keys_file.is_some() {
        note(
            crate::admins::Admins::load(
                config.api.admin_key_file.as_deref(),
                config.api.admin_keys_file.as_deref(),
            )
            .map(|a| {
                format!(
                    "[api] admin keys: {} administrator(s)",
                    a.map_or(0, |a| a.len())
                )
            }),
        );
    }
    if let Some(p) = &config.metrics.key_file {
        note(
            crate::serve::load_bearer_key(p, "metrics key file")
                .map(|_| format!("[metrics] key_file {}", p.display())),
        );
    }
    match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(cert), Some(key)) => note(
            crate::tls::Tls::load(cert, key)
                .map(|_| format!("[server] tls_cert {} and tls_key", cert.display())),
        ),
        (None, None) => {}
        _ => note(Err(
            "[server] tls_cert and tls_key go together: set both or neither".into(),
        )),
    }
    if let Some(up) = &config.upstream_tls {
        note(
            crate::tls::UpstreamTls::load(up)
                .map(|_| format!("[upstream_tls] ca {}", up.ca.display())),
        );
    }
    if config.console.novnc.is_some() || config.console.spice_html5.is_some() {
        note(crate::console::check(&config.console).map(|()| "[console] clients".into()));
    }
    out.extend(audit_place(&config));
    out.extend(libvirt(&config));
    out
}

/// The audit log's directory and lock, and the recording directory.
fn audit_place(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    let log = &config.audit.path;
    let dir = match log.parent() {
        Some(d) if d.as_os_str().is_empty() => Path::new("."),
        Some(d) => d,
        None => Path::new("/"),
    };
    out.push(match writable_dir(dir) {
        Err(e) => Finding::Fail(format!("audit log {}: {e}", log.display())),
        Ok(()) if log.exists() && !writable(log) => Finding::Fail(format!(
            "audit log {}: the file is not writable by this user",
            log.display()
        )),
        Ok(()) => match Lock::holder(&crate::lockfile::of_log(log)) {
            Ok(Some(pid)) => Finding::Ok(format!(
                "audit log {} (in use by {}: a running vizor serve)",
                log.display(),
                pid.map_or("another process".into(), |p| format!("pid {p}"))
            )),
            Ok(None) => Finding::Ok(format!("audit log {}", log.display())),
            Err(e) => Finding::Fail(format!("audit log {}: its lock file: {e}", log.display())),
        },
    });
    if let Some(rec) = &config.audit.record_dir {
        out.push(match writable_dir(rec) {
            Err(e) => Finding::Fail(format!("[audit] record_dir {}: {e}", rec.display())),
            Ok(()) => Finding::Ok(format!("[audit] record_dir {}", rec.display())),
        });
    }
    out
}

fn writable(path: &Path) -> bool {
    nix::unistd::access(path, nix::unistd::AccessFlags::W_OK).is_ok()
}

fn writable_dir(dir: &Path) -> Result<(), String> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("its directory {} does not exist", dir.display()))
        }
        Err(e) => Err(format!("its directory {}: {e}", dir.display())),
        Ok(m) if !m.is_dir() => Err(format!("{} is not a directory", dir.display())),
        Ok(_) if !writable(dir) => Err(format!(
            "its directory {} is not writable by this user",
            dir.display()
        )),
        Ok(_) => Ok(()),
    }
}

/// Every libvirt host reachable, and which running consoles have no password. With
/// many hosts, one that does not answer is a warning while another does (vizor serves
/// the hosts that answer).
fn libvirt(config: &Config) -> Vec<Finding> {
    let hosts = config.libvirt.hosts();
    if let [one] = hosts.as_slice() {
        return libvirt_host(config, one);
    }
    let mut out = Vec::new();
    let mut any_up = false;
    for h in &hosts {
        let found = libvirt_host(config, h);
        // The first finding is an Ok exactly when the host answered.
        any_up |= matches!(found.first(), Some(Finding::Ok(_)));
        out.extend(found.into_iter().map(|f| match f {
            Finding::Ok(m) => Finding::Ok(format!("host {}: {m}", h.name)),
            Finding::Warn(m) => Finding::Warn(format!("host {}: {m}", h.name)),
            Finding::Fail(m) => Finding::Fail(format!("host {}: {m}", h.name)),
        }));
    }
    if any_up {
        out = out
            .into_iter()
            .map(|f| match f {
                Finding::Fail(m) => Finding::Warn(format!(
                    "{m} (vizor serves the hosts that answer, and tries this one again every 10s)"
                )),
                f => f,
            })
            .collect();
    }
    out
}

/// One libvirt host reachable, and which of its running consoles have no password.
fn libvirt_host(config: &Config, host: &crate::config::HostConfig) -> Vec<Finding> {
    let uri = host.uri.clone();
    let libvirt = Libvirt::for_host(&host.name, &uri, host.console_address.as_deref());
    let (tx, rx) = std::sync::mpsc::channel();
    let l = libvirt.clone();
    std::thread::spawn(move || {
        let _ = tx.send(l.probe_blocking().and_then(|p| {
            let open = l.unprotected_blocking()?;
            Ok((p, open))
        }));
    });
    let (probe, open) = match rx.recv_timeout(LIBVIRT_TIMEOUT) {
        Err(_) => {
            return vec![Finding::Fail(format!(
                "libvirt at {uri} did not answer within {}",
                humantime::format_duration(LIBVIRT_TIMEOUT)
            ))]
        }
        Ok(Err(e)) => {
            let hint = crate::libvirt::access_hint(&e.to_string())
                .map(|h| format!(" ({h})"))
                .unwrap_or_default();
            let fail = Finding::Fail(format!("{e}{hint}"));
            return if config.libvirt.wait {
                vec![Finding::Warn(format!(
                    "{fail} ([libvirt] wait = true: vizor serve would start and wait for it)"
                ))]
            } else {
                vec![fail]
            };
        }
        Ok(Ok(x)) => x,
    };
    let mut out = vec![Finding::Ok(format!(
        "libvirt {uri}: libvirt {}{}, {} running and {} stopped domains",
        probe.version,
        if probe.hostname.is_empty() {
            String::new()
        } else {
            format!(" on {}", probe.hostname)
        },
        probe.running,
        probe.stopped
    ))];
    for (domain, kind) in open {
        out.push(Finding::Warn(if config.libvirt.require_password {
            format!("domain {domain:?}: its {kind} graphics have no password: refused ([libvirt] require_password)")
        } else {
            format!("domain {domain:?}: its {kind} graphics have no password: anyone who reaches its port opens it, past vizor")
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_hosts(a: &str, b: &str) -> Config {
        Config::parse(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\
             [[libvirt.hosts]]\nname = \"a\"\nuri = \"{a}\"\n\
             [[libvirt.hosts]]\nname = \"b\"\nuri = \"{b}\"\n\
             [tokens]\nkey_file = \"t.key\"\n\
             [audit]\npath = \"a.jsonl\"\nkey_file = \"a.key\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn each_host_is_checked_and_one_down_is_a_warning_while_another_answers() {
        let found = libvirt(&two_hosts(
            "test:///default",
            "test:///nonexistent/node.xml",
        ));
        assert!(
            found.iter().any(
                |f| matches!(f, Finding::Ok(m) if m.starts_with("host a: libvirt test:///default"))
            ),
            "{found:?}"
        );
        assert!(
            found.iter().any(|f| matches!(f, Finding::Warn(m)
                if m.starts_with("host b: ") && m.contains("tries this one again"))),
            "{found:?}"
        );
        assert!(
            !found.iter().any(|f| matches!(f, Finding::Fail(_))),
            "{found:?}"
        );
        // None answers: vizor serve would not start.
        let found = libvirt(&two_hosts(
            "test:///nonexistent/a.xml",
            "test:///nonexistent/b.xml",
        ));
        assert_eq!(
            found
                .iter()
                .filter(|f| matches!(f, Finding::Fail(_)))
                .count(),
            2,
            "{found:?}"
        );
    }
}
