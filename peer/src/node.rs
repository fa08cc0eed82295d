//! The QUIC peer: one endpoint, one tracker client, one piece store, and one swarm
//! actor per blob.
//!
//! ```text
//!             accept loop ──(handshake names blob)──► SwarmActor(blob) ◄── tracker replies
//!                                                        │  owns the Scheduler
//!   per connection: control reader ─ Bitfield/Have ────►│
//!                   control writer ◄─ Bitfield/Have ────│
//!                   request server  (uploads, bounded slots, reads the BlobFile)
//!   per request:    fetch task ─ verified/failed ──────►│
//! ```
//!
//! The [`SwarmActor`] is the only owner of its blob's [`Scheduler`]: every network
//! event becomes a scheduler call, and every scheduler action becomes a network
//! operation, so the policy lives entirely in the sans-IO module and this file is
//! plumbing. Tasks that touch the network report back to the actor through its inbox;
//! the actor never awaits the network itself, so a slow peer cannot stall the rest.
//!
//! Connections are per (pair of nodes, blob): the first bidirectional stream opened by
//! the connecting side is the control stream (handshake, bitfield, haves); every
//! further stream, opened by either side, carries one piece request. When two nodes
//! connect to each other at once, the connection opened by the smaller peer id wins.
//!
//! Memory: a piece is held in memory from the moment its first byte arrives until it
//! is verified and written, bounded by a node-wide receive budget; uploads are bounded
//! by a node-wide number of slots. Everything else streams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use swarm_net::{Endpoint, NetError, codes, read_msg, write_msg};
use swarm_proto::codec::MAX_PEER_FRAME_LEN;
use swarm_proto::msg::{Announce, MAX_HASHES_PER_MESSAGE, MAX_PEX_PEERS, PeerInfo, PeerMessage, RejectReason};
use swarm_proto::{Digest, Layout, Metainfo, PeerId};
use swarm_tracker::client::{HashesReply, TrackerClient, TrackerClientError};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, trace, warn};

use crate::known_peers::{KnownPeers, write_atomically};
use crate::store::{BlobFile, Store, StoreError};
use crate::upload::{ReceiveBudget, UploadLedger, UploadSlots};
use swarm_core::conns::{AtBound, Connections};
use swarm_core::node::{BadRead, NodePolicy};
use swarm_core::scheduler::{PeerKey, RequestFailure};
use swarm_core::swarm::{
    AnnounceReply, CloseReason, HashRange, HashesReply as SwarmHashes, PeerConn, PeerHashes, PieceOutcome, Refused,
    Swarm, SwarmAction,
};
use swarm_net::refusals::Refusal;

/// How long a handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many known peers `fetch_from_peers` asks (at once).
pub const PEER_ASKS: usize = 8;
/// How long `fetch_from_peers` waits for one of them to hand over a blob's hashes
/// before the mirror gives up (and containerd goes upstream).
pub const PEER_ASK_WAIT: Duration = Duration::from_secs(3);
/// How long `shutdown` waits for the node's tasks to end.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Events queued for one blob's actor. Senders (connection readers, fetch and tracker
/// tasks, the agent) wait while it is full, so a peer flooding its control stream is
/// slowed to the actor's pace (QUIC flow control pushes back on it) instead of
/// growing the node's memory. An event is at most a few hundred bytes, except a
/// tracker reply (at most 200 peers, ~20 KiB), a peer list (at most 50 peers,
/// ~5 KiB) and piece hashes (at most 128 KiB, and at most 32 bytes x pieces per
/// connection in all: see [`control_reader`]): at most ~20 MiB per blob plus the
/// hashes, typically far less.
pub const INBOX_CAPACITY: usize = 1024;
/// Peer lists (`Peers`) a peer may send over one connection.
pub const MAX_PEX_MESSAGES: u32 = 4;
/// Control messages (bitfield, `Have`s, hashes, the peer list) queued for one peer's
/// control writer. A `Have` is about 10 bytes on the wire and a piece at least
/// 64 KiB, so a peer that reads its control stream never falls this far behind; one
/// whose queue fills has stopped reading, and is disconnected (logged) rather than a
/// message being dropped. Worst case ~128 KiB per connection, plus one bitfield (up
/// to 128 KiB), one peer list (~5 KiB) and each piece hash once (32 bytes x pieces).
pub const CONTROL_QUEUE: usize = 4096;

/// Uploads are paced in chunks of this many bytes when a rate cap is set.
const PACING_CHUNK: usize = 64 * 1024;

/// Settings of a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Where blobs are stored.
    pub data_dir: PathBuf,
    /// Locality label sent to the tracker.
    pub zone: String,
    /// Address to announce instead of the one the tracker observes.
    pub advertise: Option<SocketAddr>,
    /// What the node does in its swarms (peers, slots, budget, piece picking): the
    /// defaults the simulator runs with too.
    pub policy: NodePolicy,
    /// How long `fetch` waits for the tracker to learn the blob's metainfo.
    pub metainfo_wait: Duration,
    /// Cap on the bytes per second this node uploads (None: unlimited).
    pub upload_rate: Option<u64>,
    /// The agent-wide download limiter piece bytes from peers pass through as they are
    /// read (`--download-rate`; None: unlimited).
    pub download_limit: Option<crate::rate::Limiter>,
}

impl NodeConfig {
    /// Defaults for a node storing its blobs under `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            zone: String::new(),
            advertise: None,
            policy: NodePolicy::default(),
            metainfo_wait: Duration::from_secs(30),
            upload_rate: None,
            download_limit: None,
        }
    }
}

/// Errors a node reports to its caller.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("tracker: {0}")]
    Tracker(#[from] TrackerClientError),
    #[error("the tracker does not know {digest} after {waited:?}: is a `swarm seed` for it running?")]
    UnknownBlob { digest: Digest, waited: Duration },
    #[error("download of {digest} failed: {reason}")]
    DownloadFailed { digest: Digest, reason: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the node is shutting down")]
    ShuttingDown,
}

/// Byte counters of a node, for summaries and metrics.
#[derive(Clone, Debug, Default)]
pub struct NodeStats {
    /// Piece bytes verified from each peer.
    pub downloaded_from: HashMap<PeerId, u64>,
    /// Piece bytes sent to peers (pieces whose every byte the requester acknowledged).
    pub uploaded: u64,
    /// Pieces that failed verification.
    pub bad_pieces: u64,
    /// Blob bytes this node fetched from upstream registries (as lease holder).
    pub from_upstream: u64,
}

impl NodeStats {
    /// Total piece bytes received and verified.
    pub fn downloaded(&self) -> u64 {
        self.downloaded_from.values().sum()
    }
}

#[derive(Default)]
struct Counters {
    downloaded_from: Mutex<HashMap<PeerId, u64>>,
    uploaded: AtomicU64,
    bad_pieces: AtomicU64,
    from_upstream: AtomicU64,
}

/// Where a download stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownloadState {
    Running,
    Complete,
    Failed(String),
}

/// A snapshot of one blob's transfer, published on every verified piece.
#[derive(Clone, Debug)]
pub struct Progress {
    pub pieces: u32,
    pub piece_count: u32,
    /// Piece hashes known (all of them unless the blob is still streaming in from
    /// upstream): a new one is the lease holder's progress.
    pub hashes: u32,
    pub bytes: u64,
    pub total: u64,
    pub peers: usize,
    pub state: DownloadState,
}

/// A blob being fetched (and served) by this node.
pub struct Download {
    digest: Digest,
    blob: Arc<BlobFile>,
    progress: watch::Receiver<Progress>,
}

impl Download {
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// The blob's digest, length and piece length.
    pub fn layout(&self) -> &Layout {
        self.blob.layout()
    }

    /// Where the blob's bytes are stored.
    pub fn data_path(&self) -> &Path {
        self.blob.data_path()
    }

    /// The stored blob (its bytes, hashes and verified pieces).
    pub fn blob(&self) -> &Arc<BlobFile> {
        &self.blob
    }

    /// A receiver of progress snapshots.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// Waits until every piece is in and the whole blob matched its digest.
    pub async fn finished(&mut self) -> Result<(), NodeError> {
        loop {
            let state = self.progress.borrow_and_update().state.clone();
            match state {
                DownloadState::Complete => return Ok(()),
                DownloadState::Failed(reason) => {
                    return Err(NodeError::DownloadFailed { digest: self.digest, reason });
                }
                DownloadState::Running => {}
            }
            if self.progress.changed().await.is_err() {
                return Err(NodeError::ShuttingDown);
            }
        }
    }
}

