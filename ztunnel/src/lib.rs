//! Ambit's ztunnel: the per-node L4 mesh proxy in in-pod mode.
//!
//! [`app`] runs the process. The node agent hands it each enrolled pod over ZDS (`inpod`); it serves each pod
//! from inside the pod's own netns (`proxy`, which asks for the pod's sockets through
//! `socket::PodSockets`, implemented by `inpod`): outbound TCP goes over HBONE — HTTP/2 CONNECT inside
//! mutual TLS with SPIFFE identities (`hbone`, client and server sides; [`tls`]; certificates from the CA, [`certs`], [`ca`], [`controlplane`])
//! — to the destination pod's ztunnel on 15008, which validates it and connects to the app with the
//! client's IP. Workloads, services and policies come from istiod's delta xDS ([`xds`]) or Istio's local
//! file, into [`state`]; metrics are Istio's (`metrics`); control endpoints are in `admin`. Workers busy-poll
//! while traffic flows (`busy_poll`) and give memory back when it pauses (`heap`); the only `unsafe` code is
//! in `sys`.

#![deny(unsafe_code)]

// The binary's entry point, and what the lab drives directly (the CA client, certificates, configuration,
// identities, workload state, TLS, xDS). Everything else is internal, so unused code shows.
pub mod app;
pub mod ca;
pub mod certs;
pub mod config;
pub mod controlplane;
pub mod identity;
pub mod state;
pub mod tls;
pub mod xds;

pub(crate) mod admin;
pub(crate) mod authz;
pub(crate) mod busy_poll;
pub(crate) mod hbone;
pub(crate) mod heap;
pub(crate) mod inpod;
pub(crate) mod metrics;
pub(crate) mod proxy;
pub(crate) mod socket;
mod sys;
pub(crate) mod workers;

pub use admin::LogControl;
pub use metrics::Metrics;
#[doc(hidden)]
pub use metrics::{BenchVariant, bench_conn_records};
#[doc(hidden)]
pub use proxy::bench::{DataPath, PathCost, bench_data_path};

/// Helpers shared by the unit tests.
#[cfg(test)]
pub(crate) mod testing {
    /// Cases per property test: 256, or `AMBIT_PROPTEST_CASES` (a nightly run's long mode).
    pub fn proptest_cases() -> u32 {
        std::env::var("AMBIT_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
    }
}
