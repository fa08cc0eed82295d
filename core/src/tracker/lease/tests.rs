//! Unit tests of upstream leases and incremental piece hashes, no network.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use swarm_proto::msg::{Announce, LeaseReply, TrackerErrorCode, TrackerRequest, TrackerResponse};
use swarm_proto::{Digest, Layout, Metainfo, PeerId};

use super::{LeaseState, MAX_FAILURE_REASON_LEN, MAX_HASHES_PER_REPLY};
use crate::tracker::{TrackerConfig, TrackerError, TrackerState};

const PIECE: u32 = 256 * 1024;

fn blob() -> Digest {
    Digest::of(b"upstream blob")
}

fn pid(n: u8) -> PeerId {
    PeerId([n; 16])
}

fn seen(n: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::from([10, 0, 0, n]), 40_000)
}

/// A layout of `pieces` pieces, the last one short.
fn layout(pieces: u32) -> Layout {
    Layout { digest: blob(), length: u64::from(pieces) * u64::from(PIECE) - 7, piece_length: PIECE }
}

/// The hash of piece `i` (distinct for every piece).
fn h(i: u32) -> [u8; 32] {
    let mut out = [0xa5; 32];
    out[..4].copy_from_slice(&i.to_be_bytes());
    out
}

fn hashes(range: std::ops::Range<u32>) -> Vec<[u8; 32]> {
    range.map(h).collect()
}

fn metainfo(pieces: u32) -> Metainfo {
    let l = layout(pieces);
    Metainfo { digest: l.digest, length: l.length, piece_length: l.piece_length, piece_hashes: hashes(0..pieces) }
}

/// A tracker core with the default lease timings (10 s ttl, 30 s stall, 10 s memory)
/// and a clock starting at `t0`.
struct Fixture {
    s: TrackerState,
    t0: Instant,
}

impl Fixture {
    fn new() -> Self {
        // A stall timeout of 30 s keeps the timelines below short (the default is 110 s).
        let config = TrackerConfig { stall_timeout: Duration::from_secs(30), ..TrackerConfig::default() };
        Self { s: TrackerState::new(config, 5), t0: Instant::now() }
    }

    fn at(&self, secs: f64) -> Instant {
        self.t0 + Duration::from_secs_f64(secs)
    }

    fn req(&mut self, req: TrackerRequest, peer: u8, secs: f64) -> TrackerResponse {
        let now = self.at(secs);
        let response = self.s.handle(req, seen(peer), now);
        self.check_consistent();
        response
    }

    fn acquire(&mut self, peer: u8, secs: f64) -> LeaseReply {
        match self.req(TrackerRequest::AcquireLease { peer_id: pid(peer), blob: blob() }, peer, secs) {
            TrackerResponse::Lease(reply) => reply,
            other => panic!("expected a lease reply, got {other:?}"),
        }
    }

    fn publish(&mut self, peer: u8, pieces: u32, first: u32, hashes: Vec<[u8; 32]>, secs: f64) -> TrackerResponse {
        let req = TrackerRequest::PublishHashes { peer_id: pid(peer), layout: layout(pieces), first, hashes };
        self.req(req, peer, secs)
    }

    fn release(&mut self, peer: u8, failed: Option<&str>, secs: f64) -> TrackerResponse {
        let req = TrackerRequest::ReleaseLease { peer_id: pid(peer), blob: blob(), failed: failed.map(String::from) };
        self.req(req, peer, secs)
    }

    fn get_hashes(&mut self, first: u32, secs: f64) -> TrackerResponse {
        self.req(TrackerRequest::GetHashes { blob: blob(), first }, 99, secs)
    }

    /// `peer` announces it holds `have` pieces of the blob, not all.
    fn announce_partial(&mut self, peer: u8, have: u32, secs: f64) {
        let ann = Announce {
            peer_id: pid(peer),
            blob: blob(),
            listen_port: 7001,
            advertise: None,
            zone: String::new(),
            have,
            complete: false,
            num_want: 10,
        };
        assert!(matches!(self.req(TrackerRequest::Announce(ann), peer, secs), TrackerResponse::Peers { .. }));
    }

    fn holder(&self, secs: f64) -> Option<(PeerId, LeaseState)> {
        self.s.lease_status(&blob(), self.at(secs)).map(|l| (l.holder, l.state))
    }

    /// The structural invariant: at most one of metainfo and partial hashes, and a
    /// partial prefix is never complete.
    fn check_consistent(&self) {
        if let Some(entry) = self.s.blobs.get(&blob()) {
            assert!(entry.metainfo.is_none() || entry.upstream.partial.is_none(), "both metainfo and partial");
            if let Some(p) = &entry.upstream.partial {
                assert!((p.hashes.len() as u64) < u64::from(p.layout.piece_count()), "a complete partial");
            }
            assert!(!entry.upstream.from_lease || entry.metainfo.is_some());
        }
    }
}

fn granted(resume_from: u32) -> LeaseReply {
    LeaseReply::Granted { ttl_secs: 10, resume_from }
}

fn hashes_reply(pieces: u32, first: u32, range: std::ops::Range<u32>, complete: bool) -> TrackerResponse {
    TrackerResponse::Hashes { layout: layout(pieces), first, hashes: hashes(range), complete }
}

