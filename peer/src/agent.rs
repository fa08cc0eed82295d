//! The mirror's blob source on a node: [`SwarmProvider`], which serves containerd
//! from the swarm and makes the cluster fetch each blob from upstream once.
//!
//! For a blob request it, in order:
//!
//! 1. joins a download this node already runs or holds (concurrent requests for one
//!    blob inside one agent share it);
//! 2. else asks the tracker for the blob's layout and piece hashes: if any node
//!    registered or is publishing them, swarms on them; if no tracker answers, asks
//!    the peers it knows from before (`Node::fetch_from_peers`) and swarms with one
//!    that holds the blob, else lets containerd go upstream;
//! 3. else asks the tracker for the blob's **upstream lease**. The tracker grants it
//!    to one node of the cluster. That node opens the upstream blob (from the piece the
//!    swarm has not hashed yet, with an HTTP Range when resuming a lease that moved),
//!    and as each piece arrives it hashes it, stores it and announces it to its peers
//!    with its hash: everybody else swarms on those pieces while the upstream fetch is
//!    still running (cut-through), and the hashes spread peer to peer. Nodes that
//!    were not granted the lease wait for the layout to appear (step 2).
//!
//! Beside the feed, a publisher sends the tracker a copy of the hashes (for late
//! joiners) and renews the lease (at least every [`RENEW`]); the feed never waits
//! for it, so a tracker that goes away mid-transfer stops nothing, and one that comes
//! back is told everything again (`swarm_core::lease`). If the holder dies or stalls,
//! the tracker lets the lease go and the next node whose swarm stops making progress
//! takes it over, resuming from the pieces the swarm already has.
//!
//! The HTTP body streams the blob in order, each piece as soon as it is verified
//! against its hash; the last piece is held back until the whole blob matched its
//! digest, so containerd never receives a complete blob with wrong content, and never
//! a byte that was not verified (see the contract of [`BlobProvider`]). When the
//! upstream refuses or cannot be reached, the provider says `Unavailable` and the
//! mirror answers so that containerd falls back to the upstream itself.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use swarm_core::lease::{
    LayoutReply, LeaseAnswer, PublishStep, Published, Publisher, StartStep, Startup, TakeoverWatch,
};
use swarm_core::tracker::uplink::SHARE_RENEW;
use swarm_proto::msg::LeaseReply;
use swarm_proto::{Digest, Layout, piece_length_for};
use swarm_tracker::client::TrackerClientError;
use tracing::{Instrument, debug, info, info_span, trace, warn};

use crate::mirror::{BlobBody, BlobProvider, BlobRequest, ProviderError, provider_error};
use crate::node::{Download, DownloadState, Node};
use crate::rate::Limiter;
use crate::upstream::{UpstreamBlob, UpstreamClient};

pub use swarm_core::lease::RENEW;
/// How long one tracker request of a blob's start may take before the mirror gives
/// up and lets containerd go upstream itself: 3 s more than the tracker may hold a
/// `GetHashes`.
const TRACKER_WAIT: Duration = Duration::from_secs(swarm_tracker::server::HASHES_WAIT.as_secs() + 3);
/// A mirror response with no new piece for this long is aborted (containerd resumes).
const STREAM_STALL: Duration = Duration::from_secs(120);

/// The [`BlobProvider`] backed by the swarm. See the module docs.
pub struct SwarmProvider {
    node: Node,
    upstream: UpstreamClient,
    /// One start-up at a time per blob, so concurrent requests join one download.
    starting: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// The store's budget and eviction ([`crate::disk`]), when the agent runs one.
    disk: Option<Arc<crate::disk::Disk>>,
}

impl SwarmProvider {
    pub fn new(node: Node, upstream: UpstreamClient) -> Self {
        Self { node, upstream, starting: Mutex::new(HashMap::new()), disk: None }
    }

    /// Keeps the store within `disk`'s budget: a new blob that cannot fit is refused
    /// (503) before anything is fetched, and blobs being served are never evicted.
    pub fn with_disk(mut self, disk: Arc<crate::disk::Disk>) -> Self {
        self.disk = Some(disk);
        self
    }

    /// Fetches `req`'s blob into the store the way a containerd request would (same
    /// start-up, lease and swarm), without serving it (`crate::stage`); returns once
    /// the whole blob is stored and matched its digest.
    pub async fn prefetch(&self, req: &BlobRequest) -> Result<(), ProviderError> {
        let mut d = self.download(req).await?;
        d.finished().await.map_err(|e| ProviderError::Other(e.to_string()))
    }

