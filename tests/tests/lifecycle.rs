//! `hotswap run`, `upgrade` and `rollback` on the real kernel, under load.

use std::{
    collections::BTreeSet,
    net::UdpSocket,
    time::{Duration, Instant},
};

use integration_tests::{
    activated_fixture, example_server, patience, rounds, HttpLoad, RunningService, TestEnv,
};

fn path(p: std::path::PathBuf) -> String {
    p.to_str().unwrap().to_owned()
}

/// `hotswap upgrade ARGS` must succeed; returns its output.
fn upgrade(env: &TestEnv, args: &[&str]) -> String {
    let mut all = vec!["upgrade"];
    all.extend_from_slice(args);
    env.ok(&all)
}

fn upgrades_under_load(backend: &str, name: &str, ready: &str, server: &str, count: usize) {
    let count = rounds(count);
    let env = TestEnv::with_backend(name, backend);
    let service = RunningService::start(
        &env,
        "web",
        &[
            "--listen",
            "tcp://127.0.0.1:8080",
            "--ready",
            ready,
            "--grace",
            "50ms",
            "--drain-timeout",
            "10s",
            "--",
            server,
        ],
    );
    let fresh = HttpLoad::start("127.0.0.1:8080", false, 10_000_000);
    let kept = HttpLoad::start("127.0.0.1:8080", true, 10_000_000);
    for _ in 0..count {
        let out = upgrade(&env, &["web"]);
        assert!(out.contains("is active"), "{out}");
    }
    // Let both clients see the last generation too.
    std::thread::sleep(Duration::from_millis(100));
    let (fresh, kept) = (fresh.stop(), kept.stop());
    for (shape, report) in [
        ("new connection per request", &fresh),
        ("keep-alive", &kept),
    ] {
        println!(
            "{name}, {count} upgrades, {shape}: {} served by {} processes, {} failed",
            report.served(),
            report.replies.len(),
            report.failed
        );
    }
    assert_eq!(
        fresh.failed,
        0,
        "failed requests: {:?}\n{}",
        fresh.failures,
        service.log()
    );
    assert_eq!(
        kept.failed,
        0,
        "failed requests: {:?}\n{}",
        kept.failures,
        service.log()
    );
    // Many generations served: the upgrades really moved the traffic.
    assert!(fresh.replies.len() > count / 2, "{fresh:?}");
    let status = env.status();
    assert_eq!(status["supervisors"]["web"]["active"], count as u64 + 1);
}

fn hundred_upgrades_of_the_example_server_lose_nothing(backend: &str) {
    upgrades_under_load(
        backend,
        "upgrade-example",
        "notify",
        &path(example_server()),
        100,
    );
}

fn hundred_upgrades_of_a_server_that_closes_its_listener_on_sigterm_lose_nothing(backend: &str) {
    // No notify in a server without hotswap code: the tcp probe where it works (own sockets),
    // else a delay.
    let ready = if backend == "uds" {
        "delay:50ms"
    } else {
        "tcp"
    };
    upgrades_under_load(
        backend,
        "upgrade-fixture",
        ready,
        &path(activated_fixture()),
        100,
    );
}

