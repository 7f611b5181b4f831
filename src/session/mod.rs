//! Console sessions: one browser WebSocket relayed to one QEMU console.
//!
//! [`browser`] adapts the WebSocket to a byte stream with a single writer task;
//! [`rfb`] terminates RFB on both legs and relays framed messages; [`spice`] does the
//! same for each SPICE channel.

pub mod browser;
pub mod resume;
pub mod rfb;
pub mod spice;
mod splice;

pub use crate::end::{ChannelRefusal, End, Refusal, Side, VmFailure};

use crate::libvirt::Target;
use crate::live::{Direction, Live};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// What every session needs from the proxy: one, shared by all of them.
pub struct Env {
    /// The audit sink.
    pub audit: Arc<crate::audit::Audit>,
    /// Prometheus metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Live sessions, for the API and per-session series.
    pub live: Arc<crate::live::LiveSessions>,
    /// Session slots (`[limits] max_sessions*`).
    pub slots: Arc<crate::limits::Slots>,
    /// RFB codec bounds for what browsers send.
    pub browser_limits: vizor_rfb::Limits,
    /// RFB codec bounds for what VMs send.
    pub vm_limits: vizor_rfb::Limits,
    /// SPICE codec bounds for what browsers send.
    pub spice_browser_limits: vizor_spice::Limits,
    /// SPICE codec bounds for what VMs send.
    pub spice_vm_limits: vizor_spice::Limits,
    /// A browser (or a recording's writer) that takes nothing for this long while
    /// vizor has data for it is dropped (`[limits] send_timeout`).
    pub send_timeout: Duration,
    /// A session without input for this long is closed.
    pub idle_timeout: Option<Duration>,
    /// Bound on the handshake, both legs together.
    pub handshake_timeout: Duration,
    /// How sessions connect to consoles.
    pub dial: Dial,
    /// TLS toward QEMU (`[upstream_tls]`).
    pub upstream_tls: Option<Arc<crate::tls::UpstreamTls>>,
    /// Where each host's consoles may be, by host name, when `[upstream] allow` is not
    /// configured (each host's default: its console address, and loopback and
    /// libvirt's sockets for a host on this machine); else `dial.allow` for all.
    pub host_allow: std::collections::HashMap<String, Arc<crate::upstream::Allow>>,
    /// TLS toward the QEMU of hosts that have their own (`[libvirt.hosts.upstream_tls]`),
    /// by host name.
    pub host_tls: std::collections::HashMap<String, Arc<crate::tls::UpstreamTls>>,
    /// Where sessions are recorded (`[audit] record_dir`), if they are.
    pub record_dir: Option<std::path::PathBuf>,
    /// `[libvirt] require_password`: refuse a console QEMU opens without a password,
    /// whatever libvirt stores.
    pub require_password: bool,
    /// Which SPICE channels and agent features reach the VM (`[spice]`).
    pub spice: crate::config::SpiceConfig,
    /// vizor's RSA key for SPICE links with browsers.
    pub spice_key: spice::LinkKey,
    /// Linked SPICE sessions (which channels a token admits).
    pub spice_sessions: spice::Sessions,
    /// The keyboards of VMs with live sessions, as QEMU keeps them.
    pub vm_keyboards: crate::policy::keyboards::VmKeyboards,
    /// Consoles (VNC, and SPICE sessions by their main channel) a console page can
    /// resume after a network blip.
    pub resumes: Arc<resume::Resumes>,
}

impl Env {
    /// How sessions connect to the consoles of the libvirt host `host`: within its own
    /// allow-list, so that no host's domain XML points vizor at another host's
    /// consoles (or at this machine's).
    pub fn dial_for(&self, host: &str) -> Dial {
        match self.host_allow.get(host) {
            Some(allow) => Dial {
                allow: allow.clone(),
                ..self.dial.clone()
            },
            None => self.dial.clone(),
        }
    }

    /// TLS toward the QEMU of the libvirt host `host`: its own, else `[upstream_tls]`.
    pub fn upstream_tls_for(&self, host: &str) -> Option<&crate::tls::UpstreamTls> {
        self.host_tls
            .get(host)
            .or(self.upstream_tls.as_ref())
            .map(|t| &**t)
    }

