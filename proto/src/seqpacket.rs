//! Async unix `SOCK_SEQPACKET` sockets carrying one message per packet plus file descriptors (SCM_RIGHTS).
//!
//! ZDS runs on this: the agent listens, ztunnel connects. tokio has no seqpacket type, so this wraps a
//! non-blocking socket in [`AsyncFd`].
#![allow(unsafe_code)]

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::cmsg_space;
use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Most fds one packet may carry (a netns plus its listeners, with room to spare).
pub const MAX_FDS: usize = 8;

/// Registers an owned descriptor with the tokio reactor.
pub fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` keeps its descriptor open and returns the same number from `as_raw_fd` until it is
    // dropped, and the `AsyncFd` owns it for its whole life.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

fn new_socket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?)
}

/// A listening seqpacket socket.
pub struct SeqPacketListener {
    fd: AsyncFd<OwnedFd>,
}

impl SeqPacketListener {
    /// Binds `path`, replacing a stale socket file left by a previous process.
    pub fn bind(path: &Path) -> io::Result<SeqPacketListener> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let fd = new_socket()?;
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        socket::listen(&fd, Backlog::new(64).expect("64 is a valid backlog"))?;
        Ok(SeqPacketListener { fd: register(fd, Interest::READABLE)? })
    }

    /// Accepts the next connection.
    pub async fn accept(&self) -> io::Result<SeqPacket> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard
                .try_io(|fd| Ok(socket::accept4(fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK)?))
            {
                Ok(Ok(raw)) => {
                    // SAFETY: accept4 just returned this descriptor; nothing else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    return SeqPacket::from_fd(owned);
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// A connected seqpacket socket.
pub struct SeqPacket {
    fd: AsyncFd<OwnedFd>,
}

impl SeqPacket {
    /// Connects to a listener at `path`.
    pub async fn connect(path: &Path) -> io::Result<SeqPacket> {
        let fd = new_socket()?;
        match socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?) {
            Ok(()) => {}
            // A full backlog: wait until the socket becomes writable, then check the outcome.
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINPROGRESS) => {
                let s = SeqPacket::from_fd(fd)?;
                let _ = s.fd.writable().await?;
                let err: i32 = socket::getsockopt(&s.fd, socket::sockopt::SocketError)?;
                if err != 0 {
                    return Err(io::Error::from_raw_os_error(err));
                }
                return Ok(s);
            }
            Err(e) => return Err(e.into()),
        }
        SeqPacket::from_fd(fd)
    }

    /// Wraps an already connected, non-blocking socket.
    pub fn from_fd(fd: OwnedFd) -> io::Result<SeqPacket> {
        Ok(SeqPacket { fd: register(fd, Interest::READABLE | Interest::WRITABLE)? })
    }

    /// A connected pair, for tests.
    pub fn pair() -> io::Result<(SeqPacket, SeqPacket)> {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )?;
        Ok((SeqPacket::from_fd(a)?, SeqPacket::from_fd(b)?))
    }

    /// The pid of the peer process (SO_PEERCRED).
    pub fn peer_pid(&self) -> io::Result<i32> {
        Ok(socket::getsockopt(&self.fd, socket::sockopt::PeerCredentials)?.pid())
    }

    /// Sends one packet with `fds` attached.
    pub async fn send(&self, packet: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if fds.len() > MAX_FDS {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("more than {MAX_FDS} fds in one packet")));
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        loop {
            let mut guard = self.fd.writable().await?;
            let res = guard.try_io(|fd| {
                let iov = [IoSlice::new(packet)];
                let cmsg = [ControlMessage::ScmRights(&raw)];
                let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
                let n = socket::sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
                Ok(n)
            });
            match res {
                Ok(Ok(n)) if n == packet.len() => return Ok(()),
                Ok(Ok(n)) => {
                    return Err(io::Error::other(format!("short seqpacket send: {n} of {} bytes", packet.len())));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one packet into `buf`, with any fds it carried. `Ok((0, []))` is end of stream. A packet or
    /// fd list that did not fit is an error (its fds are closed), never a silently cut message.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| recv_now(fd.as_fd(), buf)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

/// Why a received fd is not the listener it was said to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ListenerCheckError {
    /// It is not a socket (or cannot be asked).
    #[error("not a socket: {0}")]
    NotASocket(nix::Error),
    /// A socket, but not listening.
    #[error("not a listening socket")]
    NotListening,
    /// Its address cannot be read.
    #[error("cannot read its address: {0}")]
    Address(nix::Error),
    /// Bound to another port (or not to a TCP/IP address at all).
    #[error("bound to port {actual:?}, not {expected}")]
    WrongPort {
        /// What it is bound to.
        actual: Option<u16>,
        /// What it was said to be.
        expected: u16,
    },
}

/// Checks that a received fd is a listening TCP socket bound to `port` (what ZDS's listener handoff carries).
pub fn check_listener(fd: BorrowedFd<'_>, port: u16) -> Result<(), ListenerCheckError> {
    let listening = socket::getsockopt(&fd, socket::sockopt::AcceptConn).map_err(ListenerCheckError::NotASocket)?;
    if !listening {
        return Err(ListenerCheckError::NotListening);
    }
    let local: socket::SockaddrStorage = socket::getsockname(fd.as_raw_fd()).map_err(ListenerCheckError::Address)?;
    let actual = local.as_sockaddr_in().map(|s| s.port()).or_else(|| local.as_sockaddr_in6().map(|s| s.port()));
    if actual != Some(port) {
        return Err(ListenerCheckError::WrongPort { actual, expected: port });
    }
    Ok(())
}

fn recv_now(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg_buf = cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut cmsg_buf), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for r in raw {
                // SAFETY: the kernel just installed these descriptors in our table for this message; we are
                // their only owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    let n = msg.bytes;
    if msg.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
        drop(fds);
        return Err(io::Error::new(io::ErrorKind::InvalidData, "packet or its fds did not fit and were truncated"));
    }
    Ok((n, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn packets_and_fds_travel() {
        let (a, b) = SeqPacket::pair().unwrap();
        let f = std::fs::File::open("/proc/self/ns/net").unwrap();
        a.send(b"hello", &[f.as_fd()]).await.unwrap();
        a.send(b"", &[]).await.unwrap();
        let mut buf = [0u8; 64];
        let (n, fds) = b.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        let (n, fds) = b.recv(&mut buf).await.unwrap();
        assert_eq!((n, fds.len()), (0, 0));
        drop(a);
        assert_eq!(b.recv(&mut buf).await.unwrap().0, 0);
    }

    #[tokio::test]
    async fn oversize_packets_are_rejected() {
        let (a, b) = SeqPacket::pair().unwrap();
        a.send(&[7u8; 100], &[]).await.unwrap();
        let mut small = [0u8; 10];
        let e = b.recv(&mut small).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
