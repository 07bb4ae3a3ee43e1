//! Listening sockets and HTTP/1.1 connections (hyper), for any handler made per connection from
//! the caller's IP, of the form `request → response`.
//!
//! It owns binding (with errors that say how to fix them, and a listen backlog sized for bursts),
//! the accept loop, per-connection limits (header size and header read timeout, so a slow or
//! oversized client costs nothing), the graceful drain on shutdown, and the process's file
//! descriptors: the soft `RLIMIT_NOFILE` is raised to the hard limit at start, and [`Connections`]
//! caps open connections per caller and in all (every listener of the daemon shares one), below
//! the descriptor limit, so that `accept` never fails for want of descriptors and one caller
//! cannot crowd out the others. It knows nothing about metadata.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
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
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Default for `--max-connections`: open connections from all callers together. An SDK holds at
/// most a few (and none between refreshes when connections close after each answer, as on EC2);
/// the benchmark's thousand kept-alive callers use a thousand.
pub const DEFAULT_MAX_CONNECTIONS: usize = 8192;

/// Default for `--max-connections-per-caller`: far above what one container's SDK clients open
/// (the benchmark drives 16 at once from one address), far below what it takes to crowd out
/// others.
pub const DEFAULT_MAX_CONNECTIONS_PER_CALLER: usize = 512;

/// The largest value either cap accepts: Linux's default ceiling on descriptors (`fs.nr_open`).
pub const MAX_CONNECTIONS_LIMIT: usize = 1 << 20;

/// Connections the kernel queues before `accept`: a burst of containers starting at once.
/// The kernel clamps it to `net.core.somaxconn` (4096 by default since Linux 5.4).
pub const LISTEN_BACKLOG: u32 = 4096;

/// How long a connection closed to make room may take to finish before it is dropped, when it
/// has no request in flight: one that sent part of a request head would otherwise hold its
/// descriptor until the header read timeout.
const EVICTION_GRACE: Duration = Duration::from_secs(1);

/// How long accepting may pause for connections being closed to free their descriptors.
const ROOM_WAIT: Duration = Duration::from_secs(2);

/// At most one line a second about connections closed or refused at a limit.
const LIMIT_LOG_INTERVAL: Duration = Duration::from_secs(1);

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
    /// Open connections from all callers, on all listeners together ([`fit_to_descriptors`]
    /// lowers it to fit the descriptor limit).
    pub max_connections: usize,
    /// Open connections from one caller address, on all listeners together.
    pub max_connections_per_caller: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            keep_alive: false,
            header_read_timeout: Duration::from_secs(5),
            // hyper's minimum; a metadata request head is a few hundred bytes.
            max_header_bytes: 8192,
            drain_timeout: Duration::from_secs(10),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_caller: DEFAULT_MAX_CONNECTIONS_PER_CALLER,
        }
    }
}

/// The process's descriptor limit (`RLIMIT_NOFILE`); `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorLimit {
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

impl DescriptorLimit {
    /// The limit this process runs with now.
    pub fn current() -> DescriptorLimit {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        DescriptorLimit {
            soft: limit.current,
            hard: limit.maximum,
        }
    }
}

/// Raises the soft descriptor limit to the hard one, as the Go metadata proxies do: a daemon
/// started by systemd gets a soft limit of 1024, a few hundred idle connections' worth. Logs
/// both figures. A failure is logged, not fatal: the connection caps fit whatever limit holds.
pub fn raise_descriptor_limit() -> DescriptorLimit {
    let before = DescriptorLimit::current();
    let show = |n: Option<u64>| n.map_or_else(|| "unlimited".to_string(), |n| n.to_string());
    if before.soft == before.hard {
        tracing::info!(
            soft = %show(before.soft),
            hard = %show(before.hard),
            "open-file limit (RLIMIT_NOFILE) is already at its hard limit"
        );
        return before;
    }
    let raised = rustix::process::Rlimit {
        current: before.hard,
        maximum: before.hard,
    };
    match rustix::process::setrlimit(rustix::process::Resource::Nofile, raised) {
        Ok(()) => {
            let after = DescriptorLimit::current();
            tracing::info!(
                soft_before = %show(before.soft),
                soft = %show(after.soft),
                hard = %show(after.hard),
                "raised the open-file limit (RLIMIT_NOFILE) to its hard limit"
            );
            after
        }
        Err(e) => {
            tracing::warn!(
                soft = %show(before.soft),
                hard = %show(before.hard),
                error = %io::Error::from(e),
                "cannot raise the open-file limit (RLIMIT_NOFILE) to its hard limit; connections are capped to fit the soft one"
            );
            before
        }
    }
}

