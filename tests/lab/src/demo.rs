//! `lab demo`: the whole path on a two-node lab, checked step by step.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::lab::{Lab, LabConfig, Pod, Waypoint};
use crate::net::{EchoClient, EchoServer, HttpServer, http_exchange};
use crate::pcap::{self, Capture};
use crate::util::wait_for;

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// Passed?
    pub ok: bool,
    /// Evidence or the failure.
    pub detail: String,
}

/// Namespace whose pods are enrolled in the demo.
pub const MESH_NS: &str = "mesh";
/// Namespace whose pods are not.
pub const LEGACY_NS: &str = "legacy";
/// The port the demo servers listen on.
pub const APP_PORT: u16 = 8080;

/// The demo's pods and servers.
pub struct DemoPods {
    /// Enrolled, on node1.
    pub client: Pod,
    /// Enrolled, on node2.
    pub server: Pod,
    /// Not enrolled, on node1.
    pub outsider: Pod,
    /// The echo server in `server`.
    pub echo: EchoServer,
}

fn say(out: &mut dyn Write, msg: impl AsRef<str>) {
    let _ = writeln!(out, "{}", msg.as_ref());
    let _ = out.flush();
}

/// Builds the demo lab.
pub fn start(out: &mut dyn Write) -> anyhow::Result<Lab> {
    let t = Instant::now();
    say(
        out,
        "• building a two-node lab (network namespaces, bridge + host-local CNI, ambit-agent and ztunnel on each node)…",
    );
    let lab = Lab::start(LabConfig { enrolled_namespaces: vec![MESH_NS.into()], ..Default::default() })?;
    say(
        out,
        format!(
            "  lab {} up in {} ms; nodes: {}",
            lab.id,
            Lab::ms(t),
            lab.nodes.iter().map(|n| format!("{} ({})", n.name, n.ip)).collect::<Vec<_>>().join(", ")
        ),
    );
    say(
        out,
        format!(
            "  control plane (istiod's CA and delta xDS, the only holder of the mesh root key) on {}:{}",
            crate::controlplane::CP_IP,
            crate::controlplane::CP_PORT
        ),
    );
    Ok(lab)
}

/// Creates the demo's pods through the CNI chain.
pub fn pods(lab: &Lab, out: &mut dyn Write) -> anyhow::Result<DemoPods> {
    let make = |out: &mut dyn Write, node: usize, ns: &str, name: &str, sa: &str| -> anyhow::Result<Pod> {
        let t = Instant::now();
        let p = lab.add_pod_as(node, ns, name, sa).map_err(|e| anyhow::anyhow!("{e}"))?;
        let cni: Vec<String> = p.timings.iter().map(|(k, d)| format!("{k} {} ms", d.as_millis())).collect();
        say(
            out,
            format!(
                "  pod {:<16} on {} ip {:<12} ({}; {} ms in all)",
                p.full_name(),
                lab.nodes[node].name,
                p.ip,
                cni.join(", "),
                Lab::ms(t)
            ),
        );
        Ok(p)
    };
    say(out, "• creating pods as a container runtime does (netns, then the CNI conflist with ambit-cni chained last)…");
    let client = make(out, 0, MESH_NS, "client", "client")?;
    let server = make(out, 1, MESH_NS, "server", "server")?;
    let outsider = make(out, 0, LEGACY_NS, "outsider", "default")?;
    let echo = EchoServer::start(&server.netns, SocketAddr::new(server.ip, APP_PORT))?;
    Ok(DemoPods { client, server, outsider, echo })
}

fn check(out: &mut dyn Write, checks: &mut Vec<Check>, name: &'static str, r: anyhow::Result<String>) {
    let (ok, detail) = match r {
        Ok(d) => (true, d),
        Err(e) => (false, format!("{e:#}")),
    };
    say(out, format!("  {} {name}: {detail}", if ok { "✔" } else { "✘" }));
    checks.push(Check { name, ok, detail });
}

/// The demo's pods that are still there after its checks (the client is deleted by the last one).
pub struct Remaining {
    /// Enrolled, on node2, with its echo server.
    pub server: Pod,
    /// Not enrolled, on node1.
    pub outsider: Pod,
    /// The echo server in `server`.
    pub echo: EchoServer,
    /// The web service's waypoint and the server's HTTP server behind it, if they started.
    pub web: Option<(Waypoint, HttpServer)>,
}

