//! Leader election on a `coordination.k8s.io` Lease, with self-fencing.
//!
//! Every Lease write is conditional on the resourceVersion read (see [`round`]). We keep the monotonic time of the last
//! successful renew in a [`Fence`], and every write the operator makes asks the fence first: once
//! the renew is older than the ttl minus a margin, writes are refused, even if the renew call is
//! hanging or the process was frozen (SIGSTOP) and has just resumed. A leader that lost the Lease
//! never writes again until it wins it anew.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
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
        margin_for(self.ttl)
    }
}

/// The fence margin of a Lease of `ttl`: ttl/5, at least 1 s, at most ttl/2.
pub fn margin_for(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_secs(1)).min(ttl / 2)
}

/// Whether this replica may write now.
#[derive(Debug)]
pub struct Fence {
    origin: Instant,
    /// Milliseconds since `origin` until which writes are allowed; 0 = not leader.
    valid_until_ms: AtomicU64,
    /// How long the current term waits before it lists and acts (see [`Fence::settle`]), in ms.
    settle_ms: AtomicU64,
}

impl Default for Fence {
    fn default() -> Self {
        Self { origin: Instant::now(), valid_until_ms: AtomicU64::new(0), settle_ms: AtomicU64::new(0) }
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
        Self { origin: Instant::now(), valid_until_ms: AtomicU64::new(u64::MAX), settle_ms: AtomicU64::new(0) }
    }

