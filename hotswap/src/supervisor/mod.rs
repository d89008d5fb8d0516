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

mod adopt;
mod control;
mod error;
mod inspect;
mod keeper;
mod notify;
mod process;
mod readiness;
mod record;
mod reexec;
mod relay;
mod sockets;
pub mod spec;
mod tree;
mod upgrade;
mod wire;

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

// tokio's clock, so that every deadline and wait runs on one clock (and tests can pause it).
use tokio::time::Instant;

use nix::{
    fcntl::Flock,
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use serde::{Deserialize, Serialize};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::{mpsc, watch},
};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

pub use control::{report, request, running_services};
pub use error::SupervisorError;
pub use keeper::keep;
use keeper::Keeper;
pub use process::{resolve_program, SpawnError};
pub use readiness::{default_ready, queue_len};
pub use record::RecordError;
use record::{ProcessId, UpgradePhase, UpgradeRecord};
pub use reexec::accept_stop_signals;
use spec::{ListenSpec, ReadyMode};
use tree::{become_subreaper, end_tree};
pub use wire::{
    ExitInfo, GenerationReport, GenerationState, SupervisorMessage, SupervisorReport,
    SupervisorRequest, UpgradeCounts,
};

use crate::{
    admission::{refuse, AcceptBackoff, Admission, Allowed, Limits},
    backend::{Capabilities, Support},
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

/// The longest any one conversation with the daemon may take: a stopped or wedged daemon
/// fails the step that needed it, never the supervisor.
const DAEMON_DEADLINE: Duration = Duration::from_secs(10);

/// How long a generation killed with SIGKILL may take to be gone.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The environment variable through which a re-executed supervisor finds the lock it holds.
const LOCK_FD_VARIABLE: &str = "HOTSWAP_RUN_LOCK_FD";

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
    /// Where the supervisor keeps its control socket, lock and record ([`default_run_dir`]).
    pub run_dir: PathBuf,
    /// Give every generation a handoff channel (`HOTSWAP_HANDOFF_FD`), relayed to the active
    /// generation: a draining generation hands its established connections over.
    pub handoff: bool,
}

/// The supervisor's control socket for `service`, in the supervisors' directory `run_dir`
/// (its lock and record are beside it).
pub fn supervisor_socket(run_dir: &Path, service: &ServiceName) -> PathBuf {
    run_dir.join(format!("{service}.run.sock"))
}

/// Where supervisors keep their sockets, locks and records when `--run-dir` does not say:
/// root's beside the daemon's socket; an operator's (not root), who cannot write there, in
/// `$XDG_RUNTIME_DIR/hotswap`, or `/tmp/hotswap-<uid>` without one. Either is checked to be
/// the operator's alone before use.
pub fn default_run_dir(daemon_socket: &Path) -> PathBuf {
    let euid = nix::unistd::geteuid().as_raw();
    if euid == 0 {
        return daemon_socket.parent().unwrap_or(Path::new("/")).to_owned();
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("hotswap"),
        _ => PathBuf::from(format!("/tmp/hotswap-{euid}")),
    }
}

fn ms_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A generation's notify socket: the name its processes got, what they said, and the task
/// that reads it (aborted with the generation).
struct NotifyLink {
    name: String,
    state: watch::Receiver<notify::NotifyState>,
    _task: AbortOnDropHandle<()>,
}

struct Generation {
    id: u32,
    command: Vec<String>,
    fd_passing: spec::FdPassing,
    /// The supervisor's own copies: what keeps a draining generation's queue alive after its
    /// process closed its listener, and what a restart hands over.
    sockets: Vec<(Protocol, OwnedFd)>,
    /// Holds the sockets (and the notify socket) for as long as the generation lives, whatever
    /// happens to the supervisor; the daemon's registration names it.
    keeper: Keeper,
    /// The current process; its pid leads the generation's process group.
    process: Option<ProcessId>,
    /// The current process's pid for the notify task's sender check.
    main_pid: Arc<std::sync::atomic::AtomicU32>,
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
    notify: Option<NotifyLink>,
    /// What the backend could do when the generation started: whether its sockets are its
    /// own (draining waits for their queue) and whether a switch moves connections.
    capabilities: Capabilities,
}

