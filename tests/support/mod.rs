//! Test support shared by the integration tests: one real control plane per test run, a fresh
//! namespace per test, helpers to wait for conditions and to run operator replicas as processes.
//!
//! The control plane comes from `RAY_OPERATOR_TEST_KUBECONFIG` (set by `make test`, which starts one
//! for the whole run); without it, the first test to ask starts one with `e2e/cluster up`, and a
//! watchdog stops it when this test process exits. A plain `KUBECONFIG` is deliberately ignored so
//! tests never touch a real cluster by accident.
#![allow(dead_code)]

pub mod ray;
pub mod world;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

pub struct ControlPlane {
    pub kubeconfig: PathBuf,
    /// Directory with kubectl and the other control-plane binaries.
    pub bin: PathBuf,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A control plane of one's own (for tests that must not share the API server, e.g. a cluster-wide
/// operator that would otherwise see every other test's clusters). Stopped on drop.
pub struct PrivateControlPlane {
    pub cp: ControlPlane,
    dir: PathBuf,
}

impl PrivateControlPlane {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A control plane with the machine's one real node (`e2e/cluster up --real-node`: kubelet,
    /// containerd, CNI, kube-proxy, CoreDNS, a local registry with the Ray and operator images).
    pub fn start_real_node() -> Self {
        Self::start_with(&["--real-node"])
    }

    /// `e2e/cluster images` of this control plane: image name (`operator`, `ray`, ...) → reference.
    pub fn images(&self) -> std::collections::BTreeMap<String, String> {
        let out = Command::new(repo().join("e2e/cluster"))
            .arg("images")
            .env("CP_DIR", &self.dir)
            .output()
            .expect("run e2e/cluster images");
        assert!(out.status.success(), "e2e/cluster images: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn start_with(args: &[&str]) -> Self {
        let dir =
            std::env::temp_dir().join(format!("ray-operator-private-cp-{}-{}", std::process::id(), random_suffix()));
        let out = Command::new(repo().join("e2e/cluster"))
            .arg("up")
            .args(args)
            .env("CP_DIR", &dir)
            .env("CP_OWNER_PID", std::process::id().to_string())
            .stderr(Stdio::inherit())
            .output()
            .expect("run e2e/cluster up");
        assert!(out.status.success(), "e2e/cluster up failed");
        let bin = control_plane().bin.clone();
        Self { cp: ControlPlane { kubeconfig: dir.join("admin.kubeconfig"), bin }, dir }
    }

    pub async fn client(&self) -> Client {
        let kc = Kubeconfig::read_from(&self.cp.kubeconfig).expect("read kubeconfig");
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("kubeconfig");
        Client::try_from(config).expect("client")
    }

    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(self.cp.bin.join("kubectl"));
        c.env("KUBECONFIG", &self.cp.kubeconfig);
        c
    }
}

impl Drop for PrivateControlPlane {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("e2e/cluster")).arg("down").env("CP_DIR", &self.dir).status();
    }
}

/// The API server's audit log of the shared control plane (every write, with user agent).
pub fn audit_log() -> PathBuf {
    control_plane().kubeconfig.parent().unwrap().join("audit.log")
}

/// The control plane of this test run.
pub fn control_plane() -> &'static ControlPlane {
    // The outcome, failure included: a failed `up` must fail every test with its message, not
    // be retried by the next test in the same directory.
    static CP: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
    let cp = CP.get_or_init(|| {
        if let (Ok(k), Ok(b)) = (std::env::var("RAY_OPERATOR_TEST_KUBECONFIG"), std::env::var("RAY_OPERATOR_TEST_BIN"))
        {
            return Ok(ControlPlane { kubeconfig: k.into(), bin: b.into() });
        }
        let dir = std::env::temp_dir().join(format!("ray-operator-test-cp-{}", std::process::id()));
        let out = Command::new(repo().join("e2e/cluster"))
            .arg("up")
            .env("CP_DIR", &dir)
            .env("CP_OWNER_PID", std::process::id().to_string())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("run e2e/cluster up: {e}"))?;
        if !out.status.success() {
            return Err(format!("e2e/cluster up failed ({}); its log is above", out.status));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut kubeconfig = None;
        let mut bin = None;
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("export KUBECONFIG=") {
                kubeconfig = Some(PathBuf::from(v));
            }
            if let Some(v) = line.strip_prefix("export PATH=") {
                bin = v.split(':').next().map(PathBuf::from);
            }
        }
        Ok(ControlPlane {
            kubeconfig: kubeconfig.ok_or("no KUBECONFIG from e2e/cluster up")?,
            bin: bin.ok_or("no PATH from e2e/cluster up")?,
        })
    });
    match cp {
        Ok(cp) => cp,
        Err(e) => panic!("no control plane: {e}"),
    }
}

