//! The reconciler against the real control plane, with the operator binary running as a separate
//! process scoped to the test's namespace (so tests run in parallel without seeing each other).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use ray_operator::api::{Phase, RayCluster};
use support::*;

const EXAMPLE: &str = include_str!("../deploy/example_cluster.yaml");
const EXAMPLE2: &str = include_str!("../deploy/example_cluster2.yaml");

fn operator_for(ns: &str) -> OperatorProcess {
    OperatorProcess::start(&["--no-leader-election", "--namespaces", ns], &[])
}

async fn pods_of(client: &Client, ns: &str, cluster: &str) -> Vec<Pod> {
    live_pods(client, ns, &format!("ray-cluster-name={cluster}")).await
}

/// Waits until the cluster is Running with `workers` ready workers and returns its pods.
async fn wait_running(client: &Client, ns: &str, cluster: &str, workers: usize) -> Vec<Pod> {
    let api: Api<RayCluster> = Api::namespaced(client.clone(), ns);
    wait_until(Duration::from_secs(60), &format!("{cluster} Running with {workers} workers"), || async {
        let c = api.get(cluster).await.ok()?;
        let s = c.status?;
        if s.phase != Some(Phase::Running) || s.observed_generation != c.metadata.generation {
            return None;
        }
        let pods = pods_of(client, ns, cluster).await;
        let running =
            pods.iter().filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")).count();
        (pods.len() == workers + 1 && running == pods.len()).then_some(pods)
    })
    .await
}

fn uids(pods: &[Pod]) -> BTreeSet<String> {
    pods.iter().map(|p| p.uid().unwrap()).collect()
}

fn uids_of_kind(pods: &[Pod], kind: &str) -> BTreeSet<String> {
    pods.iter().filter(|p| p.labels()["ray-node-type"] == kind).map(|p| p.uid().unwrap()).collect()
}

#[tokio::test]
async fn both_examples_come_up_with_the_right_objects() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "rc-examples").await;
    let op = operator_for(&ns.name);
    apply_yaml(&ns.name, EXAMPLE);
    apply_yaml(&ns.name, EXAMPLE2);
    let pods1 = wait_running(&client, &ns.name, "example-cluster", 2).await;
    let pods2 = wait_running(&client, &ns.name, "example-cluster2", 1).await;

    for (cluster, pods) in [("example-cluster", &pods1), ("example-cluster2", &pods2)] {
        let rc: Api<RayCluster> = Api::namespaced(client.clone(), &ns.name);
        let rc = rc.get(cluster).await.unwrap();
        for p in pods.iter() {
            let name = p.name_any();
            let labels = p.labels();
            let kind = labels["ray-node-type"].as_str();
            assert!(name.starts_with(&format!("{cluster}-ray-{kind}-")), "pod name {name}");
            assert!(!name.starts_with(&format!("{cluster}-{cluster}")), "doubled prefix: {name}");
            assert_eq!(labels["ray-cluster-name"], cluster);
            assert_eq!(labels["ray-user-node-type"], if kind == "head" { "head-node" } else { "worker-node" });
            assert!(labels.contains_key("ray-launch-config"));
            let owners = p.owner_references();
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0].uid, rc.uid().unwrap());
            assert_eq!(owners[0].controller, Some(true));
            let c = &p.spec.as_ref().unwrap().containers[0];
            let names: Vec<&str> = c.env.as_ref().unwrap().iter().map(|e| e.name.as_str()).collect();
            for n in ["RAY_HEAD_IP", "RAY_CLOUD_INSTANCE_ID", "RAY_NODE_TYPE_NAME"] {
                assert!(names.contains(&n), "{n} missing on {name}");
            }
            let script = &c.command.as_ref().unwrap()[2];
            assert!(script.contains("ray start"), "entrypoint starts Ray: {script}");
            assert!(script.contains("exec '/bin/bash' '-c' '--' 'trap : TERM INT; sleep infinity & wait;'"));
            if kind == "head" {
                assert_eq!(labels["cluster.ray.io/component"], format!("{cluster}-ray-head"));
            }
        }
        let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);
        let svc = svcs.get(&format!("{cluster}-ray-head")).await.unwrap();
        let ports: Vec<i32> = svc.spec.unwrap().ports.unwrap().iter().map(|p| p.port).collect();
        assert_eq!(ports, vec![10001, 8265, 8000, 6379]);
        let status = rc.status.unwrap();
        assert_eq!(status.head_service_name.as_deref(), Some(format!("{cluster}-ray-head").as_str()));
        assert!(status.head_pod_name.unwrap().starts_with(&format!("{cluster}-ray-head-")));
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "True");
        let head_ready = status.conditions.iter().find(|c| c.type_ == "HeadReady").unwrap();
        assert_eq!(head_ready.status, "True");
    }

    // Printer columns.
    let table = kubectl_ok(&["-n", &ns.name, "get", "rayclusters"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "STATUS", "RESTARTS", "WORKERS", "AGE"]);
    let row = table.lines().find(|l| l.starts_with("example-cluster ")).unwrap();
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[1..4], ["Running", "0", "2/2"]);

    // Logs: lines about a cluster start with its name.
    let logs = op.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| l.starts_with("example-cluster2:")).collect();
    assert!(lines.iter().any(|l| l.contains("created head pod")), "{logs}");
    assert!(lines.iter().all(|l| !l.contains("example-cluster-ray")), "only example-cluster2's lines");
}

