//! The handoff relay (`hotswap run --handoff`): each generation gets one end of a
//! `SOCK_SEQPACKET` pair (`HOTSWAP_HANDOFF_FD`), and the relay, which holds the other ends,
//! passes the connections one generation hands over to the active generation, and the answers
//! back. Generations never know each other; the relay is the one owner of the channels, the
//! connections in flight and the counts, and hears of everything through messages.
//!
//! A connection is never owned by nobody: the giver keeps its copy until an answer comes, and
//! the relay answers "declined" itself whenever it cannot pass a connection on — no other
//! generation is active, the active one never said it takes connections (a server that does
//! not use the channel), it is behind by [`MAX_IN_FLIGHT`] connections or does not take a
//! packet within [`SEND_DEADLINE`], or its channel closes (it died) before it answered.

use std::{
    collections::{BTreeMap, HashMap},
    os::fd::{AsFd as _, OwnedFd},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc, watch};
use tokio_util::task::AbortOnDropHandle;

use crate::handoff::{Handoff, HandoffError, Message};

/// Connections passed to one receiver and not yet answered; more are declined at once, so a
/// receiver that stopped reading cannot make givers wait.
pub const MAX_IN_FLIGHT: usize = 256;

/// How long a connection packet may wait for room in a receiver's channel; a receiver that
/// takes longer is stalled, and passed nothing more.
pub const SEND_DEADLINE: Duration = Duration::from_secs(1);

/// Messages read from generations and not yet handled: a generation that sends faster than
/// the relay handles waits on its own socket (and the descriptors it sends stay there).
const RECEIVED_QUEUE: usize = 64;

/// What one generation handed over and took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Connections it handed over that a later generation adopted.
    pub handed_over: u64,
    /// Connections it adopted from an earlier generation.
    pub adopted: u64,
}

/// What the supervisor tells the relay.
enum Control {
    /// Generation `id` (re)started with this channel.
    Join(u32, Handoff),
    /// Connections go to this generation from now on (`None`: to none).
    Target(Option<u32>),
}

/// What generation `id`'s channel (as of `serial`) said (`None`: it closed).
struct Received(u32, u64, Result<Option<Message>, HandoffError>);

/// The supervisor's handle on the relay task.
pub struct Relay {
    control: mpsc::UnboundedSender<Control>,
    counts: watch::Receiver<BTreeMap<u32, Counts>>,
    _task: AbortOnDropHandle<()>,
}

impl Relay {
    /// Starts the relay task.
    pub fn start() -> Self {
        let (control, control_rx) = mpsc::unbounded_channel();
        let (received_tx, received) = mpsc::channel(RECEIVED_QUEUE);
        let (counts_tx, counts) = watch::channel(BTreeMap::new());
        let state = RelayState {
            received_tx,
            channels: BTreeMap::new(),
            target: None,
            in_flight: HashMap::new(),
            next_id: 1,
            next_serial: 1,
            counts: counts_tx,
        };
        let task = tokio::spawn(state.run(control_rx, received));
        Self {
            control,
            counts,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// A channel for generation `id`'s (next) process: the end it inherits. A process that
    /// restarts gets a new one; what was in flight to the old one is declined.
    pub fn join(&self, id: u32) -> Result<OwnedFd, HandoffError> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let _ = self.control.send(Control::Join(id, Handoff::new(ours)?));
        Ok(theirs)
    }

    /// Connections go to generation `target` from now on.
    pub fn target(&self, target: Option<u32>) {
        let _ = self.control.send(Control::Target(target));
    }

    /// What generation `id` handed over and took so far.
    pub fn counts(&self, id: u32) -> Counts {
        self.counts.borrow().get(&id).copied().unwrap_or_default()
    }

    /// Connections handed over from one generation to another since the relay started (the
    /// counts of every generation it has seen are kept).
    pub fn handed_over(&self) -> u64 {
        self.counts.borrow().values().map(|c| c.handed_over).sum()
    }
}

struct Channel {
    handoff: Arc<Handoff>,
    /// Tells this channel's messages from an earlier process's of the same generation.
    serial: u64,
    /// It said it takes connections.
    accepting: bool,
    /// A connection packet waited longer than [`SEND_DEADLINE`] for room in it.
    stalled: bool,
    _reader: AbortOnDropHandle<()>,
}

/// A connection passed on and not yet answered.
struct InFlight {
    from: u32,
    /// The giver's channel it came down.
    from_serial: u64,
    /// The giver's id for it.
    id: u64,
    to: u32,
    /// The receiver's channel it went down.
    to_serial: u64,
}

struct RelayState {
    received_tx: mpsc::Sender<Received>,
    channels: BTreeMap<u32, Channel>,
    target: Option<u32>,
    /// By the relay's own id, which the receiver answers with.
    in_flight: HashMap<u64, InFlight>,
    next_id: u64,
    next_serial: u64,
    counts: watch::Sender<BTreeMap<u32, Counts>>,
}

impl RelayState {
    async fn run(
        mut self,
        mut control: mpsc::UnboundedReceiver<Control>,
        mut received: mpsc::Receiver<Received>,
    ) {
        loop {
            tokio::select! {
                message = control.recv() => match message {
                    Some(Control::Join(id, handoff)) => self.join(id, handoff),
                    Some(Control::Target(target)) => self.target = target,
                    None => return,
                },
                Some(Received(id, serial, message)) = received.recv() => {
                    if self.channels.get(&id).is_some_and(|c| c.serial == serial) {
                        self.received(id, serial, message).await;
                    }
                }
            }
        }
    }

