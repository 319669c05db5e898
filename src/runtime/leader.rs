//! Leader election on a `coordination.k8s.io` Lease (kube-leader-election), with self-fencing.
//!
//! The crate renews and steps down; it does no fencing. We keep the monotonic time of the last
//! successful renew in a [`Fence`], and every write the operator makes asks the fence first: once
//! the renew is older than the ttl minus a margin, writes are refused, even if the renew call is
//! hanging or the process was frozen (SIGSTOP) and has just resumed. A leader that lost the Lease
//! never writes again until it wins it anew.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use kube_leader_election::{LeaseLock, LeaseLockParams, LeaseLockResult};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

/// Label the leader puts on its own pod, so `kubectl logs -l cluster.ray.io/operator-role=leader` works.
pub const ROLE_LABEL: &str = "cluster.ray.io/operator-role";

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub lease_name: String,
    pub namespace: String,
    /// Pod name (downward API `POD_NAME`): the Lease holder identity.
    pub identity: String,
    pub ttl: Duration,
    pub renew_every: Duration,
}

impl LeaderConfig {
    /// Writes stop this long before the Lease could expire, covering clock rate differences and the
    /// time a request takes to reach the API server.
    pub fn margin(&self) -> Duration {
        (self.ttl / 5).max(Duration::from_secs(1)).min(self.ttl / 2)
    }
}

/// Whether this replica may write now.
#[derive(Debug)]
pub struct Fence {
    origin: Instant,
    /// Milliseconds since `origin` until which writes are allowed; 0 = not leader.
    valid_until_ms: AtomicU64,
}

impl Default for Fence {
    fn default() -> Self {
        Self { origin: Instant::now(), valid_until_ms: AtomicU64::new(0) }
    }
}

impl crate::reconciler::WriteFence for Fence {
    fn allowed(&self) -> bool {
        Fence::allowed(self)
    }
}

impl Fence {
    /// A fence that always allows (single replica without leader election).
    pub fn always() -> Self {
        Self { origin: Instant::now(), valid_until_ms: AtomicU64::new(u64::MAX) }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// True while the last successful renew is recent enough.
    pub fn allowed(&self) -> bool {
        self.now_ms() < self.valid_until_ms.load(Ordering::SeqCst)
    }

    /// Records a renew that started at `started`; writes are allowed until `started + window`.
    fn renewed(&self, started: Instant, window: Duration) {
        let until = started.saturating_duration_since(self.origin) + window;
        self.valid_until_ms.store(until.as_millis() as u64, Ordering::SeqCst);
    }

    fn revoke(&self) {
        self.valid_until_ms.store(0, Ordering::SeqCst);
    }

    /// When the fence closes, if it is open.
    fn deadline(&self) -> Option<Instant> {
        let v = self.valid_until_ms.load(Ordering::SeqCst);
        (v != 0 && v != u64::MAX).then(|| self.origin + Duration::from_millis(v))
    }
}

fn holder(lease: &Lease) -> String {
    lease.spec.as_ref().and_then(|s| s.holder_identity.clone()).unwrap_or_default()
}

/// Runs the election until `shutdown`; publishes leadership on `leading` and keeps `fence` current.
/// On shutdown the caller stops its work first, then calls [`release`].
pub async fn run(
    client: Client,
    cfg: LeaderConfig,
    fence: Arc<Fence>,
    leading: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let lock = LeaseLock::new(
        client.clone(),
        &cfg.namespace,
        LeaseLockParams { lease_name: cfg.lease_name.clone(), holder_id: cfg.identity.clone(), lease_ttl: cfg.ttl },
    );
    let leases: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let (changed, watch_task) = watch_lease(leases.clone(), &cfg.lease_name);
    let window = cfg.ttl.saturating_sub(cfg.margin());
    let mut last_holder = String::new();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let started = Instant::now();
        let was_leading = *leading.borrow();
        // A renew that hangs must not keep us "leader": bound it by the time the fence has left.
        let result = tokio::time::timeout(cfg.renew_every.min(window), lock.try_acquire_or_renew()).await;
        let mut wait = cfg.renew_every;
        match result {
            Ok(Ok(LeaseLockResult::Acquired(lease))) => {
                if !was_leading {
                    if !still_ours(&leases, &cfg).await {
                        debug!("lease acquisition raced with another replica; staying standby");
                        continue;
                    }
                    info!(
                        "leadership acquired: {} -> {} (lease {}/{})",
                        if last_holder.is_empty() { "<none>" } else { &last_holder },
                        cfg.identity,
                        cfg.namespace,
                        cfg.lease_name
                    );
                }
                fence.renewed(started, window);
                last_holder = holder(&lease);
                let _ = leading.send_if_modified(|l| !std::mem::replace(l, true));
            }
            Ok(Ok(LeaseLockResult::NotAcquired(lease))) => {
                let h = holder(&lease);
                if was_leading {
                    fence.revoke();
                    let _ = leading.send(false);
                    warn!("leadership lost: {} -> {h}", cfg.identity);
                } else if h != last_holder {
                    info!("leader is {}", if h.is_empty() { "<none> (released)" } else { &h });
                }
                last_holder = h.clone();
                if h.is_empty() && try_take_released(&leases, &lease, &cfg).await {
                    // Released by a graceful leader: take it now instead of waiting out its 1 s ttl.
                    continue;
                }
                wait = until_expiry(&lease).map_or(cfg.renew_every, |d| d.min(cfg.renew_every));
            }
            Ok(Err(e)) => {
                let msg = e.to_string();
                // Two replicas creating the Lease at once: the loser just reads it next time.
                if msg.contains("AlreadyExists") || msg.contains("Conflict") {
                    debug!("lease race: {msg}");
                    wait = Duration::from_millis(50);
                } else {
                    warn!("lease renew failed: {e}");
                    wait = Duration::from_millis(500);
                }
            }
            Err(_) => {
                warn!("lease renew timed out");
                wait = Duration::from_millis(200);
            }
        }
        let fence_deadline = fence.deadline();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = changed.notified(), if !*leading.borrow() => {}
            _ = async {
                match fence_deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => {
                // Could not renew in time: stop acting now, whatever the Lease says later.
                if *leading.borrow() && !fence.allowed() {
                    warn!("leadership lost: renew overdue, fencing {}", cfg.identity);
                    let _ = leading.send(false);
                }
            }
            _ = shutdown.changed() => {}
        }
    }
    watch_task.abort();
}

