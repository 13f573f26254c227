//! Packet captures on lab links (tcpdump) and a reader for what they caught.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::Signal;

use crate::netns::Netns;
use crate::proc::Proc;
use crate::util::wait_for;

/// A running capture.
pub struct Capture {
    proc: Proc,
    file: PathBuf,
}

/// One captured TCP segment.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// TCP sequence number of the first payload byte.
    pub seq: u32,
    /// SYN flag (the first payload byte of the flow is `seq + 1`).
    pub syn: bool,
    /// TCP payload.
    pub payload: Vec<u8>,
}

impl Capture {
    /// Starts capturing TCP on `iface` inside `ns` into `file`; returns once tcpdump is listening.
    pub fn start(ns: &Netns, iface: &str, file: &Path) -> anyhow::Result<Capture> {
        Self::start_filtered(ns, iface, file, "tcp")
    }

    /// Starts capturing what `filter` (a pcap filter expression) selects on `iface` inside `ns` into `file`.
    pub fn start_filtered(ns: &Netns, iface: &str, file: &Path, filter: &str) -> anyhow::Result<Capture> {
        let log = file.with_extension("log");
        let mut cmd = ns.command("tcpdump");
        // A larger kernel buffer (KiB): a dropped packet would be a hole in a stream, which fails the proof.
        cmd.args(["-i", iface, "-U", "--immediate-mode", "-B", "131072", "-s", "0", "-n", "-w"]).arg(file).arg(filter);
        let proc = Proc::spawn("tcpdump", cmd, &log)?;
        wait_for("tcpdump to start listening", Duration::from_secs(10), || {
            proc.log().contains("listening on").then_some(())
        })
        .with_context(|| proc.log())?;
        Ok(Capture { proc, file: file.to_path_buf() })
    }

    /// Stops the capture and returns the TCP segments it caught.
    pub fn finish(self) -> anyhow::Result<Vec<Segment>> {
        self.finish_all().map(|(segments, _)| segments)
    }

    /// Stops the capture and returns the TCP segments it caught, and a count of every other kind of packet
    /// (by protocol and addresses, e.g. `udp 10.244.1.2 → 10.244.2.3`).
    pub fn finish_all(mut self) -> anyhow::Result<(Vec<Segment>, BTreeMap<String, u64>)> {
        // Give in-flight packets a moment to be written, then let tcpdump flush and exit.
        std::thread::sleep(Duration::from_millis(200));
        self.proc.signal(Signal::SIGINT)?;
        self.proc.wait_timeout(Duration::from_secs(5));
        let dropped = self.proc.log();
        if let Some(line) = dropped.lines().find(|l| l.contains("dropped by kernel")) {
            let n: u64 = line.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
            anyhow::ensure!(n == 0, "tcpdump lost packets ({line}): the capture cannot vouch for them");
        }
        read_pcap_all(&self.file)
    }
}

/// Parses a classic pcap file (Ethernet link type) into TCP segments.
pub fn read_pcap(path: &Path) -> anyhow::Result<Vec<Segment>> {
    read_pcap_all(path).map(|(segments, _)| segments)
}

/// Parses a classic pcap file (Ethernet link type) into TCP segments, and counts every other packet by kind.
pub fn read_pcap_all(path: &Path) -> anyhow::Result<(Vec<Segment>, BTreeMap<String, u64>)> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    anyhow::ensure!(data.len() >= 24, "{} is not a pcap file", path.display());
    let magic = u32::from_le_bytes(data[0..4].try_into()?);
    let le = match magic {
        0xa1b2c3d4 | 0xa1b23c4d => true,
        0xd4c3b2a1 | 0x4d3cb2a1 => false,
        _ => anyhow::bail!("{}: unknown pcap magic {magic:#x}", path.display()),
    };
    let u32_at = |b: &[u8]| {
        if le { u32::from_le_bytes(b.try_into().unwrap()) } else { u32::from_be_bytes(b.try_into().unwrap()) }
    };
    let linktype = u32_at(&data[20..24]);
    anyhow::ensure!(linktype == 1, "{}: link type {linktype} is not Ethernet", path.display());
    let mut out = Vec::new();
    let mut others = BTreeMap::new();
    let mut off = 24;
    while off + 16 <= data.len() {
        let caplen = u32_at(&data[off + 8..off + 12]) as usize;
        let start = off + 16;
        let end = (start + caplen).min(data.len());
        match parse_ethernet(&data[start..end]) {
            Packet::Tcp(s) => out.push(s),
            Packet::Other(kind) => *others.entry(kind).or_default() += 1,
        }
        off = start + caplen;
    }
    Ok((out, others))
}

