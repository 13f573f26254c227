//! What ztunnel knows about the mesh: workloads, services and authorization policies, from istiod's delta xDS
//! ([`crate::xds`]) or, without a control plane, from the local file in Istio ztunnel's format, reloaded when it
//! changes. A file that does not parse or does not hold together, like a refused xDS push, leaves the last
//! good state in force; the error is logged and shown in `/config_dump`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::authz::{Policy, PolicyError, PolicySet};
use crate::identity::Identity;

/// How a workload accepts traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Protocol {
    /// Plain TCP: not in the mesh.
    #[default]
    TCP,
    /// HBONE on 15008.
    HBONE,
}

/// Health of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum HealthStatus {
    /// Serving.
    #[default]
    Healthy,
    /// Not serving.
    Unhealthy,
}

/// One workload (a pod), in the local file's camelCase form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Unique id (`<cluster>//Pod/<ns>/<name>`).
    #[serde(default)]
    pub uid: String,
    /// Pod name.
    #[serde(default)]
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    #[serde(default)]
    pub service_account: String,
    /// Trust domain, when not the mesh's.
    #[serde(default)]
    pub trust_domain: String,
    /// Addresses.
    #[serde(default)]
    pub workload_ips: Vec<IpAddr>,
    /// How it takes traffic.
    #[serde(default)]
    pub protocol: Protocol,
    /// Node it runs on.
    #[serde(default)]
    pub node: String,
    /// Network.
    #[serde(default)]
    pub network: String,
    /// Owner workload name (deployment).
    #[serde(default)]
    pub workload_name: String,
    /// `app` / canonical service name.
    #[serde(default)]
    pub canonical_name: String,
    /// Canonical revision.
    #[serde(default)]
    pub canonical_revision: String,
    /// Cluster.
    #[serde(default)]
    pub cluster_id: String,
    /// Health.
    #[serde(default)]
    pub status: HealthStatus,
    /// Services it backs: `"<ns>/<hostname>"` → service port → target port.
    #[serde(default, deserialize_with = "service_port_maps")]
    pub services: HashMap<String, HashMap<u16, u16>>,
    /// Keys (`<ns>/<name>`) of the WORKLOAD_SELECTOR policies that select it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorization_policies: Vec<String>,
    /// The waypoint that workload-addressed traffic to it must pass (istiod sets it for a waypoint of
    /// traffic type `workload` or `all`, attached to the pod or its namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
    /// The gateway that reaches it from another network (multi-network; Ambit does not cross networks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_gateway: Option<GatewayAddress>,
    /// Its pod's network: its own, or the node's (`HostNetwork`).
    #[serde(default)]
    pub network_mode: NetworkMode,
    /// What owns it (`deployment`, `cronjob`, `pod`, `job`), as istiod says.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workload_type: String,
    /// Where it runs (the node's topology labels).
    #[serde(default, skip_serializing_if = "Locality::is_empty")]
    pub locality: Locality,
    /// Its share of its services' load (1 unless istiod says otherwise).
    #[serde(default = "one")]
    pub capacity: u32,
}

fn one() -> u32 {
    1
}

/// Whether a pod has its own network namespace or the node's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum NetworkMode {
    /// Its own (every pod Ambit captures).
    #[default]
    Standard,
    /// The node's.
    HostNetwork,
}

/// Region, zone and subzone of a workload.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Locality {
    /// Region (`topology.kubernetes.io/region`).
    #[serde(default)]
    pub region: String,
    /// Zone (`topology.kubernetes.io/zone`).
    #[serde(default)]
    pub zone: String,
    /// Subzone.
    #[serde(default)]
    pub subzone: String,
}

impl Locality {
    /// Nothing known.
    pub fn is_empty(&self) -> bool {
        self.region.is_empty() && self.zone.is_empty() && self.subzone.is_empty()
    }
}

impl Workload {
    /// Its identity, in `default_td` unless it names its own trust domain.
    pub fn identity(&self, default_td: &str) -> Identity {
        let td = if self.trust_domain.is_empty() { default_td } else { &self.trust_domain };
        let sa = if self.service_account.is_empty() { "default" } else { &self.service_account };
        Identity::new(td, &self.namespace, sa)
    }

    /// The name Ambit's own metrics use for it: the owner workload, else the pod (Istio's labels use the
    /// fields as they are; see `metrics`).
    pub fn metrics_name(&self) -> &str {
        if self.workload_name.is_empty() { &self.name } else { &self.workload_name }
    }
}

