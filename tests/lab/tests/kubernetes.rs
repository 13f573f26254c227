//! The Kubernetes tier: a real etcd and kube-apiserver, the agents in Kubernetes mode, the lab as kubelet.
//! Needs root and the kube-apiserver binary (`scripts/kube-apiserver`).

use std::net::SocketAddr;
use std::time::Duration;

use lab::demo::APP_PORT;
use lab::lab::PodSpec;
use lab::net::{EchoClient, EchoServer};
use lab::util::wait_for;
use lab::{Lab, LabConfig, Pod};

const MODE: &str = "istio.io/dataplane-mode";
const REDIRECTION: &str = "ambient.istio.io/redirection";

fn lab() -> Lab {
    Lab::start(LabConfig { kubernetes: true, enrolled_namespaces: vec![], ..Default::default() }).expect("lab starts")
}

fn spec(sa: &str, labels: &[(&str, &str)]) -> PodSpec {
    PodSpec {
        service_account: Some(sa.into()),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    }
}

fn annotation(lab: &Lab, p: &Pod) -> Option<String> {
    lab.k8s_pod(&p.namespace, &p.name).ok()??.metadata.annotations?.get(REDIRECTION).cloned()
}

fn captured(p: &Pod) -> bool {
    p.nft_ruleset().map(|r| r.contains("table inet ambit")).unwrap_or(false)
}

fn served(lab: &Lab, p: &Pod) -> bool {
    lab.nodes[p.node]
        .config_dump()
        .map(|d| d["ambit"]["inpod"]["pods"].as_array().is_some_and(|a| a.iter().any(|x| x["uid"] == p.uid.as_str())))
        .unwrap_or(false)
}

fn wait_state(lab: &Lab, p: &Pod, enrolled: bool) {
    wait_for(
        &format!("{} to be {}", p.full_name(), if enrolled { "enrolled" } else { "released" }),
        Duration::from_secs(20),
        || {
            let ok = captured(p) == enrolled
                && served(lab, p) == enrolled
                && (annotation(lab, p).as_deref() == Some("enabled")) == enrolled;
            ok.then_some(())
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: rules {}, served {}, annotation {:?}\n{}",
            captured(p),
            served(lab, p),
            annotation(lab, p),
            lab.logs()
        )
    });
}

