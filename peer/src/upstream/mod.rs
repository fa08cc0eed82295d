//! The OCI registry client the agent uses to reach upstream registries.
//!
//! This module owns everything between the agent and a remote registry: mapping a
//! registry name as containerd spells it in `?ns=` (`docker.io`, `ghcr.io`,
//! `127.0.0.1:5000`) to an endpoint, authentication (the docker token flow with a
//! per-`(registry, scope)` token cache, or HTTP basic), manifests (verified against
//! their digest), blob lengths and blob byte streams (HTTP ranges, redirects to blob
//! storage), and the timeouts that keep a dead registry from hanging a pull.
//!
//! - Endpoints: `docker.io` maps to `https://registry-1.docker.io`; any other registry
//!   `R` to `https://R`, or `http://R` when listed in [`UpstreamConfig::plain_http`] or
//!   configured with [`RegistryConfig::plain_http`]; [`RegistryConfig::endpoint`]
//!   overrides both.
//! - Auth: requests go out with whatever the registry asked for last time (cached
//!   token, or basic credentials). On `401` the `WWW-Authenticate` challenge is parsed;
//!   for `Bearer` a token is fetched from the realm (anonymously, with the configured
//!   basic credentials, or, given an [`RegistryConfig::identity_token`], with the
//!   OAuth2 refresh-token grant) and cached until shortly before `expires_in`; for
//!   `Basic` the configured credentials are used. The request is retried once; a
//!   second refusal is [`UpstreamError::Unauthorized`]. A configured registry token
//!   ([`RegistryConfig::token`]) is sent as a bearer token with every request.
//!   Credentials are never sent to a plain-http token realm of an https registry.
//! - TLS: a registry with a `ca_file`, a client certificate or `insecure_skip_verify`
//!   gets a client of its own (used for its token realm too); the others share one
//!   with the system roots.
//! - [`k3s`] turns k3s's `registries.yaml` into [`RegistryConfig`]s.
//! - Redirects (blob storage, CDNs) are followed up to [`MAX_REDIRECTS`] hops. reqwest
//!   drops `Authorization` (and cookies) whenever a hop changes host or port, so the
//!   registry's token never reaches the storage host; we also refuse https→http
//!   downgrades and send no `Referer`.
//! - Timeouts: a connect timeout and a *read* timeout (no byte for that long fails
//!   the request or ends the current blob response), never a total timeout on blobs,
//!   which may be gigabytes. Small requests (manifests, HEADs, tokens) also get a
//!   total timeout.
//! - Blob streams resume: a body that breaks midway is asked for again from the
//!   byte reached, with backoff, until [`resume::RESUME_GIVE_UP`] passes without a
//!   byte; a definite refusal fails at once (see [`resume`]).
//! - Rates: every byte of a blob stream passes through the agent's download limiter
//!   ([`UpstreamClient::limit_downloads`], `--download-rate`) and through any limiter
//!   the caller adds ([`UpstreamClient::blob_limited`]: a lease holder's share of the
//!   cluster's uplink cap). While a limiter has a rate, the blob is asked for in
//!   ranges of [`resume::SEGMENT_TIME`] worth of that rate, each paid to the limiters
//!   before it is sent, so that the rate holds on the wire (what TCP and the kernel
//!   buffer ahead of this process is at most the range in flight), not only in this
//!   process. Manifests and tokens (a few KB) are not limited.

mod auth;
pub mod k3s;
pub mod names;
pub mod resume;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::stream::{BoxStream, StreamExt, TryStreamExt};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use swarm_proto::Digest;
use tracing::{debug, warn};

use crate::rate::Limiter;

use auth::{AuthCache, TokenResponse};
pub use auth::{Challenge, parse_challenge};
pub use resume::{RESUME_GIVE_UP, ResumePolicy};

