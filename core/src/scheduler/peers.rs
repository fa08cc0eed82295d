//! The scheduler's peers by key, in key order.
//!
//! Two parallel vectors: the keys, found by binary search, and the peers' states
//! beside them. A swarm has tens of peers and `Have`s look one up each time, so a
//! lookup that stays within a few cache lines of one array matters more than cheap
//! insertion (keys only grow, so a new peer almost always goes at the end).

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

    pub(super) fn contains_key(&self, key: &PeerKey) -> bool {
        self.keys.binary_search(key).is_ok()
    }

    pub(super) fn get(&self, key: &PeerKey) -> Option<&V> {
        self.keys.binary_search(key).ok().map(|i| &self.values[i])
    }

    pub(super) fn get_mut(&mut self, key: &PeerKey) -> Option<&mut V> {
        self.keys.binary_search(key).ok().map(|i| &mut self.values[i])
    }

    /// Inserts or replaces; returns the value replaced.
    pub(super) fn insert(&mut self, key: PeerKey, value: V) -> Option<V> {
        match self.keys.binary_search(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.values[i], value)),
            Err(i) => {
                self.keys.insert(i, key);
                self.values.insert(i, value);
                None
            }
        }
    }

    pub(super) fn remove(&mut self, key: &PeerKey) -> Option<V> {
        let i = self.keys.binary_search(key).ok()?;
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
}
