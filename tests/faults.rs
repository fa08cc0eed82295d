//! Faults, end to end with real processes: a `swarm tracker`, `swarm agent`s, a real
//! `docker-registry` upstream and, where containerd is involved, a real containerd
//! pulling through an agent. Every fault must end in a correct image or a clear
//! error; `docs/reliability.md` lists each test with what it shows.
//!
//! Blobs are 8-24 MiB (256 KiB pieces) so the whole file stays within a few minutes.
//!
//! Needs: containerd, docker-registry, umoci, skopeo, and root (containerd, mount).

mod support;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::agents::{Agent, Cluster};
use support::process::run;
use support::throttle::throttled_proxy;
use support::{Containerd, Registry, build_image, eventually, test_dir, write_hosts_toml};
use swarm_proto::{Digest, Layout, piece_length_for};

const MIB: usize = 1024 * 1024;

/// `GET` of a blob through `agent`'s mirror, with `headers`.
async fn get(
    agent: &Agent,
    name: &str,
    ns: &str,
    digest: &Digest,
    headers: &[(&str, &str)],
) -> support::http::RawResponse {
    let target = format!("/v2/{name}/blobs/{digest}?ns={ns}");
    support::http::request_within(agent.mirror, "GET", &target, headers, Duration::from_secs(60))
        .await
        .expect("mirror GET")
}

/// The blob's layout as every node computes it.
fn layout_of(digest: Digest, length: usize) -> Layout {
    Layout { digest, length: length as u64, piece_length: piece_length_for(length as u64) }
}

/// Flips `len` bytes of piece `piece` of the blob `agent` stores.
fn rot_piece(agent: &Agent, layout: &Layout, piece: u32) {
    let path = agent.data_dir.join("blobs").join(layout.digest.hex()).join("data");
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open the stored blob");
    let at = layout.piece_offset(piece) + 1000;
    let mut bytes = [0u8; 16];
    file.read_exact_at(&mut bytes, at).expect("read");
    for b in &mut bytes {
        *b ^= 0xA5;
    }
    file.write_all_at(&bytes, at).expect("rot the piece");
    file.sync_all().expect("sync");
}

/// The agent whose upstream counter reached `at_least` bytes, if any.
async fn upstream_holder(cluster: &Cluster, at_least: u64) -> Option<usize> {
    for (i, a) in cluster.agents.iter().enumerate() {
        if a.metric("swarm_upstream_bytes_total").await.unwrap_or(0) >= at_least {
            return Some(i);
        }
    }
    None
}

