//! The audit log's HMAC chain, and its verification.
//!
//! A record is one line: a JSON object whose last member is `"chain"`, the hex
//! HMAC-SHA256 (keyed with the chain key) over the previous record's chain value (32
//! bytes) followed by the record's bytes up to that member, closed with `}`. The exact
//! bytes are authenticated, so no canonical JSON is needed. The first record of a new
//! chain is a `chain_start` record chained from 32 zero bytes; the first record of a
//! file opened by rotation is a `chain_start` carrying the previous file's last chain
//! value, from which it is chained.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::Path;
use zeroize::Zeroizing;

/// The chain value before the first record of a new chain.
pub const GENESIS: [u8; 32] = [0; 32];

/// The label that derives the chain key from a `vizor keygen` key file.
pub const KEY_LABEL: &[u8] = b"vizor audit chain v1";

const CHAIN_TAIL_LEN: usize = ",\"chain\":\"".len() + 64 + "\"}".len();

/// The key of the chain.
pub struct ChainKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChainKey(<redacted>)")
    }
}

/// Compared in constant time: a secret.
impl PartialEq for ChainKey {
    fn eq(&self, other: &ChainKey) -> bool {
        use subtle::ConstantTimeEq;
        self.0.ct_eq(&*other.0).into()
    }
}

impl ChainKey {
    /// The chain key derived from a `vizor keygen` key file.
    pub fn load(path: &Path) -> Result<ChainKey, crate::token::KeyError> {
        let key = crate::token::TokenKey::load(path).map_err(|e| e.named("audit key"))?;
        Ok(Self::from_token_key(&key))
    }

    /// The chain key derived from a loaded key.
    pub fn from_token_key(key: &crate::token::TokenKey) -> ChainKey {
        ChainKey(key.derive(KEY_LABEL))
    }

    fn mac(&self, prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
        // HMAC takes keys of any length; 32 bytes cannot fail.
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&*self.0).unwrap_or_else(|_| unreachable!());
        mac.update(prev);
        mac.update(body);
        mac.finalize().into_bytes().into()
    }

    /// Seals `body` (a JSON object) after `prev`: appends the line with its newline to
    /// `out` and returns the new chain value.
    pub fn seal(&self, prev: &[u8; 32], body: &[u8], out: &mut Vec<u8>) -> [u8; 32] {
        let chain = self.mac(prev, body);
        debug_assert!(body.ends_with(b"}"));
        out.extend_from_slice(&body[..body.len().saturating_sub(1)]);
        out.extend_from_slice(b",\"chain\":\"");
        out.extend_from_slice(hex(&chain).as_bytes());
        out.extend_from_slice(b"\"}\n");
        chain
    }

    /// Whether `line` (without its newline) is sealed after `prev`; its chain value.
    pub fn check(&self, prev: &[u8; 32], line: &[u8]) -> Result<[u8; 32], &'static str> {
        let (body, chain) = split(line).ok_or("not a sealed record")?;
        let want = self.mac(prev, &body);
        if bool::from(subtle::ConstantTimeEq::ct_eq(&want[..], &chain[..])) {
            Ok(chain)
        } else {
            Err("chain value does not match")
        }
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 64 hex digits.
pub fn unhex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    // Lowercase only, as written: "0F" or "+f" for "0f" would change the record's
    // bytes without changing what they parse to.
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let bytes = text.as_bytes();
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(bytes[2 * i])? << 4 | digit(bytes[2 * i + 1])?;
    }
    Some(out)
}

/// A sealed line's authenticated body (closed with `}`) and chain value.
pub fn split(line: &[u8]) -> Option<(Vec<u8>, [u8; 32])> {
    if line.len() < CHAIN_TAIL_LEN + 2 || !line.starts_with(b"{") {
        return None;
    }
    let (head, tail) = line.split_at(line.len() - CHAIN_TAIL_LEN);
    let hex_part = tail.strip_prefix(b",\"chain\":\"")?.strip_suffix(b"\"}")?;
    let chain = unhex(std::str::from_utf8(hex_part).ok()?)?;
    let mut body = head.to_vec();
    body.push(b'}');
    Some((body, chain))
}

