//! `hotswap upgrade` and `rollback`. An upgrade moves through named phases ([`UpgradePhase`]),
//! each written down before it begins so a successor can finish or undo it after a crash, and
//! every way it can end — not ready, a crash, the daemon gone or silent, a lost reply, a
//! rollback, the supervisor stopping — goes through one exit, [`Supervisor::abandon`], which
//! leaves exactly one active generation and nothing of the new one behind.

use super::*;

impl Supervisor {
    /// `hotswap upgrade`.
    pub(super) async fn upgrade(
        self: &Arc<Self>,
        command: Option<Vec<String>>,
        pass_fds: Option<spec::FdPassing>,
        ready: Option<ReadyMode>,
        ready_timeout: Option<Duration>,
        progress: Progress<'_>,
    ) -> Result<String, SupervisorError> {
        let launch = self.begin_upgrade()?;
        let launch = (command.unwrap_or(launch.0), pass_fds.unwrap_or(launch.1));
        self.run_upgrade(
            launch,
            ready.or(self.config.ready),
            ready_timeout.unwrap_or(self.config.ready_timeout),
            progress,
            Counted::AsUpgrade,
        )
        .await
    }

    /// Claims the one upgrade slot (phase `Preparing`), or says why not. Returns the current
    /// command and fd passing.
    pub(super) fn begin_upgrade(&self) -> Result<(Vec<String>, spec::FdPassing), SupervisorError> {
        let launch = {
            let mut state = self.lock();
            self.check_idle(&state)?;
            state.upgrade = Some(UpgradeRecord {
                old: state.active,
                phase: UpgradePhase::Preparing { keeper: None },
            });
            (state.command.clone(), state.fd_passing)
        };
        self.save();
        Ok(launch)
    }

    /// Runs the claimed upgrade to its end, whatever it is, and frees the slot; `counted` says
    /// whether it goes into the upgrade counts.
    pub(super) async fn run_upgrade(
        self: &Arc<Self>,
        launch: (Vec<String>, spec::FdPassing),
        ready: Option<ReadyMode>,
        ready_timeout: Duration,
        progress: Progress<'_>,
        counted: Counted,
    ) -> Result<String, SupervisorError> {
        let started = Instant::now();
        let result = self
            .upgrade_steps(launch, ready, ready_timeout, progress)
            .await;
        if let Err(err) = &result {
            self.abandon(err, progress).await;
        }
        {
            let mut state = self.lock();
            state.upgrade = None;
            // Generation 1's start is not an upgrade to count.
            if counted == Counted::AsUpgrade {
                state.upgrades.count(&result);
                state.last_upgrade = Some(started.elapsed());
            }
        }
        self.save();
        result
    }

    /// The one way out of a failed upgrade: by its phase, whatever the new generation has
    /// become is undone, so the generation active before stays the only active one.
    async fn abandon(self: &Arc<Self>, err: &SupervisorError, progress: Progress<'_>) {
        let Some(upgrade) = self.lock().upgrade else {
            return;
        };
        let reason = match err {
            SupervisorError::NotReady { timeout, .. } => {
                format!("not ready after {}", humantime::format_duration(*timeout))
            }
            SupervisorError::ExitedBeforeReady { exit, .. } => {
                format!("exited ({exit}) before ready")
            }
            other => error_chain(other),
        };
        match upgrade.phase {
            // start_generation undid what it had made.
            UpgradePhase::Preparing { .. } => {}
            UpgradePhase::Starting { new } | UpgradePhase::Switching { new } => {
                if self.lock().active == Some(new) {
                    // The switch landed (the daemon said so after all): keep it.
                    return;
                }
                self.kill_and_wait(new, Signal::SIGKILL, KILL_WAIT).await;
                self.retire_async(new, GenerationState::Failed { reason })
                    .await;
            }
            UpgradePhase::Grace { new } => {
                // Rolled back, by its death or by the operator: it drains like any old
                // generation (what it accepted is served). Where the switch back failed it
                // stays active, and is restarted if it died.
                if self.lock().active != Some(new) {
                    self.drain(new, progress).await;
                }
            }
            // The new generation is active; what failed came after.
            UpgradePhase::Draining { .. } => {}
        }
    }

