//! The `RayCluster` custom resource, `cluster.ray.io/v1`.
//!
//! Field names and meanings are those of the legacy Python operator's CRD, so existing manifests apply
//! unchanged. The doc comments below are the CRD's descriptions (`kubectl explain raycluster.spec`).
//! What the schema and CEL can reject is rejected at admission; the rest (e.g. a `podConfig` that is
//! not a valid Pod) is judged by the reconciler.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the resource.
pub const GROUP: &str = "cluster.ray.io";

/// Ray's default global worker cap when `maxWorkers` is absent.
pub const DEFAULT_MAX_WORKERS: u32 = 2;
/// Ray's default `upscalingSpeed`.
pub const DEFAULT_UPSCALING_SPEED: f64 = 1.0;
/// Ray's default `idleTimeoutMinutes`.
pub const DEFAULT_IDLE_TIMEOUT_MINUTES: u32 = 5;

/// Ray cluster configuration: a head pod type, worker pod types, and how Ray is started and scaled.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cluster.ray.io",
    version = "v1",
    kind = "RayCluster",
    plural = "rayclusters",
    singular = "raycluster",
    namespaced,
    status = "RayClusterStatus",
    doc = "A Ray cluster: one head pod and autoscaled worker pods, managed by ray-operator.",
    printcolumn = r#"{"name":"Status","type":"string","description":"Running, Updating, Error or AutoscalingExceptionRecovery","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Restarts","type":"integer","description":"Head recoveries (autoscalerRetries)","jsonPath":".status.autoscalerRetries"}"#,
    printcolumn = r#"{"name":"Workers","type":"string","description":"Ready/desired worker pods","jsonPath":".status.workers"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.podTypes.exists(t, t.name == self.headPodType)",
    "message": "headPodType must be the name of one of spec.podTypes[].name",
    "fieldPath": ".headPodType",
}]))]
pub struct RayClusterSpec {
    /// Name of the entry of `podTypes` used for the head pod.
    #[schemars(length(min = 1, max = 63))]
    pub head_pod_type: String,

    /// Pod types (Ray node types). One of them is the head type (`headPodType`); the others are worker
    /// types that the autoscaler launches between their `minWorkers` and `maxWorkers`.
    #[schemars(length(min = 1, max = 32), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub pod_types: Vec<PodType>,

    /// Global cap on worker pods, the head excluded. Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100000))]
    pub max_workers: Option<u32>,

    /// How fast the cluster grows: at most `max(5, upscalingSpeed × running workers)` launches may be in
    /// flight at once. Default 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub upscaling_speed: Option<f64>,

    /// Workers idle for this many minutes are removed, down to each type's `minWorkers`. 0 removes idle
    /// workers at once. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_minutes: Option<u32>,

    /// Ports of the head Service `<cluster>-ray-head`, merged by `name` into the defaults
    /// (`client` 10001, `dashboard` 8265, `ray-serve` 8000, `gcs` 6379): an entry with a default's name
    /// replaces it, other entries are appended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub head_service_ports: Option<Vec<HeadServicePort>>,

    /// Shell commands that start Ray on the head, run by the pod itself before its own command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_start_ray_commands: Option<Vec<String>>,

    /// Shell commands that start Ray on workers; `$RAY_HEAD_IP` is the head Service's DNS name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_start_ray_commands: Option<Vec<String>>,

    /// Shell commands run on the head before `headStartRayCommands`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_setup_commands: Option<Vec<String>>,

    /// Shell commands run on every worker before `workerStartRayCommands`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_setup_commands: Option<Vec<String>>,
}

/// One Ray node type: a pod template plus scaling bounds and the resources it offers Ray.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.minWorkers) || !has(self.maxWorkers) || self.minWorkers <= self.maxWorkers",
    "message": "minWorkers must not be greater than maxWorkers",
    "fieldPath": ".minWorkers",
}]))]
pub struct PodType {
    /// Name of the pod type, unique within the cluster; the pods' `ray-user-node-type` label.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,

    /// Minimum number of workers of this type (ignored for the head type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100000))]
    pub min_workers: Option<u32>,

    /// Maximum number of workers of this type (ignored for the head type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100000))]
    pub max_workers: Option<u32>,