/// Runs every check of the demo; consumes the client pod (the last check deletes it) and returns the others,
/// for `lab demo --keep` to leave running.
pub fn run_checks(lab: &Lab, pods: DemoPods, out: &mut dyn Write) -> (Vec<Check>, Remaining) {
    let DemoPods { client, server, outsider, echo } = pods;
    let mut checks = Vec::new();
    let timeout = Duration::from_secs(5);
    let marker = format!("ambit-demo-payload-{}", crate::util::unique_id());

    say(out, "• client (mesh, node1) → server (mesh, node2): pod → ztunnel → HBONE over the node link → ztunnel → pod");
    let capture = Capture::start(&lab.nodes[0].netns, "eth0", &lab.dir.join("node-link.pcap"));
    let conn = EchoClient::connect(&client.netns, echo.addr(), timeout);
    let traffic = conn.and_then(|mut c| {
        for _ in 0..3 {
            c.round_trip(marker.as_bytes())?;
        }
        Ok(c)
    });
    check(
        out,
        &mut checks,
        "enrolled pods talk across nodes",
        traffic
            .as_ref()
            .map(|_| format!("3 round trips of {} bytes", marker.len()))
            .map_err(|e| anyhow::anyhow!("{e:#}")),
    );
    check(
        out,
        &mut checks,
        "the server sees the client's pod IP",
        match &traffic {
            Ok(c) if c.seen_ip() == client.ip.to_string() => Ok(format!("server saw {}", c.seen_as)),
            Ok(c) => Err(anyhow::anyhow!("server saw {}, client is {}", c.seen_as, client.ip)),
            Err(_) => Err(anyhow::anyhow!("no connection")),
        },
    );
    drop(traffic);
    check(
        out,
        &mut checks,
        "only TLS crosses the node link, never the payload",
        capture.and_then(|c| c.finish()).and_then(|segs| {
            anyhow::ensure!(!segs.is_empty(), "the capture saw nothing");
            anyhow::ensure!(
                !pcap::contains(&segs, marker.as_bytes()),
                "the payload appeared in clear text on the node link"
            );
            anyhow::ensure!(pcap::has_tls_to(&segs, ambit_proto::zds::INBOUND_HBONE_PORT), "no TLS handshake to port 15008 was seen");
            let proof = pcap::only_tls(&segs, ambit_proto::zds::INBOUND_HBONE_PORT).map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(format!(
                "{} segments captured on node1 eth0: every byte of payload is in {} TLS records ({} of application data) on {} HBONE flows, handshake first; payload absent",
                segs.len(),
                proof.records,
                proof.application_data,
                proof.flows
            ))
        }),
    );
    check(out, &mut checks, "the access logs show both SPIFFE identities", access_logged(lab, &client, &server));
    check(
        out,
        &mut checks,
        "each pod's certificate comes from the control plane's CA; no node holds the CA key",
        certificates_from_ca(lab, &[&client, &server]),
    );

    say(out, "• outsider (legacy, not enrolled, node1) → server");
    check(
        out,
        &mut checks,
        "the non-enrolled pod's traffic is not captured",
        outsider_uncaptured(lab, &outsider, &server, echo.addr(), timeout),
    );

    say(
        out,
        "• client → web service, whose waypoint (node2) applies HTTP policy: pod → ztunnel → HBONE → waypoint → HBONE → ztunnel → server",
    );
    let web = match web_behind_waypoint(lab, &server) {
        Ok(w) => Some(w),
        Err(e) => {
            check(out, &mut checks, "a service's waypoint takes its traffic and applies its policy", Err(e));
            None
        }
    };
    if let Some((wp, _)) = &web {
        let capture = Capture::start(&lab.nodes[0].netns, "eth0", &lab.dir.join("waypoint-link.pcap"));
        check(
            out,
            &mut checks,
            "a service's waypoint takes its traffic and applies its policy",
            through_waypoint(&client, wp),
        );
        check(
            out,
            &mut checks,
            "nothing reaches the server around the waypoint; only TLS crosses the node link",
            capture.and_then(|c| c.finish()).and_then(|segs| {
                let around = segs.iter().filter(|g| g.dst == server.ip && !g.payload.is_empty()).count();
                anyhow::ensure!(around == 0, "{around} segments went from node1 to the server's pod directly");
                anyhow::ensure!(!pcap::contains(&segs, WEB_MARKER.as_bytes()), "the request crossed in clear text");
                let to_waypoint = segs.iter().filter(|g| g.dst == wp.pod.ip).count();
                anyhow::ensure!(to_waypoint > 0, "nothing went to the waypoint");
                let proof =
                    pcap::only_tls(&segs, ambit_proto::zds::INBOUND_HBONE_PORT).map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok(format!(
                    "{to_waypoint} segments to the waypoint {}, none to the server {}; {} TLS records, no request in the clear",
                    wp.pod.ip, server.ip, proof.records
                ))
            }),
        );
    }

    say(out, "• deleting the client pod (CNI DEL)");
    check(out, &mut checks, "deleting a pod removes its rules and its ztunnel state", delete_cleans_up(lab, client));
    (checks, Remaining { server, outsider, echo, web })
}

