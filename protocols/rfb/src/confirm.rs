//! What server messages confirm, for the client decoder: the one fact that crosses
//! from the server-to-client direction to the client-to-server one.

use crate::server::{RectInfo, ServerEvent};

/// Server messages that confirm an extension, after which (and only after which) the
/// client may send that extension's messages. The two directions are decoded apart, so
/// a relay takes what each server event confirms ([`Confirmations::of`]) across to its
/// [`crate::client::ClientDecoder::confirm`]; the bits ([`Confirmations::bits`]) fit an atomic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Confirmations(u8);

impl Confirmations {
    /// An ExtendedMouseButtons rectangle: PointerEvent may carry a second button byte.
    pub const EXTENDED_MOUSE_BUTTONS: Confirmations = Confirmations(1);
    /// A ServerFence: the client may send ClientFence.
    pub const FENCE: Confirmations = Confirmations(2);
    /// EndOfContinuousUpdates: the client may send EnableContinuousUpdates.
    pub const CONTINUOUS_UPDATES: Confirmations = Confirmations(4);
    /// An xvp init message: the client may send xvp requests.
    pub const XVP: Confirmations = Confirmations(8);
    /// All of them.
    pub const ALL: Confirmations = Confirmations(15);

    /// What `event` from the server confirms: nothing for most events.
    pub fn of(event: &ServerEvent<'_>) -> Confirmations {
        match event {
            ServerEvent::Rect(r) if r.info == RectInfo::ExtendedMouseButtons => {
                Self::EXTENDED_MOUSE_BUTTONS
            }
            ServerEvent::ServerFence { .. } => Self::FENCE,
            ServerEvent::EndOfContinuousUpdates => Self::CONTINUOUS_UPDATES,
            ServerEvent::Xvp { code: 1, .. } => Self::XVP,
            _ => Confirmations(0),
        }
    }

    /// The set as bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// The set of `bits` (unknown bits are dropped).
    pub const fn from_bits(bits: u8) -> Confirmations {
        Confirmations(bits & Self::ALL.0)
    }

    /// Whether every confirmation of `other` is in this set.
    pub const fn contains(self, other: Confirmations) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Confirmations {
    type Output = Confirmations;
    fn bitor(self, other: Confirmations) -> Confirmations {
        Confirmations(self.0 | other.0)
    }
}
