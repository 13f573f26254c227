//! The HBONE connection pool of one pod: many CONNECT streams over one mTLS HTTP/2 connection per (source
//! identity, destination identity, destination address), at most `POOL_MAX_STREAMS_PER_CONNECTION` streams
//! each (then another connection opens), idle connections released after `POOL_UNUSED_RELEASE_TIMEOUT`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use tracing::debug;

use crate::identity::Identity;

/// What a pooled connection is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Our pod's identity (the client certificate).
    pub src: Identity,
    /// The identities the server may prove (the workload's, and its service's SANs), sorted.
    pub dst: Vec<Identity>,
    /// The server's HBONE address.
    pub addr: SocketAddr,
}

/// One pooled HTTP/2 connection.
#[derive(Debug)]
pub struct PooledConn {
    id: u64,
    send: SendRequest<Bytes>,
    active: AtomicU32,
    closed: Arc<AtomicBool>,
    idle_since: Mutex<Instant>,
}

/// Holds one stream's slot on a connection until dropped.
#[derive(Debug)]
pub struct StreamSlot(Arc<PooledConn>);

impl StreamSlot {
    /// Marks the connection broken (a request on it failed before any answer): the pool opens another.
    pub fn mark_broken(&self) {
        self.0.closed.store(true, Ordering::Release);
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap() = Instant::now();
        }
    }
}

/// Why no stream could be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Getting the client's certificate, connecting, the TLS handshake or the HTTP/2 handshake failed.
    #[error("{message}")]
    Connect {
        /// Which step failed.
        stage: Stage,
        /// What happened.
        message: String,
    },
    /// The connection broke while asking for a stream.
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
}

/// The steps of opening an HBONE connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Getting the client's own certificate.
    Certificate,
    /// The TCP connection to the peer's port 15008.
    Tcp,
    /// The TLS handshake, the peer's identity check included.
    Tls,
    /// The HTTP/2 handshake.
    Http2,
}

impl Stage {
    /// The response flag a failure at this step gives the connection.
    pub fn flags(self) -> crate::metrics::ResponseFlags {
        use crate::metrics::ResponseFlags;
        match self {
            Stage::Certificate => ResponseFlags::IdentityError,
            Stage::Tcp => ResponseFlags::ConnectFailure,
            Stage::Tls => ResponseFlags::TlsFailure,
            Stage::Http2 => ResponseFlags::Http2HandshakeFailure,
        }
    }
}

impl PoolError {
    /// The response flag this failure gives the connection that waited for it.
    pub fn flags(&self) -> crate::metrics::ResponseFlags {
        match self {
            PoolError::Connect { stage, .. } => stage.flags(),
            PoolError::H2(_) => crate::metrics::ResponseFlags::ConnectFailure,
        }
    }
}

/// How to open a new connection (TCP from the pod's netns, mTLS, HTTP/2).
pub type Connector = Arc<
    dyn Fn(
            PoolKey,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(SendRequest<Bytes>, Arc<AtomicBool>), PoolError>> + Send>,
        > + Send
        + Sync,
>;

/// A pod's pool.
pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<Arc<PooledConn>>>>,
    connecting: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    connector: Connector,
    max_streams: u32,
    idle_timeout: Duration,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("connections", &self.len()).finish_non_exhaustive()
    }
}

impl Pool {
    /// An empty pool.
    pub fn new(connector: Connector, max_streams: u32, idle_timeout: Duration) -> Pool {
        Pool {
            conns: Mutex::default(),
            connecting: Mutex::default(),
            connector,
            max_streams,
            idle_timeout,
            next_id: AtomicU64::new(1),
        }
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.conns.lock().unwrap().values().map(Vec::len).sum()
    }

    fn take_slot(&self, key: &PoolKey) -> Option<(SendRequest<Bytes>, StreamSlot)> {
        let mut conns = self.conns.lock().unwrap();
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.closed.load(Ordering::Acquire));
        for c in list.iter() {
            let got =
                c.active.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max_streams).then_some(n + 1));
            if got.is_ok() {
                return Some((c.send.clone(), StreamSlot(c.clone())));
            }
        }
        None
    }

    /// A stream slot on a connection for `key`, connecting if every connection is full or there is none.
    pub async fn stream(&self, key: &PoolKey) -> Result<(SendRequest<Bytes>, StreamSlot), PoolError> {
        if let Some(s) = self.take_slot(key) {
            return self.ready(s).await;
        }
        // One connect per key at a time: concurrent first requests share the new connection.
        let lock = self.connecting.lock().unwrap().entry(key.clone()).or_default().clone();
        let _guard = lock.lock().await;
        if let Some(s) = self.take_slot(key) {
            return self.ready(s).await;
        }
        let (send, closed) = (self.connector)(key.clone()).await?;
        let conn = Arc::new(PooledConn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            send,
            active: AtomicU32::new(1),
            closed,
            idle_since: Mutex::new(Instant::now()),
        });
        debug!(conn = conn.id, to = %key.addr, dst = ?key.dst, "new pooled HBONE connection");
        self.conns.lock().unwrap().entry(key.clone()).or_default().push(conn.clone());
        let s = (conn.send.clone(), StreamSlot(conn));
        self.ready(s).await
    }

    async fn ready(
        &self,
        (send, slot): (SendRequest<Bytes>, StreamSlot),
    ) -> Result<(SendRequest<Bytes>, StreamSlot), PoolError> {
        match send.ready().await {
            Ok(send) => Ok((send, slot)),
            Err(e) => {
                slot.0.closed.store(true, Ordering::Release);
                Err(PoolError::H2(e))
            }
        }
    }

    /// How often [`Pool::sweep`] should run: often enough that a connection idle past the timeout closes within
    /// half a timeout more, at most every 30 s.
    pub fn sweep_every(&self) -> Duration {
        (self.idle_timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }

    /// Drops closed connections and those idle past the timeout. Returns how many remain.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut conns = self.conns.lock().unwrap();
        for list in conns.values_mut() {
            list.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && now.duration_since(*c.idle_since.lock().unwrap()) >= self.idle_timeout;
                !(c.closed.load(Ordering::Acquire) || idle)
            });
        }
        conns.retain(|_, l| !l.is_empty());
        conns.values().map(Vec::len).sum()
    }

    /// Closes every connection (dropping the last handle sends GOAWAY).
    pub fn clear(&self) {
        self.conns.lock().unwrap().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    /// A peer that answers PINGs (a real h2 server) keeps the connection; one that went silent loses it.
    #[tokio::test]
    async fn keepalive_drops_a_silent_peer_only() {
        let ping = (Duration::from_millis(30), Duration::from_millis(100));
        // Answering peer.
        let (a, b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut srv = h2::server::handshake(b).await.unwrap();
            while srv.accept().await.is_some() {}
        });
        let (_send, conn) = h2::client::handshake(a).await.unwrap();
        let alive = Arc::new(AtomicBool::new(false));
        crate::hbone::client::drive(conn, alive.clone(), Metrics::new(), ping);
        // Silent peer: reads everything, answers nothing.
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut b, &mut sink).await;
        });
        let (_send2, conn) = h2::client::handshake(a).await.unwrap();
        let dead = Arc::new(AtomicBool::new(false));
        crate::hbone::client::drive(conn, dead.clone(), Metrics::new(), ping);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(dead.load(Ordering::Acquire), "a silent peer's connection is dropped");
        assert!(!alive.load(Ordering::Acquire), "an answering peer's connection stays");
    }
}
