//! [`TrackerClient`]: how peers talk to the trackers of their cluster.
//!
//! **One tracker or several.** A client knows a list of tracker addresses (the
//! `--tracker a:7000,b:7000,c:7000` list, or the addresses one DNS name resolves to,
//! kept current with [`TrackerClient::set_trackers`]). The trackers share no state:
//! every request about one blob goes to that blob's **arbiter**, chosen by rendezvous
//! (highest random weight) hashing of (tracker address, blob digest) over the
//! trackers currently up ([`rendezvous_order`]); every node with the same list picks
//! the same arbiter. A tracker that fails a request (no connection, no answer within
//! [`ATTEMPT_TIMEOUT`]) is marked down and the request goes to the next tracker in
//! the blob's order at once; a background probe marks it up again as soon as it
//! answers. Requests about no blob go to the first tracker up; the cluster view is
//! asked of every tracker and merged ([`merge_views`]).
//!
//! **Connections.** One cached, authenticated QUIC connection per tracker; each
//! request on its own bidirectional stream; every request bounded in time; one
//! reconnect and retry when the cached connection turns out dead (the tracker
//! restarted). All tracker requests are idempotent, so the retry is safe:
//! re-published hashes must equal the known ones, re-acquiring renews one's own
//! lease, and releasing a lease already released is a no-op.
//!
//! **Versions and instances.** The first request on every new connection is
//! `Hello { version }`; the reply carries the version both sides speak and the
//! tracker's random instance id. A version-1 tracker cannot decode `Hello` and
//! resets the stream: the client then sends it nothing newer than version 1 (asking
//! it for a version-2 request gives [`TrackerClientError::Unsupported`]). Every change
//! of a tracker's instance id, version, reachability or connection count is published
//! on [`TrackerClient::watch`]: a new instance id is a tracker that lost its state, to
//! which the agent re-announces its store (`swarm_peer::announce`) and its leases.
//!
//! **Lease holders across trackers.** A blob's new arbiter (another replica, or a
//! restarted tracker) refuses a publish that does not continue hashes it knows; the
//! holder's publisher (`swarm_core::lease::Publisher`) then publishes everything
//! from piece 0, which re-asserts its lease there (see `swarm_core::tracker`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use swarm_core::tracker::uplink::{Share, UNCAPPED_RENEW};
use swarm_net::{Endpoint, NetError, codes, read_msg, write_msg};
use swarm_proto::codec::MAX_FRAME_LEN;
use swarm_proto::msg::{
    Announce, ClusterView, LeaseReply, LeaseViewState, PeerInfo, StageAgent, StageOrder, StageProgress, StageStatus,
    StoreAnnounce, TRACKER_VERSION, TrackerErrorCode, TrackerRequest, TrackerResponse, UPLINK_CAP_KEY,
};
use swarm_proto::{Digest, Layout, Metainfo, PeerId, ProtoError};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Default bound on one request, reconnecting included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors of tracker requests.
#[derive(Debug, thiserror::Error)]
pub enum TrackerClientError {
    /// Connecting, authenticating or moving bytes failed. A token mismatch shows up
    /// here as [`NetError::AuthRejected`].
    #[error("tracker {tracker}: {source}")]
    Net {
        tracker: SocketAddr,
        #[source]
        source: NetError,
    },
    /// The request did not complete in time.
    #[error("tracker {tracker} did not answer within {after:?}")]
    Timeout { tracker: SocketAddr, after: Duration },
    /// The client has no tracker address.
    #[error("no tracker address is configured")]
    NoTracker,
    /// The request is newer than the tracker's protocol version.
    #[error("tracker {tracker} speaks tracker protocol version {version}, too old for this request")]
    Unsupported { tracker: SocketAddr, version: u32 },
    /// The tracker finished the stream without answering.
    #[error("tracker {tracker} closed the request stream without answering")]
    NoResponse { tracker: SocketAddr },
    /// The tracker could not parse the request.
    #[error("tracker {tracker} refused the request as malformed (is it running an incompatible swarm version?)")]
    Malformed { tracker: SocketAddr },
    /// The tracker does not know the stage requests (it refused one as malformed, or
    /// speaks tracker protocol version 1).
    #[error("tracker too old for stage: {tracker} does not know the stage requests; upgrade the tracker")]
    TooOldForStage { tracker: SocketAddr },
    /// The tracker answered with an error.
    #[error("tracker refused the request ({code:?}): {message}")]
    Refused { code: TrackerErrorCode, message: String },
    /// The tracker answered with the wrong kind of response.
    #[error("tracker answered a {request} request with {response}")]
    UnexpectedResponse { request: &'static str, response: &'static str },
    /// The metainfo the tracker sent breaks the protocol's rules.
    #[error("tracker sent invalid metainfo for {blob}: {source}")]
    InvalidMetainfo {
        blob: Digest,
        #[source]
        source: ProtoError,
    },
    /// The tracker sent the metainfo of another blob.
    #[error("asked the tracker for {requested} but got the metainfo of {got}")]
    WrongMetainfo { requested: Digest, got: Digest },
    /// The layout the tracker sent with piece hashes breaks the protocol's rules.
    #[error("tracker sent an invalid layout for {blob}: {source}")]
    InvalidLayout {
        blob: Digest,
        #[source]
        source: ProtoError,
    },
    /// The tracker sent the piece hashes of another blob.
    #[error("asked the tracker for the hashes of {requested} but got those of {got}")]
    WrongHashes { requested: Digest, got: Digest },
    /// The tracker sent hashes for other pieces than asked, or past the last piece.
    #[error(
        "asked the tracker for the hashes of {blob} from piece {requested} but got {count} from piece {first} \
         of {pieces}"
    )]
    HashWindow { blob: Digest, requested: u32, first: u32, count: usize, pieces: u32 },
}

