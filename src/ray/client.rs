//! [`GcsClient`]: the gRPC client of the GCS `AutoscalerStateService`.
//!
//! Design points, each from a way the GCS can hurt an external autoscaler:
//! - **Every call has a timeout** (the one given to `connect`), enforced on our side and also sent
//!   as `grpc-timeout`: a head that is down, restarting or partitioned must stall one loop
//!   iteration, never the operator.
//! - **`last_seen_cluster_resource_state_version` is always 0.** The GCS aborts its whole process
//!   (`RAY_CHECK`) when the value is larger than its own counter, and that counter restarts from 0
//!   whenever the GCS restarts — so echoing back a version we received is a crash waiting for the
//!   next head restart. The field is only checked, never used, by Ray 2.60; Ray's own autoscaler
//!   sends 0 as well.
//! - **The report version is kept by the client and strictly increases**, across client instances
//!   and operator restarts: the GCS silently drops a report whose `autoscaler_state_version` is
//!   lower than the one it holds. See [`GcsClient::report_autoscaling_state`].
//! - **The head is never drained.** The GCS accepts an idle-termination drain of an idle head, and
//!   the head raylet then exits. [`GcsClient::drain_node`] refuses head nodes itself.
//! - **Connect errors are distinguishable from call errors** ([`RayError::Connect`] vs the rest),
//!   and the client is cheap to recreate (one HTTP/2 connection). Reconnecting with backoff is the
//!   caller's job: after a [`RayError::is_transient`] error, drop the client and connect again.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::transport::{Channel, Endpoint};

use super::proto::{self, autoscaler_state_service_client::AutoscalerStateServiceClient};
use super::state::{ClusterState, GangRequest, ResourceConstraint, ResourceDemand, hex, unhex};

/// Largest cluster-state reply accepted. The head runs the user's image, so its replies are
/// untrusted: the limit must fit a real big cluster and no more. Measured on a real Ray 2.60 head
/// with 3 workers (6 resources and 6 labels per node, pod-like instance ids, all nodes busy): a
/// `GetClusterResourceState` reply of 2,505–2,673 bytes, 590–655 bytes per `NodeState`. The GCS
/// lists every live node and up to 1,000 dead ones, so a 10,000-node cluster answers with about
/// 11,000 × 655 B ≈ 7.2 MB, and ≈ 11 MiB at 1 KiB per node (more resources and labels); 16 MiB
/// leaves that headroom.
pub const MAX_REPLY_BYTES: usize = 16 << 20;

/// Reply limit of a client until [`GcsClient::allow_large_replies`]: about 1,500 nodes. The link
/// gives most clusters only this much, so many concurrent calls cannot add up to much memory.
pub const SMALL_REPLY_BYTES: usize = 1 << 20;

/// Most memory the decoded replies being decoded may take at once, all clients together, as
/// estimated from their wire format before decoding ([`decoded_cost`]). Also the most one reply
/// may take: the reply of a 10,000-node cluster (plus 1,000 dead nodes) of nodes like the measured
/// ones is 7.4 MB and estimated at 83 MiB (`a_ten_thousand_node_cluster_fits_the_limits`), so
/// about 12,000 such nodes fit. A reply over it fails as [`RayError::TooLarge`] without being
/// decoded. Together with the replies being received (28 fast slots × 1 MiB, 4 slow × 16 MiB)
/// this keeps GCS traffic under about 190 MiB of the operator's 256 Mi limit at worst.
pub const DECODE_BUDGET_BYTES: usize = 96 << 20;

/// The decode budget, in KiB (a semaphore counts permits as `u32` when acquiring many).
static DECODE_BUDGET: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(DECODE_BUDGET_BYTES >> 10);

/// At most this many entries go into a report's `infeasible_resource_requests` (Ray lists one
/// entry per request, not per shape). The GCS only compares shapes and the list's length, and
/// `ray status` does not show them, so the cap only bounds the message.
pub const MAX_REPORTED_INFEASIBLE_REQUESTS: usize = 1000;

