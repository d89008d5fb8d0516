//! `hotswap daemon`.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::{
    admission::Limits,
    config::ConfigFile,
    daemon::{self, BackendChoice, DaemonConfig},
    supervisor::spec::parse_duration,
};

/// [--pin-dir PATH] [--debug-ebpf].
#[derive(Debug, clap::Args)]
pub struct Args {
    /// bpffs directory for the pinned program, link and maps
    /// [default: /sys/fs/bpf/hotswap/<netns inode>].
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// Turn on the eBPF program's per-connection debug log lines (costly: for debugging only).
    #[arg(long)]
    debug_ebpf: bool,
    /// sk-lookup: the eBPF program steers (needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, Linux >= 5.9);
    /// reuseport: every generation's socket in one SO_REUSEPORT group, a classic BPF program
    /// picks the member (no privileges, Linux >= 4.5); uds: one shared socket per service
    /// address handed to every generation; auto: the first of these that works here.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Control connections served at once, from everyone; more are refused until one ends.
    #[arg(long, default_value_t = Limits::default().total, value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_connections: u32,
    /// Control connections served at once from one user (uid).
    #[arg(long, default_value_t = Limits::default().per_uid, value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_connections_per_user: u32,
    /// A control connection that sends no request for this long is closed (one that holds a
    /// readiness probe's route stays open).
    #[arg(long, default_value = "60s", value_parser = parse_idle_timeout)]
    idle_timeout: std::time::Duration,
    /// A group (name or gid) whose members may connect to the control socket too: operators
    /// who are not root manage the services they own (`hotswap chown`) and nothing else.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// The config file: services, bindings and owners, applied at start and on `hotswap
    /// reload` or SIGHUP [default: /etc/hotswap/hotswap.toml, where it exists].
    #[arg(long, value_name = "PATH", env = "HOTSWAP_CONFIG")]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (http://ADDR:PORT/metrics), e.g.
    /// 127.0.0.1:9464 [default: off].
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    log: super::logging::LogArgs,
}

/// A duration, bounded as every duration is, and not zero (that would close every connection
/// before its first request).
fn parse_idle_timeout(text: &str) -> anyhow::Result<std::time::Duration> {
    let idle = parse_duration(text)?;
    anyhow::ensure!(!idle.is_zero(), "the idle timeout must be longer than 0");
    Ok(idle)
}

pub fn run(socket: PathBuf, args: Args) -> anyhow::Result<()> {
    let default_filter = if args.debug_ebpf {
        "info,hotswap=debug"
    } else {
        "info"
    };
    super::logging::init(args.log.log_format, default_filter);
    let socket_group = args
        .socket_group
        .as_deref()
        .map(super::chown::gid_of)
        .transpose()?;
    let config = DaemonConfig {
        socket,
        pin_dir: args.pin_dir,
        debug_ebpf: args.debug_ebpf,
        backend: args.backend,
        limits: Limits {
            total: args.max_connections,
            per_uid: args.max_connections_per_user,
            idle: args.idle_timeout,
        },
        socket_group,
        config: Some(match args.config {
            Some(path) => ConfigFile {
                path,
                required: true,
            },
            None => ConfigFile {
                path: crate::config::DEFAULT_PATH.into(),
                required: false,
            },
        }),
        metrics_listen: args.metrics_listen,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async { daemon::run(config, shutdown_signal()).await })?;
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
pub(super) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    // The handlers are installed now, not at the first poll: a SIGTERM that comes while the
    // caller is still busy (a supervisor adopting its generations) is kept for it.
    let handlers = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        let (Ok(mut int), Ok(mut term)) = handlers else {
            // Without handlers the default action (exit) still stops the daemon.
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    }
}
