//! Proof that the test control plane is real: scheduling + kwok, garbage collection, RBAC with a
//! ServiceAccount token, CRD CEL validation, and Leases.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Api, ResourceExt};
use support::*;

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap()
}

#[tokio::test]
async fn deployment_pods_reach_running_on_kwok_nodes() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "cp-deploy").await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let d: Deployment = from_json(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                          "spec": {"containers": [{"name": "c", "image": "nginx"}]}}
        }
    }));
    deploys.create(&PostParams::default(), &d).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let running = wait_until(Duration::from_secs(60), "3 running pods", || async {
        let list = pods.list(&ListParams::default().labels("app=web")).await.ok()?;
        let running: Vec<Pod> = list
            .items
            .into_iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .collect();
        (running.len() == 3).then_some(running)
    })
    .await;
    for p in running {
        let node = p.spec.unwrap().node_name.unwrap();
        assert!(node.starts_with("kwok-node-"), "scheduled onto a kwok node, got {node}");
        assert!(p.status.unwrap().pod_ip.is_some(), "kwok assigns pod IPs");
    }
}

#[tokio::test]
async fn deleting_an_owner_garbage_collects_its_dependents() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "cp-gc").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let owner = cms
        .create(&PostParams::default(), &from_json(serde_json::json!({"metadata": {"name": "owner"}})))
        .await
        .unwrap();
    let dependent: ConfigMap = from_json(serde_json::json!({"metadata": {
        "name": "dependent",
        "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                             "uid": owner.uid().unwrap(), "controller": true}]
    }}));
    cms.create(&PostParams::default(), &dependent).await.unwrap();
    // Control: the dependent stays while its owner exists.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(cms.get_opt("dependent").await.unwrap().is_some());
    cms.delete("owner", &DeleteParams::background()).await.unwrap();
    wait_until(Duration::from_secs(60), "dependent garbage-collected", || async {
        cms.get_opt("dependent").await.ok()?.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn service_account_token_is_bound_by_rbac() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "cp-rbac").await;
    let other = TestNamespace::new(&client, "cp-rbac-other").await;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns.name);
    sas.create(&PostParams::default(), &from_json(serde_json::json!({"metadata": {"name": "reader"}}))).await.unwrap();
    apply_yaml(
        &ns.name,
        &format!(
            r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: pod-reader}}
rules:
- {{apiGroups: [""], resources: [pods], verbs: [list]}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: pod-reader}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: pod-reader}}
subjects:
- {{kind: ServiceAccount, name: reader, namespace: {}}}
"#,
            ns.name
        ),
    );
    let tr: TokenRequest = from_json(serde_json::json!({"spec": {"audiences": [], "expirationSeconds": 3600}}));
    let token = sas
        .create_subresource::<TokenRequest, TokenRequest>("token", "reader", &PostParams::default(), &tr)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let sa_client = client_with_token(token.as_deref().expect("token")).await;
    // RBAC changes apply within a moment; poll until the grant is visible.
    let own: Api<Pod> = Api::namespaced(sa_client.clone(), &ns.name);
    wait_until(Duration::from_secs(10), "list pods with the SA token", || async {
        own.list(&ListParams::default()).await.ok().map(|_| ())
    })
    .await;
    let elsewhere: Api<Pod> = Api::namespaced(sa_client.clone(), &other.name);
    match elsewhere.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "forbidden in another namespace: {s:?}"),
        other => panic!("expected 403 in another namespace, got {other:?}"),
    }
    // Listing is granted, deleting is not.
    match own.delete_collection(&DeleteParams::default(), &ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403),
        other => panic!("expected 403 for delete, got {other:?}"),
    }
}

#[tokio::test]
async fn crd_cel_rule_rejects_invalid_objects_with_its_message() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "cp-cel").await;
    let group = format!("{}.cel.test", random_suffix());
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = from_json(serde_json::json!({
        "metadata": {"name": format!("widgets.{group}")},
        "spec": {
            "group": group, "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {"spec": {
                    "type": "object",
                    "x-kubernetes-validations": [{"rule": "self.min <= self.max", "message": "min must not exceed max"}],
                    "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}}
                }}
            }}}]
        }
    }));
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let name = format!("widgets.{group}");
    wait_until(Duration::from_secs(30), "CRD established", || async {
        let c = crds.get(&name).await.ok()?;
        c.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
    })
    .await;
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(&group, "v1", "Widget"), "widgets");
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &ar);
    let obj = |min: i64, max: i64, n: &str| -> DynamicObject {
        from_json(serde_json::json!({
            "apiVersion": format!("{group}/v1"), "kind": "Widget",
            "metadata": {"name": n}, "spec": {"min": min, "max": max}
        }))
    };
    widgets.create(&PostParams::default(), &obj(1, 2, "good")).await.unwrap();
    match widgets.create(&PostParams::default(), &obj(3, 2, "bad")).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422);
            assert!(s.message.contains("min must not exceed max"), "message: {}", s.message);
        }
        other => panic!("expected 422, got {other:?}"),
    }
    crds.delete(&name, &DeleteParams::default()).await.unwrap();
}

#[tokio::test]
async fn lease_can_be_created_and_updated() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "cp-lease").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let l = leases
        .create(
            &PostParams::default(),
            &from_json(serde_json::json!({"metadata": {"name": "l"},
                "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}})),
        )
        .await
        .unwrap();
    let patched = leases
        .patch(
            "l",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"holderIdentity": "b", "leaseTransitions": 1}})),
        )
        .await
        .unwrap();
    let spec = patched.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    assert_eq!(spec.lease_transitions, Some(1));
    assert_ne!(patched.metadata.resource_version, l.metadata.resource_version);
    // An update with a stale resourceVersion conflicts: the optimistic lock leader election relies on.
    let mut stale = l.clone();
    stale.spec.as_mut().unwrap().holder_identity = Some("c".into());
    match leases.replace("l", &PostParams::default(), &stale).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 409),
        other => panic!("expected 409, got {other:?}"),
    }
}

