//! Steering on the real kernel: each test in its own network namespace.

use std::net::TcpListener;

use integration_tests::{tcp_request, udp_request, wait_until, Server, TestEnv};

fn steers(
    env: &TestEnv,
    service: &str,
    proto: &str,
    prefix: &str,
    port: u16,
    server_addr: &str,
    target: &str,
) {
    let port = port.to_string();
    env.ok(&["bind", service, proto, prefix, &port]);
    let server = Server::start(proto, server_addr, service);
    let generation = env.register(service, &server, &["--activate"]);
    assert_eq!(generation, 1);
    let reply = match proto {
        "tcp" => tcp_request(target),
        _ => udp_request(target),
    };
    assert_eq!(reply.unwrap(), service, "{proto} {target}");
    // The server listens on another port than the one asked for: only steering can explain
    // the answer.
    assert_ne!(server.addr.port().to_string(), port);
    env.assert_counted(service, 1, 0);
}

#[test]
fn steers_tcp4_tcp6_udp4_udp6() {
    let env = TestEnv::with_daemon("steer");
    steers(
        &env,
        "tcp4",
        "tcp",
        "127.0.0.1/32",
        8080,
        "127.0.0.1:0",
        "127.0.0.1:8080",
    );
    steers(
        &env,
        "tcp6",
        "tcp",
        "::1/128",
        8080,
        "[::1]:0",
        "[::1]:8080",
    );
    steers(
        &env,
        "udp4",
        "udp",
        "127.0.0.1/32",
        5353,
        "127.0.0.1:0",
        "127.0.0.1:5353",
    );
    steers(
        &env,
        "udp6",
        "udp",
        "::1/128",
        5353,
        "[::1]:0",
        "[::1]:5353",
    );
}

#[test]
fn longest_prefix_wins_and_explicit_port_beats_wildcard() {
    let env = TestEnv::with_daemon("precedence");
    env.ok(&["bind", "wide", "tcp", "127.0.0.0/8", "0"]);
    env.ok(&["bind", "narrow", "tcp", "127.0.0.2/32", "0"]);
    env.ok(&["bind", "port", "tcp", "127.0.0.0/8", "9000"]);
    let servers: Vec<Server> = ["wide", "narrow", "port"]
        .iter()
        .map(|name| {
            let server = Server::start("tcp", "127.0.0.1:0", name);
            env.register(name, &server, &["--activate"]);
            server
        })
        .collect();
    // Exact port /8 against wildcard /32: the longer prefix wins.
    assert_eq!(tcp_request("127.0.0.2:9000").unwrap(), "narrow");
    // Exact port /8 against wildcard /8: the explicit port wins the tie.
    assert_eq!(tcp_request("127.0.0.3:9000").unwrap(), "port");
    // Only wildcards match.
    assert_eq!(tcp_request("127.0.0.3:9001").unwrap(), "wide");
    assert_eq!(tcp_request("127.0.0.2:9001").unwrap(), "narrow");
    // A UDP packet to the same addresses is not TCP's business.
    assert!(udp_request("127.0.0.3:9000").is_err());
    drop(servers);
}

#[test]
fn unbound_ports_reach_their_ordinary_listener() {
    let env = TestEnv::with_daemon("unbound");
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    let server = Server::start("tcp", "127.0.0.1:0", "web");
    env.register("web", &server, &["--activate"]);

    // A plain listener on a port nobody bound works with the program attached.
    let plain = TcpListener::bind("127.0.0.1:7000").unwrap();
    let accepter = std::thread::spawn(move || {
        let (mut conn, _) = plain.accept().unwrap();
        std::io::Write::write_all(&mut conn, b"plain\n").unwrap();
        plain
    });
    assert_eq!(tcp_request("127.0.0.1:7000").unwrap(), "plain");
    let plain = accepter.join().unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:7001").unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (_, peer) = udp.recv_from(&mut buf).unwrap();
        udp.send_to(b"plain-udp", peer).unwrap();
    });
    assert_eq!(udp_request("127.0.0.1:7001").unwrap(), "plain-udp");
    echo.join().unwrap();
    // Neither counted against the service.
    assert_eq!(env.metrics("web")[0], 0);

    // A port that is bound goes to the service even though a plain listener holds it ...
    drop(plain);
    let _plain_8080 = TcpListener::bind("127.0.0.1:8080").unwrap();
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "web");
    // ... and back to that listener once unbound.
    env.ok(&["unbind", "web", "tcp", "127.0.0.1/32", "8080"]);
    let stream = std::net::TcpStream::connect("127.0.0.1:8080").unwrap();
    let (accepted, _) = _plain_8080.accept().unwrap();
    assert_eq!(accepted.peer_addr().unwrap(), stream.local_addr().unwrap());
}

