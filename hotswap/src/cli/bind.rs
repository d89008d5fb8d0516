//! `hotswap bind` and `hotswap unbind`.

use std::path::Path;

use ipnet::IpNet;

use crate::{
    model::{parse_port, parse_prefix, Binding, Protocol, ServiceName},
    protocol::{Reply, Request},
};

/// SERVICE tcp|udp PREFIX PORT.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Service name ([a-z0-9][a-z0-9_-]{0,62}).
    service: ServiceName,
    /// tcp or udp.
    protocol: Protocol,
    /// Destination prefix, e.g. 127.0.0.1/32, 192.0.2.0/24, ::1/128, ::/0.
    #[arg(value_parser = parse_prefix)]
    prefix: IpNet,
    /// Destination port; 0 means every port.
    #[arg(value_parser = parse_port)]
    port: u16,
}

/// `bind`'s words: a binding, and the owner a new service gets.
#[derive(Debug, clap::Args)]
pub struct BindArgs {
    #[command(flatten)]
    binding: Args,
    #[command(flatten)]
    owner: super::chown::OwnerArgs,
}

pub fn bind(socket: &Path, args: BindArgs) -> anyhow::Result<()> {
    let owner = args.owner.owner()?;
    run(socket, args.binding, true, owner)
}

pub fn unbind(socket: &Path, args: Args) -> anyhow::Result<()> {
    run(socket, args, false, None)
}

fn run(
    socket: &Path,
    args: Args,
    bind: bool,
    owner: Option<crate::access::Owner>,
) -> anyhow::Result<()> {
    let binding = Binding {
        protocol: args.protocol,
        prefix: args.prefix,
        port: args.port,
    };
    let request = if bind {
        Request::Bind {
            service: args.service.clone(),
            binding,
            owner,
        }
    } else {
        Request::Unbind {
            service: args.service.clone(),
            binding,
        }
    };
    match super::request(socket, &request)? {
        Reply::Done => {
            let verb = if bind { "bound" } else { "unbound" };
            outln!(
                "{verb} {binding} {} service {}",
                if bind { "to" } else { "from" },
                args.service
            );
            Ok(())
        }
        reply => Err(super::unexpected(reply)),
    }
}
