//! Both handshake roles against arbitrary peer bytes: the client role (toward QEMU)
//! choosing whatever the server offers, the server role (toward browsers). Never a
//! panic, never more consumed than given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vizor_rfb::handshake::client::{Authenticate, VencryptChosen};
use vizor_rfb::handshake::server::SecurityChosen;
use vizor_rfb::handshake::{client, server, Challenge, Progress, SecurityType, Version};
use vizor_rfb::Limits;

/// Runs one state on `input[*pos..]`; `None` when it needs more or failed.
macro_rules! step {
    ($input:expr, $pos:expr, $call:expr) => {
        match $call(&$input[*$pos..]) {
            Ok(Progress::Done { next, consumed }) => {
                assert!(consumed <= $input.len() - *$pos);
                *$pos += consumed;
                next
            }
            _ => return,
        }
    };
}

fn as_client(input: &[u8]) {
    let limits = Limits {
        max_message_len: 4096,
    };
    let pos = &mut 0usize;
    let mut out = Vec::new();
    let s = step!(input, pos, |b| client::ExpectServerVersion::new(limits)
        .receive(b, &mut out));
    let choose = step!(input, pos, |b| s.receive(b));
    let offered = choose.offered().to_vec();
    let auth = if offered.contains(&SecurityType::VENCRYPT) {
        let Ok(v) = choose.choose_vencrypt(&mut out) else {
            return;
        };
        let ack = step!(input, pos, |b| v.receive(b, &mut out));
        let subs = step!(input, pos, |b| ack.receive(b));
        let list = step!(input, pos, |b| subs.receive(b));
        let Some(&first) = list.offered().first() else {
            return;
        };
        match list.choose(first, &mut out) {
            Ok(VencryptChosen::Tls(ack)) => step!(input, pos, |b| ack.receive(b)).tls_established(),
            Ok(VencryptChosen::Authenticate(a)) => a,
            Err(_) => return,
        }
    } else if offered.contains(&SecurityType::VNC_AUTH) {
        let Ok(c) = choose.choose_vnc_auth(&mut out) else {
            return;
        };
        Authenticate::VncAuth(c)
    } else {
        let Ok(r) = choose.choose_none(&mut out) else {
            return;
        };
        Authenticate::None(r)
    };
    let result = match auth {
        Authenticate::None(r) => r,
        Authenticate::VncAuth(c) => step!(input, pos, |b| c.receive(b)).respond(b"pw", &mut out),
    };
    let init = step!(input, pos, |b| result.receive(b));
    let expect = init.send(true, &mut out);
    let _ = step!(input, pos, |b| expect.receive(b));
}

fn as_server(input: &[u8], version: Version, vnc_auth: bool) {
    let limits = Limits {
        max_message_len: 4096,
    };
    let pos = &mut 0usize;
    let mut out = Vec::new();
    let s = server::start(version, limits, &mut out);
    let offer = step!(input, pos, |b| s.receive(b));
    let types = if vnc_auth {
        [SecurityType::VNC_AUTH]
    } else {
        [SecurityType::NONE]
    };
    let Ok(choice) = offer.offer(&types, &mut out) else {
        return;
    };
    let result = match step!(input, pos, |b| choice.receive(b)) {
        SecurityChosen::None(r) => r,
        SecurityChosen::VncAuth(send) => {
            let expect = send.send(Challenge([7; 16]), &mut out);
            let verify = step!(input, pos, |b| expect.receive(b));
            let _ = verify.verify(b"pw");
            verify.into_result()
        }
    };
    let ci = result.accept(&mut out);
    let _ = step!(input, pos, |b| ci.receive(b));
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    match sel % 4 {
        0 => as_client(input),
        1 => as_server(input, Version::V3_8, sel & 0x10 != 0),
        2 => as_server(input, Version::V3_7, sel & 0x10 != 0),
        _ => as_server(input, Version::V3_3, sel & 0x10 != 0),
    }
});
