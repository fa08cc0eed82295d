//! Several trackers over real QUIC on loopback: per-blob arbiters by rendezvous
//! hashing, failover when the arbiter stops, its return with a new instance id,
//! lease re-assertion on the next tracker, the lease grace, store announces, and a
//! version-1 tracker (one that cannot decode `Hello`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use swarm_net::{ClusterToken, Endpoint, EndpointConfig, codes, read_msg, write_msg};
use swarm_proto::codec::MAX_FRAME_LEN;
use swarm_proto::msg::{LeaseReply, StoreAnnounce, TrackerRequest, TrackerResponse};
use swarm_proto::{Digest, Layout, Metainfo, PeerId};
use swarm_tracker::client::{TrackerClientError, rendezvous_order};
use swarm_tracker::state::NO_HOLDER;
use swarm_tracker::{TrackerClient, TrackerConfig, serve};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const PIECE: u32 = 256 * 1024;

fn token() -> ClusterToken {
    ClusterToken::new(vec![3; 32]).expect("token")
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

struct Tracker {
    addr: SocketAddr,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Tracker {
    fn start(addr: SocketAddr, grace: Duration) -> Self {
        let deadline = Instant::now() + Duration::from_secs(5);
        let endpoint = loop {
            match Endpoint::bind(addr, token(), &EndpointConfig::default()) {
                Ok(ep) => break ep,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("rebinding {addr}: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot bind the tracker: {e}"),
            }
        };
        let addr = endpoint.local_addr().expect("addr");
        let cancel = CancellationToken::new();
        let config = TrackerConfig { lease_grace: grace, ..TrackerConfig::default() };
        let task = tokio::spawn(serve(endpoint, config, cancel.clone()));
        let task = tokio::spawn(async move { task.await.expect("join").expect("serve") });
        Self { addr, cancel, task }
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("serve stops").expect("join");
    }
}

fn client(trackers: Vec<SocketAddr>) -> TrackerClient {
    let endpoint = Endpoint::bind(loopback(), token(), &EndpointConfig::default()).expect("bind");
    TrackerClient::with_trackers(endpoint, trackers, Duration::from_secs(15))
}

fn metainfo(seed: &[u8], pieces: u32) -> Metainfo {
    Metainfo {
        digest: Digest::of(seed),
        length: u64::from(pieces) * u64::from(PIECE),
        piece_length: PIECE,
        piece_hashes: (0..pieces).map(|i| [i as u8 + 1; 32]).collect(),
    }
}

async fn three(grace: Duration) -> Vec<Tracker> {
    vec![Tracker::start(loopback(), grace), Tracker::start(loopback(), grace), Tracker::start(loopback(), grace)]
}

/// Waits until `check` holds for the client's view of `tracker`, or panics.
async fn wait_view(
    c: &TrackerClient,
    tracker: SocketAddr,
    what: &str,
    check: impl Fn(&swarm_tracker::client::TrackerInfo) -> bool,
) {
    let mut view = c.watch();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if view.borrow_and_update().iter().any(|t| t.addr == tracker && check(t)) {
            return;
        }
        if tokio::time::timeout_at(deadline, view.changed()).await.is_err() {
            panic!("{what}: not within 10 s; view {:?}", *view.borrow());
        }
    }
}

#[tokio::test]
async fn each_blob_goes_to_its_arbiter_and_fails_over_when_it_stops() {
    let mut trackers = three(Duration::ZERO).await;
    let addrs: Vec<SocketAddr> = trackers.iter().map(|t| t.addr).collect();
    let c = client(addrs.clone());
    let m = metainfo(b"failover", 4);
    let order = rendezvous_order(&addrs, &m.digest);
    assert_eq!(c.arbiter(&m.digest).map(|(a, _)| a), Some(order[0]));
    c.register(&m).await.expect("register");
    // Only the arbiter has it.
    for t in &addrs {
        let single = client(vec![*t]);
        let known = single.get_metainfo(m.digest).await.expect("get").is_some();
        assert_eq!(known, *t == order[0], "tracker {t}");
    }
    let first_instance = c.watch().borrow().iter().find(|t| t.addr == order[0]).and_then(|t| t.instance);
    assert!(first_instance.is_some(), "Hello gave the instance id");

    // The arbiter stops: the next request goes to the next tracker in the blob's order.
    let i = trackers.iter().position(|t| t.addr == order[0]).expect("arbiter");
    trackers.remove(i).stop().await;
    let started = Instant::now();
    assert_eq!(c.get_metainfo(m.digest).await.expect("failed over"), None, "the next tracker knows nothing yet");
    assert!(started.elapsed() < Duration::from_secs(6), "failover took {:?}", started.elapsed());
    wait_view(&c, order[0], "arbiter marked down", |t| !t.up).await;
    assert_eq!(c.arbiter(&m.digest).map(|(a, _)| a), Some(order[1]));
    c.register(&m).await.expect("register at the next tracker");
    assert!(client(vec![order[1]]).get_metainfo(m.digest).await.expect("get").is_some());

    // It comes back on the same address: probed up again, with a new instance id.
    trackers.push(Tracker::start(order[0], Duration::ZERO));
    wait_view(&c, order[0], "arbiter back with a new instance", |t| t.up && t.instance != first_instance).await;
    assert_eq!(c.arbiter(&m.digest).map(|(a, _)| a), Some(order[0]));
    for t in trackers {
        t.stop().await;
    }
}

#[tokio::test]
async fn a_lease_holder_re_asserts_its_lease_on_the_next_tracker() {
    let grace = Duration::from_millis(600);
    let mut trackers = three(grace).await;
    let addrs: Vec<SocketAddr> = trackers.iter().map(|t| t.addr).collect();
    let holder = client(addrs.clone());
    let other = client(addrs.clone());
    let m = metainfo(b"lease", 8);
    let layout = Layout { digest: m.digest, length: m.length, piece_length: m.piece_length };
    let (me, them) = (PeerId([1; 16]), PeerId([2; 16]));

    // The start grace: nobody is granted a lease yet.
    assert_eq!(holder.acquire_lease(me, m.digest).await.expect("acquire"), LeaseReply::HeldBy { holder: NO_HOLDER });
    tokio::time::sleep(grace).await;
    assert!(matches!(holder.acquire_lease(me, m.digest).await.expect("acquire"), LeaseReply::Granted { .. }));
    holder.publish_hashes(me, layout, 0, &[]).await.expect("layout");
    holder.publish_hashes(me, layout, 0, &m.piece_hashes[..3]).await.expect("publish");

    let order = rendezvous_order(&addrs, &m.digest);
    let i = trackers.iter().position(|t| t.addr == order[0]).expect("arbiter");
    trackers.remove(i).stop().await;
    // The holder goes on publishing where it was; the next tracker knows none of the
    // earlier hashes and refuses, so the holder (`swarm_core::lease::Publisher`)
    // publishes the whole prefix, which re-asserts the lease there.
    let gap = holder.publish_hashes(me, layout, 3, &m.piece_hashes[3..4]).await;
    assert!(matches!(gap, Err(TrackerClientError::Refused { .. })), "{gap:?}");
    holder.publish_hashes(me, layout, 0, &m.piece_hashes[..4]).await.expect("publish after failover");
    assert_eq!(other.acquire_lease(them, m.digest).await.expect("acquire"), LeaseReply::HeldBy { holder: me });
    let h = other.get_hashes(m.digest, 0).await.expect("hashes").expect("known");
    assert_eq!(h.hashes, m.piece_hashes[..4].to_vec());
    holder.publish_hashes(me, layout, 4, &m.piece_hashes[4..]).await.expect("the rest");
    assert_eq!(other.get_metainfo(m.digest).await.expect("get"), Some(m.clone()));
    holder.release_lease(me, m.digest, None).await.expect("release");
    for t in trackers {
        t.stop().await;
    }
}

#[tokio::test]
async fn a_store_announce_makes_every_listed_blob_known() {
    let tracker = Tracker::start(loopback(), Duration::ZERO);
    let c = client(vec![tracker.addr]);
    let blobs: Vec<Metainfo> = (0..5u8).map(|i| metainfo(&[i], 3)).collect();
    let mut ann = StoreAnnounce {
        peer_id: PeerId([9; 16]),
        listen_port: 7001,
        advertise: None,
        zone: "rack-1".into(),
        blobs: blobs.iter().map(|m| m.digest).collect(),
        metainfo: blobs[..3].to_vec(),
    };
    let (interval, missing) = c.announce_store(tracker.addr, &ann).await.expect("announce");
    assert_eq!(interval, Duration::from_secs(30));
    assert_eq!(missing, vec![blobs[3].digest, blobs[4].digest]);
    ann.metainfo = blobs[3..].to_vec();
    let (_, missing) = c.announce_store(tracker.addr, &ann).await.expect("announce");
    assert!(missing.is_empty());
    for m in &blobs {
        assert_eq!(c.get_metainfo(m.digest).await.expect("get").as_ref(), Some(m));
    }
    let view = c.cluster_view(Vec::new()).await.expect("view");
    assert_eq!(view.blobs.len(), 5);
    for b in &view.blobs {
        assert_eq!(b.holders.len(), 1);
        assert!(b.holders[0].complete && b.holders[0].have == 3, "{b:?}");
    }
    assert_eq!(view.nodes.len(), 1);
    assert_eq!(view.nodes[0].zone, "rack-1");
    tracker.stop().await;
}

/// A stand-in for a version-1 tracker: it refuses what version 1 cannot decode (the
/// variants after `ClusterView`) exactly as the old server did (stream reset with
/// `PROTOCOL_ERROR`), and answers `Register` with `Registered`.
async fn old_tracker(endpoint: Endpoint, cancel: CancellationToken) {
    while let Some(incoming) = tokio::select! { i = endpoint.accept() => i, () = cancel.cancelled() => None } {
        let Ok(conn) = incoming.authenticate().await else { continue };
        tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let req = read_msg::<TrackerRequest>(&mut recv, MAX_FRAME_LEN).await;
                match req {
                    Ok(Some(TrackerRequest::Register { .. })) => {
                        let _ = write_msg(&mut send, &TrackerResponse::Registered).await;
                        let _ = send.finish();
                    }
                    Ok(Some(TrackerRequest::Hello { .. } | TrackerRequest::AnnounceStore(_))) | Err(_) => {
                        let code = quinn::VarInt::from_u32(codes::PROTOCOL_ERROR);
                        let _ = send.reset(code);
                        let _ = recv.stop(code);
                    }
                    _ => {
                        let _ = send.finish();
                    }
                }
            }
        });
    }
}

#[tokio::test]
async fn an_old_tracker_is_spoken_to_in_version_1() {
    let endpoint = Endpoint::bind(loopback(), token(), &EndpointConfig::default()).expect("bind");
    let addr = endpoint.local_addr().expect("addr");
    let cancel = CancellationToken::new();
    let server = tokio::spawn(old_tracker(endpoint, cancel.clone()));
    let c = client(vec![addr]);
    c.register(&metainfo(b"old", 2)).await.expect("register with a version-1 tracker");
    wait_view(&c, addr, "version 1 noted", |t| t.version == Some(1) && t.instance.is_none()).await;
    let ann = StoreAnnounce {
        peer_id: PeerId([9; 16]),
        listen_port: 7001,
        advertise: None,
        zone: String::new(),
        blobs: Vec::new(),
        metainfo: Vec::new(),
    };
    let err = c.announce_store(addr, &ann).await.expect_err("not sent to a version-1 tracker");
    assert!(matches!(err, TrackerClientError::Unsupported { version: 1, .. }), "{err:?}");
    cancel.cancel();
    server.abort();
}
