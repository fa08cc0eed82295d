//! The HTTP registry mirror containerd talks to.
//!
//! This module owns the pull side of the OCI distribution API as containerd 1.6 uses
//! it through `hosts.toml` (`[host."http://127.0.0.1:PORT"] capabilities = ["pull",
//! "resolve"]`):
//!
//! | request | answer |
//! |---|---|
//! | `GET /v2/` | 200, `Docker-Distribution-API-Version: registry/2.0` |
//! | `HEAD`/`GET /v2/<name>/manifests/<tag>?ns=<registry>` | always resolved upstream (never stale); a GET caches the bytes by digest |
//! | `HEAD`/`GET /v2/<name>/manifests/sha256:<d>?ns=...` | from the on-disk cache (re-verified on read), else upstream (verified) and cached |
//! | `HEAD`/`GET /v2/<name>/blobs/sha256:<d>?ns=...` | bytes from the [`BlobProvider`], streamed as they arrive; `Range` → 206 / 416 |
//!
//! `<name>` is parsed from the raw path (split at the last `/manifests/` or `/blobs/`)
//! and must match the distribution grammar, so `..`, empty components and escapes like
//! `%2F` are refused with `NAME_INVALID`; bad tags get `TAG_INVALID`, anything but a
//! `sha256:` digest `DIGEST_INVALID`, a missing or malformed `ns` a 400, other methods
//! 405 `UNSUPPORTED`. Errors carry OCI bodies (`{"errors":[{"code",...}]}`).
//!
//! Every blob response delivered in full is timed, from the request to its last byte,
//! into a histogram per registry ([`MirrorMetrics::delivery_times`]).
//!
//! If the provider's stream fails midway, the response body is aborted (the
//! connection is closed before `Content-Length` bytes were sent), so the client sees a
//! truncated transfer, never a clean end.
//!
//! # What containerd 1.6.20 does with that (measured, `tests/mirror_containerd.rs`)
//!
//! - A truncated blob response is *resumed*: containerd sends `GET .../blobs/<d>` with
//!   `Range: bytes=<received>-`, trying the hosts in order again (mirror first). If
//!   the mirror then answers [`FALLBACK_STATUS`], containerd fetches just the rest
//!   from the registry and the pull succeeds.
//! - Bytes that went out are never taken back. If the assembled blob does not match
//!   its digest, the pull fails with "unexpected commit digest" and the blob is not
//!   committed, but the refused ingest stays in
//!   `<root>/io.containerd.content.v1.content/ingest/` and every later pull of that
//!   blob fails the same way, without fetching, until the ingest directory is removed.
//!   Hence the contract on [`BlobProvider`]: yield only verified bytes.
//!
//! # Fallback
//!
//! When the bytes cannot be had here — the provider says [`ProviderError::Unavailable`]
//! (upstream refused our credentials or is unreachable and no peer has the blob), or
//! the upstream manifest request fails for any reason but "not found" — the mirror
//! answers [`FALLBACK_STATUS`] (`503 Service Unavailable`, code `UNAVAILABLE`).
//!
//! Measured with containerd 1.6.20 (`ctr image pull --hosts-dir`, mirror first, the
//! registry as `server`): a mirror answering 404, 500, 502 or 503 to *everything*
//! (the tag `HEAD`, the manifest `GET` and every blob `GET`) makes containerd try the
//! next host for each request at once, without retrying the mirror and without delay;
//! the pull succeeds straight from the registry. `tests/mirror_containerd.rs` checks
//! this for 404/500/502/503 on every request, for 503 on blobs only, and for a resumed
//! range. We pick 503 over 404 so that the logs and metrics of both sides keep "does
//! not exist" (404) apart from "not here, go upstream" (503). Other statuses, probed
//! the same way: 401 (without a challenge) and 403 also fall through at once, but a 401
//! with a challenge starts containerd's auth flow against the mirror; 405 on a `HEAD`
//! is retried as a `GET`; 408 and 429 are retried against the mirror several times
//! (24 mirror requests instead of 4 for a one-layer image) before containerd moves on.

