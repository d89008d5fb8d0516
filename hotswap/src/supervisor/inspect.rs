//! Before a switch: does the generation really serve from the socket it was given?
//!
//! A server that matches inherited sockets against its configured address, and finds they
//! differ, closes the one it got and binds its own — silently, if it sets `SO_REUSEPORT` (it
//! then joins the service's group and steering never reaches it), or it fails. Switching to
//! such a generation would refuse every connection. So the supervisor looks at the
//! generation's process group in `/proc`: some process must hold the generation's socket, and
//! none may hold another socket listening on (TCP) or bound to (UDP) a service address.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::SocketAddr,
};

use crate::{
    model::Protocol,
    socket::{socket_table, SOCKET_TABLES},
};

/// What a generation's processes hold.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TreeSockets {
    /// Socket inodes held by any process of the group.
    pub held: BTreeSet<u64>,
    /// Sockets of the group's processes on the network namespace's socket tables: inode →
    /// (pid, protocol, local address).
    pub bound: BTreeMap<u64, (u32, Protocol, SocketAddr)>,
}

/// The processes of process group `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| process_group(&stat))
                == Some(pgid)
        })
        .collect()
}

/// The process group field of a `/proc/PID/stat` line (the 5th; the 2nd, the command, may
/// hold spaces and parentheses, so count from the last `)`).
fn process_group(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// When process `pid` started, in clock ticks since boot (`/proc/PID/stat` field 22): with the
/// pid, what names one process across a supervisor's restart.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_field(&stat, 22)
}

/// Field `n` (1-based, as proc(5) counts) of a `/proc/PID/stat` line, counting from the last
/// `)` since the command may hold spaces and parentheses.
fn stat_field(stat: &str, n: usize) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

/// Socket inodes among a process's descriptors.
fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeSet::new();
    };
    fds.flatten()
        .filter_map(|fd| {
            let target = std::fs::read_link(fd.path()).ok()?;
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Looks at what process group `pgid` holds.
pub fn tree_sockets(pgid: u32) -> io::Result<TreeSockets> {
    let mut tree = TreeSockets::default();
    let members = group_members(pgid);
    let mut owner = BTreeMap::new();
    for pid in &members {
        for inode in socket_inodes(*pid) {
            owner.entry(inode).or_insert(*pid);
            tree.held.insert(inode);
        }
    }
    let Some(&leader) = members.first() else {
        return Ok(tree);
    };
    for &(file, protocol, state) in SOCKET_TABLES {
        let text = match std::fs::read_to_string(format!("/proc/{leader}/net/{file}")) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        for (inode, addr) in socket_table(&text, state) {
            if let Some(&pid) = owner.get(&inode) {
                tree.bound.insert(inode, (pid, protocol, addr));
            }
        }
    }
    Ok(tree)
}

/// Whether a socket bound to `bound` takes connections for `listen` (same port, and the same
/// address or an unspecified one).
pub fn covers(bound: SocketAddr, listen: SocketAddr) -> bool {
    let (bound, listen) = (
        crate::model::canonical(bound),
        crate::model::canonical(listen),
    );
    bound.port() == listen.port() && (bound.ip() == listen.ip() || bound.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_give_their_process_group_even_with_odd_command_names() {
        assert_eq!(
            process_group("123 (nginx: master) S 1 123 123 0 -1 4194560"),
            Some(123)
        );
        assert_eq!(process_group("7 (a) b) c) R 1 99 7 0"), Some(99));
        assert_eq!(process_group("garbage"), None);
        let stat = "7 (a) b) S 1 99 7 0 -1 4194560 0 0 0 0 1 2 0 0 20 0 1 0 123456 0 0";
        assert_eq!(stat_field(stat, 5), Some(99));
        assert_eq!(stat_field(stat, 22), Some(123456));
        assert!(start_time(std::process::id()).is_some());
    }

    #[test]
    fn socket_tables_are_read_as_the_kernel_writes_them() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1";
        let table = socket_table(tcp, "0A");
        assert_eq!(table.len(), 1, "only listeners");
        assert_eq!(table[&4242], "127.0.0.1:8080".parse().unwrap());
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0";
        assert_eq!(socket_table(tcp6, "0A")[&99], "[::1]:80".parse().unwrap());
    }

    #[test]
    fn unspecified_addresses_cover_every_address_of_their_port() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(covers(addr("0.0.0.0:80"), addr("127.0.0.1:80")));
        assert!(covers(addr("[::]:80"), addr("127.0.0.1:80")));
        assert!(covers(addr("127.0.0.1:80"), addr("127.0.0.1:80")));
        assert!(!covers(addr("127.0.0.1:81"), addr("127.0.0.1:80")));
        assert!(!covers(addr("127.0.0.2:80"), addr("127.0.0.1:80")));
    }
}
