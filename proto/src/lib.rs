//! Wire protocols shared by Ambit's programs.
//!
//! - [`zds`]: the node agent → ztunnel protocol, wire-compatible with Istio's `istio.workload.zds`.
//! - [`cni_api`]: Ambit's own versioned JSON API between the CNI plugin and the node agent.
#![forbid(unsafe_code)]

pub mod cni_api;
pub mod zds;
