//! Load and its limits: many connections from many enrolled pods through one ztunnel (`lab load` at a smaller
//! size), and ztunnel at its open-files limit answering the connections it cannot take with a reset, never
//! crashing, and serving again once descriptors are free. Needs root.

use std::net::SocketAddr;
use std::time::Duration;

use lab::demo::{APP_PORT, MESH_NS};
use lab::loadgen::{LoadOpts, footprint, run, verdict};
use lab::net::{EchoClient, EchoServer};
use lab::util::{metric, wait_for};
use lab::{Lab, LabConfig};

#[test]
fn load_at_a_smaller_size() {
    let opts = LoadOpts { connections: 1000, pods: 20, servers: 2, hold: Duration::from_secs(2), ..Default::default() };
    let mut out = Vec::new();
    let report = run(&opts, &mut out).unwrap_or_else(|e| panic!("{e:#}\n{}", String::from_utf8_lossy(&out)));
    let broken = verdict(&report);
    assert!(broken.is_empty(), "{broken:?}\n{}", String::from_utf8_lossy(&out));
    assert_eq!(report.concurrent, 1000);
}

#[test]
fn at_the_open_files_limit_ztunnel_sheds_connections_and_recovers() {
    let lab = Lab::start(LabConfig { enrolled_namespaces: vec![MESH_NS.into()], ..Default::default() }).unwrap();
    let client = lab.add_pod_as(0, MESH_NS, "client", "client").unwrap();
    let server = lab.add_pod_as(1, MESH_NS, "server", "server").unwrap();
    let echo = EchoServer::start(&server.netns, SocketAddr::new(server.ip, APP_PORT)).unwrap();
    let timeout = Duration::from_secs(5);
    EchoClient::connect(&client.netns, echo.addr(), timeout).unwrap().round_trip(b"warm").unwrap();
    // Leave node1's ztunnel 20 descriptors to spare.
    let pid = lab.nodes[0].ztunnel.as_ref().unwrap().pid();
    let limit = footprint(pid).fds + 20;
    let out = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={limit}:{limit}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "prlimit: {}", String::from_utf8_lossy(&out.stderr));

    let mut held = Vec::new();
    let mut refused = Vec::new();
    for i in 0..60 {
        match EchoClient::connect(&client.netns, echo.addr(), timeout)
            .and_then(|mut c| c.round_trip(format!("connection {i}").as_bytes()).map(|_| c))
        {
            Ok(c) => held.push(c),
            Err(e) => refused.push(format!("{e:#}")),
        }
    }
    // The first ones were served; the rest were answered at once with a reset, not left to time out.
    assert!(!held.is_empty() && held.len() < 60, "{} served, {} refused", held.len(), refused.len());
    for e in &refused {
        assert!(!e.contains("timed out") && !e.contains("WouldBlock"), "a connection was left to time out: {e}");
    }
    assert!(lab.nodes[0].ztunnel.as_ref().map(|z| z.pid()) == Some(pid));
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "ztunnel died at its limit");
    // The held connections still work, and once they close new ones are served again.
    for c in &mut held {
        c.round_trip(b"still here").unwrap_or_else(|e| panic!("{e:#}\n{}", lab.logs()));
    }
    drop(held);
    wait_for("ztunnel to serve new connections again", Duration::from_secs(15), || {
        EchoClient::connect(&client.netns, echo.addr(), timeout).ok()?.round_trip(b"again").ok()
    })
    .unwrap();
    // Counted (read now: at its limit ztunnel could not accept the scrape either).
    let shed = metric(&lab.nodes[0].metrics().unwrap(), "ztunnel_connections_shed_total", &[]);
    assert!(shed >= 1.0, "no connection counted as shed");
}
