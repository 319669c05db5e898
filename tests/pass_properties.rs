//! Properties of one reconcile pass over generated worlds (proptest, already the dev-dependency
//! of the decision port's properties): bounds are never exceeded, the autoscaler never drains or
//! deletes the head, and a pass on the world its predecessor left behind is a no-op.

mod support;

use std::collections::BTreeMap;

use proptest::prelude::*;
use ray_operator::api::RayCluster;
use ray_operator::autoscaler::scale::DrainState;
use ray_operator::model::desired::NodeKind;
use ray_operator::model::observed::ObservedPod;
use ray_operator::pass::PassDecision;
use ray_operator::pass::plan::DeleteReason;
use ray_operator::ray::{NodeStatus, ResourceDemand};
use serde_json::json;
use support::world::{self, World};

#[derive(Clone, Debug)]
struct Worker {
    type_index: usize,
    phase: usize,
    ready: bool,
    old: bool,
    terminating: bool,
    unsched: Option<i64>,
    /// 0 none, 1 running, 2 idle, 3 draining, 4 dead
    node: usize,
    idle_secs: i64,
    /// 0 none, 1 requested, 2 accepted, 3 rejected
    drain: usize,
}

#[derive(Clone, Debug)]
struct Spec {
    autoscaler: bool,
    global_max: u32,
    bounds: [(u32, u32); 2],
    /// 0 none, 1 pending, 2 running, 3 ready, 4 finished, 5 outdated and ready
    head: usize,
    head_node_idle: bool,
    workers: Vec<Worker>,
    demand: Vec<(u32, u64)>,
    had_head: bool,
    service: bool,
}

fn worker() -> impl Strategy<Value = Worker> {
    (0usize..3, 0usize..4, any::<bool>(), prop::bool::weighted(0.2), prop::bool::weighted(0.1)).prop_flat_map(
        |(type_index, phase, ready, old, terminating)| {
            (prop::option::weighted(0.15, 0i64..120), 0usize..5, 0i64..200, 0usize..4).prop_map(
                move |(unsched, node, idle_secs, drain)| {
                    // A pod the scheduler could not place has never started a container, so
                    // Ray has never seen it: no Ray node, and so nothing to drain.
                    let node = if unsched.is_some() { 0 } else { node };
                    Worker {
                        type_index,
                        phase,
                        ready,
                        old,
                        terminating,
                        unsched,
                        node,
                        idle_secs,
                        drain: if drain == 0 || node == 0 { 0 } else { drain },
                    }
                },
            )
        },
    )
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        any::<bool>(),
        0u32..8,
        [(0u32..4, 0u32..6), (0u32..4, 0u32..6)],
        0usize..6,
        any::<bool>(),
        prop::collection::vec(worker(), 0..9),
        prop::collection::vec((1u32..6, 0u64..12), 0..3),
        any::<bool>(),
        prop::bool::weighted(0.8),
    )
        .prop_map(|(autoscaler, global_max, bounds, head, head_node_idle, workers, demand, had_head, service)| {
            Spec {
                autoscaler,
                global_max,
                bounds: bounds.map(|(min, max)| (min.min(max), max)),
                head,
                head_node_idle,
                workers,
                demand,
                had_head,
                service,
            }
        })
}

const TYPES: [&str; 3] = ["small", "large", "gone"];

fn build(s: &Spec) -> World {
    let mut cluster = world::base_cluster();
    cluster["spec"]["maxWorkers"] = json!(s.global_max);
    for (i, (min, max)) in s.bounds.iter().enumerate() {
        cluster["spec"]["podTypes"][i + 1]["minWorkers"] = json!(min);
        cluster["spec"]["podTypes"][i + 1]["maxWorkers"] = json!(max);
    }
    if s.had_head {
        cluster["status"] = json!({"phase": "Running", "headPodName": "h", "observedGeneration": 1});
    }
    let cluster: RayCluster = serde_json::from_value(cluster).expect("cluster");
    let mut w = World::new(cluster, s.autoscaler);
    if s.service {
        w.service_applied();
    }
    let head = match s.head {
        1 => Some("h head Pending"),
        2 => Some("h head Running"),
        3 => Some("h head Running ready"),
        4 => Some("h head Finished"),
        5 => Some("h head Running ready old"),
        _ => None,
    };
    w.pods.extend(head.map(|line| w.pod(line)));
    for (i, x) in s.workers.iter().enumerate() {
        let phase = ["Pending", "Running", "Finished", "Unknown"][x.phase];
        let mut line = format!("w{i} {} {phase}", TYPES[x.type_index]);
        for (on, flag) in [(x.ready, "ready"), (x.old, "old"), (x.terminating, "terminating")] {
            if on {
                line.push(' ');
                line.push_str(flag);
            }
        }
        if let Some(secs) = x.unsched {
            line.push_str(&format!(" unsched={secs}"));
        }
        let pod = w.pod(&line);
        w.pods.push(pod);
    }
    let mut nodes = Vec::new();
    if s.head >= 2 && s.head != 4 {
        nodes.push(w.node(if s.head_node_idle { "h idle=9000" } else { "h running" }));
    }
    for (i, x) in s.workers.iter().enumerate() {
        let state = match x.node {
            1 => "running".to_string(),
            2 => format!("idle={}", x.idle_secs),
            3 => "draining".to_string(),
            4 => "dead".to_string(),
            _ => continue,
        };
        nodes.push(w.node(&format!("w{i} {state}")));
    }
    let demand = s
        .demand
        .iter()
        .map(|(cpu, count)| ResourceDemand {
            shape: BTreeMap::from([("CPU".to_string(), f64::from(*cpu))]),
            count: *count,
            label_selectors: vec![],
        })
        .collect();
    // A link exists only once the Service (and so the GCS address) is known.
    if s.autoscaler && s.service && w.desired.is_ok() {
        w.ray(nodes, demand);
        if let Some(link) = w.link.as_mut() {
            for (i, x) in s.workers.iter().enumerate() {
                let st = match x.drain {
                    1 => DrainState::Requested,
                    2 => DrainState::Accepted,
                    3 => DrainState::Rejected("busy".into()),
                    _ => continue,
                };
                link.drains.insert(format!("w{i}"), st);
            }
        }
    }
    w
}

