//! Moving bytes between a TCP connection and an HBONE stream (or another TCP connection).
//!
//! Buffers exist only while data flows: each direction waits for readability with no buffer, allocates one
//! for the burst, and drops it when the socket runs dry, so a thousand idle connections cost a thousand
//! sockets, not a thousand buffers. The buffer grows while reads fill it (16 KiB up to 256 KiB) so bulk
//! transfers move in large TLS records.

use std::io;
use std::net::Shutdown;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use socket2::SockRef;
use tokio::net::TcpStream;

const MIN_BUF: usize = 16 * 1024;
const MAX_BUF: usize = 256 * 1024;

/// Bytes moved in each direction, and how it ended.
#[derive(Debug, Default)]
pub struct Transferred {
    /// From the TCP side (the client, for outbound; the app, for inbound).
    pub from_tcp: u64,
    /// To the TCP side.
    pub to_tcp: u64,
    /// The error that ended the copy, if any.
    pub error: Option<io::Error>,
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e.to_string())
    }
}

async fn write_all(tcp: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        tcp.writable().await?;
        match tcp.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Where a burst of bytes goes.
trait Sink {
    async fn put(&mut self, data: Bytes) -> io::Result<()>;
}

impl Sink for &TcpStream {
    async fn put(&mut self, data: Bytes) -> io::Result<()> {
        write_all(self, &data).await
    }
}

impl Sink for SendStream<Bytes> {
    async fn put(&mut self, data: Bytes) -> io::Result<()> {
        send_h2(self, data).await
    }
}

/// Reads what is available in bursts and hands each chunk to `sink`; returns at end of stream.
async fn read_bursts(tcp: &TcpStream, count: &mut u64, sink: &mut impl Sink) -> io::Result<()> {
    let mut size = MIN_BUF;
    loop {
        tcp.readable().await?;
        crate::busy_poll::activity();
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(size);
            let room = buf.capacity() - buf.len();
            match read_once(tcp, &mut buf)? {
                None => break,
                Some(0) => return Ok(()),
                Some(n) => {
                    *count += n as u64;
                    if n == room && size < MAX_BUF {
                        size *= 2;
                    }
                    sink.put(buf.split().freeze()).await?;
                    if n < room {
                        // Drained (see `read_once`): wait for the next arrival.
                        break;
                    }
                }
            }
        }
    }
}

