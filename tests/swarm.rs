//! End-to-end swarms in one process: a real tracker, real nodes, real QUIC on
//! loopback, real files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use swarm_net::{ClusterToken, Endpoint, EndpointConfig, read_msg, write_msg};
use swarm_peer::node::{Node, NodeConfig, NodeError};
use swarm_proto::codec::MAX_PEER_FRAME_LEN;
use swarm_proto::msg::{Announce, PeerMessage};
use swarm_proto::{Bitfield, Metainfo, PROTOCOL_VERSION, PeerId};
use swarm_tracker::client::TrackerClient;
use swarm_tracker::state::TrackerConfig;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

struct Cluster {
    dir: tempfile::TempDir,
    token: ClusterToken,
    tracker: std::net::SocketAddr,
    cancel: CancellationToken,
}

impl Cluster {
    async fn start() -> Self {
        let token = ClusterToken::generate();
        let ep = Endpoint::bind(loopback(), token.clone(), &EndpointConfig::default()).expect("bind tracker");
        let tracker = ep.local_addr().expect("addr");
        let cancel = CancellationToken::new();
        let config = TrackerConfig { announce_interval: Duration::from_secs(2), ..TrackerConfig::default() };
        tokio::spawn(swarm_tracker::server::serve(ep, config, cancel.clone()));
        Self { dir: tempfile::tempdir().expect("tempdir"), token, tracker, cancel }
    }

    fn config(&self, name: &str) -> NodeConfig {
        NodeConfig::new(self.dir.path().join(name))
    }

    fn node(&self, config: NodeConfig) -> Node {
        let ep = Endpoint::bind(loopback(), self.token.clone(), &EndpointConfig::default()).expect("bind node");
        Node::start(ep, self.tracker, config).expect("start node")
    }

