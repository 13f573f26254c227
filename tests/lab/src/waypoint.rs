//! `lab waypoint`: a stand-in for Istio's waypoint proxy (an Envoy Deployment, which this machine cannot run).
//! It speaks to ztunnel what a waypoint speaks, from its own pod, which ztunnel does not capture (Istio's
//! waypoints are labelled out of the ambient mesh and terminate HBONE themselves):
//!
//! - HBONE on 15008: TLS 1.3 with a certificate the mesh's CA issued for the waypoint's own service account
//!   (asked for as a ztunnel asks, with its node's credentials), the client's SPIFFE identity verified;
//!   HTTP/2 CONNECT, whose target is what the app asked for (a service's VIP and port, or a workload's
//!   address and port).
//! - One L7 rule, as a waypoint's HTTP policy would be: a request whose path starts with the deny prefix is
//!   answered `403` by the waypoint itself and goes no further; every answer that passes gets a header of
//!   the waypoint's (`x-waypoint: <name>` by default), so a test sees which answers came through it. Only on
//!   the ports declared HTTP (as a waypoint picks HTTP or TCP by the port's declared protocol); on the others
//!   it relays TCP as it comes.
//! - Onwards: the target resolved as a waypoint resolves it (a service's VIP to one of its healthy
//!   endpoints, port mapped; a workload's address to itself), then HBONE to that endpoint's 15008 as the
//!   waypoint's identity (or plain TCP to an endpoint outside the mesh).
//!
//! Its TLS and HTTP/2 are stock rustls (through tokio-rustls) and h2, not ztunnel's own record layer: the
//! ztunnel on either side meets an implementation other than itself. One HTTP/1.1 request per connection
//! is inspected; what follows on the same connection is relayed as it is.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use ztunnel::certs::CertStore;
use ztunnel::identity::Identity;
use ztunnel::state::{Protocol, State};
use ztunnel::tls::TrustRoots;

/// What the waypoint is and does.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where it takes HBONE (`[::]:15008`; IPv4 alone where the pod has no IPv6).
    pub listen: SocketAddr,
    /// Its identity (its own service account).
    pub identity: Identity,
    /// The mesh file (Istio ztunnel's local format), where it learns services and endpoints.
    pub mesh: PathBuf,
    /// Requests whose path starts with this are refused with 403.
    pub deny_prefix: String,
    /// The header added to every answer that passes, `name: value`.
    pub header: (String, String),
    /// The target ports whose traffic is HTTP/1.1; the others' is relayed as TCP.
    pub http_ports: Vec<u16>,
}

/// Most of a request or response head the waypoint reads before it gives up on the connection.
const MAX_HEAD: usize = 64 * 1024;
/// HTTP/2 flow-control windows: HTTP/2's default of 64 KiB would bound a stream to 64 KiB per round trip.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;

struct Waypoint {
    settings: Settings,
    certs: Arc<CertStore>,
    roots: Arc<TrustRoots>,
    state: Arc<State>,
    server: tokio_rustls::TlsAcceptor,
}

/// Runs the waypoint until killed. `cfg` says where certificates come from (a ztunnel's settings: the
/// control plane's CA, or the lab's local CA). Prints `ready` once it has its certificate and listens.
pub async fn run(settings: Settings, cfg: ztunnel::config::Config) -> anyhow::Result<()> {
    let (ca, roots, _) = ztunnel::app::certificate_authority(&cfg)?;
    let roots = Arc::new(roots);
    let certs = CertStore::new(ca, roots.clone(), ztunnel::Metrics::new());
    eprintln!("waypoint: asking {} for {}'s certificate", certs.source(), settings.identity);
    let mut tries = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), certs.fetch(&settings.identity)).await {
            Ok(Ok(_)) => break,
            Ok(Err(e)) => eprintln!("waypoint: no certificate yet: {e}"),
            Err(_) => eprintln!("waypoint: no certificate yet: the CA did not answer within 5 s"),
        }
        tries += 1;
        anyhow::ensure!(tries < 20, "no certificate for {}", settings.identity);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let state = State::new();
    state.load_file(&settings.mesh).with_context(|| format!("mesh file {}", settings.mesh.display()))?;
    ztunnel::state::watch(state.clone(), settings.mesh.clone());
    let server_cfg = ztunnel::tls::server_config(CertStore::resolver(&certs, settings.identity.clone()), roots.clone());
    let listener = listen(settings.listen)?;
    let wp = Arc::new(Waypoint { settings, certs, roots, state, server: Arc::new(server_cfg).into() });
    println!("ready");
    loop {
        let (tcp, peer) = listener.accept().await?;
        let wp = wp.clone();
        tokio::spawn(async move {
            if let Err(e) = wp.connection(tcp, peer).await {
                eprintln!("waypoint: connection from {peer}: {e:#}");
            }
        });
    }
}

