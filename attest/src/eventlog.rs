// SPDX-License-Identifier: Apache-2.0
//! The measured-boot event log: one JSON record per PCR extend, written as
//! JSON Lines (one object per line), in the order the extends happened.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;

/// The SHA-256 PCRs that cell0 measures into, in quote order (DESIGN.md §5).
pub const MEASURED_PCRS: [u8; 6] = [0, 4, 8, 9, 11, 12];

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    /// A line is not a valid event record.
    #[error("event log line {line} is not a valid event record")]
    BadRecord {
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        #[source]
        source: serde_json::Error,
    },
    /// An event names a PCR that cell0 does not measure into.
    #[error("event log line {line} extends PCR {pcr}, which cell0 does not measure into")]
    UnmeasuredPcr {
        /// 1-based line number.
        line: usize,
        /// The PCR.
        pcr: u8,
    },
    /// Reading or writing the log file failed.
    #[error("cannot access event log {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What an event measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventType {
    /// SHA-256 of the cell0-vmm executable (PCR 0).
    VmmBinary,
    /// SHA-256 of the cell0-vmm version string (PCR 0).
    VmmVersion,
    /// SHA-256 of the kernel image as loaded (PCR 4).
    Kernel,
    /// SHA-256 of the kernel command line bytes, without a NUL (PCR 8).
    Cmdline,
    /// SHA-256 of the initrd, or of no bytes when there is none (PCR 9).
    Initrd,
    /// SHA-256 of the canonical VM config (PCR 11).
    VmConfig,
    /// SHA-256 of the canonical workload spec (PCR 12).
    Workload,
    /// SHA-256 of a node's `cell0d` executable (PCR 0 of the node's own TPM;
    /// node admission, not a VM boot).
    NodeDaemon,
    /// SHA-256 of a node's `cell0-vmm` executable (PCR 0 of the node's own TPM).
    NodeVmm,
}

impl EventType {
    /// Every type, in the order cell0-vmm extends them.
    pub const BOOT_ORDER: [EventType; 7] = [
        EventType::VmmBinary,
        EventType::VmmVersion,
        EventType::Kernel,
        EventType::Cmdline,
        EventType::Initrd,
        EventType::VmConfig,
        EventType::Workload,
    ];

    /// Every type a node measures for its admission to a cluster, in extend
    /// order: the binaries it runs, both into PCR 0.
    pub const NODE_ORDER: [EventType; 2] = [EventType::NodeDaemon, EventType::NodeVmm];

    /// The PCR this type of event is extended into.
    pub const fn pcr(self) -> u8 {
        match self {
            EventType::VmmBinary
            | EventType::VmmVersion
            | EventType::NodeDaemon
            | EventType::NodeVmm => 0,
            EventType::Kernel => 4,
            EventType::Cmdline => 8,
            EventType::Initrd => 9,
            EventType::VmConfig => 11,
            EventType::Workload => 12,
        }
    }

    /// The name used in the event log and in verdicts.
    pub const fn name(self) -> &'static str {
        match self {
            EventType::VmmBinary => "vmm-binary",
            EventType::VmmVersion => "vmm-version",
            EventType::Kernel => "kernel",
            EventType::Cmdline => "cmdline",
            EventType::Initrd => "initrd",
            EventType::VmConfig => "vm-config",
            EventType::Workload => "workload",
            EventType::NodeDaemon => "node-daemon",
            EventType::NodeVmm => "node-vmm",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One PCR extend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// The SHA-256 bank PCR index that was extended.
    pub pcr: u8,
    /// The measurement extended into the PCR (hex).
    pub digest: Sha256Digest,
    /// What was measured.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// Human-readable detail; not covered by the measurement.
    pub description: String,
}

/// The values of the measured PCRs (SHA-256 bank), by index.
pub type PcrValues = BTreeMap<u8, Sha256Digest>;

/// An ordered list of events.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventLog {
    /// The events, in extend order.
    pub events: Vec<Event>,
}

impl EventLog {
    /// Replays the log from the all-zero reset state: the PCR values a TPM
    /// that saw exactly these extends holds. Every measured PCR is present.
    pub fn replay(&self) -> PcrValues {
        let mut pcrs: PcrValues = MEASURED_PCRS
            .iter()
            .map(|&p| (p, Sha256Digest::ZERO))
            .collect();
        for e in &self.events {
            let v = pcrs.entry(e.pcr).or_insert(Sha256Digest::ZERO);
            *v = v.extend(&e.digest);
        }
        pcrs
    }

