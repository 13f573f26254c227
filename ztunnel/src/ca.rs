//! Both sides of certificate issuance, as pure functions over PEM and DER:
//!
//! - the requester's: a fresh ECDSA P-256 key made on the node and a CSR whose only SAN is the SPIFFE URI
//!   ([`CertRequest`]); then the check of what the CA sent back ([`accept_chain`]): the leaf must carry
//!   exactly the requested identity and our public key, and the chain must lead to the mesh's trust roots.
//!   Anything else is refused, so a confused or hostile CA cannot make ztunnel present someone else's
//!   identity or one nobody trusts.
//! - the signer's ([`Signer::sign_request`]): the checks a CA makes before signing a CSR (well formed, signed
//!   by the key it carries, asking for exactly one SPIFFE identity). The local file CA and the lab's control
//!   plane use it; a real cluster's istiod does the same on its side.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use crate::identity::Identity;
use crate::tls::{TrustRoots, der};

/// Why a CA's answer was refused. Each is logged and counted; the previous certificate (if still valid) stays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// No certificate in the answer.
    #[error("the CA returned no certificate")]
    Empty,
    /// A certificate that is not PEM/DER.
    #[error("certificate {index} of the chain is not a PEM certificate")]
    Garbage {
        /// Its position (0 = leaf).
        index: usize,
    },
    /// The leaf names another identity (or several).
    #[error("the leaf is for {got:?}, not the requested {wanted}")]
    WrongIdentity {
        /// What was asked for.
        wanted: String,
        /// The URI SANs the leaf carries.
        got: Vec<String>,
    },
    /// The leaf is not for the key we made.
    #[error("the leaf certifies another public key than the one in our request")]
    WrongKey,
    /// The chain does not lead to a trusted root, or is out of its validity period.
    #[error("the chain does not verify against the mesh's trust roots: {0}")]
    Untrusted(String),
}

/// A fresh key and the CSR for one identity.
pub struct CertRequest {
    key: KeyPair,
    /// The CSR, PEM.
    pub csr_pem: String,
}

impl CertRequest {
    /// A new P-256 key and a CSR with an empty subject and the SPIFFE ID as its only SAN.
    pub fn new(id: &Identity) -> Result<CertRequest, rcgen::Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        let csr_pem = p.serialize_request(&key)?.pem()?;
        Ok(CertRequest { key, csr_pem })
    }
}

/// A certificate ready for rustls, with its validity (Unix seconds).
#[derive(Debug)]
pub struct Accepted {
    /// Leaf first, then intermediates (the root is left out: peers have it).
    pub certified: Arc<CertifiedKey>,
    /// Validity start.
    pub not_before: i64,
    /// Validity end.
    pub not_after: i64,
}

/// Checks a CA's answer to `req` for `id` and pairs it with the key. `chain_pem` is leaf first; a trailing
/// self-signed root is dropped from what will be presented.
pub fn accept_chain(
    id: &Identity,
    req: CertRequest,
    chain_pem: &[String],
    roots: &TrustRoots,
    now: SystemTime,
) -> Result<Accepted, ChainError> {
    let mut chain = Vec::with_capacity(chain_pem.len());
    for (index, pem) in chain_pem.iter().enumerate() {
        let mut certs = CertificateDer::pem_slice_iter(pem.as_bytes());
        match certs.next() {
            Some(Ok(c)) if der::not_after(&c).is_some() => chain.push(c),
            _ => return Err(ChainError::Garbage { index }),
        }
        // Some CAs put a whole chain in one string.
        for c in certs {
            chain.push(c.map_err(|_| ChainError::Garbage { index })?);
        }
    }
    let leaf = chain.first().ok_or(ChainError::Empty)?;
    let sans = der::uri_sans(leaf);
    if sans.len() != 1 || sans[0] != id.to_string() {
        return Err(ChainError::WrongIdentity { wanted: id.to_string(), got: sans });
    }
    if der::public_key(leaf).as_deref() != Some(req.key.public_key_raw()) {
        return Err(ChainError::WrongKey);
    }
    // Present leaf and intermediates; peers hold the root.
    if chain.len() > 1 {
        let last = chain.last().expect("non-empty");
        if der::issuer_raw(last).is_some() && der::issuer_raw(last) == der::subject_raw(last) {
            chain.pop();
        }
    }
    roots.verify_workload_chain(&chain[0], &chain[1..], now).map_err(|e| ChainError::Untrusted(e.to_string()))?;
    let not_before = der::not_before(&chain[0]).ok_or(ChainError::Garbage { index: 0 })?;
    let not_after = der::not_after(&chain[0]).ok_or(ChainError::Garbage { index: 0 })?;
    let key = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        req.key.serialize_der(),
    )))
    .map_err(|e| ChainError::Untrusted(format!("our own key is unusable: {e}")))?;
    Ok(Accepted { certified: Arc::new(CertifiedKey::new(chain, key)), not_before, not_after })
}

