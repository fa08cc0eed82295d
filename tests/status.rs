//! `swarm status` end to end, with real processes on 127.0.0.1: a `swarm tracker`, a
//! `swarm seed` of a 16 MiB file capped at 2 MB/s, and a `swarm agent` fetching the
//! blob through its mirror (curl). While the transfer runs, `swarm status --json`
//! shows the blob part-way (0 < pieces < piece_count) with a peer and a download
//! rate, the table shows it too, and `swarm status --cluster` lists both nodes and
//! the blob (also merged with a second tracker that does not answer). Afterwards the
//! agent reports the blob complete; an address without an agent gives a clear error.
//!
//! Needs: curl.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use serde_json::Value;
use support::agents::{agent_command, swarm_bin, tracker_command, write_token};
use support::process::{ChildGuard, free_port, require_tool, run, run_unchecked, tcp_open, wait_until};
use support::test_dir;

const BLOB_LEN: usize = 16 << 20;

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// `swarm status ARGS`, which must succeed; its stdout.
fn status(args: &[&str]) -> String {
    let mut cmd = Command::new(swarm_bin());
    cmd.arg("status").args(args);
    let out = run(cmd, Duration::from_secs(20)).expect("swarm status");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let text = status(&all);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("swarm status {args:?} printed no JSON ({e}):\n{text}"))
}

/// The blob `digest` in an agent status, if listed.
fn blob<'a>(s: &'a Value, digest: &str) -> Option<&'a Value> {
    s["blobs"].as_array()?.iter().find(|b| b["digest"] == digest)
}

/// Starts `swarm seed FILE` capped at `rate` and returns it with the digest it prints.
fn start_seed(file: &Path, tracker: SocketAddr, token: &Path, rate: &str, logs: &Path) -> (ChildGuard, String) {
    let mut cmd = Command::new(swarm_bin());
    cmd.arg("seed").arg(file).args(["--tracker", &tracker.to_string(), "--listen", "127.0.0.1:0"]);
    cmd.args(["--upload-rate", rate, "--zone", "rack-a"]).arg("--token-file").arg(token);
    let mut seed = ChildGuard::spawn("seed", cmd, logs).expect("seed");
    let mut digest = String::new();
    wait_until("the seed's digest", Duration::from_secs(30), &mut seed, || {
        let text = std::fs::read_to_string(seed_stdout(logs)).unwrap_or_default();
        match text.lines().find(|l| l.starts_with("sha256:")) {
            Some(line) => {
                digest = line.trim().to_string();
                true
            }
            None => false,
        }
    })
    .expect("seed started");
    (seed, digest)
}

fn seed_stdout(logs: &Path) -> std::path::PathBuf {
    logs.join("seed.out")
}

