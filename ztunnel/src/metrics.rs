//! Prometheus metrics (Istio's `istio_tcp_*` with Istio's labels, and ztunnel's own) and the per-connection
//! record that feeds them and the access log.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::identity::Identity;
use crate::state::{Service, Workload};

/// Istio's standard labels of TCP metrics.
#[derive(Debug, Clone, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` (the client's ztunnel) or `destination` (the server's).
    pub reporter: String,
    /// Client workload.
    pub source_workload: String,
    /// Client canonical service.
    pub source_canonical_service: String,
    /// Client canonical revision.
    pub source_canonical_revision: String,
    /// Client namespace.
    pub source_workload_namespace: String,
    /// Client SPIFFE ID.
    pub source_principal: String,
    /// Client `app`.
    pub source_app: String,
    /// Client version.
    pub source_version: String,
    /// Client cluster.
    pub source_cluster: String,
    /// Destination service host.
    pub destination_service: String,
    /// Destination service namespace.
    pub destination_service_namespace: String,
    /// Destination service name.
    pub destination_service_name: String,
    /// Server workload.
    pub destination_workload: String,
    /// Server canonical service.
    pub destination_canonical_service: String,
    /// Server canonical revision.
    pub destination_canonical_revision: String,
    /// Server namespace.
    pub destination_workload_namespace: String,
    /// Server SPIFFE ID.
    pub destination_principal: String,
    /// Server `app`.
    pub destination_app: String,
    /// Server version.
    pub destination_version: String,
    /// Server cluster.
    pub destination_cluster: String,
    /// Always `tcp`.
    pub request_protocol: String,
    /// Envoy-style flags (`-`, `DENY`, `CONNECT`, …).
    pub response_flags: String,
    /// `mutual_tls` or `unknown` (plaintext).
    pub connection_security_policy: String,
    /// Client region (Istio's locality labels come last).
    pub source_region: String,
    /// Client zone.
    pub source_zone: String,
    /// Server region.
    pub destination_region: String,
    /// Server zone.
    pub destination_zone: String,
}

/// A label set of one string.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `inbound` or `outbound`.
    pub direction: String,
    /// Why.
    pub reason: String,
}

/// A label set naming an identity.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    /// The SPIFFE ID.
    pub identity: String,
}

/// A label set for ZDS messages.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ZdsLabels {
    /// Request kind.
    pub kind: String,
    /// `ack` or `nack`.
    pub outcome: String,
}

/// A label set with a direction.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `inbound` or `outbound`.
    pub direction: String,
}

/// A label set for policy denials.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    /// `hbone` or `plaintext`.
    pub transport: String,
    /// `<namespace>/<name>` of the deciding DENY policy; `-` when ALLOW policies apply and none matched.
    pub policy: String,
}

/// A label set naming a source workload.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// Its namespace.
    pub source_workload_namespace: String,
    /// Its workload name.
    pub source_workload: String,
}

/// A label set with an outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok`, or what went wrong.
    pub outcome: String,
}

/// A label set with a reason.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonOnlyLabels {
    /// Why.
    pub reason: String,
}

/// A label set naming who reports (`source`: the client's side, `destination`: the server's).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReporterLabels {
    /// `source` or `destination`.
    pub reporter: String,
}

/// `istio_build`'s labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// Always `ztunnel`.
    pub component: String,
    /// The version.
    pub tag: String,
}

/// A label set naming an xDS type URL.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// The type URL.
    pub url: String,
}