/// A running peer node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

struct Inner {
    peer_id: PeerId,
    endpoint: Endpoint,
    tracker: TrackerClient,
    store: Store,
    config: NodeConfig,
    swarms: Mutex<HashMap<Digest, SwarmHandle>>,
    upload_slots: Arc<UploadSlots>,
    /// Permits are KiB of piece buffers.
    receive_budget: Arc<ReceiveBudget>,
    counters: Counters,
    upload_limit: Option<RateLimiter>,
    /// Peers connected before, for when no tracker answers.
    known_peers: Mutex<KnownPeers>,
    /// Connections to peers, bounded per address and in total (see [`swarm_core::conns`]).
    connections: Mutex<Connections>,
    cancel: CancellationToken,
    /// Every task that holds the node or one of its blobs, so `shutdown` can wait for them.
    tasks: TaskTracker,
}

#[derive(Clone)]
struct SwarmHandle {
    blob: Arc<BlobFile>,
    inbox: mpsc::Sender<Event>,
    progress: watch::Receiver<Progress>,
}

impl Node {
    /// Starts a node on `endpoint`, talking to the tracker at `tracker`.
    pub fn start(endpoint: Endpoint, tracker: SocketAddr, config: NodeConfig) -> Result<Self, NodeError> {
        let store = Store::open(&config.data_dir)?;
        let peer_id = PeerId(rand::thread_rng().r#gen());
        let budget_kib = config.policy.receive_budget_kib();
        let config_rate = config.upload_rate;
        let known_peers = KnownPeers::load(&config.data_dir);
        let inner = Arc::new(Inner {
            peer_id,
            tracker: TrackerClient::new(endpoint.clone(), tracker),
            endpoint,
            store,
            upload_slots: UploadSlots::new(config.policy.upload_slots),
            receive_budget: ReceiveBudget::new(budget_kib),
            config,
            swarms: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            upload_limit: config_rate.map(RateLimiter::new),
            known_peers: Mutex::new(known_peers),
            connections: Mutex::new(Connections::default()),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let node = Self { inner };
        let accept = node.clone();
        node.spawn(async move { accept.accept_loop().await }.instrument(info_span!("accept", peer = %peer_id.short())));
        Ok(node)
    }

    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// The UDP address the node's QUIC endpoint is bound to.
    pub fn local_addr(&self) -> Result<SocketAddr, NodeError> {
        Ok(self.inner.endpoint.local_addr()?)
    }

    /// The node's piece store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// A snapshot of the node's byte counters.
    pub fn stats(&self) -> NodeStats {
        let c = &self.inner.counters;
        NodeStats {
            downloaded_from: c.downloaded_from.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            uploaded: c.uploaded.load(Ordering::Relaxed),
            bad_pieces: c.bad_pieces.load(Ordering::Relaxed),
            from_upstream: c.from_upstream.load(Ordering::Relaxed),
        }
    }

    /// Serves an already hashed file in place: registers its metainfo with the
    /// tracker and answers piece requests until the node shuts down.
    pub async fn seed(&self, path: &Path, metainfo: Metainfo) -> Result<(), NodeError> {
        let digest = metainfo.digest;
        self.inner.tracker.register(&metainfo).await?;
        let blob = Arc::new(BlobFile::from_existing(path, metainfo)?);
        self.start_swarm(blob);
        info!(%digest, path = %path.display(), "seeding");
        Ok(())
    }

    /// Starts fetching `digest` through the swarm (or resumes it from the store). The
    /// returned handle reports progress; the node keeps serving the blob afterwards.
    pub async fn fetch(&self, digest: Digest) -> Result<Download, NodeError> {
        if let Some(h) = self.swarm(&digest) {
            return Ok(h.into());
        }
        let metainfo = match self.inner.store.metainfo(&digest) {
            Ok(Some(m)) => m,
            _ => self.wait_metainfo(digest).await?,
        };
        let store = self.inner.store.clone();
        let m = metainfo.clone();
        let blob = tokio::task::spawn_blocking(move || store.open_blob(&m))
            .await
            .map_err(|e| NodeError::DownloadFailed { digest, reason: e.to_string() })??;
        let blob = Arc::new(blob);
        let h = self.start_swarm(blob);
        Ok(h.into())
    }

    /// Starts fetching a blob whose piece hashes are still arriving (an upstream fetch
    /// by the lease holder is in progress). `hashes` are those of pieces
    /// `first..`; the swarm keeps asking the tracker for the rest and only trades a
    /// piece once its hash is known. If the node already has the blob, that is used.
    pub async fn fetch_partial(
        &self,
        layout: Layout,
        first: u32,
        hashes: Vec<[u8; 32]>,
    ) -> Result<Download, NodeError> {
        let digest = layout.digest;
        if let Some(h) = self.swarm(&digest) {
            return Ok(h.into());
        }
        let store = self.inner.store.clone();
        let blob = tokio::task::spawn_blocking(move || {
            let blob = store.open_layout(layout)?;
            blob.add_hashes(first, &hashes)?;
            Ok::<_, StoreError>(blob)
        })
        .await
        .map_err(|e| NodeError::DownloadFailed { digest, reason: e.to_string() })??;
        let h = self.start_swarm(Arc::new(blob));
        Ok(h.into())
    }

    /// Whether the node is already serving or fetching `digest`.
    pub fn download(&self, digest: &Digest) -> Option<Download> {
        self.swarm(digest).map(Download::from)
    }

    /// Blobs whose download is still running.
    pub fn active_downloads(&self) -> usize {
        let swarms = self.inner.swarms.lock().unwrap_or_else(|e| e.into_inner());
        swarms.values().filter(|h| h.progress.borrow().state == DownloadState::Running).count()
    }

    /// The node's tracker client.
    pub fn tracker(&self) -> &TrackerClient {
        &self.inner.tracker
    }

    /// Tells `digest`'s swarm that a piece was stored from outside the swarm (the
    /// upstream registry); it is announced to every peer at once.
    pub async fn upstream_piece(&self, digest: &Digest, piece: u32) {
        if let Some(h) = self.swarm(digest) {
            let _ = h.inbox.send(Event::UpstreamPiece(piece)).await;
        }
    }

    /// Marks this node as the holder of `digest`'s upstream lease: when the blob is
    /// complete (or fails its final check) the swarm releases the lease.
    pub async fn hold_lease(&self, digest: &Digest) {
        if let Some(h) = self.swarm(digest) {
            let _ = h.inbox.send(Event::LeaseHeld).await;
        }
    }

    /// Tells `digest`'s swarm that a piece read to be served failed its hash (the
    /// store has already dropped it): the swarm acts on
    /// [`swarm_core::node::after_bad_read`].
    pub async fn piece_rotted(&self, digest: &Digest, piece: u32) {
        if let Some(h) = self.swarm(digest) {
            let _ = h.inbox.send(Event::PieceRotted(piece)).await;
        }
    }

    /// Abandons the download of `digest` (its upstream fetch failed): waiters see the
    /// reason, the swarm stops and the next request starts afresh.
    pub async fn abandon(&self, digest: &Digest, reason: String) {
        let h = self.inner.swarms.lock().unwrap_or_else(|e| e.into_inner()).remove(digest);
        if let Some(h) = h {
            let _ = h.inbox.send(Event::Abandon(reason)).await;
        }
    }

    async fn wait_metainfo(&self, digest: Digest) -> Result<Metainfo, NodeError> {
        let started = Instant::now();
        loop {
            if let Some(m) = self.inner.tracker.get_metainfo(digest).await? {
                return Ok(m);
            }
            if started.elapsed() >= self.inner.config.metainfo_wait {
                return Err(NodeError::UnknownBlob { digest, waited: started.elapsed() });
            }
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return Err(NodeError::ShuttingDown),
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// Stops every swarm, tells the tracker this node is leaving, and closes the endpoint.
    pub async fn shutdown(&self) {
        self.save_known_peers(true).await;
        let digests: Vec<Digest> =
            self.inner.swarms.lock().unwrap_or_else(|e| e.into_inner()).keys().copied().collect();
        self.inner.cancel.cancel();
        for digest in digests {
            let leave = self.inner.tracker.leave(self.inner.peer_id, digest);
            if let Err(e) = tokio::time::timeout(Duration::from_secs(2), leave).await.unwrap_or(Ok(())) {
                debug!(%digest, error = %e, "leave failed");
            }
        }
        self.inner.endpoint.close();
        self.inner.tasks.close();
        if tokio::time::timeout(SHUTDOWN_WAIT, self.inner.tasks.wait()).await.is_err() {
            warn!(tasks = self.inner.tasks.len(), "tasks still running after {SHUTDOWN_WAIT:?}; leaving them");
        }
    }

    /// Notes a peer this node connected with (see [`crate::known_peers`]).
    fn remember_peer(&self, addr: SocketAddr) {
        let save = {
            let mut known = self.inner.known_peers.lock().unwrap_or_else(|e| e.into_inner());
            known.remember(addr);
            known.to_save(Instant::now(), false)
        };
        if let Some(save) = save {
            self.spawn(write_known_peers(save));
        }
    }

    async fn save_known_peers(&self, force: bool) {
        let save = self.inner.known_peers.lock().unwrap_or_else(|e| e.into_inner()).to_save(Instant::now(), force);
        if let Some(save) = save {
            write_known_peers(save).await;
        }
    }

    /// Fetches `digest` from the peers this node knows from before, without a
    /// tracker: asks up to [`PEER_ASKS`] of them at once (most recent first) and
    /// swarms with the first that holds every piece hash of the blob; that peer tells
    /// it of the others (peer exchange). Gives up after [`PEER_ASK_WAIT`].
    pub async fn fetch_from_peers(&self, digest: Digest) -> Result<Download, NodeError> {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        if let Some(h) = self.swarm(&digest) {
            return Ok(h.into());
        }
        let addrs = self.inner.known_peers.lock().unwrap_or_else(|e| e.into_inner()).addrs();
        let mut asks: FuturesUnordered<_> = addrs
            .into_iter()
            .take(PEER_ASKS)
            .map(|addr| async move { (addr, self.probe(addr, digest).await) })
            .collect();
        let deadline = tokio::time::Instant::now() + PEER_ASK_WAIT;
        let mut last = NodeError::Protocol("no peer known from before".into());
        loop {
            let next = tokio::time::timeout_at(deadline, asks.next()).await;
            match next {
                Ok(Some((addr, Ok((peer, layout, hashes))))) => {
                    let d = self.fetch_partial(layout, 0, hashes).await?;
                    if let Some(h) = self.swarm(&digest) {
                        let _ = h.inbox.send(Event::Connected(Box::new(peer))).await;
                    }
                    info!(%digest, %addr, "no tracker: swarming with a peer known from before");
                    return Ok(d);
                }
                Ok(Some((addr, Err(e)))) => {
                    debug!(%addr, error = %e, "known peer cannot serve the blob");
                    last = e;
                }
                Ok(None) => break,
                Err(_) => {
                    last = NodeError::Protocol(format!("no known peer answered within {PEER_ASK_WAIT:?}"));
                    break;
                }
            }
        }
        Err(NodeError::DownloadFailed { digest, reason: format!("no known peer serves it ({last})") })
    }

    /// Connects to `addr` for `digest` and reads the blob's layout and every piece
    /// hash from the start of its control stream (version 2), stopping before its
    /// bitfield so the swarm takes the connection over where it stands.
    async fn probe(&self, addr: SocketAddr, digest: Digest) -> Result<(NewPeer, Layout, Vec<[u8; 32]>), NodeError> {
        let mut peer = connect_peer(self, addr, digest).await?;
        let refuse = |peer: &NewPeer, why: &str| {
            peer.conn.close(codes::SHUTDOWN.into(), b"not what was asked");
            NodeError::Protocol(format!("{addr}: {why}"))
        };
        if peer.version < 2 {
            return Err(refuse(&peer, "speaks protocol version 1 (no hashes from peers)"));
        }
        let mut layout: Option<Layout> = None;
        let mut hashes: Vec<[u8; 32]> = Vec::new();
        loop {
            match read_msg::<PeerMessage>(&mut peer.recv, MAX_PEER_FRAME_LEN).await? {
                Some(PeerMessage::Peers { .. }) => {}
                Some(PeerMessage::Hashes { layout: l, first, hashes: more })
                    if l.digest == digest
                        && l.validate().is_ok()
                        && layout.is_none_or(|known| known == l)
                        && first as usize == hashes.len()
                        && hashes.len() + more.len() <= l.piece_count() as usize =>
                {
                    layout = Some(l);
                    hashes.extend(more);
                    if hashes.len() == l.piece_count() as usize {
                        return Ok((peer, l, hashes));
                    }
                }
                _ => return Err(refuse(&peer, "does not hold every piece hash of the blob")),
            }
        }
    }

    /// Runs `task` on the runtime as one of this node's tasks: `shutdown` waits for it.
    pub(crate) fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.tasks.spawn(task)
    }

    /// Resolves once `shutdown` has begun.
    pub(crate) async fn cancelled(&self) {
        self.inner.cancel.cancelled().await
    }

    fn swarm(&self, digest: &Digest) -> Option<SwarmHandle> {
        self.inner.swarms.lock().unwrap_or_else(|e| e.into_inner()).get(digest).cloned()
    }

    fn start_swarm(&self, blob: Arc<BlobFile>) -> SwarmHandle {
        let digest = blob.layout().digest;
        let mut swarms = self.inner.swarms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = swarms.get(&digest) {
            return h.clone();
        }
        let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
        let have = blob.have();
        let metainfo = blob.layout();
        let progress = Progress {
            pieces: have.count(),
            piece_count: have.len(),
            hashes: blob.known_hashes(),
            bytes: have.ones().map(|i| u64::from(metainfo.piece_len(i))).sum(),
            total: metainfo.length,
            peers: 0,
            state: DownloadState::Running,
        };
        let (progress_tx, progress_rx) = watch::channel(progress);
        let config = &self.inner.config;
        let swarm = Swarm::new(
            self.inner.peer_id,
            config.zone.clone(),
            &config.policy,
            metainfo.piece_length,
            have,
            blob.known_hashes(),
            rand::thread_rng().r#gen(),
            Instant::now(),
        );
        let actor = SwarmActor {
            node: self.clone(),
            blob: blob.clone(),
            inbox_tx: tx.clone(),
            inbox: rx,
            swarm,
            links: HashMap::new(),
            requests: HashMap::new(),
            progress: progress_tx,
            ledger: Arc::new(UploadLedger::new(blob.layout().piece_count(), blob.is_complete())),
            recipients: Vec::new(),
        };
        let span = info_span!("swarm", peer = %self.inner.peer_id.short(), blob = %digest.short());
        self.spawn(actor.run().instrument(span));
        let h = SwarmHandle { blob, inbox: tx, progress: progress_rx };
        swarms.insert(digest, h.clone());
        h
    }

    async fn accept_loop(self) {
        loop {
            let incoming = tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                i = self.inner.endpoint.accept() => match i { Some(i) => i, None => return },
            };
            let node = self.clone();
            let remote = incoming.remote_address();
            let permit = match self.connection_permit(remote) {
                Ok(permit) => permit,
                Err(bound) => {
                    // Logged by the endpoint, once per source per minute.
                    incoming.refuse(&bound);
                    continue;
                }
            };
            self.spawn(
                async move {
                    if let Err(e) = node.accept_one(incoming, permit).await {
                        debug!(%remote, error = %e, "incoming connection dropped");
                    }
                }
                .instrument(info_span!("incoming", %remote)),
            );
        }
    }

    /// A place for one more connection to `addr`, held until the permit is dropped.
    fn connection_permit(&self, addr: SocketAddr) -> Result<ConnectionPermit, AtBound> {
        locked(&self.inner.connections).open(addr)?;
        Ok(ConnectionPermit { node: Arc::downgrade(&self.inner), addr })
    }

    /// Logs a refusal at a connection bound through the endpoint's refusal log, once
    /// per address and minute (a flood of attempts must not become a flood of log
    /// lines).
    fn log_refusal(&self, remote: SocketAddr, bound: AtBound) {
        self.inner.endpoint.log_refusal(remote, Refusal::AtBound, &format_args!(": {bound}"));
    }

    async fn accept_one(&self, incoming: swarm_net::Incoming, permit: ConnectionPermit) -> Result<(), NodeError> {
        let conn = incoming.authenticate().await?;
        let handshake = async {
            let (send, mut recv) = conn.accept_bi().await.map_err(|source| NetError::ConnectionLost { source })?;
            let hello: Option<PeerMessage> = read_msg(&mut recv, MAX_PEER_FRAME_LEN).await?;
            Ok::<_, NodeError>((send, recv, hello))
        };
        let (mut send, recv, hello) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(r) => r?,
            Err(_) => {
                conn.close(codes::PROTOCOL_ERROR.into(), b"handshake timeout");
                return Ok(());
            }
        };
        let Some(PeerMessage::Handshake { version, peer_id, blob }) = hello else {
            conn.close(codes::PROTOCOL_ERROR.into(), b"expected a handshake");
            return Ok(());
        };
        // The TLS handshake settled the version (ALPN); the peer's message must agree.
        let negotiated = swarm_net::protocol_version(&conn);
        if version != negotiated {
            warn!(version, negotiated, "peer's handshake names another protocol version than its connection");
            conn.close(codes::PROTOCOL_ERROR.into(), b"unsupported protocol version");
            return Ok(());
        }
        let swarm = match self.swarm(&blob) {
            Some(swarm) => swarm,
            None => match self.serve_stored(blob).await {
                Some(swarm) => swarm,
                None => {
                    conn.close(codes::UNKNOWN_BLOB.into(), b"blob not served here");
                    return Ok(());
                }
            },
        };
        let reply = PeerMessage::Handshake { version, peer_id: self.inner.peer_id, blob };
        write_msg(&mut send, &reply).await?;
        let p = NewPeer { conn, peer_id, send, recv, outbound: false, version, permit };
        let _ = swarm.inbox.send(Event::Connected(Box::new(p))).await;
        Ok(())
    }

    /// Starts serving a complete blob of the store that no swarm serves yet (one kept
    /// from before a restart, or announced to the tracker with the whole store).
    async fn serve_stored(&self, digest: Digest) -> Option<SwarmHandle> {
        let store = self.inner.store.clone();
        let blob = tokio::task::spawn_blocking(move || {
            let metainfo = store.metainfo(&digest).ok()??;
            let blob = store.open_blob(&metainfo).ok()?;
            blob.is_complete().then_some(blob)
        })
        .await
        .ok()??;
        debug!(%digest, "serving a stored blob");
        Some(self.start_swarm(Arc::new(blob)))
    }
}

impl From<SwarmHandle> for Download {
    fn from(h: SwarmHandle) -> Self {
        Self { digest: h.blob.layout().digest, blob: h.blob, progress: h.progress }
    }
}

/// A connection whose handshake succeeded, handed to the swarm actor.
struct NewPeer {
    conn: quinn::Connection,
    peer_id: PeerId,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    outbound: bool,
    /// The protocol version the connection settled on.
    version: u32,
    /// Its place among the node's connections.
    permit: ConnectionPermit,
}

/// Locks `m`, taking the value over if a holder panicked.
fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One connection's place in the node's [`Connections`]; freed when dropped.
struct ConnectionPermit {
    node: std::sync::Weak<Inner>,
    addr: SocketAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        if let Some(inner) = self.node.upgrade() {
            locked(&inner.connections).closed(self.addr);
        }
    }
}

/// The queue of control messages to one peer (drained by its control writer task).
#[derive(Clone)]
pub(crate) struct ControlTx {
    tx: mpsc::Sender<PeerMessage>,
    conn: quinn::Connection,
}

impl ControlTx {
    /// Queues `msg` for the peer. A full queue means the peer stopped reading its
    /// control stream (see [`CONTROL_QUEUE`]): it is disconnected rather than the
    /// message dropped. A closed queue means the peer is gone already.
    pub(crate) fn send(&self, msg: PeerMessage) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(msg) {
            warn!(peer = %self.conn.remote_address(), "control queue full: the peer stopped reading; disconnecting");
            self.conn.close(codes::PROTOCOL_ERROR.into(), b"control queue full");
        }
    }
}

