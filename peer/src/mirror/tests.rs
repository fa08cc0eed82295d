//! In-process tests of the mirror with an in-memory provider. The HTTP API against a
//! real `docker-registry`, and real containerd, are in the root `tests/mirror_*.rs`.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::mpsc;

use super::*;
use crate::upstream::{RegistryConfig, UpstreamConfig};

/// A blob whose bytes the test feeds by hand: its length and the chunks to come.
type LiveBlobs = HashMap<Digest, (u64, mpsc::Receiver<Result<Bytes, std::io::Error>>)>;

/// Blobs from memory; one digest can be wired to a channel to control timing.
#[derive(Default)]
struct MemProvider {
    blobs: HashMap<Digest, Bytes>,
    /// Streams for blobs whose bytes the test feeds by hand.
    live: Mutex<LiveBlobs>,
    unavailable: bool,
    /// The registry and repository of every blob request, in order.
    seen: Mutex<Vec<(String, String)>>,
}

impl BlobProvider for MemProvider {
    async fn blob_length(&self, req: &BlobRequest) -> Result<u64, ProviderError> {
        if self.unavailable {
            return Err(ProviderError::Unavailable("test says no".into()));
        }
        if let Some((len, _)) = self.live.lock().expect("lock").get(&req.digest) {
            return Ok(*len);
        }
        self.blobs.get(&req.digest).map(|b| b.len() as u64).ok_or(ProviderError::NotFound)
    }

    async fn open_blob(&self, req: &BlobRequest, offset: u64) -> Result<BlobBody, ProviderError> {
        self.seen.lock().expect("lock").push((req.registry.clone(), req.repository.clone()));
        if self.unavailable {
            return Err(ProviderError::Unavailable("test says no".into()));
        }
        if let Some((len, mut rx)) = self.live.lock().expect("lock").remove(&req.digest) {
            let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed();
            return Ok(BlobBody { length: len, stream });
        }
        let bytes = self.blobs.get(&req.digest).ok_or(ProviderError::NotFound)?;
        let rest = bytes.slice(offset as usize..);
        // Small chunks, to exercise re-chunking.
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            (0..rest.len()).step_by(1000).map(|i| Ok(rest.slice(i..(i + 1000).min(rest.len())))).collect();
        Ok(BlobBody { length: bytes.len() as u64, stream: futures_util::stream::iter(chunks).boxed() })
    }
}

