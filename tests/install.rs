//! The install: kustomize overlays, `deploy/operator.yaml`, the Dockerfile, and that the namespaced
//! Role really is enough for the operator (it runs with the ServiceAccount's token).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::Api;
use kube::api::PostParams;
use ray_operator::api::{Phase, RayCluster};
use serde::Deserialize;
use serde_json::{Value, json};
use support::*;

/// The namespace the `namespaced` overlay installs into.
const NS: &str = "ray";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// `kubectl kustomize <dir>` (kustomize built into the control plane's kubectl).
fn render(dir: &Path) -> String {
    kubectl_ok(&["kustomize", dir.to_str().unwrap()])
}

fn render_overlay(name: &str) -> String {
    render(&repo().join("kustomize/overlays").join(name))
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(objs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objs.iter().filter(|o| o["kind"] == kind).collect()
}

fn one<'a>(objs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(objs, kind);
    assert_eq!(found.len(), 1, "expected exactly one {kind}, found {}", found.len());
    found[0]
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default()
}

/// (apiGroup, resource, verb) triples granted by a Role or ClusterRole (resourceNames ignored).
fn grants(role: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        for g in strs(&rule["apiGroups"]) {
            for r in strs(&rule["resources"]) {
                for v in strs(&rule["verbs"]) {
                    out.insert((g.clone(), r.clone(), v));
                }
            }
        }
    }
    out
}

fn container(deploy: &Value) -> &Value {
    let cs = deploy["spec"]["template"]["spec"]["containers"].as_array().expect("containers");
    assert_eq!(cs.len(), 1, "one container");
    &cs[0]
}

fn env_names(c: &Value) -> Vec<String> {
    c["env"].as_array().map(|a| a.iter().map(|e| e["name"].as_str().unwrap().to_string()).collect()).unwrap_or_default()
}

fn env_field_ref(c: &Value, name: &str) -> Option<String> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)?["valueFrom"]["fieldRef"]["fieldPath"]
        .as_str()
        .map(String::from)
}

/// `deploy/operator.yaml` without its leading comment block.
fn operator_yaml_body() -> String {
    let text = read("deploy/operator.yaml");
    let mut lines = text.lines().peekable();
    while lines.peek().is_some_and(|l| l.starts_with('#') || l.trim().is_empty()) {
        lines.next();
    }
    lines.map(|l| format!("{l}\n")).collect()
}

#[test]
fn deploy_operator_yaml_is_the_rendered_namespaced_overlay() {
    let rendered = render_overlay("namespaced");
    assert!(
        operator_yaml_body() == rendered,
        "deploy/operator.yaml differs from `kubectl kustomize kustomize/overlays/namespaced`; regenerate it \
         (keeping its comment header) with:\n  \
         {{ sed -n '/^#/p;/^#/!q' deploy/operator.yaml; kubectl kustomize kustomize/overlays/namespaced; }} > /tmp/op.yaml \
         && mv /tmp/op.yaml deploy/operator.yaml"
    );
}

#[test]
fn the_cluster_wide_overlay_carries_the_generated_crd() {
    assert!(
        read("kustomize/crd/cluster_crd.yaml") == read("crds/cluster_crd.yaml"),
        "kustomize/crd/cluster_crd.yaml differs from crds/cluster_crd.yaml: cp crds/cluster_crd.yaml kustomize/crd/"
    );
    let cw = docs(&render_overlay("cluster-wide"));
    let crd = one(&cw, "CustomResourceDefinition");
    assert_eq!(crd["metadata"]["name"], "rayclusters.cluster.ray.io");
    // The namespaced install leaves the CRD to a cluster admin, as the legacy docs did.
    assert!(of_kind(&docs(&render_overlay("namespaced")), "CustomResourceDefinition").is_empty());
}

const ALLOWED_RESOURCES: [&str; 7] =
    ["rayclusters", "rayclusters/status", "rayclusters/finalizers", "pods", "services", "events", "leases"];

