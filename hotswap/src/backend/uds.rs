//! The UDS fallback backend, for hosts where the sk_lookup program cannot be loaded (kernels
//! before 5.9; no CAP_BPF/CAP_NET_ADMIN, e.g. an unprivileged container).
//!
//! The classic method: the daemon binds each service address once and every generation gets a
//! duplicate of that one socket — children of `hotswap run` through socket activation, other
//! processes over the control socket with SCM_RIGHTS (as Envoy's hot restart does). A switch is
//! a record of which generation is active; the shared accept queue means nothing is lost, but
//! there is no atomic cut: until the old generation stops accepting, both may accept.
//!
//! What sk_lookup keeps in bpffs this backend keeps in a state file beside the control socket
//! (services, bindings with their shared socket's cookie, generations). A restarted daemon
//! takes each shared socket back from a live generation that holds it (pidfd_getfd, checked by
//! cookie), so the services go on as if nothing happened; an address nobody holds any more is
//! bound afresh.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use hotswap_common::{GenerationKey, GenerationRecord, OwnerRecord, ServiceMetrics, ServiceRecord};
use serde::{Deserialize, Serialize};

use super::{
    state_file::{self, FileBacked, Records, StateFileError},
    Backend, BackendError, BackendInfo, Capabilities, Lack, PersistedState, Repair, Repaired,
    SocketSource, Support,
};
use crate::{
    model::{Binding, Protocol},
    socket::{retake_socket, socket_cookie, Pidfd},
};

/// The UDS backend refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum UdsError {
    /// A second binding of one protocol for a service.
    #[error("the uds backend gives a service one shared socket per protocol, and {existing} is its {protocol} address already")]
    OneBindingPerProtocol {
        /// The protocol.
        protocol: Protocol,
        /// The binding it has.
        existing: Binding,
    },
    /// Binding the address failed.
    #[error("binding {addr} failed")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The socket offered is not the service's shared one.
    #[error("in the uds backend every generation serves the service's shared {0} socket; get it from the daemon (hotswap run and hotswap::activation::service_listener do)")]
    NotShared(Protocol),
    /// The operation cannot be done with a shared socket.
    #[error("{0}")]
    Unsupported(Lack),
    /// Reading or writing the state file failed.
    #[error(transparent)]
    State(#[from] StateFileError),
}

