//! Server-to-client framing: any bytes, any pixel format, any offered encodings, any
//! segmentation. The decoder must never panic, never claim more bytes than it was
//! given, and its spans must tile exactly what it consumed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vizor_rfb::handshake::ServerInit;
use vizor_rfb::server::{ServerDecoder, ServerEvent};
use vizor_rfb::{encoding, Encoding, Limits, PixelFormat};

fuzz_target!(|data: &[u8]| {
    // Header: 16 bytes of pixel format, 4 of framebuffer size, 8 of encoding choices,
    // 1 of chunk size.
    let Some((head, stream)) = data.split_at_checked(29) else {
        return;
    };
    let mut pf_bytes = [0u8; 16];
    pf_bytes.copy_from_slice(&head[..16]);
    let pixel_format = PixelFormat::parse(&pf_bytes).unwrap_or(PixelFormat::RGB888);
    let init = ServerInit {
        width: u16::from_be_bytes([head[16], head[17]]),
        height: u16::from_be_bytes([head[18], head[19]]),
        pixel_format,
        name: Vec::new(),
    };
    let choice = u64::from_be_bytes(head[20..28].try_into().unwrap());
    let all: Vec<Encoding> = encoding::framable_encodings().collect();
    let offered: Vec<Encoding> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| choice & (1 << (i % 64)) != 0)
        .map(|(_, e)| *e)
        .collect();
    let chunk = usize::from(head[28]).max(1);
    let mut d = ServerDecoder::new(
        &init,
        Limits {
            max_message_len: 1 << 16,
        },
    );
    d.set_encodings(offered);

    let mut pending: Vec<u8> = Vec::new();
    let mut consumed = 0usize;
    let mut zero_len_in_a_row = 0;
    for piece in stream.chunks(chunk) {
        pending.extend_from_slice(piece);
        loop {
            match d.decode(&pending) {
                Ok(Some((ev, n))) => {
                    assert!(n <= pending.len());
                    if let ServerEvent::Data(b) = ev {
                        assert_eq!(b, &pending[..n]);
                        assert!(n > 0);
                    }
                    if n == 0 {
                        // Only UpdateEnd spans nothing, and never twice in a row.
                        assert_eq!(ev, ServerEvent::UpdateEnd);
                        zero_len_in_a_row += 1;
                        assert!(zero_len_in_a_row < 2);
                    } else {
                        zero_len_in_a_row = 0;
                    }
                    consumed += n;
                    pending.drain(..n);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    assert_eq!(consumed + pending.len(), stream.len());
});
