//! The scheduler's peers by key, in key order.
//!
//! Two parallel vectors: the keys, in order, and the peers' states beside them. A
//! swarm has tens to hundreds of peers and every `Have` looks one up, so a lookup
//! that touches as few cache lines as possible matters more than cheap insertion.
//! Keys are handed out in increasing order (the swarm counts them), so a new peer
//! goes at the end and a key sits at most `key - first key` places in: that place
//! is looked at first, and usually holds it (one cache line instead of a binary
//! search's several); only after removals does a binary search below it follow.

use super::PeerKey;

#[derive(Debug)]
pub(super) struct PeerMap<V> {
    keys: Vec<PeerKey>,
    values: Vec<V>,
}

impl<V> Default for PeerMap<V> {
    fn default() -> Self {
        Self { keys: Vec::new(), values: Vec::new() }
    }
}

impl<V> PeerMap<V> {
    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Where `key` is (`Ok`) or would go (`Err`), as `binary_search` answers.
    fn position(&self, key: &PeerKey) -> Result<usize, usize> {
        let Some(first) = self.keys.first() else { return Err(0) };
        let Some(offset) = key.0.checked_sub(first.0) else { return Err(0) };
        let guess = usize::try_from(offset).unwrap_or(usize::MAX).min(self.keys.len() - 1);
        match self.keys[guess].cmp(key) {
            std::cmp::Ordering::Equal => Ok(guess),
            std::cmp::Ordering::Less => Err(guess + 1),
            std::cmp::Ordering::Greater => self.keys[..guess].binary_search(key),
        }
    }

    pub(super) fn contains_key(&self, key: &PeerKey) -> bool {
        self.position(key).is_ok()
    }

    pub(super) fn get(&self, key: &PeerKey) -> Option<&V> {
        self.position(key).ok().map(|i| &self.values[i])
    }

    pub(super) fn get_mut(&mut self, key: &PeerKey) -> Option<&mut V> {
        self.position(key).ok().map(|i| &mut self.values[i])
    }

    /// Inserts or replaces; returns the value replaced.
    pub(super) fn insert(&mut self, key: PeerKey, value: V) -> Option<V> {
        match self.position(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.values[i], value)),
            Err(i) => {
                self.keys.insert(i, key);
                self.values.insert(i, value);
                None
            }
        }
    }

    pub(super) fn remove(&mut self, key: &PeerKey) -> Option<V> {
        let i = self.position(key).ok()?;
        self.keys.remove(i);
        Some(self.values.remove(i))
    }

    /// Entries in key order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&PeerKey, &V)> {
        self.keys.iter().zip(&self.values)
    }

    /// Entries in key order, values mutable.
    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (&PeerKey, &mut V)> {
        self.keys.iter().zip(&mut self.values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_an_ordered_map() {
        let mut m = PeerMap::default();
        let mut reference = std::collections::BTreeMap::new();
        for (i, k) in [5u64, 1, 9, 5, 3, 1, 7].into_iter().enumerate() {
            assert_eq!(m.insert(PeerKey(k), i), reference.insert(PeerKey(k), i));
        }
        assert_eq!(m.remove(&PeerKey(9)), reference.remove(&PeerKey(9)));
        assert_eq!(m.remove(&PeerKey(4)), None);
        *m.get_mut(&PeerKey(3)).expect("present") += 10;
        *reference.get_mut(&PeerKey(3)).expect("present") += 10;
        assert_eq!(m.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(), reference.into_iter().collect::<Vec<_>>());
        assert_eq!(m.len(), 4);
        assert!(m.contains_key(&PeerKey(7)) && !m.contains_key(&PeerKey(9)));
        assert_eq!(m.get(&PeerKey(1)), Some(&5));
    }

    proptest::proptest! {
        /// Any mix of inserts, removals and lookups answers as an ordered map does,
        /// whatever gaps the removals leave before the guessed place.
        #[test]
        fn lookups_agree_with_an_ordered_map(ops in proptest::collection::vec((0u8..3, 0u64..200), 0..400)) {
            let mut m = PeerMap::default();
            let mut reference = std::collections::BTreeMap::new();
            for (op, k) in ops {
                let key = PeerKey(k);
                match op {
                    0 => proptest::prop_assert_eq!(m.insert(key, k), reference.insert(key, k)),
                    1 => proptest::prop_assert_eq!(m.remove(&key), reference.remove(&key)),
                    _ => proptest::prop_assert_eq!(m.get(&key), reference.get(&key)),
                }
                for probe in 0..201 {
                    proptest::prop_assert_eq!(m.contains_key(&PeerKey(probe)), reference.contains_key(&PeerKey(probe)));
                }
            }
            proptest::prop_assert_eq!(m.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(), reference.into_iter().collect::<Vec<_>>());
        }
    }
}
