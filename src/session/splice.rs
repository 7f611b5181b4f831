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

/// Sends one binary frame of `len` bytes to `to`, its payload taken from `from` by
/// splice(2) through `pipe`. The browser may take nothing for `stall` at most.
pub(crate) async fn frame(
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