#[track_caller]
fn assert_refused(response: TrackerResponse, code: TrackerErrorCode, needle: &str) {
    match response {
        TrackerResponse::Error { code: c, message } => {
            assert_eq!(c, code, "{message}");
            assert!(message.contains(needle), "{message:?} should mention {needle:?}");
        }
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

#[test]
fn the_first_asker_gets_the_lease_and_the_others_are_told_who() {
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.acquire(2, 0.1), LeaseReply::HeldBy { holder: pid(1) });
    assert_eq!(f.acquire(3, 0.2), LeaseReply::HeldBy { holder: pid(1) });
    assert_eq!(f.holder(0.2), Some((pid(1), LeaseState::Live)));
    // The lease alone keeps the blob known (no peers, no metainfo yet).
    assert_eq!(f.s.blob_count(), 1);
    assert_eq!(f.s.peer_count(&blob()), 0);
    // Nothing is published yet: no hashes to hand out.
    assert_refused(f.get_hashes(0, 0.3), TrackerErrorCode::UnknownBlob, "no piece hashes");
    // The holder's first publish may be just the layout, before any piece is hashed.
    assert_eq!(f.publish(1, 4, 0, vec![], 0.4), TrackerResponse::Registered);
    assert_eq!(f.get_hashes(0, 0.4), hashes_reply(4, 0, 0..0, false));
    assert_eq!(f.get_hashes(u32::MAX, 0.4), hashes_reply(4, u32::MAX, 0..0, false), "the layout alone");
    assert_refused(f.publish(1, 5, 0, vec![], 0.5), TrackerErrorCode::Conflict, "is recorded as");
    assert_eq!(f.acquire(1, 0.6), granted(0), "recording the layout is no progress to resume from");
}

#[test]
fn a_registered_blob_needs_no_upstream_fetch() {
    let mut f = Fixture::new();
    f.s.register(metainfo(4)).expect("register");
    assert_eq!(f.acquire(1, 0.0), LeaseReply::NotNeeded);
    assert_eq!(f.s.lease_status(&blob(), f.at(0.0)), None, "no lease was granted");
    // A blob never seen is not created by a lease request that grants nothing.
    let other = Digest::of(b"other");
    f.s.register(Metainfo { digest: other, ..metainfo(1) }).expect("register");
    assert_eq!(f.s.blob_count(), 2);
}

#[test]
fn the_holder_renews_by_asking_again_or_by_publishing() {
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.acquire(1, 8.0), granted(0), "renewal");
    assert_eq!(f.acquire(2, 17.9), LeaseReply::HeldBy { holder: pid(1) }, "renewed until 18 s");
    assert_eq!(f.publish(1, 4, 0, vec![], 17.0), TrackerResponse::Registered, "an empty publish renews");
    assert_eq!(f.acquire(2, 26.9), LeaseReply::HeldBy { holder: pid(1) }, "renewed until 27 s");
    assert_eq!(f.holder(27.0), Some((pid(1), LeaseState::Expired)));
    assert_eq!(f.acquire(2, 27.0), granted(0), "expired at 27 s: the next asker takes over");
    assert_eq!(f.holder(27.0), Some((pid(2), LeaseState::Live)));
}

#[test]
fn a_silent_holder_loses_the_lease_after_the_ttl() {
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.acquire(2, 9.999), LeaseReply::HeldBy { holder: pid(1) });
    assert_eq!(f.acquire(2, 10.0), granted(0));
    assert_eq!(f.acquire(1, 10.5), LeaseReply::HeldBy { holder: pid(2) }, "the old holder does not get it back");
    assert_refused(f.publish(1, 4, 0, hashes(0..1), 10.5), TrackerErrorCode::Invalid, "not the lease holder");
}

#[test]
fn an_expired_holder_nobody_replaced_may_take_the_lease_again() {
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.publish(1, 4, 0, hashes(0..2), 1.0), TrackerResponse::Registered);
    // Its lapsed lease is not its to release, failed or not: the hashes stay.
    assert_refused(f.release(1, Some("lease lost"), 11.5), TrackerErrorCode::Invalid, "not the lease holder");
    assert_refused(f.release(1, None, 11.5), TrackerErrorCode::Invalid, "not the lease holder");
    assert_eq!(f.s.failure(&blob()), None);
    assert_eq!(f.acquire(1, 12.0), granted(2), "a fresh lease, resuming after what it published");
    assert_eq!(f.publish(1, 4, 2, hashes(2..3), 12.5), TrackerResponse::Registered);
    // Or, having lost the tracker for a while, it simply publishes on: that re-asserts it.
    assert_eq!(f.publish(1, 4, 3, hashes(3..4), 30.0), TrackerResponse::Registered);
    assert_eq!(f.holder(30.0), Some((pid(1), LeaseState::Live)));
}

