// SPDX-License-Identifier: Apache-2.0
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! The SYPAS router (`cell0d router`, a real process with its data dir) and
//! nano-guest VMs on real KVM (issue 4): tokens minted with `cell0d token
//! mint`, every refusal seen from inside a guest with its typed code, shm
//! refs of 1 MiB and 64 MiB checked byte for byte, two VMs talking through
//! the router and a third one refused.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cell0_tests::{BgVm, ChildGuard, Run, bin, launch, require_kvm, wait_for_path};

/// How long one guest may run (the 64 MiB shm round on a busy 2-CPU host
/// with debug builds takes a few seconds).
const VM_TIMEOUT: Duration = Duration::from_secs(180);

/// `cell0d router` with its data dir, in a temp dir of its own.
struct Router {
    _child: ChildGuard,
    _dir: tempfile::TempDir,
    data: PathBuf,
}

impl Router {
    fn data_dir(dir: &Path) -> PathBuf {
        dir.join("data")
    }

    /// Starts a router serving `vms` (`ID=SOCKET[,api=API]`); waits until it listens.
    fn start(dir: tempfile::TempDir, vms: &[String]) -> Router {
        let data = Self::data_dir(dir.path());
        let mut cmd = Command::new(bin("cell0d"));
        cmd.arg("router")
            .arg("--socket")
            .arg(dir.path().join("router.sock"))
            .arg("--data-dir")
            .arg(&data);
        for v in vms {
            cmd.arg("--vm").arg(v);
        }
        let mut child = cmd
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("listening on"), "router said {line:?}");
        Router {
            _child: ChildGuard(child),
            _dir: dir,
            data,
        }
    }

    /// The audit log's records.
    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.data.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits (bounded) for an audit record with `code` and `kind`; the log
    /// is written by a thread of the router's own.
    fn wait_audit(&self, kind: &str, code: &str, agent: &str) -> serde_json::Value {
        for _ in 0..200 {
            if let Some(r) = self
                .audit()
                .into_iter()
                .find(|r| r["kind"] == kind && r["code"] == code && r["agent"] == agent)
            {
                return r;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "no {kind} {code} record for {agent} in the audit log: {:#?}",
            self.audit()
        );
    }
}

