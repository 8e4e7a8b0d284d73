// SPDX-License-Identifier: Apache-2.0
//! Verifier-side TPM crypto without a TPM: TPM2_MakeCredential in software,
//! AK public-area checks and TPM names, and quote signature checks.
//!
//! MakeCredential follows TPM 2.0 Library Part 1, "Credential Protection"
//! (§24) with an RSA EK of the TCG default template (nameAlg SHA-256,
//! AES-128-CFB): `seed` is RSA-OAEP(SHA-256, label "IDENTITY\0") encrypted to
//! the EK; `KDFa(seed, "STORAGE", name)` keys AES-128-CFB over the
//! TPM2B_DIGEST-wrapped secret; `KDFa(seed, "INTEGRITY")` keys an HMAC over
//! `encIdentity || name`.

use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use hmac::{Hmac, Mac};
use rand_core::{OsRng, RngCore};
use rsa::pkcs1v15::Pkcs1v15Sign;
use rsa::{BigUint, Oaep, RsaPublicKey};
use sha2::{Digest as _, Sha256};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, RsaSchemeAlgorithm};
use tss_esapi::structures::{Public, RsaScheme, Signature};
use tss_esapi::traits::UnMarshall;

use super::VerifyError;

type HmacSha256 = Hmac<Sha256>;
type Aes128CfbEnc = cfb_mode::Encryptor<aes::Aes128>;

/// TPM_ALG_SHA256, the name algorithm of the AK and the EK.
const TPM_ALG_SHA256: u16 = 0x000b;
/// Smallest RSA AK accepted.
const MIN_AK_BITS: usize = 2048;

