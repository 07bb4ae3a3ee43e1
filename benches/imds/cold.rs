//! Scenario (d), cold: many callers whose roles nobody has asked for yet call at the same moment,
//! against moto's STS. What matters is that each role costs exactly one AssumeRole however many
//! callers want it (single flight), and that every caller is answered well inside the SDKs'
//! one-second timeout.
//!
//! AssumeRole calls are counted twice: by a counting HTTP proxy between the daemon and moto (what
//! really went over the wire, SDK retries included) and by the daemon's own
//! `imdsd_sts_calls_total`. The same number of AssumeRole calls made directly to moto, all at once,
//! with the AWS SDK for Rust is the floor: how long moto itself takes.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::time::Instant;

use crate::load::{self, CREDENTIALS_PREFIX, Conn};
use crate::procs::{self, Daemon, OPERATOR_ENV};

/// One cold burst.
#[derive(Debug, Clone, Default)]
pub struct ColdResult {
    pub roles: usize,
    pub callers: usize,
    pub answered: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    /// Each caller's credentials GET, from the moment all were released; sorted.
    pub latencies_us: Vec<u32>,
    /// AssumeRole requests the proxy saw.
    pub wire_assume_calls: u64,
    /// `imdsd_sts_calls_total` after the burst (it is 0 before: the roles are not prefetched).
    pub daemon_sts_calls: f64,
    /// The same number of AssumeRole calls straight to moto, all at once; sorted.
    pub direct_latencies_us: Vec<u32>,
    pub direct_errors: usize,
}

/// Counts AssumeRole calls on their way to moto.
pub struct CountingProxy {
    pub url: String,
    assume_calls: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    pub async fn start(upstream: &str) -> CountingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let assume_calls = Arc::new(AtomicU64::new(0));
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let upstream = Arc::new(upstream.to_string());
        let calls = assume_calls.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (client, upstream, calls) = (client.clone(), upstream.clone(), calls.clone());
                let service = service_fn(move |req: Request<Incoming>| {
                    let (client, upstream, calls) =
                        (client.clone(), upstream.clone(), calls.clone());
                    async move { Ok::<_, Infallible>(forward(req, &client, &upstream, &calls).await) }
                });
                tokio::spawn(async move {
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        CountingProxy {
            url,
            assume_calls,
            task,
        }
    }

    pub fn assume_calls(&self) -> u64 {
        self.assume_calls.load(Ordering::SeqCst)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    req: Request<Incoming>,
    client: &Client<HttpConnector, Full<Bytes>>,
    upstream: &str,
    calls: &AtomicU64,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if body.windows(18).any(|w| w == b"Action=AssumeRole&") {
        calls.fetch_add(1, Ordering::SeqCst);
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = Request::builder()
        .method(parts.method)
        .uri(format!("{upstream}{path}"));
    for (k, v) in &parts.headers {
        if k != http::header::TRANSFER_ENCODING && k != http::header::CONNECTION {
            out = out.header(k, v);
        }
    }
    let Ok(out) = out.body(Full::new(body)) else {
        return status(StatusCode::BAD_REQUEST);
    };
    match client.request(out).await {
        Ok(res) => {
            let (mut parts, body) = res.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            parts.headers.remove(http::header::TRANSFER_ENCODING);
            parts.headers.remove(http::header::CONNECTION);
            Response::from_parts(parts, Full::new(body))
        }
        Err(_) => status(StatusCode::BAD_GATEWAY),
    }
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::new()));
    *res.status_mut() = code;
    res
}

/// Caller `i`'s loopback address for the cold scenario (127.0.20.1 onwards).
fn caller_ip(i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).unwrap_or(u32::MAX);
    Ipv4Addr::new(
        127,
        0,
        u8::try_from(20 + i / 250).unwrap_or(255),
        u8::try_from(i % 250 + 1).unwrap_or(255),
    )
}

