//! Socket options and socket creation for pod traffic.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{SockRef, Socket};
use tokio::net::{TcpSocket, TcpStream};

/// How long a connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The original destination of a redirected connection (SO_ORIGINAL_DST, IPv4 or IPv6), whose peer is `peer`
/// (as accepted: the peer's family, an IPv4-mapped address being IPv4, is the connection's, so no
/// `getsockname` is needed to tell which table to ask).
pub fn original_dst(s: &TcpStream, peer: SocketAddr) -> std::io::Result<SocketAddr> {
    let r = SockRef::from(s);
    let a = if peer.is_ipv4() || matches!(peer.ip(), IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()) {
        r.original_dst_v4()
    } else {
        r.original_dst_v6()
    }?;
    a.as_socket().map(canonical).ok_or_else(|| std::io::Error::other("original destination is not an IP address"))
}

/// An address with IPv4-mapped IPv6 turned back into IPv4.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// Turns Nagle off and sets TCP keepalive (idle time, probe interval, probes). Connections accepted from a
/// listener inherit both (Linux copies them at accept).
pub fn tune(tcp: &impl std::os::fd::AsFd, keepalive: Option<(Duration, Duration, u32)>) -> std::io::Result<()> {
    let sock = SockRef::from(tcp);
    sock.set_tcp_nodelay(true)?;
    if let Some(ka) = keepalive {
        self::keepalive(tcp, ka)?;
    }
    Ok(())
}

/// Sets TCP keepalive (idle time, probe interval, probes) on a connection whose peer is across the network.
pub fn keepalive(
    tcp: &impl std::os::fd::AsFd,
    (time, interval, retries): (Duration, Duration, u32),
) -> std::io::Result<()> {
    let ka = socket2::TcpKeepalive::new().with_time(time).with_interval(interval).with_retries(retries);
    SockRef::from(tcp).set_tcp_keepalive(&ka)
}

/// Where a pod's sockets are made: inside the pod's network namespace. The proxy asks for them; `inpod`
/// answers, over the netns descriptor the node agent handed over.
pub trait PodSockets: Send + Sync + std::fmt::Debug {
    /// A new non-blocking TCP socket in the pod's netns.
    fn tcp(&self, ipv6: bool) -> std::io::Result<Socket>;
    /// A listener on `port` in the pod's netns.
    fn listener(&self, port: u16, opts: ambit_proto::host::ListenerOptions) -> std::io::Result<Socket>;
    /// The pod's default gateways (its node), read once when the pod is served.
    fn gateways(&self) -> Vec<std::net::IpAddr> {
        Vec::new()
    }
}

/// A new TCP socket in the pod's netns, marked so the pod's rules let it through, with Nagle off. It gets no
/// keepalive: most of these connections go to the pod's own app, in the same netns, where a peer that dies
/// has its socket closed by the kernel and probes would find nothing (callers whose peer is remote add
/// [`keepalive`]).
pub fn pod_socket(netns: &dyn PodSockets, ipv6: bool, mark: u32) -> std::io::Result<Socket> {
    let s = netns.tcp(ipv6)?;
    s.set_mark(mark)?;
    s.set_tcp_nodelay(true)?;
    Ok(s)
}

/// Connects from inside the pod's netns to `dst`. With `spoof_src`, the connection carries that source IP
/// (IP_TRANSPARENT), so the app sees the original client; if the kernel refuses, it goes without.
pub async fn connect_from_pod(
    netns: &dyn PodSockets,
    dst: SocketAddr,
    spoof_src: Option<IpAddr>,
    mark: u32,
) -> std::io::Result<TcpStream> {
    let s = pod_socket(netns, dst.is_ipv6(), mark)?;
    if let Some(src) = spoof_src.filter(|s| s.is_ipv6() == dst.is_ipv6()) {
        let ok = if src.is_ipv6() { s.set_ip_transparent_v6(true) } else { s.set_ip_transparent_v4(true) };
        // Pick the source port at connect time, per destination (IP_BIND_ADDRESS_NO_PORT), not at bind time
        // across every destination: a busy client IP would otherwise run out of ports, and each bind would
        // search past all of that IP's connections.
        let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::IpBindAddressNoPort, &true);
        if ok.is_ok() && s.bind(&SocketAddr::new(src, 0).into()).is_err() {
            tracing::debug!(%src, "cannot bind the original source; connecting without it");
        }
    }
    let sock = TcpSocket::from_std_stream(std::net::TcpStream::from(s));
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connect to {dst} timed out")))??;
    crate::busy_poll::activity();
    Ok(tcp)
}

/// Binds a listener inside the pod's netns (when the agent did not hand one over).
pub fn bind_in_pod(
    netns: &dyn PodSockets,
    port: u16,
    ipv6: bool,
    reuse_port: bool,
    mark: u32,
) -> std::io::Result<std::net::TcpListener> {
    let opts =
        ambit_proto::host::ListenerOptions { ipv6, reuse_port, mark, nodelay: false, nonblocking: true, backlog: 1024 };
    let s = netns.listener(port, opts)?;
    Ok(s.into())
}

/// One descriptor held in reserve for [`shed_one`].
static SPARE_FD: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);

/// Sets aside the descriptor [`shed_one`] needs. Call once at start.
pub fn reserve_spare_fd() {
    *SPARE_FD.lock().unwrap_or_else(|p| p.into_inner()) = std::fs::File::open("/dev/null").ok();
}

/// Whether an accept error means the process (or system) is out of file descriptors.
pub fn out_of_fds(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// At the open-files limit, answers one waiting connection instead of leaving it in the backlog until its
/// client gives up: the reserved descriptor is freed, the connection accepted and reset at once (the client
/// sees "connection reset" immediately, an overload answer), and the reserve taken again. Returns whether a
/// connection was shed. Best effort: another thread may take the freed descriptor first.
pub async fn shed_one(listener: &tokio::net::TcpListener) -> bool {
    let spare = SPARE_FD.lock().unwrap_or_else(|p| p.into_inner()).take();
    let Some(spare) = spare else { return false };
    drop(spare);
    let shed = match tokio::time::timeout(Duration::from_millis(10), listener.accept()).await {
        Ok(Ok((s, _))) => {
            // Linger 0: close sends RST, so the client learns at once and no TIME_WAIT is left.
            let _ = SockRef::from(&s).set_linger(Some(Duration::ZERO));
            true
        }
        _ => false,
    };
    reserve_spare_fd();
    shed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_connections_inherit_the_listeners_options() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ka = (Duration::from_secs(77), Duration::from_secs(11), 4);
        tune(&l, Some(ka)).unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        let s = SockRef::from(&a);
        assert!(s.tcp_nodelay().unwrap());
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), ka.0);
        assert_eq!(s.tcp_keepalive_interval().unwrap(), ka.1);
        assert_eq!(s.tcp_keepalive_retries().unwrap(), ka.2);
    }

    /// A connection to the pod's app has Nagle off from the start and no keepalive (four system calls per
    /// connection that would buy nothing inside one netns).
    #[tokio::test]
    async fn connections_from_the_pod_have_nodelay_and_no_keepalive() {
        let own = std::fs::File::open("/proc/self/ns/net").unwrap();
        let netns =
            crate::inpod::netns::InpodNetns::new(crate::inpod::netns::host_netns().unwrap(), own.into()).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = connect_from_pod(&netns, l.local_addr().unwrap(), None, 0).await.unwrap();
        let s = SockRef::from(&c);
        assert!(s.tcp_nodelay().unwrap());
        assert!(!s.keepalive().unwrap());
    }
}
