//! The cluster-wide uplink cap (`swarm tracker --uplink-cap`): how the tracker that
//! owns the cap divides it among the nodes fetching from the upstream registry.
//!
//! Every lease holder fetching a blob from upstream asks for its share when the fetch
//! starts and then every [`SHARE_RENEW`] (`UplinkShare { fetching: true }`), and says
//! when it stops (`fetching: false`). A holder not heard from for [`SHARE_SILENCE`] is
//! counted out: its share returns to the others. The holders' own token buckets
//! (`crate::rate`) keep each to its share; they keep the last share they were given
//! while no tracker answers.
//!
//! **Division.** With `n` holders active, each one's fair share is `cap / n`. A
//! holder is granted its fair share, but never more than what the others' current
//! grants leave of the cap: a newcomer first gets what is left (possibly nearly
//! nothing, [`MIN_SHARE`]) while the others still run at their former, larger
//! shares; they drop to the new fair share on their next renewal, and the newcomer
//! rises to it on its own next renewal. So the grants in force never add up to more
//! than the cap (plus [`MIN_SHARE`] per starved holder), and shares are re-divided
//! within two renewals (1 s) of a fetch starting or ending.
//!
//! A tracker without a cap answers "uncapped" and asks again only every
//! [`UNCAPPED_RENEW`] (in case a tracker with a cap takes over). Sans-IO: callers
//! pass `now`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use swarm_proto::{Digest, PeerId};

/// How often a holder renews its share while a cap is in force.
pub const SHARE_RENEW: Duration = Duration::from_millis(500);
/// A holder not heard from for this long (three renewals) is counted out.
pub const SHARE_SILENCE: Duration = Duration::from_millis(1500);
/// How often a holder asks again when the answer was "uncapped".
pub const UNCAPPED_RENEW: Duration = Duration::from_secs(5);
/// The least share granted (bytes per second): a holder starved while the others
/// still run at their former shares is almost paused, never uncapped.
pub const MIN_SHARE: u64 = 1;

/// A holder's share of the cap, as told to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    /// Bytes per second; `None`: no cap.
    pub bytes_per_sec: Option<u64>,
    /// When to ask again.
    pub renew: Duration,
}

#[derive(Clone, Copy, Debug)]
struct Holder {
    heard: Instant,
    granted: u64,
}

/// The holders of the cap and their grants.
#[derive(Clone, Debug, Default)]
pub struct UplinkShares {
    /// Bytes per second for the whole cluster; `None`: no cap.
    cap: Option<u64>,
    holders: BTreeMap<(PeerId, Digest), Holder>,
}

impl UplinkShares {
    /// A cap of `cap` bytes per second (`None`: none) with no holder yet.
    pub fn new(cap: Option<u64>) -> Self {
        Self { cap: cap.map(|c| c.max(1)), holders: BTreeMap::new() }
    }

    /// The cap, in bytes per second.
    pub fn cap(&self) -> Option<u64> {
        self.cap
    }

    /// A holder's request: `fetching` from `now` on (its share, see the module docs),
    /// or done fetching (its share is freed; the answer is "uncapped", unused).
    pub fn report(&mut self, peer: PeerId, blob: Digest, fetching: bool, now: Instant) -> Share {
        let key = (peer, blob);
        let Some(cap) = self.cap else {
            self.holders.clear();
            return Share { bytes_per_sec: None, renew: UNCAPPED_RENEW };
        };
        if !fetching {
            self.holders.remove(&key);
            return Share { bytes_per_sec: None, renew: SHARE_RENEW };
        }
        self.expire(now);
        let n = self.holders.len() as u64 + u64::from(!self.holders.contains_key(&key));
        let fair = cap / n.max(1);
        let others: u64 = self.holders.iter().filter(|(k, _)| **k != key).map(|(_, h)| h.granted).sum();
        let granted = fair.min(cap.saturating_sub(others)).max(MIN_SHARE);
        self.holders.insert(key, Holder { heard: now, granted });
        Share { bytes_per_sec: Some(granted), renew: SHARE_RENEW }
    }

