//! The daemon: owns the backend and the registry, serves the control socket.
//!
//! [`run`] takes the shutdown signal as a future, so tests and embedders decide when it stops.
//! Stopping leaves the kernel state pinned: steering goes on without a daemon, and the next
//! daemon adopts it.

use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use nix::fcntl::Flock;
use tokio::{
    io::unix::AsyncFd,
    net::{UnixListener, UnixStream},
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    access::{self, AccessError, Action, Peer},
    admission::{refuse, AcceptBackoff, Admission, Allowed, Limits, Ticket, MAX_REQUEST_FRAME},
    backend::{
        reuseport::{probe_support, unsupported as reuseport_unsupported, ReuseportBackend},
        sk_lookup::{default_pin_dir, SkLookupBackend, SkLookupError, Unavailable, NETNS_PATH},
        uds::UdsBackend,
        Backend, BackendError,
    },
    config::{ConfigFile, ReloadError, Reloader},
    error_chain,
    model::ServiceName,
    protocol::{Connection, ErrorCode, Reply, Request, Response, WireError},
    registry::{Registry, RegistryError},
    socket::netns_inode,
    PathError,
};

/// The control socket's default path.
pub const DEFAULT_SOCKET: &str = "/run/hotswap/hotswap.sock";

/// How often the daemon checks whether generations' processes still hold their sockets.
const REAP_INTERVAL: Duration = Duration::from_millis(100);

/// How often the daemon checks that listening sockets still listen (those it holds itself, and
/// every active generation's): one a process shut down listens again within this.
const UPKEEP_INTERVAL: Duration = Duration::from_millis(5);

