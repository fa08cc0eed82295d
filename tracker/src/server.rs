//! The tracker service: a QUIC accept loop around [`TrackerState`].
//!
//! Connections are bounded with the node's table ([`swarm_core::conns`]): 8 per
//! remote address and [`MAX_TRACKER_CONNECTIONS`] in total, counted from the attempt
//! (every agent keeps one cached connection to each tracker, so the total is the
//! cluster size the tracker serves; attempts still in their handshake are bounded far
//! lower by the endpoint, [`swarm_net::MAX_HANDSHAKES`]). Past a bound an attempt is
//! refused before its TLS handshake, and the refusal is logged once per source per
//! minute (by the endpoint's refusal log, as are failed token proofs).
//!
//! Task layout: [`serve`] owns a `JoinSet` with one task per connection plus the
//! expiry task; each connection task owns a `JoinSet` with one task per request
//! stream. Dropping a set aborts its tasks, so stopping `serve` tears everything
//! down. The state sits behind a `std::sync::Mutex` locked only inside
//! `answer`, never across an `.await`.
//!
//! [`Tracker`] is the same service with a handle: [`Tracker::stats`] reads what the
//! health and metrics endpoints show (nodes, blobs, live leases, requests by kind).
//! The nodes and lease digests it needs are noted beside the state, in a second mutex
//! (`Seen`); lock order: the state before `Seen`, never the other way round.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use swarm_core::conns::{MAX_CONNECTIONS_PER_ADDRESS, Permit, SharedConnections};
use swarm_net::{Endpoint, Incoming, NetError, codes, read_msg, write_msg};
use swarm_proto::codec::MAX_FRAME_LEN;
use swarm_proto::msg::{LeaseReply, TrackerErrorCode, TrackerRequest, TrackerResponse};
use swarm_proto::{Digest, PeerId};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{LeaseState, LeaseStatus, TrackerConfig, TrackerState};

/// How long a peer may take to send its request once it opened a stream.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections the tracker holds at most (one per agent and tracker client).
pub const MAX_TRACKER_CONNECTIONS: usize = 16_384;
/// How long `serve` waits for close frames to go out when it stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How long a `GetHashes` with nothing new to return waits for a publish before it
/// is answered empty (the hashes reach waiting peers as soon as the lease holder
/// publishes them, instead of on their next poll).
pub const HASHES_WAIT: Duration = Duration::from_secs(2);

type Shared = Arc<SharedState>;

struct SharedState {
    state: Mutex<TrackerState>,
    /// Woken on every publish of piece hashes.
    published: Notify,
    /// Woken on every stage order (agents long-poll with `WaitStage`).
    staged: Notify,
    /// Nodes and leases seen, for [`Tracker::stats`]. Locked after `state`, if both.
    seen: Mutex<Seen>,
    /// Requests received, by kind (indexed like [`REQUEST_KINDS`]).
    requests: [AtomicU64; REQUEST_KINDS.len()],
    peer_ttl: Duration,
}

/// What the server notes beside the state for its statistics.
#[derive(Default)]
struct Seen {
    /// Every peer id that announced, with its last announce.
    nodes: HashMap<PeerId, Instant>,
    /// Blobs whose upstream lease was granted at some point (pruned when read), with
    /// the holder and when it was granted the lease (renewals keep that time).
    leases: HashMap<Digest, (PeerId, Instant)>,
}

/// The kinds of tracker request, as counted in [`TrackerStats::requests`].
pub const REQUEST_KINDS: [&str; 16] = [
    "register",
    "get-metainfo",
    "announce",
    "leave",
    "acquire-lease",
    "publish-hashes",
    "release-lease",
    "get-hashes",
    "cluster-view",
    "hello",
    "announce-store",
    "stage",
    "wait-stage",
    "stage-progress",
    "stage-status",
    "uplink-share",
];

/// A read-only snapshot of the tracker, for health and metrics endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackerStats {
    /// Distinct peers that announced within the peer TTL.
    pub nodes: usize,
    /// Blobs with peers, metainfo or upstream state.
    pub blobs: usize,
    /// Upstream leases currently live (held, renewed and making progress).
    pub leases: usize,
    /// Requests received since start, by kind (every entry of [`REQUEST_KINDS`]).
    pub requests: Vec<(&'static str, u64)>,
}

