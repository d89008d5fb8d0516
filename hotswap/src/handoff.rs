//! Established connections handed from one generation to the next: the wire format of
//! `docs/handoff.md` over a `SOCK_SEQPACKET` Unix socket, one packet per message, a
//! connection's descriptor riding on its packet (`SCM_RIGHTS`).
//!
//! This module is one end of a handoff channel: [`Handoff::send_connection`] gives a
//! connection away with the bytes already read from it and the application's state;
//! [`Handoff::receive`] takes the next message — a connection to adopt (as a
//! [`std::net::TcpStream`] with its bytes and state), or the answer about one given away.
//! The receiving side answers each connection with [`Handoff::adopted`] or
//! [`Handoff::declined`]; until the answer comes the giver keeps its copy, so a connection is
//! never owned by nobody: a receiver that dies before answering leaves it with the giver.

use std::{
    io::{self, IoSlice, IoSliceMut},
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use tokio::io::{unix::AsyncFd, Interest};

/// The variable that names an inherited handoff socket's descriptor.
pub const HANDOFF_FD_VAR: &str = "HOTSWAP_HANDOFF_FD";

/// The largest packet of the format: header, buffered bytes and state together.
pub const MAX_PACKET: usize = 64 * 1024;

/// Bytes of the header before the buffered bytes.
pub const HEADER_LEN: usize = 24;

const MAGIC: &[u8; 4] = b"HSHO";
const VERSION: u8 = 1;

/// A message's kind (header byte 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Connection = 1,
    Adopted = 2,
    Declined = 3,
    Done = 4,
    Accepting = 5,
}

/// Why a handoff message could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The socket failed.
    #[error("handoff socket i/o failed")]
    Io(#[from] io::Error),
    /// `HOTSWAP_HANDOFF_FD` is not a descriptor number.
    #[error("{HANDOFF_FD_VAR}={0:?} is not a descriptor number")]
    BadVariable(String),
    /// The buffered bytes and the state do not fit one packet.
    #[error("{buffered} buffered bytes and {state} bytes of state do not fit one handoff packet ({} at most together)", MAX_PACKET - HEADER_LEN)]
    TooBig {
        /// Buffered bytes given.
        buffered: usize,
        /// State bytes given.
        state: usize,
    },
    /// A packet that is not a message of this format (or of another version of it).
    #[error("malformed handoff packet: {0}")]
    Malformed(&'static str),
}

/// A connection handed over, as its receiver gets it.
#[derive(Debug)]
pub struct HandedConnection {
    /// The giver's id for it, to answer with.
    pub id: u64,
    /// The connection.
    pub stream: std::net::TcpStream,
    /// What the giver had read from it and not processed: it comes first.
    pub buffered: Vec<u8>,
    /// The application's state of the connection, opaque to hotswap.
    pub state: Vec<u8>,
}

/// One message from the other end.
#[derive(Debug)]
pub enum Message {
    /// A connection to adopt; answer it with [`Handoff::adopted`] or [`Handoff::declined`].
    Connection(HandedConnection),
    /// The receiver took connection `id`: the giver closes its copy.
    Adopted(u64),
    /// The receiver refused connection `id`: the giver keeps serving it (or closes it).
    Declined(u64),
    /// The giver has nothing more to hand over.
    Done,
    /// The sender takes connections from now on: until it says so, none is passed to it.
    Accepting,
    /// A connection packet came without a usable descriptor (none, several, or not a TCP
    /// stream socket; whatever came is closed): answer it "declined" so its giver keeps it.
    Refused(u64),
}

/// The header of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    kind: Kind,
    id: u64,
    buffered: u32,
    state: u32,
}

fn encode(header: Header, buffered: &[u8], state: &[u8]) -> Vec<u8> {
    let mut packet = Vec::with_capacity(HEADER_LEN + buffered.len() + state.len());
    packet.extend_from_slice(MAGIC);
    packet.push(VERSION);
    packet.push(header.kind as u8);
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(&header.id.to_le_bytes());
    packet.extend_from_slice(&header.buffered.to_le_bytes());
    packet.extend_from_slice(&header.state.to_le_bytes());
    packet.extend_from_slice(buffered);
    packet.extend_from_slice(state);
    packet
}

