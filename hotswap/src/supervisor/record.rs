//! What a supervisor writes down so that the next one — after a crash, a `kill -9`, or its own
//! re-exec — adopts its generations instead of starting over: each generation's keeper and
//! process (pid and start time, so a reused pid is never mistaken for it), its sockets'
//! order in the keeper, its timings, which one is active, and where an upgrade in flight was.
//! `<service>.run.json` beside the control socket, replaced whole on every change (see
//! [`crate::files`]), mode 0600; the supervisor's lock guards it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{spec::FdPassing, GenerationState, ListenSpec, ReadyMode};
use crate::{backend::Capabilities, model::Protocol, PathError};

/// The version of the record this build writes; another is not adopted.
pub(super) const VERSION: u32 = 1;

/// A process as recorded: its pid and when it started (`/proc/PID/stat` field 22).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ProcessId {
    /// Pid.
    pub pid: u32,
    /// Start time in clock ticks since boot.
    pub start_time: u64,
}

/// Where an upgrade is. Every phase names what the supervisor that finds it after a crash must
/// undo or finish.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub(super) enum UpgradePhase {
    /// The new generation's sockets, keeper and registration are being made; `keeper` once it
    /// runs (its registration, if any, is found by its pid). Undone after a crash.
    Preparing {
        /// The new generation's keeper.
        keeper: Option<ProcessId>,
    },
    /// The new generation runs and is not ready yet. Undone after a crash.
    Starting {
        /// The new generation.
        new: u32,
    },
    /// The switch was asked of the daemon and its reply is not in: the kernel may steer to
    /// either. After a crash the daemon's word decides.
    Switching {
        /// The new generation.
        new: u32,
    },
    /// Switched; the new generation's death in the grace period switches back. Finished after
    /// a crash (the old generation is drained).
    Grace {
        /// The new generation.
        new: u32,
    },
    /// The old generation is draining. Finished after a crash.
    Draining {
        /// The new generation.
        new: u32,
    },
}

impl UpgradePhase {
    /// The generation being brought up, once it has an id.
    pub(super) fn new_generation(&self) -> Option<u32> {
        match *self {
            Self::Preparing { .. } => None,
            Self::Starting { new }
            | Self::Switching { new }
            | Self::Grace { new }
            | Self::Draining { new } => Some(new),
        }
    }

    /// The phase's name, as `status` shows it.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Self::Preparing { .. } => "preparing",
            Self::Starting { .. } => "starting",
            Self::Switching { .. } => "switching",
            Self::Grace { .. } => "grace",
            Self::Draining { .. } => "draining",
        }
    }

    /// Whether the new generation's death is the upgrade's to handle (not a restart).
    pub(super) fn protects_new(&self) -> bool {
        matches!(
            self,
            Self::Starting { .. } | Self::Switching { .. } | Self::Grace { .. }
        )
    }
}

/// An upgrade in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct UpgradeRecord {
    /// The generation active when it began.
    pub old: Option<u32>,
    /// Where it is.
    #[serde(flatten)]
    pub phase: UpgradePhase,
}

/// One generation as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SavedGeneration {
    /// Its id.
    pub id: u32,
    /// Its keeper, holding its sockets at 3, 4, … in `protocols` order, then its notify socket.
    pub keeper: ProcessId,
    /// Its current process.
    pub process: Option<ProcessId>,
    /// Its sockets' protocols, in the keeper's order.
    pub protocols: Vec<Protocol>,
    /// `NOTIFY_SOCKET` as its processes got it, when it has a notify socket.
    pub notify: Option<String>,
    /// Its command.
    pub command: Vec<String>,
    /// How it is handed its sockets.
    pub fd_passing: FdPassing,
    /// How its readiness is told.
    pub ready: ReadyMode,
    /// Where it is.
    pub state: GenerationState,
    /// Start time, ms since the Unix epoch.
    pub started_at_ms: u64,
    /// How long it took to get ready.
    pub ready_after_ms: Option<u64>,
    /// When it became active, ms since the Unix epoch.
    pub switched_at_ms: Option<u64>,
    /// Restarts after it died on its own.
    pub restarts: u32,
    /// What the daemon's backend could do when it started.
    pub capabilities: Capabilities,
}