enum Packet {
    Tcp(Segment),
    /// Anything else, described.
    Other(String),
}

fn parse_ethernet(f: &[u8]) -> Packet {
    parse_frame(f).unwrap_or_else(|| Packet::Other("malformed or truncated frame".into()))
}

fn protocol_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        p => format!("ip protocol {p}"),
    }
}

fn parse_frame(f: &[u8]) -> Option<Packet> {
    if f.len() < 14 {
        return None;
    }
    let ethertype = u16::from_be_bytes([f[12], f[13]]);
    let ip = &f[14..];
    let (src, dst, l4) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            if ip.len() < ihl.max(20) {
                return None;
            }
            let s: [u8; 4] = ip[12..16].try_into().ok()?;
            let d: [u8; 4] = ip[16..20].try_into().ok()?;
            let (src, dst) = (IpAddr::from(s), IpAddr::from(d));
            if ip[9] != 6 {
                return Some(Packet::Other(format!("{} {src} → {dst}", protocol_name(ip[9]))));
            }
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
            (src, dst, ip.get(ihl..total)?)
        }
        0x86dd => {
            if ip.len() < 40 {
                return None;
            }
            let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let s: [u8; 16] = ip[8..24].try_into().ok()?;
            let d: [u8; 16] = ip[24..40].try_into().ok()?;
            let (src, dst) = (IpAddr::from(s), IpAddr::from(d));
            if ip[6] != 6 {
                return Some(Packet::Other(format!("{} {src} → {dst}", protocol_name(ip[6]))));
            }
            (src, dst, &ip[40..(40 + plen).min(ip.len())])
        }
        0x0806 => return Some(Packet::Other("arp".into())),
        t => return Some(Packet::Other(format!("ethertype {t:#06x}"))),
    };
    if l4.len() < 20 {
        return None;
    }
    let doff = usize::from(l4[12] >> 4) * 4;
    Some(Packet::Tcp(Segment {
        src,
        dst,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        seq: u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
        syn: l4[13] & 0x02 != 0,
        payload: l4.get(doff..)?.to_vec(),
    }))
}

/// Whether `needle` occurs in any segment's payload (or across the concatenated payloads of one direction).
pub fn contains(segments: &[Segment], needle: &[u8]) -> bool {
    let mut by_flow: std::collections::HashMap<(IpAddr, u16, IpAddr, u16), Vec<u8>> = Default::default();
    for s in segments {
        by_flow.entry((s.src, s.sport, s.dst, s.dport)).or_default().extend_from_slice(&s.payload);
    }
    by_flow.values().any(|v| v.windows(needle.len()).any(|w| w == needle))
}

/// Whether some segment to `port` starts with a TLS handshake record (content type 22, version 3.x).
pub fn has_tls_to(segments: &[Segment], port: u16) -> bool {
    segments.iter().any(|s| s.dport == port && s.payload.len() > 5 && s.payload[0] == 0x16 && s.payload[1] == 0x03)
}

/// A TCP flow: (source address, source port, destination address, destination port).
pub type Flow = (IpAddr, u16, IpAddr, u16);

/// What [`only_tls`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TlsProof {
    /// Flows to or from the HBONE port that carried data.
    pub flows: usize,
    /// Whole TLS records read across them.
    pub records: usize,
    /// Of which application data.
    pub application_data: usize,
}

