//! One reconcile pass as a function: [`decide`] takes everything a pass looks at ([`PassInput`]:
//! the RayCluster, its [`Desired`] state, the observed pods and Service, Ray's view, the cluster's
//! remembered [`Memory`], the time and the settings) and returns everything it does
//! ([`PassDecision`]: creates, deletes, drains, the report for Ray, the new memory, the status,
//! the Events and when to come back). Pure and synchronous: the executor (`reconciler::reconcile`,
//! a layer above) reads, calls it, writes and records.
//!
//! [`plan`] holds the part of the decision that needs no autoscaler (which pods to create or delete
//! against fixed targets, and the status); [`conditions`] the typed conditions and their one merge.

pub mod conditions;
pub mod plan;

mod autoscale;
mod ray_nodes;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::api::{Phase, RayCluster, RayClusterStatus};
use crate::autoscaler::scale::{DrainCandidate, DrainState, LinkHealth};
use crate::model::desired::{Desired, InvalidSpec, NodeKind};
use crate::model::observed::{ObservedPod, ObservedService, PodPhase};
use crate::ray::{AutoscalingReport, ClusterState};
pub use autoscale::{HEAD_NOT_RUNNING, gcs_address};
use conditions::ConditionType;
use plan::{Action, DeleteReason, Observed, Targets};

/// How long a status change within the same phase may wait for the next one. Counting ready
/// pods one by one (`workers 3/500`, `4/500`, ...) would cost a status write per pod event, and
/// bringing a cluster up would take three (created, head ready, all ready) where one says it all;
/// phase and generation changes are written at once, but for two that may wait this long:
/// `Running` for the GCS's first answer, so that it is written with its `AutoscalerHealthy`, and
/// the `Updating` of a pass that creates pods, so that pods which come up within it make the
/// cluster's one write `Running`.
pub const STATUS_COALESCE: Duration = Duration::from_secs(1);

/// Autoscaler timing.
#[derive(Clone, Debug)]
pub struct AutoscalerSettings {
    /// How often each cluster's GCS is read.
    pub interval: Duration,
    /// Timeout of every GCS call.
    pub timeout: Duration,
    /// Whether the `cluster.ray.io/gcs-address` annotation is honoured (else the head Service is
    /// always used): it lets a RayCluster editor choose where the operator connects.
    pub gcs_address_annotation: bool,
    /// How long a running worker pod may go without its Ray node registering in the GCS before
    /// it is deleted and replaced. Only the autoscaler sees Ray's nodes, so this lives here.
    pub registration_timeout: Duration,
    /// How long the head pod may run with its GCS unreachable before the head is recovered
    /// (deleted and recreated, `autoscalerRetries` + 1).
    pub head_gcs_grace: Duration,
}

/// The operator's settings a pass depends on.
#[derive(Clone, Debug)]
pub struct PassSettings {
    /// Most pods one cluster creates in one pass before other clusters of its shard get a turn.
    pub create_batch: usize,
    /// How the autoscaler talks to Ray; `None` keeps every type at `minWorkers`.
    pub autoscaler: Option<AutoscalerSettings>,
    /// How long a worker pod may stay unschedulable before its launch is given up (or retried).
    pub unschedulable_timeout: Duration,
}

/// What a pass remembers about a cluster between passes (kept by the shard that owns it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Memory {
    /// Set when the API server rejected something built from this spec (fingerprint of the spec):
    /// nothing is retried until the RayCluster changes.
    pub rejected: Option<String>,
    /// Workers wanted per type: the one owner of worker targets. Moved only by autoscaler
    /// decisions (launches add, drains and given-up launches subtract) and clamped to the type's
    /// bounds. Kept rather than recounted from pods, because during a rolling replacement old and
    /// new pods of one logical worker both exist.
    pub targets: BTreeMap<String, u32>,
    /// Set while a status write waits (see [`STATUS_COALESCE`]): when it is written at the latest.
    pub status_due: Option<StatusDue>,
    /// Set while the API server refuses this cluster's pod creates (quota, Pod Security,
    /// webhooks, 5xx): no create is tried before `retry_at`, whatever wakes the cluster.
    pub refused: Option<Refusal>,
    /// Running worker pods without a Ray node in the GCS, and since when (first seen so).
    /// Kept here rather than read from the pod, so no other clock than the pass's is needed; a
    /// new leader starts counting afresh (later, never earlier).
    pub unregistered_since: BTreeMap<String, Timestamp>,
    /// Since when the head pod has been running without a fresh answer from its GCS.
    pub gcs_down_since: Option<Timestamp>,
    /// The head pod whose GCS has answered (only such a head is recovered when its GCS goes silent).
    pub gcs_answered: Option<String>,
}