/// A supervisor's whole record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SavedRun {
    /// [`VERSION`].
    pub version: u32,
    /// The supervisor that wrote it.
    pub supervisor: u32,
    /// The service's addresses.
    pub listens: Vec<ListenSpec>,
    /// What the next upgrade runs.
    pub command: Vec<String>,
    /// How the next upgrade hands its sockets over.
    pub fd_passing: FdPassing,
    /// The active generation.
    pub active: Option<u32>,
    /// The upgrade in flight.
    pub upgrade: Option<UpgradeRecord>,
    /// Restarts in total.
    pub restarts: u32,
    /// How upgrades ended, in total.
    #[serde(default)]
    pub upgrades: super::UpgradeCounts,
    /// How long the last upgrade took, in ms.
    #[serde(default)]
    pub last_upgrade_ms: Option<u64>,
    /// Generations that hold sockets.
    pub generations: Vec<SavedGeneration>,
}

/// Reading a supervisor's record failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file could not be read or written.
    #[error(transparent)]
    Io(#[from] PathError),
    /// The file is not one this version reads.
    #[error("the supervisor record {} is unreadable (move it away to start afresh; generations it named keep running unsupervised)", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Another version wrote it.
    #[error("the supervisor record {} is version {found}; this hotswap reads version {VERSION}", path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
}

/// The record beside the control socket `control`.
pub(super) fn path(control: &Path) -> PathBuf {
    control.with_extension("json")
}

/// Reads the record, `None` when there is none.
pub(super) fn load(path: &Path) -> Result<Option<SavedRun>, RecordError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(PathError::at("reading", path)(err).into()),
    };
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let corrupt = |source| RecordError::Corrupt {
        path: path.to_owned(),
        source,
    };
    let versioned: Versioned = serde_json::from_slice(&bytes).map_err(corrupt)?;
    if versioned.version != VERSION {
        return Err(RecordError::Version {
            path: path.to_owned(),
            found: versioned.version,
        });
    }
    Ok(Some(serde_json::from_slice(&bytes).map_err(corrupt)?))
}

/// Replaces the record.
pub(super) fn store(path: &Path, run: &SavedRun) -> Result<(), PathError> {
    let json = serde_json::to_vec_pretty(run).expect("plain data serialises");
    // No fsync: the record must survive the supervisor's crash, which the page cache does;
    // after a host crash its generations are gone anyway.
    crate::files::replace_private(path, &json, false)
}

/// Writes records on a thread of its own, the latest first: the supervisor's runtime never
/// waits for the disk (see [`crate::files`]). A record handed over while one is being written
/// replaces any still waiting.
pub(super) struct Recorder {
    shared: std::sync::Arc<(std::sync::Mutex<Pending>, std::sync::Condvar)>,
}

/// What the writer has to do.
#[derive(Default)]
pub(super) struct Pending {
    next: Option<SavedRun>,
    writing: bool,
}

impl Recorder {
    /// A recorder writing to `path`.
    pub(super) fn new(path: PathBuf) -> Self {
        let shared = std::sync::Arc::new((
            std::sync::Mutex::new(Pending::default()),
            std::sync::Condvar::new(),
        ));
        let writer = std::sync::Arc::clone(&shared);
        std::thread::Builder::new()
            .name("record".into())
            .spawn(move || loop {
                let (slot, wake) = &*writer;
                let run = {
                    let mut pending = slot.lock().unwrap_or_else(|p| p.into_inner());
                    pending.writing = false;
                    loop {
                        if let Some(run) = pending.next.take() {
                            pending.writing = true;
                            break run;
                        }
                        pending = wake.wait(pending).unwrap_or_else(|p| p.into_inner());
                    }
                };
                if let Err(err) = store(&path, &run) {
                    tracing::error!(
                        "writing the record of the generations (a supervisor restarted after a crash could not adopt them): {}",
                        crate::error_chain(&err)
                    );
                }
            })
            .expect("a thread for the record");
        Self { shared }
    }

