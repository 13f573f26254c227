//! Outbound (15001): a connection the pod's app opened, captured by the pod's rules.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, StatusCode};
use tokio::net::TcpStream;
use tracing::debug;

use super::PodCtx;
use super::copy;
use super::pool::PoolKey;
use crate::metrics::{ConnRecord, Direction, Peer};
use crate::socket;
use crate::state::Protocol;

/// Handles one captured outbound connection.
pub async fn handle(pod: Arc<PodCtx>, tcp: TcpStream, peer: SocketAddr) {
    let Some(dst) = pod.original_dst(&tcp, peer) else { return };
    let snap = pod.ctx.state.snapshot();
    let src = Peer { workload: pod.workload(), identity: Some(pod.identity.clone()) };
    match snap.workload_by_ip(dst.ip()) {
        Some(w) if w.protocol == Protocol::HBONE => {
            let dst_id = w.identity(&pod.ctx.cfg.trust_domain);
            let dst_peer = Peer { workload: Some(w), identity: Some(dst_id) };
            hbone(pod, tcp, peer, dst, src, dst_peer).await
        }
        w => passthrough(pod, tcp, peer, dst, src, Peer { workload: w, identity: None }).await,
    }
}

fn traceparent() -> String {
    let mut ids = [0u8; 24];
    let _ = rustls::crypto::ring::default_provider().secure_random.fill(&mut ids);
    let hex: String = ids.iter().map(|b| format!("{b:02x}")).collect();
    format!("00-{}-{}-01", &hex[..32], &hex[32..])
}

fn forwarded_for(peer: SocketAddr) -> String {
    format!("for=\"{peer}\"")
}

async fn hbone(pod: Arc<PodCtx>, tcp: TcpStream, peer: SocketAddr, dst: SocketAddr, src: Peer, dst_peer: Peer) {
    let hbone_addr = SocketAddr::new(dst.ip(), ambit_proto::zds::INBOUND_HBONE_PORT);
    let key = PoolKey {
        src: pod.identity.clone(),
        dst: dst_peer.identity.clone().expect("set by the caller"),
        addr: hbone_addr,
    };
    let rec = ConnRecord::open(&pod.ctx.metrics, Direction::Outbound, peer, dst, Some(hbone_addr), src, dst_peer, true);
    // A pooled connection can die between requests (its peer's ztunnel restarted) before the pool notices. A
    // CONNECT that fails before any answer has carried no data, so it is retried once on a fresh connection.
    let mut attempt = 0;
    let (resp, send, slot) = loop {
        attempt += 1;
        let (mut send_req, slot) = match pod.pool.stream(&key).await {
            Ok(s) => s,
            Err(e) => {
                rec.close(0, 0, Some(&e.to_string()), Some("UF"));
                return;
            }
        };
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(dst.to_string())
            .header("forwarded", forwarded_for(peer))
            .header("traceparent", traceparent())
            .header("baggage", format!("k8s.namespace.name={},k8s.pod.name={}", pod.info.namespace, pod.info.name))
            .body(())
            .expect("valid CONNECT request");
        let sent = match send_req.send_request(req, false) {
            Ok((resp, send)) => resp.await.map(|r| (r, send)),
            Err(e) => Err(e),
        };
        match sent {
            Ok((resp, send)) => break (resp, send, slot),
            Err(e) if attempt < 2 => {
                slot.mark_broken();
                debug!(pod = %pod.name(), %dst, error = %e, "pooled HBONE connection failed; retrying on a new one");
            }
            Err(e) => {
                rec.close(0, 0, Some(&e.to_string()), Some("UF"));
                return;
            }
        }
    };
    if resp.status() != StatusCode::OK {
        let flags = match resp.status() {
            StatusCode::UNAUTHORIZED => "DENY",
            StatusCode::SERVICE_UNAVAILABLE => "UF",
            _ => "CONNECT",
        };
        rec.close(0, 0, Some(&format!("HBONE CONNECT answered {}", resp.status())), Some(flags));
        return;
    }
    let t = copy::tcp_h2(&tcp, send, resp.into_body()).await;
    drop(slot);
    rec.close(t.from_tcp, t.to_tcp, t.error.as_ref().map(|e| e.to_string()).as_deref(), None);
}

async fn passthrough(pod: Arc<PodCtx>, tcp: TcpStream, peer: SocketAddr, dst: SocketAddr, src: Peer, dst_peer: Peer) {
    let rec = ConnRecord::open(&pod.ctx.metrics, Direction::Outbound, peer, dst, None, src, dst_peer, false);
    let upstream = match socket::connect_from_pod(&pod.netns, dst, None, pod.ctx.cfg.packet_mark).await {
        Ok(u) => u,
        Err(e) => {
            rec.close(0, 0, Some(&e.to_string()), Some("UF"));
            return;
        }
    };
    let t = copy::tcp_tcp(&tcp, &upstream).await;
    rec.close(t.from_tcp, t.to_tcp, t.error.as_ref().map(|e| e.to_string()).as_deref(), None);
}