/// What a fetch task reports.
#[derive(Debug)]
enum Outcome {
    Verified,
    BadPiece,
    Rejected(RejectReason),
    Failed(String),
    /// A good piece could not be stored (disk full, I/O error).
    StoreFailed(String),
}

enum Event {
    Connected(Box<NewPeer>),
    ConnectFailed(SocketAddr),
    Control {
        key: PeerKey,
        msg: PeerMessage,
    },
    Closed {
        key: PeerKey,
    },
    Piece {
        key: PeerKey,
        piece: u32,
        outcome: Outcome,
    },
    TrackerPeers {
        peers: Vec<PeerInfo>,
        interval: Duration,
    },
    TrackerFailed(String),
    Finished(Result<(), String>),
    /// A piece stored from the upstream registry by this node (the lease holder).
    UpstreamPiece(u32),
    /// This node holds the blob's upstream lease.
    LeaseHeld,
    /// Piece hashes learned from the tracker (`None`: the tracker forgot the blob).
    Hashes(Option<HashesReply>),
    HashSyncFailed,
    Abandon(String),
    /// A piece read to be served failed its hash and was dropped from the store.
    PieceRotted(u32),
}

/// The I/O side of one connection of a swarm.
struct PeerLink {
    conn: quinn::Connection,
    control: ControlTx,
    /// Held while the link lives.
    _permit: ConnectionPermit,
}

