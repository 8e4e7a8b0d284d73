// SPDX-License-Identifier: Apache-2.0
//! TPM commands on one ESAPI connection to a vTPM: the attestation key,
//! PCR extends and reads, quotes, the EK certificate and ActivateCredential.

use std::convert::TryFrom;
use std::str::FromStr;

use tss_esapi::Context;
use tss_esapi::abstraction::{DefaultKey, ak, nv};
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{
    AuthHandle, KeyHandle, NvIndexTpmHandle, ObjectHandle, PcrHandle, PersistentTpmHandle,
    SessionHandle, TpmHandle,
};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::resource_handles::NvAuth;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Attest, Data, Digest, DigestValues, EncryptedSecret, IdObject, PcrSelectSize,
    PcrSelectionListBuilder, PcrSlot, Signature, SignatureScheme, SymmetricDefinition,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;

use super::VtpmError;
use crate::digest::Sha256Digest;
use crate::eventlog::{MEASURED_PCRS, PcrValues};

/// Where swtpm_setup persists the RSA 2048 EK.
pub(crate) const EK_HANDLE: u32 = 0x8101_0001;
/// NV index of the RSA 2048 EK certificate (TCG EK Credential Profile).
pub(crate) const EK_CERT_NV_INDEX: u32 = 0x01c0_0002;

fn tpm_err(op: &'static str) -> impl FnOnce(tss_esapi::Error) -> VtpmError {
    move |source| VtpmError::Tpm { op, source }
}

/// An open connection to one vTPM, with its AK loaded.
pub(crate) struct TpmConn {
    ctx: Context,
    ek: KeyHandle,
    ak: KeyHandle,
    /// The AK's TPMT_PUBLIC, marshalled.
    pub(crate) ak_public: Vec<u8>,
    /// The AK's TPM name (nameAlg || digest).
    pub(crate) ak_name: Vec<u8>,
}

