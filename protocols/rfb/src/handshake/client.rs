//! The client role: vizor toward QEMU.
//!
//! ```text
//! ExpectServerVersion -> ExpectSecurity -> ChooseSecurity
//!   None:     ExpectSecurityResult
//!   VNC auth: ExpectChallenge -> RespondToChallenge -> ExpectSecurityResult
//!   VeNCrypt: ExpectVencryptVersion -> ExpectVencryptVersionAck -> ExpectVencryptSubtypes
//!             -> ChooseVencryptSubtype -> [ExpectVencryptSubtypeAck -> StartTls] -> Authenticate
//! ExpectSecurityResult -> SendClientInit -> ExpectServerInit -> ServerInit
//! ```

use super::{
    read_reason, vnc_auth_response, Challenge, Progress, SecurityType, ServerInit, VencryptSubtype,
    Version,
};
use crate::error::{Error, Limits};
use crate::wire::{need, Reader};

/// Waits for the server's ProtocolVersion; answers with the highest version both
/// sides speak.
#[derive(Debug)]
pub struct ExpectServerVersion {
    limits: Limits,
}

impl ExpectServerVersion {
    /// Starts a client handshake.
    pub fn new(limits: Limits) -> Self {
        ExpectServerVersion { limits }
    }

    /// Consumes the server's version and writes the client's.
    pub fn receive(
        self,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Progress<Self, ExpectSecurity>, Error> {
        let Some(b) = input.get(..Version::LEN) else {
            return Ok(Progress::NeedMore(self));
        };
        let mut v = [0u8; 12];
        v.copy_from_slice(b);
        let (major, minor) = super::parse_version(&v)?;
        let version = match (major, minor) {
            (3, 8..) | (4.., _) => Version::V3_8,
            (3, 7) => Version::V3_7,
            // 3.4 to 3.6 were misreported by some servers; the spec reads them as 3.3.
            (3, 3..=6) => Version::V3_3,
            _ => return Err(Error::UnsupportedVersion { major, minor }),
        };
        out.extend_from_slice(&version.to_bytes());
        Ok(Progress::Done {
            next: ExpectSecurity {
                version,
                limits: self.limits,
            },
            consumed: Version::LEN,
        })
    }
}

/// Waits for the security types (3.7+) or the server's choice (3.3).
#[derive(Debug)]
pub struct ExpectSecurity {
    version: Version,
    limits: Limits,
}

impl ExpectSecurity {
    /// The version agreed.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Consumes the security type list; a refusal becomes [`Error::ConnectionRefused`].
    pub fn receive(self, input: &[u8]) -> Result<Progress<Self, ChooseSecurity>, Error> {
        let parsed = self.parse(input)?;
        let (version, limits) = (self.version, self.limits);
        Ok(Progress::from_parse(self, parsed, |offered| {
            ChooseSecurity {
                version,
                offered,
                limits,
            }
        }))
    }

    fn parse(&self, input: &[u8]) -> Result<Option<(Vec<SecurityType>, usize)>, Error> {
        let mut r = Reader::new(input);
        let offered = if self.version == Version::V3_3 {
            match need!(r.u32()) {
                0 => {
                    let reason = need!(read_reason(&mut r, &self.limits)?);
                    return Err(Error::ConnectionRefused { reason });
                }
                t @ (1 | 2) => vec![SecurityType(t as u8)],
                _ => {
                    return Err(Error::Malformed {
                        what: "RFB 3.3 security type",
                        why: "must be 0, 1 or 2",
                    })
                }
            }
        } else {
            let n = need!(r.u8());
            if n == 0 {
                let reason = need!(read_reason(&mut r, &self.limits)?);
                return Err(Error::ConnectionRefused { reason });
            }
            need!(r.bytes(usize::from(n)))
                .iter()
                .map(|&t| SecurityType(t))
                .collect()
        };
        Ok(Some((offered, r.pos())))
    }
}

/// The server's offer is known; the caller picks a security type.
#[derive(Debug)]
pub struct ChooseSecurity {
    version: Version,
    offered: Vec<SecurityType>,
    limits: Limits,
}

impl ChooseSecurity {
    /// What the server offers (in 3.3, the one type it chose).
    pub fn offered(&self) -> &[SecurityType] {
        &self.offered
    }

