//! Gathering the facts `debug` judges. Every step is bounded in time; a step that fails or times out says so in
//! the report instead of failing the whole run. Nothing here changes the node, except `repair`, which asks the
//! agent to.
//!
//! How capture is proven without sending traffic off the node:
//! - *outbound*: from inside the pod's netns, an ordinary (unmarked) TCP socket with a TTL (hop limit) of 1
//!   connects to the pod's gateway, which is the node itself, on [`DEBUG_PROBE_PORT`]. Captured, it lands on
//!   15001; the pod's own socket table shows the accepted end with the probe's address as its peer. Ambit's
//!   ztunnel closes such a connection without dialing; Istio's dials the gateway, which is the node. Uncaptured,
//!   the SYN reaches the node at most, and with a TTL of 1 it can go no further.
//! - *inbound*: from the node's netns, a TCP connection to the pod's IP on [`DEBUG_PROBE_PORT`], with the mark
//!   the node's probe SNAT leaves alone ([`DEBUG_PROBE_MARK`]), so it arrives as any client's connection does.
//!   Captured, it lands on 15006, where the pod's socket table shows it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_proto::cni_api::{self, PodRef, Request};
use ambit_proto::zds::{DEBUG_PROBE_PORT, INBOUND_PLAINTEXT_PORT, INPOD_PORTS, OUTBOUND_PORT};
use serde_json::Value;

use super::{Agent, Check, Enrolment, NodePod, NodeReport, PodId, PodReport, Rules, Socket, Target, Ztunnel};
use crate::config::{Config, Mode};
use crate::pods::PodRecord;
use crate::rules::{self, Backend, Family, Flavor, InpodConfig, apply};

/// How `debug` runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The agent's configuration (state dir, sockets, health address, enrolment policy, backend).
    pub config: Config,
    /// ztunnel's admin endpoint, when it cannot be found (a ztunnel process's loopback listeners otherwise).
    pub ztunnel_admin: Option<SocketAddr>,
    /// The bound on each step.
    pub timeout: Duration,
    /// Run the active probes.
    pub probe: bool,
}

/// Runs `f` on a thread inside the netns at `path`, bounded by `timeout`.
async fn in_netns<F, R>(path: &Path, timeout: Duration, f: F) -> Result<R, String>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    match tokio::time::timeout(timeout, crate::netns::run_in(path.to_path_buf(), file, f)).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?} inside {}", path.display())),
    }
}

/// Runs `f` on a thread inside a new, empty netns (the scratch space the expected ruleset is rendered in).
async fn in_scratch_netns<F, R>(timeout: Duration, f: F) -> Result<R, String>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("debug-scratch".into())
        .spawn(move || {
            let r = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map(|()| f())
                .map_err(|e| format!("creating a scratch netns: {e}"));
            let _ = tx.send(r);
        })
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err("the scratch netns thread died".into()),
        Err(_) => Err(format!("no answer within {timeout:?} from the scratch netns")),
    }
}

/// The agent's records, by namespace and name (read as the agent reads them; nothing is created).
fn read_records(dir: &Path) -> Vec<PodRecord> {
    let (mut v, _unreadable) = crate::pods::StateStore::existing(dir).load_all();
    v.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    v
}

fn inode(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Every process under `proc` (the host's /proc, which is `/host/proc` in the agent's pod): its pid and its
/// directory.
fn processes(proc: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(proc) else { return Vec::new() };
    entries
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().to_string(), e.path()))
        .filter(|(pid, _)| pid.bytes().all(|b| b.is_ascii_digit()))
        .collect()
}

/// Every netns on the node that has a path: the runtime's bind mounts and every process's.
fn netns_candidates(proc: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for dir in ["/var/run/netns", "/run/netns"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            v.extend(entries.flatten().map(|e| e.path()));
        }
    }
    v.extend(processes(proc).into_iter().map(|(_, dir)| dir.join("ns/net")));
    v
}

/// Finds the netns with inode `ino` among the node's netns paths.
fn netns_by_inode(proc: &Path, ino: u64) -> Option<PathBuf> {
    netns_candidates(proc).into_iter().find(|p| inode(p) == Some(ino))
}

