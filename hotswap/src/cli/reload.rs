//! `hotswap reload`: the daemon reads its config file again and applies what changed.

use std::path::Path;

use crate::protocol::{Reply, Request};

pub fn run(socket: &Path) -> anyhow::Result<()> {
    match super::request(socket, &Request::Reload)? {
        Reply::Reloaded(applied) => {
            for change in &applied.changes {
                outln!("{change}");
            }
            outln!(
                "reloaded: {} changes, {} services unchanged",
                applied.changes.len(),
                applied.unchanged.len()
            );
            Ok(())
        }
        reply => Err(super::unexpected(reply)),
    }
}