/// The path of the demo's request through the waypoint (in the clear only inside the pods).
const WEB_MARKER: &str = "/ambit-demo-through-the-waypoint";
/// The web service's VIP, and its waypoint's.
const WEB_VIP: &str = "10.96.0.20";
const WAYPOINT_VIP: &str = "10.96.0.30";

/// An HTTP server in `server` behind the service `web` (VIP port 80), whose waypoint runs on node2 as
/// istiod would publish one for `istio.io/use-waypoint`.
fn web_behind_waypoint(lab: &Lab, server: &Pod) -> anyhow::Result<(Waypoint, HttpServer)> {
    let port = APP_PORT + 1;
    let http = HttpServer::start(&server.netns, SocketAddr::new(server.ip, port), "web")?;
    let wp = lab.add_waypoint(1, MESH_NS, "waypoint", "waypoint", WAYPOINT_VIP.parse()?, &[80])?;
    let host = format!("web.{MESH_NS}.svc.cluster.local");
    let web = serde_json::json!({
        "name": "web", "namespace": MESH_NS, "hostname": host, "vips": [format!("/{WEB_VIP}")],
        "ports": {"80": port}, "waypoint": wp.by_hostname(),
    });
    lab.set_services(vec![web, wp.service()])?;
    lab.set_pod_services(server, serde_json::json!({ format!("{MESH_NS}/{host}"): {} }))?;
    Ok((wp, http))
}

/// A request through the waypoint gets its header, one its rule denies gets 403.
fn through_waypoint(client: &Pod, wp: &Waypoint) -> anyhow::Result<String> {
    let vip = SocketAddr::new(WEB_VIP.parse()?, 80);
    let ok = http_exchange(&client.netns, vip, "GET", WEB_MARKER)?;
    anyhow::ensure!(ok.status == 200, "GET {WEB_MARKER} answered {}", ok.status);
    anyhow::ensure!(ok.header("x-waypoint") == Some("waypoint"), "no x-waypoint header: {}", ok.head);
    anyhow::ensure!(ok.body.contains(&wp.pod.ip.to_string()), "the server did not see the waypoint: {}", ok.body);
    let denied = http_exchange(&client.netns, vip, "GET", "/admin")?;
    anyhow::ensure!(denied.status == 403, "GET /admin answered {}", denied.status);
    Ok(format!(
        "GET {vip}{WEB_MARKER}: 200 with x-waypoint, the server saw the waypoint {} ({}); GET /admin: 403 from the waypoint",
        wp.pod.ip, ok.body
    ))
}

fn access_logged(lab: &Lab, client: &Pod, server: &Pod) -> anyhow::Result<String> {
    let (src, dst) = (client.identity(), server.identity());
    let want = |node: usize, direction: &str| -> anyhow::Result<String> {
        let z = lab.nodes[node].ztunnel.as_ref().context("no ztunnel")?;
        wait_for(&format!("{direction} access log on {}", lab.nodes[node].name), Duration::from_secs(5), || {
            z.log()
                .lines()
                .find(|l| {
                    l.contains("connection complete")
                        && l.contains(&format!("src.identity=\"{src}\""))
                        && l.contains(&format!("dst.identity=\"{dst}\""))
                        && l.contains(&format!("direction=\"{direction}\""))
                })
                .map(str::to_string)
        })
    };
    let out = want(0, "outbound")?;
    want(1, "inbound")?;
    let line = out.split("connection complete").nth(1).unwrap_or_default().trim().to_string();
    Ok(format!("both ztunnels logged {src} → {dst}; node1: {line}"))
}

