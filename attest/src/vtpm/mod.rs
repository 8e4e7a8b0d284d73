// SPDX-License-Identifier: Apache-2.0
//! One swtpm vTPM per VM: lifecycle, measured boot, quotes and AK activation.
//!
//! A [`Vtpm`] owns a worker thread that owns everything non-`Send`: the swtpm
//! child and the tss-esapi context (one TCP connection, kept for the vTPM's
//! whole life, so no other local process can talk to this swtpm meanwhile).
//! The methods send requests to that thread; `Vtpm` is `Send + Sync`.
//!
//! Layout under the VM's run dir:
//!
//! ```text
//! <run_dir>/vtpm/state/           swtpm state (EK seeds, NV, EK certificate)
//! <run_dir>/vtpm/swtpm.log        swtpm's stdout/stderr
//! <run_dir>/vtpm/swtpm_setup.log  manufacturing log
//! <run_dir>/vtpm/event-log.jsonl  the measured-boot event log
//! ```

mod process;
mod setup;
mod tpm;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use setup::LocalCa;

use crate::eventlog::{EventLog, EventLogError, EventType, PcrValues};
use crate::formats::{
    AK_FORMAT, ActivationResponse, AkBundle, CredentialChallenge, Nonce, QUOTE_FORMAT, QuoteBundle,
    RESPONSE_FORMAT,
};
use crate::measure::{BootInputs, MeasureError, boot_events};
use process::{Killer, SwtpmProcess};
use tpm::TpmConn;

/// The environment variable that overrides the default CA directory.
pub const CA_DIR_ENV: &str = "CELL0_TPM_CA_DIR";
/// The default host-local CA directory.
pub const DEFAULT_CA_DIR: &str = "/var/lib/cell0/tpm-ca";

