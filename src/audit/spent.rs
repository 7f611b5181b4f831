//! The tokens an audit log says were spent (`token_used`) and have not expired: read
//! at start, so a token spent before a restart stays spent after it.
//!
//! A token opens for at most [`crate::token::MAX_LIFETIME`] after any check of it, so
//! a record written longer ago than that names an expired token: files (the log and
//! its rotated and set-aside files) last written before then are not read.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// What the scan found.
#[derive(Debug, Default)]
pub struct Spent {
    /// Each unexpired spent token: its id (the first 8 bytes of its nonce) and when it
    /// expires (Unix seconds).
    pub tokens: Vec<([u8; 8], u64)>,
    /// Files read.
    pub files: usize,
    /// `token_used` records that could not be read (counted, skipped).
    pub unreadable: usize,
}

/// The files of the log at `path` that may hold records of unexpired tokens: the log
/// and the files named `<name>.*` beside it (rotated, set aside), written since
/// `since`.
fn files(path: &Path, since: SystemTime) -> std::io::Result<Vec<PathBuf>> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(n) = file_name.to_str() else {
            continue;
        };
        if n != name && !n.starts_with(&prefix) {
            continue;
        }
        let meta = entry.metadata()?;
        if meta.is_file() && meta.modified().map_or(true, |m| m >= since) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Reads the `token_used` records of the log at `path` for tokens unexpired at `now`
/// (Unix seconds).
pub fn spent_tokens(path: &Path, now: u64) -> std::io::Result<Spent> {
    let window = crate::token::MAX_LIFETIME + Duration::from_secs(60);
    let since = (SystemTime::UNIX_EPOCH + Duration::from_secs(now))
        .checked_sub(window)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut spent = Spent::default();
    for file in files(path, since)? {
        let reader = match std::fs::File::open(&file) {
            Ok(f) => std::io::BufReader::with_capacity(1 << 16, f),
            // Rotated away since the listing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        spent.files += 1;
        for line in reader.split(b'\n') {
            let line = line?;
            if !contains(&line, br#""event":"token_used""#) {
                continue;
            }
            match used(&line) {
                Some((id, expires)) if expires > now => spent.tokens.push((id, expires)),
                Some(_) => {}
                None => spent.unreadable += 1,
            }
        }
    }
    Ok(spent)
}

/// The token id and expiry of one `token_used` record.
fn used(line: &[u8]) -> Option<([u8; 8], u64)> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    let hex = v.get("token_id")?.as_str()?;
    if hex.len() != 16 {
        return None;
    }
    let mut id = [0u8; 8];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    let expires = humantime::parse_rfc3339(v.get("expires_at")?.as_str()?).ok()?;
    let expires = expires
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some((id, expires))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, expires: &str) -> String {
        format!(
            r#"{{"v":2,"seq":3,"event":"token_used","token_id":"{id}","expires_at":"{expires}","user":"u","domain":"d","kind":"vnc","client":"1.2.3.4:5","ts":"2026-12-05T10:00:00Z","chain":"00"}}"#
        )
    }

    #[test]
    fn the_unexpired_spent_tokens_of_the_log_and_its_rotated_files_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.jsonl");
        // 2026-12-05T12:00:00Z
        let now = 1_796_472_000;
        std::fs::write(
            dir.path()
                .join("audit.jsonl.20261205T090000Z-00000000000000000010"),
            format!(
                "{}\n{}\n",
                record("0011223344556677", "2026-12-05T12:30:00Z"),
                record("8899aabbccddeeff", "2026-12-05T11:59:00Z")
            ),
        )
        .unwrap();
        std::fs::write(
            &log,
            format!(
                "{}\n{}\n{}",
                record("a0a1a2a3a4a5a6a7", "2026-12-06T11:00:00Z"),
                r#"{"event":"token_used","token_id":"zz"}"#,
                // A torn last line.
                &record("b0b1b2b3b4b5b6b7", "2026-12-06T11:00:00Z")[..20]
            ),
        )
        .unwrap();
        // Not the log's: another log's, and the lock file.
        std::fs::write(
            dir.path().join("other.jsonl"),
            record("c0c1c2c3c4c5c6c7", "2026-12-06T11:00:00Z"),
        )
        .unwrap();
        std::fs::write(dir.path().join(".audit.jsonl.lock"), "1\n").unwrap();
        let spent = spent_tokens(&log, now).unwrap();
        let mut ids: Vec<_> = spent.tokens.iter().map(|(id, _)| id[0]).collect();
        ids.sort();
        assert_eq!(ids, [0x00, 0xa0], "{spent:?}");
        assert_eq!(spent.files, 2);
        assert_eq!(
            spent.unreadable, 1,
            "the bad record; the torn line names no event"
        );
        assert!(spent.tokens.contains(&(
            [0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77],
            1_796_473_800
        )));
    }

    #[test]
    fn files_written_before_any_token_could_still_open_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.jsonl");
        std::fs::write(&log, record("0011223344556677", "2100-01-01T00:00:00Z")).unwrap();
        let written = std::fs::metadata(&log)
            .unwrap()
            .modified()
            .unwrap()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let later = written + crate::token::MAX_LIFETIME.as_secs() + 120;
        let spent = spent_tokens(&log, later).unwrap();
        assert_eq!(spent.files, 0);
        assert!(spent.tokens.is_empty());
        let spent = spent_tokens(&log, written + 10).unwrap();
        assert_eq!(spent.tokens.len(), 1);
    }
}
