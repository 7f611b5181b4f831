//! Admission: what a good token must still pass before a session opens (its spend,
//! the console's lookup, a session slot), the same for every console kind.

use super::*;

/// Looks up a console on the host `host` (timed and counted per host there), then
/// checks its password as `[libvirt] require_password` says.
pub(super) async fn lookup(
    app: &App,
    host: &str,
    domain: DomainRef,
    kind: ConsoleKind,
) -> Result<Console, LookupError> {
    let r = app.hosts.lookup(host, domain, kind).await;
    refused_if_unprotected(app, r)
}

/// Finds a console on `host` when named, else on whichever host has it (for the
/// console API), then checks its password as [`lookup`] does.
pub(super) async fn find(
    app: &App,
    host: Option<&str>,
    domain: DomainRef,
    kind: ConsoleKind,
) -> Result<Console, LookupError> {
    let r = app.hosts.find(host, domain, kind).await;
    refused_if_unprotected(app, r)
}

fn refused_if_unprotected(
    app: &App,
    r: Result<Console, LookupError>,
) -> Result<Console, LookupError> {
    let r = r?;
    let host = r.host.clone();
    unprotected(app, r).inspect_err(|e| app.hosts.count(&host, e))
}

/// A console without a password in libvirt opens for anyone who reaches its port:
/// refused under `[libvirt] require_password`, and said loudly otherwise.
pub(super) fn unprotected(app: &App, console: Console) -> Result<Console, LookupError> {
    if console.password.is_some() {
        return Ok(console);
    }
    if app.config.libvirt.require_password {
        return Err(LookupError::NoPassword {
            domain: console.domain,
            kind: console.kind,
        });
    }
    warn!(domain = %console.domain, kind = %console.kind,
        "the VM console has no password in libvirt: anyone who reaches its port opens it, past vizor and its audit log; set passwd on the domain's graphics, or [libvirt] require_password = true to refuse it");
    Ok(console)
}
