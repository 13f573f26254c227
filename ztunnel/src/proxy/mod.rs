//! The per-pod proxy: three listeners in the pod's netns and what happens to each connection.
//!
//! - 15001 [`outbound`]: the pod's own outbound TCP, captured; carried over HBONE to a mesh destination, or
//!   passed through as plain TCP to anything else.
//! - 15008 [`inbound`]: HBONE from other ztunnels; mTLS, then one CONNECT stream per connection to the app.
//! - 15006 [`plaintext`]: plain TCP from outside the mesh to the app.

pub mod bench;
pub mod copy;
pub mod drain;
pub mod inbound;
pub mod outbound;
pub mod plaintext;
pub mod pool;
pub mod route;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_proto::zds::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, WorkloadInfo};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::authz::{Conn, Denial, Target};
use crate::certs::CertStore;
use crate::config::Config;
use crate::hbone;
use crate::identity::Identity;
use crate::metrics::{DenialLabels, Metrics, PortLabels};
use crate::socket;
use crate::state::{Snapshot, State, Workload};
use crate::tls::{self, TrustRoots};
use drain::Drain;
use pool::{Pool, PoolError, PoolKey, Stage};

/// What every pod proxy shares.
pub struct ProxyCtx {
    /// Settings.
    pub cfg: Config,
    /// Workloads.
    pub state: Arc<State>,
    /// Certificates.
    pub certs: Arc<CertStore>,
    /// Trust roots.
    pub roots: Arc<TrustRoots>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The worker threads pods are served on.
    pub workers: crate::workers::Workers,
}

impl ProxyCtx {
    /// Applies keepalive and turns Nagle off, on a pod's listener: the connections it accepts inherit both
    /// (Linux copies them at accept), which saves five system calls on every new connection.
    pub fn tune(&self, tcp: &impl std::os::fd::AsFd) {
        if let Err(e) = socket::tune(tcp, self.cfg.tcp_keepalive) {
            debug!(error = %e, "cannot set TCP options");
        }
    }

    /// Adds keepalive to a connection made from a pod's netns (which has Nagle off already) whose peer is
    /// across the network.
    pub fn keepalive(&self, tcp: &impl std::os::fd::AsFd) {
        if let Some(ka) = self.cfg.tcp_keepalive
            && let Err(e) = socket::keepalive(tcp, ka)
        {
            debug!(error = %e, "cannot set TCP keepalive");
        }
    }
}

/// One served pod.
pub struct PodCtx {
    /// Pod UID.
    pub uid: String,
    /// Name, namespace, service account (from ZDS).
    pub info: WorkloadInfo,
    /// Its identity.
    pub identity: Identity,
    /// Its netns.
    pub netns: Arc<dyn socket::PodSockets>,
    /// Its HBONE client pool.
    pub pool: Pool,
    /// Its drain.
    pub drain: Drain,
    /// Its HBONE server TLS config.
    pub tls_server: Arc<rustls::ServerConfig>,
    /// Ports it listens on, and whether the agent handed them over.
    pub listeners: Vec<(u16, bool)>,
    /// Copies of its listening sockets, to hand back to an agent that restarted (closed when the pod stops, so
    /// a stopped pod's own listeners refuse connections instead of queueing them).
    pub listener_fds: std::sync::Mutex<Vec<(u16, std::os::fd::OwnedFd)>>,
    /// The shared context.
    pub ctx: Arc<ProxyCtx>,
    /// The worker serving it.
    pub worker: tokio::runtime::Handle,
    /// Its default gateways: its node, from where `ambit-agent debug`'s probes come and to where they go. Read
    /// in the pod's netns at the first connection on the probe port, not when the pod is served.
    pub gateways: std::sync::OnceLock<Vec<std::net::IpAddr>>,
}

