//! Times the autoscaler decision on the reference fixtures (Ray's Python takes
//! 1.5 ms / 166 ms / 4.6 s for N = 100 / 1000 / 10000 on a 2-core VM).
//! Run with `cargo run --release --example bench_decision`.

use std::time::{Duration, Instant};

use ray_operator::autoscaler::decision::get_nodes_to_launch;
use ray_operator::autoscaler::fixture::BenchInput;

const RUNS: usize = 50;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ray");
    for n in [100, 1000, 10000] {
        let text = std::fs::read_to_string(dir.join(format!("bench_N{n}.json")))?;
        let input = serde_json::from_str::<BenchInput>(&text)?.to_decision_input()?;
        // Warm up once; the decision is deterministic, so keep the first answer.
        let first = get_nodes_to_launch(&input)?;
        let mut times: Vec<Duration> = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let start = Instant::now();
            let decision = get_nodes_to_launch(&input)?;
            times.push(start.elapsed());
            assert_eq!(decision, first, "the decision must be deterministic");
        }
        times.sort();
        let median = times[RUNS / 2];
        let p95 = times[(RUNS * 95).div_ceil(100) - 1];
        let launched: u32 = first.nodes_to_launch.values().sum();
        println!(
            "N={n:>6}  median {:>9.3} ms  p95 {:>9.3} ms  ({RUNS} runs; {launched} nodes to launch, {} unfulfilled shapes)",
            median.as_secs_f64() * 1e3,
            p95.as_secs_f64() * 1e3,
            first.unfulfilled.len()
        );
    }
    Ok(())
}
