//! Switching between live generations, under load, on the real kernel.

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpStream,
};

use integration_tests::{rounds, tcp_request, Load, Server, TestEnv};
use nix::sys::signal::Signal;

#[test]
fn switch_moves_new_connections_and_established_ones_stay() {
    let env = TestEnv::with_daemon("switch");
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    let one = Server::start("tcp", "127.0.0.1:0", "one");
    let two = Server::start("tcp", "127.0.0.1:0", "two");
    assert_eq!(
        env.register("web", &one, &["--label", "v1", "--activate"]),
        1
    );
    assert_eq!(env.register("web", &two, &["--label", "v2"]), 2);

    let old = TcpStream::connect("127.0.0.1:8080").unwrap();
    let mut old_reader = BufReader::new(old.try_clone().unwrap());
    let mut line = String::new();
    old_reader.read_line(&mut line).unwrap();
    assert_eq!(line, "one\n");

    let out = env.ok(&["switch", "web", "2"]);
    assert!(out.contains("1 -> 2"), "{out}");
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "two");
    let status = env.status();
    let generations = &status["services"][0]["generations"];
    assert_eq!(generations[0]["active"], false);
    assert_eq!(generations[1]["active"], true);
    assert_eq!(generations[1]["label"], "v2");
    assert_eq!(generations[1]["pid"], two.pid);

    // The connection made before the switch still talks to generation 1.
    for i in 0..3 {
        writeln!(&old, "ping {i}").unwrap();
        line.clear();
        old_reader.read_line(&mut line).unwrap();
        assert_eq!(line, format!("one ping {i}\n"));
    }
    // And back: rollback is the same one map update.
    env.ok(&["switch", "web", "1"]);
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "one");
}

#[test]
fn thousand_switches_under_load_lose_nothing() {
    let env = TestEnv::with_daemon("thousand");
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    let one = Server::start("tcp", "127.0.0.1:0", "one");
    let two = Server::start("tcp", "127.0.0.1:0", "two");
    env.register("web", &one, &["--activate"]);
    env.register("web", &two, &[]);

    let load = Load::start("127.0.0.1:8080", 2_000_000);
    let switches = rounds(1000);
    for i in 0..switches {
        env.ok(&["switch", "web", if i % 2 == 0 { "2" } else { "1" }]);
    }
    let report = load.stop();
    println!("{switches} switches under load: {report:?}");
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.failures);
    assert!(
        report.replies.get("one").copied().unwrap_or(0) > 0,
        "{report:?}"
    );
    assert!(
        report.replies.get("two").copied().unwrap_or(0) > 0,
        "{report:?}"
    );
    assert_eq!(report.replies.len(), 2, "{report:?}");
    // Every steered connection was counted and none refused.
    let [lookups, steered, no_socket, errors] = env.metrics("web");
    assert_eq!((no_socket, errors), (0, 0));
    assert_eq!(lookups, steered);
    assert!(steered >= report.served());
}

#[test]
fn daemon_restart_keeps_steering_and_adopts_the_state() {
    let mut env = TestEnv::with_daemon("restart");
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    env.ok(&["bind", "web", "udp", "127.0.0.1/32", "5353"]);
    let one = Server::start("tcp", "127.0.0.1:0", "one");
    let two = Server::start("tcp", "127.0.0.1:0", "two");
    env.register("web", &one, &["--activate", "--label", "v1"]);
    env.register("web", &two, &["--label", "v2"]);
    let before = env.status();
    let program_id = before["backend"]["program_id"].clone();
    assert_eq!(before["backend"]["adopted"], false);

    let load = Load::start("127.0.0.1:8080", 2_000_000);
    // kill -9: no clean-up at all.
    env.stop_daemon(Signal::SIGKILL);
    assert_eq!(
        tcp_request("127.0.0.1:8080").unwrap(),
        "one",
        "steering without a daemon"
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    env.start_daemon();
    let after = env.status();
    assert_eq!(after["backend"]["adopted"], true, "{after}");
    assert_eq!(
        after["backend"]["program_id"], program_id,
        "a second program was loaded"
    );
    assert_eq!(after["services"], before["services"], "state not adopted");
    let metrics_before_switch = env.metrics("web");
    assert!(metrics_before_switch[1] > 0);

    // The adopted generations can be switched to.
    env.ok(&["switch", "web", "2"]);
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "two");
    // A clean stop, too, leaves steering in place.
    env.stop_daemon(Signal::SIGTERM);
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "two");
    env.start_daemon();
    env.ok(&["switch", "web", "1"]);
    let report = load.stop();
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.failures);
    assert!(report.served() > 0);
    // Counters survive restarts: they live in the kernel.
    assert!(env.metrics("web")[1] >= metrics_before_switch[1]);

    // A generation whose process died while no daemon ran is forgotten on adoption.
    env.stop_daemon(Signal::SIGKILL);
    drop(two);
    env.start_daemon();
    let status = env.status();
    let generations = status["services"][0]["generations"].as_array().unwrap();
    assert_eq!(generations.len(), 1, "{status}");
    assert_eq!(generations[0]["id"], 1);
    assert_eq!(generations[0]["active"], true);
}

