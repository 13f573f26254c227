//! ZDS on the wire, ztunnel's side: turning a packet and its fds into a validated [`Request`], refusing
//! anything malformed without leaking a descriptor.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use ambit_proto::zds::{self, WorkloadRequest, workload_request::Payload};

use super::netns::InpodNetns;
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

/// Decodes one packet. Every fd it came with is either owned by the result or closed.
pub fn decode(packet: &[u8], mut fds: Vec<OwnedFd>, host: &Arc<OwnedFd>) -> Result<Request<PodResources>, String> {
    let req: WorkloadRequest = zds::decode(packet).map_err(|e| format!("undecodable ZDS request: {e}"))?;
    let no_fds = |fds: &Vec<OwnedFd>, kind: &str| {
        if fds.is_empty() {
            Ok(())
        } else {
            Err(format!("{kind} carried {} file descriptors; only add may", fds.len()))
        }
    };
    match req.payload {
        None => Err("ZDS request without a payload".into()),
        Some(Payload::Del(d)) => no_fds(&fds, "del").map(|_| Request::Del { uid: d.uid }),
        Some(Payload::Keep(k)) => no_fds(&fds, "keep").map(|_| Request::Keep { uid: k.uid }),
        Some(Payload::SnapshotSent(_)) => no_fds(&fds, "snapshot_sent").map(|_| Request::SnapshotSent),
        Some(Payload::Add(a)) => {
            let want = 1 + a.ambit_listener_ports.len();
            if fds.len() != want {
                return Err(format!(
                    "add for {} carried {} fds, expected {want} (netns + {} listeners)",
                    a.uid,
                    fds.len(),
                    a.ambit_listener_ports.len()
                ));
            }
            let rest = fds.split_off(1);
            let netns_fd = fds.pop().expect("length checked");
            let netns = InpodNetns::new(host.clone(), netns_fd).map_err(|e| format!("add for {}: {e}", a.uid))?;
            let mut listeners = Vec::new();
            for (port, fd) in a.ambit_listener_ports.iter().zip(rest) {
                let port = u16::try_from(*port).map_err(|_| format!("listener port {port} out of range"))?;
                listeners
                    .push((port, listener(fd, port).map_err(|e| format!("add for {}: listener {port}: {e}", a.uid))?));
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

fn listener(fd: OwnedFd, port: u16) -> Result<std::net::TcpListener, String> {
    ambit_proto::seqpacket::check_listener(fd.as_fd(), port)?;
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
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
        assert!(decode(&add, vec![], &h).unwrap_err().contains("expected 1"));
        let not_ns = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        assert!(decode(&add, vec![not_ns], &h).unwrap_err().contains("not a network namespace"));
        let del = zds::encode(&WorkloadRequest::del("u"));
        assert!(decode(&del, vec![netns_fd()], &h).unwrap_err().contains("only add may"));
        // A listener claimed for the wrong port, and a socket that is not listening.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let add1 = zds::encode(&WorkloadRequest::add("u", WorkloadInfo::default(), vec![1]));
        assert!(decode(&add1, vec![netns_fd(), OwnedFd::from(l)], &h).unwrap_err().contains("not 1"));
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(decode(&add1, vec![netns_fd(), OwnedFd::from(s)], &h).is_err());
        assert!(decode(&[0xff, 0x01], vec![], &h).unwrap_err().contains("undecodable"));
        assert!(decode(&[], vec![], &h).unwrap_err().contains("without a payload"));
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
