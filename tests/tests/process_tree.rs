//! A generation is its whole process tree: killing or retiring it ends every process it
//! started, and the supervisor collects the orphans it inherits.

use std::time::{Duration, Instant};

use integration_tests::{activated_fixture, patience, RunningService, TestEnv};

/// Pids of live (not zombie) processes whose command line is exactly `words`.
fn processes(words: &[&str]) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .collect();
        if args.len() == words.len() && args.iter().zip(words).all(|(a, w)| *a == w.as_bytes()) {
            found.push(pid);
        }
    }
    found
}

/// Whether `pid` exists at all (a zombie nobody collected counts: it exists).
fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + patience();
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A server whose main process starts a worker that outlives it: `sh` starts `sleep` in the
/// background and becomes the fixture. The worker's command line is unique to the test.
fn forking_server(worker_seconds: &str, extra: &str) -> String {
    format!(
        "sleep {worker_seconds} & exec {} {extra}",
        activated_fixture().display()
    )
}

#[test]
fn a_drained_generation_leaves_no_process_behind() {
    let env = TestEnv::with_daemon("tree-drain");
    let script = forking_server("1001", "");
    let _service = RunningService::start(
        &env,
        "web",
        &[
            "--listen",
            "tcp://127.0.0.1:8080",
            "--grace",
            "50ms",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    wait_for("the first worker", || {
        processes(&["sleep", "1001"]).len() == 1
    });
    let first_worker = processes(&["sleep", "1001"])[0];
    let out = env.ok(&["upgrade", "web"]);
    assert!(out.contains("is active"), "{out}");
    // The old main process exited at its drain signal; its worker is gone too, and collected.
    wait_for("the old worker to be gone", || !exists(first_worker));
    assert_eq!(
        processes(&["sleep", "1001"]).len(),
        1,
        "the new generation's worker lives"
    );
}

#[test]
fn a_generation_killed_past_its_drain_timeout_takes_its_workers_with_it() {
    let env = TestEnv::with_daemon("tree-kill");
    let script = forking_server("1002", "--ignore-term");
    let _service = RunningService::start(
        &env,
        "web",
        &[
            "--listen",
            "tcp://127.0.0.1:8080",
            "--grace",
            "50ms",
            "--drain-timeout",
            "1s",
            "--drain-settle",
            "100ms",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    wait_for("the first worker", || {
        processes(&["sleep", "1002"]).len() == 1
    });
    let first_worker = processes(&["sleep", "1002"])[0];
    let out = env.ok(&["upgrade", "web"]);
    assert!(out.contains("is active"), "{out}");
    wait_for("the old worker to be gone", || !exists(first_worker));
}

#[test]
fn a_generation_that_never_gets_ready_is_ended_whole() {
    let env = TestEnv::with_daemon("tree-notready");
    let _service = RunningService::fixture(&env, &[]);
    // Holds the socket, never accepts, and has a worker.
    let out = env.hotswap(&[
        "upgrade",
        "web",
        "--ready-timeout",
        "1s",
        "--",
        "sh",
        "-c",
        "sleep 1003 & exec sleep 1004",
    ]);
    assert!(!out.status.success(), "{out:?}");
    wait_for("the never-ready generation's processes to be gone", || {
        processes(&["sleep", "1003"]).is_empty() && processes(&["sleep", "1004"]).is_empty()
    });
}

#[test]
fn stopping_hotswap_run_ends_every_generation_tree() {
    let env = TestEnv::with_daemon("tree-stop");
    let script = forking_server("1005", "");
    let mut service = RunningService::start(
        &env,
        "web",
        &[
            "--listen",
            "tcp://127.0.0.1:8080",
            "--grace",
            "50ms",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    wait_for("the worker", || processes(&["sleep", "1005"]).len() == 1);
    let worker = processes(&["sleep", "1005"])[0];
    let status = service.stop();
    assert!(status.success(), "{status}\n{}", service.log());
    wait_for("the worker to be gone", || !exists(worker));
}