/// An error talking to the GCS.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RayError {
    /// The address is not `host:port` (or `http://host:port`).
    #[error("invalid GCS address {addr:?}: {message}")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        message: String,
    },
    /// [`GcsClient::connect`] could not open a connection (refused, DNS failure, timeout).
    #[error("cannot connect to the GCS at {addr}: {message}")]
    Connect {
        /// The GCS address.
        addr: String,
        /// The transport error, with its causes.
        message: String,
    },
    /// A call failed because the GCS could not be reached (gRPC `UNAVAILABLE`: connection
    /// refused or reset, head restarting).
    #[error("{method}: the GCS is unreachable: {message}")]
    Unavailable {
        /// The RPC method.
        method: &'static str,
        /// The transport error, with its causes.
        message: String,
    },
    /// The connection was made but the peer does not speak gRPC/HTTP/2 the way a GCS does (it
    /// closed or reset the connection, or broke the protocol): a wrong port, a TLS port, or a
    /// broken head.
    #[error("{method}: protocol error: {message}")]
    Protocol {
        /// The RPC method.
        method: &'static str,
        /// The transport error, with its causes.
        message: String,
    },
    /// The reply is larger than [`MAX_REPLY_BYTES`] (refused from its length prefix, before it
    /// is read).
    #[error("{method}: reply too large: {message}")]
    TooLarge {
        /// The RPC method.
        method: &'static str,
        /// tonic's message (found N bytes, the limit is M).
        message: String,
    },
    /// No reply within the client's timeout (or the server reported `DEADLINE_EXCEEDED`).
    #[error("{method}: no reply within {timeout:?}")]
    Timeout {
        /// The RPC method.
        method: &'static str,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The GCS answered with an error status.
    #[error("{method}: {}: {message}", code_name(*.code))]
    Status {
        /// The RPC method.
        method: &'static str,
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// The reply could not be decoded, or makes no sense (e.g. a negative count).
    #[error("{method}: invalid reply: {message}")]
    Decode {
        /// The RPC method.
        method: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The caller's request is invalid (e.g. a node id that is not hex); nothing was sent.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// [`GcsClient::drain_node`] was asked to drain the head node; nothing was sent.
    #[error("refusing to drain node {node_id}: it is the head node")]
    HeadNode {
        /// The head's node id (hex).
        node_id: String,
    },
}

impl RayError {
    /// A short, bounded label for metrics: `unreachable`, `timeout`, `decode`,
    /// `invalid_address`, `invalid_request`, `head_node`, or the gRPC status code name
    /// (`invalid_argument`, `internal`, `unauthenticated`, …).
    pub fn reason(&self) -> &'static str {
        match self {
            RayError::InvalidAddress { .. } => "invalid_address",
            RayError::Connect { .. } | RayError::Unavailable { .. } => "unreachable",
            RayError::Protocol { .. } => "protocol",
            RayError::TooLarge { .. } => "too_large",
            RayError::Timeout { .. } => "timeout",
            RayError::Status { code, .. } => code_name(*code),
            RayError::Decode { .. } => "decode",
            RayError::InvalidRequest(_) => "invalid_request",
            RayError::HeadNode { .. } => "head_node",
        }
    }

    /// The error classified for people who may not see transport details: condition messages
    /// are read by RayCluster editors, and a raw error would tell them what the operator's
    /// network position can reach ("connection refused" vs "broken pipe"), or echo text chosen
    /// by whoever runs the head. Raw errors go to the operator's debug log only.
    pub fn summary(&self) -> String {
        match self {
            RayError::InvalidAddress { .. } => "invalid address".into(),
            RayError::Connect { .. } | RayError::Unavailable { .. } => "unreachable".into(),
            RayError::Protocol { .. } => "protocol error (the peer is not a GCS, or broke the connection)".into(),
            RayError::Decode { .. } => "protocol error (invalid reply)".into(),
            RayError::TooLarge { .. } => format!("reply larger than the {} MiB limit", MAX_REPLY_BYTES >> 20),
            RayError::Timeout { timeout, .. } => format!("timeout (no reply within {timeout:?})"),
            RayError::Status { code, .. } => format!("the GCS answered {}", code_name(*code)),
            RayError::InvalidRequest(_) => "invalid request".into(),
            RayError::HeadNode { .. } => "refused to drain the head".into(),
        }
    }

    /// Whether the error came from [`GcsClient::connect`] (no connection was ever made), as
    /// opposed to a call on a connected client.
    pub fn is_connect(&self) -> bool {
        matches!(self, RayError::Connect { .. })
    }

    /// Whether the GCS could not be reached or did not answer in time: the head may be down or
    /// restarting. The caller should back off, then recreate the client (the connection may be
    /// dead).
    pub fn is_transient(&self) -> bool {
        matches!(self, RayError::Connect { .. } | RayError::Unavailable { .. } | RayError::Timeout { .. })
    }

    fn from_status(method: &'static str, timeout: Duration, status: tonic::Status) -> Self {
        let message = status_message(&status);
        if timed_out(&status) {
            return RayError::Timeout { method, timeout };
        }
        if status.code() == tonic::Code::OutOfRange
            && status.message().starts_with("Error, decoded message length too large")
        {
            return RayError::TooLarge { method, message };
        }
        if broke_protocol(&status) {
            return RayError::Protocol { method, message };
        }
        match status.code() {
            tonic::Code::Unavailable => RayError::Unavailable { method, message },
            tonic::Code::DeadlineExceeded => RayError::Timeout { method, timeout },
            // tonic-prost reports a reply it cannot decode as INTERNAL with this text.
            tonic::Code::Internal if status.message().starts_with("failed to decode Protobuf message") => {
                RayError::Decode { method, message }
            }
            code => RayError::Status { method, code, message },
        }
    }
}

/// Whether a failed call reached a peer that then closed, reset or garbled the connection (as
/// opposed to never reaching one: refused, no route, DNS). Judged from the error's causes: an I/O
/// error of the kinds a non-gRPC peer causes, or an HTTP/2 protocol error (h2 is not our
/// dependency, so it is recognised by its message).
fn broke_protocol(status: &tonic::Status) -> bool {
    use std::io::ErrorKind;
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof | ErrorKind::InvalidData
            );
        }
        let text = e.to_string();
        if text.contains("protocol error")
            || text.contains("connection closed")
            || text.contains("frame with invalid size")
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// Whether tonic gave up waiting (its connect timeout, which surfaces as `CANCELLED: Timeout
/// expired` on a lazily connecting channel).
fn timed_out(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.downcast_ref::<tonic::TimeoutExpired>().is_some() {
            return true;
        }
        source = e.source();
    }
    status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired"
}

/// The snake_case name of a gRPC status code (a bounded set, for metric labels).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// An error and its chain of causes, `a: b: c` (transport errors say little at the top level).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}

/// The status message, plus the details if they are text: the GCS puts its own status code name
/// in the message (e.g. `ABORTED` "Invalid") and the explanation in the details.
fn status_message(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    if let Ok(details) = std::str::from_utf8(status.details())
        && !details.is_empty()
    {
        text.push_str(": ");
        text.push_str(details);
    }
    if let Some(source) = std::error::Error::source(status) {
        let s = error_chain(source);
        if !text.contains(&s) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&s);
        }
    }
    text
}

/// At most this many entries go into a report's `pending_instance_requests`. Each launched node
/// gets its own entry (with `count` 1) because `ray status` shows the number of entries per type
/// as "N launching", not the sum of their counts.
pub const MAX_REPORTED_PENDING_LAUNCHES: usize = 1000;

/// Why a node is drained (`DrainNodeReason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainReason {
    /// The node has been idle too long. Rejectable: the raylet refuses if the node is no longer
    /// idle when the request arrives, so a race with new work kills nothing.
    IdleTermination,
    /// The node is going away regardless. Not rejectable: running work is preempted.
    Preemption,
}

/// The GCS's answer to a drain request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainOutcome {
    /// Whether the node will drain: it turns DRAINING, then DEAD once empty, and its pod can be
    /// deleted then. The GCS also accepts unknown and dead nodes (nothing to drain).
    pub accepted: bool,
    /// Why the raylet refused (e.g. "The node to be idle terminated is no longer idle."); empty
    /// when accepted.
    pub rejection_reason: String,
}

/// A launch the autoscaler requested that has no pod yet (`PendingInstanceRequest`);
/// `ray status` shows it as ` <node_type>, <count> launching`.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingLaunch {
    /// The pod type.
    pub node_type: String,
    /// How many nodes.
    pub count: u32,
    /// When the launch was decided (sent with one-second precision).
    pub requested_at: SystemTime,
}

/// A pod that exists but whose Ray node has not registered yet (`PendingInstance`); `ray status`
/// shows it as ` <instance_id>: <node_type>, <details>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingInstance {
    /// The pod name (what the node's `RAY_CLOUD_INSTANCE_ID` will be).
    pub instance_id: String,
    /// The pod type.
    pub node_type: String,
    /// The pod IP, if it has one yet.
    pub ip_address: String,
    /// A short status, e.g. "pod pending", "starting ray".
    pub details: String,
}

