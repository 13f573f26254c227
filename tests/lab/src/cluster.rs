//! The cluster tier: a real kubelet per node, with kube-controller-manager and
//! kube-scheduler beside the API server, all built from Debian's `kubernetes` source package
//! (`scripts/kube-build`), and containerd + runc as the runtime.
//!
//! Facts this rests on (checked on this machine):
//! - kubelet must see the host's mounts: nodes are entered with `setns(CLONE_NEWNET)` only (`ip netns exec`
//!   remounts /sys, hides /sys/fs/cgroup, and kubelet dies with "mountpoint for cpu not found");
//! - kubelet sets global kernel tunables (`kernel.panic_on_oops=1`, …) unless they already have its values: it
//!   runs in a mount namespace of its own where fake files are bind-mounted over them, so the host keeps its own;
//! - kubelet writes outside its root dir: `/var/lib/kubelet/device-plugins`, `/var/log/pods`,
//!   `/var/log/containers`; they are removed when the tier stops.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::Lab;
use crate::proc::Proc;
use crate::util::wait_for;

/// A cached Kubernetes binary (`scripts/kube-build NAME`; `scripts/test` builds the missing ones).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let cache = std::env::var("AMBIT_CACHE").unwrap_or_else(|_| "/var/cache/ambit".into());
    let p = Path::new(&cache).join(format!("{name}-v1.20.2"));
    anyhow::ensure!(p.exists(), "{} is missing: build it once with scripts/kube-build {name}", p.display());
    Ok(p)
}

/// The kernel tunables kubelet insists on, with its values.
const TUNABLES: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

/// The control plane's other two components and a kubelet per node.
pub struct Cluster {
    controller_manager: Option<Proc>,
    scheduler: Option<Proc>,
    kubelets: Vec<Proc>,
    /// The kubelets' root dirs, each a shared mount (see [`Cluster::start`]).
    roots: Vec<PathBuf>,
    /// What was in kubelet's fixed log dirs before it started (the rest is removed at the end).
    logs_before: Vec<PathBuf>,
}

const LOG_DIRS: [&str; 2] = ["/var/log/pods", "/var/log/containers"];

fn log_entries() -> Vec<PathBuf> {
    LOG_DIRS.iter().flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten().map(|e| e.path())).collect()
}

