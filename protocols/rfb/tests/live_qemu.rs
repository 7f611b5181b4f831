//! Records fresh sessions from a real QEMU VNC server and frames them with the codec.
//!
//! Needs a libvirt domain started by `scripts/test-host.sh domain NAME --vnc-passwd P
//! --mode-switch-disk` and, in the environment, `VIZOR_TEST_VNC_ADDR` (host:port),
//! `VIZOR_TEST_VNC_PASSWORD` and `VIZOR_TEST_VNC_DOMAIN`. The README's test command
//! (`scripts/test.sh`) does all of that and runs these `#[ignore]`d tests with
//! `--include-ignored`; run without a server, they fail.

mod support;

use support::{recorder, replay};

struct Live {
    addr: String,
    password: String,
    domain: String,
}

fn live() -> Live {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (
        get("VIZOR_TEST_VNC_ADDR"),
        get("VIZOR_TEST_VNC_PASSWORD"),
        get("VIZOR_TEST_VNC_DOMAIN"),
    ) {
        (Some(addr), Some(password), Some(domain)) => Live {
            addr,
            password,
            domain,
        },
        _ => panic!("a live test without QEMU: set VIZOR_TEST_VNC_ADDR/_PASSWORD/_DOMAIN (scripts/test.sh does)"),
    }
}

fn record_and_frame(live: &Live, sc: &recorder::Scenario) -> Result<String, String> {
    let hook = || recorder::virsh_reset(&live.domain);
    let cap = recorder::record(&live.addr, Some(live.password.as_bytes()), sc, Some(&hook))?;
    let framed = replay::frame(&cap)?;
    replay::check(&framed, &sc.expect)?;
    // The same session cut at odd boundaries must frame identically.
    let split = replay::frame(&replay::rechunk(&cap, 13))?;
    if split.rects != framed.rects {
        return Err("re-chunked capture framed differently".into());
    }
    Ok(format!(
        "{}: {} updates, rects {:?}",
        sc.name, framed.updates, framed.rects
    ))
}

#[test]
#[ignore = "live: needs QEMU (scripts/test.sh runs it with --include-ignored)"]
fn every_scenario_frames_against_real_qemu() {
    let live = live();
    let (resets, plain): (Vec<_>, Vec<_>) = recorder::scenarios()
        .into_iter()
        .partition(|s| s.reset_guest);
    // Sessions that do not reset the guest run concurrently, as QEMU clients do. Their
    // starts are staggered: QEMU listens with a backlog of 1, and connections beyond it
    // wait for the kernel's SYN-ACK retransmits, seconds apart.
    let results: Vec<Result<String, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = plain
            .iter()
            .enumerate()
            .map(|(i, sc)| {
                let live = &live;
                s.spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(250 * i as u64));
                    record_and_frame(live, sc).map_err(|e| format!("{}: {e}", sc.name))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("recorder thread"))
            .collect()
    });
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(line) => eprintln!("{line}"),
            Err(e) => failures.push(e),
        }
    }
    for sc in &resets {
        match record_and_frame(&live, sc) {
            Ok(line) => eprintln!("{line}"),
            Err(e) => failures.push(format!("{}: {e}", sc.name)),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
#[ignore = "live: needs QEMU (scripts/test.sh runs it with --include-ignored)"]
fn wrong_password_is_refused_with_qemus_reason() {
    let live = live();
    // Let the other test's sessions connect first (QEMU's listen backlog is 1).
    std::thread::sleep(std::time::Duration::from_secs(5));
    let sc = &recorder::scenarios()[0];
    let err = recorder::record(&live.addr, Some(b"wrong-pw"), sc, None).expect_err("must fail");
    assert!(
        err.contains("authentication failed: Authentication failed"),
        "unexpected error: {err}"
    );
}
