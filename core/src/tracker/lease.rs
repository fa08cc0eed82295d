//! Upstream leases and incremental piece hashes: which one node fetches a blob from
//! the upstream registry, and the piece hashes it publishes as the bytes arrive.
//!
//! Per blob the tracker keeps, next to its peers and metainfo, an `Upstream`:
//!
//! - `partial`: the layout and the known prefix of piece hashes (possibly empty),
//!   while the blob is still streaming in. Once the prefix covers every piece it becomes the blob's
//!   [`Metainfo`] (so `GetMetainfo` and `Register` behave as for a seeded blob) and
//!   `partial` is dropped: at most one of the two is set.
//! - `lease`: the holder, when the lease runs out (`expires`, pushed back by every
//!   `AcquireLease` renewal and `PublishHashes` of the holder) and when it last
//!   published a new hash (`last_progress`). A lease is **live** while
//!   `now < expires` and `now - last_progress < stall_timeout`; otherwise it is
//!   *expired* (the holder went silent) or *stalled* (the holder keeps renewing but
//!   its fetch makes no progress), and the next node that asks takes it over,
//!   resuming at the first piece whose hash is unknown.
//! - `failure`: the reason the last upstream fetch failed and when; for
//!   `failure_memory` every `AcquireLease` is answered `Failed` so the nodes fall
//!   back to the upstream instead of retrying the same broken fetch at once.
//! - `from_lease`: whether the metainfo was completed from published hashes and not
//!   (yet) vouched for by a `Register`; a failed release then withdraws it.
//!
//! Rules, in the order `AcquireLease` applies them:
//!
//! 1. full metainfo known → `NotNeeded`;
//! 2. a live lease: the caller's own → renewed, `Granted` again (`last_progress` is
//!    kept, so renewing is no way out of a stall); someone else's → `HeldBy`;
//! 3. the caller's own lease stalled → the lease is withdrawn and the caller told
//!    `Failed` (it must abandon its fetch; the next node that asks takes over);
//! 4. a failure recorded less than `failure_memory` ago → `Failed`;
//! 5. otherwise a new lease for the caller, `resume_from` = number of known hashes.
//!
//! `PublishHashes` is accepted only from the live holder, with one exception, the
//! **re-assert**: a publish for a blob without metainfo whose lease nobody holds (a
//! restarted tracker, or another replica taking over) or whose lease the publisher
//! itself let expire (it could not reach the tracker), with no failure remembered,
//! makes the publisher the holder again, provided its hashes fit (a tracker that
//! knows nothing takes them from piece 0 only; the holder then sends everything
//! again). The holder's upstream fetch goes on while the tracker is away, so this is
//! how a tracker that comes back learns who is fetching the blob instead of granting
//! a second lease. The hashes must continue the known prefix without a gap and agree where they overlap, under the same
//! layout. The first publish may carry no hash at all: it records the layout, so
//! the other nodes can prepare their copy (`GetHashes` answers it with an empty
//! list). `ReleaseLease` too is accepted only from the live holder: a holder whose
//! lease lapsed typically learns it from a refused renewal and reports that as a
//! failure, which must not wipe the hashes the next holder resumes from. A release
//! when no lease is recorded at all is a no-op, so a retried release is harmless.
//!
//! Nothing here reads a clock: every entry point takes `now`, and none uses the RNG.

use std::time::{Duration, Instant};

use swarm_proto::msg::LeaseReply;
use swarm_proto::{Digest, Layout, Metainfo, PeerId};

use super::TrackerError;
use super::{BlobEntry, TrackerState};

/// Most hashes sent in one [`TrackerResponse::Hashes`](swarm_proto::msg::TrackerResponse::Hashes)
/// (2 MiB of hashes): a blob with more pieces is read in several `GetHashes`.
pub const MAX_HASHES_PER_REPLY: u32 = 65_536;

/// Longest failure reason kept (bytes); longer reasons are cut at a character
/// boundary. The reason is handed to every node that asks for the lease.
pub const MAX_FAILURE_REASON_LEN: usize = 1024;

/// Whether a recorded lease still counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// Renewed in time and making progress.
    Live,
    /// Not renewed within `lease_ttl`: the holder went silent.
    Expired,
    /// Renewed, but no new hash for `stall_timeout`: the holder's fetch is stuck.
    Stalled,
}

/// Who holds (or last held) the upstream lease of a blob, as seen at some instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseStatus {
    pub holder: PeerId,
    pub state: LeaseState,
    /// Piece hashes known so far (where a new holder would resume).
    pub known: u32,
}

