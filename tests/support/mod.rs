//! Shared harness for end-to-end tests: real processes on 127.0.0.1 with free ports,
//! killed on drop, every wait bounded, errors that say what went wrong.
//!
//! - [`Registry`]: Debian's `docker-registry`, with its access log
//!   ([`Registry::blob_get_count`]).
//! - [`build_image`]: an image of random layers built offline with `umoci`, pushed
//!   with `skopeo`.
//! - [`Containerd`]: containerd 1.6 under a temp dir, pulled through with `ctr`
//!   ([`Containerd::pull`], [`Containerd::image_check`]); [`write_hosts_toml`] points
//!   it at a mirror.
//! - [`Mirror`]: the swarm mirror in-process.
//! - [`http`]: a raw HTTP client (no URL normalisation, detects truncated bodies) and
//!   a static server.
//! - [`throttle::throttled_proxy`]: a rate-capped TCP relay that counts its bytes (a
//!   slow uplink in front of the registry); [`throttle::throttled_proxy_logged`] also
//!   logs when each chunk crossed it, for peak rates over 1 s windows.
//! - [`FlakyProxy`]: an unreliable uplink (rate cap, resets, outages) in front of a
//!   registry, counting the bytes it sends.
//! - [`silent_peer::SilentPeer`]: a peer with the real token that announces a whole
//!   blob, handshakes, sends a full bitfield and never answers a piece request.
//! - [`flood`]: garbage datagrams, handshake floods and abusive HTTP at real
//!   processes, and their memory (`/proc/<pid>/status`) and log lines.
//! - [`require_tool`]: fail (never skip) with the package to install.
//!
//! Use it with `mod support;` from a file in `tests/`. Each test should take its own
//! [`test_dir`]; nothing here uses fixed ports or shared paths, so tests can run in
//! parallel.

#![allow(dead_code, unused_imports)]

pub mod agents;
pub mod containerd;
pub mod flood;
pub mod http;
pub mod image;
pub mod mirror;
pub mod process;
pub mod proxy;
pub mod registry;
pub mod silent_peer;
pub mod throttle;

pub use containerd::{Containerd, ImageCheck, write_direct_hosts_toml, write_hosts_toml};
pub use image::{ImageInfo, build_image};
pub use mirror::{Mirror, plain_http_upstream, redirected_upstream};
pub use process::{ChildGuard, free_port, require_tool};
pub use proxy::FlakyProxy;
pub use registry::Registry;

/// A fresh temp dir with a short path (containerd's socket lives in it), removed on
/// drop.
pub fn test_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("sw-{name}-")).tempdir_in("/tmp").expect("creating a temp dir in /tmp")
}

/// Initialises tracing output for a test (once per process; `RUST_LOG` filters).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `check` every 100 ms until it holds; panics with `what` after `limit`.
pub async fn eventually(what: &str, limit: std::time::Duration, mut check: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