/// Which pod the target names, and the agent's record of it.
fn locate(target: &Target, records: &[PodRecord], proc: &Path) -> (PodId, Option<PodRecord>) {
    let record = match target {
        Target::Name { namespace, name } => records.iter().find(|r| &r.namespace == namespace && &r.name == name),
        Target::Uid(uid) => records.iter().find(|r| &r.uid == uid),
        Target::Netns(path) => {
            let ino = inode(path);
            records.iter().find(|r| &r.netns_path == path || (ino.is_some() && ino == Some(r.netns_inode)))
        }
    }
    .cloned();
    let mut id = PodId::default();
    match (&record, target) {
        (Some(r), _) => {
            id.namespace = r.namespace.clone();
            id.name = r.name.clone();
            id.uid = r.uid.clone();
            id.service_account = r.service_account.clone();
            id.ips = r.ips.clone();
            let current = inode(&r.netns_path);
            if current.is_some() && (r.netns_inode == 0 || current == Some(r.netns_inode)) {
                id.netns = Some(r.netns_path.clone());
                id.found_by = "agent record".into();
            } else if let Some(p) = (r.netns_inode != 0).then(|| netns_by_inode(proc, r.netns_inode)).flatten() {
                id.netns = Some(p);
                id.found_by = "agent record, netns found by inode".into();
            } else {
                id.netns = Some(r.netns_path.clone());
                id.found_by = "agent record (the netns is gone)".into();
            }
        }
        (None, Target::Netns(p)) => {
            id.netns = Some(p.clone());
            id.found_by = "netns path".into();
        }
        (None, Target::Name { namespace, name }) => {
            id.namespace = namespace.clone();
            id.name = name.clone();
        }
        (None, Target::Uid(uid)) => id.uid = uid.clone(),
    }
    (id, record)
}

/// The enrolment policy's word on a pod the agent does not hold (standalone config, or the API's labels).
async fn policy(o: &Options, id: &PodId) -> (Option<bool>, String) {
    if id.name.is_empty() {
        return (None, "the agent has no record of it, and without its name the policy cannot be asked".into());
    }
    match o.config.mode {
        Mode::Standalone => {
            let pod = PodRef { namespace: id.namespace.clone(), name: id.name.clone(), uid: id.uid.clone() };
            match o.config.standalone.decide(&pod) {
                crate::enrol::Decision::Enrol { .. } => (Some(true), "the standalone config enrols it".into()),
                crate::enrol::Decision::Skip(why) => (Some(false), format!("standalone config: {why}")),
            }
        }
        Mode::Kubernetes => match tokio::time::timeout(o.timeout, kube_verdict(o, &id.namespace, &id.name)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => (None, format!("the Kubernetes API could not be asked: {e:#}")),
            Err(_) => (None, format!("the Kubernetes API did not answer within {:?}", o.timeout)),
        },
    }
}

async fn kube_verdict(o: &Options, namespace: &str, name: &str) -> anyhow::Result<(Option<bool>, String)> {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    let cfg = match &o.config.kubernetes.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    let client = kube::Client::try_from(cfg)?;
    let Some(pod) = kube::Api::<Pod>::namespaced(client.clone(), namespace).get_opt(name).await? else {
        return Ok((None, format!("no pod {namespace}/{name} in the API")));
    };
    let ns = kube::Api::<Namespace>::all(client).get_opt(namespace).await?;
    let mut excluded = o.config.kubernetes.exclude_namespaces.clone();
    if let Ok(own) = std::env::var("POD_NAMESPACE") {
        excluded.push(own);
    }
    let annotation = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(crate::k8s::decide::REDIRECTION))
        .map(|v| format!("; annotation {}={v}", crate::k8s::decide::REDIRECTION))
        .unwrap_or_default();
    Ok(match crate::k8s::decide::decide(&pod, ns.as_ref(), &excluded) {
        crate::k8s::decide::Verdict::Enrol { .. } => {
            (Some(true), format!("labels enrol it ({}=ambient){annotation}", crate::k8s::decide::DATAPLANE_MODE))
        }
        crate::k8s::decide::Verdict::Skip(why) | crate::k8s::decide::Verdict::Gone(why) => {
            (Some(false), format!("{why}{annotation}"))
        }
    })
}

/// One listening or connected TCP socket of the calling thread's netns.
#[derive(Debug, Clone)]
struct TcpEntry {
    local: SocketAddr,
    remote: SocketAddr,
    listening: bool,
    inode: u64,
}

fn parse_hex_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::from(u32::from_str_radix(ip, 16).ok()?.swap_bytes().to_be_bytes()),
        32 => {
            let mut b = [0u8; 16];
            for (i, chunk) in b.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?.swap_bytes();
                chunk.copy_from_slice(&word.to_be_bytes());
            }
            IpAddr::from(b)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The calling thread's netns's TCP sockets (`/proc/thread-self/net/tcp{,6}`: this thread's netns, not the
/// process's).
fn tcp_table() -> Vec<TcpEntry> {
    let mut v = Vec::new();
    for file in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote)) =
                (f.get(1).and_then(|s| parse_hex_addr(s)), f.get(2).and_then(|s| parse_hex_addr(s)))
            else {
                continue;
            };
            let listening = f.get(3) == Some(&"0A");
            let inode = f.get(9).and_then(|s| s.parse().ok()).unwrap_or(0);
            v.push(TcpEntry { local, remote, listening, inode });
        }
    }
    v
}

/// Same address, with IPv4-mapped IPv6 seen as IPv4.
fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |s: SocketAddr| match s.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(s, |v4| SocketAddr::new(IpAddr::V4(v4), s.port())),
        IpAddr::V4(_) => s,
    };
    canon(a) == canon(b)
}

