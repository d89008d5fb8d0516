//! Types shared by the `hotswap-ebpf` sk_lookup program and the `hotswap` user-space crate.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel copies these structs in and out of BPF
//! maps byte for byte, so their layout is part of the pinned state and must not change casually.
//! With the `user` feature they implement [`aya::Pod`].
#![no_std]

/// IP protocol number of TCP, as `bpf_sk_lookup.protocol` reports it.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP, as `bpf_sk_lookup.protocol` reports it.
pub const PROTO_UDP: u8 = 17;

/// Most bindings the bindings LPM trie holds.
pub const MAX_BINDINGS: u32 = 65_536;
/// Most services; service ids run from 1 to `MAX_SERVICES - 1` (0 means "none").
pub const MAX_SERVICES: u32 = 4_096;
/// Most generations remembered at once across all services.
pub const MAX_GENERATIONS: u32 = 65_536;
/// Most readiness probes in flight at once (one per generation being started).
pub const MAX_PROBES: u32 = 1_024;
/// Longest service name in bytes.
pub const MAX_SERVICE_NAME: usize = 63;
/// Longest generation label in bytes.
pub const MAX_LABEL: usize = 64;

/// Map names; they are also the file names of the pins in the state directory.
/// The kernel keeps at most 15 characters of a map name.
pub mod map_names {
    /// `LpmTrie<BindingData, BindingValue>`.
    pub const BINDINGS: &str = "HS_BINDINGS";
    /// `SockHash<SocketKey>`: the active listener per (service, protocol).
    pub const SOCKETS: &str = "HS_SOCKETS";
    /// `PerCpuArray<ServiceMetrics>` indexed by service id.
    pub const METRICS: &str = "HS_METRICS";
    /// `Array<u32>` of runtime switches, indexed by the `CONFIG_*` constants.
    pub const CONFIG: &str = "HS_CONFIG";
    /// `HashMap<u32, ServiceRecord>`: service id → name. Only user space reads it.
    pub const SERVICES: &str = "HS_SERVICES";
    /// `SockHash<ProbeKey>`: where a readiness probe's connection goes, by its source.
    pub const PROBES: &str = "HS_PROBES";
    /// `HashMap<GenerationKey, GenerationRecord>`. Only user space reads it.
    pub const GENERATIONS: &str = "HS_GENERATIONS";
    /// `HashMap<u32, OwnerRecord>`: service id → who owns it besides root. Only user space
    /// reads it. A map of its own, so state pinned before owners existed is adopted as it is
    /// (this map is made empty beside it).
    pub const OWNERS: &str = "HS_OWNERS";
}

/// Index in the config map: non-zero turns on the program's aya-log debug lines.
pub const CONFIG_DEBUG_LOG: u32 = 0;
/// Index in the config map: the number of readiness probes in [`map_names::PROBES`]; while it
/// is zero the program does not look there.
pub const CONFIG_PROBES: u32 = 1;
/// Index in the config map: while non-zero, a lookup from and to `0.0.0.0:0` or `[::]:0`
/// goes to this service id's active socket for its protocol, uncounted and whatever the
/// bindings say: the daemon's own `BPF_PROG_TEST_RUN` reads back which socket the kernel
/// steers a service to (a sockhash's values cannot be read from user space), while it adopts
/// pinned state. No received packet reaches a socket lookup addressed to the unspecified
/// address: the kernel does not deliver it locally.
pub const CONFIG_CHECK: u32 = 2;
/// Entries in the config map.
pub const CONFIG_ENTRIES: u32 = 4;

/// [`BindingData::family`] of an IPv4 binding.
pub const FAMILY_IPV4: u8 = 4;
/// [`BindingData::family`] of an IPv6 binding.
pub const FAMILY_IPV6: u8 = 6;

/// Bits of [`BindingData`] before the address: protocol, family and port.
pub const BINDING_HEADER_BITS: u32 = 32;
/// Bits of a whole [`BindingData`]: the prefix length of a full-length lookup key.
pub const BINDING_FULL_BITS: u32 = BINDING_HEADER_BITS + 128;

/// The data part of a bindings LPM-trie key (the prefix length travels beside it).
///
/// Bytes are matched most significant bit first, so the port and the address are in network
/// byte order. IPv4 addresses are stored as v4-mapped IPv6 (`::ffff:a.b.c.d`), so an IPv4 /24
/// is a prefix of `BINDING_HEADER_BITS + 96 + 24` bits. The family byte keeps the two address
/// families apart, so `::/0` claims IPv6 traffic only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindingData {
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub protocol: u8,
    /// `FAMILY_IPV4` or `FAMILY_IPV6`.
    pub family: u8,
    /// Port in network byte order; 0 means every port.
    pub port: [u8; 2],
    /// IPv6 or v4-mapped IPv4 address, network byte order.
    pub addr: [u8; 16],
}

/// The value of a bindings entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindingValue {
    /// The service the binding steers to.
    pub service_id: u32,
    /// The address prefix length in the v6 address space (0..=128), kept so the program can
    /// compare an exact-port match with a port-0 match: the longer prefix wins, a tie goes to
    /// the explicit port.
    pub addr_prefix_len: u32,
}

