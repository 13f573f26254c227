//! Traffic inside the lab: echo servers and clients in pod netns, and a tiny HTTP client for admin endpoints.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

use crate::netns::Netns;

/// A listener in a netns whose accept loop hands each connection to `serve` on a thread of its own; stops
/// (and closes the listener) when dropped.
struct Server {
    stop: Arc<AtomicBool>,
    listener: Arc<TcpListener>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(
        ns: &Netns,
        addr: SocketAddr,
        serve: impl Fn(TcpStream, SocketAddr) + Clone + Send + 'static,
    ) -> anyhow::Result<Server> {
        let listener = ns.run(move || TcpListener::bind(addr))?.with_context(|| format!("binding {addr}"))?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (listener.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((conn, peer)) = l.accept() else { break };
                let serve = serve.clone();
                std::thread::spawn(move || serve(conn, peer));
            }
        });
        Ok(Server { stop, listener, thread: Some(thread) })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // shutdown() on a listening socket wakes a blocked accept() with an error on Linux.
        let _ = socket2::SockRef::from(&*self.listener).shutdown(Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP server in a netns that greets each client with `peer=<client ip:port>` and then echoes what it gets.
pub struct EchoServer {
    addr: SocketAddr,
    _server: Server,
}

impl EchoServer {
    /// Starts one listening on `addr` inside `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr) -> anyhow::Result<EchoServer> {
        let server = Server::start(ns, addr, |mut conn, peer| {
            let _ = conn.set_nodelay(true);
            if conn.write_all(format!("peer={peer}\n").as_bytes()).is_err() {
                return;
            }
            let mut buf = [0u8; 16384];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        })?;
        Ok(EchoServer { addr, _server: server })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A client connection to an [`EchoServer`].
pub struct EchoClient {
    reader: BufReader<TcpStream>,
    /// The peer address the server reported seeing.
    pub seen_as: String,
}

impl EchoClient {
    /// Connects from inside `ns` to `addr` and reads the greeting.
    pub fn connect(ns: &Netns, addr: SocketAddr, timeout: Duration) -> anyhow::Result<EchoClient> {
        let stream = ns
            .run(move || TcpStream::connect_timeout(&addr, timeout))?
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(timeout))?;
        Self::from_stream(stream)
    }

    /// Reads the greeting on an already connected stream.
    pub fn from_stream(stream: TcpStream) -> anyhow::Result<EchoClient> {
        let addr = stream.peer_addr()?;
        stream.set_nodelay(true)?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).with_context(|| format!("reading the greeting of {addr}"))?;
        let seen_as = line
            .trim()
            .strip_prefix("peer=")
            .with_context(|| format!("unexpected greeting {line:?} from {addr}"))?
            .to_string();
        Ok(EchoClient { reader, seen_as })
    }

    /// The client IP the server saw.
    pub fn seen_ip(&self) -> String {
        self.seen_as.parse::<SocketAddr>().map(|a| a.ip().to_string()).unwrap_or_default()
    }

    /// Sends `data` and reads the same number of bytes back; fails if they differ.
    pub fn round_trip(&mut self, data: &[u8]) -> anyhow::Result<()> {
        self.reader.get_mut().write_all(data)?;
        let mut back = vec![0u8; data.len()];
        self.reader.read_exact(&mut back).context("reading the echo")?;
        anyhow::ensure!(back == data, "the echo differs from what was sent");
        Ok(())
    }

    /// The underlying stream.
    pub fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }
}

/// A plain HTTP/1.1 GET from inside `ns`; returns the status code and body.
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    http_request(ns, addr, "GET", path)
}

/// A plain HTTP/1.1 request without a body from inside `ns`.
pub fn http_request(ns: &Netns, addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    http_exchange(ns, addr, method, path).map(|r| (r.status, r.body))
}

/// An HTTP/1.1 answer.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    /// Its status code.
    pub status: u16,
    /// Its head (status line and headers).
    pub head: String,
    /// Its body.
    pub body: String,
}

impl HttpAnswer {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// [`http_request`], with the answer's head.
pub fn http_exchange(ns: &Netns, addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<HttpAnswer> {
    let mut s = ns.run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)))??;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").with_context(|| format!("malformed HTTP response from {addr}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    Ok(HttpAnswer { status, head: head.to_string(), body })
}

/// An HTTP/1.1 server inside a pod: answers every request `200` with `<name> saw <peer> ask for <path>`, then
/// closes the connection.
pub struct HttpServer {
    _server: Server,
}

impl HttpServer {
    /// Starts one called `name` listening on `addr` inside `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr, name: &str) -> anyhow::Result<HttpServer> {
        let name = name.to_string();
        let server = Server::start(ns, addr, move |mut conn, peer| {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&head);
            let path = text.split_whitespace().nth(1).unwrap_or("?");
            let body = format!("{name} saw {} ask for {path}", peer.ip());
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes());
        })?;
        Ok(HttpServer { _server: server })
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}
