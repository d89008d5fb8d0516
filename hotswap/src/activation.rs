//! For servers: take the listeners passed by socket activation, say when you are ready, and
//! learn when to drain.
//!
//! Works the same under `hotswap run` and under plain systemd: both pass sockets with
//! `LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES` (sd_listen_fds(3)) and take readiness on
//! `NOTIFY_SOCKET` (sd_notify(3)). `hotswap run` names each socket after its protocol: `tcp`,
//! `udp`. A server that starts on its own (not under `hotswap run`) gets its listener from
//! [`service_listener`] instead, in either backend.
//!
//! ```no_run
//! # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
//! use hotswap::activation::{drain_signal, notify_ready, Listeners};
//!
//! let mut listeners = Listeners::from_env()?;
//! let listener = listeners.take_tokio_tcp("tcp")?;
//! notify_ready()?;
//! let drain = drain_signal()?;
//! tokio::pin!(drain);
//! loop {
//!     tokio::select! {
//!         _ = &mut drain => break, // stop accepting; finish what is in flight, then exit
//!         accepted = listener.accept() => {
//!             let (_stream, _peer) = accepted?;
//!             // serve it
//!         }
//!     }
//! }
//! # Ok(()) }
//! ```

use std::{
    io,
    os::fd::{AsFd as _, FromRawFd as _, OwnedFd},
};

/// Socket activation went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_*` could not be read.
    #[error("reading the socket-activation variables failed")]
    Environment(#[source] io::Error),
    /// `Listeners::from_env` was called before in this process.
    #[error("the socket-activation fds were taken already (Listeners::from_env is called once)")]
    AlreadyTaken,
    /// No socket of that name was passed.
    #[error("no socket named {name:?} was passed (passed: {passed})")]
    Missing {
        /// The name asked for.
        name: String,
        /// The names that were passed.
        passed: String,
    },
    /// The socket is not of the kind asked for.
    #[error("socket {name:?} is not a {kind}")]
    WrongKind {
        /// The name.
        name: String,
        /// What was asked for.
        kind: &'static str,
    },
    /// Making the socket non-blocking or handing it to tokio failed.
    #[error("preparing socket {name:?} failed")]
    Setup {
        /// The name.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The sockets this process was given, by name.
#[derive(Debug, Default)]
pub struct Listeners {
    sockets: Vec<(String, OwnedFd)>,
}

impl Listeners {
    /// Takes the sockets passed to this process (none when `LISTEN_PID` is not this process).
    /// Call it once: the fds then belong to the returned value.
    pub fn from_env() -> Result<Self, ActivationError> {
        // The fds can have one owner only: a second call gets none.
        static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(ActivationError::AlreadyTaken);
        }
        let sockets = sd_notify::listen_fds_with_names()
            .map_err(ActivationError::Environment)?
            // SAFETY: sd_listen_fds(3) hands these fds to this process, once.
            .map(|(fd, name)| (name, unsafe { OwnedFd::from_raw_fd(fd) }))
            .collect();
        Ok(Self { sockets })
    }

    /// The names of the sockets not taken yet.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.sockets.iter().map(|(n, _)| n.as_str())
    }

    /// Takes the socket called `name`.
    pub fn take(&mut self, name: &str) -> Result<OwnedFd, ActivationError> {
        let index = self
            .sockets
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| ActivationError::Missing {
                name: name.to_owned(),
                passed: self.names().collect::<Vec<_>>().join(", "),
            })?;
        Ok(self.sockets.remove(index).1)
    }

    /// Takes the listening TCP socket called `name`.
    pub fn take_tcp(&mut self, name: &str) -> Result<std::net::TcpListener, ActivationError> {
        let fd = self.take(name)?;
        check_kind(&fd, name, libc::SOCK_STREAM, "TCP socket")?;
        Ok(std::net::TcpListener::from(fd))
    }

    /// Takes the UDP socket called `name`.
    pub fn take_udp(&mut self, name: &str) -> Result<std::net::UdpSocket, ActivationError> {
        let fd = self.take(name)?;
        check_kind(&fd, name, libc::SOCK_DGRAM, "UDP socket")?;
        Ok(std::net::UdpSocket::from(fd))
    }

    /// Takes the listening TCP socket called `name` as a tokio listener (inside a runtime).
    pub fn take_tokio_tcp(
        &mut self,
        name: &str,
    ) -> Result<tokio::net::TcpListener, ActivationError> {
        let listener = self.take_tcp(name)?;
        let setup = |source| ActivationError::Setup {
            name: name.to_owned(),
            source,
        };
        listener.set_nonblocking(true).map_err(setup)?;
        tokio::net::TcpListener::from_std(listener).map_err(setup)
    }

    /// Takes the UDP socket called `name` as a tokio socket (inside a runtime).
    pub fn take_tokio_udp(&mut self, name: &str) -> Result<tokio::net::UdpSocket, ActivationError> {
        let socket = self.take_udp(name)?;
        let setup = |source| ActivationError::Setup {
            name: name.to_owned(),
            source,
        };
        socket.set_nonblocking(true).map_err(setup)?;
        tokio::net::UdpSocket::from_std(socket).map_err(setup)
    }
}

fn check_kind(
    fd: &OwnedFd,
    name: &str,
    sock_type: libc::c_int,
    kind: &'static str,
) -> Result<(), ActivationError> {
    let actual = nix::sys::socket::getsockopt(&fd.as_fd(), nix::sys::socket::sockopt::SockType);
    let wanted = match sock_type {
        libc::SOCK_STREAM => nix::sys::socket::SockType::Stream,
        _ => nix::sys::socket::SockType::Datagram,
    };
    if actual.ok() != Some(wanted) {
        return Err(ActivationError::WrongKind {
            name: name.to_owned(),
            kind,
        });
    }
    Ok(())
}

