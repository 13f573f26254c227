//! `ambit-agent debug`: every verdict of `debug pod` on a real node (captured; rules drifted by hand; rules
//! removed; ztunnel not serving; agent down; not enrolled; no such pod), `--repair`, and `debug node`. Needs
//! root.

use std::net::SocketAddr;
use std::time::Duration;

use lab::demo::{APP_PORT, LEGACY_NS, MESH_NS};
use lab::net::{EchoClient, EchoServer};
use lab::{Lab, LabConfig, Pod};
use serde_json::Value;

const OK: i32 = 0;
const NOT_CAPTURED: i32 = 3;
const CANNOT_TELL: i32 = 4;
const DEGRADED: i32 = 5;

fn lab() -> Lab {
    Lab::start(LabConfig { enrolled_namespaces: vec![MESH_NS.into()], ..Default::default() }).expect("lab starts")
}

/// `debug pod <target> -o json` on the pod's node: the exit code and the report.
fn debug_pod(lab: &Lab, node: usize, target: &str, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["pod", target, "-o", "json"];
    args.extend_from_slice(extra);
    let (code, out) = lab.debug(node, &args).unwrap();
    let json = out.find('{').map(|i| &out[i..]).unwrap_or_default();
    let v: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {out}"));
    (code, v)
}

fn full(p: &Pod) -> String {
    format!("{}/{}", p.namespace, p.name)
}

fn reaches(from: &Pod, to: SocketAddr) -> bool {
    EchoClient::connect(&from.netns, to, Duration::from_secs(5)).and_then(|mut c| c.round_trip(b"ping")).is_ok()
}

#[test]
fn a_captured_pod_is_proven_captured_by_name_uid_and_netns() {
    let lab = lab();
    let client = lab.add_pod_as(0, MESH_NS, "client", "client").unwrap();
    let server = lab.add_pod(1, MESH_NS, "server").unwrap();
    let _echo = EchoServer::start(&server.netns, SocketAddr::new(server.ip, APP_PORT)).unwrap();
    assert!(reaches(&client, SocketAddr::new(server.ip, APP_PORT)), "{}", lab.logs());

    let (code, r) = debug_pod(&lab, 0, &full(&client), &[]);
    assert_eq!((code, r["verdict"].as_str()), (OK, Some("captured")), "{r:#}\n{}", lab.logs());
    assert_eq!(r["rules"]["found"], serde_json::json!(["nftables"]), "{r:#}");
    assert_eq!(r["rules"]["missing"], serde_json::json!([]));
    assert!(r["rules"]["expectedLines"].as_u64() > Some(5), "{r:#}");
    assert_eq!(r["routing"]["ok"], true);
    assert_eq!(r["ztunnel"]["serves"], true);
    assert_eq!(r["ztunnel"]["identity"], format!("spiffe://cluster.local/ns/{MESH_NS}/sa/client"));
    assert!(r["ztunnel"]["certificate"].as_str().unwrap().starts_with("Available, expires "), "{r:#}");
    assert!(r["probeOutbound"]["ok"] == true && r["probeInbound"]["ok"] == true, "{r:#}");
    let ports: Vec<u64> = r["sockets"].as_array().unwrap().iter().filter_map(|s| s["port"].as_u64()).collect();
    for port in [15001, 15006, 15008] {
        assert!(ports.contains(&port), "{port}: {r:#}");
    }
    assert!(
        r["sockets"].as_array().unwrap().iter().all(|s| s["holders"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h.as_str().unwrap().starts_with("ztunnel["))),
        "{r:#}"
    );
    // The probes reached ztunnel and nothing else: no connection was dialed for them.
    let log = lab.nodes[0].ztunnel.as_ref().unwrap().log();
    assert!(!log.contains(":15007"), "ztunnel dialed for a probe: {log}");
    // An app's own traffic on the probe port, between pods, is proxied as any other.
    let _echo2 = EchoServer::start(&server.netns, SocketAddr::new(server.ip, 15007)).unwrap();
    assert!(reaches(&client, SocketAddr::new(server.ip, 15007)), "{}", lab.logs());

    for target in [client.uid.clone(), client.netns.path().display().to_string()] {
        let (code, r) = debug_pod(&lab, 0, &target, &[]);
        assert_eq!(
            (code, r["verdict"].as_str(), r["pod"]["name"].as_str()),
            (OK, Some("captured"), Some("client")),
            "{r:#}"
        );
    }
    // The human form.
    let (code, text) = lab.debug(0, &["pod", &full(&client)]).unwrap();
    assert_eq!(code, OK, "{text}");
    assert!(text.starts_with(&format!("pod {}: CAPTURED\n", full(&client))), "{text}");
    println!("{text}");
}

