//! Churn soak (issue 14, item 6): three replicas, at least 50 leader changes by SIGTERM, SIGKILL
//! and SIGSTOP/SIGCONT at random moments (seeded; the seed is printed, `CHURN_SEED` replays one),
//! while clusters are created, scaled, updated and deleted. At the end every cluster has exactly
//! its desired pods; the audit log shows exactly as many pod creates per cluster as its changes
//! needed (a pod created twice for one decision would be one more); and no cluster write arrived
//! from a replica after another had taken the Lease from it.
//!
//! Each cluster lives in a namespace of its own, so the audit log (which names no pod for a
//! generateName create) attributes every pod create to its cluster.

mod replicas;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use ray_operator::api::{Phase, RayCluster};
use replicas::*;
use support::*;

/// xorshift64*: reproducible from the printed seed, no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}

const CLUSTER: &str = "soak";

/// The cluster is exactly as asked: Running for its generation, one head and `workers` workers,
/// every live pod on `image`, nothing terminating.
async fn settled(client: &Client, ns: &str, workers: u32, image: &str) -> Option<()> {
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), ns);
    let rc = rcs.get(CLUSTER).await.ok()?;
    let s = rc.status?;
    (s.phase == Some(Phase::Running) && s.observed_generation == rc.metadata.generation).then_some(())?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let all = pods.list(&ListParams::default().labels(&format!("ray-cluster-name={CLUSTER}"))).await.ok()?.items;
    if all.iter().any(|p| p.metadata.deletion_timestamp.is_some()) {
        return None;
    }
    let on_image =
        |p: &Pod| p.spec.as_ref().is_some_and(|s| s.containers.iter().all(|c| c.image.as_deref() == Some(image)));
    let heads = all.iter().filter(|p| p.labels().get("ray-node-type").map(String::as_str) == Some("head")).count();
    (heads == 1 && all.len() == workers as usize + 1 && all.iter().all(on_image)).then_some(())
}

#[derive(Default, Debug)]
struct Work {
    /// Pod creates the cluster's changes needed (1 + workers per create and per image update,
    /// the difference per scale-up).
    creates: u32,
    created: u32,
    scaled: u32,
    updated: u32,
    deleted: u32,
    /// Where it ended.
    workers: u32,
    image: String,
}

