//! The UDS fallback backend, for hosts where the sk_lookup program cannot be loaded (kernels
//! before 5.9; no CAP_BPF/CAP_NET_ADMIN, e.g. an unprivileged container).
//!
//! The classic method: the daemon binds each service address once and every generation gets a
//! duplicate of that one socket — children of `hotswap run` through socket activation, other
//! processes over the control socket with SCM_RIGHTS (as Envoy's hot restart does). A switch is
//! a record of which generation is active; the shared accept queue means nothing is lost, but
//! there is no atomic cut: until the old generation stops accepting, both may accept.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
};

use hotswap_common::{GenerationKey, GenerationRecord, ServiceMetrics, ServiceRecord};

use super::{Backend, BackendError, BackendInfo, PersistedState};
use crate::{
    model::{Binding, Protocol},
    socket::socket_cookie,
};

/// The UDS backend refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum UdsError {
    /// A prefix or a port-0 binding.
    #[error("the uds backend binds exact addresses only, and {0} is a prefix or every port (that needs the sk_lookup backend)")]
    NeedsExactAddress(Binding),
    /// A second binding of one protocol for a service.
    #[error("the uds backend gives a service one shared socket per protocol, and {existing} is its {protocol} address already")]
    OneBindingPerProtocol {
        /// The protocol.
        protocol: Protocol,
        /// The binding it has.
        existing: Binding,
    },
    /// Binding the address failed.
    #[error("binding {addr} failed")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The socket offered is not the service's shared one.
    #[error("in the uds backend every generation serves the service's shared {0} socket; get it from the daemon (hotswap run and hotswap::activation::service_listener do)")]
    NotShared(Protocol),
    /// A switch cannot move connections between generations that share one socket.
    #[error("the uds backend cannot switch: generations share one socket and both accept until the old one stops; use hotswap upgrade or rollback (they drain the old generation), or stop the old process")]
    CannotSwitch,
    /// The operation needs the sk_lookup program.
    #[error("{0} needs the sk_lookup backend")]
    Unsupported(&'static str),
}

struct Shared {
    binding: Binding,
    socket: OwnedFd,
    cookie: u64,
}

/// The daemon's shared listeners, one per (service, protocol).
pub struct UdsBackend {
    reason: String,
    sockets: BTreeMap<(u32, Protocol), Shared>,
}

impl UdsBackend {
    /// A backend with nothing bound; `reason` says why it was chosen.
    pub fn new(reason: String) -> Self {
        Self {
            reason,
            sockets: BTreeMap::new(),
        }
    }
}

fn bind(binding: &Binding) -> Result<OwnedFd, UdsError> {
    use socket2::{Domain, Socket, Type};
    let addr = SocketAddr::new(binding.prefix.addr(), binding.port);
    let fail = |source| UdsError::Bind { addr, source };
    let ty = match binding.protocol {
        Protocol::Tcp => Type::STREAM,
        Protocol::Udp => Type::DGRAM,
    };
    let socket = Socket::new(Domain::for_address(addr), ty, None).map_err(fail)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(fail)?;
    }
    if binding.protocol == Protocol::Tcp {
        socket.set_reuse_address(true).map_err(fail)?;
    }
    socket.bind(&addr.into()).map_err(fail)?;
    if binding.protocol == Protocol::Tcp {
        socket.listen(1024).map_err(fail)?;
    }
    Ok(socket.into())
}

impl Backend for UdsBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: "uds".to_owned(),
            reason: self.reason.clone(),
            state_dir: String::new(),
            program_id: None,
            verified_instructions: None,
            adopted: false,
        }
    }

    /// Nothing survives a daemon restart in this backend: the shared sockets live on in the
    /// generations, but their addresses cannot be bound again while those live.
    fn load_state(&self) -> Result<PersistedState, BackendError> {
        Ok(PersistedState::default())
    }

    fn add_binding(&mut self, binding: &Binding, service_id: u32) -> Result<(), BackendError> {
        if binding.port == 0 || binding.prefix.prefix_len() != binding.prefix.max_prefix_len() {
            return Err(UdsError::NeedsExactAddress(*binding).into());
        }
        if let Some(existing) = self.sockets.get(&(service_id, binding.protocol)) {
            return Err(UdsError::OneBindingPerProtocol {
                protocol: binding.protocol,
                existing: existing.binding,
            }
            .into());
        }
        let socket = bind(binding)?;
        let cookie = socket_cookie(socket.as_fd()).map_err(|source| UdsError::Bind {
            addr: SocketAddr::new(binding.prefix.addr(), binding.port),
            source,
        })?;
        self.sockets.insert(
            (service_id, binding.protocol),
            Shared {
                binding: *binding,
                socket,
                cookie,
            },
        );
        Ok(())
    }

    fn remove_binding(&mut self, binding: &Binding) -> Result<(), BackendError> {
        // The daemon lets go of its copy; generations keep theirs until they exit.
        self.sockets.retain(|_, shared| shared.binding != *binding);
        Ok(())
    }

    fn activate(&mut self, _: u32, _: Protocol, _: BorrowedFd<'_>) -> Result<(), BackendError> {
        // Every generation already serves the one shared socket: nothing to move.
        Ok(())
    }

    fn deactivate(&mut self, _: u32, _: Protocol) -> Result<(), BackendError> {
        Ok(())
    }

    fn metrics(&self, _: u32) -> Result<ServiceMetrics, BackendError> {
        Err(UdsError::Unsupported("counting connections (metrics)").into())
    }

    fn save_service(&mut self, _: u32, _: &ServiceRecord, _: bool) -> Result<(), BackendError> {
        Ok(())
    }

    fn forget_service(&mut self, _: u32) -> Result<(), BackendError> {
        Ok(())
    }

    fn save_generation(
        &mut self,
        _: &GenerationKey,
        _: &GenerationRecord,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    fn forget_generation(&mut self, _: &GenerationKey) -> Result<(), BackendError> {
        Ok(())
    }

    fn set_debug_log(&mut self, on: bool) -> Result<(), BackendError> {
        if on {
            return Err(UdsError::Unsupported("eBPF debug logging (--debug-ebpf)").into());
        }
        Ok(())
    }

    fn shared_listener(
        &self,
        service_id: u32,
        protocol: Protocol,
    ) -> Result<Option<OwnedFd>, BackendError> {
        match self.sockets.get(&(service_id, protocol)) {
            Some(shared) => Ok(Some(shared.socket.try_clone().map_err(|source| {
                UdsError::Bind {
                    addr: SocketAddr::new(shared.binding.prefix.addr(), shared.binding.port),
                    source,
                }
            })?)),
            None => Ok(None),
        }
    }

    fn check_switch(&self) -> Result<(), BackendError> {
        Err(UdsError::CannotSwitch.into())
    }

    fn check_socket(
        &self,
        service_id: u32,
        protocol: Protocol,
        cookie: u64,
    ) -> Result<(), BackendError> {
        match self.sockets.get(&(service_id, protocol)) {
            Some(shared) if shared.cookie == cookie => Ok(()),
            _ => Err(UdsError::NotShared(protocol).into()),
        }
    }
}
