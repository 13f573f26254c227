//! The data path's own work, measured in one process on one thread (`cargo bench -p ztunnel --bench
//! data_path`): no other process, no netns, no netfilter, no busy polling, no wakeup of another CPU. Every
//! party runs as a task of one current-thread runtime and every socket is on loopback, where a send delivers
//! to the receiver inline, so the thread's CPU time is all the work of a round trip or of a GiB, the
//! kernel's included. Three paths between the same client and server tasks:
//!
//! - direct: one TCP connection;
//! - relay: two bare relays ([`copy::tcp_tcp`]), so three TCP connections, as the lab bench's floor;
//! - hbone: ztunnel's client side (a CONNECT stream on an HBONE connection, [`copy::tcp_h2`]) and server side
//!   (the stream's data to a TCP connection to the server), over mutual TLS with real certificates and
//!   ztunnel's HTTP/2 settings: three TCP connections too, the middle one carrying TLS records of HTTP/2
//!   frames.
//!
//! What hbone costs beyond relay is what TLS, HTTP/2 and their copies cost per unit, apart from the lab's
//! noise: the figure issue 16's copy-free path is to lower.
//!
//! Here one thread runs every pass of a round trip back to back, so each pass finds the caches as the last
//! one left them. In the lab, other processes (the apps, the other ztunnel, the kernel's work for them) run
//! on the core between two passes. The cold round trips model that part: before each, the thread reads a
//! buffer larger than the core's L2 cache ([`EVICT_BYTES`]), which pushes the previous round trip's data and
//! code out of L1d and L2 (not out of L1i, nor the branch predictors); the thread's CPU clock times each
//! such round trip alone.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::copy;
use super::pool::PoolKey;
use crate::certs::{CertStore, LocalCa};
use crate::config::Config;
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::tls::{self, TrustRoots};

/// A path of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// One TCP connection from client to server.
    Direct,
    /// Two bare relays between them: three TCP connections.
    Relay,
    /// ztunnel's two HBONE sides between them: three TCP connections, the middle one mTLS + HTTP/2.
    Hbone,
}

/// The thread's CPU per unit on one path.
#[derive(Debug, Clone, Copy)]
pub struct PathCost {
    /// Per 1-byte round trip (the client writes a byte, the server echoes it), µs.
    pub round_trip_us: f64,
    /// The user-space part of it (the rest is the kernel's, every party's sends and receives included), µs.
    pub round_trip_user_us: f64,
    /// Per 1-byte round trip that starts with the core's data caches holding other work (see the module
    /// doc), µs.
    pub cold_round_trip_us: f64,
    /// Per GiB sent from the client to the server, in writes of 256 KiB, s.
    pub bulk_s_per_gib: f64,
}

/// What the cold round trips read before each: twice this machine's L2 (2 MiB per core on the EPYC VM;
/// 512 KiB to 2 MiB on current x86 and arm64 server cores).
pub const EVICT_BYTES: usize = 4 << 20;

/// Reads `buf` a cache line at a time.
fn evict(buf: &[u8]) {
    let mut x = 0u8;
    for line in buf.chunks(64) {
        x ^= line[0];
    }
    std::hint::black_box(x);
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// This thread's CPU time so far: user and system.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    user: Duration,
    sys: Duration,
}

impl Cpu {
    fn total(&self) -> Duration {
        self.user + self.sys
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, earlier: Cpu) -> Cpu {
        Cpu { user: self.user.saturating_sub(earlier.user), sys: self.sys.saturating_sub(earlier.sys) }
    }
}

fn thread_cpu() -> io::Result<Cpu> {
    use nix::sys::resource::{UsageWho, getrusage};
    let u = getrusage(UsageWho::RUSAGE_THREAD).map_err(io::Error::from)?;
    let d = |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    Ok(Cpu { user: d(u.user_time()), sys: d(u.system_time()) })
}

/// This thread's CPU time by its clock: one system call, to the nanosecond, so a single round trip can be
/// timed.
fn thread_clock() -> io::Result<Duration> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).map_err(io::Error::from)?;
    Ok(Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
}

async fn listener() -> io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