#[test]
fn a_holder_that_renews_without_progress_stalls_and_loses_the_lease() {
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.publish(1, 8, 0, hashes(0..2), 5.0), TrackerResponse::Registered, "progress at 5 s");
    // Renewing every 3 s, both ways, but never with a new hash (re-sending known
    // ones is no progress either).
    for k in 1..=9 {
        let t = 5.0 + 3.0 * f64::from(k);
        if k % 2 == 0 {
            assert_eq!(f.acquire(1, t), granted(2));
        } else {
            assert_eq!(f.publish(1, 8, 1, hashes(1..2), t), TrackerResponse::Registered);
        }
    }
    assert_eq!(f.acquire(2, 34.9), LeaseReply::HeldBy { holder: pid(1) });
    assert_eq!(f.holder(35.0), Some((pid(1), LeaseState::Stalled)), "30 s after the last new hash");
    assert_refused(f.publish(1, 8, 2, vec![], 35.0), TrackerErrorCode::Invalid, "not the lease holder");
    // Told so, the stalled holder reports a failure: refused, the hashes stay.
    assert_refused(f.release(1, Some("tracker refused"), 35.1), TrackerErrorCode::Invalid, "not the lease holder");
    assert_eq!(f.s.failure(&blob()), None);
    assert_eq!(f.acquire(2, 35.5), granted(2), "the next asker resumes at piece 2");

    // Progress keeps a lease that is renewed: no stall while hashes keep coming.
    assert_eq!(f.publish(2, 8, 2, hashes(2..3), 40.0), TrackerResponse::Registered);
    assert_eq!(f.acquire(2, 44.0), granted(3));
    assert_eq!(f.publish(2, 8, 3, hashes(3..4), 45.4), TrackerResponse::Registered);
    assert_eq!(f.acquire(2, 50.0), granted(4));
    assert_eq!(f.acquire(2, 58.0), granted(4));
    assert_eq!(f.acquire(2, 66.0), granted(4));
    assert_eq!(f.acquire(1, 75.3), LeaseReply::HeldBy { holder: pid(2) }, "progress at 45.4 s: live until 75.4 s");
    assert_eq!(f.holder(75.4), Some((pid(2), LeaseState::Stalled)));
    assert_eq!(f.acquire(1, 75.4), granted(4));
}

#[test]
fn a_stalled_holder_asking_again_is_told_to_give_up() {
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.publish(1, 8, 0, hashes(0..1), 1.0), TrackerResponse::Registered);
    for t in [9.0, 17.0, 25.0] {
        assert_eq!(f.acquire(1, t), granted(1));
    }
    match f.acquire(1, 31.0) {
        LeaseReply::Failed { reason } => assert!(reason.contains("no new piece hash for 30s"), "{reason}"),
        other => panic!("expected the stalled holder to be told Failed, got {other:?}"),
    }
    assert_eq!(f.s.lease_status(&blob(), f.at(31.0)), None, "withdrawn");
    assert_eq!(f.s.failure(&blob()), None, "not a failure of the blob: others may still fetch it");
    assert_eq!(f.acquire(2, 31.5), granted(1));
    assert_eq!(f.get_hashes(0, 31.5), hashes_reply(8, 0, 0..1, false), "the published hashes survive");
}

#[test]
fn the_lease_moves_with_the_right_resume_point() {
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.publish(1, 10, 0, hashes(0..2), 1.0), TrackerResponse::Registered);
    assert_eq!(f.publish(1, 10, 2, hashes(2..3), 2.0), TrackerResponse::Registered);
    // Peer 1 dies. Peer 2 asks while the lease still runs, then after.
    assert_eq!(f.acquire(2, 11.9), LeaseReply::HeldBy { holder: pid(1) });
    assert_eq!(f.acquire(2, 12.0), granted(3));
    // The new holder may re-send the overlap (it fetched from a Range a bit early).
    assert_eq!(f.publish(2, 10, 2, hashes(2..6), 13.0), TrackerResponse::Registered);
    assert_eq!(f.get_hashes(0, 13.0), hashes_reply(10, 0, 0..6, false));
    // The old holder comes back: it is neither holder nor allowed to release.
    assert_refused(f.publish(1, 10, 3, hashes(3..4), 14.0), TrackerErrorCode::Invalid, "not the lease holder");
    assert_refused(f.release(1, None, 14.0), TrackerErrorCode::Invalid, "not the lease holder");
    assert_refused(f.release(1, Some("timeout"), 14.0), TrackerErrorCode::Invalid, "not the lease holder");
    assert_eq!(f.holder(14.0), Some((pid(2), LeaseState::Live)), "refusals change nothing");
    assert_eq!(f.s.failure(&blob()), None);
    // A third peer later: still the second's lease.
    assert_eq!(f.acquire(3, 20.0), LeaseReply::HeldBy { holder: pid(2) });
    assert_eq!(f.acquire(3, 23.0), granted(6), "expired 10 s after the last publish");
}

#[test]
fn only_the_holder_publishes_or_releases() {
    let mut f = Fixture::new();
    // No lease at all: a publish re-asserts a lease (see `lease_holders_re_assert_by_publishing`),
    // but only with hashes that fit.
    assert_refused(f.publish(7, 4, 2, hashes(2..3), 0.0), TrackerErrorCode::Conflict, "gap");
    assert_eq!(f.s.blob_count(), 0, "a refused publish records nothing");
    assert_eq!(f.release(7, None, 0.0), TrackerResponse::Left, "nothing to release: a no-op (retries are safe)");
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_refused(f.publish(2, 4, 0, hashes(0..1), 1.0), TrackerErrorCode::Invalid, "not the lease holder");
    assert_refused(f.release(2, Some("nope"), 1.0), TrackerErrorCode::Invalid, "not the lease holder");
    assert_eq!(f.s.hashes(&blob()), None);
    assert_eq!(f.holder(1.0), Some((pid(1), LeaseState::Live)));
    // Released, then released again (a retry): the second is a no-op.
    assert_eq!(f.release(1, None, 2.0), TrackerResponse::Left);
    assert_eq!(f.release(1, None, 2.1), TrackerResponse::Left);
    assert_eq!(f.s.blob_count(), 0, "nothing left of the blob");
}

