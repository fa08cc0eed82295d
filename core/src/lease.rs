//! How a node gets a blob that nobody in the cluster holds yet: the start-up through
//! the tracker, the upstream lease holder's publishing, and the takeover of a lease
//! whose holder stopped making progress. The daemon's mirror provider
//! (`swarm_peer::agent`) and the simulator both follow these rules; the tracker's
//! side of the lease (grant, expiry, stall) is [`crate::tracker`]'s.
//!
//! # Start-up ([`Startup`])
//!
//! 1. Ask the tracker for the blob's layout and piece hashes. If any node registered
//!    or is publishing them, swarm on them (and, unless every hash is known, watch
//!    for a stalled holder: see takeover).
//! 2. Else ask for the **upstream lease**. `Granted`: this node fetches the blob from
//!    upstream from the piece the tracker names, publishing as it goes. `HeldBy` or
//!    `NotNeeded`: another node is on it; ask for the layout again after
//!    [`LAYOUT_RETRY`]. `Failed`: the last upstream fetch failed; the mirror sends the
//!    client upstream itself.
//! 3. A node that has seen no layout [`LAYOUT_WAIT`] after it started gives up the
//!    same way.
//!
//! # Publishing ([`Publisher`])
//!
//! The holder's peers get each piece's hash with the piece's `Have`
//! ([`crate::swarm`]); the tracker gets a copy for late joiners and version-1 nodes.
//! The upstream fetch never waits for the tracker: the holder publishes in the
//! background, one request at a time, whatever hashes it learned since the last
//! answer, and at least every [`RENEW`] (an empty publish renews the lease). While
//! the tracker does not answer it keeps fetching and retries every
//! [`PUBLISH_RETRY`]; when a tracker refuses a publish that does not start at piece
//! 0 (a restarted tracker knows nothing), it publishes everything from piece 0 again,
//! which re-asserts its lease (the tracker grants a lease nobody holds to the node
//! publishing its hashes from the start). A refusal of that too means another node
//! holds the lease now: the holder stops.
//!
//! # Takeover ([`TakeoverWatch`])
//!
//! A node swarming on a blob still streaming in from another node's upstream fetch
//! watches the holder's progress: the piece hashes it knows, which grow only as the
//! holder hashes new upstream bytes (pieces traded between the others say nothing
//! about the holder, and a request to a dead holder timing out must not count as
//! progress). After [`TAKEOVER_AFTER`] without a new hash, it asks for the lease; the tracker grants it once the holder's
//! lease lapsed, and the node resumes the upstream fetch at its own first missing
//! piece (pieces only the old holder had are gone with it).

use std::time::{Duration, Instant};

pub use crate::node::LAYOUT_RETRY;

/// How long a node waits for another node to publish a blob's layout.
pub const LAYOUT_WAIT: Duration = Duration::from_secs(30);
/// The lease holder publishes at least this often (it renews the lease).
pub const RENEW: Duration = Duration::from_secs(2);
/// A node whose swarm made no progress for this long asks for the lease.
pub const TAKEOVER_AFTER: Duration = Duration::from_secs(12);
/// The holder retries a publish the tracker did not answer after this long.
pub const PUBLISH_RETRY: Duration = Duration::from_secs(1);

/// What a starting node does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartStep {
    /// Swarm on the published layout and hashes; with `watch`, watch for takeover.
    Swarm { watch: bool },
    /// Ask the tracker for the upstream lease.
    AcquireLease,
    /// Fetch from upstream from piece `resume_from`, as the lease holder.
    Lead { resume_from: u32 },
    /// Ask the tracker for the layout again after this pause.
    Retry { after: Duration },
    /// Give up here: the client fetches from upstream itself.
    Unavailable { reason: String },
}

/// A blob's start-up at one node. See the module docs.
#[derive(Clone, Copy, Debug)]
pub struct Startup {
    started: Instant,
}

/// What the tracker said about a blob's layout and hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutReply {
    /// Published: `complete` when every piece's hash is known.
    Published { complete: bool },
    /// Nobody published anything for this blob.
    Unknown,
}

/// What the tracker said to a lease request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseAnswer {
    Granted {
        resume_from: u32,
    },
    /// Another node holds it, or the blob is whole already.
    Elsewhere,
    Failed {
        reason: String,
    },
}

impl From<&swarm_proto::msg::LeaseReply> for LeaseAnswer {
    fn from(r: &swarm_proto::msg::LeaseReply) -> Self {
        use swarm_proto::msg::LeaseReply;
        match r {
            LeaseReply::Granted { resume_from, .. } => Self::Granted { resume_from: *resume_from },
            LeaseReply::HeldBy { .. } | LeaseReply::NotNeeded => Self::Elsewhere,
            LeaseReply::Failed { reason } => Self::Failed { reason: reason.clone() },
        }
    }
}

impl Startup {
    /// A start-up beginning at `now`: its first step is asking for the layout.
    pub fn new(now: Instant) -> Self {
        Self { started: now }
    }

