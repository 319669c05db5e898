//! The README / SPEC §1 walkthrough, step by step, on a control plane of its own (the namespaced
//! overlay owns namespace `ray`): install with kubectl as a user would, run two replicas on the
//! ServiceAccount's token, and check each step's outcome — up to a rolling restart of the operator
//! that leaves every Ray pod untouched. Also: a cluster-wide configuration with only the
//! namespaced Role says clearly what is wrong.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use support::*;

const NS: &str = "ray";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cp: &PrivateControlPlane, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = cp.kubectl();
    cmd.args(args).current_dir(repo()).stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("kubectl");
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A kubeconfig with the ServiceAccount's token (what the Deployment's pods would get).
fn sa_kubeconfig(cp: &PrivateControlPlane, dir: &Path) -> PathBuf {
    let token = run(cp, &["-n", NS, "create", "token", "ray-operator-serviceaccount", "--duration=1h"], None);
    let admin = std::fs::read_to_string(&cp.cp.kubeconfig).unwrap();
    let server = admin.lines().find_map(|l| l.trim().strip_prefix("server: ")).unwrap().to_string();
    let ca = admin.lines().find_map(|l| l.trim().strip_prefix("certificate-authority: ")).unwrap().to_string();
    let path = dir.join("sa.kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: '{server}', certificate-authority: '{ca}'}}}}]\nusers: [{{name: u, user: {{token: '{}'}}}}]\ncontexts: [{{name: c, context: {{cluster: c, user: u}}}}]\ncurrent-context: c\n",
            token.trim()
        ),
    )
    .unwrap();
    path
}

/// A replica like the Deployment's: its pod name, namespace and the namespaced env.
fn replica(kubeconfig: &Path, name: &str) -> OperatorProcess {
    OperatorProcess::start_with_kubeconfig(
        kubeconfig,
        &[],
        &[("POD_NAME", name), ("POD_NAMESPACE", NS), ("RAY_OPERATOR_POD_NAMESPACE", NS)],
    )
}

async fn replica_pod(client: &Client, name: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let p: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "op", "image": "ray-operator"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &p).await.unwrap();
}

async fn holder(client: &Client) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    leases.get_opt("ray-operator-leader").await.ok()??.spec?.holder_identity.filter(|h| !h.is_empty())
}

async fn ray_pods(client: &Client, cluster: &str) -> Vec<Pod> {
    live_pods(client, NS, &format!("ray-cluster-name={cluster}")).await
}

fn uids(pods: &[Pod]) -> BTreeMap<String, String> {
    pods.iter().map(|p| (p.uid().unwrap(), p.labels()["ray-node-type"].clone())).collect()
}

/// Waits until `kubectl get rayclusters` shows the cluster Running with all workers ready.
async fn wait_running(cp: &PrivateControlPlane, client: &Client, cluster: &str, workers: usize) -> Vec<Pod> {
    wait_until(Duration::from_secs(90), &format!("{cluster} Running"), || async {
        let table = run(cp, &["-n", NS, "get", "rayclusters", cluster, "--no-headers"], None);
        let cols: Vec<&str> = table.split_whitespace().collect();
        if cols.get(1) != Some(&"Running") || cols.get(3) != Some(&format!("{workers}/{workers}").as_str()) {
            return None;
        }
        let pods = ray_pods(client, cluster).await;
        (pods.len() == workers + 1).then_some(pods)
    })
    .await
}