    /// Counts out the holders silent for [`SHARE_SILENCE`]; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.holders.len();
        self.holders.retain(|_, h| now.saturating_duration_since(h.heard) < SHARE_SILENCE);
        before - self.holders.len()
    }

    /// Holders counted (heard from within [`SHARE_SILENCE`] of the last expiry).
    pub fn holders(&self) -> usize {
        self.holders.len()
    }

    /// The sum of the grants in force (bytes per second).
    pub fn granted(&self) -> u64 {
        self.holders.values().map(|h| h.granted).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const CAP: u64 = 5_000_000;

    fn peer(n: u8) -> PeerId {
        PeerId([n; 16])
    }

    fn blob(n: u8) -> Digest {
        Digest([n; 32])
    }

    fn rate(s: Share) -> u64 {
        s.bytes_per_sec.expect("capped")
    }

    #[test]
    fn no_cap_means_uncapped_and_rare_renewals() {
        let mut u = UplinkShares::new(None);
        let s = u.report(peer(1), blob(1), true, Instant::now());
        assert_eq!(s, Share { bytes_per_sec: None, renew: UNCAPPED_RENEW });
        assert_eq!(u.holders(), 0);
    }

    #[test]
    fn a_lone_holder_gets_the_whole_cap() {
        let mut u = UplinkShares::new(Some(CAP));
        let s = u.report(peer(1), blob(1), true, Instant::now());
        assert_eq!(s, Share { bytes_per_sec: Some(CAP), renew: SHARE_RENEW });
    }

    /// Holders renewing every 500 ms in turn, with starts and ends: at every moment
    /// the grants in force add up to at most the cap (plus the starved minimum), and
    /// within two renewals of a change each holder runs at its fair share.
    #[test]
    fn starts_and_ends_re_divide_the_cap_without_exceeding_it() {
        let t0 = Instant::now();
        let mut u = UplinkShares::new(Some(CAP));
        let mut in_force: BTreeMap<u8, u64> = BTreeMap::new();
        let step = |u: &mut UplinkShares, in_force: &mut BTreeMap<u8, u64>, active: &[u8], at: Duration| {
            for (i, p) in active.iter().enumerate() {
                let now = t0 + at + MS * (i as u32 * 10);
                let s = u.report(peer(*p), blob(*p), true, now);
                in_force.insert(*p, rate(s));
                let total: u64 = in_force.values().sum();
                assert!(total <= CAP + MIN_SHARE * 4, "at {at:?}: grants in force {in_force:?} exceed the cap");
            }
        };
        // One holder, then a second and a third start.
        step(&mut u, &mut in_force, &[1], Duration::ZERO);
        assert_eq!(in_force[&1], CAP);
        step(&mut u, &mut in_force, &[1, 2], 500 * MS);
        step(&mut u, &mut in_force, &[1, 2], 1000 * MS);
        assert_eq!((in_force[&1], in_force[&2]), (CAP / 2, CAP / 2));
        step(&mut u, &mut in_force, &[3, 1, 2], 1500 * MS);
        assert_eq!(in_force[&3], MIN_SHARE, "the newcomer gets what is left: nothing yet");
        step(&mut u, &mut in_force, &[3, 1, 2], 2000 * MS);
        assert!(in_force.values().all(|r| *r == CAP / 3), "{in_force:?}");
        // Holder 1 ends its fetch: the others get half each at their next renewal.
        u.report(peer(1), blob(1), false, t0 + 2100 * MS);
        in_force.remove(&1);
        step(&mut u, &mut in_force, &[2, 3], 2500 * MS);
        assert_eq!((in_force[&2], in_force[&3]), (CAP / 2, CAP / 2));
    }

    #[test]
    fn a_silent_holder_s_share_returns_to_the_others() {
        let t0 = Instant::now();
        let mut u = UplinkShares::new(Some(CAP));
        u.report(peer(1), blob(1), true, t0);
        u.report(peer(2), blob(2), true, t0 + MS);
        assert_eq!(rate(u.report(peer(1), blob(1), true, t0 + 500 * MS)), CAP / 2);
        // Holder 2 goes silent; holder 1 keeps renewing.
        assert_eq!(rate(u.report(peer(1), blob(1), true, t0 + 1000 * MS)), CAP / 2);
        // Holder 2 was last heard at 1 ms: at 1501 ms it is counted out.
        assert_eq!(rate(u.report(peer(1), blob(1), true, t0 + 1500 * MS)), CAP / 2);
        assert_eq!(rate(u.report(peer(1), blob(1), true, t0 + 2000 * MS)), CAP);
        assert_eq!(u.holders(), 1);
        // Holder 2 comes back: what is left, then its fair share after holder 1 renews.
        assert_eq!(rate(u.report(peer(2), blob(2), true, t0 + 2100 * MS)), MIN_SHARE);
        assert_eq!(rate(u.report(peer(1), blob(1), true, t0 + 2500 * MS)), CAP / 2);
        assert_eq!(rate(u.report(peer(2), blob(2), true, t0 + 2600 * MS)), CAP / 2);
        assert!(u.granted() <= CAP);
    }

    #[test]
    fn two_blobs_on_one_node_are_two_holders() {
        let t0 = Instant::now();
        let mut u = UplinkShares::new(Some(CAP));
        u.report(peer(1), blob(1), true, t0);
        u.report(peer(1), blob(2), true, t0);
        u.report(peer(1), blob(1), true, t0 + 500 * MS);
        assert_eq!(rate(u.report(peer(1), blob(2), true, t0 + 500 * MS)), CAP / 2);
        assert_eq!(u.holders(), 2);
    }
}
