//! ZDS message types (generated from `proto/zds.proto`) and the small helpers both ends need.
//!
//! Framing is one protobuf message per `SOCK_SEQPACKET` packet, so encoding and decoding here work on whole
//! packets; the socket code lives with each program.

#![allow(missing_docs)]
include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));

use prost::Message;

/// Largest ZDS packet either side accepts. Istio's ztunnel reads into a 1 KiB buffer; Ambit allows more room
/// but a packet that fills this buffer is treated as truncated and rejected.
pub const MAX_PACKET: usize = 4096;

/// The standard ports of an in-pod listener set, in the order Ambit passes them after the netns fd.
pub const INPOD_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT];
/// Where the node agent serves ZDS by default (Istio's `INPOD_UDS` default too).
pub const DEFAULT_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";
/// Outbound capture port inside every enrolled pod netns.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture port inside every enrolled pod netns.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Inbound HBONE (mTLS) port inside every enrolled pod netns.
pub const INBOUND_HBONE_PORT: u16 = 15008;
/// The port of `ambit-agent debug`'s probes: outbound from a pod to its gateway (the node), inbound from the
/// node to the pod. Ambit's ztunnel closes such a connection once accepted, without dialing anywhere (the probe
/// only proves capture); connections to this port from or to anything but the pod's node are proxied as usual.
pub const DEBUG_PROBE_PORT: u16 = 15007;

impl WorkloadRequest {
    /// A request that adds a pod; its netns fd (and listener fds, if any) travel beside it.
    pub fn add(uid: impl Into<String>, info: WorkloadInfo, listener_ports: Vec<u32>) -> Self {
        WorkloadRequest {
            payload: Some(workload_request::Payload::Add(AddWorkload {
                uid: uid.into(),
                workload_info: Some(info),
                ambit_listener_ports: listener_ports,
                ambit_return_listeners: false,
            })),
        }
    }

    /// An add that also asks ztunnel to send back the pod's listening sockets (Ambit extension).
    pub fn add_returning_listeners(uid: impl Into<String>, info: WorkloadInfo) -> Self {
        let mut r = Self::add(uid, info, Vec::new());
        if let Some(workload_request::Payload::Add(a)) = &mut r.payload {
            a.ambit_return_listeners = true;
        }
        r
    }

    /// A request that removes a pod.
    pub fn del(uid: impl Into<String>) -> Self {
        WorkloadRequest { payload: Some(workload_request::Payload::Del(DelWorkload { uid: uid.into() })) }
    }

    /// A snapshot entry for a pod whose netns the agent does not hold (keep it if you have it).
    pub fn keep(uid: impl Into<String>) -> Self {
        WorkloadRequest { payload: Some(workload_request::Payload::Keep(KeepWorkload { uid: uid.into() })) }
    }

    /// The end-of-snapshot marker.
    pub fn snapshot_sent() -> Self {
        WorkloadRequest { payload: Some(workload_request::Payload::SnapshotSent(SnapshotSent {})) }
    }

    /// A short name of the request kind, for logs.
    pub fn kind(&self) -> &'static str {
        match &self.payload {
            Some(workload_request::Payload::Add(_)) => "add",
            Some(workload_request::Payload::Del(_)) => "del",
            Some(workload_request::Payload::Keep(_)) => "keep",
            Some(workload_request::Payload::SnapshotSent(_)) => "snapshot_sent",
            None => "empty",
        }
    }
}

impl WorkloadResponse {
    /// A positive acknowledgement.
    pub fn ack() -> Self {
        Self::ack_with_listeners(Vec::new())
    }

    /// A positive acknowledgement whose listener fds (on these ports) travel with it (Ambit extension).
    pub fn ack_with_listeners(ports: Vec<u32>) -> Self {
        WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack { error: String::new(), ambit_listener_ports: ports })),
        }
    }

    /// A negative acknowledgement carrying the reason.
    pub fn nack(error: impl Into<String>) -> Self {
        WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: error.into(),
                ambit_listener_ports: Vec::new(),
            })),
        }
    }

    /// `Ok(listener ports)` for an ack, `Err(reason)` for a nack or a response without an ack.
    pub fn into_result(self) -> Result<Vec<u32>, String> {
        match self.payload {
            Some(workload_response::Payload::Ack(a)) if a.error.is_empty() => Ok(a.ambit_listener_ports),
            Some(workload_response::Payload::Ack(a)) => Err(a.error),
            None => Err("response carries no ack".to_string()),
        }
    }
}

