//! A plain fixed-length bitset over `u64` words, least significant bit first.
//!
//! The scheduler keeps its piece sets (needed, orphans, each peer's
//! pieces) in this form so that "which of these pieces does that peer have" is a
//! word-wise AND: 64 pieces per instruction instead of one lookup per piece.

/// Words kept inside the set itself: 1,024 pieces, a 1 GiB blob of 1 MiB pieces.
/// Every `Have` tests and sets a bit of the sending peer's set; with the words inline
/// the bit's address follows from the peer's state without loading a pointer first,
/// so the two cache misses of a large swarm overlap instead of queueing.
const INLINE_WORDS: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Store {
    Inline([u64; INLINE_WORDS]),
    Heap(Vec<u64>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Words {
    store: Store,
    len: u32,
}

impl Default for Words {
    fn default() -> Self {
        Self::new(0)
    }
}

impl Words {
    /// An empty set able to hold indices `0..len`.
    pub(super) fn new(len: u32) -> Self {
        let n = (len as usize).div_ceil(64);
        let store = if n <= INLINE_WORDS { Store::Inline([0; INLINE_WORDS]) } else { Store::Heap(vec![0; n]) };
        Self { store, len }
    }

    /// The word holding `i` (which must be below `len`).
    fn word_mut(&mut self, i: u32) -> &mut u64 {
        match &mut self.store {
            Store::Inline(a) => &mut a[i as usize / 64],
            Store::Heap(v) => &mut v[i as usize / 64],
        }
    }

    /// Whether `i` is in the set (false when out of range).
    pub(super) fn get(&self, i: u32) -> bool {
        if i >= self.len {
            return false;
        }
        let w = match &self.store {
            Store::Inline(a) => a[i as usize / 64],
            Store::Heap(v) => v[i as usize / 64],
        };
        (w >> (i % 64)) & 1 == 1
    }

    /// Adds `i`; returns whether it was newly added (false when present or out of range).
    pub(super) fn insert(&mut self, i: u32) -> bool {
        if i >= self.len {
            return false;
        }
        let w = self.word_mut(i);
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
        let w = self.word_mut(i);
        let bit = 1u64 << (i % 64);
        let present = *w & bit != 0;
        *w &= !bit;
        present
    }

    /// The raw words (bits past the length are always zero).
    pub(super) fn words(&self) -> &[u64] {
        match &self.store {
            Store::Inline(a) => &a[..(self.len as usize).div_ceil(64)],
            Store::Heap(v) => v,
        }
    }

    /// Number of members.
    pub(super) fn count(&self) -> u32 {
        self.words().iter().map(|w| w.count_ones()).sum()
    }

    /// Members, ascending.
    pub(super) fn ones(&self) -> impl Iterator<Item = u32> + '_ {
        self.words().iter().enumerate().flat_map(|(wi, &w)| BitIter(w).map(move |b| (wi * 64) as u32 + b))
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
        for len in [130, 5000] {
            insert_remove_iterate_with(len);
        }
    }

    fn insert_remove_iterate_with(len: u32) {
        let mut w = Words::new(len);
        assert!(w.insert(0) && w.insert(64) && w.insert(129));
        assert!(!w.insert(129));
        assert!(!w.insert(len), "out of range is refused");
        assert!(w.get(64) && !w.get(65) && !w.get(len + 1));
        assert_eq!(w.ones().collect::<Vec<_>>(), vec![0, 64, 129]);
        assert_eq!(w.count(), 3);
        assert!(w.remove(64) && !w.remove(64) && !w.remove(len + 3));
        assert_eq!(w.words().len(), (len as usize).div_ceil(64));
        assert_eq!(w.ones().collect::<Vec<_>>(), vec![0, 129]);
    }
}
