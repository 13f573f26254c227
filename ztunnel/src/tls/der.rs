//! A minimal, bounds-checked DER reader for the few certificate fields ztunnel needs beyond what webpki
//! exposes: the URI SANs (SPIFFE IDs), the validity period, a CA's subject and key identifier (to issue
//! leaves whose issuer name matches the CA byte for byte), and the parts of a PKCS#10 certificate request a CA
//! checks before signing it. Hostile input yields `None`, never a panic.

/// One TLV.
#[derive(Debug, Clone, Copy)]
struct Tlv<'a> {
    tag: u8,
    body: &'a [u8],
    /// The whole encoding, header included.
    raw: &'a [u8],
}

/// Reads one TLV from the front of `input`; returns it and the rest.
fn read(input: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
    let tag = *input.first()?;
    if tag & 0x1f == 0x1f {
        return None; // multi-byte tags never occur in certificates
    }
    let first = *input.get(1)?;
    let (len, hdr) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*input.get(2 + i)?);
        }
        (len, 2 + n)
    };
    let end = hdr.checked_add(len)?;
    if end > input.len() {
        return None;
    }
    Some((Tlv { tag, body: &input[hdr..end], raw: &input[..end] }, &input[end..]))
}

/// Iterates over the TLVs of a constructed body.
fn children(mut body: &[u8]) -> impl Iterator<Item = Tlv<'_>> {
    std::iter::from_fn(move || {
        let (t, rest) = read(body)?;
        body = rest;
        Some(t)
    })
}

const SEQUENCE: u8 = 0x30;
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];
const OID_SKI: &[u8] = &[0x55, 0x1d, 0x0e];

/// The fields of a TBSCertificate we look at.
struct Tbs<'a> {
    serial: Tlv<'a>,
    validity: Tlv<'a>,
    subject: Tlv<'a>,
    spki: Tlv<'a>,
    extensions: Option<Tlv<'a>>,
}

fn tbs(cert_der: &[u8]) -> Option<Tbs<'_>> {
    let (cert, _) = read(cert_der)?;
    if cert.tag != SEQUENCE {
        return None;
    }
    let (tbs, _) = read(cert.body)?;
    if tbs.tag != SEQUENCE {
        return None;
    }
    let mut it = children(tbs.body).peekable();
    if it.peek()?.tag == 0xa0 {
        it.next(); // [0] version
    }
    let serial = it.next()?;
    let _sig_alg = it.next()?;
    let _issuer = it.next()?;
    let validity = it.next()?;
    let subject = it.next()?;
    let spki = it.next()?;
    let extensions = it.find(|t| t.tag == 0xa3);
    Some(Tbs { serial, validity, subject, spki, extensions })
}

/// Each extension's (OID, value) pairs.
fn extensions<'a>(tbs: &Tbs<'a>) -> Vec<(&'a [u8], &'a [u8])> {
    let Some(ext) = tbs.extensions else { return Vec::new() };
    let Some((seq, _)) = read(ext.body) else { return Vec::new() };
    children(seq.body)
        .filter_map(|e| {
            let mut f = children(e.body);
            let oid = f.next().filter(|t| t.tag == 0x06)?;
            let mut v = f.next()?;
            if v.tag == 0x01 {
                v = f.next()?; // critical flag
            }
            (v.tag == 0x04).then_some((oid.body, v.body))
        })
        .collect()
}

/// The URI subject alternative names of a certificate.
pub fn uri_sans(cert_der: &[u8]) -> Vec<String> {
    let Some(t) = tbs(cert_der) else { return Vec::new() };
    let mut out = Vec::new();
    for (oid, value) in extensions(&t) {
        if oid != OID_SAN {
            continue;
        }
        let Some((names, _)) = read(value) else { continue };
        for n in children(names.body) {
            // GeneralName uniformResourceIdentifier: [6] IMPLICIT IA5String
            if n.tag == 0x86
                && let Ok(s) = std::str::from_utf8(n.body)
            {
                out.push(s.to_string());
            }
        }
    }
    out
}

/// The subject key identifier, if the certificate has one.
pub fn subject_key_id(cert_der: &[u8]) -> Option<Vec<u8>> {
    let t = tbs(cert_der)?;
    let (_, value) = extensions(&t).into_iter().find(|(oid, _)| *oid == OID_SKI)?;
    let (ski, _) = read(value)?;
    (ski.tag == 0x04).then(|| ski.body.to_vec())
}

