//! Waypoints end to end: a service's, a workload's and a namespace's waypoint (the lab's stand-in for
//! Istio's Envoy waypoint, `lab waypoint`) take the traffic addressed to them, apply their L7 rule, and
//! nothing reaches the server's pod around them; a waypoint that is unknown, down or not who it should be
//! refuses the connection. Over IPv4 and IPv6, with either rule backend, and (an ignored test) with Istio's
//! ztunnel in Ambit's place. Needs root.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use lab::demo::{APP_PORT, MESH_NS};
use lab::net::{EchoServer, HttpAnswer, HttpServer, http_exchange};
use lab::pcap::{Capture, Segment};
use lab::util::metric;
use lab::{Lab, LabConfig, Pod, Waypoint};
use serde_json::{Value, json};

const SERVER_VIP: &str = "10.96.0.20";
const SERVER_VIP6: &str = "fd00:96::20";
const WAYPOINT_VIP: &str = "10.96.0.30";
const HOST: &str = "server.mesh.svc.cluster.local";
/// The ports the waypoint takes as HTTP: the service's 80 (an HTTP server) and 81 (an echo server), and the
/// pod's ports they map to (the target of workload-addressed traffic).
const HTTP_PORTS: &[u16] = &[80, 81, APP_PORT, APP_PORT + 1];

struct Scene {
    lab: Lab,
    client: Pod,
    server: Pod,
    waypoint: Waypoint,
    _http: Vec<HttpServer>,
    _echo: EchoServer,
}

fn config() -> LabConfig {
    LabConfig { enrolled_namespaces: vec![MESH_NS.into()], ..Default::default() }
}

/// Client on node1; server and waypoint on node2, so the node link carries only what the client's ztunnel
/// sends: to the waypoint, or (were it bypassed) to the server. The server's service has the waypoint.
fn scene(config: LabConfig) -> Scene {
    let lab = Lab::start(config).expect("lab starts");
    let client = lab.add_pod_as(0, MESH_NS, "client", "client").unwrap();
    let server = lab.add_pod_as(1, MESH_NS, "server", "server").unwrap();
    let http = std::iter::once(server.ip)
        .chain(server.ip6)
        .map(|ip| HttpServer::start(&server.netns, SocketAddr::new(ip, APP_PORT), "server").unwrap())
        .collect();
    // Port 81 of the service: an echo server, for connections that stay open.
    let echo = EchoServer::start(&server.netns, SocketAddr::new(server.ip, APP_PORT + 1)).unwrap();
    let waypoint =
        lab.add_waypoint(1, MESH_NS, "waypoint", "waypoint", WAYPOINT_VIP.parse().unwrap(), HTTP_PORTS).unwrap();
    lab.set_pod_services(&server, json!({ format!("{MESH_NS}/{HOST}"): {} })).unwrap();
    let s = Scene { lab, client, server, waypoint, _http: http, _echo: echo };
    s.set_server_waypoint(Some(s.waypoint.by_hostname()));
    s
}

impl Scene {
    /// Publishes the server's service (and the waypoint's) with `gw` as the server's service's waypoint.
    fn set_server_waypoint(&self, gw: Option<Value>) {
        let vips: Vec<String> =
            std::iter::once(SERVER_VIP).chain(self.server.ip6.map(|_| SERVER_VIP6)).map(|v| format!("/{v}")).collect();
        let mut svc = json!({
            "name": "server", "namespace": MESH_NS, "hostname": HOST, "vips": vips,
            "ports": {"80": APP_PORT, "81": APP_PORT + 1},
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
        self.through_waypoint_from(a, path, self.waypoint.pod.ip)
    }

    fn through_waypoint_from(&self, a: anyhow::Result<HttpAnswer>, path: &str, waypoint_ip: IpAddr) {
        let a = a.unwrap_or_else(|e| panic!("{path}: {e:#}\n{}\n{}", self.lab.logs(), self.waypoint.log()));
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.header("x-waypoint"), Some("waypoint"), "{a:?}");
        assert_eq!(a.body, format!("server saw {waypoint_ip} ask for {path}"), "{a:?}");
    }

    /// Asserts the answer came straight from the server, not through the waypoint.
    fn direct(&self, a: anyhow::Result<HttpAnswer>, path: &str) {
        let a = a.unwrap_or_else(|e| panic!("{path}: {e:#}\n{}", self.lab.logs()));
        assert_eq!((a.status, a.header("x-waypoint")), (200, None), "{a:?}");
        assert_eq!(a.body, format!("server saw {} ask for {path}", self.client.ip), "{a:?}");
    }

    /// Asserts the request was refused: no answer at all (the client's ztunnel closed the connection).
    fn refused(&self, to: SocketAddr, what: &str) {
        if let Ok(a) = self.get(to, "/refused") {
            panic!("{what}: answered {a:?}\n{}", self.waypoint.log());
        }
    }

    /// Opens a connection to the service's echo port that stays open: its first bytes are an HTTP head,
    /// which the waypoint (if it passes one) marks; returns it and whether it passed one.
    fn open_echo(&self) -> (TcpStream, bool) {
        let to = SocketAddr::new(SERVER_VIP.parse().unwrap(), 81);
        let mut c =
            self.client.netns.run(move || TcpStream::connect_timeout(&to, Duration::from_secs(2))).unwrap().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"GET /long HTTP/1.1\r\n\r\n").unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        (c, String::from_utf8_lossy(&got).contains("x-waypoint: waypoint"))
    }

