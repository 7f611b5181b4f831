//! Client-to-server messages after the handshake.
//!
//! Every message in this direction is small and bounded, so [`ClientDecoder`] returns
//! whole messages borrowing from the caller's buffer, together with their length: the
//! relay audits the typed message and forwards exactly `buf[..len]`.

use crate::encoding::Encoding;
use crate::error::{Error, Limits};
use crate::pixel::PixelFormat;
use crate::wire::{need, Reader};

pub use crate::confirm::Confirmations;
pub use crate::cut_text::{clipboard, Clip, CutText};
use crate::cut_text::{parse_cut_text, too_long, write_cut_text};
pub use crate::screens::{Screen, Screens};

/// Message type numbers, client to server.
pub mod msg {
    /// SetPixelFormat.
    pub const SET_PIXEL_FORMAT: u8 = 0;
    /// SetEncodings.
    pub const SET_ENCODINGS: u8 = 2;
    /// FramebufferUpdateRequest.
    pub const FRAMEBUFFER_UPDATE_REQUEST: u8 = 3;
    /// KeyEvent.
    pub const KEY_EVENT: u8 = 4;
    /// PointerEvent.
    pub const POINTER_EVENT: u8 = 5;
    /// ClientCutText.
    pub const CLIENT_CUT_TEXT: u8 = 6;
    /// EnableContinuousUpdates.
    pub const ENABLE_CONTINUOUS_UPDATES: u8 = 150;
    /// ClientFence.
    pub const CLIENT_FENCE: u8 = 248;
    /// xvp client message.
    pub const XVP: u8 = 250;
    /// SetDesktopSize.
    pub const SET_DESKTOP_SIZE: u8 = 251;
    /// QEMU client message.
    pub const QEMU: u8 = 255;
}

/// A client-to-server message, borrowing variable parts from the decoder's input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage<'a> {
    /// Changes the pixel format of later updates.
    SetPixelFormat(PixelFormat),
    /// The encodings the client accepts, in order of preference.
    SetEncodings(Encodings<'a>),
    /// Asks for an update of an area.
    FramebufferUpdateRequest {
        /// Only changes are wanted.
        incremental: bool,
        /// Left edge.
        x: u16,
        /// Top edge.
        y: u16,
        /// Width.
        width: u16,
        /// Height.
        height: u16,
    },
    /// A key press or release, by X11 keysym.
    KeyEvent {
        /// Pressed (true) or released.
        down: bool,
        /// The X11 keysym.
        keysym: u32,
    },
    /// Pointer position and buttons.
    PointerEvent {
        /// Buttons 1-8 in bits 0-7; with extended mouse buttons, buttons 8-15 in bits
        /// 7-14 (the marker bit 7 of the first byte cleared).
        buttons: u16,
        /// Horizontal position (or delta in QEMU relative mode).
        x: u16,
        /// Vertical position (or delta in QEMU relative mode).
        y: u16,
    },
    /// Clipboard from the client.
    ClientCutText(CutText<'a>),
    /// Turns continuous updates on or off for an area.
    EnableContinuousUpdates {
        /// On or off.
        enable: bool,
        /// Left edge.
        x: u16,
        /// Top edge.
        y: u16,
        /// Width.
        width: u16,
        /// Height.
        height: u16,
    },
    /// A fence request or response.
    ClientFence {
        /// Fence flags.
        flags: u32,
        /// Up to 64 bytes the peer echoes back.
        payload: &'a [u8],
    },
    /// xvp: shut down, reboot or reset the machine.
    Xvp {
        /// xvp extension version.
        version: u8,
        /// 2 shutdown, 3 reboot, 4 reset.
        code: u8,
    },
    /// Asks for a new desktop size and screen layout.
    SetDesktopSize {
        /// Requested width.
        width: u16,
        /// Requested height.
        height: u16,
        /// The screen layout.
        screens: Screens<'a>,
    },
    /// QEMU extended key event: keysym plus XT scancode.
    QemuExtendedKeyEvent {
        /// Pressed (true) or released.
        down: bool,
        /// The X11 keysym (0 if unknown).
        keysym: u32,
        /// The XT keycode (0xe0-prefixed codes have the high bit set).
        keycode: u32,
    },
    /// QEMU audio control.
    QemuAudio(QemuAudioClient),
}

/// QEMU audio client operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuAudioClient {
    /// Start sending audio.
    Enable,
    /// Stop sending audio.
    Disable,
    /// Sample format for later audio data.
    SetFormat {
        /// 0 U8, 1 S8, 2 U16, 3 S16, 4 U32, 5 S32.
        format: u8,
        /// 1 or 2.
        channels: u8,
        /// Samples per second.
        frequency: u32,
    },
}

