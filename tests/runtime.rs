//! `[server] worker_threads`: the runtime's threads, as the operating system lists them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::Vizor;

/// tokio's name for its threads (cut to the 15 bytes a thread name may have).
const WORKER: &str = "tokio-rt-worker";

#[test]
fn worker_threads_sets_how_many_threads_run_sessions() {
    for n in [1usize, 3] {
        let v = Vizor::start(&format!("worker_threads = {n}"));
        assert_eq!(v.threads_named(WORKER), n, "worker_threads = {n}");
    }
    // Left out: one per CPU.
    let cpus = std::thread::available_parallelism().unwrap().get();
    let v = Vizor::start("");
    assert_eq!(v.threads_named(WORKER), cpus);
}
