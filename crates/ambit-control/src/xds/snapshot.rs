//! Versions of the translated resources, published to every subscriber.
//!
//! The publisher watches the model; after a change it waits until the model has been
//! quiet for the debounce period (at most one second in all), so a burst of changes
//! becomes one new [`Snapshot`]. Each snapshot keeps a log of what changed in the last
//! generations, so a subscriber that is up to date at generation `g` is sent exactly the
//! resources changed since `g`, without comparing every resource.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use ambit_core::discovery::Str;
use imbl::OrdMap;
use tokio::sync::watch;
use tokio::time::Instant;

use super::translate::{Delta, Encoded, ResourceType, TYPES, TranslateOptions, Translator};
use crate::model::Model;

/// Generations of change kept in a snapshot's log. A subscriber further behind than this
/// is asked to reconnect (and then resyncs by comparing versions).
pub const LOG_GENERATIONS: usize = 256;
/// A burst of model changes is folded into one snapshot for at most this long.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(1);

/// One version of every resource.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub generation: u64,
    resources: [OrdMap<Str, Arc<Encoded>>; TYPES],
    log: VecDeque<Arc<LogEntry>>,
    /// Policy translation warnings, `<ns>/<name>` -> messages.
    pub warnings: Arc<std::collections::BTreeMap<String, Vec<String>>>,
    /// Set while translation is failing (it panicked: the message); this snapshot, the
    /// last good one, stays in force and the control plane is not ready.
    pub failing: Option<Arc<str>>,
    /// Policy resources only Ambit's node proxies are sent (`ambit.io/*` extensions).
    pub ambit_only: Arc<BTreeSet<String>>,
}

#[derive(Debug)]
struct LogEntry {
    generation: u64,
    changed: [Vec<Str>; TYPES],
    removed: [Vec<Str>; TYPES],
}

/// What a subscriber at some generation needs to become current.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Catchup {
    pub changed: BTreeSet<Str>,
    pub removed: BTreeSet<Str>,
}

impl Snapshot {
    pub fn resources(&self, t: ResourceType) -> &OrdMap<Str, Arc<Encoded>> {
        &self.resources[t.index()]
    }

    /// Names to send or remove to bring a subscriber from generation `from` to this one;
    /// `None` if the log no longer reaches back that far.
    pub fn catch_up(&self, t: ResourceType, from: u64) -> Option<Catchup> {
        if from == self.generation {
            return Some(Catchup::default());
        }
        let oldest = self.log.front().map_or(self.generation, |e| e.generation);
        if from + 1 < oldest || from > self.generation {
            return None;
        }
        let mut touched = BTreeSet::new();
        for entry in self.log.iter().filter(|e| e.generation > from) {
            touched.extend(entry.changed[t.index()].iter().cloned());
            touched.extend(entry.removed[t.index()].iter().cloned());
        }
        let mut out = Catchup::default();
        for name in touched {
            if self.resources[t.index()].contains_key(&name) {
                out.changed.insert(name);
            } else {
                out.removed.insert(name);
            }
        }
        Some(out)
    }

    fn next(&self, translator: &Translator, delta: Delta) -> Snapshot {
        let mut log = self.log.clone();
        let to_names = |set: &BTreeSet<String>| set.iter().map(|n| Str::from(n.as_str())).collect();
        log.push_back(Arc::new(LogEntry {
            generation: self.generation + 1,
            changed: std::array::from_fn(|i| to_names(&delta.changed[i])),
            removed: std::array::from_fn(|i| to_names(&delta.removed[i])),
        }));
        while log.len() > LOG_GENERATIONS {
            log.pop_front();
        }
        Snapshot {
            generation: self.generation + 1,
            resources: ResourceType::ALL.map(|t| translator.resources(t).clone()),
            log,
            warnings: Arc::new(translator.warnings().clone()),
            failing: None,
            ambit_only: Arc::new(translator.ambit_only().clone()),
        }
    }

    /// What differs between this snapshot's resources and `translator`'s (after a
    /// translator was rebuilt from nothing, only real differences are pushed).
    fn delta_to(&self, translator: &Translator) -> Delta {
        let mut delta = Delta::default();
        for t in ResourceType::ALL {
            let (old, new) = (&self.resources[t.index()], translator.resources(t));
            for (name, enc) in new.iter() {
                if old.get(name).map(|o| &o.version) != Some(&enc.version) {
                    delta.changed[t.index()].insert(name.to_string());
                }
            }
            for name in old.keys() {
                if !new.contains_key(name) {
                    delta.removed[t.index()].insert(name.to_string());
                }
            }
        }
        delta
    }
}