// 1 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_killed_mid_transfer_the_others_complete_from_the_rest() {
    let dir = test_dir("faults-kill");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/kill", "v1", &[16 * MIB]).expect("image");
    let layer = image.layer_digests[0];
    let want = image.read_blob(&layer).expect("layer bytes");
    let sent = Arc::new(AtomicU64::new(0));
    // 4 MB/s: the layer takes about 4 s from upstream.
    let proxy = throttled_proxy(registry.addr(), 4_000_000, sent.clone()).await;
    let ns = proxy.to_string();
    let mut cluster = Cluster::start(&dir.path().join("swarm"), 4, &[&ns]).expect("cluster");
    let target = format!("/v2/{}/blobs/{layer}?ns={ns}", image.name);
    let gets = cluster.get_everywhere(&target);
    // Once the lease holder has a third, kill a peer that is not the lease holder
    // and has already passed pieces on to others.
    let started = Instant::now();
    let (holder, victim) = loop {
        assert!(started.elapsed() < Duration::from_secs(30), "no peer traded pieces\n{}", cluster.logs());
        if let Some(h) = upstream_holder(&cluster, want.len() as u64 / 3).await {
            let mut victim = None;
            for (i, a) in cluster.agents.iter().enumerate() {
                if i != h && a.metric("swarm_peer_sent_bytes_total").await.unwrap_or(0) > 0 {
                    victim = Some(i);
                }
            }
            if let Some(v) = victim {
                break (h, v);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let victim_sent = cluster.agents[victim].metric("swarm_peer_sent_bytes_total").await.unwrap_or(0);
    cluster.agents[victim].child.kill();
    eprintln!(
        "killed agent {victim} (not the lease holder {holder}) after {:?}, when it had sent {victim_sent} bytes to peers",
        started.elapsed()
    );
    for (i, g) in gets.into_iter().enumerate() {
        let r = g.await.expect("join");
        if i == victim {
            continue;
        }
        let r = r.unwrap_or_else(|e| panic!("agent {i}: {e:#}\n{}", cluster.logs()));
        assert_eq!(r.status, 200, "agent {i}");
        assert!(r.complete && r.body == want, "agent {i}: wrong or truncated bytes\n{}", cluster.logs());
    }
    let took = started.elapsed();
    let uplink = sent.load(Ordering::Relaxed) as f64 / want.len() as f64;
    eprintln!("the others completed {took:?} after the start; the uplink carried {uplink:.2} copies");
    assert!(uplink <= 1.05, "the uplink carried {uplink:.2} copies: the survivors went upstream again");
    for (i, a) in cluster.agents.iter().enumerate() {
        if i != victim {
            assert!(a.stores_blob(&layer), "agent {i} does not hold a byte-identical copy");
        }
    }
}

// 2 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_piece_rotted_on_disk_is_never_served_the_receiver_gets_it_elsewhere_and_the_node_heals() {
    let dir = test_dir("faults-rot");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/rot", "v1", &[16 * MIB]).expect("image");
    let layer = image.layer_digests[0];
    let want = image.read_blob(&layer).expect("layer bytes");
    let layout = layout_of(layer, want.len());
    let host = registry.host();
    let cluster = Cluster::start_with(&dir.path().join("swarm"), 3, &[&host], |_, _| {
        ["--containerd-root", "none"].map(Into::into).to_vec()
    })
    .expect("cluster");
    // Agents 0 and 1 hold the blob, verified.
    for i in [0, 1] {
        let r = get(&cluster.agents[i], &image.name, &host, &layer, &[]).await;
        assert!(r.status == 200 && r.body == want, "agent {i}\n{}", cluster.logs());
    }
    eventually("both copies persisted", Duration::from_secs(10), || {
        [0, 1].iter().all(|&i| cluster.agents[i].data_dir.join("blobs").join(layer.hex()).join("complete").exists())
    })
    .await;
    // Every other piece of agent 0's copy rots: agent 2 will ask it for some.
    let pieces = layout.piece_count();
    for p in (0..pieces).step_by(2) {
        rot_piece(&cluster.agents[0], &layout, p);
    }
    assert!(!cluster.agents[0].stores_blob(&layer), "the copy did not rot");
    let r = get(&cluster.agents[2], &image.name, &host, &layer, &[]).await;
    assert_eq!(r.status, 200, "{}", cluster.logs());
    assert!(r.complete && r.body == want, "agent 2 got wrong bytes\n{}", cluster.logs());
    assert_eq!(
        cluster.agents[2].metric("swarm_pieces_failed_total").await.unwrap_or(0),
        0,
        "a rotted piece reached agent 2 as if it were good\n{}",
        cluster.logs()
    );
    let log0 = cluster.agents[0].child.stderr_text();
    assert!(
        log0.contains("no longer matches its hash"),
        "agent 0 never noticed a rotted piece (agent 2 may not have asked it)\n{}",
        cluster.logs()
    );
    // Agent 0 drops what rotted and fetches it again from its peers.
    let started = Instant::now();
    eventually("agent 0 heals its copy", Duration::from_secs(30), || cluster.agents[0].stores_blob(&layer)).await;
    eprintln!("agent 0 healed in {:?}", started.elapsed());
    assert_eq!(registry.blob_get_count(&layer), 1, "nobody went upstream again\n{}", cluster.logs());
    let r = get(&cluster.agents[0], &image.name, &host, &layer, &[]).await;
    assert!(r.status == 200 && r.complete && r.body == want, "agent 0 serves its healed copy\n{}", cluster.logs());
}

// 3, 9 ------------------------------------------------------------------------

/// Unmounts a tmpfs when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).expect("mkdir");
        let mut mount = Command::new("mount");
        mount.args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(path);
        run(mount, Duration::from_secs(10)).expect("mount a tmpfs (the test must run as root)");
        Self(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_full_while_storing_logs_a_clear_error_containerd_falls_back_and_the_agent_recovers() {
    let dir = test_dir("faults-full");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/full", "v1", &[24 * MIB]).expect("image");
    let layer = image.layer_digests[0];
    let want = image.read_blob(&layer).expect("layer bytes");
    let sent = Arc::new(AtomicU64::new(0));
    let proxy = throttled_proxy(registry.addr(), 4_000_000, sent.clone()).await;
    let ns = proxy.to_string();
    let swarm = dir.path().join("swarm");
    let data = swarm.join("agent-0");
    let _tmpfs = Tmpfs::mount(&data, "32m");
    // The budget is not what stops it here: the disk is.
    let cluster = Cluster::start_with(&swarm, 1, &[&ns], |_, _| {
        ["--containerd-root", "none", "--cache-size", "1GiB"].map(Into::into).to_vec()
    })
    .expect("cluster");
    let containerd = Containerd::start(&dir.path().join("ctd")).expect("containerd");
    let hosts = dir.path().join("hosts");
    write_hosts_toml(&hosts, &ns, &cluster.agents[0].mirror_url()).expect("hosts.toml");
    let reference = image.reference.replace(&registry.host(), &ns);
    let pull = {
        let (hosts, reference) = (hosts.clone(), reference.clone());
        let c = Arc::new(containerd);
        let c2 = c.clone();
        (c, tokio::spawn(async move { c2.pull(&reference, &hosts).await }))
    };
    // Another program fills the disk while the agent stores the layer.
    eventually("the agent is storing the layer", Duration::from_secs(30), || {
        std::fs::metadata(data.join("blobs").join(layer.hex()).join("data")).is_ok()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let filler = data.join("filler");
    let mut chunk = vec![0x11u8; MIB];
    let mut filled = 0;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        while f.write_all(&chunk).is_ok() {
            filled += chunk.len();
            chunk[0] = chunk[0].wrapping_add(1);
        }
    }
    eprintln!("filled the tmpfs with {} MiB", filled / MIB);
    let (containerd, pull) = pull;
    let took =
        pull.await.expect("join").unwrap_or_else(|e| panic!("containerd's pull failed: {e:#}\n{}", cluster.logs()));
    let check = containerd.image_check(&reference).expect("check");
    assert!(check.complete && check.unpacked, "{}", check.line);
    eprintln!("containerd pulled in {took:?} with the agent's disk full");
    let log = cluster.agents[0].child.stderr_text();
    assert!(log.contains("No space left on device"), "no clear disk-full error in the log\n{log}");
    // No piece that did not make it to disk is claimed: nothing complete is left.
    let blob_dir = data.join("blobs").join(layer.hex());
    assert!(!blob_dir.join("complete").exists(), "a blob that could not be stored is marked complete");
    // Space returns: once the tracker's memory of the failed fetch (10 s) is over,
    // a request goes through the agent again and is served whole.
    std::fs::remove_file(&filler).expect("free the space");
    let freed = Instant::now();
    let r = loop {
        let r = get(&cluster.agents[0], &image.name, &ns, &layer, &[]).await;
        if r.status != 503 || freed.elapsed() > Duration::from_secs(30) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("the agent served the layer {:?} after space returned", freed.elapsed());
    assert_eq!(r.status, 200, "{}", cluster.logs());
    assert!(r.complete && r.body == want, "the agent serves the layer once space returns\n{}", cluster.logs());
    assert!(cluster.agents[0].stores_blob(&layer), "the agent holds the layer now");
}

// 4 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_accepts_requests_and_never_answers_does_not_hold_the_download_back() {
    let dir = test_dir("faults-silent");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    // Two layers of one size: one pulled undisturbed, one with the silent peer.
    let image = build_image(&registry, "edge/silent", "v1", &[16 * MIB, 16 * MIB]).expect("image");
    let (calm, silent) = (image.layer_digests[0], image.layer_digests[1]);
    let host = registry.host();
    // Agent 0 holds both layers and uploads at 10 Mbit/s: a pull takes about 13 s,
    // longer than a request timeout (10 s), so the silent peer's first requests can
    // time out before the endgame would take them over; and the pull measures the
    // link rather than which process wins the 2 cores.
    let cluster = Cluster::start_with(&dir.path().join("swarm"), 2, &[&host], |i, _| {
        let mut args: Vec<std::ffi::OsString> = ["--containerd-root", "none"].map(Into::into).to_vec();
        if i == 0 {
            args.extend(["--upload-rate", "10Mbit/s"].map(Into::into));
        }
        args
    })
    .expect("cluster");
    let mut want = Vec::new();
    for layer in [calm, silent] {
        let bytes = image.read_blob(&layer).expect("layer bytes");
        let r = get(&cluster.agents[0], &image.name, &host, &layer, &[]).await;
        assert!(r.status == 200 && r.body == bytes, "agent 0\n{}", cluster.logs());
        want.push(bytes);
    }
    // Agent 1 pulls the first layer from agent 0 alone.
    let started = Instant::now();
    let r = get(&cluster.agents[1], &image.name, &host, &calm, &[]).await;
    let undisturbed = started.elapsed();
    assert!(r.status == 200 && r.complete && r.body == want[0], "undisturbed pull\n{}", cluster.logs());
    // The silent peer announces the second layer whole; agent 1 pulls it from both.
    let peer = support::silent_peer::SilentPeer::start(&cluster.token_file, cluster.tracker_addr, silent)
        .await
        .expect("the silent peer");
    let started = Instant::now();
    let r = get(&cluster.agents[1], &image.name, &host, &silent, &[]).await;
    let disturbed = started.elapsed();
    assert!(r.status == 200 && r.complete && r.body == want[1], "pull beside the silent peer\n{}", cluster.logs());
    let requests = peer.requests();
    let timeout = swarm_peer::scheduler::SchedulerConfig::default().request_timeout;
    let given_up = peer.given_up();
    // Measured here from when the request arrived, so a timeout reads a little under
    // the requester's 10 s; the endgame, which starts near the pull's end, stops the rest.
    let timed_out = given_up.iter().filter(|&&w| w >= timeout.mul_f64(0.95)).count();
    eprintln!(
        "16 MiB layer ({} pieces) from a 10 Mbit/s holder: undisturbed {undisturbed:.2?}, beside the silent peer \
         {disturbed:.2?} ({:+.2} s); the silent peer was sent {requests} requests; the puller gave up on {} of \
         them, {timed_out} at the request timeout ({timeout:?}), the others when another copy won, after {:.2?}",
        layout_of(silent, want[1].len()).piece_count(),
        disturbed.as_secs_f64() - undisturbed.as_secs_f64(),
        given_up.len(),
        given_up,
    );
    assert!(
        requests > 0,
        "the silent peer was never asked for a piece: the test shows nothing\nits connections: {:?}\n{}",
        peer.closes(),
        cluster.logs()
    );
    // The pull lasts longer than a request timeout and its endgame comes after it, so
    // the requests sent to the silent peer at the start must have timed out.
    assert!(timed_out > 0, "no request to the silent peer timed out: {given_up:?}\n{}", cluster.logs());
    // Waiting for the silent peer would never end; a stall on its requests until they
    // time out costs one request timeout.
    assert!(
        disturbed <= undisturbed + timeout + Duration::from_secs(2),
        "the pull took {disturbed:?} beside the silent peer, {undisturbed:?} without\n{}",
        cluster.logs()
    );
    for layer in [calm, silent] {
        assert_eq!(registry.blob_get_count(&layer), 1, "agent 1 went upstream for {layer}\n{}", cluster.logs());
    }
    assert!(cluster.agents[1].stores_blob(&silent), "agent 1 holds a byte-identical copy");
}

// 5 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_requests_for_one_blob_one_upstream_download_fifty_correct_answers() {
    let dir = test_dir("faults-fifty");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/fifty", "v1", &[16 * MIB]).expect("image");
    let layer = image.layer_digests[0];
    let want = Arc::new(image.read_blob(&layer).expect("layer bytes"));
    let sent = Arc::new(AtomicU64::new(0));
    // 16 MB/s: the requests arrive while the blob is still streaming in.
    let proxy = throttled_proxy(registry.addr(), 16_000_000, sent.clone()).await;
    let ns = proxy.to_string();
    let cluster = Cluster::start(&dir.path().join("swarm"), 1, &[&ns]).expect("cluster");
    let target = format!("/v2/{}/blobs/{layer}?ns={ns}", image.name);
    let mirror = cluster.agents[0].mirror;
    let accept = "application/vnd.oci.image.layer.v1.tar+gzip, application/vnd.docker.image.rootfs.diff.tar.gzip, */*";
    let tasks: Vec<_> = (0..50usize)
        .map(|i| {
            let (target, want) = (target.clone(), want.clone());
            tokio::spawn(async move {
                // Every fifth a closed range, every fifth from an offset to the end.
                let start = i * 300_001 % want.len();
                let range = match i % 5 {
                    0 => Some((format!("bytes={start}-{}", start + MIB - 1), start..start + MIB)),
                    1 => Some((format!("bytes={start}-"), start..want.len())),
                    _ => None,
                };
                let mut headers = vec![("Accept", accept)];
                if let Some((h, _)) = &range {
                    headers.push(("Range", h.as_str()));
                }
                let r = support::http::request_within(mirror, "GET", &target, &headers, Duration::from_secs(60))
                    .await
                    .expect("GET");
                let (status, expected) = match range {
                    Some((_, span)) => (206, &want[span]),
                    None => (200, &want[..]),
                };
                assert_eq!(r.status, status, "request {i}");
                assert!(r.complete, "request {i}: truncated");
                assert!(r.body == expected, "request {i}: wrong bytes");
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        t.await.unwrap_or_else(|e| panic!("request {i}: {e}\n{}", cluster.logs()));
    }
    assert_eq!(registry.blob_get_count(&layer), 1, "one upstream download\n{}", cluster.logs());
    let up = cluster.agents[0].metric("swarm_upstream_bytes_total").await.expect("metric");
    assert_eq!(up, want.len() as u64, "the agent fetched the blob once");
}

// 6 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_restarted_mid_pull_resumes_and_containerd_gets_the_right_image() {
    let dir = test_dir("faults-restart");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/restart", "v1", &[16 * MIB]).expect("image");
    let layer = image.layer_digests[0];
    let want = image.read_blob(&layer).expect("layer bytes");
    let sent = Arc::new(AtomicU64::new(0));
    let proxy = throttled_proxy(registry.addr(), 4_000_000, sent.clone()).await;
    let ns = proxy.to_string();
    let mut cluster = Cluster::start_with(&dir.path().join("swarm"), 1, &[&ns], |_, _| {
        ["--containerd-root", "none"].map(Into::into).to_vec()
    })
    .expect("cluster");
    let containerd = Arc::new(Containerd::start(&dir.path().join("ctd")).expect("containerd"));
    let hosts = dir.path().join("hosts");
    write_hosts_toml(&hosts, &ns, &cluster.agents[0].mirror_url()).expect("hosts.toml");
    let reference = image.reference.replace(&registry.host(), &ns);
    let pull = {
        let (c, hosts, reference) = (containerd.clone(), hosts.clone(), reference.clone());
        tokio::spawn(async move { c.pull(&reference, &hosts).await })
    };
    let started = Instant::now();
    let before = loop {
        let up = cluster.agents[0].metric("swarm_upstream_bytes_total").await.unwrap_or(0);
        if up >= want.len() as u64 / 2 {
            break up;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the agent fetched nothing\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    cluster.restart_agent_with(0, &[&ns], &["--containerd-root".into(), "none".into()]).expect("restart");
    eprintln!("restarted the agent after {before} upstream bytes ({:?})", started.elapsed());
    let took =
        pull.await.expect("join").unwrap_or_else(|e| panic!("containerd's pull failed: {e:#}\n{}", cluster.logs()));
    let check = containerd.image_check(&reference).expect("check");
    assert!(check.complete && check.unpacked, "{}", check.line);
    eprintln!("containerd's pull finished in {took:?}");
    // The restarted agent resumes from the verified pieces it kept.
    let r = get(&cluster.agents[0], &image.name, &ns, &layer, &[]).await;
    assert!(r.status == 200 && r.complete && r.body == want, "{}", cluster.logs());
    let again = cluster.agents[0].metric("swarm_upstream_bytes_total").await.expect("metric");
    let piece = u64::from(piece_length_for(want.len() as u64));
    eprintln!("after the restart the agent fetched {again} bytes upstream; {before} were verified before it");
    assert!(
        again <= want.len() as u64 - before + 2 * piece,
        "the restarted agent fetched {again} bytes though it had {before} of {} before",
        want.len()
    );
}

// 7 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_piece_rotted_on_the_nodes_own_disk_never_reaches_containerd() {
    let dir = test_dir("faults-rot-ctd");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/rotctd", "v1", &[8 * MIB]).expect("image");
    let layer = image.layer_digests[0];
    let want = image.read_blob(&layer).expect("layer bytes");
    let layout = layout_of(layer, want.len());
    let host = registry.host();
    let cluster = Cluster::start_with(&dir.path().join("swarm"), 2, &[&host], |_, _| {
        ["--containerd-root", "none"].map(Into::into).to_vec()
    })
    .expect("cluster");
    for i in [0, 1] {
        let r = get(&cluster.agents[i], &image.name, &host, &layer, &[]).await;
        assert!(r.status == 200 && r.body == want, "agent {i}\n{}", cluster.logs());
    }
    let bad = 10;
    rot_piece(&cluster.agents[0], &layout, bad);
    // A plain GET: the bytes before the rotted piece, then the response is cut short.
    let r = get(&cluster.agents[0], &image.name, &host, &layer, &[]).await;
    assert!(!r.complete, "the mirror served the whole blob with a rotted piece\n{}", cluster.logs());
    assert!(r.body.len() as u64 <= layout.piece_offset(bad), "bytes of the rotted piece were sent");
    assert!(r.body == want[..r.body.len()], "the mirror sent wrong bytes");
    assert!(cluster.agents[0].child.stderr_text().contains("no longer matches its hash"), "{}", cluster.logs());
    // containerd pulls through the same agent: the right image, never the rotted bytes.
    let containerd = Containerd::start(&dir.path().join("ctd")).expect("containerd");
    let hosts = dir.path().join("hosts");
    write_hosts_toml(&hosts, &host, &cluster.agents[0].mirror_url()).expect("hosts.toml");
    containerd.pull(&image.reference, &hosts).await.unwrap_or_else(|e| panic!("pull: {e:#}\n{}", cluster.logs()));
    let check = containerd.image_check(&image.reference).expect("check");
    assert!(check.complete && check.unpacked, "{}", check.line);
    let content = containerd.content_digests().expect("content");
    assert!(content.contains(&layer.to_string()), "containerd holds the layer by its digest: {content:?}");
    eventually("agent 0 heals its copy", Duration::from_secs(30), || cluster.agents[0].stores_blob(&layer)).await;
    eprintln!("registry GETs of the layer: {}", registry.blob_get_count(&layer));
}

// 8 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_evicted_while_a_peer_reads_it_is_refused_and_the_peer_gets_it_elsewhere() {
    let dir = test_dir("faults-evict");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/evict", "v1", &[12 * MIB, 8 * MIB]).expect("image");
    let (a, b) = (image.layer_digests[0], image.layer_digests[1]);
    let want = image.read_blob(&a).expect("bytes");
    let host = registry.host();
    // Agent 0 holds A within a 16 MiB budget; agents 0 and 1 upload at 4 MB/s each.
    let cluster = Cluster::start_with(&dir.path().join("swarm"), 3, &[&host], |i, _| {
        let mut args: Vec<std::ffi::OsString> = ["--containerd-root", "none"].map(Into::into).to_vec();
        if i < 2 {
            args.extend(["--upload-rate", "32Mbit/s"].map(Into::into));
        }
        if i == 0 {
            args.extend(["--cache-size", "16MiB"].map(Into::into));
        }
        args
    })
    .expect("cluster");
    for i in [1, 0] {
        let r = get(&cluster.agents[i], &image.name, &host, &a, &[]).await;
        assert!(r.status == 200 && r.body == want, "agent {i}\n{}", cluster.logs());
    }
    let reader = {
        let (mirror, target) = (cluster.agents[2].mirror, format!("/v2/{}/blobs/{a}?ns={host}", image.name));
        tokio::spawn(async move {
            support::http::request_within(mirror, "GET", &target, &[], Duration::from_secs(60)).await
        })
    };
    let started = Instant::now();
    loop {
        let got = cluster.agents[2].metric("swarm_peer_received_bytes_total").await.unwrap_or(0);
        if got >= 2 * MIB as u64 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "agent 2 received nothing\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!reader.is_finished(), "agent 2 finished before the eviction: the test proves nothing");
    // B needs room: agent 0 evicts A while agent 2 is reading it.
    let r = get(&cluster.agents[0], &image.name, &host, &b, &[]).await;
    assert_eq!(r.status, 200, "{}", cluster.logs());
    assert!(!cluster.agents[0].data_dir.join("blobs").join(a.hex()).exists(), "A was not evicted\n{}", cluster.logs());
    let evicted_at = started.elapsed();
    let r = reader.await.expect("join").unwrap_or_else(|e| panic!("agent 2: {e:#}\n{}", cluster.logs()));
    assert!(r.status == 200 && r.complete && r.body == want, "agent 2 got wrong bytes\n{}", cluster.logs());
    eprintln!("evicted {evicted_at:?} into agent 2's read; it finished at {:?}", started.elapsed());
    assert_eq!(registry.blob_get_count(&a), 1, "agent 2 went upstream instead of to agent 1\n{}", cluster.logs());
    assert!(cluster.agents[2].stores_blob(&a));
}
