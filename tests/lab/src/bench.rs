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