mod api;
mod cache;
mod provider;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use swarm_proto::Digest;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use api::{Outcome, RangeSpec, Reference, Route, parse_ns, parse_range, parse_route, resolve_range};
pub use cache::{CachedManifest, ManifestCache};
pub use provider::{BlobBody, BlobProvider, BlobRequest, ProviderError, UpstreamOnly, checked_stream, provider_error};

use crate::upstream::{UpstreamClient, UpstreamError};
use api::ApiError;

/// The status that makes containerd fall back to the next host (see the module docs).
pub const FALLBACK_STATUS: StatusCode = StatusCode::SERVICE_UNAVAILABLE;
/// The OCI error code sent with [`FALLBACK_STATUS`].
pub const FALLBACK_CODE: &str = "UNAVAILABLE";
/// How long [`serve`] lets in-flight responses finish after cancellation.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Settings of the mirror.
#[derive(Clone, Debug)]
pub struct MirrorConfig {
    /// Where manifests are cached by digest (created on first write).
    pub manifest_cache_dir: PathBuf,
}

impl MirrorConfig {
    pub fn new(manifest_cache_dir: impl Into<PathBuf>) -> Self {
        Self { manifest_cache_dir: manifest_cache_dir.into() }
    }
}

/// Request and byte counters.
#[derive(Debug, Default)]
pub struct MirrorMetrics {
    pub requests_ok: AtomicU64,
    pub requests_not_found: AtomicU64,
    /// Refused client requests (bad name/digest/tag, method, range, missing `ns`).
    pub requests_rejected: AtomicU64,
    pub requests_error: AtomicU64,
    /// Answered with [`FALLBACK_STATUS`].
    pub requests_fallback: AtomicU64,
    /// Blob bytes handed to clients.
    pub bytes_served: AtomicU64,
    /// Blob responses aborted midway because the provider's stream failed.
    pub streams_aborted: AtomicU64,
    pub manifest_cache_hits: AtomicU64,
    /// Delivery time of complete blob responses, by registry (`ns`).
    delivery: Mutex<BTreeMap<String, Histogram>>,
}

/// Upper bounds, in seconds, of the buckets of the blob delivery-time histogram.
pub const DELIVERY_BUCKETS: [f64; 14] =
    [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// A histogram over [`DELIVERY_BUCKETS`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Observations at or below each bound (cumulative, as Prometheus wants them).
    pub buckets: [u64; DELIVERY_BUCKETS.len()],
    /// All observations (the `+Inf` bucket).
    pub count: u64,
    /// Sum of the observations, in seconds.
    pub sum: f64,
}

