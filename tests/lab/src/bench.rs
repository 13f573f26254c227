//! `lab bench`: measurements, not tests. Each figure is printed beside what it is compared with in the same
//! run, because this machine is shared and noisy; `--json` prints one object with stable keys.

use std::time::Duration;

use serde_json::{Value, json};

use crate::lab::{Lab, LabConfig};

/// Percentile (0–100) of a sample, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

/// CNI: `ambit-cni` ADD, exec to exit, for `n` enrolled pods and `n` pods outside the mesh, on one node.
pub fn cni(n: usize, keep: bool, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Value> {
    let mut lab = Lab::start(LabConfig {
        nodes: 1,
        enrolled_namespaces: vec!["mesh".into()],
        log_level: "info".into(),
        ..Default::default()
    })?;
    let mut enrolled = Vec::with_capacity(n);
    let mut passthrough = Vec::with_capacity(n);
    let mut pods = Vec::new();
    for i in 0..n {
        for (ns, out) in [("mesh", &mut enrolled), ("legacy", &mut passthrough)] {
            let p = lab.add_pod(0, ns, &format!("p{i}")).map_err(|e| anyhow::anyhow!("{e}"))?;
            let t = p.timings.iter().find(|(k, _)| k == "ambit-cni").map(|(_, d)| *d).unwrap_or_default();
            out.push(ms(t));
            pods.push(p);
        }
        if (i + 1) % 25 == 0 {
            progress(&format!("  {} of {n} pods of each kind", i + 1));
        }
    }
    // The primary plugin of the same runs, for scale.
    let bridge: Vec<f64> = {
        let mut v: Vec<f64> =
            pods.iter().filter_map(|p| p.timings.iter().find(|(k, _)| k == "bridge").map(|(_, d)| ms(*d))).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    enrolled.sort_by(f64::total_cmp);
    passthrough.sort_by(f64::total_cmp);
    if keep {
        lab.keep();
        progress(&format!("  lab kept in {} (lab clean --all removes it)", lab.dir.display()));
        std::mem::forget(pods);
    } else {
        for p in pods {
            let _ = lab.cni_del(&p);
        }
    }
    Ok(json!({
        "enrol_ms": {"p50": round(percentile(&enrolled, 50.0), 2), "p99": round(percentile(&enrolled, 99.0), 2), "max": round(percentile(&enrolled, 100.0), 2), "pods": n},
        "cni_passthrough_ms": {"p50": round(percentile(&passthrough, 50.0), 2), "p99": round(percentile(&passthrough, 99.0), 2), "pods": n},
        "reference_bridge_add_ms": {"p50": round(percentile(&bridge, 50.0), 2)},
    }))
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}

/// Options of the mesh benchmark.
#[derive(Debug, Clone)]
pub struct MeshOpts {
    /// Seconds per throughput and connection-rate measurement.
    pub secs: f64,
    /// Round trips per latency measurement.
    pub round_trips: usize,
    /// Another ztunnel binary to measure under the same conditions.
    pub ztunnel: Option<std::path::PathBuf>,
    /// Extra environment for that ztunnel.
    pub ztunnel_env: Vec<(String, String)>,
    /// Enrolled pods for the idle memory figure.
    pub idle_pods: usize,
    /// Open idle connections for the memory figure.
    pub idle_conns: usize,
}

impl Default for MeshOpts {
    fn default() -> Self {
        MeshOpts {
            secs: 3.0,
            round_trips: 5000,
            ztunnel: None,
            ztunnel_env: Vec::new(),
            idle_pods: 100,
            idle_conns: 1000,
        }
    }
}

struct Figures {
    tp1: f64,
    tp8: f64,
    rr: [(f64, f64); 2],
    connect: (f64, f64),
    bytes: u64,
}

fn measure(
    ns: &crate::Netns,
    sink: std::net::SocketAddr,
    echo: std::net::SocketAddr,
    o: &MeshOpts,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<Figures> {
    use crate::load;
    let (tp1, b1) = load::throughput(ns, sink, 1, o.secs)?;
    progress(&format!("    1 stream: {:.2} Gbit/s", tp1 / 1e9));
    let (tp8, b8) = load::throughput(ns, sink, 8, o.secs)?;
    progress(&format!("    8 streams: {:.2} Gbit/s", tp8 / 1e9));
    let mut rr = [(0.0, 0.0); 2];
    for (i, size) in [1usize, 1024].into_iter().enumerate() {
        let v = load::round_trips(ns, echo, size, o.round_trips)?;
        rr[i] = (percentile(&v, 50.0), percentile(&v, 99.0));
        progress(&format!("    {size} B round trip: p50 {:.0} µs, p99 {:.0} µs", rr[i].0, rr[i].1));
    }
    let (rate, v) = load::connect_rate(ns, echo, o.secs)?;
    progress(&format!("    connect + 1 B echo: {rate:.0}/s, p50 {:.0} µs", percentile(&v, 50.0)));
    Ok(Figures { tp1, tp8, rr, connect: (rate, percentile(&v, 50.0)), bytes: b1 + b8 })
}

fn figures_json(f: &Figures) -> (Value, Value, Value) {
    (
        json!({"1": round(f.tp1 / 1e9, 2), "8": round(f.tp8 / 1e9, 2)}),
        json!({"1b": {"p50": round(f.rr[0].0, 1), "p99": round(f.rr[0].1, 1)}, "1k": {"p50": round(f.rr[1].0, 1), "p99": round(f.rr[1].1, 1)}}),
        json!({"per_s": round(f.connect.0, 0), "p50_us": round(f.connect.1, 1)}),
    )
}

/// The mesh against direct TCP between the same two pods on two nodes, plus ztunnel's memory and CPU.
pub fn mesh(o: &MeshOpts, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Value> {
    use crate::load::{self, LoadServer, Mode};
    use std::net::SocketAddr;
    let lab = Lab::start(LabConfig {
        enrolled_namespaces: vec!["mesh".into()],
        log_level: "warn".into(),
        ztunnel: o.ztunnel.clone(),
        ztunnel_env: o.ztunnel_env.clone(),
        ..Default::default()
    })?;
    let zpid = |i: usize| lab.nodes[i].ztunnel.as_ref().map(|z| z.pid()).unwrap_or(0);
    let client = lab.add_pod_as(0, "mesh", "client", "client").map_err(|e| anyhow::anyhow!("{e}"))?;
    let server = lab.add_pod_as(1, "mesh", "server", "server").map_err(|e| anyhow::anyhow!("{e}"))?;
    let sink = LoadServer::start(&server.netns, SocketAddr::new(server.ip, 5001), Mode::Sink)?;
    let echo = LoadServer::start(&server.netns, SocketAddr::new(server.ip, 5002), Mode::Echo)?;
    // The direct phase echoes on its own port: the thousands of TIME_WAIT connections the mesh phase's connection
    // test leaves behind (same client, same address) would otherwise slow direct's port search and flatter the
    // mesh.
    let echo_direct = LoadServer::start(&server.netns, SocketAddr::new(server.ip, 5003), Mode::Echo)?;

    progress(&format!("  {} more enrolled pods on node1 (idle memory)…", o.idle_pods.saturating_sub(1)));
    let mut extra = Vec::new();
    for i in 1..o.idle_pods {
        extra.push(lab.add_pod(0, "mesh", &format!("idle{i}")).map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss_idle = load::proc_usage(zpid(0))?.0;
    progress(&format!("    ztunnel RSS with {} pods: {rss_idle:.1} MiB", o.idle_pods));

    progress("  mesh: client (node1) → ztunnel → HBONE → ztunnel → server (node2)");
    let cpu0 = load::proc_usage(zpid(0))?.1 + load::proc_usage(zpid(1))?.1;
    let m = measure(&client.netns, sink.addr, echo.addr, o, progress)?;
    let cpu1 = load::proc_usage(zpid(0))?.1 + load::proc_usage(zpid(1))?.1;
    let cpu_per_gib = (cpu1 - cpu0) / (m.bytes as f64 / (1u64 << 30) as f64);
    progress(&format!(
        "    ztunnel CPU: {cpu_per_gib:.2} s per GiB (both ztunnels, whole run incl. latency and connects)"
    ));

    progress(&format!("  {} idle connections through the mesh…", o.idle_conns));
    let held = load::hold_idle(&client.netns, echo.addr, o.idle_conns)?;
    std::thread::sleep(Duration::from_millis(500));
    let (r0, r1) = (load::proc_usage(zpid(0))?.0, load::proc_usage(zpid(1))?.0);
    progress(&format!("    ztunnel RSS: node1 {r0:.1} MiB, node2 {r1:.1} MiB"));
    drop(held);

    progress("  direct: the same pods with capture switched off (ambit-cni DEL)");
    lab.uncapture(&client).map_err(|e| anyhow::anyhow!("{e}"))?;
    lab.uncapture(&server).map_err(|e| anyhow::anyhow!("{e}"))?;
    let d = measure(&client.netns, sink.addr, echo_direct.addr, o, progress)?;

    let (dt, dr, dc) = figures_json(&d);
    let (mt, mr, mc) = figures_json(&m);
    drop(extra);
    Ok(json!({
        "throughput_gbps": {"direct": dt, "mesh": mt},
        "rr_latency_us": {"direct": dr, "mesh": mr},
        "connect": {"direct": dc, "mesh": mc},
        "ztunnel_rss_mib": {"idle_100_pods": round(rss_idle, 1), "conns_1000": round(r0.max(r1), 1), "conns_1000_by_node": [round(r0, 1), round(r1, 1)]},
        "ztunnel_cpu_s_per_gib": round(cpu_per_gib, 2),
        "ratios": {
            "throughput_1": round(m.tp1 / d.tp1, 2),
            "throughput_8": round(m.tp8 / d.tp8, 2),
            "added_rr_1b_us_p50": round(m.rr[0].0 - d.rr[0].0, 1),
            "added_rr_1b_us_p99": round(m.rr[0].1 - d.rr[0].1, 1),
            "connect_rate": round(m.connect.0 / d.connect.0, 2),
        },
    }))
}

/// What the figures were measured on.
pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    json!({"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "cpu": cpu, "kernel": kernel})
}
