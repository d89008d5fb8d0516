//! The words of the domain: service names, protocols and bindings, with their parsing rules.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use hotswap_common::{
    BindingData, BINDING_HEADER_BITS, FAMILY_IPV4, FAMILY_IPV6, MAX_SERVICE_NAME, PROTO_TCP,
    PROTO_UDP, SLOT_TCP, SLOT_UDP,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Why a word from the command line or the control socket was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// The service name breaks the naming rule.
    #[error("invalid service name {0:?}: use 1-63 of a-z, 0-9, '_' and '-', starting with a letter or digit")]
    ServiceName(String),
    /// Neither `tcp` nor `udp`.
    #[error("invalid protocol {0:?}: expected tcp or udp")]
    Protocol(String),
    /// Not an address with a prefix length.
    #[error("invalid prefix {0:?}: expected an address with a prefix length, e.g. 127.0.0.1/32 or ::1/128")]
    Prefix(String),
    /// The prefix has bits set past its length.
    #[error("invalid prefix {given}: host bits are set past /{len}; did you mean {truncated}?")]
    PrefixHostBits {
        /// What was given.
        given: IpNet,
        /// Its prefix length.
        len: u8,
        /// The same prefix with the host bits cleared.
        truncated: IpNet,
    },
    /// `0.0.0.0/32` or `::/128`: no connection is addressed there.
    #[error("invalid prefix {0}: no connection is addressed to the unspecified address; use {any} for every address", any = ipnet::IpNet::new(.0.addr(), 0).expect("0 is a valid prefix length"))]
    UnspecifiedHost(IpNet),
    /// Not a number from 0 to 65535.
    #[error("invalid port {0:?}: expected 0-65535 (0 means every port)")]
    Port(String),
    /// A binding that is not three words.
    #[error("invalid binding {0:?}: expected `tcp|udp PREFIX PORT`, e.g. \"tcp 0.0.0.0/0 80\"")]
    Binding(String),
    /// A label that does not fit.
    #[error("label is {0} bytes long; at most {max} are allowed", max = hotswap_common::MAX_LABEL)]
    LabelTooLong(usize),
}

/// A service name: `[a-z0-9][a-z0-9_-]{0,62}`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceName(String);

impl ServiceName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ServiceName {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        let first_ok = bytes
            .first()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let rest_ok = bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-');
        if first_ok && rest_ok && bytes.len() <= MAX_SERVICE_NAME {
            Ok(Self(s.to_owned()))
        } else {
            Err(ParseError::ServiceName(s.to_owned()))
        }
    }
}

impl TryFrom<String> for ServiceName {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ServiceName> for String {
    fn from(name: ServiceName) -> Self {
        name.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A transport protocol hotswap steers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP: the socket must be listening.
    Tcp,
    /// UDP: the socket must be bound and not connected.
    Udp,
}

impl Protocol {
    /// The IP protocol number the kernel uses.
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }

    /// Its slot in a `GenerationRecord`'s per-protocol arrays.
    pub const fn slot(self) -> usize {
        match self {
            Self::Tcp => SLOT_TCP,
            Self::Udp => SLOT_UDP,
        }
    }

