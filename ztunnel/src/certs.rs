//! Workload certificates: issued per identity by the CA, cached, renewed at half-life with jittered, capped
//! backoff on failure, and dropped when no local pod uses the identity any more.
//!
//! Certificates come from an Istio-compatible CA over gRPC (istiod; [`crate::controlplane::IstioCa`]) or,
//! for the embedded default without a control plane, from a local file CA (a root certificate and key on
//! disk) that signs in process. Both go through the same request and the same checks ([`crate::ca`]): a key
//! made here, a CSR for exactly one SPIFFE ID, and an answer refused unless it certifies that key for that
//! identity under the mesh's roots.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, DnValue, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use tracing::{info, warn};

use crate::ca::{Accepted, CertRequest, ChainError, Signer, accept_chain, issue_for_key};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::tls::{TrustRoots, der};

/// Why a certificate could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    /// The local CA's files could not be read or used.
    #[error("CA {0}")]
    Ca(String),
    /// Making the key or request, or signing locally, failed.
    #[error("issuing a certificate for {identity}: {reason}")]
    Issue {
        /// For whom.
        identity: String,
        /// Why.
        reason: String,
    },
    /// The CA could not be asked or did not answer (unreachable, timed out, refused the request, no token).
    #[error("certificate for {identity}: the CA did not issue it: {reason}")]
    Unavailable {
        /// For whom.
        identity: String,
        /// Why.
        reason: String,
    },
    /// The CA answered with something ztunnel refuses to use.
    #[error("certificate for {identity}: refused the CA's answer: {reason}")]
    Rejected {
        /// For whom.
        identity: String,
        /// What was wrong with it.
        reason: ChainError,
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
    /// When ztunnel received it, Unix seconds.
    pub received_at: i64,
}

impl WorkloadCert {
    fn new(identity: &Identity, a: Accepted) -> WorkloadCert {
        WorkloadCert {
            identity: identity.clone(),
            certified: a.certified,
            not_before: a.not_before,
            not_after: a.not_after,
            received_at: now_secs(),
        }
    }

    /// When it should be renewed: half-way through its life (Istio's rule), counted from when it was
    /// received if the CA backdated it (CAs backdate for clock skew; that time was never usable).
    pub fn refresh_at(&self) -> i64 {
        let start = self.not_before.max(self.received_at);
        start + (self.not_after - start) / 2
    }
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// A CA that signs in process with a root (or intermediate) key from disk.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    /// What follows a leaf in the chains it issues: its own certificate.
    chain: Vec<CertificateDer<'static>>,
    is_root: bool,
    ttl: Duration,
    /// Where it was loaded from, for logs.
    origin: String,
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
        let mut ca = Self::from_pem(&cert_pem, &key_pem, ttl)?;
        ca.origin = cert_path.display().to_string();
        Ok(ca)
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
        Ok(LocalCa { issuer, chain: vec![ca_der.clone()], ca_der, is_root, ttl, origin: "(in memory)".into() })
    }

    /// The CSR signer of this CA.
    pub fn signer(&self) -> Signer<'_> {
        Signer { issuer: &self.issuer, ca_chain: &self.chain }
    }

    /// The lifetime of the leaves it issues.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The CA certificate (the trust root when it is self-signed).
    pub fn ca_cert(&self) -> CertificateDer<'static> {
        self.ca_der.clone()
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
            received_at: now_secs(),
        })
    }
}

/// A leaf for `id` with a fresh key: (certificate, PKCS#8 key).
fn issue(
    issuer: &Issuer<'static, KeyPair>,
    id: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(CertificateDer<'static>, Vec<u8>), rcgen::Error> {
    use rustls::pki_types::pem::PemObject;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let pem = issue_for_key(issuer, &key, id, not_before, not_after)?;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
    Ok((der, key.serialize_der()))
}

/// Where certificates come from.
// One per process: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum CaSource {
    /// The local file CA: signs in process (the embedded default, without a control plane).
    Local(LocalCa),
    /// An Istio-compatible CA over gRPC (istiod, istio-csr).
    Istio(crate::controlplane::IstioCa),
}

