// SPDX-License-Identifier: Apache-2.0
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! SYPAS over virtio-vsock between the nano guest in a real VM and host
//! processes on the VMM's hybrid Unix socket (issue 3).

use std::process::Stdio;
use std::time::Duration;

use cell0_proto::host::{Client, ClientConfig, ClientError, Endpoint, ReconnectPolicy};
use cell0_tests::{
    ChildGuard, SERVE_LISTENING, api_request, launch, require_kvm, start_echo_server, vmm,
    wait_for_path, wait_for_serial_line,
};

const CID: &str = "3";

fn vsock_args<'a>(uds: &'a str, cmdline: &'a str) -> Vec<&'a str> {
    vec![
        "--vsock-uds",
        uds,
        "--cid",
        CID,
        "--memory-mib",
        "256",
        "--cmdline",
        cmdline,
    ]
}

fn last_line(s: &str) -> &str {
    s.lines().last().unwrap_or("")
}

fn run_echo(poll: bool, sizes: &str, calls: u32) {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let _srv = start_echo_server(&dir.path().join("v.sock_1024"));
    let cmdline = format!(
        "cell0.test=sypas-echo cell0.sizes={sizes} cell0.calls={calls} cell0.poll={}",
        u8::from(poll)
    );
    let r = launch(&vsock_args(uds.to_str().unwrap(), &cmdline));
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert_eq!(
        last_line(&r.serial),
        "cell0-nano: test sypas-echo passed",
        "{}",
        r.serial
    );
    let mode = if poll { "poll" } else { "irq" };
    for size in sizes.split(',') {
        assert!(
            r.serial.contains(&format!(
                "cell0-nano: sypas-echo: {calls} calls of {size} bytes echoed, mode {mode}\n"
            )),
            "no result line for size {size}: {}",
            r.serial
        );
    }
}

#[test]
fn echo_payload_sizes_with_interrupts() {
    require_kvm!();
    run_echo(false, "0,1,4096,65536,1048576", 4);
}

#[test]
fn echo_payload_sizes_busy_poll() {
    require_kvm!();
    run_echo(true, "0,1,4096,65536,1048576", 4);
}

#[test]
fn sixty_four_concurrent_connections() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let _srv = start_echo_server(&dir.path().join("v.sock_1024"));
    let r = launch(&vsock_args(
        uds.to_str().unwrap(),
        "cell0.test=vsock-flood cell0.conns=64 cell0.calls=4 cell0.size=65536",
    ));
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert_eq!(
        last_line(&r.serial),
        "cell0-nano: test vsock-flood passed",
        "{}",
        r.serial
    );
}

