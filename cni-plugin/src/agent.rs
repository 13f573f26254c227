//! The client side of the plugin ↔ agent API: one bounded exchange on the agent's unix socket.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use ambit_proto::cni_api::{MAX_MESSAGE_BYTES, Request, Response};
use socket2::{Domain, SockAddr, Socket, Type};

/// Why the agent could not be asked.
#[derive(Debug)]
pub enum AgentError {
    /// Nothing listens on the socket (agent not running or not installed on this node).
    Unreachable(std::io::Error),
    /// The agent did not answer in time.
    Timeout(Duration),
    /// The exchange broke or the answer was not understood.
    Protocol(String),
}

impl AgentError {
    /// A message that names the socket and says what to check.
    pub fn describe(&self, socket: &Path) -> String {
        match self {
            AgentError::Unreachable(e) => format!(
                "cannot reach the Ambit node agent at {}: {e} (is the ambit-agent running on this node?)",
                socket.display()
            ),
            AgentError::Timeout(t) => format!(
                "the Ambit node agent at {} did not answer within {} ms (overloaded or stuck? see its logs)",
                socket.display(),
                t.as_millis()
            ),
            AgentError::Protocol(m) => {
                format!("the exchange with the Ambit node agent at {} failed: {m}", socket.display())
            }
        }
    }
}

/// Sends one request and waits at most `timeout` in all for the response.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, AgentError> {
    let deadline = Instant::now() + timeout;
    let remaining = || deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero());

    let addr = SockAddr::unix(socket).map_err(AgentError::Unreachable)?;
    let sock = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None).map_err(AgentError::Unreachable)?;
    // A full accept backlog would block a plain connect forever; bound it.
    match sock.connect_timeout(&addr, remaining().ok_or(AgentError::Timeout(timeout))?) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock => {
            return Err(AgentError::Timeout(timeout));
        }
        Err(e) => return Err(AgentError::Unreachable(e)),
    }
    let mut stream: UnixStream = UnixStream::from(std::os::fd::OwnedFd::from(sock));

    let body = serde_json::to_vec(request).map_err(|e| AgentError::Protocol(e.to_string()))?;
    let io_err = |e: std::io::Error| {
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            AgentError::Timeout(timeout)
        } else {
            AgentError::Protocol(e.to_string())
        }
    };
    stream.set_write_timeout(remaining()).map_err(io_err)?;
    stream.write_all(&body).map_err(io_err)?;
    stream.shutdown(Shutdown::Write).map_err(io_err)?;

    let mut answer = Vec::with_capacity(256);
    let mut buf = [0u8; 4096];
    loop {
        stream.set_read_timeout(Some(remaining().ok_or(AgentError::Timeout(timeout))?)).map_err(io_err)?;
        let n = stream.read(&mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if answer.len() > MAX_MESSAGE_BYTES {
            return Err(AgentError::Protocol(format!("answer larger than {MAX_MESSAGE_BYTES} bytes")));
        }
    }
    if answer.is_empty() {
        return Err(AgentError::Protocol("the agent closed the connection without answering".into()));
    }
    serde_json::from_slice(&answer).map_err(|e| AgentError::Protocol(format!("unreadable answer: {e}")))
}

/// Leaves a DEL the agent could not take in [`ambit_proto::cni_api::deferred_del_dir`] (root only, written
/// whole or not at all) and returns the file.
pub fn defer(socket: &Path, request: &Request) -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = ambit_proto::cni_api::deferred_del_dir(socket);
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
    let file = ambit_proto::cni_api::deferred_del_file(socket, &request.container_id);
    let tmp = file.with_extension(format!("tmp.{}", std::process::id()));
    let body = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    f.write_all(&body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &file).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(file)
}
