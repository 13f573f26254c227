//! HBONE: TCP carried as HTTP/2 CONNECT streams inside mutual TLS between ztunnels, on port 15008.
//!
//! [`client`] opens the pooled connection (TLS, then the HTTP/2 client handshake) and builds each CONNECT;
//! [`server`] answers on 15008 (the HTTP/2 server handshake) and validates each request before anything is
//! opened. Both sides keep a connection alive with HTTP/2 PINGs ([`keepalive`]) and name a failed TLS
//! handshake the same way in metrics ([`tls_reason`]).

use std::time::Duration;

pub mod client;
pub mod server;

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends an HTTP/2 PING every `interval`; returns (with why) when one goes unanswered for `timeout`. When the
/// connection is going away anyway (a PING cannot be sent), it never returns and lets the connection end.
pub async fn keepalive(ping: Option<h2::PingPong>, interval: Duration, timeout: Duration) -> String {
    let Some(mut ping) = ping else { return std::future::pending().await };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return format!("no answer to an HTTP/2 PING within {timeout:?}"),
        }
    }
}

/// A short reason for a failed handshake, for metrics.
pub fn tls_reason(e: &std::io::Error) -> &'static str {
    use rustls::CertificateError as C;
    let Some(r) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return if e.kind() == std::io::ErrorKind::UnexpectedEof { "eof" } else { "io" };
    };
    match r {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => "unknown_ca",
        rustls::Error::InvalidCertificate(C::Expired) | rustls::Error::InvalidCertificate(C::ExpiredContext { .. }) => {
            "expired"
        }
        rustls::Error::InvalidCertificate(C::NotValidYet)
        | rustls::Error::InvalidCertificate(C::NotValidYetContext { .. }) => "not_yet_valid",
        rustls::Error::InvalidCertificate(C::ApplicationVerificationFailure) => "identity",
        rustls::Error::InvalidCertificate(C::BadSignature) => "bad_signature",
        rustls::Error::InvalidCertificate(_) => "bad_certificate",
        rustls::Error::NoCertificatesPresented => "no_client_certificate",
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::NoApplicationProtocol => "no_alpn",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        _ => "other",
    }
}
