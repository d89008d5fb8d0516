//! A generation is its whole process tree: killing or retiring it ends every process it
//! started, and the supervisor collects the orphans it inherits.

use integration_tests::{activated_fixture, wait_until, RunningService, TestEnv};

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

/// `hotswap run web` of a server whose main process starts a worker that outlives it: `sh`
/// starts `sleep SECONDS` in the background and becomes the fixture (with `fixture_flags`).
/// The worker's command line is unique to the test; returns the service and the worker's pid.
fn forking_service(
    env: &TestEnv,
    worker_seconds: &str,
    fixture_flags: &str,
    run_options: &[&str],
) -> (RunningService, u32) {
    let script = format!(
        "sleep {worker_seconds} & exec {} {fixture_flags}",
        activated_fixture().display()
    );
    let mut args = vec!["--listen", "tcp://127.0.0.1:8080", "--grace", "50ms"];
    args.extend_from_slice(run_options);
    args.extend_from_slice(&["--", "sh", "-c", &script]);
    let service = RunningService::start(env, "web", &args);
    let worker = ["sleep", worker_seconds];
    wait_until("the worker", || processes(&worker).len() == 1);
    (service, processes(&worker)[0])
}

#[test]
fn a_drained_generation_leaves_no_process_behind() {
    let env = TestEnv::with_daemon("tree-drain");
    let (_service, first_worker) = forking_service(&env, "1001", "", &[]);
    let out = env.ok(&["upgrade", "web"]);
    assert!(out.contains("is active"), "{out}");
    // The old main process exited at its drain signal; its worker is gone too, and collected.
    wait_until("the old worker to be gone", || !exists(first_worker));
    assert_eq!(
        processes(&["sleep", "1001"]).len(),
        1,
        "the new generation's worker lives"
    );
}

#[test]
fn a_generation_killed_past_its_drain_timeout_takes_its_workers_with_it() {
    let env = TestEnv::with_daemon("tree-kill");
    let (_service, first_worker) = forking_service(
        &env,
        "1002",
        "--ignore-term",
        &["--drain-timeout", "1s", "--drain-settle", "100ms"],
    );
    let out = env.ok(&["upgrade", "web"]);
    assert!(out.contains("is active"), "{out}");
    wait_until("the old worker to be gone", || !exists(first_worker));
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
    wait_until("the never-ready generation's processes to be gone", || {
        processes(&["sleep", "1003"]).is_empty() && processes(&["sleep", "1004"]).is_empty()
    });
}

#[test]
fn stopping_hotswap_run_ends_every_generation_tree() {
    let env = TestEnv::with_daemon("tree-stop");
    let (mut service, worker) = forking_service(&env, "1005", "", &[]);
    let status = service.stop();
    assert!(status.success(), "{status}\n{}", service.log());
    wait_until("the worker to be gone", || !exists(worker));
}
