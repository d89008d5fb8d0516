//! `hotswap switch`.

use std::path::Path;

use crate::{
    model::ServiceName,
    protocol::{Reply, Request},
};

/// SERVICE GENERATION.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Service name.
    service: ServiceName,
    /// The generation to make active.
    generation: u32,
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    let request = Request::Switch {
        service: args.service.clone(),
        generation: args.generation,
    };
    match super::request(socket, &request)? {
        Reply::Switched { previous } => {
            match previous {
                Some(previous) if previous != args.generation => outln!(
                    "service {}: generation {previous} -> {}",
                    args.service,
                    args.generation
                ),
                Some(_) => outln!(
                    "service {}: generation {} was active already",
                    args.service,
                    args.generation
                ),
                None => outln!(
                    "service {}: generation {} active",
                    args.service,
                    args.generation
                ),
            }
            Ok(())
        }
        reply => Err(super::unexpected(reply)),
    }
}
