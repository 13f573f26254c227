//! The delta xDS client as a state machine: no sockets, no clock, no tokio. It holds the resources of each
//! type ztunnel subscribes to, turns each `DeltaDiscoveryResponse` into exactly one ACK or NACK, and says
//! whether the resources in force changed. A response is taken whole or not at all: one undecodable or
//! invalid resource NACKs it (with the resource and the reason in `error_detail`) and leaves the last good
//! state in force. On reconnect it asks again with `initial_resource_versions`, so the server can send only
//! what changed while the state is kept across the disconnect.

use std::collections::BTreeMap;
use std::sync::Arc;

use ambit_proto::control_plane::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status};
use ambit_proto::control_plane::istio::security::Authorization;
use ambit_proto::control_plane::istio::workload::Address;
use ambit_proto::control_plane::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use prost::Message;
use serde::Serialize;

use super::convert::{AddressResource, InvalidResource, address_from_proto, policy_from_proto};
use crate::authz::{Policy, PolicySet};
use crate::state::{Service, Workload};

/// The types ztunnel subscribes to, in the order it asks for them.
pub const TYPES: [&str; 2] = [ADDRESS_TYPE, AUTHORIZATION_TYPE];

/// gRPC's INVALID_ARGUMENT, the code of a NACK's detail.
const INVALID_ARGUMENT: i32 = 3;

/// One resource in force.
#[derive(Debug, Clone)]
enum Held {
    Workload(Arc<Workload>),
    Service(Arc<Service>),
    Policy(Arc<Policy>),
}

/// What happened to the last response of a type, for `/config_dump`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeStatus {
    /// Resources held.
    pub resources: usize,
    /// `system_version_info` of the last accepted response.
    pub system_version: String,
    /// Responses accepted.
    pub acks: u64,
    /// Responses refused.
    pub nacks: u64,
    /// The last accepted response: nonce and time (Unix seconds).
    pub last_ack: Option<(String, u64)>,
    /// The last refused response: its nonce, `system_version_info`, time and the error sent back.
    pub last_nack: Option<Nack>,
}

/// A refused response.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Nack {
    /// Its nonce.
    pub nonce: String,
    /// Its `system_version_info`.
    pub system_version: String,
    /// When (Unix seconds).
    pub at: u64,
    /// Why.
    pub error: String,
}

#[derive(Debug, Default)]
struct TypeState {
    held: BTreeMap<String, (String, Held)>,
    received: bool,
    status: TypeStatus,
}

/// What one response did.
#[derive(Debug)]
pub struct Outcome {
    /// The ACK or NACK to send.
    pub reply: DeltaDiscoveryRequest,
    /// Whether the resources in force changed.
    pub changed: bool,
    /// Why it was refused (a NACK).
    pub error: Option<String>,
    /// The type had resources and this response removed them all.
    pub emptied: bool,
}

/// The resources in force, as ztunnel's state takes them.
#[derive(Debug, Default)]
pub struct Resources {
    /// Workloads, by resource name.
    pub workloads: Vec<Arc<Workload>>,
    /// Services, by resource name.
    pub services: Vec<Arc<Service>>,
    /// Policies, by resource name.
    pub policies: Vec<Policy>,
}

/// The client's state across streams.
#[derive(Debug)]
pub struct Machine {
    node: Node,
    types: BTreeMap<&'static str, TypeState>,
}

impl Machine {
    /// A machine that identifies itself as `node`.
    pub fn new(node: Node) -> Machine {
        Machine { node, types: TYPES.iter().map(|t| (*t, TypeState::default())).collect() }
    }

    /// The first request of each type on a new stream: a wildcard subscription, with the versions of what is
    /// still held from an earlier stream. The node is sent on the first request only.
    pub fn start(&self) -> Vec<DeltaDiscoveryRequest> {
        TYPES
            .iter()
            .enumerate()
            .map(|(i, t)| DeltaDiscoveryRequest {
                node: (i == 0).then(|| self.node.clone()),
                type_url: t.to_string(),
                initial_resource_versions: self.types[t]
                    .held
                    .iter()
                    .map(|(name, (version, _))| (name.clone(), version.clone()))
                    .collect(),
                ..Default::default()
            })
            .collect()
    }

    /// Whether every type has had one accepted response (ztunnel is ready only then).
    pub fn synced(&self) -> bool {
        self.types.values().all(|t| t.received)
    }

