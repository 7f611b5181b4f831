//! The link stage in both roles, as explicit states that consume themselves (in the
//! manner of `vizor-rfb`'s handshake).
//!
//! A proxy is the SPICE *server* toward the browser ([`server`]) and the SPICE
//! *client* toward spice-server ([`client`]). Each state is named for what it waits
//! for. A state that reads input has a `receive(self, input)` method that returns
//! [`Progress::NeedMore`] with the state itself when `input` does not yet hold a whole
//! message (feed it again with more bytes, from the same start), or [`Progress::Done`]
//! with the next state and the bytes consumed. States that wait for a decision of the
//! caller (admit the channel or not, the VM's reply, the link result) have methods
//! named for the decision, which append what to send to `out`.
//!
//! ```text
//! browser            proxy                           spice-server
//!   LinkMess  ->  server::ExpectLinkMess
//!                 (caller admits the channel)
//!                 client::start(mess)        LinkMess  ->
//!                 client::ExpectReply               <-  LinkReply (RSA key, caps)
//!   <- LinkReply  server::Linking::reply(...)   (proxy's key, SASL removed)
//!   [mech] ->     server::ExpectAuth
//!   ticket ->     server::ExpectTicket          (read and dropped)
//!                 client::Replied::send_ticket  [mech] ticket  ->
//!                 client::ExpectResult              <-  result
//!   <- result     server::Ticketed::result
//! ```

use crate::channel::HeaderKind;
use crate::error::{Error, Limits};
use crate::link::{cap, parse_ticket, parse_u32, Caps, LinkMess, LinkReply};

/// The outcome of feeding bytes to a state (shared with the other protocol crate, so
/// one loop drives both).
pub use vizor_sansio::Progress;

/// A `SpiceLinkReply` that carries only an error `code` (no key, no capabilities): how
/// a link is refused before anything else is said.
pub fn write_refusal(code: u32, out: &mut Vec<u8>) {
    LinkReply {
        error: code,
        pub_key: Vec::new(),
        common_caps: Caps::default(),
        channel_caps: Caps::default(),
    }
    .write(out);
}

/// The header both legs of a channel use after the link: the mini header when the
/// client asked for it and the server has it.
fn header_kind(client: &Caps, server: &Caps) -> HeaderKind {
    if client.has(cap::MINI_HEADER) && server.has(cap::MINI_HEADER) {
        HeaderKind::Mini
    } else {
        HeaderKind::Full
    }
}

/// The proxy as the SPICE server toward the browser.
pub mod server {
    use super::*;

    /// Waits for the browser's `SpiceLinkMess`.
    #[derive(Debug)]
    pub struct ExpectLinkMess {
        limits: Limits,
    }

    impl ExpectLinkMess {
        /// The first state of a channel toward the browser.
        pub fn new(limits: Limits) -> Self {
            ExpectLinkMess { limits }
        }

        /// Reads the link message: which channel, of which session.
        pub fn receive(self, input: &[u8]) -> Result<Progress<Self, Linking>, Error> {
            let parsed = LinkMess::parse(input, &self.limits)?;
            Ok(Progress::from_parse(self, parsed, |mess| Linking { mess }))
        }
    }

    /// The browser asked for a channel: the caller admits it (or refuses it with
    /// [`write_refusal`]) and links to spice-server, whose reply it passes to
    /// [`Linking::reply`].
    #[derive(Debug)]
    pub struct Linking {
        mess: LinkMess,
    }

    impl Linking {
        /// The browser's link message.
        pub fn mess(&self) -> &LinkMess {
            &self.mess
        }

        /// Answers the browser with spice-server's capabilities, minus SASL (the proxy
        /// authenticates with the ticket, and the browser's ticket is not used), and the
        /// proxy's own RSA key `pub_key`.
        pub fn reply(self, vm: &LinkReply, pub_key: &[u8], out: &mut Vec<u8>) -> ExpectAuth {
            let mut offered = vm.common_caps.clone();
            offered.clear(cap::AUTH_SASL);
            LinkReply {
                error: crate::link::link_error::OK,
                pub_key: pub_key.to_vec(),
                common_caps: offered.clone(),
                channel_caps: vm.channel_caps.clone(),
            }
            .write(out);
            ExpectAuth {
                selects: self.mess.common_caps.has(cap::PROTOCOL_AUTH_SELECTION)
                    && offered.has(cap::PROTOCOL_AUTH_SELECTION),
                header: header_kind(&self.mess.common_caps, &vm.common_caps),
            }
        }
    }