    /// The version agreed.
    pub fn version(&self) -> Version {
        self.version
    }

    fn choose(&self, t: SecurityType, out: &mut Vec<u8>) -> Result<(), Error> {
        if !self.offered.contains(&t) {
            return Err(Error::SecurityTypeNotOffered(t.0));
        }
        // In 3.3 the server chose; there is nothing to send.
        if self.version != Version::V3_3 {
            out.push(t.0);
        }
        Ok(())
    }

    /// Chooses no authentication.
    pub fn choose_none(self, out: &mut Vec<u8>) -> Result<ExpectSecurityResult, Error> {
        self.choose(SecurityType::NONE, out)?;
        Ok(ExpectSecurityResult::after_none(self.version, self.limits))
    }

    /// Chooses VNC authentication.
    pub fn choose_vnc_auth(self, out: &mut Vec<u8>) -> Result<ExpectChallenge, Error> {
        self.choose(SecurityType::VNC_AUTH, out)?;
        Ok(ExpectChallenge {
            version: self.version,
            limits: self.limits,
        })
    }

    /// Chooses VeNCrypt.
    pub fn choose_vencrypt(self, out: &mut Vec<u8>) -> Result<ExpectVencryptVersion, Error> {
        self.choose(SecurityType::VENCRYPT, out)?;
        Ok(ExpectVencryptVersion {
            version: self.version,
            limits: self.limits,
        })
    }
}

/// Waits for the 16-byte VNC authentication challenge.
#[derive(Debug)]
pub struct ExpectChallenge {
    version: Version,
    limits: Limits,
}

impl ExpectChallenge {
    /// Consumes the challenge.
    pub fn receive(self, input: &[u8]) -> Result<Progress<Self, RespondToChallenge>, Error> {
        let Some(b) = input.get(..16) else {
            return Ok(Progress::NeedMore(self));
        };
        let mut c = [0u8; 16];
        c.copy_from_slice(b);
        Ok(Progress::Done {
            next: RespondToChallenge {
                version: self.version,
                challenge: Challenge(c),
                limits: self.limits,
            },
            consumed: 16,
        })
    }
}

/// The challenge is here; the caller supplies the password.
#[derive(Debug)]
pub struct RespondToChallenge {
    version: Version,
    challenge: Challenge,
    limits: Limits,
}

impl RespondToChallenge {
    /// Writes the DES response for `password` (only its first 8 bytes count).
    pub fn respond(self, password: &[u8], out: &mut Vec<u8>) -> ExpectSecurityResult {
        let response = vnc_auth_response(&self.challenge, password);
        out.extend_from_slice(response.as_bytes());
        ExpectSecurityResult {
            message_expected: true,
            has_reason: self.version.result_has_reason(),
            limits: self.limits,
        }
    }
}

/// Waits for SecurityResult (or passes straight through where the protocol version
/// sends none: None authentication before 3.8).
#[derive(Debug)]
pub struct ExpectSecurityResult {
    message_expected: bool,
    has_reason: bool,
    limits: Limits,
}

impl ExpectSecurityResult {
    fn after_none(version: Version, limits: Limits) -> Self {
        ExpectSecurityResult {
            message_expected: version.result_after_none(),
            has_reason: version.result_has_reason(),
            limits,
        }
    }

    /// Consumes SecurityResult; a failure becomes [`Error::AuthenticationFailed`]
    /// carrying the server's reason.
    pub fn receive(self, input: &[u8]) -> Result<Progress<Self, SendClientInit>, Error> {
        let parsed = self.parse(input)?;
        let limits = self.limits;
        Ok(Progress::from_parse(self, parsed, |()| SendClientInit {
            limits,
        }))
    }

