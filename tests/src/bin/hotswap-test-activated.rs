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
        if writer.write_all(response.as_bytes()).is_err() || close {
            break;
        }
    }
    live.fetch_sub(1, Ordering::SeqCst);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
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
