//! The leader-elected runtime with replicas as separate processes: one leader at a time, graceful and
//! crash failover, fencing proven from the audit log, fairness, health endpoints, namespace scopes.

mod replicas;
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use ray_operator::api::{Phase, RayCluster};
use replicas::cluster_yaml as cluster;
use support::*;

const ROLE: &str = "cluster.ray.io/operator-role";

/// Starts a replica named `name` in `ns` (its Lease and its pod live there), scoped to `ns`.
fn replica(ns: &str, name: &str, ttl: &str, renew: &str) -> OperatorProcess {
    OperatorProcess::start(
        &["--namespaces", ns, "--lease-ttl", ttl, "--lease-renew", renew],
        &[("POD_NAME", name), ("POD_NAMESPACE", ns)],
    )
}

/// A Pod object standing for a replica, so the leader can label "its" pod.
async fn replica_pod(client: &Client, ns: &str, name: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let p: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"app": "ray-operator"}},
        "spec": {"containers": [{"name": "op", "image": "ray-operator"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &p).await.unwrap();
}

/// Creates or updates a RayCluster from YAML (server-side apply: one request).
async fn put(client: &Client, ns: &str, yaml: &str) {
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), ns);
    let v: serde_json::Value = serde_yaml::from_str(yaml).unwrap();
    let name = v["metadata"]["name"].as_str().unwrap().to_string();
    rcs.patch(&name, &PatchParams::apply("leader-test").force(), &Patch::Apply(&v)).await.unwrap();
}

async fn holder(client: &Client, ns: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let l = leases.get_opt("ray-operator-leader").await.ok()??;
    l.spec?.holder_identity.filter(|h| !h.is_empty())
}

async fn labelled_leaders(client: &Client, ns: &str) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.list(&ListParams::default().labels(&format!("{ROLE}=leader")))
        .await
        .map(|l| l.items.iter().map(|p| p.name_any()).collect())
        .unwrap_or_default()
}

async fn wait_leader(client: &Client, ns: &str, not: Option<&str>) -> String {
    wait_until(Duration::from_secs(30), "a leader", || async {
        let h = holder(client, ns).await?;
        (Some(h.as_str()) != not).then_some(h)
    })
    .await
}

async fn ray_pods(client: &Client, ns: &str, cluster: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.list(&ListParams::default().labels(&format!("ray-cluster-name={cluster}"))).await.unwrap().items
}

/// Every cluster ends with exactly one head and `workers` up-to-date workers, none duplicated.
async fn assert_exact_pods(client: &Client, ns: &str, expected: &BTreeMap<String, u32>) {
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), ns);
    for (name, workers) in expected {
        wait_until(Duration::from_secs(60), &format!("{name}: 1 head + {workers} workers, settled"), || async {
            let rc = rcs.get(name).await.ok()?;
            let s = rc.status?;
            (s.phase == Some(Phase::Running) && s.observed_generation == rc.metadata.generation).then_some(())?;
            let pods: Vec<Pod> = ray_pods(client, ns, name)
                .await
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect();
            let heads = pods.iter().filter(|p| p.labels()["ray-node-type"] == "head").count();
            let ws = pods.iter().filter(|p| p.labels()["ray-node-type"] == "worker").count();
            (heads == 1 && ws == *workers as usize).then_some(())
        })
        .await;
    }
    // And it stays so: nothing is created late by a replica that should not act.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (name, workers) in expected {
        let n = ray_pods(client, ns, name).await.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).count();
        assert_eq!(n, *workers as usize + 1, "{name} has {n} pods");
    }
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::test]
async fn three_replicas_one_leader_label_and_metrics_agree() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "le-three").await;
    let names = ["op-a", "op-b", "op-c"];
    for n in names {
        replica_pod(&client, &ns.name, n).await;
    }
    let ops: Vec<OperatorProcess> = names.iter().map(|n| replica(&ns.name, n, "15", "5")).collect();
    for op in &ops {
        op.wait_ready().await;
    }
    let leader = wait_leader(&client, &ns.name, None).await;
    wait_until(Duration::from_secs(10), "leader label on the leader's pod only", || async {
        (labelled_leaders(&client, &ns.name).await == vec![leader.clone()]).then_some(())
    })
    .await;
    // Over a few seconds: always the same single leader, and the metrics agree with the Lease.
    for _ in 0..5 {
        assert_eq!(holder(&client, &ns.name).await.as_deref(), Some(leader.as_str()));
        let mut leaders = 0;
        for (n, op) in names.iter().zip(&ops) {
            let (code, body) = op.get("/metrics").await.unwrap();
            assert_eq!(code, 200);
            let g = metric(&body, "ray_operator_leader").expect("leader gauge");
            assert_eq!(g == 1.0, *n == leader, "{n}: leader gauge {g}");
            leaders += g as i32;
            let (code, _) = op.get("/readyz").await.unwrap();
            assert_eq!(code, 200, "{n} ready (standbys too)");
        }
        assert_eq!(leaders, 1);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Only the leader logs work.
    apply_yaml(&ns.name, &cluster("one", 1, "ray:1"));
    assert_exact_pods(&client, &ns.name, &BTreeMap::from([("one".to_string(), 1)])).await;
    for (n, op) in names.iter().zip(&ops) {
        let acted = op.logs().lines().any(|l| l.starts_with("one: ") && l.contains("created"));
        assert_eq!(acted, *n == leader, "{n} acted: {acted}");
    }
}

