//! The runtime tier: containerd + runc (Debian's), driven through CRI exactly as a kubelet drives them, with the
//! node's CNI config dir being the one the agent's installer chained — so containerd itself runs bridge,
//! host-local and ambit-cni for every sandbox.
//!
//! Images come from no registry: a static `pause` (a few lines of C, built with `gcc -static`) packed with
//! umoci and imported with `ctr`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::netns::Netns;
use crate::proc::Proc;
use crate::util::wait_for;

/// The generated CRI client.
#[allow(missing_docs, clippy::all)]
pub mod cri {
    tonic::include_proto!("runtime.v1");
}

use cri::runtime_service_client::RuntimeServiceClient;

/// The sandbox image name containerd is configured with.
pub const PAUSE_IMAGE: &str = "docker.io/library/pause:latest";

const PAUSE_C: &str = r#"#include <signal.h>
#include <unistd.h>
static void done(int s) { (void)s; _exit(0); }
int main(void) { signal(SIGTERM, done); signal(SIGINT, done); for (;;) pause(); }
"#;

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    anyhow::ensure!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

/// Builds the pause image as an OCI archive in `dir` and returns its path.
pub fn build_pause_image(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("pause.c"), PAUSE_C)?;
    run(Command::new("gcc").args(["-static", "-O2", "-o"]).arg(dir.join("pause")).arg(dir.join("pause.c")))?;
    build_image(dir, &[(dir.join("pause"), "/pause")], Some("/pause"))
}

/// Builds an OCI image archive `dir/image.tar` holding `files` (source, path in the image) with the shared
/// libraries each needs, in an otherwise empty root (plus `/tmp`), with `entrypoint` if given.
pub fn build_image(dir: &Path, files: &[(PathBuf, &str)], entrypoint: Option<&str>) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let layout = dir.join("oci");
    let image = format!("{}:latest", layout.display());
    let bundle = dir.join("bundle");
    let _ = std::fs::remove_dir_all(&layout);
    let _ = std::fs::remove_dir_all(&bundle);
    run(Command::new("umoci").args(["init", "--layout"]).arg(&layout))?;
    run(Command::new("umoci").args(["new", "--image", &image]))?;
    run(Command::new("umoci").args(["unpack", "--image", &image]).arg(&bundle))?;
    let rootfs = bundle.join("rootfs");
    for (src, dest) in files {
        copy_with_libs(src, &rootfs, Path::new(dest))?;
    }
    std::fs::create_dir_all(rootfs.join("tmp"))?;
    run(Command::new("umoci").args(["repack", "--image", &image]).arg(&bundle))?;
    if let Some(e) = entrypoint {
        run(Command::new("umoci").args(["config", "--image", &image, "--config.entrypoint", e]))?;
    }
    let tar = dir.join("image.tar");
    run(Command::new("tar").arg("-C").arg(&layout).arg("-cf").arg(&tar).arg("."))?;
    let _ = std::fs::remove_dir_all(&bundle);
    let _ = std::fs::remove_dir_all(&layout);
    Ok(tar)
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

/// A sandbox containerd runs.
#[derive(Debug)]
pub struct Sandbox {
    /// The sandbox id.
    pub id: String,
    /// Its netns (owned by containerd).
    pub netns: Netns,
    /// Its IP.
    pub ip: IpAddr,
}

