//! A small world for [`ray_operator::pass::decide`]: a RayCluster with a head type and two worker
//! types, pods and Ray nodes written as one-line strings, and the result of carrying a decision
//! out (for "a second pass is a no-op"). Used by the table cases (`tests/pass.rs`) and the
//! properties (`tests/pass_properties.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use ray_operator::api::{RayCluster, RayClusterStatus};
use ray_operator::autoscaler::scale::{DrainState, LinkHealth};
use ray_operator::model::desired::{self, Desired, InvalidSpec, NodeKind};
use ray_operator::model::observed::{ObservedPod, ObservedService, PodPhase};
use ray_operator::pass::{
    self, AutoscalerSettings, LinkAction, Memory, PassDecision, PassInput, PassSettings, RayView,
};
use ray_operator::ray::{ClusterState, HEAD_NODE_RESOURCE, NodeStatus, RayNode, ResourceDemand};
use serde_json::{Value, json};

/// The cluster every case starts from: head `head` (1 CPU), workers `small` (1 CPU, 1..4) and
/// `large` (4 CPU, 0..2), at most 5 workers in all.
pub fn base_cluster() -> Value {
    let pod = |cpu: &str| json!({"spec": {"containers": [{"name": "ray", "image": "ray:2.60", "resources": {"requests": {"cpu": cpu}}}]}});
    json!({
        "apiVersion": "cluster.ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "c", "namespace": "ns", "uid": "u1", "generation": 1},
        "spec": {
            "maxWorkers": 5,
            "idleTimeoutMinutes": 1,
            "headPodType": "head",
            "podTypes": [
                {"name": "head", "podConfig": pod("1")},
                {"name": "small", "minWorkers": 1, "maxWorkers": 4, "podConfig": pod("1")},
                {"name": "large", "minWorkers": 0, "maxWorkers": 2, "podConfig": pod("4")},
            ]
        }
    })
}

/// The time every case runs at.
pub fn now() -> Timestamp {
    "2026-12-01T00:00:00Z".parse().expect("timestamp")
}

pub fn ago(secs: i64) -> Timestamp {
    now().checked_sub(SignedDuration::from_secs(secs)).expect("timestamp")
}

/// Everything `decide` reads, owned.
#[derive(Clone, Debug)]
pub struct World {
    pub cluster: RayCluster,
    pub desired: Result<Desired, InvalidSpec>,
    pub pods: Vec<ObservedPod>,
    pub service: Option<ObservedService>,
    /// `Some` while a link runs: its address, health, snapshot and drains.
    pub link: Option<Link>,
    pub memory: Memory,
    pub now: Timestamp,
    pub settings: PassSettings,
}

#[derive(Clone, Debug)]
pub struct Link {
    pub addr: String,
    pub health: LinkHealth,
    pub snapshot: Option<ClusterState>,
    pub drains: BTreeMap<String, DrainState>,
}

pub fn settings(autoscaler: bool) -> PassSettings {
    PassSettings {
        create_batch: 100,
        autoscaler: autoscaler.then(|| AutoscalerSettings {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            // The fixtures exercise the override.
            gcs_address_annotation: true,
            registration_timeout: Duration::from_secs(600),
            head_gcs_grace: Duration::from_secs(60),
        }),
        unschedulable_timeout: Duration::from_secs(60),
    }
}

impl World {
    pub fn new(cluster: RayCluster, autoscaler: bool) -> Self {
        let desired = desired::desired(&cluster);
        World {
            cluster,
            desired,
            pods: vec![],
            service: None,
            link: None,
            memory: Memory::default(),
            now: now(),
            settings: settings(autoscaler),
        }
    }

    pub fn desired(&self) -> &Desired {
        self.desired.as_ref().expect("a valid spec")
    }

    /// The head Service as the operator applied it.
    pub fn service_applied(&mut self) {
        let hash = self.desired().service_hash.clone();
        self.service = Some(ObservedService { hash, cluster_ip: Some("10.0.0.10".into()) });
    }

    /// The GCS address the pass derives (the link must talk to it to count).
    pub fn gcs_address(&self) -> String {
        let ip = self.service.as_ref().and_then(|s| s.cluster_ip.as_deref());
        pass::gcs_address(&self.cluster, self.desired(), ip, true)
    }

    /// A pod from `"<name> <type> <phase> [ready] [old] [terminating] [unsched=<secs>]"`; the type
    /// `head` makes a head pod.
    pub fn pod(&self, line: &str) -> ObservedPod {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (name, type_name, phase) = (words[0], words[1], words[2]);
        let kind = if type_name == self.cluster.spec.head_pod_type { NodeKind::Head } else { NodeKind::Worker };
        let current = match (&self.desired, kind) {
            (Ok(d), NodeKind::Head) => d.head.hash.clone(),
            (Ok(d), NodeKind::Worker) => {
                d.workers.iter().find(|t| t.type_name == type_name).map_or("gone".into(), |t| t.hash.clone())
            }
            (Err(_), _) => "any".into(),
        };
        let flags = &words[3..];
        ObservedPod {
            name: name.into(),
            uid: format!("uid-{name}"),
            kind,
            type_name: type_name.into(),
            hash: if flags.contains(&"old") { "old".into() } else { current },
            phase: match phase {
                "Pending" => PodPhase::Pending,
                "Running" => PodPhase::Running,
                "Finished" => PodPhase::Finished,
                _ => PodPhase::Unknown,
            },
            ready: flags.contains(&"ready"),
            terminating: flags.contains(&"terminating"),
            ip: None,
            unschedulable_since: flags
                .iter()
                .find_map(|f| f.strip_prefix("unsched="))
                .map(|s| ago(s.parse().expect("unsched=<secs>"))),
        }
    }

