//! The daemon's control socket against peers that misbehave: another user flooding it, frames
//! larger than any request, idle and surplus connections, a process out of descriptors, and a
//! daemon stopped while it answers. Whatever a peer does, the daemon's memory stays bounded and
//! it goes on answering everyone else.

use std::{
    io::{Read as _, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    process::Command,
    time::{Duration, Instant},
};

use hotswap::protocol::{encode_frame, ErrorCode, Reply, Request, Response};
use integration_tests::{patience, TestEnv};

/// Resident and peak resident memory of `pid`, in KiB (`VmRSS`, `VmHWM`).
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Starts counting `pid`'s peak resident memory afresh (`VmHWM`), and returns its resident
/// memory now, in KiB.
fn reset_peak_memory(pid: u32) -> u64 {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    memory_kib(pid).0
}

/// CPU time `pid` has used, in clock ticks (user + system).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are the 14th and 15th fields of the whole line.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Reads one frame; `None` when the daemon closed the connection first.
fn read_frame(stream: &mut UnixStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).ok()?;
    Some(body)
}

/// One request and its answer over an open connection.
fn exchange(stream: &mut UnixStream, request: &Request) -> Response {
    stream.write_all(&encode_frame(request).unwrap()).unwrap();
    let body = read_frame(stream).expect("an answer");
    hotswap::protocol::decode(&body).unwrap()
}

