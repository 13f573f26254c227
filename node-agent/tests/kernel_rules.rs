//! The generated in-pod rules applied by the agent's own code in a throwaway netns, checked with real traffic.
//! Needs root (fails loudly without it).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use ambit_agent::listeners::PodListeners;
use ambit_agent::netns::PodNetns;
use ambit_agent::rules::{self, InpodConfig, apply, routing};
use lab::Netns;
use socket2::{Domain, SockAddr, Socket, Type};

const POD: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const PROBE: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);

struct Topo {
    pod: Netns,
    peer: Netns,
}

fn topo() -> Topo {
    lab::require_root();
    let id = lab::util::unique_id();
    let pod = Netns::create(&format!("ambit-k{id}-pod")).unwrap();
    let peer = Netns::create(&format!("ambit-k{id}-peer")).unwrap();
    pod.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer.name()]).unwrap();
    pod.ip(&["addr", "add", "10.77.0.2/24", "dev", "eth0"]).unwrap();
    pod.ip(&["link", "set", "eth0", "up"]).unwrap();
    pod.ip(&["route", "add", "default", "via", "10.77.0.1"]).unwrap();
    peer.ip(&["addr", "add", "10.77.0.1/24", "dev", "eth0"]).unwrap();
    peer.ip(&["addr", "add", "169.254.7.127/32", "dev", "eth0"]).unwrap();
    peer.ip(&["link", "set", "eth0", "up"]).unwrap();
    Topo { pod, peer }
}

fn listen(ns: &Netns, port: u16) -> TcpListener {
    let l = ns.run(move || TcpListener::bind(("0.0.0.0", port))).unwrap().unwrap();
    l.set_nonblocking(true).unwrap();
    l
}

