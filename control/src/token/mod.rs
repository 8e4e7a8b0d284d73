// SPDX-License-Identifier: Apache-2.0
//! SYPAS capability tokens: biscuit tokens (crate `biscuit-auth`) signed by the
//! cluster's root key, verified offline with the public keys of the
//! [`keys::KeyRing`], and attenuated by their holders.
//!
//! # What a token says (docs/SYPAS.md §13)
//!
//! The authority block, minted with the root key:
//!
//! ```text
//! agent("a1");                 // exactly one: the agent id
//! vm("vm7");                   // exactly one: the VM id, or "*" for any
//! right("echo", "*");          // zero or more (service, method) patterns
//! expires(1767225600);         // exactly one: Unix seconds
//! check if time($t), $t < 2026-01-01T00:00:00Z;   // the same expiry, for any biscuit verifier
//! ```
//!
//! An attenuation block, appended by a holder with [`attenuate`], may state:
//!
//! - `right(s, m)` facts: the block's rights. Each must be covered by the
//!   rights in force before the block; the block's set then replaces them.
//!   A block without `right` facts keeps them.
//! - `expires(t)`: at most the expiry in force; the earliest wins.
//! - `agent(id)`: a sub-agent, `<agent in force>/<suffix>`.
//! - `vm(id)`: only where the VM in force is `*`, or the same VM.
//!
//! Anything else a block claims beyond that is refused with
//! `ATTENUATION_WIDENS`. Each block's facts are read from that block alone
//! (through biscuit's own printer and parser), so a later holder cannot
//! speak for an earlier block. Blocks may carry biscuit checks of their own;
//! they are evaluated at HELLO and REFRESH with the time as `time($t)`. Rules
//! are not allowed in any block. Third-party blocks are not supported.

pub mod keys;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use biscuit_auth::builder::{Term, date, fact, int, string};
use biscuit_auth::builder_ext::AuthorizerExt;
use biscuit_auth::error::{Format, Logic, RunLimit, Token as BiscuitError};
use biscuit_auth::{AuthorizerBuilder, AuthorizerLimits, Biscuit, BlockBuilder, KeyPair};
use biscuit_auth::{PublicKey, UnverifiedBiscuit};
use cell0_proto::ErrorCode;
use cell0_proto::msg::Right;

use self::keys::{KeyRing, RingMiss, RingSource};

/// Largest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;
/// Most blocks (authority included) a token may have.
pub const MAX_BLOCKS: usize = 16;
/// The VM id that matches every VM.
pub const ANY_VM: &str = "*";
/// Longest agent id, VM id or pattern.
pub const MAX_NAME: usize = 256;

/// What a token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The agent id.
    pub agent: String,
    /// The VM id, or [`ANY_VM`].
    pub vm: String,
    /// Granted (service, method) patterns.
    pub rights: Vec<Right>,
    /// Expiry, Unix seconds.
    pub expires: u64,
}

/// A verified token: its effective claims after every attenuation block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The effective claims.
    pub claims: Claims,
    /// The root key that signed it.
    pub root_key_id: u32,
    /// Blocks, the authority included.
    pub blocks: usize,
}

/// What an attenuation block narrows. `None` fields keep what is in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attenuation {
    /// The rights the new token keeps (each covered by the parent's).
    pub rights: Option<Vec<Right>>,
    /// An earlier expiry.
    pub expires: Option<u64>,
    /// A sub-agent id, `<parent agent>/<suffix>`.
    pub agent: Option<String>,
    /// A VM, where the parent's is `*`.
    pub vm: Option<String>,
}

