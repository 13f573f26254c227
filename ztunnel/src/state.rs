//! What ztunnel knows about the mesh: workloads (and, later, services and policies), from the local workload
//! file in Istio ztunnel's format, reloaded when it changes. A file that does not parse leaves the last good
//! state in force; the error is logged and shown in `/config_dump`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::identity::Identity;

/// How a workload accepts traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Protocol {
    /// Plain TCP: not in the mesh.
    #[default]
    TCP,
    /// HBONE on 15008.
    HBONE,
}

/// Health of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum HealthStatus {
    /// Serving.
    #[default]
    Healthy,
    /// Not serving.
    Unhealthy,
}

/// One workload (a pod), in the local file's camelCase form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Unique id (`<cluster>//Pod/<ns>/<name>`).
    #[serde(default)]
    pub uid: String,
    /// Pod name.
    #[serde(default)]
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    #[serde(default)]
    pub service_account: String,
    /// Trust domain, when not the mesh's.
    #[serde(default)]
    pub trust_domain: String,
    /// Addresses.
    #[serde(default)]
    pub workload_ips: Vec<IpAddr>,
    /// How it takes traffic.
    #[serde(default)]
    pub protocol: Protocol,
    /// Node it runs on.
    #[serde(default)]
    pub node: String,
    /// Network.
    #[serde(default)]
    pub network: String,
    /// Owner workload name (deployment).
    #[serde(default)]
    pub workload_name: String,
    /// `app` / canonical service name.
    #[serde(default)]
    pub canonical_name: String,
    /// Canonical revision.
    #[serde(default)]
    pub canonical_revision: String,
    /// Cluster.
    #[serde(default)]
    pub cluster_id: String,
    /// Health.
    #[serde(default)]
    pub status: HealthStatus,
    /// Services it backs: `"<ns>/<hostname>"` → service port → target port.
    #[serde(default)]
    pub services: HashMap<String, HashMap<u16, u16>>,
}

impl Workload {
    /// Its identity, in `default_td` unless it names its own trust domain.
    pub fn identity(&self, default_td: &str) -> Identity {
        let td = if self.trust_domain.is_empty() { default_td } else { &self.trust_domain };
        let sa = if self.service_account.is_empty() { "default" } else { &self.service_account };
        Identity::new(td, &self.namespace, sa)
    }

    /// The name metrics use for it: the owner workload, else the pod.
    pub fn metrics_name(&self) -> &str {
        if self.workload_name.is_empty() { &self.name } else { &self.workload_name }
    }

    /// The `app` label metrics use.
    pub fn app(&self) -> &str {
        if self.canonical_name.is_empty() { self.metrics_name() } else { &self.canonical_name }
    }
}

/// The local file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalConfig {
    /// Workloads.
    #[serde(default)]
    pub workloads: Vec<Workload>,
    /// Services (kept as given until they are used).
    #[serde(default)]
    pub services: Vec<serde_json::Value>,
    /// Authorization policies (kept as given until they are used).
    #[serde(default)]
    pub policies: Vec<serde_json::Value>,
}

impl LocalConfig {
    /// Parses and checks the file's text.
    pub fn parse(text: &str) -> Result<LocalConfig, String> {
        let c: LocalConfig = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        let mut seen = HashMap::new();
        for w in &c.workloads {
            if w.namespace.is_empty() {
                return Err(format!("workload {:?} has no namespace", w.name));
            }
            for ip in &w.workload_ips {
                if let Some(other) = seen.insert(*ip, w.uid.clone()) {
                    return Err(format!("address {ip} belongs to both {other:?} and {:?}", w.uid));
                }
            }
        }
        Ok(c)
    }
}

/// A consistent snapshot of what ztunnel knows.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Workloads, in file order.
    pub workloads: Vec<Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// Services as given.
    pub services: Vec<serde_json::Value>,
    /// Policies as given.
    pub policies: Vec<serde_json::Value>,
}

impl Snapshot {
    /// Builds the indexes.
    pub fn new(c: LocalConfig) -> Snapshot {
        let workloads: Vec<Arc<Workload>> = c.workloads.into_iter().map(Arc::new).collect();
        let mut by_ip = HashMap::new();
        for w in &workloads {
            for ip in &w.workload_ips {
                by_ip.insert(*ip, w.clone());
            }
        }
        Snapshot { workloads, by_ip, services: c.services, policies: c.policies }
    }

    /// The workload at an address.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.by_ip.get(&ip).cloned()
    }

    /// The workload of a local pod, as ZDS names it.
    pub fn local_workload(&self, node: &str, namespace: &str, name: &str) -> Option<Arc<Workload>> {
        self.workloads
            .iter()
            .find(|w| {
                w.namespace == namespace && w.name == name && (w.node.is_empty() || node.is_empty() || w.node == node)
            })
            .cloned()
    }
}

