//! The reference-fixture format: the `bench_N*.json` inputs written by Ray's
//! `bench_ray_scheduler.py` (copied to `tests/fixtures/ray/`), their conversion
//! into a [`DecisionInput`], and the `{"nodes_to_launch", "unfulfilled"}` output
//! that script records as Ray's answer. `ray-operator plan FILE` prints
//! [`plan_from_json`]'s result, so anyone can put a cluster snapshot through the
//! same decision the operator makes.
//!
//! The conversion mirrors the script's `v1_setup`, including its dict semantics:
//! nodes are looked up by `id` and their resources by `ip` (a later entry wins),
//! `kind == "head"` marks the head. The output mirrors its `count_shapes`: the
//! unfulfilled demands are grouped by their `json.dumps(..., sort_keys=True)`
//! text and listed in the order of that text — so `{"CPU": 1}` and `{"CPU": 1.0}`
//! are separate groups, as they are for Python.
//!
//! Two optional fields go beyond what the script feeds Ray (the script always
//! passes no placement groups, and every node as connected); they let the same
//! format describe those cases, and are absent from the Ray fixtures:
//! * `nodes[].connected` (default `true`): `false` leaves the node out of
//!   `unused_resources_by_ip`, i.e. it is still pending;
//! * `pending_placement_groups`: `[{"strategy": "PACK" | "SPREAD" |
//!   "STRICT_PACK" | "STRICT_SPREAD", "bundles": [{"resources": {...},
//!   "placed": false}]}]`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::marker::PhantomData;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Number, Value};

use super::decision::{
    self, DecisionError, DecisionInput, ExistingNode, NodeTypeConfig, PlacementGroup, PlacementGroupBundle,
    PlacementStrategy, ResourceMap,
};

/// A resource dict as written in the fixture, keeping each number's JSON form
/// (Python's `json` keeps `1` an int and `1.0` a float, which shows in the output).
pub type JsonResources = BTreeMap<String, Number>;

/// A JSON object read in document order, with Python dict semantics for a
/// repeated key (first position, last value). Node types and launching nodes
/// need this: their order decides Ray's packing order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OrderedObject<V>(pub Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedObject<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OrderedVisitor<V>(PhantomData<V>);

        impl<'de, V: Deserialize<'de>> Visitor<'de> for OrderedVisitor<V> {
            type Value = OrderedObject<V>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries: Vec<(String, V)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    match entries.iter_mut().find(|(name, _)| *name == k) {
                        Some(slot) => slot.1 = v,
                        None => entries.push((k, v)),
                    }
                }
                Ok(OrderedObject(entries))
            }
        }

        deserializer.deserialize_map(OrderedVisitor(PhantomData))
    }
}

/// One `node_types` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NodeTypeJson {
    /// Resources of one empty node of this type.
    pub resources: JsonResources,
    /// `min_workers` (Ray's default: 0).
    #[serde(default)]
    pub min_workers: u32,
    /// `max_workers` (Ray's default: 0).
    #[serde(default)]
    pub max_workers: u32,
}

/// One `nodes` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NodeJson {
    /// Provider node id.
    pub id: String,
    /// Internal IP: Ray keys node resources by it.
    pub ip: String,
    /// The node's type (`ray-user-node-type` tag).
    pub node_type: String,
    /// `"head"` or anything else (a worker).
    pub kind: String,
    /// Total resources (`max_resources_by_ip`).
    #[serde(default)]
    pub total: JsonResources,
    /// Available resources (`unused_resources_by_ip`).
    #[serde(default)]
    pub available: JsonResources,
    /// Extension: `false` for a node that is not connected to Ray yet.
    #[serde(default = "default_true")]
    pub connected: bool,
}

fn default_true() -> bool {
    true
}

/// Placement strategy names, as in Ray's `common.proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum StrategyJson {
    /// `PACK`.
    #[serde(rename = "PACK")]
    Pack,
    /// `SPREAD`.
    #[serde(rename = "SPREAD")]
    Spread,
    /// `STRICT_PACK`.
    #[serde(rename = "STRICT_PACK")]
    StrictPack,
    /// `STRICT_SPREAD`.
    #[serde(rename = "STRICT_SPREAD")]
    StrictSpread,
}

/// One placement-group bundle (extension).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BundleJson {
    /// The bundle's `unit_resources`.
    pub resources: JsonResources,
    /// Whether the bundle already has a node.
    #[serde(default)]
    pub placed: bool,
}

