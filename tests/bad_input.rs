//! The bad-input suite (issue 7): malformed and truncated handshakes, lying lengths,
//! unknown message types, rectangles beyond the framebuffer, oversized and malformed
//! WebSocket frames, bad HTTP requests and bad SPICE links, each sent to a real vizor
//! (and, as far as the input gets, to real libvirtd and QEMU), each with the refusal
//! it must get: the WebSocket close code and reason (or the HTTP status), the outcome
//! vizor counts the session under (`vizor_sessions_total`), and the `protocol_error`
//! audit record (direction and cause) where vizor writes one, or none where it does not.
//! After its bad inputs every vizor still serves a good session.
//!
//! The cases are tables: each names its input and its expected refusal. Faults of the
//! VM leg (rectangles beyond the framebuffer, lying lengths, garbage handshakes from
//! the server) are faults real QEMU never commits: they come from a test double,
//! vizor-testkit's synthetic RFB server (`vizor_testkit::vnc`), which libvirt's
//! in-process test driver names as the console of its domains.
//!
//! The suite found five faults, each now fixed and pinned by its own test here:
//! unbounded fragmented WebSocket messages, unmasked client frames, unconfirmed RFB
//! extension messages passed to QEMU, exclusive ClientInits passed to QEMU, and SPICE
//! browser messages beyond the bound streamed on unparsed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::rfb::{full_update, msg, open_session};
use common::{Closed, Vizor};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vizor::token::ConsoleKind;
use vizor_rfb::client::{clipboard, write_set_encodings, ClientMessage, CutText};
use vizor_rfb::handshake::ServerInit;
use vizor_rfb::{Encoding, Limits, PixelFormat};
use vizor_testkit::vnc::{Auth, Conn, Double, Fault, Served};
use vizor_testkit::DriveError;

// ---------------------------------------------------------------------------------
// A raw WebSocket client: frames written byte by byte as a case wants them, including
// those no client library would send.
// ---------------------------------------------------------------------------------

/// A WebSocket to vizor whose every frame the test writes itself.
struct Raw {
    s: TcpStream,
    /// Bytes read and not yet parsed into frames.
    inbuf: Vec<u8>,
    /// Binary data received and not yet consumed.
    pending: Vec<u8>,
}

/// A `Sec-WebSocket-Key` (RFC 6455's sample nonce).
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A close frame's payload as (code, reason).
fn closed_of(p: &[u8]) -> Closed {
    if p.len() < 2 {
        return Closed {
            code: 1005,
            reason: String::new(),
        };
    }
    Closed {
        code: u16::from_be_bytes([p[0], p[1]]),
        reason: String::from_utf8_lossy(&p[2..]).into_owned(),
    }
}

