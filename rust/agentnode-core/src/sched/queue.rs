//! The single-threaded scheduler structure. See the module docs of `sched` for the algorithm.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use super::{Error, Result};

/// The `FxHash` of rustc: keys here are task ids and tenant names chosen by the node's own API,
/// and the flooding resistance of `SipHash` cost a third of push+pop time in `benches/sched.rs`.
#[derive(Default)]
struct Fx(u64);

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;
type FxSet<K> = HashSet<K, BuildHasherDefault<Fx>>;

/// The index's hash of a task id. The node numbers its tasks, so a batch's ids are mostly
/// consecutive; a hash that scatters them gives each task of a batch its own cache line (and,
/// once the index outgrows the caches, its own miss) on push and again on pop. This one places
/// each run of 64 consecutive ids on 64 consecutive slots, at a position the run's number picks
/// (Fx-mixed), and puts the id's low bits in the top bits hashbrown keeps as the slot's tag, so
/// the ids of a run still tell each other apart without a key compare.
#[derive(Default)]
struct IdHash(u64);

impl Hasher for IdHash {
    fn write(&mut self, bytes: &[u8]) {
        let mut fx = Fx(self.0);
        fx.write(bytes);
        self.0 = fx.0;
    }

    fn write_u64(&mut self, id: u64) {
        const RUN: u64 = 63;
        const TAG: u64 = 0x7f << 57;
        let base = (id >> 6).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        self.0 = (base & !RUN & !TAG) | (id & RUN) | ((id << 57) & TAG);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Virtual-time cost of one task for a tenant of weight 1; a tenant of weight `w` pays `SCALE / w`.
const SCALE: u64 = 1 << 32;
/// Largest tenant weight; keeps `SCALE / weight` well above rounding noise.
pub const MAX_WEIGHT: u32 = 10_000;
const CLASSES: usize = 5;
/// Tenant names a batch push remembers by address (see [`Scheduler::push_many`]).
const RECENT_TENANTS: usize = 16;

/// A priority class; lower classes pop only when no higher class has a task that fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    Critical = 0,
    High = 1,
    Normal = 2,
    Low = 3,
    Batch = 4,
}

impl Class {
    pub const ALL: [Class; CLASSES] = [
        Class::Critical,
        Class::High,
        Class::Normal,
        Class::Low,
        Class::Batch,
    ];

    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "critical" => Self::Critical,
            "high" => Self::High,
            "normal" => Self::Normal,
            "low" => Self::Low,
            "batch" => Self::Batch,
            _ => return Err(Error::UnknownClass(name.to_owned())),
        })
    }
}

/// Concurrency limits and aging; 0 means unlimited (or, for `aging`, off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Running tasks per tenant unless `set_tenant` overrides it.
    pub tenant_running: u32,
    /// Running tasks per class, indexed by `Class as usize`.
    pub class_running: [u32; CLASSES],
    /// After this many pops served by higher classes while a lower class had runnable work, the
    /// lower class is served next, so batch cannot starve forever.
    pub aging: u32,
}

/// A task to queue: its id, tenant, class and resource requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task<'a> {
    pub id: u64,
    pub tenant: &'a str,
    pub class: Class,
    /// Requested CPU in millicores.
    pub cpu: u64,
    /// Requested memory in bytes.
    pub mem: u64,
}

/// A task handed out by `pop`, with the requests the caller must now account as used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Popped {
    pub id: u64,
    pub cpu: u64,
    pub mem: u64,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    seq: u64,
    cpu: u64,
    mem: u64,
}

#[derive(Debug, Default)]
struct Lane {
    queue: VecDeque<Entry>,
    /// Finish tag of the last task served from this lane.
    finish: u64,
    /// This lane's key in its class's ready set, when it is there.
    key: Option<Key>,
    /// Cancelled entries still in `queue` (dropped when they reach its head): while there are
    /// none, the head is live without asking the index.
    dead: usize,
}

