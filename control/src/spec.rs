// SPDX-License-Identifier: Apache-2.0
//! The VM spec: the checked, serializable form of the gRPC `VmSpec`.
//!
//! [`VmSpec::from_proto`] refuses every invalid spec with a [`SpecError`]
//! that names the field (`spec.vcpus`, `spec.labels["x"]`, …); the API maps it
//! to `INVALID_ARGUMENT`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cell0_proto::grpc;
use serde::{Deserialize, Serialize};

/// Most vCPUs of one VM (the VMM's limit).
pub const MAX_VCPUS: u32 = 32;
/// Least guest memory (the nano guest needs 16 MiB).
pub const MIN_MEMORY_MIB: u64 = 16;
/// Most guest memory.
pub const MAX_MEMORY_MIB: u64 = 64 << 10;
/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u64 = 64;
/// Largest shared-memory window.
pub const MAX_SHM_MIB: u64 = 4096;
/// Longest kernel command line.
pub const MAX_CMDLINE: usize = 2048;
/// Most labels.
pub const MAX_LABELS: usize = 64;
/// Most rights.
pub const MAX_RIGHTS: usize = 256;
/// Most command words.
pub const MAX_COMMAND_WORDS: usize = 64;

/// An invalid spec: the field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    /// The field path, e.g. `spec.vcpus`.
    pub field: String,
    /// Why it is refused.
    pub reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// When the node agent restarts a VM whose VMM exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never.
    #[default]
    Never,
    /// When the VMM exits non-zero (guest crash, VMM error) or is killed.
    OnFailure,
    /// Whenever it exits, unless stopped on request.
    Always,
}

impl RestartPolicy {
    /// The gRPC enum value.
    pub fn to_proto(self) -> grpc::RestartPolicy {
        match self {
            RestartPolicy::Never => grpc::RestartPolicy::Never,
            RestartPolicy::OnFailure => grpc::RestartPolicy::OnFailure,
            RestartPolicy::Always => grpc::RestartPolicy::Always,
        }
    }

    /// Whether an exit with `failed` (non-zero or unknown) is restarted.
    pub fn restarts(self, failed: bool) -> bool {
        match self {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => failed,
            RestartPolicy::Always => true,
        }
    }
}

/// How the scheduler scores the nodes that can take a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PlacementPolicy {
    /// The fullest node that fits (fewest nodes in use).
    #[default]
    BinPack,
    /// The emptiest node that fits (VMs spread over the nodes).
    Spread,
}

/// The domain that affinity and anti-affinity count in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Topology {
    /// One node.
    #[default]
    Node,
    /// All the nodes of a zone.
    Zone,
}

/// Where a VM may go (all parts must hold). Empty: anywhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Placement {
    /// One of these zones (empty: any).
    pub zones: Vec<String>,
    /// One of these regions (empty: any).
    pub regions: Vec<String>,
    /// Labels the node must carry.
    pub node_selector: BTreeMap<String, String>,
    /// Only next to a VM whose labels include all of these (in `topology`).
    pub affinity: BTreeMap<String, String>,
    /// Never next to a VM whose labels include all of these (in `topology`).
    pub anti_affinity: BTreeMap<String, String>,
    /// The domain of `affinity` and `anti_affinity`.
    pub topology: Topology,
    /// Bin-pack or spread.
    pub policy: PlacementPolicy,
}

impl Placement {
    /// Whether nothing is asked.
    pub fn is_empty(&self) -> bool {
        *self == Placement::default()
    }
}

/// Most zones, regions or labels in one placement part.
pub const MAX_PLACEMENT_ITEMS: usize = 32;

fn check_label(field: &str, k: &str, v: &str) -> Result<(), SpecError> {
    let key_ok = !k.is_empty()
        && k.len() <= 63
        && k.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_./".contains(&b));
    if !key_ok {
        return Err(bad(
            format!("{field}[{k:?}]"),
            "a key is 1-63 of a-z 0-9 - _ . /",
        ));
    }
    if v.len() > 63 || v.chars().any(char::is_control) {
        return Err(bad(
            format!("{field}[{k:?}]"),
            "a value is at most 63 characters, no control characters",
        ));
    }
    Ok(())
}

fn check_labels(
    field: &str,
    m: std::collections::HashMap<String, String>,
    max: usize,
) -> Result<BTreeMap<String, String>, SpecError> {
    if m.len() > max {
        return Err(bad(field, format!("at most {max} labels")));
    }
    let mut out = BTreeMap::new();
    for (k, v) in m {
        check_label(field, &k, &v)?;
        out.insert(k, v);
    }
    Ok(out)
}

