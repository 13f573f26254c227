//! The lab's control plane: a stand-in for istiod that speaks istiod's real protocols on one TLS port, as
//! istiod does on 15012 — the certificate service (`istio.v1.auth.IstioCertificateService/CreateCertificate`)
//! and delta ADS (`envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`) for
//! `istio.workload.Address` and `istio.security.Authorization`.
//!
//! It runs as its own process (`lab control-plane`) in its own netns on the lab's fabric, and is the only
//! holder of the mesh's root key. What it serves comes from the mesh file the lab writes (Istio ztunnel's
//! local-file format, so the same file also drives the local-file mode); every change is pushed to every
//! stream as a delta, with both types answered and `system_version_info` set to [`mesh_version`] of the file,
//! so the lab can wait for a change to be in force everywhere.
//!
//! It authenticates callers as istiod does: a bearer token per node, and it signs a pod's identity for a node
//! only if a pod with that identity is known to run on that node (istiod's node authorizer). In the lab the
//! tokens are a file of static tokens and the pods a file the lab writes before it runs the CNI chain, as the
//! API server knows a pod before the kubelet starts it. In the cluster tier ([`KubeAuth`]) it does what istiod
//! does against a real API server: a TokenReview of the caller's projected token (audience `istio-ca`), a
//! trusted node account, the node of the pod named in the token, and that node's pods.
//!
//! For the tests of bad input it can misbehave on demand: the fault file names one CA fault (answers for
//! another identity, expired or unrelated chains, garbage, hanging, refusing) and one-shot xDS pushes
//! (undecodable resources, unknown types, bad addresses, removing everything, a huge push).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, SystemTime};

use ambit_proto::control_plane::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ambit_proto::control_plane::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use ambit_proto::control_plane::istio::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use ambit_proto::control_plane::istio::ca::{IstioCertificateRequest, IstioCertificateResponse};
use ambit_proto::control_plane::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use anyhow::Context;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};
use ztunnel::certs::LocalCa;
use ztunnel::identity::Identity;
use ztunnel::state::LocalConfig;
use ztunnel::xds::convert;

/// The cluster the lab's control plane is (istiod's `CLUSTER_ID`, `Kubernetes` by default).
pub const CLUSTER_ID: &str = "Kubernetes";
/// The control plane's address on the fabric.
pub const CP_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(172, 30, 0, 251);
/// istiod's port for the CA and xDS.
pub const CP_PORT: u16 = 15012;
/// The name its serving certificate carries (istiod's), beside its IP.
pub const CP_HOSTNAME: &str = "istiod.istio-system.svc";

/// The version a mesh file is served under: FNV-1a of its bytes, in hex.
pub fn mesh_version(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// A pod the control plane knows runs on a node (what istiod learns from the API server).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KnownPod {
    /// Node name.
    pub node: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
}

/// Misbehaviour on demand (the fault file, JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Faults {
    /// How the CA answers: `wrong-identity`, `expired`, `unrelated`, `garbage`, `hang`, `refuse`; none: well.
    #[serde(default)]
    pub ca: Option<String>,
    /// A one-shot xDS push, sent once to every stream when this changes: `garbage`, `unknown-type`,
    /// `bad-address`, `remove-all`, `huge:<N>` (N extra workloads).
    #[serde(default)]
    pub xds_push: Option<String>,
}

/// What the control plane is started with (`lab control-plane`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The mesh file.
    pub mesh: PathBuf,
    /// The pods file (JSON list of [`KnownPod`]); none: any identity in the trust domain is signed.
    pub pods: Option<PathBuf>,
    /// Root certificate and key.
    pub ca: (PathBuf, PathBuf),
    /// Serving certificate and key.
    pub serving: (PathBuf, PathBuf),
    /// Token file: `<token> <node>` per line.
    pub tokens: PathBuf,
    /// The fault file.
    pub faults: PathBuf,
    /// Trust domain.
    pub trust_domain: String,
    /// The cluster tier: authenticate and authorize through a Kubernetes API server.
    pub kubernetes: Option<KubeAuth>,
}

/// How the control plane checks callers against a Kubernetes API server, as istiod does.
#[derive(Debug, Clone)]
pub struct KubeAuth {
    /// A kubeconfig with the rights istiod has (TokenReviews, pods).
    pub kubeconfig: PathBuf,
    /// The service accounts (`namespace/name`) trusted to ask for their node's pods' identities
    /// (istiod's `CA_TRUSTED_NODE_ACCOUNTS`).
    pub trusted_node_accounts: Vec<String>,
}

