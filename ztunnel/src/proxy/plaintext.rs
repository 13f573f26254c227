//! Inbound plaintext (15006): TCP from outside the mesh to the pod's app, captured by the pod's rules.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::PodCtx;
use super::copy;
use crate::authz::Conn;
use crate::metrics::{ConnRecord, Direction, Peer, ResponseFlags, SourceLabels};
use crate::socket;
use crate::state::{Protocol, Workload};

/// Counts plaintext from a workload that speaks HBONE (its ztunnel did not capture it, or it bypassed
/// capture) and logs it once per source workload.
fn plaintext_from_mesh(pod: &PodCtx, w: &Workload, peer: SocketAddr) {
    let labels =
        SourceLabels { source_workload_namespace: w.namespace.clone(), source_workload: w.metrics_name().to_string() };
    let counter = pod.ctx.metrics.plaintext_from_mesh.get_or_create(&labels);
    if counter.inc() == 0 {
        tracing::warn!(
            pod = %pod.name(), %peer, source = %format!("{}/{}", w.namespace, w.name),
            "plaintext from a workload that speaks HBONE (its traffic is not captured by its ztunnel); counted in \
             ztunnel_inbound_plaintext_from_mesh_total, logged once"
        );
    }
}

/// Handles one captured inbound plaintext connection.
pub async fn handle(pod: Arc<PodCtx>, tcp: TcpStream, peer: SocketAddr) {
    let Some(dst) = pod.original_dst(&tcp, peer) else { return };
    if pod.is_capture_probe(peer.ip(), dst.port()) {
        // `ambit-agent debug` checking inbound capture: being accepted here was the answer.
        tracing::debug!(pod = %pod.name(), %peer, %dst, "capture probe answered");
        return;
    }
    let snap = pod.ctx.state.snapshot();
    let me = pod.workload(&snap);
    let service = me.as_ref().and_then(|w| snap.inbound_service(w, dst.port()));
    let client = snap.workload_by_ip(peer.ip());
    if let Some(w) = client.as_ref().filter(|w| w.protocol == Protocol::HBONE) {
        plaintext_from_mesh(&pod, w, peer);
    }
    let conn = Conn { src: peer, dst, src_identity: None };
    let allowed = super::authorize(&pod, &snap, me.as_deref(), &conn, "plaintext");
    // An open connection must not keep an old configuration alive.
    drop(snap);
    let src = Peer { workload: client, identity: None, service: None };
    let me = Peer { workload: me, identity: Some(pod.identity.clone()), service };
    let rec = ConnRecord::open(&pod.ctx.metrics, Direction::Inbound, peer, dst, None, src, me, false);
    if let Err(d) = allowed {
        // Plaintext has no way to say why: the connection is closed.
        rec.close(0, 0, Some(&d), ResponseFlags::Deny);
        return;
    }
    let app = match Box::pin(socket::connect_from_pod(&*pod.netns, dst, Some(peer.ip()), pod.ctx.cfg.packet_mark)).await
    {
        Ok(a) => a,
        Err(e) => {
            rec.close(0, 0, Some(&e), ResponseFlags::ConnectFailure);
            return;
        }
    };
    let t = copy::tcp_tcp(&tcp, &app).await;
    rec.close(t.from_tcp, t.to_tcp, t.error.as_ref().map(|e| e as _), ResponseFlags::None);
}
