//! The runtime tier: containerd + runc run the CNI chain the agent installed, driven through CRI as a kubelet
//! drives them. Needs root, containerd, runc, umoci and gcc.

use std::net::SocketAddr;
use std::time::Duration;

use lab::demo::{APP_PORT, MESH_NS};
use lab::net::{EchoClient, EchoServer};
use lab::util::wait_for;
use lab::{Lab, LabConfig};

fn lab() -> Lab {
    Lab::start(LabConfig { runtime: true, enrolled_namespaces: vec![MESH_NS.into()], ..Default::default() })
        .unwrap_or_else(|e| panic!("lab starts: {e:#}"))
}

fn uid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{:012x}", n as u64 + u64::from(std::process::id()) * 1000)
}

fn served(lab: &Lab, node: usize, uid: &str) -> bool {
    lab.nodes[node]
        .config_dump()
        .map(|d| d["ambit"]["inpod"]["pods"].as_array().is_some_and(|a| a.iter().any(|x| x["uid"] == uid)))
        .unwrap_or(false)
}

#[test]
fn containerd_runs_the_chain_and_enrolled_sandboxes_are_meshed() {
    let lab = lab();
    let rt = |i: usize| lab.nodes[i].containerd.as_ref().unwrap();
    let (cu, su) = (uid(1), uid(2));
    let client = rt(0).run_pod_sandbox(MESH_NS, "client", &cu).unwrap_or_else(|e| panic!("{e:#}\n{}", rt(0).log()));
    let server = rt(1).run_pod_sandbox(MESH_NS, "server", &su).unwrap();
    let outsider = rt(0).run_pod_sandbox("legacy", "outsider", &uid(3)).unwrap();
    // containerd ran bridge + host-local + ambit-cni: enrolled sandboxes are captured and served.
    for (s, node, u) in [(&client, 0, &cu), (&server, 1, &su)] {
        assert!(s.netns.exec("nft", &["list", "ruleset"]).unwrap().contains("table inet ambit"));
        assert!(served(&lab, node, u));
    }
    assert!(outsider.netns.exec("nft", &["list", "ruleset"]).unwrap().trim().is_empty());
    // The mesh carries their traffic: the lab publishes them, as istiod would.
    for (s, node, u, name) in [(&client, 0usize, &cu, "client"), (&server, 1, &su, "server")] {
        lab.publish_workload(u, MESH_NS, name, "default", s.ip, node, true).unwrap();
    }
    let echo = EchoServer::start(&server.netns, SocketAddr::new(server.ip, APP_PORT)).unwrap();
    let mut c = EchoClient::connect(&client.netns, echo.addr(), Duration::from_secs(5)).unwrap();
    c.round_trip(b"through containerd's sandboxes").unwrap();
    assert_eq!(c.seen_ip(), client.ip.to_string());
    drop(c);
    wait_for("an HBONE access log line", Duration::from_secs(5), || {
        lab.nodes[0]
            .ztunnel
            .as_ref()?
            .log()
            .lines()
            .any(|l| l.contains("connection complete") && l.contains("dst.hbone_addr=\""))
            .then_some(())
    })
    .unwrap();

    // StopPodSandbox runs CNI DEL: the agent and ztunnel forget the pod.
    rt(0).stop_pod_sandbox(&client.id).unwrap();
    wait_for("ztunnel to drop the stopped sandbox", Duration::from_secs(10), || (!served(&lab, 0, &cu)).then_some(()))
        .unwrap();
    rt(0).remove_pod_sandbox(&client.id).unwrap();
    let records = lab.nodes[0].state_files();
    assert!(records.is_empty(), "the agent still records the removed sandbox: {records:?}");
}

#[test]
fn a_failed_enrolment_fails_run_pod_sandbox() {
    let mut lab = lab();
    lab.kill_ztunnel(0);
    let rt = lab.nodes[0].containerd.as_ref().unwrap();
    let err = rt.run_pod_sandbox(MESH_NS, "blocked", &uid(4)).unwrap_err().to_string();
    assert!(err.contains("ambit") || err.contains("Ambit"), "containerd did not surface the plugin's error: {err}");
    assert!(err.contains("no ztunnel is connected"), "{err}");
    // containerd tore the sandbox down: nothing is left on the node.
    assert!(
        rt.list()
            .unwrap()
            .iter()
            .all(|s| s.metadata.as_ref().map(|m| m.name.as_str()) != Some("blocked") || s.state != 0)
    );
    assert!(lab.nodes[0].state_files().is_empty());
    // With ztunnel back, the kubelet's retry succeeds.
    lab.start_ztunnel(0).unwrap();
    lab.wait_ready(0).unwrap();
    lab.wait_agent_ready(0).unwrap();
    let rt = lab.nodes[0].containerd.as_ref().unwrap();
    let ok = rt.run_pod_sandbox(MESH_NS, "blocked", &uid(5)).unwrap();
    assert!(ok.netns.exec("nft", &["list", "ruleset"]).unwrap().contains("table inet ambit"));
}