async fn dial(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// The server: echoes what it reads.
async fn echo_server() -> io::Result<SocketAddr> {
    let (l, addr) = listener().await?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// The server: reads to the end, then reports how much (and closes).
async fn sink_server() -> io::Result<(SocketAddr, tokio::sync::mpsc::UnboundedReceiver<u64>)> {
    let (l, addr) = listener().await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    total += n as u64;
                }
                let _ = tx.send(total);
            });
        }
    });
    Ok((addr, rx))
}

/// A bare relay in front of `to`: each connection accepted is copied to a new one to `to`.
async fn relay(to: SocketAddr) -> io::Result<SocketAddr> {
    let (l, addr) = listener().await?;
    tokio::spawn(async move {
        while let Ok((a, _)) = l.accept().await {
            let _ = a.set_nodelay(true);
            tokio::spawn(async move {
                if let Ok(b) = dial(to).await {
                    copy::tcp_tcp(&a, &b).await;
                }
            });
        }
    });
    Ok(addr)
}

/// ztunnel's two HBONE sides with one HBONE connection between them; [`Hbone::front`] opens the client
/// side's listeners.
struct Hbone {
    send: h2::client::SendRequest<Bytes>,
}

impl Hbone {
    async fn start() -> io::Result<Hbone> {
        let td = "cluster.local";
        let (ca_cert, ca_key) = crate::certs::self_signed_ca(td, "Ambit data path bench".into()).map_err(other)?;
        let ca = LocalCa::from_pem(&ca_cert, &ca_key, Duration::from_secs(3600)).map_err(other)?;
        let roots = Arc::new(TrustRoots::new(&[ca.ca_cert()], td).map_err(other)?);
        let store = CertStore::local(ca, td);
        let (client_id, server_id) = (Identity::new(td, "bench", "client"), Identity::new(td, "bench", "server"));
        store.fetch(&server_id).await.map_err(other)?;
        let client_cert = store.fetch(&client_id).await.map_err(other)?;
        let cfg = Arc::new(Config::from_vars(|_| None).map_err(other)?);

        // The server side: TLS, HTTP/2, and each stream to the address it names.
        let server_tls = Arc::new(tls::server_config(CertStore::resolver(&store, server_id.clone()), roots.clone()));
        let (l, hbone_addr) = listener().await?;
        let server_cfg = cfg.clone();
        tokio::spawn(async move {
            let Ok((tcp, _)) = l.accept().await else { return };
            let _ = tcp.set_nodelay(true);
            let Ok(tls) = tls::record::accept(server_tls, tcp).await else { return };
            let Ok(mut conn) = crate::hbone::server::handshake(tls, &server_cfg).await else { return };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                tokio::spawn(async move {
                    let Ok(to) = req.uri().to_string().parse::<SocketAddr>() else { return };
                    let Ok(app) = dial(to).await else { return };
                    let ok = Response::builder().status(StatusCode::OK).body(()).expect("static response");
                    let Ok(send) = respond.send_response(ok, false) else { return };
                    copy::tcp_h2(&app, send, req.into_body()).await;
                });
            }
        });

        // The client side: one pooled connection, as a pod's pool holds.
        let key = PoolKey { src: client_id, dst: vec![server_id], addr: hbone_addr };
        let (send, _closed) = crate::hbone::client::connect(
            dial(hbone_addr).await?,
            &client_cert.certified,
            &key,
            &roots,
            &cfg,
            &Metrics::new(),
        )
        .await
        .map_err(|(stage, what, e)| other(format!("{stage:?}: {what} {hbone_addr}: {e}")))?;
        Ok(Hbone { send })
    }

    /// A listener whose connections go to `to` as CONNECT streams.
    async fn front(&self, to: SocketAddr) -> io::Result<SocketAddr> {
        let (l, addr) = listener().await?;
        let send = self.send.clone();
        tokio::spawn(async move {
            while let Ok((tcp, peer)) = l.accept().await {
                let _ = tcp.set_nodelay(true);
                let send = send.clone();
                tokio::spawn(async move {
                    let Ok(mut send) = send.ready().await else { return };
                    let req = crate::hbone::client::connect_request(to, peer, None, "bench", "client");
                    let Ok((resp, stream)) = send.send_request(req, false) else { return };
                    let Ok(resp) = resp.await else { return };
                    if resp.status() == StatusCode::OK {
                        copy::tcp_h2(&tcp, stream, resp.into_body()).await;
                    }
                });
            }
        });
        Ok(addr)
    }
}