/// Where the state came from and how the last load went.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadStatus {
    /// The file.
    pub source: Option<PathBuf>,
    /// Number of successful loads.
    pub generation: u64,
    /// When the last good load happened (Unix seconds).
    pub loaded_at: u64,
    /// The last error, if the newest version of the file was refused.
    pub last_error: Option<String>,
}

/// The shared, swappable state.
#[derive(Debug, Default)]
pub struct State {
    current: RwLock<Arc<Snapshot>>,
    status: RwLock<LoadStatus>,
}

impl State {
    /// Empty state.
    pub fn new() -> Arc<State> {
        Arc::new(State::default())
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().unwrap().clone()
    }

    /// How loading went.
    pub fn status(&self) -> LoadStatus {
        self.status.read().unwrap().clone()
    }

    /// Loads `path`; on error the previous snapshot stays.
    pub fn load_file(&self, path: &Path) -> Result<(), String> {
        let result = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))
            .and_then(|t| LocalConfig::parse(&t).map_err(|e| format!("{}: {e}", path.display())));
        let mut status = self.status.write().unwrap();
        status.source = Some(path.to_path_buf());
        match result {
            Ok(c) => {
                let n = c.workloads.len();
                *self.current.write().unwrap() = Arc::new(Snapshot::new(c));
                status.generation += 1;
                status.loaded_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                status.last_error = None;
                info!(file = %path.display(), workloads = n, generation = status.generation, "loaded workloads");
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, "keeping the last good configuration");
                status.last_error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Replaces the state directly (tests).
    pub fn set(&self, c: LocalConfig) {
        *self.current.write().unwrap() = Arc::new(Snapshot::new(c));
        self.status.write().unwrap().generation += 1;
    }
}

/// Reloads `path` into `state` whenever it changes: inotify on its directory (editors and config writers
/// replace files by rename), with a slow poll as a safety net.
pub fn watch(state: Arc<State>, path: PathBuf) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
            let name = path.file_name().map(|n| n.to_os_string());
            let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).ok();
            if let Some(i) = &inotify {
                let flags = AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CREATE;
                if let Err(e) = i.add_watch(&dir, flags) {
                    warn!(dir = %dir.display(), error = %e, "cannot watch the config directory; polling instead");
                }
            }
            let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let mut last = mtime(&path);
            loop {
                std::thread::sleep(Duration::from_millis(50));
                let mut changed = false;
                if let Some(i) = &inotify {
                    while let Ok(events) = i.read_events() {
                        if events.is_empty() {
                            break;
                        }
                        changed |= events.iter().any(|e| e.name.as_ref() == name.as_ref());
                    }
                }
                let now = mtime(&path);
                if now != last {
                    changed = true;
                    last = now;
                }
                if changed {
                    let _ = state.load_file(&path);
                }
            }
        })
        .expect("spawning the config watcher");
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISTIO_EXAMPLE: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/local
  name: local
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  node: local
  network: ""
  services:
    "default/example.com":
      80: 8080
- uid: cluster1//v1/Pod/default/local-tcp
  name: local-tcp
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.2"]
  protocol: TCP
  node: local
  services: {}
policies:
  - action: Allow
    rules:
    - - - notDestinationPorts:
          - 9999
    name: deny-9999
    namespace: default
    scope: Namespace
    dryRun: false
services:
- name: local
  namespace: default
  hostname: example.com
  vips:
    - /127.10.0.1
  ports:
    80: 8080
"#;

    #[test]
    fn reads_istio_format() {
        let c = LocalConfig::parse(ISTIO_EXAMPLE).unwrap();
        let s = Snapshot::new(c);
        let w = s.workload_by_ip("127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(w.protocol, Protocol::HBONE);
        assert_eq!(w.identity("cluster.local").to_string(), "spiffe://cluster.local/ns/default/sa/default");
        assert_eq!(w.services["default/example.com"][&80], 8080);
        assert_eq!(s.workload_by_ip("127.0.0.2".parse().unwrap()).unwrap().protocol, Protocol::TCP);
        assert!(s.local_workload("local", "default", "local").is_some());
        assert!(s.local_workload("elsewhere", "default", "local").is_none());
        assert_eq!(s.policies.len(), 1);
    }

    #[test]
    fn broken_file_keeps_the_last_good_state() {
        let dir = std::env::temp_dir().join(format!("ztunnel-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("w.yaml");
        std::fs::write(&f, ISTIO_EXAMPLE).unwrap();
        let st = State::new();
        st.load_file(&f).unwrap();
        std::fs::write(&f, "workloads: [{name: x}]").unwrap();
        assert!(st.load_file(&f).is_err());
        assert_eq!(st.snapshot().workloads.len(), 2);
        assert!(st.status().last_error.is_some());
        std::fs::write(&f, "workloads:\n- {name: a, namespace: n, workloadIps: [10.0.0.1]}\n- {name: b, namespace: n, workloadIps: [10.0.0.1]}\n").unwrap();
        assert!(st.load_file(&f).unwrap_err().contains("belongs to both"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