/// Which processes hold each socket inode (`comm[pid]`), from `/proc/*/fd`.
fn socket_holders(proc: &Path, inodes: &[u64]) -> HashMap<u64, Vec<String>> {
    let mut out: HashMap<u64, Vec<String>> = HashMap::new();
    if inodes.is_empty() {
        return out;
    }
    for (pid, dir) in processes(proc) {
        for ino in socket_inodes(&dir).into_iter().filter(|i| inodes.contains(i)) {
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            let who = format!("{}[{pid}]", comm.trim());
            let list = out.entry(ino).or_default();
            if !list.contains(&who) {
                list.push(who);
            }
        }
    }
    out
}

/// Normalises `nft list table` output for comparison: no handles, no counter values, no blank lines.
fn nft_lines(listing: &str) -> Vec<String> {
    listing
        .lines()
        .map(|l| {
            let l = l.split(" # handle ").next().unwrap_or(l).trim();
            let mut words: Vec<&str> = Vec::new();
            let mut it = l.split_whitespace().peekable();
            while let Some(w) = it.next() {
                words.push(w);
                if w == "counter" && it.peek() == Some(&"packets") {
                    // `counter packets N bytes M`
                    for _ in 0..4 {
                        it.next();
                    }
                }
            }
            words.join(" ")
        })
        .filter(|l| !l.is_empty())
        .collect()
}

/// Ambit's lines of `iptables-save` output: its chains, their rules, and jumps to them.
fn iptables_lines(save: &str, family: Family) -> Vec<String> {
    let fam = if family == Family::V4 { "ipv4" } else { "ipv6" };
    let mut table = String::new();
    let mut v = Vec::new();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
        } else if let Some(rest) = line.strip_prefix(':').filter(|r| r.starts_with("AMBIT_")) {
            v.push(format!("{fam} {table} :{}", rest.split_whitespace().next().unwrap_or_default()));
        } else if line.starts_with("-A AMBIT_") || (line.starts_with("-A ") && line.contains(" -j AMBIT_")) {
            v.push(format!("{fam} {table} {line}"));
        }
    }
    v
}

/// The rules of one backend in the calling thread's netns.
fn ruleset(backend: Backend, cfg: InpodConfig) -> Result<Vec<String>, String> {
    match backend {
        Backend::Nftables => Ok(apply::nft_list_table(rules::NFT_TABLE)
            .map_err(|e| e.to_string())?
            .map(|s| nft_lines(&s))
            .unwrap_or_default()),
        Backend::Iptables(fl) => {
            let mut v = Vec::new();
            for fam in Family::of(cfg) {
                let save = apply::run(&rules::backend::tool(fl, fam, "save"), &[], None).map_err(|e| e.to_string())?;
                v.extend(iptables_lines(&save, fam));
            }
            Ok(v)
        }
    }
}

/// Expected lines missing from `actual`, and lines of `actual` not expected (as multisets, in order).
fn diff(expected: &[String], actual: &[String]) -> (Vec<String>, Vec<String>) {
    let mut left: Vec<Option<&String>> = actual.iter().map(Some).collect();
    let mut missing = Vec::new();
    for e in expected {
        match left.iter().position(|a| *a == Some(e)) {
            Some(i) => left[i] = None,
            None => missing.push(e.clone()),
        }
    }
    (missing, left.into_iter().flatten().cloned().collect())
}

/// What is in the pod's netns: the rules of every backend, routing, sockets, addresses and the default gateways.
struct NetnsFacts {
    rules: Vec<(Backend, Result<Vec<String>, String>)>,
    routing: Result<bool, String>,
    sockets: Vec<TcpEntry>,
    ips: Vec<IpAddr>,
    gateways: Vec<IpAddr>,
}

const BACKENDS: [Backend; 3] = [Backend::Nftables, Backend::Iptables(Flavor::Nft), Backend::Iptables(Flavor::Legacy)];

fn netns_facts(cfg: InpodConfig) -> NetnsFacts {
    let rules = BACKENDS.iter().map(|b| (*b, ruleset(*b, cfg))).collect();
    let routing = rules::routing::present(cfg).map_err(|e| e.to_string());
    let sockets = tcp_table().into_iter().filter(|e| e.listening && INPOD_PORTS.contains(&e.local.port())).collect();
    let ips = rules::routing::addresses()
        .unwrap_or_default()
        .into_iter()
        .filter(|ip| !ip.is_loopback() && !matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80))
        .collect();
    NetnsFacts { rules, routing, sockets, ips, gateways: ambit_proto::host::default_gateways() }
}

