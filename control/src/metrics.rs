// SPDX-License-Identifier: Apache-2.0
//! Prometheus metrics (prometheus-client), served on `/metrics` (axum).
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `cell0_vms` | gauge | `state` (pending, starting, running, …) |
//! | `cell0_vm_launches_total` | counter | — |
//! | `cell0_vm_launch_failures_total` | counter | — |
//! | `cell0_vm_launch_latency_seconds` | histogram | — (spawn → ready) |
//! | `cell0_vm_restarts_total` | counter | — |
//! | `cell0_vm_exits_total` | counter | `reason` (clean, crash, error, killed, lease, unknown) |
//! | `cell0_raft_commit_latency_seconds` | histogram | `op` |
//! | `cell0_api_requests_total` | counter | `method`, `code` |
//! | `cell0_sypas_calls_total` | counter | `target` (router, node, agent, local, remote, unknown): CALLs the router routed |
//! | `cell0_sypas_denials_total` | counter | `reason` (the SYPAS error code, e.g. `PERMISSION_DENIED`): requests the router refused |
//!
//! The two SYPAS counters are read from the router ([`crate::router::stats`])
//! at each scrape, once [`Metrics::register_sypas`] has been called.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listener could not be bound.
    #[error("cannot listen for /metrics on {addr}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabel {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabel {
    target: String,
}

/// Reads the router's counters at each scrape.
#[derive(Debug)]
struct SypasCollector(Arc<crate::router::stats::SypasStats>);

impl Collector for SypasCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let calls = self.0.calls();
        let mut e = encoder.encode_descriptor(
            "sypas_calls",
            "SYPAS CALLs the router routed, by kind of target",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (target, n) in calls {
            let l = TargetLabel {
                target: target.to_string(),
            };
            ConstCounter::new(n).encode(e.encode_family(&l)?)?;
        }
        let denials = self.0.denials();
        let mut e = encoder.encode_descriptor(
            "sypas_denials",
            "SYPAS requests the router refused (its refusal log), by error code",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, n) in denials {
            let l = ReasonLabel {
                reason: reason.to_string(),
            };
            ConstCounter::new(n).encode(e.encode_family(&l)?)?;
        }
        Ok(())
    }
}

fn latency_histogram() -> Histogram {
    // 50 µs … ~26 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

/// The daemon's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    vms: Family<StateLabel, Gauge>,
    launches: Counter,
    launch_failures: Counter,
    launch_latency: Histogram,
    restarts: Counter,
    exits: Family<ReasonLabel, Counter>,
    raft_commit: Family<OpLabel, Histogram, fn() -> Histogram>,
    api: Family<ApiLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("cell0");
        let m = Self {
            registry: Mutex::new(Registry::default()),
            vms: Family::default(),
            launches: Counter::default(),
            launch_failures: Counter::default(),
            launch_latency: latency_histogram(),
            restarts: Counter::default(),
            exits: Family::default(),
            raft_commit: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            api: Family::default(),
        };
        r.register("vms", "VMs on this node by state", m.vms.clone());
        r.register(
            "vm_launches",
            "cell0-vmm processes spawned",
            m.launches.clone(),
        );
        r.register(
            "vm_launch_failures",
            "cell0-vmm spawns that failed before the VM was ready",
            m.launch_failures.clone(),
        );
        r.register(
            "vm_launch_latency_seconds",
            "Spawn of cell0-vmm to guest ready",
            m.launch_latency.clone(),
        );
        r.register(
            "vm_restarts",
            "VMs restarted by their restart policy",
            m.restarts.clone(),
        );
        r.register("vm_exits", "cell0-vmm exits by reason", m.exits.clone());
        r.register(
            "raft_commit_latency_seconds",
            "Raft client write to applied, by command",
            m.raft_commit.clone(),
        );
        r.register(
            "api_requests",
            "gRPC requests by method and code",
            m.api.clone(),
        );
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = r;
        m
    }

    /// Sets the VM count of each state (states not named are set to 0).
    pub fn set_vms(&self, counts: &[(&str, i64)]) {
        for (s, n) in counts {
            self.vms
                .get_or_create(&StateLabel {
                    state: (*s).to_string(),
                })
                .set(*n);
        }
    }

    /// A cell0-vmm was spawned.
    pub fn launched(&self) {
        self.launches.inc();
    }

    /// A launch failed before ready.
    pub fn launch_failed(&self) {
        self.launch_failures.inc();
    }

    /// A VM became ready `d` after its spawn.
    pub fn ready(&self, d: Duration) {
        self.launch_latency.observe(d.as_secs_f64());
    }

    /// A VM was restarted.
    pub fn restarted(&self) {
        self.restarts.inc();
    }

    /// A VMM exited.
    pub fn exited(&self, reason: &str) {
        self.exits
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// A Raft write of `op` took `d`.
    pub fn raft_commit(&self, op: &str, d: Duration) {
        self.raft_commit
            .get_or_create(&OpLabel { op: op.to_string() })
            .observe(d.as_secs_f64());
    }

    /// A gRPC call ended with `code`.
    pub fn api(&self, method: &str, code: tonic::Code) {
        self.api
            .get_or_create(&ApiLabel {
                method: method.to_string(),
                code: format!("{code:?}"),
            })
            .inc();
    }

    /// Exports the SYPAS router's counters (`cell0_sypas_calls_total`,
    /// `cell0_sypas_denials_total`), read at each scrape. Call once.
    pub fn register_sypas(&self, stats: Arc<crate::router::stats::SypasStats>) {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .register_collector(Box::new(SypasCollector(stats)));
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if prometheus_client::encoding::text::encode(&mut s, &r).is_err() {
            s.clear();
        }
        s
    }
}

