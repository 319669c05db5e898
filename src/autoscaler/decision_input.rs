//! From what the GCS reports and the pods the operator knows, to the input of the scale-up
//! decision ([`super::decision::get_nodes_to_launch`]).
//!
//! Ray's v1 autoscaler, whose decision we port, gets its nodes from the cloud provider (for
//! KubeRay: the pods) and their resources from Ray. The same split is kept here: the pods are the
//! nodes, and a pod's Ray node — found by `instance_id`, which each raylet takes from its pod's
//! `RAY_CLOUD_INSTANCE_ID=<pod name>` — supplies its resources:
//!
//! - a pod whose Ray node is alive is a connected node with the node's total and available
//!   resources; its type is the node's `ray_node_type_name` (the pod's type if that is empty);
//! - a pod with no alive Ray node yet (starting, or Ray restarting in it) is a *pending* node:
//!   the decision assumes its type's full resources and counts it against the `upscaling_speed`
//!   cap, so demand that waits for it does not launch a second node;
//! - a pod whose Ray node is DRAINING is left out entirely: it accepted a drain, takes no new
//!   work, and is about to go away;
//! - DEAD nodes are ignored;
//! - the head (the alive node with `node:__internal_head__`) is always included, with the head
//!   type, even if its pod is not in the list;
//! - alive worker nodes without a pod in the list are left out, as Ray leaves out nodes the
//!   provider does not list (typically pods being deleted).
//!
//! Demand is copied as Ray's v1 monitor builds it: one entry per pending request, placement
//! groups with their unplaced bundles, `request_resources()` constraints as bundles.

use std::collections::HashMap;

use super::decision::{DecisionInput, ExistingNode, NodeTypeConfig, PlacementGroup, PlacementGroupBundle, ResourceMap};
use crate::ray::{ClusterState, NodeStatus, RayNode, ResourceDemand};

/// At most this many pending requests (and, separately, constraint bundles) are expanded into
/// the decision's one-entry-per-request lists. It only bounds memory against an absurd count
/// from the GCS: the decision needs far fewer to choose every node `max_workers` allows. Shapes
/// are expanded in the GCS's order until the cap is reached.
pub const MAX_EXPANDED_DEMANDS: usize = 100_000;

/// Maps the GCS's view and the operator's pods onto a [`DecisionInput`].
///
/// - `types`: the node types, in configuration order (the head type included);
/// - `head_type`: the head's type name;
/// - `max_workers`, `upscaling_speed`: the cluster's limits, passed through;
/// - `pods`: every Ray pod of the cluster that exists and is not being deleted, as
///   `(pod type, pod name)`, in the provider's order (it becomes the packing order). Pods the
///   operator already drained or is deleting must not be listed.
///
/// `launching_nodes` is left empty: launches the operator decided but whose pods are not in
/// `pods` yet (e.g. a create still in flight) are the caller's to add.
pub fn to_decision_input(
    state: &ClusterState,
    types: &[NodeTypeConfig],
    head_type: &str,
    max_workers: u32,
    upscaling_speed: f64,
    pods: &[(String, String)],
) -> DecisionInput {
    // Alive nodes by instance id. Should a pod have two alive nodes (Ray restarted in it before
    // the GCS noticed the old raylet died), prefer one that is not draining.
    let mut by_instance: HashMap<&str, &RayNode> = HashMap::new();
    for node in state.nodes.iter().filter(|n| n.status != NodeStatus::Dead && !n.instance_id.is_empty()) {
        by_instance
            .entry(node.instance_id.as_str())
            .and_modify(|known| {
                if known.status == NodeStatus::Draining && node.status != NodeStatus::Draining {
                    *known = node;
                }
            })
            .or_insert(node);
    }
    let head = state.head();

    let mut nodes = Vec::with_capacity(pods.len() + 1);
    let mut head_included = false;
    for (pod_type, pod_name) in pods {
        match by_instance.get(pod_name.as_str()) {
            Some(node) if node.status == NodeStatus::Draining => {}
            Some(node) => {
                let is_head = node.is_head();
                head_included |= is_head;
                let node_type = if is_head {
                    head_type
                } else if node.ray_node_type_name.is_empty() {
                    pod_type.as_str()
                } else {
                    node.ray_node_type_name.as_str()
                };
                nodes.push(connected(node, node_type, is_head));
            }
            None => nodes.push(ExistingNode {
                node_type: pod_type.clone(),
                is_head: false,
                total_resources: None,
                available_resources: None,
            }),
        }
    }
    if let Some(head) = head.filter(|h| !head_included && h.status != NodeStatus::Draining) {
        nodes.insert(0, connected(head, head_type, true));
    }

    let resource_demands = expand(&state.pending_resource_requests);
    let request_resources = expand(state.cluster_resource_constraints.iter().flat_map(|c| &c.requests));
    let placement_groups = state
        .pending_gang_requests
        .iter()
        .map(|g| PlacementGroup {
            strategy: g.strategy,
            bundles: g.bundles.iter().map(|b| PlacementGroupBundle { resources: b.clone(), placed: false }).collect(),
        })
        .collect();

    DecisionInput {
        node_types: types.to_vec(),
        head_node_type: head_type.to_string(),
        max_workers,
        upscaling_speed,
        nodes,
        launching_nodes: Vec::new(),
        resource_demands,
        placement_groups,
        request_resources,
    }
}

