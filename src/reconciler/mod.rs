//! The executor of a reconcile pass: reads one cluster from the [`Cache`] and its GCS link, asks
//! [`crate::pass::decide`] what to do, carries the writes out against the API server, and records
//! what happened (cache write-through, Events, metrics, the status).
//!
//! The loop that calls [`reconcile`] (one controller, or leader-gated shards) is not this module's
//! concern; neither is leadership: the [`WriteFence`] asked before every write is passed in.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::join_all;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{debug, info, warn};

use crate::api::{RayCluster, RayClusterStatus};
use crate::autoscaler::link::{RayLink, Waker};
use crate::cache::{Cache, ClusterKey};
use crate::metrics::Metrics;
use crate::model::desired::{self, Desired, LABEL_LAUNCH_HASH};
use crate::pass::{self, Create, Delete, LinkAction, LogLine, Memory, PassDecision, PassEvent, PassInput, RayView};
pub use crate::pass::{AutoscalerSettings, Next, PassSettings};
pub use events::{EventQueue, Events, Occurrence, Reporter};

pub mod events;

/// Field manager of every server-side apply and patch we make.
pub const FIELD_MANAGER: &str = "ray-operator";

/// Most GCS calls in flight at once, across all clusters.
pub const MAX_CONCURRENT_GCS_CALLS: usize = 32;

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

/// Asked before every write: only a leader with a fresh Lease writes. The runtime's leader
/// election implements it; the executor does not know how.
pub trait WriteFence: Send + Sync {
    fn allowed(&self) -> bool;
}

/// What the operator shares with every reconcile: the client, the cache, events, metrics, settings.
pub struct Context {
    pub client: Client,
    pub cache: Arc<Cache>,
    pub events: EventQueue,
    pub metrics: Arc<Metrics>,
    pub settings: PassSettings,
    pub fence: Arc<dyn WriteFence>,
    /// The operator's own ServiceAccount: Ray pods may not run as it.
    pub own_service_account: Option<desired::OwnServiceAccount>,
    /// Bounds concurrent GCS calls across all clusters.
    pub gcs_permits: Arc<crate::autoscaler::link::GcsSlots>,
}

impl Context {
    fn may_write(&self) -> Result<(), Error> {
        if self.fence.allowed() { Ok(()) } else { Err(Error::Fenced) }
    }
}

/// What the shard that owns a cluster keeps for it between passes.
#[derive(Default)]
pub struct ClusterSlot {
    /// The pass's memory (worker targets, rejection, deferred status).
    pub memory: Memory,
    /// Consecutive failed passes, for the shard's backoff.
    pub failures: u32,
    /// The connection to the head's GCS while the head runs.
    pub link: Option<RayLink>,
    /// Wakes this cluster's reconcile in its shard (given to the link).
    pub wake: Option<Waker>,
}

