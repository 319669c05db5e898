//! The autoscaler's part of a pass: the remembered worker targets, the link to the GCS, drains,
//! and Ray's decision ([`crate::autoscaler::scale::decide`]) applied to the targets.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use kube::ResourceExt;

use super::conditions::{ClusterCondition, ConditionType};
use super::plan;
use super::{LinkAction, LogLine, PassDecision, PassEvent, PassInput, Scaled};
use crate::api::RayCluster;
use crate::autoscaler::scale::{self, DrainCandidate, DrainState, LinkHealth};
use crate::model::desired::{Desired, GCS_ADDRESS_ANNOTATION, PodTemplate, head_service_dns};
use crate::model::observed::{self, ObservedPod};
use crate::ray::{ClusterState, NodeStatus};

/// What the autoscaler's part hands to the rest of the pass.
#[derive(Default)]
pub(super) struct Scaling {
    /// Pods being drained: not counted, not touched by the plan.
    pub draining: BTreeSet<String>,
    /// Drained pods whose Ray node is gone: delete them.
    pub delete: Vec<String>,
    /// Surplus pods beyond their type's target that have no Ray node yet: delete them.
    pub excess: Vec<String>,
    /// The AutoscalerHealthy condition, when this pass knows it.
    pub condition: Option<ClusterCondition>,
    /// The head runs but its GCS link has given no verdict yet (new, or no answer so far).
    pub awaiting_gcs: bool,
}

fn unhealthy(reason: &'static str, message: String) -> Option<ClusterCondition> {
    Some(ClusterCondition::new(ConditionType::AutoscalerHealthy, false, reason, message))
}

/// The condition while a link waits for its first answer: "connecting" replaces only what a head
/// that did not run said (or nothing); a verdict from before (an operator restart, a new link to
/// the same cluster) stays until the new link has one.
fn connecting(cluster: &RayCluster, addr: &str) -> Option<ClusterCondition> {
    let conditions = cluster.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let last = conditions.iter().find(|c| c.type_ == ConditionType::AutoscalerHealthy.as_str());
    if last.is_some_and(|c| c.reason != HEAD_NOT_RUNNING) {
        return None;
    }
    unhealthy("Connecting", format!("connecting to the GCS at {addr}"))
}

/// The AutoscalerHealthy reason while the head pod does not run: the GCS is not expected to
/// answer, so this is no GCS failure (the fleet gauge and its alert leave it out).
pub const HEAD_NOT_RUNNING: &str = "HeadNotRunning";

/// The GCS address of a cluster: the override annotation (only if `allow_annotation`: the operator
/// flag that lets RayCluster editors choose where the operator connects), else the head Service's
/// ClusterIP and `gcs` port (no DNS lookup per poll), else the Service's DNS name.
pub fn gcs_address(
    cluster: &RayCluster,
    desired: &Desired,
    service_ip: Option<&str>,
    allow_annotation: bool,
) -> String {
    if let Some(a) = cluster.annotations().get(GCS_ADDRESS_ANNOTATION).filter(|a| allow_annotation && !a.is_empty()) {
        return a.clone();
    }
    let port = desired.gcs_port;
    match service_ip {
        Some(ip) if ip.contains(':') => format!("[{ip}]:{port}"),
        Some(ip) => format!("{ip}:{port}"),
        None => format!("{}:{port}", head_service_dns(&cluster.name_any(), &cluster.namespace().unwrap_or_default())),
    }
}

/// Clamps each target to its type's bounds, then all of them, in manifest order, to the global
/// `maxWorkers` (which wins over `minWorkers`, as without the autoscaler).
fn clamp_targets(targets: &mut BTreeMap<String, u32>, desired: &Desired, global_max: u32) {
    let mut left = global_max;
    for t in &desired.workers {
        if let Some(n) = targets.get_mut(&t.type_name) {
            *n = (*n).clamp(t.min_workers, t.max_workers.max(t.min_workers)).min(left);
            left -= *n;
        }
    }
    targets.retain(|k, _| desired.workers.iter().any(|t| &t.type_name == k));
}

