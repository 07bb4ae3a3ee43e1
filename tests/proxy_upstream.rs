//! Proxy mode, the upstream side (issue 7): `imdsd::proxy::Upstream` forwarding to a real
//! metadata service. The upstream is imdsd itself in emulate mode with `--http-tokens required`
//! (in this process, or as the real binary when it must restart), so every forward must carry the
//! daemon's own valid token. Wire-level details (which headers go out) and failure modes (a
//! silent upstream, IMDSv1 only, oversized answers) use small TCP servers written here.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Daemon, Process, RawResponse, raw};
use http::Method;
use imdsd::proxy::{Forwarded, ProxyOptions, Upstream, UpstreamError, expand_allow_list};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const UPSTREAM_ARGS: &[&str] = &[
    "--fake-credentials",
    "--http-tokens",
    "required",
    "hostrole",
];
const USER_DATA: &str = "#!/bin/sh\necho \"proxied user data\"\n";

fn upstream_at(url: &str, timeout: Duration) -> Upstream {
    Upstream::new(ProxyOptions {
        upstream: url.to_string(),
        allow: None,
        hide_user_data: false,
        timeout,
        token_ttl: Duration::from_secs(21_600),
    })
    .expect("valid proxy options")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A GET straight to the upstream with a valid token of the test's own.
async fn direct(addr: SocketAddr, path: &str) -> RawResponse {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        let token = common::token(addr, 60);
        raw(
            addr,
            "GET",
            &path,
            &[("X-aws-ec2-metadata-token", token.as_str())],
        )
    })
    .await
    .expect("direct request")
}

async fn forward(u: &Upstream, path: &str) -> Forwarded {
    u.forward(&Method::GET, path)
        .await
        .unwrap_or_else(|e| panic!("forward {path}: {e}"))
}

/// A sample of the upstream's Prometheus metrics; the series must be there.
async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let name = series.to_string();
    tokio::task::spawn_blocking(move || common::metric(admin, &name))
        .await
        .expect("metrics request")
        .unwrap_or_else(|| panic!("no {series} in the metrics"))
}

