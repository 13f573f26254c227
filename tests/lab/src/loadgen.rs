//! `lab load`: many concurrent connections through one node's ztunnel, from many enrolled pods, then all
//! closed; every byte checked, nothing refused or reset, and ztunnel's fds and memory back near where they
//! started.
//!
//! Client pods on node1, server pods on node2 (each running `lab echo`, an epoll echo server in its own
//! process, so the lab's own fd limit holds only the clients' sockets). Half the connections move data for the
//! whole hold (random sizes, each echo compared byte for byte), half stay idle and must still answer at the end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::demo::{APP_PORT, MESH_NS};
use crate::lab::{Lab, LabConfig, Pod};
use crate::proc::Proc;
use crate::soak::Rng;
use crate::util::{binary, wait_for};

/// How a load run is shaped.
#[derive(Debug, Clone)]
pub struct LoadOpts {
    /// Concurrent connections in all.
    pub connections: usize,
    /// Enrolled client pods on node1 (the connections are spread over them).
    pub pods: usize,
    /// Server pods on node2.
    pub servers: usize,
    /// How long the connections stay open once all are.
    pub hold: Duration,
    /// How many connects may be in flight at once.
    pub connect_concurrency: usize,
}

impl Default for LoadOpts {
    fn default() -> Self {
        LoadOpts { connections: 10_000, pods: 200, servers: 4, hold: Duration::from_secs(20), connect_concurrency: 256 }
    }
}

/// A ztunnel's fds and memory.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Footprint {
    /// Open fds.
    pub fds: usize,
    /// Resident memory, KiB.
    pub rss_kib: u64,
}

/// What a load run observed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    /// Connections asked for, and open at once at the peak.
    pub connections: usize,
    /// Connections that were open at the same time.
    pub concurrent: usize,
    /// Client pods and server pods.
    pub pods: (usize, usize),
    /// Seconds to open them all.
    pub open_s: f64,
    /// Round trips completed, and the bytes echoed back intact.
    pub round_trips: u64,
    /// Bytes echoed back intact.
    pub bytes: u64,
    /// Failed connections by kind (`connect refused`, `reset`, `timeout`, `echo differs`, …).
    pub failures: std::collections::BTreeMap<String, u64>,
    /// node1's and node2's ztunnel: with the pods enrolled and warmed up, at the peak, and after all closed.
    pub ztunnels: Vec<(String, Footprint, Footprint, Footprint)>,
}

/// Slack allowed over the baseline after the connections closed: this fraction, plus a few fds or KiB.
pub const SETTLE_FRACTION: f64 = 0.05;

/// Judges a load run: each broken promise as a line; empty when it passed.
pub fn verdict(r: &LoadReport) -> Vec<String> {
    let mut bad = Vec::new();
    for (kind, n) in &r.failures {
        bad.push(format!("{n} connection(s) failed: {kind}"));
    }
    if r.concurrent < r.connections {
        bad.push(format!("only {} of {} connections were open at once", r.concurrent, r.connections));
    }
    for (name, base, _, after) in &r.ztunnels {
        if after.fds as f64 > base.fds as f64 * (1.0 + SETTLE_FRACTION) + 4.0 {
            bad.push(format!("{name}: {} fds after the load, {} before", after.fds, base.fds));
        }
        if after.rss_kib as f64 > base.rss_kib as f64 * (1.0 + SETTLE_FRACTION) + 512.0 {
            bad.push(format!("{name}: {} KiB resident after the load, {} before", after.rss_kib, base.rss_kib));
        }
    }
    if r.round_trips == 0 {
        bad.push("no data moved".into());
    }
    bad
}

/// The footprint of process `pid`.
pub fn footprint(pid: u32) -> Footprint {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()))
        .unwrap_or(0);
    Footprint { fds, rss_kib }
}

/// Raises this process's soft limit on open files to its hard limit; returns the limit.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return 0 };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// `lab echo`: an echo server for the load (internal). Prints `ready` once listening.
pub fn serve_echo(listen: SocketAddr) -> anyhow::Result<()> {
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
        println!("ready");
        loop {
            let (mut s, _) = match l.accept().await {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    })
}

/// The counters the connection tasks share.
#[derive(Default)]
struct Tally {
    open: AtomicU64,
    done_opening: AtomicU64,
    round_trips: AtomicU64,
    bytes: AtomicU64,
    failures: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Tally {
    fn fail(&self, kind: String) {
        *self.failures.lock().unwrap().entry(kind).or_default() += 1;
    }
}

fn kind_of(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "refused".into(),
        std::io::ErrorKind::ConnectionReset => "reset".into(),
        std::io::ErrorKind::UnexpectedEof => "closed early".into(),
        std::io::ErrorKind::TimedOut => "timeout".into(),
        k => format!("{k:?}"),
    }
}

