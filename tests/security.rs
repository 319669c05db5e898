//! Whoever can edit a RayCluster must not gain the operator's powers (issue 15), against the real
//! API server and the real operator binary:
//! 1. podConfigs naming the operator's own ServiceAccount are refused (phase Error, a Warning
//!    Event naming the field, no pods); Ray pods that name no ServiceAccount get no API token;
//! 2. the `cluster.ray.io/gcs-address` annotation is ignored unless the operator allows it, and
//!    AutoscalerHealthy says what kind of failure it saw, never the raw transport error;
//! 3. (tests/untrusted_gcs.rs)
//! 4. the health server closes connections that never finish their headers, caps how many are
//!    open, and keeps answering probes meanwhile.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use ray_operator::api::{Phase, RayCluster};
use support::*;

fn pod_config(prefix: &str, service_account: Option<(&str, &str)>) -> serde_json::Value {
    let mut spec = serde_json::json!({"containers": [{"name": "ray", "image": "rayproject/ray", "command": ["sleep", "infinity"]}]});
    if let Some((key, name)) = service_account {
        spec[key] = name.into();
    }
    serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": prefix}, "spec": spec})
}

/// A cluster of one head and one worker (minWorkers 1); `head_sa`/`worker_sa` set
/// `(serviceAccountName | serviceAccount, name)` on that type's podConfig.
fn cluster(name: &str, head_sa: Option<(&str, &str)>, worker_sa: Option<(&str, &str)>) -> String {
    serde_json::json!({
        "apiVersion": "cluster.ray.io/v1", "kind": "RayCluster", "metadata": {"name": name},
        "spec": {"maxWorkers": 1, "headPodType": "head", "podTypes": [
            {"name": "head", "podConfig": pod_config("ray-head-", head_sa)},
            {"name": "worker", "minWorkers": 1, "maxWorkers": 1, "podConfig": pod_config("ray-worker-", worker_sa)}]}
    })
    .to_string()
}

async fn pods_of(client: &Client, ns: &str, cluster: &str) -> Vec<k8s_openapi::api::core::v1::Pod> {
    live_pods(client, ns, &format!("ray-cluster-name={cluster}")).await
}