    fn metrics(&self, node: usize) -> String {
        self.lab.nodes[node].metrics().unwrap()
    }

    /// Captures the client's node link.
    fn capture(&self, name: &str) -> Capture {
        Capture::start(&self.lab.nodes[0].netns, "eth0", &self.lab.dir.join(name)).unwrap()
    }

    /// Asserts that nothing went from the client's node to the server's pod (whatever the waypoint did) and
    /// that `marker` never crossed in the clear.
    fn assert_no_bypass(&self, cap: Capture, marker: &[u8]) -> Vec<Segment> {
        let segments = cap.finish().unwrap();
        let server = [Some(self.server.ip), self.server.ip6];
        let direct: Vec<String> = segments
            .iter()
            .filter(|s| server.contains(&Some(s.dst)) && !s.payload.is_empty())
            .map(|s| format!("{}:{} -> {}:{}", s.src, s.sport, s.dst, s.dport))
            .collect();
        assert!(direct.is_empty(), "the client's ztunnel reached the server's pod directly: {direct:?}");
        assert!(!lab::pcap::contains(&segments, marker), "the request crossed the node link in the clear");
        segments
    }
}

/// What every ztunnel must do with a service's waypoint: through it, its rule applied, nothing around it;
/// workload-addressed traffic not through it; xDS taking it away and back for new connections.
fn service_waypoint_is_the_only_way(s: &Scene) {
    let cap = s.capture("service-waypoint.pcap");
    s.through_waypoint(s.get(s.vip(), "/hello-through-the-vip"), "/hello-through-the-vip");
    let denied = s.get(s.vip(), "/admin/secret-path").unwrap();
    assert_eq!((denied.status, denied.header("x-waypoint")), (403, Some("waypoint")), "{denied:?}");
    let segments = s.assert_no_bypass(cap, b"hello-through-the-vip");
    assert!(lab::pcap::has_tls_to(&segments, 15008), "HBONE to the waypoint on the link");
    assert!(segments.iter().any(|g| g.dst == s.waypoint.pod.ip), "the link carried traffic to the waypoint");
    s.direct(s.get(s.pod(), "/direct"), "/direct");
    s.set_server_waypoint(None);
    s.direct(s.get(s.vip(), "/without"), "/without");
    s.set_server_waypoint(Some(Waypoint::by_address(WAYPOINT_VIP.parse().unwrap())));
    s.through_waypoint(s.get(s.vip(), "/by-vip"), "/by-vip");
    s.set_server_waypoint(Some(Waypoint::by_address(s.waypoint.pod.ip)));
    s.through_waypoint(s.get(s.vip(), "/by-pod-address"), "/by-pod-address");
    s.set_server_waypoint(Some(s.waypoint.by_hostname()));
}

