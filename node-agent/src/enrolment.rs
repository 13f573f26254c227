//! Enrolment as a state machine without I/O: which pods the agent holds, which ztunnels are connected, who
//! holds each pod's listening sockets, and what must happen next.
//!
//! Events go in ([`Event`]: a CNI ADD whose netns is open, its rules applied, ztunnel's answer, a forget,
//! a ztunnel connecting or going away, a pod restored from its record); commands come out ([`Command`]:
//! apply or remove rules in a netns, send a ZDS message, save or drop a record, answer). The async shell
//! (`crate::agent`) carries the commands out and feeds their results back; it also owns the descriptors the
//! machine refers to by netns inode, and keeps exactly those the machine still names ([`Node::holds_netns`],
//! [`Node::holds_listeners`]).
//!
//! The shell runs one flow per pod at a time (a per-pod lock); the machine relies on that and on nothing
//! else, so its tests below drive every ordering of ADD, DEL, ztunnel restart and agent restart without root.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;

use ambit_proto::cni_api::Outcome;

use crate::error::EnrolError;
use crate::pods::PodRecord;
use crate::rules::InpodConfig;

/// A network namespace, by inode (unique while a handle holds it open).
pub type Inode = u64;
/// A ztunnel connection; larger is newer.
pub type ConnId = u64;

/// Who holds a pod's listening sockets (15001, 15006, 15008).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listeners {
    /// The agent holds them, bound in this netns, and gives copies to every ztunnel that takes them, so a
    /// restarting ztunnel never leaves the pod without a listener.
    Held {
        /// The netns they were bound in.
        netns: Inode,
    },
    /// The agent holds none: ztunnel has them (the agent restarted, and asks the next ztunnel that takes
    /// listeners to send them back) or binds its own (a ztunnel without the handoff extension, such as Istio's).
    WithZtunnel,
}

/// What the machine knows about an enrolled pod.
#[derive(Debug)]
pub struct PodState {
    /// Its record (as saved on disk).
    pub record: PodRecord,
    /// Its netns, held open by the shell; `None` for a pod restored without it (Kubernetes mode).
    pub netns: Option<Inode>,
    /// Its listeners.
    pub listeners: Listeners,
    /// An enrolment waiting for ztunnel's answer, with the state it replaced.
    flight: Option<Flight>,
}

#[derive(Debug)]
struct Flight {
    previous: Option<Box<PodState>>,
}

/// An enrolment between its ADD and its rules.
#[derive(Debug)]
struct Pending {
    record: PodRecord,
    bind: bool,
}

/// A connected ztunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn {
    /// Its number.
    pub id: ConnId,
    /// Whether it takes listeners from the agent (Ambit's ZDS extension).
    pub handoff: bool,
}

/// Why a ZDS message is sent, echoed back in [`Event::Answered`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// An enrolment waits for it (the caller awaits the answer inline).
    Enrol,
    /// A snapshot entry: only listeners sent back matter, for the pod in this netns.
    Snapshot {
        /// The netns the entry named.
        netns: Inode,
    },
}

/// Which listeners go with a ZDS Add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// Copies of the listeners the agent holds, bound in this netns.
    Pass {
        /// The netns they were bound in.
        netns: Inode,
    },
    /// None, and ztunnel is asked to send back the ones it serves the pod from.
    AskBack,
    /// None: this ztunnel binds its own.
    Own,
}

/// A ZDS message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Serve the pod in this netns.
    Add {
        /// The pod's UID.
        uid: String,
        /// Its netns (the fd goes with the message).
        netns: Inode,
        /// Its listeners.
        attach: Attach,
    },
    /// Keep serving a pod the agent has no netns for.
    Keep {
        /// The pod's UID.
        uid: String,
    },
    /// The snapshot is complete.
    SnapshotSent,
}

/// Something that happened.
#[derive(Debug)]
pub enum Event {
    /// A pod is to be enrolled; its netns is open (inode in the record) and the decision is made.
    Add {
        /// The pod's record.
        record: PodRecord,
    },
    /// [`Command::ApplyRules`] finished (with the listeners bound if asked, offered to the shell's store).
    RulesApplied {
        /// The pod's UID.
        uid: String,
        /// The result.
        result: Result<(), EnrolError>,
    },
    /// ztunnel answered a [`Command::Send`] that had a purpose (or it failed: nack, timeout, disconnect).
    Answered {
        /// The pod's UID.
        uid: String,
        /// Why it was sent.
        purpose: Purpose,
        /// Whether the ack carried listeners (already offered to the shell's store), or why it failed.
        result: Result<bool, EnrolError>,
    },
    /// Drop a pod: ztunnel told, record dropped, and with `remove_rules` its rules taken out.
    Forget {
        /// The pod's UID.
        uid: String,
        /// Whether to remove its rules (an un-enrolled pod keeps running; a deleted one takes its netns along).
        remove_rules: bool,
    },
    /// A ztunnel said hello.
    Connected(Conn),
    /// A ztunnel went away.
    Disconnected(ConnId),
    /// A pod from a previous run's record, with its netns if found again.
    Restored {
        /// Its record.
        record: PodRecord,
        /// Its netns, if the shell opened it.
        netns: Option<Inode>,
    },
    /// The agent is removing Ambit from the node: refuse new enrolments.
    Stopping,
}

