//! Invocation tests with a fake agent.

use std::cell::RefCell;
use std::collections::HashMap;

use serde_json::{Value, json};

use super::*;

type Answer = Box<dyn Fn(&Request) -> Result<Response, agent::AgentError>>;

struct FakeAgent {
    answer: Answer,
    seen: RefCell<Vec<Request>>,
    deferred: RefCell<Vec<Request>>,
}

impl FakeAgent {
    fn answering(f: impl Fn(&Request) -> Result<Response, agent::AgentError> + 'static) -> FakeAgent {
        FakeAgent { answer: Box::new(f), seen: RefCell::new(Vec::new()), deferred: RefCell::new(Vec::new()) }
    }
}

impl AgentClient for FakeAgent {
    fn call(&self, _: &Path, request: &Request, _: Duration) -> Result<Response, agent::AgentError> {
        self.seen.borrow_mut().push(request.clone());
        (self.answer)(request)
    }

    fn defer(&self, socket: &Path, request: &Request) -> std::io::Result<PathBuf> {
        self.deferred.borrow_mut().push(request.clone());
        Ok(ambit_proto::cni_api::deferred_del_file(socket, &request.container_id))
    }
}

fn vars(command: &str, args: &str) -> impl Fn(&str) -> Option<String> {
    let m: HashMap<&str, String> = [
        ("CNI_COMMAND", command.to_string()),
        ("CNI_CONTAINERID", "c0ffee".to_string()),
        ("CNI_NETNS", "/var/run/netns/cni-test".to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_ARGS", args.to_string()),
    ]
    .into_iter()
    .collect();
    move |k| m.get(k).cloned()
}

const POD: &str = "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web;K8S_POD_UID=uid-1";

fn conf(extra: Value) -> Vec<u8> {
    let mut c = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "ambit-cni", "log_file": "",
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-test"}],
            "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 0}]
        }
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    serde_json::to_vec(&c).unwrap()
}

fn error_json(out: &Invocation) -> Value {
    assert_eq!(out.exit_code, 1, "{}", out.stdout);
    serde_json::from_str(&out.stdout).unwrap()
}

#[test]
fn add_enrolled_prints_prev_result_and_sends_the_pod() {
    let agent = FakeAgent::answering(|_| Ok(Response::ok(Outcome::Enrolled)));
    let stdin = conf(json!({}));
    let out = run(vars("ADD", POD), &stdin, &agent);
    assert_eq!(out.exit_code, 0);
    let printed: Value = serde_json::from_str(&out.stdout).unwrap();
    let input: Value = serde_json::from_slice(&stdin).unwrap();
    assert_eq!(printed, input["prevResult"]);
    let seen = agent.seen.borrow();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].command, cni_api::Command::Add);
    assert_eq!(seen[0].ips, vec!["10.1.0.5/24"]);
    assert_eq!(seen[0].pod.uid, "uid-1");
    assert_eq!(seen[0].netns.as_deref(), Some("/var/run/netns/cni-test"));
}

#[test]
fn add_fails_closed_when_the_agent_fails() {
    let agent = FakeAgent::answering(|_| Ok(Response::error(ErrorCode::Internal, "ztunnel nacked: boom")));
    let e = error_json(&run(vars("ADD", POD), &conf(json!({})), &agent));
    assert_eq!(e["code"], code::ENROLMENT_FAILED);
    assert_eq!(e["cniVersion"], "1.0.0");
    assert!(e["msg"].as_str().unwrap().contains("boom"));

    let down = FakeAgent::answering(|_| {
        Err(agent::AgentError::Unreachable(std::io::Error::from(std::io::ErrorKind::NotFound)))
    });
    let e = error_json(&run(vars("ADD", POD), &conf(json!({"agent_socket": "/run/x.sock"})), &down));
    assert_eq!(e["code"], code::TRY_AGAIN_LATER);
    assert!(e["msg"].as_str().unwrap().contains("/run/x.sock"));

    let slow = FakeAgent::answering(|_| Err(agent::AgentError::Timeout(Duration::from_millis(50))));
    let e = error_json(&run(vars("ADD", POD), &conf(json!({})), &slow));
    assert!(e["msg"].as_str().unwrap().contains("did not answer within 50 ms"));
}

