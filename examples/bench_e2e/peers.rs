//! Benchmark 7: side by side with the peer users choose between (issue 16). ray-operator, the
//! plain-client baseline and KubeRay v1.5.0 (its defaults and tuned) each bring N clusters (head +
//! 2 workers, the same container resources) to all pods existing, on a fresh control plane of its
//! own, in two scenarios:
//!
//! - *live*: the operator runs and N clusters are created through the API (as section 1);
//! - *backlog*: N clusters exist before the operator starts; the clock starts when its process
//!   starts (what an operator restart after an outage costs).
//!
//! KubeRay is built from the Go module proxy by `e2e/kuberay/build` (cached) and runs as a local
//! process, never as an image; its CRDs come from the same module, applied server-side.

use super::*;

use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};

/// Who brings the clusters up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contender {
    Ours,
    Baseline,
    KubeRayDefaults,
    KubeRayTuned,
    /// Diagnostic, run only when named in `--peers`: the plain client plus what makes an operator
    /// one (an Event per cluster, watches of pods, Services and RayClusters). Between it and
    /// ray-operator is what the operator itself costs; between it and the plain client, the
    /// price of those requests.
    Mix,
}

impl Contender {
    const ALL: [Contender; 4] = [Self::Ours, Self::Baseline, Self::KubeRayDefaults, Self::KubeRayTuned];
    /// Run only when named in `--peers`.
    const DIAGNOSTIC: [Contender; 1] = [Self::Mix];

    fn label(self) -> &'static str {
        match self {
            Self::Ours => "ray-operator",
            Self::Baseline => "plain client",
            Self::Mix => "plain client + operator's requests",
            Self::KubeRayDefaults => "KubeRay defaults",
            Self::KubeRayTuned => "KubeRay tuned",
        }
    }

    fn kuberay(self) -> bool {
        matches!(self, Self::KubeRayDefaults | Self::KubeRayTuned)
    }

    /// The flags KubeRay is run with. Defaults are its own (`--reconcile-concurrency 1`, QPS 100,
    /// burst 200); tuned is what its scale docs use. Never worse than its docs allow.
    fn kuberay_flags(self) -> &'static [&'static str] {
        match self {
            Self::KubeRayTuned => &["--reconcile-concurrency", "10", "--qps", "1000", "--burst", "2000"],
            _ => &[],
        }
    }

    /// The part of its user agent that tells its requests apart in the audit log.
    fn agent_tag(self) -> &'static str {
        match self {
            Self::Ours => "(bench-op)",
            Self::Baseline => "(bench-baseline)",
            Self::Mix => "(bench-mix)",
            // controller-runtime's client as KubeRay configures it: `kuberay-operator/<version>`.
            Self::KubeRayDefaults | Self::KubeRayTuned => "kuberay-operator/",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Live,
    Backlog,
}

impl Scenario {
    fn label(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Backlog => "backlog",
        }
    }
}

#[derive(Debug, Default, Clone)]
struct PeerRun {
    /// From the clock's start (first create / process start) until all 3N pods were seen.
    pods_s: f64,
    /// Until all 3N pods were Running.
    running_s: f64,
    peak_rss: f64,
    settled_rss: f64,
    cpu_s: f64,
    cp_cpu_s: f64,
    requests: ReqCounts,
    /// ray-operator only: a standby replica started once all pods ran (peak, settled RSS).
    standby_rss: Option<(f64, f64)>,
    /// Watches of pods that kwok (the fake kubelets) started during the run: see
    /// [`KWOK_WATCHES_NOTE`].
    kwok_pod_watches: usize,
}

/// Why the side-by-side table counts kwok's pod watches.
const KWOK_WATCHES_NOTE: &str = "\"kwok pod watches\": how many times kwok, which stands in for the kubelets, \
     started a watch of pods during the run. client-go ends a watch every 5–10 minutes, so a run of 15 minutes \
     has two or three. Upstream kwok v0.8.0 re-watches from `resourceVersion=0`, which re-sends every pod; at \
     N = 10,000 the API server dropped such a watch for falling behind, and kwok looped on full re-sends for the \
     rest of the run at about 0.6 of a core, slowing whichever contender was running. `e2e/controlplane/kwok` \
     builds kwok with watches that resume from their resourceVersion; many more watches than minutes ÷ 5 would \
     mean the loop is back, and the run's times say more about kwok than about the contender.";