#[tokio::test]
async fn the_readme_walkthrough_works_step_by_step() {
    let cp = PrivateControlPlane::start();
    let client = cp.client().await;
    let dir = tempfile::tempdir().unwrap();

    // kubectl apply -f crds/cluster_crd.yaml; kubectl create namespace ray;
    // kubectl -n ray apply -k kustomize/overlays/namespaced
    run(&cp, &["apply", "-f", "crds/cluster_crd.yaml"], None);
    wait_crd_established(|| cp.kubectl());
    run(&cp, &["create", "namespace", NS], None);
    run(&cp, &["-n", NS, "apply", "-k", "kustomize/overlays/namespaced"], None);
    // The Deployment's own pods cannot run the operator here (kwok runs no containers); scale it
    // away and run its two replicas as local processes with the same identity and permissions.
    run(&cp, &["-n", NS, "scale", "deployment/ray-operator", "--replicas=0"], None);
    let kubeconfig = sa_kubeconfig(&cp, dir.path());
    let mut replicas: BTreeMap<String, OperatorProcess> = BTreeMap::new();
    for name in ["ray-operator-a", "ray-operator-b"] {
        replica_pod(&client, name).await;
        replicas.insert(name.into(), replica(&kubeconfig, name));
    }
    for r in replicas.values() {
        r.wait_ready().await;
    }

    // kubectl -n ray apply -f deploy/example_cluster.yaml (and example_cluster2.yaml)
    run(&cp, &["-n", NS, "apply", "-f", "deploy/example_cluster.yaml"], None);
    run(&cp, &["-n", NS, "apply", "-f", "deploy/example_cluster2.yaml"], None);
    let c1 = wait_running(&cp, &client, "example-cluster", 2).await;
    let c2 = wait_running(&cp, &client, "example-cluster2", 1).await;

    // kubectl -n ray get rayclusters → STATUS Running for both.
    let table = run(&cp, &["-n", NS, "get", "rayclusters"], None);
    for line in table.lines().skip(1) {
        assert_eq!(line.split_whitespace().nth(1), Some("Running"), "{table}");
    }

    // The leader's log, grepped for ^example-cluster2:, is about that cluster only.
    let leader = wait_until(Duration::from_secs(20), "leader label", || async {
        let h = holder(&client).await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
        let l = pods.list(&ListParams::default().labels("cluster.ray.io/operator-role=leader")).await.ok()?;
        (l.items.len() == 1 && l.items[0].name_any() == h).then_some(h)
    })
    .await;
    let logs = replicas[&leader].logs();
    let lines: Vec<&str> = logs.lines().filter(|l| l.starts_with("example-cluster2:")).collect();
    assert!(lines.len() >= 3, "{logs}");
    for l in &lines {
        assert!(
            !l.contains("example-cluster-ray") && !l.contains("example-cluster:"),
            "not about example-cluster2: {l}"
        );
    }

    // Edit + re-apply: example-cluster2's worker type changes → its worker replaced, head kept.
    let edited = std::fs::read_to_string(repo().join("deploy/example_cluster2.yaml")).unwrap().replace(
        r#"rayResources: {"example-resource-c": 5, "example-resource-d": 17}"#,
        r#"rayResources: {"example-resource-c": 6}"#,
    );
    run(&cp, &["-n", NS, "apply", "-f", "-"], Some(&edited));
    let c2_after = wait_until(Duration::from_secs(60), "example-cluster2 worker replaced", || async {
        let pods = wait_running(&cp, &client, "example-cluster2", 1).await;
        let now = uids(&pods);
        let before = uids(&c2);
        let heads_same = now.iter().filter(|(_, k)| *k == "head").eq(before.iter().filter(|(_, k)| *k == "head"));
        let workers_new = now.iter().filter(|(_, k)| *k == "worker").all(|(u, _)| !before.contains_key(u));
        (heads_same && workers_new).then_some(pods)
    })
    .await;

    // Add the annotation `try: again` + re-apply: example-cluster's Ray pods restart, the other's don't.
    let annotated = std::fs::read_to_string(repo().join("deploy/example_cluster.yaml"))
        .unwrap()
        .replace("  name: example-cluster\n", "  name: example-cluster\n  annotations:\n    try: again\n");
    run(&cp, &["-n", NS, "apply", "-f", "-"], Some(&annotated));
    wait_until(Duration::from_secs(90), "example-cluster restarted", || async {
        let pods = wait_running(&cp, &client, "example-cluster", 2).await;
        let now: BTreeSet<String> = uids(&pods).into_keys().collect();
        now.is_disjoint(&uids(&c1).into_keys().collect()).then_some(())
    })
    .await;
    assert_eq!(uids(&ray_pods(&client, "example-cluster2").await), uids(&c2_after), "the other cluster is untouched");

    // kubectl -n ray delete raycluster example-cluster2 → its pods and Service go.
    run(&cp, &["-n", NS, "delete", "raycluster", "example-cluster2"], None);
    let svcs: Api<Service> = Api::namespaced(client.clone(), NS);
    wait_until(Duration::from_secs(120), "example-cluster2's pods and Service gone", || async {
        let gone = ray_pods(&client, "example-cluster2").await.is_empty()
            && svcs.get_opt("example-cluster2-ray-head").await.ok()?.is_none();
        gone.then_some(())
    })
    .await;

    // Rolling restart, as the Deployment does it: a new replica starts, the old leader gets SIGTERM.
    let before = uids(&ray_pods(&client, "example-cluster").await);
    replica_pod(&client, "ray-operator-c").await;
    let fresh = replica(&kubeconfig, "ray-operator-c");
    fresh.wait_ready().await;
    replicas.insert("ray-operator-c".into(), fresh);
    let mut old = replicas.remove(&leader).unwrap();
    let t0 = Instant::now();
    old.signal("TERM");
    assert!(old.wait_exit(Duration::from_secs(10)), "old leader exits");
    let new = wait_until(Duration::from_secs(10), "a new leader", || async {
        let h = holder(&client).await?;
        (h != leader).then_some(h)
    })
    .await;
    eprintln!("rolling restart: new leader {new} after {:?}", t0.elapsed());
    assert!(replicas.contains_key(&new));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(uids(&ray_pods(&client, "example-cluster").await), before, "no Ray pod disturbed by the roll");
    // And the new leader is in charge: a new cluster comes up.
    run(&cp, &["-n", NS, "apply", "-f", "deploy/example_cluster2.yaml"], None);
    wait_running(&cp, &client, "example-cluster2", 1).await;
    assert!(
        replicas[&new].logs().lines().any(|l| l.starts_with("example-cluster2:") && l.contains("created head pod"))
    );

    // Misconfiguration: the namespaced Role with a cluster-wide configuration must say what is wrong.
    let wrong = OperatorProcess::start_with_kubeconfig(
        &kubeconfig,
        &[],
        &[("POD_NAME", "ray-operator-wrong"), ("POD_NAMESPACE", NS)],
    );
    let line = wait_until(Duration::from_secs(20), "an error naming the missing permission", || async {
        wrong.logs().lines().find(|l| l.contains("missing permission") && l.contains("level=error")).map(String::from)
    })
    .await;
    assert!(line.contains("all namespaces") && line.contains("list/watch"), "{line}");
    assert_eq!(wrong.get("/readyz").await.map(|r| r.0), Some(503), "not ready without permissions");
    drop(wrong);

    // Nothing left the machine: every GCS address any replica dialled (each link logs
    // "connecting to GCS at <addr>", failures "GCS at <addr> failed") is a loopback IP.
    let logs: String = replicas.values().map(|r| r.logs()).chain([old.logs()]).collect();
    let dialled = gcs_addresses(&logs);
    assert!(dialled.iter().any(|a| a.starts_with("127.64.")), "the links dialled the head Services: {dialled:?}");
    let outside: Vec<&String> = dialled.iter().filter(|a| !is_loopback_host_port(a)).collect();
    assert!(outside.is_empty(), "the operator dialled addresses outside 127.0.0.0/8: {outside:?}");
    // And no log line names any other IPv4 address (a Service, pod or node address off loopback).
    let named: BTreeSet<std::net::Ipv4Addr> = logs
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|t| t.trim_matches('.').parse().ok())
        .collect();
    let off: Vec<_> = named.iter().filter(|a| !a.is_loopback() && !a.is_unspecified()).collect();
    assert!(off.is_empty(), "operator logs name non-loopback addresses: {off:?}");
}

/// The `host:port` after each "GCS at " in an operator log.
fn gcs_addresses(logs: &str) -> BTreeSet<String> {
    logs.split("GCS at ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next())
        .map(|addr| addr.trim_end_matches([',', ')', ':']).to_string())
        .collect()
}

fn is_loopback_host_port(addr: &str) -> bool {
    addr.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback())
}
