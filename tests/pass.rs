//! Table cases for one reconcile pass (`pass::decide`), from `tests/fixtures/pass/cases.yaml`:
//! each case is a small world (a cluster derived from `support::world::base_cluster`, pods and
//! Ray nodes as one-line strings, the remembered memory) and what the pass must decide. Only the
//! expectations a case lists are checked. Every behaviour the integration tests show has a case.

mod support;

use std::collections::BTreeMap;

use ray_operator::api::RayCluster;
use ray_operator::autoscaler::scale::{DrainState, LinkHealth};
use ray_operator::pass::{self, LinkAction, Next, PassDecision};
use ray_operator::ray::ResourceDemand;
use serde::Deserialize;
use serde_json::Value;
use support::world::{self, World};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    autoscaler: bool,
    /// Merged into `spec` (objects key by key, anything else replaced).
    #[serde(default)]
    spec: Option<Value>,
    /// Merged into the pod type of that name; `image` sets its first container's image.
    #[serde(default)]
    types: BTreeMap<String, Value>,
    /// Merged into `metadata`.
    #[serde(default)]
    metadata: Option<Value>,
    /// The status as last written.
    #[serde(default)]
    status: Option<Value>,
    /// Whether the head Service exists as applied (default true).
    #[serde(default = "yes")]
    service: bool,
    #[serde(default)]
    pods: Vec<String>,
    #[serde(default)]
    ray: Option<RayCase>,
    #[serde(default)]
    memory: Option<MemoryCase>,
    #[serde(default)]
    create_batch: Option<usize>,
    /// Run one pass first and keep its status and memory (not its other writes): the case is
    /// the pass after that.
    #[serde(default)]
    settled: bool,
    expect: Expect,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RayCase {
    /// `other`: the running link talks to another address.
    #[serde(default)]
    addr: Option<String>,
    /// healthy (default), connecting, unhealthy, stale (healthy but no fresh snapshot).
    #[serde(default)]
    health: Option<String>,
    #[serde(default)]
    nodes: Vec<String>,
    #[serde(default)]
    demand: Vec<DemandCase>,
    /// pod → requested | accepted | rejected
    #[serde(default)]
    drains: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DemandCase {
    shape: BTreeMap<String, f64>,
    count: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryCase {
    #[serde(default)]
    targets: Option<BTreeMap<String, u32>>,
    /// `current`: the fingerprint of the case's cluster; anything else is used as is.
    #[serde(default)]
    rejected: Option<String>,
    /// Seconds from now.
    #[serde(default)]
    status_due_in: Option<i64>,
    /// The phase the status wait is for (default: any).
    #[serde(default)]
    status_due_phase: Option<ray_operator::api::Phase>,
    /// Pod creates were refused; the next try is due in this many seconds (negative: overdue).
    #[serde(default)]
    refused_retry_in: Option<i64>,
    /// Running worker pods seen without a Ray node, for this many seconds.
    #[serde(default)]
    unregistered_for: BTreeMap<String, i64>,
    /// The head's GCS has not answered for this many seconds.
    #[serde(default)]
    gcs_down_for: Option<i64>,
    /// The head pod whose GCS answered before.
    #[serde(default)]
    gcs_answered: Option<String>,
}

/// The refusal message the cases use.
const REFUSED: &str = "the API server refused to create a worker pod of type small (403 Forbidden): exceeded quota";

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Expect {
    /// `false`: no API write of any kind besides the status.
    writes: Option<bool>,
    apply_service: Option<bool>,
    /// `"head"` or `"<type> <count>"`, in order.
    creates: Option<Vec<String>>,
    /// `"<pod> <Reason>"`, in order.
    deletes: Option<Vec<String>>,
    drains: Option<Vec<String>>,
    forget_drains: Option<Vec<String>>,
    /// keep | stop | connect
    link: Option<String>,
    /// Whether a report for Ray is sent.
    report: Option<bool>,
    pending_launches: Option<usize>,
    targets: Option<BTreeMap<String, u32>>,
    /// `null`: no status write; an object: the fields it lists, `conditions` as
    /// `{Type: "<True|False> <Reason>"}` (`absent` for none).
    #[serde(default, deserialize_with = "some")]
    status: Option<Option<Value>>,
    /// Event reasons, in order.
    events: Option<Vec<String>>,
    /// idle | continue | `after <secs>`
    next: Option<String>,
    head_recovery: Option<bool>,
    /// up | down | none
    scaled: Option<String>,
    rejected: Option<bool>,
    status_due: Option<bool>,
    /// Whether pod creates are (still) remembered as refused.
    refused: Option<bool>,
    /// Pods whose registration timer runs after the pass.
    unregistered: Option<Vec<String>>,
    /// Whether the head's GCS timer runs after the pass.
    gcs_down: Option<bool>,
}

fn some<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<Value>>, D::Error> {
    Ok(Some(Option::deserialize(d)?))
}

fn merge(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

fn world_of(case: &Case) -> World {
    let mut cluster = world::base_cluster();
    if let Some(spec) = &case.spec {
        merge(&mut cluster["spec"], spec);
    }
    if let Some(meta) = &case.metadata {
        merge(&mut cluster["metadata"], meta);
    }
    for (name, patch) in &case.types {
        let types = cluster["spec"]["podTypes"].as_array_mut().expect("podTypes");
        let t = types.iter_mut().find(|t| t["name"] == name.as_str()).unwrap_or_else(|| panic!("no type {name}"));
        let mut patch = patch.clone();
        if let Some(image) = patch.as_object_mut().and_then(|p| p.remove("image")) {
            t["podConfig"]["spec"]["containers"][0]["image"] = image;
        }
        merge(t, &patch);
    }
    if let Some(status) = &case.status {
        cluster["status"] = status.clone();
    }
    let cluster: RayCluster = serde_json::from_value(cluster).expect("cluster");
    let mut w = World::new(cluster, case.autoscaler);
    if let Some(n) = case.create_batch {
        w.settings.create_batch = n;
    }
    if case.service && w.desired.is_ok() {
        w.service_applied();
    }
    w.pods = case.pods.iter().map(|p| w.pod(p)).collect();
    if let Some(r) = &case.ray {
        let nodes = r.nodes.iter().map(|n| w.node(n)).collect();
        let demand = r
            .demand
            .iter()
            .map(|d| ResourceDemand { shape: d.shape.clone(), count: d.count, label_selectors: vec![] })
            .collect();
        w.ray(nodes, demand);
        let link = w.link.as_mut().expect("link");
        match r.health.as_deref().unwrap_or("healthy") {
            "healthy" => {}
            "stale" => link.snapshot = None,
            "connecting" => (link.health, link.snapshot) = (LinkHealth::Connecting, None),
            "unhealthy" => {
                link.health = LinkHealth::Unhealthy { reason: "unreachable", message: "connection refused".into() };
                link.snapshot = None;
            }
            other => panic!("health {other}"),
        }
        if r.addr.as_deref() == Some("other") {
            link.addr = "10.9.9.9:6379".into();
        }
        for (pod, st) in &r.drains {
            let st = match st.as_str() {
                "requested" => DrainState::Requested,
                "accepted" => DrainState::Accepted,
                _ => DrainState::Rejected(st.clone()),
            };
            link.drains.insert(pod.clone(), st);
        }
    }
    if let Some(m) = &case.memory {
        if let Some(t) = &m.targets {
            w.memory.targets = t.clone();
        }
        w.memory.rejected = m.rejected.as_ref().map(|r| match r.as_str() {
            "current" => pass::spec_fingerprint(&w.cluster),
            other => other.to_string(),
        });
        let at = |s: i64| w.now.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(s)).expect("timestamp");
        w.memory.status_due = m.status_due_in.map(|s| pass::StatusDue { at: at(s), phase: m.status_due_phase });
        w.memory.refused =
            m.refused_retry_in.map(|s| pass::Refusal { attempts: 1, retry_at: at(s), message: REFUSED.into() });
        w.memory.unregistered_since = m.unregistered_for.iter().map(|(p, s)| (p.clone(), at(-s))).collect();
        w.memory.gcs_down_since = m.gcs_down_for.map(|s| at(-s));
        w.memory.gcs_answered = m.gcs_answered.clone();
    }
    w
}

fn creates(w: &World, d: &PassDecision) -> Vec<String> {
    d.writes
        .creates
        .iter()
        .map(|c| match c.worker {
            None => "head".to_string(),
            Some(i) => format!("{} {}", w.desired().workers[i].type_name, c.count),
        })
        .collect()
}

fn check_status(name: &str, actual: Option<&ray_operator::api::RayClusterStatus>, want: &Option<Value>) {
    let Some(want) = want else {
        assert!(actual.is_none(), "{name}: expected no status write, got {actual:#?}");
        return;
    };
    let actual = actual.unwrap_or_else(|| panic!("{name}: expected a status write"));
    let json = serde_json::to_value(actual).expect("status json");
    for (k, v) in want.as_object().expect("status object") {
        if k == "conditions" {
            for (t, s) in v.as_object().expect("conditions object") {
                let got =
                    actual.conditions.iter().find(|c| c.type_ == *t).map(|c| format!("{} {}", c.status, c.reason));
                let got = got.unwrap_or_else(|| "absent".into());
                assert_eq!(got, s.as_str().unwrap_or_default(), "{name}: condition {t}");
            }
        } else {
            assert_eq!(json.get(k).unwrap_or(&Value::Null), v, "{name}: status.{k} in {json:#}");
        }
    }
}

fn check(case: &Case) {
    let mut w = world_of(case);
    if case.settled {
        let first = w.decide();
        if let Some(s) = first.status {
            w.cluster.status = Some(s);
        }
        w.memory = first.memory;
    }
    let d = w.decide();
    let (e, name) = (&case.expect, case.name.as_str());
    if let Some(false) = e.writes {
        assert!(d.writes.is_empty(), "{name}: expected no writes, got {:?}", d.writes);
    }
    if let Some(s) = e.apply_service {
        assert_eq!(d.writes.apply_service, s, "{name}: apply_service");
    }
    if let Some(c) = &e.creates {
        assert_eq!(&creates(&w, &d), c, "{name}: creates");
    }
    if let Some(del) = &e.deletes {
        let got: Vec<String> = d.writes.deletes.iter().map(|x| format!("{} {:?}", x.name, x.reason)).collect();
        assert_eq!(&got, del, "{name}: deletes");
    }
    if let Some(dr) = &e.drains {
        let got: Vec<&str> = d.ray.drains.iter().map(|x| x.pod.as_str()).collect();
        assert_eq!(&got, dr, "{name}: drains");
    }
    if let Some(f) = &e.forget_drains {
        assert_eq!(&d.ray.forget_drains, f, "{name}: forget_drains");
    }
    if let Some(l) = &e.link {
        let got = match &d.ray.link {
            LinkAction::Keep => "keep".to_string(),
            LinkAction::Stop => "stop".to_string(),
            LinkAction::Connect(addr) if l.contains(' ') => format!("connect {addr}"),
            LinkAction::Connect(_) => "connect".to_string(),
        };
        assert_eq!(&got, l, "{name}: link");
    }
    if let Some(r) = e.report {
        assert_eq!(d.ray.report.is_some(), r, "{name}: report");
    }
    if let Some(n) = e.pending_launches {
        let got = d.ray.report.as_ref().map_or(0, |r| r.pending_launches.len());
        assert_eq!(got, n, "{name}: pending launches");
    }
    if let Some(t) = &e.targets {
        assert_eq!(&d.memory.targets, t, "{name}: targets");
    }
    if let Some(s) = &e.status {
        check_status(name, d.status.as_ref(), s);
    }
    if let Some(ev) = &e.events {
        let got: Vec<&str> = d.events.iter().map(|x| x.reason).collect();
        assert_eq!(&got, ev, "{name}: events");
    }
    if let Some(n) = &e.next {
        let got = match d.next {
            Next::Idle => "idle".to_string(),
            Next::Continue => "continue".to_string(),
            Next::After(t) => format!("after {:.1}", t.as_secs_f64()),
        };
        assert_eq!(&got, n, "{name}: next");
    }
    if let Some(h) = e.head_recovery {
        assert_eq!(d.head_recovery, h, "{name}: head_recovery");
    }
    if let Some(s) = &e.scaled {
        assert_eq!(d.scaled.map_or("none", |s| s.as_str()), s, "{name}: scaled");
    }
    if let Some(r) = e.rejected {
        assert_eq!(d.memory.rejected.is_some(), r, "{name}: rejected");
    }
    if let Some(s) = e.status_due {
        assert_eq!(d.memory.status_due.is_some(), s, "{name}: status_due");
    }
    if let Some(r) = e.refused {
        assert_eq!(d.memory.refused.is_some(), r, "{name}: refused");
    }
    if let Some(u) = &e.unregistered {
        let got: Vec<&String> = d.memory.unregistered_since.keys().collect();
        assert_eq!(got, u.iter().collect::<Vec<_>>(), "{name}: unregistered");
    }
    if let Some(g) = e.gcs_down {
        assert_eq!(d.memory.gcs_down_since.is_some(), g, "{name}: gcs_down");
    }
}

fn cases() -> Vec<Case> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pass/cases.yaml");
    let text = std::fs::read_to_string(path).expect("cases.yaml");
    serde_yaml::from_str(&text).expect("cases.yaml parses")
}

#[test]
fn every_case_decides_as_expected() {
    let cases = cases();
    let mut failed = Vec::new();
    for case in &cases {
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(case))) {
            let msg = e.downcast_ref::<String>().cloned().unwrap_or_else(|| format!("{:?}", e.downcast_ref::<&str>()));
            failed.push(msg);
        }
    }
    assert!(failed.is_empty(), "{} of {} cases failed:\n{}", failed.len(), cases.len(), failed.join("\n\n"));
}