    /// The download serving `req`, started if needed.
    async fn download(&self, req: &BlobRequest) -> Result<Download, ProviderError> {
        if let Some(d) = self.live(&req.digest) {
            return Ok(d);
        }
        let gate = {
            let mut starting = self.starting.lock().unwrap_or_else(|e| e.into_inner());
            starting.entry(req.digest).or_default().clone()
        };
        let _guard = gate.lock().await;
        if let Some(d) = self.live(&req.digest) {
            return Ok(d);
        }
        let d = self.start(req).await;
        self.starting.lock().unwrap_or_else(|e| e.into_inner()).remove(&req.digest);
        d
    }

    /// A download of `digest` that has not failed.
    fn live(&self, digest: &Digest) -> Option<Download> {
        self.node.download(digest).filter(|d| !matches!(d.progress().borrow().state, DownloadState::Failed(_)))
    }

    async fn start(&self, req: &BlobRequest) -> Result<Download, ProviderError> {
        let digest = req.digest;
        let other = |e: &dyn std::fmt::Display| ProviderError::Other(e.to_string());
        // A complete copy in the store, or one the cluster already knows.
        if let Ok(Some(_)) = self.node.store().metainfo(&digest) {
            return self.node.fetch(digest).await.map_err(|e| other(&e));
        }
        // The steps are `swarm_core::lease`'s; this loop only carries them out.
        let startup = Startup::new(Instant::now());
        loop {
            let hashes = match ask_tracker("get-hashes", self.node.tracker().get_hashes(digest, 0)).await {
                Ok(h) => h,
                Err(e) => {
                    self.admit(req, None).await?;
                    return self.ask_known_peers(digest, e).await;
                }
            };
            if let Some(h) = hashes {
                self.admit(req, Some(h.layout.length)).await?;
                let step = startup.layout(LayoutReply::Published { complete: h.complete });
                let d = self.node.fetch_partial(h.layout, h.first, h.hashes).await.map_err(|e| other(&e))?;
                if step == (StartStep::Swarm { watch: true }) {
                    self.watch_for_takeover(req.clone(), &d);
                }
                return Ok(d);
            }
            let reply = match ask_tracker(
                "acquire-lease",
                self.node.tracker().acquire_lease(self.node.peer_id(), digest),
            )
            .await
            {
                Ok(r) => r,
                Err(e) => return self.ask_known_peers(digest, e).await,
            };
            match startup.lease(LeaseAnswer::from(&reply), Instant::now()) {
                StartStep::Lead { resume_from } => return self.lead(req, resume_from).await,
                StartStep::Unavailable { reason } => {
                    return Err(ProviderError::Unavailable(format!("{digest}: {reason}")));
                }
                StartStep::Retry { after } => tokio::time::sleep(after).await,
                StartStep::Swarm { .. } | StartStep::AcquireLease => {}
            }
        }
    }

    /// No tracker answers: before the mirror answers 503 (`unavailable`), ask the
    /// peers this node knows from before whether one holds the blob.
    async fn ask_known_peers(&self, digest: Digest, unavailable: ProviderError) -> Result<Download, ProviderError> {
        match self.node.fetch_from_peers(digest).await {
            Ok(d) => Ok(d),
            Err(e) => {
                debug!(%digest, error = %e, "no known peer has the blob either");
                Err(unavailable)
            }
        }
    }

    /// Makes room in the store for a new blob, or refuses it (503, before anything is
    /// fetched) when it cannot fit the budget. The length comes from a partial copy,
    /// the tracker's layout (`known`), or an upstream HEAD.
    async fn admit(&self, req: &BlobRequest, known: Option<u64>) -> Result<(), ProviderError> {
        let Some(disk) = &self.disk else { return Ok(()) };
        let digest = req.digest;
        let length = match (self.node.store().layout(&digest), known) {
            (Ok(Some(layout)), _) => layout.length,
            (_, Some(length)) => length,
            // Unknown here: the start-up's own upstream request reports the error.
            _ => match self.upstream.blob_length(&req.registry, &req.repository, &digest).await {
                Ok(length) => length,
                Err(e) => {
                    debug!(%digest, error = %e, "no length for the cache budget check");
                    return Ok(());
                }
            },
        };
        disk.admit(&digest, length).await.map_err(|e| ProviderError::Unavailable(format!("{digest}: {e}")))
    }

