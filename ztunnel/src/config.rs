//! ztunnel's configuration, from Istio ztunnel's environment variables (so it drops into Istio's DaemonSet)
//! plus a few `AMBIT_*` ones for what Istio's ztunnel does not have. See `ztunnel/README.md`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Why the configuration is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}={value:?}: {reason}")]
pub struct ConfigError {
    /// The variable.
    pub var: &'static str,
    /// Its value.
    pub value: String,
    /// What is wrong.
    pub reason: String,
}

/// ztunnel's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// `INPOD_UDS`: the node agent's ZDS socket.
    pub inpod_uds: PathBuf,
    /// `NODE_NAME`.
    pub node_name: String,
    /// `LOCAL_XDS_PATH`: the local workload file (Istio's YAML format).
    pub local_xds_path: Option<PathBuf>,
    /// `XDS_ADDRESS`: istiod's delta xDS (`https://istiod.istio-system.svc:15012` unless a local file is
    /// given; `""` turns xDS off).
    pub xds_address: Option<String>,
    /// `XDS_ROOT_CA`: roots that sign the xDS server's certificate.
    pub xds_root_ca: PathBuf,
    /// `ALT_XDS_HOSTNAME`: the name to check the xDS server's certificate against.
    pub alt_xds_hostname: Option<String>,
    /// `CA_ADDRESS`: the Istio-compatible CA (used unless the local file CA is configured).
    pub ca_address: String,
    /// `CA_ROOT_CA`: roots that sign the CA's certificate; also the mesh's trust roots (Istio's
    /// `root-cert.pem`, from the `istio-ca-root-cert` ConfigMap).
    pub ca_root_ca: PathBuf,
    /// `ALT_CA_HOSTNAME`: the name to check the CA's certificate against.
    pub alt_ca_hostname: Option<String>,
    /// `AUTH_TOKEN`: the projected service account token (audience `istio-ca`) sent to the CA and xDS.
    pub auth_token: PathBuf,
    /// `CLUSTER_ID`: sent as the `clusterid` header.
    pub cluster_id: String,
    /// `NETWORK`: the network of this node's pods (empty: the default network). Endpoints and waypoints on
    /// another network are reachable only through a network gateway, which Ambit does not support.
    pub network: String,
    /// `INSTANCE_IP`, `POD_NAME`, `POD_NAMESPACE`: who this ztunnel is, for its xDS node id.
    pub instance_ip: String,
    /// `POD_NAME`.
    pub pod_name: String,
    /// `POD_NAMESPACE`.
    pub pod_namespace: String,
    /// `TRUST_DOMAIN`.
    pub trust_domain: String,
    /// `AMBIT_LOCAL_CA_CERT` / `AMBIT_LOCAL_CA_KEY`: the local file CA (for running without a control plane;
    /// the node then holds the CA key). Unset: certificates come from `CA_ADDRESS`.
    pub local_ca: Option<(PathBuf, PathBuf)>,
    /// `SECRET_TTL`: lifetime of workload certificates.
    pub secret_ttl: Duration,
    /// `PACKET_MARK`: the mark on every socket ztunnel creates in a pod.
    pub packet_mark: u32,
    /// `INPOD_PORT_REUSE`: SO_REUSEPORT on listeners ztunnel binds itself.
    pub inpod_port_reuse: bool,
    /// `AMBIT_LISTENER_HANDOFF`: announce Ambit's ZDS extension and take the pods' listeners from the agent
    /// (default). Off, ztunnel binds its own listeners, as Istio's does.
    pub listener_handoff: bool,
    /// `IPV6_ENABLED`.
    pub ipv6_enabled: bool,
    /// `ADMIN_ADDR` (Ambit): admin server, localhost only by default.
    pub admin_addr: SocketAddr,
    /// `STATS_ADDR` (Ambit): Prometheus metrics.
    pub stats_addr: SocketAddr,
    /// `READINESS_ADDR` (Ambit): readiness.
    pub readiness_addr: SocketAddr,
    /// `ZTUNNEL_WORKER_THREADS`: worker threads (N or N% of the CPUs), each an event loop serving its pods.
    pub worker_threads: usize,
    /// `AMBIT_BUSY_POLL`: the longest a worker polls after its last I/O event before it sleeps, and what it may
    /// spend to save one wakeup (0: never poll). Each worker chooses its window up to this from the gaps it
    /// observes ([`crate::busy_poll`]).
    pub busy_poll: Duration,
    /// `CONNECTION_TERMINATION_DEADLINE`: how long draining waits for open connections.
    pub termination_deadline: Duration,
    /// `POOL_MAX_STREAMS_PER_CONNECTION`.
    pub pool_max_streams: u32,
    /// `POOL_UNUSED_RELEASE_TIMEOUT`.
    pub pool_idle_timeout: Duration,
    /// `HTTP2_STREAM_WINDOW_SIZE`.
    pub h2_stream_window: u32,
    /// `HTTP2_CONNECTION_WINDOW_SIZE`.
    pub h2_connection_window: u32,
    /// `HTTP2_FRAME_SIZE`.
    pub h2_frame_size: u32,
    /// `KEEPALIVE_ENABLED` / `KEEPALIVE_TIME` / `KEEPALIVE_INTERVAL` / `KEEPALIVE_RETRIES`: TCP keepalive on
    /// every connection ztunnel accepts or opens (keepalives are not end to end through a proxy, so ztunnel
    /// sends its own), as (idle time, probe interval, probes); `None` when disabled.
    pub tcp_keepalive: Option<(Duration, Duration, u32)>,
    /// `AMBIT_HTTP2_PING_INTERVAL`: how often an HBONE connection is checked with an HTTP/2 PING.
    pub h2_ping_interval: Duration,
    /// `AMBIT_HTTP2_PING_TIMEOUT`: how long a PING may go unanswered before the connection is dropped.
    pub h2_ping_timeout: Duration,
}