/// Binds `addr`; `[::]` falls back to `0.0.0.0` in a pod without IPv6.
fn listen(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let bind = |addr: SocketAddr| -> std::io::Result<TcpListener> {
        let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        if addr.is_ipv6() {
            s.set_only_v6(false)?;
        }
        s.set_reuse_address(true)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        s.set_nonblocking(true)?;
        TcpListener::from_std(s.into())
    };
    match bind(addr) {
        Ok(l) => Ok(l),
        Err(_) if addr.ip().is_unspecified() && addr.is_ipv6() => {
            Ok(bind(SocketAddr::from(([0, 0, 0, 0], addr.port())))?)
        }
        Err(e) => Err(e).with_context(|| format!("listening on {addr}")),
    }
}

impl Waypoint {
    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) -> anyhow::Result<()> {
        // Small writes (a request, an answer) go out at once: with Nagle on, each would wait for the peer's
        // delayed ACK.
        tcp.set_nodelay(true)?;
        let tls = self.server.accept(tcp).await.context("TLS handshake")?;
        let client = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(ztunnel::tls::identity_of)
            .context("a client certificate without a workload identity")?;
        let mut conn = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake(tls)
            .await
            .context("HTTP/2 handshake")?;
        while let Some(next) = conn.accept().await {
            let (req, respond) = next.context("HTTP/2")?;
            let (wp, client) = (self.clone(), client.clone());
            tokio::spawn(async move {
                let target = req.uri().to_string();
                if let Err(e) = wp.stream(req, respond, &client, peer).await {
                    eprintln!("waypoint: {client} from {peer} to {target}: {e:#}");
                }
            });
        }
        Ok(())
    }

    /// One CONNECT stream: the tunnel answered, the HTTP request read and judged, then relayed onwards.
    async fn stream(
        &self,
        req: Request<RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        client: &Identity,
        peer: SocketAddr,
    ) -> anyhow::Result<()> {
        let answer = |respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode| {
            let _ = respond.send_response(Response::builder().status(status).body(()).expect("a response"), true);
        };
        let target = match (req.method(), req.uri().authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok())) {
            (&Method::CONNECT, Some(t)) => t,
            _ => {
                answer(&mut respond, StatusCode::BAD_REQUEST);
                anyhow::bail!("not a CONNECT to an address");
            }
        };
        let Some(upstream) = self.resolve(target) else {
            answer(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            anyhow::bail!("no endpoint for {target}");
        };
        let send = respond.send_response(Response::new(()), false).context("answering the CONNECT")?;
        let mut down = duplex(send, req.into_body());
        if !self.settings.http_ports.contains(&target.port()) {
            let mut up = self.connect(&upstream, peer).await?;
            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            return Ok(());
        }
        let head = read_head(&mut down).await.context("reading the request head")?;
        let line = head_line(&head);
        let path = line.split(' ').nth(1).unwrap_or_default();
        let (name, value) = &self.settings.header;
        if path.starts_with(&self.settings.deny_prefix) {
            eprintln!("waypoint: {client} from {peer}: {line:?} to {target} denied by policy");
            let body = "RBAC: access denied";
            let resp = format!(
                "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{name}: {value}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            down.write_all(resp.as_bytes()).await?;
            down.shutdown().await?;
            return Ok(());
        }
        eprintln!("waypoint: {client} from {peer}: {line:?} to {target} via {}", upstream.addr);
        let mut up = self.connect(&upstream, peer).await?;
        up.write_all(&head).await?;
        let (mut down_r, mut down_w) = tokio::io::split(down);
        let (mut up_r, mut up_w) = tokio::io::split(up);
        let requests = async {
            let _ = tokio::io::copy(&mut down_r, &mut up_w).await;
            let _ = up_w.shutdown().await;
        };
        let answers = async {
            let resp = read_head(&mut up_r).await?;
            // The waypoint's header goes right after the status line.
            let at = resp.windows(2).position(|w| w == b"\r\n").map_or(resp.len(), |i| i + 2);
            down_w.write_all(&resp[..at]).await?;
            down_w.write_all(format!("{name}: {value}\r\n").as_bytes()).await?;
            down_w.write_all(&resp[at..]).await?;
            tokio::io::copy(&mut up_r, &mut down_w).await?;
            down_w.shutdown().await?;
            anyhow::Ok(())
        };
        let (_, r) = tokio::join!(requests, answers);
        r
    }

    /// Where a CONNECT target goes: a service VIP to one of its healthy endpoints, a workload to itself.
    fn resolve(&self, target: SocketAddr) -> Option<Upstream> {
        let snap = self.state.snapshot();
        let td = &self.settings.identity.trust_domain;
        if let Some(svc) = snap.service_by_vip(target.ip()) {
            // The lab's mesh is one network, the default one.
            let up = snap.pick_upstream(&svc, target.ip(), target.port(), "").ok()?;
            let mut expected = vec![up.workload.identity(td)];
            expected.extend(svc.subject_alt_names.iter().filter_map(|s| s.parse().ok()));
            return Some(Upstream { addr: up.addr, hbone: up.workload.protocol == Protocol::HBONE, expected });
        }
        let w = snap.workload_by_ip(target.ip())?;
        Some(Upstream { addr: target, hbone: w.protocol == Protocol::HBONE, expected: vec![w.identity(td)] })
    }

    /// Opens the way to an endpoint: HBONE as the waypoint's identity, or plain TCP outside the mesh.
    async fn connect(&self, up: &Upstream, peer: SocketAddr) -> anyhow::Result<Box<dyn Io>> {
        if !up.hbone {
            let tcp = TcpStream::connect(up.addr).await.with_context(|| format!("connecting to {}", up.addr))?;
            tcp.set_nodelay(true)?;
            return Ok(Box::new(tcp));
        }
        let hbone = SocketAddr::new(up.addr.ip(), 15008);
        let cert = self.certs.fetch(&self.settings.identity).await?;
        let cfg = ztunnel::tls::client_config(cert.certified.clone(), up.expected.clone(), self.roots.clone());
        let tcp = TcpStream::connect(hbone).await.with_context(|| format!("connecting to {hbone}"))?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::IpAddress(hbone.ip().into());
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS with {hbone}"))?;
        let (send_req, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake(tls)
            .await
            .context("HTTP/2 handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(up.addr.to_string())
            .header("forwarded", format!("for=\"{peer}\""))
            .body(())
            .expect("a request");
        let (resp, send) = send_req.ready().await?.send_request(req, false)?;
        let resp = resp.await.context("the endpoint's CONNECT answer")?;
        anyhow::ensure!(resp.status() == StatusCode::OK, "the endpoint answered the CONNECT {}", resp.status());
        Ok(Box::new(duplex(send, resp.into_body())))
    }
}

/// An endpoint a CONNECT target resolved to.
struct Upstream {
    addr: SocketAddr,
    hbone: bool,
    expected: Vec<Identity>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A CONNECT stream as a byte stream: a task carries bytes between the two, with HTTP/2's flow control.
fn duplex(mut send: SendStream<Bytes>, mut recv: RecvStream) -> DuplexStream {
    let (mine, theirs) = tokio::io::duplex(256 * 1024);
    let (mut r, mut w) = tokio::io::split(theirs);
    tokio::spawn(async move {
        while let Some(Ok(chunk)) = recv.data().await {
            let _ = recv.flow_control().release_capacity(chunk.len());
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            send.reserve_capacity(n);
            let mut sent = 0;
            while sent < n {
                match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(Ok(cap)) => {
                        let k = cap.min(n - sent);
                        if send.send_data(Bytes::copy_from_slice(&buf[sent..sent + k]), false).is_err() {
                            return;
                        }
                        sent += k;
                    }
                    _ => return,
                }
            }
        }
        let _ = send.send_data(Bytes::new(), true);
    });
    mine
}

/// Reads up to the end of an HTTP/1.1 head (`\r\n\r\n`) and returns it with whatever came after it.
async fn read_head(r: &mut (impl AsyncRead + Unpin)) -> anyhow::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        anyhow::ensure!(head.len() < MAX_HEAD, "a head longer than {MAX_HEAD} bytes");
        let n = r.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "the stream ended within the head ({} bytes)", head.len());
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

/// The first line of a head.
fn head_line(head: &[u8]) -> String {
    let end = head.windows(2).position(|w| w == b"\r\n").unwrap_or(head.len());
    String::from_utf8_lossy(&head[..end]).into_owned()
}