/// Something the shell must do, in order.
#[derive(Debug)]
pub enum Command {
    /// Add the pod to the node's probe SNAT set (concurrently with the rest of its enrolment).
    ProbeAdd {
        /// The pod's UID.
        uid: String,
        /// Its IPs.
        ips: Vec<IpAddr>,
    },
    /// Take the pod out of the node's probe SNAT set.
    ProbeRemove {
        /// The pod's UID.
        uid: String,
        /// Its IPs.
        ips: Vec<IpAddr>,
    },
    /// Install the pod's rules and routing in its netns, and bind its listeners there if `bind`; answer with
    /// [`Event::RulesApplied`].
    ApplyRules {
        /// The pod's UID.
        uid: String,
        /// Its netns.
        netns: Inode,
        /// Its rules.
        cfg: InpodConfig,
        /// Whether to bind listeners.
        bind: bool,
    },
    /// Remove the pod's rules and routing from its netns (failures are logged).
    RemoveRules {
        /// The pod's UID.
        uid: String,
        /// Its netns.
        netns: Inode,
        /// Its rules.
        cfg: InpodConfig,
    },
    /// Send a message on one connection; with a purpose, feed the answer back as [`Event::Answered`].
    Send {
        /// The connection.
        conn: ConnId,
        /// The message.
        msg: Msg,
        /// Why, if the answer matters.
        purpose: Option<Purpose>,
    },
    /// Send ZDS Del for the pod on every one of these connections and wait for their answers (which are only
    /// logged).
    DelEverywhere {
        /// The connections.
        conns: Vec<ConnId>,
        /// The pod's UID.
        uid: String,
    },
    /// Write the pod's record.
    SaveRecord(PodRecord),
    /// Delete the pod's record.
    DropRecord(String),
    /// Answer the request that started this flow.
    Reply(Result<Outcome, EnrolError>),
}

/// The agent's enrolment state.
#[derive(Debug)]
pub struct Node {
    host_netns: Inode,
    zds_socket: PathBuf,
    stopping: bool,
    pods: BTreeMap<String, PodState>,
    pending: BTreeMap<String, Pending>,
    conns: Vec<Conn>,
}

fn pod_name(r: &PodRecord) -> String {
    format!("{}/{}", r.namespace, r.name)
}

impl Node {
    /// An empty node; `host_netns` is the node's own netns (never a pod's), `zds_socket` is named in errors.
    pub fn new(host_netns: Inode, zds_socket: PathBuf) -> Node {
        Node {
            host_netns,
            zds_socket,
            stopping: false,
            pods: BTreeMap::new(),
            pending: BTreeMap::new(),
            conns: Vec::new(),
        }
    }

    /// Takes one event; returns what to do, in order.
    pub fn handle(&mut self, ev: Event) -> Vec<Command> {
        let mut out = Vec::new();
        match ev {
            Event::Add { record } => self.add(record, &mut out),
            Event::RulesApplied { uid, result } => self.rules_applied(uid, result, &mut out),
            Event::Answered { uid, purpose: Purpose::Enrol, result } => self.enrol_answered(uid, result, &mut out),
            Event::Answered { uid, purpose: Purpose::Snapshot { netns }, result } => {
                if let (Ok(true), Some(p)) = (result, self.pods.get_mut(&uid))
                    && p.listeners == Listeners::WithZtunnel
                    && p.netns == Some(netns)
                {
                    p.listeners = Listeners::Held { netns };
                }
            }
            Event::Forget { uid, remove_rules } => self.forget(&uid, remove_rules, &mut out),
            Event::Connected(conn) => self.connected(conn, &mut out),
            Event::Disconnected(id) => self.conns.retain(|c| c.id != id),
            Event::Restored { record, netns } => {
                let uid = record.uid.clone();
                self.pods.insert(uid, PodState { record, netns, listeners: Listeners::WithZtunnel, flight: None });
            }
            Event::Stopping => self.stopping = true,
        }
        out
    }

    fn add(&mut self, record: PodRecord, out: &mut Vec<Command>) {
        if self.stopping {
            return out.push(Command::Reply(Err(EnrolError::Stopping)));
        }
        if record.netns_inode == self.host_netns {
            return out.push(Command::Reply(Err(EnrolError::HostNetns(record.netns_path))));
        }
        // Fresh listeners only for a netns nobody serves yet (a pod new to the agent, or a new sandbox of it).
        // For the same netns the agent keeps what it holds, and for a pod restored without its netns it asks
        // ztunnel for the live ones: never a second listener beside a live one.
        let bind = match self.pods.get(&record.uid).map(|p| p.netns) {
            None => true,
            Some(None) => false,
            Some(Some(inode)) => inode != record.netns_inode,
        };
        let uid = record.uid.clone();
        out.push(Command::ProbeAdd { uid: uid.clone(), ips: record.ips.clone() });
        out.push(Command::ApplyRules { uid: uid.clone(), netns: record.netns_inode, cfg: record.inpod_config(), bind });
        self.pending.insert(uid, Pending { record, bind });
    }

