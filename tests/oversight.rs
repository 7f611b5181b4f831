//! Live oversight against a real QEMU: participants on one console (an observer whose
//! input never reaches the VM, an operator whose does), an administrator ending the
//! session for all of them, and a SPICE session watched through the domain's VNC
//! display without disconnecting its owner.
//!
//! Needs the live test host (`scripts/test.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::events::Events;
use common::guest::{expected_ps2, hex, Ps2Trace};
use common::rfb::{msg, open_session, rfb_handshake, update_request};
use common::{Browser, Vizor};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};
use vizor::token::ConsoleKind;
use vizor_rfb::client::{write_set_encodings, ClientMessage};
use vizor_rfb::handshake::ServerInit;
use vizor_rfb::server::{ServerDecoder, ServerEvent};
use vizor_rfb::{Encoding, Limits};

/// A browser on a VNC console that reads whole screens, in Raw.
struct Screen {
    b: Browser,
    dec: ServerDecoder,
    si: ServerInit,
    /// Extended clipboard, as noVNC does it: a notify is answered with a request.
    clipboard: bool,
    /// Clipboard contents received.
    clips: Vec<Vec<u8>>,
}

impl Screen {
    async fn new(b: Browser, si: ServerInit) -> Screen {
        Screen::with(b, si, false).await
    }

    async fn with(mut b: Browser, si: ServerInit, clipboard: bool) -> Screen {
        let mut encodings = vec![
            Encoding::RAW,
            Encoding::EXTENDED_DESKTOP_SIZE,
            Encoding::QEMU_EXTENDED_KEY_EVENT,
        ];
        if clipboard {
            encodings.push(Encoding::EXTENDED_CLIPBOARD);
        }
        let mut set = Vec::new();
        write_set_encodings(encodings.iter().copied(), &mut set);
        b.send(&set).await;
        let mut dec = ServerDecoder::new(&si, Limits::default());
        dec.set_encodings(encodings.iter().copied());
        Screen {
            b,
            dec,
            si,
            clipboard,
            clips: Vec::new(),
        }
    }

    /// Joins a session with a participant's token.
    async fn join(v: &Vizor, token: &str) -> Screen {
        let mut b = Browser::connect(v.addr, &format!("/websockify?token={token}")).await;
        let si = rfb_handshake(&mut b)
            .await
            .expect("the participant's handshake");
        Screen::new(b, si).await
    }

    /// The whole screen now, as a hash of its pixels.
    async fn grab(&mut self) -> u64 {
        let (w, h) = self.dec.framebuffer_size();
        let (w, h) = if w == 0 {
            (self.si.width, self.si.height)
        } else {
            (w, h)
        };
        self.b.send(&update_request(w, h)).await;
        let mut pixels = std::collections::hash_map::DefaultHasher::new();
        let mut raw = 0u64;
        loop {
            let mut requests = 0;
            while let Some((ev, n)) = self.dec.decode(&self.b.pending).unwrap() {
                match &ev {
                    ServerEvent::ServerCutText(vizor_rfb::cut_text::CutText::Extended {
                        flags,
                        ..
                    }) if self.clipboard && flags & vizor_rfb::client::clipboard::NOTIFY != 0 => {
                        requests += 1;
                    }
                    ServerEvent::ServerCutText(text) => {
                        for clip in text.contents(1 << 20).unwrap() {
                            self.clips.push(clip.data.to_vec());
                        }
                    }
                    ServerEvent::Rect(r) if r.encoding == Encoding::RAW => {
                        (r.x, r.y, r.width, r.height).hash(&mut pixels);
                        raw += 1;
                    }
                    ServerEvent::Data(d) => d.hash(&mut pixels),
                    _ => {}
                }
                let done = ev == ServerEvent::UpdateEnd && raw > 0;
                self.b.pending.drain(..n);
                if done {
                    self.request_clipboard(requests).await;
                    return pixels.finish();
                }
            }
            self.request_clipboard(requests).await;
            self.b.read().await.unwrap();
        }
    }

    async fn send(&mut self, m: ClientMessage<'_>) {
        self.b.send(&msg(m)).await;
    }

