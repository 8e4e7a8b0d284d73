// SPDX-License-Identifier: Apache-2.0
//! `cell0ctl`'s client side: connecting, JSON forms of the API messages,
//! human tables, and the exit codes scripts rely on.

use std::time::Duration;

use cell0_proto::grpc::{
    self, cluster_service_client::ClusterServiceClient, node_service_client::NodeServiceClient,
    vm_service_client::VmServiceClient,
};
use serde_json::{Value, json};
use tonic::transport::Channel;

/// `cell0ctl`'s exit codes.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Any other error.
    pub const ERROR: u8 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: u8 = 2;
    /// No such VM or node.
    pub const NOT_FOUND: u8 = 3;
    /// The server refused the request as invalid.
    pub const INVALID: u8 = 4;
    /// cell0d cannot be reached or cannot commit.
    pub const UNAVAILABLE: u8 = 5;
    /// The VM failed (run: it never became ready) or attestation was rejected.
    pub const FAILED: u8 = 6;
    /// A wait timed out.
    pub const TIMEOUT: u8 = 7;
    /// The VM exists already.
    pub const EXISTS: u8 = 8;
    /// Not enough capacity.
    pub const EXHAUSTED: u8 = 9;
    /// Not supported by the server or the guest.
    pub const UNIMPLEMENTED: u8 = 10;
    /// The VM is not in a state that allows the request.
    pub const PRECONDITION: u8 = 11;
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The endpoint is not a valid URI.
    #[error("invalid endpoint {0:?}")]
    Endpoint(String),
    /// cell0d could not be reached.
    #[error("cannot connect to cell0d at {endpoint}: {}", crate::tls::describe(&crate::tls::chain(source)))]
    Connect {
        /// Endpoint.
        endpoint: String,
        /// Cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// `--tls-dir` is not usable.
    #[error("--tls-dir: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The server answered with an error.
    #[error("{}", .0.message())]
    Status(Box<tonic::Status>),
    /// A wait ran out.
    #[error("{0}")]
    Timeout(String),
    /// The VM failed.
    #[error("{0}")]
    Failed(String),
}

impl From<tonic::Status> for CtlError {
    fn from(s: tonic::Status) -> Self {
        // A refused TLS handshake surfaces at the first call: say what it means.
        // The status of a failed connection says only "transport error"; its
        // sources say what happened.
        let mut text = s.message().to_string();
        let mut src = std::error::Error::source(&s);
        while let Some(e) = src {
            let t = e.to_string();
            if !text.contains(&t) {
                text.push_str(": ");
                text.push_str(&t);
            }
            src = e.source();
        }
        if text != s.message() {
            let said = crate::tls::describe(&text);
            let code = match s.code() {
                // A connection that failed is "unavailable" to scripts.
                tonic::Code::Unknown => tonic::Code::Unavailable,
                c => c,
            };
            return CtlError::Status(Box::new(tonic::Status::new(code, said)));
        }
        CtlError::Status(Box::new(s))
    }
}

impl CtlError {
    /// The exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Endpoint(_) | CtlError::Tls(_) => exit::USAGE,
            CtlError::Connect { .. } => exit::UNAVAILABLE,
            CtlError::Timeout(_) => exit::TIMEOUT,
            CtlError::Failed(_) => exit::FAILED,
            CtlError::Status(s) => match s.code() {
                tonic::Code::NotFound => exit::NOT_FOUND,
                tonic::Code::InvalidArgument => exit::INVALID,
                tonic::Code::Unavailable => exit::UNAVAILABLE,
                tonic::Code::AlreadyExists => exit::EXISTS,
                tonic::Code::ResourceExhausted => exit::EXHAUSTED,
                tonic::Code::Unimplemented => exit::UNIMPLEMENTED,
                tonic::Code::FailedPrecondition => exit::PRECONDITION,
                tonic::Code::DeadlineExceeded => exit::TIMEOUT,
                _ => exit::ERROR,
            },
        }
    }
}

/// The three service clients over one channel.
#[derive(Clone)]
pub struct Clients {
    /// VmService.
    pub vm: VmServiceClient<Channel>,
    /// NodeService.
    pub node: NodeServiceClient<Channel>,
    /// ClusterService.
    pub cluster: ClusterServiceClient<Channel>,
}