/// A pinned map this build's program would read wrongly (as another hotswap version could
/// leave one) stops the daemon with one line naming it, before anything changes: steering by
/// the program already attached goes on, and once the map is right again the daemon adopts it.
#[test]
fn a_pinned_map_of_another_layout_is_refused_and_nothing_changes() {
    let mut env = TestEnv::with_daemon("map-layout");
    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    let server = Server::start("tcp", "127.0.0.1:0", "one");
    env.register("web", &server, &["--activate"]);
    let program_id = env.status()["backend"]["program_id"].clone();
    env.stop_daemon(Signal::SIGTERM);

    // The config array where the services hash belongs.
    let services = env.pin_dir.join("HS_SERVICES");
    let config = env.pin_dir.join("HS_CONFIG");
    let aside = env.pin_dir.join("HS_SERVICES_aside");
    std::fs::rename(&services, &aside).unwrap();
    std::fs::rename(&config, &services).unwrap();
    let log = env.try_start_daemon().unwrap_err();
    let line = log
        .lines()
        .find(|l| l.contains("does not fit this build's program"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("HS_SERVICES"), "{line}");
    assert!(line.contains("run that version"), "{line}");
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "one");

    std::fs::rename(&services, &config).unwrap();
    std::fs::rename(&aside, &services).unwrap();
    env.start_daemon();
    let status = env.status();
    assert_eq!(status["backend"]["adopted"], true, "{status}");
    assert_eq!(status["backend"]["program_id"], program_id);
    assert_eq!(status["services"][0]["name"], "web");
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "one");
}

/// The `bpf()` system call with a zero-padded attribute block; returns the new fd.
fn bpf(command: libc::c_long, attr: &mut [u8; 128]) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    // SAFETY: `attr` is a valid, large enough bpf_attr for the commands used here.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, command, attr.as_mut_ptr(), attr.len()) };
    assert!(
        fd >= 0,
        "bpf({command}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just returned this fd to us.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}

/// Pins `fd` at `path` (BPF_OBJ_PIN).
fn bpf_pin(fd: &std::os::fd::OwnedFd, path: &std::path::Path) {
    use std::os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _};
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: as in `bpf`; BPF_OBJ_PIN returns 0, not an fd.
    let result = unsafe { libc::syscall(libc::SYS_bpf, 6, attr.as_mut_ptr(), attr.len()) };
    assert_eq!(result, 0, "pin: {}", std::io::Error::last_os_error());
}

/// A state directory whose attached program differs from this build's (as an older hotswap
/// leaves it) is upgraded: the new program is attached and pinned, the old one detached and
/// gone, and steering works.
#[test]
fn a_pinned_program_of_another_build_is_upgraded() {
    use std::os::fd::AsRawFd as _;
    let mut env = TestEnv::new("program-upgrade");
    std::fs::create_dir_all(&env.pin_dir).unwrap();
    // "Another build": an sk_lookup program that passes everything (r0 = SK_PASS; exit).
    let instructions: [u8; 16] = [0xb7, 0, 0, 0, 1, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let license = c"GPL";
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&30u32.to_ne_bytes()); // BPF_PROG_TYPE_SK_LOOKUP
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(instructions.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[68..72].copy_from_slice(&36u32.to_ne_bytes()); // expected_attach_type BPF_SK_LOOKUP
    let program = bpf(5, &mut attr); // BPF_PROG_LOAD
    let netns = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(netns.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&36u32.to_ne_bytes()); // BPF_SK_LOOKUP
    let link = bpf(28, &mut attr); // BPF_LINK_CREATE
    bpf_pin(&program, &env.pin_dir.join("program"));
    bpf_pin(&link, &env.pin_dir.join("link"));
    let old_id = aya::programs::ProgramInfo::from_pin(env.pin_dir.join("program"))
        .unwrap()
        .id();
    drop((program, link));

    env.start_daemon();
    let status = env.status();
    let backend = &status["backend"];
    assert!(
        backend["reason"].as_str().unwrap().contains("upgraded"),
        "{status}"
    );
    let new_id = backend["program_id"].as_u64().unwrap() as u32;
    assert_ne!(new_id, old_id);
    let pinned = aya::programs::ProgramInfo::from_pin(env.pin_dir.join("program")).unwrap();
    assert_eq!(pinned.id(), new_id);
    assert!(!env.pin_dir.join("link_new").exists() && !env.pin_dir.join("program_new").exists());
    // The old program lost its last reference with its link: the kernel frees it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .any(|p| p.id() == old_id)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "old program {old_id} still loaded"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    env.ok(&["bind", "web", "tcp", "127.0.0.1/32", "8080"]);
    let server = Server::start("tcp", "127.0.0.1:0", "one");
    env.register("web", &server, &["--activate"]);
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "one");
}