/// A VM running `sypas-serve`, with its API socket; waits for the listening line.
struct ServingVm {
    child: ChildGuard,
    uds: std::path::PathBuf,
    api: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn start_serving_vm(extra_cmdline: &str) -> ServingVm {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let api = dir.path().join("api.sock");
    let cmdline = format!("cell0.test=sypas-serve cell0.port=5000 {extra_cmdline}");
    let mut child = vmm()
        .arg("launch")
        .args(vsock_args(uds.to_str().unwrap(), &cmdline))
        .arg("--api-sock")
        .arg(&api)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_serial_line(child.stdout.take().unwrap(), SERVE_LISTENING, None).unwrap();
    assert!(wait_for_path(&api, Duration::from_secs(5)));
    ServingVm {
        child: ChildGuard(child),
        uds,
        api,
        _dir: dir,
    }
}

fn client_config() -> ClientConfig {
    ClientConfig {
        agent_id: "host-test".into(),
        call_timeout: Duration::from_secs(20),
        reconnect: ReconnectPolicy::never(),
        ..ClientConfig::default()
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn host_initiated_connection_to_a_guest_listener() {
    require_kvm!();
    let mut vm = start_serving_vm("");
    let d = api_request(&vm.api, &serde_json::json!({"op": "describe"}));
    assert_eq!(d["vm"]["vsock"]["cid"], 3, "{d}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ep = Endpoint::HybridVsock {
            uds: vm.uds.clone(),
            port: 5000,
        };
        let c = Client::connect(ep, client_config()).await.unwrap();
        for (i, size) in [0usize, 1, 4096, 65536, 1 << 20].into_iter().enumerate() {
            let p = pattern(size, i as u8);
            let r = c.call("echo", "echo", p.clone()).await.unwrap();
            assert_eq!(r.payload.as_ref(), &p[..], "size {size}");
        }
        c.ping().await.unwrap();
        c.goodbye("done").await.unwrap();
    });
    let st = vm.child.0.wait().unwrap();
    assert_eq!(st.code(), Some(0));
}

#[test]
fn vm_gone_mid_transfer_gives_the_host_a_clean_error_not_a_hang() {
    require_kvm!();
    let vm = start_serving_vm("");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let uds = vm.uds.clone();
    let api = vm.api.clone();
    rt.block_on(async move {
        let ep = Endpoint::HybridVsock { uds, port: 5000 };
        let c = Client::connect(ep, client_config()).await.unwrap();
        // Keep 1 MiB calls in flight, then stop the VM under them.
        let mut calls = Vec::new();
        for i in 0..32u8 {
            let c = c.clone();
            calls.push(tokio::spawn(async move {
                c.call("echo", "echo", pattern(1 << 20, i)).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let stopped = tokio::task::spawn_blocking(move || {
            api_request(&api, &serde_json::json!({"op": "stop"}))
        })
        .await
        .unwrap();
        assert_eq!(stopped["ok"], true);
        let mut failed = 0;
        for h in calls {
            match tokio::time::timeout(Duration::from_secs(20), h).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(ClientError::Disconnected(_) | ClientError::Closed))) => failed += 1,
                Ok(Ok(Err(e))) => panic!("unexpected error kind: {e:?}"),
                Ok(Err(join)) => panic!("call task panicked: {join}"),
                Err(_) => panic!("a call hung after the VM stopped"),
            }
        }
        // At least the last calls cannot have completed.
        assert!(failed > 0, "every call finished before the stop");
    });
    let mut vm = vm;
    assert_eq!(
        vm.child.0.wait().unwrap().code(),
        Some(0),
        "stop through the API exits 0"
    );
}

#[test]
fn guest_reset_mid_transfer_closes_the_host_side_cleanly() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let echo_sock = dir.path().join("v.sock_1024");
    let mut srv = start_echo_server(&echo_sock);
    // The guest resets while the first 1 MiB reply is arriving.
    let r = launch(&vsock_args(
        uds.to_str().unwrap(),
        "cell0.test=sypas-echo cell0.sizes=1048576 cell0.reset_after=300000",
    ));
    assert_eq!(r.code, Some(0), "a guest reset exits 0: {r:#?}");
    assert!(
        r.serial
            .contains("cell0-nano: sypas-echo: resetting the VM after 300000 bytes received"),
        "{}",
        r.serial
    );
    // The echo server saw the connection end and still serves others.
    assert!(srv.0.try_wait().unwrap().is_none(), "the echo server died");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = Client::connect(Endpoint::Unix(echo_sock.clone()), client_config())
            .await
            .unwrap();
        let r = c
            .call("echo", "echo", b"still here".to_vec())
            .await
            .unwrap();
        assert_eq!(r.payload.as_ref(), b"still here");
    });
}

#[test]
fn guest_reset_during_a_host_call_fails_the_call_without_a_hang() {
    require_kvm!();
    let vm = start_serving_vm("cell0.reset_after=300000");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let uds = vm.uds.clone();
    rt.block_on(async move {
        let ep = Endpoint::HybridVsock { uds, port: 5000 };
        let c = Client::connect(ep, client_config()).await.unwrap();
        let call = c.call("echo", "echo", pattern(1 << 20, 7));
        match tokio::time::timeout(Duration::from_secs(30), call).await {
            Ok(Err(ClientError::Disconnected(_) | ClientError::Closed)) => {}
            Ok(other) => panic!("expected a disconnect, got {other:?}"),
            Err(_) => panic!("the call hung after the guest reset"),
        }
    });
    let mut vm = vm;
    assert_eq!(
        vm.child.0.wait().unwrap().code(),
        Some(0),
        "a guest reset exits 0"
    );
}
