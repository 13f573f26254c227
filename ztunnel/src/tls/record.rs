//! HBONE's TLS 1.3 records, sealed and opened in ztunnel's own buffers.
//!
//! rustls runs the handshake (its unbuffered API) and keeps the key schedule afterwards (its
//! `KernelConnection`, the interface meant for kernel TLS: new traffic secrets on a key update, session
//! tickets). This module does the record protection of RFC 8446 section 5 with ring's AEADs, which rustls
//! uses too. What it buys: a received record is opened where the socket read put it, and the plaintext is
//! copied once, into HTTP/2's read buffer. Through rustls's buffered connection each received byte was copied
//! three times (into rustls's record buffer, into a `Vec` per record, into HTTP/2's buffer). Sending is one copy
//! either way: the plaintext into the record, which is then sealed in place.
//!
//! After the handshake a connection accepts only protected records (`application_data` on the wire). Inside
//! them: application data; `close_notify` (end of stream) and `user_canceled` alerts; `KeyUpdate` (the
//! receive key changes, and ours too when the peer asks); `NewSessionTicket` on the client side. Anything
//! else, a record that does not open, or one longer than the RFC allows (its inner plaintext counted with its
//! padding) ends the connection with the alert the RFC names, sent best effort. What a peer could make us do
//! for nothing is bounded: 32 empty records in a row, 32 post-handshake messages between two records of data,
//! 4 `user_canceled` alerts. ztunnel changes its own sending key before the suite's confidentiality limit.
//! A connection ending without `close_notify` reads as `UnexpectedEof`, as with rustls's stream.
//! docs/record-layer.md lists every rule, where this differs from rustls and why, and the test of each.
//!
//! In TLS 1.3 `close_notify` closes only its sender's direction (RFC 8446, 6.1): the peer has no more to send,
//! but what we still have to send must reach it. By default the peer's `close_notify` reads as end of stream
//! (what an HTTP/2 client wants: a server that closed will answer nothing more). An HBONE server asks for
//! [`TlsStream::half_close`] instead: reads then wait for the transport's own end, ignoring whatever the peer
//! sends after its `close_notify` as the RFC says, so that HTTP/2 does not take the end of the client's
//! direction for the end of the connection and drop the answers it still has to send.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use ring::aead;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ConnectionTrafficSecrets, SupportedCipherSuite};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// A record's header: type, legacy version, length.
const HEADER: usize = 5;
/// The AEAD tag's length (all of TLS 1.3's suites).
const TAG: usize = 16;
/// Most plaintext in one record (2^14).
pub const MAX_PLAINTEXT: usize = 16 * 1024;
/// Most bytes after the header of a received record (2^14 + 256).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// A received record at its largest.
const MAX_RECORD: usize = HEADER + MAX_CIPHERTEXT;
/// Bytes read from the socket at once while data flows. The read buffer exists only while it does: a node holds
/// an HBONE connection per (pod, peer identity, peer address), thousands of them mostly idle.
pub const READ_CAPACITY: usize = 64 * 1024;
/// Sealed bytes held for the socket before writes wait for it. One whole HTTP/2 DATA frame (up to 256 KiB and
/// its header) goes out in one `write`.
pub const WRITE_LIMIT: usize = 512 * 1024;
/// A write buffer this small is kept when it empties, so small writes do not allocate each time.
const WRITE_KEEP: usize = 4 * 1024;
/// Most bytes of a handshake message after the handshake (a `NewSessionTicket` is far below).
const MAX_HANDSHAKE_MESSAGE: usize = 64 * 1024;
/// What a peer may make us do for nothing: empty records in a row (rustls's and BoringSSL's bound);
/// post-handshake messages between two records of data (`KeyUpdate`s, each a key derivation and maybe a record
/// back, and a client's `NewSessionTicket`s: BoringSSL bounds `KeyUpdate`s so, rustls only those asking for
/// ours, at the same number); `user_canceled` warnings over the connection's life (rustls's bound).
const MAX_EMPTY_RECORDS: u8 = 32;
const MAX_POST_HANDSHAKE: u8 = 32;
const MAX_WARNING_ALERTS: u8 = 4;

// Record content types (RFC 8446, 5.1).
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
// Handshake message types.
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
// Alert levels and descriptions.
const WARNING: u8 = 1;
const FATAL: u8 = 2;
const CLOSE_NOTIFY: u8 = 0;
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const ILLEGAL_PARAMETER: u8 = 47;
const DECODE_ERROR: u8 = 50;
const INTERNAL_ERROR: u8 = 80;
const USER_CANCELED: u8 = 90;

/// One direction's AEAD key, IV and record sequence number.
struct Direction {
    key: aead::LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Direction {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Direction, rustls::Error> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, key, iv),
            _ => return Err(rustls::Error::General("a cipher suite without a record layer here".into())),
        };
        let key = aead::UnboundKey::new(alg, key.as_ref())
            .map_err(|_| rustls::Error::General("a traffic key of the wrong length".into()))?;
        let iv = iv.as_ref().try_into().map_err(|_| rustls::Error::General("an IV of the wrong length".into()))?;
        Ok(Direction { key: aead::LessSafeKey::new(key), iv, seq })
    }

    /// The per-record nonce (RFC 8446, 5.3): the IV XOR the sequence number, left-padded. Advances the number.
    fn next_nonce(&mut self) -> Result<aead::Nonce, rustls::Error> {
        let mut nonce = self.iv;
        for (n, s) in nonce[aead::NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        // The sequence number must never wrap; a peer would need 2^64 records to get here.
        self.seq = self.seq.checked_add(1).ok_or(rustls::Error::EncryptError)?;
        Ok(aead::Nonce::assume_unique_for_key(nonce))
    }
}

/// rustls's side of an established connection: key updates, and session tickets on a client.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }

    fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }

    fn suite(&self) -> SupportedCipherSuite {
        match self {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        }
    }
}

/// A TLS 1.3 connection after its handshake, reading and writing application data over `T`.
pub struct TlsStream<T> {
    io: T,
    kernel: Kernel,
    peer_certificates: Option<Vec<CertificateDer<'static>>>,
    tx: Direction,
    rx: Direction,
    /// Records sent with one key before ztunnel changes it.
    tx_limit: u64,
    /// Bytes from the socket. `rbuf[plain]` is opened application data not yet handed out; records from
    /// `rpos` on are not opened yet.
    rbuf: Vec<u8>,
    plain: std::ops::Range<usize>,
    rpos: usize,
    /// A handshake message received in part.
    handshake: Vec<u8>,
    /// Sealed records from `wpos` on are still to be written.
    wbuf: Vec<u8>,
    wpos: usize,
    /// The peer sent `close_notify`: reads return end of stream (or, half-closed, wait for the transport's).
    read_closed: bool,
    /// Set by [`TlsStream::half_close`]: true once the reader has taken all the peer sent before its
    /// `close_notify`.
    peer_closed: Option<tokio::sync::watch::Sender<bool>>,
    /// The transport reached its end after the peer's `close_notify`.
    transport_ended: bool,
    /// We sent `close_notify` (or a fatal alert): writes fail.
    write_closed: bool,
    /// The connection failed; every later read or write fails with this.
    failed: Option<rustls::Error>,
    /// Empty records received in a row; `KeyUpdate` requests and warnings the peer may still send.
    empty_run: u8,
    post_handshake_left: u8,
    warnings_left: u8,
}

impl<T> std::fmt::Debug for TlsStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("tx_seq", &self.tx.seq)
            .field("rx_seq", &self.rx.seq)
            .field("read_closed", &self.read_closed)
            .field("write_closed", &self.write_closed)
            .finish_non_exhaustive()
    }
}

