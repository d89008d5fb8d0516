//! The classic BPF program attached to a service's `SO_REUSEPORT` group with
//! `SO_ATTACH_REUSEPORT_CBPF`: it returns the index of the group member that gets a new
//! connection (or datagram). Attaching one needs no capability and no `bpf()` call; replacing
//! it (one `setsockopt` on any member) is the switch, atomic for every CPU.
//!
//! The program sees the packet with its data starting *after* the transport header, but loads
//! relative to `SKF_NET_OFF` read the IP header and the transport header's first bytes, so a
//! readiness probe from a known source address and port can be sent to a member that is not
//! active yet. An index past the group's last member makes the kernel fall back to its hash.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// Loads relative to the network header (`SKF_NET_OFF`, `include/uapi/linux/filter.h`).
const NET: u32 = (-0x100000_i32) as u32;

// Opcodes (`include/uapi/linux/bpf_common.h`): class | size | mode, class | op | source.
const BPF_LD: u16 = 0x00;
const BPF_ALU: u16 = 0x04;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_W: u16 = 0x00;
const BPF_H: u16 = 0x08;
const BPF_B: u16 = 0x10;
const BPF_ABS: u16 = 0x20;
const BPF_K: u16 = 0x00;
const LD_W_ABS: u16 = BPF_LD | BPF_W | BPF_ABS;
const LD_H_ABS: u16 = BPF_LD | BPF_H | BPF_ABS;
const LD_B_ABS: u16 = BPF_LD | BPF_B | BPF_ABS;
const ALU_RSH_K: u16 = BPF_ALU | 0x70 | BPF_K;
const ALU_AND_K: u16 = BPF_ALU | 0x50 | BPF_K;
const JMP_JEQ_K: u16 = BPF_JMP | 0x10 | BPF_K;
const RET_K: u16 = BPF_RET | BPF_K;

/// The kernel's limit on a classic program (`BPF_MAXINSNS`) is far above what we emit; a jump
/// offset is one byte, which bounds how many probes one program can route.
pub const MAX_PROBES: usize = 8;

/// What the program does: probes first (source address and port → member index), then the
/// active member for everything else (`None`: the kernel's hash picks).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Choice {
    /// The index of the active member.
    pub active: Option<u32>,
    /// Probe sources and the index each goes to.
    pub probes: Vec<(SocketAddr, u32)>,
}

/// The index the kernel falls back from to its hash: past any group's last member.
const NO_MEMBER: u32 = u32::MAX;

/// Where a jump goes.
#[derive(Clone, Copy)]
enum To {
    /// The next instruction.
    Next,
    /// A numbered label.
    Label(usize),
}

struct Asm {
    code: Vec<(u16, To, To, u32)>,
    labels: Vec<Option<usize>>,
}

impl Asm {
    fn new() -> Self {
        Self {
            code: Vec::new(),
            labels: Vec::new(),
        }
    }
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }
    fn here(&mut self, label: usize) {
        self.labels[label] = Some(self.code.len());
    }
    fn op(&mut self, code: u16, k: u32) {
        self.code.push((code, To::Next, To::Next, k));
    }
    /// If A == k go on, else jump to `otherwise`.
    fn expect(&mut self, k: u32, otherwise: usize) {
        self.code
            .push((JMP_JEQ_K, To::Next, To::Label(otherwise), k));
    }
    fn finish(self) -> Vec<libc::sock_filter> {
        let at = |i: usize, to: To| -> u8 {
            let target = match to {
                To::Next => i + 1,
                To::Label(l) => self.labels[l].expect("every label is placed"),
            };
            u8::try_from(target - (i + 1)).expect("jumps stay within MAX_PROBES' reach")
        };
        self.code
            .iter()
            .enumerate()
            .map(|(i, &(code, jt, jf, k))| libc::sock_filter {
                code,
                jt: at(i, jt),
                jf: at(i, jf),
                k,
            })
            .collect()
    }
}

/// The program for `choice`.
pub fn assemble(choice: &Choice) -> Vec<libc::sock_filter> {
    let active = choice.active.unwrap_or(NO_MEMBER);
    let mut asm = Asm::new();
    let probes: Vec<(SocketAddr, u32)> = choice
        .probes
        .iter()
        .map(|&(source, index)| (crate::model::canonical(source), index))
        .collect();
    if !probes.is_empty() {
        let to_active = asm.label();
        let v6 = asm.label();
        // The IP version: the high nibble of the first byte.
        asm.op(LD_B_ABS, NET);
        asm.op(ALU_RSH_K, 4);
        asm.expect(4, v6);
        // IPv4: the transport header follows a 20-byte header only without options (the
        // supervisor's probes never set any).
        asm.op(LD_B_ABS, NET);
        asm.op(ALU_AND_K, 0x0f);
        asm.expect(5, to_active);
        for &(source, index) in probes.iter().filter(|(s, _)| s.is_ipv4()) {
            let next = asm.label();
            let IpAddr::V4(ip) = source.ip() else {
                unreachable!("filtered")
            };
            asm.op(LD_W_ABS, NET + 12);
            asm.expect(u32::from(ip), next);
            asm.op(LD_H_ABS, NET + 20);
            asm.expect(u32::from(source.port()), next);
            asm.op(RET_K, index);
            asm.here(next);
        }
        asm.op(RET_K, active);
        asm.here(v6);
        asm.expect(6, to_active);
        for &(source, index) in probes.iter().filter(|(s, _)| s.is_ipv6()) {
            let next = asm.label();
            let IpAddr::V6(ip) = source.ip() else {
                unreachable!("filtered")
            };
            let octets = ip.octets();
            for (word, chunk) in octets.chunks(4).enumerate() {
                asm.op(LD_W_ABS, NET + 8 + 4 * word as u32);
                asm.expect(u32::from_be_bytes(chunk.try_into().expect("4 bytes")), next);
            }
            asm.op(LD_H_ABS, NET + 40);
            asm.expect(u32::from(source.port()), next);
            asm.op(RET_K, index);
            asm.here(next);
        }
        asm.here(to_active);
    }
    asm.op(RET_K, active);
    asm.finish()
}

