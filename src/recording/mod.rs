//! Session recordings (`[audit] record_dir`): what a VNC session's browser received
//! from the VM, from ServerInit on, with the time each piece was relayed.
//!
//! File layout: the line `vizor-recording-v1`, one JSON header line (session, domain,
//! user, start time), then frames of `u64 LE microseconds since the start | u32 LE
//! length | bytes`. The first frame is the ServerInit the browser received. The
//! session's `session_end` audit record names the file with its length and SHA-256,
//! so the chain vouches for the recording too.
//!
//! A session hands its [`Recorder`] each piece the browser is sent; a task of the
//! recording's own writes them, so the relay never waits on the disk, only for room
//! in a short queue. [`replay`] serves a recording back to noVNC.

use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

pub mod replay;

const MAGIC: &[u8] = b"vizor-recording-v1\n";
/// The largest frame a reader accepts: relayed pieces are far smaller.
const MAX_FRAME: usize = 64 << 20;

/// How many pieces may wait for the writer before the relay waits for room.
const QUEUE: usize = 32;
/// How many bytes may wait for the writer: a piece larger than this waits alone.
const QUEUE_BYTES: usize = 4 << 20;

/// A piece for the writer: its time, its bytes, and its share of the queue's room.
type Piece = (u64, Bytes, OwnedSemaphorePermit);

/// Records one session: takes each piece the browser is sent, in order, for a writer
/// task of its own. The queue between them is bounded in pieces and in bytes; a
/// writer that takes no room for `stall` ends the recording (and the session).
pub struct Recorder {
    tx: mpsc::Sender<Piece>,
    room: Arc<Semaphore>,
    start: Instant,
    stall: Duration,
    /// Why the writer stopped, once it has.
    failed: Arc<Mutex<Option<String>>>,
    done: tokio::task::JoinHandle<std::io::Result<Finished>>,
}

/// What the audit log says of a finished recording.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finished {
    /// The file's name in `record_dir`.
    pub file: String,
    /// Its length.
    pub bytes: u64,
    /// Its SHA-256, hex.
    pub sha256: String,
}

impl Recorder {
    /// Creates `dir/session-<id>-<time>.vzr` (mode 0600), writes its header, and starts
    /// its writer; `stall` bounds every wait on it.
    pub async fn start(
        dir: &Path,
        header: &serde_json::Value,
        session: u64,
        stall: Duration,
    ) -> std::io::Result<Recorder> {
        let stamp = humantime::format_rfc3339_millis(SystemTime::now())
            .to_string()
            .replace(['-', ':'], "");
        let path = dir.join(format!("session-{session}-{stamp}.vzr"));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .await?;
        let mut w = Writer {
            path,
            out: BufWriter::with_capacity(64 * 1024, file),
            hash: Sha256::new(),
            bytes: 0,
        };
        let start = Instant::now();
        w.put(MAGIC).await?;
        let mut line = header.to_string().into_bytes();
        line.push(b'\n');
        w.put(&line).await?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let failed = Arc::new(Mutex::new(None));
        let done = tokio::spawn(w.run(rx, failed.clone()));
        Ok(Recorder {
            tx,
            room: Arc::new(Semaphore::new(QUEUE_BYTES)),
            start,
            stall,
            failed,
            done,
        })
    }

    /// Appends what the browser was just sent (waiting only for room in the queue).
    /// `Err`: the recording cannot go on.
    pub async fn frame(&self, bytes: Bytes) -> std::io::Result<()> {
        let micros = self.start.elapsed().as_micros() as u64;
        // Its share of the byte bound: a piece larger than the bound waits for all of it.
        let share = u32::try_from(bytes.len().clamp(1, QUEUE_BYTES)).unwrap_or(u32::MAX);
        let queued = async {
            let permit = self.room.clone().acquire_many_owned(share).await.ok()?;
            self.tx.send((micros, bytes, permit)).await.ok()
        };
        match tokio::time::timeout(self.stall, queued).await {
            Ok(Some(())) => Ok(()),
            Ok(None) => Err(std::io::Error::other(self.why_stopped())),
            Err(_) => Err(std::io::Error::other(format!(
                "its writer took nothing for {}",
                humantime::format_duration(self.stall)
            ))),
        }
    }

    fn why_stopped(&self) -> String {
        self.failed
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .unwrap_or_else(|| "its writer stopped".to_owned())
    }

    /// Writes what is queued, syncs the file; its name, length and digest.
    pub async fn finish(self) -> std::io::Result<Finished> {
        drop(self.tx);
        match tokio::time::timeout(self.stall, self.done).await {
            Ok(done) => done.map_err(std::io::Error::other)?,
            Err(_) => Err(std::io::Error::other(format!(
                "its writer did not finish in {}",
                humantime::format_duration(self.stall)
            ))),
        }
    }
}

/// A recording's file, written by its own task.
struct Writer {
    path: PathBuf,
    out: BufWriter<tokio::fs::File>,
    hash: Sha256,
    bytes: u64,
}

