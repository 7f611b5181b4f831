//! A SPICE-over-WebSocket client as spice-html5 behaves (one WebSocket per channel),
//! for the tests.

use super::{Browser, Vizor};
use std::time::Duration;
use vizor_spice::channel::{write_message, Decoder, Frame, HeaderKind};
use vizor_spice::link::{self, cap, channel_type, link_error, Caps, LinkMess, LinkReply};
use vizor_spice::{msg, Limits};
use vizor_testkit::DriveError;

pub const SPICE_PW: &str = "spw-4711";

/// Starts a SPICE test domain for one test. Each test has its own: spice-server serves
/// one client at a time, and a new session's main channel disconnects the last one.
pub fn domain(name: &'static str) -> &'static str {
    super::test_host(&[
        "domain",
        name,
        "--vnc-passwd",
        "vncpw1",
        "--spice-passwd",
        SPICE_PW,
    ]);
    name
}

/// Links one channel as spice-html5 does; `Err` carries the link error.
pub async fn link(
    b: &mut Browser,
    channel: u8,
    connection_id: u32,
    mini: bool,
) -> Result<LinkReply, u32> {
    let reply = link_reply(b, channel, connection_id, mini).await?;
    // A random ticket: vizor ignores it, the token is the credential.
    let mut ticket = cap::AUTH_SPICE.to_le_bytes().to_vec();
    ticket.extend((0..link::TICKET_LEN).map(|i| (i * 37 % 251) as u8));
    b.send(&ticket).await;
    let result = b
        .until(|buf| Ok::<_, std::convert::Infallible>(link::parse_u32(buf)))
        .await
        .map_err(|_| u32::MAX)?;
    if result != link_error::OK {
        return Err(result);
    }
    Ok(reply)
}

/// The first half of a link: the link message, and the reply it gets (`Err`: the link
/// error, or `u32::MAX` when the connection closed).
pub async fn link_reply(
    b: &mut Browser,
    channel: u8,
    connection_id: u32,
    mini: bool,
) -> Result<LinkReply, u32> {
    let mut common = Caps::default();
    common.set(cap::PROTOCOL_AUTH_SELECTION);
    common.set(cap::AUTH_SPICE);
    if mini {
        common.set(cap::MINI_HEADER);
    }
    let mut out = Vec::new();
    LinkMess {
        connection_id,
        channel_type: channel,
        channel_id: 0,
        common_caps: common,
        channel_caps: Caps::default(),
    }
    .write(&mut out);
    b.send(&out).await;
    let reply = match b
        .until(|buf| LinkReply::parse(buf, &Limits::default()))
        .await
    {
        Ok(r) => r,
        Err(DriveError::Step(e)) => panic!("{e}"),
        Err(DriveError::Source(_)) => return Err(u32::MAX),
    };
    if reply.error != link_error::OK {
        return Err(reply.error);
    }
    Ok(reply)
}

/// Follows the display channel until its first draw, acknowledging as a client must.
pub async fn display_ready(b: &mut Browser, kind: HeaderKind) {
    const MSG_DISPLAY_MARK: u16 = 102;
    const MSGC_DISPLAY_INIT: u16 = 101;
    // spice-html5's SpiceMsgcDisplayInit: pixmap cache 1 of 10 MiB, no GLZ dictionary.
    let mut init = vec![1u8];
    init.extend_from_slice(&(10u64 << 20).to_le_bytes());
    init.extend_from_slice(&[0, 0, 0, 0, 0]);
    let mut out = Vec::new();
    write_message(kind, 1, MSGC_DISPLAY_INIT, &init, &mut out).unwrap();
    b.send(&out).await;
    let mut dec = Decoder::new(kind, Limits::default());
    let (mut window, mut seen) = (0u32, 0u32);
    loop {
        let mut out = Vec::new();
        let mut marked = false;
        while let Some((f, n)) = dec.decode(&b.pending).unwrap() {
            let header = match &f {
                Frame::Whole { header, .. } | Frame::Begin { header } => Some(*header),
                Frame::Data(_) => None,
            };
            if let Some(header) = header {
                seen += 1;
                if header.msg_type == msg::common::MSG_SET_ACK {
                    if let Ok(msg::ServerMessage::SetAck {
                        generation,
                        window: w,
                    }) =
                        msg::parse_server(channel_type::DISPLAY, header.msg_type, body_or_empty(&f))
                    {
                        write_message(
                            kind,
                            1,
                            msg::common::MSGC_ACK_SYNC,
                            &generation.to_le_bytes(),
                            &mut out,
                        )
                        .unwrap();
                        window = w;
                        seen = 0;
                    }
                } else if window > 0 && seen >= window {
                    write_message(kind, 1, msg::common::MSGC_ACK, &[], &mut out).unwrap();
                    seen = 0;
                }
                if header.msg_type == MSG_DISPLAY_MARK {
                    marked = true;
                }
            }
            b.pending.drain(..n);
        }
        if !out.is_empty() {
            b.send(&out).await;
        }
        if marked {
            return;
        }
        b.read().await.unwrap();
    }
}

pub fn body_or_empty<'a>(f: &Frame<'a>) -> &'a [u8] {
    match f {
        Frame::Whole { body, .. } => body,
        _ => &[],
    }
}