#[test]
fn rules_edited_or_removed_by_hand_are_shown_and_repaired() {
    let lab = lab();
    let pod = lab.add_pod(0, MESH_NS, "web").unwrap();
    let ns = &pod.netns;

    // Drift: an extra rule that lets everything out uncaptured, in Ambit's own chain.
    let listing = ns.exec("nft", &["list", "table", "inet", "ambit"]).unwrap();
    let chain = listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("chain "))
        .find(|c| c.starts_with("output_nat"))
        .map(|c| c.trim_end_matches(" {").to_string())
        .unwrap_or_else(|| panic!("no output chain: {listing}"));
    ns.exec("nft", &["insert", "rule", "inet", "ambit", &chain, "meta", "l4proto", "tcp", "accept"]).unwrap();
    let (code, r) = debug_pod(&lab, 0, &full(&pod), &[]);
    assert_eq!((code, r["verdict"].as_str()), (NOT_CAPTURED, Some("drifted")), "{r:#}");
    assert_eq!(r["rules"]["extra"], serde_json::json!(["meta l4proto tcp accept"]), "{r:#}");
    assert_eq!(r["probeOutbound"]["ok"], false, "the accept rule lets the probe out uncaptured: {r:#}");
    let (_, text) = lab.debug(0, &["pod", &full(&pod)]).unwrap();
    assert!(text.contains("              + meta l4proto tcp accept"), "{text}");
    println!("{text}");

    let (code, r) = debug_pod(&lab, 0, &full(&pod), &["--repair"]);
    assert_eq!((code, r["verdict"].as_str()), (OK, Some("captured")), "{r:#}");
    assert_eq!(r["repair"]["ok"], true, "{r:#}");
    assert!(lab.nodes[0].agent.as_ref().unwrap().log().contains("rules reinstalled on request"));

    // Removed.
    ns.exec("nft", &["delete", "table", "inet", "ambit"]).unwrap();
    let (code, r) = debug_pod(&lab, 0, &pod.uid, &[]);
    assert_eq!((code, r["verdict"].as_str()), (NOT_CAPTURED, Some("rules-missing")), "{r:#}");
    assert_eq!(r["rules"]["found"], serde_json::json!([]));
    let (code, r) = debug_pod(&lab, 0, &pod.uid, &["--repair"]);
    assert_eq!((code, r["verdict"].as_str()), (OK, Some("captured")), "{r:#}");

    // Policy routing removed.
    ns.exec("ip", &["rule", "del", "fwmark", "0x111/0xfff", "lookup", "100"]).unwrap();
    let (code, r) = debug_pod(&lab, 0, &pod.uid, &[]);
    assert_eq!(
        (code, r["verdict"].as_str(), &r["routing"]["ok"]),
        (NOT_CAPTURED, Some("drifted"), &Value::Bool(false)),
        "{r:#}"
    );
    let (code, _) = debug_pod(&lab, 0, &pod.uid, &["--repair"]);
    assert_eq!(code, OK);
}

