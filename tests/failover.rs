//! Failover onto a stale cache (issue 14, item 4): a standby that was frozen while the leader
//! worked must not act on its old view when it wins the Lease, and with several replicas the API
//! server sees cluster writes from one replica at a time.

mod replicas;
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use replicas::*;
use support::*;

/// SIGSTOP the standby → the leader creates a 5-worker cluster → SIGKILL the leader → (the Lease
/// expires) → SIGCONT the standby. The standby wins the Lease at once on waking, while its watch
/// streams still hold (or have lost) what happened while it was frozen: it must list afresh
/// before acting, so every trial ends with exactly 1 head + 5 workers.
#[tokio::test]
async fn a_woken_standby_acts_on_a_fresh_view_20_times() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "fo-stale").await;
    let kc = control_plane().kubeconfig.clone();
    let args = ["--namespaces", &ns.name, "--lease-ttl", "2", "--lease-renew", "0.5"];
    let mut next = 0;
    let start = |next: &mut u32| {
        let name = format!("op-{next}");
        *next += 1;
        (name.clone(), replica_with(&kc, &ns.name, &name, &args))
    };
    let (n0, r0) = start(&mut next);
    r0.wait_ready().await;
    let leader_name = wait_leader(&client, &ns.name, None, Duration::from_secs(20)).await;
    assert_eq!(leader_name, n0);
    let (n1, r1) = start(&mut next);
    r1.wait_ready().await;
    let (mut leader, mut standby) = ((n0, r0), (n1, r1));
    let mut expected = BTreeMap::new();
    let mut took = Vec::new();
    for i in 0..20 {
        standby.1.signal("STOP");
        let name = format!("t{i}");
        put_cluster(&client, &ns.name, &name, 5, "ray:1").await;
        expected.insert(name.clone(), 5);
        wait_until(Duration::from_secs(20), &format!("{name}: the leader's 6 pods"), || async {
            (counts(&client, &ns.name, &name).await == (1, 5)).then_some(())
        })
        .await;
        leader.1.signal("KILL");
        wait_lease_expired(&client, &ns.name).await;
        let t0 = Instant::now();
        standby.1.signal("CONT");
        let new = wait_leader(&client, &ns.name, Some(&leader.0), Duration::from_secs(20)).await;
        assert_eq!(new, standby.0, "trial {i}: the woken standby leads");
        took.push(t0.elapsed());
        // The next standby starts now; it must not change anything either.
        let fresh = start(&mut next);
        fresh.1.wait_ready().await;
        assert_exact(&client, &ns.name, &BTreeMap::from([(name.clone(), 5)]), Duration::from_secs(20), Duration::ZERO)
            .await;
        leader = std::mem::replace(&mut standby, fresh);
        // It took a Lease that was not released, so it first waits a fence margin for the dead
        // leader's last writes (see `Fence::settle`), then lists: the line may come a moment later.
        let log = leader.1.log.clone();
        wait_until(Duration::from_secs(10), &format!("trial {i}: the new leader relisted before acting"), || async {
            std::fs::read_to_string(&log).unwrap_or_default().contains("caches listed afresh").then_some(())
        })
        .await;
    }
    // All 20 clusters still exact after a last hold: nothing was created late.
    assert_exact(&client, &ns.name, &expected, Duration::from_secs(30), Duration::from_secs(1)).await;
    took.sort();
    eprintln!(
        "stale standby: 20 trials, exactly 1 head + 5 workers each; SIGCONT -> Lease held p50 {:?}, max {:?}",
        took[took.len() / 2],
        took.last().unwrap()
    );
}

/// A standby silently cut off from the API server (its open connections hear nothing more, as
/// behind a dead NAT entry) while the leader works, then the leader dies. The standby wins the
/// Lease over a new connection while its watch streams are still stalled: it must list afresh
/// (over new connections) and act on what happened while it was cut off. Acting on its stalled
/// view it would not know the cluster created meanwhile, nor the later scale-up.
#[tokio::test]
async fn a_partitioned_standby_catches_up_before_acting() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "fo-cut").await;
    let kc = control_plane().kubeconfig.clone();
    let args = ["--namespaces", &ns.name, "--lease-ttl", "2", "--lease-renew", "0.5"];
    let a = replica_with(&kc, &ns.name, "op-a", &args);
    a.wait_ready().await;
    assert_eq!(wait_leader(&client, &ns.name, None, Duration::from_secs(20)).await, "op-a");
    let b = replica_with(&kc, &ns.name, "op-b", &args);
    b.wait_ready().await;
    // Let its watches settle on their connections.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cut = Partition::cut(b.pid(), api_port(&kc));
    assert!(cut.connections() >= 3, "op-b's watches have connections to cut ({})", cut.connections());
    put_cluster(&client, &ns.name, "cut", 5, "ray:1").await;
    wait_until(Duration::from_secs(20), "op-a creates cut's 6 pods", || async {
        (counts(&client, &ns.name, "cut").await == (1, 5)).then_some(())
    })
    .await;
    a.signal("KILL");
    let t0 = Instant::now();
    wait_until(Duration::from_secs(30), "op-b takes the Lease", || async {
        (holder(&client, &ns.name).await.as_deref() == Some("op-b")).then_some(())
    })
    .await;
    eprintln!("partitioned standby: SIGKILL of the leader -> op-b holds the Lease in {:?}", t0.elapsed());
    // Work after the hand-over: the cut-off standby must see it through fresh watches.
    put_cluster(&client, &ns.name, "cut", 6, "ray:1").await;
    put_cluster(&client, &ns.name, "after", 1, "ray:1").await;
    assert_exact(
        &client,
        &ns.name,
        &BTreeMap::from([("cut".to_string(), 6), ("after".to_string(), 1)]),
        Duration::from_secs(20),
        Duration::from_secs(1),
    )
    .await;
    assert!(b.logs().contains("caches listed afresh"), "op-b relisted before acting");
    drop(cut);
}

