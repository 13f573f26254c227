//! The nftables form of the rules: one `inet` table per pod netns, and one on the node for kubelet probes.

use std::fmt::Write;
use std::net::IpAddr;

use ambit_proto::zds::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use super::{
    CONNMARK, DEBUG_PROBE_MARK, Family, InpodConfig, LOOPBACK_TABLE, MARK_MASK, NFT_TABLE, ROUTE_TABLE,
    UNCAPTURED_MARK, ZTUNNEL_MARK,
};

/// Only a connection's first segment is redirected. Connections that were open before the pod was enrolled
/// are picked up by conntrack mid-stream once rules exist; redirecting those would reset them.
const SYN_ONLY: &str = "tcp flags & (fin | syn | rst | ack) == syn";

/// The node's table for kubelet probes.
pub const HOST_TABLE: &str = "ambit-host";

fn sel(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// Creates the table if absent and deletes it, inside the same transaction as what follows: the idiom that
/// makes a whole-table replacement idempotent and atomic.
fn replace_table(w: &mut String, table: &str) {
    let _ = writeln!(w, "add table inet {table}");
    let _ = writeln!(w, "delete table inet {table}");
}

/// The nft script that installs (or refreshes) a pod's rules in one atomic transaction. Running it again is a
/// no-op in effect: the table is created if absent and emptied of rules, and the chains (kept, with their hooks)
/// get their rules afresh, all in the same transaction, so there is never a moment without capture and never a
/// duplicate rule. Keeping the chains matters for speed: unregistering a hook makes the kernel wait for an RCU
/// grace period, which costs a new pod's ADD some 10 ms.
pub fn nft_apply_script(cfg: InpodConfig) -> String {
    pod_script(cfg, false)
}

/// The same rules, replacing the whole table: for when the chains themselves changed (an upgrade), which the
/// refresh form refuses.
pub fn nft_replace_script(cfg: InpodConfig) -> String {
    pod_script(cfg, true)
}

fn pod_script(cfg: InpodConfig, replace: bool) -> String {
    let fams = Family::of(cfg);
    let not_ztunnel = format!("meta mark & {MARK_MASK:#x} != {ZTUNNEL_MARK:#x}");
    let mut s = String::new();
    let w = &mut s;
    if replace {
        replace_table(w, NFT_TABLE);
    } else {
        let _ = writeln!(w, "add table inet {NFT_TABLE}");
        let _ = writeln!(w, "flush table inet {NFT_TABLE}");
    }
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
    let _ = writeln!(
        w,
        "    # The app's TCP leaves by lo (table {LOOPBACK_TABLE}); connections that capture lets through (no redirect) take the pod's own routes after their first segment."
    );
    let _ = writeln!(
        w,
        "    meta l4proto tcp meta mark & {MARK_MASK:#x} == 0 oifname \"lo\" tcp flags & (fin | syn | rst | ack) != syn ct status & dnat == 0 fib daddr type != local meta mark set meta mark & {:#x} | {UNCAPTURED_MARK:#x}",
        !MARK_MASK
    );
    let _ = writeln!(w, "  }}");

    let _ = writeln!(w, "  chain prerouting_nat {{");
    let _ = writeln!(w, "    type nat hook prerouting priority dstnat; policy accept;");
    for &f in &fams {
        let _ = writeln!(w, "    meta l4proto tcp {} saddr {} accept", sel(f), f.probe_snat());
    }
    for &f in &fams {
        let _ = writeln!(
            w,
            "    meta l4proto tcp {} daddr != {} tcp dport != {INBOUND_HBONE_PORT} {SYN_ONLY} {not_ztunnel} redirect to :{INBOUND_PLAINTEXT_PORT}",
            sel(f),
            f.loopback()
        );
    }
    let _ = writeln!(w, "  }}");

    let _ = writeln!(w, "  chain output_nat {{");
    let _ = writeln!(w, "    type nat hook output priority -100; policy accept;");
    for &f in &fams {
        let _ = writeln!(w, "    meta l4proto tcp {} daddr {} accept", sel(f), f.probe_snat());
    }
    let _ = writeln!(w, "    meta l4proto tcp meta mark & {MARK_MASK:#x} == {CONNMARK:#x} accept");
    // The pod's own addresses stay local. (Not "by lo": the app's TCP to anywhere leaves by lo.)
    let _ = writeln!(w, "    fib daddr type local accept");
    for &f in &fams {
        let _ = writeln!(
            w,
            "    meta l4proto tcp {} daddr != {} {SYN_ONLY} {not_ztunnel} redirect to :{OUTBOUND_PORT}",
            sel(f),
            f.loopback()
        );
    }
    let _ = writeln!(w, "  }}");
    let _ = writeln!(w, "}}");
    s
}

/// The nft script that removes a pod's rules; succeeds whether or not they exist.
pub fn nft_delete_script() -> String {
    let mut s = String::new();
    replace_table(&mut s, NFT_TABLE);
    s
}

/// The set of enrolled pod IPs of one family on the node.
pub fn probe_set(f: Family) -> &'static str {
    match f {
        Family::V4 => "probes-v4",
        Family::V6 => "probes-v6",
    }
}

