//! File transfers through the SPICE guest agent, sans-IO: what each transfer's
//! messages say, in both directions, becomes its audit records. A transfer is
//! recorded when it starts (before any of the file reaches the receiver) and when it
//! ends (the receiver's or sender's final status, or the session's end), with the
//! bytes that passed and their SHA-256.

use sha2::Digest;
use std::collections::{HashMap, VecDeque};
use vizor_spice::agent::{xfer_status_name, XferEvent};

/// Which way a transfer's file goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Way {
    /// From the browser into the guest.
    ToVm,
    /// From the guest to the browser.
    ToBrowser,
}

impl Way {
    /// The audit record's `direction`.
    pub fn direction(self) -> &'static str {
        match self {
            Way::ToVm => "browser_to_vm",
            Way::ToBrowser => "vm_to_browser",
        }
    }

    fn other(self) -> Way {
        match self {
            Way::ToVm => Way::ToBrowser,
            Way::ToBrowser => Way::ToVm,
        }
    }
}

/// One audit record of a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Which way the file goes.
    pub way: Way,
    /// The sender's id of the transfer.
    pub id: u32,
    /// The file's name, as spice-vdagent reads the sender's key file.
    pub name: String,
    /// The file's size, as the sender's key file gives it.
    pub size: u64,
    /// `started`; the receiver's final `VD_AGENT_FILE_XFER_STATUS` (`success`,
    /// `cancelled`, `error`, `not_enough_space`...); `cancelled_by_sender` (any status
    /// from the sender ends its transfer: spice-vdagent then deletes the partial
    /// file); or `incomplete` (the session ended first: spice-vdagent deletes the
    /// partial file).
    pub status: &'static str,
    /// File bytes that passed.
    pub bytes: u64,
    /// SHA-256 of those bytes (end records).
    pub sha256: Option<String>,
}

/// Why a transfer message is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// More transfers at once than vizor follows.
    #[error("more than {0} file transfers at once")]
    TooMany(usize),
    /// A start for an id already in progress.
    #[error("file transfer {0} started twice")]
    Twice(u32),
    /// File bytes for no transfer vizor saw start.
    #[error("file bytes for transfer {0}, which never started")]
    Unknown(u32),
}

struct Open {
    name: String,
    size: u64,
    bytes: u64,
    hasher: sha2::Sha256,
}

/// The transfers in progress in one session, both ways.
#[derive(Default)]
pub struct Transfers {
    open: HashMap<(Way, u32), Open>,
    /// Transfers ended lately: file bytes a sender had on the way when the receiver
    /// ended its transfer pass (the agent drops them) instead of ending the session.
    closed: VecDeque<(Way, u32)>,
}

impl Transfers {
    /// The most transfers in progress at once (spice-html5 starts every file of a
    /// drop at once; spice-vdagentd takes 128).
    pub const MAX_OPEN: usize = 128;
    /// How many ended transfers are remembered for late bytes.
    const CLOSED: usize = 256;

    /// A file transfer message, read from the stream of the side that sent it (`from`
    /// is the way that side's files go). Returns the record it makes, if any.
    pub fn on(&mut self, from: Way, ev: XferEvent<'_>) -> Result<Option<Record>, Refusal> {
        match ev {
            XferEvent::Start { id, name, size } => {
                if self.open.contains_key(&(from, id)) {
                    return Err(Refusal::Twice(id));
                }
                if self.open.len() >= Self::MAX_OPEN {
                    return Err(Refusal::TooMany(Self::MAX_OPEN));
                }
                let record = Record {
                    way: from,
                    id,
                    name: name.clone(),
                    size,
                    status: "started",
                    bytes: 0,
                    sha256: None,
                };
                self.open.insert(
                    (from, id),
                    Open {
                        name,
                        size,
                        bytes: 0,
                        hasher: sha2::Sha256::new(),
                    },
                );
                Ok(Some(record))
            }
            XferEvent::Data { id, bytes } => {
                let Some(t) = self.open.get_mut(&(from, id)) else {
                    if self.closed.contains(&(from, id)) {
                        return Ok(None);
                    }
                    return Err(Refusal::Unknown(id));
                };
                t.bytes += bytes.len() as u64;
                t.hasher.update(bytes);
                Ok(None)
            }
            XferEvent::Status { id, result } => {
                // The receiver's word on the other side's transfer: CAN_SEND_DATA ends
                // nothing, any other value ends it.
                if self.open.contains_key(&(from.other(), id)) {
                    if result == 0 {
                        return Ok(None);
                    }
                    return Ok(self.close((from.other(), id), xfer_status_name(result)));
                }
                // The sender's own: spice-vdagentd ends the transfer whatever the value.
                Ok(self.close((from, id), "cancelled_by_sender"))
            }
        }
    }

