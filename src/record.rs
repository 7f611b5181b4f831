//! Session recordings (`[audit] record_dir`): what a VNC session's browser received
//! from the VM, from ServerInit on, with the time each piece was relayed.
//!
//! File layout: the line `vizor-recording-v1`, one JSON header line (session, domain,
//! user, start time), then frames of `u64 LE microseconds since the start | u32 LE
//! length | bytes`. The first frame is the ServerInit the browser received. The
//! session's `session_end` audit record names the file with its length and SHA-256,
//! so the chain vouches for the recording too.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

const MAGIC: &[u8] = b"vizor-recording-v1\n";
/// The largest frame a reader accepts: relayed pieces are far smaller.
const MAX_FRAME: usize = 64 << 20;

/// Writes one session's recording.
pub struct Recorder {
    path: PathBuf,
    out: BufWriter<File>,
    hash: Sha256,
    bytes: u64,
    start: Instant,
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
    /// Creates `dir/session-<id>-<time>.vzr` (mode 0600) and writes its header.
    pub fn create(
        dir: &Path,
        header: &serde_json::Value,
        session: u64,
    ) -> std::io::Result<Recorder> {
        use std::os::unix::fs::OpenOptionsExt;
        let stamp = humantime::format_rfc3339_millis(SystemTime::now())
            .to_string()
            .replace(['-', ':'], "");
        let path = dir.join(format!("session-{session}-{stamp}.vzr"));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let mut r = Recorder {
            path,
            out: BufWriter::with_capacity(64 * 1024, file),
            hash: Sha256::new(),
            bytes: 0,
            start: Instant::now(),
        };
        r.put(MAGIC)?;
        let mut line = header.to_string().into_bytes();
        line.push(b'\n');
        r.put(&line)?;
        Ok(r)
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)?;
        self.hash.update(bytes);
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Appends what the browser was just sent.
    pub fn frame(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let micros = self.start.elapsed().as_micros() as u64;
        self.put(&micros.to_le_bytes())?;
        self.put(&(bytes.len() as u32).to_le_bytes())?;
        self.put(bytes)
    }

    /// Flushes and syncs the file; its name, length and digest.
    pub fn finish(mut self) -> std::io::Result<Finished> {
        self.out.flush()?;
        self.out.get_ref().sync_data()?;
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

    #[test]
    fn a_recording_reads_back_and_its_digest_is_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Recorder::create(dir.path(), &serde_json::json!({"session": 3}), 3).unwrap();
        r.frame(b"server init").unwrap();
        r.frame(b"update").unwrap();
        let done = r.finish().unwrap();
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
}
