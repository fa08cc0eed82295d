//! The network model: virtual time, the event queue and the flow-level bandwidth
//! network. Knows nothing of pieces, peers or schedulers.
//!
//! # Time
//!
//! Virtual time is an integer number of nanoseconds since the start of the run
//! ([`Nanos`]); [`Clock`] turns it into the `Instant` the scheduler and tracker cores
//! take (`base + Duration`). Integers keep event order exact and runs reproducible.
//!
//! # Events
//!
//! [`EventQueue`] is a binary heap ordered by `(time, insertion sequence)`: events at
//! the same instant run in the order they were scheduled, so a run is a pure function
//! of its inputs and seed.
//!
//! # Flows
//!
//! A [`FlowNet`] has *resources* (a capacity in bytes per second: a node's upload, a
//! node's download, a site link in one direction, the upstream registry's egress) and
//! *flows* (a transfer of a fixed number of bytes crossing two to four resources).
//! Bytes are a fluid: a flow progresses at its current rate and finishes when its
//! bytes are through.
//!
//! Rates are an incremental approximation of **max-min fairness**, recomputed only at
//! the resources a change touches. For each flow, each resource it crosses keeps an
//! *allocation* (the flow's share there) and an *offer* (what the flow could get there
//! if it were constrained nowhere else). When a flow starts or ends, each resource `x`
//! it crosses is *refilled*: each flow `f` at `x` has a demand `d_f`, the smallest
//! offer of its other resources, and `x` is water-filled over those demands. If `x`
//! is saturated at water level `L`, a flow gets `min(d_f, L)` and is offered `L`;
//! otherwise a flow gets `d_f` plus an equal part of the slack and is offered `d_f`
//! plus all of it. A flow's rate is the minimum of its allocations. Then, once, the
//! refill is *cascaded*: every other resource of a flow whose rate changed is refilled
//! too if it now binds that flow below what `x` allows, or if it is saturated and the
//! flow now uses less than its share there (capacity others could use).
//!
//! - **Feasible, always.** A rate never exceeds its allocation at any resource, and
//!   each resource's allocations sum to at most its capacity, so no link ever carries
//!   more than its capacity — the model can be pessimistic, never optimistic (a run
//!   cannot beat the Kumar–Ross bound).
//! - **Close to max-min.** It is the classic distributed max-min iteration (advertised
//!   rates), run two levels deep from each change instead of to convergence. What it
//!   misses is picked up at the next change of the resources concerned; a node's
//!   upload and download change every time one of their transfers starts or ends.
//!   On random swarm-like loads (30 nodes, ~120 flows, flows coming and going) the
//!   total throughput is 98.7 % of exact max-min's on average, 95 % at worst (the
//!   test `close_to_exact_max_min_on_swarm_like_loads`). With a single shared
//!   resource (the direct baseline) it is exact.
//! - **Cheap.** A refill costs `O(k log k)` for the `k` flows at that resource (at most
//!   the upload slots at a sender, the receive budget at a receiver), plus one
//!   indexed-heap update per flow whose rate changed. Site links carry many flows and
//!   cost proportionally more: use zones with hundreds, not tens of thousands, of nodes.
//!
//! Flow completions live in their own indexed min-heap (decrease/increase-key in
//! place), so a rate change costs `O(log flows)` and leaves no stale entries behind.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

/// Virtual time: nanoseconds since the start of the run.
pub type Nanos = u64;

/// Converts between virtual time and the `Instant`s the policy cores take.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    /// A clock whose time zero is `base`.
    pub fn new(base: Instant) -> Self {
        Self { base }
    }

    /// The `Instant` at virtual time `t`.
    pub fn at(&self, t: Nanos) -> Instant {
        self.base + Duration::from_nanos(t)
    }

    /// Virtual time of `i` (zero before the base).
    pub fn nanos(&self, i: Instant) -> Nanos {
        u64::try_from(i.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// `d` in nanoseconds (saturating).
pub fn nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Seconds as a float, for reports.
pub fn secs(t: Nanos) -> f64 {
    t as f64 / 1e9
}

struct Entry<E> {
    time: Nanos,
    seq: u64,
    ev: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.time, self.seq) == (other.time, other.seq)
    }
}
impl<E> Eq for Entry<E> {}
impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<E> Ord for Entry<E> {
    // Reversed: `BinaryHeap` is a max-heap and we want the earliest first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.time, other.seq).cmp(&(self.time, self.seq))
    }
}

