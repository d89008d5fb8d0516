//! The reuseport backend, for hosts where the sk_lookup program cannot be loaded (no
//! CAP_BPF/CAP_NET_ADMIN: an ordinary container) but the kernel takes a classic BPF program for
//! a `SO_REUSEPORT` group, which needs no capability at all.
//!
//! Every generation gets a socket of its own on the service's exact address, made by the
//! daemon (`Backend::listener`), and all of them are members of one `SO_REUSEPORT` group. A
//! classic BPF program attached to the group (`program`) returns the index of the member that
//! gets each new connection: the active generation's, or a probed generation's for a readiness
//! probe. A switch replaces the program, one `setsockopt`, atomic.
//!
//! **The member-index invariant.** The kernel keeps a group's members in an array in the
//! order they joined (a TCP socket joins at `listen()`, a UDP socket at `bind()`); when one
//! leaves (its last descriptor closes, or anyone calls `shutdown()` on a TCP listener), the last
//! member moves into its slot (`Vec::swap_remove`). The program's index must name the active
//! member at every instant, also between a member leaving and the daemon pointing the program
//! again. The backend keeps it so:
//!
//! 1. **The daemon owns membership.** It makes every member itself (joined while it holds the
//!    registry) and keeps a copy of each, so a process closing its descriptor never makes a
//!    member leave; a member leaves when the daemon lets go of it (TCP: `shutdown()`, which
//!    leaves at once whoever else holds it; UDP: the daemon's close, after the supervisor closed
//!    its copy), or when a process shuts a TCP listener down. The model (`Group::members`)
//!    applies the kernel's rule to each leave.
//! 2. **At most two members per group** ([`MAX_MEMBERS`]): the active generation and one
//!    other (starting or draining). With two members, whichever leaves, the program is right
//!    until the daemon points it again: if the other leaves, the active one's index is 0 or
//!    now past the end, and past the end the kernel's hash picks among the one member left —
//!    the active one. No third member can join before the daemon has pointed the program
//!    again, because only the daemon adds members. `hotswap run` never needs more: an upgrade
//!    ends with its old generation drained and gone.
//! 3. A foreign socket (`hotswap register` of a socket the daemon did not make) is taken only
//!    when its place in the group is certain: it is the group's only member.
//!
//! Like uds, the backend keeps services, bindings (with the members' cookies, in order) and
//! generations in a state file beside the control socket; a restarted daemon takes each member
//! back from a live generation that holds it. The program stays attached to the group while no
//! daemon runs, so steering goes on.

mod program;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use hotswap_common::{GenerationKey, GenerationRecord, OwnerRecord, ServiceMetrics, ServiceRecord};
// `assemble`, `attach` and `Choice` are public so that the bench can measure the kernel path and
// a program replacement without a daemon, on a group of its own. A service's group is the
// daemon's: it points the program itself, and one attached from outside would steer behind its
// back until the daemon points it again.
pub use program::{assemble, attach, probe_support, unsupported, Choice, MAX_PROBES};
use serde::{Deserialize, Serialize};

use super::{
    state_file::{self, FileBacked, Records, StateFileError},
    Backend, BackendError, BackendInfo, Capabilities, Lack, PersistedState, Repair, Repaired,
    SocketSource, Support,
};
use crate::{
    model::{Binding, Protocol},
    socket::{self, retake_socket, socket_cookie, Pidfd},
};

/// Members of one group at most: the active generation and one starting or draining (see the
/// module's invariant).
pub const MAX_MEMBERS: usize = 2;

/// How long a socket the daemon made for a generation may stay unregistered before the daemon
/// takes it out of the group again, when the daemon cannot tell whether the process that asked
/// for it is still there (one made before the daemon restarted). One whose requester is known
/// is taken out as soon as that process is gone (a supervisor that died between asking and
/// registering), however long that took; a time limit there refused upgrades on a loaded host,
/// where a supervisor's steps in between took over 30 s.
const UNCLAIMED_TIMEOUT: Duration = Duration::from_secs(30);

/// The limit for a socket whose requester still lives but has not registered it: a supervisor
/// that hangs must not hold a group's second slot for ever.
const UNCLAIMED_BY_LIVE_REQUESTER_TIMEOUT: Duration = Duration::from_secs(600);