async fn round_trip(s: &mut tokio::net::TcpStream, data: &[u8], back: &mut Vec<u8>) -> Result<(), String> {
    let io = async {
        s.write_all(data).await?;
        back.resize(data.len(), 0);
        s.read_exact(back).await.map(|_| ())
    };
    match tokio::time::timeout(Duration::from_secs(30), io).await {
        Err(_) => Err("timeout".into()),
        Ok(Err(e)) => Err(kind_of(&e)),
        Ok(Ok(())) if back.as_slice() != data => Err("echo differs".into()),
        Ok(Ok(())) => Ok(()),
    }
}

/// One connection's life: open and greet, wait for `go`, move data (active) or wait (idle) until `stop`,
/// a last round trip, then close and expect a clean end of stream.
async fn connection(
    sock: tokio::net::TcpSocket,
    addr: SocketAddr,
    active: bool,
    seed: u64,
    tally: Arc<Tally>,
    permits: Arc<tokio::sync::Semaphore>,
    mut go: tokio::sync::watch::Receiver<u8>,
) {
    let mut rng = Rng::new(seed);
    let mut back = Vec::new();
    let opened = async {
        let _permit = permits.acquire().await.map_err(|_| "closed".to_string())?;
        let mut s = match tokio::time::timeout(Duration::from_secs(30), sock.connect(addr)).await {
            Err(_) => return Err("connect timeout".to_string()),
            Ok(Err(e)) => return Err(format!("connect {}", kind_of(&e))),
            Ok(Ok(s)) => s,
        };
        let _ = s.set_nodelay(true);
        round_trip(&mut s, &bytes(&mut rng, 64), &mut back).await?;
        Ok(s)
    }
    .await;
    tally.done_opening.fetch_add(1, Ordering::Relaxed);
    let mut s = match opened {
        Ok(s) => s,
        Err(k) => return tally.fail(k),
    };
    tally.open.fetch_add(1, Ordering::Relaxed);
    let _ = go.wait_for(|v| *v >= 1).await;
    let mut moved = (0u64, 0u64);
    if active {
        while *go.borrow() < 2 {
            let data = bytes(&mut rng, 16 * 1024);
            if let Err(k) = round_trip(&mut s, &data, &mut back).await {
                return tally.fail(k);
            }
            moved.0 += 1;
            moved.1 += data.len() as u64;
        }
    } else {
        let _ = go.wait_for(|v| *v >= 2).await;
    }
    let last = bytes(&mut rng, 64);
    if let Err(k) = round_trip(&mut s, &last, &mut back).await {
        return tally.fail(format!("{k} (at the end, {})", if active { "active" } else { "idle" }));
    }
    let _ = s.shutdown().await;
    let mut rest = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(30), s.read(&mut rest)).await {
        Ok(Ok(0)) => {}
        Ok(Ok(_)) => return tally.fail("bytes after the end".into()),
        Ok(Err(e)) => return tally.fail(format!("{} at close", kind_of(&e))),
        Err(_) => return tally.fail("no end of stream".into()),
    }
    tally.round_trips.fetch_add(moved.0 + 2, Ordering::Relaxed);
    tally.bytes.fetch_add(moved.1 + 64 + last.len() as u64, Ordering::Relaxed);
}