#[test]
fn excluded_and_non_kubernetes_pods_never_reach_the_agent() {
    let agent = FakeAgent::answering(|_| panic!("must not be called"));
    let out = run(vars("ADD", "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns"), &conf(json!({})), &agent);
    assert_eq!(out.exit_code, 0);
    let out = run(vars("ADD", ""), &conf(json!({})), &agent);
    assert_eq!(out.exit_code, 0);
    let out = run(vars("DEL", "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns"), &conf(json!({})), &agent);
    assert_eq!(out, Invocation { stdout: String::new(), exit_code: 0 });
}

#[test]
fn del_succeeds_without_an_agent_but_not_on_a_stuck_one() {
    let down = FakeAgent::answering(|_| {
        Err(agent::AgentError::Unreachable(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)))
    });
    assert_eq!(run(vars("DEL", POD), &conf(json!({})), &down).exit_code, 0);
    // The DEL is left for the agent, whole.
    let left = down.deferred.borrow();
    assert_eq!(left.len(), 1);
    assert_eq!(
        (left[0].command, left[0].container_id.as_str()),
        (cni_api::Command::Del, down.seen.borrow()[0].container_id.as_str())
    );
    drop(left);
    let stuck = FakeAgent::answering(|_| Err(agent::AgentError::Timeout(Duration::from_secs(1))));
    assert_eq!(error_json(&run(vars("DEL", POD), &conf(json!({})), &stuck))["code"], code::TRY_AGAIN_LATER);
}

