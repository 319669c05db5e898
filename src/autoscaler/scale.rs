//! From Ray's view of a cluster and the operator's pods to what the reconciler should do: how many
//! workers of each type to keep, which idle workers to drain, which drained pods to delete, and
//! what to report back to the GCS. Pure: the caller fetches the state and carries the result out.
//! Also the plain-data vocabulary of the link to the GCS ([`LinkHealth`], [`DrainState`]), so a
//! pass can decide from it without touching the link itself.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::time::SystemTime;

use super::decision::{self, NodeTypeConfig, ResourceMap};
use super::decision_input::to_decision_input;
use crate::api::RayClusterSpec;
use crate::model::desired::{Desired, NodeKind};
use crate::model::observed::{self, ObservedPod, PodPhase};
use crate::ray::{AutoscalingReport, ClusterState, NodeStatus, PendingInstance, PendingLaunch, RayNode};

/// Whether the GCS answered lately.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkHealth {
    /// No answer yet.
    Connecting,
    Healthy,
    /// The last call failed; `reason` is bounded (metrics), `message` is for humans.
    Unhealthy {
        reason: &'static str,
        message: String,
    },
}

/// Outcome of a drain request, by pod name. The link to the GCS owns these (answers arrive there);
/// a pass reads them and says which to forget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DrainState {
    Requested,
    Accepted,
    Rejected(String),
}

/// A worker to drain: its pod and its Ray node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainCandidate {
    pub pod: String,
    pub node_id: String,
    pub type_name: String,
}

/// The autoscaler's decision for one pass.
#[derive(Clone, Debug, Default)]
pub struct Scaling {
    /// New pods per type (Ray's `nodes_to_launch`).
    pub launches: BTreeMap<String, u32>,
    /// Idle workers to drain now.
    pub drain: Vec<DrainCandidate>,
    /// Pods whose drain is complete (or whose node is gone): delete them.
    pub delete: Vec<String>,
    /// What `ray status` should show.
    pub report: AutoscalingReport,
    /// One human line describing a change, if anything changes.
    pub summary: Option<String>,
}

/// Node types as Ray sees them: the head (no workers) and each worker type.
pub fn node_types(desired: &Desired) -> Vec<NodeTypeConfig> {
    std::iter::once(NodeTypeConfig {
        name: desired.head.type_name.clone(),
        resources: desired.head.resources.clone(),
        min_workers: 0,
        max_workers: 0,
    })
    .chain(desired.workers.iter().map(|t| NodeTypeConfig {
        name: t.type_name.clone(),
        resources: t.resources.clone(),
        min_workers: t.min_workers,
        max_workers: t.max_workers,
    }))
    .collect()
}

fn fmt_shape(shape: &ResourceMap) -> String {
    let parts: Vec<String> = shape.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!("{{{}}}", parts.join(", "))
}

/// True when some node type could ever hold `shape` (so it is not infeasible, merely waiting).
fn fits_some_type(shape: &ResourceMap, types: &[NodeTypeConfig]) -> bool {
    types
        .iter()
        .filter(|t| t.max_workers > 0)
        .any(|t| shape.iter().all(|(k, v)| *v <= 0.0 || t.resources.get(k).is_some_and(|have| have >= v)))
}

/// Alive Ray nodes by instance id (= pod name).
fn nodes_by_instance(state: &ClusterState) -> BTreeMap<&str, &RayNode> {
    state
        .nodes
        .iter()
        .filter(|n| n.status != NodeStatus::Dead && !n.instance_id.is_empty())
        .map(|n| (n.instance_id.as_str(), n))
        .collect()
}