    fn rules_applied(&mut self, uid: String, result: Result<(), EnrolError>, out: &mut Vec<Command>) {
        let Some(Pending { record, bind }) = self.pending.remove(&uid) else { return };
        let fail = |node: &Node, out: &mut Vec<Command>, e: EnrolError| {
            node.undo_probe(&uid, record.ips.clone(), out);
            out.push(Command::Reply(Err(e)));
        };
        if let Err(e) = result {
            return fail(self, out, e);
        }
        let Some(conn) = self.newest() else {
            // Fail closed: the rules stay (traffic is black-holed, never leaked) until the runtime retries.
            let e = EnrolError::NoZtunnel { pod: pod_name(&record), socket: self.zds_socket.clone() };
            return fail(self, out, e);
        };
        let netns = record.netns_inode;
        // The state this replaces stays aside until ztunnel answers, so that a failure can put it back.
        let mut previous = self.pods.remove(&uid);
        let mut listeners = if bind {
            Listeners::Held { netns }
        } else {
            previous
                .as_mut()
                .map(|p| std::mem::replace(&mut p.listeners, Listeners::WithZtunnel))
                .unwrap_or(Listeners::WithZtunnel)
        };
        if !conn.handoff {
            // This ztunnel binds its own listeners: ours must not sit beside them unaccepted.
            listeners = Listeners::WithZtunnel;
        }
        let attach = attach(listeners, conn.handoff);
        out.push(Command::Send {
            conn: conn.id,
            msg: Msg::Add { uid: uid.clone(), netns, attach },
            purpose: Some(Purpose::Enrol),
        });
        let flight = Some(Flight { previous: previous.map(Box::new) });
        self.pods.insert(uid, PodState { record, netns: Some(netns), listeners, flight });
    }

    fn enrol_answered(&mut self, uid: String, result: Result<bool, EnrolError>, out: &mut Vec<Command>) {
        let Some(pod) = self.pods.get_mut(&uid) else {
            return out.push(Command::Reply(Err(EnrolError::Superseded(uid))));
        };
        let Some(flight) = pod.flight.take() else {
            return out.push(Command::Reply(Err(EnrolError::Superseded(uid))));
        };
        match result {
            Ok(returned) => {
                if returned
                    && pod.listeners == Listeners::WithZtunnel
                    && let Some(netns) = pod.netns
                {
                    pod.listeners = Listeners::Held { netns };
                }
                out.push(Command::SaveRecord(pod.record.clone()));
                out.push(Command::Reply(Ok(Outcome::Enrolled)));
            }
            Err(e) => {
                // A pod new to the agent is forgotten so that a retry starts clean; one it already held (restored,
                // or a retried ADD) goes back to how it was. The rules stay: the runtime tears the sandbox down.
                let failed = self.pods.remove(&uid).expect("looked up above");
                let ips = failed.record.ips.clone();
                if let Some(mut prev) = flight.previous.map(|b| *b) {
                    let same = prev.netns == failed.netns;
                    if prev.listeners == Listeners::WithZtunnel && (same || prev.netns.is_none()) {
                        prev.listeners = failed.listeners;
                    }
                    self.pods.insert(uid.clone(), prev);
                }
                self.undo_probe(&uid, ips, out);
                out.push(Command::Reply(Err(e)));
            }
        }
    }

    /// Takes a failed enrolment's addresses out of the probe set, and puts back those of the pod it held
    /// before, if any (the same address may be in both).
    fn undo_probe(&self, uid: &str, ips: Vec<IpAddr>, out: &mut Vec<Command>) {
        out.push(Command::ProbeRemove { uid: uid.to_string(), ips });
        if let Some(p) = self.pods.get(uid) {
            out.push(Command::ProbeAdd { uid: uid.to_string(), ips: p.record.ips.clone() });
        }
    }

    fn forget(&mut self, uid: &str, remove_rules: bool, out: &mut Vec<Command>) {
        if let Some(pod) = self.pods.remove(uid) {
            if !self.conns.is_empty() {
                let conns = self.conns.iter().map(|c| c.id).collect();
                out.push(Command::DelEverywhere { conns, uid: uid.to_string() });
            }
            out.push(Command::DropRecord(uid.to_string()));
            out.push(Command::ProbeRemove { uid: uid.to_string(), ips: pod.record.ips.clone() });
            if let (true, Some(netns)) = (remove_rules, pod.netns) {
                out.push(Command::RemoveRules { uid: uid.to_string(), netns, cfg: pod.record.inpod_config() });
            }
        }
        out.push(Command::Reply(Ok(Outcome::Ok)));
    }

    fn connected(&mut self, conn: Conn, out: &mut Vec<Command>) {
        // The snapshot: every pod in UID order, then SnapshotSent. The connection joins the set in the same step,
        // so every later change reaches it after its snapshot.
        for (uid, pod) in &mut self.pods {
            if !conn.handoff {
                pod.listeners = Listeners::WithZtunnel;
            }
            let (msg, purpose) = match pod.netns {
                Some(netns) => (
                    Msg::Add { uid: uid.clone(), netns, attach: attach(pod.listeners, conn.handoff) },
                    Some(Purpose::Snapshot { netns }),
                ),
                None => (Msg::Keep { uid: uid.clone() }, None),
            };
            out.push(Command::Send { conn: conn.id, msg, purpose });
        }
        out.push(Command::Send { conn: conn.id, msg: Msg::SnapshotSent, purpose: None });
        self.conns.push(conn);
    }

    fn newest(&self) -> Option<Conn> {
        self.conns.iter().max_by_key(|c| c.id).copied()
    }

    /// The node's own netns, never a pod's.
    pub fn host_netns(&self) -> Inode {
        self.host_netns
    }

    /// The connected ztunnels.
    pub fn conns(&self) -> &[Conn] {
        &self.conns
    }

    /// The enrolled pods, by UID (including one whose enrolment waits for ztunnel).
    pub fn pods(&self) -> impl Iterator<Item = &PodState> {
        self.pods.values()
    }