#[test]
fn labels_decide_enrolment_at_pod_start() {
    let lab = lab();
    lab.k8s_namespace("mesh", Some("ambient")).unwrap();
    lab.k8s_namespace("plain", None).unwrap();
    let in_mesh = lab.add_k8s_pod(0, "mesh", "a", spec("web", &[])).unwrap();
    let opted_out = lab.add_k8s_pod(0, "mesh", "b", spec("web", &[(MODE, "none")])).unwrap();
    let outside = lab.add_k8s_pod(0, "plain", "c", spec("web", &[])).unwrap();
    let pod_label = lab.add_k8s_pod(0, "plain", "d", spec("web", &[(MODE, "ambient")])).unwrap();
    let sidecar = lab
        .add_k8s_pod(
            0,
            "mesh",
            "e",
            PodSpec { annotations: vec![("sidecar.istio.io/status".into(), "{}".into())], ..Default::default() },
        )
        .unwrap();
    // Enrolled pods are captured before the CNI ADD returns (the pod could not start otherwise).
    assert!(captured(&in_mesh) && captured(&pod_label));
    for p in [&opted_out, &outside, &sidecar] {
        assert!(!captured(p), "{} must not be captured", p.full_name());
    }
    wait_state(&lab, &in_mesh, true);
    wait_state(&lab, &pod_label, true);
    let dump = lab.nodes[0].config_dump().unwrap();
    let id = dump["ambit"]["inpod"]["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["uid"] == in_mesh.uid.as_str())
        .unwrap()["identity"]
        .clone();
    assert_eq!(id, "spiffe://cluster.local/ns/mesh/sa/web", "the identity comes from the pod's service account");
    for p in [&opted_out, &outside, &sidecar] {
        assert_eq!(annotation(&lab, p), None);
    }
}

#[test]
fn labelling_a_namespace_enrols_running_pods_and_unlabelling_releases_them() {
    let lab = lab();
    lab.k8s_namespace("later", None).unwrap();
    let client = lab.add_k8s_pod(0, "later", "client", spec("client", &[])).unwrap();
    let server = lab.add_k8s_pod(1, "later", "server", spec("server", &[])).unwrap();
    let echo = EchoServer::start(&server.netns, SocketAddr::new(server.ip, APP_PORT)).unwrap();
    assert!(!captured(&client) && !captured(&server));
    let mut before = EchoClient::connect(&client.netns, echo.addr(), Duration::from_secs(5)).unwrap();

    lab.k8s_namespace("later", Some("ambient")).unwrap();
    wait_state(&lab, &client, true);
    wait_state(&lab, &server, true);
    // Now the mesh carries new connections (the lab publishes them as HBONE workloads).
    lab.publish_as(&client, true).unwrap();
    lab.publish_as(&server, true).unwrap();
    let mut c = EchoClient::connect(&client.netns, echo.addr(), Duration::from_secs(5)).unwrap();
    c.round_trip(b"through the mesh").unwrap();
    assert_eq!(c.seen_ip(), client.ip.to_string());
    drop(c);
    // The access log line is written when the connection closes.
    wait_for("the mesh connection's access log", Duration::from_secs(5), || {
        let log = lab.nodes[0].ztunnel.as_ref()?.log();
        log.contains("src.identity=\"spiffe://cluster.local/ns/later/sa/client\"").then_some(())
    })
    .unwrap();
    // A connection opened before enrolment was not cut.
    before.round_trip(b"opened before").unwrap();

    lab.k8s_namespace("later", None).unwrap();
    wait_state(&lab, &client, false);
    wait_state(&lab, &server, false);
    assert!(!client.netns.ip(&["rule", "show"]).unwrap().contains("0x111"));
}

#[test]
fn finished_and_deleted_pods_are_forgotten() {
    let lab = lab();
    lab.k8s_namespace("mesh", Some("ambient")).unwrap();
    let job = lab.add_k8s_pod(0, "mesh", "job", spec("default", &[])).unwrap();
    let web = lab.add_k8s_pod(0, "mesh", "web", spec("default", &[])).unwrap();
    wait_state(&lab, &job, true);
    wait_state(&lab, &web, true);
    lab.set_pod_status("mesh", "job", "Succeeded", None).unwrap();
    wait_for("the finished pod to be forgotten", Duration::from_secs(20), || (!served(&lab, &job)).then_some(()))
        .unwrap();
    let web_uid = web.uid.clone();
    lab.delete_k8s_pod(web).unwrap();
    wait_for("the deleted pod to be forgotten", Duration::from_secs(20), || {
        let d = lab.nodes[0].config_dump().ok()?;
        (!d["ambit"]["inpod"]["pods"].as_array()?.iter().any(|x| x["uid"] == web_uid.as_str())).then_some(())
    })
    .unwrap();
    let (_, m) = lab.agent_get(0, "/metrics").unwrap();
    assert!(m.lines().any(|l| l == "ambit_agent_pods_enrolled 0"), "{m}");
}

#[test]
fn labels_flipping_quickly_converge() {
    let lab = lab();
    lab.k8s_namespace("flip", None).unwrap();
    let p = lab.add_k8s_pod(0, "flip", "p", spec("default", &[])).unwrap();
    for i in 0..10 {
        lab.k8s_namespace("flip", if i % 2 == 0 { Some("ambient") } else { None }).unwrap();
    }
    // The last write was "no label".
    wait_state(&lab, &p, false);
    lab.k8s_namespace("flip", Some("ambient")).unwrap();
    lab.k8s_namespace("flip", None).unwrap();
    lab.k8s_namespace("flip", Some("ambient")).unwrap();
    wait_state(&lab, &p, true);
    let rules = p.nft_ruleset().unwrap();
    assert_eq!(rules.matches("table inet ambit").count(), 1, "{rules}");
    assert_eq!(p.netns.ip(&["rule", "show"]).unwrap().matches("0x111").count(), 1);
}

#[test]
fn an_unreachable_api_fails_closed_and_recovers() {
    let mut lab = lab();
    lab.k8s_namespace("mesh", Some("ambient")).unwrap();
    let known = lab.add_k8s_pod(0, "mesh", "known", spec("default", &[])).unwrap();
    wait_state(&lab, &known, true);
    // The API goes away: a pod the agent cannot look up is refused (its traffic would otherwise be decided
    // without knowing its labels), with a message saying why.
    lab.kube_mut().stop_apiserver();
    let n = &lab.nodes[0];
    let conf = {
        let list = n.cni.load_conflist().unwrap();
        let mut c = list["plugins"].as_array().unwrap().iter().find(|p| p["type"] == "ambit-cni").unwrap().clone();
        c["name"] = list["name"].clone();
        c["cniVersion"] = list["cniVersion"].clone();
        c
    };
    let ns = lab::Netns::create(&format!("ambit-{}-unknown", lab.id)).unwrap();
    let att = lab::cni::Attachment {
        container_id: "c-unknown".into(),
        netns: ns.path(),
        ifname: "eth0".into(),
        args: "K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=unknown;K8S_POD_UID=00000000-0000-0000-0000-000000000001".into(),
    };
    let e = n.cni.exec_raw(&n.netns, "ADD", &att, &conf).unwrap_err();
    assert_eq!(e.code(), Some(11), "{e}");
    assert!(e.msg().contains("Kubernetes API"), "{}", e.msg());
    assert!(served(&lab, &known), "enrolled pods stay served while the API is away");
    // An agent restarted while the API is away still serves and reports why it is not ready.
    lab.spawn_agent(0).unwrap();
    let body =
        wait_for("the agent to say why it is unready", Duration::from_secs(20), || match lab.agent_get(0, "/readyz") {
            Ok((503, b)) if b.contains("Kubernetes") => Some(b),
            _ => None,
        })
        .unwrap();
    assert!(body.contains("synced"), "{body}");
    lab.kube_mut().start_apiserver().unwrap();
    lab.wait_agent_ready(0).unwrap();
    let late = lab.add_k8s_pod(0, "mesh", "late", spec("default", &[])).unwrap();
    wait_state(&lab, &late, true);
    assert!(served(&lab, &known));
}

#[test]
fn a_restarted_agent_rebuilds_from_the_api_and_proc() {
    let mut lab = lab();
    lab.k8s_namespace("mesh", Some("ambient")).unwrap();
    let p = lab.add_k8s_pod(0, "mesh", "p", spec("default", &[])).unwrap();
    wait_state(&lab, &p, true);
    // The agent loses its records (a wiped state dir): the API says the pod is enrolled, /proc finds its netns.
    lab.nodes[0].agent.as_mut().unwrap().stop(Duration::from_secs(5));
    for e in std::fs::read_dir(lab.nodes[0].dir.join("state")).unwrap().flatten() {
        std::fs::remove_file(e.path()).unwrap();
    }
    lab.start_agent(0).unwrap();
    let rec_path = wait_for("the agent to re-adopt the pod", Duration::from_secs(20), || {
        let records = lab.nodes[0].pod_records();
        (records.len() == 1).then(|| records[0].clone())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(rec_path).unwrap()).unwrap();
    assert!(rec["netnsPath"].as_str().unwrap().starts_with("/proc/"), "{rec}");
    assert_eq!(p.nft_ruleset().unwrap().matches("table inet ambit").count(), 1);
    assert!(served(&lab, &p));
}

#[test]
fn a_pod_whose_recorded_netns_went_stale_stays_served_across_a_restart() {
    let mut lab = lab();
    lab.k8s_namespace("mesh", Some("ambient")).unwrap();
    let p = lab.add_k8s_pod(0, "mesh", "p", spec("default", &[])).unwrap();
    wait_state(&lab, &p, true);
    lab.nodes[0].agent.as_mut().unwrap().stop(Duration::from_secs(5));
    // The recorded netns path no longer leads to the pod's netns.
    let rec_path = lab.nodes[0].pod_records().remove(0);
    let mut rec: serde_json::Value = serde_json::from_slice(&std::fs::read(&rec_path).unwrap()).unwrap();
    rec["netnsPath"] = serde_json::json!("/proc/999999999/ns/net");
    std::fs::write(&rec_path, serde_json::to_vec(&rec).unwrap()).unwrap();
    lab.start_agent(0).unwrap();
    // The agent asked ztunnel to keep the pod, then found its netns through /proc.
    wait_for("the agent to find the pod's netns again", Duration::from_secs(20), || {
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&rec_path).ok()?).ok()?;
        let path = r["netnsPath"].as_str()?.to_string();
        (path != "/proc/999999999/ns/net" && std::path::Path::new(&path).exists()).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert!(served(&lab, &p));
    let zlog = lab.nodes[0].ztunnel.as_ref().unwrap().log();
    assert!(
        !zlog.contains("stopped serving pod"),
        "ztunnel stopped serving the pod across the restart:\n{}",
        lab.logs()
    );
    assert_eq!(p.nft_ruleset().unwrap().matches("table inet ambit").count(), 1);
}

#[test]
fn the_agent_uninstalls_only_when_its_daemonset_goes() {
    let mut lab = lab();
    lab.k8s_namespace("ambit-system", None).unwrap();
    lab.k8s_namespace("mesh", Some("ambient")).unwrap();
    let p = lab.add_k8s_pod(0, "mesh", "web", spec("default", &[])).unwrap();
    wait_state(&lab, &p, true);
    // The agent's own DaemonSet and pod, as the cluster would have them (no controllers run in the lab).
    let ds_uid: String = lab
        .kube()
        .run(|c| async move {
            use k8s_openapi::api::apps::v1::DaemonSet;
            let ds: DaemonSet = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "ambit-node", "namespace": "ambit-system"},
                "spec": {"selector": {"matchLabels": {"app": "ambit-node"}},
                         "template": {"metadata": {"labels": {"app": "ambit-node"}},
                                      "spec": {"containers": [{"name": "agent", "image": "ambit"}]}}}
            }))
            .unwrap();
            let api: kube::Api<DaemonSet> = kube::Api::namespaced(c, "ambit-system");
            api.create(&Default::default(), &ds).await.unwrap().metadata.uid.unwrap()
        })
        .unwrap();
    let owner = serde_json::json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "ambit-node", "uid": ds_uid, "controller": true});
    lab.kube()
        .run(move |c| async move {
            use k8s_openapi::api::core::v1::Pod as KPod;
            let pod: KPod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "ambit-node-x1", "namespace": "ambit-system", "ownerReferences": [owner]},
                "spec": {"nodeName": "node1", "hostNetwork": true, "containers": [{"name": "agent", "image": "ambit"}]}
            }))
            .unwrap();
            kube::Api::<KPod>::namespaced(c, "ambit-system").create(&Default::default(), &pod).await.unwrap();
        })
        .unwrap();
    let env = [("POD_NAME", "ambit-node-x1"), ("POD_NAMESPACE", "ambit-system")];
    let chained = |lab: &Lab| {
        std::fs::read_to_string(lab.nodes[0].dir.join("net.d/10-lab.conflist")).unwrap().contains("ambit-cni")
    };

    // SIGTERM while the DaemonSet exists: an upgrade, everything stays.
    lab.spawn_agent_with_env(0, &env).unwrap();
    lab.wait_agent_ready(0).unwrap();
    lab.nodes[0].agent.as_mut().unwrap().stop(Duration::from_secs(10));
    let log = lab.nodes[0].agent.as_ref().unwrap().log();
    assert!(chained(&lab), "an upgrade unchained the plugin:\n{log}");
    assert!(captured(&p), "an upgrade un-enrolled the pod:\n{log}");
    assert!(lab.nodes[0].dir.join("cni-bin/ambit-cni").exists(), "an upgrade removed the plugin:\n{log}");

    // The DaemonSet is deleted: the next SIGTERM removes Ambit from the node.
    lab.kube()
        .run(|c| async move {
            use k8s_openapi::api::apps::v1::DaemonSet;
            let dp = kube::api::DeleteParams {
                propagation_policy: Some(kube::api::PropagationPolicy::Orphan),
                ..Default::default()
            };
            let _ = kube::Api::<DaemonSet>::namespaced(c, "ambit-system").delete("ambit-node", &dp).await.unwrap();
        })
        .unwrap();
    lab.spawn_agent_with_env(0, &env).unwrap();
    lab.wait_agent_ready(0).unwrap();
    lab.nodes[0].agent.as_mut().unwrap().stop(Duration::from_secs(10));
    assert!(!chained(&lab), "the plugin is still chained after the DaemonSet was deleted");
    assert!(!lab.nodes[0].dir.join("cni-bin/ambit-cni").exists());
    assert!(!captured(&p), "the pod was not un-enrolled");
}

