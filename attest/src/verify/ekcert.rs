// SPDX-License-Identifier: Apache-2.0
//! EK certificate checks against the host-local CA's certificates.
//!
//! Every certificate in the trust bundle is a trust anchor (the bundle is the
//! swtpm_localca issuer and root certificates, see `LocalCa::bundle_pem`). An
//! EK certificate is accepted when it is within its validity period, holds an
//! RSA key of at least 2048 bits, and is signed (RSA PKCS#1 v1.5 with SHA-256,
//! -384 or -512) directly by an anchor that is a CA.

use std::time::SystemTime;

use rsa::RsaPublicKey;
use rsa::pkcs1v15::Pkcs1v15Sign;
use rsa::pkcs8::DecodePublicKey;
use rsa::traits::PublicKeyParts;
use sha2::{Digest as _, Sha256, Sha384, Sha512};
use x509_cert::Certificate;
use x509_cert::der::{Decode, Encode};
use x509_cert::ext::pkix::BasicConstraints;

use super::VerifyError;

const SHA256_WITH_RSA: &str = "1.2.840.113549.1.1.11";
const SHA384_WITH_RSA: &str = "1.2.840.113549.1.1.12";
const SHA512_WITH_RSA: &str = "1.2.840.113549.1.1.13";
const BASIC_CONSTRAINTS: &str = "2.5.29.19";

/// The certificates a verifier trusts to sign EK certificates.
#[derive(Debug, Clone)]
pub struct TrustAnchors {
    certs: Vec<Certificate>,
}

fn bad(reason: impl Into<String>) -> VerifyError {
    VerifyError::EkCert {
        reason: reason.into(),
    }
}

impl TrustAnchors {
    /// Parses a PEM bundle of one or more certificates.
    pub fn from_pem(pem: &str) -> Result<Self, VerifyError> {
        let certs =
            Certificate::load_pem_chain(pem.as_bytes()).map_err(|e| VerifyError::Anchors {
                reason: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(VerifyError::Anchors {
                reason: "the bundle holds no certificate".to_string(),
            });
        }
        Ok(TrustAnchors { certs })
    }

    /// Trusts nothing.
    pub(crate) fn none() -> Self {
        TrustAnchors { certs: Vec::new() }
    }

    /// Checks an EK certificate (DER) and returns its RSA public key.
    pub fn verify_ek_cert(&self, der: &[u8], now: SystemTime) -> Result<RsaPublicKey, VerifyError> {
        let ek = Certificate::from_der(der).map_err(|e| bad(format!("not DER X.509: {e}")))?;
        check_validity(&ek, now)?;
        let key = rsa_key(&ek)?;
        if key.size() * 8 < 2048 {
            return Err(bad("EK is shorter than 2048 bits"));
        }
        // Anchors are trusted as they are, so the chain ends at the first one.
        let issuer = self
            .certs
            .iter()
            .find(|a| {
                a.tbs_certificate.subject == ek.tbs_certificate.issuer && signed_by(&ek, a).is_ok()
            })
            .ok_or_else(|| {
                bad(format!(
                    "not signed by a trusted CA (issuer {})",
                    ek.tbs_certificate.issuer
                ))
            })?;
        if !is_ca(issuer) {
            return Err(bad("issuer is not a CA certificate"));
        }
        check_validity(issuer, now)?;
        Ok(key)
    }
}

fn check_validity(c: &Certificate, now: SystemTime) -> Result<(), VerifyError> {
    let v = &c.tbs_certificate.validity;
    if now < v.not_before.to_system_time() || now > v.not_after.to_system_time() {
        return Err(bad(format!(
            "certificate {} is outside its validity period",
            c.tbs_certificate.subject
        )));
    }
    Ok(())
}

fn rsa_key(c: &Certificate) -> Result<RsaPublicKey, VerifyError> {
    let spki = c
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| bad(e.to_string()))?;
    RsaPublicKey::from_public_key_der(&spki).map_err(|_| bad("the public key is not RSA"))
}

fn is_ca(c: &Certificate) -> bool {
    c.tbs_certificate
        .extensions
        .iter()
        .flatten()
        .filter(|e| e.extn_id.to_string() == BASIC_CONSTRAINTS)
        .any(|e| {
            BasicConstraints::from_der(e.extn_value.as_bytes())
                .map(|b| b.ca)
                .unwrap_or(false)
        })
}

fn signed_by(cert: &Certificate, issuer: &Certificate) -> Result<(), VerifyError> {
    let key = rsa_key(issuer)?;
    let tbs = cert
        .tbs_certificate
        .to_der()
        .map_err(|e| bad(e.to_string()))?;
    let sig = cert
        .signature
        .as_bytes()
        .ok_or_else(|| bad("signature has unused bits"))?;
    let res = match cert.signature_algorithm.oid.to_string().as_str() {
        SHA256_WITH_RSA => key.verify(Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(&tbs), sig),
        SHA384_WITH_RSA => key.verify(Pkcs1v15Sign::new::<Sha384>(), &Sha384::digest(&tbs), sig),
        SHA512_WITH_RSA => key.verify(Pkcs1v15Sign::new::<Sha512>(), &Sha512::digest(&tbs), sig),
        other => return Err(bad(format!("unsupported signature algorithm {other}"))),
    };
    res.map_err(|_| bad("signature does not verify"))
}
