//! The agent's shell around the enrolment machine (`crate::enrolment`): it opens netns, runs rules and
//! listeners inside them, talks ZDS, writes records and answers the plugin and the controller, feeding each
//! result back to the machine as an event.
//!
//! The machine and the descriptors it names (netns handles, listeners, ztunnel queues) sit behind one lock,
//! held for one step: the event, then the commands that need no waiting (queuing ZDS messages, duplicating
//! fds). Waiting work (a netns thread, ztunnel's answer, a record on disk) runs after the lock is released, and
//! its result is the next event. Queuing a pod's Add and registering a new ztunnel after its snapshot are steps
//! of the same lock, so every ztunnel learns about every pod exactly in order. Work on one pod is serialised by
//! a per-pod lock ([`Agent::lock_pod`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_proto::cni_api::{self, Command as CniCommand, Outcome, Request, Response};
use ambit_proto::seqpacket::{SeqPacket, SeqPacketListener};
use ambit_proto::zds::{WorkloadInfo, WorkloadRequest};
use anyhow::Context;
use tokio::sync::{Mutex, mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::enrol::{Decision, StandalonePolicy};
use crate::enrolment::{Attach, Command, Conn, ConnId, Event, Inode, Msg, Node, Purpose};
use crate::error::EnrolError;
use crate::installer::InstallError;
use crate::listeners::PodListeners;
use crate::metrics::{BackendLabels, Metrics, RequestLabels};
use crate::netns::{NetnsError, PodNetns};
use crate::pods::{PodRecord, StateStore};
use crate::rules::host::ProbeSet;
use crate::rules::{self, Backend, InpodConfig, RuleError};
use crate::zds::{self, ConnHandle, Job, ZdsError};

/// Why the agent is not ready (its `/readyz` says so).
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// The plugin is not installed and chained.
    #[error("CNI plugin: {0}")]
    Plugin(Arc<InstallError>),
    /// Kubernetes mode: the caches have not listed everything once.
    #[error("the pod and namespace caches have not synced with the Kubernetes API yet")]
    NotSynced,
    /// No ztunnel is connected.
    #[error("no ztunnel connected to {}", .0.display())]
    NoZtunnel(PathBuf),
}

/// How long ztunnel has to say hello after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// A pod's descriptor, by UID and netns inode.
type Key = (String, Inode);

/// The machine and the descriptors it names.
struct Core {
    node: Node,
    netns: HashMap<Key, PodNetns>,
    listeners: HashMap<Key, PodListeners>,
    conns: HashMap<ConnId, ConnHandle>,
    next_conn: ConnId,
}

/// A descriptor handed to the machine with an event (kept only if the machine names it afterwards).
enum Offer {
    Netns(String, PodNetns),
    Listeners(String, Inode, PodListeners),
}

/// A command that waits, carried out after the lock is released.
enum Deferred {
    /// Add the pod's IPs to the probe set (`add`) or take them out.
    Probe {
        add: bool,
        uid: String,
        ips: Vec<IpAddr>,
    },
    ApplyRules {
        uid: String,
        pod: String,
        path: PathBuf,
        file: std::io::Result<std::fs::File>,
        inode: Inode,
        cfg: InpodConfig,
        bind: bool,
    },
    RemoveRules {
        uid: String,
        path: PathBuf,
        file: std::io::Result<std::fs::File>,
        cfg: InpodConfig,
    },
    Await {
        uid: String,
        pod: String,
        inode: Inode,
        rx: oneshot::Receiver<zds::Outcome>,
    },
    AwaitAll {
        uid: String,
        replies: Vec<(ConnId, oneshot::Receiver<zds::Outcome>)>,
    },
    Save(PodRecord),
    Drop(String),
    Reply(Result<Outcome, EnrolError>),
}

fn workload_info(r: &PodRecord) -> WorkloadInfo {
    WorkloadInfo { name: r.name.clone(), namespace: r.namespace.clone(), service_account: r.service_account.clone() }
}

impl Core {
    /// A pod's ZDS Add, with owned copies of the fds that travel with it (the netns, then any listeners).
    fn request(&self, uid: &str, netns: Inode, attach: Attach) -> std::io::Result<(WorkloadRequest, Vec<OwnedFd>)> {
        let not_held = |what: &str| std::io::Error::other(format!("the pod's {what} not held"));
        let pod = self.node.pod(uid).ok_or_else(|| not_held("record is"))?;
        let info = workload_info(&pod.record);
        let ns = self.netns.get(&(uid.to_string(), netns)).ok_or_else(|| not_held("netns is"))?;
        let mut fds = vec![ns.fd().try_clone_to_owned()?];
        let req = match attach {
            Attach::Pass { netns: at } => {
                let l = self.listeners.get(&(uid.to_string(), at)).ok_or_else(|| not_held("listeners are"))?;
                for fd in l.fds() {
                    fds.push(fd.try_clone_to_owned()?);
                }
                WorkloadRequest::add(uid.to_string(), info, l.ports())
            }
            Attach::AskBack => WorkloadRequest::add_returning_listeners(uid.to_string(), info),
            Attach::Own => WorkloadRequest::add(uid.to_string(), info, Vec::new()),
        };
        Ok((req, fds))
    }

