//! In-pod mode: the node agent hands ztunnel each enrolled pod over ZDS, and ztunnel serves it from inside the
//! pod's netns.
//!
//! - [`protocol`]: packets and fds to validated requests;
//! - [`statemanager`]: ZDS semantics as a pure state machine;
//! - [`netns`]: the pod netns and sockets created in it;
//! - this module: the connection to the agent and the pods being served.

pub mod netns;
pub mod protocol;
pub mod statemanager;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_proto::seqpacket::SeqPacket;
use ambit_proto::zds::{self, WorkloadInfo, WorkloadResponse, ZdsHello};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::metrics::ZdsLabels;
use crate::proxy::{self, PodCtx, ProxyCtx};
use protocol::PodResources;
use statemanager::{Answer, Driver, Request, StateManager};

/// The pods being served.
pub struct Pods {
    ctx: Arc<ProxyCtx>,
    pods: HashMap<String, Arc<PodCtx>>,
}

impl Driver<PodResources> for Pods {
    type Error = proxy::StartError;
    fn start(&mut self, uid: &str, info: WorkloadInfo, res: PodResources) -> Result<(), proxy::StartError> {
        let pod = proxy::start_pod(&self.ctx, uid, info, std::sync::Arc::new(res.netns), res.listeners)?;
        self.pods.insert(uid.to_string(), pod);
        Ok(())
    }

    fn stop(&mut self, uid: &str) {
        if let Some(pod) = self.pods.remove(uid) {
            let id = pod.identity.clone();
            proxy::stop_pod(pod, self.ctx.cfg.termination_deadline);
            if !self.pods.values().any(|p| p.identity == id) {
                self.ctx.certs.forget(&id);
            }
        }
    }
}

/// One served pod, for `/config_dump`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// Pod UID.
    pub uid: String,
    /// `namespace/name`.
    pub name: String,
    /// Identity.
    pub identity: String,
    /// `Up` while serving, `Draining` while connections finish.
    pub state: &'static str,
    /// Open connections.
    pub connections: usize,
    /// Pooled HBONE connections.
    pub pool_connections: usize,
    /// Listener ports and whether the agent handed them over.
    pub listeners: Vec<(u16, bool)>,
    /// What the agent said of it (Istio's `workloadState` shows it).
    #[serde(skip)]
    pub info: ambit_proto::zds::WorkloadInfo,
}

/// In-pod mode's state: the ZDS state machine and the served pods.
pub struct Inpod {
    state: StateManager,
    pods: Pods,
}

impl Inpod {
    /// Nothing served yet.
    pub fn new(ctx: Arc<ProxyCtx>) -> Arc<Mutex<Inpod>> {
        Arc::new(Mutex::new(Inpod { state: StateManager::default(), pods: Pods { ctx, pods: HashMap::new() } }))
    }

    /// Whether a full snapshot has been received.
    pub fn ready(&self) -> bool {
        self.state.synced()
    }

