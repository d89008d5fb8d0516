//! The supervisor upgrades itself in place: it writes its record down and `execve`s the
//! hotswap binary at the path it was started from — a new build there, if one was installed.
//! The pid stays (systemd's main pid, every generation's parent), the lock is handed on, and the
//! new image adopts the generations from the record as after a crash, except that they are
//! still its children, so their exit statuses are known. Nothing a generation holds depends on
//! the supervisor's image: the keepers hold the sockets.

use std::{
    convert::Infallible,
    ffi::{CString, OsString},
    fs::File,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, RawFd},
        unix::ffi::OsStrExt as _,
    },
};

use super::*;

/// What a re-exec runs.
pub(super) struct ExecPlan {
    /// The binary's path, as this image was started from.
    binary: PathBuf,
    /// This image's arguments, which the next one gets too.
    args: Vec<OsString>,
    /// The supervisor's lock, handed on across the exec.
    lock_fd: RawFd,
}

impl ExecPlan {
    /// The plan for this process, holding its lock at `lock_fd`.
    pub(super) fn new(lock_fd: RawFd) -> Self {
        Self {
            // Read at start: once the file is replaced, /proc/self/exe names a deleted one.
            binary: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
            args: std::env::args_os().collect(),
            lock_fd,
        }
    }

    /// The binary a re-exec runs.
    pub(super) fn binary(&self) -> &Path {
        &self.binary
    }
}

fn cstring(bytes: &[u8]) -> Result<CString, SupervisorError> {
    CString::new(bytes).map_err(|_| SupervisorError::Spawn(SpawnError::Nul))
}

impl Supervisor {
    /// Replaces this process's image with the binary at its path. Refused while an upgrade is
    /// in flight (its phases belong to this image) or while stopping. Returns only on failure,
    /// and then nothing has changed.
    pub(super) fn reexec(&self) -> Result<Infallible, SupervisorError> {
        self.check_reexec()?;
        self.save();
        // The new image reads it: it must be written, whatever the disk.
        self.recorder.flush(Duration::from_secs(30));
        let plan = &self.exec;
        let argv = plan
            .args
            .iter()
            .map(|a| cstring(a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut env = Vec::new();
        for (key, value) in std::env::vars_os() {
            if key != LOCK_FD_VARIABLE {
                let mut entry = key.as_bytes().to_vec();
                entry.push(b'=');
                entry.extend_from_slice(value.as_bytes());
                env.push(cstring(&entry)?);
            }
        }
        env.push(cstring(
            format!("{LOCK_FD_VARIABLE}={}", plan.lock_fd).as_bytes(),
        )?);
        let binary = cstring(plan.binary.as_os_str().as_bytes())?;
        tracing::info!(
            "re-executing {} (pid {}); the generations keep running",
            plan.binary.display(),
            std::process::id()
        );
        // systemd (Type=notify) is told a reload is under way; the new image says READY=1.
        let monotonic = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
            .unwrap_or(0);
        let _ = crate::activation::notify(&format!("RELOADING=1\nMONOTONIC_USEC={monotonic}"));
        set_cloexec(plan.lock_fd, false);
        // Held back across the exec (the mask survives it, the handlers do not): the new image
        // takes them once its handlers are in place (see `accept_stop_signals`).
        let _ = nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_BLOCK,
            Some(&stop_signals()),
            None,
        );
        let err = nix::unistd::execve(&binary, &argv, &env).unwrap_err();
        accept_stop_signals();
        set_cloexec(plan.lock_fd, true);
        let _ = crate::activation::notify("READY=1");
        Err(SupervisorError::Reexec {
            binary: plan.binary.clone(),
            source: err.into(),
        })
    }

    /// Why a re-exec cannot happen now, if it cannot.
    pub(super) fn check_reexec(&self) -> Result<(), SupervisorError> {
        self.check_idle(&self.lock())
    }

    /// Refuses what needs the supervisor idle (an upgrade, a re-exec) while it stops or
    /// upgrades.
    pub(super) fn check_idle(&self, state: &State) -> Result<(), SupervisorError> {
        if state.stopping {
            return Err(SupervisorError::Stopping);
        }
        match state.upgrade {
            Some(upgrade) => Err(SupervisorError::UpgradeInProgress {
                service: self.config.service.clone(),
                phase: upgrade.phase.name(),
            }),
            None => Ok(()),
        }
    }
}

/// The signals that stop or re-exec a supervisor.
fn stop_signals() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(signal);
    }
    set
}

/// Lets the stop signals in: a supervisor calls it once its handlers are installed, so that one
/// sent during a re-exec, held back until then, reaches them instead of killing it.
pub fn accept_stop_signals() {
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_UNBLOCK,
        Some(&stop_signals()),
        None,
    );
}

fn set_cloexec(fd: RawFd, on: bool) {
    let flags = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD on an fd this process owns.
    unsafe { libc::fcntl(fd, libc::F_SETFD, flags) };
}

/// Takes the lock that makes this the service's one supervisor: the one the image before this
/// one handed on (its fd in [`LOCK_FD_VARIABLE`], checked to be this very lock file), or a new
/// one.
pub(super) fn take_lock(
    lock_path: &Path,
    service: &ServiceName,
) -> Result<Flock<File>, SupervisorError> {
    use std::os::unix::fs::MetadataExt as _;
    let handed_on = std::env::var(LOCK_FD_VARIABLE)
        .ok()
        .and_then(|fd| fd.parse::<RawFd>().ok())
        .filter(|&fd| {
            let Ok(path) = std::fs::metadata(lock_path) else {
                return false;
            };
            let Ok(held) = nix::sys::stat::fstat(fd) else {
                return false;
            };
            held.st_dev == path.dev() && held.st_ino == path.ino()
        });
    let file = match handed_on {
        Some(fd) => {
            set_cloexec(fd, true);
            // SAFETY: the image before this one left this fd open for us, and it is the lock
            // file (same device and inode); nothing else in this process owns it.
            unsafe { File::from_raw_fd(fd) }
        }
        None => crate::files::open_lock_file(lock_path)?,
    };
    // Locking an open file description that holds the lock already succeeds.
    let lock = crate::files::lock_exclusive(file, lock_path).map_err(|err| match err {
        crate::files::LockError::Held { holder, .. } => SupervisorError::AlreadyRunning {
            service: service.clone(),
            holder,
        },
        crate::files::LockError::Failed(err) => err.into(),
    })?;
    debug_assert!(lock.as_raw_fd() >= 0);
    Ok(lock)
}