#[test]
fn a_layout_differing_from_the_recorded_one_is_a_conflict() {
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.publish(1, 4, 0, hashes(0..1), 1.0), TrackerResponse::Registered);
    assert_refused(f.publish(1, 5, 1, hashes(1..2), 2.0), TrackerErrorCode::Conflict, "is recorded as");
    let mut bigger_pieces = layout(4);
    bigger_pieces.piece_length *= 2;
    let req = TrackerRequest::PublishHashes { peer_id: pid(1), layout: bigger_pieces, first: 1, hashes: hashes(1..2) };
    assert_refused(f.req(req, 1, 2.0), TrackerErrorCode::Conflict, "in pieces of");
    // A layout breaking the protocol's rules is invalid, whatever was recorded.
    let mut odd = layout(4);
    odd.piece_length = 3 * 1024;
    let req = TrackerRequest::PublishHashes { peer_id: pid(1), layout: odd, first: 1, hashes: hashes(1..2) };
    assert_refused(f.req(req, 1, 2.0), TrackerErrorCode::Invalid, "invalid layout");
    let mut empty = layout(4);
    empty.length = 0;
    let req = TrackerRequest::PublishHashes { peer_id: pid(1), layout: empty, first: 0, hashes: vec![] };
    assert_refused(f.req(req, 1, 2.0), TrackerErrorCode::Invalid, "length is zero");
    assert_eq!(f.get_hashes(0, 2.0), hashes_reply(4, 0, 0..1, false), "refusals change nothing");

    // Another peer's publish while the lease is live: refused.
    let req = TrackerRequest::PublishHashes { peer_id: pid(2), layout: layout(4), first: 1, hashes: hashes(1..2) };
    assert_refused(f.req(req, 2, 2.0), TrackerErrorCode::Invalid, "not the lease holder");
}

#[test]
fn lease_holders_re_assert_by_publishing() {
    // Another tracker granted pid 1 the lease and saw 3 hashes; this one knows nothing.
    let mut f = Fixture::new();
    assert_eq!(f.publish(1, 8, 0, hashes(0..3), 0.0), TrackerResponse::Registered, "the whole prefix re-asserts");
    assert_eq!(f.holder(0.0), Some((pid(1), LeaseState::Live)));
    assert_eq!(f.acquire(2, 0.5), LeaseReply::HeldBy { holder: pid(1) });
    assert_eq!(f.publish(1, 8, 3, hashes(3..4), 1.0), TrackerResponse::Registered, "and it goes on publishing");
    assert_eq!(f.get_hashes(0, 1.0), hashes_reply(8, 0, 0..4, false));

    // A last publish arriving after the holder's release completes the hashes and
    // leaves no lease behind.
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.release(1, None, 0.1), TrackerResponse::Left);
    assert_eq!(f.publish(1, 8, 0, hashes(0..8), 0.2), TrackerResponse::Registered);
    assert_eq!(f.holder(0.2), None);
    assert_eq!(f.get_hashes(0, 0.3), hashes_reply(8, 0, 0..8, true));

    // Not after a failure: the failed fetch is not revived.
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.release(1, Some("401"), 1.0), TrackerResponse::Left);
    assert_refused(f.publish(2, 8, 0, hashes(0..1), 2.0), TrackerErrorCode::Invalid, "not the lease holder");
}

#[test]
fn no_lease_is_granted_during_the_grace_period() {
    use crate::tracker::NO_HOLDER;
    // From the tracker's start.
    let mut f = Fixture::new();
    let grace = f.s.config().lease_grace.as_secs_f64();
    f.s.begin_grace(f.at(0.0));
    assert_eq!(f.acquire(1, 0.0), LeaseReply::HeldBy { holder: NO_HOLDER });
    // The holder re-asserts meanwhile: it keeps its lease.
    assert_eq!(f.publish(9, 8, 0, hashes(0..2), 1.0), TrackerResponse::Registered);
    assert_eq!(f.acquire(1, 1.5), LeaseReply::HeldBy { holder: pid(9) });
    // Another blob after the grace: granted at once.
    let other = Digest::of(b"other");
    let req = TrackerRequest::AcquireLease { peer_id: pid(1), blob: other };
    assert_eq!(f.req(req.clone(), 1, grace - 0.1), TrackerResponse::Lease(LeaseReply::HeldBy { holder: NO_HOLDER }));
    assert!(matches!(f.req(req, 1, grace + 0.1), TrackerResponse::Lease(LeaseReply::Granted { .. })));

    // Without a start grace: a blob first seen with partial holders and no hashes
    // (its arbiter went away) waits for its holder; a fresh blob does not.
    let mut f = Fixture::new();
    f.announce_partial(5, 3, 10.0);
    assert_eq!(f.acquire(1, 10.5), LeaseReply::HeldBy { holder: NO_HOLDER });
    assert_eq!(f.acquire(1, 10.0 + grace + 0.1), granted(0), "nobody re-asserted: granted after the grace");
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 10.0), granted(0), "a cold blob is granted at once");

    // A node asking for hashes past piece 0 of a blob unknown here is told to ask
    // again while its holder may re-assert; asking from 0 (a node starting) is not.
    let mut f = Fixture::new();
    assert_refused(f.get_hashes(0, 10.0), TrackerErrorCode::UnknownBlob, "no piece hashes");
    assert_refused(f.get_hashes(4, 10.0), TrackerErrorCode::Invalid, "ask again");
    assert_eq!(f.acquire(1, 10.5), LeaseReply::HeldBy { holder: NO_HOLDER });
    assert_eq!(f.publish(9, 8, 0, hashes(0..5), 11.0), TrackerResponse::Registered, "the holder re-asserts");
    assert_eq!(f.get_hashes(4, 11.0), hashes_reply(8, 4, 4..5, false));
    let mut f = Fixture::new();
    assert_refused(f.get_hashes(4, 10.0), TrackerErrorCode::Invalid, "ask again");
    assert_refused(f.get_hashes(4, 10.0 + grace + 0.1), TrackerErrorCode::UnknownBlob, "no piece hashes");
    f.s.expire(f.at(10.0 + grace + 0.2));
    assert_eq!(f.s.blob_count(), 0, "nothing left once the grace is over");
}