/// Most redirect hops followed for one request.
pub const MAX_REDIRECTS: usize = 10;
/// Largest manifest accepted (the limit distribution itself applies).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// Largest token response accepted.
const MAX_TOKEN_RESPONSE_BYTES: usize = 1024 * 1024;
/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default read timeout: a response that delivers nothing for this long is failed (a
/// blob stream then reconnects, see [`resume`]).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default total timeout for small requests (manifests, HEADs, tokens).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The manifest media types asked for when the caller gives no `Accept`.
pub const DEFAULT_MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// How to reach one registry: where, with which credentials, and how to check its TLS
/// certificate. The fields mirror k3s's `registries.yaml` (see [`k3s`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL, e.g. `https://registry-1.docker.io` or `http://127.0.0.1:5000`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Basic credentials (sent as basic auth, or to the token realm).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// An OAuth2 refresh token, exchanged at the token realm for access tokens
    /// (docker's `identitytoken`, k3s's `identity_token`).
    #[serde(default)]
    pub identity_token: Option<String>,
    /// A bearer token sent as is with every request (k3s's `token`).
    #[serde(default)]
    pub token: Option<String>,
    /// Use `http://` instead of `https://` (ignored when `endpoint` is set).
    #[serde(default)]
    pub plain_http: bool,
    /// PEM file of CA certificates trusted for this registry, besides the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate presented to the registry (with `key_file`).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Accept any certificate from this registry. Only for tests and labs.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

impl RegistryConfig {
    /// Whether requests to this registry need a client of their own (TLS settings).
    fn has_tls_settings(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some() || self.insecure_skip_verify
    }
}

/// Upstream registries the agent may talk to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Per-registry settings, keyed by the registry host as containerd names it in
    /// `?ns=` (e.g. `docker.io`, `127.0.0.1:5000`).
    #[serde(default)]
    pub registries: BTreeMap<String, RegistryConfig>,
    /// Registries reached over plain http.
    #[serde(default)]
    pub plain_http: Vec<String>,
    /// Connect timeout, e.g. `10s`.
    #[serde(default = "default_connect_timeout", deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Read timeout: a response idle for this long fails (a blob stream then resumes
    /// with a range request), e.g. `30s`.
    #[serde(default = "default_read_timeout", deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub read_timeout: Duration,
    /// Total timeout for manifests, HEADs and token requests, e.g. `60s`.
    #[serde(default = "default_request_timeout", deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub request_timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            registries: BTreeMap::new(),
            plain_http: Vec::new(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}
fn default_read_timeout() -> Duration {
    DEFAULT_READ_TIMEOUT
}
fn default_request_timeout() -> Duration {
    DEFAULT_REQUEST_TIMEOUT
}

/// Deserializes a human duration (`30s`, `2m`, `1h 5m`).
fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = <String as serde::Deserialize>::deserialize(d)?;
    humantime::parse_duration(&text).map_err(serde::de::Error::custom)
}

/// Serializes a duration the way [`de_duration`] reads it.
fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// Errors talking to an upstream registry.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The registry says the manifest, blob or repository does not exist.
    #[error("not found upstream: {url}")]
    NotFound { url: String },
    /// The registry refused our credentials, or wants credentials we do not have.
    #[error("registry {registry} refused the request: credentials refused or missing")]
    Unauthorized { registry: String },
    /// No answer from the registry (connect failure, timeout, TLS, DNS).
    #[error("registry {registry} unreachable: {source}")]
    Unreachable {
        registry: String,
        #[source]
        source: reqwest::Error,
    },
    /// Any other unexpected HTTP status (with the registry's `Retry-After`, in
    /// seconds, if it sent one).
    #[error("unexpected status {status} from {url}")]
    Status { status: u16, url: String, retry_after: Option<Duration> },
    /// The registry answered something we cannot use (bad digest header, digest
    /// mismatch, oversized manifest, bad Content-Range, ...).
    #[error("invalid response from {url}: {reason}")]
    Invalid { url: String, reason: String },
    /// The response body failed midway (reset, read timeout).
    #[error("reading the body of {url}: {source}")]
    Body {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The request itself is not acceptable (bad repository name, tag, registry).
    #[error("invalid request: {reason}")]
    BadRequest { reason: String },
    /// The configuration is unusable.
    #[error("invalid upstream configuration: {reason}")]
    Config { reason: String },
    /// A blob stream kept failing and received nothing for too long
    /// ([`resume::RESUME_GIVE_UP`]).
    #[error(
        "upstream blob {digest}: gave up at byte {offset} after {attempts} attempts and {waited:?} without a byte; last: {last}"
    )]
    GaveUp { digest: Digest, offset: u64, attempts: u32, waited: Duration, last: String },
}

impl UpstreamError {
    /// Whether the registry said the thing does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }

    /// Whether asking again later may succeed: no connection or answer, a body
    /// broken midway, or a 408, 429 or 5xx. A refusal (401/403/404), any other 4xx,
    /// an unusable answer or a bad request or configuration is final.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Body { .. } => true,
            Self::Status { status, .. } => *status == 408 || *status == 429 || (500..600).contains(status),
            Self::NotFound { .. }
            | Self::Unauthorized { .. }
            | Self::Invalid { .. }
            | Self::BadRequest { .. }
            | Self::Config { .. }
            | Self::GaveUp { .. } => false,
        }
    }

    /// The registry's `Retry-After` on a refused request, if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A manifest as the registry served it.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
}

