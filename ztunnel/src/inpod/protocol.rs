//! ZDS on the wire, ztunnel's side: turning a packet and its fds into a validated [`Request`], refusing
//! anything malformed without leaking a descriptor.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use ambit_proto::zds::{self, WorkloadRequest, workload_request::Payload};

use super::netns::{InpodNetns, NetnsError};
use super::statemanager::{NetnsId, Request};

/// What ztunnel receives with an Add: the pod's netns and, with Ambit's extension, its listeners.
#[derive(Debug)]
pub struct PodResources {
    /// The netns.
    pub netns: InpodNetns,
    /// Listening sockets handed over by the agent, by port.
    pub listeners: Vec<(u16, std::net::TcpListener)>,
}

impl NetnsId for PodResources {
    fn inode(&self) -> u64 {
        self.netns.inode()
    }
}

/// Why a ZDS request was refused (the reason goes back in the nack).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not a protobuf `WorkloadRequest`.
    #[error("undecodable ZDS request: {0}")]
    Undecodable(#[from] prost::DecodeError),
    /// A request with no payload.
    #[error("ZDS request without a payload")]
    NoPayload,
    /// Fds with a request that takes none.
    #[error("{kind} carried {count} file descriptors; only add may")]
    UnexpectedFds {
        /// The request.
        kind: &'static str,
        /// How many came.
        count: usize,
    },
    /// An add whose fds do not match its listener ports.
    #[error("add for {uid} carried {got} fds, expected {} (netns + {listeners} listeners)", listeners + 1)]
    FdCount {
        /// The pod.
        uid: String,
        /// Fds received.
        got: usize,
        /// Listener ports named.
        listeners: usize,
    },
    /// The netns fd is not a network namespace.
    #[error("add for {uid}: {source}")]
    Netns {
        /// The pod.
        uid: String,
        /// What is wrong with it.
        source: NetnsError,
    },
    /// A port number that is not one.
    #[error("listener port {0} out of range")]
    PortRange(u32),
    /// A listener fd that is not the listener it was said to be.
    #[error("add for {uid}: listener {port}: {source}")]
    Listener {
        /// The pod.
        uid: String,
        /// The port.
        port: u16,
        /// What is wrong with it.
        source: ListenerError,
    },
}

/// What is wrong with a listener fd.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// Not a listening socket on its port.
    #[error(transparent)]
    Check(#[from] ambit_proto::seqpacket::ListenerCheckError),
    /// It cannot be made non-blocking.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Decodes one packet. Every fd it came with is either owned by the result or closed.
pub fn decode(packet: &[u8], mut fds: Vec<OwnedFd>, host: &Arc<OwnedFd>) -> Result<Request<PodResources>, DecodeError> {
    let req: WorkloadRequest = zds::decode(packet)?;
    let no_fds = |fds: &Vec<OwnedFd>, kind: &'static str| {
        if fds.is_empty() { Ok(()) } else { Err(DecodeError::UnexpectedFds { kind, count: fds.len() }) }
    };
    match req.payload {
        None => Err(DecodeError::NoPayload),
        Some(Payload::Del(d)) => no_fds(&fds, "del").map(|_| Request::Del { uid: d.uid }),
        Some(Payload::Keep(k)) => no_fds(&fds, "keep").map(|_| Request::Keep { uid: k.uid }),
        Some(Payload::SnapshotSent(_)) => no_fds(&fds, "snapshot_sent").map(|_| Request::SnapshotSent),
        Some(Payload::Add(a)) => {
            let want = 1 + a.ambit_listener_ports.len();
            if fds.len() != want {
                return Err(DecodeError::FdCount {
                    uid: a.uid,
                    got: fds.len(),
                    listeners: a.ambit_listener_ports.len(),
                });
            }
            let rest = fds.split_off(1);
            let netns_fd = fds.pop().expect("length checked");
            let netns = InpodNetns::new(host.clone(), netns_fd)
                .map_err(|source| DecodeError::Netns { uid: a.uid.clone(), source })?;
            let mut listeners = Vec::new();
            for (port, fd) in a.ambit_listener_ports.iter().zip(rest) {
                let port = u16::try_from(*port).map_err(|_| DecodeError::PortRange(*port))?;
                let l =
                    listener(fd, port).map_err(|source| DecodeError::Listener { uid: a.uid.clone(), port, source })?;
                listeners.push((port, l));
            }
            Ok(Request::Add {
                uid: a.uid,
                info: a.workload_info.unwrap_or_default(),
                netns: PodResources { netns, listeners },
                return_listeners: a.ambit_return_listeners,
            })
        }
    }
}

fn listener(fd: OwnedFd, port: u16) -> Result<std::net::TcpListener, ListenerError> {
    ambit_proto::seqpacket::check_listener(fd.as_fd(), port)?;
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true)?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_proto::zds::WorkloadInfo;

    fn host() -> Arc<OwnedFd> {
        super::super::netns::host_netns().unwrap()
    }

    fn netns_fd() -> OwnedFd {
        OwnedFd::from(std::fs::File::open("/proc/self/ns/net").unwrap())
    }

    #[test]
    fn add_with_netns_and_listeners() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let pkt = zds::encode(&WorkloadRequest::add("u", WorkloadInfo::default(), vec![u32::from(port)]));
        let r = decode(&pkt, vec![netns_fd(), OwnedFd::from(l)], &host()).unwrap();
        match r {
            Request::Add { netns, .. } => assert_eq!(netns.listeners.len(), 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_wrong_fds() {
        let h = host();
        let add = zds::encode(&WorkloadRequest::add("u", WorkloadInfo::default(), vec![]));
        assert!(decode(&add, vec![], &h).unwrap_err().to_string().contains("expected 1"));
        let not_ns = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        assert!(decode(&add, vec![not_ns], &h).unwrap_err().to_string().contains("not a network namespace"));
        let del = zds::encode(&WorkloadRequest::del("u"));
        assert!(decode(&del, vec![netns_fd()], &h).unwrap_err().to_string().contains("only add may"));
        // A listener claimed for the wrong port, and a socket that is not listening.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let add1 = zds::encode(&WorkloadRequest::add("u", WorkloadInfo::default(), vec![1]));
        assert!(decode(&add1, vec![netns_fd(), OwnedFd::from(l)], &h).unwrap_err().to_string().contains("not 1"));
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(decode(&add1, vec![netns_fd(), OwnedFd::from(s)], &h).is_err());
        assert!(decode(&[0xff, 0x01], vec![], &h).unwrap_err().to_string().contains("undecodable"));
        assert!(decode(&[], vec![], &h).unwrap_err().to_string().contains("without a payload"));
    }
}

/// Property test: any packet, with no fd, the netns fd, or a file that is not a netns, is decoded or refused
/// with a reason, never a panic, and never accepted as an Add without a netns.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::testing::proptest_cases()))]

        #[test]
        fn any_packet_with_any_fd_is_decoded_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..200), fd in 0u8..3) {
            let host = super::super::netns::host_netns().unwrap();
            let fds = match fd {
                0 => vec![],
                1 => vec![OwnedFd::from(std::fs::File::open("/proc/self/ns/net").unwrap())],
                _ => vec![OwnedFd::from(std::fs::File::open("/dev/null").unwrap())],
            };
            if let Ok(Request::Add { .. }) = decode(&bytes, fds, &host) {
                prop_assert_eq!(fd, 1, "an Add was accepted without a netns");
            }
        }
    }
}
