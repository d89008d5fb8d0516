//! The log of the long-running commands (`daemon`, `run`): text for a terminal, JSON lines
//! for a log pipeline (`--log-format json`), and under systemd text the journal reads well —
//! no timestamp of our own (the journal stamps each line) and a `<N>` syslog priority prefix,
//! so `journalctl -p warning` finds the warnings.

use std::{fmt, io::IsTerminal as _, os::fd::AsRawFd as _};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::{
    fmt::{format::Writer, FmtContext, FormatEvent, FormatFields},
    registry::LookupSpan,
    EnvFilter,
};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people: a terminal, or the journal under systemd.
    Text,
    /// One JSON object per line (tracing's JSON format: timestamp, level, fields, target).
    Json,
}

/// `--log-format`, shared by the commands that log.
#[derive(Debug, clap::Args)]
pub struct LogArgs {
    /// How to write the log on standard error: text (the journal's own style when standard
    /// error is the journal) or json. RUST_LOG filters it (default: info).
    #[arg(long, value_enum, env = "HOTSWAP_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Whether standard error is systemd's journal: `JOURNAL_STREAM` names its device and inode
/// (systemd sets it for a unit's output; a child with another stderr inherits it wrongly, so
/// the descriptor itself is compared).
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr().as_raw_fd()) else {
        return false;
    };
    dev.parse() == Ok(stat.st_dev) && ino.parse() == Ok(stat.st_ino)
}

/// Prefixes each line with its syslog priority, which the journal takes as the line's level.
struct JournalPriority<F>(F);

impl<S, N, F> FormatEvent<S, N> for JournalPriority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Starts the log; `default_filter` applies where RUST_LOG is unset or invalid.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text if stderr_is_journal() => builder
            .with_ansi(false)
            .event_format(JournalPriority(
                tracing_subscriber::fmt::format().without_time(),
            ))
            .init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
