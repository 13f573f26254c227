//! The lab: a small cluster made of network namespaces.
//!
//! - a fabric netns with a bridge joins the nodes (each node's `eth0`, 172.30.0.N/24), and each node routes
//!   the other nodes' pod CIDRs (10.244.N.0/24) over it;
//! - a netns per node runs the real `ambit-agent` and `ztunnel` processes and the CNI chain;
//! - a netns per pod, created as a runtime creates one (`/var/run/netns/…`), gets its interface and IP from
//!   Debian's `bridge` (or `ptp`, routed, see [`PrimaryCni`]) + `host-local` plugins with `ambit-cni` chained
//!   after them, run by [`CniRunner`];
//! - the lab plays istiod: a control plane process ([`crate::controlplane`]) in its own netns on the fabric
//!   serves istiod's CA and delta xDS from the mesh file the lab writes, and alone holds the mesh's root key;
//!   with `control_plane: false` every ztunnel reads that file itself and signs with a local copy of the CA
//!   (the mode without a control plane).
//!
//! This module builds the topology and owns the lab's lifetime; the lab's other roles each have their own:
//! process supervisor ([`daemons`]), istiod's publisher ([`mesh`]), container runtime ([`pods`]), kubelet
//! ([`kubelet`]), and attaching to a lab left running ([`attach`]).
//!
//! Everything is named with a unique id, lives under one temp directory, and is removed on drop.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::cni::{Attachment, CniFailure, CniRunner, Timings, write_atomic};
use crate::net::http_get;
use crate::netns::Netns;
use crate::proc::Proc;
use crate::util::unique_id;
use mesh::{MeshConfig, Published};

mod attach;
mod daemons;
mod kubelet;
mod mesh;
mod pods;
mod waypoints;
pub use waypoints::{WAYPOINT_HBONE_PORT, Waypoint};

/// The trust domain of the lab's mesh.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// ztunnel's admin port (node netns, localhost).
pub const ADMIN_PORT: u16 = 15000;
/// ztunnel's metrics port.
pub const METRICS_PORT: u16 = 15020;
/// ztunnel's readiness port.
pub const READY_PORT: u16 = 15021;
/// The agent's health port (`/readyz`, `/metrics`).
pub const AGENT_HEALTH_PORT: u16 = 15014;

/// How to build a lab.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Number of nodes.
    pub nodes: usize,
    /// Namespaces whose pods are enrolled (the agents' standalone policy).
    pub enrolled_namespaces: Vec<String>,
    /// The ztunnel binary (Ambit's by default).
    pub ztunnel: Option<PathBuf>,
    /// Extra environment for every ztunnel.
    pub ztunnel_env: Vec<(String, String)>,
    /// `RUST_LOG` for the agents and ztunnels.
    pub log_level: String,
    /// Start agents and ztunnels (off for tests that drive the pieces themselves).
    pub start_daemons: bool,
    /// The Kubernetes tier: run etcd and kube-apiserver, and the agents in Kubernetes mode.
    pub kubernetes: bool,
    /// The runtime tier: run containerd on each node, with the CNI config the agent chained.
    pub runtime: bool,
    /// Dual stack: nodes and pods get IPv6 addresses too (fd00:30::N on the fabric, fd00:244:N::/64 pods).
    pub dual_stack: bool,
    /// ztunnels get certificates and workloads from the lab's control plane (istiod's protocols); off, each
    /// reads the mesh file and holds the CA key itself (`LOCAL_XDS_PATH` and the local file CA).
    pub control_plane: bool,
    /// The agents' rule backend: `nftables` (the default) or `iptables` (with the node's flavour).
    pub rule_backend: String,
    /// The primary CNI: `bridge` (one L2 segment per node) or `ptp` (a routed veth per pod, as Calico-style
    /// CNIs do), both Debian's with `host-local`. The default comes from `AMBIT_LAB_CNI` (`bridge` when unset),
    /// so a whole test suite can run on either.
    pub primary_cni: PrimaryCni,
    /// Another ztunnel on some nodes, instead of `ztunnel` (a drop-in peer measured beside Ambit's).
    pub peer: Option<PeerZtunnel>,
}

