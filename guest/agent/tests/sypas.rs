// SPDX-License-Identifier: Apache-2.0
//! The agent's SYPAS logic over Unix sockets against the host end in
//! `cell0_agent::host`, which `cell0-agent host` serves in the Linux
//! end-to-end test and the boot benchmark: bootstrap connection then HELLO
//! with the token, exec, files, heartbeats, reconnect with the token,
//! shutdown, reaping. The same logic against the control plane's real router
//! is `control/tests/agent_router.rs`. In a guest only the `Endpoint` differs
//! (AF_VSOCK).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use cell0_agent::api::{self, ExitStatus};
use cell0_agent::host::{self, HostConfig, HostError, HostEvent};
use cell0_agent::session::{self, AgentConfig, Outcome};
use cell0_agent::transport::Endpoint;
use cell0_proto::ErrorCode;
use prost::Message;

const TOKEN: &[u8] = b"tok-for-agent-7";

fn cmd(argv: &[&str]) -> api::Command {
    api::Command {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn agent_cfg(path: &std::path::Path) -> AgentConfig {
    let mut c = AgentConfig::new(Endpoint::Unix(path.to_path_buf()));
    c.max_connect_attempts = Some(20);
    c.backoff = (Duration::from_millis(10), Duration::from_millis(50));
    c.agent_id = "hello-id".into();
    c
}

async fn host_and_agent(
    workload: Option<api::Command>,
    hb: u32,
) -> (
    tempfile::TempDir,
    tokio::net::UnixListener,
    HostConfig,
    tokio::task::JoinHandle<Outcome>,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vsock.sock_1024");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let cfg = HostConfig {
        agent_id: "a9".into(),
        token: Bytes::from_static(TOKEN),
        workload,
        heartbeat_ms: hb,
    };
    let agent = tokio::spawn(session::run(agent_cfg(&path)));
    (dir, listener, cfg, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_files_errors_reconnect_and_graceful_shutdown() {
    let (_dir, listener, cfg, agent) = host_and_agent(
        Some(cmd(&[
            "sh",
            "-c",
            "echo started; trap 'echo got-term; exit 0' TERM; while :; do sleep 0.05; done",
        ])),
        100,
    )
    .await;
    let mut conn = host::accept(&listener, cfg.clone()).await.unwrap();
    let (ready, _) = conn.wait_ready(Duration::from_secs(20)).await.unwrap();
    assert_eq!(ready.agent_id, "a9");
    assert_ne!(ready.workload_pid, 0);
    assert!(ready.kernel.starts_with("Linux "));
    assert_eq!(conn.bootstraps, 1, "a bootstrap connection came first");
    assert_eq!(
        *conn.hellos.lock().unwrap(),
        vec![true],
        "then HELLO with the token"
    );

    // exec, as the end-to-end test does it.
    let r = conn
        .exec(
            "a9",
            &api::ExecRequest {
                command: Some(cmd(&["uname", "-a"])),
                ..Default::default()
            },
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(r.status, Some(ExitStatus { code: 0, signal: 0 }));
    assert!(String::from_utf8_lossy(&r.stdout).starts_with("Linux "));
    // env, cwd, stdin.
    let mut c = cmd(&["sh", "-c", "printf '%s:%s:' \"$A\" \"$(pwd)\"; cat"]);
    c.env.insert("A".into(), "b".into());
    c.cwd = "/tmp".into();
    let r = conn
        .exec(
            "a9",
            &api::ExecRequest {
                command: Some(c),
                stdin: Bytes::from_static(b"in"),
                timeout_ms: 10_000,
            },
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(&r.stdout[..], b"b:/tmp:in");

    // Files.
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("sub/dir/f.txt").display().to_string();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    conn.put_file(
        "a9",
        &api::PutFile {
            path: f.clone(),
            data: data.clone().into(),
            mode: 0o600,
            mkdirs: true,
        },
    )
    .await
    .unwrap();
    let got = conn.get_file("a9", &f).await.unwrap();
    assert_eq!(got.data.to_vec(), data);
    assert_eq!(got.mode, 0o600);

    // Typed errors.
    let err = |e: HostError| match e {
        HostError::Remote(s) => s.error_code(),
        other => panic!("expected a remote error, got {other:?}"),
    };
    assert_eq!(
        err(conn.get_file("a9", "relative/path").await.unwrap_err()),
        Some(ErrorCode::BadRequest)
    );
    assert_eq!(
        err(conn.get_file("a9", "/nonexistent/x").await.unwrap_err()),
        Some(ErrorCode::BadRequest)
    );
    assert_eq!(
        err(conn
            .exec(
                "a9",
                &api::ExecRequest {
                    command: Some(cmd(&["/no/such/prog"])),
                    ..Default::default()
                },
                Duration::from_secs(10)
            )
            .await
            .unwrap_err()),
        Some(ErrorCode::BadRequest)
    );
    assert_eq!(
        err(conn
            .call("a9", "no-such-method", vec![], Duration::from_secs(5))
            .await
            .unwrap_err()),
        Some(ErrorCode::NoSuchMethod)
    );
    assert_eq!(
        err(conn
            .call("a9", api::M_EXEC, vec![0xff, 0xff], Duration::from_secs(5))
            .await
            .unwrap_err()),
        Some(ErrorCode::BadRequest)
    );

    // Workload output and heartbeats arrive as EVENTs.
    let mut saw_started = false;
    let mut heartbeats = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(saw_started && heartbeats >= 2) {
        match tokio::time::timeout_at(deadline, conn.events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            HostEvent::Event { topic, payload } if topic == "agent/a9/stdout" => {
                saw_started |= payload.starts_with(b"started")
            }
            HostEvent::Event { topic, payload } if topic == "agent/a9/heartbeat" => {
                let h = api::Heartbeat::decode(payload).unwrap();
                assert!(h.workload_running);
                heartbeats += 1;
            }
            _ => {}
        }
    }

    // The connection drops: the agent comes back with its token in HELLO.
    drop(conn);
    let mut conn = host::accept(&listener, cfg.clone()).await.unwrap();
    let (ready2, _) = conn.wait_ready(Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        ready2.workload_pid, ready.workload_pid,
        "the workload kept running"
    );
    assert_eq!(conn.bootstraps, 0, "the reconnect did not bootstrap again");
    assert_eq!(
        *conn.hellos.lock().unwrap(),
        vec![true],
        "the reconnect's HELLO carries the token"
    );

    // Graceful shutdown: SIGTERM reaches the workload, which says so and exits 0.
    conn.shutdown("a9", 5000, "test").await.unwrap();
    let events = conn.wait_closed(Duration::from_secs(20)).await.unwrap();
    let out: Vec<u8> = events
        .iter()
        .filter_map(|e| match e {
            HostEvent::Event { topic, payload } if topic == "agent/a9/stdout" => {
                Some(payload.to_vec())
            }
            _ => None,
        })
        .flatten()
        .collect();
    assert!(
        String::from_utf8_lossy(&out).contains("got-term"),
        "{events:?}"
    );
    let exit = events.iter().find_map(|e| match e {
        HostEvent::Event { topic, payload } if topic == "agent/a9/exit" => {
            Some(ExitStatus::decode(payload.clone()).unwrap())
        }
        _ => None,
    });
    assert_eq!(exit, Some(ExitStatus { code: 0, signal: 0 }));
    let outcome = tokio::time::timeout(Duration::from_secs(10), agent)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        outcome,
        Outcome::Shutdown {
            reason: "test".into()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let (_dir, listener, cfg, agent) = host_and_agent(
        Some(cmd(&[
            "sh",
            "-c",
            "trap '' TERM; while :; do sleep 0.05; done",
        ])),
        0,
    )
    .await;
    let mut conn = host::accept(&listener, cfg).await.unwrap();
    conn.wait_ready(Duration::from_secs(20)).await.unwrap();
    conn.shutdown("a9", 300, "test").await.unwrap();
    let events = conn.wait_closed(Duration::from_secs(20)).await.unwrap();
    let exit = events.iter().find_map(|e| match e {
        HostEvent::Event { topic, payload } if topic == "agent/a9/exit" => {
            Some(ExitStatus::decode(payload.clone()).unwrap())
        }
        _ => None,
    });
    assert_eq!(
        exit,
        Some(ExitStatus {
            code: -1,
            signal: libc::SIGKILL
        })
    );
    assert!(matches!(agent.await.unwrap(), Outcome::Shutdown { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_reaped() {
    // Make this test process the subreaper of its descendants, as PID 1 is in a guest.
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0);
    let (_dir, listener, cfg, agent) = host_and_agent(None, 0).await;
    let mut conn = host::accept(&listener, cfg).await.unwrap();
    conn.wait_ready(Duration::from_secs(20)).await.unwrap();
    let before = cell0_agent::process::reaper().orphans_reaped();
    // The shell exits at once; its background children become orphans of ours.
    let r = conn
        .exec("a9", &api::ExecRequest { command: Some(cmd(&["sh", "-c", "sleep 0.1 </dev/null >/dev/null 2>&1 & sleep 0.1 </dev/null >/dev/null 2>&1 & exit 0"])), ..Default::default() }, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.status.unwrap().code, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cell0_agent::process::reaper().orphans_reaped() < before + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "orphans were not reaped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // No zombie children left.
    let me = std::process::id().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        if f.len() > 2 && f[1] == me {
            assert_ne!(f[0], "Z", "zombie child {}", e.path().display());
        }
    }
    conn.shutdown("a9", 100, "done").await.unwrap();
    conn.wait_closed(Duration::from_secs(10)).await.unwrap();
    agent.await.unwrap();
}
