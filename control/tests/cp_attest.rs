// SPDX-License-Identifier: Apache-2.0
//! Attest RPC: a VM launched with a vTPM is enrolled (make/activate
//! credential) and its quote verified against the golden values the control
//! plane computed; a restarted VM is enrolled again.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod cp_harness;

use cp_harness::{Daemon, LONG_RUNNING};

#[test]
fn attest_a_running_vm() {
    require_vms!();
    if std::process::Command::new("swtpm")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP attest_a_running_vm: swtpm is not installed (scripts/deps.sh)");
        return;
    }
    let d = Daemon::start(&[]);
    d.ctl_ok(&[
        "run",
        "--name",
        "att",
        "--tpm",
        "--cmdline",
        LONG_RUNNING,
        "--shm-mib",
        "4",
        "--command",
        "agent",
        "--command=--flag",
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&d.ctl_ok(&["attest", "att", "-o", "json"])).unwrap();
    assert_eq!(v["trusted"], true, "{v:#}");
    assert_eq!(v["enrolled"], true);
    assert_eq!(v["pcrs"].as_object().unwrap().len(), 6);
    let table = d.ctl_ok(&["attest", "att"]);
    assert!(table.starts_with("att: trusted"), "{table}");
    assert!(
        !table.contains("enrolled now"),
        "enrolled once per launch: {table}"
    );
    // A VM without a vTPM cannot be attested: exit 11 (precondition).
    d.ctl_ok(&["run", "--name", "plain", "--cmdline", LONG_RUNNING]);
    assert_eq!(d.ctl(&["attest", "plain"]).status.code(), Some(11));
    d.ctl_ok(&["rm", "att", "plain"]);
}
