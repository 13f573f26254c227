//! The cluster tier: a real kubelet runs the pods the API server schedules, and Ambit installed by its own
//! manifests. Needs root, the Kubernetes binaries (`scripts/kube-build kube-apiserver kubelet
//! kube-controller-manager kube-scheduler`) and Debian's kubectl 1.20 (`scripts/test` provides both).

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use lab::cluster::{AMBIT_NAMESPACE, Cluster, TOOLS_IMAGE};
use lab::util::wait_for;
use lab::{Lab, LabConfig};

/// A pod, through the API.
fn api_pod(lab: &Lab, namespace: &str, name: &str) -> Option<Pod> {
    let (ns, name) = (namespace.to_string(), name.to_string());
    lab.kube()
        .run(move |c| async move {
            let pods: kube::Api<Pod> = kube::Api::namespaced(c, &ns);
            pods.get_opt(&name).await.ok().flatten()
        })
        .ok()
        .flatten()
}

/// Creates a pod through the API server and waits until the kubelet runs it; returns it.
fn run_pod(lab: &Lab, cluster: &Cluster, namespace: &str, name: &str, image: &str, command: &[&str]) -> Pod {
    let mut container = serde_json::json!({"name": "app", "image": image, "imagePullPolicy": "Never"});
    if !command.is_empty() {
        container["command"] = serde_json::json!(command);
    }
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {"containers": [container], "terminationGracePeriodSeconds": 1},
    }))
    .unwrap();
    // The namespace's default service account (made by the controller-manager) must exist first.
    wait_for(&format!("pod {namespace}/{name} to be created"), Duration::from_secs(30), || {
        let pod = pod.clone();
        let ns = namespace.to_string();
        lab.kube()
            .run(move |c| async move {
                let pods: kube::Api<Pod> = kube::Api::namespaced(c, &ns);
                pods.create(&Default::default(), &pod).await.ok()
            })
            .ok()
            .flatten()
    })
    .unwrap();
    wait_for(&format!("pod {namespace}/{name} to run"), Duration::from_secs(60), || {
        let p = api_pod(lab, namespace, name)?;
        let s = p.status.as_ref()?;
        (s.phase.as_deref() == Some("Running") && s.pod_ip.is_some()).then_some(p)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.describe(lab)))
}

fn pod_ip(p: &Pod) -> std::net::IpAddr {
    p.status.as_ref().unwrap().pod_ip.as_ref().unwrap().parse().unwrap()
}

/// Whether the pod's netns holds Ambit's rules.
fn captured(netns: &lab::Netns) -> bool {
    netns.command("nft").args(["list", "table", "inet", "ambit"]).output().is_ok_and(|o| o.status.success())
}

/// One echo round trip from inside `from` to `to`.
fn echo(from: &lab::Netns, to: std::net::SocketAddr) -> anyhow::Result<()> {
    from.run(move || -> anyhow::Result<()> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"through the mesh")?;
        let mut back = [0u8; 16];
        s.read_exact(&mut back)?;
        anyhow::ensure!(&back == b"through the mesh", "echo mismatch");
        Ok(())
    })?
}

