//! The pod's listening sockets (15001, 15006, 15008), created by the agent inside the pod netns.
//!
//! The agent holds them for as long as the pod is enrolled and passes copies to a ztunnel that takes them (the
//! ZDS listener-handoff extension). Because the sockets outlive any ztunnel process, a connection that arrives
//! while ztunnel restarts waits in the accept queue instead of being refused.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use ambit_proto::host::{ListenerOptions, inpod_listener};
use ambit_proto::zds::INPOD_PORTS;

use crate::rules::ZTUNNEL_MARK;

/// Accept queue length of each listener: large enough to absorb a ztunnel restart.
pub const BACKLOG: i32 = 4096;

/// A pod's listeners, in [`INPOD_PORTS`] order.
#[derive(Debug)]
pub struct PodListeners {
    sockets: Vec<(u16, OwnedFd)>,
}

impl PodListeners {
    /// Creates and binds the listeners in the calling thread's netns (call it on a netns worker thread).
    /// Dual-stack pods get `[::]` sockets that also accept IPv4; IPv4-only pods get `0.0.0.0`.
    pub fn bind_here(ipv6: bool) -> std::io::Result<PodListeners> {
        // SO_REUSEPORT lets a ztunnel that binds its own listeners (Istio's) start beside an old one during an
        // upgrade; the agent never keeps a copy nobody accepts from (it closes them before handing a pod to
        // such a ztunnel), so connections are never split onto a dead socket.
        let opts = ListenerOptions {
            ipv6,
            reuse_port: true,
            mark: ZTUNNEL_MARK,
            nodelay: true,
            nonblocking: false,
            backlog: BACKLOG,
        };
        let sockets = INPOD_PORTS
            .iter()
            .map(|&port| Ok((port, OwnedFd::from(inpod_listener(port, opts)?))))
            .collect::<std::io::Result<_>>()?;
        Ok(PodListeners { sockets })
    }

    /// Listeners ztunnel sent back (already checked to be listening on their ports).
    pub fn from_returned(sockets: Vec<(u16, OwnedFd)>) -> PodListeners {
        PodListeners { sockets }
    }

    /// The ports, in fd order.
    pub fn ports(&self) -> Vec<u32> {
        self.sockets.iter().map(|(p, _)| u32::from(*p)).collect()
    }

    /// The descriptors, in port order.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.sockets.iter().map(|(_, fd)| fd.as_fd()).collect()
    }
}