/// What a `HEAD` on a manifest tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestHead {
    pub digest: Digest,
    pub media_type: String,
    pub length: u64,
}

/// A blob download in progress.
pub struct UpstreamBlob {
    /// The whole blob's length.
    pub total_length: u64,
    /// The bytes from the requested offset to the end.
    pub stream: BoxStream<'static, Result<Bytes, UpstreamError>>,
}

impl UpstreamBlob {
    /// The next chunk of the stream, `None` at its end.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, UpstreamError>> {
        self.stream.next().await
    }
}

impl std::fmt::Debug for UpstreamBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBlob").field("total_length", &self.total_length).finish_non_exhaustive()
    }
}

/// The upstream registry client. Cheap to clone: state is shared.
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Arc<Inner>,
}

struct Inner {
    /// The client for registries without TLS settings of their own.
    http: reqwest::Client,
    /// Clients for registries with a CA, a client certificate or no verification.
    tls_clients: HashMap<String, reqwest::Client>,
    config: UpstreamConfig,
    /// How blob streams retry and when they give up.
    resume: ResumePolicy,
    /// Never held across an `.await`.
    auth: Mutex<AuthCache>,
    /// The agent-wide download limiter every blob stream's bytes pass through.
    download: std::sync::OnceLock<Limiter>,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient").field("registries", &self.inner.config.registries.keys()).finish()
    }
}

/// The endpoint, client and credentials for one request.
struct Target {
    registry: String,
    base: Url,
    http: reqwest::Client,
    credentials: Option<(String, String)>,
    identity_token: Option<String>,
    token: Option<String>,
}

impl UpstreamClient {
    /// A client for the registries in `config`, its blob streams resuming with the
    /// default [`ResumePolicy`]. Fails if an endpoint override is not an http(s) URL.
    pub fn new(config: UpstreamConfig) -> Result<Self, UpstreamError> {
        Self::with_resume(config, ResumePolicy::default())
    }

    /// Makes every blob stream of this client (and of its clones) pass its bytes
    /// through `limiter` (the agent's `--download-rate`). Set once, before use; a
    /// second call is ignored.
    pub fn limit_downloads(&self, limiter: Limiter) {
        let _ = self.inner.download.set(limiter);
    }

