//! What vizor's HTTP listeners answer besides consoles: metrics only to a key holder,
//! no dotfile, and the security headers on every response.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::{http_get, Vizor, ADMIN_KEY, METRICS_AUTH};

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The headers every response carries (the console page sets a stricter CSP).
fn assert_secured(head: &str, what: &str) {
    assert_eq!(
        header(head, "x-content-type-options"),
        Some("nosniff"),
        "{what}: {head}"
    );
    assert_eq!(
        header(head, "x-frame-options"),
        Some("DENY"),
        "{what}: {head}"
    );
    assert_eq!(
        header(head, "referrer-policy"),
        Some("no-referrer"),
        "{what}: {head}"
    );
    let csp = header(head, "content-security-policy").unwrap_or_default();
    assert!(
        csp.contains("frame-ancestors 'none'") && csp.contains("base-uri 'none'"),
        "{what}: {head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_on_the_main_listener_take_a_key() {
    // The key counter moves with every keystroke, and series name users and domains:
    // not for anyone who can reach the console port.
    let v = Vizor::start_uri(
        "test:///default",
        "",
        "",
        "[api]\nadmin_key_file = \"admin.key\"\n",
        |dir| {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.join("admin.key");
            std::fs::write(&path, ADMIN_KEY).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        },
    );
    let (status, head, body) = http_get(v.addr, "/metrics", &[]).await;
    assert_eq!(status, 401, "{body}");
    assert!(!body.contains("vizor_"), "{body}");
    assert_secured(&head, "401");
    let wrong = ("Authorization", "Bearer m3trics-0123456789abcdeX");
    assert_eq!(http_get(v.addr, "/metrics", &[wrong]).await.0, 401);
    let (status, head, body) = http_get(v.addr, "/metrics", &[METRICS_AUTH]).await;
    assert_eq!(status, 200);
    assert!(body.contains("vizor_audit_write_errors_total"), "{body}");
    assert_secured(&head, "metrics");
    let admin = format!("Bearer {ADMIN_KEY}");
    let (status, _, _) = http_get(v.addr, "/metrics", &[("Authorization", &admin)]).await;
    assert_eq!(status, 200, "the admin key reads them too");

    // Without any key, the main listener serves none, and says where they are.
    let v = Vizor::start_keyless("");
    let (status, head, body) = http_get(v.addr, "/metrics", &[METRICS_AUTH]).await;
    assert_eq!(status, 404);
    assert!(
        body.contains("metrics_listen") && body.contains("[metrics] key_file"),
        "{body}"
    );
    assert_secured(&head, "404");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_dotfile_is_served_and_every_response_is_secured() {
    let v = Vizor::start_uri("test:///default", "web_root = \"www\"", "", "", |dir| {
        let www = dir.join("www");
        std::fs::create_dir_all(www.join(".git")).unwrap();
        std::fs::create_dir_all(www.join("sub")).unwrap();
        std::fs::write(www.join("index.html"), "<p>console home</p>").unwrap();
        std::fs::write(www.join("sub/page.html"), "<p>sub</p>").unwrap();
        std::fs::write(www.join(".env"), "SECRET=dotenv-secret").unwrap();
        std::fs::write(www.join(".git/config"), "[remote] url=dotgit-secret").unwrap();
        std::fs::write(www.join("sub/.htpasswd"), "admin:htpasswd-secret").unwrap();
    });
    for path in [
        "/.env",
        "/.git/config",
        "/sub/.htpasswd",
        "/.git/",
        "/sub/../.env",
    ] {
        let (status, head, body) = http_get(v.addr, path, &[]).await;
        assert!(matches!(status, 400 | 404), "{path}: {status}");
        assert!(!body.contains("secret"), "{path}: {body}");
        assert_secured(&head, path);
    }
    for path in [
        "/",
        "/index.html",
        "/sub/page.html",
        "/healthz",
        "/nothing-here",
    ] {
        let (status, head, _) = http_get(v.addr, path, &[]).await;
        assert!(matches!(status, 200 | 404), "{path}: {status}");
        assert_secured(&head, path);
    }
    // The console page keeps its own, stricter policy.
    let (status, head, _) = http_get(v.addr, "/console", &[]).await;
    assert_eq!(status, 400);
    let csp = header(&head, "content-security-policy").unwrap();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
}

/// vizor with `metrics_listen` on a free port, and that address.
fn with_metrics_listener() -> (Vizor, std::net::SocketAddr) {
    let port = common::free_port();
    let v = Vizor::start_uri(
        "test:///default",
        &format!("metrics_listen = \"127.0.0.1:{port}\""),
        "",
        "",
        |_| {},
    );
    (v, format!("127.0.0.1:{port}").parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_is_secured_too() {
    let (v, addr) = with_metrics_listener();
    let (status, head, body) = http_get(addr, "/metrics", &[]).await;
    assert_eq!(status, 200, "metrics_listen is the private address: no key");
    assert!(body.contains("vizor_"));
    assert_secured(&head, "metrics_listen");
    drop(v);
}

/// Alerts and `rate()` panels see zero, not nothing, before the first event: every
/// metric family has its series from the start, labelled counters at zero for each
/// label value vizor can produce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_family_is_exported_at_zero_right_after_start() {
    let (v, addr) = with_metrics_listener();
    let (status, _, body) = http_get(addr, "/metrics", &[]).await;
    assert_eq!(status, 200);
    let families: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert!(families.len() >= 20, "{families:?}");
    for family in &families {
        let samples: Vec<&str> = body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.strip_prefix(family)
                    .is_some_and(|rest| rest.starts_with(['{', ' ', '_']))
            })
            .collect();
        assert!(!samples.is_empty(), "{family} has no series at start");
    }
    for series in [
        r#"vizor_auth_refusals_total{reason="expired",stage="token"} 0"#,
        r#"vizor_auth_refusals_total{reason="bad_key",stage="api"} 0"#,
        r#"vizor_auth_refusals_total{reason="origin_not_allowed",stage="origin"} 0"#,
        r#"vizor_protocol_errors_total{direction="browser_to_vm",kind="vnc",reason="unknown_message_type"} 0"#,
        r#"vizor_protocol_errors_total{direction="vm_to_browser",kind="spice",reason="spice"} 0"#,
        r#"vizor_sessions_total{kind="vnc",outcome="browser_closed"} 0"#,
        r#"vizor_sessions_total{kind="spice",outcome="upstream_auth"} 0"#,
        r#"vizor_libvirt_errors_total{host="default",reason="not_running"} 0"#,
        r#"vizor_libvirt_up{host="default"} 1"#,
        r#"vizor_connections_refused_total{reason="max_connections"} 0"#,
        r#"vizor_audit_events_total{event="key"} 0"#,
        r#"vizor_api_requests_total{code="401",endpoint="sessions"} 0"#,
    ] {
        assert!(body.lines().any(|l| l == series), "{series} missing");
    }
    drop(v);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_page_may_be_framed_only_by_the_apps_the_config_names() {
    let v = Vizor::start_uri("test:///default", "", "", "", |_| {});
    let (_, head, _) = http_get(v.addr, "/console?token=x", &[]).await;
    assert_secured(&head, "console page");

    let v = Vizor::start_uri(
        "test:///default",
        "",
        "",
        "[console]\nframe_ancestors = [\"https://app.example.com\"]\n",
        |_| {},
    );
    let (status, head, _) = http_get(v.addr, "/console?token=x", &[]).await;
    assert_eq!(status, 403);
    assert_eq!(header(&head, "x-frame-options"), None, "{head}");
    let csp = header(&head, "content-security-policy").unwrap();
    assert!(
        csp.ends_with("frame-ancestors https://app.example.com"),
        "{csp}"
    );
    // Only the console page: everything else still refuses every frame.
    let (_, head, _) = http_get(v.addr, "/healthz", &[]).await;
    assert_secured(&head, "healthz");
}
