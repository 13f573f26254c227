//! HBONE's client side: a connection to a peer ztunnel (mutual TLS with the pod's certificate, expecting one of
//! the destination's identities; then the HTTP/2 client handshake; then the connection task with its PINGs),
//! and the CONNECT request each proxied connection sends on it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tracing::warn;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::pool::{PoolKey, Stage};
use crate::tls::{self, TrustRoots};

/// Opens an HBONE connection over `tcp` (already connected to `key.addr`) as `cert`'s identity, expecting the
/// peer to be one of `key.dst`, and starts its connection task. Returns the request handle and the flag the
/// task sets when the connection ends; an error names the step that failed and why.
pub async fn connect(
    tcp: TcpStream,
    cert: &Arc<CertifiedKey>,
    key: &PoolKey,
    roots: &Arc<TrustRoots>,
    cfg: &Config,
    metrics: &Arc<Metrics>,
) -> Result<(h2::client::SendRequest<Bytes>, Arc<AtomicBool>), (Stage, &'static str, String)> {
    let tls_cfg = Arc::new(tls::client_config(cert.clone(), key.dst.clone(), roots.clone()));
    let name = rustls::pki_types::ServerName::IpAddress(key.addr.ip().into());
    let tls = tokio::time::timeout(super::HANDSHAKE_TIMEOUT, tls::record::connect(tls_cfg, name, tcp))
        .await
        .map_err(|_| (Stage::Tls, "TLS handshake with", "timed out".to_string()))?
        .map_err(|e| {
            let _ = metrics.tls_failure("outbound", super::tls_reason(&e));
            (Stage::Tls, "TLS handshake with", e.to_string())
        })?;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(cfg.h2_stream_window)
        .initial_connection_window_size(cfg.h2_connection_window)
        .max_frame_size(cfg.h2_frame_size)
        .max_header_list_size(16 * 1024)
        .max_send_buffer_size(4 * 1024 * 1024)
        .enable_push(false)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| (Stage::Http2, "HTTP/2 handshake with", e.to_string()))?;
    let closed = Arc::new(AtomicBool::new(false));
    drive(conn, closed.clone(), metrics.clone(), (cfg.h2_ping_interval, cfg.h2_ping_timeout));
    Ok((send, closed))
}

/// The CONNECT request for one proxied connection from `peer` (the app's address) to `dst`, with Istio's
/// headers: `forwarded` (with the service's hostname when it was service-addressed, which a waypoint routes
/// by), a new W3C `traceparent`, and the source pod in `baggage`.
pub fn connect_request(
    dst: SocketAddr,
    peer: SocketAddr,
    host: Option<&str>,
    namespace: &str,
    name: &str,
) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(dst.to_string())
        .header("forwarded", forwarded(peer, host))
        .header("traceparent", traceparent())
        .header("baggage", format!("k8s.namespace.name={namespace},k8s.pod.name={name}"))
        .body(())
        .expect("valid CONNECT request")
}

/// Runs the HTTP/2 connection task (with PING keepalive) and marks the connection closed when it ends.
pub fn drive<T>(
    mut conn: h2::client::Connection<T, Bytes>,
    closed: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    ping: (Duration, Duration),
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    metrics.pool_connections.inc();
    let pinger = conn.ping_pong();
    tokio::spawn(async move {
        tokio::select! {
            r = &mut conn => if let Err(e) = r && !e.is_go_away() {
                warn!(error = %e, "pooled HBONE connection failed");
            },
            why = super::keepalive(pinger, ping.0, ping.1) => warn!("pooled HBONE connection dropped: {why}"),
        }
        closed.store(true, Ordering::Release);
        metrics.pool_connections.dec();
    });
}

/// A W3C `traceparent` starting a new trace. Trace and span ids must be unique, not secret, so they come
/// from a per-thread generator seeded once from the system's CSPRNG: no system call and no allocation but the
/// header's own per connection.
fn traceparent() -> String {
    use std::fmt::Write;
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new({
            let mut seed = [0u8; 8];
            let _ = rustls::crypto::ring::default_provider().secure_random.fill(&mut seed);
            u64::from_le_bytes(seed)
        });
    }
    // splitmix64: every output of a 2^64 cycle, well mixed.
    let next = || {
        STATE.with(|s| {
            let x = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
            s.set(x);
            let z = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
    };
    // All-zero ids are invalid; splitmix64 yields zero once per cycle, so a redraw is all it takes.
    let nonzero = || std::iter::repeat_with(next).find(|v| *v != 0).unwrap_or(1);
    let mut out = String::with_capacity(55);
    let _ = write!(out, "00-{:016x}{:016x}-{:016x}-01", next(), nonzero(), nonzero());
    out
}

fn forwarded(peer: SocketAddr, host: Option<&str>) -> String {
    match host {
        Some(h) => format!("for=\"{peer}\";host={h}"),
        None => format!("for=\"{peer}\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_w3c_shaped_and_new_each_time() {
        let (a, b) = (traceparent(), traceparent());
        assert_ne!(a, b);
        for t in [a, b] {
            let parts: Vec<&str> = t.split('-').collect();
            assert_eq!(parts.len(), 4, "{t}");
            assert_eq!((parts[0], parts[3]), ("00", "01"), "{t}");
            assert_eq!((parts[1].len(), parts[2].len()), (32, 16), "{t}");
            assert!(t.bytes().all(|c| c == b'-' || c.is_ascii_digit() || (b'a'..=b'f').contains(&c)), "{t}");
            assert!(parts[1].bytes().any(|c| c != b'0') && parts[2].bytes().any(|c| c != b'0'), "{t}");
        }
    }
}
