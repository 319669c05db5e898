//! Monitoring: the kustomize component (PodMonitor + PrometheusRule), the alert rules and the
//! Grafana dashboard, against a real Prometheus (Debian's 2.42, on 127.0.0.1) scraping two running
//! operator replicas that serve two RayClusters. promtool accepts the rules; every alert
//! expression and every dashboard query evaluates and finds its series; RayClusterGcsUnreachable
//! fires for the two clusters (kwok runs no Ray: their heads' GCS cannot be reached).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use kube::Api;
use ray_operator::api::RayCluster;
use serde_json::{Value, json};
use support::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Debian's `prometheus` package (.ci/run installs it); its binaries are on PATH.
fn prometheus_tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found: apt-get install prometheus (.ci/run does)");
}

/// The alert rules as a plain Prometheus rule file (the PrometheusRule's spec).
fn rule_groups() -> Value {
    let rule: Value = serde_yaml::from_str(&read("kustomize/components/monitoring/prometheusrule.yaml")).unwrap();
    rule["spec"].clone()
}

fn alerts(groups: &Value) -> Vec<Value> {
    groups["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap().clone()).collect()
}

/// Metric names a PromQL expression reads (identifiers followed by `{`, `[` or a space/paren that
/// start with our prefix; every metric of ours has it).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("ray_operator_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        out.insert(expr[start..end].to_string());
        i = end;
    }
    out
}

#[test]
fn promtool_accepts_the_rules_and_the_component_renders() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, serde_yaml::to_string(&rule_groups()).unwrap()).unwrap();
    let out = Command::new(prometheus_tool("promtool")).arg("check").arg("rules").arg(&file).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool check rules:\n{text}");
    let n = alerts(&rule_groups()).len();
    assert!(text.contains(&format!("SUCCESS: {n} rules found")), "{text}");
    // The alerts the issue asks for, each with a severity and a summary.
    let names: BTreeSet<String> =
        alerts(&rule_groups()).iter().map(|a| a["alert"].as_str().unwrap().to_string()).collect();
    for want in [
        "RayOperatorNoLeader",
        "RayOperatorReconcileErrors",
        "RayClusterGcsUnreachable",
        "RayWorkersUnschedulable",
        "RayOperatorRestarting",
    ] {
        assert!(names.contains(want), "missing alert {want}");
    }
    for a in alerts(&rule_groups()) {
        assert!(a["labels"]["severity"].is_string() && a["annotations"]["summary"].is_string(), "{a}");
    }
    let for_of = |name: &str| {
        alerts(&rule_groups()).into_iter().find(|a| a["alert"] == name).unwrap()["for"].as_str().map(String::from)
    };
    assert_eq!(for_of("RayOperatorNoLeader").as_deref(), Some("1m"));
    assert_eq!(for_of("RayClusterGcsUnreachable").as_deref(), Some("5m"));

    // The component goes on the namespaced overlay (kustomize's own check of a Component).
    let (_overlay, rendered) = overlay_with_component();
    for what in ["kind: PodMonitor", "kind: PrometheusRule", "kind: Deployment"] {
        assert!(rendered.contains(what), "{what} missing from the overlay with the component");
    }
    // The PodMonitor selects the operator's pods by the Deployment's selector and scrapes the
    // container port that serves /metrics.
    let pm: Value = serde_yaml::from_str(&read("kustomize/components/monitoring/podmonitor.yaml")).unwrap();
    let deploy: Value = serde_yaml::from_str(&read("kustomize/base/deployment.yaml")).unwrap();
    assert_eq!(pm["spec"]["selector"]["matchLabels"], deploy["spec"]["selector"]["matchLabels"]);
    assert_eq!(
        pm["spec"]["podMetricsEndpoints"][0]["port"],
        deploy["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"]
    );
}

/// The namespaced overlay with the monitoring component, into `default` (which always exists):
/// the kustomization's directory and the render.
fn overlay_with_component() -> (tempfile::TempDir, String) {
    let overlay = tempfile::tempdir().unwrap();
    // kustomize wants relative paths to what it includes.
    let up = "../".repeat(overlay.path().components().count() - 1);
    let rel = |p: &str| format!("{up}{}", repo().join(p).to_str().unwrap().trim_start_matches('/'));
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!(
            "resources: [{}]\ncomponents: [{}]\nnamespace: default\n",
            rel("kustomize/overlays/namespaced"),
            rel("kustomize/components/monitoring")
        ),
    )
    .unwrap();
    let rendered = kubectl_ok(&["kustomize", overlay.path().to_str().unwrap()]);
    (overlay, rendered)
}