/// The encoding list of a SetEncodings message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encodings<'a>(&'a [u8]);

impl<'a> Encodings<'a> {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len() / 4
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries, in the client's order of preference.
    pub fn iter(&self) -> impl Iterator<Item = Encoding> + 'a {
        self.0
            .chunks_exact(4)
            .map(|c| Encoding(i32::from_be_bytes([c[0], c[1], c[2], c[3]])))
    }
}

/// The name of pointer button bit `bit` of a PointerEvent (0 = button 1) in audit
/// records.
pub fn button_name(bit: u32) -> &'static str {
    const NAMES: [&str; 16] = [
        "left",
        "middle",
        "right",
        "wheel_up",
        "wheel_down",
        "wheel_left",
        "wheel_right",
        "back",
        "forward",
        "button 10",
        "button 11",
        "button 12",
        "button 13",
        "button 14",
        "button 15",
        "button 16",
    ];
    NAMES.get(bit as usize).copied().unwrap_or("button ?")
}

/// Decoder of the client-to-server stream.
#[derive(Debug, Clone)]
pub struct ClientDecoder {
    limits: Limits,
    /// The client offered the extended clipboard, so negative cut-text lengths are
    /// the extended form rather than a 2 GiB+ length.
    extended_clipboard: bool,
    /// The client offered extended mouse buttons...
    extended_mouse_offered: bool,
    /// ...and the server confirmed them: PointerEvent may carry a second button byte.
    extended_pointer: bool,
    /// What the server confirmed so far.
    confirmed: Confirmations,
}

impl ClientDecoder {
    /// A decoder for the stream that follows ClientInit.
    pub fn new(limits: Limits) -> Self {
        ClientDecoder {
            limits,
            extended_clipboard: false,
            extended_mouse_offered: false,
            extended_pointer: false,
            confirmed: Confirmations::default(),
        }
    }

    /// Called when the server confirmed extended mouse buttons (an
    /// ExtendedMouseButtons rectangle): from then on a PointerEvent whose first button
    /// byte has bit 7 set carries a second button byte.
    pub fn enable_extended_pointer(&mut self) {
        self.confirm(Confirmations::EXTENDED_MOUSE_BUTTONS);
    }

    /// Called with what the server confirmed: the client messages of those extensions
    /// are valid from then on (before, they are refused as never negotiated).
    pub fn confirm(&mut self, c: Confirmations) {
        self.confirmed = self.confirmed | c;
        if c.contains(Confirmations::EXTENDED_MOUSE_BUTTONS) {
            self.extended_pointer = self.extended_mouse_offered;
        }
    }

    fn require(&self, c: Confirmations, what: &'static str) -> Result<(), Error> {
        if self.confirmed.contains(c) {
            Ok(())
        } else {
            Err(Error::NotNegotiated(what))
        }
    }

