//! Bad input at real processes (issue "Hardening", bad input): floods at the agent's
//! and the tracker's QUIC ports and abusive HTTP at the mirror while a pull runs, and
//! a token proof replayed from another connection at the tracker and at an agent.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::agents::Cluster;
use support::flood::{
    MemorySampler, abuse_mirror, agent_quic_addr, curl_get, garbage_datagrams, handshake_flood, line_count,
    logged_lines_after, nice_this_process,
};
use support::{Registry, build_image, test_dir};
use swarm_net::{ClusterToken, probe};

const MIB: usize = 1024 * 1024;
/// The RSS bound of the issue (VmHWM): holds for the agent whose mirror is abused
/// and for the seeder and the tracker under the QUIC floods (measured 78-132 MiB for
/// those two before connections without a token proof were bounded, see
/// docs/reliability.md).
const RSS_LIMIT_MIB: f64 = 64.0;
/// Garbage datagrams and handshakes per QUIC port, and the time they are spread over.
const DATAGRAMS: u64 = 100_000;
const HANDSHAKES: usize = 10_000;
const FLOOD_TIME: Duration = Duration::from_secs(10);

/// One blob GET through `mirror` with curl (its own process); its time. Panics on a
/// wrong answer.
async fn timed_get(mirror: std::net::SocketAddr, target: &str, want: &[u8], logs: impl Fn() -> String) -> Duration {
    let out = tempfile::NamedTempFile::new_in("/tmp").expect("temp file");
    let (url, path) = (format!("http://{mirror}{target}"), out.path().to_path_buf());
    let took = tokio::task::spawn_blocking(move || curl_get(&url, &path))
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("{e:#}\n{}", logs()));
    let got = std::fs::read(out.path()).expect("pulled bytes");
    assert!(got == want, "wrong or truncated bytes ({} of {})\n{}", got.len(), want.len(), logs());
    took
}

/// The refusal lines among `lines`, by the text after `refusing <addr>`'s kind.
fn refusal_lines(lines: &[String]) -> Vec<&String> {
    lines.iter().filter(|l| l.contains("refusing ")).collect()
}

