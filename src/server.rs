//! Listening sockets and HTTP/1.1 connections (hyper), for any handler made per connection from
//! the caller's IP, of the form `request → response`.
//!
//! It owns binding (with errors that say how to fix them), the accept loop, per-connection limits
//! (header size and header read timeout, so a slow or oversized client costs nothing), and the
//! graceful drain on shutdown. It knows nothing about metadata.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt as _;
use futures::task::AtomicWaker;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpListener;
use tokio::sync::Notify;
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
    bind_all_ahead(addrs, &[]).await
}

/// [`bind_all`], where the addresses in `ahead` may be bound before they are addresses of this
/// host (`IP_FREEBIND`): the gateway of a Podman network, which netavark puts on the network's
/// bridge only while a container is attached. The listener answers as soon as it appears.
pub async fn bind_all_ahead(
    addrs: &[SocketAddr],
    ahead: &[IpAddr],
) -> Result<Vec<TcpListener>, BindError> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let listener = if ahead.contains(&addr.ip()) {
            bind_ahead(*addr)
        } else {
            bind(*addr).await
        };
        listeners.push(listener?);
    }
    Ok(listeners)
}

fn bind_ahead(addr: SocketAddr) -> Result<TcpListener, BindError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let listen = || -> io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        if addr.is_ipv4() {
            socket.set_freebind_v4(true)?;
        } else {
            socket.set_only_v6(true)?;
            socket.set_freebind_v6(true)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    };
    listen().map_err(|e| explain_bind_error(addr, &e))
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
/// `options.drain_timeout`. `connect` makes each connection's handler from the caller's address:
/// whatever it keeps lives as long as the connection (its requests come one after another).
pub async fn serve<C, H, F>(
    listener: TcpListener,
    connect: Arc<C>,
    options: ServerOptions,
    shutdown: CancellationToken,
) where
    C: Fn(IpAddr) -> H + Send + Sync + 'static,
    H: Fn(Request<Incoming>) -> F + Send + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let drain = Arc::new(Drain::default());
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
        let handler = connect(peer.ip().to_canonical());
        // `map`, not an `async` block around the handler's future: the block would keep the
        // future twice (as its capture and as the awaited value), and hyper moves it around.
        let service =
            service_fn(move |req: Request<Incoming>| handler(req).map(Ok::<_, Infallible>));
        let conn = http1::Builder::new()
            .keep_alive(options.keep_alive)
            .title_case_headers(true)
            .max_buf_size(options.max_header_bytes)
            .timer(TokioTimer::new())
            .header_read_timeout(options.header_read_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let conn = drain.clone().watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(options.drain_timeout, drain.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(listener = ?local, "gave up waiting for requests in flight");
    }
}

/// The open connections, to be told to finish at shutdown.
///
/// A connection reads one atomic flag each time it is polled, and leaves its waker for shutdown
/// to wake. (hyper-util's `GracefulShutdown` polls a `watch` channel instead, which takes the
/// channel's lock at every poll: on a kept-alive connection, at every request.)
#[derive(Default)]
struct Drain {
    closing: AtomicBool,
    /// Each open connection's waker, by connection number.
    open: Mutex<HashMap<u64, Arc<AtomicWaker>>>,
    next: AtomicU64,
    /// Told when the last open connection ends.
    drained: Notify,
}

impl Drain {
    fn open(&self) -> MutexGuard<'_, HashMap<u64, Arc<AtomicWaker>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `conn`, shut down gracefully (the request in flight answered, then closed) once
    /// [`Drain::shutdown`] is called.
    async fn watch<C: GracefulConnection>(self: Arc<Self>, conn: C) -> C::Output {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let waker = Arc::new(AtomicWaker::new());
        self.open().insert(id, waker.clone());
        let _open = OpenConnection { drain: &self, id };
        let mut conn = pin!(conn);
        let mut told = false;
        poll_fn(|cx| {
            if !told {
                // The waker first, then the flag: shutdown sets the flag, then wakes; whichever
                // comes first, this connection sees the flag now or is woken to see it.
                waker.register(cx.waker());
                if self.closing.load(Ordering::SeqCst) {
                    conn.as_mut().graceful_shutdown();
                    told = true;
                }
            }
            conn.as_mut().poll(cx)
        })
        .await
    }

    /// Tells every open connection to finish, and waits until all have.
    async fn shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
        for waker in self.open().values() {
            waker.wake();
        }
        loop {
            let mut drained = pin!(self.drained.notified());
            drained.as_mut().enable();
            if self.open().is_empty() {
                return;
            }
            drained.await;
        }
    }
}

/// Takes a connection off the open list when it ends, however it ends.
struct OpenConnection<'a> {
    drain: &'a Drain,
    id: u64,
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        let mut open = self.drain.open();
        open.remove(&self.id);
        if open.is_empty() {
            self.drain.drained.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Serves a handler that answers after `delay` on a kept-alive loopback listener; returns its
    /// address, the shutdown token, and the serving task.
    async fn start(
        delay: Duration,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handler = Arc::new(move |_caller: IpAddr| {
            move |_req: Request<Incoming>| async move {
                tokio::time::sleep(delay).await;
                Response::new(Full::new(Bytes::from_static(b"done")))
            }
        });
        let options = ServerOptions {
            keep_alive: true,
            drain_timeout: Duration::from_secs(10),
            ..ServerOptions::default()
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, handler, options, shutdown.clone()));
        (addr, shutdown, task)
    }

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    #[tokio::test]
    async fn shutdown_closes_idle_kept_alive_connections_at_once() {
        let (addr, shutdown, task) = start(Duration::ZERO).await;
        let mut idle = Vec::new();
        for _ in 0..3 {
            let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            c.write_all(REQUEST).await.expect("write");
            let mut buf = [0u8; 256];
            let n = c.read(&mut buf).await.expect("read");
            assert!(
                buf[..n].ends_with(b"done"),
                "{:?}",
                String::from_utf8_lossy(&buf[..n])
            );
            idle.push(c);
        }
        let started = Instant::now();
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("drained well before the 10 s drain timeout")
            .expect("serve");
        assert!(started.elapsed() < Duration::from_secs(5));
        for mut c in idle {
            let mut buf = [0u8; 16];
            assert_eq!(
                c.read(&mut buf).await.expect("read"),
                0,
                "closed by the server"
            );
        }
    }

    #[tokio::test]
    async fn shutdown_answers_the_request_in_flight_then_closes() {
        let (addr, shutdown, task) = start(Duration::from_millis(300)).await;
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        c.write_all(REQUEST).await.expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        shutdown.cancel();
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).await.expect("read to the close");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with("done"), "{answer}");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("drained")
            .expect("serve");
    }

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
