//! The redirection rules in a real network namespace (root and nftables required).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use ambit_cni::redirect::{Mode, Redirector};
use ambit_testenv::Topology;

/// Re-applying the rules of an enrolled pod (as the agent does after the node proxy
/// restarts) must not remove the reply-routing rule even for a moment: during such a
/// gap the replies of proxied inbound connections leave the pod and the peer resets
/// them.
#[test]
fn reapplying_leaves_the_reply_routing_rule_in_place() {
    let mut topo = Topology::new().expect("this test needs root and iproute2 (network namespaces)");
    let pod = topo.pod("node-a", [198, 18, 7, 10].into()).unwrap();
    let netns = File::open(pod.netns_path()).unwrap();
    let redirector = Redirector::default();
    redirector
        .apply(&netns, Mode::Enrolled)
        .expect("this test needs nftables");

    let mut monitor = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod.netns_name,
            "ip",
            "-o",
            "monitor",
            "rule",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    redirector.apply(&netns, Mode::Enrolled).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    monitor.kill().unwrap();
    monitor.wait().unwrap();
    let mut events = String::new();
    monitor
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut events)
        .unwrap();
    assert!(
        events.trim().is_empty(),
        "re-applying changed the policy-routing rules:\n{events}"
    );

    // A rule that has drifted is still repaired.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod.netns_name,
            "ip",
            "-4",
            "rule",
            "del",
            "pref",
            "32764",
        ])
        .status()
        .unwrap();
    assert!(out.success());
    redirector.apply(&netns, Mode::Enrolled).unwrap();
    let listed = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod.netns_name,
            "ip",
            "-4",
            "rule",
            "list",
            "pref",
            "32764",
        ])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert!(listed.contains("fwmark 0x111/0xfff lookup 100"), "{listed}");
    redirector.remove(&netns).unwrap();
}
