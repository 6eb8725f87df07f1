//! TLS under HTTP/2 that writes to the socket on flush, not on every write.
//!
//! HTTP/2 hands its frames to the transport one `write` at a time and then flushes. Plain
//! `tokio_rustls` encrypts each write and sends it to the socket at once, so a batch of
//! DATA frames for several streams (common on a shared HBONE connection) costs one system
//! call and one TCP segment per frame. [`Batched`] encrypts each write into rustls' send
//! buffer and writes the buffer when HTTP/2 flushes (one `writev` of all pending records)
//! or when the buffer reaches its limit ([`SEND_BUFFER`], which bounds memory per
//! connection). Reads go straight to `tokio_rustls`.

use std::io::{self, IoSlice, Write};
use std::ops::DerefMut;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use rustls::ConnectionCommon;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Encrypted bytes a connection may hold before a write must go to the socket.
pub const SEND_BUFFER: usize = 256 * 1024;

/// A `tokio_rustls` stream: its socket and its TLS state.
pub trait TlsParts: AsyncRead + AsyncWrite + Unpin {
    type Io: AsyncWrite + Unpin;
    type Data;
    fn parts(&mut self) -> (&mut Self::Io, &mut ConnectionCommon<Self::Data>);
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsParts for tokio_rustls::client::TlsStream<IO> {
    type Io = IO;
    type Data = rustls::client::ClientConnectionData;
    fn parts(&mut self) -> (&mut IO, &mut ConnectionCommon<Self::Data>) {
        let (io, conn) = self.get_mut();
        (io, conn.deref_mut())
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsParts for tokio_rustls::server::TlsStream<IO> {
    type Io = IO;
    type Data = rustls::server::ServerConnectionData;
    fn parts(&mut self) -> (&mut IO, &mut ConnectionCommon<Self::Data>) {
        let (io, conn) = self.get_mut();
        (io, conn.deref_mut())
    }
}

/// A TLS stream whose writes reach the socket on flush. See the module docs.
#[derive(Debug)]
pub struct Batched<S> {
    inner: S,
}

impl<S: TlsParts> Batched<S> {
    pub fn new(mut inner: S) -> Self {
        inner.parts().1.set_buffer_limit(Some(SEND_BUFFER));
        Self { inner }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// `io::Write` over an async writer for rustls' `write_tls`: Pending becomes WouldBlock.
struct SyncWriter<'a, 'b, IO> {
    io: &'a mut IO,
    cx: &'a mut Context<'b>,
}

impl<IO: AsyncWrite + Unpin> Write for SyncWriter<'_, '_, IO> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write_vectored(self.cx, bufs) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes pending records to the socket once (one `writev`). Ready(0) means nothing
/// could be written.
fn write_tls<IO: AsyncWrite + Unpin, D>(
    io: &mut IO,
    conn: &mut ConnectionCommon<D>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let mut w = SyncWriter { io, cx };
    match conn.write_tls(&mut w) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
        r => Poll::Ready(r),
    }
}

impl<S: TlsParts> Batched<S> {
    /// Encrypts what fits into the send buffer; when it is full, sends some first.
    fn poll_encrypt(
        &mut self,
        cx: &mut Context<'_>,
        mut encrypt: impl FnMut(&mut ConnectionCommon<S::Data>) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let (io, conn) = self.inner.parts();
        loop {
            let n = encrypt(conn)?;
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            if !conn.wants_write() {
                // Nothing buffered, yet nothing accepted: rustls cannot take data now.
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if ready!(write_tls(io, conn, cx))? == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
        }
    }
}

impl<S: TlsParts> AsyncRead for Batched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: TlsParts> AsyncWrite for Batched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.poll_encrypt(cx, |conn| conn.writer().write(buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        self.poll_encrypt(cx, |conn| conn.writer().write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (io, conn) = self.inner.parts();
        while conn.wants_write() {
            if ready!(write_tls(io, conn, cx))? == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
        }
        Pin::new(io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // tokio_rustls queues close_notify behind what is buffered and writes it all.
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A socket that counts the write calls reaching it.
    struct Counting {
        inner: DuplexStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counting {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    fn configs() -> (rustls::ClientConfig, rustls::ServerConfig) {
        use ambit_tls::testing::TestPki;
        use std::time::Duration;
        let pki = TestPki::new();
        let server_id = TestPki::id("ns", "server");
        let client = pki.issue(&TestPki::id("ns", "client"), Duration::from_secs(3600));
        let server = pki.issue(&server_id, Duration::from_secs(3600));
        let c =
            ambit_tls::spiffe::hbone_client_config(client, &pki.bundle(), vec![server_id]).unwrap();
        let s = ambit_tls::spiffe::hbone_server_config(
            Arc::new(ambit_tls::testing::FixedCert(server)),
            &pki.bundle(),
            &TestPki::trust_domains(),
        )
        .unwrap();
        (c, s)
    }

    /// Many writes, one flush: the records reach the socket together, in order, and the
    /// peer reads every byte back; a write larger than the send buffer still goes
    /// through (sent in parts as the buffer fills).
    #[tokio::test]
    async fn writes_are_batched_until_flush_and_arrive_intact() {
        let (client_config, server_config) = configs();
        let (a, b) = tokio::io::duplex(4 << 20);
        let writes = Arc::new(AtomicUsize::new(0));
        let a = Counting {
            inner: a,
            writes: writes.clone(),
        };
        let server = tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
            let mut tls = acceptor.accept(b).await.unwrap();
            let mut all = Vec::new();
            tls.read_to_end(&mut all).await.unwrap();
            all
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
        let name = rustls::pki_types::ServerName::IpAddress(
            std::net::IpAddr::from([198, 18, 0, 1]).into(),
        );
        let tls = connector.connect(name, a).await.unwrap();
        let mut tls = Batched::new(tls);
        let before = writes.load(Ordering::Relaxed);
        let mut expected = Vec::new();
        for i in 0..20u8 {
            let chunk = vec![i; 1000];
            tls.write_all(&chunk).await.unwrap();
            expected.extend_from_slice(&chunk);
        }
        assert_eq!(
            writes.load(Ordering::Relaxed),
            before,
            "nothing sent before flush"
        );
        tls.flush().await.unwrap();
        assert_eq!(
            writes.load(Ordering::Relaxed),
            before + 1,
            "20 records in one write"
        );
        let big: Vec<u8> = (0..(3 * SEND_BUFFER)).map(|i| (i % 251) as u8).collect();
        tls.write_all(&big).await.unwrap();
        expected.extend_from_slice(&big);
        tls.shutdown().await.unwrap();
        assert_eq!(server.await.unwrap(), expected);
    }
}