    /// Custom Ray resources advertised by pods of this type, e.g. `{"Custom1": 1}`. CPU, GPU and memory
    /// are derived from the Ray container's requests and limits and need not be listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ray_resources: Option<BTreeMap<String, f64>>,

    /// Shell commands run on pods of this type before Ray starts (after the cluster-wide setup commands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_commands: Option<Vec<String>>,

    /// Pod manifest for this type (`apiVersion: v1`, `kind: Pod`, `metadata`, `spec`). The first container
    /// runs Ray. `metadata.generateName` is prefixed with `<cluster>-` unless it already starts with it.
    pub pod_config: PodConfig,
}

/// A Pod manifest kept as given; the reconciler parses it and reports what the API server would refuse.
///
/// Held as compact JSON text, not as a `serde_json::Map`: a parsed manifest costs ten times its
/// text (every small map is a B-tree node of its own: 1.6 kB of example cluster became 21 kB),
/// and the operator holds one per pod type of every cluster it serves. It is parsed only when a
/// reconcile builds pods from it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodConfig(Box<str>);

impl PodConfig {
    /// The manifest as a JSON value (always an object).
    pub fn to_value(&self) -> serde_json::Value {
        // Always valid: built only from a parsed object (see `From` and `Deserialize`).
        serde_json::from_str(&self.0).unwrap_or_else(|_| serde_json::Value::Object(Default::default()))
    }

    /// Edits the manifest (tests and tools; the operator never changes a user's manifest).
    pub fn edit(&mut self, f: impl FnOnce(&mut serde_json::Value)) {
        let mut v = self.to_value();
        f(&mut v);
        *self = Self::from(v);
    }
}

impl Default for PodConfig {
    fn default() -> Self {
        Self("{}".into())
    }
}

impl From<serde_json::Value> for PodConfig {
    fn from(v: serde_json::Value) -> Self {
        Self(v.to_string().into_boxed_str())
    }
}

impl Serialize for PodConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(s)
    }
}

impl<'de> Deserialize<'de> for PodConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        Ok(Self::from(serde_json::Value::Object(map)))
    }
}

impl JsonSchema for PodConfig {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PodConfig".into()
    }

    // The full PodSpec schema would make the CRD ~300 kB (too big for client-side apply); we check
    // only what Ray needs here and let the reconciler report the rest.
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Pod manifest (apiVersion v1, kind Pod, metadata, spec) for pods of this type. The first container runs Ray.",
            "type": "object",
            "x-kubernetes-embedded-resource": true,
            "x-kubernetes-preserve-unknown-fields": true,
            "required": ["spec"],
            "properties": {
                "spec": {
                    "description": "Pod spec; must have at least one container.",
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": true,
                    "required": ["containers"],
                    "properties": {
                        "containers": {
                            "description": "Containers of the pod; the first one runs Ray.",
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "x-kubernetes-preserve-unknown-fields": true,
                            }
                        }
                    }
                }
            }
        })
    }
}

/// A port of the head Service.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeadServicePort {
    /// Port name; the merge key with the default ports.
    #[schemars(length(min = 1, max = 15))]
    pub name: String,
    /// Port exposed by the Service.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Container port number or name on the head pod.
    pub target_port: IntOrString,
}

