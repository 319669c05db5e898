//! Kubernetes Events about RayClusters (`events.k8s.io/v1`), folded into series: the first
//! occurrence of a (cluster, type, reason) creates an Event; repeats within [`SERIES_TTL`] raise
//! that Event's `series.count` instead of adding objects, as the kubelet and kube's `Recorder` do.
//!
//! Why not kube's `Recorder`: it keeps a full copy of every Event it published for six minutes
//! (the object, its reference and a key that copies the reference again) and walks all of them
//! under one lock on every publish. At 10,000 clusters that is every bring-up's Event held at once
//! and 10,000 entries scanned per Event. A series here is the Event's name and namespace, a count
//! and a time, in a sharded map swept at most once per [`SWEEP_EVERY`].
//!
//! Events go out through an [`EventQueue`]: a bounded queue that one task drains with a few
//! requests in flight. A reconcile never waits for an Event, and a bring-up of thousands of
//! clusters does not open a request (or a connection) per Event next to its pod creates: Events
//! trail behind the writes that make pods exist. When the queue is full, Events are dropped and
//! counted (`ray_operator_events_dropped_total`) rather than held without bound.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// How long after its last occurrence a series may still be continued (kube's Recorder: 6 min).
pub const SERIES_TTL: SignedDuration = SignedDuration::from_mins(6);

/// Expired series are dropped at most this often.
pub const SWEEP_EVERY: SignedDuration = SignedDuration::from_secs(60);

/// Who reports the Events (`reportingController`, `reportingInstance`).
#[derive(Clone, Debug)]
pub struct Reporter {
    pub controller: String,
    pub instance: String,
}

/// One Event to publish about an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Occurrence {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// Events waiting to be published; what the executor holds. Cloning shares the queue.
#[derive(Clone)]
pub struct EventQueue {
    tx: mpsc::Sender<(ObjectReference, Occurrence)>,
    metrics: Arc<Metrics>,
    dropped: Arc<AtomicU64>,
}

impl EventQueue {
    /// Starts the task that publishes queued Events with `in_flight` requests at most.
    pub fn start(events: Arc<Events>, metrics: Arc<Metrics>, capacity: usize, in_flight: usize) -> Self {
        let (tx, mut rx) = mpsc::channel::<(ObjectReference, Occurrence)>(capacity.max(1));
        let m = metrics.clone();
        tokio::spawn(async move {
            futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
                .for_each_concurrent(in_flight.max(1), |(regarding, o)| {
                    let (events, m) = (events.clone(), m.clone());
                    async move {
                        match events.publish(&regarding, &o).await {
                            Ok(()) => m.api_write("event"),
                            Err(e) => {
                                debug!("{}: {} Event not published: {e}", prefix(&regarding), o.reason);
                            }
                        }
                    }
                })
                .await
        });
        EventQueue { tx, metrics, dropped: Arc::default() }
    }