impl std::fmt::Debug for CaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl CaSource {
    /// Where certificates come from, for logs and `/config_dump`.
    pub fn describe(&self) -> String {
        match self {
            CaSource::Local(ca) => format!("local CA {}", ca.origin),
            CaSource::Istio(ca) => format!("istio CA {}", ca.address()),
        }
    }

    async fn sign(&self, id: &Identity, roots: &TrustRoots) -> Result<Accepted, CertError> {
        let req =
            CertRequest::new(id).map_err(|e| CertError::Issue { identity: id.to_string(), reason: e.to_string() })?;
        let chain = match self {
            CaSource::Local(ca) => {
                ca.signer()
                    .sign_request(&req.csr_pem, ca.ttl)
                    .map_err(|e| CertError::Issue { identity: id.to_string(), reason: e.to_string() })?
                    .1
            }
            CaSource::Istio(ca) => ca.create_certificate(id, &req.csr_pem).await?,
        };
        accept_chain(id, req, &chain, roots, SystemTime::now())
            .map_err(|reason| CertError::Rejected { identity: id.to_string(), reason })
    }
}

/// One certificate's state, for `/config_dump`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertInfo {
    /// The identity.
    pub identity: String,
    /// Where it came from.
    pub source: String,
    /// `Available` (a valid certificate), or `Unavailable` (none yet, or expired).
    pub state: &'static str,
    /// Validity start (Unix seconds).
    pub not_before: i64,
    /// Validity end (Unix seconds).
    pub not_after: i64,
    /// When it will be renewed.
    pub refresh_at: i64,
    /// Seconds until it expires.
    pub expires_in_seconds: i64,
    /// When the current certificate was issued to us (Unix seconds).
    pub last_issued: i64,
    /// The last failed attempt's error, until an attempt succeeds.
    pub last_error: Option<String>,
    /// Failed attempts in a row.
    pub failures: u32,
    /// When the next renewal attempt is due (Unix seconds).
    pub next_attempt: i64,
}

/// One identity's entry.
#[derive(Debug)]
struct Entry {
    cert: Option<Arc<WorkloadCert>>,
    /// Serialises issuance for this identity: concurrent first connections ask the CA once.
    issuing: Arc<tokio::sync::Mutex<()>>,
    issued_at: i64,
    last_error: Option<String>,
    failures: u32,
    next_attempt: i64,
}

impl Entry {
    fn new() -> Entry {
        Entry {
            cert: None,
            issuing: Arc::new(tokio::sync::Mutex::new(())),
            issued_at: 0,
            last_error: None,
            failures: 0,
            next_attempt: 0,
        }
    }

    fn valid(&self, now: i64) -> Option<Arc<WorkloadCert>> {
        self.cert.clone().filter(|c| c.not_after > now && c.not_before <= now + 60)
    }
}

/// Backoff after `failures` failed attempts: 1 s doubling up to 150 s (Istio's cap), never beyond a quarter of
/// what is left of the current certificate's life (so a short outage cannot outlast it unnoticed), jittered by
/// ±25 % so the node's identities do not retry in lockstep.
pub fn backoff(failures: u32, remaining_life: Option<i64>, jitter: f64) -> Duration {
    let base = 2f64.powi(failures.saturating_sub(1).min(8) as i32).min(150.0);
    let capped = match remaining_life {
        Some(r) if r > 0 => base.min((r as f64 / 4.0).max(1.0)),
        _ => base,
    };
    Duration::from_secs_f64(capped * (0.75 + 0.5 * jitter.clamp(0.0, 1.0)))
}

/// The cache of workload certificates.
pub struct CertStore {
    ca: CaSource,
    roots: Arc<TrustRoots>,
    metrics: Arc<Metrics>,
    entries: Mutex<HashMap<Identity, Entry>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").field("ca", &self.ca).field("entries", &self.entries).finish_non_exhaustive()
    }
}

