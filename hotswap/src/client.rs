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
    /// The socket is root's.
    #[error("permission denied on control socket {0}: hotswap must be run as root")]
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
    /// The daemon refused the request; the text is its reason.
    #[error("{0}")]
    Refused(String),
}

/// How to start a daemon that serves `socket`.
fn start_hint(socket: &Path) -> String {
    if socket == Path::new(crate::daemon::DEFAULT_SOCKET) {
        "`hotswap daemon` (or `cargo xtask run`)".to_owned()
    } else {
        format!("`hotswap daemon --socket {}`", socket.display())
    }
}

/// Sends one request and waits for the reply.
pub async fn request(socket: &Path, request: &Request) -> Result<Reply, ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning(socket.to_owned())
            }
            io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(socket.to_owned()),
            _ => ClientError::Connect {
                path: socket.to_owned(),
                source,
            },
        })?;
    let mut connection = Connection::new(stream);
    connection.send(request).await?;
    let response: Response = connection.receive().await?;
    response.map_err(ClientError::Refused)
}