/// The upstream side of one blob; see the module docs.
#[derive(Debug, Default)]
pub(super) struct Upstream {
    partial: Option<Partial>,
    lease: Option<Lease>,
    failure: Option<Failure>,
    pub(super) from_lease: bool,
}

/// Layout and known prefix of the hashes of a blob still streaming in. Invariant:
/// `hashes.len() < layout.piece_count()`.
#[derive(Debug)]
struct Partial {
    layout: Layout,
    hashes: Vec<[u8; 32]>,
}

#[derive(Debug)]
struct Lease {
    holder: PeerId,
    expires: Instant,
    last_progress: Instant,
}

impl Lease {
    fn state(&self, now: Instant, stall_timeout: Duration) -> LeaseState {
        if now >= self.expires {
            LeaseState::Expired
        } else if now.saturating_duration_since(self.last_progress) >= stall_timeout {
            LeaseState::Stalled
        } else {
            LeaseState::Live
        }
    }
}

#[derive(Debug)]
struct Failure {
    reason: String,
    at: Instant,
}

impl Upstream {
    pub(super) fn is_empty(&self) -> bool {
        self.partial.is_none() && self.lease.is_none() && self.failure.is_none()
    }

    /// Refuses a metainfo that contradicts the hashes published so far.
    pub(super) fn check_register(&self, metainfo: &Metainfo) -> Result<(), TrackerError> {
        match &self.partial {
            Some(p) => check_extends(&p.layout, &p.hashes, &metainfo.layout(), 0, &metainfo.piece_hashes),
            None => Ok(()),
        }
    }

    /// A full metainfo was registered: the partial hashes (a prefix of it) are no
    /// longer needed.
    pub(super) fn registered(&mut self) {
        self.partial = None;
        self.from_lease = false;
    }

    /// Forgets old failures, dead leases nobody could take over (no peers) or that
    /// are moot (metainfo known), and partial hashes nobody fetches or swarms on.
    pub(super) fn expire(&mut self, now: Instant, config: &super::TrackerConfig, has_peers: bool, has_metainfo: bool) {
        if self.failure.as_ref().is_some_and(|f| now.saturating_duration_since(f.at) >= config.failure_memory) {
            self.failure = None;
        }
        if self
            .lease
            .as_ref()
            .is_some_and(|l| l.state(now, config.stall_timeout) != LeaseState::Live && (has_metainfo || !has_peers))
        {
            self.lease = None;
        }
        if self.lease.is_none() && !has_peers {
            self.partial = None;
        }
    }
}

/// Checks that `hashes` for pieces `first..` under `layout` continue `known` (the
/// recorded prefix under `known_layout`): same layout, no gap, equal where they
/// overlap, nothing past the last piece.
fn check_extends(
    known_layout: &Layout,
    known: &[[u8; 32]],
    layout: &Layout,
    first: u32,
    hashes: &[[u8; 32]],
) -> Result<(), TrackerError> {
    let blob = layout.digest;
    if known_layout != layout {
        return Err(TrackerError::LayoutConflict {
            blob,
            known_length: known_layout.length,
            known_piece_length: known_layout.piece_length,
            length: layout.length,
            piece_length: layout.piece_length,
        });
    }
    check_range(layout, first, hashes.len())?;
    let start = first as usize;
    if start > known.len() {
        return Err(TrackerError::HashGap { blob, first, known: known.len() as u32 });
    }
    match known[start..].iter().zip(hashes).position(|(a, b)| a != b) {
        Some(i) => Err(TrackerError::HashConflict { blob, piece: first + i as u32 }),
        None => Ok(()),
    }
}

/// Refuses hashes reaching past the last piece.
fn check_range(layout: &Layout, first: u32, count: usize) -> Result<(), TrackerError> {
    let pieces = layout.piece_count();
    if u64::from(first) + count as u64 > u64::from(pieces) {
        return Err(TrackerError::HashesPastEnd { blob: layout.digest, first, count, pieces });
    }
    Ok(())
}