impl Cluster {
    /// Starts kube-controller-manager and kube-scheduler beside the API server and a kubelet on every node
    /// that runs containerd, and waits until every node is Ready.
    pub fn start(lab: &mut Lab) -> anyhow::Result<Cluster> {
        lab.kube_mut().enable_cluster()?;
        let api = lab.kube();
        let d = api.dir().to_path_buf();
        let kubeconfig = api.kubeconfig.clone();
        let mut cm = api.netns().command(binary("kube-controller-manager")?);
        cm.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--service-account-private-key-file={}", d.join("sa.key").display()))
            .arg(format!("--root-ca-file={}", d.join("certs/apiserver.crt").display()))
            .arg("--controllers=*,-nodeipam,-route,-cloud-node-lifecycle,-service")
            .args(["--leader-elect=false", "--port=0", "--secure-port=0"]);
        let controller_manager = Some(Proc::spawn("kube-controller-manager", cm, &d.join("controller-manager.log"))?);
        let mut sched = api.netns().command(binary("kube-scheduler")?);
        sched.arg(format!("--kubeconfig={}", kubeconfig.display())).args([
            "--leader-elect=false",
            "--port=0",
            "--secure-port=0",
        ]);
        let scheduler = Some(Proc::spawn("kube-scheduler", sched, &d.join("scheduler.log"))?);
        let mut c = Cluster {
            controller_manager,
            scheduler,
            kubelets: Vec::new(),
            roots: Vec::new(),
            logs_before: log_entries(),
        };
        for n in &lab.nodes {
            let Some(containerd) = &n.containerd else { continue };
            let dir = n.dir.join("kubelet");
            std::fs::create_dir_all(dir.join("tunables"))?;
            let mut wrapper = String::from("#!/bin/sh\nset -e\nmount --make-rprivate /proc\n");
            for (k, v) in TUNABLES {
                let fake = dir.join("tunables").join(k.replace('/', "_"));
                std::fs::write(&fake, format!("{v}\n"))?;
                wrapper.push_str(&format!("mount --bind {} /proc/sys/{k}\n", fake.display()));
            }
            wrapper.push_str(&format!("exec {} \"$@\"\n", binary("kubelet")?.display()));
            let script = dir.join("kubelet.sh");
            std::fs::write(&script, wrapper)?;
            std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
            let config = format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\ncgroupDriver: cgroupfs\n\
                 failSwapOn: false\nauthentication:\n  anonymous: {{enabled: true}}\n  webhook: {{enabled: false}}\n\
                 authorization: {{mode: AlwaysAllow}}\nreadOnlyPort: 0\nport: 10250\naddress: {ip}\nhealthzPort: 0\n\
                 enforceNodeAllocatable: []\nevictionHard: {{}}\nimageGCHighThresholdPercent: 100\n\
                 imageGCLowThresholdPercent: 99\nresolvConf: /etc/resolv.conf\nclusterDomain: cluster.local\n\
                 clusterDNS: [10.96.0.10]\nprotectKernelDefaults: false\nvolumePluginDir: {plugins}\n",
                ip = n.ip,
                plugins = dir.join("plugins").display(),
            );
            std::fs::write(dir.join("config.yaml"), config)?;
            // kubelet mounts the pods' volumes (secrets and projected tokens are tmpfs) under its root dir, in
            // its own mount namespace: the root dir is a shared mount, so they propagate to the host's, where
            // containerd mounts them into containers (/ is a private mount on this machine).
            let root = dir.join("root");
            std::fs::create_dir_all(&root)?;
            use nix::mount::{MsFlags, mount};
            mount(Some(&root), &root, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .context("binding kubelet's root")?;
            c.roots.push(root.clone());
            mount(None::<&str>, &root, None::<&str>, MsFlags::MS_SHARED, None::<&str>)
                .context("sharing kubelet's root")?;
            let mut k = n.netns.command("unshare");
            k.args(["-m", "--propagation", "unchanged"])
                .arg(&script)
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .arg(format!("--config={}", dir.join("config.yaml").display()))
                .arg("--container-runtime=remote")
                .arg(format!("--container-runtime-endpoint=unix://{}", containerd.socket().display()))
                .arg(format!("--root-dir={}", root.display()))
                .arg(format!("--cert-dir={}", dir.join("pki").display()))
                .arg(format!("--hostname-override={}", n.name))
                .arg(format!("--node-ip={}", n.ip));
            c.kubelets.push(Proc::spawn("kubelet", k, &dir.join("kubelet.log"))?);
        }
        for n in &lab.nodes {
            let name = n.name.clone();
            wait_for(&format!("node {name} to be Ready"), Duration::from_secs(60), || {
                let name = name.clone();
                lab.kube()
                    .run(move |client| async move {
                        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
                        let node = nodes.get_opt(&name).await.ok()??;
                        node.status?.conditions?.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
                    })
                    .ok()
                    .flatten()
            })
            .with_context(|| c.kubelets.iter().map(|k| k.log()).collect::<Vec<_>>().join("\n"))?;
        }
        Ok(c)
    }
}

/// The image `deploy/kubernetes` runs, as containerd names it.
pub const AMBIT_IMAGE: &str = "docker.io/ambit/ambit:latest";
/// The tier's app image (`lab echo`).
pub const TOOLS_IMAGE: &str = "docker.io/ambit/lab-tools:latest";
/// Where the base puts Ambit.
pub const AMBIT_NAMESPACE: &str = "ambit-system";

