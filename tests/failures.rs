//! The failures users hit (issue 14), against the real API server: pod creates refused by a
//! ResourceQuota or by Pod Security admission (a counted FailedCreate Event, a ReplicaFailure
//! condition naming the reason, bounded retries, recovery within 5 s of the cause going away);
//! Ray dying under live pods (a dead raylet, a worker that never registers, a head whose GCS is
//! killed) with stand-in Ray processes; and a settled cluster that writes no status at all.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{Namespace, ResourceQuota};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use ray_operator::api::{Phase, RayCluster, RayClusterStatus};
use ray_operator::ray::NodeStatus;
use support::ray::{RayProcs, free_ports, ray_bin, state};
use support::*;

/// A head and `workers` workers of type cpu4 (minWorkers = maxWorkers = `workers`).
fn manifest(name: &str, workers: u32, annotations: &str) -> String {
    format!(
        r#"
apiVersion: cluster.ray.io/v1
kind: RayCluster
metadata:
  name: {name}
  annotations: {{{annotations}}}
spec:
  maxWorkers: {workers}
  idleTimeoutMinutes: 60
  headPodType: head
  podTypes:
  - name: head
    podConfig:
      apiVersion: v1
      kind: Pod
      metadata: {{generateName: ray-head-}}
      spec:
        containers:
        - {{name: ray, image: rayproject/ray:2.60.0, command: [sleep, infinity], resources: {{requests: {{cpu: "1"}}}}}}
  - name: cpu4
    minWorkers: {workers}
    maxWorkers: {workers}
    podConfig:
      apiVersion: v1
      kind: Pod
      metadata: {{generateName: ray-cpu4-}}
      spec:
        containers:
        - {{name: ray, image: rayproject/ray:2.60.0, command: [sleep, infinity], resources: {{requests: {{cpu: "4"}}}}}}
"#
    )
}

async fn status(client: &Client, ns: &str, name: &str) -> Option<RayClusterStatus> {
    Api::<RayCluster>::namespaced(client.clone(), ns).get(name).await.ok()?.status
}

fn condition(s: &RayClusterStatus, type_: &str) -> Option<(String, String, String)> {
    let c = s.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn pod_names(client: &Client, ns: &str, selector: &str) -> BTreeSet<String> {
    live_pods(client, ns, selector).await.iter().map(|p| p.name_any()).collect()
}

/// Audit events in `ns` after `after` whose verb is `verb` and whose request URI contains `path`,
/// as (HTTP code, URI).
fn audited(ns: &str, verb: &str, path: &str, after: SystemTime) -> Vec<(i64, String)> {
    let text = std::fs::read_to_string(audit_log()).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["verb"] == verb && e["stage"] == "ResponseComplete")
        .filter(|e| {
            e["requestURI"].as_str().is_some_and(|u| u.contains(&format!("/namespaces/{ns}/")) && u.contains(path))
        })
        .filter(|e| {
            let ts = e["requestReceivedTimestamp"].as_str().unwrap_or_default();
            ts.parse::<k8s_openapi::jiff::Timestamp>().is_ok_and(|t| SystemTime::from(t) > after)
        })
        .map(|e| (e["responseStatus"]["code"].as_i64().unwrap_or(0), e["requestURI"].as_str().unwrap_or("").into()))
        .collect()
}

/// The FailedCreate Warning Events about `cluster`.
async fn failed_create_events(client: &Client, ns: &str, cluster: &str) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let list = events.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    list.into_iter()
        .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(cluster))
        .collect()
}

/// Waits until `cluster` reports refused creates and returns the ReplicaFailure message.
async fn wait_refused(client: &Client, ns: &str, cluster: &str) -> String {
    wait_until(Duration::from_secs(30), "ReplicaFailure=True FailedCreate", || async {
        let s = status(client, ns, cluster).await?;
        let (st, reason, message) = condition(&s, "ReplicaFailure")?;
        let (ready, ready_reason, _) = condition(&s, "Ready")?;
        assert_eq!(s.message.as_deref(), Some(message.as_str()), "status.message is the refusal");
        (st == "True" && reason == "FailedCreate" && ready == "False" && ready_reason == "FailedCreate")
            .then_some(message)
    })
    .await
}

