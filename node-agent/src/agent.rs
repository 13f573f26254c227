//! The agent's core: enrolling and removing pods, and keeping every connected ztunnel in step.
//!
//! All bookkeeping (the pods and the ztunnel connections) sits behind one lock, held only to update the maps
//! and queue ZDS requests, never while waiting for ztunnel or the kernel. Queuing a pod's `Add` and registering
//! a new ztunnel (after queuing its snapshot) both happen under that lock, so every ztunnel learns about every
//! pod exactly in order.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ambit_proto::cni_api::{self, Command, ErrorCode, Outcome, Request, Response};
use ambit_proto::seqpacket::{SeqPacket, SeqPacketListener};
use ambit_proto::zds::{WorkloadInfo, WorkloadRequest};
use anyhow::Context;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::enrol::{Decision, StandalonePolicy};
use crate::listeners::PodListeners;
use crate::metrics::{BackendLabels, Metrics, RequestLabels};
use crate::netns::{NetnsError, PodNetns};
use crate::pods::{Pod, PodRecord, StateStore};
use crate::rules::host::ProbeSet;
use crate::rules::{Backend, InpodConfig, routing};
use crate::zds::{self, ConnHandle, Job, ZdsError};

/// How long ztunnel has to say hello after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// An error answered to the plugin.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    code: ErrorCode,
    message: String,
}

impl AgentError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        AgentError { code, message: message.into() }
    }
}

impl From<NetnsError> for AgentError {
    fn from(e: NetnsError) -> Self {
        let code = match e {
            NetnsError::Gone(_) | NetnsError::NotANetns(_) => ErrorCode::InvalidNetns,
            _ => ErrorCode::Internal,
        };
        AgentError::new(code, e.to_string())
    }
}

#[derive(Default)]
struct State {
    pods: HashMap<String, Pod>,
    conns: Vec<ConnHandle>,
    next_conn: u64,
}

impl State {
    fn newest(&self) -> Option<&ConnHandle> {
        self.conns.iter().max_by_key(|c| c.id)
    }

    fn by_container(&self, container_id: &str) -> Option<String> {
        self.pods.values().find(|p| p.record.container_id == container_id).map(|p| p.record.uid.clone())
    }
}

/// The standalone policy and the version of the config file it came from.
struct PolicySource {
    path: Option<PathBuf>,
    version: Option<(std::time::SystemTime, u64, u64)>,
    policy: Arc<StandalonePolicy>,
}

impl PolicySource {
    fn file_version(path: &std::path::Path) -> Option<(std::time::SystemTime, u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some((m.modified().ok()?, m.len(), m.ino()))
    }

    /// The policy, re-read first if the file changed since the last read (a stat per decision; a file that
    /// no longer parses leaves the last good policy in force).
    fn current(&mut self) -> Arc<StandalonePolicy> {
        let Some(path) = &self.path else { return self.policy.clone() };
        let v = Self::file_version(path);
        if v != self.version {
            self.version = v;
            match Config::load(path) {
                Ok(c) => {
                    info!(config = %path.display(), "re-read the agent config");
                    self.policy = Arc::new(c.standalone);
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "the changed agent config is invalid; keeping the previous policy")
                }
            }
        }
        self.policy.clone()
    }
}

/// Holds a pod's lock; releases the map entry when the last holder goes.
pub struct PodGuard<'a> {
    agent: &'a Agent,
    uid: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for PodGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut locks = self.agent.locks.lock().unwrap();
        if locks.get(&self.uid).is_some_and(|m| Arc::strong_count(m) == 1) {
            locks.remove(&self.uid);
        }
    }
}

/// The node agent.
pub struct Agent {
    config: Config,
    stopping: std::sync::atomic::AtomicBool,
    kube: std::sync::OnceLock<Arc<crate::k8s::Kube>>,
    locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    metrics: Arc<Metrics>,
    install_state: std::sync::Mutex<Result<(), String>>,
    backend: Backend,
    probes: Option<Arc<ProbeSet>>,
    policy: std::sync::Mutex<PolicySource>,
    store: StateStore,
    host_netns_inode: u64,
    state: Mutex<State>,
}

fn workload_info(r: &PodRecord) -> WorkloadInfo {
    WorkloadInfo { name: r.name.clone(), namespace: r.namespace.clone(), service_account: r.service_account.clone() }
}

/// Where a pod's listeners come from in an enrolment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListenerPlan {
    /// A netns nobody serves yet: the agent binds them.
    Bind,
    /// The netns the agent already holds (or holds the pod without it): what the agent holds, else ztunnel's.
    Held,
}

/// Puts back the entry an enrolment replaced (or removes the failed one when there was none), moving any
/// listeners of the failed attempt back if the entry had none for the same netns.
fn restore(st: &mut State, uid: &str, previous: Option<Pod>) {
    let failed = st.pods.remove(uid);
    if let Some(mut prev) = previous {
        if let Some(f) = failed {
            let same = prev.netns.as_ref().map(PodNetns::inode) == f.netns.as_ref().map(PodNetns::inode);
            if prev.listeners.is_none() && (same || prev.netns.is_none()) {
                prev.listeners = f.listeners;
            }
        }
        st.pods.insert(uid.to_string(), prev);
    }
}

