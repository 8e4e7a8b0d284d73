// SPDX-License-Identifier: Apache-2.0
//! Bad requests get their proper gRPC status, with a message naming the field.
//! The daemon runs `/bin/true` as its "VMM", so no KVM is needed. And Exec
//! reaches a real `cell0-agent` through cell0d's router, with the SYPAS
//! counters on /metrics moving.
#![allow(clippy::unwrap_used)]

mod cp_harness;

use cell0_proto::grpc;
use cp_harness::Daemon;
use tonic::Code;

fn spec(name: &str) -> grpc::VmSpec {
    grpc::VmSpec {
        name: name.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_proper_codes() {
    let d = Daemon::start(&[
        "--vmm",
        "/bin/true",
        "--vcpus",
        "2",
        "--cpu-overcommit",
        "2",
    ]);
    let mut c = d.client().await;
    let create = |s: grpc::VmSpec| grpc::CreateVmRequest { spec: Some(s) };

    let cases: Vec<(grpc::VmSpec, &str)> = vec![
        (spec("Bad_Name"), "spec.name"),
        (
            grpc::VmSpec {
                vcpus: 64,
                ..spec("a")
            },
            "spec.vcpus",
        ),
        (
            grpc::VmSpec {
                memory_mib: 1,
                ..spec("a")
            },
            "spec.memory_mib",
        ),
        (
            grpc::VmSpec {
                shm_mib: 1 << 20,
                ..spec("a")
            },
            "spec.shm_mib",
        ),
        (
            grpc::VmSpec {
                restart_policy: 42,
                ..spec("a")
            },
            "spec.restart_policy",
        ),
        (
            grpc::VmSpec {
                image: Some(grpc::Image {
                    kernel: "/no/such/vmlinux".into(),
                    ..Default::default()
                }),
                ..spec("a")
            },
            "spec.image.kernel",
        ),
        (
            grpc::VmSpec {
                image: Some(grpc::Image {
                    cmdline: "a\nb".into(),
                    ..Default::default()
                }),
                ..spec("a")
            },
            "spec.image.cmdline",
        ),
        (
            grpc::VmSpec {
                rights: vec![grpc::Right {
                    service: String::new(),
                    method: "*".into(),
                }],
                ..spec("a")
            },
            "spec.rights[0].service",
        ),
        (
            grpc::VmSpec {
                agent_id: "two words".into(),
                ..spec("a")
            },
            "spec.agent_id",
        ),
    ];
    for (s, field) in cases {
        let e = c.vm.create(create(s)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    let e =
        c.vm.create(grpc::CreateVmRequest { spec: None })
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    c.vm.create(create(spec("a"))).await.unwrap();
    let e = c.vm.create(create(spec("a"))).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    // 2 vCPUs × overcommit 2 = 4; "a" holds 1.
    let e =
        c.vm.create(create(grpc::VmSpec {
            vcpus: 4,
            ..spec("big")
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("vCPUs"), "{}", e.message());

    let e =
        c.vm.get(grpc::GetVmRequest { id: "nope".into() })
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e =
        c.vm.get(grpc::GetVmRequest { id: String::new() })
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("id:"));
    let e =
        c.vm.delete(grpc::DeleteVmRequest { id: "nope".into() })
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e =
        c.vm.stop(grpc::StopVmRequest { id: "nope".into() })
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e =
        c.vm.exec(grpc::ExecRequest {
            id: "a".into(),
            command: vec!["ls".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("no cell0 agent"), "{}", e.message());
    let e =
        c.vm.attest(grpc::AttestRequest { id: "a".into() })
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("without a vTPM"), "{}", e.message());
    let e = c
        .node
        .register(grpc::RegisterNodeRequest { node: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("node"), "{}", e.message());
    // A well-formed node that has not passed attestation is refused (the default).
    let e = c
        .node
        .register(grpc::RegisterNodeRequest {
            node: Some(grpc::Node {
                id: "n9".into(),
                zone: "z1".into(),
                region: "r1".into(),
                capacity: Some(grpc::Resources {
                    vcpus: 2,
                    memory_mib: 1024,
                }),
                cpu_overcommit: 1.0,
                memory_overcommit: 1.0,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("attestation"), "{}", e.message());
    let e =
        c.vm.watch(grpc::WatchRequest { id: "nope".into() })
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // cell0ctl maps the codes to its documented exit codes.
    assert_eq!(d.ctl(&["get", "nope"]).status.code(), Some(3));
    assert_eq!(
        d.ctl(&["run", "--name", "X!", "--no-wait"]).status.code(),
        Some(4)
    );
    assert_eq!(
        d.ctl(&["run", "--name", "a", "--no-wait"]).status.code(),
        Some(8)
    );
    assert_eq!(
        d.ctl(&["run", "--name", "b", "--vcpus", "8", "--no-wait"])
            .status
            .code(),
        Some(9)
    );
    assert_eq!(d.ctl(&["exec", "a", "--", "ls"]).status.code(), Some(11));
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cell0ctl"))
        .args(["--endpoint", "127.0.0.1:1", "ps"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5), "unreachable cell0d");
}

#[test]
fn cell0ctl_help_completion_and_node_and_cluster_views() {
    let d = Daemon::start(&["--vmm", "/bin/true", "--node-name", "n1", "--vcpus", "8"]);
    let help = d.ctl_ok(&["--help"]);
    assert!(
        help.contains("Examples:") && help.contains("Exit codes:"),
        "{help}"
    );
    let bash = d.ctl_ok(&["completion", "bash"]);
    assert!(bash.contains("cell0ctl"), "{bash}");
    let nodes = d.ctl_ok(&["node", "list"]);
    assert!(nodes.contains("n1") && nodes.contains("ready"), "{nodes}");
    let st: serde_json::Value =
        serde_json::from_str(&d.ctl_ok(&["cluster", "status", "-o", "json"])).unwrap();
    assert_eq!(st["state"], "leader");
    assert_eq!(st["leader_id"], 1);
    assert_eq!(st["members"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_reflection_lists_the_services() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let d = Daemon::start(&["--vmm", "/bin/true"]);
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", d.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut s = c
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let r = s.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(l)) = r.message_response else {
        panic!("unexpected reflection answer: {r:?}");
    };
    let names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
    for svc in [
        "cell0.control.v1.VmService",
        "cell0.control.v1.NodeService",
        "cell0.control.v1.ClusterService",
    ] {
        assert!(names.iter().any(|n| n == svc), "{svc} not in {names:?}");
    }
}

/// Reads `cell0_…` sample `name` (with its labels) from a /metrics body; 0 when absent.
fn sample(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Kills the guest stand-in on every way out of the test.
/// Not a test: the guest agent for [`cp_harness::GuestAgent`].
#[tokio::test]
#[ignore = "a helper process that cp_harness::GuestAgent starts"]
async fn guest_agent_helper_process() {
    cp_harness::guest_agent_helper_main().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_reaches_the_guest_agent_through_cell0d_and_sypas_counters_reach_metrics() {
    use std::time::{Duration, Instant};
    // No Linux guest boots on this machine's nested KVM (DESIGN.md §3), so a
    // script stands in for cell0-vmm and a cell0-agent process on the host
    // plays the guest: it connects to the VM's port-1024 socket, where the
    // hybrid vsock would put a guest's connection. Everything between them
    // (cell0d, its router, the bootstrap, Exec) is the real thing.
    let tmp = tempfile::Builder::new()
        .prefix("c0x")
        .tempdir_in("/tmp")
        .unwrap();
    let (vmm, kernel) = cp_harness::vmm_stand_in(tmp.path());
    let d = Daemon::start(&[
        "--vmm",
        vmm.to_str().unwrap(),
        "--no-jail",
        "--health-ms",
        "200",
    ]);
    let before = http_get(&d.metrics, "/metrics");
    d.ctl_ok(&[
        "run",
        "--name",
        "lx",
        "--kernel",
        kernel.to_str().unwrap(),
        "--no-wait",
        "--command=sh",
        "--command=-c",
        "--command=echo workload-ran; sleep 600",
    ]);
    d.ctl_ok(&["run", "--name", "nano1", "--no-wait"]);
    let sock = d.data().join("node/vms/lx/vsock.sock_1024");
    let nano_sock = d.data().join("node/vms/nano1/vsock.sock_1024");
    let t0 = Instant::now();
    while !(sock.exists() && nano_sock.exists()) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the router never listened for the VMs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let _guest = cp_harness::GuestAgent::start(&sock);

    // Until the agent has bootstrapped and connected, Exec says so (exit 11).
    let t0 = Instant::now();
    let o = loop {
        let o = d.ctl(&["exec", "lx", "--", "uname", "-a"]);
        if o.status.success() {
            break o;
        }
        assert_eq!(
            o.status.code(),
            Some(11),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the agent never connected:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("Linux "),
        "{o:?}"
    );
    // The agent's `ready` made the VM ready, and its heartbeats are its health.
    d.wait_vm("lx", "running and ready", |v| {
        v["status"]["state"] == "running" && v["status"]["ready"] == true
    });
    d.wait_vm("lx", "healthy by heartbeat", |v| {
        v["status"]["health"]
            .as_str()
            .is_some_and(|h| h.starts_with("sypas-heartbeat ok"))
    });
    // The workload's stdout EVENTs land in the VM's agent log.
    let t0 = Instant::now();
    loop {
        let o = d.ctl(&["logs", "lx", "--agent"]);
        assert!(o.status.success(), "{o:?}");
        if String::from_utf8_lossy(&o.stdout).contains("workload-ran\n") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the workload's output never reached `cell0ctl logs --agent`: {o:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // ... and not in the serial console's.
    let o = d.ctl(&["logs", "lx"]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("workload-ran"));
    // The exit status and both streams come back; cell0ctl exits 6 on a failed command.
    let o = d.ctl(&[
        "exec",
        "lx",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(o.status.code(), Some(6));
    assert_eq!(o.stdout, b"out\n");
    assert!(String::from_utf8_lossy(&o.stderr).contains("err"));
    let mut c = d.client().await;
    let r =
        c.vm.exec(grpc::ExecRequest {
            id: "lx".into(),
            command: vec!["sh".into(), "-c".into(), "kill -9 $$".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.exit_code, 128 + 9);
    // 5 MB of output: cut to what a gRPC client takes, and said so.
    let r =
        c.vm.exec(grpc::ExecRequest {
            id: "lx".into(),
            command: vec![
                "head".into(),
                "-c".into(),
                "5000000".into(),
                "/dev/zero".into(),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.exit_code, r.stdout.len()), (0, 3 << 20));
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("output cut"),
        "{:?}",
        String::from_utf8_lossy(&r.stderr)
    );
    let e =
        c.vm.exec(grpc::ExecRequest {
            id: "lx".into(),
            command: vec!["/no/such/program".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // The nano guest has no agent: FAILED_PRECONDITION, saying so.
    let e =
        c.vm.exec(grpc::ExecRequest {
            id: "nano1".into(),
            command: vec!["ls".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("no cell0 agent"), "{}", e.message());

    // A denied request: a token-less HELLO on the nano VM's socket.
    let cfg = cell0_proto::host::ClientConfig {
        reconnect: cell0_proto::host::ReconnectPolicy::never(),
        ..cell0_proto::host::ClientConfig::new("intruder")
    };
    let e = cell0_proto::host::Client::connect(cell0_proto::host::Endpoint::Unix(nano_sock), cfg)
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(cell0_proto::ErrorCode::PermissionDenied),
        "{e:?}"
    );

    let after = http_get(&d.metrics, "/metrics");
    let moved = |name: &str| sample(&after, name) - sample(&before, name);
    // bootstrap + ready, at least.
    assert!(
        moved("cell0_sypas_calls_total{target=\"node\"}") >= 2.0,
        "{after}"
    );
    // 5 Execs (and the retries that found the agent not yet there are not CALLs).
    assert!(
        moved("cell0_sypas_calls_total{target=\"agent\"}") >= 5.0,
        "{after}"
    );
    assert!(
        moved("cell0_sypas_denials_total{reason=\"PERMISSION_DENIED\"}") >= 1.0,
        "{after}"
    );
    assert!(
        moved("cell0_api_requests_total{method=\"Exec\",code=\"Ok\"}") >= 3.0,
        "{after}"
    );
}