impl TrackerClientError {
    /// Whether the tracker itself failed (unreachable, no answer in time): the request
    /// may go to another tracker. An answer, even a refusal, is not a failure.
    pub fn is_tracker_failure(&self) -> bool {
        matches!(
            self,
            TrackerClientError::Net { .. } | TrackerClientError::Timeout { .. } | TrackerClientError::NoResponse { .. }
        )
    }

    /// Whether the tracker refused our cluster token.
    pub fn is_auth_rejected(&self) -> bool {
        matches!(self, TrackerClientError::Net { source: NetError::AuthRejected { .. }, .. })
    }

    /// Whether the tracker refused a `publish_hashes` or `release_lease` because the
    /// caller does not hold the blob's upstream lease (any more): it expired, stalled
    /// or moved to another node, and the caller should stop its upstream fetch.
    pub fn is_not_lease_holder(&self) -> bool {
        matches!(self, TrackerClientError::Refused { code: TrackerErrorCode::Invalid, message }
            if message.contains("is not the lease holder"))
    }
}

/// With several trackers, one attempt at one tracker is bounded by this before the
/// request moves on to the next (a tracker may hold a `GetHashes` for 2 s).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(4);
/// A tracker marked down is probed (connect and `Hello`) this often until it answers.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// What the client knows of one tracker, as published on [`TrackerClient::watch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackerInfo {
    pub addr: SocketAddr,
    /// Not marked down (its last request did not fail).
    pub up: bool,
    /// The tracker protocol version spoken with it (`None`: not connected yet).
    pub version: Option<u32>,
    /// Its instance id (`None`: not connected yet, or a version-1 tracker).
    pub instance: Option<u64>,
    /// Connections opened to it so far (a version-1 tracker's restarts show only here).
    pub connections: u64,
}

/// A handle to the trackers. Cheap to clone; clones share the cached connections.
#[derive(Clone, Debug)]
pub struct TrackerClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    endpoint: Endpoint,
    timeout: Duration,
    remotes: Mutex<Vec<Arc<Remote>>>,
    view: watch::Sender<Vec<TrackerInfo>>,
}

#[derive(Debug)]
struct Remote {
    addr: SocketAddr,
    /// The cached connection. An async mutex: it is held while connecting, so
    /// concurrent requests share one new connection instead of racing.
    conn: tokio::sync::Mutex<Option<quinn::Connection>>,
    status: Mutex<RemoteStatus>,
}