/// Why a signer refused a CSR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// Not a PEM CSR.
    #[error("not a PEM certificate signing request")]
    NotACsr,
    /// The CSR's signature does not match its key (no proof that the requester holds it).
    #[error("the request is not signed by the key it carries")]
    BadSignature,
    /// Only ECDSA P-256 with SHA-256 is accepted.
    #[error("unsupported key or signature algorithm (ECDSA P-256 with SHA-256 only)")]
    Algorithm,
    /// It does not ask for exactly one SPIFFE workload identity.
    #[error("the request must carry exactly one SAN, a SPIFFE workload ID; it has {0}")]
    Sans(String),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Signing(String),
}

const P256: &[u64] = &[1, 2, 840, 10045, 3, 1, 7];
const ECDSA_SHA256: &[u64] = &[1, 2, 840, 10045, 4, 3, 2];

/// A public key from a CSR, for rcgen.
struct RequestedKey(Vec<u8>);

impl rcgen::PublicKeyData for RequestedKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// A signing CA: its issuer (key and name) and the certificate to append to the chains it issues.
pub struct Signer<'a> {
    /// rcgen's issuer.
    pub issuer: &'a Issuer<'static, KeyPair>,
    /// The CA's certificate (the root, or the intermediate followed by the rest of its chain).
    pub ca_chain: &'a [CertificateDer<'static>],
}

impl Signer<'_> {
    /// Checks a CSR and signs it for `lifetime` (starting a minute ago, for clock skew). Returns the identity
    /// it is for and the chain, PEM, leaf first and the CA's chain after it.
    pub fn sign_request(&self, csr_pem: &str, lifetime: Duration) -> Result<(Identity, Vec<String>), SignError> {
        let now = SystemTime::now();
        self.sign_request_between(csr_pem, now - Duration::from_secs(60), now + lifetime)
    }

    /// [`Signer::sign_request`] with an explicit validity period (tools and tests).
    pub fn sign_request_between(
        &self,
        csr_pem: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<(Identity, Vec<String>), SignError> {
        let csr_der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|_| SignError::NotACsr)?;
        let parts = der::csr(csr_der.as_ref()).ok_or(SignError::NotACsr)?;
        if parts.key_curve.as_deref() != Some(P256) || parts.signature_algorithm != ECDSA_SHA256 {
            return Err(SignError::Algorithm);
        }
        webpki::ring::ECDSA_P256_SHA256
            .verify_signature(&parts.public_key, &parts.info, &parts.signature)
            .map_err(|_| SignError::BadSignature)?;
        let id: Identity = match (&parts.uri_sans[..], parts.other_sans) {
            ([one], 0) => one.parse().map_err(|_| SignError::Sans(format!("{one:?}, not a SPIFFE workload ID")))?,
            (uris, other) => return Err(SignError::Sans(format!("{} URI and {other} other SANs", uris.len()))),
        };
        let pem = issue_for_key(self.issuer, &RequestedKey(parts.public_key), &id, not_before, not_after)
            .map_err(|e| SignError::Signing(e.to_string()))?;
        let mut chain = vec![pem];
        chain.extend(self.ca_chain.iter().map(|c| pem_of(c)));
        Ok((id, chain))
    }
}

