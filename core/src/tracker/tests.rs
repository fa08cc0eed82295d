//! Unit tests of the tracker core, no network.

use std::collections::{HashMap, HashSet};

use super::*;

const PIECE: u32 = 256 * 1024;

fn blob(n: u8) -> Digest {
    Digest::of(&[n])
}

fn pid(n: u32) -> PeerId {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&n.to_be_bytes());
    PeerId(id)
}

fn metainfo(n: u8, pieces: usize) -> Metainfo {
    Metainfo {
        digest: blob(n),
        length: pieces as u64 * u64::from(PIECE),
        piece_length: PIECE,
        piece_hashes: vec![[n; 32]; pieces],
    }
}

fn ann(peer: u32, zone: &str, have: u32, complete: bool) -> Announce {
    Announce {
        peer_id: pid(peer),
        blob: blob(1),
        listen_port: 7000,
        advertise: None,
        zone: zone.into(),
        have,
        complete,
        num_want: 50,
    }
}

/// A distinct observed address per peer number.
fn seen(peer: u32) -> SocketAddr {
    let [a, b, c, d] = peer.to_be_bytes();
    SocketAddr::new(IpAddr::from([10, a ^ b, c, d]), 40_000)
}

fn state() -> TrackerState {
    TrackerState::new(TrackerConfig::default(), 42)
}

fn ids(peers: &[PeerInfo]) -> Vec<PeerId> {
    peers.iter().map(|p| p.peer_id).collect()
}

#[test]
fn the_caller_is_never_in_its_own_reply() {
    let mut s = state();
    let t = Instant::now();
    let (first, interval) = s.announce(&ann(1, "", 0, false), seen(1), t).expect("announce");
    assert!(first.is_empty(), "alone in the swarm");
    assert_eq!(interval, Duration::from_secs(30));
    for p in 2..=20 {
        s.announce(&ann(p, "", 0, false), seen(p), t).expect("announce");
    }
    for p in 1..=20 {
        let (reply, _) = s.announce(&ann(p, "", 0, false), seen(p), t).expect("announce");
        assert_eq!(reply.len(), 19);
        assert!(!ids(&reply).contains(&pid(p)));
        assert_eq!(ids(&reply).into_iter().collect::<HashSet<_>>().len(), 19, "no duplicates");
    }
    assert_eq!(s.peer_count(&blob(1)), 20, "re-announces do not duplicate peers");
    s.check();
}

#[test]
fn replies_are_bounded_by_num_want_config_and_protocol() {
    let t = Instant::now();
    let mut s = TrackerState::new(TrackerConfig { max_peers_per_reply: 1000, ..TrackerConfig::default() }, 1);
    for p in 0..300 {
        s.announce(&ann(p, "", 0, false), seen(p), t).expect("announce");
    }
    let mut a = ann(1000, "", 0, false);
    a.num_want = 7;
    assert_eq!(s.announce(&a, seen(1000), t).expect("announce").0.len(), 7);
    a.num_want = 0;
    assert!(s.announce(&a, seen(1000), t).expect("announce").0.is_empty());
    a.num_want = u32::MAX;
    assert_eq!(s.announce(&a, seen(1000), t).expect("announce").0.len(), MAX_PEERS_PER_REPLY as usize);

    let mut s = state(); // max_peers_per_reply 50
    for p in 0..300 {
        s.announce(&ann(p, "", 0, false), seen(p), t).expect("announce");
    }
    a.num_want = 120;
    assert_eq!(s.announce(&a, seen(1000), t).expect("announce").0.len(), 50);
}

#[test]
fn peers_in_the_callers_zone_come_first() {
    let t = Instant::now();
    let mut s = state();
    // 90 peers elsewhere, 10 in zone "a"; the remote ones even hold the whole blob.
    for p in 0..90 {
        s.announce(&ann(p, "b", 4, true), seen(p), t).expect("announce");
    }
    for p in 90..100 {
        s.announce(&ann(p, "a", 0, false), seen(p), t).expect("announce");
    }
    let mut a = ann(500, "a", 0, false);
    a.num_want = 10;
    let (reply, _) = s.announce(&a, seen(500), t).expect("announce");
    assert!(reply.iter().all(|p| p.zone == "a"), "zone beats having pieces: {reply:?}");
    a.num_want = 15;
    let (reply, _) = s.announce(&a, seen(500), t).expect("announce");
    assert_eq!(reply.iter().filter(|p| p.zone == "a").count(), 10);
    assert_eq!(reply[..10].iter().filter(|p| p.zone == "a").count(), 10, "same zone first");
}

