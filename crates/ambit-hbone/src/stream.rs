//! The byte stream of one CONNECT, and the copy loop between it and a socket.
//!
//! [`H2Stream`] is an `AsyncRead + AsyncWrite` over the HTTP/2 stream: reads return the
//! DATA the peer sent (returning its flow-control credit once the bytes are handed over),
//! `shutdown` sends END_STREAM (a half-close, like TCP's FIN), and an RST_STREAM from the
//! peer surfaces as `ConnectionReset`.
//!
//! [`copy_bidirectional`] moves bytes both ways between a socket and a stream without
//! copying them through an intermediate buffer: reads from the socket land in a buffer
//! that becomes the DATA frame. Reads start small and double while they fill the buffer,
//! up to a bound, so idle connections stay cheap and busy ones move large frames; the
//! buffers are reused once HTTP/2 has written their data, so the steady state allocates
//! nothing per chunk.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::client::StreamGuard;

/// First read size of the copy loop.
pub const INITIAL_COPY_BUFFER: usize = 16 * 1024;
/// The copy buffer never grows past this (bounds memory per connection).
pub const MAX_COPY_BUFFER: usize = 256 * 1024;
/// Buffers a stream cycles through when sending. A chunk handed to HTTP/2 is held until
/// the connection writes it out; with this many buffers one is free again by the time it
/// is needed (the stream's send buffer holds at most 1 MiB), so sending does not
/// allocate once the buffers have grown to size.
const SEND_BUFFERS: usize = 8;

/// Reusable send buffers: each chunk is carved from a buffer whose earlier chunks have
/// all been released, so steady-state sending allocates nothing.
#[derive(Default)]
struct BufRing {
    bufs: Vec<BytesMut>,
    next: usize,
}

impl BufRing {
    /// A buffer with room for `n` more bytes, reusing memory whenever possible.
    fn get(&mut self, n: usize) -> &mut BytesMut {
        let count = self.bufs.len();
        for i in 0..count {
            let idx = (self.next + i) % count;
            if self.bufs[idx].try_reclaim(n) {
                self.next = (idx + 1) % count;
                return &mut self.bufs[idx];
            }
        }
        // None is free and big enough: add a buffer, or replace the next one in turn
        // (its earlier chunks keep their own memory until released).
        let idx = if count < SEND_BUFFERS {
            self.bufs.push(BytesMut::new());
            count
        } else {
            self.next
        };
        self.bufs[idx] = BytesMut::with_capacity(n.max(INITIAL_COPY_BUFFER));
        self.next = (idx + 1) % self.bufs.len();
        &mut self.bufs[idx]
    }

    /// Lets go of every buffer (chunks already handed to HTTP/2 keep their memory until
    /// sent), so an idle stream holds no copy buffer.
    fn release(&mut self) {
        self.bufs.clear();
        self.next = 0;
    }
}

/// One CONNECT stream as a byte stream.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Data received and not yet read.
    read_buf: Bytes,
    recv_done: bool,
    /// Where `poll_write` copies data before handing it to HTTP/2.
    write_bufs: BufRing,
    send_done: bool,
    /// Client streams count against their pooled connection until dropped.
    _guard: Option<StreamGuard>,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream")
            .field("stream_id", &self.send.stream_id().as_u32())
            .finish_non_exhaustive()
    }
}

impl H2Stream {
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        guard: Option<StreamGuard>,
    ) -> Self {
        Self {
            send,
            recv,
            read_buf: Bytes::new(),
            recv_done: false,
            write_bufs: BufRing::default(),
            send_done: false,
            _guard: guard,
        }
    }

    /// Aborts the stream: the peer sees RST_STREAM(CANCEL).
    pub fn reset(mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }
}