/// The header of `packet`, checked against its length: a packet is whole or refused.
fn decode(packet: &[u8]) -> Result<Header, HandoffError> {
    let malformed = HandoffError::Malformed;
    if packet.len() < HEADER_LEN {
        return Err(malformed("shorter than its header"));
    }
    if &packet[..4] != MAGIC {
        return Err(malformed("no HSHO magic"));
    }
    if packet[4] != VERSION {
        return Err(malformed("a version other than 1"));
    }
    let kind = match packet[5] {
        1 => Kind::Connection,
        2 => Kind::Adopted,
        3 => Kind::Declined,
        4 => Kind::Done,
        5 => Kind::Accepting,
        _ => return Err(malformed("an unknown kind")),
    };
    if packet[6..8] != [0, 0] {
        return Err(malformed("reserved bytes set"));
    }
    let word = |at: usize| u32::from_le_bytes(packet[at..at + 4].try_into().expect("4 bytes"));
    let header = Header {
        kind,
        id: u64::from_le_bytes(packet[8..16].try_into().expect("8 bytes")),
        buffered: word(16),
        state: word(20),
    };
    let body = header.buffered as usize + header.state as usize;
    if HEADER_LEN + body != packet.len() {
        return Err(malformed("lengths that disagree with the packet's"));
    }
    if kind != Kind::Connection && body != 0 {
        return Err(malformed("an answer with a body"));
    }
    Ok(header)
}

/// One end of a handoff channel.
#[derive(Debug)]
pub struct Handoff {
    socket: AsyncFd<OwnedFd>,
}

