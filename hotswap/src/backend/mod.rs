//! Backends: how a service's active socket is put in front of new connections.
//!
//! Everything above the [`Backend`] trait (the registry, the control protocol, the CLI) is the
//! same for every backend: [`sk_lookup::SkLookupBackend`] (an eBPF `sk_lookup` program attached
//! to the network namespace), [`reuseport::ReuseportBackend`] (every generation's socket in one
//! `SO_REUSEPORT` group, a classic BPF program picking the member) and [`uds::UdsBackend`] (one
//! shared socket per service address, handed to every generation). What differs between them
//! is said by [`Capabilities`], which clients ask for instead of guessing.

#[cfg(test)]
pub(crate) mod fake;
pub mod reuseport;
pub mod sk_lookup;
mod state_file;
pub mod uds;

pub use state_file::StateFileError;

use std::{
    net::SocketAddr,
    os::fd::{BorrowedFd, OwnedFd},
};

use hotswap_common::{GenerationKey, GenerationRecord, OwnerRecord, ServiceMetrics, ServiceRecord};
use serde::{Deserialize, Serialize};

use crate::model::{Binding, Protocol};

/// A backend failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The sk_lookup backend failed.
    #[error(transparent)]
    SkLookup(#[from] sk_lookup::SkLookupError),
    /// Listening again on a socket that was shut down failed.
    #[error("listening again on a socket that was shut down failed")]
    Relisten(#[source] std::io::Error),
    /// The reuseport backend refused or failed.
    #[error(transparent)]
    Reuseport(#[from] reuseport::ReuseportError),
    /// The uds backend refused or failed.
    #[error(transparent)]
    Uds(#[from] uds::UdsError),
}

impl BackendError {
    /// The refusal's code on the wire; the sk_lookup backend refuses nothing a request could
    /// change, so its errors are failures.
    pub fn code(&self) -> crate::protocol::ErrorCode {
        match self {
            Self::SkLookup(_) | Self::Relisten(_) => crate::protocol::ErrorCode::Failed,
            Self::Reuseport(err) => err.code(),
            Self::Uds(err) => err.code(),
        }
    }
}

/// What a backend can do. The registry refuses what a backend cannot do from this, and
/// clients (the supervisor, `hotswap::activation`) read it from `status` instead of inferring
/// anything from a backend's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Where a generation's sockets come from.
    pub sockets: SocketSource,
    /// Each generation has a socket (and so an accept queue) of its own: draining waits for the
    /// old generation's queue, and its `shutdown()` or option change touches only itself.
    pub socket_per_generation: bool,
    /// `switch` moves new connections from one generation to another at once.
    pub switch: Support,
    /// A readiness probe can reach one generation before it is active (`--ready tcp`).
    pub probe: Support,
    /// `metrics` counts connections.
    pub metrics: Support,
    /// Bindings may be address prefixes or every port.
    pub prefixes: Support,
    /// The data path can log (`--debug-ebpf`).
    pub debug_log: Support,
}

/// Where a generation's sockets come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SocketSource {
    /// Each generation makes its own, on any address; the backend steers to it.
    Own,
    /// The backend makes them: ask the daemon (`Request::Listener`).
    Backend,
}

/// Whether a backend can do something, and why not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Support {
    /// It can.
    Yes,
    /// It cannot, for this reason.
    No(Lack),
}

impl Support {
    /// Whether it can.
    pub fn yes(self) -> bool {
        self == Self::Yes
    }
}

/// Why a backend cannot do something.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Lack {
    /// Generations share one socket.
    #[error("its generations share one socket and all accept from it until the old one stops (hotswap upgrade and rollback drain the old generation instead)")]
    SharedSocket,
    /// A classic BPF program has no maps.
    #[error("its classic BPF program has no maps to count in or log to")]
    ClassicProgram,
    /// No BPF program at all.
    #[error("it runs no BPF program")]
    NoProgram,
    /// A socket serves one address and one port.
    #[error("a socket is bound to one address (or every address) and one port; prefixes and every-port bindings need the sk_lookup backend")]
    OneAddressPerSocket,
}

