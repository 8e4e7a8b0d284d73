// SPDX-License-Identifier: Apache-2.0
//! Manufacturing a vTPM with `swtpm_setup`: EK, EK certificate signed by the
//! host-local CA (swtpm_localca), SHA-256 PCR bank.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::process::child_setup;
use super::{VtpmError, VtpmOptions};

/// The CA's issuing certificate, written by swtpm_localca.
const ISSUER_CERT: &str = "issuercert.pem";
/// The CA's self-signed root, written by swtpm_localca.
const ROOT_CERT: &str = "swtpm-localca-rootca-cert.pem";

/// The host-local CA that signs every vTPM's EK certificate.
///
/// The directory holds swtpm_localca's keys and certificates and the config
/// files that point swtpm_setup at them. swtpm_localca creates the keys on the
/// first EK certificate it signs and serializes concurrent users with a lock
/// file in the directory.
#[derive(Debug, Clone)]
pub struct LocalCa {
    dir: PathBuf,
}

impl LocalCa {
    /// Opens (creating if needed) the CA directory and writes its config files.
    pub fn open(dir: &Path, swtpm_localca: &Path) -> Result<Self, VtpmError> {
        let io = |source| VtpmError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let dir = dir.canonicalize().map_err(io)?;
        let ca = LocalCa { dir };
        let d = ca.dir.display();
        ca.write_if_changed(
            "swtpm-localca.conf",
            &format!(
                "statedir = {d}\nsigningkey = {d}/signkey.pem\nissuercert = {d}/{ISSUER_CERT}\n\
                 certserial = {d}/certserial\n"
            ),
        )?;
        ca.write_if_changed(
            "swtpm-localca.options",
            "--platform-manufacturer cell0\n--platform-version 1.0\n--platform-model cell0-vmm\n",
        )?;
        let localca = find_program(swtpm_localca).unwrap_or_else(|| swtpm_localca.to_path_buf());
        ca.write_if_changed(
            "swtpm_setup.conf",
            &format!(
                "create_certs_tool = {}\ncreate_certs_tool_config = {d}/swtpm-localca.conf\n\
                 create_certs_tool_options = {d}/swtpm-localca.options\nactive_pcr_banks = sha256\n",
                localca.display()
            ),
        )?;
        Ok(ca)
    }

    /// The CA directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificates (issuer, then root) as PEM: the trust anchors a
    /// verifier needs. Present once the first vTPM has been manufactured.
    pub fn bundle_pem(&self) -> Result<String, VtpmError> {
        let mut out = String::new();
        for name in [ISSUER_CERT, ROOT_CERT] {
            let p = self.dir.join(name);
            let text = std::fs::read_to_string(&p).map_err(|source| VtpmError::Io {
                path: p.clone(),
                source,
            })?;
            out.push_str(&text);
            if !text.ends_with('\n') {
                out.push('\n');
            }
        }
        Ok(out)
    }

    fn write_if_changed(&self, name: &str, content: &str) -> Result<(), VtpmError> {
        let path = self.dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() == Some(content) {
            return Ok(());
        }
        // Unique temp name so concurrent starts never see a half-written file.
        let tmp = self.dir.join(format!(
            ".{name}.{}.{:?}.tmp",
            std::process::id(),
            std::thread::current().id()
        ));
        let io = |source| VtpmError::Io {
            path: path.clone(),
            source,
        };
        std::fs::write(&tmp, content).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }
}

/// Runs `swtpm_setup` on an empty state directory: creates the EK (RSA 2048 at
/// 0x81010001, plus an ECC EK), has the local CA sign its certificate into NV
/// index 0x01c00002, and leaves only the SHA-256 PCR bank active.
pub(crate) fn manufacture(
    opts: &VtpmOptions,
    ca: &LocalCa,
    state_dir: &Path,
    log_path: &Path,
) -> Result<(), VtpmError> {
    // swtpm_setup only reports a failed certificate tool in its log; say which
    // program is missing up front.
    for program in [&opts.swtpm_setup, &opts.swtpm_localca] {
        if find_program(program).is_none() {
            return Err(VtpmError::NotInstalled {
                program: program.clone(),
            });
        }
    }
    let parent = std::process::id();
    let mut cmd = Command::new(&opts.swtpm_setup);
    cmd.arg("--tpm2")
        .arg("--tpmstate")
        .arg(state_dir)
        .arg("--create-ek-cert")
        .arg("--pcr-banks")
        .arg("sha256")
        .arg("--config")
        .arg(ca.dir().join("swtpm_setup.conf"))
        .arg("--logfile")
        .arg(log_path)
        .arg("--overwrite")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if opts.swtpm != Path::new("swtpm") {
        cmd.arg("--tpm")
            .arg(format!("{} socket", opts.swtpm.display()));
    }
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (prctl, getppid).
    unsafe {
        cmd.pre_exec(move || child_setup(None, parent));
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(VtpmError::NotInstalled {
                program: opts.swtpm_setup.clone(),
            });
        }
        Err(source) => return Err(VtpmError::Spawn { source }),
    };
    let end = Instant::now() + opts.setup_timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(VtpmError::SetupTimedOut {
                    waited: opts.setup_timeout,
                });
            }
            Err(source) => return Err(VtpmError::Spawn { source }),
        }
    };
    if status.success() {
        return Ok(());
    }
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    let tail = log[log.len().saturating_sub(2048)..].trim().to_string();
    Err(VtpmError::Setup {
        status: status.to_string(),
        log: tail,
    })
}

/// `program` itself if it is a path, else the first match in `PATH`.
pub(crate) fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}
