//! An example server built with `hotswap::activation`: every HTTP request (and every UDP
//! datagram, followed by the datagram itself) is answered with the generation and pid that
//! served it.
//!
//! ```sh
//! hotswap run hello --listen tcp://127.0.0.1:8080 -- target/debug/examples/hello
//! curl http://127.0.0.1:8080/    # generation 1 pid 4242
//! ```
//!
//! On the drain signal it stops accepting, answers what is in flight (keep-alive connections get
//! `Connection: close` on their next response), and exits when no connection is left.

use std::{
    mem::MaybeUninit,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use hotswap::activation::{drain_signal, generation, notify_ready, notify_stopping, Listeners};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpStream,
    sync::watch,
};

/// Serves one connection: HTTP/1.1 requests (headers only; bodies are not read) until the
/// client closes, or until draining, when the next response says `Connection: close`.
async fn serve(stream: TcpStream, body: Arc<String>, draining: Arc<AtomicBool>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    loop {
        // The request line and headers, up to the empty line.
        let mut saw_request = false;
        let mut client_closes = false;
        loop {
            line.clear();
            match reader.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            saw_request = true;
            if line.to_ascii_lowercase().starts_with("connection: close") {
                client_closes = true;
            }
        }
        if !saw_request {
            continue;
        }
        let close = client_closes || draining.load(Ordering::Relaxed);
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: {}\r\n\r\n{}",
            body.len(),
            if close { "close" } else { "keep-alive" },
            body
        );
        if write.write_all(response.as_bytes()).await.is_err() || close {
            return;
        }
    }
}

/// Answers the datagrams queued on `udp` now and does not wait for more: on a socket shared
/// with the next generation (the uds backend) what arrives later is the next generation's, and
/// waiting for a quiet moment there would keep us alive as long as clients keep sending.
fn answer_queued(udp: &tokio::net::UdpSocket, body: &str) {
    let socket = socket2::SockRef::from(udp);
    let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
    // tokio's sockets are non-blocking, so this returns WouldBlock once the queue is empty
    // (tokio's own try_recv_from would trust its cached readiness instead of asking the kernel).
    while let Ok((n, peer)) = socket.recv_from(&mut buf) {
        // SAFETY: recv_from initialised the first `n` bytes.
        let datagram = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
        let _ = socket.send_to(&udp_answer(body, datagram), &peer);
    }
}

/// The answer to a datagram: who we are, then what was sent, so a client can match them.
fn udp_answer(body: &str, datagram: &[u8]) -> Vec<u8> {
    let mut answer = body.trim_end().as_bytes().to_vec();
    answer.extend_from_slice(b": ");
    answer.extend_from_slice(datagram);
    answer
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let body = Arc::new(format!(
        "generation {} pid {}\n",
        generation().map_or("-".to_owned(), |g| g.to_string()),
        std::process::id()
    ));
    let mut listeners = Listeners::from_env()?;
    let tcp = if listeners.names().any(|n| n == "tcp") {
        Some(listeners.take_tokio_tcp("tcp")?)
    } else {
        None
    };
    let udp = if listeners.names().any(|n| n == "udp") {
        Some(listeners.take_tokio_udp("udp")?)
    } else {
        None
    };
    if tcp.is_none() && udp.is_none() {
        return Err(
            "no `tcp` or `udp` socket was passed; run me under `hotswap run` or systemd".into(),
        );
    }
    let drain = drain_signal()?;
    notify_ready()?;

    let draining = Arc::new(AtomicBool::new(false));
    // Every connection task holds a clone of `alive`; when all are gone, we are drained.
    let (alive, mut all_done) = watch::channel(());
    tokio::pin!(drain);
    let mut datagram = [0u8; 2048];
    loop {
        tokio::select! {
            _ = &mut drain => break,
            accepted = async { tcp.as_ref().unwrap().accept().await }, if tcp.is_some() => {
                if let Ok((stream, _)) = accepted {
                    let (body, draining, alive) = (Arc::clone(&body), Arc::clone(&draining), alive.clone());
                    tokio::spawn(async move {
                        serve(stream, body, draining).await;
                        drop(alive);
                    });
                }
            }
            received = async { udp.as_ref().unwrap().recv_from(&mut datagram).await }, if udp.is_some() => {
                if let Ok((n, peer)) = received {
                    let _ = udp.as_ref().unwrap().send_to(&udp_answer(&body, &datagram[..n]), peer).await;
                }
            }
        }
    }
    // Drain: stop accepting (the listener closes here), answer what is in flight.
    let _ = notify_stopping();
    draining.store(true, Ordering::Relaxed);
    drop(tcp);
    if let Some(udp) = udp {
        answer_queued(&udp, &body);
    }
    drop(alive);
    let _ = all_done.changed().await;
    Ok(())
}