#[derive(Clone, Copy, Debug, Default)]
struct RemoteStatus {
    down: bool,
    probing: bool,
    version: Option<u32>,
    instance: Option<u64>,
    connections: u64,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Remote {
    fn new(addr: SocketAddr) -> Arc<Self> {
        Arc::new(Self { addr, conn: tokio::sync::Mutex::new(None), status: Mutex::new(RemoteStatus::default()) })
    }

    fn info(&self) -> TrackerInfo {
        let s = *locked(&self.status);
        TrackerInfo {
            addr: self.addr,
            up: !s.down,
            version: s.version,
            instance: s.instance,
            connections: s.connections,
        }
    }
}

/// The weight of `tracker` for `blob` in rendezvous hashing: FNV-1a over the
/// address's text and the digest, then SplitMix64's finaliser. Stable across
/// versions and machines, so every node picks the same arbiter.
pub fn rendezvous_weight(tracker: &SocketAddr, blob: &Digest) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tracker.to_string().bytes().chain(blob.0.iter().copied()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `trackers` in the order a request about `blob` tries them: highest rendezvous
/// weight first (the first is the blob's arbiter while it is up).
pub fn rendezvous_order(trackers: &[SocketAddr], blob: &Digest) -> Vec<SocketAddr> {
    let mut v: Vec<(u64, SocketAddr)> = trackers.iter().map(|t| (rendezvous_weight(t, blob), *t)).collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    v.into_iter().map(|(_, t)| t).collect()
}

/// The blob a request is about, if any: it is routed to that blob's arbiter.
fn blob_of(req: &TrackerRequest) -> Option<Digest> {
    match req {
        TrackerRequest::Register { metainfo } => Some(metainfo.digest),
        TrackerRequest::GetMetainfo { blob }
        | TrackerRequest::Leave { blob, .. }
        | TrackerRequest::AcquireLease { blob, .. }
        | TrackerRequest::ReleaseLease { blob, .. }
        | TrackerRequest::GetHashes { blob, .. } => Some(*blob),
        TrackerRequest::Announce(a) => Some(a.blob),
        TrackerRequest::PublishHashes { layout, .. } => Some(layout.digest),
        TrackerRequest::ClusterView { .. }
        | TrackerRequest::Hello { .. }
        | TrackerRequest::AnnounceStore(_)
        | TrackerRequest::Stage(_)
        | TrackerRequest::WaitStage { .. }
        | TrackerRequest::StageProgress { .. }
        | TrackerRequest::StageStatus { .. } => None,
        // Not about its blob: to the owner of the cluster's uplink cap.
        TrackerRequest::UplinkShare { .. } => Some(UPLINK_CAP_KEY),
    }
}

/// The oldest tracker protocol version that has `req`.
fn version_of(req: &TrackerRequest) -> u32 {
    match req {
        TrackerRequest::Hello { .. } | TrackerRequest::AnnounceStore(_) => 2,
        // Version 3: not sent to an older tracker (`Unsupported`): `swarm stage` reports
        // [`TrackerClientError::TooOldForStage`], a lease holder fetches uncapped.
        TrackerRequest::Stage(_)
        | TrackerRequest::WaitStage { .. }
        | TrackerRequest::StageProgress { .. }
        | TrackerRequest::StageStatus { .. }
        | TrackerRequest::UplinkShare { .. } => 3,
        _ => 1,
    }
}

impl TrackerClient {
    /// A client of the tracker at `tracker`, using `endpoint` (the peer's own) to dial.
    /// Connects lazily, on the first request.
    pub fn new(endpoint: Endpoint, tracker: SocketAddr) -> Self {
        Self::with_timeout(endpoint, tracker, REQUEST_TIMEOUT)
    }

    /// Like [`TrackerClient::new`] with another bound per request.
    pub fn with_timeout(endpoint: Endpoint, tracker: SocketAddr, timeout: Duration) -> Self {
        Self::with_trackers(endpoint, vec![tracker], timeout)
    }

    /// A client of several trackers (duplicates are dropped; an empty list is a client
    /// with no tracker, whose requests fail until [`TrackerClient::set_trackers`]).
    pub fn with_trackers(endpoint: Endpoint, trackers: Vec<SocketAddr>, timeout: Duration) -> Self {
        let (view, _) = watch::channel(Vec::new());
        let client = Self { inner: Arc::new(Inner { endpoint, timeout, remotes: Mutex::new(Vec::new()), view }) };
        client.set_trackers(trackers);
        client
    }

    /// Replaces the tracker list (a re-resolved DNS name, say). Trackers still listed
    /// keep their connection and state; an empty list is ignored (a failed lookup
    /// should not cut the node off).
    pub fn set_trackers(&self, trackers: Vec<SocketAddr>) {
        if trackers.is_empty() {
            return;
        }
        {
            let mut remotes = locked(&self.inner.remotes);
            let mut next: Vec<Arc<Remote>> = Vec::with_capacity(trackers.len());
            for addr in trackers {
                if next.iter().any(|r| r.addr == addr) {
                    continue;
                }
                next.push(remotes.iter().find(|r| r.addr == addr).cloned().unwrap_or_else(|| Remote::new(addr)));
            }
            if next.iter().map(|r| r.addr).eq(remotes.iter().map(|r| r.addr)) {
                return;
            }
            *remotes = next;
        }
        self.publish_view();
    }

    /// The first tracker of the list (for logs and status).
    pub fn tracker(&self) -> SocketAddr {
        locked(&self.inner.remotes).first().map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |r| r.addr)
    }

    /// Every tracker of the list.
    pub fn trackers(&self) -> Vec<SocketAddr> {
        locked(&self.inner.remotes).iter().map(|r| r.addr).collect()
    }

    /// What the client knows of each tracker; changes whenever a tracker's instance
    /// id, version, reachability or connection count changes, or the list does.
    ///
    /// How to use it: keep the last [`TrackerInfo`] seen per address; a tracker whose
    /// `instance` differs (or, for a version-1 tracker, whose `connections` grew)
    /// lost its state: re-announce to it. A lease holder re-asserts its leases when
    /// [`TrackerClient::arbiter`] of their blob changed or its instance did.
    pub fn watch(&self) -> watch::Receiver<Vec<TrackerInfo>> {
        self.inner.view.subscribe()
    }

    /// The tracker requests about `blob` go to now (the first up in its rendezvous
    /// order), with its instance id if known.
    pub fn arbiter(&self, blob: &Digest) -> Option<(SocketAddr, Option<u64>)> {
        self.order(Some(blob)).first().map(|r| (r.addr, locked(&r.status).instance))
    }

    fn publish_view(&self) {
        let infos: Vec<TrackerInfo> = locked(&self.inner.remotes).iter().map(|r| r.info()).collect();
        self.inner.view.send_if_modified(|v| {
            let changed = *v != infos;
            *v = infos;
            changed
        });
    }

    /// The trackers in the order a request tries them: up ones before down ones, by
    /// rendezvous weight for `blob`, else in list order.
    fn order(&self, blob: Option<&Digest>) -> Vec<Arc<Remote>> {
        let remotes = locked(&self.inner.remotes).clone();
        let mut keyed: Vec<(bool, u64, Arc<Remote>)> = remotes
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let weight = match blob {
                    Some(b) => rendezvous_weight(&r.addr, b),
                    None => u64::MAX - i as u64,
                };
                let down = locked(&r.status).down;
                (down, weight, r)
            })
            .collect();
        keyed.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(a.2.addr.cmp(&b.2.addr)));
        keyed.into_iter().map(|(_, _, r)| r).collect()
    }

    /// Sends one request and returns the response, whatever its variant: to the
    /// arbiter of the request's blob (failing over to the next tracker), or to the
    /// first tracker up. Bounded by the client's timeout (15 s by default).
    pub async fn request(&self, req: &TrackerRequest) -> Result<TrackerResponse, TrackerClientError> {
        let order = self.order(blob_of(req).as_ref());
        self.route(order, &|_| Some(req.clone())).await.map(|(resp, _)| resp)
    }

    /// Sends one request to the tracker at `tracker` only (it must be in the list),
    /// bounded by the client's timeout.
    pub async fn request_to(
        &self,
        tracker: SocketAddr,
        req: &TrackerRequest,
    ) -> Result<TrackerResponse, TrackerClientError> {
        let remote = locked(&self.inner.remotes).iter().find(|r| r.addr == tracker).cloned();
        let remote = remote.unwrap_or_else(|| Remote::new(tracker));
        self.route(vec![remote], &|_| Some(req.clone())).await.map(|(resp, _)| resp)
    }

    /// Tries `order` in turn until one tracker answers. `build` makes the request
    /// for a tracker once connected (given its address and instance); `None` means
    /// the request cannot be sent to that tracker's version. Returns the response and
    /// the tracker (and instance) that answered.
    async fn route(
        &self,
        order: Vec<Arc<Remote>>,
        build: &(dyn Fn(&TrackerInfo) -> Option<TrackerRequest> + Sync),
    ) -> Result<(TrackerResponse, (SocketAddr, Option<u64>)), TrackerClientError> {
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        let single = order.len() <= 1;
        let mut last = None;
        for remote in order {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let attempt = if single { left } else { left.min(ATTEMPT_TIMEOUT) };
            let tracker = remote.addr;
            let err = match tokio::time::timeout(attempt, self.attempt(&remote, build)).await {
                Ok(Ok(answer)) => {
                    if !single {
                        self.mark_up(&remote);
                    }
                    return Ok(answer);
                }
                Ok(Err(e)) if !e.is_tracker_failure() => return Err(e),
                Ok(Err(e)) => e,
                Err(_) => {
                    // Maybe the tracker died without a trace; do not trust this connection
                    // again. (If the lock is busy, another request is dialling afresh anyway.)
                    if let Ok(mut cached) = remote.conn.try_lock() {
                        cached.take();
                    }
                    TrackerClientError::Timeout { tracker, after: attempt }
                }
            };
            if !single {
                debug!(%tracker, error = %err, "tracker failed a request; trying the next one");
                self.mark_down(&remote);
            }
            last = Some(err);
        }
        Err(last.unwrap_or(TrackerClientError::NoTracker))
    }

    async fn attempt(
        &self,
        remote: &Arc<Remote>,
        build: &(dyn Fn(&TrackerInfo) -> Option<TrackerRequest> + Sync),
    ) -> Result<(TrackerResponse, (SocketAddr, Option<u64>)), TrackerClientError> {
        let tracker = remote.addr;
        let (conn, fresh) = self.connection(remote).await?;
        let info = remote.info();
        let Some(req) = build(&info) else {
            return Err(TrackerClientError::Unsupported { tracker, version: info.version.unwrap_or(1) });
        };
        if version_of(&req) > info.version.unwrap_or(1) {
            return Err(TrackerClientError::Unsupported { tracker, version: info.version.unwrap_or(1) });
        }
        let answer = match exchange(&conn, &req).await {
            Err(e) if !fresh && e.is_connection_lost() => {
                debug!(%tracker, error = %e, "tracker connection lost; reconnecting");
                forget(remote, &conn).await;
                let (conn, _) = self.connection(remote).await?;
                let info = remote.info();
                let Some(req) = build(&info) else {
                    return Err(TrackerClientError::Unsupported { tracker, version: info.version.unwrap_or(1) });
                };
                if version_of(&req) > info.version.unwrap_or(1) {
                    return Err(TrackerClientError::Unsupported { tracker, version: info.version.unwrap_or(1) });
                }
                exchange(&conn, &req).await.map_err(|e| net_error(tracker, e))?
            }
            other => other.map_err(|e| net_error(tracker, e))?,
        };
        let answer = answer.ok_or(TrackerClientError::NoResponse { tracker })?;
        Ok((answer, (tracker, remote.info().instance)))
    }

    /// The cached connection to `remote` if it is alive, else a new one (greeted with
    /// `Hello`); and whether it is new.
    async fn connection(&self, remote: &Remote) -> Result<(quinn::Connection, bool), TrackerClientError> {
        let tracker = remote.addr;
        let mut cached = remote.conn.lock().await;
        if let Some(conn) = cached.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok((conn.clone(), false));
        }
        let conn =
            self.inner.endpoint.connect(tracker).await.map_err(|source| TrackerClientError::Net { tracker, source })?;
        let (version, instance) = hello(&conn).await.map_err(|e| net_error(tracker, e))?;
        debug!(%tracker, version, instance = ?instance, "connected to the tracker");
        {
            let mut s = locked(&remote.status);
            if s.instance.is_some() && instance.is_some() && s.instance != instance {
                info!(%tracker, "tracker restarted (new instance id)");
            }
            s.version = Some(version);
            s.instance = instance;
            s.connections += 1;
        }
        *cached = Some(conn.clone());
        drop(cached);
        self.publish_view();
        Ok((conn, true))
    }

    fn mark_up(&self, remote: &Arc<Remote>) {
        let was_down = {
            let mut s = locked(&remote.status);
            std::mem::replace(&mut s.down, false)
        };
        if was_down {
            info!(tracker = %remote.addr, "tracker answers again");
            self.publish_view();
        }
    }

    /// Marks `remote` down and, unless one runs, starts a probe that marks it up once
    /// it answers a `Hello`.
    fn mark_down(&self, remote: &Arc<Remote>) {
        let probe = {
            let mut s = locked(&remote.status);
            let newly = !s.down;
            s.down = true;
            let probe = !s.probing;
            s.probing = true;
            if newly {
                warn!(tracker = %remote.addr, "tracker not answering; its blobs go to the next tracker");
            }
            probe
        };
        self.publish_view();
        if !probe {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let remote = remote.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                let Some(inner) = weak.upgrade() else { return };
                let client = TrackerClient { inner };
                let listed = locked(&client.inner.remotes).iter().any(|r| Arc::ptr_eq(r, &remote));
                if !listed {
                    locked(&remote.status).probing = false;
                    return;
                }
                if let Ok(mut cached) = remote.conn.try_lock() {
                    cached.take();
                }
                if let Ok(Ok(_)) = tokio::time::timeout(ATTEMPT_TIMEOUT, client.connection(&remote)).await {
                    locked(&remote.status).probing = false;
                    client.mark_up(&remote);
                    return;
                }
            }
        });
    }

    /// Publishes a blob's metainfo (idempotent).
    pub async fn register(&self, metainfo: &Metainfo) -> Result<(), TrackerClientError> {
        match self.request(&TrackerRequest::Register { metainfo: metainfo.clone() }).await? {
            TrackerResponse::Registered => Ok(()),
            other => Err(unexpected("register", other)),
        }
    }

    /// A blob's metainfo, or `None` if the tracker has none. The metainfo is checked
    /// (valid, and really for `blob`) before it is returned.
    pub async fn get_metainfo(&self, blob: Digest) -> Result<Option<Metainfo>, TrackerClientError> {
        match self.request(&TrackerRequest::GetMetainfo { blob }).await? {
            TrackerResponse::Metainfo(m) => {
                if m.digest != blob {
                    return Err(TrackerClientError::WrongMetainfo { requested: blob, got: m.digest });
                }
                m.validate().map_err(|source| TrackerClientError::InvalidMetainfo { blob, source })?;
                Ok(Some(m))
            }
            TrackerResponse::Error { code: TrackerErrorCode::UnknownBlob, .. } => Ok(None),
            other => Err(unexpected("get-metainfo", other)),
        }
    }

    /// Announces and returns other peers plus when to announce again.
    pub async fn announce(&self, ann: &Announce) -> Result<(Vec<PeerInfo>, Duration), TrackerClientError> {
        match self.request(&TrackerRequest::Announce(ann.clone())).await? {
            TrackerResponse::Peers { peers, interval_secs } => {
                Ok((peers, Duration::from_secs(u64::from(interval_secs.max(1)))))
            }
            other => Err(unexpected("announce", other)),
        }
    }

    /// Tells the tracker this peer no longer serves or wants `blob`.
    pub async fn leave(&self, peer_id: PeerId, blob: Digest) -> Result<(), TrackerClientError> {
        match self.request(&TrackerRequest::Leave { peer_id, blob }).await? {
            TrackerResponse::Left => Ok(()),
            other => Err(unexpected("leave", other)),
        }
    }

    /// Asks to be the node that fetches `blob` from the upstream registry (or, as the
    /// holder, renews the lease). See [`LeaseReply`] for what each answer asks of
    /// the caller.
    pub async fn acquire_lease(&self, peer_id: PeerId, blob: Digest) -> Result<LeaseReply, TrackerClientError> {
        match self.request(&TrackerRequest::AcquireLease { peer_id, blob }).await? {
            TrackerResponse::Lease(reply) => Ok(reply),
            other => Err(unexpected("acquire-lease", other)),
        }
    }

    /// As the lease holder of `layout.digest`: publishes the hashes of pieces
    /// `first..first + hashes.len()` and renews the lease. Empty `hashes` renew
    /// without progress; the first publish may be empty, to make the layout known.
    /// Re-sending known hashes is harmless. A refusal because the lease was
    /// lost shows as [`TrackerClientError::is_not_lease_holder`].
    pub async fn publish_hashes(
        &self,
        peer_id: PeerId,
        layout: Layout,
        first: u32,
        hashes: &[[u8; 32]],
    ) -> Result<(), TrackerClientError> {
        let blob = layout.digest;
        let request = TrackerRequest::PublishHashes { peer_id, layout, first, hashes: hashes.to_vec() };
        let (response, _) = self.route(self.order(Some(&blob)), &|_: &TrackerInfo| Some(request.clone())).await?;
        match response {
            TrackerResponse::Registered => Ok(()),
            other => Err(unexpected("publish-hashes", other)),
        }
    }

    /// As the lease holder: ends the upstream fetch of `blob`. `failed` says why it
    /// failed (the tracker then drops the published hashes); `None` means the whole blob
    /// matched its digest. Releasing a lease the tracker no longer records is a no-op;
    /// once the lease lapsed or moved, the release is refused
    /// ([`TrackerClientError::is_not_lease_holder`]) and the failure not recorded.
    pub async fn release_lease(
        &self,
        peer_id: PeerId,
        blob: Digest,
        failed: Option<String>,
    ) -> Result<(), TrackerClientError> {
        match self.request(&TrackerRequest::ReleaseLease { peer_id, blob, failed }).await? {
            TrackerResponse::Left => Ok(()),
            other => Err(unexpected("release-lease", other)),
        }
    }

    /// The layout of `blob` and the piece hashes the tracker knows from piece `first`
    /// on (at most [`MAX_HASHES_PER_REPLY`] per call: ask again from where the reply
    /// ends). `None` for an unknown blob. The reply is checked (valid layout, really
    /// for `blob`, starting at `first`, within the blob) before it is returned.
    ///
    /// [`MAX_HASHES_PER_REPLY`]: crate::state::MAX_HASHES_PER_REPLY
    pub async fn get_hashes(&self, blob: Digest, first: u32) -> Result<Option<HashesReply>, TrackerClientError> {
        match self.request(&TrackerRequest::GetHashes { blob, first }).await? {
            TrackerResponse::Hashes { layout, first: got_first, hashes, complete } => {
                if layout.digest != blob {
                    return Err(TrackerClientError::WrongHashes { requested: blob, got: layout.digest });
                }
                layout.validate().map_err(|source| TrackerClientError::InvalidLayout { blob, source })?;
                let pieces = layout.piece_count();
                let past_end = u64::from(got_first) + hashes.len() as u64 > u64::from(pieces);
                if got_first != first || (past_end && !hashes.is_empty()) {
                    return Err(TrackerClientError::HashWindow {
                        blob,
                        requested: first,
                        first: got_first,
                        count: hashes.len(),
                        pieces,
                    });
                }
                Ok(Some(HashesReply { layout, first, hashes, complete }))
            }
            TrackerResponse::Error { code: TrackerErrorCode::UnknownBlob, .. } => Ok(None),
            other => Err(unexpected("get-hashes", other)),
        }
    }

    /// The trackers' view of the cluster (read-only), asked of every tracker and
    /// merged ([`merge_views`]): every node, and the holders and lease of `blobs`
    /// (every blob if empty; at most [`MAX_VIEW_BLOBS`](swarm_proto::msg::MAX_VIEW_BLOBS)
    /// are looked at). Fails only if no tracker answers. A tracker older than this
    /// request refuses it as malformed.
    pub async fn cluster_view(&self, blobs: Vec<Digest>) -> Result<ClusterView, TrackerClientError> {
        let req = TrackerRequest::ClusterView { blobs };
        let mut asks = tokio::task::JoinSet::new();
        for t in self.trackers() {
            let (client, req) = (self.clone(), req.clone());
            asks.spawn(async move {
                match client.request_to(t, &req).await? {
                    TrackerResponse::ClusterView(view) => Ok(view),
                    other => Err(unexpected("cluster-view", other)),
                }
            });
        }
        let mut views = Vec::new();
        let mut first_err = None;
        while let Some(answer) = asks.join_next().await {
            match answer {
                Ok(Ok(v)) => views.push(v),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => warn!(error = %e, "cluster view task failed"),
            }
        }
        match (views.is_empty(), first_err) {
            (true, Some(e)) => Err(e),
            _ => Ok(merge_views(views)),
        }
    }

    /// Announces every complete blob of this node's store to the tracker at `tracker`
    /// in one message (see [`StoreAnnounce`]); returns when to announce again and the
    /// blobs whose metainfo the tracker lacks. A version-1 tracker gives
    /// [`TrackerClientError::Unsupported`].
    pub async fn announce_store(
        &self,
        tracker: SocketAddr,
        ann: &StoreAnnounce,
    ) -> Result<(Duration, Vec<Digest>), TrackerClientError> {
        match self.request_to(tracker, &TrackerRequest::AnnounceStore(ann.clone())).await? {
            TrackerResponse::StoreAnnounced { interval_secs, missing } => {
                Ok((Duration::from_secs(u64::from(interval_secs.max(1))), missing))
            }
            other => Err(unexpected("announce-store", other)),
        }
    }

    /// As a node fetching `blob` from upstream (`fetching`), or done with it: asks the
    /// owner of the cluster's uplink cap (the first tracker up in the rendezvous
    /// order of [`UPLINK_CAP_KEY`]) for this fetch's share of the cap. A tracker of a
    /// release without the cap (it refuses the request as malformed, or speaks
    /// version 1) means no cap: the share is uncapped, asked again after
    /// [`UNCAPPED_RENEW`]. A tracker failure is an error: the caller keeps its last
    /// share.
    pub async fn uplink_share(
        &self,
        peer_id: PeerId,
        blob: Digest,
        fetching: bool,
    ) -> Result<Share, TrackerClientError> {
        match self.request(&TrackerRequest::UplinkShare { peer_id, blob, fetching }).await {
            Ok(TrackerResponse::UplinkShare { bytes_per_sec, renew_ms }) => Ok(Share {
                bytes_per_sec: (bytes_per_sec > 0).then_some(bytes_per_sec),
                renew: Duration::from_millis(u64::from(renew_ms)).clamp(Duration::from_millis(100), UNCAPPED_RENEW),
            }),
            Ok(other) => Err(unexpected("uplink-share", other)),
            Err(TrackerClientError::Malformed { .. } | TrackerClientError::Unsupported { .. }) => {
                Ok(Share { bytes_per_sec: None, renew: UNCAPPED_RENEW })
            }
            Err(e) => Err(e),
        }
    }
}