#[test]
fn hashes_must_continue_the_known_prefix() {
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_refused(f.publish(1, 8, 1, hashes(1..2), 0.5), TrackerErrorCode::Conflict, "gap");
    assert_eq!(f.publish(1, 8, 0, hashes(0..3), 1.0), TrackerResponse::Registered);
    assert_refused(f.publish(1, 8, 4, hashes(4..5), 1.5), TrackerErrorCode::Conflict, "gap");
    // Overlap: equal is fine (idempotent retry), different is a conflict naming the piece.
    assert_eq!(f.publish(1, 8, 0, hashes(0..3), 2.0), TrackerResponse::Registered);
    let mut bad = hashes(1..5);
    bad[1] = [0; 32]; // piece 2
    assert_refused(f.publish(1, 8, 1, bad, 2.5), TrackerErrorCode::Conflict, "piece 2 of");
    // Past the last piece.
    assert_refused(f.publish(1, 8, 3, hashes(3..9), 3.0), TrackerErrorCode::Invalid, "past the 8 pieces");
    assert_refused(f.publish(1, 8, u32::MAX, hashes(0..1), 3.0), TrackerErrorCode::Invalid, "past the 8 pieces");
    assert_eq!(f.get_hashes(0, 3.0), hashes_reply(8, 0, 0..3, false), "refused batches left nothing behind");
    // A partial batch whose new part follows the overlap.
    assert_eq!(f.publish(1, 8, 2, hashes(2..5), 4.0), TrackerResponse::Registered);
    assert_eq!(f.get_hashes(0, 4.0), hashes_reply(8, 0, 0..5, false));
}

#[test]
fn completing_the_hashes_registers_the_metainfo() {
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.publish(1, 5, 0, hashes(0..3), 1.0), TrackerResponse::Registered);
    assert_eq!(f.s.metainfo(&blob()), None);
    assert_eq!(f.publish(1, 5, 3, hashes(3..5), 2.0), TrackerResponse::Registered);
    assert_eq!(f.s.metainfo(&blob()), Some(&metainfo(5)));
    assert_eq!(f.req(TrackerRequest::GetMetainfo { blob: blob() }, 2, 2.0), TrackerResponse::Metainfo(metainfo(5)));
    assert_eq!(f.get_hashes(0, 2.0), hashes_reply(5, 0, 0..5, true));
    assert_eq!(f.get_hashes(4, 2.0), hashes_reply(5, 4, 4..5, true));
    assert_eq!(f.acquire(2, 2.5), LeaseReply::NotNeeded);
    // The holder still holds the lease until it verified the digest; re-publishing
    // (a retry) is accepted, a contradiction is not.
    assert_eq!(f.holder(2.5), Some((pid(1), LeaseState::Live)));
    assert_eq!(f.publish(1, 5, 4, hashes(4..5), 3.0), TrackerResponse::Registered);
    assert_refused(f.publish(1, 5, 4, vec![[0; 32]], 3.0), TrackerErrorCode::Conflict, "piece 4");
    // Register keeps its idempotency and conflict rules.
    assert_eq!(f.req(TrackerRequest::Register { metainfo: metainfo(5) }, 3, 3.0), TrackerResponse::Registered);
    let mut other = metainfo(5);
    other.piece_hashes[0] = [1; 32];
    assert_refused(f.req(TrackerRequest::Register { metainfo: other }, 3, 3.0), TrackerErrorCode::Conflict, "");
    // Released after the digest matched: the metainfo stays, the lease goes.
    assert_eq!(f.release(1, None, 4.0), TrackerResponse::Left);
    assert_eq!(f.s.lease_status(&blob(), f.at(4.0)), None);
    assert_eq!(f.s.metainfo(&blob()), Some(&metainfo(5)));
    assert_eq!(f.acquire(3, 5.0), LeaseReply::NotNeeded);
    f.s.expire(f.at(1000.0));
    assert_eq!(f.s.metainfo(&blob()), Some(&metainfo(5)), "a metainfo stays like a registered one");
}

#[test]
fn a_single_piece_blob_completes_in_one_publish() {
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.publish(1, 1, 0, hashes(0..1), 0.5), TrackerResponse::Registered);
    assert_eq!(f.s.metainfo(&blob()), Some(&metainfo(1)));
}