/// Why a token was not minted, attenuated or accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token's expiry has passed.
    #[error("the token expired at {expires} (now {now})")]
    Expired {
        /// Expiry in force, Unix seconds.
        expires: u64,
        /// The time of the check.
        now: u64,
    },
    /// A time check in one of the token's blocks fails.
    #[error("the token has expired: {0}")]
    ExpiredCheck(String),
    /// The token does not parse, or does not say what a SYPAS token says.
    #[error("the token is invalid: {0}")]
    Invalid(String),
    /// The signature chain does not verify under the root key the token names.
    #[error("the token's signature does not verify (forged or altered)")]
    BadSignature,
    /// No trusted root key signed the token.
    #[error("the token is not signed by a root key this host trusts: {0}")]
    WrongRoot(String),
    /// An attenuation block claims more than the token it extends.
    #[error("attenuation block {block} widens the token: {what}")]
    Widens {
        /// The block's index (1 = first attenuation block).
        block: usize,
        /// What it tries to widen.
        what: String,
    },
    /// A claim to mint or attenuate is not acceptable.
    #[error("cannot mint this token: {0}")]
    BadClaims(String),
    /// The checks ran out of time: the host is overloaded, not the token bad.
    #[error("the token's checks did not finish in time; retry")]
    Overloaded,
    /// biscuit failed to build or serialize the token.
    #[error("biscuit failed: {0}")]
    Biscuit(String),
}

impl TokenError {
    /// The SYPAS error code a HELLO or REFRESH refused for this reason gets.
    pub fn code(&self) -> ErrorCode {
        match self {
            TokenError::Expired { .. } | TokenError::ExpiredCheck(_) => ErrorCode::TokenExpired,
            TokenError::Invalid(_) | TokenError::BadSignature => ErrorCode::TokenInvalid,
            TokenError::WrongRoot(_) => ErrorCode::WrongRoot,
            TokenError::Widens { .. } => ErrorCode::AttenuationWidens,
            TokenError::BadClaims(_) => ErrorCode::BadRequest,
            TokenError::Overloaded => ErrorCode::Busy,
            TokenError::Biscuit(_) => ErrorCode::Internal,
        }
    }
}

fn biscuit_err(e: BiscuitError) -> TokenError {
    TokenError::Biscuit(e.to_string())
}

/// Whether `name` is a valid agent id, VM id, service or method: 1 to 256
/// characters from `A-Z a-z 0-9 . _ - / : @ + =`, with `*` allowed only as
/// the last character when `pattern` is set.
pub fn valid_name(name: &str, pattern: bool) -> bool {
    let body = match name.strip_suffix('*') {
        Some(prefix) if pattern => prefix,
        _ => name,
    };
    !name.is_empty()
        && name.len() <= MAX_NAME
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@+=".contains(&b))
}

/// Whether pattern `outer` covers every name pattern `inner` matches.
pub fn pattern_covers(outer: &str, inner: &str) -> bool {
    match outer.strip_suffix('*') {
        Some(prefix) => inner.starts_with(prefix),
        None => outer == inner,
    }
}

/// Whether some right in `set` covers `right`.
pub fn rights_cover(set: &[Right], right: &Right) -> bool {
    set.iter().any(|r| {
        pattern_covers(&r.service, &right.service) && pattern_covers(&r.method, &right.method)
    })
}

fn system_time(unix: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix)
}

fn check_claims(c: &Claims) -> Result<(), TokenError> {
    if !valid_name(&c.agent, false) {
        return Err(TokenError::BadClaims(format!(
            "agent id {:?} is not a valid name",
            c.agent
        )));
    }
    if c.vm != ANY_VM && !valid_name(&c.vm, false) {
        return Err(TokenError::BadClaims(format!(
            "VM id {:?} is not valid",
            c.vm
        )));
    }
    for r in &c.rights {
        if !valid_name(&r.service, true) || !valid_name(&r.method, true) {
            return Err(TokenError::BadClaims(format!(
                "right ({:?}, {:?}) is not a valid pattern",
                r.service, r.method
            )));
        }
    }
    if c.expires == 0 || c.expires > i64::MAX as u64 {
        return Err(TokenError::BadClaims("the expiry must be set".into()));
    }
    Ok(())
}