impl TrackerClient {
    /// Sends a stage request to `tracker`; an old tracker's refusal becomes
    /// [`TrackerClientError::TooOldForStage`].
    async fn stage_request(
        &self,
        tracker: SocketAddr,
        req: &TrackerRequest,
    ) -> Result<TrackerResponse, TrackerClientError> {
        match self.request_to(tracker, req).await {
            Err(TrackerClientError::Malformed { tracker } | TrackerClientError::Unsupported { tracker, .. }) => {
                Err(TrackerClientError::TooOldForStage { tracker })
            }
            other => other,
        }
    }

    /// Gives `tracker` a stage order (`swarm stage`); returns the tracker's stage
    /// generation and orders.
    pub async fn stage(
        &self,
        tracker: SocketAddr,
        order: &StageOrder,
    ) -> Result<(u64, Vec<StageOrder>), TrackerClientError> {
        match self.stage_request(tracker, &TrackerRequest::Stage(order.clone())).await? {
            TrackerResponse::StageOrders { generation, orders } => Ok((generation, orders)),
            other => Err(unexpected("stage", other)),
        }
    }

    /// Long-polls `tracker` for its stage orders: answered at once when its
    /// generation differs from `after`, else within `wait` (keep it under the
    /// client's timeout).
    pub async fn wait_stage(
        &self,
        tracker: SocketAddr,
        agent: &StageAgent,
        after: u64,
        wait: Duration,
    ) -> Result<(u64, Vec<StageOrder>), TrackerClientError> {
        let wait_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
        let req = TrackerRequest::WaitStage { agent: agent.clone(), after, wait_ms };
        match self.stage_request(tracker, &req).await? {
            TrackerResponse::StageOrders { generation, orders } => Ok((generation, orders)),
            other => Err(unexpected("wait-stage", other)),
        }
    }