#[test]
fn a_failed_fetch_is_remembered_for_a_while_then_retried_from_scratch() {
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.publish(1, 4, 0, hashes(0..4), 1.0), TrackerResponse::Registered);
    assert!(f.s.metainfo(&blob()).is_some());
    // The whole-blob digest did not match: everything published goes.
    assert_eq!(f.release(1, Some("digest mismatch"), 2.0), TrackerResponse::Left);
    assert_eq!(f.s.metainfo(&blob()), None, "a metainfo built from the failed fetch is withdrawn");
    assert_refused(f.get_hashes(0, 2.0), TrackerErrorCode::UnknownBlob, "no piece hashes");
    assert_refused(f.req(TrackerRequest::GetMetainfo { blob: blob() }, 2, 2.0), TrackerErrorCode::UnknownBlob, "");
    assert_eq!(f.s.failure(&blob()), Some("digest mismatch"));
    for (peer, t) in [(1, 2.0), (2, 5.0), (3, 11.99)] {
        assert_eq!(f.acquire(peer, t), LeaseReply::Failed { reason: "digest mismatch".into() });
    }
    assert_eq!(f.s.blob_count(), 1, "the failure alone keeps the blob known");
    f.s.expire(f.at(11.99));
    assert_eq!(f.s.failure(&blob()), Some("digest mismatch"));
    f.s.expire(f.at(12.0));
    assert_eq!(f.s.failure(&blob()), None, "forgotten after failure_memory");
    assert_eq!(f.s.blob_count(), 0);
    assert_eq!(f.acquire(2, 12.0), granted(0), "a fresh fetch from the start");
}

#[test]
fn a_failure_memory_ends_even_without_expiry_runs() {
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.publish(1, 4, 0, hashes(0..2), 1.0), TrackerResponse::Registered);
    assert_eq!(f.release(1, Some("upstream said 500"), 2.0), TrackerResponse::Left);
    assert_eq!(f.acquire(1, 11.9), LeaseReply::Failed { reason: "upstream said 500".into() });
    assert_eq!(f.acquire(1, 12.0), granted(0), "the partial hashes were dropped");
}

#[test]
fn a_failed_release_keeps_a_metainfo_a_seed_registered() {
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.publish(1, 4, 0, hashes(0..2), 1.0), TrackerResponse::Registered);
    // Meanwhile a seed registers the blob (consistent with the published prefix).
    assert_eq!(f.req(TrackerRequest::Register { metainfo: metainfo(4) }, 9, 1.5), TrackerResponse::Registered);
    assert_eq!(f.get_hashes(0, 1.5), hashes_reply(4, 0, 0..4, true));
    assert_eq!(f.release(1, Some("connection reset"), 2.0), TrackerResponse::Left);
    assert_eq!(f.s.metainfo(&blob()), Some(&metainfo(4)));
    assert_eq!(f.acquire(2, 2.0), LeaseReply::NotNeeded);

    // The same once the metainfo came from published hashes and a seed vouched for it.
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.publish(1, 4, 0, hashes(0..4), 1.0), TrackerResponse::Registered);
    assert_eq!(f.req(TrackerRequest::Register { metainfo: metainfo(4) }, 9, 1.5), TrackerResponse::Registered);
    assert_eq!(f.release(1, Some("digest mismatch"), 2.0), TrackerResponse::Left);
    assert_eq!(f.s.metainfo(&blob()), Some(&metainfo(4)));
}

#[test]
fn a_registration_contradicting_published_hashes_is_a_conflict() {
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.publish(1, 4, 0, hashes(0..2), 1.0), TrackerResponse::Registered);
    let mut other = metainfo(4);
    other.piece_hashes[1] = [0; 32];
    assert!(matches!(f.s.register(other), Err(TrackerError::HashConflict { piece: 1, .. })));
    let mut longer = metainfo(5);
    longer.digest = blob();
    assert!(matches!(f.s.register(longer), Err(TrackerError::LayoutConflict { .. })));
    assert_eq!(f.get_hashes(0, 1.0), hashes_reply(4, 0, 0..2, false));
    // The holder's own later publishes check against a metainfo registered meanwhile.
    f.s.register(metainfo(4)).expect("consistent");
    assert_eq!(f.publish(1, 4, 2, hashes(2..4), 2.0), TrackerResponse::Registered);
    assert_refused(f.publish(1, 4, 3, vec![[0; 32]], 2.0), TrackerErrorCode::Conflict, "piece 3");
}

#[test]
fn get_hashes_answers_windows_of_the_known_prefix() {
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.publish(1, 10, 0, hashes(0..4), 1.0), TrackerResponse::Registered);
    assert_eq!(f.get_hashes(0, 1.0), hashes_reply(10, 0, 0..4, false));
    assert_eq!(f.get_hashes(3, 1.0), hashes_reply(10, 3, 3..4, false));
    assert_eq!(f.get_hashes(4, 1.0), hashes_reply(10, 4, 4..4, false), "at the end of the prefix: empty");
    assert_eq!(f.get_hashes(9, 1.0), hashes_reply(10, 9, 9..9, false));
    assert_eq!(f.get_hashes(u32::MAX, 1.0), hashes_reply(10, u32::MAX, 0..0, false));
    // A poller reading incrementally.
    assert_eq!(f.publish(1, 10, 4, hashes(4..7), 1.2), TrackerResponse::Registered);
    assert_eq!(f.get_hashes(4, 1.2), hashes_reply(10, 4, 4..7, false));
    assert_eq!(f.publish(1, 10, 7, hashes(7..10), 1.4), TrackerResponse::Registered);
    assert_eq!(f.get_hashes(7, 1.4), hashes_reply(10, 7, 7..10, true));
}

