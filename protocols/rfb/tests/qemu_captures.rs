//! Frames sessions recorded from a real QEMU (see `fixtures/README.md`), end to end:
//! the spans of every decoded item must tile both directions exactly.

mod support;

use support::capture::{Capture, Dir};
use support::{recorder, replay};

fn fixtures() -> Vec<(String, Capture)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures");
    let mut out: Vec<(String, Capture)> = std::fs::read_dir(dir)
        .expect("fixtures directory")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".rfbcap.gz"))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let file = std::fs::File::open(e.path()).expect("open fixture");
            (
                name.clone(),
                Capture::read_gz(file).unwrap_or_else(|err| panic!("{name}: {err}")),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_recorded_scenario_has_a_fixture() {
    let names: Vec<String> = fixtures().into_iter().map(|(n, _)| n).collect();
    for sc in recorder::scenarios() {
        let want = format!("{}.rfbcap.gz", sc.name);
        assert!(names.contains(&want), "missing fixture {want}");
    }
}

#[test]
fn each_capture_frames_exactly_with_its_encodings() {
    let scenarios = recorder::scenarios();
    for (name, cap) in fixtures() {
        let sc_name = replay::scenario_name(&cap).unwrap_or_else(|| panic!("{name}: no scenario"));
        if sc_name.starts_with("novnc") {
            // Recorded from noVNC itself (tools/novnc-record): QEMU picks Tight, noVNC's
            // first preference among the encodings QEMU implements.
            let framed = replay::frame(&cap).unwrap_or_else(|e| panic!("{name}: {e}"));
            replay::check_with(
                &framed,
                &[vizor_rfb::Encoding::TIGHT],
                replay::NOVNC_MESSAGES,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            eprintln!(
                "{name}: {} updates, rects {:?}, client messages {:?}",
                framed.updates, framed.rects, framed.client_messages
            );
            continue;
        }
        let sc = scenarios
            .iter()
            .find(|s| s.name == sc_name)
            .unwrap_or_else(|| panic!("{name}: unknown scenario {sc_name}"));
        let framed = replay::frame(&cap).unwrap_or_else(|e| panic!("{name}: {e}"));
        replay::check(&framed, &sc.expect).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(framed.pixel_bytes > 0, "{name}: no pixel data");
    }
}

#[test]
fn captures_frame_whatever_the_segmentation() {
    for (name, cap) in fixtures() {
        let whole = replay::frame(&cap).unwrap_or_else(|e| panic!("{name}: {e}"));
        let total: usize = cap.chunks.iter().map(|c| c.bytes.len()).sum();
        // Byte by byte for all but the raw full-screen captures, odd sizes for all.
        let sizes: &[usize] = if total < 400_000 {
            &[1, 7, 4093]
        } else {
            &[7, 4093]
        };
        for &max in sizes {
            let split = replay::frame(&replay::rechunk(&cap, max))
                .unwrap_or_else(|e| panic!("{name} in chunks of {max}: {e}"));
            assert_eq!(split.rects, whole.rects, "{name} in chunks of {max}");
            assert_eq!(split.client_messages, whole.client_messages);
            assert_eq!(split.pixel_bytes, whole.pixel_bytes);
        }
    }
}

#[test]
fn fixtures_hold_no_authentication_secret() {
    for (name, cap) in fixtures() {
        let framed = replay::frame(&cap).unwrap_or_else(|e| panic!("{name}: {e}"));
        let c2s = cap.stream(Dir::C2S);
        // Version (12) + security type (1) + response (16) + ClientInit (1).
        assert_eq!(framed.handshake_c2s, 30, "{name}");
        assert_eq!(&c2s[13..29], &[0u8; 16], "{name}: response not zeroed");
        let all: Vec<u8> = cap.chunks.iter().flat_map(|c| c.bytes.clone()).collect();
        assert!(!all.windows(6).any(|w| w == b"s3cret"), "{name}");
    }
}