    /// Reports this agent's stage progress to `tracker`.
    pub async fn stage_progress(
        &self,
        tracker: SocketAddr,
        agent: &StageAgent,
        progress: Vec<StageProgress>,
    ) -> Result<(), TrackerClientError> {
        let req = TrackerRequest::StageProgress { agent: agent.clone(), progress };
        match self.stage_request(tracker, &req).await? {
            TrackerResponse::Registered => Ok(()),
            other => Err(unexpected("stage-progress", other)),
        }
    }

    /// `tracker`'s order for `image` and every staging agent's progress on it.
    pub async fn stage_status(&self, tracker: SocketAddr, image: &str) -> Result<StageStatus, TrackerClientError> {
        match self.stage_request(tracker, &TrackerRequest::StageStatus { image: image.to_string() }).await? {
            TrackerResponse::StageStatus(s) => Ok(s),
            other => Err(unexpected("stage-status", other)),
        }
    }
}

/// Merges the views of several trackers: nodes by peer id (the latest sighting
/// wins), blobs by digest (holders by peer id, the fuller holding wins; a live lease
/// beats others), `truncated` if any was.
pub fn merge_views(views: Vec<ClusterView>) -> ClusterView {
    let mut nodes: BTreeMap<PeerId, swarm_proto::msg::NodeView> = BTreeMap::new();
    let mut blobs: BTreeMap<Digest, swarm_proto::msg::BlobView> = BTreeMap::new();
    let mut truncated = false;
    for view in views {
        truncated |= view.truncated;
        for n in view.nodes {
            match nodes.get_mut(&n.peer_id) {
                Some(known) if known.last_seen_ms <= n.last_seen_ms => {}
                Some(known) => *known = n,
                None => {
                    nodes.insert(n.peer_id, n);
                }
            }
        }
        for b in view.blobs {
            let Some(known) = blobs.get_mut(&b.digest) else {
                blobs.insert(b.digest, b);
                continue;
            };
            known.layout = known.layout.or(b.layout);
            known.known_hashes = known.known_hashes.max(b.known_hashes);
            for h in b.holders {
                match known.holders.iter_mut().find(|k| k.peer_id == h.peer_id) {
                    Some(k) if (k.complete, k.have) >= (h.complete, h.have) => {}
                    Some(k) => *k = h,
                    None => known.holders.push(h),
                }
            }
            let live =
                |l: &Option<swarm_proto::msg::LeaseView>| l.as_ref().is_some_and(|l| l.state == LeaseViewState::Live);
            if known.lease.is_none() || (!live(&known.lease) && live(&b.lease)) {
                known.lease = b.lease.or(known.lease.take());
            }
        }
    }
    let mut blobs: Vec<_> = blobs.into_values().collect();
    for b in &mut blobs {
        b.holders.sort_by_key(|h| h.peer_id);
    }
    ClusterView { nodes: nodes.into_values().collect(), blobs, truncated }
}

