//! `hotswap register`.

use std::path::Path;

use crate::{
    model::ServiceName,
    protocol::{Reply, Request},
};

/// SERVICE --pid PID --fd FD [--fd FD] [--label TEXT] [--activate].
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Service name.
    service: ServiceName,
    /// The process that holds the listening socket.
    #[arg(long)]
    pid: u32,
    /// The socket's fd number in that process; repeat for a TCP and a UDP socket.
    #[arg(long = "fd", required = true)]
    fds: Vec<i32>,
    /// A label to show in `status`, e.g. a version.
    #[arg(long)]
    label: Option<String>,
    /// Also make the new generation active.
    #[arg(long)]
    activate: bool,
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    let request = Request::Register {
        service: args.service,
        pid: args.pid,
        fds: args.fds,
        label: args.label,
        activate: args.activate,
    };
    match super::request(socket, &request)? {
        // The id alone on stdout, so scripts can capture it.
        Reply::Registered { generation, .. } => {
            outln!("{generation}");
            Ok(())
        }
        reply => Err(super::unexpected(reply)),
    }
}