    /// How many pods are enrolled.
    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// The namespace/name of a pod enrolled or being enrolled.
    pub fn pod_name(&self, uid: &str) -> Option<String> {
        let record = self.pending.get(uid).map(|p| &p.record).or_else(|| self.pods.get(uid).map(|p| &p.record));
        record.map(pod_name)
    }

    /// One enrolled pod.
    pub fn pod(&self, uid: &str) -> Option<&PodState> {
        self.pods.get(uid)
    }

    /// The UID of an enrolled pod by namespace and name.
    pub fn uid_of(&self, namespace: &str, name: &str) -> Option<String> {
        self.pods
            .values()
            .find(|p| p.record.namespace == namespace && p.record.name == name)
            .map(|p| p.record.uid.clone())
    }

    /// Whether a pod must be (re-)enrolled from outside a CNI ADD: unknown, or held without its netns.
    pub fn needs_enrolment(&self, uid: &str) -> bool {
        self.pods.get(uid).is_none_or(|p| p.netns.is_none())
    }

    /// Which pod a CNI DEL removes: the pod with this UID unless the DEL is for an older sandbox of it (another
    /// container id), else the pod of that sandbox, if any.
    pub fn del_target(&self, uid: &str, container_id: &str) -> Option<String> {
        match self.pods.get(uid) {
            Some(p) if !container_id.is_empty() && p.record.container_id != container_id => None,
            Some(_) => Some(uid.to_string()),
            None => self.pods.values().find(|p| p.record.container_id == container_id).map(|p| p.record.uid.clone()),
        }
    }

    /// The pods whose sandbox the runtime no longer knows (CNI GC).
    pub fn stale(&self, valid: &HashSet<&str>) -> Vec<String> {
        self.pods
            .values()
            .filter(|p| !valid.contains(p.record.container_id.as_str()))
            .map(|p| p.record.uid.clone())
            .collect()
    }

    /// Whether the machine still names this pod's netns handle (the shell closes any other).
    pub fn holds_netns(&self, uid: &str, netns: Inode) -> bool {
        self.pending.get(uid).is_some_and(|p| p.record.netns_inode == netns)
            || self.pods.get(uid).is_some_and(|p| {
                p.netns == Some(netns)
                    || p.flight.as_ref().and_then(|f| f.previous.as_ref()).is_some_and(|prev| prev.netns == Some(netns))
            })
    }

    /// Whether the machine still names this pod's listeners bound in `netns` (the shell closes any other).
    pub fn holds_listeners(&self, uid: &str, netns: Inode) -> bool {
        let held = Listeners::Held { netns };
        self.pods.get(uid).is_some_and(|p| {
            p.listeners == held
                || p.flight.as_ref().and_then(|f| f.previous.as_ref()).is_some_and(|prev| prev.listeners == held)
        })
    }
}

fn attach(listeners: Listeners, handoff: bool) -> Attach {
    match (listeners, handoff) {
        (Listeners::Held { netns }, true) => Attach::Pass { netns },
        (Listeners::WithZtunnel, true) => Attach::AskBack,
        (_, false) => Attach::Own,
    }
}

#[cfg(test)]
mod tests {
    //! The machine against a model of the world: a fake shell that keeps rules, records, probe entries and
    //! descriptors as the agent does, and ztunnels that serve pods as Ambit's and Istio's do. Every sequence
    //! of ADD, DEL, ztunnel restart, upgrade and nack, and agent restart up to a length is run, and after each
    //! step the promises are checked.

    use std::collections::{BTreeMap, BTreeSet, VecDeque};

    use super::*;

    /// A listener set's identity: who bound it.
    type SetId = u32;

    #[derive(Debug, Clone)]
    struct Served {
        netns: Inode,
        set: Option<SetId>,
    }

    #[derive(Debug, Clone)]
    struct Ztunnel {
        handoff: bool,
        nack_next: bool,
        serving: BTreeMap<String, Served>,
        snapshot: Option<BTreeSet<String>>,
    }

    impl Ztunnel {
        fn new(handoff: bool) -> Ztunnel {
            Ztunnel { handoff, nack_next: false, serving: BTreeMap::new(), snapshot: Some(BTreeSet::new()) }
        }
    }

    struct World {
        node: Node,
        next_conn: ConnId,
        next_set: SetId,
        /// ztunnel processes by the connection they use now.
        ztunnels: BTreeMap<ConnId, Ztunnel>,
        rules: BTreeSet<(String, Inode)>,
        records: BTreeMap<String, PodRecord>,
        probes: BTreeSet<String>,
        /// The shell's descriptors.
        netns_open: BTreeSet<(String, Inode)>,
        listeners: BTreeMap<(String, Inode), SetId>,
        /// Sandboxes that exist (their netns), by pod.
        sandboxes: BTreeMap<String, Inode>,
        fail_rules: bool,
    }

    const HOST: Inode = 1;

    fn record(pod: &str, netns: Inode) -> PodRecord {
        PodRecord {
            uid: pod.into(),
            namespace: "ns".into(),
            name: pod.into(),
            service_account: "sa".into(),
            container_id: format!("sandbox-{netns}"),
            netns_path: format!("/var/run/netns/{netns}").into(),
            ips: vec![IpAddr::from([10, 0, 0, (netns % 250) as u8])],
            netns_inode: netns,
        }
    }

    impl World {
        fn new() -> World {
            World {
                node: Node::new(HOST, "/run/ztunnel/ztunnel.sock".into()),
                next_conn: 0,
                next_set: 0,
                ztunnels: BTreeMap::new(),
                rules: BTreeSet::new(),
                records: BTreeMap::new(),
                probes: BTreeSet::new(),
                netns_open: BTreeSet::new(),
                listeners: BTreeMap::new(),
                sandboxes: BTreeMap::new(),
                fail_rules: false,
            }
        }

