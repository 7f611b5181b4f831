//! The `vizor keygen` and `vizor token` commands, run as a user would run them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

use std::path::Path;
use std::process::{Command, Output};
use vizor::token::{ConsoleKind, TokenKey};

fn vizor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vizor"))
        .args(args)
        .env("USER", "tester")
        .output()
        .expect("run vizor")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The UUID of the domain `demo1` of [`write_config`]'s libvirt.
const DEMO1_UUID: &str = "6d5c4b3a-2918-4776-8655-443322110099";

/// A config whose libvirt is the test driver on a node file holding `demo1` (shut
/// off: a token needs the domain to exist, not to run).
fn write_config(dir: &Path, ttl: &str) -> String {
    let node = dir.join("node.xml");
    std::fs::write(
        &node,
        format!(
            "<node><domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\
             <name>demo1</name><uuid>{DEMO1_UUID}</uuid><memory>65536</memory>\
             <os><type>hvm</type></os><devices/><test:runstate>5</test:runstate>\
             </domain></node>"
        ),
    )
    .unwrap();
    let path = dir.join("vizor.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:6080\"\n[libvirt]\nuri = \"test://{}\"\n\
             [tokens]\nkey_file = \"token.key\"\nttl = \"{ttl}\"\n[audit]\npath = \"audit.jsonl\"\nkey_file = \"audit.key\"\n",
            node.display()
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// [`write_config`] with its token key made by `vizor keygen`.
fn keyed_config(dir: &Path, ttl: &str) -> String {
    let config = write_config(dir, ttl);
    let out = vizor(&["keygen", dir.join("token.key").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    config
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn keygen_writes_a_private_key_once() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("token.key");
    let out = vizor(&["keygen", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The same command makes token and audit keys: it names neither use.
    assert!(
        text(&out.stderr).contains("wrote a new key to")
            && text(&out.stderr).contains("[tokens] key_file or [audit] key_file"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = vizor(&["keygen", key.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("token.key"),
        "{}",
        text(&again.stderr)
    );
}

#[test]
fn token_prints_a_sealed_token_that_a_replica_opens() {
    let dir = tempfile::tempdir().unwrap();
    let config = keyed_config(dir.path(), "90s");
    let before = now();
    let out = vizor(&[
        "token", "--config", &config, "--domain", "demo1", "--kind", "spice", "--user", "alice",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let token = stdout.lines().last().expect("a token line");
    let key = TokenKey::load(&dir.path().join("token.key")).unwrap();
    let claims = key.open(token, before).unwrap();
    assert_eq!(claims.domain, "demo1");
    // The token opens that domain by UUID, which libvirt gave.
    assert_eq!(claims.uuid_string(), DEMO1_UUID);
    assert_eq!(claims.kind, ConsoleKind::Spice);
    assert_eq!(claims.user, "alice");
    assert!((before + 90..=now() + 90).contains(&claims.expires_at));
    // The log line names the token by its id, never the token itself.
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&claims.token_id()), "{stderr}");
    assert!(!stderr.contains(token));

    // Defaults: kind vnc, user from $USER, ttl from the config.
    let out = vizor(&[
        "token", "--config", &config, "--domain", "demo1", "--ttl", "5m",
    ]);
    let token = text(&out.stdout);
    let claims = key.open(token.trim(), before).unwrap();
    assert_eq!(
        (claims.kind, claims.user.as_str()),
        (ConsoleKind::Vnc, "tester")
    );
    assert!(claims.expires_at >= before + 300);
    assert_eq!(claims.client, None, "bound to no client unless asked");

    // --client binds the token to one address, and says so.
    let out = vizor(&[
        "token",
        "--config",
        &config,
        "--domain",
        "demo1",
        "--client",
        "2001:db8::5",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let claims = key.open(text(&out.stdout).trim(), before).unwrap();
    assert_eq!(claims.client, Some("2001:db8::5".parse().unwrap()));
    assert!(text(&out.stderr).contains("client 2001:db8::5 only"));
}

#[test]
fn token_carries_the_policy_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let config = keyed_config(dir.path(), "90s");
    let key = TokenKey::load(&dir.path().join("token.key")).unwrap();
    let out = vizor(&[
        "token",
        "--config",
        &config,
        "--domain",
        "demo1",
        "--view-only",
        "--clipboard",
        "from_vm",
        "--max-duration",
        "30m",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let claims = key.open(text(&out.stdout).trim(), now()).unwrap();
    assert_eq!(
        claims.policy,
        vizor::token::Policy {
            view_only: true,
            clipboard: vizor::token::ClipboardWays {
                to_vm: false,
                from_vm: true
            },
            max_duration: Some(std::time::Duration::from_secs(1800)),
        }
    );
    assert_eq!(claims.role, vizor::token::Role::Owner);
    let err = text(&out.stderr);
    assert!(
        err.contains("view only, clipboard from_vm, sessions end after 30m"),
        "{err}"
    );
    // Without flags: the default policy, and no policy line.
    let out = vizor(&["token", "--config", &config, "--domain", "demo1"]);
    let claims = key.open(text(&out.stdout).trim(), now()).unwrap();
    assert_eq!(claims.policy, vizor::token::Policy::default());
    assert!(!text(&out.stderr).contains("policy"));
    // What cannot be carried out is refused, saying why.
    for (extra, want) in [
        (&["--clipboard", "sideways"][..], "unknown clipboard policy"),
        (&["--max-duration", "8days"][..], "out of range"),
        (&["--kind", "spice", "--view-only"][..], "VNC consoles only"),
        (
            &["--kind", "spice", "--clipboard", "none"][..],
            "VNC consoles only",
        ),
    ] {
        let mut args = vec!["token", "--config", &config, "--domain", "demo1"];
        args.extend_from_slice(extra);
        let out = vizor(&args);
        assert!(!out.status.success(), "{extra:?}");
        assert!(out.stdout.is_empty(), "{extra:?}: no token on failure");
        assert!(
            text(&out.stderr).contains(want),
            "{extra:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn token_refuses_a_user_it_cannot_put_on_record() {
    let dir = tempfile::tempdir().unwrap();
    let config = keyed_config(dir.path(), "90s");
    let long = "u".repeat(257);
    for user in ["", "eve\nadmin", long.as_str()] {
        let out = vizor(&[
            "token", "--config", &config, "--domain", "demo1", "--user", user,
        ]);
        assert!(!out.status.success(), "{user:?}");
        assert!(out.stdout.is_empty(), "{user:?}: no token on failure");
        let err = text(&out.stderr);
        assert!(
            err.contains("user must be 1 to 256 bytes, no control characters"),
            "{user:?}: {err}"
        );
    }
}

#[test]
fn token_refusals_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "60s");
    let cases: [(&[&str], &str); 5] = [
        (
            &["token", "--config", &config, "--domain", "d"],
            "token.key",
        ),
        (
            &[
                "token",
                "--config",
                "/nonexistent/vizor.toml",
                "--domain",
                "d",
            ],
            "/nonexistent/vizor.toml",
        ),
        (
            &[
                "token", "--config", &config, "--domain", "d", "--kind", "rdp",
            ],
            "unknown console kind",
        ),
        (
            &[
                "token", "--config", &config, "--domain", "d", "--ttl", "2days",
            ],
            "out of range",
        ),
        (
            &[
                "token",
                "--config",
                &config,
                "--domain",
                "d",
                "--client",
                "host.example",
            ],
            "invalid IP address syntax",
        ),
    ];
    assert!(
        vizor(&["keygen", dir.path().join("other.key").to_str().unwrap()])
            .status
            .success()
    );
    for (args, want) in cases {
        let out = vizor(args);
        assert!(!out.status.success(), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}: no token on failure");
        assert!(
            text(&out.stderr).contains(want),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn serve_and_replay_refuse_a_console_client_directory_without_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "60s");
    let mut contents = std::fs::read_to_string(&config).unwrap();
    contents.push_str("[console]\nnovnc = \"web\"\n");
    std::fs::write(&config, contents).unwrap();
    std::fs::create_dir(dir.path().join("web")).unwrap();
    let out = vizor(&["serve", "--config", &config]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    // The relative path is shown resolved against the config's directory.
    let web = dir.path().join("web");
    assert!(
        err.contains(&format!(
            "[console] novnc = {}: no core/rfb.js there",
            web.display()
        )),
        "{err}"
    );
    let out = vizor(&["replay", "--novnc", web.to_str().unwrap(), "no-such.vzr"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("--novnc"), "{err}");
    assert!(err.contains("no core/rfb.js there"), "{err}");
}

#[test]
fn a_token_for_a_domain_libvirt_does_not_know_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = keyed_config(dir.path(), "60s");
    let out = vizor(&["token", "--config", &config, "--domain", "nope"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no token on failure");
    let err = text(&out.stderr);
    assert!(
        err.contains(
            "cannot issue a token for domain \"nope\": no domain named \"nope\" in libvirt"
        ),
        "{err}"
    );
    // By UUID too, and the token then names the domain by its name.
    let out = vizor(&["token", "--config", &config, "--domain", DEMO1_UUID]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let key = TokenKey::load(&dir.path().join("token.key")).unwrap();
    let claims = key.open(text(&out.stdout).trim(), now()).unwrap();
    assert_eq!(
        (claims.domain.as_str(), claims.uuid_string()),
        ("demo1", DEMO1_UUID.to_owned())
    );
}

#[test]
fn the_audit_chain_has_its_own_key() {
    // Whoever verifies the log holds the chain key: it must not be (or be derived
    // from) the key that mints tokens.
    let dir = tempfile::tempdir().unwrap();
    let config = keyed_config(dir.path(), "60s");
    let text_of = |c: &str| std::fs::read_to_string(c).unwrap();
    let without = text_of(&config).replace("key_file = \"audit.key\"\n", "");
    std::fs::write(&config, &without).unwrap();
    let out = vizor(&["serve", "--config", &config]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("[audit] key_file is required") && err.contains("vizor keygen"),
        "{err}"
    );
    std::fs::write(
        &config,
        without.replace("[audit]\n", "[audit]\nkey_file = \"token.key\"\n"),
    )
    .unwrap();
    let out = vizor(&["serve", "--config", &config]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("same key as [tokens] key_file") && err.contains("vizor keygen"),
        "{err}"
    );
    // An audit key file others can read is called the audit key.
    use std::os::unix::fs::PermissionsExt;
    let audit_key = dir.path().join("audit.key");
    assert!(vizor(&["keygen", audit_key.to_str().unwrap()])
        .status
        .success());
    std::fs::set_permissions(&audit_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(
        &config,
        without.replace("[audit]\n", "[audit]\nkey_file = \"audit.key\"\n"),
    )
    .unwrap();
    let out = vizor(&["serve", "--config", &config]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("audit key file") && err.contains("chmod 600") && !err.contains("token key"),
        "{err}"
    );
    std::fs::remove_file(&audit_key).unwrap();
    // `vizor audit verify --config` reads the audit key, and says when it is missing.
    std::fs::write(&config, &without).unwrap();
    let out = vizor(&["audit", "verify", "--config", &config, "audit.jsonl"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("[audit] key_file is required"));
}

#[test]
fn token_names_the_host_and_refuses_a_name_on_two() {
    let dir = tempfile::tempdir().unwrap();
    // Two hosts (test-driver nodes): `demo1` on both (other UUIDs), `only2` on the second.
    let node = |name: &str, domains: &[(&str, &str)]| {
        let path = dir.path().join(name);
        let mut xml = String::from("<node>");
        for (d, uuid) in domains {
            xml.push_str(&format!(
                "<domain type='test'><name>{d}</name><uuid>{uuid}</uuid><memory>65536</memory>\
                 <os><type>hvm</type></os><devices/></domain>"
            ));
        }
        xml.push_str("</node>");
        std::fs::write(&path, xml).unwrap();
        format!("test://{}", path.display())
    };
    let a = node("a.xml", &[("demo1", DEMO1_UUID)]);
    let b = node(
        "b.xml",
        &[
            ("demo1", "7d5c4b3a-2918-4776-8655-443322110099"),
            ("only2", "8d5c4b3a-2918-4776-8655-443322110099"),
        ],
    );
    let config = dir.path().join("vizor.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:6080\"\n\
             [[libvirt.hosts]]\nname = \"node-a\"\nuri = \"{a}\"\n\
             [[libvirt.hosts]]\nname = \"node-b\"\nuri = \"{b}\"\n\
             [tokens]\nkey_file = \"token.key\"\n[audit]\npath = \"audit.jsonl\"\nkey_file = \"audit.key\"\n"
        ),
    )
    .unwrap();
    let out = vizor(&["keygen", dir.path().join("token.key").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let config = config.to_str().unwrap();
    let key = TokenKey::load(&dir.path().join("token.key")).unwrap();
    let token = |args: &[&str]| {
        let mut all = vec!["token", "--config", config];
        all.extend_from_slice(args);
        vizor(&all)
    };

    let out = token(&["--domain", "demo1", "--host", "node-b"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let claims = key
        .open(text(&out.stdout).lines().last().unwrap(), now())
        .unwrap();
    assert_eq!(
        (claims.host.as_str(), claims.uuid_string().as_str()),
        ("node-b", "7d5c4b3a-2918-4776-8655-443322110099")
    );
    assert!(
        text(&out.stderr).contains("on host node-b"),
        "{}",
        text(&out.stderr)
    );
    // A name on one host alone needs no --host.
    let out = token(&["--domain", "only2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let claims = key
        .open(text(&out.stdout).lines().last().unwrap(), now())
        .unwrap();
    assert_eq!(claims.host, "node-b");
    // A name on two is refused, naming them; an unknown host too.
    let out = token(&["--domain", "demo1"]);
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(e.contains("several hosts (node-a, node-b)"), "{e}");
    let out = token(&["--domain", "demo1", "--host", "node-c"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no libvirt host named \"node-c\""),
        "{}",
        text(&out.stderr)
    );
}