    /// Waits for the browser's auth-mechanism word, when both sides select one.
    #[derive(Debug)]
    pub struct ExpectAuth {
        selects: bool,
        header: HeaderKind,
    }

    impl ExpectAuth {
        /// Reads the mechanism: only SPICE's ticket is offered. Another is refused with
        /// `PERMISSION_DENIED`, appended to `out`.
        pub fn receive(
            self,
            input: &[u8],
            out: &mut Vec<u8>,
        ) -> Result<Progress<Self, ExpectTicket>, Error> {
            let header = self.header;
            if !self.selects {
                return Ok(Progress::Done {
                    next: ExpectTicket { header },
                    consumed: 0,
                });
            }
            match parse_u32(input) {
                None => Ok(Progress::NeedMore(self)),
                Some((cap::AUTH_SPICE, n)) => Ok(Progress::Done {
                    next: ExpectTicket { header },
                    consumed: n,
                }),
                Some(_) => {
                    out.extend_from_slice(
                        &crate::link::link_error::PERMISSION_DENIED.to_le_bytes(),
                    );
                    Err(Error::Malformed {
                        what: "SPICE link",
                        why: "an authentication mechanism vizor did not offer",
                    })
                }
            }
        }
    }

    /// Waits for the browser's encrypted ticket, which is read and dropped: the
    /// browser's credential is its token, not a password.
    #[derive(Debug)]
    pub struct ExpectTicket {
        header: HeaderKind,
    }

    impl ExpectTicket {
        /// Reads the 128-byte ticket.
        pub fn receive(self, input: &[u8]) -> Progress<Self, Ticketed> {
            let header = self.header;
            Progress::from_parse(self, parse_ticket(input), |_| Ticketed { header })
        }
    }

    /// The browser gave its ticket: the link result spice-server gave the proxy is
    /// passed on.
    #[derive(Debug)]
    pub struct Ticketed {
        header: HeaderKind,
    }

    impl Ticketed {
        /// Appends the link result `code`; on success, the header the channel uses.
        pub fn result(self, code: u32, out: &mut Vec<u8>) -> Option<HeaderKind> {
            out.extend_from_slice(&code.to_le_bytes());
            (code == crate::link::link_error::OK).then_some(self.header)
        }
    }
}

/// The proxy as the SPICE client toward spice-server.
pub mod client {
    use super::*;

    /// Appends the browser's link message as the proxy sends it on: SASL removed (the
    /// proxy cannot take part in it), the ticket offered.
    pub fn start(mess: &LinkMess, limits: Limits, out: &mut Vec<u8>) -> ExpectReply {
        let mut forwarded = mess.clone();
        forwarded.common_caps.clear(cap::AUTH_SASL);
        forwarded.common_caps.set(cap::AUTH_SPICE);
        forwarded.write(out);
        ExpectReply {
            limits,
            selects: forwarded.common_caps.has(cap::PROTOCOL_AUTH_SELECTION),
        }
    }

    /// Waits for spice-server's `SpiceLinkReply`.
    #[derive(Debug)]
    pub struct ExpectReply {
        limits: Limits,
        selects: bool,
    }

    impl ExpectReply {
        /// Reads the reply.
        pub fn receive(self, input: &[u8]) -> Result<Progress<Self, Replied>, Error> {
            let parsed = LinkReply::parse(input, &self.limits)?;
            // spice-server reads a mechanism word when the client offered to select one,
            // whatever its own reply says (reds_handle_read_link_done).
            let selects = self.selects;
            Ok(Progress::from_parse(self, parsed, |reply| Replied {
                selects,
                reply,
            }))
        }
    }

