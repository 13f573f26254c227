//! End to end: the demo's checks and the bad inputs of the first path, on real labs. Needs root.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use lab::demo::{self, APP_PORT, MESH_NS};
use lab::net::{EchoClient, EchoServer};
use lab::util::{metric, wait_for};
use lab::{Lab, LabConfig, PodError};
use serde_json::{Value, json};

mod common;

fn lab() -> Lab {
    Lab::start(LabConfig { enrolled_namespaces: vec![MESH_NS.into()], ..Default::default() }).expect("lab starts")
}

#[test]
fn demo_checks_all_pass() {
    let lab = lab();
    let mut out = Vec::new();
    let pods = demo::pods(&lab, &mut out).unwrap_or_else(|e| panic!("{e:#}\n{}", lab.logs()));
    let (checks, _remaining) = demo::run_checks(&lab, pods, &mut out);
    let failed: Vec<_> = checks.iter().filter(|c| !c.ok).collect();
    assert_eq!(checks.len(), 9);
    assert!(failed.is_empty(), "failed checks: {failed:#?}\n{}\n{}", String::from_utf8_lossy(&out), lab.logs());
    // Both ztunnels counted the mesh connection in Istio's metrics, with Istio's labels.
    for (node, reporter) in [(0, "source"), (1, "destination")] {
        let m = lab.nodes[node].metrics().unwrap();
        let labels = [
            &format!("reporter=\"{reporter}\"") as &str,
            "source_principal=\"spiffe://cluster.local/ns/mesh/sa/client\"",
            "destination_principal=\"spiffe://cluster.local/ns/mesh/sa/server\"",
            "destination_workload=\"server\"",
            "connection_security_policy=\"mutual_tls\"",
        ];
        assert!(metric(&m, "istio_tcp_connections_opened_total", &labels) >= 1.0, "node{}: {m}", node + 1);
        assert!(metric(&m, "istio_tcp_connections_closed_total", &labels) >= 1.0, "node{}: {m}", node + 1);
        assert!(metric(&m, "istio_tcp_received_bytes_total", &labels) >= 81.0, "node{}: {m}", node + 1);
        assert!(metric(&m, "istio_tcp_sent_bytes_total", &labels) >= 81.0, "node{}: {m}", node + 1);
    }
}

/// Runs the plugin binary directly with the given environment and stdin.
fn run_plugin(env: &[(&str, &str)], stdin: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(lab::util::binary("ambit-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn add_env(netns: &str) -> Vec<(&str, &str)> {
    vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=p;K8S_POD_UID=u-1"),
        ("CNI_PATH", "/usr/lib/cni"),
    ]
}

fn cni_error(code: i32, stdout: &str) -> Value {
    assert_ne!(code, 0, "the plugin must exit non-zero; stdout: {stdout}");
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("stdout is not the CNI error JSON ({e}): {stdout:?}"))
}

