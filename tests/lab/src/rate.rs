//! Open-loop load at a fixed request rate, as fortio runs Istio's data-plane benchmarks: requests leave on a
//! schedule that does not wait for the answers, spread over a number of connections, and each request's
//! latency is counted from the moment it was due. A slow path then shows as queueing latency, not as a lower
//! rate (the coordinated-omission mistake of a closed loop, which sends the next request only once the last
//! answer is in).
//!
//! One thread sends (request `i` goes on connection `i mod N` at `t0 + i / rate`) and one receives, polling
//! every connection: answers on a connection come back in order, so the `k`-th answer on connection `c` is
//! request `k·N + c`, and its due time is known without the sender telling.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use crate::Netns;

/// One open-loop run.
#[derive(Debug, Clone, Copy)]
pub struct RateOpts {
    /// Requests per second, over all connections.
    pub rps: f64,
    pub connections: usize,
    /// Bytes of each request, and of each answer (the server echoes).
    pub size: usize,
    pub secs: f64,
}

/// What a run measured.
#[derive(Debug, Default)]
pub struct RateRun {
    /// Requests sent and answers received in full.
    pub sent: usize,
    pub done: usize,
    /// From the first request's due time to the last answer (at least the run's nominal length).
    pub secs: f64,
    /// Each answered request's latency from its due time, µs.
    pub latencies_us: Vec<f64>,
}

impl RateRun {
    pub fn achieved_rps(&self) -> f64 {
        self.done as f64 / self.secs.max(1e-9)
    }
}

/// How long the receiver waits for the last answers once the schedule is over.
const GRACE: Duration = Duration::from_secs(2);

/// Runs `o` from inside `ns` against the echo server at `echo`.
pub fn open_loop(ns: &Netns, echo: SocketAddr, o: &RateOpts) -> anyhow::Result<RateRun> {
    anyhow::ensure!(o.rps > 0.0 && o.connections > 0 && o.size > 0, "a rate, connections and a size");
    let n = o.connections;
    let conns: Vec<TcpStream> = ns.run(move || {
        (0..n)
            .map(|_| {
                let c = TcpStream::connect_timeout(&echo, Duration::from_secs(5))?;
                c.set_nodelay(true)?;
                Ok(c)
            })
            .collect::<std::io::Result<Vec<_>>>()
    })??;
    let readers = conns.iter().map(TcpStream::try_clone).collect::<std::io::Result<Vec<_>>>()?;
    let total = ((o.rps * o.secs).round() as usize).max(1);
    let interval = Duration::from_secs_f64(1.0 / o.rps);
    // Time for the connections' first packets to settle before the schedule starts.
    let t0 = Instant::now() + Duration::from_millis(20);
    let due = move |i: usize| t0 + interval.mul_f64(i as f64);
    let size = o.size;
    let sender = std::thread::spawn(move || -> std::io::Result<usize> {
        let request = vec![b'r'; size];
        let mut conns = conns;
        for i in 0..total {
            let at = due(i);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            conns[i % n].write_all(&request)?;
        }
        Ok(total)
    });
    let receiver = std::thread::spawn(move || -> std::io::Result<(usize, Instant, Vec<f64>)> {
        let mut readers = readers;
        let mut got = vec![0usize; n];
        let mut latencies = Vec::with_capacity(total);
        let mut buf = vec![0u8; 64 * 1024];
        let deadline = due(total) + GRACE;
        let mut last = t0;
        while latencies.len() < total && Instant::now() < deadline {
            let mut fds: Vec<nix::poll::PollFd> =
                readers.iter().map(|r| nix::poll::PollFd::new(r.as_fd(), nix::poll::PollFlags::POLLIN)).collect();
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10u16)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
            let ready: Vec<usize> = fds
                .iter()
                .enumerate()
                .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
                .map(|(i, _)| i)
                .collect();
            drop(fds);
            for c in ready {
                let read = readers[c].read(&mut buf)?;
                if read == 0 {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the echo server closed"));
                }
                let now = Instant::now();
                let before = got[c] / size;
                got[c] += read;
                for k in before..got[c] / size {
                    let i = k * n + c;
                    latencies.push(now.saturating_duration_since(due(i)).as_secs_f64() * 1e6);
                    last = now;
                }
            }
        }
        Ok((latencies.len(), last, latencies))
    });
    let sent = sender.join().map_err(|_| anyhow::anyhow!("the sender panicked"))??;
    let (done, last, latencies_us) = receiver.join().map_err(|_| anyhow::anyhow!("the receiver panicked"))??;
    let secs = last.saturating_duration_since(t0).as_secs_f64().max(o.secs);
    Ok(RateRun { sent, done, secs, latencies_us })
}

/// CPU-bound processes at normal priority, for as long as this lives: a busy node's other workloads.
pub struct Contention {
    children: Vec<std::process::Child>,
}

impl Contention {
    pub fn start(n: usize) -> anyhow::Result<Contention> {
        let mut children = Vec::with_capacity(n);
        for _ in 0..n {
            children.push(std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn()?);
        }
        Ok(Contention { children })
    }
}

impl Drop for Contention {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
