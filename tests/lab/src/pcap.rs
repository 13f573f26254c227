//! Packet captures on lab links (tcpdump) and a reader for what they caught.

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
    /// TCP payload.
    pub payload: Vec<u8>,
}

impl Capture {
    /// Starts capturing TCP on `iface` inside `ns` into `file`; returns once tcpdump is listening.
    pub fn start(ns: &Netns, iface: &str, file: &Path) -> anyhow::Result<Capture> {
        let log = file.with_extension("log");
        let mut cmd = ns.command("tcpdump");
        cmd.args(["-i", iface, "-U", "--immediate-mode", "-s", "0", "-n", "-w"]).arg(file).arg("tcp");
        let proc = Proc::spawn("tcpdump", cmd, &log)?;
        wait_for("tcpdump to start listening", Duration::from_secs(10), || {
            proc.log().contains("listening on").then_some(())
        })
        .with_context(|| proc.log())?;
        Ok(Capture { proc, file: file.to_path_buf() })
    }

    /// Stops the capture and returns the TCP segments it caught.
    pub fn finish(mut self) -> anyhow::Result<Vec<Segment>> {
        // Give in-flight packets a moment to be written, then let tcpdump flush and exit.
        std::thread::sleep(Duration::from_millis(200));
        self.proc.signal(Signal::SIGINT)?;
        self.proc.wait_timeout(Duration::from_secs(5));
        read_pcap(&self.file)
    }
}

/// Parses a classic pcap file (Ethernet link type) into TCP segments.
pub fn read_pcap(path: &Path) -> anyhow::Result<Vec<Segment>> {
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
    let mut off = 24;
    while off + 16 <= data.len() {
        let caplen = u32_at(&data[off + 8..off + 12]) as usize;
        let start = off + 16;
        let end = (start + caplen).min(data.len());
        if let Some(s) = parse_ethernet(&data[start..end]) {
            out.push(s);
        }
        off = start + caplen;
    }
    Ok(out)
}

fn parse_ethernet(f: &[u8]) -> Option<Segment> {
    if f.len() < 14 {
        return None;
    }
    let ethertype = u16::from_be_bytes([f[12], f[13]]);
    let ip = &f[14..];
    let (src, dst, l4) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            if ip.len() < ihl || ip[9] != 6 {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
            let s: [u8; 4] = ip[12..16].try_into().ok()?;
            let d: [u8; 4] = ip[16..20].try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), &ip[ihl..total])
        }
        0x86dd => {
            if ip.len() < 40 || ip[6] != 6 {
                return None;
            }
            let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let s: [u8; 16] = ip[8..24].try_into().ok()?;
            let d: [u8; 16] = ip[24..40].try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), &ip[40..(40 + plen).min(ip.len())])
        }
        _ => return None,
    };
    if l4.len() < 20 {
        return None;
    }
    let doff = usize::from(l4[12] >> 4) * 4;
    Some(Segment {
        src,
        dst,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        payload: l4.get(doff..)?.to_vec(),
    })
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
