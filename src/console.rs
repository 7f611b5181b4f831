//! The console page, `GET /console?token=`: one small page of vizor's own that loads
//! noVNC (for a VNC token) or spice-html5 (for a SPICE token) from the directories
//! `[console]` names and connects it to `/websockify` with the token.
//!
//! The page is rendered after the token is checked (but not spent): a link that has
//! expired, was used already or is not a token at all gets a page that says so in
//! words, and a good one gets the client its kind needs. Everything is served from
//! vizor's own origin, so there is nothing cross-origin or mixed to fail, and a strict
//! Content-Security-Policy allows nothing else.

use crate::config::ConsoleConfig;
use crate::token::ConsoleKind;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Response, StatusCode};
use std::path::Path;

type Resp = Response<Full<Bytes>>;

/// The page's script and style, built into the binary.
const SCRIPT: &str = include_str!("../web/console.js");
const STYLE: &str = include_str!("../web/console.css");
/// The admin page's script and style.
const ADMIN_SCRIPT: &str = include_str!("../web/admin.js");
const ADMIN_STYLE: &str = include_str!("../web/admin.css");

/// Where the page's own assets live.
pub const ASSET_PREFIX: &str = "/_vizor/";
/// Where noVNC's package is served.
pub const NOVNC_PREFIX: &str = "/novnc/";
/// Where spice-html5 is served.
pub const SPICE_PREFIX: &str = "/spice-html5/";

/// Checks at startup that the configured client directories hold the clients.
pub fn check(config: &ConsoleConfig) -> Result<(), String> {
    let need = |dir: &Option<std::path::PathBuf>, key: &str, file: &str, what: &str| {
        let Some(dir) = dir else { return Ok(()) };
        if dir.join(file).is_file() {
            Ok(())
        } else {
            Err(format!(
                "[console] {key} = {}: no {file} there; it must name {what}",
                dir.display()
            ))
        }
    };
    need(
        &config.novnc,
        "novnc",
        "core/rfb.js",
        "the root of noVNC's npm package @novnc/novnc",
    )?;
    need(
        &config.spice_html5,
        "spice_html5",
        "main.js",
        "the spice-html5 directory (Debian: /usr/share/spice-html5)",
    )
}

/// The directory a console-client path is served from, and the path inside it, when
/// `url_path` names one of the clients.
pub fn client_dir<'a>(config: &'a ConsoleConfig, url_path: &'a str) -> Option<(&'a Path, &'a str)> {
    if let Some(rest) = url_path.strip_prefix(NOVNC_PREFIX) {
        return config.novnc.as_deref().map(|d| (d, rest));
    }
    if let Some(rest) = url_path.strip_prefix(SPICE_PREFIX) {
        return config.spice_html5.as_deref().map(|d| (d, rest));
    }
    None
}

/// One of the page's own assets, if `url_path` names one.
pub fn asset(url_path: &str) -> Option<Resp> {
    let (body, kind) = match url_path.strip_prefix(ASSET_PREFIX)? {
        "console.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "console.css" => (STYLE, "text/css; charset=utf-8"),
        "admin.js" => (ADMIN_SCRIPT, "text/javascript; charset=utf-8"),
        "admin.css" => (ADMIN_STYLE, "text/css; charset=utf-8"),
        _ => return None,
    };
    Some(respond(
        StatusCode::OK,
        kind,
        Bytes::from_static(body.as_bytes()),
    ))
}

