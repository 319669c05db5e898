//! Prometheus metrics. Labels are bounded (kinds, reasons, shard numbers), never object names, so
//! thousands of clusters cost no extra series.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

fn label(k: &str, v: &str) -> Labels {
    vec![(k.to_string(), v.to_string())]
}

/// All metrics of the operator, registered under the `ray_operator_` prefix.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    reconcile_duration: Histogram,
    errors: Family<Labels, Counter>,
    clusters_per_shard: Family<Labels, Gauge<i64, std::sync::atomic::AtomicI64>>,
    leader: Gauge<i64, std::sync::atomic::AtomicI64>,
    leader_transitions: Counter,
    created: Family<Labels, Counter>,
    deleted: Family<Labels, Counter>,
    writes: Family<Labels, Counter>,
    events_dropped: Counter,
    autoscaler_decisions: Family<Labels, Counter>,
    gcs_errors: Counter,
    gcs_calls: Family<Labels, Counter>,
    clusters: Family<Labels, Gauge<i64, std::sync::atomic::AtomicI64>>,
    gcs_unreachable: Gauge<i64, std::sync::atomic::AtomicI64>,
    unschedulable: Gauge<i64, std::sync::atomic::AtomicI64>,
    _unused: AtomicU64,
}

/// The phases of `ray_operator_clusters`: the status phases (api::Phase::as_str), and `Pending`
/// for clusters that have none yet (never reconciled, e.g. while no replica leads).
pub const PHASES: [&str; 5] = ["Pending", "Running", "Updating", "Error", "AutoscalingExceptionRecovery"];

