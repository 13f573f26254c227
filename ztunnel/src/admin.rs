//! ztunnel's control endpoints: admin (localhost: `/config_dump`, `/logging`, `/quitquitquit`), Prometheus
//! metrics (`/metrics`, `/stats/prometheus`) and readiness (`/healthz/ready`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::inpod::Inpod;
use crate::proxy::ProxyCtx;

/// Changes the log filter at run time.
pub trait LogControl: Send + Sync {
    /// The current filter.
    fn get(&self) -> String;
    /// Sets a new filter (`info`, `debug`, `ztunnel=debug,info`, …).
    fn set(&self, filter: &str) -> Result<(), String>;
}

/// What the endpoints read.
pub struct AdminState {
    /// The proxy context.
    pub ctx: Arc<ProxyCtx>,
    /// In-pod mode.
    pub inpod: Arc<Mutex<Inpod>>,
    /// The log filter.
    pub log: Arc<dyn LogControl>,
    /// Notified by `/quitquitquit`.
    pub quit: Arc<Notify>,
    /// The xDS connection, when workloads come from a control plane.
    pub xds: Option<Arc<Mutex<crate::xds::XdsStatus>>>,
}

type Reply = Response<Full<Bytes>>;

/// `staticConfig`, as Istio's ztunnel shows it: the local file as read now (its workloads, policies and
/// services), or empty lists without one (or when it does not parse).
fn static_config(path: Option<&std::path::Path>) -> serde_json::Value {
    let empty = serde_json::json!({"workloads": [], "policies": [], "services": []});
    let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) else { return empty };
    let Ok(serde_json::Value::Object(mut v)) = serde_yaml_ng::from_str::<serde_json::Value>(&text) else {
        return empty;
    };
    for key in ["workloads", "policies", "services"] {
        let e = v.entry(key).or_insert_with(|| serde_json::json!([]));
        if e.is_null() {
            *e = serde_json::json!([]);
        }
    }
    serde_json::Value::Object(v)
}

/// `version`, in Istio's `BuildInfo` shape; what a build of Ambit does not know is `unknown`.
fn version() -> serde_json::Value {
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "gitRevision": "unknown",
        "rustVersion": "unknown",
        "buildProfile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "buildStatus": "unknown",
        "istioVersion": "unknown",
        "cryptoProvider": "ring",
    })
}

/// `config`: the settings Ambit shares with Istio's ztunnel, under Istio's names (durations as serde writes
/// them, `{secs, nanos}`); Ambit's own settings are not repeated here.
fn istio_config(c: &crate::config::Config) -> serde_json::Value {
    let d = |d: std::time::Duration| serde_json::json!({"secs": d.as_secs(), "nanos": d.subsec_nanos()});
    serde_json::json!({
        "proxy": true,
        "dnsProxy": false,
        "windowSize": c.h2_stream_window,
        "connectionWindowSize": c.h2_connection_window,
        "frameSize": c.h2_frame_size,
        "poolMaxStreamsPerConn": c.pool_max_streams,
        "poolUnusedReleaseTimeout": d(c.pool_idle_timeout),
        "network": c.network,
        "localNode": (!c.node_name.is_empty()).then_some(&c.node_name),
        "proxyMode": "Shared",
        "clusterId": c.cluster_id,
        "caAddress": c.local_ca.is_none().then_some(&c.ca_address),
        "xdsAddress": c.xds_address,
        "secretTtl": d(c.secret_ttl),
        "selfTerminationDeadline": d(c.termination_deadline),
        "numWorkerThreads": c.worker_threads,
        "inpodUds": c.inpod_uds,
        "inpodPortReuse": c.inpod_port_reuse,
        "packetMark": c.packet_mark,
        "ipv6Enabled": c.ipv6_enabled,
    })
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static response")
}

impl AdminState {
    /// Whether ztunnel is ready: workloads loaded (the local file, or every xDS type pushed once) and the
    /// agent's snapshot received.
    pub fn ready(&self) -> bool {
        self.ctx.state.status().generation > 0 && self.inpod.lock().unwrap().ready()
    }