fn assert_least_privilege(overlay: &str, role: &Value) {
    let name = role["metadata"]["name"].as_str().unwrap();
    for rule in role["rules"].as_array().unwrap() {
        for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
            assert!(!strs(&rule[field]).iter().any(|s| s.contains('*')), "{overlay}: wildcard in {name}: {rule}");
        }
        assert!(rule.get("nonResourceURLs").is_none(), "{overlay}: {name} grants nonResourceURLs");
        for r in strs(&rule["resources"]) {
            assert!(r != "secrets" && r != "pods/exec", "{overlay}: {name} grants {r}");
            assert!(ALLOWED_RESOURCES.contains(&r.as_str()), "{overlay}: {name} grants unexpected resource {r}");
        }
        for v in strs(&rule["verbs"]) {
            assert!(
                ["get", "list", "watch", "create", "patch", "update", "delete"].contains(&v.as_str()),
                "{overlay}: {name} grants verb {v}"
            );
        }
    }
    for (g, r, v) in grants(role) {
        // update exists only for blockOwnerDeletion; status and Services are written by patch/apply.
        if v == "update" {
            assert_eq!((g.as_str(), r.as_str()), ("cluster.ray.io", "rayclusters/finalizers"), "{overlay}: {name}");
        }
        if r == "secrets" || r.starts_with("pods/") {
            panic!("{overlay}: {name} grants {r}");
        }
    }
}

#[test]
fn rbac_is_least_privilege_and_the_same_in_both_overlays() {
    let ns = docs(&render_overlay("namespaced"));
    let cw = docs(&render_overlay("cluster-wide"));

    // Namespaced: the operator_configs names, everything in `ray`, one Role.
    let sa = one(&ns, "ServiceAccount");
    assert_eq!(sa["metadata"]["name"], "ray-operator-serviceaccount");
    let role = one(&ns, "Role");
    assert_eq!(role["metadata"]["name"], "ray-operator-role");
    let rb = one(&ns, "RoleBinding");
    assert_eq!(rb["metadata"]["name"], "ray-operator-rolebinding");
    assert_eq!(rb["roleRef"]["name"], "ray-operator-role");
    assert_eq!(rb["subjects"][0]["name"], "ray-operator-serviceaccount");
    assert!(of_kind(&ns, "ClusterRole").is_empty() && of_kind(&ns, "ClusterRoleBinding").is_empty());
    for o in &ns {
        assert_eq!(o["metadata"]["namespace"], NS, "namespaced overlay: {} not in {NS}", o["kind"]);
    }
    assert_least_privilege("namespaced", role);

    // Cluster-wide: ClusterRole for RayClusters and children everywhere, a Role for the Lease and
    // the leader label in the operator's own namespace, which is not `default`.
    let sa = one(&cw, "ServiceAccount");
    let op_ns = sa["metadata"]["namespace"].as_str().expect("ServiceAccount namespace");
    assert_ne!(op_ns, "default", "legacy issue #15652: the ServiceAccount must not be hard-coded in default");
    assert_eq!(one(&cw, "Namespace")["metadata"]["name"], op_ns);
    let crb = one(&cw, "ClusterRoleBinding");
    let cr = one(&cw, "ClusterRole");
    assert_eq!(crb["roleRef"]["name"], cr["metadata"]["name"]);
    assert_eq!(crb["subjects"].as_array().unwrap().len(), 1);
    assert_eq!(crb["subjects"][0]["kind"], "ServiceAccount");
    assert_eq!(crb["subjects"][0]["name"], sa["metadata"]["name"]);
    assert_eq!(crb["subjects"][0]["namespace"], op_ns, "ClusterRoleBinding subject follows the overlay's namespace");
    let le = one(&cw, "Role");
    let le_rb = one(&cw, "RoleBinding");
    assert_eq!(le_rb["roleRef"]["name"], le["metadata"]["name"]);
    assert_eq!(le_rb["subjects"][0]["namespace"], op_ns);
    for kind in ["Role", "RoleBinding", "Deployment", "Service", "PodDisruptionBudget"] {
        assert_eq!(one(&cw, kind)["metadata"]["namespace"], op_ns, "{kind}");
    }
    assert_least_privilege("cluster-wide", cr);
    assert_least_privilege("cluster-wide", le);
    // Cluster-wide, pods are only patched in the operator's own namespace (its own pod's label),
    // and Leases are never granted cluster-wide.
    assert!(!grants(cr).iter().any(|(_, r, v)| (r == "pods" && v == "patch") || r == "leases"));

    // Both overlays grant the same things; only the scope differs.
    let mut cw_grants = grants(cr);
    cw_grants.extend(grants(le));
    assert_eq!(grants(role), cw_grants, "the namespaced Role and the cluster-wide ClusterRole + Role differ");
    // The Lease rules name the operator's Lease (create cannot be limited by name).
    for r in [role, le] {
        for rule in r["rules"].as_array().unwrap() {
            if strs(&rule["resources"]) == ["leases"] && strs(&rule["verbs"]) != ["create"] {
                assert_eq!(strs(&rule["resourceNames"]), ["ray-operator-leader"]);
            }
        }
    }

    // Scope: RAY_OPERATOR_POD_NAMESPACE only in the namespaced install.
    let c = container(one(&ns, "Deployment"));
    assert_eq!(env_field_ref(c, "RAY_OPERATOR_POD_NAMESPACE").as_deref(), Some("metadata.namespace"));
    assert!(!env_names(container(one(&cw, "Deployment"))).contains(&"RAY_OPERATOR_POD_NAMESPACE".to_string()));
}

