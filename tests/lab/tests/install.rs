//! The agent's installer on real nodes of the lab: chaining, repair, missing and broken configs, restart and
//! uninstall. Needs root.

use std::time::Duration;

use lab::demo::MESH_NS;
use lab::util::{metric, wait_for};
use lab::{Lab, LabConfig};
use serde_json::Value;

fn lab() -> Lab {
    Lab::start(LabConfig { enrolled_namespaces: vec![MESH_NS.into()], ..Default::default() }).expect("lab starts")
}

fn primary(lab: &Lab, i: usize) -> std::path::PathBuf {
    lab.nodes[i].dir.join("net.d/10-lab.conflist")
}

fn chained(lab: &Lab, i: usize) -> bool {
    let v: Value = serde_json::from_slice(&std::fs::read(primary(lab, i)).unwrap_or_default()).unwrap_or(Value::Null);
    v["plugins"].as_array().and_then(|p| p.last()).is_some_and(|p| p["type"] == "ambit-cni")
}

/// What the primary CNI would write: its own plugin only.
fn primary_only(lab: &Lab, i: usize) -> Vec<u8> {
    let v: Value = serde_json::from_slice(&std::fs::read(primary(lab, i)).unwrap()).unwrap();
    let mut v = v.clone();
    v["plugins"].as_array_mut().unwrap().retain(|p| p["type"] != "ambit-cni");
    serde_json::to_vec_pretty(&v).unwrap()
}

#[test]
fn the_plugin_stays_chained_when_the_primary_rewrites_its_config() {
    let lab = lab();
    let original = primary_only(&lab, 0);
    for round in 0..7 {
        // Rewrite it in place, as some CNIs do, and by rename, as others do.
        if round % 2 == 0 {
            std::fs::write(primary(&lab, 0), &original).unwrap();
        } else {
            lab::cni::write_atomic(&primary(&lab, 0), &original).unwrap();
        }
        wait_for("the agent to re-chain ambit-cni", Duration::from_secs(10), || chained(&lab, 0).then_some(()))
            .unwrap();
    }
    // The counter moves just after the file is rewritten.
    wait_for("all seven repairs to be counted", Duration::from_secs(5), || {
        let (_, m) = lab.agent_get(0, "/metrics").ok()?;
        (metric(&m, "ambit_agent_installer_repairs_total", &[]) >= 7.0).then_some(())
    })
    .unwrap();
    let log = lab.nodes[0].agent.as_ref().unwrap().log();
    assert!(log.contains("keeps rewriting the CNI config"), "the repeated repairs were not reported:\n{log}");
    assert_eq!(log.matches("keeps rewriting the CNI config").count(), 1, "the warning must be rate-limited");
    // Pods still get the whole chain.
    let pod = lab.add_pod(0, MESH_NS, "after-rewrites").unwrap();
    assert!(pod.nft_ruleset().unwrap().contains("table inet ambit"));
}

#[test]
fn missing_or_broken_primary_configs_keep_the_agent_unready() {
    let mut lab = lab();
    let good = primary_only(&lab, 0);
    lab.nodes[0].agent.as_mut().unwrap().stop(Duration::from_secs(5));
    std::fs::remove_file(primary(&lab, 0)).unwrap();
    let conf_dir = lab.nodes[0].dir.join("net.d");
    std::fs::write(conf_dir.join("05-broken.conflist"), b"{ this is not json").unwrap();
    lab.spawn_agent(0).unwrap();
    let body = wait_for("the agent to report why it is not ready", Duration::from_secs(10), || {
        match lab.agent_get(0, "/readyz") {
            Ok((503, b)) if b.contains("no usable primary CNI network config") => Some(b),
            _ => None,
        }
    })
    .unwrap();
    assert!(body.contains("05-broken.conflist"), "the broken file should be named: {body}");
    // The primary CNI finally writes its config: the agent chains it and becomes ready.
    std::fs::write(primary(&lab, 0), &good).unwrap();
    wait_for("chaining", Duration::from_secs(10), || chained(&lab, 0).then_some(())).unwrap();
    lab.wait_agent_ready(0).unwrap();
    let broken = std::fs::read(conf_dir.join("05-broken.conflist")).unwrap();
    assert_eq!(broken, b"{ this is not json", "a file the agent could not parse is left alone");
}

#[test]
fn restart_keeps_the_installation_and_uninstall_removes_everything() {
    let mut lab = lab();
    let pod = lab.add_pod(0, MESH_NS, "web").unwrap();
    let bin = lab.nodes[0].dir.join("cni-bin/ambit-cni");
    // An agent restart (upgrade) leaves the plugin, the chain, the pod's rules and the node's probe rules.
    lab.nodes[0].agent.as_mut().unwrap().stop(Duration::from_secs(5));
    assert!(chained(&lab, 0) && bin.exists());
    assert!(pod.nft_ruleset().unwrap().contains("table inet ambit"));
    assert!(
        lab.nodes[0].netns.exec("nft", &["list", "table", "inet", "ambit-host"]).unwrap().contains(&pod.ip.to_string())
    );
    lab.start_agent(0).unwrap();
    let (_, m) = lab.agent_get(0, "/metrics").unwrap();
    assert_eq!(metric(&m, "ambit_agent_pods_enrolled", &[]), 1.0, "the restarted agent re-adopted the pod: {m}");
    assert_eq!(metric(&m, "ambit_agent_installer_repairs_total", &[]), 0.0, "a restart is not a repair: {m}");

    // Uninstall: the pod is un-enrolled, the node is clean.
    lab.nodes[0].agent.as_mut().unwrap().stop(Duration::from_secs(5));
    lab.agent_command(0, &["uninstall"]).unwrap();
    assert!(!chained(&lab, 0));
    assert!(!bin.exists());
    assert_eq!(pod.nft_ruleset().unwrap().trim(), "");
    assert!(!pod.netns.ip(&["rule", "show"]).unwrap().contains("0x111"));
    assert!(lab.nodes[0].netns.exec("nft", &["list", "table", "inet", "ambit-host"]).is_err());
    assert!(lab.nodes[0].state_files().is_empty());
    let v: Value = serde_json::from_slice(&std::fs::read(primary(&lab, 0)).unwrap()).unwrap();
    assert_eq!(v["plugins"].as_array().unwrap().len(), 1, "the primary's own plugin stays: {v}");
}
