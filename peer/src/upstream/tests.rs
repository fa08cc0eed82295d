//! Tests against small local registries (axum on 127.0.0.1) that emulate the token
//! flow, basic auth, 404s, redirects to blob storage, ranges, stalls, and blob
//! responses that break midway or are refused on resumption. The real
//! `docker-registry` is exercised by the root `tests/mirror_*.rs`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use swarm_proto::Digest;

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AuthMode {
    None,
    Basic,
    /// Bearer tokens; the token realm wants basic credentials if `creds_required`.
    Bearer {
        creds_required: bool,
    },
}

#[derive(Default)]
struct Counters {
    token_requests: AtomicUsize,
    requests: AtomicUsize,
    storage_requests: AtomicUsize,
}

struct FakeState {
    auth: AuthMode,
    base: String,
    manifests: HashMap<String, (String, Bytes)>,
    /// Tag -> wrong Docker-Content-Digest to send.
    bad_digest_header: HashMap<String, String>,
    blobs: HashMap<String, Bytes>,
    ranges: bool,
    /// Base URL of a storage server to redirect blob GETs to.
    redirect_to: Option<String>,
    /// Serve blobs up to this byte of the blob, then stall forever.
    stall_after: Option<usize>,
    /// What to do to the next blob GETs, one fault per request, in order.
    faults: Mutex<VecDeque<Fault>>,
    /// The `Range` header of every blob GET.
    blob_ranges: Mutex<Vec<Option<String>>>,
    token_lifetime: u64,
    counters: Counters,
    /// Authorization headers the storage server saw.
    storage_auth: Mutex<Vec<Option<String>>>,
}

/// A fault played on one blob GET.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Send this many bytes of the response body, then abort the connection.
    Cut(usize),
    /// Answer with this status and, if given, `Retry-After` in seconds.
    Status(StatusCode, Option<u64>),
    /// A 206 whose `Content-Range` claims one byte more than the blob has.
    WrongTotal,
}

const USER: &str = "alice";
const PASS: &str = "s3cret";
const TOKEN: &str = "tok-123";
const REFRESH: &str = "refresh-456";

fn basic_value(user: &str, pass: &str) -> String {
    format!("Basic {}", base64_encode(format!("{user}:{pass}").as_bytes()))
}