/// Descriptors kept out of the connection cap: for the Docker socket, STS and upstream
/// connections, listeners, files, the runtime's own, and connections being closed to make room.
fn descriptor_reserve(soft: u64) -> u64 {
    (soft / 8).clamp(64, 1024).min(soft / 2)
}

/// `options` with `max_connections` lowered, if it must be, to fit `limit` with a reserve for
/// the daemon's other descriptors; says when it was lowered.
pub fn fit_to_descriptors(options: &ServerOptions, limit: DescriptorLimit) -> ServerOptions {
    let mut fitted = options.clone();
    if let Some(soft) = limit.soft {
        let fits = usize::try_from(soft - descriptor_reserve(soft))
            .unwrap_or(usize::MAX)
            .max(1);
        if fitted.max_connections > fits {
            tracing::warn!(
                configured = options.max_connections,
                max_connections = fits,
                open_file_limit = soft,
                "--max-connections lowered to fit the open-file limit; raise the limit \
                 (LimitNOFILE= in the systemd unit, ulimit -n) to allow more"
            );
            fitted.max_connections = fits;
        }
    }
    fitted.max_connections_per_caller = fitted
        .max_connections_per_caller
        .min(fitted.max_connections);
    fitted
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
        socket.listen(i32::try_from(LISTEN_BACKLOG).unwrap_or(i32::MAX))?;
        TcpListener::from_std(socket.into())
    };
    listen().map_err(|e| explain_bind_error(addr, &e))
}

/// Binds as `TcpListener::bind` does (`SO_REUSEADDR`, so that a restart does not wait for old
/// connections in TIME_WAIT), but with a backlog of [`LISTEN_BACKLOG`] instead of 128.
async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    };
    socket
        .and_then(|socket| {
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(LISTEN_BACKLOG)
        })
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