fn bytes(rng: &mut Rng, max: u64) -> Vec<u8> {
    let n = 1 + rng.below(max) as usize;
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

/// Runs the load on a fresh two-node lab.
pub fn run(opts: &LoadOpts, progress: &mut dyn std::io::Write) -> anyhow::Result<LoadReport> {
    let limit = raise_fd_limit();
    anyhow::ensure!(
        limit as usize > opts.connections + 1024,
        "this process may open {limit} files: too few for {} connections (raise the hard limit)",
        opts.connections
    );
    let mut say = |s: String| {
        let _ = writeln!(progress, "{s}");
        let _ = progress.flush();
    };
    let lab = Lab::start(LabConfig {
        enrolled_namespaces: vec![MESH_NS.into()],
        ztunnel_env: vec![("POOL_UNUSED_RELEASE_TIMEOUT".into(), format!("{}s", POOL_IDLE.as_secs()))],
        ..Default::default()
    })?;
    let t = Instant::now();
    let servers: Vec<Pod> = (0..opts.servers)
        .map(|i| lab.create_pod(1, MESH_NS, &format!("server-{i}"), "server"))
        .collect::<Result<_, _>>()?;
    let clients = create_many(&lab, opts.pods)?;
    let all: Vec<&Pod> = servers.iter().chain(&clients).collect();
    lab.publish_all(&all)?;
    let _echoes: Vec<Proc> = servers
        .iter()
        .map(|p| {
            let mut cmd = p.netns.command(binary("lab"));
            cmd.arg("echo").arg("--listen").arg(SocketAddr::new(p.ip, APP_PORT).to_string());
            let proc = Proc::spawn("lab-echo", cmd, &lab.dir.join(format!("echo-{}.log", p.name)))?;
            wait_for("the echo server", Duration::from_secs(10), || proc.log().contains("ready").then_some(()))?;
            Ok(proc)
        })
        .collect::<anyhow::Result<_>>()?;
    say(format!(
        "lab {}: {} client pods on node1, {} servers on node2, in {:.1} s",
        lab.id,
        clients.len(),
        servers.len(),
        t.elapsed().as_secs_f64()
    ));

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let zpids: Vec<(String, u32)> = lab
        .nodes
        .iter()
        .map(|n| (format!("{} ztunnel", n.name), n.ztunnel.as_ref().map(|z| z.pid()).unwrap_or(0)))
        .collect();
    let now = || -> Vec<Footprint> { zpids.iter().map(|(_, p)| footprint(*p)).collect() };
    // Warm up (one connection from every client pod to every server: certificates, pools, lazily built
    // state), then let the pooled HBONE connections close (POOL_UNUSED_RELEASE_TIMEOUT) before the baseline.
    let warm = LoadOpts { connections: clients.len() * servers.len(), hold: Duration::ZERO, ..opts.clone() };
    let warm_report = drive(&rt, &clients, &servers, &warm, |_| {})?;
    anyhow::ensure!(warm_report.failures.is_empty(), "the warm-up failed: {:?}", warm_report.failures);
    let base = settle(&zpids, None);
    say(format!("baseline (pods enrolled, warmed up, pools closed): {}", describe(&zpids, &base)));

    let mut peak = base.clone();
    let mut report = drive(&rt, &clients, &servers, opts, |phase| {
        if phase == Phase::AllOpen {
            peak = now();
        }
    })?;
    say(format!(
        "{} connections open at once in {:.1} s; at the peak: {}",
        report.concurrent,
        report.open_s,
        describe(&zpids, &peak)
    ));
    // All closed: once the pools have let their connections go, fds and memory come back.
    let after = settle(&zpids, Some(&base));
    say(format!("after closing: {}", describe(&zpids, &after)));
    report.pods = (clients.len(), servers.len());
    report.ztunnels = zpids.iter().enumerate().map(|(i, (n, _))| (n.clone(), base[i], peak[i], after[i])).collect();
    Ok(report)
}

/// The ztunnels' footprints once the pooled connections have closed (their idle timeout in the load's lab is
/// [`POOL_IDLE`]) and, given a baseline, once they are back within bounds of it, or after a minute.
fn settle(zpids: &[(String, u32)], base: Option<&[Footprint]>) -> Vec<Footprint> {
    let now = || -> Vec<Footprint> { zpids.iter().map(|(_, p)| footprint(*p)).collect() };
    // A pool looks for idle connections every half timeout, so one closes within one and a half.
    std::thread::sleep(POOL_IDLE * 2 + Duration::from_secs(1));
    let t = Instant::now();
    loop {
        let f = now();
        let back = base.is_none_or(|base| {
            let r = LoadReport {
                ztunnels: zpids.iter().enumerate().map(|(i, (n, _))| (n.clone(), base[i], f[i], f[i])).collect(),
                round_trips: 1,
                ..Default::default()
            };
            verdict(&r).is_empty()
        });
        if back || t.elapsed() > Duration::from_secs(60) {
            return f;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The pool idle timeout of the load's ztunnels, so the baseline and the end are measured without pooled
/// connections (Istio's default is five minutes).
pub const POOL_IDLE: Duration = Duration::from_secs(5);

fn describe(z: &[(String, u32)], f: &[Footprint]) -> String {
    z.iter()
        .zip(f)
        .map(|((n, _), f)| format!("{n} {} fds, {:.1} MiB", f.fds, f.rss_kib as f64 / 1024.0))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Creates `n` client pods on node1, several at a time.
fn create_many(lab: &Lab, n: usize) -> anyhow::Result<Vec<Pod>> {
    let next = AtomicU64::new(0);
    let made = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        if i >= n {
                            return Ok(());
                        }
                        let pod = lab.create_pod(0, MESH_NS, &format!("client-{i}"), "client")?;
                        made.lock().unwrap().push(pod);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("a pod-creating thread panicked"))??;
        }
        Ok(())
    })?;
    let mut v = made.into_inner().unwrap();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(v)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AllOpen,
}

/// Opens `opts.connections` connections spread over the client pods and servers, holds them, closes them.
fn drive(
    rt: &tokio::runtime::Runtime,
    clients: &[Pod],
    servers: &[Pod],
    opts: &LoadOpts,
    mut at: impl FnMut(Phase),
) -> anyhow::Result<LoadReport> {
    let tally = Arc::new(Tally::default());
    let permits = Arc::new(tokio::sync::Semaphore::new(opts.connect_concurrency.max(1)));
    let (go_tx, go_rx) = tokio::sync::watch::channel(0u8);
    let per_pod = opts.connections.div_ceil(clients.len().max(1));
    let mut tasks = Vec::with_capacity(opts.connections);
    let t = Instant::now();
    let mut k = 0usize;
    for pod in clients {
        let n = per_pod.min(opts.connections - k);
        if n == 0 {
            break;
        }
        // Sockets are made inside the pod's netns; they stay in it wherever they are used.
        let sockets = pod
            .netns
            .run(move || (0..n).map(|_| tokio::net::TcpSocket::new_v4()).collect::<std::io::Result<Vec<_>>>())??;
        for sock in sockets {
            let server = &servers[k % servers.len()];
            let addr = SocketAddr::new(server.ip, APP_PORT);
            let fut = connection(
                sock,
                addr,
                k.is_multiple_of(2),
                0x10ad ^ k as u64,
                tally.clone(),
                permits.clone(),
                go_rx.clone(),
            );
            tasks.push(rt.spawn(fut));
            k += 1;
        }
    }
    let total = k as u64;
    wait_for("every connection to open or fail", Duration::from_secs(600), || {
        (tally.done_opening.load(Ordering::Relaxed) >= total).then_some(())
    })?;
    let open_s = t.elapsed().as_secs_f64();
    let concurrent = tally.open.load(Ordering::Relaxed) as usize;
    at(Phase::AllOpen);
    let _ = go_tx.send(1);
    std::thread::sleep(opts.hold);
    let _ = go_tx.send(2);
    rt.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
    });
    Ok(LoadReport {
        connections: opts.connections,
        concurrent,
        open_s,
        round_trips: tally.round_trips.load(Ordering::Relaxed),
        bytes: tally.bytes.load(Ordering::Relaxed),
        failures: tally.failures.lock().unwrap().clone(),
        ..Default::default()
    })
}

