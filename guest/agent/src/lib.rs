// SPDX-License-Identifier: Apache-2.0
//! cell0-agent: the Linux guest agent (DESIGN.md §1), PID 1 of an agent image.
//!
//! - [`init`]: PID 1 duties (mounts, kernel modules, uptime, power-off).
//! - [`transport`]: AF_VSOCK in the guest, Unix sockets in tests; the logic sees a stream.
//! - [`session`]: the SYPAS side: bootstrap (token over the channel), ready,
//!   workload output and heartbeats as EVENTs, exec/put-file/get-file/shutdown.
//! - [`workload`] and [`process`]: commands, and the reaper every init needs.
//! - [`api`]: the agent protocol's names and messages (docs/GUEST-AGENT.md).
//! - [`host`]: the host end of that protocol for one agent (tests, `cell0-agent host`).

pub mod api;
pub mod host;
pub mod init;
pub mod process;
pub mod session;
pub mod transport;
pub mod workload;