/// Pending events, earliest first, FIFO among equal times.
///
/// Most events come a fixed delay after the moment they are scheduled (a message's
/// one-way trip, a queue's wait limit); scheduled with [`EventQueue::push_after`],
/// each such delay gets a FIFO lane, which is already in time order, so only the
/// irregular rest goes through the heap. The order of events is the same either way.
pub struct EventQueue<E> {
    heap: BinaryHeap<Entry<E>>,
    /// `(delay, events)`: every event in a lane was pushed `delay` after a
    /// non-decreasing `now`, so each lane is sorted.
    lanes: Vec<(Nanos, VecDeque<Entry<E>>)>,
    seq: u64,
}

impl<E> Default for EventQueue<E> {
    fn default() -> Self {
        Self { heap: BinaryHeap::new(), lanes: Vec::new(), seq: 0 }
    }
}

impl<E> EventQueue<E> {
    /// Schedules `ev` at `time`.
    pub fn push(&mut self, time: Nanos, ev: E) {
        self.seq += 1;
        self.heap.push(Entry { time, seq: self.seq, ev });
    }

    /// Schedules `ev` at `now + delay`; `now` must never decrease between calls.
    pub fn push_after(&mut self, now: Nanos, delay: Nanos, ev: E) {
        self.seq += 1;
        let entry = Entry { time: now + delay, seq: self.seq, ev };
        match self.lanes.iter_mut().find(|(d, _)| *d == delay) {
            Some((_, lane)) => lane.push_back(entry),
            None => self.lanes.push((delay, VecDeque::from([entry]))),
        }
    }

    /// Where the earliest event is: `None` for the heap, else a lane index.
    fn earliest(&self) -> Option<Option<usize>> {
        let key = |e: &Entry<E>| (e.time, e.seq);
        let mut best = self.heap.peek().map(|e| (key(e), None));
        for (i, (_, lane)) in self.lanes.iter().enumerate() {
            if let Some(e) = lane.front()
                && best.is_none_or(|(k, _)| key(e) < k)
            {
                best = Some((key(e), Some(i)));
            }
        }
        best.map(|(_, at)| at)
    }

    /// Time of the earliest event.
    pub fn peek_time(&self) -> Option<Nanos> {
        match self.earliest()? {
            None => self.heap.peek().map(|e| e.time),
            Some(i) => self.lanes[i].1.front().map(|e| e.time),
        }
    }

    /// Removes and returns the earliest event.
    pub fn pop(&mut self) -> Option<(Nanos, E)> {
        let e = match self.earliest()? {
            None => self.heap.pop()?,
            Some(i) => self.lanes[i].1.pop_front()?,
        };
        Some((e.time, e.ev))
    }

    /// Events pending.
    pub fn len(&self) -> usize {
        self.heap.len() + self.lanes.iter().map(|(_, l)| l.len()).sum::<usize>()
    }

    /// Whether no event is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A bandwidth resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResId(pub u32);

/// A flow, valid from [`FlowNet::start`] until it finishes or is cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowId(pub u32);

/// Most resources one flow crosses (sender up, sender site out, receiver site in,
/// receiver down).
pub const MAX_HOPS: usize = 4;

const NONE: u32 = u32::MAX;

#[derive(Debug)]
struct Resource {
    /// Bytes per second.
    cap: f64,
    /// Whether the last refill found it saturated (allocations sum to the capacity
    /// with some flow held to the water level).
    saturated: bool,
    flows: Vec<u32>,
    /// Bytes that finished crossing this resource (completed and cancelled flows).
    carried: f64,
}

#[derive(Debug)]
struct Flow<T> {
    tag: T,
    bytes: u64,
    hops: u8,
    res: [u32; MAX_HOPS],
    /// Index of this flow in each resource's `flows`.
    pos: [u32; MAX_HOPS],
    /// This flow's share of each resource (they sum to at most the capacity).
    alloc: [f64; MAX_HOPS],
    /// What each resource would give this flow if it were constrained nowhere else.
    offer: [f64; MAX_HOPS],
    rate: f64,
    remaining: f64,
    /// When `remaining` was last brought up to date.
    updated: Nanos,
    finish: Nanos,
}

/// Counters of the flow network.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetStats {
    /// Flows started.
    pub flows: u64,
    /// Resource refills (water-fillings).
    pub refills: u64,
    /// Flow rate changes (each an indexed-heap update).
    pub rate_changes: u64,
}

