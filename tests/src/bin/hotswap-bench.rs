//! `cargo xtask bench [--quick] [--json PATH]`: hotswap's figures, measured side by side in one
//! run, in private network namespaces on loopback (BENCHMARKS.md says what each one means).
//!
//! Every comparison interleaves its A and B rounds so that drift on a noisy machine cancels, and
//! reports the median ratio with the spread (min–max) of the per-round ratios. `--smoke` makes
//! every count tiny: `cargo xtask test` runs it so the bench cannot rot; it asserts nothing about
//! speed.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    os::fd::{AsFd as _, AsRawFd as _},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use hotswap::{
    backend::reuseport,
    model::{parse_prefix, Binding, Protocol, ServiceName},
};
use hotswap_common::SocketKey;
use integration_tests::{
    activated_fixture, example_server, HttpLoad, LoadReport, NetnsGuard, RunningService, TestEnv,
};
use serde_json::{json, Value};

/// How long and how often: full, quick or smoke.
#[derive(Clone, Copy)]
struct Plan {
    rounds: usize,
    round: Duration,
    map_updates: usize,
    cli_switches: usize,
    upgrades: usize,
    bindings: usize,
    services: usize,
}

const FULL: Plan = Plan {
    rounds: 15,
    round: Duration::from_millis(700),
    map_updates: 100_000,
    cli_switches: 1000,
    upgrades: 1000,
    bindings: 10_000,
    services: 1000,
};
const QUICK: Plan = Plan {
    rounds: 5,
    round: Duration::from_millis(500),
    map_updates: 20_000,
    cli_switches: 200,
    upgrades: 20,
    bindings: 10_000,
    services: 1000,
};
const SMOKE: Plan = Plan {
    rounds: 2,
    round: Duration::from_millis(50),
    map_updates: 100,
    cli_switches: 5,
    upgrades: 2,
    bindings: 20,
    services: 5,
};

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// A listening socket with a deep backlog, so a busy machine delays the server instead of
/// dropping SYNs (a dropped SYN costs the client a 1 s retransmit and ruins a round).
fn listen(addr: &str) -> TcpListener {
    listen_socket(addr, false).into()
}

/// [`listen`]'s socket, with `SO_REUSEPORT` where `reuse_port` (TCP: it joins its address's
/// group at `listen()`).
fn listen_socket(addr: &str, reuse_port: bool) -> socket2::Socket {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.set_reuse_port(reuse_port).unwrap();
    socket.bind(&addr.into()).unwrap();
    socket.listen(4096).unwrap();
    socket
}

/// A `SO_REUSEPORT` group of two members on `addr` (TCP members made like [`listen`]'s, UDP ones
/// joining at `bind()`), with the reuseport backend's program attached picking member 1, as the
/// daemon's does with generation 2 active: the members in the group's order, once one new
/// connection (or datagram) reached member 1 and none member 0.
fn reuseport_pair(addr: &str, protocol: Protocol) -> [socket2::Socket; 2] {
    let member = || match protocol {
        Protocol::Tcp => listen_socket(addr, true),
        Protocol::Udp => {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
            socket.set_reuse_port(true).unwrap();
            let addr: std::net::SocketAddr = addr.parse().unwrap();
            socket.bind(&addr.into()).unwrap();
            socket
        }
    };
    let members = [member(), member()];
    let program = reuseport::assemble(&reuseport::Choice {
        active: Some(1),
        probes: vec![],
    });
    reuseport::attach(members[0].as_fd(), &program).unwrap();
    for m in &members {
        m.set_nonblocking(true).unwrap();
    }
    let _client = match protocol {
        Protocol::Tcp => Some(TcpStream::connect(addr).unwrap()),
        Protocol::Udp => {
            UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .send_to(b"x", addr)
                .unwrap();
            None
        }
    };
    let got = |m: &socket2::Socket| match protocol {
        Protocol::Tcp => m.accept().map(drop),
        Protocol::Udp => m.recv(&mut [std::mem::MaybeUninit::new(0u8); 8]).map(drop),
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let reached = loop {
        if let Some(i) = members.iter().position(|m| got(m).is_ok()) {
            break i;
        }
        assert!(
            Instant::now() < deadline,
            "nothing reached the {addr} group"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(reached, 1, "the program picks member 1 of the {addr} group");
    for m in &members {
        m.set_nonblocking(false).unwrap();
    }
    members
}

/// A server thread: accepts connections; with `respond`, reads one line and answers one. Blocks
/// in accept(); `stop` plus a shutdown() of the socket ends it.
fn tcp_server(
    listener: TcpListener,
    respond: bool,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut stream, _)) = listener.accept() else {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                continue;
            };
            if respond {
                let mut line = String::new();
                let _ = BufReader::new(&stream).read_line(&mut line);
                let _ = stream.write_all(b"ok\n");
            }
        }
    })
}

/// Stops servers started with `stop`: sets it and wakes every blocked accept().
fn stop_servers(stop: &AtomicBool, fds: &[i32], servers: Vec<std::thread::JoinHandle<()>>) {
    stop.store(true, Ordering::Relaxed);
    for &fd in fds {
        // SAFETY: shutting down sockets this process owns, to wake their accept().
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
    for server in servers {
        server.join().unwrap();
    }
}

fn udp_server(socket: UdpSocket, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], peer);
            }
        }
    })
}

/// Connections (or request/response exchanges) per second against `addr` for `duration`.
fn tcp_rate(addr: &str, respond: bool, duration: Duration) -> f64 {
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < duration {
        let Ok(mut stream) = TcpStream::connect(addr) else {
            continue;
        };
        if respond {
            let _ = stream.write_all(b"hi\n");
            let mut buf = [0u8; 3];
            if stream.read_exact(&mut buf).is_err() {
                continue;
            }
        } else {
            // Connect + accept + close: the server closes as soon as it has accepted, so the
            // end of the stream proves the accept (a handshake alone only fills the queue).
            let mut buf = [0u8; 1];
            if !matches!(stream.read(&mut buf), Ok(0)) {
                continue;
            }
        }
        done += 1;
    }
    done as f64 / start.elapsed().as_secs_f64()
}

