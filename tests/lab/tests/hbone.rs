//! Hostile HBONE input against a real ztunnel: wrong methods and authorities, reserved ports, oversized headers,
//! garbage instead of TLS and a client that never handshakes — each answered or closed and counted, while a
//! proper CONNECT on the same connection still works. Needs root.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use lab::demo::{APP_PORT, MESH_NS};
use lab::net::EchoServer;
use lab::{Lab, LabConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|s| l.contains(s)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn hostile_requests_get_the_right_status_and_never_stall_the_connection() {
    use ztunnel::certs::{CaSource, CertStore, LocalCa};
    use ztunnel::identity::Identity;
    use ztunnel::tls::{TrustRoots, client_config};

    let lab = Lab::start(LabConfig { enrolled_namespaces: vec![MESH_NS.into()], ..Default::default() }).unwrap();
    let server = lab.add_pod_as(1, MESH_NS, "server", "server").unwrap();
    let _echo = EchoServer::start(&server.netns, SocketAddr::new(server.ip, APP_PORT)).unwrap();
    let ttl = Duration::from_secs(3600);
    let ca = LocalCa::load(&lab.dir.join("ca-cert.pem"), &lab.dir.join("ca-key.pem"), ttl).unwrap();
    let roots = Arc::new(TrustRoots::new(&[ca.ca_cert()], "cluster.local").unwrap());
    let store = CertStore::new(CaSource::Local(ca));
    let hbone = SocketAddr::new(server.ip, 15008);
    let node = &lab.nodes[0].netns;
    let connect =
        || node.run(move || std::net::TcpStream::connect_timeout(&hbone, Duration::from_secs(2))).unwrap().unwrap();
    let (silent, garbage, sock) = (connect(), connect(), connect());

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ip = server.ip;
    let statuses = rt.block_on(async move {
        // A client that never starts its handshake, and one that sends garbage instead of TLS.
        let _silent = silent;
        garbage.set_nonblocking(true).unwrap();
        let mut garbage = tokio::net::TcpStream::from_std(garbage).unwrap();
        garbage.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, b'x', b'y', b'z']).await.unwrap();
        garbage.write_all(&vec![0xa5; 70_000]).await.ok();
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match garbage.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "garbage instead of TLS was not closed");

        sock.set_nonblocking(true).unwrap();
        let tcp = tokio::net::TcpStream::from_std(sock).unwrap();
        let cert = store.fetch(&Identity::new("cluster.local", MESH_NS, "client")).await.unwrap();
        let cfg = Arc::new(client_config(
            cert.certified.clone(),
            vec![Identity::new("cluster.local", MESH_NS, "server")],
            roots,
        ));
        let name = rustls::pki_types::ServerName::IpAddress(ip.into());
        let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.unwrap();
        let (send, conn) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(conn);
        let mut send = send.ready().await.unwrap();
        let mut statuses = Vec::new();
        let attempts: Vec<(Method, String, usize)> = vec![
            (Method::GET, format!("http://{ip}:{APP_PORT}/"), 0),
            (Method::CONNECT, format!("10.255.255.1:{APP_PORT}"), 0),
            (Method::CONNECT, format!("{ip}:15006"), 0),
            (Method::CONNECT, format!("{ip}:15008"), 0),
            (Method::CONNECT, format!("{ip}:{APP_PORT}"), 64 * 1024),
            (Method::CONNECT, format!("{ip}:9"), 0),
        ];
        for (method, uri, padding) in attempts {
            let mut req = Request::builder().method(method).uri(uri);
            if padding > 0 {
                req = req.header("x-padding", "p".repeat(padding));
            }
            let outcome = match send.send_request(req.body(()).unwrap(), true) {
                Ok((resp, _)) => match tokio::time::timeout(Duration::from_secs(5), resp).await {
                    Ok(Ok(r)) => Ok(r.status()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("no answer".into()),
                },
                Err(e) => Err(e.to_string()),
            };
            statuses.push(outcome);
            send = send.ready().await.expect("the connection survives a bad request");
        }
        // After all that, on the same connection, a proper CONNECT works.
        let req = Request::builder().method(Method::CONNECT).uri(format!("{ip}:{APP_PORT}")).body(()).unwrap();
        let (resp, mut body_out) = send.send_request(req, false).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), resp).await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        body_out.send_data(Bytes::from_static(b"hello\n"), false).unwrap();
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("hello") {
            let chunk = tokio::time::timeout(Duration::from_secs(5), body.data()).await.unwrap().unwrap().unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
            got.extend_from_slice(&chunk);
        }
        statuses
    });
    let bad = StatusCode::BAD_REQUEST;
    assert_eq!(statuses[..4], [Ok(bad), Ok(bad), Ok(bad), Ok(bad)], "{statuses:?}");
    assert!(statuses[4].is_err() || statuses[4] == Ok(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE), "{statuses:?}");
    assert_eq!(statuses[5], Ok(StatusCode::SERVICE_UNAVAILABLE), "{statuses:?}");

    let m = lab.nodes[1].metrics().unwrap();
    for reason in ["not_connect", "address_mismatch", "forbidden_port", "upstream_unavailable"] {
        let labels = [&format!("reason=\"{reason}\"") as &str];
        assert!(metric(&m, "ztunnel_hbone_rejected_total", &labels) >= 1.0, "{reason}: {m}");
    }
    assert!(metric(&m, "ztunnel_tls_handshake_failures_total", &["direction=\"inbound\""]) >= 1.0, "{m}");
    let z = lab.nodes[1].ztunnel.as_ref().unwrap();
    assert!(!z.log().contains("panicked"), "{}", z.log());
}
