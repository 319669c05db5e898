//! ray-operator: runs autoscaling Ray clusters from `RayCluster` resources (`cluster.ray.io/v1`).
//!
//! The module tree is the architecture:
//! - [`api`]: the `RayCluster` custom resource (spec, status, CRD generation).
//! - [`reconciler`]: what should exist for a cluster (pure builders and decisions) and carrying it out.
//! - [`cache`]: the operator's label-filtered view of RayClusters and their pods and Services.
//! - [`runtime`]: watches, leader election, shards, health server and shutdown: the loop that drives
//!   the reconciler.
//! - [`metrics`], [`telemetry`]: Prometheus metrics and logging.
//! - [`cli`]: command-line flags and subcommands.

pub mod api;
pub mod autoscaler;
pub mod cache;
pub mod cli;
pub mod metrics;
pub mod model;
pub mod pass;
pub mod ray;
pub mod reconciler;
pub mod runtime;
pub mod telemetry;
