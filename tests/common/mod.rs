//! Test harness shared by the integration tests: a daemon in-process or as a real process on a
//! loopback port, a wire-level HTTP client that shows exact bytes, and the Python venv that holds
//! boto3, the AWS CLI and moto.
//!
//! Nothing here fakes a component the daemon talks to: callers are raw sockets or real SDKs.
#![allow(dead_code)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imdsd::app::App;
use imdsd::config::{self, Parsed};
use tokio_util::sync::CancellationToken;

/// A daemon running inside the test process, on 127.0.0.1 and a free port.
pub struct Daemon {
    pub addr: SocketAddr,
    pub state_dir: tempfile::TempDir,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    pub app_broker: imdsd::credentials::broker::Broker,
    /// The container index and the Docker watcher's counters, when following an engine.
    pub index: Option<imdsd::index::Index>,
    pub docker_stats: Option<Arc<imdsd::docker::DockerStats>>,
    /// The admin API's address, unless disabled.
    pub admin: Option<SocketAddr>,
    pub metrics: Arc<imdsd::metrics::Metrics>,
    /// The container-credentials endpoint's addresses (`--ecs-listen`).
    pub ecs: Vec<SocketAddr>,
}

impl Daemon {
    /// Starts `imdsd --listen 127.0.0.1:0 --state-dir <tmp> <args>`. Must run in a tokio runtime.
    pub async fn start(args: &[&str]) -> Daemon {
        let state_dir = tempfile::tempdir().expect("tempdir");
        Self::start_with_state(args, state_dir).await
    }

    pub async fn start_with_state(args: &[&str], state_dir: tempfile::TempDir) -> Daemon {
        Self::start_on("127.0.0.1:0", args, state_dir).await
    }

    /// Starts the daemon listening on `listen` (e.g. a test network's gateway, port 0).
    pub async fn start_on(listen: &str, args: &[&str], state_dir: tempfile::TempDir) -> Daemon {
        let state = state_dir.path().to_str().expect("utf8").to_string();
        let mut full = vec!["imdsd", "--listen", listen, "--state-dir", &state];
        // Tests that are not about containers must not see the machine's containers.
        if !args.contains(&"--docker-host") {
            full.extend_from_slice(&["--docker-host", "none"]);
        }
        // Tests run many daemons at once; each gets its own admin port.
        if !args.contains(&"--admin-listen") {
            full.extend_from_slice(&["--admin-listen", "127.0.0.1:0"]);
        }
        full.extend_from_slice(args);
        let env = |k: &str| std::env::var(k).ok();
        let config = match config::parse(full, &env) {
            Ok(Parsed::Run(c)) => *c,
            Ok(other) => panic!("unexpected parse outcome: {other:?}"),
            Err(e) => panic!("bad test configuration: {e}"),
        };
        let app = App::build(config).await.expect("daemon starts");
        let addr = app.local_addrs()[0];
        let app_broker = app.broker().clone();
        let index = app.index().cloned();
        let admin = app.admin_addr();
        let ecs = app.ecs_addrs();
        let metrics = app.metrics().clone();
        let docker_stats = app.docker_stats().cloned();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run(shutdown.clone()));
        Daemon {
            addr,
            state_dir,
            shutdown,
            task: Some(task),
            app_broker,
            index,
            docker_stats,
            admin,
            metrics,
            ecs,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the daemon and waits for it to drain; returns the state directory for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.state_dir, dir)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A response as it came off the wire.
#[derive(Clone)]
pub struct RawResponse {
    pub status: u16,
    pub reason: String,
    /// Header names as sent (case preserved), in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Shows the body as text (lossily), so that failed assertions are readable.
impl std::fmt::Debug for RawResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawResponse")
            .field("status", &self.status)
            .field("reason", &self.reason)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

impl RawResponse {
    /// The first header with this name, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("utf-8 body")
    }
}

/// Sends one request over a fresh connection and reads the response until the server closes it
/// (imdsd closes after every response, as EC2 does). `headers` are written verbatim.
pub fn raw(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> RawResponse {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    raw_bytes(addr, request.as_bytes())
}

/// Like [`raw`], but with exactly the `Host` headers given (none for an empty list), and `target`
/// a path or an absolute URI.
pub fn raw_with_hosts(
    addr: SocketAddr,
    method: &str,
    target: &str,
    hosts: &[&str],
    headers: &[(&str, &str)],
) -> RawResponse {
    let mut request = format!("{method} {target} HTTP/1.1\r\n");
    for h in hosts {
        request.push_str(&format!("Host: {h}\r\n"));
    }
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    raw_bytes(addr, request.as_bytes())
}

/// Like [`raw`], but from a chosen loopback source address (e.g. 127.0.0.2), so that the daemon
/// sees another caller. Uses tokio's `TcpSocket`, which can bind before connecting.
pub async fn raw_from(
    source: std::net::IpAddr,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> RawResponse {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    let socket = match source {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .expect("socket");
    socket
        .bind(SocketAddr::new(source, 0))
        .unwrap_or_else(|e| panic!("bind the client socket to {source}: {e}"));
    let mut stream = socket.connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes))
        .await
        .expect("the daemon answers within 10 s")
        .expect("read until close");
    parse_response(&bytes)
}

/// Sends arbitrary bytes and parses whatever comes back.
pub fn raw_bytes(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(request).expect("write");
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).expect("read until close");
    parse_response(&bytes)
}

pub fn parse_response(bytes: &[u8]) -> RawResponse {
    let head_end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no header terminator in {:?}",
                String::from_utf8_lossy(bytes)
            )
        });
    let head = std::str::from_utf8(&bytes[..head_end]).expect("ascii head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status = parts
        .next()
        .expect("status")
        .parse()
        .expect("numeric status");
    let reason = parts.next().unwrap_or("").to_string();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':').expect("header line");
            (k.to_string(), v.trim().to_string())
        })
        .collect();
    RawResponse {
        status,
        reason,
        headers,
        body: bytes[head_end + 4..].to_vec(),
    }
}

