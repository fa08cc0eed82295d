//! The swarm registry mirror, in-process on 127.0.0.1, stopped on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use swarm_peer::mirror::{self, BlobProvider, MirrorConfig, MirrorMetrics, MirrorMetricsSnapshot, UpstreamOnly};
use swarm_peer::upstream::{RegistryConfig, UpstreamClient, UpstreamConfig};
use tokio_util::sync::CancellationToken;

/// A running mirror. Must be created inside a tokio runtime, which keeps serving it.
pub struct Mirror {
    addr: SocketAddr,
    metrics: Arc<MirrorMetrics>,
    cache_dir: PathBuf,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Mirror {
    /// Serves `provider` (blobs) and `upstream` (manifests), caching manifests in
    /// `cache_dir`.
    pub async fn start<P: BlobProvider>(
        provider: Arc<P>,
        upstream: UpstreamClient,
        cache_dir: &Path,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the mirror")?;
        let addr = listener.local_addr()?;
        let metrics = Arc::new(MirrorMetrics::default());
        let router = mirror::router(provider, upstream, MirrorConfig::new(cache_dir), metrics.clone());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(mirror::serve(listener, router, cancel.clone()));
        Ok(Self { addr, metrics, cache_dir: cache_dir.to_path_buf(), cancel, task })
    }

    /// A mirror whose blobs come straight from upstream ([`UpstreamOnly`]).
    pub async fn upstream_only(config: UpstreamConfig, cache_dir: &Path) -> anyhow::Result<Self> {
        let upstream = UpstreamClient::new(config)?;
        Self::start(Arc::new(UpstreamOnly::new(upstream.clone())), upstream, cache_dir).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for `hosts.toml`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn metrics(&self) -> MirrorMetricsSnapshot {
        self.metrics.snapshot()
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.task.abort();
    }
}

/// An upstream config reaching each of `registries` (`127.0.0.1:PORT`) over plain http.
pub fn plain_http_upstream(registries: &[&str]) -> UpstreamConfig {
    UpstreamConfig { plain_http: registries.iter().map(|r| r.to_string()).collect(), ..UpstreamConfig::default() }
}

/// An upstream config that sends requests for `registry` to `endpoint` instead.
pub fn redirected_upstream(registry: &str, endpoint: &str) -> UpstreamConfig {
    let mut config = UpstreamConfig::default();
    config.registries.insert(
        registry.to_string(),
        RegistryConfig { endpoint: Some(endpoint.to_string()), ..RegistryConfig::default() },
    );
    config
}
