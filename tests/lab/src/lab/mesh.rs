//! The lab as istiod: what it publishes (workloads, services, policies) in the mesh file the control plane
//! serves, one change at a time, each waited for until every ready ztunnel has taken it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};

use super::*;
use crate::cni::write_atomic;
use crate::util::wait_for;

/// A workload entry the lab publishes (Istio ztunnel local-file format).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Published {
    pub(super) uid: String,
    pub(super) name: String,
    pub(super) namespace: String,
    pub(super) service_account: String,
    pub(super) ip: IpAddr,
    pub(super) ip6: Option<IpAddr>,
    pub(super) node: String,
    pub(super) hbone: bool,
}

/// What the lab publishes besides workloads, as istiod would: services, policies, and per-workload service
/// memberships and policy selections (by pod UID).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct MeshConfig {
    pub(super) services: Vec<Value>,
    pub(super) policies: Vec<Value>,
    pub(super) memberships: BTreeMap<String, Value>,
    pub(super) selections: BTreeMap<String, Vec<String>>,
    /// Per-workload waypoints (by pod UID): Istio's `GatewayAddress`, as istiod sets it for a pod labelled
    /// `istio.io/use-waypoint` with a waypoint for workload traffic.
    #[serde(default)]
    pub(super) waypoints: BTreeMap<String, Value>,
    /// Namespace-wide waypoints, as istiod applies a namespace's `istio.io/use-waypoint`: to the services
    /// (and, for traffic type `all` or `workload`, the workloads) of the namespace that name none of their
    /// own, the waypoints themselves excepted.
    #[serde(default)]
    pub(super) namespace_waypoints: BTreeMap<String, NamespaceWaypoint>,
    /// The waypoints' own pods (by UID) and services (by hostname): never given a waypoint.
    #[serde(default)]
    pub(super) waypoint_pods: std::collections::BTreeSet<String>,
    #[serde(default)]
    pub(super) waypoint_hosts: std::collections::BTreeSet<String>,
}

/// A namespace's waypoint.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct NamespaceWaypoint {
    pub(super) gateway: Value,
    pub(super) for_workloads: bool,
}

impl Lab {
    /// Breaks the mesh file the control plane serves (it no longer parses) for `d`, then writes it whole again;
    /// nothing else can publish meanwhile. The control plane must keep serving its last good version.
    pub fn break_mesh_file_for(&self, d: Duration) -> anyhow::Result<()> {
        let _one_at_a_time = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        {
            let _held = self.workloads.lock().unwrap();
            write_atomic(&self.workloads_path(), b"workloads: [this is not {a mesh file\n")?;
            std::thread::sleep(d);
        }
        self.write_workloads().map(|_| ())
    }

    /// The workload file all ztunnels read.
    pub fn workloads_path(&self) -> PathBuf {
        self.dir.join("workloads.yaml")
    }

    /// Writes the mesh file; returns the version the control plane serves it under.
    pub(super) fn write_workloads(&self) -> anyhow::Result<String> {
        let w = self.workloads.lock().unwrap();
        let mesh = self.mesh.lock().unwrap();
        let workloads: Vec<Value> = w
            .iter()
            .map(|(pod_uid, p)| {
                let mut v = json!({
                    "uid": p.uid, "name": p.name, "namespace": p.namespace, "serviceAccount": p.service_account,
                    "workloadIps": std::iter::once(p.ip).chain(p.ip6).map(|i| i.to_string()).collect::<Vec<_>>(), "protocol": if p.hbone { "HBONE" } else { "TCP" },
                    "node": p.node, "trustDomain": TRUST_DOMAIN,
                    // As istiod fills them for a pod without owner or labels: its name is the workload's and
                    // the canonical service's, the revision `latest`, the cluster istiod's own.
                    "workloadName": p.name, "workloadType": "pod", "canonicalName": p.name,
                    "canonicalRevision": "latest", "clusterId": crate::controlplane::CLUSTER_ID,
                    "services": mesh.memberships.get(pod_uid).cloned().unwrap_or_else(|| json!({})),
                    "authorizationPolicies": mesh.selections.get(pod_uid).cloned().unwrap_or_default(),
                });
                // A namespace's waypoint is not its own waypoint's; one set on the pod itself is (a test's loop).
                let ns_wide = mesh
                    .namespace_waypoints
                    .get(&p.namespace)
                    .filter(|n| n.for_workloads && !mesh.waypoint_pods.contains(pod_uid));
                if let Some(gw) = mesh.waypoints.get(pod_uid).or(ns_wide.map(|n| &n.gateway)) {
                    v["waypoint"] = gw.clone();
                }
                v
            })
            .collect();
        let services: Vec<Value> = mesh
            .services
            .iter()
            .map(|s| {
                let mut s = s.clone();
                let ns = s["namespace"].as_str().unwrap_or_default();
                let host = s["hostname"].as_str().unwrap_or_default();
                if let Some(n) = mesh.namespace_waypoints.get(ns)
                    && s.get("waypoint").is_none()
                    && !mesh.waypoint_hosts.contains(host)
                {
                    s["waypoint"] = n.gateway.clone();
                }
                s
            })
            .collect();
        let doc = json!({"workloads": workloads, "services": services, "policies": mesh.policies});
        let text = serde_yaml_ng::to_string(&doc)?;
        write_atomic(&self.workloads_path(), text.as_bytes())?;
        // What `lab pod` needs to change the mesh of a running lab later, from another process.
        let state = json!({"workloads": *w, "mesh": *mesh});
        write_atomic(&self.dir.join("published.json"), serde_json::to_string(&state)?.as_bytes())?;
        Ok(crate::controlplane::mesh_version(text.as_bytes()))
    }

