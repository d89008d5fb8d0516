//! The control protocol: serde types in length-delimited JSON frames over the control socket.

use futures::StreamExt as _;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::{
    access::Owner,
    model::{Binding, Protocol, ServiceName},
    registry::{ServiceMetricsReport, StatusReport},
};

/// Largest frame a client accepts (a status report of many services is large). A server reads
/// requests with a far smaller cap ([`crate::admission::MAX_REQUEST_FRAME`]).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// A request to the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case")]
pub enum Request {
    /// Steer a binding to a service (creating the service).
    Bind {
        /// Service.
        service: ServiceName,
        /// Binding.
        binding: Binding,
        /// The owner a new service gets (root only); `None` leaves it as it is.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<Owner>,
    },
    /// Give a service an owner, or (nothing set) make it root's alone. Root only.
    Chown {
        /// Service.
        service: ServiceName,
        /// The new owner.
        owner: Owner,
    },
    /// Stop steering a binding.
    Unbind {
        /// Service.
        service: ServiceName,
        /// Binding.
        binding: Binding,
    },
    /// Take a listening socket from a running process as a new generation.
    Register {
        /// Service.
        service: ServiceName,
        /// Process.
        pid: u32,
        /// Fd numbers of its sockets in that process (at most one per protocol).
        fds: Vec<i32>,
        /// Optional label.
        label: Option<String>,
        /// Switch to it too.
        activate: bool,
    },
    /// Forget a generation whose owner is done with it (its sockets are about to close).
    Forget {
        /// Service.
        service: ServiceName,
        /// Generation.
        generation: u32,
    },
    /// Make a generation active.
    Switch {
        /// Service.
        service: ServiceName,
        /// Generation.
        generation: u32,
    },
    /// A listening socket for a new generation of the service, where the backend makes them
    /// (its capabilities say `sockets: backend`): the reply carries it (SCM_RIGHTS) — uds's
    /// shared socket, or a new member of reuseport's group. In sk_lookup there is none: each
    /// generation makes its own.
    Listener {
        /// Service.
        service: ServiceName,
        /// Protocol.
        protocol: Protocol,
    },
    /// Route new TCP connections from `source` to the generation's own socket, ahead of every
    /// binding and uncounted, for as long as this control connection stays open: the
    /// supervisor's readiness probe of a generation that is not active yet.
    Probe {
        /// Service.
        service: ServiceName,
        /// Generation to reach.
        generation: u32,
        /// Where the probe connects from (address and port).
        source: std::net::SocketAddr,
        /// The probe's socket, bound to `source` and not yet connected, as a descriptor number
        /// in the asking process: it proves the source is the asker's own, which a caller who
        /// is not root must (see [`crate::access::check_probe_source`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        socket: Option<i32>,
    },
    /// Report services, bindings and generations.
    Status,
    /// Report counters.
    Metrics,
    /// Read the config file again and apply what changed (root only).
    Reload,
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Done; nothing to report.
    Done,
    /// A generation was registered.
    Registered {
        /// Its id.
        generation: u32,
        /// Whether it is active now.
        activated: bool,
    },
    /// The answer to `Listener`; with `attached`, the socket travels with this frame.
    Listener {
        /// Whether a socket is attached.
        attached: bool,
    },
    /// A switch happened.
    Switched {
        /// The generation that was active before.
        previous: Option<u32>,
    },
    /// Status.
    Status(StatusReport),
    /// Counters.
    Metrics {
        /// Per service.
        services: Vec<ServiceMetricsReport>,
    },
    /// What a reload changed.
    Reloaded(crate::config::Applied),
}

/// The version of the control protocol this build speaks. Every frame carries it (see
/// [`Envelope`]); a frame of another version is refused, saying which versions met.
pub const PROTOCOL_VERSION: u32 = 2;

/// The daemon's answer: a reply, or why it refused.
pub type Response = Result<Reply, WireError>;

/// Why the daemon refused a request: a stable [`ErrorCode`] for programs to match, and the
/// whole cause chain on one line for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct WireError {
    /// What kind of refusal.
    pub code: ErrorCode,
    /// The reason, for people.
    pub message: String,
}

