//! Packet captures on the fabric bridge with tcpdump, read back as TCP segments.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TestenvError;

/// A running tcpdump; stopped (and its file removed) on drop.
#[derive(Debug)]
pub struct Capture {
    child: Child,
    file: PathBuf,
    /// What tcpdump writes to stderr after it started capturing (its counts at exit).
    said: std::sync::mpsc::Receiver<String>,
}

/// One captured TCP segment.
#[derive(Debug, Clone)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub syn: bool,
    pub payload: Vec<u8>,
}

impl Segment {
    /// Whether either end uses `port`.
    pub fn has_port(&self, port: u16) -> bool {
        self.src.port() == port || self.dst.port() == port
    }
}

impl Capture {
    pub(crate) fn start(netns: &str, interface: &str) -> Result<Self, TestenvError> {
        let file = std::env::temp_dir().join(format!(
            "ambit-capture-{}-{:08x}.pcap",
            std::process::id(),
            fastrand::u32(..)
        ));
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, "tcpdump", "-i", interface])
            // A large kernel buffer in small blocks: in immediate mode the kernel hands
            // tcpdump a block per packet or two, and with the default (2 MiB in blocks
            // sized for 256 KiB packets: four) a tcpdump kept off the CPU for a few
            // milliseconds lost packets (the kernel counted up to 18 of 82 dropped on a
            // busy machine). 32 MiB of blocks sized for 64 KiB packets holds hundreds.
            .args(["-B", "32768", "-s", "65535"])
            .args(["--immediate-mode", "-nn", "-U", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                TestenvError::Spawn("tcpdump (install it: apt-get install -y tcpdump)".into(), e)
            })?;
        // tcpdump says "listening on <interface>" once packets are being captured.
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| TestenvError::Io(std::io::Error::other("tcpdump has no stderr")))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let (said_tx, said) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stderr).lines();
            let mut seen = Vec::new();
            for line in lines.by_ref().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(Ok(()));
                    break;
                }
                seen.push(line);
            }
            let _ = tx.send(Err(seen.join("; ")));
            // Keep draining so tcpdump never blocks on a full pipe; pass the lines on
            // (its counts at exit).
            for line in lines.map_while(Result::ok) {
                let _ = said_tx.send(line);
            }
        });
        let mut capture = Capture { child, file, said };
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(capture),
            Ok(Err(said)) => {
                let _ = capture.child.wait();
                Err(TestenvError::Command {
                    command: "tcpdump".into(),
                    stderr: said,
                })
            }
            Err(_) => Err(TestenvError::Command {
                command: "tcpdump".into(),
                stderr: "did not start capturing within 10 s".into(),
            }),
        }
    }

    /// Stops the capture and returns every IPv4 TCP segment it saw, in order. A packet
    /// crossing the bridge is seen twice: entering from one pod's link, leaving on the
    /// other's. A capture that missed packets (the kernel dropped them before tcpdump
    /// read them, as a busy machine can) is an error saying so, never a shorter list.
    pub fn stop(mut self) -> Result<Vec<Segment>, TestenvError> {
        // Packets still in flight on the bridge land in the next few milliseconds.
        // (`--immediate-mode` above matters too: without it tcpdump holds packets in a
        // kernel block until a timeout and drops that block when interrupted.)
        std::thread::sleep(Duration::from_millis(200));
        self.interrupt();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                return Err(TestenvError::Command {
                    command: "tcpdump".into(),
                    stderr: "did not stop within 10 s of SIGINT".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // tcpdump's counts come last on its stderr, which closes as it exits.
        let mut said = Vec::new();
        while let Ok(line) = self.said.recv_timeout(Duration::from_secs(2)) {
            said.push(line);
        }
        if let Some(dropped) = dropped_packets(&said)
            && dropped > 0
        {
            return Err(TestenvError::Command {
                command: "tcpdump".into(),
                stderr: format!(
                    "the capture is incomplete: the kernel dropped {dropped} packets before tcpdump read them ({})",
                    said.join("; ")
                ),
            });
        }
        let bytes = std::fs::read(&self.file)?;
        parse_pcap(&bytes).map_err(|e| TestenvError::Command {
            command: "reading the capture".into(),
            stderr: e,
        })
    }

    fn interrupt(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.interrupt();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

/// "N packets dropped by kernel" in what tcpdump said at exit.
fn dropped_packets(said: &[String]) -> Option<u64> {
    said.iter().find_map(|line| {
        line.trim()
            .strip_suffix("packets dropped by kernel")?
            .trim()
            .parse()
            .ok()
    })
}

fn u16_be(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// Reads a classic pcap file (Ethernet or Linux cooked frames); keeps TCP segments over
/// IPv4 and IPv6.
pub fn parse_pcap(bytes: &[u8]) -> Result<Vec<Segment>, String> {
    let header = bytes.get(..24).ok_or("shorter than a pcap header")?;
    let magic = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let little = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        _ => return Err(format!("not a pcap file (magic {magic:#x})")),
    };
    let u32_at = |b: &[u8], at: usize| -> Option<u32> {
        let v: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
        Some(if little {
            u32::from_le_bytes(v)
        } else {
            u32::from_be_bytes(v)
        })
    };
    let linktype = u32_at(header, 20).ok_or("truncated header")?;
    // Where the IP packet starts and where its EtherType is, per link type.
    let (ethertype_at, ip_at) = match linktype {
        1 => (12, 14),   // Ethernet
        113 => (14, 16), // Linux cooked capture (`-i any`)
        276 => (0, 20),  // Linux cooked capture v2
        _ => return Err(format!("unsupported link type {linktype}")),
    };
    let mut segments = Vec::new();
    let mut at = 24;
    while at < bytes.len() {
        let len = u32_at(bytes, at + 8).ok_or("truncated record header")? as usize;
        let frame = bytes
            .get(at + 16..at + 16 + len)
            .ok_or("truncated record")?;
        at += 16 + len;
        if let Some(s) = tcp_segment(frame, ethertype_at, ip_at) {
            segments.push(s);
        }
    }
    Ok(segments)
}

fn tcp_segment(frame: &[u8], ethertype_at: usize, ip_at: usize) -> Option<Segment> {
    let ip = frame.get(ip_at..)?;
    let (src, dst, tcp) = match u16_be(frame, ethertype_at)? {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16_be(ip, 2)?);
            if *ip.get(9)? != 6 || ihl < 20 {
                return None;
            }
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let dst = Ipv4Addr::new(*ip.get(16)?, ip[17], ip[18], ip[19]);
            (
                IpAddr::V4(src),
                IpAddr::V4(dst),
                ip.get(ihl..total.min(ip.len()))?,
            )
        }
        // IPv6 without extension headers (what TCP between pods uses).
        0x86dd => {
            if *ip.get(6)? != 6 {
                return None;
            }
            let payload = usize::from(u16_be(ip, 4)?);
            let addr = |at: usize| -> Option<Ipv6Addr> {
                let b: [u8; 16] = ip.get(at..at + 16)?.try_into().ok()?;
                Some(Ipv6Addr::from(b))
            };
            (
                IpAddr::V6(addr(8)?),
                IpAddr::V6(addr(24)?),
                ip.get(40..(40 + payload).min(ip.len()))?,
            )
        }
        _ => return None,
    };
    let offset = usize::from(tcp.get(12)? >> 4) * 4;
    Some(Segment {
        src: SocketAddr::new(src, u16_be(tcp, 0)?),
        dst: SocketAddr::new(dst, u16_be(tcp, 2)?),
        syn: tcp.get(13)? & 0x02 != 0,
        payload: tcp.get(offset..)?.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcap(linktype: u32, frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        out.extend_from_slice(&[2, 0, 4, 0]);
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&65535u32.to_le_bytes());
        out.extend_from_slice(&linktype.to_le_bytes());
        for f in frames {
            out.extend_from_slice(&[0; 8]);
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
            out.extend_from_slice(f);
        }
        out
    }

    fn ipv4_tcp(payload: &[u8]) -> Vec<u8> {
        let total = (20 + 20 + payload.len()) as u16;
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0, 0, 64, 6, 0, 0, 198, 18, 1, 10, 198, 18, 2, 10]);
        ip.extend_from_slice(&40000u16.to_be_bytes());
        ip.extend_from_slice(&15008u16.to_be_bytes());
        ip.extend_from_slice(&[0; 8]);
        ip.extend_from_slice(&[0x50, 0x02, 0, 0, 0, 0, 0, 0]);
        ip.extend_from_slice(payload);
        ip
    }

    #[test]
    fn reads_tcpdumps_drop_count() {
        let said = |lines: &[&str]| lines.iter().map(|l| l.to_string()).collect::<Vec<_>>();
        let at_exit = said(&[
            "12 packets captured",
            "14 packets received by filter",
            "2 packets dropped by kernel",
        ]);
        assert_eq!(dropped_packets(&at_exit), Some(2));
        assert_eq!(
            dropped_packets(&said(&["0 packets dropped by kernel"])),
            Some(0)
        );
        assert_eq!(dropped_packets(&said(&["12 packets captured"])), None);
    }

    #[test]
    fn reads_ethernet_and_cooked_frames() {
        let mut eth = vec![0; 12];
        eth.extend_from_slice(&[0x08, 0x00]);
        eth.extend(ipv4_tcp(b"abc"));
        let mut sll2 = vec![0x08, 0x00];
        sll2.extend_from_slice(&[0; 18]);
        sll2.extend(ipv4_tcp(b"xyz"));
        for (linktype, frame, payload) in [(1, eth, b"abc"), (276, sll2, b"xyz")] {
            let segments = parse_pcap(&pcap(linktype, &[frame])).unwrap();
            assert_eq!(segments.len(), 1);
            let s = &segments[0];
            assert_eq!(s.src.to_string(), "198.18.1.10:40000");
            assert_eq!(s.dst.to_string(), "198.18.2.10:15008");
            assert!(s.syn && s.has_port(15008));
            assert_eq!(s.payload, payload);
        }
    }

    #[test]
    fn reads_ipv6_segments() {
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend_from_slice(&23u16.to_be_bytes());
        ip.extend_from_slice(&[6, 64]);
        let src: Ipv6Addr = "2001:2::1:10".parse().unwrap();
        let dst: Ipv6Addr = "2001:2::2:10".parse().unwrap();
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        ip.extend_from_slice(&40000u16.to_be_bytes());
        ip.extend_from_slice(&15008u16.to_be_bytes());
        ip.extend_from_slice(&[0; 8]);
        ip.extend_from_slice(&[0x50, 0x18, 0, 0, 0, 0, 0, 0]);
        ip.extend_from_slice(b"tls");
        let mut eth = vec![0; 12];
        eth.extend_from_slice(&[0x86, 0xdd]);
        eth.extend(ip);
        let segments = parse_pcap(&pcap(1, &[eth])).unwrap();
        assert_eq!(segments[0].dst.to_string(), "[2001:2::2:10]:15008");
        assert_eq!(segments[0].payload, b"tls");
    }

    #[test]
    fn truncated_or_foreign_files_are_errors() {
        assert!(parse_pcap(b"short").is_err());
        assert!(parse_pcap(&[0u8; 24]).is_err());
        let mut file = pcap(1, &[vec![0; 40]]);
        file.truncate(file.len() - 1);
        assert!(parse_pcap(&file).is_err());
        assert!(parse_pcap(&pcap(105, &[])).is_err());
        // A frame too short to hold headers is skipped, not a panic.
        assert!(parse_pcap(&pcap(1, &[vec![0x08; 15]])).unwrap().is_empty());
    }
}
