//! Who may do what to a service: the peer of a control connection (as the kernel names it),
//! a service's owner, and the rule between them.
//!
//! Root may do everything. A service may have an owner — a uid, a gid or both — set by root;
//! a peer whose uid is the owner's, or who is a member of the owner's group (primary or
//! supplementary, from `SO_PEERGROUPS`), may change and see that service and nothing else.
//! Whatever an owner does stays within what a process of theirs could do without hotswap:
//! only their own processes' sockets become generations, and a binding steers one port at or
//! above the namespace's `ip_unprivileged_port_start` that no other user's socket takes.
//! Creating services, giving them owners and steering every port stay root's.

use std::{fmt, io, os::fd::AsFd};

use serde::{Deserialize, Serialize};

use crate::model::{Binding, Protocol, ServiceName};

/// The peer of a control connection, from the kernel (`SO_PEERCRED`, `SO_PEERGROUPS`) at
/// connect time: what it says cannot be forged by what the peer sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
    /// Its supplementary groups.
    pub groups: Vec<u32>,
    /// Its pid, where the kernel knows it.
    pub pid: Option<i32>,
}

impl Peer {
    /// The peer of `stream`.
    pub fn of(stream: &tokio::net::UnixStream) -> io::Result<Self> {
        let cred = stream.peer_cred()?;
        Ok(Self {
            uid: cred.uid(),
            gid: cred.gid(),
            groups: crate::socket::peer_groups(stream.as_fd())?,
            pid: cred.pid(),
        })
    }

    /// Root: may do everything.
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether the peer is a member of group `gid`.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

#[cfg(test)]
impl Peer {
    /// A peer the unit tests make up, with no pid.
    pub(crate) fn made_up(uid: u32, gid: u32, groups: &[u32]) -> Self {
        Self {
            uid,
            gid,
            groups: groups.to_vec(),
            pid: None,
        }
    }
}

/// Who owns a service besides root: a user, a group, or both. Set by root (`hotswap bind
/// --owner-user/--owner-group`, `hotswap chown`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The owning uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The owning gid: its members own the service too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// A user or group named in a config file or on the command line that this host lacks.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// No such user.
    #[error("no user {0:?} on this host (give a uid)")]
    NoSuchUser(String),
    /// No such group.
    #[error("no group {0:?} on this host (give a gid)")]
    NoSuchGroup(String),
    /// The user or group database could not be read.
    #[error("looking up {0:?} failed")]
    Database(String, #[source] nix::Error),
}

/// A user's uid: a number is one; a name is looked up.
pub fn user_id(user: &str) -> Result<u32, LookupError> {
    if let Ok(uid) = user.parse() {
        return Ok(uid);
    }
    nix::unistd::User::from_name(user)
        .map_err(|e| LookupError::Database(user.to_owned(), e))?
        .map(|user| user.uid.as_raw())
        .ok_or_else(|| LookupError::NoSuchUser(user.to_owned()))
}

/// A group's gid: a number is one; a name is looked up.
pub fn group_id(group: &str) -> Result<u32, LookupError> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    nix::unistd::Group::from_name(group)
        .map_err(|e| LookupError::Database(group.to_owned(), e))?
        .map(|group| group.gid.as_raw())
        .ok_or_else(|| LookupError::NoSuchGroup(group.to_owned()))
}

impl Owner {
    /// No owner but root.
    pub fn is_none(&self) -> bool {
        self.uid.is_none() && self.gid.is_none()
    }

    /// Whether `peer` owns the service (root always does).
    pub fn admits(&self, peer: &Peer) -> bool {
        peer.is_root()
            || self.uid == Some(peer.uid)
            || self.gid.is_some_and(|gid| peer.in_group(gid))
    }

    /// Who may change the service, for a refusal: "root and members of group web (gid 1001)".
    pub fn who_may(&self) -> String {
        let mut who = vec!["root".to_owned()];
        who.extend(self.uid.map(|uid| format!("user {}", user_name(uid))));
        who.extend(
            self.gid
                .map(|gid| format!("members of group {}", group_name(gid))),
        );
        if self.is_none() {
            return "root (the service has no owner)".to_owned();
        }
        who.join(" and ")
    }
}

impl From<Owner> for hotswap_common::OwnerRecord {
    fn from(owner: Owner) -> Self {
        use hotswap_common::{OWNER_HAS_GID, OWNER_HAS_UID};
        Self {
            uid: owner.uid.unwrap_or(0),
            gid: owner.gid.unwrap_or(0),
            has: owner.uid.map_or(0, |_| OWNER_HAS_UID) | owner.gid.map_or(0, |_| OWNER_HAS_GID),
        }
    }
}

