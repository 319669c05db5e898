//! ray-operator: runs autoscaling Ray clusters from `RayCluster` resources (`cluster.ray.io/v1`).
//!
//! The module tree is the architecture, in layers; a module imports only from layers below it:
//! 1. [`api`]: the `RayCluster` custom resource (spec, status, CRD generation); [`model`]: the pure
//!    model on top of it (what should exist, Ray resources, the observed pods and Service and the
//!    predicates over them). [`metrics`] and [`telemetry`] are leaves anyone may use.
//! 2. [`ray`]: the GCS client and the plain-data view of what the GCS returns.
//! 3. [`autoscaler`]: Ray's scale-up decision (ported), its input from Ray's view, what it means
//!    for a cluster's pods (pure), and the per-cluster link task to the GCS.
//! 4. [`pass`]: one reconcile pass as a pure function, `decide(PassInput) -> PassDecision`.
//! 5. [`cache`] (the label-filtered view of RayClusters, pods and Services) and [`reconciler`], the
//!    executor: read, decide, write, record.
//! 6. [`runtime`]: watches, leader election (the executor's write fence), shards, health server,
//!    shutdown; [`cli`]: flags and subcommands; `main` only wires them.

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