/// The flow network; `T` tags each flow for its owner. See the module docs.
pub struct FlowNet<T> {
    res: Vec<Resource>,
    flows: Vec<Option<Flow<T>>>,
    free: Vec<u32>,
    heap: FlowHeap,
    scratch: Vec<(f64, u32)>,
    stats: NetStats,
    /// While batching: resources to refill at [`FlowNet::end_batch`].
    batch: Option<Vec<u32>>,
    cascade: Vec<u32>,
}

impl<T: Copy> Default for FlowNet<T> {
    fn default() -> Self {
        Self {
            res: Vec::new(),
            flows: Vec::new(),
            free: Vec::new(),
            heap: FlowHeap::default(),
            scratch: Vec::new(),
            stats: NetStats::default(),
            batch: None,
            cascade: Vec::new(),
        }
    }
}

impl<T: Copy> FlowNet<T> {
    /// A new resource of `cap` bytes per second (must be positive and finite).
    pub fn add_resource(&mut self, cap: f64) -> ResId {
        let id = ResId(self.res.len() as u32);
        self.res.push(Resource { cap, saturated: false, flows: Vec::new(), carried: 0.0 });
        id
    }

    /// Capacity of `r` in bytes per second.
    pub fn capacity(&self, r: ResId) -> f64 {
        self.res[r.0 as usize].cap
    }

    /// Bytes that have crossed `r` in flows that ended (finished or cancelled).
    pub fn carried(&self, r: ResId) -> f64 {
        self.res[r.0 as usize].carried
    }

    /// Flows currently crossing `r`.
    pub fn load(&self, r: ResId) -> usize {
        self.res[r.0 as usize].flows.len()
    }

    /// Counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Flows in progress.
    pub fn active(&self) -> usize {
        self.heap.len()
    }