/// The byte stream of each connection (a 4-tuple, split where a new SYN reuses it), rebuilt from the segments
/// by sequence number (retransmissions are read once); a connection with a hole in it is an error, since
/// what was in the hole was not checked.
pub fn streams(segments: &[Segment]) -> Result<Vec<(Flow, Vec<u8>)>, String> {
    // One connection's parts: where its stream starts (after the SYN, if seen), and its payloads by
    // sequence number.
    #[derive(Default)]
    struct Conn<'a> {
        start: Option<u32>,
        parts: Vec<(u32, &'a [u8])>,
    }
    // A 4-tuple is reused when a new connection takes the port of one that has closed (long captures see
    // this): a SYN with another initial sequence number starts a new connection on the same tuple, and
    // what follows belongs to it. A retransmitted SYN (the same number) does not.
    let mut by_flow: std::collections::BTreeMap<Flow, Vec<Conn<'_>>> = Default::default();
    for s in segments {
        let conns = by_flow.entry((s.src, s.sport, s.dst, s.dport)).or_default();
        if s.syn {
            let start = s.seq.wrapping_add(1);
            match conns.last_mut() {
                Some(c) if c.start == Some(start) => {}
                Some(c) if c.start.is_none() && c.parts.is_empty() => c.start = Some(start),
                _ => conns.push(Conn { start: Some(start), parts: Vec::new() }),
            }
        } else if conns.is_empty() {
            conns.push(Conn::default());
        }
        if !s.payload.is_empty() {
            conns.last_mut().expect("pushed above").parts.push((s.seq, &s.payload));
        }
    }
    let mut out = Vec::new();
    for (flow, conns) in by_flow {
        for Conn { start, mut parts } in conns {
            if parts.is_empty() {
                continue;
            }
            // Without the SYN (the capture started mid-flow), the lowest sequence number seen starts the stream.
            let base = start.unwrap_or_else(|| {
                let first = parts[0].0;
                parts
                    .iter()
                    .map(|(seq, _)| seq.wrapping_sub(first))
                    .min()
                    .map(|d| first.wrapping_add(d))
                    .unwrap_or(first)
            });
            parts.sort_by_key(|(seq, _)| seq.wrapping_sub(base));
            let mut bytes: Vec<u8> = Vec::new();
            for (seq, data) in parts {
                let at = seq.wrapping_sub(base) as usize;
                if at > bytes.len() {
                    return Err(format!(
                        "{flow:?}: {} bytes missing at offset {} (packets lost)",
                        at - bytes.len(),
                        bytes.len()
                    ));
                }
                let new = (at + data.len()).saturating_sub(bytes.len());
                bytes.extend_from_slice(&data[data.len() - new..]);
            }
            out.push((flow, bytes));
        }
    }
    Ok(out)
}

