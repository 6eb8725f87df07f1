//! `ambit demo` as a process: the whole narrated walk-through with its checks, then
//! `--keep`, the refusal to start a second demo, and `--down`; interrupted on a terminal
//! (Ctrl-C at a pause, twice, the terminal closed). The demo's namespace names and ports
//! are fixed, so these tests run one at a time (.config/nextest.toml). Needs root,
//! iproute2 and nftables.

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
    assert!(stdout.contains("[9/9] Done"), "{stdout}");
    // The waypoint step ran its L7 policy.
    assert!(
        stdout.contains("✓ other's POST is refused at the waypoint: 403"),
        "{stdout}"
    );
    // Output to a pipe or file is plain lines: no progress rewritten in place.
    assert!(!stdout.contains('\r'), "{stdout:?}");
    assert!(
        !stdout.lines().any(|l| l.ends_with(' ')),
        "trailing spaces: {stdout:?}"
    );
    assert!(
        stdout.contains("… control plane (CA, discovery) ready: done in"),
        "{stdout}"
    );
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
    // The fabric and four pods (three applications and the waypoint's).
    assert_eq!(netns_left().len(), 5, "{:?}", netns_left());
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
    // Refused before anything is narrated.
    assert!(
        !String::from_utf8_lossy(&second.stdout).contains("[1/9]"),
        "{}",
        String::from_utf8_lossy(&second.stdout)
    );
    // The refusal touched nothing.
    // The fabric and four pods (three applications and the waypoint's).
    assert_eq!(netns_left().len(), 5, "{:?}", netns_left());

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

/// A demo on a terminal of its own (a pseudo-terminal whose far end the test holds), as a
/// user runs it: it pauses between steps, Ctrl-C is the byte 0x03 typed on the terminal,
/// and closing the terminal is closing its far end.
struct TerminalDemo {
    child: std::process::Child,
    terminal: Option<std::fs::File>,
    output: String,
    dir: std::path::PathBuf,
}