fn udp_rate(addr: &str, duration: Duration) -> f64 {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let mut done = 0u64;
    let mut buf = [0u8; 64];
    while start.elapsed() < duration {
        socket.send_to(b"x", addr).unwrap();
        if socket.recv_from(&mut buf).is_ok() {
            done += 1;
        }
    }
    done as f64 / start.elapsed().as_secs_f64()
}

/// Runs `f` on a thread inside a network namespace of its own (no program attached there).
fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let _netns = NetnsGuard::enter();
        f()
    })
    .join()
    .unwrap()
}

/// What a [`Peer`]'s namespace holds around its servers on 127.0.0.1: tcp :9200 (accept and
/// close), tcp :9201 (one line each way), udp :9202 (echo).
#[derive(Clone, Copy)]
enum PeerSetup {
    /// The servers listen on those ports; no program.
    NoProgram,
    /// The servers listen on those ports; the program is attached, with one binding for
    /// another port.
    Unbound,
    /// The three addresses are bound and steered to the servers' sockets on other ports, plus
    /// `bindings` bindings of another service and `services` services of one binding each
    /// (IPv6 /128s no traffic matches).
    Steered { bindings: usize, services: usize },
    /// No sk_lookup program: each server socket is member 1 of a `SO_REUSEPORT` group of two on
    /// those ports, the reuseport backend's program attached picking it (member 0 listens, and
    /// nothing reaches it).
    Reuseport,
}

/// What a [`Peer`] measures.
#[derive(Clone, Copy)]
enum Measure {
    /// TCP connect + accept + close per second.
    Connections,
    /// TCP connections with one small request and response per second.
    RequestResponse,
    /// UDP echo exchanges per second.
    Datagrams,
}

/// Service ids in a steered peer: the TCP addresses, then the fillers.
const PEER_CONNECT: u32 = 1;
const PEER_REQUEST: u32 = 2;
const PEER_FILLER: u32 = 3;

/// Servers and a client in a network namespace of their own, measuring on request. Every
/// comparison is between peers built alike, measured in interleaved rounds. All of a peer's
/// threads run on one CPU: on a 2-core VM, where the scheduler puts a client and its server
/// otherwise decides more than the path does; on one CPU the figure is the path's CPU cost.
struct Peer {
    ask: std::sync::mpsc::Sender<Option<(Measure, Duration)>>,
    answer: std::sync::mpsc::Receiver<f64>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The peer's sk_lookup program, where it has one.
    program_id: Option<u32>,
}

