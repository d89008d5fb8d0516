//! The daemon's own behaviour: eBPF debug logging, control socket permissions.

use std::os::unix::fs::PermissionsExt as _;

use integration_tests::{tcp_request, Server, TestEnv};
use nix::sys::signal::Signal;

#[test]
fn ebpf_debug_log_is_off_unless_asked_for() {
    let mut env = TestEnv::with_daemon("debuglog");
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    let server = Server::start("tcp", "127.0.0.1:0", "web");
    env.register("web", &server, &["--activate"]);
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "web");
    env.stop_daemon(Signal::SIGTERM);
    assert!(
        !env.daemon_log().contains("steered"),
        "{}",
        env.daemon_log()
    );

    // With --debug-ebpf, every steered connection is logged through aya-log.
    let log = env.dir.path().join("debug.log");
    let mut daemon = env
        .daemon_command()
        .arg("--debug-ebpf")
        .env("RUST_LOG", "debug")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + integration_tests::PATIENCE;
    while !env.hotswap(&["status"]).status.success() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "web");
    let deadline = std::time::Instant::now() + integration_tests::PATIENCE;
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("port 8080: steered")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    daemon.wait().unwrap();
}

#[test]
fn control_socket_is_for_root_only() {
    let env = TestEnv::with_daemon("perms");
    let mode = std::fs::metadata(&env.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}
