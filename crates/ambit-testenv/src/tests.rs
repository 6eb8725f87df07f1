use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

#[tokio::test]
async fn pods_reach_each_other_and_are_removed_on_drop() {
    let mut topo = Topology::new().unwrap();
    let a = topo.pod("n1", Ipv4Addr::new(198, 18, 1, 1)).unwrap();
    let b = topo.pod("n2", Ipv4Addr::new(198, 18, 2, 1)).unwrap();
    let listener = b.listen(9000).unwrap();
    let (client, accepted) =
        tokio::join!(a.connect(SocketAddr::from((b.ip, 9000))), listener.accept());
    let mut client = client.unwrap();
    let (mut server, peer) = accepted.unwrap();
    assert_eq!(peer.ip(), std::net::IpAddr::V4(a.ip));
    client.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    let conns = b.tcp_connections().unwrap();
    assert!(
        conns
            .iter()
            .any(|(l, p)| l.port() == 9000 && p.ip() == std::net::IpAddr::V4(a.ip)),
        "{conns:?}"
    );

    let names: Vec<String> = topo
        .pods()
        .iter()
        .map(|p| p.netns_name.clone())
        .chain([topo.fabric().to_owned()])
        .collect();
    drop(topo);
    let listed = run_output(&["ip", "netns", "list"]).unwrap();
    for n in names {
        assert!(!listed.contains(&n), "{n} left behind");
    }
}

#[tokio::test]
async fn enrollment_installs_and_removes_the_rules() {
    let mut topo = Topology::new().unwrap();
    let a = topo.pod("n1", Ipv4Addr::new(198, 18, 1, 2)).unwrap();
    let file = File::open(a.netns_path()).unwrap();
    assert!(!ambit_cni::redirect::installed(&file).unwrap());
    topo.enroll(&a).unwrap();
    topo.enroll(&a).unwrap(); // idempotent
    assert!(ambit_cni::redirect::installed(&file).unwrap());
    let rules = run_output(&["ip", "netns", "exec", &a.netns_name, "ip", "rule"]).unwrap();
    assert_eq!(rules.matches("lookup 100").count(), 1, "{rules}");
    topo.unenroll(&a).unwrap();
    assert!(!ambit_cni::redirect::installed(&file).unwrap());
    let rules = run_output(&["ip", "netns", "exec", &a.netns_name, "ip", "rule"]).unwrap();
    assert!(!rules.contains("lookup 100"), "{rules}");
}

#[test]
fn addresses_outside_the_test_range_are_refused() {
    let mut topo = Topology::new().unwrap();
    assert!(topo.pod("n", Ipv4Addr::new(10, 0, 0, 1)).is_err());
    assert!(topo.pod("n", GATEWAY).is_err());
}
