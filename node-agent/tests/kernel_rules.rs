//! The in-pod rules and the node's probe rules, applied by the agent's own code in throwaway namespaces and
//! checked with real traffic, for each backend (nftables, iptables-nft, iptables-legacy) and both address
//! families. Needs root (fails loudly without it).
//!
//! Topology: `remote` ─ `node` ─ `pod`. The pod's default route is the node, which forwards to the remote.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use ambit_agent::listeners::PodListeners;
use ambit_agent::netns::PodNetns;
use ambit_agent::rules::host::ProbeSet;
use ambit_agent::rules::{self, Backend, Flavor, InpodConfig, routing};
use lab::Netns;
use socket2::{Domain, SockAddr, Socket, Type};

struct Topo {
    pod: Netns,
    node: Netns,
    remote: Netns,
}

struct Addrs {
    pod: IpAddr,
    node: IpAddr,
    remote: IpAddr,
    probe: IpAddr,
    loopback: IpAddr,
}

fn v4() -> Addrs {
    Addrs {
        pod: "10.77.0.2".parse().unwrap(),
        node: "10.77.0.1".parse().unwrap(),
        remote: "10.78.0.2".parse().unwrap(),
        probe: rules::PROBE_SNAT_V4.into(),
        loopback: "127.0.0.1".parse().unwrap(),
    }
}

fn v6() -> Addrs {
    Addrs {
        pod: "fd00:77::2".parse().unwrap(),
        node: "fd00:77::1".parse().unwrap(),
        remote: "fd00:78::2".parse().unwrap(),
        probe: rules::PROBE_SNAT_V6.into(),
        loopback: "::1".parse().unwrap(),
    }
}

fn topo() -> Topo {
    lab::require_root();
    let id = lab::util::unique_id();
    let pod = Netns::create(&format!("ambit-k{id}-pod")).unwrap();
    let node = Netns::create(&format!("ambit-k{id}-node")).unwrap();
    let remote = Netns::create(&format!("ambit-k{id}-remote")).unwrap();
    for ns in [&pod, &node, &remote] {
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0").unwrap();
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0").unwrap();
    }
    node.sysctl("net.ipv4.ip_forward", "1").unwrap();
    node.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
    pod.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "pod0", "netns", node.name()]).unwrap();
    remote.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "remote0", "netns", node.name()]).unwrap();
    let up = |ns: &Netns, dev: &str, addrs: &[&str]| {
        for a in addrs {
            ns.ip(&["addr", "add", a, "dev", dev, "nodad"]).unwrap();
        }
        ns.ip(&["link", "set", dev, "up"]).unwrap();
    };
    up(&pod, "eth0", &["10.77.0.2/24", "fd00:77::2/64"]);
    up(&node, "pod0", &["10.77.0.1/24", "fd00:77::1/64"]);
    up(&node, "remote0", &["10.78.0.1/24", "fd00:78::1/64"]);
    up(&remote, "eth0", &["10.78.0.2/24", "fd00:78::2/64"]);
    pod.ip(&["route", "add", "default", "via", "10.77.0.1"]).unwrap();
    pod.ip(&["-6", "route", "add", "default", "via", "fd00:77::1"]).unwrap();
    remote.ip(&["route", "add", "default", "via", "10.78.0.1"]).unwrap();
    remote.ip(&["-6", "route", "add", "default", "via", "fd00:78::1"]).unwrap();
    Topo { pod, node, remote }
}