/// A frame around `json` as it is, for what a well-behaved client would never send.
fn raw_frame(json: &[u8]) -> Vec<u8> {
    let mut bytes = (json.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(json);
    bytes
}

fn connect(env: &TestEnv) -> UnixStream {
    let stream = UnixStream::connect(&env.socket).unwrap();
    stream.set_read_timeout(Some(patience())).unwrap();
    stream
}

/// A uid-65534 peer that sends 16 MiB frames on 20 connections at once (the socket opened up
/// by mistake) is refused on each before the daemon reads any of it: it gets the refusal, and
/// the daemon's peak memory hardly moves (it read whole frames first and grew by 300 MB).
#[test]
fn another_users_flood_is_refused_unread_and_memory_stays_bounded() {
    let env = TestEnv::with_daemon("flood");
    // The socket and its directory opened up by mistake.
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&env.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let pid = env.daemon_pid().unwrap();
    let rss_before = reset_peak_memory(pid);
    let flood = r#"
import socket, struct, sys
size = 16 * 1024 * 1024
conns = []
for _ in range(20):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    s.settimeout(10)
    conns.append(s)
chunk = b"x" * (1024 * 1024)
for s in conns:
    try:
        s.sendall(struct.pack(">I", size))
        for _ in range(16):
            s.sendall(chunk)
    except OSError:
        pass
for s in conns:
    data = b""
    try:
        while True:
            more = s.recv(65536)
            if not more:
                break
            data += more
    except OSError:
        pass
    print(data[4:].decode(errors="replace"))
"#;
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        // Debian's own, not one from root's PATH that uid 65534 may not run.
        .args(["/usr/bin/python3", "-c", flood])
        .arg(&env.socket)
        .output()
        .expect("setpriv and python3 run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refusals = stdout
        .lines()
        .filter(|l| {
            l.contains(r#""code":"permission_denied""#)
                && l.contains("uid 65534")
                && l.contains("may not use this control socket (only root may)")
        })
        .count();
    assert_eq!(refusals, 20, "{stdout}");
    let (_, peak) = memory_kib(pid);
    println!("daemon memory: {rss_before} KiB before, {peak} KiB at most during the flood");
    assert!(
        peak < rss_before + 8 * 1024,
        "{rss_before} KiB -> {peak} KiB"
    );
    env.status();
}

/// A frame that announces more than any request can be (here 1 GiB) closes the connection as
/// soon as its length is read; the daemon keeps no buffer for it and answers the next peer.
#[test]
fn a_frame_longer_than_any_request_closes_the_connection_unread() {
    let env = TestEnv::with_daemon("big-frame");
    let pid = env.daemon_pid().unwrap();
    let rss_before = reset_peak_memory(pid);
    for announced in [1u32 << 30, 64 * 1024 + 1] {
        let mut stream = connect(&env);
        stream.write_all(&announced.to_be_bytes()).unwrap();
        // Whatever follows is not read; the daemon closes at once.
        let started = Instant::now();
        let _ = stream.write_all(&vec![b' '; 256 * 1024]);
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        assert!(rest.is_empty(), "an answer to a {announced}-byte frame");
        assert!(started.elapsed() < patience(), "the connection stayed open");
    }
    let (_, peak) = memory_kib(pid);
    assert!(
        peak < rss_before + 4 * 1024,
        "{rss_before} KiB -> {peak} KiB"
    );
    let mut stream = connect(&env);
    assert!(matches!(
        exchange(&mut stream, &Request::Status),
        Ok(Reply::Status(_))
    ));
}

/// One user holds at most `--max-connections-per-user` connections and the refusal says so and
/// why; a connection that sends nothing is closed after `--idle-timeout`, which gives the share
/// back.
#[test]
fn a_user_holds_its_share_of_connections_and_idle_ones_are_closed() {
    let mut env = TestEnv::new("conn-limits");
    env.daemon_args = ["--max-connections-per-user", "3", "--idle-timeout", "2s"]
        .map(String::from)
        .into();
    env.start_daemon();
    let mut held: Vec<UnixStream> = (0..3).map(|_| connect(&env)).collect();
    // Each is admitted and served.
    for stream in &mut held {
        assert!(matches!(
            exchange(stream, &Request::Status),
            Ok(Reply::Status(_))
        ));
    }
    let refused = env.fails(&["status"]);
    assert!(
        refused.contains("uid 0 already holds 3 control connections")
            && refused.contains("idle ones are closed after 2s"),
        "{refused}"
    );
    // Held open and silent, they are closed by the daemon ...
    let started = Instant::now();
    for stream in &mut held {
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(2) + patience() / 2,
        "closed after {waited:?}"
    );
    // ... and the share is free again.
    env.status();
}

/// Out of descriptors (RLIMIT_NOFILE lowered under it), the daemon's accept loop backs off
/// instead of spinning: little CPU, one log line for the whole streak; once descriptors are
/// free it accepts again and says so.
#[test]
fn accept_failures_back_off_instead_of_spinning() {
    let env = TestEnv::with_daemon("emfile");
    let pid = env.daemon_pid().unwrap();
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let prlimit = |limit: usize| {
        let status = Command::new("prlimit")
            .arg(format!("--pid={pid}"))
            // The soft limit only: lowering the hard one could not be undone without
            // CAP_SYS_RESOURCE.
            .arg(format!("--nofile={limit}:"))
            .status()
            .expect("prlimit (util-linux) runs");
        assert!(status.success());
    };
    prlimit(open_fds + 2);
    // Two are accepted and held; the rest wait in the backlog while accept fails.
    let waiting: Vec<UnixStream> = (0..8).map(|_| connect(&env)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let ticks_before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(3));
    let ticks = cpu_ticks(pid) - ticks_before;
    let failed_lines = env
        .daemon_log()
        .lines()
        .filter(|l| l.contains("accepting a control connection failed"))
        .count();
    println!("out of descriptors for 3 s: {ticks} CPU ticks, {failed_lines} log lines");
    // Spinning took 84 % of a core (250 ticks in 3 s at 100 Hz) and logged ~500k lines.
    assert!(ticks < 30, "{ticks} ticks in 3 s");
    assert_eq!(failed_lines, 1, "{}", env.daemon_log());
    prlimit(1024);
    drop(waiting);
    env.status();
    assert!(
        env.daemon_log()
            .contains("accepting control connections works again"),
        "{}",
        env.daemon_log()
    );
}

/// SIGTERM while the daemon is sending a long answer to a client that reads it slowly: the
/// client still gets the whole answer, and a client that comes after finds no daemon rather
/// than a socket that never answers.
#[test]
fn a_stopping_daemon_finishes_the_answer_it_is_sending() {
    let mut env = TestEnv::with_daemon("stop-answer");
    // A status report too long for the socket's buffer: the daemon's send waits on the reader.
    let mut setup = connect(&env);
    let service: hotswap::model::ServiceName = "big".parse().unwrap();
    for port in 1..=12_000u16 {
        let binding = hotswap::model::Binding {
            protocol: hotswap::model::Protocol::Tcp,
            prefix: hotswap::model::parse_prefix("127.0.0.1/32").unwrap(),
            port,
        };
        let request = Request::Bind {
            service: service.clone(),
            binding,
            owner: None,
        };
        assert_eq!(exchange(&mut setup, &request), Ok(Reply::Done));
    }
    drop(setup);
    let mut reader = connect(&env);
    reader
        .write_all(&encode_frame(&Request::Status).unwrap())
        .unwrap();
    let mut len = [0u8; 4];
    reader
        .read_exact(&mut len)
        .unwrap_or_else(|err| panic!("{err}\n{}", env.daemon_log()));
    let len = u32::from_be_bytes(len) as usize;
    let buffer: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_default")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        len > 2 * buffer,
        "a status report of {len} bytes fits the {buffer}-byte socket buffer"
    );
    let daemon = env.daemon_pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let after = env.hotswap(&["status"]);
    let after = String::from_utf8_lossy(&after.stderr);
    assert!(
        after.contains("the hotswap daemon is not running"),
        "{after}"
    );
    // Read slowly, a chunk at a time.
    let mut body = Vec::with_capacity(len);
    let mut chunk = [0u8; 64 * 1024];
    while body.len() < len {
        let n = reader.read(&mut chunk).unwrap();
        assert!(n > 0, "closed after {} of {len} bytes", body.len());
        body.extend_from_slice(&chunk[..n]);
        std::thread::sleep(Duration::from_millis(2));
    }
    let response: Response = hotswap::protocol::decode(&body).unwrap();
    assert!(matches!(response, Ok(Reply::Status(_))));
    env.stop_daemon(nix::sys::signal::Signal::SIGTERM);
}

/// A service with no binding and no generation left is forgotten and its id given back: after
/// more services than there are ids have come and gone, a new one can still be bound (every
/// bind failed with "too many services" after 4,095), and a restarted daemon finds none of
/// them pinned.
#[test]
fn services_that_come_and_go_never_run_out_of_ids() {
    let mut env = TestEnv::with_daemon("service-ids");
    let mut stream = connect(&env);
    let binding = hotswap::model::Binding {
        protocol: hotswap::model::Protocol::Tcp,
        prefix: hotswap::model::parse_prefix("127.0.0.1/32").unwrap(),
        port: 8080,
    };
    for n in 0..hotswap_common::MAX_SERVICES + 10 {
        let service: hotswap::model::ServiceName = format!("s{n}").parse().unwrap();
        let bind = Request::Bind {
            service: service.clone(),
            binding,
            owner: None,
        };
        assert_eq!(exchange(&mut stream, &bind), Ok(Reply::Done), "service {n}");
        let unbind = Request::Unbind { service, binding };
        assert_eq!(
            exchange(&mut stream, &unbind),
            Ok(Reply::Done),
            "service {n}"
        );
    }
    drop(stream);
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    env.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    env.start_daemon();
    let services = env.status()["services"].clone();
    assert_eq!(services.as_array().unwrap().len(), 1, "{services}");
    assert_eq!(services[0]["name"], "web");
}

/// Every frame names its protocol version. A request without one (a build from before
/// versions) or of another version is refused with the `version_mismatch` code, saying which
/// versions met; the command line facing a daemon of another version says the same.
#[test]
fn peers_of_another_protocol_version_say_which_versions_met() {
    let env = TestEnv::with_daemon("version");
    for (frame, theirs) in [
        (r#"{"verb":"status"}"#.to_owned(), "0 (unversioned)"),
        (
            r#"{"version":99,"body":{"verb":"status"}}"#.to_owned(),
            "99",
        ),
    ] {
        let mut stream = connect(&env);
        stream.write_all(&raw_frame(frame.as_bytes())).unwrap();
        let answer: Response =
            hotswap::protocol::decode(&read_frame(&mut stream).unwrap()).unwrap();
        let err = answer.unwrap_err();
        assert_eq!(err.code, ErrorCode::VersionMismatch, "{err:?}");
        assert!(
            err.message.contains(&format!(
                "the client speaks control protocol version {theirs}, this daemon {}",
                hotswap::protocol::PROTOCOL_VERSION
            )),
            "{err:?}"
        );
    }
    // A "daemon" of version 99, answering once.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("other.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let other = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let _ = read_frame(&mut stream);
        let frame = br#"{"version":99,"body":{"Ok":{"reply":"done"}}}"#;
        stream.write_all(&raw_frame(frame)).unwrap();
    });
    let out = Command::new(integration_tests::hotswap_bin())
        .args(["switch", "web", "1"])
        .env("HOTSWAP_SOCKET", &socket)
        .output()
        .unwrap();
    other.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "control protocol version 99, this hotswap {}",
            hotswap::protocol::PROTOCOL_VERSION
        )),
        "{stderr}"
    );
}