    /// The records of every transfer still in progress, ended as `incomplete`.
    pub fn end_all(&mut self) -> Vec<Record> {
        let mut keys: Vec<(Way, u32)> = self.open.keys().copied().collect();
        keys.sort_by_key(|(w, id)| (w.direction(), *id));
        keys.into_iter()
            .filter_map(|k| self.close(k, "incomplete"))
            .collect()
    }

    fn close(&mut self, key: (Way, u32), status: &'static str) -> Option<Record> {
        let t = self.open.remove(&key)?;
        if self.closed.len() >= Self::CLOSED {
            self.closed.pop_front();
        }
        self.closed.push_back(key);
        Some(Record {
            way: key.0,
            id: key.1,
            name: t.name,
            size: t.size,
            status,
            bytes: t.bytes,
            sha256: Some(crate::audit::chain::hex(&t.hasher.finalize())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(id: u32) -> XferEvent<'static> {
        XferEvent::Start {
            id,
            name: "a.txt".into(),
            size: 3,
        }
    }

    #[test]
    fn a_transfer_is_recorded_at_its_start_and_at_the_receivers_word() {
        let mut t = Transfers::default();
        let r = t.on(Way::ToVm, start(1)).unwrap().unwrap();
        assert_eq!((r.status, r.bytes, r.sha256), ("started", 0, None));
        // The guest's agent is ready: nothing to record.
        let ready = XferEvent::Status { id: 1, result: 0 };
        assert_eq!(t.on(Way::ToBrowser, ready), Ok(None));
        t.on(
            Way::ToVm,
            XferEvent::Data {
                id: 1,
                bytes: b"ab",
            },
        )
        .unwrap();
        t.on(Way::ToVm, XferEvent::Data { id: 1, bytes: b"c" })
            .unwrap();
        let done = XferEvent::Status { id: 1, result: 3 };
        let r = t.on(Way::ToBrowser, done).unwrap().unwrap();
        assert_eq!(r.status, "success");
        assert_eq!(r.bytes, 3);
        assert_eq!(r.name, "a.txt");
        // SHA-256("abc").
        assert_eq!(
            r.sha256.as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert!(t.end_all().is_empty());
    }

    #[test]
    fn a_sender_may_cancel_and_the_session_end_closes_the_rest() {
        let mut t = Transfers::default();
        t.on(Way::ToVm, start(1)).unwrap();
        t.on(Way::ToVm, start(2)).unwrap();
        // Any status from the sender ends its transfer (spice-vdagentd deletes the
        // partial file), whatever the value says.
        let cancel = XferEvent::Status { id: 2, result: 3 };
        assert_eq!(
            t.on(Way::ToVm, cancel).unwrap().unwrap().status,
            "cancelled_by_sender"
        );
        // Bytes the sender had on the way pass (the agent drops them).
        let late = XferEvent::Data { id: 2, bytes: b"x" };
        assert_eq!(t.on(Way::ToVm, late), Ok(None));
        let rest = t.end_all();
        assert_eq!(rest.len(), 1);
        assert_eq!((rest[0].id, rest[0].status), (1, "incomplete"));
        // A status for nothing in progress records nothing.
        let stray = XferEvent::Status { id: 9, result: 2 };
        assert_eq!(t.on(Way::ToBrowser, stray), Ok(None));
    }

    #[test]
    fn refusals() {
        let mut t = Transfers::default();
        let data = XferEvent::Data { id: 5, bytes: b"x" };
        assert_eq!(t.on(Way::ToVm, data), Err(Refusal::Unknown(5)));
        t.on(Way::ToVm, start(1)).unwrap();
        assert_eq!(t.on(Way::ToVm, start(1)), Err(Refusal::Twice(1)));
        // The same id the other way is another transfer.
        assert!(t.on(Way::ToBrowser, start(1)).is_ok());
        for id in 2..Transfers::MAX_OPEN as u32 {
            t.on(Way::ToVm, start(id)).unwrap();
        }
        assert_eq!(
            t.on(Way::ToVm, start(10_000)),
            Err(Refusal::TooMany(Transfers::MAX_OPEN))
        );
    }
}
