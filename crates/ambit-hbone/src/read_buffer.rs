//! A receive buffer under TLS that costs nothing until it is switched on.
//!
//! rustls asks the socket for about 4 KiB at a time; a 64 KiB buffer under it turns a
//! burst of ciphertext into one system call (see [`crate::TLS_READ_BUFFER`]). An HBONE
//! server must not hand 64 KiB to every anonymous connection that has not finished its
//! handshake, so the buffer is allocated on the first read after [`ReadBuffered::enable`]
//! (called once the peer is authenticated); until then reads go straight to the socket.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// See the module documentation.
#[derive(Debug)]
pub struct ReadBuffered<T> {
    inner: T,
    capacity: usize,
    enabled: bool,
    buf: Option<Box<[u8]>>,
    pos: usize,
    filled: usize,
}

impl<T> ReadBuffered<T> {
    /// Unbuffered until [`enable`](Self::enable); then buffered by `capacity` bytes.
    pub fn new(inner: T, capacity: usize) -> Self {
        Self {
            inner,
            capacity,
            enabled: false,
            buf: None,
            pos: 0,
            filled: 0,
        }
    }

    /// Reads from now on go through the buffer (allocated at the first one).
    pub fn enable(&mut self) {
        self.enabled = true;
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Whether the buffer has been allocated.
    pub fn is_allocated(&self) -> bool {
        self.buf.is_some()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadBuffered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.filled {
            let buf = this.buf.as_deref().unwrap_or(&[]);
            let n = (this.filled - this.pos).min(out.remaining());
            out.put_slice(&buf[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        // Unbuffered, or the caller's buffer is at least as large as ours: read straight
        // into it.
        if !this.enabled || out.remaining() >= this.capacity {
            return Pin::new(&mut this.inner).poll_read(cx, out);
        }
        let capacity = this.capacity;
        let buf = this
            .buf
            .get_or_insert_with(|| vec![0u8; capacity].into_boxed_slice());
        let mut fill = ReadBuf::new(buf);
        match Pin::new(&mut this.inner).poll_read(cx, &mut fill) {
            Poll::Ready(Ok(())) => {
                this.filled = fill.filled().len();
                this.pos = 0;
                let n = this.filled.min(out.remaining());
                out.put_slice(&buf[..n]);
                this.pos = n;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadBuffered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn nothing_is_allocated_until_enabled_and_every_byte_arrives_in_order() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut r = ReadBuffered::new(b, 1024);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        a.write_all(&data).await.unwrap();
        drop(a);
        let mut got = vec![0u8; 300];
        r.read_exact(&mut got).await.unwrap();
        assert!(
            !r.is_allocated(),
            "a read before enable() allocated the buffer"
        );
        r.enable();
        let mut small = [0u8; 7];
        while got.len() < data.len() {
            let n = r.read(&mut small).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&small[..n]);
        }
        assert!(r.is_allocated());
        assert_eq!(got, data);
        assert_eq!(r.read(&mut small).await.unwrap(), 0);
    }
}
