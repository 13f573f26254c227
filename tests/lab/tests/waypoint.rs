//! Waypoints end to end: a service's, a workload's and a namespace's waypoint (the lab's stand-in for
//! Istio's Envoy waypoint, `lab waypoint`) take the traffic addressed to them, apply their L7 rule, and
//! nothing reaches the server's pod around them; a waypoint that is unknown, down or not who it should be
//! refuses the connection. Needs root.

use std::net::SocketAddr;

use lab::demo::{APP_PORT, MESH_NS};
use lab::net::{HttpAnswer, HttpServer, http_exchange};
use lab::pcap::{Capture, Segment};
use lab::util::metric;
use lab::{Lab, LabConfig, Pod, Waypoint};
use serde_json::{Value, json};

const SERVER_VIP: &str = "10.96.0.20";
const WAYPOINT_VIP: &str = "10.96.0.30";
const HOST: &str = "server.mesh.svc.cluster.local";

struct Scene {
    lab: Lab,
    client: Pod,
    server: Pod,
    waypoint: Waypoint,
    _http: HttpServer,
}

/// Client on node1; server and waypoint on node2, so the node link carries only what the client's ztunnel
/// sends: to the waypoint, or (were it bypassed) to the server.
fn scene() -> Scene {
    let lab =
        Lab::start(LabConfig { enrolled_namespaces: vec![MESH_NS.into()], ..Default::default() }).expect("lab starts");
    let client = lab.add_pod_as(0, MESH_NS, "client", "client").unwrap();
    let server = lab.add_pod_as(1, MESH_NS, "server", "server").unwrap();
    let http = HttpServer::start(&server.netns, SocketAddr::new(server.ip, APP_PORT), "server").unwrap();
    let waypoint = lab.add_waypoint(1, MESH_NS, "waypoint", "waypoint", WAYPOINT_VIP.parse().unwrap()).unwrap();
    lab.set_pod_services(&server, json!({ format!("{MESH_NS}/{HOST}"): {} })).unwrap();
    let s = Scene { lab, client, server, waypoint, _http: http };
    s.set_server_waypoint(Some(s.waypoint.by_hostname()));
    s
}

impl Scene {
    fn set_server_waypoint(&self, gw: Option<Value>) {
        let mut svc = json!({
            "name": "server", "namespace": MESH_NS, "hostname": HOST,
            "vips": [format!("/{SERVER_VIP}")], "ports": {"80": APP_PORT},
        });
        if let Some(gw) = gw {
            svc["waypoint"] = gw;
        }
        self.lab.set_services(vec![svc, self.waypoint.service()]).unwrap();
    }

    fn get(&self, to: SocketAddr, path: &str) -> anyhow::Result<HttpAnswer> {
        http_exchange(&self.client.netns, to, "GET", path)
    }

    fn vip(&self) -> SocketAddr {
        SocketAddr::new(SERVER_VIP.parse().unwrap(), 80)
    }

    fn pod(&self) -> SocketAddr {
        SocketAddr::new(self.server.ip, APP_PORT)
    }

    /// Asserts the answer came through the waypoint to the server (the server saw the waypoint's address).
    fn through_waypoint(&self, a: anyhow::Result<HttpAnswer>, path: &str) {
        let a = a.unwrap_or_else(|e| panic!("{path}: {e:#}\n{}\n{}", self.lab.logs(), self.waypoint.log()));
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.header("x-waypoint"), Some("waypoint"), "{a:?}");
        assert_eq!(a.body, format!("server saw {} ask for {path}", self.waypoint.pod.ip), "{a:?}");
    }

    /// Asserts the request was refused: no answer at all (the client's ztunnel closed the connection).
    fn refused(&self, to: SocketAddr, what: &str) {
        match self.get(to, "/refused") {
            Err(_) => {}
            Ok(a) => panic!("{what}: answered {a:?}\n{}", self.waypoint.log()),
        }
    }

    fn metrics(&self, node: usize) -> String {
        self.lab.nodes[node].metrics().unwrap()
    }

    fn capture(&self, name: &str) -> Capture {
        Capture::start(&self.lab.nodes[0].netns, "eth0", &self.lab.dir.join(name)).unwrap()
    }

    /// What went from the client's node to the server's pod (there must be nothing, whatever the waypoint
    /// did), and whether any segment carried `marker` in the clear.
    fn bypass(&self, segments: &[Segment], marker: &[u8]) -> (Vec<String>, bool) {
        let direct = segments
            .iter()
            .filter(|s| s.dst == self.server.ip && !s.payload.is_empty())
            .map(|s| format!("{}:{} -> {}:{}", s.src, s.sport, s.dst, s.dport))
            .collect();
        (direct, lab::pcap::contains(segments, marker))
    }
}