    /// This node holds the lease and nobody published anything yet: open the
    /// upstream blob, publish its layout, start the swarm and the upstream feed.
    async fn lead(&self, req: &BlobRequest, resume_from: u32) -> Result<Download, ProviderError> {
        let digest = req.digest;
        let tracker = self.node.tracker();
        let me = self.node.peer_id();
        // Room for it first (an upstream HEAD for its length): nothing is fetched for
        // a blob that cannot fit. Not a failure of the blob: the lease goes back for
        // another node to take.
        if let Err(e) = self.admit(req, None).await {
            let _ = tracker.release_lease(me, digest, None).await;
            return Err(e);
        }
        // The fetch's share of the uplink cap first: the very first request runs at it.
        let share = start_share(&self.node, digest).await;
        let limits = vec![share.limiter.clone()];
        let blob = match self.upstream.blob_limited(&req.registry, &req.repository, &digest, 0, limits).await {
            Ok(b) => b,
            Err(e) => {
                let reason = format!("upstream: {e}");
                let _ = tracker.release_lease(me, digest, Some(reason)).await;
                return Err(provider_error(e));
            }
        };
        if blob.total_length == 0 {
            let _ = tracker.release_lease(me, digest, Some("upstream blob is empty".into())).await;
            return Err(ProviderError::Unavailable("upstream blob is empty".into()));
        }

        let layout = Layout { digest, length: blob.total_length, piece_length: piece_length_for(blob.total_length) };
        tracker
            .publish_hashes(me, layout, 0, &[])
            .await
            .map_err(|e| ProviderError::Unavailable(format!("cannot publish to the tracker: {e}")))?;
        let d =
            self.node.fetch_partial(layout, 0, Vec::new()).await.map_err(|e| ProviderError::Other(e.to_string()))?;
        info!(%digest, length = layout.length, resume_from, "fetching from upstream as the lease holder");
        self.node.hold_lease(&digest).await;
        let (node, upstream) = (self.node.clone(), self.upstream.clone());
        spawn_feed(node, upstream, req.clone(), d.blob().clone(), Some(blob), resume_from, Some(share));
        Ok(d)
    }

    /// While a swarm waits on another node's upstream fetch, watches its progress; if
    /// nothing new arrives for [`TAKEOVER_AFTER`], asks for the lease and, when granted,
    /// continues the upstream fetch from where the swarm is.
    fn watch_for_takeover(&self, req: BlobRequest, d: &Download) {
        let node = self.node.clone();
        let upstream = self.upstream.clone();
        let blob = d.blob().clone();
        let mut progress = d.progress();
        let span = info_span!("takeover", blob = %req.digest.short());
        self.node.spawn(
            async move {
                let count = blob.layout().piece_count();
                let mut watch = TakeoverWatch::new(blob.known_hashes(), Instant::now());
                loop {
                    let due = tokio::time::Instant::from_std(watch.poll_timeout());
                    let changed = tokio::time::timeout_at(due, progress.changed()).await;
                    if matches!(changed, Ok(Err(_))) || progress.borrow().state != DownloadState::Running {
                        return;
                    }
                    let known = blob.known_hashes();
                    if !watch.observe(known, count, Instant::now()) {
                        trace!(known, "holder progress");
                        continue;
                    }
                    match node.tracker().acquire_lease(node.peer_id(), req.digest).await {
                        Ok(LeaseReply::Granted { resume_from, .. }) => {
                            let resume_from = TakeoverWatch::resume_from(blob.have().zeros().next(), resume_from);
                            warn!(resume_from, "upstream fetch stalled elsewhere; taking over the lease");
                            node.hold_lease(&req.digest).await;
                            let (n, u) = (node.clone(), upstream.clone());
                            spawn_feed(n, u, req.clone(), blob.clone(), None, resume_from, None);
                            return;
                        }
                        Ok(other) => debug!(?other, "lease not taken over"),
                        Err(e) => debug!(error = %e, "lease request failed"),
                    }
                }
            }
            .instrument(span),
        );
    }
}

/// A tracker request of a blob's start, bounded by [`TRACKER_WAIT`]. Without the
/// tracker nothing can be shared, so any failure is `Unavailable`: the mirror sends
/// containerd upstream at once instead of after the client's own long timeout.
async fn ask_tracker<T>(
    what: &str,
    request: impl std::future::Future<Output = Result<T, swarm_tracker::client::TrackerClientError>>,
) -> Result<T, ProviderError> {
    match tokio::time::timeout(TRACKER_WAIT, request).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ProviderError::Unavailable(format!("tracker: {e}"))),
        Err(_) => Err(ProviderError::Unavailable(format!("tracker: no answer to {what} within {TRACKER_WAIT:?}"))),
    }
}