const TWO_TYPES: &str = r#"
apiVersion: cluster.ray.io/v1
kind: RayCluster
metadata:
  name: two-types
spec:
  maxWorkers: 10
  headPodType: head
  podTypes:
  - name: head
    podConfig:
      apiVersion: v1
      kind: Pod
      metadata: {generateName: ray-head-}
      spec:
        containers:
        - {name: ray, image: rayproject/ray:2.60.0, command: ["sleep", "infinity"]}
  - name: small
    minWorkers: 3
    maxWorkers: 5
    podConfig:
      apiVersion: v1
      kind: Pod
      metadata: {generateName: ray-small-}
      spec:
        containers:
        - {name: ray, image: rayproject/ray:2.60.0, command: ["sleep", "infinity"]}
  - name: large
    minWorkers: 2
    maxWorkers: 5
    podConfig:
      apiVersion: v1
      kind: Pod
      metadata: {generateName: ray-large-}
      spec:
        containers:
        - {name: ray, image: rayproject/ray:2.60.0, command: ["sleep", "infinity"]}
  headStartRayCommands: ["ray start --head"]
  workerStartRayCommands: ["ray start --address=$RAY_HEAD_IP:6379"]
"#;

fn of_type(pods: &[Pod], t: &str) -> BTreeSet<String> {
    pods.iter().filter(|p| p.labels()["ray-user-node-type"] == t).map(|p| p.uid().unwrap()).collect()
}

