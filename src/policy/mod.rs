//! Session policy, sans-IO: given a decoded message and the session's state, what to do
//! with it (forward, rewrite, drop, refuse) and what goes on record before it moves.
//!
//! The async relays in [`crate::session`] only move bytes and await the audit; every
//! rule about a message lives here and is unit-tested without sockets. A console is
//! shaped for several browser-side participants, each with a [`Participant`] policy;
//! today each session has one, its owner.

pub mod keyboards;
pub mod rfb;
pub mod spice;

use crate::live::Direction;
use vizor_keys::Stroke;

/// What a participant may do on a console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Participant {
    /// Its role.
    pub role: Role,
    /// Whether its keyboard and pointer reach the VM.
    pub input: bool,
    /// Which ways clipboard contents pass for it.
    pub clipboard: ClipboardWays,
}

impl Participant {
    /// The token holder who opened the console: everything the proxy passes.
    pub const OWNER: Participant = Participant {
        role: Role::Owner,
        input: true,
        clipboard: ClipboardWays::BOTH,
    };

    /// Someone who watches: sees the screen, reaches nothing.
    pub const VIEWER: Participant = Participant {
        role: Role::Viewer,
        input: false,
        clipboard: ClipboardWays::NONE,
    };

    /// Whether clipboard contents may pass `dir` for this participant.
    pub fn clipboard_passes(&self, dir: Direction) -> bool {
        match dir {
            Direction::BrowserToVm => self.clipboard.to_vm,
            Direction::VmToBrowser => self.clipboard.from_vm,
        }
    }
}

/// A participant's role on a console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opened the console with a token.
    Owner,
    /// Watches a console someone else opened.
    Viewer,
}

/// Which ways clipboard contents pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClipboardWays {
    /// From the browser to the VM.
    pub to_vm: bool,
    /// From the VM to the browser.
    pub from_vm: bool,
}

impl ClipboardWays {
    /// Both ways.
    pub const BOTH: ClipboardWays = ClipboardWays {
        to_vm: true,
        from_vm: true,
    };
    /// Neither way.
    pub const NONE: ClipboardWays = ClipboardWays {
        to_vm: false,
        from_vm: false,
    };
}

/// What goes on record, before the message it comes from moves on. Protocol-neutral:
/// the relay hands each to the audit log as it is.
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    /// A pointer button went down.
    Button {
        /// The button's name.
        button: &'static str,
        /// Where, when the protocol says.
        at: Option<(u16, u16)>,
    },
    /// A key transition as the VM takes it.
    Key(KeyNote),
    /// A key event on a console whose keymap vizor does not model: the keysym names
    /// the key.
    Keysym {
        /// Pressed or released.
        down: bool,
        /// The X11 keysym.
        keysym: u32,
        /// The console's keymap.
        keymap: String,
    },
    /// The guest's lock keys, as `source` reports them.
    Locks {
        /// The lock state.
        locks: vizor_keys::Locks,
        /// Who reports it (`qemu`, ...).
        source: &'static str,
    },
    /// Clipboard contents passed `dir`.
    Clipboard(crate::audit::Clipboard, Direction),
    /// Clipboard contents of `length` bytes did not pass `dir`: beyond the bound, or
    /// not for this participant.
    ClipboardDropped {
        /// Which way they were going.
        dir: Direction,
        /// Their length.
        length: u64,
    },
    /// A file transfer through the guest agent started or ended.
    FileTransfer(spice::transfers::Record),
    /// A file transfer refused (`[spice] file_transfer = "refuse"`), with what its
    /// start said when it was whole in what was refused.
    FileTransferRefused {
        /// Which way the file was going.
        way: spice::transfers::Way,
        /// Its id, name and size.
        start: Option<(u32, String, u64)>,
    },
}

/// A key transition as the VM takes it (see [`crate::audit::KeyEvent`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyNote {
    /// What reaches the guest.
    pub stroke: Stroke,
    /// How the VM read the event.
    pub via: Option<&'static str>,
    /// The keysym the browser sent.
    pub keysym: Option<u32>,
    /// The keysym disagrees with the key.
    pub mismatch: bool,
}

/// Why a message was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Input from a participant without input rights.
    NoInput,
    /// Clipboard contents the participant's policy does not pass.
    Clipboard,
    /// A request the VM would answer with what the browser cannot read
    /// (SetDesktopSize without ExtendedDesktopSize).
    Unanswerable,
}

/// What happens to one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// It goes on as it came.
    Forward,
    /// These bytes go in its place.
    Rewrite(Vec<u8>),
    /// Nothing goes on.
    Drop(DropReason),
}
