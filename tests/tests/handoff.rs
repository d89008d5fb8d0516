//! Established connections move to the new generation (`hotswap run --handoff`): sessions of
//! the counter example (Rust, and the Python reference implementation of docs/handoff.md)
//! keep their state across upgrades over one TCP connection, keep-alive HTTP connections of
//! the hello example are served by every generation without a reconnect, a new generation
//! that dies in the middle of a handoff leaves the connection with the old one, and a server
//! that ignores the channel upgrades exactly as before.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    example_server, http_exchange, patience, rounds, workspace_bin, HttpLoad, RunningService,
    TestEnv,
};
use serde_json::Value;

fn counter_example() -> PathBuf {
    workspace_bin("examples/counter")
}

fn python_counter() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/handoff/counter.py")
}

fn upgrade(env: &TestEnv, service: &str) {
    let out = env.ok(&["upgrade", service]);
    assert!(out.contains("is active"), "{out}");
}

/// One session of the counter protocol over one connection.
struct Session {
    reader: BufReader<TcpStream>,
    count: u64,
}

impl Session {
    fn open(addr: &str) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Self {
            reader: BufReader::new(stream),
            count: 0,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).unwrap();
    }

    /// The next answer: it must carry the next count; returns the generation that counted.
    fn answer(&mut self) -> u64 {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .unwrap_or_else(|err| panic!("after count {}: the session broke: {err}", self.count));
        assert!(
            n > 0,
            "after count {}: the server closed the session",
            self.count
        );
        let words: Vec<&str> = line.split_whitespace().collect();
        let [count, "gen", generation] = words[..] else {
            panic!("not an answer: {line:?}");
        };
        self.count += 1;
        assert_eq!(
            count.parse::<u64>().unwrap(),
            self.count,
            "the session's state jumped: {line:?}"
        );
        generation.parse().unwrap()
    }
}

/// `hotswap run SERVICE --listen tcp://ADDR --handoff --grace 50ms --drain-timeout 20s --
/// COMMAND…`, once a generation is active.
fn run_with_handoff(env: &TestEnv, service: &str, addr: &str, command: &[&str]) -> RunningService {
    let listen = format!("tcp://{addr}");
    let mut args = vec![
        "--listen",
        &listen,
        "--handoff",
        "--grace",
        "50ms",
        "--drain-timeout",
        "20s",
        "--",
    ];
    args.extend_from_slice(command);
    RunningService::start(env, service, &args)
}

/// One connection, `upgrades` upgrades; in each round a line is answered, half of the next is
/// sent before the upgrade and the rest after, so every handoff carries buffered bytes and
/// the count. Every round's second answer comes from the new generation.
fn a_session_keeps_its_state_across_upgrades(backend: &str, server: &[&str], upgrades: usize) {
    let env = TestEnv::with_backend("handoff-counter", backend);
    let _service = run_with_handoff(&env, "counter", "127.0.0.1:7070", server);
    let mut session = Session::open("127.0.0.1:7070");
    for round in 0..upgrades as u64 {
        session.send(b"one\ntw");
        assert_eq!(session.answer(), round + 1);
        upgrade(&env, "counter");
        session.send(b"o\n");
        assert_eq!(session.answer(), round + 2, "the session moved on");
    }
    let status = env.status();
    let generations = status["supervisors"]["counter"]["generations"]
        .as_array()
        .unwrap();
    // (Status keeps the latest generations.) Each took the session from the one before and
    // handed it to the one after.
    for g in generations {
        let active = g["state"] == "active";
        assert_eq!(g["adopted"], u64::from(g["id"] != 1), "{g}");
        assert_eq!(g["handed_over"], u64::from(!active), "{g}");
        if !active {
            assert_eq!(g["exit"]["code"], 0, "not drained by itself: {g}");
        }
    }
    let text = env.ok(&["status"]);
    assert!(text.contains("adopted 1 connections"), "{text}");
}

fn the_counter_example_keeps_its_sessions(backend: &str) {
    let upgrades = if backend == "sk-lookup" { 100 } else { 20 };
    let counter = counter_example();
    a_session_keeps_its_state_across_upgrades(
        backend,
        &[counter.to_str().unwrap()],
        rounds(upgrades),
    );
}

#[test]
fn the_python_reference_server_keeps_its_sessions() {
    let python = python_counter();
    a_session_keeps_its_state_across_upgrades(
        "sk-lookup",
        &["/usr/bin/python3", python.to_str().unwrap()],
        rounds(100),
    );
}

/// A new generation that takes the channel, says it accepts connections and dies (as kill -9
/// would) as soon as one arrives, before answering.
const DIES_ON_HANDOFF: &str = r#"
import os, socket, threading
listener = socket.socket(fileno=3)
channel = socket.socket(fileno=int(os.environ["HOTSWAP_HANDOFF_FD"]))
channel.sendmsg([b"HSHO\x01\x05" + bytes(18)])
def serve():
    while True:
        conn, _ = listener.accept()
        conn.close()
threading.Thread(target=serve, daemon=True).start()
channel.recvmsg(65536, 64)
os._exit(9)
"#;