/// The reuseport backend refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ReuseportError {
    /// A second binding of one protocol for a service.
    #[error("the reuseport backend gives a service one address per protocol, and {existing} is its {protocol} address already")]
    OneBindingPerProtocol {
        /// The protocol.
        protocol: Protocol,
        /// The binding it has.
        existing: Binding,
    },
    /// The address cannot be bound, or is held by a socket outside hotswap.
    #[error("binding {addr} failed")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Two generations listen already.
    #[error("service {binding} has {MAX_MEMBERS} generations listening already (the active one and one starting or draining); the reuseport backend takes a third only when one of them is gone — wait for the upgrade in flight to end")]
    GroupFull {
        /// The binding.
        binding: Binding,
    },
    /// The socket is not one the daemon made and cannot join safely.
    #[error("this socket cannot join the reuseport group of {binding}: {why}")]
    Foreign {
        /// The binding.
        binding: Binding,
        /// Why not.
        why: ForeignRefusal,
    },
    /// The generation's socket is no member any more.
    #[error("the socket is no longer a member of {binding}'s reuseport group (its process shut it down)")]
    NotMember {
        /// The binding.
        binding: Binding,
    },
    /// The socket is in none of the daemon's groups.
    #[error("the socket is a member of none of the daemon's reuseport groups")]
    UnknownSocket,
    /// Reading a socket's identity failed.
    #[error("reading the socket's cookie failed")]
    Cookie(#[source] std::io::Error),
    /// Too many probes at once.
    #[error("{binding} has {MAX_PROBES} readiness probes in flight already")]
    TooManyProbes {
        /// The binding.
        binding: Binding,
    },
    /// Attaching the program failed.
    #[error("attaching the reuseport program to {binding}'s group failed")]
    Attach {
        /// The binding.
        binding: Binding,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The operation needs a program with maps.
    #[error("{0}")]
    Unsupported(Lack),
    /// Reading or writing the state file failed.
    #[error(transparent)]
    State(#[from] StateFileError),
}

impl ReuseportError {
    /// The refusal's code on the wire (see [`crate::backend::uds::UdsError::code`]).
    pub fn code(&self) -> crate::protocol::ErrorCode {
        use crate::protocol::ErrorCode;
        match self {
            Self::OneBindingPerProtocol { .. }
            | Self::Foreign { .. }
            | Self::NotMember { .. }
            | Self::UnknownSocket => ErrorCode::InvalidRequest,
            Self::GroupFull { .. } | Self::TooManyProbes { .. } => ErrorCode::LimitReached,
            Self::Unsupported(_) => ErrorCode::Unsupported,
            Self::Bind { .. } | Self::Cookie(_) | Self::Attach { .. } | Self::State(_) => {
                ErrorCode::Failed
            }
        }
    }
}

/// Why a socket the daemon did not make cannot join a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ForeignRefusal {
    /// Bound elsewhere.
    #[error("it is bound to {0}, not the service's address")]
    OtherAddress(SocketAddr),
    /// `SO_REUSEPORT` is not set.
    #[error("SO_REUSEPORT is not set on it")]
    NoReusePort,
    /// Another uid: the kernel keeps groups per uid.
    #[error("uid {socket} made it and the group is uid {group}'s (the kernel groups sockets of one uid only)")]
    OtherOwner {
        /// The socket's owner.
        socket: u32,
        /// The group's.
        group: u32,
    },
    /// Another `IPV6_V6ONLY` setting or an interface binding puts it in a group of its own.
    #[error("its IPV6_V6ONLY setting or its interface binding (SO_BINDTODEVICE) differs from the daemon's sockets', which puts it in another group")]
    OtherGroup,
    /// Its index in the group cannot be known.
    #[error("the address has members already, so its place among them is not known (get sockets from the daemon instead: hotswap run and hotswap::activation::service_listener do)")]
    PlaceUnknown,
}

/// One member of a group.
struct Member {
    cookie: u64,
    /// The socket's inode: how a let-go member is found in the kernel's socket tables.
    inode: u64,
    /// The daemon's copy: what keeps the member in the group while processes come and go.
    /// `None` for a member the daemon let go of that may still be in the kernel's group (a UDP
    /// socket another process still holds, a foreign socket, one not retaken after a restart):
    /// it keeps its slot, and nothing is steered to it, until the kernel's tables no longer
    /// list it.
    socket: Option<OwnedFd>,
    /// Made by another process (`register` of a socket the daemon did not make): never shut
    /// down by the daemon.
    foreign: bool,
    /// When it joined, for taking an unregistered one out again.
    joined: Instant,
    /// The process that asked the daemon for it, while it is unregistered (see
    /// [`Member::abandoned`]).
    requester: Option<Pidfd>,
}

impl Member {
    /// Whether an unregistered member the daemon holds should be taken out of the group: its
    /// requester is gone, or it has waited too long.
    fn abandoned(&self) -> bool {
        if self.socket.is_none() {
            return false;
        }
        match &self.requester {
            Some(requester) => {
                requester.has_exited()
                    || self.joined.elapsed() >= UNCLAIMED_BY_LIVE_REQUESTER_TIMEOUT
            }
            None => self.joined.elapsed() >= UNCLAIMED_TIMEOUT,
        }
    }
}

/// A service's group for one protocol.
struct Group {
    binding: Binding,
    /// In the kernel's order: a member's index is its position.
    members: Vec<Member>,
    /// The active member's cookie.
    active: Option<u64>,
    /// Probe sources and the cookie of the member each reaches.
    probes: Vec<(SocketAddr, u64)>,
}

#[derive(Serialize, Deserialize)]
struct SavedGroup {
    service_id: u32,
    binding: Binding,
    /// Members in the group's order.
    members: Vec<SavedMember>,
}

#[derive(Serialize, Deserialize)]
struct SavedMember {
    cookie: u64,
    inode: u64,
    foreign: bool,
}

/// The daemon's reuseport groups, one per (service, protocol), and what it must remember.
pub struct ReuseportBackend {
    reason: String,
    state_path: PathBuf,
    records: Records,
    groups: BTreeMap<(u32, Protocol), Group>,
    /// What loading the state file had to change, for the daemon's log.
    notes: Vec<String>,
    /// Repairs done inside requests, for the next [`Backend::upkeep`] to report.
    repairs: Vec<Repaired>,
    /// When the kernel's socket tables were last read for members let go of.
    tables_read: Option<Instant>,
}

/// How often the kernel's socket tables are read while a member that was let go of may still
/// be in its group (reading them costs more than the checks of the daemon's own sockets).
const TABLES_INTERVAL: Duration = Duration::from_millis(100);

impl Group {
    fn index(&self, cookie: u64) -> Option<u32> {
        self.members
            .iter()
            .position(|m| m.cookie == cookie)
            .map(|i| i as u32)
    }

    /// The address a member is bound to.
    fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.binding.prefix.addr(), self.binding.port)
    }

    /// Points the program at the active member and the probed ones (through any member the
    /// daemon holds that still listens: the program is the group's).
    fn point(&self) -> Result<(), ReuseportError> {
        let Some(first) = self
            .members
            .iter()
            .filter_map(|m| m.socket.as_ref())
            .find(|s| {
                self.binding.protocol != Protocol::Tcp
                    || socket::is_listening(s.as_fd()).unwrap_or(false)
            })
        else {
            return Ok(());
        };
        let choice = program::Choice {
            active: self.active.and_then(|c| self.index(c)),
            probes: self
                .probes
                .iter()
                .filter_map(|&(source, cookie)| Some((source, self.index(cookie)?)))
                .collect(),
        };
        program::attach(first.as_fd(), &program::assemble(&choice)).map_err(|source| {
            ReuseportError::Attach {
                binding: self.binding,
                source,
            }
        })
    }

    /// Applies the kernel's rule for a member leaving: the last moves into its slot.
    fn left(&mut self, cookie: u64) -> Option<Member> {
        let at = self.members.iter().position(|m| m.cookie == cookie)?;
        let member = self.members.swap_remove(at);
        if self.active == Some(cookie) {
            self.active = None;
        }
        self.probes.retain(|&(_, c)| c != cookie);
        Some(member)
    }

    /// Lets go of a member. A TCP listener the daemon made is shut down: it leaves the group
    /// at once, however many processes hold it. Any other (UDP, which leaves only when its last
    /// descriptor closes; a foreign socket, which is not the daemon's to shut down) keeps its
    /// slot with nothing steered to it until the kernel's tables no longer list it
    /// ([`Group::drop_departed`]). The program is pointed again; until then it is right by the
    /// invariant.
    fn remove(&mut self, cookie: u64) -> Result<(), ReuseportError> {
        let Some(at) = self.members.iter().position(|m| m.cookie == cookie) else {
            return self.point();
        };
        if self.binding.protocol == Protocol::Tcp && !self.members[at].foreign {
            if let Some(socket) = &self.members[at].socket {
                let _ = nix::sys::socket::shutdown(
                    socket.as_raw_fd(),
                    nix::sys::socket::Shutdown::Both,
                );
            }
            self.left(cookie);
        } else {
            self.members[at].socket = None;
            if self.active == Some(cookie) {
                self.active = None;
            }
            self.probes.retain(|&(_, c)| c != cookie);
            // Usually the daemon's copy was the last one, and it has left already.
            if let Ok(listed) = socket::taking_connections(self.binding.protocol) {
                self.drop_departed(&listed);
            }
        }
        self.point()
    }

    /// Members let go of that the kernel's tables no longer list have left the group: the
    /// model follows (in table order, which with two members cannot matter). Returns whether
    /// any left.
    fn drop_departed(&mut self, listed: &BTreeMap<u64, SocketAddr>) -> bool {
        let departed: Vec<u64> = self
            .members
            .iter()
            .filter(|m| m.socket.is_none() && !listed.contains_key(&m.inode))
            .map(|m| m.cookie)
            .collect();
        for &cookie in &departed {
            self.left(cookie);
        }
        !departed.is_empty()
    }

    /// The TCP members the daemon holds that no longer listen (a process shut them down, so
    /// they have left the kernel's group); `unknown_is_shut` decides for a socket whose state
    /// cannot be read.
    fn shut_down(&self, unknown_is_shut: bool) -> Vec<u64> {
        if self.binding.protocol != Protocol::Tcp {
            return Vec::new();
        }
        self.members
            .iter()
            .filter(|m| {
                m.socket
                    .as_ref()
                    .is_some_and(|s| !socket::is_listening(s.as_fd()).unwrap_or(!unknown_is_shut))
            })
            .map(|m| m.cookie)
            .collect()
    }

    fn has_let_go(&self) -> bool {
        self.members.iter().any(|m| m.socket.is_none())
    }
}