/// One pending placement group (extension).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PlacementGroupJson {
    /// The group's strategy.
    pub strategy: StrategyJson,
    /// The group's bundles.
    pub bundles: Vec<BundleJson>,
}

/// A whole `bench_N*.json` input. Unknown fields (`seed`, `idle_timeout_s`, a
/// node's `idle_duration_ms`) are ignored: the v1 decision does not read them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BenchInput {
    /// Node types in configuration order.
    pub node_types: OrderedObject<NodeTypeJson>,
    /// The head node's type.
    pub head_node_type: String,
    /// Global `max_workers`.
    pub max_workers: u32,
    /// `upscaling_speed`.
    pub upscaling_speed: f64,
    /// Existing nodes, in provider order.
    pub nodes: Vec<NodeJson>,
    /// Launching nodes per type.
    #[serde(default)]
    pub launching_nodes: OrderedObject<u32>,
    /// Pending placement groups (extension; empty in Ray's fixtures).
    #[serde(default)]
    pub pending_placement_groups: Vec<PlacementGroupJson>,
    /// `request_resources()` bundles.
    #[serde(default)]
    pub request_resources: Vec<JsonResources>,
    /// Pending task/actor demands.
    #[serde(default)]
    pub demands: Vec<JsonResources>,
}

/// The decision in the fixture's output shape, which is also what
/// `ray-operator plan` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanOutput {
    /// Node type → nodes to launch.
    pub nodes_to_launch: BTreeMap<String, u32>,
    /// Unfulfilled demands grouped by shape, ordered like Ray's harness does.
    pub unfulfilled: Vec<UnfulfilledShape>,
}

/// One group of unfulfilled demands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnfulfilledShape {
    /// The demand, with its numbers as written in the input.
    pub shape: Map<String, Value>,
    /// How many demands of this shape are unfulfilled.
    pub count: u64,
}

