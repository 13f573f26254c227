//! Outbound (15001): a connection the pod's app opened, captured by the pod's rules, sent where
//! [`route`](super::route) says.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Response, StatusCode};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::PodCtx;
use super::copy;
use super::pool::{PoolError, PoolKey, StreamSlot};
use super::route::{self, Refusal, Route, RouteError, Source};
use crate::identity::Identity;
use crate::metrics::{ConnRecord, Direction, Peer, ResponseFlags};
use crate::socket;

/// Handles one captured outbound connection.
pub async fn handle(pod: Arc<PodCtx>, tcp: TcpStream, peer: SocketAddr) {
    let Some(dst) = pod.original_dst(&tcp, peer) else { return };
    if pod.is_capture_probe(dst.ip(), dst.port()) {
        // `ambit-agent debug` checking capture: being accepted here was the answer; nothing is dialed.
        debug!(pod = %pod.name(), %peer, %dst, "capture probe answered");
        return;
    }
    let snap = pod.ctx.state.snapshot();
    let me = pod.workload(&snap);
    let cfg = &pod.ctx.cfg;
    let from = Source { workload: me.as_deref(), identity: &pod.identity, ip: peer.ip(), network: &cfg.network };
    let route = route::route(&snap, &cfg.trust_domain, from, dst);
    let src = Peer { workload: me, identity: Some(pod.identity.clone()), service: None };
    // An open connection must not keep an old configuration alive.
    drop(snap);
    match route {
        Ok(Route::Hbone { tunnel, authority, dst: dst_peer, expected, waypoint }) => {
            let to = Tunnel { addr: tunnel, authority, expected, waypoint };
            hbone(pod, tcp, peer, to, src, dst_peer).await
        }
        Ok(Route::Passthrough { target, dst: dst_peer }) => {
            // No mTLS: no principal proven to anyone (Istio's ztunnel reports the source's as `unknown` too).
            let src = Peer { identity: None, ..src };
            passthrough(pod, tcp, peer, target, src, dst_peer).await
        }
        Err(refusal) => {
            let Refusal { error, dst: dst_peer } = *refusal;
            // Closed without being sent anywhere: never around a waypoint, never in plaintext. Istio's ztunnel
            // logs it and counts nothing; Ambit also counts it, flagged CONNECT.
            let rec = ConnRecord::open(&pod.ctx.metrics, Direction::Outbound, peer, dst, None, src, dst_peer, false);
            warn!(pod = %pod.name(), %peer, %dst, %error, "connection refused: no route the mesh allows");
            if let RouteError::Waypoint(e) = &error {
                pod.ctx.metrics.waypoint_refused(e.reason());
            }
            rec.close(0, 0, Some(&error), ResponseFlags::ConnectFailure);
        }
    }
}

/// Where an HBONE connection goes.
struct Tunnel {
    /// The peer's HBONE address.
    addr: SocketAddr,
    /// The CONNECT target.
    authority: SocketAddr,
    /// The identities the peer may prove.
    expected: Vec<Identity>,
    /// The peer is a waypoint.
    waypoint: bool,
}

/// Most of what the client sends before the peer answers that is forwarded at once (and kept, for a retry).
const EARLY_MAX: usize = 16 * 1024;

/// Why a CONNECT stream could not be opened.
enum OpenError {
    /// The pool or the peer failed; the flag says at which step, the message how.
    Upstream(ResponseFlags, String),
    /// The client's own socket failed while the answer was on its way.
    Client(std::io::Error),
}

