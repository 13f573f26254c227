//! Same configuration in, same telemetry out: the same lab, control plane and traffic (mesh to mesh, plaintext
//! from a pod outside the mesh, a policy denial, a port nobody serves) through Ambit's ztunnel and then through
//! Istio's, and their `/metrics` and `/config_dump` compared: metric names, label names and values, and the
//! `/config_dump` fields Istio's tools read. Ignored: it needs Istio's ztunnel (`AMBIT_PEER_ZTUNNEL`). What the
//! regular suite guards of the same values is in `ztunnel`'s unit tests (`metrics`, `xds::convert`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use lab::demo::{APP_PORT, LEGACY_NS, MESH_NS};
use lab::net::{EchoClient, EchoServer};
use lab::{Lab, LabConfig};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(5);
/// A port the server listens on that a policy denies.
const DENIED_PORT: u16 = APP_PORT + 5;
/// A port nobody serves.
const CLOSED_PORT: u16 = APP_PORT + 9;

/// Istio's metric families Ambit does not have (the README's Istio section says why): those of features it
/// lacks, its DNS proxy (its own issue) and certificate revocation lists; and its tokio runtime's figures,
/// which Ambit's runtime (one single-threaded runtime per worker) would not give the same meaning.
const NOT_YET: &[&str] = &["istio_dns_", "istio_on_demand_dns", "istio_crl_", "tokio_"];

/// One series: a metric's name and its labels.
type Series = (String, BTreeMap<String, String>);

/// Parses Prometheus text: each sample of a family whose name starts with `prefix`, with its value.
fn samples(text: &str, prefix: &str) -> BTreeMap<Series, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with(prefix)) {
        let (head, value) = line.rsplit_once(' ').expect("a sample line");
        let (name, labels) = match head.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (head, ""),
        };
        let labels = labels
            .split("\",")
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once("=\"").expect("label=\"value\"");
                (k.to_string(), v.trim_end_matches('"').to_string())
            })
            .collect();
        out.insert((name.to_string(), labels), value.parse().unwrap_or(f64::NAN));
    }
    out
}

/// What one ztunnel reported for the scenario: both nodes' samples and `/config_dump`s.
struct Report {
    metrics: [BTreeMap<Series, f64>; 2],
    all_names: [BTreeSet<String>; 2],
    dumps: [Value; 2],
}

fn run(peer: Option<PathBuf>) -> Report {
    let peer = peer.map(|binary| lab::PeerZtunnel { binary, env: vec![], nodes: vec![0, 1], loopback_route: true });
    let lab = Lab::start(LabConfig { enrolled_namespaces: vec![MESH_NS.into()], peer, ..Default::default() })
        .expect("lab starts");
    let client = lab.add_pod_as(0, MESH_NS, "client", "client").unwrap();
    let server = lab.add_pod_as(1, MESH_NS, "server", "server").unwrap();
    let outsider = lab.add_pod(0, LEGACY_NS, "outsider").unwrap();
    let _servers: Vec<EchoServer> = [APP_PORT, DENIED_PORT]
        .iter()
        .map(|p| EchoServer::start(&server.netns, SocketAddr::new(server.ip, *p)).unwrap())
        .collect();
    let host = "server.mesh.svc.cluster.local";
    lab.set_services(vec![json!({
        "name": "server", "namespace": MESH_NS, "hostname": host, "vips": ["/10.96.0.40"], "ports": {"80": APP_PORT},
    })])
    .unwrap();
    lab.set_pod_services(&server, json!({ format!("{MESH_NS}/{host}"): {} })).unwrap();
    lab.set_policies(vec![json!({
        "name": "deny-port", "namespace": MESH_NS, "scope": "Namespace", "action": "Deny",
        "rules": [[[{"destinationPorts": [DENIED_PORT]}]]],
    })])
    .unwrap();
    let to = |port| SocketAddr::new(server.ip, port);
    // Mesh to mesh (to the pod and through the service), plaintext from outside the mesh.
    let vip: SocketAddr = "10.96.0.40:80".parse().unwrap();
    for (from, dst) in [(&client, to(APP_PORT)), (&client, vip), (&outsider, to(APP_PORT))] {
        let mut c = EchoClient::connect(&from.netns, dst, T).unwrap_or_else(|e| panic!("{e:#}\n{}", lab.logs()));
        c.round_trip(b"same telemetry").unwrap();
    }
    // A policy denial and a port nobody serves: neither gets through.
    for port in [DENIED_PORT, CLOSED_PORT] {
        let r = EchoClient::connect(&client.netns, to(port), T).and_then(|mut c| c.round_trip(b"x"));
        assert!(r.is_err(), "port {port} answered");
    }
    // Closed connections are counted when each side has seen the close.
    std::thread::sleep(Duration::from_millis(500));
    let text = |i: usize| lab.nodes[i].metrics().unwrap();
    let names = |t: &str| {
        t.lines().filter(|l| l.starts_with("# TYPE ")).map(|l| l.split(' ').nth(2).unwrap().to_string()).collect()
    };
    let (t0, t1) = (text(0), text(1));
    Report {
        metrics: [samples(&t0, "istio_tcp_"), samples(&t1, "istio_tcp_")],
        all_names: [names(&t0), names(&t1)],
        dumps: [lab.nodes[0].config_dump().unwrap(), lab.nodes[1].config_dump().unwrap()],
    }
}