/// Decides. `draining`: pods whose drain was asked for earlier (kept out of the count; deleted
/// once their node is gone). `idle_timeout_ms`: how long a worker must be idle to be removed.
pub fn decide(
    spec: &RayClusterSpec,
    desired: &Desired,
    pods: &[ObservedPod],
    state: &ClusterState,
    draining: &BTreeSet<String>,
    idle_timeout_ms: i64,
    now: SystemTime,
) -> Result<Scaling, decision::DecisionError> {
    let types = node_types(desired);
    let live: Vec<&ObservedPod> = pods.iter().filter(|p| p.is_live() && !draining.contains(&p.name)).collect();
    let listed: Vec<(String, String)> = live.iter().map(|p| (p.type_name.clone(), p.name.clone())).collect();
    let input =
        to_decision_input(state, &types, &desired.head.type_name, spec.max_workers(), spec.upscaling_speed(), &listed);
    let decision = decision::get_nodes_to_launch(&input)?;

    // Workers per type, old and new pods of a type counted once (as the pass counts them): during
    // a rolling replacement the old pods are on their way out, and counting both would make the
    // current pods look like surplus to the idle scale-down below.
    let count: BTreeMap<&str, u32> = desired
        .workers
        .iter()
        .map(|t| (t.type_name.as_str(), observed::live_workers(live.iter().copied(), &t.type_name, &t.hash, |_| true)))
        .collect();
    // What each type would have after this decision; only the summary line and the drain bound
    // read it (the pass owns the remembered targets and moves them by `launches` and `drain`).
    let mut targets = BTreeMap::new();
    for t in &desired.workers {
        let have = count.get(t.type_name.as_str()).copied().unwrap_or(0);
        let launch = decision.nodes_to_launch.get(&t.type_name).copied().unwrap_or(0);
        targets.insert(t.type_name.clone(), (have + launch).min(t.max_workers).max(t.min_workers.min(t.max_workers)));
    }
    let by_instance = nodes_by_instance(state);
    let mut drain = idle_drains(desired, &live, &by_instance, &decision.nodes_to_launch, &mut targets, idle_timeout_ms);
    let has_demand =
        !(input.resource_demands.is_empty() && input.placement_groups.is_empty() && input.request_resources.is_empty());
    if !drain.is_empty() && has_demand {
        // A node idle past the timeout while demand is pending is rare (Ray places work on idle
        // nodes within moments), but when the decision counted such a node for that demand,
        // draining it leaves the demand short and the next pass launches a node to replace it.
        // Keep each idle node whose removal would change the decision.
        let shortfall = |d: &decision::Decision| {
            (
                d.nodes_to_launch.values().map(|n| u64::from(*n)).sum::<u64>(),
                d.unfulfilled.iter().map(|u| u.count).sum::<u64>(),
            )
        };
        let base = shortfall(&decision);
        let mut out: BTreeSet<String> = BTreeSet::new();
        let mut kept = Vec::new();
        for d in drain {
            out.insert(d.pod.clone());
            let without: Vec<(String, String)> = listed.iter().filter(|(_, pod)| !out.contains(pod)).cloned().collect();
            let input = to_decision_input(
                state,
                &types,
                &desired.head.type_name,
                spec.max_workers(),
                spec.upscaling_speed(),
                &without,
            );
            if shortfall(&decision::get_nodes_to_launch(&input)?) == base {
                kept.push(d);
            } else {
                out.remove(&d.pod);
                if let Some(t) = targets.get_mut(&d.type_name) {
                    *t += 1;
                }
            }
        }
        drain = kept;
    }

    // Drained pods go once their Ray node is dead or gone.
    let delete: Vec<String> = pods
        .iter()
        .filter(|p| draining.contains(&p.name) && !p.terminating)
        .filter(|p| by_instance.get(p.name.as_str()).is_none_or(|n| n.status == NodeStatus::Dead))
        .map(|p| p.name.clone())
        .collect();
    let report = report(state, &types, &live, &by_instance, &decision.nodes_to_launch, now);
    let summary = summary(desired, state, &decision, &count, &targets, &drain);
    Ok(Scaling { launches: decision.nodes_to_launch, drain, delete, report, summary })
}

/// Idle scale-down: Ray nodes of live worker pods, idle long enough, above their type's minimum,
/// and not of a type we are launching right now. Never the head. Lowers `targets` by each.
fn idle_drains(
    desired: &Desired,
    live: &[&ObservedPod],
    by_instance: &BTreeMap<&str, &RayNode>,
    launches: &BTreeMap<String, u32>,
    targets: &mut BTreeMap<String, u32>,
    idle_timeout_ms: i64,
) -> Vec<DrainCandidate> {
    let mut drain = Vec::new();
    for t in &desired.workers {
        if launches.get(&t.type_name).copied().unwrap_or(0) > 0 {
            continue;
        }
        // Its idle current pod is what the old ones are being replaced by.
        if observed::in_rolling_replacement(live.iter().copied(), &t.type_name, &t.hash) {
            continue;
        }
        let mut keep = targets.get(&t.type_name).copied().unwrap_or(0);
        let mut idle: Vec<(&ObservedPod, &RayNode)> = live
            .iter()
            .filter(|p| p.is_live_worker_of(&t.type_name))
            .filter_map(|p| by_instance.get(p.name.as_str()).map(|n| (*p, *n)))
            .filter(|(_, n)| !n.is_head() && n.status == NodeStatus::Idle && n.idle_duration_ms >= idle_timeout_ms)
            .collect();
        // Longest idle first, as Ray removes the least recently used.
        idle.sort_by_key(|(p, n)| (std::cmp::Reverse(n.idle_duration_ms), p.name.clone()));
        for (p, n) in idle {
            if keep <= t.min_workers {
                break;
            }
            keep -= 1;
            drain.push(DrainCandidate {
                pod: p.name.clone(),
                node_id: n.node_id.clone(),
                type_name: t.type_name.clone(),
            });
        }
        targets.insert(t.type_name.clone(), keep);
    }
    drain
}