/// Refused pod creates over `window`, counted from the audit log (each is one request).
async fn refused_creates_over(ns: &str, window: Duration) -> usize {
    let t0 = SystemTime::now();
    tokio::time::sleep(window).await;
    let creates = audited(ns, "create", "/pods", t0);
    let refused = creates.iter().filter(|(code, _)| *code == 403).count();
    assert_eq!(refused, creates.len(), "every create in the window was refused: {creates:?}");
    refused
}

#[tokio::test]
async fn a_resource_quota_refuses_pods_then_lets_them_all_in_within_5s() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "quota").await;
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), &ns.name);
    let quota: ResourceQuota =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "pods"}, "spec": {"hard": {"pods": "1"}}}))
            .unwrap();
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    // Admission refuses every pod while the quota controller has not counted the namespace yet.
    wait_until(Duration::from_secs(30), "quota status", || async {
        quotas.get("pods").await.ok()?.status?.hard.map(|_| ())
    })
    .await;
    let op = OperatorProcess::start(&["--no-leader-election", "--namespaces", &ns.name, "--no-autoscaler"], &[]);
    apply_yaml(&ns.name, &manifest("q", 2, ""));

    let message = wait_refused(&client, &ns.name, "q").await;
    assert!(message.contains("exceeded quota"), "the condition names the API server's reason: {message}");
    // Head and workers are created together: whichever came first holds the quota's one pod.
    assert_eq!(pod_names(&client, &ns.name, "ray-cluster-name=q").await.len(), 1, "one pod fits the quota");

    // Bounded retries: one probe per try, tries 0.5 s apart doubling to 3 s, whatever wakes us.
    let window = Duration::from_secs(12);
    let refused = refused_creates_over(&ns.name, window).await;
    eprintln!("quota pods=1: {refused} refused pod creates in {window:?}");
    assert!((2..=8).contains(&refused), "bounded retries, not a storm (nor none): {refused} in {window:?}");

    // One Event for all the refusals, counted (reconciler::events folds repeats into a series).
    let events = failed_create_events(&client, &ns.name, "q").await;
    assert_eq!(events.len(), 1, "one aggregated FailedCreate Event: {events:#?}");
    let e = &events[0];
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    assert!(e.note.as_deref().unwrap_or_default().contains("exceeded quota"), "{:?}", e.note);
    let count = e.series.as_ref().map_or(1, |s| s.count);
    assert!(count >= 2, "the Event counts the refusals: {count}");

    // The cause goes away: every pod within 5 s, and the status forgets the refusal.
    quotas.delete("pods", &Default::default()).await.unwrap();
    let t = Instant::now();
    wait_until(Duration::from_secs(20), "head and 2 workers", || async {
        (pod_names(&client, &ns.name, "ray-cluster-name=q").await.len() == 3).then_some(())
    })
    .await;
    let took = t.elapsed();
    eprintln!("quota deleted -> all 3 pods in {took:?}");
    assert!(took <= Duration::from_secs(5), "recovery within 5 s of the quota going away, took {took:?}");
    wait_until(Duration::from_secs(30), "Running without ReplicaFailure or message", || async {
        let s = status(&client, &ns.name, "q").await?;
        (s.phase == Some(Phase::Running) && condition(&s, "ReplicaFailure").is_none() && s.message.is_none())
            .then_some(())
    })
    .await;
    assert!(op.logs().lines().any(|l| l.starts_with("q: ") && l.contains("refused")), "{}", op.logs());
    assert!(!op.logs().contains("panicked"));
}