    /// Takes a response; `now` (Unix seconds) stamps the status.
    pub fn handle(&mut self, resp: DeltaDiscoveryResponse, now: u64) -> Outcome {
        let nack = |error: String| DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail: Some(Status { code: INVALID_ARGUMENT, message: error, details: Vec::new() }),
            ..Default::default()
        };
        let Some(key) = TYPES.iter().copied().find(|t| *t == resp.type_url) else {
            let error = format!("type {:?} was not subscribed to (ztunnel takes {})", resp.type_url, TYPES.join(", "));
            return Outcome { reply: nack(error.clone()), changed: false, error: Some(error), emptied: false };
        };
        let decoded = match decode(&resp) {
            Ok(d) => d,
            Err(e) => {
                let error = e.to_string();
                self.record_nack(key, &resp, now, &error);
                return Outcome { reply: nack(error.clone()), changed: false, error: Some(error), emptied: false };
            }
        };
        // Apply on a copy; check what must hold across resources; only then replace.
        let t = &self.types[key];
        let had = t.held.len();
        let mut held = t.held.clone();
        let mut changed = false;
        for name in &resp.removed_resources {
            changed |= held.remove(name).is_some();
        }
        for (name, version, item) in decoded {
            held.insert(name, (version, item));
            changed = true;
        }
        if key == AUTHORIZATION_TYPE {
            let policies = held.values().filter_map(|(_, h)| match h {
                Held::Policy(p) => Some(p.as_ref().clone()),
                _ => None,
            });
            if let Err(e) = PolicySet::new(policies.collect()) {
                // The NACK's error detail is text on the wire.
                let e = e.to_string();
                self.record_nack(key, &resp, now, &e);
                return Outcome { reply: nack(e.clone()), changed: false, error: Some(e), emptied: false };
            }
        }
        let t = self.types.get_mut(key).expect("every subscribed type has a state");
        let emptied = had > 0 && held.is_empty();
        t.held = held;
        t.received = true;
        t.status.resources = t.held.len();
        t.status.system_version = resp.system_version_info.clone();
        t.status.acks += 1;
        t.status.last_ack = Some((resp.nonce.clone(), now));
        let reply =
            DeltaDiscoveryRequest { type_url: resp.type_url.clone(), response_nonce: resp.nonce, ..Default::default() };
        Outcome { reply, changed, error: None, emptied }
    }

    fn record_nack(&mut self, key: &str, resp: &DeltaDiscoveryResponse, now: u64, error: &str) {
        let t = self.types.get_mut(key).expect("known type");
        t.status.nacks += 1;
        t.status.last_nack = Some(Nack {
            nonce: resp.nonce.clone(),
            system_version: resp.system_version_info.clone(),
            at: now,
            error: error.to_string(),
        });
    }

    /// The resources in force.
    pub fn resources(&self) -> Resources {
        let mut r = Resources::default();
        for t in self.types.values() {
            for (_, h) in t.held.values() {
                match h {
                    Held::Workload(w) => r.workloads.push(w.clone()),
                    Held::Service(s) => r.services.push(s.clone()),
                    Held::Policy(p) => r.policies.push(p.as_ref().clone()),
                }
            }
        }
        r
    }

    /// Each type's status.
    pub fn status(&self) -> BTreeMap<String, TypeStatus> {
        self.types.iter().map(|(k, t)| (k.to_string(), t.status.clone())).collect()
    }
}