    /// Takes a session slot for `claims`' user on `domain`, or refuses the session
    /// `id` from `client` (logged and recorded).
    pub(crate) async fn take_slot(
        &self,
        id: u64,
        client: std::net::SocketAddr,
        claims: &crate::token::Claims,
        domain: &str,
    ) -> Result<crate::limits::Slot, End> {
        // A domain's limit is its own: the same name on two hosts is two domains.
        let scope = match claims.host.as_str() {
            crate::config::DEFAULT_HOST => domain.to_owned(),
            host => format!("{host}/{domain}"),
        };
        self.slots.take(id, &scope, &claims.user).await.map_err(|no| {
            let end = End::no_slot(no);
            let reason = end.label();
            match no {
                crate::limits::NoSlot::Full(_) => tracing::warn!(client = %client, user = %claims.user, domain, reason, "session refused: limit reached"),
                crate::limits::NoSlot::StateUnavailable => tracing::warn!(client = %client, user = %claims.user, domain, reason, "session refused: the shared state (Redis) cannot count it across replicas now (the reason is logged above)"),
            }
            self.audit.record_nowait(&crate::audit::Event::SessionRefused {
                session: id,
                client: &client.to_string(),
                user: &claims.user,
                domain,
                token_id: &claims.token_id(),
                reason,
            });
            end
        })
    }
}

/// An upstream connection: TCP or UNIX socket.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A connection to a VM's console. Plain TCP stays a [`TcpStream`] so a relay can
/// splice payloads from its socket ([`splice`]); anything else (a UNIX socket, TLS) is
/// boxed.
pub(crate) enum Conn {
    /// Plain TCP.
    Tcp(TcpStream),
    /// A UNIX socket, or TLS over either.
    Other(Box<dyn Stream>),
}

impl Conn {
    /// The connection as a stream, for the handshake.
    pub(crate) fn as_stream(&mut self) -> &mut dyn Stream {
        match self {
            Conn::Tcp(s) => s,
            Conn::Other(s) => &mut **s,
        }
    }

    /// The connection as a boxed stream.
    pub(crate) fn boxed(self) -> Box<dyn Stream> {
        match self {
            Conn::Tcp(s) => Box::new(s),
            Conn::Other(s) => s,
        }
    }
}

/// The shortest payload worth splicing: below it a read and a write cost less than
/// the pipe's system calls and the hand-over to the browser's writer.
pub(crate) const SPLICE_MIN: u64 = 64 * 1024;

/// The VM's side of a relay: a TCP reader, which the browser's writer can borrow to
/// splice from, or any other stream (TLS, a UNIX socket, or a TCP one read whole).
pub(crate) enum VmReader {
    /// `None` only while lent.
    Tcp(Option<tokio::net::tcp::OwnedReadHalf>),
    Other(Box<dyn AsyncRead + Unpin + Send>),
}

/// The VM's side of a relay, written.
pub(crate) type VmWrite = Box<dyn AsyncWrite + Unpin + Send>;

impl VmReader {
    /// Splits `up`: a plain TCP one the relay may splice from when `splice` (the
    /// browser's connection is plain TCP too, and nothing needs the bytes), else read.
    pub(crate) fn split(up: Conn, splice: bool) -> (VmReader, VmWrite) {
        match up {
            Conn::Tcp(tcp) if splice => {
                let (rd, wr) = tcp.into_split();
                (VmReader::Tcp(Some(rd)), Box::new(wr))
            }
            other => {
                let (rd, wr) = tokio::io::split(other.boxed());
                (VmReader::Other(Box::new(rd)), Box::new(wr))
            }
        }
    }

    /// Reads what the VM sent into `buf`.
    pub(crate) async fn read(&mut self, buf: &mut bytes::BytesMut) -> Result<(), End> {
        match self {
            VmReader::Tcp(Some(rd)) => read_upstream(rd, buf).await,
            VmReader::Other(rd) => read_upstream(rd, buf).await,
            VmReader::Tcp(None) => Err(End::Internal("the VM's reader was not given back")),
        }
    }

