//! The daemon's own behaviour: eBPF debug logging, control socket permissions.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

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
    let deadline = std::time::Instant::now() + integration_tests::patience();
    while !env.hotswap(&["status"]).status.success() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "web");
    let deadline = std::time::Instant::now() + integration_tests::patience();
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

/// Runs `hotswap daemon` with `pin_dir` and `socket` from a thread in a network namespace of
/// its own; it must fail. Returns its stderr.
fn daemon_fails_in_other_netns(pin_dir: PathBuf, socket: PathBuf) -> String {
    let bin = integration_tests::hotswap_bin();
    std::thread::spawn(move || {
        let _netns = integration_tests::NetnsGuard::enter();
        let out = Command::new(bin)
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .arg("--pin-dir")
            .arg(&pin_dir)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    })
    .join()
    .unwrap()
}

#[test]
fn a_pin_dir_of_another_live_namespace_is_refused() {
    let mut env = TestEnv::with_daemon("foreign");
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    env.stop_daemon(Signal::SIGTERM);
    // The state stays attached to this namespace; a daemon in another one must not take it.
    let stderr = daemon_fails_in_other_netns(env.pin_dir.clone(), env.dir.path().join("b.sock"));
    assert!(
        stderr.contains("holds the state of network namespace"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    env.start_daemon();
    assert_eq!(env.status()["services"][0]["name"], "web");
}

#[test]
fn state_of_a_namespace_that_is_gone_is_discarded() {
    let mut env = TestEnv::new("gone");
    let socket = env.dir.path().join("gone.sock");
    let pin_dir = env.pin_dir.clone();
    let bin = integration_tests::hotswap_bin();
    // A namespace that binds something, then disappears with its daemon.
    std::thread::spawn(move || {
        let _netns = integration_tests::NetnsGuard::enter();
        let mut daemon = Command::new(&bin)
            .args(["daemon", "--socket"])
            .arg(&socket)
            .arg("--pin-dir")
            .arg(&pin_dir)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + integration_tests::patience();
        while !Command::new(&bin)
            .args(["bind", "old", "tcp", "127.0.0.1/32", "80"])
            .env("HOTSWAP_SOCKET", &socket)
            .output()
            .unwrap()
            .status
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "daemon in the doomed namespace never came up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon.kill().unwrap();
        daemon.wait().unwrap();
    })
    .join()
    .unwrap();
    // The kernel tears a namespace down asynchronously; until then its state is foreign.
    let deadline = Instant::now() + integration_tests::patience();
    while let Err(log) = env.try_start_daemon() {
        assert!(
            log.contains("holds the state of network namespace"),
            "{log}"
        );
        assert!(Instant::now() < deadline, "the namespace never went away");
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = env.status();
    assert_eq!(status["services"], serde_json::json!([]), "{status}");
    let reason = status["backend"]["reason"].as_str().unwrap();
    assert!(reason.contains("discarded"), "{status}");
}

/// Waits for the next sd_notify message on `socket`.
fn next_notification(socket: &std::os::unix::net::UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("an sd_notify message in time");
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    println!("sd_notify: {text:?}");
    text
}

/// Under systemd `Type=notify`, the daemon says READY=1 once its control socket answers and
/// STOPPING=1 when it stops; `hotswap run` says READY=1 once the first generation is active.
#[test]
fn the_daemon_and_the_supervisor_tell_systemd_when_they_are_ready() {
    let env = TestEnv::new("sd-notify");
    let notify_path = env.dir.path().join("systemd-notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    systemd
        .set_read_timeout(Some(integration_tests::patience()))
        .unwrap();

    let mut daemon = env
        .daemon_command()
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(next_notification(&systemd).contains("READY=1"));
    // Ready means the control socket answers already: no retry here.
    env.ok(&["status"]);

    let example = integration_tests::example_server();
    // What the unit's ExecStart runs, started again as Restart= would.
    let start_run = || {
        Command::new(integration_tests::hotswap_bin())
            .args([
                "run",
                "web",
                "--listen",
                "tcp://127.0.0.1:8080",
                "--ready",
                "notify",
                "--",
            ])
            .arg(&example)
            .env("HOTSWAP_SOCKET", &env.socket)
            .env("NOTIFY_SOCKET", &notify_path)
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut run = start_run();
    assert!(next_notification(&systemd).contains("READY=1"));
    // The server itself was ready first (it told the supervisor, not systemd), and the
    // service answers now.
    let first = integration_tests::tcp_http_body("127.0.0.1:8080");
    assert!(first.starts_with("generation 1"), "{first}");

    // ExecReload (kill -HUP $MAINPID): a reload under way, then ready again, same main pid,
    // same generation.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.id() as i32), Signal::SIGHUP).unwrap();
    assert!(next_notification(&systemd).contains("RELOADING=1"));
    assert!(next_notification(&systemd).contains("READY=1"));
    assert!(run.try_wait().unwrap().is_none(), "the main pid stays");
    assert_eq!(integration_tests::tcp_http_body("127.0.0.1:8080"), first);

    // A crash of the main process (KillMode=process leaves the generation) and Restart=: the
    // new supervisor adopts it and is ready at once.
    run.kill().unwrap();
    run.wait().unwrap();
    assert_eq!(integration_tests::tcp_http_body("127.0.0.1:8080"), first);
    let mut run = start_run();
    assert!(next_notification(&systemd).contains("READY=1"));
    assert_eq!(integration_tests::tcp_http_body("127.0.0.1:8080"), first);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.id() as i32), Signal::SIGTERM).unwrap();
    assert!(next_notification(&systemd).contains("STOPPING=1"));
    assert!(run.wait().unwrap().success());

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    assert!(next_notification(&systemd).contains("STOPPING=1"));
    assert!(daemon.wait().unwrap().success());
}

/// The kernel is the truth at adoption: a record that names another generation than the one
/// the kernel steers to (as a record write that failed to be undone leaves it, done here by
/// hand with the daemon stopped) is corrected from the kernel — the daemon reads back which
/// socket the service's map entry holds — and traffic never moves. The counters do not see
/// the read-back.
#[test]
fn a_restarted_daemon_reads_back_which_socket_the_kernel_steers_to() {
    use hotswap_common::{map_names, ServiceRecord};
    let mut env = TestEnv::new("read-back");
    env.backend = Some("sk-lookup".to_owned());
    env.start_daemon();
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    let one = Server::start("tcp", "127.0.0.1:0", "one");
    let two = Server::start("tcp", "127.0.0.1:0", "two");
    env.register("web", &one, &["--activate"]);
    env.register("web", &two, &["--activate"]);
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "two");
    let counted = env.metrics("web");
    env.stop_daemon(Signal::SIGTERM);

    let pinned = aya::maps::MapData::from_pin(env.pin_dir.join(map_names::SERVICES)).unwrap();
    let mut services: aya::maps::HashMap<_, u32, ServiceRecord> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(pinned)).unwrap();
    let mut record = services.get(&1, 0).unwrap();
    assert_eq!(record.active_tcp, 2);
    record.active_tcp = 1;
    services.insert(1, record, 0).unwrap();
    drop(services);

    env.start_daemon();
    let log = env.daemon_log();
    assert!(
        log.contains("the kernel steers tcp to generation 2, its record said 1"),
        "{log}"
    );
    let status = env.status();
    assert_eq!(
        integration_tests::active_generations(&status),
        [2],
        "{status}"
    );
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "two");
    let after = env.metrics("web");
    assert_eq!(
        [after[0] - counted[0], after[1] - counted[1]],
        [1, 1],
        "only the request above was counted"
    );
}