impl ReuseportBackend {
    /// The backend as the state file at `state_path` left it (empty if there is none), each
    /// member taken back from a live generation that holds it; `reason` says why this backend
    /// was chosen.
    pub fn open(reason: String, state_path: &Path) -> Result<Self, ReuseportError> {
        let saved = state_file::load::<SavedGroup>(state_path)?;
        let (records, saved_groups) = Records::from_file(saved);
        let mut backend = Self {
            reason,
            state_path: state_path.to_owned(),
            records,
            groups: BTreeMap::new(),
            notes: Vec::new(),
            repairs: Vec::new(),
            tables_read: None,
        };
        for SavedGroup {
            service_id,
            binding,
            members,
        } in saved_groups
        {
            let protocol = binding.protocol;
            let mut group = Group {
                binding,
                members: Vec::new(),
                active: None,
                probes: Vec::new(),
            };
            for SavedMember {
                cookie,
                inode,
                foreign,
            } in members
            {
                let held = backend
                    .records
                    .generations_of(service_id)
                    .find_map(|record| retake(record, protocol, cookie));
                // One no live generation holds may still be in the group (a socket handed out
                // just before the daemon stopped): it keeps its slot until the kernel's tables
                // no longer list it.
                group.members.push(Member {
                    cookie,
                    inode,
                    socket: held,
                    foreign,
                    joined: Instant::now(),
                    requester: None,
                });
            }
            if let Ok(listed) = socket::taking_connections(protocol) {
                if group.drop_departed(&listed) {
                    backend.notes.push(format!(
                        "{binding}: a member of its group is gone (no live generation held it)"
                    ));
                }
            }
            // Members shut down while no daemon ran have left the group already; with at most
            // two members, the order of those left is the order kept.
            for cookie in group.shut_down(true) {
                group.left(cookie);
                backend.notes.push(format!(
                    "{binding}: a member had been shut down and left the group"
                ));
            }
            let active_generation = backend
                .records
                .services
                .get(&service_id)
                .map(|s| match protocol {
                    Protocol::Tcp => s.active_tcp,
                    Protocol::Udp => s.active_udp,
                })
                .unwrap_or(0);
            group.active = backend
                .records
                .generations
                .get(&GenerationKey {
                    service_id,
                    generation: active_generation,
                })
                .map(|r| r.cookies[protocol.slot()])
                .filter(|&c| group.index(c).is_some());
            group.point()?;
            backend.groups.insert((service_id, protocol), group);
        }
        backend.save()?;
        Ok(backend)
    }