/// A tracker service with a handle on its state. Cheap to clone.
#[derive(Clone)]
pub struct Tracker {
    shared: Shared,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker").finish_non_exhaustive()
    }
}

impl Tracker {
    /// A tracker with an empty state.
    pub fn new(config: TrackerConfig) -> Self {
        let peer_ttl = config.peer_ttl;
        let mut state = TrackerState::new(config, rand::random());
        // Holders of leases granted by the tracker this one replaces re-assert them first.
        state.begin_grace(Instant::now());
        let shared = Arc::new(SharedState {
            state: Mutex::new(state),
            published: Notify::new(),
            staged: Notify::new(),
            seen: Mutex::new(Seen::default()),
            requests: std::array::from_fn(|_| AtomicU64::new(0)),
            peer_ttl,
        });
        Self { shared }
    }

    /// Serves requests on `endpoint` until `cancel` fires, like [`serve`].
    pub async fn serve(&self, endpoint: Endpoint, cancel: CancellationToken) -> Result<(), NetError> {
        run(endpoint, self.shared.clone(), cancel).await
    }

    /// Nodes, blobs, live leases and requests by kind, as of now.
    pub fn stats(&self) -> TrackerStats {
        let now = Instant::now();
        let state = lock(&self.shared);
        let mut seen = self.shared.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let ttl = self.shared.peer_ttl;
        let nodes = seen.nodes.values().filter(|at| now.saturating_duration_since(**at) <= ttl).count();
        seen.leases.retain(|blob, _| state.lease_status(blob, now).is_some());
        let leases = seen
            .leases
            .keys()
            .filter(|blob| state.lease_status(blob, now).is_some_and(|l| l.state == LeaseState::Live))
            .count();
        let blobs = state.blob_count();
        drop(seen);
        drop(state);
        let requests =
            REQUEST_KINDS.iter().zip(&self.shared.requests).map(|(k, n)| (*k, n.load(Ordering::Relaxed))).collect();
        TrackerStats { nodes, blobs, leases, requests }
    }
}

/// Runs the tracker on `endpoint` until `cancel` fires or the endpoint is closed.
/// On the way out it closes the endpoint (every peer sees a
/// [`codes::SHUTDOWN`] close and reconnects to the next tracker on its next request).
pub async fn serve(endpoint: Endpoint, config: TrackerConfig, cancel: CancellationToken) -> Result<(), NetError> {
    Tracker::new(config).serve(endpoint, cancel).await
}

async fn run(endpoint: Endpoint, state: Shared, cancel: CancellationToken) -> Result<(), NetError> {
    let local = endpoint.local_addr()?;
    let (expire_every, interval, ttl) = {
        let st = lock(&state);
        let config = st.config();
        let every = (config.peer_ttl / 3).clamp(Duration::from_millis(100), Duration::from_secs(30));
        (every, config.announce_interval, config.peer_ttl)
    };
    let instance = lock(&state).instance();
    info!(%local, ?interval, ?ttl, instance = %format_args!("{instance:016x}"), "tracker listening");

    let mut tasks = JoinSet::new();
    tasks.spawn(expire_loop(state.clone(), expire_every, cancel.clone()).instrument(info_span!("expire")));
    let connections = SharedConnections::with_limits(MAX_CONNECTIONS_PER_ADDRESS, MAX_TRACKER_CONNECTIONS);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    warn!(error = %e, "tracker task panicked");
                }
            }
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    let remote = incoming.remote_address();
                    match connections.open(remote) {
                        Ok(permit) => {
                            let span = info_span!("conn", %remote);
                            tasks.spawn(connection(incoming, permit, state.clone(), cancel.clone()).instrument(span));
                        }
                        Err(bound) => incoming.refuse(&bound),
                    }
                }
                None => break,
            },
        }
    }
    info!(%local, "tracker stopping");
    endpoint.close();
    tasks.shutdown().await;
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, endpoint.wait_idle()).await;
    Ok(())
}

