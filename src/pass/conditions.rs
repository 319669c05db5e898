//! The RayCluster's conditions as a typed set, and the one place they are merged into the status
//! (as stackable's operator-rs does with `ClusterConditionType` / `compute_conditions`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// The conditions this operator writes, in the order they appear in the status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConditionType {
    /// The head and every wanted worker are ready and nothing is being replaced.
    Ready,
    /// The current head pod runs and is ready.
    HeadReady,
    /// The autoscaler can read the head's GCS.
    AutoscalerHealthy,
    /// The API server refuses the cluster's pod creates (quota, Pod Security, a webhook, 5xx);
    /// present only while it does, as a ReplicaSet's condition of the same name.
    ReplicaFailure,
}

impl ConditionType {
    pub const ALL: [ConditionType; 4] = [
        ConditionType::Ready,
        ConditionType::HeadReady,
        ConditionType::AutoscalerHealthy,
        ConditionType::ReplicaFailure,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::HeadReady => "HeadReady",
            ConditionType::AutoscalerHealthy => "AutoscalerHealthy",
            ConditionType::ReplicaFailure => "ReplicaFailure",
        }
    }

    /// Whether a pass that says nothing about this condition keeps its last value. The
    /// autoscaler's health is known only while the GCS is asked: a pass that cannot ask (the
    /// operator restarting, a link still connecting) must not rewrite it. The others are
    /// recomputed by every pass that can compute them, and dropped by one that cannot (an invalid
    /// spec says nothing about the head).
    fn sticky(self) -> bool {
        self == ConditionType::AutoscalerHealthy
    }
}

/// One condition as a pass computes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterCondition {
    pub type_: ConditionType,
    pub ok: bool,
    /// CamelCase reason, bounded.
    pub reason: &'static str,
    pub message: String,
}

impl ClusterCondition {
    pub fn new(type_: ConditionType, ok: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Self { type_, ok, reason, message: message.into() }
    }
}

/// The status's conditions after a pass: `new` in [`ConditionType`] order; a type not in `new`
/// keeps its old entry if it is sticky and is dropped otherwise. A condition whose status did not
/// change keeps its `lastTransitionTime`, so an unchanged cluster produces an identical status
/// (and no write).
pub fn merge(old: &[Condition], new: &[ClusterCondition], generation: Option<i64>, now: Timestamp) -> Vec<Condition> {
    let mut out = Vec::new();
    for t in ConditionType::ALL {
        let prev = old.iter().find(|c| c.type_ == t.as_str());
        match new.iter().rfind(|c| c.type_ == t) {
            Some(c) => {
                let status = if c.ok { "True" } else { "False" };
                let since = match prev {
                    Some(p) if p.status == status => p.last_transition_time.clone(),
                    _ => Time(now),
                };
                out.push(Condition {
                    type_: t.as_str().into(),
                    status: status.into(),
                    reason: c.reason.into(),
                    message: c.message.clone(),
                    observed_generation: generation,
                    last_transition_time: since,
                });
            }
            None if t.sticky() => out.extend(prev.cloned()),
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn keeps_transition_time_while_status_holds_and_resets_on_change() {
        let ready = |ok| ClusterCondition::new(ConditionType::Ready, ok, "R", "m");
        let first = merge(&[], &[ready(false)], Some(1), at(10));
        let same = merge(&first, &[ready(false)], Some(2), at(20));
        assert_eq!(same[0].last_transition_time, Time(at(10)));
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = merge(&same, &[ready(true)], Some(2), at(30));
        assert_eq!(flipped[0].last_transition_time, Time(at(30)));
    }

    #[test]
    fn sticky_autoscaler_condition_survives_a_pass_that_does_not_know_it() {
        let auto = ClusterCondition::new(ConditionType::AutoscalerHealthy, true, "GcsReachable", "ok");
        let head = ClusterCondition::new(ConditionType::HeadReady, true, "HeadPodReady", "ok");
        let ready = ClusterCondition::new(ConditionType::Ready, true, "ClusterReady", "ok");
        let all = merge(&[], &[auto, head, ready.clone()], None, at(1));
        let types: Vec<&str> = all.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "HeadReady", "AutoscalerHealthy"], "canonical order");
        let later = merge(&all, &[ready], None, at(2));
        let types: Vec<&str> = later.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "AutoscalerHealthy"], "HeadReady dropped, AutoscalerHealthy kept");
    }
}
