//! Real browsers end to end: vizor's console page in Debian's headless Chromium, driven
//! by playwright-core (`tests/browser/console.mjs`), with noVNC 1.7 from npm and
//! Debian's spice-html5, against freshly started libvirt domains.
//!
//! `scripts/test.sh` installs Chromium, spice-html5 and `web/node_modules` and runs these
//! `#[ignore]`d tests with `--include-ignored`; without them they fail.
//! Screenshots land in `target/tmp/browser/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{audited_keys, test_host, Vizor};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use vizor::token::ConsoleKind;

const SPICE_HTML5: &str = "/usr/share/spice-html5";

/// What a browser test needs, found on this machine.
struct Tools {
    chromium: PathBuf,
    playwright: PathBuf,
    novnc: PathBuf,
}

fn tools() -> Tools {
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("web/node_modules");
    let t = Tools {
        chromium: std::env::var_os("VIZOR_CHROMIUM")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/usr/bin/chromium".into()),
        playwright: web.join("playwright-core/index.mjs"),
        novnc: web.join("@novnc/novnc"),
    };
    let node = Command::new("node").arg("--version").output();
    let missing: Vec<String> = [
        (node.is_err(), "node".to_owned()),
        (!t.chromium.exists(), t.chromium.display().to_string()),
        (!t.playwright.exists(), t.playwright.display().to_string()),
        (
            !t.novnc.join("core/rfb.js").exists(),
            t.novnc.display().to_string(),
        ),
        (
            !Path::new(SPICE_HTML5).join("main.js").exists(),
            SPICE_HTML5.to_owned(),
        ),
    ]
    .into_iter()
    .filter_map(|(gone, what)| gone.then_some(what))
    .collect();
    common::live_domain();
    assert!(
        missing.is_empty(),
        "browser tools missing: {missing:?} (scripts/test.sh installs them)"
    );
    t
}

/// Where screenshots and captured frames go.
fn out_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A fresh random password: nothing here may depend on its value.
fn password() -> String {
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs one scenario of `console.mjs`; returns its findings.
fn drive(t: &Tools, mode: &str, url: &str, extra: &str) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/console.mjs");
    let out = Command::new("node")
        .args([script, mode, url])
        .arg(out_dir())
        .arg(extra)
        .env("VIZOR_PLAYWRIGHT", &t.playwright)
        .env("VIZOR_CHROMIUM", &t.chromium)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "console.mjs {mode} failed ({}): {stderr}\n(screenshot: {}/failed-{mode}.png)",
        out.status,
        out_dir().display()
    );
    let result: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("console.mjs {mode}: {e}: {stdout}{stderr}"));
    assert_eq!(result["problems"], serde_json::json!([]), "{result}");
    result
}

/// vizor with the console page's clients configured.
fn console_vizor(t: &Tools, audit_extra: &str) -> Vizor {
    Vizor::start_full(
        "",
        audit_extra,
        &format!(
            "[console]\nnovnc = \"{}\"\nspice_html5 = \"{SPICE_HTML5}\"\n",
            t.novnc.display()
        ),
        |dir| std::fs::create_dir(dir.join("recordings")).unwrap(),
    )
}

fn console_url(v: &Vizor, domain: &str, kind: ConsoleKind, ttl: i64) -> String {
    format!(
        "http://{}/console?token={}",
        v.addr,
        v.token(domain, kind, ttl)
    )
}