/// The report for `ray status`.
fn report(
    state: &ClusterState,
    types: &[NodeTypeConfig],
    live: &[&ObservedPod],
    by_instance: &BTreeMap<&str, &RayNode>,
    launches: &BTreeMap<String, u32>,
    now: SystemTime,
) -> AutoscalingReport {
    let pending_instances = live
        .iter()
        .filter(|p| p.kind == NodeKind::Worker && !by_instance.contains_key(p.name.as_str()))
        .map(|p| PendingInstance {
            instance_id: p.name.clone(),
            node_type: p.type_name.clone(),
            ip_address: p.ip.clone().unwrap_or_default(),
            details: if p.phase == PodPhase::Running { "starting ray".into() } else { "pod pending".into() },
        })
        .collect();
    let pending_launches = launches
        .iter()
        .flat_map(|(t, n)| (0..*n).map(move |_| PendingLaunch { node_type: t.clone(), count: 1, requested_at: now }))
        .collect();
    // Only shapes no type can ever serve are infeasible (listing merely waiting demand could make
    // the GCS cancel tasks when infeasible-task early exit is on).
    let infeasible_requests = state
        .pending_resource_requests
        .iter()
        .filter(|d| !d.involves_placement_group() && !fits_some_type(&d.shape, types))
        .cloned()
        .collect();
    AutoscalingReport {
        cluster_state_version: state.version,
        pending_launches,
        pending_instances,
        infeasible_requests,
        ..Default::default()
    }
}

/// One human line describing what the decision changes, if anything.
fn summary(
    desired: &Desired,
    state: &ClusterState,
    decision: &decision::Decision,
    count: &BTreeMap<&str, u32>,
    targets: &BTreeMap<String, u32>,
    drain: &[DrainCandidate],
) -> Option<String> {
    let mut summary = String::new();
    for t in &desired.workers {
        let have = count.get(t.type_name.as_str()).copied().unwrap_or(0);
        let want = targets.get(&t.type_name).copied().unwrap_or(have);
        // Only what this decision changes: a type above its bounds (maxWorkers lowered) is not
        // scaled by the autoscaler, and saying so on every pass would be an Event per pass.
        let acts = decision.nodes_to_launch.get(&t.type_name).is_some_and(|n| *n > 0)
            || drain.iter().any(|d| d.type_name == t.type_name);
        if acts && want != have {
            let _ =
                write!(summary, "{}scale {} {have}→{want}", if summary.is_empty() { "" } else { "; " }, t.type_name);
        }
    }
    if summary.is_empty() {
        return None;
    }
    let demand: Vec<String> = state
        .pending_resource_requests
        .iter()
        .take(5)
        .map(|d| format!("{} ×{}", fmt_shape(&d.shape), d.count))
        .chain(
            state
                .pending_gang_requests
                .iter()
                .take(3)
                .map(|g| format!("placement group of {} bundles", g.bundles.len())),
        )
        .collect();
    if demand.is_empty() {
        let _ = write!(summary, ": {} idle worker(s) past idleTimeoutMinutes", drain.len());
    } else {
        let _ = write!(summary, ": pending {}", demand.join(", "));
    }
    if !decision.unfulfilled.is_empty() {
        let infeasible: Vec<String> =
            decision.unfulfilled.iter().take(3).map(|u| format!("{} ×{}", fmt_shape(&u.shape), u.count)).collect();
        let _ = write!(summary, "; unfulfilled {}", infeasible.join(", "));
    }
    Some(summary)
}