impl Generation {
    fn pid(&self) -> Option<u32> {
        self.process.map(|p| p.pid)
    }

    fn report(&self) -> GenerationReport {
        let notified = self.notify.as_ref().map(|n| n.state.borrow().clone());
        GenerationReport {
            id: self.id,
            pid: self.pid(),
            command: self.command.clone(),
            state: self.state.clone(),
            started_at_ms: ms_since_epoch(self.started_at),
            ready_after_ms: self.ready_after.map(|d| d.as_millis() as u64),
            switched_at_ms: self.switched_at.map(ms_since_epoch),
            drained_after_ms: self.drained_after.map(|d| d.as_millis() as u64),
            restarts: self.restarts,
            keeper: Some(self.keeper.pid()),
            notify_status: notified.as_ref().and_then(|n| n.status.clone()),
            notify_stopping: notified.as_ref().is_some_and(|n| n.stopping),
            watchdog_at_ms: notified.and_then(|n| n.watchdog_at).map(ms_since_epoch),
            handed_over: 0,
            adopted: 0,
        }
    }

    fn alive(&self) -> bool {
        self.exit.borrow().is_none()
    }

    fn saved(&self) -> record::SavedGeneration {
        record::SavedGeneration {
            id: self.id,
            keeper: ProcessId {
                pid: self.keeper.pid(),
                start_time: self.keeper.start_time(),
            },
            process: self.process.filter(|_| self.alive()),
            protocols: self.sockets.iter().map(|(p, _)| *p).collect(),
            notify: self.notify.as_ref().map(|n| n.name.clone()),
            command: self.command.clone(),
            fd_passing: self.fd_passing,
            ready: self.ready,
            state: self.state.clone(),
            started_at_ms: ms_since_epoch(self.started_at),
            ready_after_ms: self.ready_after.map(|d| d.as_millis() as u64),
            switched_at_ms: self.switched_at.map(ms_since_epoch),
            restarts: self.restarts,
            capabilities: self.capabilities,
        }
    }
}

struct State {
    generations: BTreeMap<u32, Generation>,
    active: Option<u32>,
    previous: Option<u32>,
    /// The upgrade in flight and its phase.
    upgrade: Option<UpgradeRecord>,
    /// The last previous generation retired, and when: for a helpful `rollback` refusal.
    last_retired_previous: Option<(u32, Instant)>,
    /// What the next upgrade runs, unless it says otherwise: the command, and how it is handed
    /// its sockets.
    command: Vec<String>,
    fd_passing: spec::FdPassing,
    restarts: u32,
    /// How upgrades ended, and how long the last one took.
    upgrades: UpgradeCounts,
    last_upgrade: Option<Duration>,
    stopping: bool,
}

struct Supervisor {
    config: RunConfig,
    state: Mutex<State>,
    events: mpsc::UnboundedSender<(u32, u64, ExitInfo)>,
    /// Where the record of the generations goes (see `record`).
    record_path: PathBuf,
    /// Writes it, off the runtime's thread.
    recorder: record::Recorder,
    /// Cancelled when the supervisor stops: an upgrade in flight gives up at its next step.
    stop: CancellationToken,
    /// What a re-exec runs, and the lock it hands on.
    exec: reexec::ExecPlan,
    /// When this supervisor's image started.
    started_at: SystemTime,
    /// Generations this image adopted from a predecessor.
    adopted: Mutex<Vec<u32>>,
    /// With `--handoff`: what passes connections from generation to generation.
    relay: Option<relay::Relay>,
}

/// Sends `progress` lines somewhere: the log for `run`, a client for `upgrade`.
type Progress<'a> = &'a (dyn Fn(String) + Send + Sync);

impl Supervisor {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One request to the daemon, given up after [`DAEMON_DEADLINE`].
    async fn daemon(&self, request: Request) -> Result<Reply, SupervisorError> {
        match tokio::time::timeout(
            DAEMON_DEADLINE,
            client::request(&self.config.daemon_socket, &request),
        )
        .await
        {
            Ok(reply) => Ok(reply?),
            Err(_) => Err(SupervisorError::DaemonTimeout(DAEMON_DEADLINE)),
        }
    }