    /// The protocol with this IP protocol number.
    pub const fn from_number(number: u8) -> Option<Self> {
        match number {
            PROTO_TCP => Some(Self::Tcp),
            PROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

impl FromStr for Protocol {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            _ => Err(ParseError::Protocol(s.to_owned())),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// Parses a prefix such as `127.0.0.1/32` or `::/0`; host bits past the length are refused
/// rather than silently cleared, because they usually mean a typo. A v4-mapped IPv6 prefix
/// (`::ffff:127.0.0.1/128`) is the IPv4 prefix it maps (`127.0.0.1/32`): one address, one
/// spelling.
pub fn parse_prefix(s: &str) -> Result<IpNet, ParseError> {
    let net: IpNet = s.parse().map_err(|_| ParseError::Prefix(s.to_owned()))?;
    normalise_prefix(net)
}

/// A prefix in its one spelling (see [`parse_prefix`]), or why it has none. Every prefix that
/// enters hotswap — typed, or over the wire — goes through here, so each binding is one that
/// `status` shows and `unbind` removes as it was given.
pub fn normalise_prefix(mut net: IpNet) -> Result<IpNet, ParseError> {
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.addr().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            net = IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).expect("at most 32 bits");
        }
    }
    if net.trunc() != net {
        return Err(ParseError::PrefixHostBits {
            given: net,
            len: net.prefix_len(),
            truncated: net.trunc(),
        });
    }
    Ok(net)
}

/// Refuses a prefix no connection can match, for `bind`: `0.0.0.0/32` and `::/128` (the
/// unspecified address is never a destination). `unbind` accepts them, so such a binding
/// made by an older version can still be removed.
pub fn check_bindable(prefix: &IpNet) -> Result<(), ParseError> {
    if prefix.addr().is_unspecified() && prefix.prefix_len() == prefix.max_prefix_len() {
        return Err(ParseError::UnspecifiedHost(*prefix));
    }
    Ok(())
}

/// Parses a port; 0 means every port.
pub fn parse_port(s: &str) -> Result<u16, ParseError> {
    s.parse().map_err(|_| ParseError::Port(s.to_owned()))
}

/// `text` cut to at most [`hotswap_common::MAX_LABEL`] bytes on a character boundary, to be a
/// label (a command line made into one, say).
pub fn label_from(text: &str) -> String {
    let mut end = text.len().min(hotswap_common::MAX_LABEL);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// `text` as it may reach a terminal: control characters (escape sequences, newlines, BEL…)
/// written as `\u{1b}`, so a label, a command line or a server's `STATUS=` can neither
/// forge lines nor drive the terminal.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// Checks a generation label's length.
pub fn check_label(label: &str) -> Result<(), ParseError> {
    if label.len() > hotswap_common::MAX_LABEL {
        return Err(ParseError::LabelTooLong(label.len()));
    }
    Ok(())
}

/// (protocol, prefix, port): the address space a binding claims for a service. Deserialising
/// normalises the prefix as the command line does (and refuses host bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "WireBinding")]
pub struct Binding {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Destination prefix.
    pub prefix: IpNet,
    /// Destination port, 0 for every port.
    pub port: u16,
}

/// A [`Binding`] as it arrives, before its prefix is normalised.
#[derive(Deserialize)]
struct WireBinding {
    protocol: Protocol,
    prefix: IpNet,
    port: u16,
}

impl TryFrom<WireBinding> for Binding {
    type Error = ParseError;

    fn try_from(wire: WireBinding) -> Result<Self, ParseError> {
        Ok(Self {
            protocol: wire.protocol,
            prefix: normalise_prefix(wire.prefix)?,
            port: wire.port,
        })
    }
}

impl Binding {
    /// The prefix length in the v6 address space the trie uses (IPv4 is v4-mapped).
    pub fn addr_prefix_len(&self) -> u32 {
        match self.prefix {
            IpNet::V4(net) => 96 + u32::from(net.prefix_len()),
            IpNet::V6(net) => u32::from(net.prefix_len()),
        }
    }

    /// The LPM-trie key: prefix length in bits and data.
    pub fn trie_key(&self) -> (u32, BindingData) {
        let (family, addr) = map_address(self.prefix.network());
        (
            BINDING_HEADER_BITS + self.addr_prefix_len(),
            BindingData {
                protocol: self.protocol.number(),
                family,
                port: self.port.to_be_bytes(),
                addr,
            },
        )
    }

    /// The binding a trie key describes, if it is one hotswap could have written.
    pub fn from_trie_key(prefix_len: u32, data: &BindingData) -> Option<Self> {
        let protocol = Protocol::from_number(data.protocol)?;
        let addr_len = prefix_len.checked_sub(BINDING_HEADER_BITS)?;
        let v6 = std::net::Ipv6Addr::from(data.addr);
        let prefix = match data.family {
            FAMILY_IPV4 => IpNet::new(
                IpAddr::V4(v6.to_ipv4_mapped()?),
                u8::try_from(addr_len.checked_sub(96)?).ok()?,
            )
            .ok()?,
            FAMILY_IPV6 => IpNet::new(IpAddr::V6(v6), u8::try_from(addr_len).ok()?).ok()?,
            _ => return None,
        };
        Some(Self {
            protocol,
            prefix,
            port: u16::from_be_bytes(data.port),
        })
    }
}

/// `tcp|udp PREFIX PORT`, as `hotswap bind` takes it and [`Binding`]'s `Display` writes it.
impl FromStr for Binding {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        let words: Vec<&str> = s.split_whitespace().collect();
        let [protocol, prefix, port] = words[..] else {
            return Err(ParseError::Binding(s.to_owned()));
        };
        Ok(Self {
            protocol: protocol.parse()?,
            prefix: parse_prefix(prefix)?,
            port: parse_port(port)?,
        })
    }
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.protocol, self.prefix, self.port)
    }
}

/// An address as the maps store it: its family byte (`FAMILY_IPV4`/`FAMILY_IPV6`) and 16
/// bytes, IPv4 as v4-mapped IPv6, in network byte order.
pub fn map_address(ip: IpAddr) -> (u8, [u8; 16]) {
    match ip {
        IpAddr::V4(v4) => (FAMILY_IPV4, v4.to_ipv6_mapped().octets()),
        IpAddr::V6(v6) => (FAMILY_IPV6, v6.octets()),
    }
}