#[test]
fn zone_preference_holds_in_a_large_swarm() {
    // 10,000 peers, 40 of them in zone "a": a random sample of everyone would hold
    // about 1 of them; the zone index must find them all.
    let t = Instant::now();
    let mut s = state();
    for p in 0..10_000 {
        let zone = if p % 250 == 0 { "a" } else { "b" };
        s.announce(&ann(p, zone, 0, false), seen(p), t).expect("announce");
    }
    let (reply, _) = s.announce(&ann(20_000, "a", 0, false), seen(20_000), t).expect("announce");
    assert_eq!(reply.len(), 50);
    assert_eq!(reply.iter().filter(|p| p.zone == "a").count(), 40, "every same-zone peer");
    s.check();
}

#[test]
fn an_empty_zone_matches_nobody() {
    let t = Instant::now();
    let mut s = state();
    for p in 0..10 {
        s.announce(&ann(p, "", 0, false), seen(p), t).expect("announce");
    }
    s.announce(&ann(10, "x", 2, false), seen(10), t).expect("announce");
    let mut a = ann(99, "", 0, false);
    a.num_want = 1;
    let (reply, _) = s.announce(&a, seen(99), t).expect("announce");
    assert_eq!(ids(&reply), vec![pid(10)], "having pieces decides, not the shared empty label");
}

#[test]
fn seeds_then_partial_holders_then_the_rest() {
    let t = Instant::now();
    let mut s = state();
    for p in 0..5 {
        s.announce(&ann(p, "z", 0, false), seen(p), t).expect("announce");
    }
    for p in 5..10 {
        s.announce(&ann(p, "z", 3, false), seen(p), t).expect("announce");
    }
    for p in 10..15 {
        s.announce(&ann(p, "z", 8, true), seen(p), t).expect("announce");
    }
    let mut a = ann(99, "", 0, false);
    a.num_want = 5;
    let (reply, _) = s.announce(&a, seen(99), t).expect("announce");
    assert!(reply.iter().all(|p| p.complete), "{reply:?}");
    a.num_want = 8;
    let (reply, _) = s.announce(&a, seen(99), t).expect("announce");
    assert!(reply[..5].iter().all(|p| p.complete));
    assert!(reply[5..].iter().all(|p| !p.complete && p.have > 0));
    a.num_want = 50;
    let (reply, _) = s.announce(&a, seen(99), t).expect("announce");
    let buckets: Vec<u8> = reply.iter().map(|p| bucket(p, "")).collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "ordered by bucket: {buckets:?}");
}

#[test]
fn the_choice_within_a_bucket_is_random() {
    let t = Instant::now();
    let mut s = state();
    for p in 0..100 {
        s.announce(&ann(p, "", 0, false), seen(p), t).expect("announce");
    }
    let mut a = ann(999, "", 0, false);
    a.num_want = 10;
    let mut counts: HashMap<PeerId, usize> = HashMap::new();
    for _ in 0..200 {
        for p in s.announce(&a, seen(999), t).expect("announce").0 {
            *counts.entry(p.peer_id).or_default() += 1;
        }
    }
    // 2,000 picks over 100 peers: each expected 20 times.
    assert_eq!(counts.len(), 100, "every peer gets handed out");
    assert!(counts.values().all(|&c| (5..=45).contains(&c)), "{counts:?}");
}

#[test]
fn large_swarms_spread_the_load_but_keep_the_bias() {
    let t = Instant::now();
    let mut s = state();
    for p in 0..10_000 {
        // One seed in 20; everyone else has nothing.
        let seed = p % 20 == 0;
        s.announce(&ann(p, "", if seed { 4 } else { 0 }, seed), seen(p), t).expect("announce");
    }
    let mut handed: HashSet<PeerId> = HashSet::new();
    let mut seeds_in_replies = 0;
    for caller in 0..200 {
        let (reply, _) = s.announce(&ann(caller, "", 0, false), seen(caller), t).expect("announce");
        assert_eq!(reply.len(), 50);
        seeds_in_replies += reply.iter().filter(|p| p.complete).count();
        handed.extend(ids(&reply));
    }
    // 5 % of the swarm are seeds, but a reply draws from a sample of about 200 and
    // puts seeds first: about 10 of 50 are seeds, twice... four times their share.
    let per_reply = seeds_in_replies as f64 / 200.0;
    assert!(per_reply > 6.0, "seeds per reply {per_reply}");
    // The replies are not all the same few peers.
    assert!(handed.len() > 3_000, "{} distinct peers handed out", handed.len());
}

