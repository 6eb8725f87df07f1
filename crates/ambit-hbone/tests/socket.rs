//! Socket options: source address, SO_MARK, network namespace. These need root
//! (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2; they fail with a clear message otherwise.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use ambit_hbone::socket::{Netns, PROXY_MARK, SocketOptions, connect, listen};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn require_root(what: &str) {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
        });
    assert_eq!(
        uid.as_deref(),
        Some("0"),
        "this test needs root ({what}); run the tests as root, as CI does"
    );
}

/// A network namespace made for one test and removed when dropped.
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn new() -> Self {
        require_root("creating network namespaces");
        let name = format!("ambit-t-{}-{}", std::process::id(), fastrand::u32(..));
        let run = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
                panic!("cannot run `ip` ({e}); install iproute2 (apt-get install -y iproute2)")
            });
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&["netns", "add", &name]);
        let ns = Self { name };
        run(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[tokio::test]
async fn binds_the_requested_source_address() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let opts = SocketOptions {
        bind: Some("127.0.0.2".parse().unwrap()),
        ..Default::default()
    };
    let (client, accepted) = tokio::join!(
        connect(listener.local_addr().unwrap(), &opts),
        listener.accept()
    );
    client.unwrap();
    assert_eq!(accepted.unwrap().1.ip().to_string(), "127.0.0.2");
}

#[tokio::test]
async fn marks_the_socket() {
    require_root("SO_MARK needs CAP_NET_ADMIN");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let opts = SocketOptions {
        mark: Some(PROXY_MARK),
        ..Default::default()
    };
    let (client, _accepted) = tokio::join!(
        connect(listener.local_addr().unwrap(), &opts),
        listener.accept()
    );
    let client = client.unwrap();
    assert_eq!(socket2::SockRef::from(&client).mark().unwrap(), PROXY_MARK);
}

#[tokio::test]
async fn listens_and_connects_inside_a_network_namespace() {
    let ns = TestNetns::new();
    let netns = Netns::open(ns.path()).unwrap();
    let inside = SocketOptions {
        netns: Some(netns.clone()),
        ..Default::default()
    };
    let listener = listen("127.0.0.1:0".parse().unwrap(), &inside, 16).unwrap();
    let addr = listener.local_addr().unwrap();

    // From inside the namespace: reaches the listener.
    let (client, accepted) = tokio::join!(connect(addr, &inside), listener.accept());
    let mut client = client.unwrap();
    let (mut server, _) = accepted.unwrap();
    client.write_all(b"inside").await.unwrap();
    let mut buf = [0u8; 6];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"inside");

    // From the host namespace the same address is another machine's loopback: nothing there.
    assert!(connect(addr, &SocketOptions::default()).await.is_err());

    // The runtime thread is back in the host namespace afterwards.
    let host = Netns::host().unwrap();
    let now = Netns::open("/proc/thread-self/ns/net").unwrap();
    assert_eq!(host, now);
    assert_ne!(host, netns);
}
