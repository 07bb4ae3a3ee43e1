//! The soak (issue 15, item 7): the daemon as a process against moto, serving a few dozen
//! containers on a test network while they come and go, with one STS outage in the middle.
//! `./scripts/test` runs it for a minute; `scripts/soak` runs the same test for ten (or as long as
//! asked) and prints its figures.
//!
//! - **Callers.** Every container runs `imdsd probe --every … --sts`: each round a new Rust SDK IMDS
//!   client fetches credentials through imdsd (token PUT, role listing, credentials GET) and asks
//!   moto's `sts:GetCallerIdentity` whose they are; moto names the assumed role and session it
//!   issued them for. Each round is one JSON line with the statuses the SDK met.
//! - **Churn.** A pool of fixed addresses, fewer than the containers over the run: every few
//!   seconds one container is stopped (SIGTERM), killed (SIGKILL) or restarted, and a stopped or
//!   killed one is removed and replaced at once, on its address, by a container of *another*
//!   role. Roles are named by `IAM_ROLE` or by the `imdsd.role` label, in turn.
//! - **Outage.** imdsd reaches moto through a relay in this process, which for a window in the
//!   middle resets every connection, existing and new. The callers check with moto directly, so
//!   that what imdsd serves during the outage is checked too.
//! - **Afterwards**, from every container's log (collected before it is removed): no round names
//!   a role or session that is not the container's own; no 5xx outside the outage window plus
//!   [`GRACE`], neither as the callers met them nor as the daemon's metrics counted them, and none
//!   at all for a caller served before the outage (its credentials were cached); every
//!   container that ran long enough got checked credentials; the daemon's resident memory and open
//!   descriptors, sampled every [`SAMPLE_EVERY`], are flat after warm-up by [`flat`]'s criterion.
//!
//! Knobs (environment): `IMDSD_SOAK_SECS` (default 60), `IMDSD_SOAK_CALLERS` (containers at once,
//! default 12), `IMDSD_SOAK_REPORT` (where the figures go as JSON; default
//! `target/tmp/soak-report.json`; the daemon's log and every caller's rounds go beside it, as
//! `soak-report.daemon.log` and `soak-report.callers.log`). Everything is bounded: the run, every container's own probing
//! (`--for`), and the number of containers (callers plus one per churn step). Traffic stays on
//! loopback and the test's own network.

mod common;
#[path = "support/docker.rs"]
mod docker;
#[path = "support/sts.rs"]
mod sts_support;

use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::Process;
use docker::{RunOpts, TestContainer, TestNetwork, docker_ok};
use serde_json::{Value, json};
use sts_support::{Behaviour, Moto, OPERATOR_ENV, ScriptedSts};

/// How often each caller starts a round.
const ROUND_EVERY: Duration = Duration::from_secs(3);
/// How often the driver changes something (stop, kill, restart, replace).
const CHURN_EVERY: Duration = Duration::from_secs(3);
/// How often the daemon's memory, descriptors and metrics are read.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// How long after STS is back a 5xx still counts as the outage's. imdsd answers a session that
/// has nothing cached from its memory of the failed fetch for 5 s (the broker's `unavailable_ttl`),
/// and a fetch that failed just before STS came back is remembered from then; 5 s more cover an STS
/// attempt under way at that moment (the daemon's `operation_attempt_timeout`), and the caller's
/// own timestamps, which are taken when the response has arrived.
const GRACE: Duration = Duration::from_secs(10);
/// The account moto gives the operator's keys, and so every role.
const ACCOUNT: &str = "123456789012";

// ---------------------------------------------------------------------------------------------
// `imdsd probe --every`, the soak's caller

/// The probe's JSON lines.
fn lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .collect()
}

fn probe_command(endpoint: &str, sts: &str, extra: &[&str]) -> std::process::Command {
    // Not AWS_EC2_METADATA_DISABLED: the probe *is* an IMDS client.
    let mut cmd = common::aws_clean_command(std::path::Path::new(env!("CARGO_BIN_EXE_imdsd")));
    cmd.args(["probe", "--endpoint", endpoint])
        .args(extra)
        .env("AWS_ENDPOINT_URL_STS", sts)
        .stdin(Stdio::null());
    cmd
}