    /// Starts moving `bytes` across `path` (at most [`MAX_HOPS`] distinct resources).
    pub fn start(&mut self, now: Nanos, bytes: u64, path: &[ResId], tag: T) -> FlowId {
        let hops = path.len().min(MAX_HOPS);
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.flows.push(None);
                (self.flows.len() - 1) as u32
            }
        };
        let mut flow = Flow {
            tag,
            bytes,
            hops: hops as u8,
            res: [NONE; MAX_HOPS],
            pos: [NONE; MAX_HOPS],
            alloc: [0.0; MAX_HOPS],
            offer: [f64::INFINITY; MAX_HOPS],
            rate: 0.0,
            remaining: bytes as f64,
            updated: now,
            finish: Nanos::MAX,
        };
        for (j, r) in path.iter().take(hops).enumerate() {
            let res = &mut self.res[r.0 as usize];
            flow.offer[j] = res.cap;
            flow.res[j] = r.0;
            flow.pos[j] = res.flows.len() as u32;
            res.flows.push(id);
        }
        self.flows[id as usize] = Some(flow);
        self.heap.push(id, Nanos::MAX);
        self.stats.flows += 1;
        let mut touched = [NONE; MAX_HOPS];
        for (j, r) in path.iter().take(hops).enumerate() {
            touched[j] = r.0;
        }
        self.touch(&touched[..hops], now);
        FlowId(id)
    }

    /// When the next flow finishes, and which.
    pub fn next_finish(&self) -> Option<(Nanos, FlowId)> {
        self.heap.peek().map(|(t, id)| (t, FlowId(id)))
    }

    /// Ends flow `id` (finished or cancelled) at `now`; returns its tag, its size and
    /// the bytes it had moved.
    pub fn end(&mut self, id: FlowId, now: Nanos) -> Option<(T, u64, f64)> {
        let mut flow = self.flows.get_mut(id.0 as usize)?.take()?;
        self.heap.remove(id.0);
        self.free.push(id.0);
        advance(&mut flow, now);
        let moved = if now >= flow.finish { flow.bytes as f64 } else { (flow.bytes as f64 - flow.remaining).max(0.0) };
        for j in 0..flow.hops as usize {
            let r = flow.res[j];
            let p = flow.pos[j] as usize;
            let res = &mut self.res[r as usize];
            res.carried += moved;
            res.flows.swap_remove(p);
            if let Some(&moved_id) = res.flows.get(p)
                && let Some(Some(m)) = self.flows.get_mut(moved_id as usize)
            {
                for k in 0..m.hops as usize {
                    if m.res[k] == r {
                        m.pos[k] = p as u32;
                    }
                }
            }
        }
        self.touch(&flow.res[..flow.hops as usize], now);
        Some((flow.tag, flow.bytes, moved))
    }

    /// Current rate of a flow in bytes per second.
    pub fn rate(&self, id: FlowId) -> Option<f64> {
        self.flows.get(id.0 as usize)?.as_ref().map(|f| f.rate)
    }

    /// Sum of the rates of the flows crossing `r` (never above its capacity).
    pub fn used(&self, r: ResId) -> f64 {
        self.res[r.0 as usize].flows.iter().filter_map(|&f| self.flows[f as usize].as_ref()).map(|f| f.rate).sum()
    }

    /// Defers refills until [`FlowNet::end_batch`]: for starting or ending many flows
    /// at one instant (each resource is then water-filled once, not once per flow).
    pub fn begin_batch(&mut self) {
        self.batch.get_or_insert_with(Vec::new);
    }

    /// Refills every resource touched since [`FlowNet::begin_batch`].
    pub fn end_batch(&mut self, now: Nanos) {
        if let Some(mut touched) = self.batch.take() {
            touched.sort_unstable();
            touched.dedup();
            self.touch(&touched, now);
        }
    }

    /// Refills the resources a change touched, then (once) the resources whose
    /// allocations went stale because of it.
    fn touch(&mut self, resources: &[u32], now: Nanos) {
        if let Some(b) = self.batch.as_mut() {
            b.extend_from_slice(resources);
            return;
        }
        let mut stale = std::mem::take(&mut self.cascade);
        stale.clear();
        for &x in resources {
            self.refill(x, now, Some(&mut stale));
        }
        stale.sort_unstable();
        stale.dedup();
        for &y in &stale {
            self.refill(y, now, None);
        }
        self.cascade = stale;
    }

    /// Water-fills resource `x` over its flows' demands and updates their rates. With
    /// `stale`, collects the other resources whose allocation of a flow whose rate
    /// changed is now out of date: one that now binds the flow below what `x` would
    /// give it, or a saturated one whose flow now uses less than its share.
    fn refill(&mut self, x: u32, now: Nanos, mut stale: Option<&mut Vec<u32>>) {
        self.stats.refills += 1;
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        let cap = self.res[x as usize].cap;
        for &f in &self.res[x as usize].flows {
            let Some(flow) = self.flows[f as usize].as_ref() else { continue };
            let mut d = f64::INFINITY;
            for j in 0..flow.hops as usize {
                if flow.res[j] != x {
                    d = d.min(flow.offer[j]);
                }
            }
            buf.push((d, f));
        }
        buf.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let n = buf.len();
        let mut remaining = cap;
        let mut level = None;
        for (k, &(d, _)) in buf.iter().enumerate() {
            let share = remaining / (n - k) as f64;
            if d > share {
                level = Some(share);
                break;
            }
            remaining -= d;
        }
        self.res[x as usize].saturated = level.is_some();
        // Saturated: flows below the level get their demand, the rest the level, and
        // any flow could get the level. Unsaturated: every flow gets its demand plus an
        // equal part of the slack, and could get its demand plus all of the slack.
        let slack = remaining.max(0.0);
        let per_flow_slack = slack / n.max(1) as f64;
        for &(d, f) in &buf {
            let (a, offer) = match level {
                Some(l) => (d.min(l), l),
                None => (d + per_flow_slack, d + slack),
            };
            let Some(flow) = self.flows[f as usize].as_mut() else { continue };
            let hops = flow.hops as usize;
            let mut here = 0;
            for j in 0..hops {
                if flow.res[j] == x {
                    flow.alloc[j] = a;
                    flow.offer[j] = offer;
                    here = j;
                }
            }
            let rate = flow.alloc[..hops].iter().copied().fold(f64::INFINITY, f64::min);
            if rate == flow.rate {
                continue;
            }
            let old = flow.rate;
            advance(flow, now);
            flow.rate = rate;
            flow.finish = finish_time(flow, now);
            self.heap.update(f, flow.finish);
            self.stats.rate_changes += 1;
            if let Some(stale) = stale.as_deref_mut() {
                for j in 0..hops {
                    if j == here {
                        continue;
                    }
                    let y = flow.res[j];
                    let binds = flow.alloc[j] <= rate && flow.alloc[here] > rate;
                    if binds || (rate < old && self.res[y as usize].saturated) {
                        stale.push(y);
                    }
                }
            }
        }
        self.scratch = buf;
    }
}

