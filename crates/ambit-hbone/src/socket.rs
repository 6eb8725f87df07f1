//! Socket options the node proxy needs: a source address, a firewall mark, and a network
//! namespace to open the socket in.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole
//! life. [`Netns::run`] enters a namespace, runs a short non-blocking closure (creating a
//! socket), and returns to the original namespace before anything else runs on the
//! thread. Binding, connecting and all I/O then happen from the ordinary runtime threads.

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use nix::sched::CloneFlags;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The firewall mark Istio's node proxy puts on its own sockets (redirection skips them).
pub const PROXY_MARK: u32 = 0x539;

/// How to open a socket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct SocketOptions {
    /// Source address to bind before connecting (port chosen by the kernel).
    pub bind: Option<IpAddr>,
    /// SO_MARK (needs CAP_NET_ADMIN).
    pub mark: Option<u32>,
    /// Open the socket in this network namespace (needs CAP_SYS_ADMIN).
    pub netns: Option<Netns>,
    /// IP_TRANSPARENT: bind to an address that is not local (keeping a client's address
    /// as the source of an inbound connection; needs CAP_NET_ADMIN).
    pub transparent: bool,
    /// SO_REUSEPORT on a listener: another listener of the same user may bind the same
    /// address while this one is open, so a new node proxy takes over a pod's ports at
    /// once while the one it replaces still drains.
    pub reuse_port: bool,
}

/// A network namespace, held open by a file descriptor.
#[derive(Clone)]
pub struct Netns {
    inner: Arc<NetnsInner>,
}

struct NetnsInner {
    file: File,
    /// (device, inode) of the namespace: equal for two handles of the same namespace.
    id: (u64, u64),
    name: String,
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Netns({}, inode {})", self.inner.name, self.inner.id.1)
    }
}

impl PartialEq for Netns {
    fn eq(&self, other: &Self) -> bool {
        self.inner.id == other.inner.id
    }
}

impl Eq for Netns {}

impl Hash for Netns {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.inner.id.hash(state);
    }
}

impl Netns {
    /// Opens a namespace by path: `/run/netns/<name>` or `/proc/<pid>/ns/net`.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open network namespace {}: {e}", path.display()),
            )
        })?;
        Self::from_file(file, path.display().to_string())
    }

    /// Takes ownership of an open namespace file descriptor (as the node agent sends).
    /// Anything but a namespace file (the `nsfs` file system) is refused here, rather
    /// than failing later when something tries to enter it.
    pub fn from_file(file: File, name: impl Into<String>) -> io::Result<Self> {
        let fs = nix::sys::statfs::fstatfs(&file).map_err(io::Error::from)?;
        if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the descriptor is not a namespace file (expected /proc/<pid>/ns/net or /run/netns/<name>)",
            ));
        }
        let meta = file.metadata()?;
        Ok(Self {
            inner: Arc::new(NetnsInner {
                file,
                id: (meta.dev(), meta.ino()),
                name: name.into(),
            }),
        })
    }

    /// The namespace this process started in.
    pub fn host() -> io::Result<Self> {
        Ok(original_netns()?.clone())
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Runs `f` inside this namespace on the current thread, then returns to the
    /// process's original namespace. `f` must be short and must not block or await:
    /// nothing else runs on this thread meanwhile.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = original_netns()?;
        if home == self {
            return Ok(f());
        }
        nix::sched::setns(self.inner.file.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|e| io::Error::other(format!("setns into {}: {e}", self.inner.name)))?;
        let out = f();
        if let Err(e) = nix::sched::setns(home.inner.file.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A runtime thread left in a pod's namespace would open later sockets in the
            // wrong place. That must never happen, so stop the process.
            eprintln!(
                "fatal: cannot return to the original network namespace after entering {}: {e}",
                self.inner.name
            );
            std::process::abort();
        }
        Ok(out)
    }
}

/// The namespace of the process at first use, held open for the process's life.
fn original_netns() -> io::Result<&'static Netns> {
    static HOME: OnceLock<Netns> = OnceLock::new();
    if let Some(n) = HOME.get() {
        return Ok(n);
    }
    // Read from the thread's own view: this runs before any setns on this thread.
    let n = Netns::open("/proc/thread-self/ns/net")?;
    Ok(HOME.get_or_init(|| n))
}

impl SocketOptions {
    fn new_socket(&self, domain: Domain) -> io::Result<Socket> {
        let create = || {
            Socket::new(
                domain,
                Type::STREAM.nonblocking().cloexec(),
                Some(Protocol::TCP),
            )
        };
        let socket = match &self.netns {
            Some(ns) => ns.run(create)??,
            None => create()?,
        };
        if let Some(mark) = self.mark {
            socket.set_mark(mark).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("SO_MARK {mark:#x}: {e} (needs CAP_NET_ADMIN)"),
                )
            })?;
        }
        if self.transparent {
            let r = match domain {
                Domain::IPV6 => socket.set_ip_transparent_v6(true),
                _ => socket.set_ip_transparent_v4(true),
            };
            r.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("IP_TRANSPARENT: {e} (needs CAP_NET_ADMIN)"),
                )
            })?;
        }
        socket.set_tcp_nodelay(true)?;
        Ok(socket)
    }
}

fn domain_of(addr: &SocketAddr) -> Domain {
    if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

/// Connects to `dst` with the given options.
pub async fn connect(dst: SocketAddr, opts: &SocketOptions) -> io::Result<TcpStream> {
    let socket = opts.new_socket(domain_of(&dst))?;
    if let Some(ip) = opts.bind {
        socket
            .bind(&SockAddr::from(SocketAddr::new(ip, 0)))
            .map_err(|e| io::Error::new(e.kind(), format!("bind to {ip}: {e}")))?;
    }
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    let stream = socket.connect(dst).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Listens on `addr` with the given options (namespace, mark, transparent).
pub fn listen(addr: SocketAddr, opts: &SocketOptions, backlog: u32) -> io::Result<TcpListener> {
    let socket = opts.new_socket(domain_of(&addr))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // IPv6 only: the IPv4 side has its own listener on the same port.
        socket.set_only_v6(true)?;
    }
    if opts.reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket
        .bind(&SockAddr::from(addr))
        .map_err(|e| io::Error::new(e.kind(), format!("listen on {addr}: {e}")))?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    TcpListener::from_std(std::net::TcpListener::from(socket))
}
