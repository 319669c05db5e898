//! GCS replies are untrusted (issue 15, item 3): the head runs the user's image, so whoever can
//! edit a RayCluster controls what its GCS answers. Fake GCS servers (grpcio, Ray's own protobufs,
//! tests/fixtures/ray/fake_gcs.py) send a reply over the size limit, one under it that would
//! decode into gigabytes, realistic nodes past the decode budget, answer slowly, or never; a
//! 10,000-node cluster's state must still be accepted, a healthy neighbour (a real Ray head)
//! beside them must still get its demand as a pod within 1 s, and the operator's peak RSS must
//! stay within its Deployment's memory limit.

mod support;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::api::PostParams;
use kube::{Api, Client};
use ray_operator::api::RayCluster;
use ray_operator::ray::GcsClient;
use support::*;

/// The operator Deployment's memory limit (kustomize/base/deployment.yaml).
const MEMORY_LIMIT_KIB: u64 = 256 * 1024;
/// Clusters whose GCS answers every call just under the call timeout: more than the operator's
/// 32 shared call slots, so without fairness they would hold every slot all the time.
const SLOW_CLUSTERS: usize = 96;
const SILENT_CLUSTERS: usize = 8;

const DRIVER: &str = include_str!("fixtures/ray/demand_driver.py");
const FAKE_GCS: &str = include_str!("fixtures/ray/fake_gcs.py");

fn venv(script: &str) -> PathBuf {
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e").join(script))
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run e2e/{script}: {e}"));
    assert!(out.status.success(), "e2e/{script} failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<_> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

fn kill_group(pgid: u32) {
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).stderr(Stdio::null()).status();
}

/// Processes of this test, each in its own process group; all killed on drop.
struct Procs {
    dir: tempfile::TempDir,
    groups: Vec<u32>,
    children: Vec<Child>,
}

impl Procs {
    fn new() -> Self {
        // Short path: Ray puts Unix sockets under it (108-byte limit).
        let dir = tempfile::Builder::new().prefix("rayu").tempdir_in("/tmp").unwrap();
        Self { dir, groups: vec![], children: vec![] }
    }

    fn spawn(&mut self, mut cmd: Command, log: &str) -> &mut Child {
        let file = std::fs::File::create(self.dir.path().join(log)).unwrap();
        cmd.env("RAY_USAGE_STATS_ENABLED", "0").env_remove("RAY_ADDRESS");
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.stdout(file.try_clone().unwrap()).stderr(file).spawn().expect("spawn");
        self.groups.push(child.id());
        self.children.push(child);
        self.children.last_mut().unwrap()
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// A real Ray head (1 CPU, no monitor: the operator is the autoscaler) on `gcs_port`.
    fn ray_head(&mut self, bin: &Path, gcs_port: u16) {
        let p = free_ports(7);
        let mut cmd = Command::new(bin.join("ray"));
        cmd.args(["start", "--head", "--no-monitor", "--num-cpus=1", "--include-dashboard=false"])
            .args(["--node-ip-address=127.0.0.1", "--disable-usage-stats", "--object-store-memory=100000000"])
            .arg(format!("--port={gcs_port}"))
            .arg(format!("--temp-dir={}", self.dir.path().join("t").display()))
            .arg(format!("--dashboard-port={}", p[6]))
            .arg(format!("--node-manager-port={}", p[0]))
            .arg(format!("--object-manager-port={}", p[1]))
            .arg(format!("--dashboard-agent-listen-port={}", p[2]))
            .arg(format!("--dashboard-agent-grpc-port={}", p[3]))
            .arg(format!("--runtime-env-agent-port={}", p[4]))
            .arg(format!("--metrics-export-port={}", p[5]))
            .env("RAY_enable_autoscaler_v2", "1")
            .env("RAY_CLOUD_INSTANCE_ID", "head")
            .env("RAY_NODE_TYPE_NAME", "head");
        let status = self.spawn(cmd, "head.log").wait().unwrap();
        assert!(status.success(), "ray start --head failed:\n{}", self.log("head.log"));
    }

    /// The demand driver (two 4-CPU tasks); returns its process group.
    fn driver(&mut self, bin: &Path, gcs_port: u16) -> u32 {
        let script = self.dir.path().join("driver.py");
        std::fs::write(&script, DRIVER).unwrap();
        let mut cmd = Command::new(bin.join("python"));
        cmd.arg(&script).arg(format!("127.0.0.1:{gcs_port}"));
        self.spawn(cmd, "driver.log").id()
    }

    /// The fake GCS servers, `mode=port` each; returns once they listen.
    fn fake_gcs(&mut self, bin: &Path, servers: &[(&str, u16)]) {
        let script = self.dir.path().join("fake_gcs.py");
        std::fs::write(&script, FAKE_GCS).unwrap();
        let mut cmd = Command::new(bin.join("python"));
        cmd.arg(&script).args(servers.iter().map(|(m, p)| format!("{m}={p}")));
        cmd.env("RAY_USAGE_STATS_ENABLED", "0");
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("fake GCS");
        self.groups.push(child.id());
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "fake GCS did not start");
        self.children.push(child);
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for g in std::mem::take(&mut self.groups) {
            kill_group(g);
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        // Ray daemons fork into groups of their own under the temp dir; stop stragglers.
        let _ = Command::new("pkill").args(["-9", "-f", &self.dir.path().display().to_string()]).status();
    }
}

fn manifest(name: &str, gcs: &str) -> RayCluster {
    let pod = |prefix: &str, cpu: &str| {
        serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": prefix},
            "spec": {"containers": [{"name": "ray", "image": "rayproject/ray:2.60.0", "command": ["sleep", "infinity"],
                "resources": {"requests": {"cpu": cpu}}}]}})
    };
    serde_json::from_value(serde_json::json!({
        "apiVersion": "cluster.ray.io/v1", "kind": "RayCluster",
        "metadata": {"name": name, "annotations": {"cluster.ray.io/gcs-address": gcs}},
        "spec": {"maxWorkers": 3, "headPodType": "head", "idleTimeoutMinutes": 5,
            "podTypes": [
                {"name": "head", "podConfig": pod("ray-head-", "1")},
                {"name": "cpu4", "minWorkers": 0, "maxWorkers": 3, "podConfig": pod("ray-cpu4-", "4")}],
            "headStartRayCommands": ["ray start --head"],
            "workerStartRayCommands": ["ray start --address=$RAY_HEAD_IP:6379"]}
    }))
    .unwrap()
}

