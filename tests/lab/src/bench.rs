//! `lab bench`: measurements, not tests. Each figure is printed beside what it is compared with in the same
//! run, because this machine is shared and noisy; `--json` prints one object with stable keys.

use std::time::Duration;

use anyhow::Context as _;
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
    /// Seconds per throughput and connection-rate measurement, in each round.
    pub secs: f64,
    /// Round trips per latency measurement, over all rounds.
    pub round_trips: usize,
    /// Paced round trips ([`PACE`] apart), over all rounds.
    pub paced_round_trips: usize,
    /// Rounds: each measures every path once, the paths taking turns at going first, so all see the same
    /// moments of a shared machine. Rounded up to a multiple of the number of paths, so that each goes first
    /// equally often.
    pub rounds: usize,
    /// The mesh's ztunnel binary; Ambit's from the lab's binary directory when `None`. The build that ships
    /// (`target/production/ztunnel`), say, with the lab's other binaries from a quick release build.
    pub mesh_ztunnel: Option<std::path::PathBuf>,
    /// A drop-in peer ztunnel (Istio's, say), measured as a fourth path in the same rounds: two more nodes run
    /// it, with a pod pair of their own.
    pub peer: Option<std::path::PathBuf>,
    /// Extra environment for the peer.
    pub peer_env: Vec<(String, String)>,
    /// Sysctls set in the peer pair's two pods (KEY, VALUE). In in-pod mode every socket a ztunnel opens for
    /// a pod lives in that pod's netns, so with Ambit's own binary as the peer this measures a kernel choice
    /// (autocorking, socket buffer sizes) against the default in the same rounds. The apps' sockets in those
    /// pods get it too.
    pub peer_sysctls: Vec<(String, String)>,
    /// The peer's nodes' agents run with `loopbackRoute: false`, so the peer's pods have no loopback route:
    /// with Ambit's own binary as the peer, what that route gains, in the same rounds.
    pub peer_without_lo_route: bool,
    /// Enrolled pods for the idle memory figure.
    pub idle_pods: usize,
    /// Open idle connections for the memory figure.
    pub idle_conns: usize,
    /// Only these phases (all when empty): for profiling one of them; the others' figures are null.
    pub phases: Vec<Phase>,
    /// Also measure the floor with its in-pod legs short-cut by an eBPF sockmap ([`crate::sockmap`]), as a
    /// fifth path of the same rounds.
    pub sockmap: bool,
    /// Also measure the captured floor: the floor's relays taking the connections that the pods' capture
    /// rules (the agent's) redirect, as ztunnel does; what capture itself adds to the floor.
    pub captured_floor: bool,
    /// Also measure the waypoint path: the client to a service whose waypoint (the lab's stand-in,
    /// [`crate::waypoint`], relaying TCP) runs on the server's node, then to the server; what the extra hop
    /// costs. Its CPU per unit is the two ztunnels' (the stand-in is not Envoy: its own cost is not counted).
    pub waypoint: bool,
    /// The open-loop rate phase ([`crate::rate`]): target request rates over `rate_connections` connections,
    /// `rate_size` bytes each way, `rate_secs` per point and round; and the many-clients case, `rate_many`
    /// connections at one request a second each (none when zero).
    pub rates: Vec<f64>,
    pub rate_connections: usize,
    pub rate_size: usize,
    pub rate_secs: f64,
    pub rate_many: usize,
    /// CPU-bound processes beside the lab while the rate phase runs a second time in each round (none when
    /// zero): every rate figure is then reported quiet and on a busy node, each path meeting the same load in
    /// the same rounds.
    pub contention: usize,
    /// How long the floor's relays busy-poll after activity (zero: never). With polling on both sides, a
    /// proxy that polls through back-to-back round trips spends about their wall time in CPU; with it off on
    /// the floor (and `AMBIT_BUSY_POLL=0` for Ambit's own binary as the peer), the CPU per unit is each
    /// proxy's work alone.
    pub relay_spin: Duration,
}

/// The floor's relays' busy-polling window by default: the most that ztunnel's workers poll
/// (`AMBIT_BUSY_POLL`'s default).
pub const RELAY_SPIN: Duration = Duration::from_micros(80);

/// A phase of each round's measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    /// Bulk throughput, 1 and 8 streams.
    Bulk,
    /// Request/response round trips.
    RoundTrip,
    /// New connections with a 1-byte echo.
    Connect,
    /// 1-byte round trips spaced [`PACE`] apart: the CPU a proxy spends waiting between requests.
    Paced,
    /// Open-loop load at fixed request rates (fortio's way, Istio's standard case by default).
    Rate,
}

/// The pause between paced round trips: longer than any busy-polling window, as between the requests of most
/// real traffic.
pub const PACE: Duration = Duration::from_millis(1);

impl MeshOpts {
    fn runs(&self, p: Phase) -> bool {
        self.phases.is_empty() || self.phases.contains(&p)
    }

    /// The rate phase's runs: the sweep, then the many-clients case.
    fn rate_points(&self) -> Vec<crate::rate::RateOpts> {
        use crate::rate::RateOpts;
        let (connections, size, secs) = (self.rate_connections, self.rate_size, self.rate_secs);
        let mut points: Vec<RateOpts> =
            self.rates.iter().map(|&rps| RateOpts { rps, connections, size, secs }).collect();
        if self.rate_many > 0 {
            points.push(RateOpts { rps: self.rate_many as f64, connections: self.rate_many, size, secs });
        }
        points
    }
}

/// The rate phase's sweep by default: from a trickle to about where the direct path saturates on the lab
/// machine (2 cores).
pub const RATES: [f64; 6] = [100.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0];

impl Default for MeshOpts {
    fn default() -> Self {
        MeshOpts {
            secs: 1.5,
            round_trips: 10_000,
            paced_round_trips: 1_000,
            rounds: 6,
            mesh_ztunnel: None,
            peer: None,
            peer_env: Vec::new(),
            peer_sysctls: Vec::new(),
            peer_without_lo_route: false,
            idle_pods: 100,
            idle_conns: 1000,
            phases: Vec::new(),
            sockmap: false,
            captured_floor: false,
            waypoint: false,
            rates: RATES.to_vec(),
            // Istio's standard case: 16 connections, 1 KiB each way.
            rate_connections: 16,
            rate_size: 1024,
            rate_secs: 1.0,
            rate_many: 1000,
            contention: 0,
            relay_spin: RELAY_SPIN,
        }
    }
}

/// One path's figures, gathered over the rounds.
#[derive(Default)]
struct Figures {
    /// Gbit/s of each round, 1 stream and 8 streams.
    tp: [Vec<f64>; 2],
    /// Round-trip samples in µs, 1 B and 1 KiB.
    rr: [Vec<f64>; 2],
    /// Connections made and seconds spent making them.
    conns: (usize, f64),
    /// Connection samples in µs.
    connect: Vec<f64>,
    /// Paced round-trip samples in µs.
    paced: Vec<f64>,
    /// Bytes moved by the throughput runs.
    bytes: u64,
    /// Where the work went, per phase ([`BULK`], [`RR`], [`CONNECT`], [`PACED`]).
    cost: [Cost; 4],
    /// The most memory the machine's TCP sockets held during a bulk run, in MiB.
    tcp_mem_peak_mib: f64,
    /// Phases that failed (the sockmap path only, whose failures are a finding, not the bench's).
    failures: Vec<String>,
    /// The rate phase, by (contention, point of [`MeshOpts::rate_points`]).
    rate: std::collections::BTreeMap<(usize, usize), RatePoint>,
}