/// The outcome of verifying files.
#[derive(Debug, Default)]
pub struct Report {
    /// Records checked.
    pub records: u64,
    /// The last record's sequence number and chain value (an anchor to keep
    /// elsewhere: truncation after it is detectable against it).
    pub last: Option<(u64, String)>,
    /// Things an auditor should know that do not break the chain.
    pub notes: Vec<String>,
    /// The first broken record: file, line (1-based), what is wrong.
    pub broken: Option<(String, usize, String)>,
}

/// Verifies `files`, oldest first (rotated files, then the current one).
pub fn verify(key: &ChainKey, files: &[impl AsRef<Path>]) -> std::io::Result<Report> {
    verify_into(key, files, None)
}

/// Verifies `files` and returns the records it authenticated, for a reader that must
/// see nothing else (an unsealed line, an incomplete last record).
pub fn verified_records(
    key: &ChainKey,
    files: &[impl AsRef<Path>],
) -> std::io::Result<(Report, Vec<serde_json::Value>)> {
    let mut records = Vec::new();
    let report = verify_into(key, files, Some(&mut records))?;
    Ok((report, records))
}

fn verify_into(
    key: &ChainKey,
    files: &[impl AsRef<Path>],
    mut collect: Option<&mut Vec<serde_json::Value>>,
) -> std::io::Result<Report> {
    let mut report = Report::default();
    // (seq, chain) of the last good record.
    let mut state: Option<(u64, [u8; 32])> = None;
    for file in files {
        let path = file.as_ref();
        let shown = path.display().to_string();
        let text = std::fs::read(path)?;
        // Complete lines, and what follows the last newline: an incomplete record when
        // vizor died mid-write or is writing now.
        let (complete, partial): (&[u8], &[u8]) = match text.iter().rposition(|b| *b == b'\n') {
            Some(i) => (&text[..i], &text[i + 1..]),
            None => (&[], &text),
        };
        let lines: Vec<&[u8]> = if text.contains(&b'\n') {
            complete.split(|b| *b == b'\n').collect()
        } else {
            Vec::new()
        };
        let mut torn_at: Option<usize> = None;
        for (i, line) in lines.iter().enumerate() {
            let (lineno, line) = (i + 1, *line);
            let value: Option<serde_json::Value> = serde_json::from_slice(line).ok();
            let Some(value) = value.filter(|v| v.get("chain").is_some()) else {
                if torn_at.is_some() {
                    return Ok(broken(report, &shown, lineno - 1, "not a record".into()));
                }
                torn_at = Some(lineno);
                continue;
            };
            let event = value["event"].as_str().unwrap_or("");
            let seq = value["seq"].as_u64();
            let Some(seq) = seq else {
                return Ok(broken(report, &shown, lineno, "record without seq".into()));
            };
            let prev = match (event, state, lineno == 1) {
                ("chain_start", _, true) if value["reason"] == "rotated" => {
                    let Some(prev) = value["prev_chain"].as_str().and_then(unhex) else {
                        return Ok(broken(
                            report,
                            &shown,
                            lineno,
                            "rotated chain_start without prev_chain".into(),
                        ));
                    };
                    match state {
                        Some((s, c)) if c != prev || seq != s + 1 => {
                            return Ok(broken(
                                report,
                                &shown,
                                lineno,
                                "does not continue the previous file's chain (a file or its last records are missing)".into(),
                            ))
                        }
                        Some(_) => {}
                        None => report.notes.push(format!(
                            "{shown}: continues {} (not given), from its record {}",
                            value["prev_file"].as_str().unwrap_or("a rotated file"),
                            seq.saturating_sub(1)
                        )),
                    }
                    prev
                }
                ("chain_start", _, true) => {
                    if state.is_some() {
                        report
                            .notes
                            .push(format!("{shown}: a new chain starts (not a rotation)"));
                    }
                    if seq != 0 {
                        return Ok(broken(
                            report,
                            &shown,
                            lineno,
                            "a new chain must start at seq 0".into(),
                        ));
                    }
                    GENESIS
                }
                (_, None, _) => {
                    return Ok(broken(
                        report,
                        &shown,
                        lineno,
                        "the file does not start with chain_start (its first records are missing)"
                            .into(),
                    ))
                }
                (_, Some((s, c)), _) => {
                    if seq != s + 1 {
                        return Ok(broken(
                            report,
                            &shown,
                            lineno,
                            format!("seq {seq} follows {s} (records removed or reordered)"),
                        ));
                    }
                    c
                }
            };
            if let Some(t) = torn_at.take() {
                if !(event == "audit_open" && value["torn_tail"] == true) {
                    return Ok(broken(report, &shown, t, "not a record".into()));
                }
                report.notes.push(format!(
                    "{shown}:{t}: an incomplete record from a crash, sealed over by the next start"
                ));
            }
            match key.check(&prev, line) {
                Ok(chain) => {
                    state = Some((seq, chain));
                    if let Some(c) = collect.as_deref_mut() {
                        c.push(value);
                    }
                }
                Err(why) => {
                    return Ok(broken(
                        report,
                        &shown,
                        lineno,
                        format!(
                        "{why}: edited, or records before it removed or reordered (or another key)"
                    ),
                    ))
                }
            }
            report.records += 1;
        }
        if let Some(t) = torn_at {
            return Ok(broken(report, &shown, t, "not a record".into()));
        }
        if !partial.is_empty() {
            report.notes.push(format!(
                "{shown}:{}: incomplete last record (vizor died mid-write, or is writing)",
                lines.len() + 1
            ));
        }
    }
    report.last = state.map(|(s, c)| (s, hex(&c)));
    Ok(report)
}

