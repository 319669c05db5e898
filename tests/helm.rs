//! The Helm chart `helm/ray-operator`: lint, the render equals the kustomize overlays' (both modes),
//! values take effect and the schema refuses bad ones, and install / upgrade / uninstall against a
//! private control plane with operator replicas (processes standing in for the Deployment's pods,
//! which kwok does not run) keeping their RayClusters' pods untouched across upgrades.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client, ResourceExt};
use ray_operator::api::{Phase, RayCluster};
use serde::Deserialize;
use serde_json::{Value, json};
use support::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    repo().join("helm/ray-operator")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// The cached helm binary (`e2e/helm/build`; a cold build takes about 2 minutes, once).
fn helm_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = Command::new(repo().join("e2e/helm/build"))
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run e2e/helm/build");
        assert!(out.status.success(), "e2e/helm/build failed");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().expect("helm path").trim())
    })
}

/// helm with its state in a temp dir (never the user's ~/.config/helm), against `kubeconfig`.
fn helm(kubeconfig: Option<&Path>) -> Command {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    let home = HOME.get_or_init(|| tempfile::tempdir().unwrap()).path();
    let mut c = Command::new(helm_bin());
    for (var, sub) in [("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"), ("HELM_DATA_HOME", "data")] {
        c.env(var, home.join(sub));
    }
    c.env_remove("KUBECONFIG");
    if let Some(k) = kubeconfig {
        c.env("KUBECONFIG", k);
    } else {
        // Offline commands only; a stray kubeconfig must not be read.
        c.env("KUBECONFIG", "/nonexistent");
    }
    c
}

fn run_ok(mut c: Command) -> String {
    let out = c.output().expect("run");
    assert!(
        out.status.success(),
        "{c:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `helm template` of the chart into `namespace` with `args` (e.g. `--set mode=cluster-wide`).
fn template(namespace: &str, args: &[&str]) -> Vec<Value> {
    let mut c = helm(None);
    c.args(["template", "ray-operator"]).arg(chart()).args(["--namespace", namespace, "--include-crds"]).args(args);
    docs(&run_ok(c))
}

fn template_err(args: &[&str]) -> String {
    let out = helm(None).args(["template", "ray-operator"]).arg(chart()).args(args).output().unwrap();
    assert!(!out.status.success(), "helm template {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn kustomize(dir: &Path) -> Vec<Value> {
    docs(&kubectl_ok(&["kustomize", dir.to_str().unwrap()]))
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

fn deployment(objs: &[Value]) -> &Value {
    find(objs, "Deployment", "ray-operator")
}

fn env_of(objs: &[Value]) -> BTreeMap<String, Value> {
    deployment(objs)["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.get("value").or(e.get("valueFrom")).unwrap().clone()))
        .collect()
}

/// Helm's own labels, which the kustomize install does not carry.
const HELM_LABELS: [&str; 4] =
    ["helm.sh/chart", "app.kubernetes.io/instance", "app.kubernetes.io/version", "app.kubernetes.io/managed-by"];

/// Numbers by value: kustomize re-serializes the CRD's `minimum: 0.0` as `0`.
fn canonical(v: &Value) -> Value {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => json!(f as i64),
            _ => v.clone(),
        },
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), canonical(v))).collect()),
        _ => v.clone(),
    }
}

/// An object as compared with the kustomize render: Helm's labels removed, env as a map by name
/// (its order means nothing), numbers by value, keyed by kind/name.
fn normalized(objs: &[Value]) -> BTreeMap<String, Value> {
    objs.iter()
        .map(|o| {
            let mut o = canonical(o);
            for labels in ["/metadata/labels", "/spec/template/metadata/labels"] {
                if let Some(l) = o.pointer_mut(labels).and_then(Value::as_object_mut) {
                    for h in HELM_LABELS {
                        l.remove(h);
                    }
                }
            }
            if let Some(env) = o.pointer_mut("/spec/template/spec/containers/0/env") {
                let mut by_name: Vec<Value> = env.as_array().unwrap().clone();
                by_name.sort_by_key(|e| e["name"].as_str().unwrap().to_string());
                *env = Value::Array(by_name);
            }
            (format!("{}/{}", o["kind"].as_str().unwrap(), o["metadata"]["name"].as_str().unwrap()), o)
        })
        .collect()
}

