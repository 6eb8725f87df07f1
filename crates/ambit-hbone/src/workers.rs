//! The data path's threads: one single-threaded tokio runtime per thread ("workers"),
//! with connections spread over them as they are accepted.
//!
//! Why not tokio's multi-threaded runtime: its scheduler runs a task woken by the running
//! task next (the "LIFO slot"), so when several tunnelled connections are readable at
//! once, the HTTP/2 connection task they share runs after each of them and writes each
//! DATA frame in its own TLS record and system call. A single-threaded runtime runs woken
//! tasks in order: every ready stream queues its frame first, then the connection task
//! writes them together. A connection and its tasks also stay on one thread, so no event
//! wakes a second thread (an inter-processor interrupt, costly in a VM) and nothing is
//! stolen between threads. Measured with the mesh benchmark (`bench/run`) on 2 cores:
//! proxy CPU per 1,000 requests 47.7 -> 37.9 ms, keep-alive p50 at 1,000 req/s
//! 740 -> 623 µs.
//!
//! A connection accepted on one worker is moved to the worker carrying the fewest
//! connections, the next in turn among equals ([`Workers::dispatch`]): its socket is
//! deregistered from the accepting worker's reactor and registered with the target's, so
//! its readiness events wake only the thread that runs it. Each worker counts the
//! connections it carries (a [`Load`] held for each connection's life); the count also
//! tells housekeeping when a thread is idle (see [`ambit_core::datapath`]).

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The data-path workers. Cheap to clone; clones share the threads. The threads run
/// until [`Workers::shutdown`].
#[derive(Clone)]
pub struct Workers {
    inner: Arc<Inner>,
}

struct Inner {
    handles: Vec<Handle>,
    /// Connections each worker carries.
    loads: Vec<Arc<AtomicUsize>>,
    next: AtomicUsize,
    stops: Mutex<Vec<oneshot::Sender<()>>>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("threads", &self.inner.handles.len())
            .finish_non_exhaustive()
    }
}

impl Workers {
    /// Starts `threads` workers (at least one), threads named `name`.
    pub fn start(threads: usize, name: &str) -> io::Result<Self> {
        let threads = threads.max(1);
        let mut handles = Vec::with_capacity(threads);
        let mut stops = Vec::with_capacity(threads);
        let loads: Vec<Arc<AtomicUsize>> = (0..threads).map(|_| Arc::default()).collect();
        for (i, load) in loads.iter().enumerate() {
            let load = load.clone();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let (tx, rx) = oneshot::channel::<()>();
            stops.push(tx);
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(move || {
                    ambit_core::datapath::enter_data_thread(load);
                    // Runs every task spawned on this worker until told to stop (or the
                    // sender is gone); then the runtime and its remaining tasks are dropped.
                    let _ = rt.block_on(rx);
                    rt.shutdown_background();
                })
                .map_err(|e| {
                    io::Error::new(e.kind(), format!("starting {name} thread {i}: {e}"))
                })?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                handles,
                loads,
                next: AtomicUsize::new(0),
                stops: Mutex::new(stops),
            }),
        })
    }

    pub fn len(&self) -> usize {
        self.inner.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.handles.is_empty()
    }

    /// The first worker: listeners and housekeeping run here.
    pub fn handle(&self) -> &Handle {
        &self.inner.handles[0]
    }

    /// The worker whose turn it is.
    pub fn next(&self) -> &Handle {
        let n = self.inner.handles.len();
        if n == 1 {
            return &self.inner.handles[0];
        }
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % n;
        &self.inner.handles[i]
    }

    /// Connections worker `i` carries now.
    pub fn load(&self, i: usize) -> usize {
        self.inner
            .loads
            .get(i)
            .map_or(0, |l| l.load(Ordering::Relaxed))
    }

    /// The worker carrying the fewest connections; among equals, the next in turn.
    fn least_loaded(&self) -> usize {
        let n = self.inner.handles.len();
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut best = start;
        let mut best_load = self.load(start);
        for k in 1..n {
            let i = (start + k) % n;
            let load = self.load(i);
            if load < best_load {
                (best, best_load) = (i, load);
            }
        }
        best
    }

    /// Picks the worker for an accepted connection: the least loaded. Returns it and
    /// the connection in transit, which counts against that worker until the [`Load`]
    /// [`Moving::arrive`] hands back is dropped (keep it for the connection's life).
    pub fn dispatch(&self, conn: TcpStream) -> io::Result<(&Handle, Moving)> {
        let i = if self.len() == 1 {
            0
        } else {
            self.least_loaded()
        };
        let load = Load::new(self.inner.loads[i].clone());
        let conn = if self.len() == 1 {
            Place::Stay(conn)
        } else {
            Place::Move(conn.into_std()?)
        };
        Ok((&self.inner.handles[i], Moving { conn, load }))
    }

    /// Runs `fut` on the worker whose turn it is.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.next().spawn(fut)
    }

    /// Runs a task made by `make` on every worker (per-thread housekeeping); `make` is
    /// given the worker's index.
    pub fn spawn_each<F>(&self, make: impl Fn(usize) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        for (i, handle) in self.inner.handles.iter().enumerate() {
            handle.spawn(make(i));
        }
    }

    /// Stops every worker: tasks still running are dropped.
    pub fn shutdown(&self) {
        let stops =
            std::mem::take(&mut *self.inner.stops.lock().unwrap_or_else(|p| p.into_inner()));
        for stop in stops {
            let _ = stop.send(());
        }
    }
}

/// An accepted connection on its way to the worker that will run it.
#[derive(Debug)]
pub struct Moving {
    conn: Place,
    load: Load,
}

#[derive(Debug)]
enum Place {
    /// Only one worker: the socket stays registered where it is.
    Stay(TcpStream),
    /// Deregistered from the accepting worker.
    Move(std::net::TcpStream),
}