/// A status write that waits.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusDue {
    /// When it is written at the latest.
    pub at: Timestamp,
    /// The phase of the status that waits. A wait for one phase does not cut short the next
    /// one's: a cluster whose `Updating` waited while its pods started still gives its `Running`
    /// a moment for the GCS's first verdict. `None`: any phase.
    pub phase: Option<Phase>,
}

/// Pod creates the API server refused, and when to try again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Refused tries in a row.
    pub attempts: u32,
    pub retry_at: Timestamp,
    /// What the API server said, for the status and the Event.
    pub message: String,
}

/// The first retry of a refused create waits this long; each further one twice as long, up to
/// [`CREATE_RETRY_MAX`].
pub const CREATE_RETRY_BASE: Duration = Duration::from_millis(500);

/// The longest wait between tries of a refused create. It bounds how long pods stay missing after
/// the cause goes away (a quota raised, a namespace label or webhook changed): most causes cannot
/// be watched with the operator's permissions, so we probe instead: one pod per try, one rejected
/// request every 3 s per refused cluster at most, which the API server answers without storing
/// anything.
pub const CREATE_RETRY_MAX: Duration = Duration::from_secs(3);

/// Pods of one create that the API server refused: `None` for the head, `Some(i)` for
/// `desired.workers[i]`, and how many.
pub type RefusedCreates = [(Option<usize>, u32)];

/// Records refused creates in the memory: the next try waits (capped exponential backoff), and
/// with the autoscaler the worker targets of the refused types drop by the refused pods, so a
/// target never counts launches that never became pods (Ray asks again for what it still needs).
pub fn create_refused(
    memory: &mut Memory,
    desired: &Desired,
    refused: &RefusedCreates,
    message: &str,
    now: Timestamp,
    autoscaler: bool,
) {
    let attempts = memory.refused.as_ref().map_or(0, |r| r.attempts).saturating_add(1);
    let wait = CREATE_RETRY_BASE.saturating_mul(1 << (attempts - 1).min(16)).min(CREATE_RETRY_MAX);
    let wait = SignedDuration::try_from(wait).unwrap_or(SignedDuration::ZERO);
    memory.refused =
        Some(Refusal { attempts, retry_at: now.checked_add(wait).unwrap_or(now), message: message.to_string() });
    if !autoscaler {
        return;
    }
    for (worker, n) in refused {
        let Some(t) = worker.and_then(|i| desired.workers.get(i)) else { continue };
        if let Some(target) = memory.targets.get_mut(&t.type_name) {
            *target = target.saturating_sub(*n).max(t.min_workers.min(*target));
        }
    }
}

/// Ray's side of a cluster as the link to its GCS last saw it.
#[derive(Clone, Copy, Debug)]
pub struct RayView<'a> {
    /// The GCS address the link talks to.
    pub addr: &'a str,
    pub health: &'a LinkHealth,
    /// The latest cluster state, if the GCS answered recently enough to decide from it.
    pub snapshot: Option<&'a ClusterState>,
    /// Drain requests by pod.
    pub drains: &'a BTreeMap<String, DrainState>,
}

/// Everything one pass looks at.
#[derive(Clone, Copy, Debug)]
pub struct PassInput<'a> {
    pub cluster: &'a RayCluster,
    /// [`crate::model::desired::desired`] of `cluster`.
    pub desired: &'a Result<Desired, InvalidSpec>,
    pub pods: &'a [ObservedPod],
    pub service: Option<&'a ObservedService>,
    /// `None` while no link to the GCS runs.
    pub ray: Option<RayView<'a>>,
    pub memory: &'a Memory,
    pub now: Timestamp,
    pub settings: &'a PassSettings,
}

/// Pods to create from one template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Create {
    /// `None`: the head; `Some(i)`: `desired.workers[i]`.
    pub worker: Option<usize>,
    pub count: usize,
}

/// A pod to delete (guarded by its UID).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delete {
    pub name: String,
    pub uid: String,
    pub reason: DeleteReason,
}

/// The API writes of a pass besides the status. They are independent of each other.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Writes {
    pub apply_service: bool,
    /// Within the pass's creation budget.
    pub creates: Vec<Create>,
    pub deletes: Vec<Delete>,
}