impl Histogram {
    /// Adds one observation of `seconds`.
    pub fn observe(&mut self, seconds: f64) {
        for (bucket, bound) in self.buckets.iter_mut().zip(DELIVERY_BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// A plain copy of [`MirrorMetrics`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MirrorMetricsSnapshot {
    pub requests_ok: u64,
    pub requests_not_found: u64,
    pub requests_rejected: u64,
    pub requests_error: u64,
    pub requests_fallback: u64,
    pub bytes_served: u64,
    pub streams_aborted: u64,
    pub manifest_cache_hits: u64,
}

impl MirrorMetrics {
    pub fn snapshot(&self) -> MirrorMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MirrorMetricsSnapshot {
            requests_ok: get(&self.requests_ok),
            requests_not_found: get(&self.requests_not_found),
            requests_rejected: get(&self.requests_rejected),
            requests_error: get(&self.requests_error),
            requests_fallback: get(&self.requests_fallback),
            bytes_served: get(&self.bytes_served),
            streams_aborted: get(&self.streams_aborted),
            manifest_cache_hits: get(&self.manifest_cache_hits),
        }
    }

    /// The delivery-time histogram of complete blob responses, per registry.
    pub fn delivery_times(&self) -> BTreeMap<String, Histogram> {
        self.delivery.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn observe_delivery(&self, registry: &str, took: Duration) {
        let mut delivery = self.delivery.lock().unwrap_or_else(PoisonError::into_inner);
        match delivery.get_mut(registry) {
            Some(h) => h.observe(took.as_secs_f64()),
            None => {
                let mut h = Histogram::default();
                h.observe(took.as_secs_f64());
                delivery.insert(registry.to_string(), h);
            }
        }
    }

    fn record(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Ok => &self.requests_ok,
            Outcome::NotFound => &self.requests_not_found,
            Outcome::Rejected => &self.requests_rejected,
            Outcome::Fallback => &self.requests_fallback,
            Outcome::Error => &self.requests_error,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

struct Shared<P> {
    provider: Arc<P>,
    upstream: UpstreamClient,
    cache: ManifestCache,
    metrics: Arc<MirrorMetrics>,
}

/// The mirror's routes over `provider` (blobs) and `upstream` (manifests).
pub fn router<P: BlobProvider>(
    provider: Arc<P>,
    upstream: UpstreamClient,
    config: MirrorConfig,
    metrics: Arc<MirrorMetrics>,
) -> axum::Router {
    let shared = Arc::new(Shared { provider, upstream, cache: ManifestCache::new(config.manifest_cache_dir), metrics });
    // CRI-O, podman and skopeo name the registry in the path instead of `?ns=`.
    Route::accept_registry_in_path(axum::Router::new().fallback(handle::<P>).with_state(shared))
}

/// Connections the mirror serves at once; past it a new connection is closed at once
/// (containerd then falls back to the next host) and the refusal logged once per
/// source per minute.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client may take to send a request's line and headers (from the
/// connection's start, or from the end of its previous response): a client that
/// trickles its headers (slowloris) is cut off after this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes buffered per connection while reading a request (its line and headers):
/// a longer head is answered `431`/`414` and the connection closed. Request bodies
/// are never read (the mirror serves only GET and HEAD).
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// Serves `router` on `listener` until `cancel` fires; in-flight responses then get
/// [`SHUTDOWN_GRACE`] to finish. At most [`MAX_CONNECTIONS`] connections at once,
/// each bounded by [`HEADER_READ_TIMEOUT`] and [`MAX_REQUEST_HEAD`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    info!(%addr, "registry mirror listening");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut refusals = swarm_net::refusals::RefusalLog::default();
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, remote) = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    warn!(%addr, error = %e, "registry mirror: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let kind = swarm_net::refusals::Refusal::AtBound;
            if let swarm_net::refusals::Verdict::Log { suppressed, .. } =
                refusals.refused(remote.ip(), kind, Instant::now())
            {
                warn!(%remote, suppressed, "registry mirror: refusing {remote}: already {MAX_CONNECTIONS} connections (logged once a minute per source)");
            }
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        debug!(%remote, error = %e, "registry mirror: connection ended with an error");
                    }
                    return;
                }
                () = cancel.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait()).await.is_err() {
        warn!(%addr, "registry mirror: in-flight responses did not finish in time; dropping them");
    }
    Ok(())
}

async fn handle<P: BlobProvider>(
    State(shared): State<Arc<Shared<P>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let result = dispatch(&shared, &method, &uri, &headers).await;
    let (mut response, outcome) = match result {
        Ok(ok) => ok,
        Err(err) => {
            let outcome = err.outcome;
            match outcome {
                Outcome::Fallback | Outcome::Error => {
                    warn!(%method, %uri, status = err.status.as_u16(), code = err.code, message = %err.message, "mirror request failed")
                }
                _ => debug!(%method, %uri, status = err.status.as_u16(), code = err.code, "mirror request refused"),
            }
            let mut resp = err.into_response();
            if method == Method::HEAD {
                *resp.body_mut() = Body::empty();
            }
            (resp, outcome)
        }
    };
    shared.metrics.record(outcome);
    response.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
    debug!(%method, %uri, status = response.status().as_u16(), ?outcome, elapsed = ?started.elapsed(), "mirror request");
    response
}

