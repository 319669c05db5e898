//! `/healthz` (alive), `/readyz` (every watch listed once and none forbidden; true on standbys;
//! false during shutdown) and `/metrics` (Prometheus text), on plain hyper.
//!
//! Anyone who can reach the port can connect, so a connection costs the server little and never
//! for long: headers must arrive within [`HEADER_TIMEOUT`], each connection serves one request
//! (probes and scrapes open one per request anyway) and lives at most [`CONNECTION_TIMEOUT`], and
//! at most [`MAX_CONNECTIONS`] are open: a new one closes the oldest, so connections that never
//! finish their headers (slowloris) cannot keep the kubelet's probes out.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info};

use super::watch::WatchHealth;
use crate::metrics::Metrics;

/// How long a client may take to send its request headers (probes send them at once).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest life of one connection, whatever it does (e.g. a client that never reads the reply).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections open at once; a new one beyond closes the oldest.
pub const MAX_CONNECTIONS: usize = 128;

/// The open connections, oldest first; dropping a sender closes its connection.
#[derive(Default)]
struct Open {
    next: u64,
    conns: BTreeMap<u64, oneshot::Sender<()>>,
}

fn reply(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Binds the health server and serves it in the background until `shutdown`.
pub async fn spawn(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    watches: Arc<WatchHealth>,
    shutting_down: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    info!("health server on http://{local} (/healthz, /readyz, /metrics)");
    let open = Arc::new(Mutex::new(Open::default()));
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => { debug!("accept failed: {e}"); continue; }
                },
                _ = shutdown.changed() => break,
            };
            let (close_tx, close_rx) = oneshot::channel::<()>();
            let id = {
                let mut o = open.lock().unwrap_or_else(|e| e.into_inner());
                if o.conns.len() >= MAX_CONNECTIONS {
                    // Dropping the oldest's sender closes it: a flood of stalled connections
                    // displaces itself, not the probe that just arrived.
                    o.conns.pop_first();
                }
                o.next += 1;
                let id = o.next;
                o.conns.insert(id, close_tx);
                id
            };
            let open = open.clone();
            let metrics = metrics.clone();
            let watches = watches.clone();
            let shutting_down = shutting_down.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let resp = match req.uri().path() {
                        "/healthz" | "/livez" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
                        "/readyz" => {
                            if shutting_down.load(Ordering::SeqCst) {
                                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "shutting down\n".into())
                            } else if watches.forbidden() {
                                reply(
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    "text/plain",
                                    "forbidden: the operator lacks permission to watch its resources (see its log)\n"
                                        .into(),
                                )
                            } else if watches.all_synced() {
                                reply(StatusCode::OK, "text/plain", "ok\n".into())
                            } else {
                                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "caches not synced\n".into())
                            }
                        }
                        "/metrics" => {
                            reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", metrics.encode())
                        }
                        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
                    };
                    async move { Ok::<_, Infallible>(resp) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    r = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => match r {
                        Ok(Err(e)) => debug!("health connection: {e}"),
                        Err(_) => debug!("health connection closed after {CONNECTION_TIMEOUT:?}"),
                        Ok(Ok(())) => {}
                    },
                    _ = close_rx => debug!("health connection closed: {MAX_CONNECTIONS} newer ones are open"),
                }
                open.lock().unwrap_or_else(|e| e.into_inner()).conns.remove(&id);
            });
        }
    });
    Ok(local)
}
