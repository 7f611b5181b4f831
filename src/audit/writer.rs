//! The audit writer: one thread owns the file and the chain. Sessions queue records
//! and wait for their acknowledgement; the thread seals every queued record, writes
//! them with one `write(2)`, syncs as `[audit] fsync` says, then acknowledges them
//! (group commit). A failed write is rolled back (the file truncated to where it was)
//! so the chain on disk never has a gap.

use super::chain::{self, Chain, ChainKey, Members, GENESIS};
use crate::config::Fsync;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tracing::warn;

/// A record to write: its members, whether it asks for a sync under `fsync =
/// "session"`, and who waits for it.
pub(super) struct Job {
    pub members: Members,
    pub event: &'static str,
    pub session_boundary: bool,
    pub ack: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
}

pub(super) enum Msg {
    Job(Job),
    Close,
}

/// The file, the chain, the policy.
pub(super) struct Writer {
    chain: Chain,
    path: PathBuf,
    file: File,
    size: u64,
    fsync: Fsync,
    rotate_size: Option<u64>,
    dirty: bool,
    /// The `chain_start` a rotation owes the new file: written with the next batch,
    /// so it is rolled back with it if that write fails.
    pending_start: Option<Members>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Each sealed line, once written, for whoever follows the log live.
    feed: tokio::sync::broadcast::Sender<Arc<str>>,
    /// This process's hold on the log: a second writer would break the chain.
    _lock: crate::lockfile::Lock,
}

fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(file)
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Members of a record vizor writes about the log itself.
fn members(event: &str, extra: serde_json::Value) -> Members {
    let mut v = serde_json::json!({"ts": now(), "event": event});
    if let (Some(m), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
        m.extend(e);
    }
    // An object with "ts" and "event" always has members.
    Members::of(&v).unwrap_or_else(|_| unreachable!())
}

/// What the end of a file holds.
struct Tail {
    /// The last sealed lines (up to two), newest first.
    sealed: Vec<Vec<u8>>,
    /// Whether the file ends mid-line (a newline must come first).
    mid_line: bool,
    /// Whether something unsealed follows the last sealed line.
    torn: bool,
}

/// The end of a file.
fn tail(file: &mut File, len: u64) -> std::io::Result<Tail> {
    const WINDOW: u64 = 1 << 20;
    let start = len.saturating_sub(WINDOW);
    file.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    file.take(WINDOW).read_to_end(&mut buf)?;
    let mid_line = !buf.ends_with(b"\n");
    let mut torn = mid_line;
    let mut lines: Vec<&[u8]> = buf.split(|b| *b == b'\n').collect();
    if torn || lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop(); // the incomplete record, or the empty piece after the last newline
    }
    if start > 0 && !lines.is_empty() {
        lines.remove(0); // may begin mid-line
    }
    // A complete line that is not sealed after the last sealed one is the remains of an
    // earlier crash (or of a failed restart): sealed over like an incomplete record.
    if lines.last().is_some_and(|l| chain::split(l).is_none()) {
        torn = true;
    }
    let sealed: Vec<Vec<u8>> = lines
        .iter()
        .rev()
        .filter(|l| chain::split(l).is_some())
        .take(2)
        .map(|l| l.to_vec())
        .collect();
    Ok(Tail {
        sealed,
        mid_line,
        torn,
    })
}

fn field(line: &[u8], name: &str) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    v.get(name).cloned()
}

