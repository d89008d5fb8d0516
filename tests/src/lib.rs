//! Helpers for hotswap's privileged integration tests.
//!
//! Every test makes a [`TestEnv`]: the calling thread moves into a network namespace of its
//! own (loopback up), with its own bpffs pin directory and control socket, and the daemon and
//! servers it starts are its children, so they live in that namespace too. Nothing touches the
//! host's namespace, so tests run in parallel and leave nothing behind. A test that cannot get
//! the privileges it needs panics: it never passes silently.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::sched::{setns, unshare, CloneFlags};

/// How many times slower than a host this machine runs the tests: the kernel matrix sets
/// `HOTSWAP_TEST_SLOWDOWN` when it boots other kernels under software emulation.
fn slowdown() -> u32 {
    std::env::var("HOTSWAP_TEST_SLOWDOWN")
        .ok()
        .and_then(|d| d.parse::<u32>().ok())
        .filter(|d| *d > 0)
        .unwrap_or(1)
}

/// How long any wait in a test may take before it fails: 20 s, times the slowdown.
pub fn patience() -> Duration {
    Duration::from_secs(20) * slowdown()
}

/// `n` rounds of a test's loop, divided by the slowdown (at least one).
pub fn rounds(n: usize) -> usize {
    (n / slowdown() as usize).max(1)
}

/// A binary of the workspace, next to the test binaries: `target/<profile>/<name>`.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test binary> or target/<profile>/<binary> -> target/<profile>/<name>
    let mut dir = exe.parent().expect("binary in a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("deps has a parent");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// The `hotswap` binary (`cargo xtask test` builds it before the tests).
pub fn hotswap_bin() -> PathBuf {
    workspace_bin("hotswap")
}

/// The test server fixture binary (cargo builds it for this crate's integration tests).
pub fn server_bin() -> PathBuf {
    workspace_bin("hotswap-test-server")
}

fn bring_loopback_up() {
    // SAFETY: plain socket/ioctl calls on a zeroed ifreq naming "lo".
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(sock >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        assert_eq!(
            libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req),
            0,
            "SIOCGIFFLAGS: {}",
            std::io::Error::last_os_error()
        );
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(
            libc::ioctl(sock, libc::SIOCSIFFLAGS, &req),
            0,
            "SIOCSIFFLAGS: {}",
            std::io::Error::last_os_error()
        );
        libc::close(sock);
    }
}

/// Moves the calling thread into a fresh network namespace; moves it back on drop.
pub struct NetnsGuard {
    original: File,
}

impl NetnsGuard {
    /// Enters a new network namespace with loopback up. Panics, loudly, without privileges.
    pub fn enter() -> Self {
        let original = File::open("/proc/thread-self/ns/net").expect("open own netns");
        if let Err(err) = unshare(CloneFlags::CLONE_NEWNET) {
            panic!(
                "this test needs root (CAP_SYS_ADMIN, CAP_BPF, CAP_NET_ADMIN) to make a network \
                 namespace: unshare(CLONE_NEWNET) failed: {err}; run it with `cargo xtask test` as root"
            );
        }
        bring_loopback_up();
        Self { original }
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = setns(&self.original, CloneFlags::CLONE_NEWNET);
    }
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// Where test environments keep their control sockets and state: a tmpfs, as `/run` is where
/// hotswap runs for real. On a disk the daemon's fsync of its state file and a supervisor's
/// record replacements wait for writeback (measured here on ext4 with `discard`: the daemon in
/// `ext4_fsync_nojournal` for seconds under the lifecycle tests, requests unanswered for 10 s).
fn scratch_root() -> PathBuf {
    let tmpfs = std::fs::read_to_string("/proc/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|l| {
            l.split_whitespace().nth(1) == Some("/dev/shm")
                && l.split_whitespace().nth(2) == Some("tmpfs")
        })
    });
    if tmpfs {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    }
}

/// One test's private world: network namespace, pin dir, control socket, daemon.
pub struct TestEnv {
    /// Scratch directory (holds the control socket).
    pub dir: tempfile::TempDir,
    /// Control socket path.
    pub socket: PathBuf,
    /// bpffs state directory.
    pub pin_dir: PathBuf,
    /// The daemon's config file (`--config`): empty unless a test writes it, so no daemon of
    /// a test reads the host's /etc/hotswap.
    pub config: PathBuf,
    daemon: Option<Child>,
    daemon_log: PathBuf,
    /// `--backend` for the daemon; `None` for its default (auto).
    pub backend: Option<String>,
    /// More arguments for `hotswap daemon`.
    pub daemon_args: Vec<String>,
    _netns: NetnsGuard,
}

