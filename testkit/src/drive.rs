//! The one loop that drives a sans-IO handshake state over some byte source.
//!
//! vizor-rfb's and vizor-spice's handshake states take the bytes received so far and
//! answer [`Progress`](vizor_rfb::handshake::Progress): `NeedMore(state)` when the
//! message is not all there yet, or `Done { next, consumed }`. [`drive`] feeds a
//! state the buffered bytes, reads more from its [`Source`] while the state needs
//! more, and drains the bytes the state consumed. [`until`] does the same for a plain
//! parse function (`Option<(T, consumed)>`), such as `ServerInit::parse`.
//!
//! Sources: tokio's `TcpStream`, any blocking [`std::io::Read`] through [`Blocking`],
//! a recorded byte slice (all of it at once), and whatever a test implements
//! [`Source`] for (a WebSocket client). [`drive_blocking`] runs the driver without a
//! runtime over the sources that never wait ([`Immediate`]).

use std::fmt;
use std::future::Future;
use std::io;
use std::task::{Context, Poll, Waker};

/// Something that appends more bytes to a buffer: a socket, a WebSocket client, a
/// recording.
pub trait Source {
    /// Why no more bytes came: the peer closed, the recording ran out.
    type Error;

    /// Appends at least one more byte to `buf`, or fails.
    fn more(&mut self, buf: &mut Vec<u8>) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

impl<T: Source + Send + ?Sized> Source for &mut T {
    type Error = T::Error;

    fn more(&mut self, buf: &mut Vec<u8>) -> impl Future<Output = Result<(), T::Error>> + Send {
        (**self).more(buf)
    }
}

/// The error a socket source gives when its peer closed the connection.
fn peer_closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the peer closed the connection",
    )
}

impl Source for tokio::net::TcpStream {
    type Error = io::Error;

    async fn more(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        use tokio::io::AsyncReadExt;
        match self.read_buf(buf).await? {
            0 => Err(peer_closed()),
            _ => Ok(()),
        }
    }
}

/// A blocking reader (such as [`std::net::TcpStream`]) as a [`Source`]: each
/// [`Source::more`] is one blocking read of up to 4 KiB. For [`drive_blocking`]; in an
/// async task it would block the runtime's thread.
#[derive(Debug)]
pub struct Blocking<R>(pub R);

impl<R: io::Read + Send> Source for Blocking<R> {
    type Error = io::Error;

    async fn more(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        let mut tmp = [0u8; 4096];
        match self.0.read(&mut tmp)? {
            0 => Err(peer_closed()),
            n => {
                buf.extend_from_slice(&tmp[..n]);
                Ok(())
            }
        }
    }
}

/// A recording ran out before the state completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted;

impl fmt::Display for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the recorded bytes ran out")
    }
}

impl std::error::Error for Exhausted {}

/// A recorded byte stream: the first [`Source::more`] appends all of it, the next
/// fails with [`Exhausted`]. Whatever is left of it is the slice itself.
impl Source for &[u8] {
    type Error = Exhausted;

    async fn more(&mut self, buf: &mut Vec<u8>) -> Result<(), Exhausted> {
        if self.is_empty() {
            return Err(Exhausted);
        }
        buf.extend_from_slice(self);
        *self = &[];
        Ok(())
    }
}

/// A [`Source`] whose [`Source::more`] never waits for a wake-up (it blocks, or it
/// has its bytes at hand), so [`drive_blocking`] can run it without a runtime.
pub trait Immediate: Source {}

impl<R: io::Read + Send> Immediate for Blocking<R> {}
impl Immediate for &[u8] {}
impl<T: Immediate + Send + ?Sized> Immediate for &mut T {}

/// What a step of a state answered, for [`drive`]: the next state and the bytes it
/// consumed, or the same state wanting more bytes.
pub trait Stepped {
    /// The state that wants more bytes.
    type State;
    /// What the state completes into.
    type Next;

    /// `Ok((next, consumed))` once complete, `Err(state)` while it needs more.
    fn split(self) -> Result<(Self::Next, usize), Self::State>;
}

