//! `vizor replay FILE`: serves a session recording to noVNC over the same WebSocket
//! endpoint a live console uses (`/websockify`), for review in a browser: on vizor's
//! console page at `/` with `--novnc`, or with any noVNC app under `--web-root`. Each
//! connection gets the recording from its start: the RFB handshake (security type
//! None), the recorded ServerInit, then every recorded piece at its time (divided by
//! `speed`; 0 plays at once). What the browser sends is read and ignored: a replay
//! cannot reach any VM.

use super::Recording;
use crate::config::ConsoleConfig;
use crate::console;
use crate::session::browser::{self, BrowserRx, BrowserTx};
use crate::session::drive;
use crate::session::rfb::browser_security_none;
use crate::session::End;
use crate::token::ConsoleKind;
use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// A viewer that takes nothing for this long is dropped.
const REPLAY_SEND_TIMEOUT: Duration = Duration::from_secs(30);
use vizor_rfb::handshake::server;
use vizor_rfb::handshake::Version;

/// What `vizor replay` serves.
pub struct Replay {
    /// The recording.
    pub recording: Recording,
    /// Playback speed: 1 is real time, 0 no waiting.
    pub speed: f64,
    /// Static files (noVNC) served under `/`.
    pub web_root: Option<PathBuf>,
    /// The console page's clients: noVNC's npm package for the page at `/` (see
    /// [`crate::console`]).
    pub console: ConsoleConfig,
    /// The console page's title.
    pub title: String,
}

/// Serves `replay` on `listen` until interrupted.
pub async fn serve(replay: Replay, listen: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr()?;
    println!("listening on {local}");
    info!(%local, frames = replay.recording.frames.len(), "replaying");
    let replay = Arc::new(replay);
    loop {
        let (stream, peer) = tokio::select! {
            a = listener.accept() => a?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let replay = replay.clone();
        tokio::spawn(async move {
            let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                let replay = replay.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    if path == "/websockify" && fastwebsockets::upgrade::is_upgrade_request(&req) {
                        return Ok::<_, std::convert::Infallible>(upgrade(replay, peer, &mut req));
                    }
                    let console = &replay.console;
                    if console.novnc.is_some() && (path == "/" || path == "/console") {
                        return Ok(console::client_page(
                            console,
                            ConsoleKind::Vnc,
                            &replay.title,
                        ));
                    }
                    if let Some(r) = console::asset(&path) {
                        return Ok(r);
                    }
                    if let Some((dir, rest)) = console::client_dir(console, &path) {
                        return Ok(crate::front::static_file(dir, rest).await);
                    }
                    Ok(match &replay.web_root {
                        Some(root) => crate::front::static_file(root, &path).await,
                        None => not_found(),
                    })
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

fn not_found() -> hyper::Response<Full<Bytes>> {
    let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"not found\n")));
    *r.status_mut() = hyper::StatusCode::NOT_FOUND;
    r
}

fn upgrade(
    replay: Arc<Replay>,
    peer: SocketAddr,
    req: &mut hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let wants_binary = req
        .headers()
        .get_all(hyper::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "binary");
    let Ok((resp, fut)) = fastwebsockets::upgrade::upgrade(&mut *req) else {
        return not_found();
    };
    let mut resp = resp.map(|_| Full::new(Bytes::new()));
    if wants_binary {
        resp.headers_mut().insert(
            hyper::header::SEC_WEBSOCKET_PROTOCOL,
            hyper::header::HeaderValue::from_static("binary"),
        );
    }
    tokio::spawn(async move {
        let Ok(ws) = fut.await else { return };
        let (brx, btx) = browser::split(
            ws,
            1 << 20,
            crate::config::DEFAULT_WS_MESSAGE_SIZE,
            REPLAY_SEND_TIMEOUT,
            // A replay reads from a file: nothing to splice.
            false,
        );
        match play(&replay, brx, &btx).await {
            Ok(()) => info!(client = %peer, "replay ended"),
            Err(end) => warn!(client = %peer, reason = %end, "replay stopped"),
        }
        btx.close(1000, "replay ended").await;
    });
    resp
}

async fn play(replay: &Replay, mut brx: BrowserRx, btx: &BrowserTx) -> Result<(), End> {
    let limits = vizor_rfb::Limits::default();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let hs = server::start(Version::V3_8, limits, &mut out);
    btx.binary(std::mem::take(&mut out)).await;
    let (offer, _) = drive(&mut brx, &mut buf, hs, End::from_browser, |s, b| {
        s.receive(b)
    })
    .await?;
    browser_security_none(&mut brx, &mut buf, offer, btx).await?;
    // The browser's messages are read (so pings are answered) and dropped.
    let reader = tokio::spawn(async move {
        let mut sink = Vec::new();
        while brx.read_into(&mut sink).await.is_ok() {
            sink.clear();
        }
    });
    let start = tokio::time::Instant::now();
    for (at, bytes) in &replay.recording.frames {
        if replay.speed > 0.0 {
            let due = start + Duration::from_secs_f64(at.as_secs_f64() / replay.speed);
            tokio::time::sleep_until(due).await;
        }
        btx.bytes(BytesMut::from(&bytes[..])).await?;
    }
    // The last frame stays on screen until the viewer leaves.
    let _ = reader.await;
    Ok(())
}
