//! End-to-end benchmarks of ray-operator (issue 7), run by `e2e/bench`: scale, idle cost, fairness,
//! failover, reaction and decision, each printed as one Markdown table with its target and the
//! baseline measured in the same run.
//!
//! ```sh
//! e2e/bench            # full run (release build) -> BENCHMARKS.md; takes a long while on 2 cores
//! e2e/bench --smoke    # CI-sized (debug build)   -> target/BENCHMARKS-smoke.md; a few minutes
//! ```
//!
//! The driver starts its own control planes (`e2e/cluster up` with `CP_AUDIT_ALL=1`, so the audit
//! log has every request with its user agent; each in a private `CP_DIR`, with a watchdog that
//! takes it down if this process dies) and runs the operator binary as local processes, each with
//! its own `POD_NAME` and therefore its own user agent. Where a benchmark needs a clean API server
//! (every scale run, including its baseline) it gets a fresh control plane.
//!
//! Timings come from a watch in this process (what a user would observe), API request counts from
//! the audit log, memory and CPU from `/proc/<pid>`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Config, ResourceExt};
use ray_operator::api::{Phase, RayCluster};
use ray_operator::autoscaler::decision::get_nodes_to_launch;
use ray_operator::autoscaler::fixture::{
    BenchInput, json_values_equal, plan_from_json, plan_from_json_with_upscaling_speed,
};
use ray_operator::cache::ClusterKey;
use ray_operator::model::desired::{LABEL_CLUSTER, LABEL_LAUNCH_HASH, LABEL_NODE_KIND, desired};
use ray_operator::ray::GcsClient;
use ray_operator::reconciler::FIELD_MANAGER;
use ray_operator::runtime::shards::shard_of;
use serde::Deserialize;

/// The operator's default number of shards (`--shards`), for picking a worst-case cluster name.
const DEFAULT_SHARDS: usize = 8;
/// Namespace of the operator's own Lease (and its replicas' pods) in the scale and fairness runs.
const OPERATOR_NS: &str = "ray-operator";

#[derive(Debug, Parser)]
#[command(about = "End-to-end benchmarks of ray-operator (run through e2e/bench)")]
struct Args {
    /// CI-sized run: N = 20, two hand-overs, short idle window.
    #[arg(long)]
    smoke: bool,
    /// The ray-operator binary (default: next to this example's directory).
    #[arg(long)]
    operator: Option<PathBuf>,
    /// Where to write the Markdown report.
    #[arg(long)]
    out: PathBuf,
    /// Directory for control planes and operator logs (default: a new temp dir).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Only these benchmarks (comma-separated): scale, idle, fairness, failover, reaction, decision.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Bin dir of a virtualenv with ray==2.60.0 (e2e/ray-venv), for the decision baseline.
    #[arg(long)]
    ray_bin: Option<PathBuf>,
    /// Scale sizes (number of RayClusters); default 100,1000 (smoke: 20).
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<usize>,
    /// Repetitions of each scale size (default: 5 at N <= 100, 2 above; smoke: 1).
    #[arg(long)]
    reps: Option<usize>,
    /// Idle window in seconds (default 300; smoke 15).
    #[arg(long)]
    idle_secs: Option<u64>,
    /// Requests in flight when applying RayClusters, for both the operator run and the baseline.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Extra flags for the operator in the scale, idle and fairness runs (e.g. --operator-arg=--shards=16).
    #[arg(long = "operator-arg")]
    operator_args: Vec<String>,
    /// Scale and idle: measure only the default configuration, not also `--no-autoscaler`.
    #[arg(long)]
    no_variants: bool,
    /// Scale: also run the diagnostic baseline (a plain client with the operator's request mix) at
    /// every size (by default only at N >= 1000 in a full run).
    #[arg(long)]
    diagnose: bool,
}

struct Opts {
    args: Args,
    repo: PathBuf,
    operator: PathBuf,
    work: PathBuf,
}

impl Opts {
    fn smoke(&self) -> bool {
        self.args.smoke
    }
    fn wants(&self, what: &str) -> bool {
        self.args.only.is_empty() || self.args.only.iter().any(|o| o == what)
    }
    fn sizes(&self) -> Vec<usize> {
        if !self.args.sizes.is_empty() {
            self.args.sizes.clone()
        } else if self.smoke() {
            vec![20]
        } else {
            vec![100, 1000]
        }
    }
    fn reps(&self, n: usize) -> usize {
        self.args.reps.unwrap_or(if self.smoke() {
            1
        } else if n <= 100 {
            5
        } else {
            2
        })
    }
    /// Whether to run the diagnostic baseline with the operator's request mix at size `n`: at the
    /// largest size of a full run, or at every size with --diagnose.
    fn mix_baseline(&self, n: usize, largest: usize) -> bool {
        self.args.diagnose || (!self.smoke() && n == largest && n >= 1000)
    }
    /// Generous timeouts: N = 1,000 is 3,000 pods on kwok on a 2-core machine.
    fn scale_timeout(&self, n: usize) -> Duration {
        Duration::from_secs(120 + n as u64 * 2)
    }
}

fn log(msg: impl AsRef<str>) {
    let now = k8s_openapi::jiff::Timestamp::now().strftime("%H:%M:%S");
    eprintln!("bench {now}: {}", msg.as_ref());
}

// ---------------------------------------------------------------------------------------------
// Statistics and formatting
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Stats {
    n: usize,
    median: f64,
    p95: f64,
    max: f64,
}

fn stats(xs: &[f64]) -> Option<Stats> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    let p95 = v[((n * 95).div_ceil(100)).max(1) - 1];
    Some(Stats { n, median, p95, max: v[n - 1] })
}

/// `median (max M)` with a unit and precision; `—` when there is nothing.
fn med_max(xs: &[f64], unit: &str, prec: usize) -> String {
    match stats(xs) {
        None => "—".into(),
        Some(s) if s.n == 1 => format!("{:.prec$} {unit}", s.median),
        Some(s) => format!("{:.prec$} {unit} (max {:.prec$})", s.median, s.max),
    }
}

fn med_p95_max(xs: &[f64], unit: &str, prec: usize) -> String {
    match stats(xs) {
        None => "—".into(),
        Some(s) if s.n == 1 => format!("{:.prec$} {unit}", s.median),
        Some(s) => format!("{:.prec$} {unit} (p95 {:.prec$}, max {:.prec$})", s.median, s.p95, s.max),
    }
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "**met**",
        Some(false) => "**not met**",
        None => "—",
    }
}

/// One benchmark's Markdown: a heading, how it was measured, a table and notes.
struct Section {
    title: String,
    method: Vec<String>,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    notes: Vec<String>,
}

impl Section {
    fn new(title: &str, header: &[&str]) -> Self {
        Self {
            title: title.into(),
            method: vec![],
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: vec![],
            notes: vec![],
        }
    }
    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
    fn markdown(&self) -> String {
        let mut s = format!("## {}\n\n", self.title);
        for m in &self.method {
            s.push_str(m);
            s.push('\n');
        }
        if !self.method.is_empty() {
            s.push('\n');
        }
        if !self.header.is_empty() {
            s.push_str(&format!("| {} |\n", self.header.join(" | ")));
            s.push_str(&format!("|{}\n", "---|".repeat(self.header.len())));
            for r in &self.rows {
                s.push_str(&format!("| {} |\n", r.join(" | ")));
            }
            s.push('\n');
        }
        for n in &self.notes {
            s.push_str(n);
            s.push('\n');
        }
        if !self.notes.is_empty() {
            s.push('\n');
        }
        s
    }
}

fn failed_section(title: &str, e: &anyhow::Error) -> Section {
    let mut s = Section::new(title, &[]);
    s.notes.push(format!("**The benchmark failed:** `{}`", format!("{e:#}").replace('`', "'")));
    s
}

// ---------------------------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------------------------

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

#[derive(Clone, Copy, Debug, Default)]
struct ProcStats {
    rss_mib: f64,
    hwm_mib: f64,
    cpu_s: f64,
}

fn proc_stats(pid: u32) -> Option<ProcStats> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> Option<f64> {
        status.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse::<f64>().ok()
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ProcStats { rss_mib: kib("VmRSS:")? / 1024.0, hwm_mib: kib("VmHWM:")? / 1024.0, cpu_s: ticks / clock_ticks() })
}

/// CPU seconds the whole machine has been busy (all cores), from /proc/stat.
fn machine_busy_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else { return 0.0 };
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: f64 = v.iter().enumerate().filter(|(i, _)| ![3, 4].contains(i)).take(8).map(|(_, x)| x).sum();
    busy / clock_ticks()
}

/// CPU seconds this process (the benchmark driver) has used.
fn self_cpu_s() -> f64 {
    proc_stats(std::process::id()).map_or(0.0, |p| p.cpu_s)
}

// ---------------------------------------------------------------------------------------------
// Control plane
// ---------------------------------------------------------------------------------------------

struct Cp {
    dir: PathBuf,
    kubeconfig: PathBuf,
    bin: PathBuf,
    repo: PathBuf,
}

impl Cp {
    fn up(opts: &Opts, name: &str) -> Result<Self> {
        // Unique per driver process: a watchdog of an earlier run must never find "its" directory.
        let dir = opts.work.join(format!("{name}-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        log(format!("control plane {name}: starting"));
        let out = Command::new(opts.repo.join("e2e/cluster"))
            .arg("up")
            .env("CP_DIR", &dir)
            .env("CP_AUDIT_ALL", "1")
            .env("CP_OWNER_PID", std::process::id().to_string())
            .stderr(Stdio::inherit())
            .output()
            .context("run e2e/cluster up")?;
        if !out.status.success() {
            bail!("e2e/cluster up failed for {name}");
        }
        let bin = PathBuf::from(std::fs::read_to_string(dir.join("bindir"))?.trim());
        let cp = Self { kubeconfig: dir.join("admin.kubeconfig"), dir, bin, repo: opts.repo.clone() };
        cp.kubectl_ok(&["apply", "-f", opts.repo.join("crds/cluster_crd.yaml").to_str().unwrap()])?;
        cp.kubectl_ok(&["wait", "--for=condition=established", "--timeout=60s", "crd/rayclusters.cluster.ray.io"])?;
        Ok(cp)
    }

    fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(self.bin.join("kubectl")).args(args).env("KUBECONFIG", &self.kubeconfig).output()?;
        if !out.status.success() {
            bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn client(&self, agent: &str) -> Result<Client> {
        let kc = Kubeconfig::read_from(&self.kubeconfig)?;
        let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        config.headers.push((http::header::USER_AGENT, http::HeaderValue::from_str(agent)?));
        Ok(Client::try_from(config)?)
    }

    /// CPU seconds used so far by all control-plane processes (etcd, apiserver, KCM, scheduler, kwok).
    fn cpu_s(&self) -> f64 {
        let pids = std::fs::read_to_string(self.dir.join("pids")).unwrap_or_default();
        pids.lines()
            .filter_map(|l| l.split_whitespace().next()?.parse::<u32>().ok())
            .filter_map(proc_stats)
            .map(|p| p.cpu_s)
            .sum()
    }

    /// Every request in the audit log whose user agent contains `tag`, one per request (audit
    /// ID), in order of arrival.
    fn requests(&self, tag: &str) -> Result<Vec<Req>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("audit") && n.ends_with(".log"))
            })
            .collect();
        files.sort();
        let mut by_id: HashMap<String, Req> = HashMap::new();
        for f in files {
            let reader = std::io::BufReader::new(std::fs::File::open(&f)?);
            for line in reader.lines() {
                let line = line?;
                if !line.contains(tag) {
                    continue;
                }
                let Ok(ev) = serde_json::from_str::<AuditLine>(&line) else { continue };
                if !ev.user_agent.contains(tag) {
                    continue;
                }
                let Ok(ts) = ev.request_received_timestamp.parse::<k8s_openapi::jiff::Timestamp>() else { continue };
                let o = ev.object_ref.unwrap_or_default();
                let resource = match (&o.resource, &o.subresource) {
                    (Some(r), Some(s)) => format!("{r}/{s}"),
                    (Some(r), None) => r.clone(),
                    _ => "-".into(),
                };
                by_id.entry(ev.audit_id).or_insert(Req {
                    verb: ev.verb,
                    resource,
                    name: o.name,
                    at: SystemTime::from(ts),
                    code: ev.response_status.and_then(|s| s.code),
                    uri: ev.request_uri,
                });
            }
        }
        let mut v: Vec<Req> = by_id.into_values().collect();
        v.sort_by_key(|r| r.at);
        Ok(v)
    }
}

