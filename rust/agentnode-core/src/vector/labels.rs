//! Per-key labels with interned tenant / namespace / task names, so a filter compares integers
//! while usearch walks the graph.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use super::Filter;

/// What a vector is tagged with; `payload` is opaque to the index (the store puts JSON there).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Label {
    pub tenant: String,
    pub namespace: String,
    pub task: String,
    pub payload: Vec<u8>,
}

/// The filter looks a key up for every node usearch visits; `SipHash`'s resistance to `DoS` buys
/// nothing for keys the store already validated, and a multiplicative hash is several times faster.
#[derive(Default)]
pub(super) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, key: u64) {
        self.0 = (key ^ (key >> 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

pub(super) type KeyMap<V> = HashMap<u64, V, BuildHasherDefault<KeyHasher>>;
/// A set of vector keys, hashed like [`KeyMap`].
pub(super) type KeySet = HashSet<u64, BuildHasherDefault<KeyHasher>>;

/// The labelled fields, in the order an [`Entry`] stores their name ids.
const FIELDS: usize = 3;

#[derive(Debug, Clone)]
struct Entry {
    names: [u32; FIELDS],
    payload: Vec<u8>,
}

#[derive(Debug, Default)]
pub(super) struct Labels {
    names: Vec<String>,
    ids: HashMap<String, u32>,
    entries: KeyMap<Entry>,
    /// Per field, the keys carrying each name id. A filter on a field checks its posting set:
    /// one probe into a set the size of the match (cache-resident for selective filters)
    /// instead of the whole label table, and the set's size is the filter's selectivity.
    postings: [Vec<KeySet>; FIELDS],
}

/// A filter resolved against the interned names: the key sets a key must be in.
pub(super) struct Compiled<'f> {
    /// Posting sets and the caller's key set, smallest first so a miss is found early.
    sets: Vec<&'f KeySet>,
}

impl Compiled<'_> {
    /// Whether `key` passes every set of the filter.
    pub(super) fn accepts(&self, key: u64) -> bool {
        self.sets.iter().all(|set| set.contains(&key))
    }

    /// An upper bound on the keys that pass: the smallest set's size.
    pub(super) fn admitted_at_most(&self) -> usize {
        self.sets.first().map_or(0, |s| s.len())
    }

    /// Every key that passes (the smallest set, checked against the others).
    pub(super) fn admitted(&self) -> impl Iterator<Item = u64> + '_ {
        let (first, rest) = self
            .sets
            .split_first()
            .map_or((None, &[][..]), |(f, r)| (Some(*f), r));
        first
            .into_iter()
            .flatten()
            .copied()
            .filter(move |key| rest.iter().all(|set| set.contains(key)))
    }
}

impl Labels {
    fn intern(&mut self, name: &str) -> u32 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.to_owned());
        self.ids.insert(name.to_owned(), id);
        id
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn insert(&mut self, key: u64, label: Label) {
        let names = [
            self.intern(&label.tenant),
            self.intern(&label.namespace),
            self.intern(&label.task),
        ];
        self.remove(key);
        self.post(key, names);
        self.entries.insert(
            key,
            Entry {
                names,
                payload: label.payload,
            },
        );
    }

    fn post(&mut self, key: u64, names: [u32; FIELDS]) {
        for (postings, id) in self.postings.iter_mut().zip(names) {
            let id = id as usize;
            if postings.len() <= id {
                postings.resize_with(id + 1, KeySet::default);
            }
            postings[id].insert(key);
        }
    }

    pub(super) fn remove(&mut self, key: u64) {
        if let Some(old) = self.entries.remove(&key) {
            for (postings, id) in self.postings.iter_mut().zip(old.names) {
                postings[id as usize].remove(&key);
            }
        }
    }

    pub(super) fn get(&self, key: u64) -> Option<Label> {
        self.entries.get(&key).map(|e| {
            let [tenant, namespace, task] = e.names.map(|id| self.names[id as usize].clone());
            Label {
                tenant,
                namespace,
                task,
                payload: e.payload.clone(),
            }
        })
    }

    /// The filter's key sets; `keys` is the caller's key set, rehashed by the caller into a
    /// [`KeySet`]. An empty set (a name no vector carries) admits nothing.
    pub(super) fn compile<'f>(&'f self, filter: &Filter, keys: Option<&'f KeySet>) -> Compiled<'f> {
        static NONE: std::sync::LazyLock<KeySet> = std::sync::LazyLock::new(KeySet::default);
        let mut sets: Vec<&KeySet> = [&filter.tenant, &filter.namespace, &filter.task]
            .into_iter()
            .zip(&self.postings)
            .filter_map(|(name, postings)| {
                let name = name.as_ref()?;
                Some(
                    self.ids
                        .get(name)
                        .and_then(|id| postings.get(*id as usize))
                        .unwrap_or(&NONE),
                )
            })
            .chain(keys)
            .collect();
        sets.sort_by_key(|s| s.len());
        Compiled { sets }
    }

    /// Little-endian: name count, names (u32 length + bytes), entry count, entries
    /// (key u64, three name ids u32, payload u32 length + bytes).
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.names.len() as u32).to_le_bytes());
        for name in &self.names {
            out.extend_from_slice(&(name.len() as u32).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for (key, e) in &self.entries {
            out.extend_from_slice(&key.to_le_bytes());
            for id in e.names {
                out.extend_from_slice(&id.to_le_bytes());
            }
            out.extend_from_slice(&(e.payload.len() as u32).to_le_bytes());
            out.extend_from_slice(&e.payload);
        }
        out
    }

    pub(super) fn decode(mut buf: &[u8]) -> Option<Self> {
        fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            if buf.len() < n {
                return None;
            }
            let (head, rest) = buf.split_at(n);
            *buf = rest;
            Some(head)
        }
        fn u32_(buf: &mut &[u8]) -> Option<u32> {
            Some(u32::from_le_bytes(take(buf, 4)?.try_into().ok()?))
        }
        fn u64_(buf: &mut &[u8]) -> Option<u64> {
            Some(u64::from_le_bytes(take(buf, 8)?.try_into().ok()?))
        }
        let mut labels = Self::default();
        for _ in 0..u32_(&mut buf)? {
            let len = u32_(&mut buf)? as usize;
            let name = std::str::from_utf8(take(&mut buf, len)?).ok()?;
            labels.intern(name);
        }
        let names = labels.names.len() as u32;
        for _ in 0..u64_(&mut buf)? {
            let key = u64_(&mut buf)?;
            let ids = [u32_(&mut buf)?, u32_(&mut buf)?, u32_(&mut buf)?];
            if ids.iter().any(|id| *id >= names) {
                return None;
            }
            let len = u32_(&mut buf)? as usize;
            let payload = take(&mut buf, len)?.to_vec();
            // A repeated key (only in a hand-made file) must not leave stale postings.
            labels.remove(key);
            labels.post(key, ids);
            labels.entries.insert(
                key,
                Entry {
                    names: ids,
                    payload,
                },
            );
        }
        buf.is_empty().then_some(labels)
    }
}
