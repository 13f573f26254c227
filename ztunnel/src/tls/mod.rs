//! mTLS for HBONE: TLS 1.3 with AES-GCM only, ALPN `h2`, no SNI, both sides presenting X.509 SVIDs whose URI
//! SAN is the workload's SPIFFE ID.
//!
//! - The client checks the server's chain against the mesh roots and that its identity is one the destination
//!   is expected to have (the destination workload's, or the service's SANs).
//! - The server checks the client's chain and that its trust domain is the mesh's; the full identity goes to
//!   policy.

pub mod der;
pub mod record;

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::Identity;

/// The ALPN protocol HBONE negotiates.
pub const ALPN_H2: &[u8] = b"h2";

/// The crypto provider: ring, TLS 1.3 AES-GCM suites only (AES-128 first: it is the faster of the two),
/// X25519 and the NIST curves for key exchange.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring as r;
    Arc::new(CryptoProvider {
        cipher_suites: vec![r::cipher_suite::TLS13_AES_128_GCM_SHA256, r::cipher_suite::TLS13_AES_256_GCM_SHA384],
        kx_groups: vec![r::kx_group::X25519, r::kx_group::SECP256R1, r::kx_group::SECP384R1],
        ..r::default_provider()
    })
}

/// The mesh's roots of trust and trust domain. The roots can be replaced while ztunnel runs (root rotation:
/// the root file changed); handshakes and certificate checks use the set in force when they start.
#[derive(Debug)]
pub struct TrustRoots {
    anchors: std::sync::RwLock<Arc<Vec<rustls::pki_types::TrustAnchor<'static>>>>,
    /// The roots as given, for `/config_dump`.
    certs: std::sync::RwLock<Arc<Vec<CertificateDer<'static>>>>,
    /// The mesh's trust domain.
    pub trust_domain: String,
}

fn anchors_of(roots: &[CertificateDer<'_>]) -> Result<Vec<rustls::pki_types::TrustAnchor<'static>>, webpki::Error> {
    if roots.is_empty() {
        return Err(webpki::Error::UnknownIssuer);
    }
    roots.iter().map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned())).collect()
}

impl TrustRoots {
    /// Roots from DER certificates (at least one).
    pub fn new(roots: &[CertificateDer<'_>], trust_domain: &str) -> Result<TrustRoots, webpki::Error> {
        Ok(TrustRoots {
            anchors: std::sync::RwLock::new(Arc::new(anchors_of(roots)?)),
            certs: std::sync::RwLock::new(Arc::new(roots.iter().map(|c| c.clone().into_owned()).collect())),
            trust_domain: trust_domain.to_string(),
        })
    }

    /// Roots from a PEM bundle (Istio's `root-cert.pem`).
    pub fn from_pem(pem: &[u8], trust_domain: &str) -> Result<TrustRoots, PemError> {
        TrustRoots::new(&pem_bundle(pem)?, trust_domain).map_err(PemError::NotRoots)
    }

    /// Replaces the roots with those of a PEM bundle; on error the old ones stay.
    pub fn replace_pem(&self, pem: &[u8]) -> Result<usize, PemError> {
        let certs = pem_bundle(pem)?;
        let anchors = anchors_of(&certs).map_err(PemError::NotRoots)?;
        let n = anchors.len();
        *self.anchors.write().unwrap() = Arc::new(anchors);
        *self.certs.write().unwrap() = Arc::new(certs.into_iter().map(|c| c.into_owned()).collect());
        Ok(n)
    }

    /// The roots in force, as DER certificates.
    pub fn certs(&self) -> Arc<Vec<CertificateDer<'static>>> {
        self.certs.read().unwrap().clone()
    }

    /// Verifies a workload certificate chain (usable for both client and server auth) at `now`, and returns
    /// the SPIFFE identity of its leaf.
    pub fn verify_workload_chain(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: std::time::SystemTime,
    ) -> Result<Identity, rustls::Error> {
        let now = UnixTime::since_unix_epoch(now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default());
        self.verify(leaf, intermediates, now, webpki::KeyUsage::client_auth())?;
        self.verify(leaf, intermediates, now, webpki::KeyUsage::server_auth())
    }