    /// Queues an Event; never waits. A full queue drops it: counted, and logged at warn for the
    /// first drop and every 1,000th.
    pub fn send(&self, regarding: ObjectReference, o: Occurrence) {
        match self.tx.try_send((regarding, o)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full((regarding, o))) => {
                self.metrics.event_dropped();
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n == 1 || n.is_multiple_of(1000) {
                    warn!("{}: Event queue full, {} Event dropped ({n} dropped so far)", prefix(&regarding), o.reason);
                }
            }
            // The publisher task is gone only when the runtime shuts down.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// `<name>: <namespace>`, the prefix of log lines about a cluster (as `ClusterKey` prints it).
fn prefix(r: &ObjectReference) -> String {
    format!("{}: {}", r.name.as_deref().unwrap_or_default(), r.namespace.as_deref().unwrap_or_default())
}

/// A series: the Event object that stands for it and how often it happened.
#[derive(Debug)]
struct Series {
    namespace: String,
    event: String,
    count: i32,
    last: Timestamp,
}

/// Same object (by uid, so a recreated cluster starts afresh), type and reason.
#[derive(Debug, Hash, PartialEq, Eq)]
struct SeriesKey {
    object: String,
    warning: bool,
    reason: String,
}

/// Publishes Events, folding repeats into series. Cheap to share behind an `Arc`.
pub struct Events {
    client: Client,
    reporter: Reporter,
    series: DashMap<SeriesKey, Series>,
    last_sweep: Mutex<Timestamp>,
}

impl Events {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Events { client, reporter, series: DashMap::new(), last_sweep: Mutex::new(Timestamp::now()) }
    }

    /// Series held in memory (for tests and the memory figures).
    pub fn series_len(&self) -> usize {
        self.series.len()
    }

    /// Creates the Event, or counts one more occurrence of its series. An Event that went away
    /// (the API server's TTL, or someone deleted it) starts a new series.
    pub async fn publish(&self, regarding: &ObjectReference, o: &Occurrence) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        self.sweep(now);
        let key = SeriesKey {
            object: match &regarding.uid {
                Some(uid) => uid.clone(),
                None => format!(
                    "{}/{}",
                    regarding.namespace.as_deref().unwrap_or_default(),
                    regarding.name.as_deref().unwrap_or_default()
                ),
            },
            warning: o.warning,
            reason: o.reason.to_string(),
        };
        let ongoing = self
            .series
            .get(&key)
            .filter(|s| s.last + SERIES_TTL > now)
            .map(|s| (s.namespace.clone(), s.event.clone(), s.count + 1));
        if let Some((namespace, name, count)) = ongoing {
            let events: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
            let patch = serde_json::json!({
                "series": EventSeries { count, last_observed_time: MicroTime(now) },
            });
            match events.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    if let Some(mut s) = self.series.get_mut(&key) {
                        s.count = s.count.max(count);
                        s.last = now;
                    }
                    return Ok(());
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let event = self.new_event(regarding, o, now);
        let namespace = event.metadata.namespace.clone().unwrap_or_default();
        let name = event.metadata.name.clone().unwrap_or_default();
        Api::<Event>::namespaced(self.client.clone(), &namespace).create(&PostParams::default(), &event).await?;
        self.series.insert(key, Series { namespace, event: name, count: 1, last: now });
        Ok(())
    }

    fn new_event(&self, regarding: &ObjectReference, o: &Occurrence, now: Timestamp) -> Event {
        let name = regarding.name.as_deref().unwrap_or(&self.reporter.controller);
        Event {
            metadata: ObjectMeta {
                // Unique per publish, and sorted by time for whoever lists them.
                name: Some(format!("{name}.{:x}", now.as_nanosecond())),
                namespace: Some(regarding.namespace.clone().unwrap_or_else(|| "default".into())),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(if o.warning { "Warning" } else { "Normal" }.into()),
            reason: Some(o.reason.into()),
            action: Some(o.reason.into()),
            note: Some(o.note.clone()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(self.reporter.instance.clone()),
            ..Default::default()
        }
    }

    /// Drops series past their TTL, at most once per [`SWEEP_EVERY`], by whichever publish comes
    /// first after that (the others do not wait for it).
    fn sweep(&self, now: Timestamp) {
        let Ok(mut last) = self.last_sweep.try_lock() else { return };
        if *last + SWEEP_EVERY > now {
            return;
        }
        *last = now;
        drop(last);
        self.series.retain(|_, s| s.last + SERIES_TTL > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(last: Timestamp) -> Series {
        Series { namespace: "ns".into(), event: "rc.1".into(), count: 1, last }
    }

    fn key(object: &str) -> SeriesKey {
        SeriesKey { object: object.into(), warning: true, reason: "FailedCreate".into() }
    }

    #[tokio::test]
    async fn a_sweep_drops_only_series_past_their_ttl_and_runs_at_most_once_a_minute() {
        // No request is made: the client only has to exist.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let events = Events::new(
            Client::try_from(config).unwrap(),
            Reporter { controller: "ray-operator".into(), instance: "test".into() },
        );
        let t0 = Timestamp::now();
        events.series.insert(key("old"), series(t0));
        events.series.insert(key("new"), series(t0 + SignedDuration::from_mins(5)));

        // Within a minute of the last sweep: nothing is looked at.
        events.sweep(t0 + SignedDuration::from_secs(30));
        assert_eq!(events.series_len(), 2);

        // Seven minutes on, "old" (last seen 7 min ago) is past the TTL, "new" (2 min) is not.
        events.sweep(t0 + SignedDuration::from_mins(7));
        assert_eq!(events.series_len(), 1);
        assert!(events.series.contains_key(&key("new")));

        // The next sweep waits a minute again: an expired series stays until then.
        events.series.insert(key("stale"), series(t0));
        events.sweep(t0 + SignedDuration::from_mins(7) + SignedDuration::from_secs(59));
        assert_eq!(events.series_len(), 2);
        events.sweep(t0 + SignedDuration::from_mins(8));
        assert_eq!(events.series_len(), 1);
        events.sweep(t0 + SignedDuration::from_mins(11) + SignedDuration::from_secs(1));
        assert_eq!(events.series_len(), 0, "\"new\" is past its TTL at 11 min");
    }
}
