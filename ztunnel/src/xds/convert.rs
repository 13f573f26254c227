//! Between istiod's resources (`istio.workload.Address`, `istio.security.Authorization`) and ztunnel's own
//! types ([`Workload`], [`Service`], [`Policy`], the same ones the local file fills). Decoding validates
//! everything ztunnel relies on (address lengths, ports, prefix lengths, enum values, names) and says which
//! resource and which field is wrong; encoding is used by control planes built on this crate (the lab's).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ambit_proto::control_plane::istio::security as sec;
use ambit_proto::control_plane::istio::workload as wl;

use crate::authz::{Action, Cidr, Match, Policy, Scope, ServiceAccountMatch, StringMatch};
use crate::state::{
    GatewayAddress, GatewayDestination, HealthStatus, Locality, NamespacedHostname, NetworkAddress, NetworkMode,
    Protocol, Service, WeightedWaypoint, Workload,
};

/// The cluster of a workload whose resource names none (Istio's ztunnel's default, as istiod's).
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// A resource ztunnel cannot use, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {reason}")]
pub struct InvalidResource {
    /// Its name.
    pub resource: String,
    /// What is wrong.
    pub reason: String,
}

/// An `Address` resource, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum AddressResource {
    /// A workload (boxed, as the service: both are large, and each ends up behind an `Arc`).
    Workload(Box<Workload>),
    /// A service.
    Service(Box<Service>),
}

fn ip(bytes: &[u8]) -> Result<IpAddr, String> {
    match bytes.len() {
        4 => Ok(IpAddr::from(<[u8; 4]>::try_from(bytes).expect("4 bytes"))),
        16 => Ok(IpAddr::from(<[u8; 16]>::try_from(bytes).expect("16 bytes"))),
        n => Err(format!("an address of {n} bytes (4 or 16 expected)")),
    }
}

fn port(p: u32, what: &str) -> Result<u16, String> {
    u16::try_from(p).map_err(|_| format!("{what} {p} is not a port"))
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Decodes an `Address` named `name`.
pub fn address_from_proto(name: &str, a: wl::Address) -> Result<AddressResource, InvalidResource> {
    let bad = |reason: String| InvalidResource { resource: name.to_string(), reason };
    match a.r#type {
        Some(wl::address::Type::Workload(w)) => {
            workload_from_proto(w).map(|w| AddressResource::Workload(Box::new(w))).map_err(bad)
        }
        Some(wl::address::Type::Service(s)) => {
            service_from_proto(s).map(|s| AddressResource::Service(Box::new(s))).map_err(bad)
        }
        None => Err(bad("neither a workload nor a service".into())),
    }
}

fn gateway_from_proto(g: &wl::GatewayAddress, what: &str) -> Result<GatewayAddress, String> {
    use wl::gateway_address::Destination;
    let destination = match &g.destination {
        Some(Destination::Address(a)) => {
            GatewayDestination::Address(NetworkAddress { network: a.network.clone(), address: ip(&a.address)? })
        }
        Some(Destination::Hostname(h)) if !h.namespace.is_empty() && !h.hostname.is_empty() => {
            GatewayDestination::Hostname(NamespacedHostname {
                namespace: h.namespace.clone(),
                hostname: h.hostname.clone(),
            })
        }
        Some(Destination::Hostname(_)) => return Err(format!("{what}: a hostname without namespace or hostname")),
        None => return Err(format!("{what}: neither an address nor a hostname")),
    };
    Ok(GatewayAddress { destination, hbone_mtls_port: port(g.hbone_mtls_port, &format!("{what} port"))? })
}