    /// A Ray node of pod `<pod>` from `"<pod> idle=<secs>|running|dead|draining"`.
    pub fn node(&self, line: &str) -> RayNode {
        let words: Vec<&str> = line.split_whitespace().collect();
        let pod = self.pods.iter().find(|p| p.name == words[0]);
        let type_name = pod.map_or("small".to_string(), |p| p.type_name.clone());
        let mut total = self
            .desired
            .as_ref()
            .ok()
            .and_then(|d| {
                std::iter::once(&d.head)
                    .chain(&d.workers)
                    .find(|t| t.type_name == type_name)
                    .map(|t| t.resources.clone())
            })
            .unwrap_or_default();
        if pod.is_some_and(|p| p.kind == NodeKind::Head) {
            total.insert(HEAD_NODE_RESOURCE.into(), 1.0);
        }
        let state = words.get(1).copied().unwrap_or("running");
        let (status, idle_ms) = match state {
            "dead" => (NodeStatus::Dead, 0),
            "draining" => (NodeStatus::Draining, 0),
            "running" => (NodeStatus::Running, 0),
            idle => {
                let secs: i64 = idle.strip_prefix("idle=").and_then(|s| s.parse().ok()).expect("idle=<secs>");
                (NodeStatus::Idle, secs * 1000)
            }
        };
        let available = if status == NodeStatus::Idle { total.clone() } else { Default::default() };
        RayNode {
            node_id: format!("n-{}", words[0]),
            instance_id: words[0].into(),
            ray_node_type_name: type_name,
            status,
            total_resources: total,
            available_resources: available,
            idle_duration_ms: idle_ms,
            ..Default::default()
        }
    }

    /// A healthy link to the right address with this snapshot.
    pub fn ray(&mut self, nodes: Vec<RayNode>, demand: Vec<ResourceDemand>) {
        let snapshot = ClusterState {
            version: 1,
            session_name: "session".into(),
            nodes,
            pending_resource_requests: demand,
            ..Default::default()
        };
        self.link = Some(Link {
            addr: self.gcs_address(),
            health: LinkHealth::Healthy,
            snapshot: Some(snapshot),
            drains: BTreeMap::new(),
        });
    }

    pub fn input(&self) -> PassInput<'_> {
        PassInput {
            cluster: &self.cluster,
            desired: &self.desired,
            pods: &self.pods,
            service: self.service.as_ref(),
            ray: self.link.as_ref().map(|l| RayView {
                addr: &l.addr,
                health: &l.health,
                snapshot: l.snapshot.as_ref(),
                drains: &l.drains,
            }),
            memory: &self.memory,
            now: self.now,
            settings: &self.settings,
        }
    }

    pub fn decide(&self) -> PassDecision {
        pass::decide(&self.input())
    }

    /// The world after `decision` was carried out and every watch event arrived: created pods
    /// exist (pending), deleted ones are gone, drains are requested, the status and the memory
    /// are the decision's. Ray's own view is left as it was (nothing registered yet).
    pub fn apply(&mut self, decision: &PassDecision) -> PassDecision {
        let mut decision = decision.clone();
        if decision.writes.apply_service {
            self.service_applied();
        }
        self.pods.retain(|p| !decision.writes.deletes.iter().any(|d| d.name == p.name));
        let mut n = self.pods.len();
        for c in decision.writes.creates.clone() {
            let (type_name, kind) = match c.worker {
                None => (self.desired().head.type_name.clone(), NodeKind::Head),
                Some(i) => (self.desired().workers[i].type_name.clone(), NodeKind::Worker),
            };
            for _ in 0..c.count {
                n += 1;
                let name = format!("{type_name}-new-{n}");
                let mut pod = self.pod(&format!("{name} {type_name} Pending"));
                pod.kind = kind;
                if kind == NodeKind::Head {
                    decision.head_created(&name);
                }
                self.pods.push(pod);
            }
        }
        if let Some(status) = &decision.status {
            self.cluster.status = Some(status.clone());
        }
        self.memory = decision.memory.clone();
        match &decision.ray.link {
            LinkAction::Stop => self.link = None,
            LinkAction::Connect(addr) => {
                self.link = Some(Link {
                    addr: addr.clone(),
                    health: LinkHealth::Connecting,
                    snapshot: None,
                    drains: BTreeMap::new(),
                })
            }
            LinkAction::Keep => {}
        }
        if let Some(link) = self.link.as_mut() {
            for pod in &decision.ray.forget_drains {
                link.drains.remove(pod);
            }
            for d in &decision.ray.drains {
                link.drains.entry(d.pod.clone()).or_insert(DrainState::Requested);
            }
        }
        decision
    }
}

/// A RayClusterStatus from JSON (for the cases' previous status).
pub fn status_from(value: Value) -> RayClusterStatus {
    serde_json::from_value(value).expect("status")
}
