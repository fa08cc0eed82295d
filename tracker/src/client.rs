//! [`TrackerClient`]: how peers talk to the tracker. One cached, authenticated QUIC
//! connection; each request on its own bidirectional stream; every request bounded
//! in time; one reconnect and retry when the cached connection turns out dead (the
//! tracker restarted). All tracker requests are idempotent, so the retry is safe:
//! re-published hashes must equal the known ones, re-acquiring renews one's own
//! lease, and releasing a lease already released is a no-op.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use swarm_net::{Endpoint, NetError, codes, read_msg, write_msg};
use swarm_proto::codec::MAX_FRAME_LEN;
use swarm_proto::msg::{
    Announce, ClusterView, LeaseReply, PeerInfo, TrackerErrorCode, TrackerRequest, TrackerResponse,
};
use swarm_proto::{Digest, Layout, Metainfo, PeerId, ProtoError};
use tracing::debug;

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
    /// The tracker finished the stream without answering.
    #[error("tracker {tracker} closed the request stream without answering")]
    NoResponse { tracker: SocketAddr },
    /// The tracker could not parse the request.
    #[error("tracker {tracker} refused the request as malformed (is it running an incompatible swarm version?)")]
    Malformed { tracker: SocketAddr },
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

/// A handle to the tracker. Cheap to clone; clones share the cached connection.
#[derive(Clone, Debug)]
pub struct TrackerClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    endpoint: Endpoint,
    tracker: SocketAddr,
    timeout: Duration,
    /// The cached connection. An async mutex: it is held while connecting, so
    /// concurrent requests share one new connection instead of racing.
    conn: tokio::sync::Mutex<Option<quinn::Connection>>,
}

impl TrackerClient {
    /// A client of the tracker at `tracker`, using `endpoint` (the peer's own) to dial.
    /// Connects lazily, on the first request.
    pub fn new(endpoint: Endpoint, tracker: SocketAddr) -> Self {
        Self::with_timeout(endpoint, tracker, REQUEST_TIMEOUT)
    }

    /// Like [`TrackerClient::new`] with another bound per request.
    pub fn with_timeout(endpoint: Endpoint, tracker: SocketAddr, timeout: Duration) -> Self {
        Self { inner: Arc::new(Inner { endpoint, tracker, timeout, conn: tokio::sync::Mutex::new(None) }) }
    }

    /// The tracker's address.
    pub fn tracker(&self) -> SocketAddr {
        self.inner.tracker
    }

    /// Sends one request and returns the response, whatever its variant. Opens a
    /// stream per request; if the cached connection is dead, reconnects once and
    /// retries. Bounded by the client's timeout (15 s by default); a timed-out
    /// connection is dropped from the cache so the next request dials afresh.
    pub async fn request(&self, req: &TrackerRequest) -> Result<TrackerResponse, TrackerClientError> {
        let tracker = self.inner.tracker;
        match tokio::time::timeout(self.inner.timeout, self.request_with_retry(req)).await {
            Ok(result) => result,
            Err(_) => {
                // Maybe the tracker died without a trace; do not trust this connection
                // again. (If the lock is busy, another request is dialling afresh anyway.)
                if let Ok(mut cached) = self.inner.conn.try_lock() {
                    cached.take();
                }
                Err(TrackerClientError::Timeout { tracker, after: self.inner.timeout })
            }
        }
    }

    async fn request_with_retry(&self, req: &TrackerRequest) -> Result<TrackerResponse, TrackerClientError> {
        let (conn, fresh) = self.connection().await?;
        match exchange(&conn, req).await {
            Err(e) if !fresh && e.is_connection_lost() => {
                debug!(tracker = %self.inner.tracker, error = %e, "tracker connection lost; reconnecting");
                self.forget(&conn).await;
                let (conn, _) = self.connection().await?;
                exchange(&conn, req).await.map_err(|e| self.net_error(e))?
            }
            other => other.map_err(|e| self.net_error(e))?,
        }
        .ok_or(TrackerClientError::NoResponse { tracker: self.inner.tracker })
    }

    /// The cached connection if it is alive, else a new one; and whether it is new.
    async fn connection(&self) -> Result<(quinn::Connection, bool), TrackerClientError> {
        let mut cached = self.inner.conn.lock().await;
        if let Some(conn) = cached.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok((conn.clone(), false));
        }
        let conn = self
            .inner
            .endpoint
            .connect(self.inner.tracker)
            .await
            .map_err(|source| TrackerClientError::Net { tracker: self.inner.tracker, source })?;
        debug!(tracker = %self.inner.tracker, "connected to the tracker");
        *cached = Some(conn.clone());
        Ok((conn, true))
    }

    /// Drops `dead` from the cache unless another request already replaced it.
    async fn forget(&self, dead: &quinn::Connection) {
        let mut cached = self.inner.conn.lock().await;
        if cached.as_ref().is_some_and(|c| c.stable_id() == dead.stable_id()) {
            *cached = None;
        }
    }

    fn net_error(&self, source: NetError) -> TrackerClientError {
        let tracker = self.inner.tracker;
        if source.remote_code() == Some(codes::PROTOCOL_ERROR) && !source.is_connection_lost() {
            TrackerClientError::Malformed { tracker }
        } else {
            TrackerClientError::Net { tracker, source }
        }
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
        let req = TrackerRequest::PublishHashes { peer_id, layout, first, hashes: hashes.to_vec() };
        match self.request(&req).await? {
            TrackerResponse::Registered => Ok(()),
            other => Err(unexpected("publish-hashes", other)),
        }
    }

    /// As the lease holder: ends the upstream fetch of `blob`. `failed` says why it
    /// failed (the published hashes are then dropped); `None` means the whole blob
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

    /// The tracker's view of the cluster (read-only): every node, and the holders and
    /// lease of `blobs` (every blob if empty; at most [`MAX_VIEW_BLOBS`](swarm_proto::msg::MAX_VIEW_BLOBS) are looked
    /// at). A tracker older than this request refuses it as malformed.
    pub async fn cluster_view(&self, blobs: Vec<Digest>) -> Result<ClusterView, TrackerClientError> {
        match self.request(&TrackerRequest::ClusterView { blobs }).await? {
            TrackerResponse::ClusterView(view) => Ok(view),
            other => Err(unexpected("cluster-view", other)),
        }
    }
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
    };
    TrackerClientError::UnexpectedResponse { request, response }
}
