//! What the supervisor's control socket carries: requests, progress, reports.

use super::*;

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal, if one killed it.
    pub signal: Option<i32>,
}

impl ExitInfo {
    /// How a process ended when that is not known (not our child, or not collected).
    pub const UNKNOWN: Self = Self {
        code: None,
        signal: None,
    };
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "code {code}"),
            (None, Some(signal)) => match Signal::try_from(signal) {
                Ok(s) => write!(f, "signal {}", s.as_str()),
                Err(_) => write!(f, "signal {signal}"),
            },
            (None, None) => f.write_str("unknown status"),
        }
    }
}

/// Where a generation is in its life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum GenerationState {
    /// Started, not ready yet.
    Starting,
    /// Ready, not active (a new one before the switch, or an old one after it).
    Ready,
    /// New connections go to it.
    Active,
    /// Told to drain.
    Draining,
    /// Its process is gone and so are its sockets.
    Exited {
        /// How it ended.
        exit: ExitInfo,
    },
    /// It never became ready.
    Failed {
        /// Why.
        reason: String,
    },
}

/// A generation as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationReport {
    /// Daemon generation id.
    pub id: u32,
    /// The current process.
    pub pid: Option<u32>,
    /// Its command.
    pub command: Vec<String>,
    /// Where it is.
    #[serde(flatten)]
    pub state: GenerationState,
    /// Start time, ms since the Unix epoch.
    pub started_at_ms: u64,
    /// How long it took to get ready.
    pub ready_after_ms: Option<u64>,
    /// When it became active, ms since the Unix epoch.
    pub switched_at_ms: Option<u64>,
    /// How long draining took, from the switch away to the exit.
    pub drained_after_ms: Option<u64>,
    /// Restarts after it died on its own.
    pub restarts: u32,
    /// The keeper holding its sockets.
    #[serde(default)]
    pub keeper: Option<u32>,
    /// The latest `STATUS=` it sent to its notify socket.
    #[serde(default)]
    pub notify_status: Option<String>,
    /// It sent `STOPPING=1`.
    #[serde(default)]
    pub notify_stopping: bool,
    /// When it last sent `WATCHDOG=1`, ms since the Unix epoch.
    #[serde(default)]
    pub watchdog_at_ms: Option<u64>,
    /// Established connections it handed over that a later generation adopted (`--handoff`).
    #[serde(default)]
    pub handed_over: u64,
    /// Established connections it adopted from an earlier generation (`--handoff`).
    #[serde(default)]
    pub adopted: u64,
}

/// What a supervisor reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorReport {
    /// The supervisor's pid.
    pub pid: u32,
    /// Listen addresses.
    pub listens: Vec<ListenSpec>,
    /// The active generation.
    pub active: Option<u32>,
    /// The generation an upgrade is bringing up.
    pub upgrading: Option<u32>,
    /// The phase of the upgrade in flight.
    #[serde(default)]
    pub upgrade_phase: Option<String>,
    /// When this supervisor's image started (a re-exec starts a new one), ms since the Unix
    /// epoch.
    #[serde(default)]
    pub started_at_ms: u64,
    /// The binary a re-exec runs.
    #[serde(default)]
    pub binary: String,
    /// Generations this image adopted from the supervisor before it.
    #[serde(default)]
    pub adopted: Vec<u32>,
    /// Generations restarted after dying on their own, in total.
    pub restarts: u32,
    /// How the upgrades this service's supervisors ran ended, in total (kept across re-execs
    /// and crashes in the record).
    #[serde(default)]
    pub upgrades: UpgradeCounts,
    /// How long the last upgrade that ended took, from its start to its end, in ms.
    #[serde(default)]
    pub last_upgrade_ms: Option<u64>,
    /// Established connections handed from one generation to a later one (`--handoff`) since
    /// this supervisor image started.
    #[serde(default)]
    pub handed_over: u64,
    /// Live generations and the last few that exited, oldest first.
    pub generations: Vec<GenerationReport>,
}

/// How upgrades ended. An upgrade refused before it began (another in flight) is none of
/// these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeCounts {
    /// The new generation is active.
    pub succeeded: u64,
    /// The new generation was active, then rolled back (it died in its grace, or the operator
    /// rolled back).
    pub rolled_back: u64,
    /// The new generation never became active (not ready, exited, the switch failed).
    pub failed: u64,
}

impl UpgradeCounts {
    /// Counts one upgrade that ended with `result`.
    pub fn count<T>(&mut self, result: &Result<T, super::SupervisorError>) {
        use super::SupervisorError as E;
        match result {
            Ok(_) => self.succeeded += 1,
            Err(E::RolledBack { .. } | E::RolledBackByOperator(_)) => self.rolled_back += 1,
            Err(_) => self.failed += 1,
        }
    }
}

/// A request to a supervisor.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case")]
pub enum SupervisorRequest {
    /// Start a new generation, switch to it, drain the old one.
    Upgrade {
        /// A new command, or `None` for the current one.
        command: Option<Vec<String>>,
        /// Readiness for this upgrade.
        ready: Option<ReadyMode>,
        /// Readiness timeout for this upgrade, in ms.
        ready_timeout_ms: Option<u64>,
        /// How the new generation (and the ones after) are handed their sockets, or `None`
        /// for the current way.
        #[serde(default)]
        pass_fds: Option<super::spec::FdPassing>,
    },
    /// Switch back to the previous generation.
    Rollback,
    /// Re-execute the supervisor from its binary, keeping every generation.
    Reexec,
    /// Report.
    Status,
}

/// A message from a supervisor.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SupervisorMessage {
    /// A step of a long operation.
    Progress {
        /// What happened.
        line: String,
    },
    /// The end of an operation.
    Done {
        /// Whether it succeeded.
        ok: bool,
        /// The summary or the reason.
        message: String,
        /// Why it failed, for programs to match (absent when it succeeded).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<crate::protocol::ErrorCode>,
    },
    /// A report.
    Status(SupervisorReport),
}
