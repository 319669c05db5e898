//! Benchmark: Scale (and Idle, which continues the last operator run at the largest N). Split out of the driver by benchmark; shared helpers live in `main.rs`.

use super::*;

#[derive(Debug, Default, Clone)]
struct ScaleRun {
    /// Seconds from the first RayCluster create until all 3N pods were seen.
    pods_s: f64,
    /// Seconds until all clusters reported Running (operator) / all pods Running (baseline).
    running_s: f64,
    /// Seconds until the N RayClusters were created.
    rcs_s: f64,
    peak_rss: f64,
    settled_rss: f64,
    cpu_s: f64,
    /// Control-plane CPU seconds over the run.
    cp_cpu_s: f64,
    requests: ReqCounts,
    /// The operator's own count of its writes (`ray_operator_api_writes_total` + pods created).
    metric_writes: f64,
    /// CPU seconds used by everything else on the machine during the run (other people's work:
    /// the noise), per second of the run, i.e. in cores.
    other_cores: f64,
}

/// An operator configuration measured in the scale and idle benchmarks.
#[derive(Clone, Debug)]
struct Variant {
    /// Column label.
    label: String,
    args: Vec<String>,
}

/// The default configuration (what a deployment runs), and the same with `--no-autoscaler`, which
/// tells the base operator's cost apart from the autoscaler's: kwok pods run no Ray, so every
/// cluster's GCS is unreachable and the autoscaler works its error path.
fn variants(opts: &Opts) -> Vec<Variant> {
    let mut v = vec![Variant { label: "ours".into(), args: opts.args.operator_args.clone() }];
    // The smoke run measures the default only (the code path is the same).
    if !opts.args.operator_args.iter().any(|a| a == "--no-autoscaler") && !opts.args.no_variants && !opts.smoke() {
        let mut args = opts.args.operator_args.clone();
        args.push("--no-autoscaler".into());
        v.push(Variant { label: "`--no-autoscaler`".into(), args });
    }
    v
}

/// The control plane and operator of an operator run, kept for the idle measurement.
struct Keep {
    cp: Cp,
    op: OpProc,
    n: usize,
    _tracker: Tracker,
}

async fn scale_operator_run(
    opts: &Opts,
    variant: &Variant,
    n: usize,
    rep: usize,
    keep: bool,
) -> Result<(ScaleRun, Option<Keep>)> {
    let tag = if variant.args.iter().any(|a| a == "--no-autoscaler") { "noauto" } else { "op" };
    let cp = Cp::up(opts, &format!("scale-{tag}-{n}-{rep}"))?;
    let client = cp.client("ray-operator-bench/driver (bench-driver)").await?;
    create_namespace(&client, OPERATOR_NS).await?;
    create_namespace(&client, "bench").await?;
    let op = OpProc::start(opts, &cp, "bench-op", OPERATOR_NS, &variant.args)?;
    op.wait_ready().await?;
    op.wait_leader().await?;
    let tracker = Tracker::start(&client, "bench").await?;
    let base = example_cluster(&opts.repo)?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    log(format!("scale N={n} rep {rep}: {} run", variant.label));
    let cpu0 = proc_stats(op.pid()).unwrap_or_default();
    let cp_cpu0 = cp.cpu_s();
    let (busy0, self0) = (machine_busy_s(), self_cpu_s());
    let sys0 = SystemTime::now();
    let t0 = Instant::now();
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), "bench");
    futures::stream::iter(0..n)
        .map(|i| {
            let rcs = rcs.clone();
            let rc = cluster(&base, &format!("rc-{i:04}"), 2);
            async move { rcs.create(&PostParams::default(), &rc?).await.map_err(anyhow::Error::from) }
        })
        .buffer_unordered(opts.args.concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    let rcs_s = t0.elapsed().as_secs_f64();
    let timeout = opts.scale_timeout(n);
    let t_pods = tracker.wait(timeout, "all pods", |s| s.pods_seen_at(3 * n, |_| true)).await?;
    let t_running = tracker.wait(timeout, "all clusters Running", |s| s.clusters_running_at(n)).await?;
    log(format!(
        "scale N={n} rep {rep}: {}: pods {:.1} s, Running {:.1} s",
        variant.label,
        (t_pods - t0).as_secs_f64(),
        (t_running - t0).as_secs_f64()
    ));
    // Settle: trailing status writes and events.
    tokio::time::sleep(Duration::from_secs(if opts.smoke() { 2 } else { 10 })).await;
    let sys1 = SystemTime::now();
    let after = proc_stats(op.pid()).ok_or_else(|| anyhow!("operator exited; log:\n{}", tail(&op.log, 30)))?;
    let cp_cpu = cp.cpu_s() - cp_cpu0;
    let other = (machine_busy_s() - busy0) - cp_cpu - (after.cpu_s - cpu0.cpu_s) - (self_cpu_s() - self0);
    let other_cores = other.max(0.0) / t0.elapsed().as_secs_f64();
    let m = op.metrics().await;
    let metric_writes =
        metric_sum(&m, "ray_operator_api_writes_total") + metric_sum(&m, "ray_operator_children_created_total");
    let reqs = cp.requests(&op.tag())?;
    let run = ScaleRun {
        pods_s: (t_pods - t0).as_secs_f64(),
        running_s: (t_running - t0).as_secs_f64(),
        rcs_s,
        peak_rss: after.hwm_mib,
        settled_rss: after.rss_mib,
        cpu_s: after.cpu_s - cpu0.cpu_s,
        cp_cpu_s: cp_cpu,
        requests: ReqCounts::of(&reqs, sys0, sys1),
        metric_writes,
        other_cores,
    };
    let kept = keep.then(|| Keep { cp, op, n, _tracker: tracker });
    Ok((run, kept))
}

