//! A plain fixed-length bitset over `u64` words, least significant bit first.
//!
//! The scheduler keeps its piece sets (needed, orphans, each peer's
//! pieces) in this form so that "which of these pieces does that peer have" is a
//! word-wise AND: 64 pieces per instruction instead of one lookup per piece.

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Words {
    words: Vec<u64>,
    len: u32,
}

impl Words {
    /// An empty set able to hold indices `0..len`.
    pub(super) fn new(len: u32) -> Self {
        Self { words: vec![0; (len as usize).div_ceil(64)], len }
    }

    /// Whether `i` is in the set (false when out of range).
    pub(super) fn get(&self, i: u32) -> bool {
        i < self.len && (self.words[i as usize / 64] >> (i % 64)) & 1 == 1
    }

    /// Adds `i`; returns whether it was newly added (false when present or out of range).
    pub(super) fn insert(&mut self, i: u32) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[i as usize / 64];
        let bit = 1u64 << (i % 64);
        let added = *w & bit == 0;
        *w |= bit;
        added
    }

    /// Removes `i`; returns whether it was present.
    pub(super) fn remove(&mut self, i: u32) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[i as usize / 64];
        let bit = 1u64 << (i % 64);
        let present = *w & bit != 0;
        *w &= !bit;
        present
    }

    /// The raw words (bits past the length are always zero).
    pub(super) fn words(&self) -> &[u64] {
        &self.words
    }

    /// Number of members.
    pub(super) fn count(&self) -> u32 {
        self.words.iter().map(|w| w.count_ones()).sum()
    }

    /// Members, ascending.
    pub(super) fn ones(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| BitIter(w).map(move |b| (wi * 64) as u32 + b))
    }
}

/// Iterates the set bit positions of one word, lowest first.
pub(super) struct BitIter(pub(super) u64);

impl Iterator for BitIter {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_iterate() {
        let mut w = Words::new(130);
        assert!(w.insert(0) && w.insert(64) && w.insert(129));
        assert!(!w.insert(129));
        assert!(!w.insert(130), "out of range is refused");
        assert!(w.get(64) && !w.get(65) && !w.get(1000));
        assert_eq!(w.ones().collect::<Vec<_>>(), vec![0, 64, 129]);
        assert_eq!(w.count(), 3);
        assert!(w.remove(64) && !w.remove(64) && !w.remove(4000));
        assert_eq!(w.ones().collect::<Vec<_>>(), vec![0, 129]);
    }
}