fn oci_error(status: StatusCode, code: &str) -> Response {
    (status, format!(r#"{{"errors":[{{"code":"{code}","message":"x"}}]}}"#)).into_response()
}

async fn fake_registry(State(st): State<Arc<FakeState>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let auth = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    if path == "/token" && req.method() == "POST" {
        // The OAuth2 refresh-token grant: an identity token.
        st.counters.token_requests.fetch_add(1, Ordering::SeqCst);
        let body = axum::body::to_bytes(req.into_body(), 64 * 1024).await.expect("form body");
        let form: HashMap<String, String> =
            reqwest::Url::parse(&format!("http://x/?{}", String::from_utf8_lossy(&body)))
                .expect("form")
                .query_pairs()
                .into_owned()
                .collect();
        let want = |k: &str, v: &str| form.get(k).map(String::as_str) == Some(v);
        if !(want("grant_type", "refresh_token") && want("refresh_token", REFRESH) && want("service", "fake")) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        assert!(form.get("scope").is_some_and(|s| s.contains("repository:repo/x:pull")), "scope missing: {form:?}");
        return (StatusCode::OK, format!(r#"{{"access_token":"{TOKEN}","expires_in":300}}"#)).into_response();
    }
    if path == "/token" {
        st.counters.token_requests.fetch_add(1, Ordering::SeqCst);
        if matches!(st.auth, AuthMode::Bearer { creds_required: true }) && auth != Some(basic_value(USER, PASS)) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        assert!(query.contains("scope=repository%3Arepo%2Fx%3Apull"), "scope missing in {query}");
        assert!(query.contains("service=fake"), "service missing in {query}");
        let body = format!(r#"{{"token":"{TOKEN}","expires_in":{}}}"#, st.token_lifetime);
        return (StatusCode::OK, body).into_response();
    }
    st.counters.requests.fetch_add(1, Ordering::SeqCst);
    match st.auth {
        AuthMode::None => {}
        AuthMode::Basic => {
            if auth != Some(basic_value(USER, PASS)) {
                return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, r#"Basic realm="fake""#)], "")
                    .into_response();
            }
        }
        AuthMode::Bearer { .. } => {
            if auth != Some(format!("Bearer {TOKEN}")) {
                let challenge =
                    format!(r#"Bearer realm="{}/token",service="fake",scope="repository:repo/x:pull""#, st.base);
                return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, challenge)], "").into_response();
            }
        }
    }
    let Some(rest) = path.strip_prefix("/v2/repo/x/") else {
        return oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
    };
    if let Some(reference) = rest.strip_prefix("manifests/") {
        let Some((media_type, bytes)) = st.manifests.get(reference) else {
            return oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
        };
        let digest = st.bad_digest_header.get(reference).cloned().unwrap_or_else(|| Digest::of(bytes).to_string());
        let mut resp = Response::new(if req.method() == "HEAD" { Body::empty() } else { Body::from(bytes.clone()) });
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, media_type.parse().expect("media type"));
        h.insert(header::CONTENT_LENGTH, bytes.len().into());
        h.insert("docker-content-digest", digest.parse().expect("digest"));
        return resp;
    }
    if let Some(digest) = rest.strip_prefix("blobs/") {
        let Some(bytes) = st.blobs.get(digest) else {
            return oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
        };
        let mut fault = None;
        if req.method() == "GET" {
            let range = req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_string);
            st.blob_ranges.lock().expect("lock").push(range);
            fault = st.faults.lock().expect("lock").pop_front();
        }
        match fault {
            Some(Fault::Status(status, retry_after)) => {
                let mut resp = oci_error(status, "UNAVAILABLE");
                if let Some(secs) = retry_after {
                    resp.headers_mut().insert(header::RETRY_AFTER, secs.into());
                }
                return resp;
            }
            Some(Fault::Cut(n)) => {
                let resp = serve_bytes(&st, false, req.headers(), bytes.clone());
                let (parts, body) = resp.into_parts();
                let sent = axum::body::to_bytes(body, usize::MAX).await.expect("body");
                let first = sent.slice(..n.min(sent.len()));
                let cut = futures_util::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(
                    futures_util::stream::once(async {
                        // Let the server flush what it has before the connection breaks.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Err(std::io::Error::other("cut"))
                    }),
                );
                return Response::from_parts(parts, Body::from_stream(cut));
            }
            Some(Fault::WrongTotal) => {
                let mut resp = serve_bytes(&st, false, req.headers(), bytes.clone());
                if let Some(cr) = resp.headers().get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()) {
                    let (range, total) = cr.split_once('/').expect("content range");
                    let wrong = format!("{range}/{}", total.parse::<u64>().expect("total") + 1);
                    resp.headers_mut().insert(header::CONTENT_RANGE, wrong.parse().expect("header"));
                }
                return resp;
            }
            None => {}
        }
        if req.method() == "GET"
            && let Some(storage) = &st.redirect_to
        {
            return (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, format!("{storage}/data/{digest}"))])
                .into_response();
        }
        return serve_bytes(&st, req.method() == "HEAD", req.headers(), bytes.clone());
    }
    oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN")
}

fn serve_bytes(st: &FakeState, head: bool, headers: &HeaderMap, bytes: Bytes) -> Response {
    let total = bytes.len();
    let range_start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<usize>().ok());
    let start = range_start.filter(|_| st.ranges).unwrap_or(0);
    let (status, body, content_range) = match range_start {
        Some(start) if st.ranges => {
            if start >= total {
                return (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{total}"))])
                    .into_response();
            }
            (StatusCode::PARTIAL_CONTENT, bytes.slice(start..), Some(format!("bytes {start}-{}/{total}", total - 1)))
        }
        _ => (StatusCode::OK, bytes, None),
    };
    let len = body.len();
    let body = if head {
        Body::empty()
    } else if let Some(n) = st.stall_after {
        let first = body.slice(..n.saturating_sub(start).min(len));
        Body::from_stream(
            futures_util::stream::once(async move { Ok::<_, std::io::Error>(first) })
                .chain(futures_util::stream::pending()),
        )
    } else {
        Body::from(body)
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_LENGTH, len.into());
    if let Some(cr) = content_range {
        resp.headers_mut().insert(header::CONTENT_RANGE, cr.parse().expect("content range"));
    }
    resp
}