/// How long a stopping daemon lets its control connections finish the request each is
/// handling (and send its answer) before it exits anyway.
const ANSWER_BEFORE_EXIT: Duration = Duration::from_secs(5);

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Control socket path.
    pub socket: PathBuf,
    /// bpffs state directory; `None` for `/sys/fs/bpf/hotswap/<netns inode>`.
    pub pin_dir: Option<PathBuf>,
    /// Turn on the eBPF program's debug log lines and forward them to tracing.
    pub debug_ebpf: bool,
    /// Which backend to use.
    pub backend: BackendChoice,
    /// What the control socket allows each peer.
    pub limits: Limits,
    /// A group whose members may connect to the control socket too (operators who are not
    /// root; each request is then authorised against its service's owner).
    pub socket_group: Option<u32>,
    /// The config file applied at start and on reload (`None`: bindings come only from
    /// commands).
    pub config: Option<ConfigFile>,
    /// Where to serve Prometheus metrics (`None`: nowhere).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// The daemon could not start or failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another daemon serves the control socket.
    #[error("another hotswap daemon{} is already serving control socket {}", crate::files::held_by(holder), socket.display())]
    SocketInUse {
        /// The control socket.
        socket: PathBuf,
        /// The pid holding its lock, when the kernel says.
        holder: Option<u32>,
    },
    /// The control socket's directory is not hotswap's alone.
    #[error("the control socket's directory cannot be used")]
    SocketDir(#[from] crate::files::PrivateDirError),
    /// A file-system or socket operation failed.
    #[error(transparent)]
    Io(#[from] crate::PathError),
    /// `--backend sk-lookup` where it cannot work.
    #[error("--backend sk-lookup cannot work here: {0} (`hotswap doctor` says more; --backend auto would use another backend)")]
    SkLookupUnavailable(Unavailable),
    /// `--backend reuseport` where the kernel refuses reuseport programs.
    #[error("--backend reuseport cannot work here: the kernel refuses a SO_ATTACH_REUSEPORT_CBPF program")]
    ReuseportUnavailable(#[source] io::Error),
    /// Checking for reuseport programs failed for a reason that says nothing about the kernel.
    #[error("checking whether the kernel takes reuseport programs failed")]
    ReuseportProbe(#[source] io::Error),
    /// The backend could not be set up.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The registry could not adopt the pinned state.
    #[error("adopting the pinned state failed")]
    Registry(#[from] RegistryError),
    /// The program's debug-log switch could not be set.
    #[error("setting the eBPF debug-log switch failed")]
    DebugLog(#[source] RegistryError),
    /// The eBPF log reader could not start.
    #[error("reading the eBPF program's log failed")]
    Logger(#[from] aya_log::Error),
    /// The config file could not be applied at start.
    #[error("applying the config file {} failed", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<ReloadError>,
    },
    /// The metrics address could not be listened on.
    #[error("listening for metrics scrapes on {address} failed")]
    MetricsListen {
        /// The address.
        address: std::net::SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Takes `<socket>.lock`, so two daemons never fight over one socket path. With a socket
/// group, its members may pass through the socket's directory (to the socket only).
fn lock_socket_path(
    socket: &Path,
    socket_group: Option<u32>,
) -> Result<Flock<std::fs::File>, DaemonError> {
    if let Some(dir) = socket.parent() {
        match socket_group {
            Some(gid) => crate::files::shared_dir(dir, gid)?,
            None => crate::files::private_dir(dir)?,
        }
    }
    let lock_path = crate::with_suffix(socket, ".lock");
    let file = crate::files::open_lock_file(&lock_path)?;
    crate::files::lock_exclusive(file, &lock_path).map_err(|err| match err {
        crate::files::LockError::Held { holder, .. } => DaemonError::SocketInUse {
            socket: socket.to_owned(),
            holder,
        },
        crate::files::LockError::Failed(err) => err.into(),
    })
}

/// Where the uds backend keeps its state: beside the control socket, whose lock guards it.
pub fn uds_state_path(socket: &Path) -> PathBuf {
    crate::with_suffix(socket, ".uds-state.json")
}

/// Where the reuseport backend keeps its state: beside the control socket, too.
pub fn reuseport_state_path(socket: &Path) -> PathBuf {
    crate::with_suffix(socket, ".reuseport-state.json")
}

/// Binds the control socket, readable and writable by its owner (root) only, and by the
/// socket group's members where there is one.
fn bind_control_socket(
    socket: &Path,
    socket_group: Option<u32>,
) -> Result<UnixListener, DaemonError> {
    // We hold the lock, so a file left here is a dead daemon's.
    let listener = crate::files::bind_socket(socket, socket_group)?;
    UnixListener::from_std(listener).map_err(|err| PathError::at("serving", socket)(err).into())
}

/// Which backend the daemon uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// sk_lookup where the program can be loaded and attached, else reuseport where the
    /// kernel takes reuseport programs, else uds.
    #[default]
    Auto,
    /// sk_lookup or fail.
    SkLookup,
    /// reuseport or fail.
    Reuseport,
    /// The shared-socket fallback.
    Uds,
}

/// Where the non-bpffs backends keep their state: beside the control socket, whose lock
/// guards it.
struct StatePaths {
    uds: PathBuf,
    reuseport: PathBuf,
}

/// Opens the chosen backend. `auto` falls back only when the error says a backend cannot work
/// on this host (errno-based), never for a problem with this daemon's own state: sk_lookup,
/// then reuseport, then uds.
fn choose_backend(
    choice: BackendChoice,
    pin_dir: &Path,
    netns: u64,
    paths: &StatePaths,
) -> Result<Box<dyn Backend>, DaemonError> {
    let uds = |reason: String| -> Result<Box<dyn Backend>, DaemonError> {
        Ok(Box::new(
            UdsBackend::open(reason, &paths.uds).map_err(BackendError::from)?,
        ))
    };
    let reuseport = |reason: String| -> Result<Box<dyn Backend>, DaemonError> {
        Ok(Box::new(
            ReuseportBackend::open(reason, &paths.reuseport).map_err(BackendError::from)?,
        ))
    };
    // sk_lookup, or why it cannot work here (any other error stops the daemon).
    let sk_lookup = || -> Result<Result<Box<dyn Backend>, Unavailable>, DaemonError> {
        match SkLookupBackend::open(pin_dir, netns) {
            Ok(backend) => Ok(Ok(Box::new(backend))),
            Err(err) => match err.unavailable_reason() {
                Some(reason) => {
                    log_details(&err);
                    // Leave no empty state directory behind (fails harmlessly if not empty).
                    let _ = std::fs::remove_dir(pin_dir);
                    Ok(Err(reason))
                }
                None => Err(BackendError::from(err).into()),
            },
        }
    };
    match choice {
        BackendChoice::Uds => uds("uds backend forced with --backend uds".to_owned()),
        BackendChoice::Reuseport => {
            probe_support().map_err(DaemonError::ReuseportUnavailable)?;
            reuseport("reuseport backend forced with --backend reuseport".to_owned())
        }
        BackendChoice::SkLookup => sk_lookup()?.map_err(DaemonError::SkLookupUnavailable),
        BackendChoice::Auto => match sk_lookup()? {
            Ok(backend) => Ok(backend),
            Err(reason) => match probe_support() {
                Ok(()) => {
                    tracing::warn!("sk_lookup is unavailable, using reuseport: {reason}");
                    reuseport(format!(
                        "chosen automatically: sk_lookup is unavailable: {reason}; the kernel takes reuseport programs, which need no privileges"
                    ))
                }
                Err(err) if !reuseport_unsupported(&err) => Err(DaemonError::ReuseportProbe(err)),
                Err(err) => {
                    tracing::warn!(
                        "sk_lookup is unavailable ({reason}) and reuseport too ({err}), using uds"
                    );
                    uds(format!(
                        "chosen automatically: sk_lookup is unavailable: {reason}; the kernel refuses reuseport programs ({err})"
                    ))
                }
            },
        },
    }
}

/// At debug level, what the one-line reason leaves out: the error's whole cause chain and
/// the verifier's whole log.
fn log_details(err: &SkLookupError) {
    tracing::debug!("sk_lookup failed: {}", error_chain(err));
    if let Some(log) = err.verifier_log() {
        tracing::debug!("the verifier's whole log:\n{log}");
    }
}

/// Runs the daemon until `shutdown` completes.
pub async fn run(
    config: DaemonConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let ns_path = Path::new(NETNS_PATH);
    let netns = netns_inode(ns_path).map_err(PathError::at("reading", ns_path))?;
    let pin_dir = match &config.pin_dir {
        Some(dir) => dir.clone(),
        None => default_pin_dir().map_err(PathError::at("reading", ns_path))?,
    };
    // A config that cannot be read stops the start before anything changes.
    let mut reloader = config
        .config
        .clone()
        .map(|file| Reloader::new(file, crate::config::applied_path(&config.socket)));
    let initial = reloader
        .as_ref()
        .map(|reloader| {
            reloader.read().map_err(|err| DaemonError::Config {
                path: reloader.file().path.clone(),
                source: Box::new(err.into()),
            })
        })
        .transpose()?;
    let _socket_lock = lock_socket_path(&config.socket, config.socket_group)?;
    let backend = choose_backend(
        config.backend,
        &pin_dir,
        netns,
        &StatePaths {
            uds: uds_state_path(&config.socket),
            reuseport: reuseport_state_path(&config.socket),
        },
    )?;
    let (mut registry, notes) = Registry::adopt(backend, netns)?;
    let info = registry.backend_info();
    tracing::info!("backend {}: {}", info.name, info.reason);
    if let Some(id) = info.program_id {
        tracing::info!("program id {id}, state {}", info.state_dir);
    }
    for note in notes {
        tracing::info!("{note}");
    }
    registry
        .set_debug_log(config.debug_ebpf)
        .map_err(DaemonError::DebugLog)?;
    if let (Some(reloader), Some(initial)) = (&mut reloader, initial) {
        let path = reloader.file().path.clone();
        let applied =
            reloader
                .apply(&mut registry, initial)
                .map_err(|source| DaemonError::Config {
                    path: path.clone(),
                    source: Box::new(source),
                })?;
        log_applied(&path, &applied);
    }
    let metrics_listener = config
        .metrics_listen
        .map(|address| {
            crate::exporter::bind(address)
                .map_err(|source| DaemonError::MetricsListen { address, source })
        })
        .transpose()?;
    let logger = match (config.debug_ebpf, info.program_id) {
        (true, Some(program_id)) => Some(spawn_ebpf_logger(program_id)?),
        _ => None,
    };

    let listener = bind_control_socket(&config.socket, config.socket_group)?;
    tracing::info!("listening on {}", config.socket.display());
    let registry = Arc::new(Mutex::new(registry));
    let reloader = Arc::new(Mutex::new(reloader));
    let stopping = CancellationToken::new();
    let exporter = metrics_listener.map(|listener| {
        tracing::info!(
            "serving Prometheus metrics on http://{}/metrics",
            listener
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string())
        );
        let source = Scrapes {
            registry: Arc::clone(&registry),
            run_dir: crate::supervisor::default_run_dir(&config.socket),
        };
        tokio::spawn(crate::exporter::serve(listener, source, stopping.clone()))
    });
    // SIGHUP reloads the config (systemd's ExecReload); without a handler it would kill.
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| PathError::at("handling SIGHUP for", &config.socket)(e))?;
    let mut reap_timer = tokio::time::interval(REAP_INTERVAL);
    let mut upkeep_timer = tokio::time::interval(UPKEEP_INTERVAL);
    upkeep_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    // Tell systemd (Type=notify) that the control socket answers: units ordered after this
    // one can run `hotswap run` now.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    // The accept loop owns the count of connections per peer; connections report their end.
    let allowed = match config.socket_group {
        Some(gid) => Allowed::RootAndGroup(gid),
        None => Allowed::Root,
    };
    let mut admission = Admission::new(config.limits, allowed);
    let mut backoff = AcceptBackoff::default();
    let connections = TaskTracker::new();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            uid = admission.ended() => admission.release(uid),
            accepted = async { backoff.ready().await; listener.accept().await } => {
                let Some(stream) = backoff.accepted(accepted) else { continue };
                match admission.admit_peer(&stream) {
                    Ok((peer, ticket)) => {
                        let connection = ControlConnection {
                            registry: Arc::clone(&registry),
                            reloader: Arc::clone(&reloader),
                            peer,
                            _ticket: ticket,
                            idle: admission.limits().idle,
                            stopping: stopping.clone(),
                        };
                        connections.spawn(async move {
                            if let Err(err) = connection.serve(stream).await {
                                tracing::debug!("control connection: {}", error_chain(&err));
                            }
                        });
                    }
                    Err(refusal) => {
                        let response: Response = Err(WireError::new(refusal.code(), &refusal));
                        refuse(&stream, &refusal, &response);
                    }
                }
            }
            _ = hangups.recv() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading, monotonic_now()]);
                reload(&registry, &reloader);
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            }
            _ = upkeep_timer.tick() => {
                let mut registry = lock(&registry);
                for (service, repaired) in registry.upkeep() {
                    tracing::warn!("service {service}: {repaired}");
                }
                for (service, generation) in registry.relisten_active() {
                    tracing::warn!("generation {generation} of service {service}: its socket had been shut down (by its process); it listens again and takes the service's connections");
                }
            }
            _ = reap_timer.tick() => {
                let reaped = lock(&registry).reap();
                for r in reaped {
                    let why = if r.process_exited { "its process exited" } else { "its process closed the socket" };
                    let what = if r.was_active { "; the service has no active socket now" } else { "" };
                    tracing::info!("generation {} of service {} is gone: {why}{what}", r.generation, r.service);
                }
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("stopping; what the kernel or the generations hold stays in place");
    // No new connection (a client now finds no daemon, rather than a socket that never
    // answers); each open one finishes the request it is handling and answers it.
    let _ = std::fs::remove_file(&config.socket);
    drop(listener);
    stopping.cancel();
    connections.close();
    if tokio::time::timeout(ANSWER_BEFORE_EXIT, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "{} control connections were still answering after {}; exiting anyway",
            connections.len(),
            humantime::format_duration(ANSWER_BEFORE_EXIT)
        );
    }
    if let Some(exporter) = exporter {
        let _ = exporter.await;
    }
    if let Some(logger) = logger {
        logger.abort();
        if let Err(err) = lock(&registry).set_debug_log(false) {
            tracing::warn!("turning eBPF debug logging off: {}", error_chain(&err));
        }
    }
    Ok(())
}

fn lock<T>(shared: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves the registry as consistent as the last completed
    // operation made it; keep serving.
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `MONOTONIC_USEC=…`, which systemd wants with `RELOADING=1`.
fn monotonic_now() -> sd_notify::NotifyState<'static> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000
    });
    sd_notify::NotifyState::MonotonicUsec(now as i128)
}