    /// Like [`UpstreamClient::new`], with blob streams retrying as `resume` says.
    pub fn with_resume(config: UpstreamConfig, resume: ResumePolicy) -> Result<Self, UpstreamError> {
        for (registry, rc) in &config.registries {
            if let Some(endpoint) = &rc.endpoint {
                let url = Url::parse(endpoint).map_err(|e| UpstreamError::Config {
                    reason: format!("registry {registry}: endpoint {endpoint:?}: {e}"),
                })?;
                if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                    return Err(UpstreamError::Config {
                        reason: format!("registry {registry}: endpoint {endpoint:?} is not an http(s) URL"),
                    });
                }
            }
            if rc.username.is_some() != rc.password.is_some() {
                return Err(UpstreamError::Config {
                    reason: format!("registry {registry}: username and password must be given together"),
                });
            }
        }
        let http = build_client(&config, None)?;
        let mut tls_clients = HashMap::new();
        for (registry, rc) in config.registries.iter().filter(|(_, rc)| rc.has_tls_settings()) {
            tls_clients.insert(registry.clone(), build_client(&config, Some((registry, rc)))?);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                tls_clients,
                config,
                resume,
                auth: Mutex::new(AuthCache::default()),
                download: std::sync::OnceLock::new(),
            }),
        })
    }

    /// The base URL requests for `registry` go to.
    pub fn endpoint(&self, registry: &str) -> Result<Url, UpstreamError> {
        Ok(self.target(registry)?.base)
    }

    fn target(&self, registry: &str) -> Result<Target, UpstreamError> {
        if !names::is_valid_registry(registry) {
            return Err(UpstreamError::BadRequest { reason: format!("invalid registry {registry:?}") });
        }
        let config = &self.inner.config;
        let rc = config.registries.get(registry);
        let endpoint = match rc.and_then(|rc| rc.endpoint.clone()) {
            Some(endpoint) => endpoint,
            None => {
                let plain = rc.is_some_and(|rc| rc.plain_http) || config.plain_http.iter().any(|r| r == registry);
                let scheme = if plain { "http" } else { "https" };
                let host = if registry == "docker.io" { "registry-1.docker.io" } else { registry };
                format!("{scheme}://{host}")
            }
        };
        let base = Url::parse(endpoint.trim_end_matches('/')).map_err(|e| UpstreamError::Config {
            reason: format!("registry {registry}: endpoint {endpoint:?}: {e}"),
        })?;
        let credentials = rc.and_then(|rc| Some((rc.username.clone()?, rc.password.clone()?)));
        let http = self.inner.tls_clients.get(registry).unwrap_or(&self.inner.http).clone();
        Ok(Target {
            registry: registry.to_string(),
            base,
            http,
            credentials,
            identity_token: rc.and_then(|rc| rc.identity_token.clone()),
            token: rc.and_then(|rc| rc.token.clone()),
        })
    }

    fn url(target: &Target, repository: &str, kind: &str, reference: &str) -> Result<Url, UpstreamError> {
        if !names::is_valid_repository(repository) {
            return Err(UpstreamError::BadRequest { reason: format!("invalid repository {repository:?}") });
        }
        if !names::is_valid_tag(reference) && reference.parse::<Digest>().is_err() {
            return Err(UpstreamError::BadRequest { reason: format!("invalid reference {reference:?}") });
        }
        let base = target.base.as_str().trim_end_matches('/');
        let text = format!("{base}/v2/{repository}/{kind}/{reference}");
        Url::parse(&text).map_err(|e| UpstreamError::BadRequest { reason: format!("bad URL {text:?}: {e}") })
    }

    /// Fetches a manifest by tag or digest. A digest reference's bytes are checked
    /// against the digest; a tag's digest is the sha256 of the bytes, which must agree
    /// with `Docker-Content-Digest` when the registry sends one.
    pub async fn manifest(
        &self,
        registry: &str,
        repository: &str,
        reference: &str,
        accept: &str,
    ) -> Result<Manifest, UpstreamError> {
        let target = self.target(registry)?;
        let url = Self::url(&target, repository, "manifests", reference)?;
        let resp = self.send(&target, repository, Method::GET, url.clone(), accept_headers(accept)?, true).await?;
        let header_digest = content_digest(resp.headers(), &url)?;
        let media_type = media_type(resp.headers());
        if let Some(len) = header_u64(resp.headers(), header::CONTENT_LENGTH).filter(|&l| l > MAX_MANIFEST_BYTES as u64)
        {
            return Err(invalid(&url, format!("manifest of {len} bytes exceeds {MAX_MANIFEST_BYTES}")));
        }
        let bytes = read_limited(resp, &url, MAX_MANIFEST_BYTES).await?;
        let digest = Digest::of(&bytes);
        if reference.parse::<Digest>().is_ok_and(|expected| expected != digest) {
            return Err(invalid(&url, format!("manifest bytes hash to {digest}, not the requested digest")));
        }
        if let Some(header_digest) = header_digest.filter(|&h| h != digest) {
            return Err(invalid(&url, format!("Docker-Content-Digest {header_digest} but the bytes hash to {digest}")));
        }
        debug!(registry, repository, reference, %digest, len = bytes.len(), "fetched manifest");
        Ok(Manifest { bytes, media_type, digest })
    }

    /// `HEAD` on a manifest: its digest, media type and length. When the registry
    /// sends no `Docker-Content-Digest` for a tag, falls back to a `GET`.
    pub async fn head_manifest(
        &self,
        registry: &str,
        repository: &str,
        reference: &str,
        accept: &str,
    ) -> Result<ManifestHead, UpstreamError> {
        let target = self.target(registry)?;
        let url = Self::url(&target, repository, "manifests", reference)?;
        let resp = self.send(&target, repository, Method::HEAD, url.clone(), accept_headers(accept)?, true).await?;
        let media_type = media_type(resp.headers());
        let length = header_u64(resp.headers(), header::CONTENT_LENGTH);
        let header_digest = content_digest(resp.headers(), &url)?;
        let by_digest = reference.parse::<Digest>().ok();
        if let (Some(requested), Some(header_digest)) = (by_digest, header_digest)
            && requested != header_digest
        {
            return Err(invalid(&url, format!("Docker-Content-Digest {header_digest} for a request of {requested}")));
        }
        match (header_digest.or(by_digest), length) {
            (Some(digest), Some(length)) => Ok(ManifestHead { digest, media_type, length }),
            _ => {
                debug!(registry, repository, reference, "HEAD lacks digest or length; fetching the manifest");
                let m = self.manifest(registry, repository, reference, accept).await?;
                Ok(ManifestHead { digest: m.digest, media_type: m.media_type, length: m.bytes.len() as u64 })
            }
        }
    }

    /// The length of a blob, from a `HEAD`.
    pub async fn blob_length(&self, registry: &str, repository: &str, digest: &Digest) -> Result<u64, UpstreamError> {
        let target = self.target(registry)?;
        let url = Self::url(&target, repository, "blobs", &digest.to_string())?;
        let resp = self.send(&target, repository, Method::HEAD, url.clone(), HeaderMap::new(), true).await?;
        header_u64(resp.headers(), header::CONTENT_LENGTH)
            .ok_or_else(|| invalid(&url, "HEAD of a blob without Content-Length".to_string()))
    }

    /// `GET` of a blob from `offset`: an HTTP range request when `offset > 0`
    /// (answered with 206, or with 200 and then the first `offset` bytes are skipped
    /// here). Returns the blob's total length and the bytes from `offset` on.
    ///
    /// This first request is made once: its failure is returned as is. The stream
    /// then resumes on its own when the connection breaks, stalls for longer than the
    /// read timeout or ends early (see [`resume`]), and fails only on a definite
    /// refusal or after [`ResumePolicy::give_up`] without a byte. It is not verified
    /// against the digest (the caller decides how).
    pub async fn blob(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<UpstreamBlob, UpstreamError> {
        self.blob_limited(registry, repository, digest, offset, Vec::new()).await
    }

    /// Like [`UpstreamClient::blob`], every byte also passing through `limits` (and
    /// asked for in ranges while one of them has a rate; see the module docs).
    pub async fn blob_limited(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        offset: u64,
        limits: Vec<Limiter>,
    ) -> Result<UpstreamBlob, UpstreamError> {
        let limits: Vec<Limiter> = self.inner.download.get().cloned().into_iter().chain(limits).collect();
        let first = resume::open_paid(self, registry, repository, digest, offset, &limits).await?;
        Ok(resume::resuming(self.clone(), registry, repository, *digest, offset, first, limits))
    }

    /// One `GET` of a blob from `offset`: the total length from `Content-Range` (206)
    /// or `Content-Length` (200, then `offset` bytes are to be skipped), and the raw
    /// body. A 416 is fine exactly at the end of the blob (an empty body).
    async fn open_range(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        offset: u64,
        segment: Option<u64>,
    ) -> Result<resume::Opened, UpstreamError> {
        let target = self.target(registry)?;
        let url = Self::url(&target, repository, "blobs", &digest.to_string())?;
        let mut headers = HeaderMap::new();
        let range = match segment {
            Some(len) => Some(format!("bytes={offset}-{}", offset + len.max(1) - 1)),
            None if offset > 0 => Some(format!("bytes={offset}-")),
            None => None,
        };
        if let Some(range) = range {
            let range = HeaderValue::from_str(&range)
                .map_err(|e| UpstreamError::BadRequest { reason: format!("range header: {e}") })?;
            headers.insert(header::RANGE, range);
        }
        let resp = match self.send(&target, repository, Method::GET, url.clone(), headers, false).await {
            Err(UpstreamError::Status { status: 416, .. }) => {
                // Nothing left from `offset`: fine exactly at the end of the blob.
                let total = self.blob_length(registry, repository, digest).await?;
                if total == offset {
                    let stream = futures_util::stream::empty().boxed();
                    return Ok(resume::Opened { total, skip: 0, end: None, tickets: Vec::new(), stream });
                }
                return Err(invalid(&url, format!("range from {offset} refused for a blob of {total} bytes")));
            }
            other => other?,
        };
        let status = resp.status();
        let content_length = header_u64(resp.headers(), header::CONTENT_LENGTH);
        let (total, skip, end) = if status == StatusCode::PARTIAL_CONTENT {
            let range = resp
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| invalid(&url, "206 without Content-Range".to_string()))?;
            let (start, last, total) =
                parse_content_range(range).ok_or_else(|| invalid(&url, format!("bad Content-Range {range:?}")))?;
            if start != offset {
                return Err(invalid(&url, format!("asked for bytes from {offset}, got Content-Range {range:?}")));
            }
            // A range that stops before the blob's end: the stream asks for the next.
            (total, 0, (last + 1 < total).then_some(last + 1))
        } else {
            let total =
                content_length.ok_or_else(|| invalid(&url, "blob response without Content-Length".to_string()))?;
            if offset > total {
                return Err(invalid(&url, format!("offset {offset} is past the end of a {total}-byte blob")));
            }
            (total, offset, None)
        };
        debug!(registry, repository, %digest, offset, total, status = status.as_u16(), "blob response opened");
        let body_url = url.to_string();
        let stream = resp.bytes_stream().map_err(move |source| UpstreamError::Body { url: body_url.clone(), source });
        Ok(resume::Opened { total, skip, end, tickets: Vec::new(), stream: stream.boxed() })
    }

    /// Sends a request, handling the auth challenge (one retry) and mapping statuses.
    /// Returns only successful (2xx) responses.
    async fn send(
        &self,
        target: &Target,
        repository: &str,
        method: Method,
        url: Url,
        headers: HeaderMap,
        small: bool,
    ) -> Result<reqwest::Response, UpstreamError> {
        let scope = format!("repository:{repository}:pull");
        let mut authorization = self.authorization(target, &scope, None).await?;
        for attempt in 0..2 {
            let mut req = target.http.request(method.clone(), url.clone()).headers(headers.clone());
            if small {
                req = req.timeout(self.inner.config.request_timeout);
            }
            if let Some(value) = &authorization {
                req = req.header(header::AUTHORIZATION, value.clone());
            }
            let resp = req.send().await.map_err(|source| UpstreamError::Unreachable {
                registry: target.registry.clone(),
                source: source.without_url(),
            })?;
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            match status {
                StatusCode::UNAUTHORIZED if attempt == 0 => {
                    let challenge = resp
                        .headers()
                        .get_all(header::WWW_AUTHENTICATE)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .find_map(parse_challenge);
                    let Some(challenge) = challenge else {
                        warn!(registry = %target.registry, %url, "401 without a usable WWW-Authenticate challenge");
                        return Err(UpstreamError::Unauthorized { registry: target.registry.clone() });
                    };
                    debug!(registry = %target.registry, ?challenge, "authentication challenge");
                    if let Ok(mut cache) = self.inner.auth.lock() {
                        cache.set_challenge(&target.registry, challenge.clone());
                        cache.forget_token(&target.registry, &scope);
                    }
                    authorization = self.authorization(target, &scope, Some(challenge)).await?;
                    if authorization.is_none() {
                        return Err(UpstreamError::Unauthorized { registry: target.registry.clone() });
                    }
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    return Err(UpstreamError::Unauthorized { registry: target.registry.clone() });
                }
                StatusCode::NOT_FOUND => return Err(UpstreamError::NotFound { url: url.to_string() }),
                status => {
                    let retry_after = retry_after(resp.headers());
                    return Err(UpstreamError::Status { status: status.as_u16(), url: url.to_string(), retry_after });
                }
            }
        }
        Err(UpstreamError::Unauthorized { registry: target.registry.clone() })
    }

    /// The `Authorization` header for a request to `target` with `scope`, from the
    /// cache, or by answering `challenge` (or the last challenge the registry sent).
    async fn authorization(
        &self,
        target: &Target,
        scope: &str,
        challenge: Option<Challenge>,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        if let Some(token) = &target.token {
            // A registry token is sent as is, whatever the registry asked for.
            return Ok(Some(bearer_header(token)?));
        }
        let (challenge, cached) = {
            let cache =
                self.inner.auth.lock().map_err(|_| UpstreamError::Config { reason: "auth cache poisoned".into() })?;
            let challenge = challenge.or_else(|| cache.challenge(&target.registry));
            (challenge, cache.token(&target.registry, scope, Instant::now()))
        };
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => match &target.credentials {
                Some((user, pass)) => Ok(Some(basic_header(user, pass)?)),
                None => Ok(None),
            },
            Some(Challenge::Bearer { realm, service, scope: challenge_scope }) => {
                if let Some(token) = cached {
                    return Ok(Some(bearer_header(&token)?));
                }
                // Ask for the scope the registry named if it is about this repository;
                // our own pull scope otherwise (a stale challenge from another repo).
                let want = match challenge_scope {
                    Some(s) if s.split(' ').any(|one| one == scope) => s,
                    _ => scope.to_string(),
                };
                let token = self.fetch_token(target, &realm, service.as_deref(), &want).await?;
                Ok(Some(bearer_header(&token)?))
            }
        }
    }

    /// Gets a token from a realm and caches it under `(registry, scope)`.
    async fn fetch_token(
        &self,
        target: &Target,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String, UpstreamError> {
        let mut url = Url::parse(realm).map_err(|e| invalid_text(realm, format!("token realm is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid_text(realm, "token realm is not http(s)".to_string()));
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            for one in scope.split(' ').filter(|s| !s.is_empty()) {
                query.append_pair("scope", one);
            }
        }
        let has_secret = target.credentials.is_some() || target.identity_token.is_some();
        if has_secret && url.scheme() == "http" && target.base.scheme() == "https" {
            return Err(invalid_text(realm, "refusing to send credentials to a plain-http token realm".into()));
        }
        let mut req = match &target.identity_token {
            // The OAuth2 refresh-token grant (what docker and containerd do with an
            // identity token): a POST of the form to the realm.
            Some(refresh) => {
                let scopes = scope.split(' ').filter(|s| !s.is_empty()).collect::<Vec<_>>().join(" ");
                let mut form = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh.as_str()),
                    ("client_id", "swarm"),
                    ("scope", scopes.as_str()),
                ];
                if let Some(service) = service {
                    form.push(("service", service));
                }
                target.http.post(realm).form(&form)
            }
            None => target.http.get(url.clone()),
        };
        req = req.timeout(self.inner.config.request_timeout);
        if let (None, Some((user, pass))) = (&target.identity_token, &target.credentials) {
            req = req.basic_auth(user, Some(pass));
        }
        let resp = req.send().await.map_err(|source| UpstreamError::Unreachable {
            registry: target.registry.clone(),
            source: source.without_url(),
        })?;
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(UpstreamError::Unauthorized { registry: target.registry.clone() });
            }
            s => {
                let retry_after = retry_after(resp.headers());
                return Err(UpstreamError::Status { status: s.as_u16(), url: realm.to_string(), retry_after });
            }
        }
        let body = read_limited(resp, &url, MAX_TOKEN_RESPONSE_BYTES).await?;
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| invalid_text(realm, format!("token response: {e}")))?;
        let token = parsed.bearer().ok_or_else(|| invalid_text(realm, "token response has no token".into()))?;
        debug!(registry = %target.registry, scope, lifetime = ?parsed.lifetime(), "got registry token");
        if let Ok(mut cache) = self.inner.auth.lock() {
            cache.set_token(&target.registry, scope, token.to_string(), parsed.lifetime(), Instant::now());
            // Requests look tokens up by our own pull scope; make a broader grant
            // findable under it too.
            let pull_scope = format!("repository:{}:pull", scope_repository(scope).unwrap_or_default());
            if pull_scope != scope && scope.split(' ').any(|s| s == pull_scope) {
                cache.set_token(&target.registry, &pull_scope, token.to_string(), parsed.lifetime(), Instant::now());
            }
        }
        Ok(token.to_string())
    }
}