/// Opens the CONNECT stream for one connection on the pod's pool. A pooled connection can die between
/// requests (its peer's ztunnel restarted) or be going away (its peer is draining) before the pool notices; a
/// CONNECT that fails before any answer has carried no data to the app, so it is retried once on a fresh
/// connection.
///
/// What the client sends goes right behind the request, without waiting for the answer: a client that speaks
/// first (HTTP, TLS) has its first bytes at the app one round trip between the ztunnels sooner. Until the
/// answer, those bytes (at most [`EARLY_MAX`]; more waits in the client's socket) are also kept in `early`,
/// so a retry sends them again.
async fn open_stream(
    pod: &PodCtx,
    key: &PoolKey,
    peer: SocketAddr,
    dst: SocketAddr,
    host: Option<&str>,
    tcp: &TcpStream,
    early: &mut Vec<u8>,
) -> Result<(Response<RecvStream>, SendStream<Bytes>, StreamSlot), OpenError> {
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
            Err(e) => return Err(OpenError::Upstream(e.flags(), e.to_string())),
        };
        let req = crate::hbone::client::connect_request(dst, peer, host, &pod.info.namespace, &pod.info.name);
        let sent = match send_req.send_request(req, false) {
            Ok((resp, mut send)) => answer(resp, &mut send, tcp, early).await.map(|r| r.map(|r| (r, send))),
            Err(e) => Ok(Err(e)),
        };
        match sent {
            Err(e) => return Err(OpenError::Client(e)),
            Ok(Ok((resp, send))) => return Ok((resp, send, slot)),
            Ok(Err(e)) if attempt < 2 => {
                slot.mark_broken();
                debug!(pod = %pod.name(), %dst, error = %e, "pooled HBONE connection failed; retrying on a new one");
            }
            Ok(Err(e)) => return Err(OpenError::Upstream(ResponseFlags::ConnectFailure, e.to_string())),
        }
    }
}