/// A drop-in peer ztunnel (Istio's, say) on some of the lab's nodes.
#[derive(Debug, Clone)]
pub struct PeerZtunnel {
    /// Its binary.
    pub binary: PathBuf,
    /// Extra environment for it (after the lab's and `ztunnel_env`).
    pub env: Vec<(String, String)>,
    /// The nodes (indexes) it runs on.
    pub nodes: Vec<usize>,
    /// Those nodes' agents' `loopbackRoute` (the other nodes' keep the default, on).
    pub loopback_route: bool,
}

/// The lab's primary CNI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryCni {
    /// Debian's `bridge`: every pod of a node on the `cni0` bridge, which is their gateway.
    Bridge,
    /// Debian's `ptp`: each pod its own veth, a /32 route to it on the node, the node's side its gateway.
    Ptp,
}

impl PrimaryCni {
    /// `AMBIT_LAB_CNI` (`bridge` or `ptp`), `bridge` when unset.
    pub fn from_env() -> PrimaryCni {
        match std::env::var("AMBIT_LAB_CNI").as_deref() {
            Ok("ptp") => PrimaryCni::Ptp,
            Ok("bridge") | Ok("") | Err(_) => PrimaryCni::Bridge,
            Ok(other) => panic!("AMBIT_LAB_CNI={other}: expected bridge or ptp"),
        }
    }

    /// The plugin's entry in the conflist, with `ipam`.
    fn entry(self, ipam: serde_json::Value) -> serde_json::Value {
        match self {
            PrimaryCni::Bridge => json!({
                "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
                "ipam": ipam,
            }),
            PrimaryCni::Ptp => json!({"type": "ptp", "ipMasq": false, "ipam": ipam}),
        }
    }
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            nodes: 2,
            enrolled_namespaces: vec!["mesh".into()],
            ztunnel: None,
            ztunnel_env: Vec::new(),
            log_level: "info".into(),
            start_daemons: true,
            kubernetes: false,
            runtime: false,
            dual_stack: false,
            control_plane: true,
            rule_backend: "nftables".into(),
            primary_cni: PrimaryCni::from_env(),
            peer: None,
        }
    }
}

/// One node.
pub struct Node {
    /// 0-based index.
    pub index: usize,
    /// Its name (`node1`, …), also `NODE_NAME` of its daemons.
    pub name: String,
    /// Its netns.
    pub netns: Netns,
    /// Its address on the fabric.
    pub ip: Ipv4Addr,
    /// Its pod CIDR.
    pub pod_cidr: String,
    /// Its fabric IPv6 address and IPv6 pod CIDR (dual-stack labs).
    pub v6: Option<(std::net::Ipv6Addr, String)>,
    /// Its directory (sockets, configs, logs).
    pub dir: PathBuf,
    /// Its CNI runtime view.
    pub cni: CniRunner,
    /// Its node agent.
    pub agent: Option<Proc>,
    /// Its ztunnel.
    pub ztunnel: Option<Proc>,
    /// Its container runtime (runtime tier).
    pub containerd: Option<crate::runtime::Containerd>,
}

impl Node {
    /// The agent's plugin socket.
    pub fn cni_socket(&self) -> PathBuf {
        self.dir.join("run/cni.sock")
    }

    /// The ZDS socket.
    pub fn zds_socket(&self) -> PathBuf {
        self.dir.join("run/ztunnel.sock")
    }

    /// Every file in the agent's state dir, records being written (`UID.json.tmp`) included: for checking that
    /// nothing is left.
    pub fn state_files(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("state")) else { return Vec::new() };
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        files
    }

    /// The agent's pod records: whole `UID.json` files only. A record being written is a `.json.tmp` until it
    /// is renamed, so reading every file of the directory would catch a half-written one.
    pub fn pod_records(&self) -> Vec<PathBuf> {
        let mut records = self.state_files();
        records.retain(|p| p.extension().is_some_and(|x| x == "json"));
        records
    }

    /// GET on ztunnel's admin or metrics port, from inside the node.
    pub fn ztunnel_get(&self, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(&self.netns, SocketAddr::from((Ipv4Addr::LOCALHOST, port)), path)
    }

    /// ztunnel's `/config_dump` as JSON.
    pub fn config_dump(&self) -> anyhow::Result<Value> {
        let (status, body) = self.ztunnel_get(ADMIN_PORT, "/config_dump")?;
        anyhow::ensure!(status == 200, "config_dump answered {status}: {body}");
        Ok(serde_json::from_str(&body)?)
    }

    /// ztunnel's Prometheus metrics text.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = self.ztunnel_get(METRICS_PORT, "/metrics")?;
        anyhow::ensure!(status == 200, "metrics answered {status}");
        Ok(body)
    }
}