/// Where the pods' certificates came from, per their ztunnels' `/config_dump`, and that no ztunnel was given
/// the CA's key.
fn certificates_from_ca(lab: &Lab, pods: &[&Pod]) -> anyhow::Result<String> {
    let mut seen = Vec::new();
    for p in pods {
        let node = &lab.nodes[p.node];
        let dump = node.config_dump()?;
        let id = p.identity();
        let cert = dump["ambit"]["certificates"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["identity"] == id.as_str()))
            .with_context(|| format!("{}'s ztunnel has no certificate for {id}", node.name))?;
        anyhow::ensure!(cert["state"] == "Available", "{id} on {}: {cert}", node.name);
        let source = cert["source"].as_str().unwrap_or_default();
        anyhow::ensure!(source.starts_with("istio CA https://"), "{id} came from {source:?}, not the control plane");
        seen.push(format!("{id} on {}: {source}, expires in {} s", node.name, cert["expiresInSeconds"]));
    }
    for n in &lab.nodes {
        let z = n.ztunnel.as_ref().context("no ztunnel")?;
        let env = std::fs::read(format!("/proc/{}/environ", z.pid()))?;
        let key = lab.dir.join("ca-key.pem");
        anyhow::ensure!(
            !env.windows(18).any(|w| w == b"AMBIT_LOCAL_CA_KEY")
                && !env.windows(key.as_os_str().len()).any(|w| w == key.as_os_str().as_encoded_bytes()),
            "{}'s ztunnel was given the CA key",
            n.name
        );
    }
    Ok(format!("{}; no ztunnel's environment names the CA key", seen.join("; ")))
}

fn outsider_uncaptured(
    lab: &Lab,
    outsider: &Pod,
    server: &Pod,
    addr: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<String> {
    let rules = outsider.nft_ruleset()?;
    anyhow::ensure!(rules.trim().is_empty(), "the outsider has rules:\n{rules}");
    let mut c = EchoClient::connect(&outsider.netns, addr, timeout)?;
    c.round_trip(b"hello from outside")?;
    drop(c);
    let src = format!("src.addr={}:", outsider.ip);
    // The server's ztunnel sees it as plaintext inbound; the outsider's node ztunnel never touches it.
    wait_for("the server's ztunnel to log the plaintext connection", Duration::from_secs(5), || {
        let log = lab.nodes[server.node].ztunnel.as_ref()?.log();
        log.lines()
            .any(|l| l.contains("connection complete") && l.contains(&src) && l.contains("direction=\"inbound\""))
            .then_some(())
    })?;
    let node1 = lab.nodes[outsider.node].ztunnel.as_ref().context("no ztunnel")?.log();
    anyhow::ensure!(!node1.lines().any(|l| l.contains(&src)), "node1's ztunnel handled the outsider's connection");
    Ok(format!(
        "no rules in its netns, node1's ztunnel never saw {}, it reached the server as plaintext (server side: inbound 15006)",
        outsider.ip
    ))
}

fn delete_cleans_up(lab: &Lab, client: Pod) -> anyhow::Result<String> {
    let node = &lab.nodes[client.node];
    anyhow::ensure!(client.nft_ruleset()?.contains("table inet ambit"), "the client had no rules before deletion");
    lab.cni_del(&client).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rules = client.nft_ruleset()?;
    anyhow::ensure!(rules.trim().is_empty(), "rules remain after DEL:\n{rules}");
    let ip_rules = client.netns.ip(&["rule", "show"])?;
    anyhow::ensure!(!ip_rules.contains("0x111"), "the policy routing rule remains:\n{ip_rules}");
    wait_for("ztunnel to drop the pod", Duration::from_secs(5), || {
        let dump = node.config_dump().ok()?;
        let pods = dump["ambit"]["inpod"]["pods"].as_array()?;
        (!pods.iter().any(|p| p["uid"] == client.uid)).then_some(())
    })?;
    let records = node.state_files();
    anyhow::ensure!(records.is_empty(), "the agent still records {} pod(s)", records.len());
    // DEL again is fine (idempotent).
    lab.cni_del(&client).map_err(|e| anyhow::anyhow!("second DEL: {e}"))?;
    lab.delete_pod(client)?;
    Ok("nft table, ip rule and ztunnel's proxy gone; agent record removed; a second DEL succeeds".into())
}

/// Prints the summary; returns whether all passed.
pub fn summary(checks: &[Check], out: &mut dyn Write) -> bool {
    say(out, "\nsummary:");
    for c in checks {
        say(out, format!("  {}  {}", if c.ok { "PASS" } else { "FAIL" }, c.name));
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    say(out, format!("{} of {} checks passed", checks.len() - failed, checks.len()));
    failed == 0
}
