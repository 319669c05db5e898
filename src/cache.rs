//! The operator's view of the cluster: RayClusters, and slim copies of their pods and head Services,
//! indexed by the RayCluster they belong to.
//!
//! Filled by label-filtered watches (never all pods of the cluster) and by write-through after our
//! own writes, so a pod we just created counts before its watch event arrives and is never created
//! twice. Pods are kept as [`ObservedPod`] (a few strings), not whole objects, to stay small at
//! thousands of clusters.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::api::RayCluster;
use crate::model::desired::{LABEL_CLUSTER, LABEL_LAUNCH_HASH, LABEL_NODE_KIND, LABEL_POD_TYPE, NodeKind};
use crate::model::observed::{ObservedPod, ObservedService, PodPhase};

/// Namespace and name of a RayCluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterKey {
    pub namespace: String,
    pub name: String,
}

impl ClusterKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }

    pub fn of(cluster: &RayCluster) -> Self {
        Self::new(cluster.namespace().unwrap_or_default(), cluster.name_any())
    }
}

/// `<name>: <namespace>`: the prefix of every log line about a cluster, so
/// `kubectl logs ... | grep ^<name>:` finds them.
impl fmt::Display for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.namespace)
    }
}

#[derive(Clone, Debug)]
struct Stamped<T> {
    value: T,
    stamp: u64,
    resource_version: Option<u64>,
}

/// Parses a resourceVersion for ordering. They are opaque by contract but etcd revisions in
/// practice; we use the order only to refuse to replace a fresher write-through by an older event.
fn rv(s: Option<&String>) -> Option<u64> {
    s.and_then(|s| s.parse().ok())
}

fn fresher(new: Option<u64>, old: Option<u64>) -> bool {
    match (new, old) {
        (Some(n), Some(o)) => n >= o,
        _ => true,
    }
}

/// One cluster's pods, sorted by name.
///
/// A `Vec` rather than a `BTreeMap`: most clusters have a handful of pods, and a `BTreeMap` leaf
/// holds room for eleven entries whatever it holds (2.2 KiB per cluster here, the largest single
/// item in a heaptrack profile at 3,000 clusters). Small sets grow one slot at a time for the same
/// reason; larger ones grow as a `Vec` does, so a cluster of a thousand workers stays linear.
#[derive(Default)]
struct PodSet(Vec<Stamped<ObservedPod>>);

/// Below this many pods a set grows by exactly one slot.
const POD_SET_EXACT: usize = 8;