/// Tells the supervisor (hotswap or systemd) that this process is ready to serve. Does nothing
/// when no one listens (`NOTIFY_SOCKET` unset).
pub fn notify_ready() -> io::Result<()> {
    notify("READY=1")
}

/// Tells the supervisor that this process is draining.
pub fn notify_stopping() -> io::Result<()> {
    notify("STOPPING=1")
}

/// Sends one sd_notify message (`KEY=VALUE` lines) to `NOTIFY_SOCKET`: a path, or an abstract
/// address written `@name` (what `hotswap run` hands out, and what the `sd-notify` crate cannot
/// reach). Does nothing when the variable is unset.
pub fn notify(message: &str) -> io::Result<()> {
    use std::os::{
        linux::net::SocketAddrExt as _,
        unix::{ffi::OsStrExt as _, net::SocketAddr},
    };
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let address = match target.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(&target)?,
    };
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
    socket.send_to_addr(message.as_bytes(), &address)?;
    Ok(())
}

/// Completes when the supervisor asks this process to drain: on SIGTERM (hotswap's default
/// drain signal, and systemd's stop signal) or SIGINT. Stop accepting, finish in-flight work,
/// then exit.
pub fn drain_signal() -> io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// The generation id `hotswap run` gave this process (`HOTSWAP_GENERATION`), if any.
pub fn generation() -> Option<u32> {
    std::env::var("HOTSWAP_GENERATION").ok()?.parse().ok()
}

/// Getting a listener from the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceListenerError {
    /// The daemon refused or could not be reached.
    #[error(transparent)]
    Daemon(#[from] crate::client::ClientError),
    /// The service has no binding of that protocol.
    #[error("service {service} has no {protocol} binding")]
    NoBinding {
        /// Service.
        service: crate::model::ServiceName,
        /// Protocol.
        protocol: crate::model::Protocol,
    },
    /// Creating the socket failed.
    #[error("creating the {protocol} socket failed")]
    Socket {
        /// Protocol.
        protocol: crate::model::Protocol,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The daemon answered something unexpected.
    #[error("unexpected reply from the daemon")]
    UnexpectedReply,
    /// The thread that asked the daemon for the socket panicked or was cancelled.
    #[error("asking the daemon for the socket did not finish")]
    Interrupted(#[source] tokio::task::JoinError),
}

/// A listening socket for `service`, registered with the daemon as a new generation of this
/// process, whichever backend the daemon runs: in sk_lookup this process gets a socket of its
/// own (bound to the service's address with a kernel-chosen port) and hotswap steers to it; in
/// reuseport it gets a new member of the service's group, in uds the daemon's shared socket.
/// With `activate`, the generation also becomes the active one. Returns the socket and the
/// generation id.
///
/// Blocks; it may be called from anywhere, async code included (inside a runtime it talks to
/// the daemon from a thread of its own). Async code can `.await`
/// [`service_listener_async`] instead.
pub fn service_listener(
    daemon_socket: &std::path::Path,
    service: &crate::model::ServiceName,
    protocol: crate::model::Protocol,
    label: Option<String>,
    activate: bool,
) -> Result<(OwnedFd, u32), ServiceListenerError> {
    let run = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| ServiceListenerError::Socket { protocol, source })?
            .block_on(service_listener_async(
                daemon_socket,
                service,
                protocol,
                label,
                activate,
            ))
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return run();
    }
    // A runtime cannot be started from within one.
    std::thread::scope(|scope| {
        scope
            .spawn(run)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// [`service_listener`] for async code.
pub async fn service_listener_async(
    daemon_socket: &std::path::Path,
    service: &crate::model::ServiceName,
    protocol: crate::model::Protocol,
    label: Option<String>,
    activate: bool,
) -> Result<(OwnedFd, u32), ServiceListenerError> {
    use std::os::fd::AsRawFd as _;

    use crate::{
        backend::SocketSource,
        client,
        protocol::{Reply, Request},
    };

    let Reply::Status(status) = client::request(daemon_socket, &Request::Status).await? else {
        return Err(ServiceListenerError::UnexpectedReply);
    };
    let fd = if status.backend.capabilities.sockets == SocketSource::Backend {
        // The backend makes generations' sockets (a shared one, or a new group member); the
        // exchange is a blocking one (one recvmsg for the frame and its descriptor).
        let (socket, service_name) = (daemon_socket.to_owned(), service.clone());
        tokio::task::spawn_blocking(move || {
            client::listener(
                &socket,
                &service_name,
                protocol,
                std::time::Duration::from_secs(10),
            )
        })
        .await
        .map_err(ServiceListenerError::Interrupted)??
        .ok_or(ServiceListenerError::UnexpectedReply)?
    } else {
        let binding = status
            .services
            .iter()
            .find(|s| &s.name == service)
            .and_then(|s| s.bindings.iter().find(|b| b.protocol == protocol))
            .copied()
            .ok_or_else(|| ServiceListenerError::NoBinding {
                service: service.clone(),
                protocol,
            })?;
        let ip = if binding.prefix.prefix_len() == binding.prefix.max_prefix_len() {
            binding.prefix.addr()
        } else if binding.prefix.addr().is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        let addr = std::net::SocketAddr::new(ip, 0);
        crate::socket::bound_socket(addr, protocol, false, false)
            .map_err(|source| ServiceListenerError::Socket { protocol, source })?
    };
    let register = Request::Register {
        service: service.clone(),
        pid: std::process::id(),
        fds: vec![fd.as_raw_fd()],
        label,
        activate,
    };
    match client::request(daemon_socket, &register).await? {
        Reply::Registered { generation, .. } => Ok((fd, generation)),
        _ => Err(ServiceListenerError::UnexpectedReply),
    }
}