/// One point of the rate phase on one path, over the rounds.
#[derive(Default)]
struct RatePoint {
    opts: Option<crate::rate::RateOpts>,
    sent: usize,
    done: usize,
    secs: f64,
    latencies_us: Vec<f64>,
    /// The proxies' CPU, per request answered.
    cost: Cost,
    /// Whether the path has proxies to count (not direct).
    proxied: bool,
    /// The larger proxy's RSS after the point, MiB (the largest over the rounds).
    rss_mib: f64,
}

impl RatePoint {
    /// vCPU per 1,000 requests/s (= CPU seconds per 1,000 requests): total, user, kernel. NaN without proxies.
    fn vcpu_per_krps(&self) -> [f64; 3] {
        let per = |s: f64| if self.proxied && self.done > 0 { s * 1000.0 / self.done as f64 } else { f64::NAN };
        [per(self.cost.cpu_s()), per(self.cost.used.user_s), per(self.cost.used.sys_s)]
    }

    fn achieved_rps(&self) -> f64 {
        self.done as f64 / self.secs.max(1e-9)
    }

    fn json(&self, path: &str, contention: usize) -> Value {
        let o = self.opts.expect("a point that ran");
        let [vcpu, user, kernel] = self.vcpu_per_krps();
        let pct = |p: f64| round(percentile(&self.latencies_us, p), 1);
        json!({
            "path": path,
            "target_rps": o.rps,
            "achieved_rps": round(self.achieved_rps(), 1),
            "connections": o.connections,
            "size": o.size,
            "contention": contention,
            "sent": self.sent,
            "done": self.done,
            "latency_us": {"p50": pct(50.0), "p90": pct(90.0), "p99": pct(99.0), "p999": pct(99.9)},
            "vcpu_per_krps": round(vcpu, 3),
            "vcpu_per_krps_user": round(user, 3),
            "vcpu_per_krps_kernel": round(kernel, 3),
            "rss_mib": if self.proxied { json!(round(self.rss_mib, 1)) } else { Value::Null },
        })
    }
}

/// Phases of one measurement, for [`Cost`].
const BULK: usize = 0;
const RR: usize = 1;
const CONNECT: usize = 2;
const PACED: usize = 3;

/// What one phase cost: packets sent inside the two pods' netns (every hop of the path: loopback inside a
/// pod, the pod's veth), the proxies' CPU (ztunnels or relays; none direct), and how many units of work (GiB, round trips,
/// connections) that was for.
#[derive(Default, Clone, Copy)]
struct Cost {
    /// What the phase used: the counters' growth over it.
    used: Counters,
    units: f64,
}

/// Counters read before and after a phase.
#[derive(Default, Clone, Copy)]
struct Counters {
    packets: u64,
    user_s: f64,
    sys_s: f64,
}

/// The pods' netns and the proxies whose counters [`Cost`] takes.
struct Meters<'a> {
    pods: [&'a crate::Netns; 2],
    /// The proxies' pids: the ztunnels (mesh), the relays (floor), none (direct).
    proxies: Vec<u32>,
}

impl Meters<'_> {
    /// Waits until the pods send nothing for 200 ms (at most a minute): bytes that a failed run left queued
    /// have drained.
    fn settle(&self) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut last = self.read()?.packets;
        while std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            let now = self.read()?.packets;
            if now == last {
                return Ok(());
            }
            last = now;
        }
        anyhow::bail!("the pods were still sending a minute after a failed run")
    }

    fn read(&self) -> anyhow::Result<Counters> {
        let mut c = Counters::default();
        for ns in self.pods {
            c.packets += crate::load::packets_sent(ns)?;
        }
        for pid in &self.proxies {
            let (u, s) = crate::load::cpu_times(*pid)?;
            c.user_s += u;
            c.sys_s += s;
        }
        Ok(c)
    }
}

impl Cost {
    fn add(&mut self, before: Counters, after: Counters, units: f64) {
        let u = &mut self.used;
        u.packets += after.packets.saturating_sub(before.packets);
        u.user_s += after.user_s - before.user_s;
        u.sys_s += after.sys_s - before.sys_s;
        self.units += units;
    }

    fn packets_per_unit(&self) -> f64 {
        self.used.packets as f64 / self.units.max(1e-9)
    }

    /// ztunnel CPU seconds (user + system).
    fn cpu_s(&self) -> f64 {
        self.used.user_s + self.used.sys_s
    }

    /// ztunnel CPU seconds per unit, and the kernel's share of it.
    /// NaN (null in the JSON) for a phase that did not run.
    fn cpu_per_unit(&self) -> (f64, f64) {
        let total = self.cpu_s();
        if self.units <= 0.0 {
            return (f64::NAN, f64::NAN);
        }
        (total / self.units, if total > 0.0 { self.used.sys_s / total } else { f64::NAN })
    }
}

impl Figures {
    /// The mean over the rounds; NaN (null in the JSON) when no run succeeded.
    fn tp(&self, i: usize) -> f64 {
        self.tp[i].iter().sum::<f64>() / self.tp[i].len() as f64
    }

    fn rr(&self, i: usize, p: f64) -> f64 {
        percentile(&self.rr[i], p)
    }

    fn connect_rate(&self) -> f64 {
        self.conns.0 as f64 / self.conns.1.max(1e-9)
    }

    fn finish(&mut self) {
        for v in self.rr.iter_mut().chain([&mut self.connect, &mut self.paced]) {
            v.sort_by(f64::total_cmp);
        }
        for p in self.rate.values_mut() {
            p.latencies_us.sort_by(f64::total_cmp);
        }
    }

    /// The rate phase's entries of this path.
    fn rate_json(&self, path: &str, contention: usize) -> Vec<Value> {
        self.rate.iter().map(|(&(busy, _), p)| p.json(path, if busy == 1 { contention } else { 0 })).collect()
    }

    /// The highest rate answered with a p99 under 10 ms, quiet.
    fn max_rps_p99_under_10ms(&self) -> Option<f64> {
        self.rate
            .iter()
            .filter(|((busy, _), p)| *busy == 0 && percentile(&p.latencies_us, 99.0) < 10_000.0 && p.done > 0)
            .map(|(_, p)| p.achieved_rps())
            .max_by(f64::total_cmp)
    }

    /// This path's figures as ratios to (throughput, connection rate) or differences from (latency) `direct`'s.
    fn against(&self, direct: &Figures) -> serde_json::Map<String, Value> {
        let d = direct;
        json!({
            "throughput_1": round(self.tp(0) / d.tp(0), 2),
            "throughput_8": round(self.tp(1) / d.tp(1), 2),
            "added_rr_1b_us_p50": round(self.rr(0, 50.0) - d.rr(0, 50.0), 1),
            "added_rr_1b_us_p99": round(self.rr(0, 99.0) - d.rr(0, 99.0), 1),
            "added_paced_rr_1b_us_p50": round(percentile(&self.paced, 50.0) - percentile(&d.paced, 50.0), 1),
            "connect_rate": round(self.connect_rate() / d.connect_rate(), 2),
        })
        .as_object()
        .cloned()
        .unwrap_or_default()
    }

