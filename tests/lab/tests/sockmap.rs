//! The sockmap short-cut of `lab bench --sockmap` (issue 16, item 4): it carries the bytes of connections
//! inside the namespaces it is enabled for, socket to socket, and touches nothing else. Needs root.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

use lab::load::packets_sent;
use lab::netns::Netns;
use lab::sockmap::Shortcut;

/// Opens a connection to `addr` inside `ns`, sends `n` bytes each way through it, and returns what came back
/// and the packets the namespace sent meanwhile.
fn exchange(ns: &Netns, addr: SocketAddr, n: usize) -> (Vec<u8>, u64) {
    let before = packets_sent(ns).unwrap();
    let got = ns
        .run(move || {
            let l = TcpListener::bind(addr).unwrap();
            let server = std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                let mut buf = vec![0; n];
                s.read_exact(&mut buf).unwrap();
                s.write_all(&buf).unwrap();
            });
            let mut c = TcpStream::connect(addr).unwrap();
            let sent: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            c.write_all(&sent).unwrap();
            let mut back = vec![0; n];
            c.read_exact(&mut back).unwrap();
            server.join().unwrap();
            assert_eq!(back, sent, "the bytes came back changed");
            back
        })
        .unwrap();
    (got, packets_sent(ns).unwrap() - before)
}

#[test]
fn the_short_cut_carries_in_namespace_connections_without_packets_and_only_where_enabled() {
    lab::util::require_root();
    let a = Netns::create(&format!("sockmap-a-{}", lab::util::unique_id())).unwrap();
    let b = Netns::create(&format!("sockmap-b-{}", lab::util::unique_id())).unwrap();
    let mut s = Shortcut::load().unwrap();
    let addr: SocketAddr = "127.0.0.1:7400".parse().unwrap();
    const N: usize = 4 << 20;

    // Not enabled anywhere: 4 MiB each way over loopback takes packets.
    let (_, packets) = exchange(&a, addr, N);
    assert!(packets > 100, "plain loopback sent only {packets} packets");

    s.enable(&a).unwrap();
    let (_, packets) = exchange(&a, addr, N);
    // The handshake and the teardown still take packets; the 8 MiB do not.
    assert!(packets < 20, "the short-cut connection sent {packets} packets");
    // A namespace it is not enabled for keeps the normal path.
    let (_, packets) = exchange(&b, addr, N);
    assert!(packets > 100, "a connection in another netns was short-cut ({packets} packets)");

    s.disable(&a).unwrap();
    let (_, packets) = exchange(&a, addr, N);
    assert!(packets > 100, "a connection after disable was short-cut ({packets} packets)");
    assert_eq!(s.sockets(), 0, "closed connections left sockets in the map");
    drop(s);
    a.delete().unwrap();
    b.delete().unwrap();
}
