// SPDX-License-Identifier: Apache-2.0
//! `cell0-demo`: the main job on one host, end to end, with real parts: boot the
//! nano guest in a KVM micro-VM with a per-VM vTPM (measured boot), enroll its
//! attestation key, verify a quote against golden values, talk SYPAS to the
//! guest over virtio-vsock, and shut it down.
#![allow(clippy::print_stdout)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cell0_attest::Verdict;
use cell0_proto::host::{Client, ClientConfig, Endpoint, ReconnectPolicy};
use cell0_tests::attest::{self, VmSpec};
use cell0_tests::{ChildGuard, SERVE_LISTENING, bin, vmm, wait_for_path, wait_for_serial_line};

const GUEST_CMDLINE: &str = "cell0.test=sypas-serve cell0.port=5000";
const CID: u64 = 3;

fn main() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::Builder::new().prefix("cell0-demo-").tempdir()?;
    let ca = dir.path().join("ca");
    let api = dir.path().join("api.sock");
    let uds = dir.path().join("vsock.sock");
    let kernel = dir.path().join("nano.elf");
    let st = vmm().arg("nano-image").arg("--out").arg(&kernel).status()?;
    if !st.success() {
        bail!("cell0-vmm nano-image failed");
    }

    println!("[1/5] boot: the nano guest in a KVM micro-VM, measured into its own vTPM");
    let mut child = vmm()
        .env("CELL0_TPM_CA_DIR", &ca)
        .arg("launch")
        .arg("--kernel")
        .arg(&kernel)
        .args(["--cmdline", GUEST_CMDLINE, "--memory-mib", "128"])
        .args(["--cid", &CID.to_string(), "--vsock-uds"])
        .arg(&uds)
        .args(["--tpm", "--agent-id", "demo-agent", "--run-dir"])
        .arg(dir.path().join("run"))
        .arg("--api-sock")
        .arg(&api)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start cell0-vmm")?;
    let out = child.stdout.take().context("no serial output")?;
    let mut guard = ChildGuard(child);
    wait_for_serial_line(out, SERVE_LISTENING, Some("      guest | "))?;
    if !wait_for_path(&api, Duration::from_secs(30)) {
        bail!("the VMM did not open its API socket");
    }
    println!(
        "      VM up after {:.0} ms (most of it is swtpm manufacturing the vTPM's EK)",
        t0.elapsed().as_secs_f64() * 1e3
    );

    println!(
        "[2/5] enroll: EK certificate checked against the host CA, AK bound by make/activate credential"
    );
    let mut verifier = attest::verifier(&ca)?;
    attest::enroll(&mut verifier, "demo", &api)?;

    println!("[3/5] attest: quote over a fresh nonce, event log replayed, golden values compared");
    let spec = VmSpec {
        kernel: std::fs::read(&kernel)?,
        cmdline: format!("{GUEST_CMDLINE} virtio_mmio.device=4K@0xd0000000:5 cell0.cpus=1"),
        vcpus: 1,
        memory_mib: 128,
        vsock: Some((CID, 0xd000_0000, 5)),
        agent_id: "demo-agent".into(),
        command: vec![],
    };
    let manifest = spec.manifest(&bin("cell0-vmm"))?;
    let nonce = verifier.issue_nonce("demo");
    let (quote, log) = attest::quote(&api, &nonce)?;
    let verdict = verifier.verify("demo", &quote, &log, &manifest);
    match &verdict {
        Verdict::Trusted { .. } => println!(
            "      verdict: TRUSTED ({} events, PCRs 0/4/8/9/11/12)",
            log.events.len()
        ),
        _ => bail!("verdict: {verdict}"),
    }

    println!("[4/5] SYPAS over virtio-vsock: host -> guest port 5000 through the hybrid socket");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let cfg = ClientConfig {
            agent_id: "demo-host".into(),
            reconnect: ReconnectPolicy::never(),
            ..ClientConfig::default()
        };
        let c = Client::connect(
            Endpoint::HybridVsock {
                uds: uds.clone(),
                port: 5000,
            },
            cfg,
        )
        .await?;
        println!("      HELLO -> WELCOME");
        let mut rtt = Vec::new();
        for i in 0..1000u32 {
            let t = Instant::now();
            let r = c.call("echo", "echo", i.to_le_bytes().to_vec()).await?;
            rtt.push(t.elapsed());
            if r.payload.as_ref() != i.to_le_bytes() {
                bail!("echo {i} came back wrong");
            }
        }
        rtt.sort();
        let ping = c.ping().await?;
        println!(
            "      1000 echo calls checked; round trip p50 {:.1} us, p99 {:.1} us; PING {:.1} us",
            rtt[500].as_secs_f64() * 1e6,
            rtt[990].as_secs_f64() * 1e6,
            ping.as_secs_f64() * 1e6
        );
        c.goodbye("done").await?;
        Ok::<_, anyhow::Error>(())
    })?;

    println!("[5/5] shutdown: GOODBYE -> the guest resets -> cell0-vmm exits");
    let status = guard.0.wait()?;
    if !status.success() {
        bail!("cell0-vmm exited with {status}");
    }
    println!(
        "      cell0-vmm exited 0; vTPM stopped; total {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