/// Reads whole messages until one of `msg_type` arrives; returns its body.
pub async fn until(b: &mut Browser, dec: &mut Decoder, msg_type: u16) -> Vec<u8> {
    loop {
        while let Some((f, n)) = dec.decode(&b.pending).unwrap() {
            let found = match &f {
                Frame::Whole { header, body } if header.msg_type == msg_type => Some(body.to_vec()),
                _ => None,
            };
            b.pending.drain(..n);
            if let Some(body) = found {
                return body;
            }
        }
        b.read().await.unwrap();
    }
}

pub async fn open(v: &Vizor, token: &str) -> Browser {
    Browser::connect(v.addr, &format!("/websockify?token={token}")).await
}

pub async fn session(v: &Vizor, token: &str, mini: bool) -> (Browser, u32, HeaderKind) {
    let (main, id, kind, _) = session_listing(v, token, mini).await;
    (main, id, kind)
}

/// A session's main channel, its session id and header kind, and the channels
/// (type, id) its CHANNELS_LIST offered.
pub async fn session_listing(
    v: &Vizor,
    token: &str,
    mini: bool,
) -> (Browser, u32, HeaderKind, Vec<(u8, u8)>) {
    main_at(v, &format!("/websockify?token={token}"), mini).await
}

/// A session's main channel opened at `path` (a token's, or a resume's), as
/// [`session_listing`] gives it.
pub async fn main_at(
    v: &Vizor,
    path: &str,
    mini: bool,
) -> (Browser, u32, HeaderKind, Vec<(u8, u8)>) {
    let mut main = Browser::connect(v.addr, path).await;
    let reply = match link(&mut main, channel_type::MAIN, 0, mini).await {
        Ok(r) => r,
        Err(e) => panic!(
            "main channel link failed ({e}); vizor log:\n{}",
            v.log.lock().unwrap()
        ),
    };
    assert_eq!(reply.pub_key.len(), link::PUBKEY_LEN);
    let kind = if mini {
        HeaderKind::Mini
    } else {
        HeaderKind::Full
    };
    let mut dec = Decoder::new(kind, Limits::default());
    let init = until(&mut main, &mut dec, msg::main::MSG_INIT).await;
    let msg::ServerMessage::MainInit { session_id, .. } =
        msg::parse_server(channel_type::MAIN, msg::main::MSG_INIT, &init).unwrap()
    else {
        panic!("not a main init")
    };
    // As spice-html5 does: ask for the channel list, and link the other channels only
    // once spice-server has sent it.
    const MSGC_MAIN_ATTACH_CHANNELS: u16 = 104;
    const MSG_MAIN_CHANNELS_LIST: u16 = 104;
    let mut out = Vec::new();
    write_message(kind, 1, MSGC_MAIN_ATTACH_CHANNELS, &[], &mut out).unwrap();
    main.send(&out).await;
    let list = until(&mut main, &mut dec, MSG_MAIN_CHANNELS_LIST).await;
    let msg::ServerMessage::ChannelsList(list) =
        msg::parse_server(channel_type::MAIN, MSG_MAIN_CHANNELS_LIST, &list).unwrap()
    else {
        panic!("not a channels list")
    };
    let channels = list.iter().collect();
    (main, session_id, kind, channels)
}

/// Answers spice-server's pings on the main channel for `how_long`; returns how many.
pub async fn answer_pings(main: &mut Browser, kind: HeaderKind, how_long: Duration) -> usize {
    let mut dec = Decoder::new(kind, Limits::default());
    let mut answered = 0;
    let deadline = tokio::time::Instant::now() + how_long;
    while tokio::time::Instant::now() < deadline {
        let mut out = Vec::new();
        while let Some((f, n)) = dec.decode(&main.pending).unwrap() {
            if let Frame::Whole { header, body } = &f {
                if let Ok(msg::ServerMessage::Ping { id, timestamp }) =
                    msg::parse_server(channel_type::MAIN, header.msg_type, body)
                {
                    let mut pong = id.to_le_bytes().to_vec();
                    pong.extend_from_slice(&timestamp.to_le_bytes());
                    write_message(kind, 1, msg::common::MSGC_PONG, &pong, &mut out).unwrap();
                    answered += 1;
                }
            }
            main.pending.drain(..n);
        }
        if !out.is_empty() {
            main.send(&out).await;
        }
        let _ = tokio::time::timeout(Duration::from_millis(300), main.read()).await;
    }
    answered
}
