//! A tiny server the integration tests register with hotswap.
//!
//! `hotswap-test-server tcp|udp ADDR TEXT` binds ADDR, prints `READY <pid> <fd> <local addr>`,
//! then answers: TCP connections get `TEXT\n` at once and `TEXT <line>\n` for every line they
//! send; UDP datagrams get `TEXT`. On stdin, `close` closes the listening socket (the process
//! stays); end of input or `exit` ends the process.

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::Arc,
};

fn serve_tcp_connection(stream: TcpStream, text: &str) {
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, proto, addr, text] = args.as_slice() else {
        eprintln!("usage: hotswap-test-server tcp|udp ADDR TEXT");
        std::process::exit(2);
    };
    let text: &'static str = Box::leak(text.clone().into_boxed_str());
    let raw_fd: i32;
    let mut closer: Option<Box<dyn FnOnce()>>;
    match proto.as_str() {
        "tcp" => {
            let listener = TcpListener::bind(addr).expect("bind");
            raw_fd = listener.as_raw_fd();
            println!(
                "READY {} {} {}",
                std::process::id(),
                raw_fd,
                listener.local_addr().unwrap()
            );
            let listener = Arc::new(listener);
            let acceptor = Arc::clone(&listener);
            std::thread::spawn(move || {
                for stream in acceptor.incoming() {
                    match stream {
                        Ok(stream) => {
                            std::thread::spawn(move || serve_tcp_connection(stream, text));
                        }
                        // shutdown() by `close` ends the loop.
                        Err(_) => return,
                    }
                }
            });
            closer = Some(Box::new(move || {
                // SAFETY: shutting down our own listening socket wakes the blocked accept().
                unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
                drop(listener);
            }));
        }
        "udp" => {
            let socket = UdpSocket::bind(addr).expect("bind");
            raw_fd = socket.as_raw_fd();
            println!(
                "READY {} {} {}",
                std::process::id(),
                raw_fd,
                socket.local_addr().unwrap()
            );
            let socket = Arc::new(socket);
            let server = Arc::clone(&socket);
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while let Ok((_, peer)) = server.recv_from(&mut buf) {
                    let _ = server.send_to(text.as_bytes(), peer);
                }
            });
            closer = Some(Box::new(move || {
                // SAFETY: shutting down our own socket wakes the blocked recv_from().
                unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
                drop(socket);
            }));
        }
        _ => {
            eprintln!("protocol must be tcp or udp");
            std::process::exit(2);
        }
    }
    std::io::stdout().flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        match line.as_deref() {
            Ok("close") => {
                if let Some(close) = closer.take() {
                    close();
                }
                // The receiving thread still holds a reference until it wakes; wait for the
                // fd to be gone so the caller can rely on it.
                for _ in 0..1000 {
                    if std::fs::read_link(format!("/proc/self/fd/{raw_fd}")).is_err() {
                        break;
                    }
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
