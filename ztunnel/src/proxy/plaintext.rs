//! Inbound plaintext (15006): TCP from outside the mesh to the pod's app, captured by the pod's rules.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::PodCtx;
use super::copy;
use crate::metrics::{ConnRecord, Direction, Peer};
use crate::socket;

/// Handles one captured inbound plaintext connection.
pub async fn handle(pod: Arc<PodCtx>, tcp: TcpStream, peer: SocketAddr) {
    let Some(dst) = pod.original_dst(&tcp, peer) else { return };
    let snap = pod.ctx.state.snapshot();
    let src = Peer { workload: snap.workload_by_ip(peer.ip()), identity: None };
    let me = Peer { workload: pod.workload(), identity: Some(pod.identity.clone()) };
    let rec = ConnRecord::open(&pod.ctx.metrics, Direction::Inbound, peer, dst, None, src, me, false);
    let app = match socket::connect_from_pod(&pod.netns, dst, Some(peer.ip()), pod.ctx.cfg.packet_mark).await {
        Ok(a) => a,
        Err(e) => {
            rec.close(0, 0, Some(&e.to_string()), Some("UF"));
            return;
        }
    };
    let t = copy::tcp_tcp(&tcp, &app).await;
    rec.close(t.from_tcp, t.to_tcp, t.error.as_ref().map(|e| e.to_string()).as_deref(), None);
}