impl TestEnv {
    /// A new environment; the daemon is not started yet.
    pub fn new(name: &str) -> Self {
        let netns = NetnsGuard::enter();
        let dir = tempfile::Builder::new()
            .prefix(&format!("hotswap-{name}-"))
            .tempdir_in(scratch_root())
            .expect("tempdir");
        let unique = format!(
            "{name}-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let pin_dir = PathBuf::from("/sys/fs/bpf/hotswap-tests").join(unique);
        let config = dir.path().join("hotswap.toml");
        std::fs::write(&config, "").expect("empty config file");
        Self {
            config,
            socket: dir.path().join("hotswap.sock"),
            daemon_log: dir.path().join("daemon.log"),
            dir,
            pin_dir,
            daemon: None,
            backend: None,
            daemon_args: Vec::new(),
            _netns: netns,
        }
    }

    /// A new environment whose daemon runs with `--backend BACKEND`, started.
    pub fn with_backend(name: &str, backend: &str) -> Self {
        let mut env = Self::new(name);
        env.backend = Some(backend.to_owned());
        env.start_daemon();
        env
    }

    /// A new environment with a running daemon.
    pub fn with_daemon(name: &str) -> Self {
        let mut env = Self::new(name);
        env.start_daemon();
        env
    }

    /// The daemon command for this environment, not started.
    pub fn daemon_command(&self) -> Command {
        let mut cmd = Command::new(hotswap_bin());
        cmd.arg("daemon")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info");
        if let Some(backend) = &self.backend {
            cmd.args(["--backend", backend]);
        }
        cmd.args(&self.daemon_args);
        cmd
    }

    /// Starts the daemon and waits until it answers on its control socket.
    pub fn start_daemon(&mut self) {
        if let Err(log) = self.try_start_daemon() {
            panic!("daemon exited early:\n{log}");
        }
    }

    /// Starts the daemon and waits until it answers; when it exits instead, returns what it
    /// logged this time.
    pub fn try_start_daemon(&mut self) -> Result<(), String> {
        assert!(self.daemon.is_none(), "daemon already running");
        let logged_before = self.daemon_log().len();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.daemon_log)
            .expect("daemon log");
        let child = self
            .daemon_command()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        self.daemon = Some(child);
        let deadline = Instant::now() + patience();
        loop {
            if let Some(status) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                self.daemon = None;
                let log = self.daemon_log();
                return Err(format!(
                    "{status}: {}",
                    &log[logged_before.min(log.len())..]
                ));
            }
            if self.hotswap(&["status", "--json"]).status.success() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not come up:\n{}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the daemon and waits for it to exit.
    pub fn stop_daemon(&mut self, signal: nix::sys::signal::Signal) {
        let mut child = self.daemon.take().expect("daemon running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
        child.wait().unwrap();
    }

    /// The daemon's pid, while it runs.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// What the daemon logged so far.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(&self.daemon_log).unwrap_or_default()
    }

    /// Runs `hotswap ARGS` against this environment's daemon.
    pub fn hotswap(&self, args: &[&str]) -> Output {
        Command::new(hotswap_bin())
            .args(args)
            .env("HOTSWAP_SOCKET", &self.socket)
            .output()
            .expect("run hotswap")
    }

    /// Runs `hotswap ARGS`, which must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.hotswap(args);
        assert!(
            out.status.success(),
            "hotswap {args:?} failed ({}): {}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.daemon_log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `hotswap ARGS`, which must fail with exactly one line on stderr; returns that line.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.hotswap(args);
        assert!(!out.status.success(), "hotswap {args:?} should have failed");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(
            stderr.lines().count(),
            1,
            "hotswap {args:?}: expected one line, got:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        stderr.trim_end().to_owned()
    }

    /// `hotswap status --json`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).unwrap()
    }

    /// A service's counters from `hotswap metrics --json`: lookups, steered, no_socket, errors.
    pub fn metrics(&self, service: &str) -> [u64; 4] {
        let all: serde_json::Value =
            serde_json::from_str(&self.ok(&["metrics", "--json"])).unwrap();
        let m = all
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["service"] == service)
            .unwrap_or_else(|| panic!("no metrics for {service}: {all}"));
        ["lookups", "steered", "no_socket", "errors"].map(|k| m[k].as_u64().unwrap())
    }

