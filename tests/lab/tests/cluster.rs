//! The cluster tier (work in progress): a real kubelet runs pods the API server schedules. Needs root and the
//! Kubernetes binaries (`scripts/kube-build kube-apiserver kubelet kube-controller-manager kube-scheduler`).

use std::time::Duration;

use lab::cluster::Cluster;
use lab::util::wait_for;
use lab::{Lab, LabConfig};

#[test]
fn a_real_kubelet_runs_a_scheduled_pod() {
    let mut lab =
        Lab::start(LabConfig { kubernetes: true, runtime: true, nodes: 1, start_daemons: false, ..Default::default() })
            .expect("lab starts");
    let _cluster = Cluster::start(&mut lab).expect("the cluster starts");
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "p1", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "docker.io/library/pause:latest", "imagePullPolicy": "Never"}]},
    }))
    .unwrap();
    lab.kube()
        .run(move |c| async move {
            let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(c, "default");
            pods.create(&Default::default(), &pod).await
        })
        .unwrap()
        .unwrap();
    let ip = wait_for("the pod to run", Duration::from_secs(60), || {
        lab.kube()
            .run(|c| async move {
                let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(c, "default");
                let p = pods.get("p1").await.ok()?;
                let s = p.status?;
                (s.phase.as_deref() == Some("Running")).then_some(s.pod_ip).flatten()
            })
            .ok()
            .flatten()
    })
    .unwrap();
    // Networked by the node's CNI chain: an address of the node's pod range, in a netns containerd made.
    let ip: std::net::IpAddr = ip.parse().unwrap();
    assert!(ip.to_string().starts_with("10.244.1."), "{ip}");
}
