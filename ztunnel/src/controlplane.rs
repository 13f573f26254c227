//! Connections to the control plane (istiod, or anything that serves its protocols): gRPC over TLS that
//! trusts a root file, with the request headers Istio's ztunnel sends (`authorization: Bearer <token>` from a
//! projected token file, read afresh for every request since the kubelet rotates it, and `clusterid`), and the
//! CA client built on it ([`IstioCa`]).
//!
//! The root file is read again whenever a channel is made; when its content changed (root rotation) the
//! channel is rebuilt with the new roots, so a rotated istiod serving certificate is trusted without a restart.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use ambit_proto::control_plane::istio::ca::IstioCertificateRequest;
use ambit_proto::control_plane::istio::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::info;

use crate::certs::CertError;
use crate::identity::Identity;

/// How long one certificate request may take before it counts as failed (the CA may hang).
pub const CA_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the control plane could not be asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrpcError {
    /// The root file could not be read or holds no certificate.
    #[error("root certificate {path}: {reason}")]
    Root {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The token file could not be read.
    #[error("token {path}: {reason} (is the projected service account token mounted?)")]
    Token {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The address is not a URL tonic can connect to.
    #[error("address {address:?}: {reason}")]
    Address {
        /// The address.
        address: String,
        /// Why.
        reason: String,
    },
}

/// Where and how to reach one control-plane service.
#[derive(Debug, Clone)]
pub struct Target {
    /// `https://host:port`.
    pub address: String,
    /// PEM roots that sign the server's certificate.
    pub root_ca: PathBuf,
    /// The name to check the server's certificate against, when it is not the address's host.
    pub alt_hostname: Option<String>,
    /// The bearer token file; `None` sends no token.
    pub token: Option<PathBuf>,
    /// The `clusterid` header.
    pub cluster_id: String,
}

/// A channel to one control-plane service, rebuilt when its root file changes.
#[derive(Debug)]
pub struct Connection {
    target: Target,
    current: Mutex<Option<(Vec<u8>, Channel)>>,
}

impl Connection {
    /// A connection to `target`; nothing is dialled until the first request.
    pub fn new(target: Target) -> Connection {
        Connection { target, current: Mutex::new(None) }
    }

    /// The address, for logs.
    pub fn address(&self) -> &str {
        &self.target.address
    }

    /// A channel trusting the root file's current content.
    pub fn channel(&self) -> Result<Channel, GrpcError> {
        let path = self.target.root_ca.display().to_string();
        let pem = std::fs::read(&self.target.root_ca)
            .map_err(|e| GrpcError::Root { path: path.clone(), reason: e.to_string() })?;
        crate::tls::pem_bundle(&pem).map_err(|e| GrpcError::Root { path: path.clone(), reason: e.to_string() })?;
        let mut current = self.current.lock().unwrap();
        if let Some((seen, ch)) = current.as_ref()
            && *seen == pem
        {
            return Ok(ch.clone());
        }
        let bad = |reason: String| GrpcError::Address { address: self.target.address.clone(), reason };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pem));
        if let Some(h) = &self.target.alt_hostname {
            tls = tls.domain_name(h.clone());
        }
        let ch = Endpoint::from_shared(self.target.address.clone())
            .map_err(|e| bad(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect_lazy();
        if current.is_some() {
            info!(address = %self.target.address, root = %path, "root certificate changed: new channel to the control plane");
        }
        *current = Some((pem, ch.clone()));
        Ok(ch)
    }

    /// A request with Istio's headers: the bearer token (read now) and the cluster id.
    pub fn request<T>(&self, message: T) -> Result<tonic::Request<T>, GrpcError> {
        let mut req = tonic::Request::new(message);
        if let Some(path) = &self.target.token {
            let token = std::fs::read_to_string(path)
                .map_err(|e| GrpcError::Token { path: path.display().to_string(), reason: e.to_string() })?;
            let token = token.trim();
            if token.is_empty() {
                return Err(GrpcError::Token { path: path.display().to_string(), reason: "empty".into() });
            }
            let v = format!("Bearer {token}").parse().map_err(|_| GrpcError::Token {
                path: path.display().to_string(),
                reason: "not a valid header value".into(),
            })?;
            req.metadata_mut().insert("authorization", v);
        }
        if let Ok(v) = self.target.cluster_id.parse() {
            req.metadata_mut().insert("clusterid", v);
        }
        Ok(req)
    }
}

/// The client of Istio's certificate service (`CreateCertificate`), asking for local pods' identities by
/// impersonation, as a node proxy does.
#[derive(Debug)]
pub struct IstioCa {
    conn: Connection,
    ttl: Duration,
}

impl IstioCa {
    /// A client of the CA at `target`, asking for certificates valid for `ttl`.
    pub fn new(target: Target, ttl: Duration) -> IstioCa {
        IstioCa { conn: Connection::new(target), ttl }
    }

    /// The CA's address.
    pub fn address(&self) -> &str {
        self.conn.address()
    }

    /// Sends the CSR for `id`; returns the chain as the CA sent it (checked by the caller).
    pub async fn create_certificate(&self, id: &Identity, csr_pem: &str) -> Result<Vec<String>, CertError> {
        let fail = |reason: String| CertError::Unavailable { identity: id.to_string(), reason };
        let metadata = prost_types::Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id.to_string())) },
            )]
            .into(),
        };
        let msg = IstioCertificateRequest {
            csr: csr_pem.to_string(),
            validity_duration: self.ttl.as_secs() as i64,
            metadata: Some(metadata),
        };
        let req = self.conn.request(msg).map_err(|e| fail(e.to_string()))?;
        let mut client = IstioCertificateServiceClient::new(self.conn.channel().map_err(|e| fail(e.to_string()))?);
        match tokio::time::timeout(CA_REQUEST_TIMEOUT, client.create_certificate(req)).await {
            Err(_) => Err(fail(format!("{} did not answer within {CA_REQUEST_TIMEOUT:?}", self.address()))),
            Ok(Err(status)) => {
                Err(fail(format!("{} answered {:?}: {}", self.address(), status.code(), status.message())))
            }
            Ok(Ok(resp)) => Ok(resp.into_inner().cert_chain),
        }
    }
}