/// The outbound probe, on a thread inside the pod's netns.
fn probe_outbound(gateway: IpAddr, timeout: Duration) -> Check {
    use socket2::{Domain, Socket, Type};
    let dst = SocketAddr::new(gateway, DEBUG_PROBE_PORT);
    let sock = match Socket::new(Domain::for_address(dst), Type::STREAM, None) {
        Ok(s) => s,
        Err(e) => return Check::fail(format!("cannot make a socket: {e}")),
    };
    // Uncaptured, the SYN gets no further than the node.
    let _ = if gateway.is_ipv4() { sock.set_ttl_v4(1) } else { sock.set_unicast_hops_v6(1) };
    match sock.connect_timeout(&dst.into(), timeout) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Check::fail(format!("{dst} refused it: the node answered, nothing captured it"));
        }
        Err(e) => return Check::fail(format!("{dst}: {e} (not captured: a TTL-1 SYN goes no further than the node)")),
    }
    let Some(local) = sock.local_addr().ok().and_then(|a| a.as_socket()) else {
        return Check::fail("connected, but the socket has no address");
    };
    let landed =
        tcp_table().into_iter().find(|e| !e.listening && e.local.port() == OUTBOUND_PORT && same(e.remote, local));
    match landed {
        Some(_) => Check::pass(format!("{local} → {dst} landed on {OUTBOUND_PORT}")),
        None => Check::fail(format!("{local} → {dst} connected, but not through {OUTBOUND_PORT}")),
    }
}

/// The inbound probe: connects from the calling thread's netns (the node's) to the pod.
fn connect_inbound(pod_ip: IpAddr, timeout: Duration) -> Result<(socket2::Socket, SocketAddr), Check> {
    use socket2::{Domain, Socket, Type};
    let dst = SocketAddr::new(pod_ip, DEBUG_PROBE_PORT);
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM, None)
        .map_err(|e| Check::fail(format!("cannot make a socket: {e}")))?;
    // Past the node's probe SNAT, so it arrives as any client's connection does.
    sock.set_mark(rules::DEBUG_PROBE_MARK).map_err(|e| Check::fail(format!("cannot mark the probe: {e}")))?;
    match sock.connect_timeout(&dst.into(), timeout) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(Check::fail(format!("the pod refused {dst}: the connection reached its stack uncaptured")));
        }
        Err(e) => return Err(Check::fail(format!("{dst}: {e} (is this the pod's node?)"))),
    }
    let local = sock.local_addr().ok().and_then(|a| a.as_socket()).ok_or_else(|| Check::fail("no local address"))?;
    Ok((sock, local))
}

/// A GET over HTTP/1.0 (no chunking) with every step bounded; returns the status and the body.
fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| format!("{addr}: {e}"))?;
    let mut buf = Vec::new();
    s.take(32 << 20).read_to_end(&mut buf).map_err(|e| format!("{addr}: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("{addr}: not an HTTP answer"))?;
    let status =
        head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| format!("{addr}: no status"))?;
    Ok((status, body.to_string()))
}

/// A ztunnel's admin endpoint and its dump.
struct ZtunnelDump {
    who: String,
    dump: Result<Value, String>,
}

/// The host's /proc: the agent's `kubernetes.hostProc` in Kubernetes mode (`/host/proc` in its pod).
fn proc_root(o: &Options) -> PathBuf {
    match o.config.mode {
        Mode::Kubernetes => o.config.kubernetes.host_proc.clone(),
        Mode::Standalone => PathBuf::from("/proc"),
    }
}

fn own_netns_inode() -> Option<u64> {
    inode(Path::new("/proc/self/ns/net"))
}