#[test]
#[ignore = "live: needs the test host and Chromium (scripts/test.sh runs it with --include-ignored)"]
fn novnc_shows_seabios_opens_the_boot_menu_and_its_replay_ends_on_the_same_frame() {
    let t = tools();
    let domain = "vizor-test-bvnc";
    let pw = password();
    // (Re)started now: SeaBIOS offers its boot menu for 30 s.
    test_host(&["domain", domain, "--vnc-passwd", &pw, "--no-spice"]);
    let v = console_vizor(&t, "record_dir = \"recordings\"");
    let r = drive(
        &t,
        "vnc-boot-menu",
        &console_url(&v, domain, ConsoleKind::Vnc, 60),
        domain,
    );
    // The page paused the VM to take a settled last frame.
    common::virsh(&["resume", domain]);
    eprintln!("noVNC: {r}");
    assert_eq!(r["status"], 200);
    // Not blank: the banner and the prompt are drawn.
    assert!(r["banner_lit"].as_u64().unwrap() > 1000, "{r}");
    assert!(r["prompt_lit"].as_u64().unwrap() > 100, "{r}");
    // Escape opened the menu below the prompt, long before SeaBIOS's 30 s timeout.
    assert!(
        r["below_after"].as_u64().unwrap() > r["below_before"].as_u64().unwrap() + 500,
        "{r}"
    );
    assert!(r["menu_ms"].as_u64().unwrap() < 5000, "{r}");
    assert_eq!(r["ended"]["words"], "Disconnected", "{r}");

    // The audit holds that Escape, by name, in the session the page opened.
    let audit = v.wait_for_records("session_end", 1);
    let keys = audited_keys(&audit);
    assert!(keys.contains(&(true, "Escape".to_owned())), "{keys:?}");
    let start = audit
        .iter()
        .find(|r| r["event"] == "session_start")
        .unwrap();
    assert_eq!(start["domain"], domain);
    assert_eq!(start["kind"], "vnc");
    v.assert_never_logged(&pw);

    // The recording replays in the same page, and its last frame is the live one's.
    let end = audit.iter().find(|r| r["event"] == "session_end").unwrap();
    let file = v.path().join("recordings").join(
        end["recording"]["file"]
            .as_str()
            .unwrap_or_else(|| panic!("no recording: {end}")),
    );
    let mut replay = Command::new(env!("CARGO_BIN_EXE_vizor"))
        .args([
            "replay",
            "--listen",
            "127.0.0.1:0",
            "--speed",
            "0",
            "--novnc",
        ])
        .arg(&t.novnc)
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(replay.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let rr = drive(
        &t,
        "replay",
        &format!("http://{addr}/"),
        r["final_frame"].as_str().unwrap(),
    );
    let _ = replay.kill();
    let _ = replay.wait();
    eprintln!("replay: {rr}");
    assert_eq!(rr["state"]["words"], "Connected", "{rr}");
    assert_eq!(
        (&rr["width"], &rr["height"]),
        (&r["final_width"], &r["final_height"])
    );
    assert_eq!(rr["differing"], 0, "{rr}");
}

/// A SPICE test domain (`extra`: more of test-host.sh's options), a vizor, and the
/// console page driven in Chromium, typing `text`; with the domain's VNC and SPICE
/// passwords.
fn spice_page(
    t: &Tools,
    domain: &str,
    extra: &[&str],
    text: &str,
) -> (Vizor, serde_json::Value, String, String) {
    let (vnc_pw, spice_pw) = (password(), password());
    let mut args = vec![
        "domain",
        domain,
        "--vnc-passwd",
        &vnc_pw,
        "--spice-passwd",
        &spice_pw,
    ];
    args.extend_from_slice(extra);
    test_host(&args);
    let v = console_vizor(t, "");
    let r = drive(
        t,
        "spice",
        &console_url(&v, domain, ConsoleKind::Spice, 60),
        text,
    );
    (v, r, vnc_pw, spice_pw)
}

#[test]
#[ignore = "live: needs the test host and Chromium (scripts/test.sh runs it with --include-ignored)"]
fn spice_html5_draws_the_screen_and_typed_keys_are_audited() {
    let t = tools();
    let domain = "vizor-test-bspice";
    let (v, r, vnc_pw, spice_pw) = spice_page(&t, domain, &[], "hi");
    eprintln!("spice-html5: {r}");
    assert_eq!(r["status"], 200);
    assert_eq!(r["connected"]["words"], "Connected", "{r}");
    assert!(r["banner_lit"].as_u64().unwrap() > 1000, "{r}");
    assert_eq!(r["fullscreen"], true, "{r}");
    // The screen fills the page (1024x604 below the bar): scaled up, not left at the
    // VM's 720x400 in a corner; the pointer's middle is the VM's middle.
    let f = &r["fit"];
    let (w, h, sw, sh) = (
        f["w"].as_f64().unwrap(),
        f["h"].as_f64().unwrap(),
        f["sw"].as_f64().unwrap(),
        f["sh"].as_f64().unwrap(),
    );
    assert!(
        (w - sw).abs() < 2.0 || (h - sh).abs() < 2.0,
        "fills one side of the page: {r}"
    );
    assert!(w > f["cw"].as_f64().unwrap(), "scaled up: {r}");
    let (px, py) = (
        r["pointer"]["x"].as_f64().unwrap(),
        r["pointer"]["y"].as_f64().unwrap(),
    );
    let (cx, cy) = (
        f["cw"].as_f64().unwrap() / 2.0,
        f["ch"].as_f64().unwrap() / 2.0,
    );
    assert!(
        (px - cx).abs() <= 2.0 && (py - cy).abs() <= 2.0,
        "the pointer maps into the VM's pixels: {r}"
    );
    let audit = v.wait_for_records("session_end", 1);
    let id = audit
        .iter()
        .find(|r| r["event"] == "session_start" && r["kind"] == "spice")
        .unwrap()["session"]
        .to_string();
    // What was typed, then the page's Ctrl+Alt+Del button.
    assert_eq!(v.audit_text(&id), "hi<Ctrl+Alt+Delete>");
    v.assert_never_logged(&spice_pw);
    v.assert_never_logged(&vnc_pw);
}

/// With SPICE image compression off, QEMU sends its screen as raw bitmaps, each over
/// 64 KiB: vizor splices their pixels from socket to socket, and spice-html5 draws them.
#[test]
#[ignore = "live: needs the test host and Chromium (scripts/test.sh runs it with --include-ignored)"]
fn spice_html5_draws_raw_drawings_vizor_splices() {
    let t = tools();
    let domain = "vizor-test-bspraw";
    let (v, r, _, _) = spice_page(&t, domain, &["--spice-uncompressed"], "ok");
    eprintln!("spice-html5, uncompressed: {r}");
    assert_eq!(r["connected"]["words"], "Connected", "{r}");
    assert!(r["banner_lit"].as_u64().unwrap() > 1000, "{r}");
    let metrics = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(v.metrics());
    let spliced = common::metric(&metrics, "vizor_spliced_bytes_total{kind=\"spice\"}").unwrap();
    assert!(spliced > 64.0 * 1024.0, "{spliced} bytes spliced");
    let audit = v.wait_for_records("session_end", 1);
    let id = audit
        .iter()
        .find(|r| r["event"] == "session_start" && r["kind"] == "spice")
        .unwrap()["session"]
        .to_string();
    assert_eq!(v.audit_text(&id), "ok<Ctrl+Alt+Delete>");
}

#[test]
#[ignore = "live: needs the test host and Chromium (scripts/test.sh runs it with --include-ignored)"]
fn the_console_page_says_in_words_why_a_link_does_not_open() {
    let t = tools();
    let v = console_vizor(&t, "");
    // A domain that need not exist: tokens are refused before any lookup.
    let domain = "vizor-test-nonesuch";
    let expired = console_url(&v, domain, ConsoleKind::Vnc, -5);
    let r = drive(&t, "refused", &expired, "refused-expired");
    assert_eq!(r["status"], 403);
    assert_eq!(r["heading"], "This console link has expired", "{r}");

    // Spent by a WebSocket first, the way the page spends it.
    let token = v.token(domain, ConsoleKind::Vnc, 60);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut b = common::Browser::connect(v.addr, &format!("/websockify?token={token}")).await;
        b.closed().await
    });
    let used = format!("http://{}/console?token={token}", v.addr);
    let r = drive(&t, "refused", &used, "refused-used");
    assert_eq!(r["status"], 403);
    assert_eq!(r["heading"], "This console link was already used", "{r}");

    let r = drive(
        &t,
        "refused",
        &format!("http://{}/console?token=not-a-token", v.addr),
        "refused-invalid",
    );
    assert_eq!(r["heading"], "This console link is not valid", "{r}");
    let r = drive(
        &t,
        "refused",
        &format!("http://{}/console", v.addr),
        "refused-missing",
    );
    assert_eq!(r["status"], 400);
    assert_eq!(r["heading"], "This console link has no token", "{r}");

    // Every refusal is audited, the spent token with its id but never the token.
    let audit = v.wait_for_records("token_refused", 3);
    let reasons: Vec<&str> = audit
        .iter()
        .filter(|r| r["event"] == "token_refused")
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert!(reasons.contains(&"expired"), "{reasons:?}");
    assert!(reasons.contains(&"replayed"), "{reasons:?}");
    assert!(reasons.contains(&"malformed"), "{reasons:?}");
    assert!(!std::fs::read_to_string(v.audit_path())
        .unwrap()
        .contains(&token));
}