#[test]
fn the_deploy_manifests_are_accepted_by_the_api_server() {
    let lab = Lab::start(LabConfig { kubernetes: true, nodes: 1, start_daemons: false, ..Default::default() }).unwrap();
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    let kubectl = |args: &[&str]| -> String { lab.kubectl(args).unwrap_or_else(|e| panic!("{e:#}")) };
    // The base, as kustomize renders it.
    let base = deploy.join("kubernetes").display().to_string();
    let docs: Vec<serde_json::Value> = kubectl(&["kustomize", &base])
        .split("\n---")
        .map(|d| serde_yaml_ng::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .filter(|v: &serde_json::Value| !v.is_null())
        .collect();
    assert!(docs.len() >= 10, "expected the whole deployment, found {} objects", docs.len());
    // The agent's config in the ConfigMap is one the agent accepts, and ztunnel's environment one ztunnel accepts.
    let cm = docs.iter().find(|v| v["kind"] == "ConfigMap" && v["metadata"]["name"] == "ambit-node").unwrap();
    ambit_agent::config::Config::parse(cm["data"]["agent.yaml"].as_str().unwrap()).unwrap();
    let zt = docs.iter().find(|v| v["kind"] == "DaemonSet" && v["metadata"]["name"] == "ztunnel").unwrap();
    let env: std::collections::HashMap<String, String> = zt["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?.to_string(), e["value"].as_str()?.to_string())))
        .collect();
    let zc = ztunnel::config::Config::from_vars(|k| env.get(k).cloned()).unwrap();
    // ztunnel runs on istiod: certificates from its CA with a projected token, no CA key on any node.
    assert!(zc.local_ca.is_none() && zc.local_xds_path.is_none(), "{env:?}");
    assert_eq!(zc.xds_address.as_deref(), Some("https://istiod.istio-system.svc:15012"));
    let volumes = &zt["spec"]["template"]["spec"]["volumes"];
    assert!(volumes.to_string().contains("\"audience\":\"istio-ca\""), "no projected istio-ca token: {volumes}");
    assert!(volumes.to_string().contains("istio-ca-root-cert"), "{volumes}");
    for v in &docs {
        assert!(v["kind"] != "Secret" && !v.to_string().contains("ca-key"), "{v} hands out a CA key");
    }

    // `kubectl apply -k` creates all of it.
    let applied = kubectl(&["apply", "-k", &base]);
    for what in ["namespace/ambit-system", "daemonset.apps/ambit-node", "daemonset.apps/ztunnel"] {
        assert!(applied.contains(&format!("{what} created")), "{applied}");
    }

    // The overlay for a cluster running istiod: Istio's names, nothing of istio-system's own touched.
    let overlay = deploy.join("overlays/istiod").display().to_string();
    let rendered = kubectl(&["kustomize", &overlay]);
    let docs: Vec<serde_json::Value> = rendered
        .split("\n---")
        .map(|d| serde_yaml_ng::from_str(d).unwrap())
        .filter(|v: &serde_json::Value| !v.is_null())
        .collect();
    assert!(docs.iter().all(|v| v["kind"] != "Namespace"), "the overlay must not own istio-system: {rendered}");
    for v in docs.iter().filter(|v| v["metadata"]["namespace"].is_string()) {
        assert_eq!(v["metadata"]["namespace"], "istio-system", "{v}");
    }
    let cm = docs.iter().find(|v| v["kind"] == "ConfigMap").unwrap();
    let agent = ambit_agent::config::Config::parse(cm["data"]["agent.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(agent.install.plugin_config["agent_namespace"], "istio-system");
    let binding = docs.iter().find(|v| v["kind"] == "ClusterRoleBinding").unwrap();
    assert_eq!(binding["subjects"][0]["namespace"], "istio-system", "{binding}");
    kubectl(&["create", "namespace", "istio-system"]);
    let applied = kubectl(&["apply", "-k", &overlay]);
    assert!(applied.contains("daemonset.apps/ztunnel created"), "{applied}");
    let sa = kubectl(&["get", "serviceaccount", "-n", "istio-system", "ztunnel", "-o", "name"]);
    assert_eq!(sa.trim(), "serviceaccount/ztunnel", "istiod trusts istio-system/ztunnel by default");
}
