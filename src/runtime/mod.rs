//! The operator process: watches (always, so standbys keep warm caches), leader election, shards
//! (only on the leader), the health server, and shutdown.
//!
//! Winning the Lease does not start the shards at once: every watch first lists afresh, and the
//! shards start once all have (see `catch_up`), so a replica that was frozen or cut off while
//! another led never acts on its old view. Signals and leadership changes are answered meanwhile.
//!
//! SIGTERM: readiness goes false, shards finish their in-flight reconcile and stop, the Lease is
//! released, and the process exits — well inside the pod's grace period. A second signal exits at once.

pub mod client;
pub mod health;
pub mod leader;
pub mod shards;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kube::Client;
use tokio::sync::mpsc::unbounded_channel;
use tokio::sync::watch as tokio_watch;
use tracing::{info, warn};

use crate::cache::Cache;
use crate::metrics::Metrics;
use crate::model::desired::OwnServiceAccount;
use crate::reconciler::{
    AutoscalerSettings, Context, EventQueue, Events, MAX_CONCURRENT_GCS_CALLS, PassSettings, Reporter,
};
use leader::{Fence, LeaderConfig};
use shards::Shards;
use watch::{Change, Scope};

/// Events waiting to be published, at most (about 0.4 KB each): a bring-up of 10,000 clusters
/// queues one each without dropping any even if the API server took none of them meanwhile.
const EVENT_QUEUE: usize = 10_000;

/// Event requests in flight at once: a small share of the API server next to the pod creates,
/// and still hundreds of Events per second.
const EVENTS_IN_FLIGHT: usize = 4;

/// How long a stopping replica keeps answering `/readyz` with 503 after releasing the Lease.
const SHUTDOWN_LINGER: Duration = Duration::from_millis(500);

/// Everything `ray-operator run` needs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub scope: Scope,
    /// `None`: no leader election (a single local replica).
    pub leader: Option<LeaderConfig>,
    pub shards: usize,
    pub create_batch: usize,
    /// `None`: no autoscaler (every worker type stays at `minWorkers`).
    pub autoscaler: Option<AutoscalerSettings>,
    pub unschedulable_timeout: Duration,
    pub health_addr: SocketAddr,
    /// The operator's own ServiceAccount, which Ray pods may not run as.
    pub service_account: Option<OwnServiceAccount>,
    /// Reported in Events (`reportingInstance`).
    pub instance: String,
}