    fn group(&mut self, service_id: u32, protocol: Protocol) -> Option<&mut Group> {
        self.groups.get_mut(&(service_id, protocol))
    }

    /// Records a socket that has just joined the group (at its end), points the program and
    /// saves; when either fails the socket is taken out of the group again, so the model never
    /// differs from the kernel's group.
    fn joined(
        &mut self,
        service_id: u32,
        protocol: Protocol,
        cookie: u64,
        socket: OwnedFd,
        foreign: bool,
        requester: Option<Pidfd>,
    ) -> Result<(), ReuseportError> {
        let inode = socket::inode(socket.as_fd()).map_err(ReuseportError::Cookie)?;
        let Some(group) = self.group(service_id, protocol) else {
            return Ok(());
        };
        group.members.push(Member {
            cookie,
            inode,
            socket: Some(socket),
            foreign,
            joined: Instant::now(),
            requester,
        });
        // A new group has no program yet; an existing one keeps its own, whose indexes the new
        // member (at the end) does not move.
        let result = group
            .point()
            .and_then(|()| self.save().map_err(ReuseportError::from));
        if let Err(err) = result {
            if let Some(group) = self.group(service_id, protocol) {
                let _ = group.remove(cookie);
            }
            return Err(err);
        }
        Ok(())
    }