/// Standbys watch the Lease so a released one is taken over at once, not at the next poll.
fn watch_lease(leases: Api<Lease>, name: &str) -> (Arc<Notify>, tokio::task::JoinHandle<()>) {
    let changed = Arc::new(Notify::new());
    let notify = changed.clone();
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let task = tokio::spawn(async move {
        let mut s = watcher::watcher(leases, cfg).boxed();
        while let Some(ev) = s.next().await {
            if ev.is_ok() {
                notify.notify_one();
            } else {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });
    (changed, task)
}

/// kube-leader-election acquires with an unconditional patch, so two standbys can both "win" an
/// expired Lease. The last patch wins at the server; read it back after a moment and only lead
/// if it is still ours.
async fn still_ours(leases: &Api<Lease>, cfg: &LeaderConfig) -> bool {
    tokio::time::sleep(Duration::from_millis(150)).await;
    matches!(leases.get(&cfg.lease_name).await, Ok(l) if holder(&l) == cfg.identity)
}

/// Time until the Lease expires, per its own renewTime and duration.
fn until_expiry(lease: &Lease) -> Option<Duration> {
    let spec = lease.spec.as_ref()?;
    let renew = spec.renew_time.as_ref()?.0;
    let ttl = spec.lease_duration_seconds?;
    let expiry = renew.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(i64::from(ttl))).ok()?;
    let left = expiry.duration_since(k8s_openapi::jiff::Timestamp::now());
    let ms = left.as_millis().max(0) as u64;
    Some(Duration::from_millis(ms + 50))
}

/// Takes a Lease released by `step_down` (empty holder), guarded by its resourceVersion so exactly
/// one standby wins.
async fn try_take_released(leases: &Api<Lease>, lease: &Lease, cfg: &LeaderConfig) -> bool {
    let Some(rv) = lease.metadata.resource_version.clone() else { return false };
    let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    let transitions = lease.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0);
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": rv },
        "spec": {
            "holderIdentity": cfg.identity,
            "acquireTime": now,
            "renewTime": now,
            "leaseDurationSeconds": cfg.ttl.as_secs(),
            "leaseTransitions": transitions + 1,
        }
    });
    match leases.patch(&cfg.lease_name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => true,
        Err(e) => {
            debug!("taking the released lease failed (another replica was faster?): {e}");
            false
        }
    }
}

/// Gives the Lease up (graceful shutdown), so a standby takes over at once.
pub async fn release(client: Client, cfg: &LeaderConfig) {
    let lock = LeaseLock::new(
        client,
        &cfg.namespace,
        LeaseLockParams { lease_name: cfg.lease_name.clone(), holder_id: cfg.identity.clone(), lease_ttl: cfg.ttl },
    );
    match tokio::time::timeout(Duration::from_secs(3), lock.step_down()).await {
        Ok(Ok(())) => info!("leadership released: {} -> <none>", cfg.identity),
        Ok(Err(e)) => debug!("lease not released: {e}"),
        Err(_) => warn!("lease release timed out"),
    }
}

/// Labels our pod as the leader and removes the label from any other pod that still has it.
pub async fn label_leader_pod(client: Client, cfg: &LeaderConfig) {
    let pods: Api<Pod> = Api::namespaced(client, &cfg.namespace);
    let set = serde_json::json!({ "metadata": { "labels": { ROLE_LABEL: "leader" } } });
    if let Err(e) = pods.patch(&cfg.identity, &PatchParams::default(), &Patch::Merge(&set)).await {
        warn!("could not label own pod {}/{} as leader: {e}", cfg.namespace, cfg.identity);
    }
    let others = match pods.list(&ListParams::default().labels(&format!("{ROLE_LABEL}=leader"))).await {
        Ok(l) => l.items,
        Err(e) => {
            debug!("could not list leader-labelled pods: {e}");
            return;
        }
    };
    let unset = serde_json::json!({ "metadata": { "labels": { ROLE_LABEL: null } } });
    for p in others {
        let name = p.metadata.name.unwrap_or_default();
        if name != cfg.identity
            && let Err(e) = pods.patch(&name, &PatchParams::default(), &Patch::Merge(&unset)).await
        {
            debug!("could not remove leader label from {name}: {e}");
        }
    }
}