impl CertStore {
    /// A store backed by `ca`, accepting only chains that lead to `roots`.
    pub fn new(ca: CaSource, roots: Arc<TrustRoots>, metrics: Arc<Metrics>) -> Arc<CertStore> {
        Arc::new(CertStore { ca, roots, metrics, entries: Mutex::new(HashMap::new()) })
    }

    /// A store on a local CA, trusting that CA's certificate (tools and tests).
    pub fn local(ca: LocalCa, trust_domain: &str) -> Arc<CertStore> {
        let roots = Arc::new(
            TrustRoots::new(&[ca.ca_cert()], trust_domain).expect("a loaded CA certificate is a valid anchor"),
        );
        CertStore::new(CaSource::Local(ca), roots, Metrics::new())
    }

    /// Where certificates come from.
    pub fn source(&self) -> String {
        self.ca.describe()
    }

    /// A TLS server certificate source that is always `id`'s current certificate here.
    pub fn resolver(store: &Arc<CertStore>, id: Identity) -> Arc<dyn rustls::server::ResolvesServerCert> {
        Arc::new(CurrentCert(store.clone(), id))
    }

    /// The cached certificate of `id`, even if due for renewal (still valid).
    pub fn current(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        self.entries.lock().unwrap().get(id)?.valid(now_secs())
    }

    /// The certificate of `id`, asking the CA when there is no valid one or it is past half-life. A failed
    /// renewal keeps the still-valid certificate in service; with none, the error is returned (the caller
    /// refuses the connection: never plaintext).
    pub async fn fetch(&self, id: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        let lock = {
            let mut entries = self.entries.lock().unwrap();
            let e = entries.entry(id.clone()).or_insert_with(Entry::new);
            if let Some(c) = e.valid(now_secs()).filter(|c| c.refresh_at() > now_secs()) {
                return Ok(c);
            }
            e.issuing.clone()
        };
        let _g = lock.lock().await;
        // Another task may have renewed it while this one waited.
        if let Some(c) = self.current(id).filter(|c| c.refresh_at() > now_secs()) {
            return Ok(c);
        }
        self.issue(id, &lock).await
    }

