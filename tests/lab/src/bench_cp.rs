//! `lab bench --only xds`: the control plane's figures, on a two-node lab whose ztunnels run on the lab's
//! control plane (istiod's protocols):
//!
//! - **push to in force**: a mesh of `workloads` workloads and `policies` policies is pushed, then changed
//!   `changes` times (one workload or one policy each time). Each push is timed by the control plane from
//!   sending it to receiving the ztunnel's ACK, which ztunnel sends only after the change is in force
//!   ([`crate::controlplane::PushRecord`]); the slower of the two nodes counts. Beside it, from the lab
//!   writing the mesh file to both ACKs (the control plane's own file polling and encoding included).
//! - **memory**: each ztunnel's RSS before and after the big mesh.
//! - **certificates** (first, on the lab's small mesh): `pods` pods enrolled at once on one node (CNI ADD from
//!   many threads), each with its own service account, timed from the start of its CNI ADD until its ztunnel
//!   logs its certificate issued.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::{Value, json};

use crate::bench::percentile;
use crate::controlplane::{PushRecord, mesh_version, push_records_end, push_records_since};
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
fn acked(lab: &Lab, version: &str, type_url: &str, since: u64, timeout: Duration) -> anyhow::Result<f64> {
    let nodes = lab.nodes.len();
    crate::util::wait_for(&format!("both ztunnels to ACK version {version}"), timeout, || {
        let recs: Vec<PushRecord> = push_records_since(&lab.control_plane().dir, since)
            .into_iter()
            .filter(|r| r.version == version && r.type_url == type_url && r.resources > 0 && r.nack.is_none())
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

/// Seconds since midnight (UTC) of a log line's leading RFC 3339 timestamp (ANSI colours stripped).
fn log_time_of_day(line: &str) -> Option<f64> {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let ts = plain.split_whitespace().next()?;
    let time = ts.split_once('T')?.1.strip_suffix('Z')?;
    let mut parts = time.split(':');
    let (h, m, sec): (f64, f64, f64) =
        (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some(h * 3600.0 + m * 60.0 + sec)
}

fn time_of_day(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64() % 86400.0).unwrap_or(0.0)
}

/// `pods` pods enrolled at once on node1 (CNI ADD from up to 20 threads), each with its own service account:
/// from the start of each one's CNI ADD to its ztunnel's log line saying its certificate was issued (read from
/// the log, so measuring does not load ztunnel). Returns those times and the ambit-cni ADD times, in ms.
fn certificates(lab: &Lab, pods: usize, progress: &mut dyn FnMut(&str)) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    progress(&format!("  {pods} pods enrolled at once on node1, each with its own identity…"));
    let started: std::sync::Mutex<BTreeMap<String, SystemTime>> = Default::default();
    let threads = pods.clamp(1, 20);
    let created = std::thread::scope(|s| -> anyhow::Result<Vec<crate::lab::Pod>> {
        let workers: Vec<_> = (0..threads)
            .map(|w| {
                let started = &started;
                s.spawn(move || -> anyhow::Result<Vec<crate::lab::Pod>> {
                    let mut mine = Vec::new();
                    for i in (w..pods).step_by(threads) {
                        let sa = format!("bench-{i}");
                        let id = format!("spiffe://{}/ns/mesh/sa/{sa}", crate::lab::TRUST_DOMAIN);
                        started.lock().unwrap().insert(id, SystemTime::now());
                        let p =
                            lab.create_pod(0, "mesh", &format!("cert-{i}"), &sa).map_err(|e| anyhow::anyhow!("{e}"))?;
                        mine.push(p);
                    }
                    Ok(mine)
                })
            })
            .collect();
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.join().expect("a worker thread panicked")?);
        }
        Ok(all)
    })?;
    let started = started.into_inner().unwrap();
    let z = lab.nodes[0].ztunnel.as_ref().context("no ztunnel")?;
    let issued = crate::util::wait_for("every pod's certificate", Duration::from_secs(60), || {
        let mut issued = BTreeMap::new();
        for line in z.log().lines().filter(|l| l.contains("workload certificate issued")) {
            let id = line
                .split("spiffe://")
                .nth(1)
                .and_then(|r| r.split(|c: char| c.is_whitespace() || c == '\u{1b}').next());
            if let (Some(id), Some(t)) = (id, log_time_of_day(line)) {
                issued.entry(format!("spiffe://{id}")).or_insert(t);
            }
        }
        started.keys().all(|id| issued.contains_key(id)).then_some(issued)
    })?;
    let issue = started.iter().map(|(id, t0)| (issued[id] - time_of_day(*t0)).rem_euclid(86400.0) * 1000.0).collect();
    let cni = created
        .iter()
        .filter_map(|p| p.timings.iter().find(|(k, _)| k == "ambit-cni").map(|(_, d)| d.as_secs_f64() * 1000.0))
        .collect();
    for p in created {
        let _ = lab.delete_pod(p);
    }
    Ok((issue, cni))
}

/// Runs the control-plane benchmark.
pub fn xds(o: &XdsOpts, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Value> {
    use ambit_proto::control_plane::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
    let lab = Lab::start(LabConfig { enrolled_namespaces: vec!["mesh".into()], ..Default::default() })?;
    let rss_before = rss(&lab)?;
    let (issue, cni) = certificates(&lab, o.pods, progress)?;

    progress(&format!("  pushing {} workloads and {} policies…", o.workloads, o.policies));
    let text = mesh_file(o, 0, 9000);
    let since = push_records_end(&lab.control_plane().dir);
    let t = Instant::now();
    crate::cni::write_atomic(&lab.workloads_path(), text.as_bytes())?;
    let v = mesh_version(text.as_bytes());
    let initial = acked(&lab, &v, ADDRESS_TYPE, since, Duration::from_secs(120))?;
    acked(&lab, &v, AUTHORIZATION_TYPE, since, Duration::from_secs(120))?;
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
        let since = push_records_end(&lab.control_plane().dir);
        let t = Instant::now();
        crate::cni::write_atomic(&lab.workloads_path(), text.as_bytes())?;
        push.push(acked(&lab, &mesh_version(text.as_bytes()), type_url, since, Duration::from_secs(60))?);
        end_to_end.push(t.elapsed().as_secs_f64() * 1000.0);
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

#[cfg(test)]
mod tests {
    #[test]
    fn log_timestamps_are_read_through_colours() {
        let line = "\u{1b}[2m2026-12-02T13:53:17.728148Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m workload certificate issued";
        let t = super::log_time_of_day(line).unwrap();
        assert!((t - (13.0 * 3600.0 + 53.0 * 60.0 + 17.728148)).abs() < 1e-6);
        assert_eq!(super::log_time_of_day("no timestamp here"), None);
    }
}
