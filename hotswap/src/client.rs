//! Talking to the daemon over its control socket.

use std::{
    io,
    path::{Path, PathBuf},
};

use tokio::net::UnixStream;

use crate::protocol::{Connection, FrameError, Reply, Request, Response};

/// A request could not be made or was refused.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens on the socket.
    #[error("the hotswap daemon is not running at {}: start it with {}", .0.display(), start_hint(.0))]
    NotRunning(PathBuf),
    /// The socket is root's (and its socket group's, where the daemon has one).
    #[error("permission denied on control socket {0}: only root, and the members of the daemon's --socket-group where it has one, may connect")]
    PermissionDenied(PathBuf),
    /// Connecting failed otherwise.
    #[error("connecting to control socket {path} failed")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The conversation failed.
    #[error("talking to the daemon failed")]
    Frame(#[from] FrameError),
    /// The daemon refused the request: its code and reason.
    #[error("{0}")]
    Refused(crate::protocol::WireError),
    /// The daemon answered with a reply that does not answer the request.
    #[error("unexpected reply from the daemon: {0:?}")]
    UnexpectedReply(Box<Reply>),
    /// The daemon did not answer in time (stopped, or wedged).
    #[error("the daemon did not answer within {}", humantime::format_duration(*.0))]
    NoAnswer(std::time::Duration),
}

/// How to start a daemon that serves `socket`.
fn start_hint(socket: &Path) -> String {
    if socket == Path::new(crate::daemon::DEFAULT_SOCKET) {
        "`hotswap daemon` (or `cargo xtask run`)".to_owned()
    } else {
        format!("`hotswap daemon --socket {}`", socket.display())
    }
}

/// What a failed connect to the control socket means for the user.
fn connect_error(socket: &Path, source: io::Error) -> ClientError {
    match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning(socket.to_owned())
        }
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(socket.to_owned()),
        _ => ClientError::Connect {
            path: socket.to_owned(),
            source,
        },
    }
}

/// Sends one request and waits for the reply.
pub async fn request(socket: &Path, request: &Request) -> Result<Reply, ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| connect_error(socket, source))?;
    let mut connection = Connection::new(stream);
    exchange(&mut connection, request)
        .await?
        .map_err(ClientError::Refused)
}

/// Sends `request` and reads the answer. A daemon that refuses a peer answers without reading
/// the request and closes, so a send that fails may still have an answer waiting: that answer
/// says more than the broken pipe.
async fn exchange(
    connection: &mut Connection<UnixStream>,
    request: &Request,
) -> Result<Response, FrameError> {
    let sent = connection.send(request).await;
    match (sent, connection.receive::<Response>().await) {
        (_, Ok(response)) => Ok(response),
        (Err(err), Err(_)) | (Ok(()), Err(err)) => Err(err),
    }
}

/// A readiness probe's route, held open: while it lives, new TCP connections from its source go
/// to the probed generation's own socket; dropping it (or this process dying) ends the route.
pub struct ProbeRoute {
    _connection: Connection<UnixStream>,
}

/// Asks the daemon to route TCP connections from `probe`'s address to `generation` of
/// `service`. `probe` is this process's TCP socket, bound and not yet connected: its descriptor
/// number goes with the request, so that the daemon can see the source is this process's own
/// (a caller who is not root must show it).
pub async fn probe_route(
    socket: &Path,
    service: &crate::model::ServiceName,
    generation: u32,
    probe: &tokio::net::TcpSocket,
) -> Result<ProbeRoute, ClientError> {
    use std::os::fd::AsRawFd as _;
    let source = probe.local_addr().map_err(FrameError::Io)?;
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| connect_error(socket, source))?;
    let mut connection = Connection::new(stream);
    let request = Request::Probe {
        service: service.clone(),
        generation,
        source,
        socket: Some(probe.as_raw_fd()),
    };
    let response = exchange(&mut connection, &request).await?;
    match response.map_err(ClientError::Refused)? {
        Reply::Done => Ok(ProbeRoute {
            _connection: connection,
        }),
        other => Err(ClientError::UnexpectedReply(Box::new(other))),
    }
}

/// Asks the daemon for a listening socket for a new generation of a service, for `protocol`:
/// `Some` where the backend makes them (the socket arrives with SCM_RIGHTS), `None` where
/// each generation makes its own.
pub fn listener(
    socket: &Path,
    service: &crate::model::ServiceName,
    protocol: crate::model::Protocol,
    deadline: std::time::Duration,
) -> Result<Option<std::os::fd::OwnedFd>, ClientError> {
    listener_exchange(socket, service, protocol, deadline).map_err(|err| match err {
        ClientError::Frame(FrameError::Io(io))
            if matches!(
                io.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            ClientError::NoAnswer(deadline)
        }
        other => other,
    })
}

/// [`listener`]'s conversation, each read and write bounded by `deadline`.
fn listener_exchange(
    socket: &Path,
    service: &crate::model::ServiceName,
    protocol: crate::model::Protocol,
    deadline: std::time::Duration,
) -> Result<Option<std::os::fd::OwnedFd>, ClientError> {
    use std::{
        io::{Read as _, Write as _},
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    };

    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|source| connect_error(socket, source))?;
    stream
        .set_read_timeout(Some(deadline))
        .and_then(|()| stream.set_write_timeout(Some(deadline)))
        .map_err(FrameError::Io)?;
    let request = Request::Listener {
        service: service.clone(),
        protocol,
    };
    let frame = crate::protocol::encode_frame(&request)?;
    // As in `exchange`: a refusal may be waiting even when the write failed.
    let written = stream.write_all(&frame);

    // One recvmsg for the first bytes and the descriptor that rides on them.
    let mut buf = vec![0u8; 64 * 1024];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let (received, fd) = {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let msg = match (msg, written) {
            (Ok(msg), _) if msg.bytes > 0 => msg,
            (_, Err(err)) => return Err(FrameError::Io(err).into()),
            (Ok(msg), Ok(())) => msg,
            (Err(err), Ok(())) => return Err(FrameError::Io(err.into()).into()),
        };
        let fd = msg
            .cmsgs()
            .map_err(|e| FrameError::Io(e.into()))?
            .find_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                _ => None,
            })
            // SAFETY: the kernel just installed this descriptor in our table.
            .map(|raw| unsafe { OwnedFd::from_raw_fd(raw) });
        (msg.bytes, fd)
    };
    if received < 4 {
        return Err(FrameError::Closed.into());
    }
    let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    let mut body = buf[4..received].to_vec();
    while body.len() < len {
        let mut more = vec![0u8; len - body.len()];
        let n = stream.read(&mut more).map_err(FrameError::Io)?;
        if n == 0 {
            return Err(FrameError::Closed.into());
        }
        body.extend_from_slice(&more[..n]);
    }
    let response: Response = crate::protocol::decode(&body[..len])?;
    match response.map_err(ClientError::Refused)? {
        crate::protocol::Reply::Listener { attached: true } => Ok(fd),
        crate::protocol::Reply::Listener { attached: false } => Ok(None),
        other => Err(ClientError::UnexpectedReply(Box::new(other))),
    }
}