/// A launch that failed (`FailedInstanceRequest`); `ray status` lists it under "Recent failures".
#[derive(Debug, Clone, PartialEq)]
pub struct FailedLaunch {
    /// The pod type.
    pub node_type: String,
    /// How many nodes could not be launched.
    pub count: u32,
    /// Why (e.g. the API server's message).
    pub reason: String,
    /// When the launch was decided.
    pub requested_at: SystemTime,
    /// When it failed.
    pub failed_at: SystemTime,
}

/// What the autoscaler tells the GCS after each decision (`AutoscalingState`), so that
/// `ray status` on the head shows pending launches and nodes, and drivers are warned about
/// infeasible demand.
///
/// The `autoscaler_state_version` is not part of it: [`GcsClient::report_autoscaling_state`]
/// chooses it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AutoscalingReport {
    /// The [`ClusterState::version`] the decision was based on (informational for the GCS).
    pub cluster_state_version: i64,
    /// Launches decided but without a pod yet.
    pub pending_launches: Vec<PendingLaunch>,
    /// Pods that exist but are not registered in Ray yet.
    pub pending_instances: Vec<PendingInstance>,
    /// Launches that failed.
    pub failed_launches: Vec<FailedLaunch>,
    /// Task and actor demand no node type can ever serve. Careful: with
    /// `RAY_enable_infeasible_task_early_exit=true` on the head, the GCS *cancels* the tasks
    /// whose shape is listed here — so list only truly infeasible shapes, not demand that merely
    /// waits for a launch, and not tasks waiting for their placement group
    /// ([`ResourceDemand::involves_placement_group`]).
    pub infeasible_requests: Vec<ResourceDemand>,
    /// Placement groups that cannot be placed.
    pub infeasible_gang_requests: Vec<GangRequest>,
    /// `request_resources()` constraints that cannot be met.
    pub infeasible_constraints: Vec<ResourceConstraint>,
}

/// The autoscaling state the GCS holds (the last report it accepted), as read back by
/// [`GcsClient::get_cluster_status`].
#[derive(Debug, Clone, PartialEq)]
pub struct ReportedAutoscalingState {
    /// The report's `autoscaler_state_version`.
    pub version: i64,
    /// The report, with infeasible requests grouped by shape again.
    pub report: AutoscalingReport,
}

/// What `ray status` reads (`GetClusterStatusReply`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterStatus {
    /// The cluster state, as [`GcsClient::get_cluster_resource_state`] returns it.
    pub cluster_state: ClusterState,
    /// The last accepted autoscaling report, if any autoscaler ever reported.
    pub autoscaling_state: Option<ReportedAutoscalingState>,
}

/// A client of one GCS's `AutoscalerStateService`. Calls take `&mut self` (one call at a time,
/// which is all an autoscaler loop needs); the client is cheap to recreate. It is deliberately
/// not `Clone`: it owns the report version sequence, which two copies would fork.
#[derive(Debug)]
pub struct GcsClient {
    addr: String,
    timeout: Duration,
    client: AutoscalerStateServiceClient<Channel>,
    /// For the calls whose replies are read raw ([`raw_call`]).
    channel: Channel,
    /// Largest cluster-state reply this client accepts.
    reply_limit: usize,
    /// Size of the last cluster-state reply (bytes on the wire).
    last_reply_bytes: usize,
    /// The last `autoscaler_state_version` sent (or read from the GCS).
    last_report_version: i64,
    /// Whether `last_report_version` was raised to the version the GCS holds.
    report_version_seeded: bool,
    /// Node ids (hex) seen in the last state read → whether the node is the head.
    known_nodes: BTreeMap<String, bool>,
    /// Every head node id this client ever saw (a dead head keeps no resources, so it would no
    /// longer be recognised from a later state).
    head_node_ids: BTreeSet<String>,
}

impl GcsClient {
    /// Connects to the GCS at `addr` (`host:port`, e.g. `example-cluster-ray-head.ns.svc:6379`,
    /// or `http://host:port`; plaintext, as Ray's GCS is without Ray TLS). `timeout` bounds the
    /// connection attempt and, later, every call.
    ///
    /// Fails with [`RayError::Connect`] if no connection can be made, so a caller can tell "the
    /// head is not there (yet)" from a failing call.
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Self, RayError> {
        let endpoint = endpoint(addr, timeout)?;
        let channel = match tokio::time::timeout(timeout, endpoint.connect()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => return Err(RayError::Connect { addr: addr.to_string(), message: error_chain(&e) }),
            Err(_) => {
                return Err(RayError::Connect {
                    addr: addr.to_string(),
                    message: format!("timed out after {timeout:?}"),
                });
            }
        };
        Ok(Self::with_channel(addr, timeout, channel))
    }

    /// Like [`GcsClient::connect`], but connects on the first call; connection failures then
    /// surface as [`RayError::Unavailable`] from that call. Only the address is checked here.
    pub fn connect_lazy(addr: &str, timeout: Duration) -> Result<Self, RayError> {
        let channel = endpoint(addr, timeout)?.connect_lazy();
        Ok(Self::with_channel(addr, timeout, channel))
    }

    fn with_channel(addr: &str, timeout: Duration, channel: Channel) -> Self {
        GcsClient {
            addr: addr.to_string(),
            timeout,
            // The replies read through this client (reports, drains) are a few bytes.
            client: AutoscalerStateServiceClient::new(channel.clone()).max_decoding_message_size(SMALL_REPLY_BYTES),
            channel,
            reply_limit: SMALL_REPLY_BYTES,
            last_reply_bytes: 0,
            last_report_version: 0,
            report_version_seeded: false,
            known_nodes: BTreeMap::new(),
            head_node_ids: BTreeSet::new(),
        }
    }

    /// The GCS address this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The timeout of every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Accepts cluster-state replies up to [`MAX_REPLY_BYTES`] (`true`) or [`SMALL_REPLY_BYTES`].
    pub fn allow_large_replies(&mut self, large: bool) {
        self.reply_limit = if large { MAX_REPLY_BYTES } else { SMALL_REPLY_BYTES };
    }

    /// Bytes of the last cluster-state reply read.
    pub fn last_reply_bytes(&self) -> usize {
        self.last_reply_bytes
    }