#[test]
fn advertised_address_wins_over_the_observed_one() {
    let t = Instant::now();
    let mut s = state();
    let mut a = ann(1, "", 0, false);
    a.advertise = Some("198.18.0.7:7100".parse().expect("addr"));
    s.announce(&a, "10.0.0.1:5555".parse().expect("addr"), t).expect("announce");
    let mut b = ann(2, "", 0, false);
    b.listen_port = 7200;
    s.announce(&b, "10.0.0.2:5555".parse().expect("addr"), t).expect("announce");
    let mut c = ann(3, "", 0, false);
    c.listen_port = 7300;
    s.announce(&c, "[::ffff:10.0.0.3]:5555".parse().expect("addr"), t).expect("announce");
    let mut d = ann(4, "", 0, false);
    d.listen_port = 7400;
    s.announce(&d, "[fd00::4]:5555".parse().expect("addr"), t).expect("announce");

    let (reply, _) = s.announce(&ann(9, "", 0, false), seen(9), t).expect("announce");
    let addrs: HashMap<PeerId, SocketAddr> = reply.iter().map(|p| (p.peer_id, p.addr)).collect();
    assert_eq!(addrs[&pid(1)], "198.18.0.7:7100".parse().expect("addr"));
    assert_eq!(addrs[&pid(2)], "10.0.0.2:7200".parse().expect("addr"), "observed IP, announced port");
    assert_eq!(addrs[&pid(3)], "10.0.0.3:7300".parse().expect("addr"), "IPv4-mapped becomes IPv4");
    assert_eq!(addrs[&pid(4)], "[fd00::4]:7400".parse().expect("addr"));
}