/// Runs the upstream feed of a lease holder, with its publisher beside it; on
/// failure abandons the download and gives the lease back with the reason.
fn spawn_feed(
    node: Node,
    upstream: UpstreamClient,
    req: BlobRequest,
    blob: Arc<crate::store::BlobFile>,
    opened: Option<UpstreamBlob>,
    resume_from: u32,
    share: Option<UplinkShare>,
) {
    let span = info_span!("upstream", blob = %req.digest.short(), registry = %req.registry);
    let (known_tx, known_rx) = tokio::sync::watch::channel(resume_from);
    let lost = tokio_util::sync::CancellationToken::new();
    node.spawn(publish(node.clone(), blob.clone(), known_rx, resume_from, lost.clone()).instrument(span.clone()));
    node.clone().spawn(
        async move {
            // The fetch runs at its share of the cluster's uplink cap, renewed beside it
            // until `share` is dropped.
            let share = match share {
                Some(s) => s,
                None => start_share(&node, req.digest).await,
            };
            let result = tokio::select! {
                r = feed(&node, &upstream, &req, &blob, opened, resume_from, &known_tx, &share.limiter) => r,
                _ = lost.cancelled() => Err("another node holds the upstream lease now".to_string()),
                _ = node.cancelled() => return,
            };
            drop(share);
            if let Err(reason) = result {
                warn!(%reason, "upstream fetch failed");
                let _ = node.tracker().release_lease(node.peer_id(), req.digest, Some(reason.clone())).await;
                node.abandon(&req.digest, reason).await;
            }
        }
        .instrument(span),
    );
}

/// How long a lease holder waits for its first share of the uplink cap before it
/// fetches uncapped (no tracker answers); also the bound on saying it is done.
const FIRST_SHARE_WAIT: Duration = Duration::from_secs(1);

