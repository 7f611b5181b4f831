//! What a sans-IO protocol state answers when it is fed bytes, shared by the RFB and
//! SPICE crates so that one loop drives every handshake of either.
//!
//! A state takes the bytes received so far (from the first byte of its message) and
//! answers [`Progress::NeedMore`], giving itself back, until the message is whole;
//! then [`Progress::Done`] with the next state and how many bytes the message spanned.
//! The caller drains those bytes and feeds what follows to the next state.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// The outcome of feeding bytes to a protocol state.
#[derive(Debug)]
#[must_use]
pub enum Progress<S, N> {
    /// Not enough bytes yet; call `receive` again on the returned state with the same
    /// bytes plus whatever arrives next.
    NeedMore(S),
    /// The state completed, consuming `consumed` bytes of the input.
    Done {
        /// The next state (or the stage's result).
        next: N,
        /// Bytes of the input this step consumed.
        consumed: usize,
    },
}

impl<S, N> Progress<S, N> {
    /// The progress of `state` given what a parser made of the input: `None` (not all
    /// there yet) keeps the state; a value and its length complete it into `then`'s
    /// next state.
    pub fn from_parse<T>(
        state: S,
        parsed: Option<(T, usize)>,
        then: impl FnOnce(T) -> N,
    ) -> Progress<S, N> {
        match parsed {
            None => Progress::NeedMore(state),
            Some((value, consumed)) => Progress::Done {
                next: then(value),
                consumed,
            },
        }
    }

    /// `Ok((next, consumed))` once complete, `Err(state)` while it needs more.
    pub fn split(self) -> Result<(N, usize), S> {
        match self {
            Progress::NeedMore(s) => Err(s),
            Progress::Done { next, consumed } => Ok((next, consumed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parse_keeps_the_state_until_it_completes() {
        let waiting: Progress<&str, u8> = Progress::from_parse("state", None::<(u8, usize)>, |v| v);
        assert!(matches!(waiting.split(), Err("state")));
        let done: Progress<&str, u16> = Progress::from_parse("state", Some((7u8, 3)), u16::from);
        assert!(matches!(done.split(), Ok((7, 3))));
    }
}
