// SPDX-License-Identifier: Apache-2.0
//! 256 nano-guest agent VMs at once on one node (the seed's 256 agents per
//! host): all reach ready, all are cleaned up. Set CELL0_TEST_VMS to run
//! another number (0 skips).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod cp_harness;

use std::time::{Duration, Instant};

use cell0_proto::grpc;
use cp_harness::{Daemon, LONG_RUNNING, proc_alive};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_vms_at_once() {
    require_vms!();
    let n: usize = std::env::var("CELL0_TEST_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    if n == 0 {
        eprintln!("SKIP many_vms_at_once: CELL0_TEST_VMS=0");
        return;
    }
    let d = Daemon::start(&["--cpu-overcommit", "1024", "--health-ms", "600000"]);
    let c = d.client().await;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(8) {
                c.vm.create(grpc::CreateVmRequest {
                    spec: Some(grpc::VmSpec {
                        name: format!("m{i}"),
                        memory_mib: 16,
                        image: Some(grpc::Image {
                            cmdline: LONG_RUNNING.into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                })
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let created = t0.elapsed();
    let mut c2 = c.clone();
    let ready = loop {
        let vms = c2
            .vm
            .list(grpc::ListVmsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .vms;
        let ready = vms
            .iter()
            .filter(|v| v.status.as_ref().is_some_and(|s| s.ready && s.pid > 0))
            .count();
        let bad: Vec<_> = vms
            .iter()
            .filter(|v| cell0_control::ctl::is_terminal(v.status.as_ref().map_or(0, |s| s.state)))
            .map(|v| (v.id.clone(), v.status.clone().unwrap_or_default().message))
            .collect();
        assert!(bad.is_empty(), "VMs ended: {bad:?}");
        if ready == n {
            break t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(240), "{ready}/{n} ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let pids = d.vmm_pids();
    assert_eq!(pids.len(), n, "one running cell0-vmm per VM");
    let rss = std::fs::read_to_string(format!("/proc/{}/status", d.child.as_ref().unwrap().id()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .unwrap_or_default()
        .to_string();
    println!(
        "{n} VMs: created in {:.2} s, all ready after {:.2} s; cell0d {rss}",
        created.as_secs_f64(),
        ready.as_secs_f64()
    );
    for i in 0..n {
        c2.vm
            .delete(grpc::DeleteVmRequest {
                id: format!("m{i}"),
            })
            .await
            .unwrap();
    }
    let t1 = Instant::now();
    while !d.run_dirs().is_empty() || pids.iter().any(|p| proc_alive(*p)) {
        assert!(t1.elapsed() < Duration::from_secs(120), "VMs left behind");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{n} VMs deleted and cleaned up in {:.2} s",
        t1.elapsed().as_secs_f64()
    );
}
