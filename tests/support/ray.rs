//! Stand-in Ray processes for the integration tests: real `ray start` from the cached venv
//! (`e2e/ray-venv`), on loopback, each in its own process group, killed when dropped. Always with
//! usage stats off.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ray_operator::ray::{ClusterState, GcsClient};

/// Two 4-CPU tasks the 1-CPU head cannot run: demand for the autoscaler.
const DRIVER: &str = include_str!("../fixtures/ray/demand_driver.py");

pub fn ray_bin() -> PathBuf {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/ray-venv"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run e2e/ray-venv");
    assert!(out.status.success(), "e2e/ray-venv failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

pub fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<_> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

pub fn kill_group(pgid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, "--", &format!("-{pgid}")]).stderr(Stdio::null()).status();
}

/// Ray processes started by this test (each `ray start` in its own process group); all killed on drop.
pub struct RayProcs {
    bin: PathBuf,
    pub dir: tempfile::TempDir,
    groups: Vec<u32>,
    driver: Option<Child>,
    /// Extra environment of every Ray process (e.g. faster GCS health checks).
    pub env: Vec<(String, String)>,
}

impl RayProcs {
    pub fn new(bin: &Path) -> Self {
        // Short path: Ray puts Unix sockets under it (108-byte limit).
        let dir = tempfile::Builder::new().prefix("raya").tempdir_in("/tmp").unwrap();
        Self { bin: bin.to_path_buf(), dir, groups: vec![], driver: None, env: vec![] }
    }

    /// `ray start` with the env the operator gives Ray pods; returns its process group.
    pub fn ray_start(&mut self, name: &str, args: &[String], instance: &str, node_type: &str) -> u32 {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let ports = free_ports(7);
        let mut cmd = Command::new(self.bin.join("ray"));
        cmd.arg("start")
            .args(args)
            .args(["--node-ip-address=127.0.0.1", "--disable-usage-stats", "--object-store-memory=100000000"])
            .arg(format!("--node-manager-port={}", ports[0]))
            .arg(format!("--object-manager-port={}", ports[1]))
            .arg(format!("--dashboard-agent-listen-port={}", ports[2]))
            .arg(format!("--dashboard-agent-grpc-port={}", ports[3]))
            .arg(format!("--runtime-env-agent-port={}", ports[4]))
            .arg(format!("--metrics-export-port={}", ports[5]))
            .env("RAY_enable_autoscaler_v2", "1")
            .env("RAY_CLOUD_INSTANCE_ID", instance)
            .env("RAY_NODE_TYPE_NAME", node_type)
            .env("RAY_USAGE_STATS_ENABLED", "0")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("RAY_ADDRESS");
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.stdout(log.try_clone().unwrap()).stderr(log).spawn().expect("ray start");
        let pgid = child.id();
        self.groups.push(pgid);
        let status = child.wait().unwrap();
        assert!(status.success(), "ray start {name} failed:\n{}", self.log(name));
        pgid
    }

    pub fn start_head(&mut self, gcs_port: u16) -> u32 {
        let temp = self.dir.path().join("t");
        let args = vec![
            "--head".into(),
            "--no-monitor".into(),
            "--num-cpus=1".into(),
            "--include-dashboard=false".into(),
            format!("--port={gcs_port}"),
            format!("--dashboard-port={}", free_ports(1)[0]),
            format!("--temp-dir={}", temp.display()),
        ];
        self.ray_start("head", &args, "head", "head")
    }

    pub fn start_worker(&mut self, gcs_port: u16, instance: &str) -> u32 {
        let args = vec![format!("--address=127.0.0.1:{gcs_port}"), "--num-cpus=4".into()];
        self.ray_start(&format!("worker-{instance}"), &args, instance, "cpu4")
    }

    pub fn start_driver(&mut self, gcs_port: u16) {
        let script = self.dir.path().join("driver.py");
        std::fs::write(&script, DRIVER).unwrap();
        let log = std::fs::File::create(self.dir.path().join("driver.log")).unwrap();
        let mut cmd = Command::new(self.bin.join("python"));
        cmd.arg(&script).arg(format!("127.0.0.1:{gcs_port}")).env("RAY_USAGE_STATS_ENABLED", "0");
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        self.driver = Some(cmd.stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap());
    }

    pub fn stop_driver(&mut self) {
        if let Some(mut d) = self.driver.take() {
            kill_group(d.id(), "-KILL");
            let _ = d.wait();
        }
    }

    pub fn kill(&mut self, pgid: u32) {
        kill_group(pgid, "-KILL");
        self.groups.retain(|g| *g != pgid);
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for RayProcs {
    fn drop(&mut self) {
        self.stop_driver();
        for g in std::mem::take(&mut self.groups) {
            kill_group(g, "-KILL");
        }
        // Raylets and GCS may have forked into other groups under the temp dir; stop stragglers.
        let _ = Command::new("pkill").args(["-9", "-f", &self.dir.path().display().to_string()]).status();
    }
}

/// The GCS's cluster resource state (nodes, demand), if it answers.
pub async fn state(gcs: &str) -> Option<ClusterState> {
    let mut c = GcsClient::connect(gcs, Duration::from_secs(2)).await.ok()?;
    c.get_cluster_resource_state().await.ok()
}
