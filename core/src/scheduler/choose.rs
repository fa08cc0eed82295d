//! Choosing which of the tracker's candidates to connect to.

use rand::Rng;
use rand::seq::SliceRandom;

/// A peer the tracker offered, as far as connection choice cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The candidate announced the same zone (rack, site) as we did.
    pub same_zone: bool,
    /// How many pieces the candidate announced.
    pub have: u32,
    /// The candidate holds the whole blob.
    pub complete: bool,
}

impl Candidate {
    /// Lower is better: same zone first, then peers that hold something.
    fn class(&self) -> u8 {
        let empty = self.have == 0 && !self.complete;
        (u8::from(!self.same_zone) << 1) | u8::from(empty)
    }
}

/// Picks up to `slots` candidates to connect to and returns their indices, best first.
///
/// Classes, in order: same zone with pieces, same zone without, other zone with
/// pieces, other zone without. Within a class the order is random (from `rng`), so
/// a thousand nodes handed the same list by the tracker do not all pile onto the
/// same first few peers (or the one seed).
pub fn choose_peers<R: Rng + ?Sized>(candidates: &[Candidate], slots: usize, rng: &mut R) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.shuffle(rng);
    // Stable: keeps the random order inside each class.
    order.sort_by_key(|&i| candidates[i].class());
    order.truncate(slots);
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn c(same_zone: bool, have: u32, complete: bool) -> Candidate {
        Candidate { same_zone, have, complete }
    }

    #[test]
    fn classes_in_order_and_random_inside() {
        let cands = vec![
            c(false, 0, false), // 0: other zone, empty
            c(false, 5, false), // 1: other zone, pieces
            c(true, 0, false),  // 2: same zone, empty
            c(true, 9, true),   // 3: same zone, pieces
            c(true, 1, false),  // 4: same zone, pieces
            c(false, 9, true),  // 5: other zone, pieces
        ];
        let mut seen_first = std::collections::HashSet::new();
        for seed in 0..64 {
            let got = choose_peers(&cands, 10, &mut StdRng::seed_from_u64(seed));
            assert_eq!(got.len(), 6);
            let mut first_two = got[..2].to_vec();
            first_two.sort();
            assert_eq!(first_two, vec![3, 4]);
            assert_eq!(got[2], 2);
            let mut next_two = got[3..5].to_vec();
            next_two.sort();
            assert_eq!(next_two, vec![1, 5]);
            assert_eq!(got[5], 0);
            seen_first.insert(got[0]);
            // Deterministic for a seed.
            assert_eq!(got, choose_peers(&cands, 10, &mut StdRng::seed_from_u64(seed)));
        }
        assert_eq!(seen_first.len(), 2, "both same-zone peers with pieces come first sometimes");
    }

    #[test]
    fn slots_limit_and_empty_input() {
        let cands = vec![c(false, 1, false); 10];
        let got = choose_peers(&cands, 3, &mut StdRng::seed_from_u64(1));
        assert_eq!(got.len(), 3);
        let mut dedup = got.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), 3);
        assert!(choose_peers(&[], 3, &mut StdRng::seed_from_u64(1)).is_empty());
        assert!(choose_peers(&cands, 0, &mut StdRng::seed_from_u64(1)).is_empty());
    }
}