#[test]
#[ignore = "live: needs the test host and Chromium (scripts/test.sh runs it with --include-ignored)"]
fn the_console_page_connects_over_https_and_wss() {
    let t = tools();
    let live = common::live_domain();
    let (cert, key, _) = common::tls::certificate();
    let v = Vizor::start_full(
        "tls_cert = \"tls.crt\"\ntls_key = \"tls.key\"",
        "",
        &format!("[console]\nnovnc = \"{}\"\n", t.novnc.display()),
        move |dir| common::tls::write(dir, &cert, &key),
    );
    let url = format!(
        "https://{}/console?token={}",
        v.addr,
        v.token(&live.name, ConsoleKind::Vnc, 60)
    );
    let r = drive(&t, "connect", &url, "https-console");
    eprintln!("https: {r}");
    assert_eq!(r["status"], 200);
    assert_eq!(r["connected"]["words"], "Connected", "{r}");
    assert_eq!(r["protocol"], "https:", "{r}");
    assert!(r["width"].as_u64().unwrap() > 0, "{r}");
    let audit = v.wait_for_audit("session_start");
    let start = audit
        .iter()
        .find(|r| r["event"] == "session_start")
        .unwrap();
    assert_eq!(start["domain"], live.name.as_str());
}

#[test]
#[ignore = "live: needs the test host and Chromium (scripts/test.sh runs it with --include-ignored)"]
fn the_admin_page_lists_watches_and_ends_sessions() {
    let t = tools();
    let a = "vizor-test-badmin";
    let pw = password();
    // (Re)started now: SeaBIOS offers its boot menu for 30 s.
    test_host(&["domain", a, "--vnc-passwd", &pw, "--no-spice"]);
    let b = common::live_domain().name;
    let v = Vizor::start_full(
        "",
        "",
        &format!(
            "{}[console]\nnovnc = \"{}\"\nspice_html5 = \"{SPICE_HTML5}\"\n",
            common::ADMIN_API,
            t.novnc.display()
        ),
        common::write_admin_key,
    );
    let cfg = serde_json::json!({
        "admin": format!("http://{}/admin", v.addr),
        "key": common::ADMIN_KEY,
        "other": console_url(&v, &b, ConsoleKind::Vnc, 60),
        "domain": a,
    });
    let r = drive(
        &t,
        "admin",
        &console_url(&v, a, ConsoleKind::Vnc, 60),
        &cfg.to_string(),
    );
    eprintln!("admin page: {r}");
    assert_eq!(
        (&r["status"], &r["admin_status"]),
        (&200.into(), &200.into())
    );
    let mut listed: Vec<&str> = r["listed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    listed.sort();
    let mut want = vec![a, b.as_str()];
    want.sort();
    assert_eq!(listed, want);
    // The key is in the page's memory alone.
    assert_eq!(
        r["key_kept"],
        serde_json::json!({"url": false, "cookie": false, "storage": false, "input": ""})
    );
    assert_eq!(
        r["login_shown"], false,
        "the key form goes once the key works"
    );
    // Presence on both pages; the watcher's is view only.
    assert_eq!(r["watcher_presence"], "Also here: tester (owner)", "{r}");
    assert_eq!(r["owner_presence"], "Also here: admin (observer)", "{r}");
    assert_eq!(r["watcher_policy"], "View only", "{r}");
    // The owner's Escape opened SeaBIOS's menu on the watcher's screen.
    assert!(
        r["below_after"].as_u64().unwrap() > r["below_before"].as_u64().unwrap() + 500,
        "{r}"
    );
    assert!(
        r["typed"]
            .as_str()
            .unwrap()
            .contains("tester typed \"<Escape>\""),
        "{r}"
    );
    // End: both pages of A say who ended it and why; B goes on.
    let ended = "Disconnected: ended by an administrator (admin): end of shift";
    assert_eq!(r["owner_ended"]["words"], ended, "{r}");
    assert_eq!(r["watcher_ended"]["words"], ended, "{r}");
    assert_eq!(r["other_still"]["state"], "connected", "{r}");
    let audit = v.wait_for_records("admin_action", 2);
    let actions: Vec<&str> = audit
        .iter()
        .filter(|r| r["event"] == "admin_action")
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["follow", "watch", "end"]);
    v.assert_never_logged(&pw);
    v.assert_never_logged(common::ADMIN_KEY);
}

