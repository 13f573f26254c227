//! End to end at L4: services (VIPs and load balancing across nodes), passthrough, authorization policy on
//! HBONE and plaintext (STRICT refusing plaintext), a broken local file (the mode without a control plane),
//! and the admin endpoints. Needs root.

use std::net::SocketAddr;
use std::time::Duration;

use lab::demo::{APP_PORT, LEGACY_NS, MESH_NS};
use lab::net::{EchoClient, EchoServer, http_request};
use lab::util::{metric, wait_for};
use lab::{Lab, LabConfig, Pod};
use serde_json::json;

const T: Duration = Duration::from_secs(5);

fn lab() -> Lab {
    Lab::start(LabConfig { enrolled_namespaces: vec![MESH_NS.into()], ..Default::default() }).expect("lab starts")
}

/// Whether `from` gets a working echo connection to `to` (greeting and one round trip).
fn reaches(from: &Pod, to: SocketAddr) -> bool {
    EchoClient::connect(&from.netns, to, T).and_then(|mut c| c.round_trip(b"ping")).is_ok()
}

#[test]
fn a_vip_balances_over_endpoints_on_both_nodes_with_ports_mapped() {
    let lab = lab();
    let client = lab.add_pod_as(0, MESH_NS, "client", "client").unwrap();
    let s1 = lab.add_pod_as(0, MESH_NS, "echo-1", "echo").unwrap();
    let s2 = lab.add_pod_as(1, MESH_NS, "echo-2", "echo").unwrap();
    // echo-1 serves the service on its own target port (the workload's map overrides the service's).
    let _e1 = EchoServer::start(&s1.netns, SocketAddr::new(s1.ip, APP_PORT + 1)).unwrap();
    let _e2 = EchoServer::start(&s2.netns, SocketAddr::new(s2.ip, APP_PORT)).unwrap();
    let host = "echo.mesh.svc.cluster.local";
    let key = format!("{MESH_NS}/{host}");
    lab.set_services(vec![json!({
        "name": "echo", "namespace": MESH_NS, "hostname": host,
        "vips": ["/10.96.0.10"], "ports": {"80": APP_PORT},
    })])
    .unwrap();
    lab.set_pod_services(&s1, json!({ &key: {"80": APP_PORT + 1} })).unwrap();
    lab.set_pod_services(&s2, json!({ &key: {} })).unwrap();

    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    for i in 0..6 {
        let mut c = EchoClient::connect(&client.netns, vip, T).unwrap_or_else(|e| panic!("{i}: {e:#}\n{}", lab.logs()));
        c.round_trip(b"through the VIP").unwrap();
        assert_eq!(c.seen_ip(), client.ip.to_string(), "the endpoint sees the client's own IP");
    }
    // Each endpoint's ztunnel served some of them, and says which service they came through.
    for (node, pod) in [(0, &s1), (1, &s2)] {
        let m = lab.nodes[node].metrics().unwrap();
        let labels = [
            "reporter=\"destination\"",
            &format!("destination_service=\"{host}\"") as &str,
            "destination_service_name=\"echo\"",
            &format!("destination_workload=\"{}\"", pod.name),
            "connection_security_policy=\"mutual_tls\"",
        ];
        assert!(metric(&m, "istio_tcp_connections_opened_total", &labels) >= 1.0, "node{}: {m}", node + 1);
    }
    let m = lab.nodes[0].metrics().unwrap();
    let src = ["reporter=\"source\"", &format!("destination_service=\"{host}\"") as &str];
    assert_eq!(metric(&m, "istio_tcp_connections_opened_total", &src), 6.0, "{m}");

    // A port the service does not have: closed, never sent anywhere, flagged NR.
    assert!(!reaches(&client, "10.96.0.10:81".parse().unwrap()));
    let m = lab.nodes[0].metrics().unwrap();
    assert!(metric(&m, "istio_tcp_connections_closed_total", &["response_flags=\"CONNECT\""]) >= 1.0, "{m}");

    // An unhealthy endpoint set: the service's endpoints on node1 only.
    lab.set_pod_services(&s1, json!({})).unwrap();
    for _ in 0..3 {
        assert!(reaches(&client, vip), "{}", lab.logs());
    }
    let dump = lab.nodes[0].config_dump().unwrap();
    let svc = &dump["services"][0];
    assert_eq!(svc["vips"][0], "/10.96.0.10", "{dump:#}");
    assert_eq!(svc["endpoints"].as_object().unwrap().len(), 1, "{dump:#}");
}

