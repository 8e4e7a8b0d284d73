// SPDX-License-Identifier: Apache-2.0
//! `cell0-attest`: the verifier's command line.
//!
//! ```text
//! cell0-attest nonce
//! cell0-attest enroll-challenge --vm ID --ak AK.json --ca CA.pem [--state S] [--out C.json]
//! cell0-attest enroll-finish    --vm ID --response R.json --ca CA.pem [--state S]
//! cell0-attest verify --vm ID --quote Q --event-log L --manifest M --nonce N [--state S] [--json]
//! cell0-attest manifest --kernel K [--initrd I] --cmdline C --vm-config C.json
//!                       --workload W.json --vmm-binary B --vmm-version V [--name N]
//! ```
//!
//! `verify` exits 0 when the verdict is trusted, 1 when it is rejected, and 2
//! on a usage or input error.

#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use cell0_attest::verify::VerifierState;
use cell0_attest::{
    ActivationResponse, AkBundle, BootInputs, EventLog, Manifest, Nonce, QuoteBundle, Verifier,
    VmConfig, VmmIdentity, Wire, WorkloadSpec, hash_file,
};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cell0-attest", version, about = "Verify cell0 vTPM quotes")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a fresh 32-byte nonce (hex).
    Nonce,
    /// Check a VM's EK certificate and AK, and print a credential challenge.
    EnrollChallenge {
        /// The VM the AK belongs to.
        #[arg(long)]
        vm: String,
        /// The AK bundle (JSON) from the VM's vTPM.
        #[arg(long)]
        ak: PathBuf,
        /// The CA certificates (PEM) that sign EK certificates.
        #[arg(long)]
        ca: PathBuf,
        /// Verifier state file.
        #[arg(
            long,
            env = "CELL0_ATTEST_STATE",
            default_value = "cell0-attest-state.json"
        )]
        state: PathBuf,
        /// Write the challenge here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Trust the VM's AK if its vTPM recovered the challenge's secret.
    EnrollFinish {
        /// The VM.
        #[arg(long)]
        vm: String,
        /// The credential response (JSON) from the VM's vTPM.
        #[arg(long)]
        response: PathBuf,
        /// The CA certificates (PEM).
        #[arg(long)]
        ca: PathBuf,
        /// Verifier state file.
        #[arg(
            long,
            env = "CELL0_ATTEST_STATE",
            default_value = "cell0-attest-state.json"
        )]
        state: PathBuf,
    },
    /// Verify a quote and event log against a manifest; print the verdict.
    Verify {
        /// The VM whose enrolled AK must have signed the quote.
        #[arg(long)]
        vm: String,
        /// The quote bundle (JSON).
        #[arg(long)]
        quote: PathBuf,
        /// The event log (JSON Lines).
        #[arg(long)]
        event_log: PathBuf,
        /// The golden-value manifest (JSON).
        #[arg(long)]
        manifest: PathBuf,
        /// The nonce the quote must carry (64 hex digits).
        #[arg(long)]
        nonce: String,
        /// Verifier state file (enrolled AKs, last clock per VM).
        #[arg(
            long,
            env = "CELL0_ATTEST_STATE",
            default_value = "cell0-attest-state.json"
        )]
        state: PathBuf,
        /// Print the verdict as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the golden-value manifest for a set of boot inputs.
    Manifest {
        /// Kernel image.
        #[arg(long)]
        kernel: PathBuf,
        /// Initrd, if the VM boots one.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// The full kernel command line the guest sees.
        #[arg(long)]
        cmdline: String,
        /// The VM config (JSON, see docs/ATTESTATION.md).
        #[arg(long)]
        vm_config: PathBuf,
        /// The workload spec (JSON).
        #[arg(long)]
        workload: PathBuf,
        /// The cell0-vmm executable.
        #[arg(long)]
        vmm_binary: PathBuf,
        /// The cell0-vmm version string.
        #[arg(long)]
        vmm_version: String,
        /// A name for the manifest.
        #[arg(long)]
        name: Option<String>,
    },
}

fn read_text(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
}

fn verifier(ca: &Path, state: &Path) -> Result<Verifier> {
    Ok(Verifier::with_state(
        &read_text(ca)?,
        VerifierState::load(state)?,
    )?)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Nonce => println!("{}", Nonce::random()),
        Cmd::EnrollChallenge {
            vm,
            ak,
            ca,
            state,
            out,
        } => {
            let mut v = verifier(&ca, &state)?;
            let challenge = v.begin_enrollment(&vm, &AkBundle::read_file(&ak)?)?;
            v.state().save(&state)?;
            match out {
                Some(p) => std::fs::write(&p, challenge.to_json())
                    .with_context(|| format!("cannot write {}", p.display()))?,
                None => println!("{}", challenge.to_json()),
            }
        }
        Cmd::EnrollFinish {
            vm,
            response,
            ca,
            state,
        } => {
            let mut v = verifier(&ca, &state)?;
            let result = v.finish_enrollment(&vm, &ActivationResponse::read_file(&response)?);
            // The pending enrollment is used up either way.
            v.state().save(&state)?;
            let ak = result?;
            println!("enrolled AK {} for VM {vm}", hex::encode(ak.ak_name));
        }
        Cmd::Verify {
            vm,
            quote,
            event_log,
            manifest,
            nonce,
            state,
            json,
        } => {
            let nonce: Nonce = nonce.parse()?;
            let quote = QuoteBundle::read_file(&quote)?;
            let log = EventLog::read_file(&event_log)?;
            let manifest = Manifest::read_file(&manifest)?;
            let mut v = Verifier::for_enrolled(VerifierState::load(&state)?);
            let verdict = v.verify_with_nonce(&vm, &nonce, &quote, &log, &manifest);
            v.state().save(&state)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&verdict)?);
            } else {
                print!("{verdict}");
                if verdict.is_trusted() {
                    println!();
                }
            }
            return Ok(if verdict.is_trusted() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        Cmd::Manifest {
            kernel,
            initrd,
            cmdline,
            vm_config,
            workload,
            vmm_binary,
            vmm_version,
            name,
        } => {
            let read =
                |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
            let kernel = read(&kernel)?;
            let initrd = initrd.as_deref().map(read).transpose()?;
            let config: VmConfig = serde_json::from_str(&read_text(&vm_config)?)
                .with_context(|| format!("{} is not a VM config", vm_config.display()))?;
            let workload: WorkloadSpec = serde_json::from_str(&read_text(&workload)?)
                .with_context(|| format!("{} is not a workload spec", workload.display()))?;
            let vmm = VmmIdentity {
                binary: hash_file(&vmm_binary)?,
                version: vmm_version,
            };
            let inputs = BootInputs {
                vmm: &vmm,
                kernel: &kernel,
                cmdline: cmdline.as_bytes(),
                initrd: initrd.as_deref(),
                config: &config,
                workload: &workload,
            };
            println!("{}", Manifest::for_boot(name, &inputs)?.to_json());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cell0-attest: {e:#}");
            ExitCode::from(2)
        }
    }
}
