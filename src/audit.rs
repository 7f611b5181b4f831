//! The audit trail (first cut): JSON Lines appended to `[audit] path`, one object per
//! event. A key event is written before the relay forwards it to the VM.
//!
//! Records carry no secret: tokens appear by id only, clipboard contents by length and
//! SHA-256, and key events as `[audit] keystrokes` allows.

use crate::config::Keystrokes;
use crate::token::ConsoleKind;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;
use vizor_rfb::keysym::{keysym_class, keysym_name, KeyClass};

/// One audit record.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event<'a> {
    /// A console session began.
    SessionStart {
        /// Session id.
        session: u64,
        /// Token id (never the token).
        token_id: &'a str,
        /// User the token was issued to.
        user: &'a str,
        /// Domain name.
        domain: &'a str,
        /// Domain UUID.
        uuid: &'a str,
        /// Console kind.
        kind: ConsoleKind,
        /// The browser's address.
        client: &'a str,
        /// Where the console listens.
        upstream: &'a str,
        /// The SPICE channel (`spice:main:0`...); absent for VNC.
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
    },
    /// A key was pressed or released.
    Key {
        /// Session id.
        session: u64,
        /// Pressed (true) or released.
        down: bool,
        /// The X11 keysym (absent when keystrokes are redacted).
        #[serde(skip_serializing_if = "Option::is_none")]
        keysym: Option<u32>,
        /// Its name (absent when keystrokes are redacted).
        #[serde(skip_serializing_if = "Option::is_none")]
        key: Option<String>,
        /// printable, control, function, modifier or unknown.
        class: &'static str,
        /// The XT scancode of a QEMU extended key event.
        #[serde(skip_serializing_if = "Option::is_none")]
        scancode: Option<u32>,
    },
    /// Clipboard contents crossed the proxy.
    Clipboard {
        /// Session id.
        session: u64,
        /// browser_to_vm or vm_to_browser.
        direction: &'static str,
        /// Bytes of clipboard payload.
        length: usize,
        /// SHA-256 of the payload, hex.
        sha256: String,
    },
    /// A console session ended.
    SessionEnd {
        /// Session id.
        session: u64,
        /// How long it lasted, in milliseconds.
        duration_ms: u64,
        /// Bytes from the browser to the VM.
        bytes_browser_to_vm: u64,
        /// Bytes from the VM to the browser.
        bytes_vm_to_browser: u64,
        /// Why it ended.
        reason: &'a str,
        /// Median server-ping to client-pong round trip (SPICE main channel).
        #[serde(skip_serializing_if = "Option::is_none")]
        round_trip_ms: Option<f64>,
    },
    /// A token was refused.
    TokenRefused {
        /// The browser's address.
        client: &'a str,
        /// Why (a stable label).
        reason: &'static str,
        /// The token's id, when it opened.
        #[serde(skip_serializing_if = "Option::is_none")]
        token_id: Option<&'a str>,
    },
}

impl Event<'_> {
    /// The `event` field's value.
    pub fn name(&self) -> &'static str {
        match self {
            Event::SessionStart { .. } => "session_start",
            Event::Key { .. } => "key",
            Event::Clipboard { .. } => "clipboard",
            Event::SessionEnd { .. } => "session_end",
            Event::TokenRefused { .. } => "token_refused",
        }
    }
}

#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    #[serde(flatten)]
    event: &'a Event<'a>,
}

/// The class of a keysym as recorded in the audit log.
pub fn class_name(keysym: u32) -> &'static str {
    match keysym_class(keysym) {
        KeyClass::Printable => "printable",
        KeyClass::Control => "control",
        KeyClass::Function => "function",
        KeyClass::Modifier => "modifier",
        KeyClass::Unknown => "unknown",
    }
}

/// The append-only audit file.
pub struct Audit {
    file: Mutex<File>,
    keystrokes: Keystrokes,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("keystrokes", &self.keystrokes)
            .finish()
    }
}