    /// This path's figures over `other`'s, measured in the same rounds: throughput, connection rate, the 1 B
    /// round trip's p50 (back to back and paced) and the proxies' CPU per unit of each phase.
    fn of(&self, other: &Figures) -> serde_json::Map<String, Value> {
        let cpu = |f: &Figures, phase: usize| f.cost[phase].cpu_per_unit().0;
        let cpu_ratio = |phase: usize| round(cpu(self, phase) / cpu(other, phase), 2);
        json!({
            "throughput_1": round(self.tp(0) / other.tp(0), 2),
            "throughput_8": round(self.tp(1) / other.tp(1), 2),
            "connect_rate": round(self.connect_rate() / other.connect_rate(), 2),
            "rr_1b_p50": round(self.rr(0, 50.0) / other.rr(0, 50.0), 2),
            "paced_rr_1b_p50": round(percentile(&self.paced, 50.0) / percentile(&other.paced, 50.0), 2),
            "cpu_per_gib": cpu_ratio(BULK),
            "cpu_per_round_trip": cpu_ratio(RR),
            "cpu_per_connection": cpu_ratio(CONNECT),
            "cpu_per_paced_round_trip": cpu_ratio(PACED),
        })
        .as_object()
        .cloned()
        .unwrap_or_default()
    }

    /// The proxies' CPU per unit of work in each phase: seconds per GiB of bulk, µs per round trip and per
    /// connection.
    fn cpu_json(&self) -> Value {
        json!({
            "bulk_s_per_gib": round(self.cost[BULK].cpu_per_unit().0, 2),
            "round_trip_us": round(self.cost[RR].cpu_per_unit().0 * 1e6, 1),
            "connection_us": round(self.cost[CONNECT].cpu_per_unit().0 * 1e6, 1),
            "paced_round_trip_us": round(self.cost[PACED].cpu_per_unit().0 * 1e6, 1),
            // The kernel's part of each (system time over user + system), so that two paths' CPU can be
            // compared in user space and in the kernel apart.
            "kernel_share": {
                "bulk": round(self.cost[BULK].cpu_per_unit().1, 2),
                "round_trip": round(self.cost[RR].cpu_per_unit().1, 2),
                "connection": round(self.cost[CONNECT].cpu_per_unit().1, 2),
                "paced_round_trip": round(self.cost[PACED].cpu_per_unit().1, 2),
            },
        })
    }

    fn json(&self) -> (Value, Value, Value) {
        (
            json!({"1": round(self.tp(0) / 1e9, 2), "8": round(self.tp(1) / 1e9, 2)}),
            json!({
                "1b": {"p50": round(self.rr(0, 50.0), 1), "p99": round(self.rr(0, 99.0), 1)},
                "1k": {"p50": round(self.rr(1, 50.0), 1), "p99": round(self.rr(1, 99.0), 1)},
                "paced_1b": {"p50": round(percentile(&self.paced, 50.0), 1), "p99": round(percentile(&self.paced, 99.0), 1)},
            }),
            json!({"per_s": round(self.connect_rate(), 0), "p50_us": round(percentile(&self.connect, 50.0), 1)}),
        )
    }
}

/// One round of one path, added to `f`.
fn measure(
    meters: &Meters,
    sink: std::net::SocketAddr,
    echo: std::net::SocketAddr,
    o: &MeshOpts,
    f: &mut Figures,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    use crate::load;
    let ns = meters.pods[0];
    let c0 = meters.read()?;
    let mut moved = 0;
    for (i, streams) in [1, 8].into_iter().enumerate().filter(|_| o.runs(Phase::Bulk)) {
        let peak = load::TcpMemPeak::start();
        let run = load::throughput(ns, sink, streams, o.secs);
        // Kept for a failed run too: on the sockmap path, that is where the memory peaks.
        let peak = peak.stop();
        f.tcp_mem_peak_mib = f.tcp_mem_peak_mib.max(peak);
        let (tp, bytes) = run?;
        f.tp[i].push(tp);
        moved += bytes;
        progress(&format!("      {streams} stream(s): {:.2} Gbit/s, TCP memory up to {peak:.0} MiB", tp / 1e9));
    }
    f.bytes += moved;
    let c1 = meters.read()?;
    f.cost[BULK].add(c0, c1, moved as f64 / (1u64 << 30) as f64);
    let mut exchanges = 0;
    for (i, size) in [1usize, 1024].into_iter().enumerate().filter(|_| o.runs(Phase::RoundTrip)) {
        let mut v = load::round_trips(ns, echo, size, o.round_trips.div_ceil(o.rounds.max(1)), Duration::ZERO)?;
        progress(&format!(
            "      {size} B round trip: p50 {:.0} µs, p99 {:.0} µs",
            percentile(&v, 50.0),
            percentile(&v, 99.0)
        ));
        exchanges += v.len();
        f.rr[i].append(&mut v);
    }
    let c2 = meters.read()?;
    f.cost[RR].add(c1, c2, exchanges as f64);
    if o.runs(Phase::Connect) {
        let (rate, mut v) = load::connect_rate(ns, echo, o.secs)?;
        f.cost[CONNECT].add(c2, meters.read()?, v.len() as f64);
        f.conns.0 += v.len();
        // The run's own duration (connections / rate).
        f.conns.1 += v.len() as f64 / rate.max(1e-9);
        progress(&format!("      connect + 1 B echo: {rate:.0}/s, p50 {:.0} µs", percentile(&v, 50.0)));
        f.connect.append(&mut v);
    }
    if o.runs(Phase::Rate) {
        measure_rate(meters, echo, o, f, progress)?;
    }
    if o.runs(Phase::Paced) {
        let c3 = meters.read()?;
        let mut v = load::round_trips(ns, echo, 1, o.paced_round_trips.div_ceil(o.rounds.max(1)), PACE)?;
        f.cost[PACED].add(c3, meters.read()?, v.len() as f64);
        progress(&format!(
            "      1 B round trips {} ms apart: p50 {:.0} µs, p99 {:.0} µs",
            PACE.as_millis(),
            percentile(&v, 50.0),
            percentile(&v, 99.0)
        ));
        f.paced.append(&mut v);
    }
    Ok(())
}

/// The rate phase of one path in one round: each point quiet, then (with `contention`) each again beside that
/// many CPU-bound processes.
fn measure_rate(
    meters: &Meters,
    echo: std::net::SocketAddr,
    o: &MeshOpts,
    f: &mut Figures,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    let ns = meters.pods[0];
    for busy in [0, 1].into_iter().filter(|&b| b == 0 || o.contention > 0) {
        let _contention = if busy == 1 { Some(crate::rate::Contention::start(o.contention)?) } else { None };
        for (j, point) in o.rate_points().into_iter().enumerate() {
            let c0 = meters.read()?;
            let run = crate::rate::open_loop(ns, echo, &point)?;
            let c1 = meters.read()?;
            let rss = meters
                .proxies
                .iter()
                .map(|&pid| crate::load::proc_usage(pid).map(|u| u.0))
                .try_fold(0.0f64, |m, r| -> anyhow::Result<f64> { Ok(m.max(r?)) })?;
            let e = f.rate.entry((busy, j)).or_default();
            e.opts = Some(point);
            e.proxied = !meters.proxies.is_empty();
            e.cost.add(c0, c1, run.done as f64);
            e.sent += run.sent;
            e.done += run.done;
            e.secs += run.secs;
            e.rss_mib = e.rss_mib.max(rss);
            progress(&format!(
                "      {} req/s over {} connection(s){}: {:.0} answered/s, p50 {:.0} µs, p99 {:.0} µs",
                point.rps,
                point.connections,
                if busy == 1 { format!(", {} CPU-bound processes beside", o.contention) } else { String::new() },
                run.achieved_rps(),
                percentile_unsorted(&run.latencies_us, 50.0),
                percentile_unsorted(&run.latencies_us, 99.0),
            ));
            e.latencies_us.extend(run.latencies_us);
        }
    }
    Ok(())
}