    /// The reader, to drain at close (`None` while lent).
    pub(crate) fn as_read(&mut self) -> Option<&mut (dyn AsyncRead + Unpin + Send)> {
        match self {
            VmReader::Tcp(rd) => rd
                .as_mut()
                .map(|r| r as &mut (dyn AsyncRead + Unpin + Send)),
            VmReader::Other(rd) => Some(&mut **rd as &mut (dyn AsyncRead + Unpin + Send)),
        }
    }

    /// Sends the VM's next `pending` bytes (when the rules allow any) to the browser
    /// from socket to socket, after everything queued before, and tells the rules
    /// (`spliced`) they went past: `Ok(true)` once they did, `Ok(false)` when nothing
    /// went (none pending, not TCP, or no pipe: read them instead). A broken splice
    /// ends the session, the bytes the browser got counted.
    pub(crate) async fn splice(
        &mut self,
        btx: &browser::BrowserTx,
        pending: Option<u64>,
        meter: &Meter,
        spliced: impl FnOnce(u64) -> Result<(), End>,
    ) -> Result<bool, End> {
        let (Some(pending), VmReader::Tcp(slot)) = (pending, &mut *self) else {
            return Ok(false);
        };
        let Some(from) = slot.take() else {
            return Err(End::Internal("the VM's reader was not given back"));
        };
        let (from, sent) = btx.splice(from, pending).await.map_err(|(partial, end)| {
            // The frames before the break reached the browser whole.
            meter.add_spliced(partial);
            end
        })?;
        *slot = Some(from);
        if sent {
            meter.add_spliced(pending);
            spliced(pending)?;
        }
        Ok(sent)
    }
}

/// The connection to a VM's console once it is set up.
pub(crate) struct VmLink {
    /// The stream, inside TLS when `tls`.
    pub stream: Conn,
    /// Whether TLS protects it.
    pub tls: bool,
    /// Whether vizor gave QEMU a password (the one libvirt stores) to open it.
    pub password: bool,
}

/// How vizor connects to a VM's console.
#[derive(Debug, Clone)]
pub struct Dial {
    /// Bound on connecting.
    pub timeout: Duration,
    /// Where it may connect (`[upstream] allow`).
    pub allow: Arc<crate::upstream::Allow>,
    /// How long the console's end of a TCP connection may leave data or keepalive
    /// probes unacknowledged before the session ends as stalled (`[limits]
    /// vm_stall_timeout`).
    pub stall: Duration,
}

/// Watches a TCP connection to a console for a network that stopped carrying it:
/// keepalive probes while it is quiet, and `TCP_USER_TIMEOUT` so that unacknowledged
/// data or probes end it after `stall` (either way its reads and writes then fail with
/// `ETIMEDOUT`). Without this a session to a VM whose host fell off the network would
/// hang until the kernel gives up, some fifteen minutes later, or forever when quiet.
fn watch_for_stalls(s: &tokio::net::TcpStream, stall: Duration) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(s);
    let second = Duration::from_secs(1);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time((stall / 2).max(second))
        .with_interval((stall / 6).max(second));
    sock.set_tcp_keepalive(&keepalive)?;
    sock.set_tcp_user_timeout(Some(stall))
}

/// Whether an I/O error is the kernel giving up on an unacknowledged connection.
fn stalled(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::TimedOut
}

/// The end of a session whose network to the VM stopped carrying its data.
fn stall_end() -> End {
    End::vm_stalled()
}