    /// Checks a service's kernel counters: `steered` connections handed to its socket, `refused`
    /// refused for want of one, no errors, and every lookup one or the other. The program also
    /// runs for segments that are not a new connection's first SYN, and under a stalled
    /// emulated CPU (the kernel matrix) there are some: a SYN the client retransmitted, or a
    /// late segment of a connection whose socket is already gone, which the kernel then answers
    /// with a reset. So each SYN retransmitted, and each reset beyond the `refused` ones, in this
    /// test's network namespace may add one lookup — and nothing else may. (A refusal the test
    /// did not expect also sends a reset and would be excused here; the tests catch those at
    /// the client, which checks every connection's outcome. What this catches is a program
    /// that counts wrongly: a lookup counted twice, or as the wrong kind, sends no reset.)
    pub fn assert_counted(&self, service: &str, steered: u64, refused: u64) {
        let metrics @ [lookups, got_steered, no_socket, errors] = self.metrics(service);
        let retransmitted = syn_retransmits();
        let stray = tcp_resets_sent().saturating_sub(refused);
        let extra = got_steered.saturating_sub(steered) + no_socket.saturating_sub(refused);
        assert!(
            errors == 0
                && lookups == got_steered + no_socket
                && got_steered >= steered
                && no_socket >= refused
                && extra <= retransmitted + stray,
            "{service}: [lookups, steered, no_socket, errors] = {metrics:?}, expected \
             steered {steered}, refused {refused}, with {retransmitted} SYNs retransmitted and \
             {stray} resets beyond the refusals"
        );
    }

    /// Registers a server's socket; returns the generation id.
    pub fn register(&self, service: &str, server: &Server, extra: &[&str]) -> u32 {
        let (pid, fd) = (server.pid.to_string(), server.fd.to_string());
        let mut args = vec!["register", service, "--pid", &pid, "--fd", &fd];
        args.extend_from_slice(extra);
        self.ok(&args).trim().parse().unwrap()
    }
}

/// The processes in the calling thread's network namespace, other than this test process:
/// with generations outliving their supervisor, what a test leaves running is found here.
pub fn processes_in_this_netns() -> Vec<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(own) = std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino()) else {
        return Vec::new();
    };
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == own)
        })
        // Zombies hold nothing; their parent collects them.
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                })
                == Some(false)
        })
        .collect()
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever the test left in its namespace (generations and keepers outlive a killed
        // supervisor by design) ends with it.
        for pid in processes_in_this_netns() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Unpins the program, link and maps: the namespace's steering ends with the test.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        // Fails while other tests still have their directories there, as it should.
        if let Some(parent) = self.pin_dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// `hotswap` with this environment's control socket, not started.
pub fn hotswap_command(env: &TestEnv) -> Command {
    let mut cmd = Command::new(hotswap_bin());
    cmd.env("HOTSWAP_SOCKET", &env.socket);
    cmd
}

/// A running `hotswap-test-server`.
pub struct Server {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Its pid.
    pub pid: u32,
    /// Its listening socket's fd number.
    pub fd: i32,
    /// Its listening socket's address.
    pub addr: SocketAddr,
}

impl Server {
    /// Starts a server on `addr` (port 0 for any) answering with `text`.
    pub fn start(proto: &str, addr: &str, text: &str) -> Self {
        let mut child = Command::new(server_bin())
            .args([proto, addr, text])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn test server");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words.first(), Some(&"READY"), "test server said {line:?}");
        Self {
            pid: words[1].parse().unwrap(),
            fd: words[2].parse().unwrap(),
            addr: words[3].parse().unwrap(),
            child,
            stdin,
            stdout,
        }
    }

    /// Closes the listening socket; the process lives on.
    pub fn close_listener(&mut self) {
        writeln!(self.stdin, "close").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "CLOSED");
    }

    /// Kills the process and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The ids of the generations `hotswap status --json` (`status`) calls active in its first
/// service.
pub fn active_generations(status: &serde_json::Value) -> Vec<u64> {
    status["services"][0]["generations"]
        .as_array()
        .map(|generations| {
            generations
                .iter()
                .filter(|g| g["active"] == true)
                .filter_map(|g| g["id"].as_u64())
                .collect()
        })
        .unwrap_or_default()
}

/// Connects, reads the greeting line and closes.
pub fn tcp_request(addr: &str) -> std::io::Result<String> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without a reply",
        ));
    }
    Ok(line.trim_end().to_owned())
}