#[test]
fn a_deferred_del_is_written_whole_where_the_agent_looks() {
    let dir = std::env::temp_dir().join(format!("ambit-defer-{}", std::process::id()));
    let socket = dir.join("cni.sock");
    let req = Request {
        version: cni_api::API_VERSION,
        command: cni_api::Command::Del,
        container_id: "../../etc/abc".into(),
        netns: Some("/var/run/netns/x".into()),
        ifname: "eth0".into(),
        pod: Default::default(),
        ips: Vec::new(),
        valid_attachments: Vec::new(),
    };
    let file = agent::defer(&socket, &req).unwrap();
    assert!(file.starts_with(ambit_proto::cni_api::deferred_del_dir(&socket)), "{}", file.display());
    let back: Request = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(back.container_id, req.container_id);
    // A second DEL of the same sandbox replaces the first; nothing else is left in the directory.
    agent::defer(&socket, &req).unwrap();
    assert_eq!(std::fs::read_dir(file.parent().unwrap()).unwrap().count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_gets_spec_codes() {
    let agent = FakeAgent::answering(|_| panic!("must not be called"));
    let e = error_json(&run(vars("ADD", POD), b"{nope", &agent));
    assert_eq!(e["code"], code::DECODE_FAILURE);
    let e = error_json(&run(vars("ADD", POD), br#"{"cniVersion":"0.1.0","name":"n","type":"t"}"#, &agent));
    assert_eq!(e["code"], code::INCOMPATIBLE_VERSION);
    let e = error_json(&run(|_| None, &conf(json!({})), &agent));
    assert_eq!(e["code"], code::INVALID_ENV);
    assert_eq!(e["cniVersion"], "1.0.0");
}

#[test]
fn version_lists_what_we_speak() {
    let agent = FakeAgent::answering(|_| panic!("must not be called"));
    let out = run(vars("VERSION", ""), br#"{"cniVersion":"1.1.0"}"#, &agent);
    assert_eq!(out.exit_code, 0);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v, json!({"cniVersion": "1.1.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}));
}

#[test]
fn status_is_reported_only_when_configured() {
    let down = FakeAgent::answering(|_| Ok(Response::error(ErrorCode::TryAgainLater, "no ztunnel connected")));
    assert_eq!(run(vars("STATUS", ""), &conf(json!({"cniVersion": "1.1.0"})), &down).exit_code, 0);
    let e = error_json(&run(vars("STATUS", ""), &conf(json!({"cniVersion": "1.1.0", "report_status": true})), &down));
    assert_eq!(e["code"], code::PLUGIN_NOT_AVAILABLE);
}

#[test]
fn gc_forwards_valid_attachments() {
    let agent = FakeAgent::answering(|_| Ok(Response::ok(Outcome::Ok)));
    let c =
        conf(json!({"cniVersion": "1.1.0", "cni.dev/valid-attachments": [{"containerID": "a1", "ifname": "eth0"}]}));
    assert_eq!(run(vars("GC", ""), &c, &agent).exit_code, 0);
    assert_eq!(
        agent.seen.borrow()[0].valid_attachments,
        vec![Attachment { container_id: "a1".into(), ifname: "eth0".into() }]
    );
    let bad = conf(json!({"cniVersion": "1.1.0", "cni.dev/valid-attachments": [{"ifname": "eth0"}]}));
    assert_eq!(error_json(&run(vars("GC", ""), &bad, &agent))["code"], code::INVALID_CONFIG);
}

#[test]
fn add_refuses_a_prev_result_it_cannot_read_without_asking_the_agent() {
    let agent = FakeAgent::answering(|_| Ok(Response::ok(Outcome::Enrolled)));
    let bad = json!({"prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.300/24"}]}});
    let e = error_json(&run(vars("ADD", POD), &conf(bad.clone()), &agent));
    assert_eq!(e["code"], code::INVALID_CONFIG);
    assert!(e["msg"].as_str().unwrap().contains("ips[0].address"), "{e}");
    assert!(agent.seen.borrow().is_empty(), "the agent was asked about addresses nobody checked");
    // DEL still succeeds with it: removal never depends on the previous result.
    let out = run(vars("DEL", POD), &conf(bad), &agent);
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
}

/// Property tests: whatever arrives on stdin, in the environment or as a previous result, the plugin answers
/// with a result or a CNI error, never a panic; and a previous result it accepts yields only real CIDRs.
mod props {
    use super::*;
    use proptest::prelude::*;

    fn cases() -> u32 {
        std::env::var("AMBIT_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
    }

    /// JSON values of a few levels, with the shapes a result has.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[0-9a-f:./+-]{0,24}".prop_map(Value::String),
            prop_oneof![Just("10.1.0.5/24"), Just("fd00::5/64"), Just("10.1.0.1"), Just("eth0")]
                .prop_map(|s| Value::String(s.into())),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("ips"),
                        Just("address"),
                        Just("gateway"),
                        Just("interface"),
                        Just("interfaces"),
                        Just("name")
                    ]
                    .prop_map(str::to_string),
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        #[test]
        fn any_previous_result_is_read_or_refused(prev in json_value()) {
            match result::pod_addresses(Some(&prev)) {
                Ok(addrs) => for a in addrs {
                    let (ip, len) = a.split_once('/').expect("a prefix");
                    let ip: std::net::IpAddr = ip.parse().expect("an address");
                    let max: u8 = if ip.is_ipv4() { 32 } else { 128 };
                    prop_assert!(len.parse::<u8>().unwrap() <= max);
                },
                Err(e) => prop_assert_eq!(e.code, code::INVALID_CONFIG),
            }
        }

        #[test]
        fn any_stdin_and_cni_args_get_an_answer(stdin in proptest::collection::vec(any::<u8>(), 0..200), args in ".{0,80}") {
            let agent = FakeAgent::answering(|_| Ok(Response::ok(Outcome::Enrolled)));
            for command in ["ADD", "DEL", "CHECK", "VERSION"] {
                let out = run(vars(command, &args), &stdin, &agent);
                prop_assert!(out.exit_code == 0 || serde_json::from_str::<Value>(&out.stdout).is_ok_and(|v| v["code"].is_u64()));
            }
        }

        #[test]
        fn any_prev_result_in_a_real_config_gets_an_answer(prev in json_value()) {
            let agent = FakeAgent::answering(|_| Ok(Response::ok(Outcome::Enrolled)));
            let out = run(vars("ADD", POD), &conf(json!({"prevResult": prev})), &agent);
            prop_assert!(out.exit_code == 0 || serde_json::from_str::<Value>(&out.stdout).is_ok_and(|v| v["code"].is_u64()));
        }
    }
}
