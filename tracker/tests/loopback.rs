//! The tracker over real QUIC on loopback: server, clients, wrong tokens, restarts,
//! malformed requests, upstream leases and incremental hashes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use swarm_net::{ClusterToken, Endpoint, EndpointConfig, NetError, codes, read_msg, write_msg};
use swarm_proto::msg::{Announce, LeaseReply, TrackerErrorCode, TrackerRequest, TrackerResponse};
use swarm_proto::{Digest, Layout, Metainfo, PeerId};
use swarm_tracker::{HashesReply, TrackerClient, TrackerClientError, TrackerConfig, serve};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const PIECE: u32 = 256 * 1024;

fn token(fill: u8) -> ClusterToken {
    ClusterToken::new(vec![fill; 32]).expect("token")
}

fn bind(fill: u8, addr: SocketAddr) -> Endpoint {
    Endpoint::bind(addr, token(fill), &EndpointConfig::default()).expect("bind")
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
    /// A tracker without the lease grace of its first seconds (the tests here
    /// acquire leases at once; `replicas.rs` tests the grace).
    fn start(fill: u8, addr: SocketAddr) -> Self {
        Self::start_with(fill, addr, TrackerConfig { lease_grace: Duration::ZERO, ..TrackerConfig::default() })
    }

    fn start_with(fill: u8, addr: SocketAddr, config: TrackerConfig) -> Self {
        // The previous tracker's socket may take a moment to be released.
        let deadline = Instant::now() + Duration::from_secs(5);
        let endpoint = loop {
            match Endpoint::bind(addr, token(fill), &EndpointConfig::default()) {
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
        let task = tokio::spawn(serve(endpoint, config, cancel.clone()));
        let task = tokio::spawn(async move { task.await.expect("join").expect("serve") });
        Self { addr, cancel, task }
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("serve stops").expect("join");
    }
}

fn client(fill: u8, tracker: SocketAddr) -> (TrackerClient, u16) {
    let endpoint = bind(fill, loopback());
    let port = endpoint.local_addr().expect("addr").port();
    (TrackerClient::new(endpoint, tracker), port)
}

fn metainfo() -> Metainfo {
    Metainfo {
        digest: Digest::of(b"blob"),
        length: 3 * u64::from(PIECE) - 5,
        piece_length: PIECE,
        piece_hashes: vec![[1; 32], [2; 32], [3; 32]],
    }
}

fn announce(peer: u8, port: u16, have: u32, complete: bool) -> Announce {
    Announce {
        peer_id: PeerId([peer; 16]),
        blob: metainfo().digest,
        listen_port: port,
        advertise: None,
        zone: "rack-a".into(),
        have,
        complete,
        num_want: 50,
    }
}

#[tokio::test]
async fn two_peers_find_each_other_through_the_tracker() {
    let tracker = Tracker::start(1, loopback());
    let (seeder, seeder_port) = client(1, tracker.addr);
    let (leecher, leecher_port) = client(1, tracker.addr);
    let m = metainfo();

    assert_eq!(leecher.get_metainfo(m.digest).await.expect("get"), None, "nothing registered yet");
    seeder.register(&m).await.expect("register");
    seeder.register(&m).await.expect("register is idempotent");
    assert_eq!(leecher.get_metainfo(m.digest).await.expect("get"), Some(m.clone()));

    let mut conflicting = m.clone();
    conflicting.piece_hashes[0] = [9; 32];
    match leecher.register(&conflicting).await {
        Err(TrackerClientError::Refused { code: TrackerErrorCode::Conflict, message }) => {
            assert!(message.contains(&m.digest.to_string()), "{message}");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }

    let (peers, interval) = seeder.announce(&announce(1, seeder_port, 3, true)).await.expect("announce");
    assert!(peers.is_empty(), "the seeder is alone: {peers:?}");
    assert_eq!(interval, Duration::from_secs(30));

    let (peers, _) = leecher.announce(&announce(2, leecher_port, 0, false)).await.expect("announce");
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].peer_id, PeerId([1; 16]));
    assert_eq!(peers[0].addr, SocketAddr::from(([127, 0, 0, 1], seeder_port)), "observed IP, listen port");
    assert!(peers[0].complete);
    assert_eq!(peers[0].zone, "rack-a");

    // An advertised address is handed out as is.
    let mut adv = announce(3, 1, 0, false);
    adv.advertise = Some("198.18.0.9:7000".parse().expect("addr"));
    leecher.announce(&adv).await.expect("announce");
    let (peers, _) = seeder.announce(&announce(1, seeder_port, 3, true)).await.expect("announce");
    let mut addrs: Vec<SocketAddr> = peers.iter().map(|p| p.addr).collect();
    addrs.sort();
    assert_eq!(
        addrs,
        vec![SocketAddr::from(([127, 0, 0, 1], leecher_port)), "198.18.0.9:7000".parse().expect("addr"),]
    );

    // Leaving takes a peer out of replies.
    leecher.leave(PeerId([2; 16]), m.digest).await.expect("leave");
    let (peers, _) = seeder.announce(&announce(1, seeder_port, 3, true)).await.expect("announce");
    assert_eq!(peers.iter().map(|p| p.peer_id).collect::<Vec<_>>(), vec![PeerId([3; 16])]);

    // Requests in parallel share the connection.
    let results = futures_join(&leecher, m.digest).await;
    assert!(results.iter().all(|r| r.as_ref().is_ok_and(|m| m.is_some())), "{results:?}");

    tracker.stop().await;
}

async fn futures_join(client: &TrackerClient, blob: Digest) -> Vec<Result<Option<Metainfo>, TrackerClientError>> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let c = client.clone();
        set.spawn(async move { c.get_metainfo(blob).await });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.expect("join"));
    }
    out
}