#[test]
fn bound_without_a_live_socket_is_refused_and_counted() {
    let env = TestEnv::with_daemon("refused");
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    // A plain listener on the port must not get the traffic: a binding is a promise.
    let _plain = TcpListener::bind("127.0.0.1:8080").unwrap();
    let err = tcp_request("127.0.0.1:8080").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    env.assert_counted("web", 0, 1);

    // Closing the active socket (the process lives on) leaves the service without a socket.
    let mut server = Server::start("tcp", "127.0.0.1:0", "web");
    env.register("web", &server, &["--activate"]);
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "web");
    server.close_listener();
    let err = tcp_request("127.0.0.1:8080").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    env.assert_counted("web", 1, 2);
    // The daemon notices the generation is gone.
    wait_until("the daemon to forget the generation", || {
        env.status()["services"][0]["generations"]
            .as_array()
            .unwrap()
            .is_empty()
    });

    // The same when the active generation's process exits.
    let mut server = Server::start("tcp", "127.0.0.1:0", "web");
    env.register("web", &server, &["--activate"]);
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "web");
    server.kill();
    wait_until("the daemon to forget the generation", || {
        env.status()["services"][0]["generations"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    let err = tcp_request("127.0.0.1:8080").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    env.assert_counted("web", 2, 3);
}

#[test]
fn ipv6_precedence_and_udp_wildcards() {
    let env = TestEnv::with_daemon("precedence6");
    env.ok(&["bind", "wide6", "tcp", "::/0", "0"]);
    env.ok(&["bind", "narrow6", "tcp", "::1/128", "0"]);
    env.ok(&["bind", "port6", "tcp", "::/0", "9000"]);
    // Not 127.0.0.0/8: the answers go back to the client's 127.0.0.1 socket, and a wildcard
    // covering that address would steer them too.
    env.ok(&["bind", "udpall", "udp", "127.0.0.8/29", "0"]);
    env.ok(&["bind", "udpport", "udp", "127.0.0.8/29", "53"]);
    let mut servers = Vec::new();
    for (name, proto, addr) in [
        ("wide6", "tcp", "[::1]:0"),
        ("narrow6", "tcp", "[::1]:0"),
        ("port6", "tcp", "[::1]:0"),
        ("udpall", "udp", "127.0.0.1:0"),
        ("udpport", "udp", "127.0.0.1:0"),
    ] {
        let server = Server::start(proto, addr, name);
        env.register(name, &server, &["--activate"]);
        servers.push(server);
    }
    assert_eq!(tcp_request("[::1]:9000").unwrap(), "narrow6");
    assert_eq!(tcp_request("[::1]:9001").unwrap(), "narrow6");
    assert_eq!(udp_request("127.0.0.9:53").unwrap(), "udpport");
    assert_eq!(udp_request("127.0.0.9:54").unwrap(), "udpall");
    // `::/0` is IPv6 only: IPv4 traffic to a plain listener is untouched.
    let plain = TcpListener::bind("127.0.0.1:9000").unwrap();
    let stream = std::net::TcpStream::connect("127.0.0.1:9000").unwrap();
    let (accepted, _) = plain.accept().unwrap();
    assert_eq!(accepted.peer_addr().unwrap(), stream.local_addr().unwrap());
}

#[test]
fn closing_the_active_socket_refuses_at_once() {
    let env = TestEnv::with_daemon("close");
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    // A plain close() of the listener while the process lives on.
    let mut server = Server::start("tcp", "127.0.0.1:0", "web");
    env.register("web", &server, &["--activate"]);
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "web");
    server.close_listener();
    // No reaper tick needed: nothing but the process held the socket.
    let err = std::net::TcpStream::connect("127.0.0.1:8080").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    // The same for a process that is killed.
    let mut server = Server::start("tcp", "127.0.0.1:0", "web");
    env.register("web", &server, &["--activate"]);
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "web");
    server.kill();
    let err = std::net::TcpStream::connect("127.0.0.1:8080").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let [_, _, no_socket, errors] = env.metrics("web");
    assert_eq!((no_socket, errors), (2, 0));
}
