//! The management API on record: every token it issues, every request it refuses.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::rfb::rfb_handshake;
use common::{http_get, metric, Browser, Vizor, ADMIN_API, ADMIN_KEY, METRICS_AUTH};
use vizor::token::ConsoleKind;

#[tokio::test]
async fn every_token_issued_and_every_refused_request_is_on_record() {
    // libvirt's test driver with a domain that has VNC graphics: issuing a token needs
    // its console to exist, not to run.
    let (_node, uri) = common::test_node(&[("apivm".into(), 5999, "unused-pw".into())]);
    let v = Vizor::start_uri(
        &uri,
        "",
        "refusal_summary_interval = \"1s\"",
        &format!("{ADMIN_API}[limits]\nfailed_tokens_per_client = 3\n"),
        common::write_admin_key,
    );
    let api = "/api/v1/domains/apivm/console";
    let bearer = format!("Bearer {ADMIN_KEY}");
    let admin = [("Authorization", bearer.as_str())];

    // Issued: on record, with who asked and what for.
    let (status, _, body) =
        http_get(v.addr, &format!("{api}?user=ann&client=192.0.2.7"), &admin).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = answer["token"].as_str().unwrap();
    common::run::secret("token", token);
    assert_eq!(answer["console_url"], format!("/console?token={token}"));
    let issued = v.records("token_issued", 1);
    let r = &issued[0];
    assert_eq!(r["by"], "api");
    assert!(
        r["requester"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{r}"
    );
    assert_eq!(
        (&r["user"], &r["domain"], &r["kind"]),
        (&"ann".into(), &"apivm".into(), &"vnc".into())
    );
    assert_eq!(r["uuid"], common::uuid_of("apivm"));
    assert_eq!(r["ttl_s"], 60);
    assert_eq!(r["expires_at"], answer["expires_at"]);
    assert_eq!(r["bound_client"], "192.0.2.7");
    assert_eq!(r["token_id"].as_str().unwrap().len(), 16);
    assert!(!v.log.lock().unwrap().contains(token));

    // An admin's failed requests: each on record, with the status answered.
    for (path, status, reason) in [
        ("/api/v1/domains/nosuchvm/console", 404, "no_such_domain"),
        (&format!("{api}?kind=spice") as &str, 409, ""),
        (&format!("{api}?kind=rdp"), 400, "bad_request"),
    ] {
        let (got, _, body) = http_get(v.addr, path, &admin).await;
        assert_eq!(got, status, "{path}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        if !reason.is_empty() {
            assert_eq!(answer["reason"], reason, "{body}");
        }
    }
    let failed = v.records("api_refused", 3);
    let statuses: Vec<u64> = failed
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [404, 409, 400]);
    assert_eq!(failed[0]["domain"], "nosuchvm");
    assert_eq!(failed[0]["endpoint"], "console");

    // A wrong key, or none: refused like a bad token, one record per client and
    // reason in an interval, the rest summed up; counted against the client's
    // allowance, after which even the right key waits.
    for auth in [Some("Bearer wrong-key"), None, Some("Bearer also-wrong")] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let (status, _, body) = http_get(v.addr, "/api/v1/sessions", &headers).await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("\"reason\":\"bad_key\""), "{body}");
    }
    let (status, _, _) = http_get(v.addr, api, &admin).await;
    assert_eq!(status, 429, "the allowance of 3 is spent");
    let guessed = v.records("api_refused", 4);
    let unauthenticated: Vec<_> = guessed
        .iter()
        .filter(|r| r["reason"] == "bad_key")
        .collect();
    assert_eq!(unauthenticated.len(), 1, "{guessed:?}");
    assert_eq!(unauthenticated[0]["status"], 401);
    assert_eq!(unauthenticated[0]["endpoint"], "sessions");
    let throttled = v.records("client_throttled", 1);
    assert_eq!(throttled[0]["failures"], 3);
    let summary = v.records("refusal_summary", 1);
    assert_eq!(summary[0]["reasons"]["bad_key"], 3, "{summary:?}");
    assert!(!v
        .audit_all()
        .iter()
        .any(|r| r.to_string().contains("wrong-key")));

    // And counted.
    let m = vizor_metrics(&v).await;
    assert_eq!(
        metric(
            &m,
            "vizor_api_requests_total{code=\"200\",endpoint=\"console\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "vizor_api_requests_total{code=\"401\",endpoint=\"sessions\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &m,
            "vizor_api_requests_total{code=\"429\",endpoint=\"console\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "vizor_auth_refusals_total{reason=\"bad_key\",stage=\"api\"}"
        ),
        Some(3.0)
    );
}

#[tokio::test]
async fn a_console_without_a_password_gets_no_token_under_require_password() {
    let (_node, uri) = common::test_node(&[
        ("openvm".into(), 5998, String::new()),
        ("lockedvm".into(), 5997, "locked-pw".into()),
    ]);
    let bearer = format!("Bearer {ADMIN_KEY}");
    let admin = [("Authorization", bearer.as_str())];
    // By default a token is issued, with a warning that the console is open to anyone
    // who reaches its port.
    let v = Vizor::start_uri(&uri, "", "", ADMIN_API, common::write_admin_key);
    let (status, _, body) = http_get(v.addr, "/api/v1/domains/openvm/console", &admin).await;
    assert_eq!(status, 200, "{body}");
    assert!(v.wait_for_log("the VM console has no password in libvirt"));

    let strict = Vizor::start_libvirt(
        &uri,
        "require_password = true",
        ADMIN_API,
        common::write_admin_key,
    );
    let (status, _, body) = http_get(strict.addr, "/api/v1/domains/openvm/console", &admin).await;
    assert_eq!(status, 409, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["reason"], "no_password");
    assert_eq!(
        answer["error"],
        "domain \"openvm\": its vnc graphics have no password, and [libvirt] require_password is set"
    );
    let refused = strict.records("api_refused", 1);
    assert_eq!(
        (&refused[0]["reason"], &refused[0]["status"]),
        (&"no_password".into(), &409.into())
    );
    let (status, _, body) = http_get(strict.addr, "/api/v1/domains/lockedvm/console", &admin).await;
    assert_eq!(status, 200, "{body}");
    assert!(!strict
        .log
        .lock()
        .unwrap()
        .contains("has no password in libvirt"));
}

#[tokio::test]
async fn without_kind_a_token_is_for_the_only_console_a_domain_has() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("node.xml");
    std::fs::write(
        &node,
        format!(
            "<node><domain type='test'><name>spiceonly</name><uuid>{}</uuid>\
             <memory>65536</memory><os><type>hvm</type></os><devices>\
             <graphics type='spice' port='5990' listen='127.0.0.1' passwd='spice-pw'/>\
             </devices></domain></node>",
            common::uuid_of("spiceonly")
        ),
    )
    .unwrap();
    let uri = format!("test://{}", node.display());
    let v = Vizor::start_uri(&uri, "", "", ADMIN_API, common::write_admin_key);
    let bearer = format!("Bearer {ADMIN_KEY}");
    let admin = [("Authorization", bearer.as_str())];
    let api = "/api/v1/domains/spiceonly/console";
    let (status, _, body) = http_get(v.addr, api, &admin).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["kind"], "spice");
    assert_eq!(v.records("token_issued", 1)[0]["kind"], "spice");
    // Asked for a kind it lacks: the answer says which it has.
    let (status, _, body) = http_get(v.addr, &format!("{api}?kind=vnc"), &admin).await;
    assert_eq!(status, 409, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["reason"], "no_graphics");
    assert_eq!(
        answer["error"],
        "domain \"spiceonly\" has no vnc graphics (it has: spice)"
    );
}

