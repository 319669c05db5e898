//! Reconciling one RayCluster: desired state ([`desired`]) vs observed ([`crate::cache`]) gives a
//! [`plan`]; this module carries the plan out against the API server and writes the status.
//!
//! The pipeline is dereference → validate/build (pure) → decide (pure) → apply → status. The loop
//! that calls [`reconcile`] (one controller, or leader-gated shards) is not this module's concern.

pub mod desired;
pub mod plan;
pub mod resources;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{debug, info, warn};

use crate::api::{RayCluster, RayClusterStatus};
use crate::autoscaler::link::{DrainState, LinkHealth, RayLink, Waker};
use crate::autoscaler::scale;
use crate::cache::{Cache, ClusterKey};
use crate::metrics::Metrics;
use crate::runtime::leader::Fence;
use desired::{Desired, InvalidSpec, LABEL_LAUNCH_HASH};
use plan::{Action, Observed};

/// Field manager of every server-side apply and patch we make.
pub const FIELD_MANAGER: &str = "ray-operator";

/// Errors of one reconcile pass. Each variant's [`Error::reason`] is a bounded metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("the API server rejected a {kind} built from the spec: {message}")]
    Rejected { kind: &'static str, message: String },
    #[error("not writing: this replica is not (or no longer surely) the leader")]
    Fenced,
}

impl Error {
    /// Short, bounded name for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => "forbidden",
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(_)) => "api_error",
            Error::Kube(_) => "transport",
            Error::Rejected { .. } => "rejected",
            Error::Fenced => "fenced",
        }
    }
}

/// What the operator shares with every reconcile: the client, the cache, events, metrics, settings.
pub struct Context {
    pub client: Client,
    pub cache: Arc<Cache>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Most pods one cluster creates in one pass before other clusters of its shard get a turn.
    pub create_batch: usize,
    /// Asked before every write: only a leader with a fresh Lease writes.
    pub fence: Arc<Fence>,
    /// How the autoscaler talks to Ray; `None` keeps every type at `minWorkers`.
    pub autoscaler: Option<AutoscalerSettings>,
    /// How long a worker pod may stay unschedulable before its launch is given up (or retried).
    pub unschedulable_timeout: Duration,
    /// Bounds concurrent GCS calls across all clusters.
    pub gcs_permits: Arc<tokio::sync::Semaphore>,
}

/// Most GCS calls in flight at once, across all clusters.
pub const MAX_CONCURRENT_GCS_CALLS: usize = 32;

/// Autoscaler timing.
#[derive(Clone, Debug)]
pub struct AutoscalerSettings {
    /// How often each cluster's GCS is read.
    pub interval: Duration,
    /// Timeout of every GCS call.
    pub timeout: Duration,
}

/// Annotation overriding the GCS address (`host:port`), e.g. when the operator runs outside the
/// Kubernetes cluster. Our own annotations never count as the user's "restart" annotation.
pub const GCS_ADDRESS_ANNOTATION: &str = "cluster.ray.io/gcs-address";

impl Context {
    fn may_write(&self) -> Result<(), Error> {
        if self.fence.allowed() { Ok(()) } else { Err(Error::Fenced) }
    }
}

/// Per-cluster memory kept by the shard that owns the cluster.
#[derive(Default)]
pub struct ClusterState {
    /// Consecutive failures, for backoff.
    pub failures: u32,
    /// Set when the API server rejected something built from this spec (fingerprint of the spec):
    /// nothing is retried until the RayCluster changes.
    pub rejected: Option<String>,
    /// The connection to the head's GCS while the head runs.
    pub link: Option<RayLink>,
    /// Wakes this cluster's reconcile in its shard (given to the link).
    pub wake: Option<Waker>,
    /// Workers wanted per type, moved only by autoscaler decisions (launches add, drains subtract)
    /// and clamped to the type's bounds. Kept here rather than recounted from pods, because during
    /// a rolling replacement old and new pods of one logical worker both exist.
    pub targets: std::collections::BTreeMap<String, u32>,
    /// When a status change that is not urgent (same phase, same generation) is written at the
    /// latest; set while one waits. See [`STATUS_COALESCE`].
    pub status_due: Option<std::time::Instant>,
}

