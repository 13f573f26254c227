//! `lab bench --only xds`: the control plane's figures, on a two-node lab whose ztunnels run on the lab's
//! control plane (istiod's protocols):
//!
//! - **push to in force**: a mesh of `workloads` workloads and `policies` policies is pushed, then changed
//!   `changes` times (one workload or one policy each time). Each push is timed by the control plane from
//!   sending it to receiving the ztunnel's ACK, which ztunnel sends only after the change is in force
//!   ([`crate::controlplane::PushRecord`]); the slower of the two nodes counts. Beside it, from the lab
//!   writing the mesh file to both ACKs (the control plane's own file polling and encoding included).
//! - **memory**: each ztunnel's RSS before and after the big mesh.
//! - **certificates**: `pods` pods enrolled at once on one node (CNI ADD from many threads), each with its own
//!   service account, timed from the start of its CNI ADD until its ztunnel shows its certificate issued.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::bench::percentile;
use crate::controlplane::{PushRecord, mesh_version, push_records};
use crate::lab::{Lab, LabConfig};

/// Options of the control-plane benchmark.
#[derive(Debug, Clone)]
pub struct XdsOpts {
    /// Workloads in the big mesh.
    pub workloads: usize,
    /// Policies in it.
    pub policies: usize,
    /// Changes pushed after it.
    pub changes: usize,
    /// Pods enrolled at once for the certificate figure.
    pub pods: usize,
}

impl Default for XdsOpts {
    fn default() -> Self {
        XdsOpts { workloads: 10_000, policies: 1_000, changes: 100, pods: 100 }
    }
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

/// The mesh file: `workloads` workloads spread over 100 namespaces (on no lab node), a service per
/// namespace, and `policies` policies; `revision` changes one workload's canonical revision and `policy_port`
/// one policy's port, so each change touches exactly one resource.
fn mesh_file(o: &XdsOpts, revision: usize, policy_port: u16) -> String {
    let mut workloads = Vec::with_capacity(o.workloads);
    for i in 0..o.workloads {
        let ns = format!("ns-{}", i % 100);
        workloads.push(json!({
            "uid": format!("Kubernetes//Pod/{ns}/w{i}"), "name": format!("w{i}"), "namespace": ns,
            "serviceAccount": format!("sa-{}", i % 7), "workloadIps": [format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256)],
            "protocol": "HBONE", "node": format!("far-{}", i % 50), "trustDomain": crate::lab::TRUST_DOMAIN,
            "canonicalName": format!("app-{}", i % 300), "canonicalRevision": if i == 0 { format!("r{revision}") } else { "v1".into() },
            "services": {format!("{ns}/svc.{ns}.svc.cluster.local"): {"80": 8080}},
            "authorizationPolicies": [],
        }));
    }
    let services: Vec<Value> = (0..100)
        .map(|n| {
            json!({"name": "svc", "namespace": format!("ns-{n}"), "hostname": format!("svc.ns-{n}.svc.cluster.local"),
                   "vips": [format!("/10.96.{}.{}", n / 256, n % 256)], "ports": {"80": 8080}})
        })
        .collect();
    let policies: Vec<Value> = (0..o.policies)
        .map(|i| {
            let port = if i == 0 { policy_port } else { 9000 + (i % 100) as u16 };
            json!({"name": format!("p{i}"), "namespace": format!("ns-{}", i % 100), "scope": "Namespace", "action": "Deny",
                   "rules": [[[{"principals": [{"Exact": format!("cluster.local/ns/ns-{}/sa/sa-{}", i % 100, i % 7)}],
                                "destinationPorts": [port]}]]]})
        })
        .collect();
    serde_yaml_ng::to_string(&json!({"workloads": workloads, "services": services, "policies": policies}))
        .expect("JSON values serialise")
}

/// Waits until both nodes ACKed `version` of `type_url` and returns the slower push-to-ACK time.
fn acked(lab: &Lab, version: &str, type_url: &str, timeout: Duration) -> anyhow::Result<f64> {
    let nodes = lab.nodes.len();
    crate::util::wait_for(&format!("both ztunnels to ACK version {version}"), timeout, || {
        let recs: Vec<PushRecord> = push_records(&lab.control_plane().dir)
            .into_iter()
            .filter(|r| r.version == version && r.type_url == type_url && r.resources > 0)
            .collect();
        let by_node: BTreeMap<&str, f64> = recs.iter().map(|r| (r.node.as_str(), r.ms)).collect();
        (by_node.len() == nodes).then(|| by_node.values().copied().fold(0.0, f64::max))
    })
}

fn rss(lab: &Lab) -> anyhow::Result<Vec<f64>> {
    lab.nodes.iter().map(|n| Ok(crate::load::proc_usage(n.ztunnel.as_ref().context("no ztunnel")?.pid())?.0)).collect()
}

fn stats(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    json!({"p50": round(percentile(&v, 50.0), 2), "p99": round(percentile(&v, 99.0), 2), "max": round(percentile(&v, 100.0), 2), "n": v.len()})
}

