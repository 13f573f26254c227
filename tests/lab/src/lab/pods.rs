//! The lab as container runtime: pods made and removed as a runtime does (a netns, the node's CNI chain with
//! ambit-cni chained by the agent), each sandbox's state kept as a runtime keeps it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use super::*;
use crate::cni::{Attachment, CniFailure, Timings, write_atomic};
use crate::netns::Netns;
use crate::util::{binary, unique_id, wait_for};

impl Lab {
    /// The primary CNI rewrites its conflist (as it does when it restarts), dropping the chained ambit-cni;
    /// returns once node `i`'s agent has chained it again, with how long that took.
    pub fn primary_cni_rewrites_conflist(&self, i: usize) -> anyhow::Result<Duration> {
        let n = &self.nodes[i];
        let mut list = n.cni.load_conflist()?;
        if let Some(plugins) = list["plugins"].as_array_mut() {
            plugins.retain(|p| p["type"] != "ambit-cni");
        }
        let t = Instant::now();
        write_atomic(&n.dir.join("net.d/10-lab.conflist"), serde_json::to_string_pretty(&list)?.as_bytes())?;
        wait_for(&format!("{}'s agent to chain ambit-cni again", n.name), Duration::from_secs(10), || {
            let chained = n.cni.load_conflist().ok()?["plugins"].as_array()?.iter().any(|p| p["type"] == "ambit-cni");
            chained.then_some(())
        })?;
        Ok(t.elapsed())
    }

    /// Creates a pod on node `node` as a runtime does: a new netns, then the CNI chain. On a CNI failure the
    /// netns is removed again (as the runtime would) and the failure is returned.
    pub fn add_pod(&self, node: usize, namespace: &str, name: &str) -> Result<Pod, PodError> {
        self.add_pod_as(node, namespace, name, "default")
    }

    /// Writes node `i`'s agent config: the enrolled namespaces and the service accounts of the pods it knows.
    pub(super) fn write_agent_config(&self, i: usize) -> anyhow::Result<()> {
        self.write_agent_config_with(i, &self.service_accounts.lock().unwrap())
    }

    pub(super) fn write_agent_config_with(
        &self,
        i: usize,
        accounts: &BTreeMap<(String, String), String>,
    ) -> anyhow::Result<()> {
        let n = &self.nodes[i];
        let not_captured = self.not_captured.lock().unwrap();
        let pods: Vec<Value> = accounts
            .iter()
            .map(|((ns, name), sa)| {
                let mut p = json!({"namespace": ns, "name": name, "serviceAccount": sa});
                if not_captured.contains(&(ns.clone(), name.clone())) {
                    p["mode"] = "none".into();
                }
                p
            })
            .collect();
        let peer_node = self.config.peer.as_ref().filter(|p| p.nodes.contains(&i));
        let agent_conf = json!({
            "nodeName": n.name,
            "loopbackRoute": peer_node.is_none_or(|p| p.loopback_route),
            "cniSocket": n.dir.join("run/cni.sock"),
            "zdsSocket": n.dir.join("run/ztunnel.sock"),
            "stateDir": n.dir.join("state"),
            // Tests wait for the sweep of pods deleted without a DEL; a node would keep the default.
            "sweepIntervalMs": 1000,
            "standalone": {"enrolledNamespaces": self.config.enrolled_namespaces, "pods": pods},
            "mode": if self.config.kubernetes { "kubernetes" } else { "standalone" },
            "ruleBackend": self.config.rule_backend,
            "kubernetes": {"kubeconfig": self.kube.as_ref().map(|k| k.kubeconfig.clone())},
            "install": {
                "cniBinDir": n.dir.join("cni-bin"),
                "cniConfDir": n.dir.join("net.d"),
                "pluginBinary": binary("ambit-cni"),
                "pluginConfig": {
                    "agent_timeout_ms": 10000,
                    "log_file": n.dir.join("cni.log"),
                    "log_level": if self.config.log_level.contains("debug") || self.config.log_level == "info" { "debug" } else { "info" },
                },
            },
        });
        write_atomic(&n.dir.join("agent.yaml"), serde_yaml_ng::to_string(&agent_conf)?.as_bytes())
    }

    /// [`Lab::add_pod`] with a service account.
    pub fn add_pod_as(&self, node: usize, namespace: &str, name: &str, sa: &str) -> Result<Pod, PodError> {
        let pod = self.create_pod(node, namespace, name, sa)?;
        self.publish(&pod).map_err(PodError::Setup)?;
        Ok(pod)
    }

    /// Creates a pod as a runtime does (netns, CNI chain) without publishing it as a workload: istiod has not
    /// pushed it yet. Safe to call from several threads at once.
    pub fn create_pod(&self, node: usize, namespace: &str, name: &str, sa: &str) -> Result<Pod, PodError> {
        self.create_pod_with(node, namespace, name, sa, |_| {})
    }

