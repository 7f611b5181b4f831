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

/// The record schema version, every line's first member (`"v"`).
pub const SCHEMA: u32 = 2;

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

/// A record's own members, serialised once: `"ts"`, `"event"` and the event's fields,
/// with the closing brace and without the opening one, as [`Chain::seal`] continues a
/// line with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members(Vec<u8>);

impl Members {
    /// The members of `record`, which serialises to a JSON object with at least one
    /// member.
    pub fn of(record: &impl serde::Serialize) -> std::io::Result<Members> {
        let text = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        match text.strip_prefix(b"{") {
            Some(rest) if rest != b"}" && rest.ends_with(b"}") => Ok(Members(rest.to_vec())),
            _ => Err(std::io::Error::other(
                "an audit record must be a JSON object with members",
            )),
        }
    }
}

/// Where a chain stands (the next record's sequence number, the last chain value),
/// with its key: the one place a record line is built and sealed.
#[derive(Debug)]
pub struct Chain {
    key: ChainKey,
    seq: u64,
    value: [u8; 32],
}

impl Chain {
    /// A chain with `key`, before its first record.
    pub fn new(key: ChainKey) -> Chain {
        Chain {
            key,
            seq: 0,
            value: GENESIS,
        }
    }

    /// The key.
    pub fn key(&self) -> &ChainKey {
        &self.key
    }

    /// The next record's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The last record's chain value ([`GENESIS`] before the first).
    pub fn value(&self) -> [u8; 32] {
        self.value
    }

    /// Continues after the record `seq` whose chain value is `value` (or, with
    /// `(0, GENESIS)` as the next record, starts afresh).
    pub fn continue_at(&mut self, next_seq: u64, value: [u8; 32]) {
        self.seq = next_seq;
        self.value = value;
    }

    /// Appends the next record's line, `{"v":SCHEMA,"seq":N,<members>,"chain":"…"}`
    /// and its newline, to `out`, and moves the chain on.
    pub fn seal(&mut self, members: &Members, out: &mut Vec<u8>) {
        let mut body = format!("{{\"v\":{SCHEMA},\"seq\":{},", self.seq).into_bytes();
        body.extend_from_slice(&members.0);
        self.value = self.key.seal(&self.value, &body, out);
        self.seq += 1;
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
    fn a_chain_builds_each_line_in_one_place() {
        let mut chain = Chain::new(key());
        let mut out = Vec::new();
        let m = Members::of(&serde_json::json!({"ts": "t", "event": "chain_start"})).unwrap();
        chain.seal(&m, &mut out);
        chain.seal(&m, &mut out);
        let text = String::from_utf8(out.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // json! sorts its members: "event" before "ts".
        assert!(
            lines[0].starts_with(r#"{"v":2,"seq":0,"event":"chain_start","ts":"t","chain":""#),
            "{}",
            lines[0]
        );
        assert!(lines[1].starts_with(r#"{"v":2,"seq":1,"#), "{}", lines[1]);
        for line in &lines {
            let v: serde_json::Value = serde_json::from_str(line).expect("each line is JSON");
            assert_eq!(v["v"], SCHEMA);
        }
        // The lines verify as a chain, and the chain stands after them.
        let first = key().check(&GENESIS, lines[0].as_bytes()).unwrap();
        let second = key().check(&first, lines[1].as_bytes()).unwrap();
        assert_eq!((chain.seq(), chain.value()), (2, second));
        // Rolled back, the same record seals to the same line again.
        chain.continue_at(1, first);
        let mut again = Vec::new();
        chain.seal(&m, &mut again);
        assert_eq!(again, format!("{}\n", lines[1]).into_bytes());
    }

    #[test]
    fn only_an_object_with_members_is_a_record() {
        assert!(Members::of(&serde_json::json!({})).is_err());
        assert!(Members::of(&serde_json::json!([1])).is_err());
        assert!(Members::of(&"text").is_err());
        assert_eq!(
            Members::of(&serde_json::json!({"event": "x"})).unwrap(),
            Members(br#""event":"x"}"#.to_vec())
        );
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
