//! The reuseport backend's member-index invariant and what it refuses, on the real kernel.
//!
//! The test process holds the generations' listeners itself (it registers its own descriptors)
//! and accepts from all of them, so it sees which member the kernel gave each connection while a
//! client connects without pause and members leave in every order: closed and forgotten by the
//! daemon, or shut down by their process.

use std::{
    net::{TcpListener, TcpStream},
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use hotswap::model::{Protocol, ServiceName};
use integration_tests::{patience, TestEnv};

const ADDR: &str = "127.0.0.1:8080";

/// A generation whose listener this process holds.
struct Member {
    generation: u32,
    listener: TcpListener,
    accepted: u64,
}

/// A new member from the daemon, registered as this process's.
fn member(env: &TestEnv) -> Member {
    let service: ServiceName = "web".parse().unwrap();
    let fd: OwnedFd = hotswap::client::listener(
        &env.socket,
        &service,
        Protocol::Tcp,
        std::time::Duration::from_secs(5),
    )
    .unwrap()
    .expect("the reuseport backend makes the socket");
    let listener = TcpListener::from(fd);
    listener.set_nonblocking(true).unwrap();
    let pid = std::process::id().to_string();
    let fd = listener.as_raw_fd().to_string();
    let out = env.ok(&["register", "web", "--pid", &pid, "--fd", &fd]);
    let generation = out
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no generation in {out:?}"));
    Member {
        generation,
        listener,
        accepted: 0,
    }
}

/// A client that connects without pause until dropped; counts connections made and failed.
struct Client {
    stop: Arc<AtomicBool>,
    made: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let made = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, made, failed) = (stop.clone(), made.clone(), failed.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + patience() * 3;
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    match TcpStream::connect(ADDR) {
                        Ok(_) => made.fetch_add(1, Ordering::SeqCst),
                        Err(_) => failed.fetch_add(1, Ordering::SeqCst),
                    };
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        };
        Self {
            stop,
            made,
            failed,
            thread: Some(thread),
        }
    }

    /// Stops; returns (made, failed).
    fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        (
            self.made.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

/// Accepts from every member for `time`, doing `event` halfway; every connection must reach
/// `expected` (an index into `members`, after the event).
fn serve(members: &mut [Member], time: Duration, event: impl FnOnce(&mut [Member])) {
    let halfway = Instant::now() + time / 2;
    let end = Instant::now() + time;
    let mut event = Some(event);
    while Instant::now() < end {
        if Instant::now() >= halfway {
            if let Some(event) = event.take() {
                event(members);
            }
        }
        accept_all(members);
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Accepts what was queued before a switch (handshakes done before it land where they were
/// sent).
fn settle(members: &mut [Member]) {
    std::thread::sleep(Duration::from_millis(20));
    accept_all(members);
}

fn accept_all(members: &mut [Member]) {
    for m in members.iter_mut() {
        while m.listener.accept().is_ok() {
            m.accepted += 1;
        }
    }
}

/// Closes the member's listener (it keeps a placeholder on another port that nothing reaches).
fn close(m: &mut Member) {
    let placeholder = TcpListener::bind("127.0.0.1:0").unwrap();
    placeholder.set_nonblocking(true).unwrap();
    drop(std::mem::replace(&mut m.listener, placeholder));
}

fn shut_down(m: &Member) {
    nix::sys::socket::shutdown(m.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both).unwrap();
}

/// Waits until the daemon has let go of `generation` (its reaper saw the descriptor closed).
fn wait_forgotten(env: &TestEnv, generation: u32) {
    let deadline = Instant::now() + patience();
    loop {
        let status = env.status();
        let live = status["services"][0]["generations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["id"] == generation);
        if !live {
            return;
        }
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Members leave in every order — the one after the active one, the one before it, by close
/// (the daemon lets go and shuts it down) or by a process's shutdown() — while a client
/// connects without pause: no connection fails, and every one reaches the active generation.
#[test]
fn members_that_leave_in_any_order_never_misdirect_a_connection() {
    let env = TestEnv::with_backend("reuseport-order", "reuseport");
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    let step = patience() / 40;
    // [A*]: A gets everything.
    let mut members = vec![member(&env)];
    env.ok(&["switch", "web", &members[0].generation.to_string()]);
    let client = Client::start();
    // [A*, B]: B joined after the active one; it is closed and forgotten.
    members.push(member(&env));
    serve(&mut members, step, |m| {
        let b = m[1].generation;
        // Closing our descriptor ends the generation: the daemon forgets it and takes its
        // socket out of the group.
        close(&mut m[1]);
        wait_forgotten(&env, b);
    });
    assert_eq!(members[1].accepted, 0, "connections reached B");
    members.pop();

    // [A, C*]: switched to the one that joined last; A, before it, is shut down by its
    // process (C moves into A's slot at that instant).
    members.push(member(&env));
    env.ok(&["switch", "web", &members[1].generation.to_string()]);
    settle(&mut members);
    let a_before = members[0].accepted;
    serve(&mut members, step, |m| shut_down(&m[0]));
    assert_eq!(
        members[0].accepted, a_before,
        "connections reached A after the switch"
    );
    let a = members.remove(0);
    wait_forgotten_or_dead(&env, a);

    // [C*, D]: D, after the active one, is shut down by its process.
    members.push(member(&env));
    serve(&mut members, step, |m| shut_down(&m[1]));
    assert_eq!(members[1].accepted, 0, "connections reached D");
    members.pop();

    // [C, E*]: switched to E; C, before it, is closed and forgotten.
    members.push(member(&env));
    env.ok(&["switch", "web", &members[1].generation.to_string()]);
    settle(&mut members);
    let c_before = members[0].accepted;
    serve(&mut members, step, |m| {
        let c = m[0].generation;
        close(&mut m[0]);
        wait_forgotten(&env, c);
    });
    assert_eq!(
        members[0].accepted, c_before,
        "connections reached C after the switch"
    );
    members.remove(0);

    // [E, F]: switch to F and back (a rollback), then F leaves by shutdown.
    members.push(member(&env));
    let (e, f) = (members[0].generation, members[1].generation);
    env.ok(&["switch", "web", &f.to_string()]);
    serve(&mut members, step, |_| {});
    env.ok(&["switch", "web", &e.to_string()]);
    settle(&mut members);
    let f_before = members[1].accepted;
    serve(&mut members, step, |m| shut_down(&m[1]));
    assert_eq!(
        members[1].accepted, f_before,
        "connections reached F after switching back"
    );

    let (made, failed) = client.stop();
    accept_all(&mut members);
    println!("{made} connections while members left in every order, {failed} failed");
    assert_eq!(failed, 0);
    assert!(made > 100, "{made}");
    let status = env.status();
    let relistened = status["services"][0]["relistened"].as_u64().unwrap();
    assert_eq!(relistened, 0, "{status}");
}

/// A generation whose socket was shut down stays registered (its process lives); the daemon
/// has taken it out of the group. Forget it by closing the descriptor.
fn wait_forgotten_or_dead(env: &TestEnv, member: Member) {
    let generation = member.generation;
    drop(member);
    wait_forgotten(env, generation);
}

/// The active generation's socket shut down by its process listens again within
/// milliseconds, and the generation gets the service's connections again.
#[test]
fn an_active_socket_that_is_shut_down_listens_again() {
    let env = TestEnv::with_backend("reuseport-relisten", "reuseport");
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    let mut members = vec![member(&env)];
    env.ok(&["switch", "web", &members[0].generation.to_string()]);
    shut_down(&members[0]);
    let deadline = Instant::now() + patience();
    while env.status()["services"][0]["relistened"] != 1 {
        assert!(Instant::now() < deadline, "{}", env.status());
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = env.status();
    assert_eq!(
        status["services"][0]["generations"][0]["sockets"][0]["listening"], true,
        "{status}"
    );
    for _ in 0..20 {
        let _client = TcpStream::connect(ADDR).unwrap();
    }
    let deadline = Instant::now() + patience();
    while members[0].accepted < 20 {
        assert!(Instant::now() < deadline, "{}", members[0].accepted);
        accept_all(&mut members);
    }
    assert!(
        env.daemon_log().contains("it listens again"),
        "{}",
        env.daemon_log()
    );
}

/// What the backend cannot do is refused in one line that says why, and changes nothing.
#[test]
fn the_reuseport_backend_refuses_what_it_cannot_do() {
    let env = TestEnv::with_backend("reuseport-refuses", "reuseport");
    let status = env.status();
    assert_eq!(status["backend"]["name"], "reuseport", "{status}");
    assert_eq!(status["backend"]["capabilities"]["switch"], "yes");
    assert_eq!(status["backend"]["capabilities"]["sockets"], "backend");
    let before = env.status();
    for args in [
        &["bind", "web", "tcp", "127.0.0.0/8", "8080"][..],
        &["bind", "web", "tcp", "127.0.0.1/32", "0"][..],
    ] {
        let line = env.fails(args);
        assert!(
            line.contains("the reuseport backend cannot bind a prefix or every port"),
            "{line}"
        );
    }
    assert_eq!(env.status(), before);
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    let line = env.fails(&["bind", "web", "tcp", "127.0.0.1/32", "8081"]);
    assert!(line.contains("one address per protocol"), "{line}");
    let line = env.fails(&["metrics"]);
    assert!(
        line.contains("the reuseport backend cannot count connections")
            && line.contains("classic BPF program"),
        "{line}"
    );
    // An address held outside hotswap cannot be bound: the members would join its group.
    let outside = TcpListener::bind("127.0.0.1:8090").unwrap();
    let line = env.fails(&["bind", "other", "tcp", "127.0.0.1/32", "8090"]);
    assert!(line.contains("binding 127.0.0.1:8090 failed"), "{line}");
    drop(outside);

    // Foreign sockets: only one that can join, and only where its place is certain.
    let pid = std::process::id().to_string();
    let register = |listener: &TcpListener| {
        env.fails(&[
            "register",
            "web",
            "--pid",
            &pid,
            "--fd",
            &listener.as_raw_fd().to_string(),
        ])
    };
    let elsewhere = TcpListener::bind("127.0.0.1:0").unwrap();
    let line = register(&elsewhere);
    assert!(
        line.contains("cannot join the reuseport group")
            && line.contains("not the service's address"),
        "{line}"
    );
    let foreign = || {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_reuse_port(true).unwrap();
        socket
            .bind(
                &"127.0.0.1:8080"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
        socket.listen(16).unwrap();
        TcpListener::from(socket)
    };
    // The only member: its place is index 0, so it is taken.
    let sole = foreign();
    env.ok(&[
        "register",
        "web",
        "--pid",
        &pid,
        "--fd",
        &sole.as_raw_fd().to_string(),
        "--activate",
    ]);
    let _client = TcpStream::connect(ADDR).unwrap();
    sole.accept().unwrap();
    // A second foreign member: its place among the members is not known.
    let second = foreign();
    let line = register(&second);
    assert!(line.contains("its place among them is not known"), "{line}");
    drop(second);
    // Two listening already (the foreign one and one made by the daemon): a third is refused.
    let service: ServiceName = "web".parse().unwrap();
    let made = hotswap::client::listener(
        &env.socket,
        &service,
        Protocol::Tcp,
        std::time::Duration::from_secs(5),
    )
    .unwrap()
    .unwrap();
    let made = TcpListener::from(made);
    env.ok(&[
        "register",
        "web",
        "--pid",
        &pid,
        "--fd",
        &made.as_raw_fd().to_string(),
    ]);
    let err = hotswap::client::listener(
        &env.socket,
        &service,
        Protocol::Tcp,
        std::time::Duration::from_secs(5),
    )
    .unwrap_err();
    assert!(
        hotswap::error_chain(&err).contains("has 2 generations listening already"),
        "{}",
        hotswap::error_chain(&err)
    );
    // Every connection still reaches the active (foreign) one.
    made.set_nonblocking(true).unwrap();
    for _ in 0..10 {
        let client = TcpStream::connect(ADDR).unwrap();
        let (accepted, _) = sole.accept().unwrap();
        assert_eq!(accepted.peer_addr().ok(), client.local_addr().ok());
        assert!(made.accept().is_err());
    }
}
