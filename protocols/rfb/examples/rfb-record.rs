//! Records real RFB sessions into capture fixtures.
//!
//! ```text
//! VIZOR_VNC_PASSWORD=... VIZOR_VNC_DOMAIN=vizor-test-a \
//!   cargo run -p vizor-rfb --example rfb-record -- 127.0.0.1:5900 protocols/rfb/fixtures
//! ```
//!
//! `VIZOR_VNC_DOMAIN` names the libvirt domain behind the VNC server; scenarios that
//! reset the guest run `virsh -c qemu:///system reset` on it. `VIZOR_SCENARIOS=a,b`
//! records only the named scenarios.
//!
//! One session per scenario (each encoding QEMU supports, pixel-format variants); each
//! capture is framed by the codec before it is written, so a fixture that does not
//! frame is never checked in silently. The password is read from the environment, never
//! from the command line, and never written anywhere.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, dir] = args.as_slice() else {
        eprintln!("usage: rfb-record HOST:PORT OUTPUT_DIR  (password in VIZOR_VNC_PASSWORD)");
        return ExitCode::from(2);
    };
    let password = std::env::var("VIZOR_VNC_PASSWORD").ok();
    let domain = std::env::var("VIZOR_VNC_DOMAIN").ok();
    let hook = domain
        .as_deref()
        .map(|d| move || support::recorder::virsh_reset(d));
    let mut failed = false;
    // VIZOR_SCENARIOS=a,b records only those scenarios.
    let only = std::env::var("VIZOR_SCENARIOS").ok();
    let wanted = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|n| n == name))
    };
    for sc in support::recorder::scenarios()
        .into_iter()
        .filter(|s| wanted(s.name))
    {
        let hook_ref = hook.as_ref().map(|h| h as support::recorder::ResetHook<'_>);
        let cap = match support::recorder::record(
            addr,
            password.as_deref().map(str::as_bytes),
            &sc,
            hook_ref,
        ) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{}: recording failed: {e}", sc.name);
                failed = true;
                continue;
            }
        };
        let framed = support::replay::frame(&cap)
            .and_then(|f| support::replay::check(&f, &sc.expect).map(|()| f));
        match framed {
            Ok(f) => {
                let path = format!("{dir}/{}.rfbcap.gz", sc.name);
                let written = std::fs::File::create(&path).and_then(|file| cap.write_gz(file));
                if let Err(e) = written {
                    eprintln!("{path}: {e}");
                    failed = true;
                    continue;
                }
                println!(
                    "{path}: {} updates, rects {:?}, {} pixel bytes",
                    f.updates, f.rects, f.pixel_bytes
                );
            }
            Err(e) => {
                eprintln!("{}: the capture does not frame: {e}", sc.name);
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
