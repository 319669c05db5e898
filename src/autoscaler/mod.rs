//! The autoscaler: Ray's own scheduling decision ([`decision`], a faithful port of Ray 2.60's
//! `resource_demand_scheduler.get_nodes_to_launch`), the mapping of the GCS's view onto its input
//! ([`decision_input`]), what that means for one cluster's pods ([`scale`]), the `plan` tool's input
//! format ([`fixture`]) — all pure — and the task that talks to each head's GCS ([`link`]).

pub mod decision;
pub mod decision_input;
pub mod fixture;
pub mod link;
pub mod scale;