    /// Rewrites the local file after `change` and waits until every running ztunnel has loaded it.
    pub(super) fn republish(&self, change: impl FnOnce(&mut MeshConfig)) -> anyhow::Result<()> {
        self.rewrite(|_, m| change(m))
    }

    /// Rewrites the local file after `change` to the workloads and the rest, and waits until every running
    /// ztunnel has loaded it.
    pub(super) fn rewrite(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, Published>, &mut MeshConfig),
    ) -> anyhow::Result<()> {
        // One change at a time, from the write to every ztunnel taking it: the control plane serves only the
        // file's latest version, so a change overtaken by another before it was pushed would be waited for
        // in vain.
        let _one_at_a_time = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        if self.config.control_plane {
            // Every ztunnel that is ready now must take the change.
            let ready: Vec<bool> = self
                .nodes
                .iter()
                .map(|n| matches!(n.ztunnel_get(READY_PORT, "/healthz/ready"), Ok((200, _))))
                .collect();
            let since = crate::controlplane::push_records_end(&self.control_plane().dir);
            let before = std::fs::read(self.workloads_path()).map(|b| crate::controlplane::mesh_version(&b));
            change(&mut self.workloads.lock().unwrap(), &mut self.mesh.lock().unwrap());
            let version = self.write_workloads()?;
            if before.is_ok_and(|b| b == version) {
                return Ok(()); // nothing changed: nothing will be pushed
            }
            return self.wait_pushed(&version, &ready, since);
        }
        let generation =
            |n: &Node| -> Option<u64> { n.config_dump().ok()?["ambit"]["configSource"]["generation"].as_u64() };
        let before: Vec<Option<u64>> = self.nodes.iter().map(|n| n.ztunnel.as_ref().and(generation(n))).collect();
        change(&mut self.workloads.lock().unwrap(), &mut self.mesh.lock().unwrap());
        self.write_workloads()?;
        for (n, before) in self.nodes.iter().zip(before) {
            let Some(before) = before else { continue };
            let refused =
                wait_for(&format!("{}'s ztunnel to load the new config", n.name), Duration::from_secs(10), || {
                    let dump = n.config_dump().ok()?;
                    let error = &dump["ambit"]["configSource"]["lastError"];
                    if !error.is_null() {
                        return Some(Some(error.to_string()));
                    }
                    (dump["ambit"]["configSource"]["generation"].as_u64()? > before).then_some(None)
                })?;
            if let Some(e) = refused {
                anyhow::bail!("{}'s ztunnel refused the config: {e}", n.name);
            }
        }
        Ok(())
    }

    /// Waits until the ztunnel of every node in `nodes` has ACKed both xDS types at `version` of the mesh file
    /// in a push answered after `since` (see [`crate::controlplane::push_records_end`]), as the control plane saw it (any ztunnel ACKs only once a push is in force); fails with the NACK's
    /// error if one refused it.
    pub fn wait_pushed(&self, version: &str, nodes: &[bool], since: u64) -> anyhow::Result<()> {
        use ambit_proto::control_plane::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
        let cp = self.control_plane();
        for (n, _) in self.nodes.iter().zip(nodes).filter(|(_, wait)| **wait) {
            let refused = wait_for(
                &format!("{}'s ztunnel to take version {version} over xDS", n.name),
                Duration::from_secs(10),
                || {
                    let records = crate::controlplane::push_records_since(&cp.dir, since);
                    let mine = || records.iter().filter(|r| r.node == n.name && r.version == version);
                    if let Some(e) = mine().find_map(|r| r.nack.clone()) {
                        return Some(Some(e));
                    }
                    [ADDRESS_TYPE, AUTHORIZATION_TYPE].iter().all(|t| mine().any(|r| r.type_url == *t)).then_some(None)
                },
            )
            .with_context(|| tail(&cp.log(), 30))?;
            if let Some(e) = refused {
                anyhow::bail!("{}'s ztunnel refused the xDS push: {e}", n.name);
            }
        }
        Ok(())
    }

    /// The lab's control plane (unless started with `control_plane: false`).
    pub fn control_plane(&self) -> &crate::controlplane::ControlPlane {
        self.control_plane.as_ref().expect("the lab was started with control_plane: true")
    }

    /// The control plane, to stop and restart it.
    pub fn control_plane_mut(&mut self) -> &mut crate::controlplane::ControlPlane {
        self.control_plane.as_mut().expect("the lab was started with control_plane: true")
    }

    /// Tells the control plane that a pod of `namespace`/`sa` runs on node `node`, so its ztunnel may ask for
    /// that identity (istiod learns it from the API server before the pod's sandbox starts).
    pub(super) fn know_pod(&self, node: usize, namespace: &str, sa: &str) -> anyhow::Result<()> {
        let Some(cp) = &self.control_plane else { return Ok(()) };
        let mut known = self.known_pods.lock().unwrap();
        let p = crate::controlplane::KnownPod {
            node: self.nodes[node].name.clone(),
            namespace: namespace.into(),
            service_account: sa.into(),
        };
        if !known.contains(&p) {
            known.push(p);
            cp.set_known_pods(&known)?;
        }
        Ok(())
    }

    /// Publishes Istio `services:` entries (`{name, namespace, hostname, vips: ["/<ip>"], ports: {svc: target}}`).
    pub fn set_services(&self, services: Vec<Value>) -> anyhow::Result<()> {
        self.republish(|m| m.services = services)
    }

    /// Publishes Istio `policies:` (the `Authorization` model).
    pub fn set_policies(&self, policies: Vec<Value>) -> anyhow::Result<()> {
        self.republish(|m| m.policies = policies)
    }

    /// Sets a pod's workload `services` map (`{"<ns>/<hostname>": {svc port: target port}}`).
    pub fn set_pod_services(&self, pod: &Pod, services: Value) -> anyhow::Result<()> {
        self.republish(|m| {
            m.memberships.insert(pod.uid.clone(), services);
        })
    }

    /// Sets the WORKLOAD_SELECTOR policies (`<ns>/<name>`) that select a pod.
    pub fn set_pod_policies(&self, pod: &Pod, keys: &[&str]) -> anyhow::Result<()> {
        self.republish(|m| {
            m.selections.insert(pod.uid.clone(), keys.iter().map(|k| k.to_string()).collect());
        })
    }

    /// Removes a pod from the local file (its address becomes unknown to the mesh) without deleting it.
    pub fn unpublish(&self, pod: &Pod) -> anyhow::Result<()> {
        self.rewrite(|w, _| {
            w.remove(&pod.uid);
        })?;
        self.wait_workload_visible(&workload_uid(pod), false)
    }

    /// Waits until every running ztunnel has loaded a workload file that lists (or no longer lists) `uid`.
    pub(super) fn wait_workload_visible(&self, uid: &str, present: bool) -> anyhow::Result<()> {
        for node in self.nodes.iter().filter(|n| n.ztunnel.is_some()) {
            wait_for(&format!("{}'s ztunnel to see workload {uid}", node.name), Duration::from_secs(10), || {
                let dump = node.config_dump().ok()?;
                let has = dump["workloads"].as_array()?.iter().any(|w| w["uid"] == uid);
                (has == present).then_some(())
            })?;
        }
        Ok(())
    }

    /// Publishes (or republishes) a pod in the workload file and waits for the ztunnels to load it; it is an
    /// HBONE workload if its namespace is one the lab enrols.
    pub fn publish(&self, pod: &Pod) -> anyhow::Result<()> {
        self.publish_as(pod, self.config.enrolled_namespaces.contains(&pod.namespace))
    }

    /// Publishes a workload the lab did not create itself (a runtime-tier sandbox) and waits for the ztunnels.
    #[allow(clippy::too_many_arguments)]
    pub fn publish_workload(
        &self,
        uid: &str,
        namespace: &str,
        name: &str,
        sa: &str,
        ip: IpAddr,
        node: usize,
        hbone: bool,
    ) -> anyhow::Result<()> {
        let p = Published {
            uid: format!("Kubernetes//Pod/{namespace}/{name}"),
            name: name.into(),
            namespace: namespace.into(),
            service_account: sa.into(),
            ip,
            ip6: None,
            node: self.nodes[node].name.clone(),
            hbone,
        };
        self.know_pod(node, namespace, sa)?;
        self.rewrite(|w, _| {
            w.insert(uid.to_string(), p);
        })
    }

    /// Publishes a pod as an HBONE (`true`) or plain TCP workload, as istiod would after its enrolment changed.
    pub fn publish_as(&self, pod: &Pod, hbone: bool) -> anyhow::Result<()> {
        let p = self.published(pod, hbone);
        self.rewrite(|w, _| {
            w.insert(pod.uid.clone(), p);
        })
    }

    /// Publishes many pods in one change (one push), as [`Lab::publish`] does one.
    pub fn publish_all(&self, pods: &[&Pod]) -> anyhow::Result<()> {
        let entries: Vec<(String, Published)> = pods
            .iter()
            .map(|p| (p.uid.clone(), self.published(p, self.config.enrolled_namespaces.contains(&p.namespace))))
            .collect();
        self.rewrite(|w, _| w.extend(entries))
    }

    pub(super) fn published(&self, pod: &Pod, hbone: bool) -> Published {
        Published {
            uid: workload_uid(pod),
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            ip: pod.ip,
            ip6: pod.ip6,
            node: self.nodes[pod.node].name.clone(),
            hbone,
        }
    }
}