/// The mutual-TLS connections ztunnel reports as the destination of, to `workload`, from `principal`.
fn mtls_connections_to(lab: &Lab, cluster: &Cluster, workload: &str, principal: &str) -> u64 {
    let ztunnel = cluster.pod_by_label(lab, AMBIT_NAMESPACE, "app=ztunnel").expect("ztunnel's pod");
    let netns = cluster.pod_netns(lab, 0, AMBIT_NAMESPACE, &ztunnel).expect("ztunnel's netns");
    let (_, metrics) =
        lab::net::http_get(&netns, std::net::SocketAddr::from(([127, 0, 0, 1], 15020)), "/metrics").unwrap_or_default();
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .filter(|l| l.contains("reporter=\"destination\""))
        .filter(|l| l.contains(&format!("destination_workload=\"{workload}\"")))
        .filter(|l| l.contains(&format!("source_principal=\"{principal}\"")))
        .filter(|l| l.contains("connection_security_policy=\"mutual_tls\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn chained(lab: &Lab) -> bool {
    lab.nodes[0]
        .cni
        .load_conflist()
        .is_ok_and(|c| c["plugins"].as_array().is_some_and(|p| p.iter().any(|p| p["type"] == "ambit-cni")))
}

/// A token the API server mints for `namespace/sa` (TokenRequest), for `audiences`, bound to no pod.
fn token_for(lab: &Lab, namespace: &str, sa: &str, audiences: &[&str]) -> String {
    let (ns, sa) = (namespace.to_string(), sa.to_string());
    let audiences: Vec<String> = audiences.iter().map(|a| a.to_string()).collect();
    lab.kube()
        .run(move |c| async move {
            use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
            let sas: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> = kube::Api::namespaced(c, &ns);
            let req = TokenRequest {
                spec: TokenRequestSpec { audiences, expiration_seconds: Some(600), ..Default::default() },
                ..Default::default()
            };
            sas.create_token_request(&sa, &Default::default(), &req).await.unwrap().status.unwrap().token
        })
        .unwrap()
}

/// What the control plane answers a node proxy's certificate request carrying `token`, from node 1.
fn ask_ca(lab: &Lab, token: String, id: &str) -> String {
    let root = lab.dir.join("ca-cert.pem");
    let token_file = lab.dir.join(format!("token-{}", lab::util::unique_id()));
    std::fs::write(&token_file, token).unwrap();
    let id: ztunnel::identity::Identity = id.parse().unwrap();
    let r = lab.nodes[0]
        .netns
        .run(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let ca = ztunnel::controlplane::IstioCa::new(
                    ztunnel::controlplane::Target {
                        address: format!("https://{}:{}", lab::controlplane::CP_IP, lab::controlplane::CP_PORT),
                        root_ca: root,
                        alt_hostname: None,
                        token: Some(token_file),
                        cluster_id: "Kubernetes".into(),
                    },
                    Duration::from_secs(3600),
                );
                let req = ztunnel::ca::CertRequest::new(&id).unwrap();
                ca.create_certificate(&id, &req.csr_pem).await
            })
        })
        .unwrap();
    match r {
        Ok(_) => "signed".into(),
        Err(e) => e.to_string(),
    }
}

/// A one-node tier: the lab's node with containerd, the API server, controller-manager and scheduler, and a
/// real kubelet.
fn tier() -> (Lab, Cluster) {
    let mut lab =
        Lab::start(LabConfig { kubernetes: true, runtime: true, nodes: 1, start_daemons: false, ..Default::default() })
            .expect("lab starts");
    let cluster = Cluster::start(&mut lab).expect("the cluster starts");
    (lab, cluster)
}

/// The tier alone, without Ambit: a pod created through the API server is scheduled, run by the kubelet over
/// the node's CNI chain, and gets an address of the node's range.
#[test]
fn a_real_kubelet_runs_a_scheduled_pod() {
    let (lab, cluster) = tier();
    let pod = run_pod(&lab, &cluster, "default", "p1", "docker.io/library/pause:latest", &[]);
    assert!(pod_ip(&pod).to_string().starts_with("10.244.1."), "{:?}", pod.status);
}

