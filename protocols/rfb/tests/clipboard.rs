//! Clipboard contents of cut-text messages: the original form, and the extended
//! clipboard's provide messages (zlib) as noVNC and QEMU send them.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use vizor_rfb::client::{clipboard, CutText};
use vizor_rfb::Error;

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(data).unwrap();
    z.finish().unwrap()
}

fn provide(formats: &[(u32, &[u8])]) -> (u32, Vec<u8>) {
    let mut flags = clipboard::PROVIDE;
    let mut plain = Vec::new();
    for (f, d) in formats {
        flags |= f;
        plain.extend_from_slice(&(d.len() as u32).to_be_bytes());
        plain.extend_from_slice(d);
    }
    (flags, zlib(&plain))
}

#[test]
fn the_original_form_is_its_text() {
    let clips = CutText::Latin1(b"caf\xe9").contents(1024).unwrap();
    assert_eq!(clips.len(), 1);
    assert_eq!(
        (clips[0].format_name(), &clips[0].data[..]),
        ("text", &b"caf\xe9"[..])
    );
}

#[test]
fn a_provide_yields_each_format_inflated() {
    let (flags, data) = provide(&[
        (clipboard::TEXT, "h\u{e9}llo\0".as_bytes()),
        (clipboard::HTML, b"<b>hi</b>"),
    ]);
    let clips = CutText::Extended { flags, data: &data }
        .contents(1024)
        .unwrap();
    assert_eq!(clips.len(), 2);
    assert_eq!(clips[0].format_name(), "text");
    assert_eq!(clips[0].data, "h\u{e9}llo".as_bytes(), "without the NUL");
    assert_eq!(clips[1].format_name(), "html");
    assert_eq!(clips[1].data, b"<b>hi</b>");
}

#[test]
fn control_messages_carry_no_contents() {
    for flags in [
        clipboard::CAPS | clipboard::TEXT,
        // QEMU's caps: the formats, and every action it supports, provide included.
        clipboard::CAPS
            | clipboard::TEXT
            | clipboard::REQUEST
            | clipboard::PEEK
            | clipboard::NOTIFY
            | clipboard::PROVIDE,
        clipboard::REQUEST | clipboard::TEXT,
        clipboard::PEEK,
        clipboard::NOTIFY | clipboard::TEXT,
    ] {
        let data = [0u8, 0, 0, 16];
        assert!(CutText::Extended { flags, data: &data }
            .contents(1024)
            .unwrap()
            .is_empty());
    }
}

#[test]
fn bad_or_oversized_provides_are_refused() {
    let not_zlib = CutText::Extended {
        flags: clipboard::PROVIDE | clipboard::TEXT,
        data: b"plain",
    };
    assert!(matches!(
        not_zlib.contents(1024),
        Err(Error::Malformed { .. })
    ));
    let big = vec![b'x'; 10_000];
    let (flags, data) = provide(&[(clipboard::TEXT, &big)]);
    assert!(matches!(
        CutText::Extended { flags, data: &data }.contents(1024),
        Err(Error::LengthTooLarge { .. })
    ));
    // A size that runs past the data, and a format whose size is missing.
    let mut plain = 100u32.to_be_bytes().to_vec();
    plain.extend_from_slice(b"short");
    let data = zlib(&plain);
    let lying = CutText::Extended {
        flags: clipboard::PROVIDE | clipboard::TEXT,
        data: &data,
    };
    assert!(matches!(lying.contents(1024), Err(Error::Malformed { .. })));
    let (_, data) = provide(&[(clipboard::TEXT, b"a\0")]);
    let two = CutText::Extended {
        flags: clipboard::PROVIDE | clipboard::TEXT | clipboard::RTF,
        data: &data,
    };
    assert!(matches!(two.contents(1024), Err(Error::Malformed { .. })));
}

#[test]
fn a_flushed_but_unfinished_stream_as_novnc_sends_inflates() {
    // noVNC deflates each provide with a full flush and never finishes the stream.
    let mut plain = 6u32.to_be_bytes().to_vec();
    plain.extend_from_slice(b"hello\0");
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&plain).unwrap();
    z.flush().unwrap();
    let data = z.get_ref().clone();
    let clips = CutText::Extended {
        flags: clipboard::PROVIDE | clipboard::TEXT,
        data: &data,
    }
    .contents(1024)
    .unwrap();
    assert_eq!(clips[0].data, b"hello");
}