/// The answer to [`TrackerClient::get_hashes`]: the hashes of pieces
/// `first..first + hashes.len()` of the blob laid out as `layout`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashesReply {
    pub layout: Layout,
    pub first: u32,
    pub hashes: Vec<[u8; 32]>,
    /// Every piece's hash is known (the full metainfo is registered): no need to ask
    /// again. While `false`, the upstream fetch is still running.
    pub complete: bool,
}

impl HashesReply {
    /// Piece index just past the hashes of this reply: where to ask next.
    pub fn end(&self) -> u32 {
        self.first.saturating_add(self.hashes.len() as u32)
    }
}

/// Drops `dead` from `remote`'s cache unless another request already replaced it.
async fn forget(remote: &Remote, dead: &quinn::Connection) {
    let mut cached = remote.conn.lock().await;
    if cached.as_ref().is_some_and(|c| c.stable_id() == dead.stable_id()) {
        *cached = None;
    }
}

fn net_error(tracker: SocketAddr, source: NetError) -> TrackerClientError {
    if source.remote_code() == Some(codes::PROTOCOL_ERROR) && !source.is_connection_lost() {
        TrackerClientError::Malformed { tracker }
    } else {
        TrackerClientError::Net { tracker, source }
    }
}

/// Greets a new connection: the version both sides speak and the tracker's instance
/// id; a tracker that resets the stream as malformed speaks version 1 (no id).
async fn hello(conn: &quinn::Connection) -> Result<(u32, Option<u64>), NetError> {
    match exchange(conn, &TrackerRequest::Hello { version: TRACKER_VERSION }).await {
        Ok(Some(TrackerResponse::Hello { version, instance })) => {
            Ok((version.clamp(1, TRACKER_VERSION), Some(instance)))
        }
        Ok(_) => Ok((1, None)),
        Err(e) if e.remote_code() == Some(codes::PROTOCOL_ERROR) && !e.is_connection_lost() => Ok((1, None)),
        Err(e) => Err(e),
    }
}

