//! `swarm containerd-config` against a real containerd 1.6: the files the command
//! writes are the ones `ctr image pull --hosts-dir` reads, the mirror is tried first,
//! and containerd falls back to the registry when the mirror answers 503 or is not
//! running at all.
//!
//! Needs: containerd, docker-registry, umoci, skopeo, and root (containerd). Each test
//! has its own registry, containerd, temp dir and ports.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::http::{Canned, StaticServer};
use support::{Containerd, ImageInfo, Mirror, Registry, build_image, plain_http_upstream, test_dir};

const KIB: usize = 1024;

/// Runs `swarm containerd-config ARGS`, failing the test unless it succeeds; returns
/// its stdout.
fn containerd_config(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_swarm"))
        .arg("containerd-config")
        .args(args)
        .env_remove("SWARM_MIRROR")
        .env_remove("SWARM_REGISTRIES")
        .env_remove("SWARM_PLAIN_HTTP")
        .output()
        .expect("running swarm containerd-config");
    assert!(
        out.status.success(),
        "swarm containerd-config {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_unpacked(containerd: &Containerd, image: &ImageInfo) {
    let check = containerd.image_check(&image.reference).expect("ctr image check");
    assert!(check.complete && check.unpacked, "image not complete and unpacked: {}", check.line);
}

/// A mirror that answers 503 `UNAVAILABLE` to everything, as the agent does when it
/// cannot serve.
async fn unavailable_mirror() -> StaticServer {
    let body = r#"{"errors":[{"code":"UNAVAILABLE","message":"not here, go upstream"}]}"#;
    let always = Canned::new(503, body).header("Content-Type", "application/json");
    StaticServer::start_with_default(HashMap::new(), always).await.expect("static 503 mirror")
}

fn hosts_dir(dir: &Path) -> String {
    dir.join("hosts").to_str().expect("utf8 temp dir").to_string()
}

/// `--registry R --plain-http R`: `R/hosts.toml` (a port in the directory name, as is)
/// with the mirror first and `server = "http://R"`. Every request reaches the 503
/// mirror once, then the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_file_sends_containerd_to_the_mirror_then_the_registry() {
    support::init_tracing();
    let dir = test_dir("cc-reg");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/os", "v1", &[300 * KIB, 20 * KIB]).expect("image");
    let host = registry.host();
    let mirror = unavailable_mirror().await;
    let hosts = hosts_dir(dir.path());
    let mirror_url = format!("http://{}", mirror.addr());
    let out =
        containerd_config(&["--mirror", &mirror_url, "--registry", &host, "--plain-http", &host, "--dir", &hosts]);
    assert!(out.contains(&format!("{hosts}/{host}/hosts.toml: written")), "{out}");

    let containerd = Containerd::start(&dir.path().join("containerd")).expect("containerd");
    let started = Instant::now();
    containerd.pull(&image.reference, Path::new(&hosts)).await.expect("pull falls back to the registry");
    assert_unpacked(&containerd, &image);
    // Tag HEAD, manifest GET and one GET per blob: each tried on the mirror once.
    assert_eq!(mirror.total_hits(), 2 + image.blob_digests().len(), "the mirror is tried first for every request");
    assert!(started.elapsed() < Duration::from_secs(30), "fallback without back-off: {:?}", started.elapsed());
    for d in image.blob_digests() {
        assert_eq!(registry.blob_get_count(&d), 1, "{d} came from the registry once");
    }
}

/// The same file with the real mirror in front: containerd takes every blob from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_file_pulls_through_a_working_mirror() {
    support::init_tracing();
    let dir = test_dir("cc-ok");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/os", "v1", &[512 * KIB, 20 * KIB]).expect("image");
    let host = registry.host();
    let mirror = Mirror::upstream_only(plain_http_upstream(&[&host]), &dir.path().join("cache")).await.expect("mirror");
    let hosts = hosts_dir(dir.path());
    containerd_config(&["--mirror", &mirror.url(), "--registry", &host, "--plain-http", &host, "--dir", &hosts]);

    let containerd = Containerd::start(&dir.path().join("containerd")).expect("containerd");
    containerd.pull(&image.reference, Path::new(&hosts)).await.expect("pull through the mirror");
    assert_unpacked(&containerd, &image);
    let m = mirror.metrics();
    assert_eq!(m.requests_fallback, 0, "{m:?}");
    assert_eq!(m.bytes_served, image.total_bytes, "every blob byte came through the mirror: {m:?}");
}