    fn parse(&self, input: &[u8]) -> Result<Option<((), usize)>, Error> {
        if !self.message_expected {
            return Ok(Some(((), 0)));
        }
        let mut r = Reader::new(input);
        match need!(r.u32()) {
            0 => Ok(Some(((), 4))),
            status @ (1 | 2) => {
                let reason = if self.has_reason {
                    need!(read_reason(&mut r, &self.limits)?)
                } else if status == 2 {
                    "too many attempts".to_owned()
                } else {
                    String::new()
                };
                Err(Error::AuthenticationFailed { reason })
            }
            other => Err(Error::InvalidSecurityResult(other)),
        }
    }
}

/// Authentication succeeded; the caller sends ClientInit.
#[derive(Debug)]
pub struct SendClientInit {
    limits: Limits,
}

impl SendClientInit {
    /// Writes ClientInit with the shared flag.
    pub fn send(self, shared: bool, out: &mut Vec<u8>) -> ExpectServerInit {
        out.push(u8::from(shared));
        ExpectServerInit {
            limits: self.limits,
        }
    }
}

/// Waits for ServerInit, the last message of the handshake.
#[derive(Debug)]
pub struct ExpectServerInit {
    limits: Limits,
}

impl ExpectServerInit {
    /// Consumes ServerInit.
    pub fn receive(self, input: &[u8]) -> Result<Progress<Self, ServerInit>, Error> {
        let parsed = ServerInit::parse(input, &self.limits)?;
        Ok(Progress::from_parse(self, parsed, |si| si))
    }
}

/// Waits for the VeNCrypt server version; answers 0.2.
#[derive(Debug)]
pub struct ExpectVencryptVersion {
    version: Version,
    limits: Limits,
}

impl ExpectVencryptVersion {
    /// Consumes the VeNCrypt version and writes 0.2.
    pub fn receive(
        self,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Progress<Self, ExpectVencryptVersionAck>, Error> {
        let Some(&[major, minor]) = input.get(..2) else {
            return Ok(Progress::NeedMore(self));
        };
        if (major, minor) < (0, 2) {
            return Err(Error::UnsupportedVencryptVersion { major, minor });
        }
        out.extend_from_slice(&[0, 2]);
        Ok(Progress::Done {
            next: ExpectVencryptVersionAck {
                version: self.version,
                limits: self.limits,
            },
            consumed: 2,
        })
    }
}

/// Waits for the server to accept VeNCrypt 0.2.
#[derive(Debug)]
pub struct ExpectVencryptVersionAck {
    version: Version,
    limits: Limits,
}

impl ExpectVencryptVersionAck {
    /// Consumes the one-byte acknowledgement (0 = accepted).
    pub fn receive(self, input: &[u8]) -> Result<Progress<Self, ExpectVencryptSubtypes>, Error> {
        match input.first() {
            None => Ok(Progress::NeedMore(self)),
            Some(0) => Ok(Progress::Done {
                next: ExpectVencryptSubtypes {
                    version: self.version,
                    limits: self.limits,
                },
                consumed: 1,
            }),
            Some(_) => Err(Error::VencryptRejected("VeNCrypt version 0.2")),
        }
    }
}

/// Waits for the list of VeNCrypt sub-types.
#[derive(Debug)]
pub struct ExpectVencryptSubtypes {
    version: Version,
    limits: Limits,
}

impl ExpectVencryptSubtypes {
    /// Consumes the sub-type list.
    pub fn receive(self, input: &[u8]) -> Result<Progress<Self, ChooseVencryptSubtype>, Error> {
        let parsed = Self::parse(input)?;
        let (version, limits) = (self.version, self.limits);
        Ok(Progress::from_parse(self, parsed, |offered| {
            ChooseVencryptSubtype {
                version,
                offered,
                limits,
            }
        }))
    }

