//! The lab's mesh CA: a root certificate and key on disk. The lab's control plane signs with it (and its own
//! serving certificate is signed by it, as istiod's is); in the local-file mode every ztunnel's local CA does.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose};

/// Creates a fresh root CA (ECDSA P-256, 10 years) and writes its certificate and key (mode 0600), and a
/// serving certificate for the control plane (`serving`: certificate and key paths) signed by it, for the
/// control plane's IP and istiod's name.
pub fn write_ca(cert_path: &Path, key_path: &Path, serving: Option<(&Path, &Path)>) -> anyhow::Result<()> {
    let (params, key) = ca_params("Ambit lab root CA", crate::lab::TRUST_DOMAIN)?;
    let cert = params.self_signed(&key)?;
    std::fs::write(cert_path, cert.pem())?;
    std::fs::write(key_path, key.serialize_pem())?;
    std::fs::set_permissions(key_path, std::fs::Permissions::from_mode(0o600))?;
    if let Some((serving_cert, serving_key)) = serving {
        use crate::controlplane::{CP_HOSTNAME, CP_IP};
        let issuer = rcgen::Issuer::new(params, key);
        let skey = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        p.subject_alt_names =
            vec![rcgen::SanType::IpAddress(CP_IP.into()), rcgen::SanType::DnsName(CP_HOSTNAME.try_into()?)];
        p.distinguished_name.push(DnType::CommonName, "lab control plane");
        let now = std::time::SystemTime::now();
        p.not_before = (now - std::time::Duration::from_secs(3600)).into();
        p.not_after = (now + std::time::Duration::from_secs(30 * 86400)).into();
        std::fs::write(serving_cert, p.signed_by(&skey, &issuer)?.pem())?;
        std::fs::write(serving_key, skey.serialize_pem())?;
        std::fs::set_permissions(serving_key, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// A workload certificate for `spiffe_id` (its URI SAN, as istiod issues them) signed by the lab's root CA as
/// [`write_ca`] wrote it: the certificate and the key, PEM. For peers that are not Ambit's (a test's own TLS
/// client), which cannot ask the control plane for one.
pub fn issue_workload(ca_key_path: &Path, spiffe_id: &str) -> anyhow::Result<(String, String)> {
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(ca_key_path)?)?;
    // The issuer's name and key are what a signature carries: the root's, rebuilt as write_ca made them.
    let (params, _) = ca_params("Ambit lab root CA", crate::lab::TRUST_DOMAIN)?;
    let issuer = rcgen::Issuer::new(params, ca_key);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(spiffe_id.try_into()?)];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let now = std::time::SystemTime::now();
    p.not_before = (now - std::time::Duration::from_secs(3600)).into();
    p.not_after = (now + std::time::Duration::from_secs(86400)).into();
    Ok((p.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
}

/// A root CA's certificate and key, PEM.
pub fn make_ca(common_name: &str, org: &str) -> anyhow::Result<(String, String)> {
    let (params, key) = ca_params(common_name, org)?;
    Ok((params.self_signed(&key)?.pem(), key.serialize_pem()))
}

fn ca_params(common_name: &str, org: &str) -> anyhow::Result<(CertificateParams, KeyPair)> {
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
    Ok((params, key))
}