impl Peer {
    fn start(setup: PeerSetup) -> Self {
        static PEERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let (ask, asked) = std::sync::mpsc::channel::<Option<(Measure, Duration)>>();
        let (answered, answer) = std::sync::mpsc::channel();
        let (started, start) = std::sync::mpsc::channel();
        let pin_dir = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/hotswap-bench-peer-{}-{}",
            std::process::id(),
            PEERS.fetch_add(1, Ordering::Relaxed)
        ));
        let thread = std::thread::spawn(move || {
            use hotswap::backend::Backend as _;
            let _netns = NetnsGuard::enter();
            // Threads spawned from here (the servers) inherit the CPU.
            let mut cpu = nix::sched::CpuSet::new();
            cpu.set(0).unwrap();
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu).unwrap();
            let mut backend = match setup {
                PeerSetup::NoProgram | PeerSetup::Reuseport => None,
                _ => {
                    let netns = hotswap::socket::netns_inode(std::path::Path::new(
                        "/proc/thread-self/ns/net",
                    ))
                    .unwrap();
                    Some(
                        hotswap::backend::sk_lookup::SkLookupBackend::open(&pin_dir, netns)
                            .unwrap(),
                    )
                }
            };
            let binding = |protocol, prefix: &str, port| Binding {
                protocol,
                prefix: parse_prefix(prefix).unwrap(),
                port,
            };
            // Reuseport's members 0: held, never served.
            let mut idle = Vec::new();
            let (connect, request, datagram) = match (setup, backend.as_mut()) {
                (PeerSetup::Reuseport, _) => {
                    let [idle_connect, connect] = reuseport_pair("127.0.0.1:9200", Protocol::Tcp);
                    let [idle_request, request] = reuseport_pair("127.0.0.1:9201", Protocol::Tcp);
                    let [idle_datagram, datagram] = reuseport_pair("127.0.0.1:9202", Protocol::Udp);
                    idle.extend([idle_connect, idle_request, idle_datagram]);
                    (connect.into(), request.into(), datagram.into())
                }
                (PeerSetup::Steered { bindings, services }, Some(backend)) => {
                    let sockets = (
                        listen("127.0.0.1:0"),
                        listen("127.0.0.1:0"),
                        UdpSocket::bind("127.0.0.1:0").unwrap(),
                    );
                    for (protocol, port, service, fd) in [
                        (Protocol::Tcp, 9200, PEER_CONNECT, sockets.0.as_fd()),
                        (Protocol::Tcp, 9201, PEER_REQUEST, sockets.1.as_fd()),
                        (Protocol::Udp, 9202, PEER_CONNECT, sockets.2.as_fd()),
                    ] {
                        backend
                            .add_binding(&binding(protocol, "127.0.0.1/32", port), service)
                            .unwrap();
                        backend.activate(service, protocol, fd).unwrap();
                    }
                    for i in 0..bindings as u32 {
                        let prefix = format!("2001:db8::{:x}:{:x}/128", i >> 16, i & 0xffff);
                        backend
                            .add_binding(&binding(Protocol::Tcp, &prefix, 80), PEER_FILLER)
                            .unwrap();
                    }
                    for i in 0..services as u32 {
                        let prefix = format!("2001:db8:1::{i:x}/128");
                        backend
                            .add_binding(&binding(Protocol::Tcp, &prefix, 80), PEER_FILLER + 1 + i)
                            .unwrap();
                    }
                    sockets
                }
                (_, backend) => {
                    if let Some(backend) = backend {
                        backend
                            .add_binding(
                                &binding(Protocol::Tcp, "127.0.0.1/32", 9999),
                                PEER_CONNECT,
                            )
                            .unwrap();
                    }
                    (
                        listen("127.0.0.1:9200"),
                        listen("127.0.0.1:9201"),
                        UdpSocket::bind("127.0.0.1:9202").unwrap(),
                    )
                }
            };
            let program_id = backend.as_ref().and_then(|b| b.info().program_id);
            let stop = Arc::new(AtomicBool::new(false));
            let fds = [connect.as_raw_fd(), request.as_raw_fd()];
            let servers = vec![
                tcp_server(connect, false, Arc::clone(&stop)),
                tcp_server(request, true, Arc::clone(&stop)),
                udp_server(datagram, Arc::clone(&stop)),
            ];
            let _ = started.send(program_id);
            while let Ok(Some((measure, d))) = asked.recv() {
                let rate = match measure {
                    Measure::Connections => tcp_rate("127.0.0.1:9200", false, d),
                    Measure::RequestResponse => tcp_rate("127.0.0.1:9201", true, d),
                    Measure::Datagrams => udp_rate("127.0.0.1:9202", d),
                };
                let _ = answered.send(rate);
            }
            stop_servers(&stop, &fds, servers);
            drop(idle);
            drop(backend);
            let _ = std::fs::remove_dir_all(&pin_dir);
        });
        let program_id = start.recv().expect("a bench peer failed to start");
        Self {
            ask,
            answer,
            thread: Some(thread),
            program_id,
        }
    }

    fn measure(&self, measure: Measure, d: Duration) -> f64 {
        self.ask.send(Some((measure, d))).unwrap();
        self.answer.recv().unwrap()
    }

    /// The peer's program's run time per run over one round of `measure`, from the kernel's
    /// BPF statistics (which cost time themselves: they are on only for this).
    fn program_ns_per_run(&self, measure: Measure, d: Duration) -> f64 {
        let id = self.program_id.expect("a peer with a program");
        let stats = || {
            aya::programs::loaded_programs()
                .filter_map(Result::ok)
                .find(|p| p.id() == id)
                .map(|p| (p.run_time().as_nanos() as f64, p.run_count() as f64))
                .expect("the peer's program is loaded")
        };
        let _on = aya::sys::enable_stats(aya::sys::Stats::RunTime).unwrap();
        let (time, count) = stats();
        self.measure(measure, d);
        let (time_after, count_after) = stats();
        (time_after - time) / (count_after - count).max(1.0)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.ask.send(None);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Measures each (peer, what) once per round, rotating the order every round so that no side
/// always goes first; returns the rates in the order given.
fn interleaved(plan: Plan, runs: &[(&Peer, Measure)]) -> Vec<Vec<f64>> {
    let mut rates = vec![Vec::with_capacity(plan.rounds); runs.len()];
    for round in 0..plan.rounds {
        for i in 0..runs.len() {
            let k = (i + round) % runs.len();
            let (peer, measure) = runs[k];
            rates[k].push(peer.measure(measure, plan.round));
        }
    }
    rates
}

/// A ratio A/B over interleaved rounds: median ratio and per-round spread.
fn ratio_summary(name: &str, a: &[f64], b: &[f64]) -> Value {
    let mut ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
    let (mut a_sorted, mut b_sorted) = (a.to_vec(), b.to_vec());
    let m = median(&mut ratios);
    json!({
        "name": name,
        "a_median": median(&mut a_sorted),
        "b_median": median(&mut b_sorted),
        "ratio_median": m,
        "ratio_min": ratios.first(),
        "ratio_max": ratios.last(),
    })
}

fn connection_path(plan: Plan) -> Value {
    let steered = Peer::start(PeerSetup::Steered {
        bindings: 0,
        services: 0,
    });
    let plain = Peer::start(PeerSetup::NoProgram);
    let unbound = Peer::start(PeerSetup::Unbound);
    let reuseport = Peer::start(PeerSetup::Reuseport);
    let d = plan.round;
    let connections = interleaved(
        plan,
        &[
            (&steered, Measure::Connections),
            (&plain, Measure::Connections),
            (&unbound, Measure::Connections),
            (&reuseport, Measure::Connections),
        ],
    );
    let requests = interleaved(
        plan,
        &[
            (&steered, Measure::RequestResponse),
            (&plain, Measure::RequestResponse),
            (&reuseport, Measure::RequestResponse),
        ],
    );
    let datagrams = interleaved(
        plan,
        &[
            (&steered, Measure::Datagrams),
            (&plain, Measure::Datagrams),
            (&reuseport, Measure::Datagrams),
        ],
    );
    // What one run of the program costs, by the kernel's own clock.
    let program_ns = json!({
        "steered_connection": steered.program_ns_per_run(Measure::Connections, d),
        "steered_datagram_exchange": steered.program_ns_per_run(Measure::Datagrams, d),
        "unbound_connection": unbound.program_ns_per_run(Measure::Connections, d),
    });
    let ratios = vec![
        ratio_summary(
            "tcp connections/s: steered ÷ plain listener, no program",
            &connections[0],
            &connections[1],
        ),
        ratio_summary(
            "tcp request/response/s: steered ÷ plain listener, no program",
            &requests[0],
            &requests[1],
        ),
        ratio_summary(
            "udp datagrams/s (echo): steered ÷ plain socket, no program",
            &datagrams[0],
            &datagrams[1],
        ),
        ratio_summary(
            "tcp connections/s, unbound port: program attached ÷ no program",
            &connections[2],
            &connections[1],
        ),
        ratio_summary(
            "tcp connections/s: reuseport (group of 2, program) ÷ plain listener",
            &connections[3],
            &connections[1],
        ),
        ratio_summary(
            "tcp request/response/s: reuseport ÷ plain listener",
            &requests[2],
            &requests[1],
        ),
        ratio_summary(
            "udp datagrams/s (echo): reuseport ÷ plain socket",
            &datagrams[2],
            &datagrams[1],
        ),
    ];
    json!({"ratios": ratios, "program_ns_per_run": program_ns})
}

fn switch_latency(plan: Plan, env: &TestEnv) -> Value {
    env.ok(&["bind", "switchy", "tcp", "127.0.0.1/32", "9300"]);
    let one = TcpListener::bind("127.0.0.1:0").unwrap();
    let two = TcpListener::bind("127.0.0.1:0").unwrap();
    let me = std::process::id().to_string();
    env.ok(&[
        "register",
        "switchy",
        "--pid",
        &me,
        "--fd",
        &one.as_raw_fd().to_string(),
        "--activate",
    ]);
    env.ok(&[
        "register",
        "switchy",
        "--pid",
        &me,
        "--fd",
        &two.as_raw_fd().to_string(),
    ]);
    let status = env.status();
    let service_id = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "switchy")
        .unwrap()["id"]
        .as_u64()
        .unwrap() as u32;

    // The map update alone: the pinned socket map, updated as the daemon does.
    let map =
        aya::maps::MapData::from_pin(env.pin_dir.join(hotswap_common::map_names::SOCKETS)).unwrap();
    let mut sockets: aya::maps::SockHash<_, SocketKey> =
        aya::maps::Map::SockHash(map).try_into().unwrap();
    let key = SocketKey::new(service_id, Protocol::Tcp.number());
    let mut updates = Vec::with_capacity(plan.map_updates);
    for i in 0..plan.map_updates {
        let fd = if i % 2 == 0 {
            two.as_raw_fd()
        } else {
            one.as_raw_fd()
        };
        let start = Instant::now();
        sockets.insert(key, fd, 0).unwrap();
        updates.push(start.elapsed().as_secs_f64() * 1e6);
    }
    updates.sort_by(|a, b| a.total_cmp(b));

    // `hotswap switch` end to end: a process, a control-socket round trip, the update.
    let mut cli = Vec::with_capacity(plan.cli_switches);
    for i in 0..plan.cli_switches {
        let generation = if i % 2 == 0 { "2" } else { "1" };
        let start = Instant::now();
        env.ok(&["switch", "switchy", generation]);
        cli.push(start.elapsed().as_secs_f64() * 1e3);
    }
    cli.sort_by(|a, b| a.total_cmp(b));
    json!({
        "map_update_us": {"count": updates.len(), "p50": percentile(&updates, 0.5), "p99": percentile(&updates, 0.99), "max": updates.last()},
        "hotswap_switch_ms": {"count": cli.len(), "p50": percentile(&cli, 0.5), "p99": percentile(&cli, 0.99)},
    })
}