#[test]
fn no_ztunnel_an_agent_down_and_pods_outside_the_mesh() {
    let mut lab = lab();
    let pod = lab.add_pod(0, MESH_NS, "web").unwrap();
    let outside = lab.add_pod(0, LEGACY_NS, "legacy").unwrap();

    // Not enrolled, by name (no record: the standalone config says why) and by netns (no rules).
    let (code, r) = debug_pod(&lab, 0, &full(&outside), &[]);
    assert_eq!((code, r["verdict"].as_str()), (OK, Some("not-enrolled")), "{r:#}");
    assert!(r["enrolment"]["why"].as_str().unwrap().contains("namespace not enrolled"), "{r:#}");
    let (code, r) = debug_pod(&lab, 0, &outside.netns.path().display().to_string(), &[]);
    assert_eq!((code, r["verdict"].as_str()), (OK, Some("not-enrolled")), "{r:#}");
    // No such pod.
    let (code, r) = debug_pod(&lab, 0, "legacy/nobody", &[]);
    assert_eq!((code, r["verdict"].as_str()), (OK, Some("not-enrolled")), "a pod the policy would not enrol: {r:#}");
    let (code, r) = debug_pod(&lab, 0, "mesh/nobody", &[]);
    assert_eq!((code, r["verdict"].as_str()), (CANNOT_TELL, Some("not-found")), "{r:#}");
    let (code, r) = debug_pod(&lab, 0, "0000-no-such-uid", &[]);
    assert_eq!((code, r["verdict"].as_str()), (CANNOT_TELL, Some("not-found")), "{r:#}");

    // The agent down: still captured (rules, ztunnel and the probes say so), but the node is degraded.
    lab.kill_agent(0);
    let (code, r) = debug_pod(&lab, 0, &full(&pod), &[]);
    assert_eq!(
        (code, r["verdict"].as_str(), &r["degraded"]),
        (DEGRADED, Some("captured"), &Value::Bool(true)),
        "{r:#}"
    );
    assert_eq!(r["agent"]["up"], false);
    assert!(
        r["reasons"].as_array().unwrap().iter().any(|w| w.as_str().unwrap().contains("the agent is down")),
        "{r:#}"
    );
    let (code, r) = debug_pod(&lab, 0, &full(&pod), &["--repair"]);
    assert_eq!((code, &r["repair"]["ok"]), (DEGRADED, &Value::Bool(false)), "a repair needs the agent: {r:#}");
    lab.start_agent(0).unwrap();

    // No ztunnel: the pod's connections wait in listeners nobody serves.
    lab.kill_ztunnel(0);
    let (code, r) = debug_pod(&lab, 0, &full(&pod), &[]);
    assert_eq!((code, r["verdict"].as_str()), (NOT_CAPTURED, Some("not-served")), "{r:#}");
    // `debug node` says the same, one line per pod.
    let (code, text) = lab.debug(0, &["node"]).unwrap();
    assert_eq!(code, NOT_CAPTURED, "{text}");
    assert!(text.contains(&full(&pod)) && text.contains("ztunnel does not serve it"), "{text}");
    assert!(text.contains("ambit-cni last"), "{text}");

    lab.start_ztunnel(0).unwrap();
    lab.wait_agent_ready(0).unwrap();
    let (code, text) = lab.debug(0, &["node"]).unwrap();
    assert_eq!(code, OK, "{text}");
    assert!(text.contains("captured"), "{text}");
}

