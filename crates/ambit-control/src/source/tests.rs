use std::fs;
use std::time::Instant;

use super::*;
use crate::model::Kind;

fn pod(name: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo}}\nspec: {{nodeName: {node}, serviceAccountName: sa-{name}}}\nstatus: {{podIP: {ip}}}\n"
    )
}

fn names(model: &Model, kind: Kind) -> Vec<String> {
    model.of_kind(kind).map(|o| o.key().name).collect()
}

/// Waits for the next model version, failing the test after `limit`.
async fn next_model(
    rx: &mut watch::Receiver<Arc<Model>>,
    limit: Duration,
) -> (Arc<Model>, Duration) {
    let start = Instant::now();
    tokio::time::timeout(limit, rx.changed())
        .await
        .unwrap_or_else(|_| panic!("no new model within {limit:?}"))
        .unwrap();
    (rx.borrow_and_update().clone(), start.elapsed())
}

async fn wait_for_status(
    rx: &mut watch::Receiver<Arc<SourceStatus>>,
    what: &str,
    f: impl Fn(&SourceStatus) -> bool,
) -> Arc<SourceStatus> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        {
            let s = rx.borrow_and_update().clone();
            if f(&s) {
                return s;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, rx.changed()).await.is_err() {
            panic!("status never reached: {what}; last: {:?}", rx.borrow());
        }
    }
}

#[tokio::test]
async fn loads_the_folder_and_follows_edits_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.yaml"), pod("a", "n1", "198.18.0.1")).unwrap();
    fs::create_dir(dir.path().join("sub")).unwrap();
    fs::write(dir.path().join("sub/b.yml"), pod("b", "n1", "198.18.0.2")).unwrap();
    fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
    fs::write(
        dir.path().join(".hidden.yaml"),
        pod("hidden", "n1", "198.18.0.3"),
    )
    .unwrap();

    let source = FileSource::start(FileSourceOptions::new(dir.path()))
        .await
        .unwrap();
    let mut models = source.model();
    let model = models.borrow_and_update().clone();
    assert_eq!(names(&model, Kind::Pod), ["a", "b"]);
    assert_eq!(source.status().borrow().files, 2);

    // Edit: pod a moves to node n2.
    fs::write(dir.path().join("a.yaml"), pod("a", "n2", "198.18.0.1")).unwrap();
    let (model, took) = next_model(&mut models, Duration::from_secs(1)).await;
    assert_eq!(model.pods_on_node("n2").count(), 1, "after {took:?}");

    // New file.
    fs::write(dir.path().join("c.yaml"), pod("c", "n1", "198.18.0.4")).unwrap();
    let (model, _) = next_model(&mut models, Duration::from_secs(1)).await;
    assert_eq!(names(&model, Kind::Pod), ["a", "b", "c"]);

    // Deleted file.
    fs::remove_file(dir.path().join("sub/b.yml")).unwrap();
    let (model, _) = next_model(&mut models, Duration::from_secs(1)).await;
    assert_eq!(names(&model, Kind::Pod), ["a", "c"]);
}

