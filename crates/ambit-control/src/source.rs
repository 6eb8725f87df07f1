//! The file source: a folder of YAML manifests, watched, turned into [`Model`] versions.
//!
//! Every `.yaml`, `.yml` and `.json` file under the folder (recursively; names starting
//! with `.` are skipped, which also skips editor swap files and Kubernetes ConfigMap
//! mount internals) is parsed as a whole. A file that fails to parse or validate is
//! reported with its line and field, and the objects of its last good version stay in
//! force; other files are unaffected. A change becomes a new model version within the
//! debounce period after the last write (100 ms by default), driven by inotify, with a
//! periodic full rescan as a safety net for missed events.
//!
//! The same object (kind, namespace, name) defined in two files is a conflict: the file
//! that sorts first by path wins and the conflict is reported until resolved.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::model::parse::{ManifestError, parse_file};
use crate::model::{Change, Model, Object, ObjectRef};

/// Files larger than this are refused (a manifest folder is text written by people and
/// tools; a huge file is a mistake or an attack).
pub const MAX_FILE_BYTES: u64 = 32 << 20;

#[derive(Debug, Clone)]
pub struct FileSourceOptions {
    pub dir: PathBuf,
    /// Quiet time after the last file event before rescanning.
    pub debounce: Duration,
    /// Full rescan interval even without events.
    pub resync: Duration,
}

impl FileSourceOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            debounce: Duration::from_millis(100),
            resync: Duration::from_secs(10),
        }
    }
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("manifest folder {path}: {source}; create it or pass another --manifests folder")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("manifest folder {0} is not a directory")]
    NotDir(PathBuf),
}

/// Where the control plane's model comes from: the manifest folder ([`FileSource`]) or
/// a cluster's API server (the `ambit-kube` crate). Everything downstream (translation,
/// discovery, the CA) reads only this.
pub trait Source: Send + Sync {
    /// The model: a new version on every change. The version current when the source is
    /// handed to the control plane is complete (every kind read once), never a partial
    /// view a proxy could mistake for the whole mesh.
    fn model(&self) -> watch::Receiver<Arc<Model>>;
    /// What the source says about itself (errors, counts), for readiness and metrics.
    fn status(&self) -> watch::Receiver<Arc<SourceStatus>>;
}

impl Source for FileSource {
    fn model(&self) -> watch::Receiver<Arc<Model>> {
        FileSource::model(self)
    }

    fn status(&self) -> watch::Receiver<Arc<SourceStatus>> {
        FileSource::status(self)
    }
}

/// What the source reports about itself (the admin endpoint and metrics read this).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStatus {
    /// Where the model comes from: the manifest folder, or `kubernetes <API server URL>`.
    pub dir: String,
    /// Manifest files found (for a cluster: objects read).
    pub files: usize,
    /// Files currently refused, with every error; their last good objects are in force.
    /// For a cluster, each refused object is one entry named `<Kind> <namespace>/<name>`.
    pub file_errors: Vec<FileErrors>,
    /// Objects defined in more than one file.
    pub conflicts: Vec<String>,
    /// Documents skipped because Ambit does not model their kind.
    pub ignored: Vec<String>,
    /// The model generation last published.
    pub generation: u64,
    /// Rescans that changed nothing, changed the model, or found errors.
    pub rescans: u64,
    /// Set while the reader is failing (it panicked: the message); the last good model
    /// stays in force and the control plane is not ready.
    pub failing: Option<String>,
    /// Times the reader panicked and was restarted.
    pub panics: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileErrors {
    /// Path relative to the manifest folder.
    pub file: String,
    pub errors: Vec<FileError>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum FileError {
    Manifest(ManifestError),
    Io { message: String },
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileError::Manifest(e) => e.fmt(f),
            FileError::Io { message } => f.write_str(message),
        }
    }
}

