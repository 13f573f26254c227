#!/usr/bin/python3
"""A TLS 1.3 peer that is not rustls, for ztunnel's own record layer (ztunnel/src/tls/record.rs).

OpenSSL (Python's ssl module, on memory buffers) runs the handshake with a client certificate of the mesh.
From then on this script writes and reads the records itself: the traffic secrets come from OpenSSL's key log,
the keys and nonces are derived here (RFC 8446, 7.1 and 7.3) and the AEADs are OpenSSL's through the
`cryptography` package. Each case then sends records a receiver must refuse (or accept) and checks what
ztunnel answers: the alert RFC 8446 names, the connection's end, and that nothing of a refused record reaches
the app behind ztunnel.

  tls13_peer.py sink --listen ADDR --log FILE
      the app: an echo server that also appends all it receives to FILE (run in the server pod)
  tls13_peer.py list
      the cases, the rule each checks and what it expects
  tls13_peer.py cases --server ADDR --server-identity ID --target ADDR --cert F --key F --ca F --sink-log FILE
                      [--only NAME]...
      runs the cases against ztunnel's HBONE port ADDR, tunnelling to the sink at --target; prints one JSON
      object per line per case, then a summary line; exits 1 if any case failed

The cipher suite is whatever OpenSSL offers first unless OPENSSL_CONF restricts it (the lab test runs the cases
once per suite that way: Python's ssl module cannot set TLS 1.3 suites itself).
"""

import argparse
import json
import os
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.exceptions import InvalidTag

# Record content types and handshake message types (RFC 8446, 5.1 and 4).
CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA = 20, 21, 22, 23
CLIENT_HELLO, NEW_SESSION_TICKET, END_OF_EARLY_DATA, CERTIFICATE, CERTIFICATE_REQUEST = 1, 4, 5, 11, 13
FINISHED, KEY_UPDATE = 20, 24
# Alerts (RFC 8446, 6).
WARNING, FATAL = 1, 2
ALERTS = {
    0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac", 22: "record_overflow",
    40: "handshake_failure", 42: "bad_certificate", 47: "illegal_parameter", 50: "decode_error",
    70: "protocol_version", 80: "internal_error", 90: "user_canceled",
}
CODES = {v: k for k, v in ALERTS.items()}

MAX_PLAINTEXT = 1 << 14
SUITES = {
    "TLS_AES_128_GCM_SHA256": (AESGCM, 16, hashes.SHA256),
    "TLS_AES_256_GCM_SHA384": (AESGCM, 32, hashes.SHA384),
    "TLS_CHACHA20_POLY1305_SHA256": (ChaCha20Poly1305, 32, hashes.SHA256),
}
TIMEOUT = 5.0


def expand_label(secret, label, length, hash_cls):
    """HKDF-Expand-Label with an empty context (RFC 8446, 7.1)."""
    full = b"tls13 " + label
    info = struct.pack(">HB", length, len(full)) + full + b"\x00"
    return HKDFExpand(hash_cls(), length, info).derive(secret)


class Direction:
    """One direction's traffic keys and sequence number (RFC 8446, 5.3 and 7.3)."""

    def __init__(self, suite, secret):
        self.aead_cls, self.key_len, self.hash_cls = SUITES[suite]
        self.set(secret)

    def set(self, secret):
        self.secret = secret
        self.aead = self.aead_cls(expand_label(secret, b"key", self.key_len, self.hash_cls))
        self.iv = expand_label(secret, b"iv", 12, self.hash_cls)
        self.seq = 0

    def update(self):
        self.set(expand_label(self.secret, b"traffic upd", self.hash_cls().digest_size, self.hash_cls))

    def nonce(self, seq):
        return bytes(a ^ b for a, b in zip(self.iv, seq.to_bytes(12, "big")))

    def seal(self, inner, version=b"\x03\x03", seq=None, outer=APPLICATION_DATA):
        """A protected record of the given TLSInnerPlaintext (content, type, padding), as given."""
        if seq is None:
            seq, self.seq = self.seq, self.seq + 1
        header = bytes([outer]) + version + struct.pack(">H", len(inner) + 16)
        return header + self.aead.encrypt(self.nonce(seq), inner, header)

    def open(self, header, body):
        plain = self.aead.decrypt(self.nonce(self.seq), body, header)
        self.seq += 1
        end = len(plain.rstrip(b"\x00"))
        if end == 0:
            raise ValueError("a record without a content type")
        return plain[end - 1], plain[: end - 1]