        fn set(&mut self) -> SetId {
            self.next_set += 1;
            self.next_set
        }

        /// Feeds an event and carries out what follows, as the shell does, until the machine answers.
        fn run(&mut self, ev: Event) -> Option<Result<Outcome, EnrolError>> {
            let mut queue: VecDeque<Command> = self.step(ev).into();
            while let Some(cmd) = queue.pop_front() {
                let next = match cmd {
                    Command::ProbeAdd { uid, .. } => {
                        self.probes.insert(uid);
                        None
                    }
                    Command::ProbeRemove { uid, .. } => {
                        self.probes.remove(&uid);
                        None
                    }
                    Command::ApplyRules { uid, netns, bind, .. } => {
                        assert!(self.netns_open.contains(&(uid.clone(), netns)), "rules for a netns not held");
                        let result = if self.fail_rules {
                            Err(EnrolError::RulesMissing(format!("/var/run/netns/{netns}").into()))
                        } else {
                            self.rules.insert((uid.clone(), netns));
                            // Binding fresh listeners where live ones exist would split connections onto them.
                            let live = self.listeners.contains_key(&(uid.clone(), netns))
                                || self
                                    .ztunnels
                                    .values()
                                    .any(|z| z.serving.get(&uid).is_some_and(|s| s.netns == netns));
                            assert!(!bind || !live, "{uid}: fresh listeners bound beside live ones");
                            if bind {
                                let s = self.set();
                                self.listeners.insert((uid.clone(), netns), s);
                            }
                            Ok(())
                        };
                        Some(Event::RulesApplied { uid, result })
                    }
                    Command::RemoveRules { uid, netns, .. } => {
                        self.rules.remove(&(uid, netns));
                        None
                    }
                    Command::Send { conn, msg, purpose } => self.deliver(conn, msg, purpose),
                    Command::DelEverywhere { conns, uid } => {
                        for c in conns {
                            if let Some(z) = self.ztunnels.get_mut(&c) {
                                z.serving.remove(&uid);
                            }
                        }
                        None
                    }
                    Command::SaveRecord(r) => {
                        self.records.insert(r.uid.clone(), r);
                        None
                    }
                    Command::DropRecord(uid) => {
                        self.records.remove(&uid);
                        None
                    }
                    Command::Reply(r) => {
                        assert!(queue.is_empty(), "commands after the reply: {queue:?}");
                        return Some(r);
                    }
                };
                if let Some(ev) = next {
                    queue.extend(self.step(ev));
                }
            }
            None
        }

        fn step(&mut self, ev: Event) -> Vec<Command> {
            let cmds = self.node.handle(ev);
            // The shell closes what the machine no longer names; it may only ever name what the shell holds.
            let node = &self.node;
            self.netns_open.retain(|(u, n)| node.holds_netns(u, *n));
            self.listeners.retain(|(u, n), _| node.holds_listeners(u, *n));
            for p in self.node.pods() {
                if let Listeners::Held { netns } = p.listeners {
                    assert!(self.listeners.contains_key(&(p.record.uid.clone(), netns)), "names listeners not held");
                }
            }
            cmds
        }

        /// A ztunnel takes one message (as Ambit's and Istio's do: Add binds its own listeners when none come).
        fn deliver(&mut self, conn: ConnId, msg: Msg, purpose: Option<Purpose>) -> Option<Event> {
            let Some(z) = self.ztunnels.get_mut(&conn) else {
                let Msg::Add { uid, .. } = msg else { return None };
                let source = crate::zds::ZdsError::Disconnected("gone".into());
                return purpose.map(|purpose| Event::Answered {
                    uid,
                    purpose,
                    result: Err(EnrolError::Handoff { pod: String::new(), source }),
                });
            };
            match msg {
                Msg::Add { uid, netns, attach } => {
                    // (A nack models a refused ADD; snapshot entries are not refused here.)
                    if purpose == Some(Purpose::Enrol) && std::mem::take(&mut z.nack_next) {
                        let source = crate::zds::ZdsError::Nack("no".into());
                        return purpose.map(|purpose| Event::Answered {
                            uid,
                            purpose,
                            result: Err(EnrolError::Handoff { pod: String::new(), source }),
                        });
                    }
                    if let Some(s) = &mut z.snapshot {
                        s.insert(uid.clone());
                    }
                    let kept = z.serving.get(&uid).filter(|s| s.netns == netns).and_then(|s| s.set);
                    let set = match attach {
                        Attach::Pass { netns: at } => {
                            assert!(z.handoff, "listeners passed to a ztunnel that binds its own");
                            assert_eq!(at, netns, "listeners of another netns passed");
                            Some(self.listeners[&(uid.clone(), at)])
                        }
                        Attach::AskBack | Attach::Own => Some(kept.unwrap_or_else(|| {
                            self.next_set += 1;
                            self.next_set
                        })),
                    };
                    z.serving.insert(uid.clone(), Served { netns, set });
                    let returned = attach == Attach::AskBack;
                    if returned {
                        self.listeners.entry((uid.clone(), netns)).or_insert(set.unwrap());
                    }
                    purpose.map(|purpose| Event::Answered { uid, purpose, result: Ok(returned) })
                }
                Msg::Keep { uid } => {
                    if let Some(s) = &mut z.snapshot {
                        s.insert(uid);
                    }
                    None
                }
                Msg::SnapshotSent => {
                    let named = z.snapshot.take().expect("one snapshot per connection");
                    z.serving.retain(|uid, _| named.contains(uid));
                    None
                }
            }
        }

