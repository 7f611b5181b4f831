//! `GET /websockify?resume=CREDENTIAL`: a console page coming back after a network blip
//! (see `session::resume`): a VNC console, or a SPICE session's main channel.

use super::upgrade::AbortOnDrop;
use super::*;

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
        app.config.server.splice,
    );
    let claimed = app
        .env
        .resumes
        .claim(&credential, peer.ip(), std::time::Instant::now());
    let claim = match claimed {
        Ok(claim) => claim,
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
    let slot = claim.slot().clone();
    let kind = slot.kind();
    let span =
        tracing::info_span!("session", id = slot.id(), kind = %kind, client = %peer, resume = true);
    async {
        let pings = brx.pings();
        pings.measure_into(
            app.metrics()
                .client_rtt_seconds
                .with_label_values(&[kind.as_str()]),
        );
        let _pinger = AbortOnDrop(btx.start_pinging(pings, app.config.server.ping_interval));
        // Claimed: a failure from here leaves the credential good for the page's next
        // try.
        let hello = match kind {
            ConsoleKind::Vnc => session::rfb::resume_handshake(&app.env, &mut brx, &btx)
                .await
                .map(|()| session::resume::Hello::Rfb),
            ConsoleKind::Spice => session::spice::resume_link(&app.env, &mut brx, &btx).await,
        };
        let hello = match hello {
            Ok(h) => h,
            Err(end) => {
                info!(reason = %end, "resume handshake failed");
                btx.close(end.close_code(), &end.told()).await;
                brx.linger(CLOSE_LINGER).await;
                return;
            }
        };
        // The console as libvirt tells it now: the session checks it is the same run
        // of the VM, and takes its password (it may have changed through libvirt).
        let console = lookup(&app, slot.host(), DomainRef::Uuid(slot.uuid()), kind).await;
        let (done, let_go) = tokio::sync::oneshot::channel();
        let attach = session::resume::Attach {
            rx: brx,
            tx: btx,
            client: peer,
            claim,
            console,
            done,
            hello,
        };
        match slot.attach(attach) {
            // The session has it until it lets it go (and then closes it).
            Ok(()) => {
                let _ = let_go.await;
            }
            Err(mut a) => {
                info!("the session ended before the resumed connection was taken");
                a.tx.close(1008, "this console session can no longer be resumed")
                    .await;
                a.rx.linger(CLOSE_LINGER).await;
            }
        }
    }
    .instrument(span)
    .await;
}