/// The page for a good token: the client of `kind`, titled with the domain's name. The
/// page connects to `/websockify` with the token from its own address.
pub fn client_page(config: &ConsoleConfig, kind: ConsoleKind, domain: &str) -> Resp {
    let (configured, client) = match kind {
        ConsoleKind::Vnc => (config.novnc.is_some(), "novnc"),
        ConsoleKind::Spice => (config.spice_html5.is_some(), "spice-html5"),
    };
    if !configured {
        let key = if kind == ConsoleKind::Vnc {
            "novnc"
        } else {
            "spice_html5"
        };
        return error_page(
            StatusCode::NOT_FOUND,
            "This vizor serves no console page for this kind of console",
            &format!("The {kind} client is not installed: the operator sets [console] {key} in vizor's configuration."),
        );
    }
    let title = escape(domain);
    let body = format!(
        r#"<header id="bar">
<span id="title">{title}</span>
<span id="state" role="status" aria-live="polite" data-state="connecting">Connecting…</span>
<span id="policy" hidden></span>
<span id="timeleft" hidden></span>
<span class="spacer"></span>
<span id="presence" role="status" aria-live="polite" hidden></span>
<span id="pasting" role="status" aria-live="polite" hidden><span id="pasting-words"></span> <button id="paste-stop" type="button">Stop</button></span>
<button id="paste" type="button" disabled hidden title="Type text into the VM as key presses: for a VM without a shared clipboard">Paste as keys</button>
<button id="cad" type="button" disabled title="Send Ctrl+Alt+Del to the VM">Ctrl+Alt+Del</button>
<button id="fullscreen" type="button" title="Fill the screen">Fullscreen</button>
</header>
<div id="warning" role="alert" hidden></div>
<dialog id="paste-dialog" aria-labelledby="paste-heading">
<form id="paste-form" method="dialog">
<h2 id="paste-heading">Paste as keys</h2>
<p>The text is typed into the VM key by key, as on the keyboard layout its system uses.</p>
<label for="paste-text">Text</label>
<textarea id="paste-text" rows="6" cols="48" maxlength="4096" spellcheck="false"></textarea>
<label for="paste-layout">The VM's keyboard layout</label>
<select id="paste-layout">
<option value="us">US (QWERTY)</option>
<option value="de">German (QWERTZ)</option>
<option value="fr">French (AZERTY)</option>
</select>
<p id="paste-error" role="alert"></p>
<div class="buttons"><button id="paste-type" type="submit" value="type">Type it</button> <button id="paste-close" type="submit" value="close" formnovalidate>Close</button></div>
</form>
</dialog>
<main id="screen"></main>
<noscript><p class="error">The console needs JavaScript.</p></noscript>"#
    );
    page(
        StatusCode::OK,
        &title,
        &format!(r#"data-kind="{kind}" data-client="{client}""#),
        "console",
        true,
        &body,
    )
}

/// `GET /admin`: the live sessions for an administrator, with Watch, End and a
/// session's event stream. The page asks for the admin key and keeps it in its memory
/// alone; without the management API it says so.
pub fn admin_page(api: bool) -> Resp {
    if !api {
        return error_page(
            StatusCode::NOT_FOUND,
            "The management API is off",
            "The operator turns it on with [api] admin_key_file or admin_keys_file in vizor's configuration.",
        );
    }
    let body = r#"<header>
<h1>vizor · live sessions</h1>
<span class="spacer"></span>
<span id="status" role="status" aria-live="polite"></span>
</header>
<main>
<form id="login" autocomplete="off">
<label for="key">Admin key</label>
<input id="key" type="password" autocomplete="off" spellcheck="false" required>
<button type="submit">Open</button>
</form>
<p id="login-error" class="error" role="alert"></p>
<section id="sessions" hidden>
<table>
<thead><tr><th>Session</th><th>User</th><th>Domain</th><th>Kind</th><th>On the console</th><th>Started</th><th>Bandwidth</th><th>Frame p50 / p99</th><th>Input to display p50 / p99</th><th></th></tr></thead>
<tbody id="rows"></tbody>
</table>
<section id="events" hidden>
<header><span id="events-title"></span><span class="spacer"></span><button id="events-close" type="button">Close</button></header>
<ul id="events-list" aria-live="polite"></ul>
</section>
</section>
<dialog id="end-dialog">
<form id="end-form" method="dialog">
<strong id="end-title"></strong>
<label for="end-reason">Reason, shown to everyone on the console and kept in the audit log</label>
<input id="end-reason" maxlength="200" autocomplete="off" required>
<div class="buttons"><button id="end-cancel" type="button">Cancel</button><button id="end-confirm" class="danger" type="submit">End session</button></div>
</form>
</dialog>
</main>"#;
    page(
        StatusCode::OK,
        "Live sessions",
        r#"data-kind="admin""#,
        "admin",
        true,
        body,
    )
}

/// A page that explains, in words, why there is no console.
pub fn error_page(status: StatusCode, heading: &str, detail: &str) -> Resp {
    let body = format!(
        r#"<main id="refusal">
<h1>{}</h1>
<p id="reason">{}</p>
</main>"#,
        escape(heading),
        escape(detail)
    );
    page(
        status,
        "No console",
        r#"data-kind="error""#,
        "console",
        false,
        &body,
    )
}

/// A whole page: `title` and `body` are HTML already; `assets` names its stylesheet
/// and (with `script`) its script under [`ASSET_PREFIX`].
fn page(
    status: StatusCode,
    title: &str,
    body_attrs: &str,
    assets: &str,
    script: bool,
    body: &str,
) -> Resp {
    let script = if script {
        format!(r#"<script type="module" src="{ASSET_PREFIX}{assets}.js"></script>"#)
    } else {
        String::new()
    };
    let html = format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title} · vizor</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{ASSET_PREFIX}{assets}.css">
{script}
</head>
<body {body_attrs}>
{body}
</body>
</html>
"#
    );
    respond(status, "text/html; charset=utf-8", Bytes::from(html))
}