struct TestMirror {
    addr: std::net::SocketAddr,
    metrics: Arc<MirrorMetrics>,
    cancel: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for TestMirror {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn start(provider: MemProvider) -> TestMirror {
    start_with(Arc::new(provider), false).await
}

/// A mirror over `provider`; with `registry_in_path`, wrapped in
/// [`Route::accept_registry_in_path`] as the agent serves it.
async fn start_with(provider: Arc<MemProvider>, registry_in_path: bool) -> TestMirror {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = UpstreamConfig::default();
    // Manifests are not under test here; point the registry at a closed port.
    config.registries.insert(
        "reg.test".into(),
        RegistryConfig { endpoint: Some("http://127.0.0.1:9".into()), ..RegistryConfig::default() },
    );
    let upstream = UpstreamClient::new(config).expect("client");
    let metrics = Arc::new(MirrorMetrics::default());
    let mut router = router(provider, upstream, MirrorConfig::new(dir.path().join("m")), metrics.clone());
    if registry_in_path {
        router = Route::accept_registry_in_path(router);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cancel = CancellationToken::new();
    tokio::spawn(serve(listener, router, cancel.clone()));
    TestMirror { addr, metrics, cancel, _dir: dir }
}

fn blob() -> Bytes {
    Bytes::from((0..10_000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

fn url(m: &TestMirror, digest: &Digest) -> String {
    format!("http://{}/v2/a/b/blobs/{digest}?ns=reg.test", m.addr)
}

#[tokio::test]
async fn blob_get_head_and_ranges() {
    let b = blob();
    let d = Digest::of(&b);
    let m = start(MemProvider { blobs: HashMap::from([(d, b.clone())]), ..Default::default() }).await;
    let http = reqwest::Client::new();

    let resp = http.get(url(&m, &d)).send().await.expect("get");
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h["content-length"], "10000");
    assert_eq!(h["content-type"], "application/octet-stream");
    assert_eq!(h["docker-content-digest"], d.to_string().as_str());
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(h["docker-distribution-api-version"], "registry/2.0");
    assert_eq!(resp.bytes().await.expect("body"), b);

    let resp = http.head(url(&m, &d)).send().await.expect("head");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], "10000");

    for (range, status, content_range, expected) in [
        ("bytes=10-19", 206, Some("bytes 10-19/10000"), &b[10..20]),
        ("bytes=9990-", 206, Some("bytes 9990-9999/10000"), &b[9990..]),
        ("bytes=-5", 206, Some("bytes 9995-9999/10000"), &b[9995..]),
        ("bytes=9000-20000", 206, Some("bytes 9000-9999/10000"), &b[9000..]),
        ("bytes=0-1,5-6", 200, None, &b[..]),
        ("bytes=10000-", 416, Some("bytes */10000"), &[][..]),
    ] {
        let resp = http.get(url(&m, &d)).header("range", range).send().await.expect("get");
        assert_eq!(resp.status(), status, "{range}");
        assert_eq!(resp.headers().get("content-range").map(|v| v.to_str().expect("text")), content_range, "{range}");
        let body = resp.bytes().await.expect("body");
        if status != 416 {
            assert_eq!(body.as_ref(), expected, "{range}");
        }
    }
    let snap = m.metrics.snapshot();
    assert_eq!(snap.requests_ok, 7);
    assert_eq!(snap.requests_rejected, 1);
}

/// containers/image (CRI-O, podman, skopeo) names the registry in the path; containerd
/// in `?ns=`. Both reach the provider as the same request.
#[tokio::test]
async fn the_registry_may_be_named_in_the_path() {
    let b = blob();
    let d = Digest::of(&b);
    let provider = Arc::new(MemProvider { blobs: HashMap::from([(d, b.clone())]), ..Default::default() });
    let m = start_with(provider.clone(), true).await;
    let http = reqwest::Client::new();
    for path in [format!("/v2/reg.test/a/b/blobs/{d}"), format!("/v2/a/b/blobs/{d}?ns=reg.test")] {
        let resp = http.get(format!("http://{}{path}", m.addr)).send().await.expect("get");
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.bytes().await.expect("body"), b, "{path}");
    }
    let want = ("reg.test".to_string(), "a/b".to_string());
    assert_eq!(*provider.seen.lock().expect("lock"), vec![want.clone(), want]);
    // Without a registry in either place the request is refused, and says how to name it.
    let resp = http.get(format!("http://{}/v2/a/b/blobs/{d}", m.addr)).send().await.expect("get");
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.expect("body").contains("/v2/REGISTRY/NAME/"));
}

#[tokio::test]
async fn missing_and_unavailable_blobs() {
    let m = start(MemProvider::default()).await;
    let http = reqwest::Client::new();
    let d = Digest::of(b"nothing");
    let resp = http.get(url(&m, &d)).send().await.expect("get");
    assert_eq!(resp.status(), 404);
    let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json");
    assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");

    let m = start(MemProvider { unavailable: true, ..Default::default() }).await;
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let resp = http.request(method.clone(), url(&m, &d)).send().await.expect("send");
        assert_eq!(resp.status(), FALLBACK_STATUS, "{method}");
    }
    let resp = http.get(url(&m, &d)).send().await.expect("get");
    let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json");
    assert_eq!(v["errors"][0]["code"], FALLBACK_CODE);
    // Manifests whose upstream is unreachable fall back too.
    let resp = http.head(format!("http://{}/v2/a/b/manifests/latest?ns=reg.test", m.addr)).send().await.expect("head");
    assert_eq!(resp.status(), FALLBACK_STATUS);
    assert_eq!(m.metrics.snapshot().requests_fallback, 4);
}