/// The Dockerfile's instructions (continuation lines joined), e.g. ("USER", "65532:65532").
fn dockerfile() -> Vec<(String, String)> {
    let text = read("Dockerfile");
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        if let Some(s) = t.strip_suffix('\\') {
            cur.push_str(s);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (ins, rest) = cur.split_once(char::is_whitespace).unwrap_or((&cur, ""));
        out.push((ins.to_ascii_uppercase(), rest.trim().to_string()));
        cur.clear();
    }
    out
}

fn json_array(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_else(|_| panic!("exec form (JSON array) expected: {s}"))
}

#[test]
fn deployment_is_hardened_and_matches_the_dockerfile() {
    let objs = docs(&render_overlay("namespaced"));
    let d = one(&objs, "Deployment");
    let spec = &d["spec"];
    assert_eq!(d["metadata"]["name"], "ray-operator");
    assert_eq!(spec["replicas"], 2);
    assert_eq!(spec["strategy"]["type"], "RollingUpdate");
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxSurge"], 1);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "ray-operator-serviceaccount");
    let grace = pod["terminationGracePeriodSeconds"].as_i64().expect("terminationGracePeriodSeconds");
    assert!((10..=120).contains(&grace), "grace period {grace}");
    let labels = spec["template"]["metadata"]["labels"].as_object().unwrap();
    for (k, v) in spec["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(labels.get(k), Some(v), "selector label {k}");
    }

    let c = container(d);
    assert_eq!(env_field_ref(c, "POD_NAME").as_deref(), Some("metadata.name"));
    assert_eq!(env_field_ref(c, "POD_NAMESPACE").as_deref(), Some("metadata.namespace"));
    let ports = c["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1);
    let port = ports[0]["containerPort"].as_i64().unwrap();
    let port_name = ports[0]["name"].as_str().unwrap();
    let addr = c["env"].as_array().unwrap().iter().find(|e| e["name"] == "RAY_OPERATOR_HEALTH_ADDR");
    if let Some(a) = addr {
        assert!(a["value"].as_str().unwrap().ends_with(&format!(":{port}")), "health addr vs containerPort");
    } else {
        assert_eq!(port, 8080, "the default --health-addr port");
    }
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        let p = &c[probe]["httpGet"]["port"];
        assert!(p == port_name || p == port, "{probe} port {p}");
    }
    for kind in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(c["resources"][kind][r].is_string(), "resources.{kind}.{r}");
        }
    }
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);

    // PodDisruptionBudget keeps one replica through voluntary disruptions.
    let pdb = one(&objs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(labels.get(k), Some(v), "PDB selector label {k}");
    }
    // The metrics Service reaches the health server's port.
    let svc = one(&objs, "Service");
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(labels.get(k), Some(v), "Service selector label {k}");
    }
    let sp = &svc["spec"]["ports"][0];
    assert!(sp["targetPort"] == port_name || sp["targetPort"] == port, "metrics Service targetPort");

    // The image: built by cargo in one stage, only the binary in a distroless/static runtime stage
    // that runs as a numeric non-root user; same binary path and port as the Deployment.
    let df = dockerfile();
    let froms: Vec<&String> = df.iter().filter(|(i, _)| i == "FROM").map(|(_, a)| a).collect();
    assert!(froms.len() >= 2, "multi-stage Dockerfile");
    let runtime = froms.last().unwrap();
    assert!(
        runtime.contains("distroless") || runtime.starts_with("scratch"),
        "runtime image is distroless or scratch: {runtime}"
    );
    assert!(
        df.iter().any(|(i, a)| i == "RUN" && a.contains("cargo build --locked --release")),
        "the build runs `cargo build --locked --release`"
    );
    let last_from = df.iter().rposition(|(i, _)| i == "FROM").unwrap();
    let runtime_stage = &df[last_from..];
    assert!(!runtime_stage.iter().any(|(i, _)| i == "RUN"), "the runtime stage needs no shell (no RUN)");
    let user = runtime_stage.iter().rev().find(|(i, _)| i == "USER").map(|(_, a)| a.clone()).expect("USER");
    let uid = user.split(':').next().unwrap();
    let uid: u32 = uid.parse().unwrap_or_else(|_| panic!("USER must be numeric (runAsNonRoot checks it): {user}"));
    assert_ne!(uid, 0, "USER must not be root");
    let entrypoint =
        runtime_stage.iter().find(|(i, _)| i == "ENTRYPOINT").map(|(_, a)| json_array(a)).expect("ENTRYPOINT");
    let command = strs(&c["command"]);
    assert_eq!(entrypoint, command, "Dockerfile ENTRYPOINT vs Deployment command");
    let binary = &command[0];
    assert!(binary.ends_with("/ray-operator"), "binary {binary}");
    assert!(
        runtime_stage.iter().any(|(i, a)| i == "COPY" && a.contains("--from=") && a.ends_with(binary.as_str())),
        "the runtime stage copies the built binary to {binary}"
    );
    assert_eq!(strs(&c["args"]), ["run"]);
    if let Some((_, cmd)) = runtime_stage.iter().find(|(i, _)| i == "CMD") {
        assert_eq!(json_array(cmd), ["run"]);
    }
    let exposed: Vec<String> = runtime_stage.iter().filter(|(i, _)| i == "EXPOSE").map(|(_, a)| a.clone()).collect();
    assert!(exposed.iter().any(|e| e.split('/').next() == Some(&port.to_string())), "EXPOSE {port}: {exposed:?}");
    let ignore = read(".dockerignore");
    let ignored: Vec<&str> = ignore.lines().map(|l| l.trim().trim_matches('/')).collect();
    assert!(ignored.contains(&"target"), ".dockerignore leaves out target/");
    for needed in ["src", "proto", "build.rs", "Cargo.toml", "Cargo.lock"] {
        assert!(!ignored.contains(&needed), ".dockerignore must keep {needed}: the build needs it");
    }
}

