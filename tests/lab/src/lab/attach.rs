//! Attaching to a lab another process left running (`lab demo --keep`), for `lab pod`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Context;
use serde_json::Value;

use super::*;
use crate::cni::CniRunner;
use crate::netns::Netns;

impl Lab {
    /// Attaches to a lab left running (`lab demo --keep`) by its id, or to the only one when `id` is `None`, to
    /// add and remove pods from another process. Nothing of it is stopped or removed when the returned value is
    /// dropped; its daemons are not this process's to restart.
    pub fn attach(id: Option<&str>) -> anyhow::Result<Lab> {
        let kept: Vec<(String, PathBuf)> = std::fs::read_dir(std::env::temp_dir())?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let lab_id = name.strip_prefix("ambit-lab-")?.to_string();
                (e.path().join("kept").exists() && e.path().join("lab.json").exists()).then(|| (lab_id, e.path()))
            })
            .filter(|(lab_id, _)| id.is_none_or(|id| id == lab_id))
            .collect();
        let (id, dir) = match kept.as_slice() {
            [one] => one.clone(),
            [] => anyhow::bail!(
                "no lab left running{} (start one with `lab demo --keep`)",
                id.map(|i| format!(" with id {i}")).unwrap_or_default()
            ),
            many => anyhow::bail!(
                "{} labs are running ({}): say which with --lab",
                many.len(),
                many.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>().join(", ")
            ),
        };
        let saved: Value = serde_json::from_slice(&std::fs::read(dir.join("lab.json"))?)?;
        anyhow::ensure!(saved["kubernetes"] != true, "lab {id} runs the Kubernetes tier: create pods through its API");
        let config = LabConfig {
            nodes: saved["nodes"].as_u64().context("lab.json: nodes")? as usize,
            enrolled_namespaces: serde_json::from_value(saved["enrolledNamespaces"].clone())?,
            control_plane: saved["controlPlane"].as_bool().unwrap_or(true),
            dual_stack: saved["dualStack"].as_bool().unwrap_or(false),
            ..Default::default()
        };
        let published: Value = std::fs::read(dir.join("published.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let workloads: BTreeMap<String, Published> =
            serde_json::from_value(published["workloads"].clone()).unwrap_or_default();
        let mesh: MeshConfig = serde_json::from_value(published["mesh"].clone()).unwrap_or_default();
        let mut lab = Lab {
            id: id.clone(),
            dir: dir.clone(),
            config: config.clone(),
            nodes: Vec::new(),
            fabric: Some(Netns::open(&format!("ambit-{id}-fabric"))?),
            workloads: Mutex::new(workloads),
            mesh: Mutex::new(mesh),
            service_accounts: Mutex::new(BTreeMap::new()),
            not_captured: Mutex::default(),
            known_pods: Mutex::new(Vec::new()),
            publishing: Mutex::new(()),
            control_plane: None,
            kube: None,
            keep: true,
        };
        if config.control_plane {
            lab.control_plane = Some(crate::controlplane::ControlPlane::attach(
                &format!("ambit-{id}-cp"),
                &dir.join("cp"),
                &lab.workloads_path(),
                (dir.join("ca-cert.pem"), dir.join("ca-key.pem")),
                (dir.join("cp/serving-cert.pem"), dir.join("cp/serving-key.pem")),
            )?);
            let known = std::fs::read(dir.join("cp/pods.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
            *lab.known_pods.lock().unwrap() = known.unwrap_or_default();
        }
        let mut accounts = BTreeMap::new();
        for i in 0..config.nodes {
            let name = format!("node{}", i + 1);
            let ndir = dir.join(&name);
            let agent: Value = serde_yaml_ng::from_slice(&std::fs::read(ndir.join("agent.yaml"))?)?;
            for p in agent["standalone"]["pods"].as_array().into_iter().flatten() {
                if let (Some(ns), Some(n), Some(sa)) =
                    (p["namespace"].as_str(), p["name"].as_str(), p["serviceAccount"].as_str())
                {
                    accounts.insert((ns.to_string(), n.to_string()), sa.to_string());
                }
            }
            let v6 = config.dual_stack.then(|| {
                (format!("fd00:30::{}", i + 1).parse().expect("an IPv6 address"), format!("fd00:244:{}::/64", i + 1))
            });
            lab.nodes.push(Node {
                index: i,
                netns: Netns::open(&format!("ambit-{id}-{name}"))?,
                ip: Ipv4Addr::new(172, 30, 0, (i + 1) as u8),
                pod_cidr: format!("10.244.{}.0/24", i + 1),
                v6,
                cni: CniRunner { bin_dir: ndir.join("cni-bin"), conf_dir: ndir.join("net.d") },
                dir: ndir,
                name,
                agent: None,
                ztunnel: None,
                containerd: None,
            });
        }
        *lab.service_accounts.lock().unwrap() = accounts;
        Ok(lab)
    }
}