/// An admin client for the test control plane.
pub async fn client() -> Client {
    let cp = control_plane();
    let kc = Kubeconfig::read_from(&cp.kubeconfig).expect("read kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("kubeconfig");
    Client::try_from(config).expect("client")
}

/// A client that authenticates with a bearer token (e.g. a ServiceAccount's), same server and CA.
pub async fn client_with_token(token: &str) -> Client {
    let mut config = admin_config().await;
    config.auth_info = kube::config::AuthInfo { token: Some(token.to_string().into()), ..Default::default() };
    Client::try_from(config).expect("client")
}

pub async fn admin_config() -> Config {
    let cp = control_plane();
    let kc = Kubeconfig::read_from(&cp.kubeconfig).expect("read kubeconfig");
    Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("kubeconfig")
}

/// `kubectl` of the control plane's version, against the test control plane.
pub fn kubectl() -> Command {
    let cp = control_plane();
    let mut c = Command::new(cp.bin.join("kubectl"));
    c.env("KUBECONFIG", &cp.kubeconfig);
    c
}

/// Runs kubectl and returns stdout; panics with stderr on failure.
pub fn kubectl_ok(args: &[&str]) -> String {
    let out = kubectl().args(args).output().expect("run kubectl");
    assert!(out.status.success(), "kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A namespace for one test, deleted (in the background) when dropped.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    /// Creates `<prefix>-<random>` and waits until its `default` ServiceAccount exists (pods are
    /// refused before that by the ServiceAccount admission plugin).
    pub async fn new(client: &Client, prefix: &str) -> Self {
        let name = format!("{prefix}-{}", random_suffix());
        let nss: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        nss.create(&PostParams::default(), &ns).await.expect("create namespace");
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        wait_until(Duration::from_secs(30), "default ServiceAccount", || async {
            sas.get_opt("default").await.ok().flatten().map(|_| ())
        })
        .await;
        Self { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop cannot await; delete from a short-lived thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let c = client().await;
                let nss: Api<Namespace> = Api::all(c);
                let _ = nss.delete(&name, &DeleteParams::background()).await;
            });
        })
        .join();
    }
}

/// The pods matching `selector` that are not being deleted.
pub async fn live_pods(client: &Client, ns: &str, selector: &str) -> Vec<k8s_openapi::api::core::v1::Pod> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
    pods.list(&kube::api::ListParams::default().labels(selector))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

pub fn random_suffix() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let mut x = (nanos as u64) ^ (std::process::id() as u64).rotate_left(32);
    let mut s = String::new();
    for _ in 0..6 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        s.push((b'a' + ((x >> 33) % 26) as u8) as char);
    }
    s
}

/// Polls `f` every 100 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Applies a YAML file (or text) with kubectl in a namespace.
pub fn apply_yaml(namespace: &str, yaml: &str) -> String {
    use std::io::Write;
    let mut child = kubectl()
        .args(["-n", namespace, "apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl apply");
    child.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "kubectl apply failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Same as [`apply_yaml`] but returns the error text instead of panicking.
pub fn try_apply_yaml(namespace: &str, yaml: &str) -> Result<String, String> {
    use std::io::Write;
    let mut child = kubectl()
        .args(["-n", namespace, "apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl apply");
    child.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Installs (or updates) the RayCluster CRD from `crds/` and waits until it is Established.
pub fn install_crd() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let path = repo().join("crds/cluster_crd.yaml");
        kubectl_ok(&["apply", "-f", path.to_str().unwrap()]);
        wait_crd_established(kubectl);
    });
}

/// Waits until the RayCluster CRD is Established. Not `kubectl wait --for=condition=established`:
/// right after the create, while the CRD has no status conditions yet, kubectl 1.36 fails with
/// "accessor error: <nil> is of the type <nil>" instead of waiting (seen once in CI).
pub fn wait_crd_established(kubectl: impl FnMut() -> Command) {
    wait_named_crd_established("rayclusters.cluster.ray.io", kubectl)
}

/// [`wait_crd_established`] for any CRD by name.
pub fn wait_named_crd_established(crd: &str, mut kubectl: impl FnMut() -> Command) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = kubectl()
            .args(["get", "crd", crd])
            .arg("-o=jsonpath={.status.conditions[?(@.type==\"Established\")].status}")
            .output()
            .expect("run kubectl");
        if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "True" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{crd} not Established after 60 s: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An operator replica running as a separate process (the real binary), killed on drop.
pub struct OperatorProcess {
    pub child: Child,
    pub log: PathBuf,
    pub health_port: u16,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl OperatorProcess {
    /// Starts `ray-operator run` with the admin kubeconfig and extra args/env.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_with_kubeconfig(&control_plane().kubeconfig, args, env)
    }

    pub fn start_with_kubeconfig(kubeconfig: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let health_port = free_port();
        let log = std::env::temp_dir().join(format!("ray-operator-{}-{}.log", std::process::id(), random_suffix()));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ray-operator"));
        cmd.arg("run")
            .args(["--health-addr", &format!("127.0.0.1:{health_port}")])
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,ray_operator=debug")
            .env_remove("RAY_OPERATOR_POD_NAMESPACE")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start ray-operator");
        Self { child, log, health_port }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status();
    }

    /// HTTP GET on the health server: (status code, body).
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.health_port)).await.ok()?;
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

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        wait_until(Duration::from_secs(30), "operator /readyz", || async {
            matches!(self.get("/readyz").await, Some((200, _))).then_some(())
        })
        .await;
    }

    /// Waits for the process to exit (after a signal) and returns whether it exited within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- operator log {} ----\n{}", self.log.display(), self.logs());
        }
    }
}
