//! Helpers for the failover, recovery and churn tests: leader-elected replicas as processes, the
//! Lease, exact pod counts, and the API server's audit log read as a timeline of writes.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use ray_operator::api::{Phase, RayCluster};

use crate::support::*;

pub const LEASE: &str = "ray-operator-leader";

/// A cluster with `workers` workers of one type (minWorkers = maxWorkers), image `image`.
pub fn cluster_yaml(name: &str, workers: u32, image: &str) -> String {
    format!(
        r#"
apiVersion: cluster.ray.io/v1
kind: RayCluster
metadata: {{name: {name}}}
spec:
  maxWorkers: {workers}
  headPodType: head
  podTypes:
  - name: head
    podConfig:
      apiVersion: v1
      kind: Pod
      metadata: {{generateName: ray-head-}}
      spec: {{containers: [{{name: ray, image: "{image}", command: [sleep, infinity]}}]}}
  - name: worker
    minWorkers: {workers}
    maxWorkers: {workers}
    podConfig:
      apiVersion: v1
      kind: Pod
      metadata: {{generateName: ray-worker-}}
      spec: {{containers: [{{name: ray, image: "{image}", command: [sleep, infinity]}}]}}
"#
    )
}

/// Creates or updates a cluster (server-side apply, so the test's own writes are one request).
pub async fn put_cluster(client: &Client, ns: &str, name: &str, workers: u32, image: &str) {
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), ns);
    let v: serde_json::Value = serde_yaml::from_str(&cluster_yaml(name, workers, image)).unwrap();
    rcs.patch(name, &PatchParams::apply("failover-test").force(), &Patch::Apply(&v)).await.unwrap();
}

/// Starts a leader-elected replica `name` (its Lease lives in `lease_ns`) with extra args.
pub fn replica_with(kubeconfig: &Path, lease_ns: &str, name: &str, args: &[&str]) -> OperatorProcess {
    OperatorProcess::start_with_kubeconfig(kubeconfig, args, &[("POD_NAME", name), ("POD_NAMESPACE", lease_ns)])
}

/// A Pod object standing for a replica, so the leader can label "its" pod.
pub async fn replica_pod(client: &Client, ns: &str, name: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let p: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"app": "ray-operator"}},
        "spec": {"containers": [{"name": "op", "image": "ray-operator"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &p).await.unwrap();
}

pub async fn lease(client: &Client, ns: &str) -> Option<Lease> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    leases.get_opt(LEASE).await.ok()?
}

pub async fn holder(client: &Client, ns: &str) -> Option<String> {
    lease(client, ns).await?.spec?.holder_identity.filter(|h| !h.is_empty())
}

/// Waits for a Lease holder other than `not`.
pub async fn wait_leader(client: &Client, ns: &str, not: Option<&str>, timeout: Duration) -> String {
    wait_until(timeout, "a leader", || async {
        let h = holder(client, ns).await?;
        (Some(h.as_str()) != not).then_some(h)
    })
    .await
}

/// Waits until the Lease has expired by its own renewTime + duration (as the API server stores it).
pub async fn wait_lease_expired(client: &Client, ns: &str) {
    wait_until(Duration::from_secs(30), "the lease to expire", || async {
        let spec = lease(client, ns).await?.spec?;
        let renew = spec.renew_time?.0;
        let ttl = spec.lease_duration_seconds?;
        let expiry = renew.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(i64::from(ttl))).ok()?;
        (k8s_openapi::jiff::Timestamp::now() > expiry).then_some(())
    })
    .await
}

/// The live (not terminating) heads and workers of a cluster.
pub async fn counts(client: &Client, ns: &str, name: &str) -> (usize, usize) {
    let pods = live_pods(client, ns, &format!("ray-cluster-name={name}")).await;
    let heads = pods.iter().filter(|p| p.labels().get("ray-node-type").map(String::as_str) == Some("head")).count();
    (heads, pods.len() - heads)
}

