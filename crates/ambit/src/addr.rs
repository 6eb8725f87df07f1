//! Addresses given on the command line.

use std::net::{SocketAddr, ToSocketAddrs};

/// Parses an address to listen on or connect to: `IP:PORT`, `[IPv6]:PORT`, or
/// `HOST:PORT` with the name looked up once, now (`localhost:15012`). A name with both
/// IPv4 and IPv6 addresses gives the IPv4 one, as `localhost` usually means 127.0.0.1.
pub fn socket_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!(
            "{text:?} has no port; write ADDRESS:PORT, such as 127.0.0.1:15012 or localhost:15012"
        ));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!(
            "{text:?} is not ADDRESS:PORT (such as 127.0.0.1:15012, [::1]:15012 or localhost:15012)"
        ));
    }
    let found: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("cannot look up {host:?}: {e}"))?
        .collect();
    found
        .iter()
        .find(|a| a.is_ipv4())
        .or(found.first())
        .copied()
        .ok_or_else(|| format!("{host:?} has no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_names() {
        assert_eq!(
            socket_addr("127.0.0.1:15012"),
            Ok("127.0.0.1:15012".parse().unwrap())
        );
        assert_eq!(socket_addr("[::1]:80"), Ok("[::1]:80".parse().unwrap()));
        let local = socket_addr("localhost:15012").unwrap();
        assert!(local.ip().is_loopback(), "{local}");
        assert_eq!(local.port(), 15012);
        for bad in [
            "localhost",
            "localhost:",
            ":15012",
            "localhost:99999",
            "1.2.3.4",
        ] {
            let e = socket_addr(bad).unwrap_err();
            assert!(e.contains("PORT"), "{bad}: {e}");
        }
    }
}