fn gateway_to_proto(g: &GatewayAddress) -> wl::GatewayAddress {
    use wl::gateway_address::Destination;
    let destination = match &g.destination {
        GatewayDestination::Address(a) => Destination::Address(wl::NetworkAddress {
            network: a.network.clone(),
            address: ip_bytes(a.address),
            length: None,
        }),
        GatewayDestination::Hostname(h) => Destination::Hostname(wl::NamespacedHostname {
            namespace: h.namespace.clone(),
            hostname: h.hostname.clone(),
        }),
    };
    wl::GatewayAddress { destination: Some(destination), hbone_mtls_port: u32::from(g.hbone_mtls_port) }
}

fn workload_from_proto(w: wl::Workload) -> Result<Workload, String> {
    if w.namespace.is_empty() {
        return Err("workload without a namespace".into());
    }
    let protocol = match wl::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(wl::TunnelProtocol::Hbone) => Protocol::HBONE,
        Ok(wl::TunnelProtocol::None) => Protocol::TCP,
        Ok(wl::TunnelProtocol::LegacyIstioMtls) => {
            return Err("tunnel protocol LEGACY_ISTIO_MTLS (sidecar mTLS) is not supported".into());
        }
        Err(_) => return Err(format!("unknown tunnel protocol {}", w.tunnel_protocol)),
    };
    let status = match wl::WorkloadStatus::try_from(w.status) {
        Ok(wl::WorkloadStatus::Healthy) => HealthStatus::Healthy,
        Ok(wl::WorkloadStatus::Unhealthy) => HealthStatus::Unhealthy,
        Err(_) => return Err(format!("unknown status {}", w.status)),
    };
    let workload_ips = w.addresses.iter().map(|a| ip(a)).collect::<Result<Vec<_>, _>>()?;
    let mut services = HashMap::with_capacity(w.services.len());
    for (key, list) in w.services {
        if !key.contains('/') {
            return Err(format!("service key {key:?} is not <namespace>/<hostname>"));
        }
        let ports = list
            .ports
            .iter()
            .map(|p| Ok((port(p.service_port, "service port")?, port(p.target_port, "target port")?)))
            .collect::<Result<HashMap<u16, u16>, String>>()?;
        services.insert(key, ports);
    }
    let network_mode = match wl::NetworkMode::try_from(w.network_mode) {
        Ok(wl::NetworkMode::Standard) => NetworkMode::Standard,
        Ok(wl::NetworkMode::HostNetwork) => NetworkMode::HostNetwork,
        Err(_) => return Err(format!("unknown network mode {}", w.network_mode)),
    };
    // As Istio's ztunnel names it: the enum's name in lower case.
    let workload_type = wl::WorkloadType::try_from(w.workload_type)
        .map_err(|_| format!("unknown workload type {}", w.workload_type))?
        .as_str_name()
        .to_lowercase();
    let locality =
        w.locality.map(|l| Locality { region: l.region, zone: l.zone, subzone: l.subzone }).unwrap_or_default();
    let cluster_id = if w.cluster_id.is_empty() { DEFAULT_CLUSTER_ID.to_string() } else { w.cluster_id };
    Ok(Workload {
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        service_account: w.service_account,
        trust_domain: w.trust_domain,
        workload_ips,
        protocol,
        node: w.node,
        network: w.network,
        workload_name: w.workload_name,
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        cluster_id,
        status,
        services,
        authorization_policies: w.authorization_policies,
        waypoint: w.waypoint.as_ref().map(|g| gateway_from_proto(g, "waypoint")).transpose()?,
        network_gateway: w.network_gateway.as_ref().map(|g| gateway_from_proto(g, "network gateway")).transpose()?,
        network_mode,
        workload_type,
        locality,
        capacity: w.capacity.unwrap_or(1),
    })
}

