//! Watches that fill the [`Cache`]: RayClusters, and pods and Services labelled `ray-cluster-name`,
//! in each namespace of the operator's scope (or cluster-wide). Every change names the RayCluster
//! it concerns on the `notify` channel.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch as tokio_watch;
use tracing::{error, info, warn};

use crate::api::RayCluster;
use crate::cache::{Cache, ClusterKey};
use crate::model::desired::LABEL_CLUSTER;

/// Objects per page of a watch's (re)list. kube-runtime holds a whole page, decoded, until it has
/// handed out its last object, and the three watches list at once when a replica starts: at its
/// default of 500 that was the largest part of a standby's peak (about 15 MiB over its settled
/// heap at 3,000 clusters in a heaptrack profile). Smaller pages mean more round trips for the
/// same objects: 300 instead of 60 for 30,000 pods.
const LIST_PAGE: u32 = 100;

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

/// The watches' state: whether each has listed once (readiness), whether any is failing for lack
/// of permission, and which generation of a forced relist each has completed (a new leader's
/// catch-up, see [`WatchHealth::resync`]).
#[derive(Debug)]
pub struct WatchHealth {
    synced: Vec<AtomicBool>,
    forbidden: Vec<AtomicBool>,
    /// Per watch: 1 + the resync generation of the last list it completed (0: none yet).
    listed: Vec<AtomicU64>,
    resync: tokio_watch::Sender<u64>,
}

impl WatchHealth {
    fn new(watches: usize) -> Self {
        Self {
            synced: (0..watches).map(|_| AtomicBool::new(false)).collect(),
            forbidden: (0..watches).map(|_| AtomicBool::new(false)).collect(),
            listed: (0..watches).map(|_| AtomicU64::new(0)).collect(),
            resync: tokio_watch::channel(0).0,
        }
    }

    pub fn all_synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::SeqCst)) && !self.forbidden()
    }

    pub fn forbidden(&self) -> bool {
        self.forbidden.iter().any(|f| f.load(Ordering::SeqCst))
    }

    /// Makes every watch drop its stream and list afresh; returns the generation to wait for
    /// with [`WatchHealth::caught_up`].
    ///
    /// Why a relist and not "the watch looks healthy": a replica that was frozen (SIGSTOP),
    /// partitioned, or whose API server restarted may hold a stream that is minutes behind and
    /// still reads buffered events from before; nothing in that stream says how old it is. A list
    /// made after the Lease was won is served at the API server's current revision (the watcher's
    /// default `MostRecent` semantic: a consistent read, never `resourceVersion=0` from a cache),
    /// so it contains every write the previous leader made before it stopped: that leader's fence
    /// closed before the Lease could expire, and we won the Lease only after that. Dropping the old
    /// stream also drops its buffered stale events, so they cannot overwrite the fresh view.
    pub fn resync(&self) -> u64 {
        let mut generation = 0;
        self.resync.send_modify(|g| {
            *g += 1;
            generation = *g;
        });
        generation
    }

    /// Whether every watch has completed a list started at `generation` or later.
    pub fn caught_up(&self, generation: u64) -> bool {
        self.listed.iter().all(|l| l.load(Ordering::SeqCst) > generation) && !self.forbidden()
    }
}

/// Retry delays of a failing watch: 100 ms doubling to at most 1 s, with jitter, reset by any
/// event. kube-runtime's default (800 ms doubling to 30 s) left an operator blind for 13 s after
/// a kube-apiserver restart of a few seconds; one list and watch per second per failing watch is
/// cheap for an API server that is up, and the jitter keeps many replicas' retries apart.
struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Duration::from_millis(100) }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(1));
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let jitter = u64::from(nanos) % (base.as_millis() as u64 / 4 + 1);
        Some(base + Duration::from_millis(jitter))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Duration::from_millis(100);
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
    let health = Arc::new(WatchHealth::new(parts.len() * 3));
    let children = watcher::Config::default().labels(LABEL_CLUSTER).page_size(LIST_PAGE);
    for (i, ns) in parts.into_iter().enumerate() {
        let c = cache.clone();
        tokio::spawn(run(
            "rayclusters",
            api::<RayCluster>(&client, &ns),
            watcher::Config::default().page_size(LIST_PAGE),
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
    let mut resync = health.resync.subscribe();
    let mut mark = 0;
    let mut last_error_log: Option<Instant> = None;
    loop {
        let generation = *resync.borrow_and_update();
        let mut stream = watcher::watcher(api.clone(), config.clone()).backoff(WatchBackoff::default()).boxed();
        loop {
            let item = tokio::select! {
                item = stream.next() => match item {
                    Some(item) => item,
                    None => return,
                },
                r = resync.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // Drop this stream (and whatever it still buffers) and list afresh.
                    break;
                }
            };
            let changes = match item {
                Ok(Event::Init) => {
                    mark = cache.mark();
                    vec![]
                }
                Ok(Event::InitApply(o)) | Ok(Event::Apply(o)) => apply(Ev::Put(o)),
                Ok(Event::Delete(o)) => apply(Ev::Gone(o)),
                Ok(Event::InitDone) => {
                    if !health.synced[slot].swap(true, Ordering::SeqCst) {
                        info!("watch of {what} in {scope} synced");
                    }
                    if health.forbidden[slot].swap(false, Ordering::SeqCst) {
                        info!("watch of {what} in {scope} is permitted again");
                    }
                    let changes = apply(Ev::Sweep(ns.clone(), mark));
                    health.listed[slot].fetch_max(generation + 1, Ordering::SeqCst);
                    changes
                }
                Err(e) => {
                    let forbidden = matches!(&e, watcher::Error::InitialListFailed(kube::Error::Api(s))
                        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
                        | watcher::Error::WatchError(s) if s.code == 403);
                    let quiet = last_error_log.is_some_and(|t| t.elapsed() < Duration::from_secs(30));
                    if forbidden {
                        health.forbidden[slot].store(true, Ordering::SeqCst);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::utils::Backoff;

    #[test]
    fn watch_retries_start_at_100ms_stay_under_1_25s_and_reset() {
        let mut b = WatchBackoff::default();
        let delays: Vec<Duration> = (0..10).map(|_| b.next().unwrap()).collect();
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] <= Duration::from_millis(125), "{delays:?}");
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(1250)), "capped near 1 s: {delays:?}");
        assert!(delays[9] >= Duration::from_secs(1), "grows to 1 s: {delays:?}");
        b.reset();
        assert!(b.next().unwrap() <= Duration::from_millis(125), "reset by an event");
    }
}