/// An error as rustls's stream reports it, so callers can tell why a handshake failed.
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The two unbuffered connections, for one handshake driver and one hand-over to the record layer.
trait Unbuffered {
    type Data;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn common(&self) -> &rustls::CommonState;
    /// The traffic secrets, and rustls's side of the connection from now on.
    fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Kernel), rustls::Error>;
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &rustls::CommonState {
        self
    }
    fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Kernel), rustls::Error> {
        self.dangerous_into_kernel_connection().map(|(s, k)| (s, Kernel::Client(k)))
    }
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &rustls::CommonState {
        self
    }
    fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Kernel), rustls::Error> {
        self.dangerous_into_kernel_connection().map(|(s, k)| (s, Kernel::Server(k)))
    }
}

/// Encodes a handshake record (or alert) rustls has ready onto the end of `out`.
fn encode<D>(state: &mut rustls::unbuffered::EncodeTlsData<'_, D>, out: &mut Vec<u8>) -> Result<(), rustls::Error> {
    let start = out.len();
    let mut want = 4096;
    loop {
        out.resize(start + want, 0);
        match state.encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(e)) if e.required_size > want => want = e.required_size,
            Err(e) => {
                out.truncate(start);
                return Err(rustls::Error::General(format!("encoding a handshake record: {e}")));
            }
        }
    }
}

/// What the handshake leaves: bytes read past it, and application data rustls opened on the way.
struct Handshaken {
    incoming: Vec<u8>,
    plaintext: Vec<u8>,
}

/// Drives `conn`'s handshake over `io` to its end (on a server, until the client's `Finished` and certificate
/// are checked). On failure, rustls's alert is sent best effort and the error is returned.
async fn drive<C, T>(conn: &mut C, io: &mut T) -> io::Result<Handshaken>
where
    C: Unbuffered,
    T: AsyncRead + AsyncWrite + Unpin,
{
    enum Next {
        Read,
        Continue,
        Done,
    }
    let mut incoming: Vec<u8> = Vec::with_capacity(MAX_RECORD);
    let mut outgoing: Vec<u8> = Vec::new();
    let mut plaintext: Vec<u8> = Vec::new();
    loop {
        let status = conn.process(&mut incoming);
        let mut discard = status.discard;
        let next = match status.state {
            Err(e) => {
                incoming.drain(..discard);
                // rustls queued an alert for the peer; send it before giving up.
                let mut alert = Vec::new();
                if let Ok(ConnectionState::EncodeTlsData(mut s)) = conn.process(&mut []).state
                    && encode(&mut s, &mut alert).is_ok()
                {
                    let _ = io.write_all(&alert).await;
                    let _ = io.flush().await;
                }
                return Err(tls_error(e));
            }
            Ok(ConnectionState::EncodeTlsData(mut s)) => {
                encode(&mut s, &mut outgoing).map_err(tls_error)?;
                Next::Continue
            }
            Ok(ConnectionState::TransmitTlsData(t)) => {
                io.write_all(&outgoing).await?;
                io.flush().await?;
                outgoing.clear();
                t.done();
                Next::Continue
            }
            Ok(ConnectionState::ReadTraffic(mut r)) => {
                // Application data that came right behind the handshake (HTTP/2's preface, say).
                while let Some(record) = r.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    plaintext.extend_from_slice(record.payload);
                }
                Next::Continue
            }
            Ok(ConnectionState::BlockedHandshake) => Next::Read,
            // A server may send before the client's Finished; the handshake is over only once that is checked.
            Ok(ConnectionState::WriteTraffic(_)) => Next::Done,
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the TLS handshake"));
            }
            Ok(other) => {
                return Err(tls_error(rustls::Error::General(format!("unexpected handshake state {other:?}"))));
            }
        };
        incoming.drain(..discard);
        let read = match next {
            Next::Continue => false,
            Next::Read => true,
            Next::Done if conn.common().is_handshaking() => true,
            Next::Done => return Ok(Handshaken { incoming, plaintext }),
        };
        if read {
            incoming.reserve(MAX_RECORD);
            let n = io.read_buf(&mut incoming).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the TLS handshake"));
            }
        }
    }
}

/// Connects as a TLS 1.3 client over `io`. `config` must enable secret extraction.
pub async fn connect<T: AsyncRead + AsyncWrite + Unpin>(
    config: std::sync::Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    io: T,
) -> io::Result<TlsStream<T>> {
    establish(UnbufferedClientConnection::new(config, name).map_err(tls_error)?, io).await
}

/// Accepts a TLS 1.3 connection over `io`. `config` must enable secret extraction.
pub async fn accept<T: AsyncRead + AsyncWrite + Unpin>(
    config: std::sync::Arc<rustls::ServerConfig>,
    io: T,
) -> io::Result<TlsStream<T>> {
    establish(UnbufferedServerConnection::new(config).map_err(tls_error)?, io).await
}

/// Runs `conn`'s handshake over `io`, then hands the connection to the record layer.
async fn establish<C: Unbuffered, T: AsyncRead + AsyncWrite + Unpin>(
    mut conn: C,
    mut io: T,
) -> io::Result<TlsStream<T>> {
    let done = drive(&mut conn, &mut io).await?;
    let peer = conn.common().peer_certificates().map(<[_]>::to_vec);
    let (secrets, kernel) = conn.into_kernel().map_err(tls_error)?;
    TlsStream::new(io, kernel, secrets, peer, done)
}

impl<T> TlsStream<T> {
    fn new(
        io: T,
        kernel: Kernel,
        secrets: rustls::ExtractedSecrets,
        peer_certificates: Option<Vec<CertificateDer<'static>>>,
        done: Handshaken,
    ) -> io::Result<TlsStream<T>> {
        let tx = Direction::new(secrets.tx).map_err(tls_error)?;
        let rx = Direction::new(secrets.rx).map_err(tls_error)?;
        let tx_limit = match kernel.suite() {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            #[allow(unreachable_patterns)]
            _ => return Err(tls_error(rustls::Error::General("only TLS 1.3 has a record layer here".into()))),
        };
        // The opened application data first, then the records not yet opened.
        let Handshaken { incoming, mut plaintext } = done;
        let plain = 0..plaintext.len();
        plaintext.extend_from_slice(&incoming);
        Ok(TlsStream {
            io,
            kernel,
            peer_certificates,
            tx,
            rx,
            tx_limit,
            rpos: plain.end,
            plain,
            rbuf: plaintext,
            handshake: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            read_closed: false,
            peer_closed: None,
            transport_ended: false,
            write_closed: false,
            failed: None,
            empty_run: 0,
            post_handshake_left: MAX_POST_HANDSHAKE,
            warnings_left: MAX_WARNING_ALERTS,
        })
    }

