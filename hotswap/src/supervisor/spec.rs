//! Parsing what `hotswap run` and `hotswap upgrade` are given: listen addresses, readiness
//! modes, durations and signals.

use std::{fmt, net::SocketAddr, str::FromStr, time::Duration};

use ipnet::IpNet;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::model::{Binding, Protocol};

/// A word `run`/`upgrade` could not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// Not `tcp://ADDR:PORT` or `udp://ADDR:PORT`.
    #[error("invalid listen address {0:?}: expected tcp://ADDR:PORT or udp://ADDR:PORT, e.g. tcp://127.0.0.1:8080 or udp://[::1]:53")]
    Listen(String),
    /// Port 0 cannot be a service's address.
    #[error("invalid listen address {0:?}: the port must not be 0")]
    ListenPortZero(String),
    /// Not a readiness mode.
    #[error(
        "invalid readiness {0:?}: expected notify, tcp or delay:<DURATION> (e.g. delay:500ms)"
    )]
    Ready(String),
    /// Not a duration.
    #[error("invalid duration {0:?}: expected e.g. 500ms, 5s, 1m")]
    Duration(String),
    /// Longer than any wait the supervisor does.
    #[error("duration {0:?} is too long: at most 7 days")]
    TooLong(String),
    /// Not a signal.
    #[error("invalid signal {0:?}: expected a name such as TERM, SIGTERM, QUIT, INT, or a number")]
    Signal(String),
}

/// How a generation's process is told which descriptors are its sockets. In every mode they
/// are at fds 3, 4, … (TCP first), `HOTSWAP_FD_TCP`/`HOTSWAP_FD_UDP` name their numbers, and
/// `{fd:tcp}`/`{fd:udp}` in the command's arguments become those numbers (for servers that take
/// a flag: `haproxy` `bind fd@{fd:tcp}`, `uvicorn --fd {fd:tcp}`, `kresd -S {fd:udp}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FdPassing {
    /// systemd socket activation: `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`.
    #[default]
    Systemd,
    /// nginx's own upgrade protocol: `NGINX="3;4;"`.
    Nginx,
}

/// One `--listen` address of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenSpec {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The service's address.
    pub addr: SocketAddr,
}

impl ListenSpec {
    /// The binding that steers this address to the service: the exact address and port. The
    /// unspecified address (`0.0.0.0`, `[::]`) means every address of its family, as it does
    /// for `bind()`: no connection is ever addressed to it. An IPv4-mapped IPv6 address is
    /// the IPv4 address it maps (connections to it are IPv4), as in `hotswap bind`.
    pub fn binding(&self) -> Binding {
        let ip = match self.addr.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            ip => ip,
        };
        let prefix = if ip.is_unspecified() {
            IpNet::new(ip, 0).expect("0 is a valid prefix length")
        } else {
            IpNet::from(ip)
        };
        Binding {
            protocol: self.protocol,
            prefix,
            port: self.addr.port(),
        }
    }
}

impl FromStr for ListenSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SpecError::Listen(s.to_owned());
        let (scheme, rest) = s.split_once("://").ok_or_else(bad)?;
        let protocol = scheme.parse().map_err(|_| bad())?;
        let addr: SocketAddr = rest.parse().map_err(|_| bad())?;
        if addr.port() == 0 {
            return Err(SpecError::ListenPortZero(s.to_owned()));
        }
        Ok(Self { protocol, addr })
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.protocol, self.addr)
    }
}

/// How the supervisor learns that a new generation is ready to serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadyMode {
    /// The process sends `READY=1` to `NOTIFY_SOCKET` (sd_notify(3)).
    Notify,
    /// The process accepts a connection on its TCP socket.
    Tcp,
    /// A fixed time after start.
    Delay(Duration),
}

