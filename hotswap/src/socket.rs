//! Taking a listening socket from another process and checking that hotswap can steer to it.

use std::{
    collections::BTreeMap,
    io,
    mem::{size_of, MaybeUninit},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use nix::sys::socket::{getpeername, getsockname, SockaddrStorage};

use crate::model::Protocol;

/// `ioctl` that returns a fd for the network namespace a socket belongs to (linux/sockios.h).
const SIOCGSKNS: libc::c_ulong = 0x894C;

/// Why a process's fd cannot be registered.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// No such process.
    #[error("no process with pid {0}")]
    NoSuchProcess(u32),
    /// The process has no such fd.
    #[error("process {pid} has no open fd {fd}")]
    NoSuchFd {
        /// Process.
        pid: u32,
        /// Fd number.
        fd: RawFd,
    },
    /// Not a socket.
    #[error("fd {fd} of process {pid} is not a socket")]
    NotASocket {
        /// Process.
        pid: u32,
        /// Fd number.
        fd: RawFd,
    },
    /// A socket, but not TCP or UDP over IPv4/IPv6.
    #[error("fd {fd} of process {pid} is not a TCP or UDP socket over IPv4 or IPv6")]
    UnsupportedSocket {
        /// Process.
        pid: u32,
        /// Fd number.
        fd: RawFd,
    },
    /// A TCP socket that is not listening.
    #[error(
        "fd {fd} of process {pid} is a TCP socket that is not listening (call listen() first)"
    )]
    NotListening {
        /// Process.
        pid: u32,
        /// Fd number.
        fd: RawFd,
    },
    /// A connected UDP socket.
    #[error("fd {fd} of process {pid} is a connected UDP socket; register an unconnected one")]
    ConnectedUdp {
        /// Process.
        pid: u32,
        /// Fd number.
        fd: RawFd,
    },
    /// An unbound UDP socket.
    #[error("fd {fd} of process {pid} is a UDP socket that is not bound (call bind() first)")]
    UnboundUdp {
        /// Process.
        pid: u32,
        /// Fd number.
        fd: RawFd,
    },
    /// A socket of another network namespace.
    #[error("fd {fd} of process {pid} is a socket of another network namespace than the daemon's")]
    OtherNetns {
        /// Process.
        pid: u32,
        /// Fd number.
        fd: RawFd,
    },
    /// A system call failed.
    #[error("{call} failed")]
    Syscall {
        /// The call.
        call: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn syscall(call: &'static str) -> impl FnOnce(io::Error) -> SocketError {
    move |source| SocketError::Syscall { call, source }
}

/// A process, pinned by a pidfd so its pid cannot be reused under us.
#[derive(Debug)]
pub struct Pidfd(OwnedFd);

impl AsFd for Pidfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for Pidfd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Pidfd {
    /// Opens a pidfd for `pid`.
    pub fn open(pid: u32) -> Result<Self, SocketError> {
        // SAFETY: plain syscall; returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::ESRCH) | Some(libc::EINVAL) => SocketError::NoSuchProcess(pid),
                _ => SocketError::Syscall {
                    call: "pidfd_open",
                    source: err,
                },
            });
        }
        // SAFETY: the kernel just gave us this fd.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
    }

    /// A duplicate of the process's fd `fd` (pidfd_getfd(2)).
    pub fn get_fd(&self, pid: u32, fd: RawFd) -> Result<OwnedFd, SocketError> {
        // SAFETY: plain syscall; returns a new fd or -1.
        let new = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.0.as_raw_fd(), fd, 0) };
        if new < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EBADF) => SocketError::NoSuchFd { pid, fd },
                Some(libc::ESRCH) => SocketError::NoSuchProcess(pid),
                _ => SocketError::Syscall {
                    call: "pidfd_getfd",
                    source: err,
                },
            });
        }
        // SAFETY: the kernel just gave us this fd.
        Ok(unsafe { OwnedFd::from_raw_fd(new as RawFd) })
    }

    /// Whether the process has exited (the pidfd polls readable then).
    pub fn has_exited(&self) -> bool {
        let mut pollfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pollfd, 1, 0) };
        n > 0
    }
}

