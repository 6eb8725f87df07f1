//! README's "After the demo" walk-through, run as written: every `$ ` line of its
//! `console` blocks, in order, in one shell (so `&` and `kill %1` work as for a reader),
//! with this build's `ambit` first on the PATH and the clone as the working folder. The
//! lines shown after a command must appear in its output, in order; `…` stands for any
//! text. Needs root, iproute2, nftables and curl (it runs the demo).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_ambit");

/// One command of the walk-through and the lines its output must show.
#[derive(Debug)]
struct Step {
    command: String,
    expected: Vec<String>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The commands between the walk-through markers.
fn walkthrough(readme: &str) -> Vec<Step> {
    let start = readme
        .find("<!-- walkthrough -->")
        .expect("README has no walk-through marker");
    let end = readme
        .find("<!-- /walkthrough -->")
        .expect("README has no end-of-walk-through marker");
    let mut steps: Vec<Step> = Vec::new();
    let mut in_console = false;
    for line in readme[start..end].lines() {
        if line.starts_with("```") {
            in_console = line == "```console";
            continue;
        }
        if !in_console {
            continue;
        }
        if let Some(command) = line.strip_prefix("$ ") {
            steps.push(Step {
                command: command.to_owned(),
                expected: Vec::new(),
            });
        } else if let Some(step) = steps.last_mut() {
            step.expected.push(line.to_owned());
        }
    }
    steps
}

/// Whether `line` matches `pattern`, where `…` stands for any text.
fn matches(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split('…').collect();
    if parts.len() == 1 {
        return line == pattern;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !line.starts_with(first) || !line.ends_with(last) || line.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &line[first.len()..line.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

/// A shell fed one command at a time; each command's output ends at a marker line.
struct Shell {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Shell {
    fn start() -> Self {
        use std::os::unix::process::CommandExt as _;
        let bin_dir = Path::new(BIN).parent().unwrap();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut child = Command::new("bash")
            .args(["--noprofile", "--norc"])
            .current_dir(repo_root())
            .env("PATH", path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so everything it started can be stopped at the end.
            .process_group(0)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut shell = Self { child, lines };
        // Standard error joins standard output, as on a terminal.
        shell.send("exec 2>&1");
        shell
    }

    fn send(&mut self, text: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{text}").unwrap();
        stdin.flush().unwrap();
    }

    /// Runs one command; its output and exit status.
    fn run(&mut self, command: &str, n: usize) -> (Vec<String>, i32) {
        let marker = format!("__ambit_readme_step_{n}__");
        self.send(command);
        self.send(&format!("echo \"{marker} $?\""));
        let mut output = Vec::new();
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(180))
                .unwrap_or_else(|_| {
                    panic!(
                        "`{command}` did not finish within 180 s; its output so far: {output:#?}"
                    )
                });
            if let Some(status) = line.strip_prefix(&format!("{marker} ")) {
                return (output, status.trim().parse().unwrap_or(-1));
            }
            output.push(line);
        }
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        // Whatever the walk-through left (a failed step skips its own clean-up).
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = Command::new(BIN).args(["demo", "--down"]).output();
        let _ = std::fs::remove_dir_all("/tmp/ambit-state");
        let _ = std::fs::remove_file("/tmp/node-a.token");
        let _ = std::fs::remove_file("/tmp/ambit-control.log");
    }
}

#[test]
fn the_readme_walkthrough_does_what_it_says() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let steps = walkthrough(&readme);
    assert!(steps.len() >= 10, "{steps:#?}");
    for tool in ["curl", "ip", "nft"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap();
        assert!(
            found.status.success(),
            "the walk-through needs `{tool}`: apt-get install -y curl iproute2 nftables"
        );
    }
    let _ = std::fs::remove_dir_all("/tmp/ambit-state");
    let mut shell = Shell::start();
    for (n, step) in steps.iter().enumerate() {
        let (output, status) = shell.run(&step.command, n);
        // Every command succeeds (README shows a failure as `cmd || echo ...`).
        assert!(
            status == 0,
            "`{}` exited with {status}:\n{}",
            step.command,
            output.join("\n")
        );
        let mut from = 0;
        for want in &step.expected {
            match output[from..].iter().position(|line| matches(want, line)) {
                Some(i) => from += i + 1,
                None => panic!(
                    "`{}`: README shows\n  {want}\nwhich is not in the output (after the lines already matched):\n{}",
                    step.command,
                    output.join("\n")
                ),
            }
        }
    }
}

#[test]
fn the_pattern_matcher_is_strict_where_it_should_be() {
    assert!(matches("a … c", "a b c"));
    assert!(matches("a…", "abc"));
    assert!(matches("…", "anything"));
    assert!(matches("exact", "exact"));
    assert!(!matches("exact", "exactly"));
    assert!(!matches("a … c", "a b d"));
    assert!(!matches("ab…ba", "aba"));
    assert!(matches("x … y … z", "x 1 y 2 z"));
    assert!(!matches("x … y … z", "x 1 z 2 y"));
}