/// The reuseport backend's switch: one program replacement, and `hotswap switch` against a
/// daemon on `--backend reuseport`.
fn reuseport_switch_latency(plan: Plan, env: &TestEnv) -> Value {
    // The replacement alone (the `setsockopt` a switch is): the daemon's program for one active
    // member, assembled beforehand, alternating between the members of a group of two. The
    // group is the bench's own, on another port: the daemon's is for the daemon to point.
    let members = reuseport_pair("127.0.0.1:9301", Protocol::Tcp);
    let programs = [0, 1].map(|active| {
        reuseport::assemble(&reuseport::Choice {
            active: Some(active),
            probes: vec![],
        })
    });
    let mut replacements = Vec::with_capacity(plan.map_updates);
    for i in 0..plan.map_updates {
        let program = &programs[i % 2];
        let start = Instant::now();
        reuseport::attach(members[0].as_fd(), program).unwrap();
        replacements.push(start.elapsed().as_secs_f64() * 1e6);
    }
    replacements.sort_by(|a, b| a.total_cmp(b));

    // `hotswap switch` end to end, between two generations whose members the daemon made.
    env.ok(&["bind", "switchy", "tcp", "127.0.0.1/32", "9300"]);
    let service: ServiceName = "switchy".parse().unwrap();
    let generation = |activate| {
        hotswap::activation::service_listener(&env.socket, &service, Protocol::Tcp, None, activate)
            .unwrap()
    };
    let (_one, first) = generation(true);
    let (_two, second) = generation(false);
    let mut cli = Vec::with_capacity(plan.cli_switches);
    for i in 0..plan.cli_switches {
        let to = if i % 2 == 0 { second } else { first };
        let start = Instant::now();
        env.ok(&["switch", "switchy", &to.to_string()]);
        cli.push(start.elapsed().as_secs_f64() * 1e3);
    }
    cli.sort_by(|a, b| a.total_cmp(b));
    json!({
        "program_replace_us": {"count": replacements.len(), "p50": percentile(&replacements, 0.5), "p99": percentile(&replacements, 0.99), "max": replacements.last()},
        "hotswap_switch_ms": {"count": cli.len(), "p50": percentile(&cli, 0.5), "p99": percentile(&cli, 0.99)},
    })
}

/// The median drain time (from the switch away to the exit) of the generations `status`
/// still lists as exited.
fn median_drain_ms(env: &TestEnv) -> Option<f64> {
    let status = env.status();
    let mut drains: Vec<f64> = status["supervisors"]["web"]["generations"]
        .as_array()?
        .iter()
        .filter_map(|g| g["drained_after_ms"].as_f64())
        .collect();
    (!drains.is_empty()).then(|| median(&mut drains))
}

/// What the keep-alive client saw, with the connections it had to open again per upgrade.
fn keep_alive_report(kept: &LoadReport, upgrades: usize, drain_ms: Option<f64>) -> Value {
    json!({
        "served": kept.served(),
        "failed": kept.failed,
        "failed_connections": kept.failed_connections,
        "failed_on_idle_connections": kept.failed_on_idle_connections,
        "reconnects_per_upgrade": kept.connects.saturating_sub(1) as f64 / upgrades as f64,
        "old_generation_drain_ms": drain_ms,
    })
}

