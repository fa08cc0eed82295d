//! The store announcer: keeps every tracker told which complete blobs this node's
//! store holds, so the cluster's cache survives restarts of nodes and trackers.
//!
//! One task per tracker of the node's [`TrackerClient`] list (tasks come and go with
//! the list). Each sends the tracker one [`StoreAnnounce`] listing every complete blob
//! of the store (split only past [`MAX_STORE_BLOBS`] digests or [`MAX_STORE_HASHES`]
//! piece hashes):
//!
//! - at start (unless the store is empty: an empty store is never announced), after
//!   completing any blob a crash left with every piece but no `complete` marker
//!   ([`crate::store::Store::finish_interrupted`]);
//! - every announce interval the tracker names (30 s by default), which keeps the
//!   node from expiring there;
//! - at once when the tracker's instance id is new (it restarted and lost its state),
//!   when it answers again after being marked down, or when the list gains it.
//!
//! Every tracker gets the whole store, not only the blobs it arbitrates: when a
//! tracker goes away, the next one in each blob's rendezvous order already knows the
//! blob's complete holders and metainfo, and `swarm status --cluster` sees the same
//! holders whichever tracker it asks. Metainfo travels only when the tracker may lack
//! it: all of it the first time this task talks to a tracker instance, later only for
//! the blobs the tracker reported `missing`. A version-1 tracker gets the old
//! per-blob `Register` and `Announce` instead.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use swarm_proto::msg::{Announce, MAX_STORE_BLOBS, MAX_STORE_HASHES, StoreAnnounce, TrackerRequest};
use swarm_proto::{Digest, Metainfo};
use swarm_tracker::client::{TrackerClientError, TrackerInfo};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::node::Node;

/// How long a failed store announce waits before it is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);
/// The announce interval used until a tracker names its own.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

/// Runs the announcer of `node` until `cancel` fires. See the module docs.
pub async fn run(node: Node, cancel: CancellationToken) {
    // A blob whose download a crash cut between its last piece and its whole-blob
    // check is finished first, so that the first announce lists it.
    let store = node.store().clone();
    match tokio::task::spawn_blocking(move || store.finish_interrupted()).await {
        Ok(Ok(done)) => {
            for digest in done {
                info!(blob = %digest, "completed a blob a restart had left unmarked");
            }
        }
        Ok(Err(e)) => warn!("checking interrupted blobs: {e}"),
        Err(e) => warn!("checking interrupted blobs: {e}"),
    }
    let mut view = node.tracker().watch();
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut running: Vec<(SocketAddr, CancellationToken)> = Vec::new();
    loop {
        let listed = node.tracker().trackers();
        running.retain(|(addr, stop)| {
            let keep = listed.contains(addr);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for addr in listed {
            if running.iter().any(|(a, _)| *a == addr) {
                continue;
            }
            let stop = cancel.child_token();
            running.push((addr, stop.clone()));
            let span = info_span!("store-announce", tracker = %addr);
            tasks.spawn(announce_to(node.clone(), addr, stop).instrument(span));
        }
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            changed = view.changed() => if changed.is_err() { break },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
}

/// What decides a re-announce at once: a new instance id, a version-1 tracker's new
/// connection, or the tracker answering again.
fn generation(info: Option<&TrackerInfo>) -> (Option<u64>, u64, bool) {
    match info {
        Some(t) => (t.instance, if t.instance.is_none() { t.connections } else { 0 }, t.up),
        None => (None, 0, false),
    }
}

async fn announce_to(node: Node, tracker: SocketAddr, stop: CancellationToken) {
    let mut view = node.tracker().watch();
    // Blobs whose metainfo this tracker instance has.
    let mut known: HashSet<Digest> = HashSet::new();
    let mut seen = generation(view.borrow().iter().find(|t| t.addr == tracker));
    let mut due = tokio::time::Instant::now();
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(due) => {}
            changed = view.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = generation(view.borrow_and_update().iter().find(|t| t.addr == tracker));
                let restarted = now.0 != seen.0 || now.1 != seen.1;
                let back = now.2 && !seen.2;
                seen = now;
                if restarted {
                    known.clear();
                }
                if !(restarted || back) {
                    continue;
                }
                info!("tracker restarted or back: announcing the store again");
            }
        }
        let wait = match announce_once(&node, tracker, &mut known).await {
            Ok(interval) => interval,
            Err(e) => {
                debug!(error = %e, "store announce failed; trying again in {RETRY_AFTER:?}");
                RETRY_AFTER
            }
        };
        due = tokio::time::Instant::now() + wait;
        // The announce itself may have connected and learned a new instance id: that
        // change is already handled (the tracker got the store just now).
        seen = generation(view.borrow_and_update().iter().find(|t| t.addr == tracker));
    }
}

/// Errors of one store announce.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("reading the store: {0}")]
    Store(String),
    #[error(transparent)]
    Tracker(#[from] TrackerClientError),
}