    async fn issue(&self, id: &Identity, lock: &Arc<tokio::sync::Mutex<()>>) -> Result<Arc<WorkloadCert>, CertError> {
        let result = self.ca.sign(id, &self.roots).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(CertError::Rejected { .. }) => "rejected",
            Err(CertError::Unavailable { .. }) => "unavailable",
            Err(_) => "error",
        };
        self.metrics.cert_requests.get_or_create(&crate::metrics::OutcomeLabels { outcome: outcome.into() }).inc();
        let now = now_secs();
        let mut entries = self.entries.lock().unwrap();
        // The identity was dropped (its last pod left) while the CA answered: keep nothing.
        let Some(e) = entries.get_mut(id).filter(|e| Arc::ptr_eq(&e.issuing, lock)) else {
            return result.map(|a| Arc::new(WorkloadCert::new(id, a)));
        };
        match result {
            Ok(a) => {
                let c = Arc::new(WorkloadCert::new(id, a));
                info!(identity = %id, source = %self.ca.describe(), expires = c.not_after, "workload certificate issued");
                e.cert = Some(c.clone());
                e.issued_at = now;
                e.last_error = None;
                e.failures = 0;
                e.next_attempt = c.refresh_at();
                Ok(c)
            }
            Err(err) => {
                e.failures += 1;
                e.last_error = Some(err.to_string());
                let remaining = e.valid(now).map(|c| c.not_after - now);
                let wait = backoff(e.failures, remaining, jitter());
                e.next_attempt = now + wait.as_secs() as i64;
                match e.valid(now) {
                    Some(c) => {
                        warn!(identity = %id, error = %err, failures = e.failures, retry_in = ?wait, expires = c.not_after,
                              "certificate renewal failed; the current certificate stays in service");
                        Ok(c)
                    }
                    None => {
                        warn!(identity = %id, error = %err, failures = e.failures, retry_in = ?wait,
                              "no certificate for this identity: its connections are refused until one is issued");
                        Err(err)
                    }
                }
            }
        }
    }

    /// Drops the certificate of an identity no local pod uses any more.
    pub fn forget(&self, id: &Identity) {
        self.entries.lock().unwrap().remove(id);
    }

    /// Renews every certificate past its half-life (and retries failed ones) whose attempt is due. Run
    /// periodically; concurrent renewals of different identities run in parallel.
    pub async fn refresh_due(&self) {
        let due: Vec<(Identity, Arc<tokio::sync::Mutex<()>>)> = {
            let now = now_secs();
            self.entries
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, e)| e.next_attempt <= now && e.valid(now).is_none_or(|c| c.refresh_at() <= now))
                .map(|(id, e)| (id.clone(), e.issuing.clone()))
                .collect()
        };
        let renewals = due.into_iter().map(|(id, lock)| async move {
            let Ok(_g) = lock.try_lock() else { return };
            let _ = self.issue(&id, &lock).await;
        });
        futures_join_all(renewals).await;
    }

    /// What is cached, for `/config_dump` and metrics.
    pub fn dump(&self) -> Vec<CertInfo> {
        let now = now_secs();
        let source = self.ca.describe();
        let mut v: Vec<CertInfo> = self
            .entries
            .lock()
            .unwrap()
            .iter()
            .map(|(id, e)| {
                let c = e.valid(now);
                CertInfo {
                    identity: id.to_string(),
                    source: source.clone(),
                    state: if c.is_some() { "Available" } else { "Unavailable" },
                    not_before: c.as_ref().map_or(0, |c| c.not_before),
                    not_after: c.as_ref().map_or(0, |c| c.not_after),
                    refresh_at: c.as_ref().map_or(0, |c| c.refresh_at()),
                    expires_in_seconds: c.as_ref().map_or(0, |c| c.not_after - now),
                    last_issued: e.issued_at,
                    last_error: e.last_error.clone(),
                    failures: e.failures,
                    next_attempt: e.next_attempt,
                }
            })
            .collect();
        v.sort_by(|a, b| a.identity.cmp(&b.identity));
        v
    }

    /// The certificates in Istio's `/config_dump` form (what `istioctl ztunnel-config certificates` reads).
    pub fn istio_dump(&self) -> Vec<IstioCerts> {
        let now = now_secs();
        let roots: Vec<IstioCert> = self.roots.certs().iter().map(|c| IstioCert::of(c)).collect();
        let mut v: Vec<IstioCerts> = self
            .entries
            .lock()
            .unwrap()
            .iter()
            .map(|(id, e)| match (e.valid(now), &e.last_error) {
                (Some(c), _) => IstioCerts {
                    identity: id.to_string(),
                    state: "Available".into(),
                    cert_chain: c.certified.cert.iter().map(|c| IstioCert::of(c)).collect(),
                    root_certs: roots.clone(),
                },
                (None, error) => IstioCerts {
                    identity: id.to_string(),
                    state: match error {
                        Some(error) => format!("Unavailable: {error}"),
                        None => "Initializing".into(),
                    },
                    cert_chain: Vec::new(),
                    root_certs: Vec::new(),
                },
            })
            .collect();
        v.sort_by(|a, b| a.identity.cmp(&b.identity));
        v
    }
}

/// One identity's certificates as Istio's ztunnel dumps them.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IstioCerts {
    /// The SPIFFE identity.
    pub identity: String,
    /// `Available`, `Initializing` (not fetched yet) or `Unavailable: <why>`.
    pub state: String,
    /// Leaf first, then intermediates.
    pub cert_chain: Vec<IstioCert>,
    /// The roots the chain is checked against.
    pub root_certs: Vec<IstioCert>,
}