/// Something a backend may not be able to do, for the refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// `switch`.
    Switch,
    /// A readiness probe of one generation.
    Probe,
    /// `metrics`.
    Metrics,
    /// A prefix or every-port binding.
    Prefixes,
    /// `--debug-ebpf`.
    DebugLog,
}

impl std::fmt::Display for Feature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Switch => "switch between generations",
            Self::Probe => "probe one generation's readiness (--ready tcp)",
            Self::Metrics => "count connections (metrics)",
            Self::Prefixes => "bind a prefix or every port",
            Self::DebugLog => "log from the data path (--debug-ebpf)",
        })
    }
}

impl Capabilities {
    /// Whether `feature` is supported.
    pub fn support(&self, feature: Feature) -> Support {
        match feature {
            Feature::Switch => self.switch,
            Feature::Probe => self.probe,
            Feature::Metrics => self.metrics,
            Feature::Prefixes => self.prefixes,
            Feature::DebugLog => self.debug_log,
        }
    }
}

/// Something a backend noticed and repaired in its own sockets, for the daemon's log and the
/// service's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repaired {
    /// The service.
    pub service_id: u32,
    /// The binding whose socket it was.
    pub binding: Binding,
    /// What happened.
    pub what: Repair,
}

/// What a backend repaired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    /// A socket had stopped listening (a process called `shutdown()` on it) and listens again.
    Relistened,
    /// A member left the reuseport group by itself (shut down); the program was pointed again.
    LeftGroup,
    /// A socket the backend made was never registered in time and was closed.
    Unclaimed,
}

impl std::fmt::Display for Repaired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.what {
            Repair::Relistened => write!(
                f,
                "{}: the socket had stopped listening (a process shut it down); it listens again",
                self.binding
            ),
            Repair::LeftGroup => write!(
                f,
                "{}: a generation's socket was shut down and left the reuseport group; the program points at the members that are left",
                self.binding
            ),
            Repair::Unclaimed => write!(
                f,
                "{}: a socket made for a generation was not registered in time; closed",
                self.binding
            ),
        }
    }
}

/// Where the kernel steers a service's connections of one protocol, as read back from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Steered {
    /// To the socket with this cookie.
    Socket(u64),
    /// Nowhere: the service has no socket for the protocol.
    Nothing,
    /// The backend cannot tell.
    Unknown,
}

/// What a backend remembers across daemon restarts.
#[derive(Debug, Default)]
pub struct PersistedState {
    /// Services by id.
    pub services: Vec<(u32, ServiceRecord)>,
    /// Bindings with their service id.
    pub bindings: Vec<(Binding, u32)>,
    /// Registered generations.
    pub generations: Vec<(GenerationKey, GenerationRecord)>,
    /// Owners of services, by service id (a service without one is root's alone).
    pub owners: Vec<(u32, OwnerRecord)>,
    /// What the backend had to change while loading, for the daemon's log.
    pub notes: Vec<String>,
}

/// A description of the running backend, for `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendInfo {
    /// `sk_lookup`, `reuseport` or `uds`.
    pub name: String,
    /// Why this backend is the one in use.
    pub reason: String,
    /// Where its state lives.
    pub state_dir: String,
    /// Kernel program id, where there is one.
    pub program_id: Option<u32>,
    /// Instructions the verifier processed for the program, where known.
    pub verified_instructions: Option<u32>,
    /// Whether this daemon adopted state a previous daemon left.
    pub adopted: bool,
    /// What it can do.
    pub capabilities: Capabilities,
    /// Bindings the backend keeps but cannot serve right now (uds: a shared socket that could
    /// not be restored at start; it is bound again when a generation asks for it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unserved: Vec<Binding>,
}

