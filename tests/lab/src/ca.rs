//! The lab's mesh CA: a root certificate and key on disk that every ztunnel's local file CA signs with.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose};

/// Creates a fresh root CA (ECDSA P-256, 10 years) and writes its certificate and key (mode 0600).
pub fn write_ca(cert_path: &Path, key_path: &Path) -> anyhow::Result<()> {
    let (cert, key) = make_ca("Ambit lab root CA", crate::lab::TRUST_DOMAIN)?;
    std::fs::write(cert_path, cert)?;
    std::fs::write(key_path, key)?;
    std::fs::set_permissions(key_path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// A root CA's certificate and key, PEM.
pub fn make_ca(common_name: &str, org: &str) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, org);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = std::time::SystemTime::now();
    params.not_before = (now - std::time::Duration::from_secs(3600)).into();
    params.not_after = (now + std::time::Duration::from_secs(10 * 365 * 24 * 3600)).into();
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}