/// One pod.
pub struct Pod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// Service account.
    pub service_account: String,
    /// The node it runs on.
    pub node: usize,
    /// Its netns.
    pub netns: Netns,
    /// Its IPv4 address.
    pub ip: IpAddr,
    /// Its IPv6 address (dual-stack labs).
    pub ip6: Option<IpAddr>,
    /// The sandbox id.
    pub container_id: String,
    /// The conflist's final ADD result (cached for DEL, as a runtime does).
    pub result: Value,
    /// How long each plugin took in ADD.
    pub timings: Timings,
    /// The sandbox's process, in Kubernetes-tier pods (what /proc discovery finds).
    pub sandbox: Option<Sandbox>,
}

/// A pod's "pause" process: it lives in the pod's netns and in a cgroup named after the pod's UID, as a
/// container runtime would put it, so the agent can find a running pod through /proc.
pub struct Sandbox {
    proc: Proc,
    cgroup: PathBuf,
}

impl Sandbox {
    fn start(netns: &Netns, uid: &str, container_id: &str, log: &Path) -> anyhow::Result<Sandbox> {
        let root = ["/sys/fs/cgroup/pids", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(Path::new)
            .find(|p| p.join("cgroup.procs").exists())
            .context("no writable cgroup hierarchy for the sandbox")?;
        let cgroup = root.join(format!("kubepods/besteffort/pod{uid}/{container_id}"));
        std::fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
        let mut cmd = netns.command("sleep");
        cmd.arg("infinity");
        let proc = Proc::spawn("pause", cmd, log)?;
        std::fs::write(cgroup.join("cgroup.procs"), proc.pid().to_string())
            .with_context(|| format!("moving the sandbox into {}", cgroup.display()))?;
        // Recorded so that `lab clean` can remove the cgroups of a killed run.
        if let Some(dir) = log.parent() {
            use std::io::Write;
            if let Ok(mut f) = std::fs::File::options().create(true).append(true).open(dir.join("cgroups")) {
                let _ = writeln!(f, "{}", cgroup.display());
            }
        }
        Ok(Sandbox { proc, cgroup })
    }

    /// The sandbox process's pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.proc.kill();
        // Remove the pod's cgroups, innermost first; a non-empty one is left alone.
        let mut dir = self.cgroup.clone();
        for _ in 0..3 {
            let _ = std::fs::remove_dir(&dir);
            if !dir.pop() {
                break;
            }
        }
    }
}

/// What the lab's "kubelet" creates in the Kubernetes tier.
#[derive(Debug, Clone, Default)]
pub struct PodSpec {
    /// Service account (default `default`).
    pub service_account: Option<String>,
    /// Labels.
    pub labels: Vec<(String, String)>,
    /// Annotations.
    pub annotations: Vec<(String, String)>,
}

impl Pod {
    /// `namespace/name`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Its SPIFFE identity.
    pub fn identity(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}", self.namespace, self.service_account)
    }

    /// `ip:port`.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, port)
    }

    /// How the runtime names this sandbox to CNI.
    pub fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            netns: self.netns.path(),
            ifname: "eth0".into(),
            args: cni_args(&self.namespace, &self.name, &self.uid),
        }
    }

    /// `nft list ruleset` inside the pod.
    pub fn nft_ruleset(&self) -> anyhow::Result<String> {
        self.netns.exec("nft", &["list", "ruleset"])
    }
}

fn cni_args(namespace: &str, name: &str, uid: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=x;K8S_POD_UID={uid}"
    )
}

/// Turns IPv6 duplicate address detection off in `netns`, so its addresses are usable at once.
fn no_dad(netns: &Netns) -> anyhow::Result<()> {
    for conf in ["all", "default"] {
        netns.sysctl(&format!("net.ipv6.conf.{conf}.accept_dad"), "0")?;
    }
    Ok(())
}

/// The pod's first IPv4 (else first) address and its first IPv6 address, from a CNI result.
fn result_ips(result: &Value) -> anyhow::Result<(IpAddr, Option<IpAddr>)> {
    let ips: Vec<IpAddr> = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse().ok())
        .collect();
    let ip = ips
        .iter()
        .find(|i| i.is_ipv4())
        .or(ips.first())
        .copied()
        .ok_or_else(|| anyhow::anyhow!("CNI result without an IP: {result}"))?;
    Ok((ip, ips.iter().find(|i| i.is_ipv6()).copied()))
}

