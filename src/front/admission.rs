//! Admission: what a good token must still pass before a session opens (its spend,
//! the console's lookup, a session slot), the same for every console kind.

use super::*;

/// Looks up a console, timing the call and counting failures.
pub(super) async fn lookup(
    app: &App,
    domain: DomainRef,
    kind: ConsoleKind,
) -> Result<Console, LookupError> {
    let started = std::time::Instant::now();
    let r = app.libvirt.lookup(domain, kind).await;
    app.metrics()
        .libvirt_lookup_seconds
        .observe(started.elapsed().as_secs_f64());
    let r = r.and_then(|c| unprotected(app, c));
    if let Err(e) = &r {
        app.metrics()
            .libvirt_errors_total
            .with_label_values(&[e.reason()])
            .inc();
    }
    r
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
