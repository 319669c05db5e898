//! The GCS's `ClusterResourceState` as plain Rust data, and its conversion from the protobuf.
//!
//! Why a separate type: the autoscaler's decision, its logs and its tests should not depend on
//! generated protobuf structs (raw node-id bytes, `i32` enums, `Option`al sub-messages, a
//! deprecated field next to its replacement). The conversion settles those once, here:
//! node ids become hex, statuses an enum, placement groups a strategy plus their bundles.

use std::collections::BTreeMap;

use super::proto;
use crate::model::resources::{PlacementStrategy, ResourceMap};

/// The resource only the head node has (Ray's `HEAD_NODE_RESOURCE_NAME`). It is how the head is
/// recognised: the GCS does not protect the head from `DrainNode`, so the autoscaler must never
/// drain a node that carries it.
pub const HEAD_NODE_RESOURCE: &str = "node:__internal_head__";

/// The prefix of the label the GCS uses in placement constraints: `_PG_<placement group hex>`.
const PG_LABEL_PREFIX: &str = "_PG_";

/// One snapshot of the cluster as the GCS sees it (`ClusterResourceState`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterState {
    /// `cluster_resource_state_version`. The GCS increments it on every read (also on
    /// `GetClusterStatus`), and it restarts from 0 when the GCS restarts.
    pub version: i64,
    /// `last_seen_autoscaler_state_version` (Ray 2.60 always sends 0).
    pub last_seen_autoscaler_state_version: i64,
    /// `cluster_session_name`, e.g. `session_2026-11-27_14-21-20_700453_13184`. It changes when
    /// the head (and so the GCS) restarts: a cheap way to notice that the cluster was recreated.
    pub session_name: String,
    /// Every node the GCS knows, alive and dead, in the GCS's order.
    pub nodes: Vec<RayNode>,
    /// Pending tasks and actors, grouped by shape (one entry per distinct shape and label
    /// selectors). Includes infeasible shapes: deciding feasibility is the autoscaler's job.
    pub pending_resource_requests: Vec<ResourceDemand>,
    /// Pending placement groups, with only their unplaced bundles. Entries without bundles,
    /// which the GCS sends for placement groups that are already placed, are dropped.
    pub pending_gang_requests: Vec<GangRequest>,
    /// What `request_resources()` asks the cluster to be able to hold at once. The GCS keeps at
    /// most one (the last request replaces the previous one); `request_resources(bundles=[])`
    /// leaves one with no requests.
    pub cluster_resource_constraints: Vec<ResourceConstraint>,
}

impl ClusterState {
    /// The alive head node, if the GCS lists one.
    pub fn head(&self) -> Option<&RayNode> {
        self.nodes.iter().find(|n| n.status != NodeStatus::Dead && n.is_head())
    }

    /// The node with this hex node id.
    pub fn node(&self, node_id: &str) -> Option<&RayNode> {
        self.nodes.iter().find(|n| n.node_id == node_id)
    }
}

/// One node (`NodeState`). A dead node carries only its id, status and IP address.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RayNode {
    /// The node id in lower-case hex (56 characters for Ray's 28-byte ids), as in the node's
    /// `ray.io/node-id` label and in `ray status`.
    pub node_id: String,
    /// The raylet's `RAY_CLOUD_INSTANCE_ID`: the pod name for pods the operator created. Empty
    /// when the variable was not set.
    pub instance_id: String,
    /// The raylet's `RAY_NODE_TYPE_NAME`: the pod type. Empty when the variable was not set.
    pub ray_node_type_name: String,
    /// Running, idle, draining or dead.
    pub status: NodeStatus,
    /// The node's resources when empty.
    pub total_resources: ResourceMap,
    /// The resources not currently in use. A resource that is fully used may be missing.
    pub available_resources: ResourceMap,
    /// How long the node has been idle; meaningful only when `status` is [`NodeStatus::Idle`].
    pub idle_duration_ms: i64,
    /// The raylet's address.
    pub ip_address: String,
    /// Why the node is busy, e.g. "Resource: CPU currently in use." (may lag the status).
    pub activity: Vec<String>,
    /// Node labels: `ray.io/node-id`, `ray.io/node-group`, and user labels.
    pub labels: BTreeMap<String, String>,
}

