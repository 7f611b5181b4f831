//! VNC authentication: DES-ECB of the 16-byte challenge, keyed by the password.

use des::cipher::{generic_array::GenericArray, BlockEncrypt, KeyInit};
use des::Des;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

/// The 16 random bytes a server sends.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Challenge(pub [u8; 16]);

impl std::fmt::Debug for Challenge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Challenge(..)")
    }
}

/// The 16-byte answer to a [`Challenge`]. It is password-equivalent against an
/// offline dictionary attack, so it never prints and is wiped on drop.
#[derive(Clone)]
pub struct ChallengeResponse(pub(crate) Zeroizing<[u8; 16]>);

impl ChallengeResponse {
    /// Wraps received bytes.
    pub fn from_bytes(b: [u8; 16]) -> Self {
        ChallengeResponse(Zeroizing::new(b))
    }

    /// The wire bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Checks this response against the one `password` gives for `challenge`, in
    /// constant time.
    pub fn verify(&self, challenge: &Challenge, password: &[u8]) -> bool {
        let expected = vnc_auth_response(challenge, password);
        bool::from(expected.0.ct_eq(&*self.0))
    }
}

impl std::fmt::Debug for ChallengeResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChallengeResponse(<redacted>)")
    }
}

/// Computes the response to a VNC authentication challenge.
///
/// The key is the password truncated or NUL-padded to 8 bytes, with the bits of each
/// byte reversed (the historical quirk of VNC's d3des); both 8-byte halves of the
/// challenge are encrypted with DES in ECB mode.
pub fn vnc_auth_response(challenge: &Challenge, password: &[u8]) -> ChallengeResponse {
    let mut key = Zeroizing::new([0u8; 8]);
    for (k, p) in key.iter_mut().zip(password) {
        *k = p.reverse_bits();
    }
    let cipher = Des::new(GenericArray::from_slice(&*key));
    let mut out = Zeroizing::new(challenge.0);
    for block in out.chunks_exact_mut(8) {
        let mut b = GenericArray::clone_from_slice(block);
        cipher.encrypt_block(&mut b);
        block.copy_from_slice(&b);
        b.as_mut_slice().zeroize();
    }
    ChallengeResponse(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_known_vector() {
        // Computed independently with OpenSSL:
        //   key = bit-reversed "password" = 0e 86 ce ce ee f6 4e 26
        //   printf '\x00\x01...\x0f' \
        //     | openssl enc -des-ecb -nopad -K 0e86ceceeef64e26 -provider legacy -provider default
        let challenge = Challenge(core::array::from_fn(|i| i as u8));
        let r = vnc_auth_response(&challenge, b"password");
        assert_eq!(
            r.as_bytes(),
            &[
                0xb8, 0x66, 0x92, 0x41, 0x25, 0xc8, 0xee, 0xbb, 0x9d, 0xeb, 0xc1, 0xdb, 0x61, 0xc5,
                0x38, 0xe2
            ]
        );
    }

    #[test]
    fn truncates_and_pads_the_password() {
        let c = Challenge([7u8; 16]);
        assert_eq!(
            vnc_auth_response(&c, b"12345678").as_bytes(),
            vnc_auth_response(&c, b"123456789abc").as_bytes()
        );
        assert_eq!(
            vnc_auth_response(&c, b"abc").as_bytes(),
            vnc_auth_response(&c, b"abc\0\0\0\0\0").as_bytes()
        );
        assert_ne!(
            vnc_auth_response(&c, b"abc").as_bytes(),
            vnc_auth_response(&c, b"abd").as_bytes()
        );
    }

    #[test]
    fn verify_is_exact_and_debug_redacts() {
        let c = Challenge([0x5a; 16]);
        let r = vnc_auth_response(&c, b"s3cret");
        assert!(r.verify(&c, b"s3cret"));
        assert!(!r.verify(&c, b"s3cre7"));
        assert!(!r.verify(&Challenge([0x5b; 16]), b"s3cret"));
        assert_eq!(format!("{r:?}"), "ChallengeResponse(<redacted>)");
    }
}
