//! What the lab tests that speak HBONE themselves share: the lab's CA as a client's trust and certificates,
//! and a mutual-TLS (and HTTP/2) connection from a namespace to a pod's port 15008.

// Each test crate uses its own part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lab::{Lab, Netns};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use ztunnel::certs::{CertStore, LocalCa};
use ztunnel::identity::Identity;
use ztunnel::tls::{TrustRoots, client_config};

/// The lab's trust domain.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// A mesh client's view of the lab: its CA, the roots it trusts, workload certificates it issues.
pub struct MeshClient {
    pub ca: LocalCa,
    pub roots: Arc<TrustRoots>,
    pub certs: Arc<CertStore>,
}

impl MeshClient {
    /// From the CA the lab made for its ztunnels.
    pub fn of(lab: &Lab) -> MeshClient {
        let load =
            || LocalCa::load(&lab.dir.join("ca-cert.pem"), &lab.dir.join("ca-key.pem"), Duration::from_secs(3600));
        let ca = load().expect("the lab's CA");
        let roots = Arc::new(TrustRoots::new(&[ca.ca_cert()], TRUST_DOMAIN).expect("the lab's CA as a root"));
        MeshClient { certs: CertStore::local(load().expect("the lab's CA"), TRUST_DOMAIN), ca, roots }
    }

    /// A workload certificate for `namespace`/`service_account`.
    pub async fn cert(&self, namespace: &str, service_account: &str) -> Arc<CertifiedKey> {
        let id = Identity::new(TRUST_DOMAIN, namespace, service_account);
        self.certs.fetch(&id).await.expect("a certificate from the lab's CA").certified.clone()
    }
}

/// The identity of `namespace`/`service_account` in the lab.
pub fn identity(namespace: &str, service_account: &str) -> Identity {
    Identity::new(TRUST_DOMAIN, namespace, service_account)
}

/// A TCP connection from inside `ns` to `target`, ready for the caller's tokio runtime (made before it runs,
/// since entering a namespace is per thread).
pub fn tcp_from(ns: &Netns, target: SocketAddr) -> std::net::TcpStream {
    let s = ns
        .run(move || std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)))
        .expect("entering the namespace")
        .unwrap_or_else(|e| panic!("connecting to {target}: {e}"));
    s.set_nonblocking(true).expect("a non-blocking socket");
    s
}

/// Mutual TLS over `tcp` with `cert`, expecting the server to prove one of `expected`.
pub async fn tls(
    tcp: std::net::TcpStream,
    cert: Arc<CertifiedKey>,
    expected: Vec<Identity>,
    roots: Arc<TrustRoots>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::from_std(tcp)?;
    let name = rustls::pki_types::ServerName::IpAddress(tcp.peer_addr()?.ip().into());
    tokio_rustls::TlsConnector::from(Arc::new(client_config(cert, expected, roots))).connect(name, tcp).await
}

/// HTTP/2 over an established TLS session; the connection is driven by a spawned task.
pub async fn h2(tls: TlsStream<TcpStream>) -> Result<h2::client::SendRequest<Bytes>, h2::Error> {
    let (send, conn) = h2::client::handshake(tls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await
}