/// Creates namespace `ray` if needed and applies the namespaced install for real, once per run:
/// first the legacy path (`kubectl -n ray apply -f deploy/operator.yaml`), then the overlay.
async fn install_namespaced() {
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let client = client().await;
        let nss: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap();
        // Exists already (fine), is being deleted (wait it out), or is created here.
        wait_until(Duration::from_secs(120), "namespace ray (not terminating)", || async {
            match nss.get_opt(NS).await.ok()? {
                Some(n) if n.metadata.deletion_timestamp.is_none() => Some(()),
                Some(_) => None,
                None => match nss.create(&PostParams::default(), &ns).await {
                    Ok(_) => Some(()),
                    Err(kube::Error::Api(s)) if s.code == 409 => None,
                    Err(e) => panic!("create namespace {NS}: {e}"),
                },
            }
        })
        .await;
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), NS);
        wait_until(Duration::from_secs(30), "default ServiceAccount in ray", || async {
            sas.get_opt("default").await.ok().flatten().map(|_| ())
        })
        .await;
        let operator_yaml = repo().join("deploy/operator.yaml");
        kubectl_ok(&["-n", NS, "apply", "-f", operator_yaml.to_str().unwrap()]);
        let overlay = repo().join("kustomize/overlays/namespaced");
        kubectl_ok(&["-n", NS, "apply", "-k", overlay.to_str().unwrap()]);
    })
    .await;
}

