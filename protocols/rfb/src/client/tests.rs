//! Every client message: encode, then decode whole and one byte at a time.

use super::*;

/// Decodes `stream` fed one byte at a time and whole; both must give the same
/// messages, and the spans must tile the stream.
fn decode_all(mut d: ClientDecoder, stream: &[u8]) -> Result<Vec<String>, Error> {
    let mut whole = d.clone();
    let mut out = Vec::new();
    let mut pending = Vec::new();
    let mut forwarded = Vec::new();
    for &b in stream {
        pending.push(b);
        while let Some((m, n)) = d.decode(&pending)? {
            out.push(format!("{m:?}"));
            forwarded.extend_from_slice(&pending[..n]);
            pending.drain(..n);
        }
    }
    assert!(pending.is_empty(), "{} bytes undecoded", pending.len());
    assert_eq!(forwarded, stream);
    let mut rest = stream;
    let mut again = Vec::new();
    while !rest.is_empty() {
        let (m, n) = whole
            .decode(rest)?
            .expect("whole stream holds whole messages");
        again.push(format!("{m:?}"));
        rest = &rest[n..];
    }
    assert_eq!(out, again);
    Ok(out)
}

fn all_messages() -> Vec<ClientMessage<'static>> {
    const SCREENS: &[u8] = &[0, 0, 0, 1, 0, 0, 0, 0, 3, 32, 2, 88, 0, 0, 0, 0];
    const ENCODINGS: &[u8] = &[0, 0, 0, 7, 0xc0, 0xa1, 0xe5, 0xce, 0xff, 0xff, 0xfe, 0xc4];
    vec![
        ClientMessage::SetPixelFormat(PixelFormat::RGB888),
        ClientMessage::SetEncodings(Encodings(ENCODINGS)),
        ClientMessage::FramebufferUpdateRequest {
            incremental: true,
            x: 1,
            y: 2,
            width: 720,
            height: 400,
        },
        ClientMessage::KeyEvent {
            down: true,
            keysym: 0xff1b,
        },
        ClientMessage::PointerEvent {
            buttons: 0x05,
            x: 100,
            y: 200,
        },
        ClientMessage::ClientCutText(CutText::Latin1(b"caf\xe9")),
        ClientMessage::ClientCutText(CutText::Extended {
            flags: clipboard::PROVIDE | clipboard::TEXT,
            data: b"\x78\x9c zlib",
        }),
        ClientMessage::EnableContinuousUpdates {
            enable: true,
            x: 0,
            y: 0,
            width: 800,
            height: 600,
        },
        ClientMessage::ClientFence {
            flags: 0x8000_0007,
            payload: b"fence",
        },
        ClientMessage::Xvp {
            version: 1,
            code: 4,
        },
        ClientMessage::SetDesktopSize {
            width: 800,
            height: 600,
            screens: Screens(SCREENS),
        },
        ClientMessage::QemuExtendedKeyEvent {
            down: false,
            keysym: 0xff53,
            keycode: 0xcd,
        },
        ClientMessage::QemuAudio(QemuAudioClient::SetFormat {
            format: 3,
            channels: 2,
            frequency: 44100,
        }),
        ClientMessage::QemuAudio(QemuAudioClient::Enable),
        ClientMessage::QemuAudio(QemuAudioClient::Disable),
    ]
}

#[test]
fn every_message_round_trips() {
    let msgs = all_messages();
    let mut stream = Vec::new();
    for m in &msgs {
        m.write(&mut stream).unwrap();
    }
    // Fence, continuous updates and xvp as a server that confirmed them allows.
    let mut d = ClientDecoder::new(Limits::default());
    d.confirm(Confirmations::ALL);
    let decoded = decode_all(d, &stream).unwrap();
    let want: Vec<String> = msgs.iter().map(|m| format!("{m:?}")).collect();
    assert_eq!(decoded, want);
}

#[test]
fn extension_messages_wait_for_the_servers_confirmation() {
    use crate::server::ServerEvent;
    let fence = [248, 0, 0, 0, 0, 0, 0, 0, 0];
    let continuous = [150, 1, 0, 0, 0, 0, 0, 1, 0, 1];
    let xvp = [250, 0, 1, 4];
    let mut d = ClientDecoder::new(Limits::default());
    assert_eq!(d.decode(&fence), Err(Error::NotNegotiated("ClientFence")));
    assert_eq!(
        d.decode(&continuous),
        Err(Error::NotNegotiated("EnableContinuousUpdates"))
    );
    assert_eq!(d.decode(&xvp), Err(Error::NotNegotiated("xvp")));
    // An xvp failure confirms nothing; its init does.
    let fail = ServerEvent::Xvp {
        version: 1,
        code: 0,
    };
    assert_eq!(Confirmations::of(&fail), Confirmations::default());
    let events = [
        ServerEvent::ServerFence {
            flags: 0,
            payload: &[],
        },
        ServerEvent::EndOfContinuousUpdates,
        ServerEvent::Xvp {
            version: 1,
            code: 1,
        },
    ];
    for (ev, msg) in events.iter().zip([&fence[..], &continuous, &xvp]) {
        d.confirm(Confirmations::of(ev));
        assert_eq!(d.decode(msg).unwrap().unwrap().1, msg.len(), "{ev:?}");
    }
    assert_eq!(
        Confirmations::from_bits(0xff),
        Confirmations::ALL,
        "unknown bits are dropped"
    );
}

#[test]
fn wire_sizes_match_the_spec() {
    let sizes = [20, 16, 10, 8, 6, 12, 19, 10, 14, 4, 24, 12, 10, 4, 4];
    for (m, size) in all_messages().iter().zip(sizes) {
        let mut v = Vec::new();
        m.write(&mut v).unwrap();
        assert_eq!(v.len(), size, "{m:?}");
    }
}

