//! The lab: a small cluster made of network namespaces.
//!
//! - a fabric netns with a bridge joins the nodes (each node's `eth0`, 172.30.0.N/24), and each node routes
//!   the other nodes' pod CIDRs (10.244.N.0/24) over it;
//! - a netns per node runs the real `ambit-agent` and `ztunnel` processes and the CNI chain;
//! - a netns per pod, created as a runtime creates one (`/var/run/netns/…`), gets its interface and IP from
//!   Debian's `bridge` + `host-local` plugins with `ambit-cni` chained after them, run by [`CniRunner`];
//! - the lab plays istiod: a control plane process ([`crate::controlplane`]) in its own netns on the fabric
//!   serves istiod's CA and delta xDS from the mesh file the lab writes, and alone holds the mesh's root key;
//!   with `control_plane: false` every ztunnel reads that file itself and signs with a local copy of the CA
//!   (the mode without a control plane).
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
use crate::util::{binary, unique_id, wait_for};

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

/// A workload entry the lab publishes (Istio ztunnel local-file format).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Published {
    uid: String,
    name: String,
    namespace: String,
    service_account: String,
    ip: IpAddr,
    ip6: Option<IpAddr>,
    node: String,
    hbone: bool,
}

/// What the lab publishes besides workloads, as istiod would: services, policies, and per-workload service
/// memberships and policy selections (by pod UID).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct MeshConfig {
    services: Vec<Value>,
    policies: Vec<Value>,
    memberships: BTreeMap<String, Value>,
    selections: BTreeMap<String, Vec<String>>,
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

        for p in ["bridge", "host-local", "loopback", "portmap"] {
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
        for p in ["bridge", "host-local", "loopback", "portmap"] {
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
            "plugins": [
                {
                    "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": ranges,
                        "routes": routes,
                        "dataDir": dir.join("ipam"),
                    }
                }
            ]
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

    /// Starts (or restarts) node `i`'s agent without waiting for anything.
    pub fn spawn_agent(&mut self, i: usize) -> anyhow::Result<()> {
        self.spawn_agent_with_env(i, &[])
    }

    /// [`Lab::spawn_agent`] with extra environment (e.g. the `POD_NAME` of the agent's own pod).
    pub fn spawn_agent_with_env(&mut self, i: usize, env: &[(&str, &str)]) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        if let Some(mut old) = node.agent.take() {
            old.stop(Duration::from_secs(5));
        }
        let _ = std::fs::remove_file(node.cni_socket());
        let mut cmd = node.netns.command(binary("ambit-agent"));
        cmd.arg("--config").arg(node.dir.join("agent.yaml")).env("RUST_LOG", &self.config.log_level);
        cmd.envs(env.iter().copied());
        let p = Proc::spawn("ambit-agent", cmd, &node.dir.join("agent.log"))?;
        node.agent = Some(p);
        Ok(())
    }

    /// Starts (or restarts) node `i`'s agent and waits until it serves the plugin with ambit-cni chained (and,
    /// when its ztunnel runs, until that ztunnel is connected).
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        self.spawn_agent(i)?;
        let node = &self.nodes[i];
        let sock = node.cni_socket();
        let cni = node.cni.clone();
        wait_for(&format!("{}'s agent socket and chained CNI config", node.name), Duration::from_secs(10), || {
            let chained = cni.load_conflist().ok()?["plugins"].as_array()?.iter().any(|p| p["type"] == "ambit-cni");
            (sock.exists() && chained).then_some(())
        })
        .with_context(|| node.agent.as_ref().map(|a| a.log()).unwrap_or_default())?;
        if node.ztunnel.is_some() {
            self.wait_agent_ready(i)?;
        }
        Ok(())
    }

    /// GET on node `i`'s agent health endpoint.
    pub fn agent_get(&self, i: usize, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(&self.nodes[i].netns, SocketAddr::from((Ipv4Addr::LOCALHOST, AGENT_HEALTH_PORT)), path)
    }

    /// Runs `ambit-agent <args>` once on node `i` (e.g. `uninstall`) with the node's agent config.
    pub fn agent_command(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        let node = &self.nodes[i];
        let out = node
            .netns
            .command(binary("ambit-agent"))
            .arg("--config")
            .arg(node.dir.join("agent.yaml"))
            .args(args)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(out.status.success(), "ambit-agent {} failed: {text}", args.join(" "));
        Ok(text)
    }

    /// Waits until node `i`'s agent reports ready (plugin installed, a ztunnel connected).
    pub fn wait_agent_ready(&self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        wait_for(&format!("{}'s agent to be ready", node.name), Duration::from_secs(10), || {
            matches!(self.agent_get(i, "/readyz"), Ok((200, _))).then_some(())
        })
        .with_context(|| node.agent.as_ref().map(|a| a.log()).unwrap_or_default())
    }

    /// The environment ztunnel gets on node `i`.
    pub fn ztunnel_env(&self, i: usize) -> Vec<(String, String)> {
        let node = &self.nodes[i];
        let root = self.dir.join("ca-cert.pem").display().to_string();
        let kv = |k: &str, v: String| (k.to_string(), v);
        let mut env = vec![
            kv("INPOD_UDS", node.zds_socket().display().to_string()),
            kv("NODE_NAME", node.name.clone()),
            kv("TRUST_DOMAIN", TRUST_DOMAIN.to_string()),
            kv("RUST_LOG", self.config.log_level.clone()),
        ];
        if self.config.control_plane {
            // As Istio's DaemonSet sets them: istiod for both, the mounted root and projected token.
            let istiod = format!("https://{}:{}", crate::controlplane::CP_IP, crate::controlplane::CP_PORT);
            env.extend([
                kv("CA_ADDRESS", istiod.clone()),
                kv("XDS_ADDRESS", istiod),
                kv("CA_ROOT_CA", root.clone()),
                kv("XDS_ROOT_CA", root),
                kv("AUTH_TOKEN", node.dir.join("istio-token").display().to_string()),
                kv("POD_NAME", format!("ztunnel-{}", node.name)),
                kv("POD_NAMESPACE", "istio-system".into()),
                kv("INSTANCE_IP", node.ip.to_string()),
            ]);
        } else {
            env.extend([
                kv("LOCAL_XDS_PATH", self.workloads_path().display().to_string()),
                kv("XDS_ADDRESS", String::new()),
                kv("AMBIT_LOCAL_CA_CERT", root),
                kv("AMBIT_LOCAL_CA_KEY", self.dir.join("ca-key.pem").display().to_string()),
            ]);
        }
        env.extend(self.config.ztunnel_env.iter().cloned());
        env
    }

    /// Starts (or restarts) node `i`'s ztunnel (not waiting for readiness).
    pub fn start_ztunnel(&mut self, i: usize) -> anyhow::Result<()> {
        let env = self.ztunnel_env(i);
        let bin = self.config.ztunnel.clone().unwrap_or_else(|| binary("ztunnel"));
        let node = &mut self.nodes[i];
        if let Some(mut old) = node.ztunnel.take() {
            old.stop(Duration::from_secs(10));
        }
        let mut cmd = node.netns.command(bin);
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").envs(env);
        node.ztunnel = Some(Proc::spawn("ztunnel", cmd, &node.dir.join("ztunnel.log"))?);
        Ok(())
    }

    /// Kills node `i`'s ztunnel outright (SIGKILL: no drain).
    pub fn kill_ztunnel(&mut self, i: usize) {
        if let Some(mut z) = self.nodes[i].ztunnel.take() {
            z.kill();
        }
    }

    /// Kills node `i`'s agent outright (SIGKILL: no shutdown).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut a) = self.nodes[i].agent.take() {
            a.kill();
        }
    }

    /// The primary CNI rewrites its conflist (as it does when it restarts), dropping the chained ambit-cni;
    /// returns once node `i`'s agent has chained it again, with how long that took.
    pub fn primary_cni_rewrites_conflist(&self, i: usize) -> anyhow::Result<Duration> {
        let n = &self.nodes[i];
        let mut list = n.cni.load_conflist()?;
        if let Some(plugins) = list["plugins"].as_array_mut() {
            plugins.retain(|p| p["type"] != "ambit-cni");
        }
        let t = Instant::now();
        write_atomic(&n.dir.join("net.d/10-lab.conflist"), serde_json::to_string_pretty(&list)?.as_bytes())?;
        wait_for(&format!("{}'s agent to chain ambit-cni again", n.name), Duration::from_secs(10), || {
            let chained = n.cni.load_conflist().ok()?["plugins"].as_array()?.iter().any(|p| p["type"] == "ambit-cni");
            chained.then_some(())
        })?;
        Ok(t.elapsed())
    }

    /// Breaks the mesh file the control plane serves (it no longer parses) for `d`, then writes it whole again;
    /// nothing else can publish meanwhile. The control plane must keep serving its last good version.
    pub fn break_mesh_file_for(&self, d: Duration) -> anyhow::Result<()> {
        let _one_at_a_time = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        {
            let _held = self.workloads.lock().unwrap();
            write_atomic(&self.workloads_path(), b"workloads: [this is not {a mesh file\n")?;
            std::thread::sleep(d);
        }
        self.write_workloads().map(|_| ())
    }

    /// Starts another ztunnel on node `i` beside the running one (an upgrade's surge), its control ports moved
    /// by `port_offset` so both can run in the node's netns. The caller owns the process.
    pub fn spawn_extra_ztunnel(&self, i: usize, port_offset: u16, log_name: &str) -> anyhow::Result<Proc> {
        let mut env = self.ztunnel_env(i);
        env.push(("ADMIN_ADDR".into(), format!("127.0.0.1:{}", ADMIN_PORT + port_offset)));
        env.push(("STATS_ADDR".into(), format!("[::]:{}", METRICS_PORT + port_offset)));
        env.push(("READINESS_ADDR".into(), format!("[::]:{}", READY_PORT + port_offset)));
        let bin = self.config.ztunnel.clone().unwrap_or_else(|| binary("ztunnel"));
        let node = &self.nodes[i];
        let mut cmd = node.netns.command(bin);
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").envs(env);
        Proc::spawn("ztunnel", cmd, &node.dir.join(log_name))
    }

    /// Waits until node `i`'s ztunnel reports ready (connected to the agent and synced).
    pub fn wait_ready(&self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        wait_for(&format!("{}'s ztunnel to be ready", node.name), Duration::from_secs(20), || {
            matches!(node.ztunnel_get(READY_PORT, "/healthz/ready"), Ok((200, _))).then_some(())
        })
        .with_context(|| node.ztunnel.as_ref().map(|z| z.log()).unwrap_or_default())
    }

    /// The workload file all ztunnels read.
    pub fn workloads_path(&self) -> PathBuf {
        self.dir.join("workloads.yaml")
    }

    /// Writes the mesh file; returns the version the control plane serves it under.
    fn write_workloads(&self) -> anyhow::Result<String> {
        let w = self.workloads.lock().unwrap();
        let mesh = self.mesh.lock().unwrap();
        let workloads: Vec<Value> = w
            .iter()
            .map(|(pod_uid, p)| {
                json!({
                    "uid": p.uid, "name": p.name, "namespace": p.namespace, "serviceAccount": p.service_account,
                    "workloadIps": std::iter::once(p.ip).chain(p.ip6).map(|i| i.to_string()).collect::<Vec<_>>(), "protocol": if p.hbone { "HBONE" } else { "TCP" },
                    "node": p.node, "trustDomain": TRUST_DOMAIN,
                    "services": mesh.memberships.get(pod_uid).cloned().unwrap_or_else(|| json!({})),
                    "authorizationPolicies": mesh.selections.get(pod_uid).cloned().unwrap_or_default(),
                })
            })
            .collect();
        let doc = json!({"workloads": workloads, "services": mesh.services, "policies": mesh.policies});
        let text = serde_yaml_ng::to_string(&doc)?;
        write_atomic(&self.workloads_path(), text.as_bytes())?;
        // What `lab pod` needs to change the mesh of a running lab later, from another process.
        let state = json!({"workloads": *w, "mesh": *mesh});
        write_atomic(&self.dir.join("published.json"), serde_json::to_string(&state)?.as_bytes())?;
        Ok(crate::controlplane::mesh_version(text.as_bytes()))
    }

    /// Rewrites the local file after `change` and waits until every running ztunnel has loaded it.
    fn republish(&self, change: impl FnOnce(&mut MeshConfig)) -> anyhow::Result<()> {
        self.rewrite(|_, m| change(m))
    }

    /// Rewrites the local file after `change` to the workloads and the rest, and waits until every running
    /// ztunnel has loaded it.
    fn rewrite(&self, change: impl FnOnce(&mut BTreeMap<String, Published>, &mut MeshConfig)) -> anyhow::Result<()> {
        // One change at a time, from the write to every ztunnel taking it: the control plane serves only the
        // file's latest version, so a change overtaken by another before it was pushed would be waited for
        // in vain.
        let _one_at_a_time = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        if self.config.control_plane {
            // Every ztunnel that is ready now must take the change.
            let ready: Vec<bool> = self
                .nodes
                .iter()
                .map(|n| matches!(n.ztunnel_get(READY_PORT, "/healthz/ready"), Ok((200, _))))
                .collect();
            let since = crate::controlplane::push_records_end(&self.control_plane().dir);
            let before = std::fs::read(self.workloads_path()).map(|b| crate::controlplane::mesh_version(&b));
            change(&mut self.workloads.lock().unwrap(), &mut self.mesh.lock().unwrap());
            let version = self.write_workloads()?;
            if before.is_ok_and(|b| b == version) {
                return Ok(()); // nothing changed: nothing will be pushed
            }
            return self.wait_pushed(&version, &ready, since);
        }
        let generation = |n: &Node| -> Option<u64> { n.config_dump().ok()?["configSource"]["generation"].as_u64() };
        let before: Vec<Option<u64>> = self.nodes.iter().map(|n| n.ztunnel.as_ref().and(generation(n))).collect();
        change(&mut self.workloads.lock().unwrap(), &mut self.mesh.lock().unwrap());
        self.write_workloads()?;
        for (n, before) in self.nodes.iter().zip(before) {
            let Some(before) = before else { continue };
            let refused =
                wait_for(&format!("{}'s ztunnel to load the new config", n.name), Duration::from_secs(10), || {
                    let dump = n.config_dump().ok()?;
                    let error = &dump["configSource"]["lastError"];
                    if !error.is_null() {
                        return Some(Some(error.to_string()));
                    }
                    (dump["configSource"]["generation"].as_u64()? > before).then_some(None)
                })?;
            if let Some(e) = refused {
                anyhow::bail!("{}'s ztunnel refused the config: {e}", n.name);
            }
        }
        Ok(())
    }

    /// Waits until the ztunnel of every node in `nodes` has ACKed both xDS types at `version` of the mesh file
    /// in a push answered after `since` (see [`crate::controlplane::push_records_end`]), as the control plane saw it (any ztunnel ACKs only once a push is in force); fails with the NACK's
    /// error if one refused it.
    fn wait_pushed(&self, version: &str, nodes: &[bool], since: u64) -> anyhow::Result<()> {
        use ambit_proto::control_plane::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
        let cp = self.control_plane();
        for (n, _) in self.nodes.iter().zip(nodes).filter(|(_, wait)| **wait) {
            let refused = wait_for(
                &format!("{}'s ztunnel to take version {version} over xDS", n.name),
                Duration::from_secs(10),
                || {
                    let records = crate::controlplane::push_records_since(&cp.dir, since);
                    let mine = || records.iter().filter(|r| r.node == n.name && r.version == version);
                    if let Some(e) = mine().find_map(|r| r.nack.clone()) {
                        return Some(Some(e));
                    }
                    [ADDRESS_TYPE, AUTHORIZATION_TYPE].iter().all(|t| mine().any(|r| r.type_url == *t)).then_some(None)
                },
            )
            .with_context(|| tail(&cp.log(), 30))?;
            if let Some(e) = refused {
                anyhow::bail!("{}'s ztunnel refused the xDS push: {e}", n.name);
            }
        }
        Ok(())
    }

    /// The lab's control plane (unless started with `control_plane: false`).
    pub fn control_plane(&self) -> &crate::controlplane::ControlPlane {
        self.control_plane.as_ref().expect("the lab was started with control_plane: true")
    }

    /// The control plane, to stop and restart it.
    pub fn control_plane_mut(&mut self) -> &mut crate::controlplane::ControlPlane {
        self.control_plane.as_mut().expect("the lab was started with control_plane: true")
    }

    /// Tells the control plane that a pod of `namespace`/`sa` runs on node `node`, so its ztunnel may ask for
    /// that identity (istiod learns it from the API server before the pod's sandbox starts).
    fn know_pod(&self, node: usize, namespace: &str, sa: &str) -> anyhow::Result<()> {
        let Some(cp) = &self.control_plane else { return Ok(()) };
        let mut known = self.known_pods.lock().unwrap();
        let p = crate::controlplane::KnownPod {
            node: self.nodes[node].name.clone(),
            namespace: namespace.into(),
            service_account: sa.into(),
        };
        if !known.contains(&p) {
            known.push(p);
            cp.set_known_pods(&known)?;
        }
        Ok(())
    }

    /// Publishes Istio `services:` entries (`{name, namespace, hostname, vips: ["/<ip>"], ports: {svc: target}}`).
    pub fn set_services(&self, services: Vec<Value>) -> anyhow::Result<()> {
        self.republish(|m| m.services = services)
    }

    /// Publishes Istio `policies:` (the `Authorization` model).
    pub fn set_policies(&self, policies: Vec<Value>) -> anyhow::Result<()> {
        self.republish(|m| m.policies = policies)
    }

    /// Sets a pod's workload `services` map (`{"<ns>/<hostname>": {svc port: target port}}`).
    pub fn set_pod_services(&self, pod: &Pod, services: Value) -> anyhow::Result<()> {
        self.republish(|m| {
            m.memberships.insert(pod.uid.clone(), services);
        })
    }

    /// Sets the WORKLOAD_SELECTOR policies (`<ns>/<name>`) that select a pod.
    pub fn set_pod_policies(&self, pod: &Pod, keys: &[&str]) -> anyhow::Result<()> {
        self.republish(|m| {
            m.selections.insert(pod.uid.clone(), keys.iter().map(|k| k.to_string()).collect());
        })
    }

    /// Removes a pod from the local file (its address becomes unknown to the mesh) without deleting it.
    pub fn unpublish(&self, pod: &Pod) -> anyhow::Result<()> {
        self.rewrite(|w, _| {
            w.remove(&pod.uid);
        })?;
        self.wait_workload_visible(&workload_uid(pod), false)
    }

    /// Waits until every running ztunnel has loaded a workload file that lists (or no longer lists) `uid`.
    fn wait_workload_visible(&self, uid: &str, present: bool) -> anyhow::Result<()> {
        for node in self.nodes.iter().filter(|n| n.ztunnel.is_some()) {
            wait_for(&format!("{}'s ztunnel to see workload {uid}", node.name), Duration::from_secs(10), || {
                let dump = node.config_dump().ok()?;
                let has = dump["workloads"].as_array()?.iter().any(|w| w["uid"] == uid);
                (has == present).then_some(())
            })?;
        }
        Ok(())
    }

    /// Creates a pod on node `node` as a runtime does: a new netns, then the CNI chain. On a CNI failure the
    /// netns is removed again (as the runtime would) and the failure is returned.
    pub fn add_pod(&self, node: usize, namespace: &str, name: &str) -> Result<Pod, PodError> {
        self.add_pod_as(node, namespace, name, "default")
    }

    /// Writes node `i`'s agent config: the enrolled namespaces and the service accounts of the pods it knows.
    fn write_agent_config(&self, i: usize) -> anyhow::Result<()> {
        self.write_agent_config_with(i, &self.service_accounts.lock().unwrap())
    }

    fn write_agent_config_with(&self, i: usize, accounts: &BTreeMap<(String, String), String>) -> anyhow::Result<()> {
        let n = &self.nodes[i];
        let pods: Vec<Value> = accounts
            .iter()
            .map(|((ns, name), sa)| json!({"namespace": ns, "name": name, "serviceAccount": sa}))
            .collect();
        let agent_conf = json!({
            "nodeName": n.name,
            "cniSocket": n.dir.join("run/cni.sock"),
            "zdsSocket": n.dir.join("run/ztunnel.sock"),
            "stateDir": n.dir.join("state"),
            // Tests wait for the sweep of pods deleted without a DEL; a node would keep the default.
            "sweepIntervalMs": 1000,
            "standalone": {"enrolledNamespaces": self.config.enrolled_namespaces, "pods": pods},
            "mode": if self.config.kubernetes { "kubernetes" } else { "standalone" },
            "kubernetes": {"kubeconfig": self.kube.as_ref().map(|k| k.kubeconfig.clone())},
            "install": {
                "cniBinDir": n.dir.join("cni-bin"),
                "cniConfDir": n.dir.join("net.d"),
                "pluginBinary": binary("ambit-cni"),
                "pluginConfig": {
                    "agent_timeout_ms": 10000,
                    "log_file": n.dir.join("cni.log"),
                    "log_level": if self.config.log_level.contains("debug") || self.config.log_level == "info" { "debug" } else { "info" },
                },
            },
        });
        write_atomic(&n.dir.join("agent.yaml"), serde_yaml_ng::to_string(&agent_conf)?.as_bytes())
    }

    /// [`Lab::add_pod`] with a service account.
    pub fn add_pod_as(&self, node: usize, namespace: &str, name: &str, sa: &str) -> Result<Pod, PodError> {
        let pod = self.create_pod(node, namespace, name, sa)?;
        self.publish(&pod).map_err(PodError::Setup)?;
        Ok(pod)
    }

    /// Creates a pod as a runtime does (netns, CNI chain) without publishing it as a workload: istiod has not
    /// pushed it yet. Safe to call from several threads at once.
    pub fn create_pod(&self, node: usize, namespace: &str, name: &str, sa: &str) -> Result<Pod, PodError> {
        self.create_pod_with(node, namespace, name, sa, |_| {})
    }

    /// [`Lab::create_pod`], calling `before_cni` with the pod's fresh netns just before the CNI ADD (e.g. to
    /// remove the netns while the ADD runs).
    pub fn create_pod_with(
        &self,
        node: usize,
        namespace: &str,
        name: &str,
        sa: &str,
        before_cni: impl FnOnce(&Netns),
    ) -> Result<Pod, PodError> {
        // Standalone mode has no pod spec to read the service account from: the lab tells the agent, as an
        // operator would in its config.
        {
            // Held while the config is written, so concurrent pods never write an older list over a newer one.
            let mut accounts = self.service_accounts.lock().unwrap();
            accounts.insert((namespace.to_string(), name.to_string()), sa.to_string());
            self.write_agent_config_with(node, &accounts).map_err(PodError::Setup)?;
        }
        self.know_pod(node, namespace, sa).map_err(PodError::Setup)?;
        let n = &self.nodes[node];
        let uid = format!("{}-{}", unique_id(), unique_id());
        let container_id = format!("{}{}{}", unique_id(), unique_id(), unique_id());
        let netns = Netns::create(&format!("ambit-{}-{}-{}", self.id, namespace, name)).map_err(PodError::Setup)?;
        if self.config.dual_stack {
            // As a runtime's sandbox would.
            no_dad(&netns).map_err(PodError::Setup)?;
        }
        let att = Attachment {
            container_id: container_id.clone(),
            netns: netns.path(),
            ifname: "eth0".into(),
            args: cni_args(namespace, name, &uid),
        };
        before_cni(&netns);
        let (result, timings) = match n.cni.add(&n.netns, &att) {
            Ok(r) => r,
            Err(e) => {
                // The runtime cleans up a failed sandbox with DEL, then removes the netns.
                let _ = n.cni.del(&n.netns, &att, None);
                return Err(PodError::Cni(e));
            }
        };
        let (ip, ip6) = result_ips(&result).map_err(PodError::Setup)?;
        // As a runtime keeps its sandboxes' state: `lab pod del` finds the pod (and its cached result) here.
        let record = json!({
            "namespace": namespace, "name": name, "uid": uid, "serviceAccount": sa, "node": node,
            "containerId": container_id, "result": result,
        });
        let _ = std::fs::create_dir_all(self.dir.join("pods"));
        let _ = std::fs::write(self.pod_record(namespace, name), record.to_string());
        let pod = Pod {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.clone(),
            service_account: sa.into(),
            node,
            netns,
            ip,
            ip6,
            container_id,
            result,
            timings,
            sandbox: None,
        };
        Ok(pod)
    }

    /// The Kubernetes API of the Kubernetes tier.
    pub fn kube(&self) -> &crate::kube::KubeApi {
        self.kube.as_ref().expect("the lab was started with kubernetes: true")
    }

    /// The Kubernetes API, to stop and start it.
    pub fn kube_mut(&mut self) -> &mut crate::kube::KubeApi {
        self.kube.as_mut().expect("the lab was started with kubernetes: true")
    }

    /// Creates or relabels a namespace (`mode`: the `istio.io/dataplane-mode` label, `None` removes it).
    pub fn k8s_namespace(&self, name: &str, mode: Option<&str>) -> anyhow::Result<()> {
        let name = name.to_string();
        let mode = mode.map(str::to_string);
        self.kube().run(move |c| async move {
            use k8s_openapi::api::core::v1::Namespace;
            use kube::api::{Api, Patch, PatchParams, PostParams};
            let api: Api<Namespace> = Api::all(c);
            if api.get_opt(&name).await?.is_none() {
                let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
                api.create(&PostParams::default(), &ns).await?;
            }
            let patch = json!({"metadata": {"labels": {"istio.io/dataplane-mode": mode}}});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            anyhow::Ok(())
        })?
    }

    /// Runs a pod as a kubelet and its runtime do in the Kubernetes tier: the Pod object (bound to the node), a
    /// netns with a sandbox process in the pod's cgroup, the CNI chain, then the pod's status (Running, its IP).
    /// On a CNI failure everything is undone and the failure returned.
    pub fn add_k8s_pod(&self, node: usize, namespace: &str, name: &str, spec: PodSpec) -> Result<Pod, PodError> {
        let n = &self.nodes[node];
        let sa = spec.service_account.clone().unwrap_or_else(|| "default".into());
        self.know_pod(node, namespace, &sa).map_err(PodError::Setup)?;
        let labels: serde_json::Map<String, Value> = spec.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        let annotations: serde_json::Map<String, Value> =
            spec.annotations.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        let object = json!({
            "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
            "spec": {"nodeName": n.name, "serviceAccountName": sa, "containers": [{"name": "app", "image": "busybox"}]},
        });
        let ns_name = namespace.to_string();
        let uid: String = self
            .kube()
            .run(move |c| async move {
                use k8s_openapi::api::core::v1::Pod as KPod;
                let api: kube::Api<KPod> = kube::Api::namespaced(c, &ns_name);
                let p: KPod = serde_json::from_value(object)?;
                let created = api.create(&Default::default(), &p).await?;
                anyhow::Ok(created.metadata.uid.unwrap_or_default())
            })
            .and_then(|r| r)
            .map_err(PodError::Setup)?;
        let container_id = format!("{}{}{}", unique_id(), unique_id(), unique_id());
        let netns = Netns::create(&format!("ambit-{}-{}-{}", self.id, namespace, name)).map_err(PodError::Setup)?;
        let sandbox = Sandbox::start(&netns, &uid, &container_id, &n.dir.join(format!("pause-{namespace}-{name}.log")))
            .map_err(PodError::Setup)?;
        let att = Attachment {
            container_id: container_id.clone(),
            netns: netns.path(),
            ifname: "eth0".into(),
            args: cni_args(namespace, name, &uid),
        };
        let (result, timings) = match n.cni.add(&n.netns, &att) {
            Ok(r) => r,
            Err(e) => {
                let _ = n.cni.del(&n.netns, &att, None);
                let _ = self.delete_k8s_object(namespace, name);
                return Err(PodError::Cni(e));
            }
        };
        let (ip, ip6) = result_ips(&result).map_err(PodError::Setup)?;
        self.set_pod_status(namespace, name, "Running", Some(ip)).map_err(PodError::Setup)?;
        Ok(Pod {
            namespace: namespace.into(),
            name: name.into(),
            uid,
            service_account: sa,
            node,
            netns,
            ip,
            ip6,
            container_id,
            result,
            timings,
            sandbox: Some(sandbox),
        })
    }

    /// Sets a pod's phase (and IP) through the status subresource, as a kubelet does.
    pub fn set_pod_status(&self, namespace: &str, name: &str, phase: &str, ip: Option<IpAddr>) -> anyhow::Result<()> {
        let (ns, name, phase) = (namespace.to_string(), name.to_string(), phase.to_string());
        let host_ip = "172.30.0.1";
        self.kube().run(move |c| async move {
            use k8s_openapi::api::core::v1::Pod as KPod;
            let api: kube::Api<KPod> = kube::Api::namespaced(c, &ns);
            let mut status = json!({"phase": phase, "hostIP": host_ip});
            if let Some(ip) = ip {
                status["podIP"] = json!(ip.to_string());
                status["podIPs"] = json!([{"ip": ip.to_string()}]);
            }
            api.patch_status(&name, &Default::default(), &kube::api::Patch::Merge(&json!({"status": status}))).await?;
            anyhow::Ok(())
        })?
    }

    fn delete_k8s_object(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        let (ns, name) = (namespace.to_string(), name.to_string());
        self.kube().run(move |c| async move {
            use k8s_openapi::api::core::v1::Pod as KPod;
            let api: kube::Api<KPod> = kube::Api::namespaced(c, &ns);
            let dp = kube::api::DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
            let _ = api.delete(&name, &dp).await?;
            anyhow::Ok(())
        })?
    }

    /// Removes a Kubernetes-tier pod as a kubelet does: CNI DEL, the sandbox, the Pod object, the netns.
    pub fn delete_k8s_pod(&self, pod: Pod) -> anyhow::Result<()> {
        self.cni_del(&pod)?;
        self.delete_k8s_object(&pod.namespace, &pod.name)?;
        drop(pod.sandbox);
        pod.netns.delete()
    }

    /// A pod object as the API has it now.
    pub fn k8s_pod(&self, namespace: &str, name: &str) -> anyhow::Result<Option<k8s_openapi::api::core::v1::Pod>> {
        let (ns, name) = (namespace.to_string(), name.to_string());
        self.kube().run(move |c| async move {
            let api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(c, &ns);
            anyhow::Ok(api.get_opt(&name).await?)
        })?
    }

    /// Publishes (or republishes) a pod in the workload file and waits for the ztunnels to load it; it is an
    /// HBONE workload if its namespace is one the lab enrols.
    pub fn publish(&self, pod: &Pod) -> anyhow::Result<()> {
        self.publish_as(pod, self.config.enrolled_namespaces.contains(&pod.namespace))
    }

    /// Publishes a workload the lab did not create itself (a runtime-tier sandbox) and waits for the ztunnels.
    #[allow(clippy::too_many_arguments)]
    pub fn publish_workload(
        &self,
        uid: &str,
        namespace: &str,
        name: &str,
        sa: &str,
        ip: IpAddr,
        node: usize,
        hbone: bool,
    ) -> anyhow::Result<()> {
        let p = Published {
            uid: format!("Kubernetes//Pod/{namespace}/{name}"),
            name: name.into(),
            namespace: namespace.into(),
            service_account: sa.into(),
            ip,
            ip6: None,
            node: self.nodes[node].name.clone(),
            hbone,
        };
        self.know_pod(node, namespace, sa)?;
        self.rewrite(|w, _| {
            w.insert(uid.to_string(), p);
        })
    }

    /// Publishes a pod as an HBONE (`true`) or plain TCP workload, as istiod would after its enrolment changed.
    pub fn publish_as(&self, pod: &Pod, hbone: bool) -> anyhow::Result<()> {
        let p = self.published(pod, hbone);
        self.rewrite(|w, _| {
            w.insert(pod.uid.clone(), p);
        })
    }

    /// Publishes many pods in one change (one push), as [`Lab::publish`] does one.
    pub fn publish_all(&self, pods: &[&Pod]) -> anyhow::Result<()> {
        let entries: Vec<(String, Published)> = pods
            .iter()
            .map(|p| (p.uid.clone(), self.published(p, self.config.enrolled_namespaces.contains(&p.namespace))))
            .collect();
        self.rewrite(|w, _| w.extend(entries))
    }

    fn published(&self, pod: &Pod, hbone: bool) -> Published {
        Published {
            uid: workload_uid(pod),
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            ip: pod.ip,
            ip6: pod.ip6,
            node: self.nodes[pod.node].name.clone(),
            hbone,
        }
    }

    /// Runs CNI DEL for the pod (reverse order, cached result) without deleting its netns.
    pub fn cni_del(&self, pod: &Pod) -> Result<(), CniFailure> {
        let n = &self.nodes[pod.node];
        n.cni.del(&n.netns, &pod.attachment(), Some(&pod.result))
    }

    /// Runs only ambit-cni's DEL for the pod: its capture goes (rules, ztunnel), its network stays.
    pub fn uncapture(&self, pod: &Pod) -> Result<(), CniFailure> {
        self.ambit_cni(pod, "DEL")
    }

    /// Runs only ambit-cni's ADD for the pod again (after [`Lab::uncapture`]): its capture comes back.
    pub fn capture(&self, pod: &Pod) -> Result<(), CniFailure> {
        self.ambit_cni(pod, "ADD")
    }

    fn ambit_cni(&self, pod: &Pod, command: &str) -> Result<(), CniFailure> {
        let n = &self.nodes[pod.node];
        let list = n.cni.load_conflist().map_err(|e| CniFailure {
            plugin: "(conflist)".into(),
            exit_code: None,
            error: None,
            stdout: String::new(),
            stderr: format!("{e:#}"),
        })?;
        let mut conf = list["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["type"] == "ambit-cni")
            .cloned()
            .unwrap_or_default();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["prevResult"] = pod.result.clone();
        n.cni.exec_raw(&n.netns, command, &pod.attachment(), &conf).map(|_| ())
    }

    /// Removes a pod as a runtime does: CNI DEL, then the netns; and unpublishes it.
    pub fn delete_pod(&self, pod: Pod) -> anyhow::Result<()> {
        self.cni_del(&pod)?;
        let _ = std::fs::remove_file(self.pod_record(&pod.namespace, &pod.name));
        self.unpublish(&pod)?;
        pod.netns.delete()
    }

    fn pod_record(&self, namespace: &str, name: &str) -> PathBuf {
        self.dir.join("pods").join(format!("{namespace}_{name}.json"))
    }

    /// Attaches to a lab left running (`lab demo --keep`) by its id, or to the only one when `id` is `None`, to
    /// add and remove pods from another process. Nothing of it is stopped or removed when the returned value is
    /// dropped; its daemons are not this process's to restart.
    pub fn attach(id: Option<&str>) -> anyhow::Result<Lab> {
        let kept: Vec<(String, PathBuf)> = std::fs::read_dir(std::env::temp_dir())?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let lab_id = name.strip_prefix("ambit-lab-")?.to_string();
                (e.path().join("kept").exists() && e.path().join("lab.json").exists()).then(|| (lab_id, e.path()))
            })
            .filter(|(lab_id, _)| id.is_none_or(|id| id == lab_id))
            .collect();
        let (id, dir) = match kept.as_slice() {
            [one] => one.clone(),
            [] => anyhow::bail!(
                "no lab left running{} (start one with `lab demo --keep`)",
                id.map(|i| format!(" with id {i}")).unwrap_or_default()
            ),
            many => anyhow::bail!(
                "{} labs are running ({}): say which with --lab",
                many.len(),
                many.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>().join(", ")
            ),
        };
        let saved: Value = serde_json::from_slice(&std::fs::read(dir.join("lab.json"))?)?;
        anyhow::ensure!(saved["kubernetes"] != true, "lab {id} runs the Kubernetes tier: create pods through its API");
        let config = LabConfig {
            nodes: saved["nodes"].as_u64().context("lab.json: nodes")? as usize,
            enrolled_namespaces: serde_json::from_value(saved["enrolledNamespaces"].clone())?,
            control_plane: saved["controlPlane"].as_bool().unwrap_or(true),
            dual_stack: saved["dualStack"].as_bool().unwrap_or(false),
            ..Default::default()
        };
        let published: Value = std::fs::read(dir.join("published.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let workloads: BTreeMap<String, Published> =
            serde_json::from_value(published["workloads"].clone()).unwrap_or_default();
        let mesh: MeshConfig = serde_json::from_value(published["mesh"].clone()).unwrap_or_default();
        let mut lab = Lab {
            id: id.clone(),
            dir: dir.clone(),
            config: config.clone(),
            nodes: Vec::new(),
            fabric: Some(Netns::open(&format!("ambit-{id}-fabric"))?),
            workloads: Mutex::new(workloads),
            mesh: Mutex::new(mesh),
            service_accounts: Mutex::new(BTreeMap::new()),
            known_pods: Mutex::new(Vec::new()),
            publishing: Mutex::new(()),
            control_plane: None,
            kube: None,
            keep: true,
        };
        if config.control_plane {
            lab.control_plane = Some(crate::controlplane::ControlPlane::attach(
                &format!("ambit-{id}-cp"),
                &dir.join("cp"),
                &lab.workloads_path(),
                (dir.join("ca-cert.pem"), dir.join("ca-key.pem")),
                (dir.join("cp/serving-cert.pem"), dir.join("cp/serving-key.pem")),
            )?);
            let known = std::fs::read(dir.join("cp/pods.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
            *lab.known_pods.lock().unwrap() = known.unwrap_or_default();
        }
        let mut accounts = BTreeMap::new();
        for i in 0..config.nodes {
            let name = format!("node{}", i + 1);
            let ndir = dir.join(&name);
            let agent: Value = serde_yaml_ng::from_slice(&std::fs::read(ndir.join("agent.yaml"))?)?;
            for p in agent["standalone"]["pods"].as_array().into_iter().flatten() {
                if let (Some(ns), Some(n), Some(sa)) =
                    (p["namespace"].as_str(), p["name"].as_str(), p["serviceAccount"].as_str())
                {
                    accounts.insert((ns.to_string(), n.to_string()), sa.to_string());
                }
            }
            let v6 = config.dual_stack.then(|| {
                (format!("fd00:30::{}", i + 1).parse().expect("an IPv6 address"), format!("fd00:244:{}::/64", i + 1))
            });
            lab.nodes.push(Node {
                index: i,
                netns: Netns::open(&format!("ambit-{id}-{name}"))?,
                ip: Ipv4Addr::new(172, 30, 0, (i + 1) as u8),
                pod_cidr: format!("10.244.{}.0/24", i + 1),
                v6,
                cni: CniRunner { bin_dir: ndir.join("cni-bin"), conf_dir: ndir.join("net.d") },
                dir: ndir,
                name,
                agent: None,
                ztunnel: None,
                containerd: None,
            });
        }
        *lab.service_accounts.lock().unwrap() = accounts;
        Ok(lab)
    }

    /// A pod this lab created (by any process), from the record kept for it: its netns is owned by the returned
    /// value, so [`Lab::delete_pod`] removes it.
    pub fn find_pod(&self, namespace: &str, name: &str) -> anyhow::Result<Pod> {
        let path = self.pod_record(namespace, name);
        let r: Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("no pod {namespace}/{name} in lab {}", self.id))?,
        )?;
        let netns = Netns::adopt(&format!("ambit-{}-{namespace}-{name}", self.id))?;
        let (ip, ip6) = result_ips(&r["result"])?;
        Ok(Pod {
            namespace: namespace.into(),
            name: name.into(),
            uid: r["uid"].as_str().context("uid")?.into(),
            service_account: r["serviceAccount"].as_str().unwrap_or("default").into(),
            node: r["node"].as_u64().context("node")? as usize,
            netns,
            ip,
            ip6,
            container_id: r["containerId"].as_str().context("containerId")?.into(),
            result: r["result"].clone(),
            timings: Timings::default(),
            sandbox: None,
        })
    }

    /// The pods this lab created that are still there, as `namespace/name`.
    pub fn pod_names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.join("pods"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let f = e.file_name().to_string_lossy().into_owned();
                let (ns, name) = f.strip_suffix(".json")?.split_once('_')?;
                Some(format!("{ns}/{name}"))
            })
            .collect();
        v.sort();
        v
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
