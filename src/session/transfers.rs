//! File transfers through the SPICE guest agent, sans-IO: what each transfer's
//! messages say, in both directions, becomes its audit records. A transfer is
//! recorded when it starts (before any of the file reaches the receiver) and when it
//! ends (the receiver's or sender's final status, or the session's end), with the
//! bytes that passed and their SHA-256.

use sha2::Digest;
use std::collections::HashMap;
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
    /// The file's name, as the sender's key file gives it.
    pub name: Option<String>,
    /// The file's size, as the sender's key file gives it.
    pub size: Option<u64>,
    /// `started`, `refused`, a final `VD_AGENT_FILE_XFER_STATUS` name (`success`,
    /// `cancelled`, `error`...) or `incomplete` (the session ended first).
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
    name: Option<String>,
    size: Option<u64>,
    bytes: u64,
    hasher: sha2::Sha256,
}

/// The transfers in progress in one session, both ways.
#[derive(Default)]
pub struct Transfers {
    open: HashMap<(Way, u32), Open>,
}

impl Transfers {
    /// The most transfers in progress at once (spice-html5 sends one file at a time
    /// per drop; spice-gtk a handful).
    pub const MAX_OPEN: usize = 16;

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
                let t = self.open.get_mut(&(from, id)).ok_or(Refusal::Unknown(id))?;
                t.bytes += bytes.len() as u64;
                t.hasher.update(bytes);
                Ok(None)
            }
            XferEvent::Status { id, result } => {
                // CAN_SEND_DATA: the receiver is ready; nothing ends.
                if result == 0 {
                    return Ok(None);
                }
                // A status is the receiver's word on the other side's transfer, or a
                // sender cancelling its own.
                let key = [(from.other(), id), (from, id)]
                    .into_iter()
                    .find(|k| self.open.contains_key(k));
                Ok(key.and_then(|k| self.close(k, xfer_status_name(result))))
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
            name: Some("a.txt".into()),
            size: Some(3),
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
        assert_eq!(r.name.as_deref(), Some("a.txt"));
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
        let cancel = XferEvent::Status { id: 2, result: 1 };
        assert_eq!(
            t.on(Way::ToVm, cancel).unwrap().unwrap().status,
            "cancelled"
        );
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
            t.on(Way::ToVm, start(99)),
            Err(Refusal::TooMany(Transfers::MAX_OPEN))
        );
    }
}
