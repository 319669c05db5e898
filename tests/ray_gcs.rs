//! The GCS client against a real Ray head: ray==2.60.0 from PyPI, in the virtualenv that
//! `e2e/ray-venv` creates (once) and caches.
//!
//! One test, in steps, because starting a head costs 10–20 s on a small machine. It starts a head
//! the way the operator does (`--no-monitor`, `RAY_enable_autoscaler_v2=1`, the pod identity
//! variables), submits demand the 1-CPU head cannot serve from a Python driver, and checks that
//! the client reads that demand, that a report shows up in `GetClusterStatus` and in `ray status`,
//! and how draining behaves. Everything started here runs in its own process groups, which a
//! guard kills — never `ray stop`, which would kill every Ray process on the machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use ray_operator::autoscaler::decision::{NodeTypeConfig, PlacementStrategy, ResourceMap, get_nodes_to_launch};
use ray_operator::autoscaler::decision_input::to_decision_input;
use ray_operator::ray::proto::{self, autoscaler_state_service_client::AutoscalerStateServiceClient};
use ray_operator::ray::{
    AutoscalingReport, ClusterState, DrainReason, FailedLaunch, GcsClient, NodeStatus, PendingInstance, PendingLaunch,
    RayError, ResourceDemand,
};

const HEAD_POD: &str = "test-head-pod";
const HEAD_TYPE: &str = "headgroup";
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Demand a 1-CPU head cannot serve: a 1-CPU actor holds the CPU (so the head is busy, not
/// idle), two 4-CPU tasks, a STRICT_SPREAD placement group of 2 × {CPU: 1}, a task waiting for
/// that group, and `request_resources(num_cpus=3)`.
const DRIVER: &str = r#"
import sys, time
import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from ray.autoscaler.sdk import request_resources

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=1)
class Busy:
    def ping(self):
        return 1

@ray.remote
def f():
    return 1

