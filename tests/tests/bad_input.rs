//! Bad input: one clear line on stderr, a non-zero exit, and no state change.

use std::{
    net::{TcpListener, TcpStream, UdpSocket},
    os::{fd::AsRawFd, unix::fs::PermissionsExt},
    process::Command,
};

use integration_tests::{tcp_request, unprivileged_copy_of_hotswap, Server, TestEnv};

/// Asserts that `args` fail with one line mentioning `needle`, and that nothing changed.
fn refused(env: &TestEnv, args: &[&str], needle: &str) {
    let before = env.status();
    let line = env.fails(args);
    assert!(line.starts_with("error:"), "{args:?}: {line}");
    assert!(
        line.contains(needle),
        "{args:?}: expected {needle:?} in {line:?}"
    );
    assert_eq!(env.status(), before, "{args:?} changed the state");
}

fn prepared() -> (TestEnv, Server) {
    let env = TestEnv::with_daemon("bad");
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    let server = Server::start("tcp", "127.0.0.1:0", "one");
    env.register("web", &server, &["--activate"]);
    (env, server)
}

#[test]
fn malformed_words_are_refused() {
    let (env, _server) = prepared();
    refused(
        &env,
        &["bind", "web", "tcp", "127.0.0.1/33", "80"],
        "invalid prefix",
    );
    refused(
        &env,
        &["bind", "web", "tcp", "127.0.0.1", "80"],
        "invalid prefix",
    );
    refused(
        &env,
        &["bind", "web", "tcp", "not-an-ip/8", "80"],
        "invalid prefix",
    );
    refused(
        &env,
        &["bind", "web", "tcp", "192.0.2.1/24", "80"],
        "192.0.2.0/24",
    );
    refused(
        &env,
        &["bind", "web", "tcp", "0.0.0.0/32", "80"],
        "no connection is addressed to the unspecified address; use 0.0.0.0/0",
    );
    refused(
        &env,
        &["bind", "web", "udp", "::/128", "53"],
        "use ::/0 for every address",
    );
    refused(
        &env,
        &["bind", "web", "tcp", "127.0.0.1/32", "65536"],
        "invalid port",
    );
    refused(&env, &["bind", "web", "tcp", "127.0.0.1/32", "-1"], "");
    refused(
        &env,
        &["bind", "web", "sctp", "127.0.0.1/32", "80"],
        "invalid protocol",
    );
    refused(
        &env,
        &["bind", "Web", "tcp", "127.0.0.1/32", "80"],
        "invalid service name",
    );
    refused(&env, &["bind", "-web", "tcp", "127.0.0.1/32", "80"], "");
    refused(
        &env,
        &["bind", &"a".repeat(64), "tcp", "127.0.0.1/32", "80"],
        "invalid service name",
    );
    refused(&env, &["switch", "web", "one"], "invalid value");
    refused(
        &env,
        &["register", "web", "--pid", "x", "--fd", "3"],
        "invalid value",
    );
    refused(
        &env,
        &[
            "register",
            "web",
            "--pid",
            "1",
            "--fd",
            "3",
            "--label",
            &"x".repeat(65),
        ],
        "label",
    );
    // Binding what is bound, unbinding what is not.
    refused(
        &env,
        &["bind", "other", "tcp", "127.0.0.1/32", "8080"],
        "already bound to service web",
    );
    refused(
        &env,
        &["unbind", "web", "tcp", "127.0.0.1/32", "8081"],
        "has no binding",
    );
    refused(
        &env,
        &["unbind", "nope", "tcp", "127.0.0.1/32", "8080"],
        "unknown service",
    );
}

#[test]
fn unknown_services_and_generations_are_refused() {
    let (env, server) = prepared();
    refused(&env, &["switch", "nope", "1"], "unknown service");
    refused(&env, &["switch", "web", "2"], "no live generation 2");
    let (pid, fd) = (server.pid.to_string(), server.fd.to_string());
    refused(
        &env,
        &["register", "nope", "--pid", &pid, "--fd", &fd],
        "unknown service",
    );
    refused(
        &env,
        &["register", "web", "--pid", &pid, "--fd", &fd],
        "already registered as generation 1",
    );
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "one");
}

#[test]
fn sockets_that_cannot_serve_are_refused() {
    let (env, _server) = prepared();
    let me = std::process::id().to_string();
    let check = |fd: i32, needle: &str| {
        refused(
            &env,
            &["register", "web", "--pid", &me, "--fd", &fd.to_string()],
            needle,
        );
    };
    let file = std::fs::File::open("/proc/self/status").unwrap();
    check(file.as_raw_fd(), "is not a socket");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    check(stream.as_raw_fd(), "not listening");
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    check(udp.as_raw_fd(), "has no udp binding");
    env.ok(&["bind", "web", "udp", "127.0.0.1/32", "5353"]);
    let connected = UdpSocket::bind("127.0.0.1:0").unwrap();
    connected.connect("127.0.0.1:9").unwrap();
    check(connected.as_raw_fd(), "connected UDP socket");
    let unbound = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::empty(),
        None,
    )
    .unwrap();
    check(unbound.as_raw_fd(), "not bound");
    let (unix, _) = std::os::unix::net::UnixStream::pair().unwrap();
    check(unix.as_raw_fd(), "not a TCP or UDP socket");
    check(999, "has no open fd 999");
    // An IPv4 socket for a service that has only IPv6 bindings of its protocol.
    env.ok(&["bind", "six", "tcp", "::1/128", "8080"]);
    let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let line = env.fails(&[
        "register",
        "six",
        "--pid",
        &me,
        "--fd",
        &v4.as_raw_fd().to_string(),
    ]);
    assert!(line.contains("IPv4-only"), "{line}");
    // A listener from another network namespace: made on a thread that enters one of its own.
    let foreign = std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        TcpListener::bind("0.0.0.0:0").unwrap()
    })
    .join()
    .unwrap();
    check(foreign.as_raw_fd(), "another network namespace");
    refused(
        &env,
        &["register", "web", "--pid", "2147483647", "--fd", "3"],
        "no process with pid 2147483647",
    );
}

