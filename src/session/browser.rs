//! The browser's WebSocket as a byte stream: binary messages in, binary messages out,
//! pings answered, and one writer task so both relay directions can send.
//!
//! Over plain TCP the writer can also splice a payload from the VM's socket straight
//! into the browser's (`BrowserTx::splice`).

use super::splice::{self, Pipe, SpliceError};
use super::{End, Refusal};
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket, WebSocketRead};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

type Io = TokioIo<Upgraded>;

/// How long a closed console waits for the browser's close frame before its
/// connection is dropped.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// The browser's side of the connection, read by the WebSocket reader.
type Reader = Box<dyn AsyncRead + Unpin + Send>;

/// What the writer task sends.
enum Out {
    /// A frame as it is.
    Frame(Frame<'static>),
    /// A binary frame whose payload comes from the VM's socket.
    Splice(Splice),
}

/// A payload of `len` bytes to splice from `from`; the reader half goes back with the
/// outcome (on failure, with the bytes the browser got in whole frames).
struct Splice {
    from: OwnedReadHalf,
    len: u64,
    done: oneshot::Sender<(OwnedReadHalf, Spliced)>,
}

/// How a splice went: on failure, with the payload bytes of the frames sent whole.
type Spliced = Result<(), (u64, SpliceError)>;

/// The browser's side of the connection, written by the writer task: plain TCP (which
/// splice(2) can write to), or anything else hyper upgraded (TLS).
enum Writer {
    Tcp(OwnedWriteHalf),
    Other(WriteHalf<Io>),
}

impl Writer {
    async fn frame(&mut self, frame: &mut Frame<'_>) -> std::io::Result<()> {
        match self {
            Writer::Tcp(w) => write_frame(w, frame).await,
            Writer::Other(w) => write_frame(w, frame).await,
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Writer::Tcp(w) => w.flush().await,
            Writer::Other(w) => w.flush().await,
        }
    }
}

/// Writes a frame: its head and payload in one vectored write where the stream takes
/// them, the payload not copied.
async fn write_frame(
    w: &mut (impl AsyncWrite + Unpin),
    frame: &mut Frame<'_>,
) -> std::io::Result<()> {
    let mut head = [0u8; 14];
    let n = frame.fmt_head(&mut head);
    let mut head = &head[..n];
    let mut payload: &[u8] = &frame.payload;
    while !head.is_empty() {
        let wrote = w
            .write_vectored(&[IoSlice::new(head), IoSlice::new(payload)])
            .await?;
        if wrote == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        if wrote < head.len() {
            head = &head[wrote..];
        } else {
            payload = &payload[wrote - head.len()..];
            head = &[];
        }
    }
    w.write_all(payload).await
}

/// Writes what the queue holds, in order, until a close frame or a failure. A spliced
/// frame that fails leaves the stream broken mid-frame: nothing follows it.
async fn write_queue(
    mut w: Writer,
    mut queue: mpsc::Receiver<Out>,
    stall: Duration,
    message_size: usize,
) {
    while let Some(out) = queue.recv().await {
        match out {
            Out::Frame(mut frame) => {
                let closing = frame.opcode == OpCode::Close;
                if w.frame(&mut frame).await.is_err() {
                    break;
                }
                if closing {
                    let _ = w.flush().await;
                    break;
                }
            }
            Out::Splice(s) => {
                let result = match &w {
                    // A pipe per splice: a session holds its two descriptors only while
                    // it splices, not for its whole life (open files bound how many
                    // sessions vizor can hold).
                    Writer::Tcp(to) => match Pipe::new() {
                        Ok(pipe) => {
                            let (from, to) = (s.from.as_ref(), to.as_ref());
                            splice::frames(from, to, s.len, message_size, &pipe, stall).await
                        }
                        // Nothing is written yet: the caller can go on without.
                        Err(e) => Err((0, SpliceError::NoPipe(e))),
                    },
                    Writer::Other(_) => Err((
                        0,
                        SpliceError::NoPipe(std::io::Error::other(
                            "the browser's connection is not plain TCP",
                        )),
                    )),
                };
                let broken = matches!(
                    result,
                    Err((
                        _,
                        SpliceError::Vm(_) | SpliceError::Browser(_) | SpliceError::BrowserStalled
                    ))
                );
                let _ = s.done.send((s.from, result));
                if broken {
                    break;
                }
            }
        }
    }
}

/// Sends frames to the browser through the writer task.
#[derive(Clone)]
pub struct BrowserTx {
    tx: mpsc::Sender<Out>,
    /// How long a frame may wait for room in the queue (`[limits] send_timeout`).
    send_timeout: Duration,
    /// Whether the browser's connection is plain TCP, which payloads can be spliced to.
    tcp: bool,
    /// The largest message sent toward the browser (`[server] ws_message_size`): more
    /// goes as several, so the browser can work on the first while the rest arrives.
    message_size: usize,
    /// The writer task, awaited on close so the close frame is on the wire before the
    /// session counts as ended (a shutting-down process must not drop it).
    writer: Arc<tokio::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl BrowserTx {
    /// Sends binary data; `false` once the browser is gone.
    pub async fn binary(&self, data: Vec<u8>) -> bool {
        self.tx
            .send(Out::Frame(Frame::binary(Payload::Owned(data))))
            .await
            .is_ok()
    }

    /// Pings the browser every `interval` until the session ends (dropping `BrowserTx`
    /// clones does not stop it: abort the returned task).
    pub fn start_pinging(&self, pings: Pings, interval: Duration) -> JoinHandle<()> {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(id) = pings.next() else { continue };
                let ping = Frame::new(
                    true,
                    OpCode::Ping,
                    None,
                    Payload::Owned(id.to_be_bytes().to_vec()),
                );
                if tx.send(Out::Frame(ping)).await.is_err() {
                    return;
                }
            }
        })
    }

    /// Sends binary data without copying it. Fails once the browser is gone, or when
    /// it has taken nothing for the send timeout: a browser that stops reading holds
    /// at most the queue's frames, and not for long.
    /// More than `[server] ws_message_size` goes as several messages (without a copy).
    pub async fn bytes(&self, mut data: bytes::BytesMut) -> Result<(), End> {
        while data.len() > self.message_size {
            let first = data.split_to(self.message_size);
            self.send(Out::Frame(Frame::binary(Payload::Bytes(first))))
                .await?;
        }
        self.send(Out::Frame(Frame::binary(Payload::Bytes(data))))
            .await
    }

    /// Queues `out`, waiting for room no longer than the send timeout.
    async fn send(&self, out: Out) -> Result<(), End> {
        // Room in the queue is the common case: no clock read, no timer.
        let out = match self.tx.try_send(out) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(End::BrowserClosed),
            Err(mpsc::error::TrySendError::Full(out)) => out,
        };
        match tokio::time::timeout(self.send_timeout, self.tx.send(out)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::BrowserClosed),
            Err(_) => Err(End::BrowserStalled(self.send_timeout)),
        }
    }

    /// Whether [`BrowserTx::splice`] can be used: the browser's connection is plain TCP.
    pub(crate) fn can_splice(&self) -> bool {
        self.tcp
    }

    /// Sends the next `len` bytes of the VM's socket `from` as binary messages of at
    /// most `[server] ws_message_size`, after everything queued before, without reading
    /// them into vizor. Returns `from` and whether they were sent: `false` when no pipe
    /// could be had, and nothing was. Any other failure ends the session (a frame is
    /// broken off); it comes with the bytes the browser got in whole frames before.
    pub(crate) async fn splice(
        &self,
        from: OwnedReadHalf,
        len: u64,
    ) -> Result<(OwnedReadHalf, bool), (u64, End)> {
        let (done, outcome) = oneshot::channel();
        self.send(Out::Splice(Splice { from, len, done }))
            .await
            .map_err(|e| (0, e))?;
        let (from, outcome) = outcome.await.map_err(|_| (0, End::BrowserClosed))?;
        let (sent, e) = match outcome {
            Ok(()) => return Ok((from, true)),
            Err((_, SpliceError::NoPipe(e))) => {
                tracing::debug!(error = %e, "no pipe to splice through");
                return Ok((from, false));
            }
            Err(failed) => failed,
        };
        Err((
            sent,
            match e {
                SpliceError::Vm(None) => End::VmClosed,
                SpliceError::Vm(Some(e)) => super::read_failed(e, ""),
                SpliceError::Browser(e) => {
                    tracing::debug!(error = %e, "writing a spliced frame to the browser failed");
                    End::BrowserClosed
                }
                SpliceError::BrowserStalled => End::BrowserStalled(self.send_timeout),
                SpliceError::NoPipe(_) => End::Internal("no pipe"),
            },
        ))
    }

    /// Sends a text message: not RFB or SPICE, but vizor's word to its own console
    /// page (which keeps text messages from noVNC); `false` once the browser is gone.
    pub async fn text(&self, text: String) -> bool {
        self.tx
            .send(Out::Frame(Frame::text(Payload::Owned(text.into_bytes()))))
            .await
            .is_ok()
    }

    /// Lets the connection go without a close frame: the writer is stopped, and the
    /// reader (dropped by its owner) closes the connection. A page still there sees
    /// it drop, and may resume.
    pub async fn abort(&self) {
        if let Some(writer) = self.writer.lock().await.take() {
            writer.abort();
        }
    }

    /// Sends a close frame with `code` and a reason (cut to the 123 bytes a close frame
    /// can carry, at a character boundary), and waits (up to a second) until it is
    /// written: a process shutting down must not drop it.
    pub async fn close(&self, code: u16, reason: &str) {
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        // A browser that stopped reading has a full queue: the close frame waits a
        // second at most, then the writer is stopped (which drops the connection).
        let wait = Duration::from_secs(1);
        let close = self
            .tx
            .send(Out::Frame(Frame::close(code, &reason.as_bytes()[..end])));
        let _ = tokio::time::timeout(wait, close).await;
        if let Some(mut writer) = self.writer.lock().await.take() {
            if tokio::time::timeout(wait, &mut writer).await.is_err() {
                writer.abort();
            }
        }
    }
}

