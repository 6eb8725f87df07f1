//! `ambit demo`: a two-node mesh built from network namespaces on one machine, walked
//! through step by step (the README's main job).
//!
//! - [`cluster`]: the namespaces and the mesh's processes, and their removal.
//! - [`app`]: the sample applications (HTTP echo server, client).
//! - [`script`]: the narrated steps and their checks (`--check` fails on any).

/// `println!` that never panics: the demo's standard output may be a closed pipe
/// (`ambit demo | head`) or a terminal that went away; the walk-through and its clean-up
/// go on regardless.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod app;
pub mod cluster;
pub mod script;

use std::path::PathBuf;

pub use cluster::down;
pub use script::{Options, run};

/// What stopped the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("a demo is already running or was left behind ({found}); remove it with `{down}`")]
    Busy {
        /// What was found: the demo's record, or one of its network namespaces.
        found: String,
        /// The command that removes it.
        down: String,
    },
    #[error("building the cluster: {0}")]
    Setup(String),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    App(String),
    #[error("{name} stopped ({status}); its log: {}", log.display())]
    Died {
        name: String,
        status: String,
        log: PathBuf,
    },
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("{} step(s) did not behave as narrated: {}", .0.len(), .0.join("; "))]
    Check(Vec<String>),
}

/// The demo's folder unless told otherwise.
pub const DEFAULT_DIR: &str = "/run/ambit-demo";

/// The command that removes a demo kept or left behind in `dir`.
pub fn down_command(dir: &std::path::Path) -> String {
    if dir == std::path::Path::new(DEFAULT_DIR) {
        "ambit demo --down".to_owned()
    } else {
        format!("ambit demo --down --dir {}", dir.display())
    }
}
