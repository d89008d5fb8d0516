//! `hotswap config check PATH`: validates a config file without a daemon.

use std::path::PathBuf;

use crate::config::Config;

/// check PATH.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Check a config file (syntax, names, bindings, owners on this host) without applying
    /// it; errors say the line and column.
    Check {
        /// The file [default: /etc/hotswap/hotswap.toml].
        #[arg(default_value = crate::config::DEFAULT_PATH)]
        path: PathBuf,
    },
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Check { path } => {
            let config = Config::load(&path)?;
            for (name, service) in &config.services {
                let bindings: Vec<String> =
                    service.bindings.iter().map(ToString::to_string).collect();
                outln!(
                    "service {name}: {}{}",
                    if bindings.is_empty() {
                        "no bindings".to_owned()
                    } else {
                        bindings.join(", ")
                    },
                    if service.owner.is_none() {
                        String::new()
                    } else {
                        format!(" (owned by {})", service.owner)
                    }
                );
            }
            outln!(
                "{}: ok ({} services)",
                path.display(),
                config.services.len()
            );
            Ok(())
        }
    }
}
