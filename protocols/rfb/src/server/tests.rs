//! Every message and encoding, fed whole and one byte at a time; spans must tile the
//! input exactly.

use super::*;
use crate::client::clipboard;

/// An event with its borrowed parts made owned, `Data` chunks merged per rectangle.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Event(String),
    Data(Vec<u8>),
}

fn init(width: u16, height: u16) -> ServerInit {
    ServerInit {
        width,
        height,
        pixel_format: PixelFormat::RGB888,
        name: b"test".to_vec(),
    }
}

fn decoder(offered: &[Encoding]) -> ServerDecoder {
    let mut d = ServerDecoder::new(&init(64, 64), Limits::default());
    d.set_encodings(offered.iter().copied());
    d
}

/// Decodes `stream` delivered in chunks of `chunk` bytes, as a relay would: append,
/// decode until the decoder asks for more, forward each span.
fn run(mut d: ServerDecoder, stream: &[u8], chunk: usize) -> Result<Vec<Ev>, Error> {
    let mut pending = Vec::new();
    let mut forwarded = Vec::new();
    let mut evs: Vec<Ev> = Vec::new();
    for piece in stream.chunks(chunk.max(1)) {
        pending.extend_from_slice(piece);
        while let Some((ev, n)) = d.decode(&pending)? {
            forwarded.extend_from_slice(&pending[..n]);
            match ev {
                ServerEvent::Data(b) => {
                    assert_eq!(b, &pending[..n]);
                    match evs.last_mut() {
                        Some(Ev::Data(v)) => v.extend_from_slice(b),
                        _ => evs.push(Ev::Data(b.to_vec())),
                    }
                }
                other => evs.push(Ev::Event(format!("{other:?}"))),
            }
            pending.drain(..n);
        }
    }
    assert!(pending.is_empty(), "{} bytes left undecoded", pending.len());
    assert_eq!(
        forwarded, stream,
        "spans must concatenate back to the stream"
    );
    Ok(evs)
}

/// Both deliveries must agree; returns the events.
fn frame(offered: &[Encoding], stream: &[u8]) -> Vec<Ev> {
    let whole = run(decoder(offered), stream, stream.len()).expect("whole");
    let split = run(decoder(offered), stream, 1).expect("byte by byte");
    assert_eq!(whole, split);
    whole
}

fn frame_err(offered: &[Encoding], stream: &[u8]) -> Error {
    let whole = run(decoder(offered), stream, stream.len()).expect_err("must fail");
    let split = run(decoder(offered), stream, 1).expect_err("must fail byte by byte");
    assert_eq!(whole, split);
    whole
}

fn update(rects: &[Vec<u8>]) -> Vec<u8> {
    let mut v = Vec::new();
    write_update_header(rects.len() as u16, &mut v);
    for r in rects {
        v.extend_from_slice(r);
    }
    v
}

fn rect(x: u16, y: u16, w: u16, h: u16, e: Encoding, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    write_rect_header(x, y, w, h, e, &mut v);
    v.extend_from_slice(body);
    v
}

fn data_lens(evs: &[Ev]) -> Vec<usize> {
    evs.iter()
        .filter_map(|e| match e {
            Ev::Data(d) => Some(d.len()),
            _ => None,
        })
        .collect()
}

#[test]
fn raw_and_copyrect() {
    let s = update(&[
        rect(0, 0, 4, 3, Encoding::RAW, &[7; 48]),
        rect(10, 10, 4, 3, Encoding::COPY_RECT, &[0, 0, 0, 1]),
    ]);
    let evs = frame(&[Encoding::COPY_RECT], &s);
    assert_eq!(evs.len(), 5, "{evs:?}");
    assert_eq!(data_lens(&evs), [48]);
    assert!(matches!(&evs[3], Ev::Event(e) if e.contains("CopyRect { src_x: 0, src_y: 1 }")));
    assert_eq!(evs[4], Ev::Event("UpdateEnd".into()));
}

#[test]
fn empty_update_and_zero_sized_rects() {
    let evs = frame(&[], &update(&[]));
    assert_eq!(
        evs,
        [
            Ev::Event("UpdateBegin { rects: 0 }".into()),
            Ev::Event("UpdateEnd".into())
        ]
    );
    let evs = frame(&[], &update(&[rect(64, 64, 0, 0, Encoding::RAW, &[])]));
    assert_eq!(evs.len(), 3);
}