#[test]
#[ignore = "live: needs the test host and Chromium (scripts/test.sh runs it with --include-ignored)"]
fn the_console_page_shows_view_only_and_warns_a_minute_before_the_end() {
    let t = tools();
    let d = common::live_domain().name;
    let v = console_vizor(&t, "");
    // View only, for 64 seconds: the warning comes four seconds in. (The end at
    // max_duration, with its reason, is tests/oversight.rs's.)
    let policy = vizor::token::Policy {
        view_only: true,
        clipboard: vizor::token::ClipboardWays::NONE,
        max_duration: Some(std::time::Duration::from_secs(64)),
    };
    let url = format!(
        "http://{}/console?token={}",
        v.addr,
        v.token_with(&d, ConsoleKind::Vnc, policy)
    );
    let r = drive(&t, "policy", &url, "policy");
    eprintln!("policy: {r}");
    assert_eq!(r["badge"], "View only", "{r}");
    // A minute and a few seconds left, then the warning, as the clock passes a minute.
    let left = r["left"].as_str().unwrap();
    assert!(left.starts_with("1:0") && left.ends_with(" left"), "{r}");
    assert_eq!(
        r["warned_early"], "",
        "no warning before the last minute: {r}"
    );
    assert_eq!(r["view_only"], true, "noVNC sends no input: {r}");
    assert_eq!(r["warning"], "This session ends in under a minute.", "{r}");
    let warned = r["left_warned"].as_str().unwrap();
    assert!(
        warned.starts_with("1:00") || warned.starts_with("0:"),
        "{r}"
    );
    assert_eq!(r["still"]["state"], "connected", "{r}");
}