/// Every cluster settles at exactly one head and its workers (status Running for the current
/// generation), and stays so for `hold`.
pub async fn assert_exact(
    client: &Client,
    ns: &str,
    expected: &BTreeMap<String, u32>,
    timeout: Duration,
    hold: Duration,
) {
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), ns);
    for (name, workers) in expected {
        wait_until(timeout, &format!("{name}: 1 head + {workers} workers, settled"), || async {
            let rc = rcs.get(name).await.ok()?;
            let s = rc.status?;
            (s.phase == Some(Phase::Running) && s.observed_generation == rc.metadata.generation).then_some(())?;
            (counts(client, ns, name).await == (1, *workers as usize)).then_some(())
        })
        .await;
    }
    tokio::time::sleep(hold).await;
    for (name, workers) in expected {
        let c = counts(client, ns, name).await;
        assert_eq!(c, (1, *workers as usize), "{name}: (heads, workers) after settling");
    }
}

/// One request in the audit log.
#[derive(Clone, Debug)]
pub struct Audited {
    /// When the API server received the request.
    pub at: SystemTime,
    /// When it had answered (the audit event's stage timestamp).
    pub answered: SystemTime,
    pub verb: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
    pub code: u16,
    /// The replica (POD_NAME) from the user agent `ray-operator/<version> (<replica>)`.
    pub replica: Option<String>,
}

/// The audit log's write requests (the control plane audits writes only, see e2e/cluster).
pub fn audit(path: &Path) -> Vec<Audited> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out: Vec<Audited> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|e| {
            let ts = e["requestReceivedTimestamp"].as_str()?.parse::<k8s_openapi::jiff::Timestamp>().ok()?;
            let done = e["stageTimestamp"].as_str().and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok());
            let ua = e["userAgent"].as_str().unwrap_or_default();
            let replica = ua
                .strip_prefix("ray-operator/")
                .and_then(|r| r.split_once(" ("))
                .and_then(|(_, r)| r.strip_suffix(')'))
                .map(String::from);
            Some(Audited {
                at: SystemTime::from(ts),
                answered: SystemTime::from(done.unwrap_or(ts)),
                verb: e["verb"].as_str()?.to_string(),
                resource: e["objectRef"]["resource"].as_str().unwrap_or_default().to_string(),
                namespace: e["objectRef"]["namespace"].as_str().unwrap_or_default().to_string(),
                name: e["objectRef"]["name"].as_str().unwrap_or_default().to_string(),
                code: e["responseStatus"]["code"].as_u64().unwrap_or(0) as u16,
                replica,
            })
        })
        .collect();
    out.sort_by_key(|a| a.at);
    out
}

/// Cluster writes (RayClusters and their status, pods, Services) by operator replicas in `nss`.
pub fn cluster_writes<'a>(log: &'a [Audited], nss: &[&str]) -> Vec<&'a Audited> {
    log.iter()
        .filter(|a| a.replica.is_some())
        .filter(|a| nss.contains(&a.namespace.as_str()))
        .filter(|a| matches!(a.resource.as_str(), "pods" | "services" | "rayclusters"))
        .filter(|a| a.name.is_empty() || !a.name.starts_with("op-"))
        .collect()
}

/// Successful Lease writes (takes, renews, releases) in `lease_ns`, by replica.
pub fn lease_writes<'a>(log: &'a [Audited], lease_ns: &str) -> Vec<&'a Audited> {
    log.iter()
        .filter(|a| a.replica.is_some() && a.resource == "leases" && a.namespace == lease_ns && a.name == LEASE)
        .filter(|a| (200..300).contains(&a.code))
        .collect()
}

/// Writes by a replica after another replica had written the Lease successfully since that
/// replica's own last successful Lease write: i.e. writes by a replica that no longer held the
/// Lease at the API server (a Lease can change hands only by a successful write of it).
pub fn fenced_writes<'a>(writes: &[&'a Audited], leases: &[&Audited]) -> Vec<&'a Audited> {
    writes
        .iter()
        .copied()
        .filter(|w| {
            let me = w.replica.as_deref();
            let mine = leases.iter().rposition(|l| l.at <= w.at && l.replica.as_deref() == me);
            match mine {
                None => true,
                Some(i) => leases[i + 1..].iter().any(|l| l.at <= w.at && l.replica.as_deref() != me),
            }
        })
        .collect()
}