/// The local file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalConfig {
    /// Workloads.
    #[serde(default)]
    pub workloads: Vec<Workload>,
    /// Services.
    #[serde(default)]
    pub services: Vec<Service>,
    /// Authorization policies.
    #[serde(default)]
    pub policies: Vec<Policy>,
}

/// Why a local configuration is refused (the previous one stays in force).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not YAML of the expected shape.
    #[error("{0}")]
    Syntax(#[from] serde_yaml_ng::Error),
    /// A workload without a namespace.
    #[error("workload {0:?} has no namespace")]
    NoNamespace(String),
    /// Two workloads with one address.
    #[error("address {ip} belongs to both {first:?} and {second:?}")]
    SharedAddress {
        /// The address.
        ip: IpAddr,
        /// One workload's UID.
        first: String,
        /// The other's.
        second: String,
    },
    /// A service without hostname or namespace.
    #[error("service {0:?} needs a hostname and a namespace")]
    IncompleteService(String),
    /// Two services with one VIP.
    #[error("VIP {vip} belongs to both {first} and {second}")]
    SharedVip {
        /// The VIP.
        vip: IpAddr,
        /// One service.
        first: String,
        /// The other.
        second: String,
    },
    /// A VIP that is a workload's address.
    #[error("VIP {vip} of {service} is also the address of workload {workload:?}")]
    VipIsWorkload {
        /// The VIP.
        vip: IpAddr,
        /// The service.
        service: String,
        /// The workload's UID.
        workload: String,
    },
    /// The policies do not hold together.
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// Why loading the local configuration file failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// It cannot be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// It is refused.
    #[error("{}: {source}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        source: ConfigError,
    },
}

impl LocalConfig {
    /// Parses and checks the file's text.
    pub fn parse(text: &str) -> Result<LocalConfig, ConfigError> {
        let c: LocalConfig = serde_yaml_ng::from_str(text)?;
        let mut seen = HashMap::new();
        for w in &c.workloads {
            if w.namespace.is_empty() {
                return Err(ConfigError::NoNamespace(w.name.clone()));
            }
            for ip in &w.workload_ips {
                if let Some(other) = seen.insert(*ip, w.uid.clone()) {
                    return Err(ConfigError::SharedAddress { ip: *ip, first: other, second: w.uid.clone() });
                }
            }
        }
        let mut vips = HashMap::new();
        for svc in &c.services {
            if svc.hostname.is_empty() || svc.namespace.is_empty() {
                return Err(ConfigError::IncompleteService(svc.name.clone()));
            }
            for v in &svc.vips {
                if let Some(other) = vips.insert(v.address, svc.key()) {
                    return Err(ConfigError::SharedVip { vip: v.address, first: other, second: svc.key() });
                }
                if let Some(w) = seen.get(&v.address) {
                    let (vip, service, workload) = (v.address, svc.key(), w.clone());
                    return Err(ConfigError::VipIsWorkload { vip, service, workload });
                }
            }
            if !svc.other.is_empty() {
                let fields: Vec<&str> = svc.other.keys().map(String::as_str).collect();
                warn!(service = %svc.key(), ?fields, "service fields Ambit does not act on are kept but ignored");
            }
        }
        PolicySet::new(c.policies.clone())?;
        Ok(c)
    }
}

/// `{port: port}`; YAML writes the keys as numbers, JSON (and YAML written from JSON) as strings.
fn port_map<'de, D: serde::Deserializer<'de>, M: FromIterator<(u16, u16)>>(d: D) -> Result<M, D::Error> {
    BTreeMap::<String, u16>::deserialize(d)?
        .into_iter()
        .map(|(k, v)| Ok((k.parse().map_err(|_| format!("{k:?} is not a port"))?, v)))
        .collect::<Result<M, String>>()
        .map_err(serde::de::Error::custom)
}

/// A workload's `services`: `{"<ns>/<hostname>": {port: port}}`.
fn service_port_maps<'de, D: serde::Deserializer<'de>>(d: D) -> Result<HashMap<String, HashMap<u16, u16>>, D::Error> {
    #[derive(Deserialize)]
    struct Ports(#[serde(deserialize_with = "port_map")] HashMap<u16, u16>);
    let m = HashMap::<String, Ports>::deserialize(d)?;
    Ok(m.into_iter().map(|(k, v)| (k, v.0)).collect())
}

/// An address on a network: `"<network>/<ip>"` in the file (the network may be empty: `"/10.96.0.1"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetworkAddress {
    /// Network name.
    pub network: String,
    /// Address.
    pub address: IpAddr,
}

