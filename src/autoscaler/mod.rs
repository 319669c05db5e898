//! The autoscaler: Ray's own scheduling decision ([`decision`], a faithful port of Ray 2.60's
//! `resource_demand_scheduler.get_nodes_to_launch`) and the `plan` tool's input format ([`fixture`]).

pub mod decision;
pub mod fixture;
pub mod link;
pub mod scale;
