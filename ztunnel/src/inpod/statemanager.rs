//! ZDS semantics on ztunnel's side, as a state machine without I/O: which pods to start and stop for each
//! request, and what to answer. The real proxies are behind [`Driver`], so tests drive it with a fake.

use std::collections::{HashMap, HashSet};

use ambit_proto::zds::WorkloadInfo;

/// A decoded ZDS request with its (already validated) resources.
#[derive(Debug)]
pub enum Request<N> {
    /// Serve a pod.
    Add {
        /// Pod UID.
        uid: String,
        /// Its name, namespace and service account.
        info: WorkloadInfo,
        /// Its netns, plus any listeners the agent handed over.
        netns: N,
        /// The agent asks for the pod's listeners back with the ack (Ambit extension; the state machine
        /// ignores it, the connection answers it).
        return_listeners: bool,
    },
    /// Keep a pod if it is served (snapshot only).
    Keep {
        /// Pod UID.
        uid: String,
    },
    /// Stop serving a pod.
    Del {
        /// Pod UID.
        uid: String,
    },
    /// The snapshot is complete.
    SnapshotSent,
}

/// What ztunnel answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Ack.
    Ack,
    /// Nack with a reason; the connection stays.
    Nack(String),
    /// Nack, then drop the connection: the agent broke the protocol.
    ProtocolError(String),
}

/// Something that identifies a pod's netns.
pub trait NetnsId {
    /// The netns inode.
    fn inode(&self) -> u64;
}

/// Starts and stops pod proxies.
pub trait Driver<N> {
    /// Starts serving a pod; an error is answered as a nack.
    fn start(&mut self, uid: &str, info: WorkloadInfo, netns: N) -> Result<(), String>;
    /// Stops serving a pod (drains it).
    fn stop(&mut self, uid: &str);
}

/// The state across ZDS connections.
#[derive(Debug, Default)]
pub struct StateManager {
    /// Served pods and their netns inode.
    running: HashMap<String, u64>,
    /// Pods named in the current connection's snapshot.
    seen: HashSet<String>,
    snapshot_done: bool,
    synced_once: bool,
}

impl StateManager {
    /// A new connection to the agent: a new snapshot follows.
    pub fn connection_opened(&mut self) {
        self.seen.clear();
        self.snapshot_done = false;
    }

    /// Whether ztunnel has received a complete snapshot at least once.
    pub fn synced(&self) -> bool {
        self.synced_once
    }

    /// The UIDs of the pods being served.
    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = self.running.keys().cloned().collect();
        v.sort();
        v
    }

    /// Handles one request.
    pub fn handle<N: NetnsId, D: Driver<N>>(&mut self, req: Request<N>, driver: &mut D) -> Answer {
        match req {
            Request::Add { uid, info, netns, .. } => {
                if uid.is_empty() {
                    return Answer::Nack("add without a uid".into());
                }
                if !self.snapshot_done {
                    self.seen.insert(uid.clone());
                }
                let inode = netns.inode();
                match self.running.get(&uid) {
                    // The same sandbox again (agent restart, retried ADD): already served.
                    Some(&i) if i == inode => return Answer::Ack,
                    // A new sandbox for the same pod: replace.
                    Some(_) => {
                        driver.stop(&uid);
                        self.running.remove(&uid);
                    }
                    None => {}
                }
                match driver.start(&uid, info, netns) {
                    Ok(()) => {
                        self.running.insert(uid, inode);
                        Answer::Ack
                    }
                    Err(e) => Answer::Nack(format!("cannot serve pod {uid}: {e}")),
                }
            }
            Request::Keep { uid } => {
                if self.snapshot_done {
                    return Answer::ProtocolError(format!("keep for {uid} after the snapshot was complete"));
                }
                self.seen.insert(uid);
                Answer::Ack
            }
            Request::Del { uid } => {
                self.seen.remove(&uid);
                if self.running.remove(&uid).is_some() {
                    driver.stop(&uid);
                }
                Answer::Ack
            }
            Request::SnapshotSent => {
                if self.snapshot_done {
                    return Answer::ProtocolError("a second snapshot_sent on one connection".into());
                }
                self.snapshot_done = true;
                self.synced_once = true;
                let stale: Vec<String> = self.running.keys().filter(|u| !self.seen.contains(*u)).cloned().collect();
                for uid in stale {
                    self.running.remove(&uid);
                    driver.stop(&uid);
                }
                Answer::Ack
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Ns(u64);
    impl NetnsId for Ns {
        fn inode(&self) -> u64 {
            self.0
        }
    }

    #[derive(Default)]
    struct Fake {
        log: Vec<String>,
        fail: bool,
    }
    impl Driver<Ns> for Fake {
        fn start(&mut self, uid: &str, _: WorkloadInfo, n: Ns) -> Result<(), String> {
            if self.fail {
                return Err("no".into());
            }
            self.log.push(format!("start {uid}@{}", n.0));
            Ok(())
        }
        fn stop(&mut self, uid: &str) {
            self.log.push(format!("stop {uid}"));
        }
    }

    fn add(uid: &str, inode: u64) -> Request<Ns> {
        Request::Add { uid: uid.into(), info: WorkloadInfo::default(), netns: Ns(inode), return_listeners: false }
    }

    #[test]
    fn snapshot_reconciles_and_adds_are_idempotent() {
        let mut s = StateManager::default();
        let mut d = Fake::default();
        s.connection_opened();
        assert_eq!(s.handle(add("a", 1), &mut d), Answer::Ack);
        assert_eq!(s.handle(add("b", 2), &mut d), Answer::Ack);
        assert!(!s.synced());
        assert_eq!(s.handle(Request::SnapshotSent, &mut d), Answer::Ack);
        assert!(s.synced());
        // Reconnect: the agent only knows "a" (as Keep) and "c".
        s.connection_opened();
        assert_eq!(s.handle(Request::Keep { uid: "a".into() }, &mut d), Answer::Ack);
        assert_eq!(s.handle(add("c", 3), &mut d), Answer::Ack);
        assert_eq!(s.handle(Request::SnapshotSent, &mut d), Answer::Ack);
        assert_eq!(s.running(), vec!["a", "c"]);
        // Same netns again: nothing restarts; a new netns replaces.
        assert_eq!(s.handle(add("c", 3), &mut d), Answer::Ack);
        assert_eq!(s.handle(add("c", 4), &mut d), Answer::Ack);
        assert_eq!(d.log, vec!["start a@1", "start b@2", "start c@3", "stop b", "stop c", "start c@4"]);
    }

    #[test]
    fn protocol_errors_and_failures() {
        let mut s = StateManager::default();
        let mut d = Fake::default();
        s.connection_opened();
        assert_eq!(s.handle(Request::SnapshotSent, &mut d), Answer::Ack);
        assert!(matches!(s.handle(Request::SnapshotSent, &mut d), Answer::ProtocolError(_)));
        assert!(matches!(s.handle(Request::Keep { uid: "x".into() }, &mut d), Answer::ProtocolError(_)));
        assert_eq!(s.handle(Request::Del { uid: "never".into() }, &mut d), Answer::Ack);
        d.fail = true;
        assert!(matches!(s.handle(add("a", 1), &mut d), Answer::Nack(_)));
        assert!(s.running().is_empty());
        assert!(matches!(s.handle(add("", 1), &mut d), Answer::Nack(_)));
    }
}