/// How long a status change within the same phase may wait for the next one. Counting ready
/// pods one by one (`workers 3/500`, `4/500`, ...) would cost a status write per pod event, and
/// bringing a cluster up would take three (created, head ready, all ready) where two say the
/// same; phase and generation changes are written at once.
pub const STATUS_COALESCE: Duration = Duration::from_secs(1);

/// What the caller should do next with this cluster.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing until something changes (a watch event wakes us).
    Idle,
    /// More work is left (a batch limit was hit): queue again behind the shard's other clusters.
    Continue,
    /// Try again after a delay (errors, backoff).
    After(Duration),
}

/// Fingerprint of everything that may turn a rejected spec into an accepted one.
fn spec_fingerprint(cluster: &RayCluster) -> String {
    format!("{:?}/{:?}", cluster.metadata.generation, cluster.metadata.annotations)
}

/// One write of a reconcile pass.
enum Write<'a> {
    Service,
    /// Pods of the head (`None`) or of `workers[i]`, and how many.
    Pods(Option<usize>, usize),
    Delete(&'a str, &'a str, plan::DeleteReason),
}

/// What a write created, for the pass's Event.
struct Created {
    reason: &'static str,
    note: String,
    /// The (last) pod created, for the status's head pod name.
    last_pod: Option<String>,
}

fn event(ctx: &Context, cluster: &RayCluster, type_: EventType, reason: &str, note: String) {
    if !ctx.fence.allowed() {
        return;
    }
    let recorder = ctx.recorder.clone();
    let reference = cluster.object_ref(&());
    let ev = Event { type_, reason: reason.into(), note: Some(note), action: reason.into(), secondary: None };
    // Events are best effort and must not hold up the reconcile (or its shard) on a slow API server.
    tokio::spawn(async move {
        if let Err(e) = recorder.publish(&ev, &reference).await {
            debug!("event publish failed: {e}");
        }
    });
}