/// A VNC server that offers security type None only, as QEMU does for a console whose
/// password was taken away behind libvirt's back. A test double: real QEMU keeps VNC
/// authentication on once libvirt started it so, whatever the password becomes.
async fn vnc_server_without_auth() -> vizor_testkit::vnc::Served {
    use vizor_testkit::vnc::{Auth, Double};
    Double::new(Auth::None)
        .listen(|mut conn| async move {
            let io = |e: std::io::Error| e.to_string();
            conn.send_server_init(&vizor_rfb::handshake::ServerInit {
                width: 64,
                height: 48,
                pixel_format: vizor_rfb::PixelFormat::RGB888,
                name: b"open".to_vec(),
            })
            .await
            .map_err(io)?;
            conn.drain().await.map_err(io)
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn what_qemu_checks_decides_not_what_libvirt_stores() {
    // libvirt stores a password; the console asks for none.
    let fake = vnc_server_without_auth().await;
    let (_node, uri) = common::test_node(&[("stale".into(), fake.port(), "stored-pw".into())]);
    let v = Vizor::start_uri(&uri, "", "", "", |_| {});
    let token = v.token("stale", ConsoleKind::Vnc, 60);
    let mut b = Browser::connect(v.addr, &format!("/websockify?token={token}")).await;
    let si = rfb_handshake(&mut b).await.unwrap();
    assert_eq!(si.name_lossy(), "open");
    drop(b);
    // On record as what it is: a console nobody's password protected.
    assert_eq!(v.records("session_start", 1)[0]["vm_password"], false);

    let strict = Vizor::start_libvirt(&uri, "require_password = true", "", |_| {});
    let token = strict.token("stale", ConsoleKind::Vnc, 60);
    let mut b = Browser::connect(strict.addr, &format!("/websockify?token={token}")).await;
    let refused = rfb_handshake(&mut b).await.unwrap_err();
    assert_eq!(
        refused,
        "server refused the connection: the VM console has no password, which vizor requires"
    );
    let failure = &strict.records("upstream_failure", 1)[0];
    assert_eq!(failure["reason"], "no_password");
    assert!(
        failure["detail"]
            .as_str()
            .unwrap()
            .starts_with("the VM console asks for no password"),
        "{failure}"
    );
    assert!(strict.audit().iter().all(|r| r["event"] != "session_start"));
}

/// `/metrics`, asked from another loopback address: 127.0.0.1 is throttled by now.
async fn vizor_metrics(v: &Vizor) -> String {
    let stream = common::tcp_from("127.0.0.2".parse().unwrap(), v.addr).await;
    let (status, _, body) =
        common::http_get_over(stream, v.addr, "/metrics", &[METRICS_AUTH]).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn named_administrators_act_under_their_names_and_reload_on_sighup() {
    use std::os::unix::fs::PermissionsExt;
    let (_node, uri) = common::test_node(&[("apivm".into(), 5999, "unused-pw".into())]);
    let alice = "alice-key-0123456789abcdef";
    let bob = "bob-key-0123456789abcdef";
    common::run::secret("alice's key", alice);
    common::run::secret("bob's key", bob);
    let write_keys = |dir: &std::path::Path, text: &str| {
        let p = dir.join("admins");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    let v = Vizor::start_uri(
        &uri,
        "",
        "",
        "[api]\nadmin_key_file = \"admin.key\"\nadmin_keys_file = \"admins\"\n",
        |dir| {
            common::write_admin_key(dir);
            write_keys(dir, &format!("# on call\nalice {alice}\n"));
        },
    );
    let api = "/api/v1/domains/apivm/console";
    let as_who = |key: &str| format!("Bearer {key}");
    // Alice's token carries a policy; the record names her and what the token allows.
    let (status, _, body) = http_get(
        v.addr,
        &format!("{api}?user=ann&view_only=true&clipboard=from_vm&max_duration=15m"),
        &[("Authorization", &as_who(alice))],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    common::run::secret("token", answer["token"].as_str().unwrap());
    assert_eq!(
        (
            &answer["view_only"],
            &answer["clipboard"],
            &answer["max_duration_s"]
        ),
        (&true.into(), &"from_vm".into(), &900.into())
    );
    let issued = v.records("token_issued", 1);
    assert_eq!(
        (
            &issued[0]["admin"],
            &issued[0]["view_only"],
            &issued[0]["clipboard"],
            &issued[0]["max_duration_s"]
        ),
        (
            &"alice".into(),
            &true.into(),
            &"from_vm".into(),
            &900.into()
        )
    );
    // The single key is the administrator "admin"; Bob is not one yet.
    let (status, _, _) = http_get(v.addr, api, &[("Authorization", &as_who(ADMIN_KEY))]).await;
    assert_eq!(status, 200);
    assert_eq!(v.records("token_issued", 2)[1]["admin"], "admin");
    let (status, _, _) = http_get(v.addr, api, &[("Authorization", &as_who(bob))]).await;
    assert_eq!(status, 401);
    // A policy that cannot be carried out is refused.
    for (query, want) in [
        ("view_only=maybe", "view_only must be true or false"),
        ("clipboard=sideways", "unknown clipboard policy"),
        ("max_duration=8days", "out of range"),
        ("max_duration=soon", "max_duration"),
    ] {
        let (status, _, body) = http_get(
            v.addr,
            &format!("{api}?{query}"),
            &[("Authorization", &as_who(alice))],
        )
        .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(want), "{query}: {body}");
    }

    // SIGHUP reads the keys again: Bob in, Alice out.
    write_keys(v.dir.path(), &format!("bob {bob}\n"));
    v.signal("HUP");
    let mut reloaded = false;
    for _ in 0..50 {
        if v.log.lock().unwrap().contains("admin keys reloaded") {
            reloaded = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(reloaded, "{}", v.log.lock().unwrap());
    let (status, _, _) = http_get(v.addr, api, &[("Authorization", &as_who(bob))]).await;
    assert_eq!(status, 200);
    assert_eq!(v.records("token_issued", 3)[2]["admin"], "bob");
    let (status, _, _) = http_get(v.addr, api, &[("Authorization", &as_who(alice))]).await;
    assert_eq!(status, 401);
    // A keys file that no longer reads keeps the keys in use, and says why.
    write_keys(v.dir.path(), "bob short\n");
    v.signal("HUP");
    let mut refused = false;
    for _ in 0..50 {
        if v.log.lock().unwrap().contains("admin keys not reloaded") {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(refused, "{}", v.log.lock().unwrap());
    let (status, _, _) = http_get(v.addr, api, &[("Authorization", &as_who(bob))]).await;
    assert_eq!(status, 200, "the keys in use stay");
    let log = v.log.lock().unwrap().clone();
    for key in [alice, bob, ADMIN_KEY] {
        assert!(!log.contains(key), "a key in the log");
    }
}