/// Whether a client may dial `endpoint` as asked: over mutual TLS
/// (`tls_dir`), over plain TCP to this host, or over plain TCP to another
/// host only with `insecure_plaintext`.
pub fn check_transport(
    endpoint: &str,
    tls_dir: Option<&std::path::Path>,
    insecure_plaintext: bool,
) -> Result<(), CtlError> {
    if tls_dir.is_some() || insecure_plaintext || crate::tls::endpoint_is_loopback(endpoint) {
        return Ok(());
    }
    Err(CtlError::Tls(crate::tls::TlsError::Usage(format!(
        "{endpoint} is another host: give --tls-dir DIR (or CELL0_TLS_DIR) with a certificate of the cluster CA (cell0d issue-cert --ca-dir <member data dir>/pki --name NAME --role client --out DIR), or --insecure-plaintext for a cell0d served without TLS"
    ))))
}

/// The JSON form of a revocation list.
pub fn revocations_json(l: &grpc::RevocationList) -> Value {
    Value::Array(
        l.revocations
            .iter()
            .map(|r| {
                json!({
                    "serial": r.serial, "name": r.name, "reason": r.reason,
                    "revoked_at_ms": r.revoked_at_ms, "revoked_by": r.revoked_by,
                })
            })
            .collect(),
    )
}

/// Connects to cell0d at `endpoint` (`http://HOST:PORT`, or `HOST:PORT`).
pub async fn connect(endpoint: &str) -> Result<Clients, CtlError> {
    connect_tls(endpoint, None).await
}

/// Connects to cell0d at `endpoint`, over mutual TLS with the certificate in
/// `tls_dir` (`cell0d issue-cert`) when one is given (`HOST:PORT` then means
/// `https://HOST:PORT`).
pub async fn connect_tls(
    endpoint: &str,
    tls_dir: Option<&std::path::Path>,
) -> Result<Clients, CtlError> {
    let tls = tls_dir.map(crate::tls::TlsDir::load).transpose()?;
    let uri = crate::tls::uri(endpoint, tls.is_some());
    let mut ep =
        Channel::from_shared(uri.clone()).map_err(|_| CtlError::Endpoint(endpoint.to_string()))?;
    if let Some(t) = &tls {
        ep = ep
            .tls_config(t.client_config())
            .map_err(|_| CtlError::Endpoint(endpoint.to_string()))?;
    }
    let ch = ep
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|source| CtlError::Connect {
            endpoint: uri,
            source,
        })?;
    Ok(Clients {
        vm: VmServiceClient::new(ch.clone()),
        node: NodeServiceClient::new(ch.clone()),
        cluster: ClusterServiceClient::new(ch),
    })
}

/// A state's lowercase name.
pub fn state_name(s: i32) -> &'static str {
    grpc::VmState::try_from(s).map_or("unknown", crate::node::state_name)
}

/// Whether a state is final (no process, nothing pending).
pub fn is_terminal(s: i32) -> bool {
    matches!(
        grpc::VmState::try_from(s),
        Ok(grpc::VmState::Exited | grpc::VmState::Failed | grpc::VmState::Stopped)
    )
}

fn policy_name(p: i32) -> &'static str {
    match grpc::RestartPolicy::try_from(p) {
        Ok(grpc::RestartPolicy::OnFailure) => "on-failure",
        Ok(grpc::RestartPolicy::Always) => "always",
        _ => "never",
    }
}

/// The JSON form of a VM.
pub fn vm_json(vm: &grpc::Vm) -> Value {
    let spec = vm.spec.clone().unwrap_or_default();
    let img = spec.image.clone().unwrap_or_default();
    let st = vm.status.clone().unwrap_or_default();
    let labels: std::collections::BTreeMap<_, _> = spec.labels.into_iter().collect();
    json!({
        "id": vm.id,
        "desired": vm.desired,
        "created_at_ms": vm.created_at_ms,
        "revision": vm.revision,
        "spec": {
            "name": spec.name,
            "image": {"kernel": img.kernel, "initrd": img.initrd, "cmdline": img.cmdline},
            "vcpus": spec.vcpus,
            "memory_mib": spec.memory_mib,
            "shm_mib": spec.shm_mib,
            "agent_id": spec.agent_id,
            "rights": spec.rights.iter().map(|r| json!({"service": r.service, "method": r.method})).collect::<Vec<_>>(),
            "restart_policy": policy_name(spec.restart_policy),
            "labels": labels,
            "tpm": spec.tpm,
            "command": spec.command,
            "placement": spec.placement.as_ref().map(|p| json!({
                "zones": p.zones, "regions": p.regions,
                "node_selector": p.node_selector.iter().collect::<std::collections::BTreeMap<_, _>>(),
                "affinity": p.affinity.iter().collect::<std::collections::BTreeMap<_, _>>(),
                "anti_affinity": p.anti_affinity.iter().collect::<std::collections::BTreeMap<_, _>>(),
                "topology": p.topology,
                "policy": if p.policy == grpc::PlacementPolicy::Spread as i32 { "spread" } else { "bin-pack" },
            })),
        },
        "status": {
            "state": state_name(st.state),
            "node": st.node,
            "pid": st.pid,
            "run_dir": st.run_dir,
            "ready": st.ready,
            "exit_code": st.exit_code,
            "message": st.message,
            "restarts": st.restarts,
            "started_at_ms": st.started_at_ms,
            "ready_latency_us": st.ready_latency_us,
            "vsock_cid": st.vsock_cid,
            "health": st.health,
        },
    })
}

