//! Operators who are not root: a service owned by a group is managed end to end by a member of
//! that group (bind, run, upgrade, rollback, status), who is refused on every service they do
//! not own and on everything beyond what an unprivileged process could do itself. Every
//! operator here is uid 64100 (`setpriv`), in group 64000 — numbers no account on the host has,
//! so nothing depends on the host's users.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    patience, tcp_http_body, unprivileged_copy_of_hotswap, workspace_bin, Server, TestEnv,
};

const OPERATOR: u32 = 64100;
const GROUP: u32 = 64000;
const STRANGER: u32 = 64200;

/// A daemon whose socket group is [`GROUP`], with the binaries copied where uid 64100 may run
/// them, and a run dir that uid 64100 owns.
struct Operators {
    env: TestEnv,
    hotswap: PathBuf,
    fixture: PathBuf,
    run_dir: PathBuf,
}

impl Operators {
    fn new(name: &str, backend: &str) -> Self {
        let mut env = TestEnv::new(name);
        env.backend = Some(backend.to_owned());
        let hotswap = unprivileged_copy_of_hotswap(env.dir.path());
        let fixture = hotswap.with_file_name("hotswap-test-activated");
        std::fs::copy(workspace_bin("hotswap-test-activated"), &fixture).unwrap();
        std::fs::set_permissions(&fixture, std::fs::Permissions::from_mode(0o755)).unwrap();
        env.socket = env.dir.path().join("hotswap").join("hotswap.sock");
        env.daemon_args = vec!["--socket-group".into(), GROUP.to_string()];
        env.start_daemon();
        let run_dir = env.dir.path().join("operator-run");
        std::fs::create_dir(&run_dir).unwrap();
        std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        nix::unistd::chown(
            &run_dir,
            Some(nix::unistd::Uid::from_raw(OPERATOR)),
            Some(nix::unistd::Gid::from_raw(GROUP)),
        )
        .unwrap();
        Self {
            env,
            hotswap,
            fixture,
            run_dir,
        }
    }

    /// `hotswap ARGS` as `uid`, a member of `groups`.
    fn command_as(&self, uid: u32, groups: &[u32], args: &[&str]) -> Command {
        let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
        let mut command = Command::new("setpriv");
        command
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"));
        if groups.is_empty() {
            command.arg("--clear-groups");
        } else {
            command.arg(format!("--groups={}", groups.join(",")));
        }
        command
            .arg("--")
            .arg(&self.hotswap)
            .args(args)
            .env("HOTSWAP_SOCKET", &self.env.socket)
            .env("HOTSWAP_RUN_DIR", &self.run_dir)
            .env_remove("XDG_RUNTIME_DIR");
        command
    }

    /// As root: `web` on 127.0.0.1:8080, owned by [`GROUP`].
    fn bind_web_for_the_group(&self) {
        let group = GROUP.to_string();
        self.env.ok(&[
            "bind",
            "web",
            "tcp",
            "127.0.0.1/32",
            "8080",
            "--owner-group",
            &group,
        ]);
    }

    fn as_operator(&self, args: &[&str]) -> Output {
        self.command_as(OPERATOR, &[GROUP], args)
            .output()
            .expect("setpriv (util-linux) runs")
    }

