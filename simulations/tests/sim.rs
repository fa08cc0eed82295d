//! End-to-end checks of the simulator on small clusters (20 nodes × 64 pieces): each
//! would catch a broken flow model, a leaking driver or non-determinism.

use std::time::Duration;

use swarm_simulations::{Params, Rates, Report, Scenario, run};

const PIECE: u32 = 256 * 1024;
const PIECES: u64 = 64;
const F: u64 = PIECES * PIECE as u64;
const MBIT: f64 = 1e6 / 8.0;

fn small(scenario: Scenario, seed: u64) -> Params {
    Params {
        scenario,
        nodes: 20,
        blob: F,
        piece_length: Some(PIECE),
        upstream: 100.0 * MBIT,
        node_up: Rates::Uniform { mean: 200.0 * MBIT, spread: 0.5 },
        node_down: Rates::Uniform { mean: 1000.0 * MBIT, spread: 0.0 },
        seed,
        ..Params::default()
    }
}

fn go(p: &Params) -> Report {
    match run(p) {
        Ok(r) => r,
        Err(e) => panic!("{} failed: {e:#}", p.scenario.name()),
    }
}

/// The report as JSON without the wall time (the only field that may differ).
fn canonical(r: &Report) -> serde_json::Value {
    let mut v = serde_json::to_value(r).expect("report serialises");
    if let Some(o) = v.as_object_mut() {
        o.remove("wall_s");
    }
    v
}

#[test]
fn same_seed_same_result() {
    for scenario in [Scenario::Edge, Scenario::InCluster, Scenario::Churn] {
        let a = go(&small(scenario, 7));
        let b = go(&small(scenario, 7));
        assert_eq!(canonical(&a), canonical(&b), "{}", scenario.name());
        let c = go(&small(scenario, 8));
        assert_ne!(canonical(&a), canonical(&c), "{}: another seed changes something", scenario.name());
    }
}

#[test]
fn edge_upgrade_conserves_bytes_and_uses_the_uplink_once() {
    for seed in 1..=3 {
        let r = go(&small(Scenario::Edge, seed));
        assert!(!r.timed_out, "{r:?}");
        assert_eq!(r.downloaders, 20);
        assert_eq!(r.completed, 20, "every node ends with every piece");
        assert_eq!(r.received_bytes, 20 * F, "each node received each byte exactly once");
        assert_eq!(r.uplink_bytes, F, "the upstream sent the blob exactly once");
        assert_eq!(r.uplink_over_f, 1.0);
    }
}

#[test]
fn in_cluster_conserves_bytes_and_never_touches_the_uplink() {
    let r = go(&small(Scenario::InCluster, 1));
    assert_eq!(r.downloaders, 19);
    assert_eq!(r.completed, 19);
    assert_eq!(r.received_bytes, 19 * F);
    assert_eq!(r.uplink_bytes, 0);
}

#[test]
fn direct_baseline_matches_its_closed_form() {
    // Uplink-bound (100 Mbit/s shared by 20 nodes with 1 Gbit/s each): N·F/u_s.
    let p = Params { wan_rtt: Duration::ZERO, ..small(Scenario::Direct, 1) };
    let r = go(&p);
    let closed = 20.0 * F as f64 / p.upstream;
    assert!((r.last_s / closed - 1.0).abs() < 0.01, "last {} s vs N·F/u_s = {closed} s", r.last_s);
    assert_eq!(r.uplink_bytes, 20 * F);
    // Download-bound: u_s = 1 Gbit/s, nodes 10 Mbit/s each: F/d.
    let p = Params { upstream: 1000.0 * MBIT, node_down: Rates::Uniform { mean: 10.0 * MBIT, spread: 0.0 }, ..p };
    let r = go(&p);
    let closed = F as f64 / (10.0 * MBIT);
    assert!((r.last_s / closed - 1.0).abs() < 0.01, "last {} s vs F/d = {closed} s", r.last_s);
}

#[test]
fn the_swarm_never_beats_the_theoretical_limit() {
    // Homogeneous, swarm-bound and source-bound cases, with generous links so the
    // policy can come close: a flow model that creates bandwidth would go below 1.
    let cases = [
        small(Scenario::InCluster, 1),
        Params { node_up: Rates::Uniform { mean: 20.0 * MBIT, spread: 0.0 }, ..small(Scenario::InCluster, 2) },
        small(Scenario::Edge, 3),
        Params { upstream: 2000.0 * MBIT, ..small(Scenario::Edge, 4) },
        Params { zones: 3, zone_link: 50.0 * MBIT, ..small(Scenario::Edge, 5) },
    ];
    for p in cases {
        let r = go(&p);
        assert_eq!(r.completed, r.downloaders);
        assert!(
            r.last_s >= r.t_min.t_min_s,
            "{}: last {} s is below T_min {} s ({:?})",
            r.scenario,
            r.last_s,
            r.t_min.t_min_s,
            r.t_min
        );
    }
}