    /// The JSON Lines text: one compact JSON object per line, each line ending in LF.
    pub fn to_jsonl(&self) -> String {
        let mut out = String::new();
        for e in &self.events {
            // An Event always serializes.
            out.push_str(&serde_json::to_string(e).unwrap_or_default());
            out.push('\n');
        }
        out
    }

    /// Parses JSON Lines text; blank lines are ignored.
    pub fn from_jsonl(text: &str) -> Result<Self, EventLogError> {
        let mut events = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let e: Event =
                serde_json::from_str(line).map_err(|source| EventLogError::BadRecord {
                    line: i + 1,
                    source,
                })?;
            if !MEASURED_PCRS.contains(&e.pcr) {
                return Err(EventLogError::UnmeasuredPcr {
                    line: i + 1,
                    pcr: e.pcr,
                });
            }
            events.push(e);
        }
        Ok(EventLog { events })
    }

    /// Writes the log to `path` (replacing it atomically).
    pub fn write_file(&self, path: &Path) -> Result<(), EventLogError> {
        let io = |source| EventLogError::Io {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, self.to_jsonl()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads a log written by [`EventLog::write_file`].
    pub fn read_file(path: &Path) -> Result<Self, EventLogError> {
        let text = std::fs::read_to_string(path).map_err(|source| EventLogError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_jsonl(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventType, data: &[u8]) -> Event {
        Event {
            pcr: kind.pcr(),
            digest: Sha256Digest::of(data),
            kind,
            description: format!("{kind}"),
        }
    }

    #[test]
    fn replay_extends_in_order_per_pcr() {
        let log = EventLog {
            events: vec![
                ev(EventType::VmmBinary, b"a"),
                ev(EventType::VmmVersion, b"b"),
                ev(EventType::Kernel, b"k"),
            ],
        };
        let pcrs = log.replay();
        let pcr0 = Sha256Digest::ZERO
            .extend(&Sha256Digest::of(b"a"))
            .extend(&Sha256Digest::of(b"b"));
        assert_eq!(pcrs.get(&0), Some(&pcr0));
        assert_eq!(
            pcrs.get(&4),
            Some(&Sha256Digest::ZERO.extend(&Sha256Digest::of(b"k")))
        );
        assert_eq!(pcrs.get(&12), Some(&Sha256Digest::ZERO));
        assert_eq!(pcrs.len(), MEASURED_PCRS.len());
    }

    #[test]
    fn jsonl_round_trip_and_exact_record_shape() {
        let log = EventLog {
            events: vec![ev(EventType::Cmdline, b"console=ttyS0")],
        };
        let text = log.to_jsonl();
        assert_eq!(
            text,
            format!(
                "{{\"pcr\":8,\"digest\":\"{}\",\"type\":\"cmdline\",\"description\":\"cmdline\"}}\n",
                Sha256Digest::of(b"console=ttyS0")
            )
        );
        assert_eq!(EventLog::from_jsonl(&text).ok(), Some(log));
    }

    proptest::proptest! {
        #[test]
        fn parsing_arbitrary_text_never_panics(text in "\\PC{0,400}") {
            let _ = EventLog::from_jsonl(&text);
        }

        #[test]
        fn jsonl_round_trips(descs in proptest::collection::vec("\\PC{0,40}", 0..8)) {
            let log = EventLog {
                events: descs
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        let kind = EventType::BOOT_ORDER[i % EventType::BOOT_ORDER.len()];
                        Event { pcr: kind.pcr(), digest: Sha256Digest::of(d.as_bytes()), kind, description: d.clone() }
                    })
                    .collect(),
            };
            proptest::prop_assert_eq!(EventLog::from_jsonl(&log.to_jsonl()).ok(), Some(log));
        }
    }

    #[test]
    fn bad_records_name_their_line() {
        let text = "\n{\"pcr\":8}\n";
        match EventLog::from_jsonl(text) {
            Err(EventLogError::BadRecord { line, .. }) => assert_eq!(line, 2),
            other => panic!("unexpected {other:?}"),
        }
        let d = Sha256Digest::ZERO;
        let text =
            format!("{{\"pcr\":7,\"digest\":\"{d}\",\"type\":\"kernel\",\"description\":\"\"}}");
        assert!(matches!(
            EventLog::from_jsonl(&text),
            Err(EventLogError::UnmeasuredPcr { line: 1, pcr: 7 })
        ));
    }
}