/// The protocol crates' states (vizor-rfb and vizor-spice share the type).
impl<S, N> Stepped for vizor_sansio::Progress<S, N> {
    type State = S;
    type Next = N;

    fn split(self) -> Result<(N, usize), S> {
        vizor_sansio::Progress::split(self)
    }
}

/// A parse function's answer: the value and the bytes it spans, or `None` until it
/// is all there (the stateless case, for [`until`]).
impl<T> Stepped for Option<(T, usize)> {
    type State = ();
    type Next = T;

    fn split(self) -> Result<(T, usize), ()> {
        self.ok_or(())
    }
}

/// Why [`drive`] stopped short.
#[derive(Debug)]
pub enum DriveError<P, S> {
    /// The state refused the bytes (the codec's error).
    Step(P),
    /// The source gave no more bytes.
    Source(S),
}

impl<P: fmt::Display, S: fmt::Display> fmt::Display for DriveError<P, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Step(e) => e.fmt(f),
            Self::Source(e) => e.fmt(f),
        }
    }
}

impl<P, S> std::error::Error for DriveError<P, S>
where
    P: std::error::Error,
    S: std::error::Error,
{
}

/// Feeds `state` the bytes in `buf` through `step` (such as `|s, b| s.receive(b)`),
/// reading more from `src` into `buf` while it needs more; once it completes, drains
/// the bytes it consumed from `buf` (what follows stays there) and returns its next
/// state.
pub async fn drive<Src, S, P, E>(
    src: &mut Src,
    buf: &mut Vec<u8>,
    mut state: S,
    mut step: impl FnMut(S, &[u8]) -> Result<P, E>,
) -> Result<P::Next, DriveError<E, Src::Error>>
where
    Src: Source + ?Sized,
    P: Stepped<State = S>,
{
    loop {
        match step(state, buf).map_err(DriveError::Step)?.split() {
            Ok((next, consumed)) => {
                buf.drain(..consumed.min(buf.len()));
                return Ok(next);
            }
            Err(more) => state = more,
        }
        src.more(buf).await.map_err(DriveError::Source)?;
    }
}

/// [`drive`] for a parse function (such as `|b| ServerInit::parse(b, &limits)`):
/// reads until it finds its whole message at the start of `buf`, drains it and
/// returns it.
pub async fn until<Src, T, E>(
    src: &mut Src,
    buf: &mut Vec<u8>,
    mut parse: impl FnMut(&[u8]) -> Result<Option<(T, usize)>, E>,
) -> Result<T, DriveError<E, Src::Error>>
where
    Src: Source + ?Sized,
{
    drive(src, buf, (), |(), b| parse(b)).await
}

