//! A raw HTTP/1.1 client and a static HTTP server, both on plain tokio sockets.
//!
//! The client sends the request target byte for byte (no URL normalisation, so `..`
//! and `%2F` reach the server as written) and reports whether the body was complete
//! (as long as `Content-Length` said), which is how a truncated transfer is detected.
//! The server answers from a fixed table, e.g. to play an upstream registry that
//! serves wrong bytes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long one raw request may take in total.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A response as it came off the wire.
#[derive(Clone, Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Header names in lower case, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the body had exactly `Content-Length` bytes and the connection closed
    /// cleanly. `false` means a truncated (aborted) transfer.
    pub complete: bool,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    /// The body as JSON (panics with the body text if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The first OCI error code in the body, if any.
    pub fn error_code(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v["errors"][0]["code"].as_str().map(str::to_string)
    }
}

/// Sends one request (`Connection: close`) and reads the answer to the end.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<RawResponse> {
    request_within(addr, method, target, headers, REQUEST_TIMEOUT).await
}

/// Like [`request`], allowing `limit` in total instead of [`REQUEST_TIMEOUT`] (for
/// answers that may wait out an outage).
pub async fn request_within(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    limit: Duration,
) -> anyhow::Result<RawResponse> {
    tokio::time::timeout(limit, request_inner(addr, method, target, headers))
        .await
        .with_context(|| format!("{method} {target} on {addr}: no complete answer within {limit:?}"))?
}

async fn request_inner(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<RawResponse> {
    let mut stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.context("sending the request")?;
    let mut buf = Vec::new();
    let mut clean_eof = true;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {
                // Reset by the peer: an aborted response.
                clean_eof = false;
                break;
            }
        }
    }
    let Some(split) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("{method} {target}: no complete response head ({} bytes received)", buf.len());
    };
    let head_text = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head_text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = buf[split + 4..].to_vec();
    let mut response = RawResponse { status, headers, body, complete: clean_eof };
    if response.header("transfer-encoding").is_some() {
        bail!("{method} {target}: chunked responses are not supported by this test client");
    }
    let expected = if method == "HEAD" || status == 304 || status == 204 {
        Some(0)
    } else {
        response.header("content-length").and_then(|v| v.parse::<usize>().ok())
    };
    if let Some(expected) = expected {
        response.complete &= response.body.len() == expected;
    }
    Ok(response)
}

/// One canned answer of a [`StaticServer`].
#[derive(Clone, Debug)]
pub struct Canned {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Canned {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self { status, headers: Vec::new(), body: body.into() }
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }
}

/// Answers `GET`/`HEAD` for the paths (query ignored) in its table, and a default
/// answer (404 unless given) for anything else; counts requests per path. Stops when
/// dropped.
pub struct StaticServer {
    addr: SocketAddr,
    hits: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    total: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl StaticServer {
    pub async fn start(routes: HashMap<String, Canned>) -> anyhow::Result<Self> {
        let not_found = Canned::new(404, r#"{"errors":[{"code":"NOT_FOUND","message":"no such path"}]}"#)
            .header("Content-Type", "application/json");
        Self::start_with_default(routes, not_found).await
    }

    /// Answers `default` to every request not in `routes`.
    pub async fn start_with_default(routes: HashMap<String, Canned>, default: Canned) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the static server")?;
        let addr = listener.local_addr()?;
        let routes = Arc::new((routes, default));
        let hits = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let total = Arc::new(AtomicUsize::new(0));
        let (h, t) = (hits.clone(), total.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (routes, hits, total) = (routes.clone(), h.clone(), t.clone());
                tokio::spawn(async move {
                    let _ = serve_one(stream, &routes.0, &routes.1, &hits, &total).await;
                });
            }
        });
        Ok(Self { addr, hits, total, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, as a registry name.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn hits(&self, path: &str) -> usize {
        self.hits.lock().map(|h| h.get(path).copied().unwrap_or(0)).unwrap_or(0)
    }

    pub fn total_hits(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_one(
    mut stream: TcpStream,
    routes: &HashMap<String, Canned>,
    default: &Canned,
    hits: &std::sync::Mutex<HashMap<String, usize>>,
    total: &AtomicUsize,
) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await??;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 64 * 1024 {
            bail!("request head too large");
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let mut parts = text.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_string();
    total.fetch_add(1, Ordering::SeqCst);
    if let Ok(mut h) = hits.lock() {
        *h.entry(path.clone()).or_default() += 1;
    }
    let canned = routes.get(&path).unwrap_or(default);
    let mut head =
        format!("HTTP/1.1 {} X\r\nConnection: close\r\nContent-Length: {}\r\n", canned.status, canned.body.len());
    for (k, v) in &canned.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(&canned.body).await?;
    }
    stream.shutdown().await?;
    Ok(())
}