/// Gets an IMDSv2 token with the given TTL.
pub fn token(addr: SocketAddr, ttl: u32) -> String {
    let r = raw(
        addr,
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", &ttl.to_string())],
    );
    assert_eq!(r.status, 200, "token PUT: {r:?}");
    r.text()
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The test venv's Python (boto3, the AWS CLI, moto). Fails loudly when it is missing: the tests
/// that need it must not pass by skipping.
pub fn python() -> PathBuf {
    let venv = std::env::var_os("IMDSD_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv"));
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "the Python test environment is missing ({}); run ./scripts/test, which creates it",
        python.display()
    );
    python
}

/// Runs a Python snippet in the venv with a clean AWS environment plus `env`; returns stdout.
/// Panics with stderr when it fails.
pub fn run_python(script: &str, env: &[(&str, &str)]) -> String {
    let output = aws_clean_command(&python())
        .arg("-c")
        .arg(script)
        .envs(env.iter().copied())
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "python failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf8 stdout")
}

/// A command with every AWS_* variable removed and config files pointed at nothing, so that only
/// what the test sets decides where credentials come from.
pub fn aws_clean_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("NO_PROXY", "*")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy");
    cmd
}

/// The daemon as a separate process (for restarts, signals, exit codes and logs).
pub struct Process {
    pub child: Child,
    pub addr: Option<SocketAddr>,
    pub log: Arc<Mutex<Vec<String>>>,
}