        fn connect(&mut self, z: Ztunnel) {
            self.next_conn += 1;
            let id = self.next_conn;
            let handoff = z.handoff;
            self.ztunnels.insert(id, z);
            assert!(self.run(Event::Connected(Conn { id, handoff })).is_none());
        }

        fn newest(&self) -> Option<ConnId> {
            self.ztunnels.keys().next_back().copied()
        }

        // The operations the tests combine.

        fn add(&mut self, pod: &str, netns: Inode) -> Result<Outcome, EnrolError> {
            self.sandboxes.insert(pod.into(), netns);
            self.netns_open.insert((pod.into(), netns));
            self.run(Event::Add { record: record(pod, netns) }).expect("an ADD is answered")
        }

        fn del(&mut self, pod: &str) {
            let Some(netns) = self.sandboxes.remove(pod) else { return };
            if let Some(uid) = self.node.del_target(pod, &format!("sandbox-{netns}")) {
                assert_eq!(self.run(Event::Forget { uid, remove_rules: true }).unwrap().unwrap(), Outcome::Ok);
            }
            // The runtime removes the netns after the DEL; rules inside go with it.
            self.rules.retain(|(u, n)| !(u == pod && *n == netns));
        }

        fn ztunnel_restart(&mut self, handoff: bool) {
            for id in std::mem::take(&mut self.ztunnels).into_keys() {
                self.run(Event::Disconnected(id));
            }
            self.connect(Ztunnel::new(handoff));
        }

        /// A second ztunnel starts beside the newest (a rolling upgrade); the old one leaves later.
        fn upgrade(&mut self, handoff: bool) {
            self.connect(Ztunnel::new(handoff));
        }

        fn oldest_leaves(&mut self) {
            if self.ztunnels.len() > 1 {
                let (id, _) = self.ztunnels.pop_first().unwrap();
                self.run(Event::Disconnected(id));
            }
        }

        /// The agent dies and comes back: its descriptors are gone, its records and the ztunnels are not; each
        /// ztunnel reconnects.
        fn agent_restart(&mut self) {
            self.node = Node::new(HOST, "/run/ztunnel/ztunnel.sock".into());
            self.netns_open.clear();
            self.listeners.clear();
            let records: Vec<PodRecord> = self.records.values().cloned().collect();
            for r in records {
                if self.sandboxes.get(&r.uid) == Some(&r.netns_inode) {
                    self.netns_open.insert((r.uid.clone(), r.netns_inode));
                    let netns = Some(r.netns_inode);
                    self.run(Event::Restored { record: r, netns });
                } else {
                    self.records.remove(&r.uid);
                }
            }
            for (_, mut z) in std::mem::take(&mut self.ztunnels) {
                z.snapshot = Some(BTreeSet::new());
                self.connect(z);
            }
        }