async fn expire_loop(state: Shared, every: Duration, cancel: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            _ = ticks.tick() => {
                let now = Instant::now();
                let unix = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let dropped = {
                    let mut st = lock(&state);
                    st.expire_stage_orders(unix);
                    st.expire(now)
                };
                let ttl = state.peer_ttl;
                state
                    .seen
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .nodes
                    .retain(|_, at| now.saturating_duration_since(*at) <= ttl);
                if dropped > 0 {
                    info!(dropped, "expired silent peers");
                }
            }
        }
    }
}

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, TrackerState> {
    // A panic while holding the lock leaves at worst one half-applied request;
    // serving on beats taking the whole tracker down.
    state.state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Authenticates one connection, then serves its request streams; `_permit` is its
/// place among the tracker's connections.
async fn connection(incoming: Incoming, _permit: Permit, state: Shared, cancel: CancellationToken) {
    let remote = incoming.remote_address();
    let conn = match incoming.authenticate().await {
        Ok(conn) => conn,
        // Refusals are logged by swarm_net ("refusing <addr>: ...", once per source
        // per minute).
        Err(e) => {
            debug!(%remote, error = %e, "connection failed before authentication");
            return;
        }
    };
    debug!(%remote, "peer connected");
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    streams.spawn(request(send, recv, remote, state.clone()).in_current_span());
                }
                Err(e) => {
                    debug!(%remote, reason = %e, "peer disconnected");
                    return;
                }
            },
        }
    }
}

/// Serves one stream: one request in, one response out.
async fn request(mut send: quinn::SendStream, mut recv: quinn::RecvStream, remote: SocketAddr, state: Shared) {
    let refuse = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream| {
        let code = quinn::VarInt::from_u32(codes::PROTOCOL_ERROR);
        let _ = send.reset(code);
        let _ = recv.stop(code);
    };
    let req =
        match tokio::time::timeout(REQUEST_READ_TIMEOUT, read_msg::<TrackerRequest>(&mut recv, MAX_FRAME_LEN)).await {
            Ok(Ok(Some(req))) => req,
            Ok(Ok(None)) => return, // opened and finished without a request: nothing to answer
            Ok(Err(e)) if e.is_connection_lost() => return,
            Ok(Err(e)) => {
                warn!(%remote, error = %e, "refusing a malformed tracker request");
                refuse(&mut send, &mut recv);
                return;
            }
            Err(_) => {
                warn!(%remote, "no tracker request within {REQUEST_READ_TIMEOUT:?}; resetting the stream");
                refuse(&mut send, &mut recv);
                return;
            }
        };
    let kind = describe(&req);
    if let Some(i) = REQUEST_KINDS.iter().position(|k| *k == kind) {
        state.requests[i].fetch_add(1, Ordering::Relaxed);
    }
    let response = match req {
        TrackerRequest::GetHashes { blob, first } => hashes_when_published(&state, blob, first, remote).await,
        req @ TrackerRequest::WaitStage { .. } => stage_when_ordered(&state, req, remote).await,
        req => answer(&state, req, remote),
    };
    if let Err(e) = write_msg(&mut send, &response).await {
        debug!(%remote, error = %e, "could not send the response");
        return;
    }
    let _ = send.finish();
}

/// Answers `GetHashes`; when it would return no hash although more are due (an
/// upstream fetch is publishing them), waits up to [`HASHES_WAIT`] for a publish.
async fn hashes_when_published(state: &Shared, blob: Digest, first: u32, remote: SocketAddr) -> TrackerResponse {
    let deadline = tokio::time::Instant::now() + HASHES_WAIT;
    loop {
        // Registered before the state is read, so a publish in between is not missed.
        let published = state.published.notified();
        tokio::pin!(published);
        published.as_mut().enable();
        let response = answer(state, TrackerRequest::GetHashes { blob, first }, remote);
        let waiting = matches!(&response, TrackerResponse::Hashes { hashes, complete: false, .. } if hashes.is_empty());
        if !waiting || tokio::time::timeout_at(deadline, published).await.is_err() {
            return response;
        }
    }
}