/// Serves `/metrics` on `addr` until the task is dropped; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
            }
        }),
    );
    let h = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "metrics server ended");
        }
    });
    Ok((bound, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric() {
        let m = Metrics::new();
        m.set_vms(&[("running", 3)]);
        m.launched();
        m.ready(Duration::from_millis(3));
        m.restarted();
        m.exited("crash");
        m.raft_commit("create-vm", Duration::from_millis(2));
        m.api("Create", tonic::Code::Ok);
        let t = m.encode();
        for name in [
            "cell0_vms{state=\"running\"} 3",
            "cell0_vm_launches_total 1",
            "cell0_vm_launch_latency_seconds_count 1",
            "cell0_vm_restarts_total 1",
            "cell0_vm_exits_total{reason=\"crash\"} 1",
            "cell0_raft_commit_latency_seconds_count{op=\"create-vm\"} 1",
            "cell0_api_requests_total{method=\"Create\",code=\"Ok\"} 1",
        ] {
            assert!(t.contains(name), "{name} missing from:\n{t}");
        }
    }

    #[tokio::test]
    async fn the_routers_counters_are_read_at_each_scrape() {
        let dir = tempfile::tempdir().unwrap();
        let router =
            crate::router::Router::new(crate::router::RouterConfig::new(dir.path().join("d")))
                .unwrap();
        let m = Metrics::new();
        m.register_sypas(router.stats());
        let t = m.encode();
        assert!(
            t.contains("cell0_sypas_calls_total{target=\"local\"} 0"),
            "{t}"
        );
        let sock = dir.path().join("vm.sock");
        router
            .attach_vm_with_window("vm1", &sock, None, None)
            .await
            .unwrap();
        // A token-less HELLO on a VM without a guest agent: one refusal.
        let cfg = cell0_proto::host::ClientConfig {
            reconnect: cell0_proto::host::ReconnectPolicy::never(),
            ..cell0_proto::host::ClientConfig::new("x")
        };
        let e = cell0_proto::host::Client::connect(cell0_proto::host::Endpoint::Unix(sock), cfg)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(cell0_proto::ErrorCode::PermissionDenied));
        let t = m.encode();
        for name in [
            "cell0_sypas_denials_total{reason=\"PERMISSION_DENIED\"} 1",
            "# TYPE cell0_sypas_calls counter",
        ] {
            assert!(t.contains(name), "{name} missing from:\n{t}");
        }
    }
}
