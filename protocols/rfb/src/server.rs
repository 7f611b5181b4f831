//! Server-to-client messages after the handshake.
//!
//! [`ServerDecoder::decode`] returns one [`ServerEvent`] at a time with the number of
//! input bytes it spans. Small messages come whole. A FramebufferUpdate comes as
//! [`ServerEvent::UpdateBegin`], then per rectangle a [`ServerEvent::Rect`] followed
//! by [`ServerEvent::Data`] chunks of its encoded data (as much as the buffer holds:
//! pixel data is never buffered whole), then [`ServerEvent::UpdateEnd`], which spans
//! no bytes.
//!
//! Framing follows the pixel format and encodings in force: the caller reports the
//! client's SetPixelFormat and SetEncodings ([`ServerDecoder::set_pixel_format`],
//! [`ServerDecoder::set_encodings`]); a VMware display-mode-change rectangle changes
//! the pixel format by itself.

use crate::cut_text::{parse_cut_text, CutText};
use crate::encoding::{Encoding, EncodingKind, EncodingSet};
use crate::error::{Error, Limits};
use crate::handshake::ServerInit;
use crate::pixel::PixelFormat;
use crate::rect::{compressed_bound, pixels, zrle_raw_bound, Ctx, Framer};
use crate::screens::Screens;
use crate::wire::{need, Reader};

/// Message type numbers, server to client.
pub mod msg {
    /// FramebufferUpdate.
    pub const FRAMEBUFFER_UPDATE: u8 = 0;
    /// SetColourMapEntries.
    pub const SET_COLOUR_MAP_ENTRIES: u8 = 1;
    /// Bell.
    pub const BELL: u8 = 2;
    /// ServerCutText.
    pub const SERVER_CUT_TEXT: u8 = 3;
    /// EndOfContinuousUpdates.
    pub const END_OF_CONTINUOUS_UPDATES: u8 = 150;
    /// ServerFence.
    pub const SERVER_FENCE: u8 = 248;
    /// xvp server message.
    pub const XVP: u8 = 250;
    /// QEMU server message.
    pub const QEMU: u8 = 255;
}