#[tokio::test]
async fn blob_bytes_stream_before_the_provider_has_them_all() {
    let d = Digest::of(b"live");
    let (tx, rx) = mpsc::channel(4);
    let provider = MemProvider::default();
    provider.live.lock().expect("lock").insert(d, (8, rx));
    let m = start(provider).await;
    let mut resp = reqwest::Client::new().get(url(&m, &d)).send().await.expect("get");
    tx.send(Ok(Bytes::from_static(b"abcd"))).await.expect("send");
    let first = tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await.expect("first chunk in time");
    assert_eq!(first.expect("chunk").as_deref(), Some(&b"abcd"[..]), "headers and first bytes before the rest");
    tx.send(Ok(Bytes::from_static(b"efgh"))).await.expect("send");
    let second = tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await.expect("second chunk");
    assert_eq!(second.expect("chunk").as_deref(), Some(&b"efgh"[..]));
    assert_eq!(m.metrics.snapshot().bytes_served, 8);
}

#[tokio::test]
async fn provider_failure_midway_truncates_the_response() {
    let d = Digest::of(b"live");
    let (tx, rx) = mpsc::channel(4);
    let provider = MemProvider::default();
    provider.live.lock().expect("lock").insert(d, (8, rx));
    let m = start(provider).await;
    let resp = reqwest::Client::new().get(url(&m, &d)).send().await.expect("get");
    assert_eq!(resp.status(), 200);
    tx.send(Ok(Bytes::from_static(b"abcd"))).await.expect("send");
    tx.send(Err(std::io::Error::other("peer vanished"))).await.expect("send");
    let body = tokio::time::timeout(Duration::from_secs(5), resp.bytes()).await.expect("bounded");
    assert!(body.is_err(), "a failed stream must not look like a complete body: {body:?}");
    assert_eq!(m.metrics.snapshot().streams_aborted, 1);
}

#[tokio::test]
async fn provider_stream_ending_early_truncates_the_response() {
    let d = Digest::of(b"live");
    let (tx, rx) = mpsc::channel(4);
    let provider = MemProvider::default();
    provider.live.lock().expect("lock").insert(d, (8, rx));
    let m = start(provider).await;
    let resp = reqwest::Client::new().get(url(&m, &d)).send().await.expect("get");
    tx.send(Ok(Bytes::from_static(b"abc"))).await.expect("send");
    drop(tx);
    let body = tokio::time::timeout(Duration::from_secs(5), resp.bytes()).await.expect("bounded");
    assert!(body.is_err(), "{body:?}");
}

#[tokio::test]
async fn base_and_methods() {
    let m = start(MemProvider::default()).await;
    let http = reqwest::Client::new();
    let resp = http.get(format!("http://{}/v2/", m.addr)).send().await.expect("get");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["docker-distribution-api-version"], "registry/2.0");
    let d = Digest::of(b"x");
    for method in [reqwest::Method::POST, reqwest::Method::PUT, reqwest::Method::DELETE, reqwest::Method::PATCH] {
        let resp = http.request(method.clone(), url(&m, &d)).send().await.expect("send");
        assert_eq!(resp.status(), 405, "{method}");
        assert_eq!(resp.headers()["allow"], "GET, HEAD");
        let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json");
        assert_eq!(v["errors"][0]["code"], "UNSUPPORTED");
    }
    let resp = http.get(format!("http://{}/v2/a/blobs/{d}", m.addr)).send().await.expect("get");
    assert_eq!(resp.status(), 400, "ns is required");
}

#[tokio::test]
async fn shutdown_is_bounded() {
    let m = start(MemProvider::default()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let cancel = CancellationToken::new();
    let upstream = UpstreamClient::new(UpstreamConfig::default()).expect("client");
    let r = router(Arc::new(MemProvider::default()), upstream, MirrorConfig::new(m._dir.path()), m.metrics.clone());
    let task = tokio::spawn(serve(listener, r, cancel.clone()));
    cancel.cancel();
    let result = tokio::time::timeout(Duration::from_secs(2), task).await.expect("stops at once when idle");
    assert!(result.expect("join").is_ok());
}