/// A reqwest client with the configured timeouts and redirect policy, and, for
/// `registry`, its CA, client certificate and verification setting.
fn build_client(
    config: &UpstreamConfig,
    registry: Option<(&str, &RegistryConfig)>,
) -> Result<reqwest::Client, UpstreamError> {
    let redirect = reqwest::redirect::Policy::custom(|attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error("too many redirects")
        } else if attempt.url().scheme() == "http"
            && attempt.previous().last().is_some_and(|prev| prev.scheme() == "https")
        {
            attempt.error("refusing a redirect from https to http")
        } else {
            attempt.follow()
        }
    });
    let mut builder = reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .read_timeout(config.read_timeout)
        .redirect(redirect)
        .referer(false)
        .user_agent(concat!("swarm/", env!("CARGO_PKG_VERSION")));
    if let Some((registry, rc)) = registry {
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|e| UpstreamError::Config {
                reason: format!("registry {registry}: cannot read {what} {}: {e}", path.display()),
            })
        };
        if let Some(ca) = &rc.ca_file {
            let pem = read("ca_file", ca)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| UpstreamError::Config {
                reason: format!("registry {registry}: ca_file {} is not PEM certificates: {e}", ca.display()),
            })?;
            if certs.is_empty() {
                return Err(UpstreamError::Config {
                    reason: format!("registry {registry}: ca_file {} holds no certificate", ca.display()),
                });
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        match (&rc.cert_file, &rc.key_file) {
            (Some(cert), Some(key)) => {
                let mut pem = read("cert_file", cert)?;
                pem.push(b'\n');
                pem.extend(read("key_file", key)?);
                let identity = reqwest::Identity::from_pem(&pem).map_err(|e| UpstreamError::Config {
                    reason: format!(
                        "registry {registry}: cert_file {} and key_file {} are not a PEM certificate and key: {e}",
                        cert.display(),
                        key.display()
                    ),
                })?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => {
                return Err(UpstreamError::Config {
                    reason: format!("registry {registry}: cert_file and key_file must be given together"),
                });
            }
        }
        if rc.insecure_skip_verify {
            warn!(registry, "TLS certificate verification is off for this registry (insecure_skip_verify)");
            builder = builder.danger_accept_invalid_certs(true);
        }
    }
    builder.build().map_err(|e| UpstreamError::Config { reason: format!("building the HTTP client: {e}") })
}

