//! The wire side of the mirror: request paths, `?ns=`, `Range` headers, and OCI error
//! bodies. Pure functions, no I/O.
//!
//! Two ways of naming the upstream registry are understood:
//!
//! - containerd (`hosts.toml`) sends `/v2/<name>/...?ns=<registry>`;
//! - CRI-O, podman and skopeo (containers/image, a `registries.conf` mirror with
//!   `location = "127.0.0.1:5001/quay.io"`) send `/v2/quay.io/<name>/...` and no `ns`.
//!
//! [`Route::registry_in_path`] turns the second form into the first, so everything
//! after it sees one shape; [`Route::accept_registry_in_path`] applies that to a router.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use swarm_proto::Digest;

use crate::upstream::names;

/// What a request path names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: the API version check.
    Base,
    /// `/v2/<name>/manifests/<reference>`.
    Manifest { name: String, reference: Reference },
    /// `/v2/<name>/blobs/<digest>`.
    Blob { name: String, digest: Digest },
}

impl Route {
    /// The containerd form of a request that names its registry as the first path
    /// component instead of in `?ns=`: `/v2/quay.io/app/blobs/sha256:..` becomes
    /// `/v2/app/blobs/sha256:..?ns=quay.io`. `None` (leave the request alone) when the
    /// query already has `ns`, or when the first component does not look like a
    /// registry host: it must contain a `.` or a `:` or be `localhost` (the rule image
    /// references use to tell a registry from a repository) and be a valid
    /// `host[:port]`, and a repository must follow it.
    pub fn registry_in_path(path: &str, query: Option<&str>) -> Option<String> {
        if query.unwrap_or("").split('&').any(|pair| pair.split_once('=').map_or(pair, |(k, _)| k) == "ns") {
            return None;
        }
        let rest = path.strip_prefix("/v2/")?;
        let (first, tail) = rest.split_once('/')?;
        let looks_like_host = first.contains('.') || first.contains(':') || first == "localhost";
        if !looks_like_host || !names::is_valid_registry(first) || tail.is_empty() {
            return None;
        }
        Some(match query.filter(|q| !q.is_empty()) {
            Some(q) => format!("/v2/{tail}?{q}&ns={first}"),
            None => format!("/v2/{tail}?ns={first}"),
        })
    }

    /// `router` with [`Route::registry_in_path`] applied to every request before
    /// routing, so that CRI-O, podman and skopeo are served like containerd.
    pub fn accept_registry_in_path(router: axum::Router) -> axum::Router {
        router.layer(axum::middleware::map_request(|mut req: axum::extract::Request| async move {
            let uri = req.uri();
            if let Some(rewritten) = Self::registry_in_path(uri.path(), uri.query())
                && let Ok(pq) = rewritten.parse::<axum::http::uri::PathAndQuery>()
            {
                let mut parts = uri.clone().into_parts();
                parts.path_and_query = Some(pq);
                if let Ok(new) = axum::http::Uri::from_parts(parts) {
                    *req.uri_mut() = new;
                }
            }
            req
        }))
    }
}

/// A manifest reference: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

/// How a request ended, for the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    NotFound,
    /// The client's request was refused (bad name, method, range, missing `ns`).
    Rejected,
    /// Told the client to go to the next host (see [`super::FALLBACK_STATUS`]).
    Fallback,
    Error,
}

