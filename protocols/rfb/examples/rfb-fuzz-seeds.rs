//! Writes seed corpora for the fuzz targets in `fuzz/` from the QEMU captures in
//! `fixtures/`, so fuzzing starts from real traffic rather than from nothing.
//!
//! ```text
//! cargo run -p vizor-rfb --example rfb-fuzz-seeds -- fuzz/corpus
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::ExitCode;
use support::capture::{Capture, Dir};
use vizor_rfb::client::{ClientDecoder, ClientMessage};
use vizor_rfb::{Limits, PixelFormat};

fn main() -> ExitCode {
    let Some(out) = std::env::args().nth(1) else {
        eprintln!("usage: rfb-fuzz-seeds CORPUS_DIR");
        return ExitCode::from(2);
    };
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures");
    let targets = [
        "rfb_server_to_client",
        "rfb_client_to_server",
        "rfb_handshake",
    ];
    for t in targets {
        if let Err(e) = std::fs::create_dir_all(format!("{out}/{t}")) {
            eprintln!("{out}/{t}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let entries = match std::fs::read_dir(fixtures) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("{fixtures}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut written = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".rfbcap.gz") else {
            continue;
        };
        let cap = match std::fs::File::open(entry.path())
            .map_err(|e| e.to_string())
            .and_then(Capture::read_gz)
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{name}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let framed = match support::replay::frame(&cap) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("{name}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let s2c = cap.stream(Dir::S2C);
        let c2s = cap.stream(Dir::C2S);
        let (s_hs, c_hs) = (framed.handshake_s2c, framed.handshake_c2s);
        // The pixel format in force for the first update: the client's first
        // SetPixelFormat, else the server's (ServerInit follows version, types,
        // challenge and result: QEMU's is 12 + 2 + 16 + 4 bytes in).
        let mut pf = PixelFormat::RGB888;
        let mut d = ClientDecoder::new(Limits::default());
        if let Ok(Some((ClientMessage::SetPixelFormat(p), _))) = d.decode(&c2s[c_hs..]) {
            pf = p;
        }
        let mut head = Vec::new();
        pf.write(&mut head);
        let size = s2c.get(34..38).unwrap_or(&[0, 0, 0, 0]);
        head.extend_from_slice(size);
        head.extend_from_slice(&[0xff; 8]);
        head.push(251);
        let seeds = [
            (
                "rfb_server_to_client",
                [head.as_slice(), &s2c[s_hs..]].concat(),
            ),
            ("rfb_client_to_server", [&[0x3f][..], &c2s[c_hs..]].concat()),
            ("rfb_handshake", [&[0x00][..], &s2c[..s_hs]].concat()),
            ("rfb_handshake", [&[0x11][..], &c2s[..c_hs]].concat()),
        ];
        for (i, (target, bytes)) in seeds.iter().enumerate() {
            let path = format!("{out}/{target}/{stem}-{i}");
            if let Err(e) = std::fs::write(&path, bytes) {
                eprintln!("{path}: {e}");
                return ExitCode::FAILURE;
            }
            written += 1;
        }
    }
    println!("{written} seeds written to {out}");
    ExitCode::SUCCESS
}