/// KDFa (SP 800-108 counter mode with HMAC-SHA-256) as TPM 2.0 Part 1 §11.4.10.2
/// defines it; `label` is given without its terminating NUL, which KDFa adds.
pub(crate) fn kdfa(
    key: &[u8],
    label: &str,
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Vec<u8> {
    let bytes = (bits as usize).div_ceil(8);
    let mut out = Vec::with_capacity(bytes + 32);
    let mut counter: u32 = 1;
    while out.len() < bytes {
        // HMAC accepts keys of any length.
        let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
            break;
        };
        mac.update(&counter.to_be_bytes());
        mac.update(label.as_bytes());
        mac.update(&[0]);
        mac.update(context_u);
        mac.update(context_v);
        mac.update(&bits.to_be_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
        counter += 1;
    }
    out.truncate(bytes);
    out
}

/// Software TPM2_MakeCredential for an RSA-2048 EK of the default template.
/// Returns (TPM2B_ID_OBJECT contents, TPM2B_ENCRYPTED_SECRET contents).
pub(crate) fn make_credential(
    ek: &RsaPublicKey,
    ak_name: &[u8],
    secret: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), VerifyError> {
    if secret.len() > 32 {
        return Err(VerifyError::Crypto {
            what: "a credential longer than a SHA-256 digest",
        });
    }
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    let encrypted_secret = ek
        .encrypt(
            &mut OsRng,
            Oaep::new_with_label::<Sha256, _>("IDENTITY\0"),
            &seed,
        )
        .map_err(|_| VerifyError::Crypto {
            what: "RSA-OAEP encryption to the EK failed",
        })?;

    let sym_key = kdfa(&seed, "STORAGE", ak_name, &[], 128);
    // The credential travels as a marshalled TPM2B_DIGEST.
    let mut enc_identity = Vec::with_capacity(2 + secret.len());
    enc_identity.extend_from_slice(&(secret.len() as u16).to_be_bytes());
    enc_identity.extend_from_slice(secret);
    let cipher =
        Aes128CfbEnc::new_from_slices(&sym_key, &[0u8; 16]).map_err(|_| VerifyError::Crypto {
            what: "AES-128-CFB key setup failed",
        })?;
    cipher.encrypt(&mut enc_identity);

    let hmac_key = kdfa(&seed, "INTEGRITY", &[], &[], 256);
    let mut mac = HmacSha256::new_from_slice(&hmac_key).map_err(|_| VerifyError::Crypto {
        what: "HMAC key setup failed",
    })?;
    mac.update(&enc_identity);
    mac.update(ak_name);
    let outer_hmac = mac.finalize().into_bytes();

    let mut blob = Vec::with_capacity(2 + 32 + enc_identity.len());
    blob.extend_from_slice(&(outer_hmac.len() as u16).to_be_bytes());
    blob.extend_from_slice(&outer_hmac);
    blob.extend_from_slice(&enc_identity);
    Ok((blob, encrypted_secret))
}

/// The TPM name of a public area: nameAlg (SHA-256) || SHA-256(TPMT_PUBLIC).
pub(crate) fn tpm_name(tpmt_public: &[u8]) -> Vec<u8> {
    let mut name = TPM_ALG_SHA256.to_be_bytes().to_vec();
    name.extend_from_slice(&Sha256::digest(tpmt_public));
    name
}

/// Parses an AK's TPMT_PUBLIC and checks it is a restricted RSA signing key
/// that never leaves its TPM (fixedTPM, fixedParent, sensitiveDataOrigin),
/// signs with RSASSA-SHA256 and names itself with SHA-256.
pub(crate) fn parse_ak_public(tpmt_public: &[u8]) -> Result<RsaPublicKey, VerifyError> {
    let bad = |reason: &str| VerifyError::BadAk {
        reason: reason.to_string(),
    };
    let public = Public::unmarshall(tpmt_public).map_err(|_| bad("not a TPMT_PUBLIC"))?;
    let Public::Rsa {
        object_attributes: attrs,
        name_hashing_algorithm,
        parameters,
        unique,
        ..
    } = public
    else {
        return Err(bad("not an RSA key"));
    };
    if name_hashing_algorithm != HashingAlgorithm::Sha256 {
        return Err(bad("name algorithm is not SHA-256"));
    }
    if !(attrs.fixed_tpm() && attrs.fixed_parent() && attrs.sensitive_data_origin()) {
        return Err(bad(
            "key is not fixedTPM, fixedParent and sensitiveDataOrigin",
        ));
    }
    if !attrs.restricted() || !attrs.sign_encrypt() || attrs.decrypt() {
        return Err(bad("key is not a restricted signing-only key"));
    }
    match parameters.rsa_scheme() {
        RsaScheme::RsaSsa(h) if h.hashing_algorithm() == HashingAlgorithm::Sha256 => {}
        s if s.algorithm() == RsaSchemeAlgorithm::RsaSsa => {
            return Err(bad("signing hash is not SHA-256"));
        }
        _ => return Err(bad("signing scheme is not RSASSA-PKCS1-v1_5")),
    }
    let n = BigUint::from_bytes_be(unique.value());
    let e = match parameters.exponent().value() {
        0 => 65_537,
        e => e,
    };
    let key = RsaPublicKey::new(n, BigUint::from(e)).map_err(|_| bad("invalid RSA public key"))?;
    if rsa::traits::PublicKeyParts::size(&key) * 8 < MIN_AK_BITS {
        return Err(bad("RSA key shorter than 2048 bits"));
    }
    Ok(key)
}

/// Checks a marshalled TPMT_SIGNATURE over `attest` under the AK.
pub(crate) fn check_signature(
    ak: &RsaPublicKey,
    attest: &[u8],
    signature: &[u8],
) -> Result<(), String> {
    let sig = Signature::unmarshall(signature).map_err(|_| "not a TPMT_SIGNATURE".to_string())?;
    let Signature::RsaSsa(rsa_sig) = sig else {
        return Err(format!("scheme {:?} is not RSASSA", sig.algorithm()));
    };
    if rsa_sig.hashing_algorithm() != HashingAlgorithm::Sha256 {
        return Err("signature hash is not SHA-256".to_string());
    }
    let hashed = Sha256::digest(attest);
    ak.verify(
        Pkcs1v15Sign::new::<Sha256>(),
        &hashed,
        rsa_sig.signature().value(),
    )
    .map_err(|_| "the signature does not verify under the enrolled AK".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_length_and_label_separation() {
        let a = kdfa(b"seed", "STORAGE", b"name", &[], 128);
        let b = kdfa(b"seed", "INTEGRITY", b"name", &[], 128);
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
        let long = kdfa(b"seed", "STORAGE", b"name", &[], 512);
        assert_eq!(long.len(), 64);
        // The first block does not depend on the requested length only through
        // the length field: different lengths give different output.
        assert_ne!(&long[..16], a.as_slice());
    }

    #[test]
    fn kdfa_matches_a_hand_computed_first_block() {
        let mut mac = HmacSha256::new_from_slice(b"k").unwrap_or_else(|_| unreachable!());
        mac.update(&1u32.to_be_bytes());
        mac.update(b"INTEGRITY\0");
        mac.update(&256u32.to_be_bytes());
        let want = mac.finalize().into_bytes().to_vec();
        assert_eq!(kdfa(b"k", "INTEGRITY", &[], &[], 256), want);
    }

    #[test]
    fn tpm_name_is_alg_then_digest() {
        let n = tpm_name(b"public");
        assert_eq!(&n[..2], &[0x00, 0x0b]);
        assert_eq!(&n[2..], Sha256::digest(b"public").as_slice());
    }
}
