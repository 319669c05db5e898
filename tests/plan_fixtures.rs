//! Ray's own answers for the reference fixtures (`tests/fixtures/ray/`, produced
//! by `bench_ray_scheduler.py` with Ray 2.60.0) must be reproduced exactly: the
//! node counts per type and every unfulfilled shape with its count, both with the
//! fixture's `upscaling_speed` and uncapped.

use std::path::PathBuf;

use ray_operator::autoscaler::decision::UNCAPPED_UPSCALING_SPEED;
use ray_operator::autoscaler::fixture::{json_values_equal, plan_from_json, plan_from_json_with_upscaling_speed};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ray")
}

fn read(name: &str) -> String {
    let path = fixture_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn check(n: usize) {
    let input = read(&format!("bench_N{n}.json"));
    let expected: Value = serde_json::from_str(&read(&format!("expected_N{n}.json"))).expect("expected JSON");

    let capped = plan_from_json(&input).expect("plan").to_value();
    let want = &expected["v1_get_nodes_to_launch"];
    assert!(json_values_equal(&capped, want), "N={n} capped differs\n got: {capped}\nwant: {want}");

    let uncapped = plan_from_json_with_upscaling_speed(&input, UNCAPPED_UPSCALING_SPEED).expect("plan").to_value();
    let want = &expected["v1_get_nodes_to_launch_uncapped"];
    assert!(json_values_equal(&uncapped, want), "N={n} uncapped differs\n got: {uncapped}\nwant: {want}");
}

#[test]
fn n100_matches_ray() {
    check(100);
}

#[test]
fn n1000_matches_ray() {
    check(1000);
}

#[test]
fn n10000_matches_ray() {
    check(10000);
}