#[tokio::test]
async fn a_restricted_namespace_refuses_pods_naming_the_violated_field() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "psa").await;
    let nss: Api<Namespace> = Api::all(client.clone());
    let label =
        |v: Option<&str>| serde_json::json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": v}}});
    nss.patch(&ns.name, &PatchParams::default(), &Patch::Merge(&label(Some("restricted")))).await.unwrap();
    let op = OperatorProcess::start(&["--no-leader-election", "--namespaces", &ns.name, "--no-autoscaler"], &[]);
    apply_yaml(&ns.name, &manifest("r", 1, ""));

    let message = wait_refused(&client, &ns.name, "r").await;
    assert!(
        message.contains("PodSecurity") && message.contains("allowPrivilegeEscalation"),
        "the condition names the violated field: {message}"
    );
    let s = status(&client, &ns.name, "r").await.expect("status");
    assert_eq!(s.phase, Some(Phase::Updating));
    assert!(pod_names(&client, &ns.name, "ray-cluster-name=r").await.is_empty());

    let window = Duration::from_secs(10);
    let refused = refused_creates_over(&ns.name, window).await;
    eprintln!("restricted namespace: {refused} refused pod creates in {window:?}");
    assert!((2..=7).contains(&refused), "no retry storm: {refused} in {window:?}");
    assert_eq!(failed_create_events(&client, &ns.name, "r").await.len(), 1, "one aggregated Event");

    // Label removed: the head and its worker follow.
    nss.patch(&ns.name, &PatchParams::default(), &Patch::Merge(&label(None))).await.unwrap();
    let t = Instant::now();
    wait_until(Duration::from_secs(20), "head and worker", || async {
        (pod_names(&client, &ns.name, "ray-cluster-name=r").await.len() == 2).then_some(())
    })
    .await;
    eprintln!("enforce label removed -> both pods in {:?}", t.elapsed());
    assert!(t.elapsed() <= Duration::from_secs(5), "recovery within 5 s, took {:?}", t.elapsed());
    assert!(!op.logs().contains("panicked"));
}

