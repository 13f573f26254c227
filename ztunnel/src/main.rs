//! The `ztunnel` binary: configured by Istio ztunnel's environment variables (see `ztunnel/README.md`).
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Notify;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::reload;
use ztunnel::admin::{self, AdminState, Endpoint, LogControl};
use ztunnel::certs::{CaSource, CertStore, LocalCa};
use ztunnel::config::Config;
use ztunnel::inpod::{self, Inpod};
use ztunnel::metrics::Metrics;
use ztunnel::proxy::ProxyCtx;
use ztunnel::state::{self, State};
use ztunnel::tls::TrustRoots;
use ztunnel::workers::Workers;

struct Filter {
    handle: reload::Handle<EnvFilter, tracing_subscriber::Registry>,
    current: std::sync::Mutex<String>,
}

impl LogControl for Filter {
    fn get(&self) -> String {
        self.current.lock().unwrap().clone()
    }

    fn set(&self, filter: &str) -> Result<(), String> {
        let f = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
        self.handle.reload(f).map_err(|e| e.to_string())?;
        *self.current.lock().unwrap() = filter.to_string();
        Ok(())
    }
}

fn main() {
    let initial = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let (filter, handle) = reload::Layer::new(EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new("info")));
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    let log = Arc::new(Filter { handle, current: std::sync::Mutex::new(initial) });

    let cfg = match Config::from_vars(|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            error!("invalid configuration: {e}");
            std::process::exit(1);
        }
    };
    // Freed buffers stay while traffic flows; each worker returns them when its traffic pauses.
    ztunnel::spin::tune_allocator();
    // The main thread runs the control plane (ZDS, admin, configuration); pods are served by the workers.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("building the runtime");
    if let Err(e) = rt.block_on(run(cfg, log)) {
        error!("{e:#}");
        std::process::exit(1);
    }
}

async fn run(cfg: Config, log: Arc<Filter>) -> anyhow::Result<()> {
    let (cert, key) = cfg.local_ca.clone().expect("checked by Config");
    let ca = LocalCa::load(&cert, &key, cfg.secret_ttl).context("loading the local CA")?;
    let roots = Arc::new(
        TrustRoots::new(&[ca.ca_cert()], &cfg.trust_domain)
            .map_err(|e| anyhow::anyhow!("CA certificate {}: {e}", cert.display()))?,
    );
    let certs = CertStore::new(CaSource::Local(ca));

    let state = State::new();
    if let Some(path) = &cfg.local_xds_path {
        // A missing or broken file at start leaves ztunnel unready until a good version appears.
        let _ = state.load_file(path);
        state::watch(state.clone(), path.clone());
    }
    let metrics = Metrics::new();
    let workers = Workers::start(cfg.worker_threads, cfg.busy_poll).context("starting the worker threads")?;
    let ctx = Arc::new(ProxyCtx { cfg: cfg.clone(), state, certs: certs.clone(), roots, metrics, workers });
    let inpod = Inpod::new(ctx.clone());
    let quit = Arc::new(Notify::new());
    let admin_state = Arc::new(AdminState { ctx: ctx.clone(), inpod: inpod.clone(), log, quit: quit.clone() });
    admin::serve(cfg.admin_addr, Endpoint::Admin, admin_state.clone())
        .await
        .with_context(|| format!("admin on {}", cfg.admin_addr))?;
    admin::serve(cfg.stats_addr, Endpoint::Stats, admin_state.clone())
        .await
        .with_context(|| format!("metrics on {}", cfg.stats_addr))?;
    admin::serve(cfg.readiness_addr, Endpoint::Readiness, admin_state.clone())
        .await
        .with_context(|| format!("readiness on {}", cfg.readiness_addr))?;
    tokio::spawn(inpod::run(cfg.inpod_uds.clone(), inpod.clone(), ctx.clone()));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            certs.refresh_due().await;
            let _ = ztunnel::spin::release_memory();
        }
    });
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
