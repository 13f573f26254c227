//! Finding a running pod's network namespace through /proc, for pods that are enrolled after they started (a
//! namespace labelled later) or that a restarted agent has no record of.
//!
//! A process belongs to the pod if its cgroup path names the pod's UID (cgroupfs `…/pod<uid>/…`, systemd
//! `…-pod<uid_with_underscores>.slice/…`); its netns is the pod's only if it is not the node's own and one of
//! its interfaces holds the pod's IP (checked by the caller inside the netns). Among several processes of the
//! same netns the oldest (the sandbox's pause process) is kept.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A process whose cgroup names the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its pid.
    pub pid: i32,
    /// Its netns inode.
    pub inode: u64,
    /// Its start time (clock ticks since boot): the smallest is the sandbox.
    pub starttime: u64,
    /// `/proc/<pid>/ns/net`.
    pub netns_path: PathBuf,
}

/// The pod UID a cgroup file names, if any.
pub fn pod_uid_in_cgroup(cgroup: &str) -> Option<String> {
    for line in cgroup.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or(line);
        let mut rest = path;
        while let Some(i) = rest.find("pod") {
            let after = &rest[i + 3..];
            let id: String = after.chars().take_while(|c| c.is_ascii_hexdigit() || *c == '-' || *c == '_').collect();
            let uid = id.replace('_', "-");
            if is_uuid(&uid) {
                return Some(uid.to_ascii_lowercase());
            }
            rest = after;
        }
    }
    None
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && [8, 4, 4, 4, 12].iter().zip(&parts).all(|(n, p)| p.len() == *n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The start time field of `/proc/<pid>/stat` (field 22, after the parenthesised command name).
pub fn starttime(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Processes under `proc_root` whose cgroup names `uid`, one per netns (the oldest), oldest first; the node's own
/// netns is never returned.
pub fn candidates(proc_root: &Path, uid: &str, host_inode: u64) -> Vec<Candidate> {
    let uid = uid.to_ascii_lowercase();
    let mut by_inode: HashMap<u64, Candidate> = HashMap::new();
    let Ok(entries) = std::fs::read_dir(proc_root) else { return Vec::new() };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let dir = e.path();
        let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else { continue };
        if pod_uid_in_cgroup(&cgroup).as_deref() != Some(uid.as_str()) {
            continue;
        }
        let netns_path = dir.join("ns/net");
        let Ok(meta) = std::fs::metadata(&netns_path) else { continue };
        if meta.ino() == host_inode {
            continue;
        }
        let Some(start) = std::fs::read_to_string(dir.join("stat")).ok().as_deref().and_then(starttime) else {
            continue;
        };
        let c = Candidate { pid, inode: meta.ino(), starttime: start, netns_path };
        match by_inode.get(&c.inode) {
            Some(old) if old.starttime <= c.starttime => {}
            _ => {
                by_inode.insert(c.inode, c);
            }
        }
    }
    let mut v: Vec<Candidate> = by_inode.into_values().collect();
    v.sort_by_key(|c| c.starttime);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b";

    #[test]
    fn cgroup_layouts() {
        let cgroupfs = format!("12:pids:/kubepods/besteffort/pod{UID}/0123abcd\n0::/\n");
        assert_eq!(pod_uid_in_cgroup(&cgroupfs).as_deref(), Some(UID));
        let guaranteed = format!("4:memory:/kubepods/pod{UID}/abc\n");
        assert_eq!(pod_uid_in_cgroup(&guaranteed).as_deref(), Some(UID));
        let systemd = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-0123.scope\n",
            UID.replace('-', "_")
        );
        assert_eq!(pod_uid_in_cgroup(&systemd).as_deref(), Some(UID));
        assert_eq!(pod_uid_in_cgroup("0::/user.slice/user-0.slice/session-1.scope\n"), None);
        assert_eq!(pod_uid_in_cgroup("0::/kubepods/podnot-a-uid/x\n"), None);
        assert_eq!(pod_uid_in_cgroup(&format!("0::/kubepods/pod{}/x", UID.to_uppercase())).as_deref(), Some(UID));
    }

    #[test]
    fn starttime_survives_odd_command_names() {
        let stat = "1234 (sleep) S 1 1234 1234 0 -1 4194560 92 0 0 0 0 0 0 0 20 0 1 0 987654 2420736 128";
        assert_eq!(starttime(stat), Some(987654));
        let odd = "1234 (a) b) (c) S 1 1234 1234 0 -1 4194560 92 0 0 0 0 0 0 0 20 0 1 0 42 2420736 128";
        assert_eq!(starttime(odd), Some(42));
        assert_eq!(starttime("garbage"), None);
    }

    #[test]
    fn scans_a_proc_tree() {
        let root = std::env::temp_dir().join(format!("ambit-proc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        // Two processes of the pod sharing a netns (the older wins), one of another pod, one in the host netns.
        let mk = |pid: i32, cgroup: &str, start: u64, ns_target: &str| {
            let d = root.join(pid.to_string());
            std::fs::create_dir_all(d.join("ns")).unwrap();
            std::fs::write(d.join("cgroup"), cgroup).unwrap();
            std::fs::write(d.join("stat"), format!("{pid} (p) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 1 1"))
                .unwrap();
            std::os::unix::fs::symlink(ns_target, d.join("ns/net")).unwrap();
        };
        let pod_ns = root.join("podns");
        std::fs::write(&pod_ns, b"").unwrap();
        let mine = format!("0::/kubepods/pod{UID}/c");
        mk(10, &mine, 500, pod_ns.to_str().unwrap());
        mk(11, &mine, 400, pod_ns.to_str().unwrap());
        mk(12, "0::/kubepods/pod00000000-0000-0000-0000-000000000000/c", 1, pod_ns.to_str().unwrap());
        mk(13, &mine, 1, "/proc/self/ns/net");
        let host = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        let c = candidates(&root, UID, host);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!((c[0].pid, c[0].starttime), (11, 400));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
