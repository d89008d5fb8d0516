//! An example server built with `hotswap::activation`: every HTTP request (and every UDP
//! datagram, followed by the datagram itself) is answered with the generation and pid that
//! served it.
//!
//! ```sh
//! hotswap run hello --listen tcp://127.0.0.1:8080 -- target/debug/examples/hello
//! curl http://127.0.0.1:8080/    # generation 1 pid 4242
//! ```
//!
//! On the drain signal it stops accepting and answers what is in flight. Under
//! `hotswap run --handoff` it then hands every keep-alive connection — with any bytes of a
//! next request already read — to the next generation, which answers on over the same
//! connection, so the client never sees a close; without a channel (or when no generation
//! takes it) a connection gets `Connection: close` on its next response. It exits when no
//! connection is left: with the handoff, at once.

use std::{mem::MaybeUninit, os::fd::AsFd as _, sync::Arc};

use hotswap::{
    activation::{drain_signal, generation, notify_ready, notify_stopping, Listeners},
    handoff::{HandoffChannel, Outcome},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::watch,
};
use tokio_util::task::TaskTracker;

/// The longest request head a connection buffers.
const MAX_HEAD: usize = 16 * 1024;

/// Where the first complete request head in `buffered` ends (after its empty line).
fn head_end(buffered: &[u8]) -> Option<usize> {
    buffered
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

/// Serves one connection: HTTP/1.1 requests (heads only; bodies are not read) until the
/// client closes. Once draining, it answers the requests it has, then hands the connection
/// over between requests — or, if no one takes it, says `Connection: close` next time.
async fn serve(
    mut stream: TcpStream,
    mut buffered: Vec<u8>,
    body: Arc<String>,
    mut draining: watch::Receiver<bool>,
    handoff: Option<Arc<HandoffChannel>>,
) {
    let mut closing = false;
    loop {
        while let Some(end) = head_end(&buffered) {
            let head: Vec<u8> = buffered.drain(..end).collect();
            let client_closes = String::from_utf8_lossy(&head)
                .to_ascii_lowercase()
                .contains("\r\nconnection: close");
            let close = client_closes || closing;
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: {}\r\n\r\n{}",
                body.len(),
                if close { "close" } else { "keep-alive" },
                body
            );
            if stream.write_all(response.as_bytes()).await.is_err() || close {
                return;
            }
        }
        if *draining.borrow() && !closing {
            if let Some(channel) = &handoff {
                let outcome = channel.hand_over(stream.as_fd(), &buffered, &[]).await;
                // Unknown (the channel closed before the answer): ours is dropped either way.
                if matches!(outcome, Ok(Outcome::Adopted | Outcome::Unknown)) {
                    return;
                }
            }
            closing = true;
        }
        if buffered.len() > MAX_HEAD {
            return;
        }
        tokio::select! {
            read = stream.read_buf(&mut buffered) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            changed = draining.changed(), if !closing => {
                if changed.is_err() {
                    closing = true;
                }
            }
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
    let handoff = HandoffChannel::from_env()?.map(Arc::new);
    let drain = drain_signal()?;
    let (draining_tx, draining) = watch::channel(false);
    // When it is closed and empty, we are drained.
    let connections = TaskTracker::new();
    // Connections an earlier generation hands over, for as long as the channel is open (also
    // while draining: one adopted then is handed on at once).
    if let Some(channel) = handoff.clone() {
        let (body, draining, connections) =
            (Arc::clone(&body), draining.clone(), connections.clone());
        tokio::spawn(async move {
            while let Some(handed) = channel.accept().await {
                let Ok(stream) = handed
                    .stream
                    .set_nonblocking(true)
                    .and_then(|()| TcpStream::from_std(handed.stream))
                else {
                    continue;
                };
                connections.spawn(serve(
                    stream,
                    handed.buffered,
                    Arc::clone(&body),
                    draining.clone(),
                    Some(Arc::clone(&channel)),
                ));
            }
        });
    }
    notify_ready()?;

    tokio::pin!(drain);
    let mut datagram = [0u8; 2048];
    loop {
        tokio::select! {
            _ = &mut drain => break,
            accepted = async { tcp.as_ref().unwrap().accept().await }, if tcp.is_some() => {
                if let Ok((stream, _)) = accepted {
                    connections.spawn(serve(
                        stream,
                        Vec::new(),
                        Arc::clone(&body),
                        draining.clone(),
                        handoff.clone(),
                    ));
                }
            }
            received = async { udp.as_ref().unwrap().recv_from(&mut datagram).await }, if udp.is_some() => {
                if let Ok((n, peer)) = received {
                    let _ = udp.as_ref().unwrap().send_to(&udp_answer(&body, &datagram[..n]), peer).await;
                }
            }
        }
    }
    // Drain: stop accepting (the listener closes here), answer what is in flight, hand the
    // rest over.
    let _ = notify_stopping();
    drop(tcp);
    if let Some(udp) = udp {
        answer_queued(&udp, &body);
    }
    let _ = draining_tx.send(true);
    connections.close();
    connections.wait().await;
    Ok(())
}