/// Maps an HTTP/2 error to the I/O error a socket would give for the same event.
pub fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    let kind = if e.is_reset() {
        io::ErrorKind::ConnectionReset
    } else if e.is_go_away() {
        io::ErrorKind::ConnectionAborted
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

/// Waits until the stream may send at least one byte; returns how many it may send.
fn poll_send_capacity(
    send: &mut SendStream<Bytes>,
    want: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    loop {
        let have = send.capacity();
        if have > 0 {
            return Poll::Ready(Ok(have));
        }
        send.reserve_capacity(want);
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.read_buf.is_empty() {
                let n = this.read_buf.len().min(buf.remaining());
                buf.put_slice(&this.read_buf[..n]);
                this.read_buf.advance(n);
                this.recv
                    .flow_control()
                    .release_capacity(n)
                    .map_err(h2_to_io)?;
                return Poll::Ready(Ok(()));
            }
            if this.recv_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(chunk)) => this.read_buf = chunk,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => this.recv_done = true,
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        if this.send_done {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let cap = ready!(poll_send_capacity(
            &mut this.send,
            buf.len().min(MAX_COPY_BUFFER),
            cx
        ))?;
        let n = cap.min(buf.len());
        let staging = this.write_bufs.get(n);
        staging.extend_from_slice(&buf[..n]);
        let chunk = staging.split().freeze();
        this.send.send_data(chunk, false).map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Frames go out as the connection task writes them; nothing is held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.send_done {
            this.send_done = true;
            this.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Bytes moved by [`copy_bidirectional`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// From the socket into the tunnel.
    pub sent: u64,
    /// From the tunnel to the socket.
    pub received: u64,
}

/// How a copy ended badly. A clean end is both directions half-closed in turn.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Reading the socket failed (e.g. the application reset it); the stream was reset.
    #[error("reading the local connection failed: {0}")]
    LocalRead(io::Error),
    /// Writing the socket failed; the stream was reset.
    #[error("writing the local connection failed: {0}")]
    LocalWrite(io::Error),
    /// The tunnel failed: the peer reset the stream or the connection was lost. The caller
    /// should reset the socket too (SO_LINGER 0) so the application sees a reset.
    #[error("the tunnel failed: {0}")]
    Tunnel(io::Error),
    /// The caller's stop signal fired (for example, a policy now denies the
    /// connection); the stream was reset.
    #[error("closed: {0}")]
    Stopped(String),
}

impl CopyError {
    /// Whether the far side reset the stream (as opposed to the connection dying).
    pub fn is_peer_reset(&self) -> bool {
        matches!(self, CopyError::Tunnel(e) if e.kind() == io::ErrorKind::ConnectionReset)
    }

    /// Whether an end reset its connection: the local application (its socket reset or
    /// gone), or the far end (its stream reset, which is how the far proxy passes on its
    /// application's reset). Load generators and many clients close that way when done:
    /// an ordinary end of the connection, not a failure of the mesh. The reset itself is
    /// still passed on.
    pub fn is_reset_by_an_end(&self) -> bool {
        match self {
            CopyError::LocalRead(e) | CopyError::LocalWrite(e) => is_reset(e),
            CopyError::Tunnel(_) => self.is_peer_reset(),
            CopyError::Stopped(_) => false,
        }
    }
}

/// A socket error meaning the other end reset or abandoned the connection.
pub fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

/// Copies both ways between a socket (as its two halves) and a stream until both
/// directions have ended. EOF on the socket becomes END_STREAM; END_STREAM from the peer
/// becomes a shutdown of the socket's write half. A failure on either side stops both
/// and resets the stream. Byte counts are returned whatever happened.
pub async fn copy_bidirectional<R, W>(
    reader: R,
    writer: W,
    stream: H2Stream,
) -> (CopyStats, Result<(), CopyError>)
where
    R: AsyncRead + AsRef<TcpStream> + Unpin,
    W: AsyncWrite + Unpin,
{
    copy_bidirectional_until(reader, writer, stream, std::future::pending()).await
}

/// Watches what a copy moves, for observers such as request metrics: shown every chunk
/// in order, after it was read and before it is written on. It can neither change nor
/// hold back a byte, and must not block.
pub trait Tap {
    /// Bytes read from the socket, on their way into the tunnel.
    fn read_socket(&self, bytes: &[u8]);
    /// Bytes from the tunnel, on their way to the socket.
    fn write_socket(&self, bytes: &[u8]);
    /// The socket's sender finished (EOF).
    fn socket_closed(&self) {}
    /// The tunnel's sender finished (END_STREAM).
    fn tunnel_closed(&self) {}
}

/// No observer.
impl Tap for () {
    fn read_socket(&self, _: &[u8]) {}
    fn write_socket(&self, _: &[u8]) {}
}

/// An observer for some connections only.
impl<T: Tap> Tap for Option<T> {
    fn read_socket(&self, bytes: &[u8]) {
        if let Some(t) = self {
            t.read_socket(bytes);
        }
    }
    fn write_socket(&self, bytes: &[u8]) {
        if let Some(t) = self {
            t.write_socket(bytes);
        }
    }
    fn socket_closed(&self) {
        if let Some(t) = self {
            t.socket_closed();
        }
    }
    fn tunnel_closed(&self) {
        if let Some(t) = self {
            t.tunnel_closed();
        }
    }
}

/// [`copy_bidirectional`] that also ends, with [`CopyError::Stopped`] and a reset
/// stream, when `stop` completes (with the reason).
pub async fn copy_bidirectional_until<R, W>(
    reader: R,
    writer: W,
    stream: H2Stream,
    stop: impl std::future::Future<Output = String>,
) -> (CopyStats, Result<(), CopyError>)
where
    R: AsyncRead + AsRef<TcpStream> + Unpin,
    W: AsyncWrite + Unpin,
{
    copy_bidirectional_tapped(reader, writer, stream, stop, &()).await
}

/// [`copy_bidirectional_until`] that shows every chunk to `tap`.
pub async fn copy_bidirectional_tapped<R, W>(
    mut reader: R,
    mut writer: W,
    stream: H2Stream,
    stop: impl std::future::Future<Output = String>,
    tap: &impl Tap,
) -> (CopyStats, Result<(), CopyError>)
where
    R: AsyncRead + AsRef<TcpStream> + Unpin,
    W: AsyncWrite + Unpin,
{
    let H2Stream {
        mut send,
        mut recv,
        read_buf,
        _guard,
        ..
    } = stream;
    let mut stats = CopyStats::default();
    let sent = &mut stats.sent;
    let received = &mut stats.received;

    let upstream = async {
        let mut ring = BufRing::default();
        let mut target = INITIAL_COPY_BUFFER;
        loop {
            // Wait until the socket is readable (data, EOF or an error) before taking a
            // buffer, so an idle stream holds none. Readiness costs no system call.
            let mut released = false;
            poll_fn(|cx| match reader.as_ref().poll_read_ready(cx) {
                Poll::Pending => {
                    if !released {
                        ring.release();
                        released = true;
                    }
                    Poll::Pending
                }
                ready => ready,
            })
            .await
            .map_err(CopyError::LocalRead)?;
            let buf = ring.get(target);
            let n = reader
                .read_buf(&mut buf.limit(target))
                .await
                .map_err(CopyError::LocalRead)?;
            if n == 0 {
                tap.socket_closed();
                send.send_data(Bytes::new(), true)
                    .map_err(|e| CopyError::Tunnel(h2_to_io(e)))?;
                return Ok(());
            }
            if n == target && target < MAX_COPY_BUFFER {
                target *= 2;
            }
            let mut chunk = buf.split().freeze();
            tap.read_socket(&chunk);
            while !chunk.is_empty() {
                let cap = poll_fn(|cx| poll_send_capacity(&mut send, chunk.len(), cx))
                    .await
                    .map_err(CopyError::Tunnel)?;
                let part = chunk.split_to(cap.min(chunk.len()));
                send.send_data(part, false)
                    .map_err(|e| CopyError::Tunnel(h2_to_io(e)))?;
            }
            *sent += n as u64;
        }
    };

    let downstream = async {
        if !read_buf.is_empty() {
            let n = read_buf.len();
            tap.write_socket(&read_buf);
            writer
                .write_all(&read_buf)
                .await
                .map_err(CopyError::LocalWrite)?;
            recv.flow_control()
                .release_capacity(n)
                .map_err(|e| CopyError::Tunnel(h2_to_io(e)))?;
            *received += n as u64;
        }
        loop {
            match recv.data().await {
                Some(Ok(chunk)) => {
                    let n = chunk.len();
                    tap.write_socket(&chunk);
                    writer
                        .write_all(&chunk)
                        .await
                        .map_err(CopyError::LocalWrite)?;
                    recv.flow_control()
                        .release_capacity(n)
                        .map_err(|e| CopyError::Tunnel(h2_to_io(e)))?;
                    *received += n as u64;
                }
                Some(Err(e)) => return Err(CopyError::Tunnel(h2_to_io(e))),
                None => {
                    tap.tunnel_closed();
                    // The peer finished sending: pass the half-close on. A socket whose
                    // peer already went away may refuse; that is not a failure of the copy.
                    let _ = writer.shutdown().await;
                    return Ok(());
                }
            }
        }
    };

    let copy = async { tokio::try_join!(upstream, downstream).map(|_| ()) };
    let result = tokio::select! {
        r = copy => r,
        reason = stop => Err(CopyError::Stopped(reason)),
    };
    if result.is_err() {
        send.send_reset(h2::Reason::CANCEL);
    }
    (stats, result)
}
