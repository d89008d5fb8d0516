//! `hotswap run`: a foreground supervisor for one service. It creates each generation's
//! sockets, starts the generation's process with socket activation, waits until it is ready,
//! switches the daemon to it, and drains the one before without losing what the kernel already
//! accepted for it. `hotswap upgrade`, `rollback` and `status` talk to it over its own control
//! socket, next to the daemon's.
//!
//! The accept-queue problem (docs/design.md §4.5): the supervisor holds every socket it created and
//! registers *its own* fds with the daemon. After a switch no new connection reaches the old
//! socket, but connections already queued there belong to it. The supervisor waits until the
//! old socket's queue (`TCP_INFO.tcpi_unacked` on a listener; `SIOCINQ` for UDP) is empty, and
//! at least a settle time has passed since the switch (handshakes half done at the switch land
//! in the old queue within a round trip), and only then sends the drain signal. A server that
//! closes its listener at once loses nothing: the queue is empty and the supervisor's copy keeps
//! the socket open until the process has exited.

mod inspect;
mod process;
pub mod spec;

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
        unix::process::ExitStatusExt as _,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use nix::{
    fcntl::{Flock, FlockArg},
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use serde::{Deserialize, Serialize};
use tokio::{
    net::{UnixDatagram, UnixListener, UnixStream},
    sync::{mpsc, watch},
};

pub use process::{resolve_program, SpawnError};
use spec::{ListenSpec, ReadyMode};

use crate::{
    client::{self, ClientError},
    error_chain,
    model::{Protocol, ServiceName},
    protocol::{Connection, FrameError, Reply, Request},
    PathError,
};

/// How long a drained socket's queue must stay empty (on top of `--drain-settle` since the
/// switch) before the drain signal.
const QUEUE_QUIET: Duration = Duration::from_millis(20);

/// First and longest wait before restarting a generation that died on its own.
const RESTART_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(10));

/// A generation that ran this long before it died restarts without waiting.
const RESTART_RESET: Duration = Duration::from_secs(10);

/// How often the supervisor collects the exits of orphaned workers it inherited as subreaper.
const ORPHAN_REAP_INTERVAL: Duration = Duration::from_millis(200);

/// How `hotswap run` runs a service.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Service.
    pub service: ServiceName,
    /// Its addresses.
    pub listens: Vec<ListenSpec>,
    /// How to tell a new generation is ready; `None` for the default (see [`default_ready`]).
    pub ready: Option<ReadyMode>,
    /// How long a new generation may take to get ready.
    pub ready_timeout: Duration,
    /// What tells a generation to drain.
    pub drain_signal: Signal,
    /// How long a draining generation may take before it is killed.
    pub drain_timeout: Duration,
    /// How long after the switch an old generation's queue is watched before the drain
    /// signal, so handshakes half done at the switch land in it first.
    pub drain_settle: Duration,
    /// How long after a switch a new generation's death rolls back automatically.
    pub grace: Duration,
    /// The command.
    pub command: Vec<String>,
    /// How a generation is told which descriptors are its sockets.
    pub fd_passing: spec::FdPassing,
    /// The daemon's control socket.
    pub daemon_socket: PathBuf,
}

/// What can go wrong supervising.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The daemon refused or could not be reached.
    #[error(transparent)]
    Daemon(#[from] ClientError),
    /// The daemon answered something unexpected.
    #[error("unexpected reply from the daemon: {0}")]
    UnexpectedReply(String),
    /// A listen address is bound to another service.
    #[error("{listen} is bound to service {owner}, not {service}")]
    BoundElsewhere {
        /// The address.
        listen: ListenSpec,
        /// Its owner.
        owner: String,
        /// This service.
        service: ServiceName,
    },
    /// Starting the process failed.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// Creating a socket failed.
    #[error("creating the {protocol} socket for {addr} failed")]
    Socket {
        /// Protocol.
        protocol: Protocol,
        /// Address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A file-system or socket operation failed.
    #[error(transparent)]
    Io(#[from] crate::PathError),
    /// Another supervisor runs the service.
    #[error("service {0} is already run by another `hotswap run`")]
    AlreadyRunning(ServiceName),
    /// No supervisor runs the service.
    #[error("service {0} is not run by `hotswap run` (start it with `hotswap run {0} --listen … -- COMMAND`)")]
    NotRunning(ServiceName),
    /// The new generation did not get ready in time.
    #[error("generation {generation} was not ready after {timeout:?} ({}); it was stopped{}", ready_hint(.mode), keep_note(.kept))]
    NotReady {
        /// The generation.
        generation: u32,
        /// The timeout.
        timeout: Duration,
        /// What it was waited for with.
        mode: ReadyMode,
        /// The generation that stays active.
        kept: Option<u32>,
    },
    /// No process of the new generation holds the socket it was given: the server did not
    /// take it.
    #[error("generation {generation} does not use the {protocol} socket it was given (no process of it holds the socket any more): the server closed it, probably because its config does not listen on exactly {addr} — make the config's address the --listen address, and check --pass-fds (nginx) or `bind fd@${{HOTSWAP_FD_TCP}}` (HAProxy); it was stopped and nothing was switched{}", keep_note(.kept))]
    NotUsingSocket {
        /// The generation.
        generation: u32,
        /// The socket's protocol.
        protocol: Protocol,
        /// The service address it was bound to.
        addr: String,
        /// The generation that stays active.
        kept: Option<u32>,
    },
    /// A process of the new generation listens on a service address with a socket of its
    /// own: steering would never reach it.
    #[error("generation {generation} listens on {protocol} {addr} with a socket of its own (pid {pid}) instead of the one it was given: steering never reaches that socket. The server binds the address itself — remove `reuseport`/SO_REUSEPORT from its listen config and let it take fd 3 (see --pass-fds); it was stopped and nothing was switched{}", keep_note(.kept))]
    OwnSocket {
        /// The generation.
        generation: u32,
        /// The process holding the socket.
        pid: u32,
        /// Protocol.
        protocol: Protocol,
        /// Where it listens.
        addr: SocketAddr,
        /// The generation that stays active.
        kept: Option<u32>,
    },
    /// The new generation exited before it was ready.
    #[error("generation {generation} exited ({exit}) before it was ready{}", keep_note(.kept))]
    ExitedBeforeReady {
        /// The generation.
        generation: u32,
        /// How it exited.
        exit: ExitInfo,
        /// The generation that stays active.
        kept: Option<u32>,
    },
    /// The new generation died in its grace period; the old one is active again.
    #[error("generation {generation} exited ({exit}) {after:?} after the switch; rolled back to generation {back}")]
    RolledBack {
        /// The generation that died.
        generation: u32,
        /// How.
        exit: ExitInfo,
        /// When.
        after: Duration,
        /// The generation active again.
        back: u32,
    },
    /// The operator rolled back during the upgrade.
    #[error("rolled back to generation {0} during the upgrade")]
    RolledBackByOperator(u32),
    /// Another upgrade is running.
    #[error("an upgrade of {service} is already in progress (generation {generation})")]
    UpgradeInProgress {
        /// Service.
        service: ServiceName,
        /// The generation it is bringing up.
        generation: u32,
    },
    /// `--drain-settle` would leave the old generation no time to finish.
    #[error("--drain-settle ({}) must be under half of --drain-timeout ({}): the queue is watched for at most the first half, the second is for the old generation to finish", humantime::format_duration(*settle), humantime::format_duration(*timeout))]
    SettleNotBelowTimeout {
        /// The settle time.
        settle: Duration,
        /// The drain timeout.
        timeout: Duration,
    },
    /// The tcp probe cannot reach one generation through a shared socket.
    #[error("--ready tcp cannot tell generations apart on the uds backend's shared socket; use --ready notify or --ready delay:<DURATION>")]
    TcpProbeOnSharedSocket,
    /// Nothing to roll back to.
    #[error("cannot roll back {service}: {why}")]
    CannotRollBack {
        /// Service.
        service: ServiceName,
        /// Why.
        why: String,
    },
    /// The supervisor is stopping.
    #[error("the supervisor is stopping")]
    Stopping,
    /// Talking to the supervisor failed.
    #[error("talking to the supervisor failed")]
    Frame(#[from] FrameError),
    /// The supervisor refused; its words.
    #[error("{0}")]
    Refused(String),
}

/// What a generation that never got ready did not do.
fn ready_hint(mode: &ReadyMode) -> &'static str {
    match mode {
        ReadyMode::Tcp => "--ready tcp: it accepted no connection on the socket it was given; a server must take its listener from LISTEN_FDS, not bind its own",
        ReadyMode::Notify => "--ready notify: it sent no READY=1 to NOTIFY_SOCKET",
        ReadyMode::Delay(_) => "--ready delay is longer than --ready-timeout",
    }
}

fn keep_note(kept: &Option<u32>) -> String {
    kept.map(|k| format!("; generation {k} stays active"))
        .unwrap_or_default()
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal, if one killed it.
    pub signal: Option<i32>,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "code {code}"),
            (None, Some(signal)) => match Signal::try_from(signal) {
                Ok(s) => write!(f, "signal {}", s.as_str()),
                Err(_) => write!(f, "signal {signal}"),
            },
            (None, None) => f.write_str("unknown status"),
        }
    }
}