/// The lab.
pub struct Lab {
    /// Unique id of this run.
    pub id: String,
    /// Its directory.
    pub dir: PathBuf,
    /// The config it was built with.
    pub config: LabConfig,
    /// The nodes.
    pub nodes: Vec<Node>,
    fabric: Option<Netns>,
    workloads: Mutex<BTreeMap<String, Published>>,
    mesh: Mutex<MeshConfig>,
    service_accounts: Mutex<BTreeMap<(String, String), String>>,
    /// Pods the agents leave uncaptured whatever their namespace (`mode: none`, as Istio labels waypoints).
    not_captured: Mutex<std::collections::BTreeSet<(String, String)>>,
    known_pods: Mutex<Vec<crate::controlplane::KnownPod>>,
    publishing: Mutex<()>,
    control_plane: Option<crate::controlplane::ControlPlane>,
    kube: Option<crate::kube::KubeApi>,
    keep: bool,
}

impl Lab {
    /// Builds the lab: fabric, nodes, CA, configs, and (unless disabled) each node's agent and ztunnel, ready.
    pub fn start(config: LabConfig) -> anyhow::Result<Lab> {
        crate::util::require_root();
        let id = unique_id();
        let dir = std::env::temp_dir().join(format!("ambit-lab-{id}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("owner.pid"), std::process::id().to_string())?;
        let mut lab = Lab {
            id: id.clone(),
            dir: dir.clone(),
            config: config.clone(),
            nodes: Vec::new(),
            fabric: None,
            workloads: Mutex::new(BTreeMap::new()),
            mesh: Mutex::default(),
            service_accounts: Mutex::new(BTreeMap::new()),
            not_captured: Mutex::default(),
            known_pods: Mutex::new(Vec::new()),
            publishing: Mutex::new(()),
            control_plane: None,
            kube: None,
            keep: false,
        };

        let fabric = Netns::create(&format!("ambit-{id}-fabric"))?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        lab.fabric = Some(fabric);
        if config.kubernetes {
            let api = crate::kube::KubeApi::start(&format!("ambit-{id}-api"), lab.fabric(), &dir.join("api"))?;
            lab.kube = Some(api);
        }

        for p in ["bridge", "ptp", "host-local", "loopback", "portmap"] {
            let target = Path::new("/usr/lib/cni").join(p);
            anyhow::ensure!(
                target.exists(),
                "{} is missing: install Debian's containernetworking-plugins",
                target.display()
            );
        }

        let (cp_cert, cp_key) = (dir.join("cp/serving-cert.pem"), dir.join("cp/serving-key.pem"));
        std::fs::create_dir_all(dir.join("cp"))?;
        crate::ca::write_ca(&dir.join("ca-cert.pem"), &dir.join("ca-key.pem"), Some((&cp_cert, &cp_key)))?;
        lab.write_workloads()?;
        if config.control_plane {
            let cp = crate::controlplane::ControlPlane::start(
                &format!("ambit-{id}-cp"),
                lab.fabric(),
                &dir.join("cp"),
                &lab.workloads_path(),
                (dir.join("ca-cert.pem"), dir.join("ca-key.pem")),
                (cp_cert, cp_key),
            )?;
            lab.control_plane = Some(cp);
        }

        for i in 0..config.nodes {
            let node = lab.make_node(i)?;
            lab.nodes.push(node);
            lab.write_agent_config(i)?;
        }
        let saved = json!({
            "nodes": config.nodes,
            "enrolledNamespaces": config.enrolled_namespaces,
            "controlPlane": config.control_plane,
            "dualStack": config.dual_stack,
            "kubernetes": config.kubernetes,
        });
        std::fs::write(dir.join("lab.json"), serde_json::to_vec_pretty(&saved)?)?;
        if let Some(cp) = &lab.control_plane {
            for n in &lab.nodes {
                cp.route_pods(&n.pod_cidr, n.ip)?;
            }
        }
        for i in 0..config.nodes {
            let peer_routes: Vec<(String, Ipv4Addr)> =
                lab.nodes.iter().filter(|n| n.index != i).map(|n| (n.pod_cidr.clone(), n.ip)).collect();
            for (cidr, via) in peer_routes {
                lab.nodes[i].netns.ip(&["route", "add", &cidr, "via", &via.to_string()])?;
            }
            let peer_routes6: Vec<(String, std::net::Ipv6Addr)> = lab
                .nodes
                .iter()
                .filter(|n| n.index != i)
                .filter_map(|n| n.v6.as_ref().map(|(ip, cidr)| (cidr.clone(), *ip)))
                .collect();
            for (cidr, via) in peer_routes6 {
                lab.nodes[i].netns.ip(&["-6", "route", "add", &cidr, "via", &via.to_string()])?;
            }
        }
        if config.start_daemons {
            for i in 0..config.nodes {
                lab.start_agent(i)?;
                lab.start_ztunnel(i)?;
            }
            for i in 0..config.nodes {
                lab.wait_ready(i)?;
                lab.wait_agent_ready(i)?;
            }
        }
        if config.runtime {
            let pause = crate::runtime::build_pause_image(&dir.join("images"))?;
            for n in &mut lab.nodes {
                let c = crate::runtime::Containerd::start(
                    &n.netns,
                    &n.dir.join("containerd"),
                    &n.cni.bin_dir,
                    &n.cni.conf_dir,
                    &pause,
                )?;
                n.containerd = Some(c);
            }
        }
        Ok(lab)
    }

    fn make_node(&self, i: usize) -> anyhow::Result<Node> {
        let name = format!("node{}", i + 1);
        let dir = self.dir.join(&name);
        for d in ["run", "net.d", "ipam", "state", "cni-bin"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        // The node's /opt/cni/bin: Debian's plugins; the agent's installer adds ambit-cni.
        let bin = dir.join("cni-bin");
        for p in ["bridge", "ptp", "host-local", "loopback", "portmap"] {
            std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(p), bin.join(p))?;
        }
        let netns = Netns::create(&format!("ambit-{}-{name}", self.id))?;
        let fabric = self.fabric.as_ref().expect("fabric");
        let port = format!("n{i}");
        fabric.ip(&["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", netns.name()])?;
        fabric.ip(&["link", "set", &port, "master", "br0", "up"])?;
        let ip = Ipv4Addr::new(172, 30, 0, (i + 1) as u8);
        netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.sysctl("net.ipv4.ip_forward", "1")?;
        let pod_cidr = format!("10.244.{}.0/24", i + 1);
        let v6 = if self.config.dual_stack {
            // cni0, made later, inherits `default`.
            no_dad(&netns)?;
            netns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            let ip6: std::net::Ipv6Addr = format!("fd00:30::{}", i + 1).parse()?;
            netns.ip(&["-6", "addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
            Some((ip6, format!("fd00:244:{}::/64", i + 1)))
        } else {
            None
        };
        let mut ranges = vec![json!([{"subnet": pod_cidr}])];
        let mut routes = vec![json!({"dst": "0.0.0.0/0"})];
        if let Some((_, cidr6)) = &v6 {
            ranges.push(json!([{"subnet": cidr6}]));
            routes.push(json!({"dst": "::/0"}));
        }

        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": "lab",
            "plugins": [self.config.primary_cni.entry(json!({
                "type": "host-local",
                "ranges": ranges,
                "routes": routes,
                "dataDir": dir.join("ipam"),
            }))]
        });
        // The node's ztunnel token (a projected service account token in a cluster), known to the control plane.
        let token = format!("{}{}{}", unique_id(), unique_id(), unique_id());
        std::fs::write(dir.join("istio-token"), &token)?;
        if let Some(cp) = &self.control_plane {
            cp.add_token(&token, &name)?;
        }
        // The primary CNI's config, as the primary CNI writes it: the agent's installer chains ambit-cni.
        write_atomic(&dir.join("net.d/10-lab.conflist"), serde_json::to_string_pretty(&conflist)?.as_bytes())?;
        Ok(Node {
            index: i,
            name,
            netns,
            ip,
            pod_cidr,
            v6,
            cni: CniRunner { bin_dir: bin, conf_dir: dir.join("net.d") },
            dir,
            agent: None,
            ztunnel: None,
            containerd: None,
        })
    }

    /// The fabric netns.
    pub fn fabric(&self) -> &Netns {
        self.fabric.as_ref().expect("fabric")
    }

    /// Keep everything when the lab is dropped (for `lab demo --keep`); `lab clean` removes it later.
    pub fn keep(&mut self) {
        self.keep = true;
        let _ = std::fs::write(self.dir.join("kept"), b"");
    }

    /// Undoes [`Lab::keep`]: the lab is removed on drop again.
    pub fn unkeep(&mut self) {
        self.keep = false;
        let _ = std::fs::remove_file(self.dir.join("kept"));
    }

    /// Logs of every daemon, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Some(cp) = &self.control_plane {
            s.push_str(&format!("----- control plane -----\n{}\n", tail(&cp.log(), 40)));
        }
        for n in &self.nodes {
            for (what, p) in [("agent", &n.agent), ("ztunnel", &n.ztunnel)] {
                if let Some(p) = p {
                    s.push_str(&format!(
                        "----- {} {what} ({}) -----\n{}\n",
                        n.name,
                        p.log_path().display(),
                        tail(&p.log(), 60)
                    ));
                }
            }
        }
        s
    }

