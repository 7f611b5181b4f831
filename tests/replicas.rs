//! Replicas of vizor sharing state through a real Redis (`[state]`): a token is
//! admitted by exactly one of them however it races, session limits hold across them
//! (a replica killed frees its slots within its lease), any replica lists every
//! replica's sessions, and a Redis that does not answer refuses new sessions (fail
//! closed) until it answers again.
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
/// either) and the management API, `limits` in their `[limits]`, leases of 4 s.
fn replicas(redis: &Redis, limits: &str) -> (Vizor, Vizor) {
    let table = |name| {
        format!(
            "{}lease = \"4s\"\n[limits]\n{limits}\n{}",
            redis.state_table(name),
            common::ADMIN_API
        )
    };
    let a = Vizor::start_full("", "", &table("a"), |dir| {
        redis.write_password(dir);
        common::write_admin_key(dir);
    });
    let key = a.dir.path().join("token.key");
    let b = Vizor::start_full("", "", &table("b"), |dir| {
        redis.write_password(dir);
        common::write_admin_key(dir);
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
    // The per-domain and per-user limits (counted across both) do not meet a round
    // whose sessions are still being given back.
    let (a, b) = replicas(
        &redis,
        "failed_tokens_per_client = 0\nmax_sessions_per_domain = 1000\nmax_sessions_per_user = 1000",
    );
    // A new Redis counts the replicas' sessions for a lease before it admits any.
    let (settled, refused) = open_fresh_when_back(&a, &live.name).await;
    drop(settled);
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
    assert_eq!(spent(&a) + spent(&b), 200 + refused + 1);
    a.assert_never_logged(&redis.password);
    b.assert_never_logged(&redis.password);
}

/// The sessions `v` lists, once there are `n` of them (within 5 s).
async fn listed(v: &Vizor, n: usize) -> Vec<serde_json::Value> {
    let mut listed = Vec::new();
    for _ in 0..50 {
        listed = v.sessions().await;
        if listed.len() == n {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(listed.len(), n, "{listed:?}");
    listed
}

/// Opens a new token of `domain` on `v` at each try until a session opens, while
/// vizor says it cannot start sessions (Redis does not answer, or counts the
/// replicas' sessions anew: a token spent then is spent). The session, and how many
/// tries were refused.
async fn open_fresh_when_back(v: &Vizor, domain: &str) -> (Browser, usize) {
    for refused in 0..100 {
        match open(v, &v.token(domain, ConsoleKind::Vnc, 60)).await {
            Ok((b, _)) => return (b, refused),
            Err(e) => {
                assert!(e.contains("vizor cannot start sessions now"), "{e}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
    panic!("no session within 20 s")
}

/// Opens `token` on `v`, trying again while vizor says it cannot start sessions
/// (before it spent the token).
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
    drop(open_fresh_when_back(&a, &live.name).await);
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
    let counting = |v: &Vizor| {
        v.audit()
            .into_iter()
            .filter(|r| r["event"] == "session_refused" && r["reason"] == "state_unavailable")
            .count()
    };
    let counted_before = counting(&a);
    redis.stop();
    let killed = a.token(&live.name, ConsoleKind::Vnc, 60);
    for _ in 0..25 {
        refused_for_state(&a, &killed).await;
    }
    // Back empty (it saves nothing): the replicas' sessions are not counted there
    // any more, so none is admitted until they have renewed theirs (a lease).
    let back = std::time::Instant::now();
    redis.start_again();
    let (_on_a, refused) = open_fresh_when_back(&a, &live.name).await;
    let took = back.elapsed();
    eprintln!("an emptied Redis admitted a session after {took:?} ({refused} refused)");
    // The epoch starts after `back`, and no slot is taken for a lease (4 s) after it.
    assert!(
        took >= std::time::Duration::from_secs(4),
        "admitted {took:?} after Redis came back empty, before a lease"
    );
    assert!(refused > 0);
    assert!(
        counting(&a) > counted_before,
        "the refusals while counting are on record"
    );
    // The sessions that ran through it were counted again meanwhile (renewed into
    // the new Redis), with the new one: replica b lists all three.
    let all = listed(&b, 3).await;
    assert!(all.iter().all(|s| s["replica"] == "a"), "{all:?}");
    let m = a.metrics().await;
    assert_eq!(common::metric(&m, "vizor_state_up"), Some(1.0), "{m}");
    a.assert_never_logged(&redis.password);
}

/// Opens a token of `domain` on `v` until a session opens, as long as vizor says the
/// VM has as many sessions as allowed, for at most `bound`: how long that took.
async fn open_once_freed(
    v: &Vizor,
    domain: &str,
    bound: std::time::Duration,
) -> (Browser, std::time::Duration) {
    let started = std::time::Instant::now();
    loop {
        match open(v, &v.token(domain, ConsoleKind::Vnc, 60)).await {
            Ok((b, _)) => return (b, started.elapsed()),
            Err(e) => {
                assert!(
                    e.contains("this VM has as many console sessions as allowed"),
                    "{e}"
                );
                assert!(
                    started.elapsed() < bound,
                    "the slot was not freed within {bound:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host and redis-server (scripts/test.sh runs it with --include-ignored)"]
async fn a_domain_limit_holds_across_replicas_and_a_killed_replica_frees_its_slot() {
    let live = common::live_domain();
    let redis = Redis::start();
    let (a, mut b) = replicas(
        &redis,
        "max_sessions_per_domain = 1\nfailed_tokens_per_client = 0",
    );

    // A session on replica a fills the domain for replica b too.
    let (on_a, _) = open_fresh_when_back(&a, &live.name).await;
    let e = open(&b, &b.token(&live.name, ConsoleKind::Vnc, 60))
        .await
        .err()
        .expect("refused: the domain's one session is on replica a");
    assert!(
        e.contains("1008") && e.contains("this VM has as many console sessions as allowed"),
        "{e}"
    );
    let refused = b.records("session_refused", 1).remove(0);
    assert_eq!(refused["reason"], "limit_domain_sessions", "{refused}");

    // Replica b lists replica a's session (as a last wrote it), and its own none.
    let on_b = listed(&b, 1).await;
    let on_a_listed = &on_b[0];
    assert_eq!(on_a_listed["replica"], "a", "{on_a_listed}");
    assert_eq!(on_a_listed["domain"], live.name.as_str(), "{on_a_listed}");
    let started = a.records("session_start", 1).remove(0);
    assert_eq!(
        on_a_listed["id"], started["session"],
        "{on_a_listed} / {started}"
    );
    let on_a_here = a.sessions().await;
    assert_eq!(on_a_here.len(), 1, "{on_a_here:?}");
    assert_eq!(on_a_here[0]["replica"], "a");

    // Ended on a: its slot is given back at once (well within a lease).
    drop(on_a);
    let (on_b, took) = open_once_freed(&b, &live.name, std::time::Duration::from_secs(2)).await;
    eprintln!("slot given back across replicas after {took:?}");

    // Replica b killed with its session: no chance to give the slot back, which
    // frees when its lease (4 s) runs out.
    b.kill();
    let killed = std::time::Instant::now();
    let e = open(&a, &a.token(&live.name, ConsoleKind::Vnc, 60))
        .await
        .err()
        .expect("refused while the killed replica's lease runs");
    assert!(
        e.contains("this VM has as many console sessions as allowed"),
        "{e}"
    );
    let (_on_a, _) = open_once_freed(&a, &live.name, std::time::Duration::from_secs(4 + 2)).await;
    let freed = killed.elapsed();
    eprintln!("a killed replica's slot freed after {freed:?} (lease 4 s)");
    drop(on_b);
    // Its listing entry has gone with the lease.
    let left = a.sessions().await;
    assert!(left.iter().all(|s| s["replica"] == "a"), "{left:?}");
    a.assert_never_logged(&redis.password);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host and redis-server (scripts/test.sh runs it with --include-ignored)"]
async fn an_administrator_on_one_replica_ends_a_session_on_another() {
    let live = common::live_domain();
    let redis = Redis::start();
    let (a, b) = replicas(&redis, "");
    let (mut on_a, _) = open_fresh_when_back(&a, &live.name).await;
    let id = a.records("session_start", 1).remove(0)["session"]
        .as_u64()
        .unwrap();
    // Replica b lists it, with the member it is named by.
    let member = listed(&b, 1).await[0]["member"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        member.starts_with("a/") && member.ends_with(&format!("/{id}")),
        "{member}"
    );
    let end = |path: String| {
        let b = &b;
        async move { b.api("DELETE", &path, r#"{"reason": "from b"}"#).await }
    };
    let refused = |(status, answer): (u16, serde_json::Value), want: (u16, &str)| {
        assert_eq!(
            (status, answer["reason"].as_str()),
            (want.0, Some(want.1)),
            "{answer}"
        );
        answer
    };

    // Sessions are named by their member: an id alone names no one's, an id and a
    // member that disagree are refused.
    refused(
        end(format!("/api/v1/sessions/{id}")).await,
        (400, "bad_request"),
    );
    refused(
        end(format!("/api/v1/sessions/{}?member={member}", id + 1)).await,
        (400, "bad_request"),
    );
    // What only the holder can do is refused elsewhere, saying where it is.
    let (status, answer) = b
        .api(
            "POST",
            &format!("/api/v1/sessions/{id}/participants?member={member}"),
            r#"{"role": "observer", "user": "eve"}"#,
        )
        .await;
    refused((status, answer), (409, "session_on_other_replica"));
    // A replica nobody runs, and a session of a's that is not live.
    let nosuch = format!("nosuch/00/{id}");
    refused(
        end(format!("/api/v1/sessions/{id}?member={nosuch}")).await,
        (404, "replica_not_listening"),
    );
    let mark = member.rsplit_once('/').unwrap().0;
    let gone = format!("{mark}/{}", id + 100);
    let answer = refused(
        end(format!("/api/v1/sessions/{}?member={gone}", id + 100)).await,
        (404, "session_not_live"),
    );
    assert!(
        answer["error"].as_str().unwrap().starts_with("replica a: "),
        "{answer}"
    );
    // A member of an earlier process of replica a (a restart since): no one acts.
    let earlier = format!("a/0000000000000000/{id}");
    refused(
        end(format!("/api/v1/sessions/{id}?member={earlier}")).await,
        (504, "replica_no_answer"),
    );

    // Asked on b, ended on a: on a's record (naming b) before the browser is told.
    let (status, answer) = end(format!("/api/v1/sessions/{id}?member={member}")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (&answer["ended"], &answer["replica"], &answer["session"]),
        (
            &serde_json::json!(true),
            &serde_json::json!("a"),
            &serde_json::json!(id)
        ),
        "{answer}"
    );
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), on_a.closed())
        .await
        .expect("the browser on replica a is told");
    assert_eq!(closed.reason, "ended by an administrator (admin): from b");
    let action = a.records("admin_action", 1).remove(0);
    assert_eq!(
        (
            &action["action"],
            &action["session"],
            &action["asked_at"],
            &action["reason"]
        ),
        (
            &serde_json::json!("end"),
            &serde_json::json!(id),
            &serde_json::json!("b"),
            &serde_json::json!("from b")
        ),
        "{action}"
    );
    let ended = a.records("session_end", 1).remove(0);
    assert_eq!(
        (&ended["cause"], &ended["ended_by"]),
        (
            &serde_json::json!("terminated"),
            &serde_json::json!("administrator")
        ),
        "{ended}"
    );
    // Only one admin_action anywhere: none on b's record (b holds no session), and
    // the refused requests were not ends.
    assert!(b.audit().iter().all(|r| r["event"] != "admin_action"));
    assert_eq!(
        a.audit()
            .iter()
            .filter(|r| r["event"] == "admin_action")
            .count(),
        1
    );
    // Its own replica ends it by the member too: ended already.
    let (status, answer) = a
        .api(
            "DELETE",
            &format!("/api/v1/sessions/{id}?member={member}"),
            r#"{"reason": "again"}"#,
        )
        .await;
    // (409 while its live entry, ending, is still there.)
    assert!(
        matches!(
            (status, answer["reason"].as_str()),
            (404, Some("session_not_live")) | (409, Some("session_ending"))
        ),
        "{status} {answer}"
    );
    a.assert_never_logged(&redis.password);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host and redis-server (scripts/test.sh runs it with --include-ignored)"]
async fn a_replica_with_another_lease_refuses_to_start() {
    let redis = Redis::start();
    let (a, _b) = replicas(&redis, "");
    // A third replica, as a's config but for its name, its files and its lease.
    let dir = tempfile::tempdir().unwrap();
    for file in [
        "token.key",
        "audit.key",
        "redis.password",
        "admin.key",
        "metrics.key",
    ] {
        std::fs::copy(a.dir.path().join(file), dir.path().join(file)).unwrap();
    }
    let config = std::fs::read_to_string(a.dir.path().join("vizor.toml"))
        .unwrap()
        .replace("lease = \"4s\"", "lease = \"8s\"")
        .replace("replica = \"a\"", "replica = \"c\"");
    assert!(config.contains("lease = \"8s\""));
    let path = dir.path().join("vizor.toml");
    std::fs::write(&path, config).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_vizor"))
            .args(["serve", "--config", path.to_str().unwrap()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("run with [state] lease = 4s: every replica needs the same lease"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (its CA) and redis-server (scripts/test.sh runs it with --include-ignored)"]
async fn replicas_reach_redis_over_tls_and_trust_only_its_ca() {
    let live = common::live_domain();
    // Redis over TLS alone, demanding vizor's client certificate.
    let redis = Redis::start_tls();
    let (a, b) = replicas(&redis, "");
    let (mut s, _) = open_fresh_when_back(&a, &live.name).await;
    // The token is spent through Redis: the other replica refuses it.
    let token = a.token(&live.name, ConsoleKind::Vnc, 60);
    let (mut first, _) = open(&a, &token).await.unwrap();
    let e = open(&b, &token).await.err().expect("a token spent on a");
    assert!(e.contains("1008"), "{e}");
    first.close(1000, "done").await;
    s.close(1000, "done").await;

    // A replica whose [state] table `edit` spoils refuses new sessions rather than talk
    // to a Redis it cannot verify, and its log says why.
    let refuses = |name: &str, edit: &dyn Fn(String) -> String, why: &str| {
        let table = format!(
            "{}lease = \"4s\"\n{}",
            edit(redis.state_table(name)),
            common::ADMIN_API
        );
        let r = Vizor::start_full("", "", &table, |dir| {
            redis.write_password(dir);
            common::write_admin_key(dir);
        });
        let token = r.token(&live.name, ConsoleKind::Vnc, 60);
        let why = why.to_owned();
        async move {
            let e = open(&r, &token).await.err().expect(&why);
            assert!(e.contains("vizor cannot start sessions now"), "{e}");
            assert!(
                r.wait_for_log("invalid peer certificate"),
                "the log says why"
            );
            r
        }
    };
    // One that trusts another CA (here: Redis's own certificate, no CA).
    let c = refuses(
        "c",
        &|t| t.replace("ca-cert.pem\"", "server-cert.pem\""),
        "no session without a Redis it can verify",
    )
    .await;
    c.assert_never_logged(&redis.password);
    // The right CA, but an address the certificate does not name (it names 127.0.0.1
    // and localhost; Redis listens on 127.0.0.2 too): refused alike.
    refuses(
        "d",
        &|t| t.replace("rediss://127.0.0.1:", "rediss://127.0.0.2:"),
        "no session with a Redis whose certificate names another address",
    )
    .await;
}