    /// The peer's certificate chain, end entity first.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.peer_certificates.as_deref()
    }

    /// Keeps the connection whole after the peer's `close_notify`: reads then wait for the transport to end
    /// (what the peer sends after its `close_notify` is ignored) instead of ending the stream. The returned
    /// channel turns true when a read reaches the `close_notify`, that is once everything the peer sent before
    /// it has been read, so that the owner can take it as the end of the peer's data, finish what it still has
    /// to send, and close.
    pub fn half_close(&mut self) -> tokio::sync::watch::Receiver<bool> {
        self.peer_closed.get_or_insert_with(|| tokio::sync::watch::Sender::new(false)).subscribe()
    }

    /// Bytes of buffer held now, reading and writing.
    pub fn buffered_capacity(&self) -> usize {
        self.rbuf.capacity() + self.wbuf.capacity()
    }

    /// The next records' sequence numbers, sending and receiving.
    #[cfg(test)]
    fn sequence_numbers(&self) -> (u64, u64) {
        (self.tx.seq, self.rx.seq)
    }

    /// Appends a record of `inner` type whose content `fill` writes, sealed with the sending key.
    fn seal(&mut self, inner: u8, fill: impl FnOnce(&mut Vec<u8>)) -> Result<(), rustls::Error> {
        let start = self.wbuf.len();
        self.wbuf.extend_from_slice(&[APPLICATION_DATA, 3, 3, 0, 0]);
        fill(&mut self.wbuf);
        self.wbuf.push(inner);
        let len = self.wbuf.len() - start - HEADER + TAG;
        debug_assert!(len <= MAX_PLAINTEXT + 1 + TAG);
        self.wbuf[start + 3..start + 5].copy_from_slice(&(len as u16).to_be_bytes());
        let header: [u8; HEADER] = self.wbuf[start..start + HEADER].try_into().expect("five bytes");
        let sealed = self.tx.next_nonce().and_then(|nonce| {
            self.tx
                .key
                .seal_in_place_separate_tag(nonce, aead::Aad::from(header), &mut self.wbuf[start + HEADER..])
                .map_err(|_| rustls::Error::EncryptError)
        });
        match sealed {
            Ok(tag) => {
                self.wbuf.extend_from_slice(tag.as_ref());
                Ok(())
            }
            Err(e) => {
                // Never leave plaintext where the socket would get it.
                self.wbuf.truncate(start);
                Err(e)
            }
        }
    }

    /// Sends a `KeyUpdate` (under the old key, not asking the peer to change its own) and changes the sending
    /// key.
    fn update_tx_key(&mut self) -> Result<(), rustls::Error> {
        self.seal(HANDSHAKE, |b| b.extend_from_slice(&[KEY_UPDATE, 0, 0, 1, 0]))?;
        self.tx = Direction::new(self.kernel.update_tx()?)?;
        Ok(())
    }

    /// Seals up to `max` bytes of `bufs` as application data records; returns how many.
    fn seal_data(&mut self, bufs: &[io::IoSlice<'_>], max: usize) -> Result<usize, rustls::Error> {
        let total = bufs.iter().map(|b| b.len()).sum::<usize>().min(max);
        self.wbuf.reserve(total + total.div_ceil(MAX_PLAINTEXT) * (HEADER + 1 + TAG));
        let mut slices = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
        let mut current: &[u8] = &[];
        let mut done = 0;
        while done < total {
            if self.tx.seq.saturating_add(1) >= self.tx_limit {
                self.update_tx_key()?;
            }
            let record = (total - done).min(MAX_PLAINTEXT);
            let mut left = record;
            self.seal(APPLICATION_DATA, |b| {
                while left > 0 {
                    if current.is_empty() {
                        current = slices.next().expect("the slices hold `total` bytes");
                    }
                    let n = left.min(current.len());
                    b.extend_from_slice(&current[..n]);
                    current = &current[n..];
                    left -= n;
                }
            })?;
            done += record;
        }
        Ok(done)
    }

    /// Marks the connection failed, queues the fatal alert `description` (if we may still send), and returns
    /// the error to report.
    fn fail(&mut self, description: Option<u8>, e: rustls::Error) -> io::Error {
        if !self.write_closed {
            self.write_closed = true;
            if let Some(d) = description {
                let _ = self.seal(ALERT, |b| b.extend_from_slice(&[2, d]));
            }
        }
        self.failed = Some(e.clone());
        tls_error(e)
    }

    fn failure(&self) -> Option<io::Error> {
        self.failed.clone().map(tls_error)
    }

    /// Opens the next record in the read buffer, if a whole one is there, and acts on it. Returns whether it
    /// did (`Ok(false)`: more bytes are needed).
    fn open_next(&mut self) -> Result<bool, (Option<u8>, rustls::Error)> {
        let avail = &self.rbuf[self.rpos..];
        if avail.len() < HEADER {
            return Ok(false);
        }
        let header: [u8; HEADER] = avail[..HEADER].try_into().expect("five bytes");
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if header[0] != APPLICATION_DATA {
            // Alerts, handshake messages and the compatibility change_cipher_spec travel in protected records
            // once the handshake is over.
            return Err((
                Some(UNEXPECTED_MESSAGE),
                rustls::Error::General(format!("an unprotected record of type {}", header[0])),
            ));
        }
        if header[1..3] != [3, 3] {
            // A protected record's legacy version is always 0x0303 (RFC 8446, 5.2). rustls took any 0x03XX;
            // OpenSSL and BoringSSL take only 0x0303, and so does this: every TLS 1.3 stack sends it, and the
            // header is authenticated anyway, so anything else is a broken or tampered record, better named
            // as such (decode_error, as rustls names a version it refuses) than as a failed tag.
            let e = format!("a record of legacy version {:#04x}{:02x}", header[1], header[2]);
            return Err((Some(DECODE_ERROR), rustls::Error::General(e)));
        }
        if len > MAX_CIPHERTEXT {
            return Err((Some(RECORD_OVERFLOW), rustls::Error::General(format!("a record of {len} bytes"))));
        }
        if avail.len() < HEADER + len {
            return Ok(false);
        }
        let start = self.rpos + HEADER;
        self.rpos += HEADER + len;
        let nonce = self.rx.next_nonce().map_err(|_| (Some(BAD_RECORD_MAC), rustls::Error::DecryptError))?;
        let opened = self
            .rx
            .key
            .open_in_place(nonce, aead::Aad::from(header), &mut self.rbuf[start..start + len])
            .map_err(|_| (Some(BAD_RECORD_MAC), rustls::Error::DecryptError))?;
        // The whole inner plaintext (content, type and padding) is bounded, before the padding comes off
        // (RFC 8446, 5.4): over it, nothing of the record counts.
        if opened.len() > MAX_PLAINTEXT + 1 {
            let n = opened.len();
            return Err((Some(RECORD_OVERFLOW), rustls::Error::General(format!("an inner plaintext of {n} bytes"))));
        }
        // The content type is the last byte that is not zero padding.
        let Some(typ_at) = opened.iter().rposition(|&b| b != 0) else {
            return Err((Some(UNEXPECTED_MESSAGE), rustls::Error::General("a record without a content type".into())));
        };
        if typ_at > MAX_PLAINTEXT {
            return Err((
                Some(RECORD_OVERFLOW),
                rustls::Error::General(format!("a record of {typ_at} bytes of plaintext")),
            ));
        }
        let typ = opened[typ_at];
        if typ_at == 0 {
            if self.empty_run == MAX_EMPTY_RECORDS {
                let e = format!("more than {MAX_EMPTY_RECORDS} empty records in a row");
                return Err((Some(UNEXPECTED_MESSAGE), rustls::Error::General(e)));
            }
            self.empty_run += 1;
        } else {
            self.empty_run = 0;
        }
        if typ != HANDSHAKE && !self.handshake.is_empty() {
            return Err((
                Some(UNEXPECTED_MESSAGE),
                rustls::Error::General("a handshake message cut by another record".into()),
            ));
        }
        match typ {
            APPLICATION_DATA => {
                if typ_at > 0 {
                    self.post_handshake_left = MAX_POST_HANDSHAKE;
                }
                self.plain = start..start + typ_at;
            }
            HANDSHAKE if typ_at == 0 => {
                return Err((Some(UNEXPECTED_MESSAGE), rustls::Error::General("an empty handshake record".into())));
            }
            HANDSHAKE => {
                if self.handshake.len() + typ_at > MAX_HANDSHAKE_MESSAGE {
                    return Err((Some(DECODE_ERROR), rustls::Error::General("a handshake message too long".into())));
                }
                let (from, to) = (start, start + typ_at);
                self.handshake.extend_from_slice(&self.rbuf[from..to]);
                self.handshake_messages()?;
            }
            ALERT => match opened[..typ_at] {
                [level, _] if level != WARNING && level != FATAL => {
                    let e = format!("an alert of level {level}");
                    return Err((Some(ILLEGAL_PARAMETER), rustls::Error::General(e)));
                }
                [_, CLOSE_NOTIFY] => self.read_closed = true,
                [WARNING, USER_CANCELED] => {
                    if self.warnings_left == 0 {
                        let e = format!("more than {MAX_WARNING_ALERTS} user_canceled alerts");
                        return Err((Some(UNEXPECTED_MESSAGE), rustls::Error::General(e)));
                    }
                    self.warnings_left -= 1;
                }
                [WARNING, description] => {
                    // TLS 1.3 has no warnings but these two (RFC 8446, 6); rustls answers decode_error too.
                    let e = format!("a warning alert {description}");
                    return Err((Some(DECODE_ERROR), rustls::Error::General(e)));
                }
                [_, description] => {
                    // The peer has given up on the connection: nothing to answer.
                    return Err((None, rustls::Error::AlertReceived(rustls::AlertDescription::from(description))));
                }
                _ => return Err((Some(DECODE_ERROR), rustls::Error::General("an alert that is not two bytes".into()))),
            },
            other => {
                return Err((
                    Some(UNEXPECTED_MESSAGE),
                    rustls::Error::General(format!("a protected record of type {other}")),
                ));
            }
        }
        Ok(true)
    }

    /// Acts on each whole handshake message received (a partial one waits for the rest).
    fn handshake_messages(&mut self) -> Result<(), (Option<u8>, rustls::Error)> {
        let mut at = 0;
        while let [typ, a, b, c, ..] = self.handshake[at..] {
            let len = u32::from_be_bytes([0, a, b, c]) as usize;
            // Refused as soon as its header says it is too long, not once 16 MiB of it have come.
            if len > MAX_HANDSHAKE_MESSAGE - 4 {
                let e = format!("a handshake message of {len} bytes");
                return Err((Some(DECODE_ERROR), rustls::Error::General(e)));
            }
            if self.handshake.len() - at - 4 < len {
                break;
            }
            let body = at + 4..at + 4 + len;
            at = body.end;
            if self.post_handshake_left == 0 {
                let e = format!("more than {MAX_POST_HANDSHAKE} post-handshake messages without data");
                return Err((Some(UNEXPECTED_MESSAGE), rustls::Error::General(e)));
            }
            self.post_handshake_left -= 1;
            match typ {
                KEY_UPDATE => {
                    let request = match self.handshake[body] {
                        [0] => false,
                        [1] => true,
                        [_] => {
                            return Err((Some(ILLEGAL_PARAMETER), rustls::Error::General("a KeyUpdate value".into())));
                        }
                        _ => {
                            return Err((
                                Some(DECODE_ERROR),
                                rustls::Error::General("a KeyUpdate of the wrong size".into()),
                            ));
                        }
                    };
                    // A key change must end its record (RFC 8446, 5.1).
                    if at != self.handshake.len() {
                        return Err((
                            Some(UNEXPECTED_MESSAGE),
                            rustls::Error::General("a KeyUpdate not at a record's end".into()),
                        ));
                    }
                    let secrets = self.kernel.update_rx().map_err(|e| (Some(INTERNAL_ERROR), e))?;
                    self.rx = Direction::new(secrets).map_err(|e| (Some(INTERNAL_ERROR), e))?;
                    if request && !self.write_closed {
                        self.update_tx_key().map_err(|e| (Some(INTERNAL_ERROR), e))?;
                    }
                }
                NEW_SESSION_TICKET => match &mut self.kernel {
                    Kernel::Client(k) => {
                        let payload = self.handshake[body].to_vec();
                        k.handle_new_session_ticket(&payload).map_err(|e| (Some(DECODE_ERROR), e))?;
                    }
                    Kernel::Server(_) => {
                        return Err((
                            Some(UNEXPECTED_MESSAGE),
                            rustls::Error::General("a session ticket from a client".into()),
                        ));
                    }
                },
                other => {
                    return Err((
                        Some(UNEXPECTED_MESSAGE),
                        rustls::Error::General(format!("handshake message {other} after the handshake")),
                    ));
                }
            }
        }
        self.handshake.drain(..at);
        Ok(())
    }
}