fn listen(ns: &Netns, ip: IpAddr, port: u16) -> TcpListener {
    let unspecified: IpAddr = if ip.is_ipv4() { "0.0.0.0".parse().unwrap() } else { "::".parse().unwrap() };
    let l = ns.run(move || TcpListener::bind((unspecified, port))).unwrap().unwrap();
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
fn connect(ns: &Netns, dst: SocketAddr, mark: Option<u32>, src: Option<IpAddr>) -> std::io::Result<TcpStream> {
    ns.run(move || {
        let s = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
        if let Some(m) = mark {
            s.set_mark(m)?;
        }
        if let Some(src) = src {
            if src.is_ipv4() {
                s.set_ip_transparent_v4(true)?
            } else {
                s.set_ip_transparent_v6(true)?
            };
            s.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
        }
        s.connect_timeout(&SockAddr::from(dst), Duration::from_secs(2))?;
        Ok(TcpStream::from(s))
    })
    .unwrap()
}

/// The connection's MSS (TCP_MAXSEG).
fn mss(s: &TcpStream) -> u32 {
    socket2::SockRef::from(s).tcp_mss().unwrap()
}

fn original_dst(s: &TcpStream) -> SocketAddr {
    let r = socket2::SockRef::from(s);
    // A dual-stack listener's IPv4 connections have v4-mapped local addresses but IPv4 conntrack entries.
    let a =
        if s.local_addr().unwrap().ip().to_canonical().is_ipv4() { r.original_dst_v4() } else { r.original_dst_v6() };
    let a = a.unwrap().as_socket().unwrap();
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

const DUAL: InpodConfig = InpodConfig { ipv4: true, ipv6: true, loopback_route: true };

async fn install(pod: &PodNetns, backend: Backend) {
    pod.run(move || {
        backend.install_pod(DUAL).unwrap();
        routing::install(DUAL).unwrap();
    })
    .await
    .unwrap();
}

/// Every redirection, bypass and return path of one backend, over one address family.
fn check_family(t: &Topo, pl: &PodListeners, a: &Addrs) {
    let ls: Vec<TcpListener> = pl
        .fds()
        .into_iter()
        .map(|fd| {
            let l = TcpListener::from(fd.try_clone_to_owned().unwrap());
            l.set_nonblocking(true).unwrap();
            l
        })
        .collect();
    let [outbound, inbound, hbone] = <[TcpListener; 3]>::try_from(ls).unwrap();
    let app = listen(&t.pod, a.pod, 8080);
    let remote = listen(&t.remote, a.remote, 9000);
    let wait = Duration::from_secs(2);
    let quiet = Duration::from_millis(100);
    let at = |ip: IpAddr, port: u16| SocketAddr::new(ip, port);

    // Outbound TCP from the app is captured on 15001 with its original destination, and crosses loopback
    // with loopback's segment size, not the pod interface's (1500 bytes here).
    let c = connect(&t.pod, at(a.remote, 9000), None, None).unwrap();
    let (s, _) = accept_within(&outbound, wait).expect("outbound capture");
    assert_eq!(original_dst(&s), at(a.remote, 9000));
    assert!(accept_within(&remote, quiet).is_none(), "uncaptured outbound leaked");
    assert!(mss(&c) > 1500 && mss(&s) > 1500, "the app's captured connection has MSS {} and {}", mss(&c), mss(&s));
    // Uncaptured, the same connection is cut to the interface's MTU: that is what the loopback route changes.
    let z = connect(&t.pod, at(a.remote, 9000), Some(rules::ZTUNNEL_MARK), None).unwrap();
    assert!(mss(&z) < 1500, "a connection over the pod's interface has MSS {}", mss(&z));
    drop(z);
    let _ = accept_within(&remote, wait);

    // ztunnel's own sockets (mark 0x539) go out untouched.
    let _c = connect(&t.pod, at(a.remote, 9000), Some(rules::ZTUNNEL_MARK), None).unwrap();
    let (_, from) = accept_within(&remote, wait).expect("marked traffic must not be captured");
    assert_eq!(from.ip().to_canonical(), a.pod);

    // Loopback and the pod's own IP stay local.
    let _c = connect(&t.pod, at(a.loopback, 8080), None, None).unwrap();
    assert!(accept_within(&app, wait).is_some(), "loopback must not be captured");
    let _c = connect(&t.pod, at(a.pod, 8080), None, None).unwrap();
    assert!(accept_within(&app, wait).is_some(), "traffic to the pod's own IP must stay local");

    // Inbound plaintext lands on 15006 with its original destination; HBONE reaches 15008 directly. Forwarded
    // traffic keeps its source: it is not a probe.
    let _c = connect(&t.remote, at(a.pod, 8080), None, None).unwrap();
    let (s, peer) = accept_within(&inbound, wait).expect("inbound capture");
    assert_eq!(original_dst(&s), at(a.pod, 8080));
    assert_eq!(peer.ip().to_canonical(), a.remote);
    assert!(accept_within(&app, quiet).is_none(), "uncaptured inbound leaked");
    let _c = connect(&t.remote, at(a.pod, 15008), None, None).unwrap();
    assert!(accept_within(&hbone, wait).is_some(), "HBONE must reach 15008");

    // The node's own connections (the kubelet's probes) are SNATed to the probe address and reach the app.
    let _c = connect(&t.node, at(a.pod, 8080), None, None).unwrap();
    let (_, seen) = accept_within(&app, wait).expect("probes must bypass capture");
    assert_eq!(seen.ip().to_canonical(), a.probe);

    // ztunnel's connection to the app, spoofing the client's IP: the app sees the client, and its replies
    // return to ztunnel through the connmark and table 100 instead of leaving the pod.
    let mut z = connect(&t.pod, at(a.pod, 8080), Some(rules::ZTUNNEL_MARK), Some(a.remote)).expect("spoofed connect");
    let (mut s, seen) = accept_within(&app, wait).expect("app accepts ztunnel's connection");
    assert_eq!(seen.ip().to_canonical(), a.remote, "the app sees the original client IP");
    s.write_all(b"pong").unwrap();
    z.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4];
    z.read_exact(&mut buf).expect("the reply came back to ztunnel");
    assert_eq!(&buf, b"pong");
    // The app answers another pod's address, yet through loopback with loopback's segment size.
    assert!(mss(&s) > 1500 && mss(&z) > 1500, "ztunnel's connection to the app has MSS {} and {}", mss(&s), mss(&z));
    let _ = a.node;
}

fn ruleset(t: &Topo, backend: Backend) -> String {
    match backend {
        Backend::Nftables => t.pod.exec("nft", &["list", "ruleset"]).unwrap(),
        Backend::Iptables(Flavor::Legacy) => {
            t.pod.exec("iptables-legacy-save", &[]).unwrap() + &t.pod.exec("ip6tables-legacy-save", &[]).unwrap()
        }
        Backend::Iptables(Flavor::Nft) => {
            t.pod.exec("iptables-nft-save", &[]).unwrap() + &t.pod.exec("ip6tables-nft-save", &[]).unwrap()
        }
    }
}

/// Strips what changes between two saves of the same rules (comments with times, packet counters).
fn normalized(s: &str) -> String {
    s.lines().filter(|l| !l.starts_with('#')).map(|l| l.split(" [").next().unwrap_or(l)).collect::<Vec<_>>().join("\n")
}

async fn full_cycle(backend: Backend) {
    let t = topo();
    let node_ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let probes = std::sync::Arc::new(
        t.node
            .run(move || {
                ProbeSet::install(
                    backend,
                    &[("pod-uid".to_string(), vec![node_ip("10.77.0.2"), node_ip("fd00:77::2")])],
                )
            })
            .unwrap()
            .unwrap(),
    );
    let handle = PodNetns::open(&t.pod.path()).unwrap();
    // Connections open before enrolment (both ways) must survive it: conntrack picks them up mid-stream once
    // rules exist, and only a connection's first segment may be redirected.
    let early_app = listen(&t.pod, "10.77.0.2".parse().unwrap(), 7070);
    let early_remote = listen(&t.remote, "10.78.0.2".parse().unwrap(), 7071);
    let mut inbound_early = connect(&t.remote, "10.77.0.2:7070".parse().unwrap(), None, None).unwrap();
    let (mut inbound_early_srv, _) = accept_within(&early_app, Duration::from_secs(2)).unwrap();
    let mut outbound_early = connect(&t.pod, "10.78.0.2:7071".parse().unwrap(), None, None).unwrap();
    let (mut outbound_early_srv, _) = accept_within(&early_remote, Duration::from_secs(2)).unwrap();
    install(&handle, backend).await;
    for (c, srv) in [(&mut inbound_early, &mut inbound_early_srv), (&mut outbound_early, &mut outbound_early_srv)] {
        c.write_all(b"ping").unwrap();
        srv.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 4];
        srv.read_exact(&mut b).expect("a connection open before enrolment was cut");
        srv.write_all(b"pong").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c.read_exact(&mut b).expect("a connection open before enrolment was cut");
        assert_eq!(&b, b"pong");
    }
    let first = normalized(&ruleset(&t, backend));
    install(&handle, backend).await;
    assert_eq!(first, normalized(&ruleset(&t, backend)), "re-applying changed the ruleset");
    let ip_rules = t.pod.ip(&["rule", "show"]).unwrap();
    assert_eq!(ip_rules.matches("fwmark 0x111/0xfff lookup 100").count(), 1, "{ip_rules}");
    assert_eq!(ip_rules.matches("ipproto tcp lookup 101").count(), 1, "{ip_rules}");
    assert!(handle.run(move || backend.pod_present(DUAL).unwrap() && routing::present(DUAL).unwrap()).await.unwrap());

    let pl = handle.run(|| PodListeners::bind_here(true)).await.unwrap().unwrap();
    assert_eq!(pl.ports(), vec![15001, 15006, 15008]);
    check_family(&t, &pl, &v4());
    check_family(&t, &pl, &v6());

    // Removal takes everything out, twice without complaint, and traffic flows uncaptured again.
    handle
        .run(move || {
            for _ in 0..2 {
                backend.remove_pod(DUAL).unwrap();
                routing::remove(DUAL).unwrap();
            }
        })
        .await
        .unwrap();
    let left = ruleset(&t, backend);
    assert!(!left.contains("ambit") && !left.contains("AMBIT"), "rules remain:\n{left}");
    let ip_rules = t.pod.ip(&["rule", "show"]).unwrap() + &t.pod.ip(&["-6", "rule", "show"]).unwrap();
    assert!(!ip_rules.contains("0x111") && !ip_rules.contains("lookup 101"), "{ip_rules}");
    for table in ["100", "101"] {
        assert_eq!(t.pod.ip(&["route", "show", "table", table]).unwrap().trim(), "");
        assert_eq!(t.pod.ip(&["-6", "route", "show", "table", table]).unwrap().trim(), "");
    }
    assert!(!handle.run(move || backend.pod_present(DUAL).unwrap()).await.unwrap());
    drop(pl);
    let remote = listen(&t.remote, "10.78.0.2".parse().unwrap(), 9000);
    let _c = connect(&t.pod, "10.78.0.2:9000".parse().unwrap(), None, None).unwrap();
    assert!(accept_within(&remote, Duration::from_secs(2)).is_some());

    // The probe set follows enrolment: without the pod in it, the node's connections keep their source.
    // (The set lives in the node's netns: change it from there, as the agent does from its own.)
    let p = probes.clone();
    t.node.run(move || p.remove("other-pod", &["10.77.0.2".parse().unwrap()])).unwrap();
    assert_eq!(probes.members().len(), 2, "a pod cannot remove another pod's IP");
    let p = probes.clone();
    t.node.run(move || p.remove("pod-uid", &["10.77.0.2".parse().unwrap()])).unwrap();
    let app = listen(&t.pod, "10.77.0.2".parse().unwrap(), 8081);
    let _c = connect(&t.node, "10.77.0.2:8081".parse().unwrap(), None, None).unwrap();
    let (_, seen) = accept_within(&app, Duration::from_secs(2)).unwrap();
    assert_eq!(seen.ip(), "10.77.0.1".parse::<IpAddr>().unwrap());
    t.node.run(move || backend.remove_host().unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nftables_backend() {
    full_cycle(Backend::Nftables).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_nft_backend() {
    full_cycle(Backend::Iptables(Flavor::Nft)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_legacy_backend() {
    full_cycle(Backend::Iptables(Flavor::Legacy)).await;
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

#[tokio::test]
async fn a_table_from_an_older_agent_is_replaced() {
    let t = topo();
    // An older agent's table whose chain has another priority: refreshing it in place is refused by the kernel,
    // so the backend replaces the table.
    let old = "table inet ambit {\n chain prerouting_nat {\n  type nat hook prerouting priority -90; policy accept;\n }\n chain leftover {\n }\n}\n";
    t.pod.run(move || rules::apply::nft_run(old)).unwrap().unwrap();
    let handle = PodNetns::open(&t.pod.path()).unwrap();
    install(&handle, Backend::Nftables).await;
    let now = t.pod.exec("nft", &["list", "table", "inet", "ambit"]).unwrap();
    assert!(now.contains("priority dstnat;") && !now.contains("leftover"), "{now}");
}

/// `loopbackRoute: false`: the route's rule and route are left out, and taken out of a pod that has them;
/// capture works as before, with the pod interface's segment size; removal under either setting leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loopback_route_can_be_switched_off() {
    let t = topo();
    let backend = Backend::Nftables;
    let (on, off) = (DUAL, DUAL.with_loopback_route(false));
    let handle = PodNetns::open(&t.pod.path()).unwrap();
    let rules_shown = || t.pod.ip(&["rule", "show"]).unwrap() + &t.pod.ip(&["-6", "rule", "show"]).unwrap();
    let table = |fam: &str, n: &str| t.pod.ip(&[fam, "route", "show", "table", n]).unwrap().trim().to_string();
    let present = |cfg: InpodConfig| handle.run(move || routing::present(cfg).unwrap());

    install(&handle, backend).await;
    assert_eq!(rules_shown().matches("ipproto tcp lookup 101").count(), 2, "{}", rules_shown());
    // Switching off (the agent re-applying a pod's rules with the setting changed) takes the route out.
    handle.run(move || rules::install_pod(backend, off).unwrap()).await.unwrap();
    let shown = rules_shown();
    assert_eq!(shown.matches("fwmark 0x111/0xfff lookup 100").count(), 2, "{shown}");
    assert!(!shown.contains("lookup 101"), "{shown}");
    for fam in ["-4", "-6"] {
        assert_eq!(table(fam, "101"), "", "table 101 ({fam}) is left");
        assert_ne!(table(fam, "100"), "", "table 100 ({fam}) is gone");
    }
    assert!(present(off).await.unwrap() && !present(on).await.unwrap());
    assert!(handle.run(move || rules::pod_present(backend, off).unwrap()).await.unwrap());

    // Capture and ztunnel's return path do not depend on it; the app's segments are the interface's again.
    let pl = handle.run(|| PodListeners::bind_here(true)).await.unwrap().unwrap();
    let outbound = TcpListener::from(pl.fds()[0].try_clone_to_owned().unwrap());
    outbound.set_nonblocking(true).unwrap();
    let a = v4();
    let remote = listen(&t.remote, a.remote, 9000);
    let app = listen(&t.pod, a.pod, 8080);
    let c = connect(&t.pod, SocketAddr::new(a.remote, 9000), None, None).unwrap();
    let (s, _) = accept_within(&outbound, Duration::from_secs(2)).expect("outbound capture without the route");
    assert_eq!(original_dst(&s), SocketAddr::new(a.remote, 9000));
    assert!(accept_within(&remote, Duration::from_millis(100)).is_none(), "uncaptured outbound leaked");
    assert!(mss(&c) < 1500, "without the route the app's captured connection has MSS {}", mss(&c));
    let mut z = connect(&t.pod, SocketAddr::new(a.pod, 8080), Some(rules::ZTUNNEL_MARK), Some(a.remote)).unwrap();
    let (mut srv, _) = accept_within(&app, Duration::from_secs(2)).expect("app accepts ztunnel's connection");
    srv.write_all(b"pong").unwrap();
    z.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 4];
    z.read_exact(&mut buf).expect("the reply came back to ztunnel");

    // On again, and then removed under the other setting: nothing is left.
    handle.run(move || rules::install_pod(backend, on).unwrap()).await.unwrap();
    assert!(present(on).await.unwrap() && !present(off).await.unwrap());
    handle.run(move || rules::remove_pod(backend, off).unwrap()).await.unwrap();
    let shown = rules_shown();
    assert!(!shown.contains("0x111") && !shown.contains("lookup 101"), "{shown}");
    for (fam, n) in [("-4", "100"), ("-4", "101"), ("-6", "100"), ("-6", "101")] {
        assert_eq!(table(fam, n), "", "table {n} ({fam}) is left");
    }
}