    /// [`Lab::create_pod`], calling `before_cni` with the pod's fresh netns just before the CNI ADD (e.g. to
    /// remove the netns while the ADD runs).
    pub fn create_pod_with(
        &self,
        node: usize,
        namespace: &str,
        name: &str,
        sa: &str,
        before_cni: impl FnOnce(&Netns),
    ) -> Result<Pod, PodError> {
        // Standalone mode has no pod spec to read the service account from: the lab tells the agent, as an
        // operator would in its config.
        {
            // Held while the config is written, so concurrent pods never write an older list over a newer one.
            let mut accounts = self.service_accounts.lock().unwrap();
            accounts.insert((namespace.to_string(), name.to_string()), sa.to_string());
            self.write_agent_config_with(node, &accounts).map_err(PodError::Setup)?;
        }
        self.know_pod(node, namespace, sa).map_err(PodError::Setup)?;
        let n = &self.nodes[node];
        let uid = format!("{}-{}", unique_id(), unique_id());
        let container_id = format!("{}{}{}", unique_id(), unique_id(), unique_id());
        let netns = Netns::create(&format!("ambit-{}-{}-{}", self.id, namespace, name)).map_err(PodError::Setup)?;
        if self.config.dual_stack {
            // As a runtime's sandbox would.
            no_dad(&netns).map_err(PodError::Setup)?;
        }
        let att = Attachment {
            container_id: container_id.clone(),
            netns: netns.path(),
            ifname: "eth0".into(),
            args: cni_args(namespace, name, &uid),
        };
        before_cni(&netns);
        let (result, timings) = match n.cni.add(&n.netns, &att) {
            Ok(r) => r,
            Err(e) => {
                // The runtime cleans up a failed sandbox with DEL, then removes the netns.
                let _ = n.cni.del(&n.netns, &att, None);
                return Err(PodError::Cni(e));
            }
        };
        let (ip, ip6) = result_ips(&result).map_err(PodError::Setup)?;
        // As a runtime keeps its sandboxes' state: `lab pod del` finds the pod (and its cached result) here.
        let record = json!({
            "namespace": namespace, "name": name, "uid": uid, "serviceAccount": sa, "node": node,
            "containerId": container_id, "result": result,
        });
        let _ = std::fs::create_dir_all(self.dir.join("pods"));
        let _ = std::fs::write(self.pod_record(namespace, name), record.to_string());
        let pod = Pod {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.clone(),
            service_account: sa.into(),
            node,
            netns,
            ip,
            ip6,
            container_id,
            result,
            timings,
            sandbox: None,
        };
        Ok(pod)
    }

    /// Runs CNI DEL for the pod (reverse order, cached result) without deleting its netns.
    pub fn cni_del(&self, pod: &Pod) -> Result<(), CniFailure> {
        let n = &self.nodes[pod.node];
        n.cni.del(&n.netns, &pod.attachment(), Some(&pod.result))
    }

    /// Runs only ambit-cni's DEL for the pod: its capture goes (rules, ztunnel), its network stays.
    pub fn uncapture(&self, pod: &Pod) -> Result<(), CniFailure> {
        self.ambit_cni(pod, "DEL")
    }

    /// Runs only ambit-cni's ADD for the pod again (after [`Lab::uncapture`]): its capture comes back.
    pub fn capture(&self, pod: &Pod) -> Result<(), CniFailure> {
        self.ambit_cni(pod, "ADD")
    }

    pub(super) fn ambit_cni(&self, pod: &Pod, command: &str) -> Result<(), CniFailure> {
        let n = &self.nodes[pod.node];
        let list = n.cni.load_conflist().map_err(|e| CniFailure {
            plugin: "(conflist)".into(),
            exit_code: None,
            error: None,
            stdout: String::new(),
            stderr: format!("{e:#}"),
        })?;
        let mut conf = list["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["type"] == "ambit-cni")
            .cloned()
            .unwrap_or_default();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["prevResult"] = pod.result.clone();
        n.cni.exec_raw(&n.netns, command, &pod.attachment(), &conf).map(|_| ())
    }

    /// Removes a pod as a runtime does: CNI DEL, then the netns; and unpublishes it.
    pub fn delete_pod(&self, pod: Pod) -> anyhow::Result<()> {
        self.cni_del(&pod)?;
        let _ = std::fs::remove_file(self.pod_record(&pod.namespace, &pod.name));
        self.unpublish(&pod)?;
        pod.netns.delete()
    }

    pub(super) fn pod_record(&self, namespace: &str, name: &str) -> PathBuf {
        self.dir.join("pods").join(format!("{namespace}_{name}.json"))
    }

    /// A pod this lab created (by any process), from the record kept for it: its netns is owned by the returned
    /// value, so [`Lab::delete_pod`] removes it.
    pub fn find_pod(&self, namespace: &str, name: &str) -> anyhow::Result<Pod> {
        let path = self.pod_record(namespace, name);
        let r: Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("no pod {namespace}/{name} in lab {}", self.id))?,
        )?;
        let netns = Netns::adopt(&format!("ambit-{}-{namespace}-{name}", self.id))?;
        let (ip, ip6) = result_ips(&r["result"])?;
        Ok(Pod {
            namespace: namespace.into(),
            name: name.into(),
            uid: r["uid"].as_str().context("uid")?.into(),
            service_account: r["serviceAccount"].as_str().unwrap_or("default").into(),
            node: r["node"].as_u64().context("node")? as usize,
            netns,
            ip,
            ip6,
            container_id: r["containerId"].as_str().context("containerId")?.into(),
            result: r["result"].clone(),
            timings: Timings::default(),
            sandbox: None,
        })
    }

    /// The pods this lab created that are still there, as `namespace/name`.
    pub fn pod_names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.join("pods"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let f = e.file_name().to_string_lossy().into_owned();
                let (ns, name) = f.strip_suffix(".json")?.split_once('_')?;
                Some(format!("{ns}/{name}"))
            })
            .collect();
        v.sort();
        v
    }
}