/// SIGHUP: reloads the config, and logs what changed or why nothing did. Lock order: the
/// registry, then the reloader (as every control connection takes them).
fn reload(registry: &Mutex<Registry>, reloader: &Mutex<Option<Reloader>>) {
    let mut registry = lock(registry);
    let mut reloader = lock(reloader);
    let Some(reloader) = reloader.as_mut() else {
        tracing::info!("SIGHUP: the daemon runs without a config file; nothing to reload");
        return;
    };
    let path = reloader.file().path.clone();
    match reloader.reload(&mut registry) {
        Ok(applied) => log_applied(&path, &applied),
        Err(err) => tracing::error!(
            "reloading {}: {}; nothing changed",
            path.display(),
            error_chain(&err)
        ),
    }
}

fn log_applied(path: &Path, applied: &crate::config::Applied) {
    for change in &applied.changes {
        tracing::info!("config {}: {change}", path.display());
    }
    tracing::info!(
        "config {} applied: {} changes, {} services unchanged",
        path.display(),
        applied.changes.len(),
        applied.unchanged.len()
    );
}

/// What the metrics endpoint reads: the registry, and the supervisors in root's run directory.
#[derive(Clone)]
struct Scrapes {
    registry: Arc<Mutex<Registry>>,
    run_dir: PathBuf,
}

