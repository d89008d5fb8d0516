//! The `hotswap` command line: one module per verb. Noun commands (`status`, `metrics`) never
//! change state; verbs do.

/// `print!` that does not panic when standard output is gone: a reader that went away
/// (`hotswap status | head -1`) is not an error, so the rest of the output is dropped quietly.
/// Any other write error is returned (with `?`).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!($($arg)*))?
    };
}

/// [`out!`] with a newline.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!("{}\n", format_args!($($arg)*)))?
    };
}

mod bind;
mod chown;
mod config;
mod daemon;
mod doctor;
mod generate;
mod logging;
mod metrics;
mod reexec;
mod register;
mod reload;
mod run;
mod status;
mod switch;
mod upgrade;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::{
    client::{self, ClientError},
    daemon::DEFAULT_SOCKET,
    protocol::{Reply, Request},
};

/// Zero-downtime listener hand-over: steer each new connection of a service to the active
/// generation, and switch generations atomically.
#[derive(Debug, Parser)]
#[command(name = "hotswap", version)]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "HOTSWAP_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Where `hotswap run` keeps its control socket, lock and record, and where `upgrade`,
    /// `rollback`, `reexec` and `status` look for them [default: beside the daemon's socket
    /// for root; $XDG_RUNTIME_DIR/hotswap, else /tmp/hotswap-UID, for other users].
    #[arg(long, global = true, env = "HOTSWAP_RUN_DIR")]
    run_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon in the foreground (loads or adopts the sk_lookup program).
    Daemon(daemon::Args),
    /// Steer connections for an address to a service: bind SERVICE tcp|udp PREFIX PORT. A new
    /// service can get an owner, who may then manage it without root.
    Bind(bind::BindArgs),
    /// Stop steering an address: unbind SERVICE tcp|udp PREFIX PORT.
    Unbind(bind::Args),
    /// Say who besides root may manage a service (bind, unbind, run, upgrade, rollback,
    /// switch, status): a user, a group, or (neither given) nobody. Root only.
    Chown(chown::Args),
    /// Take a listening socket from a running process as a new generation of a service.
    Register(register::Args),
    /// Make a generation of a service the active one (one atomic map update).
    Switch(switch::Args),
    /// Run a service under a supervisor: start it with socket activation, switch to it when
    /// ready, restart it if it dies; serves `upgrade` and `rollback`.
    Run(run::Args),
    /// Start a new generation of a service run by `hotswap run`, switch to it when ready, drain
    /// the old one.
    Upgrade(upgrade::Args),
    /// Switch a service run by `hotswap run` back to its previous generation while it lives.
    Rollback(upgrade::RollbackArgs),
    /// Replace the supervisor of a service run by `hotswap run` with the hotswap binary now at
    /// its path (a new version), in place: no generation stops or restarts. SIGHUP does the
    /// same (systemd's `ExecReload`).
    Reexec(reexec::Args),
    /// Hold a generation's sockets for `hotswap run` (started by it; not for use by hand).
    #[command(hide = true)]
    Keep {
        /// Whose sockets: for `ps` only.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        words: Vec<String>,
    },
    /// Print shell completions or write man pages (for packaging; not for use by hand).
    #[command(hide = true)]
    Generate(generate::Args),
    /// Show services, bindings, generations and the backend.
    Status(status::Args),
    /// Show per-service counters.
    Metrics(metrics::Args),
    /// Make the daemon read its config file again and apply what changed: new bindings are
    /// added, dropped ones removed, unchanged services left alone. SIGHUP does the same.
    Reload,
    /// Work with config files without a daemon: `config check PATH`.
    #[command(subcommand)]
    Config(config::Command),
    /// Check what this host offers: kernel, bpffs, BTF, capabilities, which backend `auto`
    /// picks and why, and what to change for sk_lookup. Needs no daemon.
    Doctor(doctor::Args),
}

/// Parses the command line, runs the command and returns the exit code. Errors are one line on
/// stderr with their whole cause chain.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            use clap::error::ErrorKind;
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = err.print();
                return ExitCode::from(
                    if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                        2
                    } else {
                        0
                    },
                );
            }
            // clap adds usage and a hint on further lines; the first line says what is wrong.
            let text = err.to_string();
            eprintln!(
                "{}",
                text.lines().next().unwrap_or("error: invalid arguments")
            );
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", crate::error_chain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let run_dir = cli
        .run_dir
        .clone()
        .unwrap_or_else(|| crate::supervisor::default_run_dir(&cli.socket));
    match cli.command {
        Command::Daemon(args) => daemon::run(cli.socket, args),
        Command::Bind(args) => bind::bind(&cli.socket, args),
        Command::Unbind(args) => bind::unbind(&cli.socket, args),
        Command::Chown(args) => chown::run(&cli.socket, args),
        Command::Register(args) => register::run(&cli.socket, args),
        Command::Switch(args) => switch::run(&cli.socket, args),
        Command::Run(args) => run::run(cli.socket, run_dir, args),
        Command::Upgrade(args) => upgrade::run(&run_dir, args),
        Command::Rollback(args) => upgrade::rollback(&run_dir, args),
        Command::Reexec(args) => reexec::run(&run_dir, args),
        Command::Keep { .. } => crate::supervisor::keep(),
        Command::Generate(args) => generate::run(args),
        Command::Status(args) => status::run(&cli.socket, &run_dir, args),
        Command::Metrics(args) => metrics::run(&cli.socket, args),
        Command::Reload => reload::run(&cli.socket),
        Command::Config(command) => config::run(command),
        Command::Doctor(args) => doctor::run(args),
    }
}

/// Writes to standard output for [`out!`]; a closed pipe is success (see there).
pub(crate) fn write_stdout(text: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => anyhow::Context::context(result, "writing to standard output"),
    }
}

/// How long the daemon may take to answer one command-line request.
const DAEMON_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Sends one request from a small single-threaded runtime; a daemon that does not answer
/// within [`DAEMON_DEADLINE`] (stopped, wedged) is an error, not a hang.
fn request(socket: &std::path::Path, request: &Request) -> Result<Reply, ClientError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ClientError::Connect {
            path: socket.to_owned(),
            source,
        })?
        .block_on(async {
            tokio::time::timeout(DAEMON_DEADLINE, client::request(socket, request))
                .await
                .unwrap_or(Err(ClientError::NoAnswer(DAEMON_DEADLINE)))
        })
}

/// A reply of another kind than the request asks for: a daemon of another version.
fn unexpected(reply: Reply) -> anyhow::Error {
    anyhow::anyhow!("unexpected reply from the daemon: {reply:?}")
}