fn hundred_upgrades_of_a_server_that_shuts_its_listener_down_on_sigterm(backend: &str) {
    // shutdown() acts on the socket, not the descriptor. With a socket per generation it ends
    // only the old generation's, whose queue the drain waited for: nothing is lost. On the
    // shared socket it ends the service's one queue, and everything in it is reset; the daemon
    // makes the socket listen again within milliseconds, and the upgrade never reports success
    // over a dead socket.
    let count = rounds(100);
    let env = TestEnv::with_backend("upgrade-shutdown", backend);
    let ready = if backend == "uds" {
        "delay:50ms"
    } else {
        "tcp"
    };
    let fixture = path(activated_fixture());
    let service = RunningService::start(
        &env,
        "web",
        &[
            "--listen",
            "tcp://127.0.0.1:8080",
            "--ready",
            ready,
            "--grace",
            "50ms",
            "--drain-timeout",
            "10s",
            "--",
            &fixture,
            "--shutdown",
        ],
    );
    let fresh = HttpLoad::start("127.0.0.1:8080", false, 10_000_000);
    let kept = HttpLoad::start("127.0.0.1:8080", true, 10_000_000);
    for _ in 0..count {
        let out = upgrade(&env, &["web"]);
        assert!(out.contains("is active"), "{out}");
    }
    std::thread::sleep(Duration::from_millis(100));
    let (fresh, kept) = (fresh.stop(), kept.stop());
    println!(
        "{backend}: {count} upgrades of a server that shuts its listener down: {} + {} served, {} + {} failed",
        fresh.served(),
        kept.served(),
        fresh.failed,
        kept.failed
    );
    assert!(fresh.replies.len() > count / 2, "{fresh:?}");
    let status = env.status();
    let web = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap()
        .clone();
    assert!(
        web["generations"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["sockets"].as_array().unwrap().clone())
            .all(|s| s["listening"] == true),
        "{status}"
    );
    // The service answers after the last upgrade.
    let after = HttpLoad::start("127.0.0.1:8080", false, 20);
    std::thread::sleep(Duration::from_millis(200));
    let after = after.stop();
    assert!(after.served() > 0 && after.failed == 0, "{after:?}");
    if backend == "uds" {
        // Each old generation's shutdown killed the shared socket once, and it was repaired.
        assert!(
            web["relistened"].as_u64().unwrap() >= count as u64,
            "{status}"
        );
    } else {
        assert_eq!(
            (fresh.failed, kept.failed),
            (0, 0),
            "{:?} {:?}\n{}",
            fresh.failures,
            kept.failures,
            service.log()
        );
        assert_eq!(web["relistened"], 0, "{status}");
    }
}

