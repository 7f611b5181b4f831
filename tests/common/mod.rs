//! Shared by the integration tests: the live test host that `scripts/test.sh` starts.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

/// The QEMU test domain `scripts/test.sh` starts, from the environment.
pub struct LiveDomain {
    /// Host and port of its VNC server.
    pub vnc_addr: String,
    /// The VNC password libvirt stores for it.
    pub vnc_password: String,
    /// Its libvirt name.
    pub name: String,
}

/// The live domain, or `None` (and a note) when the suite runs without a test host;
/// with `VIZOR_REQUIRE_LIVE` set its absence is a failure.
pub fn live_domain() -> Option<LiveDomain> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (
        get("VIZOR_TEST_VNC_ADDR"),
        get("VIZOR_TEST_VNC_PASSWORD"),
        get("VIZOR_TEST_VNC_DOMAIN"),
    ) {
        (Some(vnc_addr), Some(vnc_password), Some(name)) => Some(LiveDomain {
            vnc_addr,
            vnc_password,
            name,
        }),
        _ => {
            assert!(
                std::env::var("VIZOR_REQUIRE_LIVE").is_err(),
                "VIZOR_REQUIRE_LIVE is set but the VIZOR_TEST_VNC_* variables are not"
            );
            eprintln!("SKIPPED: no live test host (run scripts/test.sh)");
            None
        }
    }
}

/// Runs `scripts/test-host.sh` with `args`, failing the test if it fails.
pub fn test_host(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-host.sh");
    let out = std::process::Command::new(script)
        .args(args)
        .output()
        .expect("run test-host.sh");
    assert!(
        out.status.success(),
        "test-host.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