/// The socket inodes a process holds (`/proc/<pid>/fd/* -> socket:[inode]`).
fn socket_inodes(proc_dir: &Path) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) else { return Vec::new() };
    fds.flatten()
        .filter_map(|fd| {
            let link = std::fs::read_link(fd.path()).ok()?;
            link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// The loopback listeners `pid` holds, in the calling thread's netns.
fn loopback_listeners_of(proc_dir: &Path) -> Vec<SocketAddr> {
    let held = socket_inodes(proc_dir);
    let mut v: Vec<SocketAddr> = tcp_table()
        .into_iter()
        .filter(|e| e.listening && e.local.ip().is_loopback() && held.contains(&e.inode))
        .map(|e| e.local)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Asks every ztunnel that can be found for its `/config_dump`: the one given, else the processes named
/// `ztunnel` in this netns (Ambit's and Istio's, hostNetwork), else those in other netns (a ztunnel pod).
async fn ztunnel_dumps(o: &Options) -> Vec<ZtunnelDump> {
    let timeout = o.timeout;
    if let Some(addr) = o.ztunnel_admin {
        let dump =
            tokio::task::spawn_blocking(move || get_dump(addr, timeout)).await.unwrap_or_else(|e| Err(e.to_string()));
        return vec![ZtunnelDump { who: format!("{addr}"), dump }];
    }
    let own = own_netns_inode();
    let mut here = Vec::new();
    let mut elsewhere = Vec::new();
    for (pid, dir) in processes(&proc_root(o)) {
        if std::fs::read_to_string(dir.join("comm")).map(|c| c.trim() == "ztunnel").unwrap_or(false) {
            if inode(&dir.join("ns/net")) == own {
                here.push((pid, dir))
            } else if serves_our_agent(&dir, &o.config.zds_socket) {
                elsewhere.push((pid, dir))
            }
        }
    }
    let mut out = Vec::new();
    for (pid, dir) in here {
        let found = tokio::task::spawn_blocking(move || first_dump(&dir, timeout)).await.ok().flatten();
        out.push(match found {
            Some((addr, d)) => ZtunnelDump { who: format!("ztunnel[{pid}] {addr}"), dump: Ok(d) },
            None => ZtunnelDump { who: format!("ztunnel[{pid}]"), dump: Err("no admin endpoint answered".into()) },
        });
    }
    if out.is_empty() {
        for (pid, dir) in elsewhere {
            let path = dir.join("ns/net");
            out.push(match in_netns(&path, timeout * 4, move || first_dump(&dir, timeout)).await {
                Ok(Some((addr, d))) => ZtunnelDump { who: format!("ztunnel[{pid}] (its netns) {addr}"), dump: Ok(d) },
                Ok(None) => {
                    ZtunnelDump { who: format!("ztunnel[{pid}]"), dump: Err("no admin endpoint answered".into()) }
                }
                Err(e) => ZtunnelDump { who: format!("ztunnel[{pid}]"), dump: Err(e) },
            });
        }
    }
    out
}

/// The config dump of the ztunnel at `proc_dir` from the first of its loopback listeners that answers with one,
/// in the calling thread's netns (one per process: Istio's listens on 127.0.0.1 and ::1).
fn first_dump(proc_dir: &Path, timeout: Duration) -> Option<(SocketAddr, Value)> {
    loopback_listeners_of(proc_dir).into_iter().find_map(|addr| get_dump(addr, timeout).ok().map(|d| (addr, d)))
}

/// Whether the ztunnel process at `proc_dir` (in another netns: a ztunnel pod) talks to this agent: its
/// `INPOD_UDS` (Istio's default when unset), seen through its own root, is our ZDS socket.
fn serves_our_agent(proc_dir: &Path, zds_socket: &Path) -> bool {
    let environ = std::fs::read(proc_dir.join("environ")).unwrap_or_default();
    let uds = environ
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"INPOD_UDS="))
        .map(|v| PathBuf::from(String::from_utf8_lossy(v).to_string()))
        .unwrap_or_else(|| PathBuf::from(ambit_proto::zds::DEFAULT_SOCKET));
    let theirs = proc_dir.join("root").join(uds.strip_prefix("/").unwrap_or(&uds));
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    id(&theirs).is_some() && id(&theirs) == id(zds_socket)
}

fn get_dump(addr: SocketAddr, timeout: Duration) -> Result<Value, String> {
    let (status, body) = http_get(addr, "/config_dump", timeout)?;
    if status != 200 {
        return Err(format!("{addr}: /config_dump answered {status}"));
    }
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{addr}: not JSON: {e}"))?;
    v.get("workloadState").is_some().then_some(v).ok_or_else(|| format!("{addr}: not a ztunnel's config dump"))
}

/// What the ztunnels say of the pod.
fn ztunnel_view(dumps: &[ZtunnelDump], id: &PodId) -> Ztunnel {
    let mut z = Ztunnel::default();
    if dumps.is_empty() {
        z.serves = Some(false);
        z.asked.push("no ztunnel process on this node (give --ztunnel-admin if it runs under another name)".into());
    }
    for d in dumps {
        let dump = match &d.dump {
            Ok(v) => v,
            Err(e) => {
                z.asked.push(format!("{}: {e}", d.who));
                continue;
            }
        };
        let istio = dump.get("ambit").is_none();
        let states = dump["workloadState"].as_object().cloned().unwrap_or_default();
        let entry = states.get(&id.uid).cloned().or_else(|| {
            // Without a UID (a netns the agent has no record of), by name.
            (id.uid.is_empty() && !id.name.is_empty())
                .then(|| {
                    states.values().find(|s| {
                        s["info"]["name"] == id.name.as_str() && s["info"]["namespace"] == id.namespace.as_str()
                    })
                })
                .flatten()
                .cloned()
        });
        let Some(entry) = entry else {
            z.asked.push(format!("{}: does not serve it ({} pods served)", d.who, states.len()));
            z.serves.get_or_insert(false);
            continue;
        };
        z.serves = Some(true);
        z.istio = istio;
        z.state = entry["state"].as_str().map(str::to_string);
        let info = &entry["info"];
        let td = info["trustDomain"].as_str().filter(|s| !s.is_empty()).unwrap_or("cluster.local");
        let sa = info["serviceAccount"].as_str().filter(|s| !s.is_empty()).unwrap_or("default");
        let identity = format!("spiffe://{td}/ns/{}/sa/{sa}", info["namespace"].as_str().unwrap_or_default());
        if let Some(c) =
            dump["certificates"].as_array().and_then(|cs| cs.iter().find(|c| c["identity"] == identity.as_str()))
        {
            let expiry =
                c["certChain"][0]["expirationTime"].as_str().map(|e| format!(", expires {e}")).unwrap_or_default();
            z.certificate = Some(format!("{}{expiry}", c["state"].as_str().unwrap_or("?")));
        } else {
            z.certificate = Some("none yet (fetched at the first connection)".into());
        }
        z.identity = Some(identity);
        z.connections = dump["ambit"]["inpod"]["pods"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["uid"] == id.uid.as_str()))
            .and_then(|p| p["connections"].as_u64());
        z.asked.push(format!("{}: serves it", d.who));
    }
    z
}