/// The daemon binary as a command, set up as [`Process::spawn`] runs it (clean AWS environment,
/// no Docker, its own admin port), with `args`, `env`, and stdio left to the caller. `wrapper`
/// runs first, with the binary and its arguments after it (e.g. a shell that lowers a limit,
/// then `exec`s).
pub fn daemon_command(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Command {
    let binary = env!("CARGO_BIN_EXE_imdsd");
    let mut cmd = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut cmd = aws_clean_command(Path::new(program));
            cmd.args(rest).arg(binary);
            cmd
        }
        None => aws_clean_command(Path::new(binary)),
    };
    cmd.args(args)
        // Tests that are not about containers must not see the machine's containers.
        .env("DOCKER_HOST", "none")
        .env_remove("DOCKER_URL")
        // Tests run many daemons at once; each gets its own admin port.
        .env("IMDSD_ADMIN_LISTEN", "127.0.0.1:0")
        // The daemon's own chain must not find the machine's IMDS, unless a test says so.
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    cmd
}

impl Process {
    /// Spawns the built binary with JSON logs and waits until it listens (or exits).
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut full = vec!["--log-format", "json"];
        full.extend_from_slice(args);
        Self::start(daemon_command(&[], &full, env))
    }

    /// Spawns `cmd` (see [`daemon_command`]; it must log JSON) with its stderr collected, and
    /// waits until it listens (or exits).
    pub fn start(mut cmd: Command) -> Process {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn imdsd");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("serving instance metadata")
                    && let Some(addr) = extract_addr(&line)
                {
                    let _ = tx.send(addr);
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut addr = None;
        while Instant::now() < deadline {
            if let Ok(a) = rx.recv_timeout(Duration::from_millis(50)) {
                addr = Some(a);
                break;
            }
            if child.try_wait().expect("wait").is_some() {
                // Give the reader a moment to collect the last lines.
                std::thread::sleep(Duration::from_millis(100));
                break;
            }
        }
        Process { child, addr, log }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
            .unwrap_or_else(|| panic!("imdsd did not start listening; log:\n{}", self.log_text()))
    }

    pub fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// Waits for the process to exit and returns its code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait") {
                std::thread::sleep(Duration::from_millis(100));
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// The admin API's address, from the daemon's log.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        let log = self.log.lock().expect("log lock");
        log.iter()
            .filter(|l| l.contains("serving admin API"))
            .find_map(|l| extract_addr(l))
    }

    /// The container-credentials endpoint's (first) address, from the daemon's log.
    pub fn ecs_addr(&self) -> Option<SocketAddr> {
        let log = self.log.lock().expect("log lock");
        log.iter()
            .filter(|l| l.contains("serving container credentials"))
            .find_map(|l| extract_addr(l))
    }
}

impl Process {
    /// Waits up to `timeout` for a log line containing every one of `needles`; returns it.
    pub fn wait_for_log(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .log
                .lock()
                .expect("log lock")
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return Some(line.clone());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One sample from the admin API's `/metrics`: the value of the series written exactly as
/// `series` (name and labels, e.g. `imdsd_sts_errors_total` or `x{priority="caller"}`); `None`
/// if it is not there. Blocking.
pub fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let r = raw(admin, "GET", "/metrics", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    r.text().lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The `addr` field of a JSON log line.
pub fn extract_addr(line: &str) -> Option<SocketAddr> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get("addr")?.as_str()?.parse().ok()
}

/// Runs the binary to completion (for configuration errors); returns (exit code, stderr).
pub fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    run_to_exit_under(&[], args, env)
}

/// [`run_to_exit`] through a wrapper command that ends by running its remaining arguments
/// (`unshare …`, `setpriv …`): `wrapper… <imdsd> args…`.
pub fn run_to_exit_under(
    wrapper: &[&str],
    args: &[&str],
    env: &[(&str, &str)],
) -> (Option<i32>, String) {
    let imdsd = Path::new(env!("CARGO_BIN_EXE_imdsd"));
    let mut command = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = aws_clean_command(Path::new(program));
            c.args(rest).arg(imdsd);
            c
        }
        None => aws_clean_command(imdsd),
    };
    let output = command
        .args(args)
        .envs(env.iter().copied())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("run imdsd");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