impl PodCtx {
    /// Whether a connection is `ambit-agent debug` checking capture: to [`DEBUG_PROBE_PORT`] on the pod's own
    /// node (outbound: `remote` is the destination; inbound: the source). Such a connection is answered by
    /// being accepted; nothing is dialed for it, and nothing else on that port is affected.
    ///
    /// [`DEBUG_PROBE_PORT`]: ambit_proto::zds::DEBUG_PROBE_PORT
    pub fn is_capture_probe(&self, remote: std::net::IpAddr, port: u16) -> bool {
        port == ambit_proto::zds::DEBUG_PROBE_PORT
            && self.gateways.get_or_init(|| self.netns.gateways()).contains(&remote)
    }

    /// The pod's workload entry in `snap`, if the workload file has it.
    pub fn workload(&self, snap: &Snapshot) -> Option<Arc<Workload>> {
        snap.local_workload(&self.ctx.cfg.node_name, &self.info.namespace, &self.info.name)
    }

    /// `namespace/name`, for logs.
    pub fn name(&self) -> String {
        format!("{}/{}", self.info.namespace, self.info.name)
    }

    /// Fresh copies of the pod's listening sockets (for an agent that asks for them back).
    pub fn listener_copies(&self) -> Vec<(u16, std::os::fd::OwnedFd)> {
        self.listener_fds.lock().unwrap().iter().filter_map(|(port, fd)| Some((*port, fd.try_clone().ok()?))).collect()
    }

    /// Where a redirected connection was going; `None` (logged) when the kernel has no record of it.
    pub fn original_dst(&self, tcp: &TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
        socket::original_dst(tcp, peer)
            .inspect_err(|e| debug!(pod = %self.name(), %peer, error = %e, "no original destination; dropping"))
            .ok()
    }
}

/// Checks an inbound connection to `pod` against the authorization policies in force: counts and logs a
/// denial with the deciding policy's name, logs what dry-run policies would have done.
pub fn authorize(
    pod: &PodCtx,
    snap: &Snapshot,
    me: Option<&Workload>,
    conn: &Conn,
    transport: &str,
) -> Result<(), Denial> {
    let target = Target {
        namespace: me.map_or(pod.info.namespace.as_str(), |w| w.namespace.as_str()),
        selected_by: me.map(|w| w.authorization_policies.as_slice()).unwrap_or_default(),
    };
    let v = snap.policies.check(target, conn);
    let client = OrDash(conn.src_identity.as_ref());
    for d in &v.dry_run_matches {
        info!(pod = %pod.name(), src = %conn.src, %client, dst = %conn.dst, policy = %d.policy, action = ?d.action,
              "dry-run policy matched (not enforced)");
    }
    if v.dry_run_would_deny {
        info!(pod = %pod.name(), src = %conn.src, %client, dst = %conn.dst,
              "dry-run ALLOW policies would deny this connection (not enforced)");
    }
    if let Err(d) = &v.result {
        let labels = DenialLabels { transport: transport.into(), policy: d.policy().into() };
        pod.ctx.metrics.policy_denials.get_or_create(&labels).inc();
        info!(pod = %pod.name(), src = %conn.src, %client, dst = %conn.dst, transport, policy = d.policy(),
              "connection refused: {d}");
    }
    v.result
}

/// A value in a log line, `-` when there is none. Formatted only when a line is written: most connections log
/// nothing at authorization.
struct OrDash<'a, T>(Option<&'a T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

fn identity_for(cfg: &Config, info: &WorkloadInfo) -> Identity {
    let sa = if info.service_account.is_empty() { "default" } else { &info.service_account };
    Identity::new(&cfg.trust_domain, &info.namespace, sa)
}

fn connector(ctx: Arc<ProxyCtx>, netns: Arc<dyn socket::PodSockets>) -> pool::Connector {
    Arc::new(move |key: PoolKey| {
        let ctx = ctx.clone();
        let netns = netns.clone();
        Box::pin(async move {
            let err = |stage: Stage, what: &str, e: &dyn std::fmt::Display| PoolError::Connect {
                stage,
                message: format!("{what} {} ({:?}): {e}", key.addr, key.dst),
            };
            let cert = ctx.certs.fetch(&key.src).await.map_err(|e| err(Stage::Certificate, "certificate for", &e))?;
            let tcp = socket::connect_from_pod(&*netns, key.addr, None, ctx.cfg.packet_mark)
                .await
                .map_err(|e| err(Stage::Tcp, "connecting to", &e))?;
            ctx.keepalive(&tcp);
            let (send, closed) = hbone::client::connect(tcp, &cert.certified, &key, &ctx.roots, &ctx.cfg, &ctx.metrics)
                .await
                .map_err(|(stage, what, e)| err(stage, what, &e))?;
            Ok((send, closed))
        })
    })
}

