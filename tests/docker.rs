//! Per-container roles end to end (issue 4), on the machine's real Docker Engine: real containers
//! on link-local test networks, the daemon listening on the network's gateway (host mode), the
//! Rust SDK's IMDS client inside each container (`imdsd probe`), and moto as STS.
//!
//! These tests fail, never skip, when Docker is unavailable. Each creates its own network and
//! removes every container and network it made, also when it fails.

mod common;
#[path = "support/docker.rs"]
mod docker;
#[path = "support/e2e.rs"]
mod e2e;
#[path = "support/sts.rs"]
mod sts_support;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Daemon, Process};
use docker::{RunOpts, TestContainer, TestNetwork, run_to_completion};
use e2e::{RUN_TIMEOUT, eventually, exec_probe, fake_daemon, probe_args, probe_output};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_containers_get_three_roles_checked_by_sts() {
    docker::require_docker();
    let net = TestNetwork::create("roles");
    e2e::three_containers_get_three_roles(&net, "unix:///var/run/docker.sock").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_container_without_a_role_gets_the_default_role_or_a_404() {
    docker::require_docker();
    let net = TestNetwork::create("norole");
    let docker_host = "unix:///var/run/docker.sock";

    let without = fake_daemon(&net, docker_host, &[]).await;
    let listing = format!(
        "http://{}/latest/meta-data/iam/security-credentials/",
        without.addr
    );
    let (exit, logs) = run_to_completion(
        &RunOpts::new(&net, "none")
            .entrypoint("/bin/busybox")
            .args(["wget", "-S", "-q", "-O", "-", &listing]),
        RUN_TIMEOUT,
    );
    assert_ne!(exit, 0, "{logs}");
    assert!(logs.contains("404"), "no role is a 404: {logs}");
    drop(without);

    let with = fake_daemon(&net, docker_host, &["--default-role", "fallback"]).await;
    let (exit, logs) = run_to_completion(
        &RunOpts::new(&net, "default").args(probe_args(&format!("http://{}", with.addr), &[])),
        RUN_TIMEOUT,
    );
    assert_eq!(exit, 0, "{logs}");
    assert_eq!(probe_output(&logs)["role"], "fallback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_container_on_a_network_imdsd_does_not_serve_gets_no_role_until_named() {
    docker::require_docker();
    let metadata = TestNetwork::create("served");
    let other = TestNetwork::create("unattached");
    let docker_host = "unix:///var/run/docker.sock";
    // No --networks: the network whose gateway imdsd listens on is served, and only that one.
    let d = Daemon::start_on(
        &format!("{}:0", metadata.gateway),
        &[
            "--fake-credentials",
            "--docker-host",
            docker_host,
            "--default-role",
            "fallback",
        ],
        tempfile::tempdir().expect("tempdir"),
    )
    .await;
    let index = d.index.clone().expect("the daemon follows Docker");
    eventually(Duration::from_secs(20), "the first sync", || {
        index.is_ready()
    })
    .await;
    let endpoint = format!("http://{}", d.addr);

    // Attached: its own role.
    let (exit, logs) = run_to_completion(
        &RunOpts::new(&metadata, "attached")
            .env("IAM_ROLE", "role-a")
            .args(probe_args(&endpoint, &[])),
        RUN_TIMEOUT,
    );
    assert_eq!(exit, 0, "{logs}");
    assert_eq!(probe_output(&logs)["role"], "role-a");

    // On another network, it reaches imdsd's address through the host's routing, and is
    // refused: neither its own IAM_ROLE nor the default role.
    let listing = format!("{endpoint}/latest/meta-data/iam/security-credentials/");
    let (exit, logs) = run_to_completion(
        &RunOpts::new(&other, "stranger")
            .env("IAM_ROLE", "role-a")
            .entrypoint("/bin/busybox")
            .args(["wget", "-S", "-q", "-O", "-", &listing]),
        RUN_TIMEOUT,
    );
    assert_ne!(exit, 0, "{logs}");
    assert!(
        logs.contains("404"),
        "an unattached container has no role: {logs}"
    );
    assert!(
        !logs.contains("fallback") && !logs.contains("role-a"),
        "{logs}"
    );
    // Counted as a refusal, by reason.
    let metrics = common::raw(d.admin.expect("admin API"), "GET", "/metrics", &[]).text();
    assert!(
        metrics.lines().any(|l| l
            .starts_with("imdsd_requests_refused_total{listener=\"metadata\",reason=\"network\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    drop(d);

    // Named in --networks, the other network is served too.
    let both = format!("{},{}", metadata.name, other.name);
    let d = fake_daemon(&metadata, docker_host, &["--networks", &both]).await;
    let (exit, logs) = run_to_completion(
        &RunOpts::new(&other, "named")
            .env("IAM_ROLE", "role-b")
            .args(probe_args(&format!("http://{}", d.addr), &[])),
        RUN_TIMEOUT,
    );
    assert_eq!(exit, 0, "{logs}");
    assert_eq!(probe_output(&logs)["role"], "role-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_role_outside_the_allow_list_is_refused_without_an_sts_call() {
    docker::require_docker();
    let net = TestNetwork::create("allow");
    let d = fake_daemon(
        &net,
        "unix:///var/run/docker.sock",
        &["--allowed-roles", "app-*", "--default-role", "fallback"],
    )
    .await;
    let url = format!(
        "http://{}/latest/meta-data/iam/security-credentials/admin",
        d.addr
    );
    let (exit, logs) = run_to_completion(
        &RunOpts::new(&net, "escape")
            .env("IAM_ROLE", "admin")
            .entrypoint("/bin/busybox")
            .args(["wget", "-q", "-O", "-", &url]),
        RUN_TIMEOUT,
    );
    assert_eq!(exit, 0, "{logs}");
    let doc: Value = serde_json::from_str(logs.trim()).unwrap_or_else(|e| panic!("{e}: {logs}"));
    assert_eq!(doc["Code"], "AccessDenied", "{doc}");
    assert!(
        doc["Message"]
            .as_str()
            .expect("message")
            .contains("role/admin"),
        "{doc}"
    );
    assert!(
        doc.get("AccessKeyId").is_none(),
        "no credentials at all: {doc}"
    );
    // Nothing was fetched for it: the only cache entries are for allowed roles.
    assert_eq!(d.app_broker.stats().misses, 0, "{:?}", d.app_broker.stats());

    // The SDK reports the refusal instead of retrying; an allowed role works.
    let endpoint = format!("http://{}", d.addr);
    let (exit, logs) = run_to_completion(
        &RunOpts::new(&net, "sdk-escape")
            .env("IAM_ROLE", "admin")
            .args(probe_args(&endpoint, &[])),
        RUN_TIMEOUT,
    );
    assert_eq!(exit, 1, "{logs}");
    assert!(
        probe_output(&logs)["error"]
            .as_str()
            .expect("error")
            .contains("AccessDenied"),
        "{logs}"
    );
    let (exit, logs) = run_to_completion(
        &RunOpts::new(&net, "allowed")
            .env("IAM_ROLE", "app-web")
            .args(probe_args(&endpoint, &[])),
        RUN_TIMEOUT,
    );
    assert_eq!(exit, 0, "{logs}");
    assert_eq!(probe_output(&logs)["role"], "app-web");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recycled_address_never_carries_the_previous_containers_role_or_token() {
    docker::require_docker();
    let net = TestNetwork::create("reuse");
    let d = fake_daemon(
        &net,
        "unix:///var/run/docker.sock",
        &["--default-role", "fallback"],
    )
    .await;
    let started = Instant::now();
    e2e::recycle_one_address(&net, &d.url(), net.host(10), 50);
    eprintln!("50 rounds in {:?}", started.elapsed());
    // On the host, each removal was seen from the kernel, not only from Docker's events.
    let stats = d.docker_stats.clone().expect("stats");
    assert!(
        stats.exits_seen.load(Ordering::Relaxed) >= 50,
        "{} exits seen for 50 removals",
        stats.exits_seen.load(Ordering::Relaxed)
    );
}

/// A unix-socket proxy in front of the Docker socket that the test can cut and restore, to take
/// the engine away from the daemon without stopping the machine's Docker, or cut the event stream
/// alone in the middle of an event.
struct SocketProxy {
    path: PathBuf,
    _dir: tempfile::TempDir,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// When set, the next event stream bytes holding this text are cut in the middle of it.
    cut_at: Arc<Mutex<Option<Vec<u8>>>>,
    /// Event streams cut that way so far.
    event_cuts: Arc<AtomicUsize>,
}

impl SocketProxy {
    fn start() -> SocketProxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let proxy = SocketProxy {
            path: dir.path().join("docker.sock"),
            _dir: dir,
            task: Mutex::new(None),
            connections: Arc::new(Mutex::new(Vec::new())),
            cut_at: Arc::new(Mutex::new(None)),
            event_cuts: Arc::new(AtomicUsize::new(0)),
        };
        proxy.restore();
        proxy
    }

    /// Arms a cut of the event stream: the first event that mentions `text` (a container id, say)
    /// is passed on up to the middle of `text`, and then the connection is closed, leaving the
    /// daemon half an event. Other connections (inspects, lists) and new ones are unaffected.
    fn cut_event_stream_at(&self, text: &str) {
        *self.cut_at.lock().expect("lock") = Some(text.as_bytes().to_vec());
    }

    fn url(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Starts accepting again.
    fn restore(&self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = tokio::net::UnixListener::bind(&self.path).expect("bind the proxy socket");
        let connections = self.connections.clone();
        let (cut_at, cuts) = (self.cut_at.clone(), self.event_cuts.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (cut_at, cuts) = (cut_at.clone(), cuts.clone());
                let conn = tokio::spawn(async move {
                    if let Ok(engine) =
                        tokio::net::UnixStream::connect("/var/run/docker.sock").await
                    {
                        pump(client, engine, cut_at, cuts).await;
                    }
                });
                connections.lock().expect("lock").push(conn);
            }
        });
        *self.task.lock().expect("lock") = Some(task);
    }

    /// Stops accepting and drops every connection (the event stream with them).
    fn cut(&self) {
        if let Some(t) = self.task.lock().expect("lock").take() {
            t.abort();
        }
        for c in self.connections.lock().expect("lock").drain(..) {
            c.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for SocketProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Copies one connection both ways; on a connection that asked for the event stream, cuts it as
/// [`SocketProxy::cut_event_stream_at`] says. Returning drops both sockets.
async fn pump(
    client: tokio::net::UnixStream,
    engine: tokio::net::UnixStream,
    cut_at: Arc<Mutex<Option<Vec<u8>>>>,
    cuts: Arc<AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_engine, mut to_engine) = engine.into_split();
    let events = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let asks_for_events = events.clone();
    let up = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = from_client.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if buf[..n].windows(8).any(|w| w == b"/events?") {
                asks_for_events.store(true, Ordering::SeqCst);
            }
            if to_engine.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to_engine.shutdown().await;
        // The answer may still be coming: let `down` finish the connection.
        std::future::pending::<()>().await;
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from_engine.read(&mut buf).await {
            if n == 0 {
                return;
            }
            let mut chunk = &buf[..n];
            let mut cut = false;
            if events.load(Ordering::SeqCst) {
                let mut armed = cut_at.lock().expect("lock");
                if let Some(text) = armed.as_ref()
                    && let Some(at) = chunk.windows(text.len()).position(|w| w == text.as_slice())
                {
                    chunk = &chunk[..at + text.len() / 2];
                    *armed = None;
                    cut = true;
                }
            }
            if to_client.write_all(chunk).await.is_err() {
                return;
            }
            if cut {
                cuts.fetch_add(1, Ordering::SeqCst);
                let _ = to_client.flush().await;
                return;
            }
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_the_engine_never_serves_a_stale_role_and_the_index_recovers() {
    docker::require_docker();
    let net = TestNetwork::create("cut");
    let proxy = SocketProxy::start();
    let d = fake_daemon(&net, &proxy.url(), &["--default-role", "fallback"]).await;
    let stats = d.docker_stats.clone().expect("stats");
    let index = d.index.clone().expect("index");
    let endpoint = format!("http://{}", d.addr);

    let a = TestContainer::run(
        &RunOpts::new(&net, "a")
            .env("IAM_ROLE", "role-a")
            .args(probe_args(&endpoint, &["--hold", "300"])),
    );
    let a_ip: IpAddr = a.ip.expect("A's address");
    eventually(Duration::from_secs(20), "A in the index", || {
        index.lookup(a_ip).is_some()
    })
    .await;
    let (exit, out) = exec_probe(&a, &endpoint, &[]);
    assert_eq!((exit, &out["role"]), (0, &Value::from("role-a")), "{out}");

    // The event stream is cut: the daemon can no longer know whether A is still A.
    proxy.cut();
    eventually(Duration::from_secs(10), "the watcher to notice", || {
        !stats.connected.load(Ordering::Acquire)
    })
    .await;
    let (_, out) = exec_probe(&a, &endpoint, &[]);
    assert_ne!(
        out["role"], "fallback",
        "never another role while blind: {out}"
    );
    let admin = d.admin.expect("admin API");
    let ready = common::raw(admin, "GET", "/readyz", &[]);
    assert_eq!(ready.status, 503, "not ready while blind: {}", ready.text());
    assert!(ready.text().contains("Docker Engine"), "{}", ready.text());
    // Meanwhile C starts, unseen.
    let c = TestContainer::run(&RunOpts::new(&net, "c").env("IAM_ROLE", "role-c").args(
        probe_args(&endpoint, &["--retry-for", "60", "--hold", "300"]),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Back: the watcher reconnects on its own, resyncs, and both are served correctly.
    let reconnects_before = stats.reconnects.load(Ordering::Relaxed);
    proxy.restore();
    let c_ip = c.ip.expect("C's address");
    eventually(Duration::from_secs(30), "the resync", || {
        index.is_ready() && index.lookup(c_ip).is_some()
    })
    .await;
    assert!(stats.connected.load(Ordering::Acquire));
    assert!(reconnects_before >= 1);
    assert_eq!(common::raw(admin, "GET", "/readyz", &[]).status, 200);
    let (exit, out) = exec_probe(&a, &endpoint, &[]);
    assert_eq!((exit, &out["role"]), (0, &Value::from("role-a")), "{out}");
    let (exit, out) = exec_probe(&c, &endpoint, &[]);
    assert_eq!((exit, &out["role"]), (0, &Value::from("role-c")), "{out}");
    // C's own first probe, which kept retrying through the outage, got C's role too.
    eventually(Duration::from_secs(30), "C's first probe", || {
        c.logs().contains("\"role\"")
    })
    .await;
    assert_eq!(probe_output(&c.logs())["role"], "role-c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_request_path_makes_no_docker_api_call_in_steady_state() {
    docker::require_docker();
    let net = TestNetwork::create("steady");
    let d = fake_daemon(&net, "unix:///var/run/docker.sock", &[]).await;
    let stats = d.docker_stats.clone().expect("stats");
    let endpoint = format!("http://{}", d.addr);
    let a = TestContainer::run(
        &RunOpts::new(&net, "a")
            .env("IAM_ROLE", "role-a")
            .args(probe_args(&endpoint, &["--hold", "120"])),
    );
    eventually(Duration::from_secs(30), "A's first probe", || {
        a.logs().contains("\"role\"")
    })
    .await;
    // Prefetched at start: the first request was already a cache hit.
    let broker = d.app_broker.stats();
    assert_eq!(
        broker.misses, 0,
        "the container's first request found its credentials cached: {broker:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = stats.api_calls.load(Ordering::Relaxed);
    let events = stats.events_applied.load(Ordering::Relaxed);

    // The admin API lists A with its role and its (prefetched) credentials' expiry.
    let workloads = common::raw(d.admin.expect("admin API"), "GET", "/v1/workloads", &[]);
    let list: Value = serde_json::from_str(&workloads.text()).expect("json");
    let entries = list.as_array().expect("array");
    assert_eq!(
        entries.len(),
        1,
        "only the containers on the served network: {list:#}"
    );
    let entry = &entries[0];
    assert_eq!(entry["container"]["name"], a.name.as_str(), "{entry:#}");
    assert_eq!(entry["container"]["id"], a.id.as_str(), "{entry:#}");
    assert_eq!(
        entry["role"], "arn:aws:iam::123456789012:role/role-a",
        "{entry:#}"
    );
    assert_eq!(entry["session_name"], a.name.as_str(), "{entry:#}");
    assert!(
        entry["expiration"]
            .as_str()
            .is_some_and(|e| e.ends_with('Z')),
        "{entry:#}"
    );
    assert!(!workloads.text().contains("SecretAccessKey"));

    // 200 more credential requests (plus the SDK's own token, listing and region requests).
    let (exit, out) = exec_probe(&a, &endpoint, &["--repeat", "200"]);
    assert_eq!((exit, &out["role"]), (0, &Value::from("role-a")), "{out}");
    // Other tests' containers start and stop meanwhile on the same engine, and each of their
    // events may cost one inspect; the 200 requests must cost nothing.
    let new_calls = stats.api_calls.load(Ordering::Relaxed) - calls;
    let new_events = stats.events_applied.load(Ordering::Relaxed) - events;
    assert!(
        new_calls <= new_events,
        "{new_calls} Docker API calls during 200 requests from a known container, with only \
         {new_events} engine events to explain them"
    );
}

/// `docker-compose` with a project of its own, taken down when dropped.
struct Compose {
    project: String,
    env: Vec<(String, String)>,
}

impl Compose {
    fn command(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("docker-compose")
            .args(["-p", &self.project, "-f"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("docker-compose.yml"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run docker-compose")
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = self.command(&["down", "-v", "--timeout", "1"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_compose_example_gives_the_app_its_role() {
    docker::require_docker();
    let image = docker::test_image();
    let aws_dir = tempfile::tempdir().expect("tempdir");
    let compose = Compose {
        project: format!("imdsdtest{}", std::process::id()),
        env: vec![
            ("IMDSD_IMAGE".into(), image.clone()),
            ("APP_IMAGE".into(), image),
            ("IMDSD_FAKE_CREDENTIALS".into(), "true".into()),
            (
                "AWS_CONFIG_DIR".into(),
                aws_dir.path().display().to_string(),
            ),
            ("APP_ROLE".into(), "demo-app".into()),
        ],
    };
    let up = compose.command(&["up", "-d"]);
    assert!(
        up.status.success(),
        "docker-compose up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let logs = loop {
        let out = compose.command(&["logs", "--no-color", "app"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.contains("\"ok\"") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let line = logs
        .lines()
        .find_map(|l| l.split_once('|').map(|(_, json)| json.trim().to_string()))
        .unwrap_or_default();
    let out: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
        let daemon = compose.command(&["logs", "--no-color", "imdsd"]);
        panic!(
            "{e}: app said {logs}\nimdsd said {}",
            String::from_utf8_lossy(&daemon.stdout)
        )
    });
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["role"], "demo-app", "{out}");
    assert_eq!(
        out["endpoint"], "http://169.254.169.254",
        "the SDK's own default: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_container_gets_its_role_from_the_container_credentials_endpoint() {
    docker::require_docker();
    // The SDKs send AWS_CONTAINER_CREDENTIALS_RELATIVE_URI to 169.254.170.2: the host's address
    // on this network.
    let net = TestNetwork::create_container_credentials("ecs");
    let d = fake_daemon(
        &net,
        "unix:///var/run/docker.sock",
        &[
            "--ecs-listen",
            "169.254.170.2:80",
            "--default-role",
            "fallback",
        ],
    )
    .await;
    let c = TestContainer::run(
        &RunOpts::new(&net, "ecs")
            .env("IAM_ROLE", "role-e")
            .env(
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "/v2/credentials/e2e",
            )
            .args(["probe", "--container", "--hold", "60"]),
    );
    eventually(Duration::from_secs(30), "the probe's output", || {
        c.logs().contains("\"ok\"")
    })
    .await;
    let logs = c.logs();
    assert!(logs.contains("\"ok\":true"), "{logs}");
    let out = probe_output(&logs);
    assert_eq!(out["source"], "container", "{out}");
    // The same session the metadata service would give it, and its own role's: the admin API
    // shows the container's credentials by the same key hint.
    let workloads = common::raw(d.admin.expect("admin API"), "GET", "/v1/workloads", &[]).text();
    assert!(
        workloads.contains("role/role-e")
            && workloads.contains(out["access_key_id"].as_str().expect("key")),
        "{out}\n{workloads}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_container_is_known_by_its_ipv6_address_too() {
    docker::require_docker();
    let net = TestNetwork::create_dual_stack("v6");
    // A container brings the bridge up, so that the host's IPv6 address becomes usable.
    let _waker = TestContainer::run(
        &RunOpts::new(&net, "waker")
            .entrypoint("/bin/busybox")
            .args(["sleep", "60"]),
    );
    net.wait_ipv6_gateway();
    let gateway6 = net.gateway6.expect("dual stack");
    let d = Daemon::start_on(
        &format!("[{gateway6}]:0"),
        &[
            "--fake-credentials",
            "--docker-host",
            "unix:///var/run/docker.sock",
            "--networks",
            &net.name,
            "--default-role",
            "fallback",
        ],
        tempfile::tempdir().expect("tempdir"),
    )
    .await;
    let index = d.index.clone().expect("index");
    eventually(Duration::from_secs(20), "the first sync", || {
        index.is_ready()
    })
    .await;
    let endpoint = format!("http://{}", d.addr);
    assert!(endpoint.contains('['), "{endpoint}");
    let (exit, logs) = run_to_completion(
        &RunOpts::new(&net, "six")
            .env("IAM_ROLE", "role-six")
            .args(probe_args(&endpoint, &["--print-token"])),
        RUN_TIMEOUT,
    );
    assert_eq!(exit, 0, "{logs}");
    assert_eq!(
        probe_output(&logs)["role"],
        "role-six",
        "its own role over IPv6, not the default"
    );
}

/// The daemon as a process (for its log and exit), on `net`'s gateway with fake credentials,
/// following the engine at `docker_host`; returns once it has synced with the engine.
fn process_daemon(
    net: &TestNetwork,
    docker_host: &str,
    args: &[&str],
) -> (Process, tempfile::TempDir) {
    let state = tempfile::tempdir().expect("tempdir");
    let listen = format!("{}:0", net.gateway);
    let mut all = vec![
        "--listen",
        listen.as_str(),
        "--state-dir",
        state.path().to_str().expect("utf8"),
        "--fake-credentials",
        "--docker-host",
        docker_host,
        "--networks",
        &net.name,
    ];
    all.extend_from_slice(args);
    let p = Process::spawn(&all, &[]);
    p.addr();
    assert!(
        p.wait_for_log(&["following the Docker Engine"], Duration::from_secs(30))
            .is_some(),
        "never synced:\n{}",
        p.log_text()
    );
    (p, state)
}

/// How many log lines contain `text`.
fn log_count(p: &Process, text: &str) -> usize {
    p.log_text().lines().filter(|l| l.contains(text)).count()
}

/// A metric from the daemon's admin API (blocking, so off the runtime's threads).
async fn metric_of(p: &Process, series: &'static str) -> Option<f64> {
    let admin = p.admin_addr().expect("admin API");
    tokio::task::spawn_blocking(move || common::metric(admin, series))
        .await
        .expect("join")
}

/// Asserts the daemon still runs and never panicked.
fn assert_alive(p: &mut Process) {
    assert_eq!(p.child.try_wait().expect("wait"), None, "the daemon exited");
    assert!(!p.log_text().contains("panicked"), "{}", p.log_text());
}

/// The event stream breaks in the middle of the event that says A died, and the new container
/// that takes A's address the next moment starts while the daemon is reconnecting: it is never
/// given A's role; the break is logged and counted, the daemon resyncs on its own, and then
/// serves it its own role.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_stream_cut_in_the_middle_of_an_event_never_hands_out_the_previous_role() {
    docker::require_docker();
    let net = TestNetwork::create("midevent");
    let proxy = SocketProxy::start();
    let (mut d, _state) = process_daemon(&net, &proxy.url(), &["--default-role", "fallback"]);
    let endpoint = format!("http://{}", d.addr());
    let ip = net.host(40);
    let a = TestContainer::run(
        &RunOpts::new(&net, "a")
            .ip(ip)
            .env("IAM_ROLE", "role-a")
            .args(probe_args(
                &endpoint,
                &["--retry-for", "30", "--hold", "300"],
            )),
    );
    eventually(Duration::from_secs(30), "A's first probe", || {
        a.logs().contains("\"role\"")
    })
    .await;
    assert_eq!(probe_output(&a.logs())["role"], "role-a");
    let restarts_before = metric_of(&d, "imdsd_docker_watcher_restarts_total")
        .await
        .expect("metric");

    // A dies; the daemon gets half of the event that says so, then the stream breaks.
    proxy.cut_event_stream_at(&a.id);
    a.rm();
    // B takes A's address at once and asks (retrying) while the watcher reconnects.
    let b = TestContainer::run(
        &RunOpts::new(&net, "b")
            .ip(ip)
            .env("IAM_ROLE", "role-b")
            .args(probe_args(
                &endpoint,
                &["--retry-for", "60", "--hold", "300"],
            )),
    );
    eventually(Duration::from_secs(20), "the cut", || {
        proxy.event_cuts.load(Ordering::SeqCst) == 1
    })
    .await;
    eventually(Duration::from_secs(60), "B's first probe", || {
        b.logs().contains("\"role\"")
    })
    .await;
    let out = probe_output(&b.logs());
    assert_eq!(out["role"], "role-b", "{out}\ndaemon:\n{}", d.log_text());

    let line = d
        .wait_for_log(
            &["cannot follow the Docker Engine"],
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("the break was not logged:\n{}", d.log_text()));
    assert!(line.contains("\"level\":\"WARN\""), "{line}");
    eventually(Duration::from_secs(30), "the resync", || {
        log_count(&d, "following the Docker Engine") >= 2
    })
    .await;
    let restarts = metric_of(&d, "imdsd_docker_watcher_restarts_total")
        .await
        .expect("metric");
    assert!(restarts > restarts_before, "{restarts} watcher restarts");
    assert_eq!(
        metric_of(&d, "imdsd_docker_connected").await,
        Some(1.0),
        "reconnected"
    );
    let (exit, out) = exec_probe(&b, &endpoint, &[]);
    assert_eq!((exit, &out["role"]), (0, &Value::from("role-b")), "{out}");
    // No caller was ever told A's role after A was gone.
    for line in d.log_text().lines().filter(|l| l.contains("imdsd::access")) {
        let v: Value = serde_json::from_str(line).expect("json log line");
        if v["container_id"] == b.id[..12] {
            assert_ne!(v["role"], "arn:aws:iam::123456789012:role/role-a", "{line}");
        }
    }
    assert_alive(&mut d);
}

/// The engine goes away. Meanwhile a container is replaced by a new one under the same name with
/// another role, a dead container's address goes to a new container with another role, and a
/// third container restarts. While the daemon is blind none of them is given a role that is not
/// its own; it says so in its log, its metrics and `/readyz`; when the engine is back it resyncs
/// by itself and each gets its own role.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containers_replaced_while_the_engine_is_away_each_get_their_own_role_when_it_is_back() {
    docker::require_docker();
    let net = TestNetwork::create("away");
    let proxy = SocketProxy::start();
    let (mut d, _state) = process_daemon(&net, &proxy.url(), &["--default-role", "fallback"]);
    let endpoint = format!("http://{}", d.addr());
    let hold = probe_args(&endpoint, &["--retry-for", "30", "--hold", "300"]);
    let a = TestContainer::run(
        &RunOpts::new(&net, "a")
            .ip(net.host(31))
            .env("IAM_ROLE", "role-a")
            .args(hold.clone()),
    );
    let b = TestContainer::run(
        &RunOpts::new(&net, "b")
            .ip(net.host(32))
            .env("IAM_ROLE", "role-b")
            .args(hold.clone()),
    );
    let e = TestContainer::run(
        &RunOpts::new(&net, "e")
            .ip(net.host(33))
            .env("IAM_ROLE", "role-e")
            .args(hold.clone()),
    );
    for (c, role) in [(&a, "role-a"), (&b, "role-b"), (&e, "role-e")] {
        eventually(Duration::from_secs(30), "the first probes", || {
            c.logs().contains("\"role\"")
        })
        .await;
        assert_eq!(probe_output(&c.logs())["role"], role, "{}", c.name);
    }
    let admin = d.admin_addr().expect("admin API");

    // The engine is gone.
    proxy.cut();
    let line = tokio::task::block_in_place(|| {
        d.wait_for_log(
            &["cannot follow the Docker Engine"],
            Duration::from_secs(20),
        )
    })
    .unwrap_or_else(|| panic!("the loss was not logged:\n{}", d.log_text()));
    assert!(line.contains("\"level\":\"WARN\""), "{line}");
    assert_eq!(metric_of(&d, "imdsd_docker_connected").await, Some(0.0));
    assert_eq!(metric_of(&d, "imdsd_docker_index_synced").await, Some(0.0));
    let ready = tokio::task::spawn_blocking(move || common::raw(admin, "GET", "/readyz", &[]))
        .await
        .expect("join");
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(ready.text().contains("Docker Engine"), "{ready:?}");

    // Meanwhile: A is replaced under its own name by A2 with another role and address; B's
    // address goes to C; E restarts.
    let a_name = a.name.clone();
    a.rm();
    let a2 = TestContainer::run(
        &RunOpts::new(&net, "a2")
            .named_exactly(&a_name)
            .ip(net.host(34))
            .env("IAM_ROLE", "role-a2")
            .args(probe_args(&endpoint, &["--hold", "300"])),
    );
    b.rm();
    let c = TestContainer::run(
        &RunOpts::new(&net, "c")
            .ip(net.host(32))
            .env("IAM_ROLE", "role-c")
            .args(probe_args(&endpoint, &["--hold", "300"])),
    );
    e.restart();
    // Blind, the daemon gives none of them a role that is not theirs (at most an error).
    for (who, wrong) in [(&a2, "role-a"), (&c, "role-b")] {
        let (_, out) = exec_probe(who, &endpoint, &[]);
        assert_ne!(out["role"], wrong, "{}: {out}", who.name);
        assert_ne!(out["role"], "fallback", "{}: {out}", who.name);
    }

    // Back.
    proxy.restore();
    eventually(Duration::from_secs(30), "the resync", || {
        log_count(&d, "following the Docker Engine") >= 2
    })
    .await;
    assert_eq!(metric_of(&d, "imdsd_docker_connected").await, Some(1.0));
    assert_eq!(metric_of(&d, "imdsd_docker_index_synced").await, Some(1.0));
    assert!(
        metric_of(&d, "imdsd_docker_watcher_restarts_total")
            .await
            .expect("metric")
            >= 1.0
    );
    for (who, role) in [(&a2, "role-a2"), (&c, "role-c"), (&e, "role-e")] {
        // Retrying only errors (an SDK's one-second timeout on a busy machine), never a role.
        let (exit, out) = exec_probe(who, &endpoint, &["--retry-for", "20"]);
        assert_eq!(
            (exit, &out["role"]),
            (0, &Value::from(role)),
            "{}: {out}\ndaemon:\n{}",
            who.name,
            d.log_text()
        );
    }
    let ready = tokio::task::spawn_blocking(move || common::raw(admin, "GET", "/readyz", &[]))
        .await
        .expect("join");
    assert_eq!(ready.status, 200, "{ready:?}");
    assert_alive(&mut d);
}