/// Runs the operator until SIGTERM/SIGINT.
pub async fn run(config: kube::Config, settings: Settings) -> anyhow::Result<()> {
    let fence = Arc::new(match settings.leader {
        Some(_) => Fence::default(),
        None => Fence::always(),
    });
    let client = client::reads(&config)?;
    let writes = client::fenced_writes(&config, fence.clone())?;
    let metrics = Arc::new(Metrics::new());
    let cache = Arc::new(Cache::new());
    let (shutdown_tx, shutdown_rx) = tokio_watch::channel(false);
    let shutting_down = Arc::new(AtomicBool::new(false));

    let (notify_tx, mut notify_rx) = unbounded_channel();
    let watch_health = watch::spawn(client.clone(), cache.clone(), &settings.scope, notify_tx);

    // The health server lives until the process exits (it must answer 503 while we shut down).
    let (_health_stop, health_stop_rx) = tokio_watch::channel(false);
    health::spawn(settings.health_addr, metrics.clone(), watch_health.clone(), shutting_down.clone(), health_stop_rx)
        .await?;

    let (leading_tx, mut leading_rx) = tokio_watch::channel(settings.leader.is_none());
    let eligible: Arc<dyn Fn() -> bool + Send + Sync> = {
        let w = watch_health.clone();
        Arc::new(move || w.all_synced())
    };
    let election = settings.leader.clone().map(|cfg| {
        tokio::spawn(leader::run(client.clone(), cfg, fence.clone(), leading_tx, eligible, shutdown_rx.clone()))
    });

    let ctx = context(&writes, &cache, &metrics, fence.clone(), &settings);

    tokio::spawn(trim_heap_periodically());
    tokio::spawn(observe_fleet_periodically(cache.clone(), metrics.clone()));
    let mut signals = Signals::new()?;
    let mut election_alive = true;
    let mut shards: Option<Shards> = None;
    // Between winning the Lease and acting, the caches catch up (see `catch_up`); the main loop
    // keeps answering signals and leadership changes meanwhile.
    let (caught_up_tx, mut caught_up_rx) = unbounded_channel::<u64>();
    let mut term = 0u64;
    let mut catching_up: Option<tokio::task::JoinHandle<()>> = None;
    let mut leading = *leading_rx.borrow();
    metrics.set_leader(leading);
    if leading {
        // No election: the first list of every watch is fresh; wait for it, no relist needed.
        term += 1;
        catching_up = Some(catch_up(watch_health.clone(), false, Duration::ZERO, term, caught_up_tx.clone()));
    }
    loop {
        tokio::select! {
            change = notify_rx.recv() => {
                let Some(change) = change else { break };
                if let Some(s) = &shards {
                    match change {
                        Change::Cluster(k) => s.reconcile(k),
                        Change::Deleted(k) => s.forget(k),
                    }
                }
            }
            r = leading_rx.changed(), if election_alive => {
                if r.is_err() {
                    // No election (single replica) or it ended: leadership is fixed from here on.
                    election_alive = false;
                    continue;
                }
                let now = *leading_rx.borrow_and_update();
                if now == leading { continue; }
                leading = now;
                metrics.set_leader(leading);
                if let Some(t) = catching_up.take() {
                    t.abort();
                }
                if leading {
                    term += 1;
                    catching_up = Some(catch_up(watch_health.clone(), true, fence.settle(), term, caught_up_tx.clone()));
                } else if let Some(s) = shards.take() {
                    // Lost or fenced: stop at once; the next leader rebuilds from the API server.
                    s.abort();
                    info!("standing by; all shards dropped");
                }
            }
            Some(t) = caught_up_rx.recv() => {
                // Only the catch-up of the current term counts: an older one may finish late.
                if t == term && leading && shards.is_none() {
                    catching_up = None;
                    shards = Some(become_leader(&ctx, &settings, &client));
                }
            }
            _ = signals.recv() => {
                info!("shutdown requested: stopping shards, then releasing leadership");
                break;
            }
        }
    }
    if let Some(t) = catching_up.take() {
        t.abort();
    }

    shutting_down.store(true, Ordering::SeqCst);
    // A second signal during the graceful stop exits at once.
    tokio::spawn(async move {
        signals.recv().await;
        warn!("second signal: exiting now");
        std::process::exit(130);
    });
    if let Some(s) = shards.take()
        && tokio::time::timeout(Duration::from_secs(10), s.stop()).await.is_err()
    {
        warn!("shards did not stop within 10s");
    }
    let _ = shutdown_tx.send(true);
    if let Some(e) = election {
        let _ = e.await;
    }
    // Release even if we never started leading: the Lease may have been won just before the signal.
    // step_down only releases a Lease we hold.
    if let Some(cfg) = &settings.leader {
        leader::release(client.clone(), cfg).await;
    }
    metrics.set_leader(false);
    // Stay unready a moment before exiting, so probes and endpoints observe the shutdown; the
    // Lease is already released, so this does not delay the hand-over.
    tokio::time::sleep(SHUTDOWN_LINGER).await;
    info!("stopped");
    Ok(())
}

/// The reconciler's context: what every pass shares.
fn context(
    client: &Client,
    cache: &Arc<Cache>,
    metrics: &Arc<Metrics>,
    fence: Arc<Fence>,
    settings: &Settings,
) -> Arc<Context> {
    Arc::new(Context {
        client: client.clone(),
        cache: cache.clone(),
        events: EventQueue::start(
            Arc::new(Events::new(
                client.clone(),
                Reporter { controller: "ray-operator".into(), instance: settings.instance.clone() },
            )),
            metrics.clone(),
            EVENT_QUEUE,
            EVENTS_IN_FLIGHT,
        ),
        metrics: metrics.clone(),
        settings: PassSettings {
            create_batch: settings.create_batch,
            autoscaler: settings.autoscaler.clone(),
            unschedulable_timeout: settings.unschedulable_timeout,
        },
        fence,
        own_service_account: settings.service_account.clone(),
        gcs_permits: Arc::new(crate::autoscaler::link::GcsSlots::new(MAX_CONCURRENT_GCS_CALLS)),
    })
}

/// Waits until the caches may be acted on, then reports `term` on `done`.
///
/// `relist`: a new leader first makes every watch list afresh (see [`watch::WatchHealth::resync`]
/// for why), so it never acts on the view of a replica that was frozen or cut off while another
/// leader worked. The Lease is held meanwhile; that costs a hand-over one list per watched kind.
/// `settle`: how long to wait before that list, for the last writes of a previous leader that did
/// not release the Lease (see [`Fence::settle`]).
fn catch_up(
    watches: Arc<watch::WatchHealth>,
    relist: bool,
    settle: Duration,
    term: u64,
    done: tokio::sync::mpsc::UnboundedSender<u64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !settle.is_zero() {
            info!(
                "took the lease from a leader that did not release it: waiting {:.1}s for its last writes to land before listing",
                settle.as_secs_f64()
            );
            tokio::time::sleep(settle).await;
        }
        let started = std::time::Instant::now();
        let generation = if relist { watches.resync() } else { 0 };
        let mut waited = 0u32;
        while !watches.caught_up(generation) {
            if waited.is_multiple_of(100) && waited > 0 {
                info!("leader waiting for its caches to list afresh");
            }
            waited += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if relist {
            info!("caches listed afresh in {:.3}s; acting", started.elapsed().as_secs_f64());
        }
        let _ = done.send(term);
    })
}

