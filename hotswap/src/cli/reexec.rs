//! `hotswap reexec`: the supervisor of a service upgrades itself in place.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    model::ServiceName,
    supervisor::{self, SupervisorMessage, SupervisorReport, SupervisorRequest},
};

/// How long the new image may take to answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// SERVICE
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Service name.
    service: ServiceName,
}

async fn report(run_dir: &Path, service: &ServiceName) -> anyhow::Result<SupervisorReport> {
    match supervisor::request(run_dir, service, &SupervisorRequest::Status, &mut |_| {}).await? {
        SupervisorMessage::Status(report) => Ok(report),
        other => anyhow::bail!("unexpected answer from the supervisor: {other:?}"),
    }
}

pub fn run(run_dir: &Path, args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let service = &args.service;
    runtime.block_on(async {
        let before = report(run_dir, service).await?;
        let answer = supervisor::request(run_dir, service, &SupervisorRequest::Reexec, &mut |_| {})
            .await?;
        if let SupervisorMessage::Done { message, .. } = answer {
            outln!("{service}: {message}");
        }
        // The new image answers once it has adopted every generation.
        let deadline = Instant::now() + ANSWER_WITHIN;
        let after = loop {
            match report(run_dir, service).await {
                Ok(after) if after.started_at_ms != before.started_at_ms => break after,
                _ if Instant::now() >= deadline => anyhow::bail!(
                    "the re-executed supervisor of {service} did not answer within {} s; its generations keep serving (see its log, and start `hotswap run` again to adopt them)",
                    ANSWER_WITHIN.as_secs()
                ),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let kept: Vec<String> = after
            .generations
            .iter()
            .filter(|g| after.adopted.contains(&g.id))
            .map(|g| {
                format!(
                    "{} (pid {})",
                    g.id,
                    g.pid.map_or("-".into(), |p| p.to_string())
                )
            })
            .collect();
        outln!(
            "{service}: supervisor pid {} runs {}; generations kept: {}",
            after.pid,
            after.binary,
            if kept.is_empty() {
                "none".to_owned()
            } else {
                kept.join(", ")
            }
        );
        Ok::<_, anyhow::Error>(())
    })
    .with_context(|| format!("re-executing the supervisor of {service}"))
}