/// Reads the browser's binary messages.
pub struct BrowserRx {
    rx: WebSocketRead<Reader>,
    tx: mpsc::Sender<Out>,
    pings: Pings,
    /// The largest message, whole or in fragments.
    max_message: usize,
    /// A fragmented binary message so far.
    fragments: Option<Vec<u8>>,
    /// The browser's side is over: its close frame came, or the connection ended or
    /// broke. Nothing is left to wait for when vizor closes.
    peer_done: bool,
    /// The browser sent its close frame: it left on purpose.
    goodbye: bool,
}

/// A WebSocket protocol violation by the browser.
fn ws_error(what: impl std::fmt::Display) -> End {
    End::refused(Refusal::WebsocketError, format!("WebSocket error: {what}"))
}

/// Whether a frame came masked, as RFC 6455 (5.1) demands of every client frame (the
/// reader unmasks the payload but keeps the key, which the formatted head shows).
fn masked(frame: &mut Frame<'_>) -> bool {
    let mut head = [0u8; 16];
    frame.fmt_head(&mut head);
    head[1] & 0x80 != 0
}

/// Pings vizor sent to the browser and not yet answered, and where their round trips
/// go (set once the session's kind is known).
#[derive(Clone, Default)]
pub struct Pings {
    inner: Arc<std::sync::Mutex<PingState>>,
}

