//! Fair sharing of the pool between tenants.
//!
//! One FIFO queue lets a busy tenant starve everyone else: 200 queued transactions of tenant A put
//! tenant B's one transaction at the back. Here every tenant has its own queue, and a freed slot goes
//! to the waiting tenant that holds the fewest slots, taking turns among equals (round-robin), and
//! never to a tenant at its `max_active` limit. So a flood waits behind its own queue, and a tenant
//! with long transactions cannot slowly collect every slot while one with short transactions waits.
//! A tenant at its limit waits for one of its own transactions to end even when slots are free; a
//! tenant with `max_waiting` transactions queued is refused at once. Per-tenant counters
//! (transactions, wait time, refusals) feed `/tenants` and the bounded tenant metrics.
//!
//! A slot is a right to hold one backend connection; the pool (`super`) pairs it with a connection.
//! The pool's size lives here too, with the free and busy counts and what a shrink still owes, all
//! under one lock: a shrink that finds too few free slots is owed the rest, and every slot that
//! comes back (released or dropped) pays that debt before it is free again. So at every moment
//! `busy + free == size + owed`, and nothing is owed while a slot is free.

use std::collections::VecDeque;

// tenant keys come from verified tokens, not from clients' bytes: a fast hash (SipHash was
// about 300 instructions per transaction here)
use foldhash::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::config::LimitsConfig;

/// Counters of idle tenants are dropped once more than this many tenants are tracked.
const TRACKED_TENANTS: usize = 10_000;
/// Waiting tenants compared when a slot frees up (in turn order).
const SCAN_WINDOW: usize = 256;

pub type TenantKey = Arc<str>;

struct Waiter {
    id: u64,
    enqueued: Instant,
    tx: oneshot::Sender<()>,
}

#[derive(Default)]
struct TenantState {
    active: usize,
    queue: VecDeque<Waiter>,
    in_ring: bool,
    transactions: u64,
    wait: Duration,
    refusals: u64,
}

struct State {
    /// Slots the pool should have (`backend.pool_size`, as last reloaded).
    size: usize,
    free: usize,
    busy: usize,
    /// Busy slots a shrink still has to retire: taken from slots as they come back.
    owed: usize,
    tenants: HashMap<TenantKey, TenantState>,
    /// Tenants with someone queued, in turn order.
    ring: VecDeque<TenantKey>,
    next_id: u64,
    limits: Arc<LimitsConfig>,
    prune_at: usize,
    /// Pool-wide totals, kept when idle tenants' counters are pruned (`SHOW STATS`).
    totals: Totals,
}

/// Pool-wide counters since start (`SHOW STATS` on the console).
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    /// Transactions that got a slot.
    pub transactions: u64,
    /// Time transactions spent queued for a slot.
    pub wait: Duration,
}

pub struct Slots {
    state: Mutex<State>,
}

/// One tenant's right to hold a pooled connection; dropping it hands the slot on (or retires it,
/// when a shrink is owed one).
pub struct Slot {
    slots: Arc<Slots>,
    tenant: TenantKey,
    given_back: bool,
}

/// Why a tenant did not get a slot.
#[derive(Debug)]
pub enum Refusal {
    /// The tenant already had `limit` transactions queued (`key` names the config key).
    Waiting { limit: usize, key: String },
    /// Nothing came free in time; `at_limit` when the tenant held its own limit of slots.
    Timeout { at_limit: Option<(usize, String)> },
}

/// One tenant's figures, as `/tenants` shows them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TenantStats {
    pub tenant: String,
    pub active: usize,
    pub waiting: usize,
    pub transactions: u64,
    pub wait_seconds_total: f64,
    pub limit_refusals: u64,
    pub max_active: Option<usize>,
    pub max_waiting: Option<usize>,
}