    fn file_of(&self, uid: &str, netns: Inode) -> (PathBuf, std::io::Result<std::fs::File>) {
        match self.netns.get(&(uid.to_string(), netns)) {
            Some(ns) => (ns.path().to_path_buf(), ns.file()),
            None => (PathBuf::new(), Err(std::io::Error::other("the pod's netns is not held"))),
        }
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

/// How long the parts of an enrolment took, for its log line.
#[derive(Default)]
struct Times {
    netns: Duration,
    ztunnel: Duration,
}

/// The node agent.
pub struct Agent {
    config: Config,
    kube: std::sync::OnceLock<Arc<crate::k8s::Kube>>,
    locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    metrics: Arc<Metrics>,
    install_state: std::sync::Mutex<Result<(), Arc<InstallError>>>,
    backend: Backend,
    probes: Option<Arc<ProbeSet>>,
    policy: std::sync::Mutex<PolicySource>,
    store: StateStore,
    core: std::sync::Mutex<Core>,
}

fn pod_uid(req: &Request) -> String {
    if req.pod.uid.is_empty() { format!("container-{}", req.container_id) } else { req.pod.uid.clone() }
}

impl Agent {
    /// Creates the agent and reloads the pods a previous run enrolled. Pods whose netns is gone are dropped.
    /// `config_path` is re-read when it changes, so standalone enrolment can be edited without a restart.
    pub fn new(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<Arc<Agent>> {
        let store = StateStore::new(&config.state_dir)?;
        let host_netns_inode = crate::netns::host_inode()?;
        let mut core = Core {
            node: Node::new(host_netns_inode, config.zds_socket.clone()),
            netns: HashMap::new(),
            listeners: HashMap::new(),
            conns: HashMap::new(),
            next_conn: 0,
        };
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
                    let inode = ns.inode();
                    core.netns.insert((r.uid.clone(), inode), ns);
                    core.node.handle(Event::Restored { record: r, netns: Some(inode) });
                }
                // In Kubernetes mode the API, not a path, says whether the pod still exists: keep it (ztunnel
                // gets Keep and goes on serving it) until the controller finds its netns again through /proc or
                // learns that it is gone.
                Err(e) if config.mode == crate::config::Mode::Kubernetes => {
                    info!(uid = %r.uid, error = %e, "re-adopted pod without its netns; the controller will look for it");
                    core.node.handle(Event::Restored { record: r, netns: None });
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
                core.node.pods().map(|p| (p.record.uid.clone(), p.record.ips.clone())).collect();
            let set = ProbeSet::install(backend, &members).context("installing the node's probe rules")?;
            Some(Arc::new(set))
        } else {
            None
        };
        info!(%backend, probe_snat = probes.is_some(), loopback_route = config.loopback_route, "rule backend ready");
        let metrics = Metrics::new();
        metrics.pods_enrolled.set(core.node.pod_count() as i64);
        let install_state =
            std::sync::Mutex::new(if config.install.enabled { Err(Arc::new(InstallError::NotYet)) } else { Ok(()) });
        Ok(Arc::new(Agent {
            config,
            kube: std::sync::OnceLock::new(),
            locks: std::sync::Mutex::new(HashMap::new()),
            metrics,
            install_state,
            backend,
            probes,
            policy,
            store,
            core: std::sync::Mutex::new(core),
        }))
    }

    /// One step of the machine under the lock: the event, with the descriptor offered beside it, then the
    /// commands that need no waiting. Returns the waiting ones, in order.
    fn step(self: &Arc<Self>, ev: Event, offer: Option<Offer>) -> Vec<Deferred> {
        let mut core = self.core.lock().unwrap();
        match offer {
            None => {}
            Some(Offer::Netns(uid, ns)) => {
                core.netns.entry((uid, ns.inode())).or_insert(ns);
            }
            Some(Offer::Listeners(uid, inode, l)) => {
                core.listeners.entry((uid, inode)).or_insert(l);
            }
        }
        let cmds = core.node.handle(ev);
        self.execute(&mut core, cmds)
    }

    fn execute(self: &Arc<Self>, core: &mut Core, cmds: Vec<Command>) -> Vec<Deferred> {
        let mut queue: VecDeque<Command> = cmds.into();
        let mut deferred = Vec::new();
        while let Some(cmd) = queue.pop_front() {
            match cmd {
                Command::ProbeAdd { uid, ips } => deferred.push(Deferred::Probe { add: true, uid, ips }),
                Command::ProbeRemove { uid, ips } => deferred.push(Deferred::Probe { add: false, uid, ips }),
                Command::ApplyRules { uid, netns, cfg, bind } => {
                    let (path, file) = core.file_of(&uid, netns);
                    let pod = core.node.pod_name(&uid).unwrap_or_else(|| uid.clone());
                    deferred.push(Deferred::ApplyRules { uid, pod, path, file, inode: netns, cfg, bind });
                }
                Command::RemoveRules { uid, netns, cfg } => {
                    let (path, file) = core.file_of(&uid, netns);
                    deferred.push(Deferred::RemoveRules { uid, path, file, cfg });
                }
                Command::Send { conn, msg, purpose } => {
                    let handle = core.conns.get(&conn).cloned();
                    let failed = self.send(core, handle, msg, purpose, &mut deferred);
                    if let Some(ev) = failed {
                        queue.extend(core.node.handle(ev));
                    }
                }
                Command::DelEverywhere { conns, uid } => {
                    let mut replies = Vec::new();
                    for id in conns {
                        if let Some(h) = core.conns.get(&id) {
                            let (job, rx) = Job::awaited(WorkloadRequest::del(uid.clone()), Vec::new());
                            h.enqueue(job);
                            replies.push((id, rx));
                        }
                    }
                    deferred.push(Deferred::AwaitAll { uid, replies });
                }
                Command::SaveRecord(r) => deferred.push(Deferred::Save(r)),
                Command::DropRecord(uid) => deferred.push(Deferred::Drop(uid)),
                Command::Reply(r) => deferred.push(Deferred::Reply(r)),
            }
        }
        // Close what the machine no longer names.
        let Core { node, netns, listeners, conns, .. } = core;
        netns.retain(|(uid, inode), _| node.holds_netns(uid, *inode));
        listeners.retain(|(uid, inode), _| node.holds_listeners(uid, *inode));
        conns.retain(|id, _| node.conns().iter().any(|c| c.id == *id));
        self.metrics.pods_enrolled.set(node.pod_count() as i64);
        self.metrics.ztunnels.set(node.conns().len() as i64);
        deferred
    }

    /// Queues one ZDS message. A message that cannot be sent and that an enrolment waits for becomes the
    /// event returned; a snapshot entry whose fds cannot be duplicated becomes Keep.
    fn send(
        self: &Arc<Self>,
        core: &Core,
        handle: Option<ConnHandle>,
        msg: Msg,
        purpose: Option<Purpose>,
        deferred: &mut Vec<Deferred>,
    ) -> Option<Event> {
        let pod_of = |uid: &str| core.node.pod_name(uid).unwrap_or_default();
        let Some(handle) = handle else {
            let Msg::Add { uid, .. } = msg else { return None };
            let source = ZdsError::Disconnected("connection closed".into());
            return (purpose == Some(Purpose::Enrol)).then(|| Event::Answered {
                result: Err(EnrolError::Handoff { pod: pod_of(&uid), source }),
                uid,
                purpose: Purpose::Enrol,
            });
        };
        match msg {
            Msg::Add { uid, netns, attach } => match (core.request(&uid, netns, attach), purpose) {
                (Ok((req, fds)), Some(Purpose::Enrol)) => {
                    let (job, rx) = Job::awaited(req, fds);
                    handle.enqueue(job);
                    deferred.push(Deferred::Await { pod: pod_of(&uid), uid, inode: netns, rx });
                }
                (Ok((req, fds)), Some(Purpose::Snapshot { .. })) => {
                    let (job, rx) = Job::awaited(req, fds);
                    handle.enqueue(job);
                    self.spawn_snapshot_answer(uid, netns, rx);
                }
                (Ok((req, fds)), None) => handle.enqueue(Job::fire(req, fds)),
                (Err(source), Some(Purpose::Enrol)) => {
                    let result = Err(EnrolError::Fds { pod: pod_of(&uid), source });
                    return Some(Event::Answered { uid, purpose: Purpose::Enrol, result });
                }
                (Err(e), _) => {
                    warn!(uid = %uid, error = %e, "cannot duplicate the pod's fds; asking ztunnel to keep it");
                    handle.enqueue(Job::fire(WorkloadRequest::keep(uid), Vec::new()));
                }
            },
            Msg::Keep { uid } => handle.enqueue(Job::fire(WorkloadRequest::keep(uid), Vec::new())),
            Msg::SnapshotSent => handle.enqueue(Job::fire(WorkloadRequest::snapshot_sent(), Vec::new())),
        }
        None
    }

    /// Offers the listeners a ztunnel sends back for a snapshot entry to the machine, which keeps them if it
    /// still has none for that netns.
    fn spawn_snapshot_answer(self: &Arc<Self>, uid: String, netns: Inode, rx: oneshot::Receiver<zds::Outcome>) {
        let agent = self.clone();
        tokio::spawn(async move {
            let returned = match rx.await {
                Ok(Ok(r)) => r,
                Ok(Err(ZdsError::Nack(e))) => {
                    return warn!(uid = %uid, error = %e, "ztunnel refused the pod in its snapshot; it does not serve it");
                }
                _ => return,
            };
            if returned.is_empty() {
                return;
            }
            let offer = Offer::Listeners(uid.clone(), netns, PodListeners::from_returned(returned));
            let ev = Event::Answered { uid: uid.clone(), purpose: Purpose::Snapshot { netns }, result: Ok(true) };
            agent.step(ev, Some(offer));
            if agent.core.lock().unwrap().listeners.contains_key(&(uid.clone(), netns)) {
                info!(uid = %uid, "took back the pod's listeners from ztunnel");
            }
        });
    }

    /// Runs one flow: the event, then each waiting command in turn, each result fed back as the next event,
    /// until the machine answers.
    async fn drive(self: &Arc<Self>, first: Event, offer: Option<Offer>) -> (Result<Outcome, EnrolError>, Times) {
        let mut work: VecDeque<Deferred> = self.step(first, offer).into();
        let mut probe: Option<tokio::task::JoinHandle<()>> = None;
        let mut times = Times::default();
        while let Some(d) = work.pop_front() {
            let (next, offer) = match d {
                Deferred::Probe { add: true, uid, ips } => {
                    if let Some(p) = self.probes.clone() {
                        probe = Some(tokio::task::spawn_blocking(move || p.add(&uid, &ips)));
                    }
                    (None, None)
                }
                Deferred::Probe { add: false, uid, ips } => {
                    if let Some(h) = probe.take() {
                        let _ = h.await;
                    }
                    self.probe_remove(uid, ips).await;
                    (None, None)
                }
                Deferred::ApplyRules { uid, pod, path, file, inode, cfg, bind } => {
                    let started = Instant::now();
                    let (result, offer) = self.apply_rules(pod, path, file, cfg, bind).await;
                    times.netns = started.elapsed();
                    let offer = offer.map(|l| Offer::Listeners(uid.clone(), inode, l));
                    (Some(Event::RulesApplied { uid, result }), offer)
                }
                Deferred::RemoveRules { uid, path, file, cfg } => {
                    let backend = self.backend;
                    let res = match file {
                        Ok(f) => crate::netns::run_in(path, f, move || rules::remove_pod(backend, cfg)).await,
                        Err(source) => Err(NetnsError::Io { path, source }),
                    };
                    match res {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            self.rule_error();
                            warn!(uid = %uid, error = %e, "removing the pod's rules failed")
                        }
                        Err(e) => debug!(uid = %uid, error = %e, "pod netns not enterable; rules went with it"),
                    }
                    (None, None)
                }
                Deferred::Await { uid, pod, inode, rx } => {
                    let started = Instant::now();
                    let limit = self.zds_timeout() * 2;
                    let outcome = match tokio::time::timeout(limit, rx).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(_)) => Err(ZdsError::Disconnected("request dropped".into())),
                        Err(_) => Err(ZdsError::Timeout(limit)),
                    };
                    times.ztunnel = started.elapsed();
                    let (result, offer) = match outcome {
                        Ok(returned) if !returned.is_empty() => (
                            Ok(true),
                            Some(Offer::Listeners(uid.clone(), inode, PodListeners::from_returned(returned))),
                        ),
                        Ok(_) => (Ok(false), None),
                        Err(source) => (Err(EnrolError::Handoff { pod, source }), None),
                    };
                    (Some(Event::Answered { uid, purpose: Purpose::Enrol, result }), offer)
                }
                Deferred::AwaitAll { uid, replies } => {
                    for (id, rx) in replies {
                        match tokio::time::timeout(self.zds_timeout() * 2, rx).await {
                            Ok(Ok(Ok(_))) => {}
                            Ok(Ok(Err(e))) => {
                                warn!(uid = %uid, conn = id, error = %e, "ztunnel did not confirm the removal")
                            }
                            _ => warn!(uid = %uid, conn = id, "ztunnel did not confirm the removal in time"),
                        }
                    }
                    (None, None)
                }
                Deferred::Save(r) => {
                    if let Err(e) = self.store.save(&r) {
                        warn!(uid = %r.uid, error = %e, "cannot record the pod; a restarted agent will not know it");
                    }
                    (None, None)
                }
                Deferred::Drop(uid) => {
                    if let Err(e) = self.store.remove(&uid) {
                        warn!(uid = %uid, error = %e, "cannot remove the pod's record");
                    }
                    (None, None)
                }
                Deferred::Reply(r) => {
                    if let Some(h) = probe.take() {
                        let _ = h.await;
                    }
                    return (r, times);
                }
            };
            if let Some(ev) = next {
                work.extend(self.step(ev, offer));
            }
        }
        (Ok(Outcome::Ok), times)
    }

    /// Installs a pod's rules and routing, and binds its listeners if asked, on a thread in its netns.
    async fn apply_rules(
        &self,
        pod: String,
        path: PathBuf,
        file: std::io::Result<std::fs::File>,
        cfg: InpodConfig,
        bind: bool,
    ) -> (Result<(), EnrolError>, Option<PodListeners>) {
        let (backend, cfg) = (self.backend, self.configured(cfg));
        let file = match file {
            Ok(f) => f,
            Err(source) => return (Err(NetnsError::Io { path, source }.into()), None),
        };
        let res = crate::netns::run_in(path.clone(), file, move || -> Result<Option<PodListeners>, RuleError> {
            rules::install_pod(backend, cfg)?;
            if bind { PodListeners::bind_here(cfg.ipv6).map(Some).map_err(RuleError::Listeners) } else { Ok(None) }
        })
        .await;
        match res {
            Ok(Ok(l)) => (Ok(()), l),
            Ok(Err(source)) => (Err(EnrolError::Rules { pod, netns: path, source: Box::new(source) }), None),
            Err(e) => (Err(e.into()), None),
        }
    }

    /// Re-applies the rules of every re-adopted pod (after a restart): idempotent, so a pod whose rules are in
    /// place sees no change and no gap, and one whose rules were damaged gets them back.
    pub async fn reconcile(&self) {
        let pods: Vec<(String, InpodConfig, PathBuf, Option<std::fs::File>)> = {
            let core = self.core.lock().unwrap();
            core.node
                .pods()
                .map(|p| {
                    let uid = p.record.uid.clone();
                    let file = p.netns.and_then(|i| core.netns.get(&(uid.clone(), i))).and_then(|n| n.file().ok());
                    (uid, self.configured(p.record.inpod_config()), p.record.netns_path.clone(), file)
                })
                .collect()
        };
        for (uid, cfg, path, file) in pods {
            let backend = self.backend;
            let Some(f) = file else {
                debug!(uid = %uid, "no netns to re-apply the rules in");
                continue;
            };
            let failed = |e: &dyn std::fmt::Display| {
                self.rule_error();
                warn!(uid = %uid, error = %e, "cannot re-apply the rules of a re-adopted pod");
            };
            match crate::netns::run_in(path, f, move || rules::install_pod(backend, cfg)).await {
                Ok(Ok(())) => debug!(uid = %uid, "re-applied the pod's rules"),
                Ok(Err(e)) => failed(&e),
                Err(e) => failed(&e),
            }
        }
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Records the installer's state (called by the installer thread).
    pub fn set_install_state(&self, s: Result<(), InstallError>) {
        self.metrics.installer_ready.set(i64::from(s.is_ok()));
        *self.install_state.lock().unwrap() = s.map_err(Arc::new);
    }

    fn has_ztunnel(&self) -> bool {
        !self.core.lock().unwrap().node.conns().is_empty()
    }

    /// Ready when the plugin is installed and a ztunnel is connected; otherwise why not.
    pub fn readiness(&self) -> Result<(), NotReady> {
        self.install_state.lock().unwrap().clone().map_err(NotReady::Plugin)?;
        if self.kube.get().is_some_and(|k| !k.synced()) {
            return Err(NotReady::NotSynced);
        }
        if !self.has_ztunnel() {
            return Err(NotReady::NoZtunnel(self.config.zds_socket.clone()));
        }
        Ok(())
    }

    fn rule_error(&self) {
        self.metrics.rule_errors.get_or_create(&BackendLabels { backend: self.backend.to_string() }).inc();
    }

    async fn probe_remove(&self, uid: String, ips: Vec<IpAddr>) {
        if let Some(p) = self.probes.clone() {
            let _ = tokio::task::spawn_blocking(move || p.remove(&uid, &ips)).await;
        }
    }

    /// A pod's rule configuration with the agent's settings applied (the loopback route). Removal needs none:
    /// it takes out everything either setting installs.
    fn configured(&self, cfg: InpodConfig) -> InpodConfig {
        cfg.with_loopback_route(self.config.loopback_route)
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
    pub async fn handle(self: &Arc<Self>, req: Request) -> Response {
        if req.version != cni_api::API_VERSION {
            let e = EnrolError::Version(req.version);
            return Response::error(e.code(), e.to_string());
        }
        let started = Instant::now();
        let result = match req.command {
            CniCommand::Add => self.add(&req).await,
            CniCommand::Del => self.del(&req).await.map(|_| Outcome::Ok),
            CniCommand::Check => self.check(&req).await.map(|_| Outcome::Ok),
            CniCommand::Status => self.status().map(|_| Outcome::Ok),
            CniCommand::Gc => self.gc(&req).await.map(|_| Outcome::Ok),
            CniCommand::Repair => self.repair(&req).await.map(|_| Outcome::Ok),
        };
        let outcome = match &result {
            Ok(Outcome::Enrolled) => {
                self.metrics.enrolment_duration.observe(started.elapsed().as_secs_f64());
                "enrolled".to_string()
            }
            Ok(Outcome::NotEnrolled) => "not_enrolled".to_string(),
            Ok(Outcome::Ok) => "ok".to_string(),
            Err(e) => format!("{:?}", e.code()),
        };
        self.metrics
            .cni_requests
            .get_or_create(&RequestLabels { command: format!("{:?}", req.command).to_uppercase(), outcome })
            .inc();
        match result {
            Ok(o) => Response::ok(o),
            Err(e) => Response::error(e.code(), e.to_string()),
        }
    }

    async fn add(self: &Arc<Self>, req: &Request) -> Result<Outcome, EnrolError> {
        let pod_name = format!("{}/{}", req.pod.namespace, req.pod.name);
        let service_account = match self.decide(&req.pod).await? {
            Decision::Skip(why) => {
                debug!(pod = %pod_name, why, "not enrolled");
                return Ok(Outcome::NotEnrolled);
            }
            Decision::Enrol { service_account } => service_account,
        };
        let netns_path = req.netns.as_deref().map(PathBuf::from).ok_or(EnrolError::NoNetnsPath)?;
        let mut ips = Vec::new();
        for cidr in &req.ips {
            let ip = cidr.split('/').next().unwrap_or_default();
            ips.push(ip.parse::<IpAddr>().map_err(|_| EnrolError::BadAddress(cidr.clone()))?);
        }
        let uid = pod_uid(req);
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

    /// Enrols a pod whose netns is open: rules, routing and listeners inside it, then ztunnel's ack, then its
    /// record. The caller holds the pod's lock. The node's probe set is updated at the same time (it does not
    /// depend on the rest), before the answer; a failed enrolment takes the pod out of it again.
    async fn enrol(self: &Arc<Self>, record: PodRecord, netns: PodNetns) -> Result<Outcome, EnrolError> {
        let started = Instant::now();
        let (pod, uid, ips) = (format!("{}/{}", record.namespace, record.name), record.uid.clone(), record.ips.clone());
        let offer = Offer::Netns(uid.clone(), netns);
        let (result, times) = self.drive(Event::Add { record }, Some(offer)).await;
        if result.is_ok() {
            info!(
                pod = %pod,
                uid = %uid,
                ips = ?ips,
                total_us = started.elapsed().as_micros() as u64,
                netns_us = times.netns.as_micros() as u64,
                ztunnel_us = times.ztunnel.as_micros() as u64,
                "pod enrolled"
            );
        }
        result
    }

    /// The enrolment decision for a pod the plugin asks about.
    async fn decide(&self, pod: &cni_api::PodRef) -> Result<Decision, EnrolError> {
        let Some(k) = self.kube.get() else { return Ok(self.policy().decide(pod)) };
        let (p, ns) = k.lookup(&pod.namespace, &pod.name, &pod.uid).await?;
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

    /// Forgets a pod: ZDS Del to every ztunnel, record and probe entry dropped; with `remove_rules`, also the
    /// rules inside its netns (an un-enrolled pod keeps running; a deleted one takes its netns with it). The
    /// caller holds the pod's lock.
    async fn forget(self: &Arc<Self>, uid: &str, remove_rules: bool) -> Result<(), EnrolError> {
        let name = self.core.lock().unwrap().node.pod_name(uid);
        let (result, _) = self.drive(Event::Forget { uid: uid.to_string(), remove_rules }, None).await;
        if let Some(name) = name {
            info!(pod = %name, uid, "pod removed");
        }
        result.map(|_| ())
    }

    /// Enrols a pod that is already running: finds its netns through /proc (its UID in a process's cgroup, its
    /// IP on an interface there, never the node's own), then as for a new pod. The caller holds the pod's lock.
    async fn enrol_running(self: &Arc<Self>, mut record: PodRecord, proc_root: &Path) -> Result<Outcome, EnrolError> {
        let host = self.core.lock().unwrap().node.host_netns();
        for c in crate::k8s::procfs::candidates(proc_root, &record.uid, host) {
            let Ok(ns) = PodNetns::open(&c.netns_path) else { continue };
            let ips = ns.run(rules::routing::addresses).await;
            let owns = matches!(&ips, Ok(Ok(addrs)) if record.ips.iter().any(|ip| addrs.contains(ip)));
            if owns {
                record.netns_path = c.netns_path.clone();
                record.netns_inode = ns.inode();
                return self.enrol(record, ns).await;
            }
        }
        Err(EnrolError::NotFound {
            pod: format!("{}/{}", record.namespace, record.name),
            uid: record.uid,
            ips: record.ips,
            proc_root: proc_root.to_path_buf(),
        })
    }

    async fn del(self: &Arc<Self>, req: &Request) -> Result<(), EnrolError> {
        let target = |agent: &Agent| agent.core.lock().unwrap().node.del_target(&pod_uid(req), &req.container_id);
        let Some(uid) = target(self) else {
            debug!(uid = %pod_uid(req), "DEL for a pod the agent does not hold, or for an older sandbox of it");
            return Ok(());
        };
        let _guard = self.lock_pod(&uid).await;
        // Again under the pod's lock: an ADD of a newer sandbox may have won meanwhile.
        if target(self).as_deref() != Some(uid.as_str()) {
            return Ok(());
        }
        self.forget(&uid, true).await
    }

    async fn check(&self, req: &Request) -> Result<(), EnrolError> {
        let uid = pod_uid(req);
        let held = self
            .core
            .lock()
            .unwrap()
            .node
            .pod(&uid)
            .map(|p| (self.configured(p.record.inpod_config()), p.record.netns_path.clone(), p.netns));
        let Some((cfg, netns_path, inode)) = held else {
            return match self.policy().decide(&req.pod) {
                Decision::Skip(_) => Ok(()),
                Decision::Enrol { .. } => Err(EnrolError::NotHeld),
            };
        };
        let netns = open_held(&netns_path, inode)?;
        let backend = self.backend;
        let present =
            netns.run(move || rules::pod_present(backend, cfg)).await?.map_err(|source| EnrolError::Rules {
                pod: format!("{}/{}", req.pod.namespace, req.pod.name),
                netns: netns_path.clone(),
                source: Box::new(source),
            })?;
        if !present {
            return Err(EnrolError::RulesMissing(netns_path));
        }
        self.status()
    }

    /// Reinstalls a held pod's rules and routing as the agent would install them now, replacing whatever is
    /// there (rules edited or removed by hand). The pod's enrolment does not change.
    async fn repair(&self, req: &Request) -> Result<(), EnrolError> {
        let uid = match req.pod.uid.as_str() {
            "" => {
                self.core.lock().unwrap().node.uid_of(&req.pod.namespace, &req.pod.name).ok_or(EnrolError::NotHeld)?
            }
            uid => uid.to_string(),
        };
        let _guard = self.lock_pod(&uid).await;
        let held = self.core.lock().unwrap().node.pod(&uid).map(|p| (p.record.clone(), p.netns));
        let (record, inode) = held.ok_or(EnrolError::NotHeld)?;
        let netns = open_held(&record.netns_path, inode)?;
        let (backend, cfg) = (self.backend, self.configured(record.inpod_config()));
        let pod = format!("{}/{}", record.namespace, record.name);
        netns.run(move || rules::repair_pod(backend, cfg)).await?.map_err(|source| EnrolError::Rules {
            pod: pod.clone(),
            netns: record.netns_path.clone(),
            source: Box::new(source),
        })?;
        info!(pod = %pod, %uid, "rules reinstalled on request (debug --repair)");
        Ok(())
    }

    fn status(&self) -> Result<(), EnrolError> {
        if !self.has_ztunnel() {
            return Err(EnrolError::Unready(self.config.zds_socket.clone()));
        }
        Ok(())
    }

    async fn gc(self: &Arc<Self>, req: &Request) -> Result<(), EnrolError> {
        let valid: HashSet<&str> = req.valid_attachments.iter().map(|a| a.container_id.as_str()).collect();
        let stale = self.core.lock().unwrap().node.stale(&valid);
        for uid in stale {
            info!(uid = %uid, "GC: the runtime no longer knows this sandbox");
            let _guard = self.lock_pod(&uid).await;
            self.forget(&uid, true).await?;
        }
        Ok(())
    }

    /// Drops every pod whose netns is gone although no DEL came: its path no longer names the netns the agent
    /// holds (unmounted, removed, or now another netns), as when a runtime crashed or was cleaned up by hand. The
    /// agent's own handle keeps such a netns alive, so without this its record, ztunnel's proxy and the netns
    /// itself would stay until a restart. Returns how many it dropped.
    pub async fn sweep_vanished(self: &Arc<Self>) -> usize {
        let held = |agent: &Agent, uid: &str| {
            agent.core.lock().unwrap().node.pod(uid).map(|p| (p.record.netns_path.clone(), p.netns))
        };
        let candidates: Vec<(String, PathBuf, Option<Inode>)> = {
            let core = self.core.lock().unwrap();
            core.node.pods().map(|p| (p.record.uid.clone(), p.record.netns_path.clone(), p.netns)).collect()
        };
        let mut dropped = 0;
        for (uid, path, inode) in candidates {
            if !netns_vanished(&path, inode) {
                continue;
            }
            let _guard = self.lock_pod(&uid).await;
            // Under the pod's lock: an ADD that re-enrolled the pod meanwhile wins.
            if held(self, &uid) != Some((path.clone(), inode)) || !netns_vanished(&path, inode) {
                continue;
            }
            info!(uid = %uid, netns = %path.display(), "the pod's netns is gone without a CNI DEL; dropping the pod");
            match self.forget(&uid, false).await {
                Ok(()) => {
                    dropped += 1;
                    self.metrics.pods_swept.inc();
                }
                Err(e) => warn!(uid = %uid, error = %e, "dropping a pod whose netns is gone failed"),
            }
        }
        dropped
    }

    /// Runs [`Agent::sweep_vanished`] and [`Agent::replay_deferred_dels`] every `sweepIntervalMs` until the
    /// process exits.
    pub async fn sweep_forever(self: Arc<Self>) {
        let every = Duration::from_millis(self.config.sweep_interval_ms);
        if every.is_zero() {
            return;
        }
        loop {
            tokio::time::sleep(every).await;
            self.replay_deferred_dels().await;
            self.sweep_vanished().await;
        }
    }

    /// Carries out the DELs the plugin left while the agent was away ([`cni_api::deferred_del_dir`]): a pod
    /// deleted then, whose netns the runtime keeps, would otherwise stay captured. A DEL for an older sandbox
    /// of a pod leaves the current one alone, as always; one that fails stays for the next sweep. Returns how
    /// many it carried out.
    pub async fn replay_deferred_dels(self: &Arc<Self>) -> usize {
        let dir = cni_api::deferred_del_dir(&self.config.cni_socket);
        let Ok(entries) = std::fs::read_dir(&dir) else { return 0 };
        let mut done = 0;
        for path in entries.flatten().map(|e| e.path()) {
            // Only whole files: one being written has another extension until it is renamed.
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let req = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Request>(&b).map_err(|e| e.to_string()));
            match req {
                Ok(req) if req.command == CniCommand::Del && req.version == cni_api::API_VERSION => {
                    let pod = format!("{}/{}", req.pod.namespace, req.pod.name);
                    info!(pod = %pod, container = %req.container_id, "carrying out a DEL the plugin left while the agent was away");
                    if let Err(e) = self.del(&req).await {
                        warn!(pod = %pod, error = %e, "a deferred DEL failed; trying again at the next sweep");
                        continue;
                    }
                    done += 1;
                }
                Ok(_) => {
                    warn!(file = %path.display(), "ignoring a deferred request that is not a DEL of this API version")
                }
                Err(e) => warn!(file = %path.display(), error = %e, "ignoring an unreadable deferred DEL"),
            }
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(file = %path.display(), error = %e, "cannot remove a deferred DEL");
            }
        }
        done
    }

    /// The enrolled pods' records, by UID.
    pub fn pods(&self) -> Vec<PodRecord> {
        self.core.lock().unwrap().node.pods().map(|p| p.record.clone()).collect()
    }

    /// Number of connected ztunnels.
    pub fn ztunnels(&self) -> usize {
        self.core.lock().unwrap().node.conns().len()
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
        // One step: the connection gets its number, its snapshot is queued and it joins the set.
        let (id, rx) = {
            let mut core = self.core.lock().unwrap();
            core.next_conn += 1;
            let id = core.next_conn;
            let (handle, rx) = ConnHandle::new(id, pid, handoff);
            core.conns.insert(id, handle);
            let cmds = core.node.handle(Event::Connected(Conn { id, handoff }));
            let deferred = self.execute(&mut core, cmds);
            debug_assert!(deferred.is_empty(), "a snapshot waits for nothing");
            info!(conn = id, pid, handoff, pods = core.node.pod_count(), "ztunnel connected; snapshot queued");
            (id, rx)
        };
        let reason = zds::serve_queue(sock, rx, self.zds_timeout()).await;
        self.step(Event::Disconnected(id), None);
        warn!(conn = id, pid, reason = %reason, remaining = self.ztunnels(), "ztunnel disconnected");
    }

    /// Answers the plugin's requests, which `cniserver` passes over the channel.
    pub async fn serve_plugin(self: Arc<Self>, mut calls: mpsc::Receiver<crate::cniserver::Call>) {
        while let Some((req, reply)) = calls.recv().await {
            let agent = self.clone();
            tokio::spawn(async move {
                let _ = reply.send(agent.handle(req).await);
            });
        }
    }

    /// Carries out what the Kubernetes controller asks, which it passes over the channel.
    pub async fn serve_controller(self: Arc<Self>, mut asks: mpsc::Receiver<crate::k8s::Ask>) {
        use crate::k8s::Ask;
        while let Some(ask) = asks.recv().await {
            let agent = self.clone();
            tokio::spawn(async move {
                match ask {
                    Ask::Records(reply) => {
                        let _ = reply.send(agent.pods());
                    }
                    Ask::Forget { namespace, name, uid, remove_rules, reply } => {
                        let uid = uid.or_else(|| agent.core.lock().unwrap().node.uid_of(&namespace, &name));
                        let result = match uid {
                            Some(uid) => {
                                let _guard = agent.lock_pod(&uid).await;
                                agent.forget(&uid, remove_rules).await
                            }
                            None => Ok(()),
                        };
                        let _ = reply.send(result);
                    }
                    Ask::Enrol { record, proc_root, reply } => {
                        let _guard = agent.lock_pod(&record.uid).await;
                        let result = if !agent.core.lock().unwrap().node.needs_enrolment(&record.uid) {
                            Ok(true)
                        } else if record.ips.is_empty() {
                            Ok(false)
                        } else {
                            info!(pod = %format!("{}/{}", record.namespace, record.name), "enrolling the running pod");
                            agent.enrol_running(record, &proc_root).await.map(|_| true)
                        };
                        let _ = reply.send(result);
                    }
                }
            });
        }
    }
}

impl Agent {
    /// Removes Ambit from the node while the agent runs (its DaemonSet is being deleted): no more enrolments,
    /// every pod forgotten under its lock (rules out, ztunnel told), then the node's rules and the plugin.
    pub async fn uninstall(self: &Arc<Self>) -> anyhow::Result<()> {
        self.step(Event::Stopping, None);
        let uids: Vec<String> = self.pods().into_iter().map(|r| r.uid).collect();
        for uid in uids {
            let _guard = self.lock_pod(&uid).await;
            if let Err(e) = self.forget(&uid, true).await {
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
                let res = ns.run(move || rules::remove_pod(backend, cfg)).await;
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

/// Opens a held pod's netns by its recorded path, refusing a path that now names another netns: the pod's is
/// gone (the sweep drops it), and its rules must never be checked or installed in someone else's.
fn open_held(path: &Path, held: Option<u64>) -> Result<PodNetns, NetnsError> {
    let ns = PodNetns::open(path)?;
    match held {
        Some(h) if h != ns.inode() => Err(NetnsError::Gone(path.to_path_buf())),
        _ => Ok(ns),
    }
}

/// Whether the netns at `path` is no longer the one the agent holds (inode `held`; `None`: the agent holds
/// none, and then only a missing path counts). A netns it cannot inspect for another reason is kept.
fn netns_vanished(path: &Path, held: Option<u64>) -> bool {
    matches!(open_held(path, held), Err(NetnsError::Gone(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_netns_is_opened_only_if_its_path_still_names_it() {
        let path = Path::new("/proc/self/ns/net");
        let inode = PodNetns::open(path).unwrap().inode();
        assert_eq!(open_held(path, Some(inode)).unwrap().inode(), inode);
        assert!(open_held(path, None).is_ok(), "a record from before inodes were kept");
        assert!(matches!(open_held(path, Some(inode + 1)), Err(NetnsError::Gone(_))));
        assert!(matches!(open_held(Path::new("/nonexistent/netns"), Some(inode)), Err(NetnsError::Gone(_))));
    }
}