/// Drives one blob's [`Swarm`] core: turns network, store and tracker events into
/// core calls and the core's actions into tasks. See the module docs.
struct SwarmActor {
    node: Node,
    blob: Arc<BlobFile>,
    inbox_tx: mpsc::Sender<Event>,
    inbox: mpsc::Receiver<Event>,
    swarm: Swarm,
    links: HashMap<PeerKey, PeerLink>,
    requests: HashMap<(PeerKey, u32), AbortHandle>,
    progress: watch::Sender<Progress>,
    /// First-upload times, for spreading fresh pieces (see [`UploadLedger`]).
    ledger: Arc<UploadLedger>,
    /// Scratch list of a `Have`'s recipients.
    recipients: Vec<swarm_core::swarm::HaveTo>,
}

impl SwarmActor {
    fn digest(&self) -> Digest {
        self.blob.layout().digest
    }

    async fn run(mut self) {
        let cancel = self.node.inner.cancel.clone();
        self.swarm.start(Instant::now());
        self.drain_actions();
        loop {
            let deadline = self.swarm.poll_timeout().map(tokio::time::Instant::from_std);
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                ev = self.inbox.recv() => match ev {
                    Some(ev) => self.handle(ev),
                    None => break,
                },
                _ = timer => self.swarm.handle_timeout(Instant::now()),
            }
            self.drain_actions();
        }
        for (_, h) in self.requests.drain() {
            h.abort();
        }
        for p in self.links.values() {
            p.conn.close(codes::SHUTDOWN.into(), b"shutting down");
        }
    }

    fn handle(&mut self, ev: Event) {
        let now = Instant::now();
        match ev {
            Event::UpstreamPiece(piece) => {
                let len = u64::from(self.blob.layout().piece_len(piece));
                self.node.inner.counters.from_upstream.fetch_add(len, Ordering::Relaxed);
                self.swarm.upstream_piece(piece, now);
            }
            Event::LeaseHeld => {
                self.swarm.hold_lease();
                self.ledger.enable_hold();
            }
            Event::Hashes(reply) => {
                let reply = match reply {
                    Some(r) => match self.blob.add_hashes(r.first, &r.hashes) {
                        Ok(_) => SwarmHashes::Known(self.blob.known_hashes()),
                        Err(e) => {
                            warn!(error = %e, "tracker hashes conflict with ours");
                            SwarmHashes::Failed
                        }
                    },
                    None => SwarmHashes::Forgotten,
                };
                self.swarm.hashes(reply, now);
                self.publish_progress();
            }
            Event::HashSyncFailed => self.swarm.hashes(SwarmHashes::Failed, now),
            Event::Abandon(reason) => self.abandon(reason),
            Event::PieceRotted(piece) => self.piece_rotted(piece),
            Event::Connected(p) => self.add_peer(*p, now),
            Event::ConnectFailed(addr) => self.swarm.dial_failed(addr, now),
            Event::Control { key, msg } => self.control(key, msg, now),
            Event::Closed { key } => self.remove_peer(key, now),
            Event::Piece { key, piece, outcome } => {
                self.requests.remove(&(key, piece));
                let peer_id = self.swarm.peer_id(key);
                trace!(piece, peer = ?peer_id, ?outcome, "request ended");
                let outcome = match outcome {
                    Outcome::Verified => {
                        if let Some(peer_id) = peer_id {
                            let len = u64::from(self.blob.layout().piece_len(piece));
                            let mut map =
                                self.node.inner.counters.downloaded_from.lock().unwrap_or_else(|e| e.into_inner());
                            *map.entry(peer_id).or_default() += len;
                        }
                        PieceOutcome::Verified
                    }
                    Outcome::BadPiece => {
                        self.node.inner.counters.bad_pieces.fetch_add(1, Ordering::Relaxed);
                        warn!(piece, peer = ?peer_id, "piece failed verification");
                        PieceOutcome::BadPiece
                    }
                    Outcome::Rejected(RejectReason::Busy) => PieceOutcome::Rejected(RequestFailure::Busy),
                    Outcome::Rejected(_) => PieceOutcome::Rejected(RequestFailure::Missing),
                    Outcome::Failed(reason) => {
                        debug!(piece, %reason, "request failed");
                        PieceOutcome::Failed
                    }
                    Outcome::StoreFailed(reason) => {
                        // Retrying cannot help while the disk is full: stop, free what
                        // the partial copy holds, and let the mirror's caller go
                        // elsewhere; the next request starts afresh.
                        self.abandon(format!("cannot store piece {piece}: {reason}"));
                        return;
                    }
                };
                let failed = outcome == PieceOutcome::Failed;
                self.swarm.piece_done(key, piece, outcome, now);
                // A dead connection fails every request at once: drop the peer now
                // rather than re-asking it until its close event arrives.
                if failed && self.links.get(&key).is_some_and(|p| p.conn.close_reason().is_some()) {
                    self.remove_peer(key, now);
                }
            }
            Event::TrackerPeers { peers, interval } => {
                self.swarm.announced(AnnounceReply::Peers { peers: &peers, interval }, now);
            }
            Event::TrackerFailed(reason) => {
                warn!(%reason, "announce failed; retrying");
                self.swarm.announced(AnnounceReply::Failed, now);
            }
            Event::Finished(result) => {
                let state = match &result {
                    Ok(()) => {
                        info!("blob complete and verified");
                        DownloadState::Complete
                    }
                    Err(reason) => {
                        warn!(%reason, "blob failed its final check");
                        DownloadState::Failed(reason.clone())
                    }
                };
                self.swarm.blob_checked(result, now);
                self.progress.send_modify(|p| p.state = state);
            }
        }
    }

    fn abandon(&mut self, reason: String) {
        warn!(%reason, "abandoning the download");
        self.progress.send_modify(|p| {
            if p.state == DownloadState::Running {
                p.state = DownloadState::Failed(reason.clone());
            }
        });
        let digest = self.digest();
        {
            let mut swarms = self.node.inner.swarms.lock().unwrap_or_else(|e| e.into_inner());
            if swarms.get(&digest).is_some_and(|h| Arc::ptr_eq(&h.blob, &self.blob)) {
                swarms.remove(&digest);
            }
        }
        // The partial copy (and its hashes) must not seed the next attempt.
        if let Err(e) = self.node.inner.store.remove(&digest) {
            warn!(error = %e, "cannot remove the abandoned copy");
        }
        self.inbox.close();
    }

    /// A piece of ours failed its hash when read to be served (the store dropped it).
    fn piece_rotted(&mut self, piece: u32) {
        match swarm_core::node::after_bad_read(self.blob.copy_kind()) {
            BadRead::Refetch => {
                // The scheduler never un-holds a piece, so this swarm retires and a
                // new one starts from the store, which no longer has the piece.
                warn!(piece, "a stored piece failed its hash; fetching it again");
                self.retire();
                let (node, digest) = (self.node.clone(), self.digest());
                self.node.spawn(
                    async move {
                        match node.fetch(digest).await {
                            Ok(mut d) => match d.finished().await {
                                Ok(()) => info!(%digest, "healed: the dropped piece was fetched again"),
                                Err(e) => warn!(%digest, error = %e, "fetching the dropped piece again failed"),
                            },
                            Err(e) => warn!(%digest, error = %e, "cannot restart the blob to fetch the dropped piece"),
                        }
                    }
                    .in_current_span(),
                );
            }
            // The disk manager forgets a broken blob on its next check.
            BadRead::Forget => warn!(piece, "containerd's copy failed a piece hash; the blob will be forgotten"),
            BadRead::Withhold => warn!(piece, "the seeded file no longer matches piece {piece}; withholding it"),
        }
    }

    /// Stops this swarm without touching the store: the node forgets the handle (so
    /// the next fetch starts a new swarm) and the actor ends, closing its links.
    fn retire(&mut self) {
        let digest = self.digest();
        {
            let mut swarms = self.node.inner.swarms.lock().unwrap_or_else(|e| e.into_inner());
            if swarms.get(&digest).is_some_and(|h| Arc::ptr_eq(&h.blob, &self.blob)) {
                swarms.remove(&digest);
            }
        }
        self.inbox.close();
    }

    fn add_peer(&mut self, p: NewPeer, now: Instant) {
        let NewPeer { conn, peer_id, send, recv, outbound, version, permit } = p;
        let addr = conn.remote_address();
        let key = match self.swarm.connected(PeerConn { peer_id, addr, outbound, version }, now) {
            Ok(key) => key,
            Err(Refused::ToSelf) => {
                conn.close(codes::PROTOCOL_ERROR.into(), b"connected to self");
                return;
            }
            Err(Refused::Banned) => {
                conn.close(codes::BAD_PIECES.into(), b"banned for bad pieces");
                return;
            }
            Err(Refused::Duplicate) => {
                conn.close(codes::SHUTDOWN.into(), b"duplicate connection");
                return;
            }
        };
        let (tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let control_tx = ControlTx { tx, conn: conn.clone() };
        self.links.insert(key, PeerLink { conn: conn.clone(), control: control_tx.clone(), _permit: permit });
        // The hashes and peers the swarm sends a new peer go before the bitfield.
        self.drain_actions();
        control_tx.send(PeerMessage::Bitfield(self.blob.have()));
        self.node.spawn(control_writer(send, control_rx).in_current_span());
        self.node.spawn(
            control_reader(key, recv, self.inbox_tx.clone(), self.blob.layout().piece_count(), version)
                .in_current_span(),
        );
        self.node.spawn(
            serve_requests(conn.clone(), self.blob.clone(), self.node.clone(), self.ledger.clone(), control_tx.clone())
                .instrument(info_span!("uploads", to = %peer_id.short())),
        );
        let watcher = conn.clone();
        let inbox = self.inbox_tx.clone();
        self.node.spawn(async move {
            watcher.closed().await;
            let _ = inbox.send(Event::Closed { key }).await;
        });
        debug!(peer = %peer_id.short(), outbound, version, "peer connected");
        self.node.remember_peer(addr);
        self.publish_progress();
    }

    /// Closes the I/O of `key`'s connection and aborts its requests.
    fn unlink(&mut self, key: PeerKey, code: u32, reason: &'static [u8]) -> bool {
        let Some(p) = self.links.remove(&key) else { return false };
        p.conn.close(code.into(), reason);
        self.requests.retain(|(k, _), h| {
            if *k == key {
                h.abort();
                false
            } else {
                true
            }
        });
        true
    }

    fn remove_peer(&mut self, key: PeerKey, now: Instant) {
        if self.unlink(key, codes::SHUTDOWN, b"bye") {
            self.swarm.closed(key, now);
            self.publish_progress();
        }
    }

    fn control(&mut self, key: PeerKey, msg: PeerMessage, now: Instant) {
        match msg {
            PeerMessage::Bitfield(bits) => self.swarm.bitfield(key, bits, now),
            PeerMessage::Have { piece } => {
                self.swarm.have(key, piece, now);
            }
            PeerMessage::Hashes { layout, first, hashes } => {
                let outcome = if layout != *self.blob.layout() {
                    PeerHashes::Conflict
                } else {
                    match self.blob.add_hashes(first, &hashes) {
                        Ok(_) => PeerHashes::Stored { known: self.blob.known_hashes() },
                        Err(StoreError::Conflict { .. }) => PeerHashes::Conflict,
                        Err(e) => {
                            warn!(error = %e, "cannot store piece hashes from a peer");
                            return;
                        }
                    }
                };
                if outcome == PeerHashes::Conflict {
                    warn!(peer = ?self.swarm.peer_id(key), "a peer sent piece hashes that conflict with known ones");
                }
                self.swarm.peer_hashes(key, outcome, now);
                self.publish_progress();
            }
            PeerMessage::Peers { peers } => self.swarm.peers_offered(&peers, now),
            other => {
                debug!(?other, "unexpected message on the control stream");
                if let Some(p) = self.links.get(&key) {
                    p.conn.close(codes::PROTOCOL_ERROR.into(), b"unexpected control message");
                }
            }
        }
    }

    fn drain_actions(&mut self) {
        while let Some(action) = self.swarm.poll_action() {
            match action {
                SwarmAction::Request { peer, piece } => self.request(peer, piece),
                SwarmAction::Cancel { peer, piece } => {
                    trace!(piece, peer = ?self.swarm.peer_id(peer), "cancel");
                    if let Some(h) = self.requests.remove(&(peer, piece)) {
                        h.abort();
                    }
                }
                SwarmAction::Have { piece } => {
                    self.swarm.have_recipients(piece, &mut self.recipients);
                    for to in &self.recipients {
                        if let Some(p) = self.links.get(&to.peer) {
                            if let Some(range) = to.hashes {
                                send_hashes(&p.control, &self.blob, range);
                            }
                            p.control.send(PeerMessage::Have { piece });
                        }
                    }
                    self.publish_progress();
                }
                SwarmAction::SendHashes { peer, range } => {
                    if let Some(p) = self.links.get(&peer) {
                        send_hashes(&p.control, &self.blob, range);
                    }
                }
                SwarmAction::SendPeers { peer, mut peers } => {
                    if let Some(p) = self.links.get(&peer) {
                        peers.truncate(MAX_PEX_PEERS);
                        p.control.send(PeerMessage::Peers { peers });
                    }
                }
                SwarmAction::Dial { addr } => self.dial(addr),
                SwarmAction::Close { peer, reason } => {
                    let (code, text): (u32, &'static [u8]) = match reason {
                        CloseReason::BadPieces => (codes::BAD_PIECES, b"too many bad pieces"),
                        CloseReason::Duplicate => (codes::SHUTDOWN, b"duplicate connection"),
                        CloseReason::BadHashes => (codes::PROTOCOL_ERROR, b"conflicting piece hash"),
                    };
                    if reason == CloseReason::BadPieces {
                        warn!(?peer, "dropping a peer that sent bad pieces");
                    }
                    self.unlink(peer, code, text);
                    self.publish_progress();
                }
                SwarmAction::Announce => self.announce(),
                SwarmAction::GetHashes { first } => self.sync_hashes(first),
                SwarmAction::CheckBlob => self.check_blob(),
                SwarmAction::ReleaseLease { failed } => {
                    let node = self.node.clone();
                    let digest = self.digest();
                    self.node.spawn(
                        async move {
                            if let Err(e) = node.inner.tracker.release_lease(node.inner.peer_id, digest, failed).await {
                                warn!(error = %e, "releasing the upstream lease failed");
                            }
                        }
                        .in_current_span(),
                    );
                }
                SwarmAction::Abandon { reason } => self.abandon(reason),
            }
        }
    }

    /// Asks the tracker for the piece hashes the lease holder published from `first` on.
    fn sync_hashes(&mut self, first: u32) {
        let node = self.node.clone();
        let inbox = self.inbox_tx.clone();
        let digest = self.digest();
        self.node.spawn(
            async move {
                let ev = match node.inner.tracker.get_hashes(digest, first).await {
                    Ok(reply) => Event::Hashes(reply),
                    Err(e) => {
                        debug!(error = %e, "hash sync failed");
                        Event::HashSyncFailed
                    }
                };
                let _ = inbox.send(ev).await;
            }
            .in_current_span(),
        );
    }

    fn check_blob(&mut self) {
        let blob = self.blob.clone();
        let inbox = self.inbox_tx.clone();
        self.node.spawn(async move {
            // Complete as soon as the digest matched; syncing the bytes to disk (half a
            // second when every node of a cluster finishes at once) comes after.
            let on_blob = |f: fn(&BlobFile) -> Result<(), StoreError>| {
                let blob = blob.clone();
                async move {
                    tokio::task::spawn_blocking(move || f(&blob))
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())
                }
            };
            let r = on_blob(BlobFile::verify).await;
            let ok = r.is_ok();
            let _ = inbox.send(Event::Finished(r)).await;
            if ok && let Err(e) = on_blob(BlobFile::persist).await {
                warn!(error = %e, "the verified blob could not be made durable");
            }
        });
    }

    fn request(&mut self, key: PeerKey, piece: u32) {
        let Some(p) = self.links.get(&key) else { return };
        trace!(piece, peer = ?self.swarm.peer_id(key), "request");
        let conn = p.conn.clone();
        let blob = self.blob.clone();
        let inbox = self.inbox_tx.clone();
        let budget = self.node.inner.receive_budget.clone();
        let limit = self.node.inner.config.download_limit.clone();
        let task = self.node.spawn(
            async move {
                let outcome = fetch_piece(conn, blob, piece, budget, limit).await;
                let _ = inbox.send(Event::Piece { key, piece, outcome }).await;
            }
            .in_current_span(),
        );
        if let Some(old) = self.requests.insert((key, piece), task.abort_handle()) {
            old.abort();
        }
    }

    fn publish_progress(&self) {
        let have = self.swarm.scheduler().have();
        let m = self.blob.layout();
        let pieces = have.count();
        // Every piece but the last has the full length.
        let last = m.piece_count().saturating_sub(1);
        let bytes = u64::from(pieces) * u64::from(m.piece_length)
            - if have.get(last) { u64::from(m.piece_length - m.piece_len(last)) } else { 0 };
        let peers = self.swarm.peer_count();
        let hashes = self.swarm.known_hashes();
        self.progress.send_if_modified(|p| {
            let changed = (p.pieces, p.bytes, p.peers, p.hashes) != (pieces, bytes, peers, hashes);
            (p.pieces, p.bytes, p.peers, p.hashes) = (pieces, bytes, peers, hashes);
            changed
        });
    }

    fn announce(&mut self) {
        let inner = &self.node.inner;
        let state = self.swarm.announce_state();
        let ann = Announce {
            peer_id: inner.peer_id,
            blob: self.digest(),
            listen_port: inner.endpoint.local_addr().map(|a| a.port()).unwrap_or(0),
            advertise: inner.config.advertise,
            zone: inner.config.zone.clone(),
            have: state.have,
            complete: state.complete,
            num_want: state.num_want,
        };
        let node = self.node.clone();
        let inbox = self.inbox_tx.clone();
        let metainfo = if state.complete { self.blob.metainfo() } else { None };
        self.node.spawn(
            async move {
                // A restarted tracker forgets metainfo: whoever holds the whole blob
                // registers it again (idempotent) before announcing.
                if let Some(m) = metainfo
                    && let Err(e) = node.inner.tracker.register(&m).await
                {
                    let _ = inbox.send(Event::TrackerFailed(e.to_string())).await;
                    return;
                }
                let ev = match node.inner.tracker.announce(&ann).await {
                    Ok((peers, interval)) => Event::TrackerPeers { peers, interval },
                    Err(e) => Event::TrackerFailed(e.to_string()),
                };
                let _ = inbox.send(ev).await;
            }
            .in_current_span(),
        );
    }

    fn dial(&mut self, addr: SocketAddr) {
        let node = self.node.clone();
        let inbox = self.inbox_tx.clone();
        let digest = self.digest();
        self.node.spawn(
            async move {
                let ev = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect_peer(&node, addr, digest)).await {
                    Ok(Ok(p)) => Event::Connected(Box::new(p)),
                    Ok(Err(e)) => {
                        debug!(%addr, error = %e, "connect failed");
                        Event::ConnectFailed(addr)
                    }
                    Err(_) => Event::ConnectFailed(addr),
                };
                let _ = inbox.send(ev).await;
            }
            .in_current_span(),
        );
    }
}