impl Slots {
    pub fn new(size: usize, limits: Arc<LimitsConfig>) -> Arc<Slots> {
        Arc::new(Slots {
            state: Mutex::new(State {
                size,
                free: size,
                busy: 0,
                owed: 0,
                tenants: HashMap::default(),
                ring: VecDeque::new(),
                next_id: 0,
                limits,
                prune_at: TRACKED_TENANTS,
                totals: Totals::default(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot for `tenant`, waiting in the tenant's queue for at most `wait`.
    pub async fn acquire(self: &Arc<Self>, tenant: &TenantKey, wait: Duration) -> Result<Slot, Refusal> {
        let (id, rx) = {
            let mut guard = self.lock();
            let st = &mut *guard;
            let (max_active, max_waiting) = st.limits.for_tenant(tenant);
            let t = st.tenants.entry(tenant.clone()).or_default();
            if st.free > 0 && t.queue.is_empty() && max_active.is_none_or(|m| t.active < m) {
                t.active += 1;
                t.transactions += 1;
                st.totals.transactions += 1;
                st.free -= 1;
                st.busy += 1;
                return Ok(self.slot(tenant));
            }
            if let Some(limit) = max_waiting.filter(|&m| t.queue.len() >= m) {
                t.refusals += 1;
                return Err(Refusal::Waiting { limit, key: st.limits.key_for(tenant, true) });
            }
            let (tx, rx) = oneshot::channel();
            let id = st.next_id;
            st.next_id += 1;
            t.queue.push_back(Waiter { id, enqueued: Instant::now(), tx });
            if !t.in_ring {
                t.in_ring = true;
                st.ring.push_back(tenant.clone());
            }
            (id, rx)
        };
        let mut pending = Pending { slots: self.clone(), tenant: tenant.clone(), id, rx: Some(rx) };
        let granted = match tokio::time::timeout(wait, pending.rx.as_mut().expect("set above")).await {
            Ok(Ok(())) => {
                pending.rx = None;
                true
            }
            _ => pending.resolve(),
        };
        if granted {
            return Ok(self.slot(tenant));
        }
        let mut st = self.lock();
        let (max_active, _) = st.limits.for_tenant(tenant);
        let key = st.limits.key_for(tenant, false);
        let t = st.tenants.entry(tenant.clone()).or_default();
        t.refusals += 1;
        let at_limit = max_active.filter(|&m| t.active >= m).map(|m| (m, key));
        Err(Refusal::Timeout { at_limit })
    }

    fn slot(self: &Arc<Self>, tenant: &TenantKey) -> Slot {
        Slot { slots: self.clone(), tenant: tenant.clone(), given_back: false }
    }

    /// Hands a busy slot back: a shrink that is owed a slot retires it, else it goes to the next
    /// tenant in turn. Returns whether it was retired.
    fn give_back(&self, tenant: &TenantKey) -> bool {
        let mut st = self.lock();
        if let Some(t) = st.tenants.get_mut(tenant) {
            t.active = t.active.saturating_sub(1);
        }
        st.busy = st.busy.saturating_sub(1);
        let retired = st.owed > 0;
        if retired {
            st.owed -= 1;
        } else {
            st.free += 1;
            st.dispatch();
        }
        if st.tenants.len() > st.prune_at {
            st.tenants.retain(|_, t| t.active > 0 || t.in_ring);
            st.prune_at = TRACKED_TENANTS.max(st.tenants.len() * 2);
        }
        retired
    }

    /// The number of slots the pool should have.
    pub fn size(&self) -> usize {
        self.lock().size
    }

    /// Busy slots a shrink still has to retire.
    pub fn owed(&self) -> usize {
        self.lock().owed
    }

    /// Grows or shrinks the pool to `new` slots. Growing first cancels what an earlier shrink
    /// still owes; shrinking retires free slots now and busy ones as they come back.
    pub fn resize(&self, new: usize) {
        let mut st = self.lock();
        let old = std::mem::replace(&mut st.size, new);
        if new > old {
            let add = new - old;
            let cancel = st.owed.min(add);
            st.owed -= cancel;
            st.free += add - cancel;
            st.dispatch();
        } else {
            let want = old - new;
            let now = want.min(st.free);
            st.free -= now;
            st.owed += want - now;
        }
    }

    /// Panics unless the counts agree (tests): `busy + free == size + owed`, nothing owed while
    /// a slot is free, and the tenants hold the busy slots.
    #[cfg(test)]
    fn assert_consistent(&self) {
        let st = self.lock();
        let (size, free, busy, owed) = (st.size, st.free, st.busy, st.owed);
        assert_eq!(busy + free, size + owed, "busy {busy} + free {free} != size {size} + owed {owed}");
        assert!(owed == 0 || free == 0, "{free} free while {owed} owed");
        assert_eq!(st.tenants.values().map(|t| t.active).sum::<usize>(), busy);
    }

    /// New limits (config reload); raised limits let waiting tenants in at once.
    pub fn set_limits(&self, limits: Arc<LimitsConfig>) {
        let mut st = self.lock();
        st.limits = limits;
        st.dispatch();
    }

    /// (free, busy, waiting) slots right now.
    pub fn counts(&self) -> (usize, usize, usize) {
        let st = self.lock();
        let waiting = st.ring.iter().filter_map(|k| st.tenants.get(k)).map(|t| t.queue.len()).sum();
        (st.free, st.busy, waiting)
    }

    /// Pool-wide totals since start, and how long the longest-waiting transaction has waited now.
    pub fn totals(&self) -> (Totals, Duration) {
        let st = self.lock();
        let oldest = st.ring.iter().filter_map(|k| st.tenants.get(k)?.queue.front()).map(|w| w.enqueued.elapsed()).max();
        (st.totals, oldest.unwrap_or_default())
    }

    /// Figures of every tracked tenant (pgtenant's own use of the pool left out).
    pub fn stats(&self) -> Vec<TenantStats> {
        let st = self.lock();
        st.tenants
            .iter()
            .filter(|(k, _)| &***k != super::INTERNAL_KEY)
            .map(|(k, t)| {
                let (max_active, max_waiting) = st.limits.for_tenant(k);
                TenantStats {
                    tenant: k.to_string(),
                    active: t.active,
                    waiting: t.queue.len(),
                    transactions: t.transactions,
                    wait_seconds_total: t.wait.as_secs_f64(),
                    limit_refusals: t.refusals,
                    max_active,
                    max_waiting,
                }
            })
            .collect()
    }
}

impl State {
    /// Gives free slots to waiting tenants, one at a time: the waiting tenant that holds the fewest
    /// slots goes first (so tenants with long transactions cannot crowd out those with short ones:
    /// a max-min fair share), and among equals the one whose turn came longest ago (round-robin).
    /// Tenants at their `max_active` limit are passed over and keep their place.
    fn dispatch(&mut self) {
        while self.free > 0 {
            let Some(i) = self.next_in_turn() else { break };
            let name = self.ring.remove(i).expect("index from next_in_turn");
            let t = self.tenants.get_mut(&name).expect("checked by next_in_turn");
            let w = t.queue.pop_front().expect("checked by next_in_turn");
            t.wait += w.enqueued.elapsed();
            self.totals.wait += w.enqueued.elapsed();
            if w.tx.send(()).is_ok() {
                t.active += 1;
                t.transactions += 1;
                self.totals.transactions += 1;
                self.free -= 1;
                self.busy += 1;
            }
            if t.queue.is_empty() {
                t.in_ring = false;
            } else {
                self.ring.push_back(name);
            }
        }
    }

    /// The ring position of the tenant to serve next, dropping tenants whose queue emptied (their
    /// clients went away) on the way. Looks at the first `SCAN_WINDOW` waiting tenants only, so a
    /// release costs a bounded amount of work however many tenants wait.
    fn next_in_turn(&mut self) -> Option<usize> {
        let mut best: Option<(usize, usize)> = None; // (position, active)
        let mut i = 0;
        while i < self.ring.len().min(SCAN_WINDOW) {
            let name = self.ring[i].clone();
            let (max_active, _) = self.limits.for_tenant(&name);
            let Some(t) = self.tenants.get_mut(&name) else {
                self.ring.remove(i);
                continue;
            };
            while t.queue.front().is_some_and(|w| w.tx.is_closed()) {
                t.queue.pop_front(); // its client went away
            }
            if t.queue.is_empty() {
                t.in_ring = false;
                self.ring.remove(i);
                continue;
            }
            let eligible = max_active.is_none_or(|m| t.active < m);
            if eligible && best.is_none_or(|(_, a)| t.active < a) {
                best = Some((i, t.active));
            }
            i += 1;
        }
        best.map(|(i, _)| i)
    }
}

impl Slot {
    /// Hands the slot back now; true when a shrink retired it (its connection must go too).
    pub fn give_back(mut self) -> bool {
        self.given_back = true;
        self.slots.give_back(&self.tenant)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.given_back {
            self.slots.give_back(&self.tenant);
        }
    }
}

/// A queued request; if its task goes away after a slot was granted, the slot is handed on.
struct Pending {
    slots: Arc<Slots>,
    tenant: TenantKey,
    id: u64,
    rx: Option<oneshot::Receiver<()>>,
}

impl Pending {
    /// Stops waiting: true when a slot was granted meanwhile (it is then the caller's).
    fn resolve(&mut self) -> bool {
        let Some(mut rx) = self.rx.take() else { return false };
        let mut st = self.slots.lock();
        let st = &mut *st;
        if let Some(t) = st.tenants.get_mut(&self.tenant) {
            if let Some(pos) = t.queue.iter().position(|w| w.id == self.id) {
                let w = t.queue.remove(pos).expect("position is valid");
                t.wait += w.enqueued.elapsed();
                st.totals.wait += w.enqueued.elapsed();
                return false;
            }
        }
        rx.try_recv().is_ok()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.rx.is_some() && self.resolve() {
            self.slots.give_back(&self.tenant);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> TenantKey {
        Arc::from(s)
    }

    fn limits(text: &str) -> Arc<LimitsConfig> {
        Arc::new(toml::from_str(text).unwrap())
    }

    #[tokio::test]
    async fn freed_slots_go_round_robin_between_tenants() {
        let s = Slots::new(1, limits(""));
        let (a, b) = (key("a"), key("b"));
        let first = s.acquire(&a, Duration::from_secs(1)).await.unwrap();
        // three of A queue first, then one of B
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, t) in [(0, &a), (1, &a), (2, &a), (3, &b)] {
            let (s, t, order) = (s.clone(), t.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let slot = s.acquire(&t, Duration::from_secs(5)).await.unwrap();
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(slot);
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        // B's one transaction goes second, not behind all of A's
        assert_eq!(*order.lock().unwrap(), vec![0, 3, 1, 2]);
        assert_eq!(s.counts(), (1, 0, 0));
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_tenant_holding_fewest() {
        let s = Slots::new(3, limits(""));
        let (a, b) = (key("a"), key("b"));
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(s.acquire(&a, Duration::from_millis(10)).await.unwrap());
        }
        // A queues first, B after; A holds every slot
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, t) in [(0, &a), (1, &b)] {
            let (s, t, order) = (s.clone(), t.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let slot = s.acquire(&t, Duration::from_secs(5)).await.unwrap();
                order.lock().unwrap().push(i);
                slot
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // one of A's slots frees up: B (holding none) gets it although A queued first
        drop(held.pop());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(*order.lock().unwrap(), vec![1]);
        drop(held);
        for t in tasks {
            drop(t.await.unwrap());
        }
        assert_eq!(s.counts(), (3, 0, 0));
    }

    #[tokio::test]
    async fn limits_make_a_tenant_wait_or_refuse() {
        let s = Slots::new(4, limits("max_active_per_tenant = 1\nmax_waiting_per_tenant = 1\n[tenants.\"b\"]\nmax_active = 2"));
        let (a, b) = (key("a"), key("b"));
        let held = s.acquire(&a, Duration::from_millis(10)).await.unwrap();
        // at its limit A waits although slots are free, and times out naming the limit
        match s.acquire(&a, Duration::from_millis(20)).await {
            Err(Refusal::Timeout { at_limit: Some((1, k)) }) => assert_eq!(k, "limits.max_active_per_tenant"),
            other => panic!("{:?}", other.err()),
        }
        // one queued is allowed, a second is refused at once
        let s2 = s.clone();
        let a2 = a.clone();
        let queued = tokio::spawn(async move { s2.acquire(&a2, Duration::from_secs(5)).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        match s.acquire(&a, Duration::from_secs(5)).await {
            Err(Refusal::Waiting { limit: 1, key }) => assert_eq!(key, "limits.max_waiting_per_tenant"),
            other => panic!("{:?}", other.err()),
        }
        // B's override allows two at once
        let _b1 = s.acquire(&b, Duration::from_millis(10)).await.unwrap();
        let _b2 = s.acquire(&b, Duration::from_millis(10)).await.unwrap();
        drop(held);
        queued.await.unwrap().unwrap();
        let stats = s.stats();
        let sa = stats.iter().find(|t| t.tenant == "a").unwrap();
        assert_eq!((sa.transactions, sa.limit_refusals, sa.active), (2, 2, 0));
    }

    #[tokio::test]
    async fn abandoned_waits_hand_their_slot_on() {
        let s = Slots::new(1, limits(""));
        let a = key("a");
        let held = s.acquire(&a, Duration::from_millis(10)).await.unwrap();
        let s2 = s.clone();
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { s2.acquire(&a2, Duration::from_secs(30)).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        waiter.abort();
        let _ = waiter.await;
        drop(held);
        // the slot is free again: nobody leaked it
        assert_eq!(s.counts(), (1, 0, 0));
        let _again = s.acquire(&a, Duration::from_millis(10)).await.unwrap();
    }

    #[tokio::test]
    async fn idle_tenants_are_forgotten_beyond_the_cap() {
        let s = Slots::new(2, limits(""));
        let busy = s.acquire(&key("busy"), Duration::from_millis(10)).await.unwrap();
        for i in 0..TRACKED_TENANTS + 10 {
            drop(s.acquire(&key(&format!("t{i}")), Duration::from_millis(10)).await.unwrap());
        }
        // the pass that ran once the cap was crossed kept only the tenant holding a slot
        let tracked = s.stats().len();
        assert!(tracked < 100, "{tracked} tenants still tracked");
        assert!(s.stats().iter().any(|t| t.tenant == "busy" && t.active == 1));
        drop(busy);
        assert_eq!(s.counts(), (2, 0, 0));
    }

    #[test]
    fn shrink_is_owed_and_grow_cancels_it() {
        let s = Slots::new(3, limits(""));
        s.resize(1);
        assert_eq!((s.counts().0, s.owed(), s.size()), (1, 0, 1));
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let held = rt.block_on(s.acquire(&key("a"), Duration::from_millis(10))).unwrap();
        s.resize(0);
        assert_eq!((s.counts().0, s.owed()), (0, 1));
        assert!(held.give_back());
        assert_eq!((s.counts(), s.owed()), ((0, 0, 0), 0));
    }

    #[test]
    fn a_dropped_slot_pays_what_a_shrink_owes() {
        let s = Slots::new(2, limits(""));
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let held = rt.block_on(s.acquire(&key("a"), Duration::from_millis(10))).unwrap();
        let other = rt.block_on(s.acquire(&key("a"), Duration::from_millis(10))).unwrap();
        s.resize(1);
        drop(held); // not released: still retired, never free while a shrink is owed
        assert_eq!((s.counts(), s.owed()), ((0, 1, 0), 0));
        assert!(!other.give_back());
        assert_eq!(s.counts(), (1, 0, 0));
    }

    /// Resizes race with acquires, releases and drops on several threads; the counts agree at
    /// every step, and once everything is back the pool holds exactly its size.
    #[test]
    fn resizes_racing_with_acquire_release_and_drop_keep_the_counts() {
        use rand::{Rng, SeedableRng};
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_time().build().unwrap();
        let s = Slots::new(8, limits("max_active_per_tenant = 6"));
        rt.block_on(async {
            let mut tasks = Vec::new();
            for seed in 0..8u64 {
                let s = s.clone();
                tasks.push(tokio::spawn(async move {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                    let tenant = key(&format!("t{}", seed % 3));
                    let mut held: Vec<Slot> = Vec::new();
                    for _ in 0..20_000 {
                        match rng.random_range(0..10) {
                            0..=3 => {
                                if let Ok(slot) = s.acquire(&tenant, Duration::from_micros(50)).await {
                                    held.push(slot);
                                }
                            }
                            4 | 5 if !held.is_empty() => {
                                // what `Pool::release` does
                                held.swap_remove(rng.random_range(0..held.len())).give_back();
                            }
                            6 if !held.is_empty() => drop(held.swap_remove(0)),
                            7 => s.resize(rng.random_range(0..=16)),
                            _ => tokio::task::yield_now().await,
                        }
                        s.assert_consistent();
                    }
                    for slot in held {
                        slot.give_back();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
        s.assert_consistent();
        assert_eq!((s.counts(), s.owed()), ((s.size(), 0, 0), 0));
    }
}