/// What every ztunnel must do with a workload's waypoint: workload-addressed traffic through it.
fn workload_waypoint_is_the_only_way(s: &Scene) {
    s.set_server_waypoint(None);
    s.lab.set_pod_waypoint(&s.server, Some(Waypoint::by_address(s.waypoint.pod.ip))).unwrap();
    let cap = s.capture("workload-waypoint.pcap");
    s.through_waypoint(s.get(s.pod(), "/to-the-pod"), "/to-the-pod");
    assert_eq!(s.get(s.pod(), "/admin").unwrap().status, 403);
    s.assert_no_bypass(cap, b"/to-the-pod");
    // Service-addressed traffic to a service without a waypoint does not pass the workload's.
    s.direct(s.get(s.vip(), "/via-service"), "/via-service");
    s.lab.set_pod_waypoint(&s.server, None).unwrap();
    s.set_server_waypoint(Some(s.waypoint.by_hostname()));
}

/// Traffic from the waypoint itself is not sent back to it. Here the client pod is named as the server's
/// waypoint (its identity and its address): its own connections to the server go straight there, while
/// another pod's go to it (and are refused there, as it is no waypoint: never around it).
fn traffic_from_the_waypoint_goes_on(s: &Scene) {
    s.lab.set_pod_waypoint(&s.server, Some(Waypoint::by_address(s.client.ip))).unwrap();
    s.direct(s.get(s.pod(), "/from-the-waypoint"), "/from-the-waypoint");
    let other = s.lab.add_pod_as(0, MESH_NS, "other", "other").unwrap();
    let cap = s.capture("from-waypoint.pcap");
    assert!(http_exchange(&other.netns, s.pod(), "GET", "/refused").is_err(), "sent to the named waypoint");
    s.assert_no_bypass(cap, b"/refused");
    s.lab.set_pod_waypoint(&s.server, None).unwrap();
}

/// What every ztunnel must do with a waypoint it cannot use: refuse, never go around it.
fn unusable_waypoints_refuse(s: &mut Scene) {
    let cap = s.capture("unusable-waypoints.pcap");
    s.set_server_waypoint(Some(json!({"destination": "mesh/nowhere.mesh.svc.cluster.local", "hboneMtlsPort": 15008})));
    s.refused(s.vip(), "unknown hostname");
    s.set_server_waypoint(Some(Waypoint::by_address("10.244.99.99".parse().unwrap())));
    s.refused(s.vip(), "unknown address");
    s.set_server_waypoint(Some(s.waypoint.by_hostname()));
    s.through_waypoint(s.get(s.vip(), "/ok"), "/ok");
    s.waypoint.proc.kill();
    s.refused(s.vip(), "waypoint down");
    s.assert_no_bypass(cap, b"/refused");
    // The rest of the mesh is served all along.
    s.direct(s.get(s.pod(), "/still-served"), "/still-served");
}