/// All of ztunnel's metrics.
pub struct Metrics {
    registry: Registry,
    /// `istio_tcp_connections_opened_total`.
    pub tcp_opened: Family<TcpLabels, Counter>,
    /// `istio_tcp_connections_closed_total`.
    pub tcp_closed: Family<TcpLabels, Counter>,
    /// `istio_tcp_connections_failed_total`: the closed ones that failed (every response flag but `-`).
    pub tcp_failed: Family<TcpLabels, Counter>,
    /// `istio_tcp_sent_bytes_total` (server → client).
    pub tcp_sent: Family<TcpLabels, Counter>,
    /// `istio_tcp_received_bytes_total` (client → server).
    pub tcp_received: Family<TcpLabels, Counter>,
    /// `workload_manager_active_proxy_count`.
    pub active_proxies: Gauge,
    /// `workload_manager_proxies_started_total`.
    pub proxies_started: Counter,
    /// `workload_manager_pending_proxy_count`: pods handed over whose proxy has not started (always 0: a pod's
    /// proxy starts before its ZDS add is acknowledged, or the add fails).
    pub pending_proxies: Gauge,
    /// `process_open_fds`: ztunnel's open file descriptors (read at each scrape).
    pub open_fds: Gauge,
    /// `process_max_fds`: its limit.
    pub max_fds: Gauge,
    /// `workload_manager_proxies_stopped_total`.
    pub proxies_stopped: Counter,
    /// `ztunnel_tls_handshake_failures_total{direction,reason}`.
    pub tls_failures: Family<ReasonLabels, Counter>,
    /// `ztunnel_hbone_rejected_total{direction,reason}`: HBONE requests answered with an error status.
    pub hbone_rejected: Family<ReasonLabels, Counter>,
    /// `ztunnel_zds_messages_total{kind,outcome}`.
    pub zds_messages: Family<ZdsLabels, Counter>,
    /// `ztunnel_zds_connected`: 1 while connected to the node agent.
    pub zds_connected: Gauge,
    /// `ztunnel_active_connections{direction}`.
    pub active_connections: Family<DirectionLabels, Gauge>,
    /// `ztunnel_pool_connections`: open pooled HBONE connections.
    pub pool_connections: Gauge,
    /// `ztunnel_certificate_expiry_seconds{identity}`: seconds until each workload certificate expires.
    pub cert_expiry: Family<IdentityLabels, Gauge>,
    /// `ztunnel_policy_denials_total{transport,policy}`: inbound connections refused by authorization policy.
    pub policy_denials: Family<DenialLabels, Counter>,
    /// `ztunnel_inbound_plaintext_from_mesh_total{source_workload_namespace,source_workload}`: plaintext
    /// connections from workloads that speak HBONE (they could, and should, have used it).
    pub plaintext_from_mesh: Family<SourceLabels, Counter>,
    /// `ztunnel_certificate_requests_total{outcome}`: certificate requests to the CA (`ok`, `unavailable`,
    /// `rejected`: the answer failed ztunnel's checks, `error`).
    pub cert_requests: Family<OutcomeLabels, Counter>,
    /// `ztunnel_trust_root_reloads_total{outcome}`: reloads of the root file after it changed.
    pub trust_root_reloads: Family<OutcomeLabels, Counter>,
    /// `ztunnel_xds_connected`: whether the xDS stream is up.
    pub xds_connected: Gauge,
    /// `istio_xds_connection_terminations_total{reason}`: xDS streams that ended.
    pub xds_terminations: Family<ReasonOnlyLabels, Counter>,
    /// `istio_xds_message_total{url}`: xDS responses received, by type.
    pub xds_messages: Family<TypeLabels, Counter>,
    /// `istio_xds_message_bytes_total{url}`: the resources' bytes in those responses, by type.
    pub xds_message_bytes: Family<TypeLabels, Counter>,
    /// `istio_tcp_sockets_open{reporter}`: sockets accepted from pods (captured or HBONE) open now.
    pub tcp_sockets_open: Family<ReporterLabels, Gauge>,
    /// Its two series, each made at its first socket (as Istio's) and then at hand without a lookup: every
    /// accepted connection counts in one.
    sockets_open: [std::sync::OnceLock<Gauge>; 2],
    /// `ztunnel_xds_nacks_total{url}`: xDS responses refused, by type.
    pub xds_nacks: Family<TypeLabels, Counter>,
    /// `ztunnel_xds_resources{url}`: resources in force, by type.
    pub xds_resources: Family<TypeLabels, Gauge>,
    /// `ztunnel_connections_shed_total{port}`: connections accepted only to be reset at once because ztunnel
    /// had no file descriptor left for them (see `socket::shed_one`).
    pub connections_shed: Family<PortLabels, Counter>,
    /// `ztunnel_waypoint_refused_total{reason}`: outbound connections refused because the waypoint they must
    /// pass could not be used (`unknown`, `no_endpoint`, `no_port`, `other_network`: not resolved;
    /// `unreachable`: it did not connect, prove its identity or answer the CONNECT).
    pub waypoint_refused: Family<ReasonOnlyLabels, Counter>,
    /// The TCP counters of each peer pair seen lately, by [`PairKey::hash_of`] (see [`Metrics::pair`]).
    pairs: Mutex<HashMap<u64, (PairKey, Arc<PairCounters>)>>,
}

/// At most this many peer pairs keep their counters at hand; past it the cache starts again empty. Each
/// entry holds its two workloads, so this also bounds the replaced workloads it keeps alive.
const MAX_PAIRS: usize = 1024;

/// The `istio_tcp_*` counters of one peer pair (direction, security, both ends) for connections that close
/// without a response flag, and the active-connection gauge of its direction: Istio's two dozen labels are
/// built and hashed once per pair rather than twice per connection.
#[derive(Debug)]
struct PairCounters {
    opened: Counter,
    /// Made at the pair's first clean close: as in Istio's ztunnel, a pair whose connections all failed has
    /// no `-` series of `istio_tcp_connections_closed`.
    closed: std::sync::OnceLock<Counter>,
    labels: TcpLabels,
    received: Counter,
    sent: Counter,
    active: Gauge,
}

/// What a pair's labels are made of. Workloads and services are compared by address: the key holds them, so
/// an address cannot be reused while the key lives, and a workload that xDS replaced is a new pair.
#[derive(Debug)]
struct PairKey {
    direction: Direction,
    mtls: bool,
    src: PeerKey,
    dst: PeerKey,
}

#[derive(Debug)]
struct PeerKey {
    workload: Option<Arc<Workload>>,
    identity: Option<Identity>,
    service: Option<Arc<Service>>,
}

impl PeerKey {
    fn of(p: &Peer) -> PeerKey {
        PeerKey { workload: p.workload.clone(), identity: p.identity.clone(), service: p.service.clone() }
    }

    fn is(&self, p: &Peer) -> bool {
        fn same<T>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
        }
        same(&self.workload, &p.workload) && self.identity == p.identity && same(&self.service, &p.service)
    }

    fn hash(p: &Peer, h: &mut impl Hasher) {
        p.workload.as_ref().map(Arc::as_ptr).hash(h);
        p.identity.hash(h);
        p.service.as_ref().map(Arc::as_ptr).hash(h);
    }
}

