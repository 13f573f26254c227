//! The lab as kubelet and API client in the Kubernetes tier: namespaces and pods through the API server, with
//! a sandbox process per pod.

use std::net::IpAddr;

use anyhow::Context;
use serde_json::{Value, json};

use super::*;
use crate::cni::Attachment;
use crate::netns::Netns;
use crate::util::unique_id;

impl Lab {
    /// The Kubernetes API of the Kubernetes tier.
    pub fn kube(&self) -> &crate::kube::KubeApi {
        self.kube.as_ref().expect("the lab was started with kubernetes: true")
    }

    /// The Kubernetes API, to stop and start it.
    pub fn kube_mut(&mut self) -> &mut crate::kube::KubeApi {
        self.kube.as_mut().expect("the lab was started with kubernetes: true")
    }

    /// Runs Debian's kubectl 1.20 (`$AMBIT_KUBECTL`, or the one `scripts/test` unpacks into the cache; a newer
    /// one cannot discover this API server's groups) against the lab's API server; its stdout, or an error
    /// with both streams. It runs from node 1's netns (the API server is on the lab's fabric) with a discovery
    /// cache of this lab's own: every lab's API server has the same address.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let bin = std::env::var("AMBIT_KUBECTL").unwrap_or_else(|_| "/var/cache/ambit/kubectl-v1.20.2".into());
        let out = self.nodes[0]
            .netns
            .command(&bin)
            .arg("--kubeconfig")
            .arg(&self.kube().kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .args(args)
            .output()
            .with_context(|| format!("running {bin}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        anyhow::ensure!(out.status.success(), "kubectl {args:?}: {text}{}", String::from_utf8_lossy(&out.stderr));
        Ok(text)
    }

    /// Creates or relabels a namespace (`mode`: the `istio.io/dataplane-mode` label, `None` removes it).
    pub fn k8s_namespace(&self, name: &str, mode: Option<&str>) -> anyhow::Result<()> {
        let name = name.to_string();
        let mode = mode.map(str::to_string);
        self.kube().run(move |c| async move {
            use k8s_openapi::api::core::v1::Namespace;
            use kube::api::{Api, Patch, PatchParams, PostParams};
            let api: Api<Namespace> = Api::all(c);
            if api.get_opt(&name).await?.is_none() {
                let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
                api.create(&PostParams::default(), &ns).await?;
            }
            let patch = json!({"metadata": {"labels": {"istio.io/dataplane-mode": mode}}});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            anyhow::Ok(())
        })?
    }

    /// Runs a pod as a kubelet and its runtime do in the Kubernetes tier: the Pod object (bound to the node), a
    /// netns with a sandbox process in the pod's cgroup, the CNI chain, then the pod's status (Running, its IP).
    /// On a CNI failure everything is undone and the failure returned.
    pub fn add_k8s_pod(&self, node: usize, namespace: &str, name: &str, spec: PodSpec) -> Result<Pod, PodError> {
        let n = &self.nodes[node];
        let sa = spec.service_account.clone().unwrap_or_else(|| "default".into());
        self.know_pod(node, namespace, &sa).map_err(PodError::Setup)?;
        let labels: serde_json::Map<String, Value> = spec.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        let annotations: serde_json::Map<String, Value> =
            spec.annotations.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        let object = json!({
            "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
            "spec": {"nodeName": n.name, "serviceAccountName": sa, "containers": [{"name": "app", "image": "busybox"}]},
        });
        let ns_name = namespace.to_string();
        let uid: String = self
            .kube()
            .run(move |c| async move {
                use k8s_openapi::api::core::v1::Pod as KPod;
                let api: kube::Api<KPod> = kube::Api::namespaced(c, &ns_name);
                let p: KPod = serde_json::from_value(object)?;
                let created = api.create(&Default::default(), &p).await?;
                anyhow::Ok(created.metadata.uid.unwrap_or_default())
            })
            .and_then(|r| r)
            .map_err(PodError::Setup)?;
        let container_id = format!("{}{}{}", unique_id(), unique_id(), unique_id());
        let netns = Netns::create(&format!("ambit-{}-{}-{}", self.id, namespace, name)).map_err(PodError::Setup)?;
        let sandbox = Sandbox::start(&netns, &uid, &container_id, &n.dir.join(format!("pause-{namespace}-{name}.log")))
            .map_err(PodError::Setup)?;
        let att = Attachment {
            container_id: container_id.clone(),
            netns: netns.path(),
            ifname: "eth0".into(),
            args: cni_args(namespace, name, &uid),
        };
        let (result, timings) = match n.cni.add(&n.netns, &att) {
            Ok(r) => r,
            Err(e) => {
                let _ = n.cni.del(&n.netns, &att, None);
                let _ = self.delete_k8s_object(namespace, name);
                return Err(PodError::Cni(e));
            }
        };
        let (ip, ip6) = result_ips(&result).map_err(PodError::Setup)?;
        self.set_pod_status(namespace, name, "Running", Some(ip)).map_err(PodError::Setup)?;
        Ok(Pod {
            namespace: namespace.into(),
            name: name.into(),
            uid,
            service_account: sa,
            node,
            netns,
            ip,
            ip6,
            container_id,
            result,
            timings,
            sandbox: Some(sandbox),
        })
    }

    /// Sets a pod's phase (and IP) through the status subresource, as a kubelet does.
    pub fn set_pod_status(&self, namespace: &str, name: &str, phase: &str, ip: Option<IpAddr>) -> anyhow::Result<()> {
        let (ns, name, phase) = (namespace.to_string(), name.to_string(), phase.to_string());
        let host_ip = "172.30.0.1";
        self.kube().run(move |c| async move {
            use k8s_openapi::api::core::v1::Pod as KPod;
            let api: kube::Api<KPod> = kube::Api::namespaced(c, &ns);
            let mut status = json!({"phase": phase, "hostIP": host_ip});
            if let Some(ip) = ip {
                status["podIP"] = json!(ip.to_string());
                status["podIPs"] = json!([{"ip": ip.to_string()}]);
            }
            api.patch_status(&name, &Default::default(), &kube::api::Patch::Merge(&json!({"status": status}))).await?;
            anyhow::Ok(())
        })?
    }

    pub(super) fn delete_k8s_object(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        let (ns, name) = (namespace.to_string(), name.to_string());
        self.kube().run(move |c| async move {
            use k8s_openapi::api::core::v1::Pod as KPod;
            let api: kube::Api<KPod> = kube::Api::namespaced(c, &ns);
            let dp = kube::api::DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
            let _ = api.delete(&name, &dp).await?;
            anyhow::Ok(())
        })?
    }

    /// Removes a Kubernetes-tier pod as a kubelet does: CNI DEL, the sandbox, the Pod object, the netns.
    pub fn delete_k8s_pod(&self, pod: Pod) -> anyhow::Result<()> {
        self.cni_del(&pod)?;
        self.delete_k8s_object(&pod.namespace, &pod.name)?;
        drop(pod.sandbox);
        pod.netns.delete()
    }

    /// A pod object as the API has it now.
    pub fn k8s_pod(&self, namespace: &str, name: &str) -> anyhow::Result<Option<k8s_openapi::api::core::v1::Pod>> {
        let (ns, name) = (namespace.to_string(), name.to_string());
        self.kube().run(move |c| async move {
            let api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(c, &ns);
            anyhow::Ok(api.get_opt(&name).await?)
        })?
    }
}