/// A running file source.
#[derive(Debug)]
pub struct FileSource {
    model: watch::Receiver<Arc<Model>>,
    status: watch::Receiver<Arc<SourceStatus>>,
    task: tokio::task::JoinHandle<()>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Drop for FileSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FileSource {
    /// Reads the folder once (so start-up reports every error before serving), then
    /// watches it in the background.
    pub async fn start(options: FileSourceOptions) -> Result<Self, SourceError> {
        let meta = std::fs::metadata(&options.dir).map_err(|source| SourceError::Dir {
            path: options.dir.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(SourceError::NotDir(options.dir.clone()));
        }
        let mut state = State::new(options.dir.clone());
        let state = tokio::task::spawn_blocking(move || {
            state.rescan();
            state
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));

        let (model_tx, model_rx) = watch::channel(state.model.clone());
        let (status_tx, status_rx) = watch::channel(Arc::new(state.status()));

        let (event_tx, event_rx) = mpsc::unbounded_channel::<()>();
        let watcher = start_watcher(&options.dir, event_tx);
        let poll_only = watcher.is_none();
        let task = tokio::spawn(run(
            state, options, event_rx, poll_only, model_tx, status_tx,
        ));
        Ok(Self {
            model: model_rx,
            status: status_rx,
            task,
            _watcher: watcher,
        })
    }

    /// The current model; `changed()` on the receiver wakes on each new version.
    pub fn model(&self) -> watch::Receiver<Arc<Model>> {
        self.model.clone()
    }

    pub fn status(&self) -> watch::Receiver<Arc<SourceStatus>> {
        self.status.clone()
    }
}

/// Whether an inotify event can mean new content: files created, written, renamed or
/// removed (a file closed after writing counts); opening and reading do not.
fn changes_content(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        notify::EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        notify::EventKind::Access(_) => false,
        _ => true,
    }
}

fn start_watcher(
    dir: &Path,
    events: mpsc::UnboundedSender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let handler = move |res: notify::Result<notify::Event>| {
        // Reads are not changes: the rescan reads every changed file, and reacting to
        // those reads would rescan the folder over and over while nothing changes.
        if let Ok(event) = res
            && changes_content(&event.kind)
        {
            let _ = events.send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the manifest folder; polling every 500 ms instead");
            return None;
        }
    };
    if let Err(e) = watcher.watch(dir, notify::RecursiveMode::Recursive) {
        tracing::warn!(
            error = %e,
            dir = %dir.display(),
            "cannot watch the manifest folder (inotify limits? see /proc/sys/fs/inotify); polling every 500 ms instead"
        );
        return None;
    }
    Some(watcher)
}

async fn run(
    mut state: State,
    options: FileSourceOptions,
    mut events: mpsc::UnboundedReceiver<()>,
    poll_only: bool,
    model_tx: watch::Sender<Arc<Model>>,
    status_tx: watch::Sender<Arc<SourceStatus>>,
) {
    let resync = if poll_only {
        Duration::from_millis(500)
    } else {
        options.resync
    };
    let (mut panics, mut failures, mut retry) = (0u64, 0u32, false);
    loop {
        if std::mem::take(&mut retry) {
            // Straight to the next rescan.
        } else {
            tokio::select! {
            got = events.recv() => {
                if got.is_none() {
                    // The watcher is gone: keep going on the timer alone.
                    tokio::time::sleep(resync).await;
                } else {
                    // Debounce: wait until the folder has been quiet for a moment.
                    while let Ok(Some(())) =
                        tokio::time::timeout(options.debounce, events.recv()).await
                    {}
                }
            }
            _ = tokio::time::sleep(resync) => {}
            }
        }
        let published = state.model.generation;
        let (dir, last_good, rescans) = (state.dir.clone(), state.model.clone(), state.rescans);
        match tokio::task::spawn_blocking(move || {
            state.rescan();
            state
        })
        .await
        {
            Ok(s) => {
                state = s;
                if state.model.generation != published {
                    model_tx.send_replace(state.model.clone());
                }
                failures = 0;
                let mut status = state.status();
                status.panics = panics;
                status_tx.send_replace(Arc::new(status));
            }
            Err(e) => {
                // Never a silently frozen control plane: say so, stay not ready, keep the
                // last good model in force, and start again from it.
                let message = panic_message(e);
                panics += 1;
                failures += 1;
                tracing::error!(panic = %message, panics, "the manifest reader failed; the last good model stays in force and the control plane is not ready until a rescan succeeds");
                state = State::recovered(dir, last_good, rescans + 1);
                let mut status = state.status();
                status.failing = Some(message);
                status.panics = panics;
                status_tx.send_replace(Arc::new(status));
                // Retry soon (1 s doubling to the resync period), without waiting for a
                // change on disk.
                let delay =
                    (Duration::from_secs(1) * 2u32.saturating_pow(failures.min(5) - 1)).min(resync);
                tokio::time::sleep(delay).await;
                retry = true;
            }
        }
    }
}

/// Everything the source knows, owned by one task (no locks).
struct State {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    model: Arc<Model>,
    conflicts: Vec<String>,
    rescans: u64,
}

/// Cheap change detection: size, modification time (seconds, nanoseconds), inode.
type Stamp = (u64, i64, i64, u64);

struct FileState {
    stamp: Stamp,
    /// The objects of the last version that parsed; in force even while the file is bad.
    objects: Vec<Object>,
    /// The line each object starts on, in the order of `objects`.
    lines: Vec<u64>,
    ignored: Vec<String>,
    errors: Vec<FileError>,
}

impl State {
    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: BTreeMap::new(),
            model: Arc::new(Model::default()),
            conflicts: Vec::new(),
            rescans: 0,
        }
    }

    /// Reads what changed on disk and rebuilds the model if needed.
    fn rescan(&mut self) {
        self.rescans += 1;
        // Fault injection for the recovery test: a marker file makes the reader panic.
        #[cfg(test)]
        if self.dir.join(".panic").exists() {
            panic!("injected by the test");
        }
        let found = match list_manifest_files(&self.dir) {
            Ok(found) => found,
            Err(e) => {
                // A folder that cannot be read keeps the last state rather than emptying
                // the mesh.
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot read the manifest folder; keeping the current model");
                return;
            }
        };
        let mut changed = false;
        let present: HashSet<&PathBuf> = found.iter().map(|(p, _)| p).collect();
        let before = self.files.len();
        self.files.retain(|path, _| {
            let keep = present.contains(path);
            if !keep {
                tracing::info!(file = %path.display(), "manifest file removed");
            }
            keep
        });
        changed |= self.files.len() != before;

        for (path, stamp) in &found {
            if self.files.get(path).is_some_and(|f| f.stamp == *stamp) {
                continue;
            }
            changed = true;
            let rel = relative(&self.dir, path);
            let previous = self.files.remove(path);
            let (objects, lines, ignored, errors) = match read_and_parse(path) {
                Ok(parsed) => {
                    tracing::info!(file = %rel, objects = parsed.objects.len(), ignored = parsed.ignored.len(), "manifest file loaded");
                    (parsed.objects, parsed.lines, parsed.ignored, Vec::new())
                }
                Err(errors) => {
                    let kept = previous.as_ref().map_or(0, |p| p.objects.len());
                    for e in &errors {
                        match e {
                            FileError::Manifest(m) => tracing::warn!(
                                file = %rel,
                                line = m.line,
                                column = m.column,
                                field = m.field.as_deref().unwrap_or(""),
                                error = %m.message,
                                kept_objects = kept,
                                "manifest file refused; its last good version stays in force"
                            ),
                            FileError::Io { message } => tracing::warn!(
                                file = %rel,
                                error = %message,
                                kept_objects = kept,
                                "manifest file unreadable; its last good version stays in force"
                            ),
                        }
                    }
                    let (objects, lines, ignored) = previous
                        .map(|p| (p.objects, p.lines, p.ignored))
                        .unwrap_or_default();
                    (objects, lines, ignored, errors)
                }
            };
            self.files.insert(
                path.clone(),
                FileState {
                    stamp: *stamp,
                    objects,
                    lines,
                    ignored,
                    errors,
                },
            );
        }
        if changed {
            self.rebuild();
        }
    }

    /// Merges every file's objects into a new model; publishes only if something differs.
    fn rebuild(&mut self) {
        let mut merged: BTreeMap<ObjectRef, (&Path, u64, &Object)> = BTreeMap::new();
        let mut conflicts = Vec::new();
        for (path, file) in &self.files {
            for (i, object) in file.objects.iter().enumerate() {
                let key = object.key();
                let line = file.lines.get(i).copied().unwrap_or(0);
                if let Some((first, first_line, _)) = merged.get(&key) {
                    conflicts.push(if *first == path.as_path() {
                        format!(
                            "{key} is defined twice in {} (lines {first_line} and {line}); the first is used",
                            relative(&self.dir, first),
                        )
                    } else {
                        format!(
                            "{key} is defined in {} line {first_line} and in {} line {line}; the one in {} is used",
                            relative(&self.dir, first),
                            relative(&self.dir, path),
                            relative(&self.dir, first),
                        )
                    });
                    continue;
                }
                merged.insert(key, (path, line, object));
            }
        }
        for c in &conflicts {
            if !self.conflicts.contains(c) {
                tracing::warn!(conflict = %c, "manifest conflict");
            }
        }
        self.conflicts = conflicts;
        let candidate = Model::from_objects(
            self.model.generation + 1,
            merged.into_values().map(|(_, _, o)| o.clone()),
        );
        let changes = candidate.diff(&self.model);
        if changes.is_empty() {
            return;
        }
        let count = |f: fn(&Change) -> bool| changes.iter().filter(|c| f(c)).count();
        tracing::info!(
            generation = candidate.generation,
            added = count(|c| matches!(c, Change::Added(_))),
            updated = count(|c| matches!(c, Change::Updated(_))),
            removed = count(|c| matches!(c, Change::Removed(_))),
            objects = candidate.len(),
            "model updated"
        );
        self.model = Arc::new(candidate);
    }

    fn status(&self) -> SourceStatus {
        SourceStatus {
            dir: self.dir.display().to_string(),
            files: self.files.len(),
            file_errors: self
                .files
                .iter()
                .filter(|(_, f)| !f.errors.is_empty())
                .map(|(p, f)| FileErrors {
                    file: relative(&self.dir, p),
                    errors: f.errors.clone(),
                })
                .collect(),
            conflicts: self.conflicts.clone(),
            ignored: self
                .files
                .iter()
                .flat_map(|(p, f)| {
                    f.ignored
                        .iter()
                        .map(move |i| format!("{}: {i}", relative(&self.dir, p)))
                })
                .collect(),
            generation: self.model.generation,
            rescans: self.rescans,
            failing: None,
            panics: 0,
        }
    }

    /// A fresh reader that starts from `model` (the last good one): it knows no files,
    /// so its next rescan reads them all again and publishes only real changes.
    fn recovered(dir: PathBuf, model: Arc<Model>, rescans: u64) -> Self {
        Self {
            model,
            rescans,
            ..Self::new(dir)
        }
    }
}