    async fn upgrade_steps(
        self: &Arc<Self>,
        launch: (Vec<String>, spec::FdPassing),
        ready: Option<ReadyMode>,
        ready_timeout: Duration,
        progress: Progress<'_>,
    ) -> Result<String, SupervisorError> {
        let old = self.lock().active;
        let new = self.start_generation(launch.clone(), ready).await?;
        let pid = self.lock().generations.get(&new).and_then(Generation::pid);
        progress(format!(
            "generation {new} started (pid {})",
            pid.map_or("?".into(), |p| p.to_string())
        ));
        let after = self.wait_ready(new, ready_timeout).await?;
        if self.lock().stopping {
            // Do not switch to a generation the supervisor is about to drain.
            return Err(SupervisorError::Stopping);
        }
        progress(format!(
            "generation {new} ready after {} ms",
            after.as_millis()
        ));
        self.check_uses_its_sockets(new, old)?;
        self.set_phase(UpgradePhase::Switching { new });
        if let Err(err) = self.switch_to(new).await {
            // The reply may be what was lost: the daemon's word decides.
            if self.daemon_active().await != Some(new) {
                return Err(err);
            }
            self.mark_active(new);
            progress(format!(
                "the daemon's reply to the switch was lost ({}); it says generation {new} is active",
                error_chain(&err)
            ));
        }
        self.set_phase(UpgradePhase::Grace { new });
        match old {
            Some(old) => progress(format!("switched {old} -> {new}")),
            None => progress(format!("switched to {new}")),
        }
        {
            let mut state = self.lock();
            state.command = launch.0;
            state.fd_passing = launch.1;
        }
        let Some(old) = old else {
            return Ok(format!("generation {new} is active"));
        };

        // Grace: if the new generation dies now while the old one can still serve, go back.
        let mut exit = self.lock().generations[&new].exit.clone();
        let switched = Instant::now();
        let died = tokio::select! {
            exit = tokio::time::timeout(self.config.grace, exit.wait_for(Option::is_some)) => match exit {
                Ok(Ok(exit)) => Some(exit.unwrap_or(ExitInfo::UNKNOWN)),
                _ => None,
            },
            // Stopping: the new generation stays active; stopping drains them all.
            () = self.stop.cancelled() => return Ok(format!("generation {new} is active")),
        };
        if let Some(exit) = died {
            let old_alive = self
                .lock()
                .generations
                .get(&old)
                .is_some_and(|g| g.alive() && !g.sockets.is_empty());
            if old_alive && self.lock().active == Some(new) {
                self.switch_to(old).await?;
                progress(format!("generation {new} exited ({exit}) within the grace period; switched back to {old}"));
                return Err(SupervisorError::RolledBack {
                    generation: new,
                    exit,
                    after: switched.elapsed(),
                    back: old,
                });
            }
        }
        if self.lock().active != Some(new) {
            // The operator rolled back meanwhile: the new one goes.
            let back = self.lock().active.unwrap_or(old);
            return Err(SupervisorError::RolledBackByOperator(back));
        }
        // Past the grace period, the new generation is like any other: if it dies now it is
        // restarted.
        self.set_phase(UpgradePhase::Draining { new });
        // A death in the grace period that did not roll back (the old generation was gone):
        // hand it to the restart logic now.
        let dead_serial = match self.lock().generations.get(&new) {
            Some(g) if !g.alive() => Some(g.serial),
            _ => None,
        };
        if let (Some(exit), Some(serial)) = (died, dead_serial) {
            self.on_exit(new, serial, exit);
        }
        self.drain(old, progress).await;
        // An old generation that shut its listener down on the way out may have shut down the
        // new one's too (a shared socket): never report success over a dead socket.
        if self.ensure_listening(new).await? {
            progress(format!(
                "generation {new}: its socket had been shut down (by the old generation, which shares it); it listens again"
            ));
        }
        Ok(format!("generation {new} is active"))
    }

    /// Which of this service's generations the daemon steers to, if it can say (within its
    /// deadline) and its backend switches.
    pub(super) async fn daemon_active(&self) -> Option<u32> {
        let (capabilities, service) = self.daemon_view().await?;
        if !capabilities.switch.yes() {
            return None;
        }
        service
            .generations
            .into_iter()
            .find(|g| g.active)
            .map(|g| g.id)
    }

    /// What the daemon says of this service, with what its backend can do, if it answers.
    pub(super) async fn daemon_view(
        &self,
    ) -> Option<(Capabilities, crate::registry::ServiceStatus)> {
        let Ok(Reply::Status(status)) = self.daemon(Request::Status).await else {
            return None;
        };
        let service = status
            .services
            .into_iter()
            .find(|s| s.name == self.config.service)?;
        Some((status.backend.capabilities, service))
    }

    /// `hotswap rollback`.
    pub(super) async fn rollback(
        self: &Arc<Self>,
        progress: Progress<'_>,
    ) -> Result<String, SupervisorError> {
        let (active, previous) = {
            let state = self.lock();
            (state.active, state.previous)
        };
        let cannot = |why: String| SupervisorError::CannotRollBack {
            service: self.config.service.clone(),
            why,
        };
        let retired = self.lock().last_retired_previous;
        let previous = previous.ok_or_else(|| match retired {
            Some((id, when)) => cannot(format!(
                "generation {id} was drained and exited {:.0} s ago (rollback works until the old generation is drained, i.e. within --grace after an upgrade)",
                when.elapsed().as_secs_f64()
            )),
            None => cannot("there is no previous generation".into()),
        })?;
        {
            let state = self.lock();
            let g = state.generations.get(&previous);
            match g.map(|g| (&g.state, g.alive() && !g.sockets.is_empty())) {
                Some((GenerationState::Ready, true)) => {}
                Some((GenerationState::Draining, _)) => {
                    return Err(cannot(format!("generation {previous} is draining already")))
                }
                _ => return Err(cannot(format!("generation {previous} has exited"))),
            }
        }
        self.switch_to(previous).await?;
        progress(format!(
            "switched {} -> {previous}",
            active.map_or("-".into(), |a| a.to_string())
        ));
        Ok(format!("generation {previous} is active"))
    }
}

/// Whether a run of [`Supervisor::run_upgrade`] is an upgrade, for the counts the metrics
/// endpoint shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Counted {
    /// An upgrade asked for (`hotswap upgrade`).
    AsUpgrade,
    /// Generation 1's start: it replaces nothing.
    FirstStart,
}