impl Handoff {
    /// Takes `socket`, a `SOCK_SEQPACKET` Unix socket, as one end of a channel. It is made
    /// non-blocking; call from within a tokio runtime.
    pub fn new(socket: OwnedFd) -> Result<Self, HandoffError> {
        let flags = nix::fcntl::fcntl(socket.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
            .map_err(io::Error::from)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(socket.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(io::Error::from)?;
        // SAFETY: the AsyncFd owns the descriptor for as long as it is registered.
        let socket = unsafe { AsyncFd::register(socket) }.map_err(io::Error::from)?;
        Ok(Self { socket })
    }

    /// The channel the process inherited (`HOTSWAP_HANDOFF_FD`), if any; the variable is
    /// removed, so children do not take it for theirs.
    pub fn from_env() -> Result<Option<Self>, HandoffError> {
        let Some(value) = std::env::var_os(HANDOFF_FD_VAR) else {
            return Ok(None);
        };
        let text = value.to_string_lossy().into_owned();
        let fd: RawFd = text.parse().map_err(|_| HandoffError::BadVariable(text))?;
        // SAFETY: the supervisor passed this descriptor to this process for this purpose, and
        // the variable is removed so nothing else takes it.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // Ours alone: a child that inherited it would keep the channel open after this
        // process died, and the supervisor would not know what it was passed is gone.
        nix::fcntl::fcntl(
            socket.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(io::Error::from)?;
        // SAFETY: no other thread reads the environment while the channel is set up.
        unsafe { std::env::remove_var(HANDOFF_FD_VAR) };
        Self::new(socket).map(Some)
    }

    /// A connected pair of ends (for a supervisor, and for tests).
    pub fn pair() -> Result<(Self, Self), HandoffError> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        Ok((Self::new(a)?, Self::new(b)?))
    }

    /// Hands `stream` over with the bytes read from it but not processed and the
    /// application's `state`. The caller keeps its copy until the answer about `id` comes.
    pub async fn send_connection(
        &self,
        id: u64,
        stream: BorrowedFd<'_>,
        buffered: &[u8],
        state: &[u8],
    ) -> Result<(), HandoffError> {
        if HEADER_LEN + buffered.len() + state.len() > MAX_PACKET {
            return Err(HandoffError::TooBig {
                buffered: buffered.len(),
                state: state.len(),
            });
        }
        let header = Header {
            kind: Kind::Connection,
            id,
            buffered: buffered.len() as u32,
            state: state.len() as u32,
        };
        self.send(&encode(header, buffered, state), Some(stream))
            .await
    }

    /// Says the connection `id` was adopted.
    pub async fn adopted(&self, id: u64) -> Result<(), HandoffError> {
        self.answer(Kind::Adopted, id).await
    }

    /// Says the connection `id` was declined.
    pub async fn declined(&self, id: u64) -> Result<(), HandoffError> {
        self.answer(Kind::Declined, id).await
    }

    /// Says nothing more will be handed over.
    pub async fn done(&self) -> Result<(), HandoffError> {
        self.answer(Kind::Done, 0).await
    }

    /// Says this end takes connections from now on.
    pub async fn accepting(&self) -> Result<(), HandoffError> {
        self.answer(Kind::Accepting, 0).await
    }

    async fn answer(&self, kind: Kind, id: u64) -> Result<(), HandoffError> {
        let header = Header {
            kind,
            id,
            buffered: 0,
            state: 0,
        };
        self.send(&encode(header, &[], &[]), None).await
    }

    async fn send(&self, packet: &[u8], fd: Option<BorrowedFd<'_>>) -> Result<(), HandoffError> {
        let fds: Vec<RawFd> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
        loop {
            let mut ready = self.socket.ready(Interest::WRITABLE).await?;
            let sent = ready.try_io(|socket| {
                let iov = [IoSlice::new(packet)];
                let rights = [ControlMessage::ScmRights(&fds)];
                let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
                sendmsg::<UnixAddr>(
                    socket.get_ref().as_raw_fd(),
                    &iov,
                    cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            });
            match sent {
                // A packet is sent whole or not at all.
                Ok(result) => return result.map(drop).map_err(Into::into),
                Err(_would_block) => continue,
            }
        }
    }

    /// The next message; `None` once the other end is closed. A packet that is not whole
    /// and well formed is an error, and any descriptor it carried is closed.
    pub async fn receive(&self) -> Result<Option<Message>, HandoffError> {
        let mut buf = vec![0u8; MAX_PACKET];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let (len, flags, mut fds) = loop {
            let mut ready = self.socket.ready(Interest::READABLE).await?;
            let received = ready.try_io(|socket| {
                let mut iov = [IoSliceMut::new(&mut buf)];
                let msg = recvmsg::<UnixAddr>(
                    socket.get_ref().as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(passed) = c {
                        // SAFETY: the kernel just installed these in our table, for us alone.
                        fds.extend(
                            passed
                                .into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                Ok((msg.bytes, msg.flags, fds))
            });
            match received {
                Ok(result) => break result?,
                Err(_would_block) => continue,
            }
        };
        if len == 0 && fds.is_empty() {
            return Ok(None);
        }
        if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
            return Err(HandoffError::Malformed("longer than a packet may be"));
        }
        let packet = &buf[..len];
        let header = decode(packet)?;
        Ok(Some(match header.kind {
            Kind::Connection => {
                let fd = match (fds.pop(), fds.is_empty()) {
                    (Some(fd), true) if is_tcp_stream(fd.as_fd()) => fd,
                    _ => return Ok(Some(Message::Refused(header.id))),
                };
                let buffered_end = HEADER_LEN + header.buffered as usize;
                Message::Connection(HandedConnection {
                    id: header.id,
                    stream: std::net::TcpStream::from(fd),
                    buffered: packet[HEADER_LEN..buffered_end].to_vec(),
                    state: packet[buffered_end..].to_vec(),
                })
            }
            _ if !fds.is_empty() => {
                return Err(HandoffError::Malformed("an answer with a descriptor"));
            }
            Kind::Adopted => Message::Adopted(header.id),
            Kind::Declined => Message::Declined(header.id),
            Kind::Done => Message::Done,
            Kind::Accepting => Message::Accepting,
        }))
    }
}

/// What became of a connection handed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A later generation has it: close this copy without a word to the client.
    Adopted,
    /// It is still this generation's (no later generation took it): serve it on, or close it
    /// as the protocol says.
    Declined,
    /// The channel closed before the answer came (the supervisor died or re-executed), so the
    /// next generation may have it or not: close this copy without a word to the client
    /// (never `shutdown()`). If it was adopted it lives on there; if not, the client sees it
    /// close. Either way it is never served by two.
    Unknown,
}

/// The `hand_over`s waiting for their answers, by id; `None` once the channel has closed.
type Waiting = std::sync::Arc<
    std::sync::Mutex<Option<std::collections::HashMap<u64, tokio::sync::oneshot::Sender<Outcome>>>>,
>;

/// A generation's handoff channel as an application uses it: it hands its connections over
/// ([`HandoffChannel::hand_over`]) when it drains and takes the ones an earlier generation
/// hands over ([`HandoffChannel::accept`]), both at once over the one channel the supervisor
/// gave it. A task it owns reads the channel: it answers every connection "adopted" as it
/// takes it and routes each answer to the `hand_over` waiting for it.
pub struct HandoffChannel {
    handoff: std::sync::Arc<Handoff>,
    waiting: Waiting,
    incoming: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<HandedConnection>>,
    /// ACCEPTING went out (on the first `accept`).
    accepting: tokio::sync::OnceCell<()>,
    next_id: std::sync::atomic::AtomicU64,
    _reader: tokio_util::task::AbortOnDropHandle<()>,
}

impl HandoffChannel {
    /// The channel `hotswap run --handoff` gave this process (`HOTSWAP_HANDOFF_FD`), if it
    /// gave one. Call from within a tokio runtime.
    pub fn from_env() -> Result<Option<Self>, HandoffError> {
        Ok(Handoff::from_env()?.map(Self::new))
    }

    /// Serves `handoff` as an application's channel.
    pub fn new(handoff: Handoff) -> Self {
        let handoff = std::sync::Arc::new(handoff);
        let waiting: Waiting = std::sync::Arc::new(std::sync::Mutex::new(Some(Default::default())));
        let (arrived, incoming) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(read_channel(
            std::sync::Arc::clone(&handoff),
            std::sync::Arc::clone(&waiting),
            arrived,
        ));
        Self {
            handoff,
            waiting,
            incoming: tokio::sync::Mutex::new(incoming),
            accepting: tokio::sync::OnceCell::new(),
            next_id: std::sync::atomic::AtomicU64::new(1),
            _reader: tokio_util::task::AbortOnDropHandle::new(reader),
        }
    }

    /// Hands `stream` to the next generation with the bytes read from it but not processed
    /// and the application's `state`, and waits for the answer. Keep the stream until then:
    /// on [`Outcome::Adopted`] and [`Outcome::Unknown`] drop it, on [`Outcome::Declined`] it is
    /// still yours. Not cancel-safe: once called, await it to the end.
    pub async fn hand_over(
        &self,
        stream: BorrowedFd<'_>,
        buffered: &[u8],
        state: &[u8],
    ) -> Result<Outcome, HandoffError> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (answer, answered) = tokio::sync::oneshot::channel();
        // Registered before the packet goes, so the answer always finds its waiter.
        match lock(&self.waiting).as_mut() {
            Some(waiting) => waiting.insert(id, answer),
            // The channel is closed: nothing can be handed over.
            None => return Ok(Outcome::Declined),
        };
        if let Err(err) = self
            .handoff
            .send_connection(id, stream, buffered, state)
            .await
        {
            // Not sent: it is still ours.
            if let Some(waiting) = lock(&self.waiting).as_mut() {
                waiting.remove(&id);
            }
            return match err {
                HandoffError::TooBig { .. } => Err(err),
                _ => Ok(Outcome::Declined),
            };
        }
        // The reader gone (the channel closed) before the answer: no one can say.
        Ok(answered.await.unwrap_or(Outcome::Unknown))
    }

    /// The next connection an earlier generation handed over (adopted already: it is this
    /// generation's to serve); `None` once the channel is closed. The first call tells the
    /// supervisor this generation takes connections: an application that only hands over
    /// never calls it, and is never handed any.
    pub async fn accept(&self) -> Option<HandedConnection> {
        let said = self
            .accepting
            .get_or_try_init(|| async { self.handoff.accepting().await })
            .await;
        if said.is_err() {
            return None;
        }
        self.incoming.lock().await.recv().await
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The reader of an application's channel: connections in (answered "adopted"), answers to
/// the waiting `hand_over`s, until the channel closes.
async fn read_channel(
    handoff: std::sync::Arc<Handoff>,
    waiting: Waiting,
    arrived: tokio::sync::mpsc::UnboundedSender<HandedConnection>,
) {
    let answer = |id: u64, outcome: Outcome| {
        let waiter = lock(&waiting).as_mut().and_then(|w| w.remove(&id));
        if let Some(waiter) = waiter {
            let _ = waiter.send(outcome);
        }
    };
    loop {
        match handoff.receive().await {
            Ok(Some(Message::Connection(connection))) => {
                if handoff.adopted(connection.id).await.is_err() {
                    break;
                }
                let _ = arrived.send(connection);
            }
            Ok(Some(Message::Refused(id))) => {
                if handoff.declined(id).await.is_err() {
                    break;
                }
            }
            Ok(Some(Message::Adopted(id))) => answer(id, Outcome::Adopted),
            Ok(Some(Message::Declined(id))) => answer(id, Outcome::Declined),
            Ok(Some(Message::Done | Message::Accepting)) | Err(HandoffError::Malformed(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    // Closed: every waiter hears "unknown" as its sender drops, and no one waits again.
    lock(&waiting).take();
}

/// Whether `fd` is a TCP stream socket that is not listening: a receiver must not take a
/// listener or a file for a connection. (Not whether it is still connected: a connection the
/// client reset on the way is still the giver's to hand over and the receiver's to close.)
fn is_tcp_stream(fd: BorrowedFd<'_>) -> bool {
    use nix::sys::socket::{getsockopt, sockopt};
    getsockopt(&fd, sockopt::SockType).is_ok_and(|kind| kind == nix::sys::socket::SockType::Stream)
        && getsockopt(&fd, sockopt::AcceptConn).is_ok_and(|listening| !listening)
        && crate::socket::socket_protocol(fd).is_ok_and(|p| p == libc::IPPROTO_TCP)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    #[test]
    fn headers_round_trip_and_bad_packets_are_refused() {
        let header = Header {
            kind: Kind::Connection,
            id: 7,
            buffered: 3,
            state: 2,
        };
        let packet = encode(header, b"GET", b"{}");
        assert_eq!(packet.len(), HEADER_LEN + 5);
        assert_eq!(decode(&packet).unwrap(), header);
        let mut wrong = packet.clone();
        wrong[4] = 2;
        assert!(decode(&wrong).is_err());
        assert!(decode(&packet[..packet.len() - 1]).is_err());
        assert!(decode(&packet[..10]).is_err());
        let mut answer = encode(
            Header {
                kind: Kind::Adopted,
                id: 7,
                buffered: 0,
                state: 0,
            },
            &[],
            &[],
        );
        assert!(decode(&answer).is_ok());
        answer[5] = 9;
        assert!(decode(&answer).is_err());
        // Every truncation and every flipped header byte: refused or read whole, no panic.
        for cut in 0..packet.len() {
            let _ = decode(&packet[..cut]);
        }
        for at in 0..HEADER_LEN {
            let mut flipped = packet.clone();
            flipped[at] ^= 0xff;
            let _ = decode(&flipped);
        }
    }

    #[tokio::test]
    async fn a_connection_goes_across_with_its_bytes_and_state_and_is_answered() {
        let (giver, taker) = Handoff::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        giver
            .send_connection(42, server.as_fd(), b"GET / HT", b"count=3")
            .await
            .unwrap();
        let Some(Message::Connection(mut handed)) = taker.receive().await.unwrap() else {
            panic!("not a connection");
        };
        assert_eq!(
            (handed.id, &handed.buffered[..], &handed.state[..]),
            (42, &b"GET / HT"[..], &b"count=3"[..])
        );
        taker.adopted(handed.id).await.unwrap();
        assert!(matches!(
            giver.receive().await.unwrap(),
            Some(Message::Adopted(42))
        ));
        // The giver closes its copy; the connection lives on in the taker.
        drop(server);
        client.write_all(b"TP/1.1\r\n").unwrap();
        let mut got = [0u8; 8];
        handed.stream.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"TP/1.1\r\n");
        handed.stream.write_all(b"ok").unwrap();
        let mut reply = [0u8; 2];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"ok");
        giver.done().await.unwrap();
        assert!(matches!(
            taker.receive().await.unwrap(),
            Some(Message::Done)
        ));
        drop(giver);
        assert!(taker.receive().await.unwrap().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_hand_over_gets_its_answer_on_a_multi_threaded_runtime() {
        let (ours, theirs) = Handoff::pair().unwrap();
        let channel = HandoffChannel::new(ours);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        // The other end answers each connection at once, alternately.
        let answering = tokio::spawn(async move {
            for n in 0..200u64 {
                let Some(Message::Connection(handed)) = theirs.receive().await.unwrap() else {
                    panic!("not a connection");
                };
                if n % 2 == 0 {
                    theirs.adopted(handed.id).await.unwrap();
                } else {
                    theirs.declined(handed.id).await.unwrap();
                }
            }
            theirs
        });
        for n in 0..200u64 {
            let outcome = channel.hand_over(server.as_fd(), b"", b"").await.unwrap();
            let expected = if n % 2 == 0 {
                Outcome::Adopted
            } else {
                Outcome::Declined
            };
            assert_eq!(outcome, expected, "hand-over {n}");
        }
        // The channel closing with a hand-over unanswered: no one can say who has it.
        let theirs = answering.await.unwrap();
        let waiting =
            tokio::spawn(async move { channel.hand_over(server.as_fd(), b"", b"").await.unwrap() });
        assert!(matches!(
            theirs.receive().await.unwrap(),
            Some(Message::Connection(_))
        ));
        drop(theirs);
        assert_eq!(waiting.await.unwrap(), Outcome::Unknown);
    }

    #[tokio::test]
    async fn oversized_state_and_descriptors_that_are_not_connections_are_refused() {
        let (giver, taker) = Handoff::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let state = vec![0u8; MAX_PACKET];
        assert!(matches!(
            giver
                .send_connection(1, listener.as_fd(), &[], &state)
                .await,
            Err(HandoffError::TooBig { .. })
        ));
        // A listener is no connection: the taker refuses it (closing the fd), to be declined.
        giver
            .send_connection(2, listener.as_fd(), &[], &[])
            .await
            .unwrap();
        assert!(matches!(
            taker.receive().await.unwrap(),
            Some(Message::Refused(2))
        ));
    }
}
