//! Outbound (15001): a connection the pod's app opened, captured by the pod's rules.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::PodCtx;
use super::copy;
use super::pool::{PoolError, PoolKey, StreamSlot};
use crate::identity::Identity;
use crate::metrics::{ConnRecord, Direction, Peer};
use crate::socket;
use crate::state::{NoUpstream, Protocol, Service, Snapshot};

/// Where an outbound connection goes.
enum Route {
    /// HBONE to `target` (an HBONE workload's address), whose ztunnel must prove one of `expected`.
    Hbone { target: SocketAddr, dst: Peer, expected: Vec<Identity> },
    /// Plain TCP to `target` (outside the mesh, or a workload that does not speak HBONE).
    Passthrough { target: SocketAddr, dst: Peer },
}

/// Decides the route: a service VIP goes to one of its endpoints with the port mapped; an HBONE workload's
/// address goes over HBONE; anything else passes through.
fn route(pod: &PodCtx, snap: &Snapshot, dst: SocketAddr) -> Result<Route, (NoUpstream, Arc<Service>)> {
    let td = &pod.ctx.cfg.trust_domain;
    let (workload, target, service) = match snap.service_by_vip(dst.ip()) {
        Some(svc) => {
            let up = snap.pick_upstream(&svc, dst.ip(), dst.port()).map_err(|e| (e, svc.clone()))?;
            (Some(up.workload), up.addr, Some(svc))
        }
        None => (snap.workload_by_ip(dst.ip()), dst, None),
    };
    match workload {
        Some(w) if w.protocol == Protocol::HBONE => {
            let id = w.identity(td);
            let mut expected = vec![id.clone()];
            for san in service.iter().flat_map(|s| &s.subject_alt_names) {
                match san.parse::<Identity>() {
                    Ok(i) => expected.push(i),
                    Err(e) => debug!(error = %e, "ignoring a service SAN that is not a workload identity"),
                }
            }
            expected.sort();
            expected.dedup();
            Ok(Route::Hbone { target, dst: Peer { workload: Some(w), identity: Some(id), service }, expected })
        }
        workload => Ok(Route::Passthrough { target, dst: Peer { workload, identity: None, service } }),
    }
}