impl PairKey {
    /// The hash of the pair `(src, dst)` would have as a key, computed from borrowed parts: a lookup that
    /// hits allocates nothing.
    fn hash_of(direction: Direction, mtls: bool, src: &Peer, dst: &Peer) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (direction, mtls).hash(&mut h);
        PeerKey::hash(src, &mut h);
        PeerKey::hash(dst, &mut h);
        h.finish()
    }

    fn is(&self, direction: Direction, mtls: bool, src: &Peer, dst: &Peer) -> bool {
        self.direction == direction && self.mtls == mtls && self.src.is(src) && self.dst.is(dst)
    }
}

/// A listener's port.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabels {
    /// 15001, 15006 or 15008.
    pub port: u16,
}

impl Metrics {
    /// Creates and registers everything.
    pub fn new() -> Arc<Metrics> {
        let mut r = Registry::default();
        // Registers a metric (the registry keeps a handle to the same counters) and returns it.
        fn reg<M: prometheus_client::registry::Metric + Clone>(r: &mut Registry, name: &str, help: &str, m: M) -> M {
            r.register(name, help, m.clone());
            m
        }
        // As Istio's ztunnel: its build, as a gauge of 1 (the tag is Ambit's version).
        let build: Family<BuildLabels, Gauge> =
            reg(&mut r, "istio_build", "Istio component build info", Family::default());
        build.get_or_create(&BuildLabels { component: "ztunnel".into(), tag: env!("CARGO_PKG_VERSION").into() }).set(1);
        Arc::new(Metrics {
            tcp_opened: reg(
                &mut r,
                "istio_tcp_connections_opened",
                "The total number of TCP connections opened",
                Family::default(),
            ),
            tcp_closed: reg(
                &mut r,
                "istio_tcp_connections_closed",
                "The total number of TCP connections closed",
                Family::default(),
            ),
            tcp_failed: reg(
                &mut r,
                "istio_tcp_connections_failed",
                "The total number of TCP connections that failed to establish",
                Family::default(),
            ),
            tcp_sent: reg(
                &mut r,
                "istio_tcp_sent_bytes",
                "The size of total bytes sent during response in case of a TCP connection",
                Family::default(),
            ),
            tcp_received: reg(
                &mut r,
                "istio_tcp_received_bytes",
                "The size of total bytes received during request in case of a TCP connection",
                Family::default(),
            ),
            active_proxies: reg(
                &mut r,
                "workload_manager_active_proxy_count",
                "The count of pods ztunnel currently serves",
                Gauge::default(),
            ),
            proxies_started: reg(&mut r, "workload_manager_proxies_started", "Pod proxies started", Counter::default()),
            pending_proxies: reg(
                &mut r,
                "workload_manager_pending_proxy_count",
                "The count of pods handed over whose proxy has not started",
                Gauge::default(),
            ),
            open_fds: reg(&mut r, "process_open_fds", "Number of open file descriptors", Gauge::default()),
            max_fds: reg(&mut r, "process_max_fds", "Maximum number of open file descriptors", Gauge::default()),
            proxies_stopped: reg(&mut r, "workload_manager_proxies_stopped", "Pod proxies stopped", Counter::default()),
            tls_failures: reg(
                &mut r,
                "ztunnel_tls_handshake_failures",
                "TLS handshakes that failed, by reason",
                Family::default(),
            ),
            hbone_rejected: reg(
                &mut r,
                "ztunnel_hbone_rejected",
                "HBONE requests refused, by reason",
                Family::default(),
            ),
            zds_messages: reg(
                &mut r,
                "ztunnel_zds_messages",
                "ZDS requests handled, by kind and outcome",
                Family::default(),
            ),
            zds_connected: reg(
                &mut r,
                "ztunnel_zds_connected",
                "Whether ztunnel is connected to the node agent",
                Gauge::default(),
            ),
            active_connections: reg(
                &mut r,
                "ztunnel_active_connections",
                "Proxied connections open now",
                Family::default(),
            ),
            pool_connections: reg(
                &mut r,
                "ztunnel_pool_connections",
                "Pooled HBONE connections open now",
                Gauge::default(),
            ),
            cert_expiry: reg(
                &mut r,
                "ztunnel_certificate_expiry_seconds",
                "Seconds until each workload certificate expires",
                Family::default(),
            ),
            policy_denials: reg(
                &mut r,
                "ztunnel_policy_denials",
                "Inbound connections refused by authorization policy, by policy",
                Family::default(),
            ),
            plaintext_from_mesh: reg(
                &mut r,
                "ztunnel_inbound_plaintext_from_mesh",
                "Plaintext inbound connections from workloads that speak HBONE",
                Family::default(),
            ),
            cert_requests: reg(
                &mut r,
                "ztunnel_certificate_requests",
                "Certificate requests to the CA, by outcome",
                Family::default(),
            ),
            trust_root_reloads: reg(
                &mut r,
                "ztunnel_trust_root_reloads",
                "Reloads of the trust root file after it changed, by outcome",
                Family::default(),
            ),
            xds_connected: reg(&mut r, "ztunnel_xds_connected", "Whether the xDS stream is up", Gauge::default()),
            xds_terminations: reg(
                &mut r,
                "istio_xds_connection_terminations",
                "xDS streams that ended, by reason",
                Family::default(),
            ),
            xds_messages: reg(&mut r, "istio_xds_message", "xDS responses received, by type", Family::default()),
            xds_message_bytes: {
                let f = Family::default();
                let help = "Resource bytes in the xDS responses received, by type";
                r.register_with_unit("istio_xds_message", help, prometheus_client::registry::Unit::Bytes, f.clone());
                f
            },
            sockets_open: Default::default(),
            tcp_sockets_open: reg(
                &mut r,
                "istio_tcp_sockets_open",
                "The current number of open TCP sockets",
                Family::default(),
            ),
            xds_nacks: reg(&mut r, "ztunnel_xds_nacks", "xDS responses refused (NACK), by type", Family::default()),
            xds_resources: reg(&mut r, "ztunnel_xds_resources", "xDS resources in force, by type", Family::default()),
            connections_shed: reg(
                &mut r,
                "ztunnel_connections_shed",
                "Connections reset at once because ztunnel had no file descriptor left",
                Family::default(),
            ),
            waypoint_refused: reg(
                &mut r,
                "ztunnel_waypoint_refused",
                "Outbound connections refused because their waypoint could not be used, by reason",
                Family::default(),
            ),
            pairs: Mutex::default(),
            registry: r,
        })
    }

