//! What the end-to-end tests on a container engine share, whichever engine it is (the machine's
//! Docker Engine in tests/docker.rs, a test's own Podman in tests/podman.rs): the daemon in the
//! test process serving a test network from its gateway, and `imdsd probe` in containers.
//!
//! Include it after `common`, `support/docker.rs` and `support/sts.rs`:
//!
//! ```ignore
//! mod common;
//! #[path = "support/docker.rs"] mod docker;
//! #[path = "support/e2e.rs"] mod e2e;
//! #[path = "support/sts.rs"] mod sts_support;
//! ```
#![allow(dead_code)]

use std::time::{Duration, Instant};

use serde_json::Value;

use super::common::{Daemon, Process};
use super::docker::{RunOpts, TestContainer, TestNetwork};
use super::sts_support::{Moto, OPERATOR_ENV};

/// How long a test container may run.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// The probe's JSON line in a container's output.
pub fn probe_output(logs: &str) -> Value {
    logs.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .unwrap_or_else(|| panic!("no probe output in the container's logs:\n{logs}"))
}

/// Polls `done` every 50 ms for up to `limit`.
pub async fn eventually(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A daemon in this process, serving `net` from its gateway with fake credentials. Its log goes
/// to the test's output when `IMDSD_TEST_LOG` holds a filter (`IMDSD_TEST_LOG=imdsd=debug`).
pub async fn fake_daemon(net: &TestNetwork, docker_host: &str, args: &[&str]) -> Daemon {
    if let Ok(filter) = std::env::var("IMDSD_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    let mut all = vec![
        "--fake-credentials",
        "--docker-host",
        docker_host,
        "--networks",
        &net.name,
    ];
    all.extend_from_slice(args);
    let d = Daemon::start_on(
        &format!("{}:0", net.gateway),
        &all,
        tempfile::tempdir().expect("tempdir"),
    )
    .await;
    let index = d.index.clone().expect("the daemon follows Docker");
    eventually(Duration::from_secs(20), "the first sync", || {
        index.is_ready()
    })
    .await;
    d
}

/// `imdsd probe --endpoint ENDPOINT EXTRA…`, the test image's in-container client.
pub fn probe_args(endpoint: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["probe".to_string(), "--endpoint".into(), endpoint.into()];
    args.extend(extra.iter().map(|s| (*s).to_string()));
    args
}

/// `imdsd probe` run in the running container `c`: its exit code and output.
pub fn exec_probe(c: &TestContainer, endpoint: &str, extra: &[&str]) -> (i64, Value) {
    let mut cmd = vec!["/usr/local/bin/imdsd".to_string()];
    cmd.extend(probe_args(endpoint, extra));
    let (exit, out) = c.exec(cmd);
    (exit, probe_output(&out))
}

/// Three containers on `net`, each naming its role its own way (`IAM_ROLE`, the `imdsd.role`
/// label, a role alias), ask the moment they start, with the Rust SDK inside, and check their
/// credentials with moto's STS: each gets its own role, with its own name as the session name,
/// and the daemon's request log says so. The daemon is a process on `net`'s gateway, following
/// the engine at `docker_host`.
pub async fn three_containers_get_three_roles(net: &TestNetwork, docker_host: &str) {
    let gateway = net.gateway.to_string();
    // moto on the gateway, so that the containers can check their credentials with it too.
    let moto = Moto::start_on(&gateway);
    let state = tempfile::tempdir().expect("tempdir");
    let config = tempfile::NamedTempFile::new().expect("tempfile");
    std::fs::write(config.path(), "role_aliases = { gamma = \"role-c\" }\n").expect("write");
    let process = Process::spawn(
        &[
            "--listen",
            &format!("{gateway}:0"),
            "--state-dir",
            state.path().to_str().expect("utf8"),
            "--sts-endpoint",
            &moto.url,
            "--docker-host",
            docker_host,
            "--networks",
            &net.name,
            "--config",
            config.path().to_str().expect("utf8"),
        ],
        OPERATOR_ENV,
    );
    let addr = process
        .addr
        .unwrap_or_else(|| panic!("daemon did not start:\n{}", process.log_text()));
    let endpoint = format!("http://{addr}");
    // Ready (synced with the engine, STS reachable) before the containers start: what is timed
    // below is a container's first request, not the daemon's start (Podman's /info, asked before
    // the first sync, takes seconds).
    let admin = process
        .admin_addr()
        .unwrap_or_else(|| panic!("no admin API:\n{}", process.log_text()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while super::common::raw(admin, "GET", "/readyz", &[]).status != 200 {
        assert!(
            Instant::now() < deadline,
            "the daemon is not ready after 30 s:\n{}",
            process.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Each container names its role its own way, and asks the moment it starts.
    let probe = probe_args(&endpoint, &["--sts"]);
    let specs: [(&str, RunOpts); 3] = [
        // Fixed addresses: the probes exit at once, before Docker could be asked for theirs.
        (
            "role-a",
            RunOpts::new(net, "a")
                .ip(net.host(11))
                .env("IAM_ROLE", "role-a"),
        ),
        (
            "role-b",
            RunOpts::new(net, "b")
                .ip(net.host(12))
                .label("imdsd.role", "role-b@123456789012"),
        ),
        (
            "role-c",
            RunOpts::new(net, "c")
                .ip(net.host(13))
                .label("imdsd.role-alias", "gamma"),
        ),
    ];
    let containers: Vec<(&str, TestContainer)> = specs
        .into_iter()
        .map(|(role, opts)| {
            let opts = opts
                .env("AWS_ENDPOINT_URL_STS", &moto.url)
                .args(probe.clone());
            (role, TestContainer::run(&opts))
        })
        .collect();
    for (role, c) in &containers {
        let exit = c.wait_exit(RUN_TIMEOUT);
        let logs = c.logs();
        assert_eq!(exit, 0, "{role}: {logs}\ndaemon:\n{}", process.log_text());
        let out = probe_output(&logs);
        assert_eq!(out["role"], *role, "{out}");
        // STS itself says whose credentials these are: the role, with the container's name as the
        // session name.
        let arn = out["caller_arn"].as_str().expect("caller arn");
        assert_eq!(
            arn,
            format!("arn:aws:sts::123456789012:assumed-role/{role}/{}", c.name),
            "{out}"
        );
        // Started and asked at once. How long it took (the SDK, imdsd, and moto's STS twice) is
        // shown, not asserted: on a loaded machine it says more about the machine.
        let elapsed = out["elapsed_ms"].as_u64().expect("elapsed");
        eprintln!("{role}: credentials checked {elapsed} ms after the container started");
    }
    // The request log says which container got which role, with what.
    let log = process.log_text();
    for (role, c) in &containers {
        let line = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| {
                v["target"] == "imdsd::access"
                    && v["container"] == c.name.as_str()
                    && v["path"] == format!("/latest/meta-data/iam/security-credentials/{role}")
            })
            .unwrap_or_else(|| panic!("no access log line for {}:\n{log}", c.name));
        assert_eq!(line["container_id"], &c.id[..12], "{line}");
        assert_eq!(line["caller"], c.ip.expect("ip").to_string(), "{line}");
        assert_eq!(
            line["role"],
            format!("arn:aws:iam::123456789012:role/{role}"),
            "{line}"
        );
        assert_eq!(line["status"], 200, "{line}");
        assert!(
            line["agent"]
                .as_str()
                .expect("agent")
                .contains("aws-sdk-rust"),
            "{line}"
        );
        assert!(line["micros"].as_u64().is_some(), "{line}");
    }
}

/// `rounds` of remove-then-start on the one address `ip` of `net`, with the daemon at `endpoint`
/// serving `net`. Each round, A (`IAM_ROLE=role-a`) runs, gets its role and an IMDSv2 token
/// through the SDK, and is force-removed while running; B (`IAM_ROLE=role-b`) starts on A's
/// address at once. B's very first request, a plain IMDSv1 GET of the role listing, must never
/// name role-a: it names role-b, or, when the engine could not confirm B within the bounded
/// wait (a busy engine, a backlog of events), it is the unknown caller's 404 — in fewer than
/// half of the rounds, or the served path was not exercised. Then A's token must be refused
/// (401) for B, and B's own IMDSv2 session (the SDK's token PUT, then GETs) must get role-b. B
/// exits by itself, and the next round's A takes the address from it.
pub fn recycle_one_address(net: &TestNetwork, endpoint: &str, ip: std::net::IpAddr, rounds: usize) {
    let listing = format!("{endpoint}/latest/meta-data/iam/security-credentials/");
    let mut unknown = 0;
    for round in 0..rounds {
        let a = TestContainer::run(
            &RunOpts::new(net, "a")
                .ip(ip)
                .env("IAM_ROLE", "role-a")
                .entrypoint("/bin/busybox")
                .args(["sleep", "600"]),
        );
        let (exit, out) = exec_probe(&a, endpoint, &["--print-token"]);
        assert_eq!(exit, 0, "round {round}, A: {out}");
        assert_eq!(out["role"], "role-a", "round {round}: {out}");
        let token = out["token"].as_str().expect("token").to_string();
        a.rm();

        // No `-T` for wget: busybox 1.35's wget segfaults with it; wait_exit bounds the run.
        let script = format!(
            "/bin/busybox wget -q -O - {listing}; echo \" v1-exit=$?\"; \
             exec /usr/local/bin/imdsd probe --endpoint {endpoint} --foreign-token {token}"
        );
        let b = TestContainer::run(
            &RunOpts::new(net, "b")
                .ip(ip)
                .env("IAM_ROLE", "role-b")
                .entrypoint("/bin/busybox")
                .args(["sh", "-c", &script]),
        );
        let exit = b.wait_exit(RUN_TIMEOUT);
        let logs = b.logs();
        // wget's body on stdout, then our marker; its complaints on stderr, after.
        let first = logs.lines().next().unwrap_or_default();
        assert!(
            !first.contains("role-a"),
            "round {round}: B's first request got A's role: {logs}"
        );
        if first == " v1-exit=1" && logs.contains("404 Not Found") {
            unknown += 1;
        } else {
            assert_eq!(
                first, "role-b v1-exit=0",
                "round {round}: B's first request (IMDSv1) got neither B's role nor a 404: {logs}"
            );
        }
        assert_eq!(exit, 0, "round {round}, B: {logs}");
        let out = probe_output(&logs);
        assert_eq!(
            out["foreign_token_status"], 401,
            "round {round}: A's token worked for B: {out}"
        );
        assert_eq!(
            out["role"], "role-b",
            "round {round}: B got another role: {out}"
        );
        b.rm();
    }
    eprintln!("B's first request was the unknown caller's 404 in {unknown} of {rounds} rounds");
    assert!(
        unknown * 2 < rounds,
        "B's first request got no role in {unknown} of {rounds} rounds: the served path was \
         hardly exercised"
    );
}