impl fmt::Display for NetworkAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.address)
    }
}

impl std::str::FromStr for NetworkAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (network, ip) = s.split_once('/').unwrap_or(("", s));
        let address = ip.parse().map_err(|_| format!("{s:?} is not \"<network>/<ip>\""))?;
        Ok(NetworkAddress { network: network.to_string(), address })
    }
}

/// Serde as one string, through `Display` and `FromStr` (the file's `"<a>/<b>"` forms).
macro_rules! serde_as_string {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_as_string!(NetworkAddress);
serde_as_string!(NamespacedHostname);

/// A hostname in a namespace: `"<namespace>/<hostname>"` in the file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamespacedHostname {
    /// Namespace.
    pub namespace: String,
    /// Hostname.
    pub hostname: String,
}

impl fmt::Display for NamespacedHostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.hostname)
    }
}

impl std::str::FromStr for NamespacedHostname {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, host)) if !ns.is_empty() && !host.is_empty() => {
                Ok(NamespacedHostname { namespace: ns.to_string(), hostname: host.to_string() })
            }
            _ => Err(format!("{s:?} is not \"<namespace>/<hostname>\"")),
        }
    }
}

/// Where a gateway (a waypoint) is: an address (a workload's, or a service's VIP), or a service's hostname.
/// In the file, either is one string, as in Istio's: `"<network>/<ip>"` or `"<namespace>/<hostname>"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GatewayDestination {
    /// By address.
    Address(NetworkAddress),
    /// By hostname, resolved through the services ztunnel knows.
    Hostname(NamespacedHostname),
}

impl fmt::Display for GatewayDestination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GatewayDestination::Address(a) => a.fmt(f),
            GatewayDestination::Hostname(h) => h.fmt(f),
        }
    }
}

/// A gateway the traffic of a service or workload must pass: Istio's `GatewayAddress`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayAddress {
    /// Where it is.
    pub destination: GatewayDestination,
    /// The port it takes HBONE on (15008).
    pub hbone_mtls_port: u16,
}

impl fmt::Display for GatewayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.destination, self.hbone_mtls_port)
    }
}

/// One waypoint of a weighted set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedWaypoint {
    /// The waypoint.
    pub destination: GatewayAddress,
    /// Its share.
    pub weight: u32,
}

/// A service: virtual IPs and ports in front of the workloads whose `services` map names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Hostname (`<name>.<ns>.svc.cluster.local`); with the namespace, the key workloads use.
    pub hostname: String,
    /// Virtual IPs.
    #[serde(default)]
    pub vips: Vec<NetworkAddress>,
    /// Service port → target port (0: the same port, unless the endpoint maps it).
    #[serde(default, deserialize_with = "port_map")]
    pub ports: BTreeMap<u16, u16>,
    /// Identities its endpoints may present besides their own.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// The waypoint that service-addressed traffic to it must pass (istiod sets it for a waypoint of traffic
    /// type `service` or `all`, attached to the service or its namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
    /// A weighted set of waypoints (a canary between two): when it has a positive weight, each connection
    /// takes one of them in proportion to its weight, and `waypoint` (the primary) is not used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weighted_waypoints: Vec<WeightedWaypoint>,
    /// Fields of Istio's format Ambit does not act on (`loadBalancer`, `ipFamilies`, …): kept and shown.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl Service {
    /// `<namespace>/<hostname>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// One workload behind a service, with its port map for that service.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The workload.
    pub workload: Arc<Workload>,
    /// Service port → target port, as the workload gives it.
    pub ports: HashMap<u16, u16>,
}

/// Where a connection to a service goes.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The service.
    pub service: Arc<Service>,
    /// The chosen endpoint.
    pub workload: Arc<Workload>,
    /// Endpoint address and target port.
    pub addr: std::net::SocketAddr,
}

