// SPDX-License-Identifier: Apache-2.0
//! The `cell0.node` service of the router: bootstrap and readiness of a VM's
//! guest agent (`cell0-agent`, docs/GUEST-AGENT.md).
//!
//! Which VMs run `cell0-agent` comes from a [`GuestAgentSource`] (in `cell0d
//! serve`: the replicated VM records, [`crate::store::Store`]; in `cell0d
//! node`: the records placed on the node, [`crate::node::Placements`]: every
//! VM that does not boot the nano guest), or from an explicit registration
//! ([`Router::set_agent_bootstrap`](super::Router::set_agent_bootstrap)).
//! On a VM's own listener, and only there, a token-less HELLO is granted
//! exactly one right, `("cell0.node", "bootstrap")`; the `bootstrap` CALL is
//! answered with the token and workload registered for *the listener's* VM,
//! never for a VM the caller names. The agent then reconnects with HELLO and
//! the token. A VM with no registration (the nano guest) gets
//! `PERMISSION_DENIED` for a token-less HELLO.
//!
//! Such a bootstrap session is never reachable as `agent/<id>`, may not
//! REFRESH into a full session, and may call nothing else.

use std::time::{Duration, Instant};

use bytes::Bytes;
use cell0_agent::api;
use cell0_proto::host::Grant;
use cell0_proto::msg::Right;

pub use cell0_agent::api::{Command, ExecReply, ExecRequest, NODE_SERVICE, Ready};

/// How long the token handed out at bootstrap lives. The agent bootstraps
/// again when a HELLO with it is refused.
pub const GUEST_TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);

/// What the control plane says a VM's guest agent is.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestAgent {
    /// The agent id.
    pub agent_id: String,
    /// The rights of its VM spec (the agent's own are added at minting).
    pub rights: Vec<Right>,
    /// Its workload.
    pub workload: Option<Command>,
}

/// Tells the router which VMs run a guest agent, and what it is.
pub trait GuestAgentSource: Send + Sync + 'static {
    /// The guest agent of VM `vm`, if that VM has one.
    fn guest_agent(&self, vm: &str) -> Option<GuestAgent>;
}

/// Every VM that does not boot the nano guest runs `cell0-agent`: agent id,
/// rights and workload (`command`) from its spec.
fn of_spec(spec: &crate::spec::VmSpec) -> Option<GuestAgent> {
    if spec.is_nano() {
        return None;
    }
    Some(GuestAgent {
        agent_id: spec.agent_id.clone(),
        rights: spec
            .rights
            .iter()
            .map(|r| Right::new(r.service.clone(), r.method.clone()))
            .collect(),
        workload: (!spec.command.is_empty()).then(|| Command {
            argv: spec.command.clone(),
            ..Command::default()
        }),
    })
}

/// A member's router: the replicated VM records.
impl GuestAgentSource for crate::store::Store {
    fn guest_agent(&self, vm: &str) -> Option<GuestAgent> {
        self.read(|s| s.vms.get(vm).and_then(|r| of_spec(&r.spec)))
    }
}

/// A `cell0d node`'s router: the VM records placed on the node, from the
/// leader's heartbeat answers.
impl GuestAgentSource for crate::node::Placements {
    fn guest_agent(&self, vm: &str) -> Option<GuestAgent> {
        self.with_record(vm, |r| of_spec(&r.spec)).flatten()
    }
}

/// What a VM's guest agent is told at bootstrap.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentBootstrap {
    /// The agent id (its `agent/<id>` address and EVENT topics).
    pub agent_id: String,
    /// Its capability token (biscuit bytes), bound to this VM.
    pub token: Bytes,
    /// The workload to start; `None`: none.
    pub workload: Option<Command>,
    /// Heartbeat EVENT period in ms (0: the agent's default, 5 s).
    pub heartbeat_ms: u32,
}

/// What the router knows about a VM's guest agent.
#[derive(Debug, Clone, Default)]
pub struct AgentStatus {
    /// The agent id registered for the VM.
    pub agent_id: String,
    /// `bootstrap` calls answered for this VM.
    pub bootstraps: u64,
    /// The last `ready` the agent sent.
    pub ready: Option<Ready>,
    /// When it came.
    pub ready_at: Option<Instant>,
    /// Heartbeat EVENTs seen.
    pub heartbeats: u64,
    /// When the last one came.
    pub last_heartbeat: Option<Instant>,
}

impl AgentStatus {
    /// Time since the last heartbeat, if one came.
    pub fn heartbeat_age(&self) -> Option<Duration> {
        self.last_heartbeat.map(|t| t.elapsed())
    }
}