/// Creates the root key of `data` (what the router would do on start).
fn keys_init(data: &Path) {
    let st = Command::new(bin("cell0d"))
        .args(["keys", "init", "--data-dir"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
}

/// `cell0d token mint`: the base64 token it prints.
fn mint(data: &Path, agent: &str, vm: &str, rights: &[&str], ttl: u64) -> String {
    let mut cmd = Command::new(bin("cell0d"));
    cmd.args(["token", "mint", "--data-dir"]).arg(data).args([
        "--agent",
        agent,
        "--vm",
        vm,
        "--ttl",
        &ttl.to_string(),
    ]);
    for r in rights {
        cmd.args(["--right", r]);
    }
    let out = cmd.stderr(Stdio::inherit()).output().unwrap();
    assert!(out.status.success(), "cell0d token mint failed: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The nano guest's launch arguments for a router test.
fn vm_args(uds: &Path, api: Option<&Path>, shm_mib: u32, cmdline: &str) -> Vec<String> {
    let mut a: Vec<String> = [
        "--vsock-uds",
        uds.to_str().unwrap(),
        "--cid",
        "3",
        "--memory-mib",
        "64",
        "--cmdline",
        cmdline,
    ]
    .map(String::from)
    .to_vec();
    if let Some(api) = api {
        a.extend(["--api-sock".into(), api.to_str().unwrap().into()]);
    }
    if shm_mib > 0 {
        a.extend(["--shm-mib".into(), shm_mib.to_string()]);
    }
    a
}

fn spawn(args: &[String]) -> BgVm {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    BgVm::spawn(&a)
}

fn run(args: &[String]) -> Run {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    launch(&a)
}

fn assert_passed(r: &Run, test: &str) {
    assert_eq!(
        r.code,
        Some(0),
        "guest did not pass:\n{}\n{}",
        r.serial,
        r.stderr
    );
    assert_eq!(
        r.serial.lines().last(),
        Some(format!("cell0-nano: test {test} passed").as_str()),
        "{}",
        r.serial
    );
}

fn assert_line(r: &Run, line: &str) {
    assert!(
        r.serial.lines().any(|l| l == line),
        "no line {line:?} in:\n{}",
        r.serial
    );
}

#[test]
fn shm_refs_of_1_and_64_mib_are_checked_byte_for_byte_and_refs_outside_are_refused() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let data = Router::data_dir(dir.path());
    keys_init(&data);
    let uds = dir.path().join("a.sock");
    let api = dir.path().join("a.api");
    let token = mint(&data, "alice", "vm-a", &["echo,*"], 600);
    let vm = spawn(&vm_args(
        &uds,
        Some(&api),
        128,
        &format!("cell0.test=sypas-shm cell0.agent_id=alice cell0.token={token}"),
    ));
    // The router takes the window from the VM's API socket when it attaches it.
    assert!(wait_for_path(&api, Duration::from_secs(10)));
    let router = Router::start(
        dir,
        &[format!("vm-a={}_1024,api={}", uds.display(), api.display())],
    );
    let r = vm.wait(VM_TIMEOUT);
    assert_passed(&r, "sypas-shm");
    assert_line(
        &r,
        "cell0-nano: sypas-shm: window of 0x8000000 bytes at 0x100000000, mapped with 64 2 MiB pages, mode irq",
    );
    for size in [1 << 20, 64 << 20] {
        let prefix = format!(
            "cell0-nano: sypas-shm: {size} bytes: echo returned the ref unchanged, fold 0x"
        );
        let l = r
            .serial
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no result for {size} bytes:\n{}", r.serial));
        assert!(
            l.ends_with(" matches, copy to offset 0x4000000 checked byte for byte, mode irq"),
            "{l}"
        );
    }
    assert_line(
        &r,
        "cell0-nano: sypas-shm: ref (0x7fff000, 0x2000) refused with SHM_OUT_OF_BOUNDS (80): \
         Shm ref (134213632, 8192) lies outside the 134217728-byte window., mode irq",
    );
    assert_line(
        &r,
        "cell0-nano: sypas-shm: ref (0xffffffffffffffff, 0x2) refused with SHM_OUT_OF_BOUNDS (80): \
         Shm ref (18446744073709551615, 2) lies outside the 134217728-byte window., mode irq",
    );
    let rec = router.wait_audit("CALL", "SHM_OUT_OF_BOUNDS", "alice");
    assert_eq!(rec["vm"], "vm-a", "{rec}");
}

#[test]
fn a_vm_without_a_window_gets_shm_unavailable_never_a_read() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let data = Router::data_dir(dir.path());
    keys_init(&data);
    let uds = dir.path().join("a.sock");
    let token = mint(&data, "alice", "vm-a", &["echo,*"], 600);
    // The guest has a window, but the router was not given the VM's API
    // socket: it cannot read the guest's memory, so every ref is refused.
    let router = Router::start(dir, &[format!("vm-a={}_1024", uds.display())]);
    let r = run(&vm_args(
        &uds,
        None,
        128,
        &format!("cell0.test=sypas-shm cell0.sizes=4096 cell0.agent_id=alice cell0.token={token}"),
    ));
    assert_ne!(r.code, Some(0), "{}", r.serial);
    assert!(
        r.serial.contains(
            "cell0-nano: test sypas-shm failed: 4096 bytes: host sent ERROR SHM_UNAVAILABLE (81): "
        ),
        "{}",
        r.serial
    );
    router.wait_audit("CALL", "SHM_UNAVAILABLE", "alice");
}

#[test]
fn two_vms_talk_through_the_router_and_a_third_without_the_right_is_refused() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let data = Router::data_dir(dir.path());
    keys_init(&data);
    let p = |n: &str| dir.path().join(n);
    let ta = mint(&data, "alice", "vm-a", &["agent/bob,*", "echo,*"], 600);
    let tb = mint(&data, "bob", "vm-b", &["echo,*"], 600);
    let tc = mint(&data, "carol", "vm-c", &["echo,*", "agent/dave,*"], 600);
    let bob = spawn(&vm_args(
        &p("b.sock"),
        Some(&p("b.api")),
        8,
        &format!("cell0.test=sypas-agents cell0.role=serve cell0.agent_id=bob cell0.token={tb}"),
    ));
    let carol = spawn(&vm_args(
        &p("c.sock"),
        Some(&p("c.api")),
        8,
        &format!(
            "cell0.test=sypas-agents cell0.role=call cell0.peer=bob cell0.expect=PERMISSION_DENIED \
             cell0.agent_id=carol cell0.token={tc}"
        ),
    ));
    let alice = spawn(&vm_args(
        &p("a.sock"),
        Some(&p("a.api")),
        8,
        &format!(
            "cell0.test=sypas-agents cell0.role=call cell0.peer=bob cell0.agent_id=alice \
             cell0.token={ta}"
        ),
    ));
    for n in ["a", "b", "c"] {
        assert!(wait_for_path(
            &p(&format!("{n}.api")),
            Duration::from_secs(10)
        ));
    }
    let vms: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            format!(
                "vm-{n}={}_1024,api={}",
                p(&format!("{n}.sock")).display(),
                p(&format!("{n}.api")).display()
            )
        })
        .collect();
    let router = Router::start(dir, &vms);

    let rc = carol.wait(VM_TIMEOUT);
    assert_passed(&rc, "sypas-agents");
    assert_line(
        &rc,
        "cell0-nano: sypas-agents: CALL agent/bob/echo, which the WELCOME's rights do not cover, \
         refused with PERMISSION_DENIED (48): The session may not call agent/bob/echo., mode irq",
    );
    let ra = alice.wait(VM_TIMEOUT);
    let rb = bob.wait(VM_TIMEOUT);
    assert_passed(&ra, "sypas-agents");
    assert_passed(&rb, "sypas-agents");
    assert_line(
        &ra,
        "cell0-nano: sypas-agents: 100 round trips of 64 bytes and echoes of 4096 and 1048576 \
         bytes checked byte for byte, mode irq",
    );
    assert_line(
        &ra,
        "cell0-nano: sypas-agents: 1048576 bytes sent as a ref into our window and answered as a \
         ref into the peer's, checked byte for byte, mode irq",
    );
    // 1 (reachable) + 100 round trips + 2 inline + 2 through the windows + done.
    let served = rb
        .serial
        .lines()
        .find(|l| l.starts_with("cell0-nano: sypas-agents: served "))
        .unwrap_or_else(|| panic!("{}", rb.serial));
    assert!(
        served.starts_with("cell0-nano: sypas-agents: served 106 calls from agent/alice ("),
        "{served}"
    );
    let p50 = ra
        .serial
        .lines()
        .find(|l| l.contains("agent-to-agent round trip"))
        .unwrap();
    eprintln!("{p50}");
    let rec = router.wait_audit("CALL", "PERMISSION_DENIED", "carol");
    assert_eq!(rec["service"], "agent/bob", "{rec}");
    assert_eq!(rec["vm"], "vm-c", "{rec}");
}