/// Brings a flow's remaining bytes up to `now` at its current rate.
fn advance<T>(flow: &mut Flow<T>, now: Nanos) {
    if now > flow.updated {
        let dt = (now - flow.updated) as f64 * 1e-9;
        flow.remaining = (flow.remaining - flow.rate * dt).max(0.0);
        flow.updated = now;
    }
}

/// When a flow with its current remaining bytes and rate finishes (rounded up, so a
/// flow never finishes early).
fn finish_time<T>(flow: &Flow<T>, now: Nanos) -> Nanos {
    if flow.remaining <= 0.0 {
        return now;
    }
    if flow.rate <= 0.0 {
        return Nanos::MAX;
    }
    let dt = (flow.remaining / flow.rate * 1e9).ceil();
    if dt >= (Nanos::MAX - now) as f64 { Nanos::MAX } else { now + dt as Nanos }
}

/// An indexed binary min-heap of `(finish time, flow)`, ordered by time then flow id.
#[derive(Debug, Default)]
struct FlowHeap {
    heap: Vec<(Nanos, u32)>,
    /// Position of each flow in `heap` (`NONE` when absent).
    pos: Vec<u32>,
}

impl FlowHeap {
    fn len(&self) -> usize {
        self.heap.len()
    }

    fn peek(&self) -> Option<(Nanos, u32)> {
        self.heap.first().copied()
    }

    fn push(&mut self, id: u32, t: Nanos) {
        if self.pos.len() <= id as usize {
            self.pos.resize(id as usize + 1, NONE);
        }
        let i = self.heap.len();
        self.heap.push((t, id));
        self.pos[id as usize] = i as u32;
        self.up(i);
    }

    fn update(&mut self, id: u32, t: Nanos) {
        let Some(&p) = self.pos.get(id as usize) else { return };
        if p == NONE {
            return;
        }
        let i = p as usize;
        let old = self.heap[i].0;
        self.heap[i].0 = t;
        if t < old {
            self.up(i);
        } else {
            self.down(i);
        }
    }

    fn remove(&mut self, id: u32) {
        let Some(&p) = self.pos.get(id as usize) else { return };
        if p == NONE {
            return;
        }
        let i = p as usize;
        let last = self.heap.len() - 1;
        self.swap(i, last);
        self.heap.pop();
        self.pos[id as usize] = NONE;
        if i < self.heap.len() {
            self.down(i);
            self.up(i);
        }
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.pos[self.heap[a].1 as usize] = a as u32;
        self.pos[self.heap[b].1 as usize] = b as u32;
    }