/// One node's containerd.
pub struct Containerd {
    proc: Option<Proc>,
    dir: PathBuf,
    sock: PathBuf,
    /// Sandbox id → pod UID, to remove the pod cgroups a kubelet would remove.
    uids: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

/// Removes the pod-level cgroups (`kubepods[/<qos>]/pod<uid>`) in every hierarchy: the kubelet creates and
/// removes them, the runtime only the containers' cgroups inside.
fn remove_pod_cgroups(uid: &str) {
    for h in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
        for qos in ["kubepods/besteffort", "kubepods/burstable", "kubepods"] {
            let _ = std::fs::remove_dir(h.path().join(qos).join(format!("pod{uid}")));
        }
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
}

impl Containerd {
    /// Starts containerd inside `node` with the node's CNI dirs, and imports the pause image.
    pub fn start(
        node: &Netns,
        dir: &Path,
        cni_bin: &Path,
        cni_conf: &Path,
        pause_tar: &Path,
    ) -> anyhow::Result<Containerd> {
        std::fs::create_dir_all(dir)?;
        let sock = dir.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_tcp_service = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = sock.display(),
            bin = cni_bin.display(),
            conf = cni_conf.display(),
            opt = dir.join("opt").display(),
        );
        std::fs::write(dir.join("config.toml"), config)?;
        let mut cmd = node.command("containerd");
        cmd.arg("--config").arg(dir.join("config.toml"));
        let proc = Proc::spawn("containerd", cmd, &dir.join("containerd.log"))?;
        let c = Containerd { proc: Some(proc), dir: dir.to_path_buf(), sock, uids: Default::default() };
        wait_for("containerd's CRI to answer", Duration::from_secs(20), || c.version().ok())
            .with_context(|| c.log())?;
        run(Command::new("ctr")
            .arg("--address")
            .arg(&c.sock)
            .args(["-n", "k8s.io", "images", "import", "--base-name", "docker.io/library/pause"])
            .arg(pause_tar))?;
        Ok(c)
    }

    /// Its CRI socket (what a kubelet is given).
    pub fn socket(&self) -> &Path {
        &self.sock
    }

    /// Imports an OCI archive into the `k8s.io` namespace as `name`.
    pub fn import(&self, tar: &Path, name: &str) -> anyhow::Result<()> {
        run(Command::new("ctr")
            .arg("--address")
            .arg(&self.sock)
            .args(["-n", "k8s.io", "images", "import", "--index-name", name])
            .arg(tar))
    }

    /// containerd's log.
    pub fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.log()).unwrap_or_default()
    }

    async fn client(sock: PathBuf) -> anyhow::Result<RuntimeServiceClient<tonic::transport::Channel>> {
        let channel = tonic::transport::Endpoint::try_from("http://[::1]:1")?
            .connect_with_connector(tower::service_fn(move |_| {
                let sock = sock.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(sock).await?))
                }
            }))
            .await?;
        Ok(RuntimeServiceClient::new(channel))
    }

    fn call<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        F: FnOnce(RuntimeServiceClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let sock = self.sock.clone();
        block_on(async move {
            let c = Self::client(sock).await?;
            f(c).await.map(tonic::Response::into_inner).map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))
        })
    }

    /// The runtime's version (a liveness check).
    pub fn version(&self) -> anyhow::Result<String> {
        let v = self.call(|mut c| async move { c.version(cri::VersionRequest { version: "v1".into() }).await })?;
        Ok(format!("{} {}", v.runtime_name, v.runtime_version))
    }

    /// RunPodSandbox, as a kubelet sends it (metadata, and the pod's cgroup parent named after its UID).
    pub fn run_pod_sandbox(&self, namespace: &str, name: &str, uid: &str) -> anyhow::Result<Sandbox> {
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: uid.into(),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self.dir.join("pods").join(format!("{namespace}_{name}_{uid}")).display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig { cgroup_parent: format!("/kubepods/besteffort/pod{uid}") }),
            ..Default::default()
        };
        let resp = self.call(|mut c| async move {
            c.run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(config), runtime_handler: String::new() }).await
        })?;
        let id = resp.pod_sandbox_id;
        self.uids.lock().unwrap().insert(id.clone(), uid.to_string());
        let (ip, netns) = self.sandbox_network(&id)?;
        Ok(Sandbox { id, netns: Netns::open(&netns)?, ip })
    }

    /// The sandbox's IP and netns name (from the verbose status, as containerd reports its runtime spec).
    pub fn sandbox_network(&self, id: &str) -> anyhow::Result<(IpAddr, String)> {
        let id = id.to_string();
        let st = self.call(|mut c| async move {
            c.pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: id, verbose: true }).await
        })?;
        let ip: IpAddr = st
            .status
            .as_ref()
            .and_then(|s| s.network.as_ref())
            .map(|n| n.ip.clone())
            .unwrap_or_default()
            .parse()
            .context("sandbox without an IP")?;
        let info: serde_json::Value = serde_json::from_str(st.info.get("info").map(String::as_str).unwrap_or("{}"))?;
        let path = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["type"] == "network"))
            .and_then(|n| n["path"].as_str())
            .context("no network namespace in the sandbox's runtime spec")?;
        let name =
            Path::new(path).file_name().and_then(|n| n.to_str()).context("netns path without a name")?.to_string();
        Ok((ip, name))
    }

    /// StopPodSandbox (runs CNI DEL).
    pub fn stop_pod_sandbox(&self, id: &str) -> anyhow::Result<()> {
        let id = id.to_string();
        self.call(|mut c| async move { c.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id }).await })
            .map(|_| ())
    }

    /// RemovePodSandbox, then the pod's cgroups (as the kubelet does).
    pub fn remove_pod_sandbox(&self, id: &str) -> anyhow::Result<()> {
        let sid = id.to_string();
        self.call(
            |mut c| async move { c.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: sid }).await },
        )?;
        if let Some(uid) = self.uids.lock().unwrap().remove(id) {
            remove_pod_cgroups(&uid);
        }
        Ok(())
    }

    /// The sandboxes containerd knows.
    pub fn list(&self) -> anyhow::Result<Vec<cri::PodSandbox>> {
        Ok(self.call(|mut c| async move { c.list_pod_sandbox(cri::ListPodSandboxRequest {}).await })?.items)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Sandboxes first (CNI DEL, shims, mounts), then containerd, then whatever a crash left: shims that name
        // our socket, and mounts under our directory.
        let mut uids: Vec<String> = self.uids.lock().unwrap().values().cloned().collect();
        if let Ok(list) = self.list() {
            for s in list {
                let _ = self.stop_pod_sandbox(&s.id);
                let _ = self.remove_pod_sandbox(&s.id);
                // A kubelet's sandboxes too (the cluster tier): their pod cgroups are the kubelet's to remove.
                uids.extend(s.metadata.map(|m| m.uid));
            }
        }
        // And every sandbox it ever ran (a kubelet's pods deleted earlier): the kubelet leaves their pod cgroup
        // in the hierarchies it does not manage (cgroup2's, beside v1's).
        uids.extend(sandbox_uids(&self.log()));
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(5));
        }
        cleanup_runtime_leftovers(&self.dir);
        for uid in uids {
            remove_pod_cgroups(&uid);
        }
    }
}