/// One attribute of a distinguished name: its OID (DER body) and its string value with the DER string tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAttribute {
    /// OID arcs.
    pub oid: Vec<u64>,
    /// The DER tag of the value (0x0c UTF8String, 0x13 PrintableString, …).
    pub tag: u8,
    /// The value bytes.
    pub value: Vec<u8>,
}

/// The subject name of a certificate, as its attributes in order, plus its raw encoding.
pub fn subject(cert_der: &[u8]) -> Option<(Vec<NameAttribute>, Vec<u8>)> {
    let t = tbs(cert_der)?;
    let mut attrs = Vec::new();
    for rdn in children(t.subject.body) {
        for atv in children(rdn.body) {
            let mut f = children(atv.body);
            let oid = f.next().filter(|x| x.tag == 0x06)?;
            let v = f.next()?;
            attrs.push(NameAttribute { oid: oid_arcs(oid.body)?, tag: v.tag, value: v.body.to_vec() });
        }
    }
    Some((attrs, t.subject.raw.to_vec()))
}

/// The public key bits of the certificate (the content of SubjectPublicKeyInfo's BIT STRING).
pub fn public_key(cert_der: &[u8]) -> Option<Vec<u8>> {
    let t = tbs(cert_der)?;
    let mut f = children(t.spki.body);
    let _alg = f.next()?;
    let bits = f.next().filter(|b| b.tag == 0x03)?;
    let (unused, key) = bits.body.split_first()?;
    (*unused == 0).then(|| key.to_vec())
}

/// The raw encoding of the subject name of the certificate.
pub fn subject_raw(cert_der: &[u8]) -> Option<Vec<u8>> {
    tbs(cert_der).map(|t| t.subject.raw.to_vec())
}

/// The raw encoding of the issuer name of the certificate.
pub fn issuer_raw(cert_der: &[u8]) -> Option<Vec<u8>> {
    let (cert, _) = read(cert_der)?;
    let (tbs, _) = read(cert.body)?;
    let mut it = children(tbs.body).peekable();
    if it.peek()?.tag == 0xa0 {
        it.next();
    }
    it.nth(2).map(|t| t.raw.to_vec())
}

/// `notAfter` as seconds since the Unix epoch.
pub fn not_after(cert_der: &[u8]) -> Option<i64> {
    let t = tbs(cert_der)?;
    let mut v = children(t.validity.body);
    let _nb = v.next()?;
    parse_time(v.next()?)
}

/// `notBefore` as seconds since the Unix epoch.
pub fn not_before(cert_der: &[u8]) -> Option<i64> {
    let t = tbs(cert_der)?;
    parse_time(children(t.validity.body).next()?)
}

/// The serial number in decimal, as Istio's `/config_dump` shows it.
pub fn serial_decimal(cert_der: &[u8]) -> Option<String> {
    let t = tbs(cert_der)?;
    (t.serial.tag == 0x02 && !t.serial.body.is_empty()).then(|| decimal(t.serial.body))
}

/// A big-endian unsigned integer in decimal (serial numbers are at most 20 bytes; a leading 0x00 is allowed).
fn decimal(be: &[u8]) -> String {
    let mut n: Vec<u8> = be.iter().copied().skip_while(|b| *b == 0).collect();
    let mut digits = Vec::new();
    while !n.is_empty() {
        // Divide n by 10 in place, keeping the remainder as the next digit.
        let mut rem = 0u32;
        for b in n.iter_mut() {
            let cur = (rem << 8) | u32::from(*b);
            *b = (cur / 10) as u8;
            rem = cur % 10;
        }
        digits.push(b'0' + rem as u8);
        let zeros = n.iter().take_while(|b| **b == 0).count();
        n.drain(..zeros);
    }
    if digits.is_empty() {
        digits.push(b'0');
    }
    digits.reverse();
    String::from_utf8(digits).expect("ASCII digits")
}