#[test]
fn churn_completes_for_the_nodes_that_stay() {
    for seed in 1..=2 {
        let p = Params { churn_leave: 0.3, churn_join: 0.2, ..small(Scenario::Churn, seed) };
        let r = go(&p);
        assert_eq!(r.left, 6);
        assert_eq!(r.joined, 4);
        assert_eq!(r.downloaders, 20 - 6 + 4);
        assert_eq!(r.completed, r.downloaders, "{r:?}");
        assert!(!r.timed_out);
        assert_eq!(r.uplink_bytes, F, "the lease holder never leaves");
    }
}

/// Whole nodes in virtual time: 8 nodes, each the real node cores (swarm, upload
/// slots and ledger, lease rules) over modelled links, complete a blob in the edge
/// upgrade and in-cluster, with no sockets and no sleeps.
#[test]
fn eight_whole_nodes_complete_a_blob() {
    for scenario in [Scenario::Edge, Scenario::InCluster] {
        let r = go(&Params { nodes: 8, ..small(scenario, 3) });
        assert_eq!((r.completed, r.incomplete), (r.downloaders, 0), "{}", scenario.name());
        assert!(r.last_over_t_min < 1.5, "{}: {:.3} x T_min", scenario.name(), r.last_over_t_min);
        assert_eq!((r.takeovers, r.fallbacks), (0, 0));
    }
}

/// The lease holder crashes partway: the tracker lets its lease lapse, a waiting node
/// takes it over after its quiet spell and resumes the upstream fetch where the swarm
/// is, and every other node completes with the uplink still carrying the blob about
/// once.
#[test]
fn a_killed_lease_holder_is_taken_over_and_the_rest_complete() {
    let p = Params {
        nodes: 8,
        faults: swarm_simulations::Faults { kill_holder_at: Some(1_000_000_000), ..Default::default() },
        ..small(Scenario::Edge, 3)
    };
    let r = go(&p);
    assert_eq!(r.left, 1, "the holder is gone");
    assert_eq!((r.completed, r.incomplete), (r.downloaders, 0));
    assert_eq!(r.downloaders, 7);
    assert_eq!(r.takeovers, 1);
    assert!(r.uplink_over_f < 1.1, "uplink {:.3} x F", r.uplink_over_f);
    // A quiet spell (12 s) must pass before the takeover: far slower than unhurt.
    assert!(r.last_s > 12.0, "finished at {:.2} s", r.last_s);
}

/// The tracker is unreachable for 10 s from 1 s on: the holder's feed goes on
/// (its publishes wait), the piece hashes reach the others through the swarm, and
/// the transfer neither falls back, nor moves the lease, nor slows down.
#[test]
fn a_tracker_outage_changes_nothing_once_the_swarm_has_formed() {
    let s = 1_000_000_000;
    let calm = Params { nodes: 8, ..small(Scenario::Edge, 3) };
    let p = Params {
        faults: swarm_simulations::Faults { tracker_down: Some((s, 10 * s)), ..Default::default() },
        ..calm.clone()
    };
    let calm = go(&calm);
    let r = go(&p);
    assert_eq!((r.completed, r.incomplete), (r.downloaders, 0));
    assert_eq!((r.fallbacks, r.takeovers), (0, 0));
    assert!(r.uplink_over_f < 1.01, "uplink {:.3} x F", r.uplink_over_f);
    assert!(r.last_s < calm.last_s * 1.1, "{:.2} s against {:.2} s undisturbed", r.last_s, calm.last_s);
}

/// Five nodes crash at 1 s and restart 1 s later with their verified pieces, a new
/// peer id and fresh cores: they complete without fetching a verified piece again.
#[test]
fn restarted_nodes_keep_their_verified_pieces_and_complete() {
    for scenario in [Scenario::Edge, Scenario::InCluster] {
        let s = 1_000_000_000;
        let p = Params {
            faults: swarm_simulations::Faults { restart: Some((s, 5, s)), ..Default::default() },
            ..small(scenario, 3)
        };
        let r = go(&p);
        assert_eq!(r.restarts, 5, "{}", r.scenario);
        assert_eq!((r.completed, r.incomplete), (r.downloaders, 0), "{}", r.scenario);
        assert!(
            (r.received_over_nf - 1.0).abs() < 1e-9,
            "{}: every verified piece arrives once: {:.4} x N·F",
            r.scenario,
            r.received_over_nf
        );
    }
}