impl PlanOutput {
    /// The output as a JSON value.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// Why a fixture could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The text is not a valid fixture.
    #[error("invalid fixture JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A number cannot be represented as an `f64`.
    #[error("{0}: a number is not representable as a 64-bit float")]
    InvalidNumber(String),
    /// The decision rejected the input.
    #[error(transparent)]
    Decision(#[from] DecisionError),
}

/// Parses a fixture and returns the decision Ray's `get_nodes_to_launch` makes
/// for it, with the fixture's own `upscaling_speed`.
pub fn plan_from_json(text: &str) -> Result<PlanOutput, PlanError> {
    let input: BenchInput = serde_json::from_str(text)?;
    plan(&input, None)
}

/// Like [`plan_from_json`] but with another `upscaling_speed`; pass
/// [`decision::UNCAPPED_UPSCALING_SPEED`] for the harness's "uncapped" answer.
pub fn plan_from_json_with_upscaling_speed(text: &str, upscaling_speed: f64) -> Result<PlanOutput, PlanError> {
    let input: BenchInput = serde_json::from_str(text)?;
    plan(&input, Some(upscaling_speed))
}

/// Runs the decision on a parsed fixture and formats the answer like the harness.
pub fn plan(input: &BenchInput, upscaling_speed: Option<f64>) -> Result<PlanOutput, PlanError> {
    let mut decision_input = input.to_decision_input()?;
    if let Some(speed) = upscaling_speed {
        decision_input.upscaling_speed = speed;
    }
    let decision = decision::get_nodes_to_launch(&decision_input)?;
    Ok(PlanOutput {
        nodes_to_launch: decision.nodes_to_launch,
        unfulfilled: group_unfulfilled(input, &decision_input, &decision.unfulfilled),
    })
}

impl BenchInput {
    /// Converts the fixture the way `bench_ray_scheduler.v1_setup` feeds Ray.
    pub fn to_decision_input(&self) -> Result<DecisionInput, PlanError> {
        let node_types = self
            .node_types
            .0
            .iter()
            .map(|(name, t)| {
                Ok(NodeTypeConfig {
                    name: name.clone(),
                    resources: to_resource_map(&t.resources, || format!("node_types[{name:?}].resources"))?,
                    min_workers: t.min_workers,
                    max_workers: t.max_workers,
                })
            })
            .collect::<Result<Vec<_>, PlanError>>()?;

        // FakeProvider's tags and IPs are dicts keyed by node id, and Ray's resource
        // maps are dicts keyed by IP: later entries win.
        let mut by_id: HashMap<&str, &NodeJson> = HashMap::new();
        let mut available_by_ip: HashMap<&str, &JsonResources> = HashMap::new();
        let mut total_by_ip: HashMap<&str, &JsonResources> = HashMap::new();
        for n in &self.nodes {
            by_id.insert(n.id.as_str(), n);
            if n.connected {
                available_by_ip.insert(n.ip.as_str(), &n.available);
            }
            total_by_ip.insert(n.ip.as_str(), &n.total);
        }
        let mut nodes = Vec::with_capacity(self.nodes.len());
        for (i, listed) in self.nodes.iter().enumerate() {
            let n = by_id.get(listed.id.as_str()).copied().unwrap_or(listed);
            let ip = n.ip.as_str();
            let available = match available_by_ip.get(ip) {
                Some(r) => Some(to_resource_map(r, || format!("nodes[{i}].available"))?),
                None => None,
            };
            let total = match total_by_ip.get(ip) {
                Some(r) => Some(to_resource_map(r, || format!("nodes[{i}].total"))?),
                None => None,
            };
            nodes.push(ExistingNode {
                node_type: n.node_type.clone(),
                is_head: n.kind == "head",
                total_resources: total,
                available_resources: available,
            });
        }

        let placement_groups = self
            .pending_placement_groups
            .iter()
            .enumerate()
            .map(|(i, pg)| {
                let bundles = pg
                    .bundles
                    .iter()
                    .enumerate()
                    .map(|(j, b)| {
                        Ok(PlacementGroupBundle {
                            resources: to_resource_map(&b.resources, || {
                                format!("pending_placement_groups[{i}].bundles[{j}]")
                            })?,
                            placed: b.placed,
                        })
                    })
                    .collect::<Result<Vec<_>, PlanError>>()?;
                let strategy = match pg.strategy {
                    StrategyJson::Pack => PlacementStrategy::Pack,
                    StrategyJson::Spread => PlacementStrategy::Spread,
                    StrategyJson::StrictPack => PlacementStrategy::StrictPack,
                    StrategyJson::StrictSpread => PlacementStrategy::StrictSpread,
                };
                Ok(PlacementGroup { strategy, bundles })
            })
            .collect::<Result<Vec<_>, PlanError>>()?;

        let demands = self
            .demands
            .iter()
            .enumerate()
            .map(|(i, d)| to_resource_map(d, || format!("demands[{i}]")))
            .collect::<Result<Vec<_>, PlanError>>()?;
        let request_resources = self
            .request_resources
            .iter()
            .enumerate()
            .map(|(i, d)| to_resource_map(d, || format!("request_resources[{i}]")))
            .collect::<Result<Vec<_>, PlanError>>()?;

        Ok(DecisionInput {
            node_types,
            head_node_type: self.head_node_type.clone(),
            max_workers: self.max_workers,
            upscaling_speed: self.upscaling_speed,
            nodes,
            launching_nodes: self.launching_nodes.0.clone(),
            resource_demands: demands,
            placement_groups,
            request_resources,
        })
    }
}

fn to_resource_map(map: &JsonResources, context: impl Fn() -> String) -> Result<ResourceMap, PlanError> {
    map.iter()
        .map(|(k, v)| match v.as_f64() {
            Some(f) => Ok((k.clone(), f)),
            None => Err(PlanError::InvalidNumber(format!("{} [{k:?}]", context()))),
        })
        .collect()
}

/// Dict-equality key of a shape: Python's `{"CPU": 1} == {"CPU": 1.0}` and
/// `0.0 == -0.0`.
fn value_key(shape: &ResourceMap) -> Vec<(String, u64)> {
    shape.iter().map(|(k, v)| (k.clone(), (v + 0.0).to_bits())).collect()
}

/// One demand as the harness's `count_shapes` sees it: its `json.dumps` text and
/// its parsed JSON.
struct Occurrence {
    text: String,
    shape: Map<String, Value>,
}

/// Reproduces `count_shapes(final_unfulfilled)`. The decision reports each
/// unfulfilled shape with a count, and guarantees those are the *last* `count`
/// demands of that shape in Ray's demand vector (placement-group demands, then
/// task demands); this picks them, so that the int/float spelling of each one is
/// known, then groups and orders them by their JSON text as the script does.
fn group_unfulfilled(
    input: &BenchInput,
    decision_input: &DecisionInput,
    unfulfilled: &[decision::UnfulfilledDemand],
) -> Vec<UnfulfilledShape> {
    if unfulfilled.is_empty() {
        return Vec::new();
    }
    let mut occurrences: HashMap<Vec<(String, u64)>, Vec<Occurrence>> = HashMap::new();
    // Placement-group bundles reach Ray as protobuf doubles: always floats.
    let (pg_vector, _) = decision::placement_groups_to_resource_demands(&decision_input.placement_groups);
    for shape in &pg_vector {
        occurrences.entry(value_key(shape)).or_default().push(float_occurrence(shape));
    }
    for (json, shape) in input.demands.iter().zip(&decision_input.resource_demands) {
        occurrences.entry(value_key(shape)).or_default().push(json_occurrence(json));
    }

    let mut groups: BTreeMap<String, UnfulfilledShape> = BTreeMap::new();
    for u in unfulfilled {
        let picked: Vec<Occurrence> = match occurrences.get_mut(&value_key(&u.shape)) {
            Some(list) => {
                let keep = list.len().saturating_sub(usize::try_from(u.count).unwrap_or(usize::MAX));
                list.split_off(keep)
            }
            None => Vec::new(),
        };
        let mut accounted = 0u64;
        for occ in picked {
            accounted += 1;
            groups.entry(occ.text).or_insert_with(|| UnfulfilledShape { shape: occ.shape, count: 0 }).count += 1;
        }
        if accounted < u.count {
            // Not traceable to an input demand (cannot happen for decisions made
            // from this input); report it with float spelling.
            let occ = float_occurrence(&u.shape);
            groups.entry(occ.text).or_insert_with(|| UnfulfilledShape { shape: occ.shape, count: 0 }).count +=
                u.count - accounted;
        }
    }
    groups.into_values().collect()
}

fn float_occurrence(shape: &ResourceMap) -> Occurrence {
    let mut text = String::from("{");
    let mut map = Map::new();
    for (i, (k, v)) in shape.iter().enumerate() {
        if i > 0 {
            text.push_str(", ");
        }
        text.push_str(&python_json_string(k));
        text.push_str(": ");
        text.push_str(&python_float_repr(*v));
        map.insert(k.clone(), Number::from_f64(*v).map_or(Value::Null, Value::Number));
    }
    text.push('}');
    Occurrence { text, shape: map }
}

fn json_occurrence(shape: &JsonResources) -> Occurrence {
    let mut text = String::from("{");
    let mut map = Map::new();
    for (i, (k, v)) in shape.iter().enumerate() {
        if i > 0 {
            text.push_str(", ");
        }
        text.push_str(&python_json_string(k));
        text.push_str(": ");
        text.push_str(&python_number_repr(v));
        map.insert(k.clone(), Value::Number(v.clone()));
    }
    text.push('}');
    Occurrence { text, shape: map }
}

/// How Python's `json.dumps` writes a number that `json.loads` read from `n`:
/// integers stay integers, everything else is a float.
pub fn python_number_repr(n: &Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    python_float_repr(n.as_f64().unwrap_or(f64::NAN))
}

/// Python's `repr(float)` (what `json.dumps` writes): the shortest digits that
/// round-trip, in positional notation for exponents -5 < e < 16 and with a
/// `.0` for integral values, in scientific notation (`1e+16`, `1e-05`) otherwise.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.to_string();
    }
    // Rust's `{:e}` also prints the shortest round-trip digits: "d.ddde-N".
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if x < 0.0 { "-" } else { "" };
    if (-5 < exp) && (exp < 16) {
        if exp >= 0 {
            let point = usize::try_from(exp).unwrap_or(0) + 1;
            if digits.len() <= point {
                format!("{sign}{digits}{}.0", "0".repeat(point - digits.len()))
            } else {
                format!("{sign}{}.{}", &digits[..point], &digits[point..])
            }
        } else {
            let zeros = usize::try_from(-exp - 1).unwrap_or(0);
            format!("{sign}0.{}{digits}", "0".repeat(zeros))
        }
    } else {
        let (first, rest) = digits.split_at(1.min(digits.len()));
        let frac = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.unsigned_abs())
    }
}

