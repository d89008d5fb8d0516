//! Admission to a control socket: who may connect, how much each peer may hold, and how the
//! accept loop behaves when the process runs out of descriptors.
//!
//! Whatever a local peer sends, the daemon's memory stays bounded: a peer is authorised from
//! its `SO_PEERCRED` before a byte of its request is read, a request frame is at most
//! [`MAX_REQUEST_FRAME`], each uid holds at most [`Limits::per_uid`] connections (and all
//! but root together [`Limits::total`], so that others filling it never lock root out), and a
//! connection idle for [`Limits::idle`] is closed.
//! The accept loop's one piece of state, the count of connections per uid, has one owner: the
//! loop itself; a connection's end comes back to it as a message ([`Admission::ended`]).

use std::{collections::HashMap, io, time::Duration};

use crate::access::Peer;

use tokio::{net::UnixStream, sync::mpsc, time::Instant};

/// Largest request frame the daemon reads; every request fits in a fraction of it.
pub const MAX_REQUEST_FRAME: usize = 64 * 1024;

/// What the control socket allows each peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, from everyone but root (root's are bounded by
    /// [`Limits::per_uid`] alone, so that no one else can lock root out).
    pub total: u32,
    /// Connections open at once from one uid.
    pub per_uid: u32,
    /// A connection that sends no request for this long (and holds no probe route) is closed.
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            total: 256,
            per_uid: 64,
            idle: Duration::from_secs(60),
        }
    }
}

/// Why a peer was turned away before its request was read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The kernel did not say who the peer is (it may be gone already).
    #[error("permission denied: the peer's credentials (SO_PEERCRED) could not be read")]
    NoCredentials,
    /// The peer may not use the control socket.
    #[error("permission denied: {} may not use this control socket (only {} may)", crate::access::user_name(*uid), allowed.who())]
    NotAllowed {
        /// The peer's uid.
        uid: u32,
        /// Who may.
        allowed: Allowed,
    },
    /// The peer's uid holds as many connections as it may.
    #[error("uid {uid} already holds {limit} control connections, as many as one user may; close some (idle ones are closed after {})", humantime::format_duration(*idle))]
    TooManyFromUid {
        /// The peer's uid.
        uid: u32,
        /// [`Limits::per_uid`].
        limit: u32,
        /// [`Limits::idle`].
        idle: Duration,
    },
    /// The daemon holds as many connections as it may.
    #[error(
        "the daemon already holds {limit} control connections, as many as it takes; try again"
    )]
    TooMany {
        /// [`Limits::total`].
        limit: u32,
    },
}

impl Refusal {
    /// The refusal's code on the wire.
    pub fn code(&self) -> crate::protocol::ErrorCode {
        match self {
            Self::NoCredentials | Self::NotAllowed { .. } => {
                crate::protocol::ErrorCode::PermissionDenied
            }
            Self::TooManyFromUid { .. } | Self::TooMany { .. } => crate::protocol::ErrorCode::Busy,
        }
    }
}

/// Who may connect to a control socket at all (what each may do once connected is
/// [`crate::access`]'s to say).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allowed {
    /// Root only.
    Root,
    /// Root and this uid: a supervisor's socket, for the operator who runs it.
    RootAndUser(u32),
    /// Root and the members of this group: the daemon's socket with `--socket-group`.
    RootAndGroup(u32),
}

impl Allowed {
    /// Whether `peer` may connect.
    pub fn admits(&self, peer: &Peer) -> bool {
        peer.is_root()
            || match *self {
                Self::Root => false,
                Self::RootAndUser(uid) => peer.uid == uid,
                Self::RootAndGroup(gid) => peer.in_group(gid),
            }
    }

    /// Who may connect, for a refusal.
    pub fn who(&self) -> String {
        match *self {
            Self::Root => "root".to_owned(),
            Self::RootAndUser(uid) => format!("root and {}", crate::access::user_name(uid)),
            Self::RootAndGroup(gid) => format!(
                "root and members of group {}",
                crate::access::group_name(gid)
            ),
        }
    }
}

/// A connection's admission: while it lives, the connection counts against its uid. Dropping
/// it tells the accept loop the connection ended.
#[derive(Debug)]
pub struct Ticket {
    uid: u32,
    ended: mpsc::UnboundedSender<u32>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let _ = self.ended.send(self.uid);
    }
}

/// The accept loop's count of open connections per uid.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    allowed: Allowed,
    open: HashMap<u32, u32>,
    total: u32,
    /// Of `total`, those not root's.
    not_roots: u32,
    ended_tx: mpsc::UnboundedSender<u32>,
    ended_rx: mpsc::UnboundedReceiver<u32>,
}

