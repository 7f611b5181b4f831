//! Session policy, sans-IO: given a decoded message and the session's state, what to do
//! with it (forward, rewrite, drop, refuse) and what goes on record before it moves.
//!
//! The async relays in [`crate::session`] only move bytes and await the audit; every
//! rule about a message lives here and is unit-tested without sockets. A console has
//! one or more browser-side participants (its owner, operators, observers), each its
//! own connection to the VM with a [`Participant`] policy.

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
    pub const OBSERVER: Participant = Participant {
        role: Role::Observer,
        input: false,
        clipboard: ClipboardWays::NONE,
    };

    /// What a token's holder may do: an observer nothing, whatever its policy; an
    /// owner or operator what the token's policy lets through.
    pub fn of(claims: &crate::token::Claims) -> Participant {
        match claims.role {
            Role::Observer => Participant::OBSERVER,
            role => Participant {
                role,
                input: !claims.policy.view_only,
                clipboard: claims.policy.clipboard,
            },
        }
    }
}

pub use crate::token::{ClipboardWays, Role};

/// Whether a clipboard message may pass `dir` for a participant with `ways`.
///
/// Contents (legacy text, or an extended clipboard's provide) need the way they go.
/// The extended clipboard's control messages need the way the contents they lead to
/// will go: a notify (its sender has contents) leads to contents going its way, a
/// request (its sender wants contents) to contents coming back. So a participant who
/// may only read the VM's clipboard may still ask for it, and one who may only paste
/// may still be asked. Capabilities and peeks pass when either way does. A message
/// with several flags needs every right one of them needs.
pub fn clipboard_message_passes(
    ways: ClipboardWays,
    dir: Direction,
    extended_flags: Option<u32>,
) -> bool {
    use vizor_rfb::client::clipboard::{NOTIFY, PROVIDE, REQUEST};
    let (same, back) = match dir {
        Direction::BrowserToVm => (ways.to_vm, ways.from_vm),
        Direction::VmToBrowser => (ways.from_vm, ways.to_vm),
    };
    let Some(flags) = extended_flags else {
        // Legacy: the text itself.
        return same;
    };
    let mut ok = same || back;
    if flags & (PROVIDE | NOTIFY) != 0 {
        ok &= same;
    }
    if flags & REQUEST != 0 {
        ok &= back;
    }
    ok
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
    /// Input a participant may not give was dropped: one note per burst.
    InputDropped(Burst),
    /// A file transfer refused (`[spice] file_transfer = "refuse"`), with what its
    /// start said when it was whole in what was refused.
    FileTransferRefused {
        /// Which way the file was going.
        way: spice::transfers::Way,
        /// Its id, name and size.
        start: Option<(u32, String, u64)>,
    },
}

/// What kind of input was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// A key event.
    Key,
    /// A pointer event (motion or buttons).
    Pointer,
    /// Anything else that acts on the VM (a desktop size, an xvp power action).
    Other,
    /// Clipboard contents of this many bytes, toward the VM.
    Clipboard(u64),
}

/// A burst of dropped input: counts, and how long it lasted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Burst {
    /// Key events.
    pub keys: u32,
    /// Pointer events.
    pub pointer: u32,
    /// Other input.
    pub other: u32,
    /// Clipboard contents toward the VM.
    pub clipboard: u32,
    /// Their bytes.
    pub clipboard_bytes: u64,
    /// From its first event to its last.
    pub lasted: std::time::Duration,
}

/// Counts dropped input (and clipboard toward the VM) in bursts, so that a watcher
/// moving the mouse or pasting costs one audit record, not one per event: a burst ends at the first drop after [`Dropped::GAP`]
/// without any, once it has lasted [`Dropped::LONGEST`], or when the connection
/// closes ([`Dropped::close`]); its note comes then.
#[derive(Debug, Default)]
pub struct Dropped {
    open: Option<(std::time::Instant, std::time::Instant, Burst)>,
}

impl Dropped {
    /// A pause that ends a burst.
    pub const GAP: std::time::Duration = std::time::Duration::from_secs(1);
    /// The longest a burst runs before its note comes.
    pub const LONGEST: std::time::Duration = std::time::Duration::from_secs(10);

    /// Counts one dropped `input` at `now`; returns the burst it ended, if any.
    pub fn count(&mut self, input: Input, now: std::time::Instant) -> Option<Note> {
        let ended = match &self.open {
            Some((first, last, _))
                if now.saturating_duration_since(*last) > Self::GAP
                    || now.saturating_duration_since(*first) >= Self::LONGEST =>
            {
                self.close()
            }
            _ => None,
        };
        let (_, last, burst) = self.open.get_or_insert((now, now, Burst::default()));
        *last = now;
        let n = match input {
            Input::Key => &mut burst.keys,
            Input::Pointer => &mut burst.pointer,
            Input::Other => &mut burst.other,
            Input::Clipboard(bytes) => {
                burst.clipboard_bytes = burst.clipboard_bytes.saturating_add(bytes);
                &mut burst.clipboard
            }
        };
        *n = n.saturating_add(1);
        ended
    }

