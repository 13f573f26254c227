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
    /// Why a pod could not be served (its text goes back in the nack).
    type Error: std::fmt::Display;
    /// Starts serving a pod; an error is answered as a nack.
    fn start(&mut self, uid: &str, info: WorkloadInfo, netns: N) -> Result<(), Self::Error>;
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
    #[cfg(test)]
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
        type Error = String;
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

/// Property test: random request sequences across reconnects against a reference model; the driver never
/// starts a pod twice or stops one it did not start, and what runs is what the model says.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[derive(Debug, Clone)]
    enum Op {
        Reconnect,
        Add(u8, u64, bool),
        Keep(u8),
        Del(u8),
        SnapshotSent,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => Just(Op::Reconnect),
            4 => (0u8..4, 1u64..3, proptest::bool::weighted(0.15)).prop_map(|(u, i, f)| Op::Add(u, i, f)),
            2 => (0u8..4).prop_map(Op::Keep),
            2 => (0u8..4).prop_map(Op::Del),
            2 => Just(Op::SnapshotSent),
        ]
    }

    struct Ns(u64);
    impl NetnsId for Ns {
        fn inode(&self) -> u64 {
            self.0
        }
    }

    /// A driver that checks it is used sensibly.
    #[derive(Default)]
    struct Strict {
        running: BTreeSet<String>,
        fail_next: bool,
        misuse: Vec<String>,
    }
    impl Driver<Ns> for Strict {
        type Error = String;
        fn start(&mut self, uid: &str, _: WorkloadInfo, _: Ns) -> Result<(), String> {
            if std::mem::take(&mut self.fail_next) {
                return Err("refused".into());
            }
            if !self.running.insert(uid.to_string()) {
                self.misuse.push(format!("started {uid} twice"));
            }
            Ok(())
        }
        fn stop(&mut self, uid: &str) {
            if !self.running.remove(uid) {
                self.misuse.push(format!("stopped {uid}, which was not running"));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::testing::proptest_cases()))]

        #[test]
        fn the_state_manager_follows_the_model(ops in proptest::collection::vec(op(), 1..60)) {
            let (mut s, mut d) = (StateManager::default(), Strict::default());
            // The model.
            let (mut running, mut seen, mut done): (BTreeMap<String, u64>, BTreeSet<String>, bool) = Default::default();
            s.connection_opened();
            for op in ops {
                let (answer, want) = match op.clone() {
                    Op::Reconnect => {
                        s.connection_opened();
                        seen.clear();
                        done = false;
                        continue;
                    }
                    Op::Add(u, inode, fail) => {
                        let uid = format!("p{u}");
                        if !done {
                            seen.insert(uid.clone());
                        }
                        let want = if running.get(&uid) == Some(&inode) {
                            Answer::Ack
                        } else if fail {
                            running.remove(&uid);
                            Answer::Nack(String::new())
                        } else {
                            running.insert(uid.clone(), inode);
                            Answer::Ack
                        };
                        d.fail_next = fail;
                        let req = Request::Add { uid, info: WorkloadInfo::default(), netns: Ns(inode), return_listeners: false };
                        let a = s.handle(req, &mut d);
                        d.fail_next = false;
                        (a, want)
                    }
                    Op::Keep(u) => {
                        let want = if done { Answer::ProtocolError(String::new()) } else { seen.insert(format!("p{u}")); Answer::Ack };
                        (s.handle(Request::Keep { uid: format!("p{u}") }, &mut d), want)
                    }
                    Op::Del(u) => {
                        seen.remove(&format!("p{u}"));
                        running.remove(&format!("p{u}"));
                        (s.handle(Request::Del { uid: format!("p{u}") }, &mut d), Answer::Ack)
                    }
                    Op::SnapshotSent => {
                        let want = if done {
                            Answer::ProtocolError(String::new())
                        } else {
                            done = true;
                            running.retain(|u, _| seen.contains(u));
                            Answer::Ack
                        };
                        (s.handle(Request::SnapshotSent, &mut d), want)
                    }
                };
                let kind = |a: &Answer| std::mem::discriminant(a);
                prop_assert_eq!(kind(&answer), kind(&want), "{:?}: got {:?}", op, answer);
                prop_assert!(d.misuse.is_empty(), "{:?}", d.misuse);
                prop_assert_eq!(s.running(), running.keys().cloned().collect::<Vec<_>>());
                prop_assert_eq!(d.running.iter().cloned().collect::<Vec<_>>(), s.running());
            }
        }
    }
}
