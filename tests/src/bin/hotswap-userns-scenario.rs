//! Run by the `automatic_fallback_in_a_user_namespace` test inside `unshare --user
//! --map-root-user --net`, where BPF maps cannot be created but a reuseport program can be
//! attached: the daemon must choose the reuseport backend by itself and say why,
//! `--backend sk-lookup` must fail clearly, `hotswap switch` must move new connections, and
//! 100 upgrades under load must lose nothing. Prints a summary; exits non-zero on any failure.

use std::process::Command;

use integration_tests::{example_server, HttpLoad, RunningService, TestEnv};

fn main() {
    let env = TestEnv::with_daemon("userns");
    let status = env.status();
    let backend = &status["backend"];
    assert_eq!(backend["name"], "reuseport", "{status}");
    let reason = backend["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("chosen automatically")
            && reason.contains("EPERM")
            && reason.contains("reuseport programs"),
        "{reason}"
    );
    println!("backend: reuseport ({reason})");

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

    switch_moves_new_connections(&env);

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
    let count = integration_tests::rounds(100);
    for _ in 0..count {
        env.ok(&["upgrade", "web"]);
    }
    let (fresh, kept) = (fresh.stop(), kept.stop());
    println!(
        "{count} upgrades: {} + {} requests served by {} processes, {} + {} failed",
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
    assert!(fresh.replies.len() > count / 2);
}

/// Two generations of the library's listeners; `hotswap switch` moves new connections from
/// one to the other and back.
fn switch_moves_new_connections(env: &TestEnv) {
    use std::{net::TcpListener, os::fd::OwnedFd};

    use hotswap::model::{Protocol, ServiceName};

    env.ok(&["bind", "other", "tcp", "127.0.0.1/32", "9090"]);
    let service: ServiceName = "other".parse().expect("valid name");
    let listener = |activate| -> TcpListener {
        let (fd, _): (OwnedFd, u32) = hotswap::activation::service_listener(
            &env.socket,
            &service,
            Protocol::Tcp,
            None,
            activate,
        )
        .expect("a listener from the daemon");
        TcpListener::from(fd)
    };
    let first = listener(true);
    let second = listener(false);
    let reaches = |expected: &TcpListener, other: &TcpListener| {
        other.set_nonblocking(true).expect("nonblocking");
        for _ in 0..20 {
            let client = std::net::TcpStream::connect("127.0.0.1:9090").expect("connect");
            let (accepted, _) = expected.accept().expect("accept");
            assert_eq!(accepted.peer_addr().ok(), client.local_addr().ok());
            assert!(
                other.accept().is_err(),
                "a connection reached the other generation"
            );
        }
    };
    reaches(&first, &second);
    env.ok(&["switch", "other", "2"]);
    reaches(&second, &first);
    env.ok(&["switch", "other", "1"]);
    reaches(&first, &second);
    println!("two generations switched by hotswap switch: every connection reached the active one");
}