    /// What is served, for `/config_dump`.
    pub fn status(&self) -> Vec<PodStatus> {
        let mut v: Vec<PodStatus> = self
            .pods
            .pods
            .values()
            .map(|p| PodStatus {
                uid: p.uid.clone(),
                name: p.name(),
                identity: p.identity.to_string(),
                state: if p.drain.watch().is_draining() { "Draining" } else { "Up" },
                connections: p.drain.active(),
                pool_connections: p.pool.len(),
                listeners: p.listeners.clone(),
                info: p.info.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Stops every pod (shutdown) and returns their drains to wait on.
    pub fn stop_all(&mut self) -> Vec<Arc<PodCtx>> {
        let pods: Vec<Arc<PodCtx>> = self.pods.pods.values().cloned().collect();
        let uids: Vec<String> = self.pods.pods.keys().cloned().collect();
        for uid in uids {
            self.pods.stop(&uid);
        }
        pods
    }
}

/// Connects to the agent and serves ZDS forever, reconnecting with backoff (10 ms doubling to 1 s: pods wait
/// for ztunnel while it is disconnected, and a unix connect costs next to nothing).
pub async fn run(path: PathBuf, inpod: Arc<Mutex<Inpod>>, ctx: Arc<ProxyCtx>) {
    let host = match netns::host_netns() {
        Ok(h) => h,
        Err(e) => {
            warn!(error = %e, "cannot open ztunnel's own netns; in-pod mode disabled");
            return;
        }
    };
    let mut backoff = Duration::from_millis(10);
    let mut quiet = false;
    loop {
        match SeqPacket::connect(&path).await {
            Ok(sock) => {
                backoff = Duration::from_millis(10);
                quiet = false;
                ctx.metrics.zds_connected.set(1);
                let reason = serve(&sock, &inpod, &host, &ctx).await;
                ctx.metrics.zds_connected.set(0);
                warn!(socket = %path.display(), reason = %reason, "disconnected from the node agent; pods stay served");
            }
            Err(e) => {
                if !quiet {
                    warn!(socket = %path.display(), error = %e, "cannot connect to the node agent; retrying");
                    quiet = true;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

async fn serve(sock: &SeqPacket, inpod: &Arc<Mutex<Inpod>>, host: &Arc<OwnedFd>, ctx: &Arc<ProxyCtx>) -> String {
    if let Err(e) = sock.send(&zds::encode(&ZdsHello::ambit(ctx.cfg.listener_handoff)), &[]).await {
        return format!("sending hello: {e}");
    }
    inpod.lock().unwrap().state.connection_opened();
    info!("connected to the node agent");
    let mut buf = vec![0u8; zds::MAX_PACKET];
    loop {
        let (n, fds) = match sock.recv(&mut buf).await {
            Ok((0, _)) => return "the agent closed the connection".into(),
            Ok(x) => x,
            Err(e) => return format!("receiving: {e}"),
        };
        let mut give_back: Option<String> = None;
        let (kind, answer) = match protocol::decode(&buf[..n], fds, host) {
            Err(e) => {
                warn!(error = %e, "refusing a ZDS request");
                ("invalid", Answer::Nack(e.to_string()))
            }
            Ok(req) => {
                let kind = match &req {
                    Request::Add { uid, return_listeners, .. } => {
                        give_back = return_listeners.then(|| uid.clone());
                        "add"
                    }
                    Request::Del { .. } => "del",
                    Request::Keep { .. } => "keep",
                    Request::SnapshotSent => "snapshot_sent",
                };
                debug!(kind, "ZDS request");
                let mut g = inpod.lock().unwrap();
                let Inpod { state, pods } = &mut *g;
                (kind, state.handle(req, pods))
            }
        };
        // An agent that restarted asks for the pod's listeners back: they travel with the ack.
        let returned: Vec<(u16, OwnedFd)> = match (&answer, &give_back) {
            (Answer::Ack, Some(uid)) => {
                let g = inpod.lock().unwrap();
                g.pods.pods.get(uid).map(|p| p.listener_copies()).unwrap_or_default()
            }
            _ => Vec::new(),
        };
        let (resp, outcome, fatal) = match &answer {
            Answer::Ack if !returned.is_empty() => (
                WorkloadResponse::ack_with_listeners(returned.iter().map(|(p, _)| u32::from(*p)).collect()),
                "ack",
                None,
            ),
            Answer::Ack => (WorkloadResponse::ack(), "ack", None),
            Answer::Nack(e) => (WorkloadResponse::nack(e.clone()), "nack", None),
            Answer::ProtocolError(e) => (WorkloadResponse::nack(e.clone()), "nack", Some(e.clone())),
        };
        ctx.metrics.zds_messages.get_or_create(&ZdsLabels { kind: kind.into(), outcome: outcome.into() }).inc();
        let fds: Vec<std::os::fd::BorrowedFd<'_>> =
            returned.iter().map(|(_, fd)| std::os::fd::AsFd::as_fd(fd)).collect();
        if let Err(e) = sock.send(&zds::encode(&resp), &fds).await {
            return format!("sending the answer: {e}");
        }
        if let Some(e) = fatal {
            return format!("protocol error: {e}");
        }
    }
}