/// The audience node proxies' tokens are minted for (Istio's).
pub const TOKEN_AUDIENCE: &str = "istio-ca";

/// One type's resources: name → (version, encoded `Any`).
type Resources = BTreeMap<String, (String, prost_types::Any)>;

/// What is served, one snapshot per version of the mesh file.
#[derive(Debug, Default)]
struct Mesh {
    version: String,
    types: BTreeMap<&'static str, Resources>,
}

fn any(type_url: &str, msg: &impl Message) -> (String, prost_types::Any) {
    let value = msg.encode_to_vec();
    (mesh_version(&value), prost_types::Any { type_url: type_url.to_string(), value })
}

impl Mesh {
    fn from_config(version: String, c: &LocalConfig) -> Mesh {
        let mut addresses = Resources::new();
        for w in &c.workloads {
            addresses.insert(w.uid.clone(), any(ADDRESS_TYPE, &convert::workload_to_proto(w)));
        }
        for s in &c.services {
            addresses.insert(s.key(), any(ADDRESS_TYPE, &convert::service_to_proto(s)));
        }
        let policies =
            c.policies.iter().map(|p| (p.key(), any(AUTHORIZATION_TYPE, &convert::policy_to_proto(p)))).collect();
        Mesh { version, types: [(ADDRESS_TYPE, addresses), (AUTHORIZATION_TYPE, policies)].into() }
    }
}

struct Shared {
    settings: Settings,
    mesh: watch::Receiver<Arc<Mesh>>,
    push: watch::Receiver<Option<String>>,
    ca: LocalCa,
    nonce: std::sync::atomic::AtomicU64,
    kube: Option<kube::Client>,
}

/// The faults in force: the fault file, or none when it is missing or unreadable.
fn read_faults(path: &Path) -> Faults {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

impl Shared {
    fn faults(&self) -> Faults {
        read_faults(&self.settings.faults)
    }

    fn nonce(&self) -> String {
        self.nonce.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_string()
    }

    /// The node a request's bearer token belongs to: a static token of the tokens file or, in the cluster tier,
    /// a service account token the API server vouches for.
    async fn caller<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("no bearer token"))?;
        let tokens = std::fs::read_to_string(&self.settings.tokens).unwrap_or_default();
        if let Some((_, node)) = tokens.lines().filter_map(|l| l.split_once(' ')).find(|(t, _)| *t == token) {
            return Ok(node.trim().to_string());
        }
        match (&self.kube, &self.settings.kubernetes) {
            (Some(client), Some(auth)) => review_token(client, auth, token).await,
            _ => Err(Status::unauthenticated("unknown token")),
        }
    }

    /// Whether a pod of `id` runs on `node`: from the API server in the cluster tier, else from the pods file.
    async fn runs_on(&self, id: &Identity, node: &str) -> Result<bool, Status> {
        if let Some(client) = &self.kube {
            let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), &id.namespace);
            let on_node = kube::api::ListParams::default().fields(&format!("spec.nodeName={node}"));
            let list = pods.list(&on_node).await.map_err(|e| Status::unavailable(format!("listing pods: {e}")))?;
            return Ok(list.items.iter().any(|p| {
                let spec = p.spec.as_ref();
                let sa = spec.and_then(|s| s.service_account_name.as_deref()).unwrap_or("default");
                let done = p
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
                sa == id.service_account && !done
            }));
        }
        let Some(pods) = &self.settings.pods else { return Ok(true) };
        let known: Vec<KnownPod> =
            std::fs::read(pods).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        Ok(known
            .iter()
            .any(|p| p.node == node && p.namespace == id.namespace && p.service_account == id.service_account))
    }
}

use k8s_openapi::api::core::v1::Pod;

