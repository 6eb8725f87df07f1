//! A node proxy under a flood: connections to port 15008 that never authenticate cost
//! little, are bounded, and do not keep the mesh from being served.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ambit_e2e::*;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn gauge(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{page}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_to_15008_is_bounded_and_the_mesh_keeps_working() {
    logs::init();
    let mesh = Mesh::start_with(cast(), |c| {
        c.dataplane.hbone_server.handshake_timeout = Duration::from_secs(3);
    })
    .await;
    mesh.echo_app("echo-1", APP_PORT);
    assert_eq!(
        exchange(mesh.pod("sleep"), ECHO_VIP, b"before")
            .await
            .unwrap(),
        b"before"
    );

    // As many idle connections as this process may hold, up to 10,000, from a pod outside
    // the mesh straight to echo-1's port 15008 (plain TCP, never a TLS byte).
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let flood = 10_000usize.min(hard.saturating_sub(4_000) as usize);
    assert!(
        flood >= 5_000,
        "the open-file limit ({hard}) is too low for this test"
    );
    let target: SocketAddr = mesh.addr("echo-1", 15008);
    let legacy = mesh.pod("legacy").netns.clone();
    let rss_before = rss_kib();
    let started = Instant::now();
    let sockets = tokio::task::spawn_blocking(move || {
        let mut held = Vec::with_capacity(flood);
        for _ in 0..flood {
            let s = legacy
                .run(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None))
                .unwrap()
                .unwrap();
            s.connect_timeout(&target.into(), Duration::from_secs(5))
                .unwrap();
            held.push(s);
        }
        held
    })
    .await
    .unwrap();
    let flooded_in = started.elapsed();

    // The mesh still works while every one of them is held open.
    let back = exchange(mesh.pod("sleep"), ECHO_VIP, b"during the flood").await;
    assert_eq!(back.unwrap(), b"during the flood");

    // The kernel completes a connection before the proxy accepts it: the last of the
    // flood may still wait in the accept queue a moment after connect() returned.
    let refused_of = |page: &str| {
        sum(
            page,
            "ambit_node_hbone_refused_total",
            &[("limit", "source_handshakes")],
        )
    };
    eventually("the flood to be accepted and refused", || {
        refused_of(&mesh.node("node-b").metrics().encode()) >= (flood - 16) as f64
    })
    .await;
    let page = mesh.metrics("node-b").await;
    let pending = gauge(&page, "ambit_node_hbone_handshakes");
    assert!(
        pending <= 64.0,
        "{pending} handshakes pending from one source:\n{page}"
    );
    let refused = refused_of(&page);
    assert!(
        refused >= (flood - 16) as f64,
        "only {refused} of {flood} refused:\n{page}"
    );
    let grown_mib = rss_kib().saturating_sub(rss_before) as f64 / 1024.0;
    eprintln!(
        "flood: {flood} idle connections in {flooded_in:?}; {refused} refused on arrival, {pending} in their handshake; process RSS grew by {grown_mib:.1} MiB"
    );
    assert!(
        grown_mib < 64.0,
        "memory grew by {grown_mib:.1} MiB under the flood"
    );

    // The ones let in give their places back at the handshake deadline.
    drop(sockets);
    eventually("the flood's handshakes to time out", || {
        let m = mesh.node("node-b").metrics().encode();
        gauge(&m, "ambit_node_hbone_handshakes") == 0.0
    })
    .await;
}