    /// Reads a cluster-state reply raw, checks what decoding it would cost and decodes it within
    /// the process-wide [`DECODE_BUDGET_BYTES`]. prost decodes a 2-byte empty `NodeState` into a
    /// struct of hundreds of bytes, so a reply's size alone does not bound its memory.
    async fn read_state_reply<Req, Reply>(
        &mut self,
        method: &'static str,
        path: &'static str,
        message: Req,
        cost: fn(&[u8]) -> Option<usize>,
    ) -> Result<Reply, RayError>
    where
        Req: prost::Message + Send + 'static,
        Reply: prost::Message + Default,
    {
        let timeout = self.timeout;
        let raw =
            call(method, timeout, raw_call(self.channel.clone(), path, request(message, timeout), self.reply_limit))
                .await?;
        self.last_reply_bytes = raw.len();
        let decode = || RayError::Decode { method, message: "malformed protobuf".into() };
        let estimate = cost(&raw).ok_or_else(decode)?;
        if estimate > DECODE_BUDGET_BYTES {
            return Err(RayError::TooLarge {
                method,
                message: format!(
                    "{} bytes that would take about {} MiB decoded; the limit is {} MiB",
                    raw.len(),
                    estimate >> 20,
                    DECODE_BUDGET_BYTES >> 20
                ),
            });
        }
        let kib = u32::try_from(estimate.div_ceil(1024)).unwrap_or(u32::MAX);
        let _budget = tokio::time::timeout(timeout, DECODE_BUDGET.acquire_many(kib))
            .await
            .map_err(|_| RayError::Timeout { method, timeout })?;
        Reply::decode(raw).map_err(|e| RayError::Decode { method, message: e.to_string() })
    }

    /// The last `autoscaler_state_version` this client sent or learned from the GCS (0 before
    /// the first report).
    pub fn last_report_version(&self) -> i64 {
        self.last_report_version
    }

    /// Reads the cluster: nodes, pending demand, placement groups, `request_resources()`
    /// constraints (`GetClusterResourceState`, sent with `last_seen_cluster_resource_state_version
    /// = 0`; see the module docs for why).
    pub async fn get_cluster_resource_state(&mut self) -> Result<ClusterState, RayError> {
        const METHOD: &str = "GetClusterResourceState";
        let req = proto::GetClusterResourceStateRequest { last_seen_cluster_resource_state_version: 0 };
        let reply: proto::GetClusterResourceStateReply = self
            .read_state_reply(
                METHOD,
                "/ray.rpc.autoscaler.AutoscalerStateService/GetClusterResourceState",
                req,
                wire::state_reply_cost,
            )
            .await?;
        let state = reply
            .cluster_resource_state
            .ok_or_else(|| RayError::Decode { method: METHOD, message: "no cluster_resource_state".into() })?;
        let state = ClusterState::from_proto(state).map_err(|e| RayError::Decode { method: METHOD, message: e.0 })?;
        self.remember_nodes(&state);
        Ok(state)
    }

    /// Reads what `ray status` reads: the cluster state plus the last autoscaling report the GCS
    /// accepted (`GetClusterStatus`).
    pub async fn get_cluster_status(&mut self) -> Result<ClusterStatus, RayError> {
        const METHOD: &str = "GetClusterStatus";
        let reply: proto::GetClusterStatusReply = self
            .read_state_reply(
                METHOD,
                "/ray.rpc.autoscaler.AutoscalerStateService/GetClusterStatus",
                proto::GetClusterStatusRequest {},
                wire::status_reply_cost,
            )
            .await?;
        let state = reply
            .cluster_resource_state
            .ok_or_else(|| RayError::Decode { method: METHOD, message: "no cluster_resource_state".into() })?;
        let cluster_state =
            ClusterState::from_proto(state).map_err(|e| RayError::Decode { method: METHOD, message: e.0 })?;
        self.remember_nodes(&cluster_state);
        let autoscaling_state = reply.autoscaling_state.map(ReportedAutoscalingState::from_proto);
        if let Some(s) = &autoscaling_state {
            self.last_report_version = self.last_report_version.max(s.version);
            self.report_version_seeded = true;
        }
        Ok(ClusterStatus { cluster_state, autoscaling_state })
    }

    /// Sends `report` (`ReportAutoscalingState`) and returns the `autoscaler_state_version` it
    /// was sent with.
    ///
    /// The version is kept by this client, not the caller, and is strictly increasing even across
    /// client instances, operator restarts and leader changes, because the GCS silently drops a
    /// report with a lower version than the one it holds:
    /// - before its first report, a client reads the version the GCS holds (one
    ///   `GetClusterStatus`), so it starts above whatever an earlier client, operator replica or
    ///   Ray's own monitor reported;
    /// - each version is `max(previous + 1, now in Unix milliseconds)`, so a restarted operator
    ///   continues above its predecessor even without that read.
    ///
    /// A version is consumed even when the call fails, so a report the GCS applied despite a
    /// timeout is never followed by one with the same version.
    pub async fn report_autoscaling_state(&mut self, report: &AutoscalingReport) -> Result<i64, RayError> {
        const METHOD: &str = "ReportAutoscalingState";
        if !self.report_version_seeded {
            self.get_cluster_status().await?;
            self.report_version_seeded = true;
        }
        let version = self.last_report_version.saturating_add(1).max(unix_millis(SystemTime::now()));
        self.last_report_version = version;
        let timeout = self.timeout;
        let req = request(
            proto::ReportAutoscalingStateRequest { autoscaling_state: Some(report.to_proto(version)) },
            timeout,
        );
        call(METHOD, timeout, self.client.report_autoscaling_state(req)).await?;
        Ok(version)
    }

    /// Replaces the cluster resource constraint, as `ray.autoscaler.sdk.request_resources()` does
    /// in autoscaler-v2 mode (`RequestClusterResourceConstraint`). An empty list leaves an empty
    /// constraint, which asks for nothing.
    pub async fn request_cluster_resource_constraint(&mut self, requests: &[ResourceDemand]) -> Result<(), RayError> {
        const METHOD: &str = "RequestClusterResourceConstraint";
        let timeout = self.timeout;
        let constraint = ResourceConstraint { requests: requests.to_vec() }.to_proto();
        let req = request(
            proto::RequestClusterResourceConstraintRequest { cluster_resource_constraint: Some(constraint) },
            timeout,
        );
        call(METHOD, timeout, self.client.request_cluster_resource_constraint(req)).await?;
        Ok(())
    }