#[tokio::test]
async fn graceful_failover_ten_times_while_clusters_change() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "le-graceful").await;
    let mut next = 0;
    let mut ops: BTreeMap<String, OperatorProcess> = BTreeMap::new();
    for _ in 0..2 {
        let name = format!("op-{next}");
        next += 1;
        replica_pod(&client, &ns.name, &name).await;
        ops.insert(name.clone(), replica(&ns.name, &name, "15", "5"));
    }
    for op in ops.values() {
        op.wait_ready().await;
    }
    let mut expected = BTreeMap::new();
    let mut handovers = Vec::new();
    let mut leader = wait_leader(&client, &ns.name, None).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    for i in 0..10 {
        // A replacement replica starts first, as a rolling Deployment update would do.
        let name = format!("op-{next}");
        next += 1;
        replica_pod(&client, &ns.name, &name).await;
        let fresh = replica(&ns.name, &name, "15", "5");
        fresh.wait_ready().await;
        ops.insert(name, fresh);

        let mut old = ops.remove(&leader).unwrap();
        let t0 = Instant::now();
        old.signal("TERM");
        // Work arrives during the hand-over: a new cluster and an update of the previous one.
        // Written through the API, not kubectl: two kubectl start-ups inside the timed window
        // took seconds on a loaded machine (the figure must be the operator's).
        let cname = format!("c{i}");
        put(&client, &ns.name, &cluster(&cname, 2, "ray:1")).await;
        expected.insert(cname.clone(), 2);
        if i > 0 {
            let prev = format!("c{}", i - 1);
            put(&client, &ns.name, &cluster(&prev, 3, "ray:2")).await;
            expected.insert(prev, 3);
        }
        wait_until(Duration::from_secs(10), &format!("{cname} head created by the new leader"), || async {
            let l = pods
                .list(&ListParams::default().labels(&format!("ray-cluster-name={cname},ray-node-type=head")))
                .await
                .ok()?;
            (!l.items.is_empty()).then_some(())
        })
        .await;
        let dt = t0.elapsed();
        handovers.push(dt);
        assert!(old.wait_exit(Duration::from_secs(10)), "old leader exits after SIGTERM");
        assert!(dt < Duration::from_secs(3), "hand-over {i} took {dt:?}");
        leader = wait_leader(&client, &ns.name, None).await;
        assert!(ops.contains_key(&leader), "the new leader {leader} is a live replica");
    }
    handovers.sort();
    eprintln!(
        "graceful hand-over (SIGTERM -> new leader's first pod): p50 {:?}, max {:?}",
        handovers[handovers.len() / 2],
        handovers.last().unwrap()
    );
    assert_exact_pods(&client, &ns.name, &expected).await;
}