    /// The Prometheus (OpenMetrics) text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// The counters of the pair `(src, dst)`: from the cache, or registered under Istio's labels (built
    /// once, here) and cached.
    fn pair(&self, direction: Direction, mtls: bool, src: &Peer, dst: &Peer) -> Arc<PairCounters> {
        let hash = PairKey::hash_of(direction, mtls, src, dst);
        let mut pairs = self.pairs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((key, counters)) = pairs.get(&hash)
            && key.is(direction, mtls, src, dst)
        {
            return counters.clone();
        }
        let labels = tcp_labels(direction, mtls, src, dst, ResponseFlags::None);
        let counters = Arc::new(PairCounters {
            opened: self.tcp_opened.get_or_create(&labels).clone(),
            closed: std::sync::OnceLock::new(),
            received: self.tcp_received.get_or_create(&labels).clone(),
            sent: self.tcp_sent.get_or_create(&labels).clone(),
            active: self
                .active_connections
                .get_or_create(&DirectionLabels { direction: direction.as_str().into() })
                .clone(),
            labels,
        });
        if pairs.len() >= MAX_PAIRS {
            pairs.clear();
        }
        let key = PairKey { direction, mtls, src: PeerKey::of(src), dst: PeerKey::of(dst) };
        pairs.insert(hash, (key, counters.clone()));
        counters
    }

    /// `istio_tcp_sockets_open`'s gauge for the sockets of the pods' outbound connections (`source`) or of
    /// the connections to them (`destination`).
    pub fn sockets_open(&self, source: bool) -> &Gauge {
        let reporter = if source { "source" } else { "destination" };
        self.sockets_open[usize::from(source)]
            .get_or_init(|| self.tcp_sockets_open.get_or_create(&ReporterLabels { reporter: reporter.into() }).clone())
    }

    /// Counts an outbound connection refused because its waypoint could not be used.
    pub fn waypoint_refused(&self, reason: &str) {
        self.waypoint_refused.get_or_create(&ReasonOnlyLabels { reason: reason.into() }).inc();
    }

    /// Counts a failed TLS handshake; `true` the first time for this direction and reason (log it then, and
    /// only then at a visible level: a peer retrying a bad certificate must not flood the log).
    pub fn tls_failure(&self, direction: &str, reason: &str) -> bool {
        self.tls_failures.get_or_create(&ReasonLabels { direction: direction.into(), reason: reason.into() }).inc() == 0
    }
}

/// Which side of a connection this ztunnel is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From a local pod (we are the source's ztunnel).
    Outbound,
    /// To a local pod (we are the destination's ztunnel).
    Inbound,
}

impl Direction {
    /// `outbound` / `inbound`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// What is known about one end of a connection.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// Workload, if known.
    pub workload: Option<Arc<Workload>>,
    /// Identity, if known (verified for the remote end of mTLS).
    pub identity: Option<Identity>,
    /// The service the connection was addressed to (destination side only).
    pub service: Option<Arc<Service>>,
}

/// One proxied connection, from open to close: counts it, times it, and writes its access log line.
pub struct ConnRecord {
    metrics: Arc<Metrics>,
    mtls: bool,
    direction: Direction,
    src_addr: SocketAddr,
    dst_addr: SocketAddr,
    hbone_addr: Option<SocketAddr>,
    src: Peer,
    dst: Peer,
    start: Instant,
    pair: Arc<PairCounters>,
}

/// The labels describing one end of a connection (`unknown` where nothing is known).
struct Side {
    workload: String,
    namespace: String,
    principal: String,
    app: String,
    revision: String,
    cluster: String,
    region: String,
    zone: String,
}