/// [`drive`] without a runtime, over a source that never waits ([`Blocking`], a
/// byte slice).
pub fn drive_blocking<Src, S, P, E>(
    src: &mut Src,
    buf: &mut Vec<u8>,
    state: S,
    step: impl FnMut(S, &[u8]) -> Result<P, E>,
) -> Result<P::Next, DriveError<E, Src::Error>>
where
    Src: Immediate + ?Sized,
    P: Stepped<State = S>,
{
    let mut run = std::pin::pin!(drive(src, buf, state, step));
    let mut cx = Context::from_waker(Waker::noop());
    // An immediate source is ready at its first poll, so this loop ends at its first
    // turn; it only loops, never blocks, should one not be.
    loop {
        if let Poll::Ready(done) = run.as_mut().poll(&mut cx) {
            return done;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vizor_rfb::handshake::{client, server, SecurityType, ServerInit, Version};
    use vizor_rfb::{Limits, PixelFormat};

    /// A server's side of an RFB 3.8 handshake with security type None.
    fn server_bytes() -> Vec<u8> {
        let mut out = Vec::new();
        let st = server::start(Version::V3_8, Limits::default(), &mut out);
        let offer = drive_blocking(&mut &b"RFB 003.008\n"[..], &mut Vec::new(), st, |s, b| {
            s.receive(b)
        })
        .unwrap();
        let _ = offer.offer(&[SecurityType::NONE], &mut out).unwrap();
        out.extend_from_slice(&0u32.to_be_bytes());
        ServerInit {
            width: 8,
            height: 4,
            pixel_format: PixelFormat::RGB888,
            name: b"kit".to_vec(),
        }
        .write(&mut out);
        out
    }

    /// A source handing out `step` bytes at a time, to make every state need more.
    struct Trickle<'a>(&'a [u8], usize);

    impl Source for Trickle<'_> {
        type Error = Exhausted;
        async fn more(&mut self, buf: &mut Vec<u8>) -> Result<(), Exhausted> {
            if self.0.is_empty() {
                return Err(Exhausted);
            }
            let n = self.1.min(self.0.len());
            buf.extend_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(())
        }
    }
    impl Immediate for Trickle<'_> {}

    fn client_handshake<Src: Immediate>(src: &mut Src) -> Result<ServerInit, String>
    where
        Src::Error: fmt::Display,
    {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let st = client::ExpectServerVersion::new(Limits::default());
        let sec = drive_blocking(src, &mut buf, st, |s, b| s.receive(b, &mut out))
            .map_err(|e| e.to_string())?;
        let choose =
            drive_blocking(src, &mut buf, sec, |s, b| s.receive(b)).map_err(|e| e.to_string())?;
        let result = choose.choose_none(&mut out).map_err(|e| e.to_string())?;
        let init = drive_blocking(src, &mut buf, result, |s, b| s.receive(b))
            .map_err(|e| e.to_string())?;
        let expect = init.send(true, &mut out);
        let si = drive_blocking(src, &mut buf, expect, |s, b| s.receive(b))
            .map_err(|e| e.to_string())?;
        assert!(buf.is_empty(), "ServerInit is the last byte");
        Ok(si)
    }

    #[test]
    fn drives_a_handshake_however_the_bytes_come() {
        let bytes = server_bytes();
        let whole = client_handshake(&mut &bytes[..]).unwrap();
        assert_eq!(
            (whole.width, whole.height, &whole.name[..]),
            (8, 4, &b"kit"[..])
        );
        for step in [1, 2, 3, 7] {
            assert_eq!(
                client_handshake(&mut Trickle(&bytes, step)).unwrap(),
                whole,
                "{step} bytes at a time"
            );
        }
    }

    #[test]
    fn a_short_recording_and_a_bad_byte_are_errors() {
        let bytes = server_bytes();
        assert_eq!(
            client_handshake(&mut &bytes[..bytes.len() - 1]).unwrap_err(),
            "the recorded bytes ran out"
        );
        let mut bad = bytes.clone();
        bad[4] = b'x';
        assert!(client_handshake(&mut &bad[..])
            .unwrap_err()
            .contains("malformed RFB protocol version"));
    }

    #[test]
    fn until_parses_and_leaves_what_follows() {
        let mut src: &[u8] = &[0, 0, 0, 7, 9, 9];
        let mut buf = Vec::new();
        let got = drive_blocking(&mut src, &mut buf, (), |(), b| {
            Ok::<_, std::convert::Infallible>(vizor_spice::link::parse_u32(b))
        });
        assert_eq!(got.unwrap(), 0x0700_0000);
        assert_eq!(buf, [9, 9]);
    }

    #[tokio::test]
    async fn drives_over_a_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let bytes = server_bytes();
        let serve = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let (mut s, _) = listener.accept().await.unwrap();
            for b in bytes.chunks(5) {
                s.write_all(b).await.unwrap();
                s.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        let st = client::ExpectServerVersion::new(Limits::default());
        let mut out = Vec::new();
        let sec = drive(&mut s, &mut buf, st, |s, b| s.receive(b, &mut out))
            .await
            .unwrap();
        let choose = drive(&mut s, &mut buf, sec, |s, b| s.receive(b))
            .await
            .unwrap();
        assert_eq!(choose.offered(), &[SecurityType::NONE]);
        serve.await.unwrap();
    }
}