/// Why a service had no upstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoUpstream {
    /// The service does not have the port.
    #[error("service {service} has no port {port}")]
    UnknownPort {
        /// Service key.
        service: String,
        /// Port asked for.
        port: u16,
    },
    /// No healthy endpoint.
    #[error("service {0} has no healthy endpoint")]
    NoEndpoint(String),
    /// Healthy endpoints only on other networks: they would take a network gateway (unsupported).
    #[error(
        "service {0} has healthy endpoints only on other networks, reachable through a network gateway (unsupported)"
    )]
    OtherNetwork(String),
}

/// A waypoint resolved for one connection.
#[derive(Debug, Clone)]
pub struct ResolvedWaypoint {
    /// Its workload (the one this connection goes to).
    pub workload: Arc<Workload>,
    /// The waypoint's service, when it was named by one (its SANs are identities the waypoint may present).
    pub service: Option<Arc<Service>>,
    /// Where its HBONE is.
    pub addr: std::net::SocketAddr,
}

impl WaypointError {
    /// A short name for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            WaypointError::Unknown(_) => "unknown",
            WaypointError::NoEndpoint(..) => "no_endpoint",
            WaypointError::NoPort(..) => "no_port",
            WaypointError::OtherNetwork(_) => "other_network",
        }
    }
}

/// Why a waypoint could not be used: the connection is refused (never sent around it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaypointError {
    /// Neither a workload nor a service ztunnel knows.
    #[error("waypoint {0} is not a workload or service ztunnel knows")]
    Unknown(GatewayAddress),
    /// A service with no healthy endpoint.
    #[error("waypoint {0}: its service {1} has no healthy endpoint")]
    NoEndpoint(GatewayAddress, String),
    /// A service that does not declare the waypoint's HBONE port.
    #[error("waypoint {0}: its service {1} has no such port")]
    NoPort(GatewayAddress, String),
    /// On another network: it would take a network gateway, which Ambit does not support.
    #[error("waypoint {0} is on another network, reachable only through a network gateway (unsupported)")]
    OtherNetwork(GatewayAddress),
}

/// A consistent snapshot of what ztunnel knows.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Workloads, in file order.
    pub workloads: Vec<Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// Services, in file order.
    pub services: Vec<Arc<Service>>,
    by_vip: HashMap<IpAddr, Arc<Service>>,
    by_key: HashMap<String, Arc<Service>>,
    endpoints: HashMap<String, Vec<Endpoint>>,
    next: AtomicUsize,
    /// Authorization policies.
    pub policies: PolicySet,
}

impl Snapshot {
    /// Builds the indexes.
    pub fn new(c: LocalConfig) -> Snapshot {
        Snapshot::from_parts(
            c.workloads.into_iter().map(Arc::new).collect(),
            c.services.into_iter().map(Arc::new).collect(),
            c.policies,
        )
    }

    /// Builds the indexes over shared resources (xDS: unchanged resources are not copied).
    pub fn from_parts(workloads: Vec<Arc<Workload>>, services: Vec<Arc<Service>>, policies: Vec<Policy>) -> Snapshot {
        let mut by_ip = HashMap::new();
        let mut endpoints: HashMap<String, Vec<Endpoint>> = HashMap::new();
        for w in &workloads {
            for ip in &w.workload_ips {
                by_ip.insert(*ip, w.clone());
            }
            for (svc, ports) in &w.services {
                endpoints.entry(svc.clone()).or_default().push(Endpoint { workload: w.clone(), ports: ports.clone() });
            }
        }
        let by_vip = services.iter().flat_map(|s| s.vips.iter().map(move |v| (v.address, s.clone()))).collect();
        let by_key = services.iter().map(|s| (s.key(), s.clone())).collect();
        // Checked by `LocalConfig::parse`; a set that fails here came from a test's `State::set`.
        let policies = PolicySet::new(policies).unwrap_or_else(|e| {
            warn!(error = %e, "ignoring invalid policies");
            PolicySet::default()
        });
        Snapshot { workloads, by_ip, services, by_vip, by_key, endpoints, next: AtomicUsize::new(0), policies }
    }