impl Writes {
    pub fn is_empty(&self) -> bool {
        !self.apply_service && self.creates.is_empty() && self.deletes.is_empty()
    }
}

/// What to do with the link to the GCS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkAction {
    /// Leave it as it is (running or not).
    Keep,
    /// (Re)connect to this address: none runs, or the one running talks to another address.
    Connect(String),
    /// Stop it: the head does not run.
    Stop,
}

/// What a pass tells Ray.
#[derive(Clone, Debug, PartialEq)]
pub struct RayActions {
    pub link: LinkAction,
    /// Drains to forget (the pod is gone, or the GCS rejected the drain: a later pass may ask again).
    pub forget_drains: Vec<String>,
    /// Idle workers to drain now.
    pub drains: Vec<DrainCandidate>,
    /// What `ray status` should show, when the autoscaler decided.
    pub report: Option<AutoscalingReport>,
}

/// An Event about the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// A log line about the cluster (the executor prefixes the cluster).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogLine {
    Info(String),
    Warn(String),
}

/// What the caller should do next with this cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing until something changes (a watch event wakes us).
    Idle,
    /// More work is left (a batch limit was hit): queue again behind the shard's other clusters.
    Continue,
    /// Try again after a delay (timers, deferred status).
    After(Duration),
}

/// Whether the autoscaler scaled up or down (a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scaled {
    Up,
    Down,
}

impl Scaled {
    pub fn as_str(self) -> &'static str {
        match self {
            Scaled::Up => "up",
            Scaled::Down => "down",
        }
    }
}

/// Everything one pass does.
#[derive(Clone, Debug, PartialEq)]
pub struct PassDecision {
    pub writes: Writes,
    pub ray: RayActions,
    pub memory: Memory,
    /// The status to write once the writes succeeded; `None`: nothing to write now. When the pass
    /// creates the head, [`PassDecision::head_created`] completes it with the new pod's name.
    pub status: Option<RayClusterStatus>,
    /// Events to publish before the writes (what was decided; the writes' own Events are the
    /// executor's, since they depend on what the API server answered).
    pub events: Vec<PassEvent>,
    pub log: Vec<LogLine>,
    pub next: Next,
    /// The head failed or vanished and this pass recreates it (`autoscalerRetries` + 1).
    pub head_recovery: bool,
    pub scaled: Option<Scaled>,
}

impl PassDecision {
    fn nothing(memory: &Memory) -> Self {
        PassDecision {
            writes: Writes::default(),
            ray: RayActions { link: LinkAction::Keep, forget_drains: vec![], drains: vec![], report: None },
            memory: memory.clone(),
            status: None,
            events: vec![],
            log: vec![],
            next: Next::Idle,
            head_recovery: false,
            scaled: None,
        }
    }

    /// Records the name of the head pod this pass created: the status names it and says it is not
    /// ready yet (what the next pass will see).
    pub fn head_created(&mut self, name: &str) {
        let Some(status) = self.status.as_mut() else { return };
        status.head_pod_name = Some(name.to_string());
        if let Some(c) = status.conditions.iter_mut().find(|c| c.type_ == ConditionType::HeadReady.as_str()) {
            c.reason = "HeadPodNotReady".into();
            c.message = format!("head pod {name} is not ready yet");
        }
    }
}

/// Fingerprint of everything that may turn a rejected spec into an accepted one.
pub fn spec_fingerprint(cluster: &RayCluster) -> String {
    format!("{:?}/{:?}", cluster.metadata.generation, cluster.metadata.annotations)
}

