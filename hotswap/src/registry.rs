//! The daemon's registry of services, bindings and generations, and the operations the control
//! socket offers on them. Every operation checks everything it can before it touches the
//! backend, so bad input changes nothing.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd, RawFd},
    time::{SystemTime, UNIX_EPOCH},
};

use hotswap_common::{GenerationKey, GenerationRecord, ServiceRecord, MAX_LABEL, MAX_SERVICES};
use serde::{Deserialize, Serialize};

use crate::{
    access::{AccessError, Owner},
    backend::{Backend, BackendError, BackendInfo, Feature, Lack, Repaired, Steered, Support},
    model::{check_bindable, check_label, Binding, ParseError, Protocol, ServiceName},
    socket::{
        inode, process_has_socket, retake_socket, take_socket, InspectedSocket, Pidfd, SocketError,
    },
};

/// A registry operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No service of that name.
    #[error(
        "unknown service {0:?} (bind an address to it first: hotswap bind {0} tcp <PREFIX> <PORT>)"
    )]
    UnknownService(String),
    /// No generation of that id.
    #[error("service {service} has no live generation {generation}")]
    UnknownGeneration {
        /// Service.
        service: ServiceName,
        /// Generation asked for.
        generation: u32,
    },
    /// The binding belongs to a service already.
    #[error("{binding} is already bound to service {service}")]
    AlreadyBound {
        /// Binding.
        binding: Binding,
        /// Its owner.
        service: ServiceName,
    },
    /// The service has no such binding.
    #[error("service {service} has no binding {binding}")]
    NotBound {
        /// Binding.
        binding: Binding,
        /// Service.
        service: ServiceName,
    },
    /// Connections from this source are routed to a probe already.
    #[error("connections from {0} are routed to a probe already")]
    ProbeInUse(std::net::SocketAddr),
    /// A probe asked for a socket the generation does not have.
    #[error("generation {generation} of service {service} has no {protocol} socket to probe")]
    NothingToProbe {
        /// Service.
        service: ServiceName,
        /// Generation.
        generation: u32,
        /// Protocol.
        protocol: Protocol,
    },
    /// The socket's protocol matches none of the service's bindings.
    #[error("service {service} has no {protocol} binding, so a {protocol} socket cannot serve it")]
    WrongProtocol {
        /// Service.
        service: ServiceName,
        /// The socket's protocol.
        protocol: Protocol,
    },
    /// The socket cannot take connections of any address family the service's bindings of its
    /// protocol have.
    #[error("the socket is {family}-only but service {service} has only {binding_family} {protocol} bindings")]
    WrongFamily {
        /// Service.
        service: ServiceName,
        /// The socket's protocol.
        protocol: Protocol,
        /// What the socket serves.
        family: &'static str,
        /// What the bindings need.
        binding_family: &'static str,
    },
    /// The generation's process closed the socket or exited.
    #[error("generation {generation} of service {service} is gone: its process closed the registered socket or exited")]
    GenerationGone {
        /// Service.
        service: ServiceName,
        /// Generation.
        generation: u32,
    },
    /// Register was given no socket.
    #[error("no socket given: pass at least one --fd")]
    NoSockets,
    /// Two sockets of one protocol.
    #[error("two {0} sockets given: a generation has at most one socket per protocol")]
    TwoSockets(Protocol),
    /// The socket is registered already.
    #[error("that socket is already registered as generation {generation} of service {service}")]
    AlreadyRegistered {
        /// Service.
        service: ServiceName,
        /// Generation.
        generation: u32,
    },
    /// No service id left.
    #[error("too many services: at most {} are supported", MAX_SERVICES - 1)]
    TooManyServices,
    /// Bad input.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The fd could not be taken or is no socket hotswap can steer to.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The backend cannot do this.
    #[error("the {backend} backend cannot {feature}: {lack}")]
    Unsupported {
        /// The backend's name.
        backend: String,
        /// What was asked.
        feature: Feature,
        /// Why it cannot.
        lack: Lack,
    },
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The caller may not do this.
    #[error(transparent)]
    Access(#[from] AccessError),
}

impl RegistryError {
    /// The refusal's code on the wire.
    pub fn code(&self) -> crate::protocol::ErrorCode {
        use crate::protocol::ErrorCode;
        match self {
            Self::UnknownService(_) => ErrorCode::UnknownService,
            Self::UnknownGeneration { .. } | Self::GenerationGone { .. } => {
                ErrorCode::UnknownGeneration
            }
            Self::AlreadyBound { .. } | Self::ProbeInUse(_) => ErrorCode::AlreadyBound,
            Self::NotBound { .. } => ErrorCode::NotBound,
            Self::NothingToProbe { .. }
            | Self::WrongProtocol { .. }
            | Self::WrongFamily { .. }
            | Self::NoSockets
            | Self::TwoSockets(_)
            | Self::AlreadyRegistered { .. }
            | Self::Parse(_)
            | Self::Socket(_) => ErrorCode::InvalidRequest,
            Self::TooManyServices => ErrorCode::LimitReached,
            Self::Unsupported { .. } => ErrorCode::Unsupported,
            Self::Backend(err) => err.code(),
            Self::Access(AccessError::Unreadable { .. }) => ErrorCode::Failed,
            Self::Access(_) => ErrorCode::PermissionDenied,
        }
    }
}

/// A live generation: a process and the listening socket it registered.
///
/// The daemon keeps no duplicate of the socket: the process owns it. A duplicate would keep a
/// socket its process closed listening, and connections steered to it would be reset instead
/// of refused. To switch to a generation the daemon takes the socket again (`pidfd_getfd`) and
/// checks it is the same socket (cookie).
#[derive(Debug)]
struct Generation {
    pid: u32,
    pidfd: Pidfd,
    /// At most one per protocol.
    sockets: Vec<GenerationSocket>,
    label: Option<String>,
    registered_at: u64,
}

/// One of a generation's sockets.
#[derive(Debug)]
struct GenerationSocket {
    protocol: Protocol,
    fd_in_process: RawFd,
    cookie: u64,
    inode: u64,
    local_addr: Option<SocketAddr>,
}

impl Generation {
    /// Whether the process is alive and still holds every registered socket (a check that
    /// takes no reference).
    fn alive(&self) -> bool {
        !self.pidfd.has_exited()
            && self
                .sockets
                .iter()
                .all(|s| process_has_socket(self.pid, s.fd_in_process, s.inode))
    }

    /// The registered sockets with their protocols, if the process still holds all of them.
    fn retake(&self) -> Option<Vec<(Protocol, OwnedFd)>> {
        self.sockets
            .iter()
            .map(|s| {
                retake_socket(&self.pidfd, self.pid, s.fd_in_process, s.cookie)
                    .map(|fd| (s.protocol, fd))
            })
            .collect()
    }

