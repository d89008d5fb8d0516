//! `hotswap doctor`.

use crate::doctor;

/// [--json | --verifier-log].
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON instead of text (it carries the verifier's whole log, if any).
    #[arg(long, conflicts_with = "verifier_log")]
    json: bool,
    /// After the report, print the verifier's whole log when it refused the program.
    #[arg(long)]
    verifier_log: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let report = doctor::examine();
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    out!("{}", doctor::render(&report));
    if args.verifier_log {
        match &report.verifier_log {
            Some(log) => out!("\nverifier log:\n{log}"),
            None if report.sk_lookup_supported => {
                outln!("\nverifier log: none, the verifier accepted the program")
            }
            None => outln!("\nverifier log: none, the program did not reach the verifier"),
        }
    }
    Ok(())
}