/// The tier's overlay over `deploy/kubernetes`: only what differs from a real node. The lab's node keeps its
/// CNI dirs and run dir under the lab's directory, not at /opt/cni/bin, /etc/cni/net.d and /var/run, so the
/// hostPaths point there (the plugin, which runs on the host, is told where the agent's socket is on the
/// host); the images are imported, not pulled; the agent runs in the node's netns, where no kube-proxy makes
/// the `kubernetes` Service reachable, so it is given the API server's address, as kube-proxy-less clusters
/// do; the netns dir is named by its real path, /run/netns (containerd checks that a HostToContainer source
/// is a shared mount without resolving the /var/run symlink, and on this machine / is a private mount, where a
/// systemd host's is shared); and the lab's control plane is istiod (its address as istiod's name, in ztunnel's /etc/hosts).
fn tier_overlay(base: &Path, node: &crate::Node) -> anyhow::Result<Vec<(&'static str, String)>> {
    let d = node.dir.display();
    // The agent's config is the base's own, with the plugin told the host's paths of the agent's socket and
    // of its log, and logging at debug.
    let manifest = std::fs::read_to_string(base.join("node/20-agent.yaml"))?;
    let config_map = serde_yaml_ng::Deserializer::from_str(&manifest).next().context("an empty manifest")?;
    let mut config_map = <serde_json::Value as serde::Deserialize>::deserialize(config_map)?;
    let config = config_map["data"]["agent.yaml"].as_str().context("no agent.yaml in the agent's ConfigMap")?;
    let mut config: serde_json::Value = serde_yaml_ng::from_str(config)?;
    let plugin = &mut config["install"]["pluginConfig"];
    plugin["agent_socket"] = format!("{d}/run/ambit/cni.sock").into();
    plugin["log_file"] = format!("{d}/run/ambit/cni.log").into();
    plugin["log_level"] = "debug".into();
    config_map["data"]["agent.yaml"] = serde_yaml_ng::to_string(&config)?.into();
    let agent_config = serde_yaml_ng::to_string(&config_map)?;
    let kustomization = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nbases:\n- ../kubernetes\n\
                         patchesStrategicMerge:\n- agent.yaml\n- ztunnel.yaml\n"
        .to_string();
    let agent = format!(
        r#"{config}---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: ambit-node
  namespace: ambit-system
spec:
  template:
    spec:
      containers:
      - name: agent
        imagePullPolicy: Never
        env:
        - {{name: KUBERNETES_SERVICE_HOST, value: "{api}"}}
        - {{name: KUBERNETES_SERVICE_PORT, value: "{port}"}}
        - {{name: RUST_LOG, value: debug}}
      volumes:
      - {{name: cni-bin, hostPath: {{path: {d}/cni-bin}}}}
      - {{name: cni-conf, hostPath: {{path: {d}/net.d}}}}
      - {{name: ambit-run, hostPath: {{path: {d}/run/ambit}}}}
      - {{name: ztunnel-run, hostPath: {{path: {d}/run/ztunnel}}}}
      - {{name: netns, hostPath: {{path: /run/netns}}}}
"#,
        config = agent_config,
        api = crate::kube::API_IP,
        port = crate::kube::API_PORT,
    );
    let ztunnel = format!(
        r#"apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: ztunnel
  namespace: ambit-system
spec:
  template:
    spec:
      hostAliases:
      - ip: "{cp}"
        hostnames: ["{istiod}"]
      containers:
      - name: ztunnel
        imagePullPolicy: Never
      volumes:
      - {{name: ztunnel-run, hostPath: {{path: {d}/run/ztunnel}}}}
"#,
        cp = crate::controlplane::CP_IP,
        istiod = crate::controlplane::CP_HOSTNAME,
    );
    Ok(vec![("kustomization.yaml", kustomization), ("agent.yaml", agent), ("ztunnel.yaml", ztunnel)])
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

impl Cluster {
    /// Installs Ambit as an operator does, on a one-node tier: its image (built here, imported into
    /// containerd), `kubectl apply -k` of `deploy/kubernetes` under the tier's overlay, and the lab's control
    /// plane as istiod (checking ztunnel's projected token with a TokenReview, publishing the mesh root as the
    /// `istio-ca-root-cert` ConfigMap). Waits until the agent's and ztunnel's pods are Ready.
    pub fn install_ambit(&self, lab: &mut Lab, bin_dir: &Path) -> anyhow::Result<()> {
        anyhow::ensure!(lab.nodes.len() == 1, "the tier's overlay has one node's host paths");
        let ambit = build_ambit_image(&lab.dir.join("images/ambit"), bin_dir)?;
        let tools = build_tools_image(&lab.dir.join("images/tools"), bin_dir)?;
        for n in &lab.nodes {
            let c = n.containerd.as_ref().context("the tier needs the runtime")?;
            c.import(&ambit, AMBIT_IMAGE)?;
            c.import(&tools, TOOLS_IMAGE)?;
            for d in ["run/ambit", "run/ztunnel"] {
                std::fs::create_dir_all(n.dir.join(d))?;
            }
        }
        let routes: Vec<(String, std::net::Ipv4Addr)> = lab.nodes.iter().map(|n| (n.pod_cidr.clone(), n.ip)).collect();
        let auth = crate::controlplane::KubeAuth {
            kubeconfig: lab.kube().kubeconfig.clone(),
            trusted_node_accounts: vec![format!("{AMBIT_NAMESPACE}/ztunnel")],
        };
        let cp = lab.control_plane_mut();
        cp.use_kubernetes(auth, &routes)?;
        cp.restart()?;

        let deploy = lab.dir.join("deploy");
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes");
        copy_tree(&base, &deploy.join("kubernetes"))?;
        std::fs::create_dir_all(deploy.join("tier"))?;
        for (file, text) in tier_overlay(&base, &lab.nodes[0])? {
            std::fs::write(deploy.join("tier").join(file), text)?;
        }
        lab.kubectl(&["apply", "-k", &deploy.join("tier").display().to_string()])?;
        // istiod writes its root into every namespace.
        let root = std::fs::read_to_string(lab.dir.join("ca-cert.pem"))?;
        lab.kube().run(move |c| async move {
            use k8s_openapi::api::core::v1::ConfigMap;
            let cms: kube::Api<ConfigMap> = kube::Api::namespaced(c, AMBIT_NAMESPACE);
            let cm: ConfigMap = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "istio-ca-root-cert"},
                "data": {"root-cert.pem": root},
            }))?;
            cms.create(&Default::default(), &cm).await?;
            anyhow::Ok(())
        })??;
        for app in ["ambit-node", "ztunnel"] {
            self.wait_ready_pod(lab, AMBIT_NAMESPACE, &format!("app={app}"))?;
        }
        Ok(())
    }

    /// Waits until one pod matching `selector` in `namespace` is Ready, and returns it.
    pub fn wait_ready_pod(&self, lab: &Lab, namespace: &str, selector: &str) -> anyhow::Result<Pod> {
        wait_for(&format!("a Ready pod {selector} in {namespace}"), Duration::from_secs(90), || {
            live_pods(lab, namespace, selector).ok()?.into_iter().find(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
        })
        .with_context(|| self.describe(lab))
    }

    /// What to look at when the tier misbehaves: its pods, events and Ambit's containers' logs, and the
    /// kubelets' last errors.
    pub fn describe(&self, lab: &Lab) -> String {
        let text = |r: anyhow::Result<String>| r.unwrap_or_else(|e| format!("{e:#}\n"));
        let mut out = text(lab.kubectl(&["get", "pods", "-A", "-o", "wide"]));
        out += &text(lab.kubectl(&["get", "events", "-A"]));
        let pods = lab.kubectl(&["-n", AMBIT_NAMESPACE, "get", "pods", "-o", "name"]).unwrap_or_default();
        for pod in pods.lines() {
            for previous in ["--previous=false", "--previous=true"] {
                out += &format!("--- {pod} {previous}\n");
                out += &text(lab.kubectl(&["-n", AMBIT_NAMESPACE, "logs", pod, "--tail=25", previous]));
            }
        }
        for k in &self.kubelets {
            let log = k.log();
            let errors: Vec<&str> = log.lines().filter(|l| l.starts_with('E')).collect();
            out += &errors[errors.len().saturating_sub(10)..].join("\n");
        }
        out
    }

    /// The name of a live pod matching `selector` in `namespace`.
    pub fn pod_by_label(&self, lab: &Lab, namespace: &str, selector: &str) -> anyhow::Result<String> {
        live_pods(lab, namespace, selector)?
            .into_iter()
            .find_map(|p| p.metadata.name)
            .ok_or_else(|| anyhow::anyhow!("no pod {selector} in {namespace}"))
    }

    /// The netns of a pod's sandbox on node `node` (what `kubectl exec` enters), found through CRI.
    pub fn pod_netns(&self, lab: &Lab, node: usize, namespace: &str, name: &str) -> anyhow::Result<crate::Netns> {
        let c = lab.nodes[node].containerd.as_ref().context("no runtime")?;
        let sandbox = c
            .list()?
            .into_iter()
            .filter(|s| s.state == 0) // SANDBOX_READY
            .find(|s| s.metadata.as_ref().is_some_and(|m| m.namespace == namespace && m.name == name))
            .with_context(|| format!("no ready sandbox of {namespace}/{name}"))?;
        let (_, netns) = c.sandbox_network(&sandbox.id)?;
        crate::Netns::open(&netns)
    }
}

