//! An example server with per-connection state that survives upgrades: a line protocol in
//! which every line the client sends is answered with the session's running count and the
//! generation that counted it (`3 gen 2`). Under `hotswap run --handoff` a draining generation
//! hands each session — the connection, the bytes of a line not yet complete, and the count —
//! to the next generation, which carries on counting; the client sees no gap, no reset and no
//! new connection.
//!
//! ```sh
//! hotswap run counter --handoff --listen tcp://127.0.0.1:7070 -- target/debug/examples/counter
//! nc 127.0.0.1 7070      # type lines; `hotswap upgrade counter` in between
//! ```
//!
//! Without a handoff channel (or when no generation takes a session) it serves each session
//! until the client closes it.

use std::{os::fd::AsFd as _, sync::Arc};

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

/// The longest line a session buffers.
const MAX_LINE: usize = 4096;

/// One session: answers complete lines, and hands itself over when the generation drains and
/// it is between lines (or keeps serving if no one takes it).
async fn session(
    mut stream: TcpStream,
    mut buffered: Vec<u8>,
    mut count: u64,
    mut draining: watch::Receiver<bool>,
    handoff: Option<Arc<HandoffChannel>>,
    me: Arc<String>,
) {
    let mut handed = false;
    loop {
        while let Some(end) = buffered.iter().position(|&b| b == b'\n') {
            buffered.drain(..=end);
            count += 1;
            if stream
                .write_all(format!("{count} gen {me}\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
        if buffered.len() > MAX_LINE {
            return;
        }
        if *draining.borrow() && !handed {
            if let Some(channel) = &handoff {
                let state = count.to_string();
                let outcome = channel
                    .hand_over(stream.as_fd(), &buffered, state.as_bytes())
                    .await;
                // Unknown (the channel closed before the answer): ours is dropped either way.
                if matches!(outcome, Ok(Outcome::Adopted | Outcome::Unknown)) {
                    return;
                }
            }
            // No one took it: it stays ours until the client is done.
            handed = true;
        }
        tokio::select! {
            read = stream.read_buf(&mut buffered) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            changed = draining.changed(), if !handed => {
                if changed.is_err() {
                    handed = true;
                }
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let me = Arc::new(generation().map_or("-".to_owned(), |g| g.to_string()));
    let mut listeners = Listeners::from_env()?;
    let tcp = listeners.take_tokio_tcp("tcp")?;
    let handoff = HandoffChannel::from_env()?.map(Arc::new);
    let drain = drain_signal()?;
    let (draining_tx, draining) = watch::channel(false);
    // When it is closed and empty, we are drained.
    let sessions = TaskTracker::new();

    // Sessions an earlier generation hands over, for as long as the channel is open (also while
    // draining: a session adopted then is handed on at once).
    if let Some(channel) = handoff.clone() {
        let (draining, me, sessions) = (draining.clone(), Arc::clone(&me), sessions.clone());
        tokio::spawn(async move {
            while let Some(handed) = channel.accept().await {
                let Ok(stream) = handed
                    .stream
                    .set_nonblocking(true)
                    .and_then(|()| TcpStream::from_std(handed.stream))
                else {
                    continue;
                };
                let count = std::str::from_utf8(&handed.state)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let handoff = Some(Arc::clone(&channel));
                sessions.spawn(session(
                    stream,
                    handed.buffered,
                    count,
                    draining.clone(),
                    handoff,
                    Arc::clone(&me),
                ));
            }
        });
    }
    notify_ready()?;

    tokio::pin!(drain);
    loop {
        tokio::select! {
            _ = &mut drain => break,
            accepted = tcp.accept() => {
                if let Ok((stream, _)) = accepted {
                    sessions.spawn(session(
                        stream,
                        Vec::new(),
                        0,
                        draining.clone(),
                        handoff.clone(),
                        Arc::clone(&me),
                    ));
                }
            }
        }
    }
    // Drain: stop accepting, hand every session over, exit when none is left.
    let _ = notify_stopping();
    drop(tcp);
    let _ = draining_tx.send(true);
    sessions.close();
    sessions.wait().await;
    Ok(())
}