/// istiod's check of a node proxy: the API server reviews the token (for Istio's audience), its service
/// account must be a trusted node account, and the node is that of the pod the token was minted for.
async fn review_token(client: &kube::Client, auth: &KubeAuth, token: &str) -> Result<String, Status> {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let review = TokenReview {
        spec: TokenReviewSpec { token: Some(token.to_string()), audiences: Some(vec![TOKEN_AUDIENCE.into()]) },
        ..Default::default()
    };
    let reviews: kube::Api<TokenReview> = kube::Api::all(client.clone());
    let status = reviews
        .create(&Default::default(), &review)
        .await
        .map_err(|e| Status::unavailable(format!("TokenReview: {e}")))?
        .status
        .unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(Status::unauthenticated(format!(
            "the API server does not vouch for the token: {}",
            status.error.unwrap_or_default()
        )));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let Some((ns, sa)) = username.strip_prefix("system:serviceaccount:").and_then(|r| r.split_once(':')) else {
        return Err(Status::permission_denied(format!("{username} is not a service account")));
    };
    if !auth.trusted_node_accounts.iter().any(|a| *a == format!("{ns}/{sa}")) {
        return Err(Status::permission_denied(format!("{ns}/{sa} is not a trusted node account")));
    }
    let extra = user.extra.unwrap_or_default();
    let claim = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
    let (Some(pod_name), pod_uid) =
        (claim("authentication.kubernetes.io/pod-name"), claim("authentication.kubernetes.io/pod-uid"))
    else {
        return Err(Status::permission_denied("the token is not bound to a pod"));
    };
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), ns);
    let pod = pods
        .get_opt(&pod_name)
        .await
        .map_err(|e| Status::unavailable(format!("reading pod {ns}/{pod_name}: {e}")))?
        .ok_or_else(|| Status::permission_denied(format!("the token's pod {ns}/{pod_name} is gone")))?;
    if pod_uid.is_some() && pod.metadata.uid != pod_uid {
        return Err(Status::permission_denied(format!("the token's pod {ns}/{pod_name} was replaced")));
    }
    pod.spec
        .and_then(|s| s.node_name)
        .ok_or_else(|| Status::permission_denied(format!("the token's pod {ns}/{pod_name} has no node")))
}

#[derive(Clone)]
struct Ca(Arc<Shared>);

#[tonic::async_trait]
impl IstioCertificateService for Ca {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let s = &self.0;
        let node = s.caller(&req).await?;
        let req = req.into_inner();
        let impersonated = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .ok_or_else(|| Status::permission_denied("a node proxy must name the identity it asks for"))?;
        let id: Identity =
            impersonated.parse().map_err(|e| Status::invalid_argument(format!("ImpersonatedIdentity: {e}")))?;
        if id.trust_domain != s.settings.trust_domain {
            return Err(Status::permission_denied(format!("{id} is not in trust domain {}", s.settings.trust_domain)));
        }
        if !s.runs_on(&id, &node).await? {
            return Err(Status::permission_denied(format!("no pod of {id} runs on {node}")));
        }
        let ttl = Duration::from_secs(req.validity_duration.clamp(5, 7 * 86400) as u64);
        let (signed_for, chain) =
            s.ca.signer().sign_request(&req.csr, ttl).map_err(|e| Status::invalid_argument(format!("csr: {e}")))?;
        if signed_for != id {
            return Err(Status::invalid_argument(format!("the CSR is for {signed_for}, not {id}")));
        }
        let chain = match s.faults().ca.as_deref() {
            None => chain,
            Some(fault) => misbehave(fault, &s.ca, &req.csr, &id, chain).await?,
        };
        Ok(Response::new(IstioCertificateResponse { cert_chain: chain }))
    }
}

/// A CA answer gone wrong on purpose.
async fn misbehave(
    fault: &str,
    ca: &LocalCa,
    csr: &str,
    id: &Identity,
    good: Vec<String>,
) -> Result<Vec<String>, Status> {
    let other = Identity::new(&id.trust_domain, &id.namespace, "someone-else");
    match fault {
        "hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(good)
        }
        "refuse" => Err(Status::unavailable("the CA is down (lab fault)")),
        "garbage" => {
            Ok(vec!["-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n".into()])
        }
        "wrong-identity" => {
            // A valid certificate of the same CA, for another identity.
            let now = SystemTime::now();
            let wrong = ca
                .sign_valid(&other, now - Duration::from_secs(60), now + Duration::from_secs(3600))
                .map_err(|e| Status::internal(e.to_string()))?;
            Ok(wrong.certified.cert.iter().map(ztunnel::ca::pem_of).chain(good.last().cloned()).collect())
        }
        "expired" => {
            // The requester's key and identity, but valid only in the past.
            let now = SystemTime::now();
            let old = ca
                .signer()
                .sign_request_between(csr, now - Duration::from_secs(7200), now - Duration::from_secs(3600))
                .map_err(|e| Status::internal(e.to_string()))?;
            Ok(old.1)
        }
        "unrelated" => {
            let (cert, key) =
                crate::ca::make_ca("Unrelated CA", &id.trust_domain).map_err(|e| Status::internal(e.to_string()))?;
            let rogue = LocalCa::from_pem(&cert, &key, Duration::from_secs(3600))
                .map_err(|e| Status::internal(e.to_string()))?;
            Ok(rogue
                .signer()
                .sign_request(csr, Duration::from_secs(3600))
                .map_err(|e| Status::internal(e.to_string()))?
                .1)
        }
        other => Err(Status::internal(format!("unknown lab fault {other:?}"))),
    }
}

