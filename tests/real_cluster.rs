//! Ray for real, on the real node: the operator runs as the pods of its own Deployment (installed
//! with `kubectl apply -k`), the example clusters run Ray 2.60 in containers, and each step of the
//! user's walkthrough is checked from outside as a user would check it: `kubectl exec … ray status`,
//! `kubectl logs` of the leader pod, `kubectl rollout restart`, `kubectl delete`.
//!
//! One control plane with the machine's only real node (`e2e/cluster up --real-node`) serves the
//! whole test. The steps run in order because each builds on the last, as a user's session does,
//! and each prints its timing. The node has the machine's 2 CPUs, fewer than the examples request
//! (3 + 2 CPUs), so the clusters are copies of the examples with smaller CPU *requests* only (Ray
//! still counts one CPU per pod: it rounds up).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use ray_operator::api::RayCluster;
use support::*;

const NS: &str = "ray";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The example manifest `file`, with CPU requests the one real node can hold and `edit` applied.
fn example(file: &str, edit: impl Fn(String) -> String) -> String {
    let text = std::fs::read_to_string(repo().join("deploy").join(file)).unwrap();
    assert!(text.contains("cpu: 1000m"), "{file} requests 1000m CPU per pod");
    edit(text.replace("cpu: 1000m", "cpu: 100m"))
}

struct Real {
    cp: PrivateControlPlane,
    client: Client,
}

impl Real {
    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut cmd = self.cp.kubectl();
        cmd.args(args).current_dir(repo()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        if let Some(text) = stdin {
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
        }
    }

    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        self.kubectl(args, stdin).unwrap_or_else(|e| panic!("kubectl {}: {e}", args.join(" ")))
    }

    fn exec(&self, pod: &str, cmd: &[&str]) -> Result<String, String> {
        let args: Vec<&str> = ["-n", NS, "exec", pod, "--"].iter().copied().chain(cmd.iter().copied()).collect();
        self.kubectl(&args, None)
    }

    /// Starts `kubectl exec` in the background (a long-running Ray driver).
    fn exec_bg(&self, pod: &str, cmd: &[&str]) -> Child {
        let mut c = self.cp.kubectl();
        c.args(["-n", NS, "exec", pod, "--"]).args(cmd).stdout(Stdio::piped()).stderr(Stdio::piped());
        c.spawn().expect("kubectl exec")
    }

    async fn ray_pods(&self, cluster: &str) -> Vec<Pod> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NS);
        let lp = ListParams::default().labels(&format!("ray-cluster-name={cluster}"));
        pods.list(&lp).await.map(|l| l.items).unwrap_or_default()
    }

    /// The cluster's pods that are not being deleted, by UID → (kind, name, phase).
    async fn live(&self, cluster: &str) -> BTreeMap<String, (String, String, String)> {
        self.ray_pods(cluster)
            .await
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| {
                let phase = p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
                (p.uid().unwrap_or_default(), (p.labels()["ray-node-type"].clone(), p.name_any(), phase))
            })
            .collect()
    }

    async fn pod_names(&self, cluster: &str, kind: &str) -> Vec<String> {
        self.live(cluster)
            .await
            .into_values()
            .filter(|(k, _, phase)| k == kind && phase == "Running")
            .map(|v| v.1)
            .collect()
    }

    async fn head(&self, cluster: &str) -> Option<String> {
        self.pod_names(cluster, "head").await.into_iter().next()
    }

    /// Ray nodes alive in the cluster, as `ray status` in the head container reports them.
    async fn ray_nodes(&self, cluster: &str) -> Option<usize> {
        let head = self.head(cluster).await?;
        ray_status_nodes(&self.exec(&head, &["ray", "status"]).ok()?)
    }

    async fn status(&self, cluster: &str) -> Option<ray_operator::api::RayClusterStatus> {
        let api: Api<RayCluster> = Api::namespaced(self.client.clone(), NS);
        api.get(cluster).await.ok()?.status
    }

    /// Waits until `kubectl get rayclusters` says Running with all workers ready, every pod is Running
    /// and `ray status` lists the head and every worker.
    async fn wait_ray_up(&self, cluster: &str, workers: usize, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        wait_until(
            timeout,
            &format!("{cluster}: Running, {workers}/{workers} workers, {} Ray nodes", workers + 1),
            || async {
                let row = self.kubectl(&["-n", NS, "get", "raycluster", cluster, "--no-headers"], None).ok()?;
                let cols: Vec<&str> = row.split_whitespace().collect();
                if cols.get(1) != Some(&"Running") || cols.get(3) != Some(&format!("{workers}/{workers}").as_str()) {
                    return None;
                }
                let pods = self.live(cluster).await;
                if pods.len() != workers + 1 || pods.values().any(|(_, _, phase)| phase != "Running") {
                    return None;
                }
                (self.ray_nodes(cluster).await? == workers + 1).then_some(())
            },
        )
        .await;
        t0.elapsed()
    }

    async fn holder(&self) -> Option<String> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), NS);
        leases.get_opt("ray-operator-leader").await.ok()??.spec?.holder_identity.filter(|h| !h.is_empty())
    }

    fn leader_log(&self) -> String {
        self.ok(&["-n", NS, "logs", "-l", "cluster.ray.io/operator-role=leader", "--tail=-1"], None)
    }
}