/// Serves `listener` until `shutdown` fires, then drains open connections for up to the drain
/// timeout. `connect` makes each connection's handler from the caller's address: whatever it
/// keeps lives as long as the connection (its requests come one after another). `name` labels
/// the listener in metrics and logs; `connections` is shared by all listeners of the daemon.
pub async fn serve<C, H, F>(
    listener: TcpListener,
    name: &'static str,
    connect: Arc<C>,
    connections: Arc<Connections>,
    shutdown: CancellationToken,
) where
    C: Fn(IpAddr) -> H + Send + Sync + 'static,
    H: Fn(Request<Incoming>) -> F + Send + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let options = connections.options.clone();
    let local = listener.local_addr().ok();
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like (the caps keep descriptors below the
                    // limit, so this is not expected): back off instead of spinning.
                    tracing::warn!(listener = ?local, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let caller = peer.ip().to_canonical();
        // Past the cap and the slack for connections being closed, accepting pauses (new ones
        // wait in the backlog) until those have closed, for a bounded time.
        let deadline = Instant::now() + ROOM_WAIT;
        let admitted = loop {
            let room = connections.room.notified();
            let mut room = pin!(room);
            room.as_mut().enable();
            match connections.admit(caller, name, Instant::now() < deadline) {
                Admission::Open(admitted) => break Some(admitted),
                Admission::Refused => break None,
                Admission::Wait => tokio::select! {
                    () = room => {}
                    () = tokio::time::sleep_until(deadline) => {}
                    () = shutdown.cancelled() => break None,
                },
            }
        };
        let Some(admitted) = admitted else {
            // Closed at once: no idle connection could make room.
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = connect(caller);
        let state = admitted.conn.clone();
        // `map`, not an `async` block around the handler's future: the block would keep the
        // future twice (as its capture and as the awaited value), and hyper moves it around.
        let service = service_fn(move |req: Request<Incoming>| {
            state.busy();
            let state = state.clone();
            handler(req).map(move |response| {
                state.idle();
                Ok::<_, Infallible>(response)
            })
        });
        let conn = http1::Builder::new()
            .keep_alive(options.keep_alive)
            .title_case_headers(true)
            .max_buf_size(options.max_header_bytes)
            .timer(TokioTimer::new())
            .header_read_timeout(options.header_read_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let conn = connections.clone().watch(admitted, conn);
        tokio::spawn(async move {
            if let Some(Err(e)) = conn.await {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(options.drain_timeout, connections.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(listener = ?local, "gave up waiting for requests in flight");
    }
}

/// What becomes of a new connection.
enum Admission {
    Open(Admitted),
    /// Close it at once.
    Refused,
    /// Too many connections are still closing: try again when one has.
    Wait,
}

/// Which cap a connection met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    Caller,
    Global,
}

impl Limit {
    fn as_str(self) -> &'static str {
        match self {
            Limit::Caller => "caller_limit",
            Limit::Global => "global_limit",
        }
    }
}

/// The open connections of every listener: capped per caller and in all, and told to finish at
/// shutdown.
///
/// When a cap is reached, the longest-idle connection (kept alive between requests, or opened
/// with no request yet) of that caller (per-caller cap) or of anyone (global cap) is closed to
/// make room; a connection with a request in flight never is. When nothing is idle, the new
/// connection is closed at once. Connections being closed still hold descriptors until their
/// task next runs: past the cap and a small slack for them, accepting pauses until they have
/// closed (new connections wait in the listen backlog), and after [`ROOM_WAIT`] the new one is
/// refused, so the total stays below the descriptor limit whatever callers do.
///
/// A connection reads one atomic flag each time it is polled, and leaves its waker for shutdown
/// or eviction to wake. (hyper-util's `GracefulShutdown` polls a `watch` channel instead, which
/// takes the channel's lock at every poll: on a kept-alive connection, at every request.) Each
/// request marks its connection busy and, once answered, idle with a ticket from one shared
/// counter: what picks the longest-idle connection is the order connections became idle, not
/// how long ago (a clock read per request cost ~150 instructions, a ticket one).
pub struct Connections {
    options: ServerOptions,
    /// Refuse outright from this many open connections (closing ones included).
    ceiling: usize,
    metrics: Arc<Metrics>,
    /// Shutdown: every connection is to finish.
    closing: AtomicBool,
    open: Mutex<Open>,
    /// Told when the last open connection ends.
    drained: Notify,
    /// Told when a connection ends with the total at the ceiling.
    room: Notify,
    /// Hands out the order in which connections become idle.
    tickets: Arc<AtomicU64>,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("max", &self.options.max_connections)
            .field("per_caller", &self.options.max_connections_per_caller)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Open {
    callers: HashMap<IpAddr, CallerConnections>,
    /// Open connections, those being closed included.
    total: usize,
    /// Open connections not being closed: what the caps count.
    live: usize,
    next_id: u64,
    log: LimitLog,
}

#[derive(Default)]
struct CallerConnections {
    slots: Vec<Slot>,
    live: usize,
}

struct Slot {
    id: u64,
    conn: Arc<Conn>,
    /// Told to finish to make room (it no longer counts against the caps).
    closing: bool,
}

/// One connection's state, shared by the registry, its task and its service.
struct Conn {
    waker: AtomicWaker,
    /// The ticket drawn when the connection last became idle (accepted, or its last answer
    /// given): lower is longer idle; [`BUSY`] while a request is in flight.
    idle_since: AtomicU64,
    /// Evicted: finish now.
    finish: AtomicBool,
    tickets: Arc<AtomicU64>,
}

const BUSY: u64 = u64::MAX;

impl Conn {
    fn busy(&self) {
        self.idle_since.store(BUSY, Ordering::Relaxed);
    }

    fn idle(&self) {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        self.idle_since
            .store(ticket.min(BUSY - 1), Ordering::Relaxed);
    }

    fn is_busy(&self) -> bool {
        self.idle_since.load(Ordering::Relaxed) == BUSY
    }
}

/// Counts closed and refused connections between two log lines.
#[derive(Default)]
struct LimitLog {
    last: Option<Instant>,
    closed: u64,
    refused: u64,
}

impl Connections {
    /// A registry with `options`' caps, taken as they are (see [`fit_to_descriptors`]).
    pub fn new(options: ServerOptions, metrics: Arc<Metrics>) -> Arc<Connections> {
        let max = options.max_connections.max(1);
        let slack = (max / 16).clamp(1, 256);
        Arc::new(Connections {
            ceiling: max + slack,
            options,
            metrics,
            closing: AtomicBool::new(false),
            open: Mutex::new(Open::default()),
            drained: Notify::new(),
            room: Notify::new(),
            tickets: Arc::new(AtomicU64::new(0)),
        })
    }

    fn open(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Open connections (those being closed included).
    pub fn open_count(&self) -> usize {
        self.open().total
    }

    /// Registers a new connection from `caller` on `listener`, making room under the caps by
    /// closing an idle connection if needed. When too many are still closing, asks the caller
    /// to wait if `may_wait`, else refuses.
    fn admit(
        self: &Arc<Self>,
        caller: IpAddr,
        listener: &'static str,
        may_wait: bool,
    ) -> Admission {
        let mut guard = self.open();
        let open = &mut *guard;
        let per_caller = self.options.max_connections_per_caller.max(1);
        let max = self.options.max_connections.max(1);
        let full = if open.total >= self.ceiling {
            if may_wait {
                return Admission::Wait;
            }
            // Still too many closing: nothing closed now would free a descriptor in time.
            Some((Limit::Global, None))
        } else if open
            .callers
            .get(&caller)
            .is_some_and(|c| c.live >= per_caller)
        {
            let victim = open
                .callers
                .get(&caller)
                .and_then(|c| longest_idle(c.slots.iter().map(|s| (caller, s))));
            Some((Limit::Caller, victim))
        } else if open.live >= max {
            let victim = longest_idle(
                open.callers
                    .iter()
                    .flat_map(|(ip, c)| c.slots.iter().map(move |s| (*ip, s))),
            );
            Some((Limit::Global, victim))
        } else {
            None
        };
        let now = Instant::now();
        if let Some((limit, victim)) = full {
            let admitted = match victim {
                Some((owner, id)) => {
                    open.evict(owner, id);
                    self.metrics.connection_closed(limit.as_str());
                    open.log.closed += 1;
                    true
                }
                None => {
                    self.metrics.request_refused(listener, limit.as_str());
                    open.log.refused += 1;
                    false
                }
            };
            if open
                .log
                .last
                .is_none_or(|last| now.duration_since(last) >= LIMIT_LOG_INTERVAL)
            {
                let log = std::mem::take(&mut open.log);
                open.log.last = Some(now);
                let limit_value = match limit {
                    Limit::Caller => per_caller,
                    Limit::Global => max,
                };
                tracing::warn!(
                    caller = %caller,
                    listener,
                    limit = limit.as_str(),
                    max = limit_value,
                    closed_idle = log.closed,
                    refused = log.refused,
                    "connection limit reached: closed the longest-idle connections to make room, \
                     or refused new ones when none was idle (counts since the last such line)"
                );
            }
            if !admitted {
                return Admission::Refused;
            }
        }
        let id = open.next_id;
        open.next_id += 1;
        let conn = Arc::new(Conn {
            waker: AtomicWaker::new(),
            idle_since: AtomicU64::new(0),
            finish: AtomicBool::new(false),
            tickets: self.tickets.clone(),
        });
        conn.idle();
        let entry = open.callers.entry(caller).or_default();
        entry.slots.push(Slot {
            id,
            conn: conn.clone(),
            closing: false,
        });
        entry.live += 1;
        open.total += 1;
        open.live += 1;
        self.metrics.connections_open(open.total);
        Admission::Open(Admitted {
            connections: self.clone(),
            caller,
            id,
            conn,
        })
    }

    /// `conn`, shut down gracefully (the request in flight answered, then closed) once
    /// [`Connections::shutdown`] is called or it is closed to make room; in the latter case,
    /// dropped if it still has not finished after [`EVICTION_GRACE`] with no request in flight.
    /// `None` when dropped so.
    async fn watch<C: GracefulConnection>(
        self: Arc<Self>,
        admitted: Admitted,
        conn: C,
    ) -> Option<C::Output> {
        let state = admitted.conn.clone();
        let mut conn = pin!(conn);
        let mut grace = pin!(None::<tokio::time::Sleep>);
        let mut told = false;
        let result = poll_fn(|cx| {
            if !told {
                // The waker first, then the flags: shutdown and eviction set a flag, then wake;
                // whichever comes first, this connection sees the flag now or is woken to see it.
                state.waker.register(cx.waker());
                let evicted = state.finish.load(Ordering::SeqCst);
                if evicted || self.closing.load(Ordering::SeqCst) {
                    conn.as_mut().graceful_shutdown();
                    told = true;
                    if evicted {
                        grace.set(Some(tokio::time::sleep(EVICTION_GRACE)));
                    }
                }
            }
            if let Some(sleep) = grace.as_mut().as_pin_mut()
                && sleep.poll(cx).is_ready()
            {
                if !state.is_busy() {
                    return Poll::Ready(None);
                }
                // A request came in meanwhile: it is answered, then the connection closes.
                grace.set(None);
            }
            conn.as_mut().poll(cx).map(Some)
        })
        .await;
        drop(admitted);
        result
    }

    /// Tells every open connection to finish, and waits until all have.
    async fn shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
        for caller in self.open().callers.values() {
            for slot in &caller.slots {
                slot.conn.waker.wake();
            }
        }
        loop {
            let mut drained = pin!(self.drained.notified());
            drained.as_mut().enable();
            if self.open().total == 0 {
                return;
            }
            drained.await;
        }
    }
}

/// The connection among `slots` idle the longest (by when it became idle, then by age), as
/// (owner, id); connections with a request in flight or already closing are passed over.
fn longest_idle<'a>(slots: impl Iterator<Item = (IpAddr, &'a Slot)>) -> Option<(IpAddr, u64)> {
    slots
        .filter(|(_, s)| !s.closing)
        .filter_map(|(ip, s)| {
            let since = s.conn.idle_since.load(Ordering::Relaxed);
            (since != BUSY).then_some(((since, s.id), ip))
        })
        .min_by_key(|(rank, _)| *rank)
        .map(|((_, id), ip)| (ip, id))
}

impl Open {
    /// Tells connection `id` of `owner` to finish; it stops counting against the caps.
    fn evict(&mut self, owner: IpAddr, id: u64) {
        let Some(caller) = self.callers.get_mut(&owner) else {
            return;
        };
        let Some(slot) = caller.slots.iter_mut().find(|s| s.id == id) else {
            return;
        };
        slot.closing = true;
        slot.conn.finish.store(true, Ordering::SeqCst);
        slot.conn.waker.wake();
        caller.live -= 1;
        self.live -= 1;
    }
}

/// A registered connection; dropping it takes the connection off the registry, however it ends.
struct Admitted {
    connections: Arc<Connections>,
    caller: IpAddr,
    id: u64,
    conn: Arc<Conn>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let connections = &self.connections;
        let mut open = connections.open();
        if let Some(caller) = open.callers.get_mut(&self.caller)
            && let Some(i) = caller.slots.iter().position(|s| s.id == self.id)
        {
            let slot = caller.slots.swap_remove(i);
            let live = !slot.closing;
            if live {
                caller.live -= 1;
            }
            let empty = caller.slots.is_empty();
            if empty {
                open.callers.remove(&self.caller);
            }
            open.total -= 1;
            if live {
                open.live -= 1;
            }
        }
        connections.metrics.connections_open(open.total);
        if open.total + 1 == connections.ceiling {
            connections.room.notify_waiters();
        }
        if open.total == 0 {
            connections.drained.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    use super::*;

    /// A test server: answers `done`, after `delay` for `GET /slow`.
    struct Server {
        addr: SocketAddr,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        connections: Arc<Connections>,
        metrics: Arc<Metrics>,
        /// Requests for `/slow` that have reached the handler.
        slow_started: Arc<AtomicUsize>,
    }

    async fn start_with(delay: Duration, options: ServerOptions) -> Server {
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let slow_started = Arc::new(AtomicUsize::new(0));
        let started = slow_started.clone();
        let handler = Arc::new(move |_caller: IpAddr| {
            let started = started.clone();
            move |req: Request<Incoming>| {
                let slow = req.uri().path() == "/slow";
                if slow {
                    started.fetch_add(1, Ordering::SeqCst);
                }
                async move {
                    if slow {
                        tokio::time::sleep(delay).await;
                    }
                    Response::new(Full::new(Bytes::from_static(b"done")))
                }
            }
        });
        let metrics = Arc::new(Metrics::default());
        let connections = Connections::new(
            ServerOptions {
                keep_alive: true,
                drain_timeout: Duration::from_secs(10),
                ..options
            },
            metrics.clone(),
        );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            "test",
            handler,
            connections.clone(),
            shutdown.clone(),
        ));
        Server {
            addr,
            shutdown,
            task,
            connections,
            metrics,
            slow_started,
        }
    }

    /// Serves a handler that answers `/slow` after `delay` on a kept-alive loopback listener;
    /// returns its address, the shutdown token, and the serving task.
    async fn start(
        delay: Duration,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let s = start_with(delay, ServerOptions::default()).await;
        (s.addr, s.shutdown, s.task)
    }

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    const SLOW: &[u8] = b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n";

    /// A connection to `addr` from the loopback address `source` (127.0.0.2 is another caller).
    async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(source.parse().expect("ip"), 0))
            .expect("bind the client to its source address");
        socket.connect(addr).await.expect("connect")
    }

    /// Reads one whole answer (it ends with the body `done`) within 10 s.
    async fn answer(c: &mut TcpStream) -> String {
        let mut bytes = Vec::new();
        let read = async {
            let mut buf = [0u8; 512];
            while !bytes.ends_with(b"done") {
                let n = c.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed before the answer: {bytes:?}");
                bytes.extend_from_slice(&buf[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("answered within 10 s");
        let text = String::from_utf8_lossy(&bytes).into_owned();
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        text
    }

    /// Sends a request and reads its answer.
    async fn request(c: &mut TcpStream) {
        c.write_all(REQUEST).await.expect("write");
        answer(c).await;
    }

    /// Whether the server closed `c` (end of stream or reset, with nothing sent) within 10 s.
    async fn closed_by_server(c: &mut TcpStream) -> bool {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) | Err(_) => false,
        }
    }

    /// Waits (up to 10 s) until `n` requests for `/slow` are being handled.
    async fn slow_requests_started(s: &Server, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.slow_started.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "{n} slow requests never started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn at_its_limit_a_callers_longest_idle_connection_is_closed_first() {
        let s = start_with(
            Duration::ZERO,
            ServerOptions {
                max_connections_per_caller: 3,
                ..ServerOptions::default()
            },
        )
        .await;
        let mut a = connect_from("127.0.0.1", s.addr).await;
        request(&mut a).await;
        let mut b = connect_from("127.0.0.1", s.addr).await;
        request(&mut b).await;
        let mut c = connect_from("127.0.0.1", s.addr).await;
        request(&mut c).await;
        // `a` was opened first but used last: `b` has been idle the longest.
        request(&mut a).await;

        let mut d = connect_from("127.0.0.1", s.addr).await;
        request(&mut d).await;
        assert!(
            closed_by_server(&mut b).await,
            "b, idle the longest, made room"
        );
        for conn in [&mut a, &mut c, &mut d] {
            request(conn).await;
        }
        assert_eq!(s.metrics.closed_for("caller_limit"), 1);
        assert_eq!(s.metrics.refused_for("test", "caller_limit"), 0);
    }

    #[tokio::test]
    async fn a_connection_with_a_request_in_flight_is_never_cut_to_make_room() {
        let s = start_with(
            Duration::from_millis(500),
            ServerOptions {
                max_connections_per_caller: 2,
                ..ServerOptions::default()
            },
        )
        .await;
        // `a` is busy (oldest, but its request is in flight); `b` is idle.
        let mut a = connect_from("127.0.0.1", s.addr).await;
        a.write_all(SLOW).await.expect("write");
        slow_requests_started(&s, 1).await;
        let mut b = connect_from("127.0.0.1", s.addr).await;
        request(&mut b).await;

        let mut c = connect_from("127.0.0.1", s.addr).await;
        request(&mut c).await;
        assert!(closed_by_server(&mut b).await, "the idle one made room");
        answer(&mut a).await;

        // Both open connections busy: nothing can make room, the new one is closed at once and
        // the requests in flight are answered in full.
        a.write_all(SLOW).await.expect("write");
        c.write_all(SLOW).await.expect("write");
        slow_requests_started(&s, 3).await;
        let mut d = connect_from("127.0.0.1", s.addr).await;
        assert!(closed_by_server(&mut d).await, "refused");
        answer(&mut a).await;
        answer(&mut c).await;
        assert_eq!(s.metrics.closed_for("caller_limit"), 1);
        assert_eq!(s.metrics.refused_for("test", "caller_limit"), 1);
    }

    #[tokio::test]
    async fn one_callers_flood_closes_only_its_own_connections() {
        let s = start_with(
            Duration::ZERO,
            ServerOptions {
                max_connections_per_caller: 2,
                ..ServerOptions::default()
            },
        )
        .await;
        let mut other = connect_from("127.0.0.1", s.addr).await;
        request(&mut other).await;
        // Connections that never send a request are idle from the moment they are accepted.
        let mut flood = Vec::new();
        for _ in 0..6 {
            flood.push(connect_from("127.0.0.2", s.addr).await);
        }
        for (i, conn) in flood.iter_mut().enumerate() {
            if i < 4 {
                assert!(closed_by_server(conn).await, "flood connection {i}");
            } else {
                request(conn).await;
            }
        }
        request(&mut other).await;
        let mut another = connect_from("127.0.0.1", s.addr).await;
        request(&mut another).await;
        request(&mut other).await;
        assert_eq!(s.metrics.closed_for("caller_limit"), 4);
        assert_eq!(s.connections.open_count(), 4);
    }

    #[tokio::test]
    async fn at_the_global_limit_the_longest_idle_connection_of_anyone_is_closed() {
        let s = start_with(
            Duration::ZERO,
            ServerOptions {
                max_connections: 3,
                ..ServerOptions::default()
            },
        )
        .await;
        let mut a = connect_from("127.0.0.1", s.addr).await;
        request(&mut a).await;
        let mut b = connect_from("127.0.0.2", s.addr).await;
        request(&mut b).await;
        let mut c = connect_from("127.0.0.1", s.addr).await;
        request(&mut c).await;
        request(&mut a).await;

        let mut d = connect_from("127.0.0.3", s.addr).await;
        request(&mut d).await;
        assert!(closed_by_server(&mut b).await, "b, idle the longest");
        for conn in [&mut a, &mut c, &mut d] {
            request(conn).await;
        }
        assert_eq!(s.metrics.closed_for("global_limit"), 1);
    }

    #[test]
    fn the_global_cap_leaves_a_reserve_below_the_descriptor_limit() {
        let options = ServerOptions::default();
        let fit = |soft: Option<u64>| {
            let o = fit_to_descriptors(&options, DescriptorLimit { soft, hard: soft });
            (o.max_connections, o.max_connections_per_caller)
        };
        assert_eq!(fit(Some(256)), (192, 192));
        assert_eq!(fit(Some(1024)), (896, DEFAULT_MAX_CONNECTIONS_PER_CALLER));
        assert_eq!(fit(Some(20_000)), (DEFAULT_MAX_CONNECTIONS, 512));
        assert_eq!(fit(None), (DEFAULT_MAX_CONNECTIONS, 512));
        assert_eq!(fit(Some(10)).0, 5);
        // Connections being closed may exceed the cap by a little: never up to the limit.
        for soft in [64, 256, 1024, 4096, 65_536, 1 << 20] {
            let max = fit_to_descriptors(
                &ServerOptions {
                    max_connections: MAX_CONNECTIONS_LIMIT,
                    ..ServerOptions::default()
                },
                DescriptorLimit {
                    soft: Some(soft),
                    hard: Some(soft),
                },
            )
            .max_connections;
            let ceiling = Connections::new(
                ServerOptions {
                    max_connections: max,
                    ..ServerOptions::default()
                },
                Arc::new(Metrics::default()),
            )
            .ceiling;
            let ceiling = u64::try_from(ceiling).expect("fits");
            assert!(
                ceiling + (soft / 4).min(32) <= soft,
                "{soft}: ceiling {ceiling}"
            );
        }
    }

    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_backlog() {
        // Nothing accepts: more connections than the usual backlog of 128 still complete their
        // handshake, because the listener queues up to LISTEN_BACKLOG (or somaxconn).
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut queued = Vec::new();
        for i in 0..300 {
            let c = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
                .await
                .unwrap_or_else(|_| panic!("connection {i} was not queued"))
                .expect("connect");
            queued.push(c);
        }
        drop(listener);
    }

    #[tokio::test]
    async fn an_address_in_use_says_so() {
        let first = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = first.local_addr().expect("addr");
        let err = bind(addr).await.expect_err("in use");
        assert!(!err.is_configuration);
        assert!(err.to_string().contains("already in use"), "{err}");
    }

    #[tokio::test]
    async fn a_restart_rebinds_while_old_connections_are_in_time_wait() {
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (server_side, _) = listener.accept().await.expect("accept");
        // The server closes first, so its end of the connection lingers in TIME_WAIT.
        drop(server_side);
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).await.expect("read"), 0);
        drop(client);
        drop(listener);
        bind(addr)
            .await
            .expect("SO_REUSEADDR lets the address be bound again");
    }

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
        c.write_all(SLOW).await.expect("write");
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