/// A certificate as PEM.
pub fn pem_of(c: &CertificateDer<'_>) -> String {
    use std::fmt::Write;
    let b64 = base64(c.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", std::str::from_utf8(line).expect("base64 is ASCII"));
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(T[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Signs a workload leaf for `key`: the SPIFFE ID as the only (URI) SAN, usable by client and server, a
/// random serial, valid from `not_before` to `not_after`.
pub(crate) fn issue_for_key(
    issuer: &Issuer<'static, KeyPair>,
    key: &impl rcgen::PublicKeyData,
    id: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<String, rcgen::Error> {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
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
    Ok(p.signed_by(key, issuer)?.pem())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::LocalCa;

    fn ca() -> (LocalCa, TrustRoots) {
        let (cert, key) = crate::certs::tests::test_ca("cluster.local");
        let ca = LocalCa::from_pem(&cert, &key, Duration::from_secs(3600)).unwrap();
        let roots = TrustRoots::new(&[ca.ca_cert()], "cluster.local").unwrap();
        (ca, roots)
    }

    #[test]
    fn request_signed_and_accepted() {
        let (ca, roots) = ca();
        let id = Identity::new("cluster.local", "ns", "sa");
        let req = CertRequest::new(&id).unwrap();
        let parts = der::csr(
            rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(req.csr_pem.as_bytes()).unwrap().as_ref(),
        )
        .unwrap();
        assert_eq!(parts.uri_sans, [id.to_string()]);
        assert_eq!(parts.other_sans, 0);
        let (signed_for, chain) = ca.signer().sign_request(&req.csr_pem, Duration::from_secs(600)).unwrap();
        assert_eq!(signed_for, id);
        assert_eq!(chain.len(), 2, "leaf and root");
        let ok = accept_chain(&id, req, &chain, &roots, SystemTime::now()).unwrap();
        assert_eq!(ok.certified.cert.len(), 1, "the root is not presented");
        assert!(ok.not_after - ok.not_before >= 600);
    }

    #[test]
    fn a_wrong_answer_is_refused() {
        let (ca, roots) = ca();
        let id = Identity::new("cluster.local", "ns", "sa");
        let other = Identity::new("cluster.local", "ns", "admin");
        let sign = |req: &CertRequest| ca.signer().sign_request(&req.csr_pem, Duration::from_secs(600)).unwrap().1;
        let now = SystemTime::now();

        // Another identity.
        let req_other = CertRequest::new(&other).unwrap();
        let chain = sign(&req_other);
        let e = accept_chain(&id, CertRequest::new(&id).unwrap(), &chain, &roots, now).unwrap_err();
        assert!(matches!(e, ChainError::WrongIdentity { .. }), "{e}");
        // The right identity for another key.
        let chain = sign(&CertRequest::new(&id).unwrap());
        let e = accept_chain(&id, CertRequest::new(&id).unwrap(), &chain, &roots, now).unwrap_err();
        assert_eq!(e, ChainError::WrongKey);
        // An unrelated CA.
        let (rogue, _) = self::ca();
        let req = CertRequest::new(&id).unwrap();
        let chain = rogue.signer().sign_request(&req.csr_pem, Duration::from_secs(600)).unwrap().1;
        assert!(matches!(accept_chain(&id, req, &chain, &roots, now), Err(ChainError::Untrusted(_))));
        // Expired by the time it arrives.
        let req = CertRequest::new(&id).unwrap();
        let chain = sign(&req);
        let later = now + Duration::from_secs(7200);
        assert!(matches!(accept_chain(&id, req, &chain, &roots, later), Err(ChainError::Untrusted(_))));
        // Garbage and nothing.
        let req = CertRequest::new(&id).unwrap();
        let garbage = ["-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_string()];
        assert_eq!(accept_chain(&id, req, &garbage, &roots, now).unwrap_err(), ChainError::Garbage { index: 0 });
        let req = CertRequest::new(&id).unwrap();
        assert_eq!(
            accept_chain(&id, req, &["junk".into()], &roots, now).unwrap_err(),
            ChainError::Garbage { index: 0 }
        );
        assert_eq!(accept_chain(&id, CertRequest::new(&id).unwrap(), &[], &roots, now).unwrap_err(), ChainError::Empty);
    }

    #[test]
    fn the_signer_checks_the_request() {
        let (ca, _) = ca();
        let s = ca.signer();
        let ttl = Duration::from_secs(60);
        assert_eq!(s.sign_request("not a csr", ttl).unwrap_err(), SignError::NotACsr);
        // Two identities, or a DNS name beside the SPIFFE ID.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![
            SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap()),
            SanType::DnsName("evil.example".try_into().unwrap()),
        ];
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        assert!(matches!(s.sign_request(&csr, ttl), Err(SignError::Sans(_))));
        p.subject_alt_names = vec![SanType::URI("https://example.com".try_into().unwrap())];
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        assert!(matches!(s.sign_request(&csr, ttl), Err(SignError::Sans(_))));
        // Another algorithm.
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        p.subject_alt_names = vec![SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap())];
        let csr = p.serialize_request(&ed).unwrap().pem().unwrap();
        assert_eq!(s.sign_request(&csr, ttl).unwrap_err(), SignError::Algorithm);
        // A request whose signature does not match its key: flip a bit of the signature.
        let good = p.serialize_request(&key).unwrap();
        let mut d = good.der().to_vec();
        let last = d.len() - 1;
        d[last] ^= 1;
        let bad = pem_block("CERTIFICATE REQUEST", &d);
        assert_eq!(s.sign_request(&bad, ttl).unwrap_err(), SignError::BadSignature);
    }

    fn pem_block(label: &str, d: &[u8]) -> String {
        pem_of(&CertificateDer::from(d.to_vec())).replace("CERTIFICATE", label)
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
