//! Benchmark: Failover. Split out of the driver by benchmark; shared helpers live in `main.rs`.

use super::*;

#[derive(Debug, Default)]
struct Handover {
    /// Signal → the new leader's first write (its Lease take-over).
    first_write: f64,
    /// Signal → the new leader's first write on a RayCluster's objects (the new cluster's Service).
    first_action: f64,
    /// Signal → the new cluster's head pod seen by the benchmark's watch.
    head_seen: f64,
    /// Signal → the old process exited (graceful only).
    old_exit: f64,
}

pub(super) async fn failover(opts: &Opts) -> Result<Section> {
    let (graceful, crash) = if opts.smoke() { (1usize, 1usize) } else { (20, 5) };
    // Graceful always with the defaults; crash with the defaults too in the full run (a smoke run
    // cannot wait 15 s per crash).
    let (crash_ttl, crash_renew) = if opts.smoke() { (4u64, 1u64) } else { (15, 5) };
    let ns = "failover";
    let cp = Cp::up(opts, "failover")?;
    let client = cp.client("ray-operator-bench/driver (bench-driver)").await?;
    create_namespace(&client, ns).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let names = ["fo-a", "fo-b"];
    for n in names {
        // A Pod object for each replica, so the leader can label its own pod, as in a Deployment.
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": n, "labels": {"app": "ray-operator"}},
            "spec": {"containers": [{"name": "op", "image": "ray-operator"}]}
        }))?;
        pods.create(&PostParams::default(), &p).await?;
    }
    let base = example_cluster(&opts.repo)?;
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), ns);
    let tracker = Tracker::start(&client, ns).await?;

    let mut results: Vec<(bool, Handover)> = Vec::new();
    let mut retried = 0usize;
    let mut created = 0usize;
    for phase_crash in [false, true] {
        let count = if phase_crash { crash } else { graceful };
        let (ttl, renew) = if phase_crash { (crash_ttl, crash_renew) } else { (15, 5) };
        let flags: Vec<String> = vec![
            "--namespaces".into(),
            ns.into(),
            "--lease-ttl".into(),
            ttl.to_string(),
            "--lease-renew".into(),
            renew.to_string(),
        ];
        let mut ops: BTreeMap<String, OpProc> = BTreeMap::new();
        for n in names {
            ops.insert(n.into(), OpProc::start(opts, &cp, n, ns, &flags)?);
        }
        for op in ops.values() {
            op.wait_ready().await?;
        }
        poll(Duration::from_secs(60), "a leader", || async { lease_holder(&client, ns).await }).await?;
        // Some clusters exist before the first hand-over, so the new leader resyncs real state.
        if created == 0 {
            for i in 0..5 {
                rcs.create(&PostParams::default(), &cluster(&base, &format!("before-{i}"), 2)?).await?;
            }
            tracker.wait(Duration::from_secs(120), "clusters Running", |s| s.clusters_running_at(5)).await?;
            created = 5;
        }
        let mut done = 0;
        while done < count {
            let leader =
                poll(Duration::from_secs(60), "a leader", || async { lease_holder(&client, ns).await }).await?;
            let other = names.iter().find(|n| **n != leader).unwrap().to_string();
            ops[&other].wait_ready().await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let name = format!("after-{created}");
            created += 1;

            let sys0 = SystemTime::now();
            let t0 = Instant::now();
            let mut old = ops.remove(&leader).unwrap();
            if phase_crash {
                let _ = old.child.kill();
            } else {
                old.signal("TERM");
            }
            // Work arrives during the hand-over. The short pause keeps the old leader (which has
            // already stopped taking work) from racing for it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            rcs.create(&PostParams::default(), &cluster(&base, &name, 2)?).await?;
            let t_head = tracker
                .wait(Duration::from_secs(ttl + 60), "new cluster's head", |s| {
                    s.pods_seen_at(1, |p| p.cluster == name && p.head)
                })
                .await?;
            let exited = old.wait_exit(Duration::from_secs(15));
            let old_exit = t0.elapsed().as_secs_f64();
            if !exited {
                bail!("{leader} did not exit after the signal; log:\n{}", tail(&old.log, 20));
            }
            let new_tag = format!("({other})");
            // The audit log is written as requests complete; give it a moment.
            let (first_write, first_action) =
                poll(Duration::from_secs(20), "the new leader's writes in the audit log", || {
                    let cp = &cp;
                    let new_tag = new_tag.clone();
                    async move {
                        let reqs = cp.requests(&new_tag).ok()?;
                        let after: Vec<&Req> = reqs.iter().filter(|r| r.at >= sys0 && r.is_write()).collect();
                        let first = after.first()?;
                        let action = after.iter().find(|r| {
                            matches!(r.resource.as_str(), "services" | "pods" | "rayclusters" | "rayclusters/status")
                                && !(r.resource == "pods" && r.name.as_deref().is_some_and(|n| names.contains(&n)))
                        })?;
                        Some((first.at, action.at))
                    }
                })
                .await?;
            // Did the old leader act on the new cluster after all (a race with the signal)? Then
            // the new leader had nothing to do for it: repeat the hand-over.
            let old_acted = cp
                .requests(&format!("({leader})"))?
                .iter()
                .any(|r| r.at >= sys0 && r.is_write() && matches!(r.resource.as_str(), "services" | "pods"));
            tracker.wait(Duration::from_secs(120), "new cluster Running", |s| s.rc_running.get(&name).copied()).await?;
            // Only now restart the old replica: with its old identity it would otherwise find
            // "its own" Lease and take it back at once.
            let fresh = OpProc::start(opts, &cp, &leader, ns, &flags)?;
            fresh.wait_ready().await?;
            ops.insert(leader.clone(), fresh);
            let secs = |t: SystemTime| t.duration_since(sys0).map_or(0.0, |d| d.as_secs_f64());
            let h = Handover {
                first_write: secs(first_write),
                first_action: secs(first_action),
                head_seen: (t_head - t0).as_secs_f64(),
                old_exit,
            };
            log(format!(
                "failover {} {}: {leader} -> {other}: first write {:.3} s, first action {:.3} s, head seen {:.3} s{}",
                if phase_crash { "crash" } else { "graceful" },
                done,
                h.first_write,
                h.first_action,
                h.head_seen,
                if old_acted { " (old leader acted: repeated)" } else { "" }
            ));
            if old_acted {
                retried += 1;
                if retried > 10 {
                    bail!("the old leader kept acting after the signal");
                }
                continue;
            }
            results.push((phase_crash, h));
            done += 1;
        }
        drop(ops);
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The next phase starts with a free Lease; wait out the one the killed processes held.
        let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
        let _ = leases.delete("ray-operator-leader", &DeleteParams::default()).await;
    }

    let pick = |crash: bool, f: fn(&Handover) -> f64| -> Vec<f64> {
        results.iter().filter(|(c, _)| *c == crash).map(|(_, h)| f(h)).collect()
    };
    let mut sec = Section::new(
        "4. Failover: hand-overs between two replicas",
        &["figure", "graceful (SIGTERM): p50, max", "crash (SIGKILL): p50, max", "target", ""],
    );
    sec.method = vec![format!(
        "Two replicas (`POD_NAME` fo-a / fo-b, so each has its own user agent) serve one namespace. Each hand-over: \
         signal the Lease holder, create a new RayCluster 50 ms later, then restart the signalled replica as the new \
         standby. \"First write\" is the first write request by the other replica after the signal in the audit log \
         (its Lease take-over); \"acting\" is its first write on a cluster's objects (the new cluster's Service or \
         pods, or a status) — the figure the targets are about. Graceful: ttl 15 s, renew 5 s (defaults), {graceful} \
         hand-overs. Crash: ttl {crash_ttl} s, renew {crash_renew} s, {crash} hand-overs.{}",
        if retried > 0 {
            format!(
                " {retried} graceful hand-over(s) were repeated because the old leader handled the new cluster itself."
            )
        } else {
            String::new()
        }
    )];
    let fmt = |xs: &[f64]| match stats(xs) {
        Some(s) => format!("{:.3} s, {:.3} s", s.median, s.max),
        None => "—".into(),
    };
    let g_act = stats(&pick(false, |h| h.first_action));
    let c_act = stats(&pick(true, |h| h.first_action));
    // A crash costs the Lease's expiry, then one fence margin (ttl/5, at least 1 s) that the new
    // leader waits for the dead one's last writes before it lists (`Fence::settle`), then the list.
    let margin = ray_operator::runtime::leader::margin_for(Duration::from_secs(crash_ttl)).as_secs_f64();
    let crash_target = crash_ttl as f64 + margin + 2.0;
    sec.row(vec![
        "signal → new leader acting".into(),
        fmt(&pick(false, |h| h.first_action)),
        fmt(&pick(true, |h| h.first_action)),
        format!("graceful ≤ 1 s; crash ≤ ttl + margin + 2 s = {crash_target} s"),
        format!(
            "graceful {}, crash {}",
            verdict(g_act.map(|s| s.max <= 1.0)),
            verdict(c_act.map(|s| s.max <= crash_target))
        ),
    ]);
    sec.row(vec![
        "signal → new leader's first write (Lease)".into(),
        fmt(&pick(false, |h| h.first_write)),
        fmt(&pick(true, |h| h.first_write)),
        "—".into(),
        String::new(),
    ]);
    sec.row(vec![
        "signal → new cluster's head pod visible".into(),
        fmt(&pick(false, |h| h.head_seen)),
        fmt(&pick(true, |h| h.head_seen)),
        "—".into(),
        String::new(),
    ]);
    sec.row(vec![
        "signal → old process exited".into(),
        fmt(&pick(false, |h| h.old_exit)),
        "—".into(),
        "—".into(),
        String::new(),
    ]);
    sec.notes.push(
        "Baseline: the crash column is what a replica that does not hand over gracefully costs (the Lease must \
         expire); KubeRay's reference is that lease expiry (15 s) for every hand-over."
            .into(),
    );
    Ok(sec)
}
