//! The connection from one RayCluster to its head's GCS: a task that polls the cluster state,
//! sends drains and reports, and wakes the cluster's reconcile when something changed.
//!
//! It runs beside the shard, not in it, so a slow or unreachable GCS never holds up the other
//! clusters of the shard: the reconcile only reads the latest snapshot.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

pub use super::scale::{DrainState, LinkHealth};
use crate::metrics::Metrics;
use crate::ray::{
    AutoscalingReport, ClusterState, DrainReason, GcsClient, MAX_REPLY_BYTES, RayError, SMALL_REPLY_BYTES,
};

/// Wakes the owning shard to reconcile this cluster.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// How often an unchanged report is sent again anyway, so the GCS's view (`ray status`) is
/// restored soon after anything on its side lost it.
const REPORT_REFRESH: Duration = Duration::from_secs(30);

/// What the link task and its handle share: the latest answers and the outgoing requests.
#[derive(Default)]
struct LinkState {
    /// Shared with the passes that read it, never copied: a big cluster's state is large.
    snapshot: Option<(Arc<ClusterState>, Instant)>,
    health: Option<LinkHealth>,
    /// The report waiting to be sent.
    report: Option<AutoscalingReport>,
    /// The content of the last report the GCS accepted (version cleared) and when it was sent.
    sent: Option<(AutoscalingReport, Instant)>,
    drains: BTreeMap<String, (String, DrainState)>,
}

/// A report with the fields that change on every decision, whatever was decided, cleared: two
/// reports with equal content say the same thing to the GCS.
fn content(r: &AutoscalingReport) -> AutoscalingReport {
    AutoscalingReport { cluster_state_version: 0, ..r.clone() }
}

/// The GCS call slots all links share, in two pools. A head that is slow, silent, failing or
/// sends big replies must not keep the others waiting, and its replies must not add up to the
/// operator's memory limit: a link whose last turn failed, took more than half the call timeout,
/// or whose replies outgrew [`SMALL_REPLY_BYTES`] takes its turns from the small `slow` pool
/// (where replies up to [`MAX_REPLY_BYTES`] are accepted), until a turn is quick and small again.
/// Healthy heads keep the `fast` pool to themselves.
pub struct GcsSlots {
    fast: Semaphore,
    slow: Semaphore,
}

impl GcsSlots {
    /// `total` slots, an eighth of them (at least one) for the slow pool.
    pub fn new(total: usize) -> Self {
        let slow = (total / 8).max(1);
        Self { fast: Semaphore::new(total.saturating_sub(slow).max(1)), slow: Semaphore::new(slow) }
    }
}

