//! The load driver: a closed-loop HTTP/1.1 client on tokio sockets (crates.io's `tokio`), with a
//! deliberately small request writer and response reader so that as much of the two cores as
//! possible is left to the server under test.
//!
//! Two patterns, as in the scenarios:
//! - **kept-alive**: each worker holds one connection (and one IMDSv2 token) per caller it plays,
//!   and sends credential GETs on them round-robin;
//! - **SDK**: what an AWS SDK does for every credential refresh against EC2, which closes each
//!   connection: a new connection for the token PUT, another for the role listing, another for the
//!   credentials GET.
//!
//! A caller can be bound to its own loopback source address (127.0.x.y), so the daemon sees
//! distinct callers. Every response is checked (status, and the credentials document's
//! `"Code" : "Success"`); failures are counted and the first one is kept for the report.
//!
//! Runs are bounded twice: by time (warm-up + measured window) and by a cap on operations.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

pub const CREDENTIALS_PREFIX: &str = "/latest/meta-data/iam/security-credentials/";
const USER_AGENT: &str = "aws-sdk-rust/1.3.9 os/linux lang/rust/1.95.0";
const SUCCESS: &[u8] = b"{\n  \"Code\" : \"Success\"";
/// No single request may take longer than this; a stuck server fails the run instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// One caller: where it calls from and the role it expects to be listed.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Bind the client socket here before connecting; `None` lets the kernel pick (127.0.0.1).
    pub source: Option<IpAddr>,
    pub role: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    KeepAlive,
    Sdk,
}

/// What to run against one server.
#[derive(Debug, Clone)]
pub struct Plan {
    pub addr: SocketAddr,
    pub callers: Arc<Vec<Caller>>,
    pub pattern: Pattern,
    /// Workers, each with one request in flight.
    pub concurrency: usize,
    pub warmup: Duration,
    pub measure: Duration,
    /// Upper bound on measured operations over all workers.
    pub max_ops: u64,
    /// Check that the role listing names the caller's own role (the floor lists one role for
    /// everybody, so for it only a non-empty listing is checked).
    pub exact_listing: bool,
}

/// What one run measured (only operations that started inside the measured window count).
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    /// Operations: a request (kept-alive) or a token + listing + credentials sequence (SDK).
    pub ops: u64,
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// Latency of every measured operation, in microseconds, sorted.
    pub latencies_us: Vec<u32>,
}

impl RunResult {
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile (0..=1) in microseconds.
    pub fn percentile_us(&self, q: f64) -> u32 {
        percentile(&self.latencies_us, q)
    }
}

pub fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64) * q).floor() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A connection and its read buffer.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// A response's status and where its body sits in the connection's buffer.
pub struct Resp {
    pub status: u16,
    body: std::ops::Range<usize>,
}