/// No `--registry`: `_default/hosts.toml` without `server`. containerd 1.6 uses it for
/// a registry with no directory of its own, tries the mirror first and then the
/// registry's default endpoint (http here, from `ctr --plain-http`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_file_applies_to_every_registry() {
    support::init_tracing();
    let dir = test_dir("cc-def");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/os", "v1", &[300 * KIB, 20 * KIB]).expect("image");
    let mirror = unavailable_mirror().await;
    let hosts = hosts_dir(dir.path());
    let mirror_url = format!("http://{}", mirror.addr());
    let out = containerd_config(&["--mirror", &mirror_url, "--dir", &hosts]);
    assert!(out.contains("_default/hosts.toml: written"), "{out}");

    let containerd = Containerd::start(&dir.path().join("containerd")).expect("containerd");
    containerd.pull(&image.reference, Path::new(&hosts)).await.expect("pull falls back to the registry");
    assert_unpacked(&containerd, &image);
    assert_eq!(mirror.total_hits(), 2 + image.blob_digests().len(), "_default was read and the mirror tried first");
}

/// The agent is not running (nothing listens on the mirror port): containerd's
/// connection is refused and it goes on to the registry at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_falls_back_when_the_agent_is_down() {
    support::init_tracing();
    let dir = test_dir("cc-down");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/os", "v1", &[300 * KIB, 20 * KIB]).expect("image");
    let host = registry.host();
    let hosts = hosts_dir(dir.path());
    let dead = format!("http://127.0.0.1:{}", support::free_port());
    containerd_config(&["--mirror", &dead, "--registry", &host, "--plain-http", &host, "--dir", &hosts]);

    let containerd = Containerd::start(&dir.path().join("containerd")).expect("containerd");
    let started = Instant::now();
    containerd.pull(&image.reference, Path::new(&hosts)).await.expect("pull with the agent down");
    let took = started.elapsed();
    eprintln!("pull with the mirror down took {took:?}");
    assert_unpacked(&containerd, &image);
    assert!(took < Duration::from_secs(30), "no long timeout on a refused connection: {took:?}");
}

/// Why the command warns about `host_port_` directories: containerd 1.6 looks for
/// `HOST_PORT_` before `HOST:PORT`, and an existing one (even without a
/// `hosts.toml`) hides ours, so the mirror is never asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_port_underscore_directory_shadows_the_file() {
    support::init_tracing();
    let dir = test_dir("cc-shadow");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/os", "v1", &[100 * KIB]).expect("image");
    let host = registry.host();
    let mirror = unavailable_mirror().await;
    let hosts = hosts_dir(dir.path());
    let (ip, port) = host.rsplit_once(':').expect("host:port");
    std::fs::create_dir_all(Path::new(&hosts).join(format!("{ip}_{port}_"))).expect("mkdir");
    let mirror_url = format!("http://{}", mirror.addr());
    let out = Command::new(env!("CARGO_BIN_EXE_swarm"))
        .args(["containerd-config", "--mirror", &mirror_url, "--registry", &host, "--plain-http", &host])
        .args(["--dir", &hosts])
        .output()
        .expect("running swarm containerd-config");
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{ip}_{port}_ exists")), "{stderr}");

    let containerd = Containerd::start(&dir.path().join("containerd")).expect("containerd");
    containerd.pull(&image.reference, Path::new(&hosts)).await.expect("pull straight from the registry");
    assert_eq!(mirror.total_hits(), 0, "containerd read {ip}_{port}_, not {host}");
}

/// `_default` with the real mirror: containerd still sends `?ns=<registry>` (which the
/// mirror needs to know the upstream), so every blob comes through the mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_file_pulls_through_a_working_mirror() {
    support::init_tracing();
    let dir = test_dir("cc-defok");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/os", "v1", &[512 * KIB, 20 * KIB]).expect("image");
    let host = registry.host();
    let mirror = Mirror::upstream_only(plain_http_upstream(&[&host]), &dir.path().join("cache")).await.expect("mirror");
    let hosts = hosts_dir(dir.path());
    containerd_config(&["--mirror", &mirror.url(), "--dir", &hosts]);

    let containerd = Containerd::start(&dir.path().join("containerd")).expect("containerd");
    containerd.pull(&image.reference, Path::new(&hosts)).await.expect("pull through the mirror");
    assert_unpacked(&containerd, &image);
    let m = mirror.metrics();
    assert_eq!(m.requests_rejected, 0, "containerd sent ?ns= for a _default host: {m:?}");
    assert_eq!(m.bytes_served, image.total_bytes, "every blob byte came through the mirror: {m:?}");
}