impl From<hotswap_common::OwnerRecord> for Owner {
    fn from(record: hotswap_common::OwnerRecord) -> Self {
        use hotswap_common::{OWNER_HAS_GID, OWNER_HAS_UID};
        Self {
            uid: (record.has & OWNER_HAS_UID != 0).then_some(record.uid),
            gid: (record.has & OWNER_HAS_GID != 0).then_some(record.gid),
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.uid, self.gid) {
            (None, None) => f.write_str("root"),
            (Some(uid), None) => write!(f, "user {}", user_name(uid)),
            (None, Some(gid)) => write!(f, "group {}", group_name(gid)),
            (Some(uid), Some(gid)) => {
                write!(f, "user {} and group {}", user_name(uid), group_name(gid))
            }
        }
    }
}

/// `alice (uid 1000)`, or `uid 1000` where the user has no name here.
pub fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("{} (uid {uid})", crate::model::printable(&user.name)),
        _ => format!("uid {uid}"),
    }
}

/// `web (gid 1001)`, or `gid 1001` where the group has no name here.
pub fn group_name(gid: u32) -> String {
    match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
        Ok(Some(group)) => format!("{} (gid {gid})", crate::model::printable(&group.name)),
        _ => format!("gid {gid}"),
    }
}

/// What a request does to a service, as far as who may do it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action<'a> {
    /// Create a service (its first binding): root's.
    Create,
    /// Give a service an owner: root's.
    SetOwner,
    /// Steer a binding to a service it owns.
    Bind(&'a Binding),
    /// Anything else that changes the service or reads its sockets: unbind, register,
    /// switch, forget, probe, take a listener.
    Change,
}