/// Mints tokens with a root key.
pub struct Minter {
    root: KeyPair,
    key_id: u32,
    max_ttl: u64,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minter")
            .field("key_id", &format_args!("{:#010x}", self.key_id))
            .field("max_ttl", &self.max_ttl)
            .finish_non_exhaustive()
    }
}

impl Minter {
    /// A minter for `root`; tokens may live at most `max_ttl` seconds.
    pub fn new(root: KeyPair, max_ttl: u64) -> Minter {
        let key_id = keys::key_id(&root.public());
        Minter {
            root,
            key_id,
            max_ttl,
        }
    }

    /// The root public key (all a verifier needs).
    pub fn public_key(&self) -> PublicKey {
        self.root.public()
    }

    /// The root key id tokens carry.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// Mints a token for `claims`, refusing an expiry further than the
    /// maximum lifetime from now.
    pub fn mint(&self, claims: &Claims) -> Result<Vec<u8>, TokenError> {
        self.mint_at(claims, keys::unix_now())
    }

    /// [`mint`](Self::mint) with the time given.
    pub fn mint_at(&self, claims: &Claims, now: u64) -> Result<Vec<u8>, TokenError> {
        check_claims(claims)?;
        if claims.expires > now.saturating_add(self.max_ttl) {
            return Err(TokenError::BadClaims(format!(
                "a token may live at most {} s",
                self.max_ttl
            )));
        }
        let expires = i64::try_from(claims.expires)
            .map_err(|_| TokenError::BadClaims("expiry out of range".into()))?;
        let mut b = Biscuit::builder()
            .root_key_id(self.key_id)
            .fact(fact("agent", &[string(&claims.agent)]))
            .and_then(|b| b.fact(fact("vm", &[string(&claims.vm)])))
            .and_then(|b| b.fact(fact("expires", &[int(expires)])))
            .map_err(biscuit_err)?;
        for r in &claims.rights {
            b = b
                .fact(fact("right", &[string(&r.service), string(&r.method)]))
                .map_err(biscuit_err)?;
        }
        let b = b.merge(expiry_check(claims.expires)?);
        b.build(&self.root)
            .and_then(|t| t.to_vec())
            .map_err(biscuit_err)
    }
}

fn expiry_check(expires: u64) -> Result<BlockBuilder, TokenError> {
    let params = HashMap::from([("exp".to_string(), date(&system_time(expires)))]);
    BlockBuilder::new()
        .code_with_params("check if time($t), $t < {exp}", params, HashMap::new())
        .map_err(biscuit_err)
}

/// What one block states, read from that block alone.
#[derive(Debug, Default)]
struct BlockClaims {
    agent: Vec<String>,
    vm: Vec<String>,
    rights: Vec<Right>,
    expires: Vec<u64>,
}

fn term_str(t: &Term) -> Option<&str> {
    match t {
        Term::Str(s) => Some(s),
        _ => None,
    }
}

/// Reads the SYPAS facts of one block from its datalog source.
fn block_claims(index: usize, source: &str) -> Result<BlockClaims, TokenError> {
    let invalid = |what: String| TokenError::Invalid(format!("block {index}: {what}"));
    let parsed = BlockBuilder::new()
        .code(source)
        .map_err(|e| invalid(format!("does not parse ({e})")))?;
    if !parsed.rules.is_empty() {
        return Err(invalid("rules are not allowed in SYPAS tokens".into()));
    }
    let mut out = BlockClaims::default();
    for f in parsed.facts {
        let p = f.predicate;
        let terms = p.terms.as_slice();
        match (p.name.as_str(), terms) {
            ("agent", [t]) => out.agent.push(
                term_str(t)
                    .filter(|s| valid_name(s, false))
                    .ok_or_else(|| invalid("agent(...) is not a valid name".into()))?
                    .to_owned(),
            ),
            ("vm", [t]) => out.vm.push(
                term_str(t)
                    .filter(|s| *s == ANY_VM || valid_name(s, false))
                    .ok_or_else(|| invalid("vm(...) is not a valid name".into()))?
                    .to_owned(),
            ),
            ("right", [s, m]) => {
                let (Some(s), Some(m)) = (term_str(s), term_str(m)) else {
                    return Err(invalid("right(...) takes two strings".into()));
                };
                if !valid_name(s, true) || !valid_name(m, true) {
                    return Err(invalid(format!(
                        "right({s:?}, {m:?}) is not a valid pattern"
                    )));
                }
                out.rights.push(Right::new(s, m));
            }
            ("expires", [Term::Integer(t)]) if *t > 0 => out.expires.push(*t as u64),
            ("agent" | "vm" | "right" | "expires", _) => {
                return Err(invalid(format!("malformed {}(...) fact", p.name)));
            }
            // Facts a SYPAS router does not read cannot grant anything.
            _ => {}
        }
    }
    Ok(out)
}