/// A kustomization in a temp dir that puts the cluster-wide overlay into `namespace`, as
/// docs/install.md tells users to (the `replacements` block carries the subject's namespace).
fn cluster_wide_into(namespace: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    // kustomize wants a relative path to the base.
    let depth = dir.path().components().count() - 1;
    let overlay = repo().join("kustomize/overlays/cluster-wide");
    let rel = format!("{}{}", "../".repeat(depth), overlay.to_str().unwrap().trim_start_matches('/'));
    let k = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: {namespace}
resources:
- {rel}
replacements:
- source: {{kind: ServiceAccount, name: ray-operator-serviceaccount, fieldPath: metadata.namespace}}
  targets:
  - select: {{kind: ClusterRoleBinding, name: ray-operator-clusterrolebinding}}
    fieldPaths: [\"subjects.[name=ray-operator-serviceaccount].namespace\"]
"
    );
    std::fs::write(dir.path().join("kustomization.yaml"), k).unwrap();
    dir
}

#[tokio::test]
async fn both_overlays_apply_to_a_real_api_server() {
    install_crd();
    install_namespaced().await;
    // The Deployment is valid and (with kwok's fake kubelets) rolls out.
    kubectl_ok(&["-n", NS, "rollout", "status", "deploy/ray-operator", "--timeout=90s"]);
    let pdb = kubectl_ok(&["-n", NS, "get", "pdb", "ray-operator", "-o", "jsonpath={.spec.minAvailable}"]);
    assert_eq!(pdb, "1");

    // Cluster-wide, into a fresh namespace: rendered, then applied with a server-side dry run (it
    // carries cluster-scoped objects and the CRD that other tests share).
    let client = client().await;
    let ns = TestNamespace::new(&client, "install-cw").await;
    let dir = cluster_wide_into(&ns.name);
    let objs = docs(&render(dir.path()));
    assert_eq!(one(&objs, "ServiceAccount")["metadata"]["namespace"], ns.name);
    assert_eq!(one(&objs, "ClusterRoleBinding")["subjects"][0]["namespace"], ns.name);
    assert_eq!(one(&objs, "RoleBinding")["subjects"][0]["namespace"], ns.name);
    assert_eq!(one(&objs, "Namespace")["metadata"]["name"], ns.name);
    let out = kubectl_ok(&["apply", "--dry-run=server", "-k", dir.path().to_str().unwrap()]);
    for what in [
        "customresourcedefinition.apiextensions.k8s.io/rayclusters.cluster.ray.io",
        "clusterrole.rbac.authorization.k8s.io/ray-operator-clusterrole",
        "clusterrolebinding.rbac.authorization.k8s.io/ray-operator-clusterrolebinding",
        "deployment.apps/ray-operator",
        "poddisruptionbudget.policy/ray-operator",
        "service/ray-operator-metrics",
    ] {
        assert!(out.contains(what), "dry-run apply did not include {what}:\n{out}");
    }

    // Clean up the fake replicas; the RBAC stays for the test below.
    kubectl_ok(&["-n", NS, "delete", "deploy/ray-operator", "--ignore-not-found", "--wait=false"]);
}

