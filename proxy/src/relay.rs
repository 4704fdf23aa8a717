//! The two bodies of one forwarded exchange and what happens when an instance answers before
//! it has read the whole request.
//!
//! [`RequestBody`] wraps the client's body on its way to the instance and records whether it
//! was handed over whole. [`ResponseBody`] wraps the instance's answer on its way back, holds
//! the in-flight count and the upstream connection until the answer ends, and then puts the
//! connection back in the pool only if the exchange ended cleanly.
//!
//! An early answer (a 413 or a 401 while an upload is still going out, like nginx relays) is
//! relayed as it is; once it has been given to the client whole, the upstream connection is
//! abandoned. Whenever the rest of an HTTP/1 client's body is not going to the instance (an
//! early answer, or no answer at all), it is read and dropped for a while ([`LINGER`]), so
//! that a client that sends everything before reading still reads its answer instead of a
//! reset; an HTTP/2 client gets RST_STREAM(NO_ERROR) after a complete answer (RFC 9113 §8.1)
//! when the body is dropped.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::metrics::ServiceHandles;
use crate::pool::{Connection, Pool, PoolKey};
use crate::respond::{BoxError, ProxyBody};
use crate::table::InFlight;

/// How long the rest of a body after an early answer may take to arrive, in all and between
/// two reads (nginx's lingering_time and lingering_timeout have the same defaults).
pub const LINGER: Duration = Duration::from_secs(30);
pub const LINGER_IDLE: Duration = Duration::from_secs(5);

/// What the request path and the two bodies know of one exchange.
#[derive(Debug, Default)]
pub struct Progress {
    /// The whole request body was handed to the upstream connection.
    sent: AtomicBool,
    /// Reading the client's body failed (bad chunked framing, over the size limit, the client
    /// went away): whatever the upstream exchange says next, this is the client's fault.
    client_failed: AtomicBool,
    /// The client speaks HTTP/1: what the instance will not get of its body is read and
    /// dropped rather than left unread (which makes the kernel reset the connection).
    linger: bool,
}

impl Progress {
    pub fn new(linger: bool) -> Arc<Self> {
        Arc::new(Progress {
            linger,
            ..Progress::default()
        })
    }

    pub fn sent(&self) -> bool {
        self.sent.load(Ordering::Acquire)
    }

    pub fn client_failed(&self) -> bool {
        self.client_failed.load(Ordering::Acquire)
    }

    /// Asked when the answer's head arrives: true when the request body is not all out.
    pub fn answered_early(&self) -> bool {
        !self.sent()
    }
}

/// The client's body on its way to the instance.
pub struct RequestBody {
    inner: Option<ProxyBody>,
    progress: Arc<Progress>,
    /// Where its bytes are counted.
    metrics: Arc<ServiceHandles>,
}

impl RequestBody {
    pub fn new(inner: ProxyBody, progress: Arc<Progress>, metrics: Arc<ServiceHandles>) -> Self {
        if inner.is_end_stream() {
            progress.sent.store(true, Ordering::Release);
        }
        RequestBody {
            inner: Some(inner),
            progress,
            metrics,
        }
    }
}

/// The length of a data frame (trailers count nothing).
fn data_len(frame: &Frame<Bytes>) -> u64 {
    frame.data_ref().map_or(0, |data| data.len() as u64)
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        let done = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(frame))) => {
                this.metrics.received(data_len(frame));
                inner.is_end_stream()
            }
            Poll::Ready(Some(Err(_))) => {
                this.progress.client_failed.store(true, Ordering::Release);
                false
            }
            Poll::Pending => false,
        };
        if done {
            this.progress.sent.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        // Dropped before its end: the upstream connection ended or was abandoned, with or
        // without an answer (the order of the two is not known here, and does not matter).
        if !self.progress.linger || self.progress.sent() {
            return;
        }
        if let (Some(body), Ok(runtime)) =
            (self.inner.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(linger(body));
        }
    }
}

/// Reads and drops what is left of a client's body, within [`LINGER`] and [`LINGER_IDLE`];
/// if it did not end by then, hyper closes the client connection when this drops it.
async fn linger(mut body: ProxyBody) {
    let until = tokio::time::Instant::now() + LINGER;
    loop {
        let next = (tokio::time::Instant::now() + LINGER_IDLE).min(until);
        match tokio::time::timeout_at(next, body.frame()).await {
            Ok(Some(Ok(_))) => {}
            _ => return,
        }
    }
}

/// The instance's answer on its way to the client, holding the in-flight count and the
/// connection until it ends.
pub struct ResponseBody {
    inner: Incoming,
    guard: Option<InFlight>,
    release: Option<Release>,
    metrics: Arc<ServiceHandles>,
}

struct Release {
    pool: Arc<Pool>,
    key: PoolKey,
    connection: Connection,
    progress: Arc<Progress>,
}

impl ResponseBody {
    pub fn new(
        inner: Incoming,
        guard: InFlight,
        pool: Arc<Pool>,
        key: PoolKey,
        connection: Connection,
        progress: Arc<Progress>,
        metrics: Arc<ServiceHandles>,
    ) -> Self {
        ResponseBody {
            inner,
            metrics,
            guard: Some(guard),
            release: Some(Release {
                pool,
                key,
                connection,
                progress,
            }),
        }
    }

    /// The answer ended (`clean`: read to its end). The instance is no longer busy; the
    /// connection goes back to the pool if the request also went out whole.
    fn finish(&mut self, clean: bool) {
        self.guard = None;
        if clean && self.release.as_ref().is_some_and(|r| r.progress.sent()) {
            if let Some(release) = self.release.take() {
                release.pool.put(release.key, release.connection);
            }
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Here, not in `finish`: hyper drops the body only after it has passed the last frame
        // on, so abandoning the connection (which drops the request body: a reset for an
        // HTTP/2 client) cannot overtake the end of the answer.
        if let Some(release) = self.release.take() {
            if !release.progress.sent() {
                release.connection.abandon();
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.metrics.sent(data_len(&frame));
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
