//! Pod network namespaces on ztunnel's side, and creating sockets inside them.
//!
//! A socket belongs to the netns it was created in, wherever it is used afterwards. So ztunnel switches the
//! current thread into the pod's netns only for the `socket()` call (and for binding its own listeners), then
//! switches straight back: nothing else runs in between, no task is polled, no await happens.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::sched::CloneFlags;

/// A pod's netns, held open for as long as ztunnel serves the pod.
#[derive(Debug)]
pub struct InpodNetns {
    fd: OwnedFd,
    inode: u64,
    host: Arc<OwnedFd>,
}

/// Why a netns fd was refused.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The fd is something other than a network namespace.
    #[error("the passed fd is not a network namespace")]
    NotANetns,
    /// Inspecting it failed.
    #[error("inspecting the passed netns fd: {0}")]
    Io(#[from] std::io::Error),
}

/// Opens ztunnel's own netns, to switch back to after creating a pod socket.
pub fn host_netns() -> std::io::Result<Arc<OwnedFd>> {
    Ok(Arc::new(OwnedFd::from(std::fs::File::open("/proc/self/ns/net")?)))
}

impl InpodNetns {
    /// Takes ownership of a netns fd received over ZDS, after checking that it is one.
    pub fn new(host: Arc<OwnedFd>, fd: OwnedFd) -> Result<InpodNetns, NetnsError> {
        match ambit_proto::host::check_netns(&fd)? {
            ambit_proto::host::NetnsCheck::Netns(inode) => Ok(InpodNetns { fd, inode, host }),
            _ => Err(NetnsError::NotANetns),
        }
    }

    /// The namespace's inode (its identity).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Runs `f` with the current thread inside the pod netns. `f` must be short and must not block.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> std::io::Result<T> {
        nix::sched::setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        let out = f();
        if let Err(e) = nix::sched::setns(self.host.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A worker thread stuck in a pod's netns would put other pods' sockets there: never continue.
            eprintln!("ztunnel: cannot return to the host netns (fd {}): {e}; aborting", self.host.as_raw_fd());
            std::process::abort();
        }
        Ok(out)
    }
}

impl crate::socket::PodSockets for InpodNetns {
    fn tcp(&self, ipv6: bool) -> std::io::Result<socket2::Socket> {
        let domain = if ipv6 { socket2::Domain::IPV6 } else { socket2::Domain::IPV4 };
        let ty = socket2::Type::STREAM.nonblocking().cloexec();
        self.run(|| socket2::Socket::new(domain, ty, Some(socket2::Protocol::TCP)))?
    }

    fn listener(&self, port: u16, opts: ambit_proto::host::ListenerOptions) -> std::io::Result<socket2::Socket> {
        self.run(|| ambit_proto::host::inpod_listener(port, opts))?
    }

    fn gateways(&self) -> Vec<std::net::IpAddr> {
        self.run(ambit_proto::host::default_gateways).unwrap_or_default()
    }
}