impl Side {
    /// Istio's ztunnel's values (its `CommonTrafficLabels`): each label is the workload's field as the control
    /// plane sent it, `unknown` when empty; nothing is made up from other fields (istiod fills
    /// `workload_name`, `canonical_name` and `canonical_revision`, `latest` included).
    fn of(p: &Peer) -> Side {
        let known = |s: &str| if s.is_empty() { "unknown".to_string() } else { s.to_string() };
        let principal = known(&p.identity.as_ref().map(ToString::to_string).unwrap_or_default());
        match &p.workload {
            Some(w) => Side {
                workload: known(&w.workload_name),
                namespace: known(&w.namespace),
                principal,
                app: known(&w.canonical_name),
                revision: known(&w.canonical_revision),
                cluster: known(&w.cluster_id),
                region: known(&w.locality.region),
                zone: known(&w.locality.zone),
            },
            None => Side {
                workload: "unknown".into(),
                namespace: known(p.identity.as_ref().map(|i| i.namespace.as_str()).unwrap_or_default()),
                principal,
                app: "unknown".into(),
                revision: "unknown".into(),
                cluster: "unknown".into(),
                region: "unknown".into(),
                zone: "unknown".into(),
            },
        }
    }
}

impl ConnRecord {
    /// Opens a record (counts the connection as opened).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        metrics: &Arc<Metrics>,
        direction: Direction,
        src_addr: SocketAddr,
        dst_addr: SocketAddr,
        hbone_addr: Option<SocketAddr>,
        src: Peer,
        dst: Peer,
        mtls: bool,
    ) -> ConnRecord {
        let pair = metrics.pair(direction, mtls, &src, &dst);
        pair.active.inc();
        pair.opened.inc();
        ConnRecord {
            metrics: metrics.clone(),
            mtls,
            direction,
            src_addr,
            dst_addr,
            hbone_addr,
            src,
            dst,
            start: Instant::now(),
            pair,
        }
    }
}

/// Istio's labels for a connection from `src` to `dst`. Built when counting rather than kept: an open
/// connection holds only its peers (shared) and its pair's counters, not two dozen strings.
fn tcp_labels(direction: Direction, mtls: bool, src: &Peer, dst: &Peer, flags: ResponseFlags) -> TcpLabels {
    let (sv, dv) = (Side::of(src), Side::of(dst));
    let service = dst.service.as_ref();
    TcpLabels {
        reporter: match direction {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        }
        .into(),
        source_canonical_service: sv.app.clone(),
        source_canonical_revision: sv.revision.clone(),
        source_workload: sv.workload,
        source_workload_namespace: sv.namespace,
        source_principal: sv.principal,
        source_app: sv.app,
        source_version: sv.revision,
        source_cluster: sv.cluster,
        destination_service: service.map_or("unknown".into(), |s| s.hostname.clone()),
        destination_service_namespace: service.map_or("unknown".into(), |s| s.namespace.clone()),
        destination_service_name: service.map_or("unknown".into(), |s| s.name.clone()),
        destination_canonical_service: dv.app.clone(),
        destination_canonical_revision: dv.revision.clone(),
        destination_workload: dv.workload,
        destination_workload_namespace: dv.namespace,
        destination_principal: dv.principal,
        destination_app: dv.app,
        destination_version: dv.revision,
        destination_cluster: dv.cluster,
        request_protocol: "tcp".into(),
        response_flags: flags.as_str().into(),
        connection_security_policy: if mtls { "mutual_tls" } else { "unknown" }.into(),
        source_region: sv.region,
        source_zone: sv.zone,
        destination_region: dv.region,
        destination_zone: dv.zone,
    }
}

impl ConnRecord {
    /// Records the outcome and writes the access log line. `received` is client → server bytes, `sent`
    /// server → client.
    pub fn close(self, received: u64, sent: u64, error: Option<&dyn std::fmt::Display>, flags: ResponseFlags) {
        // Bytes count under the labels the connection opened with, whatever its end (Istio's ztunnel counts
        // them as they flow); a failure is closed, and failed, under its flag.
        self.pair.received.inc_by(received);
        self.pair.sent.inc_by(sent);
        if flags == ResponseFlags::None {
            let m = &self.metrics;
            self.pair.closed.get_or_init(|| m.tcp_closed.get_or_create(&self.pair.labels).clone()).inc();
        } else {
            let labels = tcp_labels(self.direction, self.mtls, &self.src, &self.dst, flags);
            let m = &self.metrics;
            m.tcp_closed.get_or_create(&labels).inc();
            m.tcp_failed.get_or_create(&labels).inc();
        }
        self.pair.active.dec();
        let id = |p: &Peer| p.identity.as_ref().map(ToString::to_string).unwrap_or_default();
        let wl = |p: &Peer| p.workload.as_ref().map(|w| w.name.clone()).unwrap_or_default();
        let ns = |p: &Peer| {
            p.workload
                .as_ref()
                .map(|w| w.namespace.clone())
                .or_else(|| p.identity.as_ref().map(|i| i.namespace.clone()))
                .unwrap_or_default()
        };
        let hbone = self.hbone_addr.map(|a| a.to_string()).unwrap_or_default();
        // Istio's access log wording: "bytes_sent" is what the client sent, "bytes_recv" what it received.
        tracing::info!(
            target: "access",
            "connection complete src.addr={} src.workload={:?} src.namespace={:?} src.identity={:?} dst.addr={} dst.hbone_addr={:?} dst.workload={:?} dst.namespace={:?} dst.identity={:?} direction={:?} bytes_sent={} bytes_recv={} duration=\"{}ms\"{}",
            self.src_addr,
            wl(&self.src),
            ns(&self.src),
            id(&self.src),
            self.dst_addr,
            hbone,
            wl(&self.dst),
            ns(&self.dst),
            id(&self.dst),
            self.direction.as_str(),
            received,
            sent,
            self.start.elapsed().as_millis(),
            error.map(|e| format!(" error={:?}", e.to_string())).unwrap_or_default(),
        );
    }
}