/// One certificate as Istio's ztunnel dumps it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IstioCert {
    /// The PEM text, base64-encoded (as Envoy's config dumps carry bytes).
    pub pem: String,
    /// The serial number in decimal.
    pub serial_number: String,
    /// `notBefore`, RFC 3339.
    pub valid_from: String,
    /// `notAfter`, RFC 3339.
    pub expiration_time: String,
}

impl IstioCert {
    fn of(der: &CertificateDer<'_>) -> IstioCert {
        use crate::tls::der;
        let time = |t: Option<i64>| t.map(der::rfc3339).unwrap_or_default();
        IstioCert {
            pem: base64(pem("CERTIFICATE", der).as_bytes()),
            serial_number: der::serial_decimal(der).unwrap_or_default(),
            valid_from: time(der::not_before(der)),
            expiration_time: time(der::not_after(der)),
        }
    }
}

/// RFC 4648 base64 with padding.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A PEM block (64-column base64 lines).
fn pem(label: &str, der: &[u8]) -> String {
    let body = base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Runs futures concurrently on the current task and waits for all (a few renewals at a time: no spawning).
async fn futures_join_all<F: std::future::Future<Output = ()>>(futs: impl IntoIterator<Item = F>) {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    std::future::poll_fn(move |cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await
}

/// A new self-signed root CA, for tests and benchmarks that need a throwaway one: (certificate PEM, key PEM).
pub(crate) fn self_signed_ca(org: &str, common_name: DnValue) -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::OrganizationName, org);
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    Ok((p.self_signed(&key)?.pem(), key.serialize_pem()))
}

