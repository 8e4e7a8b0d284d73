// SPDX-License-Identifier: Apache-2.0
//! cell0d, the host daemon: for now the SYPAS router (DESIGN.md §4,
//! docs/SYPAS.md §13–§16) with biscuit capability tokens and shared-memory
//! refs. `cell0d serve` (control plane, node agent) embeds [`router::Router`].
//!
//! - [`token`]: mint, attenuate and verify tokens; root keys and the key ring.
//! - [`router`]: the router library: host socket, per-VM sockets, services,
//!   agents, EVENT pub/sub, audit log.
//!
//! The control plane (issue 6, DESIGN.md §6):
//!
//! - [`store`]: replicated state through openraft (one member by default),
//!   log and snapshots crash-safe in the data dir.
//! - [`api`]: the gRPC services (tonic), with reflection.
//! - [`node`]: the node agent that runs `cell0-vmm` children.
//! - [`sched`]: placement (filter by state, zone, labels, affinity and room;
//!   score by bin-pack or spread), drains and node-loss evacuation.
//! - [`metrics`], [`audit`]: Prometheus metrics and the audit log of API calls.
//! - [`serve`]: `cell0d serve`, wiring it all together.
//! - [`ctl`]: `cell0ctl`'s client side.

pub mod router;
pub mod token;

pub mod api;
pub mod audit;
pub mod ctl;
pub mod metrics;
pub mod node;
pub mod sched;
pub mod serve;
pub mod spec;
pub mod store;
pub mod tls;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
