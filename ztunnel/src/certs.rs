//! Workload certificates: issued per identity by the CA, cached, renewed at half-life, and dropped when no
//! local pod uses the identity any more.
//!
//! The embedded default CA is a local file CA (a root certificate and key on disk), which signs leaves in
//! process; an Istio-compatible CA client plugs in as another [`CaSource`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use tracing::{info, warn};

use crate::identity::Identity;
use crate::tls::der;

/// Why a certificate could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    /// The CA's files could not be read or used.
    #[error("CA {0}")]
    Ca(String),
    /// Signing or loading the leaf failed.
    #[error("issuing a certificate for {identity}: {reason}")]
    Issue {
        /// For whom.
        identity: String,
        /// Why.
        reason: String,
    },
}

/// A workload's certificate and key, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCert {
    /// Whose it is.
    pub identity: Identity,
    /// Leaf first, then intermediates, ready for the handshake.
    pub certified: Arc<CertifiedKey>,
    /// Validity start, Unix seconds.
    pub not_before: i64,
    /// Validity end, Unix seconds.
    pub not_after: i64,
}

impl WorkloadCert {
    /// When it should be renewed: half-way through its life (Istio's rule).
    pub fn refresh_at(&self) -> i64 {
        self.not_before + (self.not_after - self.not_before) / 2
    }
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// A CA that signs in process with a root (or intermediate) key from disk.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    is_root: bool,
    ttl: Duration,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes()).filter_map(Result::ok).collect()
}

impl LocalCa {
    /// Loads the CA certificate and key. `ttl` is the lifetime of the leaves it issues.
    pub fn load(cert_path: &Path, key_path: &Path, ttl: Duration) -> Result<LocalCa, CertError> {
        let cert_pem = std::fs::read_to_string(cert_path)
            .map_err(|e| CertError::Ca(format!("certificate {}: {e}", cert_path.display())))?;
        let key_pem =
            std::fs::read_to_string(key_path).map_err(|e| CertError::Ca(format!("key {}: {e}", key_path.display())))?;
        Self::from_pem(&cert_pem, &key_pem, ttl)
    }

    /// The CA from PEM text.
    pub fn from_pem(cert_pem: &str, key_pem: &str, ttl: Duration) -> Result<LocalCa, CertError> {
        let ca_der = pem_certs(cert_pem)
            .into_iter()
            .next()
            .ok_or_else(|| CertError::Ca("certificate: no PEM certificate found".into()))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| CertError::Ca(format!("key: {e}")))?;
        if der::public_key(&ca_der).as_deref() != Some(key.public_key_raw()) {
            return Err(CertError::Ca("key: it does not belong to the CA certificate".into()));
        }
        let (attrs, raw_subject) =
            der::subject(&ca_der).ok_or_else(|| CertError::Ca("certificate: unreadable subject".into()))?;
        // Leaves must name their issuer exactly as the CA names itself, string types included.
        let mut dn = DistinguishedName::new();
        for a in attrs {
            let text = String::from_utf8(a.value.clone())
                .map_err(|_| CertError::Ca("certificate: non-UTF-8 subject".into()))?;
            let value = match a.tag {
                0x13 => DnValue::PrintableString(
                    text.try_into().map_err(|_| CertError::Ca("certificate: bad PrintableString".into()))?,
                ),
                0x16 => {
                    DnValue::Ia5String(text.try_into().map_err(|_| CertError::Ca("certificate: bad IA5String".into()))?)
                }
                _ => DnValue::Utf8String(text),
            };
            dn.push(DnType::CustomDnType(a.oid), value);
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        if let Some(ski) = der::subject_key_id(&ca_der) {
            params.key_identifier_method = KeyIdMethod::PreSpecified(ski);
        }
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let issuer = Issuer::new(params, key);
        let is_root = der::issuer_raw(&ca_der).as_deref() == Some(&raw_subject[..]);
        // Check the reconstruction: a throwaway leaf must name the CA exactly.
        let now = SystemTime::now();
        let probe = issue(&issuer, &Identity::new("check", "check", "check"), now, now + Duration::from_secs(60))
            .map_err(|e| CertError::Ca(format!("cannot sign with the key: {e}")))?;
        if der::issuer_raw(&probe.0).as_deref() != Some(&raw_subject[..]) {
            return Err(CertError::Ca("certificate: its subject cannot be reproduced in issued certificates".into()));
        }
        Ok(LocalCa { issuer, ca_der, is_root, ttl })
    }