/// Translates the current model into the first snapshot, then keeps publishing new ones
/// as the model changes, until `stop` fires.
pub async fn publish(
    mut models: watch::Receiver<Arc<Model>>,
    options: TranslateOptions,
    debounce: Duration,
    snapshots: watch::Sender<Arc<Snapshot>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut translator = Translator::new(options.clone());
    let mut translated = models.borrow_and_update().clone();
    let first = {
        let model = translated.clone();
        let (t, delta) = blocking(move || {
            let d = translator.full(&model);
            (translator, d)
        })
        .await
        .unwrap_or_else(|message| panic!("the first translation failed: {message}"));
        translator = t;
        Snapshot::default().next(&translator, delta)
    };
    tracing::info!(
        generation = first.generation,
        addresses = first.resources[0].len(),
        authorizations = first.resources[1].len(),
        "discovery resources translated"
    );
    snapshots.send_replace(Arc::new(first));

    // After a failure: translate the whole current model again with a new translator.
    let mut failures = 0u32;
    // Fetched key sets arriving: the RequestAuthentications are translated again.
    let mut jwks = options.jwks.subscribe();
    jwks.borrow_and_update();
    let mut keys_changed = false;
    loop {
        if failures == 0 {
            tokio::select! {
                changed = models.changed() => if changed.is_err() { return },
                changed = jwks.changed() => {
                    if changed.is_err() { return }
                    keys_changed = true;
                }
                _ = stop.changed() => return,
            }
            // Debounce: fold further changes arriving within `debounce` of each other,
            // for at most MAX_DEBOUNCE.
            let deadline = Instant::now() + MAX_DEBOUNCE;
            loop {
                let quiet = tokio::time::sleep(debounce);
                tokio::select! {
                    _ = quiet => break,
                    changed = models.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        let model = models.borrow_and_update().clone();
        let old = translated.clone();
        let changes = model.changes_since(&old);
        let refresh_keys = std::mem::take(&mut keys_changed);
        if changes.is_empty() && failures == 0 && !refresh_keys {
            continue;
        }
        let m = model.clone();
        let rebuild = failures > 0;
        let result = blocking(move || {
            let d = if rebuild {
                translator.full(&m)
            } else {
                let mut d = translator.apply(&m, &old, &changes);
                if refresh_keys {
                    d.merge(translator.refresh_authentications(&m));
                }
                d
            };
            (translator, d)
        })
        .await;
        let current = snapshots.borrow().clone();
        let (t, delta) = match result {
            Ok(r) => r,
            Err(message) => {
                // Never a silently frozen control plane: say so, stay not ready, keep
                // the last good snapshot in force, and start again from nothing.
                failures += 1;
                tracing::error!(panic = %message, generation = current.generation, "discovery translation failed; the last good resources stay in force and the control plane is not ready until a translation succeeds");
                translator = Translator::new(options.clone());
                let mut still = (*current).clone();
                still.failing = Some(message.into());
                snapshots.send_replace(Arc::new(still));
                let delay = (Duration::from_secs(1) * 2u32.saturating_pow(failures.min(5) - 1))
                    .min(MAX_RETRY);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return,
                }
                continue;
            }
        };
        translator = t;
        translated = model;
        let delta = if rebuild {
            tracing::info!("discovery translation recovered");
            current.delta_to(&translator)
        } else {
            delta
        };
        failures = 0;
        // Warnings can change without any resource (an HTTPRoute is reported, say): the
        // same resources are republished with them, at the same generation.
        let warnings_changed = *current.warnings != *translator.warnings();
        if delta.is_empty() && current.failing.is_none() && !warnings_changed {
            continue;
        }
        let next = if delta.is_empty() {
            let mut same = (*current).clone();
            same.failing = None;
            same.warnings = Arc::new(translator.warnings().clone());
            same
        } else {
            current.next(&translator, delta)
        };
        tracing::debug!(generation = next.generation, "discovery resources updated");
        snapshots.send_replace(Arc::new(next));
    }
}

/// Longest wait between attempts to recover from a failed translation.
const MAX_RETRY: Duration = Duration::from_secs(10);

/// Runs `f` on the blocking pool; a panic comes back as its message.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(crate::source::panic_message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse::parse_manifest;

    fn model(g: u64, pods: &[(&str, &str)]) -> Arc<Model> {
        let text: String = pods
            .iter()
            .map(|(name, ip)| {
                format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo}}\nspec: {{nodeName: n}}\nstatus: {{podIP: {ip}}}\n")
            })
            .collect();
        Arc::new(Model::from_objects(g, parse_manifest(&text).unwrap()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_becomes_one_snapshot() {
        let (model_tx, model_rx) = watch::channel(model(1, &[("a", "198.18.0.1")]));
        let (snap_tx, mut snap_rx) = watch::channel(Arc::new(Snapshot::default()));
        let (_stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(publish(
            model_rx,
            TranslateOptions::default(),
            Duration::from_millis(100),
            snap_tx,
            stop_rx,
        ));
        snap_rx.changed().await.unwrap();
        let first = snap_rx.borrow_and_update().clone();
        assert_eq!(first.generation, 1);
        assert_eq!(first.resources(ResourceType::Address).len(), 1);

        // 1,000 changes in quick succession: one more pod each time.
        let pods: Vec<(String, String)> = (0..1000u32)
            .map(|j| {
                (
                    format!("p{j}"),
                    format!("198.18.{}.{}", j / 250, j % 250 + 1),
                )
            })
            .collect();
        let refs: Vec<(&str, &str)> = pods.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let all: Vec<_> = model(0, &refs).objects().cloned().collect();
        for i in 0..1000usize {
            let m = Model::from_objects(2 + i as u64, all[..=i].iter().cloned());
            model_tx.send_replace(Arc::new(m));
            if i % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        snap_rx.changed().await.unwrap();
        let snap = snap_rx.borrow_and_update().clone();
        assert_eq!(snap.generation, 2, "one snapshot for the whole burst");
        assert_eq!(snap.resources(ResourceType::Address).len(), 1000);
        let c = snap.catch_up(ResourceType::Address, 1).unwrap();
        assert_eq!((c.changed.len(), c.removed.len()), (1000, 1));
        assert_eq!(
            snap.catch_up(ResourceType::Address, 2).unwrap(),
            Catchup::default()
        );
        assert!(snap.catch_up(ResourceType::Address, 99).is_none());
    }

    #[tokio::test]
    async fn a_failed_translation_keeps_the_last_snapshot_and_recovers() {
        let (model_tx, model_rx) = watch::channel(model(1, &[("a", "198.18.0.1")]));
        let (snap_tx, mut snap_rx) = watch::channel(Arc::new(Snapshot::default()));
        let (_stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(publish(
            model_rx,
            TranslateOptions::default(),
            Duration::from_millis(10),
            snap_tx,
            stop_rx,
        ));
        snap_rx.wait_for(|s| s.generation == 1).await.unwrap();
        // A model the translator panics on (the test's injected fault).
        let with = |extra: &str| {
            let text = format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: a, namespace: demo}}\nspec: {{nodeName: n}}\nstatus: {{podIP: 198.18.0.1}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: b, namespace: demo}}\nspec: {{nodeName: n}}\nstatus: {{podIP: 198.18.0.2}}\n{extra}"
            );
            Arc::new(Model::from_objects(2, parse_manifest(&text).unwrap()))
        };
        model_tx.send_replace(with(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: panic-now}\n",
        ));
        let failed = snap_rx
            .wait_for(|s| s.failing.is_some())
            .await
            .unwrap()
            .clone();
        assert_eq!(failed.generation, 1, "the last good snapshot stays");
        assert_eq!(failed.resources(ResourceType::Address).len(), 1);
        assert!(failed.failing.as_deref().unwrap().contains("injected"));
        // The fault goes away: the translator is rebuilt and catches up.
        model_tx.send_replace(with(""));
        let recovered = snap_rx
            .wait_for(|s| s.failing.is_none() && s.generation > 1)
            .await
            .unwrap()
            .clone();
        assert_eq!(recovered.resources(ResourceType::Address).len(), 2);
        // Only what really changed is pushed: pod b.
        let c = recovered.catch_up(ResourceType::Address, 1).unwrap();
        assert_eq!(c.changed.len(), 1, "{c:?}");
    }
}