/// The report, human-readable.
pub fn print(r: &LoadReport, broken: &[String], out: &mut dyn std::io::Write) {
    let _ = writeln!(
        out,
        "\n{} connections ({} open at once) from {} pods on node1 to {} on node2: {} round trips, {:.1} MiB echoed intact",
        r.connections,
        r.concurrent,
        r.pods.0,
        r.pods.1,
        r.round_trips,
        r.bytes as f64 / (1 << 20) as f64
    );
    for (name, base, peak, after) in &r.ztunnels {
        let _ = writeln!(
            out,
            "  {name:<16} fds {} → {} → {}, resident {:.1} → {:.1} → {:.1} MiB (baseline → peak → after)",
            base.fds,
            peak.fds,
            after.fds,
            base.rss_kib as f64 / 1024.0,
            peak.rss_kib as f64 / 1024.0,
            after.rss_kib as f64 / 1024.0
        );
    }
    if broken.is_empty() {
        let _ = writeln!(out, "PASS: every byte echoed, no connection refused or reset, fds and memory back");
    } else {
        let _ = writeln!(out, "FAIL:");
        for b in broken {
            let _ = writeln!(out, "  - {b}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> LoadReport {
        let f = |fds, rss_kib| Footprint { fds, rss_kib };
        LoadReport {
            connections: 100,
            concurrent: 100,
            round_trips: 1000,
            bytes: 1 << 20,
            ztunnels: vec![("node1 ztunnel".into(), f(100, 20_000), f(300, 40_000), f(102, 20_500))],
            ..Default::default()
        }
    }

    #[test]
    fn a_clean_run_passes() {
        assert_eq!(verdict(&good()), Vec::<String>::new());
    }

    #[test]
    fn every_broken_promise_fails_the_run() {
        type Breaks = Box<dyn Fn(&mut LoadReport)>;
        let cases: Vec<(&str, Breaks)> = vec![
            (
                "failed: reset",
                Box::new(|r| {
                    r.failures.insert("reset".into(), 1);
                }),
            ),
            ("open at once", Box::new(|r| r.concurrent = 99)),
            ("fds after the load", Box::new(|r| r.ztunnels[0].3.fds = 120)),
            ("resident after the load", Box::new(|r| r.ztunnels[0].3.rss_kib = 30_000)),
            ("no data moved", Box::new(|r| r.round_trips = 0)),
        ];
        for (want, breaks) in cases {
            let mut r = good();
            breaks(&mut r);
            let bad = verdict(&r);
            assert_eq!(bad.len(), 1, "{want}: {bad:?}");
            assert!(bad[0].contains(want), "{want}: {bad:?}");
        }
    }
}
