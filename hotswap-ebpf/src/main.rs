//! The hotswap `sk_lookup` program.
//!
//! For every new TCP connection or UDP datagram in the network namespace it looks the
//! destination up in the bindings trie and, when a service owns it, assigns that service's
//! active socket. Traffic no binding claims is never touched (`SK_PASS`); traffic a binding
//! claims but no live socket serves is dropped (`SK_DROP`): a binding is a promise about who
//! serves the address, so it never falls through to some other listener.
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    macros::{map, sk_lookup},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, SockHash},
    programs::SkLookupContext,
};
use aya_log_ebpf::debug;
use hotswap_common::{
    BindingData, BindingValue, GenerationKey, GenerationRecord, OwnerRecord, ProbeKey,
    ServiceMetrics, ServiceRecord, SocketKey, BINDING_FULL_BITS, CONFIG_CHECK, CONFIG_DEBUG_LOG,
    CONFIG_ENTRIES, CONFIG_PROBES, FAMILY_IPV4, FAMILY_IPV6, MAX_BINDINGS, MAX_GENERATIONS,
    MAX_PROBES, MAX_SERVICES,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const ENOENT: i32 = 2;
const ESOCKTNOSUPPORT: i32 = 94;
/// BPF_SK_LOOKUP_F_REPLACE (1): while a new version of this program is attached beside the old
/// one during a program upgrade, both run; the second must be allowed to repeat the first's
/// choice instead of failing with EEXIST.
/// BPF_SK_LOOKUP_F_NO_REUSEPORT (2): the registered socket itself gets the connection, even if
/// it is in an SO_REUSEPORT group (as `hotswap run`'s UDP sockets of all generations are).
const SK_ASSIGN_FLAGS: u64 = 1 | 2;
/// Service id 0 is never assigned: it stands for "no service".
const NO_SERVICE: u32 = 0;
/// What a lookup that found no binding yields.
const NO_BINDING: BindingValue = BindingValue {
    service_id: NO_SERVICE,
    addr_prefix_len: 0,
};

#[map(name = "HS_BINDINGS")]
static BINDINGS: LpmTrie<BindingData, BindingValue> = LpmTrie::pinned(MAX_BINDINGS, 0);

#[map(name = "HS_SOCKETS")]
static SOCKETS: SockHash<SocketKey> = SockHash::pinned(MAX_SERVICES * 2, 0);

#[map(name = "HS_METRICS")]
static METRICS: PerCpuArray<ServiceMetrics> = PerCpuArray::pinned(MAX_SERVICES, 0);

#[map(name = "HS_PROBES")]
static PROBES: SockHash<ProbeKey> = SockHash::pinned(MAX_PROBES, 0);

#[map(name = "HS_CONFIG")]
static CONFIG: Array<u32> = Array::pinned(CONFIG_ENTRIES, 0);

// Not read by the program; declared here so one object file defines every pinned map.
#[map(name = "HS_SERVICES")]
static SERVICES: HashMap<u32, ServiceRecord> = HashMap::pinned(MAX_SERVICES, 0);

#[map(name = "HS_GENERATIONS")]
static GENERATIONS: HashMap<GenerationKey, GenerationRecord> = HashMap::pinned(MAX_GENERATIONS, 0);

#[map(name = "HS_OWNERS")]
static OWNERS: HashMap<u32, OwnerRecord> = HashMap::pinned(MAX_SERVICES, 0);

#[sk_lookup]
pub fn hotswap_steer(ctx: SkLookupContext) -> u32 {
    // Keep the user-space-only maps in the object file.
    let _ = (&SERVICES, &GENERATIONS);
    steer(&ctx)
}

#[inline(always)]
fn steer(ctx: &SkLookupContext) -> u32 {
    // Each context field is read once, at a constant offset from the context pointer: the
    // verifier refuses loads through a context pointer the compiler has offset.
    let lookup = ctx.lookup;
    // SAFETY: the kernel hands every sk_lookup program a valid context.
    let (family, protocol, port, ip4, ip6) = unsafe {
        (
            read_volatile(&raw const (*lookup).family),
            read_volatile(&raw const (*lookup).protocol),
            read_volatile(&raw const (*lookup).local_port),
            read_volatile(&raw const (*lookup).local_ip4),
            [
                read_volatile(&raw const (*lookup).local_ip6[0]),
                read_volatile(&raw const (*lookup).local_ip6[1]),
                read_volatile(&raw const (*lookup).local_ip6[2]),
                read_volatile(&raw const (*lookup).local_ip6[3]),
            ],
        )
    };
    let family = match family {
        AF_INET => FAMILY_IPV4,
        AF_INET6 => FAMILY_IPV6,
        _ => return SK_PASS,
    };
    let addr = mapped(family, ip4, ip6);
    let protocol = protocol as u8;
    // local_port is in host byte order.
    let port = port as u16;

    // The daemon reading back which socket a service's entry holds (see CONFIG_CHECK): only
    // while it adopts, only from and to the unspecified address and port 0.
    if let Some(&checked) = CONFIG.get(CONFIG_CHECK) {
        if checked != 0 {
            let (remote_port, remote_ip4, remote_ip6) = remote(lookup);
            let unspecified = port == 0
                && ip4 == 0
                && ip6[0] | ip6[1] | ip6[2] | ip6[3] == 0
                && remote_port == 0
                && remote_ip4 == 0
                && remote_ip6[0] | remote_ip6[1] | remote_ip6[2] | remote_ip6[3] == 0;
            if unspecified {
                let key = SocketKey::new(checked, protocol);
                return match SOCKETS.redirect_sk_lookup(ctx, key, SK_ASSIGN_FLAGS) {
                    Ok(()) => SK_PASS,
                    Err(_) => SK_DROP,
                };
            }
        }
    }

    // A readiness probe goes to the generation it probes, whatever the bindings say, and is
    // not counted. Only looked for while probes are in flight: the common path stays as it was.
    if CONFIG.get(CONFIG_PROBES).is_some_and(|n| *n != 0) {
        let (remote_port, remote_ip4, remote_ip6) = remote(lookup);
        let source = ProbeKey {
            protocol,
            family,
            // remote_port is in network byte order.
            port: remote_port.to_ne_bytes(),
            addr: mapped(family, remote_ip4, remote_ip6),
        };
        match PROBES.redirect_sk_lookup(ctx, source, SK_ASSIGN_FLAGS) {
            Ok(()) => return SK_PASS,
            // No route from this source: an ordinary connection.
            Err(err) if err == -ENOENT => {}
            // A route whose socket cannot take it (shut down, wrong family): the probe must
            // fail, never reach the active generation and pass for the new one's readiness.
            Err(_) => return SK_DROP,
        }
    }

    let binding = find_binding(protocol, family, port, addr);
    if binding.service_id == NO_SERVICE {
        return SK_PASS;
    }
    let service_id = binding.service_id;
    let debug_log = CONFIG.get(CONFIG_DEBUG_LOG).is_some_and(|on| *on != 0);
    let metrics = METRICS.get_ptr_mut(service_id);
    count(metrics, |m| m.lookups += 1);

    match SOCKETS.redirect_sk_lookup(ctx, SocketKey::new(service_id, protocol), SK_ASSIGN_FLAGS) {
        Ok(()) => {
            count(metrics, |m| m.steered += 1);
            if debug_log {
                debug!(
                    ctx,
                    "service {} proto {} port {}: steered", service_id, protocol, port
                );
            }
            SK_PASS
        }
        Err(err) => {
            // -ENOENT: nothing registered, or the socket closed and left the map.
            // -ESOCKTNOSUPPORT: the socket is still in the map but no longer listening (shut
            // down) or no longer bound. Both mean: no live socket.
            if err == -ENOENT || err == -ESOCKTNOSUPPORT {
                count(metrics, |m| m.no_socket += 1);
            } else {
                count(metrics, |m| m.errors += 1);
            }
            if debug_log {
                debug!(
                    ctx,
                    "service {} proto {} port {}: dropped, error {}",
                    service_id,
                    protocol,
                    port,
                    err
                );
            }
            SK_DROP
        }
    }
}

/// The lookup's source: port (network byte order), IPv4 and IPv6 address, each field read once
/// at a constant offset from the context pointer.
#[inline(always)]
fn remote(lookup: *mut aya_ebpf::bindings::bpf_sk_lookup) -> (u16, u32, [u32; 4]) {
    // SAFETY: the kernel hands every sk_lookup program a valid context.
    unsafe {
        (
            read_volatile(&raw const (*lookup).remote_port),
            read_volatile(&raw const (*lookup).remote_ip4),
            [
                read_volatile(&raw const (*lookup).remote_ip6[0]),
                read_volatile(&raw const (*lookup).remote_ip6[1]),
                read_volatile(&raw const (*lookup).remote_ip6[2]),
                read_volatile(&raw const (*lookup).remote_ip6[3]),
            ],
        )
    }
}

/// An address as the maps store it: IPv6, or IPv4 as v4-mapped IPv6, in network byte order.
#[inline(always)]
fn mapped(family: u8, ip4: u32, ip6: [u32; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    if family == FAMILY_IPV4 {
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..16].copy_from_slice(&ip4.to_ne_bytes());
    } else {
        for (i, word) in ip6.iter().enumerate() {
            addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
    }
    addr
}

/// Two lookups, as tubular does: the exact port, then port 0 (every port). The longer address
/// prefix wins; on a tie the explicit port does. A missing entry is [`NO_BINDING`], not `None`:
/// with an `Option` the compiler reads the payload of a `None` from a stack slot it never
/// wrote, which kernels before 6.3 (Debian 12's 6.1) refuse ("invalid read from stack").
#[inline(always)]
fn find_binding(protocol: u8, family: u8, port: u16, addr: [u8; 16]) -> BindingValue {
    let lookup = |port: [u8; 2]| {
        BINDINGS
            .get(Key::new(
                BINDING_FULL_BITS,
                BindingData {
                    protocol,
                    family,
                    port,
                    addr,
                },
            ))
            .copied()
            .unwrap_or(NO_BINDING)
    };
    let exact = lookup(port.to_be_bytes());
    let wildcard = lookup([0, 0]);
    // A missing wildcard has prefix length 0, which never beats a present exact match.
    if exact.service_id == NO_SERVICE || wildcard.addr_prefix_len > exact.addr_prefix_len {
        wildcard
    } else {
        exact
    }
}

#[inline(always)]
fn count(metrics: Option<*mut ServiceMetrics>, update: impl FnOnce(&mut ServiceMetrics)) {
    if let Some(metrics) = metrics {
        // SAFETY: a per-CPU slot; this program is its only writer on this CPU.
        update(unsafe { &mut *metrics });
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