impl Drop for Real {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What a user would look at first: the pods, the clusters, the leader's story.
            for args in [
                &["-n", NS, "get", "rayclusters,pods", "-o", "wide"][..],
                &["-n", NS, "get", "events", "--sort-by=.lastTimestamp"][..],
                &["-n", NS, "logs", "-l", "cluster.ray.io/operator-role=leader", "--tail=80"][..],
            ] {
                eprintln!("---- kubectl {} ----\n{}", args.join(" "), self.kubectl(args, None).unwrap_or_else(|e| e));
            }
        }
    }
}

/// Sums the node counts of the `Active:` and `Idle:` sections of `ray status` (lines like
/// ` 2 worker-node`); `None` if the output is not a status report.
fn ray_status_nodes(text: &str) -> Option<usize> {
    let mut section = "";
    let mut nodes = 0;
    let mut seen = false;
    for line in text.lines() {
        let t = line.trim();
        if t.ends_with(':') && !line.starts_with(' ') {
            section = t;
            seen |= section == "Active:";
            continue;
        }
        if (section == "Active:" || section == "Idle:")
            && let Some(n) = t.split_whitespace().next().and_then(|w| w.parse::<usize>().ok())
        {
            nodes += n;
        }
    }
    seen.then_some(nodes)
}

/// Ray daemons in containers of the given pods, found through their cgroups on this machine.
fn ray_processes_of(pod_uids: &BTreeSet<String>) -> Vec<String> {
    let mut found = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let p = e.path();
        let (Ok(comm), Ok(cgroup)) =
            (std::fs::read_to_string(p.join("comm")), std::fs::read_to_string(p.join("cgroup")))
        else {
            continue;
        };
        let comm = comm.trim();
        if !["raylet", "gcs_server"].contains(&comm) {
            continue;
        }
        // kubepods/<qos>/pod<uid>/<container>: the UID with '-' (cgroupfs driver).
        if pod_uids.iter().any(|u| cgroup.contains(&format!("pod{u}"))) {
            found.push(format!("{comm} (pid {})", e.file_name().to_string_lossy()));
        }
    }
    found
}

