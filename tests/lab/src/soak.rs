//! `lab soak`: pods come and go for minutes or hours while traffic runs between the living ones and a fault
//! strikes every minute; at the end every promise is checked.
//!
//! - **Churn**: on each node, pods are created and deleted continuously. Most go as a runtime deletes them (CNI
//!   DEL, then the netns); some without a DEL, as when the runtime crashed (the netns goes; the runtime, back,
//!   sends its DEL later), some keep their netns after DEL for a while, and some have their netns removed while
//!   their CNI ADD runs.
//! - **Traffic**: on each node a client pod talks to the other node's server pod and to the other node's living
//!   churned pods: one long-lived connection, and new connections with random payloads, every byte checked.
//! - **Faults**, one per period, in turn: ztunnel SIGKILLed and restarted, the agent SIGKILLed and restarted, a
//!   rolling ztunnel upgrade (two processes at once), the primary CNI rewriting its conflist, the mesh file
//!   broken and then fixed, a push ztunnels must refuse.
//! - **Checks** ([`verdict`]): every failed operation falls in a fault's window (or targeted a pod being
//!   deleted); every living pod that should be captured is (rules, ip rule, agent record, ztunnel proxy);
//!   deleted pods left no rules in netns that outlived them and no record or proxy anywhere; the daemons' fds
//!   and threads are back to what they were with the same pods at the start; only TLS crossed the node link
//!   between pods for the whole run.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::demo::{APP_PORT, MESH_NS};
use crate::lab::{Lab, LabConfig, Pod};
use crate::net::{EchoClient, EchoServer};
use crate::netns::Netns;
use crate::util::wait_for;

/// How a soak runs.
#[derive(Debug, Clone)]
pub struct SoakOpts {
    /// How long the churn, traffic and faults run.
    pub duration: Duration,
    /// A fault every this often.
    pub fault_every: Duration,
    /// Churned pods living at once on each node, at most.
    pub pods_per_node: usize,
    /// Pause between two churn operations on one node.
    pub churn_pause: Duration,
    /// Capture the node link and prove only TLS crossed it.
    pub capture: bool,
    /// Seed of the run's choices.
    pub seed: u64,
}

impl Default for SoakOpts {
    fn default() -> Self {
        SoakOpts {
            duration: Duration::from_secs(300),
            fault_every: Duration::from_secs(60),
            pods_per_node: 12,
            churn_pause: Duration::from_millis(150),
            capture: true,
            seed: 0x5eed,
        }
    }
}

/// The kinds of fault, in the order they strike.
pub const FAULTS: &[&str] = &[
    "ztunnel-sigkill",
    "agent-sigkill",
    "ztunnel-rolling-upgrade",
    "primary-cni-rewrites-conflist",
    "mesh-file-broken",
    "bad-xds-push",
];

/// One fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    /// Its kind (one of [`FAULTS`]).
    pub kind: String,
    /// The node it struck.
    pub node: String,
    /// Seconds since the start when it struck.
    pub start_s: f64,
    /// Seconds since the start when everything was back (ready, chained, fixed).
    pub end_s: f64,
    /// Failed operations it accounts for.
    pub failures: usize,
    /// What went wrong carrying it out (the soak fails).
    pub error: Option<String>,
}

/// One failed operation.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// When it began and when it failed, in seconds since the start.
    pub span_s: (f64, f64),
    /// What it was (`connect`, `long-lived`, `create pod`, `publish`, …).
    pub what: String,
    /// The pod it targeted, if it was a churned one.
    pub target: Option<String>,
    /// The error.
    pub error: String,
}

/// A daemon's resources, with the same pods as at the start.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    /// `node1 agent`, `node2 ztunnel`, …
    pub daemon: String,
    /// Open fds at the start and at the end.
    pub fds: (usize, usize),
    /// Threads at the start and at the end.
    pub threads: (usize, usize),
}

/// What a soak observed; [`verdict`] judges it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Observations {
    /// Seconds it ran.
    pub seconds: f64,
    /// Faults.
    pub faults: Vec<Fault>,
    /// Failed operations.
    pub failures: Vec<Failure>,
    /// Operations that succeeded: connections, round trips on long-lived connections, pods created, deleted.
    pub ok: BTreeMap<String, u64>,
    /// Per churned pod that was deleted (uid): when its deletion began, in seconds since the start.
    pub deleted_at: BTreeMap<String, f64>,
    /// Pods that should be captured and are not, with what is missing.
    pub uncaptured: Vec<String>,
    /// Pods created while the conflist lacked ambit-cni: uncaptured by that fault, not by Ambit.
    pub created_unchained: Vec<String>,
    /// What deleted pods left behind (rules, ip rules, records, proxies).
    pub leftovers: Vec<String>,
    /// The daemons' fds and threads.
    pub usage: Vec<Usage>,
    /// The capture of the node link: the TLS proof, or why it failed.
    pub tls: Option<Result<crate::pcap::TlsProof, String>>,
    /// Packets between pods that were neither TCP nor expected (reported, not failed).
    pub other_protocols: BTreeMap<String, u64>,
}

