//! Command-line interface: `ray-operator run | crd | plan FILE | version`.
//!
//! Every `run` flag can also be set by an environment variable (shown in `--help`), which is how
//! the Deployment configures it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::model::desired::OwnServiceAccount;
use crate::reconciler::AutoscalerSettings;
use crate::runtime::Settings;
use crate::runtime::leader::LeaderConfig;
use crate::runtime::watch::Scope;
use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "ray-operator",
    version,
    about = "Kubernetes operator for autoscaling Ray clusters (RayCluster, cluster.ray.io/v1)"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "RAY_OPERATOR_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the operator (uses the in-cluster config, or KUBECONFIG / ~/.kube/config).
    Run(Box<RunArgs>),
    /// Print the RayCluster CustomResourceDefinition as YAML.
    Crd,
    /// What would the autoscaler launch? Reads a cluster state (JSON, the format of
    /// tests/fixtures/ray/bench_N*.json) and prints Ray's decision for it.
    Plan {
        /// The cluster-state JSON file (`-` for standard input).
        file: PathBuf,
        /// Override the file's upscaling_speed (e.g. 1e9 for no launch cap).
        #[arg(long)]
        upscaling_speed: Option<f64>,
    },
    /// Print the version.
    Version,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Legacy rule: when set and non-empty, serve only this namespace (as the Python operator did).
    #[arg(long, env = "RAY_OPERATOR_POD_NAMESPACE")]
    pub pod_namespace: Option<String>,

    /// Serve only these namespaces (comma-separated). Neither this nor RAY_OPERATOR_POD_NAMESPACE: all namespaces.
    #[arg(long, env = "RAY_OPERATOR_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Holder identity for leader election: the pod name (downward API). Must be unique per replica.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// Namespace of the leader-election Lease and of the operator's own pod.
    #[arg(long, env = "POD_NAMESPACE")]
    pub operator_namespace: Option<String>,

    /// Name of the leader-election Lease.
    #[arg(long, env = "RAY_OPERATOR_LEASE_NAME", default_value = "ray-operator-leader")]
    pub lease_name: String,

    /// Lease duration: a crashed leader is replaced after this long.
    #[arg(long, env = "RAY_OPERATOR_LEASE_TTL", value_parser = parse_seconds, default_value = "15")]
    pub lease_ttl: Duration,

    /// How often the leader renews the Lease.
    #[arg(long, env = "RAY_OPERATOR_LEASE_RENEW", value_parser = parse_seconds, default_value = "5")]
    pub lease_renew: Duration,

    /// Disable leader election (a single replica, e.g. local development). Never run two such replicas.
    #[arg(long, env = "RAY_OPERATOR_NO_LEADER_ELECTION")]
    pub no_leader_election: bool,

    /// Number of shards (async worker tasks) the leader spreads RayClusters over.
    #[arg(long, env = "RAY_OPERATOR_SHARDS", default_value_t = 8)]
    pub shards: usize,

    /// Most pods one cluster creates per turn before other clusters of its shard get theirs.
    #[arg(long, env = "RAY_OPERATOR_CREATE_BATCH", default_value_t = 20)]
    pub create_batch: usize,

    /// How often the autoscaler reads each cluster's demand from its head's GCS.
    #[arg(long, env = "RAY_OPERATOR_AUTOSCALER_INTERVAL", value_parser = parse_seconds, default_value = "1")]
    pub autoscaler_interval: Duration,

    /// Timeout of every call to a head's GCS.
    #[arg(long, env = "RAY_OPERATOR_GCS_TIMEOUT", value_parser = parse_seconds, default_value = "2")]
    pub gcs_timeout: Duration,

    /// A running worker pod whose Ray node has not registered in the GCS after this long is
    /// deleted and replaced (with a Warning Event). The default is Ray's own wait for a launched
    /// node to come up (AUTOSCALER_NODE_START_WAIT_S, 900 s); it counts from the pod running, so
    /// scheduling and image pulls are not in it. Needs the autoscaler (it alone reads the GCS).
    #[arg(long, env = "RAY_OPERATOR_WORKER_REGISTRATION_TIMEOUT", value_parser = parse_seconds, default_value = "900")]
    pub worker_registration_timeout: Duration,

    /// A head pod that runs while its GCS has not answered for this long is deleted and recreated
    /// (autoscalerRetries + 1). The default matches how long Ray's raylets wait for a lost GCS
    /// before they exit (gcs_rpc_server_reconnect_timeout_s, 60 s): after that the cluster is gone
    /// anyway. Needs the autoscaler.
    #[arg(long, env = "RAY_OPERATOR_HEAD_GCS_GRACE", value_parser = parse_seconds, default_value = "60")]
    pub head_gcs_grace: Duration,

    /// Disable the autoscaler: every worker type is kept at its minWorkers.
    #[arg(long, env = "RAY_OPERATOR_NO_AUTOSCALER")]
    pub no_autoscaler: bool,

    /// A worker pod the scheduler cannot place for this long is deleted and its launch given up
    /// (with a Warning Event).
    #[arg(long, env = "RAY_OPERATOR_UNSCHEDULABLE_TIMEOUT", value_parser = parse_seconds, default_value = "300")]
    pub unschedulable_timeout: Duration,

    /// The operator's own ServiceAccount (downward API `spec.serviceAccountName`, set by the
    /// Deployment). RayClusters whose podConfig runs as it (in the operator's namespace) are
    /// refused with phase Error: their pods would carry the operator's permissions.
    #[arg(long, env = "RAY_OPERATOR_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,

    /// Honour the `cluster.ray.io/gcs-address` annotation (off by default). When on, whoever can
    /// edit a RayCluster chooses where the operator connects: only for operators run outside the
    /// Kubernetes network, tests and benchmarks.
    #[arg(long, env = "RAY_OPERATOR_ALLOW_GCS_ADDRESS_ANNOTATION")]
    pub allow_gcs_address_annotation: bool,

    /// Address of the health and metrics server.
    #[arg(long, env = "RAY_OPERATOR_HEALTH_ADDR", default_value = "0.0.0.0:8080")]
    pub health_addr: SocketAddr,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let s = s.trim_end_matches('s');
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a positive number of seconds"))
}