#[test]
fn a_service_waypoint_takes_service_traffic_applies_its_rule_and_nothing_goes_around_it() {
    let s = scene(config());
    service_waypoint_is_the_only_way(&s);
    // Telemetry as Istio's ztunnel reports it (its `build_request` and `ConnectionOpen`): the waypoint is the
    // destination workload and principal, the service the one the app asked for, mutual TLS.
    let m = s.metrics(0);
    let labels = [
        "reporter=\"source\"",
        "destination_workload=\"waypoint\"",
        "destination_principal=\"spiffe://cluster.local/ns/mesh/sa/waypoint\"",
        &format!("destination_service=\"{HOST}\"") as &str,
        "source_principal=\"spiffe://cluster.local/ns/mesh/sa/client\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    assert_eq!(metric(&m, "istio_tcp_connections_opened_total", &labels), 4.0, "{m}");
    // The server's ztunnel saw the waypoint as its client.
    let m = s.metrics(1);
    let src = ["reporter=\"destination\"", "source_principal=\"spiffe://cluster.local/ns/mesh/sa/waypoint\""];
    assert!(metric(&m, "istio_tcp_connections_opened_total", &src) >= 3.0, "{m}");
}

#[test]
fn workload_and_namespace_waypoints_and_traffic_from_the_waypoint_itself() {
    let s = scene(config());
    workload_waypoint_is_the_only_way(&s);

    // A namespace-wide waypoint (`istio.io/use-waypoint` on the namespace, traffic type all): services and
    // workloads of the namespace, the waypoint itself excepted.
    s.set_server_waypoint(None);
    s.lab.set_namespace_waypoint(MESH_NS, Some(s.waypoint.by_hostname()), true).unwrap();
    s.through_waypoint(s.get(s.vip(), "/ns-service"), "/ns-service");
    s.through_waypoint(s.get(s.pod(), "/ns-workload"), "/ns-workload");
    let dump = s.lab.nodes[0].config_dump().unwrap();
    let workload = |name: &str| dump["workloads"].as_array().unwrap().iter().find(|w| w["name"] == name).unwrap();
    assert!(workload("waypoint").get("waypoint").is_none(), "a waypoint gets no waypoint");
    assert_eq!(
        workload("server")["waypoint"],
        json!({"destination": "mesh/waypoint.mesh.svc.cluster.local", "hboneMtlsPort": 15008}),
        "Istio's shape in /config_dump"
    );
    let svc = dump["services"].as_array().unwrap().iter().find(|v| v["hostname"] == HOST).unwrap();
    assert_eq!(svc["waypoint"]["destination"], "mesh/waypoint.mesh.svc.cluster.local", "{svc:#}");
    s.lab.set_namespace_waypoint(MESH_NS, None, true).unwrap();
    s.direct(s.get(s.vip(), "/ns-gone"), "/ns-gone");

    traffic_from_the_waypoint_goes_on(&s);
}

#[test]
fn a_waypoint_that_is_unknown_down_or_someone_else_refuses_the_connection() {
    let mut s = scene(config());
    let refused = |s: &Scene, reason: &str| {
        metric(&s.metrics(0), "ztunnel_waypoint_refused_total", &[&format!("reason=\"{reason}\"")])
    };
    // A waypoint whose certificate is for another service account than the one published for it.
    let cap = s.capture("impostor.pcap");
    let wp = &s.waypoint.pod;
    s.lab.publish_workload(&wp.uid, MESH_NS, &wp.name, "not-the-waypoint", wp.ip, 1, true).unwrap();
    s.refused(s.vip(), "wrong identity");
    assert_eq!(refused(&s, "unreachable"), 1.0);
    let m = s.metrics(0);
    assert!(metric(&m, "ztunnel_tls_handshake_failures_total", &["direction=\"outbound\""]) >= 1.0, "{m}");
    s.assert_no_bypass(cap, b"/refused");
    s.lab.publish_workload(&wp.uid, MESH_NS, &wp.name, "waypoint", wp.ip, 1, true).unwrap();

    unusable_waypoints_refuse(&mut s);
    assert_eq!(refused(&s, "unknown"), 2.0, "a hostname and an address that resolve to nothing");
    assert!(refused(&s, "unreachable") >= 2.0, "the impostor, and the waypoint down");
    // Flagged as Istio's ztunnel flags a connection it could not make, and a TLS handshake that failed.
    let m = s.metrics(0);
    let flagged = |flag: &str| {
        let labels = ["reporter=\"source\"", &format!("destination_service=\"{HOST}\"") as &str, flag];
        metric(&m, "istio_tcp_connections_closed_total", &labels)
    };
    assert_eq!(flagged("response_flags=\"CONNECT\""), 3.0, "two unresolved, one down: {m}");
    assert_eq!(flagged("response_flags=\"TLS_FAILURE\""), 1.0, "the impostor: {m}");
}

/// One round trip on an open echo connection.
fn round_trip(c: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    c.write_all(data)?;
    let mut back = vec![0u8; data.len()];
    c.read_exact(&mut back)?;
    assert_eq!(back, data);
    Ok(())
}

#[test]
fn open_connections_finish_where_they_go_and_end_with_their_waypoint() {
    let mut s = scene(config());
    let (mut old, via) = s.open_echo();
    assert!(via, "through the waypoint");
    round_trip(&mut old, b"before").unwrap();
    // xDS takes the waypoint away: new connections go straight to the server; the open one carries on
    // through the waypoint.
    s.set_server_waypoint(None);
    let (mut new, via) = s.open_echo();
    assert!(!via, "a new connection no longer passes the waypoint");
    round_trip(&mut new, b"direct").unwrap();
    round_trip(&mut old, b"after the change").unwrap();
    // The waypoint back, a connection through it, and the waypoint killed mid-stream: that connection ends
    // (it is not carried on around the waypoint), and new ones are refused.
    s.set_server_waypoint(Some(s.waypoint.by_hostname()));
    let (mut through, via) = s.open_echo();
    assert!(via);
    round_trip(&mut through, b"alive").unwrap();
    let cap = s.capture("reset-mid-stream.pcap");
    s.waypoint.proc.kill();
    let ended = round_trip(&mut through, b"/refused after the waypoint died");
    assert!(ended.is_err(), "the connection outlived its waypoint");
    s.refused(s.vip(), "waypoint down");
    s.assert_no_bypass(cap, b"/refused");
}

#[test]
fn a_waypoint_that_names_itself_or_two_that_name_each_other_loop_nowhere() {
    let s = scene(config());
    // Its own workload and service name it: ztunnel takes one hop to a waypoint and never asks where the
    // waypoint's own traffic goes (the waypoint is not captured; were it, the check of the source would
    // send its connections on).
    s.lab.set_pod_waypoint(&s.waypoint.pod, Some(Waypoint::by_address(s.waypoint.pod.ip))).unwrap();
    let mut own = s.waypoint.service();
    own["waypoint"] = s.waypoint.by_hostname();
    let server = json!({
        "name": "server", "namespace": MESH_NS, "hostname": HOST, "vips": [format!("/{SERVER_VIP}")],
        "ports": {"80": APP_PORT}, "waypoint": s.waypoint.by_hostname(),
    });
    s.lab.set_services(vec![server.clone(), own]).unwrap();
    s.through_waypoint(s.get(s.vip(), "/self"), "/self");
    // Two that name each other.
    let other = s.lab.add_waypoint(1, MESH_NS, "waypoint-b", "waypoint-b", "10.96.0.31".parse().unwrap(), HTTP_PORTS);
    let other = other.unwrap();
    s.lab.set_pod_waypoint(&s.waypoint.pod, Some(other.by_hostname())).unwrap();
    s.lab.set_pod_waypoint(&other.pod, Some(s.waypoint.by_hostname())).unwrap();
    let mut a = s.waypoint.service();
    a["waypoint"] = other.by_hostname();
    let mut b = other.service();
    b["waypoint"] = s.waypoint.by_hostname();
    s.lab.set_services(vec![server, a, b]).unwrap();
    let answer = s.get(s.vip(), "/pair").unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.head.matches("x-waypoint").count(), 1, "one waypoint, once: {answer:?}");
    assert_eq!(answer.header("x-waypoint"), Some("waypoint"));
    // The server's own workload has no waypoint: workload-addressed traffic goes straight to it.
    s.direct(s.get(s.pod(), "/still-direct"), "/still-direct");
}

