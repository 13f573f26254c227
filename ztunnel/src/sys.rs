//! The only module of ztunnel with `unsafe` code: small safe wrappers over what the standard library, nix and
//! socket2 do not offer — glibc's allocator settings, and reads into a buffer's uninitialized spare capacity.
//! Each block states why it is sound; everything else in the crate is `deny(unsafe_code)`.
#![allow(unsafe_code)]

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use socket2::SockRef;
use tokio::io::{AsyncRead, ReadBuf};

/// glibc's `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD` (bytes). No-op on other C libraries.
pub fn set_malloc_thresholds(mmap: i32, trim: i32) {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; glibc serialises it against allocations.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap);
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim);
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = (mmap, trim);
}

/// glibc's `M_TRIM_THRESHOLD` alone.
pub fn set_trim_threshold(trim: i32) {
    #[cfg(target_env = "gnu")]
    // SAFETY: as above.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim);
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = trim;
}

/// Allocates and frees one block of `size` bytes in the calling thread's arena (which makes glibc trim that
/// arena's top when it exceeds the trim threshold), then releases free memory inside every arena
/// (`malloc_trim(0)`).
pub fn trim_heap(size: usize) {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc and free pair on a block no one else sees (null is fine for free); malloc_trim only
    // walks the allocator's own free lists.
    unsafe {
        let p = libc::malloc(std::hint::black_box(size));
        libc::free(std::hint::black_box(p));
        libc::malloc_trim(0);
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = size;
}

/// One `recv(2)` on `sock` into the spare capacity of `buf`, which grows by what was read; returns that count
/// (0 at end of stream). Reserve room first: with no spare capacity it reads nothing.
pub fn recv_spare(sock: &SockRef<'_>, buf: &mut BytesMut) -> io::Result<usize> {
    let spare: &mut [MaybeUninit<u8>] = buf.spare_capacity_mut();
    let room = spare.len();
    let n = sock.recv(spare)?;
    assert!(n <= room, "recv reported more bytes than it was given room for");
    // SAFETY: recv(2) wrote the first `n` bytes of the spare capacity (socket2 returns the kernel's count, at
    // most the room checked above), so they are initialized.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Polls `reader` once into the spare capacity of `buf`, which grows by what was read; `Ready(Ok(0))` is end of
/// stream (or no spare capacity).
pub fn poll_read_spare<R: AsyncRead + ?Sized>(
    reader: Pin<&mut R>,
    cx: &mut Context<'_>,
    buf: &mut Vec<u8>,
) -> Poll<io::Result<usize>> {
    let spare = buf.spare_capacity_mut();
    let start = spare.as_ptr();
    let mut rb = ReadBuf::uninit(spare);
    ready!(reader.poll_read(cx, &mut rb))?;
    let filled = rb.filled();
    // A reader may swap the ReadBuf for another one; then nothing it reports is about our memory.
    assert!(filled.is_empty() || filled.as_ptr() == start.cast(), "the reader replaced the buffer it was given");
    let n = filled.len();
    // SAFETY: a ReadBuf's filled part is initialized, and it is a prefix of our spare capacity (checked above).
    unsafe { buf.set_len(buf.len() + n) };
    Poll::Ready(Ok(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_land_in_the_spare_capacity() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"hello").await.unwrap();
        let mut b = Box::pin(b);
        let mut buf = Vec::with_capacity(16);
        buf.extend_from_slice(b">");
        let n = std::future::poll_fn(|cx| poll_read_spare(b.as_mut(), cx, &mut buf)).await.unwrap();
        assert_eq!((n, buf.as_slice()), (5, &b">hello"[..]));

        let (x, y) = std::os::unix::net::UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut &x, b"world").unwrap();
        let mut bytes = BytesMut::with_capacity(8);
        let n = recv_spare(&SockRef::from(&y), &mut bytes).unwrap();
        assert_eq!((n, &bytes[..]), (5, &b"world"[..]));
        drop(x);
        assert_eq!(recv_spare(&SockRef::from(&y), &mut bytes).unwrap(), 0);
    }
}