/// One reconcile pass for one cluster.
pub async fn reconcile(ctx: &Context, key: &ClusterKey, state: &mut ClusterState) -> Result<Next, Error> {
    let Some(cluster) = ctx.cache.cluster(key) else {
        return Ok(Next::Idle);
    };
    if cluster.metadata.deletion_timestamp.is_some() {
        // Children go with garbage collection; nothing to do.
        return Ok(Next::Idle);
    }
    let now = Timestamp::now();
    let pods = ctx.cache.pods(key);
    let service_hash = ctx.cache.service_hash(key);
    let observed = Observed {
        pods: &pods,
        service_hash: service_hash.as_deref(),
        status: cluster.status.as_ref(),
        generation: cluster.metadata.generation,
    };

    let desired = match desired::desired(&cluster) {
        Ok(d) => d,
        Err(invalid) => {
            let status = plan::error_status(&observed, &invalid, now);
            if cluster.status.as_ref() != Some(&status) {
                warn!("{key}: invalid spec: {invalid}");
                event(ctx, &cluster, EventType::Warning, "InvalidSpec", invalid.to_string());
                write_status(ctx, &cluster, status).await?;
            }
            return Ok(Next::Idle);
        }
    };
    if state.rejected.as_deref() == Some(spec_fingerprint(&cluster).as_str()) {
        return Ok(Next::Idle);
    }
    state.rejected = None;

    let mut auto = autoscale(ctx, key, &cluster, &desired, &pods, state);
    give_up_unschedulable(ctx, key, &cluster, &desired, &pods, state, &mut auto, now);
    let plan_pods: Vec<plan::ObservedPod> = pods.iter().filter(|p| !auto.draining.contains(&p.name)).cloned().collect();
    let observed = Observed { pods: &plan_pods, ..observed };
    let targets = auto.targets.clone();
    let mut plan = plan::plan(&desired, &observed, &targets);
    for (name, reason) in &auto.delete {
        if let Some(p) = pods.iter().find(|p| &p.name == name) {
            plan.actions.push(Action::DeletePod { name: p.name.clone(), uid: p.uid.clone(), reason: *reason });
        }
    }
    if let Some(summary) = &auto.summary {
        info!("{key}: {summary}");
        event(ctx, &cluster, EventType::Normal, "Autoscaled", summary.clone());
        ctx.metrics.autoscaler_decision(if auto.scaled_up { "up" } else { "down" });
    }
    // The pass's writes are independent of each other (the head's address reaches workers by DNS
    // or the Service, not by the head pod existing), so they go out together: one round trip per
    // pass instead of one per object, which is what lets a shard keep up with the API server.
    let mut more = false;
    let mut budget = ctx.create_batch.max(1);
    let mut writes = Vec::new();
    for action in &plan.actions {
        match action {
            Action::CreatePods { worker, count } => {
                let n = (*count).min(budget);
                budget -= n;
                more |= n < *count;
                if n > 0 {
                    writes.push(Write::Pods(*worker, n));
                }
            }
            Action::ApplyService => writes.push(Write::Service),
            Action::DeletePod { name, uid, reason } => writes.push(Write::Delete(name, uid, *reason)),
        }
    }
    let (desired_ref, plan_ref, cluster_ref) = (&desired, &plan, &cluster);
    let results = join_all(writes.iter().map(|w| async move {
        let (desired, plan, cluster) = (desired_ref, plan_ref, cluster_ref);
        match w {
            Write::Service => apply_service(ctx, key, desired).await.map(Some),
            Write::Pods(worker, n) => create_pods(ctx, key, desired, *worker, *n, plan).await,
            Write::Delete(name, uid, reason) => {
                info!("{key}: deleting pod {name} ({})", reason.as_str());
                delete_pod(ctx, key, name, uid).await.map(|()| {
                    let note = format!("Deleted pod {name} ({})", reason.as_str());
                    event(ctx, cluster, EventType::Normal, "DeletedPod", note);
                    None
                })
            }
        }
    }))
    .await;
    let mut head_name = None;
    let mut created: Vec<(&'static str, String)> = Vec::new();
    let mut failure = None;
    for (w, result) in writes.iter().zip(results) {
        match result {
            Ok(Some(done)) => {
                if matches!(w, Write::Pods(None, _)) {
                    head_name = done.last_pod.clone();
                }
                created.push((done.reason, done.note));
            }
            Ok(None) => {}
            // A rejection is the user's to fix and wins over a transient error of another write.
            Err(e @ Error::Rejected { .. }) => failure = Some(e),
            Err(e) => {
                if failure.is_none() {
                    failure = Some(e);
                }
            }
        }
    }
    // One Event per pass for what it created (the bring-up of a cluster is one Event, not three):
    // Events cost the API server as much as the objects themselves.
    if !created.is_empty() {
        let reason = if created.iter().all(|(r, _)| *r == created[0].0) { created[0].0 } else { "Created" };
        let note = created.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>().join("; ");
        event(ctx, &cluster, EventType::Normal, reason, note);
    }
    match failure {
        None => {}
        Some(Error::Rejected { kind, message }) => {
            let invalid = InvalidSpec { field: format!("spec.podTypes (the {kind} built from it)"), message };
            warn!("{key}: the API server rejected a {kind}: {}", invalid.message);
            event(ctx, &cluster, EventType::Warning, "InvalidSpec", invalid.to_string());
            state.rejected = Some(spec_fingerprint(&cluster));
            let status = plan::error_status(&observed, &invalid, now);
            if cluster.status.as_ref() != Some(&status) {
                write_status(ctx, &cluster, status).await?;
            }
            return Ok(Next::Idle);
        }
        Some(e) => return Err(e),
    }

    if plan.head_recovery {
        info!("{key}: head pod failed or was deleted; recreating it (autoscalerRetries + 1)");
    }
    // Recompute from the cache after our writes (write-through), so the status counts what now exists.
    let pods_after: Vec<plan::ObservedPod> =
        ctx.cache.pods(key).into_iter().filter(|p| !auto.draining.contains(&p.name)).collect();
    let observed_after = Observed { pods: &pods_after, ..observed };
    let mut status = plan::status(&desired, &observed_after, &targets, &plan, head_name, now);
    if let Some(c) = auto.condition {
        plan::set_condition(&mut status, cluster.status.as_ref(), c, now);
    }
    let mut status_wait = None;
    if cluster.status.as_ref() != Some(&status) {
        let old = cluster.status.as_ref();
        let urgent = old.is_none_or(|o| o.phase != status.phase || o.observed_generation != status.observed_generation);
        let due = *state.status_due.get_or_insert_with(|| std::time::Instant::now() + STATUS_COALESCE);
        if urgent || std::time::Instant::now() >= due {
            if old.and_then(|s| s.phase) != status.phase {
                info!(
                    "{key}: phase {} -> {}",
                    old.and_then(|s| s.phase).map_or("<none>", |p| p.as_str()),
                    status.phase.map_or("<none>", |p| p.as_str())
                );
            }
            write_status(ctx, &cluster, status).await?;
            state.status_due = None;
        } else {
            status_wait = Some(due.saturating_duration_since(std::time::Instant::now()));
        }
    } else {
        state.status_due = None;
    }
    state.failures = 0;
    // An unschedulable pod's timeout passes without any event: come back when it does.
    let unschedulable_wait = pods
        .iter()
        .filter_map(|p| p.unschedulable_since)
        .map(|since| {
            let stuck = now.duration_since(since).as_secs_f64().max(0.0);
            Duration::from_secs_f64((ctx.unschedulable_timeout.as_secs_f64() - stuck).max(0.0) + 0.1)
        })
        .min();
    let next = if more {
        Next::Continue
    } else if let Some(wait) = unschedulable_wait {
        Next::After(ctx.autoscaler.as_ref().map_or(wait, |a| wait.min(a.interval)))
    } else if let (Some(a), Some(link)) = (&ctx.autoscaler, &state.link)
        && link.health() == LinkHealth::Healthy
    {
        // Idle timers advance without any event: look again each interval (no API calls unless
        // something changes). An unhealthy link wakes us itself when it recovers.
        Next::After(a.interval)
    } else {
        Next::Idle
    };
    // A deferred status write comes back by itself.
    Ok(match (next, status_wait) {
        (Next::Idle, Some(w)) => Next::After(w),
        (Next::After(d), Some(w)) => Next::After(d.min(w)),
        (next, _) => next,
    })
}

async fn write_status(ctx: &Context, cluster: &RayCluster, status: RayClusterStatus) -> Result<(), Error> {
    ctx.may_write()?;
    let api: Api<RayCluster> = Api::namespaced(ctx.client.clone(), &cluster.namespace().unwrap_or_default());
    let patch = serde_json::json!({ "status": status });
    let updated = api.patch_status(&cluster.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    ctx.metrics.api_write("status");
    ctx.cache.put_cluster(updated);
    Ok(())
}

async fn apply_service(ctx: &Context, key: &ClusterKey, desired: &Desired) -> Result<Created, Error> {
    let mut svc: Service = desired.service.clone();
    svc.metadata.labels.get_or_insert_with(BTreeMap::new).insert(LABEL_LAUNCH_HASH.into(), plan::service_hash(desired));
    let name = svc.name_any();
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let existed = ctx.cache.service_hash(key).is_some();
    ctx.may_write()?;
    let mut value =
        serde_json::to_value(&svc).map_err(|e| Error::Rejected { kind: "Service", message: e.to_string() })?;
    value["apiVersion"] = "v1".into();
    value["kind"] = "Service".into();
    let applied = api
        .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&value))
        .await
        .map_err(|e| rejected_or(e, "Service"))?;
    ctx.metrics.api_write("service");
    ctx.cache.put_service(&applied);
    let verb = if existed { "updated" } else { "created" };
    info!("{key}: {verb} head service {name}");
    Ok(Created {
        reason: if existed { "UpdatedService" } else { "CreatedService" },
        note: format!("{} head service {name}", if existed { "Updated" } else { "Created" }),
        last_pod: None,
    })
}