    /// Decodes the next whole message at the start of `buf`, returning it with its
    /// length; `Ok(None)` when `buf` does not hold all of it yet.
    pub fn decode<'a>(
        &mut self,
        buf: &'a [u8],
    ) -> Result<Option<(ClientMessage<'a>, usize)>, Error> {
        let mut r = Reader::new(buf);
        let message = match need!(r.u8()) {
            msg::SET_PIXEL_FORMAT => {
                need!(r.skip(3));
                ClientMessage::SetPixelFormat(PixelFormat::parse(&need!(r.array()))?)
            }
            msg::SET_ENCODINGS => {
                need!(r.skip(1));
                let n = need!(r.u16());
                self.limits.check("SetEncodings", 4 + 4 * u64::from(n))?;
                let list = Encodings(need!(r.bytes(4 * usize::from(n))));
                self.extended_clipboard = list.iter().any(|e| e == Encoding::EXTENDED_CLIPBOARD);
                self.extended_mouse_offered =
                    list.iter().any(|e| e == Encoding::EXTENDED_MOUSE_BUTTONS);
                if !self.extended_mouse_offered {
                    self.extended_pointer = false;
                }
                ClientMessage::SetEncodings(list)
            }
            msg::FRAMEBUFFER_UPDATE_REQUEST => ClientMessage::FramebufferUpdateRequest {
                incremental: need!(r.u8()) != 0,
                x: need!(r.u16()),
                y: need!(r.u16()),
                width: need!(r.u16()),
                height: need!(r.u16()),
            },
            msg::KEY_EVENT => {
                let down = need!(r.u8()) != 0;
                need!(r.skip(2));
                ClientMessage::KeyEvent {
                    down,
                    keysym: need!(r.u32()),
                }
            }
            msg::POINTER_EVENT => {
                let mask = need!(r.u8());
                let x = need!(r.u16());
                let y = need!(r.u16());
                if mask & 0x80 != 0 && self.extended_mouse_offered && !self.extended_pointer {
                    // A server may take the marker bit as soon as it sees the offer,
                    // before its confirmation reaches the proxy: 6 or 7 bytes would be
                    // a guess, so the message is refused.
                    return Err(Error::Malformed {
                        what: "PointerEvent",
                        why: "extended button marker before the server confirmed extended mouse buttons",
                    });
                }
                let buttons = if self.extended_pointer && mask & 0x80 != 0 {
                    let more = need!(r.u8());
                    u16::from(mask & 0x7f) | (u16::from(more) << 7)
                } else {
                    u16::from(mask)
                };
                ClientMessage::PointerEvent { buttons, x, y }
            }
            msg::CLIENT_CUT_TEXT => ClientMessage::ClientCutText(need!(parse_cut_text(
                &mut r,
                self.extended_clipboard,
                &self.limits,
                "ClientCutText",
            )?)),
            msg::ENABLE_CONTINUOUS_UPDATES => {
                self.require(Confirmations::CONTINUOUS_UPDATES, "EnableContinuousUpdates")?;
                ClientMessage::EnableContinuousUpdates {
                    enable: need!(r.u8()) != 0,
                    x: need!(r.u16()),
                    y: need!(r.u16()),
                    width: need!(r.u16()),
                    height: need!(r.u16()),
                }
            }
            msg::CLIENT_FENCE => {
                self.require(Confirmations::FENCE, "ClientFence")?;
                need!(r.skip(3));
                let flags = need!(r.u32());
                let len = need!(r.u8());
                if len > 64 {
                    return Err(Error::LengthTooLarge {
                        what: "ClientFence payload",
                        len: u64::from(len),
                        max: 64,
                    });
                }
                ClientMessage::ClientFence {
                    flags,
                    payload: need!(r.bytes(usize::from(len))),
                }
            }
            msg::XVP => {
                self.require(Confirmations::XVP, "xvp")?;
                need!(r.skip(1));
                ClientMessage::Xvp {
                    version: need!(r.u8()),
                    code: need!(r.u8()),
                }
            }
            msg::SET_DESKTOP_SIZE => {
                need!(r.skip(1));
                let width = need!(r.u16());
                let height = need!(r.u16());
                let n = need!(r.u8());
                need!(r.skip(1));
                ClientMessage::SetDesktopSize {
                    width,
                    height,
                    screens: Screens(need!(r.bytes(16 * usize::from(n)))),
                }
            }
            msg::QEMU => match need!(r.u8()) {
                0 => ClientMessage::QemuExtendedKeyEvent {
                    down: need!(r.u16()) != 0,
                    keysym: need!(r.u32()),
                    keycode: need!(r.u32()),
                },
                1 => ClientMessage::QemuAudio(match need!(r.u16()) {
                    0 => QemuAudioClient::Enable,
                    1 => QemuAudioClient::Disable,
                    2 => QemuAudioClient::SetFormat {
                        format: need!(r.u8()),
                        channels: need!(r.u8()),
                        frequency: need!(r.u32()),
                    },
                    op => return Err(Error::UnknownQemuAudioOperation(op)),
                }),
                sub => return Err(Error::UnknownQemuSubmessage(sub)),
            },
            other => return Err(Error::UnknownMessageType(other)),
        };
        Ok(Some((message, r.pos())))
    }
}

