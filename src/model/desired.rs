//! What should exist for a RayCluster: the head Service and the pod template of every pod type.
//!
//! Pure functions of the RayCluster; tested from the example manifests without a cluster. The
//! reconciler compares their output (via the `ray-launch-config` hash) with what it observes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, ExecAction, ObjectFieldSelector, Pod, Probe, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use super::resources::{ResourceMap, ray_resources};
use super::short_hash;
use crate::api::{PodType, RayCluster};

/// Label: name of the RayCluster a pod belongs to (every Ray pod; the operator's watch selector).
pub const LABEL_CLUSTER: &str = "ray-cluster-name";
/// Label: `head` or `worker`.
pub const LABEL_NODE_KIND: &str = "ray-node-type";
/// Label: the pod type name (`podTypes[].name`).
pub const LABEL_POD_TYPE: &str = "ray-user-node-type";
/// Label: hash of everything that shapes the pod; a different hash means the pod is out of date.
pub const LABEL_LAUNCH_HASH: &str = "ray-launch-config";
/// Label on the head pod, selected by the head Service.
pub const LABEL_COMPONENT: &str = "cluster.ray.io/component";

/// Annotation overriding the GCS address (`host:port`), e.g. when the operator runs outside the
/// Kubernetes cluster. Our own annotations never count as the user's "restart" annotation.
pub const GCS_ADDRESS_ANNOTATION: &str = "cluster.ray.io/gcs-address";

/// The operator's own ServiceAccount. A Ray pod running as it would hand the operator's token
/// (create and delete pods, patch RayCluster status, take the Lease) to whoever can edit a
/// RayCluster, so podConfigs naming it are refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnServiceAccount {
    /// Its namespace (`None`: unknown, e.g. a local run; then the name is refused everywhere).
    pub namespace: Option<String>,
    pub name: String,
}

