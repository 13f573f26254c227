//! Dual stack: pods with IPv4 and IPv6 addresses, and every path over IPv6 — HBONE across nodes, a VIP,
//! passthrough, plaintext inbound and a policy on IPv6 source addresses. Needs root.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use lab::demo::{APP_PORT, LEGACY_NS, MESH_NS};
use lab::net::{EchoClient, EchoServer};
use lab::util::metric;
use lab::{Lab, LabConfig, Pod};
use serde_json::json;

const T: Duration = Duration::from_secs(5);

fn v6(p: &Pod) -> IpAddr {
    p.ip6.unwrap_or_else(|| panic!("{} has no IPv6 address: {}", p.full_name(), p.result))
}

/// Connects, checks the address the server saw and one round trip.
fn check(lab: &Lab, from: &Pod, to: SocketAddr, seen: IpAddr) {
    let mut c = EchoClient::connect(&from.netns, to, T).unwrap_or_else(|e| panic!("{to}: {e:#}\n{}", lab.logs()));
    c.round_trip(b"over IPv6").unwrap();
    assert_eq!(c.seen_ip(), seen.to_string(), "{to}");
}

#[test]
fn every_path_works_over_ipv6_in_a_dual_stack_lab() {
    let lab =
        Lab::start(LabConfig { enrolled_namespaces: vec![MESH_NS.into()], dual_stack: true, ..Default::default() })
            .unwrap();
    let client = lab.add_pod_as(0, MESH_NS, "client", "client").unwrap();
    let outsider = lab.add_pod(0, LEGACY_NS, "outsider").unwrap();
    let server = lab.add_pod_as(1, MESH_NS, "server", "server").unwrap();
    let legacy = lab.add_pod(1, LEGACY_NS, "legacy").unwrap();
    let _servers: Vec<EchoServer> = [&server, &legacy]
        .iter()
        .flat_map(|p| [p.ip, v6(p)].map(|ip| EchoServer::start(&p.netns, SocketAddr::new(ip, APP_PORT)).unwrap()))
        .collect();

    // Mesh to mesh across nodes, both families; IPv6 rides HBONE to the server's IPv6 15008.
    check(&lab, &client, SocketAddr::new(v6(&server), APP_PORT), v6(&client));
    check(&lab, &client, SocketAddr::new(server.ip, APP_PORT), client.ip);
    let log = lab.nodes[0].ztunnel.as_ref().unwrap().log();
    let hbone6 = format!("dst.hbone_addr=\"[{}]:15008\"", v6(&server));
    assert!(log.contains(&hbone6), "no HBONE to {hbone6}: {log}");
    let m = lab.nodes[1].metrics().unwrap();
    let mtls =
        ["reporter=\"destination\"", "destination_workload=\"server\"", "connection_security_policy=\"mutual_tls\""];
    assert!(metric(&m, "istio_tcp_connections_opened_total", &mtls) >= 2.0, "{m}");

    // Passthrough to a pod outside the mesh, and plaintext in from one (PERMISSIVE).
    check(&lab, &client, SocketAddr::new(v6(&legacy), APP_PORT), v6(&client));
    check(&lab, &outsider, SocketAddr::new(v6(&server), APP_PORT), v6(&outsider));
    let m = lab.nodes[1].metrics().unwrap();
    let plain =
        ["reporter=\"destination\"", "destination_workload=\"server\"", "connection_security_policy=\"unknown\""];
    assert!(metric(&m, "istio_tcp_connections_opened_total", &plain) >= 1.0, "{m}");

    // A service with an IPv6 VIP.
    let host = "echo.mesh.svc.cluster.local";
    lab.set_services(vec![json!({
        "name": "echo", "namespace": MESH_NS, "hostname": host, "vips": ["/fd00:96::10"], "ports": {"80": APP_PORT},
    })])
    .unwrap();
    lab.set_pod_services(&server, json!({ format!("{MESH_NS}/{host}"): {} })).unwrap();
    check(&lab, &client, "[fd00:96::10]:80".parse().unwrap(), v6(&client));

    // A policy on IPv6 source addresses: the client's IPv6 is denied, its IPv4 is not.
    lab.set_policies(vec![json!({
        "name": "deny-client-v6", "namespace": MESH_NS, "scope": "Namespace", "action": "Deny",
        "rules": [[[{"sourceIps": [format!("{}/128", v6(&client))]}]]],
    })])
    .unwrap();
    let denied = EchoClient::connect(&client.netns, SocketAddr::new(v6(&server), APP_PORT), T)
        .and_then(|mut c| c.round_trip(b"x"));
    assert!(denied.is_err(), "the IPv6 source was not denied");
    check(&lab, &client, SocketAddr::new(server.ip, APP_PORT), client.ip);
    let m = lab.nodes[1].metrics().unwrap();
    assert_eq!(metric(&m, "ztunnel_policy_denials_total", &["policy=\"mesh/deny-client-v6\""]), 1.0, "{m}");
}