/// Seconds after a fault's end in which a failure is still its doing (a connect started just before the end
/// waits out its timeout).
pub const GRACE_S: f64 = 6.0;
/// fds a daemon may hold beyond its count at the start with the same pods (a pooled connection, a log file
/// reopened); a leak per pod churned would be hundreds.
pub const FD_SLACK: usize = 8;
/// Threads likewise (a blocking-pool thread alive for a while).
pub const THREAD_SLACK: usize = 4;

/// Judges a soak: every broken promise, as a line; empty when it passed. Also fills in each fault's count of
/// the failures it accounts for.
pub fn verdict(o: &mut Observations) -> Vec<String> {
    let mut bad = Vec::new();
    for f in &mut o.faults {
        f.failures = 0;
    }
    for failure in &o.failures {
        let (a, b) = failure.span_s;
        let by_fault =
            o.faults.iter_mut().find(|f| a <= f.end_s + GRACE_S && b >= f.start_s - 0.5).map(|f| f.failures += 1);
        // A pod being deleted may fail whatever was talking to it.
        let by_deletion = failure.target.as_ref().and_then(|t| o.deleted_at.get(t)).is_some_and(|&at| b >= at - 0.5);
        if by_fault.is_none() && !by_deletion {
            bad.push(format!(
                "{} failed at {:.1}–{:.1} s, outside every fault window: {}",
                failure.what, a, b, failure.error
            ));
        }
    }
    for f in &o.faults {
        if let Some(e) = &f.error {
            bad.push(format!("fault {} on {} at {:.1} s did not recover: {e}", f.kind, f.node, f.start_s));
        }
    }
    bad.extend(o.uncaptured.iter().map(|u| format!("uncaptured: {u}")));
    bad.extend(o.leftovers.iter().map(|l| format!("left behind: {l}")));
    for u in &o.usage {
        if u.fds.1 > u.fds.0 + FD_SLACK {
            bad.push(format!(
                "{} leaks fds: {} at the start, {} at the end with the same pods",
                u.daemon, u.fds.0, u.fds.1
            ));
        }
        if u.threads.1 > u.threads.0 + THREAD_SLACK {
            bad.push(format!(
                "{} leaks threads: {} at the start, {} at the end with the same pods",
                u.daemon, u.threads.0, u.threads.1
            ));
        }
    }
    match &o.tls {
        Some(Err(e)) => bad.push(format!("the node link carried more than TLS: {e}")),
        Some(Ok(p)) if p.flows == 0 => bad.push("the capture of the node link saw no HBONE flow".into()),
        _ => {}
    }
    let succeeded: u64 = o.ok.iter().filter(|(k, _)| k.starts_with("connect")).map(|(_, v)| v).sum();
    if succeeded == 0 {
        bad.push("no connection succeeded".into());
    }
    bad
}

/// A small deterministic generator (xorshift64*), so a run's choices can be replayed from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// A churned pod the traffic may target.
struct Living {
    pod: Pod,
    echo: Option<EchoServer>,
    ready: bool,
}

/// What the threads share.
struct Shared {
    lab: RwLock<Lab>,
    t0: Instant,
    stop: AtomicBool,
    obs: Mutex<Observations>,
    /// Per node, its churned pods by uid.
    living: Vec<Mutex<BTreeMap<String, Living>>>,
    /// Pods deleted without a DEL: (node, pod, when), for the runtime's late DEL.
    orphans: Mutex<Vec<(usize, Pod, Instant)>>,
    /// Pods whose netns outlives their DEL until the end: checked for leftover rules then.
    kept_netns: Mutex<Vec<Pod>>,
    /// Set while a node's conflist lacks ambit-cni (by the fault that rewrites it).
    unchained: Vec<AtomicBool>,
    next_name: AtomicU64,
}

impl Shared {
    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn ok(&self, what: &str) {
        *self.obs.lock().unwrap().ok.entry(what.to_string()).or_default() += 1;
    }

    fn failed(&self, start: f64, what: &str, target: Option<&str>, error: impl std::fmt::Display) {
        let f = Failure {
            span_s: (start, self.now()),
            what: what.into(),
            target: target.map(str::to_string),
            error: format!("{error:#}"),
        };
        self.obs.lock().unwrap().failures.push(f);
    }
}

