// SPDX-License-Identifier: Apache-2.0
//! Crash safety of the Raft store: `cell0d` SIGKILLed in the middle of writes
//! loses no acknowledged write; snapshots compact the log and survive restarts.
//! The daemon runs `/bin/true` as its "VMM", so no KVM is needed.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod cp_harness;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cell0_proto::grpc;
use cp_harness::Daemon;

const ARGS: &[&str] = &[
    "--vmm",
    "/bin/true",
    "--cpu-overcommit",
    "100000",
    "--memory-overcommit",
    "100000",
];

async fn list(d: &Daemon) -> BTreeSet<String> {
    let mut c = d.client().await;
    c.vm.list(grpc::ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms
        .into_iter()
        .map(|v| v.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let mut d = Daemon::start(ARGS);
    for round in 0..3 {
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let c = d.client().await;
        let mut writers = Vec::new();
        for w in 0..4 {
            let mut c = c.clone();
            let acked = acked.clone();
            writers.push(tokio::spawn(async move {
                for i in 0.. {
                    let name = format!("r{round}-w{w}-{i}");
                    let r =
                        c.vm.create(grpc::CreateVmRequest {
                            spec: Some(grpc::VmSpec {
                                name: name.clone(),
                                ..Default::default()
                            }),
                        })
                        .await;
                    match r {
                        Ok(_) => {
                            acked.lock().unwrap().insert(name);
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        // Let writes flow, then kill cell0d in the middle of them.
        while acked.lock().unwrap().len() < 60 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        d.kill9();
        for w in writers {
            let _ = w.await;
        }
        let acked = acked.lock().unwrap().clone();
        d.spawn();
        let have = list(&d).await;
        let lost: Vec<_> = acked.difference(&have).collect();
        println!(
            "round {round}: {} writes acknowledged before SIGKILL, {} records after restart",
            acked.len(),
            have.iter()
                .filter(|n| n.starts_with(&format!("r{round}-")))
                .count()
        );
        assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_compact_the_log_and_survive_restarts() {
    let mut args = ARGS.to_vec();
    args.extend(["--snapshot-every", "50"]);
    let mut d = Daemon::start(&args);
    let mut c = d.client().await;
    for i in 0..140 {
        c.vm.create(grpc::CreateVmRequest {
            spec: Some(grpc::VmSpec {
                name: format!("s{i}"),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    }
    for i in 0..20 {
        c.vm.delete(grpc::DeleteVmRequest {
            id: format!("s{i}"),
        })
        .await
        .unwrap();
    }
    // Snapshots are built in the background.
    let mut st = grpc::ClusterStatus::default();
    for _ in 0..200 {
        st = c
            .cluster
            .status(grpc::ClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if st.snapshot_index >= 100 && st.purged_index > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(st.snapshot_index >= 100, "{st:?}");
    assert!(
        st.purged_index > 0,
        "the log before the snapshot is purged: {st:?}"
    );
    assert!(d.data().join("raft/snapshot.json").exists());
    d.kill9();
    d.spawn();
    let have = list(&d).await;
    let want: BTreeSet<String> = (20..140).map(|i| format!("s{i}")).collect();
    assert_eq!(have, want);
}