#[derive(Clone)]
struct Ads(Arc<Shared>);

type ResponseStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
type SotwStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn stream_aggregated_resources(
        &self,
        _req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        Err(Status::unimplemented("ztunnel uses delta xDS (DeltaAggregatedResources)"))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let node = self.0.caller(&req).await?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(serve_stream(self.0.clone(), node, req.into_inner(), tx));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// What one stream has been sent, per type: name → version.
type Sent = BTreeMap<&'static str, HashMap<String, String>>;

fn delta(
    shared: &Shared,
    mesh: &Mesh,
    type_url: &'static str,
    sent: &mut HashMap<String, String>,
) -> DeltaDiscoveryResponse {
    let current = &mesh.types[type_url];
    let mut resources = Vec::new();
    for (name, (version, body)) in current {
        if sent.get(name) != Some(version) {
            resources.push(Resource {
                name: name.clone(),
                version: version.clone(),
                resource: Some(body.clone()),
                ..Default::default()
            });
            sent.insert(name.clone(), version.clone());
        }
    }
    let removed: Vec<String> = sent.keys().filter(|n| !current.contains_key(*n)).cloned().collect();
    for n in &removed {
        sent.remove(n);
    }
    DeltaDiscoveryResponse {
        system_version_info: mesh.version.clone(),
        resources,
        type_url: type_url.to_string(),
        nonce: shared.nonce(),
        removed_resources: removed,
    }
}

/// A response that is wrong on purpose.
fn fault_push(shared: &Shared, fault: &str, sent: &mut Sent) -> Option<DeltaDiscoveryResponse> {
    let fault = fault.split(':').collect::<Vec<_>>();
    let mut r = DeltaDiscoveryResponse {
        system_version_info: format!("fault-{}", shared.nonce()),
        type_url: ADDRESS_TYPE.to_string(),
        nonce: shared.nonce(),
        ..Default::default()
    };
    let resource = |name: &str, type_url: &str, value: Vec<u8>| Resource {
        name: name.into(),
        version: "fault".into(),
        resource: Some(prost_types::Any { type_url: type_url.into(), value }),
        ..Default::default()
    };
    match fault[0] {
        "garbage" => r.resources.push(resource("garbage", ADDRESS_TYPE, vec![0xff; 7])),
        "unknown-type" => {
            r.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
            r.resources.push(resource("c", &r.type_url.clone(), vec![]));
        }
        "bad-address" => {
            let w = ambit_proto::control_plane::istio::workload::Workload {
                uid: "Kubernetes//Pod/bad/bad".into(),
                name: "bad".into(),
                namespace: "bad".into(),
                addresses: vec![vec![10, 0, 0]],
                ..Default::default()
            };
            let a = ambit_proto::control_plane::istio::workload::Address {
                r#type: Some(ambit_proto::control_plane::istio::workload::address::Type::Workload(w)),
            };
            r.resources.push(resource("Kubernetes//Pod/bad/bad", ADDRESS_TYPE, a.encode_to_vec()));
        }
        "remove-all" => r.removed_resources = sent.insert(ADDRESS_TYPE, HashMap::new())?.into_keys().collect(),
        "huge" => {
            let n: u32 = fault.get(1).and_then(|n| n.parse().ok()).unwrap_or(10_000);
            for i in 0..n {
                let w = ambit_proto::control_plane::istio::workload::Workload {
                    uid: format!("Kubernetes//Pod/huge/w{i}"),
                    name: format!("w{i}"),
                    namespace: "huge".into(),
                    addresses: vec![vec![10, 200 + (i >> 16) as u8, (i >> 8) as u8, i as u8]],
                    tunnel_protocol: 1,
                    ..Default::default()
                };
                let a = ambit_proto::control_plane::istio::workload::Address {
                    r#type: Some(ambit_proto::control_plane::istio::workload::address::Type::Workload(w)),
                };
                let name = format!("Kubernetes//Pod/huge/w{i}");
                r.resources.push(resource(&name, ADDRESS_TYPE, a.encode_to_vec()));
                // Sent like any resource: the next real change removes them.
                sent.entry(ADDRESS_TYPE).or_default().insert(name, "fault".into());
            }
        }
        _ => return None,
    }
    Some(r)
}

async fn serve_stream(
    shared: Arc<Shared>,
    node: String,
    mut requests: Streaming<DeltaDiscoveryRequest>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
) {
    let mut mesh_rx = shared.mesh.clone();
    let mut push_rx = shared.push.clone();
    push_rx.mark_unchanged();
    let mut sent: Sent = BTreeMap::new();
    // Pushes awaiting their ACK: nonce -> (sent at, resources, version).
    let mut in_flight: HashMap<String, (std::time::Instant, usize, String)> = HashMap::new();
    // Remembers a push until its answer comes back.
    let sending = |resp: &DeltaDiscoveryResponse| {
        let size = resp.resources.len() + resp.removed_resources.len();
        (resp.nonce.clone(), (std::time::Instant::now(), size, resp.system_version_info.clone()))
    };
    eprintln!("xds: stream from {node}");
    loop {
        tokio::select! {
            req = requests.message() => {
                let req = match req {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => { eprintln!("xds: stream from {node} failed: {e}"); break; }
                };
                let Some(type_url) = [ADDRESS_TYPE, AUTHORIZATION_TYPE].into_iter().find(|t| *t == req.type_url) else {
                    eprintln!("xds: {node} asked for unknown type {}", req.type_url);
                    continue;
                };
                if !req.response_nonce.is_empty() {
                    // An ACK (the push is in force on that node: a ztunnel ACKs after applying it) or a NACK.
                    let nack = req.error_detail.as_ref().map(|e| e.message.clone());
                    if let Some(e) = &nack {
                        eprintln!("xds: {node} NACKed {type_url} nonce {}: {e}", req.response_nonce);
                    }
                    if let Some((sent_at, resources, version)) = in_flight.remove(&req.response_nonce) {
                        record_push(&shared, &node, type_url, resources, &version, sent_at.elapsed(), nack);
                    }
                    continue;
                }
                // A subscription: what the client holds (reconnect) is not sent again unless it changed.
                let held = req.initial_resource_versions.clone().into_iter().collect();
                let s = sent.entry(type_url).or_insert(held);
                let mesh = mesh_rx.borrow().clone();
                let resp = delta(&shared, &mesh, type_url, s);
                let (nonce, pending) = sending(&resp);
                in_flight.insert(nonce, pending);
                if tx.send(Ok(resp)).await.is_err() { break; }
            }
            changed = mesh_rx.changed() => {
                if changed.is_err() { break; }
                let mesh = mesh_rx.borrow_and_update().clone();
                for (type_url, s) in sent.iter_mut() {
                    let resp = delta(&shared, &mesh, type_url, s);
                    let (nonce, pending) = sending(&resp);
                    in_flight.insert(nonce, pending);
                    if tx.send(Ok(resp)).await.is_err() { return; }
                }
            }
            changed = push_rx.changed() => {
                if changed.is_err() { break; }
                let fault = push_rx.borrow_and_update().clone();
                if let Some(f) = fault
                    && sent.contains_key(ADDRESS_TYPE)
                    && let Some(resp) = fault_push(&shared, &f, &mut sent)
                {
                    eprintln!("xds: pushing fault {f:?} to {node}");
                    if tx.send(Ok(resp)).await.is_err() { return; }
                }
            }
        }
    }
    eprintln!("xds: stream from {node} ended");
}

/// One push and the time until its ACK or NACK, a line of `pushes.jsonl` beside the faults file: what the lab
/// waits on after a change (it works with any ztunnel, Istio's too) and what `lab bench` measures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushRecord {
    /// The node whose ztunnel ACKed.
    pub node: String,
    /// Type URL.
    pub type_url: String,
    /// Resources added, changed or removed.
    pub resources: usize,
    /// `system_version_info`.
    pub version: String,
    /// From sending the push to receiving its ACK, in ms.
    pub ms: f64,
    /// The NACK's error, when the ztunnel refused it.
    #[serde(default)]
    pub nack: Option<String>,
}