impl WireError {
    /// A refusal of kind `code` for `err`, with its whole cause chain.
    pub fn new(code: ErrorCode, err: &(dyn std::error::Error + 'static)) -> Self {
        Self {
            code,
            message: crate::error_chain(err),
        }
    }
}

/// The kinds of refusal; their names on the wire (`snake_case`) never change meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The peer may not do this: it is not root, nor the service's owner, or what it asks is
    /// beyond what an owner may (the message says who may).
    PermissionDenied,
    /// The daemon serves as many connections as it may (in all, or from this user): retry.
    Busy,
    /// The frame was not a request of this protocol version.
    MalformedRequest,
    /// The peers speak different protocol versions.
    VersionMismatch,
    /// No service of that name.
    UnknownService,
    /// No live generation of that id.
    UnknownGeneration,
    /// The binding belongs to a service already.
    AlreadyBound,
    /// The service has no such binding.
    NotBound,
    /// A value in the request cannot be used (a prefix, a label, a socket, a process).
    InvalidRequest,
    /// A limit is reached (service ids).
    LimitReached,
    /// The backend in use cannot do this.
    Unsupported,
    /// The backend (kernel, state file) failed.
    Failed,
    /// A supervisor's new generation did not become ready, or did not use its sockets: the
    /// upgrade was undone and the generation before stays active.
    NotReady,
    /// A supervisor's upgrade was rolled back (its new generation died in its grace period, or
    /// an operator rolled it back).
    RolledBack,
    /// A supervisor is busy with an upgrade already: retry when it is done.
    InProgress,
    /// A supervisor has no generation to roll back to.
    NothingToRollBack,
    /// A supervisor is stopping.
    Stopping,
    /// A supervisor of that service is not running.
    NotRunning,
}

/// What every frame holds: the protocol version, and the message.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// The message.
    pub body: T,
}

/// Only the version of a frame, read before the rest so that a frame of another version (or
/// of a build before versions) is told apart from a malformed one.
#[derive(Deserialize)]
struct VersionOnly {
    version: Option<u32>,
}

/// Why talking over the control socket failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Reading or writing the socket failed.
    #[error("control socket i/o failed")]
    Io(#[from] std::io::Error),
    /// A frame was not valid JSON for the expected type.
    #[error("malformed message")]
    Json(#[from] serde_json::Error),
    /// The peer speaks another version of the protocol (`None`: a build from before versions).
    #[error("the peer speaks control protocol version {}, this hotswap {ours} (run one build of hotswap for the daemon, the supervisors and the command line)", version_name(*theirs))]
    VersionMismatch {
        /// The peer's version.
        theirs: Option<u32>,
        /// [`PROTOCOL_VERSION`].
        ours: u32,
    },
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
}

/// A version as a frame named it, for messages: a frame without one is from a build before
/// versions.
pub fn version_name(version: Option<u32>) -> String {
    version.map_or("0 (unversioned)".to_owned(), |v| v.to_string())
}

/// Decodes one frame's body: checks its version, then reads the message.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    let version = serde_json::from_slice::<VersionOnly>(bytes)
        .ok()
        .and_then(|v| v.version);
    if version != Some(PROTOCOL_VERSION) {
        return Err(FrameError::VersionMismatch {
            theirs: version,
            ours: PROTOCOL_VERSION,
        });
    }
    Ok(serde_json::from_slice::<Envelope<T>>(bytes)?.body)
}

/// Encodes `message` as one frame's body.
fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    Ok(serde_json::to_vec(&Envelope {
        version: PROTOCOL_VERSION,
        body: message,
    })?)
}

/// A control-socket connection speaking length-delimited JSON.
pub struct Connection<S> {
    framed: Framed<S, LengthDelimitedCodec>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps a stream; frames up to [`MAX_FRAME`].
    pub fn new(stream: S) -> Self {
        Self::with_max_frame(stream, MAX_FRAME)
    }

    /// Wraps a stream; a frame announcing more than `max_frame` bytes fails
    /// [`Connection::receive_bytes`] as soon as its length is read, before its body is.
    pub fn with_max_frame(stream: S, max_frame: usize) -> Self {
        let codec = LengthDelimitedCodec::builder()
            .max_frame_length(max_frame)
            .new_codec();
        Self {
            framed: Framed::new(stream, codec),
        }
    }

