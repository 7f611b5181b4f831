//! Moving a WebSocket frame's payload from the VM's socket to the browser's without
//! it entering vizor: splice(2) through a pipe, the frame header written first.
//!
//! Only bytes the codec has already framed go this way: a rectangle whose length its
//! header gave (see `ServerDecoder::pending_payload`). Frames toward the browser are
//! unmasked, so the payload goes on the wire exactly as the VM sent it.

use nix::fcntl::{splice, FcntlArg, OFlag, SpliceFFlags};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The pipe's size asked of the kernel: fewer splices per frame than the default 64 KiB.
/// The kernel may give less (`/proc/sys/fs/pipe-max-size`, or a user past
/// `pipe-user-pages-soft`): the loop below works with whatever it holds.
const PIPE_SIZE: usize = 1 << 20;

/// The pipe a spliced frame passes through.
pub(crate) struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
}

impl Pipe {
    pub(crate) fn new() -> io::Result<Pipe> {
        let (rd, wr) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Refused is fine: the default size only costs more system calls.
        let _ = nix::fcntl::fcntl(&wr, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
        Ok(Pipe { rd, wr })
    }
}

/// Why a spliced frame did not reach the browser whole. Except for `NoPipe`, the
/// WebSocket stream is then broken mid-frame: nothing may follow on it.
#[derive(Debug)]
pub(crate) enum SpliceError {
    /// Reading from the VM failed; `None`: it closed the connection.
    Vm(Option<io::Error>),
    /// Writing to the browser failed.
    Browser(io::Error),
    /// The browser took nothing for the send timeout.
    BrowserStalled,
    /// No pipe could be had (too many open files): nothing was sent, the stream is
    /// whole, and the payload is still in the VM's socket.
    NoPipe(io::Error),
}

/// The head of an unmasked, final binary frame of `len` bytes; returns its length.
pub(crate) fn binary_head(len: u64, head: &mut [u8; 10]) -> usize {
    head[0] = 0x82;
    if len < 126 {
        head[1] = len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        head[1] = 126;
        head[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&len.to_be_bytes());
        10
    }
}

/// Sends `len` bytes of `from` to `to` as binary frames (each its own message) of
/// `message_size` bytes at most, their payloads moved by splice(2) through `pipe`. The
/// browser may take nothing for `stall` at most. On failure, the error comes with the
/// payload bytes of the frames that were sent whole (the browser has them).
///
/// A browser hands a WebSocket message to the page only once all of it arrived: in
/// bounded messages noVNC decodes the first rows of a rectangle while the rest is on
/// the way, and never buffers a whole framebuffer.
pub(crate) async fn frames(
    from: &TcpStream,
    to: &TcpStream,
    len: u64,
    message_size: usize,
    pipe: &Pipe,
    stall: Duration,
) -> Result<(), (u64, SpliceError)> {
    let max = message_size.max(1) as u64;
    let mut left = len;
    // A zero-length payload is one empty frame, as before.
    loop {
        let this = left.min(max);
        frame(from, to, this, pipe, stall)
            .await
            .map_err(|e| (len - left, e))?;
        left -= this;
        if left == 0 {
            return Ok(());
        }
    }
}

/// Sends one binary frame of `len` bytes to `to`, its payload taken from `from` by
/// splice(2) through `pipe`. The browser may take nothing for `stall` at most.
async fn frame(
    from: &TcpStream,
    to: &TcpStream,
    len: u64,
    pipe: &Pipe,
    stall: Duration,
) -> Result<(), SpliceError> {
    let mut head = [0u8; 10];
    let n = binary_head(len, &mut head);
    write_all(to, &head[..n], stall).await?;
    // `left`: still in the VM's socket; `held`: in the pipe.
    let mut left = len;
    let mut held = 0usize;
    let mut deadline = Instant::now() + stall;
    while left > 0 || held > 0 {
        let mut moved = false;
        if left > 0 {
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(PIPE_SIZE);
            let fill = || {
                splice(
                    from.as_fd(),
                    None,
                    pipe.wr.as_fd(),
                    None,
                    want,
                    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
                )
                .map_err(io::Error::from)
            };
            // With the pipe empty, "would block" can only mean the socket is empty, and
            // tokio must learn it (try_io) to wake us on new data. With bytes in the
            // pipe it may mean the pipe is full, which says nothing of the socket.
            let got = if held == 0 {
                from.try_io(Interest::READABLE, fill)
            } else {
                fill()
            };
            match got {
                Ok(0) => return Err(SpliceError::Vm(None)),
                Ok(n) => {
                    left -= n as u64;
                    held += n;
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(SpliceError::Vm(Some(e))),
            }
        }
        if held > 0 {
            let more = if left > 0 {
                SpliceFFlags::SPLICE_F_MORE
            } else {
                SpliceFFlags::empty()
            };
            let drained = to.try_io(Interest::WRITABLE, || {
                splice(
                    pipe.rd.as_fd(),
                    None,
                    to.as_fd(),
                    None,
                    held,
                    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK | more,
                )
                .map_err(io::Error::from)
            });
            match drained {
                Ok(n) => {
                    held -= n;
                    moved = true;
                    deadline = Instant::now() + stall;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(SpliceError::Browser(e)),
            }
        }
        if moved {
            continue;
        }
        // Nothing moved: with bytes in the pipe the browser's socket is full; with none
        // the VM has sent nothing more yet.
        if held > 0 {
            tokio::select! {
                r = to.writable() => r.map_err(SpliceError::Browser)?,
                _ = tokio::time::sleep_until(deadline) => return Err(SpliceError::BrowserStalled),
            }
        } else {
            from.readable()
                .await
                .map_err(|e| SpliceError::Vm(Some(e)))?;
        }
    }
    Ok(())
}

/// Writes all of `bytes` to the browser, which may take nothing for `stall` at most.
async fn write_all(to: &TcpStream, mut bytes: &[u8], stall: Duration) -> Result<(), SpliceError> {
    let mut deadline = Instant::now() + stall;
    while !bytes.is_empty() {
        match to.try_write(bytes) {
            Ok(n) => {
                bytes = &bytes[n..];
                deadline = Instant::now() + stall;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::select! {
                    r = to.writable() => r.map_err(SpliceError::Browser)?,
                    _ = tokio::time::sleep_until(deadline) => return Err(SpliceError::BrowserStalled),
                }
            }
            Err(e) => return Err(SpliceError::Browser(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Two connected loopback sockets: (the end vizor holds, the peer's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap());
        let (peer, accepted) = tokio::join!(peer, l.accept());
        (accepted.unwrap().0, peer.unwrap())
    }

    /// A payload longer than the message size goes as full messages and a last short
    /// one, each a final binary frame, the bytes in order and nothing more: what the
    /// browser reads is what the VM sent.
    #[tokio::test]
    async fn a_long_payload_goes_as_messages_of_the_size_at_most() {
        let (from, mut vm) = pair().await;
        let (to, mut browser) = pair().await;
        let len = 1_000_003usize;
        let sent: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let writing = {
            let sent = sent.clone();
            tokio::spawn(async move {
                vm.write_all(&sent).await.unwrap();
                vm
            })
        };
        let pipe = Pipe::new().unwrap();
        let stall = Duration::from_secs(5);
        let reading = tokio::spawn(async move {
            let mut all = Vec::new();
            browser.read_to_end(&mut all).await.unwrap();
            all
        });
        frames(&from, &to, len as u64, 256 << 10, &pipe, stall)
            .await
            .unwrap();
        drop(to);
        let _vm = writing.await.unwrap();
        let wire = reading.await.unwrap();
        let (mut at, mut payload, mut sizes) = (0, Vec::new(), Vec::new());
        while at < wire.len() {
            assert_eq!(wire[at], 0x82, "a final binary frame at {at}");
            let (n, head) = match wire[at + 1] {
                126 => (u16::from_be_bytes([wire[at + 2], wire[at + 3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(wire[at + 2..at + 10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            payload.extend_from_slice(&wire[at + head..at + head + n]);
            sizes.push(n);
            at += head + n;
        }
        assert_eq!(sizes, [262144, 262144, 262144, 213571]);
        assert!(payload == sent, "the payload arrives as sent");
    }

    /// The head is the one fastwebsockets writes for a final binary frame of that length
    /// (the reader on the other side parses both alike).
    #[test]
    fn frame_heads_match_the_websocket_library() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 8_294_400] {
            let mut ours = [0u8; 10];
            let n = binary_head(len as u64, &mut ours);
            let mut frame =
                fastwebsockets::Frame::binary(fastwebsockets::Payload::Owned(vec![0; len]));
            let mut theirs = [0u8; 14];
            let m = frame.fmt_head(&mut theirs);
            assert_eq!(&ours[..n], &theirs[..m], "length {len}");
        }
    }
}