/// A string as Python's `json.dumps` (with `ensure_ascii=True`) writes it.
pub fn python_json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Structural JSON equality where numbers compare by value (`1 == 1.0`), for
/// checking a [`PlanOutput`] against Ray's expected JSON.
pub fn json_values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => match (x.as_u64(), y.as_u64()) {
                (Some(i), Some(j)) => i == j,
                _ => x.as_f64() == y.as_f64() && x.as_f64().is_some(),
            },
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_values_equal(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_values_equal(v, w)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        // (value, Python's json.dumps(value))
        let cases: &[(f64, &str)] = &[
            (0.5, "0.5"),
            (1.0, "1.0"),
            (2147483648.0, "2147483648.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (123456789012345.6, "123456789012345.6"),
            (1234567890123456.0, "1234567890123456.0"),
            (12345678901234567.0, "1.2345678901234568e+16"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1e-7, "1e-07"),
            (-2.5, "-2.5"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (-0.0, "-0.0"),
            (100.0, "100.0"),
            (0.3, "0.3"),
        ];
        for (v, want) in cases {
            assert_eq!(python_float_repr(*v), *want, "{v:e}");
        }
    }

    #[test]
    fn json_strings_match_python_ensure_ascii() {
        assert_eq!(python_json_string("a\"b\\c\n\u{1}\u{7f} é 𝄞"), r#""a\"b\\c\n\u0001\u007f \u00e9 \ud834\udd1e""#);
    }

    #[test]
    fn ordered_object_keeps_document_order_and_python_duplicates() {
        let o: OrderedObject<u32> = serde_json::from_str(r#"{"z": 1, "a": 2, "z": 3}"#).unwrap();
        assert_eq!(o.0, vec![("z".to_string(), 3), ("a".to_string(), 2)]);
    }

    const MIXED: &str = r#"{"node_types":{"head":{"resources":{"CPU":0},"min_workers":0,"max_workers":0},
        "cpu":{"resources":{"CPU":1},"min_workers":0,"max_workers":0}},"head_node_type":"head",
        "max_workers":5,"upscaling_speed":1,
        "nodes":[{"id":"h","ip":"1","node_type":"head","kind":"head","total":{"CPU":0},"available":{"CPU":0}},
                 {"id":"w","ip":"2","node_type":"cpu","kind":"worker","total":{"CPU":1},"available":{"CPU":1}}],
        "launching_nodes":{},"pending_placement_groups":[],"request_resources":[],
        "demands":[{"CPU":1},{"CPU":1.0},{"CPU":1},{"CPU":0.5,"GPU":1e-05},{"CPU":1e16}]}"#;

    #[test]
    fn unfulfilled_keeps_python_int_float_spelling_and_order() {
        // Ray 2.60.0 through bench_ray_scheduler.py's count_shapes: the first
        // {"CPU": 1} fits, the later {"CPU": 1.0} and {"CPU": 1} do not, and the
        // groups are ordered by their json.dumps text.
        let want: Value = serde_json::from_str(
            r#"{"nodes_to_launch": {}, "unfulfilled": [
                {"shape": {"CPU": 0.5, "GPU": 1e-05}, "count": 1},
                {"shape": {"CPU": 1.0}, "count": 1},
                {"shape": {"CPU": 1e+16}, "count": 1},
                {"shape": {"CPU": 1}, "count": 1}]}"#,
        )
        .unwrap();
        let got = plan_from_json(MIXED).unwrap().to_value();
        // Exact, not just numerically equal: ints stay ints.
        assert_eq!(got, want);
        assert_eq!(got.to_string(), want.to_string());
    }

    #[test]
    fn numeric_equality_ignores_int_float_spelling() {
        let a: Value = serde_json::from_str(r#"{"x": [1, 2.5], "y": {"z": 3}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"y": {"z": 3.0}, "x": [1.0, 2.5]}"#).unwrap();
        let c: Value = serde_json::from_str(r#"{"y": {"z": 3.5}, "x": [1.0, 2.5]}"#).unwrap();
        assert!(json_values_equal(&a, &b));
        assert!(!json_values_equal(&a, &c));
    }

    #[test]
    fn disconnected_nodes_and_placement_groups_convert() {
        let text = MIXED
            .replace(r#""kind":"worker","#, r#""kind":"worker","connected":false,"#)
            .replace(
                r#""pending_placement_groups":[]"#,
                r#""pending_placement_groups":[{"strategy":"STRICT_SPREAD","bundles":[{"resources":{"CPU":1}},{"resources":{"CPU":1},"placed":true}]}]"#,
            );
        let input: BenchInput = serde_json::from_str(&text).unwrap();
        let d = input.to_decision_input().unwrap();
        assert_eq!(d.nodes[1].available_resources, None);
        assert_eq!(d.nodes[1].total_resources, Some(ResourceMap::from([("CPU".to_string(), 1.0)])));
        assert_eq!(d.placement_groups[0].strategy, PlacementStrategy::StrictSpread);
        assert!(d.placement_groups[0].bundles[1].placed);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(plan_from_json("{"), Err(PlanError::Json(_))));
        assert!(matches!(plan_from_json("{}"), Err(PlanError::Json(_))));
    }
}
