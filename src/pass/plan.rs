//! The reconcile decision: given what should exist ([`Desired`]) and what is observed, which pods to
//! create or delete and what the status says. Pure: no I/O, no clock (the caller passes `now`).
//!
//! Level-based: the same inputs always give the same plan, and a plan that was already carried out
//! produces no further actions, so replayed events and operator restarts change nothing.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;

use super::conditions::{self, ClusterCondition, ConditionType};
use crate::api::{Phase, PodTypeStatus, RayClusterStatus};
use crate::model::desired::{Desired, InvalidSpec, NodeKind};
use crate::model::observed::{self, ObservedPod, PodPhase};

/// How many replacement workers of one type may be starting at once during a rolling replacement.
pub const ROLLING_SURGE: usize = 2;

/// One thing to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Server-side apply the head Service.
    ApplyService,
    /// Create `count` pods from the head template (`worker: None`) or from `workers[i]`.
    CreatePods { worker: Option<usize>, count: usize },
    /// Delete a pod (guarded by its UID).
    DeletePod { name: String, uid: String, reason: DeleteReason },
}

/// Why a pod is deleted; also the Event reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteReason {
    /// Its spec (or the cluster's annotations) changed.
    Outdated,
    /// It finished (Failed/Succeeded) and will be replaced.
    Finished,
    /// More workers than wanted.
    Excess,
    /// Its pod type no longer exists.
    Orphaned,
    /// The autoscaler drained its idle Ray node.
    Drained,
    /// It could not be scheduled for too long.
    Unschedulable,
    /// Its Ray node is DEAD in the GCS while the pod runs.
    RayNodeDead,
    /// It ran for the registration timeout without its Ray node registering.
    RayNodeNotRegistered,
    /// The head's GCS did not answer for the grace period while its pod ran.
    GcsUnreachable,
}

impl DeleteReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeleteReason::Outdated => "outdated",
            DeleteReason::Finished => "finished",
            DeleteReason::Excess => "excess",
            DeleteReason::Orphaned => "pod type removed",
            DeleteReason::Drained => "idle, drained",
            DeleteReason::Unschedulable => "unschedulable",
            DeleteReason::RayNodeDead => "Ray node dead",
            DeleteReason::RayNodeNotRegistered => "Ray node never registered",
            DeleteReason::GcsUnreachable => "GCS unreachable",
        }
    }
}

/// Inputs besides the desired state and the pods.
#[derive(Clone, Debug, Default)]
pub struct Observed<'a> {
    pub pods: &'a [ObservedPod],
    /// Value of the `ray-launch-config` label on the head Service, if it exists.
    pub service_hash: Option<&'a str>,
    /// The status as last written.
    pub status: Option<&'a RayClusterStatus>,
    pub generation: Option<i64>,
}

/// How many workers of each type to keep, and whether surplus ones may be removed. Without an
/// autoscaler this is each type's `minWorkers`; the autoscaler supplies its own.
#[derive(Clone, Debug, Default)]
pub struct Targets {
    pub workers: BTreeMap<String, u32>,
    pub allow_scale_down: bool,
}

/// The decision of one reconcile pass.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// True when the head failed or vanished and this plan recreates it (`autoscalerRetries` + 1).
    pub head_recovery: bool,
    /// True when the head is being replaced because its spec changed.
    pub head_update: bool,
}

/// Worker targets when no autoscaler runs: `minWorkers` per type, within the global `maxWorkers`.
pub fn min_worker_targets(desired: &Desired, global_max: u32) -> Targets {
    let mut left = global_max;
    let mut workers = BTreeMap::new();
    for t in &desired.workers {
        let n = t.min_workers.min(left);
        left -= n;
        workers.insert(t.type_name.clone(), n);
    }
    Targets { workers, allow_scale_down: true }
}

fn delete(pod: &ObservedPod, reason: DeleteReason) -> Action {
    Action::DeletePod { name: pod.name.clone(), uid: pod.uid.clone(), reason }
}

