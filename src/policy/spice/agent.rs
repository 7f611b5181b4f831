//! The guest agent's message stream on a SPICE main channel, followed both ways,
//! sans-IO: clipboard contents, file transfers, and which agent messages a browser
//! may send.

use super::transfers::{self, Transfers, Way};
use crate::config::FileTransfer;
use crate::end::{End, Refusal};
use crate::live::Direction;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use vizor_spice::agent::{self, AgentEvent, AgentStream};

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, End> {
    m.lock()
        .map_err(|_| End::Internal("agent transfers lock poisoned"))
}

/// Whether the browser announced `VD_AGENT_CAP_CLIPBOARD_SELECTION`. The guest agent
/// (spice-vdagentd) decides by the client's announcement alone, both ways: it reads a
/// selection word in the client's clipboard messages, and writes one in its own, when
/// the client announced the capability (its own announcement does not matter). vizor
/// reads both directions by the same rule, so it reads what the agent reads and writes.
#[derive(Default)]
pub(super) struct AgentCaps(AtomicBool);

impl AgentCaps {
    fn browser_announced(&self, selection: bool) {
        self.0.store(selection, Ordering::Relaxed);
    }

    fn selection_word(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// What both directions of the main channel's agent stream share.
pub(super) struct AgentShared {
    caps: AgentCaps,
    pub(super) transfers: Mutex<Transfers>,
    file_transfer: FileTransfer,
}

impl AgentShared {
    pub(super) fn new(file_transfer: FileTransfer) -> AgentShared {
        AgentShared {
            caps: AgentCaps::default(),
            transfers: Mutex::new(Transfers::default()),
            file_transfer,
        }
    }
}

/// One clipboard transfer in flight.
pub(super) struct Transfer {
    reader: agent::ClipboardReader,
    hasher: sha2::Sha256,
    length: usize,
    /// The contents, kept for `[audit] clipboard = "content"` (bounded by the agent
    /// message limit).
    kept: Option<Vec<u8>>,
}

/// What following an agent stream records.
#[derive(Debug)]
pub(super) enum AgentRecord {
    Clipboard(crate::audit::Clipboard),
    FileTransfer(transfers::Record),
    /// A file transfer refused by `[spice] file_transfer`.
    Refused {
        way: Way,
        start: Option<(u32, String, u64)>,
    },
}

/// What one chunk of an agent stream gave: records to write, in order, then the
/// session's end when the chunk is refused (none of it is relayed).
#[derive(Debug, Default)]
pub(super) struct Fed {
    pub(super) records: Vec<AgentRecord>,
    pub(super) end: Option<End>,
}

/// Follows one direction of the guest agent's message stream, sans-IO: clipboard
/// contents as they cross (format, length, SHA-256 of the contents alone, and the
/// text when the audit keeps it), file transfers (see [`Transfers`]), and, from the
/// browser, only the message types a browser has reason to send
/// ([`agent::FromClient`]): a pointer event sent as MOUSE_STATE would reach the guest
/// through spice-vdagentd, past the inputs channel and its audit.
#[derive(Default)]
pub(super) struct AgentFollower {
    transfer: Option<Transfer>,
    caps: Option<agent::CapsReader>,
    xfer: agent::XferReader,
    /// The browser sent AGENT_START: spice-server discards agent data before it, so
    /// vizor refuses any (its stream would start where spice-server's does not).
    pub(super) started: bool,
}

/// Which way agent messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AgentSide {
    Browser,
    Vm,
}

impl AgentSide {
    fn name(self) -> &'static str {
        match self {
            AgentSide::Browser => "browser",
            AgentSide::Vm => "VM",
        }
    }

    /// The direction of what this side sends.
    pub(super) fn dir(self) -> Direction {
        match self {
            AgentSide::Browser => Direction::BrowserToVm,
            AgentSide::Vm => Direction::VmToBrowser,
        }
    }

