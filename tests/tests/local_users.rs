//! What another local user can do to hotswap: nothing. Each client here runs as uid 65534
//! (`setpriv`), as an unprivileged user on the host would.

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use integration_tests::{tcp_http_body, RunningService, TestEnv};

/// Runs `argv` as uid/gid 65534 with no supplementary groups.
fn as_nobody(argv: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(argv)
        .output()
        .expect("setpriv (util-linux) runs")
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// An environment whose control socket goes in a directory the daemon makes itself, below one
/// everybody may enter (as `/run` is), so what protects hotswap's state is hotswap's own doing.
fn env_with_socket_dir_made_by_hotswap(name: &str) -> TestEnv {
    let mut env = TestEnv::new(name);
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    env.socket = env.dir.path().join("hotswap").join("hotswap.sock");
    env.start_daemon();
    env
}

/// As uid 65534, `flock` on the pin dir, the daemon's lock and a supervisor's lock fails (they
/// cannot even be reached), every directory hotswap made is 0700 and every lock and socket
/// 0600; a daemon and a supervisor restarted afterwards start and serve as before.
#[test]
fn another_user_cannot_hold_a_lock_that_would_block_a_restart() {
    let mut env = env_with_socket_dir_made_by_hotswap("locks");
    let mut web = RunningService::fixture(&env, &[]);
    let socket_dir = env.socket.parent().unwrap().to_owned();
    let daemon_lock = socket_dir.join("hotswap.sock.lock");
    let run_lock = socket_dir.join("web.run.lock");
    let run_socket = socket_dir.join("web.run.sock");
    for dir in [
        &socket_dir,
        &env.pin_dir,
        &env.pin_dir.parent().unwrap().to_owned(),
    ] {
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
    }
    for file in [&daemon_lock, &run_lock, &env.socket, &run_socket] {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    let pin_dir = env.pin_dir.to_str().unwrap().to_owned();
    for lock in [
        pin_dir.as_str(),
        daemon_lock.to_str().unwrap(),
        run_lock.to_str().unwrap(),
    ] {
        let out = as_nobody(&["flock", "--nonblock", lock, "true"]);
        assert!(!out.status.success(), "uid 65534 locked {lock}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("Permission denied"), "{lock}: {stderr}");
    }
    let before = tcp_http_body("127.0.0.1:8080");
    env.stop_daemon(nix::sys::signal::Signal::SIGKILL);
    env.start_daemon();
    web.kill();
    let _web = RunningService::fixture(&env, &[]);
    assert_eq!(
        tcp_http_body("127.0.0.1:8080"),
        before,
        "the generation was adopted"
    );
}

/// The error a daemon that refused to start printed: one line, naming `needle`.
fn refused_start(env: &mut TestEnv, needle: &str) {
    let log = env.try_start_daemon().expect_err("the daemon started");
    let last = log.lines().last().unwrap_or_default();
    assert!(last.contains(needle), "expected {needle:?} in {log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// A world-writable sticky directory, as /tmp and a default bpffs are, in which uid 65534 made
/// `hotswap/` before the daemon first ran: the daemon refuses that directory, in one line,
/// rather than keep its state (or its socket) where another user decides.
#[test]
fn a_state_dir_another_user_made_first_is_refused() {
    let mut env = TestEnv::new("planted");
    let shared = env.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let planted = shared.join("hotswap");
    let out = as_nobody(&["mkdir", "-m", "0777", planted.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");

    env.socket = planted.join("hotswap.sock");
    refused_start(&mut env, "belongs to uid 65534");
    assert!(!env.socket.exists());

    // The same on bpffs: the pin dir's parent made by somebody else first.
    env.socket = env.dir.path().join("hotswap.sock");
    let bpffs_shared = PathBuf::from(format!(
        "/sys/fs/bpf/hotswap-planted-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&bpffs_shared).unwrap();
    std::fs::set_permissions(&bpffs_shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let planted_pins = bpffs_shared.join("hotswap");
    let out = as_nobody(&["mkdir", planted_pins.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    env.pin_dir = planted_pins.join("netns");
    env.backend = Some("sk-lookup".to_owned());
    refused_start(&mut env, "belongs to uid 65534");
    assert!(!env.pin_dir.exists(), "nothing was made in the planted dir");
    let _ = std::fs::remove_dir(&planted_pins);
    let _ = std::fs::remove_dir(&bpffs_shared);
}

/// A directory on the way that anybody may rename things in (0777, not sticky) is refused, and
/// so is a symbolic link where the state dir goes.
#[test]
fn a_state_dir_below_an_open_dir_or_through_a_symlink_is_refused() {
    let mut env = TestEnv::new("open-dir");
    let open = env.dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    env.socket = open.join("hotswap").join("hotswap.sock");
    refused_start(&mut env, "writable by other users");
    assert!(!open.join("hotswap").exists());

    let elsewhere = env.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let link = env.dir.path().join("link");
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    env.socket = link.join("hotswap.sock");
    refused_start(&mut env, "is a symbolic link");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}
