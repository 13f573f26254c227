//! ztunnel on the control plane: certificates from the CA service, workloads and policies over delta xDS, and
//! every kind of bad input the control plane can send — each gets a clear log line and a metric, the last good
//! state stays, pods that were working keep working, and a pod without a certificate is refused, never served
//! in plaintext. Needs root.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ambit_proto::control_plane::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use lab::controlplane::Faults;
use lab::demo::{APP_PORT, MESH_NS};
use lab::net::{EchoClient, EchoServer};
use lab::util::{metric, wait_for};
use lab::{Lab, LabConfig, Pod};

const T: Duration = Duration::from_secs(5);

fn lab_with(env: &[(&str, &str)]) -> Lab {
    Lab::start(LabConfig {
        enrolled_namespaces: vec![MESH_NS.into()],
        ztunnel_env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    })
    .expect("lab starts")
}

/// An enrolled client on node1 and an enrolled echo server on node2, and the server's address.
fn mesh_pair(lab: &Lab) -> (Pod, Pod, EchoServer, SocketAddr) {
    let client = lab.add_pod_as(0, MESH_NS, "client", "client").unwrap();
    let server = lab.add_pod_as(1, MESH_NS, "server", "server").unwrap();
    let to = SocketAddr::new(server.ip, APP_PORT);
    let echo = EchoServer::start(&server.netns, to).unwrap();
    (client, server, echo, to)
}

fn reaches(from: &Pod, to: SocketAddr) -> bool {
    EchoClient::connect(&from.netns, to, T).and_then(|mut c| c.round_trip(b"ping")).is_ok()
}

fn cert_requests(lab: &Lab, node: usize, outcome: &str) -> f64 {
    metric(
        &lab.nodes[node].metrics().unwrap(),
        "ztunnel_certificate_requests_total",
        &[&format!("outcome=\"{outcome}\"")],
    )
}

/// The certificate entry of `id` in node `node`'s `/config_dump`.
fn cert_of(lab: &Lab, node: usize, id: &str) -> Option<serde_json::Value> {
    lab.nodes[node].config_dump().ok()?["ambit"]["certificates"]
        .as_array()?
        .iter()
        .find(|c| c["identity"] == id)
        .cloned()
}

#[test]
fn every_wrong_ca_answer_is_refused_counted_and_never_served() {
    let lab = lab_with(&[]);
    let (client, _server, _echo, to) = mesh_pair(&lab);
    assert!(reaches(&client, to), "{}", lab.logs());
    // A long-lived connection of working pods, open through every fault.
    let mut open = EchoClient::connect(&client.netns, to, T).unwrap();

    for (i, fault) in ["wrong-identity", "expired", "unrelated", "garbage", "refuse", "hang"].into_iter().enumerate() {
        lab.control_plane().set_faults(&Faults { ca: Some(fault.into()), ..Default::default() }).unwrap();
        // A new identity on node1: its certificate must come from the (now misbehaving) CA.
        let sa = format!("new-{i}");
        let newcomer = lab.add_pod_as(0, MESH_NS, &format!("newcomer-{i}"), &sa).unwrap();
        let id = format!("spiffe://cluster.local/ns/{MESH_NS}/sa/{sa}");
        let started = Instant::now();
        assert!(!reaches(&newcomer, to), "{fault}: a pod without a valid certificate was served");
        let outcome = if matches!(fault, "refuse" | "hang") { "unavailable" } else { "rejected" };
        let entry = wait_for(&format!("{fault}: the error in config_dump"), Duration::from_secs(15), || {
            let c = cert_of(&lab, 0, &id)?;
            c["lastError"].is_string().then_some(c)
        })
        .unwrap();
        assert_eq!(entry["state"], "Unavailable", "{fault}: {entry}");
        assert!(cert_requests(&lab, 0, outcome) >= 1.0, "{fault}: not counted as {outcome}");
        let log = lab.nodes[0].ztunnel.as_ref().unwrap().log();
        assert!(log.contains("no certificate for this identity"), "{fault}: no clear log line");
        if fault == "hang" {
            assert!(started.elapsed() >= Duration::from_secs(9), "the CA's silence is bounded by the request timeout");
        }
        // What worked keeps working.
        open.round_trip(format!("still here after {fault}").as_bytes()).unwrap_or_else(|e| panic!("{fault}: {e}"));
        assert!(reaches(&client, to), "{fault}: {}", lab.logs());

        lab.control_plane().set_faults(&Faults::default()).unwrap();
        wait_for(&format!("{fault}: the newcomer served once the CA is well"), Duration::from_secs(15), || {
            reaches(&newcomer, to).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.logs()));
    }
    // Every refused answer was logged with its reason.
    let log = lab.nodes[0].ztunnel.as_ref().unwrap().log();
    for reason in ["not the requested", "does not verify", "not a PEM certificate", "did not answer", "the CA is down"]
    {
        assert!(log.contains(reason), "no log line saying {reason:?}");
    }
}