impl Writer {
    async fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes).await?;
        self.hash.update(bytes);
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Piece>,
        failed: Arc<Mutex<Option<String>>>,
    ) -> std::io::Result<Finished> {
        let result: std::io::Result<Finished> = async {
            while let Some((micros, bytes, room)) = rx.recv().await {
                let len = u32::try_from(bytes.len())
                    .map_err(|_| std::io::Error::other("a piece of 4 GiB or more"))?;
                self.put(&micros.to_le_bytes()).await?;
                self.put(&len.to_le_bytes()).await?;
                self.put(&bytes).await?;
                // Its room goes back once it is in the file's buffer.
                drop(room);
            }
            self.out.flush().await?;
            self.out.get_ref().sync_data().await?;
            Ok(Finished {
                file: self
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                bytes: self.bytes,
                sha256: crate::audit::chain::hex(&self.hash.finalize()),
            })
        }
        .await;
        if let Err(e) = &result {
            if let Ok(mut f) = failed.lock() {
                *f = Some(e.to_string());
            }
        }
        result
    }
}

/// A recording read back.
#[derive(Debug)]
pub struct Recording {
    /// The header.
    pub header: serde_json::Value,
    /// The frames: when, and what. The first is the ServerInit.
    pub frames: Vec<(Duration, Vec<u8>)>,
}

/// Reads a recording; an incomplete last frame (a recording cut short) is dropped.
pub fn read(path: &Path) -> Result<Recording, String> {
    let shown = path.display();
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| format!("recording {shown}: {e}"))?;
    let rest = data
        .strip_prefix(MAGIC)
        .ok_or_else(|| format!("recording {shown}: not a vizor recording"))?;
    let nl = rest
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| format!("recording {shown}: no header"))?;
    let header: serde_json::Value = serde_json::from_slice(&rest[..nl])
        .map_err(|e| format!("recording {shown}: bad header: {e}"))?;
    let mut rest = &rest[nl + 1..];
    let mut frames = Vec::new();
    while rest.len() >= 12 {
        let (at, tail) = rest.split_at(8);
        let (len, tail) = tail.split_at(4);
        let at = u64::from_le_bytes(at.try_into().unwrap_or_default());
        let len = u32::from_le_bytes(len.try_into().unwrap_or_default()) as usize;
        if len > MAX_FRAME {
            return Err(format!("recording {shown}: a frame of {len} bytes"));
        }
        if tail.len() < len {
            break;
        }
        frames.push((Duration::from_micros(at), tail[..len].to_vec()));
        rest = &tail[len..];
    }
    if frames.is_empty() {
        return Err(format!("recording {shown}: no ServerInit"));
    }
    Ok(Recording { header, frames })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_recording_reads_back_and_its_digest_is_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let r = Recorder::start(dir.path(), &serde_json::json!({"session": 3}), 3, STALL)
            .await
            .unwrap();
        r.frame(Bytes::from_static(b"server init")).await.unwrap();
        r.frame(Bytes::from_static(b"update")).await.unwrap();
        let done = r.finish().await.unwrap();
        let path = dir.path().join(&done.file);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(done.bytes, bytes.len() as u64);
        assert_eq!(
            done.sha256,
            crate::audit::chain::hex(&Sha256::digest(&bytes))
        );
        let rec = read(&path).unwrap();
        assert_eq!(rec.header["session"], 3);
        let frames: Vec<&[u8]> = rec.frames.iter().map(|(_, b)| &b[..]).collect();
        assert_eq!(frames, [&b"server init"[..], b"update"]);
        // Cut short: the incomplete frame is dropped; garbage is refused.
        std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        assert_eq!(read(&path).unwrap().frames.len(), 1);
        std::fs::write(&path, b"nope").unwrap();
        assert!(read(&path).unwrap_err().contains("not a vizor recording"));
    }

    #[tokio::test]
    async fn more_pieces_than_the_queue_holds_all_arrive_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let r = Recorder::start(dir.path(), &serde_json::json!({}), 4, STALL)
            .await
            .unwrap();
        let n = QUEUE * 8;
        for i in 0..n {
            r.frame(Bytes::from(i.to_le_bytes().to_vec()))
                .await
                .unwrap();
        }
        let done = r.finish().await.unwrap();
        let rec = read(&dir.path().join(&done.file)).unwrap();
        let got: Vec<usize> = rec
            .frames
            .iter()
            .map(|(_, b)| usize::from_le_bytes(b[..].try_into().unwrap()))
            .collect();
        assert_eq!(got, (0..n).collect::<Vec<_>>());
        // Their times are when they were handed over, in order.
        assert!(rec.frames.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    #[tokio::test]
    async fn pieces_beyond_the_byte_bound_wait_their_turn_and_all_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let r = Recorder::start(dir.path(), &serde_json::json!({}), 6, STALL)
            .await
            .unwrap();
        // Each larger than all the room there is: each waits for the one before.
        let big = |i: u8| Bytes::from(vec![i; QUEUE_BYTES + 1]);
        for i in 0..3 {
            r.frame(big(i)).await.unwrap();
        }
        let done = r.finish().await.unwrap();
        let rec = read(&dir.path().join(&done.file)).unwrap();
        assert_eq!(rec.frames.len(), 3);
        for (i, (_, b)) in rec.frames.iter().enumerate() {
            assert!(b.len() == QUEUE_BYTES + 1 && b.iter().all(|x| *x == i as u8));
        }
    }
}