fn broken(mut report: Report, file: &str, line: usize, why: String) -> Report {
    report.broken = Some((file.to_owned(), line, why));
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ChainKey {
        ChainKey(Zeroizing::new([7; 32]))
    }

    #[test]
    fn sealed_lines_check_and_edits_do_not() {
        let k = key();
        let mut out = Vec::new();
        let c1 = k.seal(&GENESIS, br#"{"seq":0,"event":"chain_start"}"#, &mut out);
        let first = out.clone();
        let c2 = k.seal(&c1, br#"{"seq":1,"event":"key"}"#, &mut out);
        let second = &out[first.len()..out.len() - 1];
        assert_eq!(k.check(&c1, second), Ok(c2));
        assert!(k.check(&GENESIS, second).is_err(), "wrong predecessor");
        let mut edited = second.to_vec();
        edited[10] ^= 1;
        assert!(k.check(&c1, &edited).is_err());
        let other = ChainKey(Zeroizing::new([8; 32]));
        assert!(other.check(&c1, second).is_err());
        let v: serde_json::Value = serde_json::from_slice(second).unwrap();
        assert_eq!(v["chain"], hex(&c2));
    }

    #[test]
    fn chain_values_are_lowercase_hex_only() {
        let good = "0f".repeat(32);
        assert!(unhex(&good).is_some());
        for bad in [
            "0F".repeat(32),
            format!("+f{}", "0f".repeat(31)),
            "0f".repeat(31),
        ] {
            assert!(unhex(&bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn split_refuses_what_is_not_sealed() {
        for bad in [
            &b""[..],
            b"{}",
            b"{\"chain\":\"00\"}",
            &[b'{'; 100],
            "{\"a\":1,\"chain\":\"zz00000000000000000000000000000000000000000000000000000000000000\"}".as_bytes(),
        ] {
            assert!(split(bad).is_none());
        }
    }
}
