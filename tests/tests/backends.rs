//! Backend selection and what each backend does and refuses.

use std::{
    net::TcpStream,
    os::fd::{AsRawFd as _, FromRawFd as _},
    process::Command,
};

use hotswap::model::{Protocol, ServiceName};
use integration_tests::TestEnv;

fn listener_from_the_library(backend: &str) {
    let env = TestEnv::with_backend(&format!("library-{backend}"), backend);
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    let service: ServiceName = "web".parse().unwrap();
    let (fd, generation) = hotswap::activation::service_listener(
        &env.socket,
        &service,
        Protocol::Tcp,
        Some("library".into()),
        true,
    )
    .unwrap();
    assert_eq!(generation, 1);
    // SAFETY: the library handed this fd over; the listener owns it from here.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd.as_raw_fd()) };
    std::mem::forget(fd);
    let client = TcpStream::connect("127.0.0.1:8080").unwrap();
    let (accepted, _) = listener.accept().unwrap();
    assert_eq!(accepted.peer_addr().unwrap(), client.local_addr().unwrap());
    let status = env.status();
    assert_eq!(
        status["backend"]["name"],
        backend.replace('-', "_"),
        "{status}"
    );
    assert_eq!(status["services"][0]["generations"][0]["label"], "library");
    // From async code: the blocking call (which used to start a runtime inside the caller's
    // and panic) and the async one.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (blocking_fd, blocking) = runtime.block_on(async {
        hotswap::activation::service_listener(&env.socket, &service, Protocol::Tcp, None, false)
            .unwrap()
    });
    assert_eq!(blocking, 2);
    // reuseport takes two members at a time: let generation 2 go first.
    drop(blocking_fd);
    integration_tests::wait_until("generation 2 is let go", || {
        env.status()["services"][0]["generations"]
            .as_array()
            .is_some_and(|g| g.len() == 1)
    });
    let (_awaited_fd, awaited) = runtime.block_on(async {
        hotswap::activation::service_listener_async(
            &env.socket,
            &service,
            Protocol::Tcp,
            None,
            false,
        )
        .await
        .unwrap()
    });
    assert_eq!(awaited, 3);
}

#[test]
fn the_library_gets_a_listener_from_the_sk_lookup_backend() {
    listener_from_the_library("sk-lookup");
}

#[test]
fn the_library_gets_a_listener_from_the_reuseport_backend() {
    listener_from_the_library("reuseport");
}

#[test]
fn the_library_gets_a_listener_from_the_uds_backend() {
    listener_from_the_library("uds");
}

#[test]
fn the_uds_backend_refuses_what_it_cannot_do() {
    let env = TestEnv::with_backend("uds-refuses", "uds");
    let status = env.status();
    assert_eq!(status["backend"]["name"], "uds");
    assert!(
        status["backend"]["reason"]
            .as_str()
            .unwrap()
            .contains("forced"),
        "{status}"
    );
    let before = env.status();
    for (args, needle) in [
        (
            &["bind", "web", "tcp", "127.0.0.0/8", "8080"][..],
            "the uds backend cannot bind a prefix or every port",
        ),
        (
            &["bind", "web", "tcp", "127.0.0.1/32", "0"][..],
            "the uds backend cannot bind a prefix or every port",
        ),
    ] {
        let line = env.fails(args);
        assert!(line.contains(needle), "{line}");
    }
    assert_eq!(env.status(), before);
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    let line = env.fails(&["bind", "web", "tcp", "127.0.0.1/32", "8081"]);
    assert!(line.contains("one shared socket per protocol"), "{line}");
    // The address is really taken by the daemon.
    assert!(std::net::TcpListener::bind("127.0.0.1:8080").is_err());
    let line = env.fails(&["switch", "web", "1"]);
    assert!(line.contains("the uds backend cannot switch"), "{line}");
    let line = env.fails(&["metrics"]);
    assert!(
        line.contains("the uds backend cannot count connections"),
        "{line}"
    );
    // A socket that is not the shared one cannot serve.
    let own = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (pid, fd) = (std::process::id().to_string(), own.as_raw_fd().to_string());
    let line = env.fails(&["register", "web", "--pid", &pid, "--fd", &fd]);
    assert!(line.contains("shared tcp socket"), "{line}");
    // --debug-ebpf has no program to debug.
    let out = Command::new(integration_tests::hotswap_bin())
        .args(["daemon", "--backend", "uds", "--debug-ebpf", "--socket"])
        .arg(env.dir.path().join("debug.sock"))
        .arg("--pin-dir")
        .arg(env.pin_dir.with_file_name("uds-debug"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the uds backend cannot log from the data path"),
        "{stderr}"
    );
}

#[test]
fn automatic_fallback_in_a_user_namespace() {
    let scenario = integration_tests::workspace_bin("hotswap-userns-scenario");
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "--"])
        .arg(&scenario)
        .output()
        .expect("unshare (util-linux) runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "scenario failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("backend: reuseport"), "{stdout}");
    assert!(stdout.contains("switched by hotswap switch"), "{stdout}");
}