/// The ZDS request for a pod, with owned copies of the fds that travel with it, for a ztunnel that does or does
/// not take listeners. `None` when the agent has no netns for the pod (it can only ask ztunnel to keep it).
///
/// A pod the agent re-adopted after a restart has no listener copies: a ztunnel that takes listeners is asked to
/// send back the ones it serves the pod from, so the agent again holds them across the next ztunnel restart.
fn add_job_parts(pod: &Pod, handoff: bool) -> std::io::Result<Option<(WorkloadRequest, Vec<OwnedFd>)>> {
    let Some(netns) = &pod.netns else { return Ok(None) };
    let mut fds = vec![netns.fd().try_clone_to_owned()?];
    let (uid, info) = (pod.record.uid.clone(), workload_info(&pod.record));
    let req = match (&pod.listeners, handoff) {
        (Some(l), true) => {
            for fd in l.fds() {
                fds.push(fd.try_clone_to_owned()?);
            }
            WorkloadRequest::add(uid, info, l.ports())
        }
        (None, true) => WorkloadRequest::add_returning_listeners(uid, info),
        (_, false) => WorkloadRequest::add(uid, info, Vec::new()),
    };
    Ok(Some((req, fds)))
}

impl Agent {
    /// Creates the agent and reloads the pods a previous run enrolled. Pods whose netns is gone are dropped.
    /// `config_path` is re-read when it changes, so standalone enrolment can be edited without a restart.
    pub fn new(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<Arc<Agent>> {
        let store = StateStore::new(&config.state_dir)?;
        let host_netns_inode = crate::netns::host_inode()?;
        let mut state = State::default();
        let (records, bad) = store.load_all();
        for b in bad {
            warn!(record = %b, "ignoring an unreadable pod record");
        }
        for r in records {
            let opened = PodNetns::open(&r.netns_path).and_then(|ns| {
                // A /proc path may now name another process's netns: only the same inode is the pod's.
                if r.netns_inode != 0 && ns.inode() != r.netns_inode {
                    Err(NetnsError::Gone(r.netns_path.clone()))
                } else {
                    Ok(ns)
                }
            });
            match opened {
                Ok(ns) => {
                    info!(pod = %format!("{}/{}", r.namespace, r.name), uid = %r.uid, "re-adopted pod from a previous run (its listeners stay with ztunnel)");
                    state.pods.insert(r.uid.clone(), Pod { record: r, netns: Some(ns), listeners: None });
                }
                // In Kubernetes mode the API, not a path, says whether the pod still exists: keep it (ztunnel
                // gets Keep and goes on serving it) until the controller finds its netns again through /proc or
                // learns that it is gone.
                Err(e) if config.mode == crate::config::Mode::Kubernetes => {
                    info!(uid = %r.uid, error = %e, "re-adopted pod without its netns; the controller will look for it");
                    state.pods.insert(r.uid.clone(), Pod { record: r, netns: None, listeners: None });
                }
                Err(e) => {
                    info!(uid = %r.uid, error = %e, "dropping the record of a pod whose netns is gone");
                    let _ = store.remove(&r.uid);
                }
            }
        }
        let version = config_path.as_deref().and_then(PolicySource::file_version);
        let policy = std::sync::Mutex::new(PolicySource {
            path: config_path,
            version,
            policy: Arc::new(config.standalone.clone()),
        });
        let backend = config.backend();
        let probes = if config.host_probe_snat {
            let members: Vec<(String, Vec<IpAddr>)> =
                state.pods.values().map(|p| (p.record.uid.clone(), p.record.ips.clone())).collect();
            let set = ProbeSet::install(backend, &members).context("installing the node's probe rules")?;
            Some(Arc::new(set))
        } else {
            None
        };
        info!(%backend, probe_snat = probes.is_some(), "rule backend ready");
        let metrics = Metrics::new();
        metrics.pods_enrolled.set(state.pods.len() as i64);
        let install_state =
            std::sync::Mutex::new(if config.install.enabled { Err("not installed yet".to_string()) } else { Ok(()) });
        Ok(Arc::new(Agent {
            config,
            stopping: std::sync::atomic::AtomicBool::new(false),
            kube: std::sync::OnceLock::new(),
            locks: std::sync::Mutex::new(HashMap::new()),
            metrics,
            install_state,
            backend,
            probes,
            policy,
            store,
            host_netns_inode,
            state: Mutex::new(state),
        }))
    }

    /// Re-applies the rules of every re-adopted pod (after a restart): idempotent, so a pod whose rules are in
    /// place sees no change and no gap, and one whose rules were damaged gets them back. A pod whose netns went
    /// away meanwhile is dropped.
    pub async fn reconcile(&self) {
        let pods: Vec<(String, InpodConfig, PathBuf, Option<std::fs::File>)> = {
            let st = self.state.lock().await;
            st.pods
                .values()
                .map(|p| {
                    let file = p.netns.as_ref().and_then(|n| n.file().ok());
                    (p.record.uid.clone(), p.record.inpod_config(), p.record.netns_path.clone(), file)
                })
                .collect()
        };
        for (uid, cfg, path, file) in pods {
            let backend = self.backend;
            let res = match file {
                Some(f) => crate::netns::run_in(path, f, move || -> Result<(), String> {
                    backend.install_pod(cfg).map_err(|e| e.to_string())?;
                    routing::install(cfg).map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r),
                None => Err("no netns".into()),
            };
            match res {
                Ok(()) => debug!(uid = %uid, "re-applied the pod's rules"),
                Err(e) => {
                    self.rule_error();
                    warn!(uid = %uid, error = %e, "cannot re-apply the rules of a re-adopted pod");
                }
            }
        }
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Records the installer's state (called by the installer thread).
    pub fn set_install_state(&self, s: Result<(), String>) {
        self.metrics.installer_ready.set(i64::from(s.is_ok()));
        *self.install_state.lock().unwrap() = s;
    }

    /// Ready when the plugin is installed and a ztunnel is connected; otherwise why not.
    pub async fn readiness(&self) -> Result<(), String> {
        self.install_state.lock().unwrap().clone().map_err(|e| format!("CNI plugin: {e}"))?;
        if self.kube.get().is_some_and(|k| !k.synced()) {
            return Err("the pod and namespace caches have not synced with the Kubernetes API yet".into());
        }
        if self.state.lock().await.conns.is_empty() {
            return Err(format!("no ztunnel connected to {}", self.config.zds_socket.display()));
        }
        Ok(())
    }

    fn rule_error(&self) {
        self.metrics.rule_errors.get_or_create(&BackendLabels { backend: self.backend.to_string() }).inc();
    }

    async fn probe_remove(&self, r: &PodRecord) {
        if let Some(p) = self.probes.clone() {
            let (uid, ips) = (r.uid.clone(), r.ips.clone());
            let _ = tokio::task::spawn_blocking(move || p.remove(&uid, &ips)).await;
        }
    }

    /// The rule backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn policy(&self) -> Arc<StandalonePolicy> {
        self.policy.lock().unwrap().current()
    }

    fn zds_timeout(&self) -> Duration {
        Duration::from_millis(self.config.zds_timeout_ms)
    }

    /// Handles one plugin request.
    pub async fn handle(&self, req: Request) -> Response {
        if req.version != cni_api::API_VERSION {
            return Response::error(
                ErrorCode::UnsupportedVersion,
                format!("agent speaks API version {}, plugin sent {}", cni_api::API_VERSION, req.version),
            );
        }
        let started = std::time::Instant::now();
        let result = match req.command {
            Command::Add => self.add(&req).await,
            Command::Del => self.del(&req).await.map(|_| Outcome::Ok),
            Command::Check => self.check(&req).await.map(|_| Outcome::Ok),
            Command::Status => self.status().await.map(|_| Outcome::Ok),
            Command::Gc => self.gc(&req).await.map(|_| Outcome::Ok),
        };
        let outcome = match &result {
            Ok(Outcome::Enrolled) => {
                self.metrics.enrolment_duration.observe(started.elapsed().as_secs_f64());
                "enrolled".to_string()
            }
            Ok(Outcome::NotEnrolled) => "not_enrolled".to_string(),
            Ok(Outcome::Ok) => "ok".to_string(),
            Err(e) => format!("{:?}", e.code),
        };
        self.metrics
            .cni_requests
            .get_or_create(&RequestLabels { command: format!("{:?}", req.command).to_uppercase(), outcome })
            .inc();
        match result {
            Ok(o) => Response::ok(o),
            Err(e) => Response::error(e.code, e.message),
        }
    }

    fn pod_uid(req: &Request) -> String {
        if req.pod.uid.is_empty() { format!("container-{}", req.container_id) } else { req.pod.uid.clone() }
    }

    async fn add(&self, req: &Request) -> Result<Outcome, AgentError> {
        let pod_name = format!("{}/{}", req.pod.namespace, req.pod.name);
        let service_account = match self.decide(&req.pod).await? {
            Decision::Skip(why) => {
                debug!(pod = %pod_name, why, "not enrolled");
                return Ok(Outcome::NotEnrolled);
            }
            Decision::Enrol { service_account } => service_account,
        };
        let netns_path = req
            .netns
            .as_deref()
            .map(PathBuf::from)
            .ok_or_else(|| AgentError::new(ErrorCode::BadRequest, "ADD without a netns path"))?;
        let mut ips = Vec::new();
        for cidr in &req.ips {
            let ip = cidr.split('/').next().unwrap_or_default();
            ips.push(ip.parse::<IpAddr>().map_err(|_| {
                AgentError::new(ErrorCode::BadRequest, format!("pod address {cidr:?} is not an IP address"))
            })?);
        }
        let uid = Self::pod_uid(req);
        let _guard = self.lock_pod(&uid).await;
        let netns = PodNetns::open(&netns_path)?;
        let record = PodRecord {
            uid,
            namespace: req.pod.namespace.clone(),
            name: req.pod.name.clone(),
            service_account,
            container_id: req.container_id.clone(),
            netns_path,
            ips,
            netns_inode: netns.inode(),
        };
        let out = self.enrol(record, netns).await?;
        if let Some(k) = self.kube.get() {
            // Record the state on the pod (the controller retries if the API is slow).
            k.enqueue((req.pod.namespace.clone(), req.pod.name.clone()));
        }
        Ok(out)
    }

    /// Enrols a pod whose netns is open: rules, routing and listeners inside it, then ztunnel's ack. The caller
    /// holds the pod's lock. The node's probe set is updated at the same time (it does not depend on the rest),
    /// before the answer; a failed enrolment takes the pod out of it again.
    pub async fn enrol(&self, record: PodRecord, netns: PodNetns) -> Result<Outcome, AgentError> {
        if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            return Err(AgentError::new(ErrorCode::TryAgainLater, "the agent is removing Ambit from this node"));
        }
        if netns.inode() == self.host_netns_inode {
            return Err(AgentError::new(
                ErrorCode::InvalidNetns,
                format!("{} is the node's own netns; refusing to install pod rules there", record.netns_path.display()),
            ));
        }
        let probe = self.probes.clone().map(|p| {
            let (uid, ips) = (record.uid.clone(), record.ips.clone());
            tokio::task::spawn_blocking(move || p.add(&uid, &ips))
        });
        let result = self.enrol_in_netns(record.clone(), netns).await;
        if let Some(h) = probe {
            let _ = h.await;
        }
        if result.is_err() {
            self.probe_remove(&record).await;
        }
        result
    }

    async fn enrol_in_netns(&self, record: PodRecord, netns: PodNetns) -> Result<Outcome, AgentError> {
        let pod_name = format!("{}/{}", record.namespace, record.name);
        let netns_path = record.netns_path.clone();
        // Listeners: the agent binds fresh ones only for a netns nobody serves yet (a pod new to it, or a new
        // sandbox of the pod). For the same netns it keeps what it holds; for a pod it re-adopted without them it
        // asks ztunnel for the live ones. Never a second listener beside a live one.
        let plan = {
            let st = self.state.lock().await;
            match st.pods.get(&record.uid).map(|p| p.netns.as_ref().map(PodNetns::inode)) {
                None => ListenerPlan::Bind,
                Some(None) => ListenerPlan::Held,
                Some(Some(inode)) if inode == netns.inode() => ListenerPlan::Held,
                Some(Some(_)) => ListenerPlan::Bind,
            }
        };
        let cfg = record.inpod_config();
        let backend = self.backend;
        let bind = plan == ListenerPlan::Bind;
        let started = std::time::Instant::now();
        let fresh = netns
            .run(move || -> Result<Option<PodListeners>, String> {
                backend.install_pod(cfg).map_err(|e| e.to_string())?;
                routing::install(cfg).map_err(|e| e.to_string())?;
                if bind {
                    PodListeners::bind_here(cfg.ipv6).map(Some).map_err(|e| format!("creating listeners: {e}"))
                } else {
                    Ok(None)
                }
            })
            .await?
            .map_err(|e| {
                AgentError::new(
                    ErrorCode::Internal,
                    format!("redirection for pod {pod_name} in {}: {e}", netns_path.display()),
                )
            })?;
        let in_netns = started.elapsed();

        let reply = {
            let mut st = self.state.lock().await;
            let Some(conn) = st.newest().cloned() else {
                return Err(AgentError::new(
                    ErrorCode::TryAgainLater,
                    format!(
                        "no ztunnel is connected to {} (is ztunnel running on this node?); pod {pod_name} stays blocked, its traffic is captured",
                        self.config.zds_socket.display()
                    ),
                ));
            };
            // The entry this replaces, kept until ztunnel answers so that a failure can put it back.
            let mut previous = st.pods.remove(&record.uid);
            let listeners = match plan {
                ListenerPlan::Bind => fresh,
                ListenerPlan::Held => previous.as_mut().and_then(|p| p.listeners.take()),
            };
            let mut pod = Pod { record: record.clone(), netns: Some(netns), listeners };
            if !conn.handoff {
                // This ztunnel binds its own listeners: ours must not sit beside them unaccepted.
                pod.listeners = None;
            }
            let parts = add_job_parts(&pod, conn.handoff);
            st.pods.insert(record.uid.clone(), pod);
            let (zreq, fds) = match parts {
                Ok(p) => p.expect("the pod has a netns"),
                Err(e) => {
                    restore(&mut st, &record.uid, previous);
                    return Err(AgentError::new(ErrorCode::Internal, format!("duplicating fds: {e}")));
                }
            };
            let (job, rx) = Job::awaited(zreq, fds);
            conn.enqueue(job);
            self.metrics.pods_enrolled.set(st.pods.len() as i64);
            (rx, previous)
        };
        let (reply, previous) = reply;
        let zds_started = std::time::Instant::now();
        let outcome = tokio::time::timeout(self.zds_timeout() * 2, reply).await;
        let zds = zds_started.elapsed();
        let result = match outcome {
            Ok(Ok(Ok(returned))) => Ok(returned),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(ZdsError::Disconnected("request dropped".into())),
            Err(_) => Err(ZdsError::Timeout(self.zds_timeout() * 2)),
        };
        let result = match result {
            Ok(returned) if !returned.is_empty() => {
                if let Some(p) = self.state.lock().await.pods.get_mut(&record.uid)
                    && p.listeners.is_none()
                {
                    p.listeners = Some(PodListeners::from_returned(returned));
                }
                Ok(())
            }
            r => r.map(|_| ()),
        };
        if let Err(e) = result {
            // Fail closed: the rules stay (traffic black-holed, never leaked) and the runtime tears the sandbox
            // down after the failed ADD. A pod new to the agent is forgotten so a retry starts clean; one it
            // already held (re-adopted, or a retried ADD) goes back to how it was.
            let mut st = self.state.lock().await;
            restore(&mut st, &record.uid, previous);
            self.metrics.pods_enrolled.set(st.pods.len() as i64);
            drop(st);
            return Err(AgentError::new(ErrorCode::Internal, format!("handing pod {pod_name} to ztunnel: {e}")));
        }
        if let Err(e) = self.store.save(&record) {
            warn!(pod = %pod_name, error = %e, "cannot record the pod; a restarted agent will not know it");
        }
        info!(
            pod = %pod_name,
            uid = %record.uid,
            ips = ?record.ips,
            total_us = started.elapsed().as_micros() as u64,
            netns_us = in_netns.as_micros() as u64,
            ztunnel_us = zds.as_micros() as u64,
            "pod enrolled"
        );
        Ok(Outcome::Enrolled)
    }

    /// The enrolment decision for a pod the plugin asks about.
    async fn decide(&self, pod: &cni_api::PodRef) -> Result<Decision, AgentError> {
        let Some(k) = self.kube.get() else { return Ok(self.policy().decide(pod)) };
        let (p, ns) = k.lookup(&pod.namespace, &pod.name, &pod.uid).await.map_err(|e| {
            AgentError::new(ErrorCode::TryAgainLater, format!("{e}; the pod stays blocked until the API answers"))
        })?;
        Ok(match k.verdict(&p, ns.as_deref()) {
            crate::k8s::decide::Verdict::Enrol { service_account } => Decision::Enrol { service_account },
            crate::k8s::decide::Verdict::Skip(why) | crate::k8s::decide::Verdict::Gone(why) => Decision::Skip(why),
        })
    }

    /// Switches to Kubernetes mode.
    pub fn set_kube(&self, k: Arc<crate::k8s::Kube>) {
        let _ = self.kube.set(k);
    }

    /// Serialises all work on one pod (plugin requests and the controller).
    pub async fn lock_pod(&self, uid: &str) -> PodGuard<'_> {
        let m = self.locks.lock().unwrap().entry(uid.to_string()).or_default().clone();
        let guard = m.lock_owned().await;
        PodGuard { agent: self, uid: uid.to_string(), guard: Some(guard) }
    }

