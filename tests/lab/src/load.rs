//! Load for the benchmark: servers and clients on plain blocking sockets in pod namespaces (the same code for
//! the direct and the mesh runs, so only the path differs).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::netns::Netns;

/// What a server port does with a connection.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Reads everything; answers the byte count (8 bytes, big endian) at end of stream.
    Sink,
    /// Echoes back what it reads.
    Echo,
}

/// A load server: one thread per connection.
pub struct LoadServer {
    stop: Arc<AtomicBool>,
    listener: Arc<TcpListener>,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl LoadServer {
    /// Starts listening on `addr` inside `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr, mode: Mode) -> anyhow::Result<LoadServer> {
        // A backlog as deep as the kernel allows (as servers set it): a burst of connections through a proxy
        // reaches the server faster than its accept loop, and an overflowing queue would delay some of them by
        // a SYN-ACK retransmission (a second), measuring the server, not the path.
        let l = Arc::new(ns.run(move || -> std::io::Result<TcpListener> {
            let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(4096)?;
            Ok(s.into())
        })??);
        let stop = Arc::new(AtomicBool::new(false));
        let (l2, s2) = (l.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = l2.accept() else { break };
                std::thread::spawn(move || {
                    let _ = c.set_nodelay(true);
                    let mut buf = vec![0u8; 256 * 1024];
                    match mode {
                        Mode::Sink => {
                            let mut total = 0u64;
                            while let Ok(n) = c.read(&mut buf) {
                                if n == 0 {
                                    break;
                                }
                                total += n as u64;
                            }
                            let _ = c.write_all(&total.to_be_bytes());
                        }
                        Mode::Echo => {
                            while let Ok(n) = c.read(&mut buf) {
                                if n == 0 || c.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
        Ok(LoadServer { stop, listener: l, addr })
    }
}

impl Drop for LoadServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = socket2::SockRef::from(&*self.listener).shutdown(std::net::Shutdown::Both);
    }
}

fn connect(ns: &Netns, addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = ns.run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(10)))??;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

/// Bulk throughput over `streams` connections for `secs`: bits per second, and the bytes moved.
pub fn throughput(ns: &Netns, addr: SocketAddr, streams: usize, secs: f64) -> anyhow::Result<(f64, u64)> {
    let conns: Vec<TcpStream> = (0..streams).map(|_| connect(ns, addr)).collect::<Result<_, _>>()?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let buf = vec![0x5au8; 128 * 1024];
                while Instant::now() < deadline {
                    c.write_all(&buf)?;
                }
                c.shutdown(std::net::Shutdown::Write)?;
                let mut total = [0u8; 8];
                c.read_exact(&mut total).context("reading the sink's count")?;
                Ok(u64::from_be_bytes(total))
            })
        })
        .collect();
    // Every stream ends before this returns, failed or not, so nothing of this run overlaps the next.
    let (mut bytes, mut failed) = (0, None);
    for h in handles {
        match h.join().map_err(|_| anyhow::anyhow!("a stream panicked")).and_then(|r| r) {
            Ok(n) => bytes += n,
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok((bytes as f64 * 8.0 / elapsed, bytes))
}

/// `n` round trips of `size` bytes on one connection, after a warm-up; each `pace` after the last one's answer
/// (`Duration::ZERO`: back to back; a pause is traffic that waits between requests, where a proxy that
/// busy-polls spends CPU waiting). Returns sorted microseconds each.
pub fn round_trips(ns: &Netns, addr: SocketAddr, size: usize, n: usize, pace: Duration) -> anyhow::Result<Vec<f64>> {
    let mut c = connect(ns, addr)?;
    let msg = vec![0x42u8; size];
    let mut back = vec![0u8; size];
    for _ in 0..n.min(200) {
        c.write_all(&msg)?;
        c.read_exact(&mut back)?;
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        if !pace.is_zero() {
            std::thread::sleep(pace);
        }
        let t = Instant::now();
        c.write_all(&msg)?;
        c.read_exact(&mut back)?;
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    v.sort_by(f64::total_cmp);
    Ok(v)
}

/// Serial connection rate for `secs`: a new connection and a one-byte echo each. Returns connections per
/// second and sorted microseconds per connection.
pub fn connect_rate(ns: &Netns, addr: SocketAddr, secs: f64) -> anyhow::Result<(f64, Vec<f64>)> {
    let res = ns.run(move || -> anyhow::Result<(f64, Vec<f64>)> {
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(secs);
        let mut v = Vec::new();
        while Instant::now() < deadline {
            let t = Instant::now();
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
            c.set_nodelay(true)?;
            c.write_all(b"x")?;
            let mut b = [0u8; 1];
            c.read_exact(&mut b)?;
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let rate = v.len() as f64 / start.elapsed().as_secs_f64();
        v.sort_by(f64::total_cmp);
        Ok((rate, v))
    })??;
    Ok(res)
}

/// Opens `n` connections and keeps them open (idle) until dropped.
pub fn hold_idle(ns: &Netns, addr: SocketAddr, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = connect(ns, addr)?;
        c.write_all(b"x")?;
        let mut b = [0u8; 1];
        c.read_exact(&mut b)?;
        v.push(c);
    }
    Ok(v)
}

/// User and system CPU seconds a process has used (all its threads).
pub fn cpu_times(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = &stat[stat.rfind(')').context("bad stat")? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    Ok((field(11) / hz, field(12) / hz))
}

/// Packets sent on every interface of a netns (loopback included): each packet of a path inside it,
/// counted once.
pub fn packets_sent(ns: &Netns) -> anyhow::Result<u64> {
    // thread-self: /proc/net follows the netns of the process's main thread, not of this one.
    let dev = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/dev"))??;
    sum_tx_packets(&dev)
}

/// Sums the transmitted-packets column of a `/proc/net/dev` table.
fn sum_tx_packets(dev: &str) -> anyhow::Result<u64> {
    let mut total = 0;
    for line in dev.lines().skip(2) {
        let (_, counters) = line.split_once(':').with_context(|| format!("bad /proc/net/dev line {line:?}"))?;
        // Eight receive counters, then transmit: bytes, packets, ...
        let tx = counters.split_whitespace().nth(9).with_context(|| format!("short /proc/net/dev line {line:?}"))?;
        total += tx.parse::<u64>().with_context(|| format!("bad packet count in {line:?}"))?;
    }
    Ok(total)
}

/// The memory all TCP sockets of the machine hold, in pages (`/proc/net/sockstat`'s `TCP: ... mem`; one
/// count for every netns).
pub fn tcp_mem_pages() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/net/sockstat").context("reading /proc/net/sockstat")?;
    stat.lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "mem").nth(1))
        .and_then(|n| n.parse().ok())
        .context("no TCP mem in /proc/net/sockstat")
}

