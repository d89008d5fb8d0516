//! Run by the `automatic_fallback_in_a_user_namespace` test inside `unshare --user
//! --map-root-user --net`, where BPF maps cannot be created: the daemon must choose the uds
//! backend by itself and say why, `--backend sk-lookup` must fail clearly, and upgrades under
//! load must lose nothing. Prints a summary; exits non-zero on any failure.

use std::process::Command;

use integration_tests::{example_server, HttpLoad, RunningService, TestEnv};

fn main() {
    let env = TestEnv::with_daemon("userns");
    let status = env.status();
    let backend = &status["backend"];
    assert_eq!(backend["name"], "uds", "{status}");
    let reason = backend["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("chosen automatically") && reason.contains("EPERM"),
        "{reason}"
    );
    println!("backend: uds ({reason})");

    let forced = Command::new(integration_tests::hotswap_bin())
        .args(["daemon", "--backend", "sk-lookup", "--socket"])
        .arg(env.dir.path().join("forced.sock"))
        .arg("--pin-dir")
        .arg(env.pin_dir.with_file_name("userns-forced"))
        .output()
        .expect("run daemon");
    let stderr = String::from_utf8_lossy(&forced.stderr);
    assert!(!forced.status.success());
    assert!(
        stderr.contains("--backend sk-lookup cannot work here"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    println!("--backend sk-lookup: {}", stderr.trim());

    let hello = example_server();
    let _service = RunningService::start(
        &env,
        "web",
        &[
            "--listen",
            "tcp://127.0.0.1:8080",
            "--ready",
            "notify",
            "--grace",
            "50ms",
            "--",
            hello.to_str().expect("utf-8 path"),
        ],
    );
    let fresh = HttpLoad::start("127.0.0.1:8080", false, 10_000_000);
    let kept = HttpLoad::start("127.0.0.1:8080", true, 10_000_000);
    for _ in 0..10 {
        env.ok(&["upgrade", "web"]);
    }
    let (fresh, kept) = (fresh.stop(), kept.stop());
    println!(
        "10 upgrades: {} + {} requests served by {} processes, {} + {} failed",
        fresh.served(),
        kept.served(),
        fresh.replies.len(),
        fresh.failed,
        kept.failed
    );
    assert_eq!(
        fresh.failed + kept.failed,
        0,
        "{:?} {:?}",
        fresh.failures,
        kept.failures
    );
    assert!(fresh.replies.len() > 5);
}
