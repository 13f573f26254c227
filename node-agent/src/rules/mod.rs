//! In-pod traffic redirection: the rules, as values that can be printed and golden-tested, and their application
//! inside a pod netns.
//!
//! The behaviour is Istio's in-pod contract (DESIGN.md, "Marks and routing"), so Istio's ztunnel works behind
//! these rules and Ambit's ztunnel works behind Istio's:
//! - packets of sockets ztunnel creates carry mark `0x539/0xfff` and are never captured;
//! - their connections are connmarked `0x111/0xfff`, the mark is restored on the app's replies and policy
//!   routing (`fwmark 0x111/0xfff lookup 100`, `local default dev lo table 100`) sends those replies back to
//!   ztunnel even though they are addressed to another pod's IP;
//! - outbound TCP not to loopback is redirected to 15001, inbound TCP not to 15008 to 15006;
//! - kubelet probes, SNATed on the node to 169.254.7.127, bypass capture.
//!
//! Ambit adds one thing to that contract, for speed: the app's own TCP is routed through `lo`
//! (`fwmark 0/0xfff ipproto tcp lookup 101`, `default dev lo table 101`). The redirect rewrites a connection's
//! destination only after its socket has chosen a route; routed by the pod's interface, an app's socket would
//! cut its segments to ztunnel to that interface's MTU (1448 bytes on a 1500-byte pod network) although they
//! only cross loopback. Through `lo` they are up to 64 KiB, both ways: the app's socket to 15001, and the
//! server app's socket that ztunnel connects to (it answers an address of another pod). The app's packets on
//! connections that capture lets through (open before enrolment, kubelet's probes) are marked
//! [`UNCAPTURED_MARK`] and so take the pod's own routes again. ztunnel's sockets are marked and never take the
//! loopback route. Needs Linux 4.17 (`ipproto` in routing rules). The agent's `loopbackRoute: false` leaves it
//! out (and takes it out of pods that have it), for pods whose own policy routing it would conflict with. The
//! rules stay the same: without the route, the mark they give uncaptured connections changes nothing.

pub mod apply;
pub mod backend;
pub mod host;
pub mod iptables;
pub mod nft;
pub mod routing;

pub use backend::{Backend, Flavor};
pub use nft::{nft_apply_script, nft_delete_script};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Mark on every socket ztunnel creates in a pod netns.
pub const ZTUNNEL_MARK: u32 = 0x539;
/// The part of the mark Ambit (and Istio) own.
pub const MARK_MASK: u32 = 0xfff;
/// Connmark of connections ztunnel opened to the app.
pub const CONNMARK: u32 = 0x111;
/// Mark of `ambit-agent debug`'s inbound probe from the node: the node's probe SNAT leaves it alone, so it
/// reaches the pod as any client's connection does and takes the captured inbound path. Marks do not cross
/// into the pod's netns.
pub const DEBUG_PROBE_MARK: u32 = 0x53a;
/// Routing table that delivers marked replies locally.
pub const ROUTE_TABLE: u32 = 100;
/// Priority of the policy routing rule.
pub const RULE_PRIORITY: u32 = 32764;
/// Routing table that sends the app's TCP through `lo`, where capture hands it to ztunnel.
pub const LOOPBACK_TABLE: u32 = 101;
/// Priority of the rule for [`LOOPBACK_TABLE`]: after the replies' rule, before the main table.
pub const LOOPBACK_RULE_PRIORITY: u32 = 32765;
/// Mark of the app's packets on connections that capture let through (open before the pod was enrolled,
/// kubelet's probes): it keeps them off [`LOOPBACK_TABLE`], on the pod's own routes.
pub const UNCAPTURED_MARK: u32 = 0x53b;
/// Where the node SNATs kubelet probes to, IPv4.
pub const PROBE_SNAT_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// Where the node SNATs kubelet probes to, IPv6.
pub const PROBE_SNAT_V6: Ipv6Addr = Ipv6Addr::new(0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff);
/// The nftables table (family `inet`) that holds all of a pod's rules.
pub const NFT_TABLE: &str = "ambit";

