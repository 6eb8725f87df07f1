use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use ambit_proto::zds::{Ack, WorkloadResponse};

use super::*;

const T: Duration = Duration::from_secs(5);

/// A node proxy stand-in: connects and says hello.
async fn proxy(path: &Path) -> UnixSeqpacket {
    let conn = UnixSeqpacket::connect(path).await.unwrap();
    conn.send(
        &ZdsHello {
            version: Version::V1 as i32,
        }
        .encode_to_vec(),
    )
    .await
    .unwrap();
    conn
}

async fn answer(conn: &UnixSeqpacket, error: &str) -> WorkloadRequest {
    let mut buf = vec![0u8; 4096];
    let info = conn.recv(&mut buf).await.unwrap();
    let request = WorkloadRequest::decode(&buf[..info.bytes_read()]).unwrap();
    let ack = WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack {
            error: error.into(),
        })),
    };
    conn.send(&ack.encode_to_vec()).await.unwrap();
    request
}

#[tokio::test]
async fn the_socket_is_private_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/ztunnel/ztunnel.sock");
    // A permissive umask must not widen the socket's mode.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let listener = ZdsListener::bind(&path, &[0], T);
    nix::sys::stat::umask(old);
    let _listener = listener.unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "socket mode {:o}", meta.mode());
    let parent = std::fs::metadata(path.parent().unwrap()).unwrap();
    assert_eq!(parent.mode() & 0o777, 0o700);

    // An existing directory that is too open is restricted.
    let open_dir = dir.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let _l = ZdsListener::bind(&open_dir.join("z.sock"), &[0], T).unwrap();
    assert_eq!(std::fs::metadata(&open_dir).unwrap().mode() & 0o777, 0o700);

    // A non-root node proxy user: the socket is its (still 0600), the folder passable.
    let shared = dir.path().join("shared/zds.sock");
    let _l = ZdsListener::bind(&shared, &[0, 4242], T).unwrap();
    let meta = std::fs::symlink_metadata(&shared).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (4242, 0o600));
    let parent = std::fs::metadata(shared.parent().unwrap()).unwrap();
    assert_eq!(parent.mode() & 0o777, 0o711);

    // A stale socket file is replaced, a path without a directory is refused.
    drop(_l);
    let _l = ZdsListener::bind(&open_dir.join("z.sock"), &[0], T).unwrap();
    assert!(ZdsListener::bind(Path::new("z.sock"), &[0], T).is_err());
}

#[tokio::test]
async fn a_peer_with_another_uid_is_refused_and_the_next_one_served() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z/zds.sock");
    let me = nix::unistd::geteuid().as_raw();
    // Only a uid this test does not run as is allowed.
    let mut listener = ZdsListener::bind(&path, &[me.wrapping_add(4242)], T).unwrap();
    let _conn = proxy(&path).await;
    let err = listener.accept().await.unwrap_err();
    assert!(
        matches!(err, ZdsError::Peer { uid, .. } if uid == me),
        "{err}"
    );
    assert!(err.to_string().contains("--zds-allowed-uid"), "{err}");

    let mut listener = ZdsListener::bind(&path, &[me], T).unwrap();
    let conn = proxy(&path).await;
    let session = listener.accept().await.unwrap();
    assert_eq!(session.peer_pid(), std::process::id() as i32);
    let netns = std::fs::File::open("/proc/self/ns/net").unwrap();
    let pod = PodRef {
        uid: "Kubernetes//Pod/demo/echo".into(),
        name: "echo".into(),
        namespace: "demo".into(),
        service_account: "echo".into(),
    };
    let (added, request) = tokio::join!(session.add(&pod, netns.as_fd()), answer(&conn, ""));
    added.unwrap();
    assert!(matches!(
        request.payload,
        Some(workload_request::Payload::Add(a)) if a.uid == pod.uid
    ));
    // A refusal carries the proxy's reason.
    let (refused, _) = tokio::join!(session.del("x"), answer(&conn, "no such pod"));
    let err = refused.unwrap_err();
    assert!(err.to_string().contains("no such pod"), "{err}");
}

#[tokio::test]
async fn a_bad_hello_is_refused_and_the_listener_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z/zds.sock");
    let mut listener = ZdsListener::bind(&path, &[nix::unistd::geteuid().as_raw()], T).unwrap();
    let conn = UnixSeqpacket::connect(&path).await.unwrap();
    conn.send(&ZdsHello { version: 7 }.encode_to_vec())
        .await
        .unwrap();
    assert!(matches!(
        listener.accept().await.unwrap_err(),
        ZdsError::Version(7)
    ));
    let conn = UnixSeqpacket::connect(&path).await.unwrap();
    conn.send(&[0xff, 0xff, 0xff]).await.unwrap();
    assert!(matches!(
        listener.accept().await.unwrap_err(),
        ZdsError::Protocol { .. }
    ));
    let _conn = proxy(&path).await;
    listener.accept().await.unwrap();
}

#[tokio::test]
async fn a_silent_proxy_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z/zds.sock");
    let mut listener = ZdsListener::bind(
        &path,
        &[nix::unistd::geteuid().as_raw()],
        Duration::from_millis(200),
    )
    .unwrap();
    let _conn = UnixSeqpacket::connect(&path).await.unwrap();
    assert!(matches!(
        listener.accept().await.unwrap_err(),
        ZdsError::Timeout(_)
    ));
}