/// Nothing leaves the machine: every Service ClusterIP, pod IP, pod host IP and node address this
/// control plane hands out is loopback, so a client that dials one (the operator dials each head
/// Service's ClusterIP) cannot send a packet off the machine. Fails on a private range such as the
/// former 10.0.0.0/16 Services / 10.244.0.0/16 pods / 10.0.0.2 nodes.
#[tokio::test]
async fn every_address_the_control_plane_hands_out_is_loopback() {
    use k8s_openapi::api::core::v1::{Node, Service};
    let client = client().await;
    let ns = TestNamespace::new(&client, "cp-loopback").await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let svc: Service = from_json(serde_json::json!({
        "metadata": {"name": "probe"},
        "spec": {"selector": {"app": "probe"}, "ports": [{"name": "gcs", "port": 6379}]}
    }));
    svcs.create(&PostParams::default(), &svc).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let pod: Pod = from_json(serde_json::json!({
        "metadata": {"name": "probe", "labels": {"app": "probe"}},
        "spec": {"containers": [{"name": "c", "image": "probe"}]}
    }));
    pods.create(&PostParams::default(), &pod).await.unwrap();
    wait_until(Duration::from_secs(60), "the probe pod has an IP", || async {
        pods.get("probe").await.ok()?.status?.pod_ip
    })
    .await;

    let mut seen: std::collections::BTreeSet<(String, String)> = Default::default();
    for s in Api::<Service>::all(client.clone()).list(&ListParams::default()).await.unwrap() {
        let spec = s.spec.clone().unwrap_or_default();
        for ip in spec.cluster_ips.unwrap_or_default().into_iter().chain(spec.cluster_ip) {
            seen.insert((format!("Service {}/{} clusterIP", s.namespace().unwrap_or_default(), s.name_any()), ip));
        }
    }
    for p in Api::<Pod>::all(client.clone()).list(&ListParams::default()).await.unwrap() {
        let st = p.status.clone().unwrap_or_default();
        let what = format!("Pod {}/{}", p.namespace().unwrap_or_default(), p.name_any());
        for ip in st.pod_ips.unwrap_or_default().into_iter().map(|i| i.ip).chain(st.pod_ip) {
            seen.insert((format!("{what} podIP"), ip));
        }
        for ip in st.host_ips.unwrap_or_default().into_iter().map(|i| i.ip).chain(st.host_ip) {
            seen.insert((format!("{what} hostIP"), ip));
        }
    }
    for n in Api::<Node>::all(client.clone()).list(&ListParams::default()).await.unwrap() {
        for a in n.status.clone().unwrap_or_default().addresses.unwrap_or_default() {
            if a.type_ == "InternalIP" || a.type_ == "ExternalIP" {
                seen.insert((format!("Node {} {}", n.name_any(), a.type_), a.address));
            }
        }
    }
    assert!(seen.iter().any(|(w, _)| w.contains("probe") && w.contains("clusterIP")), "{seen:?}");
    assert!(seen.iter().any(|(w, _)| w.contains("probe podIP")), "{seen:?}");
    assert!(seen.iter().any(|(w, _)| w.starts_with("Node ")), "{seen:?}");
    let outside: Vec<_> =
        seen.iter().filter(|(_, ip)| !ip.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())).collect();
    assert!(outside.is_empty(), "addresses outside 127.0.0.0/8 (or not IPs): {outside:?}");
}

/// Every Ray process that a test, the demo or a benchmark starts keeps usage stats off, so no Ray
/// process tries to report to the internet. A source check, so that a new `ray start` (or a Ray
/// driver) written anywhere in the project is covered without anyone remembering to add it here.
#[test]
fn every_ray_process_we_start_disables_usage_stats() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![];
    let mut stack: Vec<std::path::PathBuf> = ["tests", "examples", "e2e", "src"].iter().map(|d| root.join(d)).collect();
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else if let Ok(text) = std::fs::read_to_string(&p) {
            files.push((p, text));
        }
    }
    let mut starters = 0;
    for (path, text) in &files {
        // A process is started from Rust with `Command::new(<venv>.join("ray"|"python"))`, from a
        // script with the venv's `ray start` or `python`. (`ray start` inside a RayCluster manifest
        // or a pod builder starts nothing here: Ray in containers gets the setting from its image.)
        let rust_spawn =
            text.contains("Command::new(") && (text.contains("join(\"ray\")") || text.contains("join(\"python\")"));
        let script_spawn = text.lines().any(|l| {
            let l = l.trim_start();
            !l.starts_with('#')
                && (l.contains("bin/ray\" start") || l.contains("bin/ray start") || l.starts_with("ray start"))
        });
        if !(rust_spawn || script_spawn) || path.ends_with("control_plane.rs") {
            continue;
        }
        starters += 1;
        assert!(
            text.contains("RAY_USAGE_STATS_ENABLED") && text.contains("\"0\"")
                || text.contains("RAY_USAGE_STATS_ENABLED=0"),
            "{} starts Ray but does not set RAY_USAGE_STATS_ENABLED=0",
            path.display()
        );
    }
    assert!(starters >= 3, "the check found the known Ray starters (autoscaler, ray_gcs, bench): {starters}");
}