fn assert_same_objects(mode: &str, helm: &[Value], kustomize: &[Value]) {
    let h = normalized(helm);
    let k = normalized(kustomize);
    assert_eq!(h.keys().collect::<Vec<_>>(), k.keys().collect::<Vec<_>>(), "{mode}: the same objects");
    for (key, kobj) in &k {
        assert!(
            h[key] == *kobj,
            "{mode}: {key} differs from the kustomize render\nhelm:\n{}\nkustomize:\n{}",
            serde_yaml::to_string(&h[key]).unwrap(),
            serde_yaml::to_string(kobj).unwrap()
        );
    }
}

#[test]
fn chart_copies_are_identical_to_their_sources() {
    assert!(
        read("helm/ray-operator/crds/cluster_crd.yaml") == read("crds/cluster_crd.yaml"),
        "helm/ray-operator/crds/cluster_crd.yaml differs from crds/cluster_crd.yaml: run `make crd`"
    );
    assert!(
        read("helm/ray-operator/files/prometheusrule.yaml")
            == read("kustomize/components/monitoring/prometheusrule.yaml"),
        "cp kustomize/components/monitoring/prometheusrule.yaml helm/ray-operator/files/"
    );
    assert!(
        read("helm/ray-operator/files/ray-operator.json") == read("monitoring/grafana/ray-operator.json"),
        "cp monitoring/grafana/ray-operator.json helm/ray-operator/files/"
    );
    // The chart's version follows the operator's.
    let chart: Value = serde_yaml::from_str(&read("helm/ray-operator/Chart.yaml")).unwrap();
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));
    assert_eq!(chart["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn helm_lint_passes_in_every_mode() {
    for args in [
        vec![],
        vec!["--set", "mode=cluster-wide", "--set", "watchNamespaces={a,b}"],
        vec![
            "--set",
            "monitoring.podMonitor.enabled=true",
            "--set",
            "monitoring.prometheusRule.enabled=true",
            "--set",
            "monitoring.grafanaDashboard.enabled=true",
        ],
    ] {
        let mut c = helm(None);
        c.args(["lint", "--strict"]).arg(chart()).args(&args);
        let out = run_ok(c);
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }
}

#[test]
fn helm_template_equals_the_kustomize_overlays() {
    // Namespaced: the chart in `ray` renders the namespaced overlay's objects; the CRD is in the
    // chart's crds/ (Helm installs it first; the overlay leaves it to an admin).
    let mut h = template("ray", &[]);
    let crd_at = h.iter().position(|o| o["kind"] == "CustomResourceDefinition").expect("the CRD in crds/");
    let crd = h.remove(crd_at);
    let generated: Value = serde_yaml::from_str(&read("crds/cluster_crd.yaml")).unwrap();
    assert_eq!(crd, generated);
    assert_same_objects("namespaced", &h, &kustomize(&repo().join("kustomize/overlays/namespaced")));

    // Cluster-wide in `ray-operator`: the overlay's objects, CRD included, except its Namespace:
    // Helm installs into an existing namespace (or --create-namespace); a chart that also owned
    // it would fail there. docs/install.md says to label it for Pod Security "restricted".
    let h = template("ray-operator", &["--set", "mode=cluster-wide"]);
    let mut k = kustomize(&repo().join("kustomize/overlays/cluster-wide"));
    let ns_at = k.iter().position(|o| o["kind"] == "Namespace").expect("the overlay's Namespace");
    k.remove(ns_at);
    assert_same_objects("cluster-wide", &h, &k);

    // Every namespaced object names the release namespace itself (helm template -n and helm
    // install -n agree; `kubectl apply` of the render goes to the right place).
    for o in &h {
        let cluster_scoped = ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"];
        if !cluster_scoped.contains(&o["kind"].as_str().unwrap()) {
            assert_eq!(o["metadata"]["namespace"], "ray-operator", "{}", o["kind"]);
        }
    }
}

#[test]
fn values_take_effect_and_keep_the_hardening() {
    let base = template("ops", &["--set", "mode=cluster-wide"]);
    let objs = template(
        "ops",
        &[
            "--set",
            "mode=cluster-wide",
            "--set",
            "watchNamespaces={team-a,team-b}",
            "--set",
            "image.repository=registry.local/ray-operator",
            "--set",
            "image.tag=9.9.9",
            "--set",
            "replicas=3",
            "--set",
            "resources.limits.memory=1Gi",
            "--set",
            "logFormat=json",
            "--set",
            "autoscaler.interval=0.5",
            "--set",
            "autoscaler.gcsTimeout=3",
            "--set",
            "autoscaler.workerRegistrationTimeout=600",
            "--set",
            "autoscaler.headGcsGrace=90",
            "--set",
            "unschedulableTimeout=120",
            "--set",
            "shards=4",
            "--set",
            "createBatch=10",
            "--set",
            "leaderElection.leaseTTL=20",
            "--set",
            "leaderElection.leaseRenew=4",
            "--set",
            "commonLabels.team=ml",
            "--set",
            "commonAnnotations.owner=platform",
            "--set",
            "podLabels.tier=control",
            "--set",
            "podAnnotations.checked=yes",
        ],
    );
    let d = deployment(&objs);
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.local/ray-operator:9.9.9");
    assert_eq!(d["spec"]["replicas"], 3);
    assert_eq!(c["resources"]["limits"]["memory"], "1Gi");
    assert_eq!(c["resources"]["requests"]["memory"], "64Mi", "unset resources keep the defaults");
    let env = env_of(&objs);
    let expect = [
        ("RAY_OPERATOR_NAMESPACES", "team-a,team-b"),
        ("RAY_OPERATOR_LOG_FORMAT", "json"),
        ("RAY_OPERATOR_AUTOSCALER_INTERVAL", "0.5"),
        ("RAY_OPERATOR_GCS_TIMEOUT", "3"),
        ("RAY_OPERATOR_WORKER_REGISTRATION_TIMEOUT", "600"),
        ("RAY_OPERATOR_HEAD_GCS_GRACE", "90"),
        ("RAY_OPERATOR_UNSCHEDULABLE_TIMEOUT", "120"),
        ("RAY_OPERATOR_SHARDS", "4"),
        ("RAY_OPERATOR_CREATE_BATCH", "10"),
        ("RAY_OPERATOR_LEASE_TTL", "20"),
        ("RAY_OPERATOR_LEASE_RENEW", "4"),
    ];
    for (k, v) in expect {
        assert_eq!(env.get(k), Some(&json!(v)), "{k}");
    }
    // The binary accepts exactly these variables (each is a `run` flag's env).
    let help = run_ok({
        let mut c = Command::new(env!("CARGO_BIN_EXE_ray-operator"));
        c.args(["run", "--help"]);
        c
    });
    for k in env.keys() {
        assert!(k.starts_with("POD_") || help.contains(&format!("env: {k}=")), "{k} is not an operator variable");
    }
    // Helm never templates crds/: the CRD keeps its generated labels.
    for o in objs.iter().filter(|o| o["kind"] != "CustomResourceDefinition") {
        assert_eq!(o["metadata"]["labels"]["team"], "ml", "commonLabels on {}", o["kind"]);
        assert_eq!(o["metadata"]["annotations"]["owner"], "platform", "commonAnnotations on {}", o["kind"]);
    }
    let tpl = &d["spec"]["template"]["metadata"];
    assert_eq!(tpl["labels"]["tier"], "control");
    assert_eq!(tpl["annotations"]["checked"], "yes");
    // The selector never changes (it is immutable: a changed one would make upgrades fail).
    assert_eq!(d["spec"]["selector"], deployment(&base)["spec"]["selector"]);
    // The hardening is not a value: pod and container securityContext, probes are as in the base.
    for p in ["/spec/template/spec/securityContext", "/spec/template/spec/containers/0/securityContext"] {
        assert_eq!(d.pointer(p), deployment(&base).pointer(p), "{p}");
    }
    for p in ["livenessProbe", "readinessProbe"] {
        assert_eq!(c[p], deployment(&base)["spec"]["template"]["spec"]["containers"][0][p], "{p}");
    }

    // autoscaler.enabled=false → RAY_OPERATOR_NO_AUTOSCALER; one replica → no PDB (minAvailable 1
    // would block every drain of its node).
    let objs = template("ops", &["--set", "autoscaler.enabled=false", "--set", "replicas=1"]);
    assert_eq!(env_of(&objs).get("RAY_OPERATOR_NO_AUTOSCALER"), Some(&json!("true")));
    assert!(!objs.iter().any(|o| o["kind"] == "PodDisruptionBudget"));
    // Defaults set no flag variable: the binary's defaults are the single source.
    let defaults: BTreeSet<String> = env_of(&template("ops", &[])).into_keys().collect();
    assert_eq!(
        defaults,
        [
            "POD_NAME",
            "POD_NAMESPACE",
            "RAY_OPERATOR_HEALTH_ADDR",
            "RAY_OPERATOR_LOG_FORMAT",
            "RAY_OPERATOR_POD_NAMESPACE",
            "RAY_OPERATOR_SERVICE_ACCOUNT"
        ]
        .map(String::from)
        .into()
    );

    // Monitoring objects only on request; the rule and dashboard are the shipped files.
    assert!(!base.iter().any(|o| o["apiVersion"].as_str().unwrap().starts_with("monitoring.coreos.com")));
    let objs = template(
        "ops",
        &[
            "--set",
            "monitoring.podMonitor.enabled=true",
            "--set",
            "monitoring.podMonitor.labels.release=prom",
            "--set",
            "monitoring.prometheusRule.enabled=true",
            "--set",
            "monitoring.grafanaDashboard.enabled=true",
        ],
    );
    let pm = find(&objs, "PodMonitor", "ray-operator");
    assert_eq!(pm["metadata"]["labels"]["release"], "prom");
    let component: Value = serde_yaml::from_str(&read("kustomize/components/monitoring/podmonitor.yaml")).unwrap();
    assert_eq!(pm["spec"], component["spec"]);
    let rule: Value = serde_yaml::from_str(&read("kustomize/components/monitoring/prometheusrule.yaml")).unwrap();
    assert_eq!(find(&objs, "PrometheusRule", "ray-operator")["spec"], rule["spec"]);
    let cm = find(&objs, "ConfigMap", "ray-operator-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let dash: Value = serde_json::from_str(cm["data"]["ray-operator.json"].as_str().unwrap()).unwrap();
    let shipped: Value = serde_json::from_str(&read("monitoring/grafana/ray-operator.json")).unwrap();
    assert_eq!(dash, shipped);

    // The schema refuses what the operator would refuse (or misread) at start.
    for (args, msg) in [
        (["--set", "mode=everywhere"], "/mode"),
        (["--set", "replicas=0"], "/replicas"),
        (["--set", "logFormat=xml"], "/logFormat"),
        (["--set", "autoscaler.interval=soon"], "/autoscaler/interval"),
        (["--set", "shards=0"], "/shards"),
        (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (["--set", "watchNamespaces={Bad_Name}"], "/watchNamespaces"),
        (["--set", "replica=2"], "replica"),
    ] {
        let err = template_err(&args);
        assert!(err.contains("schema") && err.contains(msg), "{args:?}: {err}");
    }
}

/// A kubeconfig for the private control plane that authenticates as the chart's ServiceAccount.
fn service_account_kubeconfig(cp: &PrivateControlPlane, ns: &str, dir: &Path) -> PathBuf {
    let out = cp.kubectl().args(["-n", ns, "create", "token", "ray-operator-serviceaccount", "--duration=1h"]).output();
    let out = out.unwrap();
    assert!(out.status.success(), "create token: {}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mut kc: Value =
        serde_yaml::from_str(&std::fs::read_to_string(&cp.cp.kubeconfig).unwrap()).expect("kubeconfig YAML");
    kc["users"] = json!([{"name": "sa", "user": {"token": token}}]);
    let ctx_cluster = kc["contexts"][0]["context"]["cluster"].clone();
    kc["contexts"] = json!([{"name": "sa", "context": {"cluster": ctx_cluster, "user": "sa", "namespace": ns}}]);
    kc["current-context"] = json!("sa");
    let path = dir.join("sa.kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&kc).unwrap()).unwrap();
    path
}

fn cp_kubectl_ok(cp: &PrivateControlPlane, args: &[&str]) -> String {
    let mut c = cp.kubectl();
    c.args(args);
    run_ok(c)
}

/// Operator processes standing in for the Deployment's pods (kwok marks them Running but runs
/// nothing): each takes a pod's name as POD_NAME, so the Lease holder and the leader label name
/// real pods, and the Deployment's own env (the chart's values) with the ServiceAccount's token.
async fn replicas_for_pods(
    client: &Client,
    cp: &PrivateControlPlane,
    ns: &str,
    kubeconfig: &Path,
) -> BTreeMap<String, OperatorProcess> {
    let pods = live_pods(client, ns, "cluster.ray.io/component=operator").await;
    let deploy: Value =
        serde_json::from_str(&cp_kubectl_ok(cp, &["-n", ns, "get", "deploy/ray-operator", "-o", "json"]))
            .expect("Deployment JSON");
    let env = deploy["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap().clone();
    let mut out = BTreeMap::new();
    for p in pods {
        let name = p.name_any();
        // Values as the kubelet would set them: plain values, and the downward API's fieldRefs
        // (POD_NAME, POD_NAMESPACE, the namespaced mode's RAY_OPERATOR_POD_NAMESPACE, the
        // operator's own RAY_OPERATOR_SERVICE_ACCOUNT).
        let e: Vec<(String, String)> = env
            .iter()
            .map(|e| {
                let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("metadata.name") => name.clone(),
                    Some("metadata.namespace") => ns.to_string(),
                    Some("spec.serviceAccountName") => p
                        .spec
                        .as_ref()
                        .and_then(|s| s.service_account_name.clone())
                        .expect("the Deployment's pods name their ServiceAccount"),
                    Some(other) => panic!("unexpected fieldRef {other}"),
                    None => e["value"].as_str().expect("a value or a fieldRef").to_string(),
                };
                (e["name"].as_str().unwrap().to_string(), value)
            })
            .filter(|(k, _)| k != "RAY_OPERATOR_HEALTH_ADDR")
            .collect();
        let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let op = OperatorProcess::start_with_kubeconfig(kubeconfig, &[], &e);
        out.insert(name, op);
    }
    for op in out.values() {
        op.wait_ready().await;
    }
    out
}

async fn lease_holder(client: &Client, ns: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    leases.get_opt("ray-operator-leader").await.ok()??.spec?.holder_identity
}

/// name → uid of every Ray pod and head Service of the clusters in `ns`.
async fn ray_children(client: &Client, cp: &PrivateControlPlane, ns: &str) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> =
        live_pods(client, ns, "ray-cluster-name").await.iter().map(|p| (p.name_any(), p.uid().unwrap())).collect();
    let svcs = cp_kubectl_ok(
        cp,
        &[
            "-n",
            ns,
            "get",
            "services",
            "-l",
            "ray-cluster-name",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.metadata.uid} {end}",
        ],
    );
    for s in svcs.split_whitespace() {
        let (n, u) = s.split_once('=').unwrap();
        out.insert(format!("service/{n}"), u.to_string());
    }
    out
}

async fn wait_running(client: &Client, ns: &str, names: &[String]) {
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), ns);
    for name in names {
        wait_until(Duration::from_secs(90), &format!("{name} Running"), || async {
            let c = rcs.get(name).await.ok()?;
            let s = c.status?;
            (s.phase == Some(Phase::Running) && s.observed_generation == c.metadata.generation).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_upgrade_uninstall_keeps_clusters_untouched() {
    let cp = PrivateControlPlane::start();
    let client = cp.client().await;
    let kc = cp.cp.kubeconfig.clone();
    let op_ns = "ray-system";
    let rc_ns = "team-a";
    cp_kubectl_ok(&cp, &["create", "namespace", rc_ns]);
    let helm_ok = |args: &[&str]| {
        let mut c = helm(Some(&kc));
        c.args(args);
        run_ok(c)
    };
    let chart = chart();
    let chart = chart.to_str().unwrap();

    // Install, cluster-wide but limited to team-a; --wait: kwok marks the pods Ready.
    let t = std::time::Instant::now();
    helm_ok(&[
        "install",
        "ray-operator",
        chart,
        "-n",
        op_ns,
        "--create-namespace",
        "--set",
        "mode=cluster-wide",
        "--set",
        "watchNamespaces={team-a}",
        "--wait",
        "--timeout",
        "120s",
    ]);
    eprintln!("helm install --wait: {:?}", t.elapsed());
    wait_crd_established(|| cp.kubectl());
    let status = helm_ok(&["status", "ray-operator", "-n", op_ns, "-o", "json"]);
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["info"]["status"], "deployed");
    assert_eq!(status["version"], 1);
    for obj in [
        "clusterrole/ray-operator-clusterrole",
        "clusterrolebinding/ray-operator-clusterrolebinding",
        "crd/rayclusters.cluster.ray.io",
    ] {
        cp_kubectl_ok(&cp, &["get", obj]);
    }
    for obj in [
        "serviceaccount/ray-operator-serviceaccount",
        "role/ray-operator-leader-election",
        "rolebinding/ray-operator-leader-election",
        "deployment/ray-operator",
        "service/ray-operator-metrics",
        "pdb/ray-operator",
    ] {
        let managed = cp_kubectl_ok(
            &cp,
            &["-n", op_ns, "get", obj, "-o", "jsonpath={.metadata.labels.app\\.kubernetes\\.io/managed-by}"],
        );
        assert_eq!(managed, "Helm", "{obj}");
    }
    let deployed: Value =
        serde_json::from_str(&cp_kubectl_ok(&cp, &["-n", op_ns, "get", "deploy/ray-operator", "-o", "json"])).unwrap();
    assert_eq!(deployed["status"]["readyReplicas"], 2);

    // Two replicas with the chart's RBAC (ServiceAccount token) and its env; two RayClusters.
    let tmp = tempfile::tempdir().unwrap();
    let sa_kc = service_account_kubeconfig(&cp, op_ns, tmp.path());
    let mut ops = replicas_for_pods(&client, &cp, op_ns, &sa_kc).await;
    let names: Vec<String> = (0..2).map(|i| format!("helm-{i}")).collect();
    for name in &names {
        let mut rc: Value = serde_yaml::from_str(&read("deploy/example_cluster2.yaml")).unwrap();
        rc["metadata"]["name"] = json!(name);
        let path = tmp.path().join(format!("{name}.json"));
        std::fs::write(&path, rc.to_string()).unwrap();
        cp_kubectl_ok(&cp, &["-n", rc_ns, "apply", "-f", path.to_str().unwrap()]);
    }
    wait_running(&client, rc_ns, &names).await;
    let holder = wait_until(Duration::from_secs(30), "a Lease holder", || lease_holder(&client, op_ns)).await;
    assert!(ops.contains_key(&holder), "the holder {holder} is one of the Deployment's pods");
    let children = ray_children(&client, &cp, rc_ns).await;
    assert_eq!(children.len(), 6, "2 clusters x (head + worker + Service): {children:?}");
    let op_pods: BTreeSet<String> = ops.keys().cloned().collect();

    // Upgrade 1: a value outside the pod template (labels on every object). The Deployment does
    // not roll; the leader keeps the Lease; nothing of the clusters is touched.
    helm_ok(&[
        "upgrade",
        "ray-operator",
        chart,
        "-n",
        op_ns,
        "--reuse-values",
        "--set",
        "commonLabels.team=ml",
        "--wait",
    ]);
    let team =
        cp_kubectl_ok(&cp, &["-n", op_ns, "get", "deploy/ray-operator", "-o", "jsonpath={.metadata.labels.team}"]);
    assert_eq!(team, "ml");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now: BTreeSet<String> =
        live_pods(&client, op_ns, "cluster.ray.io/component=operator").await.iter().map(|p| p.name_any()).collect();
    assert_eq!(now, op_pods, "no rollout for a change outside the pod template");
    assert_eq!(lease_holder(&client, op_ns).await.as_deref(), Some(holder.as_str()), "the same leader");
    assert_eq!(ray_children(&client, &cp, rc_ns).await, children, "Ray pods and Services untouched (same UIDs)");

    // Upgrade 2: a value in the pod template (log format): the Deployment rolls. Each old pod's
    // replica stops when its pod goes, each new pod's starts (what the kubelet would do); the
    // Lease moves to a new pod and still no Ray pod or Service is recreated.
    helm_ok(&["upgrade", "ray-operator", chart, "-n", op_ns, "--reuse-values", "--set", "logFormat=json", "--wait"]);
    let new_pods = wait_until(Duration::from_secs(90), "the rollout's new pods", || async {
        let p: BTreeSet<String> =
            live_pods(&client, op_ns, "cluster.ray.io/component=operator").await.iter().map(|p| p.name_any()).collect();
        (p.len() == 2 && p.is_disjoint(&op_pods)).then_some(p)
    })
    .await;
    let mut new_ops = replicas_for_pods(&client, &cp, op_ns, &sa_kc).await;
    assert_eq!(new_ops.keys().cloned().collect::<BTreeSet<_>>(), new_pods);
    // The leader goes last, as in a rolling update's worst case: a standby first.
    let mut order: Vec<String> = ops.keys().filter(|k| **k != holder).cloned().collect();
    order.push(holder.clone());
    for name in order {
        let mut op = ops.remove(&name).unwrap();
        op.signal("TERM");
        assert!(op.wait_exit(Duration::from_secs(15)), "{name} did not stop on SIGTERM");
    }
    let new_holder = wait_until(Duration::from_secs(30), "a new pod leading", || async {
        lease_holder(&client, op_ns).await.filter(|h| new_pods.contains(h))
    })
    .await;
    assert!(new_ops[&new_holder].logs().contains("\"level\""), "the new replicas log JSON (the upgraded value)");
    wait_until(Duration::from_secs(30), "the new leader reconciled", || async {
        new_ops[&new_holder].logs().contains("leading").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_running(&client, rc_ns, &names).await;
    assert_eq!(ray_children(&client, &cp, rc_ns).await, children, "Ray pods and Services untouched after the rollout");
    let history = helm_ok(&["history", "ray-operator", "-n", op_ns, "-o", "json"]);
    let history: Vec<Value> = serde_json::from_str(&history).unwrap();
    assert_eq!(history.len(), 3);

    // Uninstall: every object of the release goes; the CRD stays (Helm never deletes crds/), and
    // with it the users' RayClusters and their pods.
    for op in new_ops.values_mut() {
        op.signal("TERM");
        assert!(op.wait_exit(Duration::from_secs(15)));
    }
    helm_ok(&["uninstall", "ray-operator", "-n", op_ns, "--wait"]);
    for obj in ["clusterrole/ray-operator-clusterrole", "clusterrolebinding/ray-operator-clusterrolebinding"] {
        let out = cp.kubectl().args(["get", obj]).output().unwrap();
        assert!(!out.status.success(), "{obj} left behind");
    }
    let left = cp_kubectl_ok(&cp, &["-n", op_ns, "get", "deploy,svc,sa,role,rolebinding,pdb", "-o", "name"]);
    let left: Vec<&str> = left.lines().filter(|l| !l.ends_with("/default")).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    cp_kubectl_ok(&cp, &["get", "crd/rayclusters.cluster.ray.io"]);
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), rc_ns);
    assert_eq!(rcs.list(&Default::default()).await.unwrap().items.len(), 2);
    assert_eq!(ray_children(&client, &cp, rc_ns).await, children, "uninstalling the operator leaves Ray clusters be");

    // Namespaced, on the same control plane (the CRD is already there: Helm skips crds/ that
    // exist): the Role alone lets one replica bring a RayCluster of its namespace up.
    let ns = "ray";
    helm_ok(&["install", "ray-operator", chart, "-n", ns, "--create-namespace", "--set", "replicas=1", "--wait"]);
    assert!(
        cp.kubectl().args(["-n", ns, "get", "pdb/ray-operator"]).output().unwrap().stdout.is_empty(),
        "no PDB for one replica"
    );
    cp_kubectl_ok(&cp, &["-n", ns, "get", "role/ray-operator-role", "rolebinding/ray-operator-rolebinding"]);
    let ns_kc = service_account_kubeconfig(&cp, ns, tmp.path());
    let ops = replicas_for_pods(&client, &cp, ns, &ns_kc).await;
    assert_eq!(ops.len(), 1);
    let mut rc: Value = serde_yaml::from_str(&read("deploy/example_cluster2.yaml")).unwrap();
    rc["metadata"]["name"] = json!("helm-ns");
    let path = tmp.path().join("helm-ns.json");
    std::fs::write(&path, rc.to_string()).unwrap();
    cp_kubectl_ok(&cp, &["-n", ns, "apply", "-f", path.to_str().unwrap()]);
    wait_running(&client, ns, &["helm-ns".to_string()]).await;
    assert_eq!(ray_children(&client, &cp, ns).await.len(), 3, "head, worker, Service");
    let (name, op) = ops.iter().next().unwrap();
    assert_eq!(lease_holder(&client, ns).await.as_deref(), Some(name.as_str()));
    let logs = op.logs();
    for bad in ["forbidden", "Forbidden"] {
        assert!(!logs.contains(bad), "the namespaced Role is not enough:\n{logs}");
    }
    // The scope is the release namespace only: team-a's clusters are not this replica's.
    assert!(!logs.contains("helm-0:") && !logs.contains("helm-1:"), "namespaced replica saw team-a:\n{logs}");
    drop(ops);
    helm_ok(&["uninstall", "ray-operator", "-n", ns, "--wait"]);
}