#[derive(Debug)]
struct Tenant {
    weight: u32,
    /// Per-tenant running limit; `None` uses `Limits::tenant_running`.
    limit: Option<u32>,
    running: u32,
    lanes: [Lane; CLASSES],
}

/// (start tag, submission sequence, tenant): the smallest key is served first.
type Key = (u64, u64, u32);

#[derive(Debug, Default)]
struct ClassState {
    clock: u64,
    ready: BTreeSet<Key>,
    running: u32,
    starved: u32,
}

/// Where a task is, from the index. Whether it is queued or running is not stored: its lane
/// serves tasks in `seq` order, so it runs once its `seq` is below the lane's head (or the lane
/// is empty). Marking it running on pop would cost an index probe per pop, the one that missed
/// the caches most.
#[derive(Clone, Copy, Debug)]
struct Loc {
    seq: u64,
    tenant: u32,
    class: Class,
}

/// Priority classes, weighted fair share per class, limits, aging and capacity admission.
/// Push, pop, cancel and complete are O(log n); a pop also steps over tenants whose head task
/// does not fit the free capacity.
#[derive(Debug, Default)]
pub struct Scheduler {
    limits: Limits,
    classes: [ClassState; CLASSES],
    tenants: Vec<Tenant>,
    tenant_ids: FxMap<String, u32>,
    index: HashMap<u64, Loc, BuildHasherDefault<IdHash>>,
    seq: u64,
    queued: usize,
}

impl Scheduler {
    #[must_use]
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Tasks waiting to be popped.
    #[must_use]
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Tasks popped and not yet completed.
    #[must_use]
    pub fn running(&self) -> usize {
        self.index.len() - self.queued
    }

    /// Sets a tenant's weight and, optionally, its own running limit (`None`: the default).
    pub fn set_tenant(&mut self, name: &str, weight: u32, limit: Option<u32>) -> Result<()> {
        if weight == 0 || weight > MAX_WEIGHT {
            return Err(Error::Weight {
                got: weight,
                max: MAX_WEIGHT,
            });
        }
        let t = self.tenant(name)?;
        let was_blocked = self.at_limit(t);
        let tenant = &mut self.tenants[t as usize];
        tenant.weight = weight;
        tenant.limit = limit;
        match (was_blocked, self.at_limit(t)) {
            (false, true) => self.unready_all(t),
            (true, false) => self.ready_all(t),
            _ => {}
        }
        Ok(())
    }

    /// Queues one task.
    pub fn push(&mut self, task: &Task<'_>) -> Result<()> {
        if self.index.contains_key(&task.id) {
            return Err(Error::Duplicate(task.id));
        }
        let t = self.tenant(task.tenant)?;
        self.push_as(task, t);
        Ok(())
    }

    /// Queues a checked task of tenant number `t`.
    fn push_as(&mut self, task: &Task<'_>, t: u32) {
        let c = task.class as usize;
        self.seq += 1;
        let seq = self.seq;
        self.index.insert(
            task.id,
            Loc {
                tenant: t,
                class: task.class,
                seq,
            },
        );
        self.queued += 1;
        let lane = &mut self.tenants[t as usize].lanes[c];
        lane.queue.push_back(Entry {
            id: task.id,
            seq,
            cpu: task.cpu,
            mem: task.mem,
        });
        if lane.key.is_none() {
            self.settle(t, c);
        }
    }

