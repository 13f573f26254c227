//! The iptables form of the rules, for hosts that need it: `iptables-restore --noflush` input, one per family,
//! in the legacy or the nft flavour of iptables. Same behaviour as the nftables form.
//!
//! `--noflush` keeps everything that is not Ambit's. Declaring an Ambit chain in the input flushes it, so each
//! table's chains are rewritten atomically (one commit per table); the jumps from the built-in chains are added
//! only when the current ruleset (from `iptables-save`) lacks them, so re-applying never duplicates anything.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::net::IpAddr;

use ambit_proto::zds::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use super::{CONNMARK, DEBUG_PROBE_MARK, Family, MARK_MASK, UNCAPTURED_MARK, ZTUNNEL_MARK};

/// Ambit's chain hooked from PREROUTING (mangle and nat).
pub const PRERT: &str = "AMBIT_PRERT";
/// Ambit's chain hooked from OUTPUT (mangle and nat).
pub const OUTPUT: &str = "AMBIT_OUTPUT";
/// Ambit's chain hooked from the node's nat POSTROUTING.
pub const POSTRT: &str = "AMBIT_POSTRT";

/// (table, built-in chain, Ambit chain) of every jump a pod needs.
const POD_JUMPS: [(&str, &str, &str); 4] = [
    ("mangle", "PREROUTING", PRERT),
    ("mangle", "OUTPUT", OUTPUT),
    ("nat", "PREROUTING", PRERT),
    ("nat", "OUTPUT", OUTPUT),
];

/// What `iptables-save` shows of Ambit's rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    /// (table, chain) of Ambit chains that exist.
    pub chains: BTreeSet<(String, String)>,
    /// (table, built-in chain, target) of jumps to Ambit chains that exist, once per occurrence.
    pub jumps: Vec<(String, String, String)>,
}

impl Existing {
    /// Parses `iptables-save` output.
    pub fn parse(save: &str) -> Existing {
        let mut e = Existing::default();
        let mut table = String::new();
        for line in save.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t.trim().to_string();
            } else if let Some(rest) = line.strip_prefix(':') {
                let chain = rest.split_whitespace().next().unwrap_or_default();
                if chain.starts_with("AMBIT_") {
                    e.chains.insert((table.clone(), chain.to_string()));
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let mut words = rest.split_whitespace();
                let chain = words.next().unwrap_or_default();
                if !chain.starts_with("AMBIT_") && rest.ends_with(&format!("-j {PRERT}")) {
                    e.jumps.push((table.clone(), chain.to_string(), PRERT.into()));
                } else if !chain.starts_with("AMBIT_") && rest.ends_with(&format!("-j {OUTPUT}")) {
                    e.jumps.push((table.clone(), chain.to_string(), OUTPUT.into()));
                } else if !chain.starts_with("AMBIT_") && rest.ends_with(&format!("-j {POSTRT}")) {
                    e.jumps.push((table.clone(), chain.to_string(), POSTRT.into()));
                }
            }
        }
        e
    }

    fn has_jump(&self, table: &str, chain: &str, target: &str) -> bool {
        self.jumps.iter().any(|(t, c, g)| t == table && c == chain && g == target)
    }
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    }
}

/// The `iptables-restore --noflush` input that installs (or rewrites) a pod's rules for one family.
pub fn pod_restore(f: Family, existing: &Existing) -> String {
    let probe = host(f.probe_snat());
    let lo = f.loopback();
    let mark = format!("-m mark --mark {ZTUNNEL_MARK:#x}/{MARK_MASK:#x}");
    let not_mark = format!("-m mark ! --mark {ZTUNNEL_MARK:#x}/{MARK_MASK:#x}");
    let mut s = String::new();
    let w = &mut s;
    let jumps = |w: &mut String, table: &str| {
        for (t, chain, target) in POD_JUMPS {
            if t == table && !existing.has_jump(t, chain, target) {
                let _ = writeln!(w, "-A {chain} -j {target}");
            }
        }
    };
    let _ = writeln!(w, "*mangle");
    let _ = writeln!(w, ":{PRERT} - [0:0]");
    let _ = writeln!(w, ":{OUTPUT} - [0:0]");
    jumps(w, "mangle");
    let _ = writeln!(w, "-A {PRERT} {mark} -j CONNMARK --set-xmark {CONNMARK:#x}/{MARK_MASK:#x}");
    let _ = writeln!(
        w,
        "-A {OUTPUT} -m connmark --mark {CONNMARK:#x}/{MARK_MASK:#x} -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"
    );
    // The app's TCP leaves by lo (the loopback table); on connections that capture let through, by the pod's
    // own routes (mangle's OUTPUT routes a packet again when its mark changes).
    let _ = writeln!(
        w,
        "-A {OUTPUT} -o lo -p tcp -m tcp ! --syn -m mark --mark 0x0/{MARK_MASK:#x} -m conntrack ! --ctstate DNAT -m addrtype ! --dst-type LOCAL -j MARK --set-xmark {UNCAPTURED_MARK:#x}/{MARK_MASK:#x}"
    );
    let _ = writeln!(w, "COMMIT");
    let _ = writeln!(w, "*nat");
    let _ = writeln!(w, ":{PRERT} - [0:0]");
    let _ = writeln!(w, ":{OUTPUT} - [0:0]");
    jumps(w, "nat");
    let _ = writeln!(w, "-A {PRERT} -s {probe} -p tcp -j ACCEPT");
    let _ = writeln!(
        w,
        "-A {PRERT} ! -d {lo} -p tcp -m tcp ! --dport {INBOUND_HBONE_PORT} --syn {not_mark} -j REDIRECT --to-ports {INBOUND_PLAINTEXT_PORT}"
    );
    let _ = writeln!(w, "-A {OUTPUT} -d {probe} -p tcp -j ACCEPT");
    let _ = writeln!(w, "-A {OUTPUT} -p tcp -m mark --mark {CONNMARK:#x}/{MARK_MASK:#x} -j ACCEPT");
    let _ = writeln!(w, "-A {OUTPUT} -m addrtype --dst-type LOCAL -j ACCEPT");
    // Only first segments (--syn): connections open before enrolment, picked up mid-stream, are left alone.
    let _ = writeln!(w, "-A {OUTPUT} ! -d {lo} -p tcp -m tcp --syn {not_mark} -j REDIRECT --to-ports {OUTBOUND_PORT}");
    let _ = writeln!(w, "COMMIT");
    s
}