/// What a pod's rules depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InpodConfig {
    /// The pod has IPv4 addresses.
    pub ipv4: bool,
    /// The pod has IPv6 addresses.
    pub ipv6: bool,
    /// The app's TCP is routed through `lo` ([`LOOPBACK_TABLE`]); the agent's `loopbackRoute`, on by default.
    pub loopback_route: bool,
}

impl InpodConfig {
    /// The config for a pod with these addresses (IPv4 only when none are known), with the loopback route.
    pub fn for_ips(ips: &[IpAddr]) -> InpodConfig {
        let ipv6 = ips.iter().any(IpAddr::is_ipv6);
        let ipv4 = ips.iter().any(IpAddr::is_ipv4) || !ipv6;
        InpodConfig { ipv4, ipv6, loopback_route: true }
    }

    /// The same config, with the loopback route on or off.
    pub fn with_loopback_route(self, on: bool) -> InpodConfig {
        InpodConfig { loopback_route: on, ..self }
    }
}

/// IPv4 or IPv6, with what the rules need to know about each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The families a pod's rules cover.
    pub fn of(cfg: InpodConfig) -> Vec<Family> {
        let mut v = Vec::new();
        if cfg.ipv4 {
            v.push(Family::V4);
        }
        if cfg.ipv6 {
            v.push(Family::V6);
        }
        v
    }

    /// Loopback, as a prefix.
    pub fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    /// Where the node SNATs kubelet probes to.
    pub fn probe_snat(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(PROBE_SNAT_V4),
            Family::V6 => IpAddr::V6(PROBE_SNAT_V6),
        }
    }

    /// The family of an address.
    pub fn of_ip(ip: IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_choice() {
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        let c = |ipv4, ipv6| InpodConfig { ipv4, ipv6, loopback_route: true };
        assert_eq!(InpodConfig::for_ips(&[v4]), c(true, false));
        assert_eq!(InpodConfig::for_ips(&[v6]), c(false, true));
        assert_eq!(InpodConfig::for_ips(&[v4, v6]), c(true, true));
        assert_eq!(InpodConfig::for_ips(&[]), c(true, false));
        assert!(!InpodConfig::for_ips(&[v4]).with_loopback_route(false).loopback_route);
    }
}

/// Why a pod's redirection could not be installed, checked or removed.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The packet-filter rules (nftables or iptables).
    #[error(transparent)]
    Apply(#[from] apply::ApplyError),
    /// The policy routing.
    #[error(transparent)]
    Routing(#[from] routing::RoutingError),
    /// The pod's listening sockets.
    #[error("creating listeners: {0}")]
    Listeners(std::io::Error),
}

/// Installs a pod's rules and routing in the calling thread's netns (idempotent).
pub fn install_pod(backend: Backend, cfg: InpodConfig) -> Result<(), RuleError> {
    backend.install_pod(cfg)?;
    routing::install(cfg)?;
    Ok(())
}

/// Reinstalls a pod's rules and routing in the calling thread's netns, replacing what is there: for nftables
/// the whole table in one transaction (chains added by hand go too), for iptables Ambit's chains rewritten and
/// missing jumps added.
pub fn repair_pod(backend: Backend, cfg: InpodConfig) -> Result<(), RuleError> {
    backend.repair_pod(cfg)?;
    routing::install(cfg)?;
    Ok(())
}

/// Removes a pod's rules and routing from the calling thread's netns (absent is fine).
///
/// Routing goes first, as it came last: the loopback route without the redirect behind it would take the app's
/// new connections nowhere, while the redirect without the route still captures them.
pub fn remove_pod(backend: Backend, cfg: InpodConfig) -> Result<(), RuleError> {
    routing::remove(cfg)?;
    backend.remove_pod(cfg)?;
    Ok(())
}

/// Whether a pod's rules and routing are all in the calling thread's netns.
pub fn pod_present(backend: Backend, cfg: InpodConfig) -> Result<bool, RuleError> {
    Ok(backend.pod_present(cfg)? && routing::present(cfg)?)
}