/// The repository named in the first `repository:<name>:<actions>` scope.
fn scope_repository(scope: &str) -> Option<&str> {
    let first = scope.split(' ').next()?;
    let rest = first.strip_prefix("repository:")?;
    Some(rest.rsplit_once(':')?.0)
}

fn basic_header(user: &str, pass: &str) -> Result<HeaderValue, UpstreamError> {
    let encoded = base64_encode(format!("{user}:{pass}").as_bytes());
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
        .map_err(|e| UpstreamError::Config { reason: format!("credentials: {e}") })?;
    value.set_sensitive(true);
    Ok(value)
}

fn bearer_header(token: &str) -> Result<HeaderValue, UpstreamError> {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| UpstreamError::Invalid {
        url: String::new(),
        reason: format!("token is not a header value: {e}"),
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// Standard base64 with padding (RFC 4648), for basic credentials.
fn base64_encode(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional); `None` on anything else.
fn base64_decode(input: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let body = input.trim_end_matches('=');
    if input.len() - body.len() > 2 || body.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    for chunk in body.as_bytes().chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

fn accept_headers(accept: &str) -> Result<HeaderMap, UpstreamError> {
    let accept = if accept.trim().is_empty() { DEFAULT_MANIFEST_ACCEPT } else { accept };
    let mut headers = HeaderMap::new();
    let value = HeaderValue::from_str(accept)
        .map_err(|e| UpstreamError::BadRequest { reason: format!("Accept header {accept:?}: {e}") })?;
    headers.insert(header::ACCEPT, value);
    Ok(headers)
}

/// `Retry-After` in seconds (an HTTP date is ignored: the backoff applies).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    header_u64(headers, header::RETRY_AFTER).map(Duration::from_secs)
}

fn header_u64(headers: &HeaderMap, name: header::HeaderName) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// `Content-Type` without parameters, or `application/octet-stream`.
fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "application/octet-stream".to_string())
}

