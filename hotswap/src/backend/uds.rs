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
    io,
    net::SocketAddr,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use hotswap_common::{GenerationKey, GenerationRecord, ServiceMetrics, ServiceRecord, MAX_LABEL};
use serde::{Deserialize, Serialize};

use super::{Backend, BackendError, BackendInfo, PersistedState};
use crate::{
    model::{Binding, Protocol},
    socket::{retake_socket, socket_cookie, Pidfd},
    PathError,
};

/// The UDS backend refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum UdsError {
    /// A prefix or a port-0 binding.
    #[error("the uds backend binds one address (or 0.0.0.0/0, ::/0: every address) and one port, and {0} is a prefix or every port (that needs the sk_lookup backend)")]
    NeedsExactAddress(Binding),
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
    /// A switch cannot move connections between generations that share one socket.
    #[error("the uds backend cannot switch: generations share one socket and both accept until the old one stops; use hotswap upgrade or rollback (they drain the old generation), or stop the old process")]
    CannotSwitch,
    /// The operation needs the sk_lookup program.
    #[error("{0} needs the sk_lookup backend")]
    Unsupported(&'static str),
    /// Reading or writing the state file failed.
    #[error(transparent)]
    State(#[from] PathError),
    /// The state file is not what this version writes.
    #[error("the uds state file {} is unreadable (move it away to start empty)", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// The state file's contents.
#[derive(Default, Serialize, Deserialize)]
struct StateFile {
    services: Vec<SavedService>,
    bindings: Vec<SavedBinding>,
    generations: Vec<SavedGeneration>,
}

#[derive(Serialize, Deserialize)]
struct SavedService {
    id: u32,
    name: String,
    next_generation: u32,
    active_tcp: u32,
    active_udp: u32,
}

#[derive(Serialize, Deserialize)]
struct SavedBinding {
    service_id: u32,
    binding: Binding,
    /// The shared socket's cookie: what a generation's fd must be to hand it back.
    cookie: u64,
}

#[derive(Serialize, Deserialize)]
struct SavedGeneration {
    service_id: u32,
    generation: u32,
    pid: u32,
    fds: [i32; 2],
    cookies: [u64; 2],
    registered_at: u64,
    label: String,
}

impl SavedService {
    fn new(id: u32, record: &ServiceRecord) -> Self {
        Self {
            id,
            name: String::from_utf8_lossy(record.name_bytes()).into_owned(),
            next_generation: record.next_generation,
            active_tcp: record.active_tcp,
            active_udp: record.active_udp,
        }
    }

    fn record(&self) -> ServiceRecord {
        ServiceRecord::new(
            self.name.as_bytes(),
            self.next_generation,
            self.active_tcp,
            self.active_udp,
        )
    }
}

impl SavedGeneration {
    fn new(key: &GenerationKey, record: &GenerationRecord) -> Self {
        Self {
            service_id: key.service_id,
            generation: key.generation,
            pid: record.pid,
            fds: record.fds,
            cookies: record.cookies,
            registered_at: record.registered_at,
            label: String::from_utf8_lossy(record.label_bytes()).into_owned(),
        }
    }

    fn key(&self) -> GenerationKey {
        GenerationKey {
            service_id: self.service_id,
            generation: self.generation,
        }
    }

    fn record(&self) -> GenerationRecord {
        let mut record = GenerationRecord {
            cookies: self.cookies,
            registered_at: self.registered_at,
            pid: self.pid,
            fds: self.fds,
            label_len: 0,
            pad: [0; 3],
            label: [0; MAX_LABEL],
        };
        record.set_label(self.label.as_bytes());
        record
    }
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
    services: BTreeMap<u32, ServiceRecord>,
    generations: BTreeMap<GenerationKey, GenerationRecord>,
    /// What loading the state file had to change, for the daemon's log.
    notes: Vec<String>,
}

impl UdsBackend {
    /// The backend as the state file at `state_path` left it (empty if there is none), with
    /// each shared socket taken back from a live generation or bound again; `reason` says why
    /// this backend was chosen.
    pub fn open(reason: String, state_path: &Path) -> Result<Self, UdsError> {
        let saved: StateFile = match std::fs::read(state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| UdsError::Corrupt {
                path: state_path.to_owned(),
                source,
            })?,
            Err(err) if err.kind() == io::ErrorKind::NotFound => StateFile::default(),
            Err(err) => return Err(PathError::at("reading", state_path)(err).into()),
        };
        let mut backend = Self {
            reason,
            state_path: state_path.to_owned(),
            sockets: BTreeMap::new(),
            services: saved.services.iter().map(|s| (s.id, s.record())).collect(),
            generations: saved
                .generations
                .iter()
                .map(|g| (g.key(), g.record()))
                .collect(),
            notes: Vec::new(),
        };
        for SavedBinding {
            service_id,
            binding,
            cookie,
        } in saved.bindings
        {
            let held = backend
                .generations
                .iter()
                .filter(|(key, _)| key.service_id == service_id)
                .find_map(|(_, record)| retake(record, binding.protocol, cookie));
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

    /// Writes the state file: a new file renamed over the old one, so a crash leaves one or
    /// the other whole.
    fn save(&self) -> Result<(), UdsError> {
        let state = StateFile {
            services: self
                .services
                .iter()
                .map(|(&id, record)| SavedService::new(id, record))
                .collect(),
            bindings: self
                .sockets
                .iter()
                .map(|(&(service_id, _), shared)| SavedBinding {
                    service_id,
                    binding: shared.binding,
                    cookie: shared.cookie,
                })
                .collect(),
            generations: self
                .generations
                .iter()
                .map(|(key, record)| SavedGeneration::new(key, record))
                .collect(),
        };
        let json = serde_json::to_vec_pretty(&state).expect("plain data serialises");
        let temporary = crate::with_suffix(&self.state_path, ".new");
        write_private(&temporary, &json).map_err(PathError::at("writing", &temporary))?;
        std::fs::rename(&temporary, &self.state_path)
            .map_err(PathError::at("replacing", &self.state_path))?;
        Ok(())
    }
}

impl UdsBackend {
    /// Applies `change` and saves; when saving fails, `undo` reverts the change, so memory
    /// always mirrors the file (as the sk_lookup backend's maps keep their old contents when a
    /// write fails).
    fn saved<T>(
        &mut self,
        change: impl FnOnce(&mut Self) -> T,
        undo: impl FnOnce(&mut Self, T),
    ) -> Result<(), BackendError> {
        let undo_with = change(self);
        if let Err(err) = self.save() {
            undo(self, undo_with);
            return Err(err.into());
        }
        Ok(())
    }
}

/// Puts `before` back under `key` (or removes `key` when there was nothing).
fn restore<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, before: Option<V>) {
    match before {
        Some(value) => map.insert(key, value),
        None => map.remove(&key),
    };
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

/// Writes `bytes` to a new file only its owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
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
    use socket2::{Domain, Socket, Type};
    let addr = SocketAddr::new(binding.prefix.addr(), binding.port);
    let fail = |source| UdsError::Bind { addr, source };
    let ty = match binding.protocol {
        Protocol::Tcp => Type::STREAM,
        Protocol::Udp => Type::DGRAM,
    };
    let socket = Socket::new(Domain::for_address(addr), ty, None).map_err(fail)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(fail)?;
    }
    if binding.protocol == Protocol::Tcp {
        socket.set_reuse_address(true).map_err(fail)?;
    }
    socket.bind(&addr.into()).map_err(fail)?;
    if binding.protocol == Protocol::Tcp {
        socket.listen(1024).map_err(fail)?;
    }
    Ok(socket.into())
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
            unserved: self
                .sockets
                .values()
                .filter(|shared| shared.socket.is_none())
                .map(|shared| shared.binding)
                .collect(),
        }
    }

    fn load_state(&self) -> Result<PersistedState, BackendError> {
        Ok(PersistedState {
            services: self.services.iter().map(|(&id, r)| (id, *r)).collect(),
            bindings: self
                .sockets
                .iter()
                .map(|(&(service_id, _), shared)| (shared.binding, service_id))
                .collect(),
            generations: self.generations.iter().map(|(&k, &r)| (k, r)).collect(),
            notes: self.notes.clone(),
        })
    }

    fn add_binding(&mut self, binding: &Binding, service_id: u32) -> Result<(), BackendError> {
        // One address, or every address of a family (0.0.0.0/0, ::/0: a socket bound to the
        // unspecified address), like bind() can do.
        let every_address =
            binding.prefix.prefix_len() == 0 && binding.prefix.addr().is_unspecified();
        let one_address = binding.prefix.prefix_len() == binding.prefix.max_prefix_len();
        if binding.port == 0 || !(one_address || every_address) {
            return Err(UdsError::NeedsExactAddress(*binding).into());
        }
        if let Some(existing) = self.sockets.get(&(service_id, binding.protocol)) {
            return Err(UdsError::OneBindingPerProtocol {
                protocol: binding.protocol,
                existing: existing.binding,
            }
            .into());
        }
        let shared = Shared::bind(*binding)?;
        let key = (service_id, binding.protocol);
        self.saved(
            |backend| backend.sockets.insert(key, shared),
            |backend, _| {
                backend.sockets.remove(&key);
            },
        )
    }

    fn remove_binding(&mut self, binding: &Binding) -> Result<(), BackendError> {
        // The daemon lets go of its copy; generations keep theirs until they exit.
        self.saved(
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
    }

    fn activate(&mut self, _: u32, _: Protocol, _: BorrowedFd<'_>) -> Result<(), BackendError> {
        // Every generation already serves the one shared socket: nothing to move.
        Ok(())
    }

    fn deactivate(&mut self, _: u32, _: Protocol) -> Result<(), BackendError> {
        Ok(())
    }

    fn metrics(&self, _: u32) -> Result<ServiceMetrics, BackendError> {
        Err(UdsError::Unsupported("counting connections (metrics)").into())
    }

    fn save_service(
        &mut self,
        service_id: u32,
        record: &ServiceRecord,
        _: bool,
    ) -> Result<(), BackendError> {
        self.saved(
            |backend| backend.services.insert(service_id, *record),
            |backend, before| restore(&mut backend.services, service_id, before),
        )
    }

    fn forget_service(&mut self, service_id: u32) -> Result<(), BackendError> {
        self.saved(
            |backend| backend.services.remove(&service_id),
            |backend, before| restore(&mut backend.services, service_id, before),
        )
    }

    fn save_generation(
        &mut self,
        key: &GenerationKey,
        record: &GenerationRecord,
    ) -> Result<(), BackendError> {
        let key = *key;
        self.saved(
            |backend| backend.generations.insert(key, *record),
            |backend, before| restore(&mut backend.generations, key, before),
        )
    }

    fn forget_generation(&mut self, key: &GenerationKey) -> Result<(), BackendError> {
        let key = *key;
        self.saved(
            |backend| backend.generations.remove(&key),
            |backend, before| restore(&mut backend.generations, key, before),
        )
    }

    fn set_debug_log(&mut self, on: bool) -> Result<(), BackendError> {
        if on {
            return Err(UdsError::Unsupported("eBPF debug logging (--debug-ebpf)").into());
        }
        Ok(())
    }

    fn shared_listener(
        &mut self,
        service_id: u32,
        protocol: Protocol,
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
            )?;
            tracing::info!("bound {binding} again: a generation asked for it");
        }
        let socket = self.sockets[&key].socket.as_ref().expect("bound above");
        Ok(Some(socket.try_clone().map_err(|source| {
            UdsError::Bind {
                addr: SocketAddr::new(binding.prefix.addr(), binding.port),
                source,
            }
        })?))
    }

    fn check_switch(&self) -> Result<(), BackendError> {
        Err(UdsError::CannotSwitch.into())
    }

    fn add_probe(
        &mut self,
        _source: std::net::SocketAddr,
        _protocol: Protocol,
        _socket: BorrowedFd<'_>,
    ) -> Result<(), BackendError> {
        // Every generation serves the one shared socket: a probe cannot pick one.
        Err(UdsError::Unsupported("a readiness probe of one generation (--ready tcp)").into())
    }

    fn remove_probe(
        &mut self,
        _source: std::net::SocketAddr,
        _protocol: Protocol,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    fn check_socket(
        &self,
        service_id: u32,
        protocol: Protocol,
        cookie: u64,
    ) -> Result<(), BackendError> {
        match self.sockets.get(&(service_id, protocol)) {
            Some(shared) if shared.socket.is_some() && shared.cookie == cookie => Ok(()),
            _ => Err(UdsError::NotShared(protocol).into()),
        }
    }
}
