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

pub mod apply;
pub mod routing;

use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ambit_proto::zds::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

/// Mark on every socket ztunnel creates in a pod netns.
pub const ZTUNNEL_MARK: u32 = 0x539;
/// The part of the mark Ambit (and Istio) own.
pub const MARK_MASK: u32 = 0xfff;
/// Connmark of connections ztunnel opened to the app.
pub const CONNMARK: u32 = 0x111;
/// Routing table that delivers marked replies locally.
pub const ROUTE_TABLE: u32 = 100;
/// Priority of the policy routing rule.
pub const RULE_PRIORITY: u32 = 32764;
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
}

impl InpodConfig {
    /// The config for a pod with these addresses (IPv4 only when none are known).
    pub fn for_ips(ips: &[IpAddr]) -> InpodConfig {
        let ipv6 = ips.iter().any(IpAddr::is_ipv6);
        let ipv4 = ips.iter().any(IpAddr::is_ipv4) || !ipv6;
        InpodConfig { ipv4, ipv6 }
    }
}

/// One address family's view of the rules.
struct Family {
    /// nft's protocol selector for addresses (`ip` or `ip6`).
    sel: &'static str,
    loopback: &'static str,
    probe: IpAddr,
}

fn families(cfg: InpodConfig) -> Vec<Family> {
    let mut v = Vec::new();
    if cfg.ipv4 {
        v.push(Family { sel: "ip", loopback: "127.0.0.0/8", probe: IpAddr::V4(PROBE_SNAT_V4) });
    }
    if cfg.ipv6 {
        v.push(Family { sel: "ip6", loopback: "::1", probe: IpAddr::V6(PROBE_SNAT_V6) });
    }
    v
}

/// The nft script that installs (or replaces) a pod's rules in one atomic transaction. Running it again is a
/// no-op in effect: the table is created if absent, deleted, and defined afresh, all in the same transaction,
/// so there is never a moment without capture and never a duplicate rule.
pub fn nft_apply_script(cfg: InpodConfig) -> String {
    let fams = families(cfg);
    let not_ztunnel = format!("meta mark & {MARK_MASK:#x} != {ZTUNNEL_MARK:#x}");
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "add table inet {NFT_TABLE}");
    let _ = writeln!(w, "delete table inet {NFT_TABLE}");
    let _ = writeln!(w, "table inet {NFT_TABLE} {{");

    let _ = writeln!(w, "  chain prerouting_mangle {{");
    let _ = writeln!(w, "    type filter hook prerouting priority mangle; policy accept;");
    let _ = writeln!(w, "    # Remember the connections ztunnel opened to the app.");
    let _ = writeln!(
        w,
        "    meta mark & {MARK_MASK:#x} == {ZTUNNEL_MARK:#x} ct mark set ct mark & {:#x} | {CONNMARK:#x}",
        !MARK_MASK
    );
    let _ = writeln!(w, "  }}");

    let _ = writeln!(w, "  chain output_mangle {{");
    let _ = writeln!(w, "    type route hook output priority mangle; policy accept;");
    let _ = writeln!(
        w,
        "    # Replies on those connections carry the mark, so table {ROUTE_TABLE} returns them to ztunnel."
    );
    let _ = writeln!(w, "    ct mark & {MARK_MASK:#x} == {CONNMARK:#x} meta mark set ct mark");
    let _ = writeln!(w, "  }}");

    let _ = writeln!(w, "  chain prerouting_nat {{");
    let _ = writeln!(w, "    type nat hook prerouting priority dstnat; policy accept;");
    for f in &fams {
        let _ = writeln!(w, "    meta l4proto tcp {} saddr {} accept", f.sel, f.probe);
    }
    for f in &fams {
        let _ = writeln!(
            w,
            "    meta l4proto tcp {} daddr != {} tcp dport != {INBOUND_HBONE_PORT} {not_ztunnel} redirect to :{INBOUND_PLAINTEXT_PORT}",
            f.sel, f.loopback
        );
    }
    let _ = writeln!(w, "  }}");

    let _ = writeln!(w, "  chain output_nat {{");
    let _ = writeln!(w, "    type nat hook output priority -100; policy accept;");
    for f in &fams {
        let _ = writeln!(w, "    meta l4proto tcp {} daddr {} accept", f.sel, f.probe);
    }
    let _ = writeln!(w, "    meta l4proto tcp meta mark & {MARK_MASK:#x} == {CONNMARK:#x} accept");
    for f in &fams {
        let _ = writeln!(w, "    oifname \"lo\" {} daddr != {} accept", f.sel, f.loopback);
    }
    for f in &fams {
        let _ = writeln!(
            w,
            "    meta l4proto tcp {} daddr != {} {not_ztunnel} redirect to :{OUTBOUND_PORT}",
            f.sel, f.loopback
        );
    }
    let _ = writeln!(w, "  }}");
    let _ = writeln!(w, "}}");
    s
}

/// The nft script that removes a pod's rules; succeeds whether or not they exist.
pub fn nft_delete_script() -> String {
    format!("add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_choice() {
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(InpodConfig::for_ips(&[v4]), InpodConfig { ipv4: true, ipv6: false });
        assert_eq!(InpodConfig::for_ips(&[v6]), InpodConfig { ipv4: false, ipv6: true });
        assert_eq!(InpodConfig::for_ips(&[v4, v6]), InpodConfig { ipv4: true, ipv6: true });
        assert_eq!(InpodConfig::for_ips(&[]), InpodConfig { ipv4: true, ipv6: false });
    }

    #[test]
    fn script_is_deterministic() {
        let c = InpodConfig { ipv4: true, ipv6: true };
        assert_eq!(nft_apply_script(c), nft_apply_script(c));
        assert!(nft_apply_script(c).starts_with("add table inet ambit\ndelete table inet ambit\n"));
    }
}