/// Handles one captured outbound connection.
pub async fn handle(pod: Arc<PodCtx>, tcp: TcpStream, peer: SocketAddr) {
    let Some(dst) = pod.original_dst(&tcp, peer) else { return };
    let snap = pod.ctx.state.snapshot();
    let src = Peer { workload: pod.workload(&snap), identity: Some(pod.identity.clone()), service: None };
    let route = route(&pod, &snap, dst);
    // An open connection must not keep an old configuration alive.
    drop(snap);
    match route {
        Ok(Route::Hbone { target, dst: dst_peer, expected }) => {
            hbone(pod, tcp, peer, target, src, dst_peer, expected).await
        }
        Ok(Route::Passthrough { target, dst: dst_peer }) => passthrough(pod, tcp, peer, target, src, dst_peer).await,
        Err((e, svc)) => {
            // Istio's flag for "no route": the connection is closed without being sent anywhere.
            let dst_peer = Peer { workload: None, identity: None, service: Some(svc) };
            let rec = ConnRecord::open(&pod.ctx.metrics, Direction::Outbound, peer, dst, None, src, dst_peer, false);
            warn!(pod = %pod.name(), %peer, %dst, error = %e, "no upstream for a service connection; closing it");
            rec.close(0, 0, Some(&e.to_string()), Some("NR"));
        }
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

/// Opens the CONNECT stream for one connection on the pod's pool. A pooled connection can die between
/// requests (its peer's ztunnel restarted) or be going away (its peer is draining) before the pool notices; a
/// CONNECT that fails before any answer has carried no data, so it is retried once on a fresh connection.
///
/// `early` (what the client already sent) goes right behind the request, so the peer has it when it answers
/// instead of one round trip later; until the answer nothing reaches the app, so on a retry it is sent again.
async fn open_stream(
    pod: &PodCtx,
    key: &PoolKey,
    peer: SocketAddr,
    dst: SocketAddr,
    early: &Option<Bytes>,
) -> Result<(Response<RecvStream>, SendStream<Bytes>, StreamSlot), String> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (mut send_req, slot) = match pod.pool.stream(key).await {
            Ok(s) => s,
            // The pooled connection is going away (GOAWAY from a draining peer, or it broke): the pool has
            // marked it closed, so the retry opens a new one.
            Err(PoolError::H2(e)) if attempt < 2 => {
                debug!(pod = %pod.name(), %dst, error = %e, "pooled HBONE connection unusable; retrying on a new one");
                continue;
            }
            Err(e) => return Err(e.to_string()),
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
            Ok((resp, mut send)) => match early {
                Some(b) => match send.send_data(b.clone(), false) {
                    Ok(()) => resp.await.map(|r| (r, send)),
                    Err(e) => Err(e),
                },
                None => resp.await.map(|r| (r, send)),
            },
            Err(e) => Err(e),
        };
        match sent {
            Ok((resp, send)) => return Ok((resp, send, slot)),
            Err(e) if attempt < 2 => {
                slot.mark_broken();
                debug!(pod = %pod.name(), %dst, error = %e, "pooled HBONE connection failed; retrying on a new one");
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// What the client has already sent (its first request, typically), without waiting for more; at most
/// `EARLY_MAX` bytes. An end of stream is left in the socket for the copy to see.
fn early_data(tcp: &TcpStream) -> Option<Bytes> {
    const EARLY_MAX: usize = 16 * 1024;
    let mut buf = [0u8; EARLY_MAX];
    // A plain non-blocking read: tokio's `try_read` would answer from its cached readiness, which a socket
    // accepted a moment ago does not have yet.
    let sock = socket2::SockRef::from(tcp);
    match std::io::Read::read(&mut &*sock, &mut buf) {
        Ok(n) if n > 0 => Some(Bytes::copy_from_slice(&buf[..n])),
        // A read of 0 consumed nothing: the copy still sees the end of stream.
        _ => None,
    }
}

async fn hbone(
    pod: Arc<PodCtx>,
    tcp: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    src: Peer,
    dst_peer: Peer,
    expected: Vec<Identity>,
) {
    let hbone_addr = SocketAddr::new(dst.ip(), ambit_proto::zds::INBOUND_HBONE_PORT);
    let key = PoolKey { src: pod.identity.clone(), dst: expected, addr: hbone_addr };
    let rec = ConnRecord::open(&pod.ctx.metrics, Direction::Outbound, peer, dst, Some(hbone_addr), src, dst_peer, true);
    let early = early_data(&tcp);
    let early_len = early.as_ref().map_or(0, |b| b.len() as u64);
    // Boxed: the setup's state is freed once the stream is open, so an idle connection keeps only the copy's.
    let (resp, send, slot) = match Box::pin(open_stream(&pod, &key, peer, dst, &early)).await {
        Ok(s) => s,
        Err(e) => {
            rec.close(0, 0, Some(&e.to_string()), Some("UF"));
            return;
        }
    };
    if resp.status() != StatusCode::OK {
        let flags = match resp.status() {
            StatusCode::UNAUTHORIZED => "DENY",
            StatusCode::SERVICE_UNAVAILABLE => "UF",
            _ => "CONNECT",
        };
        rec.close(early_len, 0, Some(&format!("HBONE CONNECT answered {}", resp.status())), Some(flags));
        return;
    }
    drop(early);
    let t = copy::tcp_h2(&tcp, send, resp.into_body()).await;
    drop(slot);
    rec.close(early_len + t.from_tcp, t.to_tcp, t.error.as_ref().map(|e| e.to_string()).as_deref(), None);
}

async fn passthrough(pod: Arc<PodCtx>, tcp: TcpStream, peer: SocketAddr, dst: SocketAddr, src: Peer, dst_peer: Peer) {
    let rec = ConnRecord::open(&pod.ctx.metrics, Direction::Outbound, peer, dst, None, src, dst_peer, false);
    let upstream = match Box::pin(socket::connect_from_pod(&pod.netns, dst, None, pod.ctx.cfg.packet_mark)).await {
        Ok(u) => u,
        Err(e) => {
            rec.close(0, 0, Some(&e.to_string()), Some("UF"));
            return;
        }
    };
    pod.ctx.tune(&upstream);
    let t = copy::tcp_tcp(&tcp, &upstream).await;
    rec.close(t.from_tcp, t.to_tcp, t.error.as_ref().map(|e| e.to_string()).as_deref(), None);
}