impl ZdsHello {
    /// The hello Ambit's ztunnel sends: V1 plus the capabilities it has.
    pub fn ambit(listener_handoff: bool) -> Self {
        ZdsHello { version: Version::V1 as i32, ambit: Some(AmbitCapabilities { listener_handoff }) }
    }

    /// Whether the peer announced that it takes listener fds.
    pub fn listener_handoff(&self) -> bool {
        self.ambit.as_ref().is_some_and(|a| a.listener_handoff)
    }
}

/// Encodes any ZDS message into one packet.
pub fn encode<M: Message>(m: &M) -> Vec<u8> {
    m.encode_to_vec()
}

/// Decodes one packet.
pub fn decode<M: Message + Default>(packet: &[u8]) -> Result<M, prost::DecodeError> {
    M::decode(packet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_v1_is_istio_bytes() {
        // Istio's ztunnel sends exactly `08 01`; without the extension we must too.
        let plain = ZdsHello { version: Version::V1 as i32, ambit: None };
        assert_eq!(encode(&plain), vec![0x08, 0x01]);
        let ext = ZdsHello::ambit(true);
        let bytes = encode(&ext);
        assert_eq!(&bytes[..2], &[0x08, 0x01]);
        let back: ZdsHello = decode(&bytes).unwrap();
        assert!(back.listener_handoff());
    }

    #[test]
    fn field_numbers_match_istio() {
        // del carries the uid in field 2 of DelWorkload, nested as field 2 of WorkloadRequest.
        let del = encode(&WorkloadRequest::del("u"));
        assert_eq!(del, vec![0x12, 0x03, 0x12, 0x01, b'u']);
        // keep is field 5, its uid field 1.
        let keep = encode(&WorkloadRequest::keep("u"));
        assert_eq!(keep, vec![0x2a, 0x03, 0x0a, 0x01, b'u']);
        // snapshot_sent is field 3 and empty.
        assert_eq!(encode(&WorkloadRequest::snapshot_sent()), vec![0x1a, 0x00]);
        // add: uid=1, workload_info=2 {name=1, namespace=2, service_account=3}.
        let info = WorkloadInfo { name: "n".into(), namespace: "s".into(), service_account: "a".into() };
        let add = encode(&WorkloadRequest::add("u", info, vec![]));
        assert_eq!(
            add,
            vec![0x0a, 0x0e, 0x0a, 0x01, b'u', 0x12, 0x09, 0x0a, 0x01, b'n', 0x12, 0x01, b's', 0x1a, 0x01, b'a']
        );
        // ack: WorkloadResponse.ack = 1, Ack.error = 1.
        assert_eq!(encode(&WorkloadResponse::ack()), vec![0x0a, 0x00]);
        assert_eq!(encode(&WorkloadResponse::nack("x")), vec![0x0a, 0x03, 0x0a, 0x01, b'x']);
    }

    #[test]
    fn extension_is_skipped_by_older_peers() {
        // A peer built from Istio's schema knows only field 1..5; an unknown high field must decode cleanly.
        let info = WorkloadInfo::default();
        let add = encode(&WorkloadRequest::add("u", info, vec![15001, 15006, 15008]));
        #[derive(Clone, PartialEq, prost::Message)]
        struct IstioAdd {
            #[prost(string, tag = "1")]
            uid: String,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        struct IstioReq {
            #[prost(message, optional, tag = "1")]
            add: Option<IstioAdd>,
        }
        let r: IstioReq = decode(&add).unwrap();
        assert_eq!(r.add.unwrap().uid, "u");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for packet in [&[0xff_u8, 0xff, 0xff][..], &[0x0a, 0x7f], &[0x08]] {
            assert!(decode::<WorkloadRequest>(packet).is_err());
        }
    }
}

/// Property tests: any packet is decoded or refused, never a panic; requests survive the wire unchanged.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::testing::proptest_cases()))]

        #[test]
        fn any_packet_is_decoded_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode::<WorkloadRequest>(&bytes);
            let _ = decode::<WorkloadResponse>(&bytes);
            let _ = decode::<ZdsHello>(&bytes);
        }

        #[test]
        fn requests_round_trip(uid in ".{0,40}", name in ".{0,20}", namespace in ".{0,20}", sa in ".{0,20}", which in 0u8..4) {
            let info = WorkloadInfo { name, namespace, service_account: sa };
            let r = match which {
                0 => WorkloadRequest::add(uid, info, Vec::new()),
                1 => WorkloadRequest::del(uid),
                2 => WorkloadRequest::keep(uid),
                _ => WorkloadRequest::snapshot_sent(),
            };
            prop_assert_eq!(decode::<WorkloadRequest>(&encode(&r)).unwrap(), r);
        }
    }
}