#[test]
fn bad_xds_pushes_are_nacked_and_the_last_good_state_stays() {
    let lab = lab_with(&[]);
    let (client, _server, _echo, to) = mesh_pair(&lab);
    assert!(reaches(&client, to));
    let nacks =
        |url: &str| metric(&lab.nodes[0].metrics().unwrap(), "ztunnel_xds_nacks_total", &[&format!("url=\"{url}\"")]);
    let cluster = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    for (push, url, says) in [
        ("garbage", ADDRESS_TYPE, "undecodable"),
        ("bad-address", ADDRESS_TYPE, "3 bytes"),
        ("unknown-type", cluster, "not subscribed"),
    ] {
        let before = nacks(url);
        lab.control_plane().set_faults(&Faults { xds_push: Some(push.into()), ..Default::default() }).unwrap();
        wait_for(&format!("{push}: a NACK"), T, || (nacks(url) > before).then_some(())).unwrap();
        let dump = lab.nodes[0].config_dump().unwrap();
        assert_eq!(dump["workloads"].as_array().unwrap().len(), 2, "{push}: the last good workloads stay");
        assert!(
            dump["ambit"]["configSource"]["lastError"].as_str().unwrap_or_default().contains(says) || url == cluster,
            "{push}: {dump:#}"
        );
        if url == ADDRESS_TYPE {
            assert!(
                dump["ambit"]["xds"]["types"][url]["lastNack"]["error"].as_str().unwrap().contains(says),
                "{dump:#}"
            );
        }
        assert!(reaches(&client, to), "{push}: {}", lab.logs());
        let log = lab.nodes[0].ztunnel.as_ref().unwrap().log();
        assert!(log.contains("refused an xDS push (NACK)"), "{push}: no clear log line");
        lab.control_plane().set_faults(&Faults::default()).unwrap();
    }
    // The control plane logged the NACKs it got back, with the reason.
    assert!(lab.control_plane().log().contains("NACKed"), "{}", lab.control_plane().log());

    // A huge push is taken whole.
    lab.control_plane().set_faults(&Faults { xds_push: Some("huge:10000".into()), ..Default::default() }).unwrap();
    wait_for("10,000 more workloads", Duration::from_secs(30), || {
        (lab.nodes[0].config_dump().ok()?["workloads"].as_array()?.len() == 10_002).then_some(())
    })
    .unwrap();
    assert!(reaches(&client, to));
    // Removing everything is applied (xDS is the source of truth) and reported; the pods' proxies, served
    // because the node agent enrolled them, stay, and so do their certificates.
    lab.control_plane().set_faults(&Faults { xds_push: Some("remove-all".into()), ..Default::default() }).unwrap();
    wait_for("every workload removed", T, || {
        lab.nodes[0].config_dump().ok()?["workloads"].as_array()?.is_empty().then_some(())
    })
    .unwrap();
    let dump = lab.nodes[0].config_dump().unwrap();
    assert_eq!(
        dump["ambit"]["inpod"]["pods"].as_array().map(|p| p.len()),
        Some(1),
        "the pod is still served: {dump:#}"
    );
    assert!(cert_of(&lab, 0, &client.identity()).is_some_and(|c| c["state"] == "Available"));
    let log = lab.nodes[0].ztunnel.as_ref().unwrap().log();
    assert!(log.contains("removed every resource of this type"), "not reported");
    // The next push from the control plane restores the mesh.
    lab.control_plane().set_faults(&Faults::default()).unwrap();
    let _third = lab.add_pod_as(1, MESH_NS, "third", "third").unwrap();
    assert!(reaches(&client, to), "{}", lab.logs());
    let m = lab.nodes[0].metrics().unwrap();
    assert!(metric(&m, "ztunnel_xds_resources", &[&format!("url=\"{AUTHORIZATION_TYPE}\"")]) >= 0.0);
}

