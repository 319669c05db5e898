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

mod decision;
mod failover;
mod fairness;
mod peers;
mod reaction;
mod scale;

use decision::decision;
use failover::failover;
use fairness::fairness;
use peers::peers;
use reaction::reaction;
use scale::{idle, scale};

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
    /// Only these benchmarks (comma-separated): scale, idle, fairness, failover, reaction, decision, peers.
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
    /// KubeRay build (the directory `e2e/kuberay/build` prints), for the side-by-side benchmark.
    #[arg(long)]
    kuberay: Option<PathBuf>,
    /// Side by side: sizes (default 1000,10000; smoke: 20).
    #[arg(long, value_delimiter = ',')]
    peer_sizes: Vec<usize>,
    /// Side by side: only these contenders ("ray-operator", "plain client", "KubeRay defaults",
    /// "KubeRay tuned"; default all). The diagnostic "plain client + operator's requests" (the
    /// plain client plus one Event per cluster and the operator's watches) runs only when named.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Side by side: only these scenarios ("live", "backlog"; default both). At N = 10,000 each
    /// run takes about half an hour on 2 cores.
    #[arg(long, value_delimiter = ',')]
    peer_scenarios: Vec<String>,
    /// Side by side: largest N at which KubeRay's defaults are run (one reconcile at a time at
    /// QPS 100 takes hours at 10,000).
    #[arg(long, default_value_t = 1000)]
    kuberay_defaults_max: usize,
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
        Self::up_with(opts, name, &[])
    }

    /// A control plane with extra `e2e/cluster` settings (e.g. `CP_NODES`).
    fn up_with(opts: &Opts, name: &str, env: &[(&str, String)]) -> Result<Self> {
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
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stderr(Stdio::inherit())
            .output()
            .context("run e2e/cluster up")?;
        if !out.status.success() {
            bail!("e2e/cluster up failed for {name}");
        }
        let bin = PathBuf::from(std::fs::read_to_string(dir.join("bindir"))?.trim());
        let cp = Self { kubeconfig: dir.join("admin.kubeconfig"), dir, bin, repo: opts.repo.clone() };
        cp.kubectl_ok(&["apply", "-f", opts.repo.join("crds/cluster_crd.yaml").to_str().unwrap()])?;
        cp.wait_crd_established("rayclusters.cluster.ray.io")?;
        Ok(cp)
    }

    /// Polled, not `kubectl wait --for=condition=established`: that fails ("accessor error:
    /// <nil>") when it runs before the CRD has any status condition.
    fn wait_crd_established(&self, crd: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let jsonpath = "-o=jsonpath={.status.conditions[?(@.type==\"Established\")].status}";
        while self.kubectl_ok(&["get", "crd", crd, jsonpath]).unwrap_or_default().trim() != "True" {
            if Instant::now() > deadline {
                bail!("the CRD {crd} is not Established after 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
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

/// What the plain-client baseline makes for one RayCluster (scale and side-by-side benchmarks):
/// the head Service (server-side apply, as the operator does) and the head and two worker pods
/// built by `model::desired`, all four requests at once. Returns the pods as created.
async fn baseline_children(rc: &RayCluster, pods: &Api<Pod>, svcs: &Api<Service>, pp: &PostParams) -> Result<[Pod; 3]> {
    let d = desired(rc).map_err(|e| anyhow!("{e}"))?;
    let mut svc = d.service.clone();
    svc.metadata.labels.get_or_insert_with(BTreeMap::new).insert(LABEL_LAUNCH_HASH.into(), d.service_hash.clone());
    let mut value = serde_json::to_value(&svc)?;
    value["apiVersion"] = "v1".into();
    value["kind"] = "Service".into();
    let name = svc.name_any();
    let worker = &d.workers[0].pod;
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let body = Patch::Apply(&value);
    let (s, h, w1, w2) = tokio::join!(
        svcs.patch(&name, &apply, &body),
        pods.create(pp, &d.head.pod),
        pods.create(pp, worker),
        pods.create(pp, worker)
    );
    s?;
    Ok([h?, w1?, w2?])
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

/// Which pod labels say "this pod belongs to cluster X" and "this is a head" (ours, or KubeRay's).
struct TrackLabels {
    cluster: &'static str,
    kind: &'static str,
    head: &'static str,
}

impl TrackLabels {
    const OURS: Self = Self { cluster: LABEL_CLUSTER, kind: LABEL_NODE_KIND, head: "head" };
    const KUBERAY: Self = Self { cluster: "ray.io/cluster", kind: "ray.io/node-type", head: "head" };
}

impl Tracker {
    async fn start(client: &Client, ns: &str) -> Result<Self> {
        Self::start_with(client, ns, &TrackLabels::OURS).await
    }

    async fn start_with(client: &Client, ns: &str, labels: &TrackLabels) -> Result<Self> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let s = seen.clone();
        let (l_cluster, l_kind, l_head) = (labels.cluster, labels.kind, labels.head);
        let t1 = tokio::spawn(async move {
            let mut stream =
                watcher::watcher(pods, watcher::Config::default().labels(l_cluster)).default_backoff().boxed();
            let mut synced = false;
            while let Some(ev) = stream.next().await {
                let now = Instant::now();
                let mut g = s.lock().unwrap();
                match ev {
                    Ok(Event::InitApply(p)) | Ok(Event::Apply(p)) => {
                        let labels = p.labels();
                        let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                        let e = g.pods.entry(p.name_any()).or_insert_with(|| PodSeen {
                            cluster: labels.get(l_cluster).cloned().unwrap_or_default(),
                            head: labels.get(l_kind).map(String::as_str) == Some(l_head),
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
    if opts.wants("peers") && (!opts.args.only.is_empty() || opts.args.kuberay.is_some()) {
        log("peers");
        let sec = peers(&opts).await.unwrap_or_else(|e| {
            failures += 1;
            failed_section("7. Side by side: ray-operator, a plain client and KubeRay v1.5.0", &e)
        });
        report.add(7, sec);
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