/// Runs a soak on a fresh two-node lab and returns what it observed (judge it with [`verdict`]).
/// `progress` gets a line now and then.
pub fn run(opts: &SoakOpts, progress: &mut dyn std::io::Write) -> anyhow::Result<Observations> {
    let lab = Lab::start(LabConfig { enrolled_namespaces: vec![MESH_NS.into()], ..Default::default() })?;
    let say = |out: &mut dyn std::io::Write, s: String| {
        let _ = writeln!(out, "{s}");
        let _ = out.flush();
    };
    // The anchors: on each node a client and a server that live for the whole run.
    let clients =
        [lab.add_pod_as(0, MESH_NS, "client-1", "client")?, lab.add_pod_as(1, MESH_NS, "client-2", "client")?];
    let servers =
        [lab.add_pod_as(0, MESH_NS, "server-1", "server")?, lab.add_pod_as(1, MESH_NS, "server-2", "server")?];
    let echoes = [
        EchoServer::start(&servers[0].netns, SocketAddr::new(servers[0].ip, APP_PORT))?,
        EchoServer::start(&servers[1].netns, SocketAddr::new(servers[1].ip, APP_PORT))?,
    ];
    let baseline = usage(&lab);
    let capture = if opts.capture {
        let file = lab.dir.join("node1-eth0.pcap");
        Some(crate::pcap::Capture::start_filtered(&lab.nodes[0].netns, "eth0", &file, "net 10.244.0.0/16")?)
    } else {
        None
    };
    say(progress, format!("lab {} up; soaking for {:?}, a fault every {:?}", lab.id, opts.duration, opts.fault_every));

    let shared = Arc::new(Shared {
        lab: RwLock::new(lab),
        t0: Instant::now(),
        stop: AtomicBool::new(false),
        obs: Mutex::new(Observations::default()),
        living: (0..2).map(|_| Mutex::new(BTreeMap::new())).collect(),
        orphans: Mutex::new(Vec::new()),
        kept_netns: Mutex::new(Vec::new()),
        unchained: (0..2).map(|_| AtomicBool::new(false)).collect(),
        next_name: AtomicU64::new(0),
    });

    let mut threads = Vec::new();
    for node in 0..2 {
        let (s, o) = (shared.clone(), opts.clone());
        threads.push(std::thread::spawn(move || churn(&s, node, &o)));
        let s = shared.clone();
        let (ns, target) = (clients[node].netns.name().to_string(), echoes[1 - node].addr());
        let seed = opts.seed ^ ((node as u64 + 1) * 0x9e37_79b9);
        threads.push(std::thread::spawn(move || traffic(&s, node, &ns, target, seed)));
    }

    // Faults, one per period, in turn; the last period runs without one, so the end is steady.
    let mut next = opts.fault_every;
    let mut i = 0;
    while shared.t0.elapsed() < opts.duration {
        std::thread::sleep(Duration::from_millis(200));
        if shared.t0.elapsed() >= next && shared.t0.elapsed() + opts.fault_every / 2 < opts.duration {
            let kind = FAULTS[i % FAULTS.len()];
            let node = (i / FAULTS.len()) % 2;
            let f = strike(&shared, kind, node);
            say(
                progress,
                format!(
                    "{:>6.1} s  {kind} on node{}: back after {:.1} s{}",
                    f.start_s,
                    node + 1,
                    f.end_s - f.start_s,
                    f.error.as_ref().map(|e| format!(" — FAILED: {e}")).unwrap_or_default()
                ),
            );
            shared.obs.lock().unwrap().faults.push(f);
            next += opts.fault_every;
            i += 1;
        }
        late_dels(&shared, Duration::from_secs(15));
    }
    shared.stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    say(progress, format!("{:>6.1} s  churn and traffic stopped; checking", shared.now()));

    let shared = Arc::try_unwrap(shared).map_err(|_| anyhow::anyhow!("a soak thread is still running"))?;
    let lab = shared.lab.into_inner().unwrap();
    let mut obs = shared.obs.into_inner().unwrap();
    obs.seconds = shared.t0.elapsed().as_secs_f64();
    let living: Vec<BTreeMap<String, Living>> = shared.living.into_iter().map(|m| m.into_inner().unwrap()).collect();

    // Every pod alive now that should be captured is, fully.
    let exempt: HashSet<String> = obs.created_unchained.iter().cloned().collect();
    for (node, pods) in living.iter().enumerate() {
        let dump = lab.nodes[node].config_dump().unwrap_or_default();
        let served: HashSet<String> = dump["ambit"]["inpod"]["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["uid"].as_str().map(str::to_string))
            .collect();
        for pod in clients.iter().chain(&servers).filter(|p| p.node == node).chain(pods.values().map(|l| &l.pod)) {
            if exempt.contains(&pod.uid) {
                continue;
            }
            let mut missing = Vec::new();
            if !pod.nft_ruleset().unwrap_or_default().contains("table inet ambit") {
                missing.push("nft table");
            }
            if !pod.netns.ip(&["rule", "show"]).unwrap_or_default().contains("0x111") {
                missing.push("ip rule");
            }
            if !lab.nodes[node].dir.join("state").join(format!("{}.json", pod.uid)).exists() {
                missing.push("agent record");
            }
            if !served.contains(&pod.uid) {
                missing.push("ztunnel proxy");
            }
            if !missing.is_empty() {
                obs.uncaptured.push(format!(
                    "{} ({}) on node{}: no {}",
                    pod.full_name(),
                    pod.uid,
                    node + 1,
                    missing.join(", no ")
                ));
            }
        }
    }
    // Delete every churned pod as a runtime does; the late DELs of the orphans run now.
    for (node, pods) in living.into_iter().enumerate() {
        for (_, l) in pods {
            drop(l.echo);
            if let Err(e) = lab.delete_pod(l.pod) {
                obs.leftovers.push(format!("deleting a pod on node{} at the end failed: {e:#}", node + 1));
            }
        }
    }
    for (node, pod, _) in shared.orphans.into_inner().unwrap() {
        late_del(&lab, node, &pod, &mut obs.leftovers);
    }
    // Deleted pods whose netns outlived the DEL hold no rules.
    for pod in shared.kept_netns.into_inner().unwrap() {
        let rules = pod.nft_ruleset().unwrap_or_default();
        if rules.contains("ambit") {
            obs.leftovers.push(format!("{}: nft rules in its netns after DEL", pod.full_name()));
        }
        if pod.netns.ip(&["rule", "show"]).unwrap_or_default().contains("0x111") {
            obs.leftovers.push(format!("{}: the policy routing rule in its netns after DEL", pod.full_name()));
        }
        let _ = pod.netns.delete();
    }
    // Only the anchors remain: the agents' records and ztunnels' proxies are exactly theirs.
    let anchors: Vec<&Pod> = clients.iter().chain(&servers).collect();
    for (node, n) in lab.nodes.iter().enumerate() {
        let mine: HashSet<String> =
            anchors.iter().filter(|p| p.node == node).map(|p| format!("{}.json", p.uid)).collect();
        let settled = wait_for(&format!("{}'s records and proxies to settle", n.name), Duration::from_secs(15), || {
            let records: HashSet<String> = n
                .state_files()
                .iter()
                .filter_map(|p| p.file_name())
                .map(|f| f.to_string_lossy().into_owned())
                .collect();
            let served = n.config_dump().ok()?["ambit"]["inpod"]["pods"].as_array()?.len();
            (records == mine && served == mine.len()).then_some(())
        });
        if settled.is_err() {
            let records: Vec<String> = n
                .state_files()
                .iter()
                .filter_map(|p| p.file_name())
                .map(|f| f.to_string_lossy().into_owned())
                .filter(|r| !mine.contains(r))
                .collect();
            let proxies: Vec<String> = n.config_dump().unwrap_or_default()["ambit"]["inpod"]["pods"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| !anchors.iter().any(|a| p["uid"] == a.uid.as_str()))
                .map(|p| p["name"].to_string())
                .collect();
            obs.leftovers.push(format!(
                "{}: agent records {records:?}, ztunnel proxies {proxies:?} of pods that are gone",
                n.name
            ));
        }
    }
    // Same pods as at the start: the same fds and threads (after connections have wound down).
    std::thread::sleep(Duration::from_secs(3));
    let now = usage(&lab);
    obs.usage = baseline
        .into_iter()
        .zip(now)
        .map(|((daemon, f0, t0), (_, f1, t1))| Usage { daemon, fds: (f0, f1), threads: (t0, t1) })
        .collect();
    if let Some(c) = capture {
        match c.finish_all() {
            Ok((segments, others)) => {
                obs.tls = Some(crate::pcap::only_tls(&segments, ambit_proto::zds::INBOUND_HBONE_PORT));
                obs.other_protocols = others;
            }
            Err(e) => obs.tls = Some(Err(format!("reading the capture: {e:#}"))),
        }
    }
    drop(echoes);
    // A failed run keeps the daemons' logs (the lab's directory goes with the lab).
    if !verdict(&mut obs.clone()).is_empty() {
        let keep = std::env::temp_dir().join(format!("ambit-soak-logs-{}", lab.id));
        let _ = std::fs::create_dir_all(&keep);
        for n in &lab.nodes {
            for f in ["agent.log", "ztunnel.log", "ztunnel-surge.log", "cni.log"] {
                let _ = std::fs::copy(n.dir.join(f), keep.join(format!("{}-{f}", n.name)));
            }
        }
        let _ = std::fs::copy(lab.dir.join("cp/control-plane.log"), keep.join("control-plane.log"));
        say(progress, format!("the daemons' logs are kept in {}", keep.display()));
    }
    Ok(obs)
}

/// Each daemon's (name, fds, threads).
fn usage(lab: &Lab) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    for n in &lab.nodes {
        for (what, p) in [("agent", &n.agent), ("ztunnel", &n.ztunnel)] {
            let pid = p.as_ref().map(|p| p.pid()).unwrap_or(0);
            let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
            let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("Threads:").and_then(|v| v.trim().parse().ok()))
                .unwrap_or(0);
            out.push((format!("{} {what}", n.name), fds, threads));
        }
    }
    out
}