/// Where a generation is in its life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum GenerationState {
    /// Started, not ready yet.
    Starting,
    /// Ready, not active (a new one before the switch, or an old one after it).
    Ready,
    /// New connections go to it.
    Active,
    /// Told to drain.
    Draining,
    /// Its process is gone and so are its sockets.
    Exited {
        /// How it ended.
        exit: ExitInfo,
    },
    /// It never became ready.
    Failed {
        /// Why.
        reason: String,
    },
}

/// A generation as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationReport {
    /// Daemon generation id.
    pub id: u32,
    /// The current process.
    pub pid: Option<u32>,
    /// Its command.
    pub command: Vec<String>,
    /// Where it is.
    #[serde(flatten)]
    pub state: GenerationState,
    /// Start time, ms since the Unix epoch.
    pub started_at_ms: u64,
    /// How long it took to get ready.
    pub ready_after_ms: Option<u64>,
    /// When it became active, ms since the Unix epoch.
    pub switched_at_ms: Option<u64>,
    /// How long draining took, from the switch away to the exit.
    pub drained_after_ms: Option<u64>,
    /// Restarts after it died on its own.
    pub restarts: u32,
}

/// What a supervisor reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorReport {
    /// The supervisor's pid.
    pub pid: u32,
    /// Listen addresses.
    pub listens: Vec<ListenSpec>,
    /// The active generation.
    pub active: Option<u32>,
    /// The generation an upgrade is bringing up.
    pub upgrading: Option<u32>,
    /// Generations restarted after dying on their own, in total.
    pub restarts: u32,
    /// Live generations and the last few that exited, oldest first.
    pub generations: Vec<GenerationReport>,
}

/// A request to a supervisor.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case")]
pub enum SupervisorRequest {
    /// Start a new generation, switch to it, drain the old one.
    Upgrade {
        /// A new command, or `None` for the current one.
        command: Option<Vec<String>>,
        /// Readiness for this upgrade.
        ready: Option<ReadyMode>,
        /// Readiness timeout for this upgrade, in ms.
        ready_timeout_ms: Option<u64>,
    },
    /// Switch back to the previous generation.
    Rollback,
    /// Report.
    Status,
}

/// A message from a supervisor.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SupervisorMessage {
    /// A step of a long operation.
    Progress {
        /// What happened.
        line: String,
    },
    /// The end of an operation.
    Done {
        /// Whether it succeeded.
        ok: bool,
        /// The summary or the reason.
        message: String,
    },
    /// A report.
    Status(SupervisorReport),
}

/// The supervisor's control socket for `service`, next to the daemon's.
pub fn supervisor_socket(daemon_socket: &Path, service: &ServiceName) -> PathBuf {
    daemon_socket
        .parent()
        .unwrap_or(Path::new("/"))
        .join(format!("{service}.run.sock"))
}

fn ms_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Generation {
    id: u32,
    command: Vec<String>,
    /// The supervisor's own copies: registered with the daemon, and what keeps a draining
    /// generation's queue alive after its process closed its listener.
    sockets: Vec<(Protocol, OwnedFd)>,
    pid: Option<u32>,
    /// Bumped on every (re)start, so a stale exit is not mistaken for the current process's.
    serial: u64,
    exit: watch::Receiver<Option<ExitInfo>>,
    state: GenerationState,
    started_at: SystemTime,
    spawned: Instant,
    ready_after: Option<Duration>,
    switched_at: Option<SystemTime>,
    switched_away: Option<Instant>,
    drained_after: Option<Duration>,
    restarts: u32,
    /// How readiness is told.
    ready: ReadyMode,
    notify: Option<Arc<UnixDatagram>>,
    /// Whether the sockets are the backend's shared ones (uds): their queue is every
    /// generation's, so draining does not wait for it.
    shared: bool,
}

impl Generation {
    fn report(&self) -> GenerationReport {
        GenerationReport {
            id: self.id,
            pid: self.pid,
            command: self.command.clone(),
            state: self.state.clone(),
            started_at_ms: ms_since_epoch(self.started_at),
            ready_after_ms: self.ready_after.map(|d| d.as_millis() as u64),
            switched_at_ms: self.switched_at.map(ms_since_epoch),
            drained_after_ms: self.drained_after.map(|d| d.as_millis() as u64),
            restarts: self.restarts,
        }
    }

    fn alive(&self) -> bool {
        self.exit.borrow().is_none()
    }
}

struct State {
    generations: BTreeMap<u32, Generation>,
    active: Option<u32>,
    previous: Option<u32>,
    upgrading: Option<u32>,
    /// The generation whose exit the running upgrade handles itself (until its grace ends).
    protected: Option<u32>,
    /// The last previous generation retired, and when: for a helpful `rollback` refusal.
    last_retired_previous: Option<(u32, Instant)>,
    command: Vec<String>,
    restarts: u32,
    stopping: bool,
}

struct Supervisor {
    config: RunConfig,
    state: Mutex<State>,
    events: mpsc::UnboundedSender<(u32, u64, ExitInfo)>,
    notify_dir: PathBuf,
}