/// What the daemon learnt about a socket it took from a process.
#[derive(Debug)]
pub struct InspectedSocket {
    /// A duplicate, for the map update; the daemon closes it right after, because a socket the
    /// daemon kept open would go on accepting connections nobody serves after its process
    /// closed it.
    pub fd: OwnedFd,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// `getsockname()`.
    pub local_addr: Option<SocketAddr>,
    /// `SO_COOKIE`: the socket's identity.
    pub cookie: u64,
    /// The socket's inode, as `/proc/<pid>/fd/<fd>` names it (`socket:[inode]`).
    pub inode: u64,
    /// Whether it can take IPv4 connections (AF_INET, or AF_INET6 without IPV6_V6ONLY).
    pub serves_ipv4: bool,
    /// Whether it can take IPv6 connections (AF_INET6).
    pub serves_ipv6: bool,
}

fn getsockopt_int(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len describe a valid buffer of the right size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// The socket cookie (`SO_COOKIE`), stable for the socket's whole life.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: value and len describe a valid buffer of the right size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

fn stat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut stat = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills the buffer on success.
    let rc = unsafe { libc::fstat(fd.as_raw_fd(), stat.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded.
    Ok(unsafe { stat.assume_init() })
}

/// The inode of an open file (for a socket: the number in `socket:[inode]`).
pub fn inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(stat(fd)?.st_ino)
}

/// Whether fd `fd` of process `pid` is still the socket with inode `inode`. Reads
/// `/proc/<pid>/fd/<fd>` and takes no reference: a check that duplicated the socket would, for
/// an instant, keep alive a socket its process just closed.
pub fn process_has_socket(pid: u32, fd: RawFd, inode: u64) -> bool {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .is_ok_and(|target| target.as_os_str() == format!("socket:[{inode}]").as_str())
}

/// The inode of the network namespace at `path` (e.g. `/proc/self/ns/net`).
pub fn netns_inode(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata(path)?.ino())
}

/// The inode of the network namespace a socket belongs to.
fn socket_netns_inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new fd or -1.
    let ns = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCGSKNS as _) };
    if ns < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd.
    let ns = unsafe { OwnedFd::from_raw_fd(ns) };
    Ok(stat(ns.as_fd())?.st_ino)
}

fn to_std_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6((*v6).into()))
}

/// `getsockname()` of a socket, as a std address.
pub fn local_addr(fd: BorrowedFd<'_>) -> Option<SocketAddr> {
    getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(|addr| to_std_addr(&addr))
}

/// `getpeername()` of a socket: where it is connected to, if it is.
pub fn peer_addr(fd: BorrowedFd<'_>) -> Option<SocketAddr> {
    nix::sys::socket::getpeername::<SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(|addr| to_std_addr(&addr))
}

/// Whether `SO_REUSEADDR` is set on a socket.
pub fn reuses_addr(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR)? != 0)
}

