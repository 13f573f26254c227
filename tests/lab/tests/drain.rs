//! Drain: SIGTERM under load sends GOAWAY to HBONE peers, lets open connections carry on until
//! CONNECTION_TERMINATION_DEADLINE, then exits; a connection opened meanwhile waits for the next ztunnel
//! instead of being refused. Needs root.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use lab::demo::{APP_PORT, MESH_NS};
use lab::net::{EchoClient, EchoServer};
use lab::{Lab, LabConfig};
use nix::sys::signal::Signal;

mod common;

const DEADLINE: Duration = Duration::from_secs(3);

#[test]
fn sigterm_under_load_sends_goaway_and_resets_nothing_before_the_deadline() {
    let mut lab = Lab::start(LabConfig {
        enrolled_namespaces: vec![MESH_NS.into()],
        ztunnel_env: vec![("CONNECTION_TERMINATION_DEADLINE".into(), format!("{}s", DEADLINE.as_secs()))],
        ..Default::default()
    })
    .unwrap();
    let client = lab.add_pod_as(0, MESH_NS, "client", "client").unwrap();
    let server = lab.add_pod_as(1, MESH_NS, "server", "server").unwrap();
    let echo = EchoServer::start(&server.netns, SocketAddr::new(server.ip, APP_PORT)).unwrap();

    // Load: connections through the mesh doing 1 KiB round trips back to back; each notes when it first failed.
    let stop = Arc::new(AtomicBool::new(false));
    let failures: Arc<Mutex<Vec<(usize, Instant, String)>>> = Arc::default();
    let mut load = Vec::new();
    for i in 0..4 {
        let mut c = EchoClient::connect(&client.netns, echo.addr(), Duration::from_secs(5)).unwrap();
        let (stop, failures) = (stop.clone(), failures.clone());
        load.push(std::thread::spawn(move || {
            let payload = vec![b'x'; 1024];
            let mut trips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = c.round_trip(&payload) {
                    failures.lock().unwrap().push((i, Instant::now(), format!("{e:#}")));
                    break;
                }
                trips += 1;
            }
            trips
        }));
    }

    // A raw HBONE connection to the server's ztunnel, with one open stream, to watch for GOAWAY.
    let mesh = common::MeshClient::of(&lab);
    let sock = common::tcp_from(&lab.nodes[0].netns, SocketAddr::new(server.ip, ambit_proto::zds::INBOUND_HBONE_PORT));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ip = server.ip;
    let (send, mut body_out, mut body) = rt.block_on(async move {
        let cert = mesh.cert(MESH_NS, "client").await;
        let expected = vec![common::identity(MESH_NS, "server")];
        let tls = common::tls(sock, cert, expected, mesh.roots.clone()).await.unwrap();
        let mut send = common::h2(tls).await.unwrap();
        let req = Request::builder().method(Method::CONNECT).uri(format!("{ip}:{APP_PORT}")).body(()).unwrap();
        let (resp, body_out) = send.send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        (send, body_out, resp.into_body())
    });
    let mut echo_on_stream = |rt: &tokio::runtime::Runtime, what: &'static [u8]| -> anyhow::Result<()> {
        rt.block_on(async {
            body_out.send_data(Bytes::from_static(what), false)?;
            let mut got = Vec::new();
            while !got.windows(what.len()).any(|w| w == what) {
                let chunk = tokio::time::timeout(Duration::from_secs(2), body.data())
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
                body.flow_control().release_capacity(chunk.len())?;
                got.extend_from_slice(&chunk);
            }
            Ok(())
        })
    };
    echo_on_stream(&rt, b"before").unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let t0 = Instant::now();
    lab.nodes[1].ztunnel.as_ref().unwrap().signal(Signal::SIGTERM).unwrap();

    // GOAWAY arrives: the connection takes no new stream.
    let goaway = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let mut s = send.clone();
            let req = Request::builder().method(Method::CONNECT).uri(format!("{ip}:{APP_PORT}")).body(()).unwrap();
            let refused = match s.send_request(req, true) {
                Err(e) => Some(e),
                Ok((resp, _)) => resp.await.err(),
            };
            match refused {
                Some(e) if e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM) => return Ok(e),
                _ if Instant::now() > deadline => return Err("no GOAWAY within 2s of SIGTERM"),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
    goaway.unwrap_or_else(|e| panic!("{e}"));

    // A connection opened now waits (the agent holds the listener) for the ztunnel that comes next.
    let ns_name = client.netns.name().to_string();
    let addr = echo.addr();
    let waiting = std::thread::spawn(move || -> anyhow::Result<()> {
        let ns = lab::Netns::open(&ns_name)?;
        let s = ns.run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)))??;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        EchoClient::from_stream(s)?.round_trip(b"after the restart")
    });

    // Open connections keep working well into the drain.
    std::thread::sleep(DEADLINE.mul_f32(0.6));
    echo_on_stream(&rt, b"during the drain").expect("an open HBONE stream works during the drain");
    assert!(
        failures.lock().unwrap().is_empty(),
        "connections failed during the drain: {:?} (SIGTERM at {t0:?})",
        failures.lock().unwrap()
    );

    // At the deadline ztunnel exits; only then are the remaining connections cut.
    let exit = lab.nodes[1].ztunnel.as_mut().unwrap().wait_timeout(DEADLINE * 3).expect("ztunnel exits after draining");
    assert!(exit.success(), "{exit:?}");
    let exited = t0.elapsed();
    assert!(exited >= DEADLINE.mul_f32(0.9), "ztunnel exited after {exited:?}, before the {DEADLINE:?} deadline");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let trips: Vec<u64> = load.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(trips.iter().all(|&t| t > 10), "every connection carried load: {trips:?}");
    for (i, at, e) in failures.lock().unwrap().iter() {
        let after = at.duration_since(t0);
        assert!(
            after >= DEADLINE.mul_f32(0.9),
            "connection {i} failed {after:?} after SIGTERM, before the deadline: {e}"
        );
    }

    lab.start_ztunnel(1).unwrap();
    waiting.join().unwrap().expect("the connection opened during the drain was served by the next ztunnel");
    drop(rt);
}
