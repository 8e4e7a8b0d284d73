// SPDX-License-Identifier: Apache-2.0
//! Targets `vm_spec` and `token`: what the control plane accepts from
//! clients and agents.
//!
//! `vm_spec` decodes a gRPC `VmSpec` (protobuf) and checks it the way
//! `cell0d` does for Create; a spec that passes survives a round trip through
//! its gRPC form unchanged. `token` feeds biscuit capability tokens to the
//! verifier: raw bytes, mutations of a real minted token, and attenuations of
//! it with fuzzed claims. The property: whatever verifies never grants more
//! than the minted token did (rights, agent, VM, expiry).

use std::sync::OnceLock;

use arbitrary::Unstructured;
use biscuit_auth::{Algorithm, KeyPair, PrivateKey};
use cell0_control::spec::VmSpec;
use cell0_control::token::{Attenuation, Claims, Minter, Verifier, pattern_covers, rights_cover};
use cell0_proto::grpc;
use cell0_proto::msg::Right;
use cell0_proto::prost::Message;

/// gRPC VM specs.
pub fn vm_spec(data: &[u8]) {
    let Ok(p) = grpc::VmSpec::decode(data) else {
        return;
    };
    if let Ok(spec) = VmSpec::from_proto(p, "vm") {
        let again = VmSpec::from_proto(spec.to_proto(), "other")
            .expect("a checked spec passes its own check again");
        assert_eq!(again, spec);
    }
}

/// The time tokens are checked at, and the minted token's expiry.
const NOW: u64 = 1_800_000_000;
const EXPIRES: u64 = NOW + 3600;

struct Minted {
    verifier: Verifier,
    token: Vec<u8>,
    claims: Claims,
}

fn minted() -> &'static Minted {
    static M: OnceLock<Minted> = OnceLock::new();
    M.get_or_init(|| {
        // A fixed root key, so a crash input reproduces in another process.
        let private =
            PrivateKey::from_bytes(&[7u8; 32], Algorithm::Ed25519).expect("an Ed25519 key");
        let root = KeyPair::from(&private);
        let minter = Minter::new(root, 86_400);
        let claims = Claims {
            agent: "agent-1".into(),
            vm: "vm-1".into(),
            rights: vec![
                Right {
                    service: "kv".into(),
                    method: "get".into(),
                },
                Right {
                    service: "blob".into(),
                    method: "read*".into(),
                },
            ],
            expires: EXPIRES,
        };
        let token = minter.mint_at(&claims, NOW).expect("a token mints");
        Minted {
            verifier: Verifier::with_key(minter.public_key()),
            token,
            claims,
        }
    })
}

fn no_wider(got: &Claims, minted: &Claims) {
    for r in &got.rights {
        assert!(
            rights_cover(&minted.rights, r),
            "a verified token grants {r:?}, which the minted one did not"
        );
    }
    assert!(
        got.agent == minted.agent || got.agent.starts_with(&format!("{}/", minted.agent)),
        "agent {:?} is not {:?} or one of its sub-agents",
        got.agent,
        minted.agent
    );
    assert!(
        pattern_covers(&minted.vm, &got.vm),
        "VM {:?} escapes {:?}",
        got.vm,
        minted.vm
    );
    assert!(got.expires <= minted.expires, "expiry extended");
}

fn name(u: &mut Unstructured<'_>) -> arbitrary::Result<String> {
    Ok(match u.int_in_range(0u8..=5)? {
        0 => "agent-1/sub".into(),
        1 => "agent-2".into(),
        2 => "*".into(),
        3 => "vm-1".into(),
        4 => "agent-1".into(),
        _ => {
            let n = u.int_in_range(0usize..=12)?.min(u.len());
            String::from_utf8_lossy(u.bytes(n)?).into()
        }
    })
}

fn pattern(u: &mut Unstructured<'_>) -> arbitrary::Result<String> {
    Ok((*u.choose(&[
        "kv", "get", "blob", "read*", "read-all", "*", "k*", "put", "",
    ])?)
    .to_string())
}

fn attenuation(u: &mut Unstructured<'_>) -> arbitrary::Result<Attenuation> {
    let rights = if u.arbitrary()? {
        let mut v = Vec::new();
        for _ in 0..u.int_in_range(0u8..=3)? {
            v.push(Right {
                service: pattern(u)?,
                method: pattern(u)?,
            });
        }
        Some(v)
    } else {
        None
    };
    Ok(Attenuation {
        rights,
        expires: if u.arbitrary()? {
            Some(u.int_in_range(NOW - 10..=EXPIRES + 10)?)
        } else {
            None
        },
        agent: if u.arbitrary()? { Some(name(u)?) } else { None },
        vm: if u.arbitrary()? { Some(name(u)?) } else { None },
    })
}

/// Capability tokens.
pub fn token(data: &[u8]) {
    let m = minted();
    let mut u = Unstructured::new(data);
    let Ok(mode) = u.arbitrary::<u8>() else {
        return;
    };
    let candidate = match mode % 3 {
        0 => u.take_rest().to_vec(),
        1 => {
            let mut t = m.token.clone();
            for _ in 0..u.int_in_range(1u8..=4).unwrap_or(1) {
                if t.is_empty() {
                    break;
                }
                let Ok(op) = u.int_in_range(0u8..=2) else {
                    break;
                };
                let Ok(i) = u.int_in_range(0..=t.len().saturating_sub(1)) else {
                    break;
                };
                match op {
                    0 => t[i] ^= u.arbitrary::<u8>().unwrap_or(1).max(1),
                    1 => t.truncate(i),
                    _ => {
                        let b: u8 = u.arbitrary().unwrap_or(0);
                        t.insert(i, b);
                    }
                }
            }
            t
        }
        _ => {
            let mut t = m.token.clone();
            for _ in 0..u.int_in_range(1u8..=3).unwrap_or(1) {
                let Ok(a) = attenuation(&mut u) else { break };
                match cell0_control::token::attenuate(&t, &a) {
                    Ok(next) => t = next,
                    Err(_) => break,
                }
            }
            t
        }
    };
    if let Ok(v) = m.verifier.verify_at(&candidate, NOW) {
        no_wider(&v.claims, &m.claims);
    }
}

/// Checks that the token oracle is live: the minted token verifies with its
/// own claims, a narrowing attenuation verifies narrower, and a flipped byte
/// in the signature does not verify. (Otherwise "never wider" would also hold
/// for a verifier that refuses everything.)
pub fn token_oracle_is_live() {
    let m = minted();
    let v = m
        .verifier
        .verify_at(&m.token, NOW)
        .expect("the minted token verifies");
    assert_eq!(v.claims, m.claims);
    let narrow = Attenuation {
        rights: Some(vec![Right {
            service: "kv".into(),
            method: "get".into(),
        }]),
        agent: Some("agent-1/sub".into()),
        ..Attenuation::default()
    };
    let t = cell0_control::token::attenuate(&m.token, &narrow).expect("it attenuates");
    let v = m
        .verifier
        .verify_at(&t, NOW)
        .expect("the attenuated token verifies");
    assert_eq!(v.claims.rights.len(), 1);
    assert_eq!(v.claims.agent, "agent-1/sub");
    let mut bad = m.token.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(m.verifier.verify_at(&bad, NOW).is_err());
}