/// One frame from vizor at the start of `b` (servers do not mask): opcode, payload,
/// bytes spanned; `None` until it is all there.
fn parse_frame(b: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    let (&first, &second) = (b.first()?, b.get(1)?);
    assert_eq!(second & 0x80, 0, "a server frame is never masked");
    let (len, at) = match second & 0x7f {
        126 => (
            usize::from(u16::from_be_bytes(b.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (
            usize::try_from(u64::from_be_bytes(b.get(2..10)?.try_into().ok()?)).ok()?,
            10,
        ),
        n => (usize::from(n), 2),
    };
    let payload = b.get(at..at + len)?.to_vec();
    Some((first & 0x0f, payload, at + len))
}

impl Raw {
    /// Upgrades `path` to a WebSocket as a browser does; the upgrade must succeed.
    async fn open(addr: SocketAddr, path: &str) -> Raw {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut inbuf = Vec::new();
        let end = loop {
            if let Some(i) = find(&inbuf, b"\r\n\r\n") {
                break i + 4;
            }
            let mut tmp = [0u8; 4096];
            let n = s.read(&mut tmp).await.unwrap();
            assert!(n > 0, "closed during the upgrade: {inbuf:?}");
            inbuf.extend_from_slice(&tmp[..n]);
        };
        let head = String::from_utf8_lossy(&inbuf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        inbuf.drain(..end);
        Raw {
            s,
            inbuf,
            pending: Vec::new(),
        }
    }

    /// Writes one frame whose first byte (FIN, RSV1-3, opcode) is `first`, masked as a
    /// client's must be unless `masked` is false. Errors are ignored: vizor may refuse
    /// a frame by its header and close before it read the rest.
    async fn frame_with(&mut self, first: u8, payload: &[u8], masked: bool) {
        let m = if masked { 0x80 } else { 0 };
        let mut f = vec![first];
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n <= 0xffff => {
                f.push(m | 126);
                f.extend((n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend((n as u64).to_be_bytes());
            }
        }
        if masked {
            let key = [0x37, 0xfa, 0x21, 0x3d];
            f.extend(key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        let _ = self.s.write_all(&f).await;
    }

    async fn frame(&mut self, first: u8, payload: &[u8]) {
        self.frame_with(first, payload, true).await;
    }

    /// One binary message in one frame.
    async fn send(&mut self, payload: &[u8]) {
        self.frame(0x82, payload).await;
    }

    /// The next frame from vizor, as (opcode, payload); `None` once the stream ended.
    async fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((op, payload, n)) = parse_frame(&self.inbuf) {
                self.inbuf.drain(..n);
                return Some((op, payload));
            }
            let mut tmp = vec![0u8; 64 << 10];
            match self.s.read(&mut tmp).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.inbuf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    /// Reads the next binary message into `pending`; a close is a failure.
    async fn more(&mut self) {
        loop {
            match self.next().await {
                Some((2, p)) => {
                    self.pending.extend(p);
                    return;
                }
                Some((8, p)) => panic!("vizor closed: {:?}", closed_of(&p)),
                Some(_) => continue,
                None => panic!("the connection ended"),
            }
        }
    }

    /// Reads messages until `parse` finds its whole message at the start of `pending`,
    /// drains it and returns it (see [`vizor_testkit::until`]); a close is a failure.
    async fn until<T, E: std::fmt::Debug>(
        &mut self,
        parse: impl FnMut(&[u8]) -> Result<Option<(T, usize)>, E>,
    ) -> T {
        // The driver's buffer is `pending`; what arrives goes to it (see the `Source`).
        let mut buf = std::mem::take(&mut self.pending);
        let got = vizor_testkit::until(self, &mut buf, parse).await;
        self.pending = buf;
        match got {
            Ok(t) => t,
            Err(DriveError::Step(e)) => panic!("{e:?}"),
            Err(DriveError::Source(never)) => match never {},
        }
    }

    /// Takes the next `n` bytes of binary data.
    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.pending.len() < n {
            self.more().await;
        }
        self.pending.drain(..n).collect()
    }

    /// Waits (up to 10 s) for vizor's close frame, skipping data; 1006 when the
    /// connection ended without one.
    async fn closed(&mut self) -> Closed {
        let wait = async {
            loop {
                match self.next().await {
                    Some((8, p)) => return closed_of(&p),
                    Some(_) => continue,
                    None => {
                        return Closed {
                            code: 1006,
                            reason: "the connection ended without a close frame".into(),
                        }
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("vizor neither refused nor closed within 10 s")
    }
}

/// The binary data as a byte source for the testkit's driver, one message at a time
/// moved from `pending` to the driver's buffer; a close is a failure.
impl vizor_testkit::Source for Raw {
    type Error = std::convert::Infallible;

    async fn more(&mut self, buf: &mut Vec<u8>) -> Result<(), Self::Error> {
        Raw::more(self).await;
        buf.append(&mut self.pending);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Cases and their expected refusals.
// ---------------------------------------------------------------------------------

/// What a case sends, in order.
enum Step {
    /// One binary WebSocket message (one frame).
    Bin(Vec<u8>),
    /// One frame with this first byte (FIN, RSV1-3, opcode) and payload, masked.
    Frame(u8, Vec<u8>),
    /// Bytes written to the TCP connection as they are.
    Wire(Vec<u8>),
    /// The client shuts its side of the TCP connection (gone mid-message); it still
    /// reads vizor's close frame.
    HalfClose,
}

impl Step {
    async fn apply(&self, r: &mut Raw) {
        match self {
            Step::Bin(b) => r.send(b).await,
            Step::Frame(first, p) => r.frame(*first, p).await,
            Step::Wire(b) => {
                let _ = r.s.write_all(b).await;
            }
            Step::HalfClose => {
                let _ = r.s.shutdown().await;
            }
        }
    }
}

/// An expected close reason: exactly this text, or one holding all these parts.
#[derive(Debug, Clone)]
enum Text {
    Is(String),
    Has(Vec<String>),
}

impl Text {
    fn matches(&self, got: &str) -> bool {
        match self {
            Text::Is(t) => t == got,
            Text::Has(parts) => parts.iter().all(|p| got.contains(p.as_str())),
        }
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Text {
        Text::Is(s.to_owned())
    }
}

impl From<String> for Text {
    fn from(s: String) -> Text {
        Text::Is(s)
    }
}

fn has(parts: &[&str]) -> Text {
    Text::Has(parts.iter().map(|p| (*p).to_owned()).collect())
}

/// The refusal a case must get.
#[derive(Debug, Clone)]
struct Expect {
    /// WebSocket close code.
    code: u16,
    /// Close reason.
    reason: Text,
    /// The `outcome` label of `vizor_sessions_total` the session is counted under.
    outcome: &'static str,
    /// The `protocol_error` record (direction, cause) vizor writes, if it writes one.
    audit: Option<(&'static str, &'static str)>,
}

impl Expect {
    /// 1008 with `reason`, counted under `outcome`, no protocol_error record.
    fn refused(reason: impl Into<Text>, outcome: &'static str) -> Expect {
        Expect {
            code: 1008,
            reason: reason.into(),
            outcome,
            audit: None,
        }
    }

    /// The browser broke RFB: 1008 `browser protocol error: {detail}`, audited with
    /// cause `label`.
    fn browser(label: &'static str, detail: &str) -> Expect {
        Expect {
            code: 1008,
            reason: format!("browser protocol error: {detail}").into(),
            outcome: "protocol_error",
            audit: Some(("browser_to_vm", label)),
        }
    }

    /// The VM broke RFB: 1008 `VM protocol error: {detail}`, audited with cause `label`.
    fn vm(label: &'static str, detail: impl Into<Text>) -> Expect {
        let reason = match detail.into() {
            Text::Is(t) => Text::Is(format!("VM protocol error: {t}")),
            Text::Has(mut parts) => {
                parts.insert(0, "VM protocol error: ".into());
                Text::Has(parts)
            }
        };
        Expect {
            code: 1008,
            reason,
            outcome: "protocol_error",
            audit: Some(("vm_to_browser", label)),
        }
    }

    /// The browser broke SPICE: 1008 `browser SPICE protocol error: {detail}`, audited.
    fn spice(detail: &str) -> Expect {
        Expect {
            code: 1008,
            reason: format!("browser SPICE protocol error: {detail}").into(),
            outcome: "protocol_error",
            audit: Some(("browser_to_vm", "spice")),
        }
    }

    /// The WebSocket itself was broken: 1008 `WebSocket error: {detail}`, not audited.
    fn websocket(detail: &str) -> Expect {
        Expect::refused(format!("WebSocket error: {detail}"), "websocket_error")
    }

    /// The browser left: vizor's close frame says so (the browser may read it after
    /// a half close), nothing is audited.
    fn browser_gone() -> Expect {
        Expect {
            code: 1000,
            reason: "browser closed the connection".into(),
            outcome: "browser_closed",
            audit: None,
        }
    }
}

/// The value of `series` in vizor's metrics now (0 when absent).
async fn metric_now(v: &Vizor, series: &str) -> f64 {
    common::metric(&v.metrics().await, series).unwrap_or(0.0)
}

/// Waits (up to 5 s) until `series` reads `want`.
async fn wait_metric(v: &Vizor, series: &str, want: f64) {
    let mut last = 0.0;
    for _ in 0..500 {
        last = metric_now(v, series).await;
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{series} is {last}, not {want}");
}

/// Waits (up to 10 s) until the audit log holds `n` records of `event`; returns them.
async fn records(v: &Vizor, event: &str, n: usize) -> Vec<serde_json::Value> {
    let mut found = Vec::new();
    for _ in 0..1000 {
        found = v
            .audit_all()
            .into_iter()
            .filter(|r| r["event"] == event)
            .collect();
        if found.len() >= n {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{n} {event} records expected: {found:?}");
}

fn protocol_errors(v: &Vizor) -> Vec<serde_json::Value> {
    v.audit_all()
        .into_iter()
        .filter(|r| r["event"] == "protocol_error")
        .collect()
}

/// Checks the refusals of the cases run against one vizor: close frame, outcome,
/// protocol_error record or none.
struct Checker<'a> {
    v: &'a Vizor,
    /// `vnc` or `spice`.
    kind: &'static str,
    /// protocol_error records expected so far.
    audited: usize,
    /// Reasons of refusals that must have no protocol_error record.
    unaudited: Vec<String>,
}

impl<'a> Checker<'a> {
    fn new(v: &'a Vizor, kind: &'static str) -> Checker<'a> {
        Checker {
            v,
            kind,
            audited: protocol_errors(v).len(),
            unaudited: Vec::new(),
        }
    }

    fn outcome_series(&self, e: &Expect) -> String {
        format!(
            "vizor_sessions_total{{kind=\"{}\",outcome=\"{}\"}}",
            self.kind, e.outcome
        )
    }

    /// The count of `e`'s outcome before the case runs.
    async fn before(&self, e: &Expect) -> f64 {
        metric_now(self.v, &self.outcome_series(e)).await
    }

    /// Checks case `name`'s refusal `closed` against `e`; `before` is from
    /// [`Checker::before`]. Cases must run one at a time.
    async fn check(&mut self, name: &str, e: &Expect, before: f64, closed: &Closed) {
        eprintln!("{name}: {} {:?}", closed.code, closed.reason);
        assert!(
            closed.code == e.code && e.reason.matches(&closed.reason),
            "{name}: expected {} {:?}, got {closed:?}",
            e.code,
            e.reason
        );
        // Counted once the session has ended (after its records were queued).
        wait_metric(self.v, &self.outcome_series(e), before + 1.0).await;
        let Some((direction, cause)) = e.audit else {
            self.unaudited.push(closed.reason.clone());
            return;
        };
        self.audited += 1;
        let mut records = Vec::new();
        for _ in 0..500 {
            records = protocol_errors(self.v);
            if records.len() >= self.audited {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(records.len(), self.audited, "{name}: {records:?}");
        let r = &records[self.audited - 1];
        assert_eq!(
            (r["direction"].as_str(), r["reason"].as_str()),
            (Some(direction), Some(cause)),
            "{name}: {r}"
        );
        // The close reason is the record's detail, cut to what a close frame carries.
        assert!(
            r["detail"]
                .as_str()
                .unwrap()
                .starts_with(closed.reason.as_str()),
            "{name}: {r}"
        );
        let m = self.v.metrics().await;
        let series = format!(
            "vizor_protocol_errors_total{{direction=\"{direction}\",kind=\"{}\",reason=\"{cause}\"}}",
            self.kind
        );
        assert!(
            common::metric(&m, &series).unwrap_or(0.0) >= 1.0,
            "{name}: {series}"
        );
    }

    /// After the cases (and a later record, which flushes those queued before it): the
    /// protocol_error records are exactly the expected ones.
    fn finish(&self) {
        let records = protocol_errors(self.v);
        assert_eq!(records.len(), self.audited, "{records:?}");
        for reason in &self.unaudited {
            assert!(
                !records.iter().any(|r| r["detail"] == reason.as_str()),
                "no protocol_error record for {reason:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------
// The RFB browser leg.
// ---------------------------------------------------------------------------------

/// How far a case's session gets before its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// vizor's ProtocolVersion received; the browser's is the input.
    Version,
    /// Versions agreed and security type None offered; the choice is the input.
    Security,
    /// SecurityResult OK received; ClientInit is the input.
    ClientInit,
    /// ServerInit received: the relay.
    Relay,
}

/// Brings a session to `stage` as noVNC does (RFB 3.8, None, shared).
async fn reach(r: &mut Raw, stage: Stage) -> Option<ServerInit> {
    assert_eq!(r.take(12).await, b"RFB 003.008\n");
    if stage == Stage::Version {
        return None;
    }
    r.send(b"RFB 003.008\n").await;
    assert_eq!(r.take(2).await, [1, 1], "security type None, alone");
    if stage == Stage::Security {
        return None;
    }
    r.send(&[1]).await;
    assert_eq!(r.take(4).await, [0, 0, 0, 0], "SecurityResult OK");
    if stage == Stage::ClientInit {
        return None;
    }
    // Shared, always: an exclusive client would disconnect everyone else on the VM.
    r.send(&[1]).await;
    Some(server_init(r).await)
}

async fn server_init(r: &mut Raw) -> ServerInit {
    r.until(|b| ServerInit::parse(b, &Limits::default())).await
}

/// One bad input on the RFB browser leg.
struct Case {
    name: &'static str,
    stage: Stage,
    input: Vec<Step>,
    expect: Expect,
}

fn case(name: &'static str, stage: Stage, input: Vec<Step>, expect: Expect) -> Case {
    Case {
        name,
        stage,
        input,
        expect,
    }
}

async fn vnc_raw(v: &Vizor, domain: &str) -> Raw {
    let token = v.token(domain, ConsoleKind::Vnc, 60);
    Raw::open(v.addr, &format!("/websockify?token={token}")).await
}

/// Runs `cases` one at a time, each on a fresh session to `domain`.
async fn run_cases(v: &Vizor, checker: &mut Checker<'_>, domain: &str, cases: &[Case]) {
    for c in cases {
        let before = checker.before(&c.expect).await;
        let mut r = vnc_raw(v, domain).await;
        reach(&mut r, c.stage).await;
        for step in &c.input {
            step.apply(&mut r).await;
        }
        let closed = r.closed().await;
        checker.check(c.name, &c.expect, before, &closed).await;
    }
}

/// A message's wire bytes.
fn m(message: ClientMessage<'_>) -> Vec<u8> {
    msg(message)
}

fn set_encodings(list: &[Encoding]) -> Vec<u8> {
    let mut out = Vec::new();
    write_set_encodings(list.iter().copied(), &mut out);
    out
}

fn request(x: u16, y: u16, width: u16, height: u16) -> Vec<u8> {
    m(ClientMessage::FramebufferUpdateRequest {
        incremental: false,
        x,
        y,
        width,
        height,
    })
}

fn key(down: bool, keysym: u32) -> Vec<u8> {
    m(ClientMessage::KeyEvent { down, keysym })
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// SetPixelFormat with `pf`'s wire bytes, `edit`ed.
fn set_pixel_format(edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut pf = Vec::new();
    PixelFormat::RGB888.write(&mut pf);
    edit(&mut pf);
    cat(&[&[0, 0, 0, 0], &pf])
}

/// An extended clipboard ClientCutText (negative length) with `flags` and `data`.
fn extended_cut_text(flags: u32, data: &[u8]) -> Vec<u8> {
    m(ClientMessage::ClientCutText(CutText::Extended {
        flags,
        data,
    }))
}

fn deflate(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(data).unwrap();
    z.finish().unwrap()
}

/// An extended clipboard provide of UTF-8 text `text` (as noVNC: size, text, NUL).
fn provide_text(text: &[u8]) -> Vec<u8> {
    let mut plain = ((text.len() + 1) as u32).to_be_bytes().to_vec();
    plain.extend_from_slice(text);
    plain.push(0);
    extended_cut_text(clipboard::PROVIDE | clipboard::TEXT, &deflate(&plain))
}

/// Waits (up to 5 s) for an audit record `pick` finds.
async fn wait_record(
    v: &Vizor,
    what: &str,
    pick: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    for _ in 0..500 {
        if let Some(r) = v.audit_all().into_iter().find(&pick) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no {what} record: {:?}", v.audit_all());
}

/// Refusals of `reason` counted in the audit log: per interval, one detailed `event`
/// record, and a `refusal_summary` (counting that one too) when there were more.
/// Waits up to 5 s for `want` (the last interval is summed up when it ends).
async fn refusals_counted(v: &Vizor, event: &str, reason: &str, want: u64) -> u64 {
    let mut got = 0;
    for _ in 0..50 {
        let audit = v.audit_all();
        let detailed = audit
            .iter()
            .filter(|r| r["event"] == event && r["reason"] == reason)
            .count() as u64;
        let summaries: Vec<u64> = audit
            .iter()
            .filter(|r| r["event"] == "refusal_summary")
            .filter_map(|r| r["reasons"][reason].as_u64())
            .collect();
        got = summaries.iter().sum::<u64>() + detailed - summaries.len() as u64;
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    got
}

/// The live test domain's name.
fn live() -> String {
    common::live_domain().name
}

/// The bound the message cases run under: small, so that oversized input is cheap.
const LIMITS_64K: &str = "[limits]\nbrowser_message_max = \"64KiB\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn rfb_handshake_refusals() {
    let domain = live();
    let v = Vizor::start("handshake_timeout = \"2s\"");
    let d = domain.as_str();
    // Control bytes and invalid UTF-8 in a version reach the reason escaped.
    let hostile = *b"\x1b[2J\0RFB\r\n\xff\xfe";
    let cases = [
        case(
            "ProtocolVersion is an HTTP request line",
            Stage::Version,
            vec![Step::Bin(b"GET / HTTP/1.1\r\n".to_vec())],
            Expect::browser(
                "malformed_version",
                "malformed RFB protocol version message \"GET / HTTP/1\"",
            ),
        ),
        case(
            "ProtocolVersion with escape sequences, NUL and invalid UTF-8",
            Stage::Version,
            vec![Step::Bin(hostile.to_vec())],
            Expect::browser(
                "malformed_version",
                &format!(
                    "malformed RFB protocol version message {:?}",
                    String::from_utf8_lossy(&hostile)
                ),
            ),
        ),
        case(
            "ProtocolVersion with a letter for a digit",
            Stage::Version,
            vec![Step::Bin(b"RFB 003.00a\n".to_vec())],
            Expect::browser(
                "malformed_version",
                "malformed RFB protocol version message \"RFB 003.00a\\n\"",
            ),
        ),
        case(
            "ProtocolVersion 4.0",
            Stage::Version,
            vec![Step::Bin(b"RFB 004.000\n".to_vec())],
            Expect::browser(
                "unsupported_version",
                "unsupported RFB protocol version 4.0",
            ),
        ),
        case(
            "ProtocolVersion 3.889 (above the 3.8 offered)",
            Stage::Version,
            vec![Step::Bin(b"RFB 003.889\n".to_vec())],
            Expect::browser(
                "unsupported_version",
                "unsupported RFB protocol version 3.889",
            ),
        ),
        case(
            "ProtocolVersion 3.2 (before 3.3)",
            Stage::Version,
            vec![Step::Bin(b"RFB 003.002\n".to_vec())],
            Expect::browser(
                "unsupported_version",
                "unsupported RFB protocol version 3.2",
            ),
        ),
        case(
            "ProtocolVersion cut short, then the browser leaves",
            Stage::Version,
            vec![Step::Bin(b"RFB 003".to_vec()), Step::HalfClose],
            Expect::browser_gone(),
        ),
        case(
            "ProtocolVersion in a text WebSocket frame",
            Stage::Version,
            vec![Step::Frame(0x81, b"RFB 003.008\n".to_vec())],
            Expect::refused(
                "text WebSocket messages are not RFB; use binary",
                "websocket_text",
            ),
        ),
        case(
            "security type VNC authentication, not offered",
            Stage::Security,
            vec![Step::Bin(vec![2])],
            Expect::browser(
                "security_type_not_offered",
                "security type 2 was chosen but not offered",
            ),
        ),
        case(
            "security type 0 (invalid)",
            Stage::Security,
            vec![Step::Bin(vec![0])],
            Expect::browser(
                "security_type_not_offered",
                "security type 0 was chosen but not offered",
            ),
        ),
        case(
            "security type VeNCrypt, not offered",
            Stage::Security,
            vec![Step::Bin(vec![19])],
            Expect::browser(
                "security_type_not_offered",
                "security type 19 was chosen but not offered",
            ),
        ),
        case(
            "no security type chosen: the browser leaves",
            Stage::Security,
            vec![Step::HalfClose],
            Expect::browser_gone(),
        ),
        case(
            "no ClientInit: the browser leaves",
            Stage::ClientInit,
            vec![Step::HalfClose],
            Expect::browser_gone(),
        ),
        // Refused, and counted as a protocol error, but written as no protocol_error
        // record (vizor ends it with End::refused(.., "protocol_error")).
        case(
            "ClientInit with messages behind it, before ServerInit",
            Stage::ClientInit,
            vec![Step::Bin(cat(&[&[1], &request(0, 0, 1, 1)]))],
            Expect::browser("early_message", "messages sent before ServerInit"),
        ),
    ];
    // Cut-short handshakes that then go silent end at the handshake timeout: they run
    // beside the table.
    let stalls = async {
        let timeout = Expect::refused("handshake did not complete within 2s", "handshake_timeout");
        let mut sessions = Vec::new();
        for (stage, input) in [
            (Stage::Version, b"RFB 003.0".to_vec()),
            (Stage::ClientInit, Vec::new()),
        ] {
            let mut r = vnc_raw(&v, d).await;
            reach(&mut r, stage).await;
            if !input.is_empty() {
                r.send(&input).await;
            }
            sessions.push(r);
        }
        for mut r in sessions {
            let closed = r.closed().await;
            assert!(
                closed.code == timeout.code && timeout.reason.matches(&closed.reason),
                "a stalled handshake: {closed:?}"
            );
        }
    };
    let mut checker = Checker::new(&v, "vnc");
    let table = run_cases(&v, &mut checker, d, &cases);
    tokio::join!(table, stalls);
    wait_metric(
        &v,
        "vizor_sessions_total{kind=\"vnc\",outcome=\"handshake_timeout\"}",
        2.0,
    )
    .await;

    // Positive controls: older versions, and a version split over three WebSocket
    // messages (reassembled, not refused), are served to ServerInit.
    for (version, split) in [
        (&b"RFB 003.008\n"[..], true),
        (b"RFB 003.007\n", false),
        (b"RFB 003.003\n", false),
        (b"RFB 003.005\n", false),
    ] {
        let mut r = vnc_raw(&v, d).await;
        assert_eq!(r.take(12).await, b"RFB 003.008\n");
        if split {
            for part in [&version[..5], &version[5..9], &version[9..]] {
                r.send(part).await;
            }
        } else {
            r.send(version).await;
        }
        if version == b"RFB 003.003\n" || version == b"RFB 003.005\n" {
            // 3.3: the server picks the type (None); no SecurityResult follows None.
            assert_eq!(r.take(4).await, [0, 0, 0, 1]);
        } else {
            assert_eq!(r.take(2).await, [1, 1]);
            r.send(&[1]).await;
            if version == b"RFB 003.008\n" {
                assert_eq!(r.take(4).await, [0, 0, 0, 0]);
            }
        }
        r.send(&[1]).await;
        let si = server_init(&mut r).await;
        assert!(si.width > 0 && si.height > 0, "{version:?}: {si:?}");
    }
    still_serving(&v, d).await;
    checker.finish();
}

/// The session on `r` still relays (an update comes back for a request); once it is
/// gone, vizor still serves a good session.
async fn relays_then_serves(mut r: Raw, v: &Vizor, domain: &str) {
    r.send(&request(0, 0, 1, 1)).await;
    r.more().await;
    drop(r);
    still_serving(v, domain).await;
}

/// vizor still serves a whole session (and so did not crash), and holds no session
/// of the refused ones.
async fn still_serving(v: &Vizor, domain: &str) {
    let (mut b, si) = open_session(v, domain).await;
    let (pixels, frame) = full_update(&mut b, &si).await;
    assert_eq!(pixels, frame, "a complete frame");
    wait_metric(v, "vizor_sessions_active{kind=\"vnc\"}", 1.0).await;
    drop(b);
    records(v, "session_end", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn rfb_message_refusals() {
    let domain = live();
    let v = Vizor::start_full("", "clipboard = \"content\"", LIMITS_64K, |_| {});
    let d = domain.as_str();
    let ext_clip = set_encodings(&[Encoding::RAW, Encoding::EXTENDED_CLIPBOARD]);
    // 17 MiB of zeros deflate to some 17 KiB: within the message bound, beyond the
    // 16 MiB vizor inflates.
    let mut bomb = ((17u32 << 20) + 1).to_be_bytes().to_vec();
    bomb.resize(4 + (17 << 20), 0);
    let bomb = extended_cut_text(clipboard::PROVIDE | clipboard::TEXT, &deflate(&bomb));
    assert!(bomb.len() < 60 << 10, "{}", bomb.len());
    let r = Stage::Relay;
    let cases = [
        case(
            "unknown message type 1 (FixColourMapEntries, obsolete)",
            r,
            vec![Step::Bin(vec![1, 0, 0, 0, 0, 0])],
            Expect::browser("unknown_message_type", "unknown message type 1"),
        ),
        case(
            "unknown message type 7 (file transfer)",
            r,
            vec![Step::Bin(vec![7, 0, 0, 0])],
            Expect::browser("unknown_message_type", "unknown message type 7"),
        ),
        case(
            "unknown message type 0xEE",
            r,
            vec![Step::Bin(vec![0xee, 0, 0, 0])],
            Expect::browser("unknown_message_type", "unknown message type 238"),
        ),
        case(
            "QEMU message 0xFF with unknown sub-type 0xFF",
            r,
            vec![Step::Bin(vec![0xff, 0xff, 0, 0])],
            Expect::browser(
                "unknown_qemu_submessage",
                "unknown QEMU sub-message type 255",
            ),
        ),
        case(
            "QEMU audio with unknown operation 7",
            r,
            vec![Step::Bin(vec![0xff, 1, 0, 7])],
            Expect::browser(
                "unknown_qemu_audio_operation",
                "unknown QEMU audio operation 7",
            ),
        ),
        case(
            "ClientCutText with a lying 4 GiB length",
            r,
            vec![Step::Bin(vec![6, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])],
            Expect::browser(
                "length_too_large",
                "ClientCutText of 4294967303 bytes exceeds the limit of 65536 bytes",
            ),
        ),
        case(
            "ClientCutText announcing 100 KiB, sending 5 bytes",
            r,
            vec![Step::Bin(cat(&[
                &[6, 0, 0, 0],
                &(100u32 << 10).to_be_bytes(),
                b"hello",
            ]))],
            Expect::browser(
                "length_too_large",
                "ClientCutText of 102408 bytes exceeds the limit of 65536 bytes",
            ),
        ),
        case(
            "extended clipboard (negative length) never negotiated",
            r,
            vec![Step::Bin(extended_cut_text(clipboard::CAPS | clipboard::TEXT, &[]))],
            Expect::browser(
                "length_too_large",
                "ClientCutText of 4294967300 bytes exceeds the limit of 65536 bytes",
            ),
        ),
        case(
            "extended clipboard shorter than its flags",
            r,
            vec![Step::Bin(cat(&[&ext_clip, &[6, 0, 0, 0, 0xff, 0xff, 0xff, 0xfe]]))],
            Expect::browser(
                "malformed",
                "malformed ClientCutText: extended clipboard message shorter than its flags",
            ),
        ),
        case(
            "extended clipboard provide that is not zlib",
            r,
            vec![Step::Bin(cat(&[
                &ext_clip,
                &extended_cut_text(clipboard::PROVIDE | clipboard::TEXT, b"not zlib at all"),
            ]))],
            Expect::browser(
                "malformed",
                "malformed extended clipboard provide: not a zlib stream",
            ),
        ),
        case(
            "extended clipboard provide inflating beyond 16 MiB (a zip bomb)",
            r,
            vec![Step::Bin(cat(&[&ext_clip, &bomb]))],
            Expect {
                code: 1008,
                reason: has(&[
                    "browser protocol error: extended clipboard contents of ",
                    " bytes exceeds the limit of 16777216 bytes",
                ]),
                outcome: "protocol_error",
                audit: Some(("browser_to_vm", "length_too_large")),
            },
        ),
        case(
            "extended clipboard provide whose text size lies",
            r,
            vec![Step::Bin(cat(&[
                &ext_clip,
                &extended_cut_text(
                    clipboard::PROVIDE | clipboard::TEXT,
                    &deflate(&cat(&[&1000u32.to_be_bytes(), b"hi\0"])),
                ),
            ]))],
            Expect::browser(
                "malformed",
                "malformed extended clipboard provide: a format's size exceeds the data",
            ),
        ),
        case(
            "SetEncodings with an absurd count (65535)",
            r,
            vec![Step::Bin(vec![2, 0, 0xff, 0xff, 0, 0, 0, 0])],
            Expect::browser(
                "length_too_large",
                "SetEncodings of 262144 bytes exceeds the limit of 65536 bytes",
            ),
        ),
        case(
            "SetPixelFormat of 24 bits per pixel",
            r,
            vec![Step::Bin(set_pixel_format(|pf| pf[0] = 24))],
            Expect::browser(
                "invalid_pixel_format",
                "invalid pixel format: bits-per-pixel must be 8, 16 or 32",
            ),
        ),
        case(
            "SetPixelFormat with a colour maximum not 2^n - 1",
            r,
            vec![Step::Bin(set_pixel_format(|pf| pf[5] = 100))],
            Expect::browser(
                "invalid_pixel_format",
                "invalid pixel format: colour maximum is not 2^n - 1",
            ),
        ),
        case(
            "SetPixelFormat after the first update request",
            r,
            vec![Step::Bin(cat(&[
                &request(0, 0, 1, 1),
                &set_pixel_format(|_| {}),
            ]))],
            Expect::refused(
                "changing the pixel format after the first update request is not supported",
                "pixel_format_change",
            ),
        ),
        case(
            // (The 64-byte bound of a negotiated fence is the codec's unit test: QEMU
            // never confirms fences.)
            "ClientFence with a 65-byte payload, never negotiated",
            r,
            vec![Step::Bin(cat(&[&[248, 0, 0, 0, 0, 0, 0, 0, 65], &[0; 65]]))],
            Expect::browser(
                "not_negotiated",
                "ClientFence received, but its extension was never negotiated",
            ),
        ),
        case(
            "PointerEvent with the extended-button marker before the server confirmed",
            r,
            vec![Step::Bin(cat(&[
                &set_encodings(&[Encoding::RAW, Encoding::EXTENDED_MOUSE_BUTTONS]),
                &[5, 0x80, 0, 1, 0, 1],
            ]))],
            Expect::browser(
                "malformed",
                "malformed PointerEvent: extended button marker before the server confirmed extended mouse buttons",
            ),
        ),
        case(
            "a KeyEvent cut short, then the browser leaves",
            r,
            vec![Step::Bin(vec![4, 1, 0]), Step::HalfClose],
            Expect::browser_gone(),
        ),
        case(
            "a KeyEvent in a text WebSocket frame",
            r,
            vec![Step::Frame(0x81, key(true, 0x61))],
            Expect::refused(
                "text WebSocket messages are not RFB; use binary",
                "websocket_text",
            ),
        ),
    ];
    let mut checker = Checker::new(&v, "vnc");
    run_cases(&v, &mut checker, d, &cases).await;

    // Positive controls: what looks odd but is RFB is relayed and audited.
    // A KeyEvent and a ClientCutText split over several WebSocket messages.
    let mut r = vnc_raw(&v, d).await;
    reach(&mut r, Stage::Relay).await;
    let k = key(true, 0x71);
    for part in [&k[..1], &k[1..5], &k[5..]] {
        r.send(part).await;
    }
    let clip = m(ClientMessage::ClientCutText(CutText::Latin1(b"split-clip")));
    r.send(&clip[..6]).await;
    r.send(&clip[6..]).await;
    // Latin-1 text with bytes above 0x7F (every byte is Latin-1: nothing to refuse).
    r.send(&m(ClientMessage::ClientCutText(CutText::Latin1(
        b"caf\xe9 \x80\xff",
    ))))
    .await;
    // SetDesktopSize without ExtendedDesktopSize offered: dropped. Relayed, QEMU would
    // answer it with an ExtendedDesktopSize rectangle, which vizor refuses unoffered:
    // the update round trip below would fail.
    r.send(&[251, 0, 0, 100, 0, 100, 0, 0]).await;
    // An update request far beyond the framebuffer: relayed, QEMU clips it.
    r.send(&request(60000, 60000, 65535, 65535)).await;
    wait_record(&v, "split key", |r| r["event"] == "key" && r["key"] == "q").await;
    wait_record(&v, "split clipboard", |r| {
        r["event"] == "clipboard" && r["content"] == "split-clip"
    })
    .await;
    let latin1 = wait_record(&v, "Latin-1 clipboard", |r| {
        r["event"] == "clipboard" && r["length"] == 7
    })
    .await;
    assert_eq!(latin1["content"], "caf\u{e9} \u{80}\u{ff}");
    // Invalid UTF-8 in an extended clipboard text: relayed as it is; the audit keeps
    // the digest of the bytes, and the content with U+FFFD for what is not UTF-8.
    let bad_utf8 = b"bad \xff\xfe utf8";
    r.send(&cat(&[&ext_clip, &provide_text(bad_utf8)])).await;
    let record = wait_record(&v, "invalid UTF-8 clipboard", |r| {
        r["event"] == "clipboard" && r["length"] == bad_utf8.len()
    })
    .await;
    use sha2::Digest;
    let digest: String = sha2::Sha256::digest(bad_utf8)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(record["sha256"], digest.as_str());
    assert_eq!(record["content"], "bad \u{fffd}\u{fffd} utf8");
    assert_eq!(record["format"], "text");
    // The session still relays: an update comes back for a request.
    relays_then_serves(r, &v, d).await;
    checker.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn websocket_frame_refusals() {
    let domain = live();
    let v = Vizor::start_with("", LIMITS_64K, |_| {});
    let d = domain.as_str();
    let r = Stage::Relay;
    let k = key(true, 0x61);
    let cases = [
        case(
            "a binary frame beyond browser_message_max",
            r,
            vec![Step::Bin(vec![0; 70 << 10])],
            Expect::websocket("Frame too large"),
        ),
        case(
            "a frame header announcing 2^63 bytes",
            r,
            vec![Step::Wire(cat(&[
                &[0x82, 0x80 | 127],
                &(1u64 << 63).to_be_bytes(),
                &[1, 2, 3, 4],
            ]))],
            Expect::websocket("Frame too large"),
        ),
        case(
            "a text frame of invalid UTF-8",
            r,
            vec![Step::Frame(0x81, vec![0xff, 0xfe, 0xfd])],
            Expect::websocket("Invalid UTF-8"),
        ),
        case(
            "reserved bit RSV1 set (no extension was negotiated)",
            r,
            vec![Step::Frame(0xc2, k.clone())],
            Expect::websocket("Reserved bits are not zero"),
        ),
        case(
            "unknown opcode 3",
            r,
            vec![Step::Frame(0x83, k.clone())],
            Expect::websocket("Invalid value"),
        ),
        case(
            "a continuation frame with nothing to continue",
            r,
            vec![Step::Frame(0x80, k.clone())],
            Expect::websocket("Invalid continuation frame"),
        ),
        case(
            "a new message inside a fragmented one",
            r,
            vec![
                Step::Frame(0x02, k[..4].to_vec()),
                Step::Frame(0x82, k[4..].to_vec()),
            ],
            Expect::websocket("Invalid fragment"),
        ),
        case(
            "a fragmented ping",
            r,
            vec![Step::Frame(0x09, b"x".to_vec())],
            Expect::websocket("Control frame must not be fragmented"),
        ),
        case(
            "a ping of 126 bytes",
            r,
            vec![Step::Frame(0x89, vec![0; 126])],
            Expect::websocket("Ping frame too large"),
        ),
        case(
            "a close frame of one byte",
            r,
            vec![Step::Frame(0x88, vec![3])],
            Expect::websocket("Invalid close frame"),
        ),
        case(
            "a close frame whose reason is invalid UTF-8",
            r,
            vec![Step::Frame(0x88, vec![0x03, 0xe8, 0xff, 0xfe])],
            Expect::websocket("Invalid UTF-8"),
        ),
        // fastwebsockets answers a forbidden close code itself with 1002 (echoing the
        // reason) before vizor's own close.
        case(
            "a close frame with code 1005 (never sent on the wire)",
            r,
            vec![Step::Frame(0x88, vec![0x03, 0xed])],
            Expect {
                code: 1002,
                reason: "".into(),
                outcome: "websocket_error",
                audit: None,
            },
        ),
    ];
    let mut checker = Checker::new(&v, "vnc");
    run_cases(&v, &mut checker, d, &cases).await;

    // Positive control: two KeyEvents in one message fragmented over three frames,
    // the cut inside the first event, a ping between fragments (control frames may
    // interleave): reassembled and relayed.
    let mut r = vnc_raw(&v, d).await;
    reach(&mut r, Stage::Relay).await;
    let keys = cat(&[&key(true, 0x77), &key(false, 0x77)]);
    r.frame(0x02, &keys[..3]).await;
    r.frame(0x89, b"between").await;
    r.frame(0x00, &keys[3..11]).await;
    r.frame(0x80, &keys[11..]).await;
    let pong = loop {
        match r.next().await {
            Some((0x0a, p)) => break p,
            Some((8, p)) => panic!("closed: {:?}", closed_of(&p)),
            Some(_) => continue,
            None => panic!("the connection ended"),
        }
    };
    assert_eq!(pong, b"between");
    wait_record(&v, "fragmented key", |r| {
        r["event"] == "key" && r["key"] == "w" && r["down"] == false
    })
    .await;
    relays_then_serves(r, &v, d).await;
    checker.finish();
}

/// fastwebsockets bounds each frame by `browser_message_max`, but its fragment
/// collector appended continuation frames without any bound: a browser holding a valid
/// token could make vizor buffer an endless message. vizor puts fragments together
/// itself, bounded as a whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_fragmented_message_beyond_browser_message_max_is_refused() {
    let domain = live();
    let v = Vizor::start_with("", LIMITS_64K, |_| {});
    let mut r = vnc_raw(&v, &domain).await;
    reach(&mut r, Stage::Relay).await;
    let rss_before = v.rss_kib();
    // 64 MiB in frames of 32 KiB, each well within the bound, never finished.
    let chunk = vec![0u8; 32 << 10];
    r.frame(0x02, &chunk).await;
    for _ in 1..2048 {
        r.frame(0x00, &chunk).await;
    }
    let refused = tokio::time::timeout(Duration::from_secs(3), r.closed()).await;
    let grew = v.rss_kib().saturating_sub(rss_before);
    let closed = refused.unwrap_or_else(|_| {
        panic!("64 MiB of fragments taken without a refusal; vizor grew by {grew} KiB")
    });
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (1008, "WebSocket error: Frame too large")
    );
    assert!(grew < 8 << 10, "vizor grew by {grew} KiB");
}

/// RFC 6455 section 5.1: a server MUST close the connection on an unmasked frame from
/// a client (fastwebsockets alone takes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn an_unmasked_client_frame_is_refused() {
    let domain = live();
    let v = Vizor::start("");
    let mut r = vnc_raw(&v, &domain).await;
    reach(&mut r, Stage::Relay).await;
    r.frame_with(0x82, &request(0, 0, 1, 1), false).await;
    match tokio::time::timeout(Duration::from_secs(3), r.next()).await {
        Ok(Some((8, p))) => {
            let c = closed_of(&p);
            assert_eq!(
                (c.code, c.reason.as_str()),
                (1008, "WebSocket error: unmasked frame from the browser")
            );
        }
        Ok(Some((2, _))) => panic!("the unmasked update request was relayed: QEMU answered it"),
        other => panic!("{other:?}"),
    }
}

/// ClientFence, EnableContinuousUpdates and xvp are valid only once the server
/// confirmed their extension (a ServerFence, EndOfContinuousUpdates, an xvp init); QEMU
/// confirms none and hangs up on them, so vizor refuses them as a browser protocol
/// error instead of passing them on (and an xvp power request is never unaudited).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn unnegotiated_client_messages_are_refused() {
    let domain = live();
    let v = Vizor::start("");
    for (name, bytes) in [
        ("ClientFence", vec![248u8, 0, 0, 0, 0, 0, 0, 0, 0]),
        (
            "EnableContinuousUpdates",
            vec![150, 1, 0, 0, 0, 0, 0, 1, 0, 1],
        ),
        ("xvp reset", vec![250, 0, 1, 4]),
    ] {
        let mut r = vnc_raw(&v, &domain).await;
        reach(&mut r, Stage::Relay).await;
        r.send(&bytes).await;
        let closed = r.closed().await;
        assert!(
            closed.code == 1008 && closed.reason.contains("never negotiated"),
            "{name}: {closed:?}"
        );
    }
}

/// vizor passed the browser's ClientInit shared flag on to QEMU, whose default share
/// policy (allow-exclusive) then disconnects every other client of the VM: one token
/// holder ended every other console session of that VM. vizor now always asks QEMU
/// for a shared session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn an_exclusive_client_init_does_not_disconnect_other_sessions() {
    live();
    // A domain of its own: this disconnects everyone on it.
    common::test_host(&[
        "domain",
        "vizor-test-badx",
        "--vnc-passwd",
        "badx-pw1",
        "--no-spice",
    ]);
    let v = Vizor::start("");
    let (mut other, si) = open_session(&v, "vizor-test-badx").await;
    let mut r = vnc_raw(&v, "vizor-test-badx").await;
    reach(&mut r, Stage::ClientInit).await;
    r.send(&[0]).await; // not shared
    server_init(&mut r).await;
    let gone = tokio::time::timeout(Duration::from_secs(2), other.closed()).await;
    assert!(gone.is_err(), "the other session was closed: {gone:?}");
    full_update(&mut other, &si).await;
}

// ---------------------------------------------------------------------------------
// HTTP.
// ---------------------------------------------------------------------------------

/// Sends `req` as it is and reads the answer to its end (or the connection's):
/// status (0 for none), head, body.
async fn http_raw(addr: SocketAddr, req: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(req).await;
    let mut resp = Vec::new();
    // To the end of the connection, or of a response with a Content-Length (a
    // refused upgrade may keep its connection alive).
    let whole = |resp: &[u8]| {
        let end = find(resp, b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&resp[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))?
            .trim()
            .parse()
            .ok()?;
        (resp.len() >= end + len).then_some(())
    };
    let read = async {
        let mut tmp = [0u8; 4096];
        while whole(&resp).is_none() {
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => break,
                Ok(n) => resp.extend_from_slice(&tmp[..n]),
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .is_err()
    {
        return (
            0,
            "neither answered nor closed within 5 s".into(),
            String::new(),
        );
    }
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

/// A request for `target` with `headers` (CRLF-terminated lines) and
/// `Connection: close` unless the headers say otherwise.
fn request_bytes(method: &str, target: &[u8], headers: &[u8]) -> Vec<u8> {
    let mut req = method.as_bytes().to_vec();
    req.push(b' ');
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: vizor\r\n");
    req.extend_from_slice(headers);
    if find(headers, b"Connection:").is_none() {
        req.extend_from_slice(b"Connection: close\r\n");
    }
    req.extend_from_slice(b"\r\n");
    req
}

const UPGRADE: &[u8] = b"Upgrade: websocket\r\nConnection: Upgrade\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn http_refusals() {
    let domain = live();
    let v = Vizor::start_full(
        "",
        "refusal_summary_interval = \"1s\"",
        "[limits]\nfailed_tokens_per_client = 1000\n",
        |_| {},
    );
    let upgrade_with = |extra: &[u8]| cat(&[UPGRADE, extra]);
    let key_line = format!("Sec-WebSocket-Key: {WS_KEY}\r\n");
    let key_line = key_line.as_bytes();
    let full_upgrade = upgrade_with(&cat(&[key_line, b"Sec-WebSocket-Version: 13\r\n"]));
    // Just beyond the 32 KiB a request head may take.
    let big_header = cat(&[b"X-Big: ", &vec![b'a'; 33 << 10], b"\r\n"]);
    let long_token = |n: usize| format!("/websockify?token={}", "A".repeat(n));
    // (case, request, status, body)
    let cases: Vec<(&str, Vec<u8>, u16, Text)> = vec![
        (
            "/websockify without an upgrade",
            request_bytes("GET", b"/websockify?token=x", b""),
            400,
            "this endpoint needs a WebSocket upgrade\n".into(),
        ),
        (
            "an upgrade without Sec-WebSocket-Key",
            request_bytes(
                "GET",
                b"/websockify?token=x",
                &upgrade_with(b"Sec-WebSocket-Version: 13\r\n"),
            ),
            400,
            "bad WebSocket upgrade: Sec-WebSocket-Key header is missing\n".into(),
        ),
        // RFC 6455 4.4: 426 with the version vizor speaks (checked below).
        (
            "an upgrade with Sec-WebSocket-Version 8",
            request_bytes(
                "GET",
                b"/websockify?token=x",
                &upgrade_with(&cat(&[key_line, b"Sec-WebSocket-Version: 8\r\n"])),
            ),
            426,
            "bad WebSocket upgrade: Sec-WebSocket-Version must be 13\n".into(),
        ),
        (
            "an upgrade without Sec-WebSocket-Version",
            request_bytes("GET", b"/websockify?token=x", &upgrade_with(key_line)),
            426,
            "bad WebSocket upgrade: Sec-WebSocket-Version must be 13\n".into(),
        ),
        (
            "an upgrade by POST",
            request_bytes("POST", b"/websockify?token=x", &full_upgrade),
            405,
            "only GET is served\n".into(),
        ),
        (
            "a request head beyond 32 KiB",
            request_bytes("GET", b"/websockify?token=x", &big_header),
            431,
            "".into(),
        ),
        (
            "more than 100 header lines",
            request_bytes(
                "GET",
                b"/healthz",
                &(0..101)
                    .flat_map(|i| format!("X-H{i}: x\r\n").into_bytes())
                    .collect::<Vec<u8>>(),
            ),
            431,
            "".into(),
        ),
        (
            "a token beyond the 32 KiB head",
            request_bytes("GET", long_token(40 << 10).as_bytes(), &full_upgrade),
            431,
            "".into(),
        ),
        (
            "a raw 0xFF byte in the request target",
            request_bytes("GET", b"/websockify?token=\xff\xfe", &full_upgrade),
            400,
            "".into(),
        ),
        (
            "a NUL byte in a header value",
            request_bytes("GET", b"/healthz", b"X-Nul: a\0b\r\n"),
            400,
            "".into(),
        ),
        (
            "a header line without a colon",
            request_bytes("GET", b"/healthz", b"no colon here\r\n"),
            400,
            "".into(),
        ),
        (
            "an RFB ProtocolVersion instead of HTTP",
            b"RFB 003.008\n".to_vec(),
            400,
            "".into(),
        ),
        (
            "a TLS ClientHello on the plain port",
            vec![
                0x16, 0x03, 0x01, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x2b, 0x03, 0x03,
            ],
            400,
            "".into(),
        ),
        (
            "an Origin of invalid UTF-8",
            request_bytes(
                "GET",
                b"/websockify?token=x",
                &cat(&[&full_upgrade, b"Origin: http://\xff\xfe\r\n"]),
            ),
            403,
            "this page's origin may not open consoles here\n".into(),
        ),
        (
            "the console page for a token of invalid UTF-8",
            request_bytes("GET", b"/console?token=%FF%FE", b""),
            403,
            has(&["<h1>This console link is not valid</h1>"]),
        ),
    ];
    for (name, req, status, body) in &cases {
        let (got, head, got_body) = http_raw(v.addr, req).await;
        assert_eq!(got, *status, "{name}: {head}");
        assert!(body.matches(&got_body), "{name}: {got_body:?}");
        if got == 426 {
            assert!(
                head.to_ascii_lowercase()
                    .contains("sec-websocket-version: 13\r\n"),
                "{name}: {head}"
            );
        }
    }
    let origin = wait_record(&v, "origin_refused", |r| r["event"] == "origin_refused").await;
    assert_eq!(origin["origin"], "http://\u{fffd}\u{fffd}");

    // Tokens that cannot be: the upgrade succeeds, the token is refused and audited.
    let tokens = [
        (
            "a token of invalid UTF-8 (percent-encoded)",
            "%FF%FE%FD".to_owned(),
        ),
        ("a token with invalid percent escapes", "%ZZ%G1".to_owned()),
        ("a token with a NUL", "abc%00def".to_owned()),
        (
            "a token of 5000 characters (the limit is 4096)",
            "A".repeat(5000),
        ),
        (
            "a token of 30000 characters (the head is still under 32 KiB)",
            "A".repeat(30000),
        ),
    ];
    for (name, token) in &tokens {
        let mut r = Raw::open(v.addr, &format!("/websockify?token={token}")).await;
        let closed = r.closed().await;
        assert_eq!(
            (closed.code, closed.reason.as_str()),
            (1008, "invalid token"),
            "{name}"
        );
    }
    // The console page's refusal, then the WebSockets': all from one client for one
    // reason, so one detailed record, and every one counted in the interval's summary.
    let refused = records(&v, "token_refused", 1).await;
    assert_eq!(refused[0]["reason"], "malformed");
    assert_eq!(
        refusals_counted(&v, "token_refused", "malformed", 1 + tokens.len() as u64).await,
        1 + tokens.len() as u64
    );

    // Still serving.
    assert_eq!(common::http_get(v.addr, "/healthz", &[]).await.0, 200);
    still_serving(&v, &domain).await;
}

// ---------------------------------------------------------------------------------
// SPICE.
// ---------------------------------------------------------------------------------

/// A SPICE link header ("REDQ", version, size) and `body`.
fn link_bytes(major: u32, minor: u32, size: u32, body: &[u8]) -> Vec<u8> {
    cat(&[
        b"REDQ",
        &major.to_le_bytes(),
        &minor.to_le_bytes(),
        &size.to_le_bytes(),
        body,
    ])
}

/// A SpiceLinkMess body: connection id, channel type and id, capability counts and
/// their offset (no capability words follow).
fn link_body(connection_id: u32, channel: u8, n_common: u32, offset: u32) -> Vec<u8> {
    cat(&[
        &connection_id.to_le_bytes(),
        &[channel, 0],
        &n_common.to_le_bytes(),
        &0u32.to_le_bytes(),
        &offset.to_le_bytes(),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn spice_refusals() {
    use vizor_spice::channel::{write_message, HeaderKind};
    use vizor_spice::link::{channel_type, link_error, Caps, LinkMess, LinkReply};
    live();
    let dom = common::spice::domain("vizor-test-badsp");
    let v = Vizor::start("handshake_timeout = \"2s\"");
    let good_main = link_body(0, channel_type::MAIN, 0, 18);
    // (case, the browser's first message, refusal)
    let cases = [
        (
            "bad link magic (an RFB ProtocolVersion)",
            b"RFB 003.008\n\0\0\0\0".to_vec(),
            Expect::spice("not a SPICE link header (magic [52, 46, 42, 20])"),
        ),
        (
            "link version 1.0",
            link_bytes(1, 0, 18, &good_main),
            Expect::spice("unsupported SPICE protocol version 1.0"),
        ),
        (
            "a link message with a lying 4 GiB size",
            link_bytes(2, 2, u32::MAX, &good_main),
            Expect::spice("SPICE link message of 4294967295 bytes exceeds the limit of 4096 bytes"),
        ),
        (
            "a link message shorter than its fixed fields",
            link_bytes(2, 2, 4, &[0, 0, 0, 0]),
            Expect::spice("malformed SpiceLinkMess: shorter than its fixed fields"),
        ),
        (
            "a link message claiming 1000 capability words",
            link_bytes(2, 2, 18, &link_body(0, channel_type::MAIN, 1000, 18)),
            Expect::spice("malformed SpiceLinkMess: more than 64 capability words"),
        ),
        (
            "capabilities overlapping the fixed fields",
            link_bytes(2, 2, 18, &link_body(0, channel_type::MAIN, 1, 0)),
            Expect::spice("malformed SpiceLinkMess: capabilities overlap the fixed fields"),
        ),
        (
            "capabilities beyond the message",
            link_bytes(2, 2, 18, &link_body(0, channel_type::MAIN, 1, 18)),
            Expect::spice("malformed SpiceLinkMess: capabilities beyond the message"),
        ),
        (
            "a text WebSocket frame",
            Vec::new(),
            Expect::refused(
                "text WebSocket messages are not RFB; use binary",
                "websocket_text",
            ),
        ),
    ];
    let mut checker = Checker::new(&v, "spice");
    for (name, first, expect) in &cases {
        let before = checker.before(expect).await;
        let token = v.token(dom, ConsoleKind::Spice, 60);
        let mut r = Raw::open(v.addr, &format!("/websockify?token={token}")).await;
        if first.is_empty() {
            r.frame(0x81, b"REDQ").await;
        } else {
            r.send(first).await;
        }
        let closed = r.closed().await;
        checker.check(name, expect, before, &closed).await;
    }
    // The browser selects SASL, which vizor's link reply did not offer: refused with a
    // link error (permission denied) and audited as a protocol error.
    let expect =
        Expect::spice("malformed SPICE link: an authentication mechanism vizor did not offer");
    let before = checker.before(&expect).await;
    let token = v.token(dom, ConsoleKind::Spice, 60);
    let mut r = Raw::open(v.addr, &format!("/websockify?token={token}")).await;
    let mut caps = Caps::default();
    for bit in [
        vizor_spice::link::cap::PROTOCOL_AUTH_SELECTION,
        vizor_spice::link::cap::AUTH_SPICE,
        vizor_spice::link::cap::MINI_HEADER,
    ] {
        caps.set(bit);
    }
    let mut link = Vec::new();
    LinkMess {
        connection_id: 0,
        channel_type: channel_type::MAIN,
        channel_id: 0,
        common_caps: caps,
        channel_caps: Caps::default(),
    }
    .write(&mut link);
    r.send(&link).await;
    let reply = r
        .until(|b| LinkReply::parse(b, &vizor_spice::Limits::default()))
        .await;
    assert_eq!(reply.error, link_error::OK);
    r.send(&vizor_spice::link::cap::AUTH_SASL.to_le_bytes())
        .await;
    assert_eq!(r.take(4).await, link_error::PERMISSION_DENIED.to_le_bytes());
    let closed = r.closed().await;
    checker
        .check("the browser selects SASL", &expect, before, &closed)
        .await;

    // A link message cut short, then silence: the handshake timeout.
    let mut r = Raw::open(
        v.addr,
        &format!("/websockify?token={}", v.token(dom, ConsoleKind::Spice, 60)),
    )
    .await;
    r.send(b"RFB 003.008\n").await;
    let closed = r.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (1008, "no SPICE link message in time")
    );

    // A channel type spice-server does not have, first or within a live session, and a
    // display channel naming no session: each refused with a link error, audited.
    let token = v.token(dom, ConsoleKind::Spice, 60);
    let (mut main, session_id, kind) = common::spice::session(&v, &token, true).await;
    for (name, channel, connection, error, why) in [
        (
            "an unknown channel type first",
            99,
            0,
            link_error::CHANNEL_NOT_AVAILABLE,
            "a channel type spice-server does not have",
        ),
        (
            "an unknown channel type within a session",
            99,
            session_id,
            link_error::CHANNEL_NOT_AVAILABLE,
            "a channel type spice-server does not have",
        ),
        (
            "a display channel naming no session",
            channel_type::DISPLAY,
            0,
            link_error::BAD_CONNECTION_ID,
            "a channel other than main that names no session",
        ),
    ] {
        let expect = Expect::spice(&format!("malformed SPICE link: {why}"));
        let before = checker.before(&expect).await;
        let mut r = Raw::open(v.addr, &format!("/websockify?token={token}")).await;
        let mut link = Vec::new();
        LinkMess {
            connection_id: connection,
            channel_type: channel,
            channel_id: 0,
            common_caps: Caps::default(),
            channel_caps: Caps::default(),
        }
        .write(&mut link);
        r.send(&link).await;
        r.more().await;
        let (reply, _) = LinkReply::parse(&r.pending, &vizor_spice::Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(reply.error, error, "{name}");
        r.pending.clear();
        let closed = r.closed().await;
        checker.check(name, &expect, before, &closed).await;
    }

    // After the link: a KEY_DOWN whose body is shorter than its scancode.
    let mut inputs = common::spice::open(&v, &token).await;
    common::spice::link(&mut inputs, channel_type::INPUTS, session_id, true)
        .await
        .unwrap();
    let expect = Expect::spice("malformed KEY_DOWN: body shorter than the message's fixed fields");
    let before = checker.before(&expect).await;
    let mut out = Vec::new();
    write_message(
        HeaderKind::Mini,
        1,
        vizor_spice::msg::inputs::MSGC_KEY_DOWN,
        &[0x1e, 0],
        &mut out,
    )
    .unwrap();
    inputs.send(&out).await;
    let closed = inputs.closed().await;
    checker
        .check("a KEY_DOWN cut short", &expect, before, &closed)
        .await;

    // The session goes on: a key on a new inputs channel is audited.
    let mut inputs = common::spice::open(&v, &token).await;
    common::spice::link(&mut inputs, channel_type::INPUTS, session_id, true)
        .await
        .unwrap();
    let mut out = Vec::new();
    for (t, code) in [
        (vizor_spice::msg::inputs::MSGC_KEY_DOWN, 0x10u32),
        (vizor_spice::msg::inputs::MSGC_KEY_UP, 0x90),
    ] {
        write_message(kind, 1, t, &code.to_le_bytes(), &mut out).unwrap();
    }
    inputs.send(&out).await;
    wait_record(&v, "SPICE key", |r| r["event"] == "key" && r["key"] == "q").await;
    assert_eq!(main.ping(b"alive").await, b"alive");
    drop((inputs, main));
    records(&v, "session_end", 1).await;
    checker.finish();
}

/// On the SPICE browser leg a message beyond `browser_message_max` was streamed to
/// spice-server unparsed (and so unaudited); it is refused by its header, like RFB's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_spice_message_beyond_browser_message_max_is_refused() {
    use vizor_spice::link::channel_type;
    live();
    let dom = common::spice::domain("vizor-test-badsp2");
    let v = Vizor::start_with("", LIMITS_64K, |_| {});
    let token = v.token(dom, ConsoleKind::Spice, 60);
    let (_main, session_id, _) = common::spice::session(&v, &token, true).await;
    let mut inputs = common::spice::open(&v, &token).await;
    common::spice::link(&mut inputs, channel_type::INPUTS, session_id, true)
        .await
        .unwrap();
    // KEY_DOWN (mini header: type, size) announcing 4 GiB, then its scancode.
    let mut out = vizor_spice::msg::inputs::MSGC_KEY_DOWN
        .to_le_bytes()
        .to_vec();
    out.extend(u32::MAX.to_le_bytes());
    out.extend(0x1eu32.to_le_bytes());
    inputs.send(&out).await;
    let closed = inputs.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (
            1008,
            "browser SPICE protocol error: SPICE message of 4294967295 bytes exceeds the limit of 65536 bytes"
        )
    );
    let error = records(&v, "protocol_error", 1).await.remove(0);
    assert_eq!(
        (&error["direction"], &error["reason"]),
        (&"browser_to_vm".into(), &"spice".into())
    );
}

// ---------------------------------------------------------------------------------
// The VM leg: a test double for faults real QEMU cannot produce.
// ---------------------------------------------------------------------------------

/// What the fake RFB server does. It is a test double (vizor-testkit's synthetic VNC
/// server): real QEMU never sends a rectangle beyond its framebuffer, a lying length or
/// a garbage handshake, so these faults need a server written to commit them.
#[derive(Clone)]
enum Fake {
    /// Sends these bytes in place of its ProtocolVersion.
    Version(Vec<u8>),
    /// Agrees on RFB 3.8, then refuses with no security types and this reason.
    Refuse(&'static str),
    /// Authenticates vizor (VNC authentication with the password libvirt stores), then
    /// sends these bytes in place of its ServerInit.
    Init(Vec<u8>),
    /// A whole handshake ([`FAKE_W`] x [`FAKE_H`]), then, once vizor has relayed the
    /// browser's [`opening`], these bytes.
    Update(Vec<u8>),
}

const FAKE_PW: &str = "fake-vm-pw";
const FAKE_W: u16 = 64;
const FAKE_H: u16 = 48;

/// The fake's ServerInit, as its bytes.
fn fake_server_init() -> Vec<u8> {
    let mut out = Vec::new();
    ServerInit {
        width: FAKE_W,
        height: FAKE_H,
        pixel_format: PixelFormat::RGB888,
        name: b"fake".to_vec(),
    }
    .write(&mut out);
    out
}

/// What the browser sends once relaying: SetEncodings and a request for the whole
/// screen.
fn opening() -> Vec<u8> {
    cat(&[
        &set_encodings(&[
            Encoding::RAW,
            Encoding::COPY_RECT,
            Encoding::ZLIB,
            Encoding::CURSOR,
            Encoding::DESKTOP_SIZE,
        ]),
        &request(0, 0, FAKE_W, FAKE_H),
    ])
}

/// A FramebufferUpdate header announcing `rects` rectangles.
fn update(rects: u16) -> Vec<u8> {
    cat(&[&[0, 0], &rects.to_be_bytes()])
}

/// A rectangle header.
fn rect(x: u16, y: u16, w: u16, h: u16, encoding: Encoding) -> Vec<u8> {
    cat(&[
        &x.to_be_bytes(),
        &y.to_be_bytes(),
        &w.to_be_bytes(),
        &h.to_be_bytes(),
        &encoding.0.to_be_bytes(),
    ])
}

/// What vizor sends QEMU for [`opening`]: first its own request for QEMU's LED state
/// (so QEMU never presses lock keys itself), then the browser's messages with LED state
/// added to its encodings.
fn opening_relayed() -> Vec<u8> {
    cat(&[
        &set_encodings(&[Encoding::QEMU_LED_STATE]),
        &set_encodings(&[
            Encoding::RAW,
            Encoding::COPY_RECT,
            Encoding::ZLIB,
            Encoding::CURSOR,
            Encoding::DESKTOP_SIZE,
            Encoding::QEMU_LED_STATE,
        ]),
        &request(0, 0, FAKE_W, FAKE_H),
    ])
}

/// Listens for vizor and plays `scenario` on each connection; serves as long as the
/// caller keeps what it returns.
async fn fake_vm(scenario: Fake) -> Served {
    let double = Double::new(Auth::Password(FAKE_PW.to_owned()));
    let double = match &scenario {
        Fake::Version(bytes) => double.fault(Fault::Version(bytes.clone())),
        Fake::Refuse(reason) => double.fault(Fault::Refuse((*reason).to_owned())),
        Fake::Init(_) | Fake::Update(_) => double,
    };
    double
        .listen(move |conn| play(conn, scenario.clone()))
        .await
        .unwrap()
}

/// Past vizor's ClientInit: the scenario's ServerInit (or its bytes in place of it),
/// then what it sends; then reads until vizor closes.
async fn play(mut conn: Conn, scenario: Fake) -> Result<(), String> {
    let io = |e: std::io::Error| e.to_string();
    match scenario {
        Fake::Init(bytes) => conn.send(&bytes).await.map_err(io)?,
        Fake::Update(bytes) => {
            conn.send(&fake_server_init()).await.map_err(io)?;
            let relayed = conn.take(opening_relayed().len()).await.map_err(io)?;
            // vizor relays the opening as it should; anything else gets no update.
            if relayed == opening_relayed() {
                conn.send(&bytes).await.map_err(io)?;
            }
        }
        // Faults of the handshake, which the double commits itself.
        Fake::Version(_) | Fake::Refuse(_) => {}
    }
    conn.drain().await.map_err(io)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_clipboard_beyond_the_limit_is_dropped_not_the_session() {
    // A test double serves the VM leg: QEMU sends a guest clipboard only from a guest
    // agent this test host does not run. 2 MiB of clipboard, past the 1 MiB
    // vm_message_max, then an update: the clipboard goes nowhere, on record with its
    // size, and the update still reaches the browser.
    let pixels: Vec<u8> = (0..u32::from(FAKE_W) * u32::from(FAKE_H) * 4)
        .map(|i| (i % 251) as u8)
        .collect();
    let good_update = cat(&[
        &update(1),
        &rect(0, 0, FAKE_W, FAKE_H, Encoding::RAW),
        &pixels,
    ]);
    let clip_len: u32 = 2 << 20;
    let mut clip = vec![3, 0, 0, 0];
    clip.extend_from_slice(&clip_len.to_be_bytes());
    clip.extend(std::iter::repeat_n(b'c', clip_len as usize));
    let vm = fake_vm(Fake::Update(cat(&[&clip, &good_update]))).await;
    let (_node, uri) =
        common::test_node(&[("vizor-fake-clip".to_owned(), vm.port(), FAKE_PW.to_owned())]);
    let v = Vizor::start_uri(&uri, "", "", "", |_| {});
    let mut r = vnc_raw(&v, "vizor-fake-clip").await;
    reach(&mut r, Stage::Relay).await.unwrap();
    r.send(&opening()).await;
    assert_eq!(r.take(good_update.len()).await, good_update);
    let dropped = &v.records("clipboard_dropped", 1)[0];
    assert_eq!(
        (dropped["direction"].as_str(), dropped["length"].as_u64()),
        (Some("vm_to_browser"), Some(u64::from(clip_len)))
    );
    assert!(
        !v.audit().iter().any(|r| r["event"] == "session_end"),
        "the session goes on"
    );
    drop(r);
    v.wait_for_audit("session_end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_leg_refusals() {
    // A test double serves the VM leg; libvirt is its in-process test driver, so this
    // test needs no test host.
    let good_update = {
        let pixels: Vec<u8> = (0..u32::from(FAKE_W) * u32::from(FAKE_H) * 4)
            .map(|i| (i % 251) as u8)
            .collect();
        cat(&[
            &update(1),
            &rect(0, 0, FAKE_W, FAKE_H, Encoding::RAW),
            &pixels,
        ])
    };
    let mut hostile_version = b"SSH-2.0-x\r\n\0".to_vec();
    hostile_version.truncate(12);
    let mut bad_pf = fake_server_init();
    bad_pf[4] = 24; // bits per pixel
    let cursor_len = u64::from(u16::MAX) * u64::from(u16::MAX) * 4
        + u64::from(u16::MAX).div_ceil(8) * u64::from(u16::MAX);
    let cursor_reason =
        format!("cursor image of {cursor_len} bytes exceeds the limit of 1048576 bytes");
    // (case, scenario, refusal)
    let cases: Vec<(&str, Fake, Expect)> =
        vec![
        (
            "a Raw rectangle wider than the framebuffer",
            Fake::Update(cat(&[&update(1), &rect(0, 0, FAKE_W + 1, 1, Encoding::RAW)])),
            Expect::vm(
                "rect_out_of_bounds",
                "rectangle 0,0 65x1 lies outside the 64x48 framebuffer",
            ),
        ),
        (
            "a rectangle whose x + width overflows 16 bits",
            Fake::Update(cat(&[&update(1), &rect(u16::MAX, 0, 2, 1, Encoding::RAW)])),
            Expect::vm(
                "rect_out_of_bounds",
                "rectangle 65535,0 2x1 lies outside the 64x48 framebuffer",
            ),
        ),
        (
            "a rectangle below the framebuffer",
            Fake::Update(cat(&[&update(1), &rect(0, FAKE_H, 1, 1, Encoding::RAW)])),
            Expect::vm(
                "rect_out_of_bounds",
                "rectangle 0,48 1x1 lies outside the 64x48 framebuffer",
            ),
        ),
        (
            "a CopyRect from outside the framebuffer",
            Fake::Update(cat(&[
                &update(1),
                &rect(0, 0, 8, 8, Encoding::COPY_RECT),
                &60u16.to_be_bytes(),
                &44u16.to_be_bytes(),
            ])),
            Expect::vm(
                "rect_out_of_bounds",
                "rectangle 60,44 8x8 lies outside the 64x48 framebuffer",
            ),
        ),
        (
            "a Zlib rectangle with a lying 4 GiB length",
            Fake::Update(cat(&[
                &update(1),
                &rect(0, 0, 1, 1, Encoding::ZLIB),
                &u32::MAX.to_be_bytes(),
            ])),
            Expect::vm(
                "length_too_large",
                has(&["Zlib data of 4294967295 bytes exceeds the limit of "]),
            ),
        ),
        (
            "a 65535x65535 cursor",
            Fake::Update(cat(&[
                &update(1),
                &rect(0, 0, u16::MAX, u16::MAX, Encoding::CURSOR),
            ])),
            Expect::vm("length_too_large", cursor_reason.as_str()),
        ),
        (
            "an unknown server message type 127",
            Fake::Update(vec![127, 0, 0, 0]),
            Expect::vm("unknown_message_type", "unknown message type 127"),
        ),
        (
            "a rectangle in an encoding never offered (Hextile)",
            Fake::Update(cat(&[&update(1), &rect(0, 0, 1, 1, Encoding::HEXTILE)])),
            Expect::vm(
                "encoding_not_offered",
                "rectangle encoding 5 (Hextile) was never offered by the client",
            ),
        ),
        (
            "a rectangle in an encoding vizor cannot frame (50)",
            Fake::Update(cat(&[&update(1), &rect(0, 0, 1, 1, Encoding(50))])),
            Expect::vm(
                "unframable_encoding",
                "rectangle encoding 50 (unknown) cannot be framed",
            ),
        ),
        (
            "SetColourMapEntries beyond index 65535",
            Fake::Update(vec![1, 0, 0xff, 0xff, 0, 2]),
            Expect::vm(
                "malformed",
                "malformed SetColourMapEntries: entries beyond index 65535",
            ),
        ),
        (
            "a ServerFence never negotiated",
            Fake::Update(vec![248, 0, 0, 0, 0, 0, 0, 0, 0]),
            Expect::vm(
                "not_negotiated",
                "ServerFence received, but its extension was never negotiated",
            ),
        ),
        (
            "a ServerInit with a lying 4 GiB desktop name",
            Fake::Init(cat(&[&fake_server_init()[..20], &u32::MAX.to_be_bytes()])),
            Expect::vm(
                "length_too_large",
                "ServerInit desktop name of 4294967319 bytes exceeds the limit of 1048576 bytes",
            ),
        ),
        (
            "a ServerInit of 24 bits per pixel",
            Fake::Init(bad_pf),
            Expect::vm(
                "invalid_pixel_format",
                "invalid pixel format: bits-per-pixel must be 8, 16 or 32",
            ),
        ),
        (
            "a garbage ProtocolVersion from the VM",
            Fake::Version(hostile_version.clone()),
            Expect::vm(
                "malformed_version",
                format!(
                    "malformed RFB protocol version message {:?}",
                    String::from_utf8_lossy(&hostile_version)
                ),
            ),
        ),
        (
            "the VM offers no security type",
            Fake::Refuse("go away"),
            Expect::vm(
                "connection_refused",
                "server refused the connection: go away",
            ),
        ),
    ];
    let mut scenarios = vec![("a well-behaved fake", Fake::Update(good_update.clone()))];
    scenarios.extend(cases.iter().map(|(n, f, _)| (*n, f.clone())));
    let (mut domains, mut vms) = (Vec::new(), Vec::new());
    for (i, (_, fake)) in scenarios.iter().enumerate() {
        let vm = fake_vm(fake.clone()).await;
        domains.push((format!("vizor-fake-{i}"), vm.port(), FAKE_PW.to_owned()));
        vms.push(vm);
    }
    let (_node, uri) = common::test_node(&domains);
    let v = Vizor::start_uri(&uri, "", "", "", |_| {});

    // The double works: a whole session through it shows its screen, byte for byte.
    let mut r = vnc_raw(&v, "vizor-fake-0").await;
    let si = reach(&mut r, Stage::Relay).await.unwrap();
    assert_eq!(
        (si.width, si.height, si.name.as_slice()),
        (FAKE_W, FAKE_H, &b"fake"[..])
    );
    r.send(&opening()).await;
    assert_eq!(r.take(good_update.len()).await, good_update);
    drop(r);

    let mut checker = Checker::new(&v, "vnc");
    for (i, (name, fake, expect)) in cases.iter().enumerate() {
        let before = checker.before(expect).await;
        let mut r = vnc_raw(&v, &format!("vizor-fake-{}", i + 1)).await;
        match fake {
            // The VM failed before the browser was offered a security type: the
            // browser gets an RFB refusal, then the close.
            Fake::Version(_) | Fake::Refuse(_) => {
                reach(&mut r, Stage::Version).await;
                r.send(b"RFB 003.008\n").await;
                let told = "the VM console cannot be reached";
                let refusal = cat(&[&[0], &(told.len() as u32).to_be_bytes(), told.as_bytes()]);
                assert_eq!(r.take(refusal.len()).await, refusal, "{name}");
            }
            // The VM failed at ServerInit: after the browser's ClientInit.
            Fake::Init(_) => {
                reach(&mut r, Stage::ClientInit).await;
                r.send(&[1]).await;
            }
            Fake::Update(_) => {
                reach(&mut r, Stage::Relay).await;
                r.send(&opening()).await;
            }
        }
        let closed = r.closed().await;
        checker.check(name, expect, before, &closed).await;
    }

    // Still serving.
    let mut r = vnc_raw(&v, "vizor-fake-0").await;
    reach(&mut r, Stage::Relay).await;
    r.send(&opening()).await;
    assert_eq!(r.take(good_update.len()).await, good_update);
    drop(r);
    records(&v, "session_end", 2).await;
    checker.finish();
}