/// Decodes every resource of a response, or says which one is wrong.
fn decode(resp: &DeltaDiscoveryResponse) -> Result<Vec<(String, String, Held)>, InvalidResource> {
    let mut out = Vec::with_capacity(resp.resources.len());
    for r in &resp.resources {
        let bad = |reason: String| InvalidResource { resource: r.name.clone(), reason };
        if r.name.is_empty() {
            return Err(bad("a resource without a name".into()));
        }
        let any = r.resource.as_ref().ok_or_else(|| bad("no resource body".into()))?;
        if any.type_url != resp.type_url {
            return Err(bad(format!("a {} inside a {} response", any.type_url, resp.type_url)));
        }
        let held = if resp.type_url == ADDRESS_TYPE {
            let a = Address::decode(any.value.as_slice()).map_err(|e| bad(format!("undecodable: {e}")))?;
            match address_from_proto(&r.name, a)? {
                AddressResource::Workload(w) => Held::Workload(Arc::new(*w)),
                AddressResource::Service(s) => Held::Service(Arc::new(*s)),
            }
        } else {
            let a = Authorization::decode(any.value.as_slice()).map_err(|e| bad(format!("undecodable: {e}")))?;
            Held::Policy(Arc::new(policy_from_proto(&r.name, a)?))
        };
        out.push((r.name.clone(), r.version.clone(), held));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::convert::{policy_to_proto, workload_to_proto};
    use ambit_proto::control_plane::discovery::Resource;
    use ambit_proto::control_plane::istio::workload as wl;

    fn workload(name: &str, ip: [u8; 4]) -> Workload {
        crate::state::LocalConfig::parse(&format!(
            "workloads:\n- {{uid: {name}, name: {name}, namespace: ns, workloadIps: [{}], protocol: HBONE}}\n",
            std::net::Ipv4Addr::from(ip)
        ))
        .unwrap()
        .workloads
        .remove(0)
    }

    fn res(name: &str, type_url: &str, body: Vec<u8>) -> Resource {
        Resource {
            name: name.into(),
            version: format!("v-{name}"),
            resource: Some(prost_types::Any { type_url: type_url.into(), value: body }),
            ..Default::default()
        }
    }

    fn addresses(nonce: &str, add: &[Workload], remove: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            nonce: nonce.into(),
            system_version_info: format!("sv-{nonce}"),
            resources: add.iter().map(|w| res(&w.uid, ADDRESS_TYPE, workload_to_proto(w).encode_to_vec())).collect(),
            removed_resources: remove.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn policies(nonce: &str, add: &[Policy]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: AUTHORIZATION_TYPE.into(),
            nonce: nonce.into(),
            resources: add
                .iter()
                .map(|p| res(&p.key(), AUTHORIZATION_TYPE, policy_to_proto(p).encode_to_vec()))
                .collect(),
            ..Default::default()
        }
    }

    fn node() -> Node {
        Node { id: "ztunnel~10.0.0.1~z.istio-system~istio-system.svc.cluster.local".into(), ..Default::default() }
    }

    fn is_ack(r: &DeltaDiscoveryRequest, nonce: &str) -> bool {
        r.response_nonce == nonce && r.error_detail.is_none()
    }

    #[test]
    fn acks_applies_and_becomes_synced() {
        let mut m = Machine::new(node());
        let start = m.start();
        assert_eq!(start.len(), 2);
        assert!(start[0].node.is_some() && start[1].node.is_none(), "the node goes on the first request");
        assert!(start.iter().all(|r| r.resource_names_subscribe.is_empty() && r.response_nonce.is_empty()));
        let o = m.handle(addresses("1", &[workload("a", [10, 0, 0, 1]), workload("b", [10, 0, 0, 2])], &[]), 5);
        assert!(is_ack(&o.reply, "1") && o.changed && o.error.is_none());
        assert!(!m.synced(), "policies not received yet");
        let o = m.handle(policies("2", &[]), 6);
        assert!(is_ack(&o.reply, "2") && !o.changed);
        assert!(m.synced());
        assert_eq!(m.resources().workloads.len(), 2);
        let st = &m.status()[ADDRESS_TYPE];
        assert_eq!((st.resources, st.acks, st.system_version.as_str()), (2, 1, "sv-1"));
    }

    #[test]
    fn a_bad_resource_nacks_the_whole_response_and_keeps_the_last_good_state() {
        let mut m = Machine::new(node());
        m.handle(addresses("1", &[workload("a", [10, 0, 0, 1])], &[]), 1);
        // b is fine, c has a 3-byte address: nothing of this response is taken.
        let mut bad = addresses("2", &[workload("b", [10, 0, 0, 2])], &["a"]);
        let c = wl::Workload {
            uid: "c".into(),
            namespace: "ns".into(),
            addresses: vec![vec![1, 2, 3]],
            ..Default::default()
        };
        let c = wl::Address { r#type: Some(wl::address::Type::Workload(c)) };
        bad.resources.push(res("c", ADDRESS_TYPE, c.encode_to_vec()));
        let o = m.handle(bad, 2);
        let detail = o.reply.error_detail.expect("a NACK");
        assert_eq!(o.reply.response_nonce, "2");
        assert!(detail.message.contains("c:") && detail.message.contains("3 bytes"), "{}", detail.message);
        assert!(!o.changed);
        let names: Vec<String> = m.resources().workloads.iter().map(|w| w.uid.clone()).collect();
        assert_eq!(names, ["a"]);
        let st = &m.status()[ADDRESS_TYPE];
        assert_eq!((st.acks, st.nacks), (1, 1));
        assert_eq!(st.last_nack.as_ref().unwrap().nonce, "2");

        // Garbage bytes, a body of another type, a resource without a body.
        for r in [
            res("g", ADDRESS_TYPE, vec![0xff, 0xff, 0xff]),
            res("g", AUTHORIZATION_TYPE, Vec::new()),
            Resource { name: "g".into(), ..Default::default() },
        ] {
            let mut resp = addresses("3", &[], &[]);
            resp.resources.push(r);
            assert!(m.handle(resp, 3).reply.error_detail.is_some());
        }
        assert_eq!(m.resources().workloads.len(), 1);
    }

    #[test]
    fn unknown_types_are_nacked_without_touching_state() {
        let mut m = Machine::new(node());
        let resp = DeltaDiscoveryResponse {
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
            nonce: "n".into(),
            ..Default::default()
        };
        let o = m.handle(resp, 1);
        assert!(o.reply.error_detail.unwrap().message.contains("not subscribed"));
        assert_eq!(o.reply.type_url, "type.googleapis.com/envoy.config.cluster.v3.Cluster");
        assert!(!m.synced());
    }

    #[test]
    fn removals_and_reconnect_with_initial_versions() {
        let mut m = Machine::new(node());
        m.handle(addresses("1", &[workload("a", [10, 0, 0, 1]), workload("b", [10, 0, 0, 2])], &[]), 1);
        m.handle(policies("2", &[]), 1);
        let o = m.handle(addresses("3", &[], &["a", "never-sent"]), 2);
        assert!(is_ack(&o.reply, "3") && o.changed && !o.emptied);
        // A new stream: what is held is announced, and kept until the server says otherwise.
        let start = m.start();
        assert_eq!(start[0].initial_resource_versions, [("b".to_string(), "v-b".to_string())].into());
        assert!(m.synced(), "state survives the disconnect");
        let o = m.handle(addresses("4", &[], &["b"]), 3);
        assert!(o.emptied, "removing every workload is reported");
        assert!(m.resources().workloads.is_empty());
    }

    #[test]
    fn policies_that_do_not_hold_together_are_refused() {
        let mut m = Machine::new(node());
        let p: Policy = serde_yaml_ng::from_str("{name: p, namespace: n, scope: Namespace, action: Deny}").unwrap();
        let o = m.handle(policies("1", std::slice::from_ref(&p)), 1);
        assert!(o.error.is_none());
        // The same policy under a second resource name: its key would be defined twice.
        let mut resp = policies("2", &[p]);
        resp.resources[0].name = "other-name".into();
        let o = m.handle(resp, 2);
        assert!(o.error.unwrap().contains("twice"));
        assert_eq!(m.resources().policies.len(), 1);
    }

    #[test]
    fn a_huge_push_is_taken() {
        let mut m = Machine::new(node());
        let ws: Vec<Workload> = (0..10_000u32)
            .map(|i| workload(&format!("w{i}"), [10, (i >> 16) as u8, (i >> 8) as u8, i as u8]))
            .collect();
        let o = m.handle(addresses("1", &ws, &[]), 1);
        assert!(o.error.is_none());
        assert_eq!(m.status()[ADDRESS_TYPE].resources, 10_000);
    }
}

/// Property tests: the machine against a plain model, over random sequences of good and bad responses.
/// `AMBIT_PROPTEST_CASES` raises the number of cases (a nightly run); failures proptest finds are kept as
/// regression files beside this one.
#[cfg(test)]
mod props {
    use super::*;
    use crate::xds::convert::workload_to_proto;
    use ambit_proto::control_plane::discovery::Resource;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// One response the server might send.
    #[derive(Debug, Clone)]
    enum Push {
        /// Add or replace workload `n` with address 10.0.0.`ip`.
        Upsert(u8, u8),
        /// Remove workload `n`.
        Remove(u8),
        /// Add workload `n`, together with an undecodable resource: NACKed whole.
        UpsertWithGarbage(u8, u8),
        /// Random bytes as a resource.
        Bytes(Vec<u8>),
        /// A type nobody subscribed to.
        UnknownType,
    }

    fn push() -> impl Strategy<Value = Push> {
        prop_oneof![
            (0u8..8, any::<u8>()).prop_map(|(n, ip)| Push::Upsert(n, ip)),
            (0u8..8).prop_map(Push::Remove),
            (0u8..8, any::<u8>()).prop_map(|(n, ip)| Push::UpsertWithGarbage(n, ip)),
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(Push::Bytes),
            Just(Push::UnknownType),
        ]
    }

    fn workload(n: u8, ip: u8) -> Workload {
        Workload {
            uid: format!("w{n}"),
            name: format!("w{n}"),
            namespace: "ns".into(),
            service_account: String::new(),
            trust_domain: String::new(),
            workload_ips: vec![std::net::IpAddr::from([10, 0, 0, ip])],
            protocol: crate::state::Protocol::HBONE,
            node: String::new(),
            network: String::new(),
            workload_name: String::new(),
            canonical_name: String::new(),
            canonical_revision: String::new(),
            cluster_id: String::new(),
            status: crate::state::HealthStatus::Healthy,
            services: Default::default(),
            authorization_policies: Vec::new(),
            waypoint: None,
            network_gateway: None,
            network_mode: Default::default(),
            workload_type: String::new(),
            locality: Default::default(),
            capacity: 1,
        }
    }

    fn resource(name: &str, type_url: &str, value: Vec<u8>) -> Resource {
        Resource {
            name: name.into(),
            version: "v".into(),
            resource: Some(prost_types::Any { type_url: type_url.into(), value }),
            ..Default::default()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::testing::proptest_cases()))]

        #[test]
        fn the_machine_follows_the_model(pushes in proptest::collection::vec(push(), 1..40)) {
            let mut m = Machine::new(Node::default());
            let mut model: BTreeMap<String, std::net::IpAddr> = BTreeMap::new();
            for (i, p) in pushes.into_iter().enumerate() {
                let nonce = i.to_string();
                let mut resp = DeltaDiscoveryResponse { type_url: ADDRESS_TYPE.into(), nonce: nonce.clone(), ..Default::default() };
                let mut accepted = None;
                match &p {
                    Push::Upsert(n, ip) => {
                        let w = workload(*n, *ip);
                        resp.resources.push(resource(&w.uid, ADDRESS_TYPE, workload_to_proto(&w).encode_to_vec()));
                        accepted = Some((w.uid.clone(), Some(w.workload_ips[0])));
                    }
                    Push::Remove(n) => {
                        resp.removed_resources.push(format!("w{n}"));
                        accepted = Some((format!("w{n}"), None));
                    }
                    Push::UpsertWithGarbage(n, ip) => {
                        let w = workload(*n, *ip);
                        resp.resources.push(resource(&w.uid, ADDRESS_TYPE, workload_to_proto(&w).encode_to_vec()));
                        resp.resources.push(resource("bad", ADDRESS_TYPE, vec![0xff, 0xff, 0xff]));
                    }
                    Push::Bytes(b) => {
                        resp.resources.push(resource("random", ADDRESS_TYPE, b.clone()));
                    }
                    Push::UnknownType => resp.type_url = "type.googleapis.com/unknown".into(),
                }
                let o = m.handle(resp, i as u64);
                // Exactly one answer, to this response.
                prop_assert_eq!(&o.reply.response_nonce, &nonce);
                match accepted {
                    Some((uid, ip)) => {
                        prop_assert!(o.reply.error_detail.is_none(), "{:?} was NACKed: {:?}", p, o.error);
                        match ip {
                            Some(ip) => { model.insert(uid, ip); }
                            None => { model.remove(&uid); }
                        }
                    }
                    // Random bytes may happen to decode to a valid resource (named `random`): then it is taken,
                    // like any other, and touches nothing else.
                    None if matches!(p, Push::Bytes(_)) => {}
                    None => prop_assert!(o.reply.error_detail.is_some(), "{:?} was ACKed", p),
                }
                let held: BTreeMap<String, std::net::IpAddr> = m
                    .resources()
                    .workloads
                    .iter()
                    .filter(|w| w.uid != "random")
                    .map(|w| (w.uid.clone(), w.workload_ips[0]))
                    .collect();
                prop_assert_eq!(held, model.clone());
            }
        }

        #[test]
        fn any_bytes_as_a_resource_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), policy in any::<bool>()) {
            let type_url = if policy { AUTHORIZATION_TYPE } else { ADDRESS_TYPE };
            let mut m = Machine::new(Node::default());
            let resp = DeltaDiscoveryResponse {
                type_url: type_url.into(),
                nonce: "n".into(),
                resources: vec![resource("r", type_url, bytes)],
                ..Default::default()
            };
            let o = m.handle(resp, 0);
            prop_assert_eq!(o.reply.response_nonce, "n");
        }

        #[test]
        fn any_bytes_as_a_certificate_request_or_certificate_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = crate::tls::der::csr(&bytes);
            let _ = crate::tls::der::uri_sans(&bytes);
            let _ = crate::tls::der::not_after(&bytes);
            let _ = crate::tls::der::public_key(&bytes);
        }
    }
}
