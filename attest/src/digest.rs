// SPDX-License-Identifier: Apache-2.0
//! SHA-256 digests as they appear in PCRs, event logs and manifests.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// Errors of this module.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    /// The text is not 64 hex digits.
    #[error("a SHA-256 digest must be 64 hex digits, got {len} characters")]
    BadLength {
        /// Length of the rejected text.
        len: usize,
    },
    /// The text has a character that is not a hex digit.
    #[error("a SHA-256 digest must be hex digits only")]
    NotHex,
}

/// A SHA-256 digest; written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    /// The all-zero value every measured PCR holds after TPM2_Startup(CLEAR).
    pub const ZERO: Sha256Digest = Sha256Digest([0; 32]);

    /// SHA-256 of `data`.
    pub fn of(data: &[u8]) -> Self {
        Sha256Digest(Sha256::digest(data).into())
    }

    /// The PCR extend operation: `SHA-256(self || measurement)`.
    pub fn extend(&self, measurement: &Sha256Digest) -> Self {
        let mut h = Sha256::new();
        h.update(self.0);
        h.update(measurement.0);
        Sha256Digest(h.finalize().into())
    }

    /// The digest as bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Digest({})", self.to_hex())
    }
}

impl FromStr for Sha256Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 {
            return Err(DigestError::BadLength { len: s.len() });
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| DigestError::NotHex)?;
        Ok(Sha256Digest(out))
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_sha256_of_empty_input() {
        assert_eq!(
            Sha256Digest::of(b"").to_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn extend_matches_manual_concatenation() {
        let m = Sha256Digest::of(b"kernel");
        let mut buf = vec![0u8; 32];
        buf.extend_from_slice(&m.0);
        assert_eq!(Sha256Digest::ZERO.extend(&m), Sha256Digest::of(&buf));
    }

    #[test]
    fn hex_round_trip_and_rejects() {
        let d = Sha256Digest::of(b"x");
        assert_eq!(d.to_hex().parse::<Sha256Digest>(), Ok(d));
        assert_eq!(
            "abc".parse::<Sha256Digest>(),
            Err(DigestError::BadLength { len: 3 })
        );
        assert_eq!(
            "zz".repeat(32).parse::<Sha256Digest>(),
            Err(DigestError::NotHex)
        );
        let json = serde_json::to_string(&d).unwrap_or_default();
        assert_eq!(json, format!("\"{}\"", d.to_hex()));
    }
}
