//! Inbound HBONE (15008): mTLS from another ztunnel, then one HTTP/2 CONNECT stream per proxied connection,
//! each validated and connected to the app from inside the pod, with the client's IP as source.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{PodCtx, copy};
use crate::authz::Conn;
use crate::hbone;
use crate::hbone::HANDSHAKE_TIMEOUT;
use crate::identity::Identity;
use crate::metrics::{ConnRecord, Direction, Peer, ReasonLabels, ResponseFlags};
use crate::socket;
use crate::tls;

/// Counts a refused HBONE request; `true` the first time for this reason (see [`Metrics::tls_failure`]).
fn reject(pod: &PodCtx, reason: &str) -> bool {
    pod.ctx
        .metrics
        .hbone_rejected
        .get_or_create(&ReasonLabels { direction: "inbound".into(), reason: reason.into() })
        .inc()
        == 0
}

/// Logs bad input from a peer: at WARN the first time for its kind (counted in metrics either way), at DEBUG
/// after that.
macro_rules! log_once {
    ($first:expr, $($arg:tt)+) => {
        if $first {
            warn!(first_of_its_kind = true, later = "counted in metrics, logged at debug", $($arg)+)
        } else {
            debug!($($arg)+)
        }
    };
}

/// Serves one HBONE connection.
pub async fn serve_connection(pod: Arc<PodCtx>, tcp: TcpStream, peer: SocketAddr) {
    let local = match tcp.local_addr() {
        Ok(l) => socket::canonical(l),
        Err(_) => return,
    };
    // The certificate is issued on first use; a connection that arrives first (queued while ztunnel restarted)
    // must wait for it rather than meet a server without one.
    if let Err(e) = pod.ctx.certs.fetch(&pod.identity).await {
        let _ = pod.ctx.metrics.tls_failure("inbound", "no_certificate");
        warn!(pod = %pod.name(), %peer, error = %e, "no certificate to answer an HBONE connection with");
        return;
    }
    let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls::record::accept(pod.tls_server.clone(), tcp)).await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let reason = hbone::tls_reason(&e);
            let first = pod.ctx.metrics.tls_failure("inbound", reason);
            log_once!(first, pod = %pod.name(), %peer, reason, error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            let first = pod.ctx.metrics.tls_failure("inbound", "timeout");
            log_once!(first, pod = %pod.name(), %peer, "TLS handshake timed out");
            return;
        }
    };
    let Some(client_id) = tls.peer_certificates().and_then(|c| c.first()).and_then(tls::identity_of) else {
        let first = pod.ctx.metrics.tls_failure("inbound", "identity");
        log_once!(first, pod = %pod.name(), %peer, "client certificate without a workload identity");
        return;
    };
    // A client's close_notify ends only its direction (RFC 8446, 6.1): each stream's app gets its FIN, what
    // they still send is delivered, then the connection closes.
    let client_closed_rx = tls.half_close();
    let mut client_closed = client_closed_rx.clone();
    let c = &pod.ctx.cfg;
    let mut conn = match hbone::server::handshake(tls, c).await {
        Ok(c) => c,
        Err(e) => {
            debug!(pod = %pod.name(), %peer, error = %e, "HTTP/2 handshake failed");
            return;
        }
    };
    let mut drain = pod.drain.watch();
    let (mut goaway, mut half_closed) = (false, false);
    let mut linger = tokio::time::interval(std::time::Duration::from_millis(10));
    let ping = hbone::keepalive(conn.ping_pong(), c.h2_ping_interval, c.h2_ping_timeout);
    tokio::pin!(ping);
    loop {
        tokio::select! {
            // A client that closed its direction cannot answer a ping.
            why = &mut ping, if !half_closed => {
                debug!(pod = %pod.name(), %peer, "dropping an HBONE connection: {why}");
                break;
            }
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    let pod = pod.clone();
                    let id = client_id.clone();
                    let client_closed = client_closed_rx.clone();
                    tokio::spawn(async move {
                        let _active = pod.drain.track();
                        let mut closed = pod.drain.watch();
                        tokio::select! {
                            _ = stream(pod.clone(), req, respond, peer, local, id, client_closed) => {}
                            _ = closed.closed() => {}
                        }
                    });
                }
                Some(Err(e)) => {
                    debug!(pod = %pod.name(), %peer, error = %e, "HBONE connection error");
                    break;
                }
                None => break,
            },
            _ = drain.draining(), if !goaway => {
                // Tell the peer to stop opening streams here; existing ones carry on until the deadline.
                conn.graceful_shutdown();
                goaway = true;
            }
            _ = client_closed.wait_for(|c| *c), if !half_closed => {
                // No frame can come any more, so no new stream and no answer to a ping: once the open streams
                // are over (and flushed), so is the connection.
                debug!(pod = %pod.name(), %peer, "the client closed its direction; finishing its streams");
                half_closed = true;
            }
            _ = linger.tick(), if half_closed => {
                if !conn.has_streams() {
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                }
            }
        }
    }
}

fn respond_status(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let resp = Response::builder().status(status).body(()).expect("static response");
    let _ = respond.send_response(resp, true);
}

async fn stream(
    pod: Arc<PodCtx>,
    req: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    local: SocketAddr,
    client_id: Identity,
    client_closed: tokio::sync::watch::Receiver<bool>,
) {
    let target = match hbone::server::validate(req.method(), req.uri(), local) {
        Ok(t) => t,
        Err(rej) => {
            let first = reject(&pod, rej.reason());
            log_once!(first, pod = %pod.name(), %peer, client = %client_id, error = %rej, "HBONE request refused");
            respond_status(&mut respond, rej.status());
            return;
        }
    };
    let snap = pod.ctx.state.snapshot();
    let me = pod.workload(&snap);
    let service = me.as_ref().and_then(|w| snap.inbound_service(w, target.port()));
    let conn = Conn { src: peer, dst: target, src_identity: Some(client_id.clone()) };
    let allowed = super::authorize(&pod, &snap, me.as_deref(), &conn, "hbone");
    let src = Peer { workload: snap.workload_by_ip(peer.ip()), identity: Some(client_id), service: None };
    // An open connection must not keep an old configuration alive.
    drop(snap);
    let me = Peer { workload: me, identity: Some(pod.identity.clone()), service };
    let rec = ConnRecord::open(&pod.ctx.metrics, Direction::Inbound, peer, target, Some(local), src, me, true);
    if let Err(d) = allowed {
        // Counted before the answer goes out, so whoever sees the 401 sees the count.
        rec.close(0, 0, Some(&d), ResponseFlags::Deny);
        respond_status(&mut respond, StatusCode::UNAUTHORIZED);
        return;
    }
    let app =
        match Box::pin(socket::connect_from_pod(&*pod.netns, target, Some(peer.ip()), pod.ctx.cfg.packet_mark)).await {
            Ok(a) => a,
            Err(e) => {
                reject(&pod, "upstream_unavailable");
                rec.close(0, 0, Some(&e), ResponseFlags::ConnectFailure);
                respond_status(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                return;
            }
        };
    let send = match respond
        .send_response(Response::builder().status(StatusCode::OK).body(()).expect("static response"), false)
    {
        Ok(s) => s,
        Err(e) => {
            rec.close(0, 0, Some(&e), ResponseFlags::None);
            return;
        }
    };
    let t = copy::tcp_h2_until(&app, send, req.into_body(), Some(client_closed)).await;
    // For inbound, the TCP side is the app (server): what it sent went to the client.
    rec.close(t.to_tcp, t.from_tcp, t.error.as_ref().map(|e| e as _), ResponseFlags::None);
}