impl PodSet {
    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|p| p.value.name.as_str().cmp(name))
    }

    fn get(&self, name: &str) -> Option<&Stamped<ObservedPod>> {
        self.find(name).ok().map(|i| &self.0[i])
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Stamped<ObservedPod>> {
        self.find(name).ok().map(|i| &mut self.0[i])
    }

    fn insert(&mut self, pod: Stamped<ObservedPod>) {
        match self.find(&pod.value.name) {
            Ok(i) => self.0[i] = pod,
            Err(i) => {
                if self.0.len() < POD_SET_EXACT {
                    self.0.reserve_exact(1);
                }
                self.0.insert(i, pod);
            }
        }
    }

    fn remove(&mut self, name: &str) {
        if let Ok(i) = self.find(name) {
            self.0.remove(i);
            if self.0.len() < POD_SET_EXACT {
                self.0.shrink_to_fit();
            }
        }
    }

    fn retain(&mut self, keep: impl FnMut(&Stamped<ObservedPod>) -> bool) {
        self.0.retain(keep);
        if self.0.len() < POD_SET_EXACT {
            self.0.shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What the operator knows about the cluster.
#[derive(Default)]
pub struct Cache {
    clusters: DashMap<ClusterKey, Stamped<Arc<RayCluster>>>,
    pods: DashMap<ClusterKey, PodSet>,
    /// Head Services: our content hash label and the ClusterIP.
    services: DashMap<ClusterKey, Stamped<ObservedService>>,
    counter: AtomicU64,
}

/// The RayCluster a child belongs to: its controller owner reference, if that is a RayCluster and
/// the `ray-cluster-name` label agrees (a pod someone merely labelled is not ours).
fn owner_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<ClusterKey> {
    let label = meta.labels.as_ref()?.get(LABEL_CLUSTER)?;
    let owner = meta.owner_references.as_ref()?.iter().find(|o| {
        o.controller == Some(true) && o.kind == "RayCluster" && o.api_version.starts_with("cluster.ray.io/")
    })?;
    (owner.name == *label).then(|| ClusterKey::new(meta.namespace.clone().unwrap_or_default(), label.clone()))
}

/// The slice of a pod the reconciler needs; `None` for pods that are not Ray pods of a RayCluster.
pub fn observe_pod(pod: &Pod) -> Option<(ClusterKey, ObservedPod)> {
    let key = owner_key(&pod.metadata)?;
    let labels = pod.metadata.labels.as_ref()?;
    let kind = match labels.get(LABEL_NODE_KIND).map(String::as_str) {
        Some("head") => NodeKind::Head,
        Some("worker") => NodeKind::Worker,
        _ => return None,
    };
    let status = pod.status.as_ref();
    let phase = match status.and_then(|s| s.phase.as_deref()) {
        Some("Pending") | None => PodPhase::Pending,
        Some("Running") => PodPhase::Running,
        Some("Succeeded") | Some("Failed") => PodPhase::Finished,
        Some(_) => PodPhase::Unknown,
    };
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    Some((
        key,
        ObservedPod {
            name: pod.name_any(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            kind,
            type_name: labels.get(LABEL_POD_TYPE).cloned().unwrap_or_default(),
            hash: labels.get(LABEL_LAUNCH_HASH).cloned().unwrap_or_default(),
            phase,
            ready,
            terminating: pod.metadata.deletion_timestamp.is_some(),
            ip: status.and_then(|s| s.pod_ip.clone()),
            unschedulable_since: status.and_then(|s| s.conditions.as_ref()).and_then(|cs| {
                cs.iter()
                    .find(|c| {
                        c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
                    })
                    .map(|c| c.last_transition_time.as_ref().map_or_else(Timestamp::now, |t| t.0))
            }),
        },
    ))
}

impl Cache {
    pub fn new() -> Self {
        Self::default()
    }

    fn stamp(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    /// A mark taken when a watch (re)lists: entries of its scope not refreshed since are stale.
    pub fn mark(&self) -> u64 {
        self.counter.load(Ordering::Relaxed)
    }

    // --- RayClusters ---

    pub fn cluster(&self, key: &ClusterKey) -> Option<Arc<RayCluster>> {
        self.clusters.get(key).map(|e| e.value.clone())
    }

    pub fn cluster_keys(&self) -> Vec<ClusterKey> {
        self.clusters.iter().map(|e| e.key().clone()).collect()
    }

    pub fn cluster_count(&self) -> usize {
        self.clusters.len()
    }

    /// Stores a RayCluster unless we already hold a fresher version of it.
    pub fn put_cluster(&self, mut cluster: RayCluster) -> ClusterKey {
        // Not needed by the reconciler and the bulk of a stored object: managed fields and
        // kubectl's copy of the whole manifest. Dropping them keeps thousands of clusters small.
        cluster.metadata.managed_fields = None;
        if let Some(a) = cluster.metadata.annotations.as_mut() {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
        let key = ClusterKey::of(&cluster);
        let resource_version = rv(cluster.metadata.resource_version.as_ref());
        let stamp = self.stamp();
        let mut entry = self.clusters.entry(key.clone()).or_insert_with(|| Stamped {
            value: Arc::new(cluster.clone()),
            stamp,
            resource_version,
        });
        if fresher(resource_version, entry.resource_version) {
            *entry = Stamped { value: Arc::new(cluster), stamp, resource_version };
        } else {
            entry.stamp = stamp;
        }
        key
    }

    pub fn remove_cluster(&self, key: &ClusterKey) {
        self.clusters.remove(key);
    }

    /// Drops clusters in `namespace` (all namespaces when `None`) not refreshed since `mark`;
    /// returns them so their shards forget them.
    pub fn sweep_clusters(&self, namespace: Option<&str>, mark: u64) -> Vec<ClusterKey> {
        let stale: Vec<ClusterKey> = self
            .clusters
            .iter()
            .filter(|e| namespace.is_none_or(|ns| e.key().namespace == ns) && e.stamp < mark)
            .map(|e| e.key().clone())
            .collect();
        for k in &stale {
            self.clusters.remove_if(k, |_, v| v.stamp < mark);
        }
        stale
    }

    // --- Pods ---

    pub fn pods(&self, key: &ClusterKey) -> Vec<ObservedPod> {
        self.pods.get(key).map(|m| m.0.iter().map(|s| s.value.clone()).collect()).unwrap_or_default()
    }

    /// Stores a pod (from a watch event or from our own create) unless a fresher copy is held.
    pub fn put_pod(&self, pod: &Pod) -> Option<ClusterKey> {
        let (key, observed) = observe_pod(pod)?;
        let resource_version = rv(pod.metadata.resource_version.as_ref());
        let stamp = self.stamp();
        let mut pods = self.pods.entry(key.clone()).or_default();
        let fresh = pods.get(&observed.name).is_none_or(|old| fresher(resource_version, old.resource_version));
        if fresh {
            pods.insert(Stamped { value: observed, stamp, resource_version });
        } else if let Some(old) = pods.get_mut(&observed.name) {
            old.stamp = stamp;
        }
        Some(key)
    }

    pub fn remove_pod(&self, pod: &Pod) -> Option<ClusterKey> {
        let (key, observed) = observe_pod(pod)?;
        if let Some(mut pods) = self.pods.get_mut(&key) {
            pods.remove(&observed.name);
        }
        self.pods.remove_if(&key, |_, m| m.is_empty());
        Some(key)
    }

    /// Marks a pod we just deleted as terminating, so the next pass does not count it.
    pub fn mark_pod_terminating(&self, key: &ClusterKey, name: &str) {
        if let Some(mut pods) = self.pods.get_mut(key)
            && let Some(p) = pods.get_mut(name)
        {
            p.value.terminating = true;
        }
    }

    /// Drops pods not refreshed since `mark`; returns the clusters that lost pods.
    pub fn sweep_pods(&self, namespace: Option<&str>, mark: u64) -> Vec<ClusterKey> {
        let mut touched = Vec::new();
        for mut e in self.pods.iter_mut() {
            if namespace.is_some_and(|ns| e.key().namespace != ns) {
                continue;
            }
            let before = e.len();
            e.retain(|p| p.stamp >= mark);
            if e.len() != before {
                touched.push(e.key().clone());
            }
        }
        self.pods.retain(|_, m| !m.is_empty());
        touched
    }

    // --- head Services (we only need their content hash and ClusterIP) ---

    pub fn service(&self, key: &ClusterKey) -> Option<ObservedService> {
        self.services.get(key).map(|s| s.value.clone())
    }

    pub fn put_service(&self, svc: &Service) -> Option<ClusterKey> {
        let key = owner_key(&svc.metadata)?;
        let hash = ObservedService {
            hash: svc.labels().get(LABEL_LAUNCH_HASH).cloned().unwrap_or_default(),
            cluster_ip: svc
                .spec
                .as_ref()
                .and_then(|s| s.cluster_ip.clone())
                .filter(|ip| !ip.is_empty() && ip != "None"),
        };
        let resource_version = rv(svc.metadata.resource_version.as_ref());
        let stamp = self.stamp();
        let mut entry = self.services.entry(key.clone()).or_insert_with(|| Stamped {
            value: hash.clone(),
            stamp,
            resource_version,
        });
        if fresher(resource_version, entry.resource_version) {
            *entry = Stamped { value: hash, stamp, resource_version };
        } else {
            entry.stamp = stamp;
        }
        Some(key)
    }

    pub fn remove_service(&self, svc: &Service) -> Option<ClusterKey> {
        let key = owner_key(&svc.metadata)?;
        self.services.remove(&key);
        Some(key)
    }

    pub fn sweep_services(&self, namespace: Option<&str>, mark: u64) -> Vec<ClusterKey> {
        let stale: Vec<ClusterKey> = self
            .services
            .iter()
            .filter(|e| namespace.is_none_or(|ns| e.key().namespace == ns) && e.stamp < mark)
            .map(|e| e.key().clone())
            .collect();
        for k in &stale {
            self.services.remove_if(k, |_, v| v.stamp < mark);
        }
        stale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, stamp: u64) -> Stamped<ObservedPod> {
        let value = ObservedPod {
            name: name.into(),
            uid: String::new(),
            kind: NodeKind::Worker,
            type_name: "w".into(),
            hash: String::new(),
            phase: PodPhase::Running,
            ready: true,
            terminating: false,
            ip: None,
            unschedulable_since: None,
        };
        Stamped { value, stamp, resource_version: None }
    }

    fn names(set: &PodSet) -> Vec<&str> {
        set.0.iter().map(|p| p.value.name.as_str()).collect()
    }

    #[test]
    fn a_pod_set_stays_sorted_replaces_by_name_and_holds_no_spare_slots_while_small() {
        let mut set = PodSet::default();
        for (n, s) in [("c", 1), ("a", 2), ("b", 3), ("a", 4)] {
            set.insert(pod(n, s));
        }
        assert_eq!(names(&set), ["a", "b", "c"]);
        assert_eq!(set.get("a").map(|p| p.stamp), Some(4), "a second insert of a name replaces it");
        assert_eq!(set.0.capacity(), 3, "small sets grow one slot at a time");
        set.remove("b");
        assert_eq!(names(&set), ["a", "c"]);
        assert_eq!(set.0.capacity(), 2);
        set.retain(|p| p.stamp >= 2);
        assert_eq!(names(&set), ["a"]);
        assert!(set.get("c").is_none() && set.get_mut("a").is_some());

        for i in 0..1000 {
            set.insert(pod(&format!("w-{i:04}"), 9));
        }
        assert_eq!(set.len(), 1001);
        assert!(set.0.windows(2).all(|w| w[0].value.name < w[1].value.name));
    }
}