#[derive(Default)]
struct PingState {
    counter: u64,
    sent: std::collections::HashMap<u64, std::time::Instant>,
    rtt: Option<prometheus::Histogram>,
    live: Option<Arc<crate::live::Live>>,
}

impl Pings {
    /// Round trips from now on go to `rtt`.
    pub fn measure_into(&self, rtt: prometheus::Histogram) {
        if let Ok(mut g) = self.inner.lock() {
            g.rtt = Some(rtt);
        }
    }

    /// Round trips from now on are also the session's.
    pub fn measure_live(&self, live: Arc<crate::live::Live>) {
        if let Ok(mut g) = self.inner.lock() {
            g.live = Some(live);
        }
    }

    fn next(&self) -> Option<u64> {
        let mut g = self.inner.lock().ok()?;
        // A browser that never answers must not grow this.
        if g.sent.len() >= 16 {
            return None;
        }
        g.counter += 1;
        let id = g.counter;
        g.sent.insert(id, std::time::Instant::now());
        Some(id)
    }

    fn pong(&self, payload: &[u8]) {
        let Ok(id) = <[u8; 8]>::try_from(payload).map(u64::from_be_bytes) else {
            return;
        };
        if let Ok(mut g) = self.inner.lock() {
            if let Some(sent) = g.sent.remove(&id) {
                let rtt = sent.elapsed();
                if let Some(h) = &g.rtt {
                    h.observe(rtt.as_secs_f64());
                }
                if let Some(live) = &g.live {
                    live.observe(crate::live::Latency::ClientRtt, rtt);
                }
            }
        }
    }
}