/// KubeRay's RayCluster (ray.io/v1) equivalent to `deploy/example_cluster.yaml`: a head and one
/// group of two workers, with the same container resources, ports, volume and image.
fn kuberay_cluster(name: &str) -> Result<DynamicObject> {
    let container = |name: &str, ports: bool| {
        let mut c = serde_json::json!({
            "name": name,
            "image": "rayproject/ray:nightly",
            "resources": {"requests": {"cpu": "1000m", "memory": "512Mi"}, "limits": {"memory": "512Mi"}},
            "volumeMounts": [{"mountPath": "/dev/shm", "name": "dshm"}],
        });
        if ports {
            c["ports"] = serde_json::json!([
                {"containerPort": 6379, "name": "gcs"},
                {"containerPort": 10001, "name": "client"},
                {"containerPort": 8265, "name": "dashboard"},
            ]);
        }
        c
    };
    let template = |c: serde_json::Value| serde_json::json!({"spec": {"containers": [c], "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]}});
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": name},
        "spec": {
            "headGroupSpec": {"rayStartParams": {}, "template": template(container("ray-head", true))},
            "workerGroupSpecs": [{
                "groupName": "worker-node",
                "replicas": 2, "minReplicas": 2, "maxReplicas": 3,
                "rayStartParams": {},
                "template": template(container("ray-worker", false)),
            }],
        },
    }))?)
}

fn kuberay_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("ray.io", "v1", "RayCluster");
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk_with_plural(&gvk, "rayclusters"))
}

/// KubeRay as a local process (its manager: leader election on, as deployed, metrics and probes on
/// loopback ports).
struct KubeRayProc {
    child: Child,
    probe: u16,
    log: PathBuf,
}