/// One reconcile pass for one cluster: read, decide, write, record.
pub async fn reconcile(ctx: &Context, key: &ClusterKey, slot: &mut ClusterSlot) -> Result<Next, Error> {
    let Some(cluster) = ctx.cache.cluster(key) else {
        return Ok(Next::Idle);
    };
    let now = Timestamp::now();
    let desired = match &ctx.own_service_account {
        Some(own) => desired::refuse_own_service_account(&cluster, own).and_then(|()| desired::desired(&cluster)),
        None => desired::desired(&cluster),
    };
    let (pods, service) = (ctx.cache.pods(key), ctx.cache.service(key));
    let link = slot.link.as_ref();
    let max_age = ctx.settings.autoscaler.as_ref().map(|a| a.interval * 3 + a.timeout);
    let seen = link.zip(max_age).map(|(l, age)| (l.addr(), l.health(), l.snapshot(age), l.drains()));
    let ray = seen.as_ref().map(|(addr, health, snapshot, drains)| RayView {
        addr,
        health,
        snapshot: snapshot.as_deref(),
        drains,
    });
    let input = PassInput {
        cluster: &cluster,
        desired: &desired,
        pods: &pods,
        service: service.as_ref(),
        ray,
        memory: &slot.memory,
        now,
        settings: &ctx.settings,
    };
    let mut decision = pass::decide(&input);
    for line in &decision.log {
        log(key, line);
    }
    for e in &decision.events {
        event(ctx, &cluster, e);
    }
    if let Some(s) = decision.scaled {
        ctx.metrics.autoscaler_decision(s.as_str());
    }
    slot.memory = decision.memory.clone();
    tell_ray(ctx, key, slot, &decision);

    let done = match &desired {
        Ok(d) => carry_out(ctx, key, &cluster, d, &decision).await,
        Err(_) => Done::default(),
    };
    if !done.created.is_empty() {
        event(ctx, &cluster, &created_event(&done.created));
    }
    let refused = refusal(ctx, key, slot, &cluster, &desired, &done, now);
    match done.failure {
        None => {}
        Some(Error::Rejected { kind, message }) => {
            let rejection = pass::rejected(&cluster, kind, &message, now);
            log(key, &rejection.log);
            event(ctx, &cluster, &rejection.event);
            slot.memory.rejected = Some(rejection.fingerprint);
            if let Some(status) = rejection.status {
                write_status(ctx, &cluster, status).await?;
            }
            return Ok(Next::Idle);
        }
        Some(e) => return Err(e),
    }
    if decision.head_recovery {
        info!("{key}: head pod failed or was deleted; recreating it (autoscalerRetries + 1)");
    }
    if let Some(head) = &done.head {
        decision.head_created(head);
    }
    if let Some(status) = decision.status {
        if let Some(change) = pass::phase_change(cluster.status.as_ref(), &status) {
            info!("{key}: {change}");
        }
        write_status(ctx, &cluster, status).await?;
    }
    // After a refusal, the next pass (with the refusal in memory) writes the status that says so.
    Ok(if refused { Next::Continue } else { decision.next })
}

/// Records what the API server did to this pass's pod creates in the memory: a refusal (with a
/// Warning Event, which [`Events`] folds into one counted Event per cluster) or, once a
/// create succeeds, the end of one. True when creates were refused.
fn refusal(
    ctx: &Context,
    key: &ClusterKey,
    slot: &mut ClusterSlot,
    cluster: &RayCluster,
    desired: &Result<Desired, desired::InvalidSpec>,
    done: &Done,
    now: Timestamp,
) -> bool {
    let (Some(message), Ok(d)) = (&done.refusal, desired) else {
        if done.pods_created {
            slot.memory.refused = None;
        }
        return false;
    };
    // One warning per run of refusals; each retry is in the Event's count (and at debug level).
    if slot.memory.refused.is_none() {
        warn!("{key}: {message}; retrying with backoff");
    } else {
        debug!("{key}: {message}");
    }
    event(ctx, cluster, &PassEvent { warning: true, reason: "FailedCreate", note: message.clone() });
    pass::create_refused(&mut slot.memory, d, &done.refused, message, now, ctx.settings.autoscaler.is_some());
    true
}

fn log(key: &ClusterKey, line: &LogLine) {
    match line {
        LogLine::Info(m) => info!("{key}: {m}"),
        LogLine::Warn(m) => warn!("{key}: {m}"),
    }
}

fn event(ctx: &Context, cluster: &RayCluster, e: &PassEvent) {
    if !ctx.fence.allowed() {
        return;
    }
    let o = Occurrence { warning: e.warning, reason: e.reason, note: e.note.clone() };
    ctx.events.send(cluster.object_ref(&()), o);
}

/// Starts, replaces or stops the cluster's GCS link, and hands it the pass's drains and report.
fn tell_ray(ctx: &Context, key: &ClusterKey, slot: &mut ClusterSlot, decision: &PassDecision) {
    match (&decision.ray.link, &ctx.settings.autoscaler) {
        (LinkAction::Stop, _) => slot.link = None,
        (LinkAction::Connect(addr), Some(settings)) => {
            let wake = slot.wake.clone().unwrap_or_else(|| Arc::new(|| {}));
            info!("{key}: connecting to GCS at {addr}");
            slot.link = Some(RayLink::start(
                key.to_string(),
                addr.clone(),
                settings.interval,
                settings.timeout,
                ctx.metrics.clone(),
                ctx.gcs_permits.clone(),
                wake,
            ));
        }
        _ => {}
    }
    let Some(link) = &slot.link else { return };
    link.forget_drains(&decision.ray.forget_drains);
    for d in &decision.ray.drains {
        link.drain(&d.pod, &d.node_id);
    }
    if let Some(report) = &decision.ray.report {
        link.report(report.clone());
    }
}