/// An upstream fetch's share of the cluster's uplink cap: its limiter, kept at the
/// share by a task that renews it until this is dropped, and then tells the cap's
/// owner the fetch is over (its share goes back to the others at once).
struct UplinkShare {
    limiter: Limiter,
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for UplinkShare {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts a fetch's [`UplinkShare`]: the first share is asked for within
/// [`FIRST_SHARE_WAIT`] (uncapped without an answer), then renewed in the background.
async fn start_share(node: &Node, blob: Digest) -> UplinkShare {
    let limiter = Limiter::new(None);
    let renew = uplink_share(node, blob, &limiter, FIRST_SHARE_WAIT).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let (n, l, s) = (node.clone(), limiter.clone(), stop.clone());
    node.spawn(
        async move {
            tokio::select! {
                () = s.cancelled() => {}
                () = n.cancelled() => return,
                never = renew_uplink_share(&n, blob, &l, renew) => match never {},
            }
            let done = n.tracker().uplink_share(n.peer_id(), blob, false);
            let _ = tokio::time::timeout(FIRST_SHARE_WAIT, done).await;
        }
        .in_current_span(),
    );
    UplinkShare { limiter, stop }
}

/// Asks the owner of the uplink cap for this fetch's share (within `wait`) and sets
/// `share` to it; returns when to ask again. With no answer the share stays as it
/// was (uncapped before the first answer).
async fn uplink_share(node: &Node, blob: Digest, share: &Limiter, wait: Duration) -> Duration {
    let ask = node.tracker().uplink_share(node.peer_id(), blob, true);
    match tokio::time::timeout(wait, ask).await {
        Ok(Ok(s)) => {
            if share.rate() != s.bytes_per_sec {
                match s.bytes_per_sec {
                    Some(rate) => debug!(bytes_per_sec = rate, "share of the uplink cap"),
                    None => debug!("no uplink cap"),
                }
                share.set_rate(s.bytes_per_sec);
            }
            s.renew
        }
        Ok(Err(e)) => {
            debug!(error = %e, "no uplink share from the trackers; keeping the last one");
            SHARE_RENEW
        }
        Err(_) => {
            debug!("no uplink share within {wait:?}; keeping the last one");
            SHARE_RENEW
        }
    }
}

/// Renews the fetch's share of the uplink cap for as long as it runs.
async fn renew_uplink_share(node: &Node, blob: Digest, share: &Limiter, mut renew: Duration) -> Infallible {
    loop {
        tokio::time::sleep(renew).await;
        renew = uplink_share(node, blob, share, swarm_tracker::client::REQUEST_TIMEOUT).await;
    }
}

/// Streams the blob from upstream starting at piece `from`, turning bytes into
/// verified, stored pieces, each announced to the swarm (its hash with its `Have`)
/// and handed to the publisher through `known`. Never waits for the tracker.
#[allow(clippy::too_many_arguments)] // the feed's inputs, its output (`known`) and its limiter
async fn feed(
    node: &Node,
    upstream: &UpstreamClient,
    req: &BlobRequest,
    blob: &Arc<crate::store::BlobFile>,
    opened: Option<UpstreamBlob>,
    from: u32,
    known: &tokio::sync::watch::Sender<u32>,
    share: &Limiter,
) -> Result<(), String> {
    let layout = *blob.layout();
    let count = layout.piece_count();
    let start = layout.piece_offset(from);
    let mut body = match opened {
        Some(b) if start == 0 => b,
        _ => upstream
            .blob_limited(&req.registry, &req.repository, &req.digest, start, vec![share.clone()])
            .await
            .map_err(|e| e.to_string())?,
    };
    if body.total_length != layout.length {
        return Err(format!("upstream length {} differs from the published {}", body.total_length, layout.length));
    }
    let mut piece = from;
    let mut buf: Vec<u8> = Vec::with_capacity(layout.piece_length as usize);
    while piece < count {
        let want = layout.piece_len(piece) as usize;
        while buf.len() < want {
            match body.next_chunk().await {
                Some(Ok(bytes)) => buf.extend_from_slice(&bytes),
                Some(Err(e)) => return Err(format!("upstream stream: {e}")),
                None => {
                    return Err(format!("upstream ended {} bytes early", layout.length - layout.piece_offset(piece)));
                }
            }
        }
        let rest = buf.split_off(want);
        let data = std::mem::replace(&mut buf, rest);
        let b = blob.clone();
        let (_hash, stored) = tokio::task::spawn_blocking(move || b.write_source_piece(piece, &data))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if stored {
            node.upstream_piece(&req.digest, piece).await;
        }
        known.send_replace(blob.known_hashes());
        piece += 1;
    }
    debug!(pieces = count - from, "upstream fetch done");
    Ok(())
}

/// The lease holder's publishing to the tracker, beside its feed: what and when is
/// `swarm_core::lease::Publisher`'s. Ends once the tracker has every hash, or the
/// download is over; cancels `lost` when another node holds the lease.
async fn publish(
    node: Node,
    blob: Arc<crate::store::BlobFile>,
    mut known: tokio::sync::watch::Receiver<u32>,
    from: u32,
    lost: tokio_util::sync::CancellationToken,
) {
    let layout = *blob.layout();
    let count = layout.piece_count();
    let mut publisher = Publisher::new(from, Instant::now());
    let mut feeding = true;
    let mut unreachable = false;
    loop {
        publisher.known(*known.borrow_and_update());
        if publisher.confirmed() >= count {
            return;
        }
        if let Some(p) = publisher.poll(Instant::now()) {
            let hashes = blob.hashes(p.first, p.count);
            let answer = match node.tracker().publish_hashes(node.peer_id(), layout, p.first, &hashes).await {
                Ok(()) => {
                    if std::mem::take(&mut unreachable) {
                        info!("the tracker answers again; its copy of the piece hashes is being brought up to date");
                    }
                    Published::Ok
                }
                Err(TrackerClientError::Refused { message, .. }) => {
                    debug!(%message, first = p.first, "publish refused");
                    Published::Refused
                }
                Err(e) => {
                    if !std::mem::replace(&mut unreachable, true) {
                        warn!(error = %e, "cannot publish piece hashes to the tracker; the upstream fetch goes on and peers get the hashes from this node");
                    }
                    Published::Unreachable
                }
            };
            if publisher.published(answer, Instant::now()) == PublishStep::Lost {
                lost.cancel();
                return;
            }
            continue;
        }
        // Once the feed is over, a download that ended needs no more publishing (a
        // complete blob registers its metainfo with its announces).
        if !feeding
            && node.download(&layout.digest).is_none_or(|d| d.progress().borrow().state != DownloadState::Running)
        {
            return;
        }
        let wake = publisher.poll_timeout().map_or(Instant::now() + RENEW, |t| t);
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(wake));
        tokio::select! {
            _ = node.cancelled() => return,
            _ = lost.cancelled() => return,
            changed = known.changed(), if feeding => feeding = changed.is_ok(),
            _ = sleep => {}
        }
    }
}

impl BlobProvider for SwarmProvider {
    async fn blob_length(&self, req: &BlobRequest) -> Result<u64, ProviderError> {
        if let Some(d) = self.node.download(&req.digest) {
            return Ok(d.layout().length);
        }
        if let Ok(Some(layout)) = self.node.store().layout(&req.digest) {
            return Ok(layout.length);
        }
        if let Ok(Some(h)) = self.node.tracker().get_hashes(req.digest, u32::MAX).await {
            return Ok(h.layout.length);
        }
        self.upstream.blob_length(&req.registry, &req.repository, &req.digest).await.map_err(provider_error)
    }