    /// Whether the agent holds the pod.
    pub async fn is_enrolled(&self, uid: &str) -> bool {
        self.state.lock().await.pods.contains_key(uid)
    }

    /// Whether the agent holds the pod but not its netns (re-adopted after a restart without it).
    pub async fn lacks_netns(&self, uid: &str) -> bool {
        self.state.lock().await.pods.get(uid).is_some_and(|p| p.netns.is_none())
    }

    /// The UID of an enrolled pod by name.
    pub async fn uid_of(&self, namespace: &str, name: &str) -> Option<String> {
        let st = self.state.lock().await;
        st.pods
            .values()
            .find(|p| p.record.namespace == namespace && p.record.name == name)
            .map(|p| p.record.uid.clone())
    }

    /// The records of the enrolled pods.
    pub async fn records(&self) -> Vec<PodRecord> {
        self.pods().await
    }

    /// Forgets a pod: ZDS Del to every ztunnel, record and probe entry dropped; with `remove_rules`, also the
    /// rules inside its netns (an un-enrolled pod keeps running; a deleted one takes its netns with it).
    pub async fn forget(&self, uid: &str, remove_rules: bool) -> Result<(), AgentError> {
        self.remove_pod(uid, remove_rules).await
    }

    /// Enrols a pod that is already running: finds its netns through /proc (its UID in a process's cgroup, its
    /// IP on an interface there, never the node's own), then as for a new pod. The caller holds the pod's lock.
    pub async fn enrol_running(
        &self,
        mut record: PodRecord,
        proc_root: &std::path::Path,
    ) -> Result<Outcome, AgentError> {
        let candidates = crate::k8s::procfs::candidates(proc_root, &record.uid, self.host_netns_inode);
        for c in candidates {
            let Ok(ns) = PodNetns::open(&c.netns_path) else { continue };
            let ips = ns.run(routing::addresses).await;
            let owns = matches!(&ips, Ok(Ok(addrs)) if record.ips.iter().any(|ip| addrs.contains(ip)));
            if owns {
                record.netns_path = c.netns_path.clone();
                record.netns_inode = ns.inode();
                return self.enrol(record, ns).await;
            }
        }
        Err(AgentError::new(
            ErrorCode::TryAgainLater,
            format!(
                "no process of pod {}/{} (uid {}) with IP {:?} found under {}",
                record.namespace,
                record.name,
                record.uid,
                record.ips,
                proc_root.display()
            ),
        ))
    }