    /// Asks the GCS to drain the node `node_id` (hex, as in [`super::RayNode::node_id`])
    /// (`DrainNode`). `deadline`: when the drain must be over (`None`: no deadline).
    ///
    /// Refuses, without sending anything, to drain the head ([`RayError::HeadNode`]): the GCS
    /// would accept an idle-termination drain of an idle head and its raylet would exit. To know
    /// which node is the head, the client reads the cluster state first if `node_id` was not in
    /// the last state it read.
    ///
    /// With [`DrainReason::IdleTermination`], `accepted == false` is normal: the node got work
    /// since it was found idle. Keep it.
    pub async fn drain_node(
        &mut self,
        node_id: &str,
        reason: DrainReason,
        message: &str,
        deadline: Option<SystemTime>,
    ) -> Result<DrainOutcome, RayError> {
        const METHOD: &str = "DrainNode";
        let id = unhex(node_id)
            .filter(|b| !b.is_empty())
            .ok_or_else(|| RayError::InvalidRequest(format!("node id {node_id:?} is not a hex string")))?;
        let canonical = hex(&id);
        if !self.known_nodes.contains_key(&canonical) {
            self.get_cluster_resource_state().await?;
        }
        if self.head_node_ids.contains(&canonical) {
            return Err(RayError::HeadNode { node_id: canonical });
        }
        let deadline_timestamp_ms = match deadline {
            None => 0,
            Some(t) => {
                let ms = unix_millis(t);
                if ms <= 0 {
                    return Err(RayError::InvalidRequest(format!("drain deadline {t:?} is not after the Unix epoch")));
                }
                ms
            }
        };
        let reason = match reason {
            DrainReason::IdleTermination => proto::DrainNodeReason::IdleTermination,
            DrainReason::Preemption => proto::DrainNodeReason::Preemption,
        };
        let timeout = self.timeout;
        let req = request(
            proto::DrainNodeRequest {
                node_id: id,
                reason: reason as i32,
                reason_message: message.to_string(),
                deadline_timestamp_ms,
            },
            timeout,
        );
        let reply = call(METHOD, timeout, self.client.drain_node(req)).await?;
        Ok(DrainOutcome { accepted: reply.is_accepted, rejection_reason: reply.rejection_reason_message })
    }

    fn remember_nodes(&mut self, state: &ClusterState) {
        self.known_nodes = state.nodes.iter().map(|n| (n.node_id.clone(), n.is_head())).collect();
        self.head_node_ids.extend(state.nodes.iter().filter(|n| n.is_head()).map(|n| n.node_id.clone()));
    }
}

fn endpoint(addr: &str, timeout: Duration) -> Result<Endpoint, RayError> {
    let invalid = |message: &str| RayError::InvalidAddress { addr: addr.to_string(), message: message.to_string() };
    let uri = if addr.starts_with("http://") {
        addr.to_string()
    } else if addr.contains("://") {
        return Err(invalid("only plaintext http:// is supported (Ray's GCS does not use TLS by default)"));
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|e| invalid(&error_chain(&e)))?;
    if endpoint.uri().host().is_none_or(str::is_empty) {
        return Err(invalid("no host"));
    }
    if endpoint.uri().port_u16().is_none() {
        return Err(invalid("no port (the GCS listens on 6379 by default)"));
    }
    Ok(endpoint.connect_timeout(timeout).tcp_nodelay(true).tcp_keepalive(Some(Duration::from_secs(30))))
}

/// A unary call whose reply is handed over as the raw message bytes, at most `limit` of them
/// (tonic refuses a longer message from its length prefix, before reading it).
async fn raw_call<Req: prost::Message + Send + 'static>(
    channel: Channel,
    path: &'static str,
    req: tonic::Request<Req>,
    limit: usize,
) -> Result<tonic::Response<tonic::codegen::Bytes>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(limit);
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(format!("service was not ready: {e}")))?;
    grpc.unary(req, http::uri::PathAndQuery::from_static(path), RawCodec::<Req>(std::marker::PhantomData)).await
}

/// Encodes requests with prost, hands replies over undecoded.
struct RawCodec<Req>(std::marker::PhantomData<Req>);

struct RawDecoder;

impl tonic::codec::Decoder for RawDecoder {
    type Item = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        use prost::bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl<Req: prost::Message + Send + 'static> tonic::codec::Codec for RawCodec<Req> {
    type Encode = Req;
    type Decode = tonic::codegen::Bytes;
    type Encoder = tonic_prost::ProstEncoder<Req>;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

/// Estimates, from the protobuf wire format alone, how much memory decoding a reply takes: the
/// structs prost allocates (with their `Vec` slack) plus the copy [`ClusterState::from_proto`]
/// makes. Upper bounds, not exact figures; `None` for bytes that are not protobuf.
mod wire {
    use super::proto;
    use std::mem::size_of;

    /// Memory of one map entry or repeated string beyond its bytes: the key and value `String`s
    /// (24 each) in a B-tree node at least half full.
    const SLOT: usize = 64;
    /// The first B-tree leaf of a non-empty map: 11 keys and values allocated at once, even for
    /// one entry (11 × (24 + 24) plus the header, for `String` values). A map field of one tiny
    /// entry (5 bytes on the wire) thus costs hundreds of bytes decoded.
    const MAP_LEAF: usize = 560;
    /// prost's structs and our own copy of the state ([`super::ClusterState::from_proto`]).
    const COPIES: usize = 2;

    /// The fields of one message: `(field number, Some(bytes) for length-delimited)`.
    fn walk(mut b: &[u8], mut each: impl FnMut(u32, Option<&[u8]>) -> Option<()>) -> Option<()> {
        while !b.is_empty() {
            let key = prost::encoding::decode_varint(&mut b).ok()?;
            let field = u32::try_from(key >> 3).ok()?;
            match key & 7 {
                0 => {
                    prost::encoding::decode_varint(&mut b).ok()?;
                    each(field, None)?;
                }
                1 => b = b.get(8..)?,
                5 => b = b.get(4..)?,
                2 => {
                    let n = usize::try_from(prost::encoding::decode_varint(&mut b).ok()?).ok()?;
                    let (payload, rest) = (b.get(..n)?, b.get(n..)?);
                    b = rest;
                    each(field, Some(payload))?;
                }
                _ => return None,
            }
        }
        Some(())
    }

    fn node(b: &[u8]) -> Option<usize> {
        // The struct, and its slot's twin in the `Vec`'s spare capacity (it grows by doubling).
        let mut cost = 2 * size_of::<proto::NodeState>();
        let mut maps_seen = 0u32;
        walk(b, |field, payload| {
            cost += match (field, payload) {
                // Maps (resources, labels; fields this proto does not know, e.g. 6, prost skips).
                (4 | 5 | 13, Some(p)) => {
                    let first = maps_seen & (1 << field) == 0;
                    maps_seen |= 1 << field;
                    SLOT + p.len() + if first { MAP_LEAF } else { 0 }
                }
                // The repeated `node_activity` strings.
                (12, Some(p)) => SLOT + p.len(),
                (_, Some(p)) => p.len(),
                _ => 0,
            };
            Some(())
        })?;
        Some(cost)
    }

    /// Any message of the request types (demand, placement groups, constraints): every
    /// length-delimited field is costed as a submessage of the largest such struct, whether it
    /// is one or a string.
    fn generic(b: &[u8], depth: u32) -> usize {
        let base = size_of::<proto::GangResourceRequest>()
            .max(size_of::<proto::ResourceRequest>())
            .max(size_of::<proto::ResourceRequestByCount>())
            .max(size_of::<proto::BundleSelector>())
            .max(size_of::<proto::AutoscalingState>())
            .max(MAP_LEAF);
        let mut cost = base;
        let ok = walk(b, |_, payload| {
            if let Some(p) = payload {
                cost += p.len() + if depth < 12 { generic(p, depth + 1) } else { base };
            }
            Some(())
        });
        if ok.is_some() { cost } else { base + b.len() }
    }

