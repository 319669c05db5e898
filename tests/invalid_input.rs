//! A corpus of invalid RayClusters: each is rejected at admission with a message naming the field,
//! or ends in phase Error with a Ready=False condition naming the field and a Warning Event — and a
//! valid cluster beside them keeps working.

mod support;

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::{Api, Client};
use ray_operator::api::{Phase, RayCluster};
use support::*;

/// A valid single-worker-type cluster whose parts the cases below break.
fn base(name: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "cluster.ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": name},
        "spec": {
            "maxWorkers": 2,
            "headPodType": "head",
            "podTypes": [
                {"name": "head", "podConfig": {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"generateName": "ray-head-"},
                    "spec": {"containers": [{"name": "ray", "image": "rayproject/ray", "command": ["sleep", "infinity"]}]}}},
                {"name": "worker", "minWorkers": 1, "maxWorkers": 2, "podConfig": {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"generateName": "ray-worker-"},
                    "spec": {"containers": [{"name": "ray", "image": "rayproject/ray", "command": ["sleep", "infinity"]}]}}}
            ]
        }
    })
}

type Edit = fn(&mut serde_json::Value);

/// Cases the API server must reject: (name, edit, text the error must contain).
fn rejected_cases() -> Vec<(&'static str, Edit, &'static str)> {
    vec![
        ("head-type-unknown", |v| v["spec"]["headPodType"] = "nope".into(), "spec.headPodType"),
        ("duplicate-type-names", |v| v["spec"]["podTypes"][1]["name"] = "head".into(), "spec.podTypes[1]"),
        ("min-above-max", |v| v["spec"]["podTypes"][1]["minWorkers"] = 3.into(), "spec.podTypes[1].minWorkers"),
        ("negative-max-workers", |v| v["spec"]["maxWorkers"] = (-1).into(), "spec.maxWorkers"),
        (
            "negative-min-workers",
            |v| v["spec"]["podTypes"][1]["minWorkers"] = (-2).into(),
            "spec.podTypes[1].minWorkers",
        ),
        ("negative-type-max", |v| v["spec"]["podTypes"][1]["maxWorkers"] = (-1).into(), "spec.podTypes[1].maxWorkers"),
        ("negative-upscaling-speed", |v| v["spec"]["upscalingSpeed"] = (-0.5).into(), "spec.upscalingSpeed"),
        ("negative-idle-timeout", |v| v["spec"]["idleTimeoutMinutes"] = (-1).into(), "spec.idleTimeoutMinutes"),
        (
            "no-containers",
            |v| {
                v["spec"]["podTypes"][1]["podConfig"]["spec"].as_object_mut().unwrap().remove("containers");
            },
            "spec.podTypes[1].podConfig.spec.containers",
        ),
        (
            "empty-containers",
            |v| v["spec"]["podTypes"][1]["podConfig"]["spec"]["containers"] = serde_json::json!([]),
            "spec.podTypes[1].podConfig.spec.containers",
        ),
        (
            "no-pod-spec",
            |v| {
                v["spec"]["podTypes"][0]["podConfig"].as_object_mut().unwrap().remove("spec");
            },
            "spec.podTypes[0].podConfig.spec",
        ),
        (
            "missing-head-pod-type",
            |v| {
                v["spec"].as_object_mut().unwrap().remove("headPodType");
            },
            "spec.headPodType",
        ),
        (
            "missing-pod-types",
            |v| {
                v["spec"].as_object_mut().unwrap().remove("podTypes");
            },
            "spec.podTypes",
        ),
        (
            "type-without-pod-config",
            |v| {
                v["spec"]["podTypes"][1].as_object_mut().unwrap().remove("podConfig");
            },
            "spec.podTypes[1].podConfig",
        ),
        (
            "ray-resources-not-numbers",
            |v| v["spec"]["podTypes"][1]["rayResources"] = serde_json::json!({"Custom1": "lots"}),
            "spec.podTypes[1].rayResources.Custom1",
        ),
        (
            "service-port-out-of-range",
            |v| v["spec"]["headServicePorts"] = serde_json::json!([{"name": "x", "port": 70000, "targetPort": 1}]),
            "spec.headServicePorts[0].port",
        ),
        ("max-workers-not-a-number", |v| v["spec"]["maxWorkers"] = "three".into(), "spec.maxWorkers"),
    ]
}