fn service_from_proto(s: wl::Service) -> Result<Service, String> {
    if s.namespace.is_empty() || s.hostname.is_empty() {
        return Err("service without a namespace or hostname".into());
    }
    let vips = s
        .addresses
        .iter()
        .map(|a| Ok(NetworkAddress { network: a.network.clone(), address: ip(&a.address)? }))
        .collect::<Result<Vec<_>, String>>()?;
    let ports = s
        .ports
        .iter()
        .map(|p| Ok((port(p.service_port, "service port")?, port(p.target_port, "target port")?)))
        .collect::<Result<BTreeMap<u16, u16>, String>>()?;
    let mut other = BTreeMap::new();
    if let Some(lb) = &s.load_balancing {
        let mode = wl::load_balancing::Mode::try_from(lb.mode).map(|m| m.as_str_name()).unwrap_or("UNKNOWN");
        other.insert("loadBalancer".to_string(), serde_json::json!({"mode": mode}));
    }
    let weighted_waypoints = s
        .weighted_waypoints
        .iter()
        .map(|w| {
            let g = w.destination.as_ref().ok_or("a weighted waypoint without a destination")?;
            Ok(WeightedWaypoint { destination: gateway_from_proto(g, "weighted waypoint")?, weight: w.weight })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Service {
        waypoint: s.waypoint.as_ref().map(|g| gateway_from_proto(g, "waypoint")).transpose()?,
        weighted_waypoints,
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        vips,
        ports,
        subject_alt_names: s.subject_alt_names,
        other,
    })
}

/// Encodes a workload.
pub fn workload_to_proto(w: &Workload) -> wl::Address {
    let services = w
        .services
        .iter()
        .map(|(k, ports)| {
            let mut ports: Vec<wl::Port> = ports
                .iter()
                .map(|(s, t)| wl::Port { service_port: u32::from(*s), target_port: u32::from(*t), app_protocol: 0 })
                .collect();
            ports.sort_by_key(|p| p.service_port);
            (k.clone(), wl::PortList { ports })
        })
        .collect();
    let w = wl::Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: w.workload_ips.iter().map(|i| ip_bytes(*i)).collect(),
        network: w.network.clone(),
        tunnel_protocol: match w.protocol {
            Protocol::HBONE => wl::TunnelProtocol::Hbone as i32,
            Protocol::TCP => wl::TunnelProtocol::None as i32,
        },
        trust_domain: w.trust_domain.clone(),
        service_account: w.service_account.clone(),
        node: w.node.clone(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_type: wl::WorkloadType::from_str_name(&w.workload_type.to_uppercase()).unwrap_or(wl::WorkloadType::Pod)
            as i32,
        workload_name: w.workload_name.clone(),
        services,
        authorization_policies: w.authorization_policies.clone(),
        status: match w.status {
            HealthStatus::Healthy => wl::WorkloadStatus::Healthy as i32,
            HealthStatus::Unhealthy => wl::WorkloadStatus::Unhealthy as i32,
        },
        cluster_id: w.cluster_id.clone(),
        waypoint: w.waypoint.as_ref().map(gateway_to_proto),
        network_gateway: w.network_gateway.as_ref().map(gateway_to_proto),
        network_mode: match w.network_mode {
            NetworkMode::Standard => wl::NetworkMode::Standard,
            NetworkMode::HostNetwork => wl::NetworkMode::HostNetwork,
        } as i32,
        locality: (!w.locality.is_empty()).then(|| wl::Locality {
            region: w.locality.region.clone(),
            zone: w.locality.zone.clone(),
            subzone: w.locality.subzone.clone(),
        }),
        capacity: (w.capacity != 1).then_some(w.capacity),
        ..Default::default()
    };
    wl::Address { r#type: Some(wl::address::Type::Workload(w)) }
}

/// Encodes a service.
pub fn service_to_proto(s: &Service) -> wl::Address {
    let s = wl::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses: s
            .vips
            .iter()
            .map(|v| wl::NetworkAddress { network: v.network.clone(), address: ip_bytes(v.address), length: None })
            .collect(),
        ports: s
            .ports
            .iter()
            .map(|(p, t)| wl::Port { service_port: u32::from(*p), target_port: u32::from(*t), app_protocol: 0 })
            .collect(),
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: s.waypoint.as_ref().map(gateway_to_proto),
        weighted_waypoints: s
            .weighted_waypoints
            .iter()
            .map(|w| wl::WeightedWaypoint { destination: Some(gateway_to_proto(&w.destination)), weight: w.weight })
            .collect(),
        ..Default::default()
    };
    wl::Address { r#type: Some(wl::address::Type::Service(s)) }
}

fn string_match_from_proto(m: &sec::StringMatch) -> Result<StringMatch, String> {
    use sec::string_match::MatchType;
    match &m.match_type {
        Some(MatchType::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
        Some(MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
        Some(MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s.clone())),
        Some(MatchType::Presence(_)) => Ok(StringMatch::Presence),
        None => Err("a string match with no kind".into()),
    }
}

fn string_match_to_proto(m: &StringMatch) -> sec::StringMatch {
    use sec::string_match::MatchType;
    let t = match m {
        StringMatch::Exact(s) => MatchType::Exact(s.clone()),
        StringMatch::Prefix(s) => MatchType::Prefix(s.clone()),
        StringMatch::Suffix(s) => MatchType::Suffix(s.clone()),
        StringMatch::Presence => MatchType::Presence(()),
    };
    sec::StringMatch { match_type: Some(t) }
}

fn cidr_from_proto(a: &sec::Address) -> Result<Cidr, String> {
    let addr = ip(&a.address)?;
    format!("{addr}/{}", a.length).parse()
}

fn cidr_to_proto(c: &Cidr) -> sec::Address {
    sec::Address { address: ip_bytes(c.addr()), length: u32::from(c.len()) }
}

fn match_from_proto(m: &sec::Match) -> Result<Match, String> {
    let strings = |v: &[sec::StringMatch]| v.iter().map(string_match_from_proto).collect::<Result<Vec<_>, _>>();
    let cidrs = |v: &[sec::Address]| v.iter().map(cidr_from_proto).collect::<Result<Vec<_>, _>>();
    let ports = |v: &[u32]| v.iter().map(|p| port(*p, "destination port")).collect::<Result<Vec<_>, _>>();
    let sas = |v: &[sec::ServiceAccountMatch]| {
        v.iter()
            .map(|s| ServiceAccountMatch { namespace: s.namespace.clone(), service_account: s.service_account.clone() })
            .collect()
    };
    if !m.extensions.is_empty() {
        return Err("match extensions are not supported (a policy ztunnel cannot fully evaluate is refused)".into());
    }
    Ok(Match {
        namespaces: strings(&m.namespaces)?,
        not_namespaces: strings(&m.not_namespaces)?,
        service_accounts: sas(&m.service_accounts),
        not_service_accounts: sas(&m.not_service_accounts),
        principals: strings(&m.principals)?,
        not_principals: strings(&m.not_principals)?,
        source_ips: cidrs(&m.source_ips)?,
        not_source_ips: cidrs(&m.not_source_ips)?,
        destination_ips: cidrs(&m.destination_ips)?,
        not_destination_ips: cidrs(&m.not_destination_ips)?,
        destination_ports: ports(&m.destination_ports)?,
        not_destination_ports: ports(&m.not_destination_ports)?,
    })
}

fn match_to_proto(m: &Match) -> sec::Match {
    let strings = |v: &[StringMatch]| v.iter().map(string_match_to_proto).collect();
    let cidrs = |v: &[Cidr]| v.iter().map(cidr_to_proto).collect();
    let ports = |v: &[u16]| v.iter().map(|p| u32::from(*p)).collect();
    let sas = |v: &[ServiceAccountMatch]| {
        v.iter()
            .map(|s| sec::ServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            })
            .collect()
    };
    sec::Match {
        namespaces: strings(&m.namespaces),
        not_namespaces: strings(&m.not_namespaces),
        service_accounts: sas(&m.service_accounts),
        not_service_accounts: sas(&m.not_service_accounts),
        principals: strings(&m.principals),
        not_principals: strings(&m.not_principals),
        source_ips: cidrs(&m.source_ips),
        not_source_ips: cidrs(&m.not_source_ips),
        destination_ips: cidrs(&m.destination_ips),
        not_destination_ips: cidrs(&m.not_destination_ips),
        destination_ports: ports(&m.destination_ports),
        not_destination_ports: ports(&m.not_destination_ports),
        extensions: Vec::new(),
    }
}

/// Decodes an `Authorization` named `name`.
pub fn policy_from_proto(name: &str, a: sec::Authorization) -> Result<Policy, InvalidResource> {
    let bad = |reason: String| InvalidResource { resource: name.to_string(), reason };
    let scope = match sec::Scope::try_from(a.scope) {
        Ok(sec::Scope::Global) => Scope::Global,
        Ok(sec::Scope::Namespace) => Scope::Namespace,
        Ok(sec::Scope::WorkloadSelector) => Scope::WorkloadSelector,
        Err(_) => return Err(bad(format!("unknown scope {}", a.scope))),
    };
    let action = match sec::Action::try_from(a.action) {
        Ok(sec::Action::Allow) => Action::Allow,
        Ok(sec::Action::Deny) => Action::Deny,
        Err(_) => return Err(bad(format!("unknown action {}", a.action))),
    };
    if a.name.is_empty() {
        return Err(bad("policy without a name".into()));
    }
    let rules = a
        .rules
        .iter()
        .map(|r| {
            r.clauses.iter().map(|c| c.matches.iter().map(match_from_proto).collect::<Result<Vec<_>, _>>()).collect()
        })
        .collect::<Result<Vec<Vec<Vec<Match>>>, String>>()
        .map_err(bad)?;
    Ok(Policy { name: a.name, namespace: a.namespace, scope, action, rules, dry_run: a.dry_run })
}

/// Encodes a policy.
pub fn policy_to_proto(p: &Policy) -> sec::Authorization {
    sec::Authorization {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope: match p.scope {
            Scope::Global => sec::Scope::Global,
            Scope::Namespace => sec::Scope::Namespace,
            Scope::WorkloadSelector => sec::Scope::WorkloadSelector,
        } as i32,
        action: match p.action {
            Action::Allow => sec::Action::Allow,
            Action::Deny => sec::Action::Deny,
        } as i32,
        rules: p
            .rules
            .iter()
            .map(|r| sec::Rule {
                clauses: r.iter().map(|c| sec::Clause { matches: c.iter().map(match_to_proto).collect() }).collect(),
            })
            .collect(),
        dry_run: p.dry_run,
        extensions: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::LocalConfig;

    const MESH: &str = r#"
workloads:
- uid: Kubernetes//Pod/mesh/a
  name: a
  namespace: mesh
  serviceAccount: sa-a
  workloadIps: ["10.244.1.2", "fd00:244:1::2"]
  protocol: HBONE
  node: node1
  canonicalName: app-a
  clusterId: Kubernetes
  workloadType: deployment
  locality: {region: r1, zone: z1, subzone: s1}
  capacity: 3
  status: Unhealthy
  services: {"mesh/echo.mesh.svc.cluster.local": {80: 8080}}
  authorizationPolicies: ["mesh/only-b"]
  waypoint: {destination: "/10.244.1.9", hboneMtlsPort: 15008}
  networkGateway: {destination: "net2/192.0.2.1", hboneMtlsPort: 15008}
- uid: Kubernetes//Pod/mesh/waypoint
  name: waypoint
  namespace: mesh
  serviceAccount: waypoint
  clusterId: Kubernetes
  workloadType: pod
  networkMode: HostNetwork
  workloadIps: ["10.244.1.9"]
  protocol: HBONE
  services: {"mesh/waypoint.mesh.svc.cluster.local": {15008: 15008}}
services:
- name: echo
  namespace: mesh
  hostname: echo.mesh.svc.cluster.local
  vips: ["/10.96.0.10", "net1/fd00:96::10"]
  ports: {80: 8080, 90: 0}
  subjectAltNames: ["spiffe://cluster.local/ns/mesh/sa/echo"]
  waypoint: {destination: "mesh/waypoint.mesh.svc.cluster.local", hboneMtlsPort: 15008}
  weightedWaypoints:
  - {destination: {destination: "mesh/waypoint.mesh.svc.cluster.local", hboneMtlsPort: 15008}, weight: 9}
  - {destination: {destination: "/10.96.0.99", hboneMtlsPort: 15008}, weight: 1}
- name: waypoint
  namespace: mesh
  hostname: waypoint.mesh.svc.cluster.local
  vips: ["/10.96.0.99"]
  ports: {15021: 15021}
policies:
- name: only-b
  namespace: mesh
  scope: WorkloadSelector
  action: Allow
  dryRun: true
  rules:
  - - - principals: [{Exact: cluster.local/ns/mesh/sa/b}, {Prefix: cluster.local/ns/x}, {Presence: []}]
        notSourceIps: ["10.0.0.0/8", "fd00::/16"]
        destinationPorts: [8080]
        serviceAccounts: [{namespace: mesh, serviceAccount: b}]
    - - notNamespaces: [{Suffix: -test}]
"#;

    #[test]
    fn the_local_file_round_trips_through_istios_resources() {
        let c = LocalConfig::parse(MESH).unwrap();
        // Istio's waypoint fields are read as such, in Istio's shape, not kept aside as unknown.
        let echo = &c.services[0];
        assert!(echo.other.is_empty(), "{:?}", echo.other);
        assert_eq!(echo.waypoint.as_ref().unwrap().to_string(), "mesh/waypoint.mesh.svc.cluster.local:15008");
        assert_eq!(echo.weighted_waypoints[1].destination.to_string(), "/10.96.0.99:15008");
        let dumped = serde_json::to_value(echo).unwrap();
        assert_eq!(
            dumped["waypoint"],
            serde_json::json!({"destination": "mesh/waypoint.mesh.svc.cluster.local", "hboneMtlsPort": 15008})
        );
        assert_eq!(serde_json::to_value(&c.workloads[0]).unwrap()["waypoint"]["destination"], "/10.244.1.9");
        assert!(serde_json::to_value(&c.workloads[1]).unwrap().get("waypoint").is_none(), "absent, as in Istio's");
        for w in &c.workloads {
            let back = address_from_proto(&w.uid, workload_to_proto(w)).unwrap();
            assert_eq!(back, AddressResource::Workload(Box::new(w.clone())));
        }
        for s in &c.services {
            let back = address_from_proto(&s.key(), service_to_proto(s)).unwrap();
            assert_eq!(back, AddressResource::Service(Box::new(s.clone())));
        }
        for p in &c.policies {
            assert_eq!(&policy_from_proto(&p.key(), policy_to_proto(p)).unwrap(), p);
        }
    }

    /// What istiod leaves out is filled as Istio's ztunnel fills it, and shown in `/config_dump` in its shape.
    #[test]
    fn workloads_get_istios_defaults() {
        let w = wl::Workload { uid: "u".into(), name: "p".into(), namespace: "n".into(), ..Default::default() };
        let AddressResource::Workload(w) =
            address_from_proto("u", wl::Address { r#type: Some(wl::address::Type::Workload(w)) }).unwrap()
        else {
            panic!("a workload")
        };
        assert_eq!(w.cluster_id, DEFAULT_CLUSTER_ID);
        assert_eq!(w.workload_type, "deployment", "the enum's zero, in lower case");
        assert_eq!((w.capacity, w.network_mode), (1, NetworkMode::Standard));
        let v = serde_json::to_value(&w).unwrap();
        assert_eq!(v["clusterId"], "Kubernetes");
        assert_eq!(v["capacity"], 1);
        assert_eq!(v["networkMode"], "Standard");
        assert_eq!(v["workloadType"], "deployment");
        assert!(v.get("locality").is_none(), "no locality, none shown (as Istio's)");
        // The local file keeps what it says: no cluster there is no cluster (Istio's ztunnel does the same).
        let local: Workload = serde_json::from_value(serde_json::json!({"name": "p", "namespace": "n"})).unwrap();
        assert_eq!((local.cluster_id.as_str(), local.capacity), ("", 1));
    }

    #[test]
    fn bad_resources_name_the_field() {
        let w = |f: &dyn Fn(&mut wl::Workload)| {
            let mut w = wl::Workload { uid: "u".into(), namespace: "n".into(), ..Default::default() };
            f(&mut w);
            address_from_proto("u", wl::Address { r#type: Some(wl::address::Type::Workload(w)) })
        };
        assert!(w(&|_| ()).is_ok());
        let e = w(&|w| w.addresses = vec![vec![10, 0, 0]]).unwrap_err();
        assert_eq!(e.resource, "u");
        assert!(e.reason.contains("3 bytes"), "{e}");
        assert!(w(&|w| w.namespace.clear()).unwrap_err().reason.contains("namespace"));
        assert!(w(&|w| w.tunnel_protocol = 9).unwrap_err().reason.contains("tunnel protocol"));
        assert!(w(&|w| w.tunnel_protocol = 2).unwrap_err().reason.contains("LEGACY"));
        let big_port = wl::PortList { ports: vec![wl::Port { service_port: 70000, ..Default::default() }] };
        assert!(
            w(&|w| {
                w.services.insert("n/s".into(), big_port.clone());
            })
            .unwrap_err()
            .reason
            .contains("70000")
        );
        assert!(address_from_proto("x", wl::Address { r#type: None }).is_err());
        let gw = |d: Option<wl::gateway_address::Destination>, port: u32| wl::GatewayAddress {
            destination: d,
            hbone_mtls_port: port,
        };
        let host = |ns: &str, h: &str| {
            Some(wl::gateway_address::Destination::Hostname(wl::NamespacedHostname {
                namespace: ns.into(),
                hostname: h.into(),
            }))
        };
        assert!(w(&|w| w.waypoint = Some(gw(host("n", "wp"), 15008))).is_ok());
        assert!(w(&|w| w.waypoint = Some(gw(None, 15008))).unwrap_err().reason.contains("waypoint"));
        assert!(w(&|w| w.waypoint = Some(gw(host("", "wp"), 15008))).unwrap_err().reason.contains("namespace"));
        assert!(w(&|w| w.waypoint = Some(gw(host("n", "wp"), 70000))).unwrap_err().reason.contains("70000"));
        let short = Some(wl::gateway_address::Destination::Address(wl::NetworkAddress {
            address: vec![10, 0],
            ..Default::default()
        }));
        assert!(w(&|w| w.network_gateway = Some(gw(short.clone(), 15008))).unwrap_err().reason.contains("2 bytes"));

        let p = |f: &dyn Fn(&mut sec::Authorization)| {
            let mut a = sec::Authorization { name: "p".into(), namespace: "n".into(), ..Default::default() };
            f(&mut a);
            policy_from_proto("n/p", a)
        };
        assert!(p(&|_| ()).is_ok());
        assert!(p(&|a| a.action = 7).is_err());
        let bad_cidr = sec::Match {
            source_ips: vec![sec::Address { address: vec![10, 0, 0, 0], length: 33 }],
            ..Default::default()
        };
        let rule = |m: sec::Match| vec![sec::Rule { clauses: vec![sec::Clause { matches: vec![m] }] }];
        assert!(p(&|a| a.rules = rule(bad_cidr.clone())).is_err());
        let empty_match = sec::Match { principals: vec![sec::StringMatch { match_type: None }], ..Default::default() };
        assert!(p(&|a| a.rules = rule(empty_match.clone())).is_err());
    }
}