/// The agent's `/readyz`.
async fn agent_health(o: &Options) -> Agent {
    let mut addr = o.config.health_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv6() {
            IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])
        } else {
            IpAddr::from([127, 0, 0, 1])
        });
    }
    let timeout = o.timeout;
    let r = tokio::task::spawn_blocking(move || {
        http_get(addr, "/readyz", timeout).or_else(|e| {
            // A node without IPv6 binds the agent on IPv4 only.
            if addr.is_ipv6() {
                http_get(SocketAddr::from(([127, 0, 0, 1], addr.port())), "/readyz", timeout)
            } else {
                Err(e)
            }
        })
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    match r {
        Ok((200, body)) => Agent { up: true, ready: true, detail: body.trim().to_string() },
        Ok((status, body)) => Agent { up: true, ready: false, detail: format!("{status}: {}", body.trim()) },
        Err(e) => Agent { up: false, ready: false, detail: e },
    }
}

/// What every pod's inspection reads of the node, gathered once per run: the agent's records, its health and
/// the ztunnels' dumps.
struct NodeView {
    records: Vec<PodRecord>,
    agent: Agent,
    dumps: Vec<ZtunnelDump>,
    proc: PathBuf,
}

async fn node_view(o: &Options) -> NodeView {
    NodeView {
        records: read_records(&o.config.state_dir),
        agent: agent_health(o).await,
        dumps: ztunnel_dumps(o).await,
        proc: proc_root(o),
    }
}

/// Inspects one pod.
pub async fn pod(target: &Target, o: &Options) -> PodReport {
    inspect_pod(target, o, &node_view(o).await).await
}

async fn inspect_pod(target: &Target, o: &Options, view: &NodeView) -> PodReport {
    let mut r = PodReport::new(target);
    r.probed = o.probe;
    let (mut id, record) = locate(target, &view.records, &view.proc);
    let (should, why) = match &record {
        Some(rec) => {
            let (should, why) = policy(o, &id).await;
            let why = if should == Some(false) {
                format!("the policy no longer enrols it: {why}")
            } else {
                format!("service account {}; {why}", rec.service_account)
            };
            (should, why)
        }
        None => policy(o, &id).await,
    };
    r.enrolment = Enrolment { held: record.is_some(), should, why };
    r.agent = view.agent.clone();
    if let Some(path) = id.netns.clone() {
        let cfg = InpodConfig::for_ips(&id.ips).with_loopback_route(o.config.loopback_route);
        match in_netns(&path, o.timeout * 3, move || netns_facts(cfg)).await {
            Err(e) => r.netns = Some(Check::fail(e)),
            Ok(facts) => {
                r.netns = Some(Check::pass(format!("entered {}", path.display())));
                if id.ips.is_empty() {
                    id.ips = facts.ips.clone();
                }
                r.rules = Some(compare_rules(o, &id, &facts).await);
                let want = rules::routing::describe(cfg);
                r.routing = Some(match &facts.routing {
                    Ok(true) => Check::pass(format!("{want}: as the agent installs it")),
                    Ok(false) => Check::fail(format!("not as the agent installs it: {want}")),
                    Err(e) => Check::fail(format!("cannot read: {e}")),
                });
                let holders = socket_holders(&view.proc, &facts.sockets.iter().map(|s| s.inode).collect::<Vec<_>>());
                r.sockets = facts
                    .sockets
                    .iter()
                    .map(|s| Socket {
                        port: s.local.port(),
                        address: s.local.to_string(),
                        holders: holders.get(&s.inode).cloned().unwrap_or_default(),
                    })
                    .collect();
                if o.probe {
                    probes(&mut r, &path, &id, &facts, o.timeout).await;
                }
            }
        }
    }
    r.ztunnel = ztunnel_view(&view.dumps, &id);
    r.pod = id;
    super::judge(&mut r);
    r
}

async fn compare_rules(o: &Options, id: &PodId, facts: &NetnsFacts) -> Rules {
    let mut rules = Rules::default();
    for (b, lines) in &facts.rules {
        match lines {
            Ok(l) if !l.is_empty() => rules.found.push(b.to_string()),
            Ok(_) => {}
            // A tool that is not installed is a backend that is not in use.
            Err(e) if e.contains("cannot run") => {}
            Err(e) => rules.error = Some(format!("{b}: {e}")),
        }
    }
    let backend =
        BACKENDS.iter().copied().find(|b| rules.found.contains(&b.to_string())).unwrap_or_else(|| o.config.backend());
    rules.backend = backend.to_string();
    let cfg = InpodConfig::for_ips(&id.ips);
    let expected = in_scratch_netns(o.timeout * 2, move || {
        backend.install_pod(cfg).map_err(|e| e.to_string())?;
        ruleset(backend, cfg)
    })
    .await
    .and_then(|r| r);
    match expected {
        Ok(expected) => {
            let actual = facts
                .rules
                .iter()
                .find(|(b, _)| *b == backend)
                .and_then(|(_, l)| l.as_ref().ok())
                .cloned()
                .unwrap_or_default();
            rules.expected_lines = expected.len();
            if !actual.is_empty() {
                (rules.missing, rules.extra) = diff(&expected, &actual);
            }
        }
        Err(e) => rules.error = Some(format!("rendering the expected ruleset: {e}")),
    }
    rules
}

async fn probes(r: &mut PodReport, path: &Path, id: &PodId, facts: &NetnsFacts, timeout: Duration) {
    r.probe_outbound = Some(match facts.gateways.first().copied() {
        None => Check::fail("the pod has no default route to probe through"),
        Some(gw) => in_netns(path, timeout * 2, move || probe_outbound(gw, timeout)).await.unwrap_or_else(Check::fail),
    });
    let Some(ip) = id
        .ips
        .iter()
        .copied()
        .find(|ip| facts.gateways.iter().any(|g| g.is_ipv4() == ip.is_ipv4()))
        .or(id.ips.first().copied())
    else {
        r.probe_inbound = Some(Check::fail("the pod has no address to probe"));
        return;
    };
    r.probe_inbound = Some(match tokio::task::spawn_blocking(move || connect_inbound(ip, timeout)).await {
        Err(e) => Check::fail(e.to_string()),
        Ok(Err(c)) => c,
        Ok(Ok((sock, local))) => {
            let seen = in_netns(path, timeout, move || {
                tcp_table()
                    .into_iter()
                    .any(|e| !e.listening && e.local.port() == INBOUND_PLAINTEXT_PORT && same(e.remote, local))
            })
            .await;
            drop(sock);
            match seen {
                Ok(true) => {
                    Check::pass(format!("{local} → {ip}:{DEBUG_PROBE_PORT} landed on {INBOUND_PLAINTEXT_PORT}"))
                }
                Ok(false) => Check::fail(format!(
                    "{local} → {ip}:{DEBUG_PROBE_PORT} was accepted, but not on {INBOUND_PLAINTEXT_PORT}: it reached the pod uncaptured"
                )),
                Err(e) => Check::fail(e),
            }
        }
    });
}

/// Asks the agent to reinstall the pod's expected rules.
pub async fn repair(o: &Options, pod: &PodId) -> Check {
    if pod.uid.is_empty() && pod.name.is_empty() {
        return Check::fail("the agent has no record of this pod: only pods it holds can be repaired");
    }
    let req = Request {
        version: cni_api::API_VERSION,
        command: cni_api::Command::Repair,
        container_id: String::new(),
        netns: None,
        ifname: String::new(),
        pod: PodRef { namespace: pod.namespace.clone(), name: pod.name.clone(), uid: pod.uid.clone() },
        ips: Vec::new(),
        valid_attachments: Vec::new(),
    };
    let socket = o.config.cni_socket.clone();
    let call = async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::UnixStream::connect(&socket).await.map_err(|e| format!("{}: {e}", socket.display()))?;
        s.write_all(&serde_json::to_vec(&req).map_err(|e| e.to_string())?).await.map_err(|e| e.to_string())?;
        s.shutdown().await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        (&mut s).take(cni_api::MAX_MESSAGE_BYTES as u64).read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        serde_json::from_slice::<cni_api::Response>(&buf).map_err(|e| format!("unreadable answer: {e}"))
    };
    match tokio::time::timeout(o.timeout * 5, call).await {
        Err(_) => Check::fail("the agent did not answer in time"),
        Ok(Err(e)) => Check::fail(format!("the agent cannot be reached: {e}")),
        Ok(Ok(resp)) => match resp.error {
            Some(e) => Check::fail(format!("the agent refused: {}", e.message)),
            None => Check::pass("the agent reinstalled the expected rules and routing"),
        },
    }
}