/// An address as the kernel reports the other end of a connection: an IPv4-mapped IPv6
/// address (`::ffff:a.b.c.d`, from a dual-stack socket) is the IPv4 address it maps.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        for ok in ["web", "a", "0", "web-1_x", &"a".repeat(63)] {
            assert!(ok.parse::<ServiceName>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-web",
            "_web",
            "Web",
            "we b",
            "wéb",
            &"a".repeat(64),
            "web/1",
        ] {
            assert!(bad.parse::<ServiceName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn protocols_and_ports() {
        assert_eq!("tcp".parse(), Ok(Protocol::Tcp));
        assert_eq!("udp".parse(), Ok(Protocol::Udp));
        assert!("TCP".parse::<Protocol>().is_err());
        assert_eq!(parse_port("0"), Ok(0));
        assert_eq!(parse_port("65535"), Ok(65535));
        assert!(parse_port("65536").is_err());
        assert!(parse_port("-1").is_err());
        assert!(parse_port("http").is_err());
    }

    #[test]
    fn prefixes() {
        assert!(parse_prefix("127.0.0.1/32").is_ok());
        assert!(parse_prefix("::/0").is_ok());
        assert!(parse_prefix("127.0.0.1").is_err());
        assert!(parse_prefix("127.0.0.1/33").is_err());
        assert_eq!(
            parse_prefix("::ffff:127.0.0.1/128").unwrap(),
            parse_prefix("127.0.0.1/32").unwrap()
        );
        assert_eq!(
            parse_prefix("::ffff:0.0.0.0/96").unwrap(),
            parse_prefix("0.0.0.0/0").unwrap()
        );
        assert!(matches!(parse_prefix("::/0").unwrap(), IpNet::V6(_)));
        let err = parse_prefix("192.0.2.1/24").unwrap_err();
        assert!(err.to_string().contains("192.0.2.0/24"), "{err}");
    }

    #[test]
    fn trie_keys_round_trip() {
        for (proto, prefix, port) in [
            (Protocol::Tcp, "127.0.0.1/32", 8080),
            (Protocol::Udp, "192.0.2.0/24", 0),
            (Protocol::Tcp, "::1/128", 443),
            (Protocol::Udp, "2001:db8::/32", 53),
            (Protocol::Tcp, "0.0.0.0/0", 0),
            (Protocol::Tcp, "::/0", 0),
            (Protocol::Tcp, "::/96", 0),
            (Protocol::Tcp, "64:ff9b::/96", 0),
        ] {
            let binding = Binding {
                protocol: proto,
                prefix: parse_prefix(prefix).unwrap(),
                port,
            };
            let (len, data) = binding.trie_key();
            assert_eq!(
                Binding::from_trie_key(len, &data),
                Some(binding),
                "{binding}"
            );
        }
    }

    #[test]
    fn ipv4_is_v4_mapped() {
        let binding = Binding {
            protocol: Protocol::Tcp,
            prefix: parse_prefix("192.0.2.0/24").unwrap(),
            port: 80,
        };
        let (len, data) = binding.trie_key();
        assert_eq!(len, 32 + 96 + 24);
        assert_eq!(&data.addr[10..13], &[0xff, 0xff, 192]);
        assert_eq!(data.family, FAMILY_IPV4);
        assert_eq!(data.port, [0, 80]);
    }

    #[test]
    fn labels_made_from_text_are_cut_on_a_character_boundary() {
        let command = format!("{} grüße", "x".repeat(60));
        let label = label_from(&command);
        assert_eq!(label, format!("{} gr", "x".repeat(60)));
        assert!(check_label(&label).is_ok());
        assert_eq!(label_from("short"), "short");
        assert_eq!(label_from(&"ü".repeat(40)).len(), 64);
    }

    #[test]
    fn control_characters_are_escaped_for_the_terminal_and_nothing_else() {
        assert_eq!(printable("grüße v2 \"quoted\""), "grüße v2 \"quoted\"");
        assert_eq!(
            printable("\u{1b}[2Jfake\nline\u{7}"),
            "\\u{1b}[2Jfake\\u{a}line\\u{7}"
        );
    }

    #[test]
    fn bindings_from_the_wire_are_normalised_as_typed_ones_are() {
        let wire = |prefix: &str| {
            serde_json::from_str::<Binding>(&format!(
                r#"{{"protocol":"tcp","prefix":"{prefix}","port":80}}"#
            ))
        };
        assert_eq!(
            wire("::ffff:127.0.0.1/128").unwrap().prefix,
            parse_prefix("127.0.0.1/32").unwrap()
        );
        let err = wire("192.0.2.1/24").unwrap_err().to_string();
        assert!(err.contains("192.0.2.0/24"), "{err}");
        assert_eq!(
            wire("10.0.0.0/8").unwrap().prefix,
            parse_prefix("10.0.0.0/8").unwrap()
        );
    }
}