fn record_push(
    shared: &Shared,
    node: &str,
    type_url: &str,
    resources: usize,
    version: &str,
    took: Duration,
    nack: Option<String>,
) {
    use std::io::Write;
    let r = PushRecord {
        node: node.into(),
        type_url: type_url.into(),
        resources,
        version: version.into(),
        ms: took.as_secs_f64() * 1000.0,
        nack,
    };
    let path = shared.settings.faults.with_file_name("pushes.jsonl");
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path)
        && let Ok(line) = serde_json::to_string(&r)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// The pushes answered so far (see [`PushRecord`]).
pub fn push_records(dir: &Path) -> Vec<PushRecord> {
    push_records_since(dir, 0)
}

/// Where the record of the next push to be answered will start: [`push_records_since`] that offset returns
/// only what is answered from now on (a version can come back: a file changed and changed back).
pub fn push_records_end(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("pushes.jsonl")).map(|m| m.len()).unwrap_or(0)
}

/// The pushes answered after `offset` (from [`push_records_end`]).
pub fn push_records_since(dir: &Path, offset: u64) -> Vec<PushRecord> {
    let all = std::fs::read(dir.join("pushes.jsonl")).unwrap_or_default();
    let from = usize::try_from(offset).unwrap_or(usize::MAX).min(all.len());
    String::from_utf8_lossy(&all[from..]).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Routes the two services of the one port by gRPC path.
#[derive(Clone)]
struct Routes {
    ca: IstioCertificateServiceServer<Ca>,
    ads: AggregatedDiscoveryServiceServer<Ads>,
}

impl tower::Service<http::Request<tonic::body::Body>> for Routes {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path().starts_with("/istio.v1.auth.IstioCertificateService/") {
            Box::pin(self.ca.call(req))
        } else {
            Box::pin(self.ads.call(req))
        }
    }
}