/// Istio's response flags for a TCP connection: the `response_flags` label, with Istio's values only, so that
/// Istio's dashboards and Kiali classify Ambit's connections as they classify Istio's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFlags {
    /// Nothing to report (`-`).
    None,
    /// Refused by authorization policy, by the ztunnel that applied it (`DENY`; the client's side of the same
    /// connection reports `CONNECT`, as Istio's ztunnel does).
    Deny,
    /// No connection to the upstream: it refused or could not be reached, the destination's ztunnel could not
    /// reach its pod, or (Ambit only; Istio records no metric then) a service had no endpoint (`CONNECT`).
    ConnectFailure,
    /// The TLS handshake with the peer's ztunnel failed, its identity included (`TLS_FAILURE`).
    TlsFailure,
    /// The HTTP/2 handshake over the TLS connection failed (`H2_HANDSHAKE_FAILURE`).
    Http2HandshakeFailure,
    /// No certificate for the client's own identity (`IDENTITY_ERROR`).
    IdentityError,
}

impl ResponseFlags {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Deny => "DENY",
            ResponseFlags::ConnectFailure => "CONNECT",
            ResponseFlags::TlsFailure => "TLS_FAILURE",
            ResponseFlags::Http2HandshakeFailure => "H2_HANDSHAKE_FAILURE",
            ResponseFlags::IdentityError => "IDENTITY_ERROR",
        }
    }

    /// The flag for a peer's answer to HBONE CONNECT other than 200, as Istio's ztunnel gives it on the
    /// client's side: no connection (`CONNECT`), whatever the status; a denial (401) is `DENY` only where
    /// the policy was applied, on the server's side.
    pub fn of_connect_status(_status: http::StatusCode) -> ResponseFlags {
        ResponseFlags::ConnectFailure
    }
}

/// How [`bench_conn_records`] counts each connection.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchVariant {
    /// Every connection of one pair: its counters come from the cache.
    KnownPair,
    /// Each connection from a new workload value (as after every xDS update of it): labels built each time.
    NewPair,
    /// What counting cost before the cache, for reference: the active-connection gauge and Istio's labels
    /// looked up at open, the labels built again and looked up at close.
    LabelsPerConnection,
}