    fn way(self) -> Way {
        match self {
            AgentSide::Browser => Way::ToVm,
            AgentSide::Vm => Way::ToBrowser,
        }
    }
}

impl AgentFollower {
    /// Feeds an AGENT_DATA chunk sent by `from`.
    pub(super) fn feed(
        &mut self,
        stream: &mut AgentStream,
        chunk: &[u8],
        from: AgentSide,
        shared: &AgentShared,
        keep: bool,
    ) -> Fed {
        let mut fed = Fed::default();
        if let Err(end) = self.follow(stream, chunk, from, shared, keep, &mut fed) {
            fed.end = Some(end);
        }
        fed
    }

    fn follow(
        &mut self,
        stream: &mut AgentStream,
        chunk: &[u8],
        from: AgentSide,
        shared: &AgentShared,
        keep: bool,
        fed: &mut Fed,
    ) -> Result<(), End> {
        let side = from.name();
        if from == AgentSide::Browser && !self.started {
            return Err(End::refused(
                Refusal::AgentRefused,
                "the browser sent agent data before AGENT_START",
            ));
        }
        let mut events = Vec::new();
        stream
            .feed(chunk, &mut events)
            .map_err(|e| End::spice_protocol(from.dir(), &e))?;
        // A file transfer start under `file_transfer = "refuse"`: the chunk is read to
        // its end (for the file's name, when the start is whole in it), then refused.
        let mut refusing = false;
        let mut refused_start = None;
        for ev in events {
            if let AgentEvent::Begin { msg_type, .. } = ev {
                if from == AgentSide::Browser
                    && agent::FromClient::of(msg_type) == agent::FromClient::Refuse
                {
                    return Err(End::refused(
                        Refusal::AgentRefused,
                        format!(
                            "the browser sent the guest agent a {} message (type {msg_type}), which vizor does not pass",
                            agent::kind::name(msg_type)
                        ),
                    ));
                }
                if msg_type == agent::kind::FILE_XFER_START
                    && shared.file_transfer == FileTransfer::Refuse
                {
                    refusing = true;
                }
            }
            let mut xfers = Vec::new();
            self.xfer
                .feed(&ev, &mut xfers)
                .map_err(|e| End::spice_protocol(from.dir(), &e))?;
            for x in xfers {
                if refusing {
                    if let agent::XferEvent::Start { id, name, size } = x {
                        refused_start = Some((id, name, size));
                    }
                    continue;
                }
                let mut t = lock(&shared.transfers)?;
                match t.on(from.way(), x) {
                    Ok(Some(r)) => fed.records.push(AgentRecord::FileTransfer(r)),
                    Ok(None) => {}
                    Err(refusal) => {
                        return Err(End::refused(
                            Refusal::FileTransferRefused,
                            format!("{side} agent stream: {refusal}"),
                        ))
                    }
                }
            }
            self.clipboard(ev, from, &shared.caps, keep, fed)?;
        }
        if refusing {
            fed.records.push(AgentRecord::Refused {
                way: from.way(),
                start: refused_start,
            });
            return Err(End::refused(
                Refusal::FileTransferRefused,
                "file transfer through the guest agent is not allowed here ([spice] file_transfer)",
            ));
        }
        Ok(())
    }