    /// The CA certificate (the trust root when it is self-signed).
    pub fn ca_cert(&self) -> CertificateDer<'static> {
        self.ca_der.clone()
    }

    fn sign(&self, id: &Identity) -> Result<WorkloadCert, CertError> {
        let now = SystemTime::now();
        self.sign_valid(id, now - Duration::from_secs(60), now + self.ttl)
    }

    /// Signs a certificate for `id` valid from `not_before` to `not_after` (tools and tests: expired and
    /// not-yet-valid certificates).
    pub fn sign_valid(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, CertError> {
        let err = |reason: String| CertError::Issue { identity: id.to_string(), reason };
        let (leaf, key_der) = issue(&self.issuer, id, not_before, not_after).map_err(|e| err(e.to_string()))?;
        let mut chain = vec![leaf];
        if !self.is_root {
            chain.push(self.ca_der.clone());
        }
        let not_before = der::not_before(&chain[0]).ok_or_else(|| err("unreadable notBefore".into()))?;
        let not_after = der::not_after(&chain[0]).ok_or_else(|| err("unreadable notAfter".into()))?;
        let key =
            rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)))
                .map_err(|e| err(e.to_string()))?;
        Ok(WorkloadCert {
            identity: id.clone(),
            certified: Arc::new(CertifiedKey::new(chain, key)),
            not_before,
            not_after,
        })
    }
}

/// Signs a leaf for `id`: a fresh ECDSA P-256 key, the SPIFFE ID as the only (URI) SAN, usable by client and
/// server, valid from `not_before` (a minute ago, for clock skew) to `not_after`.
fn issue(
    issuer: &Issuer<'static, KeyPair>,
    id: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(CertificateDer<'static>, Vec<u8>), rcgen::Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.use_authority_key_identifier_extension = true;
    p.not_before = not_before.into();
    p.not_after = not_after.into();
    let mut serial = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut serial)
        .map_err(|_| rcgen::Error::RingUnspecified)?;
    serial[0] &= 0x7f;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let cert = p.signed_by(&key, issuer)?;
    Ok((cert.der().clone(), key.serialize_der()))
}

/// Where certificates come from.
#[derive(Debug)]
pub enum CaSource {
    /// The local file CA.
    Local(LocalCa),
}

impl CaSource {
    async fn sign(&self, id: &Identity) -> Result<WorkloadCert, CertError> {
        match self {
            CaSource::Local(ca) => ca.sign(id),
        }
    }
}

/// One certificate's state, for `/config_dump`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertInfo {
    /// The identity.
    pub identity: String,
    /// Validity start (Unix seconds).
    pub not_before: i64,
    /// Validity end (Unix seconds).
    pub not_after: i64,
    /// When it will be renewed.
    pub refresh_at: i64,
    /// Seconds until it expires.
    pub expires_in_seconds: i64,
}

/// The cache of workload certificates.
#[derive(Debug)]
pub struct CertStore {
    ca: CaSource,
    certs: Mutex<HashMap<Identity, Arc<WorkloadCert>>>,
    /// Serialises issuance so concurrent first connections of one identity sign once.
    issuing: tokio::sync::Mutex<()>,
}

impl CertStore {
    /// A store backed by `ca`.
    pub fn new(ca: CaSource) -> Arc<CertStore> {
        Arc::new(CertStore { ca, certs: Mutex::new(HashMap::new()), issuing: tokio::sync::Mutex::new(()) })
    }

