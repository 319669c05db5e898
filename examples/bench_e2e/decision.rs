//! Benchmark: Decision. Split out of the driver by benchmark; shared helpers live in `main.rs`.

use super::*;

#[derive(Default, Debug)]
struct PyTimes {
    /// label → N → median ms
    medians: BTreeMap<String, BTreeMap<usize, f64>>,
    version: String,
}

fn run_python(opts: &Opts, sizes: &[usize], reps: usize, outdir: &Path) -> Result<Option<PyTimes>> {
    let Some(bin) = &opts.args.ray_bin else { return Ok(None) };
    let python = bin.join("python3");
    if !python.exists() {
        return Ok(None);
    }
    log(format!("decision: Ray's Python scheduler, N = {sizes:?}, {reps} reps"));
    let sizes_arg = sizes.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",");
    let out = Command::new(&python)
        .arg(opts.repo.join("tests/fixtures/ray/bench_ray_scheduler.py"))
        .args(["--reps", &reps.to_string(), "--sizes", &sizes_arg, "--outdir"])
        .arg(outdir)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("bench_ray_scheduler.py failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut t = PyTimes::default();
    for line in text.lines() {
        if line.starts_with("ray ") {
            t.version = line.split("  reps").next().unwrap_or(line).to_string();
        }
        let Some(rest) = line.strip_prefix("N=") else { continue };
        let w: Vec<&str> = rest.split_whitespace().collect();
        if w.len() >= 4 && w[2] == "median" {
            let (Ok(n), Ok(ms)) = (w[0].parse::<usize>(), w[3].parse::<f64>()) else { continue };
            t.medians.entry(w[1].to_string()).or_default().insert(n, ms);
        }
    }
    Ok(Some(t))
}

pub(super) fn decision(opts: &Opts) -> Result<(Section, Option<String>)> {
    let dir = opts.repo.join("tests/fixtures/ray");
    let sizes = [100usize, 1000, 10000];
    let runs = if opts.smoke() { 3 } else { 50 };
    let mut ours: BTreeMap<usize, (Stats, u32)> = BTreeMap::new();
    let mut same_as_fixture: BTreeMap<usize, bool> = BTreeMap::new();
    for n in sizes {
        let text = std::fs::read_to_string(dir.join(format!("bench_N{n}.json")))?;
        let input = serde_json::from_str::<BenchInput>(&text)?.to_decision_input()?;
        let first = get_nodes_to_launch(&input)?;
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let start = Instant::now();
            let d = get_nodes_to_launch(&input)?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
            if d != first {
                bail!("N={n}: the decision is not deterministic");
            }
        }
        let launched: u32 = first.nodes_to_launch.values().sum();
        ours.insert(n, (stats(&times).unwrap(), launched));
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(format!("expected_N{n}.json")))?)?;
        let capped = plan_from_json(&text)?.to_value();
        let uncapped = plan_from_json_with_upscaling_speed(&text, 1e9)?.to_value();
        same_as_fixture.insert(
            n,
            json_values_equal(&capped, &expected["v1_get_nodes_to_launch"])
                && json_values_equal(&uncapped, &expected["v1_get_nodes_to_launch_uncapped"]),
        );
    }

    // Ray's Python, in this run. The smoke run only does N = 100, once, and only if the venv exists.
    let py_sizes: Vec<usize> = if opts.smoke() { vec![100] } else { sizes.to_vec() };
    let outdir = opts.work.join("ray-decision");
    std::fs::create_dir_all(&outdir)?;
    let py = run_python(opts, &py_sizes, if opts.smoke() { 1 } else { 5 }, &outdir)?;
    let mut same_as_run: BTreeMap<usize, bool> = BTreeMap::new();
    if py.is_some() {
        for &n in &py_sizes {
            let input = std::fs::read_to_string(outdir.join(format!("bench_N{n}.json")))?;
            let expected: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(outdir.join(format!("expected_N{n}.json")))?)?;
            let fixture: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join(format!("bench_N{n}.json")))?)?;
            let input_v: serde_json::Value = serde_json::from_str(&input)?;
            let capped = plan_from_json(&input)?.to_value();
            let uncapped = plan_from_json_with_upscaling_speed(&input, 1e9)?.to_value();
            same_as_run.insert(
                n,
                json_values_equal(&input_v, &fixture)
                    && json_values_equal(&capped, &expected["v1_get_nodes_to_launch"])
                    && json_values_equal(&uncapped, &expected["v1_get_nodes_to_launch_uncapped"]),
            );
        }
    }
    let mut sec = Section::new(
        "6. Decision: the autoscaler's scale-up decision vs Ray's Python",
        &[
            "N pending demands",
            "ours (median, p95)",
            "Ray v1 `get_nodes_to_launch` (median)",
            "Ray v2 `schedule` (median)",
            "speed-up vs v1",
            "identical decisions",
            "target",
            "",
        ],
    );
    sec.method = vec![format!(
        "Fixtures `tests/fixtures/ray/bench_N*.json` (10 worker types, 100 running nodes, N single-bundle demands). \
         Ours: `autoscaler::decision::get_nodes_to_launch` on the prepared input, {runs} runs after one warm-up, in \
         this process ({} build). Ray: `tests/fixtures/ray/bench_ray_scheduler.py` with Ray's unmodified scheduler \
         from the ray==2.60.0 wheel{}, run now on the same machine; it regenerates the inputs from their seed \
         (checked equal to the fixtures) and its decisions, which ours must equal with the fixture's upscaling speed \
         and uncapped (\"identical decisions\": vs this run's Ray output; in brackets vs the committed expected files).",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        py.as_ref().map_or(String::new(), |p| format!(" ({})", p.version))
    )];
    for n in sizes {
        let (s, launched) = ours[&n];
        let v1 = py.as_ref().and_then(|p| p.medians.get("v1_get_nodes_to_launch")?.get(&n).copied());
        let v2 = py.as_ref().and_then(|p| p.medians.get("v2_schedule")?.get(&n).copied());
        let target = n == 10000;
        let same = match (same_as_run.get(&n), same_as_fixture[&n]) {
            (Some(r), f) => format!("{} ({})", if *r { "yes" } else { "**no**" }, if f { "yes" } else { "**no**" }),
            (None, f) => format!("not run ({})", if f { "yes" } else { "**no**" }),
        };
        let ok = same_as_fixture[&n] && same_as_run.get(&n).copied().unwrap_or(true);
        sec.row(vec![
            format!("{n} ({launched} nodes to launch)"),
            format!("{:.3} ms ({:.3})", s.median, s.p95),
            v1.map_or("not run".into(), |v| format!("{v:.1} ms")),
            v2.map_or("not run".into(), |v| format!("{v:.1} ms")),
            v1.map_or("—".into(), |v| format!("{:.0}×", v / s.median.max(1e-9))),
            same,
            if target { "≤ 5 ms, identical".into() } else { "—".into() },
            if target { verdict(Some(s.median <= 5.0 && ok)).into() } else { String::new() },
        ]);
    }
    sec.notes.push("Reference (SPEC §7): Ray 2.60 Python at N = 10,000: 4,565 ms (v1), 5,587 ms (v2).".into());
    Ok((sec, py.map(|p| p.version)))
}