    /// spice-server replied: with an error (see [`Replied::refused`]), or with its key,
    /// which encrypts the ticket.
    #[derive(Debug)]
    pub struct Replied {
        reply: LinkReply,
        selects: bool,
    }

    impl Replied {
        /// The reply.
        pub fn reply(&self) -> &LinkReply {
            &self.reply
        }

        /// spice-server's error code, when it refused the link.
        pub fn refused(&self) -> Option<u32> {
            (self.reply.error != crate::link::link_error::OK).then_some(self.reply.error)
        }

        /// Whether spice-server takes a ticket. One with SASL on offers SASL alone
        /// (and refuses the ticket mechanism); a server from before mechanism
        /// selection takes a ticket without saying so.
        pub fn takes_ticket(&self) -> bool {
            let caps = &self.reply.common_caps;
            !caps.has(cap::PROTOCOL_AUTH_SELECTION) || caps.has(cap::AUTH_SPICE)
        }

        /// Appends the ticket (the password, encrypted with the reply's key), after the
        /// mechanism word when the proxy offered to select one.
        pub fn send_ticket(self, encrypted: &[u8], out: &mut Vec<u8>) -> ExpectResult {
            if self.selects {
                out.extend_from_slice(&cap::AUTH_SPICE.to_le_bytes());
            }
            out.extend_from_slice(encrypted);
            ExpectResult
        }
    }

    /// Waits for spice-server's link result.
    #[derive(Debug)]
    pub struct ExpectResult;