/// The runtime, back after a crash, sends the DEL it never sent for the orphans older than `after`; by then the
/// agent must have dropped them on its own.
fn late_dels(s: &Shared, after: Duration) {
    let due: Vec<(usize, Pod, Instant)> = {
        let mut o = s.orphans.lock().unwrap();
        let (due, keep) = std::mem::take(&mut *o).into_iter().partition(|(_, _, t)| t.elapsed() >= after);
        *o = keep;
        due
    };
    if due.is_empty() {
        return;
    }
    let lab = s.lab.read().unwrap();
    let mut leftovers = Vec::new();
    for (node, pod, _) in due {
        late_del(&lab, node, &pod, &mut leftovers);
    }
    s.obs.lock().unwrap().leftovers.extend(leftovers);
}

fn late_del(lab: &Lab, node: usize, pod: &Pod, leftovers: &mut Vec<String>) {
    let n = &lab.nodes[node];
    if n.dir.join("state").join(format!("{}.json", pod.uid)).exists() {
        leftovers.push(format!("{}: the agent still records it long after its netns went", pod.full_name()));
    }
    if n.config_dump()
        .ok()
        .and_then(|d| d["ambit"]["inpod"]["pods"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .any(|p| p["uid"] == pod.uid.as_str())
    {
        leftovers.push(format!("{}: ztunnel still serves it long after its netns went", pod.full_name()));
    }
    if let Err(e) = lab.cni_del(pod) {
        leftovers.push(format!("{}: the runtime's late DEL failed: {e}", pod.full_name()));
    }
}

/// Strikes one fault and waits until the node is whole again. The lab's write lock is held only to swap a
/// process, so churn goes on throughout (pods added during an upgrade go to the newest ztunnel).
fn strike(s: &Shared, kind: &str, node: usize) -> Fault {
    let mut start_s = s.now();
    let res = (|| -> anyhow::Result<()> {
        match kind {
            "ztunnel-sigkill" => {
                {
                    let mut lab = s.lab.write().unwrap();
                    start_s = s.now();
                    lab.kill_ztunnel(node);
                    lab.start_ztunnel(node)?;
                }
                let lab = s.lab.read().unwrap();
                lab.wait_ready(node)?;
                lab.wait_agent_ready(node)
            }
            "agent-sigkill" => {
                {
                    let mut lab = s.lab.write().unwrap();
                    start_s = s.now();
                    lab.kill_agent(node);
                    lab.spawn_agent(node)?;
                }
                s.lab.read().unwrap().wait_agent_ready(node)
            }
            "ztunnel-rolling-upgrade" => rolling_upgrade(s, node),
            "primary-cni-rewrites-conflist" => {
                let lab = s.lab.read().unwrap();
                s.unchained[node].store(true, Ordering::SeqCst);
                let r = lab.primary_cni_rewrites_conflist(node);
                s.unchained[node].store(false, Ordering::SeqCst);
                r.map(|_| ())
            }
            "mesh-file-broken" => s.lab.read().unwrap().break_mesh_file_for(Duration::from_secs(5)),
            "bad-xds-push" => {
                let lab = s.lab.read().unwrap();
                let cp = lab.control_plane();
                cp.set_faults(&crate::controlplane::Faults {
                    xds_push: Some("bad-address".into()),
                    ..Default::default()
                })?;
                // Both ztunnels refuse it and keep serving; then the fault is cleared.
                std::thread::sleep(Duration::from_secs(3));
                cp.set_faults(&crate::controlplane::Faults::default())
            }
            other => anyhow::bail!("unknown fault {other}"),
        }
    })();
    let lab = s.lab.read().unwrap();
    Fault {
        kind: kind.into(),
        node: lab.nodes[node].name.clone(),
        start_s,
        end_s: s.now(),
        failures: 0,
        error: res.err().map(|e| format!("{e:#}")),
    }
}

/// A rolling upgrade of node `node`'s ztunnel as a DaemonSet with surge does it, twice over so the node ends
/// with a ztunnel on the usual ports: a second ztunnel starts beside the first, both connected to the agent,
/// the first is told to drain (SIGTERM) and leaves; then the same again back to one on the usual ports.
fn rolling_upgrade(s: &Shared, node: usize) -> anyhow::Result<()> {
    let connected = |n: f64| {
        let lab = s.lab.read().unwrap();
        wait_for(&format!("{n} ztunnel(s) connected to the agent"), Duration::from_secs(30), || {
            let (_, m) = lab.agent_get(node, "/metrics").ok()?;
            (crate::util::metric(&m, "ambit_agent_ztunnel_connections", &[]) == n).then_some(())
        })
    };
    let mut surge = s.lab.read().unwrap().spawn_extra_ztunnel(node, 100, "ztunnel-surge.log")?;
    connected(2.0)?;
    let old = s.lab.write().unwrap().nodes[node].ztunnel.take();
    if let Some(mut old) = old {
        old.stop(Duration::from_secs(30));
    }
    connected(1.0)?;
    s.lab.write().unwrap().start_ztunnel(node)?;
    s.lab.read().unwrap().wait_ready(node)?;
    connected(2.0)?;
    surge.stop(Duration::from_secs(30));
    connected(1.0)
}

/// Creates and deletes pods on `node` until told to stop.
fn churn(s: &Shared, node: usize, opts: &SoakOpts) {
    let mut rng = Rng::new(opts.seed ^ (0x51 + node as u64));
    while !s.stop.load(Ordering::Relaxed) {
        std::thread::sleep(opts.churn_pause);
        let count = s.living[node].lock().unwrap().len();
        let create = count == 0 || (count < opts.pods_per_node && rng.below(100) < 55);
        if create {
            create_one(s, node, &mut rng);
        } else {
            delete_one(s, node, &mut rng);
        }
    }
}

fn create_one(s: &Shared, node: usize, rng: &mut Rng) {
    let name = format!("churn-{}", s.next_name.fetch_add(1, Ordering::Relaxed));
    let start = s.now();
    let unchained_before = s.unchained[node].load(Ordering::SeqCst);
    // One in ten has its netns removed while its ADD runs.
    let pull = rng.below(10) == 0;
    let delay = Duration::from_millis(rng.below(120));
    let lab = s.lab.read().unwrap();
    let res = lab.create_pod_with(node, MESH_NS, &name, "churn", |ns: &Netns| {
        if pull {
            let name = ns.name().to_string();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                let _ = std::process::Command::new("ip").args(["netns", "delete", &name]).output();
            });
        }
    });
    let unchained = unchained_before || s.unchained[node].load(Ordering::SeqCst);
    match res {
        Err(e) if pull => {
            // Expected: the ADD found its netns gone (or the primary did). Nothing may stay behind; the runtime
            // has already sent its DEL. Counted, not failed.
            let _ = e;
            s.ok("create pod (netns pulled, ADD failed)");
        }
        Err(e) => s.failed(start, "create pod", None, e),
        Ok(pod) if pull => {
            // The ADD won the race; the netns is gone now: this is a pod deleted without a DEL.
            s.ok("create pod (netns pulled after ADD)");
            s.orphans.lock().unwrap().push((node, pod, Instant::now()));
        }
        Ok(pod) => {
            if unchained {
                s.obs.lock().unwrap().created_unchained.push(pod.uid.clone());
            }
            s.ok("create pod");
            let echo = EchoServer::start(&pod.netns, SocketAddr::new(pod.ip, APP_PORT));
            let published = lab.publish(&pod);
            let ready = echo.is_ok() && published.is_ok() && !unchained;
            if let Err(e) = &published {
                s.failed(start, "publish", Some(&pod.uid), e);
            }
            if let Err(e) = &echo {
                s.failed(start, "echo server", Some(&pod.uid), e);
            }
            s.living[node].lock().unwrap().insert(pod.uid.clone(), Living { pod, echo: echo.ok(), ready });
        }
    }
}