/// The node's probe rules, replacing any previous version, with the set filled with `ips`.
///
/// A connection the node itself originates (source address local to the node — the kubelet's probes, unlike
/// forwarded pod traffic) to an enrolled pod is SNATed to 169.254.7.127 (or the IPv6 twin), which the pod's
/// rules let through uncaptured. `ambit-agent debug`'s marked inbound probe is left alone.
pub fn host_apply_script(ips: &[IpAddr]) -> String {
    let mut s = String::new();
    let w = &mut s;
    replace_table(w, HOST_TABLE);
    let _ = writeln!(w, "table inet {HOST_TABLE} {{");
    for (f, ty) in [(Family::V4, "ipv4_addr"), (Family::V6, "ipv6_addr")] {
        let _ = writeln!(w, "  set {} {{", probe_set(f));
        let _ = writeln!(w, "    type {ty};");
        let members: Vec<String> = ips.iter().filter(|ip| Family::of_ip(**ip) == f).map(ToString::to_string).collect();
        if !members.is_empty() {
            let _ = writeln!(w, "    elements = {{ {} }}", members.join(", "));
        }
        let _ = writeln!(w, "  }}");
    }
    let _ = writeln!(w, "  chain postrouting {{");
    let _ = writeln!(w, "    type nat hook postrouting priority srcnat; policy accept;");
    for f in [Family::V4, Family::V6] {
        let _ = writeln!(
            w,
            "    meta l4proto tcp meta mark & {MARK_MASK:#x} != {DEBUG_PROBE_MARK:#x} fib saddr type local {} daddr @{} snat {} to {}",
            sel(f),
            probe_set(f),
            sel(f),
            f.probe_snat()
        );
    }
    let _ = writeln!(w, "  }}");
    let _ = writeln!(w, "}}");
    s
}

/// Adds (`add`) or removes one pod IP from the node's probe set. Adding an element already there, and removing
/// one that is not, both succeed (`add`/`destroy` semantics via a no-op guard).
pub fn host_set_element(ip: IpAddr, add: bool) -> String {
    let set = probe_set(Family::of_ip(ip));
    if add {
        format!("add element inet {HOST_TABLE} {set} {{ {ip} }}\n")
    } else {
        // `delete` fails on a missing element; adding it first makes the pair idempotent in one transaction.
        format!("add element inet {HOST_TABLE} {set} {{ {ip} }}\ndelete element inet {HOST_TABLE} {set} {{ {ip} }}\n")
    }
}

/// Removes the node's probe rules.
pub fn host_delete_script() -> String {
    let mut s = String::new();
    replace_table(&mut s, HOST_TABLE);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_are_deterministic() {
        let c = InpodConfig { ipv4: true, ipv6: true, loopback_route: true };
        assert_eq!(nft_apply_script(c), nft_apply_script(c));
        assert!(nft_apply_script(c).starts_with("add table inet ambit\nflush table inet ambit\n"));
        assert!(nft_replace_script(c).starts_with("add table inet ambit\ndelete table inet ambit\n"));
        let h = host_apply_script(&["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()]);
        assert!(h.contains("elements = { 10.0.0.1 }") && h.contains("elements = { fd00::1 }"));
        assert!(
            host_set_element("fd00::2".parse().unwrap(), false).contains("delete element inet ambit-host probes-v6")
        );
    }
}
