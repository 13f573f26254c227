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

#[test]
fn ambits_image_runs_its_binaries_and_nft() {
    let mut lab =
        Lab::start(LabConfig { kubernetes: true, runtime: true, nodes: 1, start_daemons: false, ..Default::default() })
            .expect("lab starts");
    let bin_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug");
    let tar = lab::cluster::build_ambit_image(&lab.dir.join("images/ambit"), &bin_dir).unwrap();
    lab.nodes[0].containerd.as_ref().unwrap().import(&tar, "docker.io/ambit/ambit:latest").unwrap();
    let _cluster = Cluster::start(&mut lab).expect("the cluster starts");
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "tools", "namespace": "default"},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "c", "image": "docker.io/ambit/ambit:latest", "imagePullPolicy": "Never",
            "command": ["/usr/sbin/nft", "--version"],
        }]},
    }))
    .unwrap();
    lab.kube()
        .run(move |c| async move {
            let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(c, "default");
            pods.create(&Default::default(), &pod).await
        })
        .unwrap()
        .unwrap();
    let phase = wait_for("the tools pod to finish", Duration::from_secs(60), || {
        lab.kube()
            .run(|c| async move {
                let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(c, "default");
                let phase = pods.get("tools").await.ok()?.status?.phase?;
                matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
            })
            .ok()
            .flatten()
    })
    .unwrap();
    assert_eq!(phase, "Succeeded");
}
