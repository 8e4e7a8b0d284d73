// SPDX-License-Identifier: Apache-2.0
//! Unit and property tests of minting, attenuation and verification.

use super::keys::{KeyStore, RingSource};
use super::*;
use proptest::prelude::*;

const NOW: u64 = 1_900_000_000;

fn claims() -> Claims {
    Claims {
        agent: "a1".into(),
        vm: "vm7".into(),
        rights: vec![Right::new("echo", "*"), Right::new("agent/*", "*")],
        expires: NOW + 3600,
    }
}

fn minter() -> Minter {
    Minter::new(KeyPair::new(), 24 * 3600)
}

fn verifier(m: &Minter) -> Verifier {
    Verifier::with_key(m.public_key())
}

#[test]
fn mint_and_verify_round_trip() {
    let m = minter();
    let token = m.mint_at(&claims(), NOW).unwrap();
    let v = verifier(&m).verify_at(&token, NOW).unwrap();
    assert_eq!(v.claims, claims());
    assert_eq!(v.root_key_id, m.key_id());
    assert_eq!(v.blocks, 1);
}

#[test]
fn mint_refuses_bad_claims() {
    let m = minter();
    let mut c = claims();
    c.expires = NOW + 25 * 3600;
    assert!(matches!(m.mint_at(&c, NOW), Err(TokenError::BadClaims(_))));
    let mut c = claims();
    c.agent = "a\"1".into();
    assert!(matches!(m.mint_at(&c, NOW), Err(TokenError::BadClaims(_))));
    let mut c = claims();
    c.rights = vec![Right::new("ec*ho", "*")];
    assert!(matches!(m.mint_at(&c, NOW), Err(TokenError::BadClaims(_))));
    let mut c = claims();
    c.expires = 0;
    assert!(matches!(m.mint_at(&c, NOW), Err(TokenError::BadClaims(_))));
}

#[test]
fn expired_token_is_token_expired() {
    let m = minter();
    let token = m.mint_at(&claims(), NOW).unwrap();
    let err = verifier(&m).verify_at(&token, NOW + 3600).unwrap_err();
    assert_eq!(err.code(), ErrorCode::TokenExpired, "{err}");
    assert!(verifier(&m).verify_at(&token, NOW + 3599).is_ok());
}

