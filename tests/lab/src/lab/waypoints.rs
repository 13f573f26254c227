//! Waypoints in the lab: a pod running `lab waypoint` (the stand-in for Istio's Envoy waypoint; see
//! [`crate::waypoint`]), published as istiod publishes a waypoint: an HBONE workload behind a service of its
//! own, named in the `waypoint` field of what uses it.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::{Value, json};

use super::*;
use crate::proc::Proc;
use crate::util::{binary, wait_for};

/// The port a waypoint takes HBONE on.
pub const WAYPOINT_HBONE_PORT: u16 = 15008;

/// A waypoint the lab runs.
pub struct Waypoint {
    /// Its pod (not captured: Istio's waypoints are labelled `istio.io/dataplane-mode=none`).
    pub pod: Pod,
    /// `lab waypoint`, in the pod.
    pub proc: Proc,
    /// Its service's VIP.
    pub vip: IpAddr,
}

impl Waypoint {
    /// Its service's hostname.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.pod.name, self.pod.namespace)
    }

    /// Istio's `GatewayAddress` naming it by its service's hostname (as istiod names waypoints).
    pub fn by_hostname(&self) -> Value {
        json!({"destination": format!("{}/{}", self.pod.namespace, self.hostname()), "hboneMtlsPort": WAYPOINT_HBONE_PORT})
    }

    /// Istio's `GatewayAddress` naming it by an address (its pod's, or its service's VIP).
    pub fn by_address(ip: IpAddr) -> Value {
        json!({"destination": format!("/{ip}"), "hboneMtlsPort": WAYPOINT_HBONE_PORT})
    }

    /// Its own service, for [`Lab::set_services`] beside the others.
    pub fn service(&self) -> Value {
        json!({
            "name": self.pod.name, "namespace": self.pod.namespace, "hostname": self.hostname(),
            "vips": [format!("/{}", self.vip)],
            // As istiod publishes a waypoint's service: its HBONE port (ztunnels look for it) and its status port.
            "ports": {"15008": 15008, "15021": 15021},
        })
    }

    /// What it logged.
    pub fn log(&self) -> String {
        self.proc.log()
    }
}

impl Lab {
    /// Starts a waypoint `name` in `namespace` on node `node`, running as service account `sa`, whose answers
    /// that pass carry `x-waypoint: <name>` and which refuses paths under `/admin` with 403, on the target
    /// ports `http_ports` (others it relays as TCP). Its pod is published as an HBONE workload backing the
    /// service `<name>.<namespace>.svc.cluster.local` (VIP `vip`); the caller publishes that service with the
    /// others ([`Waypoint::service`]).
    #[allow(clippy::too_many_arguments)]
    pub fn add_waypoint(
        &self,
        node: usize,
        namespace: &str,
        name: &str,
        sa: &str,
        vip: IpAddr,
        http_ports: &[u16],
    ) -> anyhow::Result<Waypoint> {
        self.not_captured.lock().unwrap().insert((namespace.to_string(), name.to_string()));
        let pod = self.create_pod(node, namespace, name, sa).map_err(|e| anyhow::anyhow!("waypoint pod: {e}"))?;
        let host = format!("{name}.{namespace}.svc.cluster.local");
        let key = format!("{namespace}/{host}");
        let p = self.published(&pod, true);
        self.rewrite(|w, m| {
            w.insert(pod.uid.clone(), p);
            m.memberships.insert(pod.uid.clone(), json!({ key: {} }));
            m.waypoint_pods.insert(pod.uid.clone());
            m.waypoint_hosts.insert(host);
        })?;
        let mut env = self.ztunnel_env(node);
        // Its own log and no ztunnel's sockets.
        env.retain(|(k, _)| k != "INPOD_UDS" && k != "RUST_LOG");
        let identity = format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{sa}");
        let mut cmd = pod.netns.command(binary("lab"));
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").envs(env);
        cmd.args(["waypoint", "--identity", &identity, "--header", &format!("x-waypoint={name}")]);
        cmd.arg("--mesh").arg(self.workloads_path());
        for port in http_ports {
            cmd.arg(format!("--http-ports={port}"));
        }
        if http_ports.is_empty() {
            cmd.arg("--tcp-only");
        }
        let log = self.dir.join(format!("waypoint-{namespace}-{name}.log"));
        let mut proc = Proc::spawn("waypoint", cmd, &log)?;
        let up = wait_for(&format!("waypoint {namespace}/{name} to be ready"), Duration::from_secs(15), || {
            if !proc.running() {
                return Some(false);
            }
            proc.log().contains("ready").then_some(true)
        });
        match up {
            Ok(true) => {}
            Ok(false) => anyhow::bail!("waypoint {namespace}/{name} exited:\n{}", proc.log()),
            Err(e) => anyhow::bail!("{e}:\n{}", proc.log()),
        }
        Ok(Waypoint { pod, proc, vip })
    }

    /// Sets (or with `None` removes) the waypoint of a pod's workload, as istiod does for a pod labelled
    /// `istio.io/use-waypoint` with a waypoint for workload traffic.
    pub fn set_pod_waypoint(&self, pod: &Pod, gateway: Option<Value>) -> anyhow::Result<()> {
        self.republish(|m| match gateway {
            Some(g) => {
                m.waypoints.insert(pod.uid.clone(), g);
            }
            None => {
                m.waypoints.remove(&pod.uid);
            }
        })
    }

    /// Sets (or with `None` removes) a namespace's waypoint, as istiod applies a namespace labelled
    /// `istio.io/use-waypoint`: to its services, and with `for_workloads` (traffic type `all`) to its
    /// workloads too; what names a waypoint of its own keeps it, and waypoints get none.
    pub fn set_namespace_waypoint(
        &self,
        namespace: &str,
        gateway: Option<Value>,
        for_workloads: bool,
    ) -> anyhow::Result<()> {
        self.republish(|m| match gateway {
            Some(gateway) => {
                m.namespace_waypoints
                    .insert(namespace.to_string(), super::mesh::NamespaceWaypoint { gateway, for_workloads });
            }
            None => {
                m.namespace_waypoints.remove(namespace);
            }
        })
    }
}