/// A VM's registration and what was seen of its agent.
#[derive(Debug, Clone, Default)]
pub(crate) struct VmAgent {
    /// An explicit registration (else the source's answer is minted at bootstrap).
    pub(crate) boot: Option<AgentBootstrap>,
    /// The last token minted from the source's answer, and when.
    pub(crate) minted: Option<(AgentBootstrap, Instant)>,
    pub(crate) status: AgentStatus,
}

/// The grant of a token-less HELLO on a VM listener with a registration.
pub(crate) fn bootstrap_grant() -> Grant {
    Grant {
        rights: vec![api::bootstrap_right()],
        token_expiry: 0,
    }
}

/// Whether `g` is the bootstrap grant (no token behind it: tokens always expire).
pub(crate) fn is_bootstrap(g: &Grant) -> bool {
    g.token_expiry == 0 && g.rights.len() == 1 && g.rights[0] == api::bootstrap_right()
}

/// The rights a guest agent needs besides those of its VM spec: `ready`, and
/// publishing on its own topics `agent/<id>/…`.
pub fn agent_rights(agent_id: &str) -> Vec<Right> {
    vec![
        Right::new(NODE_SERVICE, api::M_READY),
        Right::new(
            format!("{}agent/{agent_id}/*", super::EVENT_PREFIX),
            "publish",
        ),
    ]
}

/// The `bootstrap` reply for a registration.
pub(crate) fn bootstrap_reply(b: &AgentBootstrap) -> api::BootstrapReply {
    api::BootstrapReply {
        agent_id: b.agent_id.clone(),
        token: b.token.clone(),
        workload: b.workload.clone(),
        heartbeat_ms: b.heartbeat_ms,
    }
}

/// The agent's method names (`agent/<id>/<method>`).
pub use cell0_agent::api::{M_EXEC, M_SHUTDOWN};

/// The file, beside a VM's listener, that its agent's workload output
/// (stdout and stderr EVENTs) is appended to: `cell0ctl logs --agent`.
pub const AGENT_LOG: &str = "agent.log";

/// The most bytes [`AGENT_LOG`] grows to; output past it is dropped (and
/// counted in one last line), so a guest cannot fill the host's disk.
pub const AGENT_LOG_MAX: u64 = 64 << 20;

/// Whether `topic` is agent `agent`'s stdout or stderr topic.
pub(crate) fn is_output(topic: &str, agent: &str) -> bool {
    topic
        .strip_prefix("agent/")
        .and_then(|t| t.strip_prefix(agent))
        .is_some_and(|t| t == "/stdout" || t == "/stderr")
}

/// Appends `data` to the agent log `path`, up to [`AGENT_LOG_MAX`]. The
/// first write that would pass the limit leaves a note instead.
pub(crate) fn append_output(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let len = f.metadata()?.len();
    if len >= AGENT_LOG_MAX {
        return Ok(());
    }
    if len + data.len() as u64 > AGENT_LOG_MAX {
        return f.write_all(b"\n[cell0d: agent log limit reached; later output dropped]\n");
    }
    f.write_all(data)
}

/// Whether `topic` is agent `agent`'s heartbeat topic.
pub(crate) fn is_heartbeat(topic: &str, agent: &str) -> bool {
    topic
        .strip_prefix("agent/")
        .and_then(|t| t.strip_prefix(agent))
        .is_some_and(|t| t == "/heartbeat")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bootstrap_grant_is_recognised_and_token_grants_are_not() {
        assert!(is_bootstrap(&bootstrap_grant()));
        let with_expiry = Grant {
            token_expiry: 1,
            ..bootstrap_grant()
        };
        assert!(!is_bootstrap(&with_expiry));
        assert!(!is_bootstrap(&Grant::all()));
    }

    #[test]
    fn agent_rights_cover_its_own_topics_only() {
        let r = agent_rights("a9");
        assert!(cell0_proto::msg::permits(
            &r,
            "event/agent/a9/stdout",
            "publish"
        ));
        assert!(!cell0_proto::msg::permits(
            &r,
            "event/agent/a99/stdout",
            "publish"
        ));
        assert!(!cell0_proto::msg::permits(
            &r,
            "event/agent/b/stdout",
            "publish"
        ));
        assert!(cell0_proto::msg::permits(&r, NODE_SERVICE, "ready"));
        assert!(!cell0_proto::msg::permits(&r, NODE_SERVICE, "bootstrap"));
        assert!(is_heartbeat("agent/a9/heartbeat", "a9"));
        assert!(is_output("agent/a9/stdout", "a9"));
        assert!(is_output("agent/a9/stderr", "a9"));
        assert!(!is_output("agent/a99/stdout", "a9"));
        assert!(!is_output("agent/a9/exit", "a9"));
        assert!(!is_heartbeat("agent/a99/heartbeat", "a9"));
    }
}
