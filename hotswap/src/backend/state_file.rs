//! What the backends without bpffs (uds, reuseport) remember across daemon restarts: services
//! and generations as the sk_lookup backend keeps them in its maps, plus each backend's own
//! binding records, in one JSON file beside the control socket. Every change writes a new file
//! and renames it over the old one, so a crash leaves one or the other whole; a change whose
//! file cannot be written is undone in memory too, so memory always mirrors the file.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use hotswap_common::{GenerationKey, GenerationRecord, OwnerRecord, ServiceRecord, MAX_LABEL};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::PathError;

/// Reading or writing a backend's state file failed.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The file could not be read or written.
    #[error(transparent)]
    Io(#[from] PathError),
    /// The file is not what this version writes.
    #[error("the state file {} is unreadable (move it away to start empty)", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// The file's contents; `B` is the backend's record of a binding.
#[derive(Serialize, Deserialize)]
#[serde(bound(serialize = "B: Serialize", deserialize = "B: DeserializeOwned"))]
pub(super) struct StateFile<B> {
    services: Vec<SavedService>,
    pub(super) bindings: Vec<B>,
    generations: Vec<SavedGeneration>,
}

impl<B> Default for StateFile<B> {
    fn default() -> Self {
        Self {
            services: Vec::new(),
            bindings: Vec::new(),
            generations: Vec::new(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct SavedService {
    id: u32,
    name: String,
    next_generation: u32,
    active_tcp: u32,
    active_udp: u32,
    /// Absent in files written before services had owners: root's alone.
    #[serde(default, skip_serializing_if = "crate::access::Owner::is_none")]
    owner: crate::access::Owner,
}

#[derive(Serialize, Deserialize)]
struct SavedGeneration {
    service_id: u32,
    generation: u32,
    pid: u32,
    fds: [i32; 2],
    cookies: [u64; 2],
    registered_at: u64,
    label: String,
}

/// Services and generations, as the registry saves them through the backend.
#[derive(Default)]
pub(super) struct Records {
    pub(super) services: BTreeMap<u32, ServiceRecord>,
    pub(super) generations: BTreeMap<GenerationKey, GenerationRecord>,
    /// Owners of services that have one.
    pub(super) owners: BTreeMap<u32, OwnerRecord>,
}

impl Records {
    /// The records a state file holds, and its binding records.
    pub(super) fn from_file<B>(file: StateFile<B>) -> (Self, Vec<B>) {
        let records = Self {
            services: file
                .services
                .iter()
                .map(|s| {
                    let record = ServiceRecord::new(
                        s.name.as_bytes(),
                        s.next_generation,
                        s.active_tcp,
                        s.active_udp,
                    );
                    (s.id, record)
                })
                .collect(),
            generations: file
                .generations
                .iter()
                .map(|g| {
                    let mut record = GenerationRecord {
                        cookies: g.cookies,
                        registered_at: g.registered_at,
                        pid: g.pid,
                        fds: g.fds,
                        label_len: 0,
                        pad: [0; 3],
                        label: [0; MAX_LABEL],
                    };
                    record.set_label(g.label.as_bytes());
                    let key = GenerationKey {
                        service_id: g.service_id,
                        generation: g.generation,
                    };
                    (key, record)
                })
                .collect(),
            owners: file
                .services
                .iter()
                .filter(|s| !s.owner.is_none())
                .map(|s| (s.id, OwnerRecord::from(s.owner)))
                .collect(),
        };
        (records, file.bindings)
    }

    /// A state file of these records and `bindings`.
    pub(super) fn to_file<B>(&self, bindings: Vec<B>) -> StateFile<B> {
        StateFile {
            services: self
                .services
                .iter()
                .map(|(&id, record)| SavedService {
                    id,
                    name: String::from_utf8_lossy(record.name_bytes()).into_owned(),
                    next_generation: record.next_generation,
                    active_tcp: record.active_tcp,
                    active_udp: record.active_udp,
                    owner: self
                        .owners
                        .get(&id)
                        .map(|&owner| crate::access::Owner::from(owner))
                        .unwrap_or_default(),
                })
                .collect(),
            bindings,
            generations: self
                .generations
                .iter()
                .map(|(key, record)| SavedGeneration {
                    service_id: key.service_id,
                    generation: key.generation,
                    pid: record.pid,
                    fds: record.fds,
                    cookies: record.cookies,
                    registered_at: record.registered_at,
                    label: String::from_utf8_lossy(record.label_bytes()).into_owned(),
                })
                .collect(),
        }
    }

    /// Generations of `service_id`.
    pub(super) fn generations_of(
        &self,
        service_id: u32,
    ) -> impl Iterator<Item = &GenerationRecord> + '_ {
        self.generations
            .iter()
            .filter(move |(key, _)| key.service_id == service_id)
            .map(|(_, record)| record)
    }
}

/// The file at `path`, or an empty one when there is none.
pub(super) fn load<B: DeserializeOwned>(path: &Path) -> Result<StateFile<B>, StateFileError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateFileError::Corrupt {
            path: path.to_owned(),
            source,
        }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(StateFile::default()),
        Err(err) => Err(PathError::at("reading", path)(err).into()),
    }
}

/// Writes `file` to `path`: a new file only its owner can read, renamed over the old one.
pub(super) fn store<B: Serialize>(path: &Path, file: &StateFile<B>) -> Result<(), StateFileError> {
    let json = serde_json::to_vec_pretty(file).expect("plain data serialises");
    Ok(crate::files::replace_private(path, &json, true)?)
}

/// A backend whose state lives in a state file.
pub(super) trait FileBacked {
    /// Writes the whole state.
    fn save(&self) -> Result<(), StateFileError>;

    /// Applies `change` and saves; when saving fails, `undo` reverts the change, so memory
    /// always mirrors the file (as the sk_lookup backend's maps keep their old contents when a
    /// write fails).
    fn saved<T>(
        &mut self,
        change: impl FnOnce(&mut Self) -> T,
        undo: impl FnOnce(&mut Self, T),
    ) -> Result<(), StateFileError>
    where
        Self: Sized,
    {
        let undo_with = change(self);
        if let Err(err) = self.save() {
            undo(self, undo_with);
            return Err(err);
        }
        Ok(())
    }

    /// The records the registry saves through the backend.
    fn records(&mut self) -> &mut Records;

    /// Creates or updates a service's record, saved.
    fn save_service_record(
        &mut self,
        service_id: u32,
        record: &ServiceRecord,
    ) -> Result<(), StateFileError>
    where
        Self: Sized,
    {
        let record = *record;
        self.saved(
            |s| s.records().services.insert(service_id, record),
            |s, before| restore(&mut s.records().services, service_id, before),
        )
    }

    /// Forgets a service's record and its owner, saved.
    fn forget_service_record(&mut self, service_id: u32) -> Result<(), StateFileError>
    where
        Self: Sized,
    {
        self.saved(
            |s| {
                let records = s.records();
                (
                    records.services.remove(&service_id),
                    records.owners.remove(&service_id),
                )
            },
            |s, (service, owner)| {
                restore(&mut s.records().services, service_id, service);
                restore(&mut s.records().owners, service_id, owner);
            },
        )
    }

    /// Sets or (with nothing set) removes a service's owner, saved.
    fn save_owner_record(
        &mut self,
        service_id: u32,
        owner: &OwnerRecord,
    ) -> Result<(), StateFileError>
    where
        Self: Sized,
    {
        let owner = (owner.has != 0).then_some(*owner);
        self.saved(
            |s| match owner {
                Some(owner) => s.records().owners.insert(service_id, owner),
                None => s.records().owners.remove(&service_id),
            },
            |s, before| restore(&mut s.records().owners, service_id, before),
        )
    }

    /// Creates or updates a generation's record, saved.
    fn save_generation_record(
        &mut self,
        key: &GenerationKey,
        record: &GenerationRecord,
    ) -> Result<(), StateFileError>
    where
        Self: Sized,
    {
        let (key, record) = (*key, *record);
        self.saved(
            |s| s.records().generations.insert(key, record),
            |s, before| restore(&mut s.records().generations, key, before),
        )
    }

    /// Forgets a generation's record, saved.
    fn forget_generation_record(&mut self, key: &GenerationKey) -> Result<(), StateFileError>
    where
        Self: Sized,
    {
        let key = *key;
        self.saved(
            |s| s.records().generations.remove(&key),
            |s, before| restore(&mut s.records().generations, key, before),
        )
    }
}

/// Puts `before` back under `key` (or removes `key` when there was nothing).
pub(super) fn restore<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, before: Option<V>) {
    match before {
        Some(value) => map.insert(key, value),
        None => map.remove(&key),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file written before services had owners is read with every service root's, and an
    /// owner set since is written and read back.
    #[test]
    fn files_from_before_owners_are_read_and_owners_round_trip() {
        let before = br#"{"services":[{"id":1,"name":"web","next_generation":2,"active_tcp":1,"active_udp":0}],"bindings":[],"generations":[]}"#;
        let file: StateFile<()> = serde_json::from_slice(before).unwrap();
        let (mut records, _) = Records::from_file(file);
        assert_eq!(records.services[&1].name_bytes(), b"web");
        assert!(records.owners.is_empty());
        let owner = crate::access::Owner {
            uid: None,
            gid: Some(64000),
        };
        records.owners.insert(1, owner.into());
        let json = serde_json::to_vec(&records.to_file::<()>(Vec::new())).unwrap();
        let (read, _) = Records::from_file(serde_json::from_slice::<StateFile<()>>(&json).unwrap());
        assert_eq!(crate::access::Owner::from(read.owners[&1]), owner);
    }
}