def inner(content, typ=APPLICATION_DATA, padding=0):
    return content + bytes([typ]) + bytes(padding)


# HTTP/2, as little as HBONE needs (RFC 9113): the preface, SETTINGS, one CONNECT stream, DATA.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(typ, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([typ, flags]) + struct.pack(">I", stream) + payload


def connect_headers(authority):
    # HPACK literals without indexing, on the static table's names: :method (2) and :authority (1).
    block = b"\x02" + bytes([7]) + b"CONNECT" + b"\x01" + bytes([len(authority)]) + authority.encode()
    return frame(1, 0x4, 1, block)


def data(payload, end=False):
    return frame(0, 0x1 if end else 0, 1, payload)


class Closed(Exception):
    pass


class Conn:
    """One TLS connection to ztunnel's HBONE port: OpenSSL's handshake, then records by hand."""

    def __init__(self, args):
        self.args = args
        self.sock = socket.create_connection(args.server_addr, timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rbuf = b""
        self.h2buf = b""
        self.events = []  # ("alert", level, description) / ("eof",) / ("key_update", requested) / ...
        self.echo = b""
        self.status = None
        self.eof = False
        self.handshake()

    def handshake(self):
        keylog = tempfile.NamedTemporaryFile(prefix="tls13-keys-", delete=False)
        keylog.close()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # the server proves a SPIFFE identity, checked below
        ctx.load_verify_locations(self.args.ca)
        ctx.load_cert_chain(self.args.cert, self.args.key)
        ctx.set_alpn_protocols(["h2"])
        ctx.keylog_filename = keylog.name
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_side=False)
        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self.sock.sendall(outgoing.read())
                    # One record at a time, so that OpenSSL takes nothing that follows the handshake.
                    incoming.write(self.read_record_bytes())
            self.sock.sendall(outgoing.read())
            self.suite = tls.cipher()[0]
            sans = [v for k, v in tls.getpeercert().get("subjectAltName", ()) if k == "URI"]
            if self.args.server_identity not in sans:
                raise RuntimeError(f"the server proved {sans}, not {self.args.server_identity}")
            secrets = {}
            with open(keylog.name) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 3:
                        secrets[parts[0]] = bytes.fromhex(parts[2])
        finally:
            os.unlink(keylog.name)
        self.tx = Direction(self.suite, secrets["CLIENT_TRAFFIC_SECRET_0"])
        self.rx = Direction(self.suite, secrets["SERVER_TRAFFIC_SECRET_0"])

    def read_record_bytes(self):
        while True:
            if len(self.rbuf) >= 5:
                n = 5 + struct.unpack(">H", self.rbuf[3:5])[0]
                if len(self.rbuf) >= n:
                    rec, self.rbuf = self.rbuf[:n], self.rbuf[n:]
                    return rec
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Closed()
            self.rbuf += chunk

    def send(self, *records):
        self.sock.sendall(b"".join(records))

    def seal(self, content, typ=APPLICATION_DATA, padding=0, **kw):
        return self.tx.seal(inner(content, typ, padding), **kw)

    def open_stream(self, marker):
        """The HTTP/2 preface and a CONNECT to the sink with `marker` as its first data; waits for its echo."""
        h2 = PREFACE + frame(4, 0, 0) + connect_headers(self.args.target) + data(marker)
        self.send(self.seal(h2))
        self.wait_echo(marker)
        if self.status != 200:
            raise RuntimeError(f"CONNECT answered {self.status}")

    def wait_echo(self, marker, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while marker not in self.echo:
            if not self.step(deadline):
                raise RuntimeError(f"no echo of {marker[:40]!r}: got {self.echo[-80:]!r}, events {self.events}")

    def step(self, deadline):
        """Reads and acts on one record from ztunnel; False at the deadline or once the connection is over."""
        if self.eof:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self.sock.settimeout(left)
        try:
            rec = self.read_record_bytes()
        except (socket.timeout, TimeoutError):
            return False
        except (Closed, ConnectionResetError):
            self.eof = True
            self.events.append(("eof",))
            return False
        finally:
            self.sock.settimeout(TIMEOUT)
        if rec[0] != APPLICATION_DATA:
            self.events.append(("unprotected", rec[0]))
            return True
        try:
            typ, content = self.rx.open(rec[:5], rec[5:])
        except (InvalidTag, ValueError) as e:
            self.events.append(("undecryptable", str(e) or "tag"))
            self.eof = True
            return False
        if typ == ALERT:
            self.events.append(("alert", content[0], ALERTS.get(content[1], content[1])))
        elif typ == HANDSHAKE:
            while content:
                mtype, length = content[0], int.from_bytes(content[1:4], "big")
                body, content = content[4 : 4 + length], content[4 + length :]
                if mtype == KEY_UPDATE:
                    self.events.append(("key_update", body[0]))
                    self.rx.update()
                elif mtype != NEW_SESSION_TICKET:
                    self.events.append(("handshake", mtype))
        elif typ == APPLICATION_DATA:
            self.h2(content)
        else:
            self.events.append(("inner_type", typ))
        return True

    def h2(self, content):
        self.h2buf += content
        while len(self.h2buf) >= 9:
            length = int.from_bytes(self.h2buf[:3], "big")
            if len(self.h2buf) < 9 + length:
                return
            typ, flags = self.h2buf[3], self.h2buf[4]
            payload, self.h2buf = self.h2buf[9 : 9 + length], self.h2buf[9 + length :]
            if typ == 0:
                self.echo += payload
                if flags & 0x1:
                    self.events.append(("end_stream",))
            elif typ == 1:
                # ztunnel's answer: ":status" from the static table (8: 200, 13: 404, ...) or literal.
                self.status = 200 if payload[:1] == b"\x88" else payload[:8].hex()
            elif typ == 4 and not flags & 0x1:
                self.try_send(self.seal(frame(4, 0x1, 0)))
            elif typ == 3:
                self.events.append(("rst_stream", int.from_bytes(payload[:4], "big")))
            elif typ == 7:
                self.events.append(("goaway", int.from_bytes(payload[4:8], "big")))

    def try_send(self, record):
        try:
            self.send(record)
        except OSError:
            pass

    def finish(self, timeout=TIMEOUT):
        """Reads until ztunnel ends the connection (or the deadline): what it sent, last first."""
        deadline = time.monotonic() + timeout
        while self.step(deadline):
            pass
        return self.events

    def close(self):
        self.sock.close()


def key_update(request):
    return bytes([KEY_UPDATE, 0, 0, 1, request])


def leak(name):
    return f"LEAK:{name}:".encode()


# The cases. Each gets a connection with an open stream whose first data was echoed, sends what it sends, and
# returns what it expects: ("alert", description) for a refusal (the alert, then the connection's end, and
# nothing of the bad records at the app), ("closed",) for an end without an alert, or ("echo", bytes) for
# records that must be accepted (their data echoed back, no alert).


CASES = []


def case(rule, expect, differs=None):
    def register(fn):
        CASES.append((fn.__name__, rule, expect, differs, fn))
        return fn

    return register


@case("5.1/5.2: a record's length field over 2^14 + 256", ("alert", "record_overflow"))
def ciphertext_too_long(c, name):
    body = data(leak(name) + bytes(MAX_PLAINTEXT))
    rec = c.seal(body, padding=300)
    c.send(rec)


@case("5.4: an inner plaintext over 2^14 + 1 bytes, made so by its padding", ("alert", "record_overflow"))
def inner_plaintext_too_long_by_padding(c, name):
    payload = leak(name) + bytes(MAX_PLAINTEXT - 9 - len(leak(name)))
    c.send(c.seal(data(payload), padding=1))


@case("5.4: an inner plaintext of 2^14 content bytes and its type is the most, and accepted", ("echo", None))
def inner_plaintext_at_most(c, name):
    mark = f"most:{name}:".encode()
    payload = mark + bytes(MAX_PLAINTEXT - 9 - len(mark))
    c.send(c.seal(data(payload)))
    return mark


@case("5.4: zero padding is removed, whatever its length", ("echo", None))
def padded_record(c, name):
    mark = f"padded:{name}:".encode()
    c.send(c.seal(data(mark), padding=1000))
    return mark


@case("5.4: a record with no non-zero byte has no content type", ("alert", "unexpected_message"))
def all_zero_inner_plaintext(c, name):
    c.send(c.tx.seal(bytes(64)))


@case("5.1: zero-length application data is allowed (traffic analysis)", ("echo", None))
def zero_length_application_data(c, name):
    mark = f"after-empty:{name}:".encode()
    c.send(*(c.seal(b"") for _ in range(3)), c.seal(data(mark)))
    return mark


@case("5.1: more than 32 empty records in a row (a flood for nothing, bounded as rustls bounds it)",
      ("alert", "unexpected_message"))
def empty_record_flood(c, name):
    c.send(*(c.seal(b"") for _ in range(33)), c.seal(data(leak(name))))


@case("5.1: zero-length handshake fragments are not allowed", ("alert", "unexpected_message"))
def zero_length_handshake(c, name):
    c.send(c.seal(b"", typ=HANDSHAKE), c.seal(data(leak(name))))


@case("5: an unprotected alert after the handshake", ("alert", "unexpected_message"))
def unprotected_alert(c, name):
    c.send(bytes([ALERT, 3, 3, 0, 2, 1, 0]), c.seal(data(leak(name))))


@case("5: an unprotected handshake record after the handshake", ("alert", "unexpected_message"))
def unprotected_handshake(c, name):
    c.send(bytes([HANDSHAKE, 3, 3, 0, 5]) + key_update(0), c.seal(data(leak(name))))


@case("5: change_cipher_spec after the handshake is an unexpected record", ("alert", "unexpected_message"))
def change_cipher_spec_after_handshake(c, name):
    c.send(bytes([CHANGE_CIPHER_SPEC, 3, 3, 0, 1, 1]), c.seal(data(leak(name))))


@case("5: a protected change_cipher_spec", ("alert", "unexpected_message"))
def protected_change_cipher_spec(c, name):
    c.send(c.seal(b"\x01", typ=CHANGE_CIPHER_SPEC), c.seal(data(leak(name))))


@case("5: an unknown outer record type", ("alert", "unexpected_message"),
      differs="rustls answers decode_error; RFC 8446 section 5 names unexpected_message")
def unknown_outer_type(c, name):
    c.send(c.tx.seal(inner(data(leak(name))), outer=99))


@case("5.2: an unknown inner content type", ("alert", "unexpected_message"))
def unknown_inner_type(c, name):
    c.send(c.seal(data(leak(name)), typ=99))


@case("5.2: legacy_record_version 0x0303 only", ("alert", "decode_error"),
      differs="rustls took any 0x03XX; OpenSSL and BoringSSL take 0x0303 only (see record.rs)")
def legacy_version_0301(c, name):
    c.send(c.seal(data(leak(name)), version=b"\x03\x01"))


@case("5.2: a legacy_record_version that is not TLS at all", ("alert", "decode_error"))
def legacy_version_0x0200(c, name):
    c.send(c.seal(data(leak(name)), version=b"\x02\x00"))


@case("5.2: the header is authenticated: a length field changed after sealing", ("alert", "bad_record_mac"))
def header_changed_after_sealing(c, name):
    rec = bytearray(c.seal(data(leak(name))))
    rec += b"\x00"
    rec[3:5] = struct.pack(">H", len(rec) - 5)
    c.send(bytes(rec))


@case("5.2: a flipped bit in the tag", ("alert", "bad_record_mac"))
def tag_corrupted(c, name):
    rec = bytearray(c.seal(data(leak(name))))
    rec[-1] ^= 1
    c.send(bytes(rec))


@case("5.2: a flipped bit in the ciphertext", ("alert", "bad_record_mac"))
def ciphertext_corrupted(c, name):
    rec = bytearray(c.seal(data(leak(name))))
    rec[7] ^= 0x80
    c.send(bytes(rec))


@case("5.2: a record shorter than the tag", ("alert", "bad_record_mac"))
def shorter_than_tag(c, name):
    c.send(bytes([APPLICATION_DATA, 3, 3, 0, 10]) + bytes(10), c.seal(data(leak(name))))


@case("5.3: a record sent again (replay: its sequence number has passed)", ("alert", "bad_record_mac"))
def replayed_record(c, name):
    rec = c.seal(data(f"once:{name}:".encode()))
    c.send(rec)
    c.wait_echo(f"once:{name}:".encode())
    c.send(rec)


@case("5.3: a record sealed with a sequence number skipped", ("alert", "bad_record_mac"))
def skipped_sequence_number(c, name):
    c.tx.seq += 1
    c.send(c.seal(data(leak(name))))


@case("4.6.3: KeyUpdate(update_not_requested): the peer's key changes, ztunnel's does not", ("echo", None))
def key_update_not_requested(c, name):
    mark = f"new-key:{name}:".encode()
    c.send(c.seal(key_update(0), typ=HANDSHAKE))
    c.tx.update()
    c.send(c.seal(data(mark)))
    return mark


@case("4.6.3: KeyUpdate(update_requested): ztunnel answers with its own and changes its key", ("echo", "key_update"))
def key_update_requested(c, name):
    mark = f"both-new:{name}:".encode()
    c.send(c.seal(key_update(1), typ=HANDSHAKE))
    c.tx.update()
    c.send(c.seal(data(mark)))
    return mark


@case("4.6.3: a KeyUpdate split over two records is one message", ("echo", None))
def key_update_split(c, name):
    mark = f"split:{name}:".encode()
    msg = key_update(0)
    c.send(c.seal(msg[:2], typ=HANDSHAKE), c.seal(msg[2:], typ=HANDSHAKE))
    c.tx.update()
    c.send(c.seal(data(mark)))
    return mark


@case("4.6.3: a KeyUpdate value other than 0 and 1", ("alert", "illegal_parameter"))
def key_update_bad_value(c, name):
    c.send(c.seal(key_update(2), typ=HANDSHAKE))
    c.tx.update()
    c.send(c.seal(data(leak(name))))


@case("4: a KeyUpdate of the wrong length", ("alert", "decode_error"))
def key_update_wrong_length(c, name):
    c.send(c.seal(bytes([KEY_UPDATE, 0, 0, 2, 0, 0]), typ=HANDSHAKE))
    c.tx.update()
    c.send(c.seal(data(leak(name))))


@case("5.1: a key change that does not end its record", ("alert", "unexpected_message"))
def key_update_not_at_record_end(c, name):
    c.send(c.seal(key_update(0) + key_update(0), typ=HANDSHAKE))
    c.tx.update()
    c.send(c.seal(data(leak(name))))


@case("4.6.3: a record under the old key after a KeyUpdate", ("alert", "bad_record_mac"))
def old_key_after_key_update(c, name):
    c.send(c.seal(key_update(0), typ=HANDSHAKE), c.seal(data(leak(name))))


@case("4.6.3: more than 32 KeyUpdate requests without data (bounded as rustls bounds them)",
      ("alert", "unexpected_message"))
def key_update_request_flood(c, name):
    for _ in range(33):
        c.send(c.seal(key_update(1), typ=HANDSHAKE))
        c.tx.update()
    c.send(c.seal(data(leak(name))))


@case("4.6.3: more than 32 KeyUpdates of any kind without data (BoringSSL's bound; rustls has none for these)",
      ("alert", "unexpected_message"), differs="rustls bounds only KeyUpdates that ask for ztunnel's own")
def key_update_flood(c, name):
    for _ in range(33):
        c.send(c.seal(key_update(0), typ=HANDSHAKE))
        c.tx.update()
    c.send(c.seal(data(leak(name))))


@case("4: a handshake message longer than any ztunnel takes, refused from its header", ("alert", "decode_error"))
def handshake_message_too_long(c, name):
    c.send(c.seal(bytes([KEY_UPDATE, 1, 0, 0]) + bytes(100), typ=HANDSHAKE), c.seal(data(leak(name))))


@case("5.1: a handshake message cut by a record of another type", ("alert", "unexpected_message"))
def handshake_cut_by_data(c, name):
    c.send(c.seal(key_update(0)[:3], typ=HANDSHAKE), c.seal(data(leak(name))))


def post_handshake(mtype, body=b"\x00" * 8):
    def send(c, name):
        c.send(c.seal(bytes([mtype]) + len(body).to_bytes(3, "big") + body, typ=HANDSHAKE), c.seal(data(leak(name))))

    return send


for _mtype, _name, _what in [
    (NEW_SESSION_TICKET, "new_session_ticket", "NewSessionTicket from a client"),
    (CLIENT_HELLO, "client_hello", "ClientHello (no renegotiation in TLS 1.3)"),
    (END_OF_EARLY_DATA, "end_of_early_data", "EndOfEarlyData"),
    (CERTIFICATE, "certificate", "Certificate without a CertificateRequest (no post-handshake auth offered)"),
    (CERTIFICATE_REQUEST, "certificate_request", "CertificateRequest from a client"),
    (FINISHED, "finished", "Finished"),
]:
    _fn = post_handshake(_mtype)
    _fn.__name__ = f"post_handshake_{_name}"
    case(f"4: a post-handshake {_what}", ("alert", "unexpected_message"))(_fn)


@case("6: user_canceled is a warning; then the connection goes on", ("echo", None))
def user_canceled_warning(c, name):
    mark = f"not-canceled:{name}:".encode()
    c.send(c.seal(bytes([WARNING, 90]), typ=ALERT), c.seal(data(mark)))
    return mark


@case("6: more than 4 user_canceled (bounded as rustls bounds them)", ("alert", "unexpected_message"))
def user_canceled_flood(c, name):
    c.send(*(c.seal(bytes([WARNING, 90]), typ=ALERT) for _ in range(5)), c.seal(data(leak(name))))


@case("6: a warning other than close_notify and user_canceled is an error", ("alert", "decode_error"))
def other_warning(c, name):
    c.send(c.seal(bytes([WARNING, 42]), typ=ALERT), c.seal(data(leak(name))))


@case("6: an alert of unknown level", ("alert", "illegal_parameter"))
def unknown_alert_level(c, name):
    c.send(c.seal(bytes([7, 40]), typ=ALERT), c.seal(data(leak(name))))


@case("6: a fatal alert ends the connection, without an answer", ("closed",))
def fatal_alert(c, name):
    c.send(c.seal(bytes([FATAL, 40]), typ=ALERT), c.seal(data(leak(name))))


@case("6: an unknown alert is an error alert", ("closed",))
def unknown_fatal_alert(c, name):
    c.send(c.seal(bytes([FATAL, 200]), typ=ALERT), c.seal(data(leak(name))))


@case("5.1/6: an alert record of other than two bytes", ("alert", "decode_error"))
def alert_wrong_length(c, name):
    c.send(c.seal(bytes([WARNING, 90, 0x55]), typ=ALERT), c.seal(data(leak(name))))


@case("5.1: two alerts coalesced in one record", ("alert", "decode_error"))
def alerts_coalesced(c, name):
    c.send(c.seal(bytes([WARNING, 90, WARNING, 90]), typ=ALERT), c.seal(data(leak(name))))


@case("6.1: after the client's close_notify, what ztunnel still has to send arrives; what follows it is ignored",
      ("echo", "close_notify"))
def close_notify_then_answer(c, name):
    mark = f"before-close:{name}:".encode()
    payload = mark + bytes(20_000 - len(mark))
    # All in one write, so that the close arrives with the data and before any answer can.
    records = [c.seal(data(payload[at : at + 8000])) for at in range(0, len(payload), 8000)]
    records.append(c.seal(bytes([WARNING, 0]), typ=ALERT))
    # Ignored, not refused (RFC 8446, 6.1): data after the close, and a record that would not open.
    records += [c.seal(data(leak(name))), bytes([APPLICATION_DATA, 3, 3, 0, 20]) + bytes(20)]
    c.send(*records)
    return payload


def run_case(args, name, expect, fn):
    c = Conn(args)
    try:
        c.open_stream(f"ok:{name}:".encode())
        c.echo = b""
        returned = fn(c, name)
        if expect[0] == "echo":
            c.wait_echo(returned)
            if expect[1] == "close_notify":
                c.finish()
            else:
                c.finish(timeout=0.3)
        else:
            c.finish()
        return c.suite, c.events
    finally:
        c.close()


def judge(expect, events):
    alerts = [e for e in events if e[0] == "alert"]
    ended = bool(events) and events[-1] == ("eof",)
    if expect[0] == "alert":
        if alerts != [("alert", FATAL, expect[1])]:
            return f"expected one fatal {expect[1]} alert, got {alerts}"
        if not ended:
            return "the connection did not end after the alert"
        return None
    if expect[0] == "closed":
        if alerts:
            return f"expected no answer, got {alerts}"
        return None if ended else "the connection did not end"
    if expect[1] == "close_notify":
        if alerts != [("alert", WARNING, "close_notify")] or not ended:
            return f"expected ztunnel's close_notify and the end once it had answered, got {events}"
        return None
    if alerts:
        return f"expected the records accepted, got {alerts}"
    if expect[1] == "key_update" and ("key_update", 0) not in events:
        return f"expected ztunnel's own KeyUpdate(update_not_requested), got {events}"
    return None


def cases(args):
    host, port = args.server.rsplit(":", 1)
    args.server_addr = (host.strip("[]"), int(port))
    failed, seen_suite = 0, None
    selected = [c for c in CASES if not args.only or c[0] in args.only]
    for name, rule, expect, differs, fn in selected:
        try:
            suite, events = run_case(args, name, expect, fn)
            seen_suite = suite
            why = judge(expect, events)
        except Exception as e:  # a case that could not run fails; the next one runs on
            events, why = [], f"{type(e).__name__}: {e}"
        failed += why is not None
        line = {"case": name, "rule": rule, "expect": list(expect), "ok": why is None, "events": events}
        if why:
            line["why"] = why
        if differs:
            line["differs_from_rustls"] = differs
        print(json.dumps(line), flush=True)
    # Nothing of a refused record may have reached the app.
    time.sleep(0.5)
    with open(args.sink_log, "rb") as f:
        received = f.read()
    leaked = sorted({n for n, *_ in selected if leak(n) in received})
    if leaked:
        failed += 1
        print(json.dumps({"case": "nothing_delivered", "ok": False, "why": f"leaked to the app: {leaked}"}))
    print(json.dumps({"summary": True, "suite": seen_suite, "cases": len(selected), "failed": failed}), flush=True)
    return 1 if failed else 0


def sink(args):
    host, port = args.listen.rsplit(":", 1)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host.strip("[]"), int(port)))
    srv.listen(128)
    lock = threading.Lock()
    log = open(args.log, "ab", buffering=0)

    def serve(conn):
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    break
                with lock:
                    log.write(chunk)
                try:
                    conn.sendall(chunk)
                except OSError:
                    return
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sink")
    s.add_argument("--listen", required=True)
    s.add_argument("--log", required=True)
    c = sub.add_parser("cases")
    c.add_argument("--server", required=True, help="ztunnel's HBONE address (the server pod's IP:15008)")
    c.add_argument("--server-identity", required=True, help="the SPIFFE identity the server must prove")
    c.add_argument("--target", required=True, help="the CONNECT authority: the sink's IP:port")
    c.add_argument("--cert", required=True)
    c.add_argument("--key", required=True)
    c.add_argument("--ca", required=True)
    c.add_argument("--sink-log", required=True)
    c.add_argument("--only", action="append")
    sub.add_parser("list")
    args = p.parse_args()
    if args.cmd == "sink":
        sink(args)
    elif args.cmd == "list":
        for name, rule, expect, differs, _ in CASES:
            print(f"{name}: {rule} -> {' '.join(str(e) for e in expect if e)}")
    else:
        sys.exit(cases(args))


if __name__ == "__main__":
    main()