impl Admission {
    /// No connection open yet.
    pub fn new(limits: Limits, allowed: Allowed) -> Self {
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        Self {
            limits,
            allowed,
            open: HashMap::new(),
            total: 0,
            not_roots: 0,
            ended_tx,
            ended_rx,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Admits a connection from `peer`, or says why not.
    pub fn admit(&mut self, peer: &Peer) -> Result<Ticket, Refusal> {
        let uid = peer.uid;
        if !self.allowed.admits(peer) {
            return Err(Refusal::NotAllowed {
                uid,
                allowed: self.allowed,
            });
        }
        if uid != 0 && self.not_roots >= self.limits.total {
            return Err(Refusal::TooMany {
                limit: self.limits.total,
            });
        }
        let open = self.open.entry(uid).or_default();
        if *open >= self.limits.per_uid {
            return Err(Refusal::TooManyFromUid {
                uid,
                limit: self.limits.per_uid,
                idle: self.limits.idle,
            });
        }
        *open += 1;
        self.total += 1;
        self.not_roots += u32::from(uid != 0);
        Ok(Ticket {
            uid,
            ended: self.ended_tx.clone(),
        })
    }

    /// Admits the peer of a new connection from its credentials (`SO_PEERCRED`,
    /// `SO_PEERGROUPS`), before a byte of what it sent is read.
    pub fn admit_peer(&mut self, stream: &UnixStream) -> Result<(Peer, Ticket), Refusal> {
        let peer = Peer::of(stream).map_err(|_| Refusal::NoCredentials)?;
        let ticket = self.admit(&peer)?;
        Ok((peer, ticket))
    }

    /// The next connection that ended (to be passed to [`Admission::release`]); for the accept
    /// loop's `select!`.
    pub async fn ended(&mut self) -> u32 {
        self.ended_rx
            .recv()
            .await
            .expect("the admission holds a sender itself")
    }

    /// Counts a connection of `uid` as ended.
    pub fn release(&mut self, uid: u32) {
        if let Some(open) = self.open.get_mut(&uid) {
            *open -= 1;
            self.total -= 1;
            self.not_roots -= u32::from(uid != 0);
            if *open == 0 {
                self.open.remove(&uid);
            }
        }
    }

    /// Connections open now.
    pub fn open(&self) -> u32 {
        self.total
    }
}

/// Tells a refused peer why — `answer` is the refusal as the socket's protocol spells it —
/// without reading what it sent; dropping the stream then closes the connection. One small
/// frame into an empty socket buffer is written at once or not at all.
pub fn refuse<T: serde::Serialize>(stream: &UnixStream, refusal: &Refusal, answer: &T) {
    tracing::debug!("refused a control connection: {refusal}");
    if let Ok(frame) = crate::protocol::encode_frame(answer) {
        let _ = stream.try_write(&frame);
    }
}

/// When accepting fails (EMFILE, ENFILE, ENOBUFS…), the pending connection stays queued and the
/// next accept fails the same way at once: without a pause the loop spins and floods the log.
/// Waits double from [`AcceptBackoff::FIRST`] to [`AcceptBackoff::LAST`]; a success resets them.
#[derive(Debug)]
pub struct AcceptBackoff {
    failures: u32,
    next_try: Option<Instant>,
    /// What is accepted, for the log.
    what: &'static str,
}

impl Default for AcceptBackoff {
    /// For the control socket.
    fn default() -> Self {
        Self::new("control connection")
    }
}

impl AcceptBackoff {
    /// The first wait.
    pub const FIRST: Duration = Duration::from_millis(10);
    /// The longest wait.
    pub const LAST: Duration = Duration::from_secs(1);

    /// A back-off for accepting `what`s (named so in the log).
    pub fn new(what: &'static str) -> Self {
        Self {
            failures: 0,
            next_try: None,
            what,
        }
    }

    /// Waits until the next accept may be tried. Cancel-safe: the deadline is kept, so being
    /// polled again in a `select!` does not restart the wait.
    pub async fn ready(&self) {
        if let Some(at) = self.next_try {
            tokio::time::sleep_until(at).await;
        }
    }

    /// An accept failed: returns how long the loop pauses, and whether this failure starts a
    /// streak (worth a log line; the ones after it are not).
    pub fn failed(&mut self) -> (Duration, bool) {
        let wait = Self::FIRST
            .saturating_mul(1 << self.failures.min(16))
            .min(Self::LAST);
        self.failures = self.failures.saturating_add(1);
        self.next_try = Some(Instant::now() + wait);
        (wait, self.failures == 1)
    }

    /// An accept succeeded: returns how many failed before it.
    pub fn succeeded(&mut self) -> u32 {
        self.next_try = None;
        std::mem::take(&mut self.failures)
    }

    /// Takes what `accept` returned: the stream, resetting the back-off (and saying so after a
    /// failed streak); or, on a failure, pauses the next try and logs the streak's first.
    pub fn accepted<S, A>(&mut self, result: io::Result<(S, A)>) -> Option<S> {
        match result {
            Ok((stream, _)) => {
                let failures = self.succeeded();
                if failures > 0 {
                    tracing::info!(
                        "accepting {}s works again, after {failures} failed attempts",
                        self.what
                    );
                }
                Some(stream)
            }
            Err(err) => {
                let (wait, first) = self.failed();
                if first {
                    tracing::warn!(
                        "accepting a {} failed: {err}; retrying with back-off (up to {})",
                        self.what,
                        humantime::format_duration(Self::LAST)
                    );
                } else {
                    tracing::debug!(
                        "accepting a {} failed: {err}; next try in {}",
                        self.what,
                        humantime::format_duration(wait)
                    );
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            total: 3,
            per_uid: 2,
            idle: Duration::from_secs(1),
        }
    }

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer::made_up(uid, gid, groups)
    }

    fn root() -> Peer {
        peer(0, 0, &[])
    }

    #[test]
    fn only_root_and_whom_the_socket_names_are_admitted() {
        let nobody = peer(65534, 65534, &[64000]);
        let mut admission = Admission::new(limits(), Allowed::Root);
        assert_eq!(
            admission.admit(&nobody).unwrap_err(),
            Refusal::NotAllowed {
                uid: 65534,
                allowed: Allowed::Root
            }
        );
        assert_eq!(admission.open(), 0);
        let mut admission = Admission::new(limits(), Allowed::RootAndGroup(64000));
        admission.admit(&nobody).unwrap();
        let refusal = admission.admit(&peer(64001, 64001, &[])).unwrap_err();
        assert!(
            refusal
                .to_string()
                .contains("(only root and members of group gid 64000 may)"),
            "{refusal}"
        );
        let mut admission = Admission::new(limits(), Allowed::RootAndUser(64001));
        admission.admit(&peer(64001, 1, &[])).unwrap();
        admission.admit(&root()).unwrap();
        assert!(admission.admit(&nobody).is_err());
    }

    #[tokio::test]
    async fn a_uid_holds_at_most_its_share_and_gets_it_back_when_a_connection_ends() {
        let mut admission = Admission::new(limits(), Allowed::Root);
        let first = admission.admit(&root()).unwrap();
        let _second = admission.admit(&root()).unwrap();
        let refusal = admission.admit(&root()).unwrap_err();
        assert!(matches!(
            refusal,
            Refusal::TooManyFromUid {
                uid: 0,
                limit: 2,
                ..
            }
        ));
        assert!(
            refusal
                .to_string()
                .contains("idle ones are closed after 1s"),
            "{refusal}"
        );
        drop(first);
        let uid = admission.ended().await;
        admission.release(uid);
        assert_eq!(admission.open(), 1);
        admission.admit(&root()).unwrap();
    }

    #[test]
    fn others_filling_every_connection_never_lock_root_out() {
        let mut admission = Admission::new(limits(), Allowed::RootAndGroup(64000));
        let _held: Vec<Ticket> = [64001, 64001, 64002]
            .into_iter()
            .map(|uid| admission.admit(&peer(uid, 64000, &[])).unwrap())
            .collect();
        let refusal = admission.admit(&peer(64003, 64000, &[])).unwrap_err();
        assert!(
            matches!(refusal, Refusal::TooMany { limit: 3 }),
            "{refusal}"
        );
        admission.admit(&root()).unwrap();
        admission.admit(&root()).unwrap();
        assert_eq!(admission.open(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_accepts_back_off_doubling_up_to_a_second_and_reset_on_success() {
        let mut backoff = AcceptBackoff::default();
        let start = Instant::now();
        backoff.ready().await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        let waits: Vec<(Duration, bool)> = (0..10).map(|_| backoff.failed()).collect();
        assert_eq!(waits[0], (Duration::from_millis(10), true));
        assert_eq!(waits[1], (Duration::from_millis(20), false));
        assert_eq!(waits[6], (Duration::from_millis(640), false));
        assert_eq!(waits[7], (Duration::from_secs(1), false));
        assert_eq!(waits[9], (Duration::from_secs(1), false));
        backoff.ready().await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert_eq!(backoff.succeeded(), 10);
        let before = Instant::now();
        backoff.ready().await;
        assert_eq!(before.elapsed(), Duration::ZERO);
        assert_eq!(backoff.failed(), (Duration::from_millis(10), true));
    }
}