/// Connects to a console, within `dial.timeout`.
pub(crate) async fn connect(target: &Target, dial: &Dial) -> Result<Conn, End> {
    let timeout = dial.timeout;
    let fail = |e: String| {
        End::vm(
            VmFailure::Connect,
            format!("cannot connect to the VM console at {target}: {e}"),
        )
    };
    // The cause first: a close reason is cut at 123 bytes.
    let refused = || {
        End::vm(
            VmFailure::NotAllowed,
            format!("outside [upstream] allow: the VM console's address {target}"),
        )
    };
    let connecting = async {
        match target {
            Target::Tcp { host, port } => {
                // An address is checked as written. A name is resolved and only its
                // addresses inside the list are tried (a name that does not resolve
                // is refused alike: the words tell nothing of the name).
                let addrs: Vec<std::net::SocketAddr> = match host.parse::<std::net::IpAddr>() {
                    Ok(ip) => vec![(ip, *port).into()],
                    Err(_) => match tokio::net::lookup_host((host.as_str(), *port)).await {
                        Ok(a) => a.collect(),
                        Err(_) => return Err(refused()),
                    },
                };
                let mut allowed = Vec::new();
                for a in addrs {
                    if dial.allow.permits(a.ip()).await {
                        allowed.push(a);
                    }
                }
                if allowed.is_empty() {
                    return Err(refused());
                }
                let mut last = None;
                for a in allowed {
                    match tokio::net::TcpStream::connect(a).await {
                        Ok(s) => {
                            s.set_nodelay(true).map_err(|e| fail(e.to_string()))?;
                            watch_for_stalls(&s, dial.stall).map_err(|e| fail(e.to_string()))?;
                            return Ok(Conn::Tcp(s));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(fail(
                    last.map_or_else(|| "no address".into(), |e| e.to_string()),
                ))
            }
            Target::Unix(path) => {
                // The socket checked is the one connected to: opened along its
                // resolved path with no link followed, then reached through its fd.
                let fd = match dial.allow.open_socket(path) {
                    Ok(fd) => fd,
                    Err(crate::upstream::SocketRefused::NotAllowed) => return Err(refused()),
                    Err(crate::upstream::SocketRefused::Io(e)) => return Err(fail(e.to_string())),
                };
                let via = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
                let s = tokio::net::UnixStream::connect(&via)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                drop(fd);
                Ok(Conn::Other(Box::new(s)))
            }
        }
    };
    match tokio::time::timeout(timeout, connecting).await {
        Ok(r) => r,
        Err(_) => Err(fail(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        ))),
    }
}

/// Counts a relay's bytes each way, once per piece relayed: for its end record, in
/// Prometheus, and in its live session.
pub(crate) struct Meter {
    relayed: [AtomicU64; 2],
    total: [prometheus::IntCounter; 2],
    spliced: prometheus::IntCounter,
    live: Arc<Live>,
}

impl Meter {
    /// A meter for a relay of `kind` (vnc, spice) in the session `live`.
    pub(crate) fn new(metrics: &crate::metrics::Metrics, kind: &str, live: Arc<Live>) -> Meter {
        let total = [Direction::BrowserToVm, Direction::VmToBrowser].map(|d| {
            metrics
                .session_bytes_total
                .with_label_values(&[kind, d.as_str()])
        });
        Meter {
            relayed: Default::default(),
            total,
            spliced: metrics.spliced_bytes_total.with_label_values(&[kind]),
            live,
        }
    }

    /// `n` bytes went to the browser by splice(2).
    pub(crate) fn add_spliced(&self, n: u64) {
        self.add(Direction::VmToBrowser, n);
        self.spliced.inc_by(n);
    }

    /// `n` bytes went `dir`.
    pub(crate) fn add(&self, dir: Direction, n: u64) {
        self.relayed[dir as usize].fetch_add(n, Ordering::Relaxed);
        self.total[dir as usize].inc_by(n);
        self.live.bytes(dir, n);
    }

    /// Bytes this relay moved `dir`.
    pub(crate) fn relayed(&self, dir: Direction) -> u64 {
        self.relayed[dir as usize].load(Ordering::Relaxed)
    }

    /// The live session.
    pub(crate) fn live(&self) -> &Arc<Live> {
        &self.live
    }

    /// The `session_end` record of the session (a SPICE channel) this meter counted,
    /// which started at `started`.
    pub(crate) fn session_end<'a>(
        &self,
        session: u64,
        started: std::time::Instant,
        end: &'a End,
        round_trip_ms: Option<f64>,
        recording: Option<crate::recording::Finished>,
        channel: Option<&'a str>,
    ) -> crate::audit::Event<'a> {
        crate::audit::Event::SessionEnd {
            session,
            duration_ms: started.elapsed().as_millis() as u64,
            bytes_browser_to_vm: self.relayed(Direction::BrowserToVm),
            bytes_vm_to_browser: self.relayed(Direction::VmToBrowser),
            reason: end.reason(),
            cause: end.label(),
            ended_by: end.side().as_str(),
            round_trip_ms,
            recording,
            channel,
            admin: match end {
                End::Terminated { by, .. } => Some(by),
                _ => None,
            },
        }
    }
}

