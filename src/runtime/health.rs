//! `/healthz` (alive), `/readyz` (every watch listed once and none forbidden; true on standbys;
//! false during shutdown) and `/metrics` (Prometheus text), on plain hyper.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info};

use super::watch::WatchHealth;
use crate::metrics::Metrics;

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
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => { debug!("accept failed: {e}"); continue; }
                },
                _ = shutdown.changed() => break,
            };
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
                if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await {
                    debug!("health connection: {e}");
                }
            });
        }
    });
    Ok(local)
}