    async fn remove_pod(&self, uid: &str, remove_rules: bool) -> Result<(), AgentError> {
        let (pod, replies) = {
            let mut st = self.state.lock().await;
            let Some(pod) = st.pods.remove(uid) else { return Ok(()) };
            self.metrics.pods_enrolled.set(st.pods.len() as i64);
            let mut replies = Vec::new();
            for c in &st.conns {
                let (job, rx) = Job::awaited(WorkloadRequest::del(uid.to_string()), Vec::new());
                c.enqueue(job);
                replies.push((c.id, rx));
            }
            (pod, replies)
        };
        let name = format!("{}/{}", pod.record.namespace, pod.record.name);
        for (id, rx) in replies {
            match tokio::time::timeout(self.zds_timeout() * 2, rx).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(e))) => warn!(pod = %name, conn = id, error = %e, "ztunnel did not confirm the removal"),
                _ => warn!(pod = %name, conn = id, "ztunnel did not confirm the removal in time"),
            }
        }
        let _ = self.store.remove(uid);
        // The pod's netns may outlive the sandbox (or the pod was only un-enrolled): take the rules out.
        let cfg = pod.record.inpod_config();
        let backend = self.backend;
        self.probe_remove(&pod.record).await;
        if let Some(netns) = pod.netns.as_ref().filter(|_| remove_rules) {
            let res = netns
                .run(move || -> Result<(), String> {
                    backend.remove_pod(cfg).map_err(|e| e.to_string())?;
                    routing::remove(cfg).map_err(|e| e.to_string())
                })
                .await;
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.rule_error();
                    warn!(pod = %name, error = %e, "removing the pod's rules failed")
                }
                Err(e) => debug!(pod = %name, error = %e, "pod netns not enterable; rules went with it"),
            }
        }
        info!(pod = %name, uid, "pod removed");
        Ok(())
    }

    async fn del(&self, req: &Request) -> Result<(), AgentError> {
        let uid = {
            let st = self.state.lock().await;
            let by_uid = Self::pod_uid(req);
            match st.pods.get(&by_uid) {
                // A DEL for an older sandbox of the same pod must not remove the current one.
                Some(p) if !req.container_id.is_empty() && p.record.container_id != req.container_id => {
                    debug!(uid = %by_uid, "DEL for a sandbox that is no longer the pod's current one");
                    return Ok(());
                }
                Some(_) => Some(by_uid),
                None => st.by_container(&req.container_id),
            }
        };
        match uid {
            Some(uid) => {
                let _guard = self.lock_pod(&uid).await;
                self.remove_pod(&uid, true).await
            }
            None => Ok(()),
        }
    }

    async fn check(&self, req: &Request) -> Result<(), AgentError> {
        let uid = Self::pod_uid(req);
        let (cfg, netns_path) = {
            let st = self.state.lock().await;
            match st.pods.get(&uid) {
                Some(p) => (p.record.inpod_config(), p.record.netns_path.clone()),
                None => {
                    return match self.policy().decide(&req.pod) {
                        Decision::Skip(_) => Ok(()),
                        Decision::Enrol { .. } => Err(AgentError::new(
                            ErrorCode::Internal,
                            "the pod should be enrolled but the agent does not hold it",
                        )),
                    };
                }
            }
        };
        let netns = PodNetns::open(&netns_path)?;
        let backend = self.backend;
        let ok = netns
            .run(move || -> Result<bool, String> {
                Ok(backend.pod_present(cfg).map_err(|e| e.to_string())?
                    && routing::present(cfg).map_err(|e| e.to_string())?)
            })
            .await?
            .map_err(|e| AgentError::new(ErrorCode::Internal, e))?;
        if !ok {
            return Err(AgentError::new(
                ErrorCode::Internal,
                format!("the redirection rules are missing in {}", netns_path.display()),
            ));
        }
        if self.state.lock().await.conns.is_empty() {
            return Err(AgentError::new(ErrorCode::TryAgainLater, "no ztunnel is connected"));
        }
        Ok(())
    }

    async fn status(&self) -> Result<(), AgentError> {
        if self.state.lock().await.conns.is_empty() {
            return Err(AgentError::new(
                ErrorCode::TryAgainLater,
                format!("no ztunnel is connected to {}", self.config.zds_socket.display()),
            ));
        }
        Ok(())
    }

    async fn gc(&self, req: &Request) -> Result<(), AgentError> {
        let valid: std::collections::HashSet<&str> =
            req.valid_attachments.iter().map(|a| a.container_id.as_str()).collect();
        let stale: Vec<String> = {
            let st = self.state.lock().await;
            st.pods
                .values()
                .filter(|p| !valid.contains(p.record.container_id.as_str()))
                .map(|p| p.record.uid.clone())
                .collect()
        };
        for uid in stale {
            info!(uid = %uid, "GC: the runtime no longer knows this sandbox");
            let _guard = self.lock_pod(&uid).await;
            self.remove_pod(&uid, true).await?;
        }
        Ok(())
    }

    /// Drops every pod whose netns is gone although no DEL came: its path no longer names the netns the agent
    /// holds (unmounted, removed, or now another netns), as when a runtime crashed or was cleaned up by hand. The
    /// agent's own handle keeps such a netns alive, so without this its record, ztunnel's proxy and the netns
    /// itself would stay until a restart. Returns how many it dropped.
    pub async fn sweep_vanished(&self) -> usize {
        let candidates: Vec<(String, PathBuf, Option<u64>)> = {
            let st = self.state.lock().await;
            st.pods
                .values()
                .map(|p| (p.record.uid.clone(), p.record.netns_path.clone(), p.netns.as_ref().map(PodNetns::inode)))
                .collect()
        };
        let mut dropped = 0;
        for (uid, path, held) in candidates {
            if !netns_vanished(&path, held) {
                continue;
            }
            let _guard = self.lock_pod(&uid).await;
            // Under the pod's lock: an ADD that re-enrolled the pod meanwhile wins.
            let still = {
                let st = self.state.lock().await;
                st.pods
                    .get(&uid)
                    .is_some_and(|p| p.record.netns_path == path && p.netns.as_ref().map(PodNetns::inode) == held)
            };
            if !still || !netns_vanished(&path, held) {
                continue;
            }
            info!(uid = %uid, netns = %path.display(), "the pod's netns is gone without a CNI DEL; dropping the pod");
            match self.remove_pod(&uid, false).await {
                Ok(()) => {
                    dropped += 1;
                    self.metrics.pods_swept.inc();
                }
                Err(e) => warn!(uid = %uid, error = %e.message, "dropping a pod whose netns is gone failed"),
            }
        }
        dropped
    }

    /// Runs [`Agent::sweep_vanished`] every `sweepIntervalMs` until the process exits.
    pub async fn sweep_forever(self: Arc<Self>) {
        let every = Duration::from_millis(self.config.sweep_interval_ms);
        if every.is_zero() {
            return;
        }
        loop {
            tokio::time::sleep(every).await;
            self.sweep_vanished().await;
        }
    }

    /// The enrolled pods' records, for status reporting.
    pub async fn pods(&self) -> Vec<PodRecord> {
        let st = self.state.lock().await;
        let mut v: Vec<_> = st.pods.values().map(|p| p.record.clone()).collect();
        v.sort_by(|a, b| a.uid.cmp(&b.uid));
        v
    }

    /// Number of connected ztunnels.
    pub async fn ztunnels(&self) -> usize {
        self.state.lock().await.conns.len()
    }

    /// Accepts ztunnel connections forever.
    pub async fn serve_zds(self: Arc<Self>, listener: SeqPacketListener) {
        loop {
            match listener.accept().await {
                Ok(sock) => {
                    let agent = self.clone();
                    tokio::spawn(async move { agent.serve_zds_conn(sock).await });
                }
                Err(e) => {
                    warn!(error = %e, "accepting a ztunnel connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Keeps the listeners ztunnel sent back for a pod, if the agent still has none for that same netns.
    async fn adopt_returned(
        self: Arc<Self>,
        uid: String,
        inode: Option<u64>,
        rx: tokio::sync::oneshot::Receiver<zds::Outcome>,
    ) {
        let Ok(Ok(returned)) = rx.await else { return };
        if returned.is_empty() {
            return;
        }
        let mut st = self.state.lock().await;
        match st.pods.get_mut(&uid) {
            Some(p) if p.listeners.is_none() && p.netns.as_ref().map(PodNetns::inode) == inode => {
                p.listeners = Some(PodListeners::from_returned(returned));
                info!(uid = %uid, "took back the pod's listeners from ztunnel");
            }
            _ => {}
        }
    }

    async fn serve_zds_conn(self: Arc<Self>, sock: SeqPacket) {
        let pid = sock.peer_pid().unwrap_or(0);
        let hello = match zds::read_hello(&sock, HELLO_TIMEOUT).await {
            Ok(h) => h,
            Err(e) => {
                warn!(pid, error = %e, "dropping a ztunnel connection that did not say hello");
                return;
            }
        };
        let handoff = hello.listener_handoff();
        let (handle, rx) = {
            let mut st = self.state.lock().await;
            st.next_conn += 1;
            let (handle, rx) = ConnHandle::new(st.next_conn, pid, handoff);
            let mut sent = 0;
            let mut uids: Vec<String> = st.pods.keys().cloned().collect();
            uids.sort();
            for uid in uids {
                let pod = st.pods.get_mut(&uid).expect("listed above");
                if !handoff {
                    pod.listeners = None;
                }
                let inode = pod.netns.as_ref().map(PodNetns::inode);
                match add_job_parts(pod, handoff) {
                    Ok(Some((req, fds))) => {
                        let (job, rx) = Job::awaited(req, fds);
                        handle.enqueue(job);
                        tokio::spawn(self.clone().adopt_returned(uid.clone(), inode, rx));
                    }
                    Ok(None) => handle.enqueue(Job::fire(WorkloadRequest::keep(uid.clone()), Vec::new())),
                    Err(e) => {
                        warn!(uid = %uid, error = %e, "cannot duplicate the pod's fds; asking ztunnel to keep it");
                        handle.enqueue(Job::fire(WorkloadRequest::keep(uid.clone()), Vec::new()));
                    }
                }
                sent += 1;
            }
            handle.enqueue(Job::fire(WorkloadRequest::snapshot_sent(), Vec::new()));
            st.conns.push(handle.clone());
            self.metrics.ztunnels.set(st.conns.len() as i64);
            info!(conn = handle.id, pid, handoff, pods = sent, "ztunnel connected; snapshot queued");
            (handle, rx)
        };
        let reason = zds::serve_queue(sock, rx, self.zds_timeout()).await;
        let mut st = self.state.lock().await;
        st.conns.retain(|c| c.id != handle.id);
        self.metrics.ztunnels.set(st.conns.len() as i64);
        warn!(conn = handle.id, pid, reason = %reason, remaining = st.conns.len(), "ztunnel disconnected");
    }

    /// Serves the plugin's socket forever.
    pub async fn serve_cni(self: Arc<Self>, listener: tokio::net::UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let agent = self.clone();
                    tokio::spawn(async move { crate::cniserver::serve_one(agent, stream).await });
                }
                Err(e) => {
                    warn!(error = %e, "accepting a plugin connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl Agent {
    /// Removes Ambit from the node while the agent runs (its DaemonSet is being deleted): no more enrolments,
    /// every pod forgotten under its lock (rules out, ztunnel told), then the node's rules and the plugin.
    pub async fn uninstall(&self) -> anyhow::Result<()> {
        self.stopping.store(true, std::sync::atomic::Ordering::Release);
        let uids: Vec<String> = self.state.lock().await.pods.keys().cloned().collect();
        for uid in uids {
            let _guard = self.lock_pod(&uid).await;
            if let Err(e) = self.remove_pod(&uid, true).await {
                warn!(uid = %uid, error = %e, "un-enrolling during uninstall failed");
            }
        }
        uninstall(&self.config).await
    }
}

/// Removes Ambit from the node (see `ambit-agent uninstall`): every recorded pod's rules and routes, the
/// records, the node's probe rules, and the plugin's installation. Keeps going past errors and reports them
/// all at the end.
pub async fn uninstall(config: &Config) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    if config.install.enabled {
        let installer = crate::installer::Installer::new(config.install.clone(), &config.cni_socket);
        if let Err(e) = installer.uninstall() {
            errors.push(format!("CNI installation: {e}"));
        }
    }
    let backend = config.backend();
    let store = StateStore::new(&config.state_dir)?;
    let (records, _) = store.load_all();
    for r in records {
        let cfg = r.inpod_config();
        match PodNetns::open(&r.netns_path) {
            Ok(ns) => {
                let res = ns
                    .run(move || -> Result<(), String> {
                        backend.remove_pod(cfg).map_err(|e| e.to_string())?;
                        routing::remove(cfg).map_err(|e| e.to_string())
                    })
                    .await;
                match res {
                    Ok(Ok(())) => info!(pod = %format!("{}/{}", r.namespace, r.name), "un-enrolled"),
                    Ok(Err(e)) => errors.push(format!("pod {}/{}: {e}", r.namespace, r.name)),
                    Err(e) => errors.push(format!("pod {}/{}: {e}", r.namespace, r.name)),
                }
            }
            Err(e) => info!(uid = %r.uid, error = %e, "pod netns gone; nothing to remove"),
        }
        let _ = store.remove(&r.uid);
    }
    if let Err(e) = tokio::task::spawn_blocking(move || backend.remove_host()).await? {
        errors.push(format!("node probe rules: {e}"));
    }
    let _ = std::fs::remove_file(&config.cni_socket);
    if errors.is_empty() {
        info!("Ambit removed from this node");
        Ok(())
    } else {
        anyhow::bail!("uninstall finished with errors:\n  {}", errors.join("\n  "))
    }
}

/// Whether the netns at `path` is no longer the one the agent holds (inode `held`; `None`: the agent holds
/// none, and then only a missing path counts). A netns it cannot inspect for another reason is kept.
fn netns_vanished(path: &Path, held: Option<u64>) -> bool {
    match PodNetns::open(path) {
        Ok(ns) => held.is_some_and(|h| h != ns.inode()),
        Err(NetnsError::Gone(_)) => true,
        Err(_) => false,
    }
}
