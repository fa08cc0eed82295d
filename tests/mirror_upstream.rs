//! The upstream registry client against a real `docker-registry`: manifests, HEADs,
//! blob lengths, ranged blob reads, 404s, and HTTP basic auth (htpasswd).
//!
//! Needs: docker-registry, umoci, skopeo, python3 (`apt-get install docker-registry
//! umoci skopeo python3`).

mod support;

use support::http::request;
use support::{Mirror, Registry, build_image, plain_http_upstream, test_dir};
use swarm_peer::upstream::{RegistryConfig, UpstreamBlob, UpstreamClient, UpstreamError};
use swarm_proto::Digest;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

async fn collect(mut blob: UpstreamBlob) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = blob.next_chunk().await {
        out.extend_from_slice(&chunk.expect("blob chunk"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_against_docker_registry() {
    support::init_tracing();
    let dir = test_dir("upstream");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "lib/base", "1.0", &[150_000]).expect("image");
    let host = registry.host();
    let client = UpstreamClient::new(plain_http_upstream(&[&host])).expect("client");
    let manifest_bytes = image.read_blob(&image.manifest_digest).expect("manifest");

    let m = client.manifest(&host, "lib/base", "1.0", "").await.expect("manifest by tag");
    assert_eq!(m.digest, image.manifest_digest);
    assert_eq!(m.media_type, OCI_MANIFEST);
    assert_eq!(m.bytes.as_ref(), manifest_bytes.as_slice());
    let m = client.manifest(&host, "lib/base", &image.manifest_digest.to_string(), "").await.expect("by digest");
    assert_eq!(m.bytes.as_ref(), manifest_bytes.as_slice());
    let head = client.head_manifest(&host, "lib/base", "1.0", OCI_MANIFEST).await.expect("head");
    assert_eq!(
        (head.digest, head.media_type.as_str(), head.length),
        (image.manifest_digest, OCI_MANIFEST, manifest_bytes.len() as u64)
    );

    let layer = image.layer_digests[0];
    let bytes = image.read_blob(&layer).expect("layer");
    let len = bytes.len() as u64;
    assert_eq!(client.blob_length(&host, "lib/base", &layer).await.expect("blob length"), len);
    for offset in [0, 1, 65_536, len - 1, len] {
        let blob = client.blob(&host, "lib/base", &layer, offset).await.expect("blob");
        assert_eq!(blob.total_length, len);
        assert_eq!(collect(blob).await, &bytes[offset as usize..], "offset {offset}");
    }
    // The registry answered the ranged reads with 206 (no skipping on our side).
    let partial = registry.access_log().iter().filter(|l| l.method == "GET" && l.status == 206).count();
    assert_eq!(partial, 3, "{:?}", registry.access_log());

    let err = client.manifest(&host, "lib/base", "2.0", "").await.expect_err("unknown tag");
    assert!(err.is_not_found(), "{err:?}");
    let err = client.manifest(&host, "lib/nothing", "1.0", "").await.expect_err("unknown repository");
    assert!(err.is_not_found(), "{err:?}");
    let err = client.blob_length(&host, "lib/base", &Digest::of(b"none")).await.expect_err("unknown blob");
    assert!(err.is_not_found(), "{err:?}");
    let err = client.blob(&host, "lib/base", &Digest::of(b"none"), 0).await.expect_err("unknown blob");
    assert!(err.is_not_found(), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_against_docker_registry() {
    support::init_tracing();
    let dir = test_dir("upstream-auth");
    let registry = Registry::start_with_basic_auth(&dir.path().join("registry"), "swarm", "pa55").expect("registry");
    let image = build_image(&registry, "private/app", "v2", &[20_000]).expect("image");
    let host = registry.host();
    let with = |username: &str, password: &str| {
        let mut config = plain_http_upstream(&[&host]);
        config.registries.insert(
            host.clone(),
            RegistryConfig {
                username: Some(username.into()),
                password: Some(password.into()),
                ..RegistryConfig::default()
            },
        );
        UpstreamClient::new(config).expect("client")
    };

    let good = with("swarm", "pa55");
    let m = good.manifest(&host, "private/app", "v2", "").await.expect("manifest with credentials");
    assert_eq!(m.digest, image.manifest_digest);
    let layer = image.layer_digests[0];
    let blob = good.blob(&host, "private/app", &layer, 0).await.expect("blob with credentials");
    assert_eq!(collect(blob).await, image.read_blob(&layer).expect("layer"));

    for client in [with("swarm", "wrong"), UpstreamClient::new(plain_http_upstream(&[&host])).expect("client")] {
        let err = client.manifest(&host, "private/app", "v2", "").await.expect_err("refused");
        assert!(matches!(err, UpstreamError::Unauthorized { ref registry } if *registry == host), "{err:?}");
    }

    // A mirror without credentials: the registry refuses it, so it sends containerd
    // (which has its own credentials) upstream with the fallback status.
    let mirror = Mirror::upstream_only(plain_http_upstream(&[&host]), &dir.path().join("cache")).await.expect("mirror");
    for (method, target) in [
        ("HEAD", format!("/v2/private/app/manifests/v2?ns={host}")),
        ("GET", format!("/v2/private/app/manifests/{}?ns={host}", image.manifest_digest)),
        ("GET", format!("/v2/private/app/blobs/{layer}?ns={host}")),
    ] {
        let r = request(mirror.addr(), method, &target, &[]).await.expect("request");
        assert_eq!(r.status, 503, "{method} {target}");
    }
    assert_eq!(mirror.metrics().requests_fallback, 3);
}
