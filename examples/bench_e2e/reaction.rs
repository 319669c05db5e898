//! Benchmark: Reaction. Split out of the driver by benchmark; shared helpers live in `main.rs`.

use super::*;

/// A Python driver that asks for what the head cannot give (it has 1 CPU): two 4-CPU tasks.
const RAY_DRIVER: &str = include_str!("../../tests/fixtures/ray/demand_driver.py");

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
        // The clusters point the operator at the bench's head with the annotation, which is off by default.
        let mut flags: Vec<String> = vec!["--namespaces".into(), ns.into(), "--allow-gcs-address-annotation".into()];
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

pub(super) async fn reaction(opts: &Opts) -> Result<Section> {
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
