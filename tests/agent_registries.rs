//! Registries as users configure them, through real `swarm agent` processes:
//!
//! - a private `docker-registry` (htpasswd auth) whose credentials the agent reads from
//!   k3s's `registries.yaml` (`--k3s-registries`), pulled by real containerd;
//! - skopeo (containers/image, what CRI-O and podman use) with a `registries.conf`
//!   mirror entry `location = "127.0.0.1:PORT/REGISTRY"`, which names the registry in
//!   the request path instead of `?ns=`.
//!
//! In both, the agent's store must hold every blob afterwards: a client that silently
//! fell back to the registry would pass a pull-only check.
//!
//! Needs: containerd, docker-registry, umoci, skopeo, python3, and root (containerd).

mod support;

use std::ffi::OsString;
use std::process::Command;
use std::time::Duration;

use support::agents::Cluster;
use support::process::{require_tool, run};
use support::{Containerd, Registry, build_image, test_dir, write_hosts_toml};

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_a_private_image_with_credentials_from_registries_yaml() {
    let dir = test_dir("k3s-auth");
    let registry =
        Registry::start_with_basic_auth(&dir.path().join("registry"), "kairos", "s3cret-pw").expect("registry");
    let image = build_image(&registry, "private/os", "v1", &[3 * MIB, 200 * 1024]).expect("image");
    let host = registry.host();
    let yaml = dir.path().join("registries.yaml");
    // What a k3s user writes: the agent first (it must never be used as an upstream),
    // the registry itself second, and its credentials under configs.
    let cluster = Cluster::start_with(&dir.path().join("swarm"), 1, &[], |_, mirror| {
        std::fs::write(
            &yaml,
            format!(
                "mirrors:\n  \"{host}\":\n    endpoint:\n      - \"http://{mirror}\"\n      - \"http://{host}\"\n\
                 configs:\n  \"{host}\":\n    auth:\n      username: kairos\n      password: s3cret-pw\n"
            ),
        )
        .expect("registries.yaml");
        vec![OsString::from("--k3s-registries"), yaml.clone().into_os_string()]
    })
    .expect("cluster");
    let agent = &cluster.agents[0];
    let containerd = Containerd::start(&dir.path().join("containerd")).expect("containerd");
    let hosts = dir.path().join("hosts");
    // containerd itself has no credentials: had the agent fallen back, the registry
    // would have refused containerd.
    write_hosts_toml(&hosts, &host, &agent.mirror_url()).expect("hosts.toml");
    containerd
        .pull(&image.reference, &hosts)
        .await
        .unwrap_or_else(|e| panic!("pull through the agent failed: {e:#}\n{}", cluster.logs()));
    let check = containerd.image_check(&image.reference).expect("check");
    assert!(check.complete && check.unpacked, "{}", check.line);
    for d in image.blob_digests() {
        assert!(agent.stores_blob(&d), "the agent's store lacks {d}\n{}", cluster.logs());
        assert_eq!(registry.blob_get_count(&d), 1, "{d} fetched once, by the agent");
    }
    let fallback = agent.metric("swarm_mirror_requests_total{outcome=\"fallback\"}").await.expect("metric");
    assert_eq!(fallback, 0, "{}", cluster.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_through_the_agent_with_the_registry_in_the_path() {
    let dir = test_dir("skopeo");
    let skopeo = require_tool("skopeo", "skopeo");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "apps/web", "v3", &[2 * MIB, 100 * 1024]).expect("image");
    let host = registry.host();
    // A reference cannot put `host:port` in a path component, so the loopback registry
    // goes by a port-less name, as quay.io would; the agent's config file says where
    // that name lives.
    let name = "registry.example";
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, format!("[upstream.registries.\"{name}\"]\nendpoint = \"http://{host}\"\n"))
        .expect("agent.toml");
    let cluster = Cluster::start_with(&dir.path().join("swarm"), 1, &[], |_, _| {
        vec![OsString::from("--config"), config.clone().into_os_string()]
    })
    .expect("cluster");
    let agent = &cluster.agents[0];
    // The registries.conf docs/operations.md gives for CRI-O and podman.
    let conf = dir.path().join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "[[registry]]\nprefix = \"{name}\"\nlocation = \"{host}\"\ninsecure = true\n\n\
             [[registry.mirror]]\nlocation = \"{mirror}/{name}\"\ninsecure = true\n",
            mirror = agent.mirror
        ),
    )
    .expect("registries.conf");
    let out = dir.path().join("out");
    let mut cmd = Command::new(skopeo);
    cmd.arg("--registries-conf")
        .arg(&conf)
        .args(["copy", &format!("docker://{name}/{}:{}", image.name, image.tag)])
        .arg(format!("dir:{}", out.display()));
    run(cmd, Duration::from_secs(120)).unwrap_or_else(|e| panic!("skopeo copy: {e:#}\n{}", cluster.logs()));
    for d in image.blob_digests() {
        assert!(out.join(d.hex()).exists(), "skopeo did not write {d}");
        assert!(agent.stores_blob(&d), "{d} did not come through the agent\n{}", cluster.logs());
        assert_eq!(registry.blob_get_count(&d), 1, "{d} fetched once, by the agent");
    }
    let rejected = agent.metric("swarm_mirror_requests_total{outcome=\"rejected\"}").await.expect("metric");
    assert_eq!(rejected, 0, "no request was refused\n{}", cluster.logs());
}

/// The registry serves https with a certificate from a private CA and wants a
/// password: the agent gets the CA (`tls.ca_file`) and the credentials (`auth`, base64
/// of `user:password`) from registries.yaml. containerd has neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_from_an_https_registry_with_a_private_ca_from_registries_yaml() {
    let dir = test_dir("k3s-tls");
    let (registry, ca) =
        Registry::start_with_tls_and_basic_auth(&dir.path().join("registry"), "kairos", "tls-pw").expect("registry");
    let image = build_image(&registry, "private/tls", "v1", &[MIB, 100 * 1024]).expect("image");
    let host = registry.host();
    let yaml = dir.path().join("registries.yaml");
    let cluster = Cluster::start_with(&dir.path().join("swarm"), 1, &[], |_, mirror| {
        std::fs::write(
            &yaml,
            format!(
                "mirrors:\n  \"{host}\":\n    endpoint: [\"http://{mirror}\"]\n\
                 configs:\n  \"{host}\":\n    auth:\n      auth: a2Fpcm9zOnRscy1wdw==  # kairos:tls-pw\n    \
                 tls:\n      ca_file: {ca}\n",
                ca = ca.display()
            ),
        )
        .expect("registries.yaml");
        vec![OsString::from("--k3s-registries"), yaml.clone().into_os_string()]
    })
    .expect("cluster");
    let agent = &cluster.agents[0];
    let containerd = Containerd::start(&dir.path().join("containerd")).expect("containerd");
    let hosts = dir.path().join("hosts");
    write_hosts_toml(&hosts, &host, &agent.mirror_url()).expect("hosts.toml");
    containerd
        .pull(&image.reference, &hosts)
        .await
        .unwrap_or_else(|e| panic!("pull through the agent failed: {e:#}\n{}", cluster.logs()));
    for d in image.blob_digests() {
        assert!(agent.stores_blob(&d), "the agent's store lacks {d}\n{}", cluster.logs());
    }
    let fallback = agent.metric("swarm_mirror_requests_total{outcome=\"fallback\"}").await.expect("metric");
    assert_eq!(fallback, 0, "{}", cluster.logs());
}