impl BrowserRx {
    /// After vizor's close frame: reads and drops what the browser still sends until
    /// its own close frame arrives, its connection ends, or `wait` passes; only then
    /// may the connection close (RFC 6455, 7.1.1: the server closes TCP once both close
    /// frames crossed). Closing at once would leave the browser's unread messages in
    /// the socket, and the kernel answers those with a reset: the browser would see a
    /// broken connection instead of vizor's close frame and reason.
    pub async fn linger(&mut self, wait: Duration) {
        if self.peer_done {
            return;
        }
        let rx = &mut self.rx;
        let drain = async {
            loop {
                // vizor's close frame is out: nothing more is sent, not even the
                // answer to a close frame.
                let frame = rx
                    .read_frame(&mut |_: Frame<'static>| async {
                        Ok::<(), std::convert::Infallible>(())
                    })
                    .await;
                match frame {
                    Ok(f) if f.opcode == OpCode::Close => return,
                    Ok(_) => continue,
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(wait, drain).await;
        self.peer_done = true;
    }

    /// Lets go of the connection's reading side (with TLS, of the connection): nothing
    /// more is read from it, and once its writer is stopped too ([`BrowserTx::abort`])
    /// the connection closes.
    pub fn shut(&mut self) {
        let empty: Reader = Box::new(tokio::io::empty());
        let (rd, _) = fastwebsockets::after_handshake_split(empty, tokio::io::sink(), Role::Server);
        self.rx = rd;
        self.peer_done = true;
        self.fragments = None;
    }

    /// Whether the browser sent its close frame (it left on purpose), rather than its
    /// connection ending or breaking without one.
    pub fn said_goodbye(&self) -> bool {
        self.goodbye
    }

    /// The pings this reader answers, for [`BrowserTx::start_pinging`].
    pub fn pings(&self) -> Pings {
        self.pings.clone()
    }

    /// Appends the next binary message to `buf`. A fragmented message is put together
    /// here, bounded as a whole by `max_message` like an unfragmented one (each frame
    /// alone is bounded by the reader).
    pub async fn read_into(&mut self, buf: &mut Vec<u8>) -> Result<usize, End> {
        loop {
            let tx = self.tx.clone();
            let mut frame = self
                .rx
                .read_frame(&mut move |f: Frame<'static>| {
                    let tx = tx.clone();
                    async move {
                        tx.send(Out::Frame(f))
                            .await
                            .map_err(|_| "browser writer closed")
                    }
                })
                .await
                .map_err(|e| match e {
                    fastwebsockets::WebSocketError::ConnectionClosed
                    | fastwebsockets::WebSocketError::UnexpectedEOF
                    | fastwebsockets::WebSocketError::IoError(_) => {
                        self.peer_done = true;
                        End::BrowserClosed
                    }
                    other => ws_error(other),
                })?;
            if !masked(&mut frame) {
                return Err(ws_error("unmasked frame from the browser"));
            }
            match frame.opcode {
                OpCode::Close => {
                    // Its close frame was answered by the reader's obligated send.
                    self.peer_done = true;
                    self.goodbye = true;
                    return Err(End::BrowserClosed);
                }
                OpCode::Pong => self.pings.pong(&frame.payload),
                // Pings are answered by the reader's obligated sends.
                OpCode::Ping => {}
                OpCode::Text | OpCode::Binary if self.fragments.is_some() => {
                    return Err(ws_error("Invalid fragment"))
                }
                OpCode::Text => {
                    return Err(End::refused(
                        Refusal::WebsocketText,
                        "text WebSocket messages are not RFB; use binary",
                    ))
                }
                OpCode::Binary if !frame.fin => self.fragments = Some(frame.payload.to_vec()),
                OpCode::Binary => {
                    buf.extend_from_slice(&frame.payload);
                    return Ok(frame.payload.len());
                }
                OpCode::Continuation => {
                    let Some(so_far) = self.fragments.as_mut() else {
                        return Err(ws_error("Invalid continuation frame"));
                    };
                    if so_far.len() + frame.payload.len() > self.max_message {
                        return Err(ws_error("Frame too large"));
                    }
                    so_far.extend_from_slice(&frame.payload);
                    if frame.fin {
                        let whole = self.fragments.take().unwrap_or_default();
                        buf.extend_from_slice(&whole);
                        return Ok(whole.len());
                    }
                }
            }
        }
    }
}

/// Splits the upgraded socket and starts the writer task. Messages from the browser
/// may be `max_message` bytes long, those to it are `message_size` at most; a frame for
/// it waits `send_timeout` at most; payloads may be spliced to it when `splice` and
/// its connection is plain TCP.
pub fn split(
    ws: WebSocket<Io>,
    max_message: usize,
    message_size: usize,
    send_timeout: Duration,
    splice: bool,
) -> (BrowserRx, BrowserTx) {
    let message_size = message_size.max(1);
    // Nothing was read through the WebSocket yet: the upgraded connection is whole.
    let upgraded = ws.into_inner().into_inner();
    let (reader, writer): (Reader, Writer) = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let (rd, wr) = parts.io.into_inner().into_split();
            // Whatever hyper read past the upgrade request comes first. It is copied:
            // the bytes hyper hands over share its whole read buffer, which a session
            // would otherwise hold for its life.
            let reader: Reader = if parts.read_buf.is_empty() {
                Box::new(rd)
            } else {
                let ahead = std::io::Cursor::new(parts.read_buf.to_vec());
                Box::new(ahead.chain(rd))
            };
            (reader, Writer::Tcp(wr))
        }
        Err(upgraded) => {
            let (rd, wr) = tokio::io::split(TokioIo::new(upgraded));
            (Box::new(rd), Writer::Other(wr))
        }
    };
    let tcp = splice && matches!(writer, Writer::Tcp(_));
    // Close and pong frames are sent by this side, through the writer task.
    let (mut rd, _) =
        fastwebsockets::after_handshake_split(reader, tokio::io::sink(), Role::Server);
    rd.set_max_message_size(max_message);
    let (tx, queue) = mpsc::channel::<Out>(32);
    let writer = tokio::spawn(write_queue(writer, queue, send_timeout, message_size));
    (
        BrowserRx {
            rx: rd,
            tx: tx.clone(),
            pings: Pings::default(),
            max_message,
            fragments: None,
            peer_done: false,
            goodbye: false,
        },
        BrowserTx {
            tx,
            send_timeout,
            tcp,
            message_size,
            writer: Arc::new(tokio::sync::Mutex::new(Some(writer))),
        },
    )
}