/// Folds the blocks into effective claims, refusing a widening block.
fn effective_claims(
    count: usize,
    mut source: impl FnMut(usize) -> Result<String, BiscuitError>,
) -> Result<Claims, TokenError> {
    if count > MAX_BLOCKS {
        return Err(TokenError::Invalid(format!(
            "{count} blocks; at most {MAX_BLOCKS} are accepted"
        )));
    }
    let src = |i, source: &mut dyn FnMut(usize) -> Result<String, BiscuitError>| {
        source(i).map_err(|e| TokenError::Invalid(format!("block {i}: {e}")))
    };
    let authority = block_claims(0, &src(0, &mut source)?)?;
    let one = |v: Vec<String>, what: &str| -> Result<String, TokenError> {
        match <[String; 1]>::try_from(v) {
            Ok([x]) => Ok(x),
            Err(v) => Err(TokenError::Invalid(format!(
                "the authority block states {} {what}(...) facts; exactly one is required",
                v.len()
            ))),
        }
    };
    let mut claims = Claims {
        agent: one(authority.agent, "agent")?,
        vm: one(authority.vm, "vm")?,
        rights: authority.rights,
        expires: match authority.expires.as_slice() {
            [e] => *e,
            v => {
                return Err(TokenError::Invalid(format!(
                    "the authority block states {} expires(...) facts; exactly one is required",
                    v.len()
                )));
            }
        },
    };
    for i in 1..count {
        let block = block_claims(i, &src(i, &mut source)?)?;
        claims = narrow(claims, i, block)?;
    }
    Ok(claims)
}

/// Applies one attenuation block to the claims in force.
fn narrow(mut claims: Claims, i: usize, b: BlockClaims) -> Result<Claims, TokenError> {
    let widens = |what: String| TokenError::Widens { block: i, what };
    if b.agent.len() > 1 || b.vm.len() > 1 {
        return Err(TokenError::Invalid(format!(
            "block {i} states more than one agent(...) or vm(...)"
        )));
    }
    if let Some(agent) = b.agent.into_iter().next() {
        let sub = agent
            .strip_prefix(claims.agent.as_str())
            .and_then(|rest| rest.strip_prefix('/'));
        if sub.is_none_or(str::is_empty) {
            return Err(widens(format!(
                "agent {agent:?} is not a sub-agent of {:?}",
                claims.agent
            )));
        }
        claims.agent = agent;
    }
    if let Some(vm) = b.vm.into_iter().next() {
        if claims.vm != ANY_VM && vm != claims.vm {
            return Err(widens(format!("VM {vm:?} is not VM {:?}", claims.vm)));
        }
        claims.vm = vm;
    }
    if !b.rights.is_empty() {
        if let Some(r) = b.rights.iter().find(|r| !rights_cover(&claims.rights, r)) {
            return Err(widens(format!(
                "right ({:?}, {:?}) is not covered by the rights in force",
                r.service, r.method
            )));
        }
        claims.rights = b.rights;
    }
    for e in b.expires {
        if e > claims.expires {
            return Err(widens(format!(
                "expiry {e} is later than {}",
                claims.expires
            )));
        }
        claims.expires = e;
    }
    Ok(claims)
}