    /// Whether some generation's record names `cookie`.
    fn claimed(&self, service_id: u32, protocol: Protocol, cookie: u64) -> bool {
        self.records
            .generations_of(service_id)
            .any(|r| r.cookies[protocol.slot()] == cookie)
    }
}

impl FileBacked for ReuseportBackend {
    fn save(&self) -> Result<(), StateFileError> {
        let groups = self
            .groups
            .iter()
            .map(|(&(service_id, _), group)| SavedGroup {
                service_id,
                binding: group.binding,
                members: group
                    .members
                    .iter()
                    .map(|m| SavedMember {
                        cookie: m.cookie,
                        inode: m.inode,
                        foreign: m.foreign,
                    })
                    .collect(),
            })
            .collect();
        state_file::store(&self.state_path, &self.records.to_file(groups))
    }

    fn records(&mut self) -> &mut Records {
        &mut self.records
    }
}

/// The member with `cookie`, taken back from the process of a generation that still holds it.
fn retake(record: &GenerationRecord, protocol: Protocol, cookie: u64) -> Option<OwnedFd> {
    let slot = protocol.slot();
    if record.cookies[slot] != cookie || record.fds[slot] < 0 {
        return None;
    }
    let pidfd = Pidfd::open(record.pid).ok()?;
    retake_socket(&pidfd, record.pid, record.fds[slot], cookie)
}

fn bind_error(addr: SocketAddr) -> impl FnOnce(std::io::Error) -> ReuseportError {
    move |source| ReuseportError::Bind { addr, source }
}