async fn dispatch<P: BlobProvider>(
    shared: &Arc<Shared<P>>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(Response, Outcome), ApiError> {
    if method != Method::GET && method != Method::HEAD {
        return Err(ApiError::rejected(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "this mirror only serves pulls (GET and HEAD)",
        )
        .with_header(header::ALLOW, "GET, HEAD"));
    }
    let head = method == Method::HEAD;
    let route = api::parse_route(uri.path())?;
    match route {
        Route::Base => {
            let mut resp = if head { Response::new(Body::empty()) } else { Response::new(Body::from("{}")) };
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(2u32));
            Ok((resp, Outcome::Ok))
        }
        Route::Manifest { name, reference } => {
            let registry = api::parse_ns(uri.query())?;
            let accept = headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>();
            let accept = accept.join(", ");
            manifest(shared, head, &registry, &name, reference, &accept).await.map(|r| (r, Outcome::Ok))
        }
        Route::Blob { name, digest } => {
            let registry = api::parse_ns(uri.query())?;
            let req = BlobRequest { registry, repository: name, digest };
            blob(shared, head, req, headers).await.map(|r| (r, Outcome::Ok))
        }
    }
}

fn upstream_error(err: UpstreamError, what: &str) -> ApiError {
    match err {
        UpstreamError::NotFound { .. } => ApiError::new(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            format!("{what} not found upstream"),
            Outcome::NotFound,
        ),
        UpstreamError::BadRequest { reason } => ApiError::rejected(StatusCode::BAD_REQUEST, "NAME_INVALID", reason),
        other => ApiError::new(FALLBACK_STATUS, FALLBACK_CODE, format!("{what}: {other}"), Outcome::Fallback),
    }
}

fn manifest_response(head: bool, digest: &Digest, media_type: &str, bytes: Option<Bytes>, len: u64) -> Response {
    let mut resp = match (head, bytes) {
        (false, Some(bytes)) => Response::new(Body::from(bytes)),
        _ => Response::new(Body::empty()),
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(media_type).unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    insert_digest_headers(h, digest);
    resp
}

fn insert_digest_headers(h: &mut HeaderMap, digest: &Digest) {
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert("docker-content-digest", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(header::ETAG, v);
    }
}

async fn manifest<P: BlobProvider>(
    shared: &Arc<Shared<P>>,
    head: bool,
    registry: &str,
    name: &str,
    reference: Reference,
    accept: &str,
) -> Result<Response, ApiError> {
    let upstream = &shared.upstream;
    match reference {
        Reference::Tag(tag) if head => {
            // A HEAD costs nothing against registry pull quotas; the GET by digest
            // that follows is then usually a cache hit.
            let h = upstream
                .head_manifest(registry, name, &tag, accept)
                .await
                .map_err(|e| upstream_error(e, "manifest"))?;
            Ok(manifest_response(true, &h.digest, &h.media_type, None, h.length))
        }
        Reference::Tag(tag) => {
            let m = upstream.manifest(registry, name, &tag, accept).await.map_err(|e| upstream_error(e, "manifest"))?;
            store_manifest(shared, &m.digest, &m.media_type, &m.bytes).await;
            Ok(manifest_response(false, &m.digest, &m.media_type, Some(m.bytes.clone()), m.bytes.len() as u64))
        }
        Reference::Digest(digest) => {
            if let Some(c) = shared.cache.get(&digest).await {
                shared.metrics.manifest_cache_hits.fetch_add(1, Ordering::Relaxed);
                let len = c.bytes.len() as u64;
                return Ok(manifest_response(head, &digest, &c.media_type, Some(c.bytes), len));
            }
            let reference = digest.to_string();
            let m = upstream
                .manifest(registry, name, &reference, accept)
                .await
                .map_err(|e| upstream_error(e, "manifest"))?;
            store_manifest(shared, &m.digest, &m.media_type, &m.bytes).await;
            let len = m.bytes.len() as u64;
            Ok(manifest_response(head, &m.digest, &m.media_type, Some(m.bytes), len))
        }
    }
}

async fn store_manifest<P>(shared: &Arc<Shared<P>>, digest: &Digest, media_type: &str, bytes: &[u8]) {
    if let Err(e) = shared.cache.put(digest, media_type, bytes).await {
        warn!(%digest, error = %e, dir = %shared.cache.dir().display(), "could not cache manifest");
    }
}

fn provider_failure(err: ProviderError) -> ApiError {
    match err {
        ProviderError::NotFound => {
            ApiError::new(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "blob unknown to registry", Outcome::NotFound)
        }
        ProviderError::Unavailable(why) => ApiError::new(FALLBACK_STATUS, FALLBACK_CODE, why, Outcome::Fallback),
        ProviderError::Other(why) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", why, Outcome::Error),
    }
}

async fn blob<P: BlobProvider>(
    shared: &Arc<Shared<P>>,
    head: bool,
    req: BlobRequest,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let provider = &shared.provider;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(api::parse_range);
    if head {
        let length = provider.blob_length(&req).await.map_err(provider_failure)?;
        return Ok(blob_response(&req.digest, StatusCode::OK, length, None, Body::empty()));
    }
    let Some(spec) = range else {
        let body = provider.open_blob(&req, 0).await.map_err(provider_failure)?;
        let length = body.length;
        let stream = serve_stream(body.stream, length, shared.metrics.clone(), req.clone(), started);
        return Ok(blob_response(&req.digest, StatusCode::OK, length, None, Body::from_stream(stream)));
    };
    let total = provider.blob_length(&req).await.map_err(provider_failure)?;
    let Some((start, end)) = api::resolve_range(spec, total) else {
        return Err(ApiError::rejected(StatusCode::RANGE_NOT_SATISFIABLE, "RANGE_INVALID", "range not satisfiable")
            .with_header(header::CONTENT_RANGE, format!("bytes */{total}")));
    };
    let body = provider.open_blob(&req, start).await.map_err(provider_failure)?;
    if body.length != total {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "UNKNOWN",
            format!("blob length changed from {total} to {}", body.length),
            Outcome::Error,
        ));
    }
    let len = end - start + 1;
    let stream = serve_stream(body.stream, len, shared.metrics.clone(), req.clone(), started);
    let content_range = format!("bytes {start}-{end}/{total}");
    Ok(blob_response(&req.digest, StatusCode::PARTIAL_CONTENT, len, Some(content_range), Body::from_stream(stream)))
}