/// Sets `out.memory.targets`: without the autoscaler each type's `minWorkers` (within the global
/// `maxWorkers`); with it, the remembered targets (initialised from the pods, clamped to the
/// bounds) moved by Ray's decision. With the autoscaler, also decides the link, the drains, the
/// report and the launches.
pub(super) fn autoscale(input: &PassInput<'_>, desired: &Desired, out: &mut PassDecision) -> Scaling {
    let global_max = input.cluster.spec.max_workers();
    if input.settings.autoscaler.is_none() {
        out.memory.targets = plan::min_worker_targets(desired, global_max).workers;
        return Scaling::default();
    }
    // Pods being drained are on their way out: they count for no target (rejected drains are
    // forgotten below, and those pods count again).
    let draining = |p: &ObservedPod| {
        input.ray.and_then(|r| r.drains.get(&p.name)).is_some_and(|st| !matches!(st, DrainState::Rejected(_)))
    };
    // Live workers of a type that are not being drained.
    let have = |t: &PodTemplate| observed::live_workers(input.pods, &t.type_name, &t.hash, |p| !draining(p));
    for t in &desired.workers {
        // Initialised from what exists.
        out.memory.targets.entry(t.type_name.clone()).or_insert_with(|| have(t));
    }
    clamp_targets(&mut out.memory.targets, desired, global_max);
    if !observed::head_is_running(input.pods, &desired.head.hash) {
        out.ray.link = LinkAction::Stop;
        let condition = unhealthy(HEAD_NOT_RUNNING, "waiting for the head pod to run".into());
        return Scaling { condition, ..Default::default() };
    }
    let allow = input.settings.autoscaler.as_ref().is_some_and(|a| a.gcs_address_annotation);
    let addr = gcs_address(input.cluster, desired, input.service.and_then(|s| s.cluster_ip.as_deref()), allow);
    let Some(ray) = input.ray.filter(|r| r.addr == addr) else {
        // A new link knows nothing yet: keep what exists. The condition says "connecting" only
        // where it said the head did not run; any other verdict stays (an operator restart must
        // not rewrite the status of every cluster).
        let condition = connecting(input.cluster, &addr);
        out.ray.link = LinkAction::Connect(addr);
        return Scaling { condition, awaiting_gcs: true, ..Default::default() };
    };
    // Forget drains of pods that are gone, and rejected ones (the node got work: keep it).
    let names: BTreeSet<&str> = input.pods.iter().map(|p| p.name.as_str()).collect();
    let (kept, forgotten): (Vec<_>, Vec<_>) =
        ray.drains.iter().partition(|(pod, st)| names.contains(pod.as_str()) && !matches!(st, DrainState::Rejected(_)));
    out.ray.forget_drains = forgotten.into_iter().map(|(pod, _)| pod.clone()).collect();
    let mut draining: BTreeSet<String> = kept.iter().map(|(pod, _)| (*pod).clone()).collect();

    let Some(snapshot) = ray.snapshot else {
        // No fresh view of Ray: never scale down, keep what exists (at least minWorkers).
        let (condition, awaiting_gcs) = match ray.health {
            LinkHealth::Unhealthy { reason, message } => {
                (unhealthy(gcs_reason(reason), format!("GCS at {addr}: {message}")), false)
            }
            LinkHealth::Connecting => (connecting(input.cluster, &addr), true),
            LinkHealth::Healthy => (None, false),
        };
        return Scaling { draining, condition, awaiting_gcs, ..Default::default() };
    };
    let idle_ms = i64::from(input.cluster.spec.idle_timeout_minutes()) * 60_000;
    let now = SystemTime::from(input.now);
    // Pods beyond their type's maxWorkers first, as Ray terminates nodes beyond max_workers before
    // it schedules: a pod that is about to go must not absorb demand, or the next pass (without
    // it) launches for that demand again. Surplus against the targets waits for the decision,
    // which moves them.
    let mut excess = Vec::new();
    remove_surplus(input, desired, snapshot, Beyond::TypeMax, &mut draining, &mut excess, out);
    let leaving: BTreeSet<String> = draining.iter().chain(&excess).cloned().collect();
    // Every drain asked for counts, answered or not: a pod whose drain is still on its way to the
    // GCS must not be drained (and its target lowered) a second time.
    let s = match scale::decide(&input.cluster.spec, desired, input.pods, snapshot, &leaving, idle_ms, now) {
        Ok(s) => s,
        Err(e) => {
            out.log.push(LogLine::Warn(format!("autoscaler decision failed: {e}")));
            return Scaling { draining, condition: unhealthy("DecisionFailed", e.to_string()), ..Default::default() };
        }
    };
    for d in &s.drain {
        out.log.push(LogLine::Info(format!("draining idle worker {} (Ray node {})", d.pod, d.node_id)));
    }
    let before = out.memory.targets.clone();
    // Live pods of a type that stay, old and new pods counted once: not drained, not surplus, and
    // no Ray node draining (a drain somebody else asked for: Ray's decision does not count such
    // a node, so a launch it asks for is on top of the others; counting the pod as well would
    // raise the target past what Ray wants, and the idle scale-down would take it back).
    let nodes_draining: BTreeSet<&str> =
        snapshot.nodes.iter().filter(|n| n.status == NodeStatus::Draining).map(|n| n.instance_id.as_str()).collect();
    let staying = |t: &PodTemplate| {
        let stays = |p: &ObservedPod| !leaving.contains(&p.name) && !nodes_draining.contains(p.name.as_str());
        observed::live_workers(input.pods, &t.type_name, &t.hash, stays)
    };
    for t in &desired.workers {
        // Ray's launches are counted from the live pods, not from the target: a worker that died
        // (its pod Finished) or a launch that is not a pod yet is in the target but not live, and
        // Ray asks for it again. Adding would count it twice (seen: one dead worker replaced by two).
        let launch = s.launches.get(&t.type_name).copied().unwrap_or(0);
        let drained = s.drain.iter().filter(|d| d.type_name == t.type_name).count() as u32;
        if let Some(target) = out.memory.targets.get_mut(&t.type_name) {
            let wanted = if launch > 0 { (*target).max(staying(t) + launch) } else { *target };
            *target = wanted.saturating_sub(drained);
        }
    }
    clamp_targets(&mut out.memory.targets, desired, global_max);
    // Ray's min_workers may ask for more than the global maxWorkers allows; what the clamp
    // dropped is no decision to announce.
    if let Some(summary) = s.summary.as_ref().filter(|_| out.memory.targets != before || !s.drain.is_empty()) {
        out.log.push(LogLine::Info(summary.clone()));
        out.events.push(PassEvent { warning: false, reason: "Autoscaled", note: summary.clone() });
        out.scaled = Some(if s.launches.is_empty() { Scaled::Down } else { Scaled::Up });
    }
    draining.extend(s.drain.iter().map(|d| d.pod.clone()));
    out.ray.drains.extend(s.drain);
    // Again: the clamp to the global maxWorkers may have lowered another type's target.
    remove_surplus(input, desired, snapshot, Beyond::Target, &mut draining, &mut excess, out);
    // Surplus pods without a Ray node are deleted as surplus, not as drained ones.
    let delete = s.delete.into_iter().filter(|p| !excess.contains(p)).collect();
    out.ray.report = Some(s.report);
    let message = format!("reading demand from the GCS at {addr}");
    Scaling {
        draining,
        delete,
        excess,
        condition: Some(ClusterCondition::new(ConditionType::AutoscalerHealthy, true, "GcsReachable", message)),
        awaiting_gcs: false,
    }
}