/// `reason` cut to at most [`MAX_FAILURE_REASON_LEN`] bytes.
fn bounded(mut reason: String) -> String {
    if reason.len() > MAX_FAILURE_REASON_LEN {
        let mut end = MAX_FAILURE_REASON_LEN;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

impl BlobEntry {
    /// Layout and the known hashes: the metainfo's (complete) or the partial prefix.
    fn known_hashes(&self) -> Option<(Layout, &[[u8; 32]], bool)> {
        match (&self.metainfo, &self.upstream.partial) {
            (Some(m), _) => Some((m.layout(), &m.piece_hashes, true)),
            (None, Some(p)) => Some((p.layout, &p.hashes, false)),
            (None, None) => None,
        }
    }

    fn known_count(&self) -> u32 {
        self.known_hashes().map_or(0, |(_, h, _)| h.len() as u32)
    }
}

impl TrackerState {
    /// `lease_ttl` in whole seconds as sent to peers (rounded down, at least 1).
    fn ttl_secs(&self) -> u32 {
        u32::try_from(self.config.lease_ttl.as_secs()).unwrap_or(u32::MAX).max(1)
    }

    /// Answers `AcquireLease`, following the rules in the module docs.
    pub fn acquire_lease(&mut self, peer_id: PeerId, blob: Digest, now: Instant) -> LeaseReply {
        let ttl = self.config.lease_ttl;
        let stall_timeout = self.config.stall_timeout;
        let failure_memory = self.config.failure_memory;
        let ttl_secs = self.ttl_secs();
        let grace = self.in_grace(&blob, now);
        let entry = self.blobs.entry(blob).or_default();
        let resume_from = entry.known_count();
        let lease = entry.upstream.lease.as_ref().map(|l| (l.holder, l.state(now, stall_timeout)));
        let recent_failure = (entry.upstream.failure.as_ref())
            .filter(|f| now.saturating_duration_since(f.at) < failure_memory)
            .map(|f| f.reason.clone());
        let reply = match lease {
            _ if entry.metainfo.is_some() => LeaseReply::NotNeeded,
            Some((holder, LeaseState::Live)) if holder == peer_id => {
                if let Some(lease) = entry.upstream.lease.as_mut() {
                    lease.expires = now + ttl; // but not `last_progress`: renewing is no way out of a stall
                }
                LeaseReply::Granted { ttl_secs, resume_from }
            }
            Some((holder, LeaseState::Live)) => LeaseReply::HeldBy { holder },
            Some((holder, LeaseState::Stalled)) if holder == peer_id => {
                entry.upstream.lease = None;
                LeaseReply::Failed { reason: format!("lease withdrawn: no new piece hash for {stall_timeout:?}") }
            }
            _ => match recent_failure {
                Some(reason) => LeaseReply::Failed { reason },
                // Nobody known yet: wait for a holder to re-assert (module docs of `tracker`).
                None if grace => LeaseReply::HeldBy { holder: super::NO_HOLDER },
                None => {
                    entry.upstream.lease = Some(Lease { holder: peer_id, expires: now + ttl, last_progress: now });
                    LeaseReply::Granted { ttl_secs, resume_from }
                }
            },
        };
        if entry.is_empty() {
            self.blobs.remove(&blob);
        }
        reply
    }

    /// Records hashes of pieces `first..` of `layout.digest` from its live lease
    /// holder and renews the lease; new hashes count as progress. Completing the
    /// hashes registers the blob's metainfo. A publish when no lease is recorded and
    /// no failure remembered re-asserts the publisher's lease (see the `tracker`
    /// module docs), provided its hashes fit.
    pub fn publish_hashes(
        &mut self,
        peer_id: PeerId,
        layout: Layout,
        first: u32,
        hashes: &[[u8; 32]],
        now: Instant,
    ) -> Result<(), TrackerError> {
        let result = self.publish_as_holder(peer_id, layout, first, hashes, now);
        if self.blobs.get(&layout.digest).is_some_and(BlobEntry::is_empty) {
            self.blobs.remove(&layout.digest);
        }
        result
    }

    fn publish_as_holder(
        &mut self,
        peer_id: PeerId,
        layout: Layout,
        first: u32,
        hashes: &[[u8; 32]],
        now: Instant,
    ) -> Result<(), TrackerError> {
        let blob = layout.digest;
        let stall_timeout = self.config.stall_timeout;
        let entry = self.blobs.entry(blob).or_default();
        let state = entry.upstream.lease.as_ref().map(|l| (l.holder == peer_id, l.state(now, stall_timeout)));
        let failed_lately = (entry.upstream.failure.as_ref())
            .is_some_and(|f| now.saturating_duration_since(f.at) < self.config.failure_memory);
        // The re-assert (module docs): nobody holds the lease, or the caller's own
        // lease expired while it could not reach this tracker.
        let reassert = entry.metainfo.is_none()
            && !failed_lately
            && match state {
                None => true,
                Some((own, state)) => own && state == LeaseState::Expired,
            };
        if state != Some((true, LeaseState::Live)) && !reassert {
            return Err(TrackerError::NotLeaseHolder { peer_id, blob });
        }
        layout.validate().map_err(|source| TrackerError::InvalidLayout { blob, source })?;
        let known = match entry.known_hashes() {
            Some((known_layout, known, _)) => {
                check_extends(&known_layout, known, &layout, first, hashes)?;
                known.len()
            }
            None => {
                check_range(&layout, first, hashes.len())?;
                if first > 0 {
                    return Err(TrackerError::HashGap { blob, first, known: 0 });
                }
                0
            }
        };
        let new = hashes.get(known - first as usize..).unwrap_or_default();
        if entry.metainfo.is_none() {
            // Even an empty first publish records the layout: the other nodes can set
            // up their copy before the first piece is hashed.
            let partial = entry.upstream.partial.get_or_insert_with(|| Partial { layout, hashes: Vec::new() });
            partial.hashes.extend_from_slice(new);
            if partial.hashes.len() as u64 == u64::from(layout.piece_count())
                && let Some(done) = entry.upstream.partial.take()
            {
                entry.metainfo = Some(Metainfo {
                    digest: blob,
                    length: layout.length,
                    piece_length: layout.piece_length,
                    piece_hashes: done.hashes,
                });
                entry.upstream.from_lease = true;
            }
        }
        // A publish that completes the hashes needs no lease: the fetch is over (a
        // holder's last publish can arrive after its release). Nor does one with no
        // hashes (the layout only, sent as a fetch starts or, late, after it ended):
        // a holder re-asserts with its next hashes.
        if reassert && entry.metainfo.is_none() && !hashes.is_empty() {
            entry.upstream.lease = Some(Lease { holder: peer_id, expires: now, last_progress: now });
        }
        if let Some(lease) = entry.upstream.lease.as_mut() {
            lease.expires = now + self.config.lease_ttl;
            if !new.is_empty() {
                lease.last_progress = now;
            }
        }
        Ok(())
    }

    /// Ends `peer_id`'s lease on `blob`. With `failed`, the hashes published under
    /// leases (partial, or a metainfo completed from them) are dropped and the
    /// failure is remembered for `failure_memory`. A release when no lease is
    /// recorded is a no-op; one from anybody but the live holder is refused.
    pub fn release_lease(
        &mut self,
        peer_id: PeerId,
        blob: Digest,
        failed: Option<String>,
        now: Instant,
    ) -> Result<(), TrackerError> {
        let Some(entry) = self.blobs.get_mut(&blob) else { return Ok(()) };
        match &entry.upstream.lease {
            None => return Ok(()),
            Some(lease)
                if lease.holder != peer_id || lease.state(now, self.config.stall_timeout) != LeaseState::Live =>
            {
                return Err(TrackerError::NotLeaseHolder { peer_id, blob });
            }
            Some(_) => entry.upstream.lease = None,
        }
        if let Some(reason) = failed {
            entry.upstream.partial = None;
            if entry.upstream.from_lease {
                entry.metainfo = None;
                entry.upstream.from_lease = false;
            }
            entry.upstream.failure = Some(Failure { reason: bounded(reason), at: now });
        }
        if entry.is_empty() {
            self.blobs.remove(&blob);
        }
        Ok(())
    }

    /// The layout and every hash known for `blob`, and whether that is all of them
    /// (a registered metainfo) or a prefix (an upstream fetch in progress).
    pub fn hashes(&self, blob: &Digest) -> Option<(Layout, &[[u8; 32]], bool)> {
        self.blobs.get(blob).and_then(BlobEntry::known_hashes)
    }

    /// Who holds or last held the upstream lease of `blob`, as of `now`.
    pub fn lease_status(&self, blob: &Digest, now: Instant) -> Option<LeaseStatus> {
        let entry = self.blobs.get(blob)?;
        let lease = entry.upstream.lease.as_ref()?;
        Some(LeaseStatus {
            holder: lease.holder,
            state: lease.state(now, self.config.stall_timeout),
            known: entry.known_count(),
        })
    }

    /// The failure remembered for `blob`, if any.
    pub fn failure(&self, blob: &Digest) -> Option<&str> {
        self.blobs.get(blob)?.upstream.failure.as_ref().map(|f| f.reason.as_str())
    }
}

#[cfg(test)]
mod tests;