/// Announces the whole store to `tracker` once; returns when to announce again.
async fn announce_once(
    node: &Node,
    tracker: SocketAddr,
    known: &mut HashSet<Digest>,
) -> Result<Duration, AnnounceError> {
    let store = node.store().clone();
    let need: HashSet<Digest> = known.clone();
    let blobs = tokio::task::spawn_blocking(move || {
        let digests = store.complete_blobs()?;
        let mut out = Vec::with_capacity(digests.len());
        for d in digests {
            // Metainfo is read for every blob (cheap: one small file) so that the
            // piece count is known for the fallback and for batching.
            if let Some(m) = store.metainfo(&d)? {
                let wanted = !need.contains(&d);
                out.push((m, wanted));
            }
        }
        Ok::<_, crate::store::StoreError>(out)
    })
    .await
    .map_err(|e| AnnounceError::Store(e.to_string()))?
    .map_err(|e| AnnounceError::Store(e.to_string()))?;
    if blobs.is_empty() {
        // Nothing to say: an empty store is not announced (the node shows up at the
        // tracker with its first blob, as before).
        return Ok(DEFAULT_INTERVAL);
    }
    let (listen_port, advertise, zone) = node.announce_identity();
    let mut interval = DEFAULT_INTERVAL;
    let mut missing_total = 0;
    for batch in batches(&blobs) {
        let ann = StoreAnnounce {
            peer_id: node.peer_id(),
            listen_port,
            advertise,
            zone: zone.clone(),
            blobs: batch.iter().map(|(m, _)| m.digest).collect(),
            metainfo: batch.iter().filter(|(_, send)| *send).map(|(m, _)| m.clone()).collect(),
        };
        let (every, missing) = match node.tracker().announce_store(tracker, &ann).await {
            Ok(answer) => answer,
            Err(TrackerClientError::Unsupported { .. }) => {
                return announce_v1(node, tracker, &blobs, listen_port, advertise, &zone).await;
            }
            Err(e) => return Err(e.into()),
        };
        interval = every;
        known.extend(ann.blobs.iter().copied());
        for d in &missing {
            known.remove(d);
        }
        // The tracker lacked metainfo we did not send (it restarted since we last
        // talked): send those at once.
        let resend: Vec<Metainfo> =
            batch.iter().filter(|(m, sent)| !*sent && missing.contains(&m.digest)).map(|(m, _)| m.clone()).collect();
        if !resend.is_empty() {
            let again = StoreAnnounce { blobs: resend.iter().map(|m| m.digest).collect(), metainfo: resend, ..ann };
            let (_, still) = node.tracker().announce_store(tracker, &again).await?;
            known.extend(again.blobs.iter().copied());
            for d in &still {
                known.remove(d);
            }
            missing_total += still.len();
        } else {
            missing_total += missing.len();
        }
    }
    if missing_total > 0 {
        warn!(missing = missing_total, "the tracker refused the metainfo of some stored blobs");
    }
    debug!(blobs = blobs.len(), "store announced");
    Ok(interval)
}

/// Splits the store into messages within [`MAX_STORE_BLOBS`] digests and
/// [`MAX_STORE_HASHES`] piece hashes of metainfo.
fn batches(blobs: &[(Metainfo, bool)]) -> Vec<&[(Metainfo, bool)]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut hashes = 0usize;
    for (i, (m, send)) in blobs.iter().enumerate() {
        let cost = if *send { m.piece_hashes.len() } else { 0 };
        if i > start && (i - start >= MAX_STORE_BLOBS || hashes + cost > MAX_STORE_HASHES) {
            out.push(&blobs[start..i]);
            start = i;
            hashes = 0;
        }
        hashes += cost;
    }
    if start < blobs.len() {
        out.push(&blobs[start..]);
    }
    out
}

/// The version-1 way: one `Register` and one `Announce` per blob.
async fn announce_v1(
    node: &Node,
    tracker: SocketAddr,
    blobs: &[(Metainfo, bool)],
    listen_port: u16,
    advertise: Option<SocketAddr>,
    zone: &str,
) -> Result<Duration, AnnounceError> {
    let client = node.tracker();
    for (m, _) in blobs {
        client.request_to(tracker, &TrackerRequest::Register { metainfo: m.clone() }).await?;
        let ann = Announce {
            peer_id: node.peer_id(),
            blob: m.digest,
            listen_port,
            advertise,
            zone: zone.to_string(),
            have: m.piece_count(),
            complete: true,
            num_want: 0,
        };
        client.request_to(tracker, &TrackerRequest::Announce(ann)).await?;
    }
    Ok(DEFAULT_INTERVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(n: u8, pieces: usize) -> Metainfo {
        Metainfo {
            digest: Digest([n; 32]),
            length: pieces as u64,
            piece_length: 1,
            piece_hashes: vec![[n; 32]; pieces],
        }
    }

    #[test]
    fn batches_respect_both_caps() {
        let big = MAX_STORE_HASHES / 2 + 1;
        let blobs = vec![(meta(1, big), true), (meta(2, big), true), (meta(3, big), false)];
        let b = batches(&blobs);
        assert_eq!(b.iter().map(|b| b.len()).collect::<Vec<_>>(), vec![1, 2]);
        let many: Vec<_> = (0..MAX_STORE_BLOBS + 1).map(|i| (meta(i as u8, 1), false)).collect();
        assert_eq!(batches(&many).iter().map(|b| b.len()).collect::<Vec<_>>(), vec![MAX_STORE_BLOBS, 1]);
    }
}