async fn round_trip(c: &mut TcpStream) -> io::Result<()> {
    let mut byte = [1u8];
    c.write_all(&byte).await?;
    c.read_exact(&mut byte).await.map(|_| ())
}

/// Measures `path`: `round_trips` 1-byte round trips on one connection, then `bulk_bytes` sent on another
/// (timed until the server has read them all). Each after a warm-up on its connection.
pub fn bench_data_path(path: DataPath, round_trips: usize, bulk_bytes: u64) -> io::Result<PathCost> {
    // The allocator as the proxy runs it (freed buffers kept while traffic flows).
    crate::heap::tune_allocator();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let echo = echo_server().await?;
        let (sink, mut done) = sink_server().await?;
        let (echo, sink) = match path {
            DataPath::Direct => (echo, sink),
            DataPath::Relay => (relay(relay(echo).await?).await?, relay(relay(sink).await?).await?),
            DataPath::Hbone => {
                let h = Hbone::start().await?;
                (h.front(echo).await?, h.front(sink).await?)
            }
        };

        let mut c = dial(echo).await?;
        for _ in 0..round_trips / 10 + 10 {
            round_trip(&mut c).await?;
        }
        let t0 = thread_cpu()?;
        for _ in 0..round_trips {
            round_trip(&mut c).await?;
        }
        let rt_cpu = thread_cpu()? - t0;

        // Cold round trips, a tenth as many, each timed alone right after the eviction read. The buffer is
        // filled with ones so that every page is a page of its own, not the shared zero page.
        let cold = (round_trips / 10).max(1);
        let buf = vec![1u8; EVICT_BYTES];
        let mut cold_cpu = Duration::ZERO;
        for _ in 0..cold {
            evict(&buf);
            let t0 = thread_clock()?;
            round_trip(&mut c).await?;
            cold_cpu += thread_clock()? - t0;
        }
        drop(buf);

        let mut s = dial(sink).await?;
        let chunk = vec![0x5au8; 256 * 1024];
        // Warm-up: the windows open and the buffers grow.
        for _ in 0..64 {
            s.write_all(&chunk).await?;
        }
        let t0 = thread_cpu()?;
        let mut sent = 0u64;
        while sent < bulk_bytes {
            s.write_all(&chunk).await?;
            sent += chunk.len() as u64;
        }
        s.shutdown().await?;
        let got = done.recv().await.ok_or_else(|| other("the sink went away"))?;
        let bulk_cpu = thread_cpu()? - t0;
        if got != sent + 64 * chunk.len() as u64 {
            return Err(other(format!("the sink read {got} bytes of {}", sent + 64 * chunk.len() as u64)));
        }
        Ok(PathCost {
            round_trip_us: rt_cpu.total().as_secs_f64() * 1e6 / round_trips as f64,
            round_trip_user_us: rt_cpu.user.as_secs_f64() * 1e6 / round_trips as f64,
            cold_round_trip_us: cold_cpu.as_secs_f64() * 1e6 / cold as f64,
            bulk_s_per_gib: bulk_cpu.total().as_secs_f64() / (sent as f64 / (1u64 << 30) as f64),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path carries the bytes (the sink's count is checked inside) and yields a figure. How the
    /// figures compare is the benchmark's to say, not a test's: CPU time on a shared machine is no assertion.
    #[test]
    fn every_path_carries_the_bytes() {
        for path in [DataPath::Direct, DataPath::Relay, DataPath::Hbone] {
            let c = bench_data_path(path, 300, 64 << 20).unwrap();
            // The warm round trips' CPU comes from getrusage, which counts in scheduler ticks on many kernels:
            // 300 direct round trips may take less than one (CI saw 0.0). The cold ones are timed by the
            // thread's clock, to the nanosecond, and bulk takes many ticks.
            assert!(c.round_trip_us >= 0.0 && c.round_trip_us.is_finite(), "{path:?}: {c:?}");
            assert!(c.cold_round_trip_us > 0.0 && c.bulk_s_per_gib > 0.0, "{path:?}: {c:?}");
        }
    }
}
