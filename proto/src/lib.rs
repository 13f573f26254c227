//! Wire protocols shared by Ambit's programs.
//!
//! - [`zds`]: the node agent → ztunnel protocol, wire-compatible with Istio's `istio.workload.zds`.
//! - [`seqpacket`] (feature `transport`): the unix `SOCK_SEQPACKET` transport ZDS runs on, with fd passing.
//! - [`host`] (feature `transport`): what the agent and ztunnel both do on the host: in-pod listeners,
//!   checking a netns descriptor, watching a directory.
//! - [`control_plane`] (feature `grpc`): Istio's CA service and delta xDS, with the workload and authorization
//!   resources ztunnel takes from istiod.
//! - [`cni_api`]: Ambit's own versioned JSON API between the CNI plugin and the node agent.
#![deny(unsafe_code)]

pub mod cni_api;
#[cfg(feature = "grpc")]
pub mod control_plane;
#[cfg(feature = "transport")]
pub mod host;
#[cfg(feature = "transport")]
pub mod seqpacket;
pub mod zds;

/// Helpers shared by the unit tests.
#[cfg(test)]
pub(crate) mod testing {
    /// Cases per property test: 256, or `AMBIT_PROPTEST_CASES` (a nightly run's long mode).
    pub fn proptest_cases() -> u32 {
        std::env::var("AMBIT_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
    }
}