/// Unix seconds as RFC 3339 in UTC (`2026-12-02T22:08:18Z`).
pub fn rfc3339(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The proleptic Gregorian date `days` after 1970-01-01 (the inverse of `days_from_civil`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// What a CA needs from a PKCS#10 certificate signing request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrParts {
    /// The signed part (CertificationRequestInfo), as encoded: what the signature covers.
    pub info: Vec<u8>,
    /// The public key bits (the content of SubjectPublicKeyInfo's BIT STRING).
    pub public_key: Vec<u8>,
    /// The OID of the public key's curve (named-curve parameter), for EC keys.
    pub key_curve: Option<Vec<u64>>,
    /// The signature algorithm's OID.
    pub signature_algorithm: Vec<u64>,
    /// The signature bits.
    pub signature: Vec<u8>,
    /// The URI subject alternative names the request asks for.
    pub uri_sans: Vec<String>,
    /// How many subject alternative names of other kinds (DNS, IP, e-mail, …) it asks for.
    pub other_sans: usize,
}

const OID_EXTENSION_REQUEST: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x0e];

/// The parts of a DER certificate signing request, or `None` if it is not one.
pub fn csr(der: &[u8]) -> Option<CsrParts> {
    let (req, rest) = read(der)?;
    if req.tag != SEQUENCE || !rest.is_empty() {
        return None;
    }
    let mut top = children(req.body);
    let info = top.next().filter(|t| t.tag == SEQUENCE)?;
    let sig_alg = top.next().filter(|t| t.tag == SEQUENCE)?;
    let sig = top.next().filter(|t| t.tag == 0x03)?;
    let mut f = children(info.body);
    let _version = f.next().filter(|t| t.tag == 0x02)?;
    let _subject = f.next().filter(|t| t.tag == SEQUENCE)?;
    let spki = f.next().filter(|t| t.tag == SEQUENCE)?;
    let attributes = f.next().filter(|t| t.tag == 0xa0);
    let mut k = children(spki.body);
    let key_alg = k.next().filter(|t| t.tag == SEQUENCE)?;
    let key_curve = children(key_alg.body).nth(1).filter(|t| t.tag == 0x06).and_then(|t| oid_arcs(t.body));
    let bits = |t: Tlv<'_>| -> Option<Vec<u8>> {
        let (unused, b) = t.body.split_first()?;
        (*unused == 0).then(|| b.to_vec())
    };
    let public_key = bits(k.next().filter(|t| t.tag == 0x03)?)?;
    let (mut uri_sans, mut other_sans) = (Vec::new(), 0);
    for attr in attributes.map(|a| children(a.body).collect::<Vec<_>>()).unwrap_or_default() {
        let mut a = children(attr.body);
        if a.next().filter(|t| t.tag == 0x06)?.body != OID_EXTENSION_REQUEST {
            continue;
        }
        for exts in children(a.next()?.body) {
            for ext in children(exts.body) {
                let mut e = children(ext.body);
                let oid = e.next().filter(|t| t.tag == 0x06)?;
                let mut v = e.next()?;
                if v.tag == 0x01 {
                    v = e.next()?;
                }
                if oid.body != OID_SAN || v.tag != 0x04 {
                    continue;
                }
                let (names, _) = read(v.body)?;
                for n in children(names.body) {
                    match (n.tag, std::str::from_utf8(n.body)) {
                        (0x86, Ok(s)) => uri_sans.push(s.to_string()),
                        _ => other_sans += 1,
                    }
                }
            }
        }
    }
    Some(CsrParts {
        info: info.raw.to_vec(),
        public_key,
        key_curve,
        signature_algorithm: oid_arcs(children(sig_alg.body).next().filter(|t| t.tag == 0x06)?.body)?,
        signature: bits(sig)?,
        uri_sans,
        other_sans,
    })
}