fn delete_one(s: &Shared, node: usize, rng: &mut Rng) {
    let victim = {
        let living = s.living[node].lock().unwrap();
        if living.is_empty() {
            return;
        }
        let k = rng.below(living.len() as u64) as usize;
        living.keys().nth(k).cloned()
    };
    let Some(uid) = victim else { return };
    let start = s.now();
    s.obs.lock().unwrap().deleted_at.insert(uid.clone(), start);
    let Some(l) = s.living[node].lock().unwrap().remove(&uid) else { return };
    drop(l.echo);
    let lab = s.lab.read().unwrap();
    match rng.below(100) {
        // As a runtime deletes a pod.
        0..65 => match lab.delete_pod(l.pod) {
            Ok(()) => s.ok("delete pod"),
            Err(e) => s.failed(start, "delete pod", Some(&uid), e),
        },
        // The runtime crashed: the netns goes, no DEL (the runtime sends it once it is back).
        65..85 => {
            let _ = lab.unpublish(&l.pod);
            let _ = std::process::Command::new("ip").args(["netns", "delete", l.pod.netns.name()]).output();
            s.ok("delete pod without DEL");
            s.orphans.lock().unwrap().push((node, l.pod, Instant::now()));
        }
        // DEL, and the netns outlives it (checked for leftover rules at the end).
        _ => match lab.cni_del(&l.pod) {
            Ok(()) => {
                let _ = lab.unpublish(&l.pod);
                s.ok("delete pod (netns kept)");
                s.kept_netns.lock().unwrap().push(l.pod);
            }
            Err(e) => s.failed(start, "delete pod (netns kept)", Some(&uid), e),
        },
    }
}

