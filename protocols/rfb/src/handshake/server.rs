//! The server role: vizor toward the browser (and synthetic servers in tests and
//! benchmarks).
//!
//! ```text
//! start -> ExpectClientVersion -> OfferSecurity --refuse--> (closed)
//!   offer -> ExpectSecurityChoice
//!     None:     SendSecurityResult
//!     VNC auth: SendChallenge -> ExpectChallengeResponse -> VerifyResponse -> SendSecurityResult
//! SendSecurityResult --accept--> ExpectClientInit -> ClientInit (then write ServerInit)
//! ```
//!
//! Refusing at [`OfferSecurity`] works in every protocol version and carries a reason
//! the client shows; refusing at [`SendSecurityResult`] carries a reason only in 3.8.

use super::{
    write_reason, Challenge, ChallengeResponse, ClientInit, Progress, SecurityType, Version,
};
use crate::error::{Error, Limits};

/// Writes the server's ProtocolVersion and waits for the client's.
pub fn start(version: Version, limits: Limits, out: &mut Vec<u8>) -> ExpectClientVersion {
    out.extend_from_slice(&version.to_bytes());
    ExpectClientVersion {
        offered: version,
        limits,
    }
}

/// Waits for the client's ProtocolVersion.
#[derive(Debug)]
pub struct ExpectClientVersion {
    offered: Version,
    limits: Limits,
}

impl ExpectClientVersion {
    /// Consumes the client's version.
    pub fn receive(self, input: &[u8]) -> Result<Progress<Self, OfferSecurity>, Error> {
        let Some(b) = input.get(..Version::LEN) else {
            return Ok(Progress::NeedMore(self));
        };
        let mut v = [0u8; 12];
        v.copy_from_slice(b);
        let (major, minor) = super::parse_version(&v)?;
        let version = match (major, minor) {
            (3, 8) => Version::V3_8,
            (3, 7) => Version::V3_7,
            (3, 3..=6) => Version::V3_3,
            _ => return Err(Error::UnsupportedVersion { major, minor }),
        };
        if version > self.offered {
            return Err(Error::UnsupportedVersion { major, minor });
        }
        Ok(Progress::Done {
            next: OfferSecurity {
                version,
                limits: self.limits,
            },
            consumed: Version::LEN,
        })
    }
}

/// The version is agreed; the caller offers security types or refuses.
#[derive(Debug)]
pub struct OfferSecurity {
    version: Version,
    limits: Limits,
}

impl OfferSecurity {
    /// The version agreed.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Offers `types` (None and VNC authentication are implemented in this role). In
    /// RFB 3.3 the server picks, so exactly one type must be given.
    pub fn offer(
        self,
        types: &[SecurityType],
        out: &mut Vec<u8>,
    ) -> Result<ExpectSecurityChoice, Error> {
        if types.is_empty() || types.len() > 255 {
            return Err(Error::Malformed {
                what: "security type offer",
                why: "must list 1 to 255 types",
            });
        }
        if let Some(t) = types
            .iter()
            .find(|t| **t != SecurityType::NONE && **t != SecurityType::VNC_AUTH)
        {
            return Err(Error::SecurityTypeNotOffered(t.0));
        }
        let preset = if self.version == Version::V3_3 {
            let [only] = types else {
                return Err(Error::Malformed {
                    what: "security type offer",
                    why: "RFB 3.3 lets the server pick exactly one type",
                });
            };
            out.extend_from_slice(&u32::from(only.0).to_be_bytes());
            Some(*only)
        } else {
            out.push(types.len() as u8);
            out.extend(types.iter().map(|t| t.0));
            None
        };
        Ok(ExpectSecurityChoice {
            version: self.version,
            offered: types.to_vec(),
            preset,
            limits: self.limits,
        })
    }

    /// Refuses the connection with `reason`; the caller then closes it.
    pub fn refuse(self, reason: &str, out: &mut Vec<u8>) {
        if self.version == Version::V3_3 {
            out.extend_from_slice(&0u32.to_be_bytes());
        } else {
            out.push(0);
        }
        write_reason(reason, out);
    }
}

/// Waits for the client's choice of security type (immediate in 3.3).
#[derive(Debug)]
pub struct ExpectSecurityChoice {
    version: Version,
    offered: Vec<SecurityType>,
    preset: Option<SecurityType>,
    limits: Limits,
}

/// The security type the client chose, with the state that handles it.
#[derive(Debug)]
pub enum SecurityChosen {
    /// None: the caller decides the result.
    None(SendSecurityResult),
    /// VNC authentication: the caller sends a challenge.
    VncAuth(SendChallenge),
}