/// Runs kubectl commands when dropped (cleanup that also happens when a test fails).
struct Cleanup(Vec<Vec<String>>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for args in &self.0 {
            let _ = kubectl().args(args).output();
        }
    }
}

fn delete_later(ns: &str, what: &str) -> Vec<String> {
    ["-n", ns, "delete", what, "--ignore-not-found", "--wait=false"].map(String::from).to_vec()
}

/// A kubeconfig that authenticates as the ServiceAccount `ray-operator-serviceaccount` of `ns`.
fn service_account_kubeconfig(ns: &str, dir: &Path) -> PathBuf {
    let token = kubectl_ok(&["-n", ns, "create", "token", "ray-operator-serviceaccount", "--duration=1h"]);
    let kc = kube::config::Kubeconfig::read_from(&control_plane().kubeconfig).unwrap();
    let cluster = kc.clusters[0].cluster.clone().unwrap();
    let ca = match (&cluster.certificate_authority, &cluster.certificate_authority_data) {
        (Some(path), _) => format!("certificate-authority: {path}"),
        (None, Some(data)) => format!("certificate-authority-data: {data}"),
        (None, None) => panic!("no CA in the test kubeconfig"),
    };
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: {}
    {ca}
users:
- name: ray-operator-serviceaccount
  user:
    token: {}
contexts:
- name: local
  context: {{cluster: local, user: ray-operator-serviceaccount, namespace: {ns}}}
current-context: local
",
        cluster.server.expect("server in the kubeconfig"),
        token.trim()
    );
    let path = dir.join(format!("{ns}.kubeconfig"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the operator as `replica` in `op_ns` with the ServiceAccount's token and `env`; a RayCluster
/// (example_cluster2, unique name) in `cluster_ns` must come up Running, leader election and the
/// leader label must work, Events must be written, and nothing may be forbidden.
async fn operator_brings_up_a_cluster(
    deployment: &Value,
    op_ns: &str,
    cluster_ns: &str,
    env: &[(&str, &str)],
    cleanup: &mut Cleanup,
) {
    let client = client().await;
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = service_account_kubeconfig(op_ns, tmp.path());

    // A Pod object standing for this replica (the Deployment's own pod template, so admission,
    // e.g. Pod Security "restricted", judges the real thing), for the leader label.
    let replica = format!("ray-operator-install-{}", random_suffix());
    let name = format!("install-{}", random_suffix());
    cleanup.0.push(delete_later(cluster_ns, &format!("raycluster/{name}")));
    cleanup.0.push(delete_later(op_ns, &format!("pod/{replica}")));
    let pods: Api<Pod> = Api::namespaced(client.clone(), op_ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": replica, "labels": {"cluster.ray.io/component": "operator-test"}},
        "spec": deployment["spec"]["template"]["spec"],
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.expect("create the replica's pod from the Deployment's template");

    let mut all_env = vec![("POD_NAME", replica.as_str()), ("POD_NAMESPACE", op_ns)];
    all_env.extend_from_slice(env);
    let mut op = OperatorProcess::start_with_kubeconfig(&kubeconfig, &[], &all_env);
    op.wait_ready().await;

    let mut rc: Value = serde_yaml::from_str(&read("deploy/example_cluster2.yaml")).unwrap();
    rc["metadata"]["name"] = json!(name);
    apply_yaml(cluster_ns, &serde_json::to_string(&rc).unwrap());
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), cluster_ns);
    // Up to a lease ttl (15 s) longer than usual, in case a previous run's replica still holds it.
    wait_until(Duration::from_secs(120), &format!("{name} Running"), || async {
        let c = rcs.get(&name).await.ok()?;
        let s = c.status?;
        (s.phase == Some(Phase::Running) && s.observed_generation == c.metadata.generation).then_some(())
    })
    .await;
    let children = kubectl_ok(&[
        "-n",
        cluster_ns,
        "get",
        "pods,services",
        "-l",
        &format!("ray-cluster-name={name}"),
        "-o",
        "name",
    ]);
    assert_eq!(children.lines().filter(|l| l.starts_with("pod/")).count(), 2, "{children}");
    assert_eq!(children.lines().filter(|l| l.starts_with("service/")).count(), 1, "{children}");

    // Leader election and the leader label worked with these rights.
    let leases: Api<Lease> = Api::namespaced(client.clone(), op_ns);
    let lease = leases.get("ray-operator-leader").await.expect("Lease ray-operator-leader");
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some(replica.as_str()));
    wait_until(Duration::from_secs(30), "leader label on the replica's pod", || async {
        let p = pods.get(&replica).await.ok()?;
        (p.metadata.labels?.get("cluster.ray.io/operator-role")? == "leader").then_some(())
    })
    .await;
    // Events were written (events.k8s.io).
    wait_until(Duration::from_secs(30), "an Event about the cluster", || async {
        let out = kubectl()
            .args(["-n", cluster_ns, "get", "events.events.k8s.io", "-o", "name"])
            .args(["--field-selector", &format!("regarding.name={name}")])
            .output()
            .ok()?;
        (!out.stdout.is_empty()).then_some(())
    })
    .await;
    let logs = op.logs();
    for bad in ["forbidden", "Forbidden", "missing permission"] {
        assert!(!logs.contains(bad), "operator log mentions {bad:?}:\n{logs}");
    }

    // Graceful stop releases the Lease for whoever runs next.
    op.signal("TERM");
    assert!(op.wait_exit(Duration::from_secs(10)), "operator did not exit on SIGTERM");
}