/// Answers `WaitStage`: at once when the tracker's stage generation differs from the
/// agent's, else when a new order comes in or after the request's `wait_ms` (at most
/// [`MAX_STAGE_WAIT_MS`](swarm_proto::msg::MAX_STAGE_WAIT_MS)).
async fn stage_when_ordered(state: &Shared, req: TrackerRequest, remote: SocketAddr) -> TrackerResponse {
    let TrackerRequest::WaitStage { after, wait_ms, .. } = &req else { return answer(state, req, remote) };
    let (after, wait) = (*after, Duration::from_millis(u64::from((*wait_ms).min(swarm_proto::msg::MAX_STAGE_WAIT_MS))));
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Registered before the state is read, so an order in between is not missed.
        let staged = state.staged.notified();
        tokio::pin!(staged);
        staged.as_mut().enable();
        let response = answer(state, req.clone(), remote);
        let same = matches!(&response, TrackerResponse::StageOrders { generation, .. } if *generation == after);
        if !same || tokio::time::timeout_at(deadline, staged).await.is_err() {
            return response;
        }
    }
}

/// What the state looked like, before a request, where the log line about it
/// needs the difference.
enum Before {
    Nothing,
    /// An announce from a peer not yet tracked for the blob.
    FirstAnnounce {
        peer: PeerId,
        blob: Digest,
    },
    /// A register (`published: false`) or a publish of hashes for a blob without
    /// metainfo.
    NoMetainfo {
        blob: Digest,
        published: bool,
    },
    /// A lease request, and the lease as it stood.
    Acquire {
        peer: PeerId,
        blob: Digest,
        was: Option<LeaseStatus>,
    },
    /// A publish of hashes for a blob without a lease: the publisher re-asserts one.
    Reassert {
        peer: PeerId,
        blob: Digest,
    },
    /// A store announce from a node this tracker had not seen.
    NewStore {
        peer: PeerId,
        blobs: usize,
    },
    /// A stage order.
    StageOrder {
        image: String,
        release: bool,
    },
    /// A share request of the uplink cap, and the holders counted before it.
    Share {
        peer: PeerId,
        blob: Digest,
        holders: usize,
    },
    /// A lease release, and the lease as it stood.
    Release {
        peer: PeerId,
        blob: Digest,
        was: Option<LeaseStatus>,
        failed: Option<String>,
    },
}