/// How long an old generation of hello takes to drain while `IDLE` keep-alive clients sit
/// idle after one request each: without `--handoff` it waits for them (up to the 2 s drain
/// timeout, then is killed), with it it hands them over and exits. Milliseconds, one upgrade.
fn idle_drain_ms(handoff: bool) -> f64 {
    const IDLE: usize = 8;
    let env = TestEnv::with_backend("bench-idle-drain", "sk-lookup");
    let hello = example_server().to_string_lossy().into_owned();
    let mut args = vec![
        "--listen",
        "tcp://127.0.0.1:8080",
        "--ready",
        "notify",
        "--grace",
        "20ms",
        "--drain-timeout",
        "2s",
    ];
    if handoff {
        args.push("--handoff");
    }
    args.extend(["--", &hello]);
    let _service = RunningService::start(&env, "web", &args);
    let _idle: Vec<BufReader<TcpStream>> = (0..IDLE)
        .map(|_| {
            let mut connection = BufReader::new(TcpStream::connect("127.0.0.1:8080").unwrap());
            integration_tests::http_exchange(&mut connection).expect("hello answers");
            connection
        })
        .collect();
    assert!(env.hotswap(&["upgrade", "web"]).status.success());
    let mut drained = None;
    assert!(wait_for(|| {
        let status = env.status();
        drained = status["supervisors"]["web"]["generations"][0]["drained_after_ms"].as_f64();
        drained.is_some()
    }));
    drained.expect("waited for it")
}

/// The idle-drain pair, interleaved: plain hello and hello --handoff, `runs` each.
fn idle_drain(runs: usize) -> Value {
    let (mut plain, mut handed) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        plain.push(idle_drain_ms(false));
        handed.push(idle_drain_ms(true));
    }
    json!({
        "idle_keep_alive_clients": 8,
        "drain_timeout_ms": 2000,
        "plain_ms_median": median(&mut plain),
        "handoff_ms_median": median(&mut handed),
        "runs": runs,
    })
}

fn upgrades(plan: Plan, backend: &str, server: &str, ready: &str, handoff: bool) -> Value {
    let env = TestEnv::with_backend(&format!("bench-upgrade-{backend}"), backend);
    let mut args = vec![
        "--listen",
        "tcp://127.0.0.1:8080",
        "--ready",
        ready,
        "--grace",
        "20ms",
    ];
    if handoff {
        args.push("--handoff");
    }
    args.extend(["--", server]);
    let service = RunningService::start(&env, "web", &args);
    let fresh = HttpLoad::start("127.0.0.1:8080", false, u64::MAX);
    let kept = HttpLoad::start("127.0.0.1:8080", true, u64::MAX);
    let start = Instant::now();
    let mut failed_upgrades = 0;
    for _ in 0..plan.upgrades {
        if !env.hotswap(&["upgrade", "web"]).status.success() {
            failed_upgrades += 1;
        }
    }
    let took = start.elapsed();
    let (fresh, kept) = (fresh.stop(), kept.stop());
    // Let the last old generation finish its drain, so it is counted.
    std::thread::sleep(Duration::from_millis(300));
    let drain_ms = median_drain_ms(&env);
    drop(service);
    let name = server.rsplit('/').next().unwrap_or(server);
    json!({
        "backend": backend,
        "server": if handoff { format!("{name} --handoff") } else { name.to_owned() },
        "upgrades": plan.upgrades,
        "failed_upgrades": failed_upgrades,
        "seconds_per_upgrade": took.as_secs_f64() / plan.upgrades as f64,
        "new_connection_per_request": {"served": fresh.served(), "failed": fresh.failed, "failed_connections": fresh.failed_connections},
        "keep_alive": keep_alive_report(&kept, plan.upgrades, drain_ms),
    })
}

fn read_pid(path: &std::path::Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

fn signal(pid: i32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
}

/// Waits (bounded) until `done`; false on timeout.
fn wait_for(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}

/// Child processes of `parent`.
fn children(parent: i32) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let ppid = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("PPid:"))
                    .and_then(|v| v.trim().parse::<i32>().ok())
            });
        if ppid == Some(parent) && alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Upgrades a peer `count` times under the same two clients as hotswap's upgrades.
fn peer_upgrades(name: &str, count: usize, mut upgrade: impl FnMut() -> bool) -> Value {
    let fresh = HttpLoad::start("127.0.0.1:8080", false, u64::MAX);
    let kept = HttpLoad::start("127.0.0.1:8080", true, u64::MAX);
    let start = Instant::now();
    let mut failed_upgrades = 0;
    for _ in 0..count {
        if !upgrade() {
            failed_upgrades += 1;
        }
    }
    let took = start.elapsed();
    let (fresh, kept) = (fresh.stop(), kept.stop());
    json!({
        "backend": "-",
        "server": name,
        "upgrades": count,
        "failed_upgrades": failed_upgrades,
        "seconds_per_upgrade": took.as_secs_f64() / count as f64,
        "new_connection_per_request": {"served": fresh.served(), "failed": fresh.failed, "failed_connections": fresh.failed_connections},
        "keep_alive": keep_alive_report(&kept, count, None),
    })
}

/// Writes the one nginx config both nginx peers run (one worker, the same http block), in the
/// foreground for hotswap or as a daemon for nginx's own upgrade; returns its path.
fn nginx_conf(dir: &std::path::Path, daemon: bool) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let conf = dir.join("nginx.conf");
    let d = dir.display();
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    // The workers drop to nobody; they must reach the prefix.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = if daemon { "on" } else { "off" };
    std::fs::write(
        &conf,
        format!(
            "daemon {daemon}; master_process on; worker_processes 1; pid {d}/nginx.pid;\n\
             error_log {d}/nginx-error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; keepalive_requests 1000000;\n\
               client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;\n\
               uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;\n\
               server {{ listen 127.0.0.1:8080 backlog=4096; location / {{ return 200 \"nginx\\n\"; }} }} }}\n"
        ),
    )
    .unwrap();
    conf
}