/// One read from a socket tokio saw readable: `None` if there was nothing (it waits for the next event). As
/// in tokio's own `poll_read`, a read that leaves room in `buf` drained the socket, so the cached readiness
/// is cleared right away; the next arrival raises a new edge-triggered event. Otherwise every burst would
/// end with one more read, only to learn `WouldBlock` — a system call per message in request/response
/// traffic.
fn read_once(tcp: &TcpStream, buf: &mut BytesMut) -> io::Result<Option<usize>> {
    let room = buf.capacity() - buf.len();
    let mut read = 0;
    let r = tcp.try_io(tokio::io::Interest::READABLE, || {
        read = crate::sys::recv_spare(&SockRef::from(tcp), buf)?;
        if read > 0 && read < room {
            // Not an error: tells tokio the socket is empty now.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    });
    match r {
        Ok(()) => Ok(Some(read)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok((read > 0).then_some(read)),
        Err(e) => Err(e),
    }
}

async fn send_h2(send: &mut SendStream<Bytes>, mut data: Bytes) -> io::Result<()> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed")),
            Some(Err(e)) => return Err(h2_io(e)),
            Some(Ok(0)) => continue,
            Some(Ok(cap)) => {
                let chunk = data.split_to(cap.min(data.len()));
                send.send_data(chunk, false).map_err(h2_io)?;
            }
        }
    }
    Ok(())
}

/// Copies between `tcp` and an HBONE stream until both directions end. A clean end of one side is passed
/// on as a half-close (END_STREAM / FIN); an error on either ends both (the stream is reset).
pub async fn tcp_h2(tcp: &TcpStream, send: SendStream<Bytes>, recv: RecvStream) -> Transferred {
    tcp_h2_until(tcp, send, recv, None).await
}

/// As [`tcp_h2`]; and once `peer_closed` turns true (the peer's TLS direction has ended: it will send no more
/// frames), what HTTP/2 holds of the stream is the last of it, and the TCP side gets its FIN.
pub async fn tcp_h2_until(
    tcp: &TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    mut peer_closed: Option<tokio::sync::watch::Receiver<bool>>,
) -> Transferred {
    let mut from_tcp = 0u64;
    let mut to_tcp = 0u64;
    let up = async {
        let r = read_bursts(tcp, &mut from_tcp, &mut send).await;
        match r {
            Ok(()) => send.send_data(Bytes::new(), true).map_err(h2_io),
            Err(e) => {
                send.send_reset(h2::Reason::CANCEL);
                Err(e)
            }
        }
    };
    let down = async {
        let closed = async {
            // Without such an end, or once the connection is gone (and the stream fails on its own): never.
            let ended = match &mut peer_closed {
                Some(c) => c.wait_for(|closed| *closed).await.is_ok(),
                None => false,
            };
            if !ended {
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(closed);
        loop {
            let chunk = tokio::select! {
                // Whatever was received before the peer's close comes first.
                biased;
                chunk = recv.data() => chunk,
                () = &mut closed => None,
            };
            let Some(chunk) = chunk else { break };
            crate::busy_poll::activity();
            let chunk = chunk.map_err(h2_io)?;
            let n = chunk.len();
            write_all(tcp, &chunk).await?;
            to_tcp += n as u64;
            recv.flow_control().release_capacity(n).map_err(h2_io)?;
        }
        SockRef::from(tcp).shutdown(Shutdown::Write)
    };
    let error = both(up, down).await;
    Transferred { from_tcp, to_tcp, error }
}

/// Copies between two TCP connections until both directions end; returns (a → b, b → a) bytes.
pub async fn tcp_tcp(a: &TcpStream, b: &TcpStream) -> Transferred {
    let mut ab = 0u64;
    let mut ba = 0u64;
    let up = async {
        read_bursts(a, &mut ab, &mut { b }).await?;
        SockRef::from(b).shutdown(Shutdown::Write)
    };
    let down = async {
        read_bursts(b, &mut ba, &mut { a }).await?;
        SockRef::from(a).shutdown(Shutdown::Write)
    };
    let error = both(up, down).await;
    Transferred { from_tcp: ab, to_tcp: ba, error }
}

/// Runs two directions to completion, or until the first error (which ends the other).
async fn both(
    up: impl std::future::Future<Output = io::Result<()>>,
    down: impl std::future::Future<Output = io::Result<()>>,
) -> Option<io::Error> {
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(e) => return Some(e),
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(e) => return Some(e),
            },
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn tcp_to_tcp_with_half_close() {
        let (mut client, proxy_in) = pair().await;
        let (proxy_out, mut server) = pair().await;
        let p = tokio::spawn(async move { tcp_tcp(&proxy_in, &proxy_out).await });
        let payload = vec![7u8; 1_000_000];
        client.write_all(&payload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), payload.len());
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"bye");
        let t = p.await.unwrap();
        assert!(t.error.is_none());
        assert_eq!((t.from_tcp, t.to_tcp), (1_000_000, 3));
    }

    #[tokio::test]
    async fn tcp_over_h2_both_ways() {
        let (h2c, h2s) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(h2s).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let send = respond.send_response(http::Response::new(()), false).unwrap();
            let (app_side, mut app) = pair().await;
            let t = tokio::spawn(async move { tcp_h2(&app_side, send, req.into_body()).await });
            let mut got = Vec::new();
            app.read_to_end(&mut got).await.unwrap();
            app.write_all(&got).await.unwrap();
            app.shutdown().await.unwrap();
            (got.len(), t.await.unwrap())
        });
        let (mut client, conn) = h2::client::handshake(h2c).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::builder().method("CONNECT").uri("10.0.0.1:80").body(()).unwrap();
        let (resp, send) = client.send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        let (mut user, proxy_side) = pair().await;
        let p = tokio::spawn(async move { tcp_h2(&proxy_side, send, resp.into_body()).await });
        let payload: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        user.write_all(&payload).await.unwrap();
        user.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        user.read_to_end(&mut echoed).await.unwrap();
        assert_eq!(echoed, payload);
        let (n, st) = server.await.unwrap();
        assert_eq!(n, payload.len());
        assert!(st.error.is_none());
        let t = p.await.unwrap();
        assert!(t.error.is_none(), "{:?}", t.error);
        assert_eq!((t.from_tcp, t.to_tcp), (300_000, 300_000));
    }
}