/// "Paste as keys" in Chromium: vizor types the text with the keys of the layout the
/// page chose, so what QEMU hands the guest's PS/2 keyboard is exactly what the key
/// records say (each marked as a paste's), `vizor audit text` reads the text back, a
/// paste can be stopped, and text the layout cannot type is refused with its reason.
#[test]
#[ignore = "live: needs the test host and Chromium (scripts/test.sh runs it with --include-ignored)"]
fn paste_as_keys_types_the_text_with_the_layouts_keys() {
    paste_as_keys(ConsoleKind::Vnc, "vizor-test-paste");
}

/// The same through spice-html5: the keys go as the SPICE inputs channel's scancodes.
#[test]
#[ignore = "live: needs the test host and Chromium (scripts/test.sh runs it with --include-ignored)"]
fn paste_as_keys_types_the_text_on_a_spice_console() {
    paste_as_keys(ConsoleKind::Spice, "vizor-test-spaste");
}

fn paste_as_keys(kind: ConsoleKind, d: &str) {
    use common::guest::Ps2Trace;
    let t = tools();
    let pw = password();
    match kind {
        ConsoleKind::Vnc => test_host(&["domain", d, "--vnc-passwd", &pw, "--no-spice"]),
        ConsoleKind::Spice => test_host(&["domain", d, "--vnc-passwd", &pw, "--spice-passwd", &pw]),
    };
    let trace = Ps2Trace::start(d);
    let mark = trace.mark();
    let v = console_vizor(&t, "");
    let url = console_url(&v, d, kind, 60);
    // German: z and y trade places, @ and € are AltGr's, ê is a dead circumflex then
    // e, and ^ alone the dead circumflex then Space.
    let de = "Hello, World! äöü zy @€ ê^";
    let us = "us: a#$%^&*(){}|~\"q\" <x>_+?";
    let cancel = "the quick brown fox jumps over the lazy dog ".repeat(4);
    let extra = serde_json::json!({
        "pastes": [{"text": de, "layout": "de"}, {"text": us, "layout": "us"}],
        "cancel": cancel,
    });
    let r = drive(&t, "paste", &url, &extra.to_string());
    eprintln!("paste: {r}");
    assert_eq!(r["still"]["state"], "connected", "{r}");
    let refused = r["refused"].as_str().unwrap();
    assert!(refused.contains("cannot be typed on the de layout"), "{r}");
    // Three pastes: two typed whole, one stopped; each between its two records.
    let audit = v.wait_for_records("paste", 6);
    let pastes: Vec<&serde_json::Value> = audit.iter().filter(|x| x["event"] == "paste").collect();
    let told: Vec<(&str, &str, u64)> = pastes
        .iter()
        .map(|x| {
            (
                x["status"].as_str().unwrap(),
                x["layout"].as_str().unwrap(),
                x["chars"].as_u64().unwrap(),
            )
        })
        .collect();
    let n = |s: &str| s.chars().count() as u64;
    assert_eq!(
        told,
        [
            ("started", "de", n(de)),
            ("done", "de", n(de)),
            ("started", "us", n(us)),
            ("done", "us", n(us)),
            ("started", "us", n(&cancel)),
            ("cancelled", "us", n(&cancel)),
        ]
    );
    assert_eq!(pastes[1]["typed"].as_u64(), Some(n(de)));
    let stopped_at = pastes[5]["typed"].as_u64().unwrap();
    assert!((3..n(&cancel)).contains(&stopped_at), "{:?}", pastes[5]);
    let session = pastes[0]["session"].as_u64().unwrap();
    // Every key of the session is a paste's: the page typed nothing itself.
    let keys: Vec<&serde_json::Value> = audit
        .iter()
        .filter(|x| x["event"] == "key" && x["session"].as_u64() == Some(session))
        .collect();
    assert!(keys.len() > 100, "{} key records", keys.len());
    // (A SPICE inputs channel's first byte ends any prefix an earlier client left in
    // QEMU's decoder: origin reset, nothing for the guest.)
    assert!(
        keys.iter()
            .all(|k| k["origin"] == "paste" || k["origin"] == "reset"),
        "{keys:?}"
    );
    // QEMU's trace is the key records, byte for byte.
    trace.assert_matches(mark, &audit, &[session]);
    // AltGr (right Alt, behind 0xE0) and the dead key reached the guest too.
    assert!(keys.iter().any(|k| k["scancode"] == 0xB8), "AltGr typed");
    assert!(
        keys.iter().any(|k| k["keysym"] == 0xfe52),
        "the dead circumflex typed"
    );
    // The record reads back as the text.
    let text = v.audit_text(&session.to_string());
    let typed: String = cancel.chars().take(stopped_at as usize).collect();
    assert!(
        text.contains(&format!("{de}{us}{typed}")),
        "audit text: {text:?}"
    );
}

