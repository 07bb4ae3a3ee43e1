//! Listening sockets and HTTP/1.1 connections (hyper), for any handler of the form
//! `(request, caller IP) → response`.
//!
//! It owns binding (with errors that say how to fix them), the accept loop, per-connection limits
//! (header size and header read timeout, so a slow or oversized client costs nothing), and the
//! graceful drain on shutdown. It knows nothing about metadata.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt as _;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Connection behaviour.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Keep connections open between requests. EC2 closes after every response; SDKs cope either way.
    pub keep_alive: bool,
    /// A client must send its whole request head within this time.
    pub header_read_timeout: Duration,
    /// Largest request head accepted; larger ones get 431 and the connection is closed.
    pub max_header_bytes: usize,
    /// How long shutdown waits for requests in flight.
    pub drain_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            keep_alive: false,
            header_read_timeout: Duration::from_secs(5),
            // hyper's minimum; a metadata request head is a few hundred bytes.
            max_header_bytes: 8192,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a listener could not be opened, with the fix.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {reason}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub reason: String,
    /// Whether the configuration (rather than the environment at run time) is at fault.
    pub is_configuration: bool,
}

/// Binds every address, or explains the first that fails.
pub async fn bind_all(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, BindError> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        listeners.push(bind(*addr).await?);
    }
    Ok(listeners)
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| explain_bind_error(addr, &e))
}

fn explain_bind_error(addr: SocketAddr, e: &io::Error) -> BindError {
    let ip = addr.ip();
    let (reason, is_configuration) = match e.kind() {
        io::ErrorKind::AddrNotAvailable => {
            let how = match ip {
                IpAddr::V4(_) => format!("sudo ip addr add {ip}/32 dev lo"),
                IpAddr::V6(_) => format!("sudo ip -6 addr add {ip}/128 dev lo"),
            };
            (
                format!(
                    "{ip} is not an address of this host. Add it (host mode: `{how}`; on a Docker \
                     bridge, `imdsd network up`), run imdsd in a container that has this address on \
                     the metadata network (see the README), or choose another --listen address"
                ),
                true,
            )
        }
        io::ErrorKind::PermissionDenied => (
            format!(
                "permission denied; port {} needs root or the capability to bind low ports \
                 (`sudo setcap cap_net_bind_service=+ep $(command -v imdsd)`)",
                addr.port()
            ),
            true,
        ),
        io::ErrorKind::AddrInUse => (
            "the address is already in use; is another imdsd (or metadata proxy) running?".into(),
            false,
        ),
        _ => (e.to_string(), false),
    };
    BindError {
        addr,
        reason,
        is_configuration,
    }
}

/// Serves `listener` until `shutdown` fires, then drains open connections for up to
/// `options.drain_timeout`.
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: Arc<H>,
    options: ServerOptions,
    shutdown: CancellationToken,
) where
    H: Fn(Request<Incoming>, IpAddr) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let local = listener.local_addr().ok();
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = ?local, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let caller = peer.ip().to_canonical();
        let handler = handler.clone();
        // `map`, not an `async` block around the handler's future: the block would keep the
        // future twice (as its capture and as the awaited value), and hyper moves it around.
        let service =
            service_fn(move |req: Request<Incoming>| handler(req, caller).map(Ok::<_, Infallible>));
        let conn = http1::Builder::new()
            .keep_alive(options.keep_alive)
            .title_case_headers(true)
            .max_buf_size(options.max_header_bytes)
            .timer(TokioTimer::new())
            .header_read_timeout(options.header_read_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(options.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(listener = ?local, "gave up waiting for requests in flight");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_address_not_on_this_host_says_how_to_add_it() {
        let addr: SocketAddr = "198.51.100.254:8080".parse().expect("addr");
        let err = bind(addr)
            .await
            .expect_err("TEST-NET-2 is not assigned here");
        assert!(err.is_configuration);
        assert!(
            err.to_string()
                .contains("ip addr add 198.51.100.254/32 dev lo"),
            "{err}"
        );
    }
}