    /// The tracker answered the layout request.
    pub fn layout(&self, reply: LayoutReply) -> StartStep {
        match reply {
            LayoutReply::Published { complete } => StartStep::Swarm { watch: !complete },
            LayoutReply::Unknown => StartStep::AcquireLease,
        }
    }

    /// The tracker answered the lease request at `now`.
    pub fn lease(&self, answer: LeaseAnswer, now: Instant) -> StartStep {
        match answer {
            LeaseAnswer::Granted { resume_from } => StartStep::Lead { resume_from },
            LeaseAnswer::Failed { reason } => StartStep::Unavailable { reason },
            LeaseAnswer::Elsewhere if now.saturating_duration_since(self.started) > LAYOUT_WAIT => {
                StartStep::Unavailable {
                    reason: format!("no layout published within {LAYOUT_WAIT:?} by the node fetching it"),
                }
            }
            LeaseAnswer::Elsewhere => StartStep::Retry { after: LAYOUT_RETRY },
        }
    }
}

/// The lease holder's publishing of piece hashes to the tracker. See the module docs.
#[derive(Clone, Debug)]
pub struct Publisher {
    /// The tracker has the hashes of pieces `0..confirmed`, as far as this node knows.
    confirmed: u32,
    /// This node knows the hashes of pieces `0..known`.
    known: u32,
    /// The publish awaiting an answer: it covers pieces up to this one.
    in_flight: Option<u32>,
    /// When the last publish was sent.
    last: Instant,
    /// No publish before this (after one the tracker did not answer).
    retry_at: Instant,
}

/// A publish to send: the hashes of pieces `first..first + count` (possibly none: a
/// renewal). The driver reads them from its copy of the blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Publish {
    pub first: u32,
    pub count: u32,
}

/// How the tracker answered a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    /// Accepted.
    Ok,
    /// No answer (unreachable, timed out).
    Unreachable,
    /// Refused: this node is not (or no longer) the lease holder there, or the
    /// tracker lacks the earlier hashes.
    Refused,
}

/// What the holder does after a publish's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishStep {
    /// Go on (fetching, and publishing as [`Publisher::poll`] says).
    Continue,
    /// Another node holds the lease: stop the upstream fetch.
    Lost,
}

impl Publisher {
    /// Publishing from piece `from` on (the tracker has the hashes before it),
    /// starting at `now` (the layout was just published).
    pub fn new(from: u32, now: Instant) -> Self {
        Self { confirmed: from, known: from, in_flight: None, last: now, retry_at: now }
    }

    /// This node now knows the hashes of pieces `0..known`.
    pub fn known(&mut self, known: u32) {
        self.known = self.known.max(known);
    }

    /// The tracker has the hashes of pieces `0..confirmed()`, as far as this node knows.
    pub fn confirmed(&self) -> u32 {
        self.confirmed
    }

    /// The publish to send at `now`, if one is due: new hashes, or a renewal.
    pub fn poll(&mut self, now: Instant) -> Option<Publish> {
        if self.in_flight.is_some() || now < self.retry_at {
            return None;
        }
        if self.known <= self.confirmed && now < self.last + RENEW {
            return None;
        }
        let first = self.confirmed.min(self.known);
        self.in_flight = Some(self.known);
        self.last = now;
        Some(Publish { first, count: self.known - first })
    }

    /// The tracker answered the publish in flight.
    pub fn published(&mut self, answer: Published, now: Instant) -> PublishStep {
        let Some(end) = self.in_flight.take() else { return PublishStep::Continue };
        match answer {
            Published::Ok => self.confirmed = self.confirmed.max(end),
            Published::Unreachable => self.retry_at = now + PUBLISH_RETRY,
            // From piece 0 and still refused: somebody else holds the lease.
            Published::Refused if self.confirmed == 0 => return PublishStep::Lost,
            // The tracker may have restarted: everything again, from piece 0.
            Published::Refused => self.confirmed = 0,
        }
        PublishStep::Continue
    }

    /// When [`Publisher::poll`] may have something next (`None`: when the publish
    /// in flight is answered).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.in_flight.is_some() {
            return None;
        }
        let due = if self.known > self.confirmed { self.retry_at } else { self.last + RENEW };
        Some(due.max(self.retry_at))
    }
}

/// A waiting node's watch on a lease holder's progress. See the module docs.
#[derive(Clone, Debug)]
pub struct TakeoverWatch {
    last: u32,
    since: Instant,
}

impl TakeoverWatch {
    /// Watching from `now`, with `known` hashes.
    pub fn new(known: u32, now: Instant) -> Self {
        Self { last: known, since: now }
    }

    /// The swarm knows `known` of `pieces` hashes at `now`: whether to ask for the
    /// lease now.
    pub fn observe(&mut self, known: u32, pieces: u32, now: Instant) -> bool {
        if known != self.last {
            self.last = known;
            self.since = now;
            return false;
        }
        if now.saturating_duration_since(self.since) < TAKEOVER_AFTER || known >= pieces {
            return false;
        }
        self.since = now;
        true
    }