/// 100,000 garbage datagrams and 10,000 handshakes (half holding the connection
/// without a proof, half with a wrong proof) at the seeding agent's and at the
/// tracker's QUIC ports within 10 s, and slow, oversized and malformed requests at
/// the pulling agent's mirror, while that agent pulls a blob from the seeder. The pull
/// takes at most twice its undisturbed time (measured just before, same size); the
/// agents' and the tracker's memory stays at or below 64 MiB; refusals are logged
/// once per source and kind, not per packet. The flood comes from this process at the
/// lowest CPU priority, the pulls are `curl` processes and the seeder uploads at an
/// edge node's 200 Mbit/s, so that on a small test machine the attacker's own work is
/// not what is measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_at_the_quic_ports_and_the_mirror_leave_a_pull_within_twice_its_time() {
    let dir = test_dir("flood");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/flood", "v1", &[64 * MIB, 64 * MIB]).expect("image");
    let (quiet_blob, flood_blob) = (image.layer_digests[0], image.layer_digests[1]);
    let host = registry.host();
    // The seeder uploads at 200 Mbit/s, an edge node's link (the emulation's): the
    // pull's time is then the link's, as on a real node, and the floods slow it only
    // if they take what the agents need, not because a 2-core test machine runs the
    // attacker, the agents and curl at once.
    let cluster = Cluster::start_with(&dir.path().join("swarm"), 2, &[&host], |i, _| {
        if i == 0 { vec!["--upload-rate".into(), "200Mbit/s".into()] } else { Vec::new() }
    })
    .expect("cluster");
    let logs = || cluster.logs();
    let target = |d: &swarm_proto::Digest| format!("/v2/{}/blobs/{d}?ns={host}", image.name);
    let (seeder, puller) = (&cluster.agents[0], &cluster.agents[1]);

    // The seeder fetches both blobs from upstream.
    for d in [quiet_blob, flood_blob] {
        let want = image.read_blob(&d).expect("blob");
        timed_get(seeder.mirror, &target(&d), &want, logs).await;
    }
    let seeder_quic = agent_quic_addr(&seeder.child).expect("seeder's QUIC address");

    // Undisturbed: the puller gets the first blob from the seeder.
    let quiet_want = image.read_blob(&quiet_blob).expect("blob");
    let quiet = timed_get(puller.mirror, &target(&quiet_blob), &quiet_want, logs).await;

    // Disturbed: the same size of blob while the floods run.
    for (name, pid) in
        [("seeder", seeder.child.pid()), ("puller", puller.child.pid()), ("tracker", cluster.tracker.pid())]
    {
        let (rss, hwm) = support::flood::memory_kib(pid).expect("memory");
        eprintln!(
            "{name} before the floods: VmRSS {:.1} MiB, VmHWM {:.1} MiB",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
    }
    let samplers = [
        ("seeder", MemorySampler::start(seeder.child.pid())),
        ("puller", MemorySampler::start(puller.child.pid())),
        ("tracker", MemorySampler::start(cluster.tracker.pid())),
    ];
    let log_files = [
        ("seeder", seeder.child.stderr_path().to_path_buf()),
        ("puller", puller.child.stderr_path().to_path_buf()),
        ("tracker", cluster.tracker.stderr_path().to_path_buf()),
    ];
    let lines_before: Vec<usize> = log_files.iter().map(|(_, p)| line_count(p)).collect();
    // The attacker (this process) yields the CPU to the processes under test.
    nice_this_process(19).expect("renice");
    let flood_started = Instant::now();
    let garbage: Vec<_> = [seeder_quic, cluster.tracker_addr]
        .into_iter()
        .map(|t| std::thread::spawn(move || garbage_datagrams(t, DATAGRAMS, 64, FLOOD_TIME)))
        .collect();
    let hold = Duration::from_secs(12);
    let handshakes: Vec<_> = [seeder_quic, cluster.tracker_addr]
        .into_iter()
        .map(|t| tokio::spawn(handshake_flood(t, HANDSHAKES, 64, FLOOD_TIME, hold)))
        .collect();
    let abuse = tokio::spawn(abuse_mirror(puller.mirror, 32, Duration::from_secs(20)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let flood_want = image.read_blob(&flood_blob).expect("blob");
    let flooded = timed_get(puller.mirror, &target(&flood_blob), &flood_want, logs).await;
    let pull_done = flood_started.elapsed();

    for g in garbage {
        let sent = g.join().expect("garbage thread").expect("garbage datagrams");
        assert_eq!(sent, DATAGRAMS);
    }
    let mut tallies = Vec::new();
    for h in handshakes {
        tallies.push(h.await.expect("join").expect("handshake flood"));
    }
    let flood_took = flood_started.elapsed();
    let outcomes = abuse.await.expect("join");

    // What the floods met.
    for (name, t) in ["seeder", "tracker"].iter().zip(&tallies) {
        eprintln!(
            "{name}: {HANDSHAKES} handshakes: TLS completed {}, refused before TLS {}, wrong proofs closed as token mismatch {}",
            t.tls_done.load(Ordering::Relaxed),
            t.refused_early.load(Ordering::Relaxed),
            t.mismatch_closed.load(Ordering::Relaxed)
        );
        assert_eq!(t.wrong_proof_accepted.load(Ordering::Relaxed), 0, "{name} accepted a wrong proof");
    }
    for o in outcomes.iter().filter(|o| o.what != "slowloris") {
        eprintln!("mirror, {}: status {:?}, closed {} after {:.1?}", o.what, o.status, o.closed, o.took);
    }
    for o in &outcomes {
        assert!(o.closed, "the mirror kept a {} connection open\n{}", o.what, logs());
        // A GET of `/v2/` with a body is answered (200, the API check) without reading
        // the body, and the connection closed; everything else is an error status.
        let answered = o.what == "huge body (GET)" && o.status == Some(200);
        assert!(answered || o.status.is_none_or(|s| s >= 400), "{}: the mirror answered {:?}", o.what, o.status);
    }
    let slow: Vec<Duration> = outcomes.iter().filter(|o| o.what == "slowloris").map(|o| o.took).collect();
    let (first, last) = (slow.iter().min(), slow.iter().max());
    eprintln!(
        "mirror, slowloris: {} connections, closed by the mirror after {first:.1?} to {last:.1?} (header timeout {:?})",
        slow.len(),
        swarm_peer::mirror::HEADER_READ_TIMEOUT
    );
    // The trickle would last 30 s; the mirror cuts it at its header timeout (the
    // client, busy flooding, notices a few seconds late at worst).
    assert!(
        first.is_some_and(|t| *t >= swarm_peer::mirror::HEADER_READ_TIMEOUT)
            && last.is_some_and(|t| *t < Duration::from_secs(25)),
        "slowloris connections lasted {first:?} to {last:?}"
    );

    // The pull.
    let ratio = flooded.as_secs_f64() / quiet.as_secs_f64();
    eprintln!(
        "pull of {} MiB: undisturbed {quiet:.2?}, during the floods {flooded:.2?} (ratio {ratio:.2}); \
         pull done {pull_done:.1?} into the floods, floods over after {flood_took:.1?}",
        flood_want.len() / MIB
    );

    // Memory.
    let mut peaks = Vec::new();
    for (name, sampler) in &samplers {
        let (rss, hwm) = sampler.peaks_mib();
        eprintln!("{name}: peak VmRSS sampled {rss:.1} MiB, VmHWM {hwm:.1} MiB");
        peaks.push((*name, hwm));
    }
    let mut counted = Vec::new();

    // Log lines: refusals once per source (127.0.0.1) and kind, not per packet.
    for ((name, path), before) in log_files.iter().zip(lines_before) {
        let lines = logged_lines_after(path, before);
        let refusals = refusal_lines(&lines);
        eprintln!(
            "{name}: {} lines at info or above during the floods, {} of them refusals",
            lines.len(),
            refusals.len()
        );
        for l in &refusals {
            eprintln!("  {l}");
        }
        counted.push((*name, refusals.len(), lines.len(), lines.join("\n")));
    }
    assert!(ratio <= 2.0, "the pull took {ratio:.2} x its undisturbed time\n{}", logs());
    for (name, hwm) in peaks {
        assert!(hwm <= RSS_LIMIT_MIB, "{name}: VmHWM {hwm:.1} MiB over {RSS_LIMIT_MIB} MiB\n{}", logs());
    }
    for (name, refusals, lines, text) in counted {
        // One per refusal kind at most (token mismatch, proof timeout, handshake
        // failed, too many handshakes, connection bound; the mirror's bound).
        assert!(refusals <= 6, "{name} logged {refusals} refusal lines");
        assert!(lines <= 40, "{name} logged {lines} lines during the floods:\n{text}");
    }
}

/// A proof recorded on one connection and replayed on another is refused by a real
/// tracker process and by a real agent process (so is the server's answer played back
/// as a client proof); an honest proof on a fresh connection passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_replayed_from_another_connection_is_refused_by_the_tracker_and_an_agent() {
    let dir = test_dir("replay");
    let cluster = Cluster::start(&dir.path().join("swarm"), 1, &[]).expect("cluster");
    let token = ClusterToken::from_file(&cluster.token_file).expect("token");
    let agent_quic = agent_quic_addr(&cluster.agents[0].child).expect("agent's QUIC address");
    let attacker = probe::raw_endpoint(false).expect("raw endpoint");
    for (name, addr, log) in [
        ("tracker", cluster.tracker_addr, cluster.tracker.stderr_path()),
        ("agent", agent_quic, cluster.agents[0].child.stderr_path()),
    ] {
        // Connection A: an honest proof, accepted; the server answers with its own.
        let a = probe::connect(&attacker, addr).await.expect("TLS with A");
        let ekm_a = probe::session_secret(&a).expect("exporter A");
        let proof_a = probe::client_proof(&token, &ekm_a);
        let answer =
            probe::send_proof(&a, &proof_a).await.unwrap_or_else(|e| panic!("{name} refused an honest proof: {e}"));
        assert!(probe::is_server_proof(&token, &ekm_a, &answer), "{name}'s answer does not verify");

        // Connection B: A's proof replayed.
        let b = probe::connect(&attacker, addr).await.expect("TLS with B");
        assert_ne!(probe::session_secret(&b).expect("exporter B"), ekm_a, "sessions must differ");
        let closed = probe::send_proof(&b, &proof_a).await.expect_err("a replayed proof must be refused");
        assert!(probe::is_auth_failed(&closed), "{name}: {closed}");

        // Connection C: the server's answer from A played back as a client proof.
        let c = probe::connect(&attacker, addr).await.expect("TLS with C");
        let closed = probe::send_proof(&c, &answer).await.expect_err("a reflected proof must be refused");
        assert!(probe::is_auth_failed(&closed), "{name}: {closed}");

        // The refusals are in the log, under the source's address.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains("cluster token mismatch") && text.contains("refusing 127.0.0.1:") {
                break;
            }
            assert!(Instant::now() < deadline, "{name} logged no refusal:\n{text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        a.close(0u32.into(), b"");
    }
}