/// Takes fd `fd` of process `pid` and checks that it is a socket hotswap can steer to: a
/// listening TCP socket or a bound, unconnected UDP socket, over IPv4 or IPv6, in the network
/// namespace whose inode is `netns`.
pub fn take_socket(
    pidfd: &Pidfd,
    pid: u32,
    fd: RawFd,
    netns: u64,
) -> Result<InspectedSocket, SocketError> {
    let sock = pidfd.get_fd(pid, fd)?;
    let stat = stat(sock.as_fd()).map_err(syscall("fstat"))?;
    let mode = stat.st_mode;
    if mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(SocketError::NotASocket { pid, fd });
    }
    let unsupported = || SocketError::UnsupportedSocket { pid, fd };
    let domain = getsockopt_int(sock.as_fd(), libc::SOL_SOCKET, libc::SO_DOMAIN)
        .map_err(syscall("getsockopt(SO_DOMAIN)"))?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return Err(unsupported());
    }
    let proto = socket_protocol(sock.as_fd()).map_err(syscall("getsockopt(SO_PROTOCOL)"))?;
    let protocol = match proto {
        libc::IPPROTO_TCP => Protocol::Tcp,
        libc::IPPROTO_UDP => Protocol::Udp,
        _ => return Err(unsupported()),
    };
    if socket_netns_inode(sock.as_fd()).map_err(syscall("ioctl(SIOCGSKNS)"))? != netns {
        return Err(SocketError::OtherNetns { pid, fd });
    }
    let local_addr = local_addr(sock.as_fd());
    match protocol {
        Protocol::Tcp => {
            let listening = getsockopt_int(sock.as_fd(), libc::SOL_SOCKET, libc::SO_ACCEPTCONN)
                .map_err(syscall("getsockopt(SO_ACCEPTCONN)"))?;
            if listening == 0 {
                return Err(SocketError::NotListening { pid, fd });
            }
        }
        Protocol::Udp => {
            if getpeername::<SockaddrStorage>(sock.as_raw_fd()).is_ok() {
                return Err(SocketError::ConnectedUdp { pid, fd });
            }
            if local_addr.is_none_or(|addr| addr.port() == 0) {
                return Err(SocketError::UnboundUdp { pid, fd });
            }
        }
    }
    let cookie = socket_cookie(sock.as_fd()).map_err(syscall("getsockopt(SO_COOKIE)"))?;
    let v6only = domain == libc::AF_INET6
        && getsockopt_int(sock.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)
            .map_err(syscall("getsockopt(IPV6_V6ONLY)"))?
            != 0;
    Ok(InspectedSocket {
        fd: sock,
        protocol,
        local_addr,
        cookie,
        inode: stat.st_ino,
        serves_ipv4: !v6only,
        serves_ipv6: domain == libc::AF_INET6,
    })
}

/// The kernel's socket tables under `/proc/<pid>/net/`, with the protocol and the state (hex)
/// of a socket that takes connections: `0A` a TCP listener, `07` a bound, unconnected UDP socket.
pub(crate) const SOCKET_TABLES: &[(&str, Protocol, &str)] = &[
    ("tcp", Protocol::Tcp, "0A"),
    ("tcp6", Protocol::Tcp, "0A"),
    ("udp", Protocol::Udp, "07"),
    ("udp6", Protocol::Udp, "07"),
];

/// A `/proc/net/{tcp,udp}{,6}` address: hex, the address in the kernel's word order.
pub(crate) fn parse_address(hex: &str) -> Option<SocketAddr> {
    let (addr, port) = hex.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        // The kernel prints the address's bytes as one host-order word.
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(addr, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut octets = [0u8; 16];
            for (i, chunk) in octets.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).ok()?;
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// One socket of a kernel socket table that takes connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TableRow {
    /// Its inode.
    pub(crate) inode: u64,
    /// Its local address.
    pub(crate) addr: SocketAddr,
    /// Its owner (its creator's uid).
    pub(crate) uid: u32,
}

/// The rows of one of the kernel's socket tables that are in `state` (hex: `0A` TCP listen,
/// `07` UDP unconnected).
pub(crate) fn table_rows<'a>(text: &'a str, state: &'a str) -> impl Iterator<Item = TableRow> + 'a {
    text.lines().skip(1).filter_map(move |line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(3) != Some(&state) {
            return None;
        }
        Some(TableRow {
            addr: parse_address(fields.get(1)?)?,
            uid: fields.get(7)?.parse().ok()?,
            inode: fields.get(9)?.parse().ok()?,
        })
    })
}