/// Applies one request to the state and logs what deserves it. The lock is held only
/// here, never across an `.await`.
fn answer(state: &Shared, req: TrackerRequest, remote: SocketAddr) -> TrackerResponse {
    let what = describe(&req);
    // New hashes, or a lease given up: peers waiting in `hashes_when_published` look again.
    let wakes = matches!(req, TrackerRequest::PublishHashes { .. } | TrackerRequest::ReleaseLease { .. });
    let announcer = match &req {
        TrackerRequest::Announce(a) => Some(a.peer_id),
        TrackerRequest::AnnounceStore(a) if !a.blobs.is_empty() => Some(a.peer_id),
        _ => None,
    };
    let (mut response, before, completed) = {
        let mut st = lock(state);
        let now = Instant::now();
        let before = match &req {
            TrackerRequest::Announce(a) if !st.has_peer(&a.blob, &a.peer_id) => {
                Before::FirstAnnounce { peer: a.peer_id, blob: a.blob }
            }
            TrackerRequest::Register { metainfo } if st.metainfo(&metainfo.digest).is_none() => {
                Before::NoMetainfo { blob: metainfo.digest, published: false }
            }
            TrackerRequest::PublishHashes { peer_id, layout, .. } if st.lease_status(&layout.digest, now).is_none() => {
                Before::Reassert { peer: *peer_id, blob: layout.digest }
            }
            TrackerRequest::PublishHashes { layout, .. } if st.metainfo(&layout.digest).is_none() => {
                Before::NoMetainfo { blob: layout.digest, published: true }
            }
            TrackerRequest::AnnounceStore(a)
                if !state.seen.lock().unwrap_or_else(PoisonError::into_inner).nodes.contains_key(&a.peer_id) =>
            {
                Before::NewStore { peer: a.peer_id, blobs: a.blobs.len() }
            }
            TrackerRequest::AcquireLease { peer_id, blob } => {
                Before::Acquire { peer: *peer_id, blob: *blob, was: st.lease_status(blob, now) }
            }
            TrackerRequest::UplinkShare { peer_id, blob, .. } if st.uplink().cap().is_some() => {
                Before::Share { peer: *peer_id, blob: *blob, holders: st.uplink().holders() }
            }
            TrackerRequest::ReleaseLease { peer_id, blob, failed } => {
                Before::Release { peer: *peer_id, blob: *blob, was: st.lease_status(blob, now), failed: failed.clone() }
            }
            TrackerRequest::Stage(order) => Before::StageOrder { image: order.image.clone(), release: order.release },
            _ => Before::Nothing,
        };
        let response = st.handle(req, remote, now);
        let completed = match &before {
            Before::NoMetainfo { blob, .. } => st.metainfo(blob).is_some(),
            Before::Share { holders, .. } => st.uplink().holders() != *holders,
            _ => false,
        };
        (response, before, completed)
    };
    if wakes {
        state.published.notify_waiters();
    }
    if let (TrackerResponse::StageOrders { .. }, Before::StageOrder { image, release }) = (&response, &before) {
        info!(%remote, image, release, "stage order");
        state.staged.notify_waiters();
    }
    note_seen(state, announcer, &response, &before);
    add_lease_ages(state, &mut response);
    match (&response, before) {
        (TrackerResponse::Error { code, message }, _) => match code {
            TrackerErrorCode::UnknownBlob => debug!(%remote, request = what, "{message}"),
            _ if message.ends_with("ask again") => debug!(%remote, request = what, "{message}"),
            _ => warn!(%remote, request = what, ?code, "refused: {message}"),
        },
        (TrackerResponse::Registered, Before::NoMetainfo { blob, published }) if completed => match published {
            false => info!(%remote, %blob, "registered blob"),
            true => info!(%remote, %blob, "every piece hash published: registered blob"),
        },
        (TrackerResponse::Registered, Before::Reassert { peer, blob }) => {
            info!(%remote, %peer, blob = %blob.short(), "upstream lease re-asserted by its holder");
        }
        (TrackerResponse::StoreAnnounced { missing, .. }, Before::NewStore { peer, blobs }) => {
            info!(%remote, %peer, blobs, missing = missing.len(), "node announced its store");
        }
        (TrackerResponse::UplinkShare { bytes_per_sec, .. }, Before::Share { peer, blob, .. }) if completed => {
            info!(%remote, %peer, blob = %blob.short(), share = *bytes_per_sec, "uplink cap re-divided");
        }
        (TrackerResponse::Peers { peers, .. }, Before::FirstAnnounce { peer, blob }) => {
            info!(%remote, %peer, blob = %blob.short(), handed_out = peers.len(), "peer joined");
        }
        (TrackerResponse::Lease(reply), Before::Acquire { peer, blob, was }) => {
            log_lease(remote, peer, blob, was, reply)
        }
        // Accepted (a refusal is an `Error`), and there was a lease to end.
        (TrackerResponse::Left, Before::Release { peer, blob, was: Some(was), failed }) => match failed {
            None => info!(%remote, %peer, blob = %blob.short(), known = was.known, "upstream lease released"),
            Some(reason) => warn!(
                %remote, %peer, blob = %blob.short(), known = was.known,
                "upstream fetch failed; published hashes dropped, lease requests refused for a while: {reason}"
            ),
        },
        _ => {}
    }
    response
}