#[tokio::test]
async fn crash_failover_after_lease_expiry() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "le-crash").await;
    let mut ops = BTreeMap::new();
    for n in ["op-x", "op-y"] {
        replica_pod(&client, &ns.name, n).await;
        ops.insert(n.to_string(), replica(&ns.name, n, "4", "1"));
    }
    for op in ops.values() {
        op.wait_ready().await;
    }
    let leader = wait_leader(&client, &ns.name, None).await;
    apply_yaml(&ns.name, &cluster("before", 2, "ray:1"));
    assert_exact_pods(&client, &ns.name, &BTreeMap::from([("before".to_string(), 2)])).await;

    let t0 = Instant::now();
    ops.get(&leader).unwrap().signal("KILL");
    apply_yaml(&ns.name, &cluster("after", 2, "ray:1"));
    let new = wait_leader(&client, &ns.name, Some(&leader)).await;
    let took = t0.elapsed();
    eprintln!("crash hand-over (SIGKILL -> new Lease holder): {took:?} with ttl 4 s");
    assert!(took >= Duration::from_secs(2), "a standby must wait for the Lease to expire, took {took:?}");
    assert!(took < Duration::from_secs(4 + 3), "took {took:?}");
    assert_ne!(new, leader);
    assert_exact_pods(&client, &ns.name, &BTreeMap::from([("before".to_string(), 2), ("after".to_string(), 2)])).await;
    wait_until(Duration::from_secs(10), "label moved to the new leader", || async {
        (labelled_leaders(&client, &ns.name).await == vec![new.clone()]).then_some(())
    })
    .await;
}

/// Audit events (write requests) whose user agent names `replica`, received after `after`.
fn writes_by(replica: &str, after: SystemTime) -> Vec<String> {
    let text = std::fs::read_to_string(audit_log()).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["userAgent"].as_str().is_some_and(|ua| ua.contains(&format!("({replica})"))))
        .filter(|e| {
            let ts = e["requestReceivedTimestamp"].as_str().unwrap_or_default();
            ts.parse::<k8s_openapi::jiff::Timestamp>().is_ok_and(|t| SystemTime::from(t) > after)
        })
        .map(|e| format!("{} {} {}", e["verb"], e["requestURI"], e["requestReceivedTimestamp"]))
        .collect()
}

#[tokio::test]
async fn a_frozen_leader_never_writes_after_resuming() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "le-fence").await;
    let mut ops = BTreeMap::new();
    for n in ["op-f1", "op-f2"] {
        replica_pod(&client, &ns.name, n).await;
        ops.insert(n.to_string(), replica(&ns.name, n, "4", "1"));
    }
    for op in ops.values() {
        op.wait_ready().await;
    }
    let leader = wait_leader(&client, &ns.name, None).await;
    // The audit log really records this replica's writes (else the final check proves nothing).
    apply_yaml(&ns.name, &cluster("warm", 1, "ray:1"));
    assert_exact_pods(&client, &ns.name, &BTreeMap::from([("warm".to_string(), 1)])).await;
    wait_until(Duration::from_secs(10), "leader's writes in the audit log", || async {
        (!writes_by(&leader, SystemTime::UNIX_EPOCH).is_empty()).then_some(())
    })
    .await;

    // Freeze the leader in the middle of a large scale-up, so it has work queued when it wakes.
    apply_yaml(&ns.name, &cluster("big", 300, "ray:1"));
    wait_until(Duration::from_secs(10), "scale-up under way", || async {
        (ray_pods(&client, &ns.name, "big").await.len() > 1).then_some(())
    })
    .await;
    ops.get(&leader).unwrap().signal("STOP");
    let new = wait_leader(&client, &ns.name, Some(&leader)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let resumed = SystemTime::now();
    ops.get(&leader).unwrap().signal("CONT");
    tokio::time::sleep(Duration::from_secs(5)).await;
    // What the fence can promise: on waking, the old leader starts nothing new. Requests it had
    // already handed to its HTTP client before the freeze (checked against the fence per request,
    // but not yet on the wire) cannot be recalled by any client-side check: at most one pass's pod
    // creates (--create-batch, 20) may still arrive, at once. Nothing else, and nothing later.
    let late = writes_by(&leader, resumed);
    let settle = resumed + Duration::from_secs(1);
    assert!(late.len() <= 20, "the fenced leader {leader} wrote more than one batch after resuming: {late:#?}");
    assert!(
        late.iter().all(|w| w.starts_with("\"create\" \"/api/v1/namespaces/") && w.contains("/pods?")),
        "the fenced leader {leader} wrote something other than an in-flight pod create: {late:#?}"
    );
    let after_settle = writes_by(&leader, settle);
    assert!(after_settle.is_empty(), "the fenced leader {leader} kept writing after resuming: {after_settle:#?}");
    assert_exact_pods(&client, &ns.name, &BTreeMap::from([("warm".to_string(), 1), ("big".to_string(), 300)])).await;
    assert_eq!(holder(&client, &ns.name).await.as_deref(), Some(new.as_str()));
    let old_logs = ops.get(&leader).unwrap().logs();
    assert!(old_logs.contains("leadership lost"), "the old leader noticed: {old_logs}");
}

