// SPDX-License-Identifier: Apache-2.0
//! cell0d, the host daemon: for now the SYPAS router (DESIGN.md §4,
//! docs/SYPAS.md §13–§16) with biscuit capability tokens and shared-memory
//! refs. `cell0d serve` (control plane, node agent) embeds [`router::Router`].
//!
//! - [`token`]: mint, attenuate and verify tokens; root keys and the key ring.
//! - [`router`]: the router library: host socket, per-VM sockets, services,
//!   agents, EVENT pub/sub, audit log.

pub mod router;
pub mod token;