fn take_or_bind(
    ctx: &ProxyCtx,
    netns: &dyn socket::PodSockets,
    handed: &mut Vec<(u16, std::net::TcpListener)>,
    port: u16,
) -> std::io::Result<(TcpListener, bool)> {
    if let Some(i) = handed.iter().position(|(p, _)| *p == port) {
        let (_, l) = handed.swap_remove(i);
        return Ok((TcpListener::from_std(l)?, true));
    }
    let c = &ctx.cfg;
    let l = match socket::bind_in_pod(netns, port, c.ipv6_enabled, c.inpod_port_reuse, c.packet_mark) {
        Ok(l) => l,
        // Pods without IPv6 cannot bind [::].
        Err(_) if c.ipv6_enabled => socket::bind_in_pod(netns, port, false, c.inpod_port_reuse, c.packet_mark)?,
        Err(e) => return Err(e),
    };
    Ok((TcpListener::from_std(l)?, false))
}

/// Why a pod could not be served.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// One of its listeners could not be taken over or bound.
    #[error("listener {port}: {source}")]
    Listener {
        /// The port.
        port: u16,
        /// The cause.
        source: std::io::Error,
    },
}

/// Starts serving a pod whose sockets `netns` makes: takes the `listeners` handed over (or binds its own) and
/// spawns their accept loops.
pub fn start_pod(
    ctx: &Arc<ProxyCtx>,
    uid: &str,
    info: WorkloadInfo,
    netns: Arc<dyn socket::PodSockets>,
    mut listeners: Vec<(u16, std::net::TcpListener)>,
) -> Result<Arc<PodCtx>, StartError> {
    // Everything of the pod lives on one worker: its sockets register with that worker's reactor, its tasks
    // are spawned there.
    let worker = ctx.workers.pick();
    let _on_worker = worker.enter();
    let identity = identity_for(&ctx.cfg, &info);
    let mut bound = Vec::new();
    let mut listener_fds = Vec::new();
    for port in [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT] {
        let failed = |source| StartError::Listener { port, source };
        let (l, handed) = take_or_bind(ctx, &*netns, &mut listeners, port).map_err(failed)?;
        let copy = std::os::fd::AsFd::as_fd(&l).try_clone_to_owned().map_err(failed)?;
        listener_fds.push((port, copy));
        bound.push((port, l, handed));
    }
    let pod = Arc::new(PodCtx {
        uid: uid.to_string(),
        identity: identity.clone(),
        tls_server: Arc::new(tls::server_config(CertStore::resolver(&ctx.certs, identity.clone()), ctx.roots.clone())),
        pool: Pool::new(connector(ctx.clone(), netns.clone()), ctx.cfg.pool_max_streams, ctx.cfg.pool_idle_timeout),
        netns,
        drain: Drain::new(),
        listeners: bound.iter().map(|(p, _, h)| (*p, *h)).collect(),
        listener_fds: std::sync::Mutex::new(listener_fds),
        info,
        ctx: ctx.clone(),
        worker: worker.clone(),
        gateways: std::sync::OnceLock::new(),
    });
    for (port, l, _) in bound {
        ctx.tune(&l);
        tokio::spawn(accept_loop(pod.clone(), l, port));
    }
    // Warm the certificate so the first connection does not wait for it.
    let (certs, id) = (ctx.certs.clone(), identity);
    tokio::spawn(async move {
        if let Err(e) = certs.fetch(&id).await {
            warn!(identity = %id, error = %e, "cannot get the pod's certificate yet");
        }
    });
    let sweeper = Arc::downgrade(&pod);
    let every = pod.pool.sweep_every();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            match sweeper.upgrade() {
                Some(p) if !p.drain.watch().is_draining() => {
                    p.pool.sweep();
                }
                _ => return,
            }
        }
    });
    ctx.metrics.proxies_started.inc();
    ctx.metrics.active_proxies.inc();
    info!(pod = %pod.name(), uid, identity = %pod.identity, handed_over = ?pod.listeners, "serving pod");
    Ok(pod)
}