    /// The service with a VIP.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<Arc<Service>> {
        self.by_vip.get(&ip).cloned()
    }

    /// The workloads behind a service.
    pub fn endpoints(&self, svc: &Service) -> &[Endpoint] {
        self.endpoints.get(&svc.key()).map(Vec::as_slice).unwrap_or_default()
    }

    /// Picks an endpoint on `network` for a connection to `svc` on `port` (round robin over the healthy
    /// endpoints that have an address of the VIP's family, else of any family) and maps the port.
    pub fn pick_upstream(
        &self,
        svc: &Arc<Service>,
        vip: IpAddr,
        port: u16,
        network: &str,
    ) -> Result<Upstream, NoUpstream> {
        let Some(&svc_target) = svc.ports.get(&port) else {
            return Err(NoUpstream::UnknownPort { service: svc.key(), port });
        };
        let addr_of = |w: &Workload| {
            w.workload_ips.iter().find(|ip| ip.is_ipv4() == vip.is_ipv4()).or(w.workload_ips.first()).copied()
        };
        let healthy: Vec<(&Endpoint, IpAddr)> = self
            .endpoints(svc)
            .iter()
            .filter(|e| e.workload.status == HealthStatus::Healthy)
            .filter_map(|e| Some((e, addr_of(&e.workload)?)))
            .collect();
        if healthy.is_empty() {
            return Err(NoUpstream::NoEndpoint(svc.key()));
        }
        // One on another network would take a network gateway (multi-network), which Ambit does not support.
        let healthy: Vec<(&Endpoint, IpAddr)> =
            healthy.into_iter().filter(|(e, _)| e.workload.network == network).collect();
        if healthy.is_empty() {
            return Err(NoUpstream::OtherNetwork(svc.key()));
        }
        let (ep, ip) = healthy[self.next.fetch_add(1, Ordering::Relaxed) % healthy.len()];
        let target = match ep.ports.get(&port).copied().filter(|p| *p != 0) {
            Some(p) => p,
            None if svc_target != 0 => svc_target,
            None => port,
        };
        Ok(Upstream {
            service: svc.clone(),
            workload: ep.workload.clone(),
            addr: std::net::SocketAddr::new(ip, target),
        })
    }

    /// The service with hostname `hostname` in `namespace`.
    pub fn service_by_hostname(&self, namespace: &str, hostname: &str) -> Option<Arc<Service>> {
        self.by_key.get(&format!("{namespace}/{hostname}")).cloned()
    }

    /// The waypoint a connection to `svc` must pass, if it has one: one of its weighted set in proportion
    /// to the weights, else its `waypoint`.
    pub fn service_waypoint<'a>(&self, svc: &'a Service) -> Option<&'a GatewayAddress> {
        let total: u64 = svc.weighted_waypoints.iter().map(|w| u64::from(w.weight)).sum();
        if total == 0 {
            return svc.waypoint.as_ref();
        }
        // Spread by the snapshot's connection counter: deterministic, and as even as the weights over any
        // run of `total` connections.
        let mut pick = self.next.fetch_add(1, Ordering::Relaxed) as u64 % total;
        for w in &svc.weighted_waypoints {
            if pick < u64::from(w.weight) {
                return Some(&w.destination);
            }
            pick -= u64::from(w.weight);
        }
        svc.waypoint.as_ref()
    }

    /// Resolves a waypoint for a connection from a workload on `network` to `orig` (the destination the app
    /// asked for): its workload, and the address to reach it over HBONE. Istio's rules: an address names
    /// a workload (that address is used) or a service; a hostname names a service. A service's waypoint is one
    /// of its endpoints, picked as any service's are ([`Snapshot::pick_upstream`]) on the port the service maps
    /// the HBONE port to (a waypoint's service declares it, as istiod publishes it), in the family of the
    /// address that named it or, for a hostname, of `orig`.
    pub fn waypoint(
        &self,
        gw: &GatewayAddress,
        network: &str,
        orig: std::net::SocketAddr,
    ) -> Result<ResolvedWaypoint, WaypointError> {
        let (service, family_of) = match &gw.destination {
            GatewayDestination::Address(a) => {
                if let Some(w) = self.by_ip.get(&a.address) {
                    if w.network != network {
                        return Err(WaypointError::OtherNetwork(gw.clone()));
                    }
                    let addr = std::net::SocketAddr::new(a.address, gw.hbone_mtls_port);
                    return Ok(ResolvedWaypoint { workload: w.clone(), service: None, addr });
                }
                // An address ztunnel knows nothing of is refused, not dialed: whatever answers there has
                // not been vouched for by the control plane.
                let svc = self.by_vip.get(&a.address).ok_or_else(|| WaypointError::Unknown(gw.clone()))?;
                (svc.clone(), a.address)
            }
            GatewayDestination::Hostname(h) => {
                let svc = self
                    .service_by_hostname(&h.namespace, &h.hostname)
                    .ok_or_else(|| WaypointError::Unknown(gw.clone()))?;
                (svc, orig.ip())
            }
        };
        let up = self.pick_upstream(&service, family_of, gw.hbone_mtls_port, network).map_err(|e| match e {
            NoUpstream::UnknownPort { .. } => WaypointError::NoPort(gw.clone(), service.key()),
            NoUpstream::NoEndpoint(_) => WaypointError::NoEndpoint(gw.clone(), service.key()),
            NoUpstream::OtherNetwork(_) => WaypointError::OtherNetwork(gw.clone()),
        })?;
        Ok(ResolvedWaypoint { workload: up.workload, service: Some(service), addr: up.addr })
    }

    /// Whether a connection from `identity` at `ip` comes from the waypoint `gw` itself (one of its workloads:
    /// the identity and the address must both be the waypoint's), so that it is not sent back to it.
    pub fn is_from_waypoint(
        &self,
        gw: &GatewayAddress,
        identity: &crate::identity::Identity,
        ip: IpAddr,
        td: &str,
    ) -> bool {
        let is = |w: &Workload| w.workload_ips.contains(&ip) && w.identity(td) == *identity;
        match &gw.destination {
            GatewayDestination::Address(a) => match self.by_ip.get(&a.address) {
                Some(w) => is(w),
                None => self.by_vip.get(&a.address).is_some_and(|s| self.endpoints(s).iter().any(|e| is(&e.workload))),
            },
            GatewayDestination::Hostname(h) => self
                .service_by_hostname(&h.namespace, &h.hostname)
                .is_some_and(|s| self.endpoints(&s).iter().any(|e| is(&e.workload))),
        }
    }

    /// The service an inbound connection to `w` on `port` most likely came through: one `w` backs whose
    /// ports lead to `port` (Istio ztunnel reports the same guess).
    pub fn inbound_service(&self, w: &Workload, port: u16) -> Option<Arc<Service>> {
        let mut keys: Vec<&String> = w.services.keys().collect();
        keys.sort();
        keys.into_iter().find_map(|k| {
            let svc = self.services.iter().find(|s| s.key() == *k)?;
            let ports = &w.services[k];
            let leads = svc.ports.iter().any(|(sp, tp)| {
                let t = ports.get(sp).copied().filter(|p| *p != 0).unwrap_or(if *tp != 0 { *tp } else { *sp });
                t == port
            });
            leads.then(|| svc.clone())
        })
    }

    /// The workload at an address.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.by_ip.get(&ip).cloned()
    }

    /// The workload of a local pod, as ZDS names it.
    pub fn local_workload(&self, node: &str, namespace: &str, name: &str) -> Option<Arc<Workload>> {
        self.workloads
            .iter()
            .find(|w| {
                w.namespace == namespace && w.name == name && (w.node.is_empty() || node.is_empty() || w.node == node)
            })
            .cloned()
    }
}