/// `(first, hashes.len(), complete)` of a `Hashes` reply, checking that the hashes
/// are the expected ones (without printing thousands of them on failure).
#[track_caller]
fn window(response: &TrackerResponse, pieces: u32) -> (u32, usize, bool) {
    match response {
        TrackerResponse::Hashes { layout: l, first, hashes: got, complete } => {
            assert_eq!(*l, layout(pieces));
            let expected = (*first..*first + got.len() as u32).map(h);
            assert!(got.iter().copied().eq(expected), "hashes from {first} are not the published ones");
            (*first, got.len(), *complete)
        }
        other => panic!("expected hashes, got {other:?}"),
    }
}

#[test]
fn get_hashes_caps_each_reply() {
    let max = MAX_HASHES_PER_REPLY;
    let pieces = max + 4_464;
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.publish(1, pieces, 0, hashes(0..69_000), 1.0), TrackerResponse::Registered);
    assert_eq!(window(&f.get_hashes(0, 1.0), pieces), (0, max as usize, false));
    assert_eq!(window(&f.get_hashes(10, 1.0), pieces), (10, max as usize, false));
    assert_eq!(window(&f.get_hashes(max, 1.0), pieces), (max, 69_000 - max as usize, false));
    assert_eq!(f.publish(1, pieces, 69_000, hashes(69_000..pieces), 1.5), TrackerResponse::Registered);
    assert_eq!(window(&f.get_hashes(0, 1.5), pieces), (0, max as usize, true), "complete though cut");
    assert_eq!(window(&f.get_hashes(max, 1.5), pieces), (max, 4_464, true));
    let encoded = swarm_proto::codec::encode_frame(&f.get_hashes(0, 1.5)).expect("encode");
    assert!(encoded.len() <= swarm_proto::codec::MAX_FRAME_LEN, "a full reply fits a frame");
}

#[test]
fn get_hashes_answers_a_seeded_blob_from_its_metainfo() {
    let mut f = Fixture::new();
    assert_refused(f.get_hashes(0, 0.0), TrackerErrorCode::UnknownBlob, "no piece hashes");
    f.s.register(metainfo(3)).expect("register");
    assert_eq!(f.get_hashes(0, 0.0), hashes_reply(3, 0, 0..3, true));
    assert_eq!(f.get_hashes(1, 0.0), hashes_reply(3, 1, 1..3, true));
    assert_eq!(f.get_hashes(3, 0.0), hashes_reply(3, 3, 3..3, true));
    // Peers announcing a blob nobody registered or publishes: still unknown.
    let ann = Announce {
        peer_id: pid(5),
        blob: Digest::of(b"announced only"),
        listen_port: 7000,
        advertise: None,
        zone: String::new(),
        have: 0,
        complete: false,
        num_want: 10,
    };
    f.s.announce(&ann, seen(5), f.at(0.0)).expect("announce");
    assert_refused(
        f.req(TrackerRequest::GetHashes { blob: ann.blob, first: 0 }, 5, 0.0),
        TrackerErrorCode::UnknownBlob,
        "no piece hashes",
    );
}

#[test]
fn failure_reasons_are_bounded() {
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    let long = "é".repeat(MAX_FAILURE_REASON_LEN); // two bytes each
    assert_eq!(f.release(1, Some(&long), 1.0), TrackerResponse::Left);
    match f.acquire(2, 1.0) {
        LeaseReply::Failed { reason } => {
            assert_eq!(reason.len(), MAX_FAILURE_REASON_LEN);
            assert!(reason.chars().all(|c| c == 'é'));
        }
        other => panic!("expected Failed, got {other:?}"),
    }
}

#[test]
fn partial_hashes_live_as_long_as_a_lease_or_peers() {
    let mut f = Fixture::new();
    let ann = |peer: u8| Announce {
        peer_id: pid(peer),
        blob: blob(),
        listen_port: 7000,
        advertise: None,
        zone: String::new(),
        have: 0,
        complete: false,
        num_want: 10,
    };
    assert_eq!(f.acquire(1, 0.0), granted(0));
    assert_eq!(f.publish(1, 8, 0, hashes(0..3), 1.0), TrackerResponse::Registered);
    // The lease is live: expiry keeps everything.
    f.s.expire(f.at(5.0));
    assert_eq!(f.holder(5.0), Some((pid(1), LeaseState::Live)));
    // A swarming peer keeps the partial (and the dead lease record, so the move is
    // known) after the holder went silent.
    f.s.announce(&ann(2), seen(2), f.at(6.0)).expect("announce");
    f.s.expire(f.at(20.0));
    assert_eq!(f.holder(20.0), Some((pid(1), LeaseState::Expired)));
    assert_eq!(f.get_hashes(0, 20.0), hashes_reply(8, 0, 0..3, false));
    assert_eq!(f.acquire(2, 21.0), granted(3));
    // The second holder and the peer both vanish: the lease (dead) and the partial go.
    f.s.expire(f.at(200.0));
    assert_eq!(f.s.peer_count(&blob()), 0);
    assert_eq!(f.s.lease_status(&blob(), f.at(200.0)), None);
    assert_eq!(f.s.blob_count(), 0);
    assert_eq!(f.acquire(3, 201.0), granted(0));

    // A lease alone, nothing published, holder gone: the blob goes too.
    let mut f = Fixture::new();
    assert_eq!(f.acquire(1, 0.0), granted(0));
    f.s.expire(f.at(9.0));
    assert_eq!(f.s.blob_count(), 1);
    f.s.expire(f.at(10.0));
    assert_eq!(f.s.blob_count(), 0);
}