/// Runs the control-plane benchmark.
pub fn xds(o: &XdsOpts, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Value> {
    use ambit_proto::control_plane::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
    let lab = Lab::start(LabConfig { enrolled_namespaces: vec!["mesh".into()], ..Default::default() })?;
    let rss_before = rss(&lab)?;

    progress(&format!("  pushing {} workloads and {} policies…", o.workloads, o.policies));
    let text = mesh_file(o, 0, 9000);
    let t = Instant::now();
    crate::cni::write_atomic(&lab.workloads_path(), text.as_bytes())?;
    let v = mesh_version(text.as_bytes());
    let initial = acked(&lab, &v, ADDRESS_TYPE, Duration::from_secs(120))?;
    acked(&lab, &v, AUTHORIZATION_TYPE, Duration::from_secs(120))?;
    let initial_total = t.elapsed().as_secs_f64() * 1000.0;
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = rss(&lab)?;

    progress(&format!("  {} changes of one resource each…", o.changes));
    let (mut push, mut end_to_end) = (Vec::new(), Vec::new());
    for c in 1..=o.changes {
        let (text, type_url) = if c % 2 == 0 {
            (mesh_file(o, c, 9000), ADDRESS_TYPE)
        } else {
            (mesh_file(o, c - 1, 10_000 + c as u16), AUTHORIZATION_TYPE)
        };
        let t = Instant::now();
        crate::cni::write_atomic(&lab.workloads_path(), text.as_bytes())?;
        push.push(acked(&lab, &mesh_version(text.as_bytes()), type_url, Duration::from_secs(60))?);
        end_to_end.push(t.elapsed().as_secs_f64() * 1000.0);
    }

    progress(&format!("  {} pods enrolled at once on node1, each with its own identity…", o.pods));
    let started: std::sync::Mutex<BTreeMap<String, Instant>> = Default::default();
    let ready: std::sync::Mutex<BTreeMap<String, Instant>> = Default::default();
    let done = std::sync::atomic::AtomicBool::new(false);
    let threads = o.pods.clamp(1, 20);
    let pods = std::thread::scope(|s| -> anyhow::Result<Vec<crate::lab::Pod>> {
        let poller = s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) || ready.lock().unwrap().len() < o.pods {
                if let Ok(d) = lab.nodes[0].config_dump() {
                    let now = Instant::now();
                    for c in d["certificates"].as_array().into_iter().flatten() {
                        if c["state"] == "Available"
                            && let Some(id) = c["identity"].as_str()
                        {
                            ready.lock().unwrap().entry(id.to_string()).or_insert(now);
                        }
                    }
                }
                if done.load(std::sync::atomic::Ordering::Relaxed) && started.lock().unwrap().len() < o.pods {
                    return; // creation failed: nothing more to wait for
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let workers: Vec<_> = (0..threads)
            .map(|w| {
                let (started, lab) = (&started, &lab);
                s.spawn(move || -> anyhow::Result<Vec<crate::lab::Pod>> {
                    let mut mine = Vec::new();
                    for i in (w..o.pods).step_by(threads) {
                        let sa = format!("bench-{i}");
                        let id = format!("spiffe://{}/ns/mesh/sa/{sa}", crate::lab::TRUST_DOMAIN);
                        started.lock().unwrap().insert(id, Instant::now());
                        mine.push(
                            lab.create_pod(0, "mesh", &format!("cert-{i}"), &sa).map_err(|e| anyhow::anyhow!("{e}"))?,
                        );
                    }
                    Ok(mine)
                })
            })
            .collect();
        let mut pods = Vec::new();
        let mut err = None;
        for w in workers {
            match w.join().expect("a worker thread panicked") {
                Ok(p) => pods.extend(p),
                Err(e) => err = Some(e),
            }
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(60);
        while ready.lock().unwrap().len() < o.pods && Instant::now() < deadline && err.is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = poller.join();
        match err {
            Some(e) => Err(e),
            None => Ok(pods),
        }
    })?;
    let (started, ready) = (started.into_inner().unwrap(), ready.into_inner().unwrap());
    let issue: Vec<f64> = started
        .iter()
        .filter_map(|(id, t0)| ready.get(id).map(|t| t.saturating_duration_since(*t0).as_secs_f64() * 1000.0))
        .collect();
    anyhow::ensure!(issue.len() == o.pods, "only {} of {} pods got their certificate", issue.len(), o.pods);
    let cni: Vec<f64> = pods
        .iter()
        .filter_map(|p| p.timings.iter().find(|(k, _)| k == "ambit-cni").map(|(_, d)| d.as_secs_f64() * 1000.0))
        .collect();
    for p in pods {
        let _ = lab.delete_pod(p);
    }
    Ok(json!({
        "xds": {
            "workloads": o.workloads,
            "policies": o.policies,
            "initial_push_ms": round(initial, 1),
            "initial_write_to_in_force_ms": round(initial_total, 1),
            "push_to_in_force_ms": stats(push),
            "write_to_in_force_ms": stats(end_to_end),
            "ztunnel_rss_mib": {
                "before": rss_before.iter().map(|r| round(*r, 1)).collect::<Vec<_>>(),
                "after": rss_after.iter().map(|r| round(*r, 1)).collect::<Vec<_>>(),
            },
        },
        "certificates": {
            "pods": o.pods,
            "add_to_certificate_ms": stats(issue),
            "ambit_cni_add_ms": stats(cni),
        },
    }))
}