impl Moving {
    /// The connection, registered with the current worker, and its place in that
    /// worker's count. Call it from a task running on the worker [`Workers::dispatch`]
    /// chose, and keep the [`Load`] as long as the connection.
    pub fn arrive(self) -> io::Result<(TcpStream, Load)> {
        let conn = match self.conn {
            Place::Stay(conn) => conn,
            Place::Move(std) => TcpStream::from_std(std)?,
        };
        Ok((conn, self.load))
    }

    /// Whether the socket stays on the accepting worker (there is only one).
    pub fn stays(&self) -> bool {
        matches!(self.conn, Place::Stay(_))
    }
}

/// One connection counted against its worker, until dropped.
#[derive(Debug)]
pub struct Load(Arc<AtomicUsize>);

impl Load {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Connections accepted on one worker and moved to others still carry their bytes,
    /// and the work really lands on different threads.
    #[test]
    fn dispatched_connections_work_on_their_worker() {
        let workers = Workers::start(3, "test-worker").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let w = workers.clone();
        workers.handle().spawn(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tx.send(addr).unwrap();
            for _ in 0..6 {
                let (conn, _) = listener.accept().await.unwrap();
                let (handle, moving) = w.dispatch(conn).unwrap();
                handle.spawn(async move {
                    let (mut conn, _load) = moving.arrive().unwrap();
                    let mut buf = [0u8; 5];
                    conn.read_exact(&mut buf).await.unwrap();
                    let me = format!("{:?}", std::thread::current().id());
                    conn.write_all(&buf).await.unwrap();
                    conn.write_all(me.as_bytes()).await.unwrap();
                });
            }
        });
        let addr = rx.recv().unwrap();
        let mut threads = std::collections::HashSet::new();
        for i in 0..6u8 {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            use std::io::{Read, Write};
            c.write_all(&[i; 5]).unwrap();
            let mut echo = [0u8; 5];
            c.read_exact(&mut echo).unwrap();
            assert_eq!(echo, [i; 5]);
            let mut who = String::new();
            c.read_to_string(&mut who).unwrap();
            threads.insert(who);
        }
        assert_eq!(
            threads.len(),
            3,
            "round robin over three workers: {threads:?}"
        );
        workers.shutdown();
    }

    #[test]
    fn spawn_each_runs_once_on_every_worker_thread() {
        let workers = Workers::start(3, "test-worker").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        workers.spawn_each(|i| {
            let tx = tx.clone();
            async move {
                tx.send((i, std::thread::current().id())).unwrap();
            }
        });
        let got: Vec<_> = (0..3).map(|_| rx.recv().unwrap()).collect();
        let threads: std::collections::HashSet<_> = got.iter().map(|(_, t)| *t).collect();
        let indexes: std::collections::BTreeSet<_> = got.iter().map(|(i, _)| *i).collect();
        assert_eq!(threads.len(), 3);
        assert_eq!(indexes, [0, 1, 2].into());
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(100))
                .is_err()
        );
        workers.shutdown();
    }

    #[test]
    fn one_worker_keeps_the_socket_registered() {
        let workers = Workers::start(0, "test-worker").unwrap();
        assert_eq!(workers.len(), 1);
        let (tx, rx) = std::sync::mpsc::channel();
        let w = workers.clone();
        workers.handle().spawn(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accept = tokio::spawn(async move { listener.accept().await });
            let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (conn, _) = accept.await.unwrap().unwrap();
            let (_, moving) = w.dispatch(conn).unwrap();
            tx.send(moving.stays()).unwrap();
        });
        assert!(rx.recv().unwrap());
        workers.shutdown();
    }

    /// Each worker counts the connections it carries, for as long as their `Load` lives;
    /// a new connection goes to the least loaded worker, and the workers' threads know
    /// they are on the data path and how much they carry.
    #[test]
    fn connections_go_to_the_least_loaded_worker_and_are_counted() {
        let workers = Workers::start(2, "test-worker").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let w = workers.clone();
        workers.handle().spawn(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut clients = Vec::new();
            let mut seen = Vec::new();
            let mut held = Vec::new();
            for _ in 0..3 {
                clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
                let (conn, _) = listener.accept().await.unwrap();
                let (handle, moving) = w.dispatch(conn).unwrap();
                let (done_tx, done_rx) = tokio::sync::oneshot::channel();
                handle.spawn(async move {
                    let (conn, load) = moving.arrive().unwrap();
                    let facts = (
                        ambit_core::datapath::on_data_thread(),
                        ambit_core::datapath::carried_connections(),
                    );
                    done_tx.send((facts, conn, load)).unwrap();
                });
                let (facts, conn, load) = done_rx.await.unwrap();
                seen.push(facts);
                held.push((conn, load));
            }
            let three = (w.load(0), w.load(1));
            // The fourth goes to the worker with one connection, whatever the turn.
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            let (conn, _) = listener.accept().await.unwrap();
            let (_, moving) = w.dispatch(conn).unwrap();
            let four = (w.load(0), w.load(1));
            drop(moving);
            drop(held);
            tx.send((seen, three, four, (w.load(0), w.load(1))))
                .unwrap();
        });
        let (seen, three, four, end) = rx.recv().unwrap();
        assert!(
            seen.iter().all(|&(data, carried)| data && carried >= 1),
            "{seen:?}"
        );
        assert_eq!(three.0 + three.1, 3);
        assert_eq!(three.0.abs_diff(three.1), 1, "{three:?}");
        assert_eq!(four, (2, 2), "the fourth went to the less loaded worker");
        assert_eq!(end, (0, 0), "dropping the loads empties the counts");
        workers.shutdown();
    }
}