/// Condition reason for a bounded GCS error reason.
fn gcs_reason(reason: &str) -> &'static str {
    match reason {
        "unreachable" | "connect" => "GcsUnreachable",
        "timeout" => "GcsTimeout",
        "protocol" | "decode" => "GcsProtocolError",
        "too_large" => "GcsReplyTooLarge",
        _ => "GcsError",
    }
}

/// What [`remove_surplus`] counts a type's pods against.
#[derive(Clone, Copy)]
enum Beyond {
    /// The type's `maxWorkers` (fixed by the spec; before Ray's decision).
    TypeMax,
    /// The type's target (after Ray's decision moved it).
    Target,
}

/// Pods beyond every target (duplicates created by two leaders during a failover, or a target
/// lowered while pods were on their way): the least useful go first (no Ray node yet, deleted at
/// once; then idle nodes, longest idle first, drained through Ray like any idle scale-down).
/// Busy nodes are never taken: they go once idle. Types in a rolling replacement are left to it.
/// Adds the drains to `out.ray.drains` and `draining`, and the pods to delete to `delete`; pods
/// already in either are not counted.
fn remove_surplus(
    input: &PassInput<'_>,
    desired: &Desired,
    snapshot: &ClusterState,
    beyond: Beyond,
    draining: &mut BTreeSet<String>,
    delete: &mut Vec<String>,
    out: &mut PassDecision,
) {
    for t in &desired.workers {
        let live: Vec<&ObservedPod> = input
            .pods
            .iter()
            .filter(|p| p.is_live_worker_of(&t.type_name) && !draining.contains(&p.name) && !delete.contains(&p.name))
            .collect();
        if observed::in_rolling_replacement(live.iter().copied(), &t.type_name, &t.hash) {
            continue;
        }
        let target = match beyond {
            Beyond::TypeMax => t.max_workers.max(t.min_workers),
            Beyond::Target => out.memory.targets.get(&t.type_name).copied().unwrap_or(t.min_workers),
        } as usize;
        if live.len() <= target {
            continue;
        }
        let node =
            |p: &ObservedPod| snapshot.nodes.iter().find(|n| n.instance_id == p.name && n.status != NodeStatus::Dead);
        // (rank, longest idle first): no node 0, idle 1; busy or draining nodes are not candidates.
        let mut candidates: Vec<(u8, i64, &ObservedPod)> = live
            .iter()
            .filter_map(|p| match node(p) {
                None => Some((0, 0, *p)),
                Some(n) if n.status == NodeStatus::Idle => Some((1, -n.idle_duration_ms, *p)),
                Some(_) => None,
            })
            .collect();
        candidates.sort_by(|a, b| (a.0, a.1, &a.2.name).cmp(&(b.0, b.1, &b.2.name)));
        for (_, _, p) in candidates.into_iter().take(live.len() - target) {
            let msg = format!(
                "removing surplus worker {} of type {} ({} live for a target of {target})",
                p.name,
                t.type_name,
                live.len()
            );
            out.log.push(LogLine::Info(msg));
            match node(p) {
                Some(n) => {
                    out.ray.drains.push(DrainCandidate {
                        pod: p.name.clone(),
                        node_id: n.node_id.clone(),
                        type_name: t.type_name.clone(),
                    });
                    draining.insert(p.name.clone());
                }
                None => delete.push(p.name.clone()),
            }
        }
    }
}