/// A uniform number in [0, 1) for jitter.
pub(crate) fn jitter() -> f64 {
    let mut b = [0u8; 8];
    let _ = rustls::crypto::ring::default_provider().secure_random.fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// A server certificate that is always the current one of an identity (renewals take effect at once).
#[derive(Debug)]
struct CurrentCert(Arc<CertStore>, Identity);

impl rustls::server::ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current(&self.1).map(|c| c.certified.clone())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tls::{TrustRoots, client_config, server_config};

    pub(crate) fn test_ca(org: &str) -> (String, String) {
        self_signed_ca(org, DnValue::PrintableString("Test Root".try_into().unwrap())).unwrap()
    }

    #[tokio::test]
    async fn issues_caches_and_names_the_issuer_exactly() {
        let (cert, key) = test_ca("cluster.local");
        let ca = LocalCa::from_pem(&cert, &key, Duration::from_secs(3600)).unwrap();
        let root = ca.ca_cert();
        let store = CertStore::local(ca, "cluster.local");
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

    #[test]
    fn base64_and_pem_as_the_standards_write_them() {
        for (data, b64) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")] {
            assert_eq!(base64(data.as_bytes()), b64);
        }
        let (cert, _) = test_ca("cluster.local");
        let der = crate::tls::pem_bundle(cert.as_bytes()).unwrap().remove(0);
        let again = pem("CERTIFICATE", &der);
        assert_eq!(crate::tls::pem_bundle(again.as_bytes()).unwrap(), vec![der]);
        assert!(again.lines().all(|l| l.len() <= 64));
    }

    #[tokio::test]
    async fn the_istio_dump_shows_chain_roots_and_states() {
        let (cert, key) = test_ca("cluster.local");
        let ca = LocalCa::from_pem(&cert, &key, Duration::from_secs(3600)).unwrap();
        let store = CertStore::local(ca, "cluster.local");
        let id = Identity::new("cluster.local", "ns", "sa");
        let issued = store.fetch(&id).await.unwrap();
        let dump = store.istio_dump();
        assert_eq!(dump.len(), 1);
        let d = &dump[0];
        assert_eq!((d.identity.as_str(), d.state.as_str()), ("spiffe://cluster.local/ns/ns/sa/sa", "Available"));
        assert_eq!(d.cert_chain.len(), issued.certified.cert.len());
        assert_eq!(d.root_certs.len(), 1);
        let leaf = &d.cert_chain[0];
        assert_eq!(leaf.valid_from, der::rfc3339(issued.not_before));
        assert_eq!(leaf.expiration_time, der::rfc3339(issued.not_after));
        assert_eq!(leaf.serial_number, der::serial_decimal(&issued.certified.cert[0]).unwrap());
        // `pem` is base64 of the PEM text: decoding it gives the leaf back.
        let text = base64_decode(&leaf.pem);
        assert_eq!(crate::tls::pem_bundle(&text).unwrap()[0], issued.certified.cert[0]);
        // An identity being fetched for the first time is Initializing.
        store.entries.lock().unwrap().insert(Identity::new("cluster.local", "ns", "new"), Entry::new());
        assert_eq!(store.istio_dump()[0].state, "Initializing");
    }

    fn base64_decode(s: &str) -> Vec<u8> {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let vals: Vec<u32> =
            s.bytes().filter(|b| *b != b'=').map(|b| A.iter().position(|a| *a == b).unwrap() as u32).collect();
        let mut out = Vec::new();
        for c in vals.chunks(4) {
            let n = c.iter().enumerate().fold(0u32, |n, (i, v)| n | v << (18 - 6 * i));
            out.extend_from_slice(&n.to_be_bytes()[1..c.len()]);
        }
        out
    }

    #[tokio::test]
    async fn renews_past_half_life_and_keeps_serving() {
        let (cert, key) = test_ca("cluster.local");
        // Two seconds of life from when it arrives (the CA backdates notBefore a minute: that does not
        // count), so it is due a second later.
        let ca = LocalCa::from_pem(&cert, &key, Duration::from_secs(2)).unwrap();
        let store = CertStore::local(ca, "cluster.local");
        let id = Identity::new("cluster.local", "ns", "sa");
        let first = store.fetch(&id).await.unwrap();
        assert!(first.refresh_at() > first.not_before + 30, "the backdated minute does not count");
        store.refresh_due().await;
        assert!(Arc::ptr_eq(&first, &store.current(&id).unwrap()), "not due yet");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(first.refresh_at() <= now_secs());
        store.refresh_due().await;
        let second = store.current(&id).unwrap();
        assert!(!Arc::ptr_eq(&first, &second), "a certificate past half-life is renewed");
        assert_ne!(first.certified.cert[0], second.certified.cert[0]);
        // A long-lived one is not.
        let (cert, key) = test_ca("cluster.local");
        let store =
            CertStore::local(LocalCa::from_pem(&cert, &key, Duration::from_secs(86400)).unwrap(), "cluster.local");
        let a = store.fetch(&id).await.unwrap();
        store.refresh_due().await;
        assert!(Arc::ptr_eq(&a, &store.current(&id).unwrap()));
    }

    #[tokio::test]
    async fn mtls_handshake_with_identity_checks() {
        let (cert, key) = test_ca("cluster.local");
        let ca = LocalCa::from_pem(&cert, &key, Duration::from_secs(3600)).unwrap();
        let roots = Arc::new(TrustRoots::new(&[ca.ca_cert()], "cluster.local").unwrap());
        let store = CertStore::local(ca, "cluster.local");
        let client_id = Identity::new("cluster.local", "a", "client");
        let server_id = Identity::new("cluster.local", "b", "server");
        store.fetch(&server_id).await.unwrap();
        let client_cert = store.fetch(&client_id).await.unwrap();

        let handshake = |expected: Vec<Identity>, ccert: Arc<CertifiedKey>| {
            let sc = Arc::new(server_config(CertStore::resolver(&store, server_id.clone()), roots.clone()));
            let cc = Arc::new(client_config(ccert, expected, roots.clone()));
            async move {
                let (a, b) = tokio::io::duplex(64 * 1024);
                let server = tokio::spawn(async move {
                    crate::tls::record::accept(sc, a).await.map(|s| s.peer_certificates().map(|c| c[0].clone()))
                });
                let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
                let client = crate::tls::record::connect(cc, name, b).await;
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
            CertStore::local(LocalCa::from_pem(&cert2, &key2, Duration::from_secs(3600)).unwrap(), "cluster.local");
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