/// The input that removes every Ambit jump and chain that exists; empty when there is nothing to remove.
pub fn remove_restore(existing: &Existing) -> String {
    let mut s = String::new();
    for table in ["mangle", "nat"] {
        let jumps: Vec<_> = existing.jumps.iter().filter(|(t, _, _)| t == table).collect();
        let chains: Vec<_> = existing.chains.iter().filter(|(t, _)| t == table).collect();
        if jumps.is_empty() && chains.is_empty() {
            continue;
        }
        let _ = writeln!(s, "*{table}");
        for (_, chain, target) in jumps {
            let _ = writeln!(s, "-D {chain} -j {target}");
        }
        for (_, chain) in &chains {
            let _ = writeln!(s, "-F {chain}");
        }
        for (_, chain) in &chains {
            let _ = writeln!(s, "-X {chain}");
        }
        let _ = writeln!(s, "COMMIT");
    }
    s
}

/// Whether a pod's rules (chains and all four jumps) are in place.
pub fn pod_present(existing: &Existing) -> bool {
    POD_JUMPS
        .iter()
        .all(|(t, c, g)| existing.has_jump(t, c, g) && existing.chains.contains(&(t.to_string(), g.to_string())))
}

/// The ipset that holds enrolled pod IPs of one family on the node.
pub fn probe_ipset(f: Family) -> &'static str {
    match f {
        Family::V4 => "ambit-probes-v4",
        Family::V6 => "ambit-probes-v6",
    }
}

/// The node's probe rule for one family: locally originated TCP (`--socket-exists`: the kubelet, not forwarded
/// traffic) to an enrolled pod is SNATed to the probe address.
pub fn host_restore(f: Family, existing: &Existing) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "*nat");
    let _ = writeln!(s, ":{POSTRT} - [0:0]");
    if !existing.has_jump("nat", "POSTROUTING", POSTRT) {
        let _ = writeln!(s, "-I POSTROUTING 1 -j {POSTRT}");
    }
    let _ = writeln!(
        s,
        "-A {POSTRT} -p tcp -m mark ! --mark {DEBUG_PROBE_MARK:#x}/{MARK_MASK:#x} -m owner --socket-exists -m set --match-set {} dst -j SNAT --to-source {}",
        probe_ipset(f),
        f.probe_snat()
    );
    let _ = writeln!(s, "COMMIT");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "# Generated by iptables-save\n*mangle\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:AMBIT_PRERT - [0:0]\n:AMBIT_OUTPUT - [0:0]\n-A PREROUTING -j AMBIT_PRERT\n-A OUTPUT -j AMBIT_OUTPUT\n-A AMBIT_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:AMBIT_PRERT - [0:0]\n:AMBIT_OUTPUT - [0:0]\n-A PREROUTING -j AMBIT_PRERT\n-A OUTPUT -j AMBIT_OUTPUT\n-A OUTPUT -j KUBE-SOMETHING\nCOMMIT\n";

    #[test]
    fn parses_what_exists() {
        let e = Existing::parse(SAVED);
        assert_eq!(e.chains.len(), 4);
        assert_eq!(e.jumps.len(), 4);
        assert!(pod_present(&e));
        assert!(!pod_present(&Existing::default()));
    }

    #[test]
    fn reapplying_adds_no_jumps() {
        let fresh = pod_restore(Family::V4, &Existing::default());
        assert_eq!(fresh.matches("-A PREROUTING -j").count() + fresh.matches("-A OUTPUT -j").count(), 4);
        let again = pod_restore(Family::V4, &Existing::parse(SAVED));
        assert!(!again.contains("-A PREROUTING") && !again.contains("-A OUTPUT"));
    }

    #[test]
    fn removal_names_exactly_what_exists() {
        let r = remove_restore(&Existing::parse(SAVED));
        assert_eq!(r.matches("-D ").count(), 4);
        assert_eq!(r.matches("-X ").count(), 4);
        assert!(!r.contains("KUBE"));
        assert_eq!(remove_restore(&Existing::default()), "");
    }
}
