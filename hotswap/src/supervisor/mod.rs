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

mod control;
mod error;
mod inspect;
mod process;
mod readiness;
mod sockets;
pub mod spec;
mod tree;
mod wire;

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

pub use control::request;
pub use error::SupervisorError;
pub use process::{resolve_program, SpawnError};
pub use readiness::{default_ready, queue_len};
use spec::{ListenSpec, ReadyMode};
use tree::{become_subreaper, end_tree};
pub use wire::{
    ExitInfo, GenerationReport, GenerationState, SupervisorMessage, SupervisorReport,
    SupervisorRequest,
};

use crate::{
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
    fd_passing: spec::FdPassing,
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
    /// What the backend could do when the generation started: whether its sockets are its
    /// own (draining waits for their queue) and whether a switch moves connections.
    capabilities: Capabilities,
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
    /// What the next upgrade runs, unless it says otherwise: the command, and how it is handed
    /// its sockets.
    command: Vec<String>,
    fd_passing: spec::FdPassing,
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
                    })
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// Creates a generation: sockets, registration, process. Returns its id.
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
        let sockets = self.create_sockets(capabilities.sockets)?;
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
            fd_passing,
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
            capabilities,
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
            process::spawn_activated(&generation.command, &sockets, generation.fd_passing, &env)?;
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

    /// Closes the generation's sockets, tells the daemon to forget it, and retires it. Closing
    /// first leaves the daemon's copy (where the backend keeps one, as reuseport does) the last,
    /// so the socket leaves its group when the daemon says, not a moment later.
    async fn retire_async(&self, id: u32, final_state: GenerationState) {
        if let Some(g) = self.lock().generations.get_mut(&id) {
            g.sockets.clear();
        }
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
        pass_fds: Option<spec::FdPassing>,
        ready: Option<ReadyMode>,
        ready_timeout: Option<Duration>,
        progress: Progress<'_>,
    ) -> Result<String, SupervisorError> {
        let launch = {
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
            (
                command.unwrap_or_else(|| state.command.clone()),
                pass_fds.unwrap_or(state.fd_passing),
            )
        };
        let result = self
            .upgrade_steps(
                launch,
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
        launch: (Vec<String>, spec::FdPassing),
        ready: Option<ReadyMode>,
        ready_timeout: Duration,
        progress: Progress<'_>,
    ) -> Result<String, SupervisorError> {
        let old = self.lock().active;
        let new = self.start_generation(launch.clone(), ready).await?;
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
        {
            let mut state = self.lock();
            state.command = launch.0;
            state.fd_passing = launch.1;
        }
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
        // An old generation that shut its listener down on the way out may have shut down the
        // new one's too (a shared socket): never report success over a dead socket.
        if self.ensure_listening(new).await? {
            progress(format!(
                "generation {new}: its socket had been shut down (by the old generation, which shares it); it listens again"
            ));
        }
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
            fd_passing: config.fd_passing,
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
        let launch = (
            supervisor.config.command.clone(),
            supervisor.config.fd_passing,
        );
        supervisor
            .upgrade_steps(
                launch,
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