/// Appends an attenuation block to `token`. No key is needed. The block is
/// checked against the token's effective claims first, so a holder learns at
/// once (with [`TokenError::Widens`]) that a verifier would refuse it.
pub fn attenuate(token: &[u8], a: &Attenuation) -> Result<Vec<u8>, TokenError> {
    let t = UnverifiedBiscuit::from(token)
        .map_err(|e| TokenError::Invalid(format!("does not parse ({e})")))?;
    let claims = effective_claims(t.block_count(), |i| t.print_block_source(i))?;
    let mut block = BlockClaims::default();
    let mut b = BlockBuilder::new();
    if let Some(agent) = &a.agent {
        if !valid_name(agent, false) {
            return Err(TokenError::BadClaims(format!(
                "agent id {agent:?} is not valid"
            )));
        }
        block.agent.push(agent.clone());
        b = b
            .fact(fact("agent", &[string(agent)]))
            .map_err(biscuit_err)?;
    }
    if let Some(vm) = &a.vm {
        if vm != ANY_VM && !valid_name(vm, false) {
            return Err(TokenError::BadClaims(format!("VM id {vm:?} is not valid")));
        }
        block.vm.push(vm.clone());
        b = b.fact(fact("vm", &[string(vm)])).map_err(biscuit_err)?;
    }
    if let Some(rights) = &a.rights {
        if rights.is_empty() {
            // An empty list cannot be stated as facts; keep nothing with a
            // right no name matches instead.
            return Err(TokenError::BadClaims(
                "an attenuation keeps at least one right".into(),
            ));
        }
        for r in rights {
            if !valid_name(&r.service, true) || !valid_name(&r.method, true) {
                return Err(TokenError::BadClaims(format!(
                    "right ({:?}, {:?}) is not a valid pattern",
                    r.service, r.method
                )));
            }
            block.rights.push(r.clone());
            b = b
                .fact(fact("right", &[string(&r.service), string(&r.method)]))
                .map_err(biscuit_err)?;
        }
    }
    if let Some(exp) = a.expires {
        let e = i64::try_from(exp)
            .ok()
            .filter(|e| *e > 0)
            .ok_or_else(|| TokenError::BadClaims("expiry out of range".into()))?;
        block.expires.push(exp);
        b = b.fact(fact("expires", &[int(e)])).map_err(biscuit_err)?;
        b = b.merge(expiry_check(exp)?);
    }
    narrow(claims, t.block_count(), block)?;
    t.append(b).and_then(|t| t.to_vec()).map_err(biscuit_err)
}

/// Verifies tokens offline against a key ring.
#[derive(Debug)]
pub struct Verifier {
    ring: RingSource,
    limits: AuthorizerLimits,
}

impl Verifier {
    /// A verifier over a ring source.
    pub fn new(ring: RingSource) -> Verifier {
        Verifier {
            ring,
            limits: AuthorizerLimits {
                max_facts: 1000,
                max_iterations: 100,
                // A wall-clock bound, so generous: a loaded host must not
                // refuse good tokens. Blocks hold no rules (refused before
                // this runs) and at most 64 KiB of checks, so the fact and
                // iteration limits are what bound the work.
                max_time: Duration::from_secs(1),
            },
        }
    }

    /// A verifier trusting exactly one public key, forever.
    pub fn with_key(public: PublicKey) -> Verifier {
        Verifier::new(RingSource::fixed(KeyRing::single(public, u64::MAX)))
    }

    /// The ring in use now.
    pub fn ring(&self) -> std::sync::Arc<KeyRing> {
        self.ring.current(false)
    }

    /// Verifies `token` at the current time.
    pub fn verify(&self, token: &[u8]) -> Result<Verified, TokenError> {
        self.verify_at(token, keys::unix_now())
    }