/// The series of both, side by side, where they differ.
fn differences(a: &BTreeMap<Series, f64>, b: &BTreeMap<Series, f64>) -> Vec<String> {
    let mut d = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => d.push(format!("only Ambit's: {} {:?} = {v}", k.0, k.1)),
            // Counts of connections must agree; bytes depend on the echo's greeting (it names the client's port).
            Some(w) if w != v && k.0.contains("_connections_") => {
                d.push(format!("{} {:?}: Ambit {v}, Istio {w}", k.0, k.1))
            }
            Some(_) => {}
        }
    }
    for (k, v) in b {
        if !a.contains_key(k) {
            d.push(format!("only Istio's: {} {:?} = {v}", k.0, k.1));
        }
    }
    d
}

/// The fields of a workload that Istio's tools read, as one dump has them.
fn workload_fields(dump: &Value, name: &str) -> BTreeMap<String, Value> {
    let w =
        dump["workloads"].as_array().unwrap().iter().find(|w| w["name"] == name).unwrap_or_else(|| panic!("{name}"));
    [
        "uid",
        "name",
        "namespace",
        "serviceAccount",
        "trustDomain",
        "workloadIps",
        "protocol",
        "node",
        "workloadName",
        "workloadType",
        "canonicalName",
        "canonicalRevision",
        "clusterId",
        "networkMode",
        "capacity",
        "status",
        "authorizationPolicies",
    ]
    .iter()
    .map(|k| (k.to_string(), w.get(*k).cloned().unwrap_or(Value::Null)))
    .collect()
}

#[test]
#[ignore = "needs Istio's ztunnel binary: AMBIT_PEER_ZTUNNEL=PATH cargo nextest run -p lab --test telemetry --run-ignored all"]
fn ambit_and_istio_report_the_same_telemetry_for_the_same_input() {
    let path = std::env::var("AMBIT_PEER_ZTUNNEL").expect("AMBIT_PEER_ZTUNNEL: the path of Istio's ztunnel");
    let ambit = run(None);
    let istio = run(Some(path.into()));
    let mut report = Vec::new();
    for node in 0..2 {
        for d in differences(&ambit.metrics[node], &istio.metrics[node]) {
            report.push(format!("node{}: {d}", node + 1));
        }
        // Every metric family of Istio's that Ambit lacks (Ambit's own are named ztunnel_*), but those of
        // features Ambit does not have yet.
        for name in istio.all_names[node].difference(&ambit.all_names[node]) {
            if !NOT_YET.iter().any(|p| name.starts_with(p)) {
                report.push(format!("node{}: Istio's {name} is not Ambit's", node + 1));
            }
        }
        for w in ["client", "server", "outsider"] {
            let (a, i) = (workload_fields(&ambit.dumps[node], w), workload_fields(&istio.dumps[node], w));
            for (k, v) in &a {
                if i.get(k) != Some(v) {
                    report.push(format!("node{}: workload {w} {k}: Ambit {v}, Istio {}", node + 1, i[k]));
                }
            }
        }
        let svc = |d: &Value| -> Value {
            let s = d["services"].as_array().unwrap().iter().find(|s| s["name"] == "server").cloned().unwrap();
            let fields = ["name", "namespace", "hostname", "vips", "ports", "subjectAltNames"];
            let mut v: serde_json::Map<String, Value> =
                fields.iter().map(|k| (k.to_string(), s.get(*k).cloned().unwrap_or(Value::Null))).collect();
            // Each endpoint: its key and what istioctl shows of it.
            let eps: BTreeMap<String, Value> = s["endpoints"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, e)| {
                    (k.clone(), json!({"workloadUid": e["workloadUid"], "port": e["port"], "status": e["status"]}))
                })
                .collect();
            v.insert("endpoints".into(), serde_json::to_value(eps).unwrap());
            Value::Object(v)
        };
        let (sa, si) = (svc(&ambit.dumps[node]), svc(&istio.dumps[node]));
        for (k, v) in sa.as_object().unwrap() {
            if si.get(k) != Some(v) {
                report.push(format!("node{}: service server {k}: Ambit {v}, Istio {}", node + 1, si[k]));
            }
        }
        let keys = |d: &Value| -> BTreeSet<String> { d.as_object().unwrap().keys().cloned().collect() };
        let (ka, ki) = (keys(&ambit.dumps[node]), keys(&istio.dumps[node]));
        for k in ki.difference(&ka) {
            report.push(format!("node{}: /config_dump key {k} only in Istio's", node + 1));
        }
    }
    assert!(report.is_empty(), "{} differences:\n{}", report.len(), report.join("\n"));
}