impl RunArgs {
    /// The settings in force, or a message saying which flag or variable is missing.
    pub fn settings(&self) -> Result<Settings, String> {
        let scope = match self.pod_namespace.as_deref().filter(|s| !s.is_empty()) {
            Some(ns) => Scope::Namespaces(vec![ns.to_string()]),
            None if !self.namespaces.is_empty() => {
                Scope::Namespaces(self.namespaces.iter().filter(|s| !s.is_empty()).cloned().collect())
            }
            None => Scope::ClusterWide,
        };
        let leader = if self.no_leader_election {
            None
        } else {
            let identity = self.pod_name.clone().filter(|s| !s.is_empty()).ok_or(
                "leader election needs a unique identity: set POD_NAME (downward API metadata.name) or --pod-name, \
                 or pass --no-leader-election for a single local replica",
            )?;
            let namespace = self
                .operator_namespace
                .clone()
                .or_else(|| self.pod_namespace.clone())
                .filter(|s| !s.is_empty())
                .ok_or("leader election needs the operator's namespace: set POD_NAMESPACE or --operator-namespace")?;
            if self.lease_renew >= self.lease_ttl {
                return Err("--lease-renew must be shorter than --lease-ttl".into());
            }
            Some(LeaderConfig {
                lease_name: self.lease_name.clone(),
                namespace,
                identity,
                ttl: self.lease_ttl,
                renew_every: self.lease_renew,
            })
        };
        Ok(Settings {
            scope,
            leader,
            shards: self.shards.max(1),
            create_batch: self.create_batch.max(1),
            autoscaler: (!self.no_autoscaler).then_some(AutoscalerSettings {
                interval: self.autoscaler_interval,
                timeout: self.gcs_timeout,
                gcs_address_annotation: self.allow_gcs_address_annotation,
                registration_timeout: self.worker_registration_timeout,
                head_gcs_grace: self.head_gcs_grace,
            }),
            unschedulable_timeout: self.unschedulable_timeout,
            health_addr: self.health_addr,
            service_account: self.service_account.clone().filter(|s| !s.is_empty()).map(|name| OwnServiceAccount {
                namespace: self
                    .operator_namespace
                    .clone()
                    .or_else(|| self.pod_namespace.clone())
                    .filter(|s| !s.is_empty()),
                name,
            }),
            instance: self.pod_name.clone().unwrap_or_else(|| "ray-operator".into()),
        })
    }
}
