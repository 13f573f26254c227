//! Workloads, services and policies from istiod over delta ADS
//! (`envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`).
//!
//! - [`convert`]: istiod's resources to and from ztunnel's own types (pure);
//! - [`machine`]: the client's state machine, one ACK or NACK per response (pure);
//! - this module: the stream itself, reconnection with capped, jittered backoff, and handing each accepted
//!   change to [`State`]. The state is kept across disconnects; ztunnel becomes ready only after the first
//!   complete push (every type answered once).

pub mod convert;
pub mod machine;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ambit_proto::control_plane::discovery::Node;
use ambit_proto::control_plane::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use serde::Serialize;
use tracing::{info, warn};

use crate::controlplane::Connection;
use crate::metrics::{Metrics, TypeLabels};
use crate::state::State;
use machine::{Machine, TypeStatus};

/// The longest wait between two connection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// The node id and metadata Istio's ztunnel sends: `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`, with
/// `NAME`, `NAMESPACE`, `INSTANCE_IPS` and `NODE_NAME` in the metadata.
pub fn node(instance_ip: &str, pod_name: &str, pod_namespace: &str, node_name: &str, cluster_id: &str) -> Node {
    let s = |v: &str| prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(v.to_string())) };
    let fields = [
        ("NAME", pod_name),
        ("NAMESPACE", pod_namespace),
        ("INSTANCE_IPS", instance_ip),
        ("NODE_NAME", node_name),
        ("CLUSTER_ID", cluster_id),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), s(v)))
    .collect();
    Node {
        id: format!("ztunnel~{instance_ip}~{pod_name}.{pod_namespace}~{pod_namespace}.svc.cluster.local"),
        metadata: Some(prost_types::Struct { fields }),
        ..Default::default()
    }
}

/// The xDS connection as operators see it in `/config_dump`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XdsStatus {
    /// The server.
    pub address: String,
    /// `Connecting`, `Connected` or `Disconnected`.
    pub state: &'static str,
    /// Whether every type has been received once (readiness).
    pub synced: bool,
    /// Streams opened.
    pub connections: u64,
    /// Why the last stream ended.
    pub last_disconnect: Option<String>,
    /// Per type URL.
    pub types: std::collections::BTreeMap<String, TypeStatus>,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Runs the client for ever: connect, subscribe, apply, reconnect.
pub async fn run(
    conn: Connection,
    node: Node,
    state: Arc<State>,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<XdsStatus>>,
) {
    let mut m = Machine::new(node);
    let mut backoff = Duration::from_millis(100);
    status.lock().unwrap().address = conn.address().to_string();
    loop {
        status.lock().unwrap().state = "Connecting";
        let started = std::time::Instant::now();
        let reason = match stream(&conn, &mut m, &state, &metrics, &status).await {
            Ok(()) => "the server closed the stream".to_string(),
            Err(e) => e,
        };
        metrics.xds_connected.set(0);
        metrics
            .xds_terminations
            .get_or_create(&crate::metrics::ReasonOnlyLabels { reason: termination_kind(&reason) })
            .inc();
        {
            let mut s = status.lock().unwrap();
            s.state = "Disconnected";
            s.last_disconnect = Some(reason.clone());
        }
        // A stream that lived a while earns a quick retry; repeated failures back off.
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(100);
        }
        let wait = backoff.mul_f64(0.75 + 0.5 * crate::certs::jitter());
        warn!(address = %conn.address(), error = %reason, retry_in = ?wait, "xDS stream ended; the last good state stays in force");
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn termination_kind(reason: &str) -> String {
    if reason.starts_with("token") || reason.starts_with("root") {
        "config".into()
    } else if reason.contains("closed") {
        "closed".into()
    } else {
        "error".into()
    }
}

async fn stream(
    conn: &Connection,
    m: &mut Machine,
    state: &State,
    metrics: &Metrics,
    status: &Mutex<XdsStatus>,
) -> Result<(), String> {
    let channel = conn.channel().map_err(|e| e.to_string())?;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for r in m.start() {
        tx.send(r).await.map_err(|_| "request channel closed".to_string())?;
    }
    let req = conn.request(tokio_stream::wrappers::ReceiverStream::new(rx)).map_err(|e| e.to_string())?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut responses = client
        .delta_aggregated_resources(req)
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    {
        let mut s = status.lock().unwrap();
        s.state = "Connected";
        s.connections += 1;
    }
    metrics.xds_connected.set(1);
    info!(address = %conn.address(), "xDS stream open");
    while let Some(resp) = responses.message().await.map_err(|s| format!("{:?}: {}", s.code(), s.message()))? {
        let type_url = resp.type_url.clone();
        let labels = TypeLabels { url: type_url.clone() };
        metrics.xds_messages.get_or_create(&labels).inc();
        let bytes: usize = resp.resources.iter().filter_map(|r| r.resource.as_ref()).map(|a| a.value.len()).sum();
        metrics.xds_message_bytes.get_or_create(&labels).inc_by(bytes as u64);
        let (resources, removed) = (resp.resources.len(), resp.removed_resources.len());
        let was_synced = m.synced();
        let o = m.handle(resp, now_secs());
        match &o.error {
            Some(e) => {
                metrics.xds_nacks.get_or_create(&labels).inc();
                warn!(r#type = %type_url, error = %e, "refused an xDS push (NACK); the last good state stays in force");
                state.refuse(format!("xDS {type_url}: {e}"));
            }
            None if m.synced() && (o.changed || !was_synced) => {
                if o.emptied {
                    warn!(r#type = %type_url, "the control plane removed every resource of this type");
                }
                let r = m.resources();
                state.apply(&format!("xds {}", conn.address()), r.workloads, r.services, r.policies);
                info!(r#type = %type_url, resources, removed, "applied an xDS push");
            }
            None => state.clear_error(),
        }
        for (t, st) in m.status() {
            metrics.xds_resources.get_or_create(&TypeLabels { url: t }).set(st.resources as i64);
        }
        {
            let mut s = status.lock().unwrap();
            s.synced = m.synced();
            s.types = m.status();
        }
        tx.send(o.reply).await.map_err(|_| "request channel closed".to_string())?;
    }
    Ok(())
}
