//! A socket-activated HTTP server with no hotswap code at all, as many servers are: it takes
//! fd 3 from `LISTEN_FDS`, answers every request with `fixture pid <PID> on <ADDR>` (ADDR: what
//! getsockname() says of fd 3, as a server that checks its inherited socket sees it), and on SIGTERM closes
//! its listener at once, answers what is in flight (`Connection: close`), and exits when no
//! connection is left.
//!
//! `--exit-after MS` makes it exit with code 3 that long after it starts (a crash);
//! `--ignore-term` makes it ignore SIGTERM (a stuck server); `--shutdown` makes it call
//! `shutdown()` on its listener before it stops or crashes (a common way to wake a thread
//! blocked in `accept()`, which shuts the socket down for every process that holds it).
//! `--notify` sends `READY=1` to `NOTIFY_SOCKET` (a path, or `@name` abstract) once it serves;
//! `--status-every MS` sends `STATUS=served N` that often for its whole life, blocking, as
//! libsystemd's `sd_notify` does; `--drop-privileges` becomes uid/gid 65534 (nobody) before
//! it says READY=1, as servers that start as root do.

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}

fn serve(stream: TcpStream, body: &str, live: &AtomicUsize) {
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    'requests: loop {
        let mut saw = false;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break 'requests,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => saw = true,
            }
        }
        if !saw {
            continue;
        }
        let close = TERM.load(Ordering::SeqCst);
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: {}\r\n\r\n{body}",
            body.len(),
            if close { "close" } else { "keep-alive" }
        );
        SERVED.fetch_add(1, Ordering::Relaxed);
        if writer.write_all(response.as_bytes()).is_err() || close {
            break;
        }
    }
    live.fetch_sub(1, Ordering::SeqCst);
}

/// Sends one sd_notify message, blocking as libsystemd does; false if it could not.
fn notify(message: &str) -> bool {
    use std::os::{linux::net::SocketAddrExt as _, unix::net::SocketAddr};
    let Ok(target) = std::env::var("NOTIFY_SOCKET") else {
        return false;
    };
    let address = match target.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&target),
    };
    let Ok(address) = address else {
        return false;
    };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return false;
    };
    socket.send_to_addr(message.as_bytes(), &address).is_ok()
}

static SERVED: AtomicUsize = AtomicUsize::new(0);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let tell_ready = args.iter().any(|a| a == "--notify");
    let drop_privileges = args.iter().any(|a| a == "--drop-privileges");
    let status_every = args
        .iter()
        .position(|a| a == "--status-every")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<u64>().ok());
    let ignore_term = args.iter().any(|a| a == "--ignore-term");
    let shutdown = args.iter().any(|a| a == "--shutdown");
    if let Some(ms) = args
        .iter()
        .position(|a| a == "--exit-after")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            if shutdown {
                // SAFETY: fd 3 is the listener; shutting it down needs no memory.
                unsafe { libc::shutdown(3, libc::SHUT_RDWR) };
            }
            std::process::exit(3);
        });
    }
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if !ours || count < 1 {
        eprintln!("hotswap-test-activated: no socket passed (LISTEN_PID/LISTEN_FDS)");
        std::process::exit(2);
    }
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            if ignore_term {
                libc::SIG_IGN
            } else {
                on_term as *const () as libc::sighandler_t
            },
        );
    }
    // SAFETY: socket activation hands fd 3 to this process.
    let listener = unsafe { TcpListener::from_raw_fd(3) };
    listener.set_nonblocking(true).expect("nonblocking");
    let local = listener
        .local_addr()
        .map_or_else(|e| format!("<{e}>"), |a| a.to_string());
    let body: &'static str =
        Box::leak(format!("fixture pid {} on {local}\n", std::process::id()).into_boxed_str());
    let live = Arc::new(AtomicUsize::new(0));
    if drop_privileges {
        // SAFETY: plain syscalls; group first, while we may still change it.
        let dropped = unsafe {
            libc::setgroups(0, std::ptr::null()) == 0
                && libc::setgid(65534) == 0
                && libc::setuid(65534) == 0
        };
        if !dropped {
            eprintln!("hotswap-test-activated: cannot drop privileges");
            std::process::exit(2);
        }
    }
    if let Some(ms) = status_every {
        std::thread::spawn(move || loop {
            let served = SERVED.load(Ordering::Relaxed);
            if !notify(&format!("STATUS=served {served}")) {
                eprintln!("hotswap-test-activated: STATUS= not sent");
            }
            std::thread::sleep(Duration::from_millis(ms));
        });
    }
    if tell_ready && !notify("READY=1") {
        eprintln!("hotswap-test-activated: READY=1 not sent");
        std::process::exit(2);
    }
    let mut listener = Some(listener);
    loop {
        if TERM.load(Ordering::SeqCst) {
            // Close the listener the moment the signal comes, as many servers do.
            if let (true, Some(open)) = (shutdown, &listener) {
                // SAFETY: a valid descriptor; shutting it down needs no memory.
                unsafe { libc::shutdown(open.as_raw_fd(), libc::SHUT_RDWR) };
            }
            listener = None;
            if live.load(Ordering::SeqCst) == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let fd = listener.as_ref().expect("open until TERM").as_raw_fd();
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pollfd, 1, 10) } <= 0 {
            continue;
        }
        if let Ok((stream, _)) = listener.as_ref().expect("open").accept() {
            stream.set_nonblocking(false).expect("blocking");
            live.fetch_add(1, Ordering::SeqCst);
            let live = Arc::clone(&live);
            std::thread::spawn(move || serve(stream, body, &live));
        }
    }
}
