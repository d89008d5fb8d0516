//! The control protocol: serde types in length-delimited JSON frames over the control socket.

use futures::{SinkExt as _, StreamExt as _};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::{
    model::{Binding, Protocol, ServiceName},
    registry::{ServiceMetricsReport, StatusReport},
};

/// Largest frame either side accepts.
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
    },
    /// Report services, bindings and generations.
    Status,
    /// Report counters.
    Metrics,
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
}

/// The daemon's answer: a reply, or the reason (whole cause chain, one line) it refused.
pub type Response = Result<Reply, String>;

/// Why talking over the control socket failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Reading or writing the socket failed.
    #[error("control socket i/o failed")]
    Io(#[from] std::io::Error),
    /// A frame was not valid JSON for the expected type.
    #[error("malformed message")]
    Json(#[from] serde_json::Error),
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
}

/// A control-socket connection speaking length-delimited JSON.
pub struct Connection<S> {
    framed: Framed<S, LengthDelimitedCodec>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps a stream.
    pub fn new(stream: S) -> Self {
        let codec = LengthDelimitedCodec::builder()
            .max_frame_length(MAX_FRAME)
            .new_codec();
        Self {
            framed: Framed::new(stream, codec),
        }
    }

    /// Sends one message.
    pub async fn send<T: Serialize>(&mut self, message: &T) -> Result<(), FrameError> {
        let bytes = serde_json::to_vec(message)?;
        self.framed
            .send(tokio_util::bytes::Bytes::from(bytes))
            .await?;
        Ok(())
    }

    /// The underlying stream (for sending a frame with a file descriptor).
    pub fn stream(&self) -> &S {
        self.framed.get_ref()
    }

    /// Receives one frame's bytes; `None` when the peer closed the connection cleanly.
    pub async fn receive_bytes(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        match self.framed.next().await {
            None => Ok(None),
            Some(frame) => Ok(Some(frame?.to_vec())),
        }
    }

    /// Receives one message.
    pub async fn receive<T: DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        let bytes = self.receive_bytes().await?.ok_or(FrameError::Closed)?;
        Ok(serde_json::from_slice(&bytes)?)
    }
}

/// Encodes `message` as one length-delimited frame.
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let json = serde_json::to_vec(message)?;
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
        ];
        for request in &requests {
            a.send(request).await.unwrap();
            assert_eq!(&b.receive::<Request>().await.unwrap(), request);
        }
        let response: Response = Err("unknown service \"x\"".into());
        b.send(&response).await.unwrap();
        assert_eq!(a.receive::<Response>().await.unwrap(), response);
    }

    #[test]
    fn invalid_service_names_do_not_deserialize() {
        let bad = r#"{"verb":"switch","service":"Not/Valid","generation":1}"#;
        let err = serde_json::from_str::<Request>(bad).unwrap_err();
        assert!(err.to_string().contains("invalid service name"), "{err}");
    }
}