/// The headers every console response carries: the token is in the page's address, so
/// it goes to no referrer, cache or frame; scripts and connections stay on this origin.
fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Resp {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    let set = |h: &mut hyper::HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, header::HeaderValue::from_static(v));
    };
    set(h, header::CONTENT_TYPE, content_type);
    set(h, header::CACHE_CONTROL, "no-store");
    set(h, header::REFERRER_POLICY, "no-referrer");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
         img-src 'self' data: blob:; media-src 'self' blob:; connect-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    );
    r
}

/// Lets the web apps at `ancestors` (`[console] frame_ancestors`, validated origins)
/// show a console page in a frame; with none, the page keeps refusing every frame.
pub fn allow_framing(r: &mut Resp, ancestors: &[String]) {
    if ancestors.is_empty() {
        return;
    }
    let h = r.headers_mut();
    // X-Frame-Options cannot name an origin: CSP's frame-ancestors says it alone.
    h.remove(header::X_FRAME_OPTIONS);
    let Some(csp) = h
        .get(header::CONTENT_SECURITY_POLICY)
        .and_then(|v| v.to_str().ok())
    else {
        return;
    };
    let csp = csp.replace(
        "frame-ancestors 'none'",
        &format!("frame-ancestors {}", ancestors.join(" ")),
    );
    match header::HeaderValue::from_str(&csp) {
        Ok(v) => {
            h.insert(header::CONTENT_SECURITY_POLICY, v);
        }
        // Origins are checked when the config is read; fail closed regardless.
        Err(_) => {
            h.insert(
                header::X_FRAME_OPTIONS,
                header::HeaderValue::from_static("DENY"),
            );
        }
    }
}

/// Escapes text for HTML content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(r: Resp) -> String {
        use http_body_util::BodyExt;
        let b = block_on(r.into_body().collect()).unwrap();
        String::from_utf8(b.to_bytes().to_vec()).unwrap()
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn configured() -> ConsoleConfig {
        ConsoleConfig {
            novnc: Some("/n".into()),
            spice_html5: Some("/s".into()),
            frame_ancestors: Vec::new(),
        }
    }

    #[test]
    fn framing_is_refused_unless_frame_ancestors_names_the_app() {
        let page = || client_page(&configured(), ConsoleKind::Vnc, "vm");
        let mut r = page();
        allow_framing(&mut r, &[]);
        assert_eq!(r.headers()[header::X_FRAME_OPTIONS], "DENY");
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");

        let mut r = page();
        let apps = [
            "https://app.example.com".to_owned(),
            "https://*.example.org:8443".to_owned(),
        ];
        allow_framing(&mut r, &apps);
        assert!(r.headers().get(header::X_FRAME_OPTIONS).is_none());
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(
            csp.ends_with("frame-ancestors https://app.example.com https://*.example.org:8443"),
            "{csp}"
        );
        // The rest of the policy stays.
        assert!(
            csp.starts_with("default-src 'none'; script-src 'self';"),
            "{csp}"
        );
    }

    #[test]
    fn a_domain_name_cannot_inject_markup() {
        let page = body(client_page(
            &configured(),
            ConsoleKind::Vnc,
            "<script>alert(1)</script>\"'&",
        ));
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;"));
        assert!(page.contains(r#"data-kind="vnc" data-client="novnc""#));
    }

    #[test]
    fn each_kind_gets_its_client_and_an_unconfigured_one_is_explained() {
        let page = body(client_page(&configured(), ConsoleKind::Spice, "vm"));
        assert!(page.contains(r#"data-kind="spice" data-client="spice-html5""#));
        let r = client_page(&ConsoleConfig::default(), ConsoleKind::Spice, "vm");
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let page = body(r);
        assert!(page.contains("[console] spice_html5"), "{page}");
    }

    #[test]
    fn every_page_is_locked_to_its_origin_and_leaks_no_referrer() {
        for r in [
            client_page(&configured(), ConsoleKind::Vnc, "vm"),
            error_page(StatusCode::FORBIDDEN, "no", "no"),
            asset("/_vizor/console.js").unwrap(),
        ] {
            let h = r.headers();
            assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
            assert_eq!(h[header::CACHE_CONTROL], "no-store");
            let csp = h[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
            assert!(csp.contains("script-src 'self';"), "{csp}");
            assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        }
        assert!(asset("/_vizor/other.js").is_none());
    }

    #[test]
    fn client_paths_map_into_their_directories_only_when_configured() {
        let c = configured();
        assert_eq!(
            client_dir(&c, "/novnc/core/rfb.js"),
            Some((Path::new("/n"), "core/rfb.js"))
        );
        assert_eq!(
            client_dir(&c, "/spice-html5/main.js"),
            Some((Path::new("/s"), "main.js"))
        );
        assert_eq!(
            client_dir(&ConsoleConfig::default(), "/novnc/core/rfb.js"),
            None
        );
        assert_eq!(client_dir(&c, "/vnc.html"), None);
    }
}
