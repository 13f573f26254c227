//! The sockmap short-cut, an experiment of `lab bench --sockmap` (issue 16, item 4): the floor's two
//! in-namespace TCP legs (the app to the relay in the client pod, the relay to the app in the server pod)
//! with their bytes moved socket to socket by an eBPF `sk_msg` redirect instead of the kernel's TCP/IP path.
//! The programs are `bpf/sockmap.c`, compiled with Debian's clang; the object is checked in beside it.
//!
//! Only connections inside the namespaces handed to [`Shortcut::enable`] are touched, and only those opened
//! while they are enabled. Everything is released when the [`Shortcut`] is dropped or the process ends (the
//! kernel detaches the programs when their last descriptor closes).
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;

use anyhow::Context;
use aya::maps::{HashMap, MapData, SockHash};
use aya::programs::{CgroupAttachMode, SkMsg, SockOps};

use crate::netns::Netns;

static OBJECT: &[u8] = include_bytes!("../bpf/sockmap.o");

/// The key of `SOCKS` in `bpf/sockmap.c`; only its size matters here.
#[derive(Clone, Copy)]
#[repr(C)]
struct Key {
    netns: u64,
    local: [u32; 4],
    remote: [u32; 4],
    local_port: u32,
    remote_port: u32,
}

// SAFETY: plain old data, no padding (8 + 16 + 16 + 4 + 4 bytes, 8-aligned).
unsafe impl aya::Pod for Key {}

/// The loaded and attached programs.
pub struct Shortcut {
    /// Holds the programs and their links: dropping it detaches them.
    _ebpf: aya::Ebpf,
    socks: SockHash<MapData, Key>,
    netns: HashMap<MapData, u64, u8>,
}

impl std::fmt::Debug for Shortcut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shortcut").field("sockets", &self.sockets()).finish()
    }
}

impl Shortcut {
    /// Loads the programs, attaches the `sock_ops` one to the root of the cgroup-v2 hierarchy and the
    /// `sk_msg` one to the socket map. Nothing is short-cut until [`Shortcut::enable`].
    pub fn load() -> anyhow::Result<Shortcut> {
        let mut ebpf = aya::Ebpf::load(OBJECT).context("loading bpf/sockmap.o")?;
        let socks: SockHash<MapData, Key> =
            SockHash::try_from(ebpf.take_map("SOCKS").context("bpf/sockmap.o has no SOCKS map")?)?;
        let redirect: &mut SkMsg = ebpf.program_mut("redirect").context("no redirect program")?.try_into()?;
        redirect.load().context("loading the sk_msg program")?;
        redirect.attach(socks.fd()).context("attaching the sk_msg program to SOCKS")?;
        let root = cgroup2_root()?;
        let cgroup = std::fs::File::open(&root).with_context(|| format!("opening {}", root.display()))?;
        let established: &mut SockOps =
            ebpf.program_mut("established").context("no established program")?.try_into()?;
        established.load().context("loading the sock_ops program")?;
        // As a bpf_link (kernel 5.7 and later), which sits beside any other program on the cgroup; the
        // kernel refuses the multi-attach flag there, which is implied.
        established
            .attach(cgroup, CgroupAttachMode::Single)
            .with_context(|| format!("attaching the sock_ops program to {}", root.display()))?;
        let netns = HashMap::try_from(ebpf.take_map("NETNS").context("bpf/sockmap.o has no NETNS map")?)?;
        Ok(Shortcut { _ebpf: ebpf, socks, netns })
    }

    /// Short-cuts connections that open inside `ns` from now on, until [`Shortcut::disable`].
    pub fn enable(&mut self, ns: &Netns) -> anyhow::Result<()> {
        self.netns.insert(cookie(ns)?, 1, 0).with_context(|| format!("enabling netns {}", ns.name()))
    }

    /// Stops short-cutting new connections inside `ns`; those open keep their short-cut until they close.
    pub fn disable(&mut self, ns: &Netns) -> anyhow::Result<()> {
        match self.netns.remove(&cookie(ns)?) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("disabling netns {}", ns.name())),
        }
    }

    /// How many sockets are in the map now: two for each short-cut connection that is still open.
    pub fn sockets(&self) -> usize {
        self.socks.keys().filter(Result::is_ok).count()
    }
}

/// Where cgroup v2 is mounted (its root, which every process's sockets fall under).
fn cgroup2_root() -> anyhow::Result<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    mounts
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split(' ').next() == Some("cgroup2")).then(|| left.split(' ').nth(4).map(Into::into))?
        })
        .context("no cgroup2 file system is mounted: the sockmap short-cut needs one")
}

/// The kernel's cookie of `ns`, as `bpf_get_netns_cookie` gives it.
fn cookie(ns: &Netns) -> anyhow::Result<u64> {
    ns.run(|| -> anyhow::Result<u64> {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").context("a socket to read the netns cookie")?;
        let mut v = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`, which is that large.
        let r = unsafe {
            libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_NETNS_COOKIE, (&raw mut v).cast(), &mut len)
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error()).context("getsockopt(SO_NETNS_COOKIE)");
        }
        Ok(v)
    })?
}
