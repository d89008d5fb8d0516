//! A generation's sd_notify socket, served for the generation's whole life: not only `READY=1`
//! at start, but `STATUS=`, `RELOADING=1`, `STOPPING=1`, `WATCHDOG=1` and the rest until the
//! generation is gone, so `status` can show what the server last said and a sender is never
//! left blocked on a full queue.
//!
//! The socket lives in the abstract namespace: a server that drops privileges before it sends
//! `READY=1` cannot reach a file socket in a root-only directory, and an abstract name has no
//! file permissions at all. The access control is the sender check instead: every datagram
//! carries the sender's credentials (`SO_PASSCRED`), and one whose pid is not in the
//! generation is refused. The name's random part only keeps generations from colliding and
//! strangers from guessing; it is not what makes the socket safe.

use std::{
    io::{self, IoSliceMut},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr, UnixDatagram},
    },
    time::SystemTime,
};

use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixAddr};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::watch,
};

/// Largest datagram we read; sd_notify messages are a few short lines, and systemd itself
/// refuses larger ones, so a longer one is a mistake or an attack and is ignored whole.
const MAX_DATAGRAM: usize = 4096;

/// The receive buffer we ask for, so a burst of messages queues instead of piling up.
const RCVBUF: usize = 256 * 1024;

/// Most fds one datagram can carry (the kernel's `SCM_MAX_FD`): the control buffer holds that
/// many so every fd a sender passes is received, and therefore closed, rather than cut off.
const SCM_MAX_FD: usize = 253;

/// How far up the parent chain [`in_generation`] looks: deeper than any real process tree,
/// and a bound so a /proc race can never loop.
const MAX_ANCESTORS: usize = 64;

/// What a generation told us over its notify socket so far; published through a `watch` so
/// readiness waits, `status` and the watchdog read the latest without asking the socket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct NotifyState {
    /// `READY=1` was sent (and no `RELOADING=1` since).
    pub ready: bool,
    /// The latest `STATUS=`.
    pub status: Option<String>,
    /// `STOPPING=1` was sent: the server is shutting down on its own.
    pub stopping: bool,
    /// `RELOADING=1` was sent and no `READY=1` since.
    pub reloading: bool,
    /// When the latest `WATCHDOG=1` arrived.
    pub watchdog_at: Option<SystemTime>,
    /// The latest `MAINPID=`: the server says its main process is another one.
    pub main_pid: Option<u32>,
    /// The latest `ERRNO=`: why the server is failing, in its own words.
    pub errno: Option<i32>,
    /// Datagrams from the generation that were applied.
    pub accepted: u64,
    /// Datagrams dropped: from outside the generation, without credentials, or too long.
    pub refused: u64,
}

/// Creates a generation's notify socket and the `NOTIFY_SOCKET` value for its environment.
///
/// The name is `hotswap/<service>/<generation>/<16 random hex chars>` in the abstract
/// namespace, and the value is `@` and the name, systemd's spelling of an abstract address.
/// The socket is close-on-exec (std sets it) so no child inherits the receiving end.
pub(super) fn bind(service: &str, generation: u32) -> io::Result<(UnixDatagram, String)> {
    let name = format!("hotswap/{service}/{generation}/{}", random_hex()?);
    let socket = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
    // Without SO_PASSCRED on the receiver the kernel attaches no SCM_CREDENTIALS, and the
    // sender check would refuse everything.
    setsockopt(&socket, sockopt::PassCred, &true)?;
    // Best effort: the default is enough for well-behaved servers, and an unprivileged
    // supervisor may be capped by `net.core.rmem_max`.
    if let Err(e) = setsockopt(&socket, sockopt::RcvBuf, &RCVBUF) {
        tracing::debug!("notify socket {name}: SO_RCVBUF: {e}");
    }
    Ok((socket, format!("@{name}")))
}

