//! `ambit demo` as a process: the whole narrated walk-through with its checks, then
//! `--keep`, the refusal to start a second demo, and `--down`. One test, because the
//! demo's namespace names and ports are fixed. Needs root, iproute2 and nftables.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ambit");

fn netns_left() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("demo.") || *n == "ambit-demo")
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_demo_checks_out_keeps_refuses_a_second_and_comes_down() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("demo");
    let dir_arg = dir.to_str().unwrap();

    let out = Command::new(BIN)
        .args(["demo", "--check", "--dir", dir_arg])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Every step behaved as narrated"),
        "{stdout}"
    );
    assert!(!stdout.contains('✗'), "{stdout}");
    assert!(stdout.contains("[8/8] Done"), "{stdout}");
    assert!(netns_left().is_empty(), "left behind: {:?}", netns_left());
    assert!(!dir.exists(), "the demo folder was left behind");

    let out = Command::new(BIN)
        .args(["demo", "--check", "--keep", "--dir", dir_arg])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("demo --down"));
    assert_eq!(netns_left().len(), 4);
    // A kept mesh answers.
    let echo = Command::new("ip")
        .args([
            "netns",
            "exec",
            "demo.sleep",
            BIN,
            "demo",
            "get",
            "http://198.19.0.10/",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&echo.stdout).contains("\"server\": \"echo-1\""),
        "{}",
        String::from_utf8_lossy(&echo.stderr)
    );

    let second = Command::new(BIN)
        .args(["demo", "--check", "--dir", dir_arg])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("ambit demo --down"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    // The refusal touched nothing.
    assert_eq!(netns_left().len(), 4);

    let down = Command::new(BIN)
        .args(["demo", "--down", "--dir", dir_arg])
        .output()
        .unwrap();
    assert!(down.status.success());
    let said = String::from_utf8_lossy(&down.stdout);
    assert!(said.contains("removed process control"), "{said}");
    assert!(
        said.contains("removed network namespace demo.sleep"),
        "{said}"
    );
    assert!(netns_left().is_empty());
    assert!(!Path::new(&dir).exists());
}

#[test]
fn the_demo_refuses_clearly_without_root_or_tools() {
    // As an ordinary user (nobody).
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", BIN, "demo", "--check"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs root") && err.contains("sudo"), "{err}");
    // Without iproute2 and nftables on the PATH.
    let out = Command::new(BIN)
        .args(["demo", "--check"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("apt-get install -y iproute2 nftables"),
        "{err}"
    );
}