#[test]
fn a_missing_token_is_a_clear_error_and_nothing_working_is_lost() {
    let lab = lab_with(&[]);
    let (client, _server, _echo, to) = mesh_pair(&lab);
    assert!(reaches(&client, to));
    let token = lab.nodes[0].dir.join("istio-token");
    let saved = std::fs::read(&token).unwrap();
    std::fs::remove_file(&token).unwrap();
    let newcomer = lab.add_pod_as(0, MESH_NS, "newcomer", "newcomer").unwrap();
    assert!(!reaches(&newcomer, to), "served without a certificate");
    let id = newcomer.identity();
    let c = wait_for("the token error", T, || cert_of(&lab, 0, &id).filter(|c| c["lastError"].is_string())).unwrap();
    let e = c["lastError"].as_str().unwrap();
    assert!(e.contains("istio-token") && e.contains("projected service account token"), "{e}");
    assert!(cert_requests(&lab, 0, "unavailable") >= 1.0);
    assert!(reaches(&client, to), "the pods that had certificates keep working");
    // A token the control plane does not know is refused by it.
    std::fs::write(&token, "not-a-token").unwrap();
    wait_for("the CA's refusal", Duration::from_secs(10), || {
        let _ = reaches(&newcomer, to); // asks the CA again at once
        let c = cert_of(&lab, 0, &id)?;
        c["lastError"].as_str()?.contains("Unauthenticated").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.logs()));
    std::fs::write(&token, saved).unwrap();
    wait_for("the newcomer served", Duration::from_secs(10), || reaches(&newcomer, to).then_some(())).unwrap();
}

#[test]
fn the_ca_refuses_identities_of_pods_on_other_nodes() {
    let lab = lab_with(&[]);
    // node2 asks for node1's pod's identity: istiod's node authorizer says no, and so does the lab's.
    let _client = lab.add_pod_as(0, MESH_NS, "client", "only-on-node1").unwrap();
    let id = ztunnel::identity::Identity::new("cluster.local", MESH_NS, "only-on-node1");
    let token = std::fs::read_to_string(lab.nodes[1].dir.join("istio-token")).unwrap();
    let root = lab.dir.join("ca-cert.pem");
    let result = lab.nodes[1].netns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let token_file = std::env::temp_dir().join(format!("ambit-token-{}", std::process::id()));
            std::fs::write(&token_file, token).unwrap();
            let ca = ztunnel::controlplane::IstioCa::new(
                ztunnel::controlplane::Target {
                    address: format!("https://{}:{}", lab::controlplane::CP_IP, lab::controlplane::CP_PORT),
                    root_ca: root,
                    alt_hostname: None,
                    token: Some(token_file.clone()),
                    cluster_id: "Kubernetes".into(),
                },
                Duration::from_secs(3600),
            );
            let req = ztunnel::ca::CertRequest::new(&id).unwrap();
            let r = ca.create_certificate(&id, &req.csr_pem).await;
            let _ = std::fs::remove_file(token_file);
            r
        })
    });
    let e = result.unwrap().unwrap_err().to_string();
    assert!(e.contains("PermissionDenied") && e.contains("node2"), "{e}");
}