/// nginx's on-the-fly binary upgrade: USR2 (new master with the inherited listeners), WINCH
/// (old workers finish gracefully), QUIT (old master leaves).
fn nginx(plan: Plan) -> Value {
    let env = TestEnv::new("bench-nginx");
    let dir = env.dir.path();
    let conf = nginx_conf(dir, true);
    let started = Command::new("/usr/sbin/nginx")
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .status()
        .expect("nginx (Debian package nginx) runs");
    assert!(
        started.success(),
        "nginx did not start: {}",
        std::fs::read_to_string(dir.join("nginx-error.log")).unwrap_or_default()
    );
    let pid_file = dir.join("nginx.pid");
    let old_file = dir.join("nginx.pid.oldbin");
    assert!(wait_for(|| read_pid(&pid_file).is_some()));
    let result = peer_upgrades("nginx (USR2, WINCH, QUIT)", plan.upgrades, || {
        let Some(old) = read_pid(&pid_file) else {
            return false;
        };
        signal(old, nix::sys::signal::Signal::SIGUSR2);
        let started = wait_for(|| {
            old_file.exists() && read_pid(&pid_file).is_some_and(|p| p != old && alive(p))
        });
        signal(old, nix::sys::signal::Signal::SIGWINCH);
        signal(old, nix::sys::signal::Signal::SIGQUIT);
        started && wait_for(|| !alive(old))
    });
    if let Some(pid) = read_pid(&pid_file) {
        signal(pid, nix::sys::signal::Signal::SIGQUIT);
        wait_for(|| !alive(pid));
    }
    result
}

/// The same nginx (same http block, one worker) upgraded by hotswap instead: `hotswap run`
/// hands it the socket as nginx's own `NGINX` variable, and `hotswap upgrade` starts a new
/// nginx, switches, and drains the old one with SIGQUIT.
fn nginx_under_hotswap(plan: Plan) -> Value {
    let env = TestEnv::with_daemon("bench-nginx-hotswap");
    let dir = env.dir.path();
    let conf = nginx_conf(dir, false);
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
            "20ms",
            "--",
            "/usr/sbin/nginx",
            "-p",
            dir.to_str().unwrap(),
            "-c",
            conf.to_str().unwrap(),
        ],
    );
    let result = peer_upgrades("nginx (hotswap upgrade)", plan.upgrades, || {
        env.hotswap(&["upgrade", "web"]).status.success()
    });
    drop(service);
    result
}

/// HAProxy's master-worker reload: USR2 to the master starts a new worker on the same
/// listeners; the old worker finishes its connections and leaves.
fn haproxy(plan: Plan) -> Value {
    let env = TestEnv::new("bench-haproxy");
    let dir = env.dir.path();
    let conf = dir.join("haproxy.cfg");
    std::fs::write(
        &conf,
        "global\n  master-worker\n  maxconn 4000\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  option http-keep-alive\n\
         frontend fe\n  bind 127.0.0.1:8080\n  http-request return status 200 content-type text/plain string \"haproxy\\n\"\n",
    )
    .unwrap();
    let mut master = Command::new("/usr/sbin/haproxy")
        .args(["-W", "-f"])
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("haproxy.log")).unwrap())
        .spawn()
        .expect("haproxy (Debian package haproxy) runs");
    let master_pid = master.id() as i32;
    assert!(
        wait_for(|| !children(master_pid).is_empty()),
        "haproxy did not start"
    );
    assert!(wait_for(|| TcpStream::connect("127.0.0.1:8080").is_ok()));
    // A USR2 that comes while the master is still starting is lost: wait for its word.
    let log = dir.join("haproxy.log");
    assert!(wait_for(
        || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Loading success"))
    ));
    // Even then the master drops a USR2 that comes in its first moments (seen: the first reload
    // never happened): give it half a second, outside the measurement.
    std::thread::sleep(Duration::from_millis(500));
    let result = peer_upgrades("haproxy (master-worker reload)", plan.upgrades, || {
        let before = children(master_pid);
        signal(master_pid, nix::sys::signal::Signal::SIGUSR2);
        let reloaded = wait_for(|| children(master_pid).iter().any(|c| !before.contains(c)));
        // The master is still finishing its re-exec when the worker appears; a USR2 then could
        // be lost. hotswap's own upgrades wait 100 ms for the queue to settle, so this is even.
        std::thread::sleep(Duration::from_millis(100));
        reloaded
    });
    // Hard stop (the measurement is over); every worker goes with the master.
    let workers = children(master_pid);
    signal(master_pid, nix::sys::signal::Signal::SIGTERM);
    if !wait_for(|| !alive(master_pid)) {
        let _ = master.kill();
    }
    let _ = master.wait();
    for worker in workers {
        signal(worker, nix::sys::signal::Signal::SIGKILL);
    }
    result
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn scale_and_footprint(plan: Plan) -> Value {
    // The connection rate through the program and maps as they grow: three namespaces built
    // alike, measured in interleaved rounds.
    let one = Peer::start(PeerSetup::Steered {
        bindings: 0,
        services: 0,
    });
    let bindings = Peer::start(PeerSetup::Steered {
        bindings: plan.bindings,
        services: 0,
    });
    let services = Peer::start(PeerSetup::Steered {
        bindings: 0,
        services: plan.services,
    });
    let rates = interleaved(
        plan,
        &[
            (&one, Measure::Connections),
            (&bindings, Measure::Connections),
            (&services, Measure::Connections),
        ],
    );
    let (one_c, bindings_c, services_c) = (&rates[0], &rates[1], &rates[2]);
    drop((one, bindings, services));

    // The control plane and the daemon's memory: requests through the library client.
    let env = TestEnv::with_daemon("bench-scale");
    let daemon = env.daemon_pid().unwrap();
    let rss_idle = rss_kib(daemon);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let request = |r: hotswap::protocol::Request| {
        runtime
            .block_on(hotswap::client::request(&env.socket, &r))
            .unwrap()
    };
    let service = |name: &str| -> ServiceName { name.parse().unwrap() };
    let bind = |name: &str, prefix: String| {
        request(hotswap::protocol::Request::Bind {
            service: service(name),
            binding: Binding {
                protocol: Protocol::Tcp,
                prefix: parse_prefix(&prefix).unwrap(),
                port: 80,
            },
            owner: None,
        })
    };
    let start = Instant::now();
    for i in 0..plan.bindings as u32 {
        bind(
            "filler",
            format!("2001:db8::{:x}:{:x}/128", i >> 16, i & 0xffff),
        );
    }
    let bind_rate = plan.bindings as f64 / start.elapsed().as_secs_f64();
    let rss_bindings = rss_kib(daemon);
    let start = Instant::now();
    for i in 0..plan.services {
        bind(&format!("svc{i}"), format!("2001:db8:1::{i:x}/128"));
    }
    let service_rate = plan.services as f64 / start.elapsed().as_secs_f64();

    // Register (the daemon takes the socket from this process with pidfd_getfd) and switch.
    env.ok(&["bind", "scaled", "tcp", "127.0.0.1/32", "9400"]);
    let listener = listen("127.0.0.1:0");
    let me = std::process::id();
    let operations = plan.cli_switches.max(10);
    let (mut registering, mut switching) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..operations {
        let start = Instant::now();
        let reply = request(hotswap::protocol::Request::Register {
            service: service("scaled"),
            pid: me,
            fds: vec![listener.as_raw_fd()],
            label: None,
            activate: false,
        });
        registering += start.elapsed();
        let hotswap::protocol::Reply::Registered { generation, .. } = reply else {
            panic!("register answered {reply:?}");
        };
        let start = Instant::now();
        request(hotswap::protocol::Request::Switch {
            service: service("scaled"),
            generation,
        });
        switching += start.elapsed();
        request(hotswap::protocol::Request::Forget {
            service: service("scaled"),
            generation,
        });
    }
    let per_second = |total: Duration| operations as f64 / total.as_secs_f64();

    // Load + verify + attach, in a namespace of its own.
    let pin_dir = env
        .pin_dir
        .with_file_name(format!("bench-load-{}", std::process::id()));
    let load_ms = in_fresh_netns({
        let pin_dir = pin_dir.clone();
        move || {
            let netns =
                hotswap::socket::netns_inode(std::path::Path::new("/proc/thread-self/ns/net"))
                    .unwrap();
            let start = Instant::now();
            let backend =
                hotswap::backend::sk_lookup::SkLookupBackend::open(&pin_dir, netns).unwrap();
            let took = start.elapsed().as_secs_f64() * 1e3;
            drop(backend);
            took
        }
    });
    let _ = std::fs::remove_dir_all(&pin_dir);
    let status = env.status();
    json!({
        "connections_1_binding_vs_many": ratio_summary(&format!("tcp connections/s: {} bindings ÷ 1", plan.bindings + 1), bindings_c, one_c),
        "connections_services": ratio_summary(&format!("tcp connections/s: {} services ÷ 1", plan.services + 1), services_c, one_c),
        "control_plane_per_second": {"bind": bind_rate, "bind_new_service": service_rate, "register": per_second(registering), "switch": per_second(switching)},
        "daemon_rss_kib": {"idle": rss_idle, "after_bindings": rss_bindings, "bindings": plan.bindings},
        "verified_instructions": status["backend"]["verified_instructions"],
        "load_verify_attach_ms": load_ms,
    })
}