/// Sockets in one of the kernel's socket tables (as seen from `pid`'s network namespace):
/// inode → local address, only those in `state` (hex: `0A` TCP listen, `07` UDP unconnected).
pub(crate) fn socket_table(text: &str, state: &str) -> BTreeMap<u64, SocketAddr> {
    table_rows(text, state)
        .map(|row| (row.inode, row.addr))
        .collect()
}

/// The sockets of this network namespace that take `protocol` connections (TCP listeners,
/// bound unconnected UDP sockets), whoever holds them.
fn taking_rows(protocol: Protocol) -> io::Result<Vec<TableRow>> {
    let mut rows = Vec::new();
    for &(file, table_protocol, state) in SOCKET_TABLES {
        if table_protocol != protocol {
            continue;
        }
        let text = match std::fs::read_to_string(format!("/proc/self/net/{file}")) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        rows.extend(table_rows(&text, state));
    }
    Ok(rows)
}

/// The sockets of this network namespace that take `protocol` connections (TCP listeners,
/// bound unconnected UDP sockets), whoever holds them: inode → local address.
pub fn taking_connections(protocol: Protocol) -> io::Result<BTreeMap<u64, SocketAddr>> {
    Ok(taking_rows(protocol)?
        .into_iter()
        .map(|row| (row.inode, row.addr))
        .collect())
}

/// The same sockets as [`taking_connections`], as local address and owner uid.
pub fn taking_connections_with_owner(protocol: Protocol) -> io::Result<Vec<(SocketAddr, u32)>> {
    Ok(taking_rows(protocol)?
        .into_iter()
        .map(|row| (row.addr, row.uid))
        .collect())
}

/// The supplementary groups of a Unix socket's peer (`SO_PEERGROUPS`), as they were when it
/// connected.
pub fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    // NGROUPS_MAX is 65536; start small and grow to what the kernel says it needs.
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: groups and len describe a valid buffer of len bytes.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) || needed <= groups.len() {
            return Err(err);
        }
        groups.resize(needed, 0);
    }
}

/// Whether an IPv6 socket takes IPv6 connections only (`IPV6_V6ONLY`).
pub fn v6_only(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(getsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)? != 0)
}

/// The interface a socket is bound to (`SO_BINDTOIFINDEX`), 0 for none.
pub fn bound_interface(fd: BorrowedFd<'_>) -> io::Result<i32> {
    // SO_BINDTOIFINDEX, include/uapi/asm-generic/socket.h (Linux 5.0).
    const SO_BINDTOIFINDEX: libc::c_int = 62;
    getsockopt_int(fd, libc::SOL_SOCKET, SO_BINDTOIFINDEX)
}

/// The backlog of every listening socket hotswap makes.
pub const BACKLOG: i32 = 1024;

/// Whether a TCP socket listens (`SO_ACCEPTCONN`). A listener that any holder shut down does
/// not: `shutdown()` acts on the socket, not on one descriptor.
pub fn is_listening(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 0)
}

/// `listen()` again on a bound TCP socket that was shut down: it takes connections again on
/// the same address (its old queue is gone).
pub fn listen_again(fd: BorrowedFd<'_>) -> io::Result<()> {
    nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(BACKLOG).expect("valid"))
        .map_err(io::Error::from)
}

/// A new socket bound to `addr` for `protocol` (listening, for TCP). With `reuse_port` it joins
/// the address's `SO_REUSEPORT` group; an IPv6 socket is IPv6-only unless `addr` is `[::]`
/// and `dual_stack`.
pub fn bound_socket(
    addr: SocketAddr,
    protocol: Protocol,
    reuse_port: bool,
    dual_stack: bool,
) -> io::Result<OwnedFd> {
    use socket2::{Domain, Socket, Type};
    let ty = match protocol {
        Protocol::Tcp => Type::STREAM,
        Protocol::Udp => Type::DGRAM,
    };
    let socket = Socket::new(Domain::for_address(addr), ty, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(!(dual_stack && addr.ip().is_unspecified()))?;
    }
    if reuse_port {
        socket.set_reuse_port(true)?;
    } else if protocol == Protocol::Tcp {
        socket.set_reuse_address(true)?;
    }
    socket.bind(&addr.into())?;
    if protocol == Protocol::Tcp {
        socket.listen(BACKLOG)?;
    }
    Ok(socket.into())
}