impl UdsError {
    /// The refusal's code on the wire: what the backend cannot or will not do is a refusal,
    /// what went wrong doing it a failure.
    pub fn code(&self) -> crate::protocol::ErrorCode {
        use crate::protocol::ErrorCode;
        match self {
            Self::OneBindingPerProtocol { .. } | Self::NotShared(_) => ErrorCode::InvalidRequest,
            Self::Unsupported(_) => ErrorCode::Unsupported,
            Self::Bind { .. } | Self::State(_) => ErrorCode::Failed,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct SavedBinding {
    service_id: u32,
    binding: Binding,
    /// The shared socket's cookie: what a generation's fd must be to hand it back.
    cookie: u64,
}

/// A service's shared socket for one protocol.
struct Shared {
    binding: Binding,
    /// `None` while the binding is not served: its socket could not be restored when the
    /// daemon started (e.g. the address is not configured yet). It is bound again when a
    /// generation asks for it.
    socket: Option<OwnedFd>,
    cookie: u64,
}

/// The daemon's shared listeners, one per (service, protocol), and what it must remember.
pub struct UdsBackend {
    reason: String,
    state_path: PathBuf,
    sockets: BTreeMap<(u32, Protocol), Shared>,
    records: Records,
    /// What loading the state file had to change, for the daemon's log.
    notes: Vec<String>,
}

impl UdsBackend {
    /// The backend as the state file at `state_path` left it (empty if there is none), with
    /// each shared socket taken back from a live generation or bound again; `reason` says why
    /// this backend was chosen.
    pub fn open(reason: String, state_path: &Path) -> Result<Self, UdsError> {
        let saved = state_file::load::<SavedBinding>(state_path)?;
        let (records, saved_bindings) = Records::from_file(saved);
        let mut backend = Self {
            reason,
            state_path: state_path.to_owned(),
            sockets: BTreeMap::new(),
            records,
            notes: Vec::new(),
        };
        for SavedBinding {
            service_id,
            binding,
            cookie,
        } in saved_bindings
        {
            let held = backend
                .records
                .generations_of(service_id)
                .find_map(|record| retake(record, binding.protocol, cookie));
            let shared = match held {
                Some(socket) => Shared {
                    binding,
                    socket: Some(socket),
                    cookie,
                },
                None => match Shared::bind(binding) {
                    Ok(shared) => {
                        backend.notes.push(format!(
                            "bound {binding} again: no live generation held its socket"
                        ));
                        shared
                    }
                    Err(err) => {
                        backend.notes.push(format!(
                            "{binding} is not served for now: no live generation held its socket and {}; it is bound again when a generation asks for it",
                            crate::error_chain(&err)
                        ));
                        Shared {
                            binding,
                            socket: None,
                            cookie,
                        }
                    }
                },
            };
            backend
                .sockets
                .insert((service_id, binding.protocol), shared);
        }
        backend.save()?;
        Ok(backend)
    }
}

impl FileBacked for UdsBackend {
    fn save(&self) -> Result<(), StateFileError> {
        let bindings = self
            .sockets
            .iter()
            .map(|(&(service_id, _), shared)| SavedBinding {
                service_id,
                binding: shared.binding,
                cookie: shared.cookie,
            })
            .collect();
        state_file::store(&self.state_path, &self.records.to_file(bindings))
    }

    fn records(&mut self) -> &mut Records {
        &mut self.records
    }
}

/// The shared socket with `cookie`, taken back from the process of a generation that still
/// holds it.
fn retake(record: &GenerationRecord, protocol: Protocol, cookie: u64) -> Option<OwnedFd> {
    let slot = protocol.slot();
    if record.cookies[slot] != cookie || record.fds[slot] < 0 {
        return None;
    }
    let pidfd = Pidfd::open(record.pid).ok()?;
    retake_socket(&pidfd, record.pid, record.fds[slot], cookie)
}

impl Shared {
    /// A new socket bound to `binding`'s address.
    fn bind(binding: Binding) -> Result<Self, UdsError> {
        let socket = bind(&binding)?;
        let cookie = socket_cookie(socket.as_fd()).map_err(|source| UdsError::Bind {
            addr: SocketAddr::new(binding.prefix.addr(), binding.port),
            source,
        })?;
        Ok(Self {
            binding,
            socket: Some(socket),
            cookie,
        })
    }
}

fn bind(binding: &Binding) -> Result<OwnedFd, UdsError> {
    let addr = SocketAddr::new(binding.prefix.addr(), binding.port);
    crate::socket::bound_socket(addr, binding.protocol, false, false)
        .map_err(|source| UdsError::Bind { addr, source })
}

impl Backend for UdsBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: "uds".to_owned(),
            reason: self.reason.clone(),
            state_dir: self.state_path.display().to_string(),
            program_id: None,
            verified_instructions: None,
            adopted: false,
            capabilities: self.capabilities(),
            unserved: self
                .sockets
                .values()
                .filter(|shared| shared.socket.is_none())
                .map(|shared| shared.binding)
                .collect(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            sockets: SocketSource::Backend,
            socket_per_generation: false,
            switch: Support::No(Lack::SharedSocket),
            probe: Support::No(Lack::SharedSocket),
            metrics: Support::No(Lack::NoProgram),
            prefixes: Support::No(Lack::OneAddressPerSocket),
            debug_log: Support::No(Lack::NoProgram),
        }
    }

    fn load_state(&self) -> Result<PersistedState, BackendError> {
        Ok(PersistedState {
            services: self
                .records
                .services
                .iter()
                .map(|(&id, r)| (id, *r))
                .collect(),
            bindings: self
                .sockets
                .iter()
                .map(|(&(service_id, _), shared)| (shared.binding, service_id))
                .collect(),
            generations: self
                .records
                .generations
                .iter()
                .map(|(&k, &r)| (k, r))
                .collect(),
            owners: self.records.owners.iter().map(|(&k, &r)| (k, r)).collect(),
            notes: self.notes.clone(),
        })
    }

    fn add_binding(&mut self, binding: &Binding, service_id: u32) -> Result<(), BackendError> {
        if let Some(existing) = self.sockets.get(&(service_id, binding.protocol)) {
            return Err(UdsError::OneBindingPerProtocol {
                protocol: binding.protocol,
                existing: existing.binding,
            }
            .into());
        }
        let shared = Shared::bind(*binding)?;
        let key = (service_id, binding.protocol);
        Ok(self
            .saved(
                |backend| backend.sockets.insert(key, shared),
                |backend, _| {
                    backend.sockets.remove(&key);
                },
            )
            .map_err(UdsError::from)?)
    }

    fn remove_binding(&mut self, binding: &Binding) -> Result<(), BackendError> {
        // The daemon lets go of its copy; generations keep theirs until they exit.
        Ok(self
            .saved(
                |backend| {
                    let keys: Vec<_> = backend
                        .sockets
                        .iter()
                        .filter(|(_, shared)| shared.binding == *binding)
                        .map(|(key, _)| *key)
                        .collect();
                    keys.iter()
                        .filter_map(|key| backend.sockets.remove_entry(key))
                        .collect::<Vec<_>>()
                },
                |backend, removed| backend.sockets.extend(removed),
            )
            .map_err(UdsError::from)?)
    }

    fn activate(&mut self, _: u32, _: Protocol, _: BorrowedFd<'_>) -> Result<(), BackendError> {
        // Every generation already serves the one shared socket: nothing to move.
        Ok(())
    }

    fn deactivate(&mut self, _: u32, _: Protocol) -> Result<(), BackendError> {
        Ok(())
    }

    fn metrics(&self, _: u32) -> Result<ServiceMetrics, BackendError> {
        Err(UdsError::Unsupported(Lack::NoProgram).into())
    }

    fn save_service(
        &mut self,
        service_id: u32,
        record: &ServiceRecord,
        _: bool,
    ) -> Result<(), BackendError> {
        Ok(self
            .save_service_record(service_id, record)
            .map_err(UdsError::from)?)
    }

    fn forget_service(&mut self, service_id: u32) -> Result<(), BackendError> {
        Ok(self
            .forget_service_record(service_id)
            .map_err(UdsError::from)?)
    }

    fn save_owner(&mut self, service_id: u32, owner: &OwnerRecord) -> Result<(), BackendError> {
        Ok(self
            .save_owner_record(service_id, owner)
            .map_err(UdsError::from)?)
    }

    fn save_generation(
        &mut self,
        key: &GenerationKey,
        record: &GenerationRecord,
    ) -> Result<(), BackendError> {
        Ok(self
            .save_generation_record(key, record)
            .map_err(UdsError::from)?)
    }

    fn forget_generation(&mut self, key: &GenerationKey) -> Result<(), BackendError> {
        Ok(self.forget_generation_record(key).map_err(UdsError::from)?)
    }

    fn set_debug_log(&mut self, on: bool) -> Result<(), BackendError> {
        if on {
            return Err(UdsError::Unsupported(Lack::NoProgram).into());
        }
        Ok(())
    }

    fn listener(
        &mut self,
        service_id: u32,
        protocol: Protocol,
        // Every generation shares the one socket: nothing to take back.
        _requester: Option<crate::socket::Pidfd>,
    ) -> Result<Option<OwnedFd>, BackendError> {
        let key = (service_id, protocol);
        let Some(shared) = self.sockets.get(&key) else {
            return Ok(None);
        };
        let binding = shared.binding;
        if shared.socket.is_none() {
            // Not served since the daemon started: try again now that a generation asks.
            let fresh = Shared::bind(binding)?;
            self.saved(
                |backend| backend.sockets.insert(key, fresh),
                |backend, before| {
                    if let Some(before) = before {
                        backend.sockets.insert(key, before);
                    }
                },
            )
            .map_err(UdsError::from)?;
            tracing::info!("bound {binding} again: a generation asked for it");
        }
        // A generation gets a socket that listens, whatever a stopping one did to it.
        let _ = self.upkeep();
        let socket = self.sockets[&key].socket.as_ref().expect("bound above");
        Ok(Some(socket.try_clone().map_err(|source| {
            UdsError::Bind {
                addr: SocketAddr::new(binding.prefix.addr(), binding.port),
                source,
            }
        })?))
    }

    fn add_probe(
        &mut self,
        _source: std::net::SocketAddr,
        _protocol: Protocol,
        _socket: BorrowedFd<'_>,
    ) -> Result<(), BackendError> {
        // Every generation serves the one shared socket: a probe cannot pick one.
        Err(UdsError::Unsupported(Lack::SharedSocket).into())
    }

    fn remove_probe(
        &mut self,
        _source: std::net::SocketAddr,
        _protocol: Protocol,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    fn admit(
        &mut self,
        service_id: u32,
        protocol: Protocol,
        _socket: BorrowedFd<'_>,
        cookie: u64,
    ) -> Result<(), BackendError> {
        match self.sockets.get(&(service_id, protocol)) {
            Some(shared) if shared.socket.is_some() && shared.cookie == cookie => Ok(()),
            _ => Err(UdsError::NotShared(protocol).into()),
        }
    }

    fn upkeep(&mut self) -> Vec<Repaired> {
        // A generation that shut the shared listener down (to wake its own accept()) shut it
        // down for every generation: listen again on the same bound socket.
        let mut repaired = Vec::new();
        for (&(service_id, protocol), shared) in &self.sockets {
            let Some(socket) = &shared.socket else {
                continue;
            };
            if protocol != Protocol::Tcp
                || crate::socket::is_listening(socket.as_fd()).unwrap_or(true)
            {
                continue;
            }
            match crate::socket::listen_again(socket.as_fd()) {
                Ok(()) => repaired.push(Repaired {
                    service_id,
                    binding: shared.binding,
                    what: Repair::Relistened,
                }),
                Err(err) => tracing::warn!(
                    "{}: the shared socket was shut down and cannot listen again: {err}",
                    shared.binding
                ),
            }
        }
        repaired
    }
}
