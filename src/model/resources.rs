//! Ray resources: the vocabulary ([`ResourceMap`], [`PlacementStrategy`]) and how a pod type's
//! Kubernetes quantities become Ray resources (SPEC §5).
//!
//! Ray learns a pod type's resources from its Ray container: CPU (rounded up to whole CPUs, as Ray
//! counts them), GPU (any resource whose name contains `gpu`, e.g. `nvidia.com/gpu`) and memory in
//! bytes, each the smaller of request and limit where both are set, plus the type's `rayResources`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Container;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Ray resources by name, e.g. `{"CPU": 1, "memory": 536870912, "Custom1": 1}`: what a pod type
/// offers, what a node has, what a request needs.
pub type ResourceMap = BTreeMap<String, f64>;

/// Ray's `PlacementStrategy` for placement groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlacementStrategy {
    /// Bundles are ordinary demands (best effort packing).
    Pack,
    /// Bundles are ordinary demands (best effort spreading).
    Spread,
    /// All bundles must land on one node: they are summed into one demand.
    StrictPack,
    /// Every bundle needs its own node.
    StrictSpread,
}

/// Parses a Kubernetes quantity (`500m`, `2`, `1.5`, `512Mi`, `1G`, `1e3`) into a number.
/// Returns `None` for anything that is not a quantity.
pub fn parse_quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    if q.is_empty() {
        return None;
    }
    // Longest suffixes first so "Mi" is not read as "M" followed by garbage.
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (number, factor) = SUFFIXES.iter().find_map(|(s, f)| q.strip_suffix(s).map(|n| (n, *f))).unwrap_or((q, 1.0));
    let value: f64 = number.parse().ok()?;
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    Some(value * factor)
}

/// The smaller of request and limit of every resource whose name matches `pred`; `None` if neither
/// is set. A quantity that does not parse counts as absent (the API server rejects it anyway).
fn min_of_request_and_limit(container: &Container, pred: impl Fn(&str) -> bool) -> Option<f64> {
    let res = container.resources.as_ref()?;
    let pick = |m: &Option<BTreeMap<String, Quantity>>| -> Option<f64> {
        m.as_ref()?.iter().filter(|(k, _)| pred(k)).filter_map(|(_, v)| parse_quantity(&v.0)).reduce(f64::max)
    };
    match (pick(&res.requests), pick(&res.limits)) {
        (Some(r), Some(l)) => Some(r.min(l)),
        (r, l) => r.or(l),
    }
}

/// Ray resources of a pod type from its Ray container and its `rayResources` (which win on conflict,
/// so users can override what was detected).
pub fn ray_resources(container: &Container, ray_resources: Option<&BTreeMap<String, f64>>) -> ResourceMap {
    let mut out = ResourceMap::new();
    if let Some(cpu) = min_of_request_and_limit(container, |k| k == "cpu") {
        // Ray schedules whole CPUs for a node; 1500m advertises 2 like Ray's own detection.
        out.insert("CPU".into(), cpu.ceil());
    }
    if let Some(gpu) = min_of_request_and_limit(container, |k| k.to_ascii_lowercase().contains("gpu"))
        && gpu > 0.0
    {
        out.insert("GPU".into(), gpu.floor());
    }
    if let Some(mem) = min_of_request_and_limit(container, |k| k == "memory") {
        out.insert("memory".into(), mem.floor());
    }
    if let Some(extra) = ray_resources {
        for (k, v) in extra {
            out.insert(k.clone(), *v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("1000m"), Some(1.0));
        assert_eq!(parse_quantity("1500m"), Some(1.5));
        assert_eq!(parse_quantity("2"), Some(2.0));
        assert_eq!(parse_quantity("512Mi"), Some(536870912.0));
        assert_eq!(parse_quantity("1G"), Some(1e9));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("0.5"), Some(0.5));
        assert_eq!(parse_quantity("abc"), None);
        assert_eq!(parse_quantity(""), None);
        assert_eq!(parse_quantity("-1"), None);
    }

    fn container(yaml: &str) -> Container {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn example_cluster_resources() {
        let c =
            container("name: ray-node\nresources: {requests: {cpu: 1000m, memory: 512Mi}, limits: {memory: 512Mi}}");
        let extra = BTreeMap::from([("Custom1".to_string(), 1.0), ("is_spot".to_string(), 1.0)]);
        let r = ray_resources(&c, Some(&extra));
        assert_eq!(
            r,
            BTreeMap::from([
                ("CPU".into(), 1.0),
                ("memory".into(), 536870912.0),
                ("Custom1".into(), 1.0),
                ("is_spot".into(), 1.0)
            ])
        );
    }

    #[test]
    fn cpu_rounds_up_and_takes_min_of_request_and_limit() {
        let c = container("name: x\nresources: {requests: {cpu: 2500m}, limits: {cpu: '4'}}");
        assert_eq!(ray_resources(&c, None).get("CPU"), Some(&3.0));
        let c = container("name: x\nresources: {requests: {cpu: '8'}, limits: {cpu: '2'}}");
        assert_eq!(ray_resources(&c, None).get("CPU"), Some(&2.0));
    }

    #[test]
    fn gpu_from_vendor_resource_and_ray_resources_override() {
        let c = container("name: x\nresources: {limits: {nvidia.com/gpu: '2', memory: 1Gi}}");
        let r = ray_resources(&c, Some(&BTreeMap::from([("GPU".to_string(), 1.0)])));
        assert_eq!(r.get("GPU"), Some(&1.0));
        assert_eq!(r.get("memory"), Some(&1073741824.0));
        assert_eq!(r.get("CPU"), None);
    }

    #[test]
    fn no_resources_no_entries() {
        assert!(ray_resources(&container("name: x"), None).is_empty());
    }
}
