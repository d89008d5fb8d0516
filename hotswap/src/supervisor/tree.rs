//! A generation is its whole process tree: killing it, looking at what it holds, reaping
//! the orphans the supervisor inherits.

use super::*;

impl Supervisor {
    /// Sends `signal` to `id`'s process and waits up to `timeout` for it to exit.
    pub(super) async fn kill_and_wait(
        &self,
        id: u32,
        signal: Signal,
        timeout: Duration,
    ) -> Option<ExitInfo> {
        let (pid, mut exit) = {
            let state = self.lock();
            let g = state.generations.get(&id)?;
            (g.pid(), g.exit.clone())
        };
        if exit.borrow().is_none() {
            if let Some(pid) = pid {
                if signal == Signal::SIGKILL {
                    // Killing a generation ends its whole tree, not only its main process.
                    end_tree(pid);
                } else {
                    // The drain signal goes to the main process, which tells its workers.
                    let _ = kill(Pid::from_raw(pid as i32), signal);
                }
            }
        }
        tokio::time::timeout(timeout, exit.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|e| *e))
    }

    /// Refuses a generation whose processes do not serve from the sockets they were given:
    /// none of them holds a socket any more, or one listens on a service address with a socket
    /// of its own (see `inspect`). A backend's shared socket is everyone's: nothing to check.
    pub(super) fn check_uses_its_sockets(
        &self,
        id: u32,
        kept: Option<u32>,
    ) -> Result<(), SupervisorError> {
        let (pid, own) = {
            let state = self.lock();
            let Some(g) = state.generations.get(&id) else {
                return Ok(());
            };
            if !g.capabilities.socket_per_generation {
                return Ok(());
            }
            let own: Vec<(Protocol, u64, Option<SocketAddr>)> = g
                .sockets
                .iter()
                .filter_map(|(p, fd)| {
                    let inode = crate::socket::inode(fd.as_fd()).ok()?;
                    Some((*p, inode, crate::socket::local_addr(fd.as_fd())))
                })
                .collect();
            (g.pid(), own)
        };
        let Some(pid) = pid else {
            return Ok(());
        };
        let tree = match inspect::tree_sockets(pid) {
            Ok(tree) => tree,
            Err(err) => {
                tracing::warn!("cannot look at generation {id}'s sockets: {err}");
                return Ok(());
            }
        };
        // The more telling finding first: a socket of its own explains why it dropped ours.
        for (inode, (holder, protocol, addr)) in &tree.bound {
            let ours = own.iter().any(|(_, own, _)| own == inode);
            let on_service_address = self
                .config
                .listens
                .iter()
                .any(|l| l.protocol == *protocol && inspect::covers(*addr, l.addr));
            if !ours && on_service_address {
                return Err(SupervisorError::OwnSocket {
                    generation: id,
                    pid: *holder,
                    protocol: *protocol,
                    addr: *addr,
                    kept,
                });
            }
        }
        for (protocol, inode, addr) in &own {
            if !tree.held.contains(inode) {
                return Err(SupervisorError::NotUsingSocket {
                    generation: id,
                    protocol: *protocol,
                    addr: addr.map_or_else(|| "its address".to_owned(), |a| a.to_string()),
                    kept,
                });
            }
        }
        Ok(())
    }

    /// Collects the exit of every child that is not a generation's main process (whose exit
    /// tokio collects): orphans reparented to the supervisor as subreaper. Under the state lock,
    /// so a generation being spawned is recorded before its exit can be looked at.
    pub(super) fn reap_orphans(&self) {
        use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
        let state = self.lock();
        loop {
            // Look without reaping: the first exited child might be a generation's.
            let peek = waitid(
                Id::All,
                WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
            );
            let pid = match peek {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => match status.pid() {
                    Some(pid) => pid,
                    None => return,
                },
            };
            let ours = state
                .generations
                .values()
                .any(|g| g.pid() == Some(pid.as_raw() as u32));
            if ours {
                return;
            }
            let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
        }
    }
}

/// Waits until the process behind `pidfd` exits (its pidfd polls readable), and collects its
/// exit status where it is this process's child — one it started, or started before a re-exec.
/// A generation adopted after a crash is someone else's child: its status is unknown.
///
/// `pid`'s process group is ended before the exit is collected: until then the zombie keeps
/// the pid, so `killpg` cannot reach a process that reused it (a new keeper or generation
/// leads a group with its own pid).
pub(super) async fn wait_exit(pidfd: crate::socket::Pidfd, pid: u32) -> ExitInfo {
    use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
    // SAFETY: the pidfd lives as long as the AsyncFd that owns it.
    let watched = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    };
    let Ok(watched) = watched else {
        // The runtime cannot watch it: look every 50 ms instead (exit status unknown).
        if let Ok(polled) = crate::socket::Pidfd::open(pid) {
            while !polled.has_exited() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        end_tree(pid);
        return ExitInfo::UNKNOWN;
    };
    if let Ok(mut guard) = watched.readable().await {
        guard.retain_ready();
    }
    // Whatever the main process left behind in its group (workers that outlived it) is part
    // of a generation that has ended.
    end_tree(pid);
    match waitid(
        Id::PIDFd(watched.get_ref().as_fd()),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
    ) {
        Ok(WaitStatus::Exited(_, code)) => ExitInfo {
            code: Some(code),
            signal: None,
        },
        Ok(WaitStatus::Signaled(_, signal, _)) => ExitInfo {
            code: None,
            signal: Some(signal as i32),
        },
        _ => ExitInfo::UNKNOWN,
    }
}

/// Kills every process in the process group `pid` leads (a generation's tree; see
/// `process::spawn_activated`). Nothing to do when the group is gone.
pub(super) fn end_tree(pid: u32) {
    let _ = nix::sys::signal::killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
}

/// Makes this process the reaper of its descendants' orphans (`PR_SET_CHILD_SUBREAPER`): a
/// worker whose parent exits comes back to the supervisor instead of init, so it is still in
/// reach, and [`Supervisor::reap_orphans`] collects its exit.
pub(super) fn become_subreaper() -> io::Result<()> {
    // SAFETY: a prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
