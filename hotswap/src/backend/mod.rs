//! Backends: how a service's active socket is put in front of new connections.
//!
//! Everything above the [`Backend`] trait (the registry, the control protocol, the CLI) is the
//! same for every backend: [`sk_lookup::SkLookupBackend`] (an eBPF `sk_lookup` program attached
//! to the network namespace) and [`uds::UdsBackend`] (one shared socket per service address,
//! handed to every generation).

pub mod sk_lookup;
pub mod uds;

use std::{
    net::SocketAddr,
    os::fd::{BorrowedFd, OwnedFd},
};

use hotswap_common::{GenerationKey, GenerationRecord, ServiceMetrics, ServiceRecord};
use serde::{Deserialize, Serialize};

use crate::model::{Binding, Protocol};

/// A backend failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The sk_lookup backend failed.
    #[error(transparent)]
    SkLookup(#[from] sk_lookup::SkLookupError),
    /// The uds backend refused or failed.
    #[error(transparent)]
    Uds(#[from] uds::UdsError),
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
    /// What the backend had to change while loading, for the daemon's log.
    pub notes: Vec<String>,
}

/// A description of the running backend, for `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendInfo {
    /// `sk_lookup` or `uds`.
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
    /// Forgets a service that has nothing left (only used to undo a half-made service).
    fn forget_service(&mut self, service_id: u32) -> Result<(), BackendError>;
    /// Creates or updates a generation's record.
    fn save_generation(
        &mut self,
        key: &GenerationKey,
        record: &GenerationRecord,
    ) -> Result<(), BackendError>;
    /// Forgets a generation.
    fn forget_generation(&mut self, key: &GenerationKey) -> Result<(), BackendError>;
    /// Turns the data path's debug logging on or off.
    fn set_debug_log(&mut self, on: bool) -> Result<(), BackendError>;
    /// The socket the backend itself holds for a service's `protocol` and hands to every
    /// generation, or `None` where each generation brings its own.
    fn shared_listener(
        &mut self,
        service_id: u32,
        protocol: Protocol,
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
    /// Whether `switch` can move new connections from one generation to another here.
    fn check_switch(&self) -> Result<(), BackendError> {
        Ok(())
    }
    /// Checks that the socket with `cookie` may serve the service's `protocol`.
    fn check_socket(
        &self,
        service_id: u32,
        protocol: Protocol,
        cookie: u64,
    ) -> Result<(), BackendError>;
}