    /// Writes a random blob, starts a seed node for it, returns its metainfo.
    async fn seed(&self, size: u64, upload_rate: Option<u64>) -> (Node, Metainfo, PathBuf) {
        let path = self.dir.path().join("original");
        write_random(&path, size, 7);
        let p = path.clone();
        let meta = tokio::task::spawn_blocking(move || swarm_peer::store::hash_file(&p, |_| {}))
            .await
            .expect("join")
            .expect("hash");
        let mut config = self.config("seed");
        config.upload_rate = upload_rate;
        let node = self.node(config);
        node.seed(&path, meta.clone()).await.expect("seed");
        (node, meta, path)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn loopback() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn write_random(path: &Path, size: u64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; size as usize];
    rng.fill_bytes(&mut data);
    std::fs::write(path, &data).expect("write blob");
}

fn stored(node: &Node, meta: &Metainfo) -> PathBuf {
    node.store().root().join("blobs").join(meta.digest.hex()).join("data")
}

async fn within<T>(secs: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f).await.unwrap_or_else(|_| panic!("{what} took over {secs} s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_pullers_get_identical_copies_and_trade_pieces() {
    let cluster = Cluster::start().await;
    // The seed's upload is capped so that pullers must trade to finish quickly.
    let (seed, meta, original) = cluster.seed(64 * MIB, Some(40_000_000)).await;
    let pullers: Vec<Node> = (0..8).map(|i| cluster.node(cluster.config(&format!("p{i}")))).collect();
    let mut tasks = Vec::new();
    for p in &pullers {
        let p = p.clone();
        let digest = meta.digest;
        tasks.push(tokio::spawn(async move {
            let mut d = p.fetch(digest).await?;
            d.finished().await
        }));
    }
    within(120, "8 pulls of 64 MiB", async {
        for t in tasks {
            t.await.expect("join").expect("pull");
        }
    })
    .await;
    let want = std::fs::read(&original).expect("original");
    let mut from_peers = 0;
    for p in &pullers {
        assert_eq!(std::fs::read(stored(p, &meta)).expect("copy"), want, "copy of {:?} differs", p.peer_id());
        let s = p.stats();
        assert!(s.downloaded() >= meta.length, "{:?} verified only {} bytes", p.peer_id(), s.downloaded());
        from_peers += s.downloaded() - s.downloaded_from.get(&seed.peer_id()).copied().unwrap_or(0);
        assert_eq!(s.bad_pieces, 0);
    }
    let seed_sent = seed.stats().uploaded;
    let copies = seed_sent as f64 / meta.length as f64;
    eprintln!("seed sent {copies:.2} copies; pullers traded {:.2} copies", from_peers as f64 / meta.length as f64);
    assert!(copies < 4.0, "the seed sent {copies:.2} copies of the blob: pullers did not trade enough");
    assert!(from_peers >= 4 * meta.length, "pullers traded only {from_peers} bytes among themselves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_puller_resumes_without_refetching_verified_pieces() {
    let cluster = Cluster::start().await;
    // 16 MiB at 8 MB/s: about two seconds, long enough to stop halfway.
    let (_seed, meta, original) = cluster.seed(16 * MIB, Some(8_000_000)).await;
    let first = cluster.node(cluster.config("puller"));
    let d = first.fetch(meta.digest).await.expect("fetch");
    let mut progress = d.progress();
    within(60, "first half", async {
        while progress.borrow_and_update().bytes < meta.length / 2 {
            progress.changed().await.expect("progress");
        }
    })
    .await;
    first.shutdown().await;
    let got_before = first.stats().downloaded();
    drop(d);
    drop(first);

    let second = cluster.node(cluster.config("puller"));
    let mut d = second.fetch(meta.digest).await.expect("refetch");
    let resumed = d.progress().borrow().bytes;
    assert!(resumed >= meta.length / 2, "only {resumed} bytes survived the restart");
    assert!(resumed <= got_before);
    within(60, "second half", d.finished()).await.expect("complete");
    let fetched_again = second.stats().downloaded();
    assert!(
        fetched_again <= meta.length - resumed,
        "the restarted puller fetched {fetched_again} bytes though only {} were missing",
        meta.length - resumed
    );
    assert_eq!(std::fs::read(stored(&second, &meta)).expect("copy"), std::fs::read(original).expect("original"));
}

/// A peer that holds the token and speaks the protocol, but serves every piece with
/// one byte flipped.
async fn corrupt_peer(
    cluster: &Cluster,
    meta: Metainfo,
    original: PathBuf,
) -> (PeerId, Arc<std::sync::atomic::AtomicU64>) {
    let ep = Endpoint::bind(loopback(), cluster.token.clone(), &EndpointConfig::default()).expect("bind");
    let peer_id = PeerId([0xEE; 16]);
    let tracker = TrackerClient::new(ep.clone(), cluster.tracker);
    let ann = Announce {
        peer_id,
        blob: meta.digest,
        listen_port: ep.local_addr().expect("addr").port(),
        advertise: None,
        zone: String::new(),
        have: meta.piece_count(),
        complete: true,
        num_want: 0,
    };
    tracker.announce(&ann).await.expect("announce");
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = served.clone();
    let data = Arc::new(std::fs::read(original).expect("original"));
    tokio::spawn(async move {
        let _keep = tracker;
        while let Some(incoming) = ep.accept().await {
            let Ok(conn) = incoming.authenticate().await else { continue };
            let (meta, data, counter) = (meta.clone(), data.clone(), counter.clone());
            tokio::spawn(async move {
                let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
                let Ok(Some(PeerMessage::Handshake { blob, .. })) =
                    read_msg::<PeerMessage>(&mut recv, MAX_PEER_FRAME_LEN).await
                else {
                    return;
                };
                let reply = PeerMessage::Handshake { version: PROTOCOL_VERSION, peer_id, blob };
                let _ = write_msg(&mut send, &reply).await;
                let _ = write_msg(&mut send, &PeerMessage::Bitfield(Bitfield::full(meta.piece_count()))).await;
                while let Ok((mut s, mut r)) = conn.accept_bi().await {
                    let Ok(Some(PeerMessage::Request { piece })) =
                        read_msg::<PeerMessage>(&mut r, MAX_PEER_FRAME_LEN).await
                    else {
                        continue;
                    };
                    let start = meta.piece_offset(piece) as usize;
                    let mut bytes = data[start..start + meta.piece_len(piece) as usize].to_vec();
                    bytes[0] ^= 0xFF;
                    let _ = write_msg(&mut s, &PeerMessage::Piece { piece, length: bytes.len() as u32 }).await;
                    let _ = s.write_all(&bytes).await;
                    let _ = s.finish();
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let reason = conn.closed().await;
                eprintln!("corrupt peer's connection ended: {reason}");
            });
        }
    });
    (peer_id, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_pieces_are_caught_refetched_and_the_liar_dropped() {
    let cluster = Cluster::start().await;
    let (_seed, meta, original) = cluster.seed(8 * MIB, Some(4_000_000)).await;
    let (liar, served) = corrupt_peer(&cluster, meta.clone(), original.clone()).await;
    let puller = cluster.node(cluster.config("puller"));
    let mut d = puller.fetch(meta.digest).await.expect("fetch");
    within(60, "pull next to a corrupt peer", d.finished()).await.expect("complete");
    let stats = puller.stats();
    let bad = served.load(std::sync::atomic::Ordering::Relaxed);
    assert!(bad > 0, "the corrupt peer was never asked for a piece, so the test proves nothing");
    assert!(stats.bad_pieces >= 1 && stats.bad_pieces <= bad, "caught {} of {bad} corrupt pieces", stats.bad_pieces);
    assert_eq!(stats.downloaded_from.get(&liar).copied().unwrap_or(0), 0, "no corrupt byte may count as downloaded");
    // Three strikes drop the liar; requests already in flight (the initial depth of 4)
    // may still come back. A banned peer must not be reconnected to.
    assert!(
        stats.bad_pieces <= 3 + 4,
        "{} corrupt pieces reached the puller: the liar was not dropped",
        stats.bad_pieces
    );
    assert_eq!(std::fs::read(stored(&puller, &meta)).expect("copy"), std::fs::read(original).expect("original"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_token_is_refused() {
    let cluster = Cluster::start().await;
    let (_seed, meta, _) = cluster.seed(MIB, None).await;
    let ep = Endpoint::bind(loopback(), ClusterToken::generate(), &EndpointConfig::default()).expect("bind");
    let mut config = cluster.config("intruder");
    config.metainfo_wait = Duration::from_secs(2);
    let intruder = Node::start(ep, cluster.tracker, config).expect("start");
    let err = within(30, "refusal", intruder.fetch(meta.digest)).await.err().expect("must be refused");
    let text = err.to_string();
    assert!(matches!(err, NodeError::Tracker(_)), "unexpected error kind: {err:?}");
    assert!(text.contains("cluster token mismatch"), "unclear error: {text}");

    // The seed refuses it too, with the dedicated close code.
    let ep = Endpoint::bind(loopback(), ClusterToken::generate(), &EndpointConfig::default()).expect("bind");
    let seed_addr = _seed.local_addr().expect("addr");
    let seed_addr = std::net::SocketAddr::new("127.0.0.1".parse().expect("ip"), seed_addr.port());
    let err = ep.connect(seed_addr).await.expect_err("seed must refuse");
    assert!(matches!(err, swarm_net::NetError::AuthRejected { .. }), "{err}");
}

/// A rolling upgrade runs nodes of two releases side by side: nodes speaking only
/// protocol version 1 (the previous release) and version-2 nodes trade pieces in
/// both directions. A version-1 node closes a connection on any message it does not
/// know, so a version-2 node sending it hashes or peer lists would never finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_of_the_previous_protocol_version_and_new_ones_trade_both_ways() {
    let cluster = Cluster::start().await;
    let old_endpoint = || {
        let config = EndpointConfig { max_protocol_version: 1, ..EndpointConfig::default() };
        Endpoint::bind(loopback(), cluster.token.clone(), &config).expect("bind old node")
    };
    // A new seed; an old node and a new node fetch from it and from each other.
    let (seed, meta, original) = cluster.seed(8 * MIB, Some(20_000_000)).await;
    let old = Node::start(old_endpoint(), cluster.tracker, cluster.config("old")).expect("old node");
    let new = cluster.node(cluster.config("new"));
    let mut tasks = Vec::new();
    for n in [&old, &new] {
        let (n, digest) = (n.clone(), meta.digest);
        tasks.push(tokio::spawn(async move { n.fetch(digest).await?.finished().await }));
    }
    within(60, "an old and a new node fetching from a new seed", async {
        for t in tasks {
            t.await.expect("join").expect("fetch");
        }
    })
    .await;
    let want = std::fs::read(&original).expect("original");
    for n in [&old, &new] {
        assert_eq!(std::fs::read(stored(n, &meta)).expect("copy"), want);
    }
    // An old seed, the only holder left, serves a new node.
    for n in [&seed, &old, &new] {
        n.shutdown().await;
    }
    let old_seed_config = cluster.config("old-seed");
    let old_seed = Node::start(old_endpoint(), cluster.tracker, old_seed_config).expect("old seed");
    old_seed.seed(&original, meta.clone()).await.expect("seed");
    let newer = cluster.node(cluster.config("newer"));
    let mut d = newer.fetch(meta.digest).await.expect("fetch");
    within(60, "a new node fetching", d.finished()).await.expect("finished");
    assert_eq!(std::fs::read(stored(&newer, &meta)).expect("copy"), want);
}