    /// Hands `run` to the writer.
    pub(super) fn record(&self, run: SavedRun) {
        let (slot, wake) = &*self.shared;
        slot.lock().unwrap_or_else(|p| p.into_inner()).next = Some(run);
        wake.notify_one();
    }

    /// Waits (up to `within`) until every record handed over is written: before a re-exec, and
    /// before the record is removed at a clean stop.
    pub(super) fn flush(&self, within: std::time::Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let busy = {
                let pending = self.shared.0.lock().unwrap_or_else(|p| p.into_inner());
                pending.next.is_some() || pending.writing
            };
            if !busy || std::time::Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// Removes the record (a supervisor that stopped cleanly leaves nothing to adopt).
pub(super) fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SavedRun {
        SavedRun {
            version: VERSION,
            supervisor: 42,
            listens: vec!["tcp://127.0.0.1:8080".parse().unwrap()],
            command: vec!["server".into()],
            fd_passing: FdPassing::Systemd,
            active: Some(3),
            upgrade: Some(UpgradeRecord {
                old: Some(3),
                phase: UpgradePhase::Switching { new: 4 },
            }),
            restarts: 1,
            upgrades: super::super::UpgradeCounts {
                succeeded: 2,
                rolled_back: 1,
                failed: 0,
            },
            last_upgrade_ms: Some(1500),
            generations: vec![SavedGeneration {
                id: 3,
                keeper: ProcessId {
                    pid: 10,
                    start_time: 99,
                },
                process: Some(ProcessId {
                    pid: 11,
                    start_time: 100,
                }),
                protocols: vec![Protocol::Tcp],
                notify: None,
                command: vec!["server".into()],
                fd_passing: FdPassing::Systemd,
                ready: ReadyMode::Tcp,
                state: GenerationState::Active,
                started_at_ms: 1,
                ready_after_ms: Some(2),
                switched_at_ms: Some(3),
                restarts: 0,
                capabilities: Capabilities {
                    sockets: crate::backend::SocketSource::Own,
                    socket_per_generation: true,
                    switch: crate::backend::Support::Yes,
                    probe: crate::backend::Support::Yes,
                    metrics: crate::backend::Support::Yes,
                    prefixes: crate::backend::Support::Yes,
                    debug_log: crate::backend::Support::Yes,
                },
            }],
        }
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("web.run.json");
        assert_eq!(load(&file).unwrap(), None);
        store(&file, &sample()).unwrap();
        assert_eq!(load(&file).unwrap(), Some(sample()));
        remove(&file);
        assert_eq!(load(&file).unwrap(), None);
    }

    #[test]
    fn the_recorder_writes_the_latest_record() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("web.run.json");
        let recorder = Recorder::new(file.clone());
        for restarts in 0..100 {
            let mut run = sample();
            run.restarts = restarts;
            recorder.record(run);
        }
        recorder.flush(std::time::Duration::from_secs(10));
        assert_eq!(load(&file).unwrap().unwrap().restarts, 99);
    }

    #[test]
    fn another_version_or_garbage_is_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("web.run.json");
        std::fs::write(&file, br#"{"version": 99}"#).unwrap();
        let err = load(&file).unwrap_err().to_string();
        assert!(
            err.contains("version 99") && err.contains("web.run.json"),
            "{err}"
        );
        std::fs::write(&file, b"{").unwrap();
        assert!(matches!(load(&file), Err(RecordError::Corrupt { .. })));
    }

    #[test]
    fn phases_say_what_they_protect() {
        assert_eq!(
            UpgradePhase::Preparing { keeper: None }.new_generation(),
            None
        );
        assert!(UpgradePhase::Grace { new: 2 }.protects_new());
        assert!(!UpgradePhase::Draining { new: 2 }.protects_new());
    }
}
