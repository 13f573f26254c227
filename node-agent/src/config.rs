//! The agent's configuration: a YAML file, with the few settings an operator overrides per node also taken
//! from flags and environment variables.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::enrol::StandalonePolicy;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// This node's name (`NODE_NAME`).
    #[serde(default)]
    pub node_name: String,
    /// Where the CNI plugin reaches the agent.
    #[serde(default = "default_cni_socket")]
    pub cni_socket: PathBuf,
    /// Where ztunnel connects for ZDS (`INPOD_UDS` on ztunnel's side).
    #[serde(default = "default_zds_socket")]
    pub zds_socket: PathBuf,
    /// Where the agent records enrolled pods so that a restarted agent finds them again.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// How long to wait for ztunnel's answer to one ZDS message, in milliseconds.
    #[serde(default = "default_zds_timeout_ms")]
    pub zds_timeout_ms: u64,
    /// How often to look for pods whose netns vanished without a CNI DEL, in milliseconds (0: never).
    #[serde(default = "default_sweep_interval_ms")]
    pub sweep_interval_ms: u64,
    /// `standalone` (enrolment from this file) or `kubernetes` (labels, through the API).
    #[serde(default)]
    pub mode: Mode,
    /// Which pods are enrolled when there is no Kubernetes API (standalone mode).
    #[serde(default)]
    pub standalone: StandalonePolicy,
    /// Kubernetes mode's settings.
    #[serde(default)]
    pub kubernetes: crate::k8s::KubeConfig,
    /// `nftables` (default) or `iptables`.
    #[serde(default)]
    pub rule_backend: RuleBackend,
    /// For the iptables backend: `auto` (the flavour the node already uses), `legacy` or `nft`.
    #[serde(default)]
    pub iptables_flavor: FlavorChoice,
    /// SNAT the node's own connections to enrolled pods (kubelet probes) to 169.254.7.127 so they bypass
    /// capture. On by default; off for clusters whose probes must keep their source address.
    #[serde(default = "default_true")]
    pub host_probe_snat: bool,
    /// Route each enrolled pod's own TCP through `lo` (`ip rule fwmark 0/0xfff ipproto tcp lookup 101`), so its
    /// captured connections cross loopback in 64 KiB segments rather than the pod interface's. On by default;
    /// off for pods whose own policy routing it would conflict with. A change takes effect on the pods already
    /// enrolled when the agent restarts (or repairs them).
    #[serde(default = "default_true")]
    pub loopback_route: bool,
    /// Installing and chaining the CNI plugin.
    #[serde(default)]
    pub install: crate::installer::InstallConfig,
    /// Where `/readyz` and `/metrics` are served.
    #[serde(default = "default_health_addr")]
    pub health_addr: std::net::SocketAddr,
}

fn default_health_addr() -> std::net::SocketAddr {
    "[::]:15014".parse().expect("valid address")
}

/// Where enrolment decisions come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The agent's config file.
    #[default]
    Standalone,
    /// Pod and namespace labels, through the Kubernetes API.
    Kubernetes,
}

/// Which rule backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleBackend {
    /// Native nftables.
    #[default]
    Nftables,
    /// iptables-restore.
    Iptables,
}

/// Which iptables flavour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlavorChoice {
    /// Detect it from the node's existing rules.
    #[default]
    Auto,
    /// iptables-legacy.
    Legacy,
    /// iptables-nft.
    Nft,
}

fn default_true() -> bool {
    true
}

impl Config {
    /// The backend to use, detecting the iptables flavour if asked to (run in the node's netns).
    pub fn backend(&self) -> crate::rules::Backend {
        use crate::rules::{Backend, Flavor};
        match (self.rule_backend, self.iptables_flavor) {
            (RuleBackend::Nftables, _) => Backend::Nftables,
            (RuleBackend::Iptables, FlavorChoice::Legacy) => Backend::Iptables(Flavor::Legacy),
            (RuleBackend::Iptables, FlavorChoice::Nft) => Backend::Iptables(Flavor::Nft),
            (RuleBackend::Iptables, FlavorChoice::Auto) => Backend::Iptables(crate::rules::backend::detect_flavor()),
        }
    }
}

fn default_cni_socket() -> PathBuf {
    PathBuf::from(ambit_proto::cni_api::DEFAULT_SOCKET)
}
fn default_zds_socket() -> PathBuf {
    PathBuf::from(ambit_proto::zds::DEFAULT_SOCKET)
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/run/ambit/pods")
}
fn default_zds_timeout_ms() -> u64 {
    5000
}
fn default_sweep_interval_ms() -> u64 {
    10_000
}

impl Default for Config {
    fn default() -> Self {
        serde_yaml_ng::from_str("{}").expect("the empty config is valid")
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path).with_context(|| format!("reading agent config {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("agent config {}", path.display()))
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let c: Config = serde_yaml_ng::from_str(text)?;
        if c.zds_timeout_ms == 0 {
            anyhow::bail!("zdsTimeoutMs must be positive");
        }
        c.standalone.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = Config::default();
        assert_eq!(c.cni_socket, PathBuf::from("/var/run/ambit/cni.sock"));
        assert_eq!(c.zds_socket, PathBuf::from("/var/run/ztunnel/ztunnel.sock"));
        let c = Config::parse("nodeName: n1\nstandalone:\n  enrolledNamespaces: [demo]\n").unwrap();
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.standalone.enrolled_namespaces, vec!["demo"]);
    }

    #[test]
    fn typos_are_errors() {
        assert!(Config::parse("nodeNmae: n1").is_err());
        assert!(Config::parse("zdsTimeoutMs: 0").is_err());
        assert!(Config::parse("standalone: {pods: [{namespace: a, name: b, mode: sideways}]}").is_err());
        assert!(Config::parse("ruleBackend: ebpf").is_err());
        let c = Config::parse("ruleBackend: iptables\niptablesFlavor: legacy\nhostProbeSnat: false").unwrap();
        assert_eq!(c.backend(), crate::rules::Backend::Iptables(crate::rules::Flavor::Legacy));
        assert!(!c.host_probe_snat);
        assert!(c.loopback_route, "the loopback route is on by default");
        assert!(!Config::parse("loopbackRoute: false").unwrap().loopback_route);
        assert!(Config::parse("loopbackRoute: maybe").is_err());
    }
}