fn blob_response(digest: &Digest, status: StatusCode, len: u64, content_range: Option<String>, body: Body) -> Response {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    insert_digest_headers(h, digest);
    if let Some(cr) = content_range.and_then(|cr| HeaderValue::from_str(&cr).ok()) {
        h.insert(header::CONTENT_RANGE, cr);
    }
    resp
}

/// Hands exactly `len` bytes of `inner` to hyper, counting them. If `inner` fails or
/// ends early the item is an error, which makes hyper abort the response (the client
/// sees fewer than `Content-Length` bytes and a closed connection). A response sent
/// in full is timed from `started` into the delivery histogram.
fn serve_stream(
    inner: BoxStream<'static, Result<Bytes, std::io::Error>>,
    len: u64,
    metrics: Arc<MirrorMetrics>,
    req: BlobRequest,
    started: Instant,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    struct St {
        inner: BoxStream<'static, Result<Bytes, std::io::Error>>,
        remaining: u64,
        metrics: Arc<MirrorMetrics>,
        req: BlobRequest,
        done: bool,
    }
    let abort = |st: &mut St, err: std::io::Error| {
        st.done = true;
        st.metrics.streams_aborted.fetch_add(1, Ordering::Relaxed);
        warn!(registry = %st.req.registry, repository = %st.req.repository, digest = %st.req.digest,
              remaining = st.remaining, error = %err, "aborting blob response");
        err
    };
    if len == 0 {
        metrics.observe_delivery(&req.registry, started.elapsed());
    }
    stream::unfold(St { inner, remaining: len, metrics, req, done: len == 0 }, move |mut st| async move {
        if st.done {
            return None;
        }
        match st.inner.next().await {
            Some(Ok(mut chunk)) => {
                if chunk.len() as u64 > st.remaining {
                    chunk.truncate(st.remaining as usize);
                }
                st.remaining -= chunk.len() as u64;
                st.metrics.bytes_served.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                if st.remaining == 0 {
                    st.done = true;
                    st.metrics.observe_delivery(&st.req.registry, started.elapsed());
                }
                Some((Ok(chunk), st))
            }
            Some(Err(err)) => {
                let err = abort(&mut st, err);
                Some((Err(err), st))
            }
            None => {
                let err = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "blob stream ended early");
                let err = abort(&mut st, err);
                Some((Err(err), st))
            }
        }
    })
}

#[cfg(test)]
mod tests;