    fn join(&mut self, id: u32, handoff: Handoff) {
        let serial = self.next_serial;
        self.next_serial += 1;
        let handoff = Arc::new(handoff);
        let reader = {
            let (handoff, received) = (Arc::clone(&handoff), self.received_tx.clone());
            tokio::spawn(async move {
                loop {
                    let message = handoff.receive().await;
                    let last = !matches!(message, Ok(Some(_)) | Err(HandoffError::Malformed(_)));
                    if received.send(Received(id, serial, message)).await.is_err() || last {
                        return;
                    }
                }
            })
        };
        let earlier = self.channels.insert(
            id,
            Channel {
                handoff,
                serial,
                accepting: false,
                stalled: false,
                _reader: AbortOnDropHandle::new(reader),
            },
        );
        if let Some(earlier) = earlier {
            self.closed(id, earlier.serial);
        }
    }

    async fn received(
        &mut self,
        id: u32,
        serial: u64,
        message: Result<Option<Message>, HandoffError>,
    ) {
        match message {
            Ok(Some(Message::Connection(connection))) => {
                if !self.pass_on(id, serial, &connection).await {
                    self.answer(id, serial, Message::Declined(connection.id));
                }
            }
            // A giver's packet without a usable descriptor: it keeps what it meant to send.
            Ok(Some(Message::Refused(giver_id))) => {
                self.answer(id, serial, Message::Declined(giver_id));
            }
            Ok(Some(Message::Declined(relay_id))) => self.answered(id, serial, relay_id, false),
            Ok(Some(Message::Adopted(relay_id))) => self.answered(id, serial, relay_id, true),
            Ok(Some(Message::Accepting)) => {
                if let Some(channel) = self.channels.get_mut(&id) {
                    channel.accepting = true;
                }
            }
            Ok(Some(Message::Done)) => {
                tracing::debug!("generation {id} has nothing more to hand over");
            }
            Err(HandoffError::Malformed(what)) => {
                tracing::warn!("generation {id} sent a malformed handoff packet: {what}");
            }
            Ok(None) | Err(_) => {
                self.channels.remove(&id);
                self.closed(id, serial);
            }
        }
    }

    /// Passes a connection from generation `from` on to the target; whether it went.
    async fn pass_on(
        &mut self,
        from: u32,
        from_serial: u64,
        connection: &crate::handoff::HandedConnection,
    ) -> bool {
        let Some(to) = self.target.filter(|&t| t != from) else {
            return false;
        };
        let Some(channel) = self
            .channels
            .get_mut(&to)
            .filter(|c| c.accepting && !c.stalled)
        else {
            return false;
        };
        if self.in_flight.values().filter(|f| f.to == to).count() >= MAX_IN_FLIGHT {
            return false;
        }
        let relay_id = self.next_id;
        let sent = tokio::time::timeout(
            SEND_DEADLINE,
            channel.handoff.send_connection(
                relay_id,
                connection.stream.as_fd(),
                &connection.buffered,
                &connection.state,
            ),
        )
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return false,
            Err(_) => {
                tracing::warn!(
                    "generation {to} takes no handoff packet; it is passed no more connections"
                );
                channel.stalled = true;
                return false;
            }
        }
        self.next_id += 1;
        self.in_flight.insert(
            relay_id,
            InFlight {
                from,
                from_serial,
                id: connection.id,
                to,
                to_serial: channel.serial,
            },
        );
        true
    }

    /// Receiver `to` answered the connection it knows as `relay_id`.
    fn answered(&mut self, to: u32, serial: u64, relay_id: u64, adopted: bool) {
        let Some(flight) = self.in_flight.get(&relay_id) else {
            return;
        };
        if flight.to != to || flight.to_serial != serial {
            return;
        }
        let flight = self.in_flight.remove(&relay_id).expect("looked up above");
        if adopted {
            self.counts.send_modify(|counts| {
                counts.entry(flight.from).or_default().handed_over += 1;
                counts.entry(to).or_default().adopted += 1;
            });
            self.answer(flight.from, flight.from_serial, Message::Adopted(flight.id));
        } else {
            self.answer(
                flight.from,
                flight.from_serial,
                Message::Declined(flight.id),
            );
        }
    }

