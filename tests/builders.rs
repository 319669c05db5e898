//! Pure builders from YAML fixtures (the shipped example manifests): pods, Service, hashes, Ray
//! resources, command wrapping, and the CRD file staying equal to the code.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use ray_operator::api::RayCluster;
use ray_operator::model::desired::{self, LABEL_COMPONENT, NodeKind};
use ray_operator::model::observed::{ObservedPod, PodPhase};
use ray_operator::pass::plan::{self, Action, Observed};

fn load(path: &str) -> RayCluster {
    let text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let mut c: RayCluster = serde_yaml::from_str(&text).unwrap();
    c.metadata.namespace = Some("ray".into());
    c.metadata.uid = Some("uid-1".into());
    c
}

fn env_of(pod: &k8s_openapi::api::core::v1::Pod) -> BTreeMap<String, String> {
    pod.spec.as_ref().unwrap().containers[0]
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| {
            let v = e
                .value
                .clone()
                .unwrap_or_else(|| e.value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path.clone());
            (e.name.clone(), v)
        })
        .collect()
}

#[test]
fn crd_files_equal_generated_crd() {
    let generated = ray_operator::api::crd_yaml().unwrap();
    for f in ["crds/cluster_crd.yaml", "deploy/cluster_crd.yaml"] {
        let on_disk = std::fs::read_to_string(format!("{}/{f}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert!(on_disk == generated, "{f} differs from `ray-operator crd`; run `make crd`");
    }
    // Small enough for client-side apply (annotation limit 256 KiB, with room to spare).
    assert!(generated.len() < 64 * 1024, "CRD is {} bytes", generated.len());
}

#[test]
fn example_cluster_head_and_workers() {
    let c = load("deploy/example_cluster.yaml");
    let d = desired::desired(&c).unwrap();
    // generateName already carries the cluster name: never doubled.
    assert_eq!(d.head.pod.metadata.generate_name.as_deref(), Some("example-cluster-ray-head-"));
    assert_eq!(d.workers.len(), 1);
    let w = &d.workers[0];
    assert_eq!(w.pod.metadata.generate_name.as_deref(), Some("example-cluster-ray-worker-"));
    assert_eq!((w.min_workers, w.max_workers), (2, 3));
    assert_eq!(w.kind, NodeKind::Worker);

    let labels = d.head.pod.metadata.labels.clone().unwrap();
    assert_eq!(labels["ray-cluster-name"], "example-cluster");
    assert_eq!(labels["ray-node-type"], "head");
    assert_eq!(labels["ray-user-node-type"], "head-node");
    assert_eq!(labels["ray-launch-config"], d.head.hash);
    assert_eq!(labels[LABEL_COMPONENT], "example-cluster-ray-head");
    let wl = w.pod.metadata.labels.clone().unwrap();
    assert_eq!(wl["ray-node-type"], "worker");
    assert!(!wl.contains_key(LABEL_COMPONENT), "workers are not selected by the head Service");

    let owner = &d.head.pod.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
        ("RayCluster", "example-cluster", "uid-1")
    );
    assert_eq!(owner.controller, Some(true));
    assert_eq!(d.head.pod.metadata.namespace.as_deref(), Some("ray"));

    let env = env_of(&d.head.pod);
    assert_eq!(env["RAY_HEAD_IP"], "example-cluster-ray-head.ray.svc");
    assert_eq!(env["RAY_CLOUD_INSTANCE_ID"], "metadata.name");
    assert_eq!(env["RAY_NODE_TYPE_NAME"], "head-node");
    assert_eq!(env["RAY_enable_autoscaler_v2"], "1");
    let wenv = env_of(&w.pod);
    assert_eq!(wenv["RAY_NODE_TYPE_NAME"], "worker-node");
    let advertised: BTreeMap<String, f64> = serde_json::from_str(&wenv["RAY_OVERRIDE_RESOURCES"]).unwrap();
    assert_eq!(advertised, w.resources, "Ray advertises what the autoscaler plans with");
    assert!(!wenv.contains_key("RAY_enable_autoscaler_v2"));

    // Ray resources from requests/limits plus rayResources.
    assert_eq!(
        w.resources,
        BTreeMap::from([
            ("CPU".to_string(), 1.0),
            ("memory".to_string(), 536870912.0),
            ("foo".to_string(), 1.0),
            ("bar".to_string(), 1.0)
        ])
    );
}

#[test]
fn example_cluster2_generate_name_is_prefixed() {
    let c = load("deploy/example_cluster2.yaml");
    let d = desired::desired(&c).unwrap();
    assert_eq!(d.head.pod.metadata.generate_name.as_deref(), Some("example-cluster2-ray-head-"));
    assert_eq!(d.workers[0].pod.metadata.generate_name.as_deref(), Some("example-cluster2-ray-worker-"));
    assert_eq!(d.workers[0].min_workers, 1);
}

#[test]
fn entrypoint_runs_setup_then_start_then_original_command() {
    let mut c = load("deploy/example_cluster.yaml");
    c.spec.head_setup_commands = Some(vec!["echo head-setup".into()]);
    c.spec.pod_types[0].setup_commands = Some(vec!["echo type-setup".into()]);
    let d = desired::desired(&c).unwrap();
    let container = &d.head.pod.spec.as_ref().unwrap().containers[0];
    let cmd = container.command.clone().unwrap();
    assert_eq!(&cmd[..2], &["/bin/bash".to_string(), "-c".to_string()]);
    assert!(container.args.is_none());
    let script = &cmd[2];
    let pos = |s: &str| script.find(s).unwrap_or_else(|| panic!("{s:?} not in {script}"));
    assert!(pos("echo head-setup") < pos("echo type-setup"));
    assert!(pos("echo type-setup") < pos("ray stop"));
    assert!(pos("ray stop") < pos("ray start --head --no-monitor"));
    assert!(pos("ray start --head") < pos("exec '/bin/bash' '-c' '--' 'trap : TERM INT; sleep infinity & wait;'"));
    // Workers do not get head setup commands.
    let wscript = d.workers[0].pod.spec.as_ref().unwrap().containers[0].command.clone().unwrap()[2].clone();
    assert!(!wscript.contains("head-setup"));
    assert!(wscript.contains("ray start --address=$RAY_HEAD_IP:6379"));
}

#[test]
fn head_gets_no_monitor_even_if_the_user_forgot_it() {
    let mut c = load("deploy/example_cluster.yaml");
    c.spec.head_start_ray_commands = Some(vec!["ray start --head --port=6380".into()]);
    let d = desired::desired(&c).unwrap();
    let script = d.head.pod.spec.as_ref().unwrap().containers[0].command.clone().unwrap()[2].clone();
    assert!(script.contains("ray start --head --no-monitor --port=6380"));
    assert_eq!(d.gcs_port, 6380);
}

#[test]
fn service_ports_merge_by_name() {
    let mut c = load("deploy/example_cluster.yaml");
    let svc = desired::head_service(&c);
    let ports: Vec<(String, i32)> =
        svc.spec.as_ref().unwrap().ports.as_ref().unwrap().iter().map(|p| (p.name.clone().unwrap(), p.port)).collect();
    assert_eq!(
        ports,
        vec![("client".into(), 10001), ("dashboard".into(), 8265), ("ray-serve".into(), 8000), ("gcs".into(), 6379)]
    );
    assert_eq!(svc.metadata.name.as_deref(), Some("example-cluster-ray-head"));
    assert_eq!(svc.spec.as_ref().unwrap().selector.as_ref().unwrap()[LABEL_COMPONENT], "example-cluster-ray-head");

    c.spec.head_service_ports = Some(
        serde_yaml::from_str(
            "[{name: dashboard, port: 9999, targetPort: 8265}, {name: metrics, port: 8080, targetPort: metrics}]",
        )
        .unwrap(),
    );
    let svc = desired::head_service(&c);
    let ports = svc.spec.unwrap().ports.unwrap();
    let names: Vec<&str> = ports.iter().map(|p| p.name.as_deref().unwrap()).collect();
    assert_eq!(names, ["client", "dashboard", "ray-serve", "gcs", "metrics"]);
    assert_eq!(ports[1].port, 9999);
    assert_eq!(ports[4].target_port, Some(IntOrString::String("metrics".into())));
}

#[test]
fn hash_changes_only_with_what_shapes_the_pod() {
    let base = load("deploy/example_cluster.yaml");
    let d0 = desired::desired(&base).unwrap();
    // Same input, same hash.
    assert_eq!(d0, desired::desired(&base).unwrap());

    let mut worker_changed = base.clone();
    worker_changed.spec.pod_types[1]
        .pod_config
        .edit(|v| v["spec"]["containers"][0]["image"] = "rayproject/ray:2.60.0".into());
    let d1 = desired::desired(&worker_changed).unwrap();
    assert_eq!(d1.head.hash, d0.head.hash, "a worker change leaves the head alone");
    assert_ne!(d1.workers[0].hash, d0.workers[0].hash);

    let mut annotated = base.clone();
    annotated.metadata.annotations = Some(BTreeMap::from([("try".to_string(), "again".to_string())]));
    let d2 = desired::desired(&annotated).unwrap();
    assert_ne!(d2.head.hash, d0.head.hash, "a user annotation restarts everything");
    assert_ne!(d2.workers[0].hash, d0.workers[0].hash);

    let mut ours = base.clone();
    ours.metadata.annotations = Some(BTreeMap::from([
        ("kubectl.kubernetes.io/last-applied-configuration".to_string(), "{}".to_string()),
        ("cluster.ray.io/gcs-address".to_string(), "127.0.0.1:6379".to_string()),
    ]));
    let d3 = desired::desired(&ours).unwrap();
    assert_eq!(d3.head.hash, d0.head.hash, "kubectl's and our own annotations do not restart Ray");

    let mut resources = base.clone();
    resources.spec.pod_types[1].ray_resources = Some(BTreeMap::from([("foo".to_string(), 2.0)]));
    assert_ne!(
        desired::desired(&resources).unwrap().workers[0].hash,
        d0.workers[0].hash,
        "rayResources restart the type"
    );

    let mut scaled = base.clone();
    scaled.spec.pod_types[1].max_workers = Some(5);
    assert_eq!(desired::desired(&scaled).unwrap().workers[0].hash, d0.workers[0].hash, "bounds are not pod shape");
}

#[test]
fn invalid_pod_config_names_the_field() {
    let mut c = load("deploy/example_cluster.yaml");
    c.spec.pod_types[1].pod_config.edit(|v| v["spec"]["containers"][0]["image"] = serde_json::json!(42));
    let err = desired::desired(&c).unwrap_err();
    assert!(err.field.starts_with("spec.podTypes[1].podConfig.spec.containers[0].image"), "{err}");
    assert!(err.message.contains("invalid type"), "{err}");
}

fn observed(d: &desired::Desired, ready: bool) -> Vec<ObservedPod> {
    let mut pods = vec![ObservedPod {
        name: "h".into(),
        uid: "uh".into(),
        kind: NodeKind::Head,
        type_name: d.head.type_name.clone(),
        hash: d.head.hash.clone(),
        phase: PodPhase::Running,
        ready,
        terminating: false,
        ip: None,
        unschedulable_since: None,
    }];
    for i in 0..2 {
        pods.push(ObservedPod {
            name: format!("w{i}"),
            uid: format!("uw{i}"),
            kind: NodeKind::Worker,
            type_name: d.workers[0].type_name.clone(),
            hash: d.workers[0].hash.clone(),
            phase: PodPhase::Running,
            ready,
            terminating: false,
            ip: None,
            unschedulable_since: None,
        });
    }
    pods
}

#[test]
fn plan_is_idempotent_once_carried_out() {
    let c = load("deploy/example_cluster.yaml");
    let d = desired::desired(&c).unwrap();
    let targets = plan::min_worker_targets(&d, c.spec.max_workers());
    let empty = plan::plan(&d, &Observed::default(), &targets);
    assert_eq!(
        empty.actions,
        vec![
            Action::ApplyService,
            Action::CreatePods { worker: None, count: 1 },
            Action::CreatePods { worker: Some(0), count: 2 }
        ]
    );
    let pods = observed(&d, true);
    let svc_hash = d.service_hash.clone();
    let obs = Observed { pods: &pods, service_hash: Some(&svc_hash), status: None, generation: Some(1) };
    let p = plan::plan(&d, &obs, &targets);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    let now = k8s_openapi::jiff::Timestamp::now();
    let s1 = plan::status(&d, &obs, &targets, &p, Some("h".into()), now);
    assert_eq!(s1.phase, Some(ray_operator::api::Phase::Running));
    assert_eq!(s1.workers.as_deref(), Some("2/2"));
    // Same observation later: identical status (transition times kept), so no write.
    let obs2 = Observed { status: Some(&s1), ..obs.clone() };
    let s2 = plan::status(
        &d,
        &obs2,
        &targets,
        &p,
        None,
        now.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(60)).unwrap(),
    );
    assert_eq!(s1, s2);
}