impl ExpectSecurityChoice {
    /// Consumes the choice byte.
    pub fn receive(self, input: &[u8]) -> Result<Progress<Self, SecurityChosen>, Error> {
        let (chosen, consumed) = match self.preset {
            Some(t) => (t, 0),
            None => match input.first() {
                None => return Ok(Progress::NeedMore(self)),
                Some(&t) => (SecurityType(t), 1),
            },
        };
        if !self.offered.contains(&chosen) {
            return Err(Error::SecurityTypeNotOffered(chosen.0));
        }
        let next = if chosen == SecurityType::VNC_AUTH {
            SecurityChosen::VncAuth(SendChallenge {
                version: self.version,
                limits: self.limits,
            })
        } else {
            SecurityChosen::None(SendSecurityResult {
                version: self.version,
                after_none: true,
                limits: self.limits,
            })
        };
        Ok(Progress::Done { next, consumed })
    }
}

/// VNC authentication: the caller supplies 16 random bytes.
#[derive(Debug)]
pub struct SendChallenge {
    version: Version,
    limits: Limits,
}

impl SendChallenge {
    /// Writes the challenge. It must come from a cryptographic random source.
    pub fn send(self, challenge: Challenge, out: &mut Vec<u8>) -> ExpectChallengeResponse {
        out.extend_from_slice(&challenge.0);
        ExpectChallengeResponse {
            version: self.version,
            challenge,
            limits: self.limits,
        }
    }
}

/// Waits for the client's 16-byte response.
#[derive(Debug)]
pub struct ExpectChallengeResponse {
    version: Version,
    challenge: Challenge,
    limits: Limits,
}

impl ExpectChallengeResponse {
    /// Consumes the response.
    pub fn receive(self, input: &[u8]) -> Result<Progress<Self, VerifyResponse>, Error> {
        let Some(b) = input.get(..16) else {
            return Ok(Progress::NeedMore(self));
        };
        let mut r = [0u8; 16];
        r.copy_from_slice(b);
        Ok(Progress::Done {
            next: VerifyResponse {
                version: self.version,
                challenge: self.challenge,
                response: ChallengeResponse::from_bytes(r),
                limits: self.limits,
            },
            consumed: 16,
        })
    }
}

/// The response is here; the caller checks it and decides the result.
#[derive(Debug)]
pub struct VerifyResponse {
    version: Version,
    challenge: Challenge,
    response: ChallengeResponse,
    limits: Limits,
}

impl VerifyResponse {
    /// Whether the response matches `password`, compared in constant time.
    pub fn verify(&self, password: &[u8]) -> bool {
        self.response.verify(&self.challenge, password)
    }

    /// Moves on to sending the result.
    pub fn into_result(self) -> SendSecurityResult {
        SendSecurityResult {
            version: self.version,
            after_none: false,
            limits: self.limits,
        }
    }
}

/// The caller accepts or refuses.
#[derive(Debug)]
pub struct SendSecurityResult {
    version: Version,
    after_none: bool,
    limits: Limits,
}

impl SendSecurityResult {
    fn sends_result(&self) -> bool {
        !self.after_none || self.version.result_after_none()
    }

    /// Writes SecurityResult OK (where the version has one for this type).
    pub fn accept(self, out: &mut Vec<u8>) -> ExpectClientInit {
        if self.sends_result() {
            out.extend_from_slice(&0u32.to_be_bytes());
        }
        ExpectClientInit {
            limits: self.limits,
        }
    }

    /// Writes SecurityResult "failed", with `reason` in 3.8. None authentication
    /// before 3.8 has no result message: nothing is written and the caller just
    /// closes (refuse at [`OfferSecurity`] instead to give such clients a reason).
    pub fn refuse(self, reason: &str, out: &mut Vec<u8>) {
        if !self.sends_result() {
            return;
        }
        out.extend_from_slice(&1u32.to_be_bytes());
        if self.version.result_has_reason() {
            write_reason(reason, out);
        }
    }
}

/// Waits for ClientInit.
#[derive(Debug)]
pub struct ExpectClientInit {
    limits: Limits,
}

impl ExpectClientInit {
    /// The limits in force (for the relay that follows).
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Consumes ClientInit. The caller then writes a [`super::ServerInit`].
    pub fn receive(self, input: &[u8]) -> Result<Progress<Self, ClientInit>, Error> {
        match input.first() {
            None => Ok(Progress::NeedMore(self)),
            Some(&b) => Ok(Progress::Done {
                next: ClientInit { shared: b != 0 },
                consumed: 1,
            }),
        }
    }
}
