//! ztunnel's own TLS record layer against a TLS 1.3 peer that is not rustls: OpenSSL runs the handshake with a
//! mesh certificate, then `conformance/tls13_peer.py` writes records by hand (every receiver rule of RFC 8446
//! sections 5 and 6, each case on its own connection) and checks ztunnel's alert, the connection's end, and
//! that nothing of a refused record reached the app. Once per cipher suite ztunnel offers. Needs root, and
//! Debian's python3 with python3-cryptography (scripts/test installs them).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lab::demo::{APP_PORT, MESH_NS};
use lab::proc::Proc;
use lab::util::wait_for;
use lab::{Lab, LabConfig};
use serde_json::Value;

const PYTHON: &str = "/usr/bin/python3";
/// The suites ztunnel offers, as Istio's does (no ChaCha20-Poly1305: an OpenSSL peer that offers only it is
/// refused at the handshake).
const SUITES: [&str; 2] = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384"];

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/tls13_peer.py")
}

/// An OpenSSL configuration that leaves one TLS 1.3 suite to offer (Python's ssl cannot choose them itself).
fn openssl_conf(dir: &Path, suite: &str) -> PathBuf {
    let path = dir.join(format!("openssl-{suite}.cnf"));
    let conf = format!(
        "openssl_conf = conf\n[conf]\nssl_conf = ssl\n[ssl]\nsystem_default = tls\n[tls]\nCiphersuites = {suite}\n"
    );
    std::fs::write(&path, conf).unwrap();
    path
}

#[test]
fn an_independent_tls_peer_finds_every_record_rule_enforced_under_each_suite() {
    let python = std::process::Command::new(PYTHON).args(["-c", "import cryptography"]).output();
    assert!(
        python.as_ref().is_ok_and(|o| o.status.success()),
        "{PYTHON} with the cryptography package is needed (apt install python3-cryptography): {python:?}"
    );
    let mut lab = Lab::start(LabConfig { enrolled_namespaces: vec![MESH_NS.into()], ..Default::default() }).unwrap();
    let server = lab.add_pod_as(1, MESH_NS, "server", "server").unwrap();
    let dir = lab.dir.join("tls13-peer");
    std::fs::create_dir_all(&dir).unwrap();

    // The app: an echo server that keeps all it receives.
    let sink_log = dir.join("received");
    std::fs::write(&sink_log, b"").unwrap();
    let target = SocketAddr::new(server.ip, APP_PORT);
    let mut cmd = server.netns.command(PYTHON);
    cmd.arg(script()).args(["sink", "--listen", &target.to_string(), "--log"]).arg(&sink_log);
    let sink = Proc::spawn("sink", cmd, &dir.join("sink.log")).unwrap();
    wait_for("the sink to listen", Duration::from_secs(10), || sink.log().contains("ready").then_some(())).unwrap();

    // The peer's certificate: the mesh's CA, an identity of its own.
    let (cert, key) =
        lab::ca::issue_workload(&lab.dir.join("ca-key.pem"), "spiffe://cluster.local/ns/mesh/sa/tls13-peer").unwrap();
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();

    let listed = std::process::Command::new(PYTHON).arg(script()).arg("list").output().unwrap();
    let cases = String::from_utf8_lossy(&listed.stdout).lines().count();
    assert!(cases >= 40, "the peer lists {cases} cases");

    let hbone = SocketAddr::new(server.ip, ambit_proto::zds::INBOUND_HBONE_PORT);
    let mut failures = Vec::new();
    for suite in SUITES {
        let mut cmd = lab.nodes[0].netns.command(PYTHON);
        cmd.env("OPENSSL_CONF", openssl_conf(&dir, suite)).arg(script()).arg("cases");
        cmd.args(["--server", &hbone.to_string(), "--server-identity", &server.identity()]);
        cmd.args(["--target", &target.to_string()]);
        cmd.arg("--cert").arg(dir.join("cert.pem")).arg("--key").arg(dir.join("key.pem"));
        cmd.arg("--ca").arg(lab.dir.join("ca-cert.pem")).arg("--sink-log").arg(&sink_log);
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<Value> = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let summary = lines.iter().find(|l| l["summary"] == true);
        for l in lines.iter().filter(|l| l["ok"] == false) {
            failures.push(format!("{suite}: {l}"));
        }
        match summary {
            Some(s) if s["suite"] == suite && s["cases"] == cases && s["failed"] == 0 && out.status.success() => {}
            _ => failures.push(format!(
                "{suite}: exit {:?}, summary {summary:?}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )),
        }
        for l in lines.iter().filter(|l| l.get("differs_from_rustls").is_some()) {
            eprintln!("{suite}: {} differs from rustls: {}", l["case"], l["differs_from_rustls"]);
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}\nztunnel (node 2):\n{}",
        failures.len(),
        failures.join("\n"),
        lab.nodes[1].ztunnel.as_ref().map(|z| z.log()).unwrap_or_default()
    );
    // ztunnel took all of it in its stride.
    assert!(lab.nodes[1].ztunnel.as_mut().is_some_and(|z| z.running()), "ztunnel is gone");
}