/// Why a peer may not do what it asked.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The peer does not own the service.
    #[error("permission denied: {} may not change service {service}: only {} may", user_name(*uid), owner.who_may())]
    NotOwner {
        /// The peer's uid.
        uid: u32,
        /// The service.
        service: ServiceName,
        /// Its owner.
        owner: Owner,
    },
    /// Only root may do this.
    #[error("permission denied: {} may not {what}: only root may", user_name(*uid))]
    RootOnly {
        /// The peer's uid.
        uid: u32,
        /// What was asked.
        what: &'static str,
    },
    /// The binding is on every port, or a port below `ip_unprivileged_port_start`.
    #[error("permission denied: {binding} is on {}: only root may steer it (an owner steers one port from {start} up, as an unprivileged process may bind)", if binding.port == 0 { "every port".to_owned() } else { format!("port {}", binding.port) })]
    PrivilegedPort {
        /// The binding.
        binding: Binding,
        /// `net.ipv4.ip_unprivileged_port_start`.
        start: u16,
    },
    /// Another user's socket takes connections on the binding's port: steering it would take
    /// them away.
    #[error("permission denied: a socket of {} takes {protocol} connections on {addr}: only root may steer its port elsewhere", user_name(*holder))]
    ForeignSocket {
        /// The protocol.
        protocol: Protocol,
        /// The socket's local address.
        addr: std::net::SocketAddr,
        /// The socket's owner.
        holder: u32,
    },
    /// The process whose sockets would become a generation is another user's.
    #[error("permission denied: process {pid} runs as {}, not as {}: an owner registers only their own processes' sockets", user_name(*runs_as), user_name(*uid))]
    ForeignProcess {
        /// The process.
        pid: u32,
        /// Its uid (the first of real, effective, saved and file-system uid that differs).
        runs_as: u32,
        /// The peer's uid.
        uid: u32,
    },
    /// Another service's binding overlaps the one asked for: it would take some of that
    /// service's connections.
    #[error("permission denied: {binding} overlaps {other} of service {service}: only root may steer connections another service takes")]
    Overlaps {
        /// The binding asked for.
        binding: Binding,
        /// The other service's binding.
        other: Binding,
        /// The other service.
        service: ServiceName,
    },
    /// A connection of someone who is not root holds a probe route already.
    #[error("permission denied: {} holds a probe route on this connection already: an owner routes one probe per control connection", user_name(*uid))]
    OneProbePerConnection {
        /// The peer's uid.
        uid: u32,
    },
    /// A probe route asked for by someone who is not root, from a source not proven theirs.
    #[error("permission denied: {} may not route probes from {from}: an owner probes only from a loopback address, through a TCP socket of their own bound there and not yet connected, without SO_REUSEADDR or SO_REUSEPORT, passed with the request ({why})", user_name(*uid))]
    ForeignProbeSource {
        /// The peer's uid.
        uid: u32,
        /// The source asked for.
        from: std::net::SocketAddr,
        /// Which condition failed.
        why: &'static str,
    },
    /// What the check needs to read could not be read.
    #[error("checking who may do this failed: reading {what}")]
    Unreadable {
        /// What.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// May `peer` do `action` to a service owned by `owner` (`None`: the service does not exist
/// yet)? `service` names it in a refusal.
pub fn authorise(
    peer: &Peer,
    service: &ServiceName,
    owner: Option<Owner>,
    action: Action<'_>,
) -> Result<(), AccessError> {
    if peer.is_root() {
        return Ok(());
    }
    let owner = match (action, owner) {
        (Action::SetOwner, _) => {
            return Err(AccessError::RootOnly {
                uid: peer.uid,
                what: "give services owners",
            })
        }
        (Action::Create, _) | (Action::Bind(_), None) => {
            return Err(AccessError::RootOnly {
                uid: peer.uid,
                what: "create services",
            })
        }
        // No such service: the registry says so.
        (Action::Change, None) => return Ok(()),
        (_, Some(owner)) => owner,
    };
    if !owner.admits(peer) {
        return Err(AccessError::NotOwner {
            uid: peer.uid,
            service: service.clone(),
            owner,
        });
    }
    if let Action::Bind(binding) = action {
        check_owner_binding(peer, binding)?;
    }
    Ok(())
}

/// A binding an owner may make: one port an unprivileged process could bind, and not one
/// another user's socket takes connections on (steering happens before the kernel's own
/// socket lookup, so the binding would take them away).
fn check_owner_binding(peer: &Peer, binding: &Binding) -> Result<(), AccessError> {
    let start = unprivileged_port_start()?;
    if binding.port == 0 || binding.port < start {
        return Err(AccessError::PrivilegedPort {
            binding: *binding,
            start,
        });
    }
    let takers = crate::socket::taking_connections_with_owner(binding.protocol).map_err(|e| {
        AccessError::Unreadable {
            what: format!("the {} socket tables", binding.protocol),
            source: e,
        }
    })?;
    let foreign = takers.into_iter().find(|(addr, holder)| {
        addr.port() == binding.port
            && *holder != peer.uid
            && (addr.ip().is_unspecified() || binding.prefix.contains(&addr.ip()))
    });
    match foreign {
        Some((addr, holder)) => Err(AccessError::ForeignSocket {
            protocol: binding.protocol,
            addr,
            holder,
        }),
        None => Ok(()),
    }
}

/// `net.ipv4.ip_unprivileged_port_start` of this network namespace (it covers IPv6 too).
fn unprivileged_port_start() -> Result<u16, AccessError> {
    let path = "/proc/sys/net/ipv4/ip_unprivileged_port_start";
    let unreadable = |source: io::Error| AccessError::Unreadable {
        what: path.to_owned(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(unreadable)?;
    text.trim()
        .parse::<u32>()
        .map(|start| start.min(65535) as u16)
        .map_err(|e| unreadable(io::Error::new(io::ErrorKind::InvalidData, e)))
}

/// Checks that `peer`, who is not root, may route probe connections from `source`: the route
/// must only ever carry a connection of the peer's own. So `source` is a loopback address (no
/// packet from another host has one), and descriptor `socket` of the peer's process is a TCP
/// socket its uid created, bound to exactly `source`, not connected yet, and sharing its port
/// with no other socket (neither `SO_REUSEADDR` nor `SO_REUSEPORT`): while it is open no one else
/// can bind or connect from that address and port.
pub fn check_probe_source(
    peer: &Peer,
    source: std::net::SocketAddr,
    socket: Option<i32>,
) -> Result<(), AccessError> {
    let refuse = |why| AccessError::ForeignProbeSource {
        uid: peer.uid,
        from: source,
        why,
    };
    if !crate::model::canonical(source).ip().is_loopback() {
        return Err(refuse("not a loopback address"));
    }
    let (Some(fd), Some(pid)) = (socket, peer.pid.and_then(|p| u32::try_from(p).ok())) else {
        return Err(refuse("no socket was passed"));
    };
    let pidfd =
        crate::socket::Pidfd::open(pid).map_err(|_| refuse("the asking process is gone"))?;
    let sock = pidfd
        .get_fd(pid, fd)
        .map_err(|_| refuse("the asking process has no such descriptor"))?;
    let sock = sock.as_fd();
    let checked = (|| -> io::Result<Option<&'static str>> {
        Ok(
            if crate::socket::socket_protocol(sock)? != libc::IPPROTO_TCP {
                Some("not a TCP socket")
            } else if crate::socket::owner_uid(sock)? != peer.uid {
                Some("the socket is another user's")
            } else if crate::socket::local_addr(sock).map(crate::model::canonical)
                != Some(crate::model::canonical(source))
            {
                Some("the socket is not bound to that address and port")
            } else if crate::socket::peer_addr(sock).is_some() {
                Some("the socket is connected already")
            } else if crate::socket::reuses_addr(sock)? || crate::socket::reuses_port(sock)? {
                Some("the socket shares its port")
            } else {
                None
            },
        )
    })();
    match checked {
        Ok(None) => Ok(()),
        Ok(Some(why)) => Err(refuse(why)),
        Err(source) => Err(AccessError::Unreadable {
            what: format!("fd {fd} of process {pid}"),
            source,
        }),
    }
}

/// Checks that process `pid` runs as `uid` (every one of its real, effective, saved and
/// file-system uids), so that an owner turns only their own processes' sockets into
/// generations. `pidfd` pins the process: it is checked after `/proc` is read, so a pid reused
/// in between cannot pass for the process asked about.
pub fn check_process(uid: u32, pid: u32, pidfd: &crate::socket::Pidfd) -> Result<(), AccessError> {
    let path = format!("/proc/{pid}/status");
    let unreadable = |source: io::Error| AccessError::Unreadable {
        what: path.clone(),
        source,
    };
    let status = std::fs::read_to_string(&path).map_err(unreadable)?;
    let uids: Vec<u32> = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .map(|uids| {
            uids.split_whitespace()
                .filter_map(|u| u.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if pidfd.has_exited() || uids.len() != 4 {
        return Err(unreadable(io::Error::from_raw_os_error(libc::ESRCH)));
    }
    match uids.into_iter().find(|&other| other != uid) {
        Some(runs_as) => Err(AccessError::ForeignProcess { pid, runs_as, uid }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer::made_up(uid, gid, groups)
    }

    fn web() -> ServiceName {
        "web".parse().unwrap()
    }

    #[test]
    fn root_may_do_everything_and_others_only_what_they_own() {
        let root = peer(0, 0, &[]);
        let operator = peer(64100, 65534, &[64000]);
        let group = Owner {
            uid: None,
            gid: Some(64000),
        };
        let user = Owner {
            uid: Some(64100),
            gid: None,
        };
        for action in [Action::Create, Action::SetOwner, Action::Change] {
            authorise(&root, &web(), None, action).unwrap();
        }
        authorise(&operator, &web(), Some(group), Action::Change).unwrap();
        authorise(&operator, &web(), Some(user), Action::Change).unwrap();
        let stranger = peer(64200, 64200, &[]);
        let refusal = authorise(&stranger, &web(), Some(group), Action::Change).unwrap_err();
        assert!(matches!(refusal, AccessError::NotOwner { uid: 64200, .. }));
        assert!(
            refusal
                .to_string()
                .contains("only root and members of group gid 64000 may"),
            "{refusal}"
        );
        // An unowned service is root's alone.
        let refusal =
            authorise(&operator, &web(), Some(Owner::default()), Action::Change).unwrap_err();
        assert!(
            refusal
                .to_string()
                .contains("only root (the service has no owner) may"),
            "{refusal}"
        );
    }

    #[test]
    fn creating_services_and_giving_owners_stay_roots() {
        let operator = peer(64100, 64000, &[]);
        let binding = Binding {
            protocol: Protocol::Tcp,
            prefix: "127.0.0.1/32".parse().unwrap(),
            port: 8080,
        };
        let group = Owner {
            uid: None,
            gid: Some(64000),
        };
        for (owner, action, what) in [
            (None, Action::Bind(&binding), "create services"),
            (Some(group), Action::Create, "create services"),
            (Some(group), Action::SetOwner, "give services owners"),
        ] {
            let refusal = authorise(&operator, &web(), owner, action).unwrap_err();
            assert!(
                matches!(refusal, AccessError::RootOnly { uid: 64100, what: w } if w == what),
                "{refusal}"
            );
        }
    }

    #[test]
    fn an_owner_steers_only_unprivileged_single_ports() {
        let operator = peer(64100, 64000, &[]);
        let group = Some(Owner {
            uid: None,
            gid: Some(64000),
        });
        let start = unprivileged_port_start().unwrap();
        // (A namespace whose start is 0 lets every port be bound without privileges.)
        for port in [0, start.saturating_sub(1)]
            .into_iter()
            .filter(|&p| p == 0 || p < start)
        {
            let binding = Binding {
                protocol: Protocol::Tcp,
                prefix: "127.0.0.1/32".parse().unwrap(),
                port,
            };
            assert!(matches!(
                authorise(&operator, &web(), group, Action::Bind(&binding)).unwrap_err(),
                AccessError::PrivilegedPort { .. }
            ));
        }
    }

    #[test]
    fn a_process_of_another_user_is_refused() {
        let me = std::process::id();
        let pidfd = crate::socket::Pidfd::open(me).unwrap();
        let uid = nix::unistd::getuid().as_raw();
        let refusal = check_process(uid.wrapping_add(1).max(1), me, &pidfd).unwrap_err();
        assert!(
            matches!(refusal, AccessError::ForeignProcess { runs_as, .. } if runs_as == uid),
            "{refusal}"
        );
        check_process(uid, me, &pidfd).unwrap();
    }
}
