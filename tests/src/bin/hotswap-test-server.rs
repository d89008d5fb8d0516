//! A tiny server the integration tests register with hotswap.
//!
//! `hotswap-test-server tcp|udp ADDR TEXT` binds ADDR, prints `READY <pid> <fd> <local addr>`,
//! then answers: TCP connections get `TEXT\n` at once and `TEXT <line>\n` for every line they
//! send; UDP datagrams get `TEXT`. On stdin, `close` closes the listening socket with a plain
//! close() (the process stays) and answers `CLOSED`; end of input or `exit` ends the process.

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, RawFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

fn serve_tcp_connection(stream: TcpStream, text: &str) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    if writer.write_all(format!("{text}\n").as_bytes()).is_err() {
        return;
    }
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if writer
            .write_all(format!("{text} {line}\n").as_bytes())
            .is_err()
        {
            return;
        }
    }
}

/// Waits up to 10 ms for `fd` to become readable, so the serving loop can notice `close`.
fn readable(fd: RawFd) -> bool {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pollfd, 1, 10) > 0 }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, proto, addr, text] = args.as_slice() else {
        eprintln!("usage: hotswap-test-server tcp|udp ADDR TEXT");
        std::process::exit(2);
    };
    let text: &'static str = Box::leak(text.clone().into_boxed_str());
    // The serving thread owns the socket and drops it (a plain close) when this is set.
    let closing = Arc::new(AtomicBool::new(false));
    let stop = Arc::clone(&closing);
    let raw_fd = match proto.as_str() {
        "tcp" => {
            let listener = TcpListener::bind(addr).expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            let fd = listener.as_raw_fd();
            println!(
                "READY {} {fd} {}",
                std::process::id(),
                listener.local_addr().unwrap()
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if !readable(fd) {
                        continue;
                    }
                    if let Ok((stream, _)) = listener.accept() {
                        stream.set_nonblocking(false).expect("blocking");
                        std::thread::spawn(move || serve_tcp_connection(stream, text));
                    }
                }
            });
            fd
        }
        "udp" => {
            let socket = UdpSocket::bind(addr).expect("bind");
            let fd = socket.as_raw_fd();
            println!(
                "READY {} {fd} {}",
                std::process::id(),
                socket.local_addr().unwrap()
            );
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if !readable(fd) {
                        continue;
                    }
                    if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(text.as_bytes(), peer);
                    }
                }
            });
            fd
        }
        _ => {
            eprintln!("protocol must be tcp or udp");
            std::process::exit(2);
        }
    };
    std::io::stdout().flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        match line.as_deref() {
            Ok("close") => {
                closing.store(true, Ordering::Relaxed);
                // Answer once the fd is really closed, so the caller can rely on it.
                while std::fs::read_link(format!("/proc/self/fd/{raw_fd}")).is_ok() {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                println!("CLOSED");
                std::io::stdout().flush().unwrap();
            }
            Ok("exit") | Err(_) => break,
            Ok(_) => {}
        }
    }
}
