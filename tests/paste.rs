//! "Paste as keys" through its HTTP endpoint, against a real QEMU: who may paste (the
//! owner and an operator, not an observer, a view-only link or one whose clipboard does
//! not reach the VM), every refusal with its reason, one paste at a time, the cancel,
//! and the records. The page's dialog and QEMU's keyboard trace are tests/browser.rs's.
//!
//! Needs the live test host (`scripts/test.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::rfb::rfb_handshake;
use common::{http_request, Browser, Vizor};
use std::time::Duration;
use vizor::token::ConsoleKind;

/// POSTs `/console/paste` with `token` from the loopback address `src`: another
/// computer than the console's.
async fn paste_from(v: &Vizor, src: &str, token: &str, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = common::tcp_from(src.parse().unwrap(), v.addr).await;
    let req = format!(
        "POST /console/paste?token={token} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        v.addr,
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    resp.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Waits until the audit holds `n` key records of `session`.
async fn keys_of(v: &Vizor, session: u64, n: usize) -> Vec<serde_json::Value> {
    for _ in 0..200 {
        let keys: Vec<_> = v
            .audit()
            .into_iter()
            .filter(|r| r["event"] == "key" && r["session"].as_u64() == Some(session))
            .collect();
        if keys.len() >= n {
            return keys;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{n} key records of session {session}");
}

/// POSTs (or DELETEs) `/console/paste` with `token`; returns the status and the JSON.
async fn paste(
    v: &Vizor,
    method: &str,
    token: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    let (status, _, text) = http_request(
        v.addr,
        method,
        &format!("/console/paste?token={token}"),
        headers,
        body,
    )
    .await;
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, json)
}

fn ask(text: &str, layout: &str) -> String {
    serde_json::json!({"text": text, "layout": layout}).to_string()
}

/// A console of `token` through its handshake, kept open.
async fn console(v: &Vizor, token: &str) -> Browser {
    let mut b = Browser::connect(v.addr, &format!("/websockify?token={token}")).await;
    rfb_handshake(&mut b).await.expect("the handshake");
    b
}

/// Waits for `n` `paste` records.
fn pastes(v: &Vizor, n: usize) -> Vec<serde_json::Value> {
    v.wait_for_records("paste", n)
        .into_iter()
        .filter(|r| r["event"] == "paste")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_paste_is_typed_for_those_who_may_type_and_refused_with_a_reason_otherwise() {
    let live = common::live_domain();
    let v = Vizor::start_admin("", "");
    let token = v.token(&live.name, ConsoleKind::Vnc, 60);
    // No live connection holds it yet.
    let (status, _) = paste(&v, "POST", &token, &ask("a", "us"), &[]).await;
    assert_eq!(status, 404);
    let _owner = console(&v, &token).await;

    // Every refusal, with its reason; none types anything.
    let long = "a".repeat(vizor::paste::MAX_CHARS + 1);
    for (body, headers, status, reason) in [
        (ask("a", "dvorak"), vec![], 400, "bad_layout"),
        (ask("", "us"), vec![], 400, "empty"),
        ("{\"text\": 1}".to_owned(), vec![], 400, "bad_request"),
        (ask(&long, "us"), vec![], 413, "too_long"),
        (ask("ab€", "us"), vec![], 422, "untypeable"),
        (
            ask("a", "us"),
            vec![("Origin", "http://elsewhere.example")],
            403,
            "origin_not_allowed",
        ),
    ] {
        let (got, answer) = paste(&v, "POST", &token, &body, &headers).await;
        assert_eq!(
            (got, answer["reason"].as_str()),
            (status, Some(reason)),
            "{answer}"
        );
        assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let (status, answer) = paste(&v, "POST", &token, &ask("ab€", "us"), &[]).await;
    assert_eq!(status, 422);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("'€' (character 3)"),
        "{answer}"
    );
    let (status, _) = paste(&v, "POST", "not-a-token", &ask("a", "us"), &[]).await;
    assert_eq!(status, 403);
    // The link, copied to another computer, types nothing there.
    assert_eq!(
        paste_from(&v, "127.0.0.2", &token, &ask("a", "us")).await,
        403
    );
    let (status, answer) = paste(&v, "POST", &token, &ask("\r\r", "us"), &[]).await;
    assert_eq!((status, answer["reason"].as_str()), (400, Some("empty")));

    // One at a time: a second while the first types is refused; the first is stopped.
    let text = "abcdefghij".repeat(20);
    let (status, answer) = paste(&v, "POST", &token, &ask(&text, "us"), &[]).await;
    assert_eq!(
        (status, answer["chars"].as_u64()),
        (202, Some(200)),
        "{answer}"
    );
    let (status, answer) = paste(&v, "POST", &token, &ask("x", "us"), &[]).await;
    assert_eq!((status, answer["reason"].as_str()), (409, Some("typing")));
    let started = pastes(&v, 1);
    let session = started[0]["session"].as_u64().unwrap();
    // Stopped once a few characters are in.
    keys_of(&v, session, 6).await;
    let (status, answer) = paste(&v, "DELETE", &token, "", &[]).await;
    assert_eq!((status, answer["cancelled"].as_bool()), (200, Some(true)));
    let records = pastes(&v, 2);
    assert_eq!(records[1]["status"], "cancelled", "{records:?}");
    let typed = records[1]["typed"].as_u64().unwrap();
    assert!((3..200).contains(&typed), "{records:?}");
    // The keys on record are whole characters: every press released.
    let keys: Vec<_> = v
        .audit()
        .into_iter()
        .filter(|r| r["event"] == "key" && r["session"].as_u64() == Some(session))
        .collect();
    assert_eq!(keys.len() as u64, typed * 2, "a down and an up each");
    assert!(keys.iter().all(|k| k["origin"] == "paste"));
    assert_eq!(
        keys.iter().filter(|k| k["down"] == true).count(),
        keys.iter().filter(|k| k["down"] == false).count()
    );
    // Nothing to cancel now.
    let (_, answer) = paste(&v, "DELETE", &token, "", &[]).await;
    assert_eq!(answer["cancelled"], false);

    // Participants: an operator types on its own session; an observer, a view-only
    // link and one whose clipboard only comes from the VM cannot.
    let id = v
        .sessions()
        .await
        .into_iter()
        .find(|s| s["domain"] == live.name.as_str())
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    let join = |body| v.participant(id, body);
    let operator = join(serde_json::json!({"role": "operator", "user": "op1"})).await;
    let observer = join(serde_json::json!({"role": "observer", "user": "ob1"})).await;
    let reader =
        join(serde_json::json!({"role": "operator", "user": "op2", "clipboard": "from_vm"})).await;
    let viewer =
        join(serde_json::json!({"role": "operator", "user": "op3", "view_only": true})).await;
    let _consoles = (
        console(&v, &operator).await,
        console(&v, &observer).await,
        console(&v, &reader).await,
        console(&v, &viewer).await,
    );
    for (who, reason) in [
        (&observer, "no_input"),
        (&viewer, "no_input"),
        (&reader, "clipboard_not_to_vm"),
    ] {
        let (status, answer) = paste(&v, "POST", who, &ask("a", "us"), &[]).await;
        assert_eq!(
            (status, answer["reason"].as_str()),
            (403, Some(reason)),
            "{answer}"
        );
    }
    let (status, _) = paste(&v, "POST", &operator, &ask("Hi", "us"), &[]).await;
    assert_eq!(status, 202);
    let records = pastes(&v, 4);
    assert_eq!(records[3]["status"], "done", "{records:?}");
    let op_session = records[2]["session"].as_u64().unwrap();
    assert_ne!(op_session, session, "the operator's own session");
    assert_eq!(v.audit_text(&op_session.to_string()), "Hi");
    // No refusal left a record of a paste, and no text is in the log.
    assert_eq!(pastes(&v, 4).len(), 4);
    v.assert_never_logged(&text);
}

/// With a keymap, QEMU maps keysyms itself: a console with libvirt's en-us keymap types
/// for the US layout alone (with another keymap, none: vizor does not model it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_console_with_a_keymap_types_only_what_it_maps() {
    common::live_domain();
    let d = "vizor-test-pkeymap";
    common::test_host(&[
        "domain",
        d,
        "--vnc-passwd",
        "pkey1pw",
        "--no-spice",
        "--vnc-keymap",
        "en-us",
    ]);
    let v = Vizor::start("");
    let token = v.token(d, ConsoleKind::Vnc, 60);
    let _owner = console(&v, &token).await;
    let (status, answer) = paste(&v, "POST", &token, &ask("zy", "de"), &[]).await;
    assert_eq!(
        (status, answer["reason"].as_str()),
        (409, Some("keymap")),
        "{answer}"
    );
    let (status, _) = paste(&v, "POST", &token, &ask("Hi!", "us"), &[]).await;
    assert_eq!(status, 202);
    let records = pastes(&v, 2);
    assert_eq!(records[1]["status"], "done", "{records:?}");
    let session = records[0]["session"].as_u64().unwrap();
    // By keysym: QEMU's keymap chose the keys, as the records say.
    let keys = keys_of(&v, session, 8).await;
    assert!(
        keys.iter()
            .all(|k| k["origin"] == "paste" && k["via"] == "keysym"),
        "{keys:?}"
    );
    assert_eq!(v.audit_text(&session.to_string()), "Hi!");
}