#[tokio::test]
async fn updates_replace_exactly_the_changed_pods() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "rc-update").await;
    let _op = operator_for(&ns.name);
    apply_yaml(&ns.name, TWO_TYPES);
    let before = wait_running(&client, &ns.name, "two-types", 5).await;

    // 1. One worker type changes (the `small` type's image, the manifest's second image line):
    //    only its pods are replaced.
    let small_changed = TWO_TYPES
        .replacen("- {name: ray, image: rayproject/ray:2.60.0", "- {name: ray, image: rayproject/ray:HEAD", 1)
        .replacen("- {name: ray, image: rayproject/ray:2.60.0", "- {name: ray, image: rayproject/ray:2.61.0", 1)
        .replacen("rayproject/ray:HEAD", "rayproject/ray:2.60.0", 1);
    assert_eq!(small_changed.matches("2.61.0").count(), 1);
    apply_yaml(&ns.name, &small_changed);
    let after = wait_until(Duration::from_secs(60), "small workers replaced", || async {
        let pods = wait_running(&client, &ns.name, "two-types", 5).await;
        of_type(&pods, "small").is_disjoint(&of_type(&before, "small")).then_some(pods)
    })
    .await;
    assert_eq!(uids_of_kind(&after, "head"), uids_of_kind(&before, "head"), "head untouched");
    assert_eq!(of_type(&after, "large"), of_type(&before, "large"), "other worker type untouched");
    assert_eq!(of_type(&after, "small").len(), 3);

    // 2. The head changes: only the head is replaced, the cluster goes Updating then Running.
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), &ns.name);
    let patch = serde_json::json!({"spec": {"headStartRayCommands": ["ray start --head --num-cpus=0"]}});
    rcs.patch("two-types", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let after_head = wait_until(Duration::from_secs(60), "head replaced", || async {
        let pods = wait_running(&client, &ns.name, "two-types", 5).await;
        uids_of_kind(&pods, "head").is_disjoint(&uids_of_kind(&after, "head")).then_some(pods)
    })
    .await;
    assert_eq!(uids_of_kind(&after_head, "worker"), uids_of_kind(&after, "worker"), "workers untouched");
    let rc = rcs.get("two-types").await.unwrap();
    assert_eq!(rc.status.as_ref().unwrap().autoscaler_retries, 0, "an update is not a recovery");

    // 3. A user annotation restarts every Ray pod.
    let patch = serde_json::json!({"metadata": {"annotations": {"try": "again"}}});
    rcs.patch("two-types", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let restarted = wait_until(Duration::from_secs(90), "all pods restarted", || async {
        let pods = wait_running(&client, &ns.name, "two-types", 5).await;
        uids(&pods).is_disjoint(&uids(&after_head)).then_some(pods)
    })
    .await;
    assert_eq!(restarted.len(), 6);
}

#[tokio::test]
async fn deleted_head_is_recreated_and_counted_and_deletion_collects_children() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "rc-head").await;
    let _op = operator_for(&ns.name);
    apply_yaml(&ns.name, EXAMPLE2);
    let pods = wait_running(&client, &ns.name, "example-cluster2", 1).await;
    let head = pods.iter().find(|p| p.labels()["ray-node-type"] == "head").unwrap();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    api.delete(&head.name_any(), &DeleteParams::default()).await.unwrap();

    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), &ns.name);
    let after = wait_until(Duration::from_secs(60), "new head and autoscalerRetries 1", || async {
        let rc = rcs.get("example-cluster2").await.ok()?;
        let s = rc.status?;
        if s.autoscaler_retries != 1 || s.phase != Some(Phase::Running) {
            return None;
        }
        let pods = pods_of(&client, &ns.name, "example-cluster2").await;
        let heads = uids_of_kind(&pods, "head");
        (heads.len() == 1 && !heads.contains(&head.uid().unwrap())).then_some(pods)
    })
    .await;
    assert_eq!(uids_of_kind(&after, "worker"), uids_of_kind(&pods, "worker"), "workers survive a head recovery");
    // Stays at 1: the recovery is counted once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rcs.get("example-cluster2").await.unwrap().status.unwrap().autoscaler_retries, 1);

    rcs.delete("example-cluster2", &DeleteParams::background()).await.unwrap();
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    wait_until(Duration::from_secs(90), "children garbage-collected", || async {
        let pods = pods_of(&client, &ns.name, "example-cluster2").await;
        let svc = svcs.get_opt("example-cluster2-ray-head").await.ok()?;
        (pods.is_empty() && svc.is_none()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn operator_restart_changes_nothing() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "rc-restart").await;
    let op = operator_for(&ns.name);
    apply_yaml(&ns.name, EXAMPLE);
    wait_running(&client, &ns.name, "example-cluster", 2).await;
    // Let trailing status writes settle, then snapshot.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let snapshot = |pods: Vec<Pod>| -> BTreeMap<String, String> {
        pods.into_iter().map(|p| (p.uid().unwrap(), p.resource_version().unwrap())).collect()
    };
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), &ns.name);
    let before = snapshot(pods_of(&client, &ns.name, "example-cluster").await);
    let svc_before = svcs.get("example-cluster-ray-head").await.unwrap().resource_version();
    let rc_before = rcs.get("example-cluster").await.unwrap().resource_version();
    drop(op);

    let op2 = operator_for(&ns.name);
    op2.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(snapshot(pods_of(&client, &ns.name, "example-cluster").await), before, "no pod recreated or patched");
    assert_eq!(svcs.get("example-cluster-ray-head").await.unwrap().resource_version(), svc_before);
    assert_eq!(rcs.get("example-cluster").await.unwrap().resource_version(), rc_before, "no status rewrite");
    let logs = op2.logs();
    assert!(!logs.contains("created"), "restart created something: {logs}");
}