impl crate::exporter::Source for Scrapes {
    async fn scrape(&self) -> crate::exporter::Scrape {
        let (status, kernel) = {
            let registry = lock(&self.registry);
            (registry.status(), registry.metrics().ok())
        };
        let names = crate::supervisor::running_services(&self.run_dir);
        let reports = futures::future::join_all(names.iter().map(|name| {
            crate::supervisor::report(&self.run_dir, name, crate::exporter::SUPERVISOR_DEADLINE)
        }))
        .await;
        let supervisors = names
            .iter()
            .zip(reports)
            .map(|(name, report)| (name.to_string(), report.ok()))
            .collect();
        crate::exporter::Scrape {
            status,
            kernel,
            supervisors,
        }
    }
}

fn spawn_ebpf_logger(program_id: u32) -> Result<tokio::task::JoinHandle<()>, DaemonError> {
    let logger = aya_log::EbpfLogger::init_from_id(program_id)?;
    // SAFETY: the logger owns its ring buffer's fd for as long as the AsyncFd holds it.
    let mut logger = unsafe { AsyncFd::register(logger) }
        .map_err(|e| PathError::at("polling", Path::new("AYA_LOGS"))(e.into()))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

/// One admitted control connection: requests in, answers out, until the peer closes it, it
/// stays idle too long, or the daemon stops.
struct ControlConnection {
    registry: Arc<Mutex<Registry>>,
    reloader: Arc<Mutex<Option<Reloader>>>,
    peer: Peer,
    /// Counts the connection against its peer's uid while it lives.
    _ticket: Ticket,
    idle: Duration,
    stopping: CancellationToken,
}

impl ControlConnection {
    async fn serve(self, stream: UnixStream) -> Result<(), crate::protocol::FrameError> {
        let mut connection = Connection::with_max_frame(stream, MAX_REQUEST_FRAME);
        // Probes routed for this connection end with it, however it ends.
        let mut probes = ProbesOf {
            registry: &self.registry,
            sources: Vec::new(),
        };
        loop {
            // A connection that holds a probe route stays open on purpose: the route lives
            // as long as it does.
            let idle = idle_limit(self.idle, probes.sources.is_empty());
            let bytes = tokio::select! {
                // A request already here is answered even when the daemon is stopping.
                biased;
                received = connection.receive_bytes() => match received? {
                    Some(bytes) => bytes,
                    None => return Ok(()),
                },
                () = self.stopping.cancelled() => return Ok(()),
                () = idle => {
                    tracing::debug!("closing a control connection idle for {}", humantime::format_duration(self.idle));
                    return Ok(());
                }
            };
            let Answer {
                response,
                attached,
                probe,
            } = answer(
                &mut lock(&self.registry),
                lock(&self.reloader).as_mut(),
                &bytes,
                &self.peer,
                probes.sources.len(),
            );
            if let Some(source) = probe {
                probes.sources.push(source);
            }
            drop(bytes);
            // A peer that does not read its answers holds the connection no longer than an
            // idle one.
            let sent = async {
                match attached {
                    Some(fd) => {
                        use std::os::fd::AsFd as _;
                        send_with_fd(connection.stream(), &response, fd.as_fd()).await
                    }
                    None => connection.send(&response).await,
                }
            };
            tokio::time::timeout(self.idle, sent)
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        }
    }
}

/// What the daemon says to one request frame.
struct Answer {
    response: Response,
    /// A descriptor to send with it.
    attached: Option<std::os::fd::OwnedFd>,
    /// A probe route the request made, which ends with its connection.
    probe: Option<std::net::SocketAddr>,
}

/// Decodes one request frame and carries it out for `peer`, whose connection holds
/// `probes_held` probe routes: everything the daemon does with what a peer sends, and so what
/// the fuzz run drives.
fn answer(
    registry: &mut Registry,
    reloader: Option<&mut Reloader>,
    bytes: &[u8],
    peer: &Peer,
    probes_held: usize,
) -> Answer {
    let request = match crate::protocol::decode::<Request>(bytes) {
        Ok(request) => request,
        Err(err) => {
            let refusal = match err {
                crate::protocol::FrameError::VersionMismatch { theirs, ours } => WireError {
                    code: ErrorCode::VersionMismatch,
                    message: format!(
                        "the client speaks control protocol version {}, this daemon {ours} (run one build of hotswap for the daemon, the supervisors and the command line)",
                        crate::protocol::version_name(theirs)
                    ),
                },
                err => WireError {
                    code: ErrorCode::MalformedRequest,
                    message: format!("malformed request: {}", error_chain(&err)),
                },
            };
            return Answer {
                response: Err(refusal),
                attached: None,
                probe: None,
            };
        }
    };
    tracing::debug!(?request, "request");
    let probe = match &request {
        Request::Probe { source, .. } => Some(*source),
        _ => None,
    };
    match handle(registry, reloader, request, peer, probes_held) {
        Ok((reply, attached)) => Answer {
            response: Ok(reply),
            attached,
            probe,
        },
        Err(err) => Answer {
            response: Err(WireError::new(err.code(), &err)),
            attached: None,
            probe: None,
        },
    }
}

/// `hotswap reload`: root's alone, like the file it reads.
fn reload_for(
    registry: &mut Registry,
    reloader: Option<&mut Reloader>,
    peer: &Peer,
) -> Result<Reply, RequestError> {
    if !peer.is_root() {
        return Err(AccessError::RootOnly {
            uid: peer.uid,
            what: "reload the config",
        }
        .into());
    }
    let reloader = reloader.ok_or(RequestError::NoConfigFile)?;
    let path = reloader.file().path.clone();
    match reloader.reload(registry) {
        Ok(applied) => {
            log_applied(&path, &applied);
            Ok(Reply::Reloaded(applied))
        }
        Err(err) => {
            tracing::warn!(
                "reloading {}: {}; nothing changed",
                path.display(),
                error_chain(&err)
            );
            Err(err.into())
        }
    }
}

/// Why the daemon refused a request.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    /// The registry refused.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The config could not be reloaded.
    #[error(transparent)]
    Reload(#[from] ReloadError),
    /// A reload asked of a daemon started without a config file.
    #[error("this daemon was started without a config file (--config)")]
    NoConfigFile,
}

impl From<AccessError> for RequestError {
    fn from(err: AccessError) -> Self {
        Self::Registry(err.into())
    }
}

impl RequestError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Registry(err) => err.code(),
            Self::Reload(err) => err.code(),
            Self::NoConfigFile => ErrorCode::Unsupported,
        }
    }
}