#[test]
fn iptables_rules_are_compared_and_repaired_too() {
    let lab = Lab::start(LabConfig {
        enrolled_namespaces: vec![MESH_NS.into()],
        rule_backend: "iptables".into(),
        ..Default::default()
    })
    .expect("lab starts");
    let pod = lab.add_pod(0, MESH_NS, "web").unwrap();
    let (code, r) = debug_pod(&lab, 0, &full(&pod), &[]);
    assert_eq!((code, r["verdict"].as_str()), (OK, Some("captured")), "{r:#}\n{}", lab.logs());
    let found = r["rules"]["found"].as_array().unwrap();
    assert!(found.len() == 1 && found[0].as_str().unwrap().starts_with("iptables-"), "{r:#}");
    assert!(r["rules"]["expectedLines"].as_u64() > Some(5), "{r:#}");

    // A hand-made change to one of Ambit's rules: the redirect goes to another port.
    let tool = format!("{}-save", found[0].as_str().unwrap());
    let save = pod.netns.exec(&tool, &["-t", "nat"]).unwrap();
    let rule = save
        .lines()
        .find(|l| l.starts_with("-A AMBIT_OUTPUT") && l.contains("--to-ports 15001"))
        .unwrap_or_else(|| panic!("no redirect: {save}"))
        .to_string();
    let restore = tool.replace("-save", "-restore");
    let edit = format!("*nat\n-D {}\n-A {}\nCOMMIT\n", &rule[3..], rule[3..].replace("15001", "15009"));
    let mut child = pod.netns.command(&restore).arg("--noflush").stdin(std::process::Stdio::piped()).spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(edit.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    let (code, r) = debug_pod(&lab, 0, &full(&pod), &[]);
    assert_eq!((code, r["verdict"].as_str()), (NOT_CAPTURED, Some("drifted")), "{r:#}");
    assert_eq!(r["rules"]["missing"].as_array().unwrap().len(), 1, "{r:#}");
    assert!(r["rules"]["extra"][0].as_str().unwrap().contains("--to-ports 15009"), "{r:#}");
    let (code, r) = debug_pod(&lab, 0, &full(&pod), &["--repair"]);
    assert_eq!((code, r["verdict"].as_str()), (OK, Some("captured")), "{r:#}");
}

#[test]
fn a_hung_ztunnel_or_agent_and_a_vanished_netns_get_a_verdict_not_a_hang() {
    use nix::sys::signal::Signal;
    let mut lab = lab();
    let pod = lab.add_pod(0, MESH_NS, "web").unwrap();
    let gone = lab.add_pod(0, MESH_NS, "gone").unwrap();
    let quick = ["--timeout-ms", "300"];

    // ztunnel stopped (SIGSTOP): its sockets still complete handshakes in the kernel, but nothing answers.
    let z = lab.nodes[0].ztunnel.as_ref().unwrap();
    z.signal(Signal::SIGSTOP).unwrap();
    let (code, r) = debug_pod(&lab, 0, &full(&pod), &quick);
    z.signal(Signal::SIGCONT).unwrap();
    assert_eq!(
        (code, r["verdict"].as_str(), &r["ztunnel"]["serves"]),
        (DEGRADED, Some("captured"), &Value::Null),
        "{r:#}"
    );
    assert!(r["ztunnel"]["asked"].to_string().contains("no admin endpoint answered"), "{r:#}");

    // The agent stopped: /readyz and --repair time out.
    let a = lab.nodes[0].agent.as_ref().unwrap();
    a.signal(Signal::SIGSTOP).unwrap();
    let (code, r) = debug_pod(&lab, 0, &full(&pod), &[&quick[..], &["--repair"]].concat());
    a.signal(Signal::SIGCONT).unwrap();
    assert_eq!((code, &r["agent"]["up"]), (DEGRADED, &Value::Bool(false)), "{r:#}");
    assert!(r["repair"]["detail"].as_str().unwrap().contains("did not answer in time"), "{r:#}");

    // A netns gone while the agent was down (no sweep): the record says where it was, nothing is there.
    lab.kill_agent(0);
    gone.netns.delete().unwrap();
    let (code, r) = debug_pod(&lab, 0, "mesh/gone", &[]);
    assert_eq!((code, r["verdict"].as_str()), (CANNOT_TELL, Some("netns-gone")), "{r:#}");
    let (code, text) = lab.debug(0, &["node"]).unwrap();
    assert_eq!(code, CANNOT_TELL, "{text}");
    assert!(text.contains("mesh/gone") && text.contains("netns gone"), "{text}");
}

/// With Istio's ztunnel (same ZDS, same in-pod ports): `debug pod` reads its `/config_dump` and the probes
/// prove capture the same way. Istio's ztunnel is not built here: give its path.
#[test]
#[ignore = "needs Istio's ztunnel binary: AMBIT_PEER_ZTUNNEL=PATH cargo nextest run -p lab --test debug --run-ignored all"]
fn debug_reads_istios_ztunnel_too() {
    let path = std::env::var("AMBIT_PEER_ZTUNNEL").expect("AMBIT_PEER_ZTUNNEL: the path of Istio's ztunnel");
    let lab = Lab::start(LabConfig {
        enrolled_namespaces: vec![MESH_NS.into()],
        ztunnel: Some(path.into()),
        ..Default::default()
    })
    .expect("lab starts");
    let client = lab.add_pod_as(0, MESH_NS, "client", "client").unwrap();
    let server = lab.add_pod_as(1, MESH_NS, "server", "server").unwrap();
    let _echo = EchoServer::start(&server.netns, SocketAddr::new(server.ip, APP_PORT)).unwrap();
    assert!(reaches(&client, SocketAddr::new(server.ip, APP_PORT)), "{}", lab.logs());
    let (code, r) = debug_pod(&lab, 0, &full(&client), &[]);
    assert_eq!((code, r["verdict"].as_str()), (OK, Some("captured")), "{r:#}");
    assert_eq!((&r["ztunnel"]["istio"], &r["ztunnel"]["serves"]), (&Value::Bool(true), &Value::Bool(true)), "{r:#}");
    assert_eq!(r["ztunnel"]["identity"], format!("spiffe://cluster.local/ns/{MESH_NS}/sa/client"));
    let (_, text) = lab.debug(0, &["pod", &full(&client)]).unwrap();
    println!("{text}");
}