#[test]
fn negative_cut_text_length_needs_the_extended_clipboard() {
    let mut ext = Vec::new();
    ClientMessage::ClientCutText(CutText::Extended {
        flags: clipboard::NOTIFY | clipboard::TEXT,
        data: &[],
    })
    .write(&mut ext)
    .unwrap();
    assert!(matches!(
        ClientDecoder::new(Limits::default()).decode(&ext),
        Err(Error::LengthTooLarge { .. })
    ));
    let mut d = ClientDecoder::new(Limits::default());
    let mut set = Vec::new();
    write_set_encodings([Encoding::EXTENDED_CLIPBOARD], &mut set);
    d.decode(&set).unwrap();
    let (m, n) = d.decode(&ext).unwrap().unwrap();
    assert_eq!(n, 12);
    assert!(
        matches!(m, ClientMessage::ClientCutText(CutText::Extended { flags, .. })
        if flags == clipboard::NOTIFY | clipboard::TEXT)
    );
    // The extended form shorter than its own flags is malformed.
    let short = [6, 0, 0, 0, 0xff, 0xff, 0xff, 0xfe, 0, 0];
    assert!(matches!(d.decode(&short), Err(Error::Malformed { .. })));
}

#[test]
fn extended_pointer_needs_both_offer_and_confirmation() {
    let ext = [5, 0x81, 0, 1, 0, 2, 0x03];
    // Not negotiated: a 6-byte PointerEvent with bit 7 meaning button 8.
    let mut d = ClientDecoder::new(Limits::default());
    let (m, n) = d.decode(&ext).unwrap().unwrap();
    assert_eq!(n, 6);
    assert_eq!(
        m,
        ClientMessage::PointerEvent {
            buttons: 0x81,
            x: 1,
            y: 2
        }
    );
    // Confirmation without the client's offer changes nothing.
    d.enable_extended_pointer();
    assert_eq!(d.decode(&ext).unwrap().unwrap().1, 6);
    let mut set = Vec::new();
    write_set_encodings([Encoding::EXTENDED_MOUSE_BUTTONS], &mut set);
    d.decode(&set).unwrap();
    // Offered but not yet confirmed: the server may already read 7 bytes, the proxy
    // cannot know, so the marker bit is refused.
    assert!(matches!(
        d.decode(&ext),
        Err(Error::Malformed {
            what: "PointerEvent",
            ..
        })
    ));
    assert_eq!(d.decode(&[5, 0x01, 0, 1, 0, 2]).unwrap().unwrap().1, 6);
    d.enable_extended_pointer();
    let (m, n) = d.decode(&ext).unwrap().unwrap();
    assert_eq!(n, 7);
    assert_eq!(
        m,
        ClientMessage::PointerEvent {
            buttons: 0x01 | (0x03 << 7),
            x: 1,
            y: 2
        }
    );
    let mut round = Vec::new();
    m.write(&mut round).unwrap();
    assert_eq!(round, ext);
}

#[test]
fn refusals() {
    let mut d = ClientDecoder::new(Limits::default());
    assert_eq!(d.decode(&[1]), Err(Error::UnknownMessageType(1)));
    assert_eq!(d.decode(&[7]), Err(Error::UnknownMessageType(7)));
    assert_eq!(d.decode(&[255, 9]), Err(Error::UnknownQemuSubmessage(9)));
    assert_eq!(
        d.decode(&[255, 1, 0, 3]),
        Err(Error::UnknownQemuAudioOperation(3))
    );
    d.confirm(Confirmations::FENCE);
    assert!(matches!(
        d.decode(&[248, 0, 0, 0, 0, 0, 0, 0, 65]),
        Err(Error::LengthTooLarge { max: 64, .. })
    ));
    // A lying 4 GiB ClientCutText is refused from its header alone.
    assert!(matches!(
        d.decode(&[6, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
        Err(Error::LengthTooLarge {
            len: 4_294_967_303,
            ..
        })
    ));
    let mut bad_pf = vec![0, 0, 0, 0];
    PixelFormat {
        bits_per_pixel: 24,
        ..PixelFormat::RGB888
    }
    .write(&mut bad_pf);
    assert!(matches!(
        d.decode(&bad_pf),
        Err(Error::InvalidPixelFormat(_))
    ));
    let mut d = ClientDecoder::new(Limits {
        max_message_len: 64,
    });
    let mut set = Vec::new();
    write_set_encodings((0..100).map(Encoding), &mut set);
    assert!(matches!(
        d.decode(&set),
        Err(Error::LengthTooLarge {
            what: "SetEncodings",
            ..
        })
    ));
}

#[test]
fn encoders_refuse_what_the_wire_cannot_carry() {
    let mut out = Vec::new();
    let big = [0u8; 65];
    let cases = [
        ClientMessage::ClientFence {
            flags: 0,
            payload: &big,
        },
        ClientMessage::PointerEvent {
            buttons: 1 << 15,
            x: 0,
            y: 0,
        },
        ClientMessage::SetDesktopSize {
            width: 1,
            height: 1,
            screens: Screens(&[0; 16 * 256]),
        },
    ];
    for m in cases {
        assert!(m.write(&mut out).is_err(), "{m:?}");
    }
    assert!(out.is_empty(), "nothing written on refusal");
}

#[test]
fn incomplete_input_asks_for_more() {
    let mut d = ClientDecoder::new(Limits::default());
    assert_eq!(d.decode(&[]), Ok(None));
    assert_eq!(d.decode(&[4, 1, 0, 0, 0, 0, 0]), Ok(None));
    assert_eq!(d.decode(&[6, 0, 0, 0, 0, 0, 0, 3, b'a']), Ok(None));
}