/// Every TCP listener in the calling thread's network namespace (`ss -Htln`'s local
/// addresses).
pub fn tcp_listeners() -> Vec<String> {
    let out = Command::new("ss")
        .args(["-Htln"])
        .output()
        .expect("ss (iproute2) runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_owned))
        .collect()
}

/// One of the kernel's TCP counters for the calling thread's network namespace: `file` is
/// `snmp` or `netstat` under /proc/thread-self/net, where a line of names (`Tcp:`, `TcpExt:`)
/// is followed by a line of values.
fn tcp_counter(file: &str, group: &str, name: &str) -> u64 {
    let path = format!("/proc/thread-self/net/{file}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut lines = text
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(group));
    let (names, values) = (
        lines.next().expect("a line of names"),
        lines.next().expect("a line of values"),
    );
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or_else(|| panic!("no {group} {name} in {path}"))
}

/// TCP resets sent in the calling thread's network namespace (`Tcp: OutRsts`).
pub fn tcp_resets_sent() -> u64 {
    tcp_counter("snmp", "Tcp:", "OutRsts")
}

/// SYNs (and SYN-ACKs) retransmitted in the calling thread's network namespace
/// (`TcpExt: TCPSynRetrans`).
pub fn syn_retransmits() -> u64 {
    tcp_counter("netstat", "TcpExt:", "TCPSynRetrans")
}

/// Waits until `done` holds, at most [`patience`]; panics saying what it waited for.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + patience();
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends one datagram and waits for the answer (from any source address: the answer comes from
/// the generation's own socket address).
pub fn udp_request(addr: &str) -> std::io::Result<String> {
    let target: SocketAddr = addr.parse().unwrap();
    let local = if target.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    };
    let socket = UdpSocket::bind(local)?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.send_to(b"hello", target)?;
    let mut buf = [0u8; 256];
    let (n, _) = socket.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// What a [`Load`] saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Successful requests by the reply text.
    pub replies: BTreeMap<String, u64>,
    /// Failed requests, with why (at most 20 kept).
    pub failures: Vec<String>,
    /// Count of failed requests.
    pub failed: u64,
    /// Of those, how many failed to connect at all.
    pub failed_connections: u64,
    /// Of those, how many were sent on a kept-alive connection that had answered before and
    /// got not one byte of answer: the server closed (or stopped reading) a connection it held
    /// idle while the request was on its way — the keep-alive race of every reload.
    pub failed_on_idle_connections: u64,
    /// Connections the client opened (an [`HttpLoad`]'s; a keep-alive client reopens one
    /// only when the server closed the last).
    pub connects: u64,
}

impl LoadReport {
    /// Successful requests.
    pub fn served(&self) -> u64 {
        self.replies.values().sum()
    }
}

/// A failed request, and whether it failed already at connecting, or on an idle kept-alive
/// connection before any byte of the answer.
struct Failed {
    error: std::io::Error,
    at_connect: bool,
    on_idle_connection: bool,
}

impl From<std::io::Error> for Failed {
    fn from(error: std::io::Error) -> Self {
        Self {
            error,
            at_connect: false,
            on_idle_connection: false,
        }
    }
}

/// A client thread making one request after another until stopped, bounded by a number of
/// requests and a time; the load generators below differ only in what one request is.
struct Running {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<LoadReport>,
}

impl Running {
    fn spawn(
        max_requests: u64,
        bound: Duration,
        mut request: impl FnMut() -> Result<String, Failed> + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + bound;
            let mut report = LoadReport::default();
            for _ in 0..max_requests {
                if flag.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                match request() {
                    Ok(reply) => *report.replies.entry(reply).or_default() += 1,
                    Err(failed) => {
                        report.failed += 1;
                        report.failed_connections += u64::from(failed.at_connect);
                        report.failed_on_idle_connections += u64::from(failed.on_idle_connection);
                        if report.failures.len() < 20 {
                            report.failures.push(failed.error.to_string());
                        }
                    }
                }
            }
            report
        });
        Self { stop, handle }
    }

    fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("load thread")
    }
}

