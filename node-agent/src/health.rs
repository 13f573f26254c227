//! The agent's health endpoint: `/readyz` (installed, and a ztunnel connected) and `/metrics`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::warn;

use crate::agent::Agent;

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("static response")
}

async fn route(agent: Arc<Agent>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/readyz" => match agent.readiness() {
            Ok(()) => reply(StatusCode::OK, "ready\n".into()),
            Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
        "/metrics" => reply(StatusCode::OK, agent.metrics().encode()),
        _ => reply(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Serves the health endpoint on `addr` until the process exits.
pub async fn serve(addr: SocketAddr, agent: Arc<Agent>) -> std::io::Result<()> {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        // A node without IPv6 cannot bind [::]; fall back to IPv4.
        Err(_) if addr.is_ipv6() && addr.ip().is_unspecified() => {
            TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], addr.port()))).await?
        }
        Err(e) => return Err(e),
    };
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await.inspect_err(|e| warn!(error = %e, "health accept failed"))
            else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let agent = agent.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let agent = agent.clone();
                    async move { Ok::<_, Infallible>(route(agent, req).await) }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(())
}
