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

async fn run_shard(
    id: usize,
    ctx: Arc<Context>,
    tx: UnboundedSender<Msg>,
    mut rx: UnboundedReceiver<Msg>,
    mut stop: watch::Receiver<bool>,
) {
    let mut queue: VecDeque<ClusterKey> = VecDeque::new();
    let mut queued: HashSet<ClusterKey> = HashSet::new();
    // At most one pending timer per cluster (the earliest): a cluster woken by events while a
    // timer is pending must not start a second periodic chain.
    let mut timers: BTreeMap<(Instant, u64), ClusterKey> = BTreeMap::new();
    let mut timer_of: HashMap<ClusterKey, (Instant, u64)> = HashMap::new();
    let mut seq = 0u64;
    let mut schedule = |timers: &mut BTreeMap<(Instant, u64), ClusterKey>,
                        timer_of: &mut HashMap<ClusterKey, (Instant, u64)>,
                        key: ClusterKey,
                        at: Instant| {
        if let Some(existing) = timer_of.get(&key) {
            if existing.0 <= at {
                return;
            }
            timers.remove(existing);
        }
        seq += 1;
        timers.insert((at, seq), key.clone());
        timer_of.insert(key, (at, seq));
    };
    let mut slots: HashMap<ClusterKey, ClusterSlot> = HashMap::new();

    let enqueue = |queue: &mut VecDeque<ClusterKey>, queued: &mut HashSet<ClusterKey>, key: ClusterKey| {
        if queued.insert(key.clone()) {
            queue.push_back(key);
        }
    };

    loop {
        if *stop.borrow() {
            break;
        }
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Msg::Reconcile(k) => enqueue(&mut queue, &mut queued, k),
                Msg::Forget(k) => forget(&ctx, id, &mut slots, &k),
            }
        }
        let now = Instant::now();
        while let Some(entry) = timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            timer_of.remove(&key);
            enqueue(&mut queue, &mut queued, key);
        }

        if let Some(key) = queue.pop_front() {
            queued.remove(&key);
            if ctx.cache.cluster(&key).is_none() {
                // Deleted: forget it at once (its children go with garbage collection).
                if let Some(t) = timer_of.remove(&key) {
                    timers.remove(&t);
                }
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
                Ok(Next::Continue) => enqueue(&mut queue, &mut queued, key),
                Ok(Next::After(d)) => schedule(&mut timers, &mut timer_of, key, Instant::now() + d),
                Err(e) => {
                    slot.failures += 1;
                    let delay = backoff(slot.failures);
                    ctx.metrics.reconcile_error(e.reason());
                    warn!("{key}: reconcile failed (retry in {:.1}s): {e}", delay.as_secs_f64());
                    schedule(&mut timers, &mut timer_of, key, Instant::now() + delay);
                }
            }
            ctx.metrics.shard_clusters(id, slots.len());
            // Let the runtime serve others (watch tasks, health) between clusters.
            tokio::task::yield_now().await;
            continue;
        }

        let next_timer = timers.keys().next().map(|(t, _)| *t);
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Msg::Reconcile(k)) => enqueue(&mut queue, &mut queued, k),
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