#[tokio::test]
async fn the_operators_own_service_account_is_refused_and_ray_pods_get_no_token_by_default() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "own-sa").await;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns.name);
    for name in ["ray-operator-sa", "ray-pods"] {
        let sa: ServiceAccount = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        sas.create(&PostParams::default(), &sa).await.unwrap();
    }
    // As the Deployment runs it: its ServiceAccount (downward API) and namespace.
    let op = OperatorProcess::start(
        &["--no-leader-election", "--namespaces", &ns.name, "--operator-namespace", &ns.name],
        &[("RAY_OPERATOR_SERVICE_ACCOUNT", "ray-operator-sa")],
    );
    let own = Some(("serviceAccountName", "ray-operator-sa"));
    let own_deprecated = Some(("serviceAccount", "ray-operator-sa"));
    apply_yaml(&ns.name, &cluster("head-as-operator", own, None));
    apply_yaml(&ns.name, &cluster("worker-as-operator", None, own_deprecated));
    apply_yaml(&ns.name, &cluster("plain", None, None));
    apply_yaml(&ns.name, &cluster("own-account", Some(("serviceAccountName", "ray-pods")), None));

    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), &ns.name);
    for (name, field) in [
        ("head-as-operator", "spec.podTypes[0].podConfig.spec.serviceAccountName"),
        ("worker-as-operator", "spec.podTypes[1].podConfig.spec.serviceAccount"),
    ] {
        let (reason, message) = wait_until(Duration::from_secs(60), &format!("{name} in phase Error"), || async {
            let s = rcs.get(name).await.ok()?.status?;
            let ready = s.conditions.iter().find(|c| c.type_ == "Ready")?;
            (s.phase == Some(Phase::Error)).then(|| (ready.reason.clone(), ready.message.clone()))
        })
        .await;
        assert_eq!(reason, "InvalidSpec", "{name}");
        assert!(message.contains(field) && message.contains("ray-operator-sa"), "{name}: {message}");
    }
    // The valid ones run; the refused ones have no pods at all.
    for name in ["plain", "own-account"] {
        wait_until(Duration::from_secs(60), &format!("{name} Running"), || async {
            (rcs.get(name).await.ok()?.status?.phase == Some(Phase::Running)).then_some(())
        })
        .await;
    }
    for name in ["head-as-operator", "worker-as-operator"] {
        assert!(pods_of(&client, &ns.name, name).await.is_empty(), "{name} must have no pods");
    }
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    wait_until(Duration::from_secs(20), "Warning Events naming the field", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        let named = |cluster: &str, field: &str| {
            list.items.iter().any(|e| {
                e.type_.as_deref() == Some("Warning")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(cluster)
                    && e.note.as_deref().is_some_and(|n| n.contains(field))
            })
        };
        (named("head-as-operator", "serviceAccountName") && named("worker-as-operator", "spec.serviceAccount"))
            .then_some(())
    })
    .await;

    // No ServiceAccount named: no token (the API server mounts none). One named: the user's choice.
    let plain = pods_of(&client, &ns.name, "plain").await;
    assert_eq!(plain.len(), 2);
    for p in &plain {
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false), "{:?}", p.metadata.name);
        let vols = spec.volumes.clone().unwrap_or_default();
        assert!(!vols.iter().any(|v| v.name.starts_with("kube-api-access")), "no token volume: {vols:?}");
    }
    let own = pods_of(&client, &ns.name, "own-account").await;
    let head = own.iter().find(|p| p.metadata.labels.as_ref().unwrap()["ray-node-type"] == "head").unwrap();
    let spec = head.spec.as_ref().unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some("ray-pods"));
    assert_eq!(spec.automount_service_account_token, None, "a named ServiceAccount keeps its token");

    // Fixing the spec clears the error.
    apply_yaml(&ns.name, &cluster("head-as-operator", Some(("serviceAccountName", "ray-pods")), None));
    wait_until(Duration::from_secs(60), "fixed cluster Running", || async {
        (rcs.get("head-as-operator").await.ok()?.status?.phase == Some(Phase::Running)).then_some(())
    })
    .await;

    // /metrics is label-bounded: no namespace or cluster names.
    let (_, metrics) = op.get("/metrics").await.expect("metrics");
    for name in [ns.name.as_str(), "head-as-operator", "plain", "own-account"] {
        assert!(!metrics.contains(name), "/metrics names {name}:\n{metrics}");
    }
    assert!(!op.logs().contains("panicked"));
}

/// A TCP "service" that is not a GCS: it counts connections and answers each with bytes that are
/// no HTTP/2 (a TLS alert, as an open TLS port would send), then closes.
struct Honeypot {
    addr: String,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Honeypot {
    async fn start() -> Self {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                h.fetch_add(1, Ordering::SeqCst);
                let _ = s.write_all(&[0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x46]).await;
            }
        });
        Self { addr, hits, task }
    }
}

impl Drop for Honeypot {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn annotated(name: &str, gcs: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&cluster(name, None, None)).unwrap();
    v["metadata"]["annotations"] = serde_json::json!({"cluster.ray.io/gcs-address": gcs});
    v.to_string()
}

async fn autoscaler_condition(client: &Client, ns: &str, name: &str) -> Option<(String, String, String)> {
    let api: Api<RayCluster> = Api::namespaced(client.clone(), ns);
    let s = api.get(name).await.ok()?.status?;
    let c = s.conditions.into_iter().find(|c| c.type_ == "AutoscalerHealthy")?;
    Some((c.status, c.reason, c.message))
}

/// Words of raw transport errors that must not reach a condition.
const RAW: &[&str] = &["refused", "broken pipe", "reset", "os error", "tcp connect", "h2", "transport", "Connection"];