/// Errors of the vTPM lifecycle and operations.
#[derive(Debug, thiserror::Error)]
pub enum VtpmError {
    /// swtpm, swtpm_setup or swtpm_localca is not installed.
    #[error(
        "{program} was not found; install the swtpm and swtpm-tools packages (see attest/README.md)"
    )]
    NotInstalled {
        /// The program that was not found.
        program: PathBuf,
    },
    /// Starting a child process failed.
    #[error("cannot start a vTPM process")]
    Spawn {
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Finding a free TCP port failed.
    #[error("cannot find a free TCP port on 127.0.0.1 for swtpm")]
    Port(#[source] std::io::Error),
    /// Every port tried was taken by another process before swtpm bound it.
    #[error("swtpm lost the race for a free port {attempts} times")]
    NoFreePort {
        /// How many ports were tried.
        attempts: u32,
    },
    /// A file or directory operation failed.
    #[error("cannot access {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// swtpm_setup failed.
    #[error("swtpm_setup failed ({status}): {log}")]
    Setup {
        /// Its exit status.
        status: String,
        /// The end of its log.
        log: String,
    },
    /// swtpm_setup did not finish in time.
    #[error("swtpm_setup did not finish within {waited:?}")]
    SetupTimedOut {
        /// The limit.
        waited: Duration,
    },
    /// swtpm did not answer on its control channel in time.
    #[error("swtpm did not become ready within {waited:?}")]
    NotReady {
        /// The limit.
        waited: Duration,
    },
    /// swtpm exited (during start-up or while the VM ran).
    #[error("swtpm exited ({status}); its log ends: {log}")]
    Exited {
        /// How it ended.
        status: String,
        /// The end of its log.
        log: String,
    },
    /// A TPM command failed.
    #[error("the vTPM failed to {op}")]
    Tpm {
        /// What was being done.
        op: &'static str,
        /// The TSS error.
        #[source]
        source: tss_esapi::Error,
    },
    /// An event names a PCR outside the measured set.
    #[error("PCR {pcr} is not one cell0 measures into")]
    UnmeasuredPcr {
        /// The PCR.
        pcr: u8,
    },
    /// The TPM answered something unexpected.
    #[error("the vTPM returned {what}")]
    UnexpectedResponse {
        /// What was wrong.
        what: &'static str,
    },
    /// `record_boot` was given events out of the boot order.
    #[error("the events are not a cell0 boot (DESIGN.md §5 order and PCRs)")]
    NotABootLog,
    /// `measure_boot` was called twice.
    #[error("this vTPM has already measured a boot; start a new vTPM for a new boot")]
    AlreadyMeasured,
    /// The boot inputs cannot be measured.
    #[error("cannot measure the boot inputs")]
    Measure(#[from] MeasureError),
    /// The event log cannot be written.
    #[error("cannot write the event log")]
    EventLog(#[from] EventLogError),
    /// A credential challenge names another AK.
    #[error("the credential challenge is for AK {got}, this vTPM's AK is {expected}")]
    WrongAk {
        /// This vTPM's AK name (hex).
        expected: String,
        /// The challenge's AK name (hex).
        got: String,
    },
    /// swtpm did not answer a command in time; it was killed.
    #[error("swtpm did not answer within {waited:?} and was killed")]
    Unresponsive {
        /// The limit.
        waited: Duration,
    },
    /// The worker thread is gone (it panicked).
    #[error("the vTPM worker thread has stopped")]
    WorkerGone,
    /// The caller's worker start hook failed (see [`VtpmOptions::worker_init`]).
    #[error("the vTPM worker's start hook failed: {0}")]
    WorkerInit(String),
}

/// How to start a vTPM.
#[derive(Debug, Clone)]
pub struct VtpmOptions {
    /// The VM's run directory; the vTPM lives in `<run_dir>/vtpm/`.
    pub run_dir: PathBuf,
    /// The host-local CA directory (see [`LocalCa`]).
    pub ca_dir: PathBuf,
    /// The swtpm executable.
    pub swtpm: PathBuf,
    /// The swtpm_setup executable.
    pub swtpm_setup: PathBuf,
    /// The swtpm_localca executable.
    pub swtpm_localca: PathBuf,
    /// How long to wait for swtpm to answer after it was started.
    pub ready_timeout: Duration,
    /// How long manufacturing (swtpm_setup) may take.
    pub setup_timeout: Duration,
    /// How long one operation (measure, quote, activate, read) may take before
    /// swtpm is declared hung and killed.
    pub op_timeout: Duration,
    /// Keep `<run_dir>/vtpm/` when the vTPM stops (default: remove it).
    pub keep_state: bool,
    /// Run on the worker thread once swtpm answers and the AK exists, before
    /// the first request (cell0-vmm installs the thread's seccomp filter here).
    /// An error stops the vTPM's start.
    pub worker_init: Option<fn() -> Result<(), String>>,
}

impl VtpmOptions {
    /// Defaults: programs from `PATH`, 10 s readiness, 60 s manufacturing, 30 s
    /// per operation.
    pub fn new(run_dir: impl Into<PathBuf>, ca_dir: impl Into<PathBuf>) -> Self {
        VtpmOptions {
            run_dir: run_dir.into(),
            ca_dir: ca_dir.into(),
            swtpm: PathBuf::from("swtpm"),
            swtpm_setup: PathBuf::from("swtpm_setup"),
            swtpm_localca: PathBuf::from("swtpm_localca"),
            ready_timeout: Duration::from_secs(10),
            setup_timeout: Duration::from_secs(60),
            op_timeout: Duration::from_secs(30),
            keep_state: false,
            worker_init: None,
        }
    }

    /// [`VtpmOptions::new`] with the CA directory from `CELL0_TPM_CA_DIR`, or
    /// [`DEFAULT_CA_DIR`].
    pub fn with_default_ca(run_dir: impl Into<PathBuf>) -> Self {
        let ca = std::env::var_os(CA_DIR_ENV).map_or_else(|| DEFAULT_CA_DIR.into(), PathBuf::from);
        Self::new(run_dir, ca)
    }
}

type Reply<T> = mpsc::SyncSender<Result<T, VtpmError>>;

enum Request {
    Extend(EventLog, Reply<()>),
    Quote(Nonce, Reply<QuoteBundle>),
    Activate(CredentialChallenge, Reply<Vec<u8>>),
    ReadPcrs(Reply<PcrValues>),
}

struct Started {
    pid: u32,
    killer: Killer,
    port: u16,
    ak: AkBundle,
    timings: StartTimings,
}

/// Where a vTPM's start-up time went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartTimings {
    /// swtpm_setup: EK creation and certificate (zero when the state existed).
    pub manufacture: Duration,
    /// swtpm started until it answered on its control channel.
    pub swtpm_ready: Duration,
    /// ESAPI connection, AK creation and load, EK certificate read.
    pub ak: Duration,
}

/// A running vTPM for one VM. Dropping it stops swtpm and removes its files
/// (unless `keep_state`).
pub struct Vtpm {
    tx: Option<mpsc::Sender<Request>>,
    worker: Option<JoinHandle<()>>,
    killer: Killer,
    op_timeout: Duration,
    pid: u32,
    port: u16,
    dir: PathBuf,
    keep_state: bool,
    ak: AkBundle,
    timings: StartTimings,
    measured: std::sync::Mutex<bool>,
}

impl std::fmt::Debug for Vtpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vtpm")
            .field("pid", &self.pid)
            .field("port", &self.port)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Vtpm {
    /// Manufactures (swtpm_setup) and starts a vTPM for a VM, waits until it
    /// answers, and creates its AK.
    pub fn start(opts: &VtpmOptions) -> Result<Self, VtpmError> {
        let dir = opts.run_dir.join("vtpm");
        let state = dir.join("state");
        std::fs::create_dir_all(&state).map_err(|source| VtpmError::Io {
            path: state.clone(),
            source,
        })?;
        let ca = LocalCa::open(&opts.ca_dir, &opts.swtpm_localca)?;
        let (tx, rx) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<Started, VtpmError>>(1);
        let worker_opts = opts.clone();
        let worker_dir = dir.clone();
        // The worker thread spawns swtpm, so PDEATHSIG fires when the thread
        // ends; it lives exactly as long as this Vtpm.
        let worker = std::thread::Builder::new()
            .name("cell0-vtpm".into())
            .spawn(move || worker_main(worker_opts, ca, worker_dir, rx, ready_tx))
            .map_err(|source| VtpmError::Spawn { source })?;
        let started = match ready_rx.recv() {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let _ = worker.join();
                if !opts.keep_state {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                return Err(e);
            }
            Err(_) => {
                let _ = worker.join();
                return Err(VtpmError::WorkerGone);
            }
        };
        tracing::info!(pid = started.pid, port = started.port, "vTPM started");
        Ok(Vtpm {
            tx: Some(tx),
            worker: Some(worker),
            killer: started.killer,
            op_timeout: opts.op_timeout,
            pid: started.pid,
            port: started.port,
            dir,
            keep_state: opts.keep_state,
            ak: started.ak,
            timings: started.timings,
            measured: std::sync::Mutex::new(false),
        })
    }

    /// The swtpm process id.
    pub fn swtpm_pid(&self) -> u32 {
        self.pid
    }

    /// The TCP port swtpm serves TPM commands on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `<run_dir>/vtpm`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where [`Vtpm::measure_boot`] writes the event log.
    pub fn event_log_path(&self) -> PathBuf {
        self.dir.join("event-log.jsonl")
    }

    /// Where start-up time went.
    pub fn start_timings(&self) -> StartTimings {
        self.timings
    }

    /// The AK and EK certificate, for enrollment with a verifier.
    pub fn ak_bundle(&self) -> &AkBundle {
        &self.ak
    }

    /// Hashes the boot inputs, extends PCRs 0/4/8/9/11/12 in the order of
    /// DESIGN.md §5 and writes the event log. Call it once, before the first
    /// vCPU runs.
    pub fn measure_boot(&self, inputs: &BootInputs<'_>) -> Result<EventLog, VtpmError> {
        // Hash in the caller's thread; only the extends go to the worker.
        let log = boot_events(inputs)?;
        self.record_boot(&log)?;
        Ok(log)
    }

    /// The second half of [`Vtpm::measure_boot`]: extends the events of
    /// [`boot_events`](crate::boot_events) and writes the event log. A VMM can
    /// hash the inputs while the vTPM starts, then call this. Once per vTPM;
    /// only logs in the boot order of DESIGN.md §5 are accepted, or a node's
    /// admission log ([`crate::node::node_events`]).
    pub fn record_boot(&self, log: &EventLog) -> Result<(), VtpmError> {
        let layout: Vec<(u8, EventType)> = log.events.iter().map(|e| (e.pcr, e.kind)).collect();
        let layout_of = |order: &[EventType]| -> Vec<(u8, EventType)> {
            order.iter().map(|t| (t.pcr(), *t)).collect()
        };
        // A VM's boot, or a node's binaries for its admission (node_events).
        if layout != layout_of(&EventType::BOOT_ORDER)
            && layout != layout_of(&EventType::NODE_ORDER)
        {
            return Err(VtpmError::NotABootLog);
        }
        let mut measured = self
            .measured
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *measured {
            return Err(VtpmError::AlreadyMeasured);
        }
        *measured = true;
        self.call(|r| Request::Extend(log.clone(), r))?;
        log.write_file(&self.event_log_path())?;
        Ok(())
    }

    /// Quotes the measured PCRs with `nonce` as qualifying data.
    pub fn quote(&self, nonce: &Nonce) -> Result<QuoteBundle, VtpmError> {
        self.call(|r| Request::Quote(*nonce, r))
    }

    /// Answers a verifier's credential challenge (TPM2_ActivateCredential).
    pub fn activate_credential(
        &self,
        challenge: &CredentialChallenge,
    ) -> Result<ActivationResponse, VtpmError> {
        if challenge.ak_name != self.ak.ak_name {
            return Err(VtpmError::WrongAk {
                expected: hex::encode(&self.ak.ak_name),
                got: hex::encode(&challenge.ak_name),
            });
        }
        let secret = self.call(|r| Request::Activate(challenge.clone(), r))?;
        Ok(ActivationResponse {
            format: RESPONSE_FORMAT.to_string(),
            ak_name: self.ak.ak_name.clone(),
            secret,
        })
    }

    /// Reads the measured PCRs.
    pub fn read_pcrs(&self) -> Result<PcrValues, VtpmError> {
        self.call(Request::ReadPcrs)
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, VtpmError> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        self.tx
            .as_ref()
            .ok_or(VtpmError::WorkerGone)?
            .send(make(rtx))
            .map_err(|_| VtpmError::WorkerGone)?;
        match rrx.recv_timeout(self.op_timeout) {
            Ok(res) => res,
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(VtpmError::WorkerGone),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // A hung swtpm blocks the worker in a read; killing it ends
                // the read, and the worker reports the exit to later calls.
                tracing::error!(pid = self.pid, "swtpm is unresponsive, killing it");
                self.killer.kill();
                let _ = rrx.recv_timeout(Duration::from_secs(5));
                Err(VtpmError::Unresponsive {
                    waited: self.op_timeout,
                })
            }
        }
    }
}

impl Drop for Vtpm {
    fn drop(&mut self) {
        // Closing the channel ends the worker, which closes the TPM
        // connection and stops swtpm.
        self.tx = None;
        if let Some(w) = self.worker.take() {
            // Bounded: a hung swtpm is killed so the worker can finish.
            let end = std::time::Instant::now() + Duration::from_secs(5);
            while !w.is_finished() && std::time::Instant::now() < end {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !w.is_finished() {
                tracing::error!(pid = self.pid, "vTPM did not stop, killing swtpm");
                self.killer.kill();
            }
            let _ = w.join();
        }
        if !self.keep_state {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove vTPM state");
            }
        }
    }
}

fn worker_main(
    opts: VtpmOptions,
    ca: LocalCa,
    dir: PathBuf,
    rx: mpsc::Receiver<Request>,
    ready: mpsc::SyncSender<Result<Started, VtpmError>>,
) {
    let (mut proc, mut conn, started) = match worker_start(&opts, &ca, &dir) {
        Ok(v) => v,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if let Some(Err(e)) = opts.worker_init.map(|init| init()) {
        conn.close();
        proc.stop();
        let _ = ready.send(Err(VtpmError::WorkerInit(e)));
        return;
    }
    if ready.send(Ok(started)).is_err() {
        conn.close();
        proc.stop();
        return;
    }
    while let Ok(req) = rx.recv() {
        if let Err(e) = proc.check_alive() {
            reply_err(req, e);
            continue;
        }
        match req {
            Request::Extend(log, r) => {
                let res = log
                    .events
                    .iter()
                    .try_for_each(|e| conn.extend(e.pcr, &e.digest));
                let _ = r.send(res.map_err(|e| explain(&mut proc, e)));
            }
            Request::Quote(nonce, r) => {
                let res = conn.quote(&nonce.0).and_then(|(attest, signature)| {
                    Ok(QuoteBundle {
                        format: QUOTE_FORMAT.to_string(),
                        ak_name: conn.ak_name.clone(),
                        attest,
                        signature,
                        pcrs: conn.read_pcrs()?,
                    })
                });
                let _ = r.send(res.map_err(|e| explain(&mut proc, e)));
            }
            Request::Activate(c, r) => {
                let res = conn.activate_credential(&c.credential_blob, &c.encrypted_secret);
                let _ = r.send(res.map_err(|e| explain(&mut proc, e)));
            }
            Request::ReadPcrs(r) => {
                let res = conn.read_pcrs();
                let _ = r.send(res.map_err(|e| explain(&mut proc, e)));
            }
        }
    }
    conn.close();
    proc.stop();
}

fn worker_start(
    opts: &VtpmOptions,
    ca: &LocalCa,
    dir: &Path,
) -> Result<(SwtpmProcess, TpmConn, Started), VtpmError> {
    let state = dir.join("state");
    let t = Instant::now();
    if !state.join("tpm2-00.permall").exists() {
        setup::manufacture(opts, ca, &state, &dir.join("swtpm_setup.log"))?;
    }
    let manufacture = t.elapsed();
    let t = Instant::now();
    let mut proc = SwtpmProcess::start(opts, &state, &dir.join("swtpm.log"))?;
    let swtpm_ready = t.elapsed();
    let t = Instant::now();
    let mut conn = TpmConn::open(proc.port()).map_err(|e| explain(&mut proc, e))?;
    let ek_cert = conn.ek_cert().map_err(|e| explain(&mut proc, e))?;
    let timings = StartTimings {
        manufacture,
        swtpm_ready,
        ak: t.elapsed(),
    };
    let started = Started {
        timings,
        pid: proc.pid(),
        killer: proc.killer(),
        port: proc.port(),
        ak: AkBundle {
            format: AK_FORMAT.to_string(),
            ak_public: conn.ak_public.clone(),
            ak_name: conn.ak_name.clone(),
            ek_cert,
        },
    };
    Ok((proc, conn, started))
}

/// A TPM command failed: if swtpm died, say that instead.
fn explain(proc: &mut SwtpmProcess, e: VtpmError) -> VtpmError {
    if !matches!(e, VtpmError::Tpm { .. }) {
        return e;
    }
    // The connection breaks while swtpm exits; give the exit a moment to
    // become visible to waitpid.
    for _ in 0..20 {
        if let Err(dead) = proc.check_alive() {
            return dead;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    e
}

fn reply_err(req: Request, e: VtpmError) {
    match req {
        Request::Extend(_, r) => {
            let _ = r.send(Err(e));
        }
        Request::Quote(_, r) => {
            let _ = r.send(Err(e));
        }
        Request::Activate(_, r) => {
            let _ = r.send(Err(e));
        }
        Request::ReadPcrs(r) => {
            let _ = r.send(Err(e));
        }
    }
}