async fn fake_storage(State(st): State<Arc<FakeState>>, req: Request) -> Response {
    st.counters.storage_requests.fetch_add(1, Ordering::SeqCst);
    let auth = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    st.storage_auth.lock().expect("lock").push(auth);
    let Some(digest) = req.uri().path().strip_prefix("/data/") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match st.blobs.get(digest) {
        Some(bytes) => serve_bytes(&st, false, req.headers(), bytes.clone()),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

struct Fake {
    state: Arc<FakeState>,
    addr: std::net::SocketAddr,
}

struct FakeOptions {
    auth: AuthMode,
    ranges: bool,
    redirect: bool,
    stall_after: Option<usize>,
    faults: Vec<Fault>,
    token_lifetime: u64,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            auth: AuthMode::None,
            ranges: true,
            redirect: false,
            stall_after: None,
            faults: Vec::new(),
            token_lifetime: 300,
        }
    }
}

/// Short retry bounds, so that giving up takes seconds.
const TEST_RESUME: ResumePolicy = ResumePolicy {
    give_up: Duration::from_secs(3),
    first_delay: Duration::from_millis(50),
    max_delay: Duration::from_millis(200),
    max_retry_after: Duration::from_secs(2),
};

const MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

fn blob_bytes() -> Bytes {
    Bytes::from((0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect::<Vec<u8>>())
}

async fn start_fake(opts: FakeOptions) -> Fake {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // The storage server shares the state but listens on another port (another "host").
    let storage_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let storage_addr = storage_listener.local_addr().expect("addr");
    let blob = blob_bytes();
    let wrong = Bytes::from_static(b"these are not the bytes you are looking for");
    let mut manifests = HashMap::new();
    let manifest = Bytes::from_static(MANIFEST);
    manifests.insert("v1".to_string(), (MANIFEST_TYPE.to_string(), manifest.clone()));
    manifests.insert("badheader".to_string(), (MANIFEST_TYPE.to_string(), manifest.clone()));
    manifests.insert(Digest::of(MANIFEST).to_string(), (MANIFEST_TYPE.to_string(), manifest));
    // A digest reference whose bytes do not match.
    manifests.insert(Digest::of(b"something else").to_string(), (MANIFEST_TYPE.to_string(), wrong));
    let mut bad_digest_header = HashMap::new();
    bad_digest_header.insert("badheader".to_string(), Digest::of(b"other").to_string());
    let mut blobs = HashMap::new();
    blobs.insert(Digest::of(&blob).to_string(), blob);
    let state = Arc::new(FakeState {
        auth: opts.auth,
        base: format!("http://{addr}"),
        manifests,
        bad_digest_header,
        blobs,
        ranges: opts.ranges,
        redirect_to: opts.redirect.then(|| format!("http://localhost:{}", storage_addr.port())),
        stall_after: opts.stall_after,
        faults: Mutex::new(opts.faults.into()),
        blob_ranges: Mutex::new(Vec::new()),
        token_lifetime: opts.token_lifetime,
        counters: Counters::default(),
        storage_auth: Mutex::new(Vec::new()),
    });
    let router = axum::Router::new().fallback(fake_registry).with_state(state.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let storage = axum::Router::new().fallback(fake_storage).with_state(state.clone());
    tokio::spawn(async move { axum::serve(storage_listener, storage).await });
    Fake { state, addr }
}

fn client_for(fake: &Fake, creds: Option<(&str, &str)>) -> UpstreamClient {
    let mut config = UpstreamConfig { read_timeout: Duration::from_secs(2), ..UpstreamConfig::default() };
    config.registries.insert(
        "fake.test".to_string(),
        RegistryConfig {
            endpoint: Some(format!("http://{}", fake.addr)),
            username: creds.map(|c| c.0.to_string()),
            password: creds.map(|c| c.1.to_string()),
            ..RegistryConfig::default()
        },
    );
    UpstreamClient::with_resume(config, TEST_RESUME).expect("client")
}

async fn collect(blob: UpstreamBlob) -> Result<Vec<u8>, UpstreamError> {
    let mut out = Vec::new();
    let mut stream = blob.stream;
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

#[tokio::test]
async fn anonymous_token_flow_fetches_one_token_and_reuses_it() {
    let fake = start_fake(FakeOptions { auth: AuthMode::Bearer { creds_required: false }, ..Default::default() }).await;
    let client = client_for(&fake, None);
    let m = client.manifest("fake.test", "repo/x", "v1", "").await.expect("manifest");
    assert_eq!(m.bytes.as_ref(), MANIFEST);
    assert_eq!(m.digest, Digest::of(MANIFEST));
    assert_eq!(m.media_type, MANIFEST_TYPE);
    let blob = blob_bytes();
    let d = Digest::of(&blob);
    assert_eq!(client.blob_length("fake.test", "repo/x", &d).await.expect("len"), blob.len() as u64);
    let got = collect(client.blob("fake.test", "repo/x", &d, 0).await.expect("blob")).await.expect("bytes");
    assert_eq!(got, blob.as_ref());
    assert_eq!(fake.state.counters.token_requests.load(Ordering::SeqCst), 1, "token must be cached");
    // One 401 plus three authorised requests.
    assert_eq!(fake.state.counters.requests.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn expired_tokens_are_refetched() {
    // expires_in 1s: the margin makes it unusable almost at once.
    let fake = start_fake(FakeOptions {
        auth: AuthMode::Bearer { creds_required: false },
        token_lifetime: 1,
        ..Default::default()
    })
    .await;
    let client = client_for(&fake, None);
    client.manifest("fake.test", "repo/x", "v1", "").await.expect("manifest");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    client.manifest("fake.test", "repo/x", "v1", "").await.expect("manifest");
    assert_eq!(fake.state.counters.token_requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn token_realm_with_credentials() {
    let fake = start_fake(FakeOptions { auth: AuthMode::Bearer { creds_required: true }, ..Default::default() }).await;
    let ok = client_for(&fake, Some((USER, PASS)));
    ok.manifest("fake.test", "repo/x", "v1", "").await.expect("manifest with credentials");
    let wrong = client_for(&fake, Some((USER, "nope")));
    let err = wrong.manifest("fake.test", "repo/x", "v1", "").await.expect_err("wrong password");
    assert!(matches!(err, UpstreamError::Unauthorized { ref registry } if registry == "fake.test"), "{err:?}");
    let anonymous = client_for(&fake, None);
    let err = anonymous.manifest("fake.test", "repo/x", "v1", "").await.expect_err("no credentials");
    assert!(matches!(err, UpstreamError::Unauthorized { .. }), "{err:?}");
}

fn client_with(fake: &Fake, edit: impl FnOnce(&mut RegistryConfig)) -> UpstreamClient {
    let mut rc = RegistryConfig { endpoint: Some(format!("http://{}", fake.addr)), ..RegistryConfig::default() };
    edit(&mut rc);
    let mut config = UpstreamConfig { read_timeout: Duration::from_secs(2), ..UpstreamConfig::default() };
    config.registries.insert("fake.test".to_string(), rc);
    UpstreamClient::new(config).expect("client")
}

#[tokio::test]
async fn an_identity_token_is_exchanged_at_the_realm() {
    let fake = start_fake(FakeOptions { auth: AuthMode::Bearer { creds_required: true }, ..Default::default() }).await;
    let client = client_with(&fake, |rc| rc.identity_token = Some(REFRESH.into()));
    client.manifest("fake.test", "repo/x", "v1", "").await.expect("manifest with an identity token");
    client.head_manifest("fake.test", "repo/x", "v1", "").await.expect("head");
    assert_eq!(fake.state.counters.token_requests.load(Ordering::SeqCst), 1, "the access token is cached");
    let wrong = client_with(&fake, |rc| rc.identity_token = Some("stale".into()));
    let err = wrong.manifest("fake.test", "repo/x", "v1", "").await.expect_err("refused refresh token");
    assert!(matches!(err, UpstreamError::Unauthorized { .. }), "{err:?}");
}

#[tokio::test]
async fn a_registry_token_is_sent_as_is() {
    let fake = start_fake(FakeOptions { auth: AuthMode::Bearer { creds_required: true }, ..Default::default() }).await;
    let client = client_with(&fake, |rc| rc.token = Some(TOKEN.into()));
    client.manifest("fake.test", "repo/x", "v1", "").await.expect("manifest with a registry token");
    assert_eq!(fake.state.counters.token_requests.load(Ordering::SeqCst), 0, "no trip to the realm");
    assert_eq!(fake.state.counters.requests.load(Ordering::SeqCst), 1, "no 401 first");
}

#[test]
fn unreadable_tls_files_are_reported_with_their_path() {
    let rc = RegistryConfig { ca_file: Some("/nonexistent/ca.pem".into()), ..RegistryConfig::default() };
    let mut config = UpstreamConfig::default();
    config.registries.insert("r.test".into(), rc);
    let err = UpstreamClient::new(config.clone()).expect_err("missing CA file").to_string();
    assert!(err.contains("/nonexistent/ca.pem") && err.contains("r.test"), "{err}");
    let rc = RegistryConfig { cert_file: Some("/x.pem".into()), ..RegistryConfig::default() };
    config.registries.insert("r.test".into(), rc);
    let err = UpstreamClient::new(config).expect_err("cert without key").to_string();
    assert!(err.contains("key_file"), "{err}");
}

#[tokio::test]
async fn basic_auth() {
    let fake = start_fake(FakeOptions { auth: AuthMode::Basic, ..Default::default() }).await;
    let ok = client_for(&fake, Some((USER, PASS)));
    ok.manifest("fake.test", "repo/x", "v1", "").await.expect("manifest");
    // The challenge is remembered: the second request goes out with credentials.
    let before = fake.state.counters.requests.load(Ordering::SeqCst);
    ok.head_manifest("fake.test", "repo/x", "v1", "").await.expect("head");
    assert_eq!(fake.state.counters.requests.load(Ordering::SeqCst), before + 1);
    let err = client_for(&fake, None).manifest("fake.test", "repo/x", "v1", "").await.expect_err("no creds");
    assert!(matches!(err, UpstreamError::Unauthorized { .. }), "{err:?}");
    let err = client_for(&fake, Some((USER, "x"))).manifest("fake.test", "repo/x", "v1", "").await.expect_err("bad");
    assert!(matches!(err, UpstreamError::Unauthorized { .. }), "{err:?}");
}

#[tokio::test]
async fn not_found_and_bad_requests() {
    let fake = start_fake(FakeOptions::default()).await;
    let client = client_for(&fake, None);
    let err = client.manifest("fake.test", "repo/x", "nope", "").await.expect_err("404");
    assert!(err.is_not_found(), "{err:?}");
    let err = client.blob_length("fake.test", "repo/x", &Digest::of(b"missing")).await.expect_err("404");
    assert!(err.is_not_found(), "{err:?}");
    let err = client.blob("fake.test", "repo/x", &Digest::of(b"missing"), 0).await.expect_err("404");
    assert!(err.is_not_found(), "{err:?}");
    for (repo, reference) in [("../x", "v1"), ("repo/x", "../../v1"), ("Repo", "v1"), ("repo/x", "a/b")] {
        let err = client.manifest("fake.test", repo, reference, "").await.expect_err("refused");
        assert!(matches!(err, UpstreamError::BadRequest { .. }), "{repo} {reference}: {err:?}");
    }
    let err = client.manifest("not a host", "repo/x", "v1", "").await.expect_err("refused");
    assert!(matches!(err, UpstreamError::BadRequest { .. }), "{err:?}");
}

#[tokio::test]
async fn manifests_are_checked_against_digests() {
    let fake = start_fake(FakeOptions::default()).await;
    let client = client_for(&fake, None);
    let d = Digest::of(MANIFEST).to_string();
    let m = client.manifest("fake.test", "repo/x", &d, "").await.expect("by digest");
    assert_eq!(m.digest.to_string(), d);
    let head = client.head_manifest("fake.test", "repo/x", "v1", "").await.expect("head");
    assert_eq!(
        head,
        ManifestHead { digest: Digest::of(MANIFEST), media_type: MANIFEST_TYPE.into(), length: MANIFEST.len() as u64 }
    );
    // Bytes that do not hash to the requested digest.
    let wrong = Digest::of(b"something else").to_string();
    let err = client.manifest("fake.test", "repo/x", &wrong, "").await.expect_err("mismatch");
    assert!(matches!(err, UpstreamError::Invalid { .. }), "{err:?}");
    // A Docker-Content-Digest that disagrees with the bytes.
    let err = client.manifest("fake.test", "repo/x", "badheader", "").await.expect_err("mismatch");
    assert!(matches!(err, UpstreamError::Invalid { .. }), "{err:?}");
}

#[tokio::test]
async fn ranges_with_206_and_with_200() {
    let blob = blob_bytes();
    let d = Digest::of(&blob);
    for ranges in [true, false] {
        let fake = start_fake(FakeOptions { ranges, ..Default::default() }).await;
        let client = client_for(&fake, None);
        for offset in [0u64, 1, 65_536, 99_999, 100_000] {
            let b = client.blob("fake.test", "repo/x", &d, offset).await.expect("blob");
            assert_eq!(b.total_length, blob.len() as u64);
            let got = collect(b).await.expect("bytes");
            assert_eq!(got, &blob[offset as usize..], "ranges={ranges} offset={offset}");
        }
        let err = client.blob("fake.test", "repo/x", &d, 100_001).await.expect_err("past the end");
        assert!(matches!(err, UpstreamError::Invalid { .. }), "{err:?}");
    }
}

#[tokio::test]
async fn redirects_do_not_leak_the_registry_token() {
    let fake = start_fake(FakeOptions {
        auth: AuthMode::Bearer { creds_required: false },
        redirect: true,
        ..Default::default()
    })
    .await;
    let client = client_for(&fake, None);
    let blob = blob_bytes();
    let d = Digest::of(&blob);
    let got = collect(client.blob("fake.test", "repo/x", &d, 0).await.expect("blob")).await.expect("bytes");
    assert_eq!(got, blob.as_ref());
    let b = client.blob("fake.test", "repo/x", &d, 500).await.expect("ranged blob through redirect");
    assert_eq!(collect(b).await.expect("bytes"), &blob[500..]);
    let seen = fake.state.storage_auth.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2, "both GETs reached storage");
    assert!(seen.iter().all(Option::is_none), "Authorization leaked to storage: {seen:?}");
}

#[tokio::test]
async fn a_stream_stalled_for_good_gives_up_after_the_bound() {
    let fake = start_fake(FakeOptions { stall_after: Some(1000), ..Default::default() }).await;
    let client = client_for(&fake, None);
    let d = Digest::of(&blob_bytes());
    let started = std::time::Instant::now();
    let blob = client.blob("fake.test", "repo/x", &d, 0).await.expect("headers arrive");
    let err = tokio::time::timeout(Duration::from_secs(10), collect(blob)).await.expect("bounded").expect_err("stall");
    assert!(matches!(err, UpstreamError::GaveUp { offset: 1000, .. }), "{err:?}");
    let waited = started.elapsed();
    // The 2 s read timeout ends the first response, a retry from byte 1000 stalls
    // too, and the 3 s bound (TEST_RESUME) ends it all.
    assert!(waited >= Duration::from_millis(2500) && waited < Duration::from_secs(5), "{waited:?}");
    let ranges = fake.state.blob_ranges.lock().expect("lock").clone();
    assert_eq!(ranges.first(), Some(&None), "{ranges:?}");
    assert_eq!(ranges.get(1).cloned().flatten().as_deref(), Some("bytes=1000-"), "{ranges:?}");
}

#[tokio::test]
async fn connections_cut_midway_resume_with_ranges_and_the_bytes_come_out_whole() {
    let blob = blob_bytes();
    let d = Digest::of(&blob);
    for ranges in [true, false] {
        let faults = vec![Fault::Cut(30_000), Fault::Cut(20_000)];
        let fake = start_fake(FakeOptions { ranges, faults, ..Default::default() }).await;
        let client = client_for(&fake, None);
        let got = collect(client.blob("fake.test", "repo/x", &d, 0).await.expect("blob")).await.expect("bytes");
        assert!(got == blob.as_ref(), "ranges={ranges}: {} bytes, wrong or incomplete", got.len());
        let seen = fake.state.blob_ranges.lock().expect("lock").clone();
        // With ranges, the second cut is 20,000 bytes into the resumed response; without,
        // into a response that restarted at 0 (so no progress there).
        let second = if ranges { "bytes=50000-" } else { "bytes=30000-" };
        let want = vec![None, Some("bytes=30000-".to_string()), Some(second.to_string())];
        assert_eq!(seen, want, "ranges={ranges}");
        // A resume from an offset keeps its own offset.
        let fake = start_fake(FakeOptions { ranges, faults: vec![Fault::Cut(5_000)], ..Default::default() }).await;
        let client = client_for(&fake, None);
        let b = client.blob("fake.test", "repo/x", &d, 60_000).await.expect("blob from 60000");
        assert_eq!(b.total_length, blob.len() as u64);
        let got = collect(b).await.expect("bytes");
        assert!(got == blob[60_000..], "ranges={ranges}: resumed from an offset, wrong bytes");
    }
}

#[tokio::test]
async fn a_503_with_retry_after_is_waited_out_then_the_206_completes() {
    let blob = blob_bytes();
    let d = Digest::of(&blob);
    let faults = vec![Fault::Cut(40_000), Fault::Status(StatusCode::SERVICE_UNAVAILABLE, Some(1)), Fault::Cut(1)];
    let fake = start_fake(FakeOptions { faults, ..Default::default() }).await;
    let client = client_for(&fake, None);
    let started = std::time::Instant::now();
    let got = collect(client.blob("fake.test", "repo/x", &d, 0).await.expect("blob")).await.expect("bytes");
    let took = started.elapsed();
    assert!(got == blob.as_ref(), "{} bytes, wrong or incomplete", got.len());
    assert!(took >= Duration::from_secs(1), "Retry-After: 1 not honoured: {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let seen = fake.state.blob_ranges.lock().expect("lock").clone();
    let r = |s: &str| Some(s.to_string());
    assert_eq!(seen, vec![None, r("bytes=40000-"), r("bytes=40000-"), r("bytes=40001-")]);
}

#[tokio::test]
async fn a_definite_refusal_on_resumption_fails_at_once() {
    let d = Digest::of(&blob_bytes());
    for (fault, what) in [
        (Fault::Status(StatusCode::NOT_FOUND, None), "404"),
        (Fault::Status(StatusCode::FORBIDDEN, None), "403"),
        (Fault::Status(StatusCode::BAD_REQUEST, None), "400"),
        (Fault::WrongTotal, "another total length"),
    ] {
        let fake = start_fake(FakeOptions { faults: vec![Fault::Cut(10_000), fault], ..Default::default() }).await;
        let client = client_for(&fake, None);
        let started = std::time::Instant::now();
        let err = collect(client.blob("fake.test", "repo/x", &d, 0).await.expect("blob")).await.expect_err(what);
        let ok = match what {
            "404" => err.is_not_found(),
            "403" => matches!(err, UpstreamError::Unauthorized { .. }),
            "400" => matches!(err, UpstreamError::Status { status: 400, .. }),
            _ => matches!(err, UpstreamError::Invalid { .. }),
        };
        assert!(ok, "{what}: {err:?}");
        assert!(started.elapsed() < Duration::from_secs(1), "{what}: not at once: {:?}", started.elapsed());
        assert_eq!(fake.state.blob_ranges.lock().expect("lock").len(), 2, "{what}: retried");
    }
}

#[test]
fn the_backoff_doubles_up_to_the_cap_with_jitter_and_honours_retry_after_within_reason() {
    let policy = ResumePolicy::default();
    for _ in 0..100 {
        let d1 = policy.delay(1, None);
        assert!(d1 >= Duration::from_millis(250) && d1 <= Duration::from_millis(500), "{d1:?}");
        let d3 = policy.delay(3, None);
        assert!(d3 >= Duration::from_secs(1) && d3 <= Duration::from_secs(2), "{d3:?}");
        let d40 = policy.delay(40, None);
        assert!(d40 >= Duration::from_secs(4) && d40 <= Duration::from_secs(8), "{d40:?}");
        assert_eq!(policy.delay(1, Some(Duration::from_secs(5))), Duration::from_secs(5));
        assert_eq!(policy.delay(1, Some(Duration::from_secs(3600))), resume::MAX_RETRY_AFTER);
    }
    // The default bound rides out a 60 s outage noticed by the default read timeout
    // plus the longest wait, and stays below the agent's 120 s mirror stall limit.
    assert!(RESUME_GIVE_UP > Duration::from_secs(60) + policy.max_delay + Duration::from_secs(10));
    assert!(RESUME_GIVE_UP < Duration::from_secs(120));
}

#[tokio::test]
async fn unreachable_registry() {
    // Bind then drop a listener: nothing listens on that port any more.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut config = UpstreamConfig::default();
    config.plain_http.push(format!("127.0.0.1:{port}"));
    let client = UpstreamClient::new(config).expect("client");
    let err = client.manifest(&format!("127.0.0.1:{port}"), "a", "v1", "").await.expect_err("refused");
    assert!(matches!(err, UpstreamError::Unreachable { .. }), "{err:?}");
    assert!(!err.is_not_found());
}

#[test]
fn endpoint_mapping() {
    let mut config = UpstreamConfig::default();
    config.plain_http.push("127.0.0.1:5000".into());
    config.registries.insert("ghcr.io".into(), RegistryConfig { plain_http: true, ..Default::default() });
    config.registries.insert(
        "mirror.local".into(),
        RegistryConfig { endpoint: Some("http://10.0.0.1:8080/".into()), ..Default::default() },
    );
    let c = UpstreamClient::new(config).expect("client");
    assert_eq!(c.endpoint("docker.io").expect("ok").as_str(), "https://registry-1.docker.io/");
    assert_eq!(c.endpoint("quay.io").expect("ok").as_str(), "https://quay.io/");
    assert_eq!(c.endpoint("127.0.0.1:5000").expect("ok").as_str(), "http://127.0.0.1:5000/");
    assert_eq!(c.endpoint("127.0.0.1:5001").expect("ok").as_str(), "https://127.0.0.1:5001/");
    assert_eq!(c.endpoint("ghcr.io").expect("ok").as_str(), "http://ghcr.io/");
    assert_eq!(c.endpoint("mirror.local").expect("ok").as_str(), "http://10.0.0.1:8080/");
    assert!(c.endpoint("bad host").is_err());
}

#[test]
fn config_from_toml() {
    let config: UpstreamConfig = toml::from_str(
        r#"
        plain_http = ["127.0.0.1:5000"]
        read_timeout = "45s"
        [registries."docker.io"]
        username = "u"
        password = "p"
        "#,
    )
    .expect("valid config");
    assert_eq!(config.read_timeout, Duration::from_secs(45));
    assert_eq!(config.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(config.registries["docker.io"].username.as_deref(), Some("u"));
    assert!(toml::from_str::<UpstreamConfig>("bogus = 1").is_err());
    assert!(toml::from_str::<UpstreamConfig>("read_timeout = \"soon\"").is_err());
    let half = r#"[registries."docker.io"]
        username = "u""#;
    let config: UpstreamConfig = toml::from_str(half).expect("parses");
    assert!(matches!(UpstreamClient::new(config), Err(UpstreamError::Config { .. })));
    let mut config = UpstreamConfig::default();
    config.registries.insert("x".into(), RegistryConfig { endpoint: Some("ftp://x".into()), ..Default::default() });
    assert!(matches!(UpstreamClient::new(config), Err(UpstreamError::Config { .. })));
}

#[test]
fn content_range_and_base64() {
    assert_eq!(parse_content_range("bytes 0-9/10"), Some((0, 9, 10)));
    assert_eq!(parse_content_range("bytes 5-9/100"), Some((5, 9, 100)));
    assert_eq!(parse_content_range("bytes 5-9/*"), None);
    assert_eq!(parse_content_range("bytes 9-5/100"), None);
    assert_eq!(parse_content_range("bytes 0-10/10"), None);
    assert_eq!(parse_content_range("items 0-1/2"), None);
    for (input, expected) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("alice:s3cret", "YWxpY2U6czNjcmV0"),
    ] {
        assert_eq!(base64_encode(input.as_bytes()), expected);
        assert_eq!(base64_decode(expected).as_deref(), Some(input.as_bytes()));
        assert_eq!(base64_decode(expected.trim_end_matches('=')).as_deref(), Some(input.as_bytes()));
    }
    for bad in ["!", "Zg===", "Z", "Zm9v$"] {
        assert_eq!(base64_decode(bad), None, "{bad}");
    }
    assert_eq!(scope_repository("repository:a/b:pull,push"), Some("a/b"));
    assert_eq!(scope_repository("registry:catalog:*"), None);
}