/// Waits until the live session a connection belongs to ends for it: an owner's when
/// an administrator ends the session, a participant's also when the owner leaves.
pub(crate) async fn ended(
    mut state: tokio::sync::watch::Receiver<crate::live::State>,
    owner: bool,
) -> End {
    use crate::live::State;
    let ends = |s: &State| match s {
        State::Live => false,
        State::Terminated { .. } => true,
        State::OwnerLeft => !owner,
    };
    let end = state.wait_for(ends).await.map(|s| s.clone());
    let end = match end {
        Ok(s) => s,
        // The session's entry is gone with its sender: only after its owner left.
        Err(_) if !owner => State::OwnerLeft,
        Err(_) => return std::future::pending().await,
    };
    match end {
        State::Terminated { by, reason } => End::Terminated { by, reason },
        _ => End::OwnerLeft,
    }
}

/// Resolves when a token's `max_duration` runs out, `age` into the session; never
/// without one.
pub(crate) async fn max_duration(max: Option<Duration>, age: Duration) -> End {
    match max {
        Some(d) => {
            tokio::time::sleep(d.saturating_sub(age)).await;
            End::MaxDuration(d)
        }
        None => std::future::pending().await,
    }
}

/// What stops a session from outside its connections: a shutdown, an administrator or
/// its owner leaving, its `max_duration` (`age`: how long it has run).
pub(crate) async fn stopped(
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    state: tokio::sync::watch::Receiver<crate::live::State>,
    owner: bool,
    max: Option<Duration>,
    age: Duration,
) -> End {
    tokio::select! {
        _ = shutdown.wait_for(|s| *s) => End::Shutdown,
        end = ended(state, owner) => end,
        end = max_duration(max, age) => end,
    }
}

/// A session cannot go on without its audit records.
pub(crate) fn audit_failed(e: std::io::Error) -> End {
    End::Audit(e.to_string())
}

/// Puts a note of a session's policy on record.
pub(crate) async fn record_note(
    audit: &crate::audit::Audit,
    session: u64,
    note: &crate::policy::Note,
) -> std::io::Result<()> {
    use crate::audit::{Event, KeyEvent};
    use crate::policy::Note;
    match note {
        Note::Button { button, at } => {
            audit
                .record(&Event::Button {
                    session,
                    button,
                    x: at.map(|a| a.0),
                    y: at.map(|a| a.1),
                })
                .await
        }
        Note::Key(k) => {
            let event = KeyEvent {
                stroke: k.stroke,
                via: k.via,
                keysym: k.keysym,
                mismatch: k.mismatch,
            };
            audit.stroke(session, &event).await
        }
        Note::Keysym {
            down,
            keysym,
            keymap,
        } => audit.keysym_key(session, *down, *keysym, keymap).await,
        Note::Locks { locks, source } => audit.locks(session, *locks, source).await,
        Note::Clipboard(clip, dir) => audit.record(&clip.event(session, dir.as_str())).await,
        Note::ClipboardDropped { dir, length } => {
            audit
                .record(&Event::ClipboardDropped {
                    session,
                    direction: dir.as_str(),
                    length: *length,
                })
                .await
        }
        Note::FileTransfer(r) => {
            audit
                .record(&Event::FileTransfer {
                    session,
                    direction: r.way.direction(),
                    id: Some(r.id),
                    name: Some(&r.name),
                    size: Some(r.size),
                    status: r.status,
                    bytes: r.bytes,
                    sha256: r.sha256.as_deref(),
                })
                .await
        }
        Note::InputDropped(b) => {
            audit
                .record(&Event::InputDropped {
                    session,
                    keys: b.keys,
                    pointer: b.pointer,
                    other: b.other,
                    clipboard: b.clipboard,
                    clipboard_bytes: b.clipboard_bytes,
                    duration_ms: b.lasted.as_millis() as u64,
                })
                .await
        }
        Note::FileTransferRefused { way, start } => {
            let (id, name, size) = match start {
                Some((id, name, size)) => (Some(*id), Some(name.as_str()), Some(*size)),
                None => (None, None, None),
            };
            audit
                .record(&Event::FileTransfer {
                    session,
                    direction: way.direction(),
                    id,
                    name,
                    size,
                    status: "refused",
                    bytes: 0,
                    sha256: None,
                })
                .await
        }
    }
}