    fn up(&mut self, mut i: usize) {
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.heap[i] < self.heap[parent] {
                self.swap(i, parent);
                i = parent;
            } else {
                break;
            }
        }
    }

    fn down(&mut self, mut i: usize) {
        let n = self.heap.len();
        loop {
            let l = 2 * i + 1;
            if l >= n {
                break;
            }
            let r = l + 1;
            let c = if r < n && self.heap[r] < self.heap[l] { r } else { l };
            if self.heap[c] < self.heap[i] {
                self.swap(i, c);
                i = c;
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const MB: f64 = 1e6;

    fn run_all(net: &mut FlowNet<u32>) -> Vec<(u32, Nanos)> {
        let mut done = Vec::new();
        while let Some((t, id)) = net.next_finish() {
            let (tag, _, _) = net.end(id, t).expect("live flow");
            done.push((tag, t));
        }
        done
    }

    #[test]
    fn one_flow_takes_bytes_over_rate() {
        let mut net = FlowNet::default();
        let up = net.add_resource(10.0 * MB);
        let down = net.add_resource(100.0 * MB);
        net.start(0, 10_000_000, &[up, down], 7);
        let done = run_all(&mut net);
        assert_eq!(done, vec![(7, 1_000_000_000)]);
        assert_eq!(net.carried(up), 10_000_000.0);
    }

    #[test]
    fn shared_sender_splits_fairly_and_speeds_up_when_one_ends() {
        let mut net = FlowNet::default();
        let up = net.add_resource(10.0 * MB);
        let d1 = net.add_resource(100.0 * MB);
        let d2 = net.add_resource(100.0 * MB);
        net.start(0, 5_000_000, &[up, d1], 1);
        net.start(0, 10_000_000, &[up, d2], 2);
        let done = run_all(&mut net);
        // Both at 5 MB/s: flow 1 ends at 1 s; flow 2 has 5 MB left at 10 MB/s.
        assert_eq!(done[0], (1, 1_000_000_000));
        assert!((done[1].1 as f64 - 1.5e9).abs() < 10.0, "{done:?}");
    }

    #[test]
    fn water_filling_gives_unused_share_to_others() {
        let mut net = FlowNet::default();
        let up = net.add_resource(30.0 * MB);
        let slow = net.add_resource(5.0 * MB);
        let fast1 = net.add_resource(100.0 * MB);
        let fast2 = net.add_resource(100.0 * MB);
        // The slow receiver caps its flow at 5; the other two share 25.
        let a = net.start(0, 1_000_000_000, &[up, slow], 1);
        let b = net.start(0, 1_000_000_000, &[up, fast1], 2);
        let c = net.start(0, 1_000_000_000, &[up, fast2], 3);
        // One more event at the sender lets it see the slow receiver's level.
        let d = net.start(0, 1, &[up, fast2], 4);
        net.end(d, 0);
        let rates: Vec<f64> = [a, b, c].iter().map(|&f| net.rate(f).unwrap_or(0.0) / MB).collect();
        assert!((rates[0] - 5.0).abs() < 1e-9, "{rates:?}");
        assert!((rates[1] - 12.5).abs() < 1e-9, "{rates:?}");
        assert!((rates[2] - 12.5).abs() < 1e-9, "{rates:?}");
        assert!(net.used(up) <= 30.0 * MB * (1.0 + 1e-12));
    }

    #[test]
    fn capacities_are_never_exceeded() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut net = FlowNet::default();
        let res: Vec<ResId> = (0..12).map(|_| net.add_resource(rng.gen_range(1.0..20.0) * MB)).collect();
        let mut live = Vec::new();
        let mut now = 0;
        for step in 0..2000u32 {
            now += rng.gen_range(0..1_000_000);
            if live.len() < 20 || rng.gen_bool(0.5) {
                let a = res[rng.gen_range(0..6)];
                let b = res[rng.gen_range(6..12)];
                live.push(net.start(now, rng.gen_range(1..5_000_000), &[a, b], step));
            } else {
                let f = live.swap_remove(rng.gen_range(0..live.len()));
                net.end(f, now);
            }
            for &r in &res {
                assert!(net.used(r) <= net.capacity(r) * (1.0 + 1e-9), "step {step}");
            }
        }
    }

    /// Exact max-min fair rates by progressive filling (the reference).
    fn exact_max_min(caps: &[f64], paths: &[Vec<usize>]) -> Vec<f64> {
        let mut rate = vec![0.0; paths.len()];
        let mut frozen = vec![false; paths.len()];
        let mut left = caps.to_vec();
        while frozen.iter().any(|f| !f) {
            // The resource whose equal share among its unfrozen flows is smallest.
            let mut best: Option<(f64, usize)> = None;
            for (r, &cap_left) in left.iter().enumerate() {
                let n = paths.iter().zip(&frozen).filter(|(p, f)| !**f && p.contains(&r)).count();
                if n > 0 {
                    let share = cap_left / n as f64;
                    if best.is_none_or(|(b, _)| share < b) {
                        best = Some((share, r));
                    }
                }
            }
            let Some((share, r)) = best else { break };
            for (i, p) in paths.iter().enumerate() {
                if !frozen[i] {
                    rate[i] += share;
                    for &q in p {
                        left[q] -= share;
                    }
                }
            }
            for (i, p) in paths.iter().enumerate() {
                if !frozen[i] && p.contains(&r) {
                    frozen[i] = true;
                }
            }
        }
        rate
    }

    #[test]
    fn close_to_exact_max_min_on_swarm_like_loads() {
        use rand::{Rng, SeedableRng};
        let (mut worst, mut sum, mut samples) = (f64::INFINITY, 0.0, 0);
        for seed in 0..20 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let nodes = 30;
            let mut caps = Vec::new();
            let mut net = FlowNet::default();
            let mut ups = Vec::new();
            let mut downs = Vec::new();
            for _ in 0..nodes {
                let (u, d) = (rng.gen_range(10.0..30.0) * MB, rng.gen_range(15.0..40.0) * MB);
                ups.push(net.add_resource(u));
                caps.push(u);
                downs.push(net.add_resource(d));
                caps.push(d);
            }
            // Flows arrive and leave as in a swarm; compare after each of the last 50 changes.
            let mut live: Vec<(FlowId, Vec<usize>)> = Vec::new();
            for step in 0..400u32 {
                if live.len() < 120 || rng.gen_bool(0.5) {
                    let s = rng.gen_range(0..nodes);
                    let r = (s + rng.gen_range(1..nodes)) % nodes;
                    let id = net.start(0, 1 << 40, &[ups[s], downs[r]], step);
                    live.push((id, vec![2 * s, 2 * r + 1]));
                } else {
                    let (id, _) = live.swap_remove(rng.gen_range(0..live.len()));
                    net.end(id, 0);
                }
                if step >= 350 {
                    let paths: Vec<Vec<usize>> = live.iter().map(|(_, p)| p.clone()).collect();
                    let exact: f64 = exact_max_min(&caps, &paths).iter().sum();
                    let model: f64 = live.iter().map(|(id, _)| net.rate(*id).unwrap_or(0.0)).sum();
                    worst = worst.min(model / exact);
                    sum += model / exact;
                    samples += 1;
                }
            }
        }
        // The incremental allocation keeps nearly all of the max-min throughput.
        let mean = sum / f64::from(samples);
        println!("throughput vs exact max-min: mean {mean:.4}, worst {worst:.4}");
        assert!(worst > 0.9 && mean > 0.97, "throughput vs exact max-min: mean {mean}, worst {worst}");
    }

    #[test]
    fn heap_orders_by_time_then_id() {
        let mut h = FlowHeap::default();
        for (id, t) in [(3u32, 5u64), (1, 5), (2, 1), (0, 9)] {
            h.push(id, t);
        }
        h.update(0, 0);
        h.remove(2);
        let mut out = Vec::new();
        while let Some((t, id)) = h.peek() {
            h.remove(id);
            out.push((t, id));
        }
        assert_eq!(out, vec![(0, 0), (5, 1), (5, 3)]);
    }

    #[test]
    fn lanes_and_heap_give_one_order_by_time_then_push() {
        // The same schedule twice: all through the heap, and fixed delays in lanes.
        let mut rng = StdRng::seed_from_u64(7);
        let (mut plain, mut laned) = (EventQueue::default(), EventQueue::default());
        let (mut now, mut id) = (0u64, 0u32);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..2_000 {
            for _ in 0..rng.gen_range(0..4) {
                id += 1;
                let delay = [0, 5, 5, 40, rng.gen_range(0..100)][rng.gen_range(0..5)];
                plain.push(now + delay, id);
                if delay % 5 == 0 && delay <= 40 {
                    laned.push_after(now, delay, id);
                } else {
                    laned.push(now + delay, id);
                }
            }
            assert_eq!(plain.len(), laned.len());
            assert_eq!(plain.peek_time(), laned.peek_time());
            if let (Some(x), Some(y)) = (plain.pop(), laned.pop()) {
                now = x.0;
                a.push(x);
                b.push(y);
            }
        }
        while let (Some(x), Some(y)) = (plain.pop(), laned.pop()) {
            a.push(x);
            b.push(y);
        }
        assert!(plain.is_empty() && laned.is_empty());
        assert!(a.windows(2).all(|w| w[0].0 <= w[1].0), "time order");
        assert_eq!(a, b);
    }
}
