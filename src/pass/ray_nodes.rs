//! Pods that live while their Ray does not: a worker whose Ray node is DEAD in the GCS, a worker
//! that never registered, a head whose GCS stopped answering. Each counts as finished from then
//! on, so the plan deletes and replaces it like any finished pod; this module only says which.
//!
//! Workers are judged only from a fresh snapshot of the GCS: while the operator is blind (no
//! snapshot) nothing is deleted, only the head's timer runs.

use std::collections::BTreeMap;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::plan::DeleteReason;
use super::{LogLine, PassDecision, PassEvent, PassInput, autoscale::gcs_address};
use crate::autoscaler::scale::DrainState;
use crate::model::desired::{Desired, NodeKind};
use crate::model::observed::{self, ObservedPod, PodPhase};
use crate::ray::NodeStatus;

fn elapsed(now: Timestamp, since: Timestamp) -> f64 {
    now.duration_since(since).as_secs_f64()
}

fn warn(out: &mut PassDecision, reason: &'static str, note: String) {
    out.log.push(LogLine::Warn(note.clone()));
    out.events.push(PassEvent { warning: true, reason, note });
}

/// Pods to treat as finished, with why; updates the memory's timers (`unregistered_since`,
/// `gcs_down_since`).
pub(super) fn failures(
    input: &PassInput<'_>,
    desired: &Desired,
    out: &mut PassDecision,
) -> Vec<(String, DeleteReason)> {
    let Some(settings) = &input.settings.autoscaler else {
        out.memory.unregistered_since.clear();
        out.memory.gcs_down_since = None;
        out.memory.gcs_answered = None;
        return vec![];
    };
    let now = input.now;
    let mut failed = Vec::new();
    let cluster_ip = input.service.and_then(|s| s.cluster_ip.as_deref());
    let addr = gcs_address(input.cluster, desired, cluster_ip, settings.gcs_address_annotation);
    let ray = input.ray.filter(|r| r.addr == addr);
    let snapshot = ray.and_then(|r| r.snapshot);

    // The head: its pod runs, its GCS answered once, but not for the grace period since. A GCS
    // that never answered this head is not taken as Ray dying: the operator may be unable to reach
    // it at all (run outside the cluster without the gcs-address annotation), and recreating the
    // head every grace period would only destroy a working cluster.
    let head = observed::current_head(input.pods, &desired.head.hash).filter(|h| h.is_running());
    if let (Some(h), Some(_)) = (head, snapshot) {
        out.memory.gcs_answered = Some(h.name.clone());
    }
    // A new leader's memory is empty: the status it inherits says whether the GCS of this head
    // was reachable when the last leader wrote it.
    let answered = |name: &str| {
        out.memory.gcs_answered.as_deref() == Some(name)
            || input.cluster.status.as_ref().is_some_and(|s| {
                s.head_pod_name.as_deref() == Some(name)
                    && s.conditions.iter().any(|c| {
                        c.type_ == super::conditions::ConditionType::AutoscalerHealthy.as_str() && c.status == "True"
                    })
            })
    };
    match (head, snapshot) {
        (Some(h), None) if answered(&h.name) => {
            let since = *out.memory.gcs_down_since.get_or_insert(now);
            let down = elapsed(now, since);
            if down >= settings.head_gcs_grace.as_secs_f64() {
                let note = format!(
                    "head pod {} runs but its GCS at {addr} has not answered for {down:.0}s; recovering the head",
                    h.name
                );
                warn(out, "GcsUnreachable", note);
                failed.push((h.name.clone(), DeleteReason::GcsUnreachable));
                out.memory.gcs_down_since = None;
                out.memory.gcs_answered = None;
            }
        }
        _ => out.memory.gcs_down_since = None,
    }
    if head.is_none() {
        out.memory.gcs_answered = None;
    }

    let Some(snapshot) = snapshot.filter(|_| head.is_some()) else {
        // Blind (or the head is down, and its GCS with it): keep the timers of pods that still exist, decide nothing about workers.
        out.memory.unregistered_since.retain(|pod, _| input.pods.iter().any(|p| p.name == *pod && p.is_live()));
        return failed;
    };
    let drains = ray.map(|r| r.drains);
    let timeout = settings.registration_timeout.as_secs_f64();
    let mut unregistered = BTreeMap::new();
    for p in input.pods.iter().filter(|p| p.kind == NodeKind::Worker && p.is_live() && p.phase == PodPhase::Running) {
        // A drained node is dead by design; its pod goes by the drain.
        if drains.is_some_and(|d| d.get(&p.name).is_some_and(|s| !matches!(s, DrainState::Rejected(_)))) {
            continue;
        }
        let nodes: Vec<_> = snapshot.nodes.iter().filter(|n| n.instance_id == p.name).collect();
        if nodes.iter().any(|n| n.status != NodeStatus::Dead) {
            continue;
        }
        if !nodes.is_empty() {
            let note = format!("the Ray node of worker pod {} is dead; replacing the pod", p.name);
            warn(out, "RayNodeDead", note);
            failed.push((p.name.clone(), DeleteReason::RayNodeDead));
            continue;
        }
        let since = out.memory.unregistered_since.get(&p.name).copied().unwrap_or(now);
        let waited = elapsed(now, since);
        if waited >= timeout {
            let note = format!(
                "worker pod {} has run for {waited:.0}s without its Ray node registering in the GCS; replacing it",
                p.name
            );
            warn(out, "RayNodeNotRegistered", note);
            failed.push((p.name.clone(), DeleteReason::RayNodeNotRegistered));
        } else {
            unregistered.insert(p.name.clone(), since);
        }
    }
    out.memory.unregistered_since = unregistered;
    failed
}

/// How long until the earliest timer of this module runs out (to come back then).
pub(super) fn next_deadline(input: &PassInput<'_>, memory: &super::Memory) -> Option<std::time::Duration> {
    let settings = input.settings.autoscaler.as_ref()?;
    let left = |since: Timestamp, limit: std::time::Duration| {
        let gone = SignedDuration::try_from(limit).unwrap_or(SignedDuration::ZERO);
        let due = since.checked_add(gone).unwrap_or(since);
        std::time::Duration::from_secs_f64(due.duration_since(input.now).as_secs_f64().max(0.0))
    };
    let head = memory.gcs_down_since.map(|s| left(s, settings.head_gcs_grace));
    let workers = memory.unregistered_since.values().map(|s| left(*s, settings.registration_timeout)).min();
    head.into_iter().chain(workers).min()
}

/// The pods with those of `failed` marked finished (what the rest of the pass sees).
pub(super) fn as_finished(pods: &[ObservedPod], failed: &[(String, DeleteReason)]) -> Vec<ObservedPod> {
    pods.iter()
        .map(|p| {
            let mut p = p.clone();
            if failed.iter().any(|(n, _)| *n == p.name) {
                p.phase = PodPhase::Finished;
            }
            p
        })
        .collect()
}