/// Current-hash workers of each type that are, or will be, Ray nodes, and not being drained.
fn counts(w: &World) -> BTreeMap<String, u32> {
    let draining = |p: &ObservedPod| w.link.as_ref().is_some_and(|l| l.drains.contains_key(&p.name));
    let mut out = BTreeMap::new();
    for t in &w.desired().workers {
        let n = w.pods.iter().filter(|p| p.is_live_worker_of(&t.type_name) && p.hash == t.hash && !draining(p)).count();
        out.insert(t.type_name.clone(), n as u32);
    }
    out
}

/// No plan exceeds the bounds: each type's target is within its maxWorkers, all targets within
/// the global maxWorkers, and creates never take a type beyond its target nor, counting what
/// is left after the deletes, beyond its maxWorkers or all types beyond the global maxWorkers
/// (unless that many existed already).
fn check_bounds(before: &World, d: &PassDecision) -> Result<(), TestCaseError> {
    let desired = before.desired();
    let mut kept = before.clone();
    kept.pods.retain(|p| !d.writes.deletes.iter().any(|x| x.name == p.name));
    let have = counts(&kept);
    let global = before.cluster.spec.max_workers();
    let targets: u32 = d.memory.targets.values().sum();
    if before.settings.autoscaler.is_some() {
        prop_assert!(targets <= global, "targets {:?} above global max {global}", d.memory.targets);
    }
    let mut created = BTreeMap::<String, u32>::new();
    for c in &d.writes.creates {
        if let Some(i) = c.worker {
            *created.entry(desired.workers[i].type_name.clone()).or_default() += c.count as u32;
        }
    }
    let (mut total_before, mut total_after) = (0, 0);
    for t in &desired.workers {
        let was = have[&t.type_name];
        let add = created.get(&t.type_name).copied().unwrap_or(0);
        let now = was + add;
        prop_assert!(now <= t.max_workers.max(was), "{} {was} -> {now} > max {}", t.type_name, t.max_workers);
        if add > 0 && before.settings.autoscaler.is_some() {
            let target = d.memory.targets.get(&t.type_name).copied().unwrap_or(0);
            prop_assert!(now <= target, "{} {was} -> {now} above its target {target}", t.type_name);
        }
        total_before += was;
        total_after += now;
    }
    // Pods of a type above its target (a lowered maxWorkers) stay until idle: only what the plan
    // adds must fit.
    let created_total: u32 = created.values().sum();
    if created_total > 0 {
        let wanted: u32 = desired
            .workers
            .iter()
            .map(|t| have[&t.type_name].min(d.memory.targets.get(&t.type_name).copied().unwrap_or(t.min_workers)))
            .sum();
        prop_assert!(
            wanted + created_total <= global.max(total_before),
            "{total_before} -> {total_after} > global max {global}"
        );
    }
    for (t, target) in &d.memory.targets {
        let max = desired.workers.iter().find(|w| &w.type_name == t).map_or(0, |w| w.max_workers.max(w.min_workers));
        prop_assert!(*target <= max, "target {t} {target} > {max}");
    }
    Ok(())
}

/// The autoscaler never drains the head nor deletes it; only the plan replaces a head (finished,
/// outdated, or a duplicate).
fn check_head_safe(w: &World, d: &PassDecision) -> Result<(), TestCaseError> {
    let is_head = |name: &str| w.pods.iter().any(|p| p.name == name && p.kind == NodeKind::Head);
    for drain in &d.ray.drains {
        prop_assert!(!is_head(&drain.pod), "drained the head {}", drain.pod);
    }
    for del in &d.writes.deletes {
        if is_head(&del.name) {
            let by_plan = matches!(del.reason, DeleteReason::Finished | DeleteReason::Outdated | DeleteReason::Excess);
            // Recovering a head whose GCS went silent needs the GCS to be silent.
            let blind = w.link.as_ref().is_none_or(|l| l.snapshot.is_none());
            let recovery = del.reason == DeleteReason::GcsUnreachable && blind;
            prop_assert!(by_plan || recovery, "deleted the head {} ({:?})", del.name, del.reason);
        }
    }
    Ok(())
}

