"""Control-plane CPU per kind of write; run by e2e/write-cost/run (see there).

Usage: measure.py CONTROL_PLANE_DIR N EXAMPLE_CLUSTER_YAML. Talks to the control plane's API server
on loopback with its admin client certificate; 32 connections, each request after the last one's
answer. CPU is read from /proc for each component's processes before a phase and 3 s after it
(the controller manager, scheduler and kwok react to writes after they are answered).
"""
import json, ssl, http.client, threading, time, os, subprocess, sys, yaml, queue
cp = sys.argv[1]; N = int(sys.argv[2]); example = sys.argv[3]
srv = open(f"{cp}/api-port").read().strip()
ctx = ssl.create_default_context(cafile=f"{cp}/pki/ca.crt")
ctx.load_cert_chain(f"{cp}/pki/admin.crt", f"{cp}/pki/admin.key")
base = yaml.safe_load(open(example))
tck = os.sysconf("SC_CLK_TCK")
def cpu():
    out = {}
    for name in ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"]:
        s = 0
        for pid in subprocess.run(["pgrep", "-x", name[:15]], capture_output=True, text=True).stdout.split():
            try:
                f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                s += int(f[11]) + int(f[12])
            except Exception: pass
        out[name] = s / tck
    return out
def run(reqs):
    q = queue.Queue()
    for r in reqs: q.put(r)
    codes = {}
    lock = threading.Lock()
    def worker():
        c = http.client.HTTPSConnection("127.0.0.1", int(srv), context=ctx)
        while True:
            try: m, path, body, ct = q.get_nowait()
            except queue.Empty: return
            c.request(m, path, body=json.dumps(body), headers={"Content-Type": ct})
            r = c.getresponse(); r.read()
            with lock: codes[r.status] = codes.get(r.status, 0) + 1
    ts = [threading.Thread(target=worker) for _ in range(32)]
    [t.start() for t in ts]; [t.join() for t in ts]
    return codes
ns = "bench"
rc = "/apis/cluster.ray.io/v1/namespaces/bench/rayclusters"
def phase(name, reqs):
    c0 = cpu(); t0 = time.time(); codes = run(reqs); dt = time.time() - t0
    time.sleep(3); c1 = cpu()
    d = {k: c1[k] - c0[k] for k in c0}
    tot = sum(d.values())
    print(f"{name:28s} {len(reqs)} reqs in {dt:6.1f}s codes {codes}; control-plane CPU {tot:6.1f}s = {1000*tot/len(reqs):5.2f} ms/req; " + " ".join(f"{k}={v:.1f}" for k, v in d.items()), flush=True)
def body(i):
    b = json.loads(json.dumps(base)); b["metadata"] = {"name": f"rc-{i:05d}"}; return b
phase("RayCluster create", [("POST", rc, body(i), "application/json") for i in range(N)])
now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
def status(i, phase_, gen=1):
    return {"status": {"phase": phase_, "observedGeneration": gen, "headServiceName": f"rc-{i:05d}-ray-head",
            "conditions": [{"type": "Ready", "status": "False", "reason": "Reconciling", "message": "pods starting", "lastTransitionTime": now}]}}
phase("status patch Updating", [("PATCH", f"{rc}/rc-{i:05d}/status", status(i, "Updating"), "application/merge-patch+json") for i in range(N)])
def event(i):
    return {"metadata": {"generateName": f"rc-{i:05d}."}, "involvedObject": {"apiVersion": "cluster.ray.io/v1", "kind": "RayCluster", "namespace": ns, "name": f"rc-{i:05d}"},
            "reason": "Created", "message": "Created head pod rc-x; created 2 worker pods; created head service", "type": "Normal",
            "firstTimestamp": now, "lastTimestamp": now, "count": 1, "source": {"component": "ray-operator"}, "reportingComponent": "ray-operator", "reportingInstance": "x"}
phase("Event create", [("POST", f"/api/v1/namespaces/{ns}/events", event(i), "application/json") for i in range(N)])
phase("status patch Running", [("PATCH", f"{rc}/rc-{i:05d}/status", status(i, "Running"), "application/merge-patch+json") for i in range(N)])
def svc(i):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"rc-{i:05d}-ray-head"}, "spec": {"selector": {"ray-cluster-name": f"rc-{i:05d}", "ray-node-type": "head"}, "ports": [{"name": "gcs", "port": 6379}]}}
phase("Service create", [("POST", f"/api/v1/namespaces/{ns}/services", svc(i), "application/json") for i in range(N)])
def pod(i):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": f"rc-{i:05d}-w-", "labels": {"ray-cluster-name": f"rc-{i:05d}"}}, "spec": {"containers": [{"name": "ray", "image": "ray:1", "resources": {"requests": {"cpu": "1", "memory": "512Mi"}}}]}}
phase("Pod create (+schedule, kwok)", [("POST", f"/api/v1/namespaces/{ns}/pods", pod(i), "application/json") for i in range(N)])

# What an operator's watch adds: the same writes again with one watch open on them (as the
# operator's watches of pods and RayClusters are), read and thrown away. A watch from the list's
# resourceVersion sends only what changes from then on.
def watch(path):
    c = http.client.HTTPSConnection("127.0.0.1", int(srv), context=ctx)
    c.request("GET", f"{path}?limit=1"); r = c.getresponse(); rv = json.loads(r.read())["metadata"]["resourceVersion"]
    c.request("GET", f"{path}?watch=1&allowWatchBookmarks=true&resourceVersion={rv}")
    r = c.getresponse()
    def drain():
        try:
            while r.read(65536): pass
        except Exception: pass
    threading.Thread(target=drain, daemon=True).start()
    return c
w = watch(rc)
phase("status patch, RayClusters watched", [("PATCH", f"{rc}/rc-{i:05d}/status", status(i, "Updating", 2), "application/merge-patch+json") for i in range(N)])
w.close()
# The pods again, watched, then unwatched once more: the store grows with each phase, and the
# bracket shows what that alone costs.
def pod2(i, tag):
    b = pod(i); b["metadata"]["generateName"] = f"rc-{i:05d}-{tag}-"; return b
w = watch(f"/api/v1/namespaces/{ns}/pods")
phase("Pod create, pods watched", [("POST", f"/api/v1/namespaces/{ns}/pods", pod2(i, "v"), "application/json") for i in range(N)])
w.close()
phase("Pod create, unwatched again", [("POST", f"/api/v1/namespaces/{ns}/pods", pod2(i, "u"), "application/json") for i in range(N)])