    /// Writes the record down (on the recorder's thread). A record that cannot be written (a
    /// full disk) costs only the adoption after a crash, never the service: it is logged.
    fn save(&self) {
        let saved = {
            let state = self.lock();
            record::SavedRun {
                version: record::VERSION,
                supervisor: std::process::id(),
                listens: self.config.listens.clone(),
                command: state.command.clone(),
                fd_passing: state.fd_passing,
                active: state.active,
                upgrade: state.upgrade,
                restarts: state.restarts,
                upgrades: state.upgrades,
                last_upgrade_ms: state.last_upgrade.map(|d| d.as_millis() as u64),
                generations: state
                    .generations
                    .values()
                    .filter(|g| !g.sockets.is_empty())
                    .map(Generation::saved)
                    .collect(),
            }
        };
        self.recorder.record(saved);
    }

    /// Moves the upgrade in flight to `phase` and writes it down.
    fn set_phase(&self, phase: UpgradePhase) {
        if let Some(upgrade) = self.lock().upgrade.as_mut() {
            upgrade.phase = phase;
        }
        self.save();
    }

    /// What the daemon's backend can do.
    async fn capabilities(&self) -> Result<Capabilities, SupervisorError> {
        let Reply::Status(status) = self.daemon(Request::Status).await? else {
            return Err(SupervisorError::UnexpectedReply("to status".into()));
        };
        Ok(status.backend.capabilities)
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
                        owner: None,
                    })
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// Creates a generation: sockets, keeper, registration, process. Returns its id. Whatever
    /// it made is undone when a later step fails.
    async fn start_generation(
        self: &Arc<Self>,
        (command, fd_passing): (Vec<String>, spec::FdPassing),
        ready: Option<ReadyMode>,
    ) -> Result<u32, SupervisorError> {
        if self.lock().stopping {
            return Err(SupervisorError::Stopping);
        }
        process::resolve_program(command.first().ok_or(SpawnError::NoCommand)?)?;
        let capabilities = self.capabilities().await?;
        let ready = match (ready, capabilities.probe) {
            (Some(ReadyMode::Tcp), Support::No(lack)) => {
                return Err(SupervisorError::TcpProbeUnsupported(lack))
            }
            (Some(mode), _) => mode,
            (None, probe) => default_ready(&self.config.listens, probe.yes()),
        };
        let sockets = self.create_sockets(capabilities.sockets).await?;
        // The notify socket is bound before the id is known: its name carries a placeholder
        // generation number of 0 and randomness, which is all a name needs.
        let notify = if ready == ReadyMode::Notify {
            Some(
                notify::bind(self.config.service.as_str(), 0)
                    .map_err(|source| SupervisorError::NotifySocket { source })?,
            )
        } else {
            None
        };
        let mut held: Vec<BorrowedFd<'_>> = sockets.iter().map(|(_, fd)| fd.as_fd()).collect();
        if let Some((socket, _)) = &notify {
            held.push(socket.as_fd());
        }
        let starting = Instant::now();
        let keeper = Keeper::start(&held, self.config.service.as_str(), 0)?;
        drop(held);
        if starting.elapsed() > Duration::from_secs(1) {
            tracing::warn!(
                "starting the new generation's keeper took {} ms",
                starting.elapsed().as_millis()
            );
        }
        self.set_phase(UpgradePhase::Preparing {
            keeper: Some(ProcessId {
                pid: keeper.pid(),
                start_time: keeper.start_time(),
            }),
        });
        let label = crate::model::label_from(&command.join(" "));
        let registered = self
            .daemon(Request::Register {
                service: self.config.service.clone(),
                pid: keeper.pid(),
                fds: (0..sockets.len()).map(Keeper::fd_number).collect(),
                label: Some(label),
                activate: false,
            })
            .await;
        let id = match registered {
            Ok(Reply::Registered { generation, .. }) => generation,
            Ok(_) => {
                keeper.end();
                return Err(SupervisorError::UnexpectedReply("to register".into()));
            }
            Err(err) => {
                // A registration whose reply was lost names the keeper: it goes with it.
                keeper.end();
                return Err(err);
            }
        };
        let (exit_tx, exit_rx) = watch::channel(None);
        let main_pid = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let notify = notify.map(|(socket, name)| self.serve_notify(socket, name, &main_pid));
        let generation = Generation {
            id,
            command,
            fd_passing,
            sockets,
            keeper,
            process: None,
            main_pid,
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
            capabilities,
        };
        self.lock().generations.insert(id, generation);
        self.set_phase(UpgradePhase::Starting { new: id });
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

    /// Starts the task that serves a generation's notify socket for the generation's whole
    /// life, taking datagrams only from the generation's own processes.
    fn serve_notify(
        &self,
        socket: std::os::unix::net::UnixDatagram,
        name: String,
        main_pid: &Arc<std::sync::atomic::AtomicU32>,
    ) -> NotifyLink {
        let (tx, rx) = watch::channel(notify::NotifyState::default());
        let main_pid = Arc::clone(main_pid);
        let belongs = move |pid: u32| {
            let main = main_pid.load(std::sync::atomic::Ordering::Relaxed);
            main != 0 && notify::in_generation(pid, main)
        };
        let task = tokio::spawn(notify::serve(socket, belongs, tx));
        NotifyLink {
            name,
            state: rx,
            _task: AbortOnDropHandle::new(task),
        }
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
        let mut env: Vec<(&str, &OsStr)> = vec![
            ("HOTSWAP_SERVICE", OsStr::new(self.config.service.as_str())),
            ("HOTSWAP_GENERATION", OsStr::new(&id_text)),
        ];
        if let Some(notify) = &generation.notify {
            env.push(("NOTIFY_SOCKET", OsStr::new(&notify.name)));
        }
        let handoff = match &self.relay {
            Some(relay) => Some(relay.join(id).map_err(|err| {
                SupervisorError::Spawn(SpawnError::Spawn {
                    program: generation.command[0].clone(),
                    source: io::Error::other(err),
                })
            })?),
            None => None,
        };
        let child = process::spawn_activated(
            &generation.command,
            &sockets,
            generation.fd_passing,
            handoff.as_ref().map(|fd| fd.as_fd()),
            &env,
        )?;
        // The child has its end; ours must not outlive it in this process.
        drop(handoff);
        let pid = child.id();
        // Our unreaped child: its pid is its own until we collect it through this pidfd.
        let pidfd = crate::socket::Pidfd::open(pid).map_err(|err| {
            SupervisorError::Spawn(SpawnError::Spawn {
                program: generation.command[0].clone(),
                source: io::Error::other(err),
            })
        })?;
        generation.process = Some(ProcessId {
            pid,
            start_time: inspect::start_time(pid).unwrap_or(0),
        });
        generation
            .main_pid
            .store(pid, std::sync::atomic::Ordering::Relaxed);
        generation.serial += 1;
        generation.spawned = Instant::now();
        let serial = generation.serial;
        drop(state);
        self.watch_exit(id, serial, pid, pidfd, exit_tx);
        self.save();
        Ok(())
    }

    /// Watches generation `id`'s process `pid` (its `serial`th) until it exits, then ends what
    /// it left in its process group and reports the exit.
    fn watch_exit(
        self: &Arc<Self>,
        id: u32,
        serial: u64,
        pid: u32,
        pidfd: crate::socket::Pidfd,
        exit_tx: watch::Sender<Option<ExitInfo>>,
    ) {
        let supervisor = Arc::clone(self);
        tokio::spawn(async move {
            let exit = tree::wait_exit(pidfd, pid).await;
            // Receivers keep seeing this value after the sender is gone.
            let _ = exit_tx.send(Some(exit));
            let _ = supervisor.events.send((id, serial, exit));
        });
    }

    /// Makes `id` active in the kernel.
    async fn switch_to(&self, id: u32) -> Result<Option<u32>, SupervisorError> {
        let switches = self
            .lock()
            .generations
            .get(&id)
            .is_some_and(|g| g.capabilities.switch.yes());
        // Where the backend cannot switch (one shared socket) there is nothing to move: the new
        // generation accepts already, and the old one stops when it is drained.
        if switches {
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
        let previous = self.mark_active(id);
        self.save();
        Ok(previous)
    }

    /// Records `id` as active (the kernel steers to it), the one before as previous.
    fn mark_active(&self, id: u32) -> Option<u32> {
        if let Some(relay) = &self.relay {
            relay.target(Some(id));
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
        previous
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
                g.switched_away.get_or_insert_with(Instant::now);
                if !g.capabilities.socket_per_generation {
                    // A shared queue belongs to every generation: the new one goes on
                    // accepting from it.
                    Vec::new()
                } else {
                    g.sockets.iter().map(|(p, _)| *p).collect()
                }
            }
            None => return,
        };
        self.save();
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
                    self.kill_and_wait(id, Signal::SIGKILL, KILL_WAIT)
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
                exit: exit.unwrap_or(ExitInfo::UNKNOWN),
            },
        )
        .await;
    }

    /// Closes the generation's sockets, ends its keeper (waiting until it is gone), tells the
    /// daemon to forget it, and retires it. Closing first leaves the daemon's copy (where the
    /// backend keeps one, as reuseport does) the last, so the socket leaves its group when the
    /// daemon says, not a moment later; where the daemon cannot be told, its reaper sees the
    /// keeper gone.
    async fn retire_async(&self, id: u32, final_state: GenerationState) {
        if let Some(g) = self.lock().generations.get_mut(&id) {
            g.sockets.clear();
        }
        self.end_keeper(id).await;
        let forget = Request::Forget {
            service: self.config.service.clone(),
            generation: id,
        };
        if let Err(err) = self.daemon(forget).await {
            // The daemon's reaper may have let go of it first (its descriptors are closed), or
            // the daemon is not running: a restarted one forgets it when it adopts.
            tracing::debug!(
                "telling the daemon generation {id} is gone: {}",
                error_chain(&err)
            );
        }
        self.retire(id, final_state);
    }

    /// Ends generation `id`'s keeper and waits until it is gone.
    async fn end_keeper(&self, id: u32) {
        // Out of the lock for the wait: the keeper moves out of the generation and back.
        let keeper = {
            let mut state = self.lock();
            let Some(g) = state.generations.get_mut(&id) else {
                return;
            };
            g.keeper.end();
            g.keeper.pid()
        };
        let gone_by = Instant::now() + Duration::from_secs(1);
        while Instant::now() < gone_by {
            let gone = self
                .lock()
                .generations
                .get(&id)
                .is_none_or(|g| g.keeper.gone());
            if gone {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tracing::warn!("generation {id}'s keeper (pid {keeper}) is still there 1 s after SIGKILL");
    }

    /// Makes sure generation `id`'s TCP sockets listen: a process that shut its listener down
    /// shut it down for every holder. Where the backend switches, a switch to the generation
    /// makes the daemon repair it at once; otherwise the daemon's upkeep does within
    /// milliseconds. Returns whether one had to be repaired.
    async fn ensure_listening(&self, id: u32) -> Result<bool, SupervisorError> {
        let dead = |supervisor: &Self| {
            let state = supervisor.lock();
            state.generations.get(&id).is_some_and(|g| {
                g.sockets.iter().any(|(p, fd)| {
                    *p == Protocol::Tcp && !crate::socket::is_listening(fd.as_fd()).unwrap_or(true)
                })
            })
        };
        if !dead(self) {
            return Ok(false);
        }
        let (switches, active) = {
            let state = self.lock();
            let switches = state
                .generations
                .get(&id)
                .is_some_and(|g| g.capabilities.switch.yes());
            (switches, state.active == Some(id))
        };
        if switches && active {
            self.daemon(Request::Switch {
                service: self.config.service.clone(),
                generation: id,
            })
            .await?;
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        while dead(self) {
            if Instant::now() >= deadline {
                return Err(SupervisorError::DeadListener(id));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(true)
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
        drop(state);
        self.save();
    }

    fn report(&self) -> SupervisorReport {
        let state = self.lock();
        SupervisorReport {
            pid: std::process::id(),
            listens: self.config.listens.clone(),
            active: state.active,
            upgrading: state.upgrade.and_then(|u| u.phase.new_generation()),
            upgrade_phase: state.upgrade.map(|u| u.phase.name().to_owned()),
            started_at_ms: ms_since_epoch(self.started_at),
            binary: self.exec.binary().display().to_string(),
            adopted: self
                .adopted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            restarts: state.restarts,
            upgrades: state.upgrades,
            last_upgrade_ms: state.last_upgrade.map(|d| d.as_millis() as u64),
            handed_over: self.relay.as_ref().map_or(0, relay::Relay::handed_over),
            generations: state
                .generations
                .values()
                .map(|g| {
                    let mut report = g.report();
                    if let Some(relay) = &self.relay {
                        let counts = relay.counts(g.id);
                        (report.handed_over, report.adopted) = (counts.handed_over, counts.adopted);
                    }
                    report
                })
                .collect(),
        }
    }

    /// A generation's process exited. An active generation that died on its own restarts with
    /// backoff on the same sockets, so connections queue meanwhile and nothing is refused.
    fn on_exit(self: &Arc<Self>, id: u32, serial: u64, exit: ExitInfo) {
        let mut state = self.lock();
        let restart = !state.stopping
            && state.active == Some(id)
            && !state
                .upgrade
                .is_some_and(|u| u.phase.protects_new() && u.phase.new_generation() == Some(id))
            && state
                .generations
                .get(&id)
                .is_some_and(|g| g.serial == serial && !g.sockets.is_empty());
        if !restart {
            return;
        }
        state.restarts += 1;
        let g = state.generations.get_mut(&id).expect("checked");
        g.process = None;
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
            // A process that shut its listener down on its way out left the socket dead for
            // the next one: it listens again first.
            let listening = match supervisor.ensure_listening(id).await {
                Ok(repaired) => {
                    if repaired {
                        tracing::warn!(
                            "generation {id}: its socket had been shut down by the process that died; it listens again"
                        );
                    }
                    Ok(())
                }
                Err(err) => Err(err),
            };
            match listening.and_then(|()| supervisor.spawn_process(id, exit_tx.clone())) {
                Ok(()) => tracing::info!("generation {id} restarted"),
                Err(err) => {
                    tracing::error!("restarting generation {id}: {}", error_chain(&err));
                    // Count it as another death, so the next try comes after a longer wait.
                    let exit = ExitInfo::UNKNOWN;
                    let _ = exit_tx.send(Some(exit));
                    let _ = supervisor.events.send((id, serial, exit));
                }
            }
        });
    }
}

/// Runs a service until `shutdown` completes: adopts the generations a supervisor before it
/// left (see `adopt`), or starts generation 1 and switches to it; serves
/// `upgrade`/`rollback`/`status`/`reexec`; restarts generations that die on their own. Each
/// message on `reexec` (SIGHUP) re-executes the supervisor in place. On shutdown every
/// generation is drained, at once, within the drain timeout and a few seconds. Returns an
/// error if the first generation never gets ready.
pub async fn run(
    config: RunConfig,
    shutdown: impl std::future::Future<Output = ()>,
    reexec_requests: mpsc::UnboundedReceiver<()>,
) -> Result<(), SupervisorError> {
    if config.drain_settle + QUEUE_QUIET >= config.drain_timeout / 2 {
        return Err(SupervisorError::SettleNotBelowTimeout {
            settle: config.drain_settle,
            timeout: config.drain_timeout,
        });
    }
    let control_path = supervisor_socket(&config.run_dir, &config.service);
    if let Some(dir) = control_path.parent() {
        crate::files::private_dir(dir)?;
    }
    let lock = reexec::take_lock(&control_path.with_extension("lock"), &config.service)?;
    let record_path = record::path(&control_path);
    let saved = record::load(&record_path)?;

    if let Err(err) = become_subreaper() {
        tracing::warn!("cannot become the reaper of orphaned workers: {err}");
    }
    let mut orphans = tokio::time::interval(ORPHAN_REAP_INTERVAL);
    let reconciling = tokio::time::interval(RECONCILE_INTERVAL);
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let relay = config.handoff.then(relay::Relay::start);
    let supervisor = Arc::new(Supervisor {
        state: Mutex::new(State {
            generations: BTreeMap::new(),
            active: None,
            previous: None,
            upgrade: None,
            last_retired_previous: None,
            command: config.command.clone(),
            fd_passing: config.fd_passing,
            restarts: 0,
            upgrades: UpgradeCounts::default(),
            last_upgrade: None,
            stopping: false,
        }),
        config,
        events: events_tx,
        record_path: record_path.clone(),
        recorder: record::Recorder::new(record_path.clone()),
        stop: CancellationToken::new(),
        exec: reexec::ExecPlan::new(lock.as_raw_fd()),
        started_at: SystemTime::now(),
        adopted: Mutex::new(Vec::new()),
        relay,
    });
    let log = |line: String| tracing::info!("{line}");

    let adopted = match saved {
        Some(saved) => supervisor.adopt(saved, &log).await?,
        None => false,
    };
    if adopted {
        // The bindings were made before; a daemon that is away now is told when it returns.
        if let Err(err) = supervisor.ensure_bindings().await {
            tracing::warn!("checking the service's bindings: {}", error_chain(&err));
        }
    } else {
        // Generation 1, with exits watched while it starts.
        supervisor.ensure_bindings().await?;
        let first = async {
            let launch = supervisor.begin_upgrade()?;
            supervisor
                .run_upgrade(
                    launch,
                    supervisor.config.ready,
                    supervisor.config.ready_timeout,
                    &log,
                    upgrade::Counted::FirstStart,
                )
                .await
        };
        tokio::pin!(first);
        tokio::pin!(shutdown);
        let mut stop_asked = false;
        let started = loop {
            tokio::select! {
                result = &mut first => break result,
                Some((id, serial, exit)) = events.recv() => supervisor.on_exit(id, serial, exit),
                _ = orphans.tick() => supervisor.reap_orphans(),
                // The first generation gives up at its next step and is undone.
                () = &mut shutdown, if !stop_asked => {
                    stop_asked = true;
                    supervisor.lock().stopping = true;
                    supervisor.stop.cancel();
                },
            }
        };
        if started.is_err() || stop_asked {
            supervisor.stop_all(&log).await;
            supervisor.recorder.flush(Duration::from_secs(5));
            record::remove(&record_path);
            return started.map(|_| ());
        }
        return serve(
            Arc::clone(&supervisor),
            shutdown,
            events,
            reexec_requests,
            orphans,
            reconciling,
        )
        .await;
    }
    tokio::pin!(shutdown);
    serve(
        supervisor,
        shutdown,
        events,
        reexec_requests,
        orphans,
        reconciling,
    )
    .await
}

/// How often the supervisor checks that the kernel steers to its active generation.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);

/// Serves the control socket until `shutdown`, then stops every generation.
async fn serve(
    supervisor: Arc<Supervisor>,
    mut shutdown: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    mut events: mpsc::UnboundedReceiver<(u32, u64, ExitInfo)>,
    mut reexec_requests: mpsc::UnboundedReceiver<()>,
    mut orphans: tokio::time::Interval,
    mut reconciling: tokio::time::Interval,
) -> Result<(), SupervisorError> {
    let log = |line: String| tracing::info!("{line}");
    let service = supervisor.config.service.clone();
    let control_path = supervisor_socket(&supervisor.config.run_dir, &service);
    // Tell systemd, when it started us with Type=notify (again after a re-exec: harmless).
    let _ = crate::activation::notify("READY=1");

    // We hold the service's lock, so a socket left here is a dead supervisor's.
    let listener = crate::files::bind_private_socket(&control_path).and_then(|bound| {
        UnixListener::from_std(bound).map_err(PathError::at("serving", &control_path))
    })?;
    tracing::info!(
        "service {service} running; control socket {}",
        control_path.display()
    );
    let reconciler = Arc::new(tokio::sync::Semaphore::new(1));
    // The same admission as the daemon's control socket, checked before reading: root, and
    // the user the supervisor runs as (an operator's own `hotswap upgrade`).
    let euid = nix::unistd::geteuid().as_raw();
    let allowed = if euid == 0 {
        Allowed::Root
    } else {
        Allowed::RootAndUser(euid)
    };
    let mut admission = Admission::new(Limits::default(), allowed);
    let mut backoff = AcceptBackoff::default();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some((id, serial, exit)) = events.recv() => supervisor.on_exit(id, serial, exit),
            _ = orphans.tick() => supervisor.reap_orphans(),
            _ = reconciling.tick() => {
                // One at a time, off the loop: a stopped daemon holds it up to its deadline.
                if let Ok(permit) = Arc::clone(&reconciler).try_acquire_owned() {
                    let supervisor = Arc::clone(&supervisor);
                    tokio::spawn(async move {
                        supervisor.reconcile().await;
                        drop(permit);
                    });
                }
            }
            Some(()) = reexec_requests.recv() => {
                let Err(err) = supervisor.reexec();
                tracing::warn!("re-executing the supervisor: {}", error_chain(&err));
            }
            uid = admission.ended() => admission.release(uid),
            accepted = async { backoff.ready().await; listener.accept().await } => {
                let Some(stream) = backoff.accepted(accepted) else { continue };
                match admission.admit_peer(&stream) {
                    Ok((_, ticket)) => {
                        let (supervisor, idle) = (Arc::clone(&supervisor), admission.limits().idle);
                        tokio::spawn(async move {
                            if let Err(err) = supervisor.serve_control(stream, idle).await {
                                tracing::debug!("control connection: {}", error_chain(&err));
                            }
                            drop(ticket);
                        });
                    }
                    Err(refusal) => {
                        let done = SupervisorMessage::Done { ok: false, message: refusal.to_string(), code: Some(refusal.code()) };
                        refuse(&stream, &refusal, &done);
                    }
                }
            }
        }
    }

    tracing::info!("stopping service {service}: draining every generation");
    let _ = crate::activation::notify("STOPPING=1");
    supervisor.stop_all(&log).await;
    let _ = std::fs::remove_file(&control_path);
    supervisor.recorder.flush(Duration::from_secs(5));
    record::remove(&supervisor.record_path);
    Ok(())
}

