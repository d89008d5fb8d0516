//! Every generation listens on the service's own address (what `--listen` says), and the
//! readiness probe still reaches exactly the new generation, on any binding layout.

use std::{
    io::BufReader,
    net::{TcpListener, TcpStream},
    time::Duration,
};

use integration_tests::{http_exchange, tcp_listeners, RunningService, TestEnv};

fn get(addr: &str) -> String {
    let mut stream = BufReader::new(TcpStream::connect(addr).unwrap());
    http_exchange(&mut stream).unwrap().0
}

fn upgrade(env: &TestEnv, service: &str) -> String {
    env.ok(&["upgrade", service])
}

#[test]
fn every_generation_listens_on_the_service_address_and_nothing_else_does() {
    let env = TestEnv::with_daemon("exact");
    let _service = RunningService::fixture(&env, &[]);
    for round in 0..3 {
        // What the server itself sees of its inherited socket.
        let body = get("127.0.0.1:8080");
        assert!(body.trim_end().ends_with(" on 127.0.0.1:8080"), "{body}");
        // And nothing is reachable around hotswap on another port: only the service's own
        // address listens (one socket per live generation, in one SO_REUSEPORT group).
        let listeners = tcp_listeners();
        assert!(!listeners.is_empty());
        assert!(
            listeners.iter().all(|l| l == "127.0.0.1:8080"),
            "round {round}: {listeners:?}"
        );
        let status = env.status();
        let generations = status["services"][0]["generations"].as_array().unwrap();
        assert!(
            generations
                .iter()
                .all(|g| g["sockets"][0]["local_addr"] == "127.0.0.1:8080"),
            "{status}"
        );
        let out = upgrade(&env, "web");
        assert!(out.contains("is active"), "{out}");
    }
}

/// With a port-0 binding over a whole prefix (every port of 127.0.0.0/8 is the service's),
/// the probe still reaches the new generation and only it, and is never counted as traffic.
#[test]
fn the_tcp_probe_reaches_the_new_generation_under_a_wildcard_binding_and_is_not_counted() {
    let env = TestEnv::with_daemon("probe-wildcard");
    env.ok(&["bind", "web", "tcp", "127.0.0.0/8", "0"]);
    let _service = RunningService::fixture(&env, &["--ready", "tcp"]);
    for _ in 0..3 {
        let out = upgrade(&env, "web");
        assert!(out.contains("is active"), "{out}");
    }
    // Four generations were probed; not one probe reached the service's counters.
    env.assert_counted("web", 0, 0);
    let body = get("127.0.0.5:9999");
    assert!(body.starts_with("fixture pid"), "{body}");
    env.assert_counted("web", 1, 0);
    // The active generation answers: the one `status` names.
    let status = env.status();
    let active = status["supervisors"]["web"]["active"].as_u64().unwrap();
    assert_eq!(active, 4, "{status}");
}

/// A generation that never accepts on its socket is never declared ready, even though the
/// active generation would answer a connection to the same address.
#[test]
fn a_generation_that_accepts_nothing_is_not_ready_and_nothing_switches() {
    let env = TestEnv::with_daemon("probe-silent");
    let _service = RunningService::fixture(&env, &["--ready", "tcp"]);
    let before = get("127.0.0.1:8080");
    // `sleep` holds fd 3 and never accepts.
    let out = env.hotswap(&[
        "upgrade",
        "web",
        "--ready",
        "tcp",
        "--ready-timeout",
        "2s",
        "--",
        "sleep",
        "60",
    ]);
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not ready") || stderr.contains("accept"),
        "{stderr}"
    );
    assert_eq!(
        get("127.0.0.1:8080"),
        before,
        "the old generation still serves"
    );
    let status = env.status();
    assert_eq!(status["supervisors"]["web"]["active"], 1, "{status}");
}

/// A listener outside hotswap holds the service's address (no SO_REUSEPORT), e.g. the server
/// being moved under hotswap: the generation gets another port, the operator is told in one
/// line, and the service's connections reach the generation all the same.
#[test]
fn an_address_held_outside_hotswap_is_reported_and_still_served() {
    let env = TestEnv::with_daemon("held");
    let outsider = TcpListener::bind("127.0.0.1:8080").unwrap();
    let service = RunningService::fixture(&env, &[]);
    let log = service.log();
    assert!(
        log.contains("127.0.0.1:8080 is held by a listener outside hotswap"),
        "{log}"
    );
    let body = get("127.0.0.1:8080");
    assert!(
        body.starts_with("fixture pid"),
        "steered past the outsider: {body}"
    );
    assert!(!body.contains(" on 127.0.0.1:8080"), "{body}");
    // Once the outsider is gone, the next generation gets the address itself.
    drop(outsider);
    std::thread::sleep(Duration::from_millis(50));
    let out = upgrade(&env, "web");
    assert!(out.contains("is active"), "{out}");
    let body = get("127.0.0.1:8080");
    assert!(body.trim_end().ends_with(" on 127.0.0.1:8080"), "{body}");
}

/// A server that drops the socket it was given and binds the address itself (with
/// SO_REUSEPORT it would silently join the service's group) is refused before the switch, and
/// so is one that holds no socket at all; the old generation keeps serving.
#[test]
fn a_generation_that_does_not_use_its_socket_is_never_switched_to() {
    let env = TestEnv::with_daemon("own-socket");
    let _service = RunningService::fixture(&env, &[]);
    let before = get("127.0.0.1:8080");
    // Each server says READY=1 only once it has done what the check must catch: readiness by
    // delay raced a python start slower than the delay on a loaded machine.
    let notify = "def ready():\n    \
            a = os.environ['NOTIFY_SOCKET']\n    \
            a = '\\0' + a[1:] if a.startswith('@') else a\n    \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', a)\n";
    let own_socket = format!(
        "import os, socket\n{notify}\
        os.close(3)\n\
        s = socket.socket()\n\
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n\
        s.bind(('127.0.0.1', 8080))\n\
        s.listen()\n\
        ready()\n\
        while True:\n    s.accept()[0].close()\n"
    );
    let out = env.hotswap(&[
        "upgrade",
        "web",
        "--ready",
        "notify",
        "--",
        "python3",
        "-c",
        &own_socket,
    ]);
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("listens on tcp 127.0.0.1:8080 with a socket of its own"),
        "{stderr}"
    );
    let no_socket =
        format!("import os, socket, time\n{notify}os.close(3)\nready()\ntime.sleep(60)\n");
    let out = env.hotswap(&[
        "upgrade", "web", "--ready", "notify", "--", "python3", "-c", &no_socket,
    ]);
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not use the tcp socket it was given"),
        "{stderr}"
    );
    assert_eq!(
        get("127.0.0.1:8080"),
        before,
        "the old generation still serves"
    );
    let status = env.status();
    assert_eq!(status["supervisors"]["web"]["active"], 1, "{status}");
}