/// Refuses a RayCluster whose podConfigs run as the operator's own ServiceAccount
/// (`serviceAccountName`, or its deprecated alias `serviceAccount`). A pod's ServiceAccount is
/// always one of the pod's namespace, so only clusters in the operator's namespace can name it.
/// Checked here, not by a CEL rule in the CRD: the CRD is shared by every install and cannot know
/// a renamed ServiceAccount or its namespace, and podConfig is schemaless to CEL.
pub fn refuse_own_service_account(cluster: &RayCluster, own: &OwnServiceAccount) -> Result<(), InvalidSpec> {
    if own.namespace.as_ref().is_some_and(|ns| cluster.namespace().as_ref() != Some(ns)) {
        return Ok(());
    }
    for (i, t) in cluster.spec.pod_types.iter().enumerate() {
        let config = t.pod_config.to_value();
        for key in ["serviceAccountName", "serviceAccount"] {
            if config["spec"][key].as_str() == Some(own.name.as_str()) {
                return Err(InvalidSpec {
                    field: format!("spec.podTypes[{i}].podConfig.spec.{key}"),
                    message: format!(
                        "{:?} is the operator's own ServiceAccount; Ray pods must not run with the operator's \
                         permissions (give them a ServiceAccount of their own, see docs/install.md)",
                        own.name
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Default GCS port when `ray start --head` has no `--port`.
pub const DEFAULT_GCS_PORT: i32 = 6379;

/// Head or worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeKind {
    Head,
    Worker,
}

impl NodeKind {
    pub fn label(self) -> &'static str {
        match self {
            NodeKind::Head => "head",
            NodeKind::Worker => "worker",
        }
    }
}

/// Why a RayCluster cannot be realised; the message names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidSpec {
    /// JSON path of the field, e.g. `spec.podTypes[1].podConfig.spec.containers[0].image`.
    pub field: String,
    pub message: String,
}

/// Everything the reconciler needs to create and judge the pods of one pod type.
#[derive(Clone, Debug, PartialEq)]
pub struct PodTemplate {
    pub type_name: String,
    pub kind: NodeKind,
    /// The complete pod to create (metadata.generateName set, no name).
    pub pod: Pod,
    /// Value of the `ray-launch-config` label.
    pub hash: String,
    /// Resources this pod offers Ray (for the autoscaler).
    pub resources: ResourceMap,
    pub min_workers: u32,
    pub max_workers: u32,
}

/// The desired state of one RayCluster.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub service: Service,
    /// The `ray-launch-config` hash the head Service carries: it is applied only when this changes.
    pub service_hash: String,
    pub head: PodTemplate,
    /// Worker types in manifest order.
    pub workers: Vec<PodTemplate>,
    /// The head's GCS port (from `--port` in `headStartRayCommands`, else 6379).
    pub gcs_port: i32,
}

/// Name of the head Service of a cluster.
pub fn head_service_name(cluster: &str) -> String {
    format!("{cluster}-ray-head")
}

/// The head Service's DNS name, `<cluster>-ray-head.<namespace>.svc`: how workers (and, without a
/// ClusterIP, the autoscaler) reach the head.
pub fn head_service_dns(cluster: &str, namespace: &str) -> String {
    format!("{}.{namespace}.svc", head_service_name(cluster))
}

/// The GCS port named by `--port N` / `--port=N` in the head start commands.
pub fn gcs_port(cluster: &RayCluster) -> i32 {
    let commands = cluster.spec.head_start_ray_commands.as_deref().unwrap_or_default();
    for cmd in commands {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        for (i, w) in words.iter().enumerate() {
            let value = if let Some(v) = w.strip_prefix("--port=") {
                Some(v)
            } else if *w == "--port" {
                words.get(i + 1).copied()
            } else {
                None
            };
            if let Some(p) = value.and_then(|v| v.trim_end_matches(';').parse::<i32>().ok()) {
                return p;
            }
        }
    }
    DEFAULT_GCS_PORT
}

/// The controller owner reference every child carries, so deletion is garbage collection.
pub fn owner_reference(cluster: &RayCluster) -> OwnerReference {
    OwnerReference {
        api_version: RayCluster::api_version(&()).into_owned(),
        kind: RayCluster::kind(&()).into_owned(),
        name: cluster.name_any(),
        uid: cluster.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The head Service: defaults merged by name with `headServicePorts` (user entries replace defaults of
/// the same name; new names follow in the user's order).
pub fn head_service(cluster: &RayCluster) -> Service {
    let name = cluster.name_any();
    let gcs = gcs_port(cluster);
    let port = |n: &str, p: i32, t: IntOrString| ServicePort {
        name: Some(n.into()),
        port: p,
        target_port: Some(t),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let mut ports = vec![
        port("client", 10001, IntOrString::Int(10001)),
        port("dashboard", 8265, IntOrString::Int(8265)),
        port("ray-serve", 8000, IntOrString::Int(8000)),
        port("gcs", gcs, IntOrString::Int(gcs)),
    ];
    for user in cluster.spec.head_service_ports.iter().flatten() {
        let p = port(&user.name, user.port, user.target_port.clone());
        match ports.iter_mut().find(|e| e.name.as_deref() == Some(user.name.as_str())) {
            Some(existing) => *existing = p,
            None => ports.push(p),
        }
    }
    Service {
        metadata: ObjectMeta {
            name: Some(head_service_name(&name)),
            namespace: cluster.namespace(),
            labels: Some(BTreeMap::from([(LABEL_CLUSTER.into(), name.clone())])),
            owner_references: Some(vec![owner_reference(cluster)]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([(LABEL_COMPONENT.into(), head_service_name(&name))])),
            ports: Some(ports),
            ..Default::default()
        }),
        status: None,
    }
}

/// Quotes a word for `/bin/bash -c`.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The Ray container's new command: setup commands, then start commands, then the user's original
/// command (`exec`, so it stays PID 1's child and receives signals). Ray is thus started by the pod
/// itself: a container restart restarts Ray, and the operator needs no `pods/exec`.
pub fn wrap_entrypoint(setup: &[String], start: &[String], container: &Container) -> Vec<String> {
    let mut original: Vec<String> = container.command.clone().unwrap_or_default();
    original.extend(container.args.clone().unwrap_or_default());
    // Each line fails the container when its *last* command fails, as each line was one command to
    // the legacy operator: the examples' `ulimit -n 65536; ray start ...` must start Ray where the
    // ulimit is refused (no CAP_SYS_RESOURCE, a lower hard limit), which `set -e` would not allow.
    // The braces keep `cd` and `export` of one line in force for the next.
    let mut script = String::new();
    for line in setup.iter().chain(start) {
        script.push_str("{ ");
        script.push_str(line);
        script.push_str("\n} || exit $?\n");
    }
    if original.is_empty() {
        // No command of its own: keep the container (and Ray) alive, as the legacy examples do.
        script.push_str("exec sleep infinity\n");
    } else {
        let words: Vec<String> = original.iter().map(|w| shell_quote(w)).collect();
        script.push_str(&format!("exec {}\n", words.join(" ")));
    }
    vec!["/bin/bash".into(), "-c".into(), script]
}

/// The Ray daemons whose death makes a pod useless: the raylet on every node, and the GCS on the head.
fn ray_daemons(kind: NodeKind) -> &'static [&'static str] {
    match kind {
        NodeKind::Head => &["gcs_server", "raylet"],
        NodeKind::Worker => &["raylet"],
    }
}

/// Probes that tell the kubelet when Ray died but the container lives on (the examples keep it alive
/// with `sleep infinity`): the container is then killed, so with `restartPolicy: Never` the pod
/// fails and is replaced (a head through recovery, `autoscalerRetries` + 1), and with `Always` the
/// kubelet restarts it and the entrypoint starts Ray again. The check reads `/proc/*/comm` with
/// bash and grep only, which every image that can run our entrypoint has; it starts no Python.
/// The startup probe allows `ray start` up to 5 minutes. A container that defines probes of its own
/// keeps them.
fn inject_ray_probes(container: &mut Container, kind: NodeKind) {
    if container.liveness_probe.is_some() || container.startup_probe.is_some() {
        return;
    }
    let check: Vec<String> = ray_daemons(kind).iter().map(|d| format!("grep -qsx {d} /proc/[0-9]*/comm")).collect();
    let probe = |period: i32, failures: i32| Probe {
        exec: Some(ExecAction { command: Some(vec!["/bin/bash".into(), "-c".into(), check.join(" && ")]) }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    container.startup_probe = Some(probe(2, 150));
    container.liveness_probe = Some(probe(5, 3));
}

/// Ensures `ray start --head` runs with `--no-monitor`: this operator is the autoscaler, and Ray's own
/// monitor on the head would fight it.
fn head_start_commands(commands: &[String]) -> Vec<String> {
    commands
        .iter()
        .map(|c| {
            if c.contains("ray start") && c.contains("--head") && !c.contains("--no-monitor") {
                c.replacen("--head", "--head --no-monitor", 1)
            } else {
                c.clone()
            }
        })
        .collect()
}

/// Hash of the cluster's annotations that are the user's (not `kubectl.kubernetes.io/*` nor our
/// own `cluster.ray.io/*`): changing them restarts all Ray pods, as the legacy docs promise.
fn restart_token(cluster: &RayCluster) -> BTreeMap<&str, &str> {
    cluster
        .annotations()
        .iter()
        .filter(|(k, _)| !k.starts_with("kubectl.kubernetes.io/") && !k.starts_with("cluster.ray.io/"))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// The environment every Ray container gets: how to reach the head, which pod and type it is
/// (how Ray nodes are matched to pods), and what to advertise.
fn set_ray_env(
    container: &mut Container,
    name: &str,
    namespace: &str,
    type_name: &str,
    resources: &ResourceMap,
    kind: NodeKind,
) {
    let env = container.env.get_or_insert_with(Vec::new);
    let mut set_env = |name: &str, value: Option<String>, source: Option<EnvVarSource>| {
        env.retain(|e| e.name != name);
        env.push(EnvVar { name: name.into(), value, value_from: source });
    };
    set_env("RAY_HEAD_IP", Some(head_service_dns(name, namespace)), None);
    set_env(
        "RAY_CLOUD_INSTANCE_ID",
        None,
        Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: "metadata.name".into(), api_version: None }),
            ..Default::default()
        }),
    );
    set_env("RAY_NODE_TYPE_NAME", Some(type_name.to_string()), None);
    // `ray start` advertises exactly these resources (CPU/GPU/memory from the container, plus
    // rayResources), so Ray's view of a node matches the type the autoscaler planned with.
    if !resources.is_empty() {
        set_env("RAY_OVERRIDE_RESOURCES", serde_json::to_string(resources).ok(), None);
    }
    if kind == NodeKind::Head {
        set_env("RAY_enable_autoscaler_v2", Some("1".into()), None);
    }
}

/// Builds the pod template of one pod type.
fn pod_template(
    cluster: &RayCluster,
    index: usize,
    pod_type: &PodType,
    kind: NodeKind,
) -> Result<PodTemplate, InvalidSpec> {
    let name = cluster.name_any();
    let namespace = cluster.namespace().unwrap_or_default();
    let field = format!("spec.podTypes[{index}].podConfig");
    let config = pod_type.pod_config.to_value();
    let mut pod: Pod = serde_path_to_error::deserialize(config.clone()).map_err(|e| InvalidSpec {
        field: if e.path().to_string() == "." { field.clone() } else { format!("{field}.{}", e.path()) },
        message: e.inner().to_string(),
    })?;
    let Some(spec) = pod.spec.as_mut() else {
        return Err(InvalidSpec { field: format!("{field}.spec"), message: "required".into() });
    };
    // Ray never calls the Kubernetes API (this operator is its autoscaler), so a pod that asks for
    // no ServiceAccount gets no token either: the namespace's `default` account may have been
    // granted more than Ray should carry. Naming a ServiceAccount or setting the field keeps the
    // user's choice. Not part of the hash: existing pods are not restarted for it.
    let named = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty());
    if !named(&spec.service_account_name) && !named(&spec.service_account) {
        spec.automount_service_account_token.get_or_insert(false);
    }
    let Some(container) = spec.containers.first_mut() else {
        return Err(InvalidSpec {
            field: format!("{field}.spec.containers"),
            message: "at least one container is required".into(),
        });
    };

    let (setup, start): (Vec<String>, Vec<String>) = match kind {
        NodeKind::Head => (
            cluster.spec.head_setup_commands.clone().unwrap_or_default(),
            head_start_commands(cluster.spec.head_start_ray_commands.as_deref().unwrap_or_default()),
        ),
        NodeKind::Worker => (
            cluster.spec.worker_setup_commands.clone().unwrap_or_default(),
            cluster.spec.worker_start_ray_commands.clone().unwrap_or_default(),
        ),
    };
    let setup: Vec<String> = setup.into_iter().chain(pod_type.setup_commands.clone().unwrap_or_default()).collect();
    let resources = ray_resources(container, pod_type.ray_resources.as_ref());

    // The hash covers what the user controls for this type, not what we derive from it, so an
    // operator upgrade that changes the wrapping does not restart every Ray pod.
    // serde_json maps are sorted, so equal inputs hash equally.
    let hash = short_hash(
        &serde_json::json!({
            "podConfig": config,
            "kind": kind.label(),
            "setup": setup,
            "start": start,
            "restart": restart_token(cluster),
            "resources": resources,
        })
        .to_string(),
    );

    container.command = Some(wrap_entrypoint(&setup, &start, container));
    container.args = None;
    inject_ray_probes(container, kind);
    set_ray_env(container, &name, &namespace, &pod_type.name, &resources, kind);

    let meta = &mut pod.metadata;
    let generate = meta.generate_name.take().unwrap_or_else(|| format!("{}-", pod_type.name));
    // The oldest legacy examples already wrote the cluster name into generateName; never double it.
    meta.generate_name =
        Some(if generate.starts_with(&format!("{name}-")) { generate } else { format!("{name}-{generate}") });
    meta.name = None;
    meta.namespace = Some(namespace);
    meta.owner_references = Some(vec![owner_reference(cluster)]);
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(LABEL_CLUSTER.into(), name.clone());
    labels.insert(LABEL_NODE_KIND.into(), kind.label().into());
    labels.insert(LABEL_POD_TYPE.into(), pod_type.name.clone());
    labels.insert(LABEL_LAUNCH_HASH.into(), hash.clone());
    if kind == NodeKind::Head {
        labels.insert(LABEL_COMPONENT.into(), head_service_name(&name));
    }
    // Fields the API server owns; a podConfig copied from `kubectl get -o yaml` may carry them.
    meta.resource_version = None;
    meta.uid = None;
    meta.creation_timestamp = None;
    meta.managed_fields = None;
    pod.status = None;

    let (min_workers, max_workers) = match kind {
        NodeKind::Head => (1, 1),
        NodeKind::Worker => {
            let max = pod_type.max_workers.unwrap_or(u32::MAX).min(cluster.spec.max_workers());
            (pod_type.min_workers.unwrap_or(0).min(max), max)
        }
    };
    Ok(PodTemplate { type_name: pod_type.name.clone(), kind, pod, hash, resources, min_workers, max_workers })
}

/// Builds the desired state, or says which field makes it impossible.
pub fn desired(cluster: &RayCluster) -> Result<Desired, InvalidSpec> {
    let spec = &cluster.spec;
    let Some(head_index) = spec.pod_types.iter().position(|t| t.name == spec.head_pod_type) else {
        return Err(InvalidSpec {
            field: "spec.headPodType".into(),
            message: format!("{:?} is not the name of any spec.podTypes entry", spec.head_pod_type),
        });
    };
    let head = pod_template(cluster, head_index, &spec.pod_types[head_index], NodeKind::Head)?;
    let mut workers = Vec::new();
    for (i, t) in spec.pod_types.iter().enumerate() {
        if i != head_index {
            workers.push(pod_template(cluster, i, t, NodeKind::Worker)?);
        }
    }
    let service = head_service(cluster);
    let service_hash = short_hash(&serde_json::to_string(&service.spec).unwrap_or_default());
    Ok(Desired { service, service_hash, head, workers, gcs_port: gcs_port(cluster) })
}