/// Handle held by the cluster's state in its shard; dropping it stops the task.
pub struct RayLink {
    addr: String,
    shared: Arc<Mutex<LinkState>>,
    kick: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Drop for RayLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RayLink {
    /// Starts polling `addr` (`host:port` of the GCS) every `interval`.
    pub fn start(
        log_prefix: String,
        addr: String,
        interval: Duration,
        timeout: Duration,
        metrics: Arc<Metrics>,
        permits: Arc<GcsSlots>,
        wake: Waker,
    ) -> Self {
        let shared = Arc::new(Mutex::new(LinkState::default()));
        let kick = Arc::new(Notify::new());
        let (s, k) = (shared.clone(), kick.clone());
        let task = tokio::spawn(run(log_prefix, addr.clone(), interval, timeout, s, k, metrics, permits, wake));
        Self { addr, shared, kick, task }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        // A poisoned lock only means a panic elsewhere; the data is still usable.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The latest cluster state, if the GCS answered and the answer is fresh enough.
    pub fn snapshot(&self, max_age: Duration) -> Option<Arc<ClusterState>> {
        let s = self.lock();
        let healthy = s.health == Some(LinkHealth::Healthy);
        s.snapshot.as_ref().filter(|(_, at)| healthy && at.elapsed() <= max_age).map(|(st, _)| st.clone())
    }

    pub fn health(&self) -> LinkHealth {
        self.lock().health.clone().unwrap_or(LinkHealth::Connecting)
    }

    /// Queues the report to send (the newest replaces an unsent older one). A report that says
    /// something new is sent at once (the link polls early); one equal to what the GCS already has
    /// is dropped, and refreshed with the regular poll every [`REPORT_REFRESH`]. Never kicking
    /// for an unchanged report matters: each reconcile reports, and each poll can wake a
    /// reconcile, so kicking every time would poll the GCS in a loop.
    pub fn report(&self, report: AutoscalingReport) {
        let mut s = self.lock();
        let new = content(&report);
        match &s.sent {
            Some((sent, at)) if *sent == new && at.elapsed() < REPORT_REFRESH => {}
            Some((sent, _)) if *sent == new => s.report = Some(report),
            _ => {
                let changed = s.report.as_ref().is_none_or(|queued| content(queued) != new);
                s.report = Some(report);
                drop(s);
                if changed {
                    self.kick.notify_one();
                }
            }
        }
    }

    /// Asks the GCS to drain a node (idle termination) unless already asked.
    pub fn drain(&self, pod: &str, node_id: &str) {
        let mut s = self.lock();
        if !s.drains.contains_key(pod) {
            s.drains.insert(pod.to_string(), (node_id.to_string(), DrainState::Requested));
            drop(s);
            self.kick.notify_one();
        }
    }

    /// Drain states by pod.
    pub fn drains(&self) -> BTreeMap<String, DrainState> {
        self.lock().drains.iter().map(|(k, (_, st))| (k.clone(), st.clone())).collect()
    }

    /// Forgets the drains of these pods (gone, or rejected so a later attempt may ask again).
    pub fn forget_drains(&self, pods: &[String]) {
        let mut s = self.lock();
        for pod in pods {
            s.drains.remove(pod);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    prefix: String,
    addr: String,
    interval: Duration,
    timeout: Duration,
    shared: Arc<Mutex<LinkState>>,
    kick: Arc<Notify>,
    metrics: Arc<Metrics>,
    permits: Arc<GcsSlots>,
    wake: Waker,
) {
    let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
    // Boxed: the client is 336 bytes, and inline it would sit in every link task's future (one
    // per cluster) even while the head is unreachable and no client exists.
    let mut client: Option<Box<GcsClient>> = None;
    let mut failures = 0u32;
    // In the slow pool (see GcsSlots).
    let mut slow = false;
    loop {
        let started = Instant::now();
        // A bounded number of GCS conversations at once, whatever the number of clusters: keeps the
        // operator's memory flat (each connection has its buffers) and spreads the polls out.
        let pool = if slow { &permits.slow } else { &permits.fast };
        let Ok(_permit) = pool.acquire().await else { return };
        // The whole turn (poll, drains, report) holds the slot at most this long. Timed from
        // the slot, not from the wait for it: waiting behind others says nothing of this head.
        let turn = Instant::now();
        let deadline = turn + timeout * 2;
        if client.is_none() {
            match GcsClient::connect_lazy(&addr, timeout) {
                Ok(c) => client = Some(Box::new(c)),
                Err(e) => warn!("{prefix}: bad GCS address {addr}: {}", e.summary()),
            }
        }
        let mut ok = false;
        if let Some(c) = client.as_mut() {
            c.allow_large_replies(slow);
            // Boxed: a gRPC call's future is large; boxing keeps each idle link task small (one
            // per cluster, thousands of them) and allocates the call state only while it runs.
            metrics.gcs_call("GetClusterResourceState");
            match Box::pin(c.get_cluster_resource_state()).await {
                Ok(mut state) => {
                    ok = true;
                    let (changed, was) = {
                        let mut s = lock();
                        // Compared with the last state in place, without its version (the GCS
                        // increments it on every read, so comparing it would call every poll a
                        // change), and without copying either: a 10,000-node state is tens of MiB.
                        let (changed, restarted) = match &s.snapshot {
                            Some((old, _)) => {
                                let version = std::mem::replace(&mut state.version, old.version);
                                let changed = **old != state;
                                state.version = version;
                                (changed, old.session_name != state.session_name)
                            }
                            None => (true, false),
                        };
                        if restarted {
                            // A new GCS knows nothing of our earlier reports.
                            s.sent = None;
                        }
                        s.snapshot = Some((Arc::new(state), Instant::now()));
                        (changed, s.health.replace(LinkHealth::Healthy))
                    };
                    if was != Some(LinkHealth::Healthy) {
                        info!("{prefix}: GCS at {addr} is reachable");
                    }
                    if changed || was != Some(LinkHealth::Healthy) {
                        wake();
                    }
                    failures = 0;
                }
                Err(RayError::TooLarge { .. }) if !slow => {
                    // More than the fast pool's reply limit: a big cluster (or a hostile head).
                    // Ask again at once from the slow pool, which accepts up to MAX_REPLY_BYTES.
                    debug!("{prefix}: GCS at {addr}: reply over {SMALL_REPLY_BYTES} bytes, moving to the slow pool");
                    slow = true;
                    continue;
                }
                Err(e) => {
                    metrics.gcs_error();
                    failures += 1;
                    // The condition (read by RayCluster editors) and the warning carry the classified
                    // error; the raw one, which can say what the operator's network reaches, is
                    // for the operator's debug log.
                    let health = LinkHealth::Unhealthy { reason: e.reason(), message: e.summary() };
                    debug!("{prefix}: GCS at {addr}: {e}");
                    let was = lock().health.replace(health.clone());
                    if was != Some(health) {
                        warn!("{prefix}: GCS at {addr} failed: {}", e.summary());
                        wake();
                    }
                    // Drop the channel on any failure: an unreachable or broken head must not keep a
                    // connection (and its buffers) alive across the backoff; the next attempt starts
                    // afresh.
                    client = None;
                }
            }
        }
        if ok && let Some(c) = client.as_mut() {
            // What does not fit in the turn's budget (a head slow to answer drains) waits for the
            // next turn: drains stay requested, the report unsent.
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, Box::pin(send_outbox(&prefix, c, &shared, &wake, &metrics))).await.is_err() {
                debug!("{prefix}: GCS at {addr}: turn over its {:?} budget; the rest waits", timeout * 2);
            }
        }
        drop(_permit);
        let big = client.as_ref().is_some_and(|c| c.last_reply_bytes() > SMALL_REPLY_BYTES / 4 * 3);
        let was_slow = slow;
        slow = !ok || big || turn.elapsed() > timeout / 2;
        if slow != was_slow {
            debug!(
                "{prefix}: GCS at {addr}: {} pool (last turn {:?}, reply {} bytes, limit {} bytes)",
                if slow { "slow" } else { "fast" },
                turn.elapsed(),
                client.as_ref().map_or(0, |c| c.last_reply_bytes()),
                if slow { MAX_REPLY_BYTES } else { SMALL_REPLY_BYTES }
            );
        }
        // Poll every `interval`; after failures back off (up to 30 s) so a dead head costs little.
        let wait = if ok {
            interval.saturating_sub(started.elapsed())
        } else {
            (interval * 2u32.saturating_pow(failures.min(5))).min(Duration::from_secs(30))
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = kick.notified(), if ok => {}
        }
    }
}

async fn send_outbox(
    prefix: &str,
    client: &mut GcsClient,
    shared: &Arc<Mutex<LinkState>>,
    wake: &Waker,
    metrics: &Metrics,
) {
    let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
    let pending: Vec<(String, String)> = lock()
        .drains
        .iter()
        .filter(|(_, (_, st))| *st == DrainState::Requested)
        .map(|(pod, (node, _))| (pod.clone(), node.clone()))
        .collect();
    for (pod, node) in pending {
        metrics.gcs_call("DrainNode");
        let result =
            client.drain_node(&node, DrainReason::IdleTermination, "idle worker removed by ray-operator", None).await;
        let state = match result {
            Ok(o) if o.accepted => {
                info!("{prefix}: drain of {pod} (node {node}) accepted");
                DrainState::Accepted
            }
            Ok(o) => {
                debug!("{prefix}: drain of {pod} rejected: {}", o.rejection_reason);
                DrainState::Rejected(o.rejection_reason)
            }
            Err(RayError::HeadNode { .. }) => DrainState::Rejected("the head is never drained".into()),
            Err(e) => {
                debug!("{prefix}: drain of {pod} failed, will retry: {e}");
                continue;
            }
        };
        if let Some(entry) = lock().drains.get_mut(&pod) {
            entry.1 = state;
        }
        wake();
    }
    let report = lock().report.take();
    if let Some(r) = report {
        metrics.gcs_call("ReportAutoscalingState");
        match client.report_autoscaling_state(&r).await {
            Ok(_) => lock().sent = Some((content(&r), Instant::now())),
            // Not recorded as sent: the next reconcile queues it again.
            Err(e) => debug!("{prefix}: report failed: {e}"),
        }
    }
}
