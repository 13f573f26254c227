//! The `ztunnel` binary: configured by Istio ztunnel's environment variables (see `ztunnel/README.md`).
#![forbid(unsafe_code)]

use std::sync::Arc;

use tracing::error;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::reload;
use ztunnel::LogControl;
use ztunnel::config::Config;

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
    ztunnel::app::prepare_process();
    // The main thread runs the control plane (ZDS, admin, configuration); pods are served by the workers.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("building the runtime");
    if let Err(e) = rt.block_on(ztunnel::app::run(cfg, log)) {
        error!("{e:#}");
        std::process::exit(1);
    }
}
