//! What a test domain's keyboard got: QEMU's own trace of each byte its emulated PS/2
//! keyboard puts out for the guest (scan code set 2, `ps2_put_keycode`), read from the
//! log libvirt keeps for the domain. That is what QEMU handed the guest's keyboard
//! device; whether the guest then read it is the guest's business.

use std::time::{Duration, Instant};

/// A place in the domain's log.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    inode: u64,
    len: u64,
}

/// The trace of one domain's PS/2 keyboard.
pub struct Ps2Trace {
    domain: String,
    log: std::path::PathBuf,
}

impl Ps2Trace {
    /// Turns the trace on for `domain` and waits until the guest's firmware has set its
    /// keyboard up. SeaBIOS resets the keyboard and disables its scanning for a moment
    /// at that point, QEMU drops every key meanwhile, and keys that arrive during the
    /// setup can make it fail until the next boot (keys every 20 ms from power-on left
    /// translation off in 8 boots of 8; the cause of two CI failures). So no key goes in before QEMU's trace (which `test-host.sh`
    /// turns on from QEMU's start) shows SeaBIOS's last step, translation to set 1.
    /// Then one Shift proves keys reach the keyboard (Shift, because any other key
    /// ends SeaBIOS's boot menu wait and so starts its boot-and-retry cycle).
    pub fn start(domain: &str) -> Ps2Trace {
        let t = Ps2Trace {
            domain: domain.to_owned(),
            log: format!("/var/log/libvirt/qemu/{domain}.log").into(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !t.translating() {
            assert!(
                Instant::now() < deadline,
                "the guest's firmware never set up the keyboard of {domain}: {}",
                t.diagnosis()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        super::hmp(domain, "trace-event ps2_put_keycode on");
        super::hmp(domain, "trace-event ps2_keyboard_event on");
        loop {
            let mark = t.mark();
            super::virsh(&["send-key", domain, "KEY_LEFTSHIFT"]);
            let probe_deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < probe_deadline {
                std::thread::sleep(Duration::from_millis(100));
                let set_up = t
                    .text_since(mark)
                    .lines()
                    .any(|l| l.contains("ps2_keyboard_event") && l.contains(" xlate 1"));
                if set_up && super::holds(&t.since(mark), &[0x12, 0xf0, 0x12]) {
                    // Only the bytes from now on: the log stays small.
                    super::hmp(domain, "trace-event ps2_keyboard_event off");
                    return t;
                }
            }
            assert!(
                Instant::now() < deadline,
                "a Shift sent to {domain} never reached its keyboard: {}",
                t.diagnosis()
            );
        }
    }

    /// The tail of the domain's log from its last start.
    fn this_boot(&self) -> String {
        use std::io::{Read, Seek};
        let mut out = Vec::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(std::io::SeekFrom::Start(len.saturating_sub(1 << 19)));
            let _ = f.read_to_end(&mut out);
        }
        let text = String::from_utf8_lossy(&out);
        let start = text.rfind("starting up libvirt").unwrap_or(0);
        text[start..].to_owned()
    }

    /// Whether the i8042 translates to set 1 now, by the last switch QEMU traced.
    fn translating(&self) -> bool {
        self.this_boot()
            .lines()
            .rfind(|l| l.contains("ps2_keyboard_set_translation"))
            .is_some_and(|l| l.ends_with(" mode 1"))
    }

    /// What a failure message needs: the domain's state and its last keyboard lines.
    fn diagnosis(&self) -> String {
        let state = std::process::Command::new("virsh")
            .args(["-c", "qemu:///system", "domstate", "--reason", &self.domain])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let boot = self.this_boot();
        let lines: Vec<&str> = boot.lines().filter(|l| l.contains("ps2_")).collect();
        let tail = lines[lines.len().saturating_sub(12)..].join("\n");
        format!("domain {state}; its last keyboard trace lines:\n{tail}")
    }

    /// Where the trace stands now.
    pub fn mark(&self) -> Mark {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(&self.log) {
            Ok(m) => Mark {
                inode: m.ino(),
                len: m.len(),
            },
            Err(_) => Mark { inode: 0, len: 0 },
        }
    }

    /// The log's text since `mark`, across a rotation by virtlogd (which renames the
    /// log to `.0` when it grows past its size limit).
    fn text_since(&self, mark: Mark) -> String {
        use std::io::{Read, Seek};
        use std::os::unix::fs::MetadataExt;
        let read_from = |path: &std::path::Path, at: u64| -> String {
            let mut out = Vec::new();
            if let Ok(mut f) = std::fs::File::open(path) {
                let _ = f.seek(std::io::SeekFrom::Start(at));
                let _ = f.read_to_end(&mut out);
            }
            String::from_utf8_lossy(&out).into_owned()
        };
        let now = self.mark();
        if now.inode == mark.inode {
            return read_from(&self.log, mark.len);
        }
        let rotated = self.log.with_extension("log.0");
        let mut text = match std::fs::metadata(&rotated) {
            Ok(m) if m.ino() == mark.inode => read_from(&rotated, mark.len),
            _ => String::new(),
        };
        text.push_str(&read_from(&self.log, 0));
        text
    }

    /// The bytes the guest's keyboard received since `mark`.
    pub fn since(&self, mark: Mark) -> Vec<u8> {
        self.text_since(mark)
            .lines()
            .filter(|l| l.contains("ps2_put_keycode"))
            .filter_map(|l| l.rsplit(' ').next())
            .filter_map(|v| u8::from_str_radix(v.trim_start_matches("0x"), 16).ok())
            .collect()
    }

    /// The bytes since `mark` once `want` of them arrived (QEMU delays each key event
    /// by 10 ms) and nothing more came for half a second, or after 20 s.
    pub fn settle(&self, mark: Mark, want: usize) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = self.since(mark);
        let mut quiet_since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.since(mark);
            if now.len() != last.len() {
                quiet_since = Instant::now();
                last = now;
            } else if (last.len() >= want && quiet_since.elapsed() > Duration::from_millis(500))
                || Instant::now() > deadline
            {
                return last;
            }
        }
    }

    /// Turns the trace off.
    pub fn stop(self) {
        super::hmp(&self.domain, "trace-event ps2_put_keycode off");
        super::hmp(&self.domain, "trace-event ps2_keyboard_event off");
    }
}

impl Ps2Trace {
    /// Stops the trace once the guest's keyboard got as many bytes since `mark` as the
    /// key records of `sessions` in `audit` say, and asserts they are those bytes.
    pub fn assert_matches(self, mark: Mark, audit: &[serde_json::Value], sessions: &[u64]) {
        let want = expected_ps2(audit, sessions);
        let got = self.settle(mark, want.len());
        self.stop();
        assert_eq!(
            hex(&got),
            hex(&want),
            "the guest's keyboard and the audit differ"
        );
    }
}

/// The bytes the guest's PS/2 keyboard gets for the key records of `sessions` in
/// `audit`, in the log's order, as the audit tells them: each press and release QEMU
/// passed on, by the key it acted on (the bytes a real QEMU 7.2 was measured to send for
/// that key).
pub fn expected_ps2(audit: &[serde_json::Value], sessions: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in audit {
        let ours = r["session"].as_u64().is_some_and(|s| sessions.contains(&s));
        if r["event"] != "key" || !ours || r.get("ignored").is_some() {
            continue;
        }
        let number = r["scancode"]
            .as_u64()
            .expect("a key record names its key number");
        let key = vizor_keys::Key::from_number(u8::try_from(number).unwrap());
        let (press, release) = key.ps2();
        out.extend_from_slice(if r["down"] == true { press } else { release });
    }
    out
}

/// Set-2 bytes as text, for failure messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
