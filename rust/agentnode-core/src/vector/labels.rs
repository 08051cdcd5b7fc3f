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
struct KeyHasher(u64);

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

type KeyMap<V> = HashMap<u64, V, BuildHasherDefault<KeyHasher>>;

#[derive(Debug, Clone)]
struct Entry {
    tenant: u32,
    namespace: u32,
    task: u32,
    payload: Vec<u8>,
}

#[derive(Debug, Default)]
pub(super) struct Labels {
    names: Vec<String>,
    ids: HashMap<String, u32>,
    entries: KeyMap<Entry>,
}

/// A filter resolved against the interned names.
pub(super) struct Compiled<'f> {
    tenant: Option<u32>,
    namespace: Option<u32>,
    task: Option<u32>,
    keys: Option<&'f HashSet<u64>>,
}

impl Compiled<'_> {
    pub(super) fn accepts(&self, labels: &Labels, key: u64) -> bool {
        if self.keys.is_some_and(|keys| !keys.contains(&key)) {
            return false;
        }
        if self.tenant.is_none() && self.namespace.is_none() && self.task.is_none() {
            return true;
        }
        labels.entries.get(&key).is_some_and(|e| {
            self.tenant.is_none_or(|t| t == e.tenant)
                && self.namespace.is_none_or(|n| n == e.namespace)
                && self.task.is_none_or(|t| t == e.task)
        })
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
        let entry = Entry {
            tenant: self.intern(&label.tenant),
            namespace: self.intern(&label.namespace),
            task: self.intern(&label.task),
            payload: label.payload,
        };
        self.entries.insert(key, entry);
    }

    pub(super) fn remove(&mut self, key: u64) {
        self.entries.remove(&key);
    }

    pub(super) fn get(&self, key: u64) -> Option<Label> {
        self.entries.get(&key).map(|e| Label {
            tenant: self.names[e.tenant as usize].clone(),
            namespace: self.names[e.namespace as usize].clone(),
            task: self.names[e.task as usize].clone(),
            payload: e.payload.clone(),
        })
    }

    /// `None` when the filter names a tenant, namespace or task that no vector carries.
    pub(super) fn compile<'f>(&self, filter: &'f Filter) -> Option<Compiled<'f>> {
        let resolve = |name: &Option<String>| match name {
            None => Some(None),
            Some(n) => self.ids.get(n).map(|id| Some(*id)),
        };
        Some(Compiled {
            tenant: resolve(&filter.tenant)?,
            namespace: resolve(&filter.namespace)?,
            task: resolve(&filter.task)?,
            keys: filter.keys.as_ref(),
        })
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
            for id in [e.tenant, e.namespace, e.task] {
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
            let (tenant, namespace, task) = (u32_(&mut buf)?, u32_(&mut buf)?, u32_(&mut buf)?);
            if tenant >= names || namespace >= names || task >= names {
                return None;
            }
            let len = u32_(&mut buf)? as usize;
            let payload = take(&mut buf, len)?.to_vec();
            labels.entries.insert(
                key,
                Entry {
                    tenant,
                    namespace,
                    task,
                    payload,
                },
            );
        }
        buf.is_empty().then_some(labels)
    }
}