/// Waits until generation `id` of `service` satisfies `done` (in `status --json`).
fn wait_for(env: &TestEnv, service: &str, id: u64, what: &str, done: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + patience();
    loop {
        let status = env.status();
        let found = status["supervisors"][service]["generations"]
            .as_array()
            .and_then(|all| all.iter().find(|g| g["id"] == id).cloned());
        if found.as_ref().is_some_and(&done) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "generation {id} never {what}: {status}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The new generation dies in the middle of a handoff: the session it was being passed stays
/// with the old generation, which serves it on with its state until the client leaves —
/// never lost, never half-owned.
#[test]
fn a_new_generation_that_dies_mid_handoff_leaves_the_session_with_the_old() {
    let env = TestEnv::with_backend("handoff-death", "sk-lookup");
    let counter = counter_example();
    let service = run_with_handoff(
        &env,
        "counter",
        "127.0.0.1:7070",
        &[counter.to_str().unwrap()],
    );
    let mut session = Session::open("127.0.0.1:7070");
    session.send(b"one\n");
    assert_eq!(session.answer(), 1);
    // The upgrade waits for generation 1 to finish draining: it runs meanwhile.
    let upgrade = Command::new(integration_tests::hotswap_bin())
        .args([
            "upgrade",
            "counter",
            "--",
            "/usr/bin/python3",
            "-c",
            DIES_ON_HANDOFF,
        ])
        .env("HOTSWAP_SOCKET", &env.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Generation 2 took the session's packet and died before answering (then restarted, as
    // an active generation that dies does).
    wait_for(&env, "counter", 2, "died", |g| {
        g["restarts"].as_u64() >= Some(1)
    });
    // Still the old generation's, state and all.
    session.send(b"two\n");
    assert_eq!(session.answer(), 1);
    // The client leaves: generation 1 has nothing left and exits by itself.
    drop(session);
    let upgrade = upgrade.wait_with_output().unwrap();
    assert!(upgrade.status.success(), "{upgrade:?}\n{}", service.log());
    let status = env.status();
    let first = &status["supervisors"]["counter"]["generations"][0];
    assert_eq!(first["id"], 1, "{status}");
    assert_eq!(first["handed_over"], 0, "{status}");
    assert_eq!(first["exit"]["code"], 0, "{status}");
}

/// Keep-alive HTTP connections opened once, `upgrades` upgrades of the hello example: every
/// request is answered over the same connections (the client counts its connects), and each
/// round's answers come from the new generation.
fn keep_alive_connections_are_served_by_every_generation(backend: &str) {
    let upgrades = rounds(if backend == "sk-lookup" { 100 } else { 20 });
    let env = TestEnv::with_backend("handoff-hello", backend);
    let hello = example_server();
    let service = run_with_handoff(&env, "web", "127.0.0.1:8080", &[hello.to_str().unwrap()]);
    let mut connections: Vec<BufReader<TcpStream>> = (0..4)
        .map(|_| {
            let stream = TcpStream::connect("127.0.0.1:8080").unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            BufReader::new(stream)
        })
        .collect();
    let connects = connections.len();
    let mut served_by = std::collections::BTreeSet::new();
    for round in 0..=upgrades {
        if round > 0 {
            upgrade(&env, "web");
            // The old generation hands the connections over at its drain signal, and then
            // has nothing left: it exits.
            wait_for(&env, "web", round as u64, "exited", |g| {
                g["state"] == "exited"
            });
        }
        for (i, connection) in connections.iter_mut().enumerate() {
            let (body, close) = http_exchange(connection)
                .unwrap_or_else(|err| panic!("round {round}, connection {i}: {err}"));
            assert!(
                !close,
                "round {round}: the server closed a keep-alive connection"
            );
            let generation: u64 = body
                .split_whitespace()
                .nth(1)
                .and_then(|g| g.parse().ok())
                .unwrap_or_else(|| panic!("not hello's answer: {body:?}"));
            assert_eq!(
                generation,
                round as u64 + 1,
                "round {round}: {body}\n{}\n{}",
                env.status(),
                service.log()
            );
            served_by.insert(generation);
        }
    }
    assert_eq!(connects, 4, "no connection was opened again");
    assert_eq!(served_by.len(), upgrades + 1);
    // Idle connections no longer hold an old generation: each drained as soon as it handed
    // them over, long before the drain timeout.
    let status = env.status();
    for g in status["supervisors"]["web"]["generations"]
        .as_array()
        .unwrap()
    {
        if g["state"] == "exited" {
            assert_eq!(g["exit"]["code"], 0, "killed at the drain timeout: {g}");
        }
    }
}

integration_tests::for_every_backend!(
    the_counter_example_keeps_its_sessions,
    keep_alive_connections_are_served_by_every_generation
);

/// A server that never opens its channel upgrades as it did without `--handoff`: nothing is
/// lost under load, and nothing is handed over.
#[test]
fn a_server_that_ignores_the_channel_upgrades_as_before() {
    let env = TestEnv::with_backend("handoff-ignored", "sk-lookup");
    let fixture = integration_tests::activated_fixture();
    let _service = run_with_handoff(&env, "web", "127.0.0.1:8080", &[fixture.to_str().unwrap()]);
    let load = HttpLoad::start("127.0.0.1:8080", false, 10_000_000);
    for _ in 0..rounds(10) {
        upgrade(&env, "web");
    }
    let report = load.stop();
    assert_eq!(report.failed, 0, "{report:?}");
    let status = env.status();
    for g in status["supervisors"]["web"]["generations"]
        .as_array()
        .unwrap()
    {
        assert_eq!(
            (g["handed_over"].as_u64(), g["adopted"].as_u64()),
            (Some(0), Some(0))
        );
    }
    let mut stream = TcpStream::connect("127.0.0.1:8080").unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut some = [0u8; 1];
    stream.read_exact(&mut some).unwrap();
}