/// The baseline: a plain client (this process, kube-rs with its defaults: no client-side rate
/// limit, like the operator) creates the same N RayClusters and, as each is created, the same
/// Service (server-side apply, as the operator does) and the same three pods (POST with
/// generateName) — what the operator must at least do — with the same number of requests in flight.
///
/// With `mix`, the client also makes the operator's other writes for each cluster — three Events
/// and two status patches (Updating, then Running), as the operator does with `--no-autoscaler` —
/// which tells whether the operator is slower than the API server allows for the requests it makes.
async fn scale_baseline_run(opts: &Opts, n: usize, rep: usize, mix: bool) -> Result<ScaleRun> {
    let cp = Cp::up(opts, &format!("scale-{}-{n}-{rep}", if mix { "mix" } else { "base" }))?;
    let driver = cp.client("ray-operator-bench/driver (bench-driver)").await?;
    create_namespace(&driver, "bench").await?;
    let client = cp.client("ray-operator-bench/baseline (bench-baseline)").await?;
    let tracker = Tracker::start(&driver, "bench").await?;
    let base = example_cluster(&opts.repo)?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let what = if mix { "baseline with the operator's request mix" } else { "baseline" };
    log(format!("scale N={n} rep {rep}: {what} run"));
    let cp_cpu0 = cp.cpu_s();
    let (busy0, self0) = (machine_busy_s(), self_cpu_s());
    let sys0 = SystemTime::now();
    let t0 = Instant::now();
    let rcs: Api<RayCluster> = Api::namespaced(client.clone(), "bench");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "bench");
    let svcs: Api<Service> = Api::namespaced(client.clone(), "bench");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "bench");
    let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let rc_done = Arc::new(Mutex::new(Vec::<Instant>::new()));
    futures::stream::iter(0..n)
        .map(|i| {
            let (rcs, pods, svcs, pp, rc_done) = (rcs.clone(), pods.clone(), svcs.clone(), pp.clone(), rc_done.clone());
            let events = events.clone();
            let rc = cluster(&base, &format!("rc-{i:04}"), 2);
            async move {
                let created = rcs.create(&PostParams::default(), &rc?).await?;
                rc_done.lock().unwrap().push(Instant::now());
                let [head, w1, w2] = baseline_children(&created, &pods, &svcs, &pp).await?;
                if mix {
                    let pods_created = [head.name_any(), w1.name_any(), w2.name_any()];
                    let reasons = ["CreatedService", "CreatedHeadPod", "CreatedWorkerPods"];
                    let bodies: Vec<_> =
                        reasons.iter().map(|r| operator_like_event(&created, r, &pods_created)).collect();
                    let post = PostParams::default();
                    let evs = futures::future::join_all(bodies.iter().map(|b| events.create(&post, b))).await;
                    for e in evs {
                        e?;
                    }
                    let name = created.name_any();
                    for (phase, ready) in [("Updating", 0), ("Running", 2)] {
                        let status = operator_like_status(&created, phase, ready, &pods_created[0]);
                        rcs.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await?;
                    }
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(opts.args.concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    let rcs_s = rc_done.lock().unwrap().iter().max().map_or(0.0, |t| (*t - t0).as_secs_f64());
    let timeout = opts.scale_timeout(n);
    let t_pods = tracker.wait(timeout, "all pods", |s| s.pods_seen_at(3 * n, |_| true)).await?;
    let t_running = tracker.wait(timeout, "all pods Running", |s| s.pods_running_at(3 * n)).await?;
    log(format!(
        "scale N={n} rep {rep}: {what}: pods {:.1} s, pods Running {:.1} s",
        (t_pods - t0).as_secs_f64(),
        (t_running - t0).as_secs_f64()
    ));
    tokio::time::sleep(Duration::from_secs(if opts.smoke() { 2 } else { 10 })).await;
    let sys1 = SystemTime::now();
    let cp_cpu = cp.cpu_s() - cp_cpu0;
    let other = (machine_busy_s() - busy0) - cp_cpu - (self_cpu_s() - self0);
    let reqs = cp.requests("(bench-baseline)")?;
    let _ = what;
    Ok(ScaleRun {
        pods_s: (t_pods - t0).as_secs_f64(),
        running_s: (t_running - t0).as_secs_f64(),
        rcs_s,
        cp_cpu_s: cp_cpu,
        requests: ReqCounts::of(&reqs, sys0, sys1),
        other_cores: other.max(0.0) / t0.elapsed().as_secs_f64(),
        ..Default::default()
    })
}

/// An Event like the operator's (events.k8s.io/v1, about the RayCluster).
fn operator_like_event(rc: &RayCluster, reason: &str, pods: &[String]) -> k8s_openapi::api::events::v1::Event {
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
    k8s_openapi::api::events::v1::Event {
        metadata: ObjectMeta { generate_name: Some(format!("{}-", rc.name_any())), ..Default::default() },
        event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
        action: Some(reason.into()),
        reason: Some(reason.into()),
        note: Some(format!("{reason}: {}", pods.join(", "))),
        type_: Some("Normal".into()),
        reporting_controller: Some("ray-operator".into()),
        reporting_instance: Some("bench-baseline".into()),
        regarding: Some(ObjectReference {
            api_version: Some("cluster.ray.io/v1".into()),
            kind: Some("RayCluster".into()),
            name: rc.metadata.name.clone(),
            namespace: rc.metadata.namespace.clone(),
            uid: rc.metadata.uid.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A status patch like the operator's.
fn operator_like_status(rc: &RayCluster, phase: &str, ready: u32, head: &str) -> serde_json::Value {
    let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let running = phase == "Running";
    serde_json::json!({ "status": {
        "autoscalerRetries": 0,
        "conditions": [
            {"lastTransitionTime": now, "message": format!("head and {ready}/2 workers are ready"),
             "observedGeneration": 1, "reason": if running { "ClusterReady" } else { "Reconciling" },
             "status": if running { "True" } else { "False" }, "type": "Ready"},
            {"lastTransitionTime": now, "message": "the head pod is running and ready", "observedGeneration": 1,
             "reason": if running { "HeadPodReady" } else { "HeadPodNotReady" },
             "status": if running { "True" } else { "False" }, "type": "HeadReady"}
        ],
        "headPodName": head,
        "headServiceName": format!("{}-ray-head", rc.name_any()),
        "observedGeneration": 1,
        "phase": phase,
        "podTypes": [{"desired": 2, "name": "worker-node", "ready": ready}],
        "workers": format!("{ready}/2")
    }})
}

/// The idle figures of one operator configuration.
#[derive(Debug, Clone)]
pub(super) struct IdleRun {
    label: String,
    n: usize,
    window_s: f64,
    requests: ReqCounts,
    cpu_s: f64,
    /// CPU % of a core per tenth of the window.
    cpu_samples: Vec<f64>,
    rss: f64,
    cp_cpu_s: f64,
}

async fn idle_measure(opts: &Opts, label: &str, keep: Keep) -> Result<IdleRun> {
    let secs = opts.args.idle_secs.unwrap_or(if opts.smoke() { 15 } else { 300 });
    log(format!("idle ({label}): {} clusters Running; measuring for {secs} s", keep.n));
    tokio::time::sleep(Duration::from_secs(if opts.smoke() { 2 } else { 20 })).await;
    let p0 = proc_stats(keep.op.pid()).ok_or_else(|| anyhow!("operator exited"))?;
    let cp0 = keep.cp.cpu_s();
    let sys0 = SystemTime::now();
    let mut samples = Vec::new();
    let mut last = p0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs_f64(secs as f64 / 10.0)).await;
        let p = proc_stats(keep.op.pid()).ok_or_else(|| anyhow!("operator exited"))?;
        samples.push((p.cpu_s - last.cpu_s) / (secs as f64 / 10.0) * 100.0);
        last = p;
    }
    let sys1 = SystemTime::now();
    let reqs = keep.cp.requests(&keep.op.tag())?;
    Ok(IdleRun {
        label: label.into(),
        n: keep.n,
        window_s: sys1.duration_since(sys0)?.as_secs_f64(),
        requests: ReqCounts::of(&reqs, sys0, sys1),
        cpu_s: last.cpu_s - p0.cpu_s,
        cpu_samples: samples,
        rss: last.rss_mib,
        cp_cpu_s: keep.cp.cpu_s() - cp0,
    })
}

/// Whether a configuration's runs meet a target.
type Judge<'a> = dyn Fn(&[ScaleRun]) -> bool + 'a;

fn ratio_text(xs: &[f64]) -> String {
    stats(xs).map_or("—".into(), |s| format!("{:.2}", s.median))
}

pub(super) async fn scale(opts: &Opts, with_idle: bool) -> Result<(Section, Vec<IdleRun>)> {
    let sizes = opts.sizes();
    let largest = *sizes.iter().max().unwrap_or(&0);
    let vars = variants(opts);
    let mut header: Vec<String> = vec!["N".into(), "figure".into()];
    header.extend(vars.iter().map(|v| format!("{} (median, max)", v.label)));
    header.push("baseline (median, max)".into());
    if sizes.iter().any(|&m| opts.mix_baseline(m, largest)) {
        header.push("diagnostic: plain client with the operator's request mix".into());
    }
    header.push(if vars.len() > 1 {
        format!("÷ baseline ({})", vars.iter().map(|v| v.label.clone()).collect::<Vec<_>>().join(" / "))
    } else {
        "÷ baseline".into()
    });
    header.push("target".into());
    header.push(String::new());
    let mut sec = Section::new("1. Scale: N RayClusters (head + 2 workers each) applied at once", &[]);
    sec.header = header;
    sec.method = vec![
        format!(
            "Each repetition runs every configuration on a fresh control plane, one after the other: the baseline, then \
             the operator{}. The N RayClusters (`deploy/example_cluster.yaml`, renamed) are created through the API \
             with {} requests in flight; the clock starts at the first create. Operator: one leader-elected replica \
             (ttl 15 s, renew 5 s), cluster-wide, default flags{}. Baseline: a plain kube-rs client in the benchmark \
             process (kube defaults: no client-side QPS limit, like the operator) that, as each RayCluster is created, \
             server-side-applies the same head Service and POSTs the same three pods (bodies from \
             `model::desired`, as the operator builds them) — the least work that yields the same objects, i.e. \
             what the API server allows. Pods and phases are observed by a watch in the benchmark process (the same \
             in every run). The API server authenticates everyone as the same admin (exempt from API Priority and \
             Fairness), the operator included.",
            if vars.len() > 1 { " in its default configuration and with `--no-autoscaler`" } else { "" },
            opts.args.concurrency,
            if opts.args.operator_args.is_empty() {
                String::new()
            } else {
                format!(" plus `{}`", opts.args.operator_args.join(" "))
            }
        ),
        "\"÷ baseline\" is baseline time ÷ our time per repetition (1.0 = as fast as the API server allows; for \
         counts, our count ÷ the baseline's is shown as baseline ÷ ours too, so higher is better), median over \
         repetitions. RSS is VmHWM (peak) and VmRSS 10 s after all clusters are Running (settled); CPU is the \
         operator's user+system time from the first create until then. API requests are the operator's, from the \
         audit log by its user agent, over the same window; the baseline's include its N RayCluster creates."
            .into(),
    ];
    let mut idles = Vec::new();
    for &n in &sizes {
        let reps = opts.reps(n);
        let mut ours: Vec<Vec<ScaleRun>> = vec![Vec::new(); vars.len()];
        let mut base = Vec::new();
        let with_mix = opts.mix_baseline(n, largest);
        let mut mix = Vec::new();
        for rep in 0..reps {
            base.push(scale_baseline_run(opts, n, rep, false).await?);
            if with_mix {
                mix.push(scale_baseline_run(opts, n, rep, true).await?);
            }
            for (vi, v) in vars.iter().enumerate() {
                let keep = with_idle && n == largest && rep + 1 == reps;
                let (run, k) = scale_operator_run(opts, v, n, rep, keep).await?;
                ours[vi].push(run);
                if let Some(k) = k {
                    idles.push(idle_measure(opts, &v.label, k).await?);
                }
            }
        }
        fn col(runs: &[ScaleRun], f: impl Fn(&ScaleRun) -> f64) -> Vec<f64> {
            runs.iter().map(f).collect()
        }
        let ratios = |f: &dyn Fn(&ScaleRun) -> f64| -> Vec<Vec<f64>> {
            ours.iter().map(|o| o.iter().zip(&base).map(|(o, b)| f(b) / f(o).max(1e-9)).collect()).collect()
        };
        let show_mix = sizes.iter().any(|&m| opts.mix_baseline(m, largest));
        let mut row = |figure: String,
                       f: &dyn Fn(&ScaleRun) -> f64,
                       unit: &str,
                       prec: usize,
                       with_base: bool,
                       target: &str,
                       verdict_of: Option<&Judge<'_>>| {
            let mut cells = vec![n.to_string(), figure];
            for o in &ours {
                cells.push(med_max(&col(o, f), unit, prec));
            }
            if with_base {
                cells.push(med_max(&col(&base, f), unit, prec));
                if show_mix {
                    cells.push(if mix.is_empty() { "—".into() } else { med_max(&col(&mix, f), unit, prec) });
                }
                // The noise row is context, not a comparison.
                cells.push(if cells[1].starts_with("noise") {
                    String::new()
                } else {
                    ratios(f).iter().map(|r| ratio_text(r)).collect::<Vec<_>>().join(" / ")
                });
            } else {
                cells.push("—".into());
                if show_mix {
                    cells.push("—".into());
                }
                cells.push(String::new());
            }
            cells.push(target.into());
            cells.push(verdict_of.map_or(String::new(), |v| verdict(Some(v(&ours[0]))).to_string()));
            sec.row(cells);
        };
        let pods_ok = |runs: &[ScaleRun]| {
            let r: Vec<f64> = runs.iter().zip(&base).map(|(o, b)| b.pods_s / o.pods_s.max(1e-9)).collect();
            stats(&r).is_some_and(|s| s.median >= 0.8)
        };
        row(format!("all {} pods exist", 3 * n), &|r| r.pods_s, "s", 1, true, "≥ 0.80", Some(&pods_ok));
        row("all clusters Running (baseline: all pods Running)".into(), &|r| r.running_s, "s", 1, true, "—", None);
        row("pods created per second".into(), &|r| 3.0 * n as f64 / r.pods_s, "/s", 0, true, "—", None);
        row("RayClusters created (by the benchmark)".into(), &|r| r.rcs_s, "s", 1, true, "—", None);
        let rss_target = if n >= 1000 { "≤ 40 MiB" } else { "—" };
        let rss_ok = |runs: &[ScaleRun]| runs.iter().all(|r| r.peak_rss <= 40.0);
        row(
            "operator peak RSS".into(),
            &|r| r.peak_rss,
            "MiB",
            1,
            false,
            rss_target,
            (n >= 1000).then_some(&rss_ok as &Judge<'_>),
        );
        row("operator settled RSS".into(), &|r| r.settled_rss, "MiB", 1, false, "—", None);
        row("operator CPU (user+system)".into(), &|r| r.cpu_s, "s", 2, false, "—", None);
        row("control-plane CPU (all components)".into(), &|r| r.cp_cpu_s, "s", 1, true, "—", None);
        row("noise: other processes' CPU on the machine, in cores".into(), &|r| r.other_cores, "", 2, true, "—", None);
        row("API requests (non-watch)".into(), &|r| r.requests.non_watch() as f64, "", 0, true, "—", None);
        row("API writes per cluster".into(), &|r| r.requests.writes() as f64 / n as f64, "", 2, true, "—", None);
        for (v, runs) in vars.iter().zip(&ours) {
            if let Some(last) = runs.last() {
                sec.notes.push(format!(
                    "N = {n}, {}, last repetition: {} (plus {} watches); its own metrics count {} writes.",
                    v.label,
                    last.requests.summary(),
                    last.requests.watches,
                    last.metric_writes
                ));
            }
        }
        if let Some(last) = base.last() {
            sec.notes.push(format!("N = {n}, baseline, last repetition: {}.", last.requests.summary()));
        }
        if !mix.is_empty() {
            let vs_mix: Vec<f64> =
                ours[ours.len() - 1].iter().zip(&mix).map(|(o, m)| m.pods_s / o.pods_s.max(1e-9)).collect();
            let mix_vs_base: Vec<f64> = mix.iter().zip(&base).map(|(m, b)| b.pods_s / m.pods_s.max(1e-9)).collect();
            sec.notes.push(format!(
                "N = {n}, diagnostic: a plain client making the operator's requests (the baseline's, plus per cluster \
                 three Events and two status patches: {}) needs {} of the baseline's speed; {} reaches {} of that \
                 client's speed (median of per-repetition ratios).",
                mix.last().map(|m| m.requests.summary()).unwrap_or_default(),
                ratio_text(&mix_vs_base),
                vars[vars.len() - 1].label,
                ratio_text(&vs_mix),
            ));
        }
        sec.notes.push(format!(
            "N = {n}: {reps} repetition(s); all pods exist after ({}, baseline) per repetition: {}.",
            vars.iter().map(|v| v.label.clone()).collect::<Vec<_>>().join(", "),
            (0..reps)
                .map(|i| {
                    let mut parts: Vec<String> = ours.iter().map(|o| format!("{:.1}", o[i].pods_s)).collect();
                    parts.push(format!("{:.1} s", base[i].pods_s));
                    parts.join(" / ")
                })
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    Ok((sec, idles))
}

pub(super) async fn idle(opts: &Opts, runs: Vec<IdleRun>) -> Result<Section> {
    let runs = if runs.is_empty() {
        // Idle alone (`--only idle`): one operator run per configuration at the largest N.
        let n = *opts.sizes().iter().max().unwrap_or(&20);
        let mut v = Vec::new();
        for var in variants(opts) {
            let k = scale_operator_run(opts, &var, n, 0, true).await?.1.ok_or_else(|| anyhow!("no run kept"))?;
            v.push(idle_measure(opts, &var.label, k).await?);
        }
        v
    } else {
        runs
    };
    let n = runs[0].n;
    let mut header = vec!["figure".to_string()];
    header.extend(runs.iter().map(|r| r.label.clone()));
    header.extend(["reference".to_string(), "target".to_string(), String::new()]);
    let mut sec = Section::new(&format!("2. Idle cost: {n} clusters Running, nothing changing"), &[]);
    sec.header = header;
    sec.method = vec![format!(
        "After the last scale repetition at N = {n}, its operator keeps running with all clusters Running and nothing \
         changing, for {:.0} s. Requests are the operator's, from the audit log by its user agent; \"beyond the \
         watches\" leaves out `watch` requests (the long-running streams and their re-establishment). The Lease \
         renewals (leader election) are a per-operator cost, shown apart and also divided over the clusters. No \
         in-run baseline exists for idle cost (a plain client makes no requests when idle); the reference is \
         KubeRay's requeue of every cluster every 300 s.",
        runs[0].window_s
    )];
    let per_hour = |r: &IdleRun, x: usize| x as f64 * 3600.0 / r.window_s;
    let mut row = |figure: &str, f: &dyn Fn(&IdleRun) -> String, reference: &str, target: &str, ok: Option<bool>| {
        let mut cells = vec![figure.to_string()];
        cells.extend(runs.iter().map(f));
        cells.extend([reference.to_string(), target.to_string(), verdict(ok).to_string()]);
        sec.row(cells);
    };
    let per_cluster = |r: &IdleRun| per_hour(r, r.requests.non_watch() - r.requests.lease()) / r.n as f64;
    let per_cluster_all = |r: &IdleRun| per_hour(r, r.requests.non_watch()) / r.n as f64;
    row(
        "API requests per cluster per hour beyond the watches, without the Lease",
        &|r| format!("{:.3}", per_cluster(r)),
        "KubeRay: 12 (requeue every 300 s)",
        "≤ 1",
        Some(per_cluster(&runs[0]) <= 1.0),
    );
    // The Lease is the operator's cost, not any cluster's: shown spread over the clusters for
    // scale, judged by the row above.
    row(
        "the same with the Lease renewals spread over the clusters",
        &|r| format!("{:.3}", per_cluster_all(r)),
        "—",
        "—",
        None,
    );
    row(
        "Lease requests per hour (whole operator)",
        &|r| format!("{:.0}", per_hour(r, r.requests.lease())),
        "—",
        "—",
        None,
    );
    row(
        "watch requests per hour (whole operator)",
        &|r| format!("{:.0}", per_hour(r, r.requests.watches)),
        "—",
        "—",
        None,
    );
    row(
        "operator CPU, % of a core (median, max over tenths of the window)",
        &|r| {
            format!(
                "{:.2} ({})",
                r.cpu_s / r.window_s * 100.0,
                stats(&r.cpu_samples).map_or("—".into(), |s| format!("{:.2}, {:.2}", s.median, s.max))
            )
        },
        "—",
        "—",
        None,
    );
    row("operator RSS", &|r| format!("{:.1} MiB", r.rss), "—", "≤ 40 MiB", Some(runs[0].rss <= 40.0));
    row("control-plane CPU, % of a core", &|r| format!("{:.1}", r.cp_cpu_s / r.window_s * 100.0), "—", "—", None);
    for r in &runs {
        sec.notes.push(format!(
            "{}: requests in the window: {} (plus {} watches).",
            r.label,
            if r.requests.other.is_empty() { "none".to_string() } else { r.requests.summary() },
            r.requests.watches
        ));
    }
    Ok(sec)
}