fn connected(node: &RayNode, node_type: &str, is_head: bool) -> ExistingNode {
    ExistingNode {
        node_type: node_type.to_string(),
        is_head,
        total_resources: Some(node.total_resources.clone()),
        available_resources: Some(node.available_resources.clone()),
    }
}

/// One entry per request, up to [`MAX_EXPANDED_DEMANDS`].
fn expand<'a>(demands: impl IntoIterator<Item = &'a ResourceDemand>) -> Vec<ResourceMap> {
    let mut out = Vec::new();
    for d in demands {
        let room = MAX_EXPANDED_DEMANDS - out.len();
        let n = usize::try_from(d.count).unwrap_or(usize::MAX).min(room);
        out.extend(std::iter::repeat_n(&d.shape, n).cloned());
        if out.len() >= MAX_EXPANDED_DEMANDS {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscaler::decision::{PlacementStrategy, get_nodes_to_launch};
    use crate::ray::{GangRequest, HEAD_NODE_RESOURCE, ResourceConstraint};

    fn res(items: &[(&str, f64)]) -> ResourceMap {
        items.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn types() -> Vec<NodeTypeConfig> {
        vec![
            NodeTypeConfig { name: "head".into(), resources: res(&[("CPU", 1.0)]), min_workers: 0, max_workers: 0 },
            NodeTypeConfig { name: "cpu".into(), resources: res(&[("CPU", 4.0)]), min_workers: 0, max_workers: 10 },
            NodeTypeConfig {
                name: "gpu".into(),
                resources: res(&[("CPU", 4.0), ("GPU", 1.0)]),
                min_workers: 0,
                max_workers: 2,
            },
        ]
    }

    fn node(id: &str, instance: &str, node_type: &str, status: NodeStatus, total: &[(&str, f64)]) -> RayNode {
        RayNode {
            node_id: id.into(),
            instance_id: instance.into(),
            ray_node_type_name: node_type.into(),
            status,
            total_resources: res(total),
            available_resources: res(total),
            ..Default::default()
        }
    }

    fn head_node() -> RayNode {
        node("h", "c-head-x", "head", NodeStatus::Running, &[("CPU", 1.0), (HEAD_NODE_RESOURCE, 1.0)])
    }

    fn pods(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(t, n)| (t.to_string(), n.to_string())).collect()
    }

    fn demand(shape: &[(&str, f64)], count: u64) -> ResourceDemand {
        ResourceDemand { shape: res(shape), count, label_selectors: Vec::new() }
    }

    #[test]
    fn nodes_map_to_pods_by_instance_id() {
        let mut busy = node("w1", "c-cpu-a", "cpu", NodeStatus::Running, &[("CPU", 4.0)]);
        busy.available_resources = res(&[("CPU", 1.0)]);
        let state = ClusterState {
            nodes: vec![
                head_node(),
                busy,
                // A dead node of a pod that is being replaced: ignored.
                node("w0", "c-cpu-old", "cpu", NodeStatus::Dead, &[]),
                // Ray's type name wins over the pod's.
                node("w2", "c-gpu-b", "gpu", NodeStatus::Idle, &[("CPU", 4.0), ("GPU", 1.0)]),
                // A node whose pod the operator no longer lists: left out.
                node("w3", "c-cpu-gone", "cpu", NodeStatus::Running, &[("CPU", 4.0)]),
                // A draining node: left out, and its pod does not count as pending either.
                node("w4", "c-cpu-drain", "cpu", NodeStatus::Draining, &[("CPU", 4.0)]),
            ],
            ..Default::default()
        };
        let pods = pods(&[
            ("head", "c-head-x"),
            ("cpu", "c-cpu-a"),
            ("cpu", "c-cpu-new"),
            ("cpu", "c-gpu-b"),
            ("cpu", "c-cpu-old"),
            ("cpu", "c-cpu-drain"),
        ]);
        let input = to_decision_input(&state, &types(), "head", 8, 1.0, &pods);
        assert_eq!(input.head_node_type, "head");
        assert_eq!(input.max_workers, 8);
        assert_eq!(input.upscaling_speed, 1.0);
        assert_eq!(input.node_types, types());
        let summary: Vec<(&str, bool, Option<f64>)> = input
            .nodes
            .iter()
            .map(|n| {
                (n.node_type.as_str(), n.is_head, n.available_resources.as_ref().and_then(|a| a.get("CPU").copied()))
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("head", true, Some(1.0)),
                ("cpu", false, Some(1.0)),
                // Not registered yet: pending, resources unknown.
                ("cpu", false, None),
                ("gpu", false, Some(4.0)),
                // Only a dead node: Ray restarting in the pod, or not started yet.
                ("cpu", false, None),
            ]
        );
        assert!(input.nodes[2].total_resources.is_none());
        assert!(input.launching_nodes.is_empty());
    }

    #[test]
    fn head_is_included_without_its_pod_and_typed_as_the_head() {
        let mut head = head_node();
        head.ray_node_type_name = String::new();
        let state = ClusterState { nodes: vec![head], ..Default::default() };
        let input = to_decision_input(&state, &types(), "head", 8, 1.0, &pods(&[("cpu", "c-cpu-a")]));
        assert_eq!(input.nodes.len(), 2);
        assert!(input.nodes[0].is_head);
        assert_eq!(input.nodes[0].node_type, "head");
        assert_eq!(input.nodes[1].available_resources, None);
        // Listed as a pod: included once, where the pod is.
        let input = to_decision_input(&state, &types(), "head", 8, 1.0, &pods(&[("x", "y"), ("head", "c-head-x")]));
        assert_eq!(input.nodes.iter().filter(|n| n.is_head).count(), 1);
        assert!(input.nodes[1].is_head);
    }

    #[test]
    fn empty_type_name_falls_back_to_the_pod_type() {
        let mut w = node("w1", "c-gpu-a", "", NodeStatus::Running, &[("CPU", 4.0), ("GPU", 1.0)]);
        w.available_resources = res(&[("CPU", 4.0)]);
        let state = ClusterState { nodes: vec![head_node(), w], ..Default::default() };
        let input = to_decision_input(&state, &types(), "head", 8, 1.0, &pods(&[("gpu", "c-gpu-a")]));
        assert_eq!(input.nodes[1].node_type, "gpu");
        assert_eq!(input.nodes[1].total_resources, Some(res(&[("CPU", 4.0), ("GPU", 1.0)])));
    }

    #[test]
    fn a_restarted_raylet_prefers_the_node_that_is_not_draining() {
        let state = ClusterState {
            nodes: vec![
                head_node(),
                node("old", "c-cpu-a", "cpu", NodeStatus::Draining, &[("CPU", 4.0)]),
                node("new", "c-cpu-a", "cpu", NodeStatus::Idle, &[("CPU", 4.0)]),
            ],
            ..Default::default()
        };
        let input = to_decision_input(&state, &types(), "head", 8, 1.0, &pods(&[("cpu", "c-cpu-a")]));
        assert_eq!(input.nodes.len(), 2);
        assert_eq!(input.nodes[1].available_resources, Some(res(&[("CPU", 4.0)])));
    }

    #[test]
    fn demand_is_expanded_per_request() {
        let state = ClusterState {
            nodes: vec![head_node()],
            pending_resource_requests: vec![demand(&[("CPU", 4.0)], 2), demand(&[("GPU", 1.0)], 0)],
            pending_gang_requests: vec![
                GangRequest {
                    placement_group_id: "aa".into(),
                    strategy: PlacementStrategy::StrictSpread,
                    state: "PENDING".into(),
                    details: String::new(),
                    bundles: vec![res(&[("CPU", 2.0)]); 2],
                },
                GangRequest {
                    placement_group_id: "bb".into(),
                    strategy: PlacementStrategy::StrictPack,
                    state: "PENDING".into(),
                    details: String::new(),
                    bundles: vec![res(&[("CPU", 1.0)]); 3],
                },
            ],
            cluster_resource_constraints: vec![ResourceConstraint { requests: vec![demand(&[("CPU", 1.0)], 8)] }],
            ..Default::default()
        };
        let input = to_decision_input(&state, &types(), "head", 8, 1.0, &[]);
        assert_eq!(input.resource_demands, vec![res(&[("CPU", 4.0)]); 2]);
        assert_eq!(input.request_resources, vec![res(&[("CPU", 1.0)]); 8]);
        assert_eq!(input.placement_groups.len(), 2);
        assert_eq!(input.placement_groups[0].strategy, PlacementStrategy::StrictSpread);
        assert_eq!(input.placement_groups[0].bundles.len(), 2);
        assert!(input.placement_groups.iter().flat_map(|g| &g.bundles).all(|b| !b.placed));
        assert_eq!(input.placement_groups[1].strategy, PlacementStrategy::StrictPack);
    }

    #[test]
    fn expansion_is_bounded() {
        let demands = [demand(&[("CPU", 1.0)], u64::MAX), demand(&[("GPU", 1.0)], 5)];
        let out = expand(&demands);
        assert_eq!(out.len(), MAX_EXPANDED_DEMANDS);
        assert!(out.iter().all(|d| d.contains_key("CPU")));
    }

    #[test]
    fn pending_pods_prevent_double_launches() {
        // Two {CPU: 4} tasks. With no worker pods, the decision launches two cpu nodes; once
        // those two pods exist (not yet in Ray), it launches nothing more.
        let state = ClusterState {
            nodes: vec![head_node()],
            pending_resource_requests: vec![demand(&[("CPU", 4.0)], 2)],
            ..Default::default()
        };
        let before = get_nodes_to_launch(&to_decision_input(&state, &types(), "head", 8, 1.0, &[])).unwrap();
        assert_eq!(before.nodes_to_launch.get("cpu"), Some(&2));
        let after = get_nodes_to_launch(&to_decision_input(
            &state,
            &types(),
            "head",
            8,
            1.0,
            &pods(&[("head", "c-head-x"), ("cpu", "c-cpu-1"), ("cpu", "c-cpu-2")]),
        ))
        .unwrap();
        assert!(after.nodes_to_launch.is_empty(), "{after:?}");
        assert!(after.unfulfilled.is_empty());
    }

    #[test]
    fn strict_spread_group_launches_one_node_per_bundle() {
        let state = ClusterState {
            nodes: vec![head_node()],
            pending_gang_requests: vec![GangRequest {
                placement_group_id: "aa".into(),
                strategy: PlacementStrategy::StrictSpread,
                state: "PENDING".into(),
                details: String::new(),
                bundles: vec![res(&[("CPU", 1.0)]); 3],
            }],
            ..Default::default()
        };
        let d = get_nodes_to_launch(&to_decision_input(&state, &types(), "head", 8, 1.0, &[])).unwrap();
        // The head takes one bundle; two new nodes take the others.
        assert_eq!(d.nodes_to_launch.values().sum::<u32>(), 2, "{d:?}");
    }
}