impl Placement {
    /// Checks the gRPC form (`None`: no constraints).
    pub fn from_proto(p: Option<grpc::Placement>) -> Result<Self, SpecError> {
        let Some(p) = p else {
            return Ok(Placement::default());
        };
        let names = |field: &str, v: Vec<String>| -> Result<Vec<String>, SpecError> {
            if v.len() > MAX_PLACEMENT_ITEMS {
                return Err(bad(field, format!("at most {MAX_PLACEMENT_ITEMS} names")));
            }
            let mut out: Vec<String> = Vec::with_capacity(v.len());
            for (i, z) in v.into_iter().enumerate() {
                if z.is_empty()
                    || z.len() > 63
                    || !z
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    return Err(bad(
                        format!("{field}[{i}]"),
                        format!("{z:?} is not a name (1-63 of a-z A-Z 0-9 - _ .)"),
                    ));
                }
                if !out.contains(&z) {
                    out.push(z);
                }
            }
            out.sort();
            Ok(out)
        };
        let policy = match grpc::PlacementPolicy::try_from(p.policy) {
            Ok(grpc::PlacementPolicy::Unspecified | grpc::PlacementPolicy::BinPack) => {
                PlacementPolicy::BinPack
            }
            Ok(grpc::PlacementPolicy::Spread) => PlacementPolicy::Spread,
            Err(_) => {
                return Err(bad(
                    "spec.placement.policy",
                    format!("unknown value {}", p.policy),
                ));
            }
        };
        let topology = match p.topology.as_str() {
            "" | "node" => Topology::Node,
            "zone" => Topology::Zone,
            t => {
                return Err(bad(
                    "spec.placement.topology",
                    format!("{t:?} is not \"node\" or \"zone\""),
                ));
            }
        };
        Ok(Placement {
            zones: names("spec.placement.zones", p.zones)?,
            regions: names("spec.placement.regions", p.regions)?,
            node_selector: check_labels(
                "spec.placement.node_selector",
                p.node_selector,
                MAX_PLACEMENT_ITEMS,
            )?,
            affinity: check_labels("spec.placement.affinity", p.affinity, MAX_PLACEMENT_ITEMS)?,
            anti_affinity: check_labels(
                "spec.placement.anti_affinity",
                p.anti_affinity,
                MAX_PLACEMENT_ITEMS,
            )?,
            topology,
            policy,
        })
    }

    /// The gRPC form (`None` when nothing is asked).
    pub fn to_proto(&self) -> Option<grpc::Placement> {
        if self.is_empty() {
            return None;
        }
        Some(grpc::Placement {
            zones: self.zones.clone(),
            regions: self.regions.clone(),
            node_selector: self.node_selector.clone().into_iter().collect(),
            affinity: self.affinity.clone().into_iter().collect(),
            anti_affinity: self.anti_affinity.clone().into_iter().collect(),
            topology: match self.topology {
                Topology::Node => "node",
                Topology::Zone => "zone",
            }
            .to_string(),
            policy: match self.policy {
                PlacementPolicy::BinPack => grpc::PlacementPolicy::BinPack,
                PlacementPolicy::Spread => grpc::PlacementPolicy::Spread,
            } as i32,
        })
    }
}

/// A SYPAS right pattern pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Right {
    /// Service pattern.
    pub service: String,
    /// Method pattern.
    pub method: String,
}

/// A checked VM spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Name (= VM id).
    pub name: String,
    /// Kernel path on the node; `None` boots the built-in nano guest.
    pub kernel: Option<PathBuf>,
    /// Initrd path on the node.
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `None` for the VMM's default.
    pub cmdline: Option<String>,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory.
    pub memory_mib: u64,
    /// Shared-memory window (0: none).
    pub shm_mib: u64,
    /// Agent id (PCR 12).
    pub agent_id: String,
    /// Rights granted to the agent.
    pub rights: Vec<Right>,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Measured boot in a per-VM vTPM.
    pub tpm: bool,
    /// Workload command (PCR 12).
    pub command: Vec<String>,
    /// Where the scheduler may put it (boxed: most specs ask nothing, and
    /// the Raft command that carries a spec stays small).
    #[serde(default, skip_serializing_if = "Placement::is_empty")]
    pub placement: Box<Placement>,
}

/// Whether `s` is a DNS label: 1-63 of `a-z 0-9 -`, not starting or ending in `-`.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn check_pattern(field: &str, p: &str) -> Result<(), SpecError> {
    if p.is_empty() || p.len() > 128 {
        return Err(bad(field, "must be 1 to 128 characters"));
    }
    let body = p.strip_suffix('*').unwrap_or(p);
    if let Some(c) = body
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_-./".contains(*c)))
    {
        return Err(bad(
            field,
            format!("{c:?} is not allowed (a-z A-Z 0-9 _ - . / and a final *)"),
        ));
    }
    Ok(())
}