/// 400/422 from a create means the object we built from the user's spec is invalid: that is the
/// user's to fix, not ours to retry.
fn rejected_or(e: kube::Error, kind: &'static str) -> Error {
    match &e {
        kube::Error::Api(s) if s.code == 422 || s.code == 400 => Error::Rejected { kind, message: s.message.clone() },
        _ => Error::Kube(e),
    }
}

/// Creates `n` pods of one template concurrently. `None` when there was nothing to create.
async fn create_pods(
    ctx: &Context,
    key: &ClusterKey,
    desired: &Desired,
    worker: Option<usize>,
    n: usize,
    plan: &plan::Plan,
) -> Result<Option<Created>, Error> {
    let template = match worker {
        None => &desired.head,
        Some(i) => match desired.workers.get(i) {
            Some(t) => t,
            None => return Ok(None),
        },
    };
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let results = join_all((0..n).map(|_| async {
        // Checked per request, as late as possible: a leader frozen in the middle of a batch
        // (SIGSTOP, a stalled node) must not send the rest of it when it wakes after losing the
        // Lease. Checking once for the whole batch left every request not yet sent exposed.
        ctx.may_write()?;
        api.create(&pp, &template.pod).await.map_err(|e| rejected_or(e, "Pod"))
    }))
    .await;
    let mut names = Vec::new();
    let mut first_err = None;
    for r in results {
        match r {
            Ok(pod) => {
                ctx.cache.put_pod(&pod);
                ctx.metrics.child_created("pod");
                names.push(pod.name_any());
            }
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some(e);
                }
            }
        }
    }
    let created = (!names.is_empty()).then(|| {
        let what = match worker {
            None if plan.head_recovery => "replacement head pod".to_string(),
            None => "head pod".to_string(),
            Some(_) => format!("{} worker pod(s) of type {}", names.len(), template.type_name),
        };
        info!("{key}: created {what}: {}", names.join(", "));
        Created {
            reason: if worker.is_none() { "CreatedHeadPod" } else { "CreatedWorkerPods" },
            note: format!("Created {what}: {}", names.join(", ")),
            last_pod: names.last().cloned(),
        }
    });
    match first_err {
        // Created pods are in the cache; their Event is lost, their log line is not.
        Some(e) => Err(e),
        None => Ok(created),
    }
}