/// Completes after `limit` when `armed`, never otherwise.
async fn idle_limit(limit: Duration, armed: bool) {
    if armed {
        tokio::time::sleep(limit).await;
    } else {
        std::future::pending::<()>().await;
    }
}

/// The probe sources one control connection routed; dropping it stops routing them.
struct ProbesOf<'a> {
    registry: &'a Mutex<Registry>,
    sources: Vec<std::net::SocketAddr>,
}

impl Drop for ProbesOf<'_> {
    fn drop(&mut self) {
        let mut registry = lock(self.registry);
        for source in self.sources.drain(..) {
            if let Err(err) = registry.unprobe(source) {
                tracing::warn!("ending the probe from {source}: {}", error_chain(&err));
            }
        }
    }
}

/// Sends one frame with `fd` attached (SCM_RIGHTS); the descriptor travels with the frame's
/// first byte.
async fn send_with_fd(
    stream: &UnixStream,
    response: &Response,
    fd: std::os::fd::BorrowedFd<'_>,
) -> Result<(), crate::protocol::FrameError> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd as _;
    let frame = crate::protocol::encode_frame(response)?;
    let fds = [fd.as_raw_fd()];
    let mut sent = 0;
    while sent < frame.len() {
        stream.writable().await?;
        let result = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let iov = [std::io::IoSlice::new(&frame[sent..])];
            let rights = [ControlMessage::ScmRights(&fds)];
            let cmsgs: &[ControlMessage<'_>] = if sent == 0 { &rights } else { &[] };
            sendmsg::<()>(
                stream.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match result {
            Ok(n) => sent += n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// Carries out one request for `peer`, once [`crate::access`] says it may; the reply may come
/// with a descriptor to attach.
fn handle(
    registry: &mut Registry,
    reloader: Option<&mut Reloader>,
    request: Request,
    peer: &Peer,
    probes_held: usize,
) -> Result<(Reply, Option<std::os::fd::OwnedFd>), RequestError> {
    let may = |registry: &Registry, service: &ServiceName, action| {
        access::authorise(peer, service, registry.owner(service), action)
    };
    let reply = match request {
        Request::Bind {
            service,
            binding,
            owner,
        } => {
            if owner.is_some() {
                may(registry, &service, Action::SetOwner)?;
            }
            may(registry, &service, Action::Bind(&binding))?;
            // Steering happens before the kernel's own socket lookup: an owner's binding
            // must not take connections another service's binding is there for.
            if !peer.is_root() {
                if let Some((other, holder)) = registry.overlapping(&service, &binding) {
                    return Err(AccessError::Overlaps {
                        binding,
                        other,
                        service: holder,
                    }
                    .into());
                }
            }
            registry.bind(&service, binding, owner)?;
            tracing::info!("bound {binding} to service {service} (uid {})", peer.uid);
            Ok(Reply::Done)
        }
        Request::Chown { service, owner } => {
            may(registry, &service, Action::SetOwner)?;
            registry.set_owner(&service, owner)?;
            tracing::info!("service {service} is managed by {}", owner.who_may());
            Ok(Reply::Done)
        }
        Request::Unbind { service, binding } => {
            may(registry, &service, Action::Change)?;
            registry.unbind(&service, binding)?;
            tracing::info!(
                "unbound {binding} from service {service} (uid {})",
                peer.uid
            );
            Ok(Reply::Done)
        }
        Request::Register {
            service,
            pid,
            fds,
            label,
            activate,
        } => {
            may(registry, &service, Action::Change)?;
            let runs_as = (!peer.is_root()).then_some(peer.uid);
            let generation = registry.register_as(&service, pid, &fds, label, activate, runs_as)?;
            tracing::info!(
                "registered generation {generation} of service {service} (pid {pid} fds {fds:?}){}",
                if activate { ", active" } else { "" }
            );
            Ok(Reply::Registered {
                generation,
                activated: activate,
            })
        }
        Request::Switch {
            service,
            generation,
        } => {
            may(registry, &service, Action::Change)?;
            let previous = registry.switch(&service, generation)?;
            tracing::info!("switched service {service} to generation {generation}");
            Ok(Reply::Switched { previous })
        }
        Request::Forget {
            service,
            generation,
        } => {
            may(registry, &service, Action::Change)?;
            registry.forget(&service, generation)?;
            tracing::info!("forgot generation {generation} of service {service}");
            Ok(Reply::Done)
        }
        Request::Probe {
            service,
            generation,
            source,
            socket,
        } => {
            may(registry, &service, Action::Change)?;
            if !peer.is_root() {
                // One route per connection: the routes a peer holds are bounded by its
                // connections.
                if probes_held > 0 {
                    return Err(AccessError::OneProbePerConnection { uid: peer.uid }.into());
                }
                access::check_probe_source(peer, source, socket)?;
            }
            registry.probe(&service, generation, source)?;
            tracing::debug!("probing generation {generation} of service {service} from {source}");
            Ok(Reply::Done)
        }
        Request::Status => {
            let mut status = registry.status();
            status.services.retain(|s| s.owner.admits(peer));
            Ok(Reply::Status(status))
        }
        Request::Listener { service, protocol } => {
            may(registry, &service, Action::Change)?;
            // The asker, so a socket it never registers is taken back once it is gone. A pid
            // read at connect time can name a later process only if the asker exited before
            // this: then the socket is taken back on that process's exit or the time limit.
            let requester = peer
                .pid
                .and_then(|pid| u32::try_from(pid).ok())
                .and_then(|pid| crate::socket::Pidfd::open(pid).ok());
            let fd = registry.listener(&service, protocol, requester)?;
            return Ok((
                Reply::Listener {
                    attached: fd.is_some(),
                },
                fd,
            ));
        }
        Request::Metrics => {
            let mut services = registry.metrics()?;
            services.retain(|m| {
                registry
                    .owner(&m.service)
                    .is_some_and(|owner| owner.admits(peer))
            });
            Ok(Reply::Metrics { services })
        }
        Request::Reload => reload_for(registry, reloader, peer),
    };
    reply.map(|reply| (reply, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        backend::fake::FakeBackend,
        fuzz::{mangle, seeds, Rng},
    };

    /// 100,000 mangled request frames through the real decoder and handler, over a fake
    /// backend: no panic, every answer encodes, and the registry still answers afterwards.
    /// The seed is fixed, so a failure replays; `HOTSWAP_FUZZ_SEED` tries others.
    #[test]
    fn a_hundred_thousand_mangled_requests_are_answered_without_a_panic() {
        let netns = crate::socket::netns_inode(Path::new("/proc/thread-self/ns/net")).unwrap();
        let (mut registry, _) = Registry::adopt(Box::new(FakeBackend::default()), netns).unwrap();
        let seed = crate::fuzz::seed(0x5eed);
        let (seeds, mut rng) = (seeds(), Rng::new(seed));
        let root = Peer {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            pid: Some(std::process::id() as i32),
        };
        let mut decoded = 0;
        for i in 0..100_000 {
            let input = mangle(&seeds, &mut rng);
            decoded += u32::from(crate::protocol::decode::<Request>(&input).is_ok());
            let answer = answer(&mut registry, None, &input, &root, 0);
            crate::protocol::encode_frame(&answer.response)
                .unwrap_or_else(|err| panic!("seed {seed} input {i}: {err}"));
        }
        // A share of the inputs decodes, so the handler is driven, not only the decoder.
        assert!(decoded > 20_000, "only {decoded} inputs decoded");
        let frame = crate::protocol::encode_frame(&Request::Status).unwrap();
        assert!(answer(&mut registry, None, &frame[4..], &root, 0)
            .response
            .is_ok());
    }
}
