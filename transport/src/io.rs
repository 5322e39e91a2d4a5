//! Counting a listener's client connections: open, accepted, bytes each way.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// Counters of one listener's client connections (the default: counted nowhere).
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    pub open: Gauge,
    pub accepted: Counter,
    pub read_bytes: Counter,
    pub written_bytes: Counter,
    /// Connections closed at accept: the listener was at `[limits]` max_connections.
    pub refused: Counter,
}

pin_project! {
    /// A client connection whose traffic is counted; open until dropped.
    pub struct Counted<T> {
        #[pin]
        inner: T,
        metrics: ConnectionMetrics,
    }

    impl<T> PinnedDrop for Counted<T> {
        fn drop(this: Pin<&mut Self>) {
            this.metrics.open.dec();
        }
    }
}

impl<T> Counted<T> {
    pub fn new(inner: T, metrics: &ConnectionMetrics) -> Self {
        metrics.accepted.inc();
        metrics.open.inc();
        Self {
            inner,
            metrics: metrics.clone(),
        }
    }
}

impl<T: AsyncRead> AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            this.metrics.read_bytes.inc_by(read as u64);
        }
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            this.metrics.written_bytes.inc_by(*n as u64);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled {
            this.metrics.written_bytes.inc_by(*n as u64);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