/// For `benches/conn_record.rs`: opens and closes `n` connection records as `variant` says and returns the
/// nanoseconds per connection (the access log line is not written: no subscriber).
#[doc(hidden)]
pub fn bench_conn_records(n: usize, variant: BenchVariant) -> f64 {
    let m = Metrics::new();
    let wl = |name: &str| -> Arc<Workload> {
        let w = serde_json::json!({"uid": format!("Kubernetes//Pod/demo/{name}"), "name": name, "namespace": "demo",
            "canonicalName": name, "canonicalRevision": "v1", "serviceAccount": name, "clusterId": "Kubernetes"});
        Arc::new(serde_json::from_value(w).expect("a workload"))
    };
    let peer = |w: &Arc<Workload>| Peer {
        workload: Some(w.clone()),
        identity: Some(Identity::new("cluster.local", "demo", &w.name)),
        service: None,
    };
    let (client, server) = (wl("client"), wl("server"));
    let (a, b): (SocketAddr, SocketAddr) = (([10, 0, 0, 1], 40000).into(), ([10, 0, 0, 2], 80).into());
    let start = Instant::now();
    for _ in 0..n {
        let client = match variant {
            BenchVariant::NewPair => Arc::new((*client).clone()),
            _ => client.clone(),
        };
        let (src, dst) = (peer(&client), peer(&server));
        if variant == BenchVariant::LabelsPerConnection {
            let active = m.active_connections.get_or_create(&DirectionLabels { direction: "inbound".into() }).clone();
            active.inc();
            let labels = tcp_labels(Direction::Inbound, true, &src, &dst, ResponseFlags::None);
            m.tcp_opened.get_or_create(&labels).inc();
            let labels = tcp_labels(Direction::Inbound, true, &src, &dst, ResponseFlags::None);
            m.tcp_closed.get_or_create(&labels).inc();
            m.tcp_received.get_or_create(&labels).inc_by(1);
            m.tcp_sent.get_or_create(&labels).inc_by(1);
            active.dec();
        } else {
            ConnRecord::open(&m, Direction::Inbound, a, b, None, src, dst, true).close(1, 1, None, ResponseFlags::None);
        }
    }
    start.elapsed().as_nanos() as f64 / n.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, app: &str) -> Arc<Workload> {
        let w = serde_json::json!({"uid": format!("c//Pod/demo/{name}"), "name": name, "namespace": "demo",
            "canonicalName": app, "serviceAccount": "default"});
        Arc::new(serde_json::from_value(w).unwrap())
    }

    fn peer(w: &Arc<Workload>) -> Peer {
        Peer {
            workload: Some(w.clone()),
            identity: Some(Identity::new("cluster.local", "demo", "default")),
            service: None,
        }
    }

    /// The value of `family` (a counter) for the label set that has every `label="value"` in `has`.
    fn count(text: &str, family: &str, has: &[&str]) -> u64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("{family}_total{{")) && has.iter().all(|h| l.contains(h)))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    fn connect(m: &Arc<Metrics>, src: &Peer, dst: &Peer, flags: ResponseFlags, bytes: u64) {
        let a: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        ConnRecord::open(m, Direction::Inbound, a, b, None, src.clone(), dst.clone(), true).close(
            bytes,
            2 * bytes,
            None,
            flags,
        );
    }

    /// Connections of one pair count under the labels built for the first; a flagged close gets its own
    /// label set; a workload that xDS replaced (a new value, here with another app) is a new pair with its
    /// own labels, never the cached ones of the old value.
    #[test]
    fn connections_count_under_their_pairs_labels_built_once_per_pair() {
        let m = Metrics::new();
        let (client, server) = (workload("client", "shop"), workload("server", "db"));
        for _ in 0..3 {
            connect(&m, &peer(&client), &peer(&server), ResponseFlags::None, 10);
        }
        connect(&m, &peer(&client), &peer(&server), ResponseFlags::Deny, 0);
        let renamed = workload("client", "checkout");
        connect(&m, &peer(&renamed), &peer(&server), ResponseFlags::None, 5);
        let text = m.encode();
        let shop = ["source_app=\"shop\"", "destination_app=\"db\"", "reporter=\"destination\""];
        assert_eq!(count(&text, "istio_tcp_connections_opened", &shop), 4, "{text}");
        let ok = [shop.as_slice(), &["response_flags=\"-\""]].concat();
        assert_eq!(count(&text, "istio_tcp_connections_closed", &ok), 3, "{text}");
        assert_eq!(count(&text, "istio_tcp_received_bytes", &ok), 30, "{text}");
        assert_eq!(count(&text, "istio_tcp_sent_bytes", &ok), 60, "{text}");
        let deny = [shop.as_slice(), &["response_flags=\"DENY\""]].concat();
        assert_eq!(count(&text, "istio_tcp_connections_closed", &deny), 1, "{text}");
        let checkout = ["source_app=\"checkout\"", "response_flags=\"-\""];
        assert_eq!(count(&text, "istio_tcp_connections_opened", &checkout), 1, "{text}");
        assert_eq!(count(&text, "istio_tcp_received_bytes", &checkout), 5, "{text}");
        // Two pairs, one entry each.
        assert_eq!(m.pairs.lock().unwrap().len(), 2);
    }

    /// The cache is bounded: past [`MAX_PAIRS`] pairs it starts again, and nothing is miscounted.
    #[test]
    fn the_pair_cache_stays_bounded_and_counts_stay_right() {
        let m = Metrics::new();
        let server = workload("server", "db");
        let client = workload("client", "shop");
        for _ in 0..MAX_PAIRS + 10 {
            // A new value each time: a new pair (the same labels).
            let w = Arc::new((*client).clone());
            connect(&m, &peer(&w), &peer(&server), ResponseFlags::None, 1);
        }
        assert!(m.pairs.lock().unwrap().len() <= MAX_PAIRS);
        let text = m.encode();
        let n = (MAX_PAIRS + 10) as u64;
        assert_eq!(count(&text, "istio_tcp_connections_closed", &["source_app=\"shop\""]), n, "{text}");
        assert_eq!(count(&text, "istio_tcp_received_bytes", &["source_app=\"shop\""]), n, "{text}");
    }

    /// Each label is the workload's field as the control plane sent it, `unknown` when it sent none (as
    /// Istio's ztunnel: no pod name for a missing workload name, no `latest` for a missing revision), and the
    /// locality labels are always there.
    #[test]
    fn labels_are_the_workloads_own_fields_or_unknown_as_istios() {
        let m = Metrics::new();
        let bare: Arc<Workload> = Arc::new(
            serde_json::from_value(serde_json::json!({"uid": "u1", "name": "pod-1", "namespace": "shop"})).unwrap(),
        );
        let full: Arc<Workload> = Arc::new(
            serde_json::from_value(serde_json::json!({
                "uid": "u2", "name": "web-5d9f-abcde", "namespace": "shop", "workloadName": "web",
                "canonicalName": "web-app", "canonicalRevision": "v2", "clusterId": "east",
                "locality": {"region": "eu-1", "zone": "eu-1a", "subzone": ""},
            }))
            .unwrap(),
        );
        connect(&m, &peer(&bare), &peer(&full), ResponseFlags::None, 1);
        let text = m.encode();
        let want = [
            "source_workload=\"unknown\"",
            "source_canonical_service=\"unknown\"",
            "source_canonical_revision=\"unknown\"",
            "source_workload_namespace=\"shop\"",
            "source_app=\"unknown\"",
            "source_version=\"unknown\"",
            "source_cluster=\"unknown\"",
            "destination_workload=\"web\"",
            "destination_canonical_service=\"web-app\"",
            "destination_canonical_revision=\"v2\"",
            "destination_app=\"web-app\"",
            "destination_version=\"v2\"",
            "destination_cluster=\"east\"",
            "source_region=\"unknown\"",
            "source_zone=\"unknown\"",
            "destination_region=\"eu-1\"",
            "destination_zone=\"eu-1a\"",
        ];
        assert_eq!(count(&text, "istio_tcp_connections_opened", &want), 1, "{text}");
        // Istio's order: the locality labels last.
        let line = text.lines().find(|l| l.starts_with("istio_tcp_connections_opened_total{")).unwrap();
        assert!(line.contains("connection_security_policy=\"mutual_tls\",source_region="), "{line}");
    }

    #[test]
    fn response_flags_render_as_istio_names_them() {
        use http::StatusCode;
        let flags = [
            (ResponseFlags::None, "-"),
            (ResponseFlags::of_connect_status(StatusCode::UNAUTHORIZED), "CONNECT"),
            (ResponseFlags::Deny, "DENY"),
            (ResponseFlags::of_connect_status(StatusCode::SERVICE_UNAVAILABLE), "CONNECT"),
            (ResponseFlags::of_connect_status(StatusCode::BAD_REQUEST), "CONNECT"),
            (ResponseFlags::ConnectFailure, "CONNECT"),
            (ResponseFlags::TlsFailure, "TLS_FAILURE"),
            (ResponseFlags::Http2HandshakeFailure, "H2_HANDSHAKE_FAILURE"),
            (ResponseFlags::IdentityError, "IDENTITY_ERROR"),
        ];
        for (f, s) in flags {
            assert_eq!(f.as_str(), s);
        }
    }

    #[test]
    fn every_metric_is_exported_under_its_istio_or_ztunnel_name() {
        let m = Metrics::new();
        // A family shows only once it has a member.
        let tcp = TcpLabels { reporter: "destination".into(), ..Default::default() };
        for f in [&m.tcp_opened, &m.tcp_closed, &m.tcp_failed, &m.tcp_sent, &m.tcp_received] {
            f.get_or_create(&tcp).inc();
        }
        let why = ReasonLabels { direction: "inbound".into(), reason: "r".into() };
        m.tls_failures.get_or_create(&why).inc();
        m.hbone_rejected.get_or_create(&why).inc();
        m.zds_messages.get_or_create(&ZdsLabels { kind: "add".into(), outcome: "ack".into() }).inc();
        m.active_connections.get_or_create(&DirectionLabels { direction: "inbound".into() }).inc();
        m.cert_expiry.get_or_create(&IdentityLabels { identity: "spiffe://a/ns/b/sa/c".into() }).set(1);
        m.policy_denials.get_or_create(&DenialLabels { transport: "hbone".into(), policy: "-".into() }).inc();
        m.plaintext_from_mesh
            .get_or_create(&SourceLabels { source_workload_namespace: "b".into(), source_workload: "w".into() })
            .inc();
        let ok = OutcomeLabels { outcome: "ok".into() };
        m.cert_requests.get_or_create(&ok).inc();
        m.trust_root_reloads.get_or_create(&ok).inc();
        m.xds_terminations.get_or_create(&ReasonOnlyLabels { reason: "closed".into() }).inc();
        let url = TypeLabels { url: "type.googleapis.com/istio.workload.Address".into() };
        m.xds_messages.get_or_create(&url).inc();
        m.xds_nacks.get_or_create(&url).inc();
        m.xds_resources.get_or_create(&url).set(1);
        m.xds_message_bytes.get_or_create(&url).inc_by(10);
        m.tcp_sockets_open.get_or_create(&ReporterLabels { reporter: "source".into() }).inc();
        let text = m.encode();
        for name in [
            "istio_tcp_connections_opened_total",
            "istio_tcp_connections_closed_total",
            "istio_tcp_connections_failed_total",
            "istio_tcp_sent_bytes_total",
            "istio_tcp_received_bytes_total",
            "workload_manager_active_proxy_count",
            "workload_manager_proxies_started_total",
            "workload_manager_proxies_stopped_total",
            "ztunnel_tls_handshake_failures_total",
            "ztunnel_hbone_rejected_total",
            "ztunnel_zds_messages_total",
            "ztunnel_zds_connected",
            "ztunnel_active_connections",
            "ztunnel_pool_connections",
            "ztunnel_certificate_expiry_seconds",
            "ztunnel_policy_denials_total",
            "ztunnel_inbound_plaintext_from_mesh_total",
            "ztunnel_certificate_requests_total",
            "ztunnel_trust_root_reloads_total",
            "ztunnel_xds_connected",
            "istio_xds_connection_terminations_total",
            "istio_xds_message_total",
            "ztunnel_xds_nacks_total",
            "ztunnel_xds_resources",
            "istio_xds_message_bytes_total",
            "istio_tcp_sockets_open",
            "istio_build",
            "workload_manager_pending_proxy_count",
            "process_open_fds",
            "process_max_fds",
        ] {
            let family = name.strip_suffix("_total").unwrap_or(name);
            assert!(text.contains(&format!("# TYPE {family} ")), "{family} is not registered:\n{text}");
        }
        assert!(text.contains("istio_tcp_connections_opened_total{reporter=\"destination\""), "{text}");
        assert!(text.contains("istio_build{component=\"ztunnel\",tag=\""), "{text}");
    }
}