fn parse_time(t: Tlv<'_>) -> Option<i64> {
    let s = std::str::from_utf8(t.body).ok()?;
    let s = s.strip_suffix('Z')?;
    let (year, rest) = match t.tag {
        0x17 if s.len() == 12 => {
            let yy: i64 = s[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        0x18 if s.len() == 14 => (s[..4].parse().ok()?, &s[4..]),
        _ => return None,
    };
    let num = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (mo, d, h, mi, se) = (num(0)?, num(2)?, num(4)?, num(6)?, num(8)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    Some(days_from_civil(year, mo, d) * 86400 + h * 3600 + mi * 60 + se)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn oid_arcs(body: &[u8]) -> Option<Vec<u64>> {
    let mut arcs = Vec::new();
    let mut acc: u64 = 0;
    for (i, b) in body.iter().enumerate() {
        acc = acc.checked_mul(128)? | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (acc / 40).min(2);
                arcs.push(first);
                arcs.push(acc - first * 40);
            } else {
                arcs.push(acc);
            }
            acc = 0;
        } else if i == body.len() - 1 {
            return None;
        }
    }
    (!arcs.is_empty()).then_some(arcs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_cert(sans: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names =
            sans.iter().map(|s| rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*s).unwrap())).collect();
        p.distinguished_name.push(rcgen::DnType::OrganizationName, "cluster.local");
        // A CA, so that rcgen adds a subject key identifier.
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.not_before = rcgen::date_time_ymd(2024, 2, 29);
        p.not_after = rcgen::date_time_ymd(2051, 12, 31);
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_sans_validity_and_subject() {
        let der = make_cert(&["spiffe://cluster.local/ns/a/sa/b", "https://example.com/x"]);
        assert_eq!(uri_sans(&der), vec!["spiffe://cluster.local/ns/a/sa/b", "https://example.com/x"]);
        assert_eq!(not_before(&der), Some(1709164800)); // 2024-02-29T00:00:00Z
        assert_eq!(not_after(&der), Some(2587593600)); // 2051-12-31T00:00:00Z
        let (attrs, raw) = subject(&der).unwrap();
        assert!(attrs.iter().any(|a| a.oid == vec![2, 5, 4, 10] && a.value == b"cluster.local"));
        assert_eq!(Some(raw), issuer_raw(&der), "self-signed: subject == issuer");
        assert!(subject_key_id(&der).is_some());
    }

    #[test]
    fn hostile_input_never_panics() {
        let der = make_cert(&["spiffe://td/ns/a/sa/b"]);
        // Every truncation and every single-byte corruption parses to something or nothing, never a panic.
        for n in 0..der.len() {
            let _ = uri_sans(&der[..n]);
            let _ = not_after(&der[..n]);
            let _ = subject(&der[..n]);
        }
        for i in 0..der.len() {
            for v in [0x00, 0x7f, 0x80, 0x84, 0xff] {
                let mut d = der.clone();
                d[i] = v;
                let _ = uri_sans(&d);
                let _ = subject_key_id(&d);
                let _ = not_after(&d);
                let _ = subject(&d);
            }
        }
        assert!(uri_sans(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_empty());
    }

    #[test]
    fn reads_a_certificate_request() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![
            rcgen::SanType::URI(rcgen::string::Ia5String::try_from("spiffe://td/ns/a/sa/b").unwrap()),
            rcgen::SanType::DnsName("x.example".try_into().unwrap()),
        ];
        let der = p.serialize_request(&key).unwrap().der().to_vec();
        let c = csr(&der).unwrap();
        assert_eq!(c.uri_sans, ["spiffe://td/ns/a/sa/b"]);
        assert_eq!(c.other_sans, 1);
        assert_eq!(c.public_key, key.public_key_raw());
        assert_eq!(c.key_curve, Some(vec![1, 2, 840, 10045, 3, 1, 7])); // P-256
        assert_eq!(c.signature_algorithm, vec![1, 2, 840, 10045, 4, 3, 2]); // ecdsa-with-SHA256
        for n in 0..der.len() {
            assert!(csr(&der[..n]).is_none() || n == der.len());
        }
        for i in 0..der.len() {
            let mut d = der.clone();
            d[i] ^= 0xff;
            let _ = csr(&d);
        }
        assert!(csr(b"").is_none());
        assert!(csr(&make_cert(&["spiffe://td/ns/a/sa/b"])).is_none(), "a certificate is not a request");
    }

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11017);
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_868_800 - 1), "2000-02-29T23:59:59Z");
        assert_eq!(rfc3339(1_796_249_298), "2026-12-02T22:08:18Z");
    }

    #[test]
    fn serial_numbers_in_decimal() {
        assert_eq!(decimal(&[0]), "0");
        assert_eq!(decimal(&[0x00, 0xff]), "255");
        assert_eq!(decimal(&[0x01, 0x00]), "256");
        assert_eq!(decimal(&[0xff; 8]), u64::MAX.to_string());
        assert_eq!(decimal(&[0x01, 0, 0, 0, 0, 0, 0, 0, 0]), "18446744073709551616");
        let der = make_cert(&["spiffe://td/ns/a/sa/b"]);
        let s = serial_decimal(&der).expect("a serial");
        assert!(!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()), "{s}");
        for n in 0..der.len() {
            let _ = serial_decimal(&der[..n]);
        }
    }
}