#[test]
fn a_service_waypoint_takes_service_traffic_applies_its_rule_and_nothing_goes_around_it() {
    let s = scene();
    let cap = s.capture("service-waypoint.pcap");
    s.through_waypoint(s.get(s.vip(), "/hello-through-the-vip"), "/hello-through-the-vip");
    let denied = s.get(s.vip(), "/admin/secret-path").unwrap();
    assert_eq!((denied.status, denied.header("x-waypoint")), (403, Some("waypoint")), "{denied:?}");
    let segments = cap.finish().unwrap();
    let (direct, plain) = s.bypass(&segments, b"hello-through-the-vip");
    assert!(direct.is_empty(), "the client's ztunnel reached the server's pod directly: {direct:?}");
    assert!(!plain, "the request crossed the node link in the clear");
    assert!(lab::pcap::has_tls_to(&segments, 15008), "HBONE to the waypoint on the link");
    assert!(segments.iter().any(|g| g.dst == s.waypoint.pod.ip), "the link carried traffic to the waypoint");

    // Telemetry as Istio's ztunnel reports it: the waypoint is the destination workload, the service the one
    // the app asked for, mTLS with the waypoint's identity.
    let m = s.metrics(0);
    let labels = [
        "reporter=\"source\"",
        "destination_workload=\"waypoint\"",
        "destination_principal=\"spiffe://cluster.local/ns/mesh/sa/waypoint\"",
        &format!("destination_service=\"{HOST}\"") as &str,
        "source_principal=\"spiffe://cluster.local/ns/mesh/sa/client\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    assert_eq!(metric(&m, "istio_tcp_connections_opened_total", &labels), 2.0, "{m}");
    // The server's ztunnel saw the waypoint as its client.
    let m = s.metrics(1);
    let src = ["reporter=\"destination\"", "source_principal=\"spiffe://cluster.local/ns/mesh/sa/waypoint\""];
    assert!(metric(&m, "istio_tcp_connections_opened_total", &src) >= 1.0, "{m}");

    // Workload-addressed traffic does not pass a service's waypoint.
    let a = s.get(s.pod(), "/direct").unwrap();
    assert_eq!((a.status, a.header("x-waypoint")), (200, None), "{a:?}");
    assert_eq!(a.body, format!("server saw {} ask for /direct", s.client.ip));

    // The waypoint taken away by xDS: new connections go straight to the server again.
    s.set_server_waypoint(None);
    let a = s.get(s.vip(), "/after").unwrap();
    assert_eq!((a.status, a.header("x-waypoint")), (200, None), "{a:?}");
    // And back, named by its VIP this time.
    s.set_server_waypoint(Some(Waypoint::by_address(WAYPOINT_VIP.parse().unwrap())));
    s.through_waypoint(s.get(s.vip(), "/by-vip"), "/by-vip");
}

#[test]
fn workload_and_namespace_waypoints_and_the_waypoints_own_traffic() {
    let s = scene();
    s.set_server_waypoint(None);
    // A workload waypoint, named by the waypoint pod's address: workload-addressed traffic passes it.
    s.lab.set_pod_waypoint(&s.server, Some(Waypoint::by_address(s.waypoint.pod.ip))).unwrap();
    let cap = s.capture("workload-waypoint.pcap");
    s.through_waypoint(s.get(s.pod(), "/to-the-pod"), "/to-the-pod");
    let denied = s.get(s.pod(), "/admin").unwrap();
    assert_eq!(denied.status, 403, "{denied:?}");
    let segments = cap.finish().unwrap();
    let (direct, plain) = s.bypass(&segments, b"/to-the-pod");
    assert!(direct.is_empty() && !plain, "bypass: {direct:?}, plaintext: {plain}");
    // ... and its answer reached the server from the waypoint, which the server's ztunnel let through rather
    // than send back to the waypoint (the waypoint is not captured; its own HBONE goes to the server).
    s.lab.set_pod_waypoint(&s.server, None).unwrap();

    // A namespace-wide waypoint (`istio.io/use-waypoint` on the namespace, traffic type all): services and
    // workloads of the namespace, the waypoint itself excepted.
    s.lab.set_namespace_waypoint(MESH_NS, Some(s.waypoint.by_hostname()), true).unwrap();
    s.through_waypoint(s.get(s.vip(), "/ns-service"), "/ns-service");
    s.through_waypoint(s.get(s.pod(), "/ns-workload"), "/ns-workload");
    let dump = s.lab.nodes[0].config_dump().unwrap();
    let wp = dump["workloads"].as_array().unwrap().iter().find(|w| w["name"] == "waypoint").unwrap();
    assert!(wp.get("waypoint").is_none(), "a waypoint gets no waypoint: {wp:#}");
    let server = dump["workloads"].as_array().unwrap().iter().find(|w| w["name"] == "server").unwrap();
    assert_eq!(
        server["waypoint"],
        json!({"destination": "mesh/waypoint.mesh.svc.cluster.local", "hboneMtlsPort": 15008}),
        "Istio's shape in /config_dump"
    );
    let svc = dump["services"].as_array().unwrap().iter().find(|v| v["hostname"] == HOST).unwrap();
    assert_eq!(svc["waypoint"]["destination"], "mesh/waypoint.mesh.svc.cluster.local", "{svc:#}");
    s.lab.set_namespace_waypoint(MESH_NS, None, true).unwrap();
    let a = s.get(s.vip(), "/ns-gone").unwrap();
    assert_eq!(a.header("x-waypoint"), None, "{a:?}");
}

#[test]
fn a_waypoint_that_is_unknown_down_or_someone_else_refuses_the_connection() {
    let mut s = scene();
    let cap = s.capture("bad-waypoints.pcap");
    let refused = |s: &Scene, reason: &str| {
        metric(&s.metrics(0), "ztunnel_waypoint_refused_total", &[&format!("reason=\"{reason}\"")])
    };

    // A hostname that resolves to nothing.
    s.set_server_waypoint(Some(json!({"destination": "mesh/nowhere.mesh.svc.cluster.local", "hboneMtlsPort": 15008})));
    s.refused(s.vip(), "unknown hostname");
    assert_eq!(refused(&s, "unknown"), 1.0);
    // An address that is no workload or service.
    s.set_server_waypoint(Some(Waypoint::by_address("10.244.99.99".parse().unwrap())));
    s.refused(s.vip(), "unknown address");
    assert_eq!(refused(&s, "unknown"), 2.0);
    // Flagged as Istio's ztunnel flags a connection it could not make.
    let m = s.metrics(0);
    let flagged =
        ["reporter=\"source\"", "response_flags=\"CONNECT\"", &format!("destination_service=\"{HOST}\"") as &str];
    assert_eq!(metric(&m, "istio_tcp_connections_closed_total", &flagged), 2.0, "{m}");

    // A waypoint whose certificate is for another service account than the one published for it.
    s.set_server_waypoint(Some(s.waypoint.by_hostname()));
    let wp = &s.waypoint.pod;
    s.lab.publish_workload(&wp.uid, MESH_NS, &wp.name, "not-the-waypoint", wp.ip, 1, true).unwrap();
    s.refused(s.vip(), "wrong identity");
    assert_eq!(refused(&s, "unreachable"), 1.0);
    let m = s.metrics(0);
    assert!(metric(&m, "ztunnel_tls_handshake_failures_total", &["direction=\"outbound\""]) >= 1.0, "{m}");
    s.lab.publish_workload(&wp.uid, MESH_NS, &wp.name, "waypoint", wp.ip, 1, true).unwrap();
    s.through_waypoint(s.get(s.vip(), "/ok-again"), "/ok-again");

    // A waypoint that is down: refused, never sent around it.
    s.waypoint.proc.kill();
    s.refused(s.vip(), "waypoint down");
    assert!(refused(&s, "unreachable") >= 2.0);
    let segments = cap.finish().unwrap();
    let (direct, plain) = s.bypass(&segments, b"/refused");
    assert!(direct.is_empty() && !plain, "bypass: {direct:?}, plaintext: {plain}");
    // The rest of the mesh is served all along.
    let a = s.get(s.pod(), "/still-served").unwrap();
    assert_eq!(a.status, 200);
}
