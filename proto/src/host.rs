//! Host-side helpers the node agent and ztunnel share (feature `transport`): the in-pod listening sockets
//! both may create, the check that a descriptor is a network namespace, a directory watch, and the calling
//! thread's netns's default gateways.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::statfs::{NSFS_MAGIC, fstatfs};
use socket2::{Domain, Protocol, Socket, Type};

/// How an in-pod listener is made.
#[derive(Debug, Clone, Copy)]
pub struct ListenerOptions {
    /// `[::]` accepting IPv4 too, or `0.0.0.0`.
    pub ipv6: bool,
    /// `SO_REUSEPORT`, so a second process can bind beside the first during an upgrade.
    pub reuse_port: bool,
    /// `SO_MARK` of the listener (inherited by accepted sockets).
    pub mark: u32,
    /// `TCP_NODELAY` (inherited by accepted sockets).
    pub nodelay: bool,
    /// Non-blocking (to hand to an async runtime at once).
    pub nonblocking: bool,
    /// Accept queue length.
    pub backlog: i32,
}

/// Creates, binds and listens on `port` of every address in the calling thread's netns (call it on a thread
/// inside the pod's netns), as `opts` says. A bind error names the address.
pub fn inpod_listener(port: u16, opts: ListenerOptions) -> std::io::Result<Socket> {
    let (domain, addr) = if opts.ipv6 {
        (Domain::IPV6, SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
    } else {
        (Domain::IPV4, SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
    };
    let ty = if opts.nonblocking { Type::STREAM.nonblocking() } else { Type::STREAM };
    let s = Socket::new(domain, ty.cloexec(), Some(Protocol::TCP))?;
    if opts.ipv6 {
        s.set_only_v6(false)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(opts.reuse_port)?;
    s.set_mark(opts.mark)?;
    if opts.nodelay {
        s.set_tcp_nodelay(true)?;
    }
    s.bind(&addr.into()).map_err(|e| std::io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
    s.listen(opts.backlog)?;
    Ok(s)
}

/// What an open descriptor that should be a network namespace turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetnsCheck {
    /// A network namespace, with its inode (two descriptors with the same inode name the same netns).
    Netns(u64),
    /// An empty regular file: an unmounted bind-mount target left behind after the netns died.
    Stale,
    /// Something else.
    NotANetns,
}

/// Checks that `fd` (opened from `/var/run/netns/…`, `/proc/<pid>/ns/net` or received over ZDS) is a network
/// namespace.
pub fn check_netns(fd: impl AsFd) -> std::io::Result<NetnsCheck> {
    let fs = fstatfs(fd.as_fd())?;
    let meta = std::fs::File::from(fd.as_fd().try_clone_to_owned()?).metadata()?;
    let ty = fs.filesystem_type();
    // Namespace files live on nsfs (since Linux 3.19, also when opened through /proc/<pid>/ns).
    Ok(if ty == NSFS_MAGIC {
        NetnsCheck::Netns(meta.ino())
    } else if meta.is_file() && meta.len() == 0 {
        NetnsCheck::Stale
    } else {
        NetnsCheck::NotANetns
    })
}

/// Watches directories for files written, renamed in, created or removed (inotify, non-blocking). A directory
/// that does not exist yet is watched once it does; without inotify, [`DirWatch::changed`] reports nothing and
/// the caller's periodic check carries on alone.
pub struct DirWatch {
    inotify: Option<Inotify>,
    dirs: Vec<PathBuf>,
    watching: bool,
}

impl DirWatch {
    /// Watches `dirs`.
    pub fn new(dirs: &[&Path]) -> DirWatch {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).ok();
        let mut w = DirWatch { inotify, dirs: dirs.iter().map(|d| d.to_path_buf()).collect(), watching: false };
        w.arm();
        w
    }

    /// Whether every directory is watched (false without inotify or while one is missing).
    pub fn watching(&self) -> bool {
        self.watching
    }

    fn arm(&mut self) {
        let Some(i) = &self.inotify else { return };
        if self.watching {
            return;
        }
        let flags = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM;
        self.watching = self.dirs.iter().all(|d| i.add_watch(d, flags).is_ok());
    }

    /// Drains the events that arrived and says whether one concerned a file name `relevant` accepts (`None`:
    /// the event named no file). Never blocks.
    pub fn changed(&mut self, relevant: impl Fn(Option<&OsStr>) -> bool) -> bool {
        self.arm();
        let Some(i) = &self.inotify else { return false };
        let mut changed = false;
        while let Ok(events) = i.read_events() {
            if events.is_empty() {
                break;
            }
            changed |= events.iter().any(|e| relevant(e.name.as_deref()));
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_netns_and_other_files_are_told_apart() {
        let ns = std::fs::File::open("/proc/self/ns/net").unwrap();
        assert!(matches!(check_netns(&ns).unwrap(), NetnsCheck::Netns(_)));
        let dir = std::env::temp_dir().join(format!("ambit-host-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("empty"), b"").unwrap();
        std::fs::write(dir.join("full"), b"x").unwrap();
        assert_eq!(check_netns(std::fs::File::open(dir.join("empty")).unwrap()).unwrap(), NetnsCheck::Stale);
        assert_eq!(check_netns(std::fs::File::open(dir.join("full")).unwrap()).unwrap(), NetnsCheck::NotANetns);

        // The watch sees a file written and renamed into place, and a directory made after it started.
        let later = dir.join("later");
        let mut w = DirWatch::new(&[&dir, &later]);
        assert!(!w.watching());
        std::fs::create_dir_all(&later).unwrap();
        w.changed(|_| false); // each call first watches what has appeared since
        assert!(w.watching());
        std::fs::write(later.join(".tmp"), b"1").unwrap();
        std::fs::rename(later.join(".tmp"), later.join("conf")).unwrap();
        assert!(w.changed(|n| n == Some(OsStr::new("conf"))));
        assert!(!w.changed(|_| true), "drained");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The default gateways of the calling thread's netns (`/proc/thread-self/net/route` and `ipv6_route`: this
/// thread's netns, not the process's), IPv4 first. In a pod, that is the node: where `ambit-agent debug`'s
/// probes go to and come from.
pub fn default_gateways() -> Vec<std::net::IpAddr> {
    let mut v = Vec::new();
    if let Ok(t) = std::fs::read_to_string("/proc/thread-self/net/route") {
        v.extend(gateways_v4(&t));
    }
    if let Ok(t) = std::fs::read_to_string("/proc/thread-self/net/ipv6_route") {
        v.extend(gateways_v6(&t));
    }
    v
}

fn gateways_v4(table: &str) -> Vec<std::net::IpAddr> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Destination and mask 0: a default route; its gateway is little-endian hex.
            if f.get(1) != Some(&"00000000") || f.get(7) != Some(&"00000000") {
                return None;
            }
            let gw = u32::from_str_radix(f.get(2)?, 16).ok().filter(|g| *g != 0)?;
            Some(std::net::IpAddr::from(gw.swap_bytes().to_be_bytes()))
        })
        .collect()
}

fn gateways_v6(table: &str) -> Vec<std::net::IpAddr> {
    table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.first() != Some(&"00000000000000000000000000000000") || f.get(1) != Some(&"00") {
                return None;
            }
            let gw = u128::from_str_radix(f.get(4)?, 16).ok().filter(|g| *g != 0)?;
            Some(std::net::IpAddr::from(gw.to_be_bytes()))
        })
        .collect()
}

#[cfg(test)]
mod gateway_tests {
    use super::*;

    #[test]
    fn default_routes_parse() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t0101F40A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  eth0\t0001F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(gateways_v4(v4), vec!["10.244.1.1".parse::<std::net::IpAddr>().unwrap()]);
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000244000100000000000000000001 00000400 00000001 00000000 00000003 eth0\n\
                  fd000244000100000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0\n";
        assert_eq!(gateways_v6(v6), vec!["fd00:244:1::1".parse::<std::net::IpAddr>().unwrap()]);
        assert!(gateways_v4("").is_empty() && gateways_v6("garbage\n\n").is_empty());
    }
}
