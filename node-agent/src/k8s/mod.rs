//! Kubernetes mode: the pods of this node and all namespaces, watched through the API, decide enrolment; a
//! controller keeps the node in step (enrols running pods when their namespace is labelled, un-enrols them
//! when the label goes, forgets finished and deleted pods) and records the state on each pod as the
//! `ambient.istio.io/redirection` annotation. The controller asks the agent to enrol or forget a pod over a
//! channel ([`Ask`]), so this module does not depend on the agent.

pub mod decide;
pub mod procfs;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::error::{ApiError, EnrolError};
use crate::pods::PodRecord;
use decide::{REDIRECTION, Verdict};

/// Kubernetes mode's settings (`kubernetes:` in the agent config).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeConfig {
    /// A kubeconfig file; without one, the in-cluster service account is used.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Namespaces never enrolled.
    #[serde(default = "default_excluded")]
    pub exclude_namespaces: Vec<String>,
    /// The host's /proc (`/host/proc` in a DaemonSet), to find running pods' netns.
    #[serde(default = "default_proc")]
    pub host_proc: PathBuf,
}

fn default_excluded() -> Vec<String> {
    vec!["kube-system".into()]
}
fn default_proc() -> PathBuf {
    PathBuf::from("/proc")
}

impl Default for KubeConfig {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults")
    }
}

/// A pod, by namespace and name.
pub type Key = (String, String);

/// What the controller asks of the agent, over a channel (so this module does not depend on the agent).
#[derive(Debug)]
pub enum Ask {
    /// The records of the enrolled pods.
    Records(oneshot::Sender<Vec<PodRecord>>),
    /// Un-enrol a pod (by UID, or by name when the API no longer has it); with `remove_rules` its rules go too.
    Forget {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Its UID, if known.
        uid: Option<String>,
        /// Whether to remove its rules (a running pod that leaves the mesh) or not (a deleted pod).
        remove_rules: bool,
        /// The result.
        reply: oneshot::Sender<Result<(), EnrolError>>,
    },
    /// Enrol a running pod unless the agent holds it with its netns; its netns is found under `proc_root`.
    /// Answers whether the pod is enrolled now (not when it has no IP yet: its CNI ADD will enrol it).
    Enrol {
        /// The pod (netns path and inode unknown; no IPs when the API has none yet).
        record: PodRecord,
        /// The host's /proc.
        proc_root: PathBuf,
        /// The result.
        reply: oneshot::Sender<Result<bool, EnrolError>>,
    },
}

/// Why reconciling a pod failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The agent could not carry it out.
    #[error(transparent)]
    Enrol(#[from] EnrolError),
    /// The API refused the annotation.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The agent is gone (shutting down).
    #[error("the agent is not answering")]
    AgentGone,
}

/// Sends an ask and waits for the agent's answer.
async fn ask<T>(agent: &mpsc::Sender<Ask>, make: impl FnOnce(oneshot::Sender<T>) -> Ask) -> Result<T, ReconcileError> {
    let (tx, rx) = oneshot::channel();
    agent.send(make(tx)).await.map_err(|_| ReconcileError::AgentGone)?;
    rx.await.map_err(|_| ReconcileError::AgentGone)
}

/// The API side of Kubernetes mode.
pub struct Kube {
    client: kube::Client,
    node: String,
    excluded: Vec<String>,
    /// Where to look for running pods' processes.
    pub proc_root: PathBuf,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    queue: mpsc::UnboundedSender<Key>,
    queued: Mutex<HashMap<Key, u32>>,
    synced: std::sync::atomic::AtomicBool,
}

