//! API server and etcd restarts, and forbidden watches (issue 14, item 5): the operator's watches
//! come back promptly after kube-apiserver restarts and after etcd stalls, and a replica that may
//! not watch its resources neither takes the Lease nor ignores SIGTERM.

mod replicas;
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use replicas::*;
use support::*;

/// From creating a cluster to its head and worker pods existing.
async fn time_to_pods(client: &Client, ns: &str, name: &str, workers: u32) -> Duration {
    let t0 = Instant::now();
    put_cluster(client, ns, name, workers, "ray:1").await;
    wait_until(Duration::from_secs(60), &format!("{name}: its pods"), || async {
        let (h, w) = counts(client, ns, name).await;
        (h == 1 && w == workers as usize).then_some(())
    })
    .await;
    t0.elapsed()
}

fn readyz(private: &PrivateControlPlane) -> bool {
    private
        .kubectl()
        .args(["--request-timeout=2s", "get", "--raw", "/readyz"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One private control plane (its API server and etcd are restarted and paused), one leader-elected
/// replica with the default Lease settings: (1) kube-apiserver restarted: a cluster created right
/// after /readyz has its pods within 5 s; (2) etcd frozen for 20 s: the operator survives and a
/// cluster created after etcd resumes has its pods within 5 s.
#[tokio::test]
async fn api_server_restart_and_etcd_pause() {
    let private = PrivateControlPlane::start();
    let client = private.client().await;
    let crd = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/cluster_crd.yaml");
    assert!(private.kubectl().args(["apply", "-f", crd]).status().unwrap().success());
    wait_crd_established(|| private.kubectl());
    let ns = "recovery";
    let nss: Api<Namespace> = Api::all(client.clone());
    let n: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap();
    nss.create(&PostParams::default(), &n).await.unwrap();
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    wait_until(Duration::from_secs(30), "default ServiceAccount", || async {
        sas.get_opt("default").await.ok().flatten().map(|_| ())
    })
    .await;
    let mut op = replica_with(&private.cp.kubeconfig, ns, "op-r", &["--namespaces", ns]);
    op.wait_ready().await;
    wait_leader(&client, ns, None, Duration::from_secs(30)).await;
    let warm = time_to_pods(&client, ns, "before", 2).await;
    eprintln!("recovery: a cluster's pods before any restart: {warm:?}");

    // (1) kube-apiserver restart.
    let t = Instant::now();
    let out = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/cluster"))
        .arg("restart-apiserver")
        .env("CP_DIR", private.dir())
        .status()
        .unwrap();
    assert!(out.success(), "e2e/cluster restart-apiserver");
    eprintln!("recovery: kube-apiserver restarted and ready in {:?}", t.elapsed());
    let took = time_to_pods(&client, ns, "after-apiserver", 2).await;
    eprintln!("recovery: RayCluster created right after /readyz got its pods in {took:?} (target <= 5 s)");
    assert!(took <= Duration::from_secs(5), "pods {took:?} after the apiserver restart");
    assert!(op.child.try_wait().unwrap().is_none(), "the operator survived the apiserver restart");

    // (2) etcd frozen for 20 s: requests hang, the Lease cannot be renewed (the replica fences
    // itself), watches see nothing.
    let etcd = component_pid(private.dir(), "etcd");
    signal_group(etcd, "STOP");
    let frozen = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    signal_group(etcd, "CONT");
    eprintln!("recovery: etcd frozen for {:?}", frozen.elapsed());
    wait_until(Duration::from_secs(60), "/readyz after etcd resumed", || async { readyz(&private).then_some(()) })
        .await;
    let took = time_to_pods(&client, ns, "after-etcd", 2).await;
    eprintln!("recovery: RayCluster created after etcd resumed got its pods in {took:?} (target <= 5 s)");
    assert!(took <= Duration::from_secs(5), "pods {took:?} after the etcd pause");
    assert!(op.child.try_wait().unwrap().is_none(), "the operator survived the etcd pause");
    let logs = op.logs();
    assert!(!logs.contains("panicked"), "no panic: {logs}");
    assert_exact(
        &client,
        ns,
        &BTreeMap::from([("before".into(), 2), ("after-apiserver".into(), 2), ("after-etcd".into(), 2)]),
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await;
    op.signal("TERM");
    assert!(op.wait_exit(Duration::from_secs(5)), "exits on SIGTERM after the restarts");
}

/// A replica whose ServiceAccount may use the Lease but not watch RayClusters, pods and Services:
/// it reports not ready, never takes the Lease, and exits promptly on SIGTERM. Once the
/// permission is granted, the same kind of replica takes the Lease (so the first half is not
/// vacuous).
#[tokio::test]
async fn forbidden_watches_neither_take_the_lease_nor_block_sigterm() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "rc-forbidden").await;
    let sa: ServiceAccount = serde_json::from_value(serde_json::json!({"metadata": {"name": "op"}})).unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), &ns.name).create(&PostParams::default(), &sa).await.unwrap();
    let role = |name: &str, rules: serde_json::Value| -> Role {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "rules": rules})).unwrap()
    };
    let binding = |name: &str| -> RoleBinding {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": ns.name}]
        }))
        .unwrap()
    };
    let roles: Api<Role> = Api::namespaced(client.clone(), &ns.name);
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &ns.name);
    let pp = PostParams::default();
    roles
        .create(
            &pp,
            &role(
                "lease",
                serde_json::json!([
                    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "list", "watch", "create", "update", "patch"]},
                    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]},
                ]),
            ),
        )
        .await
        .unwrap();
    bindings.create(&pp, &binding("lease")).await.unwrap();
    let token = kubectl_ok(&["-n", &ns.name, "create", "token", "op", "--duration=1h"]);
    let dir = tempfile::tempdir().unwrap();
    let kc = token_kubeconfig(&control_plane().kubeconfig, &token, dir.path());
    let args = ["--namespaces", &ns.name, "--lease-ttl", "2", "--lease-renew", "0.5"];

    let mut a = replica_with(&kc, &ns.name, "op-a", &args);
    wait_until(Duration::from_secs(20), "op-a says it is forbidden", || async {
        matches!(a.get("/readyz").await, Some((503, body)) if body.contains("forbidden")).then_some(())
    })
    .await;
    // Well past a ttl: a replica that could take the Lease would have.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(holder(&client, &ns.name).await, None, "a replica that cannot watch must not take the Lease");
    assert!(a.logs().contains("missing permission"), "it says why: {}", a.logs());
    let t0 = Instant::now();
    a.signal("TERM");
    assert!(a.wait_exit(Duration::from_secs(3)), "op-a did not exit within 3 s of SIGTERM");
    eprintln!("forbidden: no Lease taken in 4 s; SIGTERM -> exit in {:?}", t0.elapsed());

    // Granted: a replica now leads (and the one that was forbidden-then-permitted would too).
    let mut b = replica_with(&kc, &ns.name, "op-b", &args);
    wait_until(Duration::from_secs(20), "op-b says it is forbidden", || async {
        matches!(b.get("/readyz").await, Some((503, _))).then_some(())
    })
    .await;
    roles
        .patch(
            "watch",
            &PatchParams::apply("recovery-test").force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "watch"},
                "rules": [
                    {"apiGroups": ["cluster.ray.io"], "resources": ["rayclusters"], "verbs": ["get", "list", "watch"]},
                    {"apiGroups": [""], "resources": ["pods", "services"], "verbs": ["list", "watch"]},
                ]
            })),
        )
        .await
        .unwrap();
    bindings.create(&pp, &binding("watch")).await.unwrap();
    let t0 = Instant::now();
    wait_until(Duration::from_secs(20), "op-b leads once permitted", || async {
        (holder(&client, &ns.name).await.as_deref() == Some("op-b")).then_some(())
    })
    .await;
    eprintln!("forbidden: permission granted -> op-b holds the Lease in {:?}", t0.elapsed());
    b.signal("TERM");
    assert!(b.wait_exit(Duration::from_secs(5)));
    wait_until(Duration::from_secs(5), "op-b released the Lease", || async {
        holder(&client, &ns.name).await.is_none().then_some(())
    })
    .await;
}