/// From the client pod on `node`: a long-lived connection to `anchor` with a round trip every pass, and a new
/// connection every pass to the anchor or to a living churned pod of the other node, until told to stop.
fn traffic(s: &Shared, node: usize, ns_name: &str, anchor: SocketAddr, seed: u64) {
    let mut rng = Rng::new(seed);
    let Ok(ns) = Netns::open(ns_name) else { return };
    let timeout = Duration::from_secs(5);
    let mut long: Option<EchoClient> = None;
    let mut long_since = s.now();
    while !s.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        // The long-lived connection.
        let start = s.now();
        if long.is_none() {
            long_since = start;
            match EchoClient::connect(&ns, anchor, timeout) {
                Ok(c) => long = Some(c),
                Err(e) => s.failed(start, "connect (long-lived)", None, e),
            }
        }
        if let Some(c) = long.as_mut() {
            let payload = payload(&mut rng, 64);
            match c.round_trip(&payload) {
                Ok(()) => s.ok("round trip (long-lived)"),
                Err(e) => {
                    s.failed(long_since.max(start - 1.0), "round trip (long-lived)", None, e);
                    long = None;
                }
            }
        }
        // A new connection.
        let target = {
            let living = s.living[1 - node].lock().unwrap();
            let ready: Vec<(&String, &Living)> = living.iter().filter(|(_, l)| l.ready).collect();
            match rng.below(ready.len() as u64 + 1) as usize {
                0 => None,
                k => Some((ready[k - 1].0.clone(), SocketAddr::new(ready[k - 1].1.pod.ip, APP_PORT))),
            }
        };
        let (uid, addr) = match &target {
            Some((uid, addr)) => (Some(uid.as_str()), *addr),
            None => (None, anchor),
        };
        let start = s.now();
        let payload = payload(&mut rng, 4096);
        match EchoClient::connect(&ns, addr, timeout).and_then(|mut c| c.round_trip(&payload)) {
            Ok(()) => s.ok(if uid.is_some() { "connect (churned pod)" } else { "connect (anchor)" }),
            Err(e) => s.failed(start, "connect", uid, e),
        }
    }
}