async fn connect_peer(node: &Node, addr: SocketAddr, blob: Digest) -> Result<NewPeer, NodeError> {
    let permit = node.connection_permit(addr).map_err(|bound| {
        node.log_refusal(addr, bound);
        NodeError::Protocol(format!("not dialling {addr}: {bound}"))
    })?;
    let conn = node.inner.endpoint.connect(addr).await?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|source| NetError::ConnectionLost { source })?;
    let version = swarm_net::protocol_version(&conn);
    let hello = PeerMessage::Handshake { version, peer_id: node.inner.peer_id, blob };
    write_msg(&mut send, &hello).await?;
    match read_msg::<PeerMessage>(&mut recv, MAX_PEER_FRAME_LEN).await? {
        Some(PeerMessage::Handshake { version: v, peer_id, blob: b }) if b == blob && v == version => {
            Ok(NewPeer { conn, peer_id, send, recv, outbound: true, version, permit })
        }
        other => {
            conn.close(codes::PROTOCOL_ERROR.into(), b"bad handshake");
            Err(NodeError::Protocol(format!("unexpected handshake reply {other:?}")))
        }
    }
}

/// Queues the hashes of `range` for a peer, in messages of at most
/// [`MAX_HASHES_PER_MESSAGE`].
fn send_hashes(control: &ControlTx, blob: &BlobFile, range: HashRange) {
    let end = range.first.saturating_add(range.count);
    let mut first = range.first;
    while first < end {
        let count = (end - first).min(MAX_HASHES_PER_MESSAGE as u32);
        let hashes = blob.hashes(first, count);
        if hashes.is_empty() {
            return;
        }
        let sent = hashes.len() as u32;
        control.send(PeerMessage::Hashes { layout: *blob.layout(), first, hashes });
        first += sent;
    }
}

