//! Enrolled pods: what the agent holds for each, and the record it keeps on disk so a restarted agent finds
//! them again.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::listeners::PodListeners;
use crate::netns::PodNetns;
use crate::rules::InpodConfig;

/// What is recorded about an enrolled pod (on disk as `<state dir>/<uid>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    /// Pod UID (the ZDS key).
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Service account (identity).
    pub service_account: String,
    /// The sandbox's container id, to tell a stale DEL from a current one.
    pub container_id: String,
    /// The netns path the runtime gave.
    pub netns_path: PathBuf,
    /// The pod's IPs.
    pub ips: Vec<IpAddr>,
    /// The netns's inode, to recognise it again after a restart (a `/proc/<pid>/ns/net` path may be reused).
    #[serde(default)]
    pub netns_inode: u64,
}

impl PodRecord {
    /// The rule configuration for this pod.
    pub fn inpod_config(&self) -> InpodConfig {
        InpodConfig::for_ips(&self.ips)
    }
}

/// An enrolled pod.
#[derive(Debug)]
pub struct Pod {
    /// What is known about it.
    pub record: PodRecord,
    /// Its netns, held open; `None` after a restart when the netns could not be found.
    pub netns: Option<PodNetns>,
    /// Its listeners, when the agent holds them.
    pub listeners: Option<PodListeners>,
}

/// The on-disk records.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Records live in `dir`, created if needed.
    pub fn new(dir: &Path) -> std::io::Result<StateStore> {
        std::fs::create_dir_all(dir)?;
        Ok(StateStore { dir: dir.to_path_buf() })
    }

    /// The records in `dir` as they are, to read (`load_all`): nothing is created.
    pub fn existing(dir: &Path) -> StateStore {
        StateStore { dir: dir.to_path_buf() }
    }

    fn path(&self, uid: &str) -> PathBuf {
        // UIDs are Kubernetes UUIDs or container ids; refuse anything that could escape the directory.
        let safe: String =
            uid.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
        self.dir.join(format!("{safe}.json"))
    }

    /// Writes a record atomically.
    pub fn save(&self, r: &PodRecord) -> std::io::Result<()> {
        let path = self.path(&r.uid);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(r)?)?;
        std::fs::rename(&tmp, &path)
    }

    /// Removes a record; absent is fine.
    pub fn remove(&self, uid: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(uid)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Loads every record; unreadable ones are reported and skipped.
    pub fn load_all(&self) -> (Vec<PodRecord>, Vec<String>) {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return (ok, bad) };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => ok.push(r),
                Err(e) => bad.push(format!("{}: {e}", p.display())),
            }
        }
        ok.sort_by(|a: &PodRecord, b| a.uid.cmp(&b.uid));
        (ok, bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_remove() {
        let dir = std::env::temp_dir().join(format!("ambit-store-{}", std::process::id()));
        let s = StateStore::new(&dir).unwrap();
        let r = PodRecord {
            uid: "../../etc/passwd".into(),
            namespace: "ns".into(),
            name: "p".into(),
            service_account: "sa".into(),
            container_id: "c".into(),
            netns_path: "/var/run/netns/x".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
            netns_inode: 0,
        };
        s.save(&r).unwrap();
        std::fs::write(dir.join("junk.json"), b"{").unwrap();
        let (ok, bad) = s.load_all();
        assert_eq!(ok, vec![r.clone()]);
        assert_eq!(bad.len(), 1);
        assert!(std::fs::read_dir(&dir).unwrap().all(|e| e.unwrap().path().starts_with(&dir)));
        s.remove(&r.uid).unwrap();
        s.remove(&r.uid).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
