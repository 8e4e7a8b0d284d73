// SPDX-License-Identifier: Apache-2.0
//! vTPM lifecycle against a real swtpm: clear errors when swtpm is missing,
//! hangs or dies, clean stop, no orphan after SIGKILL, 20 vTPMs at once.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cell0_attest::{Nonce, Verifier, Vtpm, VtpmError, VtpmOptions};
use common::{Boot, ca_bundle, is_alive, live_processes_mentioning, options, swtpm_available};

/// Env var that turns `orphan_helper_owns_a_vtpm` into the vTPM owner that
/// `no_orphan_swtpm_after_owner_is_sigkilled` kills.
const ORPHAN_DIR_ENV: &str = "CELL0_ATTEST_ORPHAN_DIR";

fn fake_program(dir: &Path, name: &str, script: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    writeln!(f, "#!/bin/sh\n{script}").unwrap();
    drop(f);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// A run dir whose vTPM state is already manufactured (kept after stop).
fn manufactured_run_dir() -> tempfile::TempDir {
    let run = tempfile::tempdir().unwrap();
    let mut opts = options(run.path());
    opts.keep_state = true;
    drop(Vtpm::start(&opts).unwrap());
    run
}

#[test]
fn missing_swtpm_is_a_clear_error() {
    // Needs no swtpm: that is the point.
    let run = tempfile::tempdir().unwrap();
    let ca = tempfile::tempdir().unwrap();
    let mut opts = VtpmOptions::new(run.path(), ca.path());
    opts.swtpm_setup = "/nonexistent/swtpm_setup".into();
    let err = Vtpm::start(&opts).unwrap_err();
    assert!(
        matches!(&err, VtpmError::NotInstalled { program } if program == Path::new("/nonexistent/swtpm_setup"))
    );
    assert!(
        err.to_string()
            .contains("install the swtpm and swtpm-tools packages"),
        "{err}"
    );
    // Nothing is left behind.
    assert!(!run.path().join("vtpm").exists());

    if !swtpm_available("missing_swtpm_is_a_clear_error (swtpm part)") {
        return;
    }
    let run = manufactured_run_dir();
    let mut opts = options(run.path());
    opts.swtpm = "/nonexistent/swtpm".into();
    let err = Vtpm::start(&opts).unwrap_err();
    assert!(
        matches!(&err, VtpmError::NotInstalled { program } if program == Path::new("/nonexistent/swtpm"))
    );
}

#[test]
fn swtpm_that_never_answers_times_out() {
    if !swtpm_available("swtpm_that_never_answers_times_out") {
        return;
    }
    let run = manufactured_run_dir();
    let bin = tempfile::tempdir().unwrap();
    let marker = bin.path().display().to_string();
    let fake = fake_program(bin.path(), "swtpm", &format!("exec sleep 60 # {marker}"));
    let mut opts = options(run.path());
    opts.swtpm = fake;
    opts.ready_timeout = Duration::from_millis(300);
    let t = Instant::now();
    let err = Vtpm::start(&opts).unwrap_err();
    assert!(
        matches!(err, VtpmError::NotReady { waited } if waited == Duration::from_millis(300)),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(30), "the wait is bounded");
    // The hung process was killed.
    assert!(live_processes_mentioning(&marker).is_empty());
}

#[test]
fn swtpm_that_dies_at_start_reports_its_log() {
    if !swtpm_available("swtpm_that_dies_at_start_reports_its_log") {
        return;
    }
    let run = manufactured_run_dir();
    let bin = tempfile::tempdir().unwrap();
    let fake = fake_program(
        bin.path(),
        "swtpm",
        "echo 'swtpm: cannot open the TPM state' >&2; exit 3",
    );
    let mut opts = options(run.path());
    opts.swtpm = fake;
    let err = Vtpm::start(&opts).unwrap_err();
    match &err {
        VtpmError::Exited { status, log } => {
            assert_eq!(status, "exit code 3");
            assert!(log.contains("cannot open the TPM state"), "{log}");
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn swtpm_killed_mid_run_gives_a_clear_error() {
    if !swtpm_available("swtpm_killed_mid_run_gives_a_clear_error") {
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let vtpm = Vtpm::start(&options(run.path())).unwrap();
    let boot = Boot::honest();
    vtpm.measure_boot(&boot.inputs()).unwrap();
    let pid = vtpm.swtpm_pid();
    // SAFETY: sending a signal to a child process this test owns.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let err = vtpm.quote(&Nonce::random()).unwrap_err();
    assert!(
        matches!(&err, VtpmError::Exited { status, .. } if status == "signal 9"),
        "{err}"
    );
    assert!(
        err.to_string().starts_with("swtpm exited (signal 9)"),
        "{err}"
    );
    // Later calls keep saying so, and dropping does not hang.
    assert!(matches!(vtpm.read_pcrs(), Err(VtpmError::Exited { .. })));
    drop(vtpm);
    assert!(!run.path().join("vtpm").exists());
}

#[test]
fn drop_stops_swtpm_and_removes_state_unless_kept() {
    if !swtpm_available("drop_stops_swtpm_and_removes_state_unless_kept") {
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let vtpm = Vtpm::start(&options(run.path())).unwrap();
    let pid = vtpm.swtpm_pid();
    assert!(is_alive(pid));
    assert!(run.path().join("vtpm/state").is_dir());
    drop(vtpm);
    assert!(!is_alive(pid));
    assert!(!run.path().join("vtpm").exists());

    // With keep_state the vTPM keeps its identity across restarts.
    let mut opts = options(run.path());
    opts.keep_state = true;
    let first = Vtpm::start(&opts).unwrap();
    let ek = first.ak_bundle().ek_cert.clone();
    let ak = first.ak_bundle().ak_name.clone();
    drop(first);
    let second = Vtpm::start(&opts).unwrap();
    assert_eq!(second.ak_bundle().ek_cert, ek);
    assert_ne!(second.ak_bundle().ak_name, ak, "a new AK per start");
    // PCRs start from zero again.
    assert!(
        second
            .read_pcrs()
            .unwrap()
            .values()
            .all(|v| *v == cell0_attest::Sha256Digest::ZERO)
    );
}

#[test]
fn twenty_vtpms_in_parallel_all_verify_and_none_is_left() {
    if !swtpm_available("twenty_vtpms_in_parallel_all_verify_and_none_is_left") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let verifier = Arc::new(Mutex::new(Verifier::new(&ca_bundle()).unwrap()));
    let boot = Arc::new(Boot::honest());
    let threads: Vec<_> = (0..20)
        .map(|i| {
            let dir = root.path().join(format!("vm{i}"));
            let verifier = Arc::clone(&verifier);
            let boot = Arc::clone(&boot);
            std::thread::spawn(move || {
                let vm = format!("vm{i}");
                let vtpm = Vtpm::start(&options(&dir)).unwrap();
                let challenge = verifier
                    .lock()
                    .unwrap()
                    .begin_enrollment(&vm, vtpm.ak_bundle())
                    .unwrap();
                let response = vtpm.activate_credential(&challenge).unwrap();
                verifier
                    .lock()
                    .unwrap()
                    .finish_enrollment(&vm, &response)
                    .unwrap();
                let log = vtpm.measure_boot(&boot.inputs()).unwrap();
                let nonce = verifier.lock().unwrap().issue_nonce(&vm);
                let quote = vtpm.quote(&nonce).unwrap();
                let verdict = verifier
                    .lock()
                    .unwrap()
                    .verify(&vm, &quote, &log, &boot.manifest());
                (vtpm.swtpm_pid(), verdict)
            })
        })
        .collect();
    let mut pids = Vec::new();
    for t in threads {
        let (pid, verdict) = t.join().unwrap();
        assert!(verdict.is_trusted(), "{verdict}");
        pids.push(pid);
    }
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 20, "one swtpm per VM");
    let root_text = root.path().display().to_string();
    assert_eq!(live_processes_mentioning(&root_text), Vec::<u32>::new());
    assert!(pids.iter().all(|p| !is_alive(*p)));
}

/// Not a test on its own: the vTPM owner that the test below SIGKILLs.
#[test]
#[ignore = "run by no_orphan_swtpm_after_owner_is_sigkilled"]
fn orphan_helper_owns_a_vtpm() {
    let Some(dir) = std::env::var_os(ORPHAN_DIR_ENV) else {
        return;
    };
    let dir = Path::new(&dir);
    let vtpm = Vtpm::start(&options(&dir.join("run"))).unwrap();
    std::fs::write(dir.join("pid.tmp"), vtpm.swtpm_pid().to_string()).unwrap();
    std::fs::rename(dir.join("pid.tmp"), dir.join("pid")).unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn no_orphan_swtpm_after_owner_is_sigkilled() {
    if !swtpm_available("no_orphan_swtpm_after_owner_is_sigkilled") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut owner = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "orphan_helper_owns_a_vtpm",
            "--ignored",
            "--nocapture",
        ])
        .env(ORPHAN_DIR_ENV, dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid_file = dir.path().join("pid");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pid_file.exists() {
        assert!(
            Instant::now() < deadline,
            "the owner did not start its vTPM"
        );
        assert!(
            owner.try_wait().unwrap().is_none(),
            "the owner exited early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let swtpm: u32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    let cmdline = std::fs::read(format!("/proc/{swtpm}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).starts_with("swtpm"));
    assert!(is_alive(swtpm));

    owner.kill().unwrap(); // SIGKILL
    owner.wait().unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    while is_alive(swtpm) {
        assert!(
            Instant::now() < deadline,
            "swtpm {swtpm} outlived its SIGKILLed owner"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let dir_text = dir.path().display().to_string();
    assert_eq!(live_processes_mentioning(&dir_text), Vec::<u32>::new());
}

#[test]
fn hung_swtpm_is_killed_after_the_operation_timeout() {
    if !swtpm_available("hung_swtpm_is_killed_after_the_operation_timeout") {
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let mut opts = options(run.path());
    opts.op_timeout = Duration::from_millis(500);
    let vtpm = Vtpm::start(&opts).unwrap();
    let pid = vtpm.swtpm_pid();
    // SAFETY: stopping a child process this test owns.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    let err = vtpm.quote(&Nonce::random()).unwrap_err();
    assert!(
        matches!(err, VtpmError::Unresponsive { waited } if waited == Duration::from_millis(500)),
        "{err}"
    );
    // The hung swtpm was killed; later calls say it exited.
    assert!(matches!(vtpm.read_pcrs(), Err(VtpmError::Exited { .. })));
    let t = Instant::now();
    drop(vtpm);
    assert!(t.elapsed() < Duration::from_secs(30));
    assert!(!is_alive(pid));
}

#[test]
fn a_port_taken_before_swtpm_binds_it_is_retried() {
    if !swtpm_available("a_port_taken_before_swtpm_binds_it_is_retried") {
        return;
    }
    let run = manufactured_run_dir();
    let bin = tempfile::tempdir().unwrap();
    let count = bin.path().join("count");
    // Loses the race twice, then runs the real swtpm.
    let real = std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join("swtpm"))
        .find(|p| p.is_file())
        .unwrap();
    let fake = fake_program(
        bin.path(),
        "swtpm",
        &format!(
            "n=$(cat {c} 2>/dev/null || echo 0); echo $((n+1)) > {c}\n\
             if [ \"$n\" -lt 2 ]; then echo 'swtpm: Could not open TCP socket: Address already in use' >&2; exit 1; fi\n\
             exec {real} \"$@\"",
            c = count.display(),
            real = real.display()
        ),
    );
    let mut opts = options(run.path());
    opts.swtpm = fake;
    let vtpm = Vtpm::start(&opts).unwrap();
    assert_eq!(std::fs::read_to_string(&count).unwrap().trim(), "3");
    assert!(vtpm.read_pcrs().is_ok());
}

#[test]
fn record_boot_takes_only_a_boot_log_once() {
    if !swtpm_available("record_boot_takes_only_a_boot_log_once") {
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let vtpm = Vtpm::start(&options(run.path())).unwrap();
    let boot = Boot::honest();
    // Hash first (as a VMM would while the vTPM starts), then record.
    let log = cell0_attest::boot_events(&boot.inputs()).unwrap();
    let mut reordered = log.clone();
    reordered.events.swap(2, 3);
    assert!(matches!(
        vtpm.record_boot(&reordered),
        Err(VtpmError::NotABootLog)
    ));
    let mut short = log.clone();
    short.events.pop();
    assert!(matches!(
        vtpm.record_boot(&short),
        Err(VtpmError::NotABootLog)
    ));
    // Refusals extend nothing.
    assert!(
        vtpm.read_pcrs()
            .unwrap()
            .values()
            .all(|v| *v == cell0_attest::Sha256Digest::ZERO)
    );
    vtpm.record_boot(&log).unwrap();
    assert_eq!(vtpm.read_pcrs().unwrap(), log.replay());
    assert!(matches!(
        vtpm.record_boot(&log),
        Err(VtpmError::AlreadyMeasured)
    ));
    assert_eq!(vtpm.read_pcrs().unwrap(), log.replay());
}