/// Sends `early` (what the client sent before this attempt) behind the CONNECT, then waits for the peer's
/// answer, meanwhile forwarding what the client sends (up to [`EARLY_MAX`] in all, also kept in `early`).
/// The outer error is the client's socket failing.
async fn answer(
    resp: h2::client::ResponseFuture,
    send: &mut SendStream<Bytes>,
    tcp: &TcpStream,
    early: &mut Vec<u8>,
) -> std::io::Result<Result<Response<RecvStream>, h2::Error>> {
    if !early.is_empty()
        && let Err(e) = send.send_data(Bytes::copy_from_slice(early), false)
    {
        return Ok(Err(e));
    }
    tokio::pin!(resp);
    // Reading stops at the limit, or at the client's end of stream (which stays readable for the copy: a
    // TCP socket reads 0 again after its peer's FIN).
    let mut watch = early.len() < EARLY_MAX;
    let mut chunk = [0u8; 4096];
    loop {
        tokio::select! {
            biased;
            r = &mut resp => return Ok(r),
            r = tcp.readable(), if watch => {
                r?;
                let room = (EARLY_MAX - early.len()).min(chunk.len());
                match tcp.try_read(&mut chunk[..room]) {
                    Ok(0) => watch = false,
                    Ok(n) => {
                        crate::busy_poll::activity();
                        early.extend_from_slice(&chunk[..n]);
                        watch = early.len() < EARLY_MAX;
                        if let Err(e) = send.send_data(Bytes::copy_from_slice(&chunk[..n]), false) {
                            return Ok(Err(e));
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// What the client has already sent (its first request, typically), without waiting for more; at most
/// `EARLY_MAX` bytes. An end of stream is left in the socket for the copy to see.
fn early_data(tcp: &TcpStream) -> Vec<u8> {
    let mut buf = [0u8; EARLY_MAX];
    // A plain non-blocking read: tokio's `try_read` would answer from its cached readiness, which a socket
    // accepted a moment ago does not have yet.
    let sock = socket2::SockRef::from(tcp);
    match std::io::Read::read(&mut &*sock, &mut buf) {
        Ok(n) if n > 0 => buf[..n].to_vec(),
        // A read of 0 consumed nothing: the copy still sees the end of stream.
        _ => Vec::new(),
    }
}

async fn hbone(pod: Arc<PodCtx>, tcp: TcpStream, peer: SocketAddr, to: Tunnel, src: Peer, dst_peer: Peer) {
    let key = PoolKey { src: pod.identity.clone(), dst: to.expected, addr: to.addr };
    // The service (shared, not its hostname copied) for the CONNECT's `forwarded` host.
    let service = dst_peer.service.clone();
    let rec =
        ConnRecord::open(&pod.ctx.metrics, Direction::Outbound, peer, to.authority, Some(to.addr), src, dst_peer, true);
    let mut early = early_data(&tcp);
    // Boxed: the setup's state is freed once the stream is open, so an idle connection keeps only the copy's.
    let opened = Box::pin(open_stream(
        &pod,
        &key,
        peer,
        to.authority,
        service.as_ref().map(|s| s.hostname.as_str()),
        &tcp,
        &mut early,
    ))
    .await;
    let early_len = early.len() as u64;
    drop(early);
    let (resp, send, slot) = match opened {
        Ok(s) => s,
        Err(OpenError::Upstream(flags, e)) => {
            if to.waypoint {
                // A waypoint that is down, refuses or cannot prove its identity: nothing went around it.
                pod.ctx.metrics.waypoint_refused("unreachable");
                warn!(pod = %pod.name(), %peer, dst = %to.authority, waypoint = %to.addr, error = %e,
                      "waypoint unreachable; connection refused");
            }
            rec.close(early_len, 0, Some(&e), flags);
            return;
        }
        Err(OpenError::Client(e)) => {
            rec.close(early_len, 0, Some(&format_args!("client: {e}")), ResponseFlags::None);
            return;
        }
    };
    if resp.status() != StatusCode::OK {
        let flags = ResponseFlags::of_connect_status(resp.status());
        rec.close(early_len, 0, Some(&format_args!("HBONE CONNECT answered {}", resp.status())), flags);
        return;
    }
    let t = copy::tcp_h2(&tcp, send, resp.into_body()).await;
    drop(slot);
    rec.close(early_len + t.from_tcp, t.to_tcp, t.error.as_ref().map(|e| e as _), ResponseFlags::None);
}

async fn passthrough(pod: Arc<PodCtx>, tcp: TcpStream, peer: SocketAddr, dst: SocketAddr, src: Peer, dst_peer: Peer) {
    let rec = ConnRecord::open(&pod.ctx.metrics, Direction::Outbound, peer, dst, None, src, dst_peer, false);
    let upstream = match Box::pin(socket::connect_from_pod(&*pod.netns, dst, None, pod.ctx.cfg.packet_mark)).await {
        Ok(u) => u,
        Err(e) => {
            rec.close(0, 0, Some(&e), ResponseFlags::ConnectFailure);
            return;
        }
    };
    pod.ctx.keepalive(&upstream);
    let t = copy::tcp_tcp(&tcp, &upstream).await;
    rec.close(t.from_tcp, t.to_tcp, t.error.as_ref().map(|e| e as _), ResponseFlags::None);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A peer that answers a CONNECT only once it has `wait_for` bytes of the stream; returns what it got.
    async fn peer_answering_after(io: tokio::io::DuplexStream, wait_for: usize) -> Vec<u8> {
        let mut srv = h2::server::handshake(io).await.unwrap();
        let (req, mut respond) = srv.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while srv.accept().await.is_some() {} });
        let mut body = req.into_body();
        let mut got = Vec::new();
        while got.len() < wait_for {
            let chunk = body.data().await.unwrap().unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
            got.extend_from_slice(&chunk);
        }
        respond.send_response(Response::new(()), false).unwrap();
        got
    }

    #[tokio::test]
    async fn what_the_client_sends_goes_before_the_answer_up_to_the_limit_and_is_kept() {
        let (c_io, s_io) = tokio::io::duplex(1 << 20);
        let peer = tokio::spawn(peer_answering_after(s_io, EARLY_MAX));
        let (send_req, conn) = h2::client::handshake(c_io).await.unwrap();
        tokio::spawn(conn);
        let mut send_req = send_req.ready().await.unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut proxied, _) = l.accept().await.unwrap();

        let req = Request::builder().method(Method::CONNECT).uri("10.0.0.1:80").body(()).unwrap();
        let (resp, mut send) = send_req.send_request(req, false).unwrap();
        // The client writes only after the request went out, and more than is forwarded before the answer.
        let payload: Vec<u8> = (0..EARLY_MAX + 1000).map(|i| (i % 251) as u8).collect();
        let written = payload.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(&written).await.unwrap();
            client
        });
        let mut early = Vec::new();
        // The peer answers only once it has the client's bytes: without them this would wait for ever.
        let r = tokio::time::timeout(Duration::from_secs(10), answer(resp, &mut send, &proxied, &mut early))
            .await
            .expect("answered");
        assert_eq!(r.unwrap().unwrap().status(), StatusCode::OK);
        assert_eq!(early, payload[..EARLY_MAX], "what went before the answer is kept, for a retry");
        assert_eq!(peer.await.unwrap(), payload[..EARLY_MAX]);
        // The rest waits in the client's socket for the copy.
        let mut rest = vec![0u8; 1000];
        proxied.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest, payload[EARLY_MAX..]);
    }
}