#[test]
fn handle_answers_every_lease_request_kind_on_the_wire() {
    let mut f = Fixture::new();
    let config = TrackerConfig { lease_ttl: Duration::from_millis(1500), ..TrackerConfig::default() };
    f.s = TrackerState::new(config, 1);
    assert_eq!(f.acquire(1, 0.0), LeaseReply::Granted { ttl_secs: 1, resume_from: 0 }, "whole seconds, rounded down");
    let config = TrackerConfig { lease_ttl: Duration::from_millis(100), ..TrackerConfig::default() };
    f.s = TrackerState::new(config, 1);
    assert_eq!(f.acquire(1, 0.0), LeaseReply::Granted { ttl_secs: 1, resume_from: 0 }, "at least one second");
    assert_eq!(f.publish(1, 2, 0, hashes(0..1), 0.05), TrackerResponse::Registered);
    assert_eq!(f.get_hashes(0, 0.05), hashes_reply(2, 0, 0..1, false));
    assert_eq!(f.release(1, None, 0.06), TrackerResponse::Left);
    assert_eq!(
        f.req(TrackerRequest::ReleaseLease { peer_id: pid(2), blob: blob(), failed: None }, 2, 0.07),
        TrackerResponse::Left
    );
}

/// The same requests at the same instants give the same answers, whatever the RNG
/// seed (the lease logic draws no randomness) and however often it is replayed. The
/// script makes holders publish, go silent (so leases move), fail and release.
#[test]
fn leases_are_deterministic() {
    let ann = |peer: u8| Announce {
        peer_id: pid(peer),
        blob: blob(),
        listen_port: 7000,
        advertise: None,
        zone: String::new(),
        have: 0,
        complete: false,
        num_want: 10,
    };
    let run = |seed: u64| -> Vec<TrackerResponse> {
        let mut f = Fixture::new();
        f.s = TrackerState::new(TrackerConfig::default(), seed);
        let mut out = Vec::new();
        for step in 0..600u32 {
            let t = f64::from(step) * 0.7;
            let asker = (step % 5) as u8 + 1;
            let holder = f.s.lease_status(&blob(), f.at(t)).map(|l| l.holder.0[0]);
            let response = match step % 7 {
                0 | 3 => TrackerResponse::Lease(f.acquire(asker, t)),
                // The holder publishes during 30 steps of every 50, then goes silent.
                1 | 4 if step % 50 < 30 => {
                    let known = f.s.hashes(&blob()).map_or(0, |(_, h, _)| h.len() as u32);
                    let first = known.saturating_sub(step % 3);
                    let end = (first + step % 6).min(16);
                    f.publish(holder.unwrap_or(asker), 16, first, hashes(first..end), t)
                }
                2 => f.get_hashes(step % 20, t),
                5 if step % 4 == 1 => f.release(holder.unwrap_or(asker), (step % 5 == 0).then_some("flaky"), t),
                // A swarming peer keeps the partial hashes alive for 80 steps of 100.
                _ if step % 100 < 80 => f.req(TrackerRequest::Announce(ann(9)), 9, t),
                _ => {
                    f.s.expire(f.at(t));
                    TrackerResponse::Left
                }
            };
            out.push(response);
        }
        out
    };
    let a = run(1);
    assert!(a == run(1) && a == run(2), "replays differ");
    let count = |p: &dyn Fn(&TrackerResponse) -> bool| a.iter().filter(|r| p(r)).count();
    let resumed = count(&|r| matches!(r, TrackerResponse::Lease(LeaseReply::Granted { resume_from: 1.., .. })));
    let held = count(&|r| matches!(r, TrackerResponse::Lease(LeaseReply::HeldBy { .. })));
    let failed = count(&|r| matches!(r, TrackerResponse::Lease(LeaseReply::Failed { .. })));
    let complete = count(&|r| matches!(r, TrackerResponse::Hashes { complete: true, .. }));
    assert!(resumed > 0 && held > 0 && failed > 0 && complete > 0, "{resumed} {held} {failed} {complete}");
}

#[test]
fn a_holder_publishing_from_piece_0_re_asserts_a_lease_nobody_holds() {
    let mut f = Fixture::new();
    // A restarted tracker knows nothing: the holder's publish from piece 0 makes it
    // the holder again, and nobody else gets a second lease.
    assert_eq!(f.publish(1, 4, 0, hashes(0..2), 0.0), TrackerResponse::Registered);
    assert_eq!(f.holder(0.0), Some((pid(1), LeaseState::Live)));
    assert_eq!(f.acquire(2, 0.5), LeaseReply::HeldBy { holder: pid(1) });
    assert_eq!(f.get_hashes(0, 0.5), hashes_reply(4, 0, 0..2, false));
    // Its lease lapsed while it could not reach the tracker: it re-asserts it too.
    let later = 0.5 + 11.0;
    assert_eq!(f.holder(later).map(|h| h.1), Some(LeaseState::Expired));
    assert_eq!(f.publish(1, 4, 0, hashes(0..3), later), TrackerResponse::Registered);
    assert_eq!(f.holder(later), Some((pid(1), LeaseState::Live)));
    // Another node's live lease is never taken this way.
    assert_refused(f.publish(2, 4, 0, hashes(0..3), later), TrackerErrorCode::Invalid, "not the lease holder");
    // A failure remembered blocks a re-assert as it blocks a grant.
    assert_eq!(f.release(1, Some("401"), later + 1.0), TrackerResponse::Left);
    assert_refused(f.publish(3, 4, 0, hashes(0..1), later + 2.0), TrackerErrorCode::Invalid, "not the lease holder");
}