fn percentile_unsorted(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, p)
}

/// The mesh's rate figures over the peer's, point by point (both measured in the same rounds): vCPU per
/// 1,000 requests/s and the latency percentiles. Empty without a peer.
fn rate_mesh_of_peer(m: &Figures, p: &Figures, contention: usize) -> Vec<Value> {
    m.rate
        .iter()
        .filter_map(|(key, mp)| {
            let pp = p.rate.get(key)?;
            let o = mp.opts?;
            let ratio = |a: f64, b: f64| round(a / b, 2);
            let (ml, pl) = (&mp.latencies_us, &pp.latencies_us);
            Some(json!({
                "target_rps": o.rps,
                "connections": o.connections,
                "contention": if key.0 == 1 { contention } else { 0 },
                "vcpu_per_krps": ratio(mp.vcpu_per_krps()[0], pp.vcpu_per_krps()[0]),
                "p50": ratio(percentile(ml, 50.0), percentile(pl, 50.0)),
                "p99": ratio(percentile(ml, 99.0), percentile(pl, 99.0)),
                "p999": ratio(percentile(ml, 99.9), percentile(pl, 99.9)),
                "achieved_rps": ratio(mp.achieved_rps(), pp.achieved_rps()),
            }))
        })
        .collect()
}

/// The paths a round measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Pod to pod, capture off.
    Direct,
    /// Through the two ztunnels.
    Mesh,
    /// Capture off, through two bare relays ([`crate::relay`]) where the ztunnels would be.
    Relay,
    /// Another pod pair, on two more nodes, through the peer's ztunnels.
    Peer,
    /// The floor's relays with their two in-pod legs short-cut by the sockmap ([`crate::sockmap`]).
    Sockmap,
    /// The floor's relays behind the pods' capture rules, where ztunnel would be ([`start_captured`]).
    Captured,
    /// Through the two ztunnels and a waypoint: client → ztunnel → HBONE → waypoint → HBONE → ztunnel → server.
    Waypoint,
}

/// Starts the floor's relays: for each `(local, between, app)` the client pod's relay listens on
/// 127.0.0.1:`local` and connects to the server pod's on `between`, which connects to the app on `app`.
/// Returns the relays and, for each route, where the client connects.
fn start_relays(
    lab: &Lab,
    client: &crate::Pod,
    server: &crate::Pod,
    ports: [(u16, u16, u16); 2],
    spin: Duration,
) -> anyhow::Result<(Vec<crate::proc::Proc>, [std::net::SocketAddr; 2])> {
    let route = |listen: std::net::SocketAddr, to: std::net::SocketAddr| format!("--route={listen}={to}");
    let at = |ip, port| std::net::SocketAddr::new(ip, port);
    let relays = vec![
        spawn_relay(
            lab,
            client,
            "relay-client",
            ports.map(|(l, b, _)| route(at(std::net::Ipv4Addr::LOCALHOST.into(), l), at(server.ip, b))).to_vec(),
            spin,
        )?,
        spawn_relay(
            lab,
            server,
            "relay-server",
            ports.map(|(_, b, a)| route(at(server.ip, b), at(server.ip, a))).to_vec(),
            spin,
        )?,
    ];
    Ok((relays, ports.map(|(l, _, _)| at(std::net::Ipv4Addr::LOCALHOST.into(), l))))
}

/// Runs `lab relay args…` in `pod`'s netns, busy-polling for `spin` after activity, and waits until it
/// listens.
fn spawn_relay(
    lab: &Lab,
    pod: &crate::Pod,
    name: &str,
    args: Vec<String>,
    spin: Duration,
) -> anyhow::Result<crate::proc::Proc> {
    let mut cmd = pod.netns.command(crate::util::binary("lab"));
    cmd.arg("relay").args(args).arg(format!("--spin-us={}", spin.as_micros()));
    let log = lab.dir.join(format!("{name}.log"));
    let p = crate::proc::Proc::spawn(name, cmd, &log)?;
    crate::util::wait_for(&format!("{name} to listen (log {})", log.display()), Duration::from_secs(10), || {
        p.log().contains("ready").then_some(())
    })?;
    Ok(p)
}

/// The agent's capture rules and routing in the two pods' netns, installed by the lab while capture is off
/// (so that no ztunnel holds the pods' ports); removed on drop.
struct CaptureRules<'a> {
    /// Each pod's netns and the rules' config there, as installed.
    pods: Vec<(&'a crate::Netns, ambit_agent::rules::InpodConfig)>,
}

impl<'a> CaptureRules<'a> {
    fn install(pods: [&'a crate::Pod; 2]) -> anyhow::Result<CaptureRules<'a>> {
        let mut rules = CaptureRules { pods: Vec::new() };
        for pod in pods {
            let cfg = ambit_agent::rules::InpodConfig::for_ips(&[pod.ip]);
            pod.netns
                .run(move || ambit_agent::rules::install_pod(ambit_agent::rules::Backend::Nftables, cfg))?
                .with_context(|| format!("installing the capture rules in {}", pod.netns.name()))?;
            rules.pods.push((&pod.netns, cfg));
        }
        Ok(rules)
    }
}

impl Drop for CaptureRules<'_> {
    fn drop(&mut self) {
        for &(ns, cfg) in &self.pods {
            let r = ns.run(move || ambit_agent::rules::remove_pod(ambit_agent::rules::Backend::Nftables, cfg));
            if !matches!(r, Ok(Ok(()))) {
                eprintln!("lab bench: the capture rules stay in {}: {r:?}", ns.name());
            }
        }
    }
}

/// The captured floor: the agent's capture rules in both pods, and a relay where they redirect, as ztunnel
/// would be. The client's connections to each `(app, between)` route's app are redirected to its pod's relay
/// on 15001, which connects to the server pod on `between`; that connection is redirected to the server
/// pod's relay on 15006, which connects to the app. The relays' own connections carry ztunnel's mark, so the
/// rules let them through. Unlike the mesh's HBONE connections (to 15008, which is not redirected), the
/// connection between the relays is redirected once more, on its way into the server pod.
fn start_captured<'a>(
    lab: &Lab,
    client: &'a crate::Pod,
    server: &'a crate::Pod,
    routes: [(std::net::SocketAddr, u16); 2],
    round: usize,
    spin: Duration,
) -> anyhow::Result<(CaptureRules<'a>, Vec<crate::proc::Proc>)> {
    let rules = CaptureRules::install([client, server])?;
    let between = |port| std::net::SocketAddr::new(server.ip, port);
    let mut client_args = vec!["--redirected-at=0.0.0.0:15001".to_string()];
    client_args.extend(routes.map(|(app, b)| format!("--route={app}={}", between(b))));
    let mut server_args = vec!["--redirected-at=0.0.0.0:15006".to_string()];
    server_args.extend(routes.map(|(app, b)| format!("--route={}={app}", between(b))));
    let relays = vec![
        // A log of its own each round: the previous relay's "ready" must not count.
        spawn_relay(lab, client, &format!("relay-captured-client-{round}"), client_args, spin)?,
        spawn_relay(lab, server, &format!("relay-captured-server-{round}"), server_args, spin)?,
    ];
    Ok((rules, relays))
}