    fn protocols(&self) -> impl Iterator<Item = Protocol> + '_ {
        self.sockets.iter().map(|s| s.protocol)
    }

    fn record(&self) -> GenerationRecord {
        let mut record = GenerationRecord {
            cookies: [0; 2],
            registered_at: self.registered_at,
            pid: self.pid,
            fds: [-1; 2],
            label_len: 0,
            pad: [0; 3],
            label: [0; MAX_LABEL],
        };
        record.set_label(self.label.as_deref().unwrap_or_default().as_bytes());
        for socket in &self.sockets {
            let slot = socket.protocol.slot();
            record.cookies[slot] = socket.cookie;
            record.fds[slot] = socket.fd_in_process;
        }
        record
    }
}

#[derive(Debug)]
struct Service {
    id: u32,
    record: ServiceRecord,
    /// Who may change it besides root.
    owner: Owner,
    generations: BTreeMap<u32, Generation>,
    /// Sockets found shut down and listening again, since the daemon started.
    relistened: u64,
}

impl Service {
    /// `generation`'s socket for `protocol`, taken again from its process, if it still has it.
    fn socket_of(&self, generation: u32, protocol: Protocol) -> Option<OwnedFd> {
        self.generations
            .get(&generation)
            .and_then(Generation::retake)?
            .into_iter()
            .find_map(|(p, fd)| (p == protocol).then_some(fd))
    }

    fn active(&self, protocol: Protocol) -> u32 {
        match protocol {
            Protocol::Tcp => self.record.active_tcp,
            Protocol::Udp => self.record.active_udp,
        }
    }

    fn set_active(&mut self, protocol: Protocol, generation: u32) {
        match protocol {
            Protocol::Tcp => self.record.active_tcp = generation,
            Protocol::Udp => self.record.active_udp = generation,
        }
    }
}

/// One socket of a generation as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketStatus {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The socket's fd number in the owning process.
    pub fd: RawFd,
    /// The socket's local address.
    pub local_addr: Option<SocketAddr>,
    /// Whether it takes connections: `false` for a TCP socket a process shut down (the daemon
    /// makes the active one listen again).
    #[serde(default = "yes")]
    pub listening: bool,
}

fn yes() -> bool {
    true
}

/// A generation as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationStatus {
    /// Id within the service.
    pub id: u32,
    /// Owning process.
    pub pid: u32,
    /// Its sockets, at most one per protocol.
    pub sockets: Vec<SocketStatus>,
    /// Optional label.
    pub label: Option<String>,
    /// Whether new connections (of any of its protocols) go to it.
    pub active: bool,
    /// Registration time, seconds since the Unix epoch.
    pub registered_at: u64,
}

/// A service as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Name.
    pub name: ServiceName,
    /// Id in the kernel maps.
    pub id: u32,
    /// Who may change it besides root.
    #[serde(default, skip_serializing_if = "Owner::is_none")]
    pub owner: Owner,
    /// Its bindings.
    pub bindings: Vec<Binding>,
    /// Its live generations, oldest first.
    pub generations: Vec<GenerationStatus>,
    /// How often the daemon found one of its sockets shut down and made it listen again, since
    /// the daemon started.
    #[serde(default)]
    pub relistened: u64,
}

/// What `status` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The backend in use.
    pub backend: BackendInfo,
    /// Services by name.
    pub services: Vec<ServiceStatus>,
}

/// One service's counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceMetricsReport {
    /// Service.
    pub service: ServiceName,
    /// Lookups that matched a binding of the service.
    pub lookups: u64,
    /// Lookups handed to the active socket.
    pub steered: u64,
    /// Lookups refused because no socket was active.
    pub no_socket: u64,
    /// Lookups refused because assigning the socket failed.
    pub errors: u64,
}

/// A generation the registry let go, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Reaped {
    /// Service.
    pub service: ServiceName,
    /// Generation.
    pub generation: u32,
    /// Whether it was active (the service now has no socket for that protocol).
    pub was_active: bool,
    /// Whether its process exited (else it closed the socket).
    pub process_exited: bool,
}

/// Takes a generation that has left the registry out of the backend: its protocols' sockets
/// leave the map where it was active (the service then has none), and its record goes. Every
/// step is tried; the first error is returned.
fn let_go(
    backend: &mut dyn Backend,
    service: &mut Service,
    id: u32,
    generation: &Generation,
) -> Result<(), BackendError> {
    let mut first_error = None;
    let mut was_active = false;
    for protocol in generation.protocols() {
        if service.active(protocol) == id {
            was_active = true;
            if let Err(err) = backend.deactivate(service.id, protocol) {
                first_error.get_or_insert(err);
            }
            service.set_active(protocol, 0);
        }
    }
    if was_active {
        if let Err(err) = backend.save_service(service.id, &service.record, false) {
            first_error.get_or_insert(err);
        }
    }
    let key = GenerationKey {
        service_id: service.id,
        generation: id,
    };
    if let Err(err) = backend.forget_generation(&key) {
        first_error.get_or_insert(err);
    }
    first_error.map_or(Ok(()), Err)
}