#[test]
fn destinations_outside_the_mesh_pass_through_as_plain_tcp() {
    let lab = lab();
    let client = lab.add_pod_as(0, MESH_NS, "client", "client").unwrap();
    let legacy = lab.add_pod(1, LEGACY_NS, "legacy").unwrap();
    let stranger = lab.add_pod(1, LEGACY_NS, "stranger").unwrap();
    lab.unpublish(&stranger).unwrap();
    let _e1 = EchoServer::start(&legacy.netns, SocketAddr::new(legacy.ip, APP_PORT)).unwrap();
    let _e2 = EchoServer::start(&stranger.netns, SocketAddr::new(stranger.ip, APP_PORT)).unwrap();
    for to in [&legacy, &stranger] {
        let mut c = EchoClient::connect(&client.netns, SocketAddr::new(to.ip, APP_PORT), T)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.logs()));
        c.round_trip(b"plain").unwrap();
        assert_eq!(c.seen_ip(), client.ip.to_string());
    }
    let m = lab.nodes[0].metrics().unwrap();
    let plain = ["reporter=\"source\"", "connection_security_policy=\"unknown\""];
    assert!(
        metric(&m, "istio_tcp_connections_opened_total", &[&plain[..], &["destination_workload=\"legacy\""]].concat())
            >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "istio_tcp_connections_opened_total", &[&plain[..], &["destination_workload=\"unknown\""]].concat())
            >= 1.0,
        "{m}"
    );
    // Nothing went over HBONE.
    assert_eq!(metric(&m, "istio_tcp_connections_opened_total", &["connection_security_policy=\"mutual_tls\""]), 0.0);
}

#[test]
fn policies_deny_on_hbone_and_plaintext_and_strict_refuses_plaintext() {
    let lab = lab();
    let client = lab.add_pod_as(0, MESH_NS, "client", "client").unwrap();
    let other = lab.add_pod_as(0, MESH_NS, "other", "other").unwrap();
    let outsider = lab.add_pod(0, LEGACY_NS, "outsider").unwrap();
    let server = lab.add_pod_as(1, MESH_NS, "server", "server").unwrap();
    let _echo = EchoServer::start(&server.netns, SocketAddr::new(server.ip, APP_PORT)).unwrap();
    let to = SocketAddr::new(server.ip, APP_PORT);
    assert!(reaches(&client, to) && reaches(&other, to) && reaches(&outsider, to), "{}", lab.logs());

    // DENY one principal on the app port.
    lab.set_policies(vec![json!({
        "name": "deny-client", "namespace": MESH_NS, "scope": "Namespace", "action": "Deny",
        "rules": [[[{"principals": [{"Exact": "cluster.local/ns/mesh/sa/client"}], "destinationPorts": [APP_PORT]}]]],
    })])
    .unwrap();
    assert!(!reaches(&client, to), "a denied principal got through");
    assert!(reaches(&other, to) && reaches(&outsider, to));
    let m = lab.nodes[1].metrics().unwrap();
    let denied = ["transport=\"hbone\"", "policy=\"mesh/deny-client\""];
    assert_eq!(metric(&m, "ztunnel_policy_denials_total", &denied), 1.0, "{m}");
    assert!(
        metric(&m, "istio_tcp_connections_closed_total", &["reporter=\"destination\"", "response_flags=\"DENY\""])
            >= 1.0
    );
    // The client's side saw no connection (as Istio's ztunnel reports it), and both count it as failed.
    assert!(metric(&m, "istio_tcp_connections_failed_total", &["response_flags=\"DENY\""]) >= 1.0, "{m}");
    let m0 = lab.nodes[0].metrics().unwrap();
    let src_failed = ["reporter=\"source\"", "response_flags=\"CONNECT\""];
    assert!(metric(&m0, "istio_tcp_connections_closed_total", &src_failed) >= 1.0, "{m0}");
    assert!(metric(&m0, "istio_tcp_connections_failed_total", &src_failed) >= 1.0, "{m0}");
    let log = lab.nodes[1].ztunnel.as_ref().unwrap().log();
    assert!(log.contains("mesh/deny-client"), "the denial is logged with the policy's name: {log}");

    // STRICT mTLS, as istiod expresses it: deny what has no principal.
    lab.set_policies(vec![json!({
        "name": "istio_converted_static_strict", "namespace": MESH_NS, "scope": "Namespace", "action": "Deny",
        "rules": [[[{"notPrincipals": [{"Presence": []}]}]]],
    })])
    .unwrap();
    assert!(!reaches(&outsider, to), "STRICT let plaintext in");
    assert!(reaches(&client, to) && reaches(&other, to));
    let m = lab.nodes[1].metrics().unwrap();
    let strict = ["transport=\"plaintext\"", "policy=\"mesh/istio_converted_static_strict\""];
    assert_eq!(metric(&m, "ztunnel_policy_denials_total", &strict), 1.0, "{m}");

    // ALLOW: only `other` may come in, selected by workload; everything else is denied by default.
    lab.set_policies(vec![json!({
        "name": "only-other", "namespace": MESH_NS, "scope": "WorkloadSelector", "action": "Allow",
        "rules": [[[{"principals": [{"Suffix": "/sa/other"}]}]]],
    })])
    .unwrap();
    lab.set_pod_policies(&server, &["mesh/only-other"]).unwrap();
    assert!(reaches(&other, to));
    assert!(!reaches(&client, to) && !reaches(&outsider, to));
    let m = lab.nodes[1].metrics().unwrap();
    assert!(metric(&m, "ztunnel_policy_denials_total", &["policy=\"-\""]) >= 2.0, "{m}");

    // Policies are in the config dump, typed.
    let dump = lab.nodes[1].config_dump().unwrap();
    assert_eq!(dump["policies"][0]["name"], "only-other", "{dump:#}");
    assert_eq!(dump["policies"][0]["rules"][0][0][0]["principals"][0]["Suffix"], "/sa/other", "{dump:#}");
}