/// The MSS of an app's connection from `client` to `server_addr` (TCP_MAXSEG of the client's socket), and of
/// the server app's side of it (as `ss` shows it in the server pod): 1448 where the pods' interfaces have a
/// 1500-byte MTU and the connection's legs cross loopback with the interface's MTU.
fn app_mss(client: &crate::Pod, server: &crate::Pod, server_addr: std::net::SocketAddr) -> anyhow::Result<(u32, u32)> {
    let conn = client.netns.run(move || std::net::TcpStream::connect(server_addr))??;
    let mss = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::TcpMaxSeg).context("TCP_MAXSEG")?;
    // The server app's socket: its MSS once the connection has reached it (through the mesh, a moment later).
    let filter = format!("sport = :{}", server_addr.port());
    let server_mss = crate::util::wait_for("the server app's end of the MSS probe", Duration::from_secs(5), || {
        let out = server.netns.exec("ss", &["-tinH", "state", "established", &filter]).ok()?;
        out.split_whitespace().find_map(|w| w.strip_prefix("mss:")?.parse::<u32>().ok())
    })?;
    drop(conn);
    Ok((mss as u32, server_mss))
}

fn cni_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// The peer's path: a pod pair on the peer's two nodes and their load servers.
struct PeerPair {
    client: crate::Pod,
    server: crate::Pod,
    sink: crate::load::LoadServer,
    echo: crate::load::LoadServer,
}

