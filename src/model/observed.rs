//! What the operator observes of a cluster's pods and head Service, kept slim (the cache holds
//! one [`ObservedPod`] per pod of thousands of clusters), and the predicates every decision uses
//! to read it: each question ("is this a live worker of type T?", "is the head up?") is answered
//! here once.

use k8s_openapi::jiff::Timestamp;

use super::desired::NodeKind;

/// Pod phase as far as the reconciler cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodPhase {
    Pending,
    Running,
    /// Succeeded or Failed: the pod will never run Ray again.
    Finished,
    Unknown,
}

/// The slice of a Pod the reconciler looks at (the cache keeps only this, to stay small).
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedPod {
    pub name: String,
    pub uid: String,
    pub kind: NodeKind,
    pub type_name: String,
    pub hash: String,
    pub phase: PodPhase,
    pub ready: bool,
    pub terminating: bool,
    /// Pod IP, when assigned (the autoscaler maps Ray nodes by name, this is for humans).
    pub ip: Option<String>,
    /// Since when the scheduler has been unable to place the pod (PodScheduled=False, Unschedulable).
    pub unschedulable_since: Option<Timestamp>,
}

impl ObservedPod {
    /// Not being deleted and not finished: it is, or will be, a Ray node.
    pub fn is_live(&self) -> bool {
        !self.terminating && self.phase != PodPhase::Finished
    }

    /// A worker pod of `type_name` that is not being deleted (it may have finished).
    pub fn is_worker_of(&self, type_name: &str) -> bool {
        self.kind == NodeKind::Worker && self.type_name == type_name && !self.terminating
    }

    /// A worker of `type_name` that is, or will be, a Ray node.
    pub fn is_live_worker_of(&self, type_name: &str) -> bool {
        self.is_worker_of(type_name) && self.is_live()
    }

    /// The head pod built from the head template with launch hash `hash`, not being deleted.
    pub fn is_current_head(&self, hash: &str) -> bool {
        self.kind == NodeKind::Head && !self.terminating && self.hash == hash
    }

    /// Running (Ray may answer) and, with `ready`, passing its readiness probe.
    pub fn is_running(&self) -> bool {
        self.phase == PodPhase::Running
    }
}

/// The current head pod (see [`ObservedPod::is_current_head`]), if any.
pub fn current_head<'a>(pods: &'a [ObservedPod], head_hash: &str) -> Option<&'a ObservedPod> {
    pods.iter().find(|p| p.is_current_head(head_hash))
}

/// Live workers of type `type_name` that `keep` accepts, old and new pods of the type counted
/// once: the larger of the pods with launch hash `hash` and the others. A rolling replacement
/// swaps one for the other, so counting both would see surplus where there is none.
pub fn live_workers<'a>(
    pods: impl IntoIterator<Item = &'a ObservedPod>,
    type_name: &str,
    hash: &str,
    keep: impl Fn(&ObservedPod) -> bool,
) -> u32 {
    let (mut current, mut old) = (0, 0);
    for p in pods.into_iter().filter(|p| p.is_live_worker_of(type_name) && keep(p)) {
        if p.hash == hash {
            current += 1;
        } else {
            old += 1;
        }
    }
    current.max(old)
}

/// Whether type `type_name` is in a rolling replacement: one of `pods` is a live worker of it
/// built from another launch hash than `hash`. Scale-downs leave such a type to the replacement,
/// which removes the old pods itself; taking its current pods would only make it create more.
pub fn in_rolling_replacement<'a>(
    pods: impl IntoIterator<Item = &'a ObservedPod>,
    type_name: &str,
    hash: &str,
) -> bool {
    pods.into_iter().any(|p| p.is_live_worker_of(type_name) && p.hash != hash)
}

/// Whether the current head runs: its GCS can be asked.
pub fn head_is_running(pods: &[ObservedPod], head_hash: &str) -> bool {
    pods.iter().any(|p| p.is_current_head(head_hash) && p.is_running())
}

/// Whether the current head runs and is ready (the status's `HeadReady`).
pub fn head_is_ready(pods: &[ObservedPod], head_hash: &str) -> bool {
    current_head(pods, head_hash).is_some_and(|h| h.ready && h.is_running())
}

/// The head Service as observed: its `ray-launch-config` hash and its ClusterIP once assigned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObservedService {
    pub hash: String,
    pub cluster_ip: Option<String>,
}