    impl ExpectResult {
        /// Reads the result: 0 is OK, anything else a [`crate::link::link_error`].
        pub fn receive(self, input: &[u8]) -> Progress<Self, u32> {
            Progress::from_parse(self, parse_u32(input), |code| code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{link_error, TICKET_LEN};

    fn caps(bits: &[u32]) -> Caps {
        let mut c = Caps::default();
        for b in bits {
            c.set(*b);
        }
        c
    }

    fn mess(common: &[u32]) -> LinkMess {
        LinkMess {
            connection_id: 0,
            channel_type: crate::link::channel_type::MAIN,
            channel_id: 0,
            common_caps: caps(common),
            channel_caps: caps(&[1]),
        }
    }

    fn reply(common: &[u32]) -> LinkReply {
        LinkReply {
            error: link_error::OK,
            pub_key: vec![7; crate::link::PUBKEY_LEN],
            common_caps: caps(common),
            channel_caps: caps(&[2]),
        }
    }

    /// Feeds `input` one byte at a time: `NeedMore` until the last byte.
    fn bytewise<S, N>(
        mut state: S,
        input: &[u8],
        mut step: impl FnMut(S, &[u8]) -> Result<Progress<S, N>, Error>,
    ) -> (N, usize) {
        for end in 0..=input.len() {
            match step(state, &input[..end]).expect("no error") {
                Progress::NeedMore(s) => state = s,
                Progress::Done { next, consumed } => {
                    assert_eq!(end, input.len(), "done only with the whole message");
                    return (next, consumed);
                }
            }
        }
        panic!("never done");
    }

    const ALL: [u32; 4] = [
        cap::PROTOCOL_AUTH_SELECTION,
        cap::AUTH_SPICE,
        cap::AUTH_SASL,
        cap::MINI_HEADER,
    ];

    #[test]
    fn a_whole_link_with_mechanism_selection_and_mini_headers() {
        // The browser's link message, in pieces.
        let mut wire = Vec::new();
        mess(&ALL).write(&mut wire);
        let (linking, n) = bytewise(
            server::ExpectLinkMess::new(Limits::default()),
            &wire,
            |s, b| s.receive(b),
        );
        assert_eq!(n, wire.len());
        assert_eq!(linking.mess(), &mess(&ALL));
        // On toward spice-server: SASL removed, the ticket offered.
        let mut to_vm = Vec::new();
        let expect_reply = client::start(linking.mess(), Limits::default(), &mut to_vm);
        let (sent, _) = LinkMess::parse(&to_vm, &Limits::default())
            .unwrap()
            .unwrap();
        assert!(!sent.common_caps.has(cap::AUTH_SASL));
        assert!(sent.common_caps.has(cap::AUTH_SPICE));
        // spice-server's reply.
        let mut wire = Vec::new();
        reply(&ALL).write(&mut wire);
        let (replied, _) = bytewise(expect_reply, &wire, |s, b| s.receive(b));
        assert_eq!(replied.refused(), None);
        // To the browser: the proxy's key, no SASL.
        let mut to_browser = Vec::new();
        let expect_auth = linking.reply(replied.reply(), &[9; 162], &mut to_browser);
        let (told, _) = LinkReply::parse(&to_browser, &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(told.pub_key, vec![9; 162]);
        assert!(!told.common_caps.has(cap::AUTH_SASL));
        assert!(told.common_caps.has(cap::MINI_HEADER));
        assert_eq!(told.channel_caps, caps(&[2]));
        // The browser selects the ticket, then sends one.
        let mut out = Vec::new();
        let (expect_ticket, n) = bytewise(expect_auth, &cap::AUTH_SPICE.to_le_bytes(), |s, b| {
            s.receive(b, &mut out)
        });
        assert_eq!((n, out.len()), (4, 0));
        let (ticketed, n) = bytewise(expect_ticket, &[0; TICKET_LEN], |s, b| Ok(s.receive(b)));
        assert_eq!(n, TICKET_LEN);
        // The proxy's own ticket goes to spice-server after the mechanism word.
        let mut to_vm = Vec::new();
        let expect_result = replied.send_ticket(&[5; TICKET_LEN], &mut to_vm);
        assert_eq!(&to_vm[..4], &cap::AUTH_SPICE.to_le_bytes());
        assert_eq!(&to_vm[4..], &[5; TICKET_LEN]);
        let (code, _) = bytewise(expect_result, &0u32.to_le_bytes(), |s, b| Ok(s.receive(b)));
        let mut to_browser = Vec::new();
        assert_eq!(
            ticketed.result(code, &mut to_browser),
            Some(HeaderKind::Mini)
        );
        assert_eq!(to_browser, 0u32.to_le_bytes());
    }

    #[test]
    fn without_mechanism_selection_the_ticket_comes_alone_and_headers_are_full() {
        let plain = [cap::AUTH_SPICE];
        let mut to_vm = Vec::new();
        let expect_reply = client::start(&mess(&plain), Limits::default(), &mut to_vm);
        let mut wire = Vec::new();
        reply(&ALL).write(&mut wire);
        let (replied, _) = bytewise(expect_reply, &wire, |s, b| s.receive(b));
        let linking = {
            let mut w = Vec::new();
            mess(&plain).write(&mut w);
            match server::ExpectLinkMess::new(Limits::default())
                .receive(&w)
                .unwrap()
            {
                Progress::Done { next, .. } => next,
                Progress::NeedMore(_) => panic!("whole"),
            }
        };
        let mut out = Vec::new();
        let expect_auth = linking.reply(replied.reply(), &[9; 162], &mut out);
        // No mechanism word: straight to the ticket, nothing consumed.
        let mut refusal = Vec::new();
        let Progress::Done { next, consumed: 0 } = expect_auth.receive(&[], &mut refusal).unwrap()
        else {
            panic!("no mechanism word expected");
        };
        let (ticketed, _) = bytewise(next, &[0; TICKET_LEN], |s, b| Ok(s.receive(b)));
        let mut to_vm = Vec::new();
        let _ = replied.send_ticket(&[5; TICKET_LEN], &mut to_vm);
        assert_eq!(
            to_vm, [5; TICKET_LEN],
            "no mechanism word toward the VM either"
        );
        let mut out = Vec::new();
        assert_eq!(ticketed.result(0, &mut out), Some(HeaderKind::Full));
    }

    #[test]
    fn another_mechanism_is_refused_with_permission_denied() {
        let mut w = Vec::new();
        mess(&ALL).write(&mut w);
        let Progress::Done { next: linking, .. } = server::ExpectLinkMess::new(Limits::default())
            .receive(&w)
            .unwrap()
        else {
            panic!("whole");
        };
        let expect_auth = linking.reply(&reply(&ALL), &[9; 162], &mut Vec::new());
        let mut out = Vec::new();
        let e = expect_auth
            .receive(&cap::AUTH_SASL.to_le_bytes(), &mut out)
            .unwrap_err();
        assert!(matches!(e, Error::Malformed { .. }), "{e:?}");
        assert_eq!(out, link_error::PERMISSION_DENIED.to_le_bytes());
    }

    #[test]
    fn a_refused_link_and_a_failed_result_are_the_callers_to_pass_on() {
        let mut to_vm = Vec::new();
        let expect_reply = client::start(&mess(&ALL), Limits::default(), &mut to_vm);
        let mut refused = reply(&ALL);
        refused.error = link_error::PERMISSION_DENIED;
        let mut wire = Vec::new();
        refused.write(&mut wire);
        let Progress::Done { next, .. } = expect_reply.receive(&wire).unwrap() else {
            panic!("whole");
        };
        assert_eq!(next.refused(), Some(link_error::PERMISSION_DENIED));
        // A refusal before the reply: the code alone.
        let mut out = Vec::new();
        write_refusal(link_error::BAD_CONNECTION_ID, &mut out);
        let (r, _) = LinkReply::parse(&out, &Limits::default()).unwrap().unwrap();
        assert_eq!(r.error, link_error::BAD_CONNECTION_ID);
        // A failed result goes to the browser and opens no channel.
        let w = {
            let mut w = Vec::new();
            mess(&[]).write(&mut w);
            w
        };
        let Progress::Done { next: linking, .. } = server::ExpectLinkMess::new(Limits::default())
            .receive(&w)
            .unwrap()
        else {
            panic!("whole");
        };
        let expect_auth = linking.reply(&reply(&[]), &[9; 162], &mut Vec::new());
        let Progress::Done { next, .. } = expect_auth.receive(&[], &mut Vec::new()).unwrap() else {
            panic!("no mechanism");
        };
        let Progress::Done { next: ticketed, .. } = next.receive(&[0; TICKET_LEN]) else {
            panic!("whole ticket");
        };
        let mut out = Vec::new();
        assert_eq!(
            ticketed.result(link_error::PERMISSION_DENIED, &mut out),
            None
        );
        assert_eq!(out, link_error::PERMISSION_DENIED.to_le_bytes());
    }

    #[test]
    fn a_server_that_takes_sasl_alone_takes_no_ticket() {
        let replied = |common: &[u32]| {
            let expect_reply = client::start(&mess(&ALL), Limits::default(), &mut Vec::new());
            let mut wire = Vec::new();
            reply(common).write(&mut wire);
            match expect_reply.receive(&wire).unwrap() {
                Progress::Done { next, .. } => next,
                Progress::NeedMore(_) => panic!("whole"),
            }
        };
        // spice-server with SASL on offers SASL instead of the ticket.
        let sasl_only = [cap::PROTOCOL_AUTH_SELECTION, cap::AUTH_SASL];
        assert!(!replied(&sasl_only).takes_ticket());
        assert!(replied(&ALL).takes_ticket());
        // A server from before mechanism selection takes a ticket unasked.
        assert!(replied(&[]).takes_ticket());
        // spice-server reads the mechanism word whenever the client offered to select
        // one, whatever its reply says: the proxy sends it then.
        let mut to_vm = Vec::new();
        let _ = replied(&[cap::AUTH_SPICE]).send_ticket(&[5; TICKET_LEN], &mut to_vm);
        assert_eq!(&to_vm[..4], &cap::AUTH_SPICE.to_le_bytes());
    }

    #[test]
    fn a_broken_link_message_is_an_error_not_a_wait() {
        let e = server::ExpectLinkMess::new(Limits::default())
            .receive(b"RFB 003.008\nxxxxxxxx")
            .unwrap_err();
        assert!(matches!(e, Error::BadMagic(_)), "{e:?}");
    }
}