#[test]
fn plaintext_a_mesh_client_could_have_sent_over_hbone_is_reported() {
    let lab = lab();
    let ghost = lab.add_pod_as(0, MESH_NS, "ghost", "ghost").unwrap();
    let server = lab.add_pod_as(1, MESH_NS, "server", "server").unwrap();
    let _echo = EchoServer::start(&server.netns, SocketAddr::new(server.ip, APP_PORT)).unwrap();
    // The ghost's capture goes (its ztunnel no longer serves it) while the mesh still lists it as HBONE.
    lab.uncapture(&ghost).unwrap();
    for _ in 0..2 {
        assert!(reaches(&ghost, SocketAddr::new(server.ip, APP_PORT)), "{}", lab.logs());
    }
    let m = lab.nodes[1].metrics().unwrap();
    let from = ["source_workload_namespace=\"mesh\"", "source_workload=\"ghost\""];
    assert_eq!(metric(&m, "ztunnel_inbound_plaintext_from_mesh_total", &from), 2.0, "{m}");
    let log = lab.nodes[1].ztunnel.as_ref().unwrap().log();
    assert_eq!(log.matches("plaintext from a workload that speaks HBONE").count(), 1, "logged once: {log}");
}

/// The mode without a control plane: every ztunnel reads the local file itself.
#[test]
fn a_broken_local_file_keeps_the_last_good_config_and_says_why() {
    let lab =
        Lab::start(LabConfig { enrolled_namespaces: vec![MESH_NS.into()], control_plane: false, ..Default::default() })
            .expect("lab starts");
    let client = lab.add_pod_as(0, MESH_NS, "client", "client").unwrap();
    let server = lab.add_pod_as(1, MESH_NS, "server", "server").unwrap();
    let _echo = EchoServer::start(&server.netns, SocketAddr::new(server.ip, APP_PORT)).unwrap();
    let to = SocketAddr::new(server.ip, APP_PORT);
    let good = std::fs::read_to_string(lab.workloads_path()).unwrap();
    // Every ztunnel has loaded both workloads before the file breaks: that is the last good config they keep.
    for node in &lab.nodes {
        wait_for("both workloads in config_dump", T, || {
            (node.config_dump().ok()?["workloads"].as_array()?.len() == 2).then_some(())
        })
        .unwrap();
    }
    for broken in [
        "workloads: [ {name: x".to_string(),
        format!("{good}\npolicies:\n- {{name: p, namespace: mesh, scope: Sideways, action: Deny}}\n"),
    ] {
        std::fs::write(lab.workloads_path(), &broken).unwrap();
        for node in &lab.nodes {
            wait_for("the error in config_dump", T, || {
                let d = node.config_dump().ok()?;
                d["ambit"]["configSource"]["lastError"].as_str().map(str::to_string)
            })
            .unwrap();
            let d = node.config_dump().unwrap();
            assert_eq!(d["workloads"].as_array().unwrap().len(), 2, "the last good workloads stay: {d:#}");
        }
        assert!(reaches(&client, to), "{}", lab.logs());
    }
    std::fs::write(lab.workloads_path(), &good).unwrap();
    wait_for("the error to clear", T, || {
        lab.nodes[0].config_dump().ok()?["ambit"]["configSource"]["lastError"].is_null().then_some(())
    })
    .unwrap();
}