impl ClientMessage<'_> {
    /// Appends the wire form; refuses a value the wire cannot carry (a fence payload
    /// over 64 bytes, more than 255 screens, buttons beyond 15, cut text over 2 GiB).
    pub fn write(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        match self {
            ClientMessage::SetPixelFormat(pf) => {
                out.extend_from_slice(&[msg::SET_PIXEL_FORMAT, 0, 0, 0]);
                pf.write(out);
            }
            ClientMessage::SetEncodings(list) => write_set_encodings(list.iter(), out),
            ClientMessage::FramebufferUpdateRequest {
                incremental,
                x,
                y,
                width,
                height,
            } => {
                out.extend_from_slice(&[msg::FRAMEBUFFER_UPDATE_REQUEST, u8::from(*incremental)]);
                for v in [x, y, width, height] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            ClientMessage::KeyEvent { down, keysym } => {
                out.extend_from_slice(&[msg::KEY_EVENT, u8::from(*down), 0, 0]);
                out.extend_from_slice(&keysym.to_be_bytes());
            }
            ClientMessage::PointerEvent { buttons, x, y } => {
                if *buttons >= 1 << 15 {
                    return Err(Error::Malformed {
                        what: "PointerEvent",
                        why: "only 15 buttons exist",
                    });
                }
                let extended = *buttons > 0xff;
                let first = if extended {
                    (*buttons as u8 & 0x7f) | 0x80
                } else {
                    *buttons as u8
                };
                out.extend_from_slice(&[msg::POINTER_EVENT, first]);
                out.extend_from_slice(&x.to_be_bytes());
                out.extend_from_slice(&y.to_be_bytes());
                if extended {
                    out.push((*buttons >> 7) as u8);
                }
            }
            ClientMessage::ClientCutText(text) => write_cut_text(msg::CLIENT_CUT_TEXT, text, out)?,
            ClientMessage::EnableContinuousUpdates {
                enable,
                x,
                y,
                width,
                height,
            } => {
                out.extend_from_slice(&[msg::ENABLE_CONTINUOUS_UPDATES, u8::from(*enable)]);
                for v in [x, y, width, height] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            ClientMessage::ClientFence { flags, payload } => {
                if payload.len() > 64 {
                    return Err(too_long("ClientFence payload", payload.len(), 64));
                }
                out.extend_from_slice(&[msg::CLIENT_FENCE, 0, 0, 0]);
                out.extend_from_slice(&flags.to_be_bytes());
                out.push(payload.len() as u8);
                out.extend_from_slice(payload);
            }
            ClientMessage::Xvp { version, code } => {
                out.extend_from_slice(&[msg::XVP, 0, *version, *code]);
            }
            ClientMessage::SetDesktopSize {
                width,
                height,
                screens,
            } => {
                if screens.len() > 255 {
                    return Err(too_long("SetDesktopSize screens", screens.len(), 255));
                }
                out.extend_from_slice(&[msg::SET_DESKTOP_SIZE, 0]);
                out.extend_from_slice(&width.to_be_bytes());
                out.extend_from_slice(&height.to_be_bytes());
                out.extend_from_slice(&[screens.len() as u8, 0]);
                out.extend_from_slice(screens.0);
            }
            ClientMessage::QemuExtendedKeyEvent {
                down,
                keysym,
                keycode,
            } => {
                out.extend_from_slice(&[msg::QEMU, 0]);
                out.extend_from_slice(&u16::from(*down).to_be_bytes());
                out.extend_from_slice(&keysym.to_be_bytes());
                out.extend_from_slice(&keycode.to_be_bytes());
            }
            ClientMessage::QemuAudio(op) => {
                out.extend_from_slice(&[msg::QEMU, 1]);
                match op {
                    QemuAudioClient::Enable => out.extend_from_slice(&0u16.to_be_bytes()),
                    QemuAudioClient::Disable => out.extend_from_slice(&1u16.to_be_bytes()),
                    QemuAudioClient::SetFormat {
                        format,
                        channels,
                        frequency,
                    } => {
                        out.extend_from_slice(&2u16.to_be_bytes());
                        out.extend_from_slice(&[*format, *channels]);
                        out.extend_from_slice(&frequency.to_be_bytes());
                    }
                }
            }
        }
        Ok(())
    }
}

/// Appends a SetEncodings message listing `encodings` (at most 65535 are written).
pub fn write_set_encodings(encodings: impl IntoIterator<Item = Encoding>, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[msg::SET_ENCODINGS, 0, 0, 0]);
    let mut n: u16 = 0;
    for e in encodings.into_iter().take(usize::from(u16::MAX)) {
        out.extend_from_slice(&e.0.to_be_bytes());
        n += 1;
    }
    out[start + 2..start + 4].copy_from_slice(&n.to_be_bytes());
}

#[cfg(test)]
mod tests;