/// The component's PodMonitor and PrometheusRule against the Prometheus Operator's own CRDs
/// (e2e/monitoring/crds, from its Go module): a server-side dry run with strict field validation
/// refuses any field the CRDs do not know, which pruning would otherwise drop silently.
#[test]
fn the_component_fits_the_prometheus_operator_crds() {
    let out = Command::new(repo().join("e2e/monitoring/crds")).output().expect("run e2e/monitoring/crds");
    assert!(out.status.success(), "e2e/monitoring/crds: {}", String::from_utf8_lossy(&out.stderr));
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap().trim());
    for kind in ["podmonitors", "prometheusrules"] {
        let f = dir.join(format!("monitoring.coreos.com_{kind}.yaml"));
        // Server-side: the CRDs' annotations are too large for client-side apply's last-applied.
        kubectl_ok(&["apply", "--server-side", "--force-conflicts", "-f", f.to_str().unwrap()]);
        // Polled with kubectl's failures tolerated: before the CRD has any condition, the jsonpath
        // filter fails ("<nil> is not array or slice").
        wait_named_crd_established(&format!("{kind}.monitoring.coreos.com"), kubectl);
    }
    let (overlay, _) = overlay_with_component();
    let out = kubectl_ok(&["apply", "--dry-run=server", "--validate=strict", "-k", overlay.path().to_str().unwrap()]);
    for what in ["podmonitor.monitoring.coreos.com/ray-operator", "prometheusrule.monitoring.coreos.com/ray-operator"] {
        assert!(out.contains(&format!("{what} created (server dry run)")), "{what}:\n{out}");
    }
}