/// The message of a panic, for logs and status.
pub fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic without a message".to_owned()),
        Err(e) => e.to_string(),
    }
}

fn relative(dir: &Path, path: &Path) -> String {
    path.strip_prefix(dir).unwrap_or(path).display().to_string()
}

fn read_and_parse(path: &Path) -> Result<crate::model::parse::ParsedFile, Vec<FileError>> {
    let io = |message: String| vec![FileError::Io { message }];
    let bytes = std::fs::read(path).map_err(|e| io(format!("cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(io(format!(
            "{} bytes is more than the {MAX_FILE_BYTES}-byte limit for one manifest file; split it",
            bytes.len()
        )));
    }
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        io(format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    parse_file(text).map_err(|errors| errors.into_iter().map(FileError::Manifest).collect())
}

/// Every manifest file under `dir`, sorted by path (the order in which the first
/// definition of an object wins).
pub fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    Ok(list_manifest_files(dir)?
        .into_iter()
        .map(|(p, _)| p)
        .collect())
}

/// Every manifest file under `dir` with its change stamp, sorted by path.
fn list_manifest_files(dir: &Path) -> std::io::Result<Vec<(PathBuf, Stamp)>> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        let entries = match std::fs::read_dir(&current) {
            Ok(entries) => entries,
            // The root must be readable; a subfolder that vanished mid-scan is skipped.
            Err(e) if current == dir => return Err(e),
            Err(_) => continue,
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            let file_type = entry.file_type()?;
            if file_type.is_dir() {
                // Real directories only: symlinked directories could form cycles.
                pending.push(path);
                continue;
            }
            let is_manifest = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            );
            if !is_manifest {
                continue;
            }
            // Follow file symlinks (ConfigMap mounts are symlinks into a hidden folder).
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            out.push((
                path,
                (meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ino()),
            ));
        }
    }
    out.sort();
    Ok(out)
}

/// Parses a folder once, without watching: `ambit control validate`.
pub fn validate_dir(dir: &Path) -> Result<(Arc<Model>, SourceStatus), SourceError> {
    let meta = std::fs::metadata(dir).map_err(|source| SourceError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(SourceError::NotDir(dir.to_owned()));
    }
    let mut state = State::new(dir.to_owned());
    state.rescan();
    let status = state.status();
    Ok((state.model, status))
}

#[cfg(test)]
mod tests;