impl RayNode {
    /// Whether this is the head node (it carries [`HEAD_NODE_RESOURCE`]). A dead node has no
    /// resources, so a dead head is not recognised; it cannot be drained anyway.
    pub fn is_head(&self) -> bool {
        self.total_resources.contains_key(HEAD_NODE_RESOURCE)
            || self.available_resources.contains_key(HEAD_NODE_RESOURCE)
    }
}

/// A node's status as the GCS derives it (`NodeStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NodeStatus {
    /// Not set.
    #[default]
    Unspecified,
    /// Alive and busy (or not reported idle yet).
    Running,
    /// The GCS marked it dead.
    Dead,
    /// Alive with nothing to do for [`RayNode::idle_duration_ms`].
    Idle,
    /// Accepted a drain request and will exit once empty.
    Draining,
    /// A status value this operator does not know (a newer Ray).
    Unknown(i32),
}

impl NodeStatus {
    fn from_proto(value: i32) -> Self {
        match proto::NodeStatus::try_from(value) {
            Ok(proto::NodeStatus::Unspecified) => NodeStatus::Unspecified,
            Ok(proto::NodeStatus::Running) => NodeStatus::Running,
            Ok(proto::NodeStatus::Dead) => NodeStatus::Dead,
            Ok(proto::NodeStatus::Idle) => NodeStatus::Idle,
            Ok(proto::NodeStatus::Draining) => NodeStatus::Draining,
            Err(_) => NodeStatus::Unknown(value),
        }
    }

    /// A short lower-case name for logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            NodeStatus::Unspecified => "unspecified",
            NodeStatus::Running => "running",
            NodeStatus::Dead => "dead",
            NodeStatus::Idle => "idle",
            NodeStatus::Draining => "draining",
            NodeStatus::Unknown(_) => "unknown",
        }
    }
}

/// `count` identical resource requests (`ResourceRequestByCount`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResourceDemand {
    /// The resources one request needs, e.g. `{"CPU": 4.0}`. A task that waits for its
    /// placement group to be placed asks for the group's resources (`CPU_group_<pg hex>`, see
    /// [`is_placement_group_resource`]); no new node can ever provide those.
    pub shape: ResourceMap,
    /// How many requests have this shape.
    pub count: u64,
    /// Label selectors (a fallback list, the first that matches wins). The GCS sends one empty
    /// selector for plain requests; empty selectors are dropped here.
    pub label_selectors: Vec<LabelSelector>,
}

impl ResourceDemand {
    /// Whether the shape asks for placement-group resources, i.e. it is a task waiting for its
    /// placement group rather than for a node. Ray's autoscaler passes such demands to the
    /// decision (they only fit nodes that hold the group) but does not warn about them; they
    /// should not be reported as infeasible either.
    pub fn involves_placement_group(&self) -> bool {
        self.shape.keys().any(|k| is_placement_group_resource(k))
    }
}

/// Whether a resource name is a placement-group resource (`CPU_group_<pg hex>` or
/// `CPU_group_<bundle index>_<pg hex>`), with the same test as Ray's
/// `is_placement_group_resource` (a `_group_` followed by an alphanumeric character, anywhere
/// after the first character).
pub fn is_placement_group_resource(name: &str) -> bool {
    const MARK: &str = "_group_";
    name.match_indices(MARK)
        .any(|(i, _)| i > 0 && name[i + MARK.len()..].chars().next().is_some_and(|c| c.is_ascii_alphanumeric()))
}

/// One `ray.rpc.LabelSelector`: all constraints must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    /// The constraints.
    pub constraints: Vec<LabelConstraint>,
}

/// One `ray.rpc.LabelSelectorConstraint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelConstraint {
    /// The label's key.
    pub key: String,
    /// `in` or `!in`.
    pub operator: LabelOperator,
    /// The values.
    pub values: Vec<String>,
}

/// `ray.rpc.LabelSelectorOperator`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelOperator {
    /// Not set (or unknown to this operator).
    Unspecified,
    /// The label's value is one of the values.
    In,
    /// The label's value is none of the values.
    NotIn,
}

