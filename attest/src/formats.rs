// SPDX-License-Identifier: Apache-2.0
//! Serialized forms that cross process boundaries: nonces, the AK bundle, the
//! credential challenge and response, and the quote bundle.
//!
//! All are JSON objects with a `format` field naming their version. TPM
//! structures travel as base64 (standard alphabet, padded) of their TPM
//! marshalled form; names, nonces and digests as lowercase hex.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use rand_core::{OsRng, RngCore};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::eventlog::PcrValues;

/// `format` of [`AkBundle`].
pub const AK_FORMAT: &str = "cell0-ak/1";
/// `format` of [`CredentialChallenge`].
pub const CHALLENGE_FORMAT: &str = "cell0-credential-challenge/1";
/// `format` of [`ActivationResponse`].
pub const RESPONSE_FORMAT: &str = "cell0-credential-response/1";
/// `format` of [`QuoteBundle`].
pub const QUOTE_FORMAT: &str = "cell0-quote/1";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The JSON does not parse as the expected object.
    #[error("not a valid {what}")]
    Parse {
        /// Which object.
        what: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The `format` field names another version.
    #[error("unsupported {what} format {got:?} (expected {expected:?})")]
    Format {
        /// Which object.
        what: &'static str,
        /// The expected value.
        expected: &'static str,
        /// The value found.
        got: String,
    },
    /// A nonce is not 64 hex digits.
    #[error("a nonce must be 64 hex digits (32 bytes)")]
    BadNonce,
    /// Reading a file failed.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A verifier's 32-byte challenge, used as a quote's qualifying data.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nonce(pub [u8; 32]);

impl Nonce {
    /// 32 bytes from the operating system's CSPRNG.
    pub fn random() -> Self {
        let mut n = [0u8; 32];
        OsRng.fill_bytes(&mut n);
        Nonce(n)
    }
}

impl fmt::Display for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce({self})")
    }
}

impl FromStr for Nonce {
    type Err = FormatError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut n = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut n).map_err(|_| FormatError::BadNonce)?;
        Ok(Nonce(n))
    }
}

impl Serialize for Nonce {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Nonce {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Serde adapter: bytes as standard padded base64.
pub mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes bytes as base64.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    /// Deserializes base64 into bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// Serde adapter: bytes as lowercase hex.
pub mod hexbytes {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes bytes as hex.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    /// Deserializes hex into bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

/// What an attester hands a verifier to enroll its AK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AkBundle {
    /// Always [`AK_FORMAT`].
    pub format: String,
    /// The AK's TPMT_PUBLIC, TPM-marshalled.
    #[serde(with = "b64")]
    pub ak_public: Vec<u8>,
    /// The AK's TPM name as the TPM reports it (nameAlg || digest).
    #[serde(with = "hexbytes")]
    pub ak_name: Vec<u8>,
    /// The EK certificate (DER) from the vTPM's NV index 0x01c00002.
    #[serde(with = "b64")]
    pub ek_cert: Vec<u8>,
}

/// TPM2_MakeCredential output: a secret only the TPM holding the EK can
/// recover, and only for the AK with the given name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialChallenge {
    /// Always [`CHALLENGE_FORMAT`].
    pub format: String,
    /// The AK name the credential is bound to.
    #[serde(with = "hexbytes")]
    pub ak_name: Vec<u8>,
    /// TPM2B_ID_OBJECT contents (integrity HMAC and encrypted credential).
    #[serde(with = "b64")]
    pub credential_blob: Vec<u8>,
    /// TPM2B_ENCRYPTED_SECRET contents (the seed, RSA-OAEP encrypted to the EK).
    #[serde(with = "b64")]
    pub encrypted_secret: Vec<u8>,
}

/// The attester's answer to a [`CredentialChallenge`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivationResponse {
    /// Always [`RESPONSE_FORMAT`].
    pub format: String,
    /// The AK name the challenge named.
    #[serde(with = "hexbytes")]
    pub ak_name: Vec<u8>,
    /// The recovered secret.
    #[serde(with = "b64")]
    pub secret: Vec<u8>,
}