fn accept_within(l: &TcpListener, t: Duration) -> Option<(TcpStream, SocketAddr)> {
    let deadline = Instant::now() + t;
    loop {
        match l.accept() {
            Ok((s, a)) => {
                s.set_nonblocking(false).unwrap();
                return Some((s, a));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(_) => return None,
        }
    }
}

/// Connects from inside `ns`, optionally with a socket mark and a (possibly foreign) source address.
fn connect(ns: &Netns, dst: SocketAddrV4, mark: Option<u32>, src: Option<SocketAddrV4>) -> std::io::Result<TcpStream> {
    ns.run(move || {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        if let Some(m) = mark {
            s.set_mark(m)?;
        }
        if let Some(src) = src {
            s.set_ip_transparent_v4(true)?;
            s.bind(&SockAddr::from(src))?;
        }
        s.connect_timeout(&SockAddr::from(dst), Duration::from_secs(2))?;
        Ok(TcpStream::from(s))
    })
    .unwrap()
}

fn listeners_from(pl: &PodListeners) -> Vec<TcpListener> {
    pl.fds()
        .into_iter()
        .map(|fd| {
            let l = TcpListener::from(fd.try_clone_to_owned().unwrap());
            l.set_nonblocking(true).unwrap();
            l
        })
        .collect()
}

fn original_dst(s: &TcpStream) -> SocketAddr {
    socket2::SockRef::from(s).original_dst_v4().unwrap().as_socket().unwrap()
}

async fn install(pod: &PodNetns, cfg: InpodConfig) {
    pod.run(move || {
        apply::nft_run(&rules::nft_apply_script(cfg)).unwrap();
        routing::install(cfg).unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_what_it_should_and_nothing_else() {
    let t = topo();
    let handle = PodNetns::open(&t.pod.path()).unwrap();
    let cfg = InpodConfig { ipv4: true, ipv6: false };
    install(&handle, cfg).await;
    let pl = handle.run(|| PodListeners::bind_here(false)).await.unwrap().unwrap();
    assert_eq!(pl.ports(), vec![15001, 15006, 15008]);
    let [outbound, inbound, hbone] = <[TcpListener; 3]>::try_from(listeners_from(&pl)).unwrap();
    let app = listen(&t.pod, 8080);
    let remote = listen(&t.peer, 9000);
    let wait = Duration::from_secs(2);

    // Outbound TCP from the app is captured on 15001 with its original destination.
    let _c = connect(&t.pod, SocketAddrV4::new(PEER, 9000), None, None).unwrap();
    let (s, _) = accept_within(&outbound, wait).expect("outbound capture");
    assert_eq!(original_dst(&s), SocketAddr::from((PEER, 9000)));
    assert!(accept_within(&remote, Duration::from_millis(100)).is_none(), "uncaptured outbound leaked");

    // ztunnel's own sockets (mark 0x539) go out untouched.
    let _c = connect(&t.pod, SocketAddrV4::new(PEER, 9000), Some(rules::ZTUNNEL_MARK), None).unwrap();
    assert!(accept_within(&remote, wait).is_some(), "marked traffic must not be captured");

    // Loopback and the pod's own IP stay local.
    let _c = connect(&t.pod, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080), None, None).unwrap();
    assert!(accept_within(&app, wait).is_some(), "loopback must not be captured");
    let _c = connect(&t.pod, SocketAddrV4::new(POD, 8080), None, None).unwrap();
    assert!(accept_within(&app, wait).is_some(), "traffic to the pod's own IP must stay local");

    // Inbound plaintext lands on 15006 with its original destination; HBONE reaches 15008 directly.
    let _c = connect(&t.peer, SocketAddrV4::new(POD, 8080), None, None).unwrap();
    let (s, peer) = accept_within(&inbound, wait).expect("inbound capture");
    assert_eq!(original_dst(&s), SocketAddr::from((POD, 8080)));
    assert_eq!(peer.ip(), std::net::IpAddr::V4(PEER));
    assert!(accept_within(&app, Duration::from_millis(100)).is_none(), "uncaptured inbound leaked");
    let _c = connect(&t.peer, SocketAddrV4::new(POD, 15008), None, None).unwrap();
    assert!(accept_within(&hbone, wait).is_some(), "HBONE must reach 15008");

    // Kubelet probes (SNATed to 169.254.7.127 on the node) reach the app directly.
    let _c = connect(&t.peer, SocketAddrV4::new(POD, 8080), None, Some(SocketAddrV4::new(PROBE, 0))).unwrap();
    assert!(accept_within(&app, wait).is_some(), "probes must bypass capture");

    // ztunnel's connection to the app, spoofing the client's IP: the app sees the client, and its replies
    // return to ztunnel through the connmark and table 100 instead of leaving the pod.
    let mut z =
        connect(&t.pod, SocketAddrV4::new(POD, 8080), Some(rules::ZTUNNEL_MARK), Some(SocketAddrV4::new(PEER, 0)))
            .expect("spoofed connect from inside the pod");
    let (mut a, seen) = accept_within(&app, wait).expect("app accepts ztunnel's connection");
    assert_eq!(seen.ip(), std::net::IpAddr::V4(PEER), "the app sees the original client IP");
    a.write_all(b"pong").unwrap();
    z.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4];
    z.read_exact(&mut buf).expect("the reply came back to ztunnel");
    assert_eq!(&buf, b"pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_is_idempotent_and_removal_is_complete() {
    let t = topo();
    let handle = PodNetns::open(&t.pod.path()).unwrap();
    let cfg = InpodConfig { ipv4: true, ipv6: false };
    install(&handle, cfg).await;
    let first = t.pod.exec("nft", &["list", "ruleset"]).unwrap();
    install(&handle, cfg).await;
    let second = t.pod.exec("nft", &["list", "ruleset"]).unwrap();
    assert_eq!(first, second, "re-applying changed the ruleset");
    let rules_out = t.pod.ip(&["rule", "show"]).unwrap();
    assert_eq!(rules_out.matches("fwmark 0x111/0xfff lookup 100").count(), 1, "{rules_out}");
    assert!(t.pod.ip(&["route", "show", "table", "100"]).unwrap().contains("local default dev lo"));
    assert!(handle.run(move || routing::present(cfg).unwrap()).await.unwrap());

    handle
        .run(move || {
            apply::nft_run(&rules::nft_delete_script()).unwrap();
            routing::remove(cfg).unwrap();
            // Removing what is not there is fine too.
            apply::nft_run(&rules::nft_delete_script()).unwrap();
            routing::remove(cfg).unwrap();
        })
        .await
        .unwrap();
    assert_eq!(t.pod.exec("nft", &["list", "ruleset"]).unwrap().trim(), "");
    assert!(!t.pod.ip(&["rule", "show"]).unwrap().contains("0x111"));
    assert_eq!(t.pod.ip(&["route", "show", "table", "100"]).unwrap().trim(), "");
    assert!(!handle.run(move || routing::present(cfg).unwrap()).await.unwrap());

    // And traffic flows uncaptured again.
    let remote = listen(&t.peer, 9000);
    let _c = connect(&t.pod, SocketAddrV4::new(PEER, 9000), None, None).unwrap();
    assert!(accept_within(&remote, Duration::from_secs(2)).is_some());
}

#[tokio::test]
async fn a_vanished_or_fake_netns_is_a_clear_error() {
    lab::require_root();
    let e = PodNetns::open(std::path::Path::new("/var/run/netns/ambit-never-existed")).unwrap_err();
    assert!(e.to_string().contains("is gone"), "{e}");
    let f = std::env::temp_dir().join(format!("ambit-not-a-netns-{}", std::process::id()));
    std::fs::write(&f, b"x").unwrap();
    let e = PodNetns::open(&f).unwrap_err();
    assert!(e.to_string().contains("not a network namespace"), "{e}");
    std::fs::remove_file(&f).unwrap();
}