/// An OCI error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub outcome: Outcome,
    /// Extra headers (`Allow` for 405, `Content-Range` for 416).
    pub headers: Vec<(header::HeaderName, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>, outcome: Outcome) -> Self {
        Self { status, code, message: message.into(), detail: None, outcome, headers: Vec::new() }
    }

    pub fn rejected(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self::new(status, code, message, Outcome::Rejected)
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_header(mut self, name: header::HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The JSON body `{"errors":[{"code":..,"message":..,"detail":..}]}`.
    pub fn body(&self) -> String {
        let mut entry = serde_json::json!({ "code": self.code, "message": self.message });
        if let (Some(detail), Some(obj)) = (&self.detail, entry.as_object_mut()) {
            obj.insert("detail".into(), serde_json::Value::String(detail.clone()));
        }
        serde_json::json!({ "errors": [entry] }).to_string()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        let mut resp = (self.status, body).into_response();
        let headers = resp.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in self.headers {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
        resp
    }
}

/// Parses a raw (still percent-encoded) request path.
///
/// `<name>` may contain slashes, so the path is split at the *last* `/manifests/` or
/// `/blobs/`. The name is checked against the distribution grammar on the raw path,
/// so `..`, empty components and escapes such as `%2F` are refused.
pub fn parse_route(path: &str) -> Result<Route, ApiError> {
    if path == "/v2" || path == "/v2/" {
        return Ok(Route::Base);
    }
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "UNSUPPORTED", "no such endpoint", Outcome::NotFound);
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Err(not_found());
    };
    let manifests = rest.rfind("/manifests/").map(|i| (i, "/manifests/".len(), true));
    let blobs = rest.rfind("/blobs/").map(|i| (i, "/blobs/".len(), false));
    let (at, sep_len, is_manifest) = match (manifests, blobs) {
        (Some(m), Some(b)) => {
            if m.0 > b.0 {
                m
            } else {
                b
            }
        }
        (Some(m), None) => m,
        (None, Some(b)) => b,
        (None, None) => return Err(not_found()),
    };
    let name = &rest[..at];
    let reference = &rest[at + sep_len..];
    if !names::is_valid_repository(name) {
        return Err(ApiError::rejected(StatusCode::BAD_REQUEST, "NAME_INVALID", "invalid repository name")
            .with_detail(truncate(name)));
    }
    let name = name.to_string();
    if is_manifest {
        if reference.contains(':') {
            let digest = reference.parse::<Digest>().map_err(|e| {
                ApiError::rejected(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "invalid digest")
                    .with_detail(e.to_string())
            })?;
            Ok(Route::Manifest { name, reference: Reference::Digest(digest) })
        } else if names::is_valid_tag(reference) {
            Ok(Route::Manifest { name, reference: Reference::Tag(reference.to_string()) })
        } else {
            Err(ApiError::rejected(StatusCode::BAD_REQUEST, "TAG_INVALID", "invalid tag")
                .with_detail(truncate(reference)))
        }
    } else {
        let digest = reference.parse::<Digest>().map_err(|e| {
            ApiError::rejected(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "invalid digest").with_detail(e.to_string())
        })?;
        Ok(Route::Blob { name, digest })
    }
}

/// The upstream registry named by `?ns=`, validated as `host[:port]`.
pub fn parse_ns(query: Option<&str>) -> Result<String, ApiError> {
    let missing = || {
        ApiError::rejected(
            StatusCode::BAD_REQUEST,
            "UNSUPPORTED",
            "the upstream registry is missing: containerd sends it as ?ns=REGISTRY, \
             containers/image (CRI-O, podman, skopeo) as the first path component, /v2/REGISTRY/NAME/...",
        )
    };
    let mut found: Option<String> = None;
    for pair in query.unwrap_or("").split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "ns" {
            continue;
        }
        if found.is_some() {
            return Err(ApiError::rejected(StatusCode::BAD_REQUEST, "UNSUPPORTED", "ns given more than once"));
        }
        let value = percent_decode(value).ok_or_else(|| {
            ApiError::rejected(StatusCode::BAD_REQUEST, "UNSUPPORTED", "ns is not valid percent-encoding")
        })?;
        found = Some(value);
    }
    let ns = found.filter(|ns| !ns.is_empty()).ok_or_else(missing)?;
    if !names::is_valid_registry(&ns) {
        return Err(ApiError::rejected(StatusCode::BAD_REQUEST, "UNSUPPORTED", "ns is not a registry host[:port]")
            .with_detail(truncate(&ns)));
    }
    Ok(ns)
}

/// Decodes `%XX` escapes and `+` (as a space, which the validator then refuses).
fn percent_decode(input: &str) -> Option<String> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = input.get(i + 1..i + 3).filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A single byte range as the client asked for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeSpec {
    /// `bytes=a-b` (inclusive).
    FromTo(u64, u64),
    /// `bytes=a-`.
    From(u64),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

/// Parses a `Range` header. `None` means "ignore it and send the whole blob", which
/// RFC 9110 allows for syntactically invalid headers and which we also do for
/// multi-range requests.
pub fn parse_range(value: &str) -> Option<RangeSpec> {
    let spec = value.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) { None } else { s.parse().ok() }
    };
    match (a.is_empty(), b.is_empty()) {
        (true, true) => None,
        (true, false) => Some(RangeSpec::Suffix(num(b)?)),
        (false, true) => Some(RangeSpec::From(num(a)?)),
        (false, false) => {
            let (a, b) = (num(a)?, num(b)?);
            (a <= b).then_some(RangeSpec::FromTo(a, b))
        }
    }
}

