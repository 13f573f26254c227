//! HBONE's server side: the HTTP/2 server on an accepted mTLS connection, and the validation (pure) of what an
//! inbound CONNECT must look like before ztunnel opens anything.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::socket::canonical;

/// Most concurrent streams a client may open on one HBONE connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 200;
/// Largest request header block accepted.
pub const MAX_HEADER_LIST: u32 = 64 * 1024;

/// The HTTP/2 server handshake on an established mTLS connection, with ztunnel's windows and limits.
pub async fn handshake<T: AsyncRead + AsyncWrite + Unpin>(
    tls: T,
    cfg: &crate::config::Config,
) -> Result<h2::server::Connection<T, Bytes>, h2::Error> {
    h2::server::Builder::new()
        .initial_window_size(cfg.h2_stream_window)
        .initial_connection_window_size(cfg.h2_connection_window)
        .max_frame_size(cfg.h2_frame_size)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_send_buffer_size(4 * 1024 * 1024)
        .handshake::<_, Bytes>(tls)
        .await
}

/// Ports an HBONE request may never target: ztunnel's own in-pod listeners (a loop or a bypass).
pub const FORBIDDEN_PORTS: [u16; 3] = ambit_proto::zds::INPOD_PORTS;

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// Not a CONNECT.
    #[error("method {0} is not CONNECT")]
    NotConnect(String),
    /// The authority is missing or not `ip:port`.
    #[error("authority {0:?} is not an ip:port address")]
    BadAuthority(String),
    /// The authority's IP is not the address the request arrived on.
    #[error("authority {target} does not match the HBONE address {local}")]
    AddressMismatch {
        /// The requested target.
        target: SocketAddr,
        /// Where the HBONE connection arrived.
        local: SocketAddr,
    },
    /// The target port is one of ztunnel's.
    #[error("port {0} is reserved for ztunnel")]
    ForbiddenPort(u16),
}

impl Rejection {
    /// The HTTP status to answer with.
    pub fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }

    /// A short reason for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::NotConnect(_) => "not_connect",
            Rejection::BadAuthority(_) => "bad_authority",
            Rejection::AddressMismatch { .. } => "address_mismatch",
            Rejection::ForbiddenPort(_) => "forbidden_port",
        }
    }
}

/// Validates an inbound HBONE request that arrived on `local` (the 15008 address) and returns the target.
pub fn validate(method: &Method, uri: &Uri, local: SocketAddr) -> Result<SocketAddr, Rejection> {
    if method != Method::CONNECT {
        return Err(Rejection::NotConnect(method.as_str().chars().take(32).collect()));
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    if uri.scheme().is_some() || uri.path_and_query().is_some_and(|p| !p.as_str().is_empty() && p.as_str() != "/") {
        return Err(Rejection::BadAuthority(uri.to_string().chars().take(128).collect()));
    }
    let target: SocketAddr =
        authority.parse().map_err(|_| Rejection::BadAuthority(authority.chars().take(128).collect()))?;
    let target = canonical(target);
    if target.port() == 0 {
        return Err(Rejection::BadAuthority(authority.to_string()));
    }
    let local = canonical(local);
    if target.ip() != local.ip() {
        return Err(Rejection::AddressMismatch { target, local });
    }
    if FORBIDDEN_PORTS.contains(&target.port()) {
        return Err(Rejection::ForbiddenPort(target.port()));
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(method: Method, uri: &str) -> Result<SocketAddr, Rejection> {
        validate(&method, &uri.parse().unwrap(), "10.0.0.2:15008".parse().unwrap())
    }

    #[test]
    fn accepts_a_proper_connect() {
        assert_eq!(v(Method::CONNECT, "10.0.0.2:8080"), Ok("10.0.0.2:8080".parse().unwrap()));
        let v6 = validate(&Method::CONNECT, &"[fd00::2]:80".parse().unwrap(), "[fd00::2]:15008".parse().unwrap());
        assert_eq!(v6, Ok("[fd00::2]:80".parse().unwrap()));
        // A dual-stack listener reports IPv4 clients as mapped addresses.
        let mapped =
            validate(&Method::CONNECT, &"10.0.0.2:80".parse().unwrap(), "[::ffff:10.0.0.2]:15008".parse().unwrap());
        assert_eq!(mapped, Ok("10.0.0.2:80".parse().unwrap()));
    }

    #[test]
    fn refuses_the_rest() {
        assert!(matches!(v(Method::GET, "10.0.0.2:8080"), Err(Rejection::NotConnect(_))));
        assert!(matches!(v(Method::CONNECT, "example.com:80"), Err(Rejection::BadAuthority(_))));
        assert!(matches!(v(Method::CONNECT, "10.0.0.2"), Err(Rejection::BadAuthority(_))));
        assert!(matches!(v(Method::CONNECT, "10.0.0.2:0"), Err(Rejection::BadAuthority(_))));
        assert!(matches!(v(Method::CONNECT, "http://10.0.0.2:80/x"), Err(Rejection::BadAuthority(_))));
        assert!(matches!(v(Method::CONNECT, "10.0.0.3:8080"), Err(Rejection::AddressMismatch { .. })));
        for p in FORBIDDEN_PORTS {
            assert_eq!(v(Method::CONNECT, &format!("10.0.0.2:{p}")), Err(Rejection::ForbiddenPort(p)));
        }
    }
}

/// Property test: whatever a peer puts in its request line, validation answers, and what it lets through is
/// a CONNECT to the address the connection arrived on, on an allowed, non-zero port.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn authority() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,40}",
            (
                prop_oneof![
                    Just("10.0.0.2"),
                    Just("10.0.0.3"),
                    Just("[::ffff:10.0.0.2]"),
                    Just("[fd00::2]"),
                    Just("localhost")
                ],
                any::<u16>()
            )
                .prop_map(|(h, p)| format!("{h}:{p}")),
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| format!("{}:{p}", std::net::Ipv4Addr::from(ip))),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::testing::proptest_cases()))]

        #[test]
        fn only_a_connect_to_this_address_passes(method in prop_oneof![Just(Method::CONNECT), Just(Method::GET), Just(Method::POST)], auth in authority()) {
            let local: SocketAddr = "10.0.0.2:15008".parse().unwrap();
            let Ok(uri) = auth.parse::<Uri>() else { return Ok(()) };
            if let Ok(target) = validate(&method, &uri, local) {
                prop_assert_eq!(method, Method::CONNECT);
                prop_assert_eq!(target.ip(), local.ip());
                prop_assert!(target.port() != 0 && !FORBIDDEN_PORTS.contains(&target.port()));
            }
        }
    }
}