#[test]
fn rre_and_corre() {
    let mut rre = 2u32.to_be_bytes().to_vec();
    rre.extend_from_slice(&[1; 4]); // background
    rre.extend_from_slice(&[2; 2 * 12]); // two subrects: pixel + x,y,w,h
    let mut corre = 3u32.to_be_bytes().to_vec();
    corre.extend_from_slice(&[1; 4]);
    corre.extend_from_slice(&[2; 3 * 8]);
    let s = update(&[
        rect(0, 0, 8, 8, Encoding::RRE, &rre),
        rect(0, 0, 8, 8, Encoding::CORRE, &corre),
    ]);
    let evs = frame(&[Encoding::RRE, Encoding::CORRE], &s);
    assert_eq!(data_lens(&evs), [rre.len(), corre.len()]);
    // More subrectangles than pixels is a lie.
    let mut lie = 65u32.to_be_bytes().to_vec();
    lie.extend_from_slice(&[0; 4]);
    let e = frame_err(
        &[Encoding::RRE],
        &update(&[rect(0, 0, 8, 8, Encoding::RRE, &lie)]),
    );
    assert!(matches!(e, Error::Malformed { .. }), "{e}");
}

#[test]
fn hextile_tiles_of_every_kind() {
    // 20x18: four tiles of 16x16, 4x16, 16x2, 4x2.
    let mut body = vec![1];
    body.extend_from_slice(&[9; 16 * 16 * 4]); // raw tile
    body.extend_from_slice(&[2 | 4 | 8]); // background, foreground, 2 subrects
    body.extend_from_slice(&[1; 4]);
    body.extend_from_slice(&[2; 4]);
    body.extend_from_slice(&[2, 0x00, 0x11, 0x22, 0x00]);
    body.extend_from_slice(&[8 | 16, 1]); // 1 coloured subrect
    body.extend_from_slice(&[3, 3, 3, 3, 0x00, 0x00]);
    body.push(0); // solid tile in the previous background
    let s = update(&[rect(1, 1, 20, 18, Encoding::HEXTILE, &body)]);
    let evs = frame(&[Encoding::HEXTILE], &s);
    assert_eq!(data_lens(&evs), [body.len()]);
    // ZlibHex bits are refused.
    let e = frame_err(
        &[Encoding::HEXTILE],
        &update(&[rect(0, 0, 16, 16, Encoding::HEXTILE, &[0x20])]),
    );
    assert!(
        matches!(
            e,
            Error::Malformed {
                what: "Hextile tile",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn zlib_and_zrle_are_framed_by_length_without_inflating() {
    let mut z = 5u32.to_be_bytes().to_vec();
    z.extend_from_slice(b"\x78\x9c\x01\x02\x03"); // not valid zlib: never inflated
    let s = update(&[
        rect(0, 0, 64, 64, Encoding::ZLIB, &z),
        rect(0, 0, 64, 64, Encoding::ZRLE, &z),
    ]);
    let evs = frame(&[Encoding::ZLIB, Encoding::ZRLE], &s);
    assert_eq!(data_lens(&evs), [9, 9]);
    // A 4 GiB length for a 16x16 rectangle is a lie, refused before any payload.
    let lie = u32::MAX.to_be_bytes();
    for e in [Encoding::ZLIB, Encoding::ZRLE] {
        let err = frame_err(&[e], &update(&[rect(0, 0, 16, 16, e, &lie)]));
        assert!(
            matches!(
                err,
                Error::LengthTooLarge {
                    len: 4_294_967_295,
                    ..
                }
            ),
            "{err}"
        );
    }
}

#[test]
fn tight_every_compression_method() {
    let t = Encoding::TIGHT;
    let mut jpeg = vec![0x90, 0xc8, 0x01]; // compact length 200
    jpeg.extend_from_slice(&[0xff; 200]);
    let mut big = vec![0x00, 0xa0, 0x9c, 0x01]; // copy filter, compact length 20000
    big.extend_from_slice(&[0; 20000]);
    let mut palette5 = vec![0x40 | 0x10, 1, 4]; // stream 1, palette of 5 colours
    palette5.extend_from_slice(&[0; 15]);
    palette5.push(50); // 10x10 = 100 index bytes, compressed to 50 (one-byte length)
    palette5.extend_from_slice(&[0; 50]);
    let mut gradient = vec![0x40 | 0x20, 2, 10];
    gradient.extend_from_slice(&[0; 10]);
    let s = update(&[
        rect(0, 0, 64, 64, t, &[0x80, 1, 2, 3]),        // fill
        rect(0, 0, 64, 64, t, &jpeg),                   // JPEG
        rect(0, 0, 1, 2, t, &[0x00, 1, 2, 3, 4, 5, 6]), // 6 bytes: sent raw
        rect(0, 0, 64, 64, t, &big),                    // compressed copy
        rect(0, 0, 8, 2, t, &[0x40, 1, 1, 0, 0, 0, 9, 9, 9, 0xaa, 0x55]), // 2 colours, 2 bytes raw
        rect(0, 0, 10, 10, t, &palette5),
        rect(0, 0, 20, 20, t, &gradient),
    ]);
    let evs = frame(&[t, Encoding::JPEG_QUALITY_9], &s);
    assert_eq!(
        data_lens(&evs),
        [
            4,
            jpeg.len(),
            7,
            big.len(),
            11,
            palette5.len(),
            gradient.len()
        ]
    );
}

#[test]
fn tight_pixel_size_follows_the_pixel_format() {
    // At 16 bits per pixel TPIXEL is 2 bytes: fill is 1 + 2, and 2x3 raw is 12 bytes,
    // which crosses the compression threshold.
    let mut d = decoder(&[Encoding::TIGHT]);
    let rgb565 = PixelFormat::RGB565;
    d.set_pixel_format(rgb565);
    let mut copy = vec![0x00, 12];
    copy.extend_from_slice(&[0; 12]);
    let s = update(&[
        rect(0, 0, 4, 4, Encoding::TIGHT, &[0x80, 1, 2]),
        rect(0, 0, 2, 3, Encoding::TIGHT, &copy),
        rect(0, 0, 1, 2, Encoding::RAW, &[0; 4]),
    ]);
    let evs = run(d, &s, 1).unwrap();
    assert_eq!(data_lens(&evs), [3, 14, 4]);
}

#[test]
fn tight_without_zlib_only_when_offered() {
    let body = [0xa0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]; // 2x2 copy, sent as is
    let s = update(&[rect(0, 0, 2, 2, Encoding::TIGHT, &body)]);
    let evs = frame(&[Encoding::TIGHT, Encoding::TIGHT_WITHOUT_ZLIB], &s);
    assert_eq!(data_lens(&evs), [13]);
    let e = frame_err(&[Encoding::TIGHT], &s);
    assert!(
        matches!(
            e,
            Error::Malformed {
                why: "invalid compression control",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn tight_png_allows_png_fill_and_jpeg_only() {
    let p = Encoding::TIGHT_PNG;
    let mut png = vec![0xa0, 0x05];
    png.extend_from_slice(b"\x89PNG\r");
    let s = update(&[
        rect(0, 0, 8, 8, p, &png),
        rect(0, 0, 8, 8, p, &[0x80, 0, 0, 0]),
    ]);
    assert_eq!(data_lens(&frame(&[p], &s)), [7, 4]);
    let e = frame_err(&[p], &update(&[rect(0, 0, 8, 8, p, &[0x00, 0])]));
    assert!(
        matches!(
            e,
            Error::Malformed {
                what: "TightPNG rectangle",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn tight_refusals() {
    let t = Encoding::TIGHT;
    for (body, want) in [
        (&[0xb0][..], "invalid compression control"),
        (&[0x40, 3][..], "unknown filter"),
    ] {
        let e = frame_err(&[t], &update(&[rect(0, 0, 8, 8, t, body)]));
        assert!(
            matches!(e, Error::Malformed { why, .. } if why == want),
            "{e}"
        );
    }
    let e = frame_err(
        &[t],
        &update(&[rect(0, 0, 16, 16, t, &[0x00, 0xff, 0xff, 0xff])]),
    );
    assert!(matches!(e, Error::LengthTooLarge { .. }), "{e}");
    // QEMU sends solid fills (and JPEG) wider than the spec's 2048 pixels: framed.
    let mut d = ServerDecoder::new(&init(4096, 16), Limits::default());
    d.set_encodings([t]);
    let evs = run(d, &update(&[rect(0, 0, 2560, 16, t, &[0x80, 1, 2, 3])]), 1).unwrap();
    assert_eq!(data_lens(&evs), [4]);
}

#[test]
fn cursors() {
    let c = Encoding::CURSOR;
    let mut vm0 = vec![0, 0];
    vm0.extend_from_slice(&[1; 2 * 3 * 2 * 4]);
    let mut vm1 = vec![1, 0];
    vm1.extend_from_slice(&[1; 3 * 2 * 4]);
    let mut alpha = Encoding::RAW.0.to_be_bytes().to_vec();
    alpha.extend_from_slice(&[5; 3 * 2 * 4]);
    let s = update(&[
        rect(1, 1, 9, 2, c, &[0; 9 * 2 * 4 + 2 * 2]),
        rect(0, 0, 9, 2, Encoding::X_CURSOR, &[0; 6 + 2 * 2 * 2]),
        rect(0, 0, 0, 0, Encoding::X_CURSOR, &[]),
        rect(0, 0, 3, 2, Encoding::VMWARE_CURSOR, &vm0),
        rect(0, 0, 3, 2, Encoding::VMWARE_CURSOR, &vm1),
        rect(0, 0, 3, 2, Encoding::CURSOR_WITH_ALPHA, &alpha),
    ]);
    let offered = [
        c,
        Encoding::X_CURSOR,
        Encoding::VMWARE_CURSOR,
        Encoding::CURSOR_WITH_ALPHA,
    ];
    assert_eq!(
        data_lens(&frame(&offered, &s)),
        [76, 14, vm0.len(), vm1.len(), alpha.len()]
    );
    // Cursor position is a hotspot, not a framebuffer position: no bounds check.
    frame(&offered, &update(&[rect(500, 500, 1, 1, c, &[0; 5])]));
    let e = frame_err(
        &offered,
        &update(&[rect(0, 0, 1, 1, Encoding::VMWARE_CURSOR, &[2, 0])]),
    );
    assert!(matches!(e, Error::Malformed { .. }), "{e}");
    let mut zrle_alpha = Encoding::ZRLE.0.to_be_bytes().to_vec();
    zrle_alpha.extend_from_slice(&[0; 4]);
    let e = frame_err(
        &offered,
        &update(&[rect(0, 0, 1, 1, Encoding::CURSOR_WITH_ALPHA, &zrle_alpha)]),
    );
    assert_eq!(e, Error::UnframableEncoding(Encoding::ZRLE));
    let e = frame_err(&offered, &update(&[rect(0, 0, 2000, 2000, c, &[])]));
    assert!(
        matches!(
            e,
            Error::LengthTooLarge {
                what: "cursor image",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn desktop_size_changes_bounds_for_later_rects() {
    let s = update(&[
        rect(0, 0, 100, 80, Encoding::DESKTOP_SIZE, &[]),
        rect(90, 70, 10, 10, Encoding::RAW, &[0; 400]),
    ]);
    frame(&[Encoding::DESKTOP_SIZE], &s);
    // Without the resize the same rectangle lies outside the 64x64 framebuffer.
    let e = frame_err(&[], &update(&[rect(90, 70, 10, 10, Encoding::RAW, &[])]));
    assert!(
        matches!(e, Error::RectOutOfBounds { fb_width: 64, .. }),
        "{e}"
    );
}

#[test]
fn extended_desktop_size_and_refused_requests() {
    let eds = Encoding::EXTENDED_DESKTOP_SIZE;
    let mut one = vec![1, 0, 0, 0];
    one.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 200, 0, 100, 0, 0, 0, 0]);
    // QEMU answers SetDesktopSize with "request forwarded" (x = 1, y = 4): the size
    // fields are undefined, so the framebuffer stays 64x64.
    let s = update(&[rect(1, 4, 200, 100, eds, &one)]);
    let mut d = decoder(&[eds]);
    let evs = run(d.clone(), &s, 1).unwrap();
    assert!(matches!(&evs[1], Ev::Event(e) if e.contains("ExtendedDesktopSize")));
    d.decode(&s).unwrap();
    assert_eq!(d.framebuffer_size(), (64, 64));
    // A server-side change (x = 0) resizes.
    let s = update(&[rect(0, 0, 200, 100, eds, &one)]);
    let mut d = decoder(&[eds]);
    let mut rest = &s[..];
    while let Some((_, n)) = d.decode(rest).unwrap() {
        rest = &rest[n..];
        if rest.is_empty() {
            break;
        }
    }
    assert_eq!(d.framebuffer_size(), (200, 100));
}

#[test]
fn qemu_pseudo_rects() {
    let mut name = 4u32.to_be_bytes().to_vec();
    name.extend_from_slice(b"demo");
    let s = update(&[
        rect(1, 0, 64, 64, Encoding::QEMU_POINTER_MOTION_CHANGE, &[]),
        rect(0, 0, 64, 64, Encoding::QEMU_EXTENDED_KEY_EVENT, &[]),
        rect(0, 0, 64, 64, Encoding::QEMU_AUDIO, &[]),
        rect(0, 0, 1, 1, Encoding::QEMU_LED_STATE, &[0b110]),
        rect(0, 0, 0, 0, Encoding::DESKTOP_NAME, &name),
        rect(0, 0, 0, 0, Encoding::EXTENDED_MOUSE_BUTTONS, &[]),
    ]);
    let offered = [
        Encoding::QEMU_POINTER_MOTION_CHANGE,
        Encoding::QEMU_EXTENDED_KEY_EVENT,
        Encoding::QEMU_AUDIO,
        Encoding::QEMU_LED_STATE,
        Encoding::DESKTOP_NAME,
        Encoding::EXTENDED_MOUSE_BUTTONS,
    ];
    let evs = frame(&offered, &s);
    let text = format!("{evs:?}");
    for want in [
        "PointerMotionChange { absolute: true }",
        "QemuExtendedKeyEvent",
        "QemuAudio",
        "LedState(6)",
        "DesktopName([100, 101, 109, 111])",
        "ExtendedMouseButtons",
    ] {
        assert!(text.contains(want), "{want} missing in {text}");
    }
    assert!(data_lens(&evs).is_empty());
}

#[test]
fn last_rect_ends_an_open_ended_update() {
    let mut s = Vec::new();
    write_update_header(65535, &mut s);
    s.extend_from_slice(&rect(0, 0, 1, 1, Encoding::RAW, &[0; 4]));
    s.extend_from_slice(&rect(0, 0, 0, 0, Encoding::LAST_RECT, &[]));
    s.push(msg::BELL);
    let evs = frame(&[Encoding::LAST_RECT], &s);
    assert_eq!(evs.len(), 6, "{evs:?}");
    assert_eq!(evs[4], Ev::Event("UpdateEnd".into()));
    assert_eq!(evs[5], Ev::Event("Bell".into()));
}

#[test]
fn vmware_display_mode_change_switches_pixel_format_mid_update() {
    let wmvi = Encoding::VMWARE_DISPLAY_MODE_CHANGE;
    let pf8 = PixelFormat::BGR233;
    let mut body = Vec::new();
    pf8.write(&mut body);
    let s = update(&[
        rect(0, 0, 32, 32, wmvi, &body),
        rect(0, 0, 4, 4, Encoding::RAW, &[0; 16]),
    ]);
    let evs = frame(&[wmvi], &s);
    assert_eq!(data_lens(&evs), [16]);
}

#[test]
fn set_pixel_format_waits_for_the_update_in_flight() {
    let mut d = decoder(&[]);
    let s = update(&[rect(0, 0, 2, 1, Encoding::RAW, &[0; 8])]);
    let (_, n) = d.decode(&s).unwrap().unwrap();
    let pf16 = PixelFormat::RGB565;
    d.set_pixel_format(pf16);
    let mut rest = s[n..].to_vec();
    rest.extend_from_slice(&update(&[rect(0, 0, 2, 1, Encoding::RAW, &[0; 4])]));
    let evs = run(d, &rest, 1).unwrap();
    assert_eq!(data_lens(&evs), [8, 4]);
}

#[test]
fn small_messages() {
    let mut s = vec![msg::SET_COLOUR_MAP_ENTRIES, 0, 0, 1, 0, 2];
    s.extend_from_slice(&[0xff; 12]);
    s.push(msg::BELL);
    s.extend_from_slice(&[msg::SERVER_CUT_TEXT, 0, 0, 0, 0, 0, 0, 5]);
    s.extend_from_slice(b"hello");
    s.extend_from_slice(&[msg::SERVER_CUT_TEXT, 0, 0, 0]);
    s.extend_from_slice(&(-8i32).to_be_bytes());
    s.extend_from_slice(&(clipboard::CAPS | clipboard::TEXT).to_be_bytes());
    s.extend_from_slice(&0u32.to_be_bytes());
    s.push(msg::END_OF_CONTINUOUS_UPDATES);
    s.extend_from_slice(&[msg::SERVER_FENCE, 0, 0, 0, 0x80, 0, 0, 3, 2, 0xab, 0xcd]);
    s.extend_from_slice(&[msg::XVP, 0, 1, 1]);
    s.extend_from_slice(&[msg::QEMU, 1, 0, 1]);
    s.extend_from_slice(&[msg::QEMU, 1, 0, 2, 0, 0, 0, 4, 1, 2, 3, 4]);
    s.extend_from_slice(&[msg::QEMU, 1, 0, 0]);
    let offered = [
        Encoding::EXTENDED_CLIPBOARD,
        Encoding::CONTINUOUS_UPDATES,
        Encoding::FENCE,
        Encoding::XVP,
        Encoding::QEMU_AUDIO,
    ];
    let evs = frame(&offered, &s);
    let text = format!("{evs:?}");
    for want in [
        "SetColourMapEntries { first: 1, colours: [255",
        "Bell",
        "ServerCutText(Latin1([104, 101, 108, 108, 111]))",
        "ServerCutText(Extended { flags: 16777217, data: [0, 0, 0, 0] })",
        "EndOfContinuousUpdates",
        "ServerFence { flags: 2147483651, payload: [171, 205] }",
        "Xvp { version: 1, code: 1 }",
        "QemuAudio(Begin)",
        "QemuAudio(Data([1, 2, 3, 4]))",
        "QemuAudio(End)",
    ] {
        assert!(text.contains(want), "{want} missing in {text}");
    }
}

#[test]
fn negotiation_is_required() {
    for (bytes, what) in [
        (
            &[msg::END_OF_CONTINUOUS_UPDATES][..],
            "EndOfContinuousUpdates",
        ),
        (&[msg::SERVER_FENCE][..], "ServerFence"),
        (&[msg::XVP][..], "xvp server message"),
        (&[msg::QEMU, 1][..], "QEMU audio message"),
    ] {
        assert_eq!(frame_err(&[], bytes), Error::NotNegotiated(what));
    }
    // Without the extended clipboard a negative length is a 4 GiB length: passed over.
    let mut s = vec![msg::SERVER_CUT_TEXT, 0, 0, 0];
    s.extend_from_slice(&(-8i32).to_be_bytes());
    assert_eq!(
        frame(&[], &s),
        [Ev::Event(format!(
            "ServerCutTextDropped {{ len: {} }}",
            (-8i32) as u32
        ))]
    );
}

#[test]
fn refusals() {
    assert_eq!(frame_err(&[], &[4]), Error::UnknownMessageType(4));
    assert_eq!(
        frame_err(&[], &[msg::QEMU, 0]),
        Error::UnknownQemuSubmessage(0)
    );
    assert_eq!(
        frame_err(&[Encoding::QEMU_AUDIO], &[msg::QEMU, 1, 0, 9]),
        Error::UnknownQemuAudioOperation(9)
    );
    let e = frame_err(&[], &update(&[rect(0, 0, 1, 1, Encoding::HEXTILE, &[])]));
    assert_eq!(e, Error::EncodingNotOffered(Encoding::HEXTILE));
    // JPEG (21) cannot be framed, offered or not; declarations never come as rects.
    for enc in [Encoding(21), Encoding::JPEG_QUALITY_9, Encoding::FENCE] {
        let e = frame_err(&[enc], &update(&[rect(0, 0, 1, 1, enc, &[])]));
        assert_eq!(e, Error::UnframableEncoding(enc));
    }
    let e = frame_err(
        &[Encoding::COPY_RECT],
        &update(&[rect(0, 0, 10, 10, Encoding::COPY_RECT, &[0, 60, 0, 0])]),
    );
    assert!(matches!(e, Error::RectOutOfBounds { x: 60, .. }), "{e}");
    let mut d = ServerDecoder::new(
        &init(64, 64),
        Limits {
            max_message_len: 16,
        },
    );
    d.set_encodings([Encoding::EXTENDED_CLIPBOARD]);
    // A guest clipboard beyond the bound is passed over, not held, and the stream goes
    // on: plain and extended (negative length), whole or byte by byte.
    for len_field in [100i32, -100] {
        let mut s = vec![msg::SERVER_CUT_TEXT, 0, 0, 0];
        s.extend_from_slice(&len_field.to_be_bytes());
        s.extend_from_slice(&[b'x'; 100]);
        s.push(msg::BELL);
        for chunk in [1, 7, s.len()] {
            let evs = run(d.clone(), &s, chunk).unwrap();
            assert_eq!(
                evs.first(),
                Some(&Ev::Event("ServerCutTextDropped { len: 100 }".into()))
            );
            assert_eq!(evs.last(), Some(&Ev::Event("Bell".into())), "{evs:?}");
            let dropped: usize = evs[1..evs.len() - 1]
                .iter()
                .map(|e| match e {
                    Ev::Event(t) => {
                        assert!(t.starts_with("Dropped("), "{t}");
                        t.matches(", ").count() + 1
                    }
                    Ev::Data(_) => panic!("no data"),
                })
                .sum();
            assert_eq!(dropped, 100, "chunk {chunk}");
        }
    }
    // Within the bound, it is held whole as before.
    let mut s = vec![msg::SERVER_CUT_TEXT, 0, 0, 0, 0, 0, 0, 5];
    s.extend_from_slice(b"hello");
    assert_eq!(
        run(d, &s, 1).unwrap(),
        [Ev::Event(
            "ServerCutText(Latin1([104, 101, 108, 108, 111]))".into()
        )]
    );
    let mut s = vec![msg::SET_COLOUR_MAP_ENTRIES, 0, 0xff, 0xff, 0, 2];
    s.extend_from_slice(&[0; 12]);
    assert!(matches!(frame_err(&[], &s), Error::Malformed { .. }));
}

#[test]
fn payload_can_bypass_decode() {
    let s = update(&[rect(0, 0, 64, 64, Encoding::RAW, &[1; 64 * 64 * 4])]);
    let mut d = decoder(&[]);
    let (_, a) = d.decode(&s).unwrap().unwrap();
    let (_, b) = d.decode(&s[a..]).unwrap().unwrap();
    assert_eq!(d.pending_payload(), 16384);
    // A relay splices 16000 bytes straight from socket to socket...
    d.consume_payload(16000).unwrap();
    assert!(d.consume_payload(1000).is_err());
    // ...and decodes the rest.
    let rest = &s[a + b + 16000..];
    let (ev, n) = d.decode(rest).unwrap().unwrap();
    assert_eq!((ev, n), (ServerEvent::Data(&rest[..384]), 384));
    assert_eq!(d.decode(&[]).unwrap(), Some((ServerEvent::UpdateEnd, 0)));
    assert_eq!(d.decode(&[]).unwrap(), None);
}

#[test]
fn zero_area_rects_only_where_every_client_frames_them_alike() {
    // noVNC reads nothing after a zero-area Zlib rectangle where the spec has a
    // length: a server could make the proxy and the browser disagree. Refused.
    for e in [
        Encoding::ZLIB,
        Encoding::ZRLE,
        Encoding::TIGHT,
        Encoding::HEXTILE,
        Encoding::RRE,
    ] {
        let err = frame_err(&[e], &update(&[rect(0, 0, 0, 5, e, &[0, 0, 0, 0])]));
        assert!(
            matches!(
                err,
                Error::Malformed {
                    what: "rectangle",
                    ..
                }
            ),
            "{e}: {err}"
        );
    }
    let s = update(&[
        rect(3, 3, 0, 0, Encoding::RAW, &[]),
        rect(3, 3, 0, 7, Encoding::COPY_RECT, &[0, 0, 0, 0]),
    ]);
    frame(&[Encoding::COPY_RECT], &s);
}

#[test]
fn a_newer_pixel_format_replaces_a_pending_one() {
    let pf16 = PixelFormat::RGB565;
    let pf8 = PixelFormat::BGR233;
    let mut d = decoder(&[]);
    let first = update(&[rect(0, 0, 1, 1, Encoding::RAW, &[0; 4])]);
    let (_, n) = d.decode(&first).unwrap().unwrap();
    d.set_pixel_format(pf16); // mid-update: pending
    let mut rest = &first[n..];
    while let Some((_, n)) = d.decode(rest).unwrap() {
        rest = &rest[n..];
        if d.is_idle() {
            break;
        }
    }
    d.set_pixel_format(pf8); // idle: takes effect at once; the pending one is void
    let evs = run(d, &update(&[rect(0, 0, 2, 1, Encoding::RAW, &[0; 2])]), 1).unwrap();
    assert_eq!(data_lens(&evs), [2]);
}