/// Proves that the only payload in a capture is TLS to and from `port` (HBONE's 15008): every flow that
/// carries data has `port` at one end, and its byte stream is a sequence of well-formed TLS records (content
/// type handshake, change-cipher-spec, alert or application data; version 3.x; at most 2^14 + 256 bytes),
/// starting with a handshake record, with no plaintext handshake record after application data has begun
/// (TLS 1.3 encrypts everything after the hellos). A record cut off by the end of the capture is allowed at
/// the very end of a stream. Anything else is an error that names the flow and the offset.
pub fn only_tls(segments: &[Segment], port: u16) -> Result<TlsProof, String> {
    let mut proof = TlsProof::default();
    for (flow, bytes) in streams(segments)? {
        let (_, sport, _, dport) = flow;
        if sport != port && dport != port {
            return Err(format!("{flow:?}: {} bytes of payload that are not HBONE (port {port})", bytes.len()));
        }
        proof.flows += 1;
        let mut off = 0;
        let mut in_data = false;
        while off < bytes.len() {
            let Some(h) = bytes.get(off..off + 5) else { break }; // cut off by the end of the capture
            let (kind, major, len) = (h[0], h[1], usize::from(u16::from_be_bytes([h[3], h[4]])));
            let at = |what: &str| format!("{flow:?} at offset {off}: {what}");
            if !matches!(kind, 20..=23) || major != 3 || h[2] > 4 || len > (1 << 14) + 256 {
                return Err(at(&format!("not a TLS record header: {:02x?}", h)));
            }
            if off == 0 && kind != 22 {
                return Err(at("the stream does not start with a TLS handshake"));
            }
            if kind == 22 && in_data {
                return Err(at("a plaintext handshake record after application data"));
            }
            in_data |= kind == 23;
            if off + 5 + len > bytes.len() {
                break; // cut off by the end of the capture
            }
            proof.records += 1;
            proof.application_data += usize::from(kind == 23);
            off += 5 + len;
        }
    }
    Ok(proof)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(sport: u16, dport: u16, seq: u32, payload: &[u8]) -> Segment {
        Segment {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            sport,
            dport,
            seq,
            syn: false,
            payload: payload.to_vec(),
        }
    }

    fn record(kind: u8, len: usize) -> Vec<u8> {
        let mut r = vec![kind, 3, 3, (len >> 8) as u8, len as u8];
        r.extend(std::iter::repeat_n(0xaa, len));
        r
    }

    fn tls_stream() -> Vec<u8> {
        [record(22, 200), record(20, 1), record(23, 50), record(23, 3000)].concat()
    }

    #[test]
    fn a_tls_stream_in_pieces_out_of_order_and_retransmitted_is_proved() {
        let s = tls_stream();
        let mut syn = seg(40000, 15008, 999, b"");
        syn.syn = true;
        let segs = vec![
            syn,
            seg(40000, 15008, 1000 + 100, &s[100..]),
            seg(40000, 15008, 1000, &s[..150]),
            seg(40000, 15008, 1000, &s[..100]),
        ];
        let p = only_tls(&segs, 15008).unwrap();
        assert_eq!(p, TlsProof { flows: 1, records: 4, application_data: 2 });
    }

    #[test]
    fn the_checker_fails_on_anything_else() {
        let s = tls_stream();
        // Plaintext on another port.
        assert!(only_tls(&[seg(40000, 8080, 0, b"hello")], 15008).unwrap_err().contains("not HBONE"));
        // Plaintext to the HBONE port.
        assert!(
            only_tls(&[seg(40000, 15008, 0, b"GET / HTTP/1.1\r\n")], 15008).unwrap_err().contains("not a TLS record")
        );
        // A plaintext payload slipped in after the records.
        let mut bad = s.clone();
        bad.extend_from_slice(b"secret payload");
        assert!(only_tls(&[seg(40000, 15008, 0, &bad)], 15008).unwrap_err().contains("not a TLS record"));
        // Application data first; a handshake after application data.
        assert!(only_tls(&[seg(40000, 15008, 0, &record(23, 10))], 15008).unwrap_err().contains("does not start"));
        let late = [record(22, 10), record(23, 10), record(22, 10)].concat();
        assert!(only_tls(&[seg(40000, 15008, 0, &late)], 15008).unwrap_err().contains("after application data"));
        // A hole: what was in it cannot be vouched for.
        let holes = [seg(40000, 15008, 0, &s[..10]), seg(40000, 15008, 20, &s[20..])];
        assert!(only_tls(&holes, 15008).unwrap_err().contains("missing"));
        // A record cut off by the end of the capture is fine.
        assert!(only_tls(&[seg(40000, 15008, 0, &s[..s.len() - 7])], 15008).is_ok());
    }

    #[test]
    fn a_reused_four_tuple_is_two_streams() {
        // Two connections on the same 4-tuple, one after the other, with unrelated initial sequence numbers.
        // Read as one stream they would show a hole; each is a whole TLS stream.
        let s = tls_stream();
        let syn = |seq| Segment { syn: true, ..seg(40000, 15008, seq, b"") };
        let segs = vec![
            syn(999),
            seg(40000, 15008, 1000, &s),
            syn(7_000_000),
            syn(7_000_000), // retransmitted: the same connection
            seg(40000, 15008, 7_000_001, &s[..100]),
            seg(40000, 15008, 7_000_101, &s[100..]),
        ];
        let p = only_tls(&segs, 15008).unwrap();
        assert_eq!(p, TlsProof { flows: 2, records: 8, application_data: 4 });
        // A hole inside the second connection is still found.
        let holes = vec![syn(999), seg(40000, 15008, 1000, &s), syn(5), seg(40000, 15008, 16, &s[10..])];
        assert!(only_tls(&holes, 15008).unwrap_err().contains("missing"));
    }
}
