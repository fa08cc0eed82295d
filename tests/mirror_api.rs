//! The mirror's HTTP API, spoken to byte for byte (raw HTTP, so `..` and `%2F` reach
//! it as written), with blobs and manifests from a real `docker-registry` through
//! `UpstreamOnly`.
//!
//! Needs: docker-registry, umoci, skopeo (`apt-get install docker-registry umoci skopeo`).

mod support;

use std::collections::HashMap;

use support::http::{Canned, StaticServer, request};
use support::{Mirror, Registry, build_image, plain_http_upstream, test_dir};
use swarm_proto::Digest;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const ACCEPT_ALL: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_and_blobs_through_the_mirror() {
    support::init_tracing();
    let dir = test_dir("api");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "team/app", "v1", &[200_000, 300_000]).expect("image");
    let host = registry.host();
    let mirror = Mirror::upstream_only(plain_http_upstream(&[&host]), &dir.path().join("cache")).await.expect("mirror");
    let m = mirror.addr();
    let accept = [("Accept", ACCEPT_ALL)];

    // The version check.
    let r = request(m, "GET", "/v2/", &[]).await.expect("GET /v2/");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("docker-distribution-api-version"), Some("registry/2.0"));

    // HEAD by tag: resolved upstream, headers only.
    let by_tag = format!("/v2/team/app/manifests/v1?ns={host}");
    let r = request(m, "HEAD", &by_tag, &accept).await.expect("HEAD manifest");
    assert_eq!(r.status, 200, "{r:?}");
    let manifest_bytes = image.read_blob(&image.manifest_digest).expect("manifest bytes");
    assert_eq!(r.header("docker-content-digest"), Some(image.manifest_digest.to_string().as_str()));
    assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
    assert_eq!(r.header("content-length"), Some(manifest_bytes.len().to_string().as_str()));
    assert!(r.body.is_empty() && r.complete);

    // GET by tag: the bytes, and a cache entry named by the digest.
    let r = request(m, "GET", &by_tag, &accept).await.expect("GET manifest");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, manifest_bytes);
    assert_eq!(r.header("docker-content-digest"), Some(image.manifest_digest.to_string().as_str()));
    assert!(mirror.cache_dir().join(image.manifest_digest.hex()).is_file(), "manifest cached by digest");

    // GET by digest: served from the cache, not from the registry.
    let by_digest = format!("/v2/team/app/manifests/{}?ns={host}", image.manifest_digest);
    let registry_manifest_gets = |reg: &Registry| {
        reg.access_log()
            .iter()
            .filter(|l| l.method == "GET" && l.target.contains(&format!("/manifests/{}", image.manifest_digest)))
            .count()
    };
    let before = registry_manifest_gets(&registry);
    let r = request(m, "GET", &by_digest, &accept).await.expect("GET manifest by digest");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, manifest_bytes);
    assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
    assert_eq!(mirror.metrics().manifest_cache_hits, 1);
    assert_eq!(registry_manifest_gets(&registry), before, "a cached digest must not go upstream");
    let r = request(m, "HEAD", &by_digest, &accept).await.expect("HEAD manifest by digest");
    assert_eq!((r.status, r.header("content-length")), (200, Some(manifest_bytes.len().to_string().as_str())));

    // Blobs: whole, HEAD, ranges.
    let layer = image.layer_digests[1];
    let layer_bytes = image.read_blob(&layer).expect("layer bytes");
    let len = layer_bytes.len();
    let blob = format!("/v2/team/app/blobs/{layer}?ns={host}");
    let r = request(m, "GET", &blob, &[("Accept", "*/*")]).await.expect("GET blob");
    assert_eq!(r.status, 200);
    assert!(r.complete);
    assert_eq!(r.body, layer_bytes);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("content-length"), Some(len.to_string().as_str()));
    assert_eq!(r.header("docker-content-digest"), Some(layer.to_string().as_str()));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(registry.blob_get_count(&layer), 1);

    let r = request(m, "HEAD", &blob, &[]).await.expect("HEAD blob");
    assert_eq!((r.status, r.header("content-length")), (200, Some(len.to_string().as_str())));
    assert!(r.body.is_empty());

    for (range, from, to) in [
        ("bytes=10-19".to_string(), 10, 19),
        (format!("bytes={}-", len - 7), len - 7, len - 1),
        ("bytes=-100".to_string(), len - 100, len - 1),
        (format!("bytes=1000-{}", len + 5000), 1000, len - 1),
    ] {
        let r = request(m, "GET", &blob, &[("Range", &range)]).await.expect("ranged GET");
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(r.header("content-range"), Some(format!("bytes {from}-{to}/{len}").as_str()), "{range}");
        assert_eq!(r.body, &layer_bytes[from..=to], "{range}");
        assert!(r.complete, "{range}");
    }
    let r = request(m, "GET", &blob, &[("Range", &format!("bytes={len}-"))]).await.expect("416");
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some(format!("bytes */{len}").as_str()));

    // Unknown things are 404 with the right codes.
    let missing = Digest::of(b"no such blob");
    let r = request(m, "GET", &format!("/v2/team/app/blobs/{missing}?ns={host}"), &[]).await.expect("GET");
    assert_eq!((r.status, r.error_code().as_deref()), (404, Some("BLOB_UNKNOWN")));
    let r = request(m, "GET", &format!("/v2/team/app/manifests/nope?ns={host}"), &accept).await.expect("GET");
    assert_eq!((r.status, r.error_code().as_deref()), (404, Some("MANIFEST_UNKNOWN")));
    let r = request(m, "GET", &format!("/v2/team/app/manifests/{missing}?ns={host}"), &accept).await.expect("GET");
    assert_eq!((r.status, r.error_code().as_deref()), (404, Some("MANIFEST_UNKNOWN")));
    let r = request(m, "GET", &format!("/v2/team/other/manifests/v1?ns={host}"), &accept).await.expect("GET");
    assert_eq!(r.status, 404);

    let metrics = mirror.metrics();
    assert_eq!(metrics.requests_fallback, 0);
    assert_eq!(metrics.requests_error, 0);
    assert_eq!(metrics.requests_not_found, 4);
    assert_eq!(metrics.streams_aborted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_refused_before_going_upstream() {
    support::init_tracing();
    let dir = test_dir("invalid");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "library/ubuntu", "v1", &[1000]).expect("image");
    let host = registry.host();
    let mirror = Mirror::upstream_only(plain_http_upstream(&[&host]), &dir.path().join("cache")).await.expect("mirror");
    let m = mirror.addr();
    let log_len_before = registry.access_log().len();
    let d = image.layer_digests[0];

    let cases: Vec<(String, &str, u16, Option<&str>)> = vec![
        (format!("/v2/../manifests/v1?ns={host}"), "GET", 400, Some("NAME_INVALID")),
        (format!("/v2/library/../etc/manifests/v1?ns={host}"), "GET", 400, Some("NAME_INVALID")),
        (format!("/v2/library/../../blobs/{d}?ns={host}"), "GET", 400, Some("NAME_INVALID")),
        (format!("/v2/library%2Fubuntu/manifests/v1?ns={host}"), "GET", 400, Some("NAME_INVALID")),
        (format!("/v2/library%2fubuntu/blobs/{d}?ns={host}"), "GET", 400, Some("NAME_INVALID")),
        (format!("/v2/%2e%2e/manifests/v1?ns={host}"), "GET", 400, Some("NAME_INVALID")),
        (format!("/v2/library//ubuntu/manifests/v1?ns={host}"), "GET", 400, Some("NAME_INVALID")),
        (format!("/v2/Library/Ubuntu/manifests/v1?ns={host}"), "GET", 400, Some("NAME_INVALID")),
        (format!("/v2/{}/manifests/v1?ns={host}", "a".repeat(256)), "GET", 400, Some("NAME_INVALID")),
        (format!("/v2/library/ubuntu/blobs/sha256:abc?ns={host}"), "GET", 400, Some("DIGEST_INVALID")),
        (
            format!("/v2/library/ubuntu/blobs/{}?ns={host}", d.to_string().to_uppercase()),
            "GET",
            400,
            Some("DIGEST_INVALID"),
        ),
        (format!("/v2/library/ubuntu/blobs/sha512:{}?ns={host}", "0".repeat(128)), "GET", 400, Some("DIGEST_INVALID")),
        (format!("/v2/library/ubuntu/blobs/sha256%3A{}?ns={host}", d.hex()), "GET", 400, Some("DIGEST_INVALID")),
        (format!("/v2/library/ubuntu/manifests/sha256:zz?ns={host}"), "GET", 400, Some("DIGEST_INVALID")),
        (format!("/v2/library/ubuntu/manifests/.hidden?ns={host}"), "GET", 400, Some("TAG_INVALID")),
        (format!("/v2/library/ubuntu/manifests/{}?ns={host}", "t".repeat(129)), "GET", 400, Some("TAG_INVALID")),
        (format!("/v2/library/ubuntu/manifests/v1%2F..?ns={host}"), "GET", 400, Some("TAG_INVALID")),
        ("/v2/library/ubuntu/manifests/v1".to_string(), "GET", 400, Some("UNSUPPORTED")),
        (format!("/v2/library/ubuntu/blobs/{d}"), "HEAD", 400, None),
        (format!("/v2/library/ubuntu/blobs/{d}?ns="), "GET", 400, Some("UNSUPPORTED")),
        (format!("/v2/library/ubuntu/blobs/{d}?ns=evil.com%2Fpath"), "GET", 400, Some("UNSUPPORTED")),
        (format!("/v2/library/ubuntu/blobs/{d}?ns=a@b"), "GET", 400, Some("UNSUPPORTED")),
        (format!("/v2/library/ubuntu/blobs/{d}?ns={host}&ns=docker.io"), "GET", 400, Some("UNSUPPORTED")),
        (format!("/v2/library/ubuntu/blobs/uploads/?ns={host}"), "POST", 405, Some("UNSUPPORTED")),
        (format!("/v2/library/ubuntu/manifests/v1?ns={host}"), "PUT", 405, Some("UNSUPPORTED")),
        (format!("/v2/library/ubuntu/blobs/{d}?ns={host}"), "DELETE", 405, Some("UNSUPPORTED")),
        ("/v2/_catalog".to_string(), "GET", 404, None),
        (format!("/v2/library/ubuntu/tags/list?ns={host}"), "GET", 404, None),
        ("/".to_string(), "GET", 404, None),
    ];
    for (target, method, status, code) in &cases {
        let r = request(m, method, target, &[]).await.expect("request");
        assert_eq!(r.status, *status, "{method} {target}: {}", String::from_utf8_lossy(&r.body));
        if let Some(code) = code {
            assert_eq!(r.error_code().as_deref(), Some(*code), "{method} {target}");
            assert_eq!(r.header("content-type"), Some("application/json"), "{method} {target}");
        }
        if *status == 405 {
            assert_eq!(r.header("allow"), Some("GET, HEAD"));
        }
    }
    assert_eq!(registry.access_log().len(), log_len_before, "refused requests must not reach the registry");
    // And the valid spelling of the same request works.
    let r = request(m, "GET", &format!("/v2/library/ubuntu/blobs/{d}?ns={host}"), &[]).await.expect("GET");
    assert_eq!(r.status, 200);
    assert!(r.complete);
    assert_eq!(mirror.metrics().requests_rejected, cases.len() as u64 - 3, "404s are counted apart");
}

