//! Golden files for the generated rulesets. Regenerate with `UPDATE_GOLDEN=1 cargo test -p ambit-agent --test golden_rules`.

use std::path::PathBuf;

use ambit_agent::rules::{InpodConfig, nft_apply_script, nft_delete_script};

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
fn nft_ipv4() {
    check("nft_ipv4.nft", &nft_apply_script(InpodConfig { ipv4: true, ipv6: false }));
}

#[test]
fn nft_ipv6() {
    check("nft_ipv6.nft", &nft_apply_script(InpodConfig { ipv4: false, ipv6: true }));
}

#[test]
fn nft_dual_stack() {
    check("nft_dual.nft", &nft_apply_script(InpodConfig { ipv4: true, ipv6: true }));
}

#[test]
fn nft_delete() {
    check("nft_delete.nft", &nft_delete_script());
}
