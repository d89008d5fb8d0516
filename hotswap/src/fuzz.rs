//! Mangled control frames, for the fuzz runs: the daemon's unit layer feeds them to the real
//! decoder and request handler over a fake backend, and the integration tests send them to a
//! live daemon. Deterministic (a seeded xorshift), so a failure replays from its seed and
//! index. Built with the `fuzzing` feature, and for the crate's own tests.

use crate::{
    model::{parse_prefix, Binding, Protocol, ServiceName},
    protocol::{Envelope, Request, PROTOCOL_VERSION},
};

/// A small deterministic generator (xorshift64*); not for anything but choosing mutations.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced: xorshift would stay at 0).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The seed of a fuzz run: `HOTSWAP_FUZZ_SEED` when set (to try others), else `default` (so
/// the suite is the same every time).
pub fn seed(default: u64) -> u64 {
    std::env::var("HOTSWAP_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Frame bodies of every request, well formed, to mangle.
pub fn seeds() -> Vec<Vec<u8>> {
    let service: ServiceName = "web".parse().expect("a valid name");
    let binding = |protocol, prefix: &str, port| Binding {
        protocol,
        prefix: parse_prefix(prefix).expect("a valid prefix"),
        port,
    };
    let requests = [
        Request::Bind {
            service: service.clone(),
            binding: binding(Protocol::Tcp, "127.0.0.1/32", 8080),
            owner: None,
        },
        Request::Bind {
            service: "api".parse().expect("a valid name"),
            binding: binding(Protocol::Udp, "::/0", 0),
            owner: Some(crate::access::Owner {
                uid: Some(65534),
                gid: Some(64000),
            }),
        },
        Request::Chown {
            service: service.clone(),
            owner: crate::access::Owner {
                uid: None,
                gid: Some(64000),
            },
        },
        Request::Unbind {
            service: service.clone(),
            binding: binding(Protocol::Tcp, "127.0.0.1/32", 8080),
        },
        Request::Register {
            service: service.clone(),
            pid: std::process::id(),
            fds: vec![0, 1, 2],
            label: Some("grüße v2".into()),
            activate: true,
        },
        Request::Forget {
            service: service.clone(),
            generation: 1,
        },
        Request::Switch {
            service: service.clone(),
            generation: 2,
        },
        Request::Listener {
            service: service.clone(),
            protocol: Protocol::Tcp,
        },
        Request::Probe {
            service,
            generation: 1,
            source: "127.0.0.1:40000".parse().expect("a valid address"),
            socket: Some(3),
        },
        Request::Status,
        Request::Metrics,
        Request::Reload,
    ];
    framed(&requests)
}

/// Frame bodies of every request a supervisor takes, well formed, to mangle.
pub fn supervisor_seeds() -> Vec<Vec<u8>> {
    use crate::supervisor::{
        spec::{FdPassing, ReadyMode},
        SupervisorRequest,
    };
    let requests = [
        SupervisorRequest::Upgrade {
            command: Some(vec![
                "/usr/sbin/nginx".into(),
                "-g".into(),
                "daemon off;".into(),
            ]),
            ready: Some(ReadyMode::Delay(std::time::Duration::from_millis(20))),
            ready_timeout_ms: Some(5_000),
            pass_fds: Some(FdPassing::Nginx),
        },
        SupervisorRequest::Upgrade {
            command: None,
            ready: Some(ReadyMode::Notify),
            ready_timeout_ms: None,
            pass_fds: None,
        },
        SupervisorRequest::Rollback,
        SupervisorRequest::Reexec,
        SupervisorRequest::Status,
    ];
    framed(&requests)
}

/// Each of `requests` as a frame body of this protocol version.
fn framed<T: serde::Serialize>(requests: &[T]) -> Vec<Vec<u8>> {
    requests
        .iter()
        .map(|body| {
            serde_json::to_vec(&Envelope {
                version: PROTOCOL_VERSION,
                body,
            })
            .expect("requests serialise")
        })
        .collect()
}

/// Bytes that change a JSON text's meaning more often than random ones do.
const INTERESTING: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"\\",
    b"\\u0000",
    b"null",
    b"true",
    b"-1",
    b"0",
    b"4294967295",
    b"18446744073709551616",
    b"1e999",
    b"\xff",
    b"\x00",
    b"\"verb\":\"bind\"",
    b"::ffff:127.0.0.1/128",
    b"0.0.0.0/32",
    b"/",
    b"\x1b[2J",
];

/// One mangled body from `seeds`: none, one or two byte-level mutations, splices or
/// truncations (most mangled frames no longer decode; the unmangled third drives the handler
/// through every request in every order).
pub fn mangle(seeds: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut bytes = seeds[rng.below(seeds.len())].clone();
    for _ in 0..rng.below(3) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(7) {
            0 if !bytes.is_empty() => {
                let i = at.min(bytes.len() - 1);
                bytes[i] ^= 1 << rng.below(8);
            }
            1 => {
                let token = INTERESTING[rng.below(INTERESTING.len())];
                bytes.splice(at..at, token.iter().copied());
            }
            2 => {
                let end = (at + rng.below(16)).min(bytes.len());
                bytes.drain(at..end);
            }
            3 => {
                let end = (at + rng.below(32)).min(bytes.len());
                let copy: Vec<u8> = bytes[at..end].to_vec();
                bytes.splice(at..at, copy);
            }
            4 => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len());
                bytes.truncate(at);
                bytes.extend_from_slice(&other[from..]);
            }
            5 => bytes.truncate(at),
            _ => {
                let digits = rng.next_u64().to_string();
                bytes.splice(at..at, digits.bytes());
            }
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_mangles_the_same_way_and_seeds_decode() {
        let seeds = seeds();
        for seed in &seeds {
            crate::protocol::decode::<Request>(seed).expect("a seed is a valid request");
        }
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..100)
                .map(|_| mangle(&seeds, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    /// What a supervisor parses from a peer: 100,000 mangled frames decode or fail, and never
    /// panic (the handler behind it runs real processes, so the live tests drive it).
    #[test]
    fn a_hundred_thousand_mangled_supervisor_requests_decode_or_fail_cleanly() {
        let seeds = supervisor_seeds();
        let mut rng = Rng::new(seed(0x5eed));
        let decoded = (0..100_000)
            .filter(|_| {
                let input = mangle(&seeds, &mut rng);
                crate::protocol::decode::<crate::supervisor::SupervisorRequest>(&input).is_ok()
            })
            .count();
        assert!(decoded > 20_000, "only {decoded} inputs decoded");
    }
}