#[tokio::test]
async fn a_broken_file_keeps_its_last_good_version_and_reports_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = format!(
        "{}---\n{}",
        pod("a", "n1", "198.18.0.1"),
        pod("b", "n1", "198.18.0.2")
    );
    fs::write(dir.path().join("pods.yaml"), &good).unwrap();
    fs::write(dir.path().join("other.yaml"), pod("c", "n1", "198.18.0.3")).unwrap();
    let source = FileSource::start(FileSourceOptions::new(dir.path()))
        .await
        .unwrap();
    let mut models = source.model();
    let mut status = source.status();
    let generation = models.borrow_and_update().generation;

    // Break the second document: a bad IP on line 11 (5 lines, the marker, 5 lines).
    let broken = good.replace("198.18.0.2", "198.18.0.999");
    fs::write(dir.path().join("pods.yaml"), broken).unwrap();
    let s = wait_for_status(&mut status, "an error for pods.yaml", |s| {
        !s.file_errors.is_empty()
    })
    .await;
    assert_eq!(s.file_errors[0].file, "pods.yaml");
    let FileError::Manifest(e) = &s.file_errors[0].errors[0] else {
        panic!("{s:?}")
    };
    assert_eq!(e.line, 11);
    assert_eq!(e.field.as_deref(), Some("status.podIP"));
    // Nothing changed in the model: both pods of the last good version, and the other file.
    assert_eq!(models.borrow().generation, generation);
    assert_eq!(names(&models.borrow(), Kind::Pod), ["a", "b", "c"]);

    // Another file still takes effect while pods.yaml is broken.
    fs::write(dir.path().join("other.yaml"), pod("c", "n9", "198.18.0.3")).unwrap();
    let (model, _) = next_model(&mut models, Duration::from_secs(1)).await;
    assert_eq!(model.pods_on_node("n9").count(), 1);
    assert_eq!(
        model.pods_on_node("n1").count(),
        2,
        "a and b still from the last good version"
    );

    // Fixing the file clears the error and applies the fix.
    fs::write(
        dir.path().join("pods.yaml"),
        good.replace("198.18.0.2", "198.18.0.22"),
    )
    .unwrap();
    let (model, _) = next_model(&mut models, Duration::from_secs(1)).await;
    let b = model
        .pods()
        .find(|p| p.metadata.name.as_str() == "b")
        .unwrap();
    assert_eq!(
        b.ips(),
        ["198.18.0.22".parse::<std::net::IpAddr>().unwrap()]
    );
    wait_for_status(&mut status, "errors cleared", |s| s.file_errors.is_empty()).await;
}

#[tokio::test]
async fn a_file_broken_from_the_start_contributes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: x\n",
    )
    .unwrap();
    fs::write(dir.path().join("good.yaml"), pod("a", "n1", "198.18.0.1")).unwrap();
    let source = FileSource::start(FileSourceOptions::new(dir.path()))
        .await
        .unwrap();
    assert_eq!(names(&source.model().borrow(), Kind::Pod), ["a"]);
    let status = source.status().borrow().clone();
    assert_eq!(status.file_errors.len(), 1);
    assert_eq!(status.file_errors[0].file, "bad.yaml");
}

#[tokio::test]
async fn conflicts_resolve_to_the_first_file_and_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("1.yaml"), pod("a", "n1", "198.18.0.1")).unwrap();
    // In 2.yaml the duplicate is the second document, on line 7.
    fs::write(
        dir.path().join("2.yaml"),
        format!(
            "{}---\n{}",
            pod("b", "n2", "198.18.0.2"),
            pod("a", "n2", "198.18.0.1")
        ),
    )
    .unwrap();
    let source = FileSource::start(FileSourceOptions::new(dir.path()))
        .await
        .unwrap();
    assert_eq!(source.model().borrow().pods_on_node("n1").count(), 1);
    let status = source.status().borrow().clone();
    assert_eq!(
        status.conflicts,
        ["Pod demo/a is defined in 1.yaml line 1 and in 2.yaml line 7; the one in 1.yaml is used"]
    );

    // Removing the first definition lets the second take effect.
    let mut models = source.model();
    fs::remove_file(dir.path().join("1.yaml")).unwrap();
    let (model, _) = next_model(&mut models, Duration::from_secs(1)).await;
    assert_eq!(model.pods_on_node("n2").count(), 2);
}

#[tokio::test]
async fn a_duplicate_within_one_file_says_so() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("pods.yaml"),
        format!(
            "{}---\n{}",
            pod("a", "n1", "198.18.0.1"),
            pod("a", "n2", "198.18.0.1")
        ),
    )
    .unwrap();
    let source = FileSource::start(FileSourceOptions::new(dir.path()))
        .await
        .unwrap();
    let status = source.status().borrow().clone();
    assert_eq!(
        status.conflicts,
        ["Pod demo/a is defined twice in pods.yaml (lines 1 and 7); the first is used"]
    );
    assert_eq!(source.model().borrow().pods_on_node("n1").count(), 1);
}

