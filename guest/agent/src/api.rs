// SPDX-License-Identifier: Apache-2.0
//! The guest-agent protocol on top of SYPAS v1: service and method names,
//! EVENT topics, and the payload messages (hand-written prost structs, like
//! `cell0_proto::msg`). Tag numbers are the wire contract: never reuse one.
//! docs/GUEST-AGENT.md describes the exchange.
//!
//! - Agent → host: CALLs to the node service [`NODE_SERVICE`] (`bootstrap`,
//!   `ready`) and EVENTs on `agent/<id>/{stdout,stderr,exit,heartbeat}`.
//! - Host (router) → agent: CALLs to `agent/<id>` with methods [`M_EXEC`],
//!   [`M_PUT_FILE`], [`M_GET_FILE`], [`M_SHUTDOWN`], [`M_SIGNAL`].

use std::collections::BTreeMap;

use bytes::Bytes;

/// The host service a guest agent talks to: the node agent, reached through the
/// router on the VM's own vsock listener (which knows the VM it serves).
pub const NODE_SERVICE: &str = "cell0.node";
/// Method: the first call of a token-less session; answered with the token and workload.
pub const M_BOOTSTRAP: &str = "bootstrap";
/// Method: the agent is up and its workload started.
pub const M_READY: &str = "ready";
/// Method (to the agent): run a command to completion.
pub const M_EXEC: &str = "exec";
/// Method (to the agent): write a file.
pub const M_PUT_FILE: &str = "put-file";
/// Method (to the agent): read a file.
pub const M_GET_FILE: &str = "get-file";
/// Method (to the agent): end the workload and power off.
pub const M_SHUTDOWN: &str = "shutdown";
/// Method (to the agent): send a signal to the workload.
pub const M_SIGNAL: &str = "signal";

/// The right a token-less (bootstrap) session needs, and the only one it gets.
pub fn bootstrap_right() -> cell0_proto::msg::Right {
    cell0_proto::msg::Right::new(NODE_SERVICE, M_BOOTSTRAP)
}

/// The EVENT topic of one agent's stream: `agent/<id>/<stream>`.
pub fn topic(agent_id: &str, stream: &str) -> String {
    format!("agent/{agent_id}/{stream}")
}

/// Topic suffix: workload stdout bytes (payload: raw bytes).
pub const T_STDOUT: &str = "stdout";
/// Topic suffix: workload stderr bytes (payload: raw bytes).
pub const T_STDERR: &str = "stderr";
/// Topic suffix: the workload ended (payload: [`ExitStatus`]).
pub const T_EXIT: &str = "exit";
/// Topic suffix: periodic liveness (payload: [`Heartbeat`]).
pub const T_HEARTBEAT: &str = "heartbeat";

/// The most bytes of stdout (and of stderr) an `exec` reply carries.
pub const MAX_EXEC_OUTPUT: usize = 7 << 20;
/// The largest file `get-file` returns and `put-file` accepts.
pub const MAX_FILE_BYTES: u64 = 15 << 20;

/// A command to run: argv, environment and working directory.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Command {
    /// argv\[0\] is looked up in PATH when it has no `/`.
    #[prost(string, repeated, tag = "1")]
    pub argv: Vec<String>,
    /// Environment (replaces the agent's own, except PATH when unset here).
    #[prost(btree_map = "string, string", tag = "2")]
    pub env: BTreeMap<String, String>,
    /// Working directory; empty = `/`.
    #[prost(string, tag = "3")]
    pub cwd: String,
}

/// `bootstrap` request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BootstrapRequest {
    /// The agent's version.
    #[prost(string, tag = "1")]
    pub agent_version: String,
    /// `uname -r` of the guest kernel.
    #[prost(string, tag = "2")]
    pub kernel_release: String,
}

/// `bootstrap` reply: what the VM spec says this agent is and runs.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BootstrapReply {
    /// The agent id (topics and `agent/<id>` use it).
    #[prost(string, tag = "1")]
    pub agent_id: String,
    /// The capability token (bound to this VM); the agent closes the
    /// bootstrap connection and sends it in HELLO on every later connection.
    /// A reply without a token or agent id is refused by the agent.
    #[prost(bytes = "bytes", tag = "2")]
    pub token: Bytes,
    /// The workload; no argv = no workload.
    #[prost(message, optional, tag = "3")]
    pub workload: Option<Command>,
    /// Heartbeat EVENT period in ms; 0 = 5000.
    #[prost(uint32, tag = "4")]
    pub heartbeat_ms: u32,
}