fn check_file(field: &str, p: &str) -> Result<PathBuf, SpecError> {
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(bad(
            field,
            format!("{p:?} must be an absolute path on the node"),
        ));
    }
    if !path.is_file() {
        return Err(bad(field, format!("{p:?} is not a file on this node")));
    }
    Ok(path.to_path_buf())
}

impl VmSpec {
    /// Checks a gRPC spec; `default_name` is used when the spec has none.
    pub fn from_proto(p: grpc::VmSpec, default_name: &str) -> Result<Self, SpecError> {
        let name = if p.name.is_empty() {
            default_name.to_string()
        } else {
            p.name
        };
        if name == "host" {
            return Err(bad(
                "spec.name",
                "\"host\" is reserved (the SYPAS router's name for host processes)",
            ));
        }
        if !is_dns_label(&name) {
            return Err(bad(
                "spec.name",
                format!(
                    "{name:?} is not a DNS label (1-63 of a-z 0-9 -, not starting or ending in -)"
                ),
            ));
        }
        let image = p.image.unwrap_or_default();
        let kernel = match image.kernel.as_str() {
            "" | "nano" => None,
            k => Some(check_file("spec.image.kernel", k)?),
        };
        let initrd = match image.initrd.as_str() {
            "" => None,
            i => Some(check_file("spec.image.initrd", i)?),
        };
        let cmdline = match image.cmdline.as_str() {
            "" => None,
            c if c.len() > MAX_CMDLINE => {
                return Err(bad(
                    "spec.image.cmdline",
                    format!("{} bytes is over the limit of {MAX_CMDLINE}", c.len()),
                ));
            }
            c if c.chars().any(|ch| ch.is_control()) => {
                return Err(bad(
                    "spec.image.cmdline",
                    "must not contain control characters (newlines, NUL)",
                ));
            }
            c if c.contains("cell0.token=") => {
                return Err(bad(
                    "spec.image.cmdline",
                    "must not carry a token: tokens go over the SYPAS channel",
                ));
            }
            c => Some(c.to_string()),
        };
        let vcpus = if p.vcpus == 0 { 1 } else { p.vcpus };
        if vcpus > MAX_VCPUS {
            return Err(bad(
                "spec.vcpus",
                format!("must be 1 to {MAX_VCPUS}, got {vcpus}"),
            ));
        }
        let memory_mib = if p.memory_mib == 0 {
            DEFAULT_MEMORY_MIB
        } else {
            p.memory_mib
        };
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
            return Err(bad(
                "spec.memory_mib",
                format!("must be {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}, got {memory_mib}"),
            ));
        }
        if p.shm_mib > MAX_SHM_MIB {
            return Err(bad(
                "spec.shm_mib",
                format!("must be at most {MAX_SHM_MIB}, got {}", p.shm_mib),
            ));
        }
        let agent_id = if p.agent_id.is_empty() {
            name.clone()
        } else {
            p.agent_id
        };
        if agent_id.len() > 128 || !agent_id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(
                "spec.agent_id",
                "must be 1 to 128 printable ASCII characters without spaces",
            ));
        }
        if p.rights.len() > MAX_RIGHTS {
            return Err(bad("spec.rights", format!("at most {MAX_RIGHTS} rights")));
        }
        let mut rights = Vec::with_capacity(p.rights.len());
        for (i, r) in p.rights.into_iter().enumerate() {
            check_pattern(&format!("spec.rights[{i}].service"), &r.service)?;
            check_pattern(&format!("spec.rights[{i}].method"), &r.method)?;
            rights.push(Right {
                service: r.service,
                method: r.method,
            });
        }
        let restart = match grpc::RestartPolicy::try_from(p.restart_policy) {
            Ok(grpc::RestartPolicy::Unspecified | grpc::RestartPolicy::Never) => {
                RestartPolicy::Never
            }
            Ok(grpc::RestartPolicy::OnFailure) => RestartPolicy::OnFailure,
            Ok(grpc::RestartPolicy::Always) => RestartPolicy::Always,
            Err(_) => {
                return Err(bad(
                    "spec.restart_policy",
                    format!("unknown value {}", p.restart_policy),
                ));
            }
        };
        if p.labels.len() > MAX_LABELS {
            return Err(bad("spec.labels", format!("at most {MAX_LABELS} labels")));
        }
        let mut labels = BTreeMap::new();
        for (k, v) in p.labels {
            let key_ok = !k.is_empty()
                && k.len() <= 63
                && k.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_./".contains(&b));
            if !key_ok {
                return Err(bad(
                    format!("spec.labels[{k:?}]"),
                    "a key is 1-63 of a-z 0-9 - _ . /",
                ));
            }
            if v.len() > 63 || v.chars().any(char::is_control) {
                return Err(bad(
                    format!("spec.labels[{k:?}]"),
                    "a value is at most 63 characters, no control characters",
                ));
            }
            labels.insert(k, v);
        }
        if p.command.len() > MAX_COMMAND_WORDS {
            return Err(bad(
                "spec.command",
                format!("at most {MAX_COMMAND_WORDS} words"),
            ));
        }
        if let Some(i) = p.command.iter().position(|w| w.len() > 4096) {
            return Err(bad(
                format!("spec.command[{i}]"),
                "a word is at most 4096 bytes",
            ));
        }
        Ok(VmSpec {
            name,
            kernel,
            initrd,
            cmdline,
            vcpus,
            memory_mib,
            shm_mib: p.shm_mib,
            agent_id,
            rights,
            restart,
            labels,
            tpm: p.tpm,
            command: p.command,
            placement: Box::new(Placement::from_proto(p.placement)?),
        })
    }

    /// The gRPC form.
    pub fn to_proto(&self) -> grpc::VmSpec {
        grpc::VmSpec {
            name: self.name.clone(),
            image: Some(grpc::Image {
                kernel: self
                    .kernel
                    .as_ref()
                    .map_or_else(|| "nano".to_string(), |k| k.display().to_string()),
                initrd: self
                    .initrd
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                cmdline: self.cmdline.clone().unwrap_or_default(),
            }),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            shm_mib: self.shm_mib,
            agent_id: self.agent_id.clone(),
            rights: self
                .rights
                .iter()
                .map(|r| grpc::Right {
                    service: r.service.clone(),
                    method: r.method.clone(),
                })
                .collect(),
            restart_policy: self.restart.to_proto() as i32,
            labels: self.labels.clone().into_iter().collect(),
            tpm: self.tpm,
            command: self.command.clone(),
            placement: self.placement.to_proto(),
        }
    }

    /// Whether the VM boots the built-in nano guest.
    pub fn is_nano(&self) -> bool {
        self.kernel.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> grpc::VmSpec {
        grpc::VmSpec {
            name: "a1".into(),
            ..Default::default()
        }
    }

    fn field(p: grpc::VmSpec) -> String {
        VmSpec::from_proto(p, "gen").unwrap_err().field
    }

    #[test]
    fn defaults_fill_in() {
        let s = VmSpec::from_proto(grpc::VmSpec::default(), "vm-1").unwrap();
        assert_eq!(s.name, "vm-1");
        assert_eq!(s.agent_id, "vm-1");
        assert_eq!((s.vcpus, s.memory_mib), (1, DEFAULT_MEMORY_MIB));
        assert!(s.is_nano());
        assert_eq!(s.restart, RestartPolicy::Never);
        let back = VmSpec::from_proto(s.to_proto(), "x").unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn every_bad_field_is_named() {
        assert_eq!(
            field(grpc::VmSpec {
                name: "Bad_Name".into(),
                ..spec()
            }),
            "spec.name"
        );
        assert_eq!(
            field(grpc::VmSpec {
                vcpus: 33,
                ..spec()
            }),
            "spec.vcpus"
        );
        assert_eq!(
            field(grpc::VmSpec {
                memory_mib: 8,
                ..spec()
            }),
            "spec.memory_mib"
        );
        assert_eq!(
            field(grpc::VmSpec {
                shm_mib: 1 << 20,
                ..spec()
            }),
            "spec.shm_mib"
        );
        assert_eq!(
            field(grpc::VmSpec {
                restart_policy: 9,
                ..spec()
            }),
            "spec.restart_policy"
        );
        let img = |k: &str, i: &str, c: &str| grpc::VmSpec {
            image: Some(grpc::Image {
                kernel: k.into(),
                initrd: i.into(),
                cmdline: c.into(),
            }),
            ..spec()
        };
        assert_eq!(field(img("rel/path", "", "")), "spec.image.kernel");
        assert_eq!(field(img("/nonexistent/k", "", "")), "spec.image.kernel");
        assert_eq!(field(img("", "/nonexistent/i", "")), "spec.image.initrd");
        assert_eq!(field(img("", "", "a\nb")), "spec.image.cmdline");
        assert_eq!(field(img("", "", "cell0.token=abc")), "spec.image.cmdline");
        assert_eq!(
            field(grpc::VmSpec {
                agent_id: "has space".into(),
                ..spec()
            }),
            "spec.agent_id"
        );
        assert_eq!(
            field(grpc::VmSpec {
                rights: vec![grpc::Right {
                    service: "echo".into(),
                    method: "a*b".into()
                }],
                ..spec()
            }),
            "spec.rights[0].method"
        );
        let mut labels = std::collections::HashMap::new();
        labels.insert("Upper".to_string(), "v".to_string());
        assert_eq!(
            field(grpc::VmSpec { labels, ..spec() }),
            "spec.labels[\"Upper\"]"
        );
    }
}