/// Decides what to do.
pub fn plan(desired: &Desired, observed: &Observed<'_>, targets: &Targets) -> Plan {
    let mut actions = Vec::new();
    if observed.service_hash != Some(desired.service_hash.as_str()) {
        actions.push(Action::ApplyService);
    }

    // --- head ---
    let heads: Vec<&ObservedPod> =
        observed.pods.iter().filter(|p| p.kind == NodeKind::Head && !p.terminating).collect();
    let mut head_recovery = false;
    let mut head_update = false;
    let mut live_head = false;
    for h in &heads {
        if h.phase == PodPhase::Finished {
            actions.push(delete(h, DeleteReason::Finished));
            head_recovery = true;
        } else if h.hash != desired.head.hash {
            actions.push(delete(h, DeleteReason::Outdated));
            head_update = true;
        } else if live_head {
            // Two current heads can only come from outside interference; keep the first.
            actions.push(delete(h, DeleteReason::Excess));
        } else {
            live_head = true;
        }
    }
    let status = observed.status.cloned().unwrap_or_default();
    if !live_head && !head_update {
        if heads.is_empty() {
            // A head we once had is gone without us replacing it: that is a failure to recover from,
            // unless we were in the middle of an update (we deleted it ourselves).
            let had_head = status.head_pod_name.is_some();
            let updating = status.phase == Some(Phase::Updating);
            if had_head && !updating {
                head_recovery = true;
            }
        }
        // Replace a deleted or finished head at once; an outdated one only after it is gone.
        actions.push(Action::CreatePods { worker: None, count: 1 });
    }

    // --- workers ---
    for (i, t) in desired.workers.iter().enumerate() {
        let pods: Vec<&ObservedPod> = observed.pods.iter().filter(|p| p.is_worker_of(&t.type_name)).collect();
        let mut current = Vec::new();
        let mut outdated = Vec::new();
        for p in pods {
            if p.phase == PodPhase::Finished {
                actions.push(delete(p, DeleteReason::Finished));
            } else if p.hash == t.hash {
                current.push(p);
            } else {
                outdated.push(p);
            }
        }
        let target = targets.workers.get(&t.type_name).copied().unwrap_or(t.min_workers) as usize;
        let missing = target.saturating_sub(current.len());
        if outdated.is_empty() {
            if missing > 0 {
                actions.push(Action::CreatePods { worker: Some(i), count: missing });
            } else if current.len() > target && targets.allow_scale_down {
                // Remove the least useful first: not ready, then the newest names are arbitrary but stable.
                let mut surplus = current.clone();
                surplus.sort_by_key(|p| (p.ready, std::cmp::Reverse(p.name.clone())));
                for p in surplus.into_iter().take(current.len() - target) {
                    actions.push(delete(p, DeleteReason::Excess));
                }
            }
        } else {
            // Rolling replacement: a few new pods at a time; old ones go once enough new ones are ready.
            let starting = current.iter().filter(|p| !p.ready).count();
            let create = missing.min(ROLLING_SURGE.saturating_sub(starting));
            if create > 0 {
                actions.push(Action::CreatePods { worker: Some(i), count: create });
            }
            let ready_current = current.iter().filter(|p| p.ready).count();
            let keep_ready_old = target.saturating_sub(ready_current);
            let mut kept = 0;
            let mut old = outdated.clone();
            old.sort_by_key(|p| (p.ready, p.name.clone()));
            for p in old {
                if p.ready && kept < keep_ready_old {
                    kept += 1;
                    continue;
                }
                actions.push(delete(p, DeleteReason::Outdated));
            }
        }
    }

    // Pods of types that were removed from the spec.
    for p in observed.pods.iter().filter(|p| p.kind == NodeKind::Worker && !p.terminating) {
        if !desired.workers.iter().any(|t| t.type_name == p.type_name) {
            actions.push(delete(p, DeleteReason::Orphaned));
        }
    }

    Plan { actions, head_recovery, head_update }
}

/// What the status should say after `plan` (with `head_pod_name` = the head's name after it ran).
pub fn status(
    desired: &Desired,
    observed: &Observed<'_>,
    targets: &Targets,
    plan: &Plan,
    head_pod_name: Option<String>,
    now: Timestamp,
) -> RayClusterStatus {
    status_with(desired, observed, targets, plan, StatusExtras { head_pod_name, ..Default::default() }, now)
}

/// What a pass knows for the status besides the plan.
#[derive(Clone, Debug, Default)]
pub struct StatusExtras {
    /// The head's name after the plan ran (`None` keeps the last one).
    pub head_pod_name: Option<String>,
    /// The autoscaler's condition when the pass knows it (`None` keeps the last one).
    pub autoscaler: Option<ClusterCondition>,
    /// What the API server said when it last refused a pod create, while that lasts.
    pub refused: Option<String>,
}