fn payload(rng: &mut Rng, max: u64) -> Vec<u8> {
    let n = 1 + rng.below(max) as usize;
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

/// The report: a table of faults and what they cost, the totals, and every broken promise.
pub fn report(o: &Observations, broken: &[String], out: &mut dyn std::io::Write) {
    let _ = writeln!(out, "\nfaults ({} in {:.0} s):", o.faults.len(), o.seconds);
    let _ = writeln!(out, "  {:<32} {:<6} {:>9} {:>12} {:>9}", "fault", "node", "at (s)", "recovery (s)", "failures");
    for f in &o.faults {
        let _ = writeln!(
            out,
            "  {:<32} {:<6} {:>9.1} {:>12.1} {:>9}",
            f.kind,
            f.node,
            f.start_s,
            f.end_s - f.start_s,
            f.failures
        );
    }
    let _ = writeln!(out, "operations that succeeded:");
    for (k, v) in &o.ok {
        let _ = writeln!(out, "  {k:<40} {v}");
    }
    let _ = writeln!(
        out,
        "failed operations: {} (each inside a fault window or aimed at a pod being deleted, unless listed below)",
        o.failures.len()
    );
    for f in o.failures.iter().take(40) {
        let _ = writeln!(
            out,
            "  {:>7.1}–{:<7.1} {}{}: {}",
            f.span_s.0,
            f.span_s.1,
            f.what,
            f.target.as_ref().map(|t| format!(" → {t}")).unwrap_or_default(),
            f.error.lines().next().unwrap_or_default()
        );
    }
    if !o.created_unchained.is_empty() {
        let _ =
            writeln!(out, "pods created while the primary's conflist lacked ambit-cni: {}", o.created_unchained.len());
    }
    for u in &o.usage {
        let _ = writeln!(
            out,
            "  {:<16} fds {} → {}, threads {} → {}",
            u.daemon, u.fds.0, u.fds.1, u.threads.0, u.threads.1
        );
    }
    match &o.tls {
        Some(Ok(p)) => {
            let _ = writeln!(
                out,
                "node link: {} HBONE flows, {} TLS records ({} application data), nothing else between pods",
                p.flows, p.records, p.application_data
            );
        }
        Some(Err(e)) => {
            let _ = writeln!(out, "node link: {e}");
        }
        None => {}
    }
    if !o.other_protocols.is_empty() {
        let _ = writeln!(out, "other protocols between pods on the node link (reported): {:?}", o.other_protocols);
    }
    if broken.is_empty() {
        let _ = writeln!(out, "PASS: nothing lost, nothing leaked");
    } else {
        let _ = writeln!(out, "FAIL: {} broken promise(s):", broken.len());
        for b in broken {
            let _ = writeln!(out, "  - {b}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean() -> Observations {
        let mut o = Observations {
            seconds: 120.0,
            faults: vec![Fault {
                kind: "ztunnel-sigkill".into(),
                node: "node1".into(),
                start_s: 60.0,
                end_s: 61.5,
                failures: 0,
                error: None,
            }],
            tls: Some(Ok(crate::pcap::TlsProof { flows: 3, records: 100, application_data: 90 })),
            usage: vec![Usage { daemon: "node1 ztunnel".into(), fds: (40, 44), threads: (6, 6) }],
            ..Default::default()
        };
        o.ok.insert("connect (anchor)".into(), 500);
        o.failures.push(Failure {
            span_s: (60.2, 60.3),
            what: "round trip (long-lived)".into(),
            target: None,
            error: "reset".into(),
        });
        o
    }

    #[test]
    fn a_clean_run_passes_and_failures_are_accounted_to_their_fault() {
        let mut o = clean();
        assert_eq!(verdict(&mut o), Vec::<String>::new());
        assert_eq!(o.faults[0].failures, 1);
        // A connect that began just before the fault ended and timed out after it is the fault's.
        o.failures.push(Failure {
            span_s: (61.0, 66.0),
            what: "connect".into(),
            target: None,
            error: "timed out".into(),
        });
        assert!(verdict(&mut o).is_empty());
        // A failure aimed at a pod being deleted is fine.
        o.deleted_at.insert("uid-1".into(), 90.0);
        o.failures.push(Failure {
            span_s: (89.9, 90.1),
            what: "connect".into(),
            target: Some("uid-1".into()),
            error: "refused".into(),
        });
        assert!(verdict(&mut o).is_empty());
    }

    #[test]
    fn every_broken_promise_fails_the_soak() {
        // Each of these alone must fail it (checked one at a time, on purpose).
        type Breaks = Box<dyn Fn(&mut Observations)>;
        let cases: Vec<(&str, Breaks)> = vec![
            (
                "outside every fault window",
                Box::new(|o| {
                    o.failures.push(Failure {
                        span_s: (100.0, 100.1),
                        what: "connect".into(),
                        target: None,
                        error: "reset".into(),
                    })
                }),
            ),
            (
                "outside every fault window",
                Box::new(|o| {
                    o.failures.push(Failure {
                        span_s: (80.0, 80.1),
                        what: "connect".into(),
                        target: Some("uid-2".into()),
                        error: "reset".into(),
                    })
                }),
            ),
            ("did not recover", Box::new(|o| o.faults[0].error = Some("not ready".into()))),
            ("uncaptured", Box::new(|o| o.uncaptured.push("mesh/churn-3: no nft table".into()))),
            ("left behind", Box::new(|o| o.leftovers.push("node1: agent records [x]".into()))),
            ("leaks fds", Box::new(|o| o.usage[0].fds = (40, 40 + FD_SLACK + 1))),
            ("leaks threads", Box::new(|o| o.usage[0].threads = (6, 6 + THREAD_SLACK + 1))),
            ("more than TLS", Box::new(|o| o.tls = Some(Err("plaintext".into())))),
            ("no HBONE flow", Box::new(|o| o.tls = Some(Ok(Default::default())))),
            ("no connection succeeded", Box::new(|o| o.ok.clear())),
        ];
        for (want, breaks) in cases {
            let mut o = clean();
            breaks(&mut o);
            let bad = verdict(&mut o);
            assert_eq!(bad.len(), 1, "{want}: {bad:?}");
            assert!(bad[0].contains(want), "{want}: {bad:?}");
        }
    }

    #[test]
    fn the_generator_is_deterministic() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        assert!((0..100).all(|_| a.next_u64() == b.next_u64()));
        assert!((0..1000).all(|_| a.below(10) < 10));
    }
}