/// Writes `bytes` to the VM's console.
pub(crate) async fn write_upstream(
    wr: &mut (impl AsyncWrite + Unpin),
    bytes: &[u8],
) -> Result<(), End> {
    wr.write_all(bytes).await.map_err(|e| {
        if stalled(&e) {
            stall_end()
        } else {
            End::vm(VmFailure::Io, format!("writing to the VM console: {e}"))
        }
    })
}

/// How long a VM leg the browser left may take to close (see [`close_upstream`]).
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Closes the VM leg of a session the browser (or vizor) ended, the way a client
/// leaves: the end of stream goes after everything forwarded, then vizor reads (and
/// drops) what the VM still sends until the VM closes its side, which QEMU and
/// spice-server do once they have read to the end. So the input on record is read by
/// the VM before the connection goes. Dropping the socket instead closes it with
/// unread bytes, which resets it, and a server that writes before it reads then drops
/// the connection with input unread. Bounded by [`CLOSE_GRACE`]; says whether the VM
/// closed in time.
pub(crate) async fn close_upstream<R: AsyncRead + Unpin + ?Sized>(
    wr: &mut (impl AsyncWrite + Unpin + ?Sized),
    rd: Option<&mut R>,
) -> bool {
    tokio::time::timeout(CLOSE_GRACE, async {
        let _ = wr.shutdown().await;
        let Some(rd) = rd else { return };
        let mut sink = [0u8; 16 * 1024];
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
    .is_ok()
}

/// Feeds a handshake state from `src` until it completes: the one loop that drives
/// every handshake, RFB and SPICE, either leg. Returns the next state and the bytes
/// the completed message spanned (taken from the front of `buf`); a step's error is
/// the session's end by `fail`.
pub(crate) async fn drive<S, N, E>(
    src: &mut impl Source,
    buf: &mut Vec<u8>,
    mut state: S,
    fail: impl Fn(&E) -> End,
    mut step: impl FnMut(S, &[u8]) -> Result<vizor_sansio::Progress<S, N>, E>,
) -> Result<(N, Vec<u8>), End> {
    loop {
        match step(state, buf).map_err(|e| fail(&e))?.split() {
            Ok((next, consumed)) => return Ok((next, buf.drain(..consumed).collect())),
            Err(s) => state = s,
        }
        src.fill(buf).await?;
    }
}

/// A source of bytes for the handshake drivers: the browser or the VM's console.
pub(crate) trait Source {
    /// Reads what comes next onto `buf`.
    fn fill(
        &mut self,
        buf: &mut Vec<u8>,
    ) -> impl std::future::Future<Output = Result<(), End>> + Send;
}

impl Source for browser::BrowserRx {
    async fn fill(&mut self, buf: &mut Vec<u8>) -> Result<(), End> {
        self.read_into(buf).await.map(|_| ())
    }
}

/// The VM's console as a [`Source`] during the step its second field names: its close
/// is an error then.
pub(crate) struct Upstream<R>(pub R, pub &'static str);

impl<R: AsyncRead + Unpin + Send> Source for Upstream<R> {
    async fn fill(&mut self, buf: &mut Vec<u8>) -> Result<(), End> {
        read_handshake(&mut self.0, buf, self.1).await
    }
}

/// Reads what the VM's console sent during the handshake (`what`) onto `buf`.
pub(crate) async fn read_handshake(
    rd: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    what: &str,
) -> Result<(), End> {
    let mut tmp = [0u8; 4096];
    match rd.read(&mut tmp).await {
        Ok(0) => Err(End::vm(
            VmFailure::Closed,
            format!("the VM console closed the connection during the {what}"),
        )),
        Ok(n) => {
            buf.extend_from_slice(&tmp[..n]);
            Ok(())
        }
        Err(e) => Err(read_failed(e, &format!(" during the {what}"))),
    }
}

/// A failed read from the VM's console; a TLS failure says so (with TLS 1.3, QEMU
/// refusing vizor's certificate shows as an alert on the first read).
fn read_failed(e: std::io::Error, during: &str) -> End {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => End::vm(
            VmFailure::Tls,
            format!("TLS to the VM console failed{during}: {tls}"),
        ),
        None if stalled(&e) => stall_end(),
        None => End::vm(
            VmFailure::Io,
            format!("reading from the VM console{during}: {e}"),
        ),
    }
}

/// Reads what the VM's console sent next onto `buf`; its close ends the session.
pub(crate) async fn read_upstream(
    rd: &mut (impl AsyncRead + Unpin),
    buf: &mut bytes::BytesMut,
) -> Result<(), End> {
    buf.reserve(64 * 1024);
    match rd.read_buf(buf).await {
        Ok(0) => Err(End::VmClosed),
        Ok(_) => Ok(()),
        Err(e) => Err(read_failed(e, "")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A stand-in for a console server that writes before it reads (QEMU and
    /// spice-server both send on timers): a loopback socket, since the fault is in how
    /// the socket closes, not in QEMU. Returns whether its writes after the client left
    /// went through, and what it read.
    async fn server_that_writes_first(listener: TcpListener) -> (bool, Vec<u8>) {
        let (mut s, _) = listener.accept().await.unwrap();
        // Enough that the client leaves with bytes it has not read.
        s.write_all(&[7u8; 64 * 1024]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let wrote = s.write_all(&[7u8; 64 * 1024]).await.is_ok() && s.flush().await.is_ok();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got).await;
        (wrote, got)
    }

    /// A real listener at an address outside `[upstream] allow`: connect refuses
    /// without dialling it (nothing is accepted), and dials it once allowed.
    #[tokio::test]
    async fn a_console_outside_the_allow_list_is_never_dialled() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let dial = |allow: &[&str]| Dial {
            timeout: Duration::from_secs(5),
            allow: Arc::new(crate::upstream::Allow::parse(allow).unwrap()),
            stall: Duration::from_secs(5),
        };
        let target = Target::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        for name in ["127.0.0.1", "localhost"] {
            let target = Target::Tcp {
                host: name.into(),
                port,
            };
            let Err(end) = connect(&target, &dial(&["10.0.0.0/8"])).await else {
                panic!("{name}: connected outside the list");
            };
            assert_eq!(end.label(), "upstream_not_allowed", "{end}");
            assert!(
                end.reason().starts_with("outside [upstream] allow: "),
                "{end}"
            );
        }
        // A name that does not resolve is refused in the same words.
        let nowhere = Target::Tcp {
            host: "no-such-host.invalid".into(),
            port,
        };
        let end = connect(&nowhere, &dial(&["10.0.0.0/8"]))
            .await
            .err()
            .unwrap();
        assert_eq!(end.label(), "upstream_not_allowed", "{end}");
        let accepted = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
        assert!(accepted.is_err(), "nothing dialled the listener");
        assert!(connect(&target, &dial(&["127.0.0.0/8"])).await.is_ok());
        assert!(listener.accept().await.is_ok());
    }

    #[tokio::test]
    async fn a_closed_vm_leg_delivers_its_input_to_a_server_that_writes_first() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(server_that_writes_first(listener));
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut rd, mut wr) = stream.into_split();
        wr.write_all(b"the last key").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            close_upstream(&mut wr, Some(&mut rd)).await,
            "the server closed in time"
        );
        let (wrote, got) = server.await.unwrap();
        assert!(wrote, "the server's writes went through: no reset");
        assert_eq!(got, b"the last key");
    }

    #[tokio::test]
    async fn a_dropped_vm_leg_resets_a_server_that_writes_first() {
        // The fault close_upstream exists for: dropped with bytes unread, the socket
        // resets, and the server's next write fails before it reads.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(server_that_writes_first(listener));
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"the last key").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(stream);
        let (wrote, _) = server.await.unwrap();
        assert!(!wrote, "a reset socket refuses the server's write");
    }
}