/// The pod UIDs of every `RunPodSandbox` in a containerd log (`…PodSandboxMetadata{Name:…,Uid:<uid>,…`).
fn sandbox_uids(log: &str) -> Vec<String> {
    let mut uids: Vec<String> = log
        .lines()
        .filter(|l| l.contains("RunPodSandbox for"))
        .filter_map(|l| l.split("Uid:").nth(1)?.split(',').next().map(str::to_string))
        .filter(|u| !u.is_empty())
        .collect();
    uids.sort();
    uids.dedup();
    uids
}

/// Kills containerd shims started for `dir`'s containerd and unmounts what is still mounted under `dir`.
pub fn cleanup_runtime_leftovers(dir: &Path) {
    let needle = dir.display().to_string();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("containerd-shim") && cmd.contains(&needle) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    unmount_under(dir);
}

/// Unmounts everything mounted at or under `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let needle = dir.display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut under: Vec<&str> =
        mounts.lines().filter_map(|l| l.split_whitespace().nth(4)).filter(|m| m.starts_with(needle.as_str())).collect();
    under.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in under {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sandbox_uids_come_from_run_pod_sandbox_lines() {
        let log = "time=\"x\" level=info msg=\"RunPodSandbox for &PodSandboxMetadata{Name:a,Uid:1111-2,Namespace:n,Attempt:0,}\"\n\
                   time=\"x\" level=info msg=\"RunPodSandbox for &PodSandboxMetadata{Name:a,Uid:1111-2,Namespace:n,Attempt:0,} returns sandbox id \\\"abc\\\"\"\n\
                   time=\"x\" level=info msg=\"StopPodSandbox for \\\"abc\\\"\"\n";
        assert_eq!(super::sandbox_uids(log), ["1111-2"]);
    }
}