#[test]
fn a_signature_by_another_key_under_our_key_id_is_token_invalid() {
    let m = minter();
    let forger = KeyPair::new();
    let token = Biscuit::builder()
        .root_key_id(m.key_id())
        .code(r#"agent("a1"); vm("vm7"); right("*", "*"); expires(1900003600);"#)
        .unwrap()
        .build(&forger)
        .unwrap()
        .to_vec()
        .unwrap();
    let err = verifier(&m).verify_at(&token, NOW).unwrap_err();
    assert_eq!(err, TokenError::BadSignature);
    assert_eq!(err.code(), ErrorCode::TokenInvalid);
}

#[test]
fn an_altered_token_is_token_invalid() {
    let m = minter();
    let token = m.mint_at(&claims(), NOW).unwrap();
    // Turn the "echo" of the first right into "acho": the bytes still parse,
    // the signature no longer verifies.
    let pos = token.windows(4).position(|w| w == b"echo").unwrap();
    let mut bad = token.clone();
    bad[pos] = b'a';
    let err = verifier(&m).verify_at(&bad, NOW).unwrap_err();
    assert_eq!(err.code(), ErrorCode::TokenInvalid, "{err}");
}

#[test]
fn a_token_from_another_root_is_wrong_root() {
    let m = minter();
    let other = minter();
    let token = other.mint_at(&claims(), NOW).unwrap();
    let err = verifier(&m).verify_at(&token, NOW).unwrap_err();
    assert_eq!(err.code(), ErrorCode::WrongRoot, "{err}");
    // A token with no key id at all is not ours either.
    let token = Biscuit::builder()
        .code(r#"agent("a1"); vm("vm7"); expires(1900003600);"#)
        .unwrap()
        .build(&KeyPair::new())
        .unwrap()
        .to_vec()
        .unwrap();
    let err = verifier(&m).verify_at(&token, NOW).unwrap_err();
    assert_eq!(err.code(), ErrorCode::WrongRoot, "{err}");
}

#[test]
fn attenuation_narrows_rights_expiry_and_agent() {
    let m = minter();
    let token = m.mint_at(&claims(), NOW).unwrap();
    let narrower = attenuate(
        &token,
        &Attenuation {
            rights: Some(vec![
                Right::new("echo", "echo"),
                Right::new("agent/b*", "ping"),
            ]),
            expires: Some(NOW + 60),
            agent: Some("a1/worker".into()),
            vm: None,
        },
    )
    .unwrap();
    let v = verifier(&m).verify_at(&narrower, NOW).unwrap();
    assert_eq!(v.blocks, 2);
    assert_eq!(v.claims.agent, "a1/worker");
    assert_eq!(v.claims.vm, "vm7");
    assert_eq!(v.claims.expires, NOW + 60);
    assert_eq!(
        v.claims.rights,
        vec![Right::new("echo", "echo"), Right::new("agent/b*", "ping")]
    );
    // The narrower expiry is enforced.
    let err = verifier(&m).verify_at(&narrower, NOW + 60).unwrap_err();
    assert_eq!(err.code(), ErrorCode::TokenExpired);
    // A second block narrows again; a block without rights keeps them.
    let again = attenuate(
        &narrower,
        &Attenuation {
            expires: Some(NOW + 30),
            ..Attenuation::default()
        },
    )
    .unwrap();
    let v = verifier(&m).verify_at(&again, NOW).unwrap();
    assert_eq!(v.claims.rights.len(), 2);
    assert_eq!(v.claims.expires, NOW + 30);
}

#[test]
fn attenuate_refuses_to_widen_locally() {
    let m = minter();
    let token = m.mint_at(&claims(), NOW).unwrap();
    for a in [
        Attenuation {
            rights: Some(vec![Right::all()]),
            ..Attenuation::default()
        },
        Attenuation {
            rights: Some(vec![Right::new("echo*", "*")]),
            ..Attenuation::default()
        },
        Attenuation {
            expires: Some(NOW + 7200),
            ..Attenuation::default()
        },
        Attenuation {
            agent: Some("a2".into()),
            ..Attenuation::default()
        },
        Attenuation {
            agent: Some("a1x/y".into()),
            ..Attenuation::default()
        },
        Attenuation {
            vm: Some("vm8".into()),
            ..Attenuation::default()
        },
    ] {
        let err = attenuate(&token, &a).unwrap_err();
        assert_eq!(err.code(), ErrorCode::AttenuationWidens, "{a:?}: {err}");
    }
}

/// A malicious holder appends a block with biscuit directly.
fn append_raw(token: &[u8], code: &str) -> Vec<u8> {
    UnverifiedBiscuit::from(token)
        .unwrap()
        .append(BlockBuilder::new().code(code).unwrap())
        .unwrap()
        .to_vec()
        .unwrap()
}

#[test]
fn a_widening_block_is_attenuation_widens() {
    let m = minter();
    let token = m.mint_at(&claims(), NOW).unwrap();
    let v = verifier(&m);
    for code in [
        r#"right("*", "*");"#,
        r#"right("kv", "get");"#,
        r#"expires(1900007200);"#,
        r#"agent("root");"#,
        r#"vm("*");"#,
    ] {
        let wide = append_raw(&token, code);
        let err = v.verify_at(&wide, NOW).unwrap_err();
        assert_eq!(err.code(), ErrorCode::AttenuationWidens, "{code}: {err}");
    }
    // A later block cannot restore what an earlier one removed.
    let narrow = append_raw(&token, r#"right("echo", "echo");"#);
    let wide = append_raw(&narrow, r#"right("echo", "*");"#);
    assert_eq!(
        v.verify_at(&wide, NOW).unwrap_err().code(),
        ErrorCode::AttenuationWidens
    );
}

#[test]
fn rules_and_foreign_checks_are_handled() {
    let m = minter();
    let token = m.mint_at(&claims(), NOW).unwrap();
    let v = verifier(&m);
    let ruled = append_raw(&token, r#"right($s, $m) <- right($s, $m);"#);
    assert_eq!(
        v.verify_at(&ruled, NOW).unwrap_err().code(),
        ErrorCode::TokenInvalid
    );
    // A block's own failing check refuses the token.
    let checked = append_raw(&token, r#"check if never("true");"#);
    assert_eq!(
        v.verify_at(&checked, NOW).unwrap_err().code(),
        ErrorCode::TokenInvalid
    );
    // A block's own time check is an expiry.
    let timed = append_raw(&token, "check if time($t), $t < 2030-01-01T00:00:00Z;");
    assert!(v.verify_at(&timed, 1_800_000_000).is_ok());
    let err = v.verify_at(&timed, 1_900_000_000).unwrap_err();
    assert_eq!(err.code(), ErrorCode::TokenExpired, "{err}");
}

#[test]
fn rotation_keeps_old_tokens_until_the_grace_ends() {
    let dir = tempfile::tempdir().unwrap();
    let mut ks = KeyStore::open_with(dir.path(), 3600, NOW).unwrap();
    let old = ks.minter().mint_at(&claims(), NOW).unwrap();
    let verifier = Verifier::new(RingSource::watch(&KeyStore::ring_path(dir.path())).unwrap());
    assert!(verifier.verify_at(&old, NOW + 10).is_ok());
    // Rotate in "another process": the verifier reloads the ring on the
    // unknown key id of the new token.
    let mut other = KeyStore::open(dir.path()).unwrap();
    other.rotate(NOW + 100).unwrap();
    let mut c = claims();
    c.expires = NOW + 200;
    let new = other.minter().mint_at(&c, NOW + 100).unwrap();
    assert!(verifier.verify_at(&new, NOW + 150).is_ok());
    assert!(verifier.verify_at(&old, NOW + 150).is_ok());
    // The old key is trusted until rotation + max TTL; the old token expires first anyway.
    let err = verifier.verify_at(&old, NOW + 100 + 3600).unwrap_err();
    assert_eq!(err.code(), ErrorCode::WrongRoot, "{err}");
    ks = KeyStore::open(dir.path()).unwrap();
    assert_eq!(ks.signing_key_id(), other.signing_key_id());
}

fn token_codes() -> [ErrorCode; 5] {
    [
        ErrorCode::TokenExpired,
        ErrorCode::TokenInvalid,
        ErrorCode::WrongRoot,
        ErrorCode::AttenuationWidens,
        ErrorCode::AgentMismatch,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let m = minter();
        match verifier(&m).verify_at(&bytes, NOW) {
            Ok(v) => prop_assert!(false, "random bytes verified: {v:?}"),
            Err(e) => prop_assert!(token_codes().contains(&e.code()), "{e}"),
        }
        let _ = attenuate(&bytes, &Attenuation::default());
    }

    #[test]
    fn mutated_tokens_never_panic_nor_widen(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let m = minter();
        let token = m.mint_at(&claims(), NOW).unwrap();
        let mut bad = token.clone();
        for (i, b) in flips {
            let i = i.index(bad.len());
            bad[i] ^= b | 1;
        }
        let v = verifier(&m);
        if let Ok(ok) = v.verify_at(&bad, NOW) {
            // Only flips the signature does not cover (such as the key id
            // hint being rewritten to itself) can verify, and then they must
            // grant exactly what was minted.
            prop_assert_eq!(ok.claims, claims());
        }
        let short = &token[..cut.index(token.len())];
        prop_assert!(v.verify_at(short, NOW).is_err());
    }
}

#[test]
fn vm_and_sub_agent_narrowing() {
    let m = minter();
    let mut c = claims();
    c.vm = ANY_VM.into();
    let token = m.mint_at(&c, NOW).unwrap();
    let bound = attenuate(
        &token,
        &Attenuation {
            vm: Some("vm9".into()),
            agent: Some("a1/w".into()),
            ..Attenuation::default()
        },
    )
    .unwrap();
    let v = verifier(&m).verify_at(&bound, NOW).unwrap();
    assert_eq!(
        (v.claims.vm.as_str(), v.claims.agent.as_str()),
        ("vm9", "a1/w")
    );
    // Bound to a VM, it stays there; a sub-agent's sub-agent is fine.
    let err = attenuate(
        &bound,
        &Attenuation {
            vm: Some(ANY_VM.into()),
            ..Attenuation::default()
        },
    )
    .unwrap_err();
    assert_eq!(err.code(), ErrorCode::AttenuationWidens);
    let deeper = attenuate(
        &bound,
        &Attenuation {
            agent: Some("a1/w/x".into()),
            ..Attenuation::default()
        },
    )
    .unwrap();
    assert_eq!(
        verifier(&m).verify_at(&deeper, NOW).unwrap().claims.agent,
        "a1/w/x"
    );
    // An empty sub-agent suffix is not a sub-agent: another identity.
    let wide = append_raw(&token, r#"agent("a1/");"#);
    assert_eq!(
        verifier(&m).verify_at(&wide, NOW).unwrap_err().code(),
        ErrorCode::AttenuationWidens
    );
}

fn pattern() -> impl Strategy<Value = String> {
    // A small alphabet so that covering pairs are common.
    "[ab/]{0,3}\\*?".prop_filter("non-empty", |s| !s.is_empty())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    /// The widening check is sound: a pattern that covers another matches
    /// every name the other matches, so an attenuation can never grant a
    /// name its parent did not.
    #[test]
    fn covering_patterns_match_a_superset(outer in pattern(), inner in pattern(), name in "[ab/]{0,5}") {
        let outer_r = Right::new(outer.clone(), "*");
        let inner_r = Right::new(inner.clone(), "*");
        if pattern_covers(&outer, &inner) && inner_r.permits(&name, "m") {
            prop_assert!(outer_r.permits(&name, "m"), "{outer} covers {inner} but not {name}");
        }
    }
}
