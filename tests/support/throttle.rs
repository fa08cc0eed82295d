//! A slow WAN uplink in front of the registry, for tests that need a transfer to be
//! still running when something fails, or that measure the rate crossing it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Relays TCP to `target`, sending at most `rate` bytes per second towards the
/// clients in total (one send schedule shared by every connection, as on one link),
/// and counts the bytes relayed: a slow WAN uplink in front of the registry.
pub async fn throttled_proxy(target: SocketAddr, rate: u64, sent: Arc<AtomicU64>) -> SocketAddr {
    throttled_proxy_logged(target, rate, sent, ByteLog::default()).await
}

/// When each relayed chunk went out and how big it was, for rates over time.
#[derive(Clone, Debug, Default)]
pub struct ByteLog(Arc<Mutex<Vec<(Instant, u64)>>>);

impl ByteLog {
    /// Notes `bytes` sent now.
    pub fn note(&self, bytes: u64) {
        self.0.lock().expect("byte log").push((Instant::now(), bytes));
    }

    /// Every entry so far.
    pub fn entries(&self) -> Vec<(Instant, u64)> {
        self.0.lock().expect("byte log").clone()
    }

    /// The bytes logged and the span from the first entry to the last.
    pub fn total(&self) -> (u64, Duration) {
        let e = self.entries();
        let span = match (e.first(), e.last()) {
            (Some(a), Some(b)) => b.0 - a.0,
            _ => Duration::ZERO,
        };
        (e.iter().map(|(_, n)| n).sum(), span)
    }

    /// The highest rate (bytes per second) over any `window` starting at a logged
    /// chunk: a sliding window, stricter than fixed ones.
    pub fn max_rate(&self, window: Duration) -> f64 {
        max_window_rate(&self.entries(), window)
    }
}

/// The highest rate (bytes per second) over any `window` of `entries` (sorted by
/// time) starting at an entry.
pub fn max_window_rate(entries: &[(Instant, u64)], window: Duration) -> f64 {
    let (mut best, mut sum, mut end) = (0u64, 0u64, 0usize);
    for (i, (start, _)) in entries.iter().enumerate() {
        while end < entries.len() && entries[end].0 < *start + window {
            sum += entries[end].1;
            end += 1;
        }
        best = best.max(sum);
        if i < end {
            sum -= entries[i].1;
        }
    }
    best as f64 / window.as_secs_f64()
}

/// The highest rate (bytes per second) a sampled counter shows over `window`: the
/// largest increase between two samples (`(when, cumulative value)`, sorted by time)
/// at most `window` apart, divided by `window`.
pub fn max_sampled_rate(samples: &[(Instant, u64)], window: Duration) -> f64 {
    let mut best = 0;
    let mut end = 0;
    for (i, (start, from)) in samples.iter().enumerate() {
        end = end.max(i);
        while end + 1 < samples.len() && samples[end + 1].0 <= *start + window {
            end += 1;
        }
        best = best.max(samples[end].1.saturating_sub(*from));
    }
    best as f64 / window.as_secs_f64()
}

/// Like [`throttled_proxy`], also noting every relayed chunk in `log`.
pub async fn throttled_proxy_logged(target: SocketAddr, rate: u64, sent: Arc<AtomicU64>, log: ByteLog) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let schedule = Arc::new(std::sync::Mutex::new(tokio::time::Instant::now()));
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let (sent, schedule, log) = (sent.clone(), schedule.clone(), log.clone());
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
                        log.note(n as u64);
                    }
                    cw.shutdown().await
                };
                let _ = tokio::join!(up, down);
            });
        }
    });
    addr
}