fn a_server_that_shuts_its_listener_down_and_crashes_is_restarted_on_a_listening_socket(
    backend: &str,
) {
    // A crash restart reuses the generation's socket, which the dying process shut down: the
    // daemon (or the supervisor's restart) makes it listen again, and the service goes on.
    let env = TestEnv::with_backend("restart-shutdown", backend);
    let fixture = path(activated_fixture());
    let service = RunningService::start(
        &env,
        "web",
        &[
            "--listen",
            "tcp://127.0.0.1:8080",
            "--ready",
            "delay:50ms",
            "--",
            &fixture,
            "--shutdown",
            "--exit-after",
            "400",
        ],
    );
    let load = HttpLoad::start("127.0.0.1:8080", false, 10_000_000);
    let deadline = Instant::now() + patience();
    while env.status()["supervisors"]["web"]["restarts"]
        .as_u64()
        .unwrap_or(0)
        < 3
    {
        assert!(Instant::now() < deadline, "{}", service.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = load.stop();
    println!(
        "{backend}: 3 crash restarts after a shutdown(): {} served, {} failed {:?}",
        report.served(),
        report.failed,
        report.failures.iter().take(3).collect::<Vec<_>>()
    );
    assert!(report.served() > 0, "{report:?}");
    // Each crash left a shut-down socket that listens again (counted by the daemon).
    let deadline = Instant::now() + patience() / 2;
    loop {
        let status = env.status();
        let web = &status["services"][0];
        if web["relistened"].as_u64().unwrap() >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{status}\n{}", service.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Between crashes the service answers every request.
    let deadline = Instant::now() + patience() / 2;
    loop {
        let load = HttpLoad::start("127.0.0.1:8080", false, 10);
        std::thread::sleep(Duration::from_millis(100));
        let report = load.stop();
        if report.served() > 0 && report.failed == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{report:?}\n{}", service.log());
    }
}

fn udp_datagrams_during_upgrades_are_answered_exactly_once(backend: &str) {
    let env = TestEnv::with_backend("upgrade-udp", backend);
    let _service = RunningService::start(
        &env,
        "dns",
        &[
            "--listen",
            "udp://127.0.0.1:5353",
            "--ready",
            "delay:20ms",
            "--grace",
            "20ms",
            "--",
            &path(example_server()),
        ],
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&stop);
    let client = std::thread::spawn(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Connected, as resolvers are: answers must come from the service's own address.
        socket.connect("127.0.0.1:5353").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let (mut sent, mut answered, mut lost, mut duplicated) = (0u64, 0u64, 0u64, 0u64);
        let mut generations = BTreeSet::new();
        let deadline = Instant::now() + patience() * 3;
        let mut buf = [0u8; 512];
        while !flag.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            sent += 1;
            let payload = format!("seq={sent}");
            socket.send(payload.as_bytes()).unwrap();
            match socket.recv_from(&mut buf) {
                Ok((n, _)) => {
                    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
                    assert!(answer.ends_with(&payload), "answer {answer:?} to {payload}");
                    generations.insert(answer.split(" pid").next().unwrap().to_owned());
                    answered += 1;
                }
                Err(_) => lost += 1,
            }
            // Anything more for this datagram is a duplicate.
            socket
                .set_read_timeout(Some(Duration::from_millis(1)))
                .unwrap();
            while socket.recv_from(&mut buf).is_ok() {
                duplicated += 1;
            }
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
        }
        (sent, answered, lost, duplicated, generations)
    });
    for _ in 0..20 {
        upgrade(&env, &["dns"]);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, answered, lost, duplicated, generations) = client.join().unwrap();
    println!("udp: sent {sent}, answered {answered}, lost {lost}, duplicated {duplicated}, by {} generations", generations.len());
    assert_eq!((lost, duplicated), (0, 0));
    assert_eq!(sent, answered);
    assert!(generations.len() > 10, "{generations:?}");
}

fn active(env: &TestEnv, service: &str) -> u64 {
    env.status()["supervisors"][service]["active"]
        .as_u64()
        .unwrap()
}

fn failed_upgrades_keep_the_old_generation(backend: &str) {
    let env = TestEnv::with_backend("upgrade-fail", backend);
    let hello = path(example_server());
    let fixture = path(activated_fixture());
    let service = RunningService::start(
        &env,
        "web",
        &[
            "--listen",
            "tcp://127.0.0.1:8080",
            "--grace",
            "2s",
            "--drain-timeout",
            "500ms",
            "--",
            &hello,
        ],
    );
    let load = HttpLoad::start("127.0.0.1:8080", false, 10_000_000);
    let kept = HttpLoad::start("127.0.0.1:8080", true, 10_000_000);

    // Not ready in time.
    let line = env.fails(&[
        "upgrade",
        "web",
        "--ready-timeout",
        "300ms",
        "--",
        "sleep",
        "100",
    ]);
    assert!(
        line.contains("was not ready after 300ms") && line.contains("generation 1 stays active"),
        "{line}"
    );
    // It says what was waited for (the default readiness differs per backend).
    let hint = if backend == "uds" {
        "--ready delay is longer than --ready-timeout"
    } else {
        "a server must take its listener from LISTEN_FDS, not bind its own"
    };
    assert!(line.contains(hint), "{line}");
    assert_eq!(active(&env, "web"), 1);
    // Dies before it is ready.
    let line = env.fails(&["upgrade", "web", "--", "false"]);
    assert!(
        line.contains("exited (code 1) before it was ready"),
        "{line}"
    );
    assert_eq!(active(&env, "web"), 1);
    // A new generation that never got traffic cost nothing.
    let (report, kept_report) = (load.stop(), kept.stop());
    assert_eq!(
        report.failed + kept_report.failed,
        0,
        "{report:?} {kept_report:?}\n{}",
        service.log()
    );

    // Dies right after the switch: rolled back automatically. What it had accepted or queued
    // dies with it, as with any crash; nothing is refused.
    let load = HttpLoad::start("127.0.0.1:8080", false, 10_000_000);
    let line = env.fails(&[
        "upgrade",
        "web",
        "--ready",
        "delay:50ms",
        "--",
        &fixture,
        "--exit-after",
        "300",
    ]);
    assert!(line.contains("rolled back to generation 1"), "{line}");
    assert_eq!(active(&env, "web"), 1);
    let report = load.stop();
    assert!(
        report.failures.iter().all(|f| !f.contains("refused")),
        "{report:?}"
    );
    assert!(report.served() > 0);

    // An old generation that ignores SIGTERM is killed after the drain timeout.
    let load = HttpLoad::start("127.0.0.1:8080", false, 10_000_000);
    let out = upgrade(&env, &["web", "--", &fixture, "--ignore-term"]);
    let stuck = active(&env, "web");
    let out2 = upgrade(&env, &["web", "--", &hello]);
    assert!(out2.contains("killed"), "{out}\n{out2}");
    assert!(out2.contains("signal SIGKILL"), "{out2}");
    assert_ne!(active(&env, "web"), stuck);

    let report = load.stop();
    if backend == "uds" {
        // The honest difference: on a shared socket a stuck generation that ignores the drain
        // signal goes on accepting until it is killed, and what it accepted dies with it.
        assert!(
            report.failures.iter().all(|f| !f.contains("refused")),
            "{report:?}"
        );
    } else {
        assert_eq!(report.failed, 0, "{:?}\n{}", report.failures, service.log());
    }
}

fn rollback_and_concurrent_upgrades(backend: &str) {
    let env = TestEnv::with_backend("rollback", backend);
    let hello = path(example_server());
    let _service = RunningService::start(
        &env,
        "web",
        &[
            "--listen",
            "tcp://127.0.0.1:8080",
            "--ready",
            "notify",
            "--grace",
            "3s",
            "--",
            &hello,
        ],
    );
    let line = env.fails(&["rollback", "web"]);
    assert!(line.contains("no previous generation"), "{line}");

    // An upgrade waits in its grace period; meanwhile a second one is refused and a rollback
    // goes back to generation 1.
    let first = integration_tests::hotswap_command(&env)
        .args(["upgrade", "web"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + patience();
    while active(&env, "web") != 2 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let line = env.fails(&["upgrade", "web"]);
    assert!(line.contains("already in progress"), "{line}");
    let out = env.ok(&["rollback", "web"]);
    assert!(out.contains("switched 2 -> 1"), "{out}");
    let output = first.wait_with_output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("rolled back to generation 1"));
    // The upgrade drained generation 2 (on the uds backend both generations accept from the
    // shared socket until then): only generation 1 answers now.
    assert_eq!(
        integration_tests::tcp_http_body("127.0.0.1:8080")
            .split(" pid")
            .next(),
        Some("generation 1")
    );
    assert_eq!(active(&env, "web"), 1);
    // Once drained, a generation is gone for good, and rollback says so.
    let line = env.fails(&["rollback", "web"]);
    assert!(
        line.contains("generation 2 was drained and exited"),
        "{line}"
    );
}

fn stopping_during_an_upgrade_leaves_nothing_behind(backend: &str) {
    let env = TestEnv::with_backend("stop-upgrade", backend);
    let hello = path(example_server());
    let mut service = RunningService::start(
        &env,
        "web",
        &["--listen", "tcp://127.0.0.1:8080", "--", &hello],
    );
    let upgrade = integration_tests::hotswap_command(&env)
        .args(["upgrade", "web", "--ready", "delay:1s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + patience();
    let pids: Vec<i32> = loop {
        let status = env.status();
        let supervisor = &status["supervisors"]["web"];
        if supervisor["upgrading"].as_u64().is_some() {
            break supervisor["generations"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|g| g["pid"].as_i64().map(|p| p as i32))
                .collect();
        }
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(pids.len(), 2);
    assert!(service.stop().success());
    let output = upgrade.wait_with_output().unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("stopping"),
        "{output:?}"
    );
    for pid in pids {
        let gone = !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "));
        assert!(gone, "generation process {pid} outlived the supervisor");
    }
}

fn a_generation_that_dies_on_its_own_is_restarted(backend: &str) {
    let env = TestEnv::with_backend("restart-gen", backend);
    let _service = RunningService::start(
        &env,
        "web",
        &[
            "--listen",
            "tcp://127.0.0.1:8080",
            "--",
            &path(example_server()),
        ],
    );
    let load = HttpLoad::start("127.0.0.1:8080", false, 10_000_000);
    let pid = env.status()["supervisors"]["web"]["generations"][0]["pid"]
        .as_u64()
        .unwrap();
    // A crash: what the process had accepted dies with it, but the socket stays with the
    // supervisor, so connections queue until the restart and none is refused.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + patience();
    loop {
        let status = env.status();
        let g = &status["supervisors"]["web"]["generations"][0];
        if g["restarts"] == 1 && g["pid"].as_u64() != Some(pid) && g["state"] == "active" {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let report = load.stop();
    assert!(report.failed <= 1, "{:?}", report.failures);
    assert!(
        report.failures.iter().all(|f| !f.contains("refused")),
        "{report:?}"
    );
    assert!(
        report.replies.len() == 2,
        "served by the first process, then by the restarted one: {report:?}"
    );
    assert_eq!(env.status()["supervisors"]["web"]["restarts"], 1);
}

fn bad_run_and_upgrade_arguments_are_refused(backend: &str) {
    let env = TestEnv::with_backend("run-bad", backend);
    let hello = path(example_server());
    let refused = |args: &[&str], needle: &str| {
        let line = env.fails(args);
        assert!(line.contains(needle), "{args:?}: {line}");
    };
    refused(&["upgrade", "nope"], "not run by `hotswap run`");
    refused(&["rollback", "nope"], "not run by `hotswap run`");
    refused(
        &[
            "run",
            "web",
            "--listen",
            "tcp://127.0.0.1:8080",
            "--",
            "no-such-command-xyz",
        ],
        "command not found: no-such-command-xyz",
    );
    refused(
        &[
            "run",
            "web",
            "--listen",
            "tcp://localhost:8080",
            "--",
            &hello,
        ],
        "invalid listen address",
    );
    refused(
        &[
            "run",
            "web",
            "--listen",
            "tcp://127.0.0.1:8080",
            "--grace",
            "5",
            "--",
            &hello,
        ],
        "invalid duration",
    );
    refused(
        &[
            "run",
            "web",
            "--listen",
            "tcp://127.0.0.1:8080",
            "--drain-settle",
            "soon",
            "--",
            &hello,
        ],
        "invalid value 'soon' for '--drain-settle",
    );
    refused(
        &[
            "run",
            "web",
            "--listen",
            "tcp://127.0.0.1:8080",
            "--drain-settle",
            "15s",
            "--",
            &hello,
        ],
        "--drain-settle (15s) must be under half of --drain-timeout (30s)",
    );
    refused(
        &[
            "run",
            "web",
            "--listen",
            "tcp://127.0.0.1:8080",
            "--drain-signal",
            "SIGFOO",
            "--",
            &hello,
        ],
        "invalid signal",
    );
    // A deadline past the clock's range once panicked after the switch.
    refused(
        &[
            "run",
            "web",
            "--listen",
            "tcp://127.0.0.1:8080",
            "--drain-timeout",
            "500years",
            "--",
            &hello,
        ],
        "is too long: at most 7 days",
    );
    refused(
        &[
            "run",
            "web",
            "--listen",
            "tcp://127.0.0.1:8080",
            "--ready",
            "http",
            "--",
            &hello,
        ],
        "invalid readiness",
    );
    refused(
        &[
            "run",
            "Web",
            "--listen",
            "tcp://127.0.0.1:8080",
            "--",
            &hello,
        ],
        "invalid service name",
    );
    // Nothing was bound by the refused runs.
    assert_eq!(env.status()["services"], serde_json::json!([]));
    let _service = RunningService::start(
        &env,
        "web",
        &["--listen", "tcp://127.0.0.1:8080", "--", &hello],
    );
    // SIGHUP does not kill the supervisor (its default action would, draining nothing).
    let pid = env.status()["supervisors"]["web"]["pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(env.status()["supervisors"]["web"]["pid"], pid);
    refused(
        &["upgrade", "web", "--", "no-such-command-xyz"],
        "command not found",
    );
    refused(
        &[
            "run",
            "web",
            "--listen",
            "tcp://127.0.0.1:8080",
            "--",
            &hello,
        ],
        "already run by another",
    );
}

/// `--listen` on the unspecified address serves every address of its family, as `bind()`
/// does (the binding is 0.0.0.0/0 or ::/0), through an upgrade under load.
fn listening_on_the_unspecified_address_serves_every_address(backend: &str) {
    let env = TestEnv::with_backend("listen-any", backend);
    let example = path(example_server());
    let _web = RunningService::start(
        &env,
        "web",
        &[
            "--listen",
            "tcp://0.0.0.0:8080",
            "--listen",
            "udp://0.0.0.0:5353",
            "--ready",
            "notify",
            "--grace",
            "20ms",
            "--",
            &example,
        ],
    );
    let _web6 = RunningService::start(
        &env,
        "web6",
        &[
            "--listen",
            "tcp://[::]:8081",
            "--ready",
            "notify",
            "--grace",
            "20ms",
            "--",
            &example,
        ],
    );
    for addr in ["127.0.0.1:8080", "127.0.0.2:8080", "[::1]:8081"] {
        assert!(
            integration_tests::tcp_http_body(addr).starts_with("generation 1"),
            "{addr}"
        );
    }
    assert!(integration_tests::udp_request("127.0.0.2:5353")
        .unwrap()
        .starts_with("generation 1"));
    let load = HttpLoad::start("127.0.0.2:8080", false, 10_000_000);
    upgrade(&env, &["web"]);
    upgrade(&env, &["web6"]);
    let load = load.stop();
    assert_eq!(load.failed, 0, "{:?}", load.failures);
    assert!(integration_tests::tcp_http_body("127.0.0.1:8080").starts_with("generation 2"));
    assert!(integration_tests::tcp_http_body("[::1]:8081").starts_with("generation 2"));
    assert!(integration_tests::udp_request("127.0.0.2:5353")
        .unwrap()
        .starts_with("generation 2"));
    let status = env.ok(&["status"]);
    for binding in [
        "bind tcp 0.0.0.0/0 8080",
        "bind udp 0.0.0.0/0 5353",
        "bind tcp ::/0 8081",
    ] {
        assert!(status.contains(binding), "{binding}\n{status}");
    }
}

/// The old generation gets its drain signal once `--drain-settle` has passed since the
/// switch: counted from the switch, the settle overlaps the grace period instead of following
/// it. sk_lookup only: in uds the queue is shared, so there is nothing to settle.
#[test]
fn the_drain_signal_waits_for_the_settle_time_counted_from_the_switch() {
    use std::io::BufRead as _;
    let env = TestEnv::with_backend("drain-settle", "sk-lookup");
    let _service = RunningService::start(
        &env,
        "web",
        &[
            "--listen",
            "tcp://127.0.0.1:8080",
            "--ready",
            "notify",
            "--grace",
            "2s",
            "--drain-settle",
            "3s",
            "--",
            &path(example_server()),
        ],
    );
    let mut upgrade = std::process::Command::new(integration_tests::hotswap_bin())
        .args(["upgrade", "web"])
        .env("HOTSWAP_SOCKET", &env.socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (mut switched, mut signalled) = (None, None);
    let mut output = String::new();
    for line in std::io::BufReader::new(upgrade.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains("switched 1 -> 2") {
            switched = Some(Instant::now());
        }
        if line.contains("queue drained; sent SIGTERM") {
            signalled = Some(Instant::now());
        }
        output.push_str(&line);
        output.push('\n');
    }
    assert!(upgrade.wait().unwrap().success(), "{output}");
    let after = signalled.expect(&output) - switched.expect(&output);
    // At least the settle; well under grace + settle (5 s), which it would be if it followed
    // the grace period.
    assert!(after >= Duration::from_millis(2500), "{after:?}\n{output}");
    assert!(after < Duration::from_millis(4500), "{after:?}\n{output}");
}

integration_tests::for_every_backend!(
    hundred_upgrades_of_the_example_server_lose_nothing,
    hundred_upgrades_of_a_server_that_closes_its_listener_on_sigterm_lose_nothing,
    hundred_upgrades_of_a_server_that_shuts_its_listener_down_on_sigterm,
    a_server_that_shuts_its_listener_down_and_crashes_is_restarted_on_a_listening_socket,
    udp_datagrams_during_upgrades_are_answered_exactly_once,
    failed_upgrades_keep_the_old_generation,
    rollback_and_concurrent_upgrades,
    stopping_during_an_upgrade_leaves_nothing_behind,
    a_generation_that_dies_on_its_own_is_restarted,
    bad_run_and_upgrade_arguments_are_refused,
    listening_on_the_unspecified_address_serves_every_address,
);