/// An upstream that serves bytes which do not match their digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_upstream_bytes_truncate_the_response_and_are_not_cached() {
    support::init_tracing();
    let dir = test_dir("corrupt");
    let good = vec![7u8; 300_000];
    let good_digest = Digest::of(&good);
    let mut bad = good.clone();
    bad[299_999] ^= 1;
    let bad_digest = Digest::of(b"what the bytes should have been");
    let manifest_digest = Digest::of(b"a manifest that is not served");
    let mut routes = HashMap::new();
    let blob = |bytes: &[u8]| Canned::new(200, bytes.to_vec()).header("Content-Type", "application/octet-stream");
    routes.insert(format!("/v2/x/blobs/{good_digest}"), blob(&good));
    // Same length as promised, wrong content (only the last byte differs).
    routes.insert(format!("/v2/x/blobs/{bad_digest}"), blob(&bad));
    routes.insert(
        format!("/v2/x/manifests/{manifest_digest}"),
        Canned::new(200, br#"{"schemaVersion":2,"layers":[]}"#.to_vec()).header("Content-Type", OCI_MANIFEST),
    );
    let upstream = StaticServer::start(routes).await.expect("static upstream");
    let host = upstream.host();
    let mirror = Mirror::upstream_only(plain_http_upstream(&[&host]), &dir.path().join("cache")).await.expect("mirror");
    let m = mirror.addr();

    // Control: the right bytes pass.
    let r = request(m, "GET", &format!("/v2/x/blobs/{good_digest}?ns={host}"), &[]).await.expect("GET");
    assert_eq!(r.status, 200);
    assert!(r.complete && r.body == good);

    // Wrong bytes: the headers went out, but the body is cut short.
    let r = request(m, "GET", &format!("/v2/x/blobs/{bad_digest}?ns={host}"), &[]).await.expect("GET");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("300000"));
    assert!(!r.complete, "a blob that fails verification must not arrive complete");
    assert!(r.body.len() < 300_000, "got {} bytes", r.body.len());
    assert_eq!(mirror.metrics().streams_aborted, 1);

    // A manifest whose bytes do not match its digest: the mirror sends containerd
    // upstream, and caches nothing.
    let r = request(m, "GET", &format!("/v2/x/manifests/{manifest_digest}?ns={host}"), &[]).await.expect("GET");
    assert_eq!((r.status, r.error_code().as_deref()), (503, Some("UNAVAILABLE")));
    let cached: Vec<_> = std::fs::read_dir(mirror.cache_dir())
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(cached.is_empty(), "nothing may be cached: {cached:?}");
}