/// The uid that owns a socket (its creator's): a `SO_REUSEPORT` group only takes members of
/// one uid.
pub fn owner_uid(fd: BorrowedFd<'_>) -> io::Result<u32> {
    Ok(stat(fd)?.st_uid)
}

/// A socket's protocol (`SO_PROTOCOL`: `IPPROTO_TCP`, `IPPROTO_UDP`, …).
pub fn socket_protocol(fd: BorrowedFd<'_>) -> io::Result<i32> {
    getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)
}

/// Whether `SO_REUSEPORT` is set on a socket.
pub fn reuses_port(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT)? != 0)
}

/// Takes fd `fd` of process `pid` again, if it still is the socket with cookie `cookie`: the
/// process has neither closed it nor put another file in its place.
pub fn retake_socket(pidfd: &Pidfd, pid: u32, fd: RawFd, cookie: u64) -> Option<OwnedFd> {
    if pidfd.has_exited() {
        return None;
    }
    let sock = pidfd.get_fd(pid, fd).ok()?;
    (socket_cookie(sock.as_fd()).ok()? == cookie).then_some(sock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream, UdpSocket};

    fn own_netns() -> u64 {
        netns_inode(Path::new("/proc/thread-self/ns/net")).unwrap()
    }

    fn take(fd: RawFd) -> Result<InspectedSocket, SocketError> {
        let pid = std::process::id();
        take_socket(&Pidfd::open(pid).unwrap(), pid, fd, own_netns())
    }

    #[test]
    fn accepts_listening_tcp_and_bound_udp() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = take(tcp.as_raw_fd()).unwrap();
        assert_eq!(taken.protocol, Protocol::Tcp);
        assert_eq!(taken.local_addr, Some(tcp.local_addr().unwrap()));
        assert!((taken.serves_ipv4, taken.serves_ipv6) == (true, false));
        let me = std::process::id();
        let pidfd = Pidfd::open(me).unwrap();
        let fd = tcp.as_raw_fd();
        assert!(retake_socket(&pidfd, me, fd, taken.cookie).is_some());
        assert!(process_has_socket(me, fd, taken.inode));
        drop(tcp);
        assert!(!process_has_socket(me, fd, taken.inode));
        assert!(retake_socket(&pidfd, me, fd, taken.cookie).is_none());
        // The fd number reused by another socket is not the registered socket.
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        if other.as_raw_fd() == fd {
            assert!(retake_socket(&pidfd, me, fd, taken.cookie).is_none());
        }
        let v6 = TcpListener::bind("[::1]:0").unwrap();
        let taken = take(v6.as_raw_fd()).unwrap();
        assert!(taken.serves_ipv6);
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(take(udp.as_raw_fd()).unwrap().protocol, Protocol::Udp);
    }

    #[test]
    fn refuses_what_cannot_be_steered() {
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert!(matches!(
            take(file.as_raw_fd()),
            Err(SocketError::NotASocket { .. })
        ));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(matches!(
            take(stream.as_raw_fd()),
            Err(SocketError::NotListening { .. })
        ));
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.connect("127.0.0.1:9").unwrap();
        assert!(matches!(
            take(udp.as_raw_fd()),
            Err(SocketError::ConnectedUdp { .. })
        ));
        assert!(matches!(take(9999), Err(SocketError::NoSuchFd { .. })));
        let (unix, _) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(matches!(
            take(unix.as_raw_fd()),
            Err(SocketError::UnsupportedSocket { .. })
        ));
    }

    #[test]
    fn no_such_process() {
        assert!(matches!(
            Pidfd::open(i32::MAX as u32),
            Err(SocketError::NoSuchProcess(_))
        ));
    }
}