/// One cluster's life, change after change until `stop`: create, scale up, update the image,
/// scale down, delete, create again. Each change waits until the cluster has settled, so the pod
/// creates it needs are known exactly.
async fn drive(client: Client, ns: String, seed: u64, stop: Arc<AtomicBool>) -> Work {
    let mut rng = Rng(seed | 1);
    let mut work = Work::default();
    let mut workers = 0u32;
    let mut image = "ray:1".to_string();
    let mut exists = false;
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), &ns);
    let mut step = 0u32;
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(rng.millis(100, 1500)).await;
        if !exists {
            workers = 1 + rng.below(3) as u32;
            image = "ray:1".into();
            put_cluster(&client, &ns, CLUSTER, workers, &image).await;
            work.creates += 1 + workers;
            work.created += 1;
            exists = true;
        } else {
            match step % 4 {
                0 => {
                    let w = workers + 1 + rng.below(3) as u32;
                    put_cluster(&client, &ns, CLUSTER, w, &image).await;
                    work.creates += w - workers;
                    workers = w;
                    work.scaled += 1;
                }
                1 => {
                    image = if image == "ray:1" { "ray:2".into() } else { "ray:1".into() };
                    put_cluster(&client, &ns, CLUSTER, workers, &image).await;
                    work.creates += 1 + workers;
                    work.updated += 1;
                }
                2 => {
                    let w = 1 + rng.below(u64::from(workers)) as u32;
                    put_cluster(&client, &ns, CLUSTER, w, &image).await;
                    workers = w;
                    work.scaled += 1;
                }
                _ => {
                    rcs.delete(CLUSTER, &DeleteParams::background()).await.unwrap();
                    work.deleted += 1;
                    exists = false;
                    wait_until(Duration::from_secs(60), &format!("{ns}: cluster and pods gone"), || async {
                        let gone = rcs.get_opt(CLUSTER).await.ok()?.is_none();
                        let pods = pod_list(&client, &ns).await;
                        (gone && pods.is_empty()).then_some(())
                    })
                    .await;
                }
            }
            step += 1;
        }
        if exists {
            let what = format!("{ns}: settled at 1 head + {workers} workers on {image}");
            wait_until(Duration::from_secs(90), &what, || settled(&client, &ns, workers, &image)).await;
        }
    }
    if !exists {
        put_cluster(&client, &ns, CLUSTER, 2, "ray:1").await;
        work.creates += 3;
        work.created += 1;
        workers = 2;
        image = "ray:1".into();
    }
    wait_until(Duration::from_secs(90), &format!("{ns}: final settle"), || settled(&client, &ns, workers, &image))
        .await;
    work.workers = workers;
    work.image = image;
    work
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn churn_soak_three_replicas_fifty_leader_changes() {
    install_crd();
    let client = client().await;
    let seed: u64 = std::env::var("CHURN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64);
    eprintln!("churn: seed {seed} (CHURN_SEED={seed} replays the same choices)");
    let mut rng = Rng(seed | 1);
    let op_ns = TestNamespace::new(&client, "churn-op").await;
    let mut cluster_nss = Vec::new();
    for _ in 0..4 {
        cluster_nss.push(TestNamespace::new(&client, "churn-c").await);
    }
    let scope = cluster_nss.iter().map(|n| n.name.clone()).collect::<Vec<_>>().join(",");
    let kc = control_plane().kubeconfig.clone();
    // A short Lease so that 50 hand-overs fit in CI's time; the fence margin is then 1 s.
    let args = ["--namespaces", &scope, "--lease-ttl", "2", "--lease-renew", "0.5", "--no-autoscaler"];
    let since = SystemTime::now();
    let mut next = 0;
    // Every replica's log, kept after it exits: a mismatch prints one timeline from all of them.
    let mut logs: Vec<(String, std::path::PathBuf)> = Vec::new();
    let spawn_replica = |next: &mut u32, logs: &mut Vec<(String, std::path::PathBuf)>| {
        let name = format!("op-{next}");
        *next += 1;
        let op = replica_with(&kc, &op_ns.name, &name, &args);
        logs.push((name.clone(), op.log.clone()));
        (name, op)
    };
    let mut ops = BTreeMap::new();
    for _ in 0..3 {
        let (n, op) = spawn_replica(&mut next, &mut logs);
        ops.insert(n, op);
    }
    for op in ops.values() {
        op.wait_ready().await;
    }
    let first = wait_leader(&client, &op_ns.name, None, Duration::from_secs(20)).await;
    let transitions = |l: Option<k8s_openapi::api::coordination::v1::Lease>| {
        l.and_then(|l| l.spec?.lease_transitions).unwrap_or(0) as u32
    };
    let t_start = transitions(lease(&client, &op_ns.name).await);

    // Every pod that ever exists in a cluster namespace, by UID: the count of pods created,
    // independent of the audit log (whose response code for a create whose client was killed
    // mid-request need not be 201).
    let seen: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>> = Arc::default();
    let recorders: Vec<_> = cluster_nss
        .iter()
        .map(|ns| {
            let (pods, seen, ns) = (Api::<Pod>::namespaced(client.clone(), &ns.name), seen.clone(), ns.name.clone());
            tokio::spawn(async move {
                let mut s = watcher::watcher(pods, watcher::Config::default().labels("ray-cluster-name")).boxed();
                while let Some(ev) = s.next().await {
                    if let Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) = ev {
                        seen.lock().unwrap().entry(ns.clone()).or_default().insert(p.uid().unwrap_or_default());
                    }
                }
            })
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let drivers: Vec<_> = cluster_nss
        .iter()
        .map(|ns| tokio::spawn(drive(client.clone(), ns.name.clone(), rng.next(), stop.clone())))
        .collect();

    // The churn: the current leader is terminated, killed or frozen at a random moment.
    let started = Instant::now();
    let (mut terms, mut kills, mut stops) = (0u32, 0u32, 0u32);
    let changes = AtomicU32::new(0);
    let mut leader = first;
    while changes.load(Ordering::SeqCst) < 50 && started.elapsed() < Duration::from_secs(200) {
        tokio::time::sleep(rng.millis(200, 1500)).await;
        let op = ops.get_mut(&leader).unwrap();
        match rng.below(3) {
            0 => {
                op.signal("TERM");
                terms += 1;
                assert!(op.wait_exit(Duration::from_secs(10)), "{leader} exits after SIGTERM");
                ops.remove(&leader);
                let (n, r) = spawn_replica(&mut next, &mut logs);
                ops.insert(n, r);
            }
            1 => {
                op.signal("KILL");
                kills += 1;
                assert!(op.wait_exit(Duration::from_secs(5)));
                ops.remove(&leader);
                let (n, r) = spawn_replica(&mut next, &mut logs);
                ops.insert(n, r);
            }
            _ => {
                op.signal("STOP");
                stops += 1;
                wait_leader(&client, &op_ns.name, Some(&leader), Duration::from_secs(30)).await;
                tokio::time::sleep(rng.millis(0, 1000)).await;
                ops[&leader].signal("CONT");
            }
        }
        leader = wait_leader(&client, &op_ns.name, Some(&leader), Duration::from_secs(30)).await;
        changes.store(transitions(lease(&client, &op_ns.name).await) - t_start, Ordering::SeqCst);
    }
    let churn_time = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let mut works = Vec::new();
    for d in drivers {
        works.push(d.await.expect("a cluster driver failed (see its panic above)"));
    }
    let changes = changes.load(Ordering::SeqCst);

    // Exactly the desired pods, and it stays so.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for r in recorders {
        r.abort();
    }
    for (ns, w) in cluster_nss.iter().zip(&works) {
        assert!(w.created > 0, "{}: the driver ran", ns.name);
        assert!(
            settled(&client, &ns.name, w.workers, &w.image).await.is_some(),
            "{}: still exactly 1 head + {} workers on {} after the hold",
            ns.name,
            w.workers,
            w.image
        );
    }

    // The audit log: pod creates per cluster, and writes by fenced replicas.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log: Vec<Audited> = audit(&audit_log()).into_iter().filter(|a| a.at >= since).collect();
    let names: Vec<&str> = cluster_nss.iter().map(|n| n.name.as_str()).collect();
    let writes = cluster_writes(&log, &names);
    let leases = lease_writes(&log, &op_ns.name);
    let fenced = fenced_writes(&writes, &leases);
    let mut report = Vec::new();
    let mut mismatched = Vec::new();
    for (ns, w) in names.iter().zip(&works) {
        let audited: Vec<u16> = writes
            .iter()
            .filter(|a| a.namespace == *ns && a.resource == "pods" && a.verb == "create")
            .map(|a| a.code)
            .collect();
        let ok = audited.iter().filter(|c| **c == 201).count();
        let other: Vec<&u16> = audited.iter().filter(|c| **c != 201).collect();
        let creates = seen.lock().unwrap().get(*ns).map_or(0, |s| s.len()) as u32;
        report.push(format!(
            "{ns}: {} creates, {} scales, {} updates, {} deletes; pods created {creates} (needed {}); audited pod creates: {ok} x 201, others {other:?}",
            w.created, w.scaled, w.updated, w.deleted, w.creates
        ));
        if creates != w.creates {
            mismatched.push(format!("{ns}: {creates} pod creates, needed {}", w.creates));
            eprintln!("{}", timeline(ns, &log, &op_ns.name, &logs, since));
        }
    }
    // A create the API server answers later than the fence margin can land after the next leader
    // has listed; how slow the slowest was says how close this run came to that.
    let slowest = writes
        .iter()
        .filter(|a| a.verb == "create" && a.resource == "pods")
        .filter_map(|a| a.answered.duration_since(a.at).ok())
        .max()
        .unwrap_or_default();
    eprintln!(
        "churn: {changes} leader changes in {churn_time:?} ({terms} SIGTERM, {kills} SIGKILL, {stops} SIGSTOP/SIGCONT; {} replicas started); {} cluster writes, {} Lease writes, {} writes by a fenced replica; slowest pod create answered in {slowest:?}\n  {}",
        next,
        writes.len(),
        leases.len(),
        fenced.len(),
        report.join("\n  ")
    );
    assert!(changes >= 50, "only {changes} leader changes in {churn_time:?}");
    assert!(fenced.is_empty(), "writes by a replica that no longer held the Lease: {fenced:#?}");
    assert!(mismatched.is_empty(), "pods created more (or fewer) times than the changes needed: {mismatched:#?}");
}

/// One namespace's story for a failure: its pod writes and the Lease's holders from the audit
/// log, and every replica's log lines about it, in time order (seconds since the test began).
fn timeline(
    ns: &str,
    log: &[Audited],
    lease_ns: &str,
    logs: &[(String, std::path::PathBuf)],
    since: SystemTime,
) -> String {
    let secs = |t: SystemTime| t.duration_since(since).map_or(0.0, |d| d.as_secs_f64());
    let mut lines: Vec<(f64, String)> = Vec::new();
    let mut holder = None;
    for a in log {
        if a.namespace == ns && (a.resource == "pods" || a.resource == "rayclusters") {
            lines.push((
                secs(a.at),
                format!(
                    "audit  {:<8} {} {} {} {} (answered after {:.3}s)",
                    a.replica.as_deref().unwrap_or("test"),
                    a.verb,
                    a.resource,
                    a.code,
                    a.name,
                    a.answered.duration_since(a.at).map_or(0.0, |d| d.as_secs_f64())
                ),
            ));
        } else if a.namespace == lease_ns
            && a.resource == "leases"
            && a.name == LEASE
            && (200..300).contains(&a.code)
            && holder != a.replica
        {
            holder = a.replica.clone();
            lines.push((secs(a.at), format!("lease  {:<8} now writes the Lease", a.replica.as_deref().unwrap_or("-"))));
        }
    }
    for (replica, path) in logs {
        for l in std::fs::read_to_string(path).unwrap_or_default().lines().filter(|l| l.contains(ns)) {
            let at = l
                .rsplit_once(" ts=")
                .and_then(|(_, ts)| ts.trim().parse::<k8s_openapi::jiff::Timestamp>().ok())
                .map_or(0.0, |t| secs(SystemTime::from(t)));
            lines.push((at, format!("log    {replica:<8} {l}")));
        }
    }
    lines.sort_by(|a, b| a.0.total_cmp(&b.0));
    let body: Vec<String> = lines.into_iter().map(|(t, l)| format!("  {t:8.3}s {l}")).collect();
    format!("---- timeline of {ns} ----\n{}", body.join("\n"))
}