impl Writer {
    /// Opens the log: continues the chain of an existing file whose last record this
    /// key verifies, or starts a new chain (moving an unverifiable file aside).
    /// Returns the writer and, when a file was moved aside, a note saying so.
    pub fn open(
        path: &Path,
        key: ChainKey,
        fsync: Fsync,
        rotate_size: Option<u64>,
        metrics: Option<Arc<crate::metrics::Metrics>>,
        feed: tokio::sync::broadcast::Sender<Arc<str>>,
    ) -> std::io::Result<(Writer, Option<String>)> {
        let dir = match path.parent() {
            Some(d) if d.as_os_str().is_empty() => Path::new("."),
            Some(d) => d,
            None => Path::new("/"),
        };
        if !dir.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("its directory {} does not exist", dir.display()),
            ));
        }
        // Taken before the file is even read: a second process must not move the
        // first's log aside, nor continue its chain.
        let lock = crate::lockfile::Lock::take(&crate::lockfile::of_log(path))
            .map_err(std::io::Error::other)?;
        let file = open_append(path)?;
        let len = file.metadata()?.len();
        let mut w = Writer {
            chain: Chain::new(key),
            path: path.to_owned(),
            file,
            size: len,
            fsync,
            rotate_size,
            dirty: false,
            pending_start: None,
            metrics,
            feed,
            _lock: lock,
        };
        if len == 0 {
            w.start_chain(members("chain_start", serde_json::json!({"reason": "new"})))?;
            return Ok((w, None));
        }
        let Tail {
            sealed,
            mid_line,
            torn,
        } = tail(&mut w.file, len)?;
        match w.continuable(&sealed) {
            Some((seq, chain)) => {
                w.chain.continue_at(seq + 1, chain);
                let mut out = Vec::new();
                if mid_line {
                    out.push(b'\n');
                }
                let m = members(
                    "audit_open",
                    serde_json::json!({"reason": "restart", "torn_tail": torn}),
                );
                w.chain.seal(&m, &mut out);
                if let Err(e) = w.write_synced(&out) {
                    let _ = w.file.set_len(len);
                    return Err(e);
                }
                Ok((w, None))
            }
            None => {
                let aside = w.aside_name();
                std::fs::rename(path, &aside)?;
                w.file = open_append(path)?;
                sync_dir(path);
                w.size = 0;
                let name = file_name(&aside);
                w.start_chain(members(
                    "chain_start",
                    serde_json::json!({"reason": "new", "previous_file_not_continued": name}),
                ))?;
                Ok((
                    w,
                    Some(format!(
                        "the audit log's last record is not sealed with this key; it was moved to {} and a new chain started",
                        aside.display()
                    )),
                ))
            }
        }
    }

    /// The (seq, chain) to continue from, if the last record verifies.
    fn continuable(&self, sealed: &[Vec<u8>]) -> Option<(u64, [u8; 32])> {
        let last = sealed.first()?;
        let seq = field(last, "seq")?.as_u64()?;
        let prev = match sealed.get(1) {
            Some(before) => chain::split(before)?.1,
            None => match field(last, "prev_chain") {
                Some(serde_json::Value::String(h)) => chain::unhex(&h)?,
                _ => GENESIS,
            },
        };
        let chain = self.chain.key().check(&prev, last).ok()?;
        Some((seq, chain))
    }

    fn start_chain(&mut self, m: Members) -> std::io::Result<()> {
        self.chain.continue_at(0, GENESIS);
        let mut out = Vec::new();
        self.chain.seal(&m, &mut out);
        self.write_synced(&out)
    }

    fn write_synced(&mut self, out: &[u8]) -> std::io::Result<()> {
        self.file.write_all(out)?;
        self.size += out.len() as u64;
        self.file.sync_data()
    }

    /// `PATH.<UTC time>-<seq of the next record>`: names sort in the order written.
    fn rotated_name(&self) -> PathBuf {
        self.free_name(&format!("{}-{:012}", stamp(), self.chain.seq()))
    }

    /// `PATH.unverified-<UTC time>`: a file this key could not continue, kept apart
    /// from the rotated files of the chain.
    fn aside_name(&self) -> PathBuf {
        self.free_name(&format!("unverified-{}", stamp()))
    }

    fn free_name(&self, suffix: &str) -> PathBuf {
        let base = format!("{}.{suffix}", self.path.display());
        let mut candidate = PathBuf::from(&base);
        let mut n = 1;
        while candidate.exists() {
            candidate = PathBuf::from(format!("{base}.{n}"));
            n += 1;
        }
        candidate
    }

    /// Moves the full file aside and continues the chain in a new one.
    /// The new file's `chain_start` is left in `pending_start` for the next batch.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        let aside = self.rotated_name();
        std::fs::rename(&self.path, &aside)?;
        match open_append(&self.path) {
            Ok(f) => self.file = f,
            Err(e) => {
                // Keep writing to the full file rather than to nothing.
                std::fs::rename(&aside, &self.path)?;
                return Err(e);
            }
        }
        sync_dir(&self.path);
        self.size = 0;
        self.pending_start = Some(members(
            "chain_start",
            serde_json::json!({
                "reason": "rotated",
                "prev_file": file_name(&aside),
                "prev_chain": chain::hex(&self.chain.value()),
            }),
        ));
        Ok(())
    }

    fn count(&self, event: &str, ok: bool) {
        if let Some(m) = &self.metrics {
            if ok {
                m.audit_events_total.with_label_values(&[event]).inc();
            } else {
                m.audit_write_errors_total.inc();
            }
        }
    }

    /// Seals and writes a batch; acknowledges each job.
    fn write_batch(&mut self, jobs: Vec<Job>) {
        let mut result = Ok(());
        if self.pending_start.is_none() && self.rotate_size.is_some_and(|max| self.size >= max) {
            result = self.rotate();
        }
        let (seq0, chain0, size0) = (self.chain.seq(), self.chain.value(), self.size);
        let mut out = Vec::new();
        let mut boundary = false;
        if result.is_ok() {
            if let Some(start) = self.pending_start.clone() {
                self.chain.seal(&start, &mut out);
                boundary = true;
            }
            for job in &jobs {
                self.chain.seal(&job.members, &mut out);
                boundary |= job.session_boundary;
            }
            result = self.file.write_all(&out);
            if result.is_ok() {
                self.size += out.len() as u64;
                result = match self.fsync {
                    Fsync::Always => self.file.sync_data(),
                    Fsync::Session if boundary => self.file.sync_data(),
                    _ => {
                        self.dirty = true;
                        Ok(())
                    }
                };
            }
        }
        match &result {
            Ok(()) => {
                self.pending_start = None;
                // Written: to whoever follows the log (dropped for one that lags).
                if self.feed.receiver_count() > 0 {
                    for line in out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                        if let Ok(text) = std::str::from_utf8(line) {
                            let _ = self.feed.send(Arc::from(text));
                        }
                    }
                }
            }
            Err(e) => {
                // Nothing of this batch is acknowledged: take it back off the disk.
                if let Err(t) = self.file.set_len(size0) {
                    warn!(error = %t, "audit log: a failed write could not be taken back");
                }
                self.chain.continue_at(seq0, chain0);
                self.size = self.file.metadata().map(|m| m.len()).unwrap_or(size0);
                warn!(error = %e, records = jobs.len(), "audit log write failed");
            }
        }
        for job in jobs {
            self.count(job.event, result.is_ok());
            if let Some(ack) = job.ack {
                let _ = ack.send(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
            }
        }
    }

    /// Runs until [`Msg::Close`] or every sender is gone; the last record says the log
    /// was closed, and everything is synced.
    /// Writes what arrives until closed; `queued` counts jobs sent and not yet taken.
    pub fn run(
        mut self,
        rx: Receiver<Msg>,
        queued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let mut last_sync = Instant::now();
        loop {
            let first = match self.fsync {
                Fsync::Interval(every) if self.dirty => {
                    let wait = every.saturating_sub(last_sync.elapsed());
                    match rx.recv_timeout(wait) {
                        Ok(m) => m,
                        Err(RecvTimeoutError::Timeout) => {
                            if self.file.sync_data().is_ok() {
                                self.dirty = false;
                            }
                            last_sync = Instant::now();
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => Msg::Close,
                    }
                }
                _ => rx.recv().unwrap_or(Msg::Close),
            };
            let mut jobs = Vec::new();
            let mut closing = false;
            match first {
                Msg::Job(j) => jobs.push(j),
                Msg::Close => closing = true,
            }
            while !closing && jobs.len() < 1024 {
                match rx.try_recv() {
                    Ok(Msg::Job(j)) => jobs.push(j),
                    Ok(Msg::Close) => closing = true,
                    Err(_) => break,
                }
            }
            if !jobs.is_empty() {
                queued.fetch_sub(jobs.len(), std::sync::atomic::Ordering::Relaxed);
                self.write_batch(jobs);
            }
            if let Fsync::Interval(every) = self.fsync {
                if self.dirty && last_sync.elapsed() >= every {
                    if self.file.sync_data().is_ok() {
                        self.dirty = false;
                    }
                    last_sync = Instant::now();
                }
            }
            if closing {
                let m = members("audit_close", serde_json::json!({}));
                let mut out = Vec::new();
                self.chain.seal(&m, &mut out);
                if let Err(e) = self.write_synced(&out) {
                    warn!(error = %e, "audit log: closing record not written");
                }
                return;
            }
        }
    }
}

fn stamp() -> String {
    humantime::format_rfc3339_millis(SystemTime::now())
        .to_string()
        .replace(['-', ':'], "")
}

/// Makes a rename in `path`'s directory durable.
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