/// One decoded item of the server-to-client stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent<'a> {
    /// A FramebufferUpdate begins (its 4-byte header).
    UpdateBegin {
        /// The rectangle count announced (65535 often means "until LastRect").
        rects: u16,
    },
    /// A rectangle header, with its pseudo-encoding data where that is small.
    Rect(Rect<'a>),
    /// Encoded data of the current rectangle: opaque to the caller.
    Data(&'a [u8]),
    /// The FramebufferUpdate is complete. Spans no bytes.
    UpdateEnd,
    /// Colour map entries: `colours` holds 6 bytes (R, G, B as U16) per entry.
    SetColourMapEntries {
        /// Index of the first entry.
        first: u16,
        /// The entries' bytes.
        colours: &'a [u8],
    },
    /// Ring the bell.
    Bell,
    /// Clipboard from the server.
    ServerCutText(CutText<'a>),
    /// A ServerCutText longer than [`Limits::max_message_len`]: its 8-byte header.
    /// Its `len` bytes follow as [`ServerEvent::Dropped`], not held whole.
    ServerCutTextDropped {
        /// The contents' length (for an extended clipboard message, its flags too).
        len: u64,
    },
    /// Bytes of a message passed over ([`ServerEvent::ServerCutTextDropped`]).
    Dropped(&'a [u8]),
    /// Continuous updates stopped.
    EndOfContinuousUpdates,
    /// A fence request or response.
    ServerFence {
        /// Fence flags.
        flags: u32,
        /// Up to 64 bytes.
        payload: &'a [u8],
    },
    /// xvp: 0 fail, 1 init.
    Xvp {
        /// xvp version.
        version: u8,
        /// Message code.
        code: u8,
    },
    /// QEMU audio stream control or data.
    QemuAudio(QemuAudioServer<'a>),
}

/// QEMU audio server operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuAudioServer<'a> {
    /// The stream ended.
    End,
    /// The stream begins.
    Begin,
    /// Samples.
    Data(&'a [u8]),
}

/// A rectangle header of a FramebufferUpdate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect<'a> {
    /// x-position (meaning depends on the pseudo-encoding).
    pub x: u16,
    /// y-position.
    pub y: u16,
    /// Width.
    pub width: u16,
    /// Height.
    pub height: u16,
    /// Encoding.
    pub encoding: Encoding,
    /// What the rectangle carries.
    pub info: RectInfo<'a>,
}

/// What a rectangle carries, decoded where it is small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RectInfo<'a> {
    /// Pixels in the rectangle's encoding follow as [`ServerEvent::Data`].
    Pixels,
    /// Copy from this source position.
    CopyRect {
        /// Source left edge.
        src_x: u16,
        /// Source top edge.
        src_y: u16,
    },
    /// A cursor image follows as [`ServerEvent::Data`].
    Cursor,
    /// The framebuffer is now `width` x `height`.
    DesktopSize,
    /// New size and screen layout (x = reason, y = status).
    ExtendedDesktopSize {
        /// The screens.
        screens: Screens<'a>,
    },
    /// No more rectangles in this update.
    LastRect,
    /// QEMU pointer mode: absolute coordinates or relative deltas.
    PointerMotionChange {
        /// Absolute (true) or relative.
        absolute: bool,
    },
    /// The server accepts QEMU extended key events.
    QemuExtendedKeyEvent,
    /// The server accepts QEMU audio messages.
    QemuAudio,
    /// Keyboard LED state: bit 0 Scroll, 1 Num, 2 Caps Lock.
    LedState(u8),
    /// The desktop's new name.
    DesktopName(&'a [u8]),
    /// The server switched to this pixel format (VMware display mode change).
    PixelFormatChange(PixelFormat),
    /// The server accepts extended pointer events.
    ExtendedMouseButtons,
}

#[derive(Debug, Clone)]
enum State {
    /// At a message boundary.
    Message,
    /// In an update, before the header of the next of `left` rectangles.
    Rects { left: u16 },
    /// In the encoded data of a rectangle: `payload` opaque bytes, then `framer`.
    Body {
        left: u16,
        payload: u64,
        framer: Framer,
    },
    /// The update's end is to be reported.
    End,
    /// Inside a message passed over: `left` bytes of it to come.
    Skip { left: u64 },
}

/// Decoder of the server-to-client stream.
#[derive(Debug, Clone)]
pub struct ServerDecoder {
    limits: Limits,
    pf: PixelFormat,
    pending_pf: Option<PixelFormat>,
    fb_width: u16,
    fb_height: u16,
    offered: EncodingSet,
    state: State,
}

impl ServerDecoder {
    /// A decoder for the stream after `init`, before any SetEncodings (only Raw).
    pub fn new(init: &ServerInit, limits: Limits) -> Self {
        ServerDecoder {
            limits,
            pf: init.pixel_format,
            pending_pf: None,
            fb_width: init.width,
            fb_height: init.height,
            offered: EncodingSet::default(),
            state: State::Message,
        }
    }

    /// The client sent SetPixelFormat: later updates use `pf`. Applied at the next
    /// message boundary, since an update already under way keeps its format.
    pub fn set_pixel_format(&mut self, pf: PixelFormat) {
        if matches!(self.state, State::Message) {
            self.pf = pf;
            self.pending_pf = None;
        } else {
            self.pending_pf = Some(pf);
        }
    }

    /// The client sent SetEncodings. The offered set only grows: the server may still
    /// be answering under an earlier SetEncodings when this one is forwarded. Only
    /// framable encodings are kept (there are about 150), so the set stays small
    /// whatever a client sends.
    pub fn set_encodings(&mut self, encodings: impl IntoIterator<Item = Encoding>) {
        let mut all = self.offered.clone().into_vec();
        all.extend(encodings.into_iter().filter(|e| e.is_framable()));
        self.offered = EncodingSet::new(all);
    }

    /// The pixel format in force.
    pub fn pixel_format(&self) -> &PixelFormat {
        &self.pf
    }

    /// Whether the decoder stands at a message boundary (not inside an update).
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Message)
    }

    /// The framebuffer size in force.
    pub fn framebuffer_size(&self) -> (u16, u16) {
        (self.fb_width, self.fb_height)
    }

    /// Opaque bytes of the current rectangle that may be forwarded without decoding
    /// (for example spliced); report them with [`ServerDecoder::consume_payload`].
    pub fn pending_payload(&self) -> u64 {
        match self.state {
            State::Body { payload, .. } => payload,
            _ => 0,
        }
    }

    /// Records that `n` opaque bytes (at most [`ServerDecoder::pending_payload`]) were
    /// forwarded without passing through [`ServerDecoder::decode`].
    pub fn consume_payload(&mut self, n: u64) -> Result<(), Error> {
        match &mut self.state {
            State::Body { payload, .. } if n <= *payload => {
                *payload -= n;
                Ok(())
            }
            _ => Err(Error::Malformed {
                what: "payload accounting",
                why: "more bytes consumed than the rectangle holds",
            }),
        }
    }

    /// Decodes the next event at the start of `buf`, returning it with the number of
    /// bytes it spans; `Ok(None)` when `buf` does not hold enough yet.
    pub fn decode<'a>(&mut self, buf: &'a [u8]) -> Result<Option<(ServerEvent<'a>, usize)>, Error> {
        loop {
            match std::mem::replace(&mut self.state, State::Message) {
                State::Message => {
                    if let Some(pf) = self.pending_pf.take() {
                        self.pf = pf;
                    }
                    return self.message(buf);
                }
                State::End => {
                    self.state = State::Message;
                    return Ok(Some((ServerEvent::UpdateEnd, 0)));
                }
                State::Rects { left } => {
                    self.state = State::Rects { left };
                    return self.rect(buf, left);
                }
                State::Skip { left } => {
                    if buf.is_empty() {
                        self.state = State::Skip { left };
                        return Ok(None);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    if left > n as u64 {
                        self.state = State::Skip {
                            left: left - n as u64,
                        };
                    }
                    return Ok(Some((ServerEvent::Dropped(&buf[..n]), n)));
                }
                State::Body {
                    left,
                    payload,
                    framer,
                } if payload > 0 => {
                    if buf.is_empty() {
                        self.state = State::Body {
                            left,
                            payload,
                            framer,
                        };
                        return Ok(None);
                    }
                    let n = usize::try_from(payload)
                        .unwrap_or(usize::MAX)
                        .min(buf.len());
                    self.state = State::Body {
                        left,
                        payload: payload - n as u64,
                        framer,
                    };
                    return Ok(Some((ServerEvent::Data(&buf[..n]), n)));
                }
                State::Body {
                    left,
                    framer: Framer::Done,
                    ..
                } => self.state = Self::after_rect(left),
                State::Body { left, framer, .. } => {
                    let ctx = Ctx {
                        pf: &self.pf,
                        offered: &self.offered,
                        limits: &self.limits,
                    };
                    let step = match framer.step(buf, &ctx) {
                        Ok(Some(step)) => step,
                        other => {
                            self.state = State::Body {
                                left,
                                payload: 0,
                                framer,
                            };
                            return other.map(|_| None);
                        }
                    };
                    self.state = State::Body {
                        left,
                        payload: step.payload,
                        framer: step.next,
                    };
                    if step.header > 0 {
                        return Ok(Some((ServerEvent::Data(&buf[..step.header]), step.header)));
                    }
                }
            }
        }
    }

    fn after_rect(left: u16) -> State {
        match left.saturating_sub(1) {
            0 => State::End,
            left => State::Rects { left },
        }
    }

    fn require(&self, e: Encoding, what: &'static str) -> Result<(), Error> {
        if self.offered.contains(e) {
            Ok(())
        } else {
            Err(Error::NotNegotiated(what))
        }
    }

    fn message<'a>(&mut self, buf: &'a [u8]) -> Result<Option<(ServerEvent<'a>, usize)>, Error> {
        let mut r = Reader::new(buf);
        let event = match need!(r.u8()) {
            msg::FRAMEBUFFER_UPDATE => {
                need!(r.skip(1));
                let rects = need!(r.u16());
                self.state = if rects == 0 {
                    State::End
                } else {
                    State::Rects { left: rects }
                };
                ServerEvent::UpdateBegin { rects }
            }
            msg::SET_COLOUR_MAP_ENTRIES => {
                need!(r.skip(1));
                let first = need!(r.u16());
                let n = need!(r.u16());
                if u32::from(first) + u32::from(n) > 65536 {
                    return Err(Error::Malformed {
                        what: "SetColourMapEntries",
                        why: "entries beyond index 65535",
                    });
                }
                self.limits
                    .check("SetColourMapEntries", 6 + 6 * u64::from(n))?;
                ServerEvent::SetColourMapEntries {
                    first,
                    colours: need!(r.bytes(6 * usize::from(n))),
                }
            }
            msg::BELL => ServerEvent::Bell,
            msg::SERVER_CUT_TEXT => {
                let extended = self.offered.contains(Encoding::EXTENDED_CLIPBOARD);
                // A guest's clipboard beyond the bound is not held: it is passed over
                // as opaque bytes the caller drops, and the stream goes on.
                let head = need!(buf.get(..8));
                let raw = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
                let len = match raw as i32 {
                    n if n < 0 && extended => n.unsigned_abs(),
                    _ => raw,
                };
                if u64::from(len) + 8 > self.limits.max_message_len as u64 {
                    if len > 0 {
                        self.state = State::Skip {
                            left: u64::from(len),
                        };
                    }
                    return Ok(Some((
                        ServerEvent::ServerCutTextDropped {
                            len: u64::from(len),
                        },
                        8,
                    )));
                }
                ServerEvent::ServerCutText(need!(parse_cut_text(
                    &mut r,
                    extended,
                    &self.limits,
                    "ServerCutText",
                )?))
            }
            msg::END_OF_CONTINUOUS_UPDATES => {
                self.require(Encoding::CONTINUOUS_UPDATES, "EndOfContinuousUpdates")?;
                ServerEvent::EndOfContinuousUpdates
            }
            msg::SERVER_FENCE => {
                self.require(Encoding::FENCE, "ServerFence")?;
                need!(r.skip(3));
                let flags = need!(r.u32());
                let len = need!(r.u8());
                if len > 64 {
                    return Err(Error::LengthTooLarge {
                        what: "ServerFence payload",
                        len: u64::from(len),
                        max: 64,
                    });
                }
                ServerEvent::ServerFence {
                    flags,
                    payload: need!(r.bytes(usize::from(len))),
                }
            }
            msg::XVP => {
                self.require(Encoding::XVP, "xvp server message")?;
                need!(r.skip(1));
                ServerEvent::Xvp {
                    version: need!(r.u8()),
                    code: need!(r.u8()),
                }
            }
            msg::QEMU => match need!(r.u8()) {
                1 => {
                    self.require(Encoding::QEMU_AUDIO, "QEMU audio message")?;
                    ServerEvent::QemuAudio(match need!(r.u16()) {
                        0 => QemuAudioServer::End,
                        1 => QemuAudioServer::Begin,
                        2 => {
                            let len = need!(r.u32());
                            self.limits.check("QEMU audio data", u64::from(len) + 8)?;
                            QemuAudioServer::Data(need!(r.bytes(len as usize)))
                        }
                        op => return Err(Error::UnknownQemuAudioOperation(op)),
                    })
                }
                sub => return Err(Error::UnknownQemuSubmessage(sub)),
            },
            other => return Err(Error::UnknownMessageType(other)),
        };
        Ok(Some((event, r.pos())))
    }

    fn check_bounds(&self, x: u16, y: u16, width: u16, height: u16) -> Result<(), Error> {
        if u32::from(x) + u32::from(width) > u32::from(self.fb_width)
            || u32::from(y) + u32::from(height) > u32::from(self.fb_height)
        {
            return Err(Error::RectOutOfBounds {
                x,
                y,
                width,
                height,
                fb_width: self.fb_width,
                fb_height: self.fb_height,
            });
        }
        Ok(())
    }

    fn rect<'a>(
        &mut self,
        buf: &'a [u8],
        left: u16,
    ) -> Result<Option<(ServerEvent<'a>, usize)>, Error> {
        let mut r = Reader::new(buf);
        let x = need!(r.u16());
        let y = need!(r.u16());
        let width = need!(r.u16());
        let height = need!(r.u16());
        let encoding = Encoding(need!(r.i32()));
        match encoding.kind() {
            EncodingKind::Unsupported | EncodingKind::Declaration => {
                return Err(Error::UnframableEncoding(encoding))
            }
            EncodingKind::Pixels => {
                self.check_bounds(x, y, width, height)?;
                // Clients disagree on what follows a zero-area rectangle: noVNC reads
                // nothing for Zlib where the spec has a length. A proxy whose framing
                // differs from the browser's can be walked past, so only the encodings
                // every reader frames alike may be empty (QEMU never sends any).
                if (width == 0 || height == 0)
                    && encoding != Encoding::RAW
                    && encoding != Encoding::COPY_RECT
                {
                    return Err(Error::Malformed {
                        what: "rectangle",
                        why: "zero-area rectangle in an encoding clients frame differently",
                    });
                }
            }
            EncodingKind::PseudoRect => {}
        }
        if !self.offered.contains(encoding) {
            return Err(Error::EncodingNotOffered(encoding));
        }
        let bpp = self.pf.bytes_per_pixel();
        // What follows the header: opaque payload bytes and a framer for the rest.
        let mut body = (0u64, Framer::Done);
        let info = match encoding {
            Encoding::RAW => {
                body.0 = pixels(width, height, bpp);
                RectInfo::Pixels
            }
            Encoding::COPY_RECT => {
                let src_x = need!(r.u16());
                let src_y = need!(r.u16());
                self.check_bounds(src_x, src_y, width, height)?;
                RectInfo::CopyRect { src_x, src_y }
            }
            Encoding::RRE | Encoding::CORRE => {
                body.1 = Framer::Rre {
                    width,
                    height,
                    compact: encoding == Encoding::CORRE,
                };
                RectInfo::Pixels
            }
            Encoding::HEXTILE => {
                body.1 = Framer::Hextile {
                    width,
                    height,
                    index: 0,
                };
                RectInfo::Pixels
            }
            Encoding::ZLIB => {
                body.1 = Framer::LengthPrefixed {
                    what: "Zlib data",
                    bound: compressed_bound(pixels(width, height, bpp)),
                };
                RectInfo::Pixels
            }
            Encoding::ZRLE => {
                body.1 = Framer::LengthPrefixed {
                    what: "ZRLE data",
                    bound: compressed_bound(zrle_raw_bound(width, height, bpp)),
                };
                RectInfo::Pixels
            }
            Encoding::TIGHT | Encoding::TIGHT_PNG => {
                // The spec caps Tight rectangles at 2048 pixels wide, but QEMU sends
                // wider solid fills and JPEG rectangles; framing does not depend on it.
                body.1 = Framer::Tight {
                    width,
                    height,
                    png: encoding == Encoding::TIGHT_PNG,
                };
                RectInfo::Pixels
            }
            Encoding::CURSOR => {
                let mask = u64::from(width).div_ceil(8) * u64::from(height);
                body.0 = pixels(width, height, bpp) + mask;
                self.limits.check("cursor image", body.0)?;
                RectInfo::Cursor
            }
            Encoding::X_CURSOR => {
                if width > 0 && height > 0 {
                    body.0 = 6 + 2 * u64::from(width).div_ceil(8) * u64::from(height);
                    self.limits.check("X cursor image", body.0)?;
                }
                RectInfo::Cursor
            }
            Encoding::CURSOR_WITH_ALPHA => {
                body.1 = Framer::AlphaCursor { width, height };
                RectInfo::Cursor
            }
            Encoding::VMWARE_CURSOR => {
                body.1 = Framer::VmwareCursor { width, height };
                RectInfo::Cursor
            }
            Encoding::DESKTOP_SIZE => {
                self.fb_width = width;
                self.fb_height = height;
                RectInfo::DesktopSize
            }
            Encoding::EXTENDED_DESKTOP_SIZE => {
                let n = need!(r.u8());
                need!(r.skip(3));
                let screens = Screens(need!(r.bytes(16 * usize::from(n))));
                // A refused client request (reason 1, status non-zero) leaves the
                // other fields undefined: the size did not change.
                if !(x == 1 && y != 0) {
                    self.fb_width = width;
                    self.fb_height = height;
                }
                RectInfo::ExtendedDesktopSize { screens }
            }
            Encoding::LAST_RECT => {
                self.state = State::End;
                return Ok(Some((
                    ServerEvent::Rect(Rect {
                        x,
                        y,
                        width,
                        height,
                        encoding,
                        info: RectInfo::LastRect,
                    }),
                    r.pos(),
                )));
            }
            Encoding::QEMU_POINTER_MOTION_CHANGE => {
                RectInfo::PointerMotionChange { absolute: x != 0 }
            }
            Encoding::QEMU_EXTENDED_KEY_EVENT => RectInfo::QemuExtendedKeyEvent,
            Encoding::QEMU_AUDIO => RectInfo::QemuAudio,
            Encoding::EXTENDED_MOUSE_BUTTONS => RectInfo::ExtendedMouseButtons,
            Encoding::QEMU_LED_STATE => RectInfo::LedState(need!(r.u8())),
            Encoding::DESKTOP_NAME => {
                let len = need!(r.u32());
                self.limits.check("desktop name", u64::from(len))?;
                RectInfo::DesktopName(need!(r.bytes(len as usize)))
            }
            Encoding::VMWARE_DISPLAY_MODE_CHANGE => {
                let pf = PixelFormat::parse(&need!(r.array()))?;
                self.pf = pf;
                self.fb_width = width;
                self.fb_height = height;
                RectInfo::PixelFormatChange(pf)
            }
            // `kind()` admits no other encoding; refuse rather than assume.
            other => return Err(Error::UnframableEncoding(other)),
        };
        self.state = State::Body {
            left,
            payload: body.0,
            framer: body.1,
        };
        Ok(Some((
            ServerEvent::Rect(Rect {
                x,
                y,
                width,
                height,
                encoding,
                info,
            }),
            r.pos(),
        )))
    }
}

/// Appends a FramebufferUpdate header announcing `rects` rectangles.
pub fn write_update_header(rects: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&[msg::FRAMEBUFFER_UPDATE, 0]);
    out.extend_from_slice(&rects.to_be_bytes());
}

/// Appends a rectangle header.
pub fn write_rect_header(
    x: u16,
    y: u16,
    width: u16,
    height: u16,
    encoding: Encoding,
    out: &mut Vec<u8>,
) {
    for v in [x, y, width, height] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&encoding.0.to_be_bytes());
}

#[cfg(test)]
mod tests;
