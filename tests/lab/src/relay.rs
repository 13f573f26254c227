//! The floor of the in-pod design, for `lab bench`: a relay that carries each connection over the same three
//! TCP connections as the mesh — the app to a relay inside the client pod over loopback, relay to relay
//! between the nodes, the relay to the app inside the server pod over loopback — and does nothing else: no
//! TLS, no HTTP/2, no policy, no metrics, no NAT redirect. A proxy of this design pays all of this relay's
//! costs and more, so the relay's figures, measured in the same run, bound what any in-pod proxy can reach
//! on the machine.
//!
//! With [`Capture`], it takes the connections the pods' capture rules redirect, as ztunnel does: one listener
//! where the rules send them, each connection routed by its original destination, and the relay's own
//! connections marked so that the rules let them through. The bench runs it so, with the agent's rules in
//! force, to measure what capture adds to the floor.
//!
//! Like ztunnel's workers it runs one single-threaded event loop and may busy-poll after activity (a wakeup
//! costs tens of µs on a VM), so its latency and connection-rate floors are not handicapped against ztunnel.

use std::cell::Cell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const MIN_BUF: usize = 16 * 1024;
const MAX_BUF: usize = 256 * 1024;

/// One listening address and where its connections go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Where the relay listens.
    pub listen: SocketAddr,
    /// Where it connects for each accepted connection.
    pub to: SocketAddr,
}

impl std::str::FromStr for Route {
    type Err = String;

    /// `LISTEN=TO`, both socket addresses.
    fn from_str(s: &str) -> Result<Route, String> {
        let (l, t) = s.split_once('=').ok_or_else(|| format!("route {s:?} is not LISTEN=TO"))?;
        let addr = |a: &str| a.parse::<SocketAddr>().map_err(|e| format!("route {s:?}: {a:?} is no address: {e}"));
        Ok(Route { listen: addr(l)?, to: addr(t)? })
    }
}

/// Redirected connections: accepted on `at`, where the capture rules send them, routed by their original
/// destination (a route's `listen`), and forwarded from sockets carrying `mark`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capture {
    /// Where the rules redirect connections to.
    pub at: SocketAddr,
    /// The mark of the relay's own connections (ztunnel's, which the rules never capture).
    pub mark: u32,
}

thread_local! {
    /// When this thread last moved bytes or accepted a connection.
    static ACTIVE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Keeps the runtime from blocking while it busy-polls (see [`run`]).
static POKE: Notify = Notify::const_new();

fn activity() {
    ACTIVE.set(Some(Instant::now()));
}

/// Serves `routes` on the calling thread until the process ends; prints `ready` once every listener is bound.
/// With `capture`, every route is taken on its one listener and chosen by the original destination.
/// With a non-zero `spin`, for that long after activity the thread offers its CPU to others and polls its
/// sockets again instead of sleeping in `epoll_wait`.
pub fn run(routes: &[Route], capture: Option<Capture>, spin: Duration) -> anyhow::Result<()> {
    let mut rt = tokio::runtime::Builder::new_current_thread();
    rt.enable_all();
    if !spin.is_zero() {
        rt.on_thread_park(move || {
            if ACTIVE.get().is_some_and(|t| t.elapsed() < spin) {
                std::thread::yield_now();
                POKE.notify_one();
            }
        });
    }
    let rt = rt.build()?;
    let routes: std::sync::Arc<[Route]> = routes.into();
    rt.block_on(async {
        tokio::spawn(async {
            loop {
                POKE.notified().await;
            }
        });
        match capture {
            Some(c) => {
                // Marked like ztunnel's listeners, so the replies of the app's connection are too.
                let l = listener(c.at, c.mark).with_context(|| format!("binding {}", c.at))?;
                tokio::spawn(accept(l, Dst::Original(routes.clone()), c.mark));
            }
            None => {
                for r in routes.iter() {
                    let l = TcpListener::bind(r.listen).await.with_context(|| format!("binding {}", r.listen))?;
                    tokio::spawn(accept(l, Dst::Fixed(r.to), 0));
                }
            }
        }
        // The bench reads the polling window back from this line.
        println!("ready, busy-polling {} µs after activity", spin.as_micros());
        std::future::pending::<anyhow::Result<()>>().await
    })
}

/// Where an accepted connection goes.
enum Dst {
    /// Always there.
    Fixed(SocketAddr),
    /// By the connection's original destination (SO_ORIGINAL_DST, IPv4 as the bench's pods), to the route
    /// listed for it.
    Original(std::sync::Arc<[Route]>),
}

impl Dst {
    fn of(&self, c: &TcpStream) -> std::io::Result<SocketAddr> {
        match self {
            Dst::Fixed(to) => Ok(*to),
            Dst::Original(routes) => {
                let o = nix::sys::socket::getsockopt(c, nix::sys::socket::sockopt::OriginalDst)?;
                let orig = SocketAddr::from((
                    std::net::Ipv4Addr::from(u32::from_be(o.sin_addr.s_addr)),
                    u16::from_be(o.sin_port),
                ));
                routes
                    .iter()
                    .find(|r| r.listen == orig)
                    .map(|r| r.to)
                    .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("no route for {orig}")))
            }
        }
    }
}