/// One way of steering new connections to a service's active socket.
pub trait Backend: Send {
    /// Describes the backend for `status`.
    fn info(&self) -> BackendInfo;
    /// What the backend remembers from before this daemon started.
    fn load_state(&self) -> Result<PersistedState, BackendError>;
    /// Steers `binding` to `service_id`.
    fn add_binding(&mut self, binding: &Binding, service_id: u32) -> Result<(), BackendError>;
    /// Stops steering `binding`.
    fn remove_binding(&mut self, binding: &Binding) -> Result<(), BackendError>;
    /// Makes `socket` the service's active socket for `protocol`, atomically replacing the one
    /// before.
    fn activate(
        &mut self,
        service_id: u32,
        protocol: Protocol,
        socket: BorrowedFd<'_>,
    ) -> Result<(), BackendError>;
    /// Leaves the service with no active socket for `protocol`.
    fn deactivate(&mut self, service_id: u32, protocol: Protocol) -> Result<(), BackendError>;
    /// The service's counters, summed over CPUs.
    fn metrics(&self, service_id: u32) -> Result<ServiceMetrics, BackendError>;
    /// Creates or updates a service's record (and zeroes its counters when it is new).
    fn save_service(
        &mut self,
        service_id: u32,
        record: &ServiceRecord,
        is_new: bool,
    ) -> Result<(), BackendError>;
    /// Forgets a service that has nothing left: no binding, no generation (a half-made one
    /// being undone, or one whose last binding and generation are gone), and its owner.
    fn forget_service(&mut self, service_id: u32) -> Result<(), BackendError>;
    /// Sets who owns a service besides root; a record with nothing set removes the owner.
    fn save_owner(&mut self, service_id: u32, owner: &OwnerRecord) -> Result<(), BackendError>;
    /// Creates or updates a generation's record.
    fn save_generation(
        &mut self,
        key: &GenerationKey,
        record: &GenerationRecord,
    ) -> Result<(), BackendError>;
    /// Forgets a generation.
    fn forget_generation(&mut self, key: &GenerationKey) -> Result<(), BackendError>;
    /// What it can do. The registry asks before it calls anything a backend may lack.
    fn capabilities(&self) -> Capabilities;
    /// Turns the data path's debug logging on or off.
    fn set_debug_log(&mut self, on: bool) -> Result<(), BackendError>;
    /// A socket for a new generation of the service, for `protocol`, where the backend makes
    /// them ([`SocketSource::Backend`]); `None` where each generation brings its own.
    /// `requester` is the process that asked (when the daemon could tell): a socket it never
    /// registers is taken back once it is gone.
    fn listener(
        &mut self,
        service_id: u32,
        protocol: Protocol,
        requester: Option<crate::socket::Pidfd>,
    ) -> Result<Option<OwnedFd>, BackendError>;
    /// Routes new `protocol` connections from exactly `source` to `socket`, ahead of every
    /// binding and uncounted: the supervisor's readiness probe reaches a generation that is
    /// not active yet, on the service's own address. Backends that cannot tell generations
    /// apart refuse.
    fn add_probe(
        &mut self,
        source: SocketAddr,
        protocol: Protocol,
        socket: BorrowedFd<'_>,
    ) -> Result<(), BackendError>;
    /// Stops routing `source` (nothing to do when it is not routed).
    fn remove_probe(&mut self, source: SocketAddr, protocol: Protocol) -> Result<(), BackendError>;
    /// Takes `socket` (with `cookie`) as a socket of a new generation of the service for
    /// `protocol`, or says why it cannot serve here.
    fn admit(
        &mut self,
        service_id: u32,
        protocol: Protocol,
        socket: BorrowedFd<'_>,
        cookie: u64,
    ) -> Result<(), BackendError>;
    /// `socket`, a generation's TCP socket that stopped listening (its process shut it down),
    /// listens again; [`Backend::activate`] follows when it is the active one.
    fn relisten(
        &mut self,
        _service_id: u32,
        _protocol: Protocol,
        socket: BorrowedFd<'_>,
    ) -> Result<(), BackendError> {
        crate::socket::listen_again(socket).map_err(BackendError::Relisten)
    }
    /// Which socket the kernel steers the service's `protocol` connections to now, read back
    /// from the kernel itself: what a restarted daemon reconciles its records with. Backends
    /// that cannot read it back say [`Steered::Unknown`] (the records are then the truth).
    fn steered(&mut self, _service_id: u32, _protocol: Protocol) -> Result<Steered, BackendError> {
        Ok(Steered::Unknown)
    }
    /// Checks the sockets the backend holds itself and repairs what it can; called by the
    /// daemon often (every few milliseconds).
    fn upkeep(&mut self) -> Vec<Repaired> {
        Vec::new()
    }
}
