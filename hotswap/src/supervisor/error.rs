//! What can go wrong supervising, as the operator reads it.

use super::*;

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
    #[error(
        "service {service} is already run by another `hotswap run`{}",
        crate::files::held_by(holder)
    )]
    AlreadyRunning {
        /// The service.
        service: ServiceName,
        /// The pid holding its lock, when the kernel says.
        holder: Option<u32>,
    },
    /// The directory for the service's control socket and lock is not hotswap's alone.
    #[error("the supervisor's state directory cannot be used")]
    StateDir(#[from] crate::files::PrivateDirError),
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
    #[error(
        "an upgrade of {service} is already in progress (phase {phase}); try again when it is done"
    )]
    UpgradeInProgress {
        /// Service.
        service: ServiceName,
        /// Its phase.
        phase: &'static str,
    },
    /// A request's words are out of bounds.
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    /// The daemon did not answer in time.
    #[error("the daemon did not answer within {} (is it stopped?)", humantime::format_duration(*.0))]
    DaemonTimeout(Duration),
    /// A supervisor did not answer in time.
    #[error("the supervisor did not answer within {} (is it stopped?)", humantime::format_duration(*.0))]
    SupervisorTimeout(Duration),
    /// A supervisor answered a status request with something else.
    #[error("the supervisor answered a status request with something else")]
    UnexpectedAnswer,
    /// The notify socket could not be made.
    #[error("creating the generation's notify socket failed")]
    NotifySocket {
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The record names other addresses than this `hotswap run`.
    #[error("service {service}'s running generations listen on {} (from the record of the supervisor before); this `hotswap run` says otherwise: run it with the same --listen addresses to adopt them (then upgrade), or stop that supervisor's generations first", listens_text(.recorded))]
    ListensDiffer {
        /// Service.
        service: ServiceName,
        /// What the record says.
        recorded: Vec<ListenSpec>,
    },
    /// The record could not be read.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The re-exec failed; the supervisor runs on as it was.
    #[error("re-executing {} failed; the supervisor runs on unchanged", binary.display())]
    Reexec {
        /// The binary.
        binary: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `--drain-settle` would leave the old generation no time to finish.
    #[error("--drain-settle ({}) must be under half of --drain-timeout ({}): the queue is watched for at most the first half, the second is for the old generation to finish", humantime::format_duration(*settle), humantime::format_duration(*timeout))]
    SettleNotBelowTimeout {
        /// The settle time.
        settle: Duration,
        /// The drain timeout.
        timeout: Duration,
    },
    /// A generation's socket was shut down and does not listen again.
    #[error("generation {0}'s socket was shut down and does not listen again (the daemon repairs it; is it running?)")]
    DeadListener(u32),
    /// The backend cannot route a probe to one generation.
    #[error("--ready tcp needs a probe that reaches one generation, and the daemon's backend cannot route one ({0}); use --ready notify or --ready delay:<DURATION>")]
    TcpProbeUnsupported(crate::backend::Lack),
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
    Refused(crate::protocol::WireError),
}

impl SupervisorError {
    /// The failure's code on the supervisor's wire.
    pub fn code(&self) -> crate::protocol::ErrorCode {
        use crate::protocol::ErrorCode;
        match self {
            Self::Daemon(ClientError::Refused(refusal)) | Self::Refused(refusal) => refusal.code,
            Self::NotReady { .. }
            | Self::NotUsingSocket { .. }
            | Self::OwnSocket { .. }
            | Self::ExitedBeforeReady { .. } => ErrorCode::NotReady,
            Self::RolledBack { .. } | Self::RolledBackByOperator(_) => ErrorCode::RolledBack,
            Self::UpgradeInProgress { .. } => ErrorCode::InProgress,
            Self::CannotRollBack { .. } => ErrorCode::NothingToRollBack,
            Self::Stopping => ErrorCode::Stopping,
            Self::NotRunning(_) => ErrorCode::NotRunning,
            Self::Spec(_) | Self::TcpProbeUnsupported(_) | Self::SettleNotBelowTimeout { .. } => {
                ErrorCode::InvalidRequest
            }
            Self::BoundElsewhere { .. } => ErrorCode::AlreadyBound,
            Self::AlreadyRunning { .. } => ErrorCode::Busy,
            Self::Frame(crate::protocol::FrameError::VersionMismatch { .. }) => {
                ErrorCode::VersionMismatch
            }
            Self::Daemon(_)
            | Self::UnexpectedReply(_)
            | Self::Spawn(_)
            | Self::Socket { .. }
            | Self::Io(_)
            | Self::StateDir(_)
            | Self::DaemonTimeout(_)
            | Self::SupervisorTimeout(_)
            | Self::UnexpectedAnswer
            | Self::NotifySocket { .. }
            | Self::ListensDiffer { .. }
            | Self::Record(_)
            | Self::Reexec { .. }
            | Self::DeadListener(_)
            | Self::Frame(_) => ErrorCode::Failed,
        }
    }
}

/// What a generation that never got ready did not do.
pub(super) fn ready_hint(mode: &ReadyMode) -> &'static str {
    match mode {
        ReadyMode::Tcp => "--ready tcp: it accepted no connection on the socket it was given; a server must take its listener from LISTEN_FDS, not bind its own",
        ReadyMode::Notify => "--ready notify: it sent no READY=1 to NOTIFY_SOCKET",
        ReadyMode::Delay(_) => "--ready delay is longer than --ready-timeout",
    }
}

fn listens_text(listens: &[ListenSpec]) -> String {
    listens
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn keep_note(kept: &Option<u32>) -> String {
    kept.map(|k| format!("; generation {k} stays active"))
        .unwrap_or_default()
}