    fn state(b: &[u8]) -> Option<usize> {
        let mut cost = size_of::<proto::ClusterResourceState>();
        walk(b, |field, payload| {
            cost += match (field, payload) {
                (3, Some(p)) => node(p)?,
                (_, Some(p)) => generic(p, 0),
                _ => 0,
            };
            Some(())
        })?;
        Some(cost)
    }

    /// `GetClusterResourceStateReply`.
    pub fn state_reply_cost(b: &[u8]) -> Option<usize> {
        let mut cost = 0;
        walk(b, |field, payload| {
            cost += match (field, payload) {
                (1, Some(p)) => state(p)?,
                (_, Some(p)) => generic(p, 0),
                _ => 0,
            };
            Some(())
        })?;
        Some(cost.saturating_mul(COPIES))
    }

    /// `GetClusterStatusReply`: the autoscaling state (field 1) and the cluster state (field 2).
    pub fn status_reply_cost(b: &[u8]) -> Option<usize> {
        let mut cost = 0;
        walk(b, |field, payload| {
            cost += match (field, payload) {
                (2, Some(p)) => state(p)?,
                (_, Some(p)) => generic(p, 0),
                _ => 0,
            };
            Some(())
        })?;
        Some(cost.saturating_mul(COPIES))
    }
}

fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.set_timeout(timeout);
    req
}

/// Runs one RPC under the client's timeout and maps its failure to a [`RayError`].
async fn call<T>(
    method: &'static str,
    timeout: Duration,
    rpc: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, RayError> {
    match tokio::time::timeout(timeout, rpc).await {
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        Ok(Err(status)) => Err(RayError::from_status(method, timeout, status)),
        Err(_) => Err(RayError::Timeout { method, timeout }),
    }
}

fn unix_millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn from_unix_seconds(s: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(s).unwrap_or(0))
}

fn count_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn count_u32(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

impl AutoscalingReport {
    fn to_proto(&self, version: i64) -> proto::AutoscalingState {
        let mut infeasible = Vec::new();
        'outer: for demand in &self.infeasible_requests {
            let one = proto::ResourceRequest {
                resources_bundle: demand.shape.clone(),
                placement_constraints: Vec::new(),
                label_selectors: demand.label_selectors.iter().map(|s| s.to_proto()).collect(),
            };
            for _ in 0..demand.count {
                if infeasible.len() >= MAX_REPORTED_INFEASIBLE_REQUESTS {
                    break 'outer;
                }
                infeasible.push(one.clone());
            }
        }
        proto::AutoscalingState {
            last_seen_cluster_resource_state_version: self.cluster_state_version,
            autoscaler_state_version: version,
            pending_instance_requests: self
                .pending_launches
                .iter()
                .flat_map(|l| {
                    // One entry per node: `ray status` counts entries, not their `count`.
                    let one = proto::PendingInstanceRequest {
                        // For pods, the "instance type" is the pod type (as for KubeRay).
                        instance_type_name: l.node_type.clone(),
                        ray_node_type_name: l.node_type.clone(),
                        count: 1,
                        request_ts: unix_seconds(l.requested_at),
                    };
                    std::iter::repeat_n(one, usize::try_from(l.count).unwrap_or(usize::MAX))
                })
                .take(MAX_REPORTED_PENDING_LAUNCHES)
                .collect(),
            infeasible_resource_requests: infeasible,
            infeasible_gang_resource_requests: self
                .infeasible_gang_requests
                .iter()
                .map(GangRequest::to_proto)
                .collect(),
            infeasible_cluster_resource_constraints: self
                .infeasible_constraints
                .iter()
                .map(ResourceConstraint::to_proto)
                .collect(),
            pending_instances: self
                .pending_instances
                .iter()
                .map(|p| proto::PendingInstance {
                    instance_type_name: p.node_type.clone(),
                    ray_node_type_name: p.node_type.clone(),
                    instance_id: p.instance_id.clone(),
                    ip_address: p.ip_address.clone(),
                    details: p.details.clone(),
                })
                .collect(),
            failed_instance_requests: self
                .failed_launches
                .iter()
                .map(|f| proto::FailedInstanceRequest {
                    instance_type_name: f.node_type.clone(),
                    ray_node_type_name: f.node_type.clone(),
                    count: count_i32(f.count),
                    reason: f.reason.clone(),
                    start_ts: unix_seconds(f.requested_at),
                    failed_ts: unix_seconds(f.failed_at),
                })
                .collect(),
        }
    }
}