    /// `/config_dump`: Istio's ztunnel's shape (`workloads`, `services`, `policies`, `certificates`,
    /// `workloadState`), so `istioctl ztunnel-config` and scripts written for Istio read it; what only Ambit
    /// shows is under `ambit`.
    pub fn config_dump(&self) -> serde_json::Value {
        let snap = self.ctx.state.snapshot();
        let inpod = self.inpod.lock().unwrap();
        let pods = inpod.status();
        let services: Vec<serde_json::Value> = snap
            .services
            .iter()
            .map(|s| {
                let mut v = serde_json::to_value(s.as_ref()).unwrap_or_default();
                // Istio's endpoints: a map keyed by workload uid, each with the workload's own port map for the
                // service (as istiod sent it) and its health; and the `service` and `address` that istioctl also
                // reads (Istio's ztunnel no longer writes them).
                let endpoints: serde_json::Map<String, serde_json::Value> = snap
                    .endpoints(s)
                    .iter()
                    .map(|e| {
                        let port: BTreeMap<String, u16> =
                            e.ports.iter().map(|(sp, tp)| (sp.to_string(), *tp)).collect();
                        let entry = serde_json::json!({
                            "workloadUid": e.workload.uid,
                            "service": s.key(),
                            "address": e.workload.workload_ips.first().map(|ip| format!("{}/{ip}", e.workload.network)),
                            "port": port,
                            "status": e.workload.status,
                        });
                        (e.workload.uid.clone(), entry)
                    })
                    .collect();
                v["endpoints"] = endpoints.into();
                v
            })
            .collect();
        let trust_domain = &self.ctx.cfg.trust_domain;
        let workload_state: serde_json::Map<String, serde_json::Value> = pods
            .iter()
            .map(|p| {
                let state = serde_json::json!({
                    "state": p.state,
                    "info": {
                        "name": p.info.name,
                        "namespace": p.info.namespace,
                        "serviceAccount": p.info.service_account,
                        "trustDomain": trust_domain,
                    },
                });
                (p.uid.clone(), state)
            })
            .collect();
        serde_json::json!({
            "workloads": snap.workloads.iter().map(|w| w.as_ref()).collect::<Vec<_>>(),
            "services": services,
            // Services istiod has sent endpoints for before the service itself; Ambit keeps endpoints by
            // service key whether or not the service is known, so nothing waits here.
            "stagedServices": {},
            "policies": snap.policies.all(),
            "certificates": self.ctx.certs.istio_dump(),
            "workloadState": workload_state,
            "staticConfig": static_config(self.ctx.cfg.local_xds_path.as_deref()),
            "version": version(),
            "config": istio_config(&self.ctx.cfg),
            "ambit": {
                "node": self.ctx.cfg.node_name,
                "trustDomain": trust_domain,
                "configSource": self.ctx.state.status(),
                "certificateAuthority": self.ctx.certs.source(),
                "certificates": self.ctx.certs.dump(),
                "xds": self.xds.as_ref().map(|x| x.lock().unwrap().clone()),
                "inpod": {"ready": inpod.ready(), "pods": pods},
            },
        })
    }

    fn metrics_text(&self) -> String {
        let m = &self.ctx.metrics;
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            m.open_fds.set(fds.count() as i64);
        }
        if let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
            m.max_fds.set(i64::try_from(soft).unwrap_or(i64::MAX));
        }
        self.ctx.metrics.cert_expiry.clear();
        for c in self.ctx.certs.dump() {
            self.ctx
                .metrics
                .cert_expiry
                .get_or_create(&crate::metrics::IdentityLabels { identity: c.identity })
                .set(c.expires_in_seconds);
        }
        self.ctx.metrics.encode()
    }

    fn admin(&self, req: &Request<Incoming>) -> Reply {
        let query = req.uri().query().unwrap_or_default();
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/") => reply(StatusCode::OK, "text/plain", "/config_dump\n/logging\n/quitquitquit\n"),
            (&Method::GET, "/config_dump") => reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&self.config_dump()).unwrap_or_default(),
            ),
            (&Method::GET, "/logging") => {
                reply(StatusCode::OK, "text/plain", format!("current log level is {}\n", self.log.get()))
            }
            (&Method::POST, "/logging") => {
                let level = query.split('&').find_map(|kv| kv.strip_prefix("level="));
                match level.map(|l| self.log.set(l)) {
                    Some(Ok(())) => {
                        info!(level = level.unwrap_or_default(), "log level changed");
                        reply(StatusCode::OK, "text/plain", format!("current log level is {}\n", self.log.get()))
                    }
                    Some(Err(e)) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("invalid level: {e}\n")),
                    None => reply(StatusCode::BAD_REQUEST, "text/plain", "usage: POST /logging?level=<filter>\n"),
                }
            }
            (&Method::POST, "/quitquitquit") => {
                self.quit.notify_one();
                reply(StatusCode::OK, "text/plain", "draining and exiting\n")
            }
            (_, "/" | "/config_dump" | "/logging" | "/quitquitquit") => {
                reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "method not allowed\n")
            }
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }

    fn stats(&self, req: &Request<Incoming>) -> Reply {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics" | "/stats/prometheus") => {
                reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", self.metrics_text())
            }
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }

    fn readiness(&self, req: &Request<Incoming>) -> Reply {
        match req.uri().path() {
            "/healthz/ready" if self.ready() => reply(StatusCode::OK, "text/plain", "ready\n"),
            "/healthz/ready" => {
                let why = if self.ctx.state.status().generation == 0 {
                    "not ready: waiting for the first complete configuration (local file or xDS push)\n"
                } else {
                    "not ready: waiting for the node agent's snapshot\n"
                };
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why)
            }
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }
}

/// Which endpoint set a listener serves.
#[derive(Debug, Clone, Copy)]
pub enum Endpoint {
    /// Admin.
    Admin,
    /// Metrics.
    Stats,
    /// Readiness.
    Readiness,
}

/// Binds `addr` and serves `which` forever.
pub async fn serve(addr: SocketAddr, which: Endpoint, state: Arc<AdminState>) -> std::io::Result<()> {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        // A host without IPv6 cannot bind [::]; fall back to IPv4.
        Err(_) if addr.ip().is_unspecified() && addr.is_ipv6() => {
            TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], addr.port()))).await?
        }
        Err(e) => return Err(e),
    };
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(%addr, error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    async move {
                        Ok::<_, Infallible>(match which {
                            Endpoint::Admin => state.admin(&req),
                            Endpoint::Stats => state.stats(&req),
                            Endpoint::Readiness => state.readiness(&req),
                        })
                    }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(())
}