/// A client opening one TCP connection after another, each with one request, until stopped
/// (bounded by `max_requests` and [`patience`] times 3).
pub struct Load(Running);

impl Load {
    /// Starts the client against `addr`.
    pub fn start(addr: &str, max_requests: u64) -> Self {
        let addr = addr.to_owned();
        Self(Running::spawn(max_requests, patience() * 3, move || {
            Ok(tcp_request(&addr)?)
        }))
    }

    /// Stops the client and returns what it saw.
    pub fn stop(self) -> LoadReport {
        self.0.stop()
    }
}

/// Makes a copy of the hotswap binary that an unprivileged user can run, in a directory that
/// user can enter.
pub fn unprivileged_copy_of_hotswap(dir: &Path) -> PathBuf {
    let dest_dir = dir.join("bin");
    std::fs::create_dir_all(&dest_dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&dest_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dest = dest_dir.join("hotswap");
    std::fs::copy(hotswap_bin(), &dest).unwrap();
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755)).unwrap();
    dest
}

/// `target/<profile>/examples/hello`, the example server.
pub fn example_server() -> PathBuf {
    workspace_bin("examples/hello")
}

/// The socket-activated fixture with no hotswap code.
pub fn activated_fixture() -> PathBuf {
    workspace_bin("hotswap-test-activated")
}

/// A `hotswap run` for a test; stopped with SIGTERM on drop.
pub struct RunningService {
    child: Option<Child>,
    /// Service name.
    pub service: String,
    log: PathBuf,
}

impl RunningService {
    /// Starts `hotswap run SERVICE ARGS…` and waits until a generation is active.
    pub fn start(env: &TestEnv, service: &str, args: &[&str]) -> Self {
        Self::start_with(env, service, args, |_| {})
    }

    /// `hotswap run web --listen tcp://127.0.0.1:8080 --grace 50ms EXTRA… -- <fixture>`: the
    /// socket-activated fixture as service `web`, with `extra` run options.
    pub fn fixture(env: &TestEnv, extra: &[&str]) -> Self {
        let fixture = activated_fixture();
        let mut args = vec!["--listen", "tcp://127.0.0.1:8080", "--grace", "50ms"];
        args.extend_from_slice(extra);
        args.push("--");
        args.push(fixture.to_str().expect("a UTF-8 path"));
        Self::start(env, "web", &args)
    }

