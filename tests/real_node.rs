//! The real node of `e2e/cluster up --real-node`: real containers on `real-node-0` (kubelet,
//! containerd, CNI bridge, kube-proxy, CoreDNS, images pulled from the local registry), and the
//! network rule "nothing leaves the machine" as seen from inside a pod.
//!
//! Starts its own control plane with the real node (one real node per machine: it fails with a
//! clear message if another one runs) and takes it down at the end.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct RealNodeCluster {
    dir: PathBuf,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
}

impl RealNodeCluster {
    fn up() -> Self {
        let dir = std::env::temp_dir().join(format!("ray-operator-real-node-{}", std::process::id()));
        let t = Instant::now();
        let out = Command::new(repo().join("e2e/cluster"))
            .args(["up", "--real-node"])
            .env("CP_DIR", &dir)
            .env("CP_OWNER_PID", std::process::id().to_string())
            // This test needs only the harness's own busybox fixture, not the Ray/operator images.
            .env("CP_REAL_NODE_IMAGES", "0")
            .stderr(Stdio::inherit())
            .output()
            .expect("run e2e/cluster up --real-node");
        assert!(out.status.success(), "e2e/cluster up --real-node failed; its log is above");
        eprintln!("real_node: up --real-node took {:.1} s", t.elapsed().as_secs_f64());
        let text = String::from_utf8_lossy(&out.stdout);
        let bin = text
            .lines()
            .find_map(|l| l.strip_prefix("export PATH="))
            .and_then(|v| v.split(':').next())
            .map(PathBuf::from)
            .expect("export PATH line");
        let kubeconfig = text
            .lines()
            .find_map(|l| l.strip_prefix("export KUBECONFIG="))
            .map(PathBuf::from)
            .expect("export KUBECONFIG line");
        Self { dir, kubeconfig, kubectl: bin.join("kubectl") }
    }

    fn kubectl(&self, args: &[&str]) -> (bool, String) {
        let out =
            Command::new(&self.kubectl).env("KUBECONFIG", &self.kubeconfig).args(args).output().expect("run kubectl");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    fn kubectl_ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.kubectl(args);
        assert!(ok, "kubectl {args:?} failed: {text}");
        text
    }

    fn apply(&self, yaml: &str) {
        use std::io::Write;
        let mut child = Command::new(&self.kubectl)
            .env("KUBECONFIG", &self.kubeconfig)
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl apply");
        child.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "kubectl apply failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `kubectl exec` in a pod: (exit status ok, stdout+stderr).
    fn exec(&self, ns: &str, pod: &str, cmd: &[&str]) -> (bool, String) {
        let mut args = vec!["-n", ns, "exec", pod, "--"];
        args.extend_from_slice(cmd);
        self.kubectl(&args)
    }

    fn images(&self) -> Vec<(String, String)> {
        let out = Command::new(repo().join("e2e/cluster"))
            .arg("images")
            .env("CP_DIR", &self.dir)
            .output()
            .expect("run e2e/cluster images");
        assert!(out.status.success(), "e2e/cluster images failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('=').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect()
    }
}

impl Drop for RealNodeCluster {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("e2e/cluster")).arg("down").env("CP_DIR", &self.dir).status();
    }
}

fn wait_for(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("run sh");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn pods_run_on_the_real_node_and_reach_only_the_cluster() {
    let cluster = RealNodeCluster::up();
    let node = cluster.kubectl_ok(&["get", "node", "real-node-0", "-o", "wide", "--no-headers"]);
    assert!(node.contains(" Ready ") && node.contains("containerd://"), "node: {node}");
    assert!(node.contains("10.88.0.1"), "node InternalIP should be the bridge address: {node}");
    let (_, nodes) = cluster.kubectl(&["get", "nodes", "--no-headers", "-o", "name"]);
    assert_eq!(nodes.trim(), "node/real-node-0", "exactly one node, no kwok nodes");

    let images = cluster.images();
    let busybox = &images.iter().find(|(n, _)| n == "busybox").expect("busybox image").1;

    let ns = "real-node-test";
    // imagePullPolicy Always: every start pulls through containerd's mirror (the local registry).
    cluster.apply(&format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {ns}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: {ns}, labels: {{app: web}}}}
spec:
  nodeSelector: {{ray-operator.test/node: real}}
  terminationGracePeriodSeconds: 1
  containers:
  - name: httpd
    image: {busybox}
    imagePullPolicy: Always
    command: [sh, -c, 'mkdir -p /www && echo hello-from-web > /www/index.html && exec httpd -f -p 8080 -h /www']
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {ns}}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {ns}}}
spec:
  nodeSelector: {{ray-operator.test/node: real}}
  terminationGracePeriodSeconds: 1
  containers:
  - name: sh
    image: {busybox}
    imagePullPolicy: Always
    command: [sh, -c, 'trap "exit 0" TERM; while :; do sleep 1; done']
