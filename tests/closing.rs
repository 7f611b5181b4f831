//! The WebSocket closing handshake (RFC 6455, 7.1.1): when vizor closes a console it
//! sends its close frame, then waits for the browser's before the TCP connection
//! closes. Closing at once, with the browser's messages still unread in vizor's
//! socket, makes the kernel answer with a reset: the browser then sees "broken pipe"
//! or "connection reset" instead of vizor's close frame and reason (the 1,000-session
//! load test saw that under CPU contention).
//!
//! The client here is raw TCP so the test controls the timing: it writes its upgrade
//! request and a quarter of a mebibyte of WebSocket messages in one go, before vizor
//! has read any of it, so vizor refuses the (bad) token with those messages unread.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::Vizor;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A masked client frame (RFC 6455, 5.2) with `opcode` and `payload`.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads until `buf` holds `n` bytes; `Err` with the I/O error if the connection
/// breaks first.
async fn fill(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, n: usize) -> std::io::Result<()> {
    while buf.len() < n {
        let mut chunk = [0u8; 4096];
        let got = s.read(&mut chunk).await?;
        if got == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..got]);
    }
    Ok(())
}

#[tokio::test]
async fn a_refused_browser_with_unread_messages_gets_the_close_frame_and_a_clean_close() {
    let v = Vizor::start("");
    let mut s = tokio::net::TcpStream::connect(v.addr).await.unwrap();
    let mut out = format!(
        "GET /websockify?token=not-a-token HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
        v.addr
    )
    .into_bytes();
    // 16 messages of 16 KiB: far more than vizor reads with the request.
    for _ in 0..16 {
        out.extend(client_frame(0x2, &[0x5a; 16 * 1024]));
    }
    s.write_all(&out).await.unwrap();

    // The upgrade, then vizor's close frame with its reason.
    let mut buf = Vec::new();
    let head_end = loop {
        let want = buf.len() + 1;
        fill(&mut s, &mut buf, want)
            .await
            .expect("the upgrade response arrives");
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    assert!(
        buf.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    buf.drain(..head_end);
    fill(&mut s, &mut buf, 2)
        .await
        .expect("vizor's close frame arrives, not a reset");
    assert_eq!(buf[0], 0x88, "a close frame, unmasked");
    let len = usize::from(buf[1]);
    fill(&mut s, &mut buf, 2 + len)
        .await
        .expect("the whole close frame arrives");
    assert_eq!(u16::from_be_bytes([buf[2], buf[3]]), 1008);
    assert_eq!(&buf[4..2 + len], b"invalid token");

    // The browser answers with its own close frame, as browsers do: vizor took what was
    // still in flight and now closes the connection cleanly (end of stream, no reset).
    s.write_all(&client_frame(0x8, &1000u16.to_be_bytes()))
        .await
        .expect("the close answer is written");
    let mut rest = [0u8; 1024];
    let end = tokio::time::timeout(Duration::from_secs(5), s.read(&mut rest))
        .await
        .expect("vizor closes the connection once both close frames crossed");
    assert_eq!(end.expect("a clean end of stream, not a reset"), 0);
}