impl Audit {
    /// Opens (creating, mode 0600) the audit file at `path` for appending.
    pub fn open(path: &Path, keystrokes: Keystrokes) -> std::io::Result<Audit> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Audit {
            file: Mutex::new(file),
            keystrokes,
            metrics: None,
        })
    }

    /// Counts written records and write failures in `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Audit {
        self.metrics = Some(metrics);
        self
    }

    /// How key events are recorded.
    pub fn keystrokes(&self) -> Keystrokes {
        self.keystrokes
    }

    /// Appends one record, in a single write so concurrent sessions never interleave
    /// within a line.
    pub fn record(&self, event: &Event<'_>) -> std::io::Result<()> {
        let result = self.write(event);
        if let Some(m) = &self.metrics {
            match &result {
                Ok(()) => m
                    .audit_events_total
                    .with_label_values(&[event.name()])
                    .inc(),
                Err(_) => m.audit_write_errors_total.inc(),
            }
        }
        result
    }

    fn write(&self, event: &Event<'_>) -> std::io::Result<()> {
        let line = Line {
            ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event,
        };
        let mut text = serde_json::to_vec(&line).map_err(std::io::Error::other)?;
        text.push(b'\n');
        let mut file = self
            .file
            .lock()
            .map_err(|_| std::io::Error::other("audit file lock poisoned"))?;
        file.write_all(&text)
    }

    /// Records a key event as `[audit] keystrokes` allows; `Ok` without writing when
    /// key events are off.
    pub fn key(
        &self,
        session: u64,
        down: bool,
        keysym: u32,
        scancode: Option<u32>,
    ) -> std::io::Result<()> {
        let full = match self.keystrokes {
            Keystrokes::Off => return Ok(()),
            Keystrokes::Full => true,
            Keystrokes::Redacted => false,
        };
        self.record(&Event::Key {
            session,
            down,
            keysym: full.then_some(keysym),
            key: full.then(|| keysym_name(keysym).into_owned()),
            class: class_name(keysym),
            scancode: if full { scancode } else { None },
        })
    }

    /// Records a SPICE key event, named from its scancode, as `[audit] keystrokes`
    /// allows.
    pub fn scancode_key(
        &self,
        session: u64,
        down: bool,
        name: Option<&str>,
        code: u16,
    ) -> std::io::Result<()> {
        let full = match self.keystrokes {
            Keystrokes::Off => return Ok(()),
            Keystrokes::Full => true,
            Keystrokes::Redacted => false,
        };
        let class = match name {
            Some(n) if n.chars().count() == 1 || n == "space" => "printable",
            Some(n) if n.starts_with('F') && n[1..].parse::<u8>().is_ok() => "function",
            Some(n)
                if [
                    "Shift",
                    "Control",
                    "Alt",
                    "Super",
                    "Caps_Lock",
                    "Num_Lock",
                    "Scroll_Lock",
                ]
                .iter()
                .any(|m| n.starts_with(m)) =>
            {
                "modifier"
            }
            Some(_) => "control",
            None => "unknown",
        };
        self.record(&Event::Key {
            session,
            down,
            keysym: None,
            key: if full {
                name.map(str::to_owned)
                    .or_else(|| Some(format!("scancode {code:#06x}")))
            } else {
                None
            },
            class,
            scancode: if full { Some(u32::from(code)) } else { None },
        })
    }

    /// Records clipboard contents by length and digest.
    pub fn clipboard(
        &self,
        session: u64,
        direction: &'static str,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let digest = Sha256::digest(payload);
        self.record(&Event::Clipboard {
            session,
            direction,
            length: payload.len(),
            sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn records_are_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let a = Audit::open(&path, Keystrokes::Full).unwrap();
        a.key(7, true, 0xff1b, None).unwrap();
        a.key(7, false, 0x61, Some(0x1e)).unwrap();
        a.clipboard(7, "browser_to_vm", b"hello").unwrap();
        let l = lines(&path);
        assert_eq!(l[0]["event"], "key");
        assert_eq!(l[0]["key"], "Escape");
        assert_eq!(l[0]["class"], "control");
        assert_eq!(l[1]["key"], "a");
        assert_eq!(l[1]["scancode"], 0x1e);
        assert_eq!(l[2]["length"], 5);
        assert_eq!(
            l[2]["sha256"],
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert!(l[0]["ts"].as_str().unwrap().ends_with('Z'));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn redacted_and_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        Audit::open(&path, Keystrokes::Redacted)
            .unwrap()
            .key(1, true, 0x41, Some(0x1e))
            .unwrap();
        let l = lines(&path);
        assert_eq!(l[0]["class"], "printable");
        assert!(
            l[0].get("key").is_none()
                && l[0].get("keysym").is_none()
                && l[0].get("scancode").is_none()
        );
        let path = dir.path().join("b.jsonl");
        Audit::open(&path, Keystrokes::Off)
            .unwrap()
            .key(1, true, 0x41, None)
            .unwrap();
        assert!(lines(&path).is_empty());
    }
}