impl Backend for ReuseportBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: "reuseport".to_owned(),
            reason: self.reason.clone(),
            state_dir: self.state_path.display().to_string(),
            program_id: None,
            verified_instructions: None,
            adopted: false,
            capabilities: self.capabilities(),
            unserved: Vec::new(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            sockets: SocketSource::Backend,
            socket_per_generation: true,
            switch: Support::Yes,
            probe: Support::Yes,
            metrics: Support::No(Lack::ClassicProgram),
            prefixes: Support::No(Lack::OneAddressPerSocket),
            debug_log: Support::No(Lack::ClassicProgram),
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
                .groups
                .iter()
                .map(|(&(service_id, _), group)| (group.binding, service_id))
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
        if let Some(existing) = self.groups.get(&(service_id, binding.protocol)) {
            return Err(ReuseportError::OneBindingPerProtocol {
                protocol: binding.protocol,
                existing: existing.binding,
            }
            .into());
        }
        // Bindable, and held by no socket outside hotswap (whose group the members would join):
        // a plain bind, never listening, never joining a group.
        let addr = SocketAddr::new(binding.prefix.addr(), binding.port);
        {
            use socket2::{Domain, Socket, Type};
            let ty = match binding.protocol {
                Protocol::Tcp => Type::STREAM,
                Protocol::Udp => Type::DGRAM,
            };
            let probe =
                Socket::new(Domain::for_address(addr), ty, None).map_err(bind_error(addr))?;
            if addr.is_ipv6() {
                probe.set_only_v6(true).map_err(bind_error(addr))?;
            }
            if binding.protocol == Protocol::Tcp {
                // Connections of an earlier server in TIME_WAIT do not hold the address.
                probe.set_reuse_address(true).map_err(bind_error(addr))?;
            }
            probe.bind(&addr.into()).map_err(bind_error(addr))?;
        }
        let key = (service_id, binding.protocol);
        let group = Group {
            binding: *binding,
            members: Vec::new(),
            active: None,
            probes: Vec::new(),
        };
        Ok(self
            .saved(
                |backend| backend.groups.insert(key, group),
                |backend, _| {
                    backend.groups.remove(&key);
                },
            )
            .map_err(ReuseportError::from)?)
    }

    fn remove_binding(&mut self, binding: &Binding) -> Result<(), BackendError> {
        // The daemon lets go of its copies; generations keep theirs until they exit.
        Ok(self
            .saved(
                |backend| {
                    let keys: Vec<_> = backend
                        .groups
                        .iter()
                        .filter(|(_, group)| group.binding == *binding)
                        .map(|(key, _)| *key)
                        .collect();
                    keys.iter()
                        .filter_map(|key| backend.groups.remove_entry(key))
                        .collect::<Vec<_>>()
                },
                |backend, removed| backend.groups.extend(removed),
            )
            .map_err(ReuseportError::from)?)
    }

    fn activate(
        &mut self,
        service_id: u32,
        protocol: Protocol,
        socket: BorrowedFd<'_>,
    ) -> Result<(), BackendError> {
        let cookie = socket_cookie(socket).map_err(ReuseportError::Cookie)?;
        let Some(group) = self.group(service_id, protocol) else {
            return Ok(());
        };
        if group.index(cookie).is_none() {
            return Err(ReuseportError::NotMember {
                binding: group.binding,
            }
            .into());
        }
        let before = group.active.replace(cookie);
        if let Err(err) = group.point() {
            group.active = before;
            return Err(err.into());
        }
        Ok(())
    }

    fn deactivate(&mut self, service_id: u32, protocol: Protocol) -> Result<(), BackendError> {
        if let Some(group) = self.group(service_id, protocol) {
            group.active = None;
            group.point()?;
        }
        Ok(())
    }

    fn metrics(&self, _: u32) -> Result<ServiceMetrics, BackendError> {
        Err(ReuseportError::Unsupported(Lack::ClassicProgram).into())
    }

    fn save_service(
        &mut self,
        service_id: u32,
        record: &ServiceRecord,
        _: bool,
    ) -> Result<(), BackendError> {
        Ok(self
            .save_service_record(service_id, record)
            .map_err(ReuseportError::from)?)
    }

    fn forget_service(&mut self, service_id: u32) -> Result<(), BackendError> {
        Ok(self
            .forget_service_record(service_id)
            .map_err(ReuseportError::from)?)
    }

    fn save_owner(&mut self, service_id: u32, owner: &OwnerRecord) -> Result<(), BackendError> {
        Ok(self
            .save_owner_record(service_id, owner)
            .map_err(ReuseportError::from)?)
    }

    fn save_generation(
        &mut self,
        key: &GenerationKey,
        record: &GenerationRecord,
    ) -> Result<(), BackendError> {
        Ok(self
            .save_generation_record(key, record)
            .map_err(ReuseportError::from)?)
    }

    fn forget_generation(&mut self, key: &GenerationKey) -> Result<(), BackendError> {
        let record = self.records.generations.get(key).copied();
        self.forget_generation_record(key)
            .map_err(ReuseportError::from)?;
        let Some(record) = record else {
            return Ok(());
        };
        // Its members leave the group unless another generation still names them.
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let cookie = record.cookies[protocol.slot()];
            if cookie == 0 || self.claimed(key.service_id, protocol, cookie) {
                continue;
            }
            if let Some(group) = self.group(key.service_id, protocol) {
                group.remove(cookie)?;
            }
        }
        Ok(self.save().map_err(ReuseportError::from)?)
    }

    fn set_debug_log(&mut self, on: bool) -> Result<(), BackendError> {
        if on {
            return Err(ReuseportError::Unsupported(Lack::ClassicProgram).into());
        }
        Ok(())
    }

    fn listener(
        &mut self,
        service_id: u32,
        protocol: Protocol,
        requester: Option<Pidfd>,
    ) -> Result<Option<OwnedFd>, BackendError> {
        self.tidy();
        let Some(group) = self.group(service_id, protocol) else {
            return Ok(None);
        };
        if group.members.len() >= MAX_MEMBERS {
            return Err(ReuseportError::GroupFull {
                binding: group.binding,
            }
            .into());
        }
        let addr = group.addr();
        let socket = socket::bound_socket(addr, protocol, true, false).map_err(bind_error(addr))?;
        let cookie = socket_cookie(socket.as_fd()).map_err(bind_error(addr))?;
        let copy = socket.try_clone().map_err(bind_error(addr))?;
        self.joined(service_id, protocol, cookie, socket, false, requester)?;
        Ok(Some(copy))
    }

    fn add_probe(
        &mut self,
        source: SocketAddr,
        protocol: Protocol,
        socket: BorrowedFd<'_>,
    ) -> Result<(), BackendError> {
        let cookie = socket_cookie(socket).map_err(ReuseportError::Cookie)?;
        let source = crate::model::canonical(source);
        let group = self
            .groups
            .values_mut()
            .find(|g| g.binding.protocol == protocol && g.index(cookie).is_some())
            .ok_or(ReuseportError::UnknownSocket)?;
        if group.probes.len() >= MAX_PROBES {
            return Err(ReuseportError::TooManyProbes {
                binding: group.binding,
            }
            .into());
        }
        group.probes.retain(|&(s, _)| s != source);
        group.probes.push((source, cookie));
        group.point()?;
        Ok(())
    }

    fn remove_probe(
        &mut self,
        source: SocketAddr,
        _protocol: Protocol,
    ) -> Result<(), BackendError> {
        let source = crate::model::canonical(source);
        for group in self.groups.values_mut() {
            let before = group.probes.len();
            group.probes.retain(|&(s, _)| s != source);
            if group.probes.len() != before {
                group.point()?;
            }
        }
        Ok(())
    }

    fn admit(
        &mut self,
        service_id: u32,
        protocol: Protocol,
        socket: BorrowedFd<'_>,
        cookie: u64,
    ) -> Result<(), BackendError> {
        self.tidy();
        let Some(group) = self.group(service_id, protocol) else {
            return Ok(());
        };
        if group.index(cookie).is_some() {
            return Ok(());
        }
        let binding = group.binding;
        let refuse = |why| ReuseportError::Foreign { binding, why };
        let bound = socket::local_addr(socket);
        if bound != Some(group.addr()) {
            let addr = bound.unwrap_or(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0));
            return Err(refuse(ForeignRefusal::OtherAddress(addr)).into());
        }
        if !socket::reuses_port(socket).unwrap_or(false) {
            return Err(refuse(ForeignRefusal::NoReusePort).into());
        }
        let owner = socket::owner_uid(socket).map_err(bind_error(group.addr()))?;
        let ours = nix::unistd::geteuid().as_raw();
        if owner != ours {
            return Err(refuse(ForeignRefusal::OtherOwner {
                socket: owner,
                group: ours,
            })
            .into());
        }
        // Sockets of another IPV6_V6ONLY setting or bound to an interface form groups of their
        // own; the daemon's members are neither.
        let v6only = group.addr().is_ipv6() && socket::v6_only(socket).unwrap_or(false);
        if group.addr().is_ipv6() != v6only || socket::bound_interface(socket).unwrap_or(0) != 0 {
            return Err(refuse(ForeignRefusal::OtherGroup).into());
        }
        // Its place is certain only as the group's one member: nothing the daemon holds, and
        // nothing else in the kernel's tables on the address.
        let inode = socket::inode(socket).map_err(ReuseportError::Cookie)?;
        let others = socket::taking_connections(protocol)
            .map_err(ReuseportError::Cookie)?
            .into_iter()
            .any(|(other, addr)| other != inode && addr == group.addr());
        if !group.members.is_empty() || others {
            return Err(refuse(ForeignRefusal::PlaceUnknown).into());
        }
        let copy = socket
            .try_clone_to_owned()
            .map_err(bind_error(group.addr()))?;
        Ok(self.joined(service_id, protocol, cookie, copy, true, None)?)
    }

    fn relisten(
        &mut self,
        service_id: u32,
        protocol: Protocol,
        socket: BorrowedFd<'_>,
    ) -> Result<(), BackendError> {
        let cookie = socket_cookie(socket).map_err(ReuseportError::Cookie)?;
        // The shut-down member has left the group: the model follows (and upkeep makes an
        // active member listen again itself); then it joins again at the end.
        self.tidy();
        let Some(group) = self.group(service_id, protocol) else {
            return Ok(());
        };
        if group.index(cookie).is_some() {
            return Ok(());
        }
        if group.members.len() >= MAX_MEMBERS {
            return Err(ReuseportError::GroupFull {
                binding: group.binding,
            }
            .into());
        }
        socket::listen_again(socket).map_err(BackendError::Relisten)?;
        let copy = socket
            .try_clone_to_owned()
            .map_err(BackendError::Relisten)?;
        // Who made it is no longer known once it left the model: treated as foreign, the
        // daemon never shuts it down (when let go it waits for the kernel's tables instead).
        Ok(self.joined(service_id, protocol, cookie, copy, true, None)?)
    }

    fn upkeep(&mut self) -> Vec<Repaired> {
        self.tidy();
        std::mem::take(&mut self.repairs)
    }
}