/// Cases only the operator can judge: (name, edit, text the Ready condition must contain).
fn error_cases() -> Vec<(&'static str, Edit, &'static str)> {
    vec![
        (
            "image-not-a-string",
            |v| v["spec"]["podTypes"][1]["podConfig"]["spec"]["containers"][0]["image"] = 42.into(),
            "spec.podTypes[1].podConfig.spec.containers[0].image",
        ),
        (
            "pod-config-not-a-pod",
            |v| v["spec"]["podTypes"][0]["podConfig"]["kind"] = "Deployment".into(),
            "spec.podTypes[0].podConfig",
        ),
        (
            "container-name-invalid",
            |v| v["spec"]["podTypes"][1]["podConfig"]["spec"]["containers"][0]["name"] = "Not_Valid".into(),
            "spec.containers[0].name",
        ),
        (
            "restart-policy-invalid",
            |v| v["spec"]["podTypes"][0]["podConfig"]["spec"]["restartPolicy"] = "Sometimes".into(),
            "restartPolicy",
        ),
    ]
}

async fn wait_error(client: &Client, ns: &str, name: &str) -> (String, String) {
    let api: Api<RayCluster> = Api::namespaced(client.clone(), ns);
    wait_until(Duration::from_secs(60), &format!("{name} in phase Error"), || async {
        let s = api.get(name).await.ok()?.status?;
        if s.phase != Some(Phase::Error) {
            return None;
        }
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready")?;
        (ready.status == "False").then(|| (ready.reason.clone(), ready.message.clone()))
    })
    .await
}

#[tokio::test]
async fn invalid_clusters_are_rejected_or_reported_and_valid_ones_keep_working() {
    install_crd();
    let client = client().await;
    let ns = TestNamespace::new(&client, "invalid").await;
    let op = OperatorProcess::start(&["--no-leader-election", "--namespaces", &ns.name], &[]);

    let rejected = rejected_cases();
    let errors = error_cases();
    assert!(rejected.len() + errors.len() >= 15);
    for (name, edit, field) in &rejected {
        let mut v = base(name);
        edit(&mut v);
        let err = try_apply_yaml(&ns.name, &serde_json::to_string(&v).unwrap())
            .expect_err(&format!("{name} must be rejected at admission"));
        assert!(err.contains(field), "{name}: error does not name {field}: {err}");
    }

    apply_yaml(&ns.name, &serde_json::to_string(&base("valid")).unwrap());
    for (name, edit, _) in &errors {
        let mut v = base(name);
        edit(&mut v);
        apply_yaml(&ns.name, &serde_json::to_string(&v).unwrap());
    }
    for (name, _, field) in &errors {
        let (reason, message) = wait_error(&client, &ns.name, name).await;
        assert_eq!(reason, "InvalidSpec", "{name}");
        assert!(message.contains(field), "{name}: condition does not name {field}: {message}");
    }

    // The valid cluster is unaffected.
    let api: Api<RayCluster> = Api::namespaced(client.clone(), &ns.name);
    wait_until(Duration::from_secs(60), "valid cluster Running", || async {
        (api.get("valid").await.ok()?.status?.phase == Some(Phase::Running)).then_some(())
    })
    .await;

    // Warning Events name the problem, and nothing is retried while the object is unchanged.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let warnings = wait_until(Duration::from_secs(20), "warning events", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        let w: Vec<Event> = list.items.into_iter().filter(|e| e.type_.as_deref() == Some("Warning")).collect();
        (w.len() >= errors.len()).then_some(w)
    })
    .await;
    for (name, _, _) in &errors {
        assert!(
            warnings.iter().any(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)),
            "no Warning event for {name}"
        );
    }
    let count = |logs: &str| logs.lines().filter(|l| l.contains("rejected") || l.contains("invalid spec")).count();
    let before = count(&op.logs());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count(&op.logs()), before, "no retry storm on invalid input");
    assert!(!op.logs().contains("panicked"));

    // Fixing the spec clears the error, message included (a merge patch that merely omits a
    // field leaves it in place: the status is written with explicit nulls).
    let s = api.get("image-not-a-string").await.unwrap().status.unwrap();
    assert!(s.message.as_deref().is_some_and(|m| m.contains("image")), "the error has a message: {s:?}");
    let fixed = base("image-not-a-string");
    apply_yaml(&ns.name, &serde_json::to_string(&fixed).unwrap());
    let s = wait_until(Duration::from_secs(60), "fixed cluster Running", || async {
        let s = api.get("image-not-a-string").await.ok()?.status?;
        (s.phase == Some(Phase::Running)).then_some(s)
    })
    .await;
    assert_eq!(s.message, None, "status.message is gone once the spec is fixed: {s:?}");
}
