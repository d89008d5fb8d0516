//! `hotswap upgrade` and `hotswap rollback`.

use std::{path::Path, time::Duration};

use crate::{
    model::ServiceName,
    supervisor::{
        self,
        spec::{parse_duration, FdPassing, ReadyMode},
        SupervisorMessage, SupervisorRequest,
    },
};

/// SERVICE [--ready …] [--ready-timeout …] [--pass-fds …] [-- COMMAND [ARGS…]]
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Service name.
    service: ServiceName,
    /// Readiness for this upgrade (default: the one `run` was given).
    #[arg(long)]
    ready: Option<ReadyMode>,
    /// Readiness timeout for this upgrade (default: the one `run` was given).
    #[arg(long, value_parser = parse_duration)]
    ready_timeout: Option<Duration>,
    /// How this generation and the ones after it are handed their sockets: systemd or nginx
    /// (default: as before; see `hotswap run --pass-fds`).
    #[arg(long, value_enum)]
    pass_fds: Option<FdPassing>,
    /// A new command (default: the current one again).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// SERVICE
#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// Service name.
    service: ServiceName,
}

fn talk(run_dir: &Path, service: &ServiceName, request: SupervisorRequest) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let prefix = service.to_string();
    let result = runtime.block_on(supervisor::request(
        run_dir,
        service,
        &request,
        &mut |line| {
            // Progress that cannot be shown is no reason to stop waiting for the outcome.
            let _ = super::write_stdout(format_args!("{prefix}: {line}\n"));
        },
    ))?;
    if let SupervisorMessage::Done { message, .. } = result {
        outln!("{prefix}: {message}");
    }
    Ok(())
}

pub fn run(run_dir: &Path, args: Args) -> anyhow::Result<()> {
    let mut command = args.command;
    if let Some(program) = command.first_mut() {
        let resolved = supervisor::resolve_program(program)?;
        // The supervisor runs it from its own working directory, not ours.
        if program.contains('/') {
            *program = std::fs::canonicalize(&resolved)
                .unwrap_or(resolved)
                .to_string_lossy()
                .into_owned();
        }
    }
    let request = SupervisorRequest::Upgrade {
        command: (!command.is_empty()).then_some(command),
        ready: args.ready,
        ready_timeout_ms: args.ready_timeout.map(|d| d.as_millis() as u64),
        pass_fds: args.pass_fds,
    };
    talk(run_dir, &args.service, request)
}

pub fn rollback(run_dir: &Path, args: RollbackArgs) -> anyhow::Result<()> {
    talk(run_dir, &args.service, SupervisorRequest::Rollback)
}