#[test]
fn plugin_refuses_malformed_config_and_environment() {
    lab::require_root();
    let log = std::env::temp_dir().join(format!("ambit-cni-e2e-{}.log", std::process::id()));
    let good = json!({"cniVersion": "1.0.0", "name": "n", "type": "ambit-cni", "log_file": log, "agent_socket": "/nonexistent.sock"});
    let env = add_env("/var/run/netns/x");

    let (c, out, err) = run_plugin(&env, b"{not json");
    let e = cni_error(c, &out);
    assert_eq!(e["code"], 6, "{e}");
    assert!(!err.is_empty(), "the plugin logs to stderr");

    let (c, out, _) = run_plugin(&env, br#"{"cniVersion":"0.2.0","name":"n","type":"ambit-cni"}"#);
    assert_eq!(cni_error(c, &out)["code"], 1);

    let (c, out, _) = run_plugin(&env, br#"{"name":"n","type":"ambit-cni"}"#);
    assert_eq!(cni_error(c, &out)["code"], 7);

    let (c, out, _) =
        run_plugin(&env, br#"{"cniVersion":"1.0.0","name":"n","type":"ambit-cni","agent_timeout_ms":"soon"}"#);
    assert_eq!(cni_error(c, &out)["code"], 7);

    let stdin = serde_json::to_vec(&good).unwrap();
    let (c, out, _) = run_plugin(&[("CNI_COMMAND", "ADD")], &stdin);
    let e = cni_error(c, &out);
    assert_eq!(e["code"], 4);
    assert_eq!(e["cniVersion"], "1.0.0");
    let (c, out, _) = run_plugin(&[], &stdin);
    assert_eq!(cni_error(c, &out)["code"], 4);
    let mut no_netns = add_env("");
    no_netns.retain(|(k, _)| *k != "CNI_NETNS");
    let (c, out, _) = run_plugin(&no_netns, &stdin);
    assert_eq!(cni_error(c, &out)["code"], 4);

    // VERSION needs nothing but the command.
    let (c, out, _) = run_plugin(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"1.1.0"}"#);
    assert_eq!(c, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
    let _ = std::fs::remove_file(&log);
}

#[test]
fn add_fails_closed_when_the_agent_is_down_and_recovers() {
    let mut lab = lab();
    lab.nodes[0].agent.as_mut().unwrap().stop(Duration::from_secs(5));
    let sock = lab.nodes[0].cni_socket();
    match lab.add_pod(0, MESH_NS, "early") {
        Err(PodError::Cni(f)) => {
            assert_eq!(f.code(), Some(11), "{f}");
            assert!(f.msg().contains(&sock.display().to_string()), "the message must name the socket: {}", f.msg());
        }
        Err(e) => panic!("unexpected failure: {e}"),
        Ok(_) => panic!("an enrolled pod must not start while the agent is down"),
    }
    // Once the agent is back, the runtime's retry succeeds.
    lab.start_agent(0).unwrap();
    let pod = lab.add_pod(0, MESH_NS, "late").unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert!(pod.nft_ruleset().unwrap().contains("table inet ambit"));
}

/// A pod deleted while the agent is down, whose netns the runtime keeps: the DEL succeeds (a pod's removal never
/// waits for the agent), the plugin leaves it beside the agent's socket, and the agent carries it out when it is
/// back. (Found by the soak: such a pod stayed captured, re-adopted from its record by every later agent.)
#[test]
fn a_del_while_the_agent_is_down_is_carried_out_when_it_is_back() {
    let mut lab = lab();
    let pod = lab.add_pod(0, MESH_NS, "deleted-while-down").unwrap();
    assert!(pod.nft_ruleset().unwrap().contains("table inet ambit"));
    lab.nodes[0].agent.as_mut().unwrap().stop(Duration::from_secs(5));
    lab.cni_del(&pod).unwrap_or_else(|e| panic!("DEL must succeed without an agent: {e}"));
    let left = ambit_proto::cni_api::deferred_del_dir(&lab.nodes[0].cni_socket());
    assert_eq!(std::fs::read_dir(&left).unwrap().count(), 1, "the DEL is left for the agent");
    lab.start_agent(0).unwrap();
    wait_for("the agent to carry out the DEL", Duration::from_secs(10), || {
        (!pod.nft_ruleset().ok()?.contains("table inet ambit")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let rules = pod.netns.ip(&["rule", "show"]).unwrap();
    assert!(!rules.contains("0x111/0xfff"), "{rules}");
    let (_, m) = lab.agent_get(0, "/metrics").unwrap();
    assert_eq!(metric(&m, "ambit_agent_pods_enrolled ", &[]), 0.0, "{m}");
    assert_eq!(std::fs::read_dir(&left).unwrap().count(), 0, "the deferred DEL is consumed");
}

#[test]
fn add_fails_within_the_timeout_when_the_agent_hangs() {
    lab::require_root();
    let dir = std::env::temp_dir().join(format!("ambit-hang-{}", lab::util::unique_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("hung.sock");
    // An "agent" that accepts and never answers.
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let held = std::thread::spawn(move || {
        let conn = listener.accept().map(|c| c.0);
        std::thread::sleep(Duration::from_secs(2));
        drop(conn);
    });
    let conf = json!({"cniVersion": "1.0.0", "name": "n", "type": "ambit-cni", "agent_socket": sock, "agent_timeout_ms": 300, "log_file": dir.join("cni.log")});
    let (c, out, _) = run_plugin(&add_env("/var/run/netns/x"), &serde_json::to_vec(&conf).unwrap());
    let e = cni_error(c, &out);
    assert_eq!(e["code"], 11);
    let msg = e["msg"].as_str().unwrap();
    assert!(msg.contains("did not answer within 300 ms") && msg.contains(&sock.display().to_string()), "{msg}");
    held.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

fn ambit_plugin_conf(lab: &Lab, node: usize) -> Value {
    let list = lab.nodes[node].cni.load_conflist().unwrap();
    let mut conf = list["plugins"].as_array().unwrap().iter().find(|p| p["type"] == "ambit-cni").unwrap().clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf
}

fn assert_nothing_held(lab: &Lab, node: usize) {
    let n = &lab.nodes[node];
    let records = n.state_files();
    assert!(records.is_empty(), "the agent recorded {records:?}");
    let dump = n.config_dump().unwrap();
    assert_eq!(dump["ambit"]["inpod"]["pods"], json!([]), "ztunnel serves pods: {dump}");
}

#[test]
fn a_vanished_netns_is_a_clear_error_and_leaves_nothing() {
    let lab = lab();
    let n = &lab.nodes[0];
    let conf = ambit_plugin_conf(&lab, 0);
    // Never existed.
    let att = lab::cni::Attachment {
        container_id: "c1".into(),
        netns: "/var/run/netns/ambit-vanished-never".into(),
        ifname: "eth0".into(),
        args: "K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=ghost;K8S_POD_UID=g-1".into(),
    };
    let e = n.cni.exec_raw(&n.netns, "ADD", &att, &conf).unwrap_err();
    assert_eq!(e.code(), Some(8), "{e}");
    assert!(e.msg().contains("is gone"), "{}", e.msg());
    // Removed between the primary CNI and ambit-cni: the primary succeeded, the netns went away.
    let ns = lab::Netns::create(&format!("ambit-{}-vanishing", lab.id)).unwrap();
    let path = ns.path();
    let att = lab::cni::Attachment { netns: path.clone(), container_id: "c2".into(), ..att };
    ns.delete().unwrap();
    let e = n.cni.exec_raw(&n.netns, "ADD", &att, &conf).unwrap_err();
    assert_eq!(e.code(), Some(8), "{e}");
    assert!(e.msg().contains(&path.display().to_string()), "{}", e.msg());
    assert_nothing_held(&lab, 0);
    // DEL of what never got added succeeds.
    n.cni.exec_raw(&n.netns, "DEL", &att, &conf).unwrap();
}

#[test]
fn lab_pod_adds_and_deletes_pods_on_a_running_lab() {
    let mut lab = lab();
    lab.keep(); // as `lab demo --keep` leaves it
    let cli = |args: &[&str]| {
        let out = Command::new(lab::util::binary("lab")).args(args).args(["--lab", &lab.id]).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = cli(&["pod", "add", "mesh/extra", "--node", "2", "--service-account", "extra"]);
    assert!(ok, "{text}");
    assert!(text.contains("enrolled: captured"), "{text}");
    let extra = lab::Netns::open(&format!("ambit-{}-mesh-extra", lab.id)).unwrap();
    assert!(extra.exec("nft", &["list", "ruleset"]).unwrap().contains("table inet ambit"));
    wait_for("node2's ztunnel to serve it", Duration::from_secs(5), || {
        let pods = lab.nodes[1].config_dump().ok()?["ambit"]["inpod"]["pods"].as_array()?.clone();
        pods.iter().any(|p| p["name"] == "mesh/extra").then_some(())
    })
    .unwrap();
    // Published: a pod of this process reaches it over HBONE.
    let client = lab.add_pod(0, MESH_NS, "client").unwrap();
    let ip: std::net::IpAddr = text.split_whitespace().nth(3).unwrap().parse().unwrap();
    let echo = EchoServer::start(&extra, SocketAddr::new(ip, APP_PORT)).unwrap();
    let mut c = EchoClient::connect(&client.netns, echo.addr(), Duration::from_secs(5)).unwrap();
    c.round_trip(b"hello extra").unwrap();
    drop((c, echo, extra));
    let (ok, text) = cli(&["pod", "list"]);
    assert!(ok && text.contains("mesh/extra") && text.contains("mesh/client"), "{text}");
    // Bad input: a clear error, nothing changed.
    for bad in [
        &["pod", "add", "mesh/extra"][..],
        &["pod", "add", "no-slash"],
        &["pod", "del", "mesh/nope"],
        &["pod", "add", "mesh/x", "--node", "9"],
    ] {
        let (ok, text) = cli(bad);
        assert!(!ok && text.starts_with("lab pod: "), "{bad:?}: {text}");
    }
    let (ok, text) = cli(&["pod", "del", "mesh/extra"]);
    assert!(ok, "{text}");
    assert!(!std::path::Path::new(&format!("/var/run/netns/ambit-{}-mesh-extra", lab.id)).exists());
    wait_for("node2's ztunnel to drop it", Duration::from_secs(5), || {
        let pods = lab.nodes[1].config_dump().ok()?["ambit"]["inpod"]["pods"].as_array()?.clone();
        pods.is_empty().then_some(())
    })
    .unwrap();
    lab.unkeep();
}

#[test]
fn a_pod_whose_netns_vanished_without_del_is_swept() {
    // A runtime that crashed removes the netns and never sends DEL: the agent's handle would keep the netns,
    // its record and ztunnel's proxy alive forever.
    let lab = lab();
    let pod = lab.add_pod(0, MESH_NS, "orphan").unwrap();
    let kept = lab.add_pod(0, MESH_NS, "kept").unwrap();
    let inode = std::fs::metadata(pod.netns.path()).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();
    pod.netns.delete().unwrap();
    let n = &lab.nodes[0];
    wait_for("the agent to sweep the orphan", Duration::from_secs(10), || {
        let (_, m) = lab.agent_get(0, "/metrics").ok()?;
        (lab::util::metric(&m, "ambit_agent_pods_swept_total", &[]) == 1.0).then_some(())
    })
    .unwrap();
    wait_for("ztunnel to drop the orphan", Duration::from_secs(5), || {
        let dump = n.config_dump().ok()?;
        let pods = dump["ambit"]["inpod"]["pods"].as_array()?.clone();
        (pods.len() == 1 && pods[0]["uid"] == kept.uid.as_str()).then_some(())
    })
    .unwrap();
    let records = n.state_files();
    assert_eq!(records.len(), 1, "only the living pod keeps a record");
    // Nothing holds the netns any more: no process of the lab has it open.
    wait_for("the orphan's netns to be freed", Duration::from_secs(5), || {
        let held =
            std::fs::read_dir("/proc").ok()?.flatten().any(|p| {
                std::fs::read_dir(p.path().join("fd")).into_iter().flatten().flatten().any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == format!("net:[{inode}]"))
                })
            });
        (!held).then_some(())
    })
    .unwrap();
    // The living pod is untouched.
    assert!(kept.nft_ruleset().unwrap().contains("table inet ambit"));
}

#[test]
fn garbage_zds_is_nacked_and_pods_stay_served() {
    use ambit_proto::seqpacket::SeqPacketListener;
    use ambit_proto::zds::{self, WorkloadRequest, WorkloadResponse, ZdsHello};

    let mut lab = lab();
    let client = lab.add_pod(0, MESH_NS, "client").unwrap();
    let server = lab.add_pod(1, MESH_NS, "server").unwrap();
    let echo = EchoServer::start(&server.netns, SocketAddr::new(server.ip, APP_PORT)).unwrap();
    EchoClient::connect(&client.netns, echo.addr(), Duration::from_secs(5)).unwrap().round_trip(b"before").unwrap();

    // Replace node2's agent with a hostile one on the same socket.
    lab.nodes[1].agent.as_mut().unwrap().stop(Duration::from_secs(5));
    let zsock = lab.nodes[1].zds_socket();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let answers = rt.block_on(async {
        let l = SeqPacketListener::bind(&zsock).unwrap();
        let conn =
            tokio::time::timeout(Duration::from_secs(30), l.accept()).await.expect("ztunnel reconnects").unwrap();
        let mut buf = vec![0u8; 4096];
        let (n, _) = conn.recv(&mut buf).await.unwrap();
        let hello: ZdsHello = zds::decode(&buf[..n]).unwrap();
        assert!(hello.listener_handoff());
        let mut answers = Vec::new();
        let devnull = std::fs::File::open("/dev/null").unwrap();
        let packets: Vec<(Vec<u8>, bool)> = vec![
            (vec![0xff, 0xff, 0xff], false),                 // undecodable
            (zds::encode(&WorkloadRequest::del("x")), true), // fd on a del
            (zds::encode(&WorkloadRequest::add("y", Default::default(), vec![])), true), // "netns" that is /dev/null
            (zds::encode(&WorkloadRequest::keep(server.uid.clone())), false),
            (zds::encode(&WorkloadRequest::snapshot_sent()), false),
            (vec![0x0a, 0x05, 0x01], false), // truncated
        ];
        for (p, with_fd) in packets {
            let fds = if with_fd { vec![std::os::fd::AsFd::as_fd(&devnull)] } else { vec![] };
            conn.send(&p, &fds).await.unwrap();
            let (n, _) =
                tokio::time::timeout(Duration::from_secs(5), conn.recv(&mut buf)).await.expect("an answer").unwrap();
            answers.push(zds::decode::<WorkloadResponse>(&buf[..n]).unwrap().into_result());
        }
        answers
    });
    assert!(answers[0].is_err() && answers[1].is_err() && answers[2].is_err(), "{answers:?}");
    assert_eq!(answers[3], Ok(vec![]));
    assert_eq!(answers[4], Ok(vec![]));
    assert!(answers[5].is_err());
    // ztunnel still serves the pod it had (Keep), and traffic flows.
    let dump = lab.nodes[1].config_dump().unwrap();
    let pods = dump["ambit"]["inpod"]["pods"].as_array().unwrap();
    assert!(pods.iter().any(|p| p["uid"] == server.uid.as_str()), "{dump}");
    EchoClient::connect(&client.netns, echo.addr(), Duration::from_secs(5)).unwrap().round_trip(b"after").unwrap();
    assert!(lab.nodes[1].ztunnel.as_mut().unwrap().running());
}

#[test]
fn untrusted_client_certificates_are_refused_and_counted() {
    use ztunnel::certs::{CertStore, LocalCa};
    use ztunnel::identity::Identity;

    let lab = lab();
    let server = lab.add_pod_as(1, MESH_NS, "server", "server").unwrap();
    let _echo = EchoServer::start(&server.netns, SocketAddr::new(server.ip, APP_PORT)).unwrap();
    let mesh = common::MeshClient::of(&lab);
    let (rogue_cert, rogue_key) = lab::ca::make_ca("Rogue CA", common::TRUST_DOMAIN).unwrap();
    let rogue_ca = LocalCa::from_pem(&rogue_cert, &rogue_key, Duration::from_secs(3600)).unwrap();
    let rogue = CertStore::local(rogue_ca, common::TRUST_DOMAIN);
    let target = SocketAddr::new(server.ip, ambit_proto::zds::INBOUND_HBONE_PORT);
    let node = &lab.nodes[0].netns;

    let attempt = |store: Arc<CertStore>, id: Identity| -> bool {
        let sock = common::tcp_from(node, target);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let roots = mesh.roots.clone();
        rt.block_on(async move {
            let cert = store.fetch(&id).await.unwrap().certified.clone();
            match common::tls(sock, cert, vec![common::identity(MESH_NS, "server")], roots).await {
                // TLS 1.3: the client learns of a refused certificate on its first read.
                Ok(mut s) => {
                    use tokio::io::AsyncReadExt;
                    let mut b = [0u8; 1];
                    matches!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await, Ok(Ok(n)) if n > 0)
                }
                Err(_) => false,
            }
        })
    };
    let before = lab.nodes[1].metrics().unwrap();
    assert!(
        !attempt(rogue, Identity::new("cluster.local", MESH_NS, "client")),
        "a certificate from another CA was accepted"
    );
    assert!(
        !attempt(mesh.certs.clone(), Identity::new("evil.local", MESH_NS, "client")),
        "another trust domain was accepted"
    );
    let count = |t: &str, reason: &str| {
        metric(t, "ztunnel_tls_handshake_failures_total", &["direction=\"inbound\"", &format!("reason=\"{reason}\"")])
    };
    // The server sends its alert before it counts the failure: wait for the counts.
    wait_for("both refusals counted", Duration::from_secs(5), || {
        let after = lab.nodes[1].metrics().ok()?;
        (count(&after, "unknown_ca") > count(&before, "unknown_ca")
            && count(&after, "identity") > count(&before, "identity"))
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", lab.nodes[1].metrics().unwrap()));
    let log = lab.nodes[1].ztunnel.as_ref().unwrap().log();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn check_status_and_gc_reach_the_agent() {
    let mut lab = lab();
    let web = lab.add_pod(0, MESH_NS, "web").unwrap();
    let other = lab.add_pod(0, MESH_NS, "other").unwrap();
    let mut conf = ambit_plugin_conf(&lab, 0);
    conf["cniVersion"] = json!("1.1.0");
    let with_prev = |p: &lab::Pod| {
        let mut c = conf.clone();
        c["prevResult"] = p.result.clone();
        c
    };
    let run = |lab: &Lab, cmd: &str, att: &lab::cni::Attachment, c: &Value| {
        let n = &lab.nodes[0];
        n.cni.exec_raw(&n.netns, cmd, att, c)
    };
    // CHECK: in place, then someone removes the pod's table.
    run(&lab, "CHECK", &web.attachment(), &with_prev(&web)).unwrap();
    web.netns.exec("nft", &["delete", "table", "inet", "ambit"]).unwrap();
    let e = run(&lab, "CHECK", &web.attachment(), &with_prev(&web)).unwrap_err();
    assert_eq!(e.code(), Some(100), "{e}");
    assert!(e.msg().contains("rules are missing"), "{}", e.msg());

    // STATUS: fine with a ztunnel; without one it is reported only when report_status is on.
    let none = lab::cni::Attachment {
        container_id: String::new(),
        netns: "".into(),
        ifname: String::new(),
        args: String::new(),
    };
    run(&lab, "STATUS", &none, &conf).unwrap();
    lab.kill_ztunnel(0);
    wait_for("the agent to notice", Duration::from_secs(5), || {
        matches!(lab.agent_get(0, "/readyz"), Ok((503, _))).then_some(())
    })
    .unwrap();
    run(&lab, "STATUS", &none, &conf).unwrap();
    let mut strict = conf.clone();
    strict["report_status"] = json!(true);
    let e = run(&lab, "STATUS", &none, &strict).unwrap_err();
    assert_eq!(e.code(), Some(50), "{e}");
    lab.start_ztunnel(0).unwrap();
    lab.wait_ready(0).unwrap();
    lab.wait_agent_ready(0).unwrap();

    // GC: the runtime still knows only `other`; `web` is forgotten (ztunnel drops it), `other` stays.
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": other.container_id, "ifname": "eth0"}]);
    run(&lab, "GC", &none, &gc).unwrap();
    let dump = lab.nodes[0].config_dump().unwrap();
    let uids: Vec<&str> =
        dump["ambit"]["inpod"]["pods"].as_array().unwrap().iter().filter_map(|p| p["uid"].as_str()).collect();
    assert!(uids.contains(&other.uid.as_str()) && !uids.contains(&web.uid.as_str()), "{uids:?}");
    let records = lab.nodes[0].state_files().len();
    assert_eq!(records, 1);
}

#[test]
fn an_agent_killed_during_add_fails_it_and_leaves_nothing() {
    use ambit_proto::seqpacket::SeqPacket;
    use ambit_proto::zds::{self, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request::Payload};

    let mut lab = lab();
    lab.kill_ztunnel(0);
    let zsock = lab.nodes[0].zds_socket();
    // A ztunnel that is slow to acknowledge adds, so the ADD is still in flight when the agent dies.
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let s = SeqPacket::connect(&zsock).await.unwrap();
            s.send(&zds::encode(&ZdsHello::ambit(true)), &[]).await.unwrap();
            let mut buf = vec![0u8; 4096];
            while let Ok((n, _fds)) = s.recv(&mut buf).await {
                if n == 0 {
                    break;
                }
                let req: WorkloadRequest = zds::decode(&buf[..n]).unwrap();
                if matches!(req.payload, Some(Payload::Add(_))) {
                    let _ = seen_tx.send(());
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                let _ = s.send(&zds::encode(&WorkloadResponse::ack()), &[]).await;
            }
        })
    });
    lab.wait_agent_ready(0).unwrap();
    let agent_pid = lab.nodes[0].agent.as_ref().unwrap().pid();
    let killer = std::thread::spawn(move || {
        seen_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent_pid as i32), nix::sys::signal::Signal::SIGKILL)
            .unwrap();
    });
    match lab.add_pod(0, MESH_NS, "doomed") {
        Err(PodError::Cni(f)) => {
            assert_eq!(f.code(), Some(11), "{f}");
            assert!(f.msg().contains("without answering") || f.msg().contains("cannot reach"), "{}", f.msg());
        }
        other => panic!("expected a CNI failure, got {:?}", other.map(|p| p.uid)),
    }
    killer.join().unwrap();
    // The next agent knows nothing of the pod, and the real ztunnel serves nothing for it.
    lab.start_agent(0).unwrap();
    lab.start_ztunnel(0).unwrap();
    lab.wait_ready(0).unwrap();
    assert_eq!(lab.nodes[0].state_files(), Vec::<std::path::PathBuf>::new());
    assert_eq!(lab.nodes[0].config_dump().unwrap()["ambit"]["inpod"]["pods"], json!([]));
}