/// One `sypas-refusal` run on `<uds>` (a router serves it as VM `vm-r`).
fn refusal(uds: &Path, case: &str, expect: &str, token: &str, extra: &str) -> Run {
    run(&vm_args(
        uds,
        None,
        0,
        &format!(
            "cell0.test=sypas-refusal cell0.case={case} cell0.expect={expect} \
             cell0.agent_id=alice cell0.token={token} {extra}"
        ),
    ))
}

/// A router serving `vm-r` on `<dir>/r.sock_1024`, and that socket's VM path.
fn refusal_router() -> (Router, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    keys_init(&Router::data_dir(dir.path()));
    let uds = dir.path().join("r.sock");
    let r = Router::start(dir, &[format!("vm-r={}_1024", uds.display())]);
    (r, uds)
}

fn assert_hello_refused(r: &Run, line: &str) {
    assert_passed(r, "sypas-refusal");
    assert!(
        r.serial.lines().any(|l| l.starts_with(line)),
        "no line starting {line:?}:\n{}",
        r.serial
    );
    assert_line(
        r,
        "cell0-nano: sypas-refusal: the connection stays open: PING answered after the refusal, mode irq",
    );
}

#[test]
fn an_expired_token_is_refused_at_hello_with_token_expired() {
    require_kvm!();
    let (router, uds) = refusal_router();
    let token = mint(&router.data, "alice", "vm-r", &["echo,*"], 0);
    let r = refusal(&uds, "hello", "TOKEN_EXPIRED", &token, "");
    assert_hello_refused(
        &r,
        "cell0-nano: sypas-refusal: HELLO as agent alice refused with TOKEN_EXPIRED (32): The token expired at ",
    );
    router.wait_audit("HELLO", "TOKEN_EXPIRED", "alice");
}