/// Key of the probes map: the source of a readiness probe's connection. A connection from
/// exactly this protocol, address and port is handed to the socket stored under it (the
/// generation being probed), ahead of every binding and uncounted, so that the supervisor
/// reaches a generation that is not active yet on the service's own address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProbeKey {
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub protocol: u8,
    /// `FAMILY_IPV4` or `FAMILY_IPV6`.
    pub family: u8,
    /// Source port in network byte order.
    pub port: [u8; 2],
    /// Source address: IPv6, or IPv4 as v4-mapped IPv6; network byte order.
    pub addr: [u8; 16],
}

/// Key of the sockets map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketKey {
    /// Service id.
    pub service_id: u32,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub protocol: u8,
    /// Always zero.
    pub pad: [u8; 3],
}

impl SocketKey {
    /// The key of a service's active socket for a protocol.
    pub const fn new(service_id: u32, protocol: u8) -> Self {
        Self {
            service_id,
            protocol,
            pad: [0; 3],
        }
    }
}

/// Per-service counters, one copy per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceMetrics {
    /// Lookups that matched one of the service's bindings.
    pub lookups: u64,
    /// Lookups handed to the service's active socket.
    pub steered: u64,
    /// Lookups dropped because the service had no live socket for the protocol (the client sees
    /// a refused connection).
    pub no_socket: u64,
    /// Lookups dropped because assigning the socket failed (e.g. an IPv4-only socket for an
    /// IPv6 destination).
    pub errors: u64,
}

/// A service's name and bookkeeping, stored in the kernel so a restarted daemon adopts it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    /// Name bytes; `name_len` of them are used.
    pub name: [u8; MAX_SERVICE_NAME + 1],
    /// Used bytes of `name`.
    pub name_len: u32,
    /// The id the next registered generation gets.
    pub next_generation: u32,
    /// Generation active for TCP (0 = none).
    pub active_tcp: u32,
    /// Generation active for UDP (0 = none).
    pub active_udp: u32,
}

impl ServiceRecord {
    /// A record named `name` (cut to [`MAX_SERVICE_NAME`] bytes).
    pub fn new(name: &[u8], next_generation: u32, active_tcp: u32, active_udp: u32) -> Self {
        let len = name.len().min(MAX_SERVICE_NAME);
        let mut record = Self {
            name: [0; MAX_SERVICE_NAME + 1],
            name_len: len as u32,
            next_generation,
            active_tcp,
            active_udp,
        };
        record.name[..len].copy_from_slice(&name[..len]);
        record
    }

    /// The used bytes of the name.
    pub fn name_bytes(&self) -> &[u8] {
        &self.name[..(self.name_len as usize).min(MAX_SERVICE_NAME)]
    }
}

/// [`OwnerRecord::has`] bit: `uid` is set.
pub const OWNER_HAS_UID: u32 = 1;
/// [`OwnerRecord::has`] bit: `gid` is set.
pub const OWNER_HAS_GID: u32 = 2;

/// Who owns a service besides root.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerRecord {
    /// The owning uid, where `has & OWNER_HAS_UID`.
    pub uid: u32,
    /// The owning gid, where `has & OWNER_HAS_GID`.
    pub gid: u32,
    /// Which of the two are set.
    pub has: u32,
}

/// Key of the generations map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GenerationKey {
    /// Service id.
    pub service_id: u32,
    /// Generation id within the service.
    pub generation: u32,
}

/// Slot of a generation's TCP socket in [`GenerationRecord`]'s arrays.
pub const SLOT_TCP: usize = 0;
/// Slot of a generation's UDP socket in [`GenerationRecord`]'s arrays.
pub const SLOT_UDP: usize = 1;

/// A registered generation (at most one socket per protocol), stored in the kernel so a
/// restarted daemon can take its sockets again from the owning process (pid + fd numbers,
/// checked against the socket cookies).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenerationRecord {
    /// Socket cookies (`SO_COOKIE`) by slot; 0 where the generation has no such socket.
    pub cookies: [u64; 2],
    /// Registration time, seconds since the Unix epoch.
    pub registered_at: u64,
    /// Owning process.
    pub pid: u32,
    /// The sockets' fd numbers in the owning process by slot; -1 where there is none.
    pub fds: [i32; 2],
    /// Used bytes of `label`.
    pub label_len: u8,
    /// Always zero.
    pub pad: [u8; 3],
    /// Optional human label.
    pub label: [u8; MAX_LABEL],
}

impl GenerationRecord {
    /// The used bytes of the label (empty for none).
    pub fn label_bytes(&self) -> &[u8] {
        &self.label[..(self.label_len as usize).min(MAX_LABEL)]
    }

    /// Sets the label (cut to [`MAX_LABEL`] bytes).
    pub fn set_label(&mut self, label: &[u8]) {
        let len = label.len().min(MAX_LABEL);
        self.label = [0; MAX_LABEL];
        self.label[..len].copy_from_slice(&label[..len]);
        self.label_len = len as u8;
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] structs of integers and byte arrays with no padding
    // holes the kernel could read uninitialised.
    unsafe impl aya::Pod for BindingData {}
    unsafe impl aya::Pod for BindingValue {}
    unsafe impl aya::Pod for SocketKey {}
    unsafe impl aya::Pod for ProbeKey {}
    unsafe impl aya::Pod for ServiceMetrics {}
    unsafe impl aya::Pod for ServiceRecord {}
    unsafe impl aya::Pod for OwnerRecord {}
    unsafe impl aya::Pod for GenerationKey {}
    unsafe impl aya::Pod for GenerationRecord {}
}