/// Inspects the node: every pod the agent holds (without probes), the CNI config, the plugin, the agent, ztunnel.
pub async fn node(o: &Options) -> NodeReport {
    let quiet = Options { probe: false, ..o.clone() };
    let view = node_view(&quiet).await;
    let mut pods = Vec::new();
    for rec in &view.records {
        let r = inspect_pod(&Target::Uid(rec.uid.clone()), &quiet, &view).await;
        pods.push(NodePod {
            pod: format!("{}/{}", rec.namespace, rec.name),
            uid: rec.uid.clone(),
            verdict: r.verdict,
            why: r.reasons.first().cloned().unwrap_or_default(),
        });
    }
    let install = &o.config.install;
    let files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&install.cni_conf_dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| Some((e.file_name().to_string_lossy().to_string(), std::fs::read(e.path()).ok()?)))
                .collect()
        })
        .unwrap_or_default();
    let (primary, skipped) = crate::installer::choose_primary(&files, install.cni_conf_name.as_deref());
    let cni = match primary {
        Some((name, doc)) if crate::installer::is_chained(&doc) => {
            let plugins: Vec<&str> = doc["plugins"]
                .as_array()
                .map(|p| p.iter().filter_map(|p| p["type"].as_str()).collect())
                .unwrap_or_default();
            Check::pass(format!("{}/{name}: {} (ambit-cni last)", install.cni_conf_dir.display(), plugins.join(" → ")))
        }
        Some((name, _)) => Check::fail(format!(
            "{}/{name} is the runtime's config, and ambit-cni is not chained in it: new pods start uncaptured",
            install.cni_conf_dir.display()
        )),
        None => Check::fail(format!("no CNI config in {} ({})", install.cni_conf_dir.display(), skipped.join("; "))),
    };
    let bin = install.cni_bin_dir.join(crate::installer::PLUGIN_TYPE);
    let plugin_binary = match std::fs::metadata(&bin) {
        Ok(m) if m.mode() & 0o111 != 0 => Check::pass(format!("{} ({} bytes)", bin.display(), m.len())),
        Ok(_) => Check::fail(format!("{} is not executable", bin.display())),
        Err(e) => Check::fail(format!("{}: {e}", bin.display())),
    };
    let ztunnel = view
        .dumps
        .iter()
        .map(|d| match &d.dump {
            Ok(v) => {
                let served = v["workloadState"].as_object().map_or(0, |m| m.len());
                match v["ambit"]["inpod"]["ready"].as_bool() {
                    Some(true) => Check::pass(format!("{}: ZDS connected, serves {served} pods", d.who)),
                    Some(false) => Check::fail(format!("{}: not connected to the agent over ZDS", d.who)),
                    None => Check::pass(format!("{} (Istio's): serves {served} pods", d.who)),
                }
            }
            Err(e) => Check::fail(format!("{}: {e}", d.who)),
        })
        .collect();
    NodeReport { pods, cni, plugin_binary, agent: view.agent, ztunnel }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_addresses_parse() {
        assert_eq!(parse_hex_addr("0100007F:3A99"), Some("127.0.0.1:15001".parse().unwrap()));
        assert_eq!(parse_hex_addr("00000000000000000000000001000000:3A9E"), Some("[::1]:15006".parse().unwrap()));
        assert_eq!(
            parse_hex_addr("0000000000000000FFFF00000200000A:0050"),
            Some("[::ffff:10.0.0.2]:80".parse().unwrap())
        );
        assert!(same("[::ffff:10.0.0.2]:80".parse().unwrap(), "10.0.0.2:80".parse().unwrap()));
        for bad in ["", "zz:1", "0100007F", "0100007F:zz", "01:0050"] {
            assert_eq!(parse_hex_addr(bad), None, "{bad}");
        }
    }

    #[test]
    fn nft_listings_compare_without_handles_or_counters() {
        let a = "table inet ambit { # handle 7\n\tchain output {\n\t\tmeta l4proto tcp counter packets 12 bytes 720 redirect to :15001 # handle 4\n\t}\n}\n";
        let b = "table inet ambit {\n  chain output {\n    meta l4proto tcp counter redirect to :15001\n  }\n}\n";
        assert_eq!(nft_lines(a), nft_lines(b));
    }

    #[test]
    fn iptables_lines_keep_only_ambits() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:AMBIT_PRERT - [0:0]\n-A PREROUTING -j AMBIT_PRERT\n-A PREROUTING -j KUBE\n-A AMBIT_PRERT -p tcp -j ACCEPT\nCOMMIT\n";
        assert_eq!(
            iptables_lines(save, Family::V4),
            vec![
                "ipv4 nat :AMBIT_PRERT",
                "ipv4 nat -A PREROUTING -j AMBIT_PRERT",
                "ipv4 nat -A AMBIT_PRERT -p tcp -j ACCEPT"
            ]
        );
    }

    #[test]
    fn diff_is_a_multiset_difference() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let (missing, extra) = diff(&s(&["a", "b", "b", "c"]), &s(&["a", "b", "d", "c"]));
        assert_eq!((missing, extra), (s(&["b"]), s(&["d"])));
        assert_eq!(diff(&s(&["a"]), &s(&["a"])), (vec![], vec![]));
    }
}
