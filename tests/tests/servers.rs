//! Debian's own servers, unmodified, under `hotswap run`: each takes its socket the way it
//! takes inherited sockets anyway, upgrades lose nothing, and nothing of an old generation
//! survives. `cargo xtask test` installs the packages; without them these tests fail.

use std::{path::PathBuf, time::Duration};

use integration_tests::{tcp_http_body, HttpLoad, RunningService, TestEnv};

/// A config from `examples/servers/`, the same file README shows.
fn example(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/servers")
        .join(name);
    assert!(path.exists(), "{} is missing", path.display());
    path
}

fn installed(binary: &str) -> String {
    assert!(
        std::path::Path::new(binary).exists(),
        "{binary} is missing: `cargo xtask test` installs it from Debian's packages"
    );
    binary.to_owned()
}

/// Every TCP listener in the test's network namespace.
fn tcp_listeners() -> Vec<String> {
    let out = std::process::Command::new("ss")
        .args(["-Htln"])
        .output()
        .expect("ss (iproute2) runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_owned))
        .collect()
}

/// 5 upgrades under a new-connection-per-request load: 0 failed; and the server never bound
/// a socket of its own (every listener is on the service address, one per live generation).
fn five_upgrades_lose_nothing(env: &TestEnv, service: &RunningService, addr: &str, body: &str) {
    assert_eq!(tcp_http_body(addr), body);
    let fresh = HttpLoad::start(addr, false, 10_000_000);
    // Measured, not asserted yet: a server closes idle keep-alive connections at its drain
    // signal, and a request already on its way on one of them fails (the race every reload
    // has; connection handoff is what removes it).
    let kept = HttpLoad::start(addr, true, 10_000_000);
    for round in 0..5 {
        let out = env.ok(&["upgrade", &service.service]);
        assert!(
            out.contains("is active"),
            "round {round}: {out}\n{}",
            service.log()
        );
        let listeners = tcp_listeners();
        assert!(
            listeners.iter().all(|l| l == addr),
            "the server opened sockets of its own: {listeners:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(100));
    let (fresh, kept) = (fresh.stop(), kept.stop());
    println!(
        "{}: 5 upgrades, new connection per request: {} served, {} failed; keep-alive: {} served, {} failed {:?}",
        service.service,
        fresh.served(),
        fresh.failed,
        kept.served(),
        kept.failed,
        kept.failures
    );
    assert_eq!(
        fresh.failed,
        0,
        "failed requests: {:?}\n{}",
        fresh.failures,
        service.log()
    );
    assert!(fresh.served() > 0);
    let status = env.status();
    assert_eq!(
        status["supervisors"][&service.service]["active"], 6,
        "{status}"
    );
}

#[test]
fn nginx_takes_its_socket_through_the_nginx_variable_and_upgrades_lose_nothing() {
    let env = TestEnv::with_daemon("nginx");
    let nginx = installed("/usr/sbin/nginx");
    let prefix = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(prefix.path().join("tmp")).unwrap();
    // The workers drop to nobody; they must reach the temp dirs.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(prefix.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let conf = example("nginx.conf");
    let service = RunningService::start(
        &env,
        "web",
        &[
            "--listen",
            "tcp://127.0.0.1:8080",
            "--pass-fds",
            "nginx",
            "--drain-signal",
            "SIGQUIT",
            "--grace",
            "50ms",
            "--drain-timeout",
            "10s",
            "--",
            &nginx,
            "-p",
            prefix.path().to_str().unwrap(),
            "-c",
            conf.to_str().unwrap(),
        ],
    );
    five_upgrades_lose_nothing(&env, &service, "127.0.0.1:8080", "nginx");
}

#[test]
fn haproxy_takes_its_socket_by_fd_number_and_upgrades_lose_nothing() {
    let env = TestEnv::with_daemon("haproxy");
    let haproxy = installed("/usr/sbin/haproxy");
    let conf = example("haproxy.cfg");
    let service = RunningService::start(
        &env,
        "lb",
        &[
            "--listen",
            "tcp://127.0.0.1:8081",
            "--drain-signal",
            "SIGUSR1",
            "--grace",
            "50ms",
            "--drain-timeout",
            "10s",
            "--",
            &haproxy,
            "-db",
            "-f",
            conf.to_str().unwrap(),
        ],
    );
    five_upgrades_lose_nothing(&env, &service, "127.0.0.1:8081", "haproxy");
}
