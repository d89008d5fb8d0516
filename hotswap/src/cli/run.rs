//! `hotswap run`.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use nix::sys::signal::Signal;

use crate::{
    model::ServiceName,
    supervisor::{
        self,
        spec::{parse_duration, parse_signal, FdPassing, ListenSpec, ReadyMode},
        RunConfig,
    },
};

/// SERVICE --listen … [options] -- COMMAND [ARGS…]
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Service name.
    service: ServiceName,
    /// An address of the service: tcp://ADDR:PORT or udp://ADDR:PORT; repeat for more.
    #[arg(long = "listen", required = true, value_name = "PROTO://ADDR:PORT")]
    listens: Vec<ListenSpec>,
    /// How a new generation shows it is ready: notify (sd_notify READY=1), tcp (it accepts a
    /// connection) or delay:<DURATION> [default: tcp with a TCP address on the sk_lookup
    /// backend, else delay:1s].
    #[arg(long)]
    ready: Option<ReadyMode>,
    /// A generation not ready after this long is stopped and nothing is switched.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    ready_timeout: Duration,
    /// The signal that tells an old generation to drain.
    #[arg(long, default_value = "SIGTERM", value_parser = parse_signal)]
    drain_signal: Signal,
    /// An old generation still running this long after the drain signal is killed.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// After the switch, the old generation's queue is watched this long before the drain
    /// signal, so handshakes half done at the switch reach it first: keep it above your
    /// clients' round-trip time.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    drain_settle: Duration,
    /// If a new generation dies within this time after the switch, switch back.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    grace: Duration,
    /// How the server is told which fds (3, 4, …; TCP first) are its sockets: systemd
    /// (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES) or nginx (NGINX="3;"). Either way
    /// HOTSWAP_FD_TCP/HOTSWAP_FD_UDP hold the numbers, and {fd:tcp}/{fd:udp} in COMMAND's
    /// arguments become them (haproxy `bind fd@{fd:tcp}`, uvicorn `--fd {fd:tcp}`).
    #[arg(long, value_enum, default_value_t = FdPassing::Systemd)]
    pass_fds: FdPassing,
    /// Give each generation a handoff channel (HOTSWAP_HANDOFF_FD, see docs/handoff.md): a
    /// draining generation hands its established connections, with their unprocessed bytes
    /// and state, to the active one instead of closing them.
    #[arg(long)]
    handoff: bool,
    #[command(flatten)]
    log: super::logging::LogArgs,
    /// The server to run, with its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

pub fn run(socket: PathBuf, run_dir: PathBuf, args: Args) -> anyhow::Result<()> {
    super::logging::init(args.log.log_format, "info");
    // Fail before anything starts when the command cannot run.
    supervisor::resolve_program(&args.command[0])?;
    let config = RunConfig {
        service: args.service,
        listens: args.listens,
        ready: args.ready,
        ready_timeout: args.ready_timeout,
        drain_signal: args.drain_signal,
        drain_timeout: args.drain_timeout,
        drain_settle: args.drain_settle,
        handoff: args.handoff,
        grace: args.grace,
        command: args.command,
        fd_passing: args.pass_fds,
        daemon_socket: socket,
        run_dir,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        // SIGHUP (systemd's ExecReload, `kill -HUP`) re-executes the supervisor in place, as
        // `hotswap reexec` does; its default action would kill it without draining anything.
        let (reexec_tx, reexec_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("handling SIGHUP")?;
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: re-executing the supervisor");
                let _ = reexec_tx.send(());
            }
        });
        let shutdown = super::daemon::shutdown_signal();
        // Every handler is in place: signals held back across a re-exec may come now.
        supervisor::accept_stop_signals();
        supervisor::run(config, shutdown, reexec_rx).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(())
}
