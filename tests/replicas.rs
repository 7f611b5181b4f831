//! Replicas of vizor sharing state through a real Redis (`[state]`): a token is
//! admitted by exactly one of them however it races, and a Redis that does not answer
//! refuses new sessions (fail closed) until it answers again.
//!
//! Needs the live test host (a real QEMU console) and Debian's redis-server
//! (`scripts/test.sh` installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::redis::Redis;
use common::rfb::rfb_handshake;
use common::{Browser, Vizor};
use vizor::token::ConsoleKind;
use vizor_rfb::handshake::ServerInit;

/// Two replicas on one Redis, with one token key (a token either issued opens on
/// either), `limits` in their `[limits]`.
fn replicas(redis: &Redis, limits: &str) -> (Vizor, Vizor) {
    let table = |name| format!("{}\n[limits]\n{limits}\n", redis.state_table(name));
    let a = Vizor::start_full("", "", &table("a"), |dir| redis.write_password(dir));
    let key = a.dir.path().join("token.key");
    let b = Vizor::start_full("", "", &table("b"), |dir| {
        redis.write_password(dir);
        std::fs::copy(&key, dir.join("token.key")).unwrap();
    });
    (a, b)
}

/// Opens `token` on `v`: `Ok` once RFB reached ServerInit (a session), or vizor's
/// close words.
async fn open(v: &Vizor, token: &str) -> Result<(Browser, ServerInit), String> {
    let mut b = Browser::connect(v.addr, &format!("/websockify?token={token}")).await;
    rfb_handshake(&mut b).await.map(|si| (b, si))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host and redis-server (scripts/test.sh runs it with --include-ignored)"]
async fn a_token_raced_to_two_replicas_opens_exactly_one_session() {
    let live = common::live_domain();
    let redis = Redis::start();
    // Every race lost is a replayed token, which counts against the client's failed
    // attempts: this client (all of them 127.0.0.1) is not throttled.
    let (a, b) = replicas(&redis, "failed_tokens_per_client = 0");
    let mut won = [0usize; 2];
    for i in 0..200 {
        let token = a.token(&live.name, ConsoleKind::Vnc, 60);
        let (ra, rb) = tokio::join!(open(&a, &token), open(&b, &token));
        let lost = match (&ra, &rb) {
            (Ok(_), Err(e)) => {
                won[0] += 1;
                e
            }
            (Err(e), Ok(_)) => {
                won[1] += 1;
                e
            }
            _ => panic!(
                "round {i}: not exactly one session: {:?} / {:?}",
                ra.as_ref().err(),
                rb.as_ref().err()
            ),
        };
        assert!(lost.contains("token already used"), "round {i}: {lost}");
    }
    eprintln!("sessions won: replica a {}, replica b {}", won[0], won[1]);
    assert!(won[0] > 0 && won[1] > 0, "both replicas won some: {won:?}");
    // Each replica's own log has its spends; together, one per token.
    let spent = |v: &Vizor| {
        v.audit()
            .iter()
            .filter(|r| r["event"] == "token_used")
            .count()
    };
    assert_eq!(spent(&a) + spent(&b), 200);
    a.assert_never_logged(&redis.password);
    b.assert_never_logged(&redis.password);
}

/// Opens `token` on `v`, trying again while vizor says it cannot start sessions.
async fn open_when_back(v: &Vizor, token: &str) -> Browser {
    for _ in 0..50 {
        match open(v, token).await {
            Ok((b, _)) => return b,
            Err(e) => {
                assert!(e.contains("vizor cannot start sessions now"), "{e}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
    panic!("no session once Redis is back")
}

/// A refusal because Redis does not answer: its words, on record, not a failed
/// attempt of the client's.
async fn refused_for_state(v: &Vizor, token: &str) {
    let e = open(v, token).await.err().expect("refused without Redis");
    assert!(
        e.contains("1013") && e.contains("vizor cannot start sessions now"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host and redis-server (scripts/test.sh runs it with --include-ignored)"]
async fn without_redis_new_sessions_are_refused_and_live_ones_go_on() {
    let live = common::live_domain();
    let mut redis = Redis::start();
    // Default limits: refusals for want of Redis are not the client's failed attempts.
    let (a, b) = replicas(&redis, "");
    let (mut running, si) = open(&a, &a.token(&live.name, ConsoleKind::Vnc, 60))
        .await
        .unwrap();

    // Frozen (no answer within [state] timeout): refused. Redis may still carry out
    // the spend it was sent once it thaws; the replica that sent it knows its own
    // (the value is its mark), so a retry there opens the token.
    redis.pause();
    let frozen = a.token(&live.name, ConsoleKind::Vnc, 60);
    refused_for_state(&a, &frozen).await;
    let refused = a.records("token_refused", 1).remove(0);
    assert_eq!(refused["reason"], "state_unavailable", "{refused}");
    let m = a.metrics().await;
    assert_eq!(common::metric(&m, "vizor_state_up"), Some(0.0), "{m}");
    assert!(
        common::metric(&m, "vizor_state_errors_total{op=\"spend\"}").unwrap() >= 1.0,
        "{m}"
    );
    // The live session goes on meanwhile.
    running
        .send(&common::rfb::update_request(si.width, si.height))
        .await;
    tokio::time::timeout(std::time::Duration::from_secs(10), running.read())
        .await
        .expect("the live session answers")
        .unwrap();
    redis.resume();
    let _again = open_when_back(&a, &frozen).await;
    // Spent now, for every replica.
    let e = open(&b, &frozen).await.err().unwrap();
    assert!(e.contains("token already used"), "{e}");

    // Killed: refused (more than failed_tokens_per_client times, none counted against
    // the client), then started again: sessions open.
    redis.stop();
    let killed = a.token(&live.name, ConsoleKind::Vnc, 60);
    for _ in 0..25 {
        refused_for_state(&a, &killed).await;
    }
    redis.start_again();
    let _on_a = open_when_back(&a, &killed).await;
    let m = a.metrics().await;
    assert_eq!(common::metric(&m, "vizor_state_up"), Some(1.0), "{m}");
    a.assert_never_logged(&redis.password);
}