    /// The cached certificate of `id`, even if due for renewal (still valid).
    pub fn current(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        let c = self.certs.lock().unwrap().get(id).cloned()?;
        (c.not_after > now_secs()).then_some(c)
    }

    /// The certificate of `id`, issuing or renewing it when needed.
    pub async fn fetch(&self, id: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        if let Some(c) = self.current(id)
            && c.refresh_at() > now_secs()
        {
            return Ok(c);
        }
        let _g = self.issuing.lock().await;
        if let Some(c) = self.current(id)
            && c.refresh_at() > now_secs()
        {
            return Ok(c);
        }
        match self.ca.sign(id).await {
            Ok(c) => {
                let c = Arc::new(c);
                info!(identity = %id, expires = c.not_after, "issued workload certificate");
                self.certs.lock().unwrap().insert(id.clone(), c.clone());
                Ok(c)
            }
            // A renewal that fails keeps the still-valid certificate in service.
            Err(e) => match self.current(id) {
                Some(c) => {
                    warn!(identity = %id, error = %e, "renewal failed; keeping the current certificate");
                    Ok(c)
                }
                None => Err(e),
            },
        }
    }

    /// Drops the certificate of an identity no local pod uses any more.
    pub fn forget(&self, id: &Identity) {
        self.certs.lock().unwrap().remove(id);
    }

    /// Renews every certificate past its half-life. Run periodically.
    pub async fn refresh_due(&self) {
        let due: Vec<Identity> = {
            let now = now_secs();
            self.certs.lock().unwrap().values().filter(|c| c.refresh_at() <= now).map(|c| c.identity.clone()).collect()
        };
        for id in due {
            if let Err(e) = self.fetch(&id).await {
                warn!(identity = %id, error = %e, "certificate renewal failed");
            }
        }
    }