    /// Time since `t`, in ms, for progress output.
    pub fn ms(t: Instant) -> u128 {
        t.elapsed().as_millis()
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// The workload uid the lab publishes for a pod (Istio's `<cluster>//Pod/<ns>/<name>` form).
pub fn workload_uid(pod: &Pod) -> String {
    format!("Kubernetes//Pod/{}/{}", pod.namespace, pod.name)
}

/// Why a pod could not be created.
#[derive(Debug)]
pub enum PodError {
    /// The CNI chain failed.
    Cni(CniFailure),
    /// The lab failed to set it up.
    Setup(anyhow::Error),
}

impl std::fmt::Display for PodError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PodError::Cni(e) => write!(f, "{e}"),
            PodError::Setup(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for PodError {}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // Sandboxes go before the agents they need for CNI DEL.
        for n in &mut self.nodes {
            n.containerd.take();
        }
        for n in &mut self.nodes {
            if let Some(mut z) = n.ztunnel.take() {
                z.stop(Duration::from_secs(3));
            }
            if let Some(mut a) = n.agent.take() {
                a.stop(Duration::from_secs(3));
            }
        }
        self.nodes.clear();
        self.control_plane.take();
        self.kube.take();
        self.fabric.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes what crashed, killed or kept labs left behind: their processes, their netns (`ambit-<id>-…`) and
/// their directories. A lab whose owner process is alive is left alone, and so is a kept lab unless
/// `include_kept`. Returns what it removed.
pub fn clean_stale(include_kept: bool) -> Vec<String> {
    let mut removed = Vec::new();
    for e in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_prefix("ambit-lab-") else { continue };
        let dir = e.path();
        let owner: Option<i32> =
            std::fs::read_to_string(dir.join("owner.pid")).ok().and_then(|s| s.trim().parse().ok());
        let alive = owner.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        let kept = dir.join("kept").exists();
        if alive || (kept && !include_kept) {
            continue;
        }
        removed.extend(remove_lab(id, &dir));
    }
    removed
}

/// Removes one lab by id: stops its processes, deletes its netns and its directory. Used by `lab clean` and
/// by `lab`'s Ctrl-C handler.
pub fn remove_lab(id: &str, dir: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    for pids in walk_files(dir, "pids") {
        for pid in
            std::fs::read_to_string(&pids).unwrap_or_default().lines().filter_map(|l| l.trim().parse::<i32>().ok())
        {
            // Only a process that is still one of ours (pids get reused).
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let ours = ["ambit-agent", "ztunnel", "tcpdump", "iperf3", "control-plane", "echo"]
                .iter()
                .any(|n| cmd.windows(n.len()).any(|w| w == n.as_bytes()));
            if ours {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
    for e in std::fs::read_dir("/var/run/netns").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("ambit-{id}-")) {
            if let Ok(ns) = netns_rs::NetNs::get(&name) {
                let _ = ns.remove();
            }
            removed.push(format!("netns {name}"));
        }
    }
    crate::runtime::cleanup_runtime_leftovers(dir);
    for list in walk_files(dir, "cgroups") {
        for cg in std::fs::read_to_string(&list).unwrap_or_default().lines() {
            let mut d = PathBuf::from(cg);
            for _ in 0..3 {
                let _ = std::fs::remove_dir(&d);
                d.pop();
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    removed.push(dir.display().to_string());
    removed
}

fn walk_files(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_files(&p, name));
        } else if p.file_name().is_some_and(|n| n == name) {
            out.push(p);
        }
    }
    out
}