    /// Generation `id`'s channel (as of `serial`) is gone: what it was passed and did not
    /// answer stays with its givers.
    fn closed(&mut self, id: u32, serial: u64) {
        let orphaned: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.to == id && f.to_serial == serial)
            .map(|(&relay_id, _)| relay_id)
            .collect();
        for relay_id in orphaned {
            let flight = self.in_flight.remove(&relay_id).expect("listed above");
            self.answer(
                flight.from,
                flight.from_serial,
                Message::Declined(flight.id),
            );
        }
    }

    /// Sends an answer about the giver's connection to generation `to`'s channel of `serial`,
    /// if it is still open. Never given up on while it is: the giver waits for it (its own
    /// reader keeps reading, so this takes no longer than the giver needs to read).
    fn answer(&self, to: u32, serial: u64, message: Message) {
        let Some(channel) = self.channels.get(&to).filter(|c| c.serial == serial) else {
            return;
        };
        let giver = Arc::clone(&channel.handoff);
        tokio::spawn(async move {
            let _ = match message {
                Message::Adopted(id) => giver.adopted(id).await,
                Message::Declined(id) => giver.declined(id).await,
                _ => Ok(()),
            };
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    async fn generation(relay: &Relay, id: u32) -> Handoff {
        let handoff = Handoff::new(relay.join(id).unwrap()).unwrap();
        handoff.accepting().await.unwrap();
        // The relay's reader takes it in before what the test sends next.
        tokio::time::sleep(Duration::from_millis(20)).await;
        handoff
    }

    fn connection() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (client, listener.accept().unwrap().0)
    }

    #[tokio::test]
    async fn connections_go_to_the_target_and_answers_come_back() {
        let relay = Relay::start();
        let (old, new) = (generation(&relay, 1).await, generation(&relay, 2).await);
        let (mut client, server) = connection();
        // No target yet: declined by the relay itself.
        old.send_connection(7, server.as_fd(), b"", b"")
            .await
            .unwrap();
        assert!(matches!(
            old.receive().await.unwrap(),
            Some(Message::Declined(7))
        ));
        relay.target(Some(2));
        old.send_connection(8, server.as_fd(), b"in", b"n=1")
            .await
            .unwrap();
        let Some(Message::Connection(mut handed)) = new.receive().await.unwrap() else {
            panic!("nothing relayed");
        };
        assert_eq!(
            (&handed.buffered[..], &handed.state[..]),
            (&b"in"[..], &b"n=1"[..])
        );
        new.adopted(handed.id).await.unwrap();
        assert!(matches!(
            old.receive().await.unwrap(),
            Some(Message::Adopted(8))
        ));
        assert_eq!(relay.counts(1).handed_over, 1);
        assert_eq!(relay.counts(2).adopted, 1);
        assert_eq!(relay.handed_over(), 1);
        drop(server);
        client.write_all(b"x").unwrap();
        let mut byte = [0u8];
        handed.stream.read_exact(&mut byte).unwrap();
        // The target handing over to itself is declined.
        new.send_connection(9, handed.stream.as_fd(), b"", b"")
            .await
            .unwrap();
        assert!(matches!(
            new.receive().await.unwrap(),
            Some(Message::Declined(9))
        ));
    }

    #[tokio::test]
    async fn a_giver_whose_packet_carries_no_connection_is_answered_declined() {
        let relay = Relay::start();
        let (old, _new) = (generation(&relay, 1).await, generation(&relay, 2).await);
        relay.target(Some(2));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        old.send_connection(3, listener.as_fd(), b"", b"")
            .await
            .unwrap();
        assert!(matches!(
            old.receive().await.unwrap(),
            Some(Message::Declined(3))
        ));
    }

    #[tokio::test]
    async fn a_receiver_that_dies_before_answering_leaves_the_connection_with_its_giver() {
        let relay = Relay::start();
        let (old, new) = (generation(&relay, 1).await, generation(&relay, 2).await);
        relay.target(Some(2));
        let (_client, server) = connection();
        old.send_connection(5, server.as_fd(), b"", b"")
            .await
            .unwrap();
        assert!(matches!(
            new.receive().await.unwrap(),
            Some(Message::Connection(_))
        ));
        drop(new);
        assert!(matches!(
            old.receive().await.unwrap(),
            Some(Message::Declined(5))
        ));
        assert_eq!(relay.counts(1), Counts::default());
        // A restarted receiver's late answer for the dead one's connection counts for nothing.
        let restarted = generation(&relay, 2).await;
        restarted.adopted(1).await.unwrap();
        old.send_connection(6, server.as_fd(), b"", b"")
            .await
            .unwrap();
        let Some(Message::Connection(handed)) = restarted.receive().await.unwrap() else {
            panic!("nothing relayed");
        };
        restarted.adopted(handed.id).await.unwrap();
        assert!(matches!(
            old.receive().await.unwrap(),
            Some(Message::Adopted(6))
        ));
        assert_eq!(relay.counts(1).handed_over, 1);
    }
}