#[tokio::test]
async fn a_client_with_the_wrong_token_gets_a_clear_error() {
    let tracker = Tracker::start(1, loopback());
    let (intruder, _) = client(2, tracker.addr);
    let err = intruder.get_metainfo(metainfo().digest).await.expect_err("must be refused");
    assert!(err.is_auth_rejected(), "{err:?}");
    assert!(
        matches!(&err, TrackerClientError::Net { source: NetError::AuthRejected { addr }, .. } if *addr == tracker.addr),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("cluster token mismatch") && text.contains(&tracker.addr.to_string()), "{text}");

    // The tracker still serves the right token.
    let (friend, _) = client(1, tracker.addr);
    friend.register(&metainfo()).await.expect("register");
    tracker.stop().await;
}

#[tokio::test]
async fn a_client_reconnects_after_a_graceful_tracker_restart() {
    let first = Tracker::start(1, loopback());
    let addr = first.addr;
    let (peer, port) = client(1, addr);
    peer.register(&metainfo()).await.expect("register");
    peer.announce(&announce(1, port, 3, true)).await.expect("announce");
    first.stop().await;

    let second = Tracker::start(1, addr);
    assert_eq!(second.addr, addr);
    // The new tracker knows nothing; the peer re-registers, as the agent does.
    let started = Instant::now();
    assert_eq!(peer.get_metainfo(metainfo().digest).await.expect("after restart"), None);
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    peer.register(&metainfo()).await.expect("re-register");
    let (other, other_port) = client(1, addr);
    peer.announce(&announce(1, port, 3, true)).await.expect("re-announce");
    let (peers, _) = other.announce(&announce(2, other_port, 0, false)).await.expect("announce");
    assert_eq!(peers.len(), 1);
    second.stop().await;
}