/// A pending placement group (`GangResourceRequest`): all its bundles must be placed at once.
#[derive(Debug, Clone, PartialEq)]
pub struct GangRequest {
    /// The placement group id in hex, from `details` or from the `_PG_<hex>` constraint label.
    pub placement_group_id: String,
    /// How the bundles must be placed. STRICT_SPREAD is recognised by the anti-affinity
    /// constraint the GCS attaches to every bundle, STRICT_PACK by the affinity constraint;
    /// PACK and SPREAD carry no constraint and are read from `details` (PACK if it says
    /// nothing). The decision treats PACK and SPREAD alike.
    pub strategy: PlacementStrategy,
    /// The group's state from `details`: `PENDING` or `RESCHEDULING` (empty if absent).
    pub state: String,
    /// The raw `details` string, `<pg hex>:<STRATEGY>|<STATE>`.
    pub details: String,
    /// The unplaced bundles, in bundle order.
    pub bundles: Vec<ResourceMap>,
}

/// One cluster resource constraint (`request_resources()`): the cluster should be able to hold
/// all these requests at once, whatever it runs now.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResourceConstraint {
    /// The requested bundles, by count.
    pub requests: Vec<ResourceDemand>,
}

/// Why a reply could not be turned into plain data (reported as [`super::RayError::Decode`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct InvalidReply(pub String);

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Parses a hex node id (either case). `None` if it is not an even number of hex digits.
pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks_exact(2)
        .map(|pair| {
            let hi = char::from(pair[0]).to_digit(16)?;
            let lo = char::from(pair[1]).to_digit(16)?;
            u8::try_from(hi * 16 + lo).ok()
        })
        .collect()
}

impl ClusterState {
    pub(crate) fn from_proto(state: proto::ClusterResourceState) -> Result<Self, InvalidReply> {
        let nodes = state.node_states.into_iter().map(RayNode::from_proto).collect();
        let pending_resource_requests = state
            .pending_resource_requests
            .into_iter()
            .enumerate()
            .map(|(i, r)| ResourceDemand::from_proto(r, || format!("pending_resource_requests[{i}]")))
            .collect::<Result<_, _>>()?;
        let pending_gang_requests =
            state.pending_gang_resource_requests.into_iter().filter_map(GangRequest::from_proto).collect();
        let cluster_resource_constraints = state
            .cluster_resource_constraints
            .into_iter()
            .enumerate()
            .map(|(i, c)| ResourceConstraint::from_proto(c, &format!("cluster_resource_constraints[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(ClusterState {
            version: state.cluster_resource_state_version,
            last_seen_autoscaler_state_version: state.last_seen_autoscaler_state_version,
            session_name: state.cluster_session_name,
            nodes,
            pending_resource_requests,
            pending_gang_requests,
            cluster_resource_constraints,
        })
    }
}

impl RayNode {
    fn from_proto(n: proto::NodeState) -> Self {
        RayNode {
            node_id: hex(&n.node_id),
            instance_id: n.instance_id,
            ray_node_type_name: n.ray_node_type_name,
            status: NodeStatus::from_proto(n.status),
            total_resources: n.total_resources,
            available_resources: n.available_resources,
            idle_duration_ms: n.idle_duration_ms,
            ip_address: n.node_ip_address,
            activity: n.node_activity,
            labels: n.labels,
        }
    }
}

impl ResourceDemand {
    fn from_proto(r: proto::ResourceRequestByCount, context: impl Fn() -> String) -> Result<Self, InvalidReply> {
        let count =
            u64::try_from(r.count).map_err(|_| InvalidReply(format!("{}: negative count {}", context(), r.count)))?;
        let request = r.request.unwrap_or_default();
        Ok(ResourceDemand {
            shape: request.resources_bundle,
            count,
            label_selectors: Self::from_proto_selectors(request.label_selectors),
        })
    }

    /// Drops the empty selectors the GCS attaches to every plain request.
    pub(crate) fn from_proto_selectors(selectors: Vec<proto::LabelSelector>) -> Vec<LabelSelector> {
        selectors.into_iter().filter(|s| !s.label_constraints.is_empty()).map(LabelSelector::from_proto).collect()
    }