impl ReportedAutoscalingState {
    /// Lenient on purpose: this is read back for display and tests, so odd values are clamped
    /// rather than failing the whole read.
    fn from_proto(s: proto::AutoscalingState) -> Self {
        // Group the one-entry-per-request list by shape again, in first-seen order.
        let mut infeasible_requests: Vec<ResourceDemand> = Vec::new();
        for r in s.infeasible_resource_requests {
            let demand = ResourceDemand {
                shape: r.resources_bundle,
                count: 1,
                label_selectors: ResourceDemand::from_proto_selectors(r.label_selectors),
            };
            match infeasible_requests
                .iter_mut()
                .find(|d| d.shape == demand.shape && d.label_selectors == demand.label_selectors)
            {
                Some(d) => d.count += 1,
                None => infeasible_requests.push(demand),
            }
        }
        let constraints = s
            .infeasible_cluster_resource_constraints
            .into_iter()
            .map(|c| ResourceConstraint {
                requests: c
                    .resource_requests
                    .into_iter()
                    .map(|r| {
                        let req = r.request.unwrap_or_default();
                        ResourceDemand {
                            shape: req.resources_bundle,
                            count: u64::try_from(r.count).unwrap_or(0),
                            label_selectors: ResourceDemand::from_proto_selectors(req.label_selectors),
                        }
                    })
                    .collect(),
            })
            .collect();
        ReportedAutoscalingState {
            version: s.autoscaler_state_version,
            report: AutoscalingReport {
                cluster_state_version: s.last_seen_cluster_resource_state_version,
                pending_launches: s.pending_instance_requests.into_iter().fold(Vec::new(), |mut acc, p| {
                    // Merge the one-per-node entries again.
                    let requested_at = from_unix_seconds(p.request_ts);
                    match acc.last_mut() {
                        Some(last) if last.node_type == p.ray_node_type_name && last.requested_at == requested_at => {
                            last.count = last.count.saturating_add(count_u32(p.count));
                        }
                        _ => acc.push(PendingLaunch {
                            node_type: p.ray_node_type_name,
                            count: count_u32(p.count),
                            requested_at,
                        }),
                    }
                    acc
                }),
                pending_instances: s
                    .pending_instances
                    .into_iter()
                    .map(|p| PendingInstance {
                        instance_id: p.instance_id,
                        node_type: p.ray_node_type_name,
                        ip_address: p.ip_address,
                        details: p.details,
                    })
                    .collect(),
                failed_launches: s
                    .failed_instance_requests
                    .into_iter()
                    .map(|f| FailedLaunch {
                        node_type: f.ray_node_type_name,
                        count: count_u32(f.count),
                        reason: f.reason,
                        requested_at: from_unix_seconds(f.start_ts),
                        failed_at: from_unix_seconds(f.failed_ts),
                    })
                    .collect(),
                infeasible_requests,
                infeasible_gang_requests: s
                    .infeasible_gang_resource_requests
                    .into_iter()
                    .filter_map(GangRequest::from_proto)
                    .collect(),
                infeasible_constraints: constraints,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::resources::{PlacementStrategy, ResourceMap};

    fn res(items: &[(&str, f64)]) -> ResourceMap {
        items.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn addresses_are_checked() {
        assert!(endpoint("127.0.0.1:6379", Duration::from_secs(1)).is_ok());
        assert!(endpoint("http://head.ns.svc:6379", Duration::from_secs(1)).is_ok());
        assert!(endpoint("[::1]:6379", Duration::from_secs(1)).is_ok());
        for bad in ["", "head", "https://head:6379", "head:notaport", "http://:6379"] {
            let err = endpoint(bad, Duration::from_secs(1)).unwrap_err();
            assert_eq!(err.reason(), "invalid_address", "{bad:?}: {err}");
        }
    }

    #[test]
    fn reasons_are_bounded_names() {
        let t = Duration::from_secs(1);
        let cases = [
            (RayError::from_status("M", t, tonic::Status::unavailable("conn refused")), "unreachable"),
            (RayError::from_status("M", t, tonic::Status::deadline_exceeded("late")), "timeout"),
            (RayError::from_status("M", t, tonic::Status::invalid_argument("neg")), "invalid_argument"),
            (RayError::from_status("M", t, tonic::Status::unauthenticated("WrongClusterID")), "unauthenticated"),
            (RayError::from_status("M", t, tonic::Status::internal("failed to decode Protobuf message: x")), "decode"),
            (RayError::from_status("M", t, tonic::Status::internal("boom")), "internal"),
            (RayError::from_status("M", t, tonic::Status::cancelled("Timeout expired")), "timeout"),
            (RayError::from_status("M", t, tonic::Status::cancelled("by peer")), "cancelled"),
            (RayError::Connect { addr: "a:1".into(), message: "refused".into() }, "unreachable"),
            (RayError::Timeout { method: "M", timeout: t }, "timeout"),
            (RayError::HeadNode { node_id: "ab".into() }, "head_node"),
        ];
        for (err, reason) in cases {
            assert_eq!(err.reason(), reason, "{err}");
        }
        assert!(RayError::Connect { addr: "a:1".into(), message: String::new() }.is_connect());
        assert!(!RayError::Timeout { method: "M", timeout: t }.is_connect());
        assert!(RayError::Timeout { method: "M", timeout: t }.is_transient());
        assert!(!RayError::HeadNode { node_id: String::new() }.is_transient());
        let e = RayError::from_status("DrainNode", t, tonic::Status::invalid_argument("negative deadline"));
        assert_eq!(e.to_string(), "DrainNode: invalid_argument: negative deadline");
        // What the GCS really sends for a Ray `Status::Invalid` (seen on a 2.60 head).
        let gcs = tonic::Status::with_details(
            tonic::Code::Aborted,
            "Invalid",
            "Draining deadline must be non-negative, received -1".into(),
        );
        let e = RayError::from_status("DrainNode", t, gcs);
        assert_eq!(e.reason(), "aborted");
        assert_eq!(e.to_string(), "DrainNode: aborted: Invalid: Draining deadline must be non-negative, received -1");
    }

    #[test]
    fn report_round_trips_through_the_proto() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let report = AutoscalingReport {
            cluster_state_version: 17,
            pending_launches: vec![PendingLaunch { node_type: "gpu".into(), count: 2, requested_at: t0 }],
            pending_instances: vec![PendingInstance {
                instance_id: "c-worker-abc".into(),
                node_type: "cpu".into(),
                ip_address: "10.0.0.7".into(),
                details: "pod pending".into(),
            }],
            failed_launches: vec![FailedLaunch {
                node_type: "cpu".into(),
                count: 1,
                reason: "forbidden".into(),
                requested_at: t0,
                failed_at: t0 + Duration::from_secs(3),
            }],
            infeasible_requests: vec![
                ResourceDemand { shape: res(&[("GPU", 16.0)]), count: 3, label_selectors: Vec::new() },
                ResourceDemand { shape: res(&[("CPU", 64.0)]), count: 1, label_selectors: Vec::new() },
            ],
            infeasible_gang_requests: vec![GangRequest {
                placement_group_id: "beef".into(),
                strategy: PlacementStrategy::StrictSpread,
                state: "PENDING".into(),
                details: "beef:STRICT_SPREAD|PENDING".into(),
                bundles: vec![res(&[("CPU", 2.0)]); 2],
            }],
            infeasible_constraints: vec![ResourceConstraint {
                requests: vec![ResourceDemand { shape: res(&[("CPU", 1.0)]), count: 8, label_selectors: Vec::new() }],
            }],
        };
        let p = report.to_proto(42);
        assert_eq!(p.autoscaler_state_version, 42);
        assert_eq!(p.last_seen_cluster_resource_state_version, 17);
        // One entry per request, as Ray's own autoscaler reports them.
        assert_eq!(p.infeasible_resource_requests.len(), 4);
        assert_eq!(p.pending_instance_requests.len(), 2);
        assert_eq!(p.pending_instance_requests[0].count, 1);
        assert_eq!(p.pending_instance_requests[0].request_ts, 1_800_000_000);
        assert_eq!(p.pending_instance_requests[0].instance_type_name, "gpu");
        let back = ReportedAutoscalingState::from_proto(p);
        assert_eq!(back.version, 42);
        assert_eq!(back.report, report);
    }

    #[test]
    fn infeasible_requests_are_capped() {
        let report = AutoscalingReport {
            infeasible_requests: vec![ResourceDemand {
                shape: res(&[("GPU", 16.0)]),
                count: u64::MAX,
                label_selectors: Vec::new(),
            }],
            ..Default::default()
        };
        assert_eq!(report.to_proto(1).infeasible_resource_requests.len(), MAX_REPORTED_INFEASIBLE_REQUESTS);
    }

    #[tokio::test]
    async fn connect_errors_are_connect_errors() {
        // A port nothing listens on: bind, read the port, close.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let err = GcsClient::connect(&addr, Duration::from_secs(2)).await.unwrap_err();
        assert!(err.is_connect(), "{err}");
        assert_eq!(err.reason(), "unreachable");
        // A lazy client reports the same failure from the call instead.
        let mut lazy = GcsClient::connect_lazy(&addr, Duration::from_secs(2)).unwrap();
        let err = lazy.get_cluster_resource_state().await.unwrap_err();
        assert!(!err.is_connect(), "{err}");
        assert!(err.is_transient(), "{err}");
        assert_eq!(err.reason(), "unreachable", "{err}");
    }

    #[tokio::test]
    async fn calls_time_out() {
        // A listener that accepts connections but never speaks HTTP/2.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let mut client = GcsClient::connect_lazy(&addr, Duration::from_millis(300)).unwrap();
        let started = std::time::Instant::now();
        let err = client.get_cluster_resource_state().await.unwrap_err();
        assert_eq!(err.reason(), "timeout", "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        holder.abort();
    }

    #[tokio::test]
    async fn drain_rejects_bad_node_ids_without_calling() {
        let mut client = GcsClient::connect_lazy("127.0.0.1:1", Duration::from_millis(200)).unwrap();
        let err = client.drain_node("not-hex", DrainReason::IdleTermination, "x", None).await.unwrap_err();
        assert_eq!(err.reason(), "invalid_request");
        let err = client.drain_node("", DrainReason::IdleTermination, "x", None).await.unwrap_err();
        assert_eq!(err.reason(), "invalid_request");
    }

    #[tokio::test]
    async fn drain_refuses_known_heads_without_calling() {
        let mut client = GcsClient::connect_lazy("127.0.0.1:1", Duration::from_millis(200)).unwrap();
        let head = crate::ray::RayNode {
            node_id: "ab".repeat(28),
            total_resources: res(&[(crate::ray::HEAD_NODE_RESOURCE, 1.0)]),
            ..Default::default()
        };
        client.remember_nodes(&ClusterState { nodes: vec![head], ..Default::default() });
        let err = client.drain_node(&"AB".repeat(28), DrainReason::IdleTermination, "x", None).await.unwrap_err();
        assert!(matches!(err, RayError::HeadNode { .. }), "{err}");
        // Still refused after the head died and vanished from a later state.
        client.remember_nodes(&ClusterState::default());
        client.known_nodes.insert("ab".repeat(28), false);
        let err = client.drain_node(&"ab".repeat(28), DrainReason::Preemption, "x", None).await.unwrap_err();
        assert!(matches!(err, RayError::HeadNode { .. }), "{err}");
    }

    fn reply_bytes(nodes: Vec<proto::NodeState>) -> Vec<u8> {
        use prost::Message;
        let state = proto::ClusterResourceState { node_states: nodes, ..Default::default() };
        proto::GetClusterResourceStateReply { cluster_resource_state: Some(state) }.encode_to_vec()
    }

    /// A node as a real Ray 2.60 head reports it (6 resources, 6 labels, busy; 655 bytes).
    fn realistic_node(i: usize) -> proto::NodeState {
        let resources =
            ["object_store_memory", "node:10.1.2.3", "memory", "custom_resource_1", "accelerator_type:A100", "CPU"];
        let labels =
            ["team", "ray.io/node-id", "ray.io/node-group", "ray.io/market-type", "ray.io/availability-zone", "rack"];
        proto::NodeState {
            node_id: vec![7; 28],
            instance_id: format!("big-cluster-worker-gpu-{i}-abcde"),
            ray_node_type_name: "gpu-worker".into(),
            node_ip_address: "10.1.2.3".into(),
            status: 1,
            node_activity: vec!["Resource: CPU currently in use.".into(), "Busy workers on node.".into()],
            total_resources: resources.iter().map(|k| (k.to_string(), 2.4e10)).collect(),
            available_resources: resources.iter().map(|k| (k.to_string(), 8.0)).collect(),
            labels: labels
                .iter()
                .zip(["ml-platform", &"fc".repeat(28), "gpu-worker", "spot", "us-west-2b", "r2"])
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_ten_thousand_node_cluster_fits_the_limits() {
        // 10,000 live nodes and the 1,000 dead ones the GCS keeps.
        let reply = reply_bytes((0..11_000).map(realistic_node).collect());
        let cost = wire::state_reply_cost(&reply).unwrap();
        eprintln!("11,000 nodes: {} bytes, estimated {} MiB decoded", reply.len(), cost >> 20);
        assert!(reply.len() <= MAX_REPLY_BYTES, "{} bytes", reply.len());
        assert!(cost <= DECODE_BUDGET_BYTES, "estimated {cost} bytes decoded");
        // ... but not twice that many.
        let reply = reply_bytes((0..22_000).map(realistic_node).collect());
        assert!(wire::state_reply_cost(&reply).unwrap() > DECODE_BUDGET_BYTES);
    }

    #[test]
    fn tiny_elements_are_costed_by_their_decoded_size() {
        // 2-byte empty nodes: 1 MiB on the wire is half a million structs.
        let empty = reply_bytes(vec![proto::NodeState::default(); 500_000]);
        assert!(empty.len() <= SMALL_REPLY_BYTES);
        let cost = wire::state_reply_cost(&empty).unwrap();
        assert!(cost >= 500_000 * 2 * std::mem::size_of::<proto::NodeState>(), "{cost}");
        // One-entry maps: a B-tree leaf each.
        let one = proto::NodeState { total_resources: [("a".to_string(), 0.0)].into(), ..Default::default() };
        let bytes = reply_bytes(vec![one; 1000]);
        assert!(wire::state_reply_cost(&bytes).unwrap() >= 1000 * 560, "{bytes:?}");
        assert_eq!(wire::state_reply_cost(&[0xff]), None, "not protobuf");
    }

    #[test]
    fn versions_and_times_convert() {
        assert_eq!(unix_seconds(UNIX_EPOCH + Duration::from_millis(2500)), 2);
        assert_eq!(unix_millis(UNIX_EPOCH + Duration::from_millis(2500)), 2500);
        assert_eq!(unix_millis(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(from_unix_seconds(-5), UNIX_EPOCH);
        assert_eq!(count_i32(u32::MAX), i32::MAX);
        assert_eq!(count_u32(-1), 0);
    }
}