/// Samples [`tcp_mem_pages`] every 10 ms on a thread of its own until dropped; [`TcpMemPeak::stop`] gives the
/// highest sample in MiB.
pub struct TcpMemPeak {
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<u64>>,
}

impl TcpMemPeak {
    pub fn start() -> TcpMemPeak {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let sampler = std::thread::spawn(move || {
            let mut peak = 0;
            while !s.load(Ordering::Relaxed) {
                peak = peak.max(tcp_mem_pages().unwrap_or(0));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        });
        TcpMemPeak { stop, sampler: Some(sampler) }
    }

    pub fn stop(mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        let pages = self.sampler.take().and_then(|h| h.join().ok()).unwrap_or(0);
        pages as f64 * 4096.0 / (1 << 20) as f64
    }
}

impl Drop for TcpMemPeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A process's resident memory in MiB and its CPU seconds (user + system).
pub fn proc_usage(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    let (user, sys) = cpu_times(pid)?;
    Ok((rss_kb / 1024.0, user + sys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmitted_packets_of_every_interface_are_summed() {
        let dev = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:  328305    4001    0    0    0     0          0         0   328305    4001    0    0    0     0       0          0
  eth0: 1293817   20000    0    0    0     0          0         0   596588   17000    0    0    0     0       0          0
";
        assert_eq!(sum_tx_packets(dev).unwrap(), 21001);
        assert!(sum_tx_packets("h1\nh2\n  eth0: 1 2 3\n").is_err());
    }

    #[test]
    fn own_cpu_time_is_read() {
        let end = Instant::now() + Duration::from_millis(200);
        while Instant::now() < end {}
        let (user, sys) = cpu_times(std::process::id()).unwrap();
        assert!(user + sys >= 0.02, "{user} + {sys}");
    }
}
