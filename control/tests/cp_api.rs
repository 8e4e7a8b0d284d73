// SPDX-License-Identifier: Apache-2.0
//! Bad requests get their proper gRPC status, with a message naming the field.
//! The daemon runs `/bin/true` as its "VMM", so no KVM is needed.
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
    assert_eq!(e.code(), Code::Unimplemented);
    assert!(e.message().contains("guest agent"), "{}", e.message());
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
    assert_eq!(e.code(), Code::Unimplemented);
    assert!(e.message().contains("issue 7"));
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
    assert_eq!(d.ctl(&["exec", "a", "--", "ls"]).status.code(), Some(10));
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
