//! The operator's two API clients: one that reads (watches, lists, the Lease) and one that writes
//! the clusters' objects and Events, whose connections refuse to send once the write fence closes.
//!
//! The executor asks the fence before every write (`Context::may_write`), but a request that
//! passed that check still queues in kube's buffer and hyper's pool before its bytes leave. A
//! replica frozen there (SIGSTOP, a long GC-like stall of the node) would send it on waking, after
//! another replica took the Lease. So the write client checks the fence again in the socket's
//! `poll_write`, in the same call that hands the bytes to the kernel: a request, or what is left
//! of it, is never sent by a replica whose fence has closed. The connection fails instead, and
//! the API server sees at most a truncated request, which it discards.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioExecutor;
use kube::client::{Body, ConfigExt};
use kube::{Client, Config};
use tower::{BoxError, ServiceBuilder};

use crate::reconciler::WriteFence;

/// The client for reads and the Lease: never fenced (a standby must watch and may take the Lease).
///
/// No transparent retries. kube's default resends a request answered 429/503/504 up to 15 times
/// with a backoff of up to 1000 s: a status patch answered 504 while we led was resent after
/// another replica had taken the Lease (tests/churn.rs saw it in CI), and a create answered 504
/// may already exist (generateName: a second pod). Passes retry instead, on a fresh view of the
/// cache and through the fence, with the shard's backoff; watches have their own backoff.
pub fn reads(config: &Config) -> kube::Result<Client> {
    let mut config = config.clone();
    config.default_retry = false;
    Client::try_from(config)
}

/// The client for cluster writes (pods, Services, RayCluster status, Events): kube's stack
/// (base URI, auth with token refresh, extra headers such as the user agent, timeouts) over a
/// connector whose connections check `fence` before every write to the socket.
pub fn fenced_writes(config: &Config, fence: Arc<dyn WriteFence>) -> kube::Result<Client> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(config.connect_timeout);
    let https = config.rustls_https_connector_with_connector(FencedConnector { inner: http, fence })?;
    let mut timed = hyper_timeout::TimeoutConnector::new(https);
    timed.set_read_timeout(config.read_timeout);
    timed.set_write_timeout(config.write_timeout);
    let hyper: hyper_util::client::legacy::Client<_, Body> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(timed);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(hyper);
    Ok(Client::new(service, config.default_namespace.clone()))
}

/// Opens TCP connections whose writes ask the fence first.
#[derive(Clone)]
struct FencedConnector {
    inner: HttpConnector,
    fence: Arc<dyn WriteFence>,
}

impl tower::Service<http::Uri> for FencedConnector {
    type Response = FencedIo<<HttpConnector as tower::Service<http::Uri>>::Response>;
    type Error = <HttpConnector as tower::Service<http::Uri>>::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let fence = self.fence.clone();
        Box::pin(async move { Ok(FencedIo { io: connecting.await?, fence }) })
    }
}

/// A connection that fails a write instead of sending it once the fence has closed.
struct FencedIo<T> {
    io: T,
    fence: Arc<dyn WriteFence>,
}

fn fenced() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "write fence closed: this replica no longer holds the Lease")
}

impl<T: Read + Unpin> Read for FencedIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for FencedIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if !self.fence.allowed() {
            return Poll::Ready(Err(fenced()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if !self.fence.allowed() {
            return Poll::Ready(Err(fenced()));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T: Connection> Connection for FencedIo<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    struct Switch(AtomicBool);

    impl WriteFence for Switch {
        fn allowed(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// One plain-HTTP request through the fenced connector; what the server received.
    async fn send(
        client: &hyper_util::client::legacy::Client<FencedConnector, String>,
        addr: std::net::SocketAddr,
    ) -> Result<u16, String> {
        let req =
            http::Request::post(format!("http://{addr}/")).body("a write".to_string()).map_err(|e| e.to_string())?;
        let res = tokio::time::timeout(Duration::from_secs(5), client.request(req)).await.map_err(|e| e.to_string())?;
        res.map(|r| r.status().as_u16()).map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn a_closed_fence_sends_no_byte_even_on_an_open_pooled_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The server answers every request on a keep-alive connection and counts the bytes it read.
        let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else { return };
                let got = got_tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                let _ = got.send(n);
                                let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                                if sock.write_all(reply).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });

        let switch = Arc::new(Switch(AtomicBool::new(true)));
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let connector = FencedConnector { inner: http, fence: switch.clone() };
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector);

        assert_eq!(send(&client, addr).await, Ok(200), "an open fence lets the write through");
        assert!(got_rx.recv().await.unwrap() > 0);

        // The connection stays pooled; the next request would reuse it.
        switch.0.store(false, Ordering::SeqCst);
        let refused = send(&client, addr).await;
        assert!(refused.is_err(), "a closed fence fails the request: {refused:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(got_rx.try_recv().is_err(), "the server received bytes of a fenced write");

        switch.0.store(true, Ordering::SeqCst);
        assert_eq!(send(&client, addr).await, Ok(200), "writes resume when the fence opens again");
    }
}
