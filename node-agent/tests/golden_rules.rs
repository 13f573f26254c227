//! Golden files for the generated rulesets, both backends, both families. Regenerate with
//! `UPDATE_GOLDEN=1 cargo test -p ambit-agent --test golden_rules`.

use std::path::PathBuf;

use ambit_agent::rules::iptables::{self, Existing};
use ambit_agent::rules::{Family, InpodConfig, nft};

fn check(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1 to create it)", path.display()));
    assert_eq!(actual, expected, "{name} differs from its golden file; if the change is intended, regenerate it");
}

#[test]
fn nft_pod() {
    check("nft_ipv4.nft", &nft::nft_apply_script(InpodConfig { ipv4: true, ipv6: false, loopback_route: true }));
    check("nft_ipv6.nft", &nft::nft_apply_script(InpodConfig { ipv4: false, ipv6: true, loopback_route: true }));
    check("nft_dual.nft", &nft::nft_apply_script(InpodConfig { ipv4: true, ipv6: true, loopback_route: true }));
    check("nft_delete.nft", &nft::nft_delete_script());
    check(
        "nft_dual_replace.nft",
        &nft::nft_replace_script(InpodConfig { ipv4: true, ipv6: true, loopback_route: true }),
    );
    // The loopback route is routing alone: the rules are the same without it (their mark for uncaptured
    // connections then changes nothing), so switching it needs no new ruleset.
    let dual = InpodConfig { ipv4: true, ipv6: true, loopback_route: true };
    assert_eq!(nft::nft_apply_script(dual), nft::nft_apply_script(dual.with_loopback_route(false)));
}

#[test]
fn nft_host() {
    let ips = ["10.244.1.5".parse().unwrap(), "10.244.1.7".parse().unwrap(), "fd00:10:244:1::5".parse().unwrap()];
    check("nft_host.nft", &nft::host_apply_script(&ips));
}

#[test]
fn iptables_pod() {
    check("iptables_ipv4.rules", &iptables::pod_restore(Family::V4, &Existing::default()));
    check("iptables_ipv6.rules", &iptables::pod_restore(Family::V6, &Existing::default()));
}

#[test]
fn iptables_is_idempotent() {
    // Re-applying over what the first apply left adds no jump: only the chains are rewritten.
    let installed = "*mangle\n:AMBIT_PRERT - [0:0]\n:AMBIT_OUTPUT - [0:0]\n-A PREROUTING -j AMBIT_PRERT\n-A OUTPUT -j AMBIT_OUTPUT\nCOMMIT\n*nat\n:AMBIT_PRERT - [0:0]\n:AMBIT_OUTPUT - [0:0]\n-A PREROUTING -j AMBIT_PRERT\n-A OUTPUT -j AMBIT_OUTPUT\nCOMMIT\n";
    let existing = Existing::parse(installed);
    check("iptables_ipv4_reapply.rules", &iptables::pod_restore(Family::V4, &existing));
    check("iptables_remove.rules", &iptables::remove_restore(&existing));
    // Twice the same input gives the same output.
    assert_eq!(iptables::pod_restore(Family::V4, &existing), iptables::pod_restore(Family::V4, &existing));
}

#[test]
fn iptables_host() {
    check("iptables_host_ipv4.rules", &iptables::host_restore(Family::V4, &Existing::default()));
    check("iptables_host_ipv6.rules", &iptables::host_restore(Family::V6, &Existing::default()));
}