/// `Error::reason()` of the reconciler: created at start so that `rate()` and alerts see the
/// first error (a series that appears at 1 has no increase to show).
const RECONCILE_ERROR_REASONS: [&str; 6] = ["forbidden", "conflict", "api_error", "transport", "rejected", "fenced"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ray_operator");
        let reconciles = Counter::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let errors = Family::<Labels, Counter>::default();
        let clusters_per_shard = Family::default();
        let leader = Gauge::default();
        let leader_transitions = Counter::default();
        let created = Family::<Labels, Counter>::default();
        let deleted = Family::<Labels, Counter>::default();
        let writes = Family::<Labels, Counter>::default();
        let events_dropped = Counter::default();
        let autoscaler_decisions = Family::<Labels, Counter>::default();
        let gcs_errors = Counter::default();
        let gcs_calls = Family::<Labels, Counter>::default();
        let clusters = Family::default();
        let gcs_unreachable = Gauge::default();
        let unschedulable = Gauge::default();
        let start_time = Gauge::<f64, AtomicU64>::default();
        start_time
            .set(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()));
        registry.register("reconciles", "Reconcile passes run", reconciles.clone());
        registry.register("reconcile_duration_seconds", "Duration of one reconcile pass", reconcile_duration.clone());
        registry.register("reconcile_errors", "Failed reconcile passes by reason", errors.clone());
        registry.register("shard_clusters", "RayClusters owned by each shard", clusters_per_shard.clone());
        registry.register("leader", "1 while this replica is the leader", leader.clone());
        registry.register(
            "leader_transitions",
            "Times this replica became or stopped being leader",
            leader_transitions.clone(),
        );
        registry.register("children_created", "Child objects created, by kind", created.clone());
        registry.register("children_deleted", "Child objects deleted, by kind", deleted.clone());
        registry.register("api_writes", "Write requests to the API server, by target", writes.clone());
        registry.register(
            "events_dropped",
            "Events not published because the Event queue was full",
            events_dropped.clone(),
        );
        registry.register(
            "autoscaler_decisions",
            "Autoscaler decisions that changed something, by direction",
            autoscaler_decisions.clone(),
        );
        registry.register("gcs_errors", "Failed calls to a Ray head's GCS", gcs_errors.clone());
        registry.register("gcs_calls", "Calls to Ray heads' GCS, by method", gcs_calls.clone());
        registry.register("clusters", "RayClusters in this replica's cache, by status phase", clusters.clone());
        registry.register(
            "clusters_gcs_unreachable",
            "RayClusters whose AutoscalerHealthy condition is False (the head's GCS cannot be read)",
            gcs_unreachable.clone(),
        );
        registry.register(
            "pods_unschedulable",
            "Ray pods the scheduler cannot place (PodScheduled=False, Unschedulable)",
            unschedulable.clone(),
        );
        // Changes on every restart of the process: the restart alert counts them.
        registry.register("start_time_seconds", "Start time of this process, Unix seconds", start_time);
        // Every bounded label value known up front, at 0, for the reason given above (the guard
        // get_or_create returns is dropped at once).
        let zero = |f: &Family<Labels, Counter>, k: &str, values: &[&str]| {
            for v in values {
                drop(f.get_or_create(&label(k, v)));
            }
        };
        zero(&errors, "reason", &RECONCILE_ERROR_REASONS);
        // pass::Scaled::as_str (metrics is a leaf module: it imports nothing of the operator's).
        zero(&autoscaler_decisions, "direction", &["up", "down"]);
        zero(&writes, "target", &["status", "service", "event"]);
        zero(&created, "kind", &["pod"]);
        zero(&deleted, "kind", &["pod"]);
        zero(&gcs_calls, "method", &["GetClusterResourceState", "DrainNode", "ReportAutoscalingState"]);
        for p in PHASES {
            drop(clusters.get_or_create(&label("phase", p)));
        }
        Self {
            registry,
            reconciles,
            reconcile_duration,
            errors,
            clusters_per_shard,
            leader,
            leader_transitions,
            created,
            deleted,
            writes,
            events_dropped,
            autoscaler_decisions,
            gcs_errors,
            gcs_calls,
            clusters,
            gcs_unreachable,
            unschedulable,
            _unused: AtomicU64::new(0),
        }
    }

    pub fn reconciled(&self, seconds: f64) {
        self.reconciles.inc();
        self.reconcile_duration.observe(seconds);
    }

    pub fn reconcile_error(&self, reason: &str) {
        self.errors.get_or_create(&label("reason", reason)).inc();
    }

    pub fn shard_clusters(&self, shard: usize, n: usize) {
        self.clusters_per_shard.get_or_create(&label("shard", &shard.to_string())).set(n as i64);
    }

    pub fn set_leader(&self, leader: bool) {
        let old = self.leader.set(i64::from(leader));
        if old != i64::from(leader) {
            self.leader_transitions.inc();
        }
    }

    pub fn child_created(&self, kind: &str) {
        self.created.get_or_create(&label("kind", kind)).inc();
    }

    pub fn child_deleted(&self, kind: &str) {
        self.deleted.get_or_create(&label("kind", kind)).inc();
    }

    pub fn api_write(&self, target: &str) {
        self.writes.get_or_create(&label("target", target)).inc();
    }

    pub fn event_dropped(&self) {
        self.events_dropped.inc();
    }

    pub fn autoscaler_decision(&self, direction: &str) {
        self.autoscaler_decisions.get_or_create(&label("direction", direction)).inc();
    }

    pub fn gcs_error(&self) {
        self.gcs_errors.inc();
    }

    /// One call to a GCS (`method` is the RPC name: a bounded set).
    pub fn gcs_call(&self, method: &str) {
        self.gcs_calls.get_or_create(&label("method", method)).inc();
    }

    /// Sets the fleet gauges: RayClusters per phase (in [`PHASES`] order), clusters whose GCS
    /// cannot be read, unschedulable Ray pods.
    pub fn set_fleet(&self, phases: [i64; PHASES.len()], gcs_unreachable: i64, unschedulable: i64) {
        for (p, n) in PHASES.iter().zip(phases) {
            self.clusters.get_or_create(&label("phase", p)).set(n);
        }
        self.gcs_unreachable.set(gcs_unreachable);
        self.unschedulable.set(unschedulable);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_label_values_start_at_zero_and_fleet_gauges_are_set() {
        let m = Metrics::new();
        let text = m.encode();
        // The names the alerts and the dashboard use (monitoring/, kustomize/components/monitoring).
        for line in [
            "ray_operator_reconcile_errors_total{reason=\"forbidden\"} 0",
            "ray_operator_autoscaler_decisions_total{direction=\"up\"} 0",
            "ray_operator_api_writes_total{target=\"status\"} 0",
            "ray_operator_children_created_total{kind=\"pod\"} 0",
            "ray_operator_gcs_calls_total{method=\"DrainNode\"} 0",
            "ray_operator_clusters{phase=\"Pending\"} 0",
            "ray_operator_clusters_gcs_unreachable 0",
            "ray_operator_pods_unschedulable 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        let start = text.lines().find_map(|l| l.strip_prefix("ray_operator_start_time_seconds ")).unwrap();
        assert!(start.parse::<f64>().unwrap() > 1.7e9, "a Unix time: {start}");

        m.set_fleet([1, 2, 0, 3, 0], 4, 5);
        let text = m.encode();
        for line in [
            "ray_operator_clusters{phase=\"Pending\"} 1",
            "ray_operator_clusters{phase=\"Running\"} 2",
            "ray_operator_clusters{phase=\"Error\"} 3",
            "ray_operator_clusters_gcs_unreachable 4",
            "ray_operator_pods_unschedulable 5",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