/// Observed state, written by the operator through the status subresource.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RayClusterStatus {
    /// Running, Updating, Error or AutoscalingExceptionRecovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Number of times the operator recovered a failed or deleted head.
    #[serde(default)]
    pub autoscaler_retries: i64,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, HeadReady, AutoscalerHealthy and (while pod creates are refused) ReplicaFailure conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Desired and ready pod counts per worker type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_types: Vec<PodTypeStatus>,
    /// Ready/desired worker pods, e.g. `2/2` (the WORKERS column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<String>,
    /// Name of the current head pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_pod_name: Option<String>,
    /// Name of the head Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_service_name: Option<String>,
    /// Human-readable explanation when something is wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl RayClusterStatus {
    /// Every field of the status as serialized, for [`RayClusterStatus::merge_patch`].
    const FIELDS: [&'static str; 9] = [
        "phase",
        "autoscalerRetries",
        "observedGeneration",
        "conditions",
        "podTypes",
        "workers",
        "headPodName",
        "headServiceName",
        "message",
    ];

    /// The JSON merge patch that makes the stored status exactly this one: a field this status
    /// omits is sent as `null`, which deletes it (a merge patch never removes a field it does not
    /// name, so a `message` once written would otherwise outlive the problem it described).
    /// Chosen over a server-side apply of the status: apply removes only fields its own manager
    /// applied before, and every status written so far was a merge patch (an Update), so the stale
    /// fields of existing clusters would stay.
    pub fn merge_patch(&self) -> serde_json::Value {
        let mut status = serde_json::to_value(self).unwrap_or_default();
        if let Some(obj) = status.as_object_mut() {
            for f in Self::FIELDS {
                obj.entry(f).or_insert(serde_json::Value::Null);
            }
        }
        serde_json::json!({ "status": status })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_merge_patch_names_every_field_and_nulls_the_absent_ones() {
        let full = RayClusterStatus {
            phase: Some(Phase::Running),
            autoscaler_retries: 1,
            observed_generation: Some(1),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "R".into(),
                message: "m".into(),
                observed_generation: None,
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ),
            }],
            pod_types: vec![Default::default()],
            workers: Some("1/1".into()),
            head_pod_name: Some("h".into()),
            head_service_name: Some("s".into()),
            message: Some("m".into()),
        };
        let json = serde_json::to_value(&full).unwrap();
        let mut keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        let mut fields = RayClusterStatus::FIELDS.to_vec();
        keys.sort();
        fields.sort();
        assert_eq!(keys, fields, "FIELDS lists every serialized field");
        let patch = RayClusterStatus::default().merge_patch();
        assert_eq!(patch["status"]["message"], serde_json::Value::Null);
        assert!(patch["status"].as_object().unwrap().contains_key("message"));
    }
}

/// Lifecycle phase of a RayCluster.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// The head and the wanted workers exist and nothing is being replaced.
    Running,
    /// Pods are being created or replaced after a change.
    Updating,
    /// The spec cannot be realised; see the `Ready` condition and `message`.
    Error,
    /// The head failed or disappeared and is being recreated.
    AutoscalingExceptionRecovery,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "Running",
            Phase::Updating => "Updating",
            Phase::Error => "Error",
            Phase::AutoscalingExceptionRecovery => "AutoscalingExceptionRecovery",
        }
    }
}

/// Counts of one worker pod type.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodTypeStatus {
    /// Pod type name.
    pub name: String,
    /// Workers of this type the operator wants.
    pub desired: u32,
    /// Workers of this type that are Ready and up to date.
    pub ready: u32,
}

impl RayClusterSpec {
    /// The head pod type, if `headPodType` names one (admission guarantees it for new objects).
    pub fn head_type(&self) -> Option<&PodType> {
        self.pod_types.iter().find(|t| t.name == self.head_pod_type)
    }

    /// Worker pod types in manifest order.
    pub fn worker_types(&self) -> impl Iterator<Item = &PodType> {
        self.pod_types.iter().filter(|t| t.name != self.head_pod_type)
    }

    pub fn max_workers(&self) -> u32 {
        self.max_workers.unwrap_or(DEFAULT_MAX_WORKERS)
    }

    pub fn upscaling_speed(&self) -> f64 {
        self.upscaling_speed.unwrap_or(DEFAULT_UPSCALING_SPEED)
    }

    pub fn idle_timeout_minutes(&self) -> u32 {
        self.idle_timeout_minutes.unwrap_or(DEFAULT_IDLE_TIMEOUT_MINUTES)
    }
}

/// The CRD as YAML, exactly as `ray-operator crd` prints it and `crds/cluster_crd.yaml` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let mut crd = serde_json::to_value(RayCluster::crd()).map_err(<serde_yaml::Error as serde::ser::Error>::custom)?;
    strip_unknown_formats(&mut crd);
    Ok(format!(
        "# Generated by `ray-operator crd`; do not edit (a test keeps it equal to the code).\n{}",
        serde_yaml::to_string(&crd)?
    ))
}

/// schemars marks unsigned integers `format: uint32`, which the API server does not know and warns
/// about on every apply; `minimum: 0` already says it.
fn strip_unknown_formats(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            if m.get("format").and_then(|f| f.as_str()).is_some_and(|f| f.starts_with("uint")) {
                m.remove("format");
            }
            m.values_mut().for_each(strip_unknown_formats);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_unknown_formats),
        _ => {}
    }
}
