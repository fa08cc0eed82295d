//! A throttled TCP relay that counts the bytes it relays: a slow WAN uplink in front
//! of the registry.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Relays TCP to `target`, sending at most `rate` bytes per second towards the
/// clients in total (one send schedule shared by every connection, as on one link),
/// and counts the bytes relayed: a slow WAN uplink in front of the registry.
pub async fn throttled_proxy(target: SocketAddr, rate: u64, sent: Arc<AtomicU64>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let schedule = Arc::new(std::sync::Mutex::new(tokio::time::Instant::now()));
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let (sent, schedule) = (sent.clone(), schedule.clone());
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(target).await else { return };
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let up = tokio::io::copy(&mut cr, &mut sw);
                let down = async {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = sr.read(&mut buf).await?;
                        if n == 0 {
                            break;
                        }
                        let at = {
                            let mut next = schedule.lock().expect("schedule");
                            let at = (*next).max(tokio::time::Instant::now());
                            *next = at + Duration::from_secs_f64(n as f64 / rate as f64);
                            at
                        };
                        tokio::time::sleep_until(at).await;
                        cw.write_all(&buf[..n]).await?;
                        sent.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    cw.shutdown().await
                };
                let _ = tokio::join!(up, down);
            });
        }
    });
    addr
}