#[test]
fn outdated_workers_roll_a_few_at_a_time() {
    let c = load("deploy/example_cluster.yaml");
    let d = desired::desired(&c).unwrap();
    let mut pods = observed(&d, true);
    for p in pods.iter_mut().skip(1) {
        p.hash = "old".into();
    }
    let svc_hash = d.service_hash.clone();
    let obs = Observed { pods: &pods, service_hash: Some(&svc_hash), status: None, generation: Some(2) };
    let targets = plan::min_worker_targets(&d, 3);
    let p = plan::plan(&d, &obs, &targets);
    // New ones first (surge 2), old ones stay until replacements are ready.
    assert_eq!(p.actions, vec![Action::CreatePods { worker: Some(0), count: 2 }]);
}

#[test]
fn finished_head_is_recovered() {
    let c = load("deploy/example_cluster.yaml");
    let d = desired::desired(&c).unwrap();
    let mut pods = observed(&d, true);
    pods[0].phase = PodPhase::Finished;
    let svc_hash = d.service_hash.clone();
    let obs = Observed { pods: &pods, service_hash: Some(&svc_hash), status: None, generation: Some(1) };
    let p = plan::plan(&d, &obs, &plan::min_worker_targets(&d, 3));
    assert!(p.head_recovery);
    assert!(p.actions.contains(&Action::CreatePods { worker: None, count: 1 }));
    assert!(p.actions.iter().any(|a| matches!(a, Action::DeletePod { name, .. } if name == "h")));
}

