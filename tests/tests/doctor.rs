//! What `hotswap doctor` and the daemon say when sk_lookup does not work, measured for real:
//! the verifier's unprivileged rules (CAP_PERFMON and CAP_SYS_ADMIN dropped) and a host
//! without bpffs at /sys/fs/bpf.

use std::{
    fs::File,
    os::unix::process::CommandExt as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{hotswap_bin, TestEnv};

const CAP_SYS_ADMIN: libc::c_ulong = 21;
const CAP_PERFMON: libc::c_ulong = 38;

/// Runs the command without CAP_PERFMON and CAP_SYS_ADMIN: dropped from the bounding set
/// before exec, so root's exec gets every capability but these two.
fn without_perfmon(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            for cap in [CAP_PERFMON, CAP_SYS_ADMIN] {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        })
    }
}

fn held(report: &serde_json::Value, capability: &str) -> bool {
    report["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == capability)
        .unwrap_or_else(|| panic!("doctor does not list {capability}: {report}"))["held"]
        .as_bool()
        .unwrap()
}

/// A verifier log without its one line that differs between two loads.
fn without_timing(log: &str) -> String {
    log.lines()
        .filter(|l| !l.starts_with("verification time "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// A daemon this test started itself (TestEnv starts its own without a pre_exec hook).
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Without CAP_PERFMON this 6.18 kernel's verifier applies its unprivileged rules and refuses
/// the program with EACCES ("pointer arithmetic with it prohibited for !root"). Doctor, a
/// forced sk-lookup daemon and an auto daemon must all say it was the verifier, show its
/// error line, and point at CAP_PERFMON — not claim a lack of privileges in general.
#[test]
fn a_verifier_refusal_without_cap_perfmon_is_reported_as_one() {
    let env = TestEnv::new("verifier");

    let out = without_perfmon(Command::new(hotswap_bin()).args(["doctor", "--json"]))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The setup really dropped what it meant to, and only that.
    assert!(!held(&report, "CAP_PERFMON"), "{report}");
    assert!(!held(&report, "CAP_SYS_ADMIN"), "{report}");
    assert!(held(&report, "CAP_BPF") && held(&report, "CAP_NET_ADMIN"));
    assert_eq!(report["sk_lookup_supported"], false, "{report}");
    assert_eq!(report["auto_backend"], "reuseport");
    let log = report["verifier_log"].as_str().expect("the whole log");
    let error_line = log
        .lines()
        .find(|l| l.contains("prohibited for !root"))
        .unwrap_or_else(|| panic!("not the unprivileged rules' refusal:\n{log}"));
    assert!(log.contains("\nprocessed "), "{log}");
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(
            "sk_lookup is unavailable: the kernel's verifier rejected the sk_lookup program (EACCES): "
        ) && reason.contains(error_line)
            && reason.contains("grant CAP_PERFMON"),
        "{reason}"
    );
    assert!(!reason.contains("permission denied"), "{reason}");
    let advice: Vec<&str> = report["advice"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(advice.len(), 1, "{advice:?}");
    assert!(advice[0].starts_with("grant CAP_PERFMON"), "{advice:?}");

    // --verifier-log prints the log whole after the report.
    let out = without_perfmon(Command::new(hotswap_bin()).args(["doctor", "--verifier-log"]))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (report_text, printed) = text
        .split_once("\nverifier log:\n")
        .unwrap_or_else(|| panic!("no log printed:\n{text}"));
    assert_eq!(without_timing(printed), without_timing(log));
    assert!(
        report_text.contains("to do:              grant CAP_PERFMON"),
        "{text}"
    );

    // --backend sk-lookup: one line naming the verifier and its error line; nothing left in
    // the pin dir (the maps the loader pinned before the refusal are removed again).
    let mut forced = env.daemon_command();
    forced.args(["--backend", "sk-lookup"]);
    let out = without_perfmon(&mut forced).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: --backend sk-lookup cannot work here: the kernel's verifier rejected the sk_lookup program (EACCES): ")
            && stderr.contains(error_line),
        "{stderr}"
    );
    assert!(!env.pin_dir.exists(), "{} was left", env.pin_dir.display());

    // At debug level the daemon logs the whole log.
    let mut debug = env.daemon_command();
    debug
        .args(["--backend", "sk-lookup"])
        .env("RUST_LOG", "hotswap=debug");
    let out = without_perfmon(&mut debug).output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let (_, logged) = stderr
        .split_once("the verifier's whole log:\n")
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        without_timing(logged).starts_with(&without_timing(log)),
        "{stderr}"
    );

    // auto falls back to reuseport and says why, in its log and in `status`.
    let log_path = env.dir.path().join("auto.log");
    let daemon = Daemon(
        without_perfmon(&mut env.daemon_command())
            .stdout(Stdio::null())
            .stderr(File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + integration_tests::patience();
    while !env.hotswap(&["status", "--json"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "the auto daemon did not come up:\n{}",
            std::fs::read_to_string(&log_path).unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = env.status();
    assert_eq!(status["backend"]["name"], "reuseport", "{status}");
    let reason = status["backend"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("chosen automatically: sk_lookup is unavailable: the kernel's verifier rejected the sk_lookup program (EACCES): ")
            && reason.contains(error_line)
            && reason.contains("grant CAP_PERFMON"),
        "{reason}"
    );
    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logged
            .contains("sk_lookup is unavailable, using reuseport: the kernel's verifier rejected"),
        "{logged}"
    );
    drop(daemon);
}

/// The bpf mounts of the calling process's mount namespace (bpffs anywhere, anything on
/// /sys/fs/bpf).
fn bpf_mounts(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter(|l| l.contains(" - bpf ") || l.split(' ').nth(4) == Some("/sys/fs/bpf"))
        .map(str::to_owned)
        .collect()
}

/// As root on a host whose /sys/fs/bpf is not bpffs (here: an empty tmpfs over it, in a
/// private mount namespace), doctor probes on a scratch bpffs and finds sk_lookup supported;
/// its only advice is to mount bpffs. It leaves nothing mounted or created, neither in the
/// namespace it ran in nor on the host.
#[test]
fn doctor_without_bpffs_probes_on_a_scratch_one_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let host_before = bpf_mounts(&std::fs::read_to_string("/proc/self/mountinfo").unwrap());
    let script = r#"set -e
mount -t tmpfs hotswap-test-empty /sys/fs/bpf
cat /proc/self/mountinfo > "$1/before"
"$0" doctor --json > "$1/report.json"
"$0" doctor > "$1/report.txt"
cat /proc/self/mountinfo > "$1/after"
ls -A /sys/fs/bpf > "$1/left""#;
    // unshare makes the new mount namespace private: the tmpfs never reaches the host.
    let out = Command::new("unshare")
        .args(["--mount", "--net", "--", "sh", "-c", script])
        .arg(hotswap_bin())
        .arg(dir.path())
        .output()
        .expect("unshare (util-linux) runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    let report: serde_json::Value = serde_json::from_str(&read("report.json")).unwrap();
    assert_eq!(report["bpffs_mounted"], false, "{report}");
    assert_eq!(report["probed_on_scratch_bpffs"], true, "{report}");
    assert_eq!(report["sk_lookup_supported"], true, "{report}");
    assert_eq!(report["auto_backend"], "sk_lookup", "{report}");
    assert!(report["sk_lookup_error"].is_null(), "{report}");
    let advice = report["advice"].as_array().unwrap();
    assert_eq!(advice.len(), 1, "{report}");
    assert!(
        advice[0].as_str().unwrap().starts_with("mount bpffs"),
        "{report}"
    );
    assert!(!report.to_string().contains("as root"), "{report}");
    let text = read("report.txt");
    assert!(text.contains("bpffs at /sys/fs/bpf: no"), "{text}");
    assert!(text.contains("sk_lookup:          supported"), "{text}");

    assert_eq!(
        bpf_mounts(&read("before")),
        bpf_mounts(&read("after")),
        "doctor left a mount behind"
    );
    assert_eq!(read("left"), "", "doctor left files on /sys/fs/bpf");
    assert_eq!(
        host_before,
        bpf_mounts(&std::fs::read_to_string("/proc/self/mountinfo").unwrap()),
        "the host's bpf mounts changed"
    );
}