    async fn open_blob(&self, req: &BlobRequest, offset: u64) -> Result<BlobBody, ProviderError> {
        let d = self.download(req).await?;
        let layout = *d.layout();
        if offset > layout.length {
            return Err(ProviderError::Other(format!("offset {offset} past the end ({})", layout.length)));
        }
        let stream = verified_stream(self.node.clone(), d, offset);
        let stream = match &self.disk {
            // Busy (never evicted) while the body streams; also the blob's last use.
            Some(disk) => {
                let guard = disk.serving(req.digest);
                stream
                    .map(move |chunk| {
                        let _busy = &guard;
                        chunk
                    })
                    .boxed()
            }
            None => stream,
        };
        Ok(BlobBody { length: layout.length, stream })
    }
}

/// The blob's bytes from `offset`, each piece released once verified, the last one
/// once the whole blob matched its digest. Every piece is checked against its hash
/// again as it is read from disk: one that rotted since it was verified ends the
/// stream with an error (containerd retries, or goes to the registry) and the node
/// drops the piece and fetches it again ([`Node::piece_rotted`]).
fn verified_stream(
    node: Node,
    d: Download,
    offset: u64,
) -> futures_util::stream::BoxStream<'static, Result<Bytes, std::io::Error>> {
    let layout = *d.layout();
    let first = layout.piece_at(offset);
    let count = layout.piece_count();
    let state = (d, first, offset);
    stream::unfold(state, move |(d, piece, offset)| {
        let node = node.clone();
        verified_step(node, d, piece, offset, layout, count)
    })
    .boxed()
}

/// One piece of [`verified_stream`]: the bytes and the next state, or `None` at the end.
type Step = Option<(Result<Bytes, std::io::Error>, (Download, u32, u64))>;

async fn verified_step(node: Node, d: Download, piece: u32, offset: u64, layout: Layout, count: u32) -> Step {
    {
        if piece >= count || offset >= layout.length {
            return None;
        }
        let last = piece + 1 == count;
        let mut progress = d.progress();
        let ready = tokio::time::timeout(STREAM_STALL, async {
            loop {
                let state = progress.borrow_and_update().state.clone();
                if let DownloadState::Failed(reason) = state {
                    return Err(reason);
                }
                let ok = if last { state == DownloadState::Complete } else { d.blob().has_piece(piece) };
                if ok {
                    return Ok(());
                }
                if progress.changed().await.is_err() {
                    return Err("the download stopped".to_string());
                }
            }
        })
        .await;
        let err = |m: String| std::io::Error::other(m);
        match ready {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return Some((Err(err(reason)), (d, count, offset))),
            Err(_) => {
                return Some((
                    Err(err(format!("no progress on piece {piece} for {STREAM_STALL:?}"))),
                    (d, count, offset),
                ));
            }
        }
        let blob = d.blob().clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::new();
            blob.read_piece_into(piece, &mut buf).map(|()| buf)
        })
        .await;
        let data = match read {
            Ok(Ok(data)) => data,
            Ok(Err(e @ crate::store::StoreError::PieceMismatch { .. })) => {
                node.piece_rotted(&layout.digest, piece).await;
                return Some((Err(err(e.to_string())), (d, count, offset)));
            }
            Ok(Err(e)) => return Some((Err(err(e.to_string())), (d, count, offset))),
            Err(e) => return Some((Err(err(e.to_string())), (d, count, offset))),
        };
        let skip = (offset - layout.piece_offset(piece)) as usize;
        let bytes = Bytes::from(data).slice(skip..);
        let next_offset = layout.piece_offset(piece + 1);
        Some((Ok(bytes), (d, piece + 1, next_offset)))
    }
}
