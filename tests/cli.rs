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

/// Pieces verified so far in a pull's scratch directory (its persisted bitfield).
fn verified_pieces(partial: &Path) -> u32 {
    std::fs::read_dir(partial.join("blobs"))
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .and_then(|e| std::fs::read(e.path().join("have")).ok())
        .map(|b| b.iter().map(|x| x.count_ones()).sum::<u32>())
        .unwrap_or(0)
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
        if verified_pieces(&partial) >= 64 {
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

/// `--timeout` bounds the wait for the tracker to learn the blob, the wait is printed
/// in whole seconds, and the empty `FILE.swarm/` is removed.
#[test]
fn a_pull_of_an_unknown_blob_gives_up_at_its_timeout_and_leaves_nothing_behind() {
    let dir = test_dir("cli-unknown");
    let file = dir.path().join("original.bin");
    random_file(&file, 1 << 20);
    let s = start(dir.path(), &file, "1Gbit/s");
    let unknown = format!("sha256:{}", "ab".repeat(32));
    let out = dir.path().join("never.bin");
    let mut cmd = Command::new(swarm_bin());
    cmd.args(["pull", &unknown, "--tracker", &s.tracker, "--listen", "127.0.0.1:0", "--timeout", "2s"])
        .arg("-o")
        .arg(&out)
        .arg("--token-file")
        .arg(&s.token);
    let started = Instant::now();
    let o = run_unchecked(&mut cmd, Duration::from_secs(60)).expect("run");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "pulling an unknown blob succeeded");
    assert!(started.elapsed() < Duration::from_secs(15), "--timeout 2s took {:?}", started.elapsed());
    assert!(stderr.contains("does not know") && stderr.contains("after 2s:"), "unclear error: {stderr}");
    assert!(!stderr.contains("resume"), "nothing to resume, yet: {stderr}");
    assert!(!dir.path().join("never.bin.swarm").exists(), "the empty FILE.swarm/ was left behind");
}

/// Nothing listens at the tracker address: the error names the address and what to
/// check, not the handshake's internals.
#[test]
fn an_unreachable_tracker_is_reported_plainly() {
    let dir = test_dir("cli-notracker");
    let token = dir.path().join("token");
    let o = Command::new(swarm_bin()).args(["token", "--output"]).arg(&token).output().expect("swarm token");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tracker = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(swarm_bin());
    cmd.args(["pull", &format!("sha256:{}", "cd".repeat(32)), "-o"])
        .arg(dir.path().join("x.bin"))
        .args(["--tracker", &tracker, "--listen", "127.0.0.1:0", "--token-file"])
        .arg(&token);
    let o = run_unchecked(&mut cmd, Duration::from_secs(60)).expect("run");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains(&format!("cannot reach the tracker at {tracker}")) && stderr.contains("`swarm tracker`"),
        "unclear error: {stderr}"
    );
    assert!(!stderr.contains("handshake"), "handshake internals leaked: {stderr}");
}

/// `--listen :PORT`, a tracker and an advertise address given by host name; the human
/// summary says "1 peer" and uses one unit family.
#[test]
fn host_names_and_bare_ports_are_accepted() {
    let dir = test_dir("cli-names");
    let file = dir.path().join("original.bin");
    random_file(&file, 2 << 20);
    let s = start(dir.path(), &file, "1Gbit/s");
    let port = s.tracker.rsplit_once(':').map(|(_, p)| p.to_string()).expect("port");
    let out = dir.path().join("copy.bin");
    let mut cmd = Command::new(swarm_bin());
    cmd.args(["pull", &s.digest, "--tracker", &format!("localhost:{port}"), "--listen", ":0"])
        .args(["--advertise", &format!("localhost:{}", free_port())])
        .arg("-o")
        .arg(&out)
        .arg("--token-file")
        .arg(&s.token);
    let o = run_unchecked(&mut cmd, Duration::from_secs(60)).expect("run");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&out).expect("out") == std::fs::read(&file).expect("original"));
    assert!(stdout.contains("from 1 peer;"), "{stdout}");
    assert!(stdout.contains("MiB/s") && !stdout.contains("MB/s"), "mixed units: {stdout}");
}

