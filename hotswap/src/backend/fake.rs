//! A backend that keeps in memory what the kernel maps would, for the unprivileged unit layer
//! (the registry's tests, the daemon's fuzzing) — no program, no privileges.

use std::{
    collections::HashMap,
    os::fd::{BorrowedFd, OwnedFd},
    sync::{Arc, Mutex},
};

use hotswap_common::{GenerationKey, GenerationRecord, OwnerRecord, ServiceMetrics, ServiceRecord};

use crate::{
    backend::{Backend, BackendError, BackendInfo, PersistedState, Support},
    model::{Binding, Protocol},
    socket::socket_cookie,
};

/// What the fake backend holds: the same things the kernel maps would.
#[derive(Default)]
pub(crate) struct FakeKernel {
    pub(crate) services: HashMap<u32, ServiceRecord>,
    pub(crate) owners: HashMap<u32, OwnerRecord>,
    pub(crate) bindings: HashMap<Binding, u32>,
    pub(crate) generations: HashMap<GenerationKey, GenerationRecord>,
    /// (service, protocol) -> socket cookie.
    pub(crate) active: HashMap<(u32, Protocol), u64>,
    /// Make `activate` fail, as a full or broken map would.
    pub(crate) fail_activate: bool,
    /// Make the next bindings fail to be written.
    pub(crate) fail_bind: bool,
    /// Make `save_service` fail (`strace -e inject=bpf:error=EIO` on a real map).
    pub(crate) fail_save_service: bool,
}

#[derive(Clone, Default)]
pub(crate) struct FakeBackend(pub(crate) Arc<Mutex<FakeKernel>>);

/// What a broken or full kernel map answers.
pub(crate) fn broken_map() -> BackendError {
    crate::backend::sk_lookup::SkLookupError::Map {
        map: "fake",
        source: aya::maps::MapError::KeyNotFound,
    }
    .into()
}

impl Backend for FakeBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: "fake".into(),
            reason: "unit test".into(),
            state_dir: String::new(),
            program_id: None,
            verified_instructions: None,
            adopted: false,
            capabilities: self.capabilities(),
            unserved: Vec::new(),
        }
    }
    fn capabilities(&self) -> crate::backend::Capabilities {
        crate::backend::Capabilities {
            sockets: crate::backend::SocketSource::Own,
            socket_per_generation: true,
            switch: Support::Yes,
            probe: Support::Yes,
            metrics: Support::Yes,
            prefixes: Support::Yes,
            debug_log: Support::Yes,
        }
    }
    fn load_state(&self) -> Result<PersistedState, BackendError> {
        let k = self.0.lock().unwrap();
        Ok(PersistedState {
            services: k.services.iter().map(|(a, b)| (*a, *b)).collect(),
            bindings: k.bindings.iter().map(|(a, b)| (*a, *b)).collect(),
            generations: k.generations.iter().map(|(&k, &r)| (k, r)).collect(),
            owners: k.owners.iter().map(|(&k, &r)| (k, r)).collect(),
            notes: Vec::new(),
        })
    }
    fn add_binding(&mut self, binding: &Binding, service_id: u32) -> Result<(), BackendError> {
        let mut state = self.0.lock().unwrap();
        if state.fail_bind {
            return Err(broken_map());
        }
        state.bindings.insert(*binding, service_id);
        Ok(())
    }
    fn remove_binding(&mut self, binding: &Binding) -> Result<(), BackendError> {
        self.0.lock().unwrap().bindings.remove(binding);
        Ok(())
    }
    fn activate(
        &mut self,
        service_id: u32,
        protocol: Protocol,
        socket: BorrowedFd<'_>,
    ) -> Result<(), BackendError> {
        if self.0.lock().unwrap().fail_activate {
            return Err(broken_map());
        }
        let cookie = socket_cookie(socket).unwrap();
        self.0
            .lock()
            .unwrap()
            .active
            .insert((service_id, protocol), cookie);
        Ok(())
    }
    fn steered(
        &mut self,
        service_id: u32,
        protocol: Protocol,
    ) -> Result<crate::backend::Steered, BackendError> {
        let k = self.0.lock().unwrap();
        Ok(match k.active.get(&(service_id, protocol)) {
            Some(&cookie) => crate::backend::Steered::Socket(cookie),
            None => crate::backend::Steered::Nothing,
        })
    }
    fn deactivate(&mut self, service_id: u32, protocol: Protocol) -> Result<(), BackendError> {
        self.0
            .lock()
            .unwrap()
            .active
            .remove(&(service_id, protocol));
        Ok(())
    }
    fn metrics(&self, _: u32) -> Result<ServiceMetrics, BackendError> {
        Ok(ServiceMetrics::default())
    }
    fn save_service(
        &mut self,
        id: u32,
        record: &ServiceRecord,
        _: bool,
    ) -> Result<(), BackendError> {
        if self.0.lock().unwrap().fail_save_service {
            return Err(broken_map());
        }
        self.0.lock().unwrap().services.insert(id, *record);
        Ok(())
    }
    fn forget_service(&mut self, id: u32) -> Result<(), BackendError> {
        let mut k = self.0.lock().unwrap();
        k.services.remove(&id);
        k.owners.remove(&id);
        Ok(())
    }
    fn save_owner(&mut self, id: u32, owner: &OwnerRecord) -> Result<(), BackendError> {
        let mut k = self.0.lock().unwrap();
        if owner.has == 0 {
            k.owners.remove(&id);
        } else {
            k.owners.insert(id, *owner);
        }
        Ok(())
    }
    fn save_generation(
        &mut self,
        key: &GenerationKey,
        record: &GenerationRecord,
    ) -> Result<(), BackendError> {
        self.0.lock().unwrap().generations.insert(*key, *record);
        Ok(())
    }
    fn forget_generation(&mut self, key: &GenerationKey) -> Result<(), BackendError> {
        self.0.lock().unwrap().generations.remove(key);
        Ok(())
    }
    fn set_debug_log(&mut self, _: bool) -> Result<(), BackendError> {
        Ok(())
    }
    fn add_probe(
        &mut self,
        _: std::net::SocketAddr,
        _: Protocol,
        _: BorrowedFd<'_>,
    ) -> Result<(), BackendError> {
        Ok(())
    }
    fn remove_probe(&mut self, _: std::net::SocketAddr, _: Protocol) -> Result<(), BackendError> {
        Ok(())
    }
    fn listener(
        &mut self,
        _: u32,
        _: Protocol,
        _: Option<crate::socket::Pidfd>,
    ) -> Result<Option<OwnedFd>, BackendError> {
        Ok(None)
    }
    fn admit(
        &mut self,
        _: u32,
        _: Protocol,
        _: BorrowedFd<'_>,
        _: u64,
    ) -> Result<(), BackendError> {
        Ok(())
    }
}