/// Notes an announcing node and a granted lease for [`Tracker::stats`].
fn note_seen(state: &Shared, announcer: Option<PeerId>, response: &TrackerResponse, before: &Before) {
    let node = match (announcer, response) {
        (Some(peer), TrackerResponse::Peers { .. } | TrackerResponse::StoreAnnounced { .. }) => Some(peer),
        _ => None,
    };
    let lease = match (response, before) {
        (TrackerResponse::Lease(LeaseReply::Granted { .. }), Before::Acquire { peer, blob, .. }) => {
            Some((*blob, *peer))
        }
        _ => None,
    };
    if node.is_none() && lease.is_none() {
        return;
    }
    let mut seen = state.seen.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(peer) = node {
        seen.nodes.insert(peer, Instant::now());
    }
    if let Some((blob, holder)) = lease {
        let now = Instant::now();
        let since = seen.leases.entry(blob).or_insert((holder, now));
        if since.0 != holder {
            *since = (holder, now);
        }
    }
}

/// Adds what only the server notes to a cluster view: how long each lease has been
/// held by its current holder.
fn add_lease_ages(state: &Shared, response: &mut TrackerResponse) {
    let TrackerResponse::ClusterView(view) = response else { return };
    let now = Instant::now();
    let seen = state.seen.lock().unwrap_or_else(PoisonError::into_inner);
    for blob in &mut view.blobs {
        if let Some(lease) = &mut blob.lease
            && let Some((holder, since)) = seen.leases.get(&blob.digest)
            && *holder == lease.holder
        {
            lease.held_ms = Some(u64::try_from(now.saturating_duration_since(*since).as_millis()).unwrap_or(u64::MAX));
        }
    }
}

/// Logs grants, renewals, moves and refusals of upstream leases.
fn log_lease(remote: SocketAddr, peer: PeerId, blob: Digest, was: Option<LeaseStatus>, reply: &LeaseReply) {
    let blob = blob.short();
    match (reply, was) {
        (LeaseReply::Granted { .. }, Some(was)) if was.holder == peer && was.state == LeaseState::Live => {
            debug!(%remote, %peer, %blob, "upstream lease renewed");
        }
        (LeaseReply::Granted { resume_from, .. }, Some(was)) if was.holder != peer => {
            let why = match was.state {
                LeaseState::Live => "live", // cannot happen: a live lease is not handed on
                LeaseState::Expired => "went silent",
                LeaseState::Stalled => "stalled",
            };
            let old_holder = was.holder;
            info!(%remote, %peer, %blob, resume_from, %old_holder, "upstream lease moved: the old holder {why}");
        }
        (LeaseReply::Granted { resume_from, .. }, _) => {
            info!(%remote, %peer, %blob, resume_from, "upstream lease granted");
        }
        (LeaseReply::Failed { reason }, Some(was)) if was.holder == peer && was.state == LeaseState::Stalled => {
            let known = was.known;
            info!(%remote, %peer, %blob, known, "upstream lease withdrawn from its stalled holder: {reason}");
        }
        (LeaseReply::Failed { reason }, _) => debug!(%remote, %peer, %blob, "upstream lease refused: {reason}"),
        (LeaseReply::HeldBy { holder }, _) => debug!(%remote, %peer, %blob, %holder, "upstream lease held"),
        (LeaseReply::NotNeeded, _) => debug!(%remote, %peer, %blob, "upstream lease not needed"),
    }
}

fn describe(req: &TrackerRequest) -> &'static str {
    match req {
        TrackerRequest::Register { .. } => "register",
        TrackerRequest::GetMetainfo { .. } => "get-metainfo",
        TrackerRequest::Announce(_) => "announce",
        TrackerRequest::Leave { .. } => "leave",
        TrackerRequest::AcquireLease { .. } => "acquire-lease",
        TrackerRequest::PublishHashes { .. } => "publish-hashes",
        TrackerRequest::ReleaseLease { .. } => "release-lease",
        TrackerRequest::GetHashes { .. } => "get-hashes",
        TrackerRequest::ClusterView { .. } => "cluster-view",
        TrackerRequest::Hello { .. } => "hello",
        TrackerRequest::AnnounceStore(_) => "announce-store",
        TrackerRequest::Stage(_) => "stage",
        TrackerRequest::WaitStage { .. } => "wait-stage",
        TrackerRequest::StageProgress { .. } => "stage-progress",
        TrackerRequest::StageStatus { .. } => "stage-status",
        TrackerRequest::UplinkShare { .. } => "uplink-share",
    }
}
