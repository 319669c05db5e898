//! The benchmark code cannot rot: `e2e/bench --smoke` runs every benchmark of `examples/bench_e2e/`
//! at CI size (N = 20 clusters, two hand-overs, short windows) against its own control planes, and
//! must exit 0 having printed every table. The figures themselves are not checked here (a debug
//! build on a shared CI machine says nothing about them); the full run (`e2e/bench`) is not part of CI.

use std::path::PathBuf;
use std::process::Command;

const TABLES: [&str; 6] =
    ["## 1. Scale:", "## 2. Idle cost:", "## 3. Fairness:", "## 4. Failover:", "## 5. Reaction:", "## 6. Decision:"];

#[test]
fn bench_smoke_prints_every_table() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(repo.join("e2e/bench"))
        .arg("--smoke")
        .current_dir(&repo)
        // The benchmark starts its own control planes; never point it at the test run's.
        .env_remove("KUBECONFIG")
        .env_remove("CP_DIR")
        .output()
        .expect("run e2e/bench --smoke");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "e2e/bench --smoke failed ({})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    for t in TABLES {
        assert!(stdout.contains(t), "no table {t:?} in the output:\n{stdout}");
    }
    assert!(!stdout.contains("The benchmark failed"), "a benchmark failed:\n{stdout}");
    // Every benchmark printed its table rows (scale alone has eleven).
    let rows =
        stdout.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| figure") && !l.starts_with("| N")).count();
    assert!(rows >= 10, "too few table rows:\n{stdout}");
    assert!(repo.join("target/BENCHMARKS-smoke.md").exists());
}