#[test]
fn daemon_not_running_says_how_to_start_it() {
    let env = TestEnv::new("nodaemon");
    let line = env.fails(&["status"]);
    assert!(line.contains("not running"), "{line}");
    assert!(line.contains("hotswap daemon"), "{line}");
}

#[test]
fn non_root_peers_are_refused() {
    let (env, _server) = prepared();
    let copy = unprivileged_copy_of_hotswap(env.dir.path());
    let as_nobody = |args: &[&str]| {
        let out = Command::new(&copy)
            .args(args)
            .env("HOTSWAP_SOCKET", &env.socket)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        stderr
    };
    // The socket itself is root's only ...
    let before = env.status();
    let line = as_nobody(&["switch", "web", "1"]);
    assert!(
        line.contains("permission denied on control socket"),
        "{line}"
    );
    // ... and were it opened up by mistake, the daemon still checks the peer's credentials.
    std::fs::set_permissions(&env.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let line = as_nobody(&["bind", "evil", "tcp", "127.0.0.1/32", "80"]);
    assert!(
        line.contains("uid 65534")
            && line.contains("may not use this control socket (only root may)"),
        "{line}"
    );
    let line = as_nobody(&["status"]);
    assert!(
        line.contains("uid 65534")
            && line.contains("may not use this control socket (only root may)"),
        "{line}"
    );
    assert_eq!(env.status(), before);
}

use std::os::unix::process::CommandExt as _;

#[test]
fn a_second_daemon_is_refused() {
    let (env, _server) = prepared();
    let before = env.status();
    // Same pin dir, another socket.
    let other_socket = env.dir.path().join("other.sock");
    let out = Command::new(integration_tests::hotswap_bin())
        .arg("daemon")
        .arg("--socket")
        .arg(&other_socket)
        .arg("--pin-dir")
        .arg(&env.pin_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("already running on pin dir"), "{stderr}");
    // The holder is named, so the operator knows which process to look at.
    let holder = format!("(pid {})", env.daemon_pid().unwrap());
    assert!(stderr.contains(&holder), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // Same socket, another pin dir.
    let out = integration_tests::hotswap_command(&env)
        .args(["daemon", "--pin-dir"])
        .arg(env.pin_dir.with_file_name("other"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("already serving control socket"),
        "{stderr}"
    );
    assert!(stderr.contains(&holder), "{stderr}");
    assert!(
        !env.pin_dir.with_file_name("other").exists(),
        "the loser left state behind"
    );
    // The first daemon is unharmed.
    assert_eq!(env.status(), before);
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "one");
}

/// What a label (or any text from a process) holds reaches the terminal escaped: an escape
/// sequence in it is shown, not obeyed, and cannot forge a line of `status`.
#[test]
fn labels_reach_the_terminal_escaped() {
    let env = TestEnv::with_daemon("label-escape");
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    let server = Server::start("tcp", "127.0.0.1:0", "one");
    env.register("web", &server, &["--label", "\u{1b}[2Jv2\ngen 9 active"]);
    let text = env.ok(&["status"]);
    assert!(!text.contains('\u{1b}'), "{text:?}");
    assert!(text.contains(r"\u{1b}[2Jv2\u{a}gen 9 active"), "{text}");
    // The JSON keeps the label as it was given.
    assert_eq!(
        env.status()["services"][0]["generations"][0]["label"],
        "\u{1b}[2Jv2\ngen 9 active"
    );
}

/// A reader that goes away early (`hotswap status | head -1`) ends the output quietly: no
/// panic, exit 0.
#[test]
fn a_closed_stdout_ends_the_output_quietly() {
    let env = TestEnv::with_daemon("closed-stdout");
    for port in 8000..8020 {
        env.ok(&["bind", "web", "tcp", "127.0.0.1/32", &port.to_string()]);
    }
    for args in [&["status"][..], &["status", "--json"], &["metrics"]] {
        let (read, write) = nix::unistd::pipe().unwrap();
        drop(read);
        let out = Command::new(integration_tests::hotswap_bin())
            .args(args)
            .env("HOTSWAP_SOCKET", &env.socket)
            .stdout(std::process::Stdio::from(write))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {}: {stderr}", out.status);
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}
