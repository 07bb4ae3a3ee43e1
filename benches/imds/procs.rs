//! The processes a benchmark runs: the release daemon, the floor (`examples/floor.rs`), and moto's
//! STS server; plus what is read about them from `/proc` (resident memory, CPU time) and from the
//! daemon's admin API.
//!
//! Every child is killed when its handle drops (and the floor also exits when its standard input
//! closes), so a failed benchmark leaves nothing running.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The operator's own identity for the daemon when it talks to moto: static keys moto accepts
/// (the same as `tests/support/sts.rs`).
pub const OPERATOR_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE"),
    (
        "AWS_SECRET_ACCESS_KEY",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ),
    ("AWS_REGION", "us-east-1"),
];

/// The release daemon, built by `cargo bench` itself.
pub fn daemon_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_imdsd"))
}

/// The floor, built with `cargo build --release --example floor` (scripts/bench does it).
pub fn floor_binary() -> PathBuf {
    daemon_binary()
        .parent()
        .map(|dir| dir.join("examples/floor"))
        .unwrap_or_else(|| PathBuf::from("target/release/examples/floor"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Whether servers run pinned to CPU 0 (and the load driver to CPU 1); see [`pin_self`].
static PINNED: AtomicBool = AtomicBool::new(false);

/// Pins this process (the load driver, and what it starts without [`server_command`]) to CPU 1
/// and every server it starts to CPU 0, with util-linux's `taskset`. On a two-core machine this
/// keeps the load generator and the server under test from taking turns on the same core, which
/// otherwise moves the results by ±20% from one run to the next. Returns false (and pins
/// nothing) if `taskset` is missing or fails.
pub fn pin_self() -> bool {
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    PINNED.store(ok, Ordering::SeqCst);
    ok
}

/// A command for a server under test: on CPU 0 when pinning.
fn server_command(program: &Path) -> Command {
    if PINNED.load(Ordering::SeqCst) {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "0"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// A command with every AWS_* variable removed and the config files pointed at nothing, so that
/// the daemon's identity comes from what the benchmark sets and nothing else.
fn clean_command(program: &Path) -> Command {
    let mut cmd = server_command(program);
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") || k.starts_with("IMDSD_") || k.starts_with("DOCKER_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("NO_PROXY", "*")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy");
    cmd
}

/// A running release daemon on 127.0.0.1.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    _state: tempfile::TempDir,
}

impl Daemon {
    /// Starts `imdsd --listen 127.0.0.1:P --admin-listen 127.0.0.1:Q --state-dir <tmp> <args>`
    /// (with `--docker-host none` unless `args` name one) and waits until `/readyz` says ready.
    /// Its log goes to /dev/null: the access log is still formatted and written, as in service.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let state = tempfile::tempdir().expect("a state directory");
        let (port, admin_port) = (free_port(), free_port());
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().expect("addr");
        let mut cmd = clean_command(&daemon_binary());
        cmd.args(["--listen", &addr.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .arg("--state-dir")
            .arg(state.path());
        if !args.contains(&"--docker-host") {
            cmd.args(["--docker-host", "none"]);
        }
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn the release daemon");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http_get(admin, "/readyz") {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "the daemon exited ({status}) before it was ready; run it by hand: {} {}",
                    daemon_binary().display(),
                    args.join(" ")
                );
            }
            assert!(
                Instant::now() < deadline,
                "the daemon was not ready within 60 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Daemon {
            child,
            addr,
            admin,
            _state: state,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A counter or gauge from `/metrics` (`imdsd_` + `name`, `_total` for counters).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = http_get(self.admin, "/metrics").ok()?;
        body.lines().find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == format!("imdsd_{name}")).then(|| value.trim().parse().ok())?
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The floor server (`examples/floor.rs`).
pub struct Floor {
    child: Child,
    pub addr: SocketAddr,
    _document: tempfile::NamedTempFile,
}

impl Floor {
    pub fn start(document: &[u8], role: &str, keep_alive: bool) -> Floor {
        let binary = floor_binary();
        assert!(
            binary.exists(),
            "{} is missing: build it with `cargo build --release --example floor` (scripts/bench does)",
            binary.display()
        );
        let mut file = tempfile::NamedTempFile::new().expect("a temporary file");
        file.write_all(document).expect("write the document");
        let mut cmd = server_command(&binary);
        cmd.args(["--listen", "127.0.0.1:0", "--role", role, "--document"])
            .arg(file.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if keep_alive {
            cmd.arg("--keep-alive");
        }
        let mut child = cmd.spawn().expect("spawn the floor");
        let stdout = child.stdout.take().expect("the floor's stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the floor says where it listens");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("the floor said {line:?}"));
        Floor {
            child,
            addr,
            _document: file,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// moto's STS server from the test venv.
pub struct Moto {
    child: Child,
    pub url: String,
}

impl Moto {
    /// Starts moto on every CPU, not pinned with the load driver: it stands in for STS, which
    /// has its own machines, and sharing CPU 1 with 200 callers and the counting proxy would
    /// slow it (and so every caller in (d)) for no reason that has to do with imdsd.
    pub fn start(python: &Path) -> Moto {
        let port = free_port();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut cmd = if PINNED.load(Ordering::SeqCst) {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", &format!("0-{}", cpus - 1)]).arg(python);
            cmd
        } else {
            Command::new(python)
        };
        let child = cmd
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto's server from the venv");
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start within 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking GET over a fresh connection: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status line"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Resident memory now and at its peak (`VmRSS`, `VmHWM`), in KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// User + system CPU time the process has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may contain spaces; what follows ") " starts at field 3.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, so indexes 11 and 12 from field 3.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}
