//! Each generation's sockets: on the service's own address, in one `SO_REUSEPORT` group.

use super::*;
use crate::backend::SocketSource;

impl Supervisor {
    /// One socket per protocol, bound to the service's own address and port (what `--listen`
    /// says, so that servers which match inherited sockets against their configured address
    /// accept it), all generations of a service in one `SO_REUSEPORT` group: the program
    /// assigns with `BPF_SK_LOOKUP_F_NO_REUSEPORT`, so the group never spreads traffic. Where
    /// the `--listen` addresses are not one bindable address (several IPs or ports), the socket
    /// gets the kernel's choice of port on their common address; where a listener outside
    /// hotswap holds the address without `SO_REUSEPORT`, too — steering serves it all the same,
    /// and the operator is told.
    ///
    /// Where the backend makes the sockets (its capabilities say so), they come from the
    /// daemon instead.
    pub(super) async fn create_sockets(
        &self,
        source: SocketSource,
    ) -> Result<Vec<(Protocol, OwnedFd)>, SupervisorError> {
        use socket2::{Domain, Socket, Type};
        let mut sockets = Vec::new();
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let listens: Vec<&ListenSpec> = self
                .config
                .listens
                .iter()
                .filter(|l| l.protocol == protocol)
                .collect();
            let Some(first) = listens.first() else {
                continue;
            };
            if source == SocketSource::Backend {
                let (daemon, service) = (
                    self.config.daemon_socket.clone(),
                    self.config.service.clone(),
                );
                // A blocking conversation (it carries a descriptor), bounded, off the runtime.
                let asked = tokio::task::spawn_blocking(move || {
                    client::listener(&daemon, &service, protocol, DAEMON_DEADLINE)
                })
                .await
                .map_err(|_| SupervisorError::UnexpectedReply("to listener: no answer".into()))?;
                let fd = asked?.ok_or(SupervisorError::UnexpectedReply(
                    "to listener: no socket attached".into(),
                ))?;
                sockets.push((protocol, fd));
                continue;
            }
            let all_v4 = listens.iter().all(|l| l.addr.is_ipv4());
            let same_ip = listens.iter().all(|l| l.addr.ip() == first.addr.ip());
            let fallback = match (all_v4, same_ip) {
                (_, true) => SocketAddr::new(first.addr.ip(), 0),
                (true, false) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
                (false, false) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
            };
            let exact = exact_address(&listens);
            let addr = exact.unwrap_or(fallback);
            let fail = |source| SupervisorError::Socket {
                protocol,
                addr,
                source,
            };
            let ty = match protocol {
                Protocol::Tcp => Type::STREAM,
                Protocol::Udp => Type::DGRAM,
            };
            let socket = Socket::new(Domain::for_address(addr), ty, None).map_err(fail)?;
            if addr.is_ipv6() {
                socket.set_only_v6(all_v4).map_err(fail)?;
            }
            let bound = match exact {
                Some(exact) => {
                    socket.set_reuse_port(true).map_err(fail)?;
                    match socket.bind(&exact.into()) {
                        Ok(()) => true,
                        Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
                            tracing::warn!(
                                "{protocol} {exact} is held by a listener outside hotswap (without SO_REUSEPORT; `ss -lnp` shows it): this generation listens on another port of {} and gets the service's connections all the same, but a server that compares its inherited socket with its configured address (nginx, lighttpd) binds its own and fails; stop that listener, then upgrade",
                                fallback.ip()
                            );
                            false
                        }
                        Err(err) => return Err(fail(err)),
                    }
                }
                None => false,
            };
            if !bound {
                socket
                    .bind(&fallback.into())
                    .map_err(|source| SupervisorError::Socket {
                        protocol,
                        addr: fallback,
                        source,
                    })?;
            }
            if protocol == Protocol::Tcp {
                socket.listen(1024).map_err(fail)?;
            }
            sockets.push((protocol, OwnedFd::from(socket)));
        }
        Ok(sockets)
    }
}

/// The one address a generation's socket can be bound to for these `--listen`s of one
/// protocol: the address itself when there is one, `[::]` (dual-stack) for `0.0.0.0` and `[::]`
/// on one port; `None` when they are several addresses or ports.
pub(super) fn exact_address(listens: &[&ListenSpec]) -> Option<SocketAddr> {
    let first = listens.first()?.addr;
    if listens.iter().all(|l| l.addr == first) {
        return Some(first);
    }
    let same_port = listens.iter().all(|l| l.addr.port() == first.port());
    let unspecified = listens.iter().all(|l| l.addr.ip().is_unspecified());
    (same_port && unspecified).then(|| SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), first.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(listens: &[&str]) -> Option<SocketAddr> {
        let specs: Vec<ListenSpec> = listens.iter().map(|l| l.parse().unwrap()).collect();
        exact_address(&specs.iter().collect::<Vec<_>>())
    }

    #[test]
    fn a_generation_binds_the_listen_address_when_there_is_one() {
        assert_eq!(
            exact(&["tcp://127.0.0.1:8080"]),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            exact(&["tcp://[::1]:53"]),
            Some("[::1]:53".parse().unwrap())
        );
        // 0.0.0.0 and [::] on one port: one dual-stack socket on [::].
        assert_eq!(
            exact(&["tcp://0.0.0.0:80", "tcp://[::]:80"]),
            Some("[::]:80".parse().unwrap())
        );
        // Several addresses or ports cannot be one socket's.
        assert_eq!(exact(&["tcp://127.0.0.1:80", "tcp://127.0.0.2:80"]), None);
        assert_eq!(exact(&["tcp://0.0.0.0:80", "tcp://[::]:81"]), None);
    }
}