/// The replicas that wrote, in order, one entry per run of consecutive writes by the same one.
pub fn writer_runs(writes: &[&Audited]) -> Vec<String> {
    let mut runs: Vec<String> = Vec::new();
    for w in writes {
        let r = w.replica.clone().unwrap_or_default();
        if runs.last() != Some(&r) {
            runs.push(r);
        }
    }
    runs
}

pub fn pod_list(client: &Client, ns: &str) -> impl std::future::Future<Output = Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    async move { pods.list(&ListParams::default().labels("ray-cluster-name")).await.map(|l| l.items).unwrap_or_default() }
}

/// A kubeconfig for `base`'s server and CA that authenticates with `token`.
pub fn token_kubeconfig(base: &Path, token: &str, dir: &Path) -> std::path::PathBuf {
    let kc = kube::config::Kubeconfig::read_from(base).unwrap();
    let cluster = kc.clusters[0].cluster.clone().unwrap();
    let ca = match (&cluster.certificate_authority, &cluster.certificate_authority_data) {
        (Some(path), _) => format!("certificate-authority: {path}"),
        (None, Some(data)) => format!("certificate-authority-data: {data}"),
        (None, None) => panic!("no CA in the test kubeconfig"),
    };
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {}\n    {ca}\nusers:\n- name: sa\n  user:\n    token: {}\ncontexts:\n- name: local\n  context: {{cluster: local, user: sa}}\ncurrent-context: local\n",
        cluster.server.expect("server in the kubeconfig"),
        token.trim()
    );
    let path = dir.join(format!("sa-{}.kubeconfig", random_suffix()));
    std::fs::write(&path, text).unwrap();
    path
}

/// The pid (= process group) of a control-plane component from its `pids` file.
pub fn component_pid(cp_dir: &Path, name: &str) -> i32 {
    let pids = std::fs::read_to_string(cp_dir.join("pids")).unwrap();
    pids.lines()
        .rev()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, n)| *n == name)
        .find_map(|(p, _)| p.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {}/pids", cp_dir.display()))
}

/// Sends `sig` to a process group.
pub fn signal_group(pgid: i32, sig: &str) {
    let ok = std::process::Command::new("kill").args([&format!("-{sig}"), "--", &format!("-{pgid}")]).status().unwrap();
    assert!(ok.success(), "kill -{sig} -- -{pgid}");
}

/// The API server's port, from a kubeconfig's `server: https://127.0.0.1:<port>`.
pub fn api_port(kubeconfig: &Path) -> u16 {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let server = kc.clusters[0].cluster.as_ref().and_then(|c| c.server.clone()).expect("server");
    server.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse().ok()).expect("port in the server URL")
}

/// A silent network partition of one process from the API server: every TCP connection it has
/// open to the API server at the time of the cut stops receiving anything (an iptables DROP of
/// that connection's packets on loopback, nothing else), as a dead NAT entry or a half-broken
/// link would do: no reset, no end of stream, the process just hears nothing more. Connections
/// it opens later are not affected. Removed on drop.
pub struct Partition {
    rules: Vec<Vec<String>>,
}

impl Partition {
    pub fn cut(pid: i32, api_port: u16) -> Self {
        let out = std::process::Command::new("ss")
            .args(["-tnpH", "state", "established", &format!("( dport = :{api_port} )")])
            .output()
            .expect("run ss");
        assert!(out.status.success(), "ss: {}", String::from_utf8_lossy(&out.stderr));
        let mut rules = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(&format!("pid={pid},"))) {
            // Recv-Q Send-Q Local:Port Peer:Port Process
            let Some(local) = line.split_whitespace().nth(2) else { continue };
            let Some(port) = local.rsplit(':').next() else { continue };
            let rule: Vec<String> =
                ["INPUT", "-i", "lo", "-p", "tcp", "--sport", &api_port.to_string(), "--dport", port, "-j", "DROP"]
                    .map(String::from)
                    .to_vec();
            let ok = std::process::Command::new("iptables").arg("-w").arg("-I").args(&rule).status().unwrap();
            assert!(ok.success(), "iptables -I {rule:?}");
            rules.push(rule);
        }
        Self { rules }
    }

    pub fn connections(&self) -> usize {
        self.rules.len()
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for rule in &self.rules {
            let _ = std::process::Command::new("iptables").arg("-w").arg("-D").args(rule).status();
        }
    }
}