#[test]
fn the_mesh_root_rotates_in_place_and_a_broken_root_file_changes_nothing() {
    let lab = lab_with(&[]);
    let (client, _server, _echo, to) = mesh_pair(&lab);
    let reloads = |outcome: &str| {
        metric(
            &lab.nodes[0].metrics().unwrap(),
            "ztunnel_trust_root_reloads_total",
            &[&format!("outcome=\"{outcome}\"")],
        )
    };
    let root_file = lab.dir.join("ca-cert.pem");
    let root = std::fs::read_to_string(&root_file).unwrap();
    // Rotation: the new root is added beside the old one (what istiod's ConfigMap holds during a rotation).
    let (next, _) = lab::ca::make_ca("Next lab root", "cluster.local").unwrap();
    std::fs::write(&root_file, format!("{root}{next}")).unwrap();
    wait_for("the new roots in force", T, || (reloads("ok") >= 1.0).then_some(())).unwrap();
    assert!(reaches(&client, to), "{}", lab.logs());
    // A broken root file: logged, counted, the roots in force stay.
    std::fs::write(&root_file, "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n").unwrap();
    wait_for("the broken file noticed", T, || (reloads("invalid") >= 1.0).then_some(())).unwrap();
    assert!(reaches(&client, to), "{}", lab.logs());
    let log = lab.nodes[0].ztunnel.as_ref().unwrap().log();
    assert!(log.contains("keeping the roots in force"), "no clear log line");
    std::fs::write(&root_file, root).unwrap();
}

#[test]
fn a_ca_outage_longer_than_half_a_certificate_life_loses_nothing() {
    // Ten-second certificates: due for renewal after five; the CA is away for eight.
    let mut lab = lab_with(&[("SECRET_TTL", "10s")]);
    let (client, _server, _echo, to) = mesh_pair(&lab);
    assert!(reaches(&client, to));
    let first = cert_of(&lab, 0, &client.identity()).unwrap();
    let mut open = EchoClient::connect(&client.netns, to, T).unwrap();
    // A pod enrolled just before the outage, whose certificate the CA did not issue.
    lab.control_plane().set_faults(&Faults { ca: Some("refuse".into()), ..Default::default() }).unwrap();
    let newcomer = lab.add_pod_as(0, MESH_NS, "newcomer", "newcomer").unwrap();
    lab.control_plane_mut().stop();
    lab.control_plane().set_faults(&Faults::default()).unwrap();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(8) {
        // New connections (pooled or not) and the open one keep working on the still-valid certificates.
        assert!(reaches(&client, to), "after {:?} of outage: {}", down.elapsed(), lab.logs());
        open.round_trip(b"during the outage").unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    let during = cert_of(&lab, 0, &client.identity()).unwrap();
    assert_eq!(during["notAfter"], first["notAfter"], "the certificate in service is the first one");
    assert!(during["failures"].as_u64().unwrap() >= 1, "renewal was attempted and failed: {during}");
    // Without a certificate the newcomer is refused during the outage, never served in plaintext.
    assert!(!reaches(&newcomer, to));
    lab.control_plane_mut().restart().unwrap();
    wait_for("the renewal after the outage", Duration::from_secs(10), || {
        let c = cert_of(&lab, 0, &client.identity())?;
        (c["notAfter"] != first["notAfter"] && c["failures"] == 0).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.logs()));
    assert!(reaches(&client, to));
    open.round_trip(b"after the outage").unwrap();
    wait_for("the newcomer served", Duration::from_secs(10), || reaches(&newcomer, to).then_some(())).unwrap();
    // And the xDS stream came back.
    wait_for("xDS reconnected", Duration::from_secs(20), || {
        (lab.nodes[0].config_dump().ok()?["ambit"]["xds"]["state"] == "Connected").then_some(())
    })
    .unwrap();
}
