//! Shards: each RayCluster belongs to one of N async worker tasks, chosen by a stable hash of
//! `namespace/name`. A shard owns its clusters' reconcile loop and in-memory state, so there is no
//! global lock on the hot path, and a cluster's work is never done by two tasks at once.
//!
//! Fairness: a shard serves its clusters round-robin from a de-duplicated queue, and a cluster that
//! hit its per-pass pod-creation budget goes to the back, so one cluster's 500-pod scale-up cannot
//! delay another cluster's head.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::cache::ClusterKey;
use crate::reconciler::{self, ClusterSlot, Context, Next};

/// Stable shard of a cluster (FNV-1a of `namespace/name`; the same in every replica and release).
pub fn shard_of(key: &ClusterKey, shards: usize) -> usize {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in key.namespace.bytes().chain(std::iter::once(b'/')).chain(key.name.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    (h % shards.max(1) as u64) as usize
}

enum Msg {
    Reconcile(ClusterKey),
    Forget(ClusterKey),
}

struct Shard {
    tx: UnboundedSender<Msg>,
    task: JoinHandle<()>,
}

/// The running shards of a leader.
pub struct Shards {
    shards: DashMap<usize, Shard>,
    count: usize,
    stop: watch::Sender<bool>,
}

impl Shards {
    /// Starts `count` shard tasks.
    pub fn start(ctx: Arc<Context>, count: usize) -> Self {
        let count = count.max(1);
        let (stop, stop_rx) = watch::channel(false);
        let shards = DashMap::new();
        for id in 0..count {
            let (tx, rx) = unbounded_channel();
            let task = tokio::spawn(run_shard(id, ctx.clone(), tx.clone(), rx, stop_rx.clone()));
            shards.insert(id, Shard { tx, task });
        }
        Self { shards, count, stop }
    }

    pub fn reconcile(&self, key: ClusterKey) {
        if let Some(s) = self.shards.get(&shard_of(&key, self.count)) {
            let _ = s.tx.send(Msg::Reconcile(key));
        }
    }

    pub fn forget(&self, key: ClusterKey) {
        if let Some(s) = self.shards.get(&shard_of(&key, self.count)) {
            let _ = s.tx.send(Msg::Forget(key));
        }
    }

    /// Graceful stop: each shard finishes the reconcile it is in (its writes complete), starts no
    /// new one, and exits.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let tasks: Vec<JoinHandle<()>> = self.shards.into_iter().map(|(_, s)| s.task).collect();
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Immediate stop (fencing): abort every shard now, even mid-request.
    pub fn abort(self) {
        let _ = self.stop.send(true);
        for (_, s) in self.shards {
            s.task.abort();
        }
    }
}

fn backoff(failures: u32) -> Duration {
    let base = 200u64.saturating_mul(1 << failures.min(9)).min(60_000);
    // Jitter from the clock's sub-second digits: enough to keep retries of many clusters apart.
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    Duration::from_millis(base + u64::from(nanos) % (base / 2 + 1))
}

/// Drops a deleted cluster's slot (and with it its GCS link).
fn forget(ctx: &Context, id: usize, slots: &mut HashMap<ClusterKey, ClusterSlot>, key: &ClusterKey) {
    if slots.remove(key).is_some() {
        ctx.metrics.shard_clusters(id, slots.len());
    }
}

/// At most one pending timer per cluster, the earliest: a cluster woken by events while a timer
/// is pending must not start a second periodic chain.
#[derive(Default)]
struct Timers {
    by_time: BTreeMap<(Instant, u64), ClusterKey>,
    of: HashMap<ClusterKey, (Instant, u64)>,
    seq: u64,
}

impl Timers {
    /// Wakes `key` at `at`, unless it is to be woken earlier already.
    fn schedule(&mut self, key: ClusterKey, at: Instant) {
        if let Some(existing) = self.of.get(&key) {
            if existing.0 <= at {
                return;
            }
            self.by_time.remove(existing);
        }
        self.seq += 1;
        self.by_time.insert((at, self.seq), key.clone());
        self.of.insert(key, (at, self.seq));
    }

    fn cancel(&mut self, key: &ClusterKey) {
        if let Some(t) = self.of.remove(key) {
            self.by_time.remove(&t);
        }
    }

    /// The next cluster whose timer is due at `now`.
    fn pop_due(&mut self, now: Instant) -> Option<ClusterKey> {
        let entry = self.by_time.first_entry().filter(|e| e.key().0 <= now)?;
        let key = entry.remove();
        self.of.remove(&key);
        Some(key)
    }

    fn next(&self) -> Option<Instant> {
        self.by_time.keys().next().map(|(t, _)| *t)
    }
}

/// Clusters waiting for a pass, each at most once, in arrival order.
#[derive(Default)]
struct RunQueue {
    queue: VecDeque<ClusterKey>,
    queued: HashSet<ClusterKey>,
}

impl RunQueue {
    fn push(&mut self, key: ClusterKey) {
        if self.queued.insert(key.clone()) {
            self.queue.push_back(key);
        }
    }

    fn pop(&mut self) -> Option<ClusterKey> {
        let key = self.queue.pop_front()?;
        self.queued.remove(&key);
        Some(key)
    }
}

async fn run_shard(
    id: usize,
    ctx: Arc<Context>,
    tx: UnboundedSender<Msg>,
    mut rx: UnboundedReceiver<Msg>,
    mut stop: watch::Receiver<bool>,
) {
    let mut queue = RunQueue::default();
    let mut timers = Timers::default();
    let mut slots: HashMap<ClusterKey, ClusterSlot> = HashMap::new();
    loop {
        if *stop.borrow() {
            break;
        }
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Msg::Reconcile(k) => queue.push(k),
                Msg::Forget(k) => forget(&ctx, id, &mut slots, &k),
            }
        }
        while let Some(key) = timers.pop_due(Instant::now()) {
            queue.push(key);
        }

        if let Some(key) = queue.pop() {
            if ctx.cache.cluster(&key).is_none() {
                // Deleted: forget it at once (its children go with garbage collection).
                timers.cancel(&key);
                forget(&ctx, id, &mut slots, &key);
                continue;
            }
            let slot = slots.entry(key.clone()).or_insert_with(|| {
                // The cluster's GCS link wakes it here when Ray's state changes.
                let (tx, k) = (tx.clone(), key.clone());
                ClusterSlot {
                    wake: Some(Arc::new(move || drop(tx.send(Msg::Reconcile(k.clone()))))),
                    ..Default::default()
                }
            });
            let started = Instant::now();
            let result = reconciler::reconcile(&ctx, &key, slot).await;
            ctx.metrics.reconciled(started.elapsed().as_secs_f64());
            if result.is_ok() {
                slot.failures = 0;
            }
            match result {
                Ok(Next::Idle) => {}
                Ok(Next::Continue) => queue.push(key),
                Ok(Next::After(d)) => timers.schedule(key, Instant::now() + d),
                Err(e) => {
                    slot.failures += 1;
                    let delay = backoff(slot.failures);
                    ctx.metrics.reconcile_error(e.reason());
                    warn!("{key}: reconcile failed (retry in {:.1}s): {e}", delay.as_secs_f64());
                    timers.schedule(key, Instant::now() + delay);
                }
            }
            ctx.metrics.shard_clusters(id, slots.len());
            // Let the runtime serve others (watch tasks, health) between clusters.
            tokio::task::yield_now().await;
            continue;
        }

        let next_timer = timers.next();
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Msg::Reconcile(k)) => queue.push(k),
                Some(Msg::Forget(k)) => forget(&ctx, id, &mut slots, &k),
                None => break,
            },
            _ = async {
                match next_timer {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
            _ = stop.changed() => {}
        }
    }
    debug!("shard {id} stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> ClusterKey {
        ClusterKey::new("ns", n)
    }

    #[test]
    fn one_timer_per_cluster_and_the_earliest_wins() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        timers.schedule(key("a"), t0 + Duration::from_secs(5));
        timers.schedule(key("a"), t0 + Duration::from_secs(9));
        assert_eq!(timers.next(), Some(t0 + Duration::from_secs(5)), "a later timer does not replace an earlier one");
        timers.schedule(key("a"), t0 + Duration::from_secs(1));
        timers.schedule(key("b"), t0 + Duration::from_secs(2));
        assert_eq!(timers.pop_due(t0), None, "nothing due yet");
        assert_eq!(timers.pop_due(t0 + Duration::from_secs(3)), Some(key("a")));
        assert_eq!(timers.pop_due(t0 + Duration::from_secs(3)), Some(key("b")));
        assert_eq!(timers.pop_due(t0 + Duration::from_secs(60)), None, "a's replaced 5 s timer is gone");
    }

    #[test]
    fn cancelled_timers_never_fire() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        timers.schedule(key("a"), t0);
        timers.cancel(&key("a"));
        assert_eq!(timers.pop_due(t0 + Duration::from_secs(1)), None);
        assert_eq!(timers.next(), None);
    }

    #[test]
    fn the_run_queue_holds_each_cluster_once_in_order() {
        let mut q = RunQueue::default();
        for n in ["a", "b", "a", "c", "b"] {
            q.push(key(n));
        }
        let order: Vec<ClusterKey> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, vec![key("a"), key("b"), key("c")]);
        q.push(key("a"));
        assert_eq!(q.pop(), Some(key("a")), "popped clusters may queue again");
    }
}