async fn write_known_peers((path, text): (PathBuf, String)) {
    let written = tokio::task::spawn_blocking(move || write_atomically(&path, &text)).await;
    if let Ok(Err(e)) = written {
        debug!(error = %e, "cannot save the known peers");
    }
}

async fn control_writer(mut send: quinn::SendStream, mut rx: mpsc::Receiver<PeerMessage>) {
    while let Some(msg) = rx.recv().await {
        if write_msg(&mut send, &msg).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

/// Reads a peer's control stream into the actor's inbox; a message the connection's
/// protocol `version` does not have, or one out of bounds, closes the connection.
///
/// A peer sends each piece hash once per connection and its peer list once, so over a
/// connection it may send at most `pieces` hashes and [`MAX_PEX_MESSAGES`] lists:
/// more is a flood and closes the connection.
async fn control_reader(
    key: PeerKey,
    mut recv: quinn::RecvStream,
    inbox: mpsc::Sender<Event>,
    pieces: u32,
    version: u32,
) {
    let (mut hashes_left, mut lists_left) = (u64::from(pieces), MAX_PEX_MESSAGES);
    loop {
        match read_msg::<PeerMessage>(&mut recv, MAX_PEER_FRAME_LEN).await {
            Ok(Some(msg)) => {
                let valid = match &msg {
                    PeerMessage::Bitfield(b) => b.len() == pieces,
                    PeerMessage::Have { piece } => *piece < pieces,
                    PeerMessage::Hashes { hashes, .. } => {
                        let n = hashes.len() as u64;
                        let ok = version >= 2 && hashes.len() <= MAX_HASHES_PER_MESSAGE && n <= hashes_left;
                        hashes_left = hashes_left.saturating_sub(n);
                        ok
                    }
                    PeerMessage::Peers { peers } => {
                        let ok = version >= 2 && peers.len() <= MAX_PEX_PEERS && lists_left > 0;
                        lists_left = lists_left.saturating_sub(1);
                        ok
                    }
                    _ => false,
                };
                if !valid {
                    debug!(?msg, "invalid control message");
                    let _ = inbox.send(Event::Closed { key }).await;
                    return;
                }
                // Waits while the actor's inbox is full: a flooding peer is slowed down.
                if inbox.send(Event::Control { key, msg }).await.is_err() {
                    return;
                }
            }
            Ok(None) => {
                debug!("the peer finished its control stream");
                let _ = inbox.send(Event::Closed { key }).await;
                return;
            }
            Err(e) => {
                debug!(error = %e, "the peer's control stream failed");
                let _ = inbox.send(Event::Closed { key }).await;
                return;
            }
        }
    }
}

/// Requests one piece on a new stream, verifies it and stores it.
async fn fetch_piece(
    conn: quinn::Connection,
    blob: Arc<BlobFile>,
    piece: u32,
    budget: Arc<ReceiveBudget>,
    limit: Option<crate::rate::Limiter>,
) -> Outcome {
    let len = blob.layout().piece_len(piece);
    let _permit = budget.acquire(len).await;
    let result = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_msg(&mut send, &PeerMessage::Request { piece }).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        match read_msg::<PeerMessage>(&mut recv, MAX_PEER_FRAME_LEN).await.map_err(|e| e.to_string())? {
            Some(PeerMessage::Piece { piece: p, length }) if p == piece && length == len => {}
            Some(PeerMessage::Reject { reason, .. }) => return Ok(Err(reason)),
            other => return Err(format!("unexpected reply {other:?}")),
        }
        // Chunk by chunk from quinn's buffers (no zero-filled buffer to overwrite).
        let mut data = Vec::with_capacity(len as usize);
        while data.len() < len as usize {
            match recv.read_chunk(len as usize - data.len(), true).await.map_err(|e| e.to_string())? {
                Some(chunk) => {
                    data.extend_from_slice(&chunk.bytes);
                    if let Some(limit) = &limit {
                        limit.consume(chunk.bytes.len()).await;
                    }
                }
                None => return Err(format!("the piece ended after {} of {len} bytes", data.len())),
            }
        }
        Ok(Ok(data))
    }
    .await;
    let data = match result {
        Ok(Ok(data)) => data,
        Ok(Err(reason)) => return Outcome::Rejected(reason),
        Err(e) => return Outcome::Failed(e),
    };
    match tokio::task::spawn_blocking(move || blob.write_piece(piece, &data)).await {
        Ok(Ok(_)) => Outcome::Verified,
        Ok(Err(StoreError::PieceMismatch { .. })) => Outcome::BadPiece,
        // The bytes were good but could not be written (disk full, I/O error).
        Ok(Err(e @ StoreError::Io { .. })) => Outcome::StoreFailed(e.to_string()),
        Ok(Err(e)) => Outcome::Failed(e.to_string()),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// Answers the piece requests a peer sends on this connection.
async fn serve_requests(
    conn: quinn::Connection,
    blob: Arc<BlobFile>,
    node: Node,
    ledger: Arc<UploadLedger>,
    control: ControlTx,
) {
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let blob = blob.clone();
        let server = node.clone();
        let (ledger, control) = (ledger.clone(), control.clone());
        node.spawn(
            async move {
                if let Err(e) = serve_one(send, recv, blob, server, ledger, control).await {
                    debug!(error = %e, "upload failed");
                }
            }
            .in_current_span(),
        );
    }
}

async fn serve_one(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    blob: Arc<BlobFile>,
    node: Node,
    ledger: Arc<UploadLedger>,
    control: ControlTx,
) -> Result<(), NodeError> {
    let Some(PeerMessage::Request { piece }) = read_msg::<PeerMessage>(&mut recv, MAX_PEER_FRAME_LEN).await? else {
        return Err(NodeError::Protocol("expected a piece request".into()));
    };
    if !blob.has_piece(piece) {
        write_msg(&mut send, &PeerMessage::Reject { piece, reason: RejectReason::Missing }).await?;
        let _ = send.finish();
        return Ok(());
    }
    if !ledger.may_send(piece, &control) {
        // Someone just got this piece from us: get it from them. Our bit for it is
        // cleared at the requester; the ledger re-announces it once the hold is
        // over, in case the first recipient never passes it on.
        write_msg(&mut send, &PeerMessage::Reject { piece, reason: RejectReason::Missing }).await?;
        let _ = send.finish();
        return Ok(());
    }
    // Queue briefly; a peer that waits too long is told to go elsewhere.
    let Some(permit) = node.inner.upload_slots.acquire(&ledger, piece).await else {
        write_msg(&mut send, &PeerMessage::Reject { piece, reason: RejectReason::Busy }).await?;
        let _ = send.finish();
        return Ok(());
    };
    let reader = blob.clone();
    let read = tokio::task::spawn_blocking(move || {
        let mut buf = Vec::new();
        reader.read_piece_into(piece, &mut buf).map(|()| buf)
    })
    .await
    .map_err(|e| NodeError::DownloadFailed { digest: blob.layout().digest, reason: e.to_string() })?;
    let data = match read {
        Ok(data) => data,
        Err(StoreError::PieceMismatch { .. }) => {
            // Our copy of the piece rotted after it was verified: the requester asks
            // another holder; this node drops the piece (see `piece_rotted`).
            drop(permit);
            write_msg(&mut send, &PeerMessage::Reject { piece, reason: RejectReason::Missing }).await?;
            let _ = send.finish();
            node.piece_rotted(&blob.layout().digest, piece).await;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    write_msg(&mut send, &PeerMessage::Piece { piece, length: data.len() as u32 }).await?;
    // Handed to quinn as owned chunks: no copy into its send buffer.
    let data = bytes::Bytes::from(data);
    let step = if node.inner.upload_limit.is_some() { PACING_CHUNK } else { data.len().max(1) };
    for start in (0..data.len()).step_by(step) {
        let chunk = data.slice(start..(start + step).min(data.len()));
        if let Some(limit) = &node.inner.upload_limit {
            limit.acquire(chunk.len()).await;
        }
        send.write_chunk(chunk).await.map_err(|e| NodeError::Protocol(e.to_string()))?;
    }
    let _ = send.finish();
    // The slot is held until the requester has acknowledged every byte, not just
    // until quinn buffered them: its send window takes a whole blob, so releasing
    // here let every request in at once, the pieces shared the link round-robin
    // and all arrived late together, and a source sent second copies while fresh
    // pieces waited behind them. Bounded, in case the requester vanishes silently.
    let acked = tokio::time::timeout(UPLOAD_ACK_WAIT, send.stopped()).await;
    drop(permit);
    if matches!(acked, Ok(Ok(None))) {
        node.inner.counters.uploaded.fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// How long an upload keeps its slot waiting for the requester to acknowledge the
/// piece's last byte (a piece of a few MiB at a few Mbit/s).
const UPLOAD_ACK_WAIT: Duration = Duration::from_secs(10);

/// Paces uploads to a byte rate: each chunk reserves the next free slot of the
/// node's send schedule and waits for it, so concurrent uploads share the cap.
struct RateLimiter {
    bytes_per_sec: f64,
    next_free: Mutex<tokio::time::Instant>,
}

impl RateLimiter {
    fn new(bytes_per_sec: u64) -> Self {
        Self { bytes_per_sec: bytes_per_sec.max(1) as f64, next_free: Mutex::new(tokio::time::Instant::now()) }
    }

    async fn acquire(&self, bytes: usize) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
        let start = {
            let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + cost;
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

/// What `swarm status` shows of a node: a snapshot taken by [`Node::status`].
#[derive(Clone, Debug)]
pub struct NodeStatus {
    pub peer_id: PeerId,
    pub zone: String,
    /// The tracker the node announces to.
    pub tracker: SocketAddr,
    /// The UDP address of the node's QUIC endpoint.
    pub listen: Option<SocketAddr>,
    /// Where the piece store lives.
    pub data_dir: PathBuf,
    /// The upload cap in bytes per second (None: unlimited).
    pub upload_rate: Option<u64>,
    /// Every blob the node fetches or serves, by digest.
    pub blobs: Vec<BlobStatus>,
    /// The node's byte counters.
    pub stats: NodeStats,
}

/// One blob of a [`NodeStatus`].
#[derive(Clone, Debug)]
pub struct BlobStatus {
    pub digest: Digest,
    pub progress: Progress,
}

impl Node {
    /// A snapshot of the node: identity, settings, every blob's latest progress and
    /// the byte counters. Cheap: reads the progress each swarm last published.
    pub fn status(&self) -> NodeStatus {
        let mut blobs: Vec<BlobStatus> = {
            let swarms = self.inner.swarms.lock().unwrap_or_else(|e| e.into_inner());
            swarms.iter().map(|(d, h)| BlobStatus { digest: *d, progress: h.progress.borrow().clone() }).collect()
        };
        blobs.sort_by_key(|b| b.digest);
        let config = &self.inner.config;
        NodeStatus {
            peer_id: self.inner.peer_id,
            zone: config.zone.clone(),
            tracker: self.inner.tracker.tracker(),
            listen: self.inner.endpoint.local_addr().ok(),
            data_dir: config.data_dir.clone(),
            upload_rate: config.upload_rate,
            blobs,
            stats: self.stats(),
        }
    }
}

impl Node {
    /// What a store announce says about this node (`crate::announce`): the UDP port
    /// its QUIC endpoint listens on (0 if unknown), its advertise address and zone.
    pub fn announce_identity(&self) -> (u16, Option<SocketAddr>, String) {
        let port = self.inner.endpoint.local_addr().map_or(0, |a| a.port());
        (port, self.inner.config.advertise, self.inner.config.zone.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarm_net::{ClusterToken, EndpointConfig};

    /// The per-address bound: eight connection attempts that never send their
    /// handshake hold their places, the ninth from the same address is refused before
    /// its TLS handshake, and closing one frees its place at once.
    #[tokio::test]
    async fn connections_beyond_the_per_address_bound_are_refused_and_a_close_frees_a_place() {
        use swarm_core::conns::MAX_CONNECTIONS_PER_ADDRESS;
        let token = ClusterToken::generate();
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let dir = tempfile::tempdir().expect("tempdir");
        let endpoint = Endpoint::bind(loopback, token.clone(), &EndpointConfig::default()).expect("bind");
        let no_tracker: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let node = Node::start(endpoint, no_tracker, NodeConfig::new(dir.path().to_path_buf())).expect("node");
        let node_addr = node.local_addr().expect("addr");
        let client = Endpoint::bind(loopback, token, &EndpointConfig::default()).expect("bind");
        let mut held = Vec::new();
        for i in 0..MAX_CONNECTIONS_PER_ADDRESS {
            held.push(client.connect(node_addr).await.unwrap_or_else(|e| panic!("connection {i}: {e}")));
        }
        assert_eq!(locked(&node.inner.connections).to(client.local_addr().expect("addr")), MAX_CONNECTIONS_PER_ADDRESS);
        let refused = client.connect(node_addr).await;
        assert!(refused.is_err(), "a connection beyond the bound was accepted");
        held.pop().expect("one").close(0u32.into(), b"done");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match client.connect(node_addr).await {
                Ok(conn) => break held.push(conn),
                Err(e) if Instant::now() > deadline => panic!("the closed connection's place was never freed: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        assert_eq!(locked(&node.inner.connections).total(), usize::from(MAX_CONNECTIONS_PER_ADDRESS));
    }

    /// A peer that never reads its control stream: once QUIC's flow control stops the
    /// writer, at most [`CONTROL_QUEUE`] messages wait for it, and the next one
    /// disconnects it instead of growing the queue or being dropped unnoticed.
    #[tokio::test]
    async fn a_peer_that_never_reads_its_control_stream_is_disconnected_at_the_bound() {
        let token = ClusterToken::generate();
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let node = Endpoint::bind(loopback, token.clone(), &EndpointConfig::default()).expect("bind");
        // The silent peer lets us send at most 1 KiB ahead of its (never) reading.
        let tight = EndpointConfig { stream_receive_window: 1024, ..EndpointConfig::default() };
        let silent = Endpoint::bind(loopback, token, &tight).expect("bind");
        let silent_addr = silent.local_addr().expect("addr");
        let accepting = tokio::spawn(async move {
            let conn = silent.accept().await.expect("incoming").authenticate().await.expect("auth");
            let (_send, recv) = conn.accept_bi().await.expect("stream");
            // Hold the stream and the connection open without ever reading.
            (silent, conn, recv)
        });
        let conn = node.connect(silent_addr).await.expect("connect");
        let (mut send, _recv) = conn.open_bi().await.expect("open");
        write_msg(&mut send, &PeerMessage::Have { piece: 0 }).await.expect("first message");
        let _silent = accepting.await.expect("join");
        let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
        let control = ControlTx { tx: tx.clone(), conn: conn.clone() };
        tokio::spawn(control_writer(send, rx));
        let mut sent = 0;
        while conn.close_reason().is_none() && sent < 10 * CONTROL_QUEUE {
            control.send(PeerMessage::Have { piece: sent as u32 });
            sent += 1;
            // Let the writer run until QUIC flow control stops it.
            tokio::task::yield_now().await;
        }
        eprintln!("disconnected after {sent} messages");
        assert!(conn.close_reason().is_some(), "still connected after {sent} messages to a peer that never reads");
        assert!(sent > CONTROL_QUEUE, "disconnected after only {sent} messages: before the queue was full");
        // What the 1 KiB window and the writer hold beyond the queue: a few hundred
        // 6-byte `Have`s at most.
        assert!(sent < CONTROL_QUEUE + 1024, "{sent} messages sent: more waited than the queue holds");
    }
}