/// Only idle Ray nodes are drained (Ray's idle scale-down and the removal of surplus pods alike):
/// a busy worker is never taken away from its tasks.
fn check_drains_idle(w: &World, d: &PassDecision) -> Result<(), TestCaseError> {
    let snapshot = w.link.as_ref().and_then(|l| l.snapshot.as_ref());
    for drain in &d.ray.drains {
        let node = snapshot.and_then(|s| s.nodes.iter().find(|n| n.node_id == drain.node_id));
        prop_assert!(node.is_some_and(|n| n.status == NodeStatus::Idle), "drained a non-idle node {drain:?}");
    }
    Ok(())
}

/// The parts of a decision that act, for failure messages.
fn acts(d: &PassDecision) -> String {
    let events: Vec<&str> = d.events.iter().map(|e| e.reason).collect();
    format!(
        "writes {:?}, drains {:?}, events {events:?}, status {:?}, targets {:?}",
        d.writes,
        d.ray.drains.iter().map(|x| &x.pod).collect::<Vec<_>>(),
        d.status.as_ref().map(|s| (s.phase, s.workers.clone())),
        d.memory.targets
    )
}

fn is_noop(d: &PassDecision) -> bool {
    d.writes.is_empty() && d.ray.drains.is_empty() && d.status.is_none() && d.events.is_empty()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn bounds_hold_and_the_head_is_safe_over_three_passes(s in spec()) {
        let mut w = build(&s);
        prop_assume!(w.desired.is_ok());
        for _ in 0..3 {
            let d = w.decide();
            check_bounds(&w, &d)?;
            check_head_safe(&w, &d)?;
            check_drains_idle(&w, &d)?;
            w.apply(&d);
        }
    }

    /// A pass that only creates (no deletes) finishes its job: the next pass, on the world it
    /// leaves behind, writes nothing, drains nothing, publishes nothing. (Idle workers are kept
    /// below their timeout here: the pass does not drain a type it launches, so the one after
    /// it may rightly drain one that was idle all along.)
    #[test]
    fn a_pass_after_a_pass_that_only_created_is_a_noop(s in spec()) {
        let mut w = build(&s);
        w.cluster.spec.idle_timeout_minutes = Some(1000);
        prop_assume!(w.desired.is_ok());
        // The first pass that deletes nothing (deletes take passes of their own: an outdated
        // head goes before its successor comes).
        for _ in 0..4 {
            let first = w.decide();
            w.apply(&first);
            if first.writes.deletes.is_empty() {
                let second = w.decide();
                prop_assert!(is_noop(&second), "first: {}\nsecond: {}\npods: {:?}", acts(&first), acts(&second), w.pods);
                return Ok(());
            }
        }
        prop_assert!(false, "every one of four passes deleted something");
    }

    /// While the GCS cannot be asked (no fresh snapshot), no worker is deleted for anything Ray
    /// would have to confirm (dead, never registered, surplus), however long its timer ran, and
    /// nothing is drained.
    #[test]
    fn a_blind_pass_deletes_no_worker_for_ray_reasons(s in spec()) {
        // With the autoscaler and a Service, so a link exists (a blind one, below).
        let mut w = build(&Spec { autoscaler: true, service: true, ..s });
        prop_assume!(w.desired.is_ok() && w.link.is_some());
        if let Some(link) = w.link.as_mut() {
            link.snapshot = None;
        }
        let long_ago = world::ago(100_000);
        w.memory.unregistered_since = w.pods.iter().map(|p| (p.name.clone(), long_ago)).collect();
        let d = w.decide();
        prop_assert!(d.ray.drains.is_empty(), "drained while blind: {}", acts(&d));
        for del in &d.writes.deletes {
            let worker = w.pods.iter().any(|p| p.name == del.name && p.kind == NodeKind::Worker);
            let ray_reason = matches!(
                del.reason,
                DeleteReason::RayNodeDead | DeleteReason::RayNodeNotRegistered | DeleteReason::Excess
            );
            prop_assert!(!(worker && ray_reason), "deleted worker {} ({:?}) while blind", del.name, del.reason);
        }
    }

    /// Whatever the start, passes reach a world where a pass is a no-op within four passes, and
    /// it stays one.
    #[test]
    fn passes_settle_and_stay_settled(s in spec()) {
        let mut w = build(&s);
        prop_assume!(w.desired.is_ok());
        let mut settled = None;
        for i in 0..6 {
            let d = w.decide();
            if is_noop(&d) {
                settled.get_or_insert(i);
            } else {
                prop_assert!(settled.is_none(), "pass {i} acts after a no-op pass: {}\npods: {:?}", acts(&d), w.pods);
            }
            w.apply(&d);
        }
        prop_assert!(settled.is_some_and(|i| i <= 4), "not settled within 4 passes: {settled:?}");
    }
}
