//! `hotswap status`.

use std::{collections::BTreeMap, fmt::Write as _, path::Path, time::Duration};

use crate::{
    model::{printable, ServiceName},
    protocol::{Reply, Request},
    registry::StatusReport,
    supervisor::{self, GenerationState, SupervisorReport},
};

/// [--json].
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// How long one supervisor may take to answer.
const SUPERVISOR_DEADLINE: Duration = Duration::from_secs(5);

pub fn run(socket: &Path, run_dir: &Path, args: Args) -> anyhow::Result<()> {
    let report = match super::request(socket, &Request::Status) {
        Ok(Reply::Status(report)) => report,
        Ok(reply) => return Err(super::unexpected(reply)),
        Err(err) => {
            // The supervisors answer without the daemon: show them, then fail.
            let supervisors = supervisors(run_dir, &supervisor::running_services(run_dir));
            if args.json {
                let value = serde_json::json!({
                    "daemon_error": crate::error_chain(&err),
                    "supervisors": supervisors,
                });
                outln!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let mut out = String::new();
                for (name, supervisor) in &supervisors {
                    let _ = writeln!(out, "service {name}");
                    render_lifecycle(&mut out, supervisor);
                }
                out!("{out}");
            }
            return Err(err.into());
        }
    };
    let names: Vec<ServiceName> = report.services.iter().map(|s| s.name.clone()).collect();
    let supervisors = supervisors(run_dir, &names);
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        value["supervisors"] = serde_json::to_value(&supervisors)?;
        outln!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        out!("{}", render(&report, &supervisors));
    }
    Ok(())
}

/// The lifecycle reports of the services run by `hotswap run`, by service name; each
/// supervisor gets [`SUPERVISOR_DEADLINE`] to answer.
fn supervisors(run_dir: &Path, names: &[ServiceName]) -> BTreeMap<String, SupervisorReport> {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return BTreeMap::new();
    };
    names
        .iter()
        .filter_map(|name| {
            let report = runtime.block_on(supervisor::report(run_dir, name, SUPERVISOR_DEADLINE));
            Some((name.to_string(), report.ok()?))
        })
        .collect()
}

fn render_lifecycle(out: &mut String, supervisor: &SupervisorReport) {
    let _ = writeln!(
        out,
        "  run by pid {} ({}){}; restarts: {}",
        supervisor.pid,
        supervisor
            .listens
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        match (supervisor.upgrading, &supervisor.upgrade_phase) {
            (Some(g), Some(phase)) => format!("; upgrading to {g} ({phase})"),
            (None, Some(phase)) => format!("; upgrading ({phase})"),
            _ => String::new(),
        },
        supervisor.restarts
    );
    for g in &supervisor.generations {
        let state = match &g.state {
            GenerationState::Starting => "starting".to_owned(),
            GenerationState::Ready => "ready".to_owned(),
            GenerationState::Active => "active".to_owned(),
            GenerationState::Draining => "draining".to_owned(),
            GenerationState::Exited { exit } => format!("exited ({exit})"),
            GenerationState::Failed { reason } => format!("failed: {reason}"),
        };
        let mut timings = Vec::new();
        if let Some(ms) = g.ready_after_ms {
            timings.push(format!("ready after {ms} ms"));
        }
        if let Some(ms) = g.drained_after_ms {
            timings.push(format!("drained in {ms} ms"));
        }
        if g.restarts > 0 {
            timings.push(format!("{} restarts", g.restarts));
        }
        if g.adopted > 0 {
            timings.push(format!("adopted {} connections", g.adopted));
        }
        if g.handed_over > 0 {
            timings.push(format!("handed over {} connections", g.handed_over));
        }
        if let Some(status) = &g.notify_status {
            timings.push(format!("says: {}", printable(status)));
        }
        let _ = writeln!(
            out,
            "    gen {:>3}  {:<16} pid {:<8} {}  [{}]",
            g.id,
            state,
            g.pid.map_or("-".to_owned(), |p| p.to_string()),
            timings.join(", "),
            printable(&g.command.join(" "))
        );
    }
}

/// The human-readable status.
pub fn render(report: &StatusReport, supervisors: &BTreeMap<String, SupervisorReport>) -> String {
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
    let caps = &backend.capabilities;
    let can = |support: crate::backend::Support| if support.yes() { "yes" } else { "no" };
    let _ = writeln!(
        out,
        "can: switch {}, tcp probe {}, metrics {}, prefixes {}; sockets {}",
        can(caps.switch),
        can(caps.probe),
        can(caps.metrics),
        can(caps.prefixes),
        if caps.socket_per_generation {
            "one per generation"
        } else {
            "shared by every generation"
        }
    );
    for binding in &backend.unserved {
        let _ = writeln!(
            out,
            "not served: {binding} (its socket could not be restored; it is bound again when a generation asks for it)"
        );
    }
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
        if service.relistened > 0 {
            let _ = writeln!(
                out,
                "  sockets found shut down and listening again: {}",
                service.relistened
            );
        }
        if let Some(supervisor) = supervisors.get(service.name.as_str()) {
            render_lifecycle(&mut out, supervisor);
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
                        printable(g.label.as_deref().unwrap_or("")),
                    )
                } else {
                    (String::new(), "", String::new(), "".into())
                };
                let address = socket.local_addr.map_or("-".to_owned(), |a| a.to_string());
                let address = if socket.listening {
                    address
                } else {
                    format!("{address} (shut down!)")
                };
                let _ = writeln!(
                    out,
                    "  {id:>4}  {active:<6}  {pid:>8}  {:>4}  {:<5}  {:<24}  {label}",
                    socket.fd,
                    socket.protocol.to_string(),
                    address,
                );
            }
        }
    }
    out
}
