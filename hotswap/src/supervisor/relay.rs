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

/// How long a packet may wait for room in a generation's channel.
pub const SEND_DEADLINE: Duration = Duration::from_secs(1);

/// What one generation handed over and took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Connections it handed over that a later generation adopted.
    pub handed_over: u64,
    /// Connections it adopted from an earlier generation.
    pub adopted: u64,
}

enum Event {
    /// Generation `id` (re)started with this channel.
    Join(u32, Handoff),
    /// Connections go to this generation from now on (`None`: to none).
    Target(Option<u32>),
    /// Generation `id`'s channel said something (`None`: it closed).
    Received(u32, u64, Result<Option<Message>, HandoffError>),
}

/// The supervisor's handle on the relay task.
pub struct Relay {
    events: mpsc::UnboundedSender<Event>,
    counts: watch::Receiver<BTreeMap<u32, Counts>>,
    _task: AbortOnDropHandle<()>,
}

impl Relay {
    /// Starts the relay task.
    pub fn start() -> Self {
        let (events, received) = mpsc::unbounded_channel();
        let (counts_tx, counts) = watch::channel(BTreeMap::new());
        let state = RelayState {
            events: events.clone(),
            channels: BTreeMap::new(),
            target: None,
            in_flight: HashMap::new(),
            next_id: 1,
            next_serial: 1,
            counts: counts_tx,
        };
        let task = tokio::spawn(state.run(received));
        Self {
            events,
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
        let _ = self.events.send(Event::Join(id, Handoff::new(ours)?));
        Ok(theirs)
    }

    /// Connections go to generation `target` from now on.
    pub fn target(&self, target: Option<u32>) {
        let _ = self.events.send(Event::Target(target));
    }

    /// What generation `id` handed over and took so far.
    pub fn counts(&self, id: u32) -> Counts {
        self.counts.borrow().get(&id).copied().unwrap_or_default()
    }
}

struct Channel {
    handoff: Arc<Handoff>,
    /// Tells this channel's messages from an earlier process's of the same generation.
    serial: u64,
    /// It said it takes connections.
    accepting: bool,
    _reader: AbortOnDropHandle<()>,
}

/// A connection passed on and not yet answered.
struct InFlight {
    from: u32,
    /// The giver's id for it.
    id: u64,
    to: u32,
    /// The receiver's channel it went down.
    to_serial: u64,
}

struct RelayState {
    events: mpsc::UnboundedSender<Event>,
    channels: BTreeMap<u32, Channel>,
    target: Option<u32>,
    /// By the relay's own id, which the receiver answers with.
    in_flight: HashMap<u64, InFlight>,
    next_id: u64,
    next_serial: u64,
    counts: watch::Sender<BTreeMap<u32, Counts>>,
}

impl RelayState {
    async fn run(mut self, mut events: mpsc::UnboundedReceiver<Event>) {
        while let Some(event) = events.recv().await {
            match event {
                Event::Join(id, handoff) => self.join(id, handoff),
                Event::Target(target) => self.target = target,
                Event::Received(id, serial, received) => {
                    if self.channels.get(&id).is_some_and(|c| c.serial == serial) {
                        self.received(id, serial, received).await;
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
            let (handoff, events) = (Arc::clone(&handoff), self.events.clone());
            tokio::spawn(async move {
                loop {
                    let received = handoff.receive().await;
                    let last = !matches!(received, Ok(Some(_)) | Err(HandoffError::Malformed(_)));
                    if events.send(Event::Received(id, serial, received)).is_err() || last {
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
        received: Result<Option<Message>, HandoffError>,
    ) {
        match received {
            Ok(Some(Message::Connection(connection))) => {
                let relayed = self.pass_on(id, &connection).await;
                if !relayed {
                    self.answer(id, Message::Declined(connection.id)).await;
                }
            }
            Ok(Some(Message::Adopted(relay_id))) => self.answered(id, serial, relay_id, true).await,
            Ok(Some(Message::Declined(relay_id))) => {
                self.answered(id, serial, relay_id, false).await
            }
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
    async fn pass_on(&mut self, from: u32, connection: &crate::handoff::HandedConnection) -> bool {
        let Some(to) = self.target.filter(|&t| t != from) else {
            return false;
        };
        let Some(channel) = self.channels.get(&to).filter(|c| c.accepting) else {
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
        if !matches!(sent, Ok(Ok(()))) {
            return false;
        }
        self.next_id += 1;
        self.in_flight.insert(
            relay_id,
            InFlight {
                from,
                id: connection.id,
                to,
                to_serial: channel.serial,
            },
        );
        true
    }

    /// Receiver `to` answered the connection it knows as `relay_id`.
    async fn answered(&mut self, to: u32, serial: u64, relay_id: u64, adopted: bool) {
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
            self.answer(flight.from, Message::Adopted(flight.id)).await;
        } else {
            self.answer(flight.from, Message::Declined(flight.id)).await;
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
            if let Some(giver) = self.channels.get(&flight.from) {
                let giver = Arc::clone(&giver.handoff);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(SEND_DEADLINE, giver.declined(flight.id)).await;
                });
            }
        }
    }

    /// Sends an answer about the giver's connection to generation `to`, if its channel is open.
    async fn answer(&self, to: u32, message: Message) {
        let Some(channel) = self.channels.get(&to) else {
            return;
        };
        let sent = match message {
            Message::Adopted(id) => {
                tokio::time::timeout(SEND_DEADLINE, channel.handoff.adopted(id)).await
            }
            Message::Declined(id) => {
                tokio::time::timeout(SEND_DEADLINE, channel.handoff.declined(id)).await
            }
            _ => return,
        };
        if !matches!(sent, Ok(Ok(()))) {
            tracing::warn!("generation {to} did not take a handoff answer");
        }
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
