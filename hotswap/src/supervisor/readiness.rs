//! Waiting until a new generation is ready: sd_notify, a routed TCP probe, or a delay; and
//! what waits in a socket's queue.

use super::*;

impl Supervisor {
    /// Waits until `id` is ready (or not ready in time, or dead, or the supervisor stopping;
    /// the upgrade's way out undoes the generation then).
    pub(super) async fn wait_ready(
        self: &Arc<Self>,
        id: u32,
        timeout: Duration,
    ) -> Result<Duration, SupervisorError> {
        let (mode, mut exit, notify, probe_target, spawned) = {
            let state = self.lock();
            let g = &state.generations[&id];
            let probe = g
                .sockets
                .iter()
                .find(|(p, _)| *p == Protocol::Tcp)
                .and_then(|(_, fd)| crate::socket::local_addr(fd.as_fd()))
                .map(loopback_for);
            (
                g.ready,
                g.exit.clone(),
                g.notify.as_ref().map(|n| n.state.clone()),
                probe,
                g.spawned,
            )
        };
        let kept = self.lock().active;
        let ready = async {
            match mode {
                ReadyMode::Delay(d) => tokio::time::sleep(d).await,
                ReadyMode::Notify => {
                    let Some(mut notified) = notify else {
                        return std::future::pending().await;
                    };
                    // The socket is served for the generation's whole life (see `notify`);
                    // this only waits for what it heard.
                    if notified.wait_for(|n| n.ready).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                ReadyMode::Tcp => self.tcp_probe(id, probe_target).await,
            }
        };
        let outcome = tokio::select! {
            () = ready => Ok(spawned.elapsed()),
            () = tokio::time::sleep(timeout) => Err(SupervisorError::NotReady { generation: id, timeout, mode, kept }),
            () = self.stop.cancelled() => Err(SupervisorError::Stopping),
            exit = exit.wait_for(Option::is_some) => {
                let exit = exit.ok().and_then(|e| *e).unwrap_or(ExitInfo::UNKNOWN);
                Err(SupervisorError::ExitedBeforeReady { generation: id, exit, kept })
            }
        };
        if let Ok(after) = outcome {
            let mut state = self.lock();
            if let Some(g) = state.generations.get_mut(&id) {
                g.state = GenerationState::Ready;
                g.ready_after = Some(after);
            }
            drop(state);
            self.save();
        }
        outcome
    }

    /// Connects to the generation's socket until the process accepts a connection (its accept
    /// queue is empty again). The socket is on the service's own address, where steering hands
    /// connections to the active generation, so each probe connection first gets a route of its
    /// own from the daemon: connections from its source port go to this generation, uncounted.
    pub(super) async fn tcp_probe(&self, id: u32, target: Option<SocketAddr>) {
        let Some(target) = target else {
            // No TCP socket: nothing to probe; wait for the timeout.
            return std::future::pending().await;
        };
        loop {
            if let Some((stream, _route)) = self.probe_connection(id, target).await {
                for _ in 0..20 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    if self.queue_len(id, Protocol::Tcp) == Some(0) {
                        drop(stream);
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// One probe connection to `target` with its route to generation `id`.
    pub(super) async fn probe_connection(
        &self,
        id: u32,
        target: SocketAddr,
    ) -> Option<(tokio::net::TcpStream, client::ProbeRoute)> {
        let socket = match target {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .ok()?;
        // From loopback, whatever the target: the route then carries no connection from
        // another host, and the daemon routes it for an operator who is not root.
        let loopback: IpAddr = match target {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        };
        socket.bind(SocketAddr::new(loopback, 0)).ok()?;
        let asked = client::probe_route(
            &self.config.daemon_socket,
            &self.config.service,
            id,
            &socket,
        );
        let route = match tokio::time::timeout(DAEMON_DEADLINE, asked).await {
            Ok(Ok(route)) => route,
            Ok(Err(err)) => {
                tracing::debug!("probe route for generation {id}: {}", error_chain(&err));
                return None;
            }
            Err(_) => {
                tracing::debug!("probe route for generation {id}: the daemon did not answer");
                return None;
            }
        };
        let stream = tokio::time::timeout(DAEMON_DEADLINE, socket.connect(target))
            .await
            .ok()?
            .ok()?;
        Some((stream, route))
    }

    /// What waits in the generation's socket for `protocol`: accepted-but-not-taken
    /// connections (TCP) or bytes of the next datagram (UDP).
    pub(super) fn queue_len(&self, id: u32, protocol: Protocol) -> Option<u32> {
        let state = self.lock();
        let g = state.generations.get(&id)?;
        let (_, fd) = g.sockets.iter().find(|(p, _)| *p == protocol)?;
        queue_len(fd.as_fd(), protocol).ok()
    }
}

/// The readiness used when none is given: the tcp probe where the backend can route it to one
/// generation (`probe_reaches_one`) and there is a TCP address, else a delay.
pub fn default_ready(listens: &[ListenSpec], probe_reaches_one: bool) -> ReadyMode {
    if probe_reaches_one && listens.iter().any(|l| l.protocol == Protocol::Tcp) {
        ReadyMode::Tcp
    } else {
        ReadyMode::Delay(Duration::from_secs(1))
    }
}

/// A loopback address of the socket's family when it is bound to the unspecified address.
pub(super) fn loopback_for(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// Connections waiting in a TCP listener's accept queue (`TCP_INFO.tcpi_unacked` of a
/// listening socket), or the size of the next datagram waiting in a UDP socket (`SIOCINQ`).
pub fn queue_len(fd: BorrowedFd<'_>, protocol: Protocol) -> io::Result<u32> {
    match protocol {
        Protocol::Tcp => {
            // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes.
            let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            // SAFETY: info and len describe a valid buffer.
            let rc = unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_INFO,
                    (&raw mut info).cast(),
                    &mut len,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(info.tcpi_unacked)
        }
        Protocol::Udp => {
            let mut pending: libc::c_int = 0;
            // SAFETY: SIOCINQ writes one int.
            let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut pending) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(pending as u32)
        }
    }
}