#[test]
fn ray_pods_get_probes_that_fail_when_ray_dies_unless_they_bring_their_own() {
    let c = load("deploy/example_cluster.yaml");
    let d = desired::desired(&c).unwrap();
    let probe_cmd = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref().unwrap().exec.as_ref().unwrap().command.clone().unwrap()[2].clone()
    };
    let head = &d.head.pod.spec.as_ref().unwrap().containers[0];
    assert_eq!(
        probe_cmd(&head.liveness_probe),
        "grep -qsx gcs_server /proc/[0-9]*/comm && grep -qsx raylet /proc/[0-9]*/comm"
    );
    assert_eq!(probe_cmd(&head.startup_probe), probe_cmd(&head.liveness_probe));
    let worker = &d.workers[0].pod.spec.as_ref().unwrap().containers[0];
    assert_eq!(probe_cmd(&worker.liveness_probe), "grep -qsx raylet /proc/[0-9]*/comm");
    // ray start may take minutes (setup commands, image start); death is noticed within ~15 s.
    let s = worker.startup_probe.as_ref().unwrap();
    assert!(s.period_seconds.unwrap() * s.failure_threshold.unwrap() >= 300);
    let l = worker.liveness_probe.as_ref().unwrap();
    assert!(l.period_seconds.unwrap() * l.failure_threshold.unwrap() <= 15);
    // A container with a probe of its own keeps it (and gets none of ours).
    let mut own = c.clone();
    own.spec.pod_types[1].pod_config.edit(|config| {
        config["spec"]["containers"][0]["livenessProbe"] = serde_json::json!({"tcpSocket": {"port": 6379}});
    });
    let mine = desired::desired(&own).unwrap();
    let w = &mine.workers[0].pod.spec.as_ref().unwrap().containers[0];
    assert!(w.liveness_probe.as_ref().unwrap().tcp_socket.is_some(), "the user's probe is kept");
    assert!(w.startup_probe.is_none(), "and none is added beside it");
}

#[test]
fn a_line_fails_the_container_only_when_its_last_command_fails() {
    let container = k8s_openapi::api::core::v1::Container {
        command: Some(vec!["echo".into(), "original".into()]),
        ..Default::default()
    };
    let run = |setup: &[&str]| {
        let setup: Vec<String> = setup.iter().map(|s| s.to_string()).collect();
        let cmd = desired::wrap_entrypoint(&setup, &["echo started $X".into()], &container);
        let out = std::process::Command::new(&cmd[0]).args(&cmd[1..]).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // The examples' `ulimit -n 65536; ray start`: the refused ulimit (simulated by `false`) does not
    // stop the line; an export carries over to the next line.
    assert_eq!(run(&["false; export X=1"]), (Some(0), "started 1\noriginal\n".into()));
    // A line whose last command fails stops the container with that status, before Ray starts.
    assert_eq!(run(&["true; exit 3"]).0, Some(3));
    assert_eq!(run(&["echo a; false"]), (Some(1), "a\n".into()));
}