/// Where the state came from and how the last load went.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadStatus {
    /// Where it comes from: `file <path>` or `xds <address>`.
    pub source: Option<String>,
    /// Number of successful loads.
    pub generation: u64,
    /// When the last good load happened (Unix seconds).
    pub loaded_at: u64,
    /// The last error, if the newest version of the file was refused.
    pub last_error: Option<String>,
}

/// The shared, swappable state.
#[derive(Debug, Default)]
pub struct State {
    current: RwLock<Arc<Snapshot>>,
    status: RwLock<LoadStatus>,
}

impl State {
    /// Empty state.
    pub fn new() -> Arc<State> {
        Arc::new(State::default())
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().unwrap().clone()
    }

    /// How loading went.
    pub fn status(&self) -> LoadStatus {
        self.status.read().unwrap().clone()
    }

    /// Loads `path`; on error the previous snapshot stays.
    pub fn load_file(&self, path: &Path) -> Result<(), LoadError> {
        let result = std::fs::read_to_string(path)
            .map_err(|source| LoadError::Read { path: path.to_path_buf(), source })
            .and_then(|t| {
                LocalConfig::parse(&t).map_err(|source| LoadError::Invalid { path: path.to_path_buf(), source })
            });
        let mut status = self.status.write().unwrap();
        status.source = Some(format!("file {}", path.display()));
        match result {
            Ok(c) => {
                let (workloads, services, policies) = (c.workloads.len(), c.services.len(), c.policies.len());
                *self.current.write().unwrap() = Arc::new(Snapshot::new(c));
                status.generation += 1;
                status.loaded_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                status.last_error = None;
                info!(
                    file = %path.display(), workloads, services, policies, generation = status.generation,
                    "loaded the local configuration"
                );
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, "keeping the last good configuration");
                status.last_error = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Puts resources from the control plane in force.
    pub fn apply(
        &self,
        source: &str,
        workloads: Vec<Arc<Workload>>,
        services: Vec<Arc<Service>>,
        policies: Vec<Policy>,
    ) {
        *self.current.write().unwrap() = Arc::new(Snapshot::from_parts(workloads, services, policies));
        let mut status = self.status.write().unwrap();
        status.source = Some(source.to_string());
        status.generation += 1;
        status.loaded_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        status.last_error = None;
    }

    /// Records a refused update; the state in force stays.
    pub fn refuse(&self, error: String) {
        self.status.write().unwrap().last_error = Some(error);
    }

    /// Clears the last error (an update was accepted with nothing to change).
    pub fn clear_error(&self) {
        self.status.write().unwrap().last_error = None;
    }

    /// Replaces the state directly (tests).
    pub fn set(&self, c: LocalConfig) {
        *self.current.write().unwrap() = Arc::new(Snapshot::new(c));
        self.status.write().unwrap().generation += 1;
    }
}

/// Reloads `path` into `state` whenever it changes: inotify on its directory (editors and config writers
/// replace files by rename), with a slow poll as a safety net.
pub fn watch(state: Arc<State>, path: PathBuf) {
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
            let name = path.file_name().map(|n| n.to_os_string());
            let mut watch = ambit_proto::host::DirWatch::new(&[&dir]);
            if !watch.watching() {
                warn!(dir = %dir.display(), "cannot watch the config directory; polling instead");
            }
            let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let mut last = mtime(&path);
            loop {
                std::thread::sleep(Duration::from_millis(50));
                let mut changed = watch.changed(|n| n == name.as_deref());
                let now = mtime(&path);
                if now != last {
                    changed = true;
                    last = now;
                }
                if changed {
                    let _ = state.load_file(&path);
                }
            }
        })
        .expect("spawning the config watcher");
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISTIO_EXAMPLE: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/local
  name: local
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  node: local
  network: ""
  services:
    "default/example.com":
      80: 8080
- uid: cluster1//v1/Pod/default/local-tcp
  name: local-tcp
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.2"]
  protocol: TCP
  node: local
  services: {}
policies:
  - action: Allow
    rules:
    - - - notDestinationPorts:
          - 9999
    name: deny-9999
    namespace: default
    scope: Namespace
    dryRun: false
services:
- name: local
  namespace: default
  hostname: example.com
  vips:
    - /127.10.0.1
  ports:
    80: 8080
"#;