/// Eight random bytes as hex, from the kernel's CSPRNG, so names are not guessable and two
/// supervisors of one service never collide.
fn random_hex() -> io::Result<String> {
    let mut bytes = [0u8; 8];
    let mut filled = 0;
    while filled < bytes.len() {
        let rest = &mut bytes[filled..];
        // SAFETY: the pointer and length describe `rest`, which is valid for writes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n.unsigned_abs();
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Applies one datagram to `state`. Pure, so the protocol is tested without sockets.
///
/// A datagram is newline-separated `KEY=VALUE` assignments, applied in order; lines without
/// `=`, unknown keys and values that do not parse are ignored, as systemd ignores them.
/// Counting is the caller's: this only says what the datagram means.
fn apply(state: &mut NotifyState, message: &[u8], now: SystemTime) {
    for line in message.split(|&b| b == b'\n') {
        let Some(eq) = line.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (key, value) = (&line[..eq], &line[eq + 1..]);
        match key {
            b"READY" if value == b"1" => {
                state.ready = true;
                state.reloading = false;
            }
            b"RELOADING" if value == b"1" => state.reloading = true,
            b"STOPPING" if value == b"1" => state.stopping = true,
            b"WATCHDOG" if value == b"1" => state.watchdog_at = Some(now),
            b"STATUS" => state.status = Some(String::from_utf8_lossy(value).into_owned()),
            b"MAINPID" => {
                if let Some(pid) = parse::<u32>(value).filter(|&p| p > 0) {
                    state.main_pid = Some(pid);
                }
            }
            b"ERRNO" => {
                if let Some(errno) = parse::<i32>(value) {
                    state.errno = Some(errno);
                }
            }
            _ => {}
        }
    }
}

/// Parses a number from a value's bytes; `None` for anything else.
fn parse<T: std::str::FromStr>(value: &[u8]) -> Option<T> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Serves `socket` until it fails: applies every datagram whose sender `belongs` to the
/// generation to `state`, refuses the rest. The caller aborts the task when the generation
/// is gone; until then we read as fast as datagrams come, so a sender never blocks on a full
/// queue (a blocking `sd_notify` in a server's main loop would stall the server).
pub(super) async fn serve(
    socket: UnixDatagram,
    belongs: impl Fn(u32) -> bool,
    state: watch::Sender<NotifyState>,
) {
    if let Err(e) = socket.set_nonblocking(true) {
        tracing::warn!("notify socket: non-blocking: {e}");
        return;
    }
    // SAFETY: the AsyncFd owns the socket, which keeps its one fd open until it is dropped.
    let socket = match unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) } {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("notify socket: registering with the runtime: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut cmsg = nix::cmsg_space!(libc::ucred, [std::os::fd::RawFd; SCM_MAX_FD]);
    loop {
        let mut guard = match socket.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!("notify socket: {e}");
                return;
            }
        };
        // Drain everything queued before waiting again.
        loop {
            match guard.try_io(|s| receive(s.get_ref(), &mut buf, &mut cmsg)) {
                Ok(Ok(received)) => handle(&received, &buf, &belongs, &state),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => {
                    tracing::warn!("notify socket: {e}");
                    return;
                }
                Err(_would_block) => break,
            }
        }
    }
}

/// One datagram as received: how long it was, whether it was cut off, and who sent it.
struct Received {
    /// Bytes in `buf`.
    len: usize,
    /// Longer than the buffer (MSG_TRUNC): ignored whole, never half-applied.
    truncated: bool,
    /// The sender's pid from SCM_CREDENTIALS, if any came.
    pid: Option<u32>,
}

/// Receives one datagram. Any fds it carries (`FDSTORE=1`, which we do not implement) are
/// closed here: they arrive close-on-exec, so no child inherits them in between, and a sender
/// cannot make us hold its fds or run out of ours.
fn receive(socket: &UnixDatagram, buf: &mut [u8], cmsg: &mut Vec<u8>) -> io::Result<Received> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<UnixAddr>(
        socket.as_raw_fd(),
        &mut iov,
        Some(cmsg),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut pid = None;
    let mut passed = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        match c {
            ControlMessageOwned::ScmCredentials(creds) => pid = u32::try_from(creds.pid()).ok(),
            ControlMessageOwned::ScmRights(fds) => {
                // SAFETY: the kernel just installed these fds in our table for us; nothing
                // else knows them, so each is owned here exactly once.
                passed.extend(
                    fds.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
            _ => {}
        }
    }
    if !passed.is_empty() {
        tracing::debug!("notify socket: closed {} passed fds", passed.len());
    }
    drop(passed);
    Ok(Received {
        len: msg.bytes,
        truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
        pid,
    })
}

/// Checks one received datagram's sender and applies it or counts it refused.
fn handle(
    received: &Received,
    buf: &[u8],
    belongs: &impl Fn(u32) -> bool,
    state: &watch::Sender<NotifyState>,
) {
    // Pid 0: the sender is in a pid namespace we cannot see, so it cannot be ours.
    let sender = received.pid.filter(|&p| p != 0 && belongs(p));
    let Some(_pid) = sender else {
        tracing::debug!(
            "notify socket: refused a datagram from {}",
            received
                .pid
                .map_or("a sender without credentials".to_owned(), |p| format!(
                    "pid {p}"
                ))
        );
        state.send_modify(|s| s.refused += 1);
        return;
    };
    if received.truncated {
        tracing::debug!("notify socket: ignored a datagram over {MAX_DATAGRAM} bytes");
        state.send_modify(|s| s.refused += 1);
        return;
    }
    let message = &buf[..received.len.min(buf.len())];
    let now = SystemTime::now();
    state.send_modify(|s| {
        apply(s, message, now);
        s.accepted += 1;
    });
}

/// Whether `pid` is part of the generation whose main process is `main_pid`: the main
/// process itself, a member of its process group (a generation's main process leads its own
/// group), or a descendant (a worker that moved to its own group or session). A process we
/// cannot read in /proc (gone already, or hidden) is not ours.
pub(super) fn in_generation(pid: u32, main_pid: u32) -> bool {
    if pid == main_pid {
        return true;
    }
    let Some((ppid, pgrp)) = stat(pid) else {
        return false;
    };
    if pgrp == main_pid {
        return true;
    }
    let mut current = ppid;
    for _ in 0..MAX_ANCESTORS {
        if current == main_pid {
            return true;
        }
        if current <= 1 {
            return false;
        }
        match stat(current) {
            Some((ppid, _)) => current = ppid,
            None => return false,
        }
    }
    false
}

/// A process's parent and process group from /proc/PID/stat. The fields are counted after
/// the last `)`, since the command name in parentheses may itself hold spaces and `)`: the
/// ones after it are the state, the ppid (field 4 overall) and the pgrp (field 5).
fn stat(pid: u32) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 1..];
    let mut fields = after.split_ascii_whitespace();
    let _state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((ppid, pgrp))
}

