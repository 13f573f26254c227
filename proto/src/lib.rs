//! Wire protocols shared by Ambit's programs.
//!
//! - [`zds`]: the node agent → ztunnel protocol, wire-compatible with Istio's `istio.workload.zds`.
//! - [`seqpacket`] (feature `transport`): the unix `SOCK_SEQPACKET` transport ZDS runs on, with fd passing.
//! - [`control_plane`] (feature `grpc`): Istio's CA service and delta xDS, with the workload and authorization
//!   resources ztunnel takes from istiod.
//! - [`cni_api`]: Ambit's own versioned JSON API between the CNI plugin and the node agent.
#![deny(unsafe_code)]

pub mod cni_api;
#[cfg(feature = "grpc")]
pub mod control_plane;
#[cfg(feature = "transport")]
pub mod seqpacket;
pub mod zds;