/// What the writes of a pass did.
#[derive(Default)]
struct Done {
    /// (Event reason, note) of each write that created something.
    created: Vec<(&'static str, String)>,
    /// The head pod created, if any.
    head: Option<String>,
    /// The first failure; a rejection wins over a transient error of another write.
    failure: Option<Error>,
    /// Whether any pod was created.
    pods_created: bool,
    /// Pod creates the API server refused (not rejected as invalid), per template.
    refused: Vec<(Option<usize>, u32)>,
    /// What it said, for the status and the Event.
    refusal: Option<String>,
}

/// One Event per pass for what it created (the bring-up of a cluster is one Event, not three):
/// Events cost the API server as much as the objects themselves.
fn created_event(created: &[(&'static str, String)]) -> PassEvent {
    let reason = if created.iter().all(|(r, _)| *r == created[0].0) { created[0].0 } else { "Created" };
    let note = created.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>().join("; ");
    PassEvent { warning: false, reason, note }
}

/// One write of a pass.
enum Write<'a> {
    Service,
    Pods(&'a Create),
    Delete(&'a Delete),
}

/// The pass's writes are independent of each other (the head's address reaches workers by DNS
/// or the Service, not by the head pod existing), so they go out together: one round trip per
/// pass instead of one per object, which is what lets a shard keep up with the API server.
async fn carry_out(ctx: &Context, key: &ClusterKey, cluster: &RayCluster, desired: &Desired, d: &PassDecision) -> Done {
    let writes = &d.writes;
    let all: Vec<Write> = (writes.apply_service.then_some(Write::Service).into_iter())
        .chain(writes.creates.iter().map(Write::Pods))
        .chain(writes.deletes.iter().map(Write::Delete))
        .collect();
    let results = join_all(all.iter().map(|w| async move {
        match w {
            Write::Service => apply_service(ctx, key, desired).await.map(|c| Outcome::created(Some((c, None)))),
            Write::Pods(c) => Ok(create_pods(ctx, key, desired, c, d.head_recovery).await),
            Write::Delete(del) => delete_pod(ctx, key, cluster, del).await.map(|()| Outcome::created(None)),
        }
    }))
    .await;
    let mut done = Done::default();
    for (w, result) in all.iter().zip(results) {
        let result = match (w, result) {
            (Write::Pods(c), Ok(outcome)) => {
                done.pods_created |= outcome.created.is_some();
                if let Some(message) = outcome.refused_with {
                    done.refused.push((c.worker, outcome.refused));
                    done.refusal.get_or_insert(message);
                }
                outcome.error.map_or(Ok(outcome.created), Err)
            }
            (_, r) => r.map(|o| o.created),
        };
        match result {
            Ok(Some((created, last_pod))) => {
                if matches!(w, Write::Pods(Create { worker: None, .. })) {
                    done.head = last_pod;
                }
                done.created.push(created);
            }
            Ok(None) => {}
            Err(e @ Error::Rejected { .. }) => done.failure = Some(e),
            Err(e) => {
                done.failure.get_or_insert(e);
            }
        }
    }
    done
}

async fn write_status(ctx: &Context, cluster: &RayCluster, status: RayClusterStatus) -> Result<(), Error> {
    ctx.may_write()?;
    let api: Api<RayCluster> = Api::namespaced(ctx.client.clone(), &cluster.namespace().unwrap_or_default());
    // With explicit nulls: fields this status no longer has (a fixed problem's message) go away.
    let patch = status.merge_patch();
    let updated = api.patch_status(&cluster.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    ctx.metrics.api_write("status");
    ctx.cache.put_cluster(updated);
    Ok(())
}

async fn apply_service(ctx: &Context, key: &ClusterKey, desired: &Desired) -> Result<(&'static str, String), Error> {
    let mut svc: Service = desired.service.clone();
    svc.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(LABEL_LAUNCH_HASH.into(), desired.service_hash.clone());
    let name = svc.name_any();
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let existed = ctx.cache.service(key).is_some();
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
    Ok((
        if existed { "UpdatedService" } else { "CreatedService" },
        format!("{} head service {name}", if existed { "Updated" } else { "Created" }),
    ))
}

/// 400/422 from a create means the object we built from the user's spec is invalid: that is the
/// user's to fix, not ours to retry. An admission webhook's denial is not: it is policy, like a
/// quota, and may change without the spec changing (retried with backoff as a refusal).
fn rejected_or(e: kube::Error, kind: &'static str) -> Error {
    match &e {
        kube::Error::Api(s) if (s.code == 422 || s.code == 400) && !s.message.contains("admission webhook") => {
            Error::Rejected { kind, message: s.message.clone() }
        }
        _ => Error::Kube(e),
    }
}

/// What one write did. Only pod creates are ever refused.
#[derive(Default)]
struct Outcome {
    created: Option<Created>,
    /// An error that fails the pass (fenced, rejected as invalid, transport).
    error: Option<Error>,
    /// Creates the API server answered with a refusal (quota, Pod Security, webhook, 5xx), and
    /// what it said.
    refused: u32,
    refused_with: Option<String>,
}

impl Outcome {
    fn created(created: Option<Created>) -> Self {
        Outcome { created, ..Default::default() }
    }
}

/// A created object's Event (reason, note) and the last pod's name.
type Created = ((&'static str, String), Option<String>);

/// Creates the pods of one [`Create`] concurrently.
async fn create_pods(
    ctx: &Context,
    key: &ClusterKey,
    desired: &Desired,
    create: &Create,
    head_recovery: bool,
) -> Outcome {
    let template = match create.worker {
        None => &desired.head,
        Some(i) => match desired.workers.get(i) {
            Some(t) => t,
            None => return Outcome::default(),
        },
    };
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let results = join_all((0..create.count).map(|_| async {
        // Checked per request, as late as possible: a leader frozen in the middle of a batch
        // (SIGSTOP, a stalled node) must not send the rest of it when it wakes after losing the
        // Lease. Checking once for the whole batch left every request not yet sent exposed.
        ctx.may_write()?;
        api.create(&pp, &template.pod).await.map_err(|e| rejected_or(e, "Pod"))
    }))
    .await;
    let what = match create.worker {
        None if head_recovery => "replacement head pod".to_string(),
        None => "head pod".to_string(),
        Some(_) => format!("worker pod of type {}", template.type_name),
    };
    let mut names = Vec::new();
    let mut out = Outcome::default();
    for r in results {
        match r {
            Ok(pod) => {
                ctx.cache.put_pod(&pod);
                ctx.metrics.child_created("pod");
                names.push(pod.name_any());
            }
            // Refused, not invalid: the API server answered, and a later try may succeed.
            Err(Error::Kube(kube::Error::Api(s))) if s.code != 409 => {
                out.refused += 1;
                out.refused_with.get_or_insert_with(|| {
                    format!("the API server refused to create a {what} ({} {}): {}", s.code, s.reason, s.message)
                });
            }
            Err(e) => {
                out.error.get_or_insert(e);
            }
        }
    }
    out.created = (!names.is_empty()).then(|| {
        let what = match create.worker {
            Some(_) => format!("{} worker pod(s) of type {}", names.len(), template.type_name),
            None => what.clone(),
        };
        info!("{key}: created {what}: {}", names.join(", "));
        let reason = if create.worker.is_none() { "CreatedHeadPod" } else { "CreatedWorkerPods" };
        ((reason, format!("Created {what}: {}", names.join(", "))), names.last().cloned())
    });
    out
}

async fn delete_pod(ctx: &Context, key: &ClusterKey, cluster: &RayCluster, pod: &Delete) -> Result<(), Error> {
    let (name, reason) = (&pod.name, pod.reason.as_str());
    info!("{key}: deleting pod {name} ({reason})");
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &key.namespace);
    // The UID precondition makes sure we delete exactly the pod we decided about, never a
    // same-named successor.
    let dp = DeleteParams {
        preconditions: Some(Preconditions { uid: Some(pod.uid.clone()), resource_version: None }),
        ..Default::default()
    };
    ctx.may_write()?;
    match api.delete(name, &dp).await {
        Ok(_) => ctx.metrics.child_deleted("pod"),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    ctx.cache.mark_pod_terminating(key, name);
    let note = format!("Deleted pod {name} ({reason})");
    event(ctx, cluster, &PassEvent { warning: false, reason: "DeletedPod", note });
    Ok(())
}