fn parse_mesh(bytes: &[u8]) -> Result<LocalConfig, String> {
    LocalConfig::parse(std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?).map_err(|e| e.to_string())
}

/// Serves until killed.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let (cert, key) = &settings.ca;
    let ca = LocalCa::load(cert, key, Duration::from_secs(86400)).context("loading the mesh root")?;
    let bytes = std::fs::read(&settings.mesh).unwrap_or_default();
    let initial = match parse_mesh(&bytes) {
        Ok(c) => Mesh::from_config(mesh_version(&bytes), &c),
        Err(e) => {
            eprintln!("mesh file: {e}; serving nothing until it is fixed");
            Mesh::from_config(String::new(), &LocalConfig::default())
        }
    };
    let (mesh_tx, mesh_rx) = watch::channel(Arc::new(initial));
    let (push_tx, push_rx) = watch::channel(None);
    let kube = match &settings.kubernetes {
        Some(k) => {
            let kc = kube::config::Kubeconfig::read_from(&k.kubeconfig).context("reading the kubeconfig")?;
            let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
            Some(kube::Client::try_from(cfg)?)
        }
        None => None,
    };
    let shared =
        Arc::new(Shared { settings: settings.clone(), mesh: mesh_rx, push: push_rx, ca, nonce: 1.into(), kube });
    // Follow the mesh file and the fault file.
    let watched = settings.clone();
    tokio::spawn(async move {
        let mut last_version = mesh_tx.borrow().version.clone();
        let mut last_push: Option<String> = None;
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            // Parsed only when its bytes changed: a big mesh file takes a while to parse.
            let bytes = std::fs::read(&watched.mesh).unwrap_or_default();
            let v = mesh_version(&bytes);
            if v != last_version {
                match parse_mesh(&bytes) {
                    Ok(c) => {
                        eprintln!(
                            "mesh: version {v}: {} workloads, {} services, {} policies",
                            c.workloads.len(),
                            c.services.len(),
                            c.policies.len()
                        );
                        let _ = mesh_tx.send(Arc::new(Mesh::from_config(v.clone(), &c)));
                    }
                    Err(e) => eprintln!("mesh file refused, keeping the last good one: {e}"),
                }
                last_version = v;
            }
            let f = read_faults(&watched.faults);
            if f.xds_push != last_push {
                last_push = f.xds_push.clone();
                let _ = push_tx.send(f.xds_push);
            }
        }
    });
    let routes = Routes {
        ca: IstioCertificateServiceServer::new(Ca(shared.clone())),
        ads: AggregatedDiscoveryServiceServer::new(Ads(shared)).max_encoding_message_size(64 * 1024 * 1024),
    };
    let identity =
        tonic::transport::Identity::from_pem(std::fs::read(&settings.serving.0)?, std::fs::read(&settings.serving.1)?);
    eprintln!("control plane on {} (CA and delta xDS)", settings.listen);
    println!("ready");
    tonic::transport::Server::builder()
        .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?
        .serve(settings.listen, routes)
        .await
        .context("serving")?;
    Ok(())
}