"#
    ));
    let t = Instant::now();
    for pod in ["web", "client"] {
        wait_for(Duration::from_secs(120), &format!("pod {pod} Running"), || {
            let (_, phase) = cluster.kubectl(&["-n", ns, "get", "pod", pod, "-o", "jsonpath={.status.phase}"]);
            phase == "Running"
        });
    }
    eprintln!("real_node: both pods Running {:.1} s after apply", t.elapsed().as_secs_f64());
    let pod_ip = cluster.kubectl_ok(&["-n", ns, "get", "pod", "web", "-o", "jsonpath={.status.podIP}"]);
    assert!(pod_ip.starts_with("10.88."), "pod IP {pod_ip}");
    let cluster_ip = cluster.kubectl_ok(&["-n", ns, "get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"]);
    assert!(cluster_ip.starts_with("10.96."), "ClusterIP {cluster_ip}");

    // No default route: only the pod subnet (connected) and the Service range.
    let (ok, routes) = cluster.exec(ns, "client", &["ip", "route"]);
    assert!(ok, "ip route: {routes}");
    assert!(!routes.contains("default"), "pod has a default route: {routes}");
    assert!(routes.contains("10.96.0.0/16 via 10.88.0.1"), "no route to Services: {routes}");
    eprintln!("real_node: routes in the pod:\n{routes}");

    // Busybox's wget crashes in this static build, so HTTP goes through `nc`.
    let http_get = |host: &str, port: u16, path: &str| {
        cluster.exec(
            ns,
            "client",
            &["sh", "-c", &format!("printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {host} {port}")],
        )
    };
    // The `kubernetes` Service answers (kube-proxy's DNAT, then the relay to the apiserver on
    // 127.0.0.1): a plain HTTP request gets Go's TLS server's own 400 answer, by IP and by name.
    for host in ["10.96.0.1", "kubernetes.default.svc"] {
        let (ok, out) = http_get(host, 443, "/readyz");
        assert!(ok && out.contains("Client sent an HTTP request to an HTTPS server"), "{host}:443 from a pod: {out}");
    }

    // Cluster DNS: Service names resolve through CoreDNS ...
    for (name, want) in [
        (format!("web.{ns}.svc.cluster.local"), cluster_ip.as_str()),
        ("kubernetes.default.svc.cluster.local".to_string(), "10.96.0.1"),
    ] {
        let (ok, out) = cluster.exec(ns, "client", &["nslookup", &name]);
        assert!(ok && out.contains(want), "nslookup {name} should give {want}: {out}");
    }
    let resolv = cluster.exec(ns, "client", &["cat", "/etc/resolv.conf"]).1;
    assert!(
        resolv.contains("nameserver 10.88.0.1") && resolv.contains(&format!("search {ns}.svc.cluster.local")),
        "resolv.conf: {resolv}"
    );
    // ... and nothing else does: CoreDNS has no forward, so a name outside the cluster is REFUSED.
    let (ok, out) = cluster.exec(ns, "client", &["nslookup", "example.com"]);
    assert!(!ok && out.contains("REFUSED") && !out.contains("Name:"), "example.com resolved in a pod: {out}");

    // A ClusterIP Service reaches the other pod, by address and as `<svc>.<ns>.svc`.
    let t = Instant::now();
    for host in [cluster_ip.clone(), format!("web.{ns}.svc")] {
        let (ok, body) = http_get(&host, 80, "/");
        assert!(ok && body.contains("hello-from-web"), "http://{host}/ from a pod: {body}");
    }
    eprintln!("real_node: Service checks took {:.1} s", t.elapsed().as_secs_f64());

    // Logs and exec through the apiserver -> kubelet path.
    let (ok, logs) = cluster.kubectl(&["-n", ns, "logs", "web"]);
    assert!(ok, "kubectl logs: {logs}");

    // An image the registry does not have fails locally (ErrImagePull), never reaching a registry.
    cluster.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: missing-image, namespace: {ns}}}
spec:
  nodeSelector: {{ray-operator.test/node: real}}
  containers: [{{name: c, image: "quay.io/no-such/image:1"}}]
"#
    ));
    wait_for(Duration::from_secs(60), "missing-image pull failure", || {
        let (_, reason) = cluster.kubectl(&[
            "-n",
            ns,
            "get",
            "pod",
            "missing-image",
            "-o",
            "jsonpath={.status.containerStatuses[0].state.waiting.reason}",
        ]);
        reason == "ErrImagePull" || reason == "ImagePullBackOff"
    });

    let dir = cluster.dir.clone();
    drop(cluster);
    // `down` leaves the machine as it was: no bridge, no routes, no kube-proxy chains, no mounts.
    assert!(!Path::new("/sys/class/net/rayop0").exists(), "bridge rayop0 still there");
    let routes = sh("ip route show 10.96.0.0/16; ip route show 10.88.0.0/16");
    assert!(routes.trim().is_empty(), "routes left: {routes}");
    let chains = sh("iptables -t nat -S | grep -c KUBE-SVC || true");
    assert_eq!(chains.trim(), "0", "kube-proxy Service chains left");
    let mounts = sh(&format!("findmnt -rn -o TARGET | grep -F '{}' || true", dir.display()));
    assert!(mounts.trim().is_empty(), "mounts left: {mounts}");
    assert!(!Path::new("/sys/fs/cgroup/pids/kubepods").exists(), "kubepods cgroup left");
}