/// The SHA-256 selection of the measured PCRs.
pub(crate) fn measured_selection() -> Result<tss_esapi::structures::PcrSelectionList, VtpmError> {
    let slots = MEASURED_PCRS
        .iter()
        .map(|&p| PcrSlot::try_from(1u32 << p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(tpm_err("build the PCR selection"))?;
    PcrSelectionListBuilder::new()
        .with_size_of_select(PcrSelectSize::ThreeOctets)
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(tpm_err("build the PCR selection"))
}

fn pcr_handle(pcr: u8) -> Result<PcrHandle, VtpmError> {
    Ok(match pcr {
        0 => PcrHandle::Pcr0,
        4 => PcrHandle::Pcr4,
        8 => PcrHandle::Pcr8,
        9 => PcrHandle::Pcr9,
        11 => PcrHandle::Pcr11,
        12 => PcrHandle::Pcr12,
        other => return Err(VtpmError::UnmeasuredPcr { pcr: other }),
    })
}

impl TpmConn {
    /// Connects to swtpm on 127.0.0.1:`port`, opens the EK that swtpm_setup
    /// persisted and creates and loads a fresh AK under it.
    pub(crate) fn open(port: u16) -> Result<Self, VtpmError> {
        let tcti = TctiNameConf::from_str(&format!("swtpm:host=127.0.0.1,port={port}"))
            .map_err(tpm_err("configure the TCTI"))?;
        let mut ctx = Context::new(tcti).map_err(tpm_err("connect to swtpm"))?;
        let ek_handle = PersistentTpmHandle::new(EK_HANDLE).map_err(tpm_err("open the EK"))?;
        let ek: KeyHandle = ctx
            .tr_from_tpm_public(TpmHandle::Persistent(ek_handle))
            .map_err(tpm_err("open the EK"))?
            .into();
        let created = ak::create_ak(
            &mut ctx,
            ek,
            HashingAlgorithm::Sha256,
            SignatureSchemeAlgorithm::RsaSsa,
            None,
            DefaultKey,
        )
        .map_err(tpm_err("create the AK"))?;
        let ak = ak::load_ak(&mut ctx, ek, None, created.out_private, created.out_public)
            .map_err(tpm_err("load the AK"))?;
        let (public, name, _) = ctx.read_public(ak).map_err(tpm_err("read the AK"))?;
        let ak_public = public.marshall().map_err(tpm_err("marshal the AK"))?;
        Ok(TpmConn {
            ctx,
            ek,
            ak,
            ak_public,
            ak_name: name.value().to_vec(),
        })
    }

    /// The RSA EK certificate (DER) from NV.
    pub(crate) fn ek_cert(&mut self) -> Result<Vec<u8>, VtpmError> {
        let index =
            NvIndexTpmHandle::new(EK_CERT_NV_INDEX).map_err(tpm_err("read the EK certificate"))?;
        self.ctx
            .execute_with_nullauth_session(|ctx| nv::read_full(ctx, NvAuth::Owner, index))
            .map_err(tpm_err("read the EK certificate"))
    }

    /// Extends one SHA-256 PCR.
    pub(crate) fn extend(&mut self, pcr: u8, digest: &Sha256Digest) -> Result<(), VtpmError> {
        let handle = pcr_handle(pcr)?;
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.as_bytes().as_slice()).map_err(tpm_err("extend a PCR"))?,
        );
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.pcr_extend(handle, values)
            })
            .map_err(tpm_err("extend a PCR"))
    }

    /// Reads the measured PCRs.
    pub(crate) fn read_pcrs(&mut self) -> Result<PcrValues, VtpmError> {
        let selection = measured_selection()?;
        let (_, read, digests) = self
            .ctx
            .execute_without_session(|ctx| ctx.pcr_read(selection))
            .map_err(tpm_err("read PCRs"))?;
        let slots: Vec<PcrSlot> = read
            .get_selections()
            .iter()
            .filter(|s| s.hashing_algorithm() == HashingAlgorithm::Sha256)
            .flat_map(|s| s.selected())
            .collect();
        let mut out = PcrValues::new();
        for (slot, d) in slots.iter().zip(digests.value()) {
            let pcr = u32::from(*slot).trailing_zeros() as u8;
            let bytes: [u8; 32] =
                d.value()
                    .try_into()
                    .map_err(|_| VtpmError::UnexpectedResponse {
                        what: "a SHA-256 PCR value that is not 32 bytes",
                    })?;
            out.insert(pcr, Sha256Digest(bytes));
        }
        if out.len() != MEASURED_PCRS.len() {
            return Err(VtpmError::UnexpectedResponse {
                what: "fewer PCR values than selected",
            });
        }
        Ok(out)
    }

    /// TPM2_Quote over the measured PCRs with `nonce` as qualifying data.
    /// Returns the marshalled TPMS_ATTEST and TPMT_SIGNATURE.
    pub(crate) fn quote(&mut self, nonce: &[u8; 32]) -> Result<(Vec<u8>, Vec<u8>), VtpmError> {
        let selection = measured_selection()?;
        let data = Data::try_from(nonce.to_vec()).map_err(tpm_err("quote"))?;
        let ak = self.ak;
        let (attest, sig): (Attest, Signature) = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.quote(ak, data, SignatureScheme::Null, selection)
            })
            .map_err(tpm_err("quote"))?;
        Ok((
            attest.marshall().map_err(tpm_err("marshal the quote"))?,
            sig.marshall().map_err(tpm_err("marshal the signature"))?,
        ))
    }

    /// TPM2_ActivateCredential: recovers the secret a verifier sealed to this
    /// TPM's EK for this AK's name. The EK's policy (PolicySecret on the
    /// endorsement hierarchy) is satisfied with a policy session.
    pub(crate) fn activate_credential(
        &mut self,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, VtpmError> {
        let op = "activate the credential";
        let blob = IdObject::try_from(credential_blob.to_vec()).map_err(tpm_err(op))?;
        let secret = EncryptedSecret::try_from(encrypted_secret.to_vec()).map_err(tpm_err(op))?;
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(tpm_err(op))?
            .ok_or(VtpmError::UnexpectedResponse {
                what: "no policy session",
            })?;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_encrypt(true)
            .build();
        let (ak, ek) = (self.ak, self.ek);
        let result = self
            .ctx
            .execute_with_temporary_object(SessionHandle::from(session).into(), |ctx, _| {
                ctx.tr_sess_set_attributes(session, attrs, mask)?;
                let policy = PolicySession::try_from(session)?;
                ctx.execute_with_nullauth_session(|ctx| {
                    ctx.policy_secret(
                        policy,
                        AuthHandle::Endorsement,
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        None,
                    )
                })?;
                ctx.execute_with_sessions(
                    (Some(AuthSession::Password), Some(session), None),
                    |ctx| ctx.activate_credential(ak, ek, blob, secret),
                )
            })
            .map_err(tpm_err(op))?;
        Ok(result.value().to_vec())
    }

    /// Flushes the AK; the connection closes when `self` drops.
    pub(crate) fn close(mut self) {
        let ak: ObjectHandle = self.ak.into();
        if let Err(e) = self.ctx.flush_context(ak) {
            tracing::debug!(error = %e, "flushing the AK failed");
        }
    }
}