/// SIGKILLs every process whose environment holds `entry` (`KEY=value`).
fn kill_with_env(entry: &str) {
    for dir in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = dir.file_name().to_string_lossy().parse::<i32>() else { continue };
        let environ = std::fs::read(dir.path().join("environ")).unwrap_or_default();
        if environ.split(|b| *b == 0).any(|e| e == entry.as_bytes()) {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
}

async fn events_with_reason(client: &Client, ns: &str, reason: &str) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let list = events.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    list.into_iter().filter(|e| e.reason.as_deref() == Some(reason)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_and_missing_ray_nodes_are_replaced_and_a_settled_cluster_writes_nothing() {
    let bin = ray_bin();
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "raynodes").await;
    let mut ray = RayProcs::new(&bin);
    // The GCS notices a killed raylet in about a second instead of Ray's default ~30 s.
    for (k, v) in [("RAY_health_check_period_ms", "300"), ("RAY_health_check_failure_threshold", "2")] {
        ray.env.push((k.into(), v.into()));
    }
    let gcs_port = free_ports(1)[0];
    let head = ray.start_head(gcs_port);
    let gcs = format!("127.0.0.1:{gcs_port}");
    let op = OperatorProcess::start(
        &[
            "--no-leader-election",
            "--namespaces",
            &ns.name,
            "--autoscaler-interval",
            "0.5",
            // Longer than a stand-in `ray start` takes to register (about 5 s on a busy machine).
            "--worker-registration-timeout",
            "12",
            "--head-gcs-grace",
            "4",
            // The stand-in head is a local process: the annotation points the autoscaler at it.
            "--allow-gcs-address-annotation",
        ],
        &[],
    );
    let annotation = format!("cluster.ray.io/gcs-address: \"{gcs}\"");

    // 1. A settled cluster with a healthy GCS: 0 status writes in 60 s (from the audit log).
    apply_yaml(&ns.name, &manifest("settled", 0, &annotation));
    wait_until(Duration::from_secs(60), "settled: Running, AutoscalerHealthy=True", || async {
        let s = status(&client, &ns.name, "settled").await?;
        let healthy = condition(&s, "AutoscalerHealthy")?.0 == "True";
        (s.phase == Some(Phase::Running) && healthy).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t0 = SystemTime::now();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let writes = audited(&ns.name, "patch", "/rayclusters/settled/status", t0);
    eprintln!("settled cluster, healthy GCS: {} status writes in 60 s", writes.len());
    assert!(writes.is_empty(), "a settled cluster writes no status: {writes:?}");
    assert!(!audited(&ns.name, "patch", "/rayclusters/settled/status", SystemTime::UNIX_EPOCH).is_empty());
    Api::<RayCluster>::namespaced(client.clone(), &ns.name).delete("settled", &Default::default()).await.unwrap();

    // 2. Two workers: one gets a stand-in raylet, the other never registers → replaced after
    //    the registration timeout (12 s), with an Event; the registered one stays.
    apply_yaml(&ns.name, &manifest("nodes", 2, &annotation));
    let workers_sel = "ray-cluster-name=nodes,ray-node-type=worker";
    let first = wait_until(Duration::from_secs(60), "2 worker pods", || async {
        let w = pod_names(&client, &ns.name, workers_sel).await;
        (w.len() == 2).then_some(w)
    })
    .await;
    let mut it = first.iter();
    let (registered, silent) = (it.next().unwrap().clone(), it.next().unwrap().clone());
    let worker = ray.start_worker(gcs_port, &registered);
    let t = Instant::now();
    wait_until(Duration::from_secs(40), "the silent worker replaced", || async {
        let w = pod_names(&client, &ns.name, workers_sel).await;
        (!w.contains(&silent) && w.len() == 2).then_some(())
    })
    .await;
    eprintln!("never-registered worker replaced {:?} after the other one registered (timeout 12 s)", t.elapsed());
    assert!(pod_names(&client, &ns.name, workers_sel).await.contains(&registered), "the registered worker stays");
    let notes: Vec<String> = events_with_reason(&client, &ns.name, "RayNodeNotRegistered")
        .await
        .into_iter()
        .filter_map(|e| e.note)
        .collect();
    assert!(notes.iter().any(|n| n.contains(&silent)), "a Warning Event names the pod: {notes:?}");

    // 3. The registered worker's raylet dies → its node is DEAD in the GCS → pod replaced.
    ray.kill(worker);
    // Ray's daemons may leave `ray start`'s process group: find the node's by its instance id.
    kill_with_env(&format!("RAY_CLOUD_INSTANCE_ID={registered}"));
    wait_until(Duration::from_secs(30), "the killed raylet DEAD in the GCS", || async {
        let s = state(&gcs).await?;
        s.nodes.iter().any(|n| n.instance_id == registered && n.status == NodeStatus::Dead).then_some(())
    })
    .await;
    let t = Instant::now();
    wait_until(Duration::from_secs(20), "the dead worker's pod replaced", || async {
        let w = pod_names(&client, &ns.name, workers_sel).await;
        (!w.contains(&registered) && w.len() == 2).then_some(())
    })
    .await;
    eprintln!("dead Ray node -> pod replaced in {:?}", t.elapsed());
    let dead = events_with_reason(&client, &ns.name, "RayNodeDead").await;
    assert!(dead.iter().any(|e| e.note.as_deref().unwrap_or_default().contains(&registered)), "{dead:#?}");

    // 4. The GCS is killed while the head pod runs: workers are left alone while blind, and the
    //    head is recovered after the grace (4 s), autoscalerRetries + 1.
    let head_before = status(&client, &ns.name, "nodes").await.and_then(|s| s.head_pod_name).expect("head name");
    ray.kill(head);
    let _ = Command::new("pkill").args(["-9", "-f", &format!("gcs_server.*{gcs_port}")]).status();
    let t = Instant::now();
    let blind_workers = pod_names(&client, &ns.name, workers_sel).await;
    let recovered = wait_until(Duration::from_secs(40), "head recovered", || async {
        let s = status(&client, &ns.name, "nodes").await?;
        (s.autoscaler_retries >= 1 && s.head_pod_name.as_deref() != Some(head_before.as_str())).then_some(s)
    })
    .await;
    eprintln!("GCS killed -> head recovered in {:?} (grace 4 s)", t.elapsed());
    assert!(t.elapsed() >= Duration::from_secs(4), "not before the grace: {:?}", t.elapsed());
    assert!(!pod_names(&client, &ns.name, "ray-cluster-name=nodes").await.contains(&head_before));
    assert_eq!(
        pod_names(&client, &ns.name, workers_sel).await,
        blind_workers,
        "no worker deleted while the GCS could not be asked"
    );
    assert!(events_with_reason(&client, &ns.name, "GcsUnreachable").await.len() == 1, "{recovered:?}");
    let logs = op.logs();
    assert!(logs.lines().any(|l| l.starts_with("nodes: ") && l.contains("recovering the head")), "{logs}");
    assert!(!logs.contains("panicked"));
}
