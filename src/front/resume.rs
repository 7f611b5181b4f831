//! `GET /websockify?resume=CREDENTIAL`: a console page coming back after a network blip
//! (see `session::resume`).

use super::upgrade::AbortOnDrop;
use super::*;

/// How long a resumed connection waits for its relay to take it (it takes it between
/// two of the VM's messages).
const ATTACH_WAIT: Duration = Duration::from_secs(5);

/// A resuming console connection: the credential spent, the browser's handshake, then
/// the connection handed to the session's relay until it lets it go.
pub(super) async fn resume(
    app: Arc<App>,
    peer: SocketAddr,
    credential: String,
    ws: fastwebsockets::WebSocket<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
) {
    let credential = Zeroizing::new(credential);
    let (mut brx, btx) = session::browser::split(
        ws,
        app.env.browser_limits.max_message_len + 64,
        app.config.server.ws_message_size,
        app.config.limits.send_timeout,
    );
    let resumes = &app.env.resumes;
    let (slot, rotation) = match resumes.spend(&credential, peer.ip(), std::time::Instant::now()) {
        Ok(spent) => spent,
        Err(e) => {
            app.metrics()
                .session_resumes_total
                .with_label_values(&[e.label()])
                .inc();
            super::refused::token_refused(
                &app,
                peer,
                e.reason(),
                None,
                "console resume",
                &e.to_string(),
            );
            btx.close(1008, &e.to_string()).await;
            brx.linger(CLOSE_LINGER).await;
            return;
        }
    };
    let span = tracing::info_span!("session", id = slot.id(), kind = "vnc", client = %peer, resume = rotation);
    async {
        let pings = brx.pings();
        pings.measure_into(app.metrics().client_rtt_seconds.with_label_values(&["vnc"]));
        let _pinger = AbortOnDrop(btx.start_pinging(pings, app.config.server.ping_interval));
        if let Err(end) = session::rfb::resume_handshake(&app.env, &mut brx, &btx).await {
            info!(reason = %end, "resume handshake failed");
            btx.close(end.close_code(), &end.told()).await;
            brx.linger(CLOSE_LINGER).await;
            return;
        }
        let (done, let_go) = tokio::sync::oneshot::channel();
        let attach = session::resume::Attach {
            rx: brx,
            tx: btx,
            client: peer,
            rotation,
            done,
        };
        match slot.attach(attach, ATTACH_WAIT).await {
            // The relay has it, and lingers it when done.
            Ok(()) => {
                let _ = let_go.await;
            }
            Err(mut a) => {
                info!("the session ended before the resumed connection was taken");
                a.tx.close(1008, "the console session has ended").await;
                a.rx.linger(CLOSE_LINGER).await;
            }
        }
    }
    .instrument(span)
    .await;
}