impl<T: AsyncWrite + Unpin> TlsStream<T> {
    /// Writes sealed records until at most `keep` bytes are left (or the socket is full: `Pending`).
    fn poll_write_out(&mut self, cx: &mut Context<'_>, keep: usize) -> Poll<io::Result<()>> {
        while self.wbuf.len() - self.wpos > keep {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        if self.wpos == self.wbuf.len() {
            self.wpos = 0;
            if self.wbuf.capacity() > WRITE_KEEP {
                self.wbuf = Vec::new();
            } else {
                self.wbuf.clear();
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> TlsStream<T> {
    /// Half-closed after the peer's `close_notify`: reads and drops what the transport still brings (RFC 8446,
    /// 6.1: data after a closure alert is ignored) until it ends.
    fn poll_transport_end(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        for _ in 0..16 {
            self.rbuf.clear();
            (self.rpos, self.plain) = (0, 0..0);
            self.rbuf.reserve_exact(MAX_RECORD);
            match crate::sys::poll_read_spare(Pin::new(&mut self.io), cx, &mut self.rbuf) {
                Poll::Pending => {
                    self.rbuf = Vec::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => {
                    self.rbuf = Vec::new();
                    self.transport_ended = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
        // A peer that keeps sending gets no more than its share of this task's time.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Whether this call handed out data: it then returns before reading the socket again.
        let mut handed = false;
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(out.remaining());
                out.put_slice(&this.rbuf[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                handed = true;
                if out.remaining() == 0 {
                    return Poll::Ready(Ok(()));
                }
                // Room for more: open the next record if the buffer holds a whole one.
                continue;
            }
            if let Some(e) = this.failure() {
                // A failure shows on the next call, after the data before it.
                return Poll::Ready(if handed { Ok(()) } else { Err(e) });
            }
            if this.read_closed {
                let Some(closed) = this.peer_closed.as_ref().filter(|_| !handed && !this.transport_ended) else {
                    return Poll::Ready(Ok(()));
                };
                closed.send_replace(true);
                return this.poll_transport_end(cx);
            }
            if out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match this.open_next() {
                Ok(true) => {
                    // A key update may have queued our own; send it (best effort: writes also send it).
                    if this.wbuf.len() > this.wpos {
                        let _ = this.poll_write_out(cx, 0);
                    }
                    continue;
                }
                Ok(false) if handed => return Poll::Ready(Ok(())),
                Ok(false) => {}
                Err((description, e)) => {
                    let e = this.fail(description, e);
                    let _ = this.poll_write_out(cx, 0);
                    return Poll::Ready(if handed { Ok(()) } else { Err(e) });
                }
            }
            // More bytes are needed. Keep what is left of a record at the buffer's start, with room for a
            // whole burst behind it.
            if this.rpos == this.rbuf.len() {
                this.rbuf.clear();
                this.rpos = 0;
            } else if this.rpos > 0 && this.rbuf.capacity() - this.rbuf.len() < MAX_RECORD {
                this.rbuf.copy_within(this.rpos.., 0);
                this.rbuf.truncate(this.rbuf.len() - this.rpos);
                this.rpos = 0;
            }
            if this.rbuf.capacity() - this.rbuf.len() < MAX_RECORD {
                this.rbuf.reserve_exact((READ_CAPACITY + MAX_RECORD).saturating_sub(this.rbuf.len()));
            }
            match crate::sys::poll_read_spare(Pin::new(&mut this.io), cx, &mut this.rbuf) {
                Poll::Pending => {
                    // The socket ran dry. Between bursts an idle connection holds no read buffer.
                    if this.rbuf.is_empty() {
                        this.rbuf = Vec::new();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed connection without sending TLS close_notify",
                    )));
                }
                Poll::Ready(Ok(_)) => crate::busy_poll::activity(),
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(e) = this.failure() {
            return Poll::Ready(Err(e));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "TLS connection closed for writing")));
        }
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        // Room for more: the socket must have taken all but less than the limit.
        ready!(this.poll_write_out(cx, WRITE_LIMIT - 1))?;
        let room = WRITE_LIMIT - (this.wbuf.len() - this.wpos);
        let n = match this.seal_data(bufs, room) {
            Ok(n) => n,
            Err(e) => {
                let e = this.fail(Some(INTERNAL_ERROR), e);
                return Poll::Ready(Err(e));
            }
        };
        // Send now what the socket takes; the rest goes on the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_write_out(cx, 0) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_write_out(cx, 0))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.write_closed {
            this.write_closed = true;
            if let Err(e) = this.seal(ALERT, |b| b.extend_from_slice(&[1, CLOSE_NOTIFY])) {
                return Poll::Ready(Err(tls_error(e)));
            }
        }
        ready!(this.poll_write_out(cx, 0))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::certs::{CertStore, LocalCa};
    use crate::identity::Identity;
    use crate::tls::{TrustRoots, client_config, server_config};

    /// Both sides' configs, with certificates from a fresh CA.
    struct Pki {
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
        _store: Arc<CertStore>,
    }

    async fn pki() -> Pki {
        let td = "cluster.local";
        let (cert, key) = crate::certs::tests::test_ca(td);
        let ca = LocalCa::from_pem(&cert, &key, Duration::from_secs(3600)).unwrap();
        let roots = Arc::new(TrustRoots::new(&[ca.ca_cert()], td).unwrap());
        let store = CertStore::local(ca, td);
        let (client_id, server_id) = (Identity::new(td, "a", "client"), Identity::new(td, "b", "server"));
        store.fetch(&server_id).await.unwrap();
        let client_cert = store.fetch(&client_id).await.unwrap();
        Pki {
            server: Arc::new(server_config(CertStore::resolver(&store, server_id.clone()), roots.clone())),
            client: Arc::new(client_config(client_cert.certified.clone(), vec![server_id], roots)),
            _store: store,
        }
    }

    fn name() -> ServerName<'static> {
        ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())
    }

    /// Our client and our server, connected.
    async fn ours(pki: &Pki) -> (TlsStream<DuplexStream>, TlsStream<DuplexStream>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (c, s) = tokio::join!(connect(pki.client.clone(), name(), a), accept(pki.server.clone(), b));
        (c.unwrap(), s.unwrap())
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
    }

    /// Seals `inner` (content, type and padding, as given) into one record on `s`'s way out, whatever its
    /// length: what a peer that breaks the rules would send.
    fn seal_raw(s: &mut TlsStream<DuplexStream>, inner: &[u8]) {
        let start = s.wbuf.len();
        s.wbuf.extend_from_slice(&[APPLICATION_DATA, 3, 3, 0, 0]);
        s.wbuf.extend_from_slice(inner);
        let len = (inner.len() + TAG) as u16;
        s.wbuf[start + 3..start + 5].copy_from_slice(&len.to_be_bytes());
        let header: [u8; HEADER] = s.wbuf[start..start + HEADER].try_into().unwrap();
        let nonce = s.tx.next_nonce().unwrap();
        let tag =
            s.tx.key.seal_in_place_separate_tag(nonce, aead::Aad::from(header), &mut s.wbuf[start + HEADER..]).unwrap();
        s.wbuf.extend_from_slice(tag.as_ref());
    }

    /// RFC 8446, 5.4: an inner plaintext over 2^14 + 1 bytes is `record_overflow`, even when what makes it too
    /// long is padding, and nothing of it reaches the app.
    #[tokio::test]
    async fn an_inner_plaintext_too_long_by_its_padding_is_refused_and_nothing_delivered() {
        let pki = pki().await;
        let (mut c, mut s) = ours(&pki).await;
        let mut inner = pattern(MAX_PLAINTEXT, 7);
        inner.extend_from_slice(&[APPLICATION_DATA, 0]);
        seal_raw(&mut c, &inner);
        c.flush().await.unwrap();
        let mut got = vec![0u8; 2 * MAX_PLAINTEXT];
        let e = s.read(&mut got).await.expect_err("refused");
        assert!(e.to_string().contains("inner plaintext of 16386 bytes"), "{e}");
        // One byte less, all content and no padding, is the most a record may hold: delivered whole.
        let (mut c, mut s) = ours(&pki).await;
        let mut inner = pattern(MAX_PLAINTEXT, 9);
        inner.push(APPLICATION_DATA);
        seal_raw(&mut c, &inner);
        c.flush().await.unwrap();
        assert_eq!(read_n(&mut s, MAX_PLAINTEXT).await, pattern(MAX_PLAINTEXT, 9));
    }

    /// The cheap floods rustls bounds are bounded here the same: empty records in a row, `KeyUpdate`
    /// requests between records of data, `user_canceled` warnings; below each bound, nothing changes.
    #[tokio::test]
    async fn floods_a_peer_sends_for_nothing_are_bounded_as_rustls_bounds_them() {
        let pki = pki().await;
        let empty = [APPLICATION_DATA];
        let key_update = [KEY_UPDATE, 0, 0, 1, 1, HANDSHAKE];
        let canceled = [1, USER_CANCELED, ALERT];
        // The most of each, then data: delivered.
        let (mut c, mut s) = ours(&pki).await;
        for _ in 0..MAX_EMPTY_RECORDS {
            seal_raw(&mut c, &empty);
        }
        for _ in 0..MAX_POST_HANDSHAKE {
            seal_raw(&mut c, &key_update);
            c.tx = Direction::new(c.kernel.update_tx().unwrap()).unwrap();
        }
        for _ in 0..MAX_WARNING_ALERTS {
            seal_raw(&mut c, &canceled);
        }
        seal_raw(&mut c, b"after all that\x17");
        c.flush().await.unwrap();
        assert_eq!(read_n(&mut s, 14).await, b"after all that");
        // Data lets as many post-handshake messages come again.
        for _ in 0..MAX_POST_HANDSHAKE {
            seal_raw(&mut c, &key_update);
            c.tx = Direction::new(c.kernel.update_tx().unwrap()).unwrap();
        }
        seal_raw(&mut c, b"again\x17");
        c.flush().await.unwrap();
        assert_eq!(read_n(&mut s, 5).await, b"again");
        // One more of each ends the connection.
        for (what, inner, rekey) in [
            ("empty records", &empty[..], false),
            ("post-handshake messages", &key_update[..], true),
            ("post-handshake messages", &[KEY_UPDATE, 0, 0, 1, 0, HANDSHAKE][..], true),
            ("user_canceled alerts", &canceled[..], false),
        ] {
            let (mut c, mut s) = ours(&pki).await;
            let n = match what {
                "empty records" => MAX_EMPTY_RECORDS,
                "post-handshake messages" => MAX_POST_HANDSHAKE,
                _ => MAX_WARNING_ALERTS,
            };
            for _ in 0..=n {
                seal_raw(&mut c, inner);
                if rekey {
                    c.tx = Direction::new(c.kernel.update_tx().unwrap()).unwrap();
                }
            }
            c.flush().await.unwrap();
            // Gone after the flood: without the bound, the read ends at the cut, not at the flood.
            drop(c);
            let e = s.read(&mut [0u8; 64]).await.expect_err(what);
            assert!(e.to_string().contains(what), "{what}: {e}");
        }
    }

    /// RFC 8446, 6.1: `close_notify` ends its sender's direction only. Half-closed, a server reads all that
    /// came before it, is told once it has, ignores what comes after, and still sends; the transport's end
    /// ends its reads. By default the `close_notify` reads as the end at once.
    #[tokio::test]
    async fn after_a_close_notify_a_half_closed_server_still_sends_and_reads_only_the_transport_end() {
        let pki = pki().await;
        let (mut c, mut s) = ours(&pki).await;
        let mut closed = s.half_close();
        let up = pattern(20_000, 3);
        c.write_all(&up).await.unwrap();
        seal_raw(&mut c, &[1, CLOSE_NOTIFY, ALERT]);
        // Ignored: a record after the close, even one that does not open.
        c.wbuf.extend_from_slice(&[APPLICATION_DATA, 3, 3, 0, 20]);
        c.wbuf.extend_from_slice(&[0xee; 20]);
        c.flush().await.unwrap();
        assert_eq!(read_n(&mut s, up.len()).await, up);
        assert!(!*closed.borrow(), "not told before the data before the close is read");
        let mut more = [0u8; 64];
        let pending = tokio::time::timeout(Duration::from_millis(200), s.read(&mut more)).await;
        assert!(pending.is_err(), "a half-closed read waits for the transport: {pending:?}");
        assert!(*closed.borrow_and_update(), "told of the close once a read reached it");
        // The answer still goes out, and the client reads it whole.
        s.write_all(&pattern(20_000, 4)).await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(read_n(&mut c, 20_000).await, pattern(20_000, 4));
        drop(c);
        assert_eq!(s.read(&mut more).await.unwrap(), 0, "the transport's end ends the reads");
        assert_eq!(s.read(&mut more).await.unwrap(), 0, "and stays the end");

        // Not half-closed: the close_notify is the end of the stream, and writes still go.
        let (mut c, mut s) = ours(&pki).await;
        c.write_all(b"last").await.unwrap();
        seal_raw(&mut c, &[1, CLOSE_NOTIFY, ALERT]);
        c.flush().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last");
        s.write_all(b"answer").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(read_n(&mut c, 6).await, b"answer");
    }

    #[tokio::test]
    async fn every_byte_arrives_both_ways_and_close_notify_ends_the_stream() {
        let pki = pki().await;
        let (mut c, mut s) = ours(&pki).await;
        assert_eq!(rustls_identity(&s), Some(Identity::new("cluster.local", "a", "client")));
        let up = pattern(1_000_123, 1);
        let writer = async {
            // Writes of every shape: one byte, a record and a bit, a vectored write across slices, a large one.
            c.write_all(&up[..1]).await.unwrap();
            c.write_all(&up[1..MAX_PLAINTEXT + 2]).await.unwrap();
            let (x, y) = up[MAX_PLAINTEXT + 2..40_000].split_at(9);
            let n = c.write_vectored(&[io::IoSlice::new(x), io::IoSlice::new(y)]).await.unwrap();
            c.write_all(&up[MAX_PLAINTEXT + 2 + n..]).await.unwrap();
            c.shutdown().await.unwrap();
            c
        };
        let reader = async {
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        };
        let (mut c, got) = tokio::join!(writer, reader);
        assert!(got == up, "the server read {} bytes, not the {} sent in order", got.len(), up.len());
        assert!(c.wbuf.capacity() <= WRITE_KEEP, "a flushed writer keeps at most a small buffer");

        // The other way, while the client's write side is already closed.
        let down = pattern(300_000, 2);
        let (_, got) = tokio::join!(
            async {
                s.write_all(&down).await.unwrap();
                s.shutdown().await.unwrap();
            },
            async {
                let mut got = Vec::new();
                c.read_to_end(&mut got).await.unwrap();
                got
            }
        );
        assert!(got == down);
        assert!(c.write_all(b"late").await.is_err(), "no writes after close_notify");
    }

    fn rustls_identity<T>(s: &TlsStream<T>) -> Option<Identity> {
        s.peer_certificates().and_then(|c| c.first()).and_then(crate::tls::identity_of)
    }

    #[tokio::test]
    async fn application_data_right_behind_the_handshake_is_kept() {
        let pki = pki().await;
        let (a, b) = tokio::io::duplex(1 << 20);
        // The client's Finished and its first bytes reach the server's socket in one piece, so rustls opens
        // that record during the handshake and hands it over.
        let client = tokio::spawn({
            let cfg = pki.client.clone();
            async move {
                let mut c = connect(cfg, name(), a).await.unwrap();
                c.write_all(b"PRI * HTTP/2.0").await.unwrap();
                c
            }
        });
        let mut s = accept(pki.server.clone(), b).await.unwrap();
        let _c = client.await.unwrap();
        assert!(!s.plain.is_empty(), "the test must cover data opened during the handshake");
        let mut got = [0u8; 14];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"PRI * HTTP/2.0");
    }

    #[tokio::test]
    async fn an_idle_reader_holds_no_buffer() {
        let pki = pki().await;
        let (mut c, mut s) = ours(&pki).await;
        c.write_all(&pattern(200_000, 3)).await.unwrap();
        let mut got = vec![0u8; 200_000];
        s.read_exact(&mut got).await.unwrap();
        let idle = tokio::time::timeout(Duration::from_millis(20), s.read(&mut got)).await;
        assert!(idle.is_err(), "nothing more to read");
        assert_eq!(s.buffered_capacity(), 0, "the read buffer goes when the socket runs dry");
    }

    /// Reads until `want` bytes came, answering what the peer needs meanwhile.
    async fn read_n<R: AsyncRead + Unpin>(r: &mut R, want: usize) -> Vec<u8> {
        let mut got = vec![0u8; want];
        r.read_exact(&mut got).await.unwrap();
        got
    }

    #[tokio::test]
    async fn interoperates_with_rustls_own_stream_through_key_updates_both_ways() {
        let pki = pki().await;

        // Our client, rustls's server.
        let (a, b) = tokio::io::duplex(1 << 20);
        let (c, s) = tokio::join!(
            connect(pki.client.clone(), name(), a),
            tokio_rustls::TlsAcceptor::from(pki.server.clone()).accept(b)
        );
        let (mut ours, mut theirs) = (c.unwrap(), s.unwrap());
        let data = pattern(100_000, 4);
        ours.write_all(&data).await.unwrap();
        ours.flush().await.unwrap();
        assert!(read_n(&mut theirs, data.len()).await == data);
        // rustls changes its sending key and asks for ours to change too.
        theirs.get_mut().1.refresh_traffic_keys().unwrap();
        theirs.write_all(&data).await.unwrap();
        theirs.flush().await.unwrap();
        assert!(read_n(&mut ours, data.len()).await == data);
        assert_eq!(ours.sequence_numbers(), (0, 7), "both keys changed: 7 records since, none sent");
        // What we send now is under our new key, after our KeyUpdate: rustls must follow.
        ours.write_all(&data).await.unwrap();
        ours.flush().await.unwrap();
        assert!(read_n(&mut theirs, data.len()).await == data);
        // Our own key change, forced early: every few records.
        ours.tx_limit = 3;
        let big = pattern(MAX_PLAINTEXT * 10, 5);
        let (_, got) = tokio::join!(
            async {
                ours.write_all(&big).await.unwrap();
                ours.flush().await.unwrap();
            },
            read_n(&mut theirs, big.len())
        );
        assert!(got == big);
        assert!(ours.sequence_numbers().0 < 3, "the key changed every two records");
        let (_, got) = tokio::join!(async { ours.shutdown().await.unwrap() }, async {
            let mut rest = Vec::new();
            theirs.read_to_end(&mut rest).await.unwrap();
            rest
        });
        assert!(got.is_empty(), "rustls saw a clean close_notify");

        // rustls's client, our server.
        let (a, b) = tokio::io::duplex(1 << 20);
        let (c, s) = tokio::join!(
            tokio_rustls::TlsConnector::from(pki.client.clone()).connect(name(), a),
            accept(pki.server.clone(), b)
        );
        let (mut theirs, mut ours) = (c.unwrap(), s.unwrap());
        theirs.write_all(&data).await.unwrap();
        theirs.flush().await.unwrap();
        assert!(read_n(&mut ours, data.len()).await == data);
        theirs.get_mut().1.refresh_traffic_keys().unwrap();
        theirs.write_all(&data).await.unwrap();
        theirs.flush().await.unwrap();
        assert!(read_n(&mut ours, data.len()).await == data);
        ours.write_all(&data).await.unwrap();
        ours.flush().await.unwrap();
        assert!(read_n(&mut theirs, data.len()).await == data);
        drop(ours);
        let mut rest = Vec::new();
        let eof = theirs.read_to_end(&mut rest).await.unwrap_err();
        assert_eq!(eof.kind(), io::ErrorKind::UnexpectedEof, "no close_notify: truncation shows");
    }

    #[tokio::test]
    async fn a_tampered_record_fails_and_the_sender_hears_bad_record_mac() {
        let pki = pki().await;
        let (mut c, mut s) = ours(&pki).await;
        c.seal(APPLICATION_DATA, |b| b.extend_from_slice(b"transfer 100")).unwrap();
        let at = c.wbuf.len() - TAG - 3;
        c.wbuf[at] ^= 1;
        c.flush().await.unwrap();
        let e = s.read(&mut [0u8; 64]).await.unwrap_err();
        assert!(matches!(rustls_error(&e), Some(rustls::Error::DecryptError)), "{e}");
        assert!(s.read(&mut [0u8; 64]).await.is_err(), "a failed connection stays failed");
        assert!(s.write_all(b"x").await.is_err());
        let e = c.read(&mut [0u8; 64]).await.unwrap_err();
        assert!(
            matches!(rustls_error(&e), Some(rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac))),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_protected_record_of_a_type_not_allowed_here_is_refused() {
        let pki = pki().await;
        for (typ, body) in [(HANDSHAKE, &[1u8, 0, 0, 0][..]), (HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 7]), (99, b"?")] {
            let (mut c, mut s) = ours(&pki).await;
            c.seal(typ, |b| b.extend_from_slice(body)).unwrap();
            c.flush().await.unwrap();
            let e = s.read(&mut [0u8; 64]).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "type {typ}: {e}");
        }
        // A ticket sent to a server.
        let (mut c, mut s) = ours(&pki).await;
        c.seal(HANDSHAKE, |b| b.extend_from_slice(&[NEW_SESSION_TICKET, 0, 0, 0])).unwrap();
        c.flush().await.unwrap();
        assert!(s.read(&mut [0u8; 64]).await.is_err());
    }

    #[tokio::test]
    async fn an_unprotected_or_oversized_record_is_refused() {
        let pki = pki().await;
        for raw in [&[ALERT, 3, 3, 0, 2, 1, 0][..], &[APPLICATION_DATA, 3, 3, 0x41, 0x01]] {
            let (mut c, mut s) = ours(&pki).await;
            c.io.write_all(raw).await.unwrap();
            let e = s.read(&mut [0u8; 64]).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{raw:?}: {e}");
        }
    }

    #[tokio::test]
    async fn a_cut_record_is_an_unexpected_eof() {
        let pki = pki().await;
        let (mut c, mut s) = ours(&pki).await;
        c.seal(APPLICATION_DATA, |b| b.extend_from_slice(b"half of this")).unwrap();
        let cut = c.wbuf.len() - 4;
        c.io.write_all(&c.wbuf[..cut]).await.unwrap();
        drop(c);
        let e = s.read(&mut [0u8; 64]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// The record reader's fuzzer: sequences of records, each valid, known bad or arbitrary, sealed with the
    /// right keys (so that they reach the rules past the AEAD, which random bytes never do) and fed to a
    /// server in random cuts. The oracle: every valid record's data arrives, in order, and nothing else; at
    /// the first known-bad record the reader fails, delivering nothing of it or after it; after an
    /// arbitrary record, what arrives still begins with all the data before it; never a panic, never a hang.
    /// Both ways: a server reading a client's records, a client a server's (its `NewSessionTicket`s go to
    /// rustls). `AMBIT_FUZZ_CASES` sets the number of sequences (512 by default, as in CI, about a second;
    /// run it longer by hand, say
    /// `AMBIT_FUZZ_CASES=20000 cargo test -p ztunnel --lib fuzz_`). A failure proptest finds is kept in
    /// `ztunnel/proptest-regressions/` and replayed first from then on.
    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        #[derive(Debug, Clone)]
        pub(super) enum Record {
            // Valid.
            Data(Vec<u8>, usize),
            Empty,
            KeyUpdate { request: bool, split: Option<usize> },
            UserCanceled,
            // Known bad: the connection must end here.
            FlippedBit(Vec<u8>, usize),
            KeyUpdateValue(u8),
            AlertLevel(u8),
            Unprotected(u8, Vec<u8>),
            Overflow(usize),
            // Arbitrary: whatever the reader makes of it, it must not break the rules above.
            Inner(Vec<u8>),
            Handshake(Vec<u8>, usize),
        }

        impl Record {
            fn is_valid(&self) -> bool {
                matches!(self, Record::Data(..) | Record::Empty | Record::KeyUpdate { .. } | Record::UserCanceled)
            }

            fn is_bad(&self) -> bool {
                !self.is_valid() && !matches!(self, Record::Inner(_) | Record::Handshake(..))
            }
        }

        fn valid() -> impl Strategy<Value = Record> {
            prop_oneof![
                6 => (proptest::collection::vec(any::<u8>(), 1..3000), 0usize..64).prop_map(|(d, p)| Record::Data(d, p)),
                1 => Just(Record::Empty),
                1 => (any::<bool>(), proptest::option::of(1usize..5))
                    .prop_map(|(request, split)| Record::KeyUpdate { request, split }),
                1 => Just(Record::UserCanceled),
            ]
        }

        fn other() -> impl Strategy<Value = Record> {
            prop_oneof![
                (proptest::collection::vec(any::<u8>(), 1..200), any::<usize>())
                    .prop_map(|(d, i)| Record::FlippedBit(d, i)),
                (2u8..=255).prop_map(Record::KeyUpdateValue),
                any::<u8>().prop_filter("a level", |l| *l != 1 && *l != 2).prop_map(Record::AlertLevel),
                (
                    prop_oneof![Just(20u8), Just(21), Just(22), Just(24), any::<u8>()],
                    proptest::collection::vec(any::<u8>(), 0..40)
                )
                    .prop_filter("an unprotected type", |(t, _)| *t != APPLICATION_DATA)
                    .prop_map(|(t, d)| Record::Unprotected(t, d)),
                (1usize..300).prop_map(Record::Overflow),
                proptest::collection::vec(any::<u8>(), 0..300).prop_map(Record::Inner),
                (proptest::collection::vec(any::<u8>(), 0..300), any::<usize>())
                    .prop_map(|(d, i)| Record::Handshake(d, i)),
            ]
        }

        /// Valid records (within the flood bounds), maybe one other, maybe valid ones after it.
        pub(super) fn sequence() -> impl Strategy<Value = Vec<Record>> {
            (
                proptest::collection::vec(valid(), 0..40),
                proptest::option::of(other()),
                proptest::collection::vec(valid(), 0..4),
            )
                .prop_map(|(mut a, o, b)| {
                    if let Some(o) = o {
                        a.push(o);
                        a.extend(b);
                    }
                    a
                })
                .prop_filter("within the flood bounds", |seq| {
                    let warnings = seq.iter().filter(|r| matches!(r, Record::UserCanceled)).count();
                    let (mut empty, mut updates) = (0u8, 0u8);
                    let mut within = warnings <= usize::from(MAX_WARNING_ALERTS);
                    for r in seq.iter().take_while(|r| r.is_valid()) {
                        match r {
                            Record::Data(..) => (empty, updates) = (0, 0),
                            Record::Empty => empty += 1,
                            Record::KeyUpdate { .. } => (empty, updates) = (0, updates + 1),
                            Record::UserCanceled => empty = 0,
                            _ => {}
                        }
                        within &= empty <= MAX_EMPTY_RECORDS && updates <= MAX_POST_HANDSHAKE;
                    }
                    within
                })
        }

        /// Seals `seq` on `c`'s way out; returns the data the valid records before the first other one carry.
        fn seal_all(c: &mut TlsStream<DuplexStream>, seq: &[Record]) -> Vec<u8> {
            let mut expected = Vec::new();
            let mut counting = true;
            for r in seq {
                counting &= r.is_valid();
                match r {
                    Record::Data(d, pad) => {
                        let mut inner = d.clone();
                        inner.push(APPLICATION_DATA);
                        inner.resize(inner.len() + pad, 0);
                        seal_raw(c, &inner);
                        if counting {
                            expected.extend_from_slice(d);
                        }
                    }
                    Record::Empty => seal_raw(c, &[APPLICATION_DATA]),
                    Record::KeyUpdate { request, split } => {
                        let msg = [KEY_UPDATE, 0, 0, 1, u8::from(*request)];
                        match split {
                            Some(at) => {
                                seal_raw(c, &[&msg[..*at], &[HANDSHAKE]].concat());
                                seal_raw(c, &[&msg[*at..], &[HANDSHAKE]].concat());
                            }
                            None => seal_raw(c, &[&msg[..], &[HANDSHAKE]].concat()),
                        }
                        c.tx = Direction::new(c.kernel.update_tx().unwrap()).unwrap();
                    }
                    Record::UserCanceled => seal_raw(c, &[WARNING, USER_CANCELED, ALERT]),
                    Record::FlippedBit(d, i) => {
                        let start = c.wbuf.len();
                        seal_raw(c, &[&d[..], &[APPLICATION_DATA]].concat());
                        // Anywhere but the length field (a longer record only waits for bytes that never come).
                        let mut at = i % (c.wbuf.len() - start - 2);
                        if at >= 3 {
                            at += 2;
                        }
                        c.wbuf[start + at] ^= 1 << (i % 8);
                    }
                    Record::KeyUpdateValue(v) => seal_raw(c, &[KEY_UPDATE, 0, 0, 1, *v, HANDSHAKE]),
                    Record::AlertLevel(l) => seal_raw(c, &[*l, USER_CANCELED, ALERT]),
                    Record::Unprotected(t, d) => {
                        c.wbuf.extend_from_slice(&[*t, 3, 3]);
                        c.wbuf.extend_from_slice(&(d.len() as u16).to_be_bytes());
                        c.wbuf.extend_from_slice(d);
                    }
                    Record::Overflow(extra) => {
                        let mut inner = vec![b'x'; MAX_PLAINTEXT];
                        inner.push(APPLICATION_DATA);
                        inner.resize(inner.len() + extra, 0);
                        seal_raw(c, &inner);
                    }
                    Record::Inner(inner) => seal_raw(c, inner),
                    Record::Handshake(d, at) => {
                        let at = at % (d.len() + 1);
                        seal_raw(c, &[&d[..at], &[HANDSHAKE]].concat());
                        seal_raw(c, &[&d[at..], &[HANDSHAKE]].concat());
                    }
                }
            }
            expected
        }

        /// Sends `seq` to the server, or (`to_client`) to the client, in `cuts`, and checks what it reads.
        pub(super) fn check(pki: &Pki, seq: Vec<Record>, cuts: Vec<usize>, to_client: bool) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (c, s) = ours(pki).await;
                let (mut c, mut s) = if to_client { (s, c) } else { (c, s) };
                let expected = seal_all(&mut c, &seq);
                let bytes = std::mem::take(&mut c.wbuf);
                let writer = async move {
                    // In the cuts given, then the transport's end (no close_notify).
                    let mut at = 0;
                    for cut in cuts.iter().chain(std::iter::repeat(&usize::MAX)) {
                        if at == bytes.len() {
                            break;
                        }
                        let n = (*cut).clamp(1, bytes.len() - at);
                        if c.io.write_all(&bytes[at..at + n]).await.is_err() {
                            break;
                        }
                        at += n;
                        tokio::task::yield_now().await;
                    }
                    drop(c);
                };
                let reader = async {
                    let mut got = Vec::new();
                    let end = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
                    (got, end.expect("the reader hangs"))
                };
                let ((), (got, end)) = tokio::join!(writer, reader);
                let bad = seq.iter().any(Record::is_bad);
                let arbitrary = seq.iter().any(|r| !r.is_valid() && !r.is_bad());
                let e = end.expect_err("no close_notify: never a clean end");
                if !bad && !arbitrary {
                    assert!(got == expected, "valid records: {} bytes of {} delivered", got.len(), expected.len());
                    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "valid records end only at the cut: {e}");
                } else if bad {
                    assert!(got == expected, "up to a bad record: {} bytes, not {}", got.len(), expected.len());
                    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "a bad record is refused: {e}");
                } else {
                    assert!(got.starts_with(&expected), "an arbitrary record lost data before it");
                }
            });
        }
    }

    fn fuzz_config() -> proptest::prelude::ProptestConfig {
        let cases = std::env::var("AMBIT_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512);
        proptest::prelude::ProptestConfig { cases, ..Default::default() }
    }

    static FUZZ_PKI: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();

    proptest::proptest! {
        #![proptest_config(fuzz_config())]
        #[test]
        fn fuzz_records_after_the_handshake(
            seq in fuzz::sequence(),
            cuts in proptest::collection::vec(1usize..20_000, 0..20),
            to_client: bool,
        ) {
            let pki = FUZZ_PKI.get_or_init(|| {
                tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(pki())
            });
            fuzz::check(pki, seq, cuts, to_client);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Whatever bytes follow the handshake, the reader ends with an error, never a panic and never data.
        #[test]
        fn garbage_after_the_handshake_is_an_error(garbage in proptest::collection::vec(proptest::num::u8::ANY, 0..40_000)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let pki = pki().await;
                let (mut c, mut s) = ours(&pki).await;
                c.io.write_all(&garbage).await.unwrap();
                drop(c);
                let mut got = Vec::new();
                assert!(s.read_to_end(&mut got).await.is_err());
                assert!(got.is_empty());
            });
        }
    }
}
