//! Watches that fill the [`Cache`]: RayClusters, and pods and Services labelled `ray-cluster-name`,
//! in each namespace of the operator's scope (or cluster-wide). Every change names the RayCluster
//! it concerns on the `notify` channel.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{error, info, warn};

use crate::api::RayCluster;
use crate::cache::{Cache, ClusterKey};
use crate::model::desired::LABEL_CLUSTER;

/// Which namespaces the operator serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace (needs a ClusterRole).
    ClusterWide,
    /// Only these (a Role in each suffices).
    Namespaces(Vec<String>),
}

impl Scope {
    fn parts(&self) -> Vec<Option<String>> {
        match self {
            Scope::ClusterWide => vec![None],
            Scope::Namespaces(ns) => ns.iter().cloned().map(Some).collect(),
        }
    }
}

/// A message to the dispatcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Something about this cluster (or its children) changed.
    Cluster(ClusterKey),
    /// The cluster is gone: forget it.
    Deleted(ClusterKey),
}

/// Whether every watch has listed once (readiness), and whether any is failing for lack of permission.
#[derive(Debug)]
pub struct WatchHealth {
    synced: Vec<AtomicBool>,
    forbidden: AtomicBool,
}

impl WatchHealth {
    pub fn all_synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::Relaxed)) && !self.forbidden.load(Ordering::Relaxed)
    }
    pub fn forbidden(&self) -> bool {
        self.forbidden.load(Ordering::Relaxed)
    }
}

fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Starts all watches; returns their health.
pub fn spawn(client: Client, cache: Arc<Cache>, scope: &Scope, notify: UnboundedSender<Change>) -> Arc<WatchHealth> {
    let parts = scope.parts();
    let health = Arc::new(WatchHealth {
        synced: (0..parts.len() * 3).map(|_| AtomicBool::new(false)).collect(),
        forbidden: AtomicBool::new(false),
    });
    let children = watcher::Config::default().labels(LABEL_CLUSTER);
    for (i, ns) in parts.into_iter().enumerate() {
        let c = cache.clone();
        tokio::spawn(run(
            "rayclusters",
            api::<RayCluster>(&client, &ns),
            watcher::Config::default(),
            ns.clone(),
            health.clone(),
            i * 3,
            notify.clone(),
            move |ev| match ev {
                Ev::Put(o) => vec![Change::Cluster(c.put_cluster(o))],
                Ev::Gone(o) => {
                    let k = ClusterKey::of(&o);
                    c.remove_cluster(&k);
                    vec![Change::Deleted(k)]
                }
                Ev::Sweep(ns, mark) => c.sweep_clusters(ns.as_deref(), mark).into_iter().map(Change::Deleted).collect(),
            },
            cache.clone(),
        ));
        let c = cache.clone();
        tokio::spawn(run(
            "pods",
            api::<Pod>(&client, &ns),
            children.clone(),
            ns.clone(),
            health.clone(),
            i * 3 + 1,
            notify.clone(),
            move |ev| match ev {
                Ev::Put(o) => c.put_pod(&o).map(Change::Cluster).into_iter().collect(),
                Ev::Gone(o) => c.remove_pod(&o).map(Change::Cluster).into_iter().collect(),
                Ev::Sweep(ns, mark) => c.sweep_pods(ns.as_deref(), mark).into_iter().map(Change::Cluster).collect(),
            },
            cache.clone(),
        ));
        let c = cache.clone();
        tokio::spawn(run(
            "services",
            api::<Service>(&client, &ns),
            children.clone(),
            ns.clone(),
            health.clone(),
            i * 3 + 2,
            notify.clone(),
            move |ev| match ev {
                Ev::Put(o) => c.put_service(&o).map(Change::Cluster).into_iter().collect(),
                Ev::Gone(o) => c.remove_service(&o).map(Change::Cluster).into_iter().collect(),
                Ev::Sweep(ns, mark) => c.sweep_services(ns.as_deref(), mark).into_iter().map(Change::Cluster).collect(),
            },
            cache.clone(),
        ));
    }
    health
}

enum Ev<K> {
    Put(K),
    Gone(K),
    /// A relist finished: drop what it did not see.
    Sweep(Option<String>, u64),
}

#[allow(clippy::too_many_arguments)]
async fn run<K>(
    what: &'static str,
    api: Api<K>,
    config: watcher::Config,
    ns: Option<String>,
    health: Arc<WatchHealth>,
    slot: usize,
    notify: UnboundedSender<Change>,
    mut apply: impl FnMut(Ev<K>) -> Vec<Change>,
    cache: Arc<Cache>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let scope = ns.clone().unwrap_or_else(|| "all namespaces".into());
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut mark = 0;
    let mut last_error_log: Option<Instant> = None;
    while let Some(item) = stream.next().await {
        let changes = match item {
            Ok(Event::Init) => {
                mark = cache.mark();
                vec![]
            }
            Ok(Event::InitApply(o)) | Ok(Event::Apply(o)) => apply(Ev::Put(o)),
            Ok(Event::Delete(o)) => apply(Ev::Gone(o)),
            Ok(Event::InitDone) => {
                if !health.synced[slot].swap(true, Ordering::Relaxed) {
                    info!("watch of {what} in {scope} synced");
                }
                if health.forbidden.swap(false, Ordering::Relaxed) {
                    info!("watch of {what} in {scope} is permitted again");
                }
                apply(Ev::Sweep(ns.clone(), mark))
            }
            Err(e) => {
                let forbidden = matches!(&e, watcher::Error::InitialListFailed(kube::Error::Api(s))
                    | watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 403);
                let quiet = last_error_log.is_some_and(|t| t.elapsed() < Duration::from_secs(30));
                if forbidden {
                    health.forbidden.store(true, Ordering::Relaxed);
                    if !quiet {
                        error!(
                            "missing permission: cannot list/watch {what} in {scope} ({e}); grant list and watch on {what} to the operator's ServiceAccount or narrow its scope"
                        );
                        last_error_log = Some(Instant::now());
                    }
                } else if !quiet {
                    warn!("watch of {what} in {scope} failed, retrying: {e}");
                    last_error_log = Some(Instant::now());
                }
                vec![]
            }
        };
        for c in changes {
            if notify.send(c).is_err() {
                return;
            }
        }
    }
}