/// Attaches `program` to the `SO_REUSEPORT` group of `member` (replacing the one before).
pub fn attach(member: BorrowedFd<'_>, program: &[libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: u16::try_from(program.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: fprog points at `program`, alive for the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            member.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&raw const fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether an error of [`probe_support`] says this kernel or this process cannot have
/// reuseport programs at all (rather than a passing failure such as EMFILE).
pub fn unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(
            libc::ENOPROTOOPT
                | libc::EINVAL
                | libc::EPERM
                | libc::EACCES
                | libc::ENOSYS
                | libc::EOPNOTSUPP
        )
    )
}

/// Whether this kernel takes a reuseport program from this process: attaches one to a socket
/// of its own (bound to a kernel-chosen port of the unspecified address, never listening).
pub fn probe_support() -> io::Result<()> {
    use std::os::fd::AsFd as _;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    socket.set_reuse_port(true)?;
    socket.bind(&SocketAddr::from(([0, 0, 0, 0], 0)).into())?;
    attach(socket.as_fd(), &assemble(&Choice::default()))
}

#[cfg(test)]
mod tests {
    use std::{
        io::ErrorKind,
        net::{TcpListener, TcpStream},
        os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
        time::{Duration, Instant},
    };

    use super::*;
    use crate::{model::Protocol, socket::bound_socket};

    /// Which of `members` accepted the connection just made.
    fn receiver(members: &[TcpListener]) -> Option<usize> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            for (i, member) in members.iter().enumerate() {
                match member.accept() {
                    Ok(_) => return Some(i),
                    Err(err) if err.kind() == ErrorKind::WouldBlock => {}
                    Err(err) => panic!("accept: {err}"),
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    fn group(n: usize) -> (SocketAddr, Vec<TcpListener>) {
        let first: OwnedFd =
            bound_socket("127.0.0.1:0".parse().unwrap(), Protocol::Tcp, true, false).unwrap();
        let addr = crate::socket::local_addr(first.as_fd()).unwrap();
        let mut members = vec![TcpListener::from(first)];
        for _ in 1..n {
            members.push(TcpListener::from(
                bound_socket(addr, Protocol::Tcp, true, false).unwrap(),
            ));
        }
        for m in &members {
            m.set_nonblocking(true).unwrap();
        }
        (addr, members)
    }

    #[test]
    fn the_program_picks_the_member_and_probes_reach_theirs() {
        let (addr, members) = group(3);
        for active in [2, 0, 1] {
            let choice = Choice {
                active: Some(active),
                probes: vec![],
            };
            attach(members[0].as_fd(), &assemble(&choice)).unwrap();
            for _ in 0..5 {
                let _client = TcpStream::connect(addr).unwrap();
                assert_eq!(receiver(&members), Some(active as usize));
            }
        }
        // A probe from a known source reaches member 2; everyone else still reaches 0.
        let probe =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        probe
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let source = probe.local_addr().unwrap().as_socket().unwrap();
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let choice = Choice {
            active: Some(0),
            probes: vec![(other, 1), (source, 2)],
        };
        attach(members[1].as_fd(), &assemble(&choice)).unwrap();
        probe.connect(&addr.into()).unwrap();
        assert_eq!(receiver(&members), Some(2));
        for _ in 0..5 {
            let _client = TcpStream::connect(addr).unwrap();
            assert_eq!(receiver(&members), Some(0));
        }
    }

    #[test]
    fn a_member_that_leaves_is_replaced_by_the_last() {
        // The kernel's rule the backend's model follows (Vec::swap_remove): the last member
        // moves into the slot of the one that left.
        let (addr, mut members) = group(3);
        let choice = Choice {
            active: Some(0),
            probes: vec![],
        };
        attach(members[1].as_fd(), &assemble(&choice)).unwrap();
        drop(members.swap_remove(0));
        // Member 2 is now index 0.
        for _ in 0..5 {
            let _client = TcpStream::connect(addr).unwrap();
            assert_eq!(receiver(&members), Some(0));
        }
        // shutdown() leaves the group as a close does.
        nix::sys::socket::shutdown(members[0].as_raw_fd(), nix::sys::socket::Shutdown::Both)
            .unwrap();
        // A listen() again joins at the end; the other moved into slot 0.
        crate::socket::listen_again(members[0].as_fd()).unwrap();
        let choice = Choice {
            active: Some(1),
            probes: vec![],
        };
        attach(members[1].as_fd(), &assemble(&choice)).unwrap();
        for _ in 0..5 {
            let _client = TcpStream::connect(addr).unwrap();
            assert_eq!(receiver(&members), Some(0));
        }
    }

    #[test]
    fn this_kernel_takes_reuseport_programs() {
        probe_support().unwrap();
    }
}