/// The running control plane of a lab: its netns on the fabric and its process.
pub struct ControlPlane {
    netns: crate::netns::Netns,
    proc: Option<crate::proc::Proc>,
    /// Its files: tokens, known pods, faults, log.
    pub dir: PathBuf,
    settings: Settings,
}

impl ControlPlane {
    /// Starts the control plane in a new netns `name` attached to the fabric bridge `br0` of `fabric`, serving
    /// `mesh` with the root in `ca` (certificate, key) and its serving certificate `serving`.
    pub fn start(
        name: &str,
        fabric: &crate::netns::Netns,
        dir: &Path,
        mesh: &Path,
        ca: (PathBuf, PathBuf),
        serving: (PathBuf, PathBuf),
    ) -> anyhow::Result<ControlPlane> {
        std::fs::create_dir_all(dir)?;
        for (file, empty) in [("tokens", ""), ("pods.json", "[]"), ("faults.json", "{}")] {
            std::fs::write(dir.join(file), empty)?;
        }
        let netns = crate::netns::Netns::create(name)?;
        fabric.ip(&["link", "add", "cp0", "type", "veth", "peer", "name", "eth0", "netns", netns.name()])?;
        fabric.ip(&["link", "set", "cp0", "master", "br0", "up"])?;
        netns.ip(&["addr", "add", &format!("{CP_IP}/24"), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["link", "set", "lo", "up"])?;
        let mut cp = ControlPlane {
            netns,
            proc: None,
            dir: dir.to_path_buf(),
            settings: Self::settings(dir, mesh, ca, serving),
        };
        cp.restart()?;
        Ok(cp)
    }

    /// Routes a node's pod CIDR through the node, so that pods reach the control plane as pods reach istiod
    /// in a cluster (the lab's waypoints ask its CA for their certificates).
    pub fn route_pods(&self, cidr: &str, node: std::net::Ipv4Addr) -> anyhow::Result<()> {
        self.netns.ip(&["route", "add", cidr, "via", &node.to_string()]).map(|_| ())
    }

    /// The control plane of a lab another process started (`lab pod`): its files, not its process.
    pub fn attach(
        name: &str,
        dir: &Path,
        mesh: &Path,
        ca: (PathBuf, PathBuf),
        serving: (PathBuf, PathBuf),
    ) -> anyhow::Result<ControlPlane> {
        let netns = crate::netns::Netns::open(name)?;
        Ok(ControlPlane { netns, proc: None, dir: dir.to_path_buf(), settings: Self::settings(dir, mesh, ca, serving) })
    }

    fn settings(dir: &Path, mesh: &Path, ca: (PathBuf, PathBuf), serving: (PathBuf, PathBuf)) -> Settings {
        Settings {
            listen: SocketAddr::from((CP_IP, CP_PORT)),
            mesh: mesh.to_path_buf(),
            pods: Some(dir.join("pods.json")),
            ca,
            serving,
            tokens: dir.join("tokens"),
            faults: dir.join("faults.json"),
            trust_domain: crate::lab::TRUST_DOMAIN.to_string(),
            kubernetes: None,
        }
    }

    /// Starts (or restarts) the process and waits until it listens.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let s = &self.settings;
        let mut cmd = self.netns.command(crate::util::binary("lab"));
        cmd.arg("control-plane")
            .arg("--listen")
            .arg(s.listen.to_string())
            .arg("--mesh")
            .arg(&s.mesh)
            .arg("--ca-cert")
            .arg(&s.ca.0)
            .arg("--ca-key")
            .arg(&s.ca.1)
            .arg("--serving-cert")
            .arg(&s.serving.0)
            .arg("--serving-key")
            .arg(&s.serving.1)
            .arg("--tokens")
            .arg(&s.tokens)
            .arg("--faults")
            .arg(&s.faults)
            .arg("--trust-domain")
            .arg(&s.trust_domain);
        if let Some(p) = &s.pods {
            cmd.arg("--pods").arg(p);
        }
        if let Some(k) = &s.kubernetes {
            cmd.arg("--kubeconfig").arg(&k.kubeconfig);
            for a in &k.trusted_node_accounts {
                cmd.arg("--trusted-node-account").arg(a);
            }
        }
        let log = self.dir.join("control-plane.log");
        // The log is appended to across restarts: only this process's lines count.
        let from = std::fs::metadata(&log).map(|m| m.len() as usize).unwrap_or(0);
        let proc = crate::proc::Proc::spawn("control-plane", cmd, &log)?;
        crate::util::wait_for("the control plane to listen", Duration::from_secs(10), || {
            proc.log().get(from..).is_some_and(|l| l.contains("ready")).then_some(())
        })
        .with_context(|| proc.log())?;
        self.proc = Some(proc);
        Ok(())
    }