#[tokio::test]
async fn one_clusters_big_scale_up_does_not_delay_another() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "le-fair").await;
    // One shard, so fairness comes from batching, not from luck of the hash.
    let _op = OperatorProcess::start(&["--no-leader-election", "--namespaces", &ns.name, "--shards", "1"], &[]);
    apply_yaml(&ns.name, &cluster("big-a", 500, "ray:1"));
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    wait_until(Duration::from_secs(20), "A scaling", || async {
        (ray_pods(&client, &ns.name, "big-a").await.len() > 1).then_some(())
    })
    .await;
    // Created through the API (not kubectl) so the figure is the operator's, not kubectl's start-up.
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), &ns.name);
    let b: RayCluster = serde_yaml::from_str(&cluster("small-b", 1, "ray:1")).unwrap();
    let t0 = Instant::now();
    rcs.create(&PostParams::default(), &b).await.unwrap();
    wait_until(Duration::from_secs(10), "B's head pod", || async {
        let l = pods.list(&ListParams::default().labels("ray-cluster-name=small-b,ray-node-type=head")).await.ok()?;
        (!l.items.is_empty()).then_some(())
    })
    .await;
    let took = t0.elapsed();
    let a_now = ray_pods(&client, &ns.name, "big-a").await.len();
    eprintln!("fairness: B's head after {took:?} while A had {a_now}/501 pods");
    assert!(took < Duration::from_secs(2), "B waited {took:?}");
    assert!(a_now < 501, "A was still scaling when B got its head ({a_now} pods)");
    assert_exact_pods(&client, &ns.name, &BTreeMap::from([("big-a".to_string(), 500), ("small-b".to_string(), 1)]))
        .await;
}

