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
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Daemon;
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
/// the engine away from the daemon without stopping the machine's Docker.
struct SocketProxy {
    path: PathBuf,
    _dir: tempfile::TempDir,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl SocketProxy {
    fn start() -> SocketProxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let proxy = SocketProxy {
            path: dir.path().join("docker.sock"),
            _dir: dir,
            task: Mutex::new(None),
            connections: Arc::new(Mutex::new(Vec::new())),
        };
        proxy.restore();
        proxy
    }

    fn url(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Starts accepting again.
    fn restore(&self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = tokio::net::UnixListener::bind(&self.path).expect("bind the proxy socket");
        let connections = self.connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut engine) =
                        tokio::net::UnixStream::connect("/var/run/docker.sock").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
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
