//! `hotswap status`.

use std::{fmt::Write as _, path::Path};

use crate::{
    protocol::{Reply, Request},
    registry::StatusReport,
};

/// [--json].
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    match super::request(socket, &Request::Status)? {
        Reply::Status(report) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", render(&report));
            }
            Ok(())
        }
        reply => Err(super::unexpected(reply)),
    }
}

/// The human-readable status.
pub fn render(report: &StatusReport) -> String {
    let mut out = String::new();
    let backend = &report.backend;
    let _ = writeln!(out, "backend: {} ({})", backend.name, backend.reason);
    let _ = write!(out, "state: {}", backend.state_dir);
    if let Some(id) = backend.program_id {
        let _ = write!(out, ", program id {id}");
    }
    if let Some(n) = backend.verified_instructions {
        let _ = write!(out, ", {n} instructions verified");
    }
    let _ = writeln!(out);
    if report.services.is_empty() {
        let _ = writeln!(
            out,
            "no services (add one with: hotswap bind <SERVICE> tcp <PREFIX> <PORT>)"
        );
    }
    for service in &report.services {
        let _ = writeln!(out, "\nservice {} (id {})", service.name, service.id);
        if service.bindings.is_empty() {
            let _ = writeln!(out, "  no bindings");
        }
        for binding in &service.bindings {
            let _ = writeln!(out, "  bind {binding}");
        }
        if service.generations.is_empty() {
            let _ = writeln!(out, "  no generations");
            continue;
        }
        let _ = writeln!(
            out,
            "  {:>4}  {:<6}  {:>8}  {:>4}  {:<5}  {:<24}  LABEL",
            "GEN", "ACTIVE", "PID", "FD", "PROTO", "LOCAL ADDRESS"
        );
        for g in &service.generations {
            for (i, socket) in g.sockets.iter().enumerate() {
                // The generation's own columns once, then one row per socket.
                let (id, active, pid, label) = if i == 0 {
                    (
                        g.id.to_string(),
                        if g.active { "*" } else { "" },
                        g.pid.to_string(),
                        g.label.as_deref().unwrap_or(""),
                    )
                } else {
                    (String::new(), "", String::new(), "")
                };
                let _ = writeln!(
                    out,
                    "  {id:>4}  {active:<6}  {pid:>8}  {:>4}  {:<5}  {:<24}  {label}",
                    socket.fd,
                    socket.protocol.to_string(),
                    socket.local_addr.map_or("-".to_owned(), |a| a.to_string()),
                );
            }
        }
    }
    out
}