impl Supervisor {
    /// Stops the service: an upgrade in flight gives up at its next step (undoing a generation
    /// not switched to yet) while every other live generation drains, all at once (one already
    /// draining is waited for); whatever the upgrade left live drains after it. Takes at most
    /// the drain timeout and about 20 s of deadlines.
    async fn stop_all(self: &Arc<Self>, log: Progress<'_>) {
        self.lock().stopping = true;
        self.stop.cancel();
        let upgrade_settled = async {
            let deadline = Instant::now() + 2 * DAEMON_DEADLINE + KILL_WAIT;
            while Instant::now() < deadline && self.lock().upgrade.is_some() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let first = self.live_generations();
        tokio::join!(upgrade_settled, self.stop_generations(first, log));
        let rest = self.live_generations();
        if !rest.is_empty() {
            tracing::debug!("stopping: the upgrade left {rest:?} live");
        }
        self.stop_generations(rest, log).await;
        self.reap_orphans();
    }

    /// Live generations not in the hands of an upgrade that is undoing them, and whether each
    /// is draining already.
    fn live_generations(&self) -> Vec<(u32, bool)> {
        let state = self.lock();
        let undoing = state
            .upgrade
            .filter(|u| {
                !matches!(
                    u.phase,
                    UpgradePhase::Grace { .. } | UpgradePhase::Draining { .. }
                )
            })
            .and_then(|u| u.phase.new_generation());
        state
            .generations
            .iter()
            .filter(|(&id, g)| !g.sockets.is_empty() && Some(id) != undoing)
            .map(|(&id, g)| (id, g.state == GenerationState::Draining))
            .collect()
    }

    /// Drains `generations` at once; one draining already is waited for.
    async fn stop_generations(self: &Arc<Self>, generations: Vec<(u32, bool)>, log: Progress<'_>) {
        let patience = self.config.drain_timeout + KILL_WAIT + DAEMON_DEADLINE;
        let stops = generations.into_iter().map(|(id, draining)| async move {
            if draining {
                let gone_by = Instant::now() + patience;
                while Instant::now() < gone_by
                    && self
                        .lock()
                        .generations
                        .get(&id)
                        .is_some_and(|g| !g.sockets.is_empty())
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            } else {
                self.drain(id, log).await;
            }
        });
        futures::future::join_all(stops).await;
    }
}
