//! Ambit's node proxy (`ambit node`, Istio's ztunnel role).
//!
//! Today: the discovery client ([`xds`]) keeping the node's view of the mesh
//! ([`ambit_core::state::Store`]) current, and the admin port ([`admin`]). The data path
//! (per-pod listeners, HBONE in and out) arrives with the next issue and reads the same
//! store.

pub mod admin;
pub mod convert;
pub mod xds;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambit_core::state::Store;
use serde::Serialize;
use tokio::sync::watch;

pub use xds::{XdsClient, XdsConfig, XdsState};

/// Everything `ambit node` is configured with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub xds: XdsConfig,
    /// The admin port (`/config_dump`), localhost only by default.
    pub admin_addr: SocketAddr,
    /// Where the node proxy announces its admin address for `ambit config --node`.
    pub run_dir: Option<PathBuf>,
}

/// Why the node proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Listen(std::io::Error),
    #[error("cannot write {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What `<run_dir>/nodes/<node>.json` holds.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Announcement {
    pub node: String,
    pub admin: SocketAddr,
    pub pid: u32,
}

/// A running node proxy.
pub struct NodeProxy {
    store: Arc<Store>,
    xds: watch::Receiver<XdsState>,
    admin_addr: SocketAddr,
    announcement: Option<PathBuf>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for NodeProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProxy")
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

impl NodeProxy {
    pub async fn start(config: NodeConfig) -> Result<Self, StartError> {
        let store = Arc::new(Store::new());
        let (stop, stop_rx) = watch::channel(false);
        let node = config.xds.node_name.clone();
        let (client, xds) = XdsClient::new(config.xds, store.clone());
        let mut tasks = vec![tokio::spawn(client.run(stop_rx.clone()))];

        let listener = ambit_admin::bind(config.admin_addr, "admin port")
            .await
            .map_err(StartError::Listen)?;
        let admin_addr = listener.local_addr().map_err(StartError::Listen)?;
        let handler = admin::handler(node.clone(), store.clone(), xds.clone(), None);
        tasks.push(tokio::spawn(ambit_admin::serve(listener, handler, stop_rx)));

        let announcement = match &config.run_dir {
            Some(dir) => Some(announce(dir, &node, admin_addr)?),
            None => None,
        };
        tracing::info!(%node, admin = %admin_addr, "node proxy started (discovery and admin)");
        Ok(Self {
            store,
            xds,
            admin_addr,
            announcement,
            stop,
            tasks,
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn xds_state(&self) -> watch::Receiver<XdsState> {
        self.xds.clone()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        if let Some(path) = self.announcement {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The file `ambit config --node <node>` reads to find this proxy's admin port.
pub fn announcement_path(run_dir: &std::path::Path, node: &str) -> PathBuf {
    run_dir.join("nodes").join(format!("{node}.json"))
}

fn announce(
    run_dir: &std::path::Path,
    node: &str,
    admin: SocketAddr,
) -> Result<PathBuf, StartError> {
    let path = announcement_path(run_dir, node);
    let err = |source| StartError::RunDir {
        path: path.clone(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    let body = serde_json::to_vec_pretty(&Announcement {
        node: node.to_owned(),
        admin,
        pid: std::process::id(),
    })
    .map_err(|e| err(std::io::Error::other(e)))?;
    std::fs::write(&path, body).map_err(err)?;
    Ok(path)
}