busy = Busy.remote()
ray.get(busy.ping.remote())
big = [f.options(num_cpus=4).remote() for _ in range(2)]
pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
in_pg = f.options(num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(pg)).remote()
request_resources(num_cpus=3)
print("DEMAND SUBMITTED", flush=True)
time.sleep(3600)
"#;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The bin dir of the cached Ray virtualenv (created on first use, which takes a minute).
fn ray_bin() -> PathBuf {
    let out = Command::new(repo().join("e2e/ray-venv")).stderr(Stdio::inherit()).output().expect("run e2e/ray-venv");
    assert!(out.status.success(), "e2e/ray-venv failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// `n` distinct free TCP ports (all bound at once, then released).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    listeners.iter().map(|l| l.local_addr().expect("addr").port()).collect()
}

/// Whether any process of the group is alive.
fn group_alive(pgid: u32) -> bool {
    Command::new("kill")
        .args(["-0", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn kill_group(pgid: u32, signal: &str) {
    let _ = Command::new("kill").args([signal, "--", &format!("-{pgid}")]).stderr(Stdio::null()).status();
}

/// A Ray head (and the demand driver) started by this test; dropping it kills both process
/// groups: SIGTERM, then SIGKILL after 2 s (the GCS and the raylet do not always exit on
/// SIGTERM; the workers exit by themselves once their raylet is gone).
struct RayHead {
    bin: PathBuf,
    dir: tempfile::TempDir,
    gcs_port: u16,
    head_pgid: Option<u32>,
    driver: Option<Child>,
}

impl RayHead {
    fn start(bin: &Path) -> RayHead {
        // A short path: Ray puts Unix sockets under the temp dir (108-byte limit).
        let dir = tempfile::Builder::new().prefix("rayg").tempdir_in("/tmp").expect("temp dir");
        let ports = free_ports(8);
        let mut head = RayHead { bin: bin.to_path_buf(), dir, gcs_port: ports[0], head_pgid: None, driver: None };
        let log = std::fs::File::create(head.dir.path().join("ray-start.log")).expect("log file");
        let mut cmd = Command::new(bin.join("ray"));
        cmd.args(["start", "--head", "--no-monitor", "--node-ip-address=127.0.0.1", "--num-cpus=1"])
            .args(["--include-dashboard=false", "--disable-usage-stats", "--object-store-memory=100000000"])
            .arg(format!("--port={}", ports[0]))
            .arg(format!("--node-manager-port={}", ports[1]))
            .arg(format!("--object-manager-port={}", ports[2]))
            .arg(format!("--dashboard-agent-listen-port={}", ports[3]))
            .arg(format!("--dashboard-agent-grpc-port={}", ports[4]))
            .arg(format!("--runtime-env-agent-port={}", ports[5]))
            .arg(format!("--metrics-export-port={}", ports[6]))
            .arg(format!("--dashboard-port={}", ports[7]))
            .arg(format!("--temp-dir={}", head.dir.path().join("t").display()));
        head.ray_env(&mut cmd);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.stdout(log.try_clone().expect("log")).stderr(log).spawn().expect("spawn ray start");
        // `ray start` returns once the daemons run; they stay in its process group.
        head.head_pgid = Some(child.id());
        let status = child.wait().expect("wait for ray start");
        assert!(status.success(), "ray start failed:\n{}", head.log("ray-start.log"));
        head
    }

    /// The environment the operator gives the head pod.
    fn ray_env(&self, cmd: &mut Command) {
        cmd.env("RAY_enable_autoscaler_v2", "1")
            .env("RAY_CLOUD_INSTANCE_ID", HEAD_POD)
            .env("RAY_NODE_TYPE_NAME", HEAD_TYPE)
            .env("RAY_USAGE_STATS_ENABLED", "0")
            .env_remove("RAY_ADDRESS");
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.gcs_port)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn start_driver(&mut self) {
        let script = self.dir.path().join("driver.py");
        std::fs::write(&script, DRIVER).expect("write driver");
        let log = std::fs::File::create(self.dir.path().join("driver.log")).expect("log file");
        let mut cmd = Command::new(self.bin.join("python"));
        cmd.arg(&script).arg(self.addr());
        self.ray_env(&mut cmd);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.stdout(log.try_clone().expect("log")).stderr(log).spawn().expect("spawn driver");
        self.driver = Some(child);
    }

    /// `ray status` as a user would run it on the head.
    fn ray_status(&self) -> String {
        let mut cmd = Command::new(self.bin.join("ray"));
        cmd.args(["status", "--address", &self.addr()]);
        self.ray_env(&mut cmd);
        let out = cmd.output().expect("run ray status");
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }
}

impl Drop for RayHead {
    fn drop(&mut self) {
        let mut groups = Vec::new();
        if let Some(mut driver) = self.driver.take() {
            groups.push(driver.id());
            kill_group(driver.id(), "-TERM");
            let _ = driver.wait();
        }
        groups.extend(self.head_pgid.take());
        for &g in &groups {
            kill_group(g, "-TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while groups.iter().any(|&g| group_alive(g)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        for &g in &groups {
            if group_alive(g) {
                kill_group(g, "-KILL");
            }
        }
    }
}

fn res(items: &[(&str, f64)]) -> ResourceMap {
    items.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn has_demand(state: &ClusterState, shape: &ResourceMap, count: u64) -> bool {
    state.pending_resource_requests.iter().any(|d| &d.shape == shape && d.count == count)
}

fn spread_group(state: &ClusterState) -> Option<&ray_operator::ray::GangRequest> {
    state
        .pending_gang_requests
        .iter()
        .find(|g| g.strategy == PlacementStrategy::StrictSpread && g.bundles == vec![res(&[("CPU", 1.0)]); 2])
}

fn has_constraint(state: &ClusterState, shape: &ResourceMap, count: u64) -> bool {
    state.cluster_resource_constraints.iter().flat_map(|c| &c.requests).any(|d| &d.shape == shape && d.count == count)
}

/// Reads the state until `done` holds or `within` passes; returns the last state read.
async fn poll(
    client: &mut GcsClient,
    within: Duration,
    what: &str,
    done: impl Fn(&ClusterState) -> bool,
) -> ClusterState {
    let deadline = Instant::now() + within;
    loop {
        let state = client.get_cluster_resource_state().await.expect("GetClusterResourceState");
        if done(&state) {
            return state;
        }
        assert!(Instant::now() < deadline, "{what}: not seen within {within:?}; last state: {state:#?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[test]
fn gcs_client_against_a_real_ray_head() {
    let t0 = Instant::now();
    let bin = ray_bin();
    let mut head = RayHead::start(&bin);
    eprintln!("ray head up on {} after {:?}", head.addr(), t0.elapsed());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(steps(&mut head, t0))));
    if let Err(panic) = result {
        eprintln!("--- ray start log ---\n{}", head.log("ray-start.log"));
        eprintln!("--- driver log ---\n{}", head.log("driver.log"));
        std::panic::resume_unwind(panic);
    }
}

async fn steps(head: &mut RayHead, t0: Instant) {
    // Connect: the GCS is up once `ray start` returned, but allow for a slow machine.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = loop {
        match GcsClient::connect(&head.addr(), CALL_TIMEOUT).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                assert!(e.is_connect(), "{e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("cannot connect: {e}"),
        }
    };

    // --- The head node, as the operator's pods will look.
    let state = poll(&mut client, Duration::from_secs(60), "the head node", |s| s.head().is_some()).await;
    let head_node = state.head().cloned().expect("head");
    assert_eq!(head_node.instance_id, HEAD_POD);
    assert_eq!(head_node.ray_node_type_name, HEAD_TYPE);
    assert_eq!(head_node.node_id.len(), 56, "{}", head_node.node_id);
    assert_eq!(head_node.labels.get("ray.io/node-id"), Some(&head_node.node_id), "hex as Ray writes it");
    assert_eq!(head_node.labels.get("ray.io/node-group").map(String::as_str), Some(HEAD_TYPE));
    assert_eq!(head_node.total_resources.get("CPU"), Some(&1.0));
    assert!(matches!(head_node.status, NodeStatus::Idle | NodeStatus::Running), "{:?}", head_node.status);
    assert!(!state.session_name.is_empty());
    let again = client.get_cluster_resource_state().await.expect("second read");
    assert!(again.version > state.version, "the GCS bumps the version on every read");
    eprintln!("head node {} seen after {:?}", head_node.node_id, t0.elapsed());

    // Our client never drains the head (the GCS would let an idle head's raylet exit).
    let err = client
        .drain_node(&head_node.node_id, DrainReason::IdleTermination, "test", None)
        .await
        .expect_err("draining the head must be refused");
    assert!(matches!(err, RayError::HeadNode { .. }), "{err}");
    assert_eq!(err.reason(), "head_node");

    // --- Demand.
    head.start_driver();
    let cpu4 = res(&[("CPU", 4.0)]);
    let cpu1 = res(&[("CPU", 1.0)]);
    let state = poll(&mut client, Duration::from_secs(120), "the driver's demand", |s| {
        has_demand(s, &cpu4, 2)
            && spread_group(s).is_some()
            && has_constraint(s, &cpu1, 3)
            && s.pending_resource_requests.iter().any(ResourceDemand::involves_placement_group)
            && s.head().is_some_and(|h| h.status == NodeStatus::Running)
    })
    .await;
    eprintln!("demand seen after {:?}: {:#?}", t0.elapsed(), state.pending_resource_requests);
    let group = spread_group(&state).cloned().expect("spread group");
    assert_eq!(group.placement_group_id.len(), 36, "{group:?}");
    assert_eq!(group.state, "PENDING");
    assert!(group.details.starts_with(&format!("{}:STRICT_SPREAD|", group.placement_group_id)), "{group:?}");
    // The busy actor holds the head's CPU: it is in use, not demand.
    assert!(!state.head().expect("head").available_resources.get("CPU").is_some_and(|c| *c > 0.0));
    assert!(!has_demand(&state, &cpu1, 1), "the running actor is not pending: {state:#?}");
    // A task waiting for its placement group asks for the group's resources.
    let pg_task = state.pending_resource_requests.iter().find(|d| d.involves_placement_group()).expect("pg task");
    assert!(pg_task.shape.keys().any(|k| k.contains(&group.placement_group_id)), "{pg_task:?}");

    // --- The decision on that state: new 4-CPU nodes; only the task waiting for its placement
    // group stays unfulfilled (no node type can provide placement-group resources).
    let types = vec![
        NodeTypeConfig { name: HEAD_TYPE.into(), resources: cpu1.clone(), min_workers: 0, max_workers: 0 },
        NodeTypeConfig { name: "cpu".into(), resources: cpu4.clone(), min_workers: 0, max_workers: 10 },
    ];
    let pods = vec![(HEAD_TYPE.to_string(), HEAD_POD.to_string())];
    let input = to_decision_input(&state, &types, HEAD_TYPE, 10, 1.0, &pods);
    assert_eq!(input.nodes.len(), 1);
    assert!(input.nodes[0].is_head);
    assert_eq!(input.placement_groups.len(), 1);
    assert_eq!(input.request_resources, vec![cpu1.clone(); 3]);
    let decision = get_nodes_to_launch(&input).expect("decision");
    eprintln!("decision: {decision:?}");
    let launches = decision.nodes_to_launch.get("cpu").copied().unwrap_or(0);
    assert!(launches >= 2, "{decision:?}");
    assert!(
        decision.unfulfilled.iter().all(|u| u.shape.keys().any(|k| ray_operator::ray::is_placement_group_resource(k))),
        "{decision:?}"
    );

    // --- Report what we are doing, and read it back as `ray status` does.
    let now = SystemTime::now();
    let report = AutoscalingReport {
        cluster_state_version: state.version,
        pending_launches: vec![PendingLaunch { node_type: "cpu".into(), count: launches, requested_at: now }],
        pending_instances: vec![PendingInstance {
            instance_id: "test-cpu-pod-1".into(),
            node_type: "cpu".into(),
            ip_address: String::new(),
            details: "pod pending".into(),
        }],
        failed_launches: vec![FailedLaunch {
            node_type: "gpu".into(),
            count: 1,
            reason: "exceeded quota".into(),
            requested_at: now,
            failed_at: now,
        }],
        infeasible_requests: vec![ResourceDemand {
            shape: res(&[("GPU", 16.0)]),
            count: 2,
            label_selectors: Vec::new(),
        }],
        infeasible_gang_requests: vec![group.clone()],
        infeasible_constraints: Vec::new(),
    };
    let v1 = client.report_autoscaling_state(&report).await.expect("report");
    let status = client.get_cluster_status().await.expect("GetClusterStatus");
    let seen = status.autoscaling_state.expect("the GCS holds our report");
    assert_eq!(seen.version, v1);
    assert_eq!(seen.report.cluster_state_version, state.version);
    assert_eq!(seen.report.pending_launches.len(), 1);
    assert_eq!(seen.report.pending_launches[0].node_type, "cpu");
    assert_eq!(seen.report.pending_launches[0].count, launches);
    assert_eq!(seen.report.pending_instances, report.pending_instances);
    assert_eq!(seen.report.failed_launches[0].reason, "exceeded quota");
    assert_eq!(seen.report.infeasible_requests, report.infeasible_requests);
    assert_eq!(seen.report.infeasible_gang_requests, vec![group.clone()]);
    assert!(has_demand(&status.cluster_state, &cpu4, 2));

    // Versions only go up: a second report, then a brand-new client (as after an operator
    // restart), which must start above what the GCS holds.
    let v2 = client.report_autoscaling_state(&report).await.expect("second report");
    assert!(v2 > v1, "{v2} > {v1}");
    let mut fresh = GcsClient::connect(&head.addr(), CALL_TIMEOUT).await.expect("connect again");
    let mut newer = report.clone();
    newer.pending_launches[0].count = launches + 1;
    let v3 = fresh.report_autoscaling_state(&newer).await.expect("report from a new client");
    assert!(v3 > v2, "{v3} > {v2}");
    let seen = fresh.get_cluster_status().await.expect("status").autoscaling_state.expect("report");
    assert_eq!((seen.version, seen.report.pending_launches[0].count), (v3, launches + 1), "not dropped as outdated");

    // `ray status` on the head shows our launches, pending pods and failures.
    let text = head.ray_status();
    eprintln!("--- ray status after {:?} ---\n{text}", t0.elapsed());
    assert!(text.contains(&format!("cpu, {} launching", launches + 1)), "{text}");
    assert!(text.contains("test-cpu-pod-1: cpu, pod pending"), "{text}");
    assert!(text.contains("gpu: LaunchFailed"), "{text}");
    assert!(text.contains("{'CPU': 4.0}: 2+ pending tasks/actors"), "{text}");

    // --- request_resources() through our client replaces the constraint.
    let cpu2 = res(&[("CPU", 2.0)]);
    client
        .request_cluster_resource_constraint(&[ResourceDemand {
            shape: cpu2.clone(),
            count: 3,
            label_selectors: Vec::new(),
        }])
        .await
        .expect("constraint");
    let state = client.get_cluster_resource_state().await.expect("state");
    assert_eq!(state.cluster_resource_constraints.len(), 1);
    assert!(has_constraint(&state, &cpu2, 3), "{:?}", state.cluster_resource_constraints);

    // --- Draining. What the GCS does with requests our client would never send, through the
    // raw stub: the busy head rejects an idle-termination drain (an idle head would accept it,
    // and its raylet would exit, which is why the client refuses heads outright).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", head.addr()))
        .expect("endpoint")
        .connect()
        .await
        .expect("raw connect");
    let mut raw = AutoscalerStateServiceClient::new(channel);
    let head_id = hex_bytes(&head_node.node_id);
    let reply = raw
        .drain_node(proto::DrainNodeRequest {
            node_id: head_id.clone(),
            reason: proto::DrainNodeReason::IdleTermination as i32,
            reason_message: "test: busy head".into(),
            deadline_timestamp_ms: 0,
        })
        .await
        .expect("DrainNode(head)")
        .into_inner();
    eprintln!("DrainNode(busy head, IDLE_TERMINATION) -> {reply:?}");
    assert!(!reply.is_accepted, "the busy head must reject an idle-termination drain");
    assert!(reply.rejection_reason_message.contains("no longer idle"), "{reply:?}");
    // A negative deadline is refused by the GCS with an error status: Ray's `Status::Invalid`
    // arrives as gRPC ABORTED, message "Invalid", the explanation in the status details.
    let err = raw
        .drain_node(proto::DrainNodeRequest {
            node_id: head_id,
            reason: proto::DrainNodeReason::IdleTermination as i32,
            reason_message: "test: negative deadline".into(),
            deadline_timestamp_ms: -1,
        })
        .await
        .expect_err("negative deadline");
    let details = String::from_utf8_lossy(err.details()).to_string();
    eprintln!("DrainNode(deadline -1) -> {:?}: {}: {details}", err.code(), err.message());
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
    assert!(details.contains("non-negative"), "{err:?}");
    // An unknown node counts as drained.
    let unknown = "ab".repeat(28);
    let outcome = client
        .drain_node(&unknown, DrainReason::IdleTermination, "test: unknown node", None)
        .await
        .expect("DrainNode(unknown)");
    assert!(outcome.accepted, "{outcome:?}");
    // The head is still alive after all this.
    let state = client.get_cluster_resource_state().await.expect("state");
    assert_ne!(state.head().map(|h| h.status), Some(NodeStatus::Dead));
    let by_type: BTreeMap<&str, usize> = state.nodes.iter().fold(BTreeMap::new(), |mut m, n| {
        *m.entry(n.status.as_str()).or_default() += 1;
        m
    });
    eprintln!("nodes by status at the end: {by_type:?}; total {:?}", t0.elapsed());
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}
