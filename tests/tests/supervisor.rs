//! The supervisor is never the weak link: `kill -9` of `hotswap run` and its re-exec in place
//! lose nothing, a daemon killed or stopped at any step of an upgrade leaves one active
//! generation that the kernel and `status` agree on, and servers that talk to their notify
//! socket all their life (or drop privileges first) upgrade normally. On the real kernel,
//! under load, for every backend.

use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt as _,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use integration_tests::{
    activated_fixture, example_server, hotswap_bin, hotswap_command, patience,
    processes_in_this_netns, rounds, HttpLoad, RunningService, TestEnv,
};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// The pids of the service's live generations, by id.
fn generation_pids(env: &TestEnv) -> Vec<(u64, u64)> {
    let status = env.status();
    status["supervisors"]["web"]["generations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["state"] == "active" || g["state"] == "ready")
        .map(|g| (g["id"].as_u64().unwrap(), g["pid"].as_u64().unwrap_or(0)))
        .collect()
}

fn assert_no_failures(
    fresh: &integration_tests::LoadReport,
    kept: &integration_tests::LoadReport,
    log: &str,
) {
    assert_eq!(
        fresh.failed, 0,
        "new connections failed: {:?}\n{log}",
        fresh.failures
    );
    assert_eq!(
        kept.failed, 0,
        "keep-alive requests failed: {:?}\n{log}",
        kept.failures
    );
    assert!(fresh.served() > 0 && kept.served() > 0);
}

fn run_args(fixture_args: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--listen",
        "tcp://127.0.0.1:8080",
        "--ready",
        "notify",
        "--grace",
        "50ms",
        "--drain-timeout",
        "10s",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(path(&activated_fixture()));
    args.extend(fixture_args.iter().map(|s| s.to_string()));
    args
}

fn twenty_kills_of_the_supervisor_lose_nothing(backend: &str) {
    let env = TestEnv::with_backend("sup-kill", backend);
    let args = run_args(&["--notify"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut service = RunningService::start(&env, "web", &args);
    let fresh = HttpLoad::start("127.0.0.1:8080", false, 10_000_000);
    let kept = HttpLoad::start("127.0.0.1:8080", true, 10_000_000);
    let pids = generation_pids(&env);
    let count = rounds(20);
    let mut log = String::new();
    for round in 0..count {
        service.kill();
        // A while with no supervisor at all: the generation serves on.
        std::thread::sleep(Duration::from_millis(50));
        service = RunningService::start(&env, "web", &args);
        let status = env.status();
        assert_eq!(generation_pids(&env), pids, "round {round}: {status}");
        let adopted = &status["supervisors"]["web"]["adopted"];
        assert_eq!(
            adopted[0].as_u64(),
            Some(pids[0].0),
            "round {round}: {status}"
        );
        log = service.log();
    }
    // The adopted generation upgrades like any other.
    let out = env.ok(&["upgrade", "web"]);
    assert!(out.contains("is active"), "{out}\n{}", service.log());
    std::thread::sleep(Duration::from_millis(100));
    let (fresh, kept) = (fresh.stop(), kept.stop());
    println!(
        "{backend}: {count} kill -9s of the supervisor: {} + {} served, {} + {} failed",
        fresh.served(),
        kept.served(),
        fresh.failed,
        kept.failed
    );
    assert_no_failures(&fresh, &kept, &log);
    assert_ne!(generation_pids(&env), pids);
}

/// Replaces the file at `installed` with a new copy of the hotswap binary (a new inode, as a
/// package upgrade makes).
fn install_hotswap(installed: &Path) -> u64 {
    let fresh = installed.with_extension("new");
    std::fs::copy(hotswap_bin(), &fresh).unwrap();
    std::fs::rename(&fresh, installed).unwrap();
    std::fs::metadata(installed).unwrap().ino()
}

fn twenty_self_upgrades_of_the_supervisor_lose_nothing(backend: &str) {
    let env = TestEnv::with_backend("sup-reexec", backend);
    let installed = env.dir.path().join("hotswap");
    install_hotswap(&installed);
    let args = run_args(&["--notify"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let service = RunningService::start_from(&env, &installed, "web", &args, |_| {});
    let supervisor = service.pid();
    let fresh = HttpLoad::start("127.0.0.1:8080", false, 10_000_000);
    let kept = HttpLoad::start("127.0.0.1:8080", true, 10_000_000);
    let pids = generation_pids(&env);
    let count = rounds(20);
    for round in 0..count {
        let inode = install_hotswap(&installed);
        let before = env.status()["supervisors"]["web"]["started_at_ms"].clone();
        if round % 2 == 0 {
            let out = env.ok(&["reexec", "web"]);
            assert!(out.contains("generations kept"), "{out}");
        } else {
            // systemd's ExecReload.
            kill(Pid::from_raw(supervisor as i32), Signal::SIGHUP).unwrap();
        }
        let deadline = Instant::now() + patience();
        loop {
            let status = env.status();
            let started = &status["supervisors"]["web"]["started_at_ms"];
            if !started.is_null() && *started != before {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: no new image\n{}",
                service.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = env.status();
        assert_eq!(
            status["supervisors"]["web"]["pid"], supervisor as u64,
            "{status}"
        );
        assert_eq!(generation_pids(&env), pids, "round {round}: {status}");
        // The new binary runs: the process's image is the file installed just now.
        let image = std::fs::metadata(format!("/proc/{supervisor}/exe"))
            .unwrap()
            .ino();
        assert_eq!(image, inode, "round {round}");
    }
    let out = env.ok(&["upgrade", "web"]);
    assert!(out.contains("is active"), "{out}");
    std::thread::sleep(Duration::from_millis(100));
    let (fresh, kept) = (fresh.stop(), kept.stop());
    println!(
        "{backend}: {count} self-upgrades of the supervisor: {} + {} served, {} + {} failed",
        fresh.served(),
        kept.served(),
        fresh.failed,
        kept.failed
    );
    assert_no_failures(&fresh, &kept, &service.log());
}

/// Where in an upgrade the daemon is killed.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// While the new generation gets ready (before the switch).
    Readiness,
    /// After the switch, in the grace period.
    Grace,
    /// While the old generation drains.
    Drain,
}

/// What is steered to, per the daemon, the supervisor and the kernel: all must agree.
fn one_active_generation(env: &TestEnv, what: &str) -> u64 {
    let deadline = Instant::now() + patience();
    loop {
        let status = env.status();
        let daemon_active = integration_tests::active_generations(&status);
        let supervisor = &status["supervisors"]["web"];
        let active = supervisor["active"].as_u64();
        let switches = status["backend"]["capabilities"]["switch"] == "yes";
        let agree = !switches || (daemon_active.len() == 1 && Some(daemon_active[0]) == active);
        if agree && supervisor["upgrading"].is_null() {
            let id = active.unwrap();
            let pid = supervisor["generations"]
                .as_array()
                .unwrap()
                .iter()
                .find(|g| g["id"] == id)
                .and_then(|g| g["pid"].as_u64())
                .unwrap();
            // The kernel steers to it: every answer comes from its process. (On a shared socket a
            // draining generation accepts too until it is gone: nothing to steer.)
            for _ in 0..(if switches { 5 } else { 0 }) {
                let body = integration_tests::tcp_http_body("127.0.0.1:8080");
                assert!(
                    body.contains(&format!("pid {pid} ")),
                    "{what}: {body} is not from {pid}: {status}"
                );
            }
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no single active generation: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Nothing but the daemon, the supervisor, and the active generation's process and keeper is
/// left in the namespace, once draining is over.
fn nothing_leaked(env: &TestEnv, service: &RunningService, what: &str) {
    let deadline = Instant::now() + patience();
    loop {
        let status = env.status();
        let supervisor = &status["supervisors"]["web"];
        let active = supervisor["active"].as_u64();
        let mut expected: BTreeSet<u32> = [env.daemon_pid().unwrap(), service.pid()].into();
        for g in supervisor["generations"].as_array().unwrap() {
            if g["id"].as_u64() == active {
                expected.insert(g["pid"].as_u64().unwrap() as u32);
                expected.insert(g["keeper"].as_u64().unwrap() as u32);
            }
        }
        let running: BTreeSet<u32> = processes_in_this_netns().into_iter().collect();
        let registered = status["services"][0]["generations"]
            .as_array()
            .unwrap()
            .len();
        if running == expected && registered == 1 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: running {running:?}, expected {expected:?}, {registered} registered: {status}\n{}",
            service.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn the_daemon_killed_at_each_step_of_an_upgrade_leaves_one_active_generation(backend: &str) {
    for step in [Step::Readiness, Step::Grace, Step::Drain] {
        let mut env = TestEnv::with_backend("sup-daemon-kill", backend);
        let grace = if matches!(step, Step::Grace) {
            "3s"
        } else {
            "50ms"
        };
        let (service, _) = slow_draining_service(&env, grace);
        let (upgrade, into) = upgrade_into(&env, step);
        std::thread::sleep(into);
        let phase = env.status()["supervisors"]["web"]["upgrade_phase"].clone();
        env.stop_daemon(Signal::SIGKILL);
        std::thread::sleep(Duration::from_millis(300));
        env.start_daemon();
        let finished = upgrade.wait_with_output().unwrap();
        let what = format!(
            "{backend}, daemon killed in {step:?} (phase {phase}): upgrade said {}{}",
            String::from_utf8_lossy(&finished.stdout),
            String::from_utf8_lossy(&finished.stderr)
        );
        let active = one_active_generation(&env, &what);
        nothing_leaked(&env, &service, &what);
        println!("{what}\n -> generation {active} active");
    }
}

/// `hotswap run` for the daemon-fault tests: a first generation that takes its whole drain
/// timeout (3 s) to go, and the grace period `grace`.
fn slow_draining_service(env: &TestEnv, grace: &str) -> (RunningService, Vec<String>) {
    let args: Vec<String> = [
        "--listen",
        "tcp://127.0.0.1:8080",
        "--ready",
        "delay:200ms",
        "--grace",
        grace,
        "--drain-timeout",
        "3s",
        "--",
        &path(&activated_fixture()),
        "--ignore-term",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let borrowed: Vec<&str> = args.iter().map(String::as_str).collect();
    (RunningService::start(env, "web", &borrowed), args)
}

/// `hotswap upgrade web` in the background, into `step` after the returned wait; the new
/// generation (the fixture again, without --ignore-term) readies in 2 s at `Step::Readiness`.
fn upgrade_into(env: &TestEnv, step: Step) -> (std::process::Child, Duration) {
    let mut upgrade = hotswap_command(env);
    upgrade.args(["upgrade", "web"]);
    if matches!(step, Step::Readiness) {
        upgrade.args(["--ready", "delay:2s"]);
    }
    let child = upgrade
        .args(["--", &path(&activated_fixture())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Readiness takes 2 s; grace starts ~200 ms in and lasts 3 s; the drain starts ~250 ms in
    // and lasts 3 s.
    let into = Duration::from_millis(match step {
        Step::Readiness => 700,
        Step::Grace => 1000,
        Step::Drain => 1200,
    });
    (child, into)
}

fn the_supervisor_killed_at_each_step_of_an_upgrade_is_adopted_consistently(backend: &str) {
    for step in [Step::Readiness, Step::Grace, Step::Drain] {
        let env = TestEnv::with_backend("sup-kill-step", backend);
        let grace = if matches!(step, Step::Grace) {
            "3s"
        } else {
            "50ms"
        };
        let (mut service, args) = slow_draining_service(&env, grace);
        let (upgrade, into) = upgrade_into(&env, step);
        std::thread::sleep(into);
        let phase = env.status()["supervisors"]["web"]["upgrade_phase"].clone();
        service.kill();
        let _ = upgrade.wait_with_output().unwrap();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let service = RunningService::start(&env, "web", &args);
        let what = format!("{backend}, supervisor killed in {step:?} (phase {phase})");
        let active = one_active_generation(&env, &what);
        // Not switched to yet: undone; switched: finished.
        let expected = if matches!(step, Step::Readiness) {
            1
        } else {
            2
        };
        assert_eq!(active, expected, "{what}\n{}", service.log());
        nothing_leaked(&env, &service, &what);
        println!("{what} -> generation {active} active");
    }
}

fn a_stopped_daemon_wedges_nothing(backend: &str) {
    let env = TestEnv::with_backend("sup-daemon-stop", backend);
    let mut service = RunningService::start(
        &env,
        "web",
        &[
            "--listen",
            "tcp://127.0.0.1:8080",
            "--ready",
            "notify",
            "--drain-timeout",
            "2s",
            "--",
            &path(&example_server()),
        ],
    );
    let daemon = Pid::from_raw(env.daemon_pid().unwrap() as i32);
    kill(daemon, Signal::SIGSTOP).unwrap();
    let mut upgrade = hotswap_command(&env)
        .args(["upgrade", "web"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // `status` answers within its deadline, with what the supervisor knows.
    let supervisor_status = || {
        let started = Instant::now();
        let out = hotswap_command(&env)
            .args(["status", "--json"])
            .output()
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "{:?}",
            started.elapsed()
        );
        assert!(
            !out.status.success(),
            "the daemon is stopped: status must say so"
        );
        let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            value["daemon_error"]
                .as_str()
                .unwrap()
                .contains("did not answer"),
            "{value}"
        );
        value["supervisors"]["web"].clone()
    };
    let report = supervisor_status();
    let pid = report["generations"][0]["pid"].as_u64().unwrap();
    // A crashing generation is restarted while the daemon is stopped.
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + patience();
    loop {
        let report = supervisor_status();
        let g = &report["generations"][0];
        if g["restarts"] == 1 && g["pid"].as_u64().is_some_and(|p| p != pid) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not restarted: {report}\n{}",
            service.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // SIGTERM stops it: the upgrade gives up, the generation drains, within the drain timeout
    // and the deadlines.
    let started = Instant::now();
    let status = service.stop();
    assert!(status.success(), "{status}\n{}", service.log());
    assert!(
        // The drain timeout, and a Forget the stopped daemon never answers (its deadline).
        started.elapsed() < Duration::from_secs(2 + 25),
        "stopping took {:?}\n{}",
        started.elapsed(),
        service.log()
    );
    kill(daemon, Signal::SIGCONT).unwrap();
    assert!(!upgrade.wait().unwrap().success());
    let left: Vec<u32> = processes_in_this_netns()
        .into_iter()
        .filter(|&p| p != daemon.as_raw() as u32)
        .collect();
    assert!(left.is_empty(), "left running: {left:?}\n{}", service.log());
}

fn servers_that_talk_to_their_notify_socket_all_their_life_upgrade_normally(backend: &str) {
    let env = TestEnv::with_backend("sup-notify", backend);
    let args = run_args(&["--notify", "--status-every", "10", "--drop-privileges"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let service = RunningService::start(&env, "web", &args);
    let fresh = HttpLoad::start("127.0.0.1:8080", false, 10_000_000);
    let count = rounds(10);
    for _ in 0..count {
        let out = env.ok(&["upgrade", "web"]);
        assert!(out.contains("is active"), "{out}\n{}", service.log());
    }
    // Its STATUS= reaches `status`, and it runs as nobody.
    let deadline = Instant::now() + patience();
    loop {
        let status = env.status();
        let active = status["supervisors"]["web"]["active"].as_u64();
        let g = status["supervisors"]["web"]["generations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["id"].as_u64() == active)
            .unwrap()
            .clone();
        let says = g["notify_status"].as_str().unwrap_or("").to_owned();
        if says.starts_with("served ") && says != "served 0" {
            let pid = g["pid"].as_u64().unwrap();
            let uid = std::fs::metadata(format!("/proc/{pid}")).unwrap().uid();
            assert_eq!(uid, 65534);
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = fresh.stop();
    assert_eq!(report.failed, 0, "{:?}\n{}", report.failures, service.log());
    assert!(
        !service.log().contains("not sent"),
        "a notify message was refused or blocked:\n{}",
        service.log()
    );
}

integration_tests::for_every_backend!(
    twenty_kills_of_the_supervisor_lose_nothing,
    twenty_self_upgrades_of_the_supervisor_lose_nothing,
    the_daemon_killed_at_each_step_of_an_upgrade_leaves_one_active_generation,
    the_supervisor_killed_at_each_step_of_an_upgrade_is_adopted_consistently,
    a_stopped_daemon_wedges_nothing,
    servers_that_talk_to_their_notify_socket_all_their_life_upgrade_normally,
);