#[tokio::test]
async fn the_gcs_address_annotation_needs_the_operator_flag_and_conditions_are_classified() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "gcs-addr").await;
    let honeypot = Honeypot::start().await;
    let closed = format!("127.0.0.1:{}", free_port());
    apply_yaml(&ns.name, &annotated("pointed", &honeypot.addr));
    apply_yaml(&ns.name, &annotated("closed", &closed));

    // Without the flag the annotation is ignored: the links dial the head Services.
    let flags = ["--no-leader-election", "--namespaces", &ns.name, "--autoscaler-interval", "0.5"];
    let op = OperatorProcess::start(&flags, &[]);
    for name in ["pointed", "closed"] {
        let (_, _, message) =
            wait_until(Duration::from_secs(60), &format!("{name}: AutoscalerHealthy=False"), || async {
                let c = autoscaler_condition(&client, &ns.name, name).await?;
                (c.0 == "False" && !["HeadNotRunning", "Connecting"].contains(&c.1.as_str())).then_some(c)
            })
            .await;
        assert!(!message.contains(&honeypot.addr) && !message.contains(&closed), "{name}: {message}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(honeypot.hits.load(Ordering::SeqCst), 0, "the operator dialled the annotation without the flag");
    let logs = op.logs();
    assert!(!logs.contains(&format!("GCS at {}", honeypot.addr)), "{logs}");
    drop(op);

    // With the flag it is honoured, and the conditions classify what went wrong.
    let op = OperatorProcess::start(&[&flags[..], &["--allow-gcs-address-annotation"]].concat(), &[]);
    for (name, addr, reason, summary) in [
        ("pointed", honeypot.addr.as_str(), "GcsProtocolError", "protocol error"),
        ("closed", closed.as_str(), "GcsUnreachable", "unreachable"),
    ] {
        let (_, got, message) = wait_until(Duration::from_secs(60), &format!("{name}: {reason}"), || async {
            let c = autoscaler_condition(&client, &ns.name, name).await?;
            (c.0 == "False" && c.2.contains(addr)).then_some(c)
        })
        .await;
        assert_eq!(got, reason, "{name}: {message}");
        assert!(message.contains(summary), "{name}: {message}");
        for raw in RAW {
            assert!(!message.contains(raw), "{name}: the condition carries a raw error ({raw}): {message}");
        }
    }
    assert!(honeypot.hits.load(Ordering::SeqCst) > 0, "with the flag the annotation is dialled");
    // The raw errors are in the operator's log, at debug level only.
    let logs = op.logs();
    for line in logs.lines().filter(|l| l.contains("level=warn") || l.contains("level=error")) {
        for raw in RAW {
            assert!(!line.contains(raw), "a warning carries a raw error ({raw}): {line}");
        }
    }
    assert!(logs.lines().any(|l| l.contains("level=debug") && l.contains(&closed)), "{logs}");
}

#[tokio::test]
async fn the_health_server_outlasts_slow_clients() {
    use tokio::io::AsyncWriteExt;
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "health").await;
    let op = OperatorProcess::start(&["--no-leader-election", "--namespaces", &ns.name], &[]);
    op.wait_ready().await;

    // More connections than the cap, each stuck in the middle of its headers (slowloris).
    const SLOW: usize = 200;
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", op.health_port)).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
        slow.push(s);
    }
    let opened = Instant::now();
    // Probes still answer promptly, every time.
    for _ in 0..5 {
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(2), op.get("/healthz")).await;
        assert!(matches!(r, Ok(Some((200, _)))), "/healthz with {SLOW} slow connections open: {r:?}");
        assert!(t.elapsed() < Duration::from_secs(1), "/healthz took {:?}", t.elapsed());
    }
    /// Whether the server closed this connection (EOF or reset; a 408 or 400 before closing
    /// counts too). Non-blocking, so 200 connections are checked in an instant.
    fn closed(s: &tokio::net::TcpStream) -> bool {
        let mut buf = [0u8; 256];
        !matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
    // Let the server's closes arrive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The cap: the oldest went at once, to make room for the newer ones and the probes.
    let mut early = 0;
    for s in &slow {
        if closed(s) {
            early += 1;
        }
    }
    assert!(opened.elapsed() < Duration::from_secs(2), "checked before the header timeout");
    assert!(early >= SLOW - 128, "at most 128 connections stay open: only {early} of {SLOW} were closed");
    // The header timeout: every slow one is closed within it (3 s) plus slack.
    let deadline = opened + Duration::from_secs(6);
    let mut open: Vec<&tokio::net::TcpStream> = slow.iter().collect();
    while !open.is_empty() && Instant::now() < deadline {
        open.retain(|s| !closed(s));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        open.is_empty(),
        "{} slow connections still open {:?} after they were opened",
        open.len(),
        opened.elapsed()
    );
    assert!(matches!(op.get("/healthz").await, Some((200, _))));
    assert!(!op.logs().contains("panicked"));
}