#[test]
fn status_shows_a_download_in_progress_on_the_agent_and_in_the_cluster() {
    require_tool("curl", "curl");
    let dir = test_dir("status");
    let logs = dir.path().join("logs");
    let token = dir.path().join("token");
    write_token(&token).expect("token");

    let (tracker, tracker_http) = (loopback(), loopback());
    let mut tracker_proc =
        ChildGuard::spawn("tracker", tracker_command(tracker, tracker_http, &token), &logs).expect("tracker");
    wait_until("tracker", Duration::from_secs(20), &mut tracker_proc, || tcp_open(tracker_http)).expect("tracker up");

    let file = dir.path().join("blob.bin");
    let mut data = vec![0u8; BLOB_LEN];
    rand::rngs::StdRng::seed_from_u64(5).fill_bytes(&mut data);
    std::fs::write(&file, &data).expect("write blob");
    // 16 MiB at 2 MB/s: about 8 s, long enough to watch.
    let (_seed, digest) = start_seed(&file, tracker, &token, "2MB/s", &logs);

    let (mirror, metrics) = (loopback(), loopback());
    let data_dir = dir.path().join("agent");
    let mut cmd = agent_command(tracker, mirror, metrics, &data_dir, &token);
    cmd.args(["--zone", "rack-b"]);
    let mut agent = ChildGuard::spawn("agent", cmd, &logs).expect("agent");
    wait_until("agent mirror", Duration::from_secs(20), &mut agent, || tcp_open(mirror)).expect("agent up");
    let agent_url = format!("http://{mirror}");

    // Before anything is fetched.
    let idle = status_json(&["--agent", &agent_url]);
    assert_eq!(idle["blobs"].as_array().map(Vec::len), Some(0), "{idle:#}");
    assert_eq!(idle["zone"], "rack-b");
    assert_eq!(idle["tracker"], tracker.to_string());
    assert!(idle["cache"]["budget"].as_u64() > Some(0), "the default budget: {idle:#}");
    let agent_peer = idle["peer_id"].as_str().expect("peer_id").to_string();

    // containerd's request, by curl.
    let out = dir.path().join("fetched.bin");
    let url = format!("{agent_url}/v2/test/blob/blobs/{digest}?ns=registry.invalid");
    let mut curl = Command::new("curl");
    curl.args(["-sSf", "-o"]).arg(&out).arg(&url);
    let mut curl = ChildGuard::spawn("curl", curl, &logs).expect("curl");

    // Poll until the blob is part-way with a measured download rate.
    let started = Instant::now();
    let mid = loop {
        let s = status_json(&["--agent", &agent_url]);
        if let Some(b) = blob(&s, &digest) {
            let (pieces, count) = (b["pieces"].as_u64().unwrap_or(0), b["piece_count"].as_u64().unwrap_or(0));
            let rate = b["download_rate"].as_f64().unwrap_or(0.0);
            if pieces > 0 && pieces < count && rate > 0.0 {
                break s;
            }
            assert!(pieces < count || count == 0, "the blob completed before status saw it part-way: {s:#}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no download in progress seen within 30 s: {s:#}\n{}",
            agent.logs_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let b = blob(&mid, &digest).expect("blob");
    println!(
        "agent status mid-way: {}/{} pieces, {} of {} bytes, {} peer(s), {:.2} MB/s",
        b["pieces"],
        b["piece_count"],
        b["bytes"],
        b["total"],
        b["peers"],
        b["download_rate"].as_f64().unwrap_or(0.0) / 1e6
    );
    assert_eq!(b["state"], "running");
    assert_eq!(b["total"].as_u64(), Some(BLOB_LEN as u64));
    assert!(b["peers"].as_u64() >= Some(1), "{b:#}");
    assert!(mid["totals"]["downloaded"].as_u64() > Some(0), "{mid:#}");
    assert!(mid["cache"]["used"].as_u64() > Some(0), "{mid:#}");
    assert_eq!(mid["leases"], serde_json::json!([]), "the blob came from a seed, not upstream: {mid:#}");

    // The same as a table.
    let table = status(&["--agent", &agent_url]);
    println!("{table}");
    let short = &digest[..("sha256:".len() + 12)];
    assert!(table.contains(short) && table.contains("running"), "{table}");
    assert!(table.contains("of a budget of") && table.contains("leases held: none"), "{table}");

    // The tracker's view: both nodes, the blob held whole by the seed and fetched by the agent.
    let token_arg = token.to_str().expect("utf8 path");
    let cluster = status_json(&["--cluster", "--tracker", &tracker.to_string(), "--token-file", token_arg]);
    let nodes = cluster["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2, "{cluster:#}");
    let me = nodes.iter().find(|n| n["peer_id"] == agent_peer.as_str()).expect("the agent among the nodes");
    assert_eq!(me["zone"], "rack-b");
    assert_eq!(me["blobs"], serde_json::json!([digest]));
    assert!(nodes.iter().any(|n| n["zone"] == "rack-a"), "the seed among the nodes: {cluster:#}");
    let cb = cluster["blobs"].as_array().and_then(|b| b.iter().find(|b| b["digest"] == digest.as_str()));
    let cb = cb.unwrap_or_else(|| panic!("the blob in the cluster view: {cluster:#}"));
    assert_eq!(cb["size"].as_u64(), Some(BLOB_LEN as u64));
    let holders = cb["holders"].as_array().expect("holders");
    assert_eq!(holders.len(), 2, "{cb:#}");
    // The seed's first announce says every piece but not yet `complete` (it announces
    // that after checking the whole blob, on its next announce).
    assert!(holders.iter().any(|h| h["have"] == 64 && h["peer_id"] != agent_peer.as_str()), "{cb:#}");
    assert!(holders.iter().any(|h| h["peer_id"] == agent_peer.as_str()), "{cb:#}");

    // Two trackers, one of them away: the answering one's view, the other reported.
    let away = loopback();
    let trackers = format!("{tracker},{away}");
    let table = status(&["--cluster", "--tracker", &trackers, "--token-file", token_arg]);
    println!("{table}");
    assert!(table.contains("NODES (2)") && table.contains(short), "{table}");
    assert!(table.contains(&format!("tracker {away}: NO ANSWER")), "{table}");

    // The end of the transfer.
    wait_until("curl", Duration::from_secs(60), &mut agent, || curl.exited().is_some()).expect("curl done");
    assert!(curl.exited().is_some_and(|s| s.success()), "curl failed\n{}", curl.logs_tail());
    assert!(std::fs::read(&out).expect("fetched") == data, "the fetched blob differs");
    let done = status_json(&["--agent", &agent_url]);
    let b = blob(&done, &digest).expect("blob");
    assert_eq!(b["state"], "complete", "{done:#}");
    assert_eq!(b["pieces"], b["piece_count"]);

    // Nobody at this address.
    let nobody = format!("http://{}", loopback());
    let out = run_unchecked(Command::new(swarm_bin()).args(["status", "--agent", &nobody]), Duration::from_secs(20))
        .expect("swarm status");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "status of nobody succeeded");
    assert!(err.contains(&format!("no agent answers at {nobody}: is `swarm agent` running?")), "{err}");
}