#[cfg(test)]
mod tests {
    use std::{
        io::{IoSlice, Read as _},
        os::{fd::AsRawFd as _, unix::net::UnixStream},
        time::Duration,
    };

    use nix::sys::socket::{sendmsg, ControlMessage};

    use super::*;

    /// A blocking client socket connected to `notify_socket` (an `@` value), so a hang in
    /// `serve` fails the test after the timeout instead of blocking it.
    fn client(notify_socket: &str) -> UnixDatagram {
        let name = notify_socket.strip_prefix('@').expect("abstract");
        let c = UnixDatagram::unbound().unwrap();
        c.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        c.connect_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            .unwrap();
        c
    }

    /// Waits until the state satisfies `f`, at most ten seconds.
    async fn wait(
        rx: &mut watch::Receiver<NotifyState>,
        f: impl FnMut(&NotifyState) -> bool,
    ) -> NotifyState {
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(f))
            .await
            .expect("timed out")
            .expect("serve ended")
            .clone()
    }

    #[test]
    fn apply_parses_the_protocol() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let mut s = NotifyState::default();
        apply(&mut s, b"READY=1", t0);
        assert!(s.ready && !s.reloading);
        apply(&mut s, b"STATUS=serving 3 clients", t0);
        assert_eq!(s.status.as_deref(), Some("serving 3 clients"));
        apply(&mut s, b"STATUS=later", t0);
        assert_eq!(s.status.as_deref(), Some("later"));
        apply(&mut s, b"RELOADING=1\nMONOTONIC_USEC=12345", t0);
        assert!(s.reloading);
        apply(&mut s, b"READY=1", t0);
        assert!(s.ready && !s.reloading);
        apply(&mut s, b"WATCHDOG=1", t0);
        assert_eq!(s.watchdog_at, Some(t0));
        apply(&mut s, b"STOPPING=1", t0);
        assert!(s.stopping);
        // Counting is serve's, not apply's.
        assert_eq!((s.accepted, s.refused), (0, 0));

        let mut s = NotifyState::default();
        apply(
            &mut s,
            b"STATUS=one\nMAINPID=4242\nERRNO=13\nREADY=1\nSTATUS=two\n",
            t0,
        );
        assert_eq!(
            s,
            NotifyState {
                ready: true,
                status: Some("two".into()),
                main_pid: Some(4242),
                errno: Some(13),
                ..NotifyState::default()
            }
        );

        let before = s.clone();
        apply(
            &mut s,
            b"garbage\n\n=\nREADY\nREADY=0\nMAINPID=x\nMAINPID=0\nERRNO=\nFOO=1\n\xff\xfe",
            t0,
        );
        apply(&mut s, b"", t0);
        assert_eq!(s, before);
        apply(&mut s, b"WATCHDOG=trigger\nSTOPPING=yes", t0);
        assert_eq!(s, before);
    }

    #[test]
    fn bind_names_an_abstract_socket() {
        let (a, env) = bind("web", 7).unwrap();
        let (_b, other) = bind("web", 7).unwrap();
        assert_ne!(env, other);
        let name = env.strip_prefix("@hotswap/web/7/").expect("prefix");
        assert!(name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(
            a.local_addr().unwrap().as_abstract_name(),
            Some(&env.as_bytes()[1..])
        );
        assert!(nix::sys::socket::getsockopt(&a, sockopt::PassCred).unwrap());
        // SAFETY: fcntl on an fd we own.
        let flags = unsafe { libc::fcntl(a.as_raw_fd(), libc::F_GETFD) };
        assert!(flags & libc::FD_CLOEXEC != 0);
    }

    #[tokio::test]
    async fn serve_keeps_up_with_a_burst() {
        let (socket, env) = bind("burst", 1).unwrap();
        let me = std::process::id();
        let (tx, mut rx) = watch::channel(NotifyState::default());
        let task = tokio::spawn(serve(socket, move |pid| pid == me, tx));
        let c = client(&env);
        // The sender blocks (up to its timeout) on a full queue, so it runs off the runtime.
        tokio::task::spawn_blocking(move || {
            for n in 0..2_000 {
                c.send(format!("STATUS={n}").as_bytes()).unwrap();
            }
            c.send(b"READY=1").unwrap();
        })
        .await
        .unwrap();
        let s = wait(&mut rx, |s| s.ready).await;
        assert_eq!(s.status.as_deref(), Some("1999"));
        assert_eq!((s.accepted, s.refused), (2_001, 0));
        task.abort();
    }

    #[tokio::test]
    async fn serve_refuses_strangers() {
        let (socket, env) = bind("strangers", 1).unwrap();
        let (tx, mut rx) = watch::channel(NotifyState::default());
        let task = tokio::spawn(serve(socket, |_| false, tx));
        client(&env).send(b"READY=1\nSTATUS=hi").unwrap();
        let s = wait(&mut rx, |s| s.refused == 1).await;
        assert_eq!(
            s,
            NotifyState {
                refused: 1,
                ..NotifyState::default()
            }
        );
        task.abort();
    }

    #[tokio::test]
    async fn serve_ignores_oversized_datagrams() {
        let (socket, env) = bind("big", 1).unwrap();
        let me = std::process::id();
        let (tx, mut rx) = watch::channel(NotifyState::default());
        let task = tokio::spawn(serve(socket, move |pid| pid == me, tx));
        let c = client(&env);
        let mut big = b"READY=1\nSTATUS=".to_vec();
        big.resize(MAX_DATAGRAM + 1, b'x');
        c.send(&big).unwrap();
        c.send(b"STATUS=small").unwrap();
        let s = wait(&mut rx, |s| s.accepted == 1).await;
        assert_eq!(
            (s.ready, s.status.as_deref(), s.refused),
            (false, Some("small"), 1)
        );
        task.abort();
    }

    #[tokio::test]
    async fn serve_closes_passed_fds() {
        let (socket, env) = bind("fds", 1).unwrap();
        let me = std::process::id();
        let (tx, mut rx) = watch::channel(NotifyState::default());
        let task = tokio::spawn(serve(socket, move |pid| pid == me, tx));
        let (mut kept, passed) = UnixStream::pair().unwrap();
        kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let c = client(&env);
        let fds = [passed.as_raw_fd()];
        sendmsg::<()>(
            c.as_raw_fd(),
            &[IoSlice::new(b"FDSTORE=1\nREADY=1")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        drop(passed);
        wait(&mut rx, |s| s.ready).await;
        // Every copy of the other end is closed once serve closed the one it received, so
        // this read sees end-of-file rather than timing out.
        let mut byte = [0u8; 1];
        let n = tokio::task::spawn_blocking(move || kept.read(&mut byte))
            .await
            .unwrap()
            .expect("EOF, not a timeout");
        assert_eq!(n, 0);
        task.abort();
    }

    #[test]
    fn in_generation_follows_the_process_tree() {
        let me = std::process::id();
        assert!(in_generation(me, me));
        assert!(!in_generation(1, me));
        // Our parent is not below us.
        let parent = std::os::unix::process::parent_id();
        assert!(!in_generation(parent, me));
        // A child of ours is.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(in_generation(child.id(), me));
        child.kill().unwrap();
        child.wait().unwrap();
        // A process that does not exist is not.
        assert!(!in_generation(u32::MAX, me));
    }

    #[test]
    fn stat_reads_past_a_tricky_name() {
        // The command name comes from the file executed: a symlink named like stat fields.
        let dir = tempfile::tempdir().unwrap();
        let tricky = dir.path().join("x) R 1 1 (y");
        let sleep = resolve("sleep");
        std::os::unix::fs::symlink(sleep, &tricky).unwrap();
        let mut child = std::process::Command::new(&tricky)
            .arg("5")
            .spawn()
            .unwrap();
        let me = std::process::id();
        let (ppid, _pgrp) = stat(child.id()).unwrap();
        assert_eq!(ppid, me);
        assert!(in_generation(child.id(), me));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// A program's path from PATH, since a symlink needs a real target.
    fn resolve(program: &str) -> std::path::PathBuf {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
            .expect("in PATH")
    }
}