/// Issue 14's cluster tier: Ambit installed by `kubectl apply -k` of its own manifests, run by a real kubelet;
/// pods of an ambient namespace start captured and talk over HBONE; `debug pod` in the agent's pod says so; a
/// rolling update of the agent changes nothing on the node; deleting the agent's DaemonSet removes Ambit.
#[test]
fn ambit_installed_by_its_manifests_captures_pods_that_talk_over_hbone() {
    let (mut lab, cluster) = tier();
    let bin_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug");
    cluster.install_ambit(&mut lab, &bin_dir).unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.describe(&lab)));

    // The agent's pod installed the plugin into the node's bin dir and chained it after the primary CNI.
    assert!(lab.nodes[0].dir.join("cni-bin/ambit-cni").exists());
    assert!(chained(&lab));
    let plugins = lab.nodes[0].cni.load_conflist().unwrap()["plugins"].clone();
    assert_eq!(plugins.as_array().unwrap().last().unwrap()["type"], "ambit-cni", "{plugins:#}");

    // The control plane checks node proxies as istiod does: a token the API server minted for Istio's audience,
    // of a trusted node account, bound to a pod on the node whose pods' identities it asks for.
    let id = "spiffe://cluster.local/ns/ambit-system/sa/ztunnel";
    let e = ask_ca(&lab, token_for(&lab, AMBIT_NAMESPACE, "ztunnel", &["https://kubernetes.default.svc"]), id);
    assert!(e.contains("Unauthenticated") && e.contains("does not vouch"), "another audience: {e}");
    let e = ask_ca(&lab, token_for(&lab, AMBIT_NAMESPACE, "ambit-node", &["istio-ca"]), id);
    assert!(e.contains("PermissionDenied") && e.contains("not a trusted node account"), "the agent's account: {e}");
    let e = ask_ca(&lab, token_for(&lab, AMBIT_NAMESPACE, "ztunnel", &["istio-ca"]), id);
    assert!(e.contains("PermissionDenied") && e.contains("not bound to a pod"), "an unbound token: {e}");

    // Pods of an ambient namespace start captured.
    lab.k8s_namespace("demo", Some("ambient")).unwrap();
    let server = run_pod(
        &lab,
        &cluster,
        "demo",
        "echo",
        TOOLS_IMAGE,
        &["/usr/local/bin/lab", "echo", "--listen", "0.0.0.0:8080"],
    );
    let client = run_pod(&lab, &cluster, "demo", "client", "docker.io/library/pause:latest", &[]);
    let client_ns = cluster.pod_netns(&lab, 0, "demo", "client").unwrap();
    let server_ns = cluster.pod_netns(&lab, 0, "demo", "echo").unwrap();
    assert!(captured(&client_ns) && captured(&server_ns), "{}", cluster.describe(&lab));
    let annotated = |name: &str| {
        api_pod(&lab, "demo", name)
            .and_then(|p| p.metadata.annotations)
            .is_some_and(|a| a.get("ambient.istio.io/redirection").map(String::as_str) == Some("enabled"))
    };
    assert!(annotated("client") && annotated("echo"));

    // istiod's view of them: both workloads, pushed to ztunnel (which proved who it is with its pod's token).
    let cp_dir = lab.control_plane().dir.clone();
    let since = lab::controlplane::push_records_end(&cp_dir);
    for p in [&server, &client] {
        let (ns, name) = (p.metadata.namespace.clone().unwrap(), p.metadata.name.clone().unwrap());
        lab.publish_workload(p.metadata.uid.as_deref().unwrap(), &ns, &name, "default", pod_ip(p), 0, true).unwrap();
    }
    let version = lab::controlplane::mesh_version(&std::fs::read(lab.workloads_path()).unwrap());
    lab.wait_pushed(&version, &[true], since).unwrap_or_else(|e| panic!("{e:#}\n{}", lab.control_plane().log()));

    // They talk, over HBONE with mutual TLS under their SPIFFE identities.
    let principal = "spiffe://cluster.local/ns/demo/sa/default";
    let to = std::net::SocketAddr::new(pod_ip(&server), 8080);
    let before = mtls_connections_to(&lab, &cluster, "echo", principal);
    echo(&client_ns, to).unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.describe(&lab)));
    let after = wait_for("ztunnel to count the connection", Duration::from_secs(10), || {
        let n = mtls_connections_to(&lab, &cluster, "echo", principal);
        (n > before).then_some(n)
    });
    assert!(after.is_ok(), "no mutual-TLS connection to echo from {principal} was reported");

    // `ambit-agent debug pod`, run inside the agent's pod as the deploy README says, finds it captured.
    let agent = cluster.pod_by_label(&lab, AMBIT_NAMESPACE, "app=ambit-node").unwrap();
    let out = lab
        .kubectl(&[
            "-n",
            AMBIT_NAMESPACE,
            "exec",
            &agent,
            "--",
            "/usr/local/bin/ambit-agent",
            "--config",
            "/etc/ambit/agent.yaml",
            "debug",
            "pod",
            "demo/client",
            "-o",
            "json",
        ])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(report["verdict"], "captured", "{report:#}");
    assert_eq!(report["ztunnel"]["serves"], true, "{report:#}");
    assert_eq!(report["ztunnel"]["identity"], principal, "{report:#}");

    // A rolling update of the agent's DaemonSet: the plugin stays chained and the pods' rules stay in place
    // all along; the new agent takes over, and a pod started afterwards is captured.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = {
        let (stop, conf_dir, client_ns) =
            (stop.clone(), lab.nodes[0].cni.clone(), lab::Netns::open(client_ns.name()).unwrap());
        std::thread::spawn(move || {
            let mut gaps = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let chained = conf_dir
                    .load_conflist()
                    .is_ok_and(|c| c["plugins"].as_array().is_some_and(|p| p.iter().any(|p| p["type"] == "ambit-cni")));
                if !chained {
                    gaps.push("the plugin was unchained");
                }
                if !captured(&client_ns) {
                    gaps.push("the client's rules were gone");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            gaps
        })
    };
    lab.kubectl(&["-n", AMBIT_NAMESPACE, "rollout", "restart", "daemonset/ambit-node"]).unwrap();
    lab.kubectl(&["-n", AMBIT_NAMESPACE, "rollout", "status", "daemonset/ambit-node", "--timeout=120s"])
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.describe(&lab)));
    let new_agent = cluster.wait_ready_pod(&lab, AMBIT_NAMESPACE, "app=ambit-node").unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let gaps = watch.join().unwrap();
    assert!(gaps.is_empty(), "during the rolling update: {gaps:?}");
    assert_ne!(new_agent.metadata.name.as_deref(), Some(agent.as_str()), "the agent's pod was not replaced");
    echo(&client_ns, to).unwrap_or_else(|e| panic!("after the update: {e:#}\n{}", cluster.describe(&lab)));
    let _late = run_pod(&lab, &cluster, "demo", "late", "docker.io/library/pause:latest", &[]);
    assert!(captured(&cluster.pod_netns(&lab, 0, "demo", "late").unwrap()), "a pod started after the update");

    // Deleting the agent's DaemonSet removes Ambit from the node: pods un-enrolled, the plugin unchained and
    // out of the bin dir; the pods keep talking, uncaptured.
    lab.kubectl(&["-n", AMBIT_NAMESPACE, "delete", "daemonset", "ambit-node", "--wait=true"]).unwrap();
    wait_for("the agent's pod to be gone (it uninstalls while it terminates)", Duration::from_secs(60), || {
        let left = lab.kubectl(&["-n", AMBIT_NAMESPACE, "get", "pods", "-l", "app=ambit-node", "-o", "name"]).ok()?;
        left.trim().is_empty().then_some(())
    })
    .unwrap();
    assert!(!chained(&lab), "the plugin is still chained after the DaemonSet was deleted");
    assert!(!lab.nodes[0].dir.join("cni-bin/ambit-cni").exists(), "the plugin is still in the bin dir");
    assert!(!captured(&client_ns) && !captured(&server_ns), "pods still captured after the uninstall");
    echo(&client_ns, to).unwrap_or_else(|e| panic!("after the uninstall: {e:#}"));
}