#[tokio::test]
async fn health_endpoints_follow_the_lifecycle() {
    // Not synced: an API server that does not answer.
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("kubeconfig");
    let port = free_port();
    std::fs::write(
        &bogus,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: x, cluster: {{server: 'https://127.0.0.1:{port}', insecure-skip-tls-verify: true}}}}]\nusers: [{{name: x, user: {{token: t}}}}]\ncontexts: [{{name: x, context: {{cluster: x, user: x}}}}]\ncurrent-context: x\n"
        ),
    )
    .unwrap();
    let unsynced = OperatorProcess::start_with_kubeconfig(&bogus, &["--no-leader-election"], &[]);
    wait_until(Duration::from_secs(10), "health server", || async {
        matches!(unsynced.get("/healthz").await, Some((200, _))).then_some(())
    })
    .await;
    assert_eq!(unsynced.get("/readyz").await.unwrap().0, 503, "not ready before the caches sync");
    drop(unsynced);

    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "le-health").await;
    let mut leader_op = replica(&ns.name, "op-h1", "15", "5");
    leader_op.wait_ready().await;
    wait_until(Duration::from_secs(20), "op-h1 leads", || async {
        (holder(&client, &ns.name).await.as_deref() == Some("op-h1")).then_some(())
    })
    .await;
    let standby = replica(&ns.name, "op-h2", "15", "5");
    standby.wait_ready().await;
    let (_, m) = standby.get("/metrics").await.unwrap();
    assert_eq!(metric(&m, "ray_operator_leader"), Some(0.0));
    let m = wait_until(Duration::from_secs(5), "leader gauge 1 on the Lease holder", || async {
        let (_, m) = leader_op.get("/metrics").await?;
        (metric(&m, "ray_operator_leader") == Some(1.0)).then_some(m)
    })
    .await;
    for name in ["ray_operator_reconciles_total", "ray_operator_leader_transitions_total"] {
        assert!(m.contains(name), "{name} in /metrics:\n{m}");
    }

    // During shutdown /readyz says 503 (never 200 again), then the process exits.
    leader_op.signal("TERM");
    let mut saw_503 = false;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        // The signal is handled asynchronously: a probe racing it may still see 200, but once
        // shutdown has begun the answer is 503 until exit.
        match leader_op.get("/readyz").await {
            Some((200, _)) => assert!(!saw_503, "ready again after 503 during shutdown"),
            Some((503, _)) => saw_503 = true,
            _ => {}
        }
        if let Ok(Some(_)) = leader_op.child.try_wait() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_503, "503 during shutdown");
    assert!(leader_op.wait_exit(Duration::from_secs(5)));
    // The standby took over at once (the Lease was released).
    wait_until(Duration::from_secs(3), "standby leads", || async {
        (holder(&client, &ns.name).await.as_deref() == Some("op-h2")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn namespace_scopes() {
    install_crd();
    let client = client().await;
    let mine = TestNamespace::new(&client, "scope-mine").await;
    let other = TestNamespace::new(&client, "scope-other").await;
    // The legacy rule: RAY_OPERATOR_POD_NAMESPACE limits the operator to that namespace.
    let _op = OperatorProcess::start(&["--no-leader-election"], &[("RAY_OPERATOR_POD_NAMESPACE", &mine.name)]);
    apply_yaml(&mine.name, &cluster("here", 1, "ray:1"));
    apply_yaml(&other.name, &cluster("there", 1, "ray:1"));
    assert_exact_pods(&client, &mine.name, &BTreeMap::from([("here".to_string(), 1)])).await;
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), &other.name);
    assert!(rcs.get("there").await.unwrap().status.is_none(), "a cluster outside the scope is left untouched");
    assert!(ray_pods(&client, &other.name, "there").await.is_empty());

    // Cluster-wide (no scope) serves every namespace; on a private control plane so it cannot
    // touch other tests' clusters.
    let private = PrivateControlPlane::start();
    let pclient = private.client().await;
    let crd = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/cluster_crd.yaml");
    assert!(private.kubectl().args(["apply", "-f", crd]).status().unwrap().success());
    wait_crd_established(|| private.kubectl());
    let a = TestNamespace::new(&pclient, "cw-a").await;
    let b = TestNamespace::new(&pclient, "cw-b").await;
    let _cw = OperatorProcess::start_with_kubeconfig(&private.cp.kubeconfig, &["--no-leader-election"], &[]);
    for ns in [&a.name, &b.name] {
        let mut child =
            private.kubectl().args(["-n", ns, "apply", "-f", "-"]).stdin(std::process::Stdio::piped()).spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(cluster("x", 1, "ray:1").as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
    }
    for ns in [&a.name, &b.name] {
        assert_exact_pods(&pclient, ns, &BTreeMap::from([("x".to_string(), 1)])).await;
    }
    // The namespaces live on the private control plane; forget them instead of deleting via the
    // shared one (the private control plane is torn down anyway).
    std::mem::forget(a);
    std::mem::forget(b);
}