    /// Verifies a chain for `usage` and returns the SPIFFE identity of its leaf.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<Identity, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        let anchors = self.anchors.read().unwrap().clone();
        cert.verify_for_usage(webpki::ALL_VERIFICATION_ALGS, &anchors, intermediates, now, usage, None, None)
            .map_err(pki_error)?;
        identity_of(end_entity)
            .ok_or_else(|| rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
    }
}

/// Why a PEM bundle cannot be used as trust roots.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// A block that is not a certificate.
    #[error("not a PEM certificate bundle: {0}")]
    NotPem(rustls::pki_types::pem::Error),
    /// No certificate at all.
    #[error("no PEM certificate in it")]
    Empty,
    /// Certificates that cannot anchor a chain.
    #[error("not usable as trust roots: {0}")]
    NotRoots(webpki::Error),
}

/// The certificates of a PEM bundle; an error if it has none or a block is not a certificate.
pub fn pem_bundle(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(PemError::NotPem)?;
    if certs.is_empty() {
        return Err(PemError::Empty);
    }
    Ok(certs)
}

/// The SPIFFE identity in a certificate's URI SANs.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<Identity> {
    der::uri_sans(cert).into_iter().find_map(|u| u.parse().ok())
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        _ => CertificateError::ApplicationVerificationFailure,
    };
    rustls::Error::InvalidCertificate(ce)
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// The handshake-signature half of a verifier, the same for both sides: the provider's algorithms.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            algorithms().supported_schemes()
        }
    };
}

/// Server side: accept clients with a valid chain and an identity in the mesh's trust domain.
#[derive(Debug)]
pub struct ClientVerifier {
    roots: Arc<TrustRoots>,
}

impl ClientVerifier {
    /// A verifier for these roots.
    pub fn new(roots: Arc<TrustRoots>) -> Arc<ClientVerifier> {
        Arc::new(ClientVerifier { roots })
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = self.roots.verify(end_entity, intermediates, now, webpki::KeyUsage::client_auth())?;
        if id.trust_domain != self.roots.trust_domain {
            return Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
        }
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Client side: accept a server with a valid chain whose identity is one of those expected.
#[derive(Debug)]
pub struct ServerVerifier {
    roots: Arc<TrustRoots>,
    expected: Vec<Identity>,
}

impl ServerVerifier {
    /// A verifier expecting one of `expected`.
    pub fn new(roots: Arc<TrustRoots>, expected: Vec<Identity>) -> Arc<ServerVerifier> {
        Arc::new(ServerVerifier { roots, expected })
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self.roots.verify(end_entity, intermediates, now, webpki::KeyUsage::server_auth())?;
        if !self.expected.contains(&id) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

/// The HBONE server config for a pod, whose certificate `cert` resolves at each handshake (so renewals take
/// effect at once; see `certs::CertStore::resolver`).
pub fn server_config(
    cert: Arc<dyn rustls::server::ResolvesServerCert>,
    roots: Arc<TrustRoots>,
) -> rustls::ServerConfig {
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 with these suites is consistent")
        .with_client_cert_verifier(ClientVerifier::new(roots))
        .with_cert_resolver(cert);
    c.alpn_protocols = vec![ALPN_H2.to_vec()];
    c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    c.send_tls13_tickets = 0;
    // The records after the handshake are ztunnel's own (`record`), with rustls keeping the key schedule.
    c.enable_secret_extraction = true;
    c
}

/// The HBONE client config for a connection from `cert`'s identity to a server expected to be one of
/// `expected`.
pub fn client_config(cert: Arc<CertifiedKey>, expected: Vec<Identity>, roots: Arc<TrustRoots>) -> rustls::ClientConfig {
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 with these suites is consistent")
        .dangerous()
        .with_custom_certificate_verifier(ServerVerifier::new(roots, expected))
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(cert)));
    c.alpn_protocols = vec![ALPN_H2.to_vec()];
    c.enable_sni = false;
    c.resumption = rustls::client::Resumption::disabled();
    c.enable_secret_extraction = true;
    c
}