/// The `Docker-Content-Digest` header if it is a sha256 digest. Other algorithms are
/// ignored (we hash with sha256 ourselves); a malformed sha256 value is an error.
fn content_digest(headers: &HeaderMap, url: &Url) -> Result<Option<Digest>, UpstreamError> {
    let Some(value) = headers.get("docker-content-digest") else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| invalid(url, "Docker-Content-Digest is not text".to_string()))?;
    if !text.starts_with("sha256:") {
        return Ok(None);
    }
    text.parse::<Digest>().map(Some).map_err(|e| invalid(url, format!("Docker-Content-Digest: {e}")))
}

/// Parses `bytes START-END/TOTAL`.
fn parse_content_range(value: &str) -> Option<(u64, u64, u64)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end, total) = (start.trim().parse().ok()?, end.trim().parse().ok()?, total.trim().parse().ok()?);
    (start <= end && end < total).then_some((start, end, total))
}

/// Reads a whole (small) body, refusing more than `limit` bytes.
async fn read_limited(resp: reqwest::Response, url: &Url, limit: usize) -> Result<Bytes, UpstreamError> {
    let mut stream = resp.bytes_stream();
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|source| UpstreamError::Body { url: url.to_string(), source })?;
        if buf.len() + chunk.len() > limit {
            return Err(invalid(url, format!("body exceeds {limit} bytes")));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

fn invalid(url: &Url, reason: String) -> UpstreamError {
    UpstreamError::Invalid { url: url.to_string(), reason }
}

fn invalid_text(url: &str, reason: String) -> UpstreamError {
    UpstreamError::Invalid { url: url.to_string(), reason }
}

#[cfg(test)]
mod tests;