fn step(name: &str, t0: Instant) {
    eprintln!("real node: {name}: {:.1} s", t0.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ray_runs_in_the_pods_the_operator_makes_on_a_real_node() {
    let t = Instant::now();
    let cp = PrivateControlPlane::start_real_node();
    step("control plane with the real node up", t);
    let client = cp.client().await;
    let real = Real { cp, client };
    let images = real.cp.images();
    let operator_image = images.get("operator").expect("e2e/cluster images names the operator image").clone();
    assert!(images.contains_key("ray"), "{images:?}");

    // 1. The walkthrough, for real: CRD, namespace, the namespaced overlay with only the image set.
    let t = Instant::now();
    real.ok(&["apply", "-f", "crds/cluster_crd.yaml"], None);
    wait_crd_established(|| real.cp.kubectl());
    real.ok(&["create", "namespace", NS], None);
    let overlay = repo().join("target").join(format!("real-node-overlay-{}", random_suffix()));
    std::fs::create_dir_all(&overlay).unwrap();
    let (name, tag) = operator_image.rsplit_once(':').expect("image ref with a tag");
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n- ../../kustomize/overlays/namespaced\nimages:\n- name: ghcr.io/ray-operator/ray-operator\n  newName: {name}\n  newTag: \"{tag}\"\n"
        ),
    )
    .unwrap();
    real.ok(&["-n", NS, "apply", "-k", overlay.to_str().unwrap()], None);
    let _ = std::fs::remove_dir_all(&overlay);
    real.ok(&["-n", NS, "rollout", "status", "deploy/ray-operator", "--timeout=300s"], None);
    let leader = wait_until(Duration::from_secs(60), "one leader, its pod labelled", || async {
        let h = real.holder().await?;
        let pods: Api<Pod> = Api::namespaced(real.client.clone(), NS);
        let l = pods.list(&ListParams::default().labels("cluster.ray.io/operator-role=leader")).await.ok()?;
        (l.items.len() == 1 && l.items[0].name_any() == h).then_some(h)
    })
    .await;
    let operator_pods: Api<Pod> = Api::namespaced(real.client.clone(), NS);
    let ready: Vec<String> = operator_pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=ray-operator"))
        .await
        .unwrap()
        .items
        .iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .map(|p| p.name_any())
        .collect();
    assert_eq!(ready.len(), 2, "two operator pods Running and Ready: {ready:?}");
    step(&format!("operator Deployment installed, leader {leader}"), t);

    let t = Instant::now();
    // A short idle timeout for example-cluster, so step 2 sees the idle worker removed.
    let short_idle = |y: String| y.replace("idleTimeoutMinutes: 5", "idleTimeoutMinutes: 1");
    real.ok(&["-n", NS, "apply", "-f", "-"], Some(&example("example_cluster.yaml", short_idle)));
    real.ok(&["-n", NS, "apply", "-f", "-"], Some(&example("example_cluster2.yaml", |y| y)));
    let up1 = real.wait_ray_up("example-cluster", 2, Duration::from_secs(600)).await;
    let up2 = real.wait_ray_up("example-cluster2", 1, Duration::from_secs(300)).await;
    step(&format!("both examples up with real Ray (example-cluster {up1:.0?}, example-cluster2 +{up2:.0?})"), t);
    let log = real.leader_log();
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("example-cluster2:")).collect();
    assert!(!lines.is_empty(), "kubectl logs of the leader pod, grep ^example-cluster2: prints lines:\n{log}");
    eprintln!(
        "kubectl -n ray logs -l cluster.ray.io/operator-role=leader | grep ^example-cluster2: ->\n{}",
        lines.join("\n")
    );

    // 2. Autoscaling with real Ray: a driver in the head asks for 4 CPUs at once; the cluster has 3
    //    (head + 2 workers, one CPU each) → a third worker starts and joins, the tasks finish, and the
    //    idle third worker is drained and deleted after idleTimeoutMinutes (never the head, never
    //    below minWorkers 2).
    let t = Instant::now();
    let head1 = real.head("example-cluster").await.expect("head");
    let head1_uid: BTreeSet<String> =
        real.live("example-cluster").await.into_iter().filter(|(_, v)| v.0 == "head").map(|(u, _)| u).collect();
    let driver = real.exec_bg(
        &head1,
        &[
            "python",
            "-c",
            "import ray, time\nray.init(address='auto')\n@ray.remote(num_cpus=1)\ndef f():\n    time.sleep(40)\n    return 1\nprint('sum', sum(ray.get([f.remote() for _ in range(4)])))",
        ],
    );
    let saw_pending = std::cell::Cell::new(false);
    wait_until(Duration::from_secs(300), "a third worker, its Ray node joined", || async {
        if !saw_pending.get()
            && let Ok(st) = real.exec(&head1, &["ray", "status"])
        {
            let pending = st.split("Pending:").nth(1).and_then(|r| r.split("Recent failures:").next()).unwrap_or("");
            saw_pending
                .set(pending.lines().any(|l| l.contains("example-cluster-ray-worker-") || l.contains("worker-node")));
        }
        (real.pod_names("example-cluster", "worker").await.len() == 3 && real.ray_nodes("example-cluster").await? == 4)
            .then_some(())
    })
    .await;
    step("demand for 4 CPUs → third worker Running and in Ray", t);
    assert!(saw_pending.get(), "ray status showed the operator's pending launch while the worker started");
    let out = driver.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("sum 4"), "the tasks finished: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    step("the 4 tasks finished", t);
    wait_until(Duration::from_secs(240), "the idle third worker drained and deleted", || async {
        let w = real.pod_names("example-cluster", "worker").await;
        (w.len() == 2 && real.ray_nodes("example-cluster").await? == 3).then_some(())
    })
    .await;
    step("idle worker drained and removed (idleTimeoutMinutes 1)", t);
    let log = real.leader_log();
    assert!(log.lines().any(|l| l.starts_with("example-cluster:") && l.contains("draining idle worker")), "{log}");
    let heads: BTreeSet<String> =
        real.live("example-cluster").await.into_iter().filter(|(_, v)| v.0 == "head").map(|(u, _)| u).collect();
    assert_eq!(heads, head1_uid, "the head is never drained or deleted by the autoscaler");

    // 3. Rolling restart of the operator: every Ray pod keeps its UID, Ray stays healthy throughout,
    //    and the new leader acts (a new RayCluster gets its head pod) within 2 s of taking over.
    let t = Instant::now();
    let before: BTreeMap<String, _> =
        [real.live("example-cluster").await, real.live("example-cluster2").await].into_iter().flatten().collect();
    let old_leader = real.holder().await.expect("a leader");
    real.ok(&["-n", NS, "rollout", "restart", "deploy/ray-operator"], None);
    // `ray status` in both heads, again and again while the operator rolls (from a thread, so the
    // takeover is timed without waiting on it): every report must list all nodes. A `kubectl exec`
    // that fails on this busy machine is not a Ray failure: counted apart.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let heads = vec![
            (real.head("example-cluster").await.expect("head"), 3),
            (real.head("example-cluster2").await.expect("head"), 2),
        ];
        let (kubeconfig, kubectl) = (real.cp.cp.kubeconfig.clone(), real.cp.cp.bin.join("kubectl"));
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut healthy, mut exec_failures, mut unhealthy) = (0, 0, vec![]);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (head, nodes) in &heads {
                    let out = Command::new(&kubectl)
                        .env("KUBECONFIG", &kubeconfig)
                        .args(["-n", NS, "exec", head, "--", "ray", "status"])
                        .output();
                    let text = out
                        .ok()
                        .filter(|o| o.status.success())
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
                    match text.as_deref().map(ray_status_nodes) {
                        Some(Some(n)) if n == *nodes => healthy += 1,
                        Some(_) => unhealthy.push(format!("{head}: {}", text.unwrap_or_default())),
                        None => exec_failures += 1,
                    }
                }
            }
            (healthy, exec_failures, unhealthy)
        })
    };
    let took_over = wait_until(Duration::from_secs(300), "a new leader", || async {
        let h = real.holder().await?;
        (h != old_leader).then(Instant::now)
    })
    .await;
    let third = example("example_cluster2.yaml", |y| y.replace("name: example-cluster2", "name: example-cluster3"));
    real.ok(&["-n", NS, "apply", "-f", "-"], Some(&third));
    wait_until(Duration::from_secs(10), "example-cluster3's head pod", || async {
        real.live("example-cluster3").await.values().any(|v| v.0 == "head").then_some(())
    })
    .await;
    let acted = took_over.elapsed();
    real.ok(&["-n", NS, "rollout", "status", "deploy/ray-operator", "--timeout=300s"], None);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (healthy, exec_failures, unhealthy) = watcher.join().unwrap();
    step(&format!("rollout restart; new leader made a head pod {acted:.2?} after taking over"), t);
    eprintln!("ray status during the roll: {healthy} healthy reports, {exec_failures} failed kubectl execs");
    assert!(unhealthy.is_empty(), "ray status stays healthy during the roll: {unhealthy:?}");
    assert!(healthy >= 2, "ray status was checked during the roll: {healthy} reports");
    assert!(acted <= Duration::from_secs(2), "the new leader acts within 2 s of taking over: {acted:?}");
    let after: BTreeMap<String, _> =
        [real.live("example-cluster").await, real.live("example-cluster2").await].into_iter().flatten().collect();
    assert_eq!(after.keys().collect::<Vec<_>>(), before.keys().collect::<Vec<_>>(), "no Ray pod replaced by the roll");
    real.ok(&["-n", NS, "delete", "raycluster", "example-cluster3", "--wait=false"], None);

    // 4. Ray dies, the pod lives: kill the raylet in a worker, then in the head.
    let t = Instant::now();
    let victim = real.pod_names("example-cluster2", "worker").await.pop().expect("a worker");
    real.exec(&victim, &["pkill", "-KILL", "raylet"]).expect("kill the worker's raylet");
    wait_until(Duration::from_secs(240), "the worker with a dead raylet replaced", || async {
        let w = real.pod_names("example-cluster2", "worker").await;
        (w.len() == 1 && w[0] != victim && real.ray_nodes("example-cluster2").await? == 2).then_some(())
    })
    .await;
    step("worker whose raylet died replaced, Ray healthy", t);
    let t = Instant::now();
    let retries = real.status("example-cluster2").await.expect("status").autoscaler_retries;
    let old_head = real.head("example-cluster2").await.expect("head");
    real.exec(&old_head, &["pkill", "-KILL", "raylet"]).expect("kill the head's raylet");
    let saw_recovery = std::cell::Cell::new(false);
    wait_until(Duration::from_secs(420), "the head recovered and Ray healthy again", || async {
        let st = real.status("example-cluster2").await?;
        if st.phase == Some(ray_operator::api::Phase::AutoscalingExceptionRecovery) {
            saw_recovery.set(true);
        }
        let head = real.head("example-cluster2").await?;
        (head != old_head && st.autoscaler_retries == retries + 1 && real.ray_nodes("example-cluster2").await? == 2)
            .then_some(())
    })
    .await;
    assert!(saw_recovery.get(), "phase went through AutoscalingExceptionRecovery");
    step("head whose raylet died recreated (autoscalerRetries +1), Ray healthy", t);

    // 5. Edit + re-apply replaces only that type's pods; an annotation restarts all of them.
    let t = Instant::now();
    let c2 = real.live("example-cluster2").await;
    let edited = example("example_cluster2.yaml", |y| {
        y.replace(
            r#"rayResources: {"example-resource-c": 5, "example-resource-d": 17}"#,
            r#"rayResources: {"example-resource-c": 6}"#,
        )
    });
    assert!(edited.contains("example-resource-c\": 6"), "the edit applies to the example");
    real.ok(&["-n", NS, "apply", "-f", "-"], Some(&edited));
    wait_until(Duration::from_secs(300), "example-cluster2's worker replaced, head kept", || async {
        let now = real.live("example-cluster2").await;
        let head_kept = c2.iter().filter(|(_, v)| v.0 == "head").all(|(u, _)| now.contains_key(u));
        let workers_new = now.iter().filter(|(_, v)| v.0 == "worker").all(|(u, _)| !c2.contains_key(u));
        (head_kept && workers_new && now.len() == 2 && real.ray_nodes("example-cluster2").await? == 2).then_some(())
    })
    .await;
    step("edit + re-apply: only the worker replaced, Ray healthy", t);
    let t = Instant::now();
    let c1 = real.live("example-cluster").await;
    let annotated = example("example_cluster.yaml", |y| {
        short_idle(y).replace("  name: example-cluster\n", "  name: example-cluster\n  annotations:\n    try: again\n")
    });
    real.ok(&["-n", NS, "apply", "-f", "-"], Some(&annotated));
    wait_until(Duration::from_secs(600), "example-cluster restarted, Ray healthy", || async {
        let now = real.live("example-cluster").await;
        (now.len() == 3 && now.keys().all(|u| !c1.contains_key(u))).then_some(())
    })
    .await;
    real.wait_ray_up("example-cluster", 2, Duration::from_secs(300)).await;
    step("annotation + re-apply: every Ray pod restarted, Ray healthy", t);

    // 6. Delete: pods and Service gone, no Ray process of theirs left on the node.
    let t = Instant::now();
    let uids: BTreeSet<String> = real.live("example-cluster2").await.into_keys().collect();
    assert!(!ray_processes_of(&uids).is_empty(), "the check sees the running cluster's Ray daemons");
    real.ok(&["-n", NS, "delete", "raycluster", "example-cluster2"], None);
    let svcs: Api<Service> = Api::namespaced(real.client.clone(), NS);
    wait_until(Duration::from_secs(120), "example-cluster2's pods, Service and Ray processes gone", || async {
        let gone = real.ray_pods("example-cluster2").await.is_empty()
            && svcs.get_opt("example-cluster2-ray-head").await.ok()?.is_none()
            && ray_processes_of(&uids).is_empty();
        gone.then_some(())
    })
    .await;
    step("delete: pods, Service and Ray processes gone", t);
    assert_eq!(real.ray_nodes("example-cluster").await, Some(3), "the other cluster is untouched");
}

#[test]
fn ray_status_nodes_counts_active_and_idle() {
    let text = "Node status\n----\nActive:\n 1 worker-node\nIdle:\n 1 head-node\n 1 worker-node\nPending:\n worker-node, 1 launching\nRecent failures:\n (no failures)\n";
    assert_eq!(ray_status_nodes(text), Some(3));
    assert_eq!(ray_status_nodes("Active:\n (no active nodes)\nIdle:\n (no idle nodes)\n"), Some(0));
    assert_eq!(ray_status_nodes("ConnectionError: could not find any running Ray instance"), None);
}