impl Drop for Cp {
    fn drop(&mut self) {
        let _ = Command::new(self.repo.join("e2e/cluster"))
            .arg("down")
            .env("CP_DIR", &self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuditLine {
    #[serde(rename = "auditID")]
    audit_id: String,
    verb: String,
    #[serde(default)]
    user_agent: String,
    #[serde(default, rename = "requestURI")]
    request_uri: String,
    object_ref: Option<ObjRef>,
    response_status: Option<RespStatus>,
    request_received_timestamp: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ObjRef {
    resource: Option<String>,
    subresource: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct RespStatus {
    code: Option<i32>,
}

/// One API request from the audit log.
#[derive(Clone, Debug)]
struct Req {
    verb: String,
    /// `pods`, `rayclusters/status`, `leases`, ...
    resource: String,
    name: Option<String>,
    at: SystemTime,
    code: Option<i32>,
    #[allow(dead_code)]
    uri: String,
}

const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

impl Req {
    fn is_write(&self) -> bool {
        WRITE_VERBS.contains(&self.verb.as_str())
    }
}

/// Requests in a time window, by kind.
#[derive(Clone, Debug, Default)]
struct ReqCounts {
    watches: usize,
    /// Non-watch requests answered with an error status (>= 400).
    errors: usize,
    /// Everything but watches, by "verb resource".
    other: BTreeMap<String, usize>,
}

impl ReqCounts {
    fn of(reqs: &[Req], from: SystemTime, to: SystemTime) -> Self {
        let mut c = Self::default();
        for r in reqs.iter().filter(|r| r.at >= from && r.at <= to) {
            if r.verb == "watch" {
                c.watches += 1;
            } else {
                *c.other.entry(format!("{} {}", r.verb, r.resource)).or_default() += 1;
                c.errors += usize::from(r.code.is_some_and(|c| c >= 400));
            }
        }
        c
    }
    fn non_watch(&self) -> usize {
        self.other.values().sum()
    }
    fn matching(&self, f: impl Fn(&str, &str) -> bool) -> usize {
        self.other
            .iter()
            .filter(|(k, _)| {
                let (verb, res) = k.split_once(' ').unwrap_or((k, ""));
                f(verb, res)
            })
            .map(|(_, v)| v)
            .sum()
    }
    fn lease(&self) -> usize {
        self.matching(|_, r| r == "leases")
    }
    fn writes(&self) -> usize {
        self.matching(|v, _| WRITE_VERBS.contains(&v))
    }
    fn summary(&self) -> String {
        let mut s = self.other.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", ");
        if self.errors > 0 {
            s.push_str(&format!(" ({} answered with an error)", self.errors));
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Namespaces, clusters
// ---------------------------------------------------------------------------------------------

async fn create_namespace(client: &Client, name: &str) -> Result<()> {
    let nss: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
    nss.create(&PostParams::default(), &ns).await?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    poll(Duration::from_secs(60), &format!("ServiceAccount default in {name}"), || async {
        sas.get_opt("default").await.ok().flatten().map(|_| ())
    })
    .await
}

/// Deletes a namespace quickly (its pods without grace, as kwok would take each one's grace
/// period) and waits until it is gone, so the next repetition starts on a quiet API server.
async fn delete_namespace(client: &Client, name: &str) -> Result<()> {
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), name);
    let _ = rcs.delete_collection(&DeleteParams::default(), &ListParams::default()).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), name);
    let _ = pods
        .delete_collection(
            &DeleteParams { grace_period_seconds: Some(0), ..Default::default() },
            &ListParams::default(),
        )
        .await;
    let nss: Api<Namespace> = Api::all(client.clone());
    let _ = nss.delete(name, &DeleteParams::default()).await;
    poll(Duration::from_secs(300), &format!("namespace {name} gone"), || async {
        matches!(nss.get_opt(name).await, Ok(None)).then_some(())
    })
    .await
}

async fn poll<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {:?} waiting for {what}", timeout);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `deploy/example_cluster.yaml` (a head and two workers) as JSON.
fn example_cluster(repo: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(repo.join("deploy/example_cluster.yaml"))?;
    Ok(serde_yaml::from_str(&text)?)
}

/// The example cluster named `name`, with `workers` workers (min = max) instead of 2.
fn cluster(base: &serde_json::Value, name: &str, workers: u32) -> Result<RayCluster> {
    let mut v = base.clone();
    v["metadata"] = serde_json::json!({ "name": name });
    if workers != 2 {
        v["spec"]["maxWorkers"] = workers.into();
        let types = v["spec"]["podTypes"].as_array_mut().ok_or_else(|| anyhow!("no podTypes"))?;
        for t in types.iter_mut().filter(|t| t["name"] == "worker-node") {
            t["minWorkers"] = workers.into();
            t["maxWorkers"] = workers.into();
        }
    }
    Ok(serde_json::from_value(v)?)
}

// ---------------------------------------------------------------------------------------------
// A watch in this process: when each pod was first seen and first Running, when each RayCluster
// first reported Running.
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct PodSeen {
    cluster: String,
    head: bool,
    seen: Instant,
    running: Option<Instant>,
}

#[derive(Default)]
struct Seen {
    pods: HashMap<String, PodSeen>,
    rc_running: HashMap<String, Instant>,
    synced: usize,
}

impl Seen {
    /// When the `count`-th pod matching `f` was first seen.
    fn pods_seen_at(&self, count: usize, f: impl Fn(&PodSeen) -> bool) -> Option<Instant> {
        let mut t: Vec<Instant> = self.pods.values().filter(|p| f(p)).map(|p| p.seen).collect();
        if count == 0 || t.len() < count {
            return None;
        }
        t.sort();
        Some(t[count - 1])
    }
    fn pods_running_at(&self, count: usize) -> Option<Instant> {
        let mut t: Vec<Instant> = self.pods.values().filter_map(|p| p.running).collect();
        if count == 0 || t.len() < count {
            return None;
        }
        t.sort();
        Some(t[count - 1])
    }
    fn clusters_running_at(&self, count: usize) -> Option<Instant> {
        let mut t: Vec<Instant> = self.rc_running.values().copied().collect();
        if count == 0 || t.len() < count {
            return None;
        }
        t.sort();
        Some(t[count - 1])
    }
    fn cluster_pods(&self, cluster: &str) -> usize {
        self.pods.values().filter(|p| p.cluster == cluster).count()
    }
}

struct Tracker {
    seen: Arc<Mutex<Seen>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Tracker {
    async fn start(client: &Client, ns: &str) -> Result<Self> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let s = seen.clone();
        let t1 = tokio::spawn(async move {
            let mut stream =
                watcher::watcher(pods, watcher::Config::default().labels(LABEL_CLUSTER)).default_backoff().boxed();
            let mut synced = false;
            while let Some(ev) = stream.next().await {
                let now = Instant::now();
                let mut g = s.lock().unwrap();
                match ev {
                    Ok(Event::InitApply(p)) | Ok(Event::Apply(p)) => {
                        let labels = p.labels();
                        let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                        let e = g.pods.entry(p.name_any()).or_insert_with(|| PodSeen {
                            cluster: labels.get(LABEL_CLUSTER).cloned().unwrap_or_default(),
                            head: labels.get(LABEL_NODE_KIND).map(String::as_str) == Some("head"),
                            seen: now,
                            running: None,
                        });
                        if running && e.running.is_none() {
                            e.running = Some(now);
                        }
                    }
                    Ok(Event::InitDone) if !synced => {
                        synced = true;
                        g.synced += 1;
                    }
                    _ => {}
                }
            }
        });
        let rcs: Api<RayCluster> = Api::namespaced(client.clone(), ns);
        let s = seen.clone();
        let t2 = tokio::spawn(async move {
            let mut stream = watcher::watcher(rcs, watcher::Config::default()).default_backoff().boxed();
            let mut synced = false;
            while let Some(ev) = stream.next().await {
                let now = Instant::now();
                let mut g = s.lock().unwrap();
                match ev {
                    Ok(Event::InitApply(rc)) | Ok(Event::Apply(rc))
                        if rc.status.as_ref().and_then(|s| s.phase) == Some(Phase::Running) =>
                    {
                        g.rc_running.entry(rc.name_any()).or_insert(now);
                    }
                    Ok(Event::InitDone) if !synced => {
                        synced = true;
                        g.synced += 1;
                    }
                    _ => {}
                }
            }
        });
        let t = Self { seen, tasks: vec![t1, t2] };
        t.wait(Duration::from_secs(60), "watches synced", |s| (s.synced >= 2).then_some(())).await?;
        Ok(t)
    }

    async fn wait<T>(&self, timeout: Duration, what: &str, f: impl Fn(&Seen) -> Option<T>) -> Result<T> {
        let start = Instant::now();
        loop {
            let r = {
                let g = self.seen.lock().unwrap();
                f(&g)
            };
            if let Some(v) = r {
                return Ok(v);
            }
            if start.elapsed() > timeout {
                let (pods, running, rcs) = {
                    let g = self.seen.lock().unwrap();
                    (g.pods.len(), g.pods.values().filter(|p| p.running.is_some()).count(), g.rc_running.len())
                };
                bail!(
                    "timed out after {timeout:?} waiting for {what} ({pods} pods seen, {running} running, {rcs} clusters Running)"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Operator replicas as processes
// ---------------------------------------------------------------------------------------------

struct OpProc {
    name: String,
    child: Child,
    health: u16,
    log: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl OpProc {
    /// `ray-operator run` as replica `name` (its `POD_NAME`, hence its user agent), leader-elected
    /// with its Lease in `lease_ns`.
    fn start(opts: &Opts, cp: &Cp, name: &str, lease_ns: &str, extra: &[String]) -> Result<Self> {
        let health = free_port();
        let log = opts.work.join(format!("{name}-{}.log", k8s_openapi::jiff::Timestamp::now().as_millisecond()));
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(&opts.operator);
        cmd.arg("run")
            .args(["--health-addr", &format!("127.0.0.1:{health}")])
            .args(extra)
            .env("KUBECONFIG", &cp.kubeconfig)
            .env("POD_NAME", name)
            .env("POD_NAMESPACE", lease_ns)
            .env("RUST_LOG", std::env::var("BENCH_OPERATOR_LOG").unwrap_or_else(|_| "info,kube=warn".into()))
            .env_remove("RAY_OPERATOR_POD_NAMESPACE")
            .env_remove("RAY_OPERATOR_NAMESPACES")
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = cmd.spawn().with_context(|| format!("start {}", opts.operator.display()))?;
        Ok(Self { name: name.into(), child, health, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn tag(&self) -> String {
        format!("({})", self.name)
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.health)).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((code, body))
    }

    async fn wait_ready(&self) -> Result<()> {
        poll(Duration::from_secs(60), &format!("{} /readyz", self.name), || async {
            matches!(self.get("/readyz").await, Some((200, _))).then_some(())
        })
        .await
        .with_context(|| format!("log {}:\n{}", self.log.display(), tail(&self.log, 20)))
    }

    async fn metrics(&self) -> String {
        self.get("/metrics").await.map(|(_, b)| b).unwrap_or_default()
    }

    /// Sum of every sample of a metric (all label sets).
    async fn metric_sum(&self, name: &str) -> f64 {
        metric_sum(&self.metrics().await, name)
    }

    async fn wait_leader(&self) -> Result<()> {
        poll(Duration::from_secs(60), &format!("{} leads", self.name), || async {
            (self.metric_sum("ray_operator_leader").await == 1.0).then_some(())
        })
        .await
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status();
    }

    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for OpProc {
    fn drop(&mut self) {
        // Gracefully first (a profiler wrapping the operator writes its output on a clean exit).
        if let Ok(None) = self.child.try_wait() {
            self.signal("TERM");
            self.wait_exit(Duration::from_secs(30));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

async fn lease_holder(client: &Client, ns: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let l = leases.get_opt("ray-operator-leader").await.ok()??;
    l.spec?.holder_identity.filter(|h| !h.is_empty())
}

// ---------------------------------------------------------------------------------------------
// 1. Scale (and 2. Idle, which continues the last operator run at the largest N)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Clone)]
struct ScaleRun {
    /// Seconds from the first RayCluster create until all 3N pods were seen.
    pods_s: f64,
    /// Seconds until all clusters reported Running (operator) / all pods Running (baseline).
    running_s: f64,
    /// Seconds until the N RayClusters were created.
    rcs_s: f64,
    peak_rss: f64,
    settled_rss: f64,
    cpu_s: f64,
    /// Control-plane CPU seconds over the run.
    cp_cpu_s: f64,
    requests: ReqCounts,
    /// The operator's own count of its writes (`ray_operator_api_writes_total` + pods created).
    metric_writes: f64,
    /// CPU seconds used by everything else on the machine during the run (other people's work:
    /// the noise), per second of the run, i.e. in cores.
    other_cores: f64,
}

/// An operator configuration measured in the scale and idle benchmarks.
#[derive(Clone, Debug)]
struct Variant {
    /// Column label.
    label: String,
    args: Vec<String>,
}

/// The default configuration (what a deployment runs), and the same with `--no-autoscaler`, which
/// tells the base operator's cost apart from the autoscaler's: kwok pods run no Ray, so every
/// cluster's GCS is unreachable and the autoscaler works its error path.
fn variants(opts: &Opts) -> Vec<Variant> {
    let mut v = vec![Variant { label: "ours".into(), args: opts.args.operator_args.clone() }];
    // The smoke run measures the default only (the code path is the same).
    if !opts.args.operator_args.iter().any(|a| a == "--no-autoscaler") && !opts.args.no_variants && !opts.smoke() {
        let mut args = opts.args.operator_args.clone();
        args.push("--no-autoscaler".into());
        v.push(Variant { label: "`--no-autoscaler`".into(), args });
    }
    v
}

/// The control plane and operator of an operator run, kept for the idle measurement.
struct Keep {
    cp: Cp,
    op: OpProc,
    n: usize,
    _tracker: Tracker,
}

async fn scale_operator_run(
    opts: &Opts,
    variant: &Variant,
    n: usize,
    rep: usize,
    keep: bool,
) -> Result<(ScaleRun, Option<Keep>)> {
    let tag = if variant.args.iter().any(|a| a == "--no-autoscaler") { "noauto" } else { "op" };
    let cp = Cp::up(opts, &format!("scale-{tag}-{n}-{rep}"))?;
    let client = cp.client("ray-operator-bench/driver (bench-driver)").await?;
    create_namespace(&client, OPERATOR_NS).await?;
    create_namespace(&client, "bench").await?;
    let op = OpProc::start(opts, &cp, "bench-op", OPERATOR_NS, &variant.args)?;
    op.wait_ready().await?;
    op.wait_leader().await?;
    let tracker = Tracker::start(&client, "bench").await?;
    let base = example_cluster(&opts.repo)?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    log(format!("scale N={n} rep {rep}: {} run", variant.label));
    let cpu0 = proc_stats(op.pid()).unwrap_or_default();
    let cp_cpu0 = cp.cpu_s();
    let (busy0, self0) = (machine_busy_s(), self_cpu_s());
    let sys0 = SystemTime::now();
    let t0 = Instant::now();
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), "bench");
    futures::stream::iter(0..n)
        .map(|i| {
            let rcs = rcs.clone();
            let rc = cluster(&base, &format!("rc-{i:04}"), 2);
            async move { rcs.create(&PostParams::default(), &rc?).await.map_err(anyhow::Error::from) }
        })
        .buffer_unordered(opts.args.concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    let rcs_s = t0.elapsed().as_secs_f64();
    let timeout = opts.scale_timeout(n);
    let t_pods = tracker.wait(timeout, "all pods", |s| s.pods_seen_at(3 * n, |_| true)).await?;
    let t_running = tracker.wait(timeout, "all clusters Running", |s| s.clusters_running_at(n)).await?;
    log(format!(
        "scale N={n} rep {rep}: {}: pods {:.1} s, Running {:.1} s",
        variant.label,
        (t_pods - t0).as_secs_f64(),
        (t_running - t0).as_secs_f64()
    ));
    // Settle: trailing status writes and events.
    tokio::time::sleep(Duration::from_secs(if opts.smoke() { 2 } else { 10 })).await;
    let sys1 = SystemTime::now();
    let after = proc_stats(op.pid()).ok_or_else(|| anyhow!("operator exited; log:\n{}", tail(&op.log, 30)))?;
    let cp_cpu = cp.cpu_s() - cp_cpu0;
    let other = (machine_busy_s() - busy0) - cp_cpu - (after.cpu_s - cpu0.cpu_s) - (self_cpu_s() - self0);
    let other_cores = other.max(0.0) / t0.elapsed().as_secs_f64();
    let m = op.metrics().await;
    let metric_writes =
        metric_sum(&m, "ray_operator_api_writes_total") + metric_sum(&m, "ray_operator_children_created_total");
    let reqs = cp.requests(&op.tag())?;
    let run = ScaleRun {
        pods_s: (t_pods - t0).as_secs_f64(),
        running_s: (t_running - t0).as_secs_f64(),
        rcs_s,
        peak_rss: after.hwm_mib,
        settled_rss: after.rss_mib,
        cpu_s: after.cpu_s - cpu0.cpu_s,
        cp_cpu_s: cp_cpu,
        requests: ReqCounts::of(&reqs, sys0, sys1),
        metric_writes,
        other_cores,
    };
    let kept = keep.then(|| Keep { cp, op, n, _tracker: tracker });
    Ok((run, kept))
}

/// The baseline: a plain client (this process, kube-rs with its defaults: no client-side rate
/// limit, like the operator) creates the same N RayClusters and, as each is created, the same
/// Service (server-side apply, as the operator does) and the same three pods (POST with
/// generateName) — what the operator must at least do — with the same number of requests in flight.
///
/// With `mix`, the client also makes the operator's other writes for each cluster — three Events
/// and two status patches (Updating, then Running), as the operator does with `--no-autoscaler` —
/// which tells whether the operator is slower than the API server allows for the requests it makes.
async fn scale_baseline_run(opts: &Opts, n: usize, rep: usize, mix: bool) -> Result<ScaleRun> {
    let cp = Cp::up(opts, &format!("scale-{}-{n}-{rep}", if mix { "mix" } else { "base" }))?;
    let driver = cp.client("ray-operator-bench/driver (bench-driver)").await?;
    create_namespace(&driver, "bench").await?;
    let client = cp.client("ray-operator-bench/baseline (bench-baseline)").await?;
    let tracker = Tracker::start(&driver, "bench").await?;
    let base = example_cluster(&opts.repo)?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let what = if mix { "baseline with the operator's request mix" } else { "baseline" };
    log(format!("scale N={n} rep {rep}: {what} run"));
    let cp_cpu0 = cp.cpu_s();
    let (busy0, self0) = (machine_busy_s(), self_cpu_s());
    let sys0 = SystemTime::now();
    let t0 = Instant::now();
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), "bench");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "bench");
    let svcs: Api<Service> = Api::namespaced(client.clone(), "bench");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "bench");
    let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let rc_done = Arc::new(Mutex::new(Vec::<Instant>::new()));
    futures::stream::iter(0..n)
        .map(|i| {
            let (rcs, pods, svcs, pp, rc_done) = (rcs.clone(), pods.clone(), svcs.clone(), pp.clone(), rc_done.clone());
            let events = events.clone();
            let rc = cluster(&base, &format!("rc-{i:04}"), 2);
            async move {
                let created = rcs.create(&PostParams::default(), &rc?).await?;
                rc_done.lock().unwrap().push(Instant::now());
                let d = desired(&created).map_err(|e| anyhow!("{e}"))?;
                let mut svc = d.service.clone();
                svc.metadata
                    .labels
                    .get_or_insert_with(BTreeMap::new)
                    .insert(LABEL_LAUNCH_HASH.into(), d.service_hash.clone());
                let mut value = serde_json::to_value(&svc)?;
                value["apiVersion"] = "v1".into();
                value["kind"] = "Service".into();
                let name = svc.name_any();
                let worker = &d.workers[0].pod;
                let apply = PatchParams::apply(FIELD_MANAGER).force();
                let body = Patch::Apply(&value);
                let (s, h, w1, w2) = tokio::join!(
                    svcs.patch(&name, &apply, &body),
                    pods.create(&pp, &d.head.pod),
                    pods.create(&pp, worker),
                    pods.create(&pp, worker),
                );
                s?;
                let (head, w1, w2) = (h?, w1?, w2?);
                if mix {
                    let pods_created = [head.name_any(), w1.name_any(), w2.name_any()];
                    let reasons = ["CreatedService", "CreatedHeadPod", "CreatedWorkerPods"];
                    let bodies: Vec<_> =
                        reasons.iter().map(|r| operator_like_event(&created, r, &pods_created)).collect();
                    let post = PostParams::default();
                    let evs = futures::future::join_all(bodies.iter().map(|b| events.create(&post, b))).await;
                    for e in evs {
                        e?;
                    }
                    let name = created.name_any();
                    for (phase, ready) in [("Updating", 0), ("Running", 2)] {
                        let status = operator_like_status(&created, phase, ready, &pods_created[0]);
                        rcs.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await?;
                    }
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(opts.args.concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    let rcs_s = rc_done.lock().unwrap().iter().max().map_or(0.0, |t| (*t - t0).as_secs_f64());
    let timeout = opts.scale_timeout(n);
    let t_pods = tracker.wait(timeout, "all pods", |s| s.pods_seen_at(3 * n, |_| true)).await?;
    let t_running = tracker.wait(timeout, "all pods Running", |s| s.pods_running_at(3 * n)).await?;
    log(format!(
        "scale N={n} rep {rep}: {what}: pods {:.1} s, pods Running {:.1} s",
        (t_pods - t0).as_secs_f64(),
        (t_running - t0).as_secs_f64()
    ));
    tokio::time::sleep(Duration::from_secs(if opts.smoke() { 2 } else { 10 })).await;
    let sys1 = SystemTime::now();
    let cp_cpu = cp.cpu_s() - cp_cpu0;
    let other = (machine_busy_s() - busy0) - cp_cpu - (self_cpu_s() - self0);
    let reqs = cp.requests("(bench-baseline)")?;
    let _ = what;
    Ok(ScaleRun {
        pods_s: (t_pods - t0).as_secs_f64(),
        running_s: (t_running - t0).as_secs_f64(),
        rcs_s,
        cp_cpu_s: cp_cpu,
        requests: ReqCounts::of(&reqs, sys0, sys1),
        other_cores: other.max(0.0) / t0.elapsed().as_secs_f64(),
        ..Default::default()
    })
}

/// An Event like the operator's (events.k8s.io/v1, about the RayCluster).
fn operator_like_event(rc: &RayCluster, reason: &str, pods: &[String]) -> k8s_openapi::api::events::v1::Event {
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
    k8s_openapi::api::events::v1::Event {
        metadata: ObjectMeta { generate_name: Some(format!("{}-", rc.name_any())), ..Default::default() },
        event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
        action: Some(reason.into()),
        reason: Some(reason.into()),
        note: Some(format!("{reason}: {}", pods.join(", "))),
        type_: Some("Normal".into()),
        reporting_controller: Some("ray-operator".into()),
        reporting_instance: Some("bench-baseline".into()),
        regarding: Some(ObjectReference {
            api_version: Some("cluster.ray.io/v1".into()),
            kind: Some("RayCluster".into()),
            name: rc.metadata.name.clone(),
            namespace: rc.metadata.namespace.clone(),
            uid: rc.metadata.uid.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A status patch like the operator's.
fn operator_like_status(rc: &RayCluster, phase: &str, ready: u32, head: &str) -> serde_json::Value {
    let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let running = phase == "Running";
    serde_json::json!({ "status": {
        "autoscalerRetries": 0,
        "conditions": [
            {"lastTransitionTime": now, "message": format!("head and {ready}/2 workers are ready"),
             "observedGeneration": 1, "reason": if running { "ClusterReady" } else { "Reconciling" },
             "status": if running { "True" } else { "False" }, "type": "Ready"},
            {"lastTransitionTime": now, "message": "the head pod is running and ready", "observedGeneration": 1,
             "reason": if running { "HeadPodReady" } else { "HeadPodNotReady" },
             "status": if running { "True" } else { "False" }, "type": "HeadReady"}
        ],
        "headPodName": head,
        "headServiceName": format!("{}-ray-head", rc.name_any()),
        "observedGeneration": 1,
        "phase": phase,
        "podTypes": [{"desired": 2, "name": "worker-node", "ready": ready}],
        "workers": format!("{ready}/2")
    }})
}

/// The idle figures of one operator configuration.
#[derive(Debug, Clone)]
struct IdleRun {
    label: String,
    n: usize,
    window_s: f64,
    requests: ReqCounts,
    cpu_s: f64,
    /// CPU % of a core per tenth of the window.
    cpu_samples: Vec<f64>,
    rss: f64,
    cp_cpu_s: f64,
}

async fn idle_measure(opts: &Opts, label: &str, keep: Keep) -> Result<IdleRun> {
    let secs = opts.args.idle_secs.unwrap_or(if opts.smoke() { 15 } else { 300 });
    log(format!("idle ({label}): {} clusters Running; measuring for {secs} s", keep.n));
    tokio::time::sleep(Duration::from_secs(if opts.smoke() { 2 } else { 20 })).await;
    let p0 = proc_stats(keep.op.pid()).ok_or_else(|| anyhow!("operator exited"))?;
    let cp0 = keep.cp.cpu_s();
    let sys0 = SystemTime::now();
    let mut samples = Vec::new();
    let mut last = p0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs_f64(secs as f64 / 10.0)).await;
        let p = proc_stats(keep.op.pid()).ok_or_else(|| anyhow!("operator exited"))?;
        samples.push((p.cpu_s - last.cpu_s) / (secs as f64 / 10.0) * 100.0);
        last = p;
    }
    let sys1 = SystemTime::now();
    let reqs = keep.cp.requests(&keep.op.tag())?;
    Ok(IdleRun {
        label: label.into(),
        n: keep.n,
        window_s: sys1.duration_since(sys0)?.as_secs_f64(),
        requests: ReqCounts::of(&reqs, sys0, sys1),
        cpu_s: last.cpu_s - p0.cpu_s,
        cpu_samples: samples,
        rss: last.rss_mib,
        cp_cpu_s: keep.cp.cpu_s() - cp0,
    })
}

/// Whether a configuration's runs meet a target.
type Judge<'a> = dyn Fn(&[ScaleRun]) -> bool + 'a;

fn ratio_text(xs: &[f64]) -> String {
    stats(xs).map_or("—".into(), |s| format!("{:.2}", s.median))
}

async fn scale(opts: &Opts, with_idle: bool) -> Result<(Section, Vec<IdleRun>)> {
    let sizes = opts.sizes();
    let largest = *sizes.iter().max().unwrap_or(&0);
    let vars = variants(opts);
    let mut header: Vec<String> = vec!["N".into(), "figure".into()];
    header.extend(vars.iter().map(|v| format!("{} (median, max)", v.label)));
    header.push("baseline (median, max)".into());
    if sizes.iter().any(|&m| opts.mix_baseline(m, largest)) {
        header.push("diagnostic: plain client with the operator's request mix".into());
    }
    header.push(if vars.len() > 1 {
        format!("÷ baseline ({})", vars.iter().map(|v| v.label.clone()).collect::<Vec<_>>().join(" / "))
    } else {
        "÷ baseline".into()
    });
    header.push("target".into());
    header.push(String::new());
    let mut sec = Section::new("1. Scale: N RayClusters (head + 2 workers each) applied at once", &[]);
    sec.header = header;
    sec.method = vec![
        format!(
            "Each repetition runs every configuration on a fresh control plane, one after the other: the baseline, then \
             the operator{}. The N RayClusters (`deploy/example_cluster.yaml`, renamed) are created through the API \
             with {} requests in flight; the clock starts at the first create. Operator: one leader-elected replica \
             (ttl 15 s, renew 5 s), cluster-wide, default flags{}. Baseline: a plain kube-rs client in the benchmark \
             process (kube defaults: no client-side QPS limit, like the operator) that, as each RayCluster is created, \
             server-side-applies the same head Service and POSTs the same three pods (bodies from \
             `reconciler::desired`, as the operator builds them) — the least work that yields the same objects, i.e. \
             what the API server allows. Pods and phases are observed by a watch in the benchmark process (the same \
             in every run). The API server authenticates everyone as the same admin (exempt from API Priority and \
             Fairness), the operator included.",
            if vars.len() > 1 { " in its default configuration and with `--no-autoscaler`" } else { "" },
            opts.args.concurrency,
            if opts.args.operator_args.is_empty() {
                String::new()
            } else {
                format!(" plus `{}`", opts.args.operator_args.join(" "))
            }
        ),
        "\"÷ baseline\" is baseline time ÷ our time per repetition (1.0 = as fast as the API server allows; for \
         counts, our count ÷ the baseline's is shown as baseline ÷ ours too, so higher is better), median over \
         repetitions. RSS is VmHWM (peak) and VmRSS 10 s after all clusters are Running (settled); CPU is the \
         operator's user+system time from the first create until then. API requests are the operator's, from the \
         audit log by its user agent, over the same window; the baseline's include its N RayCluster creates."
            .into(),
    ];
    let mut idles = Vec::new();
    for &n in &sizes {
        let reps = opts.reps(n);
        let mut ours: Vec<Vec<ScaleRun>> = vec![Vec::new(); vars.len()];
        let mut base = Vec::new();
        let with_mix = opts.mix_baseline(n, largest);
        let mut mix = Vec::new();
        for rep in 0..reps {
            base.push(scale_baseline_run(opts, n, rep, false).await?);
            if with_mix {
                mix.push(scale_baseline_run(opts, n, rep, true).await?);
            }
            for (vi, v) in vars.iter().enumerate() {
                let keep = with_idle && n == largest && rep + 1 == reps;
                let (run, k) = scale_operator_run(opts, v, n, rep, keep).await?;
                ours[vi].push(run);
                if let Some(k) = k {
                    idles.push(idle_measure(opts, &v.label, k).await?);
                }
            }
        }
        fn col(runs: &[ScaleRun], f: impl Fn(&ScaleRun) -> f64) -> Vec<f64> {
            runs.iter().map(f).collect()
        }
        let ratios = |f: &dyn Fn(&ScaleRun) -> f64| -> Vec<Vec<f64>> {
            ours.iter().map(|o| o.iter().zip(&base).map(|(o, b)| f(b) / f(o).max(1e-9)).collect()).collect()
        };
        let show_mix = sizes.iter().any(|&m| opts.mix_baseline(m, largest));
        let mut row = |figure: String,
                       f: &dyn Fn(&ScaleRun) -> f64,
                       unit: &str,
                       prec: usize,
                       with_base: bool,
                       target: &str,
                       verdict_of: Option<&Judge<'_>>| {
            let mut cells = vec![n.to_string(), figure];
            for o in &ours {
                cells.push(med_max(&col(o, f), unit, prec));
            }
            if with_base {
                cells.push(med_max(&col(&base, f), unit, prec));
                if show_mix {
                    cells.push(if mix.is_empty() { "—".into() } else { med_max(&col(&mix, f), unit, prec) });
                }
                // The noise row is context, not a comparison.
                cells.push(if cells[1].starts_with("noise") {
                    String::new()
                } else {
                    ratios(f).iter().map(|r| ratio_text(r)).collect::<Vec<_>>().join(" / ")
                });
            } else {
                cells.push("—".into());
                if show_mix {
                    cells.push("—".into());
                }
                cells.push(String::new());
            }
            cells.push(target.into());
            cells.push(verdict_of.map_or(String::new(), |v| verdict(Some(v(&ours[0]))).to_string()));
            sec.row(cells);
        };
        let pods_ok = |runs: &[ScaleRun]| {
            let r: Vec<f64> = runs.iter().zip(&base).map(|(o, b)| b.pods_s / o.pods_s.max(1e-9)).collect();
            stats(&r).is_some_and(|s| s.median >= 0.8)
        };
        row(format!("all {} pods exist", 3 * n), &|r| r.pods_s, "s", 1, true, "≥ 0.80", Some(&pods_ok));
        row("all clusters Running (baseline: all pods Running)".into(), &|r| r.running_s, "s", 1, true, "—", None);
        row("pods created per second".into(), &|r| 3.0 * n as f64 / r.pods_s, "/s", 0, true, "—", None);
        row("RayClusters created (by the benchmark)".into(), &|r| r.rcs_s, "s", 1, true, "—", None);
        let rss_target = if n >= 1000 { "≤ 40 MiB" } else { "—" };
        let rss_ok = |runs: &[ScaleRun]| runs.iter().all(|r| r.peak_rss <= 40.0);
        row(
            "operator peak RSS".into(),
            &|r| r.peak_rss,
            "MiB",
            1,
            false,
            rss_target,
            (n >= 1000).then_some(&rss_ok as &Judge<'_>),
        );
        row("operator settled RSS".into(), &|r| r.settled_rss, "MiB", 1, false, "—", None);
        row("operator CPU (user+system)".into(), &|r| r.cpu_s, "s", 2, false, "—", None);
        row("control-plane CPU (all components)".into(), &|r| r.cp_cpu_s, "s", 1, true, "—", None);
        row("noise: other processes' CPU on the machine, in cores".into(), &|r| r.other_cores, "", 2, true, "—", None);
        row("API requests (non-watch)".into(), &|r| r.requests.non_watch() as f64, "", 0, true, "—", None);
        row("API writes per cluster".into(), &|r| r.requests.writes() as f64 / n as f64, "", 2, true, "—", None);
        for (v, runs) in vars.iter().zip(&ours) {
            if let Some(last) = runs.last() {
                sec.notes.push(format!(
                    "N = {n}, {}, last repetition: {} (plus {} watches); its own metrics count {} writes.",
                    v.label,
                    last.requests.summary(),
                    last.requests.watches,
                    last.metric_writes
                ));
            }
        }
        if let Some(last) = base.last() {
            sec.notes.push(format!("N = {n}, baseline, last repetition: {}.", last.requests.summary()));
        }
        if !mix.is_empty() {
            let vs_mix: Vec<f64> =
                ours[ours.len() - 1].iter().zip(&mix).map(|(o, m)| m.pods_s / o.pods_s.max(1e-9)).collect();
            let mix_vs_base: Vec<f64> = mix.iter().zip(&base).map(|(m, b)| b.pods_s / m.pods_s.max(1e-9)).collect();
            sec.notes.push(format!(
                "N = {n}, diagnostic: a plain client making the operator's requests (the baseline's, plus per cluster \
                 three Events and two status patches: {}) needs {} of the baseline's speed; {} reaches {} of that \
                 client's speed (median of per-repetition ratios).",
                mix.last().map(|m| m.requests.summary()).unwrap_or_default(),
                ratio_text(&mix_vs_base),
                vars[vars.len() - 1].label,
                ratio_text(&vs_mix),
            ));
        }
        sec.notes.push(format!(
            "N = {n}: {reps} repetition(s); all pods exist after ({}, baseline) per repetition: {}.",
            vars.iter().map(|v| v.label.clone()).collect::<Vec<_>>().join(", "),
            (0..reps)
                .map(|i| {
                    let mut parts: Vec<String> = ours.iter().map(|o| format!("{:.1}", o[i].pods_s)).collect();
                    parts.push(format!("{:.1} s", base[i].pods_s));
                    parts.join(" / ")
                })
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    Ok((sec, idles))
}

async fn idle(opts: &Opts, runs: Vec<IdleRun>) -> Result<Section> {
    let runs = if runs.is_empty() {
        // Idle alone (`--only idle`): one operator run per configuration at the largest N.
        let n = *opts.sizes().iter().max().unwrap_or(&20);
        let mut v = Vec::new();
        for var in variants(opts) {
            let k = scale_operator_run(opts, &var, n, 0, true).await?.1.ok_or_else(|| anyhow!("no run kept"))?;
            v.push(idle_measure(opts, &var.label, k).await?);
        }
        v
    } else {
        runs
    };
    let n = runs[0].n;
    let mut header = vec!["figure".to_string()];
    header.extend(runs.iter().map(|r| r.label.clone()));
    header.extend(["reference".to_string(), "target".to_string(), String::new()]);
    let mut sec = Section::new(&format!("2. Idle cost: {n} clusters Running, nothing changing"), &[]);
    sec.header = header;
    sec.method = vec![format!(
        "After the last scale repetition at N = {n}, its operator keeps running with all clusters Running and nothing \
         changing, for {:.0} s. Requests are the operator's, from the audit log by its user agent; \"beyond the \
         watches\" leaves out `watch` requests (the long-running streams and their re-establishment). The Lease \
         renewals (leader election) are a per-operator cost, shown apart and also divided over the clusters. No \
         in-run baseline exists for idle cost (a plain client makes no requests when idle); the reference is \
         KubeRay's requeue of every cluster every 300 s.",
        runs[0].window_s
    )];
    let per_hour = |r: &IdleRun, x: usize| x as f64 * 3600.0 / r.window_s;
    let mut row = |figure: &str, f: &dyn Fn(&IdleRun) -> String, reference: &str, target: &str, ok: Option<bool>| {
        let mut cells = vec![figure.to_string()];
        cells.extend(runs.iter().map(f));
        cells.extend([reference.to_string(), target.to_string(), verdict(ok).to_string()]);
        sec.row(cells);
    };
    let per_cluster = |r: &IdleRun| per_hour(r, r.requests.non_watch() - r.requests.lease()) / r.n as f64;
    let per_cluster_all = |r: &IdleRun| per_hour(r, r.requests.non_watch()) / r.n as f64;
    row(
        "API requests per cluster per hour beyond the watches, without the Lease",
        &|r| format!("{:.3}", per_cluster(r)),
        "KubeRay: 12 (requeue every 300 s)",
        "≤ 1",
        Some(per_cluster(&runs[0]) <= 1.0),
    );
    // The Lease is the operator's cost, not any cluster's: shown spread over the clusters for
    // scale, judged by the row above.
    row(
        "the same with the Lease renewals spread over the clusters",
        &|r| format!("{:.3}", per_cluster_all(r)),
        "—",
        "—",
        None,
    );
    row(
        "Lease requests per hour (whole operator)",
        &|r| format!("{:.0}", per_hour(r, r.requests.lease())),
        "—",
        "—",
        None,
    );
    row(
        "watch requests per hour (whole operator)",
        &|r| format!("{:.0}", per_hour(r, r.requests.watches)),
        "—",
        "—",
        None,
    );
    row(
        "operator CPU, % of a core (median, max over tenths of the window)",
        &|r| {
            format!(
                "{:.2} ({})",
                r.cpu_s / r.window_s * 100.0,
                stats(&r.cpu_samples).map_or("—".into(), |s| format!("{:.2}, {:.2}", s.median, s.max))
            )
        },
        "—",
        "—",
        None,
    );
    row("operator RSS", &|r| format!("{:.1} MiB", r.rss), "—", "≤ 40 MiB", Some(runs[0].rss <= 40.0));
    row("control-plane CPU, % of a core", &|r| format!("{:.1}", r.cp_cpu_s / r.window_s * 100.0), "—", "—", None);
    for r in &runs {
        sec.notes.push(format!(
            "{}: requests in the window: {} (plus {} watches).",
            r.label,
            if r.requests.other.is_empty() { "none".to_string() } else { r.requests.summary() },
            r.requests.watches
        ));
    }
    Ok(sec)
}

// ---------------------------------------------------------------------------------------------
// 3. Fairness
// ---------------------------------------------------------------------------------------------

async fn fairness(opts: &Opts) -> Result<Section> {
    let (big, reps) = if opts.smoke() { (100u32, 1usize) } else { (500, 5) };
    let cp = Cp::up(opts, "fairness")?;
    let client = cp.client("ray-operator-bench/driver (bench-driver)").await?;
    create_namespace(&client, OPERATOR_NS).await?;
    let op = OpProc::start(opts, &cp, "bench-op", OPERATOR_NS, &opts.args.operator_args)?;
    op.wait_ready().await?;
    op.wait_leader().await?;
    let base = example_cluster(&opts.repo)?;
    let mut idle_lat = Vec::new();
    let mut busy_lat = Vec::new();
    let mut a_at = Vec::new();
    let mut a_total = Vec::new();
    for rep in 0..reps {
        let ns = format!("fair-{rep}");
        create_namespace(&client, &ns).await?;
        let tracker = Tracker::start(&client, &ns).await?;
        let rcs: Api<RayCluster> = Api::namespaced(client.clone(), &ns);
        let a_key = ClusterKey::new(&ns, "a");
        // B lands on A's shard: the worst case (otherwise another shard serves it regardless).
        let b_name = (0..)
            .map(|k| format!("b-{k}"))
            .find(|b| shard_of(&ClusterKey::new(&ns, b), DEFAULT_SHARDS) == shard_of(&a_key, DEFAULT_SHARDS))
            .unwrap();
        let idle_name = format!("{b_name}-idle");

        // Baseline: the same small cluster's head latency while the operator is idle.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t0 = Instant::now();
        rcs.create(&PostParams::default(), &cluster(&base, &idle_name, 2)?).await?;
        let t_idle = tracker
            .wait(Duration::from_secs(30), "idle B head", |s| s.pods_seen_at(1, |p| p.cluster == idle_name && p.head))
            .await?;
        idle_lat.push((t_idle - t0).as_secs_f64());
        tracker
            .wait(Duration::from_secs(60), "idle B pods", |s| (s.cluster_pods(&idle_name) >= 3).then_some(()))
            .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;

        // Load: A scales to `big` workers; B is created as soon as A's scale-up is under way.
        let ta = Instant::now();
        rcs.create(&PostParams::default(), &cluster(&base, "a", big)?).await?;
        tracker.wait(Duration::from_secs(60), "A scaling", |s| (s.cluster_pods("a") >= 2).then_some(())).await?;
        let t0 = Instant::now();
        rcs.create(&PostParams::default(), &cluster(&base, &b_name, 2)?).await?;
        let t_b = tracker
            .wait(Duration::from_secs(120), "B head", |s| s.pods_seen_at(1, |p| p.cluster == b_name && p.head))
            .await?;
        busy_lat.push((t_b - t0).as_secs_f64());
        let a_then = {
            let g = tracker.seen.lock().unwrap();
            g.pods.values().filter(|p| p.cluster == "a" && p.seen <= t_b).count()
        };
        a_at.push(a_then as f64);
        let t_a = tracker
            .wait(Duration::from_secs(600), "A complete", |s| s.pods_seen_at(big as usize + 1, |p| p.cluster == "a"))
            .await?;
        a_total.push((t_a - ta).as_secs_f64());
        log(format!(
            "fairness rep {rep}: B head {:.3} s (idle {:.3} s) with A at {a_then}/{} pods; A done in {:.1} s",
            (t_b - t0).as_secs_f64(),
            idle_lat.last().unwrap(),
            big + 1,
            (t_a - ta).as_secs_f64()
        ));
        drop(tracker);
        delete_namespace(&client, &ns).await?;
    }
    let mut sec = Section::new(
        &format!("3. Fairness: cluster A scaling to {big} workers, cluster B created just after"),
        &[
            "figure",
            "ours (median, p95, max)",
            "baseline: operator idle (median, max)",
            "ours vs baseline",
            "target",
            "",
        ],
    );
    sec.method = vec![format!(
        "One leader-elected replica with default flags ({DEFAULT_SHARDS} shards, create batch 20){}. Per repetition \
         (fresh namespace): the baseline is a small cluster's head-pod latency while the operator is idle; then A \
         (example cluster with {big} workers) is created, and as soon as A's first worker exists B (example cluster) \
         is created, named so that it hashes to A's shard (the worst case). Latency: from B's create request to B's \
         head pod appearing in the benchmark's watch. {reps} repetition(s).",
        if opts.args.operator_args.is_empty() {
            String::new()
        } else {
            format!(", plus `{}`", opts.args.operator_args.join(" "))
        }
    )];
    let s = stats(&busy_lat);
    let b = stats(&idle_lat);
    sec.row(vec![
        "B's head pod latency".into(),
        med_p95_max(&busy_lat, "s", 3),
        med_max(&idle_lat, "s", 3),
        match (s, b) {
            (Some(s), Some(b)) => format!("{:.1}× idle", s.median / b.median.max(1e-9)),
            _ => "—".into(),
        },
        "≤ 2 s".into(),
        verdict(s.map(|s| s.max <= 2.0)).into(),
    ]);
    sec.row(vec![
        format!("A's pods when B's head appeared (of {})", big + 1),
        med_max(&a_at, "", 0),
        "—".into(),
        String::new(),
        format!("< {} (A still scaling)", big + 1),
        verdict(stats(&a_at).map(|s| s.max < (big + 1) as f64)).into(),
    ]);
    sec.row(vec![
        format!("A: all {} pods exist", big + 1),
        med_max(&a_total, "s", 1),
        "—".into(),
        String::new(),
        "—".into(),
        String::new(),
    ]);
    sec.notes.push("Reference: KubeRay #3909, about 10 minutes for another cluster while one scales to 500.".into());
    Ok(sec)
}

// ---------------------------------------------------------------------------------------------
// 4. Failover
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Handover {
    /// Signal → the new leader's first write (its Lease take-over).
    first_write: f64,
    /// Signal → the new leader's first write on a RayCluster's objects (the new cluster's Service).
    first_action: f64,
    /// Signal → the new cluster's head pod seen by the benchmark's watch.
    head_seen: f64,
    /// Signal → the old process exited (graceful only).
    old_exit: f64,
}

async fn failover(opts: &Opts) -> Result<Section> {
    let (graceful, crash) = if opts.smoke() { (1usize, 1usize) } else { (20, 5) };
    // Graceful always with the defaults; crash with the defaults too in the full run (a smoke run
    // cannot wait 15 s per crash).
    let (crash_ttl, crash_renew) = if opts.smoke() { (4u64, 1u64) } else { (15, 5) };
    let ns = "failover";
    let cp = Cp::up(opts, "failover")?;
    let client = cp.client("ray-operator-bench/driver (bench-driver)").await?;
    create_namespace(&client, ns).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let names = ["fo-a", "fo-b"];
    for n in names {
        // A Pod object for each replica, so the leader can label its own pod, as in a Deployment.
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": n, "labels": {"app": "ray-operator"}},
            "spec": {"containers": [{"name": "op", "image": "ray-operator"}]}
        }))?;
        pods.create(&PostParams::default(), &p).await?;
    }
    let base = example_cluster(&opts.repo)?;
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), ns);
    let tracker = Tracker::start(&client, ns).await?;

    let mut results: Vec<(bool, Handover)> = Vec::new();
    let mut retried = 0usize;
    let mut created = 0usize;
    for phase_crash in [false, true] {
        let count = if phase_crash { crash } else { graceful };
        let (ttl, renew) = if phase_crash { (crash_ttl, crash_renew) } else { (15, 5) };
        let flags: Vec<String> = vec![
            "--namespaces".into(),
            ns.into(),
            "--lease-ttl".into(),
            ttl.to_string(),
            "--lease-renew".into(),
            renew.to_string(),
        ];
        let mut ops: BTreeMap<String, OpProc> = BTreeMap::new();
        for n in names {
            ops.insert(n.into(), OpProc::start(opts, &cp, n, ns, &flags)?);
        }
        for op in ops.values() {
            op.wait_ready().await?;
        }
        poll(Duration::from_secs(60), "a leader", || async { lease_holder(&client, ns).await }).await?;
        // Some clusters exist before the first hand-over, so the new leader resyncs real state.
        if created == 0 {
            for i in 0..5 {
                rcs.create(&PostParams::default(), &cluster(&base, &format!("before-{i}"), 2)?).await?;
            }
            tracker.wait(Duration::from_secs(120), "clusters Running", |s| s.clusters_running_at(5)).await?;
            created = 5;
        }
        let mut done = 0;
        while done < count {
            let leader =
                poll(Duration::from_secs(60), "a leader", || async { lease_holder(&client, ns).await }).await?;
            let other = names.iter().find(|n| **n != leader).unwrap().to_string();
            ops[&other].wait_ready().await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let name = format!("after-{created}");
            created += 1;

            let sys0 = SystemTime::now();
            let t0 = Instant::now();
            let mut old = ops.remove(&leader).unwrap();
            if phase_crash {
                let _ = old.child.kill();
            } else {
                old.signal("TERM");
            }
            // Work arrives during the hand-over. The short pause keeps the old leader (which has
            // already stopped taking work) from racing for it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            rcs.create(&PostParams::default(), &cluster(&base, &name, 2)?).await?;
            let t_head = tracker
                .wait(Duration::from_secs(ttl + 60), "new cluster's head", |s| {
                    s.pods_seen_at(1, |p| p.cluster == name && p.head)
                })
                .await?;
            let exited = old.wait_exit(Duration::from_secs(15));
            let old_exit = t0.elapsed().as_secs_f64();
            if !exited {
                bail!("{leader} did not exit after the signal; log:\n{}", tail(&old.log, 20));
            }
            let new_tag = format!("({other})");
            // The audit log is written as requests complete; give it a moment.
            let (first_write, first_action) =
                poll(Duration::from_secs(20), "the new leader's writes in the audit log", || {
                    let cp = &cp;
                    let new_tag = new_tag.clone();
                    async move {
                        let reqs = cp.requests(&new_tag).ok()?;
                        let after: Vec<&Req> = reqs.iter().filter(|r| r.at >= sys0 && r.is_write()).collect();
                        let first = after.first()?;
                        let action = after.iter().find(|r| {
                            matches!(r.resource.as_str(), "services" | "pods" | "rayclusters" | "rayclusters/status")
                                && !(r.resource == "pods" && r.name.as_deref().is_some_and(|n| names.contains(&n)))
                        })?;
                        Some((first.at, action.at))
                    }
                })
                .await?;
            // Did the old leader act on the new cluster after all (a race with the signal)? Then
            // the new leader had nothing to do for it: repeat the hand-over.
            let old_acted = cp
                .requests(&format!("({leader})"))?
                .iter()
                .any(|r| r.at >= sys0 && r.is_write() && matches!(r.resource.as_str(), "services" | "pods"));
            tracker.wait(Duration::from_secs(120), "new cluster Running", |s| s.rc_running.get(&name).copied()).await?;
            // Only now restart the old replica: with its old identity it would otherwise find
            // "its own" Lease and take it back at once.
            let fresh = OpProc::start(opts, &cp, &leader, ns, &flags)?;
            fresh.wait_ready().await?;
            ops.insert(leader.clone(), fresh);
            let secs = |t: SystemTime| t.duration_since(sys0).map_or(0.0, |d| d.as_secs_f64());
            let h = Handover {
                first_write: secs(first_write),
                first_action: secs(first_action),
                head_seen: (t_head - t0).as_secs_f64(),
                old_exit,
            };
            log(format!(
                "failover {} {}: {leader} -> {other}: first write {:.3} s, first action {:.3} s, head seen {:.3} s{}",
                if phase_crash { "crash" } else { "graceful" },
                done,
                h.first_write,
                h.first_action,
                h.head_seen,
                if old_acted { " (old leader acted: repeated)" } else { "" }
            ));
            if old_acted {
                retried += 1;
                if retried > 10 {
                    bail!("the old leader kept acting after the signal");
                }
                continue;
            }
            results.push((phase_crash, h));
            done += 1;
        }
        drop(ops);
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The next phase starts with a free Lease; wait out the one the killed processes held.
        let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
        let _ = leases.delete("ray-operator-leader", &DeleteParams::default()).await;
    }

    let pick = |crash: bool, f: fn(&Handover) -> f64| -> Vec<f64> {
        results.iter().filter(|(c, _)| *c == crash).map(|(_, h)| f(h)).collect()
    };
    let mut sec = Section::new(
        "4. Failover: hand-overs between two replicas",
        &["figure", "graceful (SIGTERM): p50, max", "crash (SIGKILL): p50, max", "target", ""],
    );
    sec.method = vec![format!(
        "Two replicas (`POD_NAME` fo-a / fo-b, so each has its own user agent) serve one namespace. Each hand-over: \
         signal the Lease holder, create a new RayCluster 50 ms later, then restart the signalled replica as the new \
         standby. \"First write\" is the first write request by the other replica after the signal in the audit log \
         (its Lease take-over); \"acting\" is its first write on a cluster's objects (the new cluster's Service or \
         pods, or a status) — the figure the targets are about. Graceful: ttl 15 s, renew 5 s (defaults), {graceful} \
         hand-overs. Crash: ttl {crash_ttl} s, renew {crash_renew} s, {crash} hand-overs.{}",
        if retried > 0 {
            format!(
                " {retried} graceful hand-over(s) were repeated because the old leader handled the new cluster itself."
            )
        } else {
            String::new()
        }
    )];
    let fmt = |xs: &[f64]| match stats(xs) {
        Some(s) => format!("{:.3} s, {:.3} s", s.median, s.max),
        None => "—".into(),
    };
    let g_act = stats(&pick(false, |h| h.first_action));
    let c_act = stats(&pick(true, |h| h.first_action));
    sec.row(vec![
        "signal → new leader acting".into(),
        fmt(&pick(false, |h| h.first_action)),
        fmt(&pick(true, |h| h.first_action)),
        format!("graceful ≤ 1 s; crash ≤ ttl + 2 s = {} s", crash_ttl + 2),
        format!(
            "graceful {}, crash {}",
            verdict(g_act.map(|s| s.max <= 1.0)),
            verdict(c_act.map(|s| s.max <= (crash_ttl + 2) as f64))
        ),
    ]);
    sec.row(vec![
        "signal → new leader's first write (Lease)".into(),
        fmt(&pick(false, |h| h.first_write)),
        fmt(&pick(true, |h| h.first_write)),
        "—".into(),
        String::new(),
    ]);
    sec.row(vec![
        "signal → new cluster's head pod visible".into(),
        fmt(&pick(false, |h| h.head_seen)),
        fmt(&pick(true, |h| h.head_seen)),
        "—".into(),
        String::new(),
    ]);
    sec.row(vec![
        "signal → old process exited".into(),
        fmt(&pick(false, |h| h.old_exit)),
        "—".into(),
        "—".into(),
        String::new(),
    ]);
    sec.notes.push(
        "Baseline: the crash column is what a replica that does not hand over gracefully costs (the Lease must \
         expire); KubeRay's reference is that lease expiry (15 s) for every hand-over."
            .into(),
    );
    Ok(sec)
}

// ---------------------------------------------------------------------------------------------
// 5. Reaction
// ---------------------------------------------------------------------------------------------

/// A Python driver that asks for what the head cannot give (it has 1 CPU): two 4-CPU tasks.
const RAY_DRIVER: &str = include_str!("../tests/fixtures/ray/demand_driver.py");

fn kill_group(pgid: u32) {
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).stderr(Stdio::null()).status();
}

/// A real Ray head (`ray start --head --no-monitor`, as the operator starts heads) from the
/// ray==2.60.0 venv, as local processes in their own process group; killed on drop.
struct RayHead {
    dir: PathBuf,
    pgid: u32,
    gcs: String,
    bin: PathBuf,
    driver: Option<Child>,
    /// When the last poll that saw no demand was sent.
    miss: Mutex<Option<Instant>>,
}

impl RayHead {
    fn start(opts: &Opts, bin: &Path) -> Result<Self> {
        // Short path: Ray puts Unix sockets under it (108-byte limit).
        let dir = PathBuf::from(format!("/tmp/rayb{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let ports: Vec<u16> = (0..9).map(|_| free_port()).collect();
        let log = std::fs::File::create(opts.work.join("ray-head.log"))?;
        let mut cmd = Command::new(bin.join("ray"));
        cmd.args(["start", "--head", "--no-monitor", "--num-cpus=1", "--include-dashboard=false"])
            .args(["--node-ip-address=127.0.0.1", "--disable-usage-stats", "--object-store-memory=100000000"])
            .arg(format!("--port={}", ports[0]))
            .arg(format!("--dashboard-port={}", ports[1]))
            .arg(format!("--node-manager-port={}", ports[2]))
            .arg(format!("--object-manager-port={}", ports[3]))
            .arg(format!("--dashboard-agent-listen-port={}", ports[4]))
            .arg(format!("--dashboard-agent-grpc-port={}", ports[5]))
            .arg(format!("--runtime-env-agent-port={}", ports[6]))
            .arg(format!("--metrics-export-port={}", ports[7]))
            .arg(format!("--temp-dir={}", dir.join("t").display()))
            .env("RAY_enable_autoscaler_v2", "1")
            .env("RAY_CLOUD_INSTANCE_ID", "head")
            .env("RAY_NODE_TYPE_NAME", "head")
            .env("RAY_USAGE_STATS_ENABLED", "0")
            .env_remove("RAY_ADDRESS")
            .stdout(log.try_clone()?)
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().context("ray start --head")?;
        let pgid = child.id();
        let head = Self {
            dir,
            pgid,
            gcs: format!("127.0.0.1:{}", ports[0]),
            bin: bin.to_path_buf(),
            driver: None,
            miss: Mutex::new(None),
        };
        if !child.wait()?.success() {
            bail!("ray start --head failed; see {}", opts.work.join("ray-head.log").display());
        }
        Ok(head)
    }

    fn start_driver(&mut self, opts: &Opts) -> Result<()> {
        let script = self.dir.join("driver.py");
        std::fs::write(&script, RAY_DRIVER)?;
        let log = std::fs::File::create(opts.work.join("ray-driver.log"))?;
        let mut cmd = Command::new(self.bin.join("python"));
        cmd.arg(&script).arg(&self.gcs).env("RAY_USAGE_STATS_ENABLED", "0");
        cmd.stdout(log.try_clone()?).stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        self.driver = Some(cmd.spawn().context("start the Ray driver")?);
        Ok(())
    }

    fn stop_driver(&mut self) {
        if let Some(mut d) = self.driver.take() {
            kill_group(d.id());
            let _ = d.wait();
        }
    }

    /// Waits until the head's GCS shows the driver's 4-CPU demand (what the operator polls for),
    /// polling every 10 ms on one connection. Returns the window in which it appeared: from when
    /// the last poll that did not see it was sent, to when the first poll that did see it answered.
    async fn demand_appeared(&self, timeout: Duration) -> Result<(Instant, Instant)> {
        let mut c = GcsClient::connect(&self.gcs, Duration::from_secs(2)).await?;
        let start = Instant::now();
        loop {
            let sent = Instant::now();
            if let Ok(s) = c.get_cluster_resource_state().await
                && s.pending_resource_requests.iter().any(|d| d.shape.get("CPU") == Some(&4.0))
            {
                // `sent` of this poll is no bound (the demand may predate it); the previous one is.
                return Ok((self.last_miss(sent), Instant::now()));
            }
            *self.miss.lock().unwrap() = Some(sent);
            if start.elapsed() > timeout {
                bail!("no demand in the GCS after {timeout:?}; driver log: {}", self.dir.display());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn last_miss(&self, fallback: Instant) -> Instant {
        self.miss.lock().unwrap().take().unwrap_or(fallback)
    }

    /// Whether the demand is gone (the driver stopped and the GCS noticed).
    async fn demand_gone(&self) -> bool {
        let Ok(mut c) = GcsClient::connect(&self.gcs, Duration::from_secs(2)).await else { return false };
        c.get_cluster_resource_state()
            .await
            .is_ok_and(|s| !s.pending_resource_requests.iter().any(|d| d.shape.get("CPU") == Some(&4.0)))
    }
}

impl Drop for RayHead {
    fn drop(&mut self) {
        self.stop_driver();
        kill_group(self.pgid);
        // Raylet and GCS may have forked into other groups; their command lines name the temp dir.
        let _ = Command::new("pkill").args(["-9", "-f", &self.dir.display().to_string()]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A RayCluster whose autoscaler reads the bench's Ray head (annotation `cluster.ray.io/gcs-address`),
/// with a 4-CPU worker type starting at 0.
fn reaction_cluster(name: &str, gcs: &str) -> Result<RayCluster> {
    let pod = |prefix: &str, cpu: &str| {
        serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": prefix},
            "spec": {"containers": [{"name": "ray", "image": "rayproject/ray:2.60.0",
                "resources": {"requests": {"cpu": cpu}}}]}})
    };
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "cluster.ray.io/v1", "kind": "RayCluster",
        "metadata": {"name": name, "annotations": {"cluster.ray.io/gcs-address": gcs}},
        "spec": {"maxWorkers": 3, "headPodType": "head", "idleTimeoutMinutes": 5,
            "podTypes": [
                {"name": "head", "podConfig": pod("ray-head-", "1")},
                {"name": "cpu4", "minWorkers": 0, "maxWorkers": 3, "podConfig": pod("ray-cpu4-", "4")}],
            "headStartRayCommands": ["ray start --head"],
            "workerStartRayCommands": ["ray start --address=$RAY_HEAD_IP:6379"]}
    }))?)
}

/// GCS polls the operator has made (all clusters).
async fn gcs_polls(op: &OpProc) -> f64 {
    let m = op.metrics().await;
    m.lines()
        .filter(|l| l.starts_with("ray_operator_gcs_calls_total{method=\"GetClusterResourceState\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn autoscaler_healthy(rcs: &Api<RayCluster>, name: &str) -> bool {
    let Ok(rc) = rcs.get(name).await else { return false };
    rc.status.is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "AutoscalerHealthy" && c.status == "True"))
}

/// Per operator configuration (label, extra flags): samples (seconds) of "demand appeared in the
/// GCS → the cluster's first worker pod seen", and the width of the window in which the demand
/// appeared (the measurement's uncertainty).
async fn reaction_measure(opts: &Opts, configs: &[(String, Vec<String>)]) -> Result<Vec<(Vec<f64>, Vec<f64>)>> {
    let Some(bin) = opts.args.ray_bin.clone() else { bail!("no Ray venv (--ray-bin); e2e/ray-venv makes one") };
    let trials = if opts.smoke() { 2 } else { 20 };
    let cp = Cp::up(opts, "reaction")?;
    let client = cp.client("ray-operator-bench/driver (bench-driver)").await?;
    let ns = "reaction";
    create_namespace(&client, ns).await?;
    let tracker = Tracker::start(&client, ns).await?;
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), ns);
    log("reaction: starting a Ray head");
    let mut head = RayHead::start(opts, &bin)?;
    let mut all = Vec::new();
    for (ci, (label, extra)) in configs.iter().enumerate() {
        let mut flags: Vec<String> = vec!["--namespaces".into(), ns.into()];
        flags.extend(extra.iter().cloned());
        let op = OpProc::start(opts, &cp, &format!("react-op-{ci}"), ns, &flags)?;
        op.wait_ready().await?;
        op.wait_leader().await?;
        let mut samples = Vec::new();
        let mut windows = Vec::new();
        for i in 0..trials {
            // A fresh RayCluster per trial: its autoscaler starts from "no workers".
            let name = format!("react-{ci}-{i}");
            rcs.create(&PostParams::default(), &reaction_cluster(&name, &head.gcs)?).await?;
            poll(Duration::from_secs(60), &format!("{name} AutoscalerHealthy"), || async {
                autoscaler_healthy(&rcs, &name).await.then_some(())
            })
            .await?;
            // A random pause (0–1 s) first: the driver's start-up time is nearly constant, so
            // without it the demand would arrive at the same phase of the operator's poll timer
            // (which starts with the cluster's link) in every trial, and the trials would sample
            // one point of the poll cycle instead of all of it.
            let polls0 = gcs_polls(&op).await;
            let t_trial = Instant::now();
            let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.subsec_nanos();
            tokio::time::sleep(Duration::from_nanos(u64::from(nanos) % 1_000_000_000)).await;
            head.start_driver(opts)?;
            let (appeared_after, seen) = head.demand_appeared(Duration::from_secs(90)).await?;
            let t1 = tracker
                .wait(Duration::from_secs(30), &format!("{name}'s first worker pod"), |s| {
                    s.pods_seen_at(1, |p| p.cluster == name && !p.head)
                })
                .await?;
            // The demand appeared in the window [appeared_after, seen]: the figure is measured from
            // its start, so it can only be too large, never too small.
            let dt = t1.saturating_duration_since(appeared_after).as_secs_f64();
            let window = seen.saturating_duration_since(appeared_after).as_secs_f64();
            let polls = gcs_polls(&op).await - polls0;
            let trial_s = t1.saturating_duration_since(t_trial).as_secs_f64();
            log(format!(
                "reaction {label} trial {i}: {dt:.3} s (demand seen within a {window:.3} s window; \
                 {polls} GCS polls in the trial's {trial_s:.1} s)"
            ));
            samples.push(dt);
            windows.push(window);
            head.stop_driver();
            rcs.delete(&name, &DeleteParams::default()).await?;
            poll(Duration::from_secs(60), "demand gone from the GCS", || async {
                head.demand_gone().await.then_some(())
            })
            .await?;
        }
        all.push((samples, windows));
        drop(op);
    }
    drop(tracker);
    Ok(all)
}

async fn reaction(opts: &Opts) -> Result<Section> {
    let mut configs = vec![("default flags (`--autoscaler-interval 1`)".to_string(), opts.args.operator_args.clone())];
    if !opts.smoke() {
        let mut fast = opts.args.operator_args.clone();
        fast.extend(["--autoscaler-interval".into(), "0.5".into()]);
        configs.push(("`--autoscaler-interval 0.5`".into(), fast));
    }
    let samples = reaction_measure(opts, &configs).await?;
    let mut sec = Section::new(
        "5. Reaction: demand in a real Ray head's GCS → worker pod created",
        &[
            "operator",
            "GCS demand → first worker pod (median, p95, max)",
            "uncertainty: demand-appearance window (median, max)",
            "reference",
            "target",
            "",
        ],
    );
    sec.method = vec![format!(
        "A real Ray head (ray==2.60.0 from PyPI, `ray start --head --no-monitor`, 1 CPU) runs as local processes; \
         each trial creates a fresh RayCluster whose annotation `cluster.ray.io/gcs-address` points the operator's \
         autoscaler at that head, waits for `AutoscalerHealthy=True` and a random 0–1 s (so the trials sample the whole poll \
         cycle, not one phase of it), then starts a Python driver that submits two 4-CPU tasks. The benchmark polls the GCS itself (`GetClusterResourceState` every 10 ms on one \
         connection): the demand appeared between the last poll that did not show it and the first that did. The \
         clock starts at the beginning of that window (so the figure errs on the large side) and stops when the \
         benchmark's pod watch sees the cluster's first worker pod; the driver is then stopped and the cluster \
         deleted. {} trials per configuration, one leader-elected replica.",
        samples.first().map_or(0, |s| s.0.len())
    )];
    for ((label, _), (xs, windows)) in configs.iter().zip(&samples) {
        let s = stats(xs);
        sec.row(vec![
            label.clone(),
            med_p95_max(xs, "s", 3),
            med_max(windows, "s", 3),
            "Ray's autoscaler loop: 5 s".into(),
            "≤ 1 s".into(),
            verdict(s.map(|s| s.p95 <= 1.0)).into(),
        ]);
    }
    Ok(sec)
}

// ---------------------------------------------------------------------------------------------
// 6. Decision
// ---------------------------------------------------------------------------------------------

#[derive(Default, Debug)]
struct PyTimes {
    /// label → N → median ms
    medians: BTreeMap<String, BTreeMap<usize, f64>>,
    version: String,
}

fn run_python(opts: &Opts, sizes: &[usize], reps: usize, outdir: &Path) -> Result<Option<PyTimes>> {
    let Some(bin) = &opts.args.ray_bin else { return Ok(None) };
    let python = bin.join("python3");
    if !python.exists() {
        return Ok(None);
    }
    log(format!("decision: Ray's Python scheduler, N = {sizes:?}, {reps} reps"));
    let sizes_arg = sizes.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",");
    let out = Command::new(&python)
        .arg(opts.repo.join("tests/fixtures/ray/bench_ray_scheduler.py"))
        .args(["--reps", &reps.to_string(), "--sizes", &sizes_arg, "--outdir"])
        .arg(outdir)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("bench_ray_scheduler.py failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut t = PyTimes::default();
    for line in text.lines() {
        if line.starts_with("ray ") {
            t.version = line.split("  reps").next().unwrap_or(line).to_string();
        }
        let Some(rest) = line.strip_prefix("N=") else { continue };
        let w: Vec<&str> = rest.split_whitespace().collect();
        if w.len() >= 4 && w[2] == "median" {
            let (Ok(n), Ok(ms)) = (w[0].parse::<usize>(), w[3].parse::<f64>()) else { continue };
            t.medians.entry(w[1].to_string()).or_default().insert(n, ms);
        }
    }
    Ok(Some(t))
}

fn decision(opts: &Opts) -> Result<(Section, Option<String>)> {
    let dir = opts.repo.join("tests/fixtures/ray");
    let sizes = [100usize, 1000, 10000];
    let runs = if opts.smoke() { 3 } else { 50 };
    let mut ours: BTreeMap<usize, (Stats, u32)> = BTreeMap::new();
    let mut same_as_fixture: BTreeMap<usize, bool> = BTreeMap::new();
    for n in sizes {
        let text = std::fs::read_to_string(dir.join(format!("bench_N{n}.json")))?;
        let input = serde_json::from_str::<BenchInput>(&text)?.to_decision_input()?;
        let first = get_nodes_to_launch(&input)?;
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let start = Instant::now();
            let d = get_nodes_to_launch(&input)?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
            if d != first {
                bail!("N={n}: the decision is not deterministic");
            }
        }
        let launched: u32 = first.nodes_to_launch.values().sum();
        ours.insert(n, (stats(&times).unwrap(), launched));
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(format!("expected_N{n}.json")))?)?;
        let capped = plan_from_json(&text)?.to_value();
        let uncapped = plan_from_json_with_upscaling_speed(&text, 1e9)?.to_value();
        same_as_fixture.insert(
            n,
            json_values_equal(&capped, &expected["v1_get_nodes_to_launch"])
                && json_values_equal(&uncapped, &expected["v1_get_nodes_to_launch_uncapped"]),
        );
    }

    // Ray's Python, in this run. The smoke run only does N = 100, once, and only if the venv exists.
    let py_sizes: Vec<usize> = if opts.smoke() { vec![100] } else { sizes.to_vec() };
    let outdir = opts.work.join("ray-decision");
    std::fs::create_dir_all(&outdir)?;
    let py = run_python(opts, &py_sizes, if opts.smoke() { 1 } else { 5 }, &outdir)?;
    let mut same_as_run: BTreeMap<usize, bool> = BTreeMap::new();
    if py.is_some() {
        for &n in &py_sizes {
            let input = std::fs::read_to_string(outdir.join(format!("bench_N{n}.json")))?;
            let expected: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(outdir.join(format!("expected_N{n}.json")))?)?;
            let fixture: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join(format!("bench_N{n}.json")))?)?;
            let input_v: serde_json::Value = serde_json::from_str(&input)?;
            let capped = plan_from_json(&input)?.to_value();
            let uncapped = plan_from_json_with_upscaling_speed(&input, 1e9)?.to_value();
            same_as_run.insert(
                n,
                json_values_equal(&input_v, &fixture)
                    && json_values_equal(&capped, &expected["v1_get_nodes_to_launch"])
                    && json_values_equal(&uncapped, &expected["v1_get_nodes_to_launch_uncapped"]),
            );
        }
    }
    let mut sec = Section::new(
        "6. Decision: the autoscaler's scale-up decision vs Ray's Python",
        &[
            "N pending demands",
            "ours (median, p95)",
            "Ray v1 `get_nodes_to_launch` (median)",
            "Ray v2 `schedule` (median)",
            "speed-up vs v1",
            "identical decisions",
            "target",
            "",
        ],
    );
    sec.method = vec![format!(
        "Fixtures `tests/fixtures/ray/bench_N*.json` (10 worker types, 100 running nodes, N single-bundle demands). \
         Ours: `autoscaler::decision::get_nodes_to_launch` on the prepared input, {runs} runs after one warm-up, in \
         this process ({} build). Ray: `tests/fixtures/ray/bench_ray_scheduler.py` with Ray's unmodified scheduler \
         from the ray==2.60.0 wheel{}, run now on the same machine; it regenerates the inputs from their seed \
         (checked equal to the fixtures) and its decisions, which ours must equal with the fixture's upscaling speed \
         and uncapped (\"identical decisions\": vs this run's Ray output; in brackets vs the committed expected files).",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        py.as_ref().map_or(String::new(), |p| format!(" ({})", p.version))
    )];
    for n in sizes {
        let (s, launched) = ours[&n];
        let v1 = py.as_ref().and_then(|p| p.medians.get("v1_get_nodes_to_launch")?.get(&n).copied());
        let v2 = py.as_ref().and_then(|p| p.medians.get("v2_schedule")?.get(&n).copied());
        let target = n == 10000;
        let same = match (same_as_run.get(&n), same_as_fixture[&n]) {
            (Some(r), f) => format!("{} ({})", if *r { "yes" } else { "**no**" }, if f { "yes" } else { "**no**" }),
            (None, f) => format!("not run ({})", if f { "yes" } else { "**no**" }),
        };
        let ok = same_as_fixture[&n] && same_as_run.get(&n).copied().unwrap_or(true);
        sec.row(vec![
            format!("{n} ({launched} nodes to launch)"),
            format!("{:.3} ms ({:.3})", s.median, s.p95),
            v1.map_or("not run".into(), |v| format!("{v:.1} ms")),
            v2.map_or("not run".into(), |v| format!("{v:.1} ms")),
            v1.map_or("—".into(), |v| format!("{:.0}×", v / s.median.max(1e-9))),
            same,
            if target { "≤ 5 ms, identical".into() } else { "—".into() },
            if target { verdict(Some(s.median <= 5.0 && ok)).into() } else { String::new() },
        ]);
    }
    sec.notes.push("Reference (SPEC §7): Ray 2.60 Python at N = 10,000: 4,565 ms (v1), 5,587 ms (v2).".into());
    Ok((sec, py.map(|p| p.version)))
}

// ---------------------------------------------------------------------------------------------
// Machine and report
// ---------------------------------------------------------------------------------------------

fn cmd_out(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine(opts: &Opts, ray: Option<&str>) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |k| k / 1024.0 / 1024.0);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let versions = std::fs::read_to_string(opts.repo.join("e2e/controlplane/versions.env")).unwrap_or_default();
    let versions: Vec<String> =
        versions.lines().filter(|l| !l.starts_with('#') && l.contains('=')).map(|l| l.to_string()).collect();
    let repo = opts.repo.to_str().unwrap_or(".");
    let commit = cmd_out("git", &["-C", repo, "rev-parse", "--short", "HEAD"]);
    let dirty = !cmd_out("git", &["-C", repo, "status", "--porcelain", "--untracked-files=no"]).is_empty();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut s = String::from("## Machine\n\n");
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| date | {} |", k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M UTC"));
    let _ = writeln!(s, "| CPU | {cores} cores, {model} |");
    let _ = writeln!(s, "| memory | {mem_gib:.1} GiB |");
    let _ = writeln!(s, "| kernel | Linux {kernel} |");
    let _ = writeln!(s, "| rustc | {} |", cmd_out("rustc", &["-V"]));
    let _ = writeln!(
        s,
        "| ray-operator | {} ({} build), commit {commit}{} |",
        cmd_out(opts.operator.to_str().unwrap_or("ray-operator"), &["--version"]),
        if cfg!(debug_assertions) { "debug" } else { "release" },
        if dirty { " with uncommitted changes" } else { "" }
    );
    let _ = writeln!(s, "| control plane | {} (kwok fake nodes) |", versions.join(", "));
    let _ = writeln!(s, "| Ray (decision baseline) | {} |", ray.unwrap_or("not run"));
    let _ =
        writeln!(s, "| load average at the end | {} |", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    s.push('\n');
    s
}

struct Report {
    path: PathBuf,
    smoke: bool,
    /// By benchmark number, so the report reads 1..6 whatever order they ran in.
    sections: BTreeMap<u8, String>,
    machine: String,
}

impl Report {
    fn add(&mut self, number: u8, sec: Section) {
        let md = sec.markdown();
        println!("{md}");
        self.sections.insert(number, md);
        let _ = self.write();
    }

    fn write(&self) -> Result<()> {
        let mut s = String::from("# Benchmarks\n\n");
        s.push_str(&format!(
            "Written by `e2e/bench{}` (the numbers of SPEC §7, issue 7). Everything runs on one machine: a local \
             control plane (etcd, kube-apiserver, controller manager, scheduler, kwok fake nodes — real Kubernetes, \
             no containers) and the operator as local processes. The machine is small and shared, so absolute times \
             are noisy: compare each figure with the baseline measured in the same run. Medians over repetitions; \
             p95/max where the tail matters.\n\n",
            if self.smoke { " --smoke" } else { "" }
        ));
        s.push_str(&self.machine);
        for sec in self.sections.values() {
            s.push_str(sec);
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&self.path, s)?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let operator = match &args.operator {
        Some(p) => p.clone(),
        None => {
            // target/<profile>/examples/bench_e2e -> target/<profile>/ray-operator
            let exe = std::env::current_exe()?;
            exe.parent()
                .and_then(|p| p.parent())
                .map(|p| p.join("ray-operator"))
                .ok_or_else(|| anyhow!("no exe dir"))?
        }
    };
    if !operator.exists() {
        bail!("{} does not exist (build it: cargo build --bin ray-operator)", operator.display());
    }
    let work = match &args.work {
        Some(w) => w.clone(),
        None => std::env::temp_dir().join(format!("ray-operator-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work)?;
    let opts = Opts { repo, operator, work, args };
    let mut report = Report {
        path: opts.args.out.clone(),
        smoke: opts.smoke(),
        sections: BTreeMap::new(),
        machine: machine(&opts, None),
    };
    let started = Instant::now();
    let mut failures = 0;

    // The decision benchmark first, while no control plane of ours is running.
    let mut ray_version = None;
    if opts.wants("decision") {
        log("decision");
        let sec = match decision(&opts) {
            Ok((s, v)) => {
                ray_version = v;
                s
            }
            Err(e) => {
                failures += 1;
                failed_section("6. Decision: the autoscaler's scale-up decision vs Ray's Python", &e)
            }
        };
        report.machine = machine(&opts, ray_version.as_deref());
        report.add(6, sec);
    }
    let mut idle_runs = Vec::new();
    if opts.wants("scale") {
        log("scale");
        match scale(&opts, opts.wants("idle")).await {
            Ok((s, i)) => {
                idle_runs = i;
                report.add(1, s);
            }
            Err(e) => {
                failures += 1;
                report.add(1, failed_section("1. Scale: N RayClusters (head + 2 workers each) applied at once", &e));
            }
        }
    }
    if opts.wants("idle") {
        log("idle");
        let sec = idle(&opts, std::mem::take(&mut idle_runs)).await.unwrap_or_else(|e| {
            failures += 1;
            failed_section("2. Idle cost: clusters Running, nothing changing", &e)
        });
        report.add(2, sec);
    }
    if opts.wants("fairness") {
        log("fairness");
        let sec = fairness(&opts).await.unwrap_or_else(|e| {
            failures += 1;
            failed_section("3. Fairness: cluster A scaling, cluster B created just after", &e)
        });
        report.add(3, sec);
    }
    if opts.wants("failover") {
        log("failover");
        let sec = failover(&opts).await.unwrap_or_else(|e| {
            failures += 1;
            failed_section("4. Failover: hand-overs between two replicas", &e)
        });
        report.add(4, sec);
    }
    if opts.wants("reaction") {
        let sec = reaction(&opts).await.unwrap_or_else(|e| {
            failures += 1;
            failed_section("5. Reaction: demand in a real Ray head's GCS → worker pod created", &e)
        });
        report.add(5, sec);
    }
    report.machine = machine(&opts, ray_version.as_deref());
    report.write()?;
    log(format!(
        "done in {:.0} s; report: {}{}",
        started.elapsed().as_secs_f64(),
        opts.args.out.display(),
        if failures > 0 { format!("; {failures} benchmark(s) FAILED") } else { String::new() }
    ));
    if failures > 0 {
        std::process::exit(1);
    }
    Ok(())
}