    fn clipboard(
        &mut self,
        ev: AgentEvent<'_>,
        from: AgentSide,
        caps: &AgentCaps,
        keep: bool,
        fed: &mut Fed,
    ) -> Result<(), End> {
        use sha2::Digest;
        match ev {
            AgentEvent::Begin { msg_type, .. } if msg_type == agent::kind::CLIPBOARD => {
                self.transfer = Some(Transfer {
                    reader: agent::ClipboardReader::new(caps.selection_word()),
                    hasher: sha2::Sha256::new(),
                    length: 0,
                    kept: keep.then(Vec::new),
                });
            }
            AgentEvent::Begin { msg_type, .. }
                if msg_type == agent::kind::ANNOUNCE_CAPABILITIES =>
            {
                self.caps = Some(agent::CapsReader::default());
            }
            AgentEvent::Data {
                msg_type,
                bytes,
                last,
            } if msg_type == agent::kind::ANNOUNCE_CAPABILITIES => {
                if let Some(c) = &mut self.caps {
                    c.feed(bytes);
                }
                if last {
                    if let Some(c) = self.caps.take() {
                        if from == AgentSide::Browser {
                            caps.browser_announced(c.has(agent::cap::CLIPBOARD_SELECTION));
                        }
                    }
                }
            }
            AgentEvent::Data {
                msg_type,
                bytes,
                last,
            } if msg_type == agent::kind::CLIPBOARD => {
                let Some(t) = &mut self.transfer else {
                    return Ok(());
                };
                let contents = t.reader.feed(bytes);
                t.hasher.update(contents);
                t.length += contents.len();
                if let Some(k) = &mut t.kept {
                    k.extend_from_slice(contents);
                }
                if !last {
                    return Ok(());
                }
                let Some(t) = self.transfer.take() else {
                    return Ok(());
                };
                let clip_type = t
                    .reader
                    .clip_type()
                    .map_err(|e| End::spice_protocol(from.dir(), &e))?;
                let content = match t.kept {
                    Some(k) if clip_type == agent::CLIPBOARD_UTF8_TEXT => {
                        Some(String::from_utf8_lossy(&k).into_owned())
                    }
                    _ => None,
                };
                fed.records
                    .push(AgentRecord::Clipboard(crate::audit::Clipboard {
                        format: agent::clipboard_format(clip_type),
                        length: t.length,
                        sha256: crate::audit::chain::hex(&t.hasher.finalize()),
                        content,
                    }));
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vizor_spice::agent::{cap, kind, write_message};

    fn caps_message(selection: bool) -> Vec<u8> {
        let mut bits = 1u32 << cap::CLIPBOARD_SELECTION.min(31);
        if !selection {
            bits = 1; // VD_AGENT_CAP_MOUSE_STATE alone
        }
        // VDAgentAnnounceCapabilities: request (u32), then the capability words.
        let mut body = 0u32.to_le_bytes().to_vec();
        body.extend_from_slice(&bits.to_le_bytes());
        let mut out = Vec::new();
        write_message(kind::ANNOUNCE_CAPABILITIES, &body, &mut out);
        out
    }

    fn clipboard_message(selection: Option<u8>, text: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        if let Some(s) = selection {
            body.extend_from_slice(&[s, 0, 0, 0]);
        }
        body.extend_from_slice(&1u32.to_le_bytes()); // UTF-8 text
        body.extend_from_slice(text);
        let mut out = Vec::new();
        write_message(kind::CLIPBOARD, &body, &mut out);
        out
    }

    struct Sides {
        shared: AgentShared,
        browser: (AgentFollower, AgentStream),
        vm: (AgentFollower, AgentStream),
    }

    impl Sides {
        fn new() -> Sides {
            Sides::with(FileTransfer::Audit)
        }

        fn with(file_transfer: FileTransfer) -> Sides {
            let l = vizor_spice::Limits::default();
            let started = AgentFollower {
                started: true,
                ..AgentFollower::default()
            };
            Sides {
                shared: AgentShared::new(file_transfer),
                browser: (started, AgentStream::new(l)),
                vm: (AgentFollower::default(), AgentStream::new(l)),
            }
        }

        fn feed(&mut self, side: AgentSide, bytes: &[u8]) -> Fed {
            let (c, s) = match side {
                AgentSide::Browser => &mut self.browser,
                AgentSide::Vm => &mut self.vm,
            };
            c.feed(s, bytes, side, &self.shared, true)
        }

        fn from(&mut self, side: AgentSide, bytes: &[u8]) -> Vec<crate::audit::Clipboard> {
            let fed = self.feed(side, bytes);
            assert!(fed.end.is_none(), "{:?}", fed.end);
            fed.records
                .into_iter()
                .filter_map(|r| match r {
                    AgentRecord::Clipboard(c) => Some(c),
                    _ => None,
                })
                .collect()
        }
    }

    fn xfer(t: u32, id: u32, rest: &[u8]) -> Vec<u8> {
        let mut body = id.to_le_bytes().to_vec();
        if t == kind::FILE_XFER_DATA {
            body.extend_from_slice(&(rest.len() as u64).to_le_bytes());
        }
        body.extend_from_slice(rest);
        let mut out = Vec::new();
        write_message(t, &body, &mut out);
        out
    }

    fn start(id: u32) -> Vec<u8> {
        xfer(
            kind::FILE_XFER_START,
            id,
            b"[vdagent-file-xfer]\nname=notes.txt\nsize=5\n",
        )
    }

    #[test]
    fn the_agent_stream_cannot_be_put_out_of_step_with_spice_servers() {
        // The review's sequence: before AGENT_START spice-server discards agent data
        // whole; a reader that took it would expect 33 clipboard bytes next, and read
        // a MOUSE_STATE after AGENT_START as clipboard.
        let mut first = Vec::new();
        write_message(kind::CLIPBOARD_RELEASE, &[], &mut first);
        first.extend_from_slice(
            &{
                let mut h = Vec::new();
                write_message(kind::CLIPBOARD, &[0; 33], &mut h);
                h
            }[..20],
        );
        let mut s = Sides::new();
        s.browser.0.started = false;
        let end = s.feed(AgentSide::Browser, &first).end.expect("refused");
        assert_eq!(end.label(), "agent_refused");
        assert!(end.reason().contains("AGENT_START"), "{}", end.reason());
        // After AGENT_START, the same chunk breaks spice-server's framing: refused.
        let mut s = Sides::new();
        let end = s.feed(AgentSide::Browser, &first).end.expect("refused");
        assert_eq!(end.label(), "protocol_error", "{}", end.reason());
    }

    #[test]
    fn the_browser_cannot_point_or_speak_for_the_agent() {
        // MOUSE_STATE would move and click the guest's pointer through spice-vdagentd,
        // past the inputs channel: refused, with every other type a browser has no
        // reason to send.
        for t in [
            kind::MOUSE_STATE,
            kind::REPLY,
            kind::CLIENT_DISCONNECTED,
            16,
            17,
            999,
        ] {
            let mut s = Sides::new();
            let mut m = Vec::new();
            write_message(t, &[0; 16], &mut m);
            let fed = s.feed(AgentSide::Browser, &m);
            assert!(fed.records.is_empty());
            let end = fed.end.expect("refused");
            assert_eq!(end.label(), "agent_refused", "type {t}");
            // The guest's agent may send them (to the browser, not to the guest).
            let mut s = Sides::new();
            assert!(s.feed(AgentSide::Vm, &m).end.is_none(), "type {t}");
        }
    }

    #[test]
    fn file_transfers_are_refused_by_default_with_what_was_refused() {
        let mut s = Sides::with(FileTransfer::Refuse);
        let fed = s.feed(AgentSide::Browser, &start(3));
        assert_eq!(fed.end.expect("refused").label(), "file_transfer_refused");
        match &fed.records[..] {
            [AgentRecord::Refused { way, start }] => {
                assert_eq!(*way, Way::ToVm);
                assert_eq!(start, &Some((3, "notes.txt".to_owned(), 5)));
            }
            other => panic!("{other:?}"),
        }
        // Refused at the chunk that begins it, whole or not.
        let mut s = Sides::with(FileTransfer::Refuse);
        let m = start(3);
        let fed = s.feed(AgentSide::Browser, &m[..25]);
        assert!(fed.end.is_some());
        assert!(matches!(
            &fed.records[..],
            [AgentRecord::Refused { start: None, .. }]
        ));
        // File bytes for no transfer that started: refused either way.
        for policy in [FileTransfer::Refuse, FileTransfer::Audit] {
            let mut s = Sides::with(policy);
            let fed = s.feed(AgentSide::Browser, &xfer(kind::FILE_XFER_DATA, 1, b"abc"));
            assert_eq!(fed.end.expect("refused").label(), "file_transfer_refused");
        }
    }

    #[test]
    fn an_audited_file_transfer_is_recorded_at_start_and_end() {
        use AgentSide::{Browser, Vm};
        let mut s = Sides::new();
        let fed = s.feed(Browser, &start(3));
        assert!(fed.end.is_none());
        let started = match &fed.records[..] {
            [AgentRecord::FileTransfer(r)] => r.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            (started.status, started.name.as_str(), started.size),
            ("started", "notes.txt", 5)
        );
        // The guest's agent is ready, the bytes pass, the guest says it is done.
        assert!(s
            .feed(Vm, &xfer(kind::FILE_XFER_STATUS, 3, &0u32.to_le_bytes()))
            .records
            .is_empty());
        let data = xfer(kind::FILE_XFER_DATA, 3, b"hello");
        let (a, b) = data.split_at(27);
        assert!(s.feed(Browser, a).records.is_empty());
        assert!(s.feed(Browser, b).records.is_empty());
        let fed = s.feed(Vm, &xfer(kind::FILE_XFER_STATUS, 3, &3u32.to_le_bytes()));
        let done = match &fed.records[..] {
            [AgentRecord::FileTransfer(r)] => r.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            (done.status, done.bytes, done.way),
            ("success", 5, Way::ToVm)
        );
        // SHA-256("hello").
        assert_eq!(
            done.sha256.as_deref(),
            Some("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
        );
        // One more, cut short by the session's end.
        s.feed(Browser, &start(4));
        s.feed(Browser, &xfer(kind::FILE_XFER_DATA, 4, b"he"));
        let open = s.shared.transfers.lock().unwrap().end_all();
        assert_eq!(
            (open[0].id, open[0].status, open[0].bytes),
            (4, "incomplete", 2)
        );
    }

    #[test]
    fn the_selection_word_follows_the_browsers_announcement_both_ways() {
        use AgentSide::{Browser, Vm};
        // The case: the guest agent announces the selection capability, the
        // browser does not. The agent then reads no selection word from the browser,
        // and writes none: nor does vizor.
        let mut s = Sides::new();
        assert!(s.from(Vm, &caps_message(true)).is_empty());
        assert!(s.from(Browser, &caps_message(false)).is_empty());
        let clip = s.from(Browser, &clipboard_message(None, b"secret"));
        assert_eq!((clip[0].format, clip[0].length), ("text", 6));
        assert_eq!(clip[0].content.as_deref(), Some("secret"));
        let clip = s.from(Vm, &clipboard_message(None, b"from the guest"));
        assert_eq!(clip[0].content.as_deref(), Some("from the guest"));
        // The browser announced it (the agent's own announcement aside): both ways
        // carry the word.
        let mut s = Sides::new();
        s.from(Browser, &caps_message(true));
        let clip = s.from(Browser, &clipboard_message(Some(0), b"abc"));
        assert_eq!(
            (clip[0].length, clip[0].content.as_deref()),
            (3, Some("abc"))
        );
        let clip = s.from(Vm, &clipboard_message(Some(0), b"xyz"));
        assert_eq!(
            (clip[0].length, clip[0].content.as_deref()),
            (3, Some("xyz"))
        );
        // A later announcement without it takes it back.
        s.from(Browser, &caps_message(false));
        let clip = s.from(Browser, &clipboard_message(None, b"plain"));
        assert_eq!(clip[0].content.as_deref(), Some("plain"));
    }
}