    pub(crate) fn to_proto(&self) -> proto::ResourceRequestByCount {
        proto::ResourceRequestByCount {
            request: Some(proto::ResourceRequest {
                resources_bundle: self.shape.clone(),
                placement_constraints: Vec::new(),
                label_selectors: self.label_selectors.iter().map(LabelSelector::to_proto).collect(),
            }),
            count: i64::try_from(self.count).unwrap_or(i64::MAX),
        }
    }
}

impl LabelSelector {
    fn from_proto(s: proto::LabelSelector) -> Self {
        LabelSelector {
            constraints: s
                .label_constraints
                .into_iter()
                .map(|c| LabelConstraint {
                    key: c.label_key,
                    operator: match proto::LabelSelectorOperator::try_from(c.operator) {
                        Ok(proto::LabelSelectorOperator::LabelOperatorIn) => LabelOperator::In,
                        Ok(proto::LabelSelectorOperator::LabelOperatorNotIn) => LabelOperator::NotIn,
                        _ => LabelOperator::Unspecified,
                    },
                    values: c.label_values,
                })
                .collect(),
        }
    }

    pub(crate) fn to_proto(&self) -> proto::LabelSelector {
        proto::LabelSelector {
            label_constraints: self
                .constraints
                .iter()
                .map(|c| proto::LabelSelectorConstraint {
                    label_key: c.key.clone(),
                    operator: match c.operator {
                        LabelOperator::Unspecified => proto::LabelSelectorOperator::LabelOperatorUnspecified,
                        LabelOperator::In => proto::LabelSelectorOperator::LabelOperatorIn,
                        LabelOperator::NotIn => proto::LabelSelectorOperator::LabelOperatorNotIn,
                    } as i32,
                    label_values: c.values.clone(),
                })
                .collect(),
        }
    }
}

impl ResourceConstraint {
    fn from_proto(c: proto::ClusterResourceConstraint, context: &str) -> Result<Self, InvalidReply> {
        let requests = c
            .resource_requests
            .into_iter()
            .enumerate()
            .map(|(i, r)| ResourceDemand::from_proto(r, || format!("{context}.resource_requests[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(ResourceConstraint { requests })
    }

    pub(crate) fn to_proto(&self) -> proto::ClusterResourceConstraint {
        proto::ClusterResourceConstraint {
            resource_requests: self.requests.iter().map(ResourceDemand::to_proto).collect(),
        }
    }
}

fn strategy_name(s: PlacementStrategy) -> &'static str {
    match s {
        PlacementStrategy::Pack => "PACK",
        PlacementStrategy::Spread => "SPREAD",
        PlacementStrategy::StrictPack => "STRICT_PACK",
        PlacementStrategy::StrictSpread => "STRICT_SPREAD",
    }
}

impl GangRequest {
    /// `None` for an entry without bundles (a placement group that is already placed: the GCS
    /// adds the entry before it checks the group's state).
    pub(crate) fn from_proto(g: proto::GangResourceRequest) -> Option<Self> {
        // Prefer the current field, fall back to the deprecated one (what Ray's v2 scheduler does).
        let requests = match g.bundle_selectors.into_iter().next() {
            Some(selector) if !selector.resource_requests.is_empty() => selector.resource_requests,
            _ => g.requests,
        };
        if requests.is_empty() {
            return None;
        }
        let mut anti_affinity = None;
        let mut affinity = None;
        for c in requests.iter().flat_map(|r| &r.placement_constraints) {
            if let Some(a) = &c.anti_affinity {
                anti_affinity.get_or_insert(a.label_name.clone());
            }
            if let Some(a) = &c.affinity {
                affinity.get_or_insert(a.label_name.clone());
            }
        }
        // details = "<pg hex>:<STRATEGY>|<STATE>"
        let (details_id, rest) = g.details.split_once(':').unwrap_or(("", ""));
        let (details_strategy, state) = rest.split_once('|').unwrap_or((rest, ""));
        let strategy = if anti_affinity.is_some() {
            PlacementStrategy::StrictSpread
        } else if affinity.is_some() {
            PlacementStrategy::StrictPack
        } else {
            match details_strategy {
                "SPREAD" => PlacementStrategy::Spread,
                "STRICT_SPREAD" => PlacementStrategy::StrictSpread,
                "STRICT_PACK" => PlacementStrategy::StrictPack,
                _ => PlacementStrategy::Pack,
            }
        };
        let placement_group_id = if details_id.is_empty() {
            anti_affinity
                .or(affinity)
                .and_then(|label| label.strip_prefix(PG_LABEL_PREFIX).map(str::to_string))
                .unwrap_or_default()
        } else {
            details_id.to_string()
        };
        Some(GangRequest {
            placement_group_id,
            strategy,
            state: state.to_string(),
            bundles: requests.into_iter().map(|r| r.resources_bundle).collect(),
            details: g.details,
        })
    }

    /// The request as the GCS would have sent it (used to report infeasible placement groups).
    pub(crate) fn to_proto(&self) -> proto::GangResourceRequest {
        let label = format!("{PG_LABEL_PREFIX}{}", self.placement_group_id);
        let constraint = match self.strategy {
            PlacementStrategy::StrictSpread => Some(proto::PlacementConstraint {
                anti_affinity: Some(proto::AntiAffinityConstraint { label_name: label, label_value: String::new() }),
                affinity: None,
            }),
            PlacementStrategy::StrictPack => Some(proto::PlacementConstraint {
                anti_affinity: None,
                affinity: Some(proto::AffinityConstraint { label_name: label, label_value: String::new() }),
            }),
            PlacementStrategy::Pack | PlacementStrategy::Spread => None,
        };
        let requests: Vec<proto::ResourceRequest> = self
            .bundles
            .iter()
            .map(|b| proto::ResourceRequest {
                resources_bundle: b.clone(),
                placement_constraints: constraint.iter().cloned().collect(),
                label_selectors: Vec::new(),
            })
            .collect();
        let details = if self.details.is_empty() {
            let state = if self.state.is_empty() { "PENDING" } else { self.state.as_str() };
            format!("{}:{}|{}", self.placement_group_id, strategy_name(self.strategy), state)
        } else {
            self.details.clone()
        };
        proto::GangResourceRequest {
            bundle_selectors: vec![proto::BundleSelector { resource_requests: requests.clone() }],
            requests,
            details,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(items: &[(&str, f64)]) -> ResourceMap {
        items.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn request(items: &[(&str, f64)], constraint: Option<proto::PlacementConstraint>) -> proto::ResourceRequest {
        proto::ResourceRequest {
            resources_bundle: res(items),
            placement_constraints: constraint.into_iter().collect(),
            label_selectors: vec![proto::LabelSelector::default()],
        }
    }

    fn anti(label: &str) -> proto::PlacementConstraint {
        proto::PlacementConstraint {
            anti_affinity: Some(proto::AntiAffinityConstraint { label_name: label.into(), label_value: String::new() }),
            affinity: None,
        }
    }

    fn aff(label: &str) -> proto::PlacementConstraint {
        proto::PlacementConstraint {
            anti_affinity: None,
            affinity: Some(proto::AffinityConstraint { label_name: label.into(), label_value: String::new() }),
        }
    }

    fn gang(details: &str, bundles: Vec<proto::ResourceRequest>) -> proto::GangResourceRequest {
        proto::GangResourceRequest {
            requests: bundles.clone(),
            details: details.into(),
            bundle_selectors: vec![proto::BundleSelector { resource_requests: bundles }],
        }
    }

    /// The probe's phase (b)/(c) reply, rebuilt field by field.
    fn probe_state() -> proto::ClusterResourceState {
        let head_id: Vec<u8> = (0u8..28).collect();
        let spread = "7c4065c8c2f53fdaafd8cf7b0f2501000000";
        let pack = "5f19c6137dd516c4d4a35a9c45f601000000";
        proto::ClusterResourceState {
            cluster_resource_state_version: 221,
            last_seen_autoscaler_state_version: 0,
            node_states: vec![
                proto::NodeState {
                    node_id: head_id,
                    instance_id: "probe-head-pod".into(),
                    ray_node_type_name: "headgroup".into(),
                    available_resources: res(&[("memory", 1e9), (HEAD_NODE_RESOURCE, 1.0)]),
                    total_resources: res(&[("CPU", 1.0), ("memory", 1e9), (HEAD_NODE_RESOURCE, 1.0)]),
                    status: proto::NodeStatus::Running as i32,
                    idle_duration_ms: 0,
                    node_ip_address: "192.0.2.2".into(),
                    node_activity: vec!["Busy workers on node.".into()],
                    labels: [("ray.io/node-group".to_string(), "headgroup".to_string())].into(),
                },
                proto::NodeState {
                    node_id: vec![0xab; 28],
                    status: proto::NodeStatus::Dead as i32,
                    node_ip_address: "192.0.2.3".into(),
                    ..Default::default()
                },
            ],
            pending_resource_requests: vec![
                proto::ResourceRequestByCount { request: Some(request(&[("CPU", 3.0)], None)), count: 1 },
                proto::ResourceRequestByCount { request: Some(request(&[("CPU", 1.0), ("GPU", 1.0)], None)), count: 3 },
                proto::ResourceRequestByCount { request: Some(request(&[("CPU", 4.0)], None)), count: 2 },
            ],
            pending_gang_resource_requests: vec![
                gang(
                    &format!("{spread}:STRICT_SPREAD|PENDING"),
                    vec![request(&[("CPU", 2.0)], Some(anti(&format!("_PG_{spread}")))); 2],
                ),
                gang(
                    &format!("{pack}:STRICT_PACK|PENDING"),
                    vec![request(&[("CPU", 1.0), ("GPU", 1.0)], Some(aff(&format!("_PG_{pack}")))); 2],
                ),
                // A placed group: the GCS still adds an empty entry.
                proto::GangResourceRequest::default(),
                gang("0123:SPREAD|RESCHEDULING", vec![request(&[("CPU", 1.0)], None)]),
                gang("4567:PACK|PENDING", vec![request(&[("CPU", 1.0)], None)]),
            ],
            cluster_resource_constraints: vec![proto::ClusterResourceConstraint {
                resource_requests: vec![proto::ResourceRequestByCount {
                    request: Some(proto::ResourceRequest {
                        resources_bundle: res(&[("CPU", 1.0)]),
                        ..Default::default()
                    }),
                    count: 8,
                }],
            }],
            cluster_session_name: "session_x".into(),
        }
    }

    #[test]
    fn converts_the_probe_reply() {
        let s = ClusterState::from_proto(probe_state()).unwrap();
        assert_eq!(s.version, 221);
        assert_eq!(s.session_name, "session_x");
        assert_eq!(s.nodes.len(), 2);
        let head = &s.nodes[0];
        assert_eq!(head.node_id, hex(&(0u8..28).collect::<Vec<_>>()));
        assert_eq!(head.node_id.len(), 56);
        assert_eq!(head.instance_id, "probe-head-pod");
        assert_eq!(head.ray_node_type_name, "headgroup");
        assert_eq!(head.status, NodeStatus::Running);
        assert!(head.is_head());
        assert_eq!(head.total_resources["CPU"], 1.0);
        assert!(!head.available_resources.contains_key("CPU"));
        assert_eq!(head.labels["ray.io/node-group"], "headgroup");
        assert_eq!(s.head().map(|n| n.node_id.as_str()), Some(head.node_id.as_str()));
        assert_eq!(s.nodes[1].status, NodeStatus::Dead);
        assert!(!s.nodes[1].is_head());
        assert_eq!(s.node(&"ab".repeat(28)).map(|n| n.status), Some(NodeStatus::Dead));

        let demands: Vec<(ResourceMap, u64)> =
            s.pending_resource_requests.iter().map(|d| (d.shape.clone(), d.count)).collect();
        assert_eq!(
            demands,
            vec![(res(&[("CPU", 3.0)]), 1), (res(&[("CPU", 1.0), ("GPU", 1.0)]), 3), (res(&[("CPU", 4.0)]), 2)]
        );
        // The empty label selector the GCS sends with every plain request is dropped.
        assert!(s.pending_resource_requests.iter().all(|d| d.label_selectors.is_empty()));

        let gangs: Vec<(&str, PlacementStrategy, &str, usize)> = s
            .pending_gang_requests
            .iter()
            .map(|g| (g.placement_group_id.as_str(), g.strategy, g.state.as_str(), g.bundles.len()))
            .collect();
        assert_eq!(
            gangs,
            vec![
                ("7c4065c8c2f53fdaafd8cf7b0f2501000000", PlacementStrategy::StrictSpread, "PENDING", 2),
                ("5f19c6137dd516c4d4a35a9c45f601000000", PlacementStrategy::StrictPack, "PENDING", 2),
                ("0123", PlacementStrategy::Spread, "RESCHEDULING", 1),
                ("4567", PlacementStrategy::Pack, "PENDING", 1),
            ]
        );
        assert_eq!(s.pending_gang_requests[1].bundles[0], res(&[("CPU", 1.0), ("GPU", 1.0)]));

        assert_eq!(s.cluster_resource_constraints.len(), 1);
        assert_eq!(s.cluster_resource_constraints[0].requests[0].shape, res(&[("CPU", 1.0)]));
        assert_eq!(s.cluster_resource_constraints[0].requests[0].count, 8);
    }

    #[test]
    fn strategy_comes_from_constraints_before_details() {
        // Constraints win over details, and the deprecated field is the fallback.
        let g = proto::GangResourceRequest {
            requests: vec![request(&[("CPU", 1.0)], Some(anti("_PG_beef")))],
            details: String::new(),
            bundle_selectors: Vec::new(),
        };
        let g = GangRequest::from_proto(g).unwrap();
        assert_eq!(g.strategy, PlacementStrategy::StrictSpread);
        assert_eq!(g.placement_group_id, "beef");
        assert_eq!(g.state, "");
        // Unknown details: PACK.
        let g = GangRequest::from_proto(gang("garbage", vec![request(&[("CPU", 1.0)], None)])).unwrap();
        assert_eq!(g.strategy, PlacementStrategy::Pack);
    }

    #[test]
    fn gang_round_trips_through_the_proto() {
        let s = ClusterState::from_proto(probe_state()).unwrap();
        for g in &s.pending_gang_requests {
            assert_eq!(GangRequest::from_proto(g.to_proto()).as_ref(), Some(g));
        }
    }

    #[test]
    fn negative_counts_are_invalid() {
        let mut p = probe_state();
        p.pending_resource_requests[0].count = -1;
        let err = ClusterState::from_proto(p).unwrap_err();
        assert!(err.0.contains("pending_resource_requests[0]"), "{err:?}");
        let mut p = probe_state();
        p.cluster_resource_constraints[0].resource_requests[0].count = -5;
        assert!(ClusterState::from_proto(p).is_err());
    }

    #[test]
    fn unknown_status_is_kept() {
        assert_eq!(NodeStatus::from_proto(42), NodeStatus::Unknown(42));
        assert_eq!(NodeStatus::from_proto(4), NodeStatus::Draining);
        assert_eq!(NodeStatus::Idle.as_str(), "idle");
    }

    #[test]
    fn placement_group_resources_are_recognised_like_ray() {
        for name in [
            "CPU_group_aeba18449a775d74533e0c2bc3a001000000",
            "CPU_group_0_aeba18449a775d74533e0c2bc3a001000000",
            "bundle_group_aeba18449a775d74533e0c2bc3a001000000",
        ] {
            assert!(is_placement_group_resource(name), "{name}");
        }
        for name in ["CPU", "GPU", "_group_abc", "CPU_group_", "CPU_group_-x", "node:__internal_head__"] {
            assert!(!is_placement_group_resource(name), "{name}");
        }
        let d = ResourceDemand { shape: res(&[("CPU_group_0_ab", 1.0)]), count: 1, label_selectors: Vec::new() };
        assert!(d.involves_placement_group());
    }

    #[test]
    fn hex_round_trips() {
        let bytes: Vec<u8> = vec![0x00, 0x0f, 0xa0, 0xff, 0x7e];
        assert_eq!(hex(&bytes), "000fa0ff7e");
        assert_eq!(unhex("000fa0ff7e"), Some(bytes.clone()));
        assert_eq!(unhex("000FA0FF7E"), Some(bytes));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex(""), Some(Vec::new()));
    }

    #[test]
    fn label_selectors_are_kept_when_not_empty() {
        let sel = proto::LabelSelector {
            label_constraints: vec![proto::LabelSelectorConstraint {
                label_key: "zone".into(),
                operator: proto::LabelSelectorOperator::LabelOperatorNotIn as i32,
                label_values: vec!["a".into()],
            }],
        };
        let r = proto::ResourceRequestByCount {
            request: Some(proto::ResourceRequest {
                resources_bundle: res(&[("CPU", 1.0)]),
                placement_constraints: Vec::new(),
                label_selectors: vec![proto::LabelSelector::default(), sel.clone()],
            }),
            count: 2,
        };
        let d = ResourceDemand::from_proto(r, String::new).unwrap();
        assert_eq!(d.label_selectors.len(), 1);
        assert_eq!(d.label_selectors[0].constraints[0].operator, LabelOperator::NotIn);
        assert_eq!(d.label_selectors[0].to_proto(), sel);
        assert_eq!(d.to_proto().count, 2);
    }
}