async fn delete_pod(ctx: &Context, key: &ClusterKey, name: &str, uid: &str) -> Result<(), Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &key.namespace);
    // The UID precondition makes sure we delete exactly the pod we decided about, never a
    // same-named successor.
    let dp = DeleteParams {
        preconditions: Some(Preconditions { uid: Some(uid.into()), resource_version: None }),
        ..Default::default()
    };
    ctx.may_write()?;
    match api.delete(name, &dp).await {
        Ok(_) => ctx.metrics.child_deleted("pod"),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    ctx.cache.mark_pod_terminating(key, name);
    Ok(())
}

/// The autoscaler's part of a reconcile pass.
struct Autoscale {
    targets: plan::Targets,
    /// Pods being drained: not counted, not touched by the plan.
    draining: std::collections::BTreeSet<String>,
    /// Pods to delete (drained, or launches given up).
    delete: Vec<(String, plan::DeleteReason)>,
    summary: Option<String>,
    scaled_up: bool,
    /// The AutoscalerHealthy condition: (ok, reason, message).
    condition: Option<(bool, &'static str, String)>,
}

/// The GCS address of a cluster: the override annotation, else the head Service's ClusterIP and
/// `gcs` port (no DNS lookup per poll), else the Service's DNS name.
pub fn gcs_address(cluster: &RayCluster, desired: &Desired, service_ip: Option<&str>) -> String {
    if let Some(a) = cluster.annotations().get(GCS_ADDRESS_ANNOTATION).filter(|a| !a.is_empty()) {
        return a.clone();
    }
    if let Some(ip) = service_ip {
        return if ip.contains(':') {
            format!("[{ip}]:{}", desired.gcs_port)
        } else {
            format!("{ip}:{}", desired.gcs_port)
        };
    }
    format!(
        "{}.{}.svc:{}",
        desired::head_service_name(&cluster.name_any()),
        cluster.namespace().unwrap_or_default(),
        desired.gcs_port
    )
}

fn autoscale(
    ctx: &Context,
    key: &ClusterKey,
    cluster: &RayCluster,
    desired: &Desired,
    pods: &[plan::ObservedPod],
    state: &mut ClusterState,
) -> Autoscale {
    // Initialise remembered targets from what exists (old and new pods of a type count once).
    for t in &desired.workers {
        let live = |current: bool| {
            pods.iter()
                .filter(|p| {
                    p.kind == desired::NodeKind::Worker
                        && p.type_name == t.type_name
                        && !p.terminating
                        && p.phase != plan::PodPhase::Finished
                        && (p.hash == t.hash) == current
                })
                .count() as u32
        };
        let target = state.targets.entry(t.type_name.clone()).or_insert_with(|| live(true).max(live(false)));
        *target = (*target).clamp(t.min_workers, t.max_workers.max(t.min_workers));
    }
    state.targets.retain(|k, _| desired.workers.iter().any(|t| &t.type_name == k));
    let remembered = plan::Targets { workers: state.targets.clone(), allow_scale_down: false };
    let hold = |draining, condition| Autoscale {
        targets: remembered.clone(),
        draining,
        delete: vec![],
        summary: None,
        scaled_up: false,
        condition,
    };
    let Some(settings) = &ctx.autoscaler else {
        return Autoscale {
            targets: plan::min_worker_targets(desired, cluster.spec.max_workers()),
            draining: Default::default(),
            delete: vec![],
            summary: None,
            scaled_up: false,
            condition: None,
        };
    };
    let head_running = pods.iter().any(|p| {
        p.kind == desired::NodeKind::Head
            && !p.terminating
            && p.phase == plan::PodPhase::Running
            && p.hash == desired.head.hash
    });
    if !head_running {
        state.link = None;
        return hold(Default::default(), Some((false, "HeadNotRunning", "waiting for the head pod to run".into())));
    }
    let addr = gcs_address(cluster, desired, ctx.cache.service_ip(key).as_deref());
    if state.link.as_ref().is_none_or(|l| l.addr() != addr) {
        let wake = state.wake.clone().unwrap_or_else(|| Arc::new(|| {}));
        info!("{key}: connecting to GCS at {addr}");
        state.link = Some(RayLink::start(
            key.to_string(),
            addr.clone(),
            settings.interval,
            settings.timeout,
            ctx.metrics.clone(),
            ctx.gcs_permits.clone(),
            wake,
        ));
    }
    let Some(link) = state.link.as_ref() else {
        return hold(Default::default(), None);
    };
    // Forget drains of pods that are gone, and rejected ones (the node got work: keep it).
    let names: std::collections::BTreeSet<&str> = pods.iter().map(|p| p.name.as_str()).collect();
    link.retain_drains(|pod, st| names.contains(pod) && !matches!(st, DrainState::Rejected(_)));
    let drains = link.drains();
    let draining: std::collections::BTreeSet<String> = drains.keys().cloned().collect();
    let accepted: std::collections::BTreeSet<String> =
        drains.iter().filter(|(_, st)| **st == DrainState::Accepted).map(|(k, _)| k.clone()).collect();

    let max_age = settings.interval * 3 + settings.timeout;
    let Some(snapshot) = link.snapshot(max_age) else {
        // No fresh view of Ray: never scale down, keep what exists (at least minWorkers).
        // While (re)connecting, keep whatever the condition said: an operator restart must not
        // rewrite the status of every cluster.
        let condition = match link.health() {
            LinkHealth::Unhealthy { reason, message } => {
                Some((false, gcs_reason(reason), format!("GCS at {addr}: {message}")))
            }
            _ => None,
        };
        return hold(draining, condition);
    };
    let idle_ms = i64::from(cluster.spec.idle_timeout_minutes()) * 60_000;
    match scale::decide(&cluster.spec, desired, pods, &snapshot, &accepted, idle_ms, std::time::SystemTime::now()) {
        Ok(s) => {
            for d in &s.drain {
                info!("{key}: draining idle worker {} (Ray node {})", d.pod, d.node_id);
                link.drain(&d.pod, &d.node_id);
            }
            link.report(s.report.clone());
            for t in &desired.workers {
                let launch = s.launches.get(&t.type_name).copied().unwrap_or(0);
                let drained = s.drain.iter().filter(|d| d.type_name == t.type_name).count() as u32;
                if let Some(target) = state.targets.get_mut(&t.type_name) {
                    *target = (*target + launch)
                        .saturating_sub(drained)
                        .clamp(t.min_workers, t.max_workers.max(t.min_workers));
                }
            }
            let mut draining = draining;
            draining.extend(s.drain.iter().map(|d| d.pod.clone()));
            Autoscale {
                targets: plan::Targets { workers: state.targets.clone(), allow_scale_down: false },
                draining,
                delete: s.delete.into_iter().map(|n| (n, plan::DeleteReason::Drained)).collect(),
                scaled_up: !s.launches.is_empty(),
                summary: s.summary,
                condition: Some((true, "GcsReachable", format!("reading demand from the GCS at {addr}"))),
            }
        }
        Err(e) => {
            warn!("{key}: autoscaler decision failed: {e}");
            hold(draining, Some((false, "DecisionFailed", e.to_string())))
        }
    }
}

/// Worker pods the scheduler could not place for `ctx.unschedulable_timeout`: with the
/// autoscaler, the launch is given up (target − 1, pod deleted, Warning Event, reported to Ray as a
/// failed launch by the next report); without it, the pod is deleted and replaced.
#[allow(clippy::too_many_arguments)]
fn give_up_unschedulable(
    ctx: &Context,
    key: &ClusterKey,
    cluster: &RayCluster,
    desired: &Desired,
    pods: &[plan::ObservedPod],
    state: &mut ClusterState,
    auto: &mut Autoscale,
    now: Timestamp,
) {
    for p in pods.iter().filter(|p| p.kind == desired::NodeKind::Worker && !p.terminating) {
        let Some(since) = p.unschedulable_since else { continue };
        let stuck = now.duration_since(since).as_secs_f64();
        if stuck < ctx.unschedulable_timeout.as_secs_f64() || auto.delete.iter().any(|(n, _)| n == &p.name) {
            continue;
        }
        let msg = format!(
            "pod {} of type {} could not be scheduled for {stuck:.0}s; giving up this launch",
            p.name, p.type_name
        );
        warn!("{key}: {msg}");
        event(ctx, cluster, EventType::Warning, "LaunchFailed", msg);
        if ctx.autoscaler.is_some()
            && let Some(t) = state.targets.get_mut(&p.type_name)
        {
            let min = desired.workers.iter().find(|w| w.type_name == p.type_name).map_or(0, |w| w.min_workers);
            *t = t.saturating_sub(1).max(min);
            if let Some(w) = auto.targets.workers.get_mut(&p.type_name) {
                *w = *t;
            }
        }
        auto.delete.push((p.name.clone(), plan::DeleteReason::Unschedulable));
    }
}

/// Condition reason for a bounded GCS error reason.
fn gcs_reason(reason: &str) -> &'static str {
    match reason {
        "unreachable" | "connect" => "GcsUnreachable",
        "timeout" => "GcsTimeout",
        _ => "GcsError",
    }
}