#[tokio::test]
async fn unschedulable_worker_is_given_up_with_a_warning_event() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "rc-unsched").await;
    let _op = OperatorProcess::start(
        &["--no-leader-election", "--namespaces", &ns.name, "--unschedulable-timeout", "2"],
        &[],
    );
    // A worker type no node can take (its nodeSelector matches no node).
    let manifest = TWO_TYPES.replace("name: two-types", "name: stuck").replacen(
        "metadata: {generateName: ray-small-}\n      spec:\n",
        "metadata: {generateName: ray-small-}\n      spec:\n        nodeSelector: {no-such-label: \"true\"}\n",
        1,
    );
    assert!(manifest.contains("no-such-label"));
    apply_yaml(&ns.name, &manifest);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let first: BTreeSet<String> = wait_until(Duration::from_secs(30), "3 unschedulable small workers", || async {
        let l =
            pods.list(&ListParams::default().labels("ray-cluster-name=stuck,ray-user-node-type=small")).await.ok()?;
        let stuck: BTreeSet<String> = l
            .items
            .iter()
            .filter(|p| {
                p.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| {
                    cs.iter().any(|c| c.type_ == "PodScheduled" && c.reason.as_deref() == Some("Unschedulable"))
                })
            })
            .map(|p| p.uid().unwrap())
            .collect();
        (stuck.len() == 3).then_some(stuck)
    })
    .await;
    // Past the timeout: the launches are given up (pods deleted, Warning Events) and, as minWorkers
    // is 3, tried again with new pods.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns.name);
    wait_until(Duration::from_secs(30), "LaunchFailed warning events", || async {
        let l = events.list(&ListParams::default()).await.ok()?;
        // Repeats of one reason on one object are folded into an Event series (reconciler::events):
        // count occurrences, not objects.
        let n: i32 = l
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some("LaunchFailed"))
            .map(|e| e.series.as_ref().map_or(1, |s| s.count))
            .sum();
        (n >= 3).then_some(())
    })
    .await;
    wait_until(Duration::from_secs(30), "replacement pods", || async {
        let l =
            pods.list(&ListParams::default().labels("ray-cluster-name=stuck,ray-user-node-type=small")).await.ok()?;
        let now: BTreeSet<String> =
            l.items.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).map(|p| p.uid().unwrap()).collect();
        (now.len() == 3 && now.is_disjoint(&first)).then_some(())
    })
    .await;
    // The schedulable type is unaffected.
    let large =
        pods.list(&ListParams::default().labels("ray-cluster-name=stuck,ray-user-node-type=large")).await.unwrap();
    assert_eq!(large.items.len(), 2);
}

/// The operator's Event publisher against the API server: repeats of one (object, type, reason)
/// are one Event whose `series.count` rises; an Event that went away starts a new series; another
/// reason, or another object, is an Event of its own.
#[tokio::test]
async fn repeated_events_fold_into_one_counted_event_and_a_deleted_one_starts_afresh() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::api::events::v1::Event;
    use kube::Resource;
    use kube::api::PostParams;
    use ray_operator::reconciler::{Events, Occurrence, Reporter};

    let client = client().await;
    let ns = TestNamespace::new(&client, "rc-events").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let mut refs = Vec::new();
    for name in ["a", "b"] {
        let cm = ConfigMap {
            metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
            ..Default::default()
        };
        refs.push(cms.create(&PostParams::default(), &cm).await.unwrap().object_ref(&()));
    }
    let events = Events::new(client.clone(), Reporter { controller: "ray-operator".into(), instance: "test".into() });
    let refused = Occurrence { warning: true, reason: "FailedCreate", note: "exceeded quota".into() };
    for _ in 0..3 {
        events.publish(&refs[0], &refused).await.unwrap();
    }
    events.publish(&refs[0], &Occurrence { warning: false, reason: "Created", note: "created".into() }).await.unwrap();
    events.publish(&refs[1], &refused).await.unwrap();

    let api: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let list = |reason: &'static str, object: &'static str| {
        let api = api.clone();
        async move {
            let l = api.list(&ListParams::default()).await.unwrap();
            l.items
                .into_iter()
                .filter(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(object)
                })
                .collect::<Vec<_>>()
        }
    };
    let a = list("FailedCreate", "a").await;
    assert_eq!(a.len(), 1, "three occurrences, one Event: {a:#?}");
    assert_eq!(a[0].series.as_ref().map(|s| s.count), Some(3), "{:?}", a[0].series);
    assert_eq!(a[0].type_.as_deref(), Some("Warning"));
    assert_eq!(a[0].note.as_deref(), Some("exceeded quota"));
    assert_eq!(a[0].reporting_controller.as_deref(), Some("ray-operator"));
    assert_eq!(a[0].reporting_instance.as_deref(), Some("test"));
    let created = list("Created", "a").await;
    assert_eq!((created.len(), created[0].series.is_none()), (1, true), "{created:#?}");
    assert_eq!(list("FailedCreate", "b").await.len(), 1);
    assert_eq!(events.series_len(), 3);

    // The Event is deleted (as the API server's TTL does after an hour): the next occurrence
    // creates a new one rather than failing to count into the old.
    api.delete(&a[0].name_any(), &DeleteParams::default()).await.unwrap();
    events.publish(&refs[0], &refused).await.unwrap();
    let again = list("FailedCreate", "a").await;
    assert_eq!(again.len(), 1, "{again:#?}");
    assert_ne!(again[0].name_any(), a[0].name_any());
    assert!(again[0].series.is_none(), "a new series: {:?}", again[0].series);
}