    /// Queues several tasks, all or none: a bad one leaves the queue untouched.
    pub fn push_many(&mut self, tasks: &[Task<'_>]) -> Result<()> {
        // A batch names few tenants, usually through the same few strings (the Python binding
        // passes one per name): those are recognised by address (the same bytes, as the batch
        // is borrowed) instead of hashing each name, which was the largest single cost of a push.
        // Each remembers its tenant number, or `None` for a new (checked) name until made.
        let mut known: Vec<((*const u8, usize), Option<u32>)> = Vec::with_capacity(RECENT_TENANTS);
        // The node numbers its tasks, so a batch's ids usually ascend and cannot repeat: only
        // a batch whose ids do not ascend pays for a set to find repeats in it.
        let ascending = tasks.windows(2).all(|w| w[0].id < w[1].id);
        let mut seen = FxSet::default();
        for task in tasks {
            if self.index.contains_key(&task.id) || (!ascending && !seen.insert(task.id)) {
                return Err(Error::Duplicate(task.id));
            }
            let key = (task.tenant.as_ptr(), task.tenant.len());
            if !known.iter().any(|k| k.0 == key) {
                let t = self.tenant_ids.get(task.tenant).copied();
                if t.is_none() {
                    check_tenant_name(task.tenant)?;
                }
                if known.len() < RECENT_TENANTS {
                    known.push((key, t));
                }
            }
        }
        for task in tasks {
            let key = (task.tenant.as_ptr(), task.tenant.len());
            let t = match known.iter_mut().find(|k| k.0 == key) {
                Some((_, Some(t))) => *t,
                Some((_, made)) => *made.insert(self.tenant(task.tenant)?),
                None => self.tenant(task.tenant)?,
            };
            self.push_as(task, t);
        }
        Ok(())
    }

    /// Removes a queued task.
    pub fn cancel(&mut self, id: u64) -> Result<()> {
        let Some(loc) = self.index.get(&id).copied().filter(|l| !self.is_running(l)) else {
            return Err(Error::NotQueued(id));
        };
        let seq = loc.seq;
        self.index.remove(&id);
        self.queued -= 1;
        let c = loc.class as usize;
        let lane = &mut self.tenants[loc.tenant as usize].lanes[c];
        lane.dead += 1;
        // Entries behind the head are dropped lazily when they reach it.
        if lane.queue.front().is_some_and(|e| e.seq == seq) {
            self.settle(loc.tenant, c);
        }
        Ok(())
    }

    /// Marks a running task finished, freeing its tenant's and class's concurrency slot.
    pub fn complete(&mut self, id: u64) -> Result<()> {
        let Some(Loc { tenant, class, .. }) =
            self.index.get(&id).copied().filter(|l| self.is_running(l))
        else {
            return Err(Error::NotRunning(id));
        };
        self.index.remove(&id);
        let was_blocked = self.at_limit(tenant);
        self.tenants[tenant as usize].running -= 1;
        self.classes[class as usize].running -= 1;
        if was_blocked && !self.at_limit(tenant) {
            self.ready_all(tenant);
        }
        Ok(())
    }

    /// Pops the next task whose requests fit `free_cpu` millicores and `free_mem` bytes.
    pub fn pop(&mut self, free_cpu: u64, free_mem: u64) -> Option<Popped> {
        if self.limits.aging > 0 {
            for c in (1..CLASSES).rev() {
                if self.classes[c].starved >= self.limits.aging {
                    if let Some(p) = self.pop_class(c, free_cpu, free_mem) {
                        return Some(p);
                    }
                }
            }
        }
        (0..CLASSES).find_map(|c| self.pop_class(c, free_cpu, free_mem))
    }

    /// Pops up to `n` tasks, deducting each one's requests from the free capacity.
    pub fn pop_many(&mut self, n: usize, mut free_cpu: u64, mut free_mem: u64) -> Vec<Popped> {
        let mut out = Vec::with_capacity(n.min(self.queued));
        while out.len() < n {
            let Some(p) = self.pop(free_cpu, free_mem) else {
                break;
            };
            free_cpu -= p.cpu;
            free_mem -= p.mem;
            out.push(p);
        }
        out
    }

    fn pop_class(&mut self, c: usize, free_cpu: u64, free_mem: u64) -> Option<Popped> {
        let class = &self.classes[c];
        let limit = self.limits.class_running[c];
        if limit != 0 && class.running >= limit {
            return None;
        }
        let tenants = &self.tenants;
        let fits = |&&(_, _, t): &&Key| {
            let head = tenants[t as usize].lanes[c]
                .queue
                .front()
                .expect("a ready lane has a live head");
            head.cpu <= free_cpu && head.mem <= free_mem
        };
        let first = class.ready.first()?;
        // Usually the first lane fits: pop it without a second search.
        let key = if fits(&first) {
            self.classes[c].ready.pop_first()
        } else {
            let key = *class.ready.iter().skip(1).find(fits)?;
            self.classes[c].ready.take(&key)
        }
        .expect("the key was just found");
        let (tag, _, t) = key;
        let class = &mut self.classes[c];
        class.clock = class.clock.max(tag);
        class.running += 1;
        class.starved = 0;
        for lower in &mut self.classes[c + 1..] {
            if !lower.ready.is_empty() {
                lower.starved += 1;
            }
        }
        let tenant = &mut self.tenants[t as usize];
        let cost = SCALE / u64::from(tenant.weight);
        tenant.running += 1;
        let lane = &mut tenant.lanes[c];
        lane.key = None;
        lane.finish = tag + cost;
        let e = lane.queue.pop_front().expect("a ready lane has a head");
        self.queued -= 1;
        if self.at_limit(t) {
            self.unready_all(t);
        } else {
            self.settle(t, c);
        }
        Some(Popped {
            id: e.id,
            cpu: e.cpu,
            mem: e.mem,
        })
    }

    fn tenant(&mut self, name: &str) -> Result<u32> {
        if let Some(&t) = self.tenant_ids.get(name) {
            return Ok(t);
        }
        check_tenant_name(name)?;
        let t = self.tenants.len() as u32;
        self.tenants.push(Tenant {
            weight: 1,
            limit: None,
            running: 0,
            lanes: Default::default(),
        });
        self.tenant_ids.insert(name.to_owned(), t);
        Ok(t)
    }

    /// Whether the task at `loc` was popped: its lane serves in `seq` order (see [`Loc`]).
    fn is_running(&self, loc: &Loc) -> bool {
        self.tenants[loc.tenant as usize].lanes[loc.class as usize]
            .queue
            .front()
            .is_none_or(|head| loc.seq < head.seq)
    }

    fn at_limit(&self, t: u32) -> bool {
        let tenant = &self.tenants[t as usize];
        let limit = tenant.limit.unwrap_or(self.limits.tenant_running);
        limit != 0 && tenant.running >= limit
    }

    /// Drops cancelled entries from the lane's head and (re)files the lane in its ready set with
    /// a fresh start tag, unless it is empty or its tenant is at its limit.
    fn settle(&mut self, t: u32, c: usize) {
        let blocked = self.at_limit(t);
        let index = &self.index;
        let class = &mut self.classes[c];
        let lane = &mut self.tenants[t as usize].lanes[c];
        if let Some(key) = lane.key.take() {
            class.ready.remove(&key);
        }
        while lane.dead > 0 {
            let Some(head) = lane.queue.front() else {
                break;
            };
            let live = index.get(&head.id).is_some_and(|l| l.seq == head.seq);
            if live {
                break;
            }
            lane.queue.pop_front();
            lane.dead -= 1;
        }
        if blocked {
            return;
        }
        if let Some(head) = lane.queue.front() {
            let key = (class.clock.max(lane.finish), head.seq, t);
            class.ready.insert(key);
            lane.key = Some(key);
        }
    }

    fn unready_all(&mut self, t: u32) {
        for (c, lane) in self.tenants[t as usize].lanes.iter_mut().enumerate() {
            if let Some(key) = lane.key.take() {
                self.classes[c].ready.remove(&key);
            }
        }
    }

    fn ready_all(&mut self, t: u32) {
        for c in 0..CLASSES {
            if self.tenants[t as usize].lanes[c].key.is_none() {
                self.settle(t, c);
            }
        }
    }
}

fn check_tenant_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 128 {
        return Err(Error::TenantName(name.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: u64 = u64::MAX;

    fn task(id: u64, tenant: &str, class: Class) -> Task<'_> {
        Task {
            id,
            tenant,
            class,
            cpu: 100,
            mem: 1 << 20,
        }
    }

    fn drain(s: &mut Scheduler) -> Vec<u64> {
        std::iter::from_fn(|| s.pop(BIG, BIG).map(|p| p.id)).collect()
    }

    #[test]
    fn a_run_of_ids_takes_consecutive_slots_with_distinct_tags() {
        let hash = |id: u64| {
            let mut h = IdHash::default();
            h.write_u64(id);
            h.finish()
        };
        let base = 7 * 64;
        for id in base..base + 64 {
            assert_eq!(hash(id) & 63, id & 63, "slot within the run");
            assert_eq!(
                hash(id) & !63 & !(0x7f << 57),
                hash(base) & !63 & !(0x7f << 57)
            );
        }
        let tags: std::collections::HashSet<u64> =
            (base..base + 64).map(|id| hash(id) >> 57).collect();
        assert_eq!(tags.len(), 64);
        // Runs land apart, not side by side.
        let slot = |id: u64| hash(id) & 0xf_ffff; // in a table of 2^20 slots
        assert!(slot(base + 64).abs_diff(slot(base)) > 64);
    }

    #[test]
    fn fifo_within_one_tenant() {
        let mut s = Scheduler::default();
        for id in 0..10 {
            s.push(&task(id, "a", Class::Normal)).unwrap();
        }
        assert_eq!(drain(&mut s), (0..10).collect::<Vec<_>>());
        assert_eq!(s.queued(), 0);
        assert_eq!(s.running(), 10);
    }

    #[test]
    fn critical_behind_a_thousand_batch_pops_next() {
        let mut s = Scheduler::new(Limits {
            aging: 10,
            ..Limits::default()
        });
        for id in 0..1000 {
            s.push(&task(id, "bulk", Class::Batch)).unwrap();
        }
        s.push(&task(5000, "urgent", Class::Critical)).unwrap();
        assert_eq!(s.pop(BIG, BIG).unwrap().id, 5000);
    }

    #[test]
    fn shares_follow_weights_not_queue_length() {
        let mut s = Scheduler::default();
        s.set_tenant("a", 3, None).unwrap();
        for id in 0..10_000 {
            s.push(&task(id, "b", Class::Normal)).unwrap();
        }
        for id in 10_000..10_100 {
            s.push(&task(id, "a", Class::Normal)).unwrap();
        }
        let first: Vec<u64> = (0..100).map(|_| s.pop(BIG, BIG).unwrap().id).collect();
        let a = first.iter().filter(|&&id| id >= 10_000).count();
        assert!((73..=77).contains(&a), "tenant a got {a} of 100");
    }

    #[test]
    fn tenant_and_class_limits_hold_until_complete() {
        let mut s = Scheduler::new(Limits {
            tenant_running: 2,
            class_running: [0, 0, 3, 0, 0],
            aging: 0,
        });
        for id in 0..5 {
            s.push(&task(id, "a", Class::Normal)).unwrap();
            s.push(&task(100 + id, "b", Class::Normal)).unwrap();
        }
        let got = drain(&mut s);
        assert_eq!(got.len(), 3);
        s.complete(got[0]).unwrap();
        assert!(s.pop(BIG, BIG).is_some());
        assert!(s.pop(BIG, BIG).is_none());
        assert!(matches!(s.complete(got[0]), Err(Error::NotRunning(_))));
    }

    #[test]
    fn capacity_admits_only_what_fits() {
        let mut s = Scheduler::default();
        s.push(&Task {
            id: 1,
            tenant: "a",
            class: Class::High,
            cpu: 4000,
            mem: 1,
        })
        .unwrap();
        s.push(&task(2, "b", Class::Low)).unwrap();
        assert_eq!(s.pop(1000, BIG).unwrap().id, 2, "small low task backfills");
        assert!(s.pop(1000, BIG).is_none());
        assert_eq!(s.pop(4000, BIG).unwrap().id, 1);
        let many = s.pop_many(10, BIG, BIG);
        assert!(many.is_empty());
    }

    #[test]
    fn aging_serves_starved_batch() {
        let mut s = Scheduler::new(Limits {
            aging: 4,
            ..Limits::default()
        });
        s.push(&task(0, "b", Class::Batch)).unwrap();
        for id in 1..100 {
            s.push(&task(id, "a", Class::High)).unwrap();
        }
        let order = drain(&mut s);
        let pos = order.iter().position(|&id| id == 0).unwrap();
        assert_eq!(pos, 4);
    }

    #[test]
    fn cancel_removes_queued_and_rejects_running() {
        let mut s = Scheduler::default();
        for id in 0..4 {
            s.push(&task(id, "a", Class::Normal)).unwrap();
        }
        s.cancel(0).unwrap();
        s.cancel(2).unwrap();
        assert!(matches!(s.cancel(2), Err(Error::NotQueued(2))));
        assert_eq!(drain(&mut s), vec![1, 3]);
        assert!(matches!(s.cancel(1), Err(Error::NotQueued(1))));
    }

    #[test]
    fn queued_or_running_follows_the_lane() {
        let mut s = Scheduler::default();
        for id in 0..4 {
            s.push(&task(id, "a", Class::Normal)).unwrap();
        }
        assert!(matches!(s.complete(0), Err(Error::NotRunning(0))));
        s.cancel(2).unwrap();
        assert_eq!(s.pop(BIG, BIG).unwrap().id, 0);
        assert!(matches!(s.cancel(0), Err(Error::NotQueued(0))));
        assert!(matches!(s.complete(1), Err(Error::NotRunning(1))));
        assert_eq!(s.pop(BIG, BIG).unwrap().id, 1);
        // The cancelled 2 is stepped over; 3 runs, and the lane is empty.
        assert_eq!(s.pop(BIG, BIG).unwrap().id, 3);
        for id in [0, 1, 3] {
            s.complete(id).unwrap();
        }
        // A finished id can be queued again, and is queued, not running.
        s.push(&task(1, "a", Class::Normal)).unwrap();
        assert!(matches!(s.complete(1), Err(Error::NotRunning(1))));
        assert_eq!((s.queued(), s.running()), (1, 0));
        s.cancel(1).unwrap();
    }

    #[test]
    fn bad_input_is_rejected() {
        let mut s = Scheduler::default();
        s.push(&task(1, "a", Class::Normal)).unwrap();
        assert!(matches!(
            s.push(&task(1, "a", Class::Normal)),
            Err(Error::Duplicate(1))
        ));
        assert!(matches!(
            s.push(&task(2, "", Class::Normal)),
            Err(Error::TenantName(0))
        ));
        assert!(matches!(
            s.set_tenant("a", 0, None),
            Err(Error::Weight { .. })
        ));
        let batch = [task(7, "a", Class::Low), task(7, "a", Class::Low)];
        assert!(matches!(s.push_many(&batch), Err(Error::Duplicate(7))));
        assert_eq!(s.queued(), 1, "a rejected batch queues nothing");
        // Ascending ids skip the in-batch set, not the check against what is queued.
        let ascending = [task(0, "a", Class::Low), task(1, "a", Class::Low)];
        assert!(matches!(s.push_many(&ascending), Err(Error::Duplicate(1))));
        assert_eq!(s.queued(), 1, "a rejected batch queues nothing");
        assert!(matches!(
            Class::parse("urgent"),
            Err(Error::UnknownClass(_))
        ));
        assert_eq!(Class::parse("batch").unwrap(), Class::Batch);
    }
}