/// Refusals carry stable codes, so programs (and these tests) need not match their wording.
#[test]
fn refusals_carry_stable_codes() {
    let env = TestEnv::with_daemon("codes");
    let mut stream = connect(&env);
    let web: hotswap::model::ServiceName = "web".parse().unwrap();
    let binding = hotswap::model::Binding {
        protocol: hotswap::model::Protocol::Tcp,
        prefix: hotswap::model::parse_prefix("127.0.0.1/32").unwrap(),
        port: 8080,
    };
    let code =
        |stream: &mut UnixStream, request: &Request| exchange(stream, request).unwrap_err().code;
    let switch = Request::Switch {
        service: web.clone(),
        generation: 1,
    };
    assert_eq!(code(&mut stream, &switch), ErrorCode::UnknownService);
    let bind = Request::Bind {
        service: web.clone(),
        binding,
        owner: None,
    };
    assert_eq!(exchange(&mut stream, &bind), Ok(Reply::Done));
    assert_eq!(code(&mut stream, &switch), ErrorCode::UnknownGeneration);
    let other = Request::Bind {
        service: "api".parse().unwrap(),
        binding,
        owner: None,
    };
    assert_eq!(code(&mut stream, &other), ErrorCode::AlreadyBound);
    let register = Request::Register {
        service: web.clone(),
        pid: std::process::id(),
        fds: vec![],
        label: None,
        activate: false,
    };
    assert_eq!(code(&mut stream, &register), ErrorCode::InvalidRequest);
    let frame = format!(
        r#"{{"version":{},"body":{{"verb":"fly"}}}}"#,
        hotswap::protocol::PROTOCOL_VERSION
    );
    stream.write_all(&raw_frame(frame.as_bytes())).unwrap();
    let answer: Response = hotswap::protocol::decode(&read_frame(&mut stream).unwrap()).unwrap();
    assert_eq!(answer.unwrap_err().code, ErrorCode::MalformedRequest);
}