    /// The open burst's note, ending it.
    pub fn close(&mut self) -> Option<Note> {
        self.open.take().map(|(first, last, burst)| {
            Note::InputDropped(Burst {
                lasted: last.saturating_duration_since(first),
                ..burst
            })
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn burst(keys: u32, pointer: u32, other: u32, lasted_ms: u64) -> Option<Note> {
        Some(Note::InputDropped(Burst {
            keys,
            pointer,
            other,
            lasted: Duration::from_millis(lasted_ms),
            ..Burst::default()
        }))
    }

    #[test]
    fn dropped_input_is_one_note_per_burst() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut d = Dropped::default();
        assert_eq!(d.count(Input::Key, at(0)), None);
        assert_eq!(d.count(Input::Pointer, at(900)), None);
        assert_eq!(d.count(Input::Key, at(1800)), None, "gaps under a second");
        // A pause over a second: the burst so far, and a new one.
        assert_eq!(d.count(Input::Other, at(2801)), burst(2, 1, 0, 1800));
        // A steady stream is cut every ten seconds.
        for ms in (3000..12801).step_by(100) {
            assert_eq!(d.count(Input::Pointer, at(ms)), None, "{ms}");
        }
        assert_eq!(d.count(Input::Pointer, at(12801)), burst(0, 99, 1, 9999));
        assert_eq!(d.close(), burst(0, 1, 0, 0));
        assert_eq!(d.close(), None);
        // Clipboard counts with its bytes.
        d.count(Input::Clipboard(5), at(20_000));
        d.count(Input::Clipboard(7), at(20_100));
        assert_eq!(
            d.close(),
            Some(Note::InputDropped(Burst {
                clipboard: 2,
                clipboard_bytes: 12,
                lasted: Duration::from_millis(100),
                ..Burst::default()
            }))
        );
        // Counts saturate.
        let mut d = Dropped {
            open: Some((
                t0,
                t0,
                Burst {
                    keys: u32::MAX,
                    ..Burst::default()
                },
            )),
        };
        assert_eq!(d.count(Input::Key, t0), None);
        assert_eq!(d.close(), burst(u32::MAX, 0, 0, 0));
    }

    #[test]
    fn clipboard_messages_need_the_way_their_contents_go() {
        use vizor_rfb::client::clipboard::{CAPS, NOTIFY, PEEK, PROVIDE, REQUEST, TEXT};
        let ways = |s: &str| s.parse::<ClipboardWays>().unwrap();
        let (up, down) = (Direction::BrowserToVm, Direction::VmToBrowser);
        // (message flags, direction) -> passes for none, to_vm, from_vm, both.
        for (flags, dir, want) in [
            (None, up, [false, true, false, true]),
            (None, down, [false, false, true, true]),
            (Some(PROVIDE | TEXT), up, [false, true, false, true]),
            (Some(PROVIDE | TEXT), down, [false, false, true, true]),
            (Some(NOTIFY | TEXT), up, [false, true, false, true]),
            (Some(NOTIFY | TEXT), down, [false, false, true, true]),
            (Some(REQUEST | TEXT), up, [false, false, true, true]),
            (Some(REQUEST | TEXT), down, [false, true, false, true]),
            (Some(CAPS | TEXT), up, [false, true, true, true]),
            (Some(PEEK), down, [false, true, true, true]),
            (
                Some(REQUEST | PROVIDE | TEXT),
                up,
                [false, false, false, true],
            ),
        ] {
            let got = ["none", "to_vm", "from_vm", "both"]
                .map(|w| clipboard_message_passes(ways(w), dir, flags));
            assert_eq!(got, want, "{flags:?} {dir:?}");
        }
    }

    #[test]
    fn a_tokens_role_and_policy_make_its_participant() {
        let mut c = crate::token::Claims::new("d", [1; 16], crate::token::ConsoleKind::Vnc, "u", 9)
            .unwrap();
        assert_eq!(Participant::of(&c), Participant::OWNER);
        c.policy.view_only = true;
        c.policy.clipboard = ClipboardWays {
            to_vm: false,
            from_vm: true,
        };
        let p = Participant::of(&c);
        assert_eq!(
            (p.role, p.input, p.clipboard),
            (Role::Owner, false, c.policy.clipboard)
        );
        let joins = crate::token::Joins {
            session: 1,
            owner: [0; 8],
        };
        let operator = c.clone().joining(Role::Operator, joins);
        assert_eq!(Participant::of(&operator).role, Role::Operator);
        // An observer reaches nothing, whatever its token's policy says.
        let observer = c
            .joining(Role::Observer, joins)
            .with_policy(Default::default());
        assert_eq!(Participant::of(&observer), Participant::OBSERVER);
    }
}