#[test]
fn admin_changes_the_log_level_and_quits_on_request() {
    let mut lab = lab();
    let node = &lab.nodes[0];
    let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
    let (status, body) = http_request(&node.netns, admin, "POST", "/logging?level=debug").unwrap();
    assert_eq!(status, 200, "{body}");
    let (_, body) = http_request(&node.netns, admin, "GET", "/logging").unwrap();
    assert!(body.contains("debug"), "{body}");
    let (status, _) = http_request(&node.netns, admin, "POST", "/logging?level=ztunnel=shouting").unwrap();
    assert_eq!(status, 400);
    let (status, _) = http_request(&node.netns, admin, "GET", "/quitquitquit").unwrap();
    assert_eq!(status, 405, "quitting takes a POST");
    let (status, _) = http_request(&node.netns, admin, "POST", "/quitquitquit").unwrap();
    assert_eq!(status, 200);
    let z = lab.nodes[0].ztunnel.as_mut().unwrap();
    let exit = z.wait_timeout(Duration::from_secs(10)).expect("ztunnel exits after /quitquitquit");
    assert!(exit.success(), "{exit:?}\n{}", z.log());
}

/// The fields and types `istioctl ztunnel-config` reads from ztunnel's `/config_dump` (istio/istio,
/// `istioctl/pkg/writer/ztunnel/configdump/api.go`), as serde types: Go ignores unknown fields, as these do, but
/// a known field of another type (a list where it reads a map, a string where it reads a number) fails its
/// parse, as it fails these.
mod istioctl {
    use std::collections::HashMap;

    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Dump {
        pub workloads: Vec<Workload>,
        pub services: Vec<Service>,
        pub policies: Vec<Policy>,
        pub certificates: Vec<Certs>,
        pub workload_state: HashMap<String, WorkloadState>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)] // read by Debug: the point is that they parse
    pub struct Workload {
        pub uid: String,
        pub workload_ips: Vec<String>,
        pub protocol: String,
        pub name: String,
        pub namespace: String,
        pub service_account: String,
        #[serde(default)]
        pub workload_name: String,
        #[serde(default)]
        pub canonical_name: String,
        #[serde(default)]
        pub canonical_revision: String,
        #[serde(default)]
        pub cluster_id: String,
        #[serde(default)]
        pub trust_domain: String,
        #[serde(default)]
        pub node: String,
        #[serde(default)]
        pub network: String,
        pub status: String,
        #[serde(default)]
        pub hostname: String,
        #[serde(default)]
        pub capacity: u32,
        #[serde(default)]
        pub authorization_policies: Vec<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    pub struct Service {
        pub name: String,
        pub namespace: String,
        pub hostname: String,
        pub vips: Vec<String>,
        pub ports: HashMap<String, i64>,
        pub endpoints: HashMap<String, Endpoint>,
        #[serde(default)]
        pub subject_alt_names: Vec<String>,
        #[serde(default)]
        pub ip_families: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    pub struct Endpoint {
        pub workload_uid: String,
        pub service: String,
        #[serde(default)]
        pub address: String,
        /// `map[uint16]uint16`: JSON keys are strings of numbers.
        pub port: HashMap<String, u16>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    pub struct Policy {
        pub name: String,
        pub namespace: String,
        pub scope: String,
        pub action: String,
        pub rules: Vec<Vec<Vec<Match>>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    pub struct Match {
        #[serde(default)]
        pub namespaces: Vec<StringMatch>,
        #[serde(default)]
        pub principals: Vec<StringMatch>,
        #[serde(default)]
        pub not_principals: Vec<StringMatch>,
        #[serde(default)]
        pub source_ips: Vec<String>,
        #[serde(default)]
        pub destination_ports: Vec<u16>,
        #[serde(default)]
        pub service_accounts: Vec<ServiceAccountMatch>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    pub struct StringMatch {
        #[serde(rename = "Exact", default)]
        pub exact: String,
        #[serde(rename = "Suffix", default)]
        pub suffix: String,
        #[serde(rename = "Prefix", default)]
        pub prefix: String,
        #[serde(rename = "Presence", default)]
        pub presence: Option<serde_json::Value>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    pub struct ServiceAccountMatch {
        pub namespace: String,
        pub service_account: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Certs {
        pub identity: String,
        pub state: String,
        pub cert_chain: Vec<Cert>,
        #[serde(default)]
        pub root_certs: Vec<Cert>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Cert {
        pub pem: String,
        pub serial_number: String,
        pub valid_from: String,
        pub expiration_time: String,
    }

    #[derive(Debug, Deserialize)]
    pub struct WorkloadState {
        #[serde(default)]
        pub state: String,
        pub info: WorkloadInfo,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct WorkloadInfo {
        pub name: String,
        pub namespace: String,
        pub trust_domain: String,
        pub service_account: String,
    }
}

#[test]
fn config_dump_reads_as_istioctl_reads_it() {
    let lab = lab();
    let client = lab.add_pod_as(0, MESH_NS, "client", "client").unwrap();
    let server = lab.add_pod_as(0, MESH_NS, "server", "server").unwrap();
    let _echo = EchoServer::start(&server.netns, SocketAddr::new(server.ip, APP_PORT)).unwrap();
    let host = "server.mesh.svc.cluster.local";
    lab.set_services(vec![json!({
        "name": "server", "namespace": MESH_NS, "hostname": host, "vips": ["/10.96.0.20"], "ports": {"80": APP_PORT},
    })])
    .unwrap();
    lab.set_pod_services(&server, json!({ format!("{MESH_NS}/{host}"): {} })).unwrap();
    lab.set_policies(vec![json!({
        "name": "only-client", "namespace": MESH_NS, "scope": "WorkloadSelector", "action": "Allow",
        "rules": [[[{"principals": [{"Exact": "cluster.local/ns/mesh/sa/client"}], "destinationPorts": [APP_PORT]}],
                   [{"serviceAccounts": [{"namespace": MESH_NS, "serviceAccount": "client"}]}]]],
    })])
    .unwrap();
    lab.set_pod_policies(&server, &["mesh/only-client"]).unwrap();
    assert!(reaches(&client, "10.96.0.20:80".parse().unwrap()), "{}", lab.logs());

    let raw = lab.nodes[0].config_dump().unwrap();
    let dump: istioctl::Dump = serde_json::from_value(raw.clone()).unwrap_or_else(|e| panic!("{e}: {raw:#}"));
    assert!(dump.workloads.iter().any(|w| w.name == "server" && w.protocol == "HBONE"), "{raw:#}");
    let svc = dump.services.iter().find(|s| s.hostname == host).expect("the service");
    assert_eq!(svc.ports.get("80"), Some(&i64::from(APP_PORT)));
    let ep = svc.endpoints.values().next().expect("an endpoint");
    assert_eq!(ep.address, format!("/{}", server.ip));
    // The endpoint's own port map for the service, as istiod sent it (empty: the service's ports apply), as
    // Istio's ztunnel shows it.
    assert!(ep.port.is_empty(), "{raw:#}");
    assert_eq!(dump.policies[0].rules[0].len(), 2);
    // Both pods' identities have certificates, with a chain and the roots.
    for sa in ["client", "server"] {
        let id = format!("spiffe://cluster.local/ns/{MESH_NS}/sa/{sa}");
        let c = dump.certificates.iter().find(|c| c.identity == id).unwrap_or_else(|| panic!("{id}: {raw:#}"));
        assert_eq!(c.state, "Available");
        assert!(!c.cert_chain.is_empty() && !c.root_certs.is_empty(), "{raw:#}");
        let leaf = &c.cert_chain[0];
        assert!(leaf.valid_from < leaf.expiration_time && leaf.valid_from.ends_with('Z'), "{leaf:?}");
        assert!(leaf.serial_number.bytes().all(|b| b.is_ascii_digit()) && !leaf.pem.is_empty(), "{leaf:?}");
    }
    // workloadState: the pods ztunnel serves, by the UID the agent gave them.
    for p in [&client, &server] {
        let w = dump.workload_state.get(p.uid.as_str()).unwrap_or_else(|| panic!("{}: {raw:#}", p.uid));
        assert_eq!(
            (w.state.as_str(), w.info.name.as_str(), w.info.namespace.as_str()),
            ("Up", p.name.as_str(), MESH_NS)
        );
        assert_eq!((w.info.service_account.as_str(), w.info.trust_domain.as_str()), (p.name.as_str(), "cluster.local"));
    }
    // What only Ambit shows is under its own key.
    assert!(raw["ambit"]["inpod"]["pods"].as_array().is_some_and(|p| p.len() == 2), "{raw:#}");
    assert!(raw["ambit"]["configSource"]["generation"].as_u64() > Some(0));
}