    /// When to look again if nothing moves.
    pub fn poll_timeout(&self) -> Instant {
        self.since + TAKEOVER_AFTER
    }

    /// Where a node granted the lease resumes the upstream fetch: its own first
    /// missing piece, never past what the tracker says is hashed.
    pub fn resume_from(first_missing: Option<u32>, granted: u32) -> u32 {
        first_missing.map_or(granted, |m| m.min(granted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_up_swarms_on_a_layout_else_asks_for_the_lease_else_waits_then_gives_up() {
        let t = Instant::now();
        let s = Startup::new(t);
        assert_eq!(s.layout(LayoutReply::Published { complete: false }), StartStep::Swarm { watch: true });
        assert_eq!(s.layout(LayoutReply::Published { complete: true }), StartStep::Swarm { watch: false });
        assert_eq!(s.layout(LayoutReply::Unknown), StartStep::AcquireLease);
        assert_eq!(s.lease(LeaseAnswer::Granted { resume_from: 3 }, t), StartStep::Lead { resume_from: 3 });
        assert_eq!(s.lease(LeaseAnswer::Elsewhere, t), StartStep::Retry { after: LAYOUT_RETRY });
        assert!(matches!(
            s.lease(LeaseAnswer::Elsewhere, t + LAYOUT_WAIT + Duration::from_millis(1)),
            StartStep::Unavailable { .. }
        ));
        assert_eq!(
            s.lease(LeaseAnswer::Failed { reason: "401".into() }, t),
            StartStep::Unavailable { reason: "401".into() }
        );
    }

    #[test]
    fn the_holder_publishes_what_it_learned_one_request_at_a_time_and_renews_when_idle() {
        let t = Instant::now();
        let mut p = Publisher::new(4, t);
        assert_eq!(p.poll(t), None, "nothing new, renewal not due");
        p.known(5);
        assert_eq!(p.poll(t), Some(Publish { first: 4, count: 1 }));
        p.known(7);
        assert_eq!(p.poll(t), None, "one publish in flight");
        assert_eq!(p.poll_timeout(), None);
        assert_eq!(p.published(Published::Ok, t), PublishStep::Continue);
        assert_eq!(p.poll(t), Some(Publish { first: 5, count: 2 }), "what arrived meanwhile, batched");
        p.published(Published::Ok, t);
        assert_eq!(p.poll_timeout(), Some(t + RENEW));
        assert_eq!(p.poll(t + RENEW - Duration::from_millis(1)), None);
        assert_eq!(p.poll(t + RENEW), Some(Publish { first: 7, count: 0 }), "an empty renewal");
    }

    #[test]
    fn an_unreachable_tracker_never_stops_the_holder_and_a_restarted_one_gets_everything_again() {
        let t = Instant::now();
        let mut p = Publisher::new(0, t);
        p.known(3);
        assert_eq!(p.poll(t), Some(Publish { first: 0, count: 3 }));
        p.published(Published::Ok, t);
        p.known(5);
        assert_eq!(p.poll(t), Some(Publish { first: 3, count: 2 }));
        assert_eq!(p.published(Published::Unreachable, t), PublishStep::Continue);
        assert_eq!(p.poll(t), None, "retry after a pause");
        assert_eq!(p.poll_timeout(), Some(t + PUBLISH_RETRY));
        let back = t + PUBLISH_RETRY;
        assert_eq!(p.poll(back), Some(Publish { first: 3, count: 2 }), "nothing lost");
        // The tracker restarted: it refuses a publish that does not start at 0.
        assert_eq!(p.published(Published::Refused, back), PublishStep::Continue);
        assert_eq!(p.poll(back), Some(Publish { first: 0, count: 5 }), "re-asserts with every hash");
        // Refused from piece 0 too: another node holds the lease.
        assert_eq!(p.published(Published::Refused, back), PublishStep::Lost);
    }

    #[test]
    fn takeover_comes_only_after_a_quiet_spell_and_resumes_at_the_first_missing_piece() {
        let t = Instant::now();
        let mut w = TakeoverWatch::new(2, t);
        assert!(!w.observe(2, 10, t + TAKEOVER_AFTER - Duration::from_millis(1)));
        assert!(!w.observe(3, 10, t + TAKEOVER_AFTER), "a new hash resets the watch");
        let quiet = t + TAKEOVER_AFTER + TAKEOVER_AFTER;
        assert_eq!(w.poll_timeout(), quiet);
        assert!(w.observe(3, 10, quiet));
        assert!(!w.observe(3, 10, quiet), "asks once per quiet spell");
        assert!(!w.observe(10, 10, quiet + TAKEOVER_AFTER * 2), "every hash known: nothing to take over");
        assert_eq!(TakeoverWatch::resume_from(Some(2), 5), 2);
        assert_eq!(TakeoverWatch::resume_from(Some(7), 5), 5);
        assert_eq!(TakeoverWatch::resume_from(None, 5), 5);
    }
}