/// A quote as it leaves the vTPM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuoteBundle {
    /// Always [`QUOTE_FORMAT`].
    pub format: String,
    /// The signing AK's name (informational; the verifier uses the enrolled AK).
    #[serde(with = "hexbytes")]
    pub ak_name: Vec<u8>,
    /// TPMS_ATTEST, TPM-marshalled: the signed bytes.
    #[serde(with = "b64")]
    pub attest: Vec<u8>,
    /// TPMT_SIGNATURE, TPM-marshalled.
    #[serde(with = "b64")]
    pub signature: Vec<u8>,
    /// The quoted SHA-256 PCR values read right after the quote (keys are
    /// PCR indexes as decimal strings). Only trusted once their digest equals
    /// the signed PCR digest.
    pub pcrs: PcrValues,
}

/// Parses one of this module's JSON objects and checks its `format`.
pub trait Wire: Serialize + DeserializeOwned {
    /// The object's name in errors.
    const WHAT: &'static str;
    /// Its `format` value.
    const FORMAT: &'static str;
    /// The parsed `format` field.
    fn format_field(&self) -> &str;

    /// Parses and checks the format.
    fn from_json(text: &str) -> Result<Self, FormatError> {
        let v: Self = serde_json::from_str(text).map_err(|source| FormatError::Parse {
            what: Self::WHAT,
            source,
        })?;
        if v.format_field() != Self::FORMAT {
            return Err(FormatError::Format {
                what: Self::WHAT,
                expected: Self::FORMAT,
                got: v.format_field().to_string(),
            });
        }
        Ok(v)
    }

    /// Reads a file and parses it.
    fn read_file(path: &Path) -> Result<Self, FormatError> {
        let text = std::fs::read_to_string(path).map_err(|source| FormatError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Compact JSON.
    fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

macro_rules! wire {
    ($t:ty, $what:literal, $fmt:expr) => {
        impl Wire for $t {
            const WHAT: &'static str = $what;
            const FORMAT: &'static str = $fmt;
            fn format_field(&self) -> &str {
                &self.format
            }
        }
    };
}

wire!(AkBundle, "AK bundle", AK_FORMAT);
wire!(
    CredentialChallenge,
    "credential challenge",
    CHALLENGE_FORMAT
);
wire!(ActivationResponse, "credential response", RESPONSE_FORMAT);
wire!(QuoteBundle, "quote bundle", QUOTE_FORMAT);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Sha256Digest;

    #[test]
    fn nonce_hex_round_trip() {
        let n = Nonce::random();
        assert_eq!(n.to_string().parse::<Nonce>().ok(), Some(n));
        assert!("00".parse::<Nonce>().is_err());
        assert_ne!(Nonce::random(), Nonce::random());
    }

    #[test]
    fn quote_bundle_json_shape_and_round_trip() {
        let mut pcrs = PcrValues::new();
        pcrs.insert(0, Sha256Digest::ZERO);
        let q = QuoteBundle {
            format: QUOTE_FORMAT.into(),
            ak_name: vec![0, 0x0b, 1],
            attest: vec![0xff, 0x54, 0x43, 0x47],
            signature: vec![1, 2, 3],
            pcrs,
        };
        let json = q.to_json();
        assert_eq!(
            json,
            format!(
                "{{\"format\":\"cell0-quote/1\",\"ak_name\":\"000b01\",\"attest\":\"/1RDRw==\",\
                 \"signature\":\"AQID\",\"pcrs\":{{\"0\":\"{}\"}}}}",
                Sha256Digest::ZERO
            )
        );
        assert_eq!(QuoteBundle::from_json(&json).ok(), Some(q));
        let bad = json.replace("cell0-quote/1", "cell0-quote/2");
        assert!(matches!(
            QuoteBundle::from_json(&bad),
            Err(FormatError::Format { .. })
        ));
    }
}