/// A Prometheus of our own on 127.0.0.1 (never Debian's service), killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(config: &str, rules: &Value) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.yaml"), serde_yaml::to_string(rules).unwrap()).unwrap();
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let check = Command::new(prometheus_tool("promtool"))
            .args(["check", "config"])
            .arg(dir.path().join("prometheus.yml"))
            .output()
            .unwrap();
        assert!(check.status.success(), "promtool check config: {}", String::from_utf8_lossy(&check.stdout));
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(prometheus_tool("prometheus"))
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Self { child, port, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn get(&self, path_and_query: &str) -> Option<Value> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
        let req = format!("GET {path_and_query} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text.split_once("\r\n\r\n")?;
        // Prometheus answers small bodies with Content-Length, large ones chunked.
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_string()
        };
        serde_json::from_str(&body).ok()
    }

    /// An instant query; the API's answer (`status`, `data.result`, or `error`).
    async fn query(&self, expr: &str) -> Value {
        let q: String = url_encode(expr);
        self.get(&format!("/api/v1/query?query={q}"))
            .await
            .unwrap_or_else(|| panic!("no answer for {expr}\n{}", self.log()))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- prometheus log ----\n{}", self.log());
        }
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every query of the dashboard, with Grafana's variables replaced as Grafana would for this test's
/// operator namespace and a short range.
fn dashboard_queries(namespace: &str) -> Vec<(String, String)> {
    let dash: Value = serde_json::from_str(&read("monitoring/grafana/ray-operator.json")).unwrap();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$namespace", namespace)
                .replace("$__rate_interval", "10s")
                .replace("$__range", "1m");
            out.push((p["title"].as_str().unwrap().to_string(), expr));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_operator_evaluates_everything_and_an_alert_fires() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "monitoring").await;

    // Two replicas (one leads), limited to this namespace; the Lease lives here too.
    let replica = |name: &str| {
        OperatorProcess::start(
            // The default lease timing: a loaded machine must not make the leader flap (the
            // no-leader alert would go pending and fail the check below).
            &["--namespaces", &ns.name],
            &[("POD_NAME", name), ("POD_NAMESPACE", &ns.name)],
        )
    };
    let ops = [replica("monitoring-a"), replica("monitoring-b")];
    for op in &ops {
        op.wait_ready().await;
    }
    // Two RayClusters; on kwok their heads "run" at 127.65.x.y where no GCS listens.
    let names = ["mon-1", "mon-2"];
    for name in names {
        let mut rc: Value = serde_yaml::from_str(&read("deploy/example_cluster2.yaml")).unwrap();
        rc["metadata"]["name"] = json!(name);
        apply_yaml(&ns.name, &rc.to_string());
    }
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), &ns.name);
    for name in names {
        wait_until(Duration::from_secs(90), &format!("{name}: AutoscalerHealthy=False"), || async {
            let s = rcs.get(name).await.ok()?.status?;
            s.conditions.iter().any(|c| c.type_ == "AutoscalerHealthy" && c.status == "False").then_some(())
        })
        .await;
    }

    // The test's copy of the rules: RayClusterGcsUnreachable's `for` cut from 5m to 5s (nothing
    // else changed), so it fires within the test.
    let mut rules = rule_groups();
    for g in rules["groups"].as_array_mut().unwrap() {
        for r in g["rules"].as_array_mut().unwrap() {
            if r["alert"] == "RayClusterGcsUnreachable" {
                r["for"] = json!("5s");
            }
        }
    }
    // The labels a PodMonitor gives each target (namespace, pod), on static targets.
    let targets: String = ops
        .iter()
        .zip(["monitoring-a", "monitoring-b"])
        .map(|(op, pod)| {
            format!(
                "  - targets: ['127.0.0.1:{}']\n    labels: {{namespace: '{}', pod: '{pod}'}}\n",
                op.health_port, ns.name
            )
        })
        .collect();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [rules.yaml]\nscrape_configs:\n- job_name: ray-operator\n  static_configs:\n{targets}"
    );
    let t0 = std::time::Instant::now();
    let prom = Prometheus::start(&config, &rules);
    wait_until(Duration::from_secs(60), "both targets up", || async {
        // Not `query`: Prometheus may not listen yet.
        let r = prom.get(&format!("/api/v1/query?query={}", url_encode("up{job=\"ray-operator\"} == 1"))).await?;
        (r["data"]["result"].as_array()?.len() == 2).then_some(())
    })
    .await;
    eprintln!("prometheus: both targets up after {:?}", t0.elapsed());
    // Enough samples for rate() over 10 s windows.
    tokio::time::sleep(Duration::from_secs(12)).await;

    let series = |r: &Value| r["data"]["result"].as_array().map_or(0, Vec::len);
    // Every alert expression evaluates, and every metric it reads has series from the operator.
    for a in alerts(&rules) {
        let expr = a["expr"].as_str().unwrap();
        let r = prom.query(expr).await;
        assert_eq!(r["status"], "success", "{}: {expr}: {r}", a["alert"]);
        for m in metric_names(expr) {
            let r = prom.query(&format!("{m}{{namespace=\"{}\"}}", ns.name)).await;
            assert!(series(&r) > 0, "{}: no series for {m}", a["alert"]);
        }
    }
    // Every dashboard query evaluates and returns series.
    let queries = dashboard_queries(&ns.name);
    assert!(queries.len() >= 15, "{} queries", queries.len());
    for (panel, expr) in &queries {
        let r = prom.query(expr).await;
        assert_eq!(r["status"], "success", "{panel}: {expr}: {r}");
        assert!(series(&r) > 0, "{panel}: no series for {expr}: {r}");
    }
    // A few values that must be right for the panels to mean anything.
    let value = |r: &Value| -> f64 { r["data"]["result"][0]["value"][1].as_str().unwrap().parse().unwrap() };
    assert_eq!(value(&prom.query("sum(ray_operator_leader)").await), 1.0, "one leader of two replicas");
    let running =
        prom.query(&format!("max(ray_operator_clusters{{namespace=\"{}\",phase=\"Running\"}})", ns.name)).await;
    assert_eq!(value(&running), 2.0, "both clusters Running");
    let shards =
        prom.query("sum(ray_operator_shard_clusters * on (instance) group_left () (ray_operator_leader == 1))");
    assert_eq!(value(&shards.await), 2.0, "the leader's shards own both clusters");

    // The alert fires for both clusters; no other alert is firing (a leader exists, no errors...).
    let firing = wait_until(Duration::from_secs(60), "RayClusterGcsUnreachable firing", || async {
        let a = prom.get("/api/v1/alerts").await?;
        let list = a["data"]["alerts"].as_array()?.clone();
        list.iter()
            .any(|x| x["labels"]["alertname"] == "RayClusterGcsUnreachable" && x["state"] == "firing")
            .then_some(list)
    })
    .await;
    eprintln!("RayClusterGcsUnreachable firing {:?} after Prometheus started", t0.elapsed());
    let gcs = firing.iter().find(|x| x["labels"]["alertname"] == "RayClusterGcsUnreachable").unwrap();
    assert_eq!(gcs["labels"]["namespace"], ns.name.as_str());
    assert_eq!(gcs["labels"]["severity"], "warning");
    assert_eq!(gcs["value"].as_str().map(|v| v.parse::<f64>().unwrap()), Some(2.0));
    assert!(gcs["annotations"]["summary"].as_str().unwrap().starts_with("2 RayCluster(s)"), "{gcs}");
    let others: Vec<&Value> =
        firing.iter().filter(|x| x["labels"]["alertname"] != "RayClusterGcsUnreachable").collect();
    assert!(others.is_empty(), "only the GCS alert is active: {others:?}");
    assert!(!prom.log().contains("level=error"), "prometheus logged errors:\n{}", prom.log());
}
