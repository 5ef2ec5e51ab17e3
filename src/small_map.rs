//! A map for the few entries that a console or a shell session holds (its
//! running commands, its attached channels), sized for them.
//!
//! Every idle shell holds one of each, and most hold one entry. A
//! `HashMap`'s first allocation has room for three or four entries and a
//! `BTreeMap`'s for eleven: 372 to 632 bytes an idle shell for one entry
//! here. This one grows one entry at a time up to four, and gives its
//! memory back once empty. Entries are found by a walk in order: a console
//! runs at most `MAX_COMMANDS` commands, and a session's viewers are few.

/// Entries by key, in the order they were first inserted.
pub(crate) struct SmallMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        SmallMap(Vec::new())
    }
}

impl<K: PartialEq, V> SmallMap<K, V> {
    fn at(&self, key: &K) -> Option<usize> {
        self.0.iter().position(|(k, _)| k == key)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn contains_key(&self, key: &K) -> bool {
        self.at(key).is_some()
    }

    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        self.at(key).map(|i| &self.0[i].1)
    }

    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.at(key).map(|i| &mut self.0[i].1)
    }

    /// Inserts `value` under `key`, returning the value it replaced.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        if let Some(i) = self.at(&key) {
            return Some(std::mem::replace(&mut self.0[i].1, value));
        }
        if self.0.len() == self.0.capacity() && self.0.len() < 4 {
            self.0.reserve_exact(1);
        }
        self.0.push((key, value));
        None
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let value = self.at(key).map(|i| self.0.remove(i).1);
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
        value
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&K, &mut V)> {
        self.0.iter_mut().map(|(k, v)| (&*k, v))
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.0.iter_mut().map(|(_, v)| v)
    }

    /// Takes every entry out, the memory with them.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (K, V)> + use<K, V> {
        std::mem::take(&mut self.0).into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::SmallMap;

    #[test]
    fn keys_map_to_their_values_and_room_grows_one_at_a_time() {
        let mut map = SmallMap::default();
        assert_eq!(map.insert(7, "a"), None);
        assert_eq!(map.0.capacity(), 1, "one entry, room for one");
        assert_eq!(map.insert(3, "b"), None);
        assert_eq!(map.insert(7, "c"), Some("a"), "a key is there once");
        assert_eq!(map.len(), 2);
        assert_eq!(map.get(&7), Some(&"c"));
        assert!(map.contains_key(&3) && !map.contains_key(&4));
        *map.get_mut(&3).unwrap() = "d";
        assert_eq!(map.iter().collect::<Vec<_>>(), [(&7, &"c"), (&3, &"d")]);
        assert_eq!(map.remove(&7), Some("c"));
        assert_eq!(map.remove(&7), None);
        assert_eq!(map.remove(&3), Some("d"));
        assert_eq!(map.0.capacity(), 0, "empty, its memory given back");
        map.insert(1, "e");
        assert_eq!(map.drain().collect::<Vec<_>>(), [(1, "e")]);
        assert_eq!((map.len(), map.0.capacity()), (0, 0));
    }
}
