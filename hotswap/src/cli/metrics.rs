//! `hotswap metrics`.

use std::path::Path;

use crate::protocol::{Reply, Request};

/// [--json].
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    match super::request(socket, &Request::Metrics)? {
        Reply::Metrics { services } => {
            if args.json {
                outln!("{}", serde_json::to_string_pretty(&services)?);
                return Ok(());
            }
            outln!(
                "{:<20} {:>12} {:>12} {:>12} {:>8}",
                "SERVICE",
                "LOOKUPS",
                "STEERED",
                "NO-SOCKET",
                "ERRORS"
            );
            for m in services {
                outln!(
                    "{:<20} {:>12} {:>12} {:>12} {:>8}",
                    m.service.as_str(),
                    m.lookups,
                    m.steered,
                    m.no_socket,
                    m.errors
                );
            }
            Ok(())
        }
        reply => Err(super::unexpected(reply)),
    }
}
