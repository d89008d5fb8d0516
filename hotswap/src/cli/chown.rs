//! `hotswap chown`: who besides root may manage a service.

use std::path::Path;

use crate::{
    access::Owner,
    model::ServiceName,
    protocol::{Reply, Request},
};

/// An owner from the command line: a user, a group, or both, by name or number.
#[derive(Debug, clap::Args)]
pub struct OwnerArgs {
    /// The user who may manage the service (a name or a uid).
    #[arg(long = "owner-user", value_name = "USER")]
    user: Option<String>,
    /// The group whose members may manage the service (a name or a gid).
    #[arg(long = "owner-group", value_name = "GROUP")]
    group: Option<String>,
}

impl OwnerArgs {
    /// The owner named, or `None` when neither is given.
    pub fn owner(&self) -> anyhow::Result<Option<Owner>> {
        if self.user.is_none() && self.group.is_none() {
            return Ok(None);
        }
        Ok(Some(Owner {
            uid: self.user.as_deref().map(uid_of).transpose()?,
            gid: self.group.as_deref().map(gid_of).transpose()?,
        }))
    }
}

/// SERVICE [--owner-user USER] [--owner-group GROUP].
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Service name.
    service: ServiceName,
    #[command(flatten)]
    owner: OwnerArgs,
}

fn uid_of(user: &str) -> anyhow::Result<u32> {
    Ok(crate::access::user_id(user)?)
}

pub(super) fn gid_of(group: &str) -> anyhow::Result<u32> {
    Ok(crate::access::group_id(group)?)
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    let owner = args.owner.owner()?.unwrap_or_default();
    let request = Request::Chown {
        service: args.service.clone(),
        owner,
    };
    match super::request(socket, &request)? {
        Reply::Done => {
            outln!("service {} is managed by {}", args.service, owner.who_may());
            Ok(())
        }
        reply => Err(super::unexpected(reply)),
    }
}