/// One burst: a fresh daemon, `roles × per_role` callers released at once.
pub fn run(
    rt: &tokio::runtime::Runtime,
    moto: &procs::Moto,
    round: usize,
    roles: usize,
    per_role: usize,
) -> ColdResult {
    let proxy = rt.block_on(CountingProxy::start(&moto.url));
    // `/32` networks rather than addresses: the daemon prefetches exact-address entries at
    // startup, and this scenario is about roles nobody has asked for yet.
    let mut mapping = serde_json::Map::new();
    let mut callers = Vec::new();
    for r in 0..roles {
        for k in 0..per_role {
            let ip = caller_ip(r * per_role + k);
            let role = format!("cold-{round}-{r:03}");
            mapping.insert(
                format!("{ip}/32"),
                serde_json::json!({"role": role, "session_name": format!("cold-{r:03}")}),
            );
            callers.push(load::Caller {
                source: Some(IpAddr::V4(ip)),
                role,
            });
        }
    }
    let file = tempfile::NamedTempFile::new().expect("a mapping file");
    std::fs::write(file.path(), serde_json::Value::Object(mapping).to_string())
        .expect("write the mapping file");
    let path = file.path().to_str().expect("utf-8 path").to_string();
    let daemon = Daemon::start(
        &["--sts-endpoint", &proxy.url, "--role-mapping-file", &path],
        OPERATOR_ENV,
    );
    let before = proxy.assume_calls();
    let mut result = ColdResult {
        roles,
        callers: callers.len(),
        ..ColdResult::default()
    };

    rt.block_on(async {
        let (release, wait) = tokio::sync::watch::channel(None::<Instant>);
        let mut tasks = tokio::task::JoinSet::new();
        for caller in callers {
            let mut wait = wait.clone();
            let addr = daemon.addr;
            tasks.spawn(async move {
                // The token first (no STS involved), then every credentials GET at once.
                let mut conn = Conn::connect(caller.source, addr).await?;
                let token = load::token(&mut conn).await?;
                let request =
                    load::get_request(&format!("{CREDENTIALS_PREFIX}{}", caller.role), &token);
                let mut conn = Conn::connect(caller.source, addr).await?;
                let start = wait
                    .wait_for(Option::is_some)
                    .await
                    .map_err(std::io::Error::other)?
                    .unwrap_or_else(Instant::now);
                let r = conn.roundtrip(&request).await?;
                load::check_credentials(&conn, &r)?;
                std::io::Result::Ok(u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX))
            });
        }
        // Let every caller connect and get its token before the release.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = release.send(Some(Instant::now()));
        while let Some(done) = tasks.join_next().await {
            match done.map_err(std::io::Error::other).and_then(|r| r) {
                Ok(us) => {
                    result.answered += 1;
                    result.latencies_us.push(us);
                }
                Err(e) => {
                    result.errors += 1;
                    result.first_error.get_or_insert(e.to_string());
                }
            }
        }
        // Anything late (a retry, a duplicate) would show up here.
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
    result.latencies_us.sort_unstable();
    result.wire_assume_calls = proxy.assume_calls() - before;
    result.daemon_sts_calls = daemon.metric("sts_calls_total").unwrap_or(f64::NAN);
    drop(daemon);
    let direct = rt.block_on(direct(&moto.url, round, roles));
    result.direct_errors = direct.iter().filter(|d| d.is_none()).count();
    result.direct_latencies_us = direct.into_iter().flatten().collect();
    result.direct_latencies_us.sort_unstable();
    result
}

/// `roles` AssumeRole calls straight to moto, all at once, with the AWS SDK for Rust: each one's
/// latency, or `None` if it failed.
async fn direct(url: &str, round: usize, roles: usize) -> Vec<Option<u32>> {
    use aws_sdk_sts::config::{BehaviorVersion, Credentials, Region};
    let (key, secret) = (OPERATOR_ENV[0].1, OPERATOR_ENV[1].1);
    let conf = aws_sdk_sts::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(key, secret, None, None, "bench"))
        .endpoint_url(url)
        .build();
    let client = aws_sdk_sts::Client::from_conf(conf);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for r in 0..roles {
        let client = client.clone();
        tasks.spawn(async move {
            let outcome = client
                .assume_role()
                .role_arn(format!(
                    "arn:aws:iam::123456789012:role/direct-{round}-{r:03}"
                ))
                .role_session_name(format!("direct-{r:03}"))
                .send()
                .await;
            outcome
                .is_ok()
                .then(|| u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX))
        });
    }
    tasks.join_all().await
}