    /// How long a new leader waits before it lists and acts: zero when the Lease was free
    /// (released, or never held), the fence margin when it was taken from a holder that did not
    /// release it. That holder stopped writing a margin before its Lease expired, but a write it
    /// sent just before may still be inside the API server (admission and storage under a starved
    /// CPU take longer than a margin). Listing before it lands would miss it, and the new leader
    /// would make the same pod a second time. Waiting another margin doubles the time such a write
    /// has to land; it costs only hand-overs that already waited for a Lease to expire.
    pub fn settle(&self) -> Duration {
        Duration::from_millis(self.settle_ms.load(Ordering::SeqCst))
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

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// What one round of the election found.
enum Round {
    /// We hold the Lease: it was renewed or taken by this round's write (its holder as written),
    /// and whether it was taken from another holder that had not released it (it expired).
    Held(String, bool),
    /// Someone else holds it (or we may not take it); look again after `wait`.
    Other { holder: String, wait: Duration },
    /// Our write lost a race (409): read again at once.
    Raced,
}

/// One round: read the Lease, then renew it, take it, or leave it.
///
/// Every write carries the resourceVersion we read (a patch with `metadata.resourceVersion`, or a
/// `create` that fails if the Lease exists), so the API server, not a read-back, decides between
/// two standbys taking an expired Lease at once: exactly one write succeeds, the other gets 409.
/// A renew is conditional too: if anyone else wrote the Lease since we read it, we do not
/// overwrite them but read again.
async fn round(leases: &Api<Lease>, cfg: &LeaderConfig, may_take: bool) -> Result<Round, kube::Error> {
    let ttl = i32::try_from(cfg.ttl.as_secs().max(1)).unwrap_or(i32::MAX);
    let Some(mut lease) = leases.get_opt(&cfg.lease_name).await? else {
        if !may_take {
            return Ok(Round::Other { holder: String::new(), wait: cfg.renew_every });
        }
        let now = now_micro();
        let lease = Lease {
            metadata: ObjectMeta { name: Some(cfg.lease_name.clone()), ..Default::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_duration_seconds: Some(ttl),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match leases.create(&PostParams::default(), &lease).await {
            Ok(l) => Ok(Round::Held(holder(&l), false)),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Round::Raced),
            Err(e) => Err(e),
        };
    };
    let current = holder(&lease);
    let ours = current == cfg.identity;
    let free = current.is_empty() || until_expiry(&lease).is_none_or(|d| d.is_zero());
    if !ours && !free {
        let wait = until_expiry(&lease).map_or(cfg.renew_every, |d| d.min(cfg.renew_every));
        return Ok(Round::Other { holder: current, wait });
    }
    if !may_take {
        // Not even our own Lease is renewed: the caller has just released it (or will).
        return Ok(Round::Other { holder: current, wait: cfg.renew_every });
    }
    let now = now_micro();
    let spec = lease.spec.get_or_insert_with(Default::default);
    if !ours {
        spec.holder_identity = Some(cfg.identity.clone());
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(ttl);
    let expired_holder = !ours && !current.is_empty();
    match conditional_write(leases, cfg, &lease).await {
        Ok(l) => Ok(Round::Held(holder(&l), expired_holder)),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Round::Raced),
        Err(e) => Err(e),
    }
}

/// Writes `lease`'s spec if the Lease is still at `lease`'s resourceVersion (409 otherwise).
///
/// A merge patch that carries `metadata.resourceVersion` is checked by the API server exactly like
/// an update with that precondition; a patch (not an update) keeps the RBAC at `patch` on the one
/// Lease, as the install docs list it.
async fn conditional_write(leases: &Api<Lease>, cfg: &LeaderConfig, lease: &Lease) -> Result<Lease, kube::Error> {
    let Some(rv) = lease.metadata.resource_version.clone() else {
        return Err(kube::Error::Api(Box::new(kube::core::Status::failure(
            "lease without resourceVersion",
            "Invalid",
        ))));
    };
    let spec = serde_json::to_value(lease.spec.clone().unwrap_or_default()).map_err(kube::Error::SerdeError)?;
    let mut spec = match spec {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    // Absent fields must be cleared, not left as they were (a release clears the holder).
    for field in ["holderIdentity", "acquireTime", "renewTime"] {
        spec.entry(field).or_insert(serde_json::Value::Null);
    }
    let patch = serde_json::json!({ "metadata": { "resourceVersion": rv }, "spec": spec });
    leases.patch(&cfg.lease_name, &PatchParams::default(), &Patch::Merge(&patch)).await
}

/// How often a replica that may not lead yet checks whether it may now.
const ELIGIBILITY_RECHECK: Duration = Duration::from_millis(50);

/// Runs the election until `shutdown`; publishes leadership on `leading` and keeps `fence` current.
///
/// `eligible` says whether this replica may lead: its watches have listed and none is forbidden.
/// A replica that cannot see its resources must not take the Lease (it would hold it and do
/// nothing, or act blind), and a leader that loses that ability gives the Lease up.
/// On shutdown the caller stops its work first, then calls [`release`].
pub async fn run(
    client: Client,
    cfg: LeaderConfig,
    fence: Arc<Fence>,
    leading: watch::Sender<bool>,
    eligible: Arc<dyn Fn() -> bool + Send + Sync>,
    mut shutdown: watch::Receiver<bool>,
) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let (changed, watch_task) = watch_lease(leases.clone(), &cfg.lease_name);
    let window = cfg.ttl.saturating_sub(cfg.margin());
    let mut last_holder = String::new();
    let mut warned_ineligible = false;
    // While this replica may not lead (its first lists are under way), the Lease is read once a
    // renew period, but eligibility is checked often: a replica must lead as soon as its caches
    // are listed, not up to a renew period later (an operator restart after an outage waited
    // 5 s for nothing).
    let mut last_ineligible_round: Option<Instant> = None;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let was_leading = *leading.borrow();
        let may_take = eligible();
        if !may_take && was_leading {
            fence.revoke();
            let _ = leading.send(false);
            warn!("leadership given up: this replica's watches are failing (see above); releasing the lease");
            release_with(&leases, &cfg).await;
        }
        if !may_take && !warned_ineligible {
            // Normal at start-up (the first lists are under way); a missing permission is
            // reported by the watch itself.
            debug!("not taking the lease until every watch has listed and is permitted");
        }
        warned_ineligible = !may_take;
        if may_take {
            last_ineligible_round = None;
        } else if !was_leading && last_ineligible_round.is_some_and(|t| t.elapsed() < cfg.renew_every) {
            tokio::select! {
                _ = tokio::time::sleep(ELIGIBILITY_RECHECK) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        let started = Instant::now();
        // A renew that hangs must not keep us "leader": a leader's round may take the time its
        // fence has left (a slow API server then costs no hand-over), a standby's a renew period.
        let limit = match fence.deadline() {
            Some(t) if was_leading => t.saturating_duration_since(started).max(Duration::from_millis(50)),
            _ => cfg.renew_every.min(window),
        };
        let result = tokio::time::timeout(limit, round(&leases, &cfg, may_take)).await;
        let mut wait = cfg.renew_every;
        match result {
            Ok(Ok(Round::Held(h, expired_holder))) => {
                if !was_leading {
                    let settle = if expired_holder { cfg.margin() } else { Duration::ZERO };
                    fence.settle_ms.store(settle.as_millis() as u64, Ordering::SeqCst);
                    info!(
                        "leadership acquired: {} -> {} (lease {}/{})",
                        if last_holder.is_empty() { "<none>" } else { &last_holder },
                        cfg.identity,
                        cfg.namespace,
                        cfg.lease_name
                    );
                }
                fence.renewed(started, window);
                last_holder = h;
                let _ = leading.send_if_modified(|l| !std::mem::replace(l, true));
            }
            Ok(Ok(Round::Other { holder: h, wait: w })) => {
                if was_leading && may_take {
                    fence.revoke();
                    let _ = leading.send(false);
                    warn!("leadership lost: {} -> {h}", cfg.identity);
                } else if h != last_holder {
                    info!("leader is {}", if h.is_empty() { "<none> (released)" } else { &h });
                }
                last_holder = h;
                wait = w;
            }
            Ok(Ok(Round::Raced)) => {
                // Someone wrote the Lease between our read and our write: read again soon. Our
                // fence (if any) still runs out on its own deadline.
                debug!("lease changed under us; reading it again");
                wait = Duration::from_millis(20);
            }
            Ok(Err(e)) => {
                warn!("lease renew failed: {e}");
                wait = Duration::from_millis(500);
            }
            Err(_) => {
                warn!("lease renew timed out");
                wait = Duration::from_millis(200);
            }
        }
        if !may_take {
            last_ineligible_round = Some(started);
            wait = wait.min(ELIGIBILITY_RECHECK);
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

/// Time until the Lease expires, per its own renewTime and duration (zero if it has).
///
/// This compares the holder's renewTime with our wall clock, as client-go's and
/// kube-leader-election's elections do: replicas run on nodes with synchronised clocks, and a
/// skew smaller than the fence margin (ttl/5, at least 1 s) cannot let two leaders act at once,
/// because the old leader stops writing that long before the Lease could expire.
fn until_expiry(lease: &Lease) -> Option<Duration> {
    let spec = lease.spec.as_ref()?;
    let renew = spec.renew_time.as_ref()?.0;
    let ttl = spec.lease_duration_seconds?;
    let expiry = renew.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(i64::from(ttl))).ok()?;
    let left = expiry.duration_since(Timestamp::now());
    if left.is_negative() {
        return Some(Duration::ZERO);
    }
    Some(Duration::from_millis(left.as_millis().max(0) as u64 + 50))
}

/// Gives the Lease up (graceful shutdown), so a standby takes over at once.
pub async fn release(client: Client, cfg: &LeaderConfig) {
    let leases: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    release_with(&leases, cfg).await;
}

/// Clears the holder if it is still us, conditionally on the version read: a Lease another
/// replica has taken meanwhile is left alone.
async fn release_with(leases: &Api<Lease>, cfg: &LeaderConfig) {
    let attempt = async {
        for _ in 0..3 {
            let Some(mut lease) = leases.get_opt(&cfg.lease_name).await? else { return Ok(false) };
            if holder(&lease) != cfg.identity {
                return Ok(false);
            }
            let spec = lease.spec.get_or_insert_with(Default::default);
            spec.holder_identity = None;
            spec.renew_time = Some(now_micro());
            spec.lease_duration_seconds = Some(1);
            match conditional_write(leases, cfg, &lease).await {
                Ok(_) => return Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    };
    match tokio::time::timeout(Duration::from_secs(3), attempt).await {
        Ok(Ok(true)) => info!("leadership released: {} -> <none>", cfg.identity),
        Ok(Ok(false)) => debug!("lease not released: not ours"),
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