#[tokio::test]
async fn rewriting_the_same_content_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let text = pod("a", "n1", "198.18.0.1");
    fs::write(dir.path().join("a.yaml"), &text).unwrap();
    let source = FileSource::start(FileSourceOptions::new(dir.path()))
        .await
        .unwrap();
    let mut models = source.model();
    models.borrow_and_update();
    let mut status = source.status();
    let rescans = status.borrow_and_update().rescans;
    fs::write(dir.path().join("a.yaml"), format!("# same objects\n{text}")).unwrap();
    wait_for_status(&mut status, "a rescan", |s| s.rescans > rescans).await;
    assert!(!models.has_changed().unwrap(), "no new model version");
}

#[tokio::test]
async fn a_missing_folder_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = FileSource::start(FileSourceOptions::new(dir.path().join("nope")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn validate_dir_reports_without_watching() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.yaml"), pod("a", "n1", "198.18.0.1")).unwrap();
    fs::write(dir.path().join("b.yaml"), "kind: Pod\n").unwrap();
    let (model, status) = validate_dir(dir.path()).unwrap();
    assert_eq!(model.len(), 1);
    assert_eq!(status.file_errors.len(), 1);
}

#[tokio::test]
async fn a_failing_reader_keeps_the_last_model_says_so_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.yaml"), pod("a", "n1", "198.18.0.1")).unwrap();
    let source = FileSource::start(FileSourceOptions::new(dir.path()))
        .await
        .unwrap();
    let mut model = source.model();
    let mut status = source.status();
    let good = model.borrow_and_update().clone();
    // The reader panics (the test's injected fault) on its next rescan.
    fs::write(dir.path().join(".panic"), "").unwrap();
    fs::write(dir.path().join("b.yaml"), pod("b", "n1", "198.18.0.2")).unwrap();
    let failing = wait_for_status(&mut status, "failing", |s| s.failing.is_some()).await;
    assert!(failing.failing.as_deref().unwrap().contains("injected"));
    assert!(failing.panics >= 1);
    assert_eq!(
        model.borrow().generation,
        good.generation,
        "the last good model stays"
    );
    // The fault goes away: the next rescan (retried by itself) reads everything again.
    fs::remove_file(dir.path().join(".panic")).unwrap();
    let recovered = tokio::time::timeout(
        Duration::from_secs(5),
        status.wait_for(|s| s.failing.is_none()),
    )
    .await
    .expect("the reader did not recover")
    .unwrap()
    .clone();
    assert!(recovered.panics >= 1);
    let (m, _) = next_model(&mut model, Duration::from_secs(5)).await;
    assert_eq!(names(&m, Kind::Pod), ["a", "b"]);
}

#[tokio::test]
async fn an_idle_folder_is_not_rescanned() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.yaml"), pod("a", "n1", "198.18.0.1")).unwrap();
    let source = FileSource::start(FileSourceOptions::new(dir.path()))
        .await
        .unwrap();
    // Whatever the start itself caused settles first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = source.status().borrow().rescans;
    // Reading is not changing: the control plane's own rescans, `validate`, a backup or an
    // editor open and read the files; none of it may start a rescan.
    for _ in 0..30 {
        let _ = fs::read(dir.path().join("a.yaml")).unwrap();
        let _ = fs::read_dir(dir.path()).unwrap().count();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = source.status().borrow().rescans;
    assert_eq!(
        after,
        before,
        "the folder was rescanned {} times while nothing changed",
        after - before
    );
    // A real change is still seen at once.
    let mut model = source.model();
    model.borrow_and_update();
    fs::write(dir.path().join("b.yaml"), pod("b", "n1", "198.18.0.2")).unwrap();
    let (m, took) = next_model(&mut model, Duration::from_secs(2)).await;
    assert_eq!(names(&m, Kind::Pod), ["a", "b"]);
    assert!(took < Duration::from_secs(2));
}