#[test]
fn probe_rounds_ask_the_metadata_service_anew_each_time_and_print_no_secret() {
    let moto = Moto::start();
    let (daemon, _state) = sts_support::sts_daemon(&moto.url, &["probe-role"]);
    let addr = daemon.addr();
    let endpoint = format!("http://{addr}");

    let out = probe_command(
        &endpoint,
        &moto.url,
        &["--sts", "--every", "400ms", "--for", "2500ms"],
    )
    .output()
    .expect("run imdsd probe");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let rounds = lines(&stdout);
    assert!(rounds.len() >= 3, "too few rounds:\n{stdout}");
    for (i, round) in rounds.iter().enumerate() {
        assert_eq!(round["round"], i as u64 + 1, "{round}");
        assert_eq!(round["ok"], true, "{round}");
        assert_eq!(round["role"], "probe-role", "{round}");
        // STS itself says whose they are: the role, with imdsd's session name for a host caller.
        assert_eq!(
            round["caller_arn"],
            format!("arn:aws:sts::{ACCOUNT}:assumed-role/probe-role/imdsd-127.0.0.1"),
            "{round}"
        );
        // Token PUT, role listing, credentials GET, region: all answered, none retried.
        assert!(round["http"]["200"].as_u64() >= Some(4), "{round}");
        assert_eq!(
            round["http"].as_object().map(|m| m.len()),
            Some(1),
            "{round}"
        );
        assert!(round["at_ms"].as_u64().is_some(), "{round}");
        assert!(round.get("http_5xx_at_ms").is_none(), "{round}");
    }
    // Every round really asked imdsd: a token PUT and a credentials GET of its own each.
    let log = daemon.log_text();
    let access = |path: &str, method: &str| {
        log.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| {
                v["target"] == "imdsd::access"
                    && v["method"] == method
                    && v["path"] == path
                    && v["agent"]
                        .as_str()
                        .is_some_and(|a| a.contains("aws-sdk-rust"))
            })
            .count()
    };
    assert!(
        access("/latest/api/token", "PUT") >= rounds.len(),
        "fewer token PUTs than rounds:\n{log}"
    );
    assert!(
        access(
            "/latest/meta-data/iam/security-credentials/probe-role",
            "GET"
        ) >= rounds.len(),
        "fewer credentials GETs than rounds:\n{log}"
    );

    // The same caller's credentials, straight from imdsd: none of their secrets is printed.
    let token = common::token(addr, 60);
    let doc: Value = serde_json::from_str(
        &common::raw(
            addr,
            "GET",
            "/latest/meta-data/iam/security-credentials/probe-role",
            &[("x-aws-ec2-metadata-token", &token)],
        )
        .text(),
    )
    .expect("credentials document");
    for key in ["AccessKeyId", "SecretAccessKey", "Token"] {
        let secret = doc[key].as_str().expect("a credentials field");
        assert!(!stdout.contains(secret), "{key} printed:\n{stdout}");
    }
    assert!(!stdout.contains(&token), "token printed:\n{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_rounds_report_the_server_errors_the_sdk_met_and_retried() {
    let sts = ScriptedSts::start().await;
    sts.set(None, Behaviour::Fail);
    let (daemon, _state) = sts_support::sts_daemon(&sts.url, &["failing-role"]);
    let addr = daemon.addr();
    let endpoint = format!("http://{addr}");

    let out = tokio::task::spawn_blocking(move || {
        // imdsd holds a cold request while it asks STS, longer than the SDK's one-second timeout;
        // once the fetch has failed it answers 503 from memory for a few seconds. Wait for that.
        let path = "/latest/meta-data/iam/security-credentials/failing-role";
        let deadline = Instant::now() + Duration::from_secs(30);
        while common::raw(addr, "GET", path, &[]).status != 503 {
            assert!(Instant::now() < deadline, "imdsd never answered 503");
        }
        probe_command(
            &endpoint,
            "http://127.0.0.1:9",
            &["--every", "1s", "--for", "1s"],
        )
        .output()
        .expect("run imdsd probe")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed round fails the run:\n{stdout}"
    );
    let rounds = lines(&stdout);
    assert_eq!(rounds.len(), 1, "{stdout}");
    let round = &rounds[0];
    assert_eq!(round["ok"], false, "{round}");
    assert!(
        round["error"]
            .as_str()
            .is_some_and(|e| e.contains("no credentials")),
        "{round}"
    );
    // STS fails, nothing is cached: imdsd answers 503, and the SDK retries.
    let server_errors = round["http"]["503"]
        .as_u64()
        .unwrap_or_else(|| panic!("no 503 counted: {round}"));
    let attempts = server_errors + round["transport_errors"].as_u64().unwrap_or(0);
    assert!(attempts >= 2, "the SDK retries a 503: {round}");
    let at = round["http_5xx_at_ms"].as_array().expect("when");
    assert_eq!(at.len() as u64, server_errors, "{round}");
    let started = round["at_ms"].as_u64().expect("at_ms");
    assert!(
        at.iter().all(|t| t
            .as_u64()
            .is_some_and(|t| t >= started && t < started + 60_000)),
        "{round}"
    );
}

#[test]
fn probe_rounds_stop_at_sigterm() {
    let moto = Moto::start();
    let (daemon, _state) = sts_support::sts_daemon(&moto.url, &["probe-role"]);
    let endpoint = format!("http://{}", daemon.addr());
    let mut child = probe_command(&endpoint, &moto.url, &["--every", "200ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn imdsd probe");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    for _ in 0..2 {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a round's line within 30 s");
        assert!(line.contains("\"ok\":true"), "{line}");
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("imdsd probe --every still runs 10 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "every round succeeded");
}

// ---------------------------------------------------------------------------------------------
// The soak

/// The run's shape, from the environment.
#[derive(Debug, Clone)]
struct Plan {
    duration: Duration,
    /// Containers running at once, each on its own fixed address.
    callers: usize,
    /// Distinct roles; more than the callers, so that a reused address gets another role.
    roles: usize,
    outage_start: Duration,
    outage_end: Duration,
}

impl Plan {
    fn from_env() -> Plan {
        let number = |name: &str, default: u64| -> u64 {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
                Err(_) => default,
            }
        };
        let secs = number("IMDSD_SOAK_SECS", 60);
        assert!(
            (30..=6 * 3600).contains(&secs),
            "IMDSD_SOAK_SECS={secs}: between 30 and 21600"
        );
        let callers = number("IMDSD_SOAK_CALLERS", 12);
        assert!(
            (2..=100).contains(&callers),
            "IMDSD_SOAK_CALLERS={callers}: between 2 and 100 (each caller is a container)"
        );
        let duration = Duration::from_secs(secs);
        // In the middle: after the second quarter's samples have begun, ended well before the
        // last quarter for a long run (for the one-minute run the grace reaches into it).
        let outage_start = duration.mul_f64(0.45);
        let outage = (duration / 10).clamp(Duration::from_secs(10), Duration::from_secs(60));
        Plan {
            duration,
            callers: callers as usize,
            roles: 2 * callers as usize,
            outage_start,
            outage_end: outage_start + outage,
        }
    }

    fn role(&self, n: usize) -> String {
        format!("soak-{:02}", n % self.roles)
    }
}

/// moto behind a switch: imdsd's only way to STS. Down, it resets every connection, those open
/// (the daemon's SDK keeps them alive) and every new one.
struct Relay {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    /// Connections reset while down.
    resets: Arc<AtomicU64>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the STS relay");
        let addr = listener.local_addr().expect("relay address");
        let down = Arc::new(AtomicBool::new(false));
        let resets = Arc::new(AtomicU64::new(0));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (d, r, c) = (down.clone(), resets.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if d.load(Ordering::SeqCst) {
                    let _ = client.set_zero_linger();
                    r.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let mut cut = c.subscribe();
                let r = r.clone();
                tokio::spawn(async move {
                    let mut client = client;
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else {
                        let _ = client.set_zero_linger();
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = cut.changed() => {
                            let _ = client.set_zero_linger();
                            r.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        Relay {
            addr,
            down,
            cut,
            resets,
        }
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}

/// One reading of the daemon.
#[derive(Debug, Clone)]
struct Sample {
    /// Since the run began.
    at: Duration,
    rss_kib: u64,
    fds: u64,
    /// The daemon's own count of 5xx answers so far (`imdsd_requests_total{status="5…"}`).
    server_5xx: u64,
    requests: u64,
}

fn read_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn count_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// `/metrics` from the admin API, or `None` if it does not answer.
fn metrics(admin: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

/// (all requests, 5xx answers) from `imdsd_requests_total`.
fn request_counts(metrics: &str) -> (u64, u64) {
    let mut all = 0;
    let mut server_errors = 0;
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("imdsd_requests_total{") else {
            continue;
        };
        let Some(n) = rest.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()) else {
            continue;
        };
        all += n as u64;
        if rest.contains("status=\"5") {
            server_errors += n as u64;
        }
    }
    (all, server_errors)
}

/// Samples the daemon until dropped.
struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32, admin: SocketAddr, t0: Instant) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut next = Instant::now();
            while !st.load(Ordering::SeqCst) {
                if Instant::now() >= next {
                    next += SAMPLE_EVERY;
                    let at = t0.elapsed();
                    let (Some(rss_kib), Some(fds)) = (read_rss_kib(pid), count_fds(pid)) else {
                        continue;
                    };
                    let Some((requests, server_5xx)) = metrics(admin).map(|m| request_counts(&m))
                    else {
                        continue;
                    };
                    s.lock().expect("samples").push(Sample {
                        at,
                        rss_kib,
                        fds,
                        server_5xx,
                        requests,
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Sampler {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Sample> {
        self.halt();
        self.samples.lock().expect("samples").clone()
    }

    fn latest(&self) -> Option<Sample> {
        self.samples.lock().expect("samples").last().cloned()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.halt();
    }
}

/// A running caller.
struct Caller {
    container: TestContainer,
    role: String,
    ip: IpAddr,
    started: Duration,
}

/// A caller that is gone, with everything it printed.
#[derive(Debug)]
struct Finished {
    name: String,
    role: String,
    ip: IpAddr,
    started: Duration,
    ended: Duration,
    stdout: String,
}

impl Caller {
    fn finish(self, t0: Instant) -> Finished {
        let stdout = self.container.stdout();
        let finished = Finished {
            name: self.container.name.clone(),
            role: self.role,
            ip: self.ip,
            started: self.started,
            ended: t0.elapsed(),
            stdout,
        };
        self.container.rm();
        finished
    }
}

/// What the driver did.
#[derive(Debug, Default)]
struct Churn {
    started: usize,
    stopped: usize,
    killed: usize,
    restarted: usize,
    /// A container started on an address that a container of another role held before.
    ip_reuses: usize,
}

/// The soak's flatness criterion: the lowest reading of the last quarter of the run is at most the
/// lowest of the second quarter (the first is warm-up) plus `slack`. Lowest, because what leaks
/// stays and raises every later reading, the lowest too, while what the daemon holds only for a
/// while (connections in flight, one per busy caller at most; pooled Docker and STS connections;
/// the memory of a burst) raises the highest readings and leaves the lowest alone. A sample is
/// taken every two seconds, so even the one-minute run has seven or eight a quarter, and one of
/// them catches the daemon at rest.
fn flat(second_quarter_floor: u64, last_quarter_floor: u64, slack: u64) -> bool {
    last_quarter_floor <= second_quarter_floor + slack
}

/// Descriptors the daemon may hold at rest beyond the second quarter's: a few, so that a leak of
/// one per request, or one per container started (about ten start between the two quarters of
/// the one-minute run), fails.
const FD_SLACK: u64 = 3;
/// Resident memory the daemon may hold at rest beyond the second quarter's: 5 % of it plus 1 MiB
/// (so about 2.5 MiB for a daemon of 30 MiB). New callers legitimately add a little: each started
/// container leaves a cached session behind, kept an hour unless evicted.
fn rss_slack_kib(second_quarter_floor: u64) -> u64 {
    second_quarter_floor / 20 + 1024
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[test]
fn soak_many_callers_with_churn_and_an_sts_outage_get_only_their_own_roles() {
    docker::require_docker();
    let plan = Plan::from_env();
    eprintln!("soak: {plan:?}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");

    let net = TestNetwork::create("soak");
    let gateway = net.gateway.to_string();
    // moto on the gateway: the containers check their credentials with it directly.
    let moto = Moto::start_on(&gateway);
    let moto_addr: SocketAddr = moto
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("moto's address");
    let relay = rt.block_on(Relay::start(moto_addr));
    let state = tempfile::tempdir().expect("tempdir");
    let mut process = Process::spawn(
        &[
            "--listen",
            &format!("{gateway}:0"),
            "--state-dir",
            state.path().to_str().expect("utf8"),
            "--sts-endpoint",
            &format!("http://{}", relay.addr),
            "--docker-host",
            "unix:///var/run/docker.sock",
            "--networks",
            &net.name,
        ],
        OPERATOR_ENV,
    );
    let addr = process
        .addr
        .unwrap_or_else(|| panic!("daemon did not start:\n{}", process.log_text()));
    let admin = process.admin_addr().expect("the admin API's address");
    let pid = process.child.id();
    let endpoint = format!("http://{addr}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !metrics(admin).is_some_and(|m| m.contains("imdsd_")) {
        assert!(Instant::now() < deadline, "no metrics from {admin}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let image = docker::test_image();

    // Every container probes for the whole run and a little longer, and no longer.
    let probe_for = format!("{}s", (plan.duration + Duration::from_secs(120)).as_secs());
    let every = format!("{}ms", ROUND_EVERY.as_millis());
    let t0 = Instant::now();
    let wall0 = SystemTime::now();
    let mut churn = Churn::default();
    let start_caller = |churn: &mut Churn, slot: usize, role: String| -> Caller {
        let ip = net.host(10 + slot as u8);
        let mut opts = RunOpts::new(&net, "soak")
            .ip(ip)
            .env("AWS_ENDPOINT_URL_STS", &moto.url)
            .args([
                "probe",
                "--endpoint",
                &endpoint,
                "--sts",
                "--every",
                &every,
                "--for",
                &probe_for,
            ]);
        opts.image = image.clone();
        // Both ways a container names its role, in turn.
        opts = if churn.started % 2 == 0 {
            opts.env("IAM_ROLE", &role)
        } else {
            opts.label("imdsd.role", &role)
        };
        churn.started += 1;
        Caller {
            container: TestContainer::run(&opts),
            role,
            ip,
            started: t0.elapsed(),
        }
    };

    // The outage, on the runtime's clock so that it starts and ends on time whatever the driver
    // is doing; the wall-clock times are what the callers' timestamps are compared with.
    let outage_wall: Arc<Mutex<(Option<u64>, Option<u64>)>> = Arc::default();
    let relay = Arc::new(relay);
    {
        let (relay, wall, plan) = (relay.clone(), outage_wall.clone(), plan.clone());
        let t0 = tokio::time::Instant::from_std(t0);
        rt.spawn(async move {
            tokio::time::sleep_until(t0 + plan.outage_start).await;
            relay.set_down(true);
            wall.lock().expect("outage").0 = Some(unix_ms(SystemTime::now()));
            eprintln!("soak: STS down at {:?}", plan.outage_start);
            tokio::time::sleep_until(t0 + plan.outage_end).await;
            relay.set_down(false);
            wall.lock().expect("outage").1 = Some(unix_ms(SystemTime::now()));
            eprintln!("soak: STS back at {:?}", plan.outage_end);
        });
    }
    let sampler = Sampler::start(pid, admin, t0);

    let mut slots: Vec<Option<Caller>> = Vec::new();
    let mut last_role: Vec<usize> = Vec::new();
    let mut finished: Vec<Finished> = Vec::new();
    for slot in 0..plan.callers {
        slots.push(Some(start_caller(&mut churn, slot, plan.role(slot))));
        last_role.push(slot);
    }

    // Churn until the end: step n acts on a slot spread over the pool; two steps in three
    // replace a container (one by `docker stop`, one by `docker kill`), the third restarts one.
    let mut step = 0usize;
    let mut next_step = t0.elapsed() + CHURN_EVERY;
    let mut next_report = Duration::from_secs(30);
    while t0.elapsed() < plan.duration {
        if t0.elapsed() < next_step {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        next_step += CHURN_EVERY;
        let slot = (step * 7 + 3) % plan.callers;
        let caller = slots[slot].take().expect("every slot holds a caller");
        match step % 3 {
            2 => {
                docker_ok(["restart", "--time", "1", &caller.container.id]);
                churn.restarted += 1;
                slots[slot] = Some(caller);
            }
            how => {
                if how == 0 {
                    caller.container.stop();
                    churn.stopped += 1;
                } else {
                    docker_ok(["kill", &caller.container.id]);
                    churn.killed += 1;
                }
                finished.push(caller.finish(t0));
                // Another role at once, on the same address.
                let role = (last_role[slot] + 1 + (step * 5) % (plan.roles - 1)) % plan.roles;
                last_role[slot] = role;
                slots[slot] = Some(start_caller(&mut churn, slot, plan.role(role)));
                churn.ip_reuses += 1;
            }
        }
        step += 1;
        if t0.elapsed() >= next_report {
            next_report += Duration::from_secs(30);
            let s = sampler.latest();
            eprintln!(
                "soak: {:>4}s  containers started {:>4}  daemon rss {} KiB, {} fds, {} requests",
                t0.elapsed().as_secs(),
                churn.started,
                s.as_ref().map_or(0, |s| s.rss_kib),
                s.as_ref().map_or(0, |s| s.fds),
                s.as_ref().map_or(0, |s| s.requests),
            );
        }
    }
    let samples = sampler.finish();
    let alive = matches!(process.child.try_wait(), Ok(None));

    // Stop the rest together (SIGTERM: the probes exit at once), then read what they printed.
    let mut stop = vec!["stop".to_string(), "--time".into(), "2".into()];
    stop.extend(slots.iter().flatten().map(|c| c.container.id.clone()));
    docker_ok(&stop);
    for caller in slots.iter_mut().filter_map(Option::take) {
        finished.push(caller.finish(t0));
    }
    let elapsed = t0.elapsed();
    let resets = relay.resets.load(Ordering::Relaxed);
    drop(rt);
    let daemon_log = process.log_text();
    drop(process);

    // ----- What happened

    let (outage_from_ms, outage_to_ms) = {
        let w = outage_wall.lock().expect("outage");
        (
            w.0.expect("the outage started"),
            w.1.expect("the outage ended"),
        )
    };
    let window = outage_from_ms..=outage_to_ms + GRACE.as_millis() as u64;
    let wall0_ms = unix_ms(wall0);
    let secs = |ms: u64| ms.saturating_sub(wall0_ms) as f64 / 1000.0;

    let mut rounds = 0u64;
    let mut checked = 0u64;
    let mut requests = 0u64;
    let mut wrong: Vec<String> = Vec::new();
    let mut caller_5xx_in = 0u64;
    let mut caller_5xx_out: Vec<String> = Vec::new();
    let mut callers_with_5xx = 0usize;
    // Callers served before STS went down, that met a 5xx afterwards: their credentials were
    // cached, valid for an hour, so imdsd had no reason to fail them.
    let mut cached_5xx: Vec<String> = Vec::new();
    let mut failed_in = 0u64;
    let mut failed_out: Vec<String> = Vec::new();
    let mut transport_errors = 0u64;
    let mut unchecked_callers: Vec<String> = Vec::new();
    for f in &finished {
        let expected_arn = format!("arn:aws:sts::{ACCOUNT}:assumed-role/{}/{}", f.role, f.name);
        let mut own_checked = 0;
        let mut saw_5xx = false;
        let mut served_before_outage = false;
        for line in lines(&f.stdout) {
            let Some(at) = line["at_ms"].as_u64() else {
                continue;
            };
            rounds += 1;
            let statuses = line["http"].as_object().cloned().unwrap_or_default();
            requests += statuses.values().filter_map(Value::as_u64).sum::<u64>();
            transport_errors += line["transport_errors"].as_u64().unwrap_or(0);
            // What imdsd listed, and what STS says the credentials are.
            let listed = line["role"].as_str();
            let arn = line["caller_arn"].as_str();
            if arn.is_some() {
                checked += 1;
                own_checked += 1;
            }
            if listed.is_some_and(|r| r != f.role) || arn.is_some_and(|a| a != expected_arn) {
                wrong.push(format!(
                    "{} ({}, {}, started at {:.1}s) at {:.1}s: {line}",
                    f.name,
                    f.role,
                    f.ip,
                    f.started.as_secs_f64(),
                    secs(at)
                ));
            }
            for t in line["http_5xx_at_ms"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
            {
                saw_5xx = true;
                if served_before_outage {
                    cached_5xx.push(format!("{} at {:.1}s: {line}", f.name, secs(t)));
                }
                if window.contains(&t) {
                    caller_5xx_in += 1;
                } else {
                    caller_5xx_out.push(format!("{} at {:.1}s: {line}", f.name, secs(t)));
                }
            }
            if line["ok"] != true {
                let end = at + line["elapsed_ms"].as_u64().unwrap_or(0);
                if end >= *window.start() && at <= *window.end() {
                    failed_in += 1;
                } else {
                    failed_out.push(format!("{} at {:.1}s: {line}", f.name, secs(at)));
                }
            }
            let end = at + line["elapsed_ms"].as_u64().unwrap_or(0);
            served_before_outage |= line["caller_arn"].is_string() && end < outage_from_ms;
        }
        callers_with_5xx += usize::from(saw_5xx);
        // Long enough outside the outage to have had a few rounds: it must have been served.
        let lived = f.ended.saturating_sub(f.started);
        if lived >= 4 * ROUND_EVERY + GRACE && own_checked == 0 {
            unchecked_callers.push(format!("{} ({}): {}", f.name, f.role, f.stdout));
        }
    }

    let mut server_5xx_in = 0u64;
    let mut server_5xx_out: Vec<String> = Vec::new();
    for pair in samples.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let n = b.server_5xx.saturating_sub(a.server_5xx);
        if n == 0 {
            continue;
        }
        let (from, to) = (
            wall0_ms + a.at.as_millis() as u64,
            wall0_ms + b.at.as_millis() as u64,
        );
        if to >= *window.start() && from <= *window.end() {
            server_5xx_in += n;
        } else {
            server_5xx_out.push(format!("{n} between {:?} and {:?}", a.at, b.at));
        }
    }

    let quarter = plan.duration / 4;
    let in_range = |from: Duration, to: Duration| -> Vec<&Sample> {
        samples
            .iter()
            .filter(|s| s.at >= from && s.at <= to)
            .collect()
    };
    let q2 = in_range(quarter, 2 * quarter);
    let q4 = in_range(3 * quarter, plan.duration);
    assert!(
        q2.len() >= 3 && q4.len() >= 3,
        "too few samples of the daemon ({} and {}): {samples:?}",
        q2.len(),
        q4.len()
    );
    let min = |s: &[&Sample], f: fn(&Sample) -> u64| s.iter().map(|s| f(s)).min().unwrap_or(0);
    let max = |s: &[&Sample], f: fn(&Sample) -> u64| s.iter().map(|s| f(s)).max().unwrap_or(0);
    let (rss_q2, rss_q4) = (min(&q2, |s| s.rss_kib), min(&q4, |s| s.rss_kib));
    let (fds_q2, fds_q4) = (min(&q2, |s| s.fds), min(&q4, |s| s.fds));
    let warm = q2[0];
    let end = samples.last().expect("samples");
    let server_requests = end.requests;

    let report = json!({
        "started_unix_ms": wall0_ms,
        "duration_s": plan.duration.as_secs(),
        "ran_s": elapsed.as_secs(),
        "callers_at_once": plan.callers,
        "roles": plan.roles,
        "containers_started": churn.started,
        "containers_stopped": churn.stopped,
        "containers_killed": churn.killed,
        "containers_restarted": churn.restarted,
        "ip_reuses_by_another_role": churn.ip_reuses,
        "rounds": rounds,
        "rounds_checked_by_sts": checked,
        "requests_seen_by_callers": requests,
        "requests_counted_by_daemon": server_requests,
        "wrong_role_answers": wrong.len(),
        "outage_s": [secs(outage_from_ms), secs(outage_to_ms)],
        "grace_s": GRACE.as_secs(),
        "sts_connections_reset": resets,
        "caller_5xx_in_outage": caller_5xx_in,
        "caller_5xx_outside": caller_5xx_out.len(),
        "daemon_5xx_in_outage": server_5xx_in,
        "daemon_5xx_outside": server_5xx_out.len(),
        "callers_that_met_a_5xx": callers_with_5xx,
        "callers_served_before_the_outage_that_met_a_5xx": cached_5xx.len(),
        "failed_rounds_in_outage": failed_in,
        "failed_rounds_outside": failed_out.len(),
        "transport_errors": transport_errors,
        "rss_kib": {"warm": warm.rss_kib, "end": end.rss_kib,
                    "second_quarter": [rss_q2, max(&q2, |s| s.rss_kib)],
                    "last_quarter": [rss_q4, max(&q4, |s| s.rss_kib)],
                    "max": samples.iter().map(|s| s.rss_kib).max()},
        "fds": {"warm": warm.fds, "end": end.fds,
                "second_quarter": [fds_q2, max(&q2, |s| s.fds)],
                "last_quarter": [fds_q4, max(&q4, |s| s.fds)],
                "max": samples.iter().map(|s| s.fds).max()},
        "samples": samples.len(),
        // [seconds, RSS KiB, descriptors, the daemon's 5xx so far], one every SAMPLE_EVERY.
        "series": samples
            .iter()
            .map(|s| json!([s.at.as_secs(), s.rss_kib, s.fds, s.server_5xx]))
            .collect::<Vec<_>>(),
        "examples": {
            "wrong": wrong.iter().take(5).collect::<Vec<_>>(),
            "caller_5xx_outside": caller_5xx_out.iter().take(5).collect::<Vec<_>>(),
            "daemon_5xx_outside": server_5xx_out.iter().take(5).collect::<Vec<_>>(),
            "cached_5xx": cached_5xx.iter().take(5).collect::<Vec<_>>(),
            "failed_outside": failed_out.iter().take(10).collect::<Vec<_>>(),
        },
    });
    let path = std::env::var_os("IMDSD_SOAK_REPORT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("soak-report.json"));
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&report).expect("json") + "\n",
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    // Beside it, for a post-mortem: the daemon's log, and every caller's rounds.
    let mut callers_log = String::new();
    for f in &finished {
        let _ = writeln!(
            callers_log,
            "# {} {} {} {:.1}s-{:.1}s",
            f.name,
            f.role,
            f.ip,
            f.started.as_secs_f64(),
            f.ended.as_secs_f64()
        );
        callers_log.push_str(&f.stdout);
    }
    for (suffix, text) in [("daemon.log", &daemon_log), ("callers.log", &callers_log)] {
        let file = path.with_extension(suffix);
        std::fs::write(&file, text).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    }
    eprintln!(
        "soak: report in {}\n{}",
        path.display(),
        serde_json::to_string_pretty(&report).expect("json")
    );

    // ----- The verdict

    assert!(alive, "the daemon died during the soak:\n{daemon_log}");
    assert!(
        !daemon_log.contains("panicked"),
        "the daemon panicked:\n{daemon_log}"
    );
    assert!(
        wrong.is_empty(),
        "{} rounds answered with a role or session that was not the caller's own:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(
        caller_5xx_out.is_empty() && server_5xx_out.is_empty(),
        "5xx outside the outage window:\ncallers: {}\ndaemon: {}",
        caller_5xx_out.join("\n"),
        server_5xx_out.join("\n")
    );
    assert!(
        cached_5xx.is_empty(),
        "callers whose credentials were cached before the outage met a 5xx:\n{}",
        cached_5xx.join("\n")
    );
    assert!(
        resets > 0,
        "the outage never touched imdsd's STS connections"
    );
    assert!(checked > 0 && rounds > 0, "no round was checked by STS");
    assert!(
        unchecked_callers.is_empty(),
        "callers that ran for long never got checked credentials:\n{}",
        unchecked_callers.join("\n")
    );
    assert!(
        flat(rss_q2, rss_q4, rss_slack_kib(rss_q2)),
        "resident memory grew after warm-up: {rss_q2} KiB at rest in the second quarter, \
         {rss_q4} KiB in the last: {samples:?}"
    );
    assert!(
        flat(fds_q2, fds_q4, FD_SLACK),
        "open descriptors grew after warm-up: {fds_q2} at rest in the second quarter, {fds_q4} \
         in the last: {samples:?}"
    );
    // Churn really happened, and so did address reuse by other roles.
    assert!(churn.ip_reuses > 0 && churn.restarted > 0, "{churn:?}");
}