/// The black-box half of the fuzz run: 20,000 mangled request frames (and now and then a
/// length prefix that lies) sent to a live daemon in this test's namespace. It answers every
/// frame that arrives whole, closes connections whose framing is broken, stays up, keeps its
/// memory bounded, and answers `status` afterwards.
#[test]
fn a_live_daemon_takes_twenty_thousand_mangled_frames() {
    use hotswap::fuzz::{mangle, seed, seeds, Rng};
    let env = TestEnv::with_daemon("fuzz");
    let pid = env.daemon_pid().unwrap();
    let rss_before = reset_peak_memory(pid);
    let (seeds, mut rng) = (seeds(), Rng::new(seed(0xb1ac_b0c5)));
    let (mut answered, mut closed) = (0u32, 0u32);
    let mut stream = connect(&env);
    stream.set_read_timeout(Some(patience())).unwrap();
    for i in 0..20_000 {
        let body = mangle(&seeds, &mut rng);
        let mut frame = raw_frame(&body);
        let lies = rng.below(50) == 0;
        if lies {
            // A length that does not match what follows: too long, or past any cap.
            let len = [body.len() as u32 + 1 + rng.below(100) as u32, u32::MAX][rng.below(2)];
            frame[..4].copy_from_slice(&len.to_be_bytes());
        }
        let sent = stream.write_all(&frame);
        if lies {
            // The daemon waits for the rest or closes at once; either way this connection is
            // done.
            drop(std::mem::replace(&mut stream, connect(&env)));
            closed += 1;
            continue;
        }
        sent.unwrap_or_else(|err| panic!("frame {i}: {err}\n{}", env.daemon_log()));
        let reply = read_frame(&mut stream)
            .unwrap_or_else(|| panic!("no answer to frame {i}: {body:?}\n{}", env.daemon_log()));
        let _: Response = hotswap::protocol::decode(&reply)
            .unwrap_or_else(|err| panic!("frame {i}: the answer does not decode: {err}"));
        answered += 1;
    }
    drop(stream);
    let (_, peak) = memory_kib(pid);
    println!(
        "fuzz: {answered} frames answered, {closed} connections with lying lengths; daemon memory {rss_before} KiB -> at most {peak} KiB"
    );
    assert!(
        peak < rss_before + 16 * 1024,
        "{rss_before} KiB -> {peak} KiB"
    );
    env.status();
}