    /// Sends one message.
    pub async fn send<T: Serialize>(&mut self, message: &T) -> Result<(), FrameError> {
        use tokio::io::AsyncWriteExt as _;
        // Written past the codec, whose cap is for what we read: a server that takes 64 KiB
        // requests still answers with a status report of any size.
        let frame = encode_frame(message)?;
        let stream = self.framed.get_mut();
        stream.write_all(&frame).await?;
        stream.flush().await?;
        Ok(())
    }

    /// The underlying stream (for sending a frame with a file descriptor).
    pub fn stream(&self) -> &S {
        self.framed.get_ref()
    }

    /// Receives one frame's bytes (for [`decode`]); `None` when the peer closed the connection
    /// cleanly.
    pub async fn receive_bytes(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        match self.framed.next().await {
            None => Ok(None),
            Some(frame) => Ok(Some(frame?.to_vec())),
        }
    }

    /// Receives one message.
    pub async fn receive<T: DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        let bytes = self.receive_bytes().await?.ok_or(FrameError::Closed)?;
        decode(&bytes)
    }
}

/// Encodes `message` as one length-delimited frame.
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let json = encode(message)?;
    let mut frame = (json.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&json);
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse_prefix, Protocol};

    #[tokio::test]
    async fn requests_round_trip_through_frames() {
        let (a, b) = tokio::io::duplex(4096);
        let (mut a, mut b) = (Connection::new(a), Connection::new(b));
        let requests = vec![
            Request::Bind {
                service: "web".parse().unwrap(),
                binding: Binding {
                    protocol: Protocol::Tcp,
                    prefix: parse_prefix("127.0.0.1/32").unwrap(),
                    port: 8080,
                },
                owner: Some(Owner {
                    uid: None,
                    gid: Some(64000),
                }),
            },
            Request::Chown {
                service: "web".parse().unwrap(),
                owner: Owner::default(),
            },
            Request::Register {
                service: "web".parse().unwrap(),
                pid: 42,
                fds: vec![3, 4],
                label: Some("v2".into()),
                activate: true,
            },
            Request::Switch {
                service: "web".parse().unwrap(),
                generation: 7,
            },
            Request::Status,
            Request::Metrics,
            Request::Reload,
        ];
        for request in &requests {
            a.send(request).await.unwrap();
            assert_eq!(&b.receive::<Request>().await.unwrap(), request);
        }
        let response: Response = Err(WireError {
            code: ErrorCode::UnknownService,
            message: "unknown service \"x\"".into(),
        });
        b.send(&response).await.unwrap();
        assert_eq!(a.receive::<Response>().await.unwrap(), response);
        let json = String::from_utf8(encode(&response).unwrap()).unwrap();
        assert!(
            json.contains(&format!(r#""version":{PROTOCOL_VERSION}"#))
                && json.contains(r#""code":"unknown_service""#),
            "{json}"
        );
    }

    #[test]
    fn a_frame_of_another_version_says_which_versions_met() {
        for (frame, theirs) in [
            (r#"{"verb":"status"}"#, None),
            (r#"{"version":99,"body":{"verb":"status"}}"#, Some(99)),
        ] {
            let err = decode::<Request>(frame.as_bytes()).unwrap_err();
            assert!(
                matches!(err, FrameError::VersionMismatch { theirs: t, ours: PROTOCOL_VERSION } if t == theirs),
                "{err:?}"
            );
            let text = err.to_string();
            assert!(
                text.contains(&format!("this hotswap {PROTOCOL_VERSION}")),
                "{text}"
            );
        }
        let frame = format!(r#"{{"version":{PROTOCOL_VERSION},"body":{{"verb":"fly"}}}}"#);
        let err = decode::<Request>(frame.as_bytes()).unwrap_err();
        assert!(matches!(err, FrameError::Json(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_frame_longer_than_the_cap_fails_before_its_body_is_read() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut b = Connection::with_max_frame(b, 1024);
        use tokio::io::AsyncWriteExt as _;
        // 1 GiB announced; the duplex holds 64 bytes, so reading the body would hang.
        a.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
        let err = b.receive_bytes().await.unwrap_err();
        assert!(matches!(err, FrameError::Io(_)), "{err:?}");
    }

    #[test]
    fn invalid_service_names_do_not_deserialize() {
        let bad = r#"{"verb":"switch","service":"Not/Valid","generation":1}"#;
        let err = serde_json::from_str::<Request>(bad).unwrap_err();
        assert!(err.to_string().contains("invalid service name"), "{err}");
    }
}
