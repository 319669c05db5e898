//! The autoscaler's link to Ray: a gRPC client of the head's GCS `AutoscalerStateService`
//! (Ray 2.60) and the plain-data view of what it returns. The mapping of that view onto the
//! scale-up decision's input is the autoscaler's (`autoscaler::decision_input`).
//!
//! - [`proto`]: the generated bindings of `proto/autoscaler.proto`, a subset of Ray's own
//!   `autoscaler.proto` with Ray's field numbers.
//! - [`GcsClient`]: connect, read the cluster state, report what the autoscaler is doing, drain
//!   idle nodes. Every call has a timeout; errors are [`RayError`]s with a bounded
//!   [`RayError::reason`] for metrics.
//! - [`ClusterState`] and friends: the GCS reply as plain Rust data, so nothing above this module
//!   touches protobuf types.
//!
//! The head must run with `RAY_enable_autoscaler_v2=1` (so `request_resources()` reaches the GCS
//! as a cluster resource constraint) and `--no-monitor` (so Ray's own autoscaler does not compete
//! with ours), and every Ray pod with `RAY_CLOUD_INSTANCE_ID=<pod name>` and
//! `RAY_NODE_TYPE_NAME=<pod type>`: these fill the node's `instance_id` and `ray_node_type_name`,
//! which is how Ray nodes are matched to pods.

mod client;
mod state;

pub use client::{
    AutoscalingReport, ClusterStatus, DrainOutcome, DrainReason, FailedLaunch, GcsClient, MAX_REPLY_BYTES,
    MAX_REPORTED_INFEASIBLE_REQUESTS, MAX_REPORTED_PENDING_LAUNCHES, PendingInstance, PendingLaunch, RayError,
    ReportedAutoscalingState, SMALL_REPLY_BYTES,
};
pub use state::{
    ClusterState, GangRequest, HEAD_NODE_RESOURCE, LabelConstraint, LabelOperator, LabelSelector, NodeStatus, RayNode,
    ResourceConstraint, ResourceDemand, is_placement_group_resource,
};

/// The generated protobuf messages and the `AutoscalerStateService` client (package
/// `ray.rpc.autoscaler`). Public so tests and tools can make raw calls; the operator itself goes
/// through [`GcsClient`].
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("ray.rpc.autoscaler");
}
