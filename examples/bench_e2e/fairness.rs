//! Benchmark: Fairness. Split out of the driver by benchmark; shared helpers live in `main.rs`.

use super::*;

pub(super) async fn fairness(opts: &Opts) -> Result<Section> {
    let (big, reps) = if opts.smoke() { (100u32, 1usize) } else { (500, 5) };
    let cp = Cp::up(opts, "fairness")?;
    let client = cp.client("ray-operator-bench/driver (bench-driver)").await?;
    create_namespace(&client, OPERATOR_NS).await?;
    let op = OpProc::start(opts, &cp, "bench-op", OPERATOR_NS, &opts.args.operator_args)?;
    op.wait_ready().await?;
    op.wait_leader().await?;
    let base = example_cluster(&opts.repo)?;
    let mut idle_lat = Vec::new();
    let mut busy_lat = Vec::new();
    let mut a_at = Vec::new();
    let mut a_total = Vec::new();
    for rep in 0..reps {
        let ns = format!("fair-{rep}");
        create_namespace(&client, &ns).await?;
        let tracker = Tracker::start(&client, &ns).await?;
        let rcs: Api<RayCluster> = Api::namespaced(client.clone(), &ns);
        let a_key = ClusterKey::new(&ns, "a");
        // B lands on A's shard: the worst case (otherwise another shard serves it regardless).
        let b_name = (0..)
            .map(|k| format!("b-{k}"))
            .find(|b| shard_of(&ClusterKey::new(&ns, b), DEFAULT_SHARDS) == shard_of(&a_key, DEFAULT_SHARDS))
            .unwrap();
        let idle_name = format!("{b_name}-idle");

        // Baseline: the same small cluster's head latency while the operator is idle.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t0 = Instant::now();
        rcs.create(&PostParams::default(), &cluster(&base, &idle_name, 2)?).await?;
        let t_idle = tracker
            .wait(Duration::from_secs(30), "idle B head", |s| s.pods_seen_at(1, |p| p.cluster == idle_name && p.head))
            .await?;
        idle_lat.push((t_idle - t0).as_secs_f64());
        tracker
            .wait(Duration::from_secs(60), "idle B pods", |s| (s.cluster_pods(&idle_name) >= 3).then_some(()))
            .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;

        // Load: A scales to `big` workers; B is created as soon as A's scale-up is under way.
        let ta = Instant::now();
        rcs.create(&PostParams::default(), &cluster(&base, "a", big)?).await?;
        tracker.wait(Duration::from_secs(60), "A scaling", |s| (s.cluster_pods("a") >= 2).then_some(())).await?;
        let t0 = Instant::now();
        rcs.create(&PostParams::default(), &cluster(&base, &b_name, 2)?).await?;
        let t_b = tracker
            .wait(Duration::from_secs(120), "B head", |s| s.pods_seen_at(1, |p| p.cluster == b_name && p.head))
            .await?;
        busy_lat.push((t_b - t0).as_secs_f64());
        let a_then = {
            let g = tracker.seen.lock().unwrap();
            g.pods.values().filter(|p| p.cluster == "a" && p.seen <= t_b).count()
        };
        a_at.push(a_then as f64);
        let t_a = tracker
            .wait(Duration::from_secs(600), "A complete", |s| s.pods_seen_at(big as usize + 1, |p| p.cluster == "a"))
            .await?;
        a_total.push((t_a - ta).as_secs_f64());
        log(format!(
            "fairness rep {rep}: B head {:.3} s (idle {:.3} s) with A at {a_then}/{} pods; A done in {:.1} s",
            (t_b - t0).as_secs_f64(),
            idle_lat.last().unwrap(),
            big + 1,
            (t_a - ta).as_secs_f64()
        ));
        drop(tracker);
        delete_namespace(&client, &ns).await?;
    }
    let mut sec = Section::new(
        &format!("3. Fairness: cluster A scaling to {big} workers, cluster B created just after"),
        &[
            "figure",
            "ours (median, p95, max)",
            "baseline: operator idle (median, max)",
            "ours vs baseline",
            "target",
            "",
        ],
    );
    sec.method = vec![format!(
        "One leader-elected replica with default flags ({DEFAULT_SHARDS} shards, create batch 20){}. Per repetition \
         (fresh namespace): the baseline is a small cluster's head-pod latency while the operator is idle; then A \
         (example cluster with {big} workers) is created, and as soon as A's first worker exists B (example cluster) \
         is created, named so that it hashes to A's shard (the worst case). Latency: from B's create request to B's \
         head pod appearing in the benchmark's watch. {reps} repetition(s).",
        if opts.args.operator_args.is_empty() {
            String::new()
        } else {
            format!(", plus `{}`", opts.args.operator_args.join(" "))
        }
    )];
    let s = stats(&busy_lat);
    let b = stats(&idle_lat);
    sec.row(vec![
        "B's head pod latency".into(),
        med_p95_max(&busy_lat, "s", 3),
        med_max(&idle_lat, "s", 3),
        match (s, b) {
            (Some(s), Some(b)) => format!("{:.1}× idle", s.median / b.median.max(1e-9)),
            _ => "—".into(),
        },
        "≤ 2 s".into(),
        verdict(s.map(|s| s.max <= 2.0)).into(),
    ]);
    sec.row(vec![
        format!("A's pods when B's head appeared (of {})", big + 1),
        med_max(&a_at, "", 0),
        "—".into(),
        String::new(),
        format!("< {} (A still scaling)", big + 1),
        verdict(stats(&a_at).map(|s| s.max < (big + 1) as f64)).into(),
    ]);
    sec.row(vec![
        format!("A: all {} pods exist", big + 1),
        med_max(&a_total, "s", 1),
        "—".into(),
        String::new(),
        "—".into(),
        String::new(),
    ]);
    sec.notes.push("Reference: KubeRay #3909, about 10 minutes for another cluster while one scales to 500.".into());
    Ok(sec)
}