/// The mesh against direct TCP between the same two pods on two nodes, plus ztunnel's memory and CPU.
///
/// Direct and mesh take turns, in rounds (capture is switched off and on again between them with
/// ambit-cni DEL and ADD, as a runtime would), so that a busy moment of a shared machine falls on both
/// and each figure is gathered over the whole run.
pub fn mesh(o: &MeshOpts, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Value> {
    use crate::load::{self, LoadServer, Mode};
    use std::net::SocketAddr;
    let lab = Lab::start(LabConfig {
        nodes: if o.peer.is_some() { 4 } else { 2 },
        enrolled_namespaces: vec!["mesh".into()],
        // As users run them: the default level, access logs on.
        log_level: "info".into(),
        ztunnel: o.mesh_ztunnel.clone(),
        peer: o.peer.clone().map(|binary| crate::PeerZtunnel {
            binary,
            env: o.peer_env.clone(),
            nodes: vec![2, 3],
            loopback_route: !o.peer_without_lo_route,
        }),
        ..Default::default()
    })?;
    let zpid = |i: usize| lab.nodes[i].ztunnel.as_ref().map(|z| z.pid()).unwrap_or(0);
    // Which binaries ran, as their processes were started (argv[0]), so that the report names what was measured.
    let ran = |i: usize| -> Value { crate::util::argv0(zpid(i)).map_or(Value::Null, Value::from) };
    let ztunnel_binaries = json!({"mesh": ran(0), "peer": if o.peer.is_some() { ran(2) } else { Value::Null }});
    let client = lab.add_pod_as(0, "mesh", "client", "client").map_err(cni_err)?;
    let server = lab.add_pod_as(1, "mesh", "server", "server").map_err(cni_err)?;
    // The peer's pair: the same pods on the peer's two nodes, served the same way.
    let mut peer_sysctls = serde_json::Map::new();
    let peer = match o.peer {
        Some(_) => {
            let (client, server) = (
                lab.add_pod_as(2, "mesh", "peer-client", "client").map_err(cni_err)?,
                lab.add_pod_as(3, "mesh", "peer-server", "server").map_err(cni_err)?,
            );
            // Read back, so the report says what was in force rather than what was asked.
            for (k, v) in &o.peer_sysctls {
                let mut got = Vec::new();
                for p in [&client, &server] {
                    p.netns.sysctl(k, v).with_context(|| format!("setting {k} in the peer's pods"))?;
                    got.push(p.netns.read_sysctl(k)?);
                }
                anyhow::ensure!(got[0] == got[1], "{k} reads {got:?} in the peer's two pods");
                peer_sysctls.insert(k.clone(), json!(got[0]));
            }
            let sink = LoadServer::start(&server.netns, SocketAddr::new(server.ip, 5001), Mode::Sink)?;
            let echo = LoadServer::start(&server.netns, SocketAddr::new(server.ip, 5002), Mode::Echo)?;
            Some(PeerPair { client, server, sink, echo })
        }
        None => None,
    };
    // Each connection run opens thousands of connections from one client to one address; their TIME_WAIT
    // entries (kept 60 s) would slow every later run's port search, more with each round. Load generators
    // reuse them (safe with TCP timestamps); both pods do, for the client and for ztunnel's connections to
    // the app.
    for p in [&client, &server].into_iter().chain(peer.iter().flat_map(|pp| [&pp.client, &pp.server])) {
        p.netns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    }
    let sink = LoadServer::start(&server.netns, SocketAddr::new(server.ip, 5001), Mode::Sink)?;
    let echo = LoadServer::start(&server.netns, SocketAddr::new(server.ip, 5002), Mode::Echo)?;
    // The direct runs echo on their own port: the thousands of TIME_WAIT connections the mesh's connection
    // runs leave behind (same client, same address) would otherwise slow direct's port search and flatter
    // the mesh.
    let echo_direct = LoadServer::start(&server.netns, SocketAddr::new(server.ip, 5003), Mode::Echo)?;
    // The MSS of the apps' sockets through each captured path (the pods are captured here): loopback's with
    // the agent's loopback route, the pod interface's without it.
    let mss_mesh = app_mss(&client, &server, sink.addr)?;
    let mss_peer = match &peer {
        Some(pp) => Some(app_mss(&pp.client, &pp.server, pp.sink.addr)?),
        None => None,
    };
    if o.peer_without_lo_route {
        let (c, s) = mss_peer.unwrap_or_default();
        anyhow::ensure!(c < 1500 && s < 1500, "the peer's pods still route through lo: its apps' MSS is {c} and {s}");
    }
    // And the captured floor on its own, for the same reason (and because its connections, redirected, share
    // their conntrack entries' original tuples with direct's).
    let echo_captured = match o.captured_floor {
        true => Some(LoadServer::start(&server.netns, SocketAddr::new(server.ip, 5004), Mode::Echo)?),
        false => None,
    };

    // The waypoint path: the same server behind a service whose waypoint runs on the server's node; the
    // mesh path's connections, to the pod's address, do not pass it.
    let waypoint = match o.waypoint {
        true => {
            let wp = lab.add_waypoint(1, "mesh", "waypoint", "waypoint", "10.96.0.50".parse()?, &[])?;
            let host = "bench.mesh.svc.cluster.local";
            let ports =
                json!({sink.addr.port().to_string(): sink.addr.port(), echo.addr.port().to_string(): echo.addr.port()});
            let service = json!({
                "name": "bench", "namespace": "mesh", "hostname": host, "vips": ["/10.96.0.51"], "ports": ports,
                "waypoint": wp.by_hostname(),
            });
            lab.set_services(vec![service, wp.service()])?;
            lab.set_pod_services(&server, json!({ format!("mesh/{host}"): {} }))?;
            let vip: std::net::IpAddr = "10.96.0.51".parse()?;
            Some((wp, SocketAddr::new(vip, sink.addr.port()), SocketAddr::new(vip, echo.addr.port())))
        }
        false => None,
    };

    progress(&format!("  {} more enrolled pods on node1 (idle memory)…", o.idle_pods.saturating_sub(1)));
    let mut extra = Vec::new();
    for i in 1..o.idle_pods {
        extra.push(lab.add_pod(0, "mesh", &format!("idle{i}")).map_err(cni_err)?);
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss_idle = load::proc_usage(zpid(0))?.0;
    progress(&format!("    ztunnel RSS with {} pods: {rss_idle:.1} MiB", o.idle_pods));

    // The floor: the same three TCP connections with a bare relay in each ztunnel's place (capture off).
    let (relays, [relay_sink, relay_echo]) = start_relays(
        &lab,
        &client,
        &server,
        [(6001, 7001, sink.addr.port()), (6003, 7003, echo_direct.addr.port())],
        o.relay_spin,
    )?;
    // What the relays say they poll, so that the JSON reports the floor that was measured.
    let relay_spin_us = relays
        .iter()
        .map(|r| {
            let log = r.log();
            let us = log.split("busy-polling ").nth(1).and_then(|t| t.split(' ').next()?.parse::<u64>().ok());
            us.with_context(|| format!("a relay's polling window is not in its log: {log:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(
        relay_spin_us.iter().all(|us| *us == relay_spin_us[0]),
        "the relays poll differently: {relay_spin_us:?}"
    );

    let mesh_meters = Meters { pods: [&client.netns, &server.netns], proxies: vec![zpid(0), zpid(1)] };
    let direct_meters = Meters { pods: [&client.netns, &server.netns], proxies: Vec::new() };
    let relay_meters =
        Meters { pods: [&client.netns, &server.netns], proxies: relays.iter().map(crate::proc::Proc::pid).collect() };
    let peer_meters =
        peer.as_ref().map(|pp| Meters { pods: [&pp.client.netns, &pp.server.netns], proxies: vec![zpid(2), zpid(3)] });
    // Loaded before the rounds, so that a kernel without sockmap fails the run at once.
    let mut shortcut = if o.sockmap { Some(crate::sockmap::Shortcut::load()?) } else { None };
    let (mut m, mut d, mut f, mut p) = (Figures::default(), Figures::default(), Figures::default(), Figures::default());
    let (mut k, mut c, mut w) = (Figures::default(), Figures::default(), Figures::default());
    let mut captured = true;
    // Every path goes first equally often; the last round ends with the mesh (the memory figure needs it).
    let mut paths = vec![Path::Direct, Path::Relay];
    if peer_meters.is_some() {
        paths.push(Path::Peer);
    }
    if shortcut.is_some() {
        paths.push(Path::Sockmap);
    }
    if echo_captured.is_some() {
        paths.push(Path::Captured);
    }
    if waypoint.is_some() {
        paths.push(Path::Waypoint);
    }
    paths.push(Path::Mesh);
    let rounds = o.rounds.max(1).div_ceil(paths.len()) * paths.len();
    for r in 0..rounds {
        let mut order = paths.clone();
        order.rotate_left((rounds - 1 - r) % paths.len());
        for path in order {
            // The mesh's paths run with the pods captured, the others without.
            let mesh = matches!(path, Path::Mesh | Path::Waypoint);
            if path != Path::Peer && mesh != captured {
                for p in [&client, &server] {
                    if mesh { lab.capture(p) } else { lab.uncapture(p) }.map_err(cni_err)?;
                }
                captured = mesh;
            }
            match path {
                Path::Mesh => {
                    progress(&format!(
                        "  round {}/{rounds}, mesh: client (node1) → ztunnel → HBONE → ztunnel → server (node2)",
                        r + 1
                    ));
                    measure(&mesh_meters, sink.addr, echo.addr, o, &mut m, progress)?;
                }
                Path::Waypoint => {
                    let Some((_, wp_sink, wp_echo)) = &waypoint else { continue };
                    progress(&format!(
                        "  round {}/{rounds}, waypoint: client (node1) → ztunnel → waypoint (node2) → ztunnel → server",
                        r + 1
                    ));
                    measure(&mesh_meters, *wp_sink, *wp_echo, o, &mut w, progress)?;
                }
                Path::Direct => {
                    progress(&format!("  round {}/{rounds}, direct: the same pods with capture switched off", r + 1));
                    measure(&direct_meters, sink.addr, echo_direct.addr, o, &mut d, progress)?;
                }
                Path::Relay => {
                    progress(&format!(
                        "  round {}/{rounds}, floor: the mesh's three TCP connections through a bare relay",
                        r + 1
                    ));
                    measure(&relay_meters, relay_sink, relay_echo, o, &mut f, progress)?;
                }
                Path::Peer => {
                    let (Some(pp), Some(meters)) = (&peer, &peer_meters) else { continue };
                    progress(&format!(
                        "  round {}/{rounds}, peer: the same path through the peer's ztunnels (node3 → node4)",
                        r + 1
                    ));
                    measure(meters, pp.sink.addr, pp.echo.addr, o, &mut p, progress)?;
                }
                Path::Captured => {
                    let Some(echo_c) = &echo_captured else { continue };
                    progress(&format!(
                        "  round {}/{rounds}, captured floor: the floor's relays behind the pods' capture rules",
                        r + 1
                    ));
                    // Started each round: the relays take the ports that ztunnel holds while the pods are
                    // captured.
                    let (rules, relays) = start_captured(
                        &lab,
                        &client,
                        &server,
                        [(sink.addr, 7101), (echo_c.addr, 7104)],
                        r + 1,
                        o.relay_spin,
                    )?;
                    let meters = Meters {
                        pods: [&client.netns, &server.netns],
                        proxies: relays.iter().map(crate::proc::Proc::pid).collect(),
                    };
                    measure(&meters, sink.addr, echo_c.addr, o, &mut c, progress)?;
                    drop(relays);
                    drop(rules);
                }
                Path::Sockmap => {
                    let Some(s) = shortcut.as_mut() else { continue };
                    progress(&format!(
                        "  round {}/{rounds}, sockmap: the floor with its in-pod legs short-cut by sk_msg",
                        r + 1
                    ));
                    for pod in [&client, &server] {
                        s.enable(&pod.netns)?;
                    }
                    // Phase by phase: one that fails is recorded and the others still run. Its bulk phase
                    // can fail, as docs/performance.md says; it goes last, and whatever it left queued drains before
                    // the next path's turn.
                    for phase in [Phase::RoundTrip, Phase::Connect, Phase::Paced, Phase::Bulk] {
                        if !o.runs(phase) {
                            continue;
                        }
                        let one = MeshOpts { phases: vec![phase], ..o.clone() };
                        if let Err(e) = measure(&relay_meters, relay_sink, relay_echo, &one, &mut k, progress) {
                            progress(&format!("      {phase:?} failed: {e:#}"));
                            k.failures.push(format!("round {}, {phase:?}: {e:#}", r + 1));
                        }
                    }
                    relay_meters.settle()?;
                    for pod in [&client, &server] {
                        s.disable(&pod.netns)?;
                    }
                }
            }
        }
    }
    drop(relays);
    drop(shortcut);
    for x in [&mut m, &mut d, &mut f, &mut p, &mut k, &mut c, &mut w] {
        x.finish();
    }
    let mesh_cpu: f64 = m.cost.iter().map(Cost::cpu_s).sum();
    // Null without a bulk phase (--phase), as every other per-unit figure.
    let cpu_per_gib = if m.bytes > 0 { mesh_cpu / (m.bytes as f64 / (1u64 << 30) as f64) } else { f64::NAN };
    if m.bytes > 0 {
        progress(&format!(
            "  ztunnel CPU: {cpu_per_gib:.2} s per GiB (both ztunnels, every mesh run incl. latency and connects)"
        ));
    }
    let breakdown = breakdown(&d, &m);
    progress(&format!(
        "  where the work goes: packets per connection {} direct, {} mesh; per 1 B/1 KiB round trip {} / {}; \
         ztunnel CPU {} s per GiB in bulk, {} µs per round trip, {} µs per connection (kernel {} / {} / {})",
        breakdown["packets_per_connection"]["direct"],
        breakdown["packets_per_connection"]["mesh"],
        breakdown["packets_per_round_trip"]["direct"],
        breakdown["packets_per_round_trip"]["mesh"],
        breakdown["ztunnel_cpu"]["bulk_s_per_gib"],
        breakdown["ztunnel_cpu"]["round_trip_us"],
        breakdown["ztunnel_cpu"]["connection_us"],
        breakdown["ztunnel_cpu"]["kernel_share"]["bulk"],
        breakdown["ztunnel_cpu"]["kernel_share"]["round_trip"],
        breakdown["ztunnel_cpu"]["kernel_share"]["connection"],
    ));

    progress(&format!("  {} idle connections through the mesh…", o.idle_conns));
    let held = load::hold_idle(&client.netns, echo.addr, o.idle_conns)?;
    std::thread::sleep(Duration::from_millis(500));
    let (r0, r1) = (load::proc_usage(zpid(0))?.0, load::proc_usage(zpid(1))?.0);
    progress(&format!("    ztunnel RSS: node1 {r0:.1} MiB, node2 {r1:.1} MiB"));
    drop(held);
    // The peer's memory under the same idle connections.
    let peer_rss = match &peer {
        Some(pp) => {
            let held = load::hold_idle(&pp.client.netns, pp.echo.addr, o.idle_conns)?;
            std::thread::sleep(Duration::from_millis(500));
            let rss = load::proc_usage(zpid(2))?.0.max(load::proc_usage(zpid(3))?.0);
            progress(&format!("    peer ztunnel RSS: {rss:.1} MiB"));
            drop(held);
            Some(rss)
        }
        None => None,
    };

    let (dt, dr, dc) = d.json();
    let (mt, mr, mc) = m.json();
    let (ft, fr, fc) = f.json();
    let (floor_cpu, floor_kernel) = f.cost[BULK].cpu_per_unit();
    let (floor_rr, floor_conn) = (f.cost[RR].cpu_per_unit().0, f.cost[CONNECT].cpu_per_unit().0);
    // What the bare relays reach: the bound of the in-pod design on this machine, and how close the mesh
    // comes to it (and the mesh's added 1 B p50 less the floor's, both against direct).
    let mut mesh_of_floor = m.of(&f);
    mesh_of_floor.insert("added_rr_1b_us_p50_over_floor".into(), json!(round(m.rr(0, 50.0) - f.rr(0, 50.0), 1)));
    let mut floor = f.against(&d);
    floor.extend([
        ("relay_cpu_s_per_gib".to_string(), json!(round(floor_cpu, 2))),
        ("relay_kernel_share".to_string(), json!(round(floor_kernel, 2))),
        ("relay_cpu_round_trip_us".to_string(), json!(round(floor_rr * 1e6, 1))),
        ("relay_cpu_connection_us".to_string(), json!(round(floor_conn * 1e6, 1))),
        ("relay_spin_us".to_string(), json!(relay_spin_us[0])),
        ("mesh_of_floor".to_string(), Value::Object(mesh_of_floor)),
    ]);
    drop(extra);
    // The peer beside the mesh, measured in the same rounds; null without a peer.
    let with_peer = |v: Value| if peer_meters.is_some() { v } else { Value::Null };
    let (pt, pr, pc) = p.json();
    let peer = with_peer(json!({
        "ratios": p.against(&d),
        "of_floor": p.of(&f),
        "rss_mib_conns_1000": peer_rss.map(|r| round(r, 1)),
        "mesh_of_peer": m.of(&p),
        // What `peer_sysctls` set in the peer's pods, as read back from them.
        "sysctls": peer_sysctls,
        "without_lo_route": o.peer_without_lo_route,
        // The client and server apps' MSS on each path's connection (TCP_MAXSEG, `ss`).
        "app_mss": { "mesh": [mss_mesh.0, mss_mesh.1], "peer": mss_peer.map(|(c, s)| [c, s]) },
    }));
    // The floor with the sockmap short-cut, over the floor: the experiment's outcome (issue 16 asks for a
    // 25% lift of the floor's throughput or round trip before it is built into Ambit). Null unless measured.
    let with_sockmap = |v: Value| if o.sockmap { v } else { Value::Null };
    let (kt, kr, kc) = k.json();
    let sockmap = with_sockmap({
        let of_floor = k.of(&f);
        // Throughput up, or the round trip's time down, by a quarter (from the unrounded figures; a figure
        // that no run produced, NaN, lifts nothing).
        let lifts = k.tp(0) >= 1.25 * f.tp(0) || k.tp(1) >= 1.25 * f.tp(1) || k.rr(0, 50.0) <= 0.8 * f.rr(0, 50.0);
        // Proof that the short-cut was in effect: its in-pod legs take no packets per exchange.
        let packets = json!({
            "floor": round(f.cost[RR].packets_per_unit(), 1),
            "sockmap": round(k.cost[RR].packets_per_unit(), 1),
        });
        json!({
            "of_floor": of_floor,
            "ratios": k.against(&d),
            "lifts_floor_by_25_percent": lifts,
            "packets_per_round_trip": packets,
            // What the short-cut costs in socket memory: the kernel queues redirected bytes on the receiving
            // socket without a window, so a sender that outruns its receiver piles them up there.
            "tcp_mem_peak_mib": {"floor": round(f.tcp_mem_peak_mib, 0), "sockmap": round(k.tcp_mem_peak_mib, 0)},
            "failures": k.failures,
        })
    });
    if o.sockmap {
        progress(&format!(
            "  sockmap over the floor: throughput {}× (1 stream), {}× (8), 1 B round trip p50 {}×, connection rate {}×: {}",
            sockmap["of_floor"]["throughput_1"],
            sockmap["of_floor"]["throughput_8"],
            sockmap["of_floor"]["rr_1b_p50"],
            sockmap["of_floor"]["connect_rate"],
            if sockmap["lifts_floor_by_25_percent"] == json!(true) {
                "lifts the floor by 25% or more"
            } else {
                "lifts the floor by less than 25%"
            }
        ));
    }
    // The captured floor: what the capture rules add to the floor, and how close the mesh comes to it. The
    // relays really were behind the rules: each exchange crossed their three connections, as the floor's do.
    let with_captured = |v: Value| if o.captured_floor { v } else { Value::Null };
    if o.captured_floor && o.runs(Phase::RoundTrip) {
        let (floor, captured) = (f.cost[RR].packets_per_unit(), c.cost[RR].packets_per_unit());
        anyhow::ensure!(
            captured >= 0.8 * floor,
            "the captured floor's round trips sent {captured:.1} packets each, the floor's {floor:.1}: \
             the capture rules did not send them through the relays"
        );
    }
    let (ct, cr, cc) = c.json();
    let captured_floor = with_captured({
        let mut of_floor = c.of(&f);
        of_floor.insert("added_rr_1b_us_p50".into(), json!(round(c.rr(0, 50.0) - f.rr(0, 50.0), 1)));
        let mut mesh_of = m.of(&c);
        mesh_of.insert("added_rr_1b_us_p50".into(), json!(round(m.rr(0, 50.0) - c.rr(0, 50.0), 1)));
        json!({
            "ratios": c.against(&d),
            "of_floor": of_floor,
            "mesh_of_captured_floor": mesh_of,
            "packets_per_round_trip": {
                "floor": round(f.cost[RR].packets_per_unit(), 1),
                "captured_floor": round(c.cost[RR].packets_per_unit(), 1),
            },
        })
    });
    if o.captured_floor {
        progress(&format!(
            "  captured floor over the floor: throughput {}× (1 stream), 1 B round trip p50 +{} µs, connection \
             rate {}×; the mesh over the captured floor: throughput {}×, p50 +{} µs, connection rate {}×",
            captured_floor["of_floor"]["throughput_1"],
            captured_floor["of_floor"]["added_rr_1b_us_p50"],
            captured_floor["of_floor"]["connect_rate"],
            captured_floor["mesh_of_captured_floor"]["throughput_1"],
            captured_floor["mesh_of_captured_floor"]["added_rr_1b_us_p50"],
            captured_floor["mesh_of_captured_floor"]["connect_rate"],
        ));
    }
    // The waypoint path over the mesh path: what the extra hop costs (the ztunnels' CPU; the stand-in's own
    // is not counted). Null unless measured.
    let measured_waypoint = waypoint.is_some();
    drop(waypoint);
    let with_waypoint = |v: Value| if measured_waypoint { v } else { Value::Null };
    let (wt, wr, wc) = w.json();
    let waypoint_report = with_waypoint({
        let mut of_mesh = w.of(&m);
        of_mesh.insert("added_rr_1b_us_p50".into(), json!(round(w.rr(0, 50.0) - m.rr(0, 50.0), 1)));
        json!({"ratios": w.against(&d), "of_mesh": of_mesh})
    });
    if measured_waypoint {
        progress(&format!(
            "  waypoint path over the mesh path: throughput {}× (1 stream), 1 B round trip p50 +{} µs, connection \
             rate {}×",
            waypoint_report["of_mesh"]["throughput_1"],
            waypoint_report["of_mesh"]["added_rr_1b_us_p50"],
            waypoint_report["of_mesh"]["connect_rate"],
        ));
    }
    // The rate phase: every path's points, the mesh's over the peer's, and the highest rate each path answered
    // with a p99 under 10 ms.
    let n = o.contention;
    let mut rate: Vec<Value> = Vec::new();
    let mut max_rps = serde_json::Map::new();
    let named: [(&str, &Figures, bool); 7] = [
        ("direct", &d, true),
        ("floor", &f, true),
        ("mesh", &m, true),
        ("peer", &p, peer_meters.is_some()),
        ("sockmap", &k, o.sockmap),
        ("captured_floor", &c, echo_captured.is_some()),
        ("waypoint", &w, measured_waypoint),
    ];
    for (name, fig, _) in named.into_iter().filter(|x| x.2) {
        rate.extend(fig.rate_json(name, n));
        if !fig.rate.is_empty() {
            max_rps.insert(name.into(), json!(fig.max_rps_p99_under_10ms().map(|r| round(r, 0))));
        }
    }
    let rate_of_peer = with_peer(json!(rate_mesh_of_peer(&m, &p, n)));
    if !m.rate.is_empty() {
        for e in rate.iter().filter(|e| e["path"] == "mesh" || e["path"] == "peer") {
            progress(&format!(
                "  rate {} req/s over {} conns{} — {}: p50 {} µs, p99 {} µs, {} vCPU per 1,000 req/s",
                e["target_rps"],
                e["connections"],
                if e["contention"] != 0 { format!(", {} busy processes", e["contention"]) } else { String::new() },
                e["path"],
                e["latency_us"]["p50"],
                e["latency_us"]["p99"],
                e["vcpu_per_krps"],
            ));
        }
    }
    // The proxies' CPU per unit of work, for every path that has proxies.
    let cpu = Figures::cpu_json;
    Ok(json!({
        "rate": rate,
        "rate_mesh_of_peer": rate_of_peer,
        "rate_max_rps_p99_under_10ms": max_rps,
        "contention": n,
        "rounds": rounds,
        "ztunnel_binaries": ztunnel_binaries,
        "paths": paths.iter().map(|p| format!("{p:?}").to_lowercase()).collect::<Vec<_>>(),
        "throughput_gbps": {"direct": dt, "mesh": mt, "floor": ft, "peer": with_peer(pt), "sockmap": with_sockmap(kt), "captured_floor": with_captured(ct), "waypoint": with_waypoint(wt)},
        "rr_latency_us": {"direct": dr, "mesh": mr, "floor": fr, "peer": with_peer(pr), "sockmap": with_sockmap(kr), "captured_floor": with_captured(cr), "waypoint": with_waypoint(wr)},
        "connect": {"direct": dc, "mesh": mc, "floor": fc, "peer": with_peer(pc), "sockmap": with_sockmap(kc), "captured_floor": with_captured(cc), "waypoint": with_waypoint(wc)},
        "cpu_per_unit": {
            "mesh": cpu(&m),
            "floor": cpu(&f),
            "peer": with_peer(cpu(&p)),
            "sockmap": with_sockmap(cpu(&k)),
            "captured_floor": with_captured(cpu(&c)),
            "waypoint": with_waypoint(cpu(&w)),
        },
        "waypoint": waypoint_report,
        "peer": peer,
        "sockmap": sockmap,
        "captured_floor": captured_floor,
        "ztunnel_rss_mib": {"idle_100_pods": round(rss_idle, 1), "conns_1000": round(r0.max(r1), 1), "conns_1000_by_node": [round(r0, 1), round(r1, 1)]},
        "ztunnel_cpu_s_per_gib": round(cpu_per_gib, 2),
        "breakdown": breakdown,
        "ratios": m.against(&d),
        "floor": floor,
    }))
}

/// Where the work goes, per phase: packets on the path (both paths) and the ztunnels' CPU with its kernel
/// share (mesh). With busy polling on, the per-round-trip and per-connection CPU includes the polling.
fn breakdown(d: &Figures, m: &Figures) -> Value {
    let ztunnel_cpu = m.cpu_json();
    json!({
        "packets_per_connection": {
            "direct": round(d.cost[CONNECT].packets_per_unit(), 1),
            "mesh": round(m.cost[CONNECT].packets_per_unit(), 1),
        },
        "packets_per_round_trip": {
            "direct": round(d.cost[RR].packets_per_unit(), 1),
            "mesh": round(m.cost[RR].packets_per_unit(), 1),
        },
        "packets_per_mib": {
            "direct": round(d.cost[BULK].packets_per_unit() / 1024.0, 1),
            "mesh": round(m.cost[BULK].packets_per_unit() / 1024.0, 1),
        },
        "ztunnel_cpu": ztunnel_cpu,
    })
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