async fn condition(client: &Client, ns: &str, name: &str) -> Option<(String, String)> {
    let api: Api<RayCluster> = Api::namespaced(client.clone(), ns);
    let s = api.get(name).await.ok()?.status?;
    let c = s.conditions.into_iter().find(|c| c.type_ == "AutoscalerHealthy")?;
    Some((c.status, c.reason))
}

/// Peak resident memory of a process (`VmHWM`), in KiB.
fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

async fn demand_visible(gcs: &str) -> bool {
    let Ok(mut c) = GcsClient::connect(gcs, Duration::from_secs(2)).await else { return false };
    c.get_cluster_resource_state()
        .await
        .is_ok_and(|s| s.pending_resource_requests.iter().any(|d| d.shape.get("CPU") == Some(&4.0)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_gcs_replies_cost_bounded_memory_and_do_not_delay_a_healthy_neighbour() {
    let ray = venv("ray-venv");
    let grpc = venv("grpc-venv");
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "untrusted").await;
    let mut procs = Procs::new();
    let modes = ["huge", "dense", "bomb", "tenk", "slow", "silent"];
    let ports = free_ports(modes.len() + 1);
    let servers: Vec<(&str, u16)> = modes.iter().copied().zip(ports.iter().copied()).collect();
    procs.fake_gcs(&grpc, &servers);
    let fake = |mode: &str| format!("127.0.0.1:{}", servers.iter().find(|(m, _)| *m == mode).unwrap().1);
    let head_port = ports[modes.len()];
    procs.ray_head(&ray, head_port);
    let head = format!("127.0.0.1:{head_port}");

    let op = OperatorProcess::start(
        &[
            "--no-leader-election",
            "--namespaces",
            &ns.name,
            "--autoscaler-interval",
            "0.5",
            "--allow-gcs-address-annotation",
        ],
        &[],
    );
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), &ns.name);
    let pp = PostParams::default();
    for mode in ["huge", "dense", "bomb", "tenk"] {
        rcs.create(&pp, &manifest(mode, &fake(mode))).await.unwrap();
    }
    for i in 0..SLOW_CLUSTERS {
        rcs.create(&pp, &manifest(&format!("slow-{i}"), &fake("slow"))).await.unwrap();
    }
    for i in 0..SILENT_CLUSTERS {
        rcs.create(&pp, &manifest(&format!("silent-{i}"), &fake("silent"))).await.unwrap();
    }
    // Each hostile head is refused with a classified reason.
    for (name, reason) in [
        ("huge", "GcsReplyTooLarge"),
        ("dense", "GcsReplyTooLarge"),
        ("bomb", "GcsReplyTooLarge"),
        ("silent-0", "GcsTimeout"),
    ] {
        wait_until(Duration::from_secs(90), &format!("{name}: AutoscalerHealthy=False {reason}"), || async {
            (condition(&client, &ns.name, name).await? == ("False".into(), reason.into())).then_some(())
        })
        .await;
    }
    // A real 10,000-node cluster's state is accepted (through the slow pool, whose replies may be
    // up to 16 MiB): the link is healthy, whatever the decision makes of nodes without pods.
    let tenk = wait_until(Duration::from_secs(90), "tenk: a decision from its state", || async {
        let c = condition(&client, &ns.name, "tenk").await?;
        (c.1 == "GcsReachable" || c.1 == "DecisionFailed").then_some(c)
    })
    .await;
    eprintln!("tenk (11,000 nodes, 7.4 MB): AutoscalerHealthy {tenk:?}");
    // Every slow cluster's link is polling.
    wait_until(Duration::from_secs(90), "all slow clusters reachable", || async {
        let logs = op.logs();
        let n = (0..SLOW_CLUSTERS).filter(|i| logs.contains(&format!("slow-{i}: {}: GCS at", ns.name))).count();
        (n == SLOW_CLUSTERS).then_some(())
    })
    .await;

    // The healthy neighbour: demand in its (real) GCS becomes a pod within 1 s, every trial.
    for trial in 0..3 {
        let name = format!("healthy-{trial}");
        rcs.create(&pp, &manifest(&name, &head)).await.unwrap();
        wait_until(Duration::from_secs(60), &format!("{name} healthy"), || async {
            (condition(&client, &ns.name, &name).await? == ("True".into(), "GcsReachable".into())).then_some(())
        })
        .await;
        let driver = procs.driver(&ray, head_port);
        let t0 = wait_until(Duration::from_secs(60), "demand in the GCS", || async {
            demand_visible(&head).await.then(Instant::now)
        })
        .await;
        let selector = format!("ray-cluster-name={name},ray-node-type=worker");
        wait_until(Duration::from_secs(30), "worker pod", || async {
            (!live_pods(&client, &ns.name, &selector).await.is_empty()).then_some(())
        })
        .await;
        let reaction = t0.elapsed();
        eprintln!(
            "{name}: demand in the GCS -> worker pod in {reaction:?}, beside {SLOW_CLUSTERS} slow and {SILENT_CLUSTERS} silent heads"
        );
        assert!(reaction <= Duration::from_secs(1), "{name}: the healthy neighbour waited {reaction:?}");
        kill_group(driver);
        rcs.delete(&name, &Default::default()).await.unwrap();
        wait_until(Duration::from_secs(30), "demand gone", || async { (!demand_visible(&head).await).then_some(()) })
            .await;
    }

    let peak = peak_rss_kib(op.pid());
    eprintln!("operator peak RSS (VmHWM) {} MiB, limit {} MiB", peak / 1024, MEMORY_LIMIT_KIB / 1024);
    assert!(peak <= MEMORY_LIMIT_KIB, "operator peak RSS {peak} KiB over the {MEMORY_LIMIT_KIB} KiB limit");
    assert!(!op.logs().contains("panicked"));
}