fn become_leader(ctx: &Arc<Context>, settings: &Settings, client: &Client) -> Shards {
    let s = Shards::start(ctx.clone(), settings.shards);
    // Every known cluster gets a pass: level-based, so anything already right causes no write.
    for k in ctx.cache.cluster_keys() {
        s.reconcile(k);
    }
    info!("leading: {} shards, {} clusters", settings.shards, ctx.cache.cluster_count());
    if let Some(cfg) = settings.leader.clone() {
        let client = client.clone();
        tokio::spawn(async move { leader::label_leader_pod(client, &cfg).await });
    }
    s
}

/// glibc keeps freed memory in its arenas; after the bursts of a big reconcile (thousands of pods
/// created at once) that would stay in RSS for good. Handing it back periodically keeps the
/// operator's footprint that of its live data.
async fn trim_heap_periodically() {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tick.tick().await;
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases free memory of the allocator; it has no preconditions.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// The fleet gauges of /metrics, recounted from the cache every few seconds (cheap: one walk of
/// the cache, no API calls). Every replica's cache holds the same objects, so standbys report
/// the same numbers as the leader; dashboards and alerts take the max over replicas.
async fn observe_fleet_periodically(cache: Arc<Cache>, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let (phases, unreachable, unschedulable) = fleet(&cache);
        metrics.set_fleet(phases, unreachable, unschedulable);
    }
}

/// Clusters by phase, clusters whose GCS cannot be read, and unschedulable Ray pods.
fn fleet(cache: &Cache) -> ([i64; crate::metrics::PHASES.len()], i64, i64) {
    let mut phases = [0i64; crate::metrics::PHASES.len()];
    let (mut unreachable, mut unschedulable) = (0i64, 0i64);
    // A head that does not run (yet) is the unschedulable alert's business, not this one's.
    let autoscaler_down = |s: &crate::api::RayClusterStatus| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "AutoscalerHealthy" && c.status == "False" && c.reason != crate::pass::HEAD_NOT_RUNNING)
    };
    for key in cache.cluster_keys() {
        let Some(cluster) = cache.cluster(&key) else { continue };
        let status = cluster.status.as_ref();
        let phase = status.and_then(|s| s.phase).map_or("Pending", |p| p.as_str());
        if let Some(i) = crate::metrics::PHASES.iter().position(|p| *p == phase) {
            phases[i] += 1;
        }
        unreachable += i64::from(status.is_some_and(autoscaler_down));
        unschedulable +=
            cache.pods(&key).iter().filter(|p| p.is_live() && p.unschedulable_since.is_some()).count() as i64;
    }
    (phases, unreachable, unschedulable)
}

/// SIGTERM and SIGINT as one stream.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str, autoscaler: Option<(&str, &str)>) -> crate::api::RayCluster {
        let conditions: Vec<serde_json::Value> = autoscaler
            .into_iter()
            .map(|(status, reason)| {
                serde_json::json!({"type": "AutoscalerHealthy", "status": status, "reason": reason, "message": "m",
                    "lastTransitionTime": "2026-12-01T00:00:00Z"})
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cluster.ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"maxWorkers": 1, "headPodType": "head", "podTypes": []},
            "status": {"phase": "Running", "conditions": conditions},
        }))
        .expect("a RayCluster")
    }

    #[test]
    fn the_unreachable_gauge_counts_gcs_failures_not_heads_that_do_not_run() {
        let cache = Cache::new();
        cache.put_cluster(cluster("reachable", Some(("True", "GcsReachable"))));
        cache.put_cluster(cluster("unreachable", Some(("False", "GcsUnreachable"))));
        cache.put_cluster(cluster("connecting", Some(("False", "Connecting"))));
        cache.put_cluster(cluster("head-pending", Some(("False", crate::pass::HEAD_NOT_RUNNING))));
        cache.put_cluster(cluster("no-autoscaler", None));
        let (phases, unreachable, _) = fleet(&cache);
        assert_eq!(unreachable, 2, "GcsUnreachable and Connecting count; HeadNotRunning does not");
        let running = crate::metrics::PHASES.iter().position(|p| *p == "Running").expect("Running is a phase");
        assert_eq!(phases[running], 5);
    }
}