/// The inclusive byte range `spec` selects in a blob of `len` bytes, or `None` when it
/// is unsatisfiable (answer 416).
pub fn resolve_range(spec: RangeSpec, len: u64) -> Option<(u64, u64)> {
    if len == 0 {
        return None;
    }
    match spec {
        RangeSpec::FromTo(a, b) => (a < len).then(|| (a, b.min(len - 1))),
        RangeSpec::From(a) => (a < len).then_some((a, len - 1)),
        RangeSpec::Suffix(0) => None,
        RangeSpec::Suffix(n) => Some((len.saturating_sub(n), len - 1)),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn routes() {
        assert_eq!(parse_route("/v2/").ok(), Some(Route::Base));
        assert_eq!(parse_route("/v2").ok(), Some(Route::Base));
        assert_eq!(
            parse_route("/v2/library/ubuntu/manifests/latest").ok(),
            Some(Route::Manifest { name: "library/ubuntu".into(), reference: Reference::Tag("latest".into()) })
        );
        let d: Digest = D.parse().expect("digest");
        assert_eq!(
            parse_route(&format!("/v2/a/b/c/manifests/{D}")).ok(),
            Some(Route::Manifest { name: "a/b/c".into(), reference: Reference::Digest(d) })
        );
        assert_eq!(parse_route(&format!("/v2/a/blobs/{D}")).ok(), Some(Route::Blob { name: "a".into(), digest: d }));
        // The last separator wins: names may contain "blobs" or "manifests" components.
        assert_eq!(
            parse_route(&format!("/v2/x/blobs/y/manifests/{D}")).ok(),
            Some(Route::Manifest { name: "x/blobs/y".into(), reference: Reference::Digest(d) })
        );
        assert_eq!(
            parse_route(&format!("/v2/x/manifests/y/blobs/{D}")).ok(),
            Some(Route::Blob { name: "x/manifests/y".into(), digest: d })
        );
    }

    fn code(path: &str) -> (u16, &'static str) {
        match parse_route(path) {
            Ok(route) => panic!("{path} parsed as {route:?}"),
            Err(e) => (e.status.as_u16(), e.code),
        }
    }

    #[test]
    fn bad_routes() {
        assert_eq!(code("/"), (404, "UNSUPPORTED"));
        assert_eq!(code("/v2/a/tags/list"), (404, "UNSUPPORTED"));
        assert_eq!(code("/v1/a/manifests/x"), (404, "UNSUPPORTED"));
        for bad_name in [
            "/v2/../manifests/x",
            "/v2/a/../b/manifests/x",
            "/v2/a%2Fb/manifests/x",
            "/v2/a%2fb/manifests/x",
            "/v2/a//b/manifests/x",
            "/v2//manifests/x",
            "/v2/A/manifests/x",
            "/v2/a%00/blobs/x",
            "/v2/a/./b/blobs/x",
        ] {
            assert_eq!(code(bad_name), (400, "NAME_INVALID"), "{bad_name}");
        }
        for bad_tag in ["/v2/a/manifests/", "/v2/a/manifests/.x", "/v2/a/manifests/x%2Fy", "/v2/a/manifests/x/y"] {
            assert_eq!(code(bad_tag), (400, "TAG_INVALID"), "{bad_tag}");
        }
        for bad_digest in [
            "/v2/a/blobs/x",
            "/v2/a/blobs/",
            "/v2/a/blobs/sha512:abcd",
            "/v2/a/manifests/sha256:abcd",
            "/v2/a/blobs/sha256%3A2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            "/v2/a/blobs/uploads/",
        ] {
            assert_eq!(code(bad_digest), (400, "DIGEST_INVALID"), "{bad_digest}");
        }
    }

    #[test]
    fn ns_parameter() {
        assert_eq!(parse_ns(Some("ns=docker.io")).ok().as_deref(), Some("docker.io"));
        assert_eq!(parse_ns(Some("x=1&ns=127.0.0.1%3A5000")).ok().as_deref(), Some("127.0.0.1:5000"));
        for bad in [
            None,
            Some(""),
            Some("ns="),
            Some("ns=a/b"),
            Some("ns=a%2Fb"),
            Some("ns=%zz"),
            Some("ns=%+1"),
            Some("ns=a&ns=b"),
        ] {
            let err = parse_ns(bad).expect_err("refused");
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }

    #[test]
    fn registry_in_the_path_becomes_ns() {
        let rw = |p: &str, q: Option<&str>| Route::registry_in_path(p, q);
        assert_eq!(rw(&format!("/v2/quay.io/app/blobs/{D}"), None), Some(format!("/v2/app/blobs/{D}?ns=quay.io")));
        assert_eq!(
            rw("/v2/127.0.0.1:5000/a/b/manifests/v1", Some("x=1")).as_deref(),
            Some("/v2/a/b/manifests/v1?x=1&ns=127.0.0.1:5000")
        );
        assert_eq!(rw("/v2/localhost/a/manifests/v1", None).as_deref(), Some("/v2/a/manifests/v1?ns=localhost"));
        // containerd's form is left alone, as are names without a registry.
        assert_eq!(rw("/v2/quay.io/app/manifests/v1", Some("ns=docker.io")), None);
        assert_eq!(rw("/v2/library/ubuntu/manifests/v1", None), None);
        assert_eq!(rw("/v2/", None), None);
        assert_eq!(rw("/v2/quay.io/", None), None);
        assert_eq!(rw("/v2/bad..host/a/manifests/v1", None), None);
        // What the rewrite produces parses like a containerd request.
        let rewritten = rw(&format!("/v2/ghcr.io/o/r/blobs/{D}"), None).expect("rewritten");
        let (path, query) = rewritten.split_once('?').expect("query");
        let d: Digest = D.parse().expect("digest");
        assert_eq!(parse_route(path).ok(), Some(Route::Blob { name: "o/r".into(), digest: d }));
        assert_eq!(parse_ns(Some(query)).ok().as_deref(), Some("ghcr.io"));
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9"), Some(RangeSpec::FromTo(0, 9)));
        assert_eq!(parse_range("bytes=5-"), Some(RangeSpec::From(5)));
        assert_eq!(parse_range("bytes=-5"), Some(RangeSpec::Suffix(5)));
        for ignored in ["bytes=9-5", "bytes=0-1,4-5", "items=0-1", "bytes=-", "bytes=a-b", "bytes=+1-2", "bytes"] {
            assert_eq!(parse_range(ignored), None, "{ignored}");
        }
        assert_eq!(resolve_range(RangeSpec::FromTo(0, 9), 100), Some((0, 9)));
        assert_eq!(resolve_range(RangeSpec::FromTo(90, 200), 100), Some((90, 99)));
        assert_eq!(resolve_range(RangeSpec::FromTo(100, 200), 100), None);
        assert_eq!(resolve_range(RangeSpec::From(99), 100), Some((99, 99)));
        assert_eq!(resolve_range(RangeSpec::From(100), 100), None);
        assert_eq!(resolve_range(RangeSpec::Suffix(10), 100), Some((90, 99)));
        assert_eq!(resolve_range(RangeSpec::Suffix(1000), 100), Some((0, 99)));
        assert_eq!(resolve_range(RangeSpec::Suffix(0), 100), None);
        assert_eq!(resolve_range(RangeSpec::From(0), 0), None);
    }

    #[test]
    fn error_body_shape() {
        let e = ApiError::rejected(StatusCode::BAD_REQUEST, "NAME_INVALID", "bad").with_detail("x/../y");
        let v: serde_json::Value = serde_json::from_str(&e.body()).expect("json");
        assert_eq!(v["errors"][0]["code"], "NAME_INVALID");
        assert_eq!(v["errors"][0]["message"], "bad");
        assert_eq!(v["errors"][0]["detail"], "x/../y");
    }

    proptest! {
        #[test]
        fn route_parser_never_panics_and_accepts_only_grammar_names(s in "/v2/[a-z0-9./_%:-]{0,80}") {
            if let Ok(Route::Manifest { name, .. } | Route::Blob { name, .. }) = parse_route(&s) {
                prop_assert!(names::is_valid_repository(&name));
                prop_assert!(!name.contains(".."));
                prop_assert!(!name.contains('%'));
            }
        }

        #[test]
        fn range_resolution_stays_inside_the_blob(a in 0u64..200, b in 0u64..200, len in 0u64..150, kind in 0u8..3) {
            let spec = match kind { 0 => RangeSpec::FromTo(a.min(b), a.max(b)), 1 => RangeSpec::From(a), _ => RangeSpec::Suffix(a) };
            if let Some((s, e)) = resolve_range(spec, len) {
                prop_assert!(s <= e && e < len);
            }
        }

        #[test]
        fn header_parsers_never_panic(s in "\\PC{0,60}") {
            let _ = parse_range(&s);
            let _ = parse_ns(Some(&s));
            let _ = parse_route(&s);
        }
    }
}