use k8s_openapi::api::core::v1::Pod;

/// The pods matching `selector` in `namespace` that are not being deleted.
fn live_pods(lab: &Lab, namespace: &str, selector: &str) -> anyhow::Result<Vec<Pod>> {
    let (ns, sel) = (namespace.to_string(), selector.to_string());
    lab.kube().run(move |c| async move {
        let pods: kube::Api<Pod> = kube::Api::namespaced(c, &ns);
        let list = pods.list(&kube::api::ListParams::default().labels(&sel)).await?;
        anyhow::Ok(list.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect())
    })?
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for mut k in self.kubelets.drain(..) {
            k.stop(Duration::from_secs(10));
        }
        for p in [self.scheduler.take(), self.controller_manager.take()].into_iter().flatten() {
            let mut p = p;
            p.stop(Duration::from_secs(5));
        }
        for root in self.roots.drain(..) {
            crate::runtime::unmount_under(&root);
        }
        let _ = std::fs::remove_dir_all("/var/lib/kubelet/device-plugins");
        let _ = std::fs::remove_dir("/var/lib/kubelet");
        for e in log_entries().into_iter().filter(|e| !self.logs_before.contains(e)) {
            let _ = std::fs::remove_dir_all(&e).or_else(|_| std::fs::remove_file(&e));
        }
        for d in LOG_DIRS {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Builds Ambit's image (`ambit/ambit:latest`, what `deploy/kubernetes` runs) as an OCI archive: the three
/// binaries from this build, and `nft` with its libraries. The content of `deploy/Containerfile`'s image that
/// the agent and ztunnel use, without a container engine.
pub fn build_ambit_image(dir: &Path, bin_dir: &Path) -> anyhow::Result<PathBuf> {
    let mut files: Vec<(PathBuf, &str)> = vec![
        (bin_dir.join("ambit-agent"), "/usr/local/bin/ambit-agent"),
        (bin_dir.join("ambit-cni"), "/usr/local/bin/ambit-cni"),
        (bin_dir.join("ztunnel"), "/usr/local/bin/ztunnel"),
    ];
    files.push((which("nft")?, "/usr/sbin/nft"));
    crate::runtime::build_image(dir, &files, None)
}

/// Builds the tier's app image: the `lab` binary (`lab echo` serves the tests' traffic).
pub fn build_tools_image(dir: &Path, bin_dir: &Path) -> anyhow::Result<PathBuf> {
    crate::runtime::build_image(dir, &[(bin_dir.join("lab"), "/usr/local/bin/lab")], None)
}

fn which(name: &str) -> anyhow::Result<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .with_context(|| format!("{name} is not installed"))
}