impl TerminalDemo {
    fn start(dir: &Path) -> Self {
        let pty = nix::pty::openpty(None, None).unwrap();
        // The far end stays with the test alone (openpty's descriptors are inherited by
        // default), or closing it would not hang the terminal up.
        nix::fcntl::fcntl(
            &pty.master,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .unwrap();
        let flags = nix::fcntl::OFlag::from_bits_truncate(
            nix::fcntl::fcntl(&pty.master, nix::fcntl::FcntlArg::F_GETFL).unwrap(),
        );
        nix::fcntl::fcntl(
            &pty.master,
            nix::fcntl::FcntlArg::F_SETFL(flags | nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        // setsid(1) --ctty: a session of its own with this terminal as its controlling
        // terminal, so typed Ctrl-C and the terminal's hang-up reach the demo as they
        // reach a shell's foreground job. (Not a group leader, setsid execs in place: the
        // child's pid is the demo's.)
        let mut cmd = Command::new("setsid");
        cmd.args(["--ctty", BIN, "demo", "--dir", dir.to_str().unwrap()])
            .stdin(pty.slave.try_clone().unwrap())
            .stdout(pty.slave.try_clone().unwrap())
            .stderr(pty.slave.try_clone().unwrap());
        let child = cmd.spawn().unwrap();
        drop(pty.slave);
        Self {
            child,
            terminal: Some(std::fs::File::from(pty.master)),
            output: String::new(),
            dir: dir.to_owned(),
        }
    }

    /// Reads what the demo wrote so far (the terminal must be drained or the demo blocks).
    fn drain(&mut self) {
        use std::io::Read as _;
        let Some(terminal) = self.terminal.as_mut() else {
            return;
        };
        let mut buf = [0u8; 4096];
        loop {
            match terminal.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => self.output.push_str(&String::from_utf8_lossy(&buf[..n])),
                // WouldBlock: nothing more for now; EIO: the demo closed its side.
                Err(_) => return,
            }
        }
    }

    /// Waits until the output holds `text` `times` times.
    fn wait_for(&mut self, text: &str, times: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        loop {
            self.drain();
            if self.output.matches(text).count() >= times {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the demo exited ({status}) before showing {text:?}:\n{}",
                    self.output
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {text:?} after 90 s:\n{}",
                self.output
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Presses Enter at the first pause and waits for the second, which comes once every
    /// process of the mesh runs.
    fn advance_to_second_pause(&mut self) {
        self.wait_for("(press Enter to continue)", 1);
        self.type_keys(b"\r");
        self.wait_for("(press Enter to continue)", 2);
    }

    fn type_keys(&mut self, keys: &[u8]) {
        use std::io::Write as _;
        self.terminal.as_mut().unwrap().write_all(keys).unwrap();
    }

    /// Waits for the demo to exit (draining its output); its exit code.
    fn wait_exit(&mut self) -> i32 {
        use std::os::unix::process::ExitStatusExt as _;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            self.drain();
            if let Some(status) = self.child.try_wait().unwrap() {
                self.drain();
                return status.code().unwrap_or_else(|| {
                    panic!("killed by signal {:?}:\n{}", status.signal(), self.output)
                });
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the demo did not exit within 60 s of being stopped:\n{}",
                self.output
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The processes the demo recorded as started.
    fn recorded_pids(&self) -> Vec<(String, i32)> {
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.dir.join("demo.json")).unwrap()).unwrap();
        record["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p[0].as_str().unwrap().to_owned(),
                    p[1].as_i64().unwrap() as i32,
                )
            })
            .collect()
    }
}

impl Drop for TerminalDemo {
    fn drop(&mut self) {
        // A failed test leaves nothing behind either.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new(BIN)
            .args(["demo", "--down", "--dir", self.dir.to_str().unwrap()])
            .output();
    }
}

/// Whether a process runs (exists and is not a zombie waiting to be reaped).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

fn assert_nothing_left(pids: &[(String, i32)], dir: &Path, output: &str) {
    let alive: Vec<_> = pids.iter().filter(|(_, pid)| running(*pid)).collect();
    assert!(
        alive.is_empty(),
        "processes left running: {alive:?}\n{output}"
    );
    assert!(
        netns_left().is_empty(),
        "left behind: {:?}\n{output}",
        netns_left()
    );
    assert!(!dir.exists(), "the demo folder was left behind\n{output}");
}

#[test]
fn ctrl_c_at_a_pause_cleans_up_and_exits_at_once() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("demo");
    let mut demo = TerminalDemo::start(&dir);
    demo.advance_to_second_pause();
    let pids = demo.recorded_pids();
    assert!(pids.len() >= 6, "{pids:?}");
    assert!(pids.iter().all(|(_, pid)| running(*pid)), "{pids:?}");
    demo.type_keys(b"\x03");
    assert_eq!(demo.wait_exit(), 130, "{}", demo.output);
    assert!(
        demo.output.contains("interrupted (SIGINT)"),
        "{}",
        demo.output
    );
    assert!(demo.output.contains("removed;"), "{}", demo.output);
    assert!(!demo.output.contains("panicked"), "{}", demo.output);
    assert_nothing_left(&pids, &dir, &demo.output);
}

#[test]
fn closing_the_terminal_cleans_up() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("demo");
    let mut demo = TerminalDemo::start(&dir);
    demo.advance_to_second_pause();
    let pids = demo.recorded_pids();
    // The far end goes away: the kernel sends SIGHUP, and every later write of the demo
    // to its terminal fails.
    demo.terminal = None;
    assert_eq!(demo.wait_exit(), 129);
    assert_nothing_left(&pids, &dir, "");
}

#[test]
fn a_second_ctrl_c_during_the_clean_up_is_not_ignored() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("demo");
    let mut demo = TerminalDemo::start(&dir);
    demo.advance_to_second_pause();
    let pids = demo.recorded_pids();
    // A process that does not stop when asked: the clean-up waits 5 s for it before
    // killing it, which is when an impatient user presses Ctrl-C again.
    let (_, control) = pids
        .iter()
        .find(|(name, _)| name == "control")
        .unwrap()
        .clone();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(control),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    demo.type_keys(b"\x03");
    demo.wait_for("removing everything", 1);
    demo.type_keys(b"\x03");
    assert_eq!(demo.wait_exit(), 130, "{}", demo.output);
    // It exited before the clean-up was done (which waits 5 s for the stopped process).
    assert!(!demo.output.contains("removed;"), "{}", demo.output);
    let hint = format!("ambit demo --down --dir {}", dir.display());
    assert!(
        demo.output.contains("interrupted again (SIGINT)") && demo.output.contains(&hint),
        "{}",
        demo.output
    );
    // What is left goes with the command the demo named.
    let down = Command::new(BIN)
        .args(["demo", "--down", "--dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(down.status.success());
    assert_nothing_left(&pids, &dir, &demo.output);
}