/// The console page survives a network blip: a relay between Chromium and vizor cuts
/// every connection (the WebSocket and the presence stream alike, without close
/// frames); the page says it is reconnecting, comes back by itself with the credential
/// vizor gave it on the WebSocket, the screen goes on and typing reaches the same
/// session; the key it held at the cut is released on record. Cut for longer than the
/// window, the page gives up with vizor's words.
#[test]
#[ignore = "live: needs the test host and Chromium (scripts/test.sh runs it with --include-ignored)"]
fn the_console_page_resumes_after_its_connection_is_cut() {
    let d = common::live_domain().name;
    let (audit, session) = resumes_after_cuts(&d, ConsoleKind::Vnc);
    let order: Vec<&str> = session_events(&audit, session)
        .into_iter()
        .map(|(e, _)| e)
        .collect();
    assert_eq!(
        order,
        [
            "session_start",
            "session_drop",
            "session_resume",
            "session_drop",
            "session_end"
        ]
    );
}

/// The same for spice-html5: the page opens a new main channel with its credential,
/// spice-html5's other channels join the session again, all under one session id.
#[test]
#[ignore = "live: needs the test host and Chromium (scripts/test.sh runs it with --include-ignored)"]
fn the_spice_page_resumes_after_its_connection_is_cut() {
    let d = "vizor-test-bspresume";
    test_host(&[
        "domain",
        d,
        "--vnc-passwd",
        &password(),
        "--spice-passwd",
        &password(),
    ]);
    let (audit, session) = resumes_after_cuts(d, ConsoleKind::Spice);
    // The main channel's start, its drop and resume, its drop and end; spice-html5's
    // other channels each time between.
    let main: Vec<&str> = session_events(&audit, session)
        .into_iter()
        .filter(|(_, c)| c.is_none_or(|c| c == "spice:main:0"))
        .map(|(e, _)| e)
        .collect();
    assert_eq!(
        main,
        [
            "session_start",
            "session_drop",
            "session_resume",
            "session_drop",
            "session_end"
        ]
    );
    let inputs = |event: &str| {
        session_events(&audit, session)
            .into_iter()
            .filter(|(e, c)| *e == event && *c == Some("spice:inputs:0"))
            .count()
    };
    assert_eq!((inputs("session_start"), inputs("session_end")), (2, 2));
}

