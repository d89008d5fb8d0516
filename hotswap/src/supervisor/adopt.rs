//! A supervisor that finds a record (see `record`) adopts what it names instead of starting
//! over: after a crash or `kill -9` of the one before, or after its own re-exec. Each
//! generation whose keeper still runs is taken back — its sockets from the keeper, its process
//! if it still runs (else, if it is the active one, it is restarted on its sockets at once) —
//! and an upgrade that was in flight is finished or undone by its phase, the daemon's word
//! deciding which generation is active where the backend switches. Generations that are not
//! active drain as after any upgrade.

use super::*;

fn system_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl Supervisor {
    /// Adopts the record's generations. Returns whether an active generation was adopted
    /// (otherwise the service starts afresh, and whatever was adopted drains).
    pub(super) async fn adopt(
        self: &Arc<Self>,
        saved: record::SavedRun,
        log: Progress<'_>,
    ) -> Result<bool, SupervisorError> {
        if saved.listens != self.config.listens {
            return Err(SupervisorError::ListensDiffer {
                service: self.config.service.clone(),
                recorded: saved.listens,
            });
        }
        log(format!(
            "adopting service {} from the supervisor before (pid {})",
            self.config.service, saved.supervisor
        ));
        for generation in &saved.generations {
            self.adopt_generation(generation, log);
        }
        {
            let mut state = self.lock();
            state.command = saved.command.clone();
            state.fd_passing = saved.fd_passing;
            state.restarts = saved.restarts;
            state.upgrades = saved.upgrades;
            state.last_upgrade = saved.last_upgrade_ms.map(Duration::from_millis);
            state.active = saved.active.filter(|id| state.generations.contains_key(id));
        }
        // Where the backend switches, the kernel's steering is the truth.
        if let Some(steered) = self.daemon_active().await {
            let mut state = self.lock();
            if state.generations.contains_key(&steered) {
                state.active = Some(steered);
            }
        }
        if let Some(upgrade) = saved.upgrade {
            self.settle_upgrade(upgrade, log).await;
        }
        let active = self.lock().active;
        if let Some(active) = active {
            self.mark_active(active);
            self.lock().previous = None;
            let dead = self
                .lock()
                .generations
                .get(&active)
                .is_some_and(|g| !g.alive());
            if dead {
                log(format!(
                    "generation {active}: its process exited while no supervisor ran; restarting it on its sockets"
                ));
                self.restart_now(active)?;
            }
        }
        // Everything else drains, as after any upgrade.
        let others: Vec<u32> = self
            .lock()
            .generations
            .iter()
            .filter(|(&id, g)| Some(id) != active && !g.sockets.is_empty())
            .map(|(&id, _)| id)
            .collect();
        for id in others {
            let supervisor = Arc::clone(self);
            tokio::spawn(async move {
                let log = |line: String| tracing::info!("{line}");
                supervisor.drain(id, &log).await;
            });
        }
        self.save();
        Ok(active.is_some())
    }

    /// Takes one recorded generation back, or lets go of what is left of it.
    fn adopt_generation(self: &Arc<Self>, saved: &record::SavedGeneration, log: Progress<'_>) {
        let id = saved.id;
        let process = saved.process.and_then(|p| {
            let pidfd = crate::socket::Pidfd::open(p.pid).ok()?;
            // Checked after the pidfd pins it: a process that reused the pid fails here.
            (inspect::start_time(p.pid) == Some(p.start_time)).then_some((p, pidfd))
        });
        let Some(keeper) = Keeper::find(saved.keeper.pid, saved.keeper.start_time) else {
            log(format!(
                "generation {id}: its keeper (pid {}) is gone and its sockets with it; it is not adopted",
                saved.keeper.pid
            ));
            if let Some((p, _)) = process {
                end_tree(p.pid);
            }
            return;
        };
        let sockets: Result<Vec<(Protocol, OwnedFd)>, _> = saved
            .protocols
            .iter()
            .enumerate()
            .map(|(index, &protocol)| keeper.take(index).map(|fd| (protocol, fd)))
            .collect();
        let sockets = match sockets {
            Ok(sockets) if !sockets.is_empty() => sockets,
            Ok(_) => return,
            Err(err) => {
                log(format!(
                    "generation {id}: its sockets cannot be taken from its keeper (pid {}): {err}; it is not adopted",
                    keeper.pid()
                ));
                keeper.end();
                if let Some((p, _)) = process {
                    end_tree(p.pid);
                }
                return;
            }
        };
        let main_pid = Arc::new(std::sync::atomic::AtomicU32::new(
            process.as_ref().map_or(0, |(p, _)| p.pid),
        ));
        let notify = saved.notify.as_ref().and_then(|name| {
            let fd = keeper.take(saved.protocols.len()).ok()?;
            Some(self.serve_notify(
                std::os::unix::net::UnixDatagram::from(fd),
                name.clone(),
                &main_pid,
            ))
        });
        let (exit_tx, exit_rx) = watch::channel(None);
        let generation = Generation {
            id,
            command: saved.command.clone(),
            fd_passing: saved.fd_passing,
            sockets,
            keeper,
            process: process.as_ref().map(|(p, _)| *p),
            main_pid,
            serial: 1,
            exit: exit_rx,
            state: saved.state.clone(),
            started_at: system_time(saved.started_at_ms),
            spawned: Instant::now(),
            ready_after: saved.ready_after_ms.map(Duration::from_millis),
            switched_at: saved.switched_at_ms.map(system_time),
            switched_away: None,
            drained_after: None,
            restarts: saved.restarts,
            ready: saved.ready,
            notify,
            capabilities: saved.capabilities,
        };
        self.lock().generations.insert(id, generation);
        match process {
            Some((p, pidfd)) => {
                log(format!(
                    "adopted generation {id} (pid {}, keeper {})",
                    p.pid, saved.keeper.pid
                ));
                self.watch_exit(id, 1, p.pid, pidfd, exit_tx);
            }
            None => {
                log(format!(
                    "adopted generation {id}'s sockets (keeper {}); its process is gone",
                    saved.keeper.pid
                ));
                let _ = exit_tx.send(Some(ExitInfo::UNKNOWN));
            }
        }
        self.adopted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id);
    }

    /// Finishes or undoes the upgrade the supervisor before was in, by its phase.
    async fn settle_upgrade(self: &Arc<Self>, upgrade: UpgradeRecord, log: Progress<'_>) {
        let active = self.lock().active;
        match upgrade.phase {
            UpgradePhase::Preparing { keeper } => {
                // Its keeper, and the registration that names it, go.
                if let Some(keeper) = keeper.and_then(|k| Keeper::find(k.pid, k.start_time)) {
                    if let Some(id) = self.registered_by(keeper.pid()).await {
                        let _ = self
                            .daemon(Request::Forget {
                                service: self.config.service.clone(),
                                generation: id,
                            })
                            .await;
                    }
                    keeper.end();
                }
                log(
                    "the upgrade in flight was undone: its new generation was still being prepared"
                        .into(),
                );
            }
            UpgradePhase::Starting { new } | UpgradePhase::Switching { new }
                if active != Some(new) =>
            {
                self.kill_and_wait(new, Signal::SIGKILL, KILL_WAIT).await;
                self.retire_async(
                    new,
                    GenerationState::Failed {
                        reason: "its upgrade was undone: the supervisor stopped before the switch"
                            .into(),
                    },
                )
                .await;
                log(format!(
                    "the upgrade to generation {new} was undone: it was not switched to; generation {} stays active",
                    active.map_or("-".into(), |a| a.to_string())
                ));
            }
            UpgradePhase::Switching { new }
            | UpgradePhase::Grace { new }
            | UpgradePhase::Draining { new }
                if active == Some(new) =>
            {
                log(format!(
                    "the upgrade to generation {new} is finished: it is active{}",
                    upgrade
                        .old
                        .map(|old| format!("; generation {old} drains"))
                        .unwrap_or_default()
                ));
            }
            phase => {
                // Rolled back before the crash: the new one drains with the others.
                if let Some(new) = phase.new_generation() {
                    log(format!(
                        "the upgrade to generation {new} was rolled back; generation {} stays active",
                        active.map_or("-".into(), |a| a.to_string())
                    ));
                }
            }
        }
    }

    /// The daemon's id for the generation registered by keeper `pid`, if it knows one.
    async fn registered_by(&self, pid: u32) -> Option<u32> {
        let (_, service) = self.daemon_view().await?;
        service
            .generations
            .into_iter()
            .find(|g| g.pid == pid)
            .map(|g| g.id)
    }

    /// Starts generation `id`'s process again now, on its sockets (counted as a restart).
    pub(super) fn restart_now(self: &Arc<Self>, id: u32) -> Result<(), SupervisorError> {
        let (exit_tx, exit_rx) = watch::channel(None);
        {
            let mut state = self.lock();
            state.restarts += 1;
            let Some(g) = state.generations.get_mut(&id) else {
                return Ok(());
            };
            g.exit = exit_rx;
            g.restarts += 1;
        }
        self.spawn_process(id, exit_tx)
    }

    /// Puts the kernel back in line with the active generation when the daemon steers
    /// elsewhere (a switch it never heard of while it was stopped or gone).
    pub(super) async fn reconcile(self: &Arc<Self>) {
        let (active, switches) = {
            let state = self.lock();
            if state.upgrade.is_some() || state.stopping {
                return;
            }
            let Some(active) = state.active else {
                return;
            };
            let switches = state
                .generations
                .get(&active)
                .is_some_and(|g| g.capabilities.switch.yes() && !g.sockets.is_empty());
            (active, switches)
        };
        if !switches {
            return;
        }
        let Some((_, service)) = self.daemon_view().await else {
            return;
        };
        let steered = service.generations.iter().find(|g| g.active).map(|g| g.id);
        let known = service.generations.iter().any(|g| g.id == active);
        if steered == Some(active) || !known {
            return;
        }
        match self
            .daemon(Request::Switch {
                service: self.config.service.clone(),
                generation: active,
            })
            .await
        {
            Ok(_) => tracing::warn!(
                "the daemon steered to {} instead of generation {active}; switched back",
                steered.map_or("no generation".into(), |s| format!("generation {s}"))
            ),
            Err(err) => tracing::warn!(
                "putting the daemon back on generation {active}: {}",
                error_chain(&err)
            ),
        }
    }
}
