//! An unreliable uplink in front of an upstream registry: a TCP proxy on 127.0.0.1
//! that counts the bytes the registry sends, can cap their rate (one schedule shared
//! by every connection, as on one link), reset every open connection, and go down
//! for a while.
//!
//! While down, the link black-holes: open connections relay nothing either way (the
//! client sees a stall, as when packets are dropped) and are reset when the link comes
//! back; new connections are reset as soon as they are accepted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy; its tasks end with the test's runtime.
pub struct FlakyProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    target: SocketAddr,
    /// Bytes per second towards the clients, 0 for no cap.
    rate: u64,
    /// When the next relayed chunk may leave (the rate cap).
    schedule: std::sync::Mutex<tokio::time::Instant>,
    /// Bytes read from the registry, whether or not they reached a client.
    from_upstream: AtomicU64,
    /// Bumped to reset every open connection.
    resets: watch::Sender<u64>,
    /// Whether the link is down.
    down: watch::Sender<bool>,
}

impl FlakyProxy {
    /// Relays connections to `target`, at most `rate` bytes per second towards the
    /// clients (0: no cap).
    pub async fn start(target: SocketAddr, rate: u64) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the proxy")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            rate,
            schedule: std::sync::Mutex::new(tokio::time::Instant::now()),
            from_upstream: AtomicU64::new(0),
            resets: watch::channel(0).0,
            down: watch::channel(false).0,
        });
        let accept_shared = shared.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *accept_shared.down.borrow() {
                    reset(client);
                    continue;
                }
                tokio::spawn(relay(accept_shared.clone(), client));
            }
        });
        Ok(Self { addr, shared })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes the registry has sent through the proxy so far.
    pub fn upstream_bytes(&self) -> u64 {
        self.shared.from_upstream.load(Ordering::SeqCst)
    }

    /// Resets (TCP RST) every open connection.
    pub fn reset_all(&self) {
        self.shared.resets.send_modify(|n| *n += 1);
    }

    /// Takes the link down (`true`) or brings it back (`false`).
    pub fn set_down(&self, down: bool) {
        self.shared.down.send_replace(down);
    }

    /// Waits until the registry has sent at least `bytes`, for at most `limit`.
    pub async fn wait_for_bytes(&self, bytes: u64, limit: Duration) -> anyhow::Result<()> {
        let started = tokio::time::Instant::now();
        while self.upstream_bytes() < bytes {
            anyhow::ensure!(
                started.elapsed() < limit,
                "the registry sent {} bytes through the proxy within {limit:?}, expected {bytes}",
                self.upstream_bytes()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

/// Closes `stream` with a TCP RST instead of a FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Relays one connection until either side closes, a reset is asked for, or the link
/// comes back after being down.
async fn relay(shared: Arc<Shared>, mut client: TcpStream) {
    let Ok(mut server) = TcpStream::connect(shared.target).await else {
        reset(client);
        return;
    };
    let mut resets = shared.resets.subscribe();
    let mut down = shared.down.subscribe();
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let mut up_buf = vec![0u8; 16 * 1024];
    let mut down_buf = vec![0u8; 16 * 1024];
    let mut up_open = true;
    loop {
        if *down.borrow_and_update() {
            // Black hole: relay nothing until the link is back, then drop the
            // connection the way a path that lost its state does.
            tokio::select! {
                _ = down.wait_for(|d| !*d) => {}
                _ = resets.changed() => {}
            }
            break;
        }
        tokio::select! {
            _ = resets.changed() => break,
            _ = down.changed() => continue,
            n = cr.read(&mut up_buf), if up_open => match n {
                Ok(0) | Err(_) => {
                    up_open = false;
                    let _ = sw.shutdown().await;
                }
                Ok(n) => {
                    if sw.write_all(&up_buf[..n]).await.is_err() {
                        break;
                    }
                }
            },
            n = sr.read(&mut down_buf) => {
                let n = match n {
                    Ok(0) => {
                        let _ = cw.shutdown().await;
                        return;
                    }
                    Ok(n) => n,
                    Err(_) => break,
                };
                shared.from_upstream.fetch_add(n as u64, Ordering::SeqCst);
                if shared.rate > 0 {
                    let at = {
                        let mut next = shared.schedule.lock().expect("proxy schedule");
                        let at = (*next).max(tokio::time::Instant::now());
                        *next = at + Duration::from_secs_f64(n as f64 / shared.rate as f64);
                        at
                    };
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = resets.changed() => break,
                    }
                }
                if cw.write_all(&down_buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    reset(client);
    reset(server);
}
