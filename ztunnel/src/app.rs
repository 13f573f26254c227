//! The process: what `ztunnel` does from a parsed configuration to exit — the CA and trust roots, the
//! workload source (istiod's xDS or the local file), the worker threads, the admin endpoints, the node agent's
//! ZDS connection — and the drain on SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState, Endpoint, LogControl};
use crate::certs::{CaSource, CertStore, LocalCa};
use crate::config::Config;
use crate::controlplane::{Connection, IstioCa, Target};
use crate::inpod::{self, Inpod};
use crate::metrics::Metrics;
use crate::proxy::ProxyCtx;
use crate::state::{self, State};
use crate::tls::TrustRoots;
use crate::workers::Workers;

/// Sets up the process before any thread starts: the open-files limit, the descriptor kept for shedding, and
/// the allocator's settings.
pub fn prepare_process() {
    raise_fd_limit();
    crate::socket::reserve_spare_fd();
    // Freed buffers stay while traffic flows; each worker returns them when its traffic pauses.
    crate::heap::tune_allocator();
}

/// Raises the soft limit on open files to the hard one (as Istio's ztunnel does): each proxied connection
/// holds one or two fds, so a soft limit of 1024 would cap a node at a few hundred connections. At the limit,
/// a waiting connection is reset at once (see `socket::shed_one`) and one that cannot be opened upstream is
/// answered with an error; nothing crashes.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open files limit"),
            Err(e) => warn!(limit = soft, error = %e, "cannot raise the open files limit"),
        },
        Ok((soft, _)) => info!(limit = soft, "open files limit"),
        Err(e) => warn!(error = %e, "cannot read the open files limit"),
    }
}

/// Re-reads the mesh's root file every few seconds and puts a changed one in force (root rotation: the
/// kubelet updates the mounted ConfigMap in place). An unreadable or broken file keeps the roots in force.
async fn watch_roots(path: std::path::PathBuf, mut seen: Vec<u8>, roots: Arc<TrustRoots>, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let Ok(pem) = std::fs::read(&path) else { continue };
        if pem == seen {
            continue;
        }
        let outcome = match roots.replace_pem(&pem) {
            Ok(n) => {
                info!(file = %path.display(), roots = n, "the mesh's trust roots changed; new ones in force");
                "ok"
            }
            Err(e) => {
                error!(file = %path.display(), error = %e, "the root file changed but is unusable; keeping the roots in force");
                "invalid"
            }
        };
        metrics.trust_root_reloads.get_or_create(&crate::metrics::OutcomeLabels { outcome: outcome.into() }).inc();
        seen = pem;
    }
}

/// The CA, the mesh's trust roots, and the root file with what it held (for an Istio CA).
pub type CertificateAuthority = (CaSource, TrustRoots, Option<(std::path::PathBuf, Vec<u8>)>);

/// Where workload certificates come from, per `cfg`: the local CA (its certificate is the mesh's root), or
/// an Istio CA (istiod) with the root file `CA_ROOT_CA`, returned with its contents so that a change to it
/// can be noticed. Also serves the lab's waypoint stand-in, which gets its certificate as a ztunnel does.
pub fn certificate_authority(cfg: &Config) -> anyhow::Result<CertificateAuthority> {
    let token = Some(cfg.auth_token.clone());
    Ok(match &cfg.local_ca {
        Some((cert, key)) => {
            let ca = LocalCa::load(cert, key, cfg.secret_ttl).context("loading the local CA")?;
            let roots = TrustRoots::new(&[ca.ca_cert()], &cfg.trust_domain)
                .map_err(|e| anyhow::anyhow!("CA certificate {}: {e}", cert.display()))?;
            (CaSource::Local(ca), roots, None)
        }
        None => {
            let path = &cfg.ca_root_ca;
            let pem = std::fs::read(path)
                .with_context(|| format!("CA_ROOT_CA {}: cannot read the mesh's root", path.display()))?;
            let roots = TrustRoots::from_pem(&pem, &cfg.trust_domain)
                .map_err(|e| anyhow::anyhow!("CA_ROOT_CA {}: {e}", path.display()))?;
            let target = Target {
                address: cfg.ca_address.clone(),
                root_ca: path.clone(),
                alt_hostname: cfg.alt_ca_hostname.clone(),
                token: token.clone(),
                cluster_id: cfg.cluster_id.clone(),
            };
            (CaSource::Istio(IstioCa::new(target, cfg.secret_ttl)), roots, Some((path.clone(), pem)))
        }
    })
}