/// `ready` request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ready {
    /// The agent id.
    #[prost(string, tag = "1")]
    pub agent_id: String,
    /// Guest uptime (`/proc/uptime`) when the agent started as init, in ns.
    #[prost(uint64, tag = "2")]
    pub init_start_ns: u64,
    /// Guest uptime when ready was sent, in ns.
    #[prost(uint64, tag = "3")]
    pub ready_ns: u64,
    /// The workload's pid, 0 when none runs.
    #[prost(uint32, tag = "4")]
    pub workload_pid: u32,
    /// The agent's version.
    #[prost(string, tag = "5")]
    pub agent_version: String,
    /// `uname -a` style description of the guest kernel.
    #[prost(string, tag = "6")]
    pub kernel: String,
}

/// How a process ended.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct ExitStatus {
    /// Exit code; -1 when killed by a signal.
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// The signal that killed it; 0 when it exited.
    #[prost(int32, tag = "2")]
    pub signal: i32,
}

/// `exec` request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExecRequest {
    /// What to run.
    #[prost(message, optional, tag = "1")]
    pub command: Option<Command>,
    /// Bytes for its stdin (then EOF).
    #[prost(bytes = "bytes", tag = "2")]
    pub stdin: Bytes,
    /// Kill it after this many ms; 0 = 60000.
    #[prost(uint32, tag = "3")]
    pub timeout_ms: u32,
}

/// `exec` reply.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExecReply {
    /// How it ended.
    #[prost(message, optional, tag = "1")]
    pub status: Option<ExitStatus>,
    /// Its stdout (at most [`MAX_EXEC_OUTPUT`] bytes).
    #[prost(bytes = "bytes", tag = "2")]
    pub stdout: Bytes,
    /// Its stderr (at most [`MAX_EXEC_OUTPUT`] bytes).
    #[prost(bytes = "bytes", tag = "3")]
    pub stderr: Bytes,
    /// It was killed for running past the timeout.
    #[prost(bool, tag = "4")]
    pub timed_out: bool,
    /// Output past the limit was dropped.
    #[prost(bool, tag = "5")]
    pub truncated: bool,
}

/// `put-file` request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutFile {
    /// Absolute path in the guest.
    #[prost(string, tag = "1")]
    pub path: String,
    /// Contents.
    #[prost(bytes = "bytes", tag = "2")]
    pub data: Bytes,
    /// Permission bits; 0 = 0644.
    #[prost(uint32, tag = "3")]
    pub mode: u32,
    /// Create missing parent directories.
    #[prost(bool, tag = "4")]
    pub mkdirs: bool,
}

/// `get-file` request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetFile {
    /// Absolute path in the guest.
    #[prost(string, tag = "1")]
    pub path: String,
}

/// `get-file` reply.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FileData {
    /// Contents.
    #[prost(bytes = "bytes", tag = "1")]
    pub data: Bytes,
    /// Permission bits.
    #[prost(uint32, tag = "2")]
    pub mode: u32,
}

/// `shutdown` request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Shutdown {
    /// How long the workload gets after SIGTERM before SIGKILL, in ms; 0 = 5000.
    #[prost(uint32, tag = "1")]
    pub grace_ms: u32,
    /// Why, for the log.
    #[prost(string, tag = "2")]
    pub reason: String,
}

/// `signal` request.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Signal {
    /// Signal number.
    #[prost(int32, tag = "1")]
    pub signal: i32,
}

/// Heartbeat EVENT payload.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Heartbeat {
    /// Guest uptime in ns.
    #[prost(uint64, tag = "1")]
    pub uptime_ns: u64,
    /// The workload is still running.
    #[prost(bool, tag = "2")]
    pub workload_running: bool,
    /// Sequence number, from 1.
    #[prost(uint64, tag = "3")]
    pub seq: u64,
}