#[tokio::test]
async fn the_namespaced_role_is_all_the_operator_needs() {
    install_crd();
    install_namespaced().await;
    let objs = docs(&render_overlay("namespaced"));
    let mut cleanup = Cleanup(vec![]);
    operator_brings_up_a_cluster(one(&objs, "Deployment"), NS, NS, &[("RAY_OPERATOR_POD_NAMESPACE", NS)], &mut cleanup)
        .await;
}

#[tokio::test]
async fn the_cluster_wide_rbac_is_all_the_operator_needs() {
    install_crd();
    let client = client().await;
    // The operator's namespace (the overlay's objects, Pod Security "restricted" from its Namespace
    // object) and a namespace for the RayCluster. The operator is limited to the latter with
    // RAY_OPERATOR_NAMESPACES so it leaves other tests' clusters alone; its rights still come only
    // from the ClusterRole (cluster-wide binding) and the leader-election Role.
    let op_ns = TestNamespace::new(&client, "install-op").await;
    let rc_ns = TestNamespace::new(&client, "install-rc").await;
    let dir = cluster_wide_into(&op_ns.name);
    let objs = docs(&render(dir.path()));
    let mut cleanup = Cleanup(vec![
        ["delete", "clusterrolebinding", "ray-operator-clusterrolebinding", "--ignore-not-found"]
            .map(String::from)
            .to_vec(),
        ["delete", "clusterrole", "ray-operator-clusterrole", "--ignore-not-found"].map(String::from).to_vec(),
    ]);
    kubectl_ok(&["apply", "-k", dir.path().to_str().unwrap()]);
    // The fake replicas are not needed here.
    kubectl_ok(&["-n", &op_ns.name, "delete", "deploy/ray-operator", "--wait=false"]);
    let restricted = kubectl_ok(&[
        "get",
        "namespace",
        &op_ns.name,
        "-o",
        "jsonpath={.metadata.labels.pod-security\\.kubernetes\\.io/enforce}",
    ]);
    assert_eq!(restricted, "restricted");
    operator_brings_up_a_cluster(
        one(&objs, "Deployment"),
        &op_ns.name,
        &rc_ns.name,
        &[("RAY_OPERATOR_NAMESPACES", &rc_ns.name)],
        &mut cleanup,
    )
    .await;
}