/// A listener on `at` whose sockets carry `mark`.
fn listener(at: SocketAddr, mark: u32) -> std::io::Result<TcpListener> {
    let s = if at.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }?;
    s.set_reuseaddr(true)?;
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Mark, &mark)?;
    s.bind(at)?;
    s.listen(1024)
}

/// Connects to `to` from a socket carrying `mark` (none when 0).
async fn connect(to: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let s = if to.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }?;
    if mark != 0 {
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Mark, &mark)?;
    }
    s.connect(to).await
}

async fn accept(l: TcpListener, dst: Dst, mark: u32) {
    let dst = std::sync::Arc::new(dst);
    loop {
        let Ok((c, _)) = l.accept().await else {
            // Out of descriptors or memory: back off rather than spin on the error.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        activity();
        let dst = dst.clone();
        tokio::spawn(async move {
            let Ok(to) = dst.of(&c) else { return };
            let Ok(up) = connect(to, mark).await else { return };
            let _ = (c.set_nodelay(true), up.set_nodelay(true));
            relay(c, up).await;
        });
    }
}

/// Copies both ways until both directions end; a clean end of one is passed on as a half-close.
async fn relay(mut a: TcpStream, mut b: TcpStream) {
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let _ = tokio::join!(copy(&mut ar, &mut bw), copy(&mut br, &mut aw));
}

async fn copy(
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    to: &mut tokio::net::tcp::WriteHalf<'_>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; MIN_BUF];
    loop {
        let n = from.read(&mut buf).await?;
        activity();
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        // Bulk transfers move in large writes, as through ztunnel.
        if n == buf.len() && buf.len() < MAX_BUF {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn routes_parse_and_bad_ones_say_why() {
        let r: Route = "127.0.0.1:6001=10.0.1.2:7001".parse().unwrap();
        assert_eq!(r.listen, "127.0.0.1:6001".parse().unwrap());
        assert_eq!(r.to, "10.0.1.2:7001".parse().unwrap());
        assert!("127.0.0.1:6001".parse::<Route>().unwrap_err().contains("LISTEN=TO"));
        assert!("127.0.0.1:6001=nowhere".parse::<Route>().unwrap_err().contains("nowhere"));
    }

    #[test]
    fn relays_both_ways_with_half_close() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let to = server.local_addr().unwrap();
        // A free port for the relay.
        let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        std::thread::spawn(move || run(&[Route { listen, to }], None, Duration::from_micros(100)));
        let echo = std::thread::spawn(move || {
            let (mut c, _) = server.accept().unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap();
            c.write_all(&got).unwrap();
            got.len()
        });
        let mut c = loop {
            match std::net::TcpStream::connect(listen) {
                Ok(c) => break c,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = c.try_clone().unwrap();
        let p = payload.clone();
        let writer = std::thread::spawn(move || {
            w.write_all(&p).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        assert_eq!(echo.join().unwrap(), payload.len());
        assert!(back == payload, "the relay changed the bytes");
    }
}