    /// Stops the process (the control plane becomes unreachable).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(3));
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.proc
            .as_ref()
            .map(|p| p.log())
            .unwrap_or_else(|| std::fs::read_to_string(self.dir.join("control-plane.log")).unwrap_or_default())
    }

    /// Lets `node`'s ztunnel in with `token`.
    pub fn add_token(&self, token: &str, node: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&self.settings.tokens)?;
        writeln!(f, "{token} {node}")?;
        Ok(())
    }

    /// Tells the CA which pods run where (what istiod learns from the API server).
    pub fn set_known_pods(&self, pods: &[KnownPod]) -> anyhow::Result<()> {
        crate::cni::write_atomic(&self.dir.join("pods.json"), &serde_json::to_vec(pods)?)
    }

    /// Switches to the cluster tier's checks (see [`KubeAuth`]), and the route back to every node's pods (node
    /// proxies in their own pods call from pod addresses); restart it to take effect.
    pub fn use_kubernetes(
        &mut self,
        auth: KubeAuth,
        pod_routes: &[(String, std::net::Ipv4Addr)],
    ) -> anyhow::Result<()> {
        for (cidr, via) in pod_routes {
            self.netns.ip(&["route", "replace", cidr, "via", &via.to_string()])?;
        }
        self.settings.kubernetes = Some(auth);
        Ok(())
    }

    /// Sets the faults (an empty [`Faults`] clears them).
    pub fn set_faults(&self, f: &Faults) -> anyhow::Result<()> {
        crate::cni::write_atomic(&self.dir.join("faults.json"), &serde_json::to_vec(f)?)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_follow_content() {
        assert_eq!(mesh_version(b""), "cbf29ce484222325");
        assert_ne!(mesh_version(b"a"), mesh_version(b"b"));
    }

    #[test]
    fn deltas_send_only_what_changed_and_name_what_went() {
        let c1 = LocalConfig::parse(
            "workloads:\n- {uid: a, name: a, namespace: n, workloadIps: [10.0.0.1]}\n- {uid: b, name: b, namespace: n, workloadIps: [10.0.0.2]}\n",
        )
        .unwrap();
        let c2 = LocalConfig::parse(
            "workloads:\n- {uid: a, name: a, namespace: n, workloadIps: [10.0.0.1]}\n- {uid: c, name: c, namespace: n, workloadIps: [10.0.0.3]}\n",
        )
        .unwrap();
        let (m1, m2) = (Mesh::from_config("1".into(), &c1), Mesh::from_config("2".into(), &c2));
        let (_tx, mesh) = watch::channel(Arc::new(Mesh::default()));
        let (_ptx, push) = watch::channel(None);
        let (cert, key) = crate::ca::make_ca("t", "cluster.local").unwrap();
        let shared = Shared {
            settings: Settings {
                listen: "127.0.0.1:0".parse().unwrap(),
                mesh: "/nonexistent".into(),
                pods: None,
                ca: ("/x".into(), "/y".into()),
                serving: ("/x".into(), "/y".into()),
                tokens: "/nonexistent".into(),
                faults: "/nonexistent".into(),
                trust_domain: "cluster.local".into(),
                kubernetes: None,
            },
            mesh,
            push,
            ca: LocalCa::from_pem(&cert, &key, Duration::from_secs(60)).unwrap(),
            nonce: 1.into(),
            kube: None,
        };
        let mut sent = HashMap::new();
        let r = delta(&shared, &m1, ADDRESS_TYPE, &mut sent);
        assert_eq!(r.resources.len(), 2);
        let r = delta(&shared, &m2, ADDRESS_TYPE, &mut sent);
        assert_eq!(r.resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["c"]);
        assert_eq!(r.removed_resources, ["b"]);
        assert_eq!(r.system_version_info, "2");
        // Nothing changed: an empty answer that still carries the version.
        let r = delta(&shared, &m2, ADDRESS_TYPE, &mut sent);
        assert!(r.resources.is_empty() && r.removed_resources.is_empty());
        assert_ne!(r.nonce, "");
    }
}