/// Decides one pass.
pub fn decide(input: &PassInput<'_>) -> PassDecision {
    let mut out = PassDecision::nothing(input.memory);
    let cluster = input.cluster;
    if cluster.metadata.deletion_timestamp.is_some() {
        // Children go with garbage collection; nothing to do.
        return out;
    }
    let observed = Observed {
        pods: input.pods,
        service_hash: input.service.map(|s| s.hash.as_str()),
        status: cluster.status.as_ref(),
        generation: cluster.metadata.generation,
    };
    let desired = match input.desired {
        Ok(d) => d,
        Err(invalid) => {
            let status = plan::error_status(&observed, invalid, input.now);
            if cluster.status.as_ref() != Some(&status) {
                out.log.push(LogLine::Warn(format!("invalid spec: {invalid}")));
                out.events.push(PassEvent { warning: true, reason: "InvalidSpec", note: invalid.to_string() });
                out.status = Some(status);
            }
            return out;
        }
    };
    if input.memory.rejected.as_deref() == Some(spec_fingerprint(cluster).as_str()) {
        return out;
    }
    out.memory.rejected = None;

    // Pods whose Ray is gone while they run count as finished from here on: the plan deletes and
    // replaces them like any finished pod (the head with `autoscalerRetries` + 1).
    let failed = ray_nodes::failures(input, desired, &mut out);
    let marked = ray_nodes::as_finished(input.pods, &failed);
    let input = &PassInput { pods: &marked, ..*input };

    let scaling = autoscale::autoscale(input, desired, &mut out);
    let deletes = give_up_unschedulable(input, desired, &scaling, &mut out);
    // Without the autoscaler the targets are the spec's and surplus pods go; with it only Ray's
    // decision removes workers (by draining idle ones), and surplus beyond every target.
    let targets =
        Targets { workers: out.memory.targets.clone(), allow_scale_down: input.settings.autoscaler.is_none() };
    let visible: Vec<ObservedPod> =
        input.pods.iter().filter(|p| !scaling.draining.contains(&p.name)).cloned().collect();
    let mut planned = plan::plan(desired, &Observed { pods: &visible, ..observed.clone() }, &targets);
    for action in planned.actions.iter_mut() {
        if let Action::DeletePod { name, reason, .. } = action
            && let Some((_, why)) = failed.iter().find(|(n, _)| n == name)
        {
            *reason = *why;
        }
    }
    // One delete per pod: the plan's reason (a finished pod, a dead Ray node) wins.
    let planned_deletes: BTreeSet<String> = planned
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::DeletePod { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect();
    for (name, reason) in deletes.into_iter().filter(|(name, _)| !planned_deletes.contains(name)) {
        if let Some(p) = input.pods.iter().find(|p| p.name == name) {
            planned.actions.push(Action::DeletePod { name: p.name.clone(), uid: p.uid.clone(), reason });
        }
    }
    out.head_recovery = planned.head_recovery;
    let retry_wait = refusal_gate(input, &planned.actions, &mut out.memory);
    let batch = match retry_wait {
        Some(_) => 0,
        // A try after a refusal is one pod: a probe, not a burst the API server refuses again.
        None if out.memory.refused.is_some() => 1,
        None => input.settings.create_batch.max(1),
    };
    let more = budget(&planned.actions, batch, &mut out.writes) && retry_wait.is_none();

    // The status of the world once the writes are done: deleted pods are terminating; created
    // ones are pending and not ready, so they count nowhere but as the head (`head_created`).
    let mut after = visible;
    for p in after.iter_mut() {
        if out.writes.deletes.iter().any(|d| d.name == p.name) {
            p.terminating = true;
        }
    }
    let observed_after = Observed { pods: &after, ..observed };
    let extras = plan::StatusExtras {
        head_pod_name: None,
        autoscaler: scaling.condition,
        refused: out.memory.refused.as_ref().map(|r| r.message.clone()),
    };
    let status = plan::status_with(desired, &observed_after, &targets, &planned, extras, input.now);
    let creates_head = out.writes.creates.iter().any(|c| c.worker.is_none());
    let creates = !out.writes.creates.is_empty();
    let status_wait = coalesce_status(
        cluster.status.as_ref(),
        status,
        creates_head,
        creates,
        scaling.awaiting_gcs,
        input.now,
        &mut out,
    );
    let timers = [status_wait, retry_wait, ray_nodes::next_deadline(input, &out.memory)].into_iter().flatten().min();
    out.next = next(input, more, timers, &out.ray.link);
    out
}

/// While pod creates are refused: how long the next try must still wait (`None`: it may go now).
/// A refusal is forgotten when the pass has nothing to create (its cause no longer matters).
fn refusal_gate(input: &PassInput<'_>, actions: &[Action], memory: &mut Memory) -> Option<Duration> {
    let r = memory.refused.as_ref()?;
    if !actions.iter().any(|a| matches!(a, Action::CreatePods { .. })) {
        memory.refused = None;
        return None;
    }
    (input.now < r.retry_at).then(|| r.retry_at.duration_since(input.now).unsigned_abs())
}

/// Worker pods the scheduler could not place for the unschedulable timeout: with the autoscaler,
/// the launch is given up (target − 1, Warning Event, reported to Ray as a failed launch by the
/// next report); without it, the pod is deleted and replaced. Returns every autoscaler delete
/// (drained pods, surplus pods, given-up launches), one per pod.
///
/// A given-up pod lowers its type's target only if the target counted it: a surplus pod (beyond
/// the target already) goes as surplus, and a pod being drained is deleted with no change to the
/// target. Lowering it for those would take a second pod away, and Ray would ask for it again on
/// the next pass (found by tests/pass_properties.rs).
fn give_up_unschedulable(
    input: &PassInput<'_>,
    desired: &Desired,
    scaling: &autoscale::Scaling,
    out: &mut PassDecision,
) -> Vec<(String, DeleteReason)> {
    let drained = scaling.delete.iter().map(|n| (n.clone(), DeleteReason::Drained));
    let excess = scaling.excess.iter().map(|n| (n.clone(), DeleteReason::Excess));
    let mut deletes: Vec<(String, DeleteReason)> = drained.chain(excess).collect();
    let timeout = input.settings.unschedulable_timeout.as_secs_f64();
    // A finished pod (its Ray node dead, say) is the plan's to replace, and an outdated one the
    // rolling replacement's (never ready, it goes at once): neither is a launch to give up.
    let current = |p: &ObservedPod| desired.workers.iter().any(|t| t.type_name == p.type_name && t.hash == p.hash);
    let waiting =
        |p: &&ObservedPod| p.kind == NodeKind::Worker && !p.terminating && p.phase != PodPhase::Finished && current(p);
    for p in input.pods.iter().filter(waiting) {
        let Some(since) = p.unschedulable_since else { continue };
        let stuck = input.now.duration_since(since).as_secs_f64();
        if stuck < timeout || deletes.iter().any(|(name, _)| name == &p.name) {
            continue;
        }
        let msg = format!(
            "pod {} of type {} could not be scheduled for {stuck:.0}s; giving up this launch",
            p.name, p.type_name
        );
        out.log.push(LogLine::Warn(msg.clone()));
        out.events.push(PassEvent { warning: true, reason: "LaunchFailed", note: msg });
        if input.settings.autoscaler.is_some()
            && !scaling.draining.contains(&p.name)
            && let Some(t) = out.memory.targets.get_mut(&p.type_name)
        {
            let min = desired.workers.iter().find(|w| w.type_name == p.type_name).map_or(0, |w| w.min_workers);
            // Never up: the global maxWorkers may hold a type below its minWorkers.
            *t = t.saturating_sub(1).max(min).min(*t);
        }
        deletes.push((p.name.clone(), DeleteReason::Unschedulable));
    }
    deletes
}

/// Splits the plan into writes within the creation budget; true when creates were left for later.
fn budget(actions: &[Action], create_batch: usize, writes: &mut Writes) -> bool {
    let mut more = false;
    let mut left = create_batch;
    for action in actions {
        match action {
            Action::CreatePods { worker, count } => {
                let n = (*count).min(left);
                left -= n;
                more |= n < *count;
                if n > 0 {
                    writes.creates.push(Create { worker: *worker, count: n });
                }
            }
            Action::ApplyService => writes.apply_service = true,
            Action::DeletePod { name, uid, reason } => {
                writes.deletes.push(Delete { name: name.clone(), uid: uid.clone(), reason: *reason })
            }
        }
    }
    more
}

/// Whether to write `status` now, later or not at all; sets `out.status` and the memory's due
/// time. Returns how long a deferred write waits.
///
/// Phase and generation changes are urgent, but for two, which wait at most [`STATUS_COALESCE`]:
/// - `Running` while the head's GCS link has not answered yet, for that first verdict, which
///   comes within milliseconds when the GCS is up or refuses connections;
/// - `Updating` from a pass that creates pods (`creates`), and from the passes after it until
///   the wait is due. It says only "pods are on their way", and a status patch of a RayCluster
///   costs the control plane about 5 ms of CPU, a third of a pod's create (BENCHMARKS.md,
///   section 7 notes): when the pods come up within the wait, the cluster's one write is
///   `Running`; when they do not, `Updating` is written a second later.
///
/// So a cluster whose pods start at once costs one status write, and one whose pods take longer
/// two (`Updating`, then `Running` with its `AutoscalerHealthy`), not three.
fn coalesce_status(
    old: Option<&RayClusterStatus>,
    status: RayClusterStatus,
    creates_head: bool,
    creates: bool,
    awaiting_gcs: bool,
    now: Timestamp,
    out: &mut PassDecision,
) -> Option<Duration> {
    // A created head gets a new name, so the status changes even if nothing else does.
    if old == Some(&status) && !creates_head {
        out.memory.status_due = None;
        return None;
    }
    if out.memory.status_due.as_ref().is_some_and(|d| d.phase.is_some_and(|p| Some(p) != status.phase)) {
        // The wait was for another phase's status: this one gets a wait of its own.
        out.memory.status_due = None;
    }
    let new_generation = old.is_none_or(|o| o.observed_generation != status.observed_generation);
    let new_phase = old.is_none_or(|o| o.phase != status.phase);
    let waits_for_gcs = awaiting_gcs && status.phase == Some(Phase::Running);
    // Our own creates wake the next pass at once (their pods' watch events), long before the
    // pods run: a wait that one began holds for `Updating` until it is due.
    let pods_on_their_way = status.phase == Some(Phase::Updating)
        && (creates || out.memory.status_due.as_ref().is_some_and(|d| now < d.at));
    // A cluster's first status counts as a new generation: its `Running` waits for the GCS too.
    let urgent = (new_generation || new_phase) && !waits_for_gcs && !pods_on_their_way;
    let coalesce = SignedDuration::try_from(STATUS_COALESCE).unwrap_or(SignedDuration::ZERO);
    let due = out
        .memory
        .status_due
        .get_or_insert_with(|| StatusDue { at: now.checked_add(coalesce).unwrap_or(now), phase: status.phase })
        .at;
    if urgent || now >= due {
        out.memory.status_due = None;
        out.status = Some(status);
        None
    } else {
        Some(due.duration_since(now).unsigned_abs())
    }
}

/// When to come back. `timers`: the earliest of the pass's own deadlines (a deferred status, a
/// refused create's retry, a Ray node's timeout).
fn next(input: &PassInput<'_>, more: bool, timers: Option<Duration>, link: &LinkAction) -> Next {
    let settings = input.settings;
    // An unschedulable pod's timeout passes without any event: come back when it does.
    let unschedulable_wait = input
        .pods
        .iter()
        .filter_map(|p| p.unschedulable_since)
        .map(|since| {
            let stuck = input.now.duration_since(since).as_secs_f64().max(0.0);
            Duration::from_secs_f64((settings.unschedulable_timeout.as_secs_f64() - stuck).max(0.0) + 0.1)
        })
        .min();
    let link_healthy = *link == LinkAction::Keep && input.ray.is_some_and(|r| *r.health == LinkHealth::Healthy);
    let next = if more {
        Next::Continue
    } else if let Some(wait) = unschedulable_wait {
        Next::After(settings.autoscaler.as_ref().map_or(wait, |a| wait.min(a.interval)))
    } else if let (Some(a), true) = (&settings.autoscaler, link_healthy) {
        // Idle timers advance without any event: look again each interval (no API calls unless
        // something changes). An unhealthy link wakes us itself when it recovers.
        Next::After(a.interval)
    } else {
        Next::Idle
    };
    // Deadlines come back by themselves.
    match (next, timers) {
        (Next::Idle, Some(w)) => Next::After(w),
        (Next::After(d), Some(w)) => Next::After(d.min(w)),
        (next, _) => next,
    }
}

/// What a pass does when the API server rejected an object built from the spec (400/422).
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    /// The error status, if it differs from the current one.
    pub status: Option<RayClusterStatus>,
    pub event: PassEvent,
    pub log: LogLine,
    /// For [`Memory::rejected`]: nothing is retried until the spec changes.
    pub fingerprint: String,
}

/// The decision after a rejected write: an error status naming the object, and no retry until
/// the RayCluster changes.
pub fn rejected(cluster: &RayCluster, kind: &str, message: &str, now: Timestamp) -> Rejection {
    let invalid = InvalidSpec { field: format!("spec.podTypes (the {kind} built from it)"), message: message.into() };
    let observed =
        Observed { status: cluster.status.as_ref(), generation: cluster.metadata.generation, ..Default::default() };
    let status = plan::error_status(&observed, &invalid, now);
    Rejection {
        status: (cluster.status.as_ref() != Some(&status)).then_some(status),
        event: PassEvent { warning: true, reason: "InvalidSpec", note: invalid.to_string() },
        log: LogLine::Warn(format!("the API server rejected a {kind}: {message}")),
        fingerprint: spec_fingerprint(cluster),
    }
}

/// A phase transition, for the log (`None` when the phase stays).
pub fn phase_change(old: Option<&RayClusterStatus>, new: &RayClusterStatus) -> Option<String> {
    let was = old.and_then(|s| s.phase);
    (was != new.phase).then(|| {
        format!("phase {} -> {}", was.map_or("<none>", Phase::as_str), new.phase.map_or("<none>", Phase::as_str))
    })
}
