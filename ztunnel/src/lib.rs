//! Ambit's ztunnel: the per-node L4 mesh proxy in in-pod mode.
//!
//! The node agent hands it each enrolled pod over ZDS ([`inpod`]); it serves each pod from inside the pod's
//! own netns ([`proxy`]): outbound TCP goes over HBONE — HTTP/2 CONNECT inside mutual TLS with SPIFFE
//! identities ([`tls`], [`certs`]) — to the destination pod's ztunnel on 15008, which validates it
//! ([`hbone`]) and connects to the app with the client's IP. Workloads come from Istio's local file format
//! ([`state`]); metrics are Istio's ([`metrics`]); control endpoints are in [`admin`].

#![deny(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod ca;
pub mod certs;
pub mod config;
pub mod controlplane;
pub mod hbone;
pub mod identity;
pub mod inpod;
pub mod metrics;
pub mod proxy;
pub mod socket;
pub mod spin;
pub mod state;
mod sys;
pub mod tls;
pub mod workers;
pub mod xds;

/// Helpers shared by the unit tests.
#[cfg(test)]
pub(crate) mod testing {
    /// Cases per property test: 256, or `AMBIT_PROPTEST_CASES` (a nightly run's long mode).
    pub fn proptest_cases() -> u32 {
        std::env::var("AMBIT_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
    }
}
