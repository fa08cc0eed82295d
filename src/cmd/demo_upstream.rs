//! The demo's stand-in for a remote registry: an in-memory image (a manifest, a
//! config and generated layers) served over the read side of the OCI distribution
//! API on loopback, with its upload rate capped like a WAN link and every byte it
//! sends counted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream;
use rand::{RngCore, SeedableRng};
use swarm_proto::Digest;
use tokio_util::sync::CancellationToken;

/// An image held in memory.
pub struct Image {
    pub name: String,
    pub tag: String,
    pub manifest: Bytes,
    pub manifest_digest: Digest,
    /// Config first, then layers.
    pub blobs: Vec<(Digest, Bytes)>,
}

impl Image {
    /// An image whose layers are `layers` bytes of random data each.
    pub fn generate(name: &str, tag: &str, layers: &[u64]) -> Self {
        let mut rng = rand::rngs::StdRng::from_entropy();
        let config =
            Bytes::from_static(br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#);
        let mut blobs = vec![(Digest::of(&config), config)];
        for &len in layers {
            let mut data = vec![0u8; len as usize];
            rng.fill_bytes(&mut data);
            let data = Bytes::from(data);
            blobs.push((Digest::of(&data), data));
        }
        let descriptor = |media: &str, (d, b): &(Digest, Bytes)| serde_json::json!({ "mediaType": media, "digest": d.to_string(), "size": b.len() });
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor("application/vnd.oci.image.config.v1+json", &blobs[0]),
            "layers": blobs[1..].iter().map(|b| descriptor("application/vnd.oci.image.layer.v1.tar+gzip", b)).collect::<Vec<_>>(),
        });
        let manifest = Bytes::from(manifest.to_string());
        Self { name: name.into(), tag: tag.into(), manifest_digest: Digest::of(&manifest), manifest, blobs }
    }

    /// Bytes a pull fetches through the blob endpoint.
    pub fn blob_bytes(&self) -> u64 {
        self.blobs.iter().map(|(_, b)| b.len() as u64).sum()
    }
}

struct Shared {
    image: Arc<Image>,
    blobs: HashMap<Digest, Bytes>,
    rate: Option<u64>,
    sent: Arc<AtomicU64>,
}

/// A running in-memory registry.
pub struct Upstream {
    pub addr: SocketAddr,
    pub sent: Arc<AtomicU64>,
}

/// Serves `image` on 127.0.0.1 until `cancel` fires, sending blobs at most at `rate`
/// bytes per second in total (None: unlimited).
pub async fn start(image: Arc<Image>, rate: Option<u64>, cancel: CancellationToken) -> Result<Upstream> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the demo registry")?;
    let addr = listener.local_addr()?;
    let sent = Arc::new(AtomicU64::new(0));
    let shared = Arc::new(Shared { blobs: image.blobs.iter().cloned().collect(), image, rate, sent: sent.clone() });
    let pacer = Arc::new(tokio::sync::Mutex::new(tokio::time::Instant::now()));
    let router = axum::Router::new()
        .route("/v2/", axum::routing::get(|| async { StatusCode::OK }))
        .route("/v2/{name}/{repo}/manifests/{reference}", axum::routing::get(manifest).head(manifest))
        .route(
            "/v2/{name}/{repo}/blobs/{digest}",
            axum::routing::get(move |s, p, h| blob(s, p, h, pacer.clone())).head(blob_head),
        )
        .with_state(shared);
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).with_graceful_shutdown(cancel.cancelled_owned()).await;
    });
    Ok(Upstream { addr, sent })
}

async fn manifest(
    State(s): State<Arc<Shared>>,
    Path((name, repo, reference)): Path<(String, String, String)>,
) -> Response {
    let img = &s.image;
    if format!("{name}/{repo}") != img.name || (reference != img.tag && reference != img.manifest_digest.to_string()) {
        return StatusCode::NOT_FOUND.into_response();
    }
    (
        [
            (header::CONTENT_TYPE, "application/vnd.oci.image.manifest.v1+json".to_string()),
            (header::HeaderName::from_static("docker-content-digest"), img.manifest_digest.to_string()),
        ],
        img.manifest.clone(),
    )
        .into_response()
}

fn find(s: &Shared, digest: &str) -> Option<Bytes> {
    s.blobs.get(&digest.parse().ok()?).cloned()
}

async fn blob_head(State(s): State<Arc<Shared>>, Path((_, _, digest)): Path<(String, String, String)>) -> Response {
    match find(&s, &digest) {
        Some(b) => ([(header::CONTENT_LENGTH, b.len().to_string())], ()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn blob(
    State(s): State<Arc<Shared>>,
    Path((_, _, digest)): Path<(String, String, String)>,
    headers: HeaderMap,
    pacer: Arc<tokio::sync::Mutex<tokio::time::Instant>>,
) -> Response {
    let Some(data) = find(&s, &digest) else { return StatusCode::NOT_FOUND.into_response() };
    let total = data.len();
    let start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split('-').next())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0)
        .min(total);
    let body = data.slice(start..);
    let (rate, sent) = (s.rate, s.sent.clone());
    let chunks = stream::unfold(body, move |mut rest| {
        let (pacer, sent) = (pacer.clone(), sent.clone());
        async move {
            if rest.is_empty() {
                return None;
            }
            let chunk = rest.split_to(rest.len().min(64 * 1024));
            if let Some(rate) = rate {
                // One send schedule for the whole registry: the uplink is shared.
                let cost = Duration::from_secs_f64(chunk.len() as f64 / rate as f64);
                let at = {
                    let mut next = pacer.lock().await;
                    let at = (*next).max(tokio::time::Instant::now());
                    *next = at + cost;
                    at
                };
                tokio::time::sleep_until(at).await;
            }
            sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            Some((Ok::<_, std::io::Error>(chunk), rest))
        }
    });
    let status = if start > 0 { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    let mut response = Response::new(Body::from_stream(chunks));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_LENGTH, (total - start).into());
    if start > 0
        && let Ok(v) = format!("bytes {start}-{}/{total}", total - 1).parse()
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    response
}