impl FromStr for ReadyMode {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "notify" => Ok(Self::Notify),
            "tcp" => Ok(Self::Tcp),
            _ => match s.strip_prefix("delay:") {
                Some(d) => Ok(Self::Delay(
                    parse_duration(d).map_err(|_| SpecError::Ready(s.to_owned()))?,
                )),
                None => Err(SpecError::Ready(s.to_owned())),
            },
        }
    }
}

impl fmt::Display for ReadyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Notify => f.write_str("notify"),
            Self::Tcp => f.write_str("tcp"),
            Self::Delay(d) => write!(f, "delay:{}", humantime::format_duration(*d)),
        }
    }
}

/// Parses `500ms`, `5s`, `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, SpecError> {
    let duration = humantime::parse_duration(s).map_err(|_| SpecError::Duration(s.to_owned()))?;
    // Deadlines are `Instant::now() + duration`, which panics past the clock's range (measured
    // with a `--drain-timeout` of hundreds of years): nothing the supervisor waits for needs
    // more than days.
    if duration > MAX_DURATION {
        return Err(SpecError::TooLong(s.to_owned()));
    }
    Ok(duration)
}

/// The longest duration any option takes.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Parses `TERM`, `SIGTERM`, `term` or `15`.
pub fn parse_signal(s: &str) -> Result<Signal, SpecError> {
    let bad = || SpecError::Signal(s.to_owned());
    if let Ok(number) = s.parse::<i32>() {
        return Signal::try_from(number).map_err(|_| bad());
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs() {
        let spec: ListenSpec = "tcp://127.0.0.1:8080".parse().unwrap();
        assert_eq!(spec.binding().to_string(), "tcp 127.0.0.1/32 8080");
        let spec: ListenSpec = "udp://[::1]:53".parse().unwrap();
        assert_eq!(spec.binding().to_string(), "udp ::1/128 53");
        // Every address of a family, as bind() means it; mapped IPv4 is IPv4.
        for (listen, binding) in [
            ("tcp://0.0.0.0:80", "tcp 0.0.0.0/0 80"),
            ("tcp://[::]:80", "tcp ::/0 80"),
            ("tcp://[::ffff:0.0.0.0]:80", "tcp 0.0.0.0/0 80"),
            ("tcp://[::ffff:127.0.0.1]:80", "tcp 127.0.0.1/32 80"),
        ] {
            let spec: ListenSpec = listen.parse().unwrap();
            assert_eq!(spec.binding().to_string(), binding, "{listen}");
        }
        for bad in [
            "127.0.0.1:80",
            "http://127.0.0.1:80",
            "tcp://localhost:80",
            "tcp://127.0.0.1",
            "tcp://1.2.3.4:99999",
        ] {
            assert_eq!(
                bad.parse::<ListenSpec>(),
                Err(SpecError::Listen(bad.into())),
                "{bad}"
            );
        }
        assert!(matches!(
            "tcp://127.0.0.1:0".parse::<ListenSpec>(),
            Err(SpecError::ListenPortZero(_))
        ));
    }

    #[test]
    fn ready_modes_durations_signals() {
        assert_eq!("notify".parse(), Ok(ReadyMode::Notify));
        assert_eq!("tcp".parse(), Ok(ReadyMode::Tcp));
        assert_eq!(
            "delay:250ms".parse(),
            Ok(ReadyMode::Delay(Duration::from_millis(250)))
        );
        assert!("delay:soon".parse::<ReadyMode>().is_err());
        assert!("http".parse::<ReadyMode>().is_err());
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("5").is_err());
        assert_eq!(parse_duration("7days"), Ok(MAX_DURATION));
        assert_eq!(
            parse_duration("500years"),
            Err(SpecError::TooLong("500years".into()))
        );
        assert_eq!(parse_signal("TERM"), Ok(Signal::SIGTERM));
        assert_eq!(parse_signal("sigquit"), Ok(Signal::SIGQUIT));
        assert_eq!(parse_signal("9"), Ok(Signal::SIGKILL));
        assert!(parse_signal("SIGNOPE").is_err());
        assert!(parse_signal("99").is_err());
    }
}