impl Kube {
    /// Connects and starts watching this node's pods and all namespaces. Returns the handle and the queue the
    /// controller ([`run`]) serves. An unreachable API is not fatal: the watches retry with backoff.
    pub async fn connect(
        cfg: &KubeConfig,
        node: &str,
        own_namespace: Option<&str>,
    ) -> anyhow::Result<(Arc<Kube>, mpsc::UnboundedReceiver<Key>)> {
        use anyhow::Context;
        anyhow::ensure!(!node.is_empty(), "Kubernetes mode needs the node's name (NODE_NAME or nodeName)");
        let kcfg = match &cfg.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.context("kubeconfig")?
            }
            None => kube::Config::infer().await.context("finding Kubernetes credentials (in-cluster or KUBECONFIG)")?,
        };
        let client = kube::Client::try_from(kcfg).context("building the Kubernetes client")?;
        let mut excluded = cfg.exclude_namespaces.clone();
        if let Some(own) = own_namespace.filter(|n| !n.is_empty()) {
            excluded.push(own.to_string());
        }
        let (pods, pod_writer) = reflector::store::<Pod>();
        let (namespaces, ns_writer) = reflector::store::<Namespace>();
        let (tx, rx) = mpsc::unbounded_channel();
        let kube = Arc::new(Kube {
            client: client.clone(),
            node: node.to_string(),
            excluded,
            proc_root: cfg.host_proc.clone(),
            pods,
            namespaces,
            queue: tx,
            queued: Mutex::new(HashMap::new()),
            synced: std::sync::atomic::AtomicBool::new(false),
        });
        let pod_api: Api<Pod> = Api::all(client.clone());
        let watch_cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let k = kube.clone();
        tokio::spawn(async move {
            let mut s = watcher(pod_api, watch_cfg).default_backoff().reflect(pod_writer).touched_objects().boxed();
            while let Some(ev) = s.next().await {
                match ev {
                    Ok(p) => k.enqueue((
                        p.metadata.namespace.clone().unwrap_or_default(),
                        p.metadata.name.clone().unwrap_or_default(),
                    )),
                    Err(e) => warn!(error = %e, "pod watch failed; retrying"),
                }
            }
        });
        let ns_api: Api<Namespace> = Api::all(client);
        let k = kube.clone();
        tokio::spawn(async move {
            let mut s = watcher(ns_api, watcher::Config::default())
                .default_backoff()
                .reflect(ns_writer)
                .touched_objects()
                .boxed();
            while let Some(ev) = s.next().await {
                match ev {
                    // A namespace's label decides for all its pods on this node.
                    Ok(ns) => {
                        let name = ns.metadata.name.clone().unwrap_or_default();
                        for p in k.pods.state() {
                            if p.metadata.namespace.as_deref() == Some(name.as_str()) {
                                k.enqueue((name.clone(), p.metadata.name.clone().unwrap_or_default()));
                            }
                        }
                    }
                    Err(e) => warn!(error = %e, "namespace watch failed; retrying"),
                }
            }
        });
        Ok((kube, rx))
    }

    /// Queues a pod for reconciliation.
    pub fn enqueue(&self, key: Key) {
        let _ = self.queue.send(key);
    }

    /// Whether both caches have listed everything once.
    pub fn synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Acquire)
    }

    fn cached(&self, ns: &str, name: &str) -> (Option<Arc<Pod>>, Option<Arc<Namespace>>) {
        (self.pods.get(&ObjectRef::new(name).within(ns)), self.namespaces.get(&ObjectRef::new(ns)))
    }

    /// The pod and its namespace, from the caches, waiting briefly for them to catch up with a pod the runtime
    /// is creating, then from the API. An unreachable API fails: the caller fails closed.
    pub async fn lookup(
        &self,
        ns: &str,
        name: &str,
        uid: &str,
    ) -> Result<(Arc<Pod>, Option<Arc<Namespace>>), ApiError> {
        for _ in 0..10 {
            let (p, n) = self.cached(ns, name);
            if let Some(p) = p
                && (uid.is_empty() || p.metadata.uid.as_deref() == Some(uid))
                && n.is_some()
            {
                return Ok((p, n));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let pod = Api::<Pod>::namespaced(self.client.clone(), ns)
            .get(name)
            .await
            .map_err(|source| ApiError::ReadPod { namespace: ns.into(), name: name.into(), source })?;
        let namespace = Api::<Namespace>::all(self.client.clone())
            .get_opt(ns)
            .await
            .map_err(|source| ApiError::ReadNamespace { namespace: ns.into(), source })?;
        Ok((Arc::new(pod), namespace.map(Arc::new)))
    }

    /// The verdict for a pod.
    pub fn verdict(&self, pod: &Pod, ns: Option<&Namespace>) -> Verdict {
        decide::decide(pod, ns, &self.excluded)
    }

    /// Sets (`true`) or removes the redirection annotation.
    pub async fn annotate(&self, ns: &str, name: &str, enabled: bool) -> Result<(), ApiError> {
        let value = if enabled { serde_json::json!("enabled") } else { serde_json::Value::Null };
        let patch = serde_json::json!({"metadata": {"annotations": {REDIRECTION: value}}});
        Api::<Pod>::namespaced(self.client.clone(), ns)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(|source| ApiError::Annotate { namespace: ns.into(), name: name.into(), source })
    }

    /// Whether the agent's own DaemonSet is gone or being deleted (an uninstall, not an upgrade). Any doubt
    /// (no pod name, API errors) answers no: leaving Ambit installed is the safe side.
    pub async fn being_removed(&self, pod_namespace: &str, pod_name: &str) -> bool {
        use k8s_openapi::api::apps::v1::DaemonSet;
        let Ok(me) = Api::<Pod>::namespaced(self.client.clone(), pod_namespace).get(pod_name).await else {
            return false;
        };
        let Some(owner) = me.metadata.owner_references.iter().flatten().find(|o| o.kind == "DaemonSet") else {
            return false;
        };
        match Api::<DaemonSet>::namespaced(self.client.clone(), pod_namespace).get_opt(&owner.name).await {
            Ok(None) => true,
            Ok(Some(ds)) => {
                ds.metadata.deletion_timestamp.is_some() || ds.metadata.uid.as_deref() != Some(owner.uid.as_str())
            }
            Err(_) => false,
        }
    }

    /// Every pod of this node in the cache.
    pub fn node_pods(&self) -> Vec<Arc<Pod>> {
        self.pods.state()
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    fn attempt(&self, key: &Key) -> u32 {
        let mut q = self.queued.lock().unwrap();
        let n = q.entry(key.clone()).or_insert(0);
        *n += 1;
        *n
    }

    fn done(&self, key: &Key) {
        self.queued.lock().unwrap().remove(key);
    }
}

/// Serves the queue: reconciles each pod, retrying failures with backoff (5 ms doubling to 5 s), each pod at
/// most once at a time.
pub async fn run(agent: mpsc::Sender<Ask>, kube: Arc<Kube>, mut rx: mpsc::UnboundedReceiver<Key>) {
    // Nothing is decided before both caches hold a full listing: a pod seen before its namespace would look
    // "not enrolled" and be released. (Wait here only: kube's readiness signal wakes a single waiter.)
    let _ = kube.pods.wait_until_ready().await;
    let _ = kube.namespaces.wait_until_ready().await;
    kube.synced.store(true, std::sync::atomic::Ordering::Release);
    info!(pods = kube.node_pods().len(), "Kubernetes caches synced");
    // Forget recorded pods the API no longer has (deleted while the agent was down), then look at every pod.
    for r in ask(&agent, Ask::Records).await.unwrap_or_default() {
        if kube.cached(&r.namespace, &r.name).0.is_none_or(|p| p.metadata.uid.as_deref() != Some(r.uid.as_str())) {
            info!(pod = %format!("{}/{}", r.namespace, r.name), "forgetting a recorded pod the API no longer has");
            if let Err(e) = forget(&agent, &(r.namespace, r.name), Some(r.uid), true).await {
                warn!(error = %e, "forgetting a recorded pod failed");
            }
        }
    }
    for p in kube.node_pods() {
        kube.enqueue((p.metadata.namespace.clone().unwrap_or_default(), p.metadata.name.clone().unwrap_or_default()));
    }
    let running: Arc<Mutex<HashMap<Key, bool>>> = Arc::default();
    while let Some(key) = rx.recv().await {
        {
            let mut r = running.lock().unwrap();
            if let Some(dirty) = r.get_mut(&key) {
                *dirty = true;
                continue;
            }
            r.insert(key.clone(), false);
        }
        let (agent, kube, running) = (agent.clone(), kube.clone(), running.clone());
        tokio::spawn(async move {
            loop {
                let result = reconcile(&agent, &kube, &key).await;
                let again = {
                    let mut r = running.lock().unwrap();
                    let dirty = r.get(&key).copied().unwrap_or(false);
                    if result.is_ok() && !dirty {
                        r.remove(&key);
                        false
                    } else {
                        r.insert(key.clone(), false);
                        true
                    }
                };
                match result {
                    Ok(()) => kube.done(&key),
                    Err(e) => {
                        let n = kube.attempt(&key);
                        let delay =
                            Duration::from_millis(5u64.saturating_mul(1 << n.min(10))).min(Duration::from_secs(5));
                        warn!(pod = %format!("{}/{}", key.0, key.1), attempt = n, error = %e, "reconcile failed; retrying");
                        tokio::time::sleep(delay).await;
                    }
                }
                if !again {
                    return;
                }
            }
        });
    }
}

/// Asks the agent to forget a pod.
async fn forget(
    agent: &mpsc::Sender<Ask>,
    key: &Key,
    uid: Option<String>,
    remove_rules: bool,
) -> Result<(), ReconcileError> {
    let (namespace, name) = key.clone();
    Ok(ask(agent, |reply| Ask::Forget { namespace, name, uid, remove_rules, reply }).await??)
}

/// Brings one pod in step with its verdict.
async fn reconcile(agent: &mpsc::Sender<Ask>, kube: &Kube, key: &Key) -> Result<(), ReconcileError> {
    let (ns, name) = key;
    let (pod, namespace) = kube.cached(ns, name);
    let Some(pod) = pod else {
        // Deleted: forget it (its netns is going away with it).
        return forget(agent, key, None, false).await;
    };
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let annotated =
        pod.metadata.annotations.as_ref().and_then(|a| a.get(REDIRECTION)).map(String::as_str) == Some("enabled");
    match kube.verdict(&pod, namespace.as_deref()) {
        Verdict::Gone(why) => {
            debug!(pod = %format!("{ns}/{name}"), why, "the pod is finishing; forgetting it if enrolled");
            forget(agent, key, Some(uid), false).await?;
        }
        Verdict::Skip(why) => {
            debug!(pod = %format!("{ns}/{name}"), why, "not enrolled; un-enrolling it if it was");
            forget(agent, key, Some(uid), true).await?;
            if annotated {
                kube.annotate(ns, name, false).await?;
            }
        }
        Verdict::Enrol { service_account } => {
            let record = PodRecord {
                uid: uid.clone(),
                namespace: ns.clone(),
                name: name.clone(),
                service_account,
                container_id: String::new(),
                netns_path: PathBuf::new(),
                ips: pod_ips(&pod).unwrap_or_default(),
                netns_inode: 0,
            };
            let proc_root = kube.proc_root.clone();
            if !ask(agent, |reply| Ask::Enrol { record, proc_root, reply }).await?? {
                // No IP yet: the sandbox is still being set up, and its CNI ADD enrols it.
                return Ok(());
            }
            if !annotated {
                kube.annotate(ns, name, true).await?;
            }
        }
    }
    Ok(())
}

fn pod_ips(pod: &Pod) -> Option<Vec<std::net::IpAddr>> {
    let status = pod.status.as_ref()?;
    let mut ips: Vec<std::net::IpAddr> = status.pod_ips.iter().flatten().filter_map(|p| p.ip.parse().ok()).collect();
    if ips.is_empty() {
        ips.extend(status.pod_ip.as_deref().and_then(|ip| ip.parse::<std::net::IpAddr>().ok()));
    }
    (!ips.is_empty()).then_some(ips)
}