/// The bench's sections, in the order they run; `--only` picks some.
const SECTIONS: [&str; 5] = ["path", "switch", "upgrades", "peers", "scale"];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let plan = if args.iter().any(|a| a == "--smoke") {
        SMOKE
    } else if args.iter().any(|a| a == "--quick") {
        QUICK
    } else {
        FULL
    };
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let json_path = value_of("--json");
    let only: Vec<String> = match value_of("--only") {
        Some(list) => list.split(',').map(str::to_owned).collect(),
        None => SECTIONS.iter().map(|s| s.to_string()).collect(),
    };
    if let Some(unknown) = only.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
        eprintln!(
            "error: unknown bench section {unknown:?} (sections: {})",
            SECTIONS.join(", ")
        );
        std::process::exit(2);
    }
    let wanted = |section: &str| only.iter().any(|s| s == section);
    let started = Instant::now();

    let (mut path, mut switch) = (Value::Null, Value::Null);
    if wanted("path") {
        eprintln!(
            "bench: connection path ({} rounds of {:?} each)",
            plan.rounds, plan.round
        );
        path = connection_path(plan);
    }
    if wanted("switch") {
        eprintln!("bench: switch latency");
        switch = switch_latency(plan, &TestEnv::with_daemon("bench-switch"));
        switch["reuseport"] = reuseport_switch_latency(
            plan,
            &TestEnv::with_backend("bench-switch-reuseport", "reuseport"),
        );
    }
    let mut upgrade_runs = vec![];
    if wanted("upgrades") {
        eprintln!("bench: upgrades under load ({} each)", plan.upgrades);
        let hello = example_server().to_string_lossy().into_owned();
        let fixture = activated_fixture().to_string_lossy().into_owned();
        upgrade_runs = vec![
            upgrades(plan, "sk-lookup", &hello, "notify", false),
            upgrades(plan, "sk-lookup", &hello, "notify", true),
            upgrades(plan, "sk-lookup", &fixture, "tcp", false),
            upgrades(plan, "uds", &hello, "notify", false),
            upgrades(plan, "uds", &fixture, "delay:20ms", false),
            upgrades(plan, "reuseport", &hello, "notify", false),
            upgrades(plan, "reuseport", &fixture, "tcp", false),
        ];
    }
    let mut idle = Value::Null;
    if wanted("upgrades") {
        eprintln!("bench: an old generation's drain with idle keep-alive clients");
        idle = idle_drain(plan.upgrades.clamp(1, 3));
    }
    let mut peers = vec![];
    if wanted("peers") {
        eprintln!(
            "bench: peers, the same upgrades and load: nginx (its own and under hotswap), haproxy"
        );
        peers = vec![nginx(plan), nginx_under_hotswap(plan), haproxy(plan)];
    }
    let mut scale = Value::Null;
    if wanted("scale") {
        eprintln!("bench: scale and footprint");
        scale = scale_and_footprint(plan);
    }
    let report = json!({
        "plan": {"rounds": plan.rounds, "round_ms": plan.round.as_millis() as u64, "upgrades": plan.upgrades, "sections": only},
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                    "kernel": nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default()},
        "connection_path": path,
        "switch": switch,
        "upgrades": upgrade_runs,
        "idle_drain": idle,
        "peers": peers,
        "scale": scale,
        "seconds": started.elapsed().as_secs_f64(),
    });
    print_report(&report);
    println!("\nbench took {:.0} s", started.elapsed().as_secs_f64());
    if let Some(path) = json_path {
        std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
        println!("wrote {path}");
    }
    let failed: u64 = upgrade_runs
        .iter()
        .map(|u| {
            u["new_connection_per_request"]["failed"].as_u64().unwrap()
                + u["keep_alive"]["failed"].as_u64().unwrap()
        })
        .sum();
    if failed > 0 {
        eprintln!("bench: {failed} requests failed during hotswap upgrades");
        std::process::exit(1);
    }
}