#[test]
fn a_service_waypoint_with_iptables_rules_and_over_ipv6() {
    let s = scene(LabConfig { dual_stack: true, rule_backend: "iptables".into(), ..config() });
    service_waypoint_is_the_only_way(&s);
    // Over IPv6: the app's family is kept to the waypoint (named by hostname) and from it to the server.
    let vip6 = SocketAddr::new(SERVER_VIP6.parse().unwrap(), 80);
    let wp6 = s.waypoint.pod.ip6.expect("a dual-stack waypoint pod");
    let cap = s.capture("ipv6.pcap");
    s.through_waypoint_from(s.get(vip6, "/over-ipv6"), "/over-ipv6", wp6);
    assert_eq!(s.get(vip6, "/admin").unwrap().status, 403);
    s.assert_no_bypass(cap, b"/over-ipv6");
}

/// The same scenes with Istio's ztunnel on both nodes: the stand-in and the lab's xDS are what the ztunnel
/// users run today takes as waypoints.
#[test]
#[ignore = "needs Istio's ztunnel binary: AMBIT_PEER_ZTUNNEL=PATH cargo nextest run -p lab --test waypoint --run-ignored all"]
fn istios_ztunnel_takes_the_same_waypoints() {
    let path = std::env::var("AMBIT_PEER_ZTUNNEL").expect("AMBIT_PEER_ZTUNNEL: the path of Istio's ztunnel");
    let peer = lab::PeerZtunnel { binary: path.clone().into(), env: vec![], nodes: vec![0, 1], loopback_route: true };
    let mut s = scene(LabConfig { peer: Some(peer), ..config() });
    let argv0 = lab::util::argv0(s.lab.nodes[0].ztunnel.as_ref().expect("a ztunnel runs").pid());
    assert_eq!(argv0.as_deref(), Some(path.as_str()), "the client's node runs Istio's ztunnel");
    service_waypoint_is_the_only_way(&s);
    workload_waypoint_is_the_only_way(&s);
    traffic_from_the_waypoint_goes_on(&s);
    unusable_waypoints_refuse(&mut s);
}