#[test]
fn unreachable_addresses_and_long_zones_are_refused() {
    let t = Instant::now();
    let mut s = state();
    let mut a = ann(1, "", 0, false);
    a.listen_port = 0;
    assert!(matches!(s.announce(&a, seen(1), t), Err(TrackerError::Unreachable { .. })));
    a.advertise = Some("0.0.0.0:7000".parse().expect("addr"));
    assert!(matches!(s.announce(&a, seen(1), t), Err(TrackerError::Unreachable { .. })));

    let mut z = ann(2, &"z".repeat(MAX_ZONE_LEN + 1), 0, false);
    let err = s.announce(&z, seen(2), t).expect_err("zone too long");
    assert!(matches!(err, TrackerError::ZoneTooLong { len, max: MAX_ZONE_LEN } if len == MAX_ZONE_LEN + 1));
    match s.handle(TrackerRequest::Announce(z.clone()), seen(2), t) {
        TrackerResponse::Error { code: TrackerErrorCode::Invalid, message } => assert!(message.contains("zone")),
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_eq!(s.peer_count(&blob(1)), 0, "refused announces are not recorded");
    z.zone = "z".repeat(MAX_ZONE_LEN);
    s.announce(&z, seen(2), t).expect("a zone of exactly the limit is fine");
}

#[test]
fn silent_peers_expire_and_empty_blobs_go_with_them() {
    let t0 = Instant::now();
    let ttl = Duration::from_secs(90);
    let mut s = state();
    s.register(metainfo(2, 4)).expect("register");
    s.announce(&ann(1, "", 0, false), seen(1), t0).expect("announce");
    let mut other_blob = ann(2, "", 0, false);
    other_blob.blob = blob(2);
    s.announce(&other_blob, seen(2), t0).expect("announce");
    // Peer 3 keeps announcing.
    s.announce(&ann(3, "", 0, false), seen(3), t0 + Duration::from_secs(60)).expect("announce");

    assert_eq!(s.expire(t0 + ttl - Duration::from_millis(1)), 0);
    // Not yet expired, but already too old to hand out.
    let (reply, _) = s.announce(&ann(4, "", 0, false), seen(4), t0 + ttl).expect("announce");
    assert_eq!(ids(&reply), vec![pid(3)]);

    assert_eq!(s.expire(t0 + ttl), 2, "peers 1 and 2");
    assert_eq!(s.peer_count(&blob(1)), 2, "peers 3 and 4 remain");
    assert_eq!(s.peer_count(&blob(2)), 0);
    assert!(s.metainfo(&blob(2)).is_some(), "a blob with metainfo stays");
    assert_eq!(s.blob_count(), 2);

    assert_eq!(s.expire(t0 + Duration::from_secs(1000)), 2);
    assert_eq!(s.blob_count(), 1, "blob 1 had no metainfo and no peers left");
    s.check();
}

#[test]
fn register_is_idempotent_and_refuses_conflicts() {
    let mut s = state();
    let m = metainfo(1, 3);
    s.register(m.clone()).expect("register");
    s.register(m.clone()).expect("same again");
    assert_eq!(s.metainfo(&blob(1)), Some(&m));
    let mut other = m.clone();
    other.piece_hashes[2] = [9; 32];
    assert!(matches!(s.register(other.clone()), Err(TrackerError::Conflict { blob: b }) if b == blob(1)));
    assert_eq!(s.metainfo(&blob(1)), Some(&m), "the first registration stands");
    assert_eq!(
        s.handle(TrackerRequest::Register { metainfo: other }, seen(1), Instant::now()),
        TrackerResponse::Error {
            code: TrackerErrorCode::Conflict,
            message: format!("a different metainfo is already registered for {}", blob(1)),
        }
    );

    let mut bad = metainfo(3, 3);
    bad.piece_hashes.pop();
    assert!(matches!(s.register(bad.clone()), Err(TrackerError::InvalidMetainfo { .. })));
    assert!(matches!(
        s.handle(TrackerRequest::Register { metainfo: bad }, seen(1), Instant::now()),
        TrackerResponse::Error { code: TrackerErrorCode::Invalid, .. }
    ));
    assert_eq!(s.metainfo(&blob(3)), None);
}

#[test]
fn peers_are_tracked_before_the_metainfo_arrives() {
    let t = Instant::now();
    let mut s = state();
    s.announce(&ann(1, "", 0, false), seen(1), t).expect("announce");
    assert_eq!(s.metainfo(&blob(1)), None);
    s.register(metainfo(1, 2)).expect("register");
    let (reply, _) = s.announce(&ann(2, "", 0, false), seen(2), t).expect("announce");
    assert_eq!(ids(&reply), vec![pid(1)]);
}

#[test]
fn handle_answers_every_request_kind() {
    let t = Instant::now();
    let mut s = state();
    let m = metainfo(1, 2);
    assert_eq!(
        s.handle(TrackerRequest::GetMetainfo { blob: blob(1) }, seen(1), t),
        TrackerResponse::Error {
            code: TrackerErrorCode::UnknownBlob,
            message: format!("no metainfo is registered for {}", blob(1)),
        }
    );
    assert_eq!(s.handle(TrackerRequest::Register { metainfo: m.clone() }, seen(1), t), TrackerResponse::Registered);
    assert_eq!(s.handle(TrackerRequest::GetMetainfo { blob: blob(1) }, seen(1), t), TrackerResponse::Metainfo(m));
    assert_eq!(
        s.handle(TrackerRequest::Announce(ann(1, "", 2, true)), seen(1), t),
        TrackerResponse::Peers { peers: vec![], interval_secs: 30 }
    );
    match s.handle(TrackerRequest::Announce(ann(2, "", 0, false)), seen(2), t) {
        TrackerResponse::Peers { peers, interval_secs: 30 } => {
            assert_eq!(
                peers,
                vec![PeerInfo {
                    peer_id: pid(1),
                    addr: SocketAddr::new(seen(1).ip(), 7000),
                    zone: String::new(),
                    have: 2,
                    complete: true,
                }]
            );
        }
        other => panic!("expected peers, got {other:?}"),
    }
    assert_eq!(s.handle(TrackerRequest::Leave { peer_id: pid(1), blob: blob(1) }, seen(1), t), TrackerResponse::Left);
    assert_eq!(s.peer_count(&blob(1)), 1);
    // Leaving twice, or a blob never seen, is fine.
    assert_eq!(s.handle(TrackerRequest::Leave { peer_id: pid(1), blob: blob(1) }, seen(1), t), TrackerResponse::Left);
    assert_eq!(s.handle(TrackerRequest::Leave { peer_id: pid(1), blob: blob(7) }, seen(1), t), TrackerResponse::Left);
    assert_eq!(s.blob_count(), 1);
}

#[test]
fn leave_drops_the_blob_when_nothing_is_left() {
    let t = Instant::now();
    let mut s = state();
    s.announce(&ann(1, "", 0, false), seen(1), t).expect("announce");
    assert!(s.has_peer(&blob(1), &pid(1)));
    s.leave(&pid(1), &blob(1));
    assert!(!s.has_peer(&blob(1), &pid(1)));
    assert_eq!(s.blob_count(), 0);
}

#[test]
fn re_announces_update_the_entry() {
    let t = Instant::now();
    let mut s = state();
    s.announce(&ann(1, "a", 0, false), seen(1), t).expect("announce");
    let mut again = ann(1, "b", 4, true);
    again.listen_port = 7777;
    s.announce(&again, seen(1), t).expect("announce");
    let (reply, _) = s.announce(&ann(2, "b", 0, false), seen(2), t).expect("announce");
    assert_eq!(reply.len(), 1);
    assert_eq!((reply[0].zone.as_str(), reply[0].have, reply[0].complete), ("b", 4, true));
    assert_eq!(reply[0].addr.port(), 7777);
    s.check();
}

#[test]
fn the_same_seed_gives_the_same_replies() {
    let run = |seed: u64| -> Vec<Vec<PeerId>> {
        let t = Instant::now();
        let mut s = TrackerState::new(TrackerConfig::default(), seed);
        let mut replies = Vec::new();
        for p in 0..2_000 {
            let zone = ["a", "b", "c"][p as usize % 3];
            let (reply, _) = s.announce(&ann(p, zone, p % 5, p % 7 == 0), seen(p), t).expect("announce");
            replies.push(ids(&reply));
            if p % 11 == 0 {
                s.leave(&pid(p / 2), &blob(1));
            }
        }
        replies
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

/// Random operations keep the index invariants (positions, zone lists) intact.
#[test]
fn invariants_survive_random_operations() {
    let mut rng = StdRng::seed_from_u64(3);
    let t0 = Instant::now();
    let mut s = TrackerState::new(TrackerConfig { peer_ttl: Duration::from_secs(50), ..TrackerConfig::default() }, 3);
    let mut tracked: HashSet<u32> = HashSet::new();
    for step in 0..5_000u64 {
        let now = t0 + Duration::from_secs(step / 20);
        let p = rng.gen_range(0..300u32);
        match rng.gen_range(0..10) {
            0..=5 => {
                let zone = ["", "a", "b", "c"][rng.gen_range(0..4)];
                s.announce(&ann(p, zone, rng.gen_range(0..3), rng.gen_bool(0.2)), seen(p), now).expect("announce");
                tracked.insert(p);
            }
            6..=7 => {
                s.leave(&pid(p), &blob(1));
                tracked.remove(&p);
            }
            8 => {
                s.expire(now);
                tracked.retain(|&q| s.has_peer(&blob(1), &pid(q)));
            }
            _ => {
                let (reply, _) = s.announce(&ann(p, "a", 0, false), seen(p), now).expect("announce");
                tracked.insert(p);
                assert!(!ids(&reply).contains(&pid(p)));
            }
        }
        s.check();
        assert_eq!(s.peer_count(&blob(1)), tracked.len());
    }
}

#[test]
fn announces_stay_cheap_with_ten_thousand_peers() {
    let t = Instant::now();
    let mut s = state();
    let started = std::time::Instant::now();
    for round in 0..3 {
        for p in 0..10_000 {
            let (reply, _) =
                s.announce(&ann(p, ["a", "b"][p as usize % 2], round, false), seen(p), t).expect("announce");
            assert!(reply.len() <= 50);
        }
    }
    // 30,000 announces; O(n) per announce would be 3 * 10^8 steps.
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}