impl ReuseportBackend {
    /// Brings the model up to the kernel's group (members shut down by a process, members let
    /// go of that have left, sockets made and never registered) and keeps what it repaired for
    /// [`Backend::upkeep`].
    fn tidy(&mut self) {
        let read_tables = self.groups.values().any(Group::has_let_go)
            && self
                .tables_read
                .is_none_or(|at| at.elapsed() >= TABLES_INTERVAL);
        if read_tables {
            self.tables_read = Some(Instant::now());
        }
        let mut repaired = Vec::new();
        let keys: Vec<(u32, Protocol)> = self.groups.keys().copied().collect();
        for (service_id, protocol) in keys {
            let unclaimed: Vec<u64> = self.groups[&(service_id, protocol)]
                .members
                .iter()
                .filter(|m| m.abandoned() && !self.claimed(service_id, protocol, m.cookie))
                .map(|m| m.cookie)
                .collect();
            let listed = if read_tables && self.groups[&(service_id, protocol)].has_let_go() {
                socket::taking_connections(protocol).ok()
            } else {
                None
            };
            let group = self
                .groups
                .get_mut(&(service_id, protocol))
                .expect("listed");
            let binding = group.binding;
            let mut changed = false;
            for cookie in unclaimed {
                let _ = group.remove(cookie);
                repaired.push(Repaired {
                    service_id,
                    binding,
                    what: Repair::Unclaimed,
                });
            }
            if let Some(listed) = listed {
                changed |= group.drop_departed(&listed);
            }
            // Members a process shut down have left the group; the active one listens again
            // (it joins at the end) so the service goes on.
            for cookie in group.shut_down(false) {
                let was_active = group.active == Some(cookie);
                let Some(member) = group.left(cookie) else {
                    continue;
                };
                changed = true;
                let relistened = was_active
                    && member
                        .socket
                        .as_ref()
                        .is_some_and(|s| socket::listen_again(s.as_fd()).is_ok());
                if relistened {
                    group.members.push(member);
                    group.active = Some(cookie);
                    repaired.push(Repaired {
                        service_id,
                        binding,
                        what: Repair::Relistened,
                    });
                } else {
                    repaired.push(Repaired {
                        service_id,
                        binding,
                        what: Repair::LeftGroup,
                    });
                }
            }
            if changed {
                if let Err(err) = group.point() {
                    tracing::warn!("{binding}: {}", crate::error_chain(&err));
                }
            }
        }
        if !repaired.is_empty() {
            if let Err(err) = self.save() {
                tracing::warn!("saving the reuseport state: {}", crate::error_chain(&err));
            }
        }
        self.repairs.extend(repaired);
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::*;

    fn group(members: &[u64]) -> Group {
        Group {
            binding: Binding {
                protocol: Protocol::Udp,
                prefix: crate::model::parse_prefix("127.0.0.1/32").unwrap(),
                port: 53,
            },
            members: members
                .iter()
                .map(|&cookie| Member {
                    cookie,
                    inode: cookie,
                    socket: Some(UdpSocket::bind("127.0.0.1:0").unwrap().into()),
                    foreign: false,
                    joined: Instant::now(),
                    requester: None,
                })
                .collect(),
            active: None,
            probes: Vec::new(),
        }
    }

    /// What the kernel does with an index: past the end, its hash picks among all members.
    fn picks(group: &Group, index: Option<u32>) -> Vec<u64> {
        match index.map(|i| i as usize) {
            Some(i) if i < group.members.len() => vec![group.members[i].cookie],
            _ => group.members.iter().map(|m| m.cookie).collect(),
        }
    }

    #[test]
    fn with_two_members_any_leave_keeps_the_stale_index_right() {
        // The program still says what it said before the leave, until it is pointed again.
        for active in [1, 2] {
            for leaving in [1, 2] {
                let mut g = group(&[1, 2]);
                g.active = Some(active);
                let stale = g.index(active);
                g.left(leaving);
                let reached = picks(&g, stale);
                if leaving == active {
                    // The active one is gone; the other takes what comes until it is repaired.
                    assert_eq!(g.active, None);
                } else {
                    assert_eq!(reached, vec![active], "active {active} leaving {leaving}");
                    assert_eq!(g.index(active), Some(0));
                }
            }
        }
    }

    #[test]
    fn a_member_leaving_drops_its_probes_and_the_last_takes_its_slot() {
        let mut g = group(&[7, 8]);
        g.probes.push(("127.0.0.1:40000".parse().unwrap(), 7));
        g.probes.push(("127.0.0.1:40001".parse().unwrap(), 8));
        g.active = Some(8);
        assert_eq!(g.index(8), Some(1));
        g.left(7);
        assert_eq!(g.index(8), Some(0));
        assert_eq!(g.probes, vec![("127.0.0.1:40001".parse().unwrap(), 8)]);
        assert_eq!(g.active, Some(8));
    }

    #[test]
    fn an_unregistered_member_is_abandoned_when_its_requester_is_gone_not_before() {
        let mut asker = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let mut g = group(&[1]);
        g.members[0].requester = Some(Pidfd::open(asker.id()).unwrap());
        // Long past the limit for a member nobody is known to have asked for.
        g.members[0].joined = Instant::now() - UNCLAIMED_TIMEOUT * 2;
        assert!(!g.members[0].abandoned(), "its requester still lives");
        asker.kill().unwrap();
        asker.wait().unwrap();
        assert!(g.members[0].abandoned(), "its requester is gone");

        let mut g = group(&[2]);
        assert!(!g.members[0].abandoned(), "just made");
        g.members[0].joined = Instant::now() - UNCLAIMED_TIMEOUT;
        assert!(
            g.members[0].abandoned(),
            "nobody known asked, and the time is up"
        );
        g.members[0].socket = None;
        assert!(
            !g.members[0].abandoned(),
            "let go: the kernel's tables decide"
        );
    }
}
