//! Copies of a request body for RequestMirror, made without ever slowing the request.
//!
//! Each frame the request's body yields is handed to every mirror's queue with
//! `try_send`: a copy is a reference count on the same bytes, never a byte copied. A
//! mirror whose queue is full (its endpoint reads slower than the request's) is dropped
//! on the spot, and its request fails rather than arrive with part of the body: the
//! mirror's body ends in an error unless it saw the request body's end. Memory per
//! mirror is bounded by [`QUEUE`] frames.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};
use tokio::sync::mpsc;

/// Frames a mirror may lag behind the request before it is dropped.
pub const QUEUE: usize = 16;

enum Item {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
}

/// The request side: hands every frame to the mirrors still keeping up.
#[derive(Default)]
pub struct Tee {
    mirrors: Vec<mpsc::Sender<Item>>,
    /// Mirrors dropped because they fell behind.
    pub dropped: usize,
}

/// A mirror's copy of the body.
pub struct MirrorBody {
    rx: mpsc::Receiver<Item>,
    ended: bool,
}

/// The mirror fell behind (or the request failed) before the body's end.
#[derive(Debug, thiserror::Error)]
#[error("the mirrored request's body was abandoned before its end")]
pub struct Abandoned;

impl Tee {
    /// A new mirror of the body from here on (call before the first frame).
    pub fn mirror(&mut self) -> MirrorBody {
        let (tx, rx) = mpsc::channel(QUEUE);
        self.mirrors.push(tx);
        MirrorBody { rx, ended: false }
    }

    fn send(&mut self, item: impl Fn() -> Item) {
        let before = self.mirrors.len();
        self.mirrors.retain(|m| m.try_send(item()).is_ok());
        self.dropped += before - self.mirrors.len();
    }

    /// Passes a frame of the request's body on to the mirrors.
    pub fn frame(&mut self, frame: &Frame<Bytes>) {
        if self.mirrors.is_empty() {
            return;
        }
        if let Some(d) = frame.data_ref() {
            let d = d.clone();
            self.send(|| Item::Data(d.clone()));
        } else if let Some(t) = frame.trailers_ref() {
            self.send(|| Item::Trailers(t.clone()));
        }
    }

    /// The request's body ended: the mirrors' bodies end too.
    pub fn end(&mut self) {
        self.send(|| Item::End);
        self.mirrors.clear();
    }
}

impl Body for MirrorBody {
    type Data = Bytes;
    type Error = Abandoned;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Abandoned>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Item::Data(d))) => Poll::Ready(Some(Ok(Frame::data(d)))),
            Poll::Ready(Some(Item::Trailers(t))) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Poll::Ready(Some(Item::End)) => {
                self.ended = true;
                Poll::Ready(None)
            }
            // Dropped without its end: not a complete body.
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(Some(Err(Abandoned)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_mirror_gets_the_whole_body_or_fails() {
        let mut tee = Tee::default();
        let keeping_up = tee.mirror();
        let slow = tee.mirror();
        let reader = tokio::spawn(async move { keeping_up.collect().await.map(|c| c.to_bytes()) });
        let mut sent = Vec::new();
        for i in 0..(QUEUE * 4) {
            let chunk = Bytes::from(vec![i as u8; 100]);
            sent.extend_from_slice(&chunk);
            tee.frame(&Frame::data(chunk));
            // The reader keeps up; the other mirror is never read.
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
        }
        tee.end();
        assert_eq!(tee.dropped, 1, "the mirror nobody read fell behind");
        let got = reader.await.unwrap().unwrap();
        assert_eq!(got.as_ref(), sent.as_slice());
        assert!(slow.collect().await.is_err(), "a partial body is an error");
    }
}