    /// As the operator, `args` must succeed; returns stdout.
    fn operator_ok(&self, args: &[&str]) -> String {
        let out = self.as_operator(args);
        assert!(
            out.status.success(),
            "operator: hotswap {args:?}: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.env.daemon_log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// As the operator, `args` must fail with one line saying permission denied and who may;
    /// returns the line.
    fn operator_refused(&self, args: &[&str], who_may: &str) -> String {
        let out = self.as_operator(args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            !out.status.success(),
            "operator: hotswap {args:?} succeeded"
        );
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains("permission denied") && stderr.contains(who_may),
            "{args:?}: expected {who_may:?} in: {stderr}"
        );
        stderr
    }

    fn operator_status(&self) -> serde_json::Value {
        serde_json::from_str(&self.operator_ok(&["status", "--json"])).unwrap()
    }

    /// `hotswap run web …` as the operator, until its first generation is active.
    fn run_web(&self) -> Supervisor {
        let log = self.env.dir.path().join("operator-run.log");
        let fixture = self.fixture.to_str().unwrap();
        let child = self
            .command_as(
                OPERATOR,
                &[GROUP],
                &[
                    "run",
                    "web",
                    "--listen",
                    "tcp://127.0.0.1:8080",
                    // Long enough to roll back within.
                    "--grace",
                    "5s",
                    "--",
                    fixture,
                ],
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut supervisor = Supervisor { child, log };
        let deadline = Instant::now() + patience();
        while self.operator_status()["supervisors"]["web"]["active"]
            .as_u64()
            .is_none()
        {
            if let Some(status) = supervisor.child.try_wait().unwrap() {
                panic!(
                    "operator's hotswap run exited {status}:\n{}",
                    supervisor.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "never active:\n{}",
                supervisor.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        supervisor
    }
}

struct Supervisor {
    child: Child,
    log: PathBuf,
}

impl Supervisor {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn fixture_pid(body: &str) -> u32 {
    body.split_whitespace()
        .nth(2)
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("not a fixture's answer: {body:?}"))
}

/// The operator manages `web` end to end and is refused on `api`, which root alone owns; the
/// refusals say who may. `status` shows the operator only `web`; root sees both.
fn an_operator_in_the_owning_group_manages_web_and_nothing_else(backend: &str) {
    let ops = Operators::new("operators", backend);
    let env = &ops.env;
    ops.bind_web_for_the_group();
    env.ok(&["bind", "api", "tcp", "127.0.0.1/32", "9090"]);

    // Bind and unbind on web, as an unprivileged process could bind (UDP: the uds and
    // reuseport backends give a service one address per protocol).
    ops.operator_ok(&["bind", "web", "udp", "127.0.0.1/32", "8081"]);
    ops.operator_ok(&["unbind", "web", "udp", "127.0.0.1/32", "8081"]);

    // Run, upgrade, rollback.
    let _web = ops.run_web();
    let first = fixture_pid(&tcp_http_body("127.0.0.1:8080"));
    // An upgrade waits in its grace period, in which the operator rolls it back.
    let upgrade = ops
        .command_as(OPERATOR, &[GROUP], &["upgrade", "web"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + patience();
    while ops.operator_status()["supervisors"]["web"]["active"] != 2 {
        assert!(Instant::now() < deadline, "the upgrade never switched");
        std::thread::sleep(Duration::from_millis(10));
    }
    // (On uds both generations take connections from the shared socket until one drains.)
    if backend != "uds" {
        let second = fixture_pid(&tcp_http_body("127.0.0.1:8080"));
        assert_ne!(first, second, "the upgrade switched");
    }
    let out = ops.operator_ok(&["rollback", "web"]);
    assert!(out.contains("switched 2 -> 1"), "{out}");
    let upgrade = upgrade.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&upgrade.stderr).contains("rolled back to generation 1"),
        "{upgrade:?}"
    );
    assert_eq!(fixture_pid(&tcp_http_body("127.0.0.1:8080")), first);

    // The operator sees web alone; root sees both.
    let status = ops.operator_status();
    let names: Vec<&str> = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web"], "{status}");
    assert_eq!(status["services"][0]["owner"]["gid"], GROUP);
    if backend == "sk-lookup" {
        // (The other backends count nothing.)
        let metrics: serde_json::Value =
            serde_json::from_str(&ops.operator_ok(&["metrics", "--json"])).unwrap();
        assert_eq!(metrics.as_array().map(Vec::len), Some(1), "{metrics}");
    }
    let text = ops.operator_ok(&["status"]);
    assert!(!text.contains("service api"), "{text}");
    assert_eq!(env.status()["services"].as_array().unwrap().len(), 2);

    // Not api, not owners, not new services.
    let root_only = "only root (the service has no owner) may";
    ops.operator_refused(&["bind", "api", "tcp", "127.0.0.1/32", "9091"], root_only);
    ops.operator_refused(&["unbind", "api", "tcp", "127.0.0.1/32", "9090"], root_only);
    ops.operator_refused(&["switch", "api", "1"], root_only);
    ops.operator_refused(
        &["chown", "web", "--owner-user", &OPERATOR.to_string()],
        "may not give services owners: only root may",
    );
    ops.operator_refused(
        &["bind", "db", "tcp", "127.0.0.1/32", "5432"],
        "may not create services: only root may",
    );
    ops.operator_refused(
        &["bind", "web", "tcp", "127.0.0.1/32", "80"],
        "only root may steer it",
    );
    ops.operator_refused(
        &["bind", "web", "tcp", "127.0.0.1/32", "0"],
        "is on every port",
    );
    // …nor connections another service's binding is there for (where the backend listens
    // for api itself, its socket is the reason given).
    ops.operator_refused(
        &["bind", "web", "tcp", "127.0.0.0/8", "9090"],
        if backend != "uds" {
            "of service api: only root may steer connections another service takes"
        } else {
            "a socket of root (uid 0) takes tcp connections on 127.0.0.1:9090"
        },
    );
    // A port another user's server listens on is not the operator's to take.
    let root_server = Server::start("tcp", "127.0.0.1:8082", "root's");
    ops.operator_refused(
        &["bind", "web", "tcp", "127.0.0.1/32", "8082"],
        "a socket of root (uid 0) takes tcp connections on 127.0.0.1:8082",
    );
    // …nor another user's process's socket a generation.
    ops.operator_refused(
        &[
            "register",
            "web",
            "--pid",
            &root_server.pid.to_string(),
            "--fd",
            &root_server.fd.to_string(),
        ],
        &format!("process {} runs as root (uid 0)", root_server.pid),
    );

    // Root gives web to the operator's uid alone: the group's members lose it.
    env.ok(&["chown", "web", "--owner-user", &OPERATOR.to_string()]);
    let stranger = ops
        .command_as(STRANGER, &[GROUP], &["switch", "web", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&stranger.stderr);
    assert!(
        !stranger.status.success()
            && stderr.contains(&format!(
                "uid {STRANGER} may not change service web: only root and user uid {OPERATOR} may"
            )),
        "{stderr}"
    );
    // Someone outside the socket group cannot even connect.
    let outsider = ops.command_as(STRANGER, &[], &["status"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&outsider.stderr);
    assert!(
        !outsider.status.success() && stderr.contains("permission denied on control socket"),
        "{stderr}"
    );
    let log = env.daemon_log();
    assert!(!log.contains("panicked"), "{log}");
}

integration_tests::for_every_backend!(an_operator_in_the_owning_group_manages_web_and_nothing_else);

/// The socket group's members can reach the control socket and nothing else in its directory:
/// it is 0710 root:group, the socket 0660, and the daemon's lock and state stay 0600.
#[test]
fn the_socket_group_reaches_the_socket_and_nothing_beside_it() {
    use std::os::unix::fs::MetadataExt as _;
    let ops = Operators::new("socket-group", "uds");
    let dir = ops.env.socket.parent().unwrap();
    let meta = |path: &Path| std::fs::metadata(path).unwrap();
    assert_eq!(meta(dir).mode() & 0o7777, 0o710);
    assert_eq!(meta(dir).gid(), GROUP);
    assert_eq!(meta(&ops.env.socket).mode() & 0o777, 0o660);
    assert_eq!(meta(&ops.env.socket).gid(), GROUP);
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path != ops.env.socket {
            assert_eq!(
                meta(&path).mode() & 0o077,
                0,
                "{} is open to others",
                path.display()
            );
        }
    }
    let listing = ops
        .command_as(OPERATOR, &[GROUP], &["status"])
        .output()
        .unwrap();
    assert!(listing.status.success());
    let ls = Command::new("setpriv")
        .args([
            &format!("--reuid={OPERATOR}"),
            &format!("--regid={OPERATOR}"),
            &format!("--groups={GROUP}"),
            "--",
            "ls",
        ])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        !ls.status.success(),
        "the group could list {}",
        dir.display()
    );
}

/// Owners outlive a daemon restart; state pinned before owners existed (no `HS_OWNERS` map)
/// is adopted as it is, the service root's alone, and steering never stops.
#[test]
fn owners_outlive_the_daemon_and_older_state_is_adopted_as_roots() {
    let mut ops = Operators::new("owners-kept", "sk-lookup");
    ops.bind_web_for_the_group();
    let server = Server::start("tcp", "127.0.0.1:0", "web");
    ops.env.register("web", &server, &["--activate"]);
    let owner = |ops: &Operators| ops.env.status()["services"][0]["owner"].clone();
    assert_eq!(owner(&ops)["gid"], GROUP);

    ops.env.stop_daemon(nix::sys::signal::Signal::SIGKILL);
    ops.env.start_daemon();
    assert_eq!(owner(&ops)["gid"], GROUP, "kept across a restart");
    ops.operator_ok(&["switch", "web", "1"]);

    // What a daemon from before owners left: the same maps, without HS_OWNERS.
    ops.env.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    std::fs::remove_file(ops.env.pin_dir.join("HS_OWNERS")).unwrap();
    assert_eq!(
        integration_tests::tcp_request("127.0.0.1:8080").unwrap(),
        "web"
    );
    ops.env.start_daemon();
    assert!(owner(&ops).is_null(), "{}", ops.env.status());
    assert!(ops.env.pin_dir.join("HS_OWNERS").exists());
    assert_eq!(
        integration_tests::tcp_request("127.0.0.1:8080").unwrap(),
        "web"
    );
    ops.operator_refused(
        &["switch", "web", "1"],
        "only root (the service has no owner) may",
    );
}

/// An operator's supervisor killed with SIGKILL leaves its generation serving, and the
/// operator's next `hotswap run` adopts it: the faults root's supervisors survive, an
/// operator's survive too.
#[test]
fn an_operators_supervisor_killed_is_adopted_by_the_next() {
    let ops = Operators::new("operator-kill", "sk-lookup");
    ops.bind_web_for_the_group();
    let mut first = ops.run_web();
    let serving = fixture_pid(&tcp_http_body("127.0.0.1:8080"));
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert_eq!(fixture_pid(&tcp_http_body("127.0.0.1:8080")), serving);
    let second = ops.run_web();
    assert_eq!(fixture_pid(&tcp_http_body("127.0.0.1:8080")), serving);
    assert!(second.log().contains("adopted"), "{}", second.log());
    let status = ops.operator_status();
    assert_eq!(status["supervisors"]["web"]["active"], 1, "{status}");
}

/// What the operator's own process says to the daemon when it asks for probe routes itself:
/// one line per request, the refusal's code and message or "done". Python, so the requests
/// are made by hand, as a process of the operator's would.
const PROBE_ASKER: &str = r#"
import json, socket, struct, sys
version, control, service = int(sys.argv[1]), sys.argv[2], sys.argv[3]
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(control)
def probe(source, sock=None):
    body = {"verb": "probe", "service": service, "generation": 1, "source": source}
    if sock is not None:
        body["socket"] = sock.fileno()
    frame = json.dumps({"version": version, "body": body}).encode()
    conn.sendall(struct.pack(">I", len(frame)) + frame)
    (n,) = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))
    answer = json.loads(conn.recv(n, socket.MSG_WAITALL))["body"]
    print(answer["Err"]["code"] + " " + answer["Err"]["message"] if "Err" in answer else "done", flush=True)
def bound(reuse=False):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if reuse:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s
def source(s, port_offset=0):
    host, port = s.getsockname()
    return f"{host}:{port + port_offset}"
probe("127.0.0.1:40000")
probe("192.0.2.1:40000", bound())
shared = bound(reuse=True)
probe(source(shared), shared)
other = bound()
probe(source(other, 1), other)
mine = bound()
probe(source(mine), mine)
probe(source(bound()), bound())
"#;

/// An operator's probe routes carry only their own connections: a route is granted only from
/// a loopback address and port held by a socket of the operator's own process (not shared,
/// not connected), one per control connection. Without that, any source — another user's
/// client, a remote host — could be routed to the operator's generation.
#[test]
fn an_operators_probe_routes_carry_only_their_own_connections() {
    let ops = Operators::new("operator-probes", "sk-lookup");
    ops.bind_web_for_the_group();
    let _web = ops.run_web();
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={OPERATOR}"),
            &format!("--regid={OPERATOR}"),
            &format!("--groups={GROUP}"),
            "--",
            // Debian's (`cargo xtask test` installs it): the operator cannot reach root's.
            "/usr/bin/python3",
            "-c",
            PROBE_ASKER,
            &hotswap::protocol::PROTOCOL_VERSION.to_string(),
        ])
        .arg(&ops.env.socket)
        .arg("web")
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<&str> = stdout.lines().collect();
    let expected = [
        "no socket was passed",
        "not a loopback address",
        "the socket shares its port",
        "the socket is not bound to that address and port",
        "done",
        "an owner routes one probe per control connection",
    ];
    assert_eq!(answers.len(), expected.len(), "{stdout}");
    for (answer, expected) in answers.iter().zip(expected) {
        assert!(answer.contains(expected), "expected {expected:?}: {answer}");
        if expected != "done" {
            assert!(answer.starts_with("permission_denied "), "{answer}");
        }
    }
    // The routes ended with the connection; web still serves.
    fixture_pid(&tcp_http_body("127.0.0.1:8080"));
}