impl Conn {
    pub async fn connect(source: Option<IpAddr>, addr: SocketAddr) -> io::Result<Conn> {
        let stream = match source {
            None => tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr)).await??,
            Some(ip) => {
                let socket = match ip {
                    IpAddr::V4(_) => TcpSocket::new_v4()?,
                    IpAddr::V6(_) => TcpSocket::new_v6()?,
                };
                socket.bind(SocketAddr::new(ip, 0))?;
                tokio::time::timeout(IO_TIMEOUT, socket.connect(addr)).await??
            }
        };
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends `request` and reads one response (by `Content-Length`).
    pub async fn roundtrip(&mut self, request: &[u8]) -> io::Result<Resp> {
        tokio::time::timeout(IO_TIMEOUT, self.exchange(request))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no response within 5 s"))?
    }

    async fn exchange(&mut self, request: &[u8]) -> io::Result<Resp> {
        self.stream.write_all(request).await?;
        self.buf.clear();
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            self.fill().await?;
        };
        let head = &self.buf[..head_end];
        let status = head
            .get(9..12)
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid("no status line"))?;
        let length = head
            .split(|b| *b == b'\n')
            .find_map(|line| {
                let line = std::str::from_utf8(line).ok()?;
                let (k, v) = line.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .ok_or_else(|| invalid("no Content-Length"))?;
        let start = head_end + 4;
        while self.buf.len() < start + length {
            self.fill().await?;
        }
        Ok(Resp {
            status,
            body: start..start + length,
        })
    }

    async fn fill(&mut self) -> io::Result<()> {
        self.buf.reserve(4096);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection mid-response",
            ));
        }
        Ok(())
    }

    pub fn body(&self, r: &Resp) -> &[u8] {
        &self.buf[r.body.clone()]
    }

    /// Closes with a reset instead of a FIN, so that neither end keeps the connection in
    /// TIME_WAIT. The SDK pattern opens tens of thousands of connections a second; in TIME_WAIT
    /// for a minute each, they fill the kernel's table (`tcp_max_tw_buckets`) within seconds, and
    /// then new connections from a bound source address start colliding with old ones and
    /// hanging. Daemon and floor are closed alike, after the whole response has been read.
    pub fn reset(self) {
        let _ = self.stream.set_zero_linger();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

pub fn token_request() -> Vec<u8> {
    format!(
        "PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: {USER_AGENT}\r\n\
         X-aws-ec2-metadata-token-ttl-seconds: 21600\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

pub fn get_request(path: &str, token: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: {USER_AGENT}\r\n\
         X-aws-ec2-metadata-token: {token}\r\n\r\n"
    )
    .into_bytes()
}

/// Asks for a token on `conn`.
pub async fn token(conn: &mut Conn) -> io::Result<String> {
    let r = conn.roundtrip(&token_request()).await?;
    if r.status != 200 {
        return Err(invalid(&format!("token PUT answered {}", r.status)));
    }
    String::from_utf8(conn.body(&r).to_vec()).map_err(|_| invalid("token is not UTF-8"))
}

/// Checks a credentials response.
pub fn check_credentials(conn: &Conn, r: &Resp) -> io::Result<()> {
    if r.status != 200 {
        return Err(invalid(&format!("credentials GET answered {}", r.status)));
    }
    if !conn.body(r).starts_with(SUCCESS) {
        return Err(invalid(&format!(
            "credentials GET answered {:?}",
            String::from_utf8_lossy(conn.body(r))
        )));
    }
    Ok(())
}

/// Fetches the credentials document `caller` gets from the server at `addr` (to give the floor
/// the very same bytes).
pub async fn fetch_document(addr: SocketAddr, caller: &Caller) -> io::Result<Vec<u8>> {
    let mut conn = Conn::connect(caller.source, addr).await?;
    let token = token(&mut conn).await?;
    let mut conn = Conn::connect(caller.source, addr).await?;
    let path = format!("{CREDENTIALS_PREFIX}{}", caller.role);
    let r = conn.roundtrip(&get_request(&path, &token)).await?;
    check_credentials(&conn, &r)?;
    Ok(conn.body(&r).to_vec())
}

#[derive(Default)]
struct WorkerResult {
    ops: u64,
    requests: u64,
    errors: u64,
    first_error: Option<String>,
    latencies_us: Vec<u32>,
}

impl WorkerResult {
    fn error(&mut self, e: &io::Error, measured: bool) {
        if measured {
            self.errors += 1;
        }
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

/// Runs `plan` and gathers what every worker measured.
pub async fn run(plan: &Plan) -> RunResult {
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let deadline = measure_from + plan.measure;
    let per_worker_cap = (plan.max_ops / plan.concurrency as u64).max(1);
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..plan.concurrency {
        // Worker `w` plays callers w, w + C, w + 2C, … (or caller w mod n when there are fewer
        // callers than workers), so every caller is exercised and the load stays even.
        let n = plan.callers.len();
        let mine: Vec<Caller> = if n <= plan.concurrency {
            vec![plan.callers[w % n].clone()]
        } else {
            (w..n)
                .step_by(plan.concurrency)
                .map(|i| plan.callers[i].clone())
                .collect()
        };
        let addr = plan.addr;
        let pattern = plan.pattern;
        let exact = plan.exact_listing;
        workers.spawn(async move {
            match pattern {
                Pattern::KeepAlive => {
                    keep_alive(addr, mine, measure_from, deadline, per_worker_cap).await
                }
                Pattern::Sdk => {
                    sdk(addr, mine, exact, measure_from, deadline, per_worker_cap).await
                }
            }
        });
    }
    let mut total = RunResult::default();
    while let Some(done) = workers.join_next().await {
        let w = match done {
            Ok(w) => w,
            Err(e) => WorkerResult {
                errors: 1,
                first_error: Some(format!("worker failed: {e}")),
                ..WorkerResult::default()
            },
        };
        total.ops += w.ops;
        total.requests += w.requests;
        total.errors += w.errors;
        if total.first_error.is_none() {
            total.first_error = w.first_error;
        }
        total.latencies_us.extend(w.latencies_us);
    }
    total.elapsed = Instant::now()
        .min(deadline)
        .saturating_duration_since(measure_from);
    total.latencies_us.sort_unstable();
    total
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

async fn keep_alive(
    addr: SocketAddr,
    callers: Vec<Caller>,
    measure_from: Instant,
    deadline: Instant,
    cap: u64,
) -> WorkerResult {
    let mut result = WorkerResult {
        latencies_us: Vec::with_capacity(usize::try_from(cap.min(1 << 20)).unwrap_or(0)),
        ..WorkerResult::default()
    };
    // One connection and token per caller, set up before the clock starts.
    let mut conns = Vec::with_capacity(callers.len());
    for caller in &callers {
        let setup = async {
            let mut conn = Conn::connect(caller.source, addr).await?;
            let token = token(&mut conn).await?;
            let path = format!("{CREDENTIALS_PREFIX}{}", caller.role);
            io::Result::Ok((conn, get_request(&path, &token), caller.source))
        };
        match setup.await {
            Ok(c) => conns.push(c),
            Err(e) => {
                result.errors += 1;
                result.error(&e, false);
                return result;
            }
        }
    }
    let mut i = 0;
    loop {
        let began = Instant::now();
        if began >= deadline || result.ops >= cap {
            break;
        }
        let measured = began >= measure_from;
        let (conn, request, source) = &mut conns[i];
        i = (i + 1) % callers.len();
        let outcome = match conn.roundtrip(request).await {
            Ok(r) => check_credentials(conn, &r),
            Err(e) => Err(e),
        };
        if let Err(e) = outcome {
            result.error(&e, measured);
            // The connection is unusable now; open another for this caller.
            tokio::time::sleep(Duration::from_millis(1)).await;
            if let Ok(fresh) = Conn::connect(*source, addr).await {
                *conn = fresh;
            }
            continue;
        }
        if measured {
            result.ops += 1;
            result.requests += 1;
            result.latencies_us.push(micros(began.elapsed()));
        }
    }
    result
}

async fn sdk(
    addr: SocketAddr,
    callers: Vec<Caller>,
    exact_listing: bool,
    measure_from: Instant,
    deadline: Instant,
    cap: u64,
) -> WorkerResult {
    let mut result = WorkerResult {
        latencies_us: Vec::with_capacity(usize::try_from(cap.min(1 << 18)).unwrap_or(0)),
        ..WorkerResult::default()
    };
    let put = token_request();
    let requests: Vec<(String, String)> = callers
        .iter()
        .map(|c| (format!("{CREDENTIALS_PREFIX}{}", c.role), c.role.clone()))
        .collect();
    let mut i = 0;
    loop {
        let began = Instant::now();
        if began >= deadline || result.ops >= cap {
            break;
        }
        let measured = began >= measure_from;
        let caller = &callers[i];
        let (path, role) = &requests[i];
        i = (i + 1) % callers.len();
        let iteration = async {
            let mut conn = Conn::connect(caller.source, addr).await?;
            let r = conn.roundtrip(&put).await?;
            if r.status != 200 {
                return Err(invalid(&format!("token PUT answered {}", r.status)));
            }
            let token = String::from_utf8_lossy(conn.body(&r)).into_owned();
            conn.reset();

            let mut conn = Conn::connect(caller.source, addr).await?;
            let r = conn
                .roundtrip(&get_request(CREDENTIALS_PREFIX, &token))
                .await?;
            let listed = conn.body(&r);
            let wrong = if exact_listing {
                listed != role.as_bytes()
            } else {
                listed.is_empty()
            };
            if r.status != 200 || wrong {
                return Err(invalid(&format!(
                    "role listing answered {} {:?}",
                    r.status,
                    String::from_utf8_lossy(conn.body(&r))
                )));
            }
            conn.reset();

            let mut conn = Conn::connect(caller.source, addr).await?;
            let r = conn.roundtrip(&get_request(path, &token)).await?;
            let checked = check_credentials(&conn, &r);
            conn.reset();
            checked
        };
        match iteration.await {
            Ok(()) => {
                if measured {
                    result.ops += 1;
                    result.requests += 3;
                    result.latencies_us.push(micros(began.elapsed()));
                }
            }
            Err(e) => {
                result.error(&e, measured);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    result
}