fn assert_same(path: &str, forwarded: &Forwarded, direct: &RawResponse) {
    assert_eq!(forwarded.status.as_u16(), direct.status, "{path}: status");
    assert_eq!(
        String::from_utf8_lossy(&forwarded.body),
        String::from_utf8_lossy(&direct.body),
        "{path}: body"
    );
    assert_eq!(forwarded.body.as_ref(), direct.body.as_slice(), "{path}");
    assert_eq!(
        forwarded
            .content_type
            .as_ref()
            .map(|v| v.to_str().expect("ascii")),
        direct.header("content-type"),
        "{path}: content type"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_answers_are_the_upstream_answers_byte_for_byte() {
    let config = tempfile::NamedTempFile::new().expect("tempfile");
    std::fs::write(
        config.path(),
        format!("[instance]\nuser_data = {}\n", toml_string(USER_DATA)),
    )
    .expect("write config");
    let mut args = vec!["--config", config.path().to_str().expect("utf8")];
    args.extend_from_slice(UPSTREAM_ARGS);
    let d = Daemon::start(&args).await;
    let u = upstream_at(&d.url(), Duration::from_secs(2));

    for path in [
        "/latest/meta-data/instance-id",
        "/latest/dynamic/instance-identity/document",
        "/latest/meta-data/",
        "/latest/meta-data/placement",
        "/latest/user-data",
        "/2021-01-03/user-data",
        "/latest/meta-data/no-such-key",
        "/2099-01-01/meta-data/instance-id",
    ] {
        let forwarded = forward(&u, path).await;
        let direct = direct(d.addr, path).await;
        assert_same(path, &forwarded, &direct);
    }

    // The comparisons above are not vacuous: these are the values the upstream serves.
    let user_data = forward(&u, "/latest/user-data").await;
    assert_eq!(user_data.status, 200);
    assert_eq!(user_data.body.as_ref(), USER_DATA.as_bytes());
    assert_eq!(
        user_data.content_type.as_ref().map(|v| v.as_bytes()),
        Some(&b"application/octet-stream"[..])
    );
    let id = forward(&u, "/latest/meta-data/instance-id").await;
    assert_eq!(id.status, 200);
    assert!(id.body.starts_with(b"i-"), "{id:?}");
    let missing = forward(&u, "/latest/meta-data/no-such-key").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.body.len(), 339, "EC2's 404 page passes through");
    assert_eq!(
        missing.content_type.as_ref().map(|v| v.as_bytes()),
        Some(&b"text/html"[..])
    );

    // HEAD is asked as GET: the body is there for the HTTP layer to size the answer.
    let head = u
        .forward(&Method::HEAD, "/latest/meta-data/instance-id")
        .await
        .expect("HEAD");
    assert_eq!(head.body, id.body);
}

/// TOML basic string for `s`.
fn toml_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_token_serves_many_forwards_against_a_token_requiring_upstream() {
    let d = Daemon::start(UPSTREAM_ARGS).await;
    let admin = d.admin.expect("admin API");
    assert_eq!(metric(admin, "imdsd_tokens_issued_total").await, 0.0);
    let u = upstream_at(&d.url(), Duration::from_secs(2));

    // Without a token the upstream refuses (so a 200 below means the daemon's token was used).
    let bare = tokio::task::spawn_blocking({
        let addr = d.addr;
        move || raw(addr, "GET", "/latest/meta-data/instance-id", &[])
    })
    .await
    .expect("bare request");
    assert_eq!(bare.status, 401);

    // Many at once while no session exists yet: one PUT between them.
    let concurrent = futures::future::join_all((0..16).map(|_| {
        let u = u.clone();
        async move {
            u.forward(&Method::GET, "/latest/meta-data/instance-id")
                .await
        }
    }))
    .await;
    for r in concurrent {
        assert_eq!(r.expect("forward").status, 200);
    }
    for _ in 0..10 {
        assert_eq!(
            forward(&u, "/latest/meta-data/local-ipv4").await.status,
            200
        );
    }
    assert_eq!(u.token_fetches(), 1);
    assert_eq!(metric(admin, "imdsd_tokens_issued_total").await, 1.0);
}

fn spawn_upstream(port: u16, state: &std::path::Path) -> Process {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--listen",
        listen.as_str(),
        "--state-dir",
        state.to_str().expect("utf8"),
    ];
    args.extend_from_slice(UPSTREAM_ARGS);
    let p = Process::spawn(&args, &[]);
    p.addr();
    p
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_session_is_replaced_and_the_request_retried() {
    let port = free_port();
    let first_state = tempfile::tempdir().expect("tempdir");
    let second_state = tempfile::tempdir().expect("tempdir");
    let upstream = spawn_upstream(port, first_state.path());
    let u = upstream_at(&format!("http://127.0.0.1:{port}"), Duration::from_secs(2));
    assert_eq!(
        forward(&u, "/latest/meta-data/instance-id").await.status,
        200
    );
    assert_eq!(u.token_fetches(), 1);

    // Another state directory, another token key: the daemon's cached token is now refused.
    drop(upstream);
    let upstream = spawn_upstream(port, second_state.path());
    let path = "/latest/dynamic/instance-identity/document";
    let forwarded = forward(&u, path).await;
    assert_eq!(forwarded.status, 200, "{forwarded:?}");
    assert_eq!(u.token_fetches(), 2);
    assert_same(path, &forwarded, &direct(upstream.addr(), path).await);
    // And the new session sticks.
    assert_eq!(forward(&u, path).await.status, 200);
    assert_eq!(u.token_fetches(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_is_down_is_reported_at_once_and_its_return_noticed() {
    let port = free_port();
    let state = tempfile::tempdir().expect("tempdir");
    let upstream = spawn_upstream(port, state.path());
    let timeout = Duration::from_secs(3);
    let u = upstream_at(&format!("http://127.0.0.1:{port}"), timeout);
    assert_eq!(
        forward(&u, "/latest/meta-data/instance-id").await.status,
        200
    );

    drop(upstream);
    let started = Instant::now();
    let err = u
        .forward(&Method::GET, "/latest/meta-data/instance-id")
        .await
        .expect_err("the upstream is down");
    let elapsed = started.elapsed();
    assert!(
        matches!(&err, UpstreamError::Unreachable(m) if m.to_lowercase().contains("connect")),
        "{err:?}"
    );
    // Refused connections are an immediate answer, not a wait for the timeout.
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");

    // Back, with the same state: the cached session is still valid, no new PUT.
    let _upstream = spawn_upstream(port, state.path());
    assert_eq!(
        forward(&u, "/latest/meta-data/instance-id").await.status,
        200
    );
    assert_eq!(u.token_fetches(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_upstream_times_out_within_the_bound() {
    // Connections complete in the kernel's backlog; nothing ever answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = silent.local_addr().expect("addr");
    let timeout = Duration::from_millis(500);
    let u = upstream_at(&format!("http://{addr}"), timeout);
    for _ in 0..2 {
        let started = Instant::now();
        let err = u
            .forward(&Method::GET, "/latest/meta-data/instance-id")
            .await
            .expect_err("no answer");
        let elapsed = started.elapsed();
        assert_eq!(err, UpstreamError::Timeout);
        assert!(elapsed >= timeout, "{elapsed:?}");
        assert!(elapsed < timeout + Duration::from_secs(1), "{elapsed:?}");
    }
    drop(silent);
}

/// How the recording upstream answers.
#[derive(Clone)]
struct Script {
    /// `Ok((token, ttl echoed))` or `Err(status)` for the token PUT.
    put: Result<(&'static str, Option<u32>), u16>,
    get_status: u16,
    get_body: Vec<u8>,
    /// Send `Content-Length` with GET answers (else the body ends when the connection closes).
    get_length: bool,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            put: Ok(("upstream-token-AQAEAKQRRHnsX8GCPgYTGMSh==", Some(21_600))),
            get_status: 200,
            get_body: b"hello from upstream".to_vec(),
            get_length: true,
        }
    }
}

/// A tiny HTTP/1.1 server that records every request head and answers as scripted, closing the
/// connection after each answer (as EC2 does).
struct Recorder {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start(script: Script) -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let heads = Arc::new(Mutex::new(Vec::new()));
        let sink = heads.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let sink = sink.clone();
                let script = script.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).into_owned();
                    let answer = answer(&script, &head);
                    sink.lock().expect("lock").push(head);
                    let _ = stream.write_all(&answer).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Recorder { addr, heads, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().expect("lock").clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(script: &Script, head: &str) -> Vec<u8> {
    if head.starts_with("PUT ") {
        return match script.put {
            Ok((token, ttl)) => {
                let ttl = ttl
                    .map(|t| format!("X-aws-ec2-metadata-token-ttl-seconds: {t}\r\n"))
                    .unwrap_or_default();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{ttl}\
                     Connection: close\r\n\r\n{token}",
                    token.len()
                )
                .into_bytes()
            }
            Err(status) => format!(
                "HTTP/1.1 {status} Refused\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .into_bytes(),
        };
    }
    let length = if script.get_length {
        format!("Content-Length: {}\r\n", script.get_body.len())
    } else {
        String::new()
    };
    let mut out = format!(
        "HTTP/1.1 {} Scripted\r\nContent-Type: text/plain; charset=x-test\r\n{length}\
         Connection: close\r\n\r\n",
        script.get_status
    )
    .into_bytes();
    out.extend_from_slice(&script.get_body);
    out
}

/// The header lines of a recorded head, names lowercased.
fn headers(head: &str) -> Vec<(String, String)> {
    head.split("\r\n")
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once(':').expect("header line");
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_daemons_own_headers_reach_the_upstream() {
    let rec = Recorder::start(Script::default()).await;
    let u = upstream_at(&rec.url(), Duration::from_secs(2));

    let got = forward(&u, "/latest/meta-data/instance-id?probe=1").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body.as_ref(), b"hello from upstream");
    assert_eq!(
        got.content_type.as_ref().map(|v| v.as_bytes()),
        Some(&b"text/plain; charset=x-test"[..]),
        "the content type comes back as the upstream wrote it"
    );
    let head = u
        .forward(&Method::HEAD, "/2021-01-03/meta-data/local-ipv4")
        .await
        .expect("HEAD");
    assert_eq!(head.body.as_ref(), b"hello from upstream");

    let heads = rec.heads();
    assert_eq!(heads.len(), 3, "{heads:#?}");
    assert!(
        heads[0].starts_with("PUT /latest/api/token HTTP/1.1\r\n"),
        "{}",
        heads[0]
    );
    assert!(heads[1].starts_with("GET /latest/meta-data/instance-id?probe=1 HTTP/1.1\r\n"));
    assert!(heads[2].starts_with("GET /2021-01-03/meta-data/local-ipv4 HTTP/1.1\r\n"));

    let put = headers(&heads[0]);
    assert!(
        put.contains(&(
            "x-aws-ec2-metadata-token-ttl-seconds".into(),
            "21600".into()
        )),
        "{put:?}"
    );
    for head in &heads {
        let h = headers(head);
        for (name, value) in &h {
            assert!(
                [
                    "host",
                    "user-agent",
                    "x-aws-ec2-metadata-token",
                    "x-aws-ec2-metadata-token-ttl-seconds",
                    "content-length",
                ]
                .contains(&name.as_str()),
                "unexpected header {name}: {value} in\n{head}"
            );
        }
        assert!(!head.to_ascii_lowercase().contains("forwarded"), "{head}");
        let agent = h
            .iter()
            .find(|(k, _)| k == "user-agent")
            .expect("user agent");
        assert!(agent.1.starts_with("imdsd/"), "{agent:?}");
    }
    for get in &heads[1..] {
        let tokens: Vec<_> = headers(get)
            .into_iter()
            .filter(|(k, _)| k == "x-aws-ec2-metadata-token")
            .collect();
        assert_eq!(
            tokens,
            [(
                "x-aws-ec2-metadata-token".to_string(),
                "upstream-token-AQAEAKQRRHnsX8GCPgYTGMSh==".to_string()
            )],
            "exactly the daemon's token: {get}"
        );
    }
    assert_eq!(u.token_fetches(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_imdsv1_only_upstream_is_used_without_a_token() {
    for status in [403, 404, 405] {
        let rec = Recorder::start(Script {
            put: Err(status),
            ..Script::default()
        })
        .await;
        let u = upstream_at(&rec.url(), Duration::from_secs(2));
        for _ in 0..3 {
            assert_eq!(
                forward(&u, "/latest/meta-data/instance-id").await.status,
                200
            );
        }
        // Asked once; not again on every request.
        assert_eq!(u.token_fetches(), 1, "{status}");
        let heads = rec.heads();
        assert_eq!(heads.len(), 4, "{heads:#?}");
        for get in &heads[1..] {
            assert!(get.starts_with("GET "), "{get}");
            assert!(
                !get.to_ascii_lowercase()
                    .contains("x-aws-ec2-metadata-token"),
                "{get}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_session_is_renewed_before_the_ttl_the_upstream_granted_runs_out() {
    // Asked for six hours, granted two seconds: renewal follows the grant (at 80%).
    let rec = Recorder::start(Script {
        put: Ok(("short-lived-token", Some(2))),
        ..Script::default()
    })
    .await;
    let u = upstream_at(&rec.url(), Duration::from_secs(2));
    forward(&u, "/latest/meta-data/instance-id").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    forward(&u, "/latest/meta-data/instance-id").await;
    assert_eq!(u.token_fetches(), 1);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    forward(&u, "/latest/meta-data/instance-id").await;
    assert_eq!(u.token_fetches(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_refused_twice_is_an_error_not_a_401_for_the_caller() {
    let rec = Recorder::start(Script {
        get_status: 401,
        ..Script::default()
    })
    .await;
    let u = upstream_at(&rec.url(), Duration::from_secs(2));
    let err = u
        .forward(&Method::GET, "/latest/meta-data/instance-id")
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, UpstreamError::Unreachable(m) if m.contains("401")),
        "{err:?}"
    );
    assert_eq!(u.token_fetches(), 2, "one retry with a fresh token");
    assert_eq!(rec.heads().len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_answers_are_refused() {
    for get_length in [true, false] {
        let rec = Recorder::start(Script {
            get_body: vec![b'x'; 2 * 1024 * 1024],
            get_length,
            ..Script::default()
        })
        .await;
        let u = upstream_at(&rec.url(), Duration::from_secs(5));
        let err = u
            .forward(&Method::GET, "/latest/user-data")
            .await
            .expect_err("too large");
        assert!(
            matches!(&err, UpstreamError::Unreachable(m) if m.contains("too large")),
            "content-length {get_length}: {err:?}"
        );
    }
}

#[test]
fn what_callers_may_read() {
    let options = |allow: Option<&[&str]>, hide_user_data: bool| ProxyOptions {
        upstream: "http://169.254.169.254".into(),
        allow: allow.map(|a| a.iter().map(|s| s.to_string()).collect()),
        hide_user_data,
        timeout: Duration::from_secs(1),
        token_ttl: Duration::from_secs(21_600),
    };

    let open = Upstream::new(options(None, false)).expect("valid");
    assert!(open.allows("/latest/user-data"));
    assert!(open.allows("/latest/meta-data/mac"));

    let nth = Upstream::new(options(
        Some(&[
            "@node-termination-handler",
            "/latest/meta-data/tags/instance/*",
        ]),
        true,
    ))
    .expect("valid");
    for ok in [
        "/latest/meta-data/spot/instance-action",
        "/2016-09-02/meta-data/spot/instance-action",
        "/latest/meta-data/events/recommendations/rebalance/",
        "/latest/meta-data/autoscaling/target-lifecycle-state",
        "/latest/meta-data/instance-id",
        "/latest/meta-data/placement/availability-zone",
        "/latest/dynamic/instance-identity/document",
        "/latest/meta-data/tags/instance/Name",
    ] {
        assert!(nth.allows(ok), "{ok}");
    }
    for no in [
        "/latest/user-data",
        "/2021-01-03/user-data",
        "/latest/meta-data/mac",
        "/latest/meta-data/network/interfaces/macs/",
        "/latest/meta-data/tags/instance",
        "/latest/meta-data/iam/security-credentials/",
        "/latest/meta-data/",
        "/",
    ] {
        assert!(!nth.allows(no), "{no}");
    }

    let hidden = Upstream::new(options(None, true)).expect("valid");
    assert!(!hidden.allows("/2009-04-04/user-data"));
    assert!(hidden.allows("/2009-04-04/meta-data/instance-id"));

    for bad in [
        "meta-data/instance-id",
        "/meta-data/instance-id",
        "/latest/meta-data/iam/*",
        "@unknown",
    ] {
        let err = expand_allow_list(&[bad.to_string()]).expect_err(bad);
        assert!(err.contains(bad), "{err}");
        let err = Upstream::new(options(Some(&[bad]), false)).expect_err(bad);
        assert!(err.contains(bad), "{err}");
    }
    let err = Upstream::new(ProxyOptions {
        upstream: "https://169.254.169.254".into(),
        ..options(None, false)
    })
    .expect_err("https");
    assert!(err.contains("http://"), "{err}");
}

/// What [`FaultyUpstream`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upkeep {
    /// Answers like a metadata service (the recorder's default script).
    Healthy,
    /// Nothing listens: connections are refused.
    Down,
    /// Accepts connections and never answers.
    Silent,
    /// Answers with bytes that are not HTTP.
    Garbage,
    /// Promises a body it does not send, then closes.
    Truncated,
    /// Refuses the daemon's session (401), and answers the token request with bytes that are
    /// no token.
    GarbledToken,
}

/// An upstream metadata service that can be switched between healthy and broken while the
/// daemon runs, always on the same port.
struct FaultyUpstream {
    addr: SocketAddr,
    mode: Arc<Mutex<Upkeep>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl FaultyUpstream {
    async fn start() -> FaultyUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let up = FaultyUpstream {
            addr: listener.local_addr().expect("addr"),
            mode: Arc::new(Mutex::new(Upkeep::Healthy)),
            task: Mutex::new(None),
        };
        up.serve(listener);
        up
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let mode = self.mode.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mode = *mode.lock().expect("lock");
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).into_owned();
                    let answer: Vec<u8> = match mode {
                        Upkeep::Healthy | Upkeep::Down => answer(&Script::default(), &head),
                        Upkeep::Silent => {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            return;
                        }
                        Upkeep::Garbage => b"\x16\x03\x01\x02\x00garbage, not HTTP\r\n\r\n".to_vec(),
                        Upkeep::Truncated => b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\
                              Content-Length: 1000\r\n\r\npartial"
                            .to_vec(),
                        Upkeep::GarbledToken if head.starts_with("PUT ") => {
                            b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\n\x00\x01\x02tok\x7fn"
                                .to_vec()
                        }
                        Upkeep::GarbledToken => {
                            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                                .to_vec()
                        }
                    };
                    let _ = stream.write_all(&answer).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        *self.task.lock().expect("lock") = Some(task);
    }

    async fn set(&self, mode: Upkeep) {
        let was = std::mem::replace(&mut *self.mode.lock().expect("lock"), mode);
        if mode == Upkeep::Down {
            if let Some(task) = self.task.lock().expect("lock").take() {
                task.abort();
            }
            // Aborting drops the listener once the task is gone.
            tokio::time::sleep(Duration::from_millis(50)).await;
        } else if was == Upkeep::Down {
            let listener = tokio::net::TcpListener::bind(self.addr)
                .await
                .expect("listen again on the same port");
            self.serve(listener);
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FaultyUpstream {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().expect("lock").take() {
            task.abort();
        }
    }
}

/// Proxy mode with the upstream down, silent past the timeout, answering bytes that are not
/// HTTP, cutting its answer short, or refusing the session and garbling the new token: callers
/// get a 502 (504 for silence) and never the broken bytes, their own role's credentials keep
/// coming from imdsd, each failure is logged and counted by status, and the next request after
/// the upstream heals is forwarded again.
#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_down_silent_or_garbled_is_a_bounded_5xx_and_recovers() {
    let up = FaultyUpstream::start().await;
    let state = tempfile::tempdir().expect("tempdir");
    let upstream_url = up.url();
    let args = [
        "--mode",
        "proxy",
        "--upstream",
        upstream_url.as_str(),
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        state.path().to_str().expect("utf8"),
        "--fake-credentials",
        "app",
    ];
    let mut d = Process::spawn(&args, &[]);
    let addr = d.addr();
    let admin = d.admin_addr().expect("admin API");
    let get = |path: &'static str| tokio::task::spawn_blocking(move || raw(addr, "GET", path, &[]));
    let forwarded = "/latest/meta-data/instance-id";
    let credentials = "/latest/meta-data/iam/security-credentials/app";
    let healthy = get(forwarded).await.expect("join");
    assert_eq!(
        (healthy.status, healthy.text().as_str()),
        (200, "hello from upstream")
    );

    for (fault, status, logged) in [
        (Upkeep::Down, 502, "Connection refused"),
        (Upkeep::Silent, 504, "did not answer in time"),
        (Upkeep::Garbage, 502, "invalid HTTP"),
        (Upkeep::Truncated, 502, "reading the answer failed"),
        (Upkeep::GarbledToken, 502, "unusable IMDSv2 token"),
    ] {
        let series = format!("imdsd_requests_total{{route=\"metadata\",status=\"{status}\"}}");
        let counted = |series: String| {
            tokio::task::spawn_blocking(move || common::metric(admin, &series).unwrap_or(0.0))
        };
        let before = counted(series.clone()).await.expect("join");
        up.set(fault).await;
        let started = Instant::now();
        let r = get(forwarded).await.expect("join");
        assert_eq!(r.status, status, "{fault:?}: {r:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{fault:?}: bounded by the 2 s timeout, took {:?}",
            started.elapsed()
        );
        for broken in ["garbage", "partial", "hello from upstream"] {
            assert!(!r.text().contains(broken), "{fault:?}: {r:?}");
        }
        // The role is imdsd's to serve, upstream or not.
        let c = get(credentials).await.expect("join");
        assert_eq!(c.status, 200, "{fault:?}: {c:?}");
        assert!(c.text().contains("\"Success\""), "{fault:?}: {c:?}");
        let line = tokio::task::block_in_place(|| {
            d.wait_for_log(
                &["cannot forward to the upstream metadata service", logged],
                Duration::from_secs(10),
            )
        })
        .unwrap_or_else(|| panic!("{fault:?} not logged:\n{}", d.log_text()));
        assert!(line.contains("\"level\":\"WARN\""), "{line}");
        assert!(
            counted(series.clone()).await.expect("join") > before,
            "{fault:?}: {series} not counted"
        );

        up.set(Upkeep::Healthy).await;
        let back = get(forwarded).await.expect("join");
        assert_eq!(
            (back.status, back.text().as_str()),
            (200, "hello from upstream"),
            "{fault:?}: no recovery:\n{}",
            d.log_text()
        );
    }
    assert_eq!(d.child.try_wait().expect("wait"), None, "the daemon exited");
    assert!(!d.log_text().contains("panicked"), "{}", d.log_text());
}