/// [`status`], with [`StatusExtras`].
pub fn status_with(
    desired: &Desired,
    observed: &Observed<'_>,
    targets: &Targets,
    plan: &Plan,
    extras: StatusExtras,
    now: Timestamp,
) -> RayClusterStatus {
    let StatusExtras { head_pod_name, autoscaler, refused } = extras;
    let old = observed.status.cloned().unwrap_or_default();
    let generation = observed.generation;
    let head = observed::current_head(observed.pods, &desired.head.hash);
    let head_ready = observed::head_is_ready(observed.pods, &desired.head.hash);

    let mut pod_types = Vec::new();
    let (mut want, mut have) = (0u32, 0u32);
    for t in &desired.workers {
        let desired_n = targets.workers.get(&t.type_name).copied().unwrap_or(t.min_workers);
        let ready =
            observed.pods.iter().filter(|p| p.is_worker_of(&t.type_name) && p.hash == t.hash && p.ready).count() as u32;
        want += desired_n;
        have += ready.min(desired_n);
        pod_types.push(PodTypeStatus { name: t.type_name.clone(), desired: desired_n, ready });
    }
    let workers_ready = pod_types.iter().all(|t| t.ready >= t.desired);

    let retries = old.autoscaler_retries + i64::from(plan.head_recovery);
    let recovering = plan.head_recovery || (old.phase == Some(Phase::AutoscalingExceptionRecovery) && !head_ready);
    let busy = !plan.actions.iter().all(|a| matches!(a, Action::ApplyService));
    let phase = if recovering {
        Phase::AutoscalingExceptionRecovery
    } else if busy || !head_ready || !workers_ready {
        Phase::Updating
    } else {
        Phase::Running
    };
    let (head_reason, head_msg) = match head {
        _ if head_ready => ("HeadPodReady", "the head pod is running and ready".to_string()),
        Some(h) => ("HeadPodNotReady", format!("head pod {} is not ready yet", h.name)),
        None if plan.head_update => ("HeadPodReplacing", "the head pod is being replaced after a spec change".into()),
        None => ("HeadPodMissing", "the head pod is being created".into()),
    };
    let (ready_reason, ready_msg) = match phase {
        _ if refused.is_some() => ("FailedCreate", refused.clone().unwrap_or_default()),
        Phase::Running => ("ClusterReady", format!("head and {have}/{want} workers are ready")),
        Phase::AutoscalingExceptionRecovery => ("HeadRecovery", "recovering a failed or deleted head pod".into()),
        _ => ("Reconciling", format!("{have}/{want} workers ready; pods are being created or replaced")),
    };
    let mut computed = vec![
        ClusterCondition::new(ConditionType::Ready, phase == Phase::Running, ready_reason, ready_msg),
        ClusterCondition::new(ConditionType::HeadReady, head_ready, head_reason, head_msg),
    ];
    computed.extend(autoscaler);
    // Like a ReplicaSet's ReplicaFailure: present while creates are refused, gone once one succeeds.
    computed.extend(
        refused.as_ref().map(|m| ClusterCondition::new(ConditionType::ReplicaFailure, true, "FailedCreate", m.clone())),
    );
    let conditions = conditions::merge(&old.conditions, &computed, generation, now);
    RayClusterStatus {
        phase: Some(phase),
        autoscaler_retries: retries,
        observed_generation: generation,
        conditions,
        pod_types,
        workers: Some(format!("{have}/{want}")),
        // The head this pass created, else the current head as observed (a pass that created it
        // may not have written its status: see `coalesce_status`), else the one last named.
        head_pod_name: head_pod_name.or_else(|| head.map(|h| h.name.clone())).or(old.head_pod_name),
        head_service_name: desired.service.metadata.name.clone(),
        message: refused,
    }
}

/// Status of a cluster whose spec cannot be realised.
pub fn error_status(observed: &Observed<'_>, err: &InvalidSpec, now: Timestamp) -> RayClusterStatus {
    let old = observed.status.cloned().unwrap_or_default();
    let message = format!("invalid {}: {}", err.field, err.message);
    RayClusterStatus {
        phase: Some(Phase::Error),
        observed_generation: observed.generation,
        conditions: conditions::merge(
            &old.conditions,
            &[ClusterCondition::new(ConditionType::Ready, false, "InvalidSpec", message.clone())],
            observed.generation,
            now,
        ),
        message: Some(message),
        ..old
    }
}