/// Runs ztunnel until SIGTERM, SIGINT or `/quitquitquit`, then drains. `log` changes the log filter at runtime
/// (the admin endpoint's `/logging`).
pub async fn run(cfg: Config, log: Arc<dyn LogControl>) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let token = Some(cfg.auth_token.clone());
    let (ca, roots, root_file) = certificate_authority(&cfg)?;
    let roots = Arc::new(roots);
    let certs = CertStore::new(ca, roots.clone(), metrics.clone());
    info!(source = %certs.source(), "workload certificates come from this CA");

    let state = State::new();
    let mut xds_status = None;
    if let Some(path) = &cfg.local_xds_path {
        // A missing or broken file at start leaves ztunnel unready until a good version appears.
        let _ = state.load_file(path);
        state::watch(state.clone(), path.clone());
    } else if let Some(address) = &cfg.xds_address {
        let conn = Connection::new(Target {
            address: address.clone(),
            root_ca: cfg.xds_root_ca.clone(),
            alt_hostname: cfg.alt_xds_hostname.clone(),
            token: token.clone(),
            cluster_id: cfg.cluster_id.clone(),
        });
        let node =
            crate::xds::node(&cfg.instance_ip, &cfg.pod_name, &cfg.pod_namespace, &cfg.node_name, &cfg.cluster_id);
        let status = Arc::new(std::sync::Mutex::new(crate::xds::XdsStatus::default()));
        tokio::spawn(crate::xds::run(conn, node, state.clone(), metrics.clone(), status.clone()));
        xds_status = Some(status);
    }
    let workers = Workers::start(cfg.worker_threads, cfg.busy_poll).context("starting the worker threads")?;
    let ctx = Arc::new(ProxyCtx { cfg: cfg.clone(), state, certs: certs.clone(), roots, metrics, workers });
    let inpod = Inpod::new(ctx.clone());
    let quit = Arc::new(Notify::new());
    let admin_state =
        Arc::new(AdminState { ctx: ctx.clone(), inpod: inpod.clone(), log, quit: quit.clone(), xds: xds_status });
    admin::serve(cfg.admin_addr, Endpoint::Admin, admin_state.clone())
        .await
        .with_context(|| format!("admin on {}", cfg.admin_addr))?;
    admin::serve(cfg.stats_addr, Endpoint::Stats, admin_state.clone())
        .await
        .with_context(|| format!("metrics on {}", cfg.stats_addr))?;
    admin::serve(cfg.readiness_addr, Endpoint::Readiness, admin_state.clone())
        .await
        .with_context(|| format!("readiness on {}", cfg.readiness_addr))?;
    // No pod is taken before the first complete configuration is in force: with none, every destination would
    // look unknown and be passed through in plaintext, including the connections that waited in the pods'
    // listeners while ztunnel restarted. Until then the agent keeps the pods' listeners, and new pods wait.
    let (uds, served, inpod_ctx, config) = (cfg.inpod_uds.clone(), inpod.clone(), ctx.clone(), ctx.state.clone());
    tokio::spawn(async move {
        if config.status().generation == 0 {
            info!("waiting for the first complete configuration before serving pods");
            while config.status().generation == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            info!("configuration in force; serving pods");
        }
        inpod::run(uds, served, inpod_ctx).await
    });
    // Renewals and retries are due at their own times (half-life, backoff): look every second.
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            certs.refresh_due().await;
        }
    });
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            let _ = crate::heap::release_memory();
        }
    });
    if let Some((path, pem)) = root_file {
        tokio::spawn(watch_roots(path, pem, ctx.roots.clone(), ctx.metrics.clone()));
    }
    info!(node = %cfg.node_name, zds = %cfg.inpod_uds.display(), workers = cfg.worker_threads, "ztunnel started");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: draining"),
        _ = quit.notified() => info!("/quitquitquit: draining"),
    }
    let pods = inpod.lock().unwrap().stop_all();
    let deadline = cfg.termination_deadline + Duration::from_millis(500);
    let wait = async {
        for p in pods {
            let mut w = p.drain.watch();
            w.closed().await;
        }
    };
    let _ = tokio::time::timeout(deadline, wait).await;
    info!("drained; exiting");
    Ok(())
}