    /// What is cached, for `/config_dump` and metrics.
    pub fn dump(&self) -> Vec<CertInfo> {
        let now = now_secs();
        let mut v: Vec<CertInfo> = self
            .certs
            .lock()
            .unwrap()
            .values()
            .map(|c| CertInfo {
                identity: c.identity.to_string(),
                not_before: c.not_before,
                not_after: c.not_after,
                refresh_at: c.refresh_at(),
                expires_in_seconds: c.not_after - now,
            })
            .collect();
        v.sort_by(|a, b| a.identity.cmp(&b.identity));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{TrustRoots, client_config, server_config};

    pub(crate) fn test_ca(org: &str) -> (String, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::OrganizationName, org);
        p.distinguished_name.push(DnType::CommonName, DnValue::PrintableString("Test Root".try_into().unwrap()));
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        (p.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    #[tokio::test]
    async fn issues_caches_and_names_the_issuer_exactly() {
        let (cert, key) = test_ca("cluster.local");
        let ca = LocalCa::from_pem(&cert, &key, Duration::from_secs(3600)).unwrap();
        let root = ca.ca_cert();
        let store = CertStore::new(CaSource::Local(ca));
        let id = Identity::new("cluster.local", "ns", "sa");
        let c1 = store.fetch(&id).await.unwrap();
        let c2 = store.fetch(&id).await.unwrap();
        assert!(Arc::ptr_eq(&c1, &c2), "a fresh certificate is served from the cache");
        let leaf = &c1.certified.cert[0];
        assert_eq!(crate::tls::identity_of(leaf), Some(id.clone()));
        assert_eq!(der::issuer_raw(leaf), der::subject_raw(&root));
        assert!(c1.not_after - c1.not_before >= 3600);
        assert_eq!(store.dump().len(), 1);
        store.forget(&id);
        assert!(store.current(&id).is_none());
    }

    #[tokio::test]
    async fn renews_past_half_life_and_keeps_serving() {
        let (cert, key) = test_ca("cluster.local");
        // Valid from a minute ago for ten seconds: already past half-life, so every fetch renews.
        let ca = LocalCa::from_pem(&cert, &key, Duration::from_secs(10)).unwrap();
        let store = CertStore::new(CaSource::Local(ca));
        let id = Identity::new("cluster.local", "ns", "sa");
        let first = store.fetch(&id).await.unwrap();
        assert!(first.refresh_at() <= now_secs());
        store.refresh_due().await;
        let second = store.current(&id).unwrap();
        assert!(!Arc::ptr_eq(&first, &second), "a certificate past half-life is renewed");
        assert_ne!(first.certified.cert[0], second.certified.cert[0]);
        // A long-lived one is not.
        let (cert, key) = test_ca("cluster.local");
        let store =
            CertStore::new(CaSource::Local(LocalCa::from_pem(&cert, &key, Duration::from_secs(86400)).unwrap()));
        let a = store.fetch(&id).await.unwrap();
        store.refresh_due().await;
        assert!(Arc::ptr_eq(&a, &store.current(&id).unwrap()));
    }

    #[tokio::test]
    async fn mtls_handshake_with_identity_checks() {
        let (cert, key) = test_ca("cluster.local");
        let ca = LocalCa::from_pem(&cert, &key, Duration::from_secs(3600)).unwrap();
        let roots = Arc::new(TrustRoots::new(&[ca.ca_cert()], "cluster.local").unwrap());
        let store = CertStore::new(CaSource::Local(ca));
        let client_id = Identity::new("cluster.local", "a", "client");
        let server_id = Identity::new("cluster.local", "b", "server");
        store.fetch(&server_id).await.unwrap();
        let client_cert = store.fetch(&client_id).await.unwrap();

        let handshake = |expected: Vec<Identity>, ccert: Arc<CertifiedKey>| {
            let sc = Arc::new(server_config(store.clone(), server_id.clone(), roots.clone()));
            let cc = Arc::new(client_config(ccert, expected, roots.clone()));
            async move {
                let (a, b) = tokio::io::duplex(64 * 1024);
                let server = tokio::spawn(async move {
                    tokio_rustls::TlsAcceptor::from(sc)
                        .accept(a)
                        .await
                        .map(|s| s.get_ref().1.peer_certificates().map(|c| c[0].clone()))
                });
                let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
                let client = tokio_rustls::TlsConnector::from(cc).connect(name, b).await;
                (client.map(|_| ()), server.await.unwrap())
            }
        };
        let (c, s) = handshake(vec![server_id.clone()], client_cert.certified.clone()).await;
        c.unwrap();
        let peer = s.unwrap().unwrap();
        assert_eq!(crate::tls::identity_of(&peer), Some(client_id.clone()));

        // The client refuses a server that is not the one it expects.
        let (c, _) = handshake(vec![Identity::new("cluster.local", "b", "other")], client_cert.certified.clone()).await;
        assert!(c.is_err());

        // The server refuses a client from another CA.
        let (cert2, key2) = test_ca("cluster.local");
        let rogue =
            CertStore::new(CaSource::Local(LocalCa::from_pem(&cert2, &key2, Duration::from_secs(3600)).unwrap()));
        let rogue_cert = rogue.fetch(&client_id).await.unwrap();
        let (_, s) = handshake(vec![server_id.clone()], rogue_cert.certified.clone()).await;
        assert!(s.is_err());

        // And a client of the same CA but another trust domain.
        let other_td = store.fetch(&Identity::new("evil.local", "a", "client")).await.unwrap();
        let (_, s) = handshake(vec![server_id.clone()], other_td.certified.clone()).await;
        assert!(s.is_err());
    }

    #[test]
    fn bad_ca_material_is_a_clear_error() {
        let (cert, _) = test_ca("x");
        let (_, other_key) = test_ca("y");
        assert!(LocalCa::from_pem("not pem", "not pem", Duration::from_secs(60)).is_err());
        assert!(LocalCa::from_pem(&cert, "garbage", Duration::from_secs(60)).unwrap_err().to_string().contains("key"));
        let e = LocalCa::from_pem(&cert, &other_key, Duration::from_secs(60)).unwrap_err();
        assert!(e.to_string().contains("does not belong"), "{e}");
    }
}