/// Three replicas; the leader is SIGKILLed three times while clusters are created and scaled. In
/// the audit log, the cluster writes (pods, Services, RayClusters) come from one replica at a time:
/// each run of writes by one replica falls in one of its terms as the Lease holder, in the order
/// of the terms, and no write arrives from a replica after another took the Lease from it.
#[tokio::test]
async fn three_replicas_write_one_at_a_time() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "fo-three").await;
    let kc = control_plane().kubeconfig.clone();
    let args = ["--namespaces", &ns.name, "--lease-ttl", "2", "--lease-renew", "0.5"];
    let since = SystemTime::now();
    let mut ops = BTreeMap::new();
    let mut next = 0;
    for _ in 0..3 {
        let name = format!("op-{next}");
        next += 1;
        replica_pod(&client, &ns.name, &name).await;
        ops.insert(name.clone(), replica_with(&kc, &ns.name, &name, &args));
    }
    for op in ops.values() {
        op.wait_ready().await;
    }
    let mut expected = BTreeMap::new();
    let mut leader = wait_leader(&client, &ns.name, None, Duration::from_secs(20)).await;
    let mut leaders = vec![leader.clone()];
    for round in 0..3 {
        for j in 0..3 {
            let name = format!("r{round}-{j}");
            put_cluster(&client, &ns.name, &name, 2 + j, "ray:1").await;
            expected.insert(name, 2 + j);
        }
        if round > 0 {
            // Scale the previous round's clusters while the hand-over happens.
            for j in 0..3 {
                let name = format!("r{}-{j}", round - 1);
                put_cluster(&client, &ns.name, &name, 4, "ray:1").await;
                expected.insert(name, 4);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut old = ops.remove(&leader).unwrap();
        old.signal("KILL");
        assert!(old.wait_exit(Duration::from_secs(5)));
        let name = format!("op-{next}");
        next += 1;
        replica_pod(&client, &ns.name, &name).await;
        ops.insert(name.clone(), replica_with(&kc, &ns.name, &name, &args));
        leader = wait_leader(&client, &ns.name, Some(&leader), Duration::from_secs(20)).await;
        leaders.push(leader.clone());
    }
    assert_exact(&client, &ns.name, &expected, Duration::from_secs(60), Duration::from_secs(1)).await;

    let log: Vec<Audited> = audit(&audit_log()).into_iter().filter(|a| a.at >= since).collect();
    let writes = cluster_writes(&log, &[&ns.name]);
    let leases = lease_writes(&log, &ns.name);
    let runs = writer_runs(&writes);
    // Standbys racing for the expired Lease: the losers' conditional writes are refused.
    let lost_races = log.iter().filter(|a| a.resource == "leases" && a.namespace == ns.name && a.code == 409).count();
    eprintln!(
        "three replicas, 3 SIGKILLs: {} cluster writes, {} Lease writes ({lost_races} refused with 409); writers in order: {runs:?}; leaders: {leaders:?}",
        writes.len(),
        leases.len()
    );
    assert!(writes.len() > 30, "the audit log shows the cluster writes ({})", writes.len());
    // The Lease's terms (holders in order): each run of writes belongs to one term, in order, so
    // two replicas never took turns writing within one term.
    let terms = writer_runs(&leases);
    let mut t = terms.iter();
    for r in &runs {
        assert!(t.any(|h| h == r), "writers {runs:?} do not follow the Lease's terms {terms:?}");
    }
    let fenced = fenced_writes(&writes, &leases);
    assert!(fenced.is_empty(), "writes by a replica that no longer held the Lease: {fenced:#?}");
}