/// Puts each socket in front of its protocol's connections (one map update each) and records
/// the generation as active for them. On failure, the protocols switched so far are switched
/// back to what they had.
fn activate_all(
    backend: &mut dyn Backend,
    service: &mut Service,
    generation: u32,
    sockets: &[(Protocol, OwnedFd)],
) -> Result<(), RegistryError> {
    // The intent is recorded before the kernel changes: a record that fails to be written
    // changes nothing, and a daemon that dies between the two leaves a record that adoption
    // carries out (it steers the kernel to what is recorded). The other order left the
    // kernel steering to a generation the record, and so `status`, did not name.
    let before = service.record;
    for (protocol, _) in sockets {
        service.set_active(*protocol, generation);
    }
    if let Err(err) = backend.save_service(service.id, &service.record, false) {
        service.record = before;
        return Err(err.into());
    }
    for (done, (protocol, fd)) in sockets.iter().enumerate() {
        if let Err(err) = backend.activate(service.id, *protocol, fd.as_fd()) {
            service.record = before;
            // Undo: the earlier protocols go back to their previous generation's socket, or to
            // none.
            for (protocol, _) in &sockets[..done] {
                let restored = service.socket_of(service.active(*protocol), *protocol);
                let _ = match restored {
                    Some(fd) => backend.activate(service.id, *protocol, fd.as_fd()),
                    None => backend.deactivate(service.id, *protocol),
                };
            }
            if let Err(undo) = backend.save_service(service.id, &service.record, false) {
                // Adoption will steer to what the record names; say so now.
                tracing::warn!(
                    "restoring the record of service id {} after a failed switch: {undo}",
                    service.id
                );
            }
            return Err(err.into());
        }
    }
    Ok(())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn record_name(record: &ServiceRecord) -> Option<ServiceName> {
    std::str::from_utf8(record.name_bytes()).ok()?.parse().ok()
}

fn record_label(record: &GenerationRecord) -> Option<String> {
    std::str::from_utf8(record.label_bytes())
        .ok()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
}

/// A generation's sockets as taken again from its process, by protocol.
type TakenSockets = Vec<(Protocol, OwnedFd)>;

/// Services, their bindings and generations, over a backend.
pub struct Registry {
    backend: Box<dyn Backend>,
    netns: u64,
    services: BTreeMap<ServiceName, Service>,
    bindings: BTreeMap<Binding, ServiceName>,
    /// Sources routed to a probe: each to one probe at a time.
    probes: std::collections::BTreeSet<std::net::SocketAddr>,
}

impl Registry {
    /// A registry over `backend`, adopting whatever the backend remembers. Generations whose
    /// process is gone, or whose fd no longer is the registered socket, are forgotten, and a
    /// service whose active generation is gone is left with no socket. `netns` is the inode of
    /// the daemon's network namespace; sockets must belong to it. Returns notes for the log.
    pub fn adopt(
        backend: Box<dyn Backend>,
        netns: u64,
    ) -> Result<(Self, Vec<String>), RegistryError> {
        let state = backend.load_state()?;
        let mut registry = Self {
            backend,
            netns,
            services: BTreeMap::new(),
            bindings: BTreeMap::new(),
            probes: Default::default(),
        };
        let mut notes = state.notes;
        let mut names = BTreeMap::new();
        for (id, record) in state.services {
            let Some(name) = record_name(&record) else {
                notes.push(format!(
                    "forgetting service id {id}: its name is unreadable"
                ));
                registry.backend.forget_service(id)?;
                continue;
            };
            names.insert(id, name.clone());
            registry.services.insert(
                name,
                Service {
                    id,
                    record,
                    owner: Owner::default(),
                    generations: BTreeMap::new(),
                    relistened: 0,
                },
            );
        }
        for (id, owner) in state.owners {
            match names.get(&id) {
                Some(name) => {
                    if let Some(service) = registry.services.get_mut(name) {
                        service.owner = owner.into();
                    }
                }
                None => registry
                    .backend
                    .save_owner(id, &hotswap_common::OwnerRecord::default())?,
            }
        }
        for (binding, id) in state.bindings {
            match names.get(&id) {
                Some(name) => {
                    registry.bindings.insert(binding, name.clone());
                }
                None => {
                    // A binding nobody can see would drop traffic forever.
                    notes.push(format!(
                        "removing {binding}: it belongs to no known service"
                    ));
                    registry.backend.remove_binding(&binding)?;
                }
            }
        }
        for (key, record) in state.generations {
            let mut alive_pidfd = None;
            let Some(name) = names.get(&key.service_id) else {
                registry.backend.forget_generation(&key)?;
                continue;
            };
            let sockets: Option<Vec<GenerationSocket>> = Pidfd::open(record.pid)
                .ok()
                .and_then(|pidfd| {
                    let sockets = [Protocol::Tcp, Protocol::Udp]
                        .map(|protocol| (protocol, protocol.slot()))
                        .into_iter()
                        .filter(|&(_, slot)| record.fds[slot] >= 0)
                        .map(|(protocol, slot)| {
                            let (fd, cookie) = (record.fds[slot], record.cookies[slot]);
                            let socket = retake_socket(&pidfd, record.pid, fd, cookie)?;
                            Some(GenerationSocket {
                                protocol,
                                fd_in_process: fd,
                                cookie,
                                inode: inode(socket.as_fd()).ok()?,
                                local_addr: crate::socket::local_addr(socket.as_fd()),
                            })
                        })
                        .collect::<Option<Vec<_>>>()?;
                    Some((pidfd, sockets))
                })
                .map(|(pidfd, sockets)| {
                    alive_pidfd = Some(pidfd);
                    sockets
                });
            match (sockets, alive_pidfd.take()) {
                (Some(sockets), Some(pidfd)) if !sockets.is_empty() => {
                    let service = registry.services.get_mut(name).expect("named above");
                    // Ids count up even if a crash came between writing a generation and
                    // bumping the counter.
                    service.record.next_generation =
                        service.record.next_generation.max(key.generation + 1);
                    service.generations.insert(
                        key.generation,
                        Generation {
                            pid: record.pid,
                            pidfd,
                            sockets,
                            label: record_label(&record),
                            registered_at: record.registered_at,
                        },
                    );
                    notes.push(format!(
                        "adopted generation {} of service {name} (pid {})",
                        key.generation, record.pid
                    ));
                }
                _ => {
                    notes.push(format!(
                        "generation {} of service {name} (pid {}) is gone",
                        key.generation, record.pid
                    ));
                    registry.backend.forget_generation(&key)?;
                }
            }
        }
        // The kernel is the truth: where it steers a live generation's socket, the record
        // follows (a switch whose record write failed to be undone, a record changed by hand).
        // Where it steers nothing or a socket no live generation holds, or cannot say, the
        // record's intent is carried out below.
        for (name, service) in &mut registry.services {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let steered = match registry.backend.steered(service.id, protocol) {
                    Ok(steered) => steered,
                    Err(err) => {
                        notes.push(format!(
                            "service {name}: {}; going by its record",
                            crate::error_chain(&err)
                        ));
                        Steered::Unknown
                    }
                };
                let Steered::Socket(cookie) = steered else {
                    continue;
                };
                let holder = service.generations.iter().find_map(|(&id, g)| {
                    g.sockets
                        .iter()
                        .any(|s| s.protocol == protocol && s.cookie == cookie)
                        .then_some(id)
                });
                let recorded = service.active(protocol);
                match holder {
                    Some(id) if id != recorded => {
                        notes.push(format!(
                            "service {name}: the kernel steers {protocol} to generation {id}, its record said {}; the record follows the kernel",
                            if recorded == 0 { "none".to_owned() } else { recorded.to_string() }
                        ));
                        service.set_active(protocol, id);
                    }
                    Some(_) => {}
                    None => notes.push(format!(
                        "service {name}: the kernel steers {protocol} to a socket no live generation holds (cookie {cookie}); going by its record"
                    )),
                }
            }
        }
        // An active generation that did not survive leaves its service with no socket.
        for (name, service) in &mut registry.services {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let active = service.active(protocol);
                if active != 0 && !service.generations.contains_key(&active) {
                    notes.push(format!(
                        "service {name} has no active {protocol} socket: generation {active} is gone"
                    ));
                    registry.backend.deactivate(service.id, protocol)?;
                    service.set_active(protocol, 0);
                } else if active != 0 {
                    // The kernel is made to steer to what the record names: the record is
                    // written before every switch, so it is the intent of the last one,
                    // which may not have reached the kernel before a daemon died.
                    let steered = match service.socket_of(active, protocol) {
                        Some(fd) => registry
                            .backend
                            .activate(service.id, protocol, fd.as_fd())
                            .map_err(|err| err.to_string()),
                        None => Err("its socket could not be taken again".to_owned()),
                    };
                    if let Err(why) = steered {
                        notes.push(format!(
                            "service {name}: steering {protocol} to generation {active} again failed ({why}); it has no active {protocol} socket"
                        ));
                        registry.backend.deactivate(service.id, protocol)?;
                        service.set_active(protocol, 0);
                    }
                }
            }
            registry
                .backend
                .save_service(service.id, &service.record, false)?;
        }
        Ok((registry, notes))
    }

    /// The backend's description.
    pub fn backend_info(&self) -> BackendInfo {
        self.backend.info()
    }

    /// Turns the data path's debug logging on or off.
    pub fn set_debug_log(&mut self, on: bool) -> Result<(), RegistryError> {
        if on {
            self.check(Feature::DebugLog)?;
        }
        Ok(self.backend.set_debug_log(on)?)
    }

    /// Refuses what the backend cannot do, saying why.
    fn check(&self, feature: Feature) -> Result<(), RegistryError> {
        match self.backend.capabilities().support(feature) {
            Support::Yes => Ok(()),
            Support::No(lack) => Err(RegistryError::Unsupported {
                backend: self.backend.info().name,
                feature,
                lack,
            }),
        }
    }

    fn service(&self, name: &ServiceName) -> Result<&Service, RegistryError> {
        self.services
            .get(name)
            .ok_or_else(|| RegistryError::UnknownService(name.to_string()))
    }

    fn free_service_id(&self) -> Result<u32, RegistryError> {
        let used: std::collections::BTreeSet<u32> = self.services.values().map(|s| s.id).collect();
        (1..MAX_SERVICES)
            .find(|id| !used.contains(id))
            .ok_or(RegistryError::TooManyServices)
    }

    /// Who owns `service` besides root; `None` when there is no such service.
    pub fn owner(&self, service: &ServiceName) -> Option<Owner> {
        self.services.get(service).map(|s| s.owner)
    }

    /// Gives `service` the owner `owner` (nothing set: root's alone).
    pub fn set_owner(&mut self, name: &ServiceName, owner: Owner) -> Result<(), RegistryError> {
        let id = self.service(name)?.id;
        self.backend.save_owner(id, &owner.into())?;
        if let Some(service) = self.services.get_mut(name) {
            service.owner = owner;
        }
        Ok(())
    }

    /// Steers `binding` to `service`, creating the service when it is new; `owner`, where
    /// given, becomes the service's owner — set before the binding steers anything, and undone
    /// (with the service, when it is new) when the binding fails: all of it happens or none.
    pub fn bind(
        &mut self,
        service: &ServiceName,
        binding: Binding,
        owner: Option<Owner>,
    ) -> Result<(), RegistryError> {
        check_bindable(&binding.prefix)?;
        // One address, or every address of a family (0.0.0.0/0, ::/0: a socket bound to the
        // unspecified address), on one port: what one socket can be bound to.
        let every_address =
            binding.prefix.prefix_len() == 0 && binding.prefix.addr().is_unspecified();
        let one_address = binding.prefix.prefix_len() == binding.prefix.max_prefix_len();
        if binding.port == 0 || !(one_address || every_address) {
            self.check(Feature::Prefixes)?;
        }
        if let Some(owner) = self.bindings.get(&binding) {
            return Err(RegistryError::AlreadyBound {
                binding,
                service: owner.clone(),
            });
        }
        let existing = self.services.get(service).map(|s| (s.id, s.owner));
        let id = match existing {
            Some((id, _)) => {
                if let Some(owner) = owner {
                    self.set_owner(service, owner)?;
                }
                id
            }
            None => {
                let id = self.free_service_id()?;
                let record = ServiceRecord::new(service.as_str().as_bytes(), 1, 0, 0);
                self.backend.save_service(id, &record, true)?;
                let owner = owner.unwrap_or_default();
                if !owner.is_none() {
                    if let Err(err) = self.backend.save_owner(id, &owner.into()) {
                        let _ = self.backend.forget_service(id);
                        return Err(err.into());
                    }
                }
                self.services.insert(
                    service.clone(),
                    Service {
                        id,
                        record,
                        owner,
                        generations: BTreeMap::new(),
                        relistened: 0,
                    },
                );
                id
            }
        };
        if let Err(err) = self.backend.add_binding(&binding, id) {
            match existing {
                None => {
                    self.services.remove(service);
                    let _ = self.backend.forget_service(id);
                }
                Some((_, previous)) if owner.is_some() => {
                    if let Err(undo) = self.set_owner(service, previous) {
                        tracing::warn!("giving service {service} back to {previous}: {undo}");
                    }
                }
                Some(_) => {}
            }
            return Err(err.into());
        }
        self.bindings.insert(binding, service.clone());
        Ok(())
    }

    /// Stops steering `binding` to `service`.
    pub fn unbind(&mut self, service: &ServiceName, binding: Binding) -> Result<(), RegistryError> {
        self.service(service)?;
        if self.bindings.get(&binding) != Some(service) {
            return Err(RegistryError::NotBound {
                binding,
                service: service.clone(),
            });
        }
        self.backend.remove_binding(&binding)?;
        self.bindings.remove(&binding);
        self.forget_if_empty(service)
    }

    /// Forgets `name` once nothing is left of it — no binding, no generation — so that its id
    /// serves the next new service: ids are few ([`MAX_SERVICES`] - 1) and pinned across
    /// restarts, and were never given back before. A new service's counters start at zero.
    fn forget_if_empty(&mut self, name: &ServiceName) -> Result<(), RegistryError> {
        let Some(service) = self.services.get(name) else {
            return Ok(());
        };
        if !service.generations.is_empty() || self.bindings.values().any(|owner| owner == name) {
            return Ok(());
        }
        self.backend.forget_service(service.id)?;
        self.services.remove(name);
        Ok(())
    }

    /// Takes the sockets `fds` of process `pid` (at most one per protocol) as a new generation
    /// of `service` and returns its id; with `activate`, also switches to it. Either all of it
    /// happens or none of it.
    pub fn register(
        &mut self,
        service_name: &ServiceName,
        pid: u32,
        fds: &[RawFd],
        label: Option<String>,
        activate: bool,
    ) -> Result<u32, RegistryError> {
        self.register_as(service_name, pid, fds, label, activate, None)
    }

    /// [`Registry::register`] for a caller that is not root: process `pid` must run as
    /// `runs_as` (every one of its uids), so that an owner's generations are only their own
    /// processes' sockets.
    pub fn register_as(
        &mut self,
        service_name: &ServiceName,
        pid: u32,
        fds: &[RawFd],
        label: Option<String>,
        activate: bool,
        runs_as: Option<u32>,
    ) -> Result<u32, RegistryError> {
        let label = label.filter(|l| !l.is_empty());
        if let Some(label) = &label {
            check_label(label)?;
        }
        if fds.is_empty() {
            return Err(RegistryError::NoSockets);
        }
        let service = self.service(service_name)?;
        let service_id = service.id;
        let pidfd = Pidfd::open(pid)?;
        if let Some(uid) = runs_as {
            crate::access::check_process(uid, pid, &pidfd)?;
        }
        let mut taken = Vec::new();
        for &fd in fds {
            let socket = take_socket(&pidfd, pid, fd, self.netns)?;
            let protocol = socket.protocol;
            if taken
                .iter()
                .any(|(_, s): &(RawFd, InspectedSocket)| s.protocol == protocol)
            {
                return Err(RegistryError::TwoSockets(protocol));
            }
            let families: Vec<bool> = self
                .bindings
                .iter()
                .filter(|(b, s)| *s == service_name && b.protocol == protocol)
                .map(|(b, _)| b.prefix.addr().is_ipv4())
                .collect();
            if families.is_empty() {
                return Err(RegistryError::WrongProtocol {
                    service: service_name.clone(),
                    protocol,
                });
            }
            let servable = families.iter().any(|&v4| {
                if v4 {
                    socket.serves_ipv4
                } else {
                    socket.serves_ipv6
                }
            });
            if !servable {
                return Err(RegistryError::WrongFamily {
                    service: service_name.clone(),
                    protocol,
                    family: if socket.serves_ipv4 { "IPv4" } else { "IPv6" },
                    binding_family: if families[0] { "IPv4" } else { "IPv6" },
                });
            }
            // One socket may serve several generations (the uds backend shares one, through
            // other descriptors), but one descriptor is one generation.
            if let Some((&generation, _)) = service.generations.iter().find(|(_, g)| {
                g.pid == pid
                    && g.sockets
                        .iter()
                        .any(|s| s.cookie == socket.cookie && s.fd_in_process == fd)
            }) {
                return Err(RegistryError::AlreadyRegistered {
                    service: service_name.clone(),
                    generation,
                });
            }
            taken.push((fd, socket));
        }
        // Again once the sockets are taken: a process that exec'd a set-uid program between
        // the first check and the take is refused.
        if let Some(uid) = runs_as {
            crate::access::check_process(uid, pid, &pidfd)?;
        }

        let generation_id = service.record.next_generation;
        for (_, socket) in &taken {
            self.backend.admit(
                service_id,
                socket.protocol,
                socket.fd.as_fd(),
                socket.cookie,
            )?;
        }
        let service = self.service(service_name)?;
        let generation = Generation {
            pid,
            pidfd,
            sockets: taken
                .iter()
                .map(|(fd, s)| GenerationSocket {
                    protocol: s.protocol,
                    fd_in_process: *fd,
                    cookie: s.cookie,
                    inode: s.inode,
                    local_addr: s.local_addr,
                })
                .collect(),
            label,
            registered_at: now(),
        };
        // Kernel writes, in an order that a crash at any point leaves adoptable: the id counter
        // first, then the generation, then the switch.
        let mut service_record = service.record;
        service_record.next_generation += 1;
        self.backend
            .save_service(service_id, &service_record, false)?;
        let key = GenerationKey {
            service_id,
            generation: generation_id,
        };
        let service = self.services.get_mut(service_name).expect("checked above");
        service.record = service_record;
        self.backend.save_generation(&key, &generation.record())?;
        if activate {
            let sockets: Vec<(Protocol, OwnedFd)> =
                taken.into_iter().map(|(_, s)| (s.protocol, s.fd)).collect();
            if let Err(err) = activate_all(self.backend.as_mut(), service, generation_id, &sockets)
            {
                let _ = self.backend.forget_generation(&key);
                return Err(err);
            }
        }
        service.generations.insert(generation_id, generation);
        Ok(generation_id)
    }

    /// Makes `generation` the active one for each of its protocols: one map update per
    /// protocol. Returns the generation that was active before (for its first protocol).
    pub fn switch(
        &mut self,
        service_name: &ServiceName,
        generation: u32,
    ) -> Result<Option<u32>, RegistryError> {
        self.check(Feature::Switch)?;
        let (first_protocol, sockets) = self.live_sockets(service_name, generation)?;
        let service_id = self.service(service_name)?.id;
        // A socket its process shut down listens again before it gets connections.
        for (protocol, fd) in &sockets {
            if *protocol == Protocol::Tcp
                && !crate::socket::is_listening(fd.as_fd()).unwrap_or(true)
            {
                self.backend.relisten(service_id, *protocol, fd.as_fd())?;
                tracing::warn!("generation {generation} of service {service_name}: its socket had been shut down; it listens again");
                if let Some(service) = self.services.get_mut(service_name) {
                    service.relistened += 1;
                }
            }
        }
        let service = self
            .services
            .get_mut(service_name)
            .expect("live_sockets found it");
        let previous = first_protocol
            .map(|p| service.active(p))
            .filter(|&g| g != 0);
        activate_all(self.backend.as_mut(), service, generation, &sockets)?;
        Ok(previous)
    }

    /// A live generation's sockets, taken again from its process (with the protocol of its
    /// first), or why not.
    fn live_sockets(
        &self,
        service_name: &ServiceName,
        generation: u32,
    ) -> Result<(Option<Protocol>, TakenSockets), RegistryError> {
        let service = self
            .services
            .get(service_name)
            .ok_or_else(|| RegistryError::UnknownService(service_name.to_string()))?;
        let target = service.generations.get(&generation).ok_or_else(|| {
            RegistryError::UnknownGeneration {
                service: service_name.clone(),
                generation,
            }
        })?;
        let sockets = target
            .retake()
            .ok_or_else(|| RegistryError::GenerationGone {
                service: service_name.clone(),
                generation,
            })?;
        Ok((target.protocols().next(), sockets))
    }

    /// Routes new TCP connections from `source` to `generation`'s own socket (see
    /// [`Backend::add_probe`]) until [`Registry::unprobe`].
    pub fn probe(
        &mut self,
        service_name: &ServiceName,
        generation: u32,
        source: std::net::SocketAddr,
    ) -> Result<(), RegistryError> {
        self.check(Feature::Probe)?;
        let (_, sockets) = self.live_sockets(service_name, generation)?;
        let (_, socket) = sockets
            .iter()
            .find(|(p, _)| *p == Protocol::Tcp)
            .ok_or_else(|| RegistryError::NothingToProbe {
                service: service_name.clone(),
                generation,
                protocol: Protocol::Tcp,
            })?;
        let source = crate::model::canonical(source);
        if self.probes.contains(&source) {
            return Err(RegistryError::ProbeInUse(source));
        }
        self.backend
            .add_probe(source, Protocol::Tcp, socket.as_fd())?;
        self.probes.insert(source);
        Ok(())
    }

    /// Stops routing a probe's `source`.
    pub fn unprobe(&mut self, source: std::net::SocketAddr) -> Result<(), RegistryError> {
        let source = crate::model::canonical(source);
        self.probes.remove(&source);
        self.backend.remove_probe(source, Protocol::Tcp)?;
        Ok(())
    }

    /// Another service's binding that takes some of the connections `binding` would: the same
    /// protocol, prefixes one inside the other, and the same port or either on every port.
    pub fn overlapping(
        &self,
        service: &ServiceName,
        binding: &Binding,
    ) -> Option<(Binding, ServiceName)> {
        self.bindings
            .iter()
            .find(|(other, owner)| {
                *owner != service
                    && other.protocol == binding.protocol
                    && (other.port == binding.port || other.port == 0 || binding.port == 0)
                    && (other.prefix.contains(&binding.prefix)
                        || binding.prefix.contains(&other.prefix))
            })
            .map(|(other, owner)| (*other, owner.clone()))
    }

    /// Forgets a generation at its owner's word; an active one leaves its service without a
    /// socket.
    pub fn forget(
        &mut self,
        service_name: &ServiceName,
        generation: u32,
    ) -> Result<(), RegistryError> {
        let service = self
            .services
            .get_mut(service_name)
            .ok_or_else(|| RegistryError::UnknownService(service_name.to_string()))?;
        let gone = service.generations.remove(&generation).ok_or_else(|| {
            RegistryError::UnknownGeneration {
                service: service_name.clone(),
                generation,
            }
        })?;
        let_go(self.backend.as_mut(), service, generation, &gone)?;
        self.forget_if_empty(service_name)
    }

    /// Lets go of generations whose process exited or no longer holds a registered socket.
    /// An active one leaves its service without a socket: new connections are refused and
    /// counted.
    pub fn reap(&mut self) -> Vec<Reaped> {
        let mut reaped = Vec::new();
        for (name, service) in &mut self.services {
            let gone: Vec<u32> = service
                .generations
                .iter()
                .filter(|(_, g)| !g.alive())
                .map(|(&id, _)| id)
                .collect();
            for id in gone {
                let generation = service.generations.remove(&id).expect("listed above");
                let was_active = generation.protocols().any(|p| service.active(p) == id);
                // Usually a closed socket has left the map already; a socket the process handed
                // to someone else before exiting has not.
                if let Err(err) = let_go(self.backend.as_mut(), service, id, &generation) {
                    tracing::warn!("letting go of generation {id} of service {name}: {err}");
                }
                reaped.push(Reaped {
                    service: name.clone(),
                    generation: id,
                    was_active,
                    process_exited: generation.pidfd.has_exited(),
                });
            }
        }
        let emptied: std::collections::BTreeSet<ServiceName> =
            reaped.iter().map(|r| r.service.clone()).collect();
        for name in emptied {
            if let Err(err) = self.forget_if_empty(&name) {
                tracing::warn!("forgetting service {name}, which has nothing left: {err}");
            }
        }
        reaped
    }

    /// A socket for a new generation of `service` for `protocol` where the backend makes them,
    /// or `None` when each generation brings its own; `requester` is who asked (see
    /// [`Backend::listener`]).
    pub fn listener(
        &mut self,
        service: &ServiceName,
        protocol: Protocol,
        requester: Option<crate::socket::Pidfd>,
    ) -> Result<Option<OwnedFd>, RegistryError> {
        let service = self.service(service)?;
        Ok(self.backend.listener(service.id, protocol, requester)?)
    }

    /// The backend's repairs of its own sockets (see [`Backend::upkeep`]), by service.
    pub fn upkeep(&mut self) -> Vec<(ServiceName, Repaired)> {
        let repaired = self.backend.upkeep();
        let mut named = Vec::new();
        for repair in repaired {
            if let Some((name, service)) = self
                .services
                .iter_mut()
                .find(|(_, s)| s.id == repair.service_id)
            {
                if repair.what == crate::backend::Repair::Relistened {
                    service.relistened += 1;
                }
                named.push((name.clone(), repair));
            }
        }
        named
    }

    /// Makes every active generation's TCP socket that a process shut down listen again and
    /// puts it back in front of connections (a shut-down socket leaves the kernel's map or
    /// group). Returns the generations repaired.
    pub fn relisten_active(&mut self) -> Vec<(ServiceName, u32)> {
        let mut repaired = Vec::new();
        // Where the backend makes the sockets it holds them too, and its own upkeep repairs
        // them: taking them again from their processes would only repeat that work.
        if self.backend.capabilities().sockets == crate::backend::SocketSource::Backend {
            return repaired;
        }
        for (name, service) in &mut self.services {
            let id = service.active(Protocol::Tcp);
            let Some(sockets) = service.generations.get(&id).and_then(Generation::retake) else {
                continue;
            };
            for (protocol, fd) in sockets {
                if protocol != Protocol::Tcp
                    || crate::socket::is_listening(fd.as_fd()).unwrap_or(true)
                {
                    continue;
                }
                let result = self
                    .backend
                    .relisten(service.id, protocol, fd.as_fd())
                    .and_then(|()| self.backend.activate(service.id, protocol, fd.as_fd()));
                match result {
                    Ok(()) => {
                        service.relistened += 1;
                        repaired.push((name.clone(), id));
                    }
                    Err(err) => tracing::warn!(
                        "generation {id} of service {name}: its socket was shut down and cannot listen again: {}",
                        crate::error_chain(&err)
                    ),
                }
            }
        }
        repaired
    }

    /// Services, bindings and generations.
    pub fn status(&self) -> StatusReport {
        let services = self
            .services
            .iter()
            .map(|(name, service)| ServiceStatus {
                name: name.clone(),
                id: service.id,
                owner: service.owner,
                bindings: self
                    .bindings
                    .iter()
                    .filter(|(_, s)| *s == name)
                    .map(|(b, _)| *b)
                    .collect(),
                generations: service
                    .generations
                    .iter()
                    .map(|(&id, g)| GenerationStatus {
                        id,
                        pid: g.pid,
                        sockets: g
                            .sockets
                            .iter()
                            .map(|s| SocketStatus {
                                protocol: s.protocol,
                                fd: s.fd_in_process,
                                local_addr: s.local_addr,
                                listening: s.protocol != Protocol::Tcp
                                    || retake_socket(&g.pidfd, g.pid, s.fd_in_process, s.cookie)
                                        .is_some_and(|fd| {
                                            crate::socket::is_listening(fd.as_fd()).unwrap_or(false)
                                        }),
                            })
                            .collect(),
                        label: g.label.clone(),
                        active: g.protocols().any(|p| service.active(p) == id),
                        registered_at: g.registered_at,
                    })
                    .collect(),
                relistened: service.relistened,
            })
            .collect();
        StatusReport {
            backend: self.backend.info(),
            services,
        }
    }

    /// Every service's counters.
    pub fn metrics(&self) -> Result<Vec<ServiceMetricsReport>, RegistryError> {
        self.check(Feature::Metrics)?;
        self.services
            .iter()
            .map(|(name, service)| {
                let m = self.backend.metrics(service.id)?;
                Ok(ServiceMetricsReport {
                    service: name.clone(),
                    lookups: m.lookups,
                    steered: m.steered,
                    no_socket: m.no_socket,
                    errors: m.errors,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{TcpListener, UdpSocket},
        os::fd::AsRawFd as _,
    };

    use super::*;
    use crate::{backend::fake::FakeBackend, model::parse_prefix, socket::socket_cookie};

    fn netns() -> u64 {
        crate::socket::netns_inode(std::path::Path::new("/proc/thread-self/ns/net")).unwrap()
    }

    fn registry() -> (Registry, FakeBackend) {
        let fake = FakeBackend::default();
        let (registry, _) = Registry::adopt(Box::new(fake.clone()), netns()).unwrap();
        (registry, fake)
    }

    /// The cookie of the socket the fake kernel steers service 1's TCP to.
    fn active(fake: &FakeBackend) -> Option<u64> {
        fake.0
            .lock()
            .unwrap()
            .active
            .get(&(1, Protocol::Tcp))
            .copied()
    }

    fn cookie(listener: &TcpListener) -> u64 {
        socket_cookie(listener.as_fd()).unwrap()
    }

    fn web() -> ServiceName {
        "web".parse().unwrap()
    }

    fn tcp_binding(port: u16) -> Binding {
        Binding {
            protocol: Protocol::Tcp,
            prefix: parse_prefix("127.0.0.1/32").unwrap(),
            port,
        }
    }

    #[test]
    fn bind_creates_services_and_refuses_conflicts() {
        let (mut registry, fake) = registry();
        registry.bind(&web(), tcp_binding(80), None).unwrap();
        registry.bind(&web(), tcp_binding(81), None).unwrap();
        let other: ServiceName = "other".parse().unwrap();
        let err = registry.bind(&other, tcp_binding(80), None).unwrap_err();
        assert!(matches!(err, RegistryError::AlreadyBound { .. }), "{err}");
        assert_eq!(
            fake.0.lock().unwrap().services.len(),
            1,
            "refused bind created a service"
        );
        let err = registry.unbind(&web(), tcp_binding(82)).unwrap_err();
        assert!(matches!(err, RegistryError::NotBound { .. }), "{err}");
        registry.unbind(&web(), tcp_binding(81)).unwrap();
        assert_eq!(
            registry.status().services[0].bindings,
            vec![tcp_binding(80)]
        );
        assert_eq!(fake.0.lock().unwrap().bindings.len(), 1);
    }

    #[test]
    fn owners_are_kept_across_adoption_and_go_with_their_service() {
        let (mut registry, fake) = registry();
        let group = Owner {
            uid: None,
            gid: Some(64000),
        };
        registry.bind(&web(), tcp_binding(80), Some(group)).unwrap();
        let api: ServiceName = "api".parse().unwrap();
        registry.bind(&api, tcp_binding(81), None).unwrap();
        assert_eq!(registry.owner(&web()), Some(group));
        assert_eq!(registry.owner(&api), Some(Owner::default()));
        let (mut adopted, _) = Registry::adopt(Box::new(fake.clone()), netns()).unwrap();
        assert_eq!(adopted.owner(&web()), Some(group));
        assert_eq!(adopted.status().services[1].owner, group);
        let user = Owner {
            uid: Some(64100),
            gid: None,
        };
        adopted.set_owner(&api, user).unwrap();
        adopted.set_owner(&web(), Owner::default()).unwrap();
        assert_eq!(fake.0.lock().unwrap().owners.len(), 1);
        // The last binding gone, the service goes, and its owner with it: a new service of the
        // same name is root's until root says otherwise.
        adopted.unbind(&api, tcp_binding(81)).unwrap();
        assert!(fake.0.lock().unwrap().owners.is_empty());
        adopted.bind(&api, tcp_binding(81), None).unwrap();
        assert_eq!(adopted.owner(&api), Some(Owner::default()));
    }

    #[test]
    fn a_bind_that_fails_leaves_the_owner_as_it_was() {
        let (mut registry, fake) = registry();
        registry.bind(&web(), tcp_binding(80), None).unwrap();
        fake.0.lock().unwrap().fail_bind = true;
        let group = Owner {
            uid: None,
            gid: Some(64000),
        };
        registry
            .bind(&web(), tcp_binding(81), Some(group))
            .unwrap_err();
        assert_eq!(registry.owner(&web()), Some(Owner::default()));
        assert!(fake.0.lock().unwrap().owners.is_empty());
        let api: ServiceName = "api".parse().unwrap();
        registry
            .bind(&api, tcp_binding(82), Some(group))
            .unwrap_err();
        assert_eq!(registry.owner(&api), None);
        assert_eq!(registry.status().services.len(), 1);
    }

    #[test]
    fn bindings_overlap_where_they_could_take_the_same_connection() {
        let (mut registry, _) = registry();
        let api: ServiceName = "api".parse().unwrap();
        registry.bind(&api, tcp_binding(9090), None).unwrap();
        let binding = |prefix: &str, port| Binding {
            protocol: Protocol::Tcp,
            prefix: parse_prefix(prefix).unwrap(),
            port,
        };
        for (wider, port) in [
            ("127.0.0.0/8", 9090),
            ("127.0.0.1/32", 0),
            ("0.0.0.0/0", 9090),
        ] {
            let (other, service) = registry
                .overlapping(&web(), &binding(wider, port))
                .unwrap_or_else(|| panic!("{wider} {port}"));
            assert_eq!((other, service), (tcp_binding(9090), api.clone()));
        }
        for (apart, port) in [
            ("127.0.0.2/32", 9090),
            ("127.0.0.0/8", 9091),
            ("::/0", 9090),
        ] {
            assert_eq!(registry.overlapping(&web(), &binding(apart, port)), None);
        }
        // A service's own bindings are its own.
        assert_eq!(
            registry.overlapping(&api, &binding("127.0.0.0/8", 9090)),
            None
        );
        let udp = Binding {
            protocol: Protocol::Udp,
            ..tcp_binding(9090)
        };
        assert_eq!(registry.overlapping(&web(), &udp), None);
    }

    #[test]
    fn a_service_with_nothing_left_gives_its_id_back() {
        let (mut registry, fake) = registry();
        // Every id used and given back, twice over: the limit counts services that exist, not
        // services that ever were.
        for round in 0..2u16 {
            for n in 1..MAX_SERVICES {
                let name: ServiceName = format!("s{n}").parse().unwrap();
                registry
                    .bind(&name, tcp_binding(round * 10_000 + 1), None)
                    .unwrap();
                registry
                    .unbind(&name, tcp_binding(round * 10_000 + 1))
                    .unwrap();
            }
        }
        assert!(registry.status().services.is_empty());
        assert!(fake.0.lock().unwrap().services.is_empty());
        // A service with a generation but no binding stays until the generation is gone.
        registry.bind(&web(), tcp_binding(80), None).unwrap();
        let socket = TcpListener::bind("127.0.0.1:0").unwrap();
        let generation = registry
            .register(
                &web(),
                std::process::id(),
                &[socket.as_raw_fd()],
                None,
                true,
            )
            .unwrap();
        registry.unbind(&web(), tcp_binding(80)).unwrap();
        assert_eq!(registry.status().services.len(), 1);
        registry.forget(&web(), generation).unwrap();
        assert!(registry.status().services.is_empty());
        assert!(fake.0.lock().unwrap().services.is_empty());
    }

    #[test]
    fn register_switch_and_reap() {
        let (mut registry, fake) = registry();
        let me = std::process::id();
        let one = TcpListener::bind("127.0.0.1:0").unwrap();
        let two = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = registry
            .register(&web(), me, &[one.as_raw_fd()], None, false)
            .unwrap_err();
        assert!(matches!(err, RegistryError::UnknownService(_)), "{err}");
        registry.bind(&web(), tcp_binding(80), None).unwrap();
        let err = registry
            .register(&web(), me, &[udp.as_raw_fd()], None, false)
            .unwrap_err();
        assert!(matches!(err, RegistryError::WrongProtocol { .. }), "{err}");

        assert_eq!(
            registry
                .register(&web(), me, &[one.as_raw_fd()], Some("v1".into()), true)
                .unwrap(),
            1
        );
        assert_eq!(
            registry
                .register(&web(), me, &[two.as_raw_fd()], None, false)
                .unwrap(),
            2
        );
        let err = registry
            .register(&web(), me, &[two.as_raw_fd()], None, false)
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::AlreadyRegistered { generation: 2, .. }),
            "{err}"
        );
        assert_eq!(active(&fake), Some(cookie(&one)));

        assert_eq!(registry.switch(&web(), 2).unwrap(), Some(1));
        assert_eq!(active(&fake), Some(cookie(&two)));
        let err = registry.switch(&web(), 3).unwrap_err();
        assert!(
            matches!(err, RegistryError::UnknownGeneration { generation: 3, .. }),
            "{err}"
        );

        // A restarted daemon adopts both generations.
        let (adopted, _) = Registry::adopt(Box::new(fake.clone()), netns()).unwrap();
        assert_eq!(adopted.status().services, registry.status().services);
        drop(adopted);

        // The active socket closes: the service is left with none.
        let two_cookie = cookie(&two);
        drop(two);
        let reaped = registry.reap();
        assert_eq!(
            reaped,
            vec![Reaped {
                service: web(),
                generation: 2,
                was_active: true,
                process_exited: false
            }]
        );
        assert_eq!(active(&fake), None);
        assert_ne!(Some(two_cookie), active(&fake));
        let status = registry.status();
        assert_eq!(status.services[0].generations.len(), 1);
        assert!(!status.services[0].generations[0].active);
        assert_eq!(fake.0.lock().unwrap().generations.len(), 1);
        // Ids keep counting up.
        let three = TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            registry
                .register(&web(), me, &[three.as_raw_fd()], None, true)
                .unwrap(),
            3
        );
    }

    #[test]
    fn failed_activation_registers_nothing() {
        let (mut registry, fake) = registry();
        registry.bind(&web(), tcp_binding(80), None).unwrap();
        let before = registry.status();
        fake.0.lock().unwrap().fail_activate = true;
        let one = TcpListener::bind("127.0.0.1:0").unwrap();
        let me = std::process::id();
        assert!(registry
            .register(&web(), me, &[one.as_raw_fd()], None, true)
            .is_err());
        assert_eq!(registry.status(), before);
        assert!(fake.0.lock().unwrap().generations.is_empty());
        // Nor does a failed switch change which generation is active.
        fake.0.lock().unwrap().fail_activate = false;
        registry
            .register(&web(), me, &[one.as_raw_fd()], None, true)
            .unwrap();
        let two = TcpListener::bind("127.0.0.1:0").unwrap();
        let second = registry
            .register(&web(), me, &[two.as_raw_fd()], None, false)
            .unwrap();
        fake.0.lock().unwrap().fail_activate = true;
        let before = registry.status();
        assert!(registry.switch(&web(), second).is_err());
        assert_eq!(registry.status(), before);
    }

    #[test]
    fn the_record_and_the_kernel_never_disagree_on_the_active_generation() {
        let (mut registry, fake) = registry();
        registry.bind(&web(), tcp_binding(80), None).unwrap();
        let me = std::process::id();
        let one = TcpListener::bind("127.0.0.1:0").unwrap();
        let two = TcpListener::bind("127.0.0.1:0").unwrap();
        registry
            .register(&web(), me, &[one.as_raw_fd()], None, true)
            .unwrap();
        let second = registry
            .register(&web(), me, &[two.as_raw_fd()], None, false)
            .unwrap();
        // The record of a switch cannot be written: the switch is refused and the kernel still
        // steers to generation 1 (it went on to generation 2, while status said 1).
        fake.0.lock().unwrap().fail_save_service = true;
        let before = registry.status();
        assert!(registry.switch(&web(), second).is_err());
        assert_eq!(registry.status(), before);
        assert_eq!(active(&fake), Some(cookie(&one)));
        fake.0.lock().unwrap().fail_save_service = false;
        // A daemon that died between the record and the map update: the record names 2, the
        // kernel still 1. The next daemon reads the kernel back and the record follows it: a
        // switch that never reached the kernel did not happen (its caller got no answer).
        registry.switch(&web(), second).unwrap();
        fake.0
            .lock()
            .unwrap()
            .active
            .insert((1, Protocol::Tcp), cookie(&one));
        let (adopted, notes) = Registry::adopt(Box::new(fake.clone()), netns()).unwrap();
        assert_eq!(active(&fake), Some(cookie(&one)));
        let generations = &adopted.status().services[0].generations;
        assert!(generations.iter().any(|g| g.id == 1 && g.active));
        assert!(!generations.iter().any(|g| g.id == second && g.active));
        assert!(
            notes
                .iter()
                .any(|n| n.contains("the kernel steers tcp to generation 1, its record said 2")),
            "{notes:?}"
        );
        assert_eq!(
            fake.0.lock().unwrap().services[&1].active_tcp,
            1,
            "the record was rewritten"
        );
        // Where the kernel steers nothing, the record's intent is carried out.
        drop(adopted);
        fake.0.lock().unwrap().active.clear();
        let (adopted, _) = Registry::adopt(Box::new(fake.clone()), netns()).unwrap();
        assert_eq!(active(&fake), Some(cookie(&one)));
        assert!(adopted.status().services[0].generations[0].active);
    }

    #[test]
    fn sockets_of_the_wrong_family_and_empty_labels() {
        let (mut registry, _) = registry();
        let six = Binding {
            protocol: Protocol::Tcp,
            prefix: parse_prefix("::1/128").unwrap(),
            port: 80,
        };
        registry.bind(&web(), six, None).unwrap();
        let me = std::process::id();
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let err = registry
            .register(&web(), me, &[v4.as_raw_fd()], None, false)
            .unwrap_err();
        assert!(matches!(err, RegistryError::WrongFamily { .. }), "{err}");
        let v6 = TcpListener::bind("[::1]:0").unwrap();
        registry
            .register(&web(), me, &[v6.as_raw_fd()], Some(String::new()), false)
            .unwrap();
        assert_eq!(registry.status().services[0].generations[0].label, None);
    }

    #[test]
    fn one_generation_one_socket_per_protocol() {
        let (mut registry, fake) = registry();
        registry.bind(&web(), tcp_binding(80), None).unwrap();
        let udp_binding = Binding {
            protocol: Protocol::Udp,
            ..tcp_binding(80)
        };
        registry.bind(&web(), udp_binding, None).unwrap();
        let me = std::process::id();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp2 = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = registry
            .register(
                &web(),
                me,
                &[tcp.as_raw_fd(), tcp2.as_raw_fd()],
                None,
                false,
            )
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::TwoSockets(Protocol::Tcp)),
            "{err}"
        );
        let id = registry
            .register(&web(), me, &[tcp.as_raw_fd(), udp.as_raw_fd()], None, true)
            .unwrap();
        let generation = &registry.status().services[0].generations[0];
        assert_eq!(generation.sockets.len(), 2);
        assert!(generation.active);
        let k = fake.0.lock().unwrap();
        assert_eq!(k.active.len(), 2);
        assert_eq!(k.services[&1].active_tcp, id);
        assert_eq!(k.services[&1].active_udp, id);
    }
}
