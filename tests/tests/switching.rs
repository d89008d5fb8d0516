//! Switching between live generations, under load, on the real kernel.

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpStream,
};

use integration_tests::{tcp_request, Load, Server, TestEnv};
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
    for i in 0..1000 {
        env.ok(&["switch", "web", if i % 2 == 0 { "2" } else { "1" }]);
    }
    let report = load.stop();
    println!("1000 switches under load: {report:?}");
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