    /// Asks for the clipboard the VM announced, `n` times.
    async fn request_clipboard(&mut self, n: usize) {
        use vizor_rfb::client::clipboard::{REQUEST, TEXT};
        for _ in 0..n {
            self.send(ClientMessage::ClientCutText(
                vizor_rfb::cut_text::CutText::Extended {
                    flags: REQUEST | TEXT,
                    data: &[],
                },
            ))
            .await;
        }
    }
}

fn key(down: bool, keysym: u32) -> ClientMessage<'static> {
    ClientMessage::KeyEvent { down, keysym }
}

/// The session of the live sessions on `domain`.
async fn session_on(v: &Vizor, domain: &str) -> serde_json::Value {
    for _ in 0..50 {
        if let Some(s) = v
            .sessions()
            .await
            .into_iter()
            .find(|s| s["domain"] == domain)
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no live session on {domain}");
}

/// The audit records of `event`.
fn records(audit: &[serde_json::Value], event: &str) -> Vec<serde_json::Value> {
    audit
        .iter()
        .filter(|r| r["event"] == event)
        .cloned()
        .collect()
}

/// Waits until the audit log holds a record of `event` that `matches`.
fn wait_record(
    v: &Vizor,
    event: &str,
    matches: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    for _ in 0..100 {
        if let Some(r) = records(&v.audit(), event).into_iter().find(|r| matches(r)) {
            return r;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no {event} record as expected: {:#?}", v.audit());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn participants_share_a_console_and_an_administrator_ends_it() {
    common::live_domain();
    let d = "vizor-test-watch";
    common::test_host(&["domain", d, "--vnc-passwd", "watch1", "--no-spice"]);
    let trace = Ps2Trace::start(d);
    let v = Vizor::start_admin("", "");

    let (b, si) = open_session(&v, d).await;
    let mut owner = Screen::new(b, si).await;
    let listed = session_on(&v, d).await;
    let id = listed["id"].as_u64().unwrap();
    assert_eq!(listed["participants"], serde_json::json!([]));
    let mut events = Events::open(&v, id).await;
    // The same from the log, for a terminal.
    let mut tail = std::process::Command::new(env!("CARGO_BIN_EXE_vizor"))
        .args(["audit", "tail", "--follow", "--session", &id.to_string()])
        .arg(v.dir.path().join("audit.jsonl"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let tailed = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    {
        use std::io::BufRead;
        let out = tail.stdout.take().unwrap();
        let tailed = tailed.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let mut t = tailed.lock().unwrap();
                t.push_str(&line);
                t.push('\n');
            }
        });
    }

    let observer_token = v
        .participant(
            id,
            serde_json::json!({"role": "observer", "user": "watcher"}),
        )
        .await;
    let mut observer = Screen::join(&v, &observer_token).await;
    let operator_token = v
        .participant(
            id,
            serde_json::json!({"role": "operator", "user": "op1", "ttl": "30s"}),
        )
        .await;
    let mut operator = Screen::join(&v, &operator_token).await;
    // Minted now, used after the end.
    let late_token = v
        .participant(id, serde_json::json!({"role": "observer", "user": "late"}))
        .await;

    let listed = session_on(&v, d).await;
    let who: Vec<(String, String)> = listed["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["user"].as_str().unwrap().to_owned(),
                p["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        who,
        [
            ("watcher".to_owned(), "observer".to_owned()),
            ("op1".to_owned(), "operator".to_owned())
        ]
    );
    // Each console page hears who else is there, and what it may do.
    let others = |d: &serde_json::Value| -> Vec<String> {
        d["others"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                format!(
                    "{} ({})",
                    o["user"].as_str().unwrap(),
                    o["role"].as_str().unwrap()
                )
            })
            .collect()
    };
    let mut seen_by_observer = Events::presence(&v, &observer_token).await;
    let (me, _) = seen_by_observer.until(|e, _| e == "presence").await;
    assert_eq!(
        (
            &me["you"]["role"],
            &me["you"]["view_only"],
            &me["you"]["clipboard"]
        ),
        (
            &serde_json::json!("observer"),
            &serde_json::json!(true),
            &serde_json::json!("none")
        )
    );
    assert_eq!(others(&me), ["tester (owner)", "op1 (operator)"]);
    let mut seen_by_operator = Events::presence(&v, &operator_token).await;
    let (me, _) = seen_by_operator.until(|e, _| e == "presence").await;
    assert_eq!(me["you"]["view_only"], false);
    assert_eq!(others(&me), ["tester (owner)", "watcher (observer)"]);
    // One link opens a few presence streams at most.
    let mut more = Vec::new();
    for _ in 1..4 {
        more.push(Events::presence(&v, &observer_token).await);
    }
    let (status, _, _) = common::http_get(
        v.addr,
        &format!("/console/events?token={observer_token}"),
        &[],
    )
    .await;
    assert_eq!(status, 503, "a fifth stream of one link");
    drop(more);
    // A link that holds no live connection hears nothing.
    let (status, _, _) =
        common::http_get(v.addr, &format!("/console/events?token={late_token}"), &[]).await;
    assert_eq!(status, 404);
    let participant_session = |user: &str| {
        wait_record(&v, "session_start", |r| r["user"] == user)["session"]
            .as_u64()
            .unwrap()
    };
    let observer_id = participant_session("watcher");
    let operator_id = participant_session("op1");
    let start = wait_record(&v, "session_start", |r| r["user"] == "op1");
    assert_eq!(
        (&start["role"], &start["joins"]),
        (&serde_json::json!("operator"), &serde_json::json!(id))
    );

    // The observer types and clicks; the owner presses Escape (SeaBIOS's boot menu);
    // the operator types b. The guest's keyboard gets exactly the owner's and the
    // operator's keys, as the audit says; none of the observer's.
    let before = owner.grab().await;
    let mark = trace.mark();
    observer.send(key(true, u32::from(b'x'))).await;
    observer.send(key(false, u32::from(b'x'))).await;
    observer
        .send(ClientMessage::PointerEvent {
            buttons: 1,
            x: 10,
            y: 10,
        })
        .await;
    observer
        .send(ClientMessage::PointerEvent {
            buttons: 0,
            x: 10,
            y: 10,
        })
        .await;
    owner.send(key(true, 0xff1b)).await;
    owner.send(key(false, 0xff1b)).await;
    wait_record(&v, "key", |r| r["session"] == id && r["down"] == false);
    let typed_at = Instant::now();
    operator.send(key(true, u32::from(b'b'))).await;
    operator.send(key(false, u32::from(b'b'))).await;
    wait_record(&v, "key", |r| {
        r["session"] == operator_id && r["down"] == false
    });
    let audit = v.audit();
    let expected = expected_ps2(&audit, &[id, operator_id]);
    let got = trace.settle(mark, expected.len());
    assert_eq!(
        hex(&got),
        hex(&expected),
        "the guest's keyboard got (left) other than the audit says (right)"
    );
    assert!(
        records(&audit, "key")
            .iter()
            .all(|r| r["session"] != observer_id),
        "no key of the observer's is on record as reaching the VM"
    );
    let typed: Vec<(u64, String)> = records(&audit, "key")
        .iter()
        .filter(|r| r["down"] == true)
        .map(|r| {
            (
                r["session"].as_u64().unwrap(),
                r["key"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        typed,
        [(id, "Escape".to_owned()), (operator_id, "b".to_owned())]
    );

    // The live event stream: who joined, what was typed and by whom. The operator's b
    // arrives as text moments after it reached QEMU (noted, not asserted: shared
    // machines are noisy).
    let (joined, _) = events
        .until(|e, d| e == "record" && d["event"] == "session_start" && d["user"] == "op1")
        .await;
    assert_eq!(joined["joins"], id);
    let (escape, _) = events.until(|e, _| e == "text").await;
    assert_eq!(
        (&escape["session"], &escape["user"], &escape["text"]),
        (
            &serde_json::json!(id),
            &serde_json::json!("tester"),
            &serde_json::json!("<Escape>")
        )
    );
    let (b, at) = events.until(|e, _| e == "text").await;
    assert_eq!(
        (&b["session"], &b["user"], &b["text"]),
        (
            &serde_json::json!(operator_id),
            &serde_json::json!("op1"),
            &serde_json::json!("b")
        )
    );
    println!(
        "the operator's key, from the browser's send to its text on the event stream: {:?}",
        at - typed_at
    );

    // The owner's Escape changed the screen, and the observer sees what the owner sees.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (mine, theirs) = (owner.grab().await, observer.grab().await);
        if mine != before && mine == theirs {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the observer's screen never showed the owner's change"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The owner holds Shift as the session ends: QEMU lets go of it as the first
    // connection closes, and that is on record too.
    let mark = trace.mark();
    let sessions = [id, operator_id, observer_id];
    let so_far = expected_ps2(&v.audit(), &sessions).len();
    owner.send(key(true, 0xffe1)).await;
    wait_record(&v, "key", |r| r["session"] == id && r["key"] == "Shift_L");

    // An administrator ends the session: every console closes with the reason.
    let asked = Instant::now();
    let (status, answer) = v
        .api(
            "DELETE",
            &format!("/api/v1/sessions/{id}"),
            r#"{"reason": "maintenance window"}"#,
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let (a, b, c) = tokio::join!(owner.b.closed(), observer.b.closed(), operator.b.closed());
    let took = asked.elapsed();
    println!("DELETE to the last participant's close frame: {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "closed within a second: {took:?}"
    );
    for closed in [a, b, c] {
        assert_eq!(closed.code, 1000);
        assert_eq!(
            closed.reason,
            "ended by an administrator (admin): maintenance window"
        );
    }
    for session in [id, observer_id, operator_id] {
        let end = wait_record(&v, "session_end", |r| r["session"] == session);
        assert_eq!(
            (&end["cause"], &end["ended_by"], &end["admin"]),
            (
                &serde_json::json!("terminated"),
                &serde_json::json!("administrator"),
                &serde_json::json!("admin")
            ),
            "{end}"
        );
    }
    let released = wait_record(&v, "key", |r| r["key"] == "Shift_L" && r["down"] == false);
    let audit = v.audit();
    let expected = expected_ps2(&audit, &sessions)[so_far..].to_vec();
    assert_eq!(
        hex(&trace.settle(mark, expected.len())),
        hex(&expected),
        "the guest's keyboard got (left) other than the audit says (right), at the end: {released}"
    );
    // The presence streams end with their connections.
    seen_by_observer.until(|e, _| e == "end").await;
    seen_by_operator.until(|e, _| e == "end").await;
    // The stream shows the end, then ends.
    let (end, _) = events
        .until(|e, d| e == "record" && d["event"] == "admin_action" && d["action"] == "end")
        .await;
    assert_eq!(end["reason"], "maintenance window");
    events.until(|e, _| e == "end").await;
    assert!(
        events.next().await.is_none(),
        "the stream closed after its end"
    );
    // The terminal's tail showed the same: the text typed, by whom, and the end.
    let want = [
        format!("typed session {id} (tester): \"<Escape>\""),
        format!("typed session {operator_id} (op1): \"b\""),
        "admin_action".to_owned(),
        "maintenance window".to_owned(),
    ];
    for _ in 0..50 {
        if want
            .iter()
            .all(|w| tailed.lock().unwrap().contains(w.as_str()))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shown = tailed.lock().unwrap().clone();
    for w in &want {
        assert!(
            shown.contains(w.as_str()),
            "vizor audit tail --follow lacks {w:?}:\n{shown}"
        );
    }
    assert!(
        !shown.contains("\"late\"") || shown.contains("token_issued"),
        "{shown}"
    );
    let _ = tail.kill();
    let _ = tail.wait();
    // The observer's input, dropped, is on record once: keys and pointer counted.
    let dropped = wait_record(&v, "input_dropped", |r| r["session"] == observer_id);
    assert_eq!(
        (&dropped["keys"], &dropped["pointer"]),
        (&serde_json::json!(2), &serde_json::json!(2)),
        "{dropped}"
    );
    let audit = v.audit();
    let actions: Vec<(String, String)> = records(&audit, "admin_action")
        .iter()
        .map(|r| {
            assert!(r["client"].as_str().unwrap().starts_with("127.0.0.1:"));
            (
                r["admin"].as_str().unwrap().to_owned(),
                r["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let a = |what: &str| ("admin".to_owned(), what.to_owned());
    assert_eq!(
        actions,
        [
            a("follow"),
            a("participant"),
            a("participant"),
            a("participant"),
            a("end")
        ]
    );
    assert!(records(&audit, "admin_action")
        .iter()
        .any(|r| r["action"] == "end" && r["reason"] == "maintenance window"));

    // Ending revoked the session's join tokens: the page says so, the socket too.
    let (status, _, page) =
        common::http_get(v.addr, &format!("/console?token={late_token}"), &[]).await;
    assert_eq!(status, 410);
    assert!(page.contains("This console session has ended"), "{page}");
    let mut late = Browser::connect(v.addr, &format!("/websockify?token={late_token}")).await;
    let closed = late.closed().await;
    assert_eq!(closed.code, 1008, "{closed:?}");
    assert!(closed.reason.contains("not live"), "{closed:?}");
    let (status, answer) = v
        .api(
            "POST",
            &format!("/api/v1/sessions/{id}/participants"),
            r#"{"role": "observer", "user": "later"}"#,
        )
        .await;
    assert_eq!(
        (status, &answer["reason"]),
        (404, &serde_json::json!("session_not_live"))
    );
    v.wait_for_metric("vizor_admin_actions_total{action=\"end\"}", 1.0)
        .await;
    v.wait_for_metric("vizor_session_participants{role=\"observer\"}", 0.0)
        .await;

    // A session whose owner leaves ends for its participants too.
    let (b, si) = open_session(&v, d).await;
    let owner = Screen::new(b, si).await;
    let second = session_on(&v, d).await["id"].as_u64().unwrap();
    assert_ne!(second, id);
    let token = v
        .participant(
            second,
            serde_json::json!({"role": "observer", "user": "watcher2"}),
        )
        .await;
    let mut observer = Screen::join(&v, &token).await;
    observer.grab().await;
    v.wait_for_metric("vizor_session_participants{role=\"observer\"}", 1.0)
        .await;
    drop(owner);
    let closed = observer.b.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (1000, "the session ended: its owner left")
    );
    trace.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_spice_session_is_watched_through_vnc_and_its_owner_stays() {
    common::live_domain();
    let d = common::spice::domain("vizor-test-wspice");
    // A covert review: observers are not shown to the others.
    let v = Vizor::start_admin("", "[oversight]\nannounce = false\n");
    let token = v.token(d, ConsoleKind::Spice, 60);
    let (mut main, _, kind) = common::spice::session(&v, &token, true).await;
    let id = session_on(&v, d).await["id"].as_u64().unwrap();

    // spice-server serves one client: an operator would need a SPICE connection.
    let (status, answer) = v
        .api(
            "POST",
            &format!("/api/v1/sessions/{id}/participants"),
            r#"{"role": "operator", "user": "op"}"#,
        )
        .await;
    assert_eq!(
        (status, &answer["reason"]),
        (409, &serde_json::json!("spice_not_watchable")),
        "{answer}"
    );
    // An administrator watches: through the domain's VNC display.
    let (status, answer) = v
        .api("POST", &format!("/api/v1/sessions/{id}/watch"), "")
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (&answer["kind"], &answer["role"], &answer["user"]),
        (
            &serde_json::json!("vnc"),
            &serde_json::json!("observer"),
            &serde_json::json!("admin")
        )
    );
    let mut watcher = Screen::join(&v, answer["token"].as_str().unwrap()).await;
    watcher.grab().await;
    watcher.send(key(true, u32::from(b'q'))).await;
    // The owner's main channel lives on: spice-server still pings it.
    let pings = common::spice::answer_pings(&mut main, kind, Duration::from_secs(3)).await;
    assert!(pings > 0, "the owner's SPICE session still answers pings");
    watcher.grab().await;
    // Unannounced: the owner's page does not show the watcher, and the audit says so.
    let mut seen_by_owner = Events::presence(&v, &token).await;
    let (me, _) = seen_by_owner.until(|e, _| e == "presence").await;
    assert_eq!(me["you"]["role"], "owner");
    assert_eq!(me["others"], serde_json::json!([]));
    let start = wait_record(&v, "session_start", |r| r["user"] == "admin");
    assert_eq!(
        (&start["unannounced"], &start["role"]),
        (&serde_json::json!(true), &serde_json::json!("observer"))
    );
    let listed = session_on(&v, d).await;
    assert_eq!(listed["kind"], "spice");
    assert_eq!(listed["participants"][0]["announced"], false);
    assert_eq!(listed["participants"][0]["role"], "observer");
    assert_eq!(listed["participants"][0]["user"], "admin");
    let watch = records(&v.audit(), "admin_action");
    assert_eq!(watch.len(), 1);
    assert_eq!(
        (
            &watch[0]["action"],
            &watch[0]["admin"],
            &watch[0]["announced"]
        ),
        (
            &serde_json::json!("watch"),
            &serde_json::json!("admin"),
            &serde_json::json!(false)
        )
    );
    // Ending the session ends both, the SPICE owner and the VNC watcher.
    let (status, _) = v
        .api(
            "DELETE",
            &format!("/api/v1/sessions/{id}"),
            r#"{"reason": "done"}"#,
        )
        .await;
    assert_eq!(status, 200);
    let (a, b) = tokio::join!(main.closed(), watcher.b.closed());
    for closed in [a, b] {
        assert_eq!(closed.reason, "ended by an administrator (admin): done");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_api_refuses_what_it_cannot_do() {
    let v = Vizor::start_admin("", "");
    // Without the key: refused like any API request.
    let (status, _, _) = common::http_request(
        v.addr,
        "DELETE",
        "/api/v1/sessions/1",
        &[],
        r#"{"reason": "x"}"#,
    )
    .await;
    assert_eq!(status, 401);
    let (status, _, _) =
        common::http_request(v.addr, "GET", "/api/v1/sessions/1/events", &[], "").await;
    assert_eq!(status, 401);
    for (method, path, body, want_status, want_reason) in [
        (
            "DELETE",
            "/api/v1/sessions/7",
            r#"{"reason": "x"}"#,
            404,
            "session_not_live",
        ),
        ("DELETE", "/api/v1/sessions/7", "", 400, "bad_request"),
        (
            "DELETE",
            "/api/v1/sessions/7",
            r#"{"reason": ""}"#,
            400,
            "bad_request",
        ),
        (
            "DELETE",
            "/api/v1/sessions/7",
            r#"{"reason": "a\nb"}"#,
            400,
            "bad_request",
        ),
        (
            "DELETE",
            "/api/v1/sessions/7",
            r#"{"why": "x"}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/api/v1/sessions/7/participants",
            r#"{"role": "owner", "user": "u"}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/api/v1/sessions/7/participants",
            r#"{"role": "observer"}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/api/v1/sessions/7/participants",
            r#"{"role": "observer", "user": "u", "clipboard": "both"}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/api/v1/sessions/7/participants",
            r#"{"role": "operator", "user": "u", "clipboard": "sideways"}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/api/v1/sessions/7/participants",
            r#"{"role": "operator", "user": "u", "ttl": "2days"}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/api/v1/sessions/7/participants",
            r#"{"role": "operator", "user": "u"}"#,
            404,
            "session_not_live",
        ),
        (
            "POST",
            "/api/v1/sessions/7/watch",
            r#"{"user": "u"}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/api/v1/sessions/7/watch",
            "",
            404,
            "session_not_live",
        ),
    ] {
        let (status, answer) = v.api(method, path, body).await;
        assert_eq!(
            (status, answer["reason"].as_str().unwrap()),
            (want_status, want_reason),
            "{method} {path} {body}: {answer}"
        );
    }
    // A console link bound to another address is not heard from here.
    let claims =
        vizor::token::Claims::new("anything", [7; 16], ConsoleKind::Vnc, "u", u64::MAX / 2)
            .unwrap()
            .bound_to("127.0.0.9".parse().unwrap());
    let bound = v.seal(&claims);
    let (status, _, _) =
        common::http_get(v.addr, &format!("/console/events?token={bound}"), &[]).await;
    assert_eq!(status, 403);
    let (status, _, _) = common::http_get(v.addr, "/console/events?token=garbage", &[]).await;
    assert_eq!(status, 403);
    let big = format!(r#"{{"reason": "{}"}}"#, "x".repeat(9000));
    let (status, answer) = v.api("DELETE", "/api/v1/sessions/7", &big).await;
    assert_eq!(
        (status, &answer["reason"]),
        (413, &serde_json::json!("body_too_large"))
    );
    let bearer = format!("Bearer {}", common::ADMIN_KEY);
    for (method, path, want) in [
        ("GET", "/api/v1/sessions/7", 405),
        ("GET", "/api/v1/sessions/7/watch", 405),
        ("DELETE", "/api/v1/sessions/seven", 400),
        ("POST", "/api/v1/sessions/7/other", 404),
    ] {
        let (status, _, body) =
            common::http_request(v.addr, method, path, &[("Authorization", &bearer)], "").await;
        assert_eq!(status, want, "{method} {path}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_tokens_policy_holds_for_its_owner() {
    let d = common::live_domain().name;
    let v = Vizor::start("");
    // View only, for two seconds at most.
    let policy = vizor::token::Policy {
        view_only: true,
        clipboard: vizor::token::ClipboardWays::NONE,
        max_duration: Some(Duration::from_secs(2)),
    };
    let token = v.token_with(&d, ConsoleKind::Vnc, policy);
    let mut b = Browser::connect(v.addr, &format!("/websockify?token={token}")).await;
    let si = rfb_handshake(&mut b).await.unwrap();
    let opened = Instant::now();
    let mut s = Screen::new(b, si).await;
    s.grab().await;
    s.send(key(true, u32::from(b'v'))).await;
    s.send(key(false, u32::from(b'v'))).await;
    s.send(ClientMessage::ClientCutText(
        vizor_rfb::cut_text::CutText::Latin1(b"secret"),
    ))
    .await;
    let closed = s.b.closed().await;
    let took = opened.elapsed();
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (1000, "the session reached its maximum duration of 2s")
    );
    assert!(took >= Duration::from_millis(1900), "{took:?}");
    let end = wait_record(&v, "session_end", |_| true);
    assert_eq!(end["cause"], "max_duration");
    let session = end["session"].as_u64().unwrap();
    let dropped = wait_record(&v, "input_dropped", |r| r["session"] == session);
    assert_eq!(
        (
            &dropped["keys"],
            &dropped["clipboard"],
            &dropped["clipboard_bytes"]
        ),
        (
            &serde_json::json!(2),
            &serde_json::json!(1),
            &serde_json::json!(6)
        ),
        "{dropped}"
    );
    let audit = v.audit();
    assert!(records(&audit, "key").is_empty(), "no key reached the VM");
    assert!(
        records(&audit, "clipboard").is_empty(),
        "no clipboard reached the VM"
    );

    // SPICE's agent stream has no view-only or clipboard limits yet: refused.
    let token = v.token_with(&d, ConsoleKind::Spice, policy);
    let mut b = Browser::connect(v.addr, &format!("/websockify?token={token}")).await;
    let closed = b.closed().await;
    assert_eq!(closed.code, 1008, "{closed:?}");
    assert!(closed.reason.contains("SPICE"), "{closed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn each_clipboard_way_holds_between_participants_through_qemu() {
    common::live_domain();
    let d = "vizor-test-wclip";
    common::test_host(&["domain", d, "--vnc-passwd", "wclip1", "--no-spice"]);
    let v = Vizor::start_admin("", "");
    let (b, si) = open_session(&v, d).await;
    let mut owner = Screen::with(b, si, true).await;
    owner.grab().await;
    let id = session_on(&v, d).await["id"].as_u64().unwrap();
    let join = |user: &'static str, role: &'static str, clipboard: Option<&'static str>| {
        let mut body = serde_json::json!({"role": role, "user": user});
        if let Some(c) = clipboard {
            body["clipboard"] = c.into();
        }
        let v = &v;
        async move {
            let token = v.participant(id, body).await;
            let mut b = Browser::connect(v.addr, &format!("/websockify?token={token}")).await;
            let si = rfb_handshake(&mut b).await.unwrap();
            let mut s = Screen::with(b, si, true).await;
            s.grab().await;
            let session = wait_record(v, "session_start", |r| r["user"] == user)["session"]
                .as_u64()
                .unwrap();
            (s, session)
        }
    };
    let (mut reader, reader_id) = join("reader", "operator", Some("from_vm")).await;
    let (mut writer, writer_id) = join("writer", "operator", Some("to_vm")).await;
    let (mut observer, observer_id) = join("watcher", "observer", None).await;
    let cut = |text: &'static [u8]| {
        ClientMessage::ClientCutText(vizor_rfb::cut_text::CutText::Latin1(text))
    };

    // The owner pastes: QEMU tells its other VNC clients (extended clipboard), and
    // gives it to those that ask.
    owner.send(cut(b"from-owner")).await;
    wait_record(&v, "clipboard", |r| {
        r["session"] == id && r["direction"] == "browser_to_vm"
    });
    // Each grab reads what came before it, and answers a notify with a request.
    for s in [&mut reader, &mut writer, &mut observer] {
        s.grab().await;
    }
    reader.grab().await;
    let to_reader = wait_record(&v, "clipboard", |r| {
        r["session"] == reader_id && r["direction"] == "vm_to_browser"
    });
    assert_eq!(to_reader["length"], 10);
    // The writer and the observer were not even told: no request, no contents.
    let audit = v.audit();
    for held in [writer_id, observer_id] {
        assert!(
            records(&audit, "clipboard")
                .iter()
                .all(|r| r["session"] != held),
            "session {held} got no clipboard"
        );
    }
    // The writer pastes (to_vm): it passes, and the owner gets it from QEMU.
    writer.send(cut(b"from-writer")).await;
    wait_record(&v, "clipboard", |r| {
        r["session"] == writer_id && r["direction"] == "browser_to_vm"
    });
    owner.grab().await;
    owner.grab().await;
    wait_record(&v, "clipboard", |r| {
        r["session"] == id && r["direction"] == "vm_to_browser" && r["length"] == 11
    });
    // The reader (from_vm) and the observer paste: nothing passes.
    reader.send(cut(b"from-reader")).await;
    observer.send(cut(b"from-watcher")).await;
    // What each browser got: a screen grab flushes what came before it.
    owner.grab().await;
    reader.grab().await;
    writer.grab().await;
    observer.grab().await;
    let got = |s: &Screen, what: &[u8]| s.clips.iter().any(|c| c.as_slice() == what);
    assert!(got(&reader, b"from-owner"), "{:?}", reader.clips);
    assert!(got(&owner, b"from-writer"), "{:?}", owner.clips);
    for (name, s) in [("writer", &writer), ("observer", &observer)] {
        assert!(
            s.clips.is_empty(),
            "{name} got the VM's clipboard: {:?}",
            s.clips
        );
    }
    assert!(!got(&owner, b"from-reader") && !got(&owner, b"from-watcher"));
    drop((owner, reader, writer, observer));
    for (session, bytes) in [(reader_id, 11), (observer_id, 12)] {
        let r = wait_record(&v, "input_dropped", |r| r["session"] == session);
        assert_eq!(
            (&r["clipboard"], &r["clipboard_bytes"]),
            (&1.into(), &bytes.into()),
            "{r}"
        );
    }
    let passed: Vec<(u64, String)> = records(&v.audit(), "clipboard")
        .iter()
        .filter(|r| r["direction"] == "browser_to_vm")
        .map(|r| {
            (
                r["session"].as_u64().unwrap(),
                r["direction"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        passed,
        [
            (id, "browser_to_vm".to_owned()),
            (writer_id, "browser_to_vm".to_owned())
        ],
        "only the owner's and the writer's pastes reached the VM"
    );
}