#[test]
fn there_are_at_least_forty_cases_with_distinct_names() {
    let cases = cases();
    let names: std::collections::BTreeSet<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names.len(), cases.len(), "case names are unique");
    assert!(cases.len() >= 40, "{} cases", cases.len());
}

/// A refused create waits 0.5 s, then twice as long each time up to 3 s; with the autoscaler the
/// refused pods leave the target (a launch that never became a pod is not counted), never below
/// minWorkers; without it the targets are the spec's and stay.
#[test]
fn refused_creates_back_off_and_leave_the_targets() {
    let mut w = World::new(serde_json::from_value(world::base_cluster()).expect("cluster"), true);
    w.memory.targets = BTreeMap::from([("small".into(), 4), ("large".into(), 2)]);
    let desired = w.desired().clone();
    let mut waits = Vec::new();
    for _ in 0..6 {
        pass::create_refused(&mut w.memory, &desired, &[(Some(0), 1), (Some(1), 2)], REFUSED, w.now, true);
        let r = w.memory.refused.as_ref().expect("refused");
        waits.push(r.retry_at.duration_since(w.now).as_secs_f64());
    }
    assert_eq!(waits, [0.5, 1.0, 2.0, 3.0, 3.0, 3.0], "capped exponential backoff");
    assert_eq!(w.memory.refused.as_ref().map(|r| r.attempts), Some(6));
    assert_eq!(w.memory.targets, BTreeMap::from([("small".into(), 1), ("large".into(), 0)]), "down to minWorkers");

    let mut fixed = pass::Memory { targets: BTreeMap::from([("small".into(), 3)]), ..Default::default() };
    pass::create_refused(&mut fixed, &desired, &[(Some(0), 2)], REFUSED, w.now, false);
    assert_eq!(fixed.targets["small"], 3, "without the autoscaler the spec's targets stay");
}

/// After a refusal, the executor's immediate next pass writes a status that names it, and no wake
/// (a GCS snapshot every interval, pod events) brings a create before the retry is due.
#[test]
fn no_wake_skips_the_backoff_of_a_refused_create() {
    let mut w = World::new(serde_json::from_value(world::base_cluster()).expect("cluster"), true);
    w.service_applied();
    w.pods = vec![w.pod("h head Running ready")];
    w.ray(vec![w.node("h running")], vec![]);
    w.memory.targets = BTreeMap::from([("small".into(), 1), ("large".into(), 0)]);
    let desired = w.desired().clone();
    pass::create_refused(&mut w.memory, &desired, &[(Some(0), 1)], REFUSED, w.now, true);
    let retry_at = w.memory.refused.as_ref().expect("refused").retry_at;
    let mut t = w.now;
    while t < retry_at {
        w.now = t;
        let d = w.decide();
        assert!(d.writes.creates.is_empty(), "no create {:?} before the retry", t);
        t = t.checked_add(k8s_openapi::jiff::SignedDuration::from_millis(100)).expect("time");
    }
    w.now = retry_at;
    let d = w.decide();
    assert_eq!(creates(&w, &d), ["small 1"], "the retry is due: one probe");
}
