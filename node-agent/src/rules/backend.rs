//! The two rule backends — native nftables (default) and iptables (legacy or nft flavour) — behind one
//! interface. Pod methods run on a thread inside the pod's netns; host methods in the node's.

use std::net::IpAddr;

use serde::Deserialize;

use super::apply::{self, ApplyError};
use super::{Family, InpodConfig, NFT_TABLE, iptables, nft};

/// Which iptables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// `iptables-legacy` (x_tables).
    Legacy,
    /// `iptables-nft` (x_tables rules in nf_tables).
    Nft,
}

/// Where rules go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Native nftables: one `inet` table, one transaction.
    Nftables,
    /// iptables-restore of the given flavour.
    Iptables(Flavor),
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Nftables => write!(f, "nftables"),
            Backend::Iptables(Flavor::Legacy) => write!(f, "iptables-legacy"),
            Backend::Iptables(Flavor::Nft) => write!(f, "iptables-nft"),
        }
    }
}

/// The iptables tool of a flavour and family (`iptables-nft-save`, `ip6tables-legacy-restore`, …).
pub fn tool(flavor: Flavor, family: Family, what: &str) -> String {
    let base = if family == Family::V4 { "iptables" } else { "ip6tables" };
    let fl = match flavor {
        Flavor::Legacy => "legacy",
        Flavor::Nft => "nft",
    };
    format!("{base}-{fl}-{what}")
}

fn saved(flavor: Flavor, family: Family) -> Result<iptables::Existing, ApplyError> {
    apply::run(&tool(flavor, family, "save"), &[], None).map(|s| iptables::Existing::parse(&s))
}

fn restore(flavor: Flavor, family: Family, input: &str) -> Result<(), ApplyError> {
    if input.is_empty() {
        return Ok(());
    }
    apply::run(&tool(flavor, family, "restore"), &["--noflush"], Some(input)).map(|_| ())
}

/// Which iptables flavour the node already uses: the one holding more rules (a node's CNI and kube-proxy
/// decide it), nft when neither has any. Run in the node's netns.
pub fn detect_flavor() -> Flavor {
    let count = |f: Flavor| -> usize {
        [Family::V4, Family::V6]
            .iter()
            .filter_map(|fam| apply::run(&tool(f, *fam, "save"), &[], None).ok())
            .map(|s| s.lines().filter(|l| l.starts_with("-A ")).count())
            .sum()
    };
    if count(Flavor::Legacy) > count(Flavor::Nft) { Flavor::Legacy } else { Flavor::Nft }
}

impl Backend {
    /// Installs or refreshes a pod's rules (idempotent, atomic per transaction).
    pub fn install_pod(self, cfg: InpodConfig) -> Result<(), ApplyError> {
        match self {
            Backend::Nftables => match apply::nft_run(&nft::nft_apply_script(cfg)) {
                // The chains changed (an older agent's table): replace the table instead.
                Err(ApplyError::Rejected { .. }) => apply::nft_run(&nft::nft_replace_script(cfg)),
                r => r,
            },
            Backend::Iptables(fl) => {
                for fam in Family::of(cfg) {
                    restore(fl, fam, &iptables::pod_restore(fam, &saved(fl, fam)?))?;
                }
                Ok(())
            }
        }
    }

    /// Replaces a pod's rules with the expected ones (see [`super::repair_pod`]).
    pub fn repair_pod(self, cfg: InpodConfig) -> Result<(), ApplyError> {
        match self {
            Backend::Nftables => apply::nft_run(&nft::nft_replace_script(cfg)),
            Backend::Iptables(_) => self.install_pod(cfg),
        }
    }

    /// Removes a pod's rules; absent ones are fine.
    pub fn remove_pod(self, cfg: InpodConfig) -> Result<(), ApplyError> {
        match self {
            Backend::Nftables => apply::nft_run(&nft::nft_delete_script()),
            Backend::Iptables(fl) => {
                for fam in Family::of(cfg) {
                    restore(fl, fam, &iptables::remove_restore(&saved(fl, fam)?))?;
                }
                Ok(())
            }
        }
    }

    /// Whether a pod's rules are all in place.
    pub fn pod_present(self, cfg: InpodConfig) -> Result<bool, ApplyError> {
        match self {
            Backend::Nftables => Ok(apply::nft_list_table(NFT_TABLE)?.is_some()),
            Backend::Iptables(fl) => {
                for fam in Family::of(cfg) {
                    if !iptables::pod_present(&saved(fl, fam)?) {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        }
    }

    /// Installs the node's probe rules with the probe sets holding exactly `ips`.
    pub fn install_host(self, ips: &[IpAddr]) -> Result<(), ApplyError> {
        match self {
            Backend::Nftables => apply::nft_run(&nft::host_apply_script(ips)),
            Backend::Iptables(fl) => {
                for fam in [Family::V4, Family::V6] {
                    let set = iptables::probe_ipset(fam);
                    let inet = if fam == Family::V4 { "inet" } else { "inet6" };
                    apply::run("ipset", &["create", set, "hash:ip", "family", inet, "-exist"], None)?;
                    apply::run("ipset", &["flush", set], None)?;
                    for ip in ips.iter().filter(|ip| Family::of_ip(**ip) == fam) {
                        apply::run("ipset", &["add", set, &ip.to_string(), "-exist"], None)?;
                    }
                    let existing = saved(fl, fam)?;
                    // Rewrite the chain (declaring it flushes it) so a restart never duplicates the rule.
                    restore(fl, fam, &iptables::host_restore(fam, &existing))?;
                }
                Ok(())
            }
        }
    }

    /// Adds or removes one enrolled pod IP in the node's probe set.
    pub fn host_member(self, ip: IpAddr, add: bool) -> Result<(), ApplyError> {
        match self {
            Backend::Nftables => apply::nft_run(&nft::host_set_element(ip, add)),
            Backend::Iptables(_) => {
                let set = iptables::probe_ipset(Family::of_ip(ip));
                apply::run("ipset", &[if add { "add" } else { "del" }, set, &ip.to_string(), "-exist"], None)
                    .map(|_| ())
            }
        }
    }

    /// Removes the node's probe rules and sets (uninstall).
    pub fn remove_host(self) -> Result<(), ApplyError> {
        match self {
            Backend::Nftables => apply::nft_run(&nft::host_delete_script()),
            Backend::Iptables(fl) => {
                for fam in [Family::V4, Family::V6] {
                    restore(fl, fam, &iptables::remove_restore(&saved(fl, fam)?))?;
                    let _ = apply::run("ipset", &["destroy", iptables::probe_ipset(fam)], None);
                }
                Ok(())
            }
        }
    }
}
