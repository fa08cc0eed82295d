//! Bad input at real processes: garbage UDP datagrams and unfinished or badly proved
//! QUIC handshakes at a QUIC port, slow, oversized and malformed HTTP requests at a
//! mirror; plus what the flood tests read back: a process's memory
//! ([`MemorySampler`], `/proc/<pid>/status`) and its log lines.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{Rng, RngCore};
use swarm_net::probe;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::process::ChildGuard;

/// Sends `count` datagrams of random bytes (1 to 1,400 bytes each, from `sockets`
/// source ports) to `target`, spread evenly over `within`. Runs on a thread of its
/// own; returns how many were sent.
pub fn garbage_datagrams(target: SocketAddr, count: u64, sockets: usize, within: Duration) -> std::io::Result<u64> {
    let socks: Vec<UdpSocket> =
        (0..sockets.max(1)).map(|_| UdpSocket::bind("127.0.0.1:0")).collect::<std::io::Result<_>>()?;
    let mut rng = rand::thread_rng();
    let mut buf = [0u8; 1400];
    let started = Instant::now();
    let batch = 100;
    let mut sent = 0;
    while sent < count {
        for _ in 0..batch.min(count - sent) {
            let len = rng.gen_range(1..=buf.len());
            rng.fill_bytes(&mut buf[..len]);
            // A full socket buffer drops the datagram, as a real network would.
            let _ = socks[(sent as usize) % socks.len()].send_to(&buf[..len], target);
            sent += 1;
        }
        let due = within.mul_f64(sent as f64 / count as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    Ok(sent)
}

/// What became of a handshake flood's attempts.
#[derive(Debug, Default)]
pub struct HandshakeTally {
    /// TLS handshake completed.
    pub tls_done: AtomicU64,
    /// Refused or failed before the TLS handshake completed (connection bound,
    /// handshake bound).
    pub refused_early: AtomicU64,
    /// Wrong proofs the server answered with a token-mismatch close.
    pub mismatch_closed: AtomicU64,
    /// Wrong proofs the server *accepted* (must stay 0).
    pub wrong_proof_accepted: AtomicU64,
}

/// `count` QUIC handshakes at `target`, spread evenly over `within`, from
/// `endpoints` client UDP ports: every other one completes TLS and then never sends
/// its token proof (it holds the connection until the server drops it, at most
/// `hold`), the rest send 32 random bytes as the proof. Returns once every attempt
/// has ended.
pub async fn handshake_flood(
    target: SocketAddr,
    count: usize,
    endpoints: usize,
    within: Duration,
    hold: Duration,
) -> anyhow::Result<Arc<HandshakeTally>> {
    let eps: Vec<_> = (0..endpoints.max(1)).map(|_| probe::raw_endpoint(false)).collect::<Result<_, _>>()?;
    let tally = Arc::new(HandshakeTally::default());
    let mut attempts = tokio::task::JoinSet::new();
    let started = tokio::time::Instant::now();
    for i in 0..count {
        tokio::time::sleep_until(started + within.mul_f64(i as f64 / count as f64)).await;
        let ep = eps[i % eps.len()].clone();
        let tally = tally.clone();
        attempts.spawn(async move {
            let conn = match tokio::time::timeout(hold, probe::connect(&ep, target)).await {
                Ok(Ok(conn)) => conn,
                _ => {
                    tally.refused_early.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            tally.tls_done.fetch_add(1, Ordering::Relaxed);
            if i % 2 == 0 {
                // Never finished: no proof; wait for the server to give up on us.
                let _ = tokio::time::timeout(hold, conn.closed()).await;
            } else {
                let mut junk = [0u8; probe::PROOF_LEN];
                rand::thread_rng().fill_bytes(&mut junk);
                match tokio::time::timeout(hold, probe::send_proof(&conn, &junk)).await {
                    Ok(Err(e)) if probe::is_auth_failed(&e) => {
                        tally.mismatch_closed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(_)) => {
                        tally.wrong_proof_accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            conn.close(0u32.into(), b"");
        });
    }
    while attempts.join_next().await.is_some() {}
    Ok(tally)
}

/// How the mirror treated one abusive HTTP request.
#[derive(Debug)]
pub struct AbuseOutcome {
    pub what: &'static str,
    /// The status line's code, if it answered at all.
    pub status: Option<u16>,
    /// Whether it closed the connection (read returned end of stream or an error).
    pub closed: bool,
    pub took: Duration,
}

/// Writes `head` then reads until the mirror closes the connection (or `limit`):
/// returns the status it answered with, if any.
async fn send_and_read(addr: SocketAddr, what: &'static str, parts: Vec<Vec<u8>>, limit: Duration) -> AbuseOutcome {
    let started = Instant::now();
    let mut out = AbuseOutcome { what, status: None, closed: false, took: Duration::ZERO };
    let Ok(s) = TcpStream::connect(addr).await else {
        out.closed = true;
        return out;
    };
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        for p in parts {
            if w.write_all(&p).await.is_err() {
                return;
            }
        }
        // Keep our side open: the server must be the one to close.
        tokio::time::sleep(Duration::from_secs(3600)).await;
    });
    let read = tokio::time::timeout(limit, async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    writer.abort();
    out.took = started.elapsed();
    let got = match read {
        Ok(got) => {
            out.closed = true;
            got
        }
        Err(_) => Vec::new(),
    };
    out.status = std::str::from_utf8(got.get(..12).unwrap_or_default())
        .ok()
        .and_then(|l| l.strip_prefix("HTTP/1.1 "))
        .and_then(|c| c.get(..3))
        .and_then(|c| c.parse().ok());
    out
}

/// Slow, oversized and malformed requests at the mirror on `addr`, all at once:
/// `slow` connections trickling a header a byte every 500 ms, a 1 MiB header, a
/// 1 MiB URL, a GET and a POST announcing a 1 GiB body (16 MiB of it sent), binary
/// garbage, and a request line of an unknown HTTP version. Each waits up to `limit`
/// for the mirror to answer and close.
pub async fn abuse_mirror(addr: SocketAddr, slow: usize, limit: Duration) -> Vec<AbuseOutcome> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..slow {
        let mut parts = vec![b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ".to_vec()];
        // 30 s of trickle, far past the mirror's header timeout.
        parts.extend((0..60).map(|_| b"a".to_vec()));
        set.spawn(async move {
            let started = Instant::now();
            let mut out = AbuseOutcome { what: "slowloris", status: None, closed: false, took: Duration::ZERO };
            let Ok(mut s) = TcpStream::connect(addr).await else {
                out.closed = true;
                return out;
            };
            let mut buf = [0u8; 1024];
            for p in parts {
                if s.write_all(&p).await.is_err() {
                    out.closed = true;
                    break;
                }
                // A closed connection shows up as a read of 0 within the pause.
                match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        out.closed = true;
                        break;
                    }
                    Ok(Ok(n)) => {
                        out.status = std::str::from_utf8(&buf[..n.min(12)])
                            .ok()
                            .and_then(|l| l.strip_prefix("HTTP/1.1 "))
                            .and_then(|c| c.get(..3))
                            .and_then(|c| c.parse().ok());
                    }
                    Err(_) => {}
                }
                if started.elapsed() > limit {
                    break;
                }
            }
            out.took = started.elapsed();
            out
        });
    }
    let big = "a".repeat(1 << 20);
    let cases: Vec<(&'static str, Vec<Vec<u8>>)> = vec![
        ("huge header", vec![format!("GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").into_bytes()]),
        ("huge url", vec![format!("GET /v2/{big} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes()]),
        ("huge body (POST)", huge_body("POST")),
        ("huge body (GET)", huge_body("GET")),
        ("binary garbage", vec![(0..4096u32).map(|i| (i * 7919 % 251) as u8).collect()]),
        ("bad version", vec![b"GET /v2/ HTTP/9.9\r\nHost: x\r\n\r\n".to_vec()]),
        ("no host, bad line", vec![b"\r\n\r\nGARBAGE\r\n\r\n".to_vec()]),
    ];
    for (what, parts) in cases {
        set.spawn(send_and_read(addr, what, parts, limit));
    }
    let mut outcomes = Vec::new();
    while let Some(o) = set.join_next().await {
        if let Ok(o) = o {
            outcomes.push(o);
        }
    }
    outcomes
}

fn huge_body(method: &str) -> Vec<Vec<u8>> {
    let mut parts =
        vec![format!("{method} /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n").into_bytes()];
    parts.extend((0..16).map(|_| vec![0x5a; 1 << 20]));
    parts
}

/// A process's memory figures from `/proc/<pid>/status`, in KiB: (VmRSS, VmHWM).
pub fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("process {pid}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .with_context(|| format!("{name} missing from /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Samples a process's VmRSS every 50 ms on a thread until dropped; keeps the peak.
pub struct MemorySampler {
    pid: u32,
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MemorySampler {
    pub fn start(pid: u32) -> Self {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (peak, halt) = (peak_kib.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                if let Ok((rss, _)) = memory_kib(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self { pid, peak_kib, stop, thread: Some(thread) }
    }

    /// The highest VmRSS sampled so far, and the kernel's VmHWM (peak over the
    /// process's whole life), in MiB.
    pub fn peaks_mib(&self) -> (f64, f64) {
        let hwm = memory_kib(self.pid).map(|(_, hwm)| hwm).unwrap_or(0);
        (self.peak_kib.load(Ordering::Relaxed) as f64 / 1024.0, hwm as f64 / 1024.0)
    }
}

impl Drop for MemorySampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The number of lines of `path` (a process's log).
pub fn line_count(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0)
}

/// The lines of `path` after the first `skip`, at WARN or ERROR level or INFO (what a
/// production log level shows).
pub fn logged_lines_after(path: &Path, skip: usize) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .skip(skip)
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains(" INFO "))
        .map(str::to_owned)
        .collect()
}

/// The QUIC address an agent logged at start (`peer … on ADDR (QUIC)`).
pub fn agent_quic_addr(child: &ChildGuard) -> anyhow::Result<SocketAddr> {
    let text = child.stderr_text();
    let line = text.lines().find(|l| l.contains("(QUIC)")).context("the agent logged no QUIC address")?;
    let addr = line.split(" on ").nth(1).and_then(|r| r.split(' ').next()).context("QUIC address in the line")?;
    addr.parse().with_context(|| format!("parsing {addr:?}"))
}

/// Lowers the priority of every thread of this (test) process to nice `n`, with
/// `renice`; threads started later inherit it. Then the flood this process generates
/// takes CPU only when the processes under test leave some, as an attacker on
/// another machine would: on a two-core test machine the attacker's own TLS work
/// would otherwise be what slows the pull.
pub fn nice_this_process(n: i32) -> anyhow::Result<()> {
    let tids: Vec<String> = std::fs::read_dir("/proc/self/task")?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    let mut cmd = std::process::Command::new(super::process::require_tool("renice", "util-linux"));
    cmd.args(["-n", &n.to_string(), "-p"]).args(&tids);
    super::process::run(cmd, Duration::from_secs(10))?;
    Ok(())
}

/// `curl` GETs `url` into `out` (a process of its own, at normal priority); returns
/// how long it took. Fails unless the answer is 200.
pub fn curl_get(url: &str, out: &Path) -> anyhow::Result<Duration> {
    let mut cmd = std::process::Command::new(super::process::require_tool("curl", "curl"));
    cmd.args(["-sS", "--fail", "-o"]).arg(out).arg(url);
    let started = Instant::now();
    super::process::run(cmd, Duration::from_secs(120))?;
    Ok(started.elapsed())
}