/// The table on stdout: the same figures as the JSON, for the sections that ran.
fn print_report(report: &Value) {
    if let Some(rows) = report["connection_path"]["ratios"].as_array() {
        println!(
            "\n{:<70} {:>10} {:>16}",
            "connection path (median of interleaved rounds)", "ratio", "spread"
        );
        for row in rows {
            print_ratio(row);
        }
        let ns = &report["connection_path"]["program_ns_per_run"];
        println!(
            "program run time (kernel BPF stats): {:.0} ns per steered connection, {:.0} ns per run in a UDP exchange, {:.0} ns per unbound connection",
            ns["steered_connection"].as_f64().unwrap(),
            ns["steered_datagram_exchange"].as_f64().unwrap(),
            ns["unbound_connection"].as_f64().unwrap(),
        );
    }
    let s = &report["switch"];
    if !s.is_null() {
        println!(
            "\nswitch: map update p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs ({} updates); `hotswap switch` p50 {:.2} ms, p99 {:.2} ms ({} runs)",
            s["map_update_us"]["p50"].as_f64().unwrap(),
            s["map_update_us"]["p99"].as_f64().unwrap(),
            s["map_update_us"]["max"].as_f64().unwrap(),
            s["map_update_us"]["count"],
            s["hotswap_switch_ms"]["p50"].as_f64().unwrap(),
            s["hotswap_switch_ms"]["p99"].as_f64().unwrap(),
            s["hotswap_switch_ms"]["count"],
        );
        let r = &s["reuseport"];
        println!(
            "switch (reuseport): program replacement p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs ({} replacements); `hotswap switch` p50 {:.2} ms, p99 {:.2} ms ({} runs)",
            r["program_replace_us"]["p50"].as_f64().unwrap(),
            r["program_replace_us"]["p99"].as_f64().unwrap(),
            r["program_replace_us"]["max"].as_f64().unwrap(),
            r["program_replace_us"]["count"],
            r["hotswap_switch_ms"]["p50"].as_f64().unwrap(),
            r["hotswap_switch_ms"]["p99"].as_f64().unwrap(),
            r["hotswap_switch_ms"]["count"],
        );
    }
    let runs: Vec<&Value> = report["upgrades"]
        .as_array()
        .unwrap()
        .iter()
        .chain(report["peers"].as_array().unwrap())
        .collect();
    if !runs.is_empty() {
        println!(
            "\n{:<10} {:<32} {:>8} {:>10} {:>22} {:>22} {:>13} {:>9}",
            "backend",
            "server",
            "upgrades",
            "s/upgrade",
            "new conn: served/fail",
            "keep-alive: served/fail",
            "reconnects/up",
            "drain ms"
        );
    }
    for u in runs {
        let k = &u["keep_alive"];
        println!(
            "{:<10} {:<32} {:>8} {:>10.3} {:>14}/{:<7} {:>14}/{:<7} {:>13.2} {:>9}",
            u["backend"].as_str().unwrap(),
            u["server"].as_str().unwrap_or(""),
            u["upgrades"],
            u["seconds_per_upgrade"].as_f64().unwrap(),
            u["new_connection_per_request"]["served"],
            u["new_connection_per_request"]["failed"],
            k["served"],
            k["failed"],
            k["reconnects_per_upgrade"].as_f64().unwrap_or(0.0),
            k["old_generation_drain_ms"]
                .as_f64()
                .map_or("-".to_owned(), |ms| format!("{ms:.0}")),
        );
    }
    let idle = &report["idle_drain"];
    if !idle.is_null() {
        println!(
            "\nold generation's drain with {} idle keep-alive clients (median of {}): hello {:.0} ms, hello --handoff {:.0} ms (drain timeout {} ms)",
            idle["idle_keep_alive_clients"],
            idle["runs"],
            idle["plain_ms_median"].as_f64().unwrap(),
            idle["handoff_ms_median"].as_f64().unwrap(),
            idle["drain_timeout_ms"],
        );
    }
    let sc = &report["scale"];
    if !sc.is_null() {
        println!("\nscale");
        print_ratio(&sc["connections_1_binding_vs_many"]);
        print_ratio(&sc["connections_services"]);
        let ops = &sc["control_plane_per_second"];
        println!(
            "control plane/s: bind {:.0}, bind creating a service {:.0}, register {:.0}, switch {:.0}",
            ops["bind"].as_f64().unwrap(),
            ops["bind_new_service"].as_f64().unwrap(),
            ops["register"].as_f64().unwrap(),
            ops["switch"].as_f64().unwrap(),
        );
        println!(
            "footprint: daemon RSS {} KiB idle, {} KiB with {} bindings; {} verified instructions; load+verify+attach {:.1} ms",
            sc["daemon_rss_kib"]["idle"],
            sc["daemon_rss_kib"]["after_bindings"],
            sc["daemon_rss_kib"]["bindings"],
            sc["verified_instructions"],
            sc["load_verify_attach_ms"].as_f64().unwrap(),
        );
    }
}

fn print_ratio(row: &Value) {
    println!(
        "{:<70} {:>10.3} {:>7.3}–{:<7.3}",
        row["name"].as_str().unwrap(),
        row["ratio_median"].as_f64().unwrap(),
        row["ratio_min"].as_f64().unwrap_or(0.0),
        row["ratio_max"].as_f64().unwrap_or(0.0)
    );
}
