//! The read buffer under an HBONE connection's TLS.
//!
//! rustls reads at most about 4 KiB at a time from its transport, so reading the socket directly would cost
//! a system call per 4 KiB. A buffer underneath turns those into one large read per burst. Unlike
//! `tokio::io::BufReader`, this one exists only while bytes flow: it is allocated when the socket has data
//! and dropped when the socket runs dry. A node holds an HBONE connection per (pod, peer identity, peer
//! address), thousands of them mostly idle, and each would otherwise keep its buffer for life.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from the socket at once while data flows.
pub const CAPACITY: usize = 64 * 1024;

/// A transport whose reads go through a buffer that exists only while data flows; writes pass straight through.
#[derive(Debug)]
pub struct BurstReader<T> {
    inner: T,
    /// What the last read brought (its length), while some of it is still to be handed out.
    buf: Option<Vec<u8>>,
    /// How much of `buf` has been handed out.
    pos: usize,
}

impl<T> BurstReader<T> {
    /// Wraps `inner`, with no buffer yet.
    pub fn new(inner: T) -> BurstReader<T> {
        BurstReader { inner, buf: None, pos: 0 }
    }

    /// Bytes of buffer held now (0 or [`CAPACITY`]).
    #[cfg(test)]
    pub fn buffer_size(&self) -> usize {
        self.buf.as_ref().map_or(0, Vec::capacity)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BurstReader<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.as_ref().is_none_or(|b| this.pos == b.len()) {
            // Nothing buffered. A caller asking for at least a buffer's worth reads directly.
            if out.remaining() >= CAPACITY {
                let r = ready!(Pin::new(&mut this.inner).poll_read(cx, out));
                crate::busy_poll::activity();
                this.buf = None;
                return Poll::Ready(r);
            }
            // Reused while the socket keeps having data; never zeroed (the read fills what is used).
            let mut buf = this.buf.take().unwrap_or_else(|| Vec::with_capacity(CAPACITY));
            buf.clear();
            match crate::sys::poll_read_spare(Pin::new(&mut this.inner), cx, &mut buf) {
                // The socket ran dry: the burst is over, and so is the buffer.
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => {
                    // Bytes arrived for this worker (it keeps polling while they do).
                    crate::busy_poll::activity();
                    this.buf = Some(buf);
                    this.pos = 0;
                }
            }
        }
        let buf = this.buf.as_ref().expect("bytes are buffered");
        let n = (buf.len() - this.pos).min(out.remaining());
        out.put_slice(&buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BurstReader<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_see_every_byte_in_order_and_the_buffer_goes_when_the_socket_runs_dry() {
        let (mut peer, ours) = tokio::io::duplex(1 << 20);
        let mut r = BurstReader::new(ours);
        assert_eq!(r.buffer_size(), 0, "no buffer before any data");
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        peer.write_all(&payload).await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while got.len() < payload.len() {
            let n = r.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
            assert!(r.buffer_size() <= CAPACITY);
        }
        assert_eq!(got, payload);
        // Drained: the next read finds the socket dry, and the buffer is released while it waits.
        let pending = tokio::time::timeout(std::time::Duration::from_millis(20), r.read(&mut chunk)).await;
        assert!(pending.is_err(), "nothing more to read");
        assert_eq!(r.buffer_size(), 0, "an idle connection holds no buffer");
        // End of stream still reads as 0.
        drop(peer);
        assert_eq!(r.read(&mut chunk).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn large_reads_bypass_the_buffer_and_writes_pass_through() {
        let (mut peer, ours) = tokio::io::duplex(1 << 20);
        let mut r = BurstReader::new(ours);
        peer.write_all(&[7u8; 1000]).await.unwrap();
        let mut big = vec![0u8; CAPACITY];
        assert_eq!(r.read(&mut big).await.unwrap(), 1000);
        assert_eq!(r.buffer_size(), 0);
        r.write_all(b"back").await.unwrap();
        let mut four = [0u8; 4];
        peer.read_exact(&mut four).await.unwrap();
        assert_eq!(&four, b"back");
    }
}