/// The JSON form of a node.
pub fn node_json(n: &grpc::Node) -> Value {
    let cap = n.capacity.unwrap_or_default();
    let used = n.allocated.unwrap_or_default();
    json!({
        "id": n.id, "address": n.address, "zone": n.zone, "region": n.region,
        "state": n.state, "vms": n.vms,
        "capacity": {"vcpus": cap.vcpus, "memory_mib": cap.memory_mib},
        "allocated": {"vcpus": used.vcpus, "memory_mib": used.memory_mib},
        "cpu_overcommit": n.cpu_overcommit, "memory_overcommit": n.memory_overcommit,
        "labels": n.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "drained": n.drained,
    })
}

/// The JSON form of the cluster status.
pub fn cluster_json(c: &grpc::ClusterStatus) -> Value {
    json!({
        "node_id": c.node_id, "leader_id": c.leader_id, "leader_address": c.leader_address,
        "state": c.state, "term": c.term,
        "last_log_index": c.last_log_index, "last_applied": c.last_applied,
        "snapshot_index": c.snapshot_index, "purged_index": c.purged_index,
        "members": c.members.iter().map(|m| json!({"id": m.id, "address": m.address, "voter": m.voter})).collect::<Vec<_>>(),
        "vms": c.vms, "nodes": c.nodes,
    })
}

/// The JSON form of an event.
pub fn event_json(e: &grpc::VmEvent) -> Value {
    json!({
        "seq": e.seq, "time_ms": e.time_ms, "vm": e.vm_id, "kind": e.kind,
        "state": state_name(e.state), "message": e.message,
    })
}

/// "3s", "5m", "2h", "4d" since `ms` (Unix ms).
pub fn age(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let s = crate::now_ms().saturating_sub(ms) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// Left-aligned columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            out.push_str(&c);
            if i + 1 < n {
                out.push_str(&" ".repeat(w[i] - c.chars().count() + 2));
            }
        }
        out.push('\n');
    };
    line(header.iter().map(|h| (*h).to_string()).collect(), &mut out);
    for r in rows {
        line(r.clone(), &mut out);
    }
    out
}

/// The `ps` table.
pub fn vm_table(vms: &[grpc::Vm]) -> String {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|vm| {
            let st = vm.status.clone().unwrap_or_default();
            let spec = vm.spec.clone().unwrap_or_default();
            let img = spec.image.unwrap_or_default();
            vec![
                vm.id.clone(),
                state_name(st.state).to_string(),
                if st.ready { "yes".into() } else { "no".into() },
                img.kernel,
                format!("{}/{}M", spec.vcpus, spec.memory_mib),
                if st.pid > 0 {
                    st.pid.to_string()
                } else {
                    "-".into()
                },
                st.restarts.to_string(),
                age(vm.created_at_ms),
                st.node,
            ]
        })
        .collect();
    table(
        &[
            "NAME", "STATE", "READY", "IMAGE", "CPU/MEM", "PID", "RESTARTS", "AGE", "NODE",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    LONGER\nxyz  1\nq    22\n");
    }

    #[test]
    fn exit_codes_follow_grpc_codes() {
        assert_eq!(
            CtlError::from(tonic::Status::not_found("x")).exit_code(),
            exit::NOT_FOUND
        );
        assert_eq!(
            CtlError::from(tonic::Status::invalid_argument("x")).exit_code(),
            exit::INVALID
        );
        assert_eq!(CtlError::Timeout("t".into()).exit_code(), exit::TIMEOUT);
    }
}