/// A session's `session_*` records in order, each with its channel (SPICE's); every
/// one in `audit` is that session's.
fn session_events(audit: &[serde_json::Value], session: u64) -> Vec<(&str, Option<&str>)> {
    audit
        .iter()
        .filter(|x| x["event"].as_str().unwrap().starts_with("session_"))
        .map(|x| {
            assert_eq!(x["session"].as_u64(), Some(session), "{x}");
            (x["event"].as_str().unwrap(), x["channel"].as_str())
        })
        .collect()
}

/// Drives `domain`'s console page of `kind` through a relay cut twice (see above) and
/// checks what the page showed and the keys on record; returns the audit log and the
/// session's id.
fn resumes_after_cuts(domain: &str, kind: ConsoleKind) -> (Vec<serde_json::Value>, u64) {
    let t = tools();
    let v = Vizor::start_tokens(
        "resume_window = \"5s\"",
        &format!(
            "[console]\nnovnc = \"{}\"\nspice_html5 = \"{SPICE_HTML5}\"\n",
            t.novnc.display()
        ),
        |_| {},
    );
    let relay = common::relay::CutRelay::start(v.addr);
    let url = format!(
        "http://{}/console?token={}",
        relay.addr,
        v.token(domain, kind, 60)
    );
    let extra = serde_json::json!({
        "cut": format!("http://{}/cut", relay.control),
        "block": format!("http://{}/block?ms=8000", relay.control),
        "kind": kind.as_str(),
    });
    let r = drive(&t, "resume", &url, &extra.to_string());
    eprintln!("resume: {r}");
    assert_eq!(r["reconnecting"]["words"], "Reconnecting…", "{r}");
    // Not a blank page meanwhile: the last frame, dimmed, until the console is back.
    assert!(r["stale_lit"].as_u64().unwrap() > 1000, "{r}");
    assert_eq!(r["stale_gone"], true, "{r}");
    let seen: Vec<&str> = r["seen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let back = seen.iter().position(|s| *s == "connected").unwrap();
    assert!(
        seen[..back].iter().all(|s| *s == "reconnecting"),
        "reconnecting, then connected: {seen:?}"
    );
    assert!(r["back_ms"].as_u64().unwrap() < 5000, "{r}");
    assert!(
        r["lit"].as_u64().unwrap() > 0,
        "the screen is drawn again: {r}"
    );
    assert_eq!(r["ended"]["state"], "error", "{r}");
    let words = r["ended"]["words"].as_str().unwrap();
    assert_eq!(
        words, "Disconnected: this console session can no longer be resumed",
        "{r}"
    );
    let audit = v.audit();
    let session = audit
        .iter()
        .find(|x| x["event"] == "session_start")
        .unwrap()["session"]
        .as_u64()
        .unwrap();
    // Q went down before the cut and QEMU let it go as the session's connection to it
    // closed; R and S were typed after.
    let keys = audited_keys(&audit);
    let drop_release = audit
        .iter()
        .position(|x| x["event"] == "key" && x["origin"] == "disconnect" && x["key"] == "q")
        .expect("the held key released at the drop");
    let resumed = audit
        .iter()
        .position(|x| x["event"] == "session_resume")
        .unwrap();
    assert!(drop_release < resumed);
    assert!(
        keys.contains(&(true, "r".into())) && keys.contains(&(true, "s".into())),
        "{keys:?}"
    );
    let (ok, out) = v.verify(&[v.audit_path()]);
    assert!(ok, "{out}");
    (audit, session)
}