/// Stops serving a pod: listeners close now, open connections get until the deadline.
pub fn stop_pod(pod: Arc<PodCtx>, deadline: Duration) {
    pod.listener_fds.lock().unwrap().clear();
    pod.ctx.metrics.active_proxies.dec();
    pod.ctx.metrics.proxies_stopped.inc();
    let worker = pod.worker.clone();
    worker.spawn(async move {
        let cut = pod.drain.drain(deadline).await;
        pod.pool.clear();
        if cut > 0 {
            warn!(pod = %pod.name(), cut, "drain deadline expired with connections still open");
        }
        info!(pod = %pod.name(), uid = %pod.uid, "stopped serving pod");
    });
}

async fn accept_loop(pod: Arc<PodCtx>, listener: TcpListener, port: u16) {
    let mut drain = pod.drain.watch();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) if socket::out_of_fds(&e) => {
                    // Answer the waiting connection (reset) rather than leave it to time out; then give the
                    // connections that hold the descriptors a moment to finish.
                    if socket::shed_one(&listener).await {
                        pod.ctx.metrics.connections_shed.get_or_create(&PortLabels { port }).inc();
                    }
                    debug!(pod = %pod.name(), port, error = %e, "out of file descriptors: a connection was shed");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                Err(e) => {
                    // Back off instead of spinning.
                    warn!(pod = %pod.name(), port, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = drain.draining() => break,
        };
        crate::busy_poll::activity();
        let pod = pod.clone();
        tokio::spawn(async move {
            let active = pod.drain.track();
            let _socket = SocketOpen::new(&pod.ctx.metrics, port);
            let mut closed = pod.drain.watch();
            let work = handle(pod.clone(), stream, peer, port);
            tokio::select! {
                _ = work => {}
                _ = closed.closed() => debug!(pod = %pod.name(), %peer, "connection closed by drain deadline"),
            }
            drop(active);
        });
    }
    debug!(pod = %pod.name(), port, "listener closed");
}

/// `istio_tcp_sockets_open`, for as long as an accepted socket is open: reported by the source for the pod's
/// own outbound connections, by the destination for those to it.
struct SocketOpen(prometheus_client::metrics::gauge::Gauge);

impl SocketOpen {
    fn new(metrics: &Metrics, port: u16) -> SocketOpen {
        let g = metrics.sockets_open(port == OUTBOUND_PORT).clone();
        g.inc();
        SocketOpen(g)
    }
}

impl Drop for SocketOpen {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Each kind of connection is boxed on its own, so a connection costs its own state, not the largest kind's
/// (an HBONE server connection holds TLS and HTTP/2 state that a plain outbound connection does not).
async fn handle(pod: Arc<PodCtx>, stream: TcpStream, peer: SocketAddr, port: u16) {
    let peer = socket::canonical(peer);
    match port {
        OUTBOUND_PORT => Box::pin(outbound::handle(pod, stream, peer)).await,
        INBOUND_PLAINTEXT_PORT => Box::pin(plaintext::handle(pod, stream, peer)).await,
        INBOUND_HBONE_PORT => Box::pin(inbound::serve_connection(pod, stream, peer)).await,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_value_is_its_display_or_a_dash() {
        let id = Identity::new("cluster.local", "ns", "sa");
        assert_eq!(OrDash(Some(&id)).to_string(), "spiffe://cluster.local/ns/ns/sa/sa");
        assert_eq!(OrDash::<Identity>(None).to_string(), "-");
    }
}
