// SPDX-License-Identifier: Apache-2.0
//! Node admission: a host that asks to join a cell0 cluster measures the
//! binaries it runs (`cell0d`, `cell0-vmm`) into PCR 0 of its own TPM, quotes
//! it over the control plane's nonce, and sends the quote with the event log.
//! The control plane enrolls the TPM's AK like a VM's (EK certificate →
//! make/activate credential) and checks the quote with
//! [`crate::Verifier::verify_node`] against a [`NodeGolden`] allow-list.
//!
//! With swtpm standing in for a hardware TPM, the quote proves only what the
//! software stack that runs swtpm chose to measure: a root user on the node can
//! run other binaries and measure the golden ones. Only a hardware TPM (with a
//! measured boot up to the measuring process) makes it evidence about the host.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;
use crate::eventlog::{Event, EventLog, EventType};
use crate::measure::{MeasureError, hash_file};
use crate::verify::Failure;

/// The accepted digests of a node's binaries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeGolden {
    /// Accepted SHA-256 digests of `cell0d`.
    pub cell0d: Vec<Sha256Digest>,
    /// Accepted SHA-256 digests of `cell0-vmm`.
    pub cell0_vmm: Vec<Sha256Digest>,
}

impl NodeGolden {
    /// The accepted digests for a node event (empty for any other type).
    pub fn golden(&self, kind: EventType) -> &[Sha256Digest] {
        match kind {
            EventType::NodeDaemon => &self.cell0d,
            EventType::NodeVmm => &self.cell0_vmm,
            _ => &[],
        }
    }
}

/// The events of a node's admission, in extend order: SHA-256 of its `cell0d`
/// executable, then of its `cell0-vmm`, both into PCR 0. Extend them with
/// [`crate::Vtpm::record_boot`] into a fresh vTPM.
pub fn node_events(cell0d: &Path, cell0_vmm: &Path) -> Result<EventLog, MeasureError> {
    let ev = |kind: EventType, path: &Path| -> Result<Event, MeasureError> {
        Ok(Event {
            pcr: kind.pcr(),
            digest: hash_file(path)?,
            kind,
            description: format!("{} executable {}", kind, path.display()),
        })
    };
    Ok(EventLog {
        events: vec![
            ev(EventType::NodeDaemon, cell0d)?,
            ev(EventType::NodeVmm, cell0_vmm)?,
        ],
    })
}

/// The node's event log must be exactly [`EventType::NODE_ORDER`], each event
/// in its PCR, each digest in `golden`.
pub(crate) fn check_node_events(log: &EventLog, golden: &NodeGolden, failures: &mut Vec<Failure>) {
    crate::verify::quote::check_sequence(
        log,
        &EventType::NODE_ORDER,
        |k| golden.golden(k).to_vec(),
        failures,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(d: &[u8], v: &[u8]) -> EventLog {
        let e = |kind: EventType, x: &[u8]| Event {
            pcr: kind.pcr(),
            digest: Sha256Digest::of(x),
            kind,
            description: kind.to_string(),
        };
        EventLog {
            events: vec![e(EventType::NodeDaemon, d), e(EventType::NodeVmm, v)],
        }
    }

    #[test]
    fn node_logs_are_checked_against_the_allow_list() {
        let golden = NodeGolden {
            cell0d: vec![Sha256Digest::of(b"d")],
            cell0_vmm: vec![Sha256Digest::of(b"v1"), Sha256Digest::of(b"v2")],
        };
        let mut f = Vec::new();
        check_node_events(&log(b"d", b"v2"), &golden, &mut f);
        assert!(f.is_empty(), "{f:?}");
        check_node_events(&log(b"d", b"evil"), &golden, &mut f);
        assert!(
            matches!(&f[..], [Failure::EventMismatch { index: 1, event: EventType::NodeVmm, got, .. }] if *got == Sha256Digest::of(b"evil")),
            "{f:?}"
        );
        f.clear();
        let mut short = log(b"d", b"v1");
        short.events.pop();
        check_node_events(&short, &golden, &mut f);
        assert!(
            matches!(&f[..], [Failure::MissingEvent { index: 1, .. }]),
            "{f:?}"
        );
        f.clear();
        check_node_events(&log(b"d", b"v1"), &NodeGolden::default(), &mut f);
        assert_eq!(f.len(), 2, "{f:?}");
    }
}
