//! A keeper holds what a generation needs to outlive its supervisor: its sockets, and its
//! notify socket. It is a process that does nothing else (`hotswap keep`, asleep in `pause()`),
//! in a session of its own, so neither a crash nor a `kill -9` nor a re-exec of `hotswap run`
//! closes them. The daemon's registration names the keeper as the sockets' owner, so it lasts
//! as long as the keeper; the next supervisor takes its copies back with `pidfd_getfd`.

use std::os::fd::{AsRawFd as _, BorrowedFd, OwnedFd, RawFd};

use super::{process, SpawnError, SupervisorError};
use crate::socket::{Pidfd, SocketError};

/// Where a keeper holds its first fd (then 4, 5, …).
const FIRST_FD: RawFd = 3;

/// A running keeper.
#[derive(Debug)]
pub(super) struct Keeper {
    pid: u32,
    /// Pins the pid: a signal or `pidfd_getfd` never reaches a process that reused it.
    pidfd: Pidfd,
    /// When it started (`/proc/PID/stat`), to recognise it after a supervisor restart.
    start_time: u64,
}

impl Keeper {
    /// Starts a keeper holding `fds` (in this order) for generation `generation` of `service`.
    pub(super) fn start(
        fds: &[BorrowedFd<'_>],
        service: &str,
        generation: u32,
    ) -> Result<Self, SupervisorError> {
        let child = process::spawn_keeper(fds, service, generation)?;
        let pid = child.id();
        // Our unreaped child: its pid cannot be reused before the pidfd pins it.
        let pidfd = Pidfd::open(pid).map_err(|err| {
            SupervisorError::Spawn(SpawnError::Spawn {
                program: "hotswap keep".into(),
                source: std::io::Error::other(err),
            })
        })?;
        let start_time = super::inspect::start_time(pid).unwrap_or(0);
        Ok(Self {
            pid,
            pidfd,
            start_time,
        })
    }

    /// The keeper that a record names, if it still runs (same pid, same start time).
    pub(super) fn find(pid: u32, start_time: u64) -> Option<Self> {
        let pidfd = Pidfd::open(pid).ok()?;
        // Checked after the pidfd pins it: a process that reused the pid fails here.
        (super::inspect::start_time(pid)? == start_time).then_some(Self {
            pid,
            pidfd,
            start_time,
        })
    }

    /// Its pid.
    pub(super) fn pid(&self) -> u32 {
        self.pid
    }

    /// When it started.
    pub(super) fn start_time(&self) -> u64 {
        self.start_time
    }

    /// Where it holds its `index`th fd.
    pub(super) fn fd_number(index: usize) -> RawFd {
        FIRST_FD + index as RawFd
    }

    /// A copy of its `index`th fd.
    pub(super) fn take(&self, index: usize) -> Result<OwnedFd, SocketError> {
        self.pidfd.get_fd(self.pid, Self::fd_number(index))
    }

    /// Whether it has exited.
    pub(super) fn gone(&self) -> bool {
        self.pidfd.has_exited()
    }

    /// Ends it: the sockets it held close unless someone else holds them too.
    pub(super) fn end(&self) {
        // SAFETY: pidfd_send_signal on a pidfd we own; no siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
    }
}

/// `hotswap keep`: holds the fds it was started with until it is killed. Signals from a
/// terminal or a reload never reach it (its own session); SIGTERM and SIGKILL end it.
pub fn keep() -> ! {
    // SAFETY: setting dispositions to SIG_IGN and sleeping.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        loop {
            libc::pause();
        }
    }
}
