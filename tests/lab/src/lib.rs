//! Ambit's lab: a cluster made of network namespaces, with the real CNI chain, agents and ztunnels, for the
//! end-to-end tests, the demo and the benchmark.
//!
//! Everything the lab makes carries a unique id and is removed on drop, also when a test panics;
//! [`lab::clean_stale`] removes what a killed run left behind.
#![deny(unsafe_code)]

pub mod bench;
pub mod bench_cp;
pub mod ca;
pub mod cluster;
pub mod cni;
pub mod controlplane;
pub mod demo;
pub mod kube;
pub mod lab;
pub mod load;
pub mod loadgen;
pub mod net;
pub mod netns;
pub mod pcap;
pub mod proc;
pub mod rate;
pub mod relay;
pub mod runtime;
pub mod soak;
pub mod sockmap;
pub mod util;
pub mod waypoint;

pub use lab::{Lab, LabConfig, Node, PeerZtunnel, Pod, PodError, PrimaryCni, Waypoint};
pub use netns::Netns;
pub use util::require_root;