    /// As [`RunningService::start`], with the `hotswap run` command adjusted first (e.g. a
    /// `pre_exec` that gives it a private mount namespace).
    pub fn start_with(
        env: &TestEnv,
        service: &str,
        args: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Self {
        Self::start_from(env, &hotswap_bin(), service, args, adjust)
    }

    /// As [`RunningService::start_with`], running the hotswap binary at `binary`.
    pub fn start_from(
        env: &TestEnv,
        binary: &Path,
        service: &str,
        args: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Self {
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let log = env.dir.path().join(format!(
            "run-{service}-{}.log",
            STARTS.fetch_add(1, Ordering::Relaxed)
        ));
        let mut command = Command::new(binary);
        command.env("HOTSWAP_SOCKET", &env.socket);
        adjust(&mut command);
        let child = command
            .arg("run")
            .arg(service)
            .args(args)
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn hotswap run");
        let mut running = Self {
            child: Some(child),
            service: service.to_owned(),
            log,
        };
        let deadline = Instant::now() + patience();
        loop {
            if let Some(status) = running.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("hotswap run exited with {status}:\n{}", running.log());
            }
            let status = env.status();
            if status["supervisors"][service]["active"].as_u64().is_some() {
                return running;
            }
            assert!(
                Instant::now() < deadline,
                "service never became active:\n{}",
                running.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What `hotswap run` logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The supervisor's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Kills it with SIGKILL (its generations go on), and collects it.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops it (SIGTERM) and returns its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        child.wait().unwrap()
    }
}

impl Drop for RunningService {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}

/// Sends one HTTP/1.1 request on `stream` and reads the response; returns the body and whether
/// the server closes the connection after it.
pub fn http_exchange(stream: &mut BufReader<TcpStream>) -> std::io::Result<(String, bool)> {
    http_exchange_telling(stream).map_err(|(error, _)| error)
}

/// As [`http_exchange`]; a failure also says whether any byte of the response had come.
fn http_exchange_telling(
    stream: &mut BufReader<TcpStream>,
) -> Result<(String, bool), (std::io::Error, bool)> {
    stream
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        .map_err(|e| (e, false))?;
    let mut line = String::new();
    let mut length = None;
    let mut close = false;
    let mut first = true;
    loop {
        line.clear();
        let answered = !first;
        match stream.read_line(&mut line) {
            Ok(0) => {
                return Err((
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "closed before the response",
                    ),
                    answered,
                ))
            }
            Ok(_) => {}
            Err(error) => return Err((error, answered || !line.is_empty())),
        }
        if first {
            if !line.starts_with("HTTP/1.1 200") {
                return Err((
                    std::io::Error::other(format!("bad status line {line:?}")),
                    true,
                ));
            }
            first = false;
            continue;
        }
        if line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        }
        if lower.starts_with("connection: close") {
            close = true;
        }
    }
    let length = length.ok_or_else(|| (std::io::Error::other("no content-length"), true))?;
    let mut body = vec![0u8; length];
    std::io::Read::read_exact(stream, &mut body).map_err(|e| (e, true))?;
    Ok((String::from_utf8_lossy(&body).trim_end().to_owned(), close))
}

/// Continuous HTTP load: either a new connection per request, or keep-alive connections that
/// reconnect when the server says `connection: close` (which is not a failure).
pub struct HttpLoad(Running, Arc<std::sync::atomic::AtomicU64>);

/// Connects to `addr`. A client that opens connections without pause can use up the local
/// ephemeral ports (each closed connection holds its port in TIME_WAIT for a minute; seen
/// after ~230,000 connections while a server took its whole drain timeout to exit): connect()
/// then fails with EAGAIN/EADDRNOTAVAIL before any packet leaves, which says nothing about the
/// server. Such a connect waits and tries again, for at most 10 s.
fn connect_with_a_free_port(addr: &str) -> std::io::Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(addr) {
            Err(err)
                if matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EADDRNOTAVAIL))
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

impl HttpLoad {
    /// Starts the client.
    pub fn start(addr: &str, keep_alive: bool, max_requests: u64) -> Self {
        let addr = addr.to_owned();
        let mut connection: Option<BufReader<TcpStream>> = None;
        // Requests the current connection has answered.
        let mut answered = 0u64;
        let connects = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = Arc::clone(&connects);
        let running = Running::spawn(max_requests, patience() * 30, move || {
            if connection.is_none() {
                counted.fetch_add(1, Ordering::Relaxed);
                let stream = connect_with_a_free_port(&addr).map_err(|error| Failed {
                    error,
                    at_connect: true,
                    on_idle_connection: false,
                })?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                connection = Some(BufReader::new(stream));
                answered = 0;
            }
            match http_exchange_telling(connection.as_mut().expect("connected above")) {
                Ok((body, close)) => {
                    answered += 1;
                    if close || !keep_alive {
                        connection = None;
                    }
                    Ok(body)
                }
                Err((error, any_answer)) => {
                    connection = None;
                    Err(Failed {
                        error,
                        at_connect: false,
                        on_idle_connection: answered > 0 && !any_answer,
                    })
                }
            }
        });
        Self(running, connects)
    }

    /// Stops the client and returns what it saw.
    pub fn stop(self) -> LoadReport {
        let mut report = self.0.stop();
        report.connects = self.1.load(Ordering::Relaxed);
        report
    }
}

/// One HTTP request on a new connection; returns the body (panics on failure).
pub fn tcp_http_body(addr: &str) -> String {
    let stream = TcpStream::connect(addr).expect("connect");
    http_exchange(&mut BufReader::new(stream)).expect("http").0
}

/// Runs each named test function (taking the backend's name) against every backend: same
/// commands, same promises.
#[macro_export]
macro_rules! for_every_backend {
    ($($test:ident),* $(,)?) => {
        mod sk_lookup {
            $(#[test] fn $test() { super::$test("sk-lookup") })*
        }
        mod reuseport {
            $(#[test] fn $test() { super::$test("reuseport") })*
        }
        mod uds {
            $(#[test] fn $test() { super::$test("uds") })*
        }
    };
}