impl KubeRayProc {
    fn start(opts: &Opts, cp: &Cp, flags: &[&str]) -> Result<Self> {
        let dir = opts.args.kuberay.as_ref().ok_or_else(|| anyhow!("--kuberay DIR (e2e/kuberay/build) is not set"))?;
        let (metrics, probe) = (free_port(), free_port());
        let log = opts.work.join(format!("kuberay-{}.log", k8s_openapi::jiff::Timestamp::now().as_millisecond()));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(dir.join("bin/ray-operator-kuberay"))
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
            .args(["--health-probe-bind-address", &format!("127.0.0.1:{probe}")])
            .args(["--leader-election-namespace", OPERATOR_NS])
            .args(flags)
            .env("KUBECONFIG", &cp.kubeconfig)
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("start KubeRay")?;
        Ok(Self { child, probe, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn wait_ready(&self) -> Result<()> {
        poll(Duration::from_secs(60), "KubeRay /readyz", || async {
            let url = format!("127.0.0.1:{}", self.probe);
            let mut s = tokio::net::TcpStream::connect(&url).await.ok()?;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.ok()?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.ok()?;
            String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200").then_some(())
        })
        .await
        .with_context(|| format!("KubeRay log:\n{}", tail(&self.log, 20)))
    }
}

impl Drop for KubeRayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The running contender (kept alive for the run's duration).
enum Running {
    Ours(OpProc),
    KubeRay(KubeRayProc),
    Baseline(tokio::task::JoinHandle<Result<()>>),
}

impl Running {
    fn pid(&self) -> Option<u32> {
        match self {
            Self::Ours(p) => Some(p.pid()),
            Self::KubeRay(p) => Some(p.pid()),
            Self::Baseline(_) => None,
        }
    }
}

/// Control plane for `n` clusters: kwok nodes with room for all 3n pods of 1 CPU each (a node
/// holds 4,000 CPUs and 5,000 pods).
fn control_plane(opts: &Opts, name: &str, n: usize, kuberay: bool) -> Result<Cp> {
    let nodes = (3 * n).div_ceil(4000).max(2);
    let cp = Cp::up_with(opts, name, &[("CP_NODES", nodes.to_string())])?;
    if kuberay {
        let dir = opts.args.kuberay.as_ref().ok_or_else(|| anyhow!("--kuberay DIR is not set"))?;
        // Server-side: the CRDs are too large for the last-applied annotation of a client-side apply.
        cp.kubectl_ok(&["apply", "--server-side", "-f", dir.join("crd").to_str().unwrap_or_default()])?;
        for crd in ["rayclusters.ray.io", "rayjobs.ray.io", "rayservices.ray.io"] {
            cp.wait_crd_established(crd)?;
        }
    }
    Ok(cp)
}

/// Creates the N clusters (the contender's kind) with `concurrency` requests in flight.
async fn create_clusters(opts: &Opts, client: &Client, n: usize, kuberay: bool) -> Result<()> {
    if kuberay {
        let api = kuberay_api(client, "bench");
        futures::stream::iter(0..n)
            .map(|i| {
                let api = api.clone();
                async move {
                    api.create(&PostParams::default(), &kuberay_cluster(&format!("rc-{i:05}"))?).await?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(opts.args.concurrency)
            .try_collect::<Vec<_>>()
            .await?;
    } else {
        let base = example_cluster(&opts.repo)?;
        let rcs: Api<RayCluster> = Api::namespaced(client.clone(), "bench");
        futures::stream::iter(0..n)
            .map(|i| {
                let rcs = rcs.clone();
                let rc = cluster(&base, &format!("rc-{i:05}"), 2);
                async move {
                    rcs.create(&PostParams::default(), &rc?).await?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(opts.args.concurrency)
            .try_collect::<Vec<_>>()
            .await?;
    }
    Ok(())
}

/// The plain client's work for the backlog: list the RayClusters once, then for each the same head
/// Service (server-side apply) and three pods the operator would make, `concurrency` in flight.
async fn baseline_backlog(client: Client, concurrency: usize, mix: bool) -> Result<()> {
    let extras = mix.then(|| OperatorRequests::start(&client));
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), "bench");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "bench");
    let svcs: Api<Service> = Api::namespaced(client.clone(), "bench");
    let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let list = rcs.list(&ListParams::default()).await?;
    futures::stream::iter(list.items)
        .map(|rc| {
            let (pods, svcs, pp, extras) = (pods.clone(), svcs.clone(), pp.clone(), &extras);
            async move {
                baseline_children(&rc, &pods, &svcs, &pp).await?;
                if let Some(x) = extras {
                    x.created(&rc);
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    if let Some(x) = extras {
        x.finish().await?;
    }
    Ok(())
}

/// What makes an operator more than the plain client, for the diagnostic contender: one Event
/// per cluster, sent the way ray-operator sends them (off the clusters' path, 4 in flight, as
/// `EVENTS_IN_FLIGHT`, so that a cluster's pods never wait for its Event), and the operator's
/// three watches (pods and Services by the cluster label, RayClusters), drained while it runs.
struct OperatorRequests {
    events: futures::channel::mpsc::UnboundedSender<K8sEvent>,
    publisher: tokio::task::JoinHandle<()>,
    watches: Vec<tokio::task::JoinHandle<()>>,
}

impl OperatorRequests {
    fn start(client: &Client) -> Self {
        let api: Api<K8sEvent> = Api::namespaced(client.clone(), "bench");
        let (events, queue) = futures::channel::mpsc::unbounded::<K8sEvent>();
        let publisher = tokio::spawn(queue.for_each_concurrent(4, move |e| {
            let api = api.clone();
            async move {
                let _ = api.create(&PostParams::default(), &e).await;
            }
        }));
        let config = || watcher::Config::default().page_size(100);
        let labelled = || config().labels(LABEL_CLUSTER);
        let pods = watcher::watcher(Api::<Pod>::all(client.clone()), labelled());
        let svcs = watcher::watcher(Api::<Service>::all(client.clone()), labelled());
        let rcs = watcher::watcher(Api::<RayCluster>::all(client.clone()), config());
        let watches = vec![
            tokio::spawn(pods.for_each(|_| futures::future::ready(()))),
            tokio::spawn(svcs.for_each(|_| futures::future::ready(()))),
            tokio::spawn(rcs.for_each(|_| futures::future::ready(()))),
        ];
        Self { events, publisher, watches }
    }

    /// Queues the Event of a cluster whose children were just made.
    fn created(&self, rc: &RayCluster) {
        let _ = self.events.unbounded_send(created_event(rc));
    }

    /// Waits for the queued Events to be sent, then stops the watches.
    async fn finish(self) -> Result<()> {
        drop(self.events);
        self.publisher.await?;
        self.watches.iter().for_each(tokio::task::JoinHandle::abort);
        Ok(())
    }
}

/// An Event like the one ray-operator writes when it brings a cluster up.
fn created_event(rc: &RayCluster) -> K8sEvent {
    let now = k8s_openapi::jiff::Timestamp::now();
    let name = rc.name_any();
    K8sEvent {
        metadata: kube::api::ObjectMeta {
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            namespace: rc.namespace(),
            ..Default::default()
        },
        event_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now)),
        type_: Some("Normal".into()),
        reason: Some("Created".into()),
        action: Some("Created".into()),
        note: Some(format!(
            "Created head service {name}-ray-head; created head pod: {name}-head-xxxxx; created 2 worker pod(s) of \
             type worker-node: {name}-worker-xxxxx, {name}-worker-yyyyy"
        )),
        regarding: Some(kube::Resource::object_ref(rc, &())),
        reporting_controller: Some("ray-operator-bench/mix".into()),
        reporting_instance: Some("bench-mix".into()),
        ..Default::default()
    }
}

/// The plain client's work in the live scenario: create each RayCluster, then its children.
async fn baseline_live(client: Client, base: serde_json::Value, n: usize, concurrency: usize, mix: bool) -> Result<()> {
    let extras = mix.then(|| OperatorRequests::start(&client));
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), "bench");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "bench");
    let svcs: Api<Service> = Api::namespaced(client.clone(), "bench");
    let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    futures::stream::iter(0..n)
        .map(|i| {
            let (rcs, pods, svcs, pp, extras) = (rcs.clone(), pods.clone(), svcs.clone(), pp.clone(), &extras);
            let rc = cluster(&base, &format!("rc-{i:05}"), 2);
            async move {
                let created = rcs.create(&PostParams::default(), &rc?).await?;
                baseline_children(&created, &pods, &svcs, &pp).await?;
                if let Some(x) = extras {
                    x.created(&created);
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    if let Some(x) = extras {
        x.finish().await?;
    }
    Ok(())
}

async fn peer_run(opts: &Opts, who: Contender, scenario: Scenario, n: usize) -> Result<PeerRun> {
    let name: String =
        who.label().chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let tag = format!("peers-{}-{name}-{n}", scenario.label());
    let cp = control_plane(opts, &tag, n, who.kuberay())?;
    let driver = cp.client("ray-operator-bench/driver (bench-driver)").await?;
    create_namespace(&driver, OPERATOR_NS).await?;
    create_namespace(&driver, "bench").await?;
    let tracker = if who.kuberay() {
        Tracker::start_with(&driver, "bench", &TrackLabels::KUBERAY).await?
    } else {
        Tracker::start(&driver, "bench").await?
    };
    if scenario == Scenario::Backlog {
        log(format!("peers N={n} {}: creating the backlog", scenario.label()));
        create_clusters(opts, &driver, n, who.kuberay()).await?;
        // Let the API server finish its own work on the creates before the clock starts.
        tokio::time::sleep(Duration::from_secs(5)).await;
    }

    let start = |cp: &Cp| -> Result<Running> {
        Ok(match who {
            Contender::Ours => Running::Ours(OpProc::start(opts, cp, "bench-op", OPERATOR_NS, &[])?),
            Contender::KubeRayDefaults | Contender::KubeRayTuned => {
                Running::KubeRay(KubeRayProc::start(opts, cp, who.kuberay_flags())?)
            }
            Contender::Baseline | Contender::Mix => unreachable!("the baseline is started by the scenario"),
        })
    };
    log(format!("peers N={n} {}: {}", scenario.label(), who.label()));
    let cp_cpu0 = cp.cpu_s();
    let sys0 = SystemTime::now();
    let (t0, running) = match scenario {
        Scenario::Live => {
            // The operator is up (and leading) before the clock starts, as in section 1.
            let running = match who {
                Contender::Baseline | Contender::Mix => None,
                _ => {
                    let r = start(&cp)?;
                    match &r {
                        Running::Ours(p) => {
                            p.wait_ready().await?;
                            p.wait_leader().await?;
                        }
                        Running::KubeRay(p) => p.wait_ready().await?,
                        Running::Baseline(_) => {}
                    }
                    Some(r)
                }
            };
            tokio::time::sleep(Duration::from_secs(2)).await;
            let t0 = Instant::now();
            let running = match running {
                Some(r) => {
                    create_clusters(opts, &driver, n, who.kuberay()).await?;
                    r
                }
                None => {
                    let client = cp.client(&format!("ray-operator-bench/baseline {}", who.agent_tag())).await?;
                    let base = example_cluster(&opts.repo)?;
                    let mix = who == Contender::Mix;
                    Running::Baseline(tokio::spawn(baseline_live(client, base, n, opts.args.concurrency, mix)))
                }
            };
            (t0, running)
        }
        Scenario::Backlog => {
            let t0 = Instant::now();
            let running = match who {
                Contender::Baseline | Contender::Mix => {
                    let client = cp.client(&format!("ray-operator-bench/baseline {}", who.agent_tag())).await?;
                    let mix = who == Contender::Mix;
                    Running::Baseline(tokio::spawn(baseline_backlog(client, opts.args.concurrency, mix)))
                }
                _ => start(&cp)?,
            };
            (t0, running)
        }
    };
    let cpu0 = running.pid().and_then(proc_stats).unwrap_or_default();
    let timeout = opts.scale_timeout(n) * 3;
    let t_pods = tracker.wait(timeout, "all pods", |s| s.pods_seen_at(3 * n, |_| true)).await?;
    let t_running = tracker.wait(timeout, "all pods Running", |s| s.pods_running_at(3 * n)).await?;
    if let Running::Baseline(h) = running {
        h.await??;
        return finish(opts, &cp, who, None, cp_cpu0, sys0, t0, t_pods, t_running, cpu0).await;
    }
    finish(opts, &cp, who, Some(running), cp_cpu0, sys0, t0, t_pods, t_running, cpu0).await
}

#[allow(clippy::too_many_arguments)]
async fn finish(
    opts: &Opts,
    cp: &Cp,
    who: Contender,
    running: Option<Running>,
    cp_cpu0: f64,
    sys0: SystemTime,
    t0: Instant,
    t_pods: Instant,
    t_running: Instant,
    cpu0: ProcStats,
) -> Result<PeerRun> {
    log(format!(
        "  {}: all pods {:.1} s, all pods Running {:.1} s",
        who.label(),
        (t_pods - t0).as_secs_f64(),
        (t_running - t0).as_secs_f64()
    ));
    // Settle: trailing status writes.
    tokio::time::sleep(Duration::from_secs(if opts.smoke() { 2 } else { 10 })).await;
    let sys1 = SystemTime::now();
    let after = match running.as_ref().and_then(Running::pid) {
        Some(pid) => proc_stats(pid).ok_or_else(|| anyhow!("{} exited during the run", who.label()))?,
        None => ProcStats::default(),
    };
    let reqs = cp.requests(who.agent_tag())?;
    let kwok_pod_watches = cp
        .requests("kwok/")?
        .iter()
        .filter(|r| r.verb == "watch" && r.resource == "pods" && r.at >= sys0 && r.at <= sys1)
        .count();
    let standby_rss = match &running {
        Some(Running::Ours(_)) => match standby(opts, cp).await {
            Ok(s) => Some(s),
            Err(e) => {
                log(format!("  ray-operator standby FAILED: {e:#}"));
                None
            }
        },
        _ => None,
    };
    drop(running);
    Ok(PeerRun {
        pods_s: (t_pods - t0).as_secs_f64(),
        running_s: (t_running - t0).as_secs_f64(),
        peak_rss: after.hwm_mib,
        settled_rss: after.rss_mib,
        cpu_s: after.cpu_s - cpu0.cpu_s,
        cp_cpu_s: cp.cpu_s() - cp_cpu0,
        requests: ReqCounts::of(&reqs, sys0, sys1),
        standby_rss,
        kwok_pod_watches,
    })
}

/// A second replica of ours, started after the run (so it costs the timed part nothing) while
/// the leader still holds the Lease: it lists all N clusters, 3N pods and N Services at once (the
/// worst moment of a standby's life) and then only watches. Peak and settled RSS, 10 s after its
/// caches are listed.
async fn standby(opts: &Opts, cp: &Cp) -> Result<(f64, f64)> {
    let p = OpProc::start(opts, cp, "bench-standby", OPERATOR_NS, &[])?;
    p.wait_ready().await?;
    tokio::time::sleep(Duration::from_secs(if opts.smoke() { 2 } else { 10 })).await;
    let s = proc_stats(p.pid()).ok_or_else(|| anyhow!("the standby exited"))?;
    log(format!("  ray-operator standby: peak RSS {:.1} MiB, settled {:.1} MiB", s.hwm_mib, s.rss_mib));
    Ok((s.hwm_mib, s.rss_mib))
}

pub(super) async fn peers(opts: &Opts) -> Result<Section> {
    let sizes = if opts.args.peer_sizes.is_empty() {
        if opts.smoke() { vec![20] } else { vec![1000, 10000] }
    } else {
        opts.args.peer_sizes.clone()
    };
    let named = |c: &Contender| opts.args.peers.iter().any(|p| p == c.label());
    let contenders: Vec<Contender> = Contender::ALL
        .into_iter()
        .filter(|c| opts.args.peers.is_empty() || named(c))
        .chain(Contender::DIAGNOSTIC.into_iter().filter(named))
        .collect();
    let mut sec = Section::new("7. Side by side: ray-operator, a plain client and KubeRay v1.5.0", &[]);
    let mut header = vec!["N".to_string(), "scenario".into(), "figure".into()];
    header.extend(contenders.iter().map(|c| c.label().to_string()));
    header.extend(["ours ÷ KubeRay tuned".to_string(), "target".into(), String::new()]);
    sec.header = header;
    sec.method = vec![
        "Every contender gets a fresh control plane of its own (kwok nodes with room for all pods) and brings N \
         clusters (head + 2 workers, 1 CPU / 512 Mi each) to all pods existing. *live*: the operator is up and \
         leading, then N clusters are created with 32 requests in flight; the clock starts at the first create. \
         *backlog*: the N clusters exist before the operator starts; the clock starts when its process starts. \
         ray-operator: one leader-elected replica, default flags. Plain client: the benchmark process making only \
         the Service and the three pods per cluster (live: also the RayCluster creates). KubeRay: v1.5.0 built from \
         the Go module proxy (`e2e/kuberay/build`), a local process with leader election, its CRDs applied \
         server-side; defaults (`--reconcile-concurrency 1`, QPS 100, burst 200) and tuned \
         (`--reconcile-concurrency 10 --qps 1000 --burst 2000`). RSS is VmHWM (peak) and VmRSS 10 s after all pods \
         Running (settled); API requests from the audit log by user agent. For ray-operator, a standby replica is \
         then started beside the leader (so it costs the timed part nothing): it lists every cluster, pod and Service \
         at once and then only watches; its RSS is read 10 s after its caches are listed."
            .into(),
        "\"ours ÷ KubeRay tuned\": for times, KubeRay's ÷ ours (above 1 = we are faster); for RSS, KubeRay's ÷ ours \
         (how many times smaller we are)."
            .into(),
        KWOK_WATCHES_NOTE.into(),
    ];
    for &n in &sizes {
        let scenarios = [Scenario::Live, Scenario::Backlog]
            .into_iter()
            .filter(|s| opts.args.peer_scenarios.is_empty() || opts.args.peer_scenarios.iter().any(|p| p == s.label()));
        for scenario in scenarios {
            let mut runs: Vec<(Contender, Option<PeerRun>)> = Vec::new();
            for &who in &contenders {
                // KubeRay's defaults take hours at 10,000 (1 reconcile at a time at QPS 100).
                if who == Contender::KubeRayDefaults && n > opts.args.kuberay_defaults_max {
                    runs.push((who, None));
                    continue;
                }
                match peer_run(opts, who, scenario, n).await {
                    Ok(r) => runs.push((who, Some(r))),
                    Err(e) => {
                        log(format!("peers N={n} {}: {} FAILED: {e:#}", scenario.label(), who.label()));
                        sec.notes.push(format!(
                            "N = {n}, {}, {}: **failed**: `{}`",
                            scenario.label(),
                            who.label(),
                            format!("{e:#}").replace('`', "'")
                        ));
                        runs.push((who, None));
                    }
                }
            }
            peer_rows(&mut sec, n, scenario, &runs);
        }
    }
    Ok(sec)
}

fn peer_rows(sec: &mut Section, n: usize, scenario: Scenario, runs: &[(Contender, Option<PeerRun>)]) {
    let get = |c: Contender| runs.iter().find(|(w, _)| *w == c).and_then(|(_, r)| r.as_ref());
    let ours = get(Contender::Ours);
    let tuned = get(Contender::KubeRayTuned);
    let base = get(Contender::Baseline);
    // (figure, value, unit, precision, applies to the baseline, how to compare with KubeRay)
    #[derive(Clone, Copy)]
    enum Cmp {
        /// Smaller is better: KubeRay's ÷ ours.
        TheirsOverOurs,
        None,
    }
    type Figure<'a> = (&'a str, &'a dyn Fn(&PeerRun) -> f64, &'a str, usize, bool, Cmp);
    let writes = |r: &PeerRun| r.requests.writes() as f64 / n as f64;
    // The target counts writes on the clusters' objects: the Lease's renewals and the leader's
    // label on its own pod are one operator's, however many clusters it runs.
    let own = |r: &PeerRun| {
        let operator = r
            .requests
            .matching(|v, res| (res == "leases" && WRITE_VERBS.contains(&v)) || (v == "patch" && res == "pods"));
        (r.requests.writes() - operator) as f64 / n as f64
    };
    let standby_peak = |r: &PeerRun| r.standby_rss.map_or(f64::NAN, |s| s.0);
    let standby_settled = |r: &PeerRun| r.standby_rss.map_or(f64::NAN, |s| s.1);
    let figures: [Figure<'_>; 13] = [
        ("all pods exist", &|r| r.pods_s, "s", 1, true, Cmp::TheirsOverOurs),
        ("all pods Running", &|r| r.running_s, "s", 1, true, Cmp::TheirsOverOurs),
        ("pods per second", &|r| 3.0 * n as f64 / r.pods_s.max(1e-9), "/s", 0, true, Cmp::None),
        ("peak RSS", &|r| r.peak_rss, "MiB", 1, false, Cmp::TheirsOverOurs),
        ("settled RSS", &|r| r.settled_rss, "MiB", 1, false, Cmp::TheirsOverOurs),
        ("standby peak RSS", &standby_peak, "MiB", 1, false, Cmp::None),
        ("standby settled RSS", &standby_settled, "MiB", 1, false, Cmp::None),
        ("CPU (user+system)", &|r| r.cpu_s, "s", 1, false, Cmp::TheirsOverOurs),
        (
            "API requests per cluster (non-watch)",
            &|r| r.requests.non_watch() as f64 / n as f64,
            "",
            2,
            true,
            Cmp::TheirsOverOurs,
        ),
        ("API writes per cluster", &writes, "", 2, true, Cmp::TheirsOverOurs),
        ("API writes per cluster, without the Lease and pod patches", &own, "", 2, true, Cmp::TheirsOverOurs),
        ("control-plane CPU", &|r| r.cp_cpu_s, "s", 1, true, Cmp::TheirsOverOurs),
        ("kwok pod watches", &|r| r.kwok_pod_watches as f64, "", 0, true, Cmp::None),
    ];
    for (figure, f, unit, prec, with_base, cmp) in figures {
        let mut cells = vec![n.to_string(), scenario.label().to_string(), figure.to_string()];
        for (who, r) in runs {
            cells.push(match r {
                // NaN: a figure this contender does not have (a standby of KubeRay).
                Some(r) if (with_base || !matches!(who, Contender::Baseline | Contender::Mix)) && !f(r).is_nan() => {
                    format!("{:.prec$} {unit}", f(r)).trim().to_string()
                }
                Some(_) => "—".into(),
                None if *who == Contender::KubeRayDefaults => "not run (hours at this N)".into(),
                None => "failed".into(),
            });
        }
        cells.push(match (cmp, ours, tuned) {
            (Cmp::TheirsOverOurs, Some(o), Some(t)) => format!("{:.2}", f(t) / f(o).max(1e-9)),
            _ => "—".into(),
        });
        let (target, met) = match figure {
            "all pods exist" => {
                ("ahead of KubeRay tuned".to_string(), ours.zip(tuned).map(|(o, t)| o.pods_s < t.pods_s))
            }
            "peak RSS" if n >= 10000 => (
                "≤ 128 MiB; ≥ 3× smaller than KubeRay tuned".to_string(),
                ours.zip(tuned).map(|(o, t)| o.peak_rss <= 128.0 && t.peak_rss / o.peak_rss >= 3.0),
            ),
            "standby peak RSS" if n >= 10000 => {
                ("≤ 128 MiB".to_string(), ours.and_then(|o| o.standby_rss).map(|s| s.0 <= 128.0))
            }
            "peak RSS" => (
                "≥ 3× smaller than KubeRay tuned".to_string(),
                ours.zip(tuned).map(|(o, t)| t.peak_rss / o.peak_rss >= 3.0),
            ),
            "API writes per cluster, without the Lease and pod patches" if scenario == Scenario::Live => {
                ("≤ 6 (ours)".to_string(), ours.map(|o| own(o) <= 6.0))
            }
            _ => ("—".to_string(), None),
        };
        cells.push(target);
        cells.push(verdict(met).to_string());
        sec.row(cells);
    }
    // The plain client is what the API server allows: our speed as a share of it.
    let share = ours.zip(base).map(|(o, b)| b.pods_s / o.pods_s.max(1e-9));
    let mut cells =
        vec![n.to_string(), scenario.label().to_string(), "all pods exist: plain client's time ÷ ours".into()];
    for (who, _) in runs {
        cells.push(match (who, share) {
            (Contender::Ours, Some(x)) => format!("{x:.2}"),
            _ => "—".into(),
        });
    }
    cells.push("—".into());
    let judged = n >= 1000;
    cells.push(if judged { "≥ 0.95".into() } else { "—".into() });
    cells.push(verdict(share.filter(|_| judged).map(|x| x >= 0.95)).to_string());
    sec.row(cells);
    // The diagnostic: what the operator's requests cost (mix vs plain) and what is left to the
    // operator itself (ours vs mix).
    if let (Some(o), Some(m)) = (ours, get(Contender::Mix)) {
        let mut cells = vec![
            n.to_string(),
            scenario.label().to_string(),
            "all pods exist: plain client + operator's requests, its time ÷ ours".into(),
        ];
        for (who, _) in runs {
            cells.push(if *who == Contender::Ours {
                format!("{:.2}", m.pods_s / o.pods_s.max(1e-9))
            } else {
                "—".into()
            });
        }
        cells.extend(["—".into(), "—".into(), "—".into()]);
        sec.row(cells);
    }
    for (who, r) in runs {
        if let Some(r) = r {
            sec.notes.push(format!("N = {n}, {}, {}: {}.", scenario.label(), who.label(), r.requests.summary()));
        }
    }
}