/// The tracker dies without closing anything (its runtime is dropped) and a new one
/// starts on the same port: the client's stale connection is reset by the new
/// tracker, and the request succeeds after one reconnect, well within its timeout.
#[tokio::test]
async fn a_client_recovers_at_once_from_a_tracker_crash() {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (crash_tx, crash_rx) = std::sync::mpsc::channel::<()>();
    let crashed = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async {
            let tracker = Tracker::start(1, loopback());
            addr_tx.send(tracker.addr).expect("addr");
            let _ = tokio::task::spawn_blocking(move || crash_rx.recv()).await;
            drop(tracker); // never cancelled: it just dies with the runtime
        });
        drop(rt);
    });
    let addr = tokio::task::spawn_blocking(move || addr_rx.recv()).await.expect("join").expect("addr");
    let (peer, _) = client(1, addr);
    peer.register(&metainfo()).await.expect("register");

    crash_tx.send(()).expect("crash");
    tokio::task::spawn_blocking(move || crashed.join()).await.expect("join").expect("thread");

    let second = Tracker::start(1, addr);
    let started = Instant::now();
    assert_eq!(peer.get_metainfo(metainfo().digest).await.expect("after crash"), None);
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    second.stop().await;
}

#[tokio::test]
async fn malformed_requests_are_refused_without_hurting_anyone() {
    let tracker = Tracker::start(1, loopback());
    let raw = bind(1, loopback());
    let conn = raw.connect(tracker.addr).await.expect("connect");

    // Garbage of the announced length.
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    send.write_all(&4u32.to_be_bytes()).await.expect("write");
    send.write_all(&[0xff; 4]).await.expect("write");
    let _ = send.finish();
    let err = read_msg::<TrackerResponse>(&mut recv, 1 << 20).await.expect_err("refused");
    assert_eq!(err.remote_code(), Some(codes::PROTOCOL_ERROR), "{err:?}");

    // A length prefix over the limit.
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    send.write_all(&u32::MAX.to_be_bytes()).await.expect("write");
    let err = read_msg::<TrackerResponse>(&mut recv, 1 << 20).await.expect_err("refused");
    assert_eq!(err.remote_code(), Some(codes::PROTOCOL_ERROR), "{err:?}");

    // The same connection still works for a proper request.
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    write_msg(&mut send, &TrackerRequest::GetMetainfo { blob: metainfo().digest }).await.expect("write");
    let _ = send.finish();
    let response: Option<TrackerResponse> = read_msg(&mut recv, 1 << 20).await.expect("read");
    assert!(matches!(response, Some(TrackerResponse::Error { code: TrackerErrorCode::UnknownBlob, .. })));

    // So does everyone else.
    let (peer, _) = client(1, tracker.addr);
    peer.register(&metainfo()).await.expect("register");
    tracker.stop().await;
}