/// Parses a Go-style duration (`5s`, `1m30s`, `250ms`, `24h0m0s`) or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u64>() {
        return Some(Duration::from_secs(n));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').filter(|&i| i > 0)?;
        let n: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(n * unit).ok()?;
    }
    Some(total)
}

impl Config {
    /// Reads the configuration through `var` (the process environment in production).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |k: &str| var(k);
        fn bad(var: &'static str, value: &str, reason: &str) -> ConfigError {
            ConfigError { var, value: value.to_string(), reason: reason.to_string() }
        }
        let duration = |k: &'static str, d: Duration| -> Result<Duration, ConfigError> {
            match get(k) {
                None => Ok(d),
                Some(v) => parse_duration(&v).ok_or_else(|| bad(k, &v, "not a duration (e.g. 5s, 1m30s)")),
            }
        };
        let number = |k: &'static str, d: u32| -> Result<u32, ConfigError> {
            match get(k) {
                None => Ok(d),
                Some(v) => v.trim().parse().map_err(|_| bad(k, &v, "not a non-negative integer")),
            }
        };
        let boolean = |k: &'static str, d: bool| -> Result<bool, ConfigError> {
            match get(k).as_deref().map(str::trim) {
                None => Ok(d),
                Some("true") | Some("1") => Ok(true),
                Some("false") | Some("0") => Ok(false),
                Some(v) => Err(bad(k, v, "not true or false")),
            }
        };
        let addr = |k: &'static str, d: SocketAddr| -> Result<SocketAddr, ConfigError> {
            match get(k) {
                None => Ok(d),
                Some(v) => v.parse().map_err(|_| bad(k, &v, "not an ip:port address")),
            }
        };
        let ipv6_enabled = boolean("IPV6_ENABLED", true)?;
        let any: IpAddr = if ipv6_enabled { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
        let local_ca = match (get("AMBIT_LOCAL_CA_CERT"), get("AMBIT_LOCAL_CA_KEY")) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (None, None) => None,
            (Some(c), None) => {
                return Err(bad("AMBIT_LOCAL_CA_KEY", "", &format!("must be set with AMBIT_LOCAL_CA_CERT={c}")));
            }
            (None, Some(k)) => {
                return Err(bad("AMBIT_LOCAL_CA_CERT", "", &format!("must be set with AMBIT_LOCAL_CA_KEY={k}")));
            }
        };
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let worker_threads = match get("ZTUNNEL_WORKER_THREADS") {
            None => (cores.div_ceil(4)).max(2),
            Some(v) => {
                let parsed = match v.trim().strip_suffix('%') {
                    Some(p) => p.parse::<usize>().ok().map(|p| (cores * p).div_ceil(100).max(1)),
                    None => v.trim().parse::<usize>().ok(),
                };
                parsed
                    .filter(|n| *n > 0)
                    .ok_or_else(|| bad("ZTUNNEL_WORKER_THREADS", &v, "not a positive count or percentage"))?
            }
        };
        const ISTIOD: &str = "https://istiod.istio-system.svc:15012";
        const ROOT: &str = "./var/run/secrets/istio/root-cert.pem";
        let nonempty = |k: &str| get(k).filter(|s| !s.trim().is_empty());
        let local_xds_path = get("LOCAL_XDS_PATH").filter(|s| !s.is_empty()).map(PathBuf::from);
        let xds_address = match get("XDS_ADDRESS") {
            Some(a) if a.trim().is_empty() => None,
            Some(a) => Some(a),
            None if local_xds_path.is_none() => Some(ISTIOD.to_string()),
            None => None,
        };
        let c = Config {
            inpod_uds: PathBuf::from(get("INPOD_UDS").unwrap_or_else(|| ambit_proto::zds::DEFAULT_SOCKET.into())),
            node_name: get("NODE_NAME").unwrap_or_default(),
            local_xds_path,
            xds_address,
            xds_root_ca: PathBuf::from(nonempty("XDS_ROOT_CA").unwrap_or_else(|| ROOT.into())),
            alt_xds_hostname: nonempty("ALT_XDS_HOSTNAME"),
            ca_address: nonempty("CA_ADDRESS").unwrap_or_else(|| ISTIOD.into()),
            ca_root_ca: PathBuf::from(nonempty("CA_ROOT_CA").unwrap_or_else(|| ROOT.into())),
            alt_ca_hostname: nonempty("ALT_CA_HOSTNAME"),
            auth_token: PathBuf::from(
                nonempty("AUTH_TOKEN").unwrap_or_else(|| "./var/run/secrets/tokens/istio-token".into()),
            ),
            cluster_id: nonempty("CLUSTER_ID").unwrap_or_else(|| "Kubernetes".into()),
            network: nonempty("NETWORK").unwrap_or_default(),
            instance_ip: nonempty("INSTANCE_IP").unwrap_or_else(|| "1.1.1.1".into()),
            pod_name: get("POD_NAME").unwrap_or_default(),
            pod_namespace: get("POD_NAMESPACE").unwrap_or_default(),
            trust_domain: get("TRUST_DOMAIN").filter(|s| !s.is_empty()).unwrap_or_else(|| "cluster.local".into()),
            local_ca,
            secret_ttl: duration("SECRET_TTL", Duration::from_secs(24 * 3600))?,
            packet_mark: number("PACKET_MARK", 1337)?,
            inpod_port_reuse: boolean("INPOD_PORT_REUSE", true)?,
            listener_handoff: boolean("AMBIT_LISTENER_HANDOFF", true)?,
            ipv6_enabled,
            admin_addr: addr("ADMIN_ADDR", SocketAddr::from((Ipv4Addr::LOCALHOST, 15000)))?,
            stats_addr: addr("STATS_ADDR", SocketAddr::new(any, 15020))?,
            readiness_addr: addr("READINESS_ADDR", SocketAddr::new(any, 15021))?,
            worker_threads,
            busy_poll: duration("AMBIT_BUSY_POLL", Duration::from_micros(80))?,
            termination_deadline: duration("CONNECTION_TERMINATION_DEADLINE", Duration::from_secs(5))?,
            pool_max_streams: number("POOL_MAX_STREAMS_PER_CONNECTION", 100)?.max(1),
            pool_idle_timeout: duration("POOL_UNUSED_RELEASE_TIMEOUT", Duration::from_secs(300))?,
            h2_stream_window: number("HTTP2_STREAM_WINDOW_SIZE", 4 * 1024 * 1024)?,
            h2_connection_window: number("HTTP2_CONNECTION_WINDOW_SIZE", 16 * 1024 * 1024)?,
            h2_frame_size: number("HTTP2_FRAME_SIZE", 1024 * 1024)?,
            tcp_keepalive: match boolean("KEEPALIVE_ENABLED", true)? {
                true => Some((
                    duration("KEEPALIVE_TIME", Duration::from_secs(180))?,
                    duration("KEEPALIVE_INTERVAL", Duration::from_secs(180))?,
                    number("KEEPALIVE_RETRIES", 9)?,
                )),
                false => None,
            },
            h2_ping_interval: duration("AMBIT_HTTP2_PING_INTERVAL", Duration::from_secs(10))?,
            h2_ping_timeout: duration("AMBIT_HTTP2_PING_TIMEOUT", Duration::from_secs(20))?,
        };
        if !(16_384..=16_777_215).contains(&c.h2_frame_size) {
            return Err(bad("HTTP2_FRAME_SIZE", &c.h2_frame_size.to_string(), "must be between 16384 and 16777215"));
        }
        if let (Some(p), Some(a)) = (&c.local_xds_path, &c.xds_address) {
            return Err(bad(
                "XDS_ADDRESS",
                a,
                &format!("workloads come from one source: LOCAL_XDS_PATH={} or XDS_ADDRESS, not both", p.display()),
            ));
        }
        if c.local_xds_path.is_none() && c.xds_address.is_none() {
            return Err(bad("XDS_ADDRESS", "", "no source of workloads: set XDS_ADDRESS or LOCAL_XDS_PATH"));
        }
        for (var, a) in [("XDS_ADDRESS", c.xds_address.as_deref()), ("CA_ADDRESS", Some(c.ca_address.as_str()))] {
            if let Some(a) = a
                && !a.starts_with("https://")
            {
                return Err(bad(var, a, "must be an https:// URL (the control plane is always reached over TLS)"));
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut m: HashMap<String, String> = [("AMBIT_LOCAL_CA_CERT", "/ca.pem"), ("AMBIT_LOCAL_CA_KEY", "/ca.key")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in pairs {
            m.insert(k.to_string(), v.to_string());
        }
        Config::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("24h0m0s"), Some(Duration::from_secs(86400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        for bad in ["", "s", "5x", "-1s", "1.5.5s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn istio_defaults() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.inpod_uds, PathBuf::from("/var/run/ztunnel/ztunnel.sock"));
        assert_eq!(c.packet_mark, 0x539);
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.pool_max_streams, 100);
        assert_eq!(c.termination_deadline, Duration::from_secs(5));
        assert_eq!(c.admin_addr, "127.0.0.1:15000".parse().unwrap());
        assert!(c.worker_threads >= 2);
        assert_eq!(c.tcp_keepalive, Some((Duration::from_secs(180), Duration::from_secs(180), 9)));
        assert_eq!(cfg(&[("KEEPALIVE_ENABLED", "false")]).unwrap().tcp_keepalive, None);
        let k = cfg(&[("KEEPALIVE_TIME", "30s"), ("KEEPALIVE_RETRIES", "3")]).unwrap().tcp_keepalive.unwrap();
        assert_eq!((k.0, k.2), (Duration::from_secs(30), 3));
    }

    #[test]
    fn bad_values_name_the_variable() {
        assert_eq!(cfg(&[("SECRET_TTL", "forever")]).unwrap_err().var, "SECRET_TTL");
        assert_eq!(cfg(&[("INPOD_PORT_REUSE", "maybe")]).unwrap_err().var, "INPOD_PORT_REUSE");
        assert_eq!(cfg(&[("ZTUNNEL_WORKER_THREADS", "0")]).unwrap_err().var, "ZTUNNEL_WORKER_THREADS");
        assert_eq!(cfg(&[("HTTP2_FRAME_SIZE", "10")]).unwrap_err().var, "HTTP2_FRAME_SIZE");
        assert_eq!(
            cfg(&[("XDS_ADDRESS", "https://istiod:15012"), ("LOCAL_XDS_PATH", "/w.yaml")]).unwrap_err().var,
            "XDS_ADDRESS"
        );
        assert_eq!(cfg(&[("XDS_ADDRESS", "")]).unwrap_err().var, "XDS_ADDRESS");
        assert_eq!(cfg(&[("CA_ADDRESS", "istiod:15012")]).unwrap_err().var, "CA_ADDRESS");
        assert_eq!(
            cfg(&[("ZTUNNEL_WORKER_THREADS", "50%")]).unwrap().worker_threads,
            1.max(std::thread::available_parallelism().unwrap().get().div_ceil(2))
        );
    }

    #[test]
    fn istiod_by_default() {
        // Istio's defaults: istiod for both workloads and certificates, Istio's mounted token and root.
        let c = Config::from_vars(|_| None).unwrap();
        assert_eq!(c.xds_address.as_deref(), Some("https://istiod.istio-system.svc:15012"));
        assert_eq!(c.ca_address, "https://istiod.istio-system.svc:15012");
        assert_eq!(c.ca_root_ca, PathBuf::from("./var/run/secrets/istio/root-cert.pem"));
        assert_eq!(c.auth_token, PathBuf::from("./var/run/secrets/tokens/istio-token"));
        assert_eq!(c.cluster_id, "Kubernetes");
        assert!(c.local_ca.is_none() && c.local_xds_path.is_none());
        // A local file turns xDS off unless it is asked for explicitly.
        assert_eq!(cfg(&[("LOCAL_XDS_PATH", "/w.yaml")]).unwrap().xds_address, None);
    }
}
