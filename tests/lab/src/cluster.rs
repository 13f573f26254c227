//! The cluster tier (work in progress): a real kubelet per node, with kube-controller-manager and
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
        let mut c = Cluster { controller_manager, scheduler, kubelets: Vec::new(), logs_before: log_entries() };
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
            let mut k = n.netns.command("unshare");
            k.args(["-m", "--propagation", "unchanged"])
                .arg(&script)
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .arg(format!("--config={}", dir.join("config.yaml").display()))
                .arg("--container-runtime=remote")
                .arg(format!("--container-runtime-endpoint=unix://{}", containerd.socket().display()))
                .arg(format!("--root-dir={}", dir.join("root").display()))
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

impl Drop for Cluster {
    fn drop(&mut self) {
        for mut k in self.kubelets.drain(..) {
            k.stop(Duration::from_secs(10));
        }
        for p in [self.scheduler.take(), self.controller_manager.take()].into_iter().flatten() {
            let mut p = p;
            p.stop(Duration::from_secs(5));
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

/// Copies `bin` and every shared library `ldd` names for it into `rootfs` at the same paths.
fn copy_with_libs(bin: &Path, rootfs: &Path, dest: &Path) -> anyhow::Result<()> {
    let target = rootfs.join(dest.strip_prefix("/").unwrap_or(dest));
    std::fs::create_dir_all(target.parent().expect("a file path"))?;
    std::fs::copy(bin, &target).with_context(|| format!("copying {}", bin.display()))?;
    let out = std::process::Command::new("ldd").arg(bin).output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `libx.so.1 => /lib/x86_64-linux-gnu/libx.so.1 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`.
        let path = line.split("=>").last().unwrap_or(line).split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            let lib = Path::new(path);
            let to = rootfs.join(path.trim_start_matches('/'));
            if !to.exists() {
                std::fs::create_dir_all(to.parent().expect("a file path"))?;
                // Follow symlinks: the image holds the file under the name the loader asks for.
                std::fs::copy(lib, &to).with_context(|| format!("copying {path}"))?;
            }
        }
    }
    Ok(())
}

/// Builds Ambit's image (`ambit/ambit:latest`, what `deploy/kubernetes` runs) as an OCI archive: the three
/// binaries from this build, and `nft` with its libraries, in an otherwise empty root. The same content as
/// `deploy/Containerfile`'s image, without a container engine.
pub fn build_ambit_image(dir: &Path, bin_dir: &Path) -> anyhow::Result<PathBuf> {
    let run = |cmd: &mut std::process::Command| -> anyhow::Result<()> {
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        anyhow::ensure!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
        Ok(())
    };
    std::fs::create_dir_all(dir)?;
    let layout = dir.join("oci");
    let image = format!("{}:latest", layout.display());
    let bundle = dir.join("bundle");
    let _ = std::fs::remove_dir_all(&layout);
    let _ = std::fs::remove_dir_all(&bundle);
    run(std::process::Command::new("umoci").args(["init", "--layout"]).arg(&layout))?;
    run(std::process::Command::new("umoci").args(["new", "--image", &image]))?;
    run(std::process::Command::new("umoci").args(["unpack", "--image", &image]).arg(&bundle))?;
    let rootfs = bundle.join("rootfs");
    for b in ["ambit-agent", "ambit-cni", "ztunnel"] {
        copy_with_libs(&bin_dir.join(b), &rootfs, &Path::new("/usr/local/bin").join(b))?;
    }
    let nft = which("nft")?;
    copy_with_libs(&nft, &rootfs, Path::new("/usr/sbin/nft"))?;
    std::fs::create_dir_all(rootfs.join("tmp"))?;
    run(std::process::Command::new("umoci").args(["repack", "--image", &image]).arg(&bundle))?;
    let tar = dir.join("ambit.tar");
    run(std::process::Command::new("tar").arg("-C").arg(&layout).arg("-cf").arg(&tar).arg("."))?;
    let _ = std::fs::remove_dir_all(&bundle);
    Ok(tar)
}

fn which(name: &str) -> anyhow::Result<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .with_context(|| format!("{name} is not installed"))
}