#[tokio::test]
async fn requests_to_a_silent_address_time_out() {
    // A UDP socket that never answers.
    let silent = std::net::UdpSocket::bind(loopback()).expect("bind");
    let addr = silent.local_addr().expect("addr");
    let endpoint = bind(1, loopback());
    let peer = TrackerClient::with_timeout(endpoint, addr, Duration::from_millis(500));
    let started = Instant::now();
    let err = peer.get_metainfo(metainfo().digest).await.expect_err("no tracker");
    assert!(matches!(err, TrackerClientError::Timeout { tracker, .. } if tracker == addr), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

fn upstream_layout(name: &[u8], pieces: u32) -> Layout {
    Layout { digest: Digest::of(name), length: u64::from(pieces) * u64::from(PIECE) - 3, piece_length: PIECE }
}

fn piece_hashes(pieces: u8) -> Vec<[u8; 32]> {
    (1..=pieces).map(|i| [i; 32]).collect()
}

/// One node fetches from upstream and publishes hashes in two batches; another is
/// told who holds the lease and reads the hashes as they come, then the metainfo.
#[tokio::test]
async fn one_node_fetches_upstream_while_another_reads_its_hashes() {
    let tracker = Tracker::start(1, loopback());
    let (holder, _) = client(1, tracker.addr);
    let (other, _) = client(1, tracker.addr);
    let (a, b) = (PeerId([1; 16]), PeerId([2; 16]));
    let layout = upstream_layout(b"upstream", 5);
    let blob = layout.digest;
    let hashes = piece_hashes(5);

    assert_eq!(other.get_hashes(blob, 0).await.expect("get"), None, "nothing known yet");
    assert_eq!(
        holder.acquire_lease(a, blob).await.expect("acquire"),
        LeaseReply::Granted { ttl_secs: 10, resume_from: 0 }
    );
    assert_eq!(other.acquire_lease(b, blob).await.expect("acquire"), LeaseReply::HeldBy { holder: a });
    assert_eq!(other.get_hashes(blob, 0).await.expect("get"), None, "a lease but no hashes yet");
    holder.publish_hashes(a, layout, 0, &[]).await.expect("the layout alone");
    let empty = other.get_hashes(blob, 0).await.expect("get").expect("layout known");
    assert_eq!(empty, HashesReply { layout, first: 0, hashes: vec![], complete: false });

    holder.publish_hashes(a, layout, 0, &hashes[..2]).await.expect("first batch");
    let first = other.get_hashes(blob, 0).await.expect("get").expect("known");
    assert_eq!(first, HashesReply { layout, first: 0, hashes: hashes[..2].to_vec(), complete: false });
    let nothing_new = other.get_hashes(blob, first.end()).await.expect("get").expect("known");
    assert_eq!((nothing_new.first, nothing_new.hashes.len(), nothing_new.complete), (2, 0, false));

    // Only the holder publishes.
    let err = other.publish_hashes(b, layout, 2, &hashes[2..3]).await.expect_err("not the holder");
    assert!(err.is_not_lease_holder(), "{err:?}");
    // A contradicting batch is a conflict.
    let err = holder.publish_hashes(a, layout, 1, &[[9; 32]]).await.expect_err("conflict");
    assert!(matches!(&err, TrackerClientError::Refused { code: TrackerErrorCode::Conflict, .. }), "{err:?}");
    assert!(!err.is_not_lease_holder());

    holder.publish_hashes(a, layout, 2, &hashes[2..]).await.expect("second batch");
    let rest = other.get_hashes(blob, first.end()).await.expect("get").expect("known");
    assert_eq!(rest, HashesReply { layout, first: 2, hashes: hashes[2..].to_vec(), complete: true });
    let metainfo = Metainfo { digest: blob, length: layout.length, piece_length: PIECE, piece_hashes: hashes };
    assert_eq!(other.get_metainfo(blob).await.expect("get"), Some(metainfo.clone()));
    assert_eq!(other.acquire_lease(b, blob).await.expect("acquire"), LeaseReply::NotNeeded);

    let err = other.release_lease(b, blob, None).await.expect_err("not the holder");
    assert!(err.is_not_lease_holder(), "{err:?}");
    holder.release_lease(a, blob, None).await.expect("release");
    holder.release_lease(a, blob, None).await.expect("releasing twice is a no-op");
    assert_eq!(other.get_metainfo(blob).await.expect("get"), Some(metainfo.clone()), "the metainfo stays");
    holder.register(&metainfo).await.expect("registering the same metainfo is idempotent");

    // A failed fetch of another blob: the others are told so for a while.
    let broken = upstream_layout(b"broken", 3);
    assert!(matches!(holder.acquire_lease(a, broken.digest).await.expect("acquire"), LeaseReply::Granted { .. }));
    holder.publish_hashes(a, broken, 0, &piece_hashes(1)).await.expect("publish");
    holder.release_lease(a, broken.digest, Some("upstream answered 503".into())).await.expect("release");
    assert_eq!(
        other.acquire_lease(b, broken.digest).await.expect("acquire"),
        LeaseReply::Failed { reason: "upstream answered 503".into() }
    );
    assert_eq!(other.get_hashes(broken.digest, 0).await.expect("get"), None, "the partial hashes were dropped");
    tracker.stop().await;
}

/// A holder that goes silent loses the lease after its ttl; the next node resumes
/// where the hashes stop, and the old holder learns it lost the lease.
#[tokio::test]
async fn a_lease_moves_when_its_holder_goes_silent() {
    let config =
        TrackerConfig { lease_ttl: Duration::from_secs(1), lease_grace: Duration::ZERO, ..TrackerConfig::default() };
    let tracker = Tracker::start_with(1, loopback(), config);
    let (holder, _) = client(1, tracker.addr);
    let (other, _) = client(1, tracker.addr);
    let (a, b) = (PeerId([1; 16]), PeerId([2; 16]));
    let layout = upstream_layout(b"slow upstream", 4);
    let hashes = piece_hashes(4);

    assert_eq!(
        holder.acquire_lease(a, layout.digest).await.expect("acquire"),
        LeaseReply::Granted { ttl_secs: 1, resume_from: 0 }
    );
    holder.publish_hashes(a, layout, 0, &hashes[..2]).await.expect("publish");
    assert_eq!(other.acquire_lease(b, layout.digest).await.expect("acquire"), LeaseReply::HeldBy { holder: a });
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        other.acquire_lease(b, layout.digest).await.expect("acquire"),
        LeaseReply::Granted { ttl_secs: 1, resume_from: 2 }
    );
    let err = holder.publish_hashes(a, layout, 2, &hashes[2..3]).await.expect_err("lost the lease");
    assert!(err.is_not_lease_holder(), "{err:?}");
    other.publish_hashes(b, layout, 2, &hashes[2..]).await.expect("the new holder resumes");
    let all = holder.get_hashes(layout.digest, 0).await.expect("get").expect("known");
    assert_eq!(all, HashesReply { layout, first: 0, hashes, complete: true });
    other.release_lease(b, layout.digest, None).await.expect("release");
    tracker.stop().await;
}

/// The uplink cap over QUIC: with two capped trackers, two holders' requests both go
/// to the cap's owner (the first tracker in the rendezvous order of the fixed key),
/// which divides the cap between them; a holder done fetching gives its share back;
/// a tracker without a cap answers "uncapped".
#[tokio::test]
async fn uplink_shares_are_divided_by_one_owner_among_the_holders() {
    const CAP: u64 = 5_000_000;
    let config = TrackerConfig { uplink_cap: Some(CAP), ..TrackerConfig::default() };
    let (a, b) = (Tracker::start_with(1, loopback(), config.clone()), Tracker::start_with(1, loopback(), config));
    let both = || {
        let endpoint = bind(1, loopback());
        TrackerClient::with_trackers(endpoint, vec![a.addr, b.addr], Duration::from_secs(10))
    };
    let (c1, c2) = (both(), both());
    let (p1, p2) = (PeerId([1; 16]), PeerId([2; 16]));
    let (b1, b2) = (Digest::of(b"one"), Digest::of(b"two"));
    let share = |s: swarm_tracker::state::uplink::Share| s.bytes_per_sec.expect("capped");
    assert_eq!(share(c1.uplink_share(p1, b1, true).await.expect("share")), CAP);
    // The second holder gets what is left until the first renews at its new share.
    assert_eq!(share(c2.uplink_share(p2, b2, true).await.expect("share")), 1);
    assert_eq!(share(c1.uplink_share(p1, b1, true).await.expect("share")), CAP / 2);
    let s2 = c2.uplink_share(p2, b2, true).await.expect("share");
    assert_eq!((share(s2), s2.renew), (CAP / 2, Duration::from_millis(500)));
    // The first is done: the second gets the whole cap at its next renewal.
    c1.uplink_share(p1, b1, false).await.expect("done");
    assert_eq!(share(c2.uplink_share(p2, b2, true).await.expect("share")), CAP);

    let plain = Tracker::start(1, loopback());
    let (c3, _) = client(1, plain.addr);
    let s = c3.uplink_share(p1, b1, true).await.expect("share");
    assert_eq!((s.bytes_per_sec, s.renew), (None, Duration::from_secs(5)));
    for t in [a, b, plain] {
        t.stop().await;
    }
}