/// Sends `progress` lines somewhere: the log for `run`, a client for `upgrade`.
type Progress<'a> = &'a (dyn Fn(String) + Send + Sync);

impl Supervisor {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn daemon(&self, request: Request) -> Result<Reply, SupervisorError> {
        Ok(client::request(&self.config.daemon_socket, &request).await?)
    }

    /// Binds every listen address that is not bound yet.
    async fn ensure_bindings(&self) -> Result<(), SupervisorError> {
        let Reply::Status(status) = self.daemon(Request::Status).await? else {
            return Err(SupervisorError::UnexpectedReply("to status".into()));
        };
        for listen in &self.config.listens {
            let binding = listen.binding();
            let owner = status
                .services
                .iter()
                .find(|s| s.bindings.contains(&binding))
                .map(|s| s.name.clone());
            match owner {
                Some(owner) if owner == self.config.service => {}
                Some(owner) => {
                    return Err(SupervisorError::BoundElsewhere {
                        listen: *listen,
                        owner: owner.to_string(),
                        service: self.config.service.clone(),
                    })
                }
                None => {
                    self.daemon(Request::Bind {
                        service: self.config.service.clone(),
                        binding,
                    })
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// One socket per protocol, bound to the service's own address and port (what `--listen`
    /// says, so that servers which match inherited sockets against their configured address
    /// accept it), all generations of a service in one `SO_REUSEPORT` group: the program
    /// assigns with `BPF_SK_LOOKUP_F_NO_REUSEPORT`, so the group never spreads traffic. Where
    /// the `--listen` addresses are not one bindable address (several IPs or ports), the socket
    /// gets the kernel's choice of port on their common address; where a listener outside
    /// hotswap holds the address without `SO_REUSEPORT`, too — steering serves it all the same,
    /// and the operator is told.
    ///
    /// In the uds backend the daemon's shared socket is used instead (`true` is returned with
    /// the sockets then).
    fn create_sockets(&self) -> Result<(Vec<(Protocol, OwnedFd)>, bool), SupervisorError> {
        use socket2::{Domain, Socket, Type};
        let mut sockets = Vec::new();
        let mut shared = false;
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let listens: Vec<&ListenSpec> = self
                .config
                .listens
                .iter()
                .filter(|l| l.protocol == protocol)
                .collect();
            let Some(first) = listens.first() else {
                continue;
            };
            if let Some(fd) =
                client::shared_listener(&self.config.daemon_socket, &self.config.service, protocol)?
            {
                sockets.push((protocol, fd));
                shared = true;
                continue;
            }
            let all_v4 = listens.iter().all(|l| l.addr.is_ipv4());
            let same_ip = listens.iter().all(|l| l.addr.ip() == first.addr.ip());
            let fallback = match (all_v4, same_ip) {
                (_, true) => SocketAddr::new(first.addr.ip(), 0),
                (true, false) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
                (false, false) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
            };
            let exact = exact_address(&listens);
            let addr = exact.unwrap_or(fallback);
            let fail = |source| SupervisorError::Socket {
                protocol,
                addr,
                source,
            };
            let ty = match protocol {
                Protocol::Tcp => Type::STREAM,
                Protocol::Udp => Type::DGRAM,
            };
            let socket = Socket::new(Domain::for_address(addr), ty, None).map_err(fail)?;
            if addr.is_ipv6() {
                socket.set_only_v6(all_v4).map_err(fail)?;
            }
            let bound = match exact {
                Some(exact) => {
                    socket.set_reuse_port(true).map_err(fail)?;
                    match socket.bind(&exact.into()) {
                        Ok(()) => true,
                        Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
                            tracing::warn!(
                                "{protocol} {exact} is held by a listener outside hotswap (without SO_REUSEPORT; `ss -lnp` shows it): this generation listens on another port of {} and gets the service's connections all the same, but a server that compares its inherited socket with its configured address (nginx, lighttpd) binds its own and fails; stop that listener, then upgrade",
                                fallback.ip()
                            );
                            false
                        }
                        Err(err) => return Err(fail(err)),
                    }
                }
                None => false,
            };
            if !bound {
                socket
                    .bind(&fallback.into())
                    .map_err(|source| SupervisorError::Socket {
                        protocol,
                        addr: fallback,
                        source,
                    })?;
            }
            if protocol == Protocol::Tcp {
                socket.listen(1024).map_err(fail)?;
            }
            sockets.push((protocol, OwnedFd::from(socket)));
        }
        Ok((sockets, shared))
    }

    /// Creates a generation: sockets, registration, process. Returns its id.
    async fn start_generation(
        self: &Arc<Self>,
        command: Vec<String>,
        ready: Option<ReadyMode>,
    ) -> Result<u32, SupervisorError> {
        if self.lock().stopping {
            return Err(SupervisorError::Stopping);
        }
        process::resolve_program(command.first().ok_or(SpawnError::NoCommand)?)?;
        let (sockets, shared) = self.create_sockets()?;
        let ready = match (ready, shared) {
            (Some(ReadyMode::Tcp), true) => return Err(SupervisorError::TcpProbeOnSharedSocket),
            (Some(mode), _) => mode,
            (None, shared) => default_ready(&self.config.listens, shared),
        };
        let label: String = command
            .join(" ")
            .chars()
            .take(hotswap_common::MAX_LABEL)
            .collect();
        let reply = self
            .daemon(Request::Register {
                service: self.config.service.clone(),
                pid: std::process::id(),
                fds: sockets.iter().map(|(_, fd)| fd.as_raw_fd()).collect(),
                label: Some(label),
                activate: false,
            })
            .await?;
        let Reply::Registered { generation: id, .. } = reply else {
            return Err(SupervisorError::UnexpectedReply("to register".into()));
        };
        let notify = if ready == ReadyMode::Notify {
            Some(Arc::new(self.notify_socket(id)?))
        } else {
            None
        };
        let (exit_tx, exit_rx) = watch::channel(None);
        let generation = Generation {
            id,
            command,
            sockets,
            pid: None,
            serial: 0,
            exit: exit_rx,
            state: GenerationState::Starting,
            started_at: SystemTime::now(),
            spawned: Instant::now(),
            ready_after: None,
            switched_at: None,
            switched_away: None,
            drained_after: None,
            restarts: 0,
            ready,
            notify,
            shared,
        };
        self.lock().generations.insert(id, generation);
        if let Err(err) = self.spawn_process(id, exit_tx) {
            self.retire_async(
                id,
                GenerationState::Failed {
                    reason: error_chain(&err),
                },
            )
            .await;
            return Err(err);
        }
        Ok(id)
    }

    fn notify_socket(&self, id: u32) -> Result<UnixDatagram, SupervisorError> {
        let path = self.notify_dir.join(format!("{id}.sock"));
        let _ = std::fs::remove_file(&path);
        Ok(UnixDatagram::bind(&path).map_err(PathError::at("binding notify socket", &path))?)
    }

    /// Starts (or restarts) generation `id`'s process on its sockets.
    fn spawn_process(
        self: &Arc<Self>,
        id: u32,
        exit_tx: watch::Sender<Option<ExitInfo>>,
    ) -> Result<(), SupervisorError> {
        let mut state = self.lock();
        let generation = state.generations.get_mut(&id).expect("caller inserted it");
        let sockets: Vec<(Protocol, BorrowedFd<'_>)> = generation
            .sockets
            .iter()
            .map(|(p, fd)| (*p, fd.as_fd()))
            .collect();
        let id_text = id.to_string();
        let notify_path = self.notify_dir.join(format!("{id}.sock"));
        let mut env: Vec<(&str, &OsStr)> = vec![
            ("HOTSWAP_SERVICE", OsStr::new(self.config.service.as_str())),
            ("HOTSWAP_GENERATION", OsStr::new(&id_text)),
        ];
        if generation.notify.is_some() {
            env.push(("NOTIFY_SOCKET", notify_path.as_os_str()));
        }
        let mut child =
            process::spawn_activated(&generation.command, &sockets, self.config.fd_passing, &env)?;
        let pid = child.id();
        generation.pid = pid;
        generation.serial += 1;
        generation.spawned = Instant::now();
        let serial = generation.serial;
        drop(state);
        let supervisor = Arc::clone(self);
        tokio::spawn(async move {
            let status = child.wait().await;
            // Whatever the main process left behind in its group (workers that outlived it) is
            // part of a generation that has ended.
            if let Some(pid) = pid {
                end_tree(pid);
            }
            let exit = match status {
                Ok(status) => ExitInfo {
                    code: status.code(),
                    signal: status.signal(),
                },
                Err(_) => ExitInfo {
                    code: None,
                    signal: None,
                },
            };
            // Receivers keep seeing this value after the sender is gone.
            let _ = exit_tx.send(Some(exit));
            let _ = supervisor.events.send((id, serial, exit));
        });
        Ok(())
    }

    /// Waits until `id` is ready. On failure the generation is stopped and retired.
    async fn wait_ready(
        self: &Arc<Self>,
        id: u32,
        timeout: Duration,
    ) -> Result<Duration, SupervisorError> {
        let (mode, mut exit, notify, probe_target, spawned) = {
            let state = self.lock();
            let g = &state.generations[&id];
            let probe = g
                .sockets
                .iter()
                .find(|(p, _)| *p == Protocol::Tcp)
                .and_then(|(_, fd)| crate::socket::local_addr(fd.as_fd()))
                .map(loopback_for);
            (g.ready, g.exit.clone(), g.notify.clone(), probe, g.spawned)
        };
        let kept = self.lock().active;
        let ready = async {
            match mode {
                ReadyMode::Delay(d) => tokio::time::sleep(d).await,
                ReadyMode::Notify => {
                    let Some(socket) = notify else {
                        return std::future::pending().await;
                    };
                    let mut buf = [0u8; 4096];
                    loop {
                        if let Ok(n) = socket.recv(&mut buf).await {
                            if buf[..n].split(|&b| b == b'\n').any(|l| l == b"READY=1") {
                                break;
                            }
                        }
                    }
                }
                ReadyMode::Tcp => self.tcp_probe(id, probe_target).await,
            }
        };
        let outcome = tokio::select! {
            () = ready => Ok(spawned.elapsed()),
            () = tokio::time::sleep(timeout) => Err(SupervisorError::NotReady { generation: id, timeout, mode, kept }),
            exit = exit.wait_for(Option::is_some) => {
                let exit = exit.ok().and_then(|e| *e).unwrap_or(ExitInfo { code: None, signal: None });
                Err(SupervisorError::ExitedBeforeReady { generation: id, exit, kept })
            }
        };
        match outcome {
            Ok(after) => {
                let mut state = self.lock();
                if let Some(g) = state.generations.get_mut(&id) {
                    g.state = GenerationState::Ready;
                    g.ready_after = Some(after);
                }
                Ok(after)
            }
            Err(err) => {
                self.kill_and_wait(id, Signal::SIGKILL, Duration::from_secs(5))
                    .await;
                let reason = match &err {
                    SupervisorError::NotReady { timeout, .. } => {
                        format!("not ready after {}", humantime::format_duration(*timeout))
                    }
                    SupervisorError::ExitedBeforeReady { exit, .. } => {
                        format!("exited ({exit}) before ready")
                    }
                    other => other.to_string(),
                };
                self.retire_async(id, GenerationState::Failed { reason })
                    .await;
                Err(err)
            }
        }
    }

    /// Connects to the generation's socket until the process accepts a connection (its accept
    /// queue is empty again). The socket is on the service's own address, where steering hands
    /// connections to the active generation, so each probe connection first gets a route of its
    /// own from the daemon: connections from its source port go to this generation, uncounted.
    async fn tcp_probe(&self, id: u32, target: Option<SocketAddr>) {
        let Some(target) = target else {
            // No TCP socket: nothing to probe; wait for the timeout.
            return std::future::pending().await;
        };
        loop {
            if let Some((stream, _route)) = self.probe_connection(id, target).await {
                for _ in 0..20 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    if self.queue_len(id, Protocol::Tcp) == Some(0) {
                        drop(stream);
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// One probe connection to `target` with its route to generation `id`.
    async fn probe_connection(
        &self,
        id: u32,
        target: SocketAddr,
    ) -> Option<(tokio::net::TcpStream, client::ProbeRoute)> {
        let socket = match target {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .ok()?;
        // From the target's own address: it is local (the generation listens on it).
        socket.bind(SocketAddr::new(target.ip(), 0)).ok()?;
        let source = socket.local_addr().ok()?;
        let route =
            match client::probe_route(&self.config.daemon_socket, &self.config.service, id, source)
                .await
            {
                Ok(route) => route,
                Err(err) => {
                    tracing::debug!("probe route for generation {id}: {}", error_chain(&err));
                    return None;
                }
            };
        let stream = socket.connect(target).await.ok()?;
        Some((stream, route))
    }

    /// What waits in the generation's socket for `protocol`: accepted-but-not-taken
    /// connections (TCP) or bytes of the next datagram (UDP).
    fn queue_len(&self, id: u32, protocol: Protocol) -> Option<u32> {
        let state = self.lock();
        let g = state.generations.get(&id)?;
        let (_, fd) = g.sockets.iter().find(|(p, _)| *p == protocol)?;
        queue_len(fd.as_fd(), protocol).ok()
    }

    /// Makes `id` active in the kernel.
    async fn switch_to(&self, id: u32) -> Result<Option<u32>, SupervisorError> {
        let shared = self.lock().generations.get(&id).is_some_and(|g| g.shared);
        // On a shared socket there is nothing to move: the new generation accepts already, and
        // the old one stops when it is drained.
        if !shared {
            let reply = self
                .daemon(Request::Switch {
                    service: self.config.service.clone(),
                    generation: id,
                })
                .await?;
            let Reply::Switched { .. } = reply else {
                return Err(SupervisorError::UnexpectedReply("to switch".into()));
            };
        }
        let mut state = self.lock();
        let previous = state.active.replace(id);
        if let Some(prev) = previous.filter(|&p| p != id) {
            if let Some(g) = state.generations.get_mut(&prev) {
                g.state = GenerationState::Ready;
                g.switched_away = Some(Instant::now());
            }
            state.previous = Some(prev);
        }
        if let Some(g) = state.generations.get_mut(&id) {
            g.state = GenerationState::Active;
            g.switched_at = Some(SystemTime::now());
            g.switched_away = None;
        }
        Ok(previous)
    }

    /// Drains `id`: waits until its sockets' queues are empty and settled, sends the drain
    /// signal, waits for the exit (killing after the drain timeout), then closes its sockets.
    async fn drain(self: &Arc<Self>, id: u32, progress: Progress<'_>) {
        let deadline = Instant::now() + self.config.drain_timeout;
        // The queue is watched for at most half the drain timeout, so that a queue that never
        // stays empty (a shutdown under load) still leaves the process time to finish.
        let queue_deadline = Instant::now() + self.config.drain_timeout / 2;
        let protocols: Vec<Protocol> = match self.lock().generations.get_mut(&id) {
            Some(g) => {
                // From now on `rollback` cannot pick it.
                g.state = GenerationState::Draining;
                if g.shared {
                    // A shared queue belongs to every generation: the new one goes on
                    // accepting from it.
                    Vec::new()
                } else {
                    g.sockets.iter().map(|(p, _)| *p).collect()
                }
            }
            None => return,
        };
        // A handshake half done at the switch completes into the old socket's queue within a
        // round trip; the settle time, counted from the switch, covers it. The queue must then
        // also stay empty for QUEUE_QUIET: a queue that was full at the switch empties while
        // handshakes held back by it are still completing. A shared (uds) queue is not the old
        // generation's to drain.
        let mut empty_since: Option<Instant> = None;
        let settled_at = self
            .lock()
            .generations
            .get(&id)
            .and_then(|g| g.switched_away)
            .unwrap_or_else(Instant::now)
            + self.config.drain_settle;
        while !protocols.is_empty() {
            if self.lock().generations.get(&id).is_none_or(|g| !g.alive()) {
                // Died meanwhile: what it left queued cannot be accepted any more.
                break;
            }
            let empty = protocols
                .iter()
                .all(|&p| self.queue_len(id, p).unwrap_or(0) == 0);
            let now = Instant::now();
            empty_since = if empty {
                empty_since.or(Some(now))
            } else {
                None
            };
            if now >= settled_at && empty_since.is_some_and(|since| now - since >= QUEUE_QUIET) {
                break;
            }
            if now >= queue_deadline {
                progress(format!(
                    "generation {id}: queue not empty after half the drain timeout; signalling anyway"
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let alive = {
            let mut state = self.lock();
            match state.generations.get_mut(&id) {
                Some(g) => {
                    g.state = GenerationState::Draining;
                    g.alive()
                }
                None => return,
            }
        };
        if alive {
            progress(format!(
                "generation {id}: queue drained; sent {}",
                self.config.drain_signal.as_str()
            ));
            let remaining = deadline.saturating_duration_since(Instant::now());
            let exit = self
                .kill_and_wait(id, self.config.drain_signal, remaining)
                .await;
            let exit = match exit {
                Some(exit) => exit,
                None => {
                    progress(format!(
                        "generation {id}: still running after the drain timeout ({}); killed",
                        humantime::format_duration(self.config.drain_timeout)
                    ));
                    self.kill_and_wait(id, Signal::SIGKILL, Duration::from_secs(10))
                        .await
                        .unwrap_or(ExitInfo {
                            code: None,
                            signal: Some(libc::SIGKILL),
                        })
                }
            };
            let after = self
                .lock()
                .generations
                .get(&id)
                .and_then(|g| g.switched_away)
                .map(|t| t.elapsed());
            progress(format!(
                "generation {id} exited ({exit}){}",
                after
                    .map(|a| format!(" {:.1} s after the switch", a.as_secs_f64()))
                    .unwrap_or_default()
            ));
        }
        let exit = self
            .lock()
            .generations
            .get(&id)
            .and_then(|g| *g.exit.borrow());
        self.retire_async(
            id,
            GenerationState::Exited {
                exit: exit.unwrap_or(ExitInfo {
                    code: None,
                    signal: None,
                }),
            },
        )
        .await;
    }

    /// Sends `signal` to `id`'s process and waits up to `timeout` for it to exit.
    async fn kill_and_wait(&self, id: u32, signal: Signal, timeout: Duration) -> Option<ExitInfo> {
        let (pid, mut exit) = {
            let state = self.lock();
            let g = state.generations.get(&id)?;
            (g.pid, g.exit.clone())
        };
        if exit.borrow().is_none() {
            if let Some(pid) = pid {
                if signal == Signal::SIGKILL {
                    // Killing a generation ends its whole tree, not only its main process.
                    end_tree(pid);
                } else {
                    // The drain signal goes to the main process, which tells its workers.
                    let _ = kill(Pid::from_raw(pid as i32), signal);
                }
            }
        }
        tokio::time::timeout(timeout, exit.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|e| *e))
    }

    /// Refuses a generation whose processes do not serve from the sockets they were given:
    /// none of them holds a socket any more, or one listens on a service address with a socket
    /// of its own (see `inspect`). Shared sockets (uds) are everyone's: nothing to check.
    fn check_uses_its_sockets(&self, id: u32, kept: Option<u32>) -> Result<(), SupervisorError> {
        let (pid, own) = {
            let state = self.lock();
            let Some(g) = state.generations.get(&id) else {
                return Ok(());
            };
            if g.shared {
                return Ok(());
            }
            let own: Vec<(Protocol, u64, Option<SocketAddr>)> = g
                .sockets
                .iter()
                .filter_map(|(p, fd)| {
                    let inode = nix::sys::stat::fstat(fd.as_raw_fd()).ok()?.st_ino;
                    Some((*p, inode, crate::socket::local_addr(fd.as_fd())))
                })
                .collect();
            (g.pid, own)
        };
        let Some(pid) = pid else {
            return Ok(());
        };
        let tree = match inspect::tree_sockets(pid) {
            Ok(tree) => tree,
            Err(err) => {
                tracing::warn!("cannot look at generation {id}'s sockets: {err}");
                return Ok(());
            }
        };
        // The more telling finding first: a socket of its own explains why it dropped ours.
        for (inode, (holder, protocol, addr)) in &tree.bound {
            let ours = own.iter().any(|(_, own, _)| own == inode);
            let on_service_address = self
                .config
                .listens
                .iter()
                .any(|l| l.protocol == *protocol && inspect::covers(*addr, l.addr));
            if !ours && on_service_address {
                return Err(SupervisorError::OwnSocket {
                    generation: id,
                    pid: *holder,
                    protocol: *protocol,
                    addr: *addr,
                    kept,
                });
            }
        }
        for (protocol, inode, addr) in &own {
            if !tree.held.contains(inode) {
                return Err(SupervisorError::NotUsingSocket {
                    generation: id,
                    protocol: *protocol,
                    addr: addr.map_or_else(|| "its address".to_owned(), |a| a.to_string()),
                    kept,
                });
            }
        }
        Ok(())
    }

    /// Collects the exit of every child that is not a generation's main process (whose exit
    /// tokio collects): orphans reparented to the supervisor as subreaper. Under the state lock,
    /// so a generation being spawned is recorded before its exit can be looked at.
    fn reap_orphans(&self) {
        use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
        let state = self.lock();
        loop {
            // Look without reaping: the first exited child might be a generation's.
            let peek = waitid(
                Id::All,
                WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
            );
            let pid = match peek {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => match status.pid() {
                    Some(pid) => pid,
                    None => return,
                },
            };
            let ours = state
                .generations
                .values()
                .any(|g| g.pid == Some(pid.as_raw() as u32));
            if ours {
                return;
            }
            let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
        }
    }

    /// Tells the daemon to forget the generation, then retires it. Telling first matters in the
    /// uds backend: a later generation's copy of the shared socket may get the same fd number.
    async fn retire_async(&self, id: u32, final_state: GenerationState) {
        let forget = Request::Forget {
            service: self.config.service.clone(),
            generation: id,
        };
        if let Err(err) = self.daemon(forget).await {
            tracing::warn!(
                "telling the daemon generation {id} is gone: {}",
                error_chain(&err)
            );
        }
        self.retire(id, final_state);
    }

    /// Closes a generation's sockets and keeps it in the history.
    fn retire(&self, id: u32, final_state: GenerationState) {
        let mut state = self.lock();
        if let Some(g) = state.generations.get_mut(&id) {
            if let (Some(away), None) = (g.switched_away, g.drained_after) {
                g.drained_after = Some(away.elapsed());
            }
            g.sockets.clear();
            g.notify = None;
            g.state = final_state;
        }
        let _ = std::fs::remove_file(self.notify_dir.join(format!("{id}.sock")));
        if state.previous == Some(id) {
            state.previous = None;
            state.last_retired_previous = Some((id, Instant::now()));
        }
        // Keep the last few exited generations for `status`.
        let retired: Vec<u32> = state
            .generations
            .iter()
            .filter(|(_, g)| g.sockets.is_empty())
            .map(|(&id, _)| id)
            .collect();
        for old in retired.iter().take(retired.len().saturating_sub(8)) {
            state.generations.remove(old);
        }
    }

    /// `hotswap upgrade`.
    async fn upgrade(
        self: &Arc<Self>,
        command: Option<Vec<String>>,
        ready: Option<ReadyMode>,
        ready_timeout: Option<Duration>,
        progress: Progress<'_>,
    ) -> Result<String, SupervisorError> {
        let command = {
            let mut state = self.lock();
            if state.stopping {
                return Err(SupervisorError::Stopping);
            }
            if let Some(generation) = state.upgrading {
                return Err(SupervisorError::UpgradeInProgress {
                    service: self.config.service.clone(),
                    generation,
                });
            }
            // Reserve the slot before any await, so two upgrades cannot both pass the check.
            state.upgrading = Some(0);
            command.unwrap_or_else(|| state.command.clone())
        };
        let result = self
            .upgrade_steps(
                command,
                ready.or(self.config.ready),
                ready_timeout.unwrap_or(self.config.ready_timeout),
                progress,
            )
            .await;
        self.lock().upgrading = None;
        result
    }

    async fn upgrade_steps(
        self: &Arc<Self>,
        command: Vec<String>,
        ready: Option<ReadyMode>,
        ready_timeout: Duration,
        progress: Progress<'_>,
    ) -> Result<String, SupervisorError> {
        let old = self.lock().active;
        let new = self.start_generation(command.clone(), ready).await?;
        {
            let mut state = self.lock();
            state.upgrading = Some(new);
            state.protected = Some(new);
        }
        let pid = self.lock().generations.get(&new).and_then(|g| g.pid);
        progress(format!(
            "generation {new} started (pid {})",
            pid.map_or("?".into(), |p| p.to_string())
        ));
        let after = self.wait_ready(new, ready_timeout).await?;
        if self.lock().stopping {
            // The supervisor is shutting down: do not switch to a generation it will drain.
            self.kill_and_wait(new, Signal::SIGKILL, Duration::from_secs(5))
                .await;
            self.retire_async(
                new,
                GenerationState::Failed {
                    reason: "the supervisor stopped".into(),
                },
            )
            .await;
            return Err(SupervisorError::Stopping);
        }
        progress(format!(
            "generation {new} ready after {} ms",
            after.as_millis()
        ));
        if let Err(err) = self.check_uses_its_sockets(new, old) {
            self.kill_and_wait(new, Signal::SIGKILL, Duration::from_secs(5))
                .await;
            self.retire_async(
                new,
                GenerationState::Failed {
                    reason: err.to_string(),
                },
            )
            .await;
            return Err(err);
        }
        self.switch_to(new).await?;
        match old {
            Some(old) => progress(format!("switched {old} -> {new}")),
            None => progress(format!("switched to {new}")),
        }
        self.lock().command = command;
        let Some(old) = old else {
            self.lock().protected = None;
            return Ok(format!("generation {new} is active"));
        };

        // Grace: if the new generation dies now while the old one can still serve, go back.
        let mut exit = self.lock().generations[&new].exit.clone();
        let switched = Instant::now();
        let died =
            match tokio::time::timeout(self.config.grace, exit.wait_for(Option::is_some)).await {
                Ok(Ok(exit)) => Some(exit.unwrap_or(ExitInfo {
                    code: None,
                    signal: None,
                })),
                _ => None,
            };
        if let Some(exit) = died {
            let old_alive = self
                .lock()
                .generations
                .get(&old)
                .is_some_and(|g| g.alive() && !g.sockets.is_empty());
            if old_alive && self.lock().active == Some(new) {
                self.switch_to(old).await?;
                progress(format!("generation {new} exited ({exit}) within the grace period; switched back to {old}"));
                self.retire_async(new, GenerationState::Exited { exit })
                    .await;
                return Err(SupervisorError::RolledBack {
                    generation: new,
                    exit,
                    after: switched.elapsed(),
                    back: old,
                });
            }
        }
        // Past the grace period, the new generation is like any other: if it dies now it is
        // restarted.
        self.lock().protected = None;
        // A death in the grace period that did not roll back (the old generation was gone):
        // hand it to the restart logic now.
        let dead_serial = match self.lock().generations.get(&new) {
            Some(g) if !g.alive() => Some(g.serial),
            _ => None,
        };
        if let (Some(exit), Some(serial)) = (died, dead_serial) {
            self.on_exit(new, serial, exit);
        }
        if self.lock().active != Some(new) {
            // The operator rolled back meanwhile: drain the new one instead.
            let back = self.lock().active.unwrap_or(old);
            self.drain(new, progress).await;
            return Err(SupervisorError::RolledBackByOperator(back));
        }
        self.drain(old, progress).await;
        Ok(format!("generation {new} is active"))
    }

    /// `hotswap rollback`.
    async fn rollback(self: &Arc<Self>, progress: Progress<'_>) -> Result<String, SupervisorError> {
        let (active, previous) = {
            let state = self.lock();
            (state.active, state.previous)
        };
        let cannot = |why: String| SupervisorError::CannotRollBack {
            service: self.config.service.clone(),
            why,
        };
        let retired = self.lock().last_retired_previous;
        let previous = previous.ok_or_else(|| match retired {
            Some((id, when)) => cannot(format!(
                "generation {id} was drained and exited {:.0} s ago (rollback works until the old generation is drained, i.e. within --grace after an upgrade)",
                when.elapsed().as_secs_f64()
            )),
            None => cannot("there is no previous generation".into()),
        })?;
        {
            let state = self.lock();
            let g = state.generations.get(&previous);
            match g.map(|g| (&g.state, g.alive() && !g.sockets.is_empty())) {
                Some((GenerationState::Ready, true)) => {}
                Some((GenerationState::Draining, _)) => {
                    return Err(cannot(format!("generation {previous} is draining already")))
                }
                _ => return Err(cannot(format!("generation {previous} has exited"))),
            }
        }
        self.switch_to(previous).await?;
        progress(format!(
            "switched {} -> {previous}",
            active.map_or("-".into(), |a| a.to_string())
        ));
        Ok(format!("generation {previous} is active"))
    }

    fn report(&self) -> SupervisorReport {
        let state = self.lock();
        SupervisorReport {
            pid: std::process::id(),
            listens: self.config.listens.clone(),
            active: state.active,
            upgrading: state.upgrading.filter(|&g| g != 0),
            restarts: state.restarts,
            generations: state.generations.values().map(Generation::report).collect(),
        }
    }

    /// A generation's process exited. An active generation that died on its own restarts with
    /// backoff on the same sockets, so connections queue meanwhile and nothing is refused.
    fn on_exit(self: &Arc<Self>, id: u32, serial: u64, exit: ExitInfo) {
        let mut state = self.lock();
        let restart = !state.stopping
            && state.active == Some(id)
            && state.protected != Some(id)
            && state
                .generations
                .get(&id)
                .is_some_and(|g| g.serial == serial && !g.sockets.is_empty());
        if !restart {
            return;
        }
        state.restarts += 1;
        let g = state.generations.get_mut(&id).expect("checked");
        let uptime = g.spawned.elapsed();
        if uptime >= RESTART_RESET {
            g.restarts = 0;
        }
        g.restarts += 1;
        let backoff = if uptime >= RESTART_RESET {
            Duration::ZERO
        } else {
            (RESTART_BACKOFF.0 * 2u32.saturating_pow(g.restarts.saturating_sub(1).min(16)))
                .min(RESTART_BACKOFF.1)
        };
        let restarts = g.restarts;
        drop(state);
        tracing::warn!(
            "generation {id} exited on its own ({exit}); restart {restarts} in {} ms",
            backoff.as_millis()
        );
        let supervisor = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(backoff).await;
            let (exit_tx, exit_rx) = watch::channel(None);
            {
                let mut state = supervisor.lock();
                let still_wanted = !state.stopping && state.active == Some(id);
                match state.generations.get_mut(&id) {
                    // Switched away from, retired or restarted meanwhile: nothing to do.
                    Some(g) if still_wanted && g.serial == serial && !g.sockets.is_empty() => {
                        g.exit = exit_rx;
                    }
                    _ => return,
                }
            }
            match supervisor.spawn_process(id, exit_tx.clone()) {
                Ok(()) => tracing::info!("generation {id} restarted"),
                Err(err) => {
                    tracing::error!("restarting generation {id}: {}", error_chain(&err));
                    // Count it as another death, so the next try comes after a longer wait.
                    let exit = ExitInfo {
                        code: None,
                        signal: None,
                    };
                    let _ = exit_tx.send(Some(exit));
                    let _ = supervisor.events.send((id, serial, exit));
                }
            }
        });
    }

    async fn serve_control(self: Arc<Self>, stream: UnixStream) -> Result<(), FrameError> {
        let uid = stream.peer_cred()?.uid();
        let connection = Arc::new(tokio::sync::Mutex::new(Connection::new(stream)));
        let request: SupervisorRequest = match connection.lock().await.receive().await {
            Ok(r) => r,
            Err(err) => {
                let done = SupervisorMessage::Done {
                    ok: false,
                    message: format!("malformed request: {err}"),
                };
                return connection.lock().await.send(&done).await;
            }
        };
        if uid != 0 {
            let done = SupervisorMessage::Done {
                ok: false,
                message: format!(
                    "permission denied: uid {uid} may not control hotswap (only root may)"
                ),
            };
            return connection.lock().await.send(&done).await;
        }
        let (lines_tx, mut lines_rx) = mpsc::unbounded_channel::<String>();
        let progress = move |line: String| {
            tracing::info!("{line}");
            let _ = lines_tx.send(line);
        };
        let forward = {
            let connection = Arc::clone(&connection);
            async move {
                while let Some(line) = lines_rx.recv().await {
                    let _ = connection
                        .lock()
                        .await
                        .send(&SupervisorMessage::Progress { line })
                        .await;
                }
            }
        };
        let work = async {
            let result = match request {
                SupervisorRequest::Status => return Some(SupervisorMessage::Status(self.report())),
                SupervisorRequest::Upgrade {
                    command,
                    ready,
                    ready_timeout_ms,
                } => {
                    self.upgrade(
                        command,
                        ready,
                        ready_timeout_ms.map(Duration::from_millis),
                        &progress,
                    )
                    .await
                }
                SupervisorRequest::Rollback => self.rollback(&progress).await,
            };
            drop(progress);
            Some(match result {
                Ok(message) => SupervisorMessage::Done { ok: true, message },
                Err(err) => {
                    tracing::warn!("{}", error_chain(&err));
                    SupervisorMessage::Done {
                        ok: false,
                        message: error_chain(&err),
                    }
                }
            })
        };
        let (done, ()) = tokio::join!(work, forward);
        if let Some(done) = done {
            connection.lock().await.send(&done).await?;
        }
        Ok(())
    }
}

/// The readiness used when none is given: the tcp probe where it can tell generations apart
/// (own sockets, a TCP address), else a delay.
pub fn default_ready(listens: &[ListenSpec], shared: bool) -> ReadyMode {
    if !shared && listens.iter().any(|l| l.protocol == Protocol::Tcp) {
        ReadyMode::Tcp
    } else {
        ReadyMode::Delay(Duration::from_secs(1))
    }
}

/// Kills every process in the process group `pid` leads (a generation's tree; see
/// `process::spawn_activated`). Nothing to do when the group is gone.
fn end_tree(pid: u32) {
    let _ = nix::sys::signal::killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
}

/// Makes this process the reaper of its descendants' orphans (`PR_SET_CHILD_SUBREAPER`): a
/// worker whose parent exits comes back to the supervisor instead of init, so it is still in
/// reach, and [`Supervisor::reap_orphans`] collects its exit.
fn become_subreaper() -> io::Result<()> {
    // SAFETY: a prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The one address a generation's socket can be bound to for these `--listen`s of one
/// protocol: the address itself when there is one, `[::]` (dual-stack) for `0.0.0.0` and `[::]`
/// on one port; `None` when they are several addresses or ports.
fn exact_address(listens: &[&ListenSpec]) -> Option<SocketAddr> {
    let first = listens.first()?.addr;
    if listens.iter().all(|l| l.addr == first) {
        return Some(first);
    }
    let same_port = listens.iter().all(|l| l.addr.port() == first.port());
    let unspecified = listens.iter().all(|l| l.addr.ip().is_unspecified());
    (same_port && unspecified).then(|| SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), first.port()))
}

/// A loopback address of the socket's family when it is bound to the unspecified address.
fn loopback_for(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// Connections waiting in a TCP listener's accept queue (`TCP_INFO.tcpi_unacked` of a
/// listening socket), or the size of the next datagram waiting in a UDP socket (`SIOCINQ`).
pub fn queue_len(fd: BorrowedFd<'_>, protocol: Protocol) -> io::Result<u32> {
    match protocol {
        Protocol::Tcp => {
            // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes.
            let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            // SAFETY: info and len describe a valid buffer.
            let rc = unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_INFO,
                    (&raw mut info).cast(),
                    &mut len,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(info.tcpi_unacked)
        }
        Protocol::Udp => {
            let mut pending: libc::c_int = 0;
            // SAFETY: SIOCINQ writes one int.
            let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut pending) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(pending as u32)
        }
    }
}

/// Runs a service until `shutdown` completes: starts generation 1, switches to it, serves
/// `upgrade`/`rollback`/`status`, restarts generations that die on their own. On shutdown every
/// generation is drained. Returns an error if the first generation never gets ready.
pub async fn run(
    config: RunConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), SupervisorError> {
    if config.drain_settle + QUEUE_QUIET >= config.drain_timeout / 2 {
        return Err(SupervisorError::SettleNotBelowTimeout {
            settle: config.drain_settle,
            timeout: config.drain_timeout,
        });
    }
    let control_path = supervisor_socket(&config.daemon_socket, &config.service);
    if let Some(dir) = control_path.parent() {
        std::fs::create_dir_all(dir).map_err(PathError::at("creating", dir))?;
    }
    let lock_path = control_path.with_extension("lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(PathError::at("opening", &lock_path))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
        .map_err(|_| SupervisorError::AlreadyRunning(config.service.clone()))?;
    let notify_dir = control_path.with_extension("notify");
    let _ = std::fs::remove_dir_all(&notify_dir);
    std::fs::create_dir_all(&notify_dir).map_err(PathError::at("creating", &notify_dir))?;

    if let Err(err) = become_subreaper() {
        tracing::warn!("cannot become the reaper of orphaned workers: {err}");
    }
    let mut orphans = tokio::time::interval(ORPHAN_REAP_INTERVAL);
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let supervisor = Arc::new(Supervisor {
        state: Mutex::new(State {
            generations: BTreeMap::new(),
            active: None,
            previous: None,
            upgrading: Some(0),
            protected: None,
            last_retired_previous: None,
            command: config.command.clone(),
            restarts: 0,
            stopping: false,
        }),
        config,
        events: events_tx,
        notify_dir: notify_dir.clone(),
    });
    let log = |line: String| tracing::info!("{line}");
    let service = supervisor.config.service.clone();

    // Generation 1, with exits watched while it starts.
    supervisor.ensure_bindings().await?;
    let first = async {
        let command = supervisor.config.command.clone();
        supervisor
            .upgrade_steps(
                command,
                supervisor.config.ready,
                supervisor.config.ready_timeout,
                &log,
            )
            .await
    };
    tokio::pin!(first);
    tokio::pin!(shutdown);
    let started = loop {
        tokio::select! {
            result = &mut first => break result,
            Some((id, serial, exit)) = events.recv() => supervisor.on_exit(id, serial, exit),
            _ = orphans.tick() => supervisor.reap_orphans(),
            () = &mut shutdown => {
                supervisor.lock().stopping = true;
                break Err(SupervisorError::Stopping);
            }
        }
    };
    supervisor.lock().upgrading = None;
    if let Err(err) = started {
        let _ = std::fs::remove_dir_all(&notify_dir);
        return Err(err);
    }
    // Tell systemd, when it started us with Type=notify.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    let _ = std::fs::remove_file(&control_path);
    let listener =
        UnixListener::bind(&control_path).map_err(PathError::at("binding", &control_path))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&control_path, std::fs::Permissions::from_mode(0o600))
            .map_err(PathError::at("restricting", &control_path))?;
    }
    tracing::info!(
        "service {service} running; control socket {}",
        control_path.display()
    );
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some((id, serial, exit)) = events.recv() => supervisor.on_exit(id, serial, exit),
            _ = orphans.tick() => supervisor.reap_orphans(),
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let supervisor = Arc::clone(&supervisor);
                    tokio::spawn(async move {
                        if let Err(err) = supervisor.serve_control(stream).await {
                            tracing::debug!("control connection: {}", error_chain(&err));
                        }
                    });
                }
            }
        }
    }

    tracing::info!("stopping service {service}: draining every generation");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    supervisor.lock().stopping = true;
    // Let an upgrade in flight end first (it gives up at its next step), so it cannot switch
    // while everything is being drained.
    let patience = supervisor.config.ready_timeout
        + supervisor.config.grace
        + supervisor.config.drain_timeout
        + Duration::from_secs(5);
    let deadline = Instant::now() + patience;
    while supervisor.lock().upgrading.is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let live: Vec<u32> = supervisor
        .lock()
        .generations
        .iter()
        .filter(|(_, g)| !g.sockets.is_empty())
        .map(|(&id, _)| id)
        .collect();
    for id in live {
        supervisor.drain(id, &log).await;
    }
    supervisor.reap_orphans();
    let _ = std::fs::remove_file(&control_path);
    let _ = std::fs::remove_dir_all(&notify_dir);
    Ok(())
}

/// Sends one request to a service's supervisor; progress lines go to `on_progress`. Returns the
/// final message, or the status report.
pub async fn request(
    daemon_socket: &Path,
    service: &ServiceName,
    request: &SupervisorRequest,
    on_progress: &mut dyn FnMut(&str),
) -> Result<SupervisorMessage, SupervisorError> {
    let path = supervisor_socket(daemon_socket, service);
    let stream = UnixStream::connect(&path)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                SupervisorError::NotRunning(service.clone())
            }
            _ => PathError::at("connecting to", &path)(e).into(),
        })?;
    let mut connection = Connection::new(stream);
    connection.send(request).await?;
    loop {
        match connection.receive::<SupervisorMessage>().await? {
            SupervisorMessage::Progress { line } => on_progress(&line),
            SupervisorMessage::Done { ok: false, message } => {
                return Err(SupervisorError::Refused(message))
            }
            done => return Ok(done),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(listens: &[&str]) -> Option<SocketAddr> {
        let specs: Vec<ListenSpec> = listens.iter().map(|l| l.parse().unwrap()).collect();
        exact_address(&specs.iter().collect::<Vec<_>>())
    }

    #[test]
    fn a_generation_binds_the_listen_address_when_there_is_one() {
        assert_eq!(
            exact(&["tcp://127.0.0.1:8080"]),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            exact(&["tcp://[::1]:53"]),
            Some("[::1]:53".parse().unwrap())
        );
        // 0.0.0.0 and [::] on one port: one dual-stack socket on [::].
        assert_eq!(
            exact(&["tcp://0.0.0.0:80", "tcp://[::]:80"]),
            Some("[::]:80".parse().unwrap())
        );
        // Several addresses or ports cannot be one socket's.
        assert_eq!(exact(&["tcp://127.0.0.1:80", "tcp://127.0.0.2:80"]), None);
        assert_eq!(exact(&["tcp://0.0.0.0:80", "tcp://[::]:81"]), None);
    }
}