    fn parse(input: &[u8]) -> Result<Option<(Vec<VencryptSubtype>, usize)>, Error> {
        let mut r = Reader::new(input);
        let n = need!(r.u8());
        if n == 0 {
            return Err(Error::ConnectionRefused {
                reason: "VeNCrypt server offers no sub-types".to_owned(),
            });
        }
        let mut offered = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            offered.push(VencryptSubtype(need!(r.u32())));
        }
        Ok(Some((offered, r.pos())))
    }
}

/// The VeNCrypt offer is known; the caller picks a sub-type.
#[derive(Debug)]
pub struct ChooseVencryptSubtype {
    version: Version,
    offered: Vec<VencryptSubtype>,
    limits: Limits,
}

/// What follows the choice of a VeNCrypt sub-type.
#[derive(Debug)]
pub enum VencryptChosen {
    /// A TLS sub-type: wait for the server's acknowledgement, then do TLS.
    Tls(ExpectVencryptSubtypeAck),
    /// A plain security type used as a sub-type: authenticate right away.
    Authenticate(Authenticate),
}

/// The authentication step that follows security negotiation.
#[derive(Debug)]
pub enum Authenticate {
    /// No authentication: SecurityResult next.
    None(ExpectSecurityResult),
    /// VNC authentication: the challenge next.
    VncAuth(ExpectChallenge),
}

impl ChooseVencryptSubtype {
    /// The sub-types the server offers.
    pub fn offered(&self) -> &[VencryptSubtype] {
        &self.offered
    }

    /// Writes the chosen sub-type.
    pub fn choose(
        self,
        subtype: VencryptSubtype,
        out: &mut Vec<u8>,
    ) -> Result<VencryptChosen, Error> {
        if !self.offered.contains(&subtype) {
            return Err(Error::UnsupportedVencryptSubtype(subtype.0));
        }
        let next = match subtype {
            VencryptSubtype::TLS_NONE
            | VencryptSubtype::TLS_VNC
            | VencryptSubtype::X509_NONE
            | VencryptSubtype::X509_VNC => VencryptChosen::Tls(ExpectVencryptSubtypeAck {
                version: self.version,
                subtype,
                limits: self.limits,
            }),
            VencryptSubtype(1) => VencryptChosen::Authenticate(Authenticate::None(
                ExpectSecurityResult::after_none(self.version, self.limits),
            )),
            VencryptSubtype(2) => {
                VencryptChosen::Authenticate(Authenticate::VncAuth(ExpectChallenge {
                    version: self.version,
                    limits: self.limits,
                }))
            }
            other => return Err(Error::UnsupportedVencryptSubtype(other.0)),
        };
        out.extend_from_slice(&subtype.0.to_be_bytes());
        Ok(next)
    }
}

/// Waits for the server to accept a TLS sub-type.
#[derive(Debug)]
pub struct ExpectVencryptSubtypeAck {
    version: Version,
    subtype: VencryptSubtype,
    limits: Limits,
}

impl ExpectVencryptSubtypeAck {
    /// Consumes the one-byte acknowledgement (1 = accepted).
    pub fn receive(self, input: &[u8]) -> Result<Progress<Self, StartTls>, Error> {
        match input.first() {
            None => Ok(Progress::NeedMore(self)),
            Some(1) => Ok(Progress::Done {
                next: StartTls {
                    version: self.version,
                    subtype: self.subtype,
                    limits: self.limits,
                },
                consumed: 1,
            }),
            Some(_) => Err(Error::VencryptRejected("VeNCrypt sub-type")),
        }
    }
}

/// The caller must now run a TLS client handshake on the same stream; all further
/// bytes flow inside TLS.
#[derive(Debug)]
pub struct StartTls {
    version: Version,
    subtype: VencryptSubtype,
    limits: Limits,
}

impl StartTls {
    /// The sub-type agreed (tells X.509 verification from anonymous TLS).
    pub fn subtype(&self) -> VencryptSubtype {
        self.subtype
    }

    /// Continues once TLS is established.
    pub fn tls_established(self) -> Authenticate {
        match self.subtype {
            VencryptSubtype::TLS_VNC | VencryptSubtype::X509_VNC => {
                Authenticate::VncAuth(ExpectChallenge {
                    version: self.version,
                    limits: self.limits,
                })
            }
            // The TLS/X.509 None sub-types always end with SecurityResult, in 3.7 too
            // (the VeNCrypt spec and QEMU agree); only plain None skips it before 3.8.
            _ => Authenticate::None(ExpectSecurityResult {
                message_expected: true,
                has_reason: self.version.result_has_reason(),
                limits: self.limits,
            }),
        }
    }
}