#[test]
fn doctor_says_which_backend_auto_picks_and_why() {
    let doctor = |userns: bool| -> serde_json::Value {
        let mut cmd = Command::new("unshare");
        if userns {
            cmd.args(["--user", "--map-root-user"]);
        }
        let out = cmd
            .args(["--net", "--"])
            .arg(integration_tests::hotswap_bin())
            .args(["doctor", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let root = doctor(false);
    assert_eq!(root["sk_lookup_supported"], true, "{root}");
    assert_eq!(root["auto_backend"], "sk_lookup");
    assert_eq!(root["user_namespace"], false);
    let contained = doctor(true);
    assert_eq!(contained["sk_lookup_supported"], false, "{contained}");
    assert_eq!(contained["auto_backend"], "reuseport");
    assert_eq!(contained["reuseport_supported"], true, "{contained}");
    assert_eq!(contained["user_namespace"], true);
    assert!(
        contained["reason"].as_str().unwrap().contains("EPERM"),
        "{contained}"
    );
    assert!(!contained["advice"].as_array().unwrap().is_empty());
}

/// A restarted uds or reuseport daemon (killed, or stopped cleanly) takes the sockets it holds
/// back from the generations that hold them too: the service keeps its address and
/// generations, and upgrades go on under load with nothing lost.
fn a_restarted_daemon_adopts_its_services_and_upgrades_go_on(backend: &str) {
    let mut env = TestEnv::with_backend(&format!("{backend}-restart"), backend);
    let example = integration_tests::example_server();
    let service = integration_tests::RunningService::start(
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
            example.to_str().unwrap(),
        ],
    );
    let fresh = integration_tests::HttpLoad::start("127.0.0.1:8080", false, 10_000_000);
    let kept = integration_tests::HttpLoad::start("127.0.0.1:8080", true, 10_000_000);
    env.ok(&["upgrade", "web"]);
    for signal in [
        nix::sys::signal::Signal::SIGKILL,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        let before = env.status();
        env.stop_daemon(signal);
        let logged_before = env.daemon_log().len();
        env.start_daemon();
        let after = env.status();
        let log = env.daemon_log()[logged_before..].to_owned();
        assert_eq!(before["services"], after["services"], "{log}");
        assert!(log.contains("adopted generation"), "{log}");
        for _ in 0..3 {
            env.ok(&["upgrade", "web"]);
        }
    }
    // The address is still the daemon's: binding it elsewhere is refused as before.
    let refused = env.fails(&["bind", "other", "tcp", "127.0.0.1/32", "8080"]);
    assert!(refused.contains("bound to service web"), "{refused}");
    let (fresh, kept) = (fresh.stop(), kept.stop());
    assert_eq!(fresh.failed, 0, "{:?}\n{}", fresh.failures, service.log());
    assert_eq!(kept.failed, 0, "{:?}\n{}", kept.failures, service.log());
    assert_eq!(env.status()["supervisors"]["web"]["active"], 8);
}

#[test]
fn a_restarted_uds_daemon_adopts_its_services_and_upgrades_go_on() {
    a_restarted_daemon_adopts_its_services_and_upgrades_go_on("uds");
}

#[test]
fn a_restarted_reuseport_daemon_adopts_its_services_and_upgrades_go_on() {
    a_restarted_daemon_adopts_its_services_and_upgrades_go_on("reuseport");
}

/// After a restart, an address whose shared socket no registered generation holds is bound
/// again; one that cannot be bound now (here: a process that never registered still holds
/// the socket) stays bound in the registry, is shown as not served, and is bound again when a
/// generation asks for it. A state file the daemon cannot read stops it with one line naming
/// the file.
#[test]
fn a_restarted_uds_daemon_binds_what_nobody_holds_and_refuses_a_corrupt_state_file() {
    let mut env = TestEnv::with_backend("uds-state", "uds");
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    let service: ServiceName = "web".parse().unwrap();
    let socket = env.socket.clone();
    let ask = || {
        hotswap::client::listener(
            &socket,
            &service,
            Protocol::Tcp,
            std::time::Duration::from_secs(5),
        )
    };
    let unregistered = ask().unwrap().unwrap();
    env.stop_daemon(nix::sys::signal::Signal::SIGKILL);
    env.start_daemon();
    let log = env.daemon_log();
    assert!(
        log.contains("tcp 127.0.0.1/32 8080 is not served for now")
            && log.contains("bound again when a generation asks for it"),
        "{log}"
    );
    let status = env.status();
    assert_eq!(
        status["services"][0]["bindings"].as_array().unwrap().len(),
        1,
        "{status}"
    );
    assert_eq!(status["backend"]["unserved"].as_array().unwrap().len(), 1);
    assert!(env
        .ok(&["status"])
        .contains("not served: tcp 127.0.0.1/32 8080"));
    // Still held elsewhere: asking fails, saying why.
    let refused = hotswap::error_chain(&ask().unwrap_err());
    assert!(
        refused.contains("binding 127.0.0.1:8080 failed"),
        "{refused}"
    );

    drop(unregistered);
    let served = ask().unwrap().unwrap();
    assert!(env.status()["backend"]["unserved"].is_null());
    assert!(env
        .daemon_log()
        .contains("bound tcp 127.0.0.1/32 8080 again: a generation asked for it"));
    drop(served);

    env.stop_daemon(nix::sys::signal::Signal::SIGKILL);
    env.start_daemon();
    assert!(
        env.daemon_log()
            .contains("bound tcp 127.0.0.1/32 8080 again: no live generation held its socket"),
        "{}",
        env.daemon_log()
    );
    assert_eq!(env.status()["services"][0]["name"], "web");
    // The daemon's socket is listening again: the connection waits in its queue.
    TcpStream::connect("127.0.0.1:8080").unwrap();

    env.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    let state = hotswap::daemon::uds_state_path(&env.socket);
    std::fs::write(&state, b"{ not json").unwrap();
    let log = env.try_start_daemon().unwrap_err();
    assert!(
        log.contains("is unreadable (move it away to start empty)"),
        "{log}"
    );
    std::fs::remove_file(&state).unwrap();
    env.start_daemon();
    assert_eq!(env.status()["services"], serde_json::json!([]));
}

/// The daemon left to choose (`--backend auto`, the default) loads, verifies and attaches the
/// program wherever it can: on every kernel of the matrix, not only the host's.
#[test]
fn auto_picks_sk_lookup_where_the_program_loads() {
    let env = TestEnv::with_daemon("auto");
    let status = env.status();
    assert_eq!(status["backend"]["name"], "sk_lookup", "{status}");
    assert!(
        status["backend"]["reason"]
            .as_str()
            .unwrap()
            .contains("loaded and attached"),
        "{status}"
    );
    let instructions = status["backend"]["verified_instructions"].as_u64().unwrap();
    assert!(instructions > 0, "{status}");
    // The kernel matrix reports it per kernel (run with --nocapture).
    println!("the verifier processed {instructions} instructions");
    // And it steers.
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    let server = integration_tests::Server::start("tcp", "127.0.0.1:0", "auto");
    env.register("web", &server, &["--activate"]);
    assert_eq!(
        integration_tests::tcp_request("127.0.0.1:8080").unwrap(),
        "auto"
    );
}