    /// Verifies `token` at `now` (Unix seconds): size, root key, signatures,
    /// the SYPAS facts of every block (refusing a widening one), expiry, and
    /// the blocks' own biscuit checks.
    pub fn verify_at(&self, token: &[u8], now: u64) -> Result<Verified, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Invalid("no token was sent".into()));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Invalid(format!(
                "{} bytes; at most {MAX_TOKEN_BYTES} are accepted",
                token.len()
            )));
        }
        let biscuit = self.parse(token, now)?;
        if biscuit.external_public_keys().iter().any(Option::is_some) {
            return Err(TokenError::Invalid(
                "third-party blocks are not supported".into(),
            ));
        }
        let claims = effective_claims(biscuit.block_count(), |i| biscuit.print_block_source(i))?;
        if now >= claims.expires {
            return Err(TokenError::Expired {
                expires: claims.expires,
                now,
            });
        }
        self.run_checks(&biscuit, now)?;
        Ok(Verified {
            claims,
            root_key_id: biscuit.root_key_id().unwrap_or_default(),
            blocks: biscuit.block_count(),
        })
    }

    fn parse(&self, token: &[u8], now: u64) -> Result<Biscuit, TokenError> {
        let attempt = |ring: &KeyRing| {
            let miss = std::cell::Cell::new(None);
            let r = Biscuit::from(token, |id: Option<u32>| {
                ring.choose(id, now).map_err(|m| {
                    miss.set(Some(m));
                    Format::UnknownPublicKey
                })
            });
            (r, miss.get())
        };
        let (mut result, mut miss) = attempt(&self.ring.current(false));
        if matches!(miss, Some(RingMiss::Unknown(_))) {
            // Perhaps a rotation by another process: read the ring again.
            (result, miss) = attempt(&self.ring.current(true));
        }
        match (result, miss) {
            (Ok(b), _) => Ok(b),
            (Err(_), Some(RingMiss::NoKeyId)) => {
                Err(TokenError::WrongRoot("it names no root key id".into()))
            }
            (Err(_), Some(RingMiss::Unknown(id))) => Err(TokenError::WrongRoot(format!(
                "root key {id:#010x} is not in the key ring"
            ))),
            (Err(_), Some(RingMiss::Retired(id))) => Err(TokenError::WrongRoot(format!(
                "root key {id:#010x} was retired and its grace period is over"
            ))),
            (Err(BiscuitError::Format(Format::Signature(_) | Format::SealedSignature)), None) => {
                Err(TokenError::BadSignature)
            }
            (Err(e), None) => Err(TokenError::Invalid(format!("does not parse ({e})"))),
        }
    }

    fn run_checks(&self, biscuit: &Biscuit, now: u64) -> Result<(), TokenError> {
        let authorizer = AuthorizerBuilder::new()
            .fact(fact("time", &[date(&system_time(now))]))
            .map_err(biscuit_err)?
            .allow_all()
            .set_limits(self.limits.clone())
            .build(biscuit);
        let result = authorizer.and_then(|mut a| a.authorize_with_limits(self.limits.clone()));
        match result {
            Ok(_) => Ok(()),
            Err(BiscuitError::FailedLogic(
                Logic::Unauthorized { checks, .. } | Logic::NoMatchingPolicy { checks },
            )) => {
                let text: Vec<String> = checks.iter().map(ToString::to_string).collect();
                let text = text.join("; ");
                if text.contains("time(") {
                    Err(TokenError::ExpiredCheck(text))
                } else {
                    Err(TokenError::Invalid(format!("a check failed: {text}")))
                }
            }
            Err(BiscuitError::RunLimit(RunLimit::Timeout)) => Err(TokenError::Overloaded),
            Err(e) => Err(TokenError::Invalid(format!("checks cannot run ({e})"))),
        }
    }
}

#[cfg(test)]
mod tests;