    #[test]
    fn reads_istio_format() {
        let c = LocalConfig::parse(ISTIO_EXAMPLE).unwrap();
        let s = Snapshot::new(c);
        let w = s.workload_by_ip("127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(w.protocol, Protocol::HBONE);
        assert_eq!(w.identity("cluster.local").to_string(), "spiffe://cluster.local/ns/default/sa/default");
        assert_eq!(w.services["default/example.com"][&80], 8080);
        assert_eq!(s.workload_by_ip("127.0.0.2".parse().unwrap()).unwrap().protocol, Protocol::TCP);
        assert!(s.local_workload("local", "default", "local").is_some());
        assert!(s.local_workload("elsewhere", "default", "local").is_none());
        assert_eq!(s.policies.all().len(), 1);
        let svc = s.service_by_vip("127.10.0.1".parse().unwrap()).unwrap();
        assert_eq!(svc.key(), "default/example.com");
        let up = s.pick_upstream(&svc, "127.10.0.1".parse().unwrap(), 80, "").unwrap();
        assert_eq!(up.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            s.pick_upstream(&svc, "127.10.0.1".parse().unwrap(), 81, "").unwrap_err(),
            NoUpstream::UnknownPort { service: svc.key(), port: 81 }
        );
        assert_eq!(s.inbound_service(&w, 8080).unwrap().key(), svc.key());
        assert!(s.inbound_service(&w, 9090).is_none());
    }

    #[test]
    fn load_balancing_spreads_over_healthy_endpoints_and_maps_ports() {
        let c = LocalConfig::parse(
            r#"
workloads:
- {name: a, namespace: n, workloadIps: [10.0.0.1, "fd00::1"], protocol: HBONE, services: {"n/s.n.svc": {80: 8081}}}
- {name: b, namespace: n, workloadIps: [10.0.0.2], protocol: HBONE, services: {"n/s.n.svc": {}}}
- {name: c, namespace: n, workloadIps: [10.0.0.3], status: Unhealthy, services: {"n/s.n.svc": {}}}
services:
- {name: s, namespace: n, hostname: s.n.svc, vips: ["/10.96.0.1", "net1/fd00:96::1"], ports: {80: 8080, 90: 0},
   loadBalancer: {mode: Failover}}
"#,
        )
        .unwrap();
        let s = Snapshot::new(c);
        let svc = s.service_by_vip("10.96.0.1".parse().unwrap()).unwrap();
        assert_eq!(svc.other.keys().collect::<Vec<_>>(), ["loadBalancer"]);
        let mut seen: Vec<String> = (0..4)
            .map(|_| s.pick_upstream(&svc, "10.96.0.1".parse().unwrap(), 80, "").unwrap().addr.to_string())
            .collect();
        seen.sort();
        assert_eq!(seen, ["10.0.0.1:8081", "10.0.0.1:8081", "10.0.0.2:8080", "10.0.0.2:8080"]);
        assert_eq!(s.pick_upstream(&svc, "10.96.0.1".parse().unwrap(), 90, "").unwrap().addr.port(), 90);
        let v6 = s.service_by_vip("fd00:96::1".parse().unwrap()).unwrap();
        let ups: Vec<String> = (0..2)
            .map(|_| s.pick_upstream(&v6, "fd00:96::1".parse().unwrap(), 80, "").unwrap().addr.to_string())
            .collect();
        assert!(ups.contains(&"[fd00::1]:8081".to_string()), "{ups:?}");
    }

    #[test]
    fn inconsistent_services_and_policies_are_refused() {
        let dup = "services:\n- {namespace: n, hostname: a, vips: [/10.96.0.1]}\n- {namespace: n, hostname: b, vips: [/10.96.0.1]}\n";
        assert!(LocalConfig::parse(dup).unwrap_err().to_string().contains("belongs to both"));
        assert!(LocalConfig::parse("services:\n- {namespace: n, hostname: a, vips: [10.96.0.300]}\n").is_err());
        let pol = "policies:\n- {name: p, namespace: n, scope: Namespace, action: Allow, rules: [[[{bogus: 1}]]]}\n";
        assert!(LocalConfig::parse(pol).is_err());
        let twice = "policies:\n- {name: p, namespace: n, scope: Namespace, action: Allow}\n- {name: p, namespace: n, scope: Namespace, action: Deny}\n";
        assert!(LocalConfig::parse(twice).unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn broken_file_keeps_the_last_good_state() {
        let dir = std::env::temp_dir().join(format!("ztunnel-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("w.yaml");
        std::fs::write(&f, ISTIO_EXAMPLE).unwrap();
        let st = State::new();
        st.load_file(&f).unwrap();
        std::fs::write(&f, "workloads: [{name: x}]").unwrap();
        assert!(st.load_file(&f).is_err());
        assert_eq!(st.snapshot().workloads.len(), 2);
        assert!(st.status().last_error.is_some());
        std::fs::write(&f, "workloads:\n- {name: a, namespace: n, workloadIps: [10.0.0.1]}\n- {name: b, namespace: n, workloadIps: [10.0.0.1]}\n").unwrap();
        assert!(st.load_file(&f).unwrap_err().to_string().contains("belongs to both"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Property test: any text as the local file is loaded or refused with a reason, never a panic.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::testing::proptest_cases()))]

        #[test]
        fn any_text_is_loaded_or_refused(text in prop_oneof![
            ".{0,200}",
            "(workloads|services|policies|namespace|workloadIps|vips|ports|rules|[-:{}\\[\\], \n]|10\\.0\\.0\\.1|fd00::1|80|HBONE){0,60}",
        ]) {
            if let Ok(c) = LocalConfig::parse(&text) {
                let _ = Snapshot::new(c);
            }
        }
    }
}
