//! The agent's end of the plugin API: one JSON request and one JSON response per connection. Each request
//! goes over a channel ([`Call`]) to whoever answers it (the agent), so this module knows nothing of the agent.

use std::time::Duration;

use ambit_proto::cni_api::{ErrorCode, MAX_MESSAGE_BYTES, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

/// A plugin request and where its answer goes. The server passes requests to whoever answers them (the agent)
/// over a channel, so this module knows nothing of the agent.
pub type Call = (Request, oneshot::Sender<Response>);

/// How long a plugin may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the plugin socket (replacing a stale one) with permissions for root only.
pub fn bind(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

async fn read_request(stream: &mut UnixStream) -> Result<Request, Response> {
    let mut body = Vec::with_capacity(1024);
    let read = async {
        let mut limited = (&mut *stream).take(MAX_MESSAGE_BYTES as u64 + 1);
        limited.read_to_end(&mut body).await
    };
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Err(_) => return Err(Response::error(ErrorCode::BadRequest, "request not received within 5 s")),
        Ok(Err(e)) => return Err(Response::error(ErrorCode::BadRequest, format!("reading the request: {e}"))),
        Ok(Ok(_)) => {}
    }
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(Response::error(ErrorCode::BadRequest, format!("request larger than {MAX_MESSAGE_BYTES} bytes")));
    }
    serde_json::from_slice(&body).map_err(|e| Response::error(ErrorCode::BadRequest, format!("malformed request: {e}")))
}

/// Serves the plugin's socket until the process exits, one task per connection.
pub async fn serve(listener: UnixListener, calls: mpsc::Sender<Call>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_one(stream, calls.clone()));
            }
            Err(e) => {
                warn!(error = %e, "accepting a plugin connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves one plugin connection.
async fn serve_one(mut stream: UnixStream, calls: mpsc::Sender<Call>) {
    let response = match read_request(&mut stream).await {
        Ok(req) => {
            debug!(command = ?req.command, pod = %format!("{}/{}", req.pod.namespace, req.pod.name), "plugin request");
            let (tx, rx) = oneshot::channel();
            let answered = match calls.send((req, tx)).await {
                Ok(()) => rx.await.ok(),
                Err(_) => None,
            };
            answered.unwrap_or_else(|| Response::error(ErrorCode::TryAgainLater, "the agent is shutting down"))
        }
        Err(resp) => resp,
    };
    let body = serde_json::to_vec(&response).expect("responses always serialize");
    if let Err(e) = stream.write_all(&body).await {
        // The plugin gave up (its timeout) or was killed; the work is done either way and a retry is idempotent.
        warn!(error = %e, "the plugin went away before the answer");
    }
    let _ = stream.shutdown().await;
}
