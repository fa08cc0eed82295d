//! The real `swarm` binary as separate processes: a tracker, one seed, several pulls;
//! a pull with the wrong token; a pull killed halfway and resumed.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use support::agents::swarm_bin;
use support::process::{ChildGuard, free_port, run_unchecked};
use support::test_dir;

fn random_file(path: &Path, len: usize) {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(11).fill_bytes(&mut data);
    std::fs::write(path, data).expect("write");
}

struct Swarm {
    _tracker: ChildGuard,
    _seed: ChildGuard,
    tracker: String,
    token: std::path::PathBuf,
    digest: String,
}

/// Starts `swarm tracker` and `swarm seed FILE` (capped so a pull takes a while) and
/// reads the digest the seed prints.
fn start(dir: &Path, file: &Path, seed_rate: &str) -> Swarm {
    let token = dir.join("token");
    let out = Command::new(swarm_bin()).arg("token").output().expect("swarm token");
    assert!(out.status.success());
    std::fs::write(&token, &out.stdout).expect("token file");
    let tracker = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(swarm_bin());
    cmd.args(["tracker", "--listen", &tracker]).arg("--token-file").arg(&token);
    let tracker_proc = ChildGuard::spawn("tracker", cmd, &dir.join("logs")).expect("tracker");
    let mut cmd = Command::new(swarm_bin());
    cmd.arg("seed").arg(file).args(["--tracker", &tracker, "--listen", "127.0.0.1:0", "--upload-rate", seed_rate]);
    cmd.arg("--token-file").arg(&token);
    let seed = ChildGuard::spawn("seed", cmd, &dir.join("logs")).expect("seed");
    let started = Instant::now();
    let digest = loop {
        let text = std::fs::read_to_string(seed.stdout_path()).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.starts_with("sha256:")) {
            break line.trim().to_string();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the seed printed no digest\n{}", seed.logs_tail());
        std::thread::sleep(Duration::from_millis(50));
    };
    Swarm { _tracker: tracker_proc, _seed: seed, tracker, token, digest }
}

fn pull_cmd(s: &Swarm, out: &Path, token: &Path) -> Command {
    let mut cmd = Command::new(swarm_bin());
    cmd.args(["pull", &s.digest, "--json", "--tracker", &s.tracker, "--listen", "127.0.0.1:0", "--linger", "3s"])
        .arg("-o")
        .arg(out)
        .arg("--token-file")
        .arg(token);
    cmd
}

#[test]
fn a_tracker_a_seed_and_four_pulls_as_separate_processes() {
    let dir = test_dir("cli");
    let file = dir.path().join("original.bin");
    random_file(&file, 24 << 20);
    let s = start(dir.path(), &file, "100Mbit/s");
    let pulls: Vec<_> = (0..4)
        .map(|i| {
            let out = dir.path().join(format!("copy{i}.bin"));
            let mut cmd = pull_cmd(&s, &out, &s.token);
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            (out, cmd.spawn().expect("spawn pull"))
        })
        .collect();
    let want = std::fs::read(&file).expect("original");
    for (out, child) in pulls {
        let o = child.wait_with_output().expect("pull");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "pull failed: {stderr}");
        let summary: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json prints one JSON object");
        assert_eq!(summary["digest"], s.digest.as_str());
        assert_eq!(summary["bytes"], want.len() as u64);
        assert!(std::fs::read(&out).expect("output") == want, "{} differs from the original", out.display());
        assert!(
            !out.with_file_name(format!("{}.swarm", out.file_name().and_then(|n| n.to_str()).unwrap_or(""))).exists()
        );
    }
}

#[test]
fn a_pull_with_the_wrong_token_fails_with_a_clear_message() {
    let dir = test_dir("cli-token");
    let file = dir.path().join("original.bin");
    random_file(&file, 1 << 20);
    let s = start(dir.path(), &file, "1Gbit/s");
    let wrong = dir.path().join("wrong-token");
    let out = Command::new(swarm_bin()).arg("token").output().expect("swarm token");
    std::fs::write(&wrong, &out.stdout).expect("write");
    let o = run_unchecked(&mut pull_cmd(&s, &dir.path().join("x.bin"), &wrong), Duration::from_secs(60)).expect("run");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a pull with the wrong token succeeded");
    assert!(stderr.contains("cluster token mismatch"), "unclear error: {stderr}");

    let o = run_unchecked(
        Command::new(swarm_bin())
            .args(["pull", &s.digest, "-o", "/dev/null", "--tracker", &s.tracker])
            .env_remove("SWARM_TOKEN"),
        Duration::from_secs(30),
    )
    .expect("run");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("swarm token"), "no token must say how to make one: {stderr}");
}

#[test]
fn a_killed_pull_resumes_without_refetching_what_it_verified() {
    let dir = test_dir("cli-resume");
    let file = dir.path().join("original.bin");
    random_file(&file, 32 << 20);
    // 8 MB/s: the pull takes about four seconds.
    let s = start(dir.path(), &file, "64Mbit/s");
    let out = dir.path().join("copy.bin");
    let partial = dir.path().join("copy.bin.swarm");
    let mut first = pull_cmd(&s, &out, &s.token).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
    let started = Instant::now();
    // Kill it (SIGKILL, no clean-up) once about half the pieces are on disk.
    loop {
        let have = std::fs::read_dir(partial.join("blobs"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .and_then(|e| std::fs::read(e.path().join("have")).ok())
            .map(|b| b.iter().map(|x| x.count_ones()).sum::<u32>())
            .unwrap_or(0);
        if have >= 64 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the first pull made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill().expect("kill");
    first.wait().expect("reap");
    assert!(!out.exists(), "the killed pull must not have produced the output");
    let o = run_unchecked(&mut pull_cmd(&s, &out, &s.token), Duration::from_secs(60)).expect("second pull");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let resumed = summary["resumed_bytes"].as_u64().expect("resumed_bytes");
    let downloaded = summary["downloaded_bytes"].as_u64().expect("downloaded_bytes");
    let total = summary["bytes"].as_u64().expect("bytes");
    eprintln!("resumed {resumed} bytes, downloaded {downloaded} of {total}");
    assert!(resumed >= 64 * 256 * 1024, "only {resumed} bytes survived the kill");
    assert!(downloaded <= total - resumed, "refetched verified pieces: {downloaded} downloaded, {resumed} resumed");
    assert!(std::fs::read(&out).expect("out") == std::fs::read(&file).expect("original"));
}