#[test]
fn token_output_is_private_and_placeholders_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = test_dir("cli-tokenfile");
    let path = dir.path().join("etc/swarm/token");
    let o = Command::new(swarm_bin()).args(["token", "--output"]).arg(&path).output().expect("swarm token");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout.is_empty(), "the token must not also go to stdout");
    let mode = std::fs::metadata(&path).expect("token file").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&path).expect("read");
    assert_eq!(text.trim().len(), 64);
    // No silent overwrite of a cluster's token.
    let o = Command::new(swarm_bin()).args(["token", "--output"]).arg(&path).output().expect("swarm token");
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&path).expect("read"), text);

    for placeholder in ["YOUR_SWARM_TOKEN_HERE", &"0".repeat(64)] {
        let o = run_unchecked(
            Command::new(swarm_bin())
                .args(["tracker", "--listen", &format!("127.0.0.1:{}", free_port())])
                .env("SWARM_TOKEN", placeholder)
                .env_remove("SWARM_TOKEN_FILE"),
            Duration::from_secs(30),
        )
        .expect("run");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{placeholder:?} was accepted as a token");
        assert!(stderr.contains("SWARM_TOKEN") && stderr.contains("swarm token --output"), "{stderr}");
    }
}

/// `--mirror 127.0.0.1:0`: the banner gives the port the mirror really listens on.
#[test]
fn the_agent_banner_shows_the_bound_mirror_port() {
    let dir = test_dir("cli-banner");
    let token = dir.path().join("token");
    let o = Command::new(swarm_bin()).args(["token", "--output"]).arg(&token).output().expect("swarm token");
    assert!(o.status.success());
    let mut cmd = Command::new(swarm_bin());
    cmd.args(["agent", "--tracker", "127.0.0.1", "--listen", "127.0.0.1:0", "--mirror", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--token-file")
        .arg(&token);
    let agent = ChildGuard::spawn("agent", cmd, &dir.path().join("logs")).expect("agent");
    let err_log = dir.path().join("logs/agent.err");
    let started = Instant::now();
    let line = loop {
        let text = std::fs::read_to_string(&err_log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("mirror on http://")) {
            break l.to_string();
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no banner\n{}", agent.logs_tail());
        std::thread::sleep(Duration::from_millis(50));
    };
    let port = line
        .split("mirror on http://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("no mirror port in {line:?}"));
    assert_ne!(port, 0, "{line}");
    assert!(line.contains("tracker 127.0.0.1:7000"), "a tracker without a port means 7000: {line}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "nothing listens on the port in {line:?}");
}

/// Ctrl-C while nothing has been verified: no promise of a resume, no directory left.
#[test]
fn an_interrupted_pull_with_nothing_verified_cleans_up() {
    let dir = test_dir("cli-sigint");
    let file = dir.path().join("original.bin");
    random_file(&file, 1 << 20);
    let s = start(dir.path(), &file, "1Gbit/s");
    let out = dir.path().join("never.bin");
    let mut cmd = Command::new(swarm_bin());
    cmd.args(["pull", &format!("sha256:{}", "ef".repeat(32)), "--tracker", &s.tracker, "--listen", "127.0.0.1:0"])
        .arg("-o")
        .arg(&out)
        .arg("--token-file")
        .arg(&s.token)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn pull");
    let partial = dir.path().join("never.bin.swarm");
    let started = Instant::now();
    while !partial.exists() {
        assert!(started.elapsed() < Duration::from_secs(20), "the pull never created {}", partial.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("kill -INT");
    assert!(status.success());
    let o = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("interrupted") && !stderr.contains("resume"), "{stderr}");
    assert!(!partial.exists(), "{} left behind", partial.display());
}

/// Ctrl-C halfway: the message counts the verified pieces and says how to resume,
/// and they are still there.
#[test]
fn an_interrupted_pull_says_what_it_kept() {
    let dir = test_dir("cli-sigint-half");
    let file = dir.path().join("original.bin");
    random_file(&file, 16 << 20);
    let s = start(dir.path(), &file, "32Mbit/s");
    let out = dir.path().join("copy.bin");
    let partial = dir.path().join("copy.bin.swarm");
    let child = pull_cmd(&s, &out, &s.token).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
    let started = Instant::now();
    while verified_pieces(&partial) < 4 {
        assert!(started.elapsed() < Duration::from_secs(30), "the pull made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("kill -INT");
    assert!(status.success());
    let o = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the pull finished before the interrupt: {stderr}");
    assert!(
        stderr.contains("interrupted") && stderr.contains("verified and kept in") && stderr.contains("to resume"),
        "{stderr}"
    );
    assert!(verified_pieces(&partial) >= 4, "the verified pieces are gone");
}