/// One request on a new stream of `conn`: `None` if the tracker finished the stream
/// without a response.
async fn exchange(conn: &quinn::Connection, req: &TrackerRequest) -> Result<Option<TrackerResponse>, NetError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|source| NetError::ConnectionLost { source })?;
    write_msg(&mut send, req).await?;
    // Fails only if the stream is already gone, which the read reports.
    let _ = send.finish();
    read_msg(&mut recv, MAX_FRAME_LEN).await
}

/// Turns a response of the wrong kind into an error; an `Error` response becomes
/// [`TrackerClientError::Refused`].
fn unexpected(request: &'static str, response: TrackerResponse) -> TrackerClientError {
    let response = match response {
        TrackerResponse::Error { code, message } => return TrackerClientError::Refused { code, message },
        TrackerResponse::Registered => "Registered",
        TrackerResponse::Metainfo(_) => "Metainfo",
        TrackerResponse::Peers { .. } => "Peers",
        TrackerResponse::Left => "Left",
        TrackerResponse::Lease(_) => "Lease",
        TrackerResponse::Hashes { .. } => "Hashes",
        TrackerResponse::ClusterView(_) => "ClusterView",
        TrackerResponse::Hello { .. } => "Hello",
        TrackerResponse::StoreAnnounced { .. } => "StoreAnnounced",
        TrackerResponse::StageOrders { .. } => "StageOrders",
        TrackerResponse::StageStatus(_) => "StageStatus",
        TrackerResponse::UplinkShare { .. } => "UplinkShare",
    };
    TrackerClientError::UnexpectedResponse { request, response }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n).map(|i| SocketAddr::from(([10, 0, 0, i], 7000))).collect()
    }

    #[test]
    fn rendezvous_is_stable_balanced_and_moves_only_the_lost_trackers_blobs() {
        let three = addrs(3);
        // Pinned: every node of every version must pick the same arbiter.
        assert_eq!(rendezvous_weight(&three[0], &Digest([0; 32])), rendezvous_weight(&three[0], &Digest([0; 32])));
        let blobs: Vec<Digest> = (0..3000u32).map(|i| Digest::of(&i.to_le_bytes())).collect();
        let mut per = [0usize; 3];
        for b in &blobs {
            let order = rendezvous_order(&three, b);
            assert_eq!(order.len(), 3);
            per[three.iter().position(|a| *a == order[0]).expect("listed")] += 1;
            // The list's order does not matter.
            let mut shuffled = three.clone();
            shuffled.reverse();
            assert_eq!(rendezvous_order(&shuffled, b), order);
            // Without the arbiter, the next one takes over; nobody else's blobs move.
            let without: Vec<SocketAddr> = three.iter().copied().filter(|a| *a != order[0]).collect();
            assert_eq!(rendezvous_order(&without, b)[0], order[1]);
            let without_other: Vec<SocketAddr> = three.iter().copied().filter(|a| *a != order[2]).collect();
            assert_eq!(rendezvous_order(&without_other, b)[0], order[0]);
        }
        for n in per {
            assert!((800..1200).contains(&n), "unbalanced: {per:?}");
        }
    }

    #[test]
    fn requests_are_routed_by_their_blob() {
        let blob = Digest([5; 32]);
        let layout = Layout { digest: blob, length: 1, piece_length: 1 << 18 };
        let routed = [
            TrackerRequest::GetMetainfo { blob },
            TrackerRequest::AcquireLease { peer_id: PeerId([1; 16]), blob },
            TrackerRequest::PublishHashes { peer_id: PeerId([1; 16]), layout, first: 0, hashes: vec![] },
            TrackerRequest::GetHashes { blob, first: 0 },
        ];
        for r in &routed {
            assert_eq!(blob_of(r), Some(blob), "{r:?}");
            assert_eq!(version_of(r), 1);
        }
        assert_eq!(blob_of(&TrackerRequest::ClusterView { blobs: vec![blob] }), None);
        assert_eq!(version_of(&TrackerRequest::Hello { version: TRACKER_VERSION }), 2);
        assert_eq!(
            version_of(&TrackerRequest::UplinkShare {
                peer_id: PeerId([1; 16]),
                blob: Digest([2; 32]),
                fetching: true
            }),
            3
        );
    }

    fn stage_token() -> swarm_net::ClusterToken {
        swarm_net::ClusterToken::new(vec![5; 32]).expect("token")
    }

    fn stage_endpoint() -> Endpoint {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Endpoint::bind(any, stage_token(), &swarm_net::EndpointConfig::default()).expect("bind")
    }

    fn agent() -> StageAgent {
        StageAgent { peer_id: PeerId([1; 16]), name: "node-1".into(), zone: String::new() }
    }

    fn order(issued_ms: u64) -> StageOrder {
        StageOrder {
            image: "registry.local/os:v2".into(),
            zones: vec![],
            nodes: vec![],
            pin_until_secs: u64::MAX,
            release: false,
            issued_ms,
        }
    }

    /// The long poll is answered as soon as an order comes in, and at once for a
    /// generation the tracker does not have.
    #[tokio::test]
    async fn wait_stage_is_answered_as_soon_as_an_order_comes_in() {
        let server = stage_endpoint();
        let addr = server.local_addr().expect("addr");
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(crate::serve(server, crate::TrackerConfig::default(), cancel.clone()));
        let agent_client = TrackerClient::new(stage_endpoint(), addr);
        let cli = TrackerClient::new(stage_endpoint(), addr);
        let (generation, orders) =
            agent_client.wait_stage(addr, &agent(), 0, Duration::from_secs(5)).await.expect("first poll");
        assert!(orders.is_empty());
        let started = std::time::Instant::now();
        let waiting = {
            let c = agent_client.clone();
            tokio::spawn(async move { c.wait_stage(addr, &agent(), generation, Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        cli.stage(addr, &order(1)).await.expect("stage");
        let (next, orders) = waiting.await.expect("join").expect("poll");
        assert!(started.elapsed() < Duration::from_secs(3), "answered after {:?}", started.elapsed());
        assert_ne!(next, generation);
        assert_eq!(orders, vec![order(1)]);
        // The agent now shows in the status, without progress yet.
        let status = cli.stage_status(addr, "registry.local/os:v2").await.expect("status");
        assert_eq!(status.order, Some(order(1)));
        assert_eq!(status.agents.len(), 1);
        assert_eq!(status.agents[0].agent, agent());
        cancel.cancel();
        task.await.expect("join").expect("serve");
    }

    /// A tracker of the release before stage orders: it knows `Hello` (version 2) and
    /// resets a stream it cannot decode, as the old server does.
    async fn pre_stage_tracker(endpoint: Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.authenticate().await else { continue };
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    match read_msg::<TrackerRequest>(&mut recv, MAX_FRAME_LEN).await {
                        Ok(Some(TrackerRequest::Hello { .. })) => {
                            let _ = write_msg(&mut send, &TrackerResponse::Hello { version: 2, instance: 9 }).await;
                            let _ = send.finish();
                        }
                        _ => {
                            let code = quinn::VarInt::from_u32(codes::PROTOCOL_ERROR);
                            let _ = send.reset(code);
                            let _ = recv.stop(code);
                        }
                    }
                }
            });
        }
    }

    #[tokio::test]
    async fn a_tracker_without_stage_requests_is_reported_too_old_at_once() {
        let server = stage_endpoint();
        let addr = server.local_addr().expect("addr");
        let task = tokio::spawn(pre_stage_tracker(server));
        let c = TrackerClient::new(stage_endpoint(), addr);
        let started = std::time::Instant::now();
        let err = c.stage(addr, &order(1)).await.expect_err("refused");
        assert!(matches!(err, TrackerClientError::TooOldForStage { .. }), "{err:?}");
        assert!(err.to_string().contains("tracker too old for stage"), "{err}");
        let err = c.wait_stage(addr, &agent(), 0, Duration::from_secs(10)).await.expect_err("refused");
        assert!(matches!(err, TrackerClientError::TooOldForStage { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        task.abort();
    }
}