        /// The promises, checked when no flow is under way.
        fn check(&self, trace: &[Op]) {
            let held: BTreeMap<&str, &PodState> = self.node.pods().map(|p| (p.record.uid.as_str(), p)).collect();
            // What is on disk is what is held; what is held is captured in its current netns.
            assert_eq!(
                self.records.keys().map(String::as_str).collect::<Vec<_>>(),
                held.keys().copied().collect::<Vec<_>>(),
                "{trace:?}"
            );
            for (uid, p) in &held {
                let netns = p.netns.expect("standalone pods keep their netns");
                assert!(self.rules.contains(&(uid.to_string(), netns)), "{uid} held without rules: {trace:?}");
                assert!(self.probes.contains(*uid), "{uid} held without its probe entry: {trace:?}");
            }
            for (id, z) in &self.ztunnels {
                // No ztunnel serves a pod the agent let go.
                for uid in z.serving.keys() {
                    assert!(held.contains_key(uid.as_str()), "conn {id} still serves {uid}: {trace:?}");
                }
                // A ztunnel that takes listeners serves every pod from one; one that binds its own never gets ours.
                for (uid, s) in &z.serving {
                    assert!(s.set.is_some(), "conn {id} serves {uid} without listeners: {trace:?}");
                }
                if !z.handoff {
                    assert!(self.listeners.is_empty() || self.ztunnels.values().any(|z| z.handoff), "{trace:?}");
                }
            }
            // The newest ztunnel serves every held pod, in its current netns.
            if let Some(newest) = self.newest() {
                let z = &self.ztunnels[&newest];
                for (uid, p) in &held {
                    let s = z.serving.get(*uid).unwrap_or_else(|| panic!("newest ztunnel lacks {uid}: {trace:?}"));
                    assert_eq!(Some(s.netns), p.netns, "{uid} served in an old netns: {trace:?}");
                }
            }
            // Never a listener nobody accepts from beside a live one: when a ztunnel serves the pod in the netns
            // of a set the agent holds, some ztunnel accepts from that set. (With no ztunnel at all, the held set
            // is what keeps connections waiting in its queue until one comes.)
            for ((uid, netns), set) in &self.listeners {
                let users: Vec<Option<SetId>> = self
                    .ztunnels
                    .values()
                    .filter_map(|z| z.serving.get(uid).filter(|s| s.netns == *netns).map(|s| s.set))
                    .collect();
                assert!(
                    users.is_empty() || users.contains(&Some(*set)),
                    "{uid}: the agent holds listeners no ztunnel accepts from beside live ones: {trace:?}"
                );
            }
            // Descriptors: only what the machine names, and all of it.
            for (uid, p) in &held {
                assert!(self.netns_open.contains(&(uid.to_string(), p.netns.unwrap())), "{trace:?}");
            }
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Op {
        /// ADD of the pod's current sandbox again (a retried ADD), or its first.
        Add,
        /// ADD of a new sandbox of the pod.
        NewSandbox,
        /// The next Add the newest ztunnel gets is nacked.
        NackNext,
        Del,
        ZtunnelRestart,
        IstioZtunnel,
        Upgrade,
        OldLeaves,
        AgentRestart,
        RulesFail,
    }

    const OPS: [Op; 10] = [
        Op::Add,
        Op::NewSandbox,
        Op::NackNext,
        Op::Del,
        Op::ZtunnelRestart,
        Op::IstioZtunnel,
        Op::Upgrade,
        Op::OldLeaves,
        Op::AgentRestart,
        Op::RulesFail,
    ];

    fn apply(w: &mut World, op: Op, trace: &[Op]) {
        let pod = "pod-a";
        match op {
            Op::Add | Op::NewSandbox => {
                let netns = match (op, w.sandboxes.get(pod)) {
                    (Op::Add, Some(n)) => *n,
                    (_, n) => n.map_or(10, |n| n + 1),
                };
                let had = w.node.pod(pod).map(|p| (p.netns, p.listeners));
                let expected_ok = w.newest().is_some_and(|z| !w.ztunnels[&z].nack_next) && !w.fail_rules;
                let r = w.add(pod, netns);
                assert_eq!(r.is_ok(), expected_ok, "{r:?}: {trace:?}");
                if r.is_err() {
                    // Failed: the pod is as it was (or unknown if it was), and the runtime will drop the sandbox.
                    assert_eq!(w.node.pod(pod).map(|p| (p.netns, p.listeners)), had, "{trace:?}");
                    w.sandboxes.remove(pod);
                    if let Some((Some(old), _)) = had {
                        w.sandboxes.insert(pod.into(), old);
                    }
                    w.rules.retain(|(u, n)| !(u == pod && *n == netns) || had.is_some_and(|h| h.0 == Some(netns)));
                }
                w.fail_rules = false;
            }
            Op::NackNext => {
                if let Some(id) = w.newest() {
                    w.ztunnels.get_mut(&id).unwrap().nack_next = true;
                }
            }
            Op::Del => w.del(pod),
            Op::ZtunnelRestart => w.ztunnel_restart(true),
            Op::IstioZtunnel => w.ztunnel_restart(false),
            Op::Upgrade => w.upgrade(true),
            Op::OldLeaves => w.oldest_leaves(),
            Op::AgentRestart => w.agent_restart(),
            Op::RulesFail => w.fail_rules = true,
        }
    }

    /// A compact rendering of commands, for the tables below.
    fn show(cmds: &[Command]) -> Vec<String> {
        cmds.iter()
            .map(|c| match c {
                Command::ProbeAdd { uid, .. } => format!("probe+ {uid}"),
                Command::ProbeRemove { uid, .. } => format!("probe- {uid}"),
                Command::ApplyRules { uid, netns, bind, .. } => format!("rules {uid}@{netns} bind={bind}"),
                Command::RemoveRules { uid, netns, .. } => format!("unrules {uid}@{netns}"),
                Command::Send { conn, msg, purpose } => format!("send {conn} {msg:?} {purpose:?}"),
                Command::DelEverywhere { conns, uid } => format!("broadcast {conns:?} Del {{ uid: {uid:?} }}"),
                Command::SaveRecord(r) => format!("save {}", r.uid),
                Command::DropRecord(uid) => format!("drop {uid}"),
                Command::Reply(Ok(o)) => format!("reply {o:?}"),
                Command::Reply(Err(e)) => format!("reply {:?}", e.code()),
            })
            .collect()
    }

    #[test]
    fn an_enrolment_step_by_step() {
        let mut n = Node::new(HOST, "/s".into());
        let cases: Vec<(Event, Vec<&str>)> = vec![
            // No ztunnel yet: the rules go in, then the ADD fails (and is retried by the runtime).
            (Event::Add { record: record("p", 7) }, vec!["probe+ p", "rules p@7 bind=true"]),
            (Event::RulesApplied { uid: "p".into(), result: Ok(()) }, vec!["probe- p", "reply TryAgainLater"]),
            (Event::Connected(Conn { id: 1, handoff: true }), vec!["send 1 SnapshotSent None"]),
            // The retry: fresh listeners, passed to ztunnel with the netns.
            (Event::Add { record: record("p", 7) }, vec!["probe+ p", "rules p@7 bind=true"]),
            (
                Event::RulesApplied { uid: "p".into(), result: Ok(()) },
                vec![r#"send 1 Add { uid: "p", netns: 7, attach: Pass { netns: 7 } } Some(Enrol)"#],
            ),
            (
                Event::Answered { uid: "p".into(), purpose: Purpose::Enrol, result: Ok(false) },
                vec!["save p", "reply Enrolled"],
            ),
            // ztunnel restarts: the snapshot passes the same listeners again.
            (Event::Disconnected(1), vec![]),
            (
                Event::Connected(Conn { id: 2, handoff: true }),
                vec![
                    r#"send 2 Add { uid: "p", netns: 7, attach: Pass { netns: 7 } } Some(Snapshot { netns: 7 })"#,
                    "send 2 SnapshotSent None",
                ],
            ),
            // A retried ADD of the same sandbox binds nothing new.
            (Event::Add { record: record("p", 7) }, vec!["probe+ p", "rules p@7 bind=false"]),
            (
                Event::RulesApplied { uid: "p".into(), result: Ok(()) },
                vec![r#"send 2 Add { uid: "p", netns: 7, attach: Pass { netns: 7 } } Some(Enrol)"#],
            ),
            (
                Event::Answered { uid: "p".into(), purpose: Purpose::Enrol, result: Ok(false) },
                vec!["save p", "reply Enrolled"],
            ),
            // Istio's ztunnel replaces it: the agent lets its listeners go, and sends none.
            (Event::Disconnected(2), vec![]),
            (
                Event::Connected(Conn { id: 3, handoff: false }),
                vec![
                    r#"send 3 Add { uid: "p", netns: 7, attach: Own } Some(Snapshot { netns: 7 })"#,
                    "send 3 SnapshotSent None",
                ],
            ),
            // DEL: every ztunnel told first, then the record, the probe entry and the rules.
            (
                Event::Forget { uid: "p".into(), remove_rules: true },
                vec![r#"broadcast [3] Del { uid: "p" }"#, "drop p", "probe- p", "unrules p@7", "reply Ok"],
            ),
            (Event::Forget { uid: "p".into(), remove_rules: true }, vec!["reply Ok"]),
        ];
        for (i, (ev, want)) in cases.into_iter().enumerate() {
            let label = format!("{i}: {ev:?}");
            assert_eq!(show(&n.handle(ev)), want, "{label}");
        }
        assert_eq!(n.pod_count(), 0);
        assert!(!n.holds_netns("p", 7) && !n.holds_listeners("p", 7));
    }

    #[test]
    fn restored_pods_take_their_listeners_back_and_refusals() {
        let mut n = Node::new(HOST, "/s".into());
        n.handle(Event::Restored { record: record("p", 7), netns: Some(7) });
        n.handle(Event::Restored { record: record("q", 8), netns: None });
        assert!(n.needs_enrolment("q") && !n.needs_enrolment("p") && n.needs_enrolment("r"));
        // A restarted agent asks ztunnel for the live listeners of the pod it holds, and Keep for the one
        // whose netns it lost.
        let cmds = n.handle(Event::Connected(Conn { id: 1, handoff: true }));
        assert_eq!(
            show(&cmds),
            vec![
                r#"send 1 Add { uid: "p", netns: 7, attach: AskBack } Some(Snapshot { netns: 7 })"#,
                r#"send 1 Keep { uid: "q" } None"#,
                "send 1 SnapshotSent None",
            ]
        );
        // Listeners sent back for another netns are not kept; for this one they are.
        n.handle(Event::Answered { uid: "p".into(), purpose: Purpose::Snapshot { netns: 6 }, result: Ok(true) });
        assert_eq!(n.pod("p").unwrap().listeners, Listeners::WithZtunnel);
        n.handle(Event::Answered { uid: "p".into(), purpose: Purpose::Snapshot { netns: 7 }, result: Ok(true) });
        assert_eq!(n.pod("p").unwrap().listeners, Listeners::Held { netns: 7 });
        assert!(n.holds_listeners("p", 7));
        // The controller finds q's netns: listeners are asked back, never bound beside ztunnel's.
        assert_eq!(show(&n.handle(Event::Add { record: record("q", 8) })), vec!["probe+ q", "rules q@8 bind=false"]);
        // A DEL for an older sandbox leaves the pod alone; GC names the pods whose sandbox is unknown.
        assert_eq!(n.del_target("p", "sandbox-6"), None);
        assert_eq!(n.del_target("p", "sandbox-7").as_deref(), Some("p"));
        assert_eq!(n.del_target("container-x", "sandbox-7").as_deref(), Some("p"));
        assert_eq!(n.del_target("container-x", "sandbox-9"), None);
        assert_eq!(n.stale(&["sandbox-7"].into_iter().collect()), vec!["q".to_string()]);
        // The node's own netns and an agent that is uninstalling refuse.
        let host = PodRecord { netns_inode: HOST, ..record("h", 1) };
        assert_eq!(show(&n.handle(Event::Add { record: host })), vec!["reply InvalidNetns"]);
        n.handle(Event::Stopping);
        assert_eq!(show(&n.handle(Event::Add { record: record("r", 9) })), vec!["reply TryAgainLater"]);
    }

    #[test]
    fn every_ordering_keeps_every_promise() {
        // A bystander pod enrolled first must come through every sequence untouched.
        fn run(trace: &mut Vec<Op>, depth: usize, runs: &mut usize) {
            let mut w = World::new();
            w.connect(Ztunnel::new(true));
            assert_eq!(w.add("bystander", 5).unwrap(), Outcome::Enrolled);
            for i in 0..trace.len() {
                apply(&mut w, trace[i], &trace[..=i]);
                w.check(&trace[..=i]);
                // Clear a nack nobody consumed, so the next sequence starts clean (the world is rebuilt anyway).
            }
            assert!(w.node.pod("bystander").is_some(), "{trace:?}");
            *runs += 1;
            if depth == 0 {
                return;
            }
            for op in OPS {
                trace.push(op);
                run(trace, depth - 1, runs);
                trace.pop();
            }
        }
        let mut runs = 0;
        run(&mut Vec::new(), 5, &mut runs);
        assert_eq!(runs, (0..=5).map(|d| OPS.len().pow(d)).sum::<usize>());
    }
}
