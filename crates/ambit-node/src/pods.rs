//! The pods the node proxy serves: added and removed by the node agent (ZDS) or by local
//! configuration, each with its listeners and connections.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_hbone::Workers;
use ambit_hbone::socket::Netns;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dataplane::{DataPlane, PodInfo, RunningPod};

/// The set of served pods.
///
/// A pod removed (the node agent's `del`, or missing from its snapshot) stops being
/// served at once: its listeners close. Its open connections are not cut: they run until
/// they end, so un-enrolling a running pod breaks nothing. Only when the node proxy
/// shuts down do they get a deadline (`drain`).
pub struct Pods {
    dp: Arc<DataPlane>,
    workers: Workers,
    running: Mutex<BTreeMap<String, RunningPod>>,
    /// Removed pods whose connections are still open.
    draining: TaskTracker,
    shutdown: CancellationToken,
    drain: Duration,
}

impl std::fmt::Debug for Pods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pods").finish_non_exhaustive()
    }
}

/// One served pod, for the admin endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct PodStatus {
    #[serde(flatten)]
    pub info: PodInfo,
    pub identity: String,
    pub netns: String,
    pub certificate_ready: bool,
}

impl Pods {
    pub fn dataplane(&self) -> &Arc<DataPlane> {
        &self.dp
    }

    /// Pods are served on `workers` (the data path's threads).
    pub fn new(dp: Arc<DataPlane>, workers: Workers) -> Self {
        let drain = dp.config.drain_timeout;
        Self {
            dp,
            workers,
            running: Mutex::new(BTreeMap::new()),
            draining: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            drain,
        }
    }

    fn retire(&self, pod: RunningPod) {
        let draining = pod.stop();
        self.draining.spawn_on(
            draining.finish(self.shutdown.clone(), self.drain),
            self.workers.handle(),
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, RunningPod>> {
        // Entries are inserted and removed whole.
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts serving a pod. Adding a pod already served in the same namespace does
    /// nothing; in another namespace (the pod was recreated), the old one is replaced.
    pub fn add(&self, info: PodInfo, netns: Netns) -> Result<(), String> {
        crate::zds::check_pod_netns(&netns)?;
        let replaced = {
            let mut running = self.lock();
            match running.get(&info.uid) {
                Some(p) if p.ctx.netns == netns && p.ctx.info == info => return Ok(()),
                Some(_) => running.remove(&info.uid),
                None => None,
            }
        };
        if let Some(old) = replaced {
            self.retire(old);
        }
        let pod = RunningPod::start(self.dp.clone(), info.clone(), netns, &self.workers)?;
        self.lock().insert(info.uid, pod);
        Ok(())
    }

    /// Stops serving a pod: listeners close now; its connections run until they end.
    /// Returns whether it was served.
    pub fn remove(&self, uid: &str) -> bool {
        let pod = self.lock().remove(uid);
        match pod {
            Some(p) => {
                self.retire(p);
                true
            }
            None => false,
        }
    }

    /// Stops serving every pod not in `keep`.
    pub fn retain(&self, keep: &HashSet<String>) {
        let gone: Vec<RunningPod> = {
            let mut running = self.lock();
            let uids: Vec<String> = running
                .keys()
                .filter(|u| !keep.contains(*u))
                .cloned()
                .collect();
            uids.iter().filter_map(|u| running.remove(u)).collect()
        };
        for pod in gone {
            self.retire(pod);
        }
    }

    /// Removed pods whose connections have not all ended.
    pub fn draining(&self) -> usize {
        self.draining.len()
    }

    pub fn uids(&self) -> HashSet<String> {
        self.lock().keys().cloned().collect()
    }

    pub fn status(&self) -> Vec<PodStatus> {
        self.lock()
            .values()
            .map(|p| PodStatus {
                info: p.ctx.info.clone(),
                identity: p.ctx.identity.to_string(),
                netns: p.ctx.netns.name().to_owned(),
                certificate_ready: p.ctx.cert.current().is_some(),
            })
            .collect()
    }

    /// Whether every pod has its certificate.
    pub fn all_certified(&self) -> bool {
        self.lock().values().all(|p| p.ctx.cert.current().is_some())
    }

    /// Stops everything: every pod stops being served, open connections get the drain
    /// timeout to end, then are closed.
    pub async fn clear(&self) {
        self.retain(&HashSet::new());
        self.shutdown.cancel();
        self.draining.close();
        self.draining.wait().await;
    }
}
