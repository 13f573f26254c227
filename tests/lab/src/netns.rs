//! Network namespaces the lab creates, and running work inside them.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use nix::sched::CloneFlags;

static TIE_CHILDREN: AtomicBool = AtomicBool::new(true);

/// Whether processes the lab starts die with it (the default). `lab demo --keep` turns it off so the lab
/// outlives the command.
pub fn tie_children_to_lab(tie: bool) {
    TIE_CHILDREN.store(tie, Ordering::Relaxed);
}

/// Where named network namespaces live.
const NETNS_DIR: &str = "/run/netns";

/// Makes sure `/run/netns` is one shared mount, as `ip netns` makes it and as containerd requires of a
/// `HostToContainer` volume (the cluster tier's agent mounts it), and returns a lock held while a namespace
/// is created in it. Making it is racy: two processes that both find it not yet a mount point both
/// bind-mount it on itself and only the top layer is made shared, while containerd judges by the lowest
/// (parallel lab tests did this once on a fresh machine). So it is made under a lock shared by every lab
/// process, and a stack of layers left by such a race is undone while no namespace is in it.
fn netns_dir() -> anyhow::Result<nix::fcntl::Flock<File>> {
    use nix::mount::{MsFlags, mount, umount};
    std::fs::create_dir_all("/run/lock")?;
    let file = File::create("/run/lock/ambit-lab-netns.lock")?;
    let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking /run/lock/ambit-lab-netns.lock: {e}"))?;
    std::fs::create_dir_all(NETNS_DIR)?;
    let layers = netns_dir_layers()?;
    if !layers.is_empty() && layers.iter().all(|shared| *shared) {
        return Ok(lock);
    }
    if !layers.is_empty() {
        if std::fs::read_dir(NETNS_DIR)?.next().is_some() {
            // Namespaces live in it: leave it be (the cluster tier will say what containerd thinks of it).
            return Ok(lock);
        }
        for _ in &layers {
            umount(NETNS_DIR).with_context(|| format!("unmounting a stacked layer of {NETNS_DIR}"))?;
        }
    }
    let none: Option<&str> = None;
    mount(Some(NETNS_DIR), NETNS_DIR, none, MsFlags::MS_BIND | MsFlags::MS_REC, none)
        .with_context(|| format!("bind-mounting {NETNS_DIR} on itself"))?;
    mount(none, NETNS_DIR, none, MsFlags::MS_SHARED | MsFlags::MS_REC, none)
        .with_context(|| format!("making {NETNS_DIR} shared"))?;
    Ok(lock)
}

/// The mounts stacked on `/run/netns`, lowest first: whether each is shared.
fn netns_dir_layers() -> anyhow::Result<Vec<bool>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            // id, parent, major:minor, root, mount point, options, optional fields…, "-", …
            (fields.get(4) == Some(&NETNS_DIR))
                .then(|| fields[6..].iter().take_while(|f| **f != "-").any(|f| f.starts_with("shared:")))
        })
        .collect())
}

/// A named network namespace (`/var/run/netns/<name>`, exactly as a container runtime makes one), deleted on
/// drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    inner: Option<netns_rs::NetNs>,
    owned: bool,
}

impl Netns {
    /// Creates it, with loopback up.
    pub fn create(name: &str) -> anyhow::Result<Netns> {
        let inner = {
            let _dir = netns_dir()?;
            netns_rs::NetNs::new(name).with_context(|| format!("creating netns {name}"))?
        };
        let ns = Netns { name: name.to_string(), inner: Some(inner), owned: true };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Opens an existing netns by name without owning it (it is not deleted on drop).
    pub fn open(name: &str) -> anyhow::Result<Netns> {
        let inner = netns_rs::NetNs::get(name).with_context(|| format!("opening netns {name}"))?;
        Ok(Netns { name: name.to_string(), inner: Some(inner), owned: false })
    }

    /// Opens an existing netns by name and owns it: it is deleted on drop (a pod another process created).
    pub fn adopt(name: &str) -> anyhow::Result<Netns> {
        let mut ns = Self::open(name)?;
        ns.owned = true;
        Ok(ns)
    }

    /// Its name under `/var/run/netns`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    fn file(&self) -> &File {
        self.inner.as_ref().expect("netns present until drop").file()
    }

    /// Runs `f` on a fresh thread inside the netns. Sockets it creates stay in the netns wherever they are used
    /// afterwards.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
        let file = self.file().try_clone()?;
        let name = self.name.clone();
        std::thread::spawn(move || -> anyhow::Result<T> {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering netns {name}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns {} panicked", self.name))?
    }

    /// A command that will run inside this netns.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let fd = self.file().as_raw_fd();
        let tie = TIE_CHILDREN.load(Ordering::Relaxed);
        // SAFETY: between fork and exec the closure only makes async-signal-safe system calls (setns, prctl,
        // sigprocmask) on a descriptor that the parent keeps open for the netns's lifetime.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The lab's children never outlive it, even when it is killed outright.
                if tie {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                }
                // `lab` blocks SIGINT/SIGTERM for its own signal thread; children must get them as usual.
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                Ok(())
            });
        }
        cmd
    }

    /// Runs `ip -n <netns> args…` and fails with its stderr if it fails.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ip").arg("-n").arg(&self.name).args(args).output().context("running ip")?;
        if !out.status.success() {
            anyhow::bail!("ip -n {} {}: {}", self.name, args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a command in the netns and returns its stdout, failing with its stderr.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self.command(program).args(args).output().with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            anyhow::bail!(
                "{program} {} in {}: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes a sysctl of this netns (`net.ipv4.ip_forward` → `/proc/sys/net/ipv4/ip_forward`).
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        let value = value.to_string();
        self.run(move || std::fs::write(&path, value).with_context(|| format!("writing {}", path.display())))?
    }

    /// Reads a sysctl of this netns (`net.ipv4.tcp_rmem`, say), its fields separated by single spaces.
    pub fn read_sysctl(&self, key: &str) -> anyhow::Result<String> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        let v =
            self.run(move || std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display())))??;
        Ok(v.split_whitespace().collect::<Vec<_>>().join(" "))
    }

    /// Deletes the netns now (also done on drop).
    pub fn delete(mut self) -> anyhow::Result<()> {
        self.remove()
    }

    fn remove(&mut self) -> anyhow::Result<()> {
        if !self.owned {
            return Ok(());
        }
        if let Some(inner) = self.inner.take() {
            // Already removed from under it (a test removing a pod's netns as a crashed runtime would).
            if !self.path().exists() {
                return Ok(());
            }
            inner.remove().with_context(|| format!("removing netns {}", self.name))?;
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("lab: {e:#}");
        }
    }
}