#[test]
fn a_forged_token_is_refused_with_token_invalid() {
    require_kvm!();
    let (router, uds) = refusal_router();
    // The router's key id, another key's signature.
    let good = mint(&router.data, "alice", "vm-r", &["echo,*"], 600);
    let key_id = biscuit_auth::UnverifiedBiscuit::from_base64(&good)
        .unwrap()
        .root_key_id()
        .unwrap();
    let forged = biscuit_auth::Biscuit::builder()
        .root_key_id(key_id)
        .code(r#"agent("alice"); vm("vm-r"); right("*", "*"); expires(4000000000);"#)
        .unwrap()
        .build(&biscuit_auth::KeyPair::new())
        .unwrap()
        .to_base64()
        .unwrap();
    let r = refusal(&uds, "hello", "TOKEN_INVALID", &forged, "");
    assert_hello_refused(
        &r,
        "cell0-nano: sypas-refusal: HELLO as agent alice refused with TOKEN_INVALID (33): \
         The token's signature does not verify (forged or altered)., mode irq",
    );
    router.wait_audit("HELLO", "TOKEN_INVALID", "alice");
}

#[test]
fn a_token_of_another_root_is_refused_with_wrong_root() {
    require_kvm!();
    let (router, uds) = refusal_router();
    let other = tempfile::tempdir().unwrap();
    keys_init(other.path());
    let token = mint(other.path(), "alice", "vm-r", &["echo,*"], 600);
    let r = refusal(&uds, "hello", "WRONG_ROOT", &token, "");
    assert_hello_refused(
        &r,
        "cell0-nano: sypas-refusal: HELLO as agent alice refused with WRONG_ROOT (34): \
         The token is not signed by a root key this host trusts",
    );
    router.wait_audit("HELLO", "WRONG_ROOT", "alice");
}

#[test]
fn a_widening_attenuation_is_refused_with_attenuation_widens() {
    require_kvm!();
    let (router, uds) = refusal_router();
    let good = mint(&router.data, "alice", "vm-r", &["echo,echo"], 600);
    // A holder's block that claims every right (`cell0d token attenuate`
    // refuses to write it, so it is made with the library).
    let wide = biscuit_auth::UnverifiedBiscuit::from_base64(&good)
        .unwrap()
        .append(
            biscuit_auth::BlockBuilder::new()
                .code(r#"right("*", "*");"#)
                .unwrap(),
        )
        .unwrap()
        .to_base64()
        .unwrap();
    let r = refusal(&uds, "hello", "ATTENUATION_WIDENS", &wide, "");
    assert_hello_refused(
        &r,
        "cell0-nano: sypas-refusal: HELLO as agent alice refused with ATTENUATION_WIDENS (35): ",
    );
    router.wait_audit("HELLO", "ATTENUATION_WIDENS", "alice");
}

#[test]
fn a_missing_right_is_refused_with_permission_denied() {
    require_kvm!();
    let (router, uds) = refusal_router();
    let token = mint(&router.data, "alice", "vm-r", &["echo,echo"], 600);
    let r = refusal(
        &uds,
        "call",
        "PERMISSION_DENIED",
        &token,
        "cell0.service=echo cell0.method=fold",
    );
    assert_passed(&r, "sypas-refusal");
    assert_line(
        &r,
        "cell0-nano: sypas-refusal: CALL echo/fold, which the WELCOME's rights do not cover, \
         refused with PERMISSION_DENIED (48): The session may not call echo/fold., mode irq",
    );
    let rec = router.wait_audit("CALL", "PERMISSION_DENIED", "alice");
    assert_eq!(rec["method"], "fold", "{rec}");
}

#[test]
fn a_second_hello_is_refused_with_already_hello() {
    require_kvm!();
    let (router, uds) = refusal_router();
    let token = mint(&router.data, "alice", "vm-r", &["echo,*"], 600);
    let r = refusal(&uds, "hello-twice", "ALREADY_HELLO", &token, "");
    assert_passed(&r, "sypas-refusal");
    assert_line(
        &r,
        "cell0-nano: sypas-refusal: second HELLO refused with ALREADY_HELLO (16): \
         This session has already said HELLO., mode irq",
    );
    assert_line(
        &r,
        "cell0-nano: sypas-refusal: the session is unchanged: echo answered, mode irq",
    );
}

#[test]
fn a_call_before_hello_is_refused_with_not_hello() {
    require_kvm!();
    let (router, uds) = refusal_router();
    let token = mint(&router.data, "alice", "vm-r", &["echo,*"], 600);
    let r = refusal(&uds, "call-first", "NOT_HELLO", &token, "");
    assert_passed(&r, "sypas-refusal");
    assert_line(
        &r,
        "cell0-nano: sypas-refusal: CALL before HELLO refused with NOT_HELLO (17): Send HELLO first., mode irq",
    );
    assert_line(
        &r,
        "cell0-nano: sypas-refusal: after HELLO the same connection works: echo answered, mode irq",
    );
}

#[test]
fn a_token_that_expires_mid_session_gets_token_expired_and_refresh_revives_it() {
    require_kvm!();
    let (router, uds) = refusal_router();
    let fresh = mint(&router.data, "alice", "vm-r", &["echo,*"], 600);
    let short = mint(&router.data, "alice", "vm-r", &["echo,*"], 2);
    let r = refusal(
        &uds,
        "expire",
        "TOKEN_EXPIRED",
        &short,
        &format!("cell0.token2={fresh}"),
    );
    assert_passed(&r, "sypas-refusal");
    assert!(
        r.serial
            .lines()
            .any(|l| l.starts_with("cell0-nano: sypas-refusal: after ")
                && l.ends_with(
                    " calls answered, CALL echo/echo refused with TOKEN_EXPIRED (32): \
                 The session's token has expired; send REFRESH., mode irq"
                )),
        "{}",
        r.serial
    );
    assert_line(
        &r,
        "cell0-nano: sypas-refusal: after REFRESH echo is answered again, mode irq",
    );
}

#[test]
fn a_refusal_with_another_code_than_expected_fails_the_guest() {
    require_kvm!();
    let (router, uds) = refusal_router();
    // A good token is welcomed: the guest expected a refusal and must fail.
    let good = mint(&router.data, "alice", "vm-r", &["echo,*"], 600);
    let r = refusal(&uds, "hello", "TOKEN_INVALID", &good, "");
    assert_ne!(r.code, Some(0), "{}", r.serial);
    assert!(
        r.serial.contains(
            "cell0-nano: test sypas-refusal failed: HELLO as agent alice: expected ERROR \
             TOKEN_INVALID, got WELCOME (session "
        ),
        "{}",
        r.serial
    );
    // A token of another agent: AGENT_MISMATCH, not what was expected either.
    let bob = mint(&router.data, "bob", "vm-r", &["echo,*"], 600);
    let r = refusal(&uds, "hello", "TOKEN_EXPIRED", &bob, "");
    assert!(
        r.serial.contains(
            "cell0-nano: test sypas-refusal failed: HELLO as agent alice: expected ERROR \
             TOKEN_EXPIRED, got ERROR AGENT_MISMATCH (36): "
        ),
        "{}",
        r.serial
    );
}

#[test]
fn sypas_echo_with_a_token_through_the_router_prints_the_grant() {
    require_kvm!();
    let (router, uds) = refusal_router();
    let token = mint(&router.data, "alice", "vm-r", &["echo,echo"], 600);
    for poll in [0, 1] {
        let r = run(&vm_args(
            &uds,
            None,
            0,
            &format!(
                "cell0.test=sypas-echo cell0.poll={poll} cell0.agent_id=alice cell0.token={token}"
            ),
        ));
        assert_passed(&r, "sypas-echo");
        let mode = if poll == 1 { "poll" } else { "irq" };
        let w = r
            .serial
            .lines()
            .find(|l| l.starts_with("cell0-nano: sypas-echo: welcome: session "))
            .unwrap_or_else(|| panic!("{}", r.serial));
        assert!(
            w.contains(", rights echo/echo, token expiry ")
                && w.ends_with(&format!(", mode {mode}")),
            "{w}"
        );
        assert_line(
            &r,
            &format!(
                "cell0-nano: sypas-echo: 20 calls, 4472836 payload bytes each way, goodbye exchanged, mode {mode}"
            ),
        );
    }
}
