//! Running it for real (issue 5): the admin API (`/healthz`, `/readyz`, `/metrics`,
//! `/v1/workloads`), the request log and the promise that it never holds a secret, and graceful
//! shutdown. The daemon runs in this process or as the real binary; STS is moto or the scripted
//! STS; clients are raw sockets and the AWS CLI.

mod common;
#[path = "support/sts.rs"]
mod sts_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Daemon, Process, raw, raw_with_hosts, run_to_exit};
use serde_json::Value;
use sts_support::{Behaviour, Moto, ScriptedSts, sts_daemon};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/app";

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = raw(addr, "GET", path, &[]);
    (r.status, r.text())
}

/// The value of an OpenMetrics sample line such as `imdsd_tokens_issued_total 3`.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

fn token(addr: SocketAddr) -> String {
    let r = raw(
        addr,
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", "60")],
    );
    assert_eq!(r.status, 200);
    r.text()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_requests_tokens_and_cache_use() {
    let d = Daemon::start(&["--fake-credentials", "app"]).await;
    let admin = d.admin.expect("admin API");
    let before = get(admin, "/metrics").1;

    let t = token(d.addr);
    for _ in 0..3 {
        let r = raw(d.addr, "GET", CREDS, &[("X-aws-ec2-metadata-token", &t)]);
        assert_eq!(r.status, 200);
    }
    let r = raw(
        d.addr,
        "GET",
        CREDS,
        &[("X-aws-ec2-metadata-token", "forged")],
    );
    assert_eq!(r.status, 401);
    assert_eq!(get(d.addr, "/latest/meta-data/nope").0, 404);

    let (status, after) = get(admin, "/metrics");
    assert_eq!(status, 200);
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(delta("imdsd_tokens_issued_total"), 1.0, "{after}");
    assert_eq!(delta("imdsd_tokens_rejected_total"), 1.0, "{after}");
    assert_eq!(
        delta(r#"imdsd_requests_total{route="credentials",status="200"}"#),
        3.0,
        "{after}"
    );
    assert_eq!(
        delta(r#"imdsd_requests_total{route="credentials",status="401"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"imdsd_requests_total{route="metadata",status="404"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"imdsd_requests_total{route="token",status="200"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"imdsd_request_duration_seconds_count{route="credentials"}"#),
        4.0,
        "{after}"
    );
    // The first request fetched, the others were served from the cache: one source call.
    assert_eq!(delta("imdsd_credential_cache_misses_total"), 1.0, "{after}");
    assert_eq!(delta("imdsd_credential_cache_hits_total"), 2.0, "{after}");
    assert_eq!(sample(&after, "imdsd_sts_calls_total"), 1.0);
    assert_eq!(sample(&after, "imdsd_sts_call_duration_seconds_count"), 1.0);
    assert!(after.ends_with("# EOF\n"), "OpenMetrics text");
    // The in-process counters agree with what is exported.
    assert_eq!(
        d.metrics
            .requests_for(imdsd::metrics::Route::Credentials, 200),
        3
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_unknown_paths() {
    let d = Daemon::start(&["--fake-credentials"]).await;
    let admin = d.admin.expect("admin API");
    assert_eq!(get(admin, "/healthz"), (200, "ok\n".into()));
    assert_eq!(get(admin, "/readyz"), (200, "ready\n".into()));
    assert_eq!(get(admin, "/v1/workloads"), (200, "[]\n".into()));
    let (status, body) = get(admin, "/nope");
    assert_eq!(status, 404);
    assert!(body.contains("/metrics"), "{body}");
    assert_eq!(raw(admin, "POST", "/healthz", &[]).status, 405);
    // The admin API is not on the metadata listener.
    assert_eq!(get(d.addr, "/healthz").0, 404);

    // An engine that is not there: not ready, and the reason says what to check.
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = format!("unix://{}/absent.sock", dir.path().display());
    let no_docker = Daemon::start(&["--fake-credentials", "--docker-host", &socket]).await;
    let (status, body) = get(no_docker.admin.expect("admin"), "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("Docker Engine"), "{body}");
}

#[test]
fn the_admin_api_never_shares_the_metadata_address() {
    let (code, stderr) = run_to_exit(
        &[
            "--fake-credentials",
            "--listen",
            "169.254.169.254:80",
            "--admin-listen",
            "169.254.169.254:9169",
        ],
        &[],
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("--admin-listen") && stderr.contains("127.0.0.1:9169"),
        "{stderr}"
    );
}

async fn eventually_status(addr: SocketAddr, path: &str, want: u16, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let (status, body) = get(addr, path);
        if status == want {
            return body;
        }
        assert!(Instant::now() < deadline, "{path} stayed {status}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_sts() {
    let sts = ScriptedSts::start().await;
    let (d, _state) = sts_daemon(&sts.url, &["app"]);
    let admin = d.admin_addr().expect("admin API");
    eventually_status(admin, "/readyz", 200, Duration::from_secs(10)).await;

    sts.set(None, Behaviour::Fail);
    // The next call to STS fails (a cold role fetch), and so does readiness.
    let r = raw(d.addr(), "GET", CREDS, &[]);
    assert_eq!(r.status, 503, "{}", r.text());
    let body = eventually_status(admin, "/readyz", 503, Duration::from_secs(10)).await;
    assert!(body.contains("STS is unavailable"), "{body}");

    // STS recovers; the next fetch (an SDK retrying) succeeds and readiness comes back.
    sts.set(None, Behaviour::Grant);
    let deadline = Instant::now() + Duration::from_secs(30);
    while raw(d.addr(), "GET", CREDS, &[]).status != 200 {
        assert!(
            Instant::now() < deadline,
            "STS never came back for the daemon"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eventually_status(admin, "/readyz", 200, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_log_never_contains_a_secret_or_a_token() {
    let moto = Moto::start();
    let sts = ScriptedSts::start().await;
    sts.set(Some("denied"), Behaviour::Deny);
    let (d, _state) = sts_daemon(&moto.url, &["--log-level", "debug", "app"]);
    let (scripted, _state2) = sts_daemon(&sts.url, &["--log-level", "debug", "denied"]);

    let mut secrets = Vec::new();
    for _ in 0..3 {
        let t = token(d.addr());
        secrets.push(t.clone());
        let r = raw(d.addr(), "GET", CREDS, &[("X-aws-ec2-metadata-token", &t)]);
        assert_eq!(r.status, 200, "{}", r.text());
        let doc: Value = serde_json::from_str(&r.text()).expect("json");
        for key in ["AccessKeyId", "SecretAccessKey", "Token"] {
            secrets.push(doc[key].as_str().expect("secret").to_string());
        }
    }
    // Through boto3 too, and a refusal and a bad token for good measure.
    let out = common::run_python(
        "import boto3, json\n\
         c = boto3.Session().get_credentials().get_frozen_credentials()\n\
         print(json.dumps([c.access_key, c.secret_key, c.token]))",
        &[(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            &format!("http://{}/", d.addr()),
        )],
    );
    let from_boto: Vec<String> = serde_json::from_str(out.trim()).expect("json");
    secrets.extend(from_boto);
    let r = raw(
        scripted.addr(),
        "GET",
        "/latest/meta-data/iam/security-credentials/denied",
        &[],
    );
    assert!(r.text().contains("AccessDenied"), "{}", r.text());
    let t = token(scripted.addr());
    secrets.push(t.clone());
    let bad = format!("{}x", &t[..t.len() - 1]);
    assert_eq!(
        raw(
            scripted.addr(),
            "GET",
            "/latest/meta-data/",
            &[("X-aws-ec2-metadata-token", &bad)]
        )
        .status,
        401
    );

    d.terminate();
    scripted.terminate();
    let log = format!("{}\n{}", d.log_text(), scripted.log_text());
    assert!(
        log.contains("imdsd::access"),
        "the request log is there: {log}"
    );
    for secret in &secrets {
        assert!(secret.len() >= 16, "{secret}");
        assert!(
            !log.contains(secret.as_str()),
            "a secret or token is in the log"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_request_log_has_the_fields_operators_need() {
    let (d, _state) = {
        let state = tempfile::tempdir().expect("tempdir");
        let path = state.path().to_str().expect("utf8").to_string();
        (
            Process::spawn(
                &[
                    "--fake-credentials",
                    "--listen",
                    "127.0.0.1:0",
                    "--state-dir",
                    &path,
                    "app",
                ],
                &[],
            ),
            state,
        )
    };
    let r = raw(
        d.addr(),
        "GET",
        CREDS,
        &[("User-Agent", "aws-sdk-rust/1.0 probe")],
    );
    assert_eq!(r.status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        if let Some(l) = d
            .log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["target"] == "imdsd::access" && v["path"] == CREDS)
        {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "no access log line: {}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(line["method"], "GET");
    assert_eq!(line["caller"], "127.0.0.1");
    assert_eq!(line["status"], 200);
    assert_eq!(line["role"], "arn:aws:iam::123456789012:role/app");
    assert_eq!(line["agent"], "aws-sdk-rust/1.0 probe");
    assert!(line["micros"].as_u64().is_some(), "{line}");
}

/// The access lines of a process's log, parsed.
fn access_lines(d: &Process) -> Vec<Value> {
    d.log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "imdsd::access")
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_in_a_loop_gets_a_few_lines_a_second_and_a_count() {
    let spawn = |burst: &str| {
        let state = tempfile::tempdir().expect("tempdir");
        let path = state.path().to_str().expect("utf8").to_string();
        let args = [
            "--fake-credentials",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            &path,
            "--access-log-burst",
            burst,
            "app",
        ];
        (Process::spawn(&args, &[]), state)
    };
    const REQUESTS: u64 = 20;
    for (burst, limited) in [("3", true), ("0", false)] {
        let (d, _state) = spawn(burst);
        for _ in 0..REQUESTS {
            assert_eq!(raw(d.addr(), "GET", CREDS, &[]).status, 200);
        }
        // A different request is always written, with the count of what was left out before it.
        assert_eq!(
            raw(d.addr(), "GET", "/latest/meta-data/nothing", &[]).status,
            404
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        let lines = loop {
            let lines = access_lines(&d);
            if lines.iter().any(|l| l["status"] == 404) {
                break lines;
            }
            assert!(Instant::now() < deadline, "no 404 line: {}", d.log_text());
            std::thread::sleep(Duration::from_millis(50));
        };
        let written = lines.iter().filter(|l| l["path"] == CREDS).count() as u64;
        let last = lines.iter().find(|l| l["status"] == 404).expect("404 line");
        let suppressed = last["suppressed"].as_u64().unwrap_or(0);
        assert_eq!(written + suppressed, REQUESTS, "burst {burst}: {lines:?}");
        if limited {
            // Three a second; twenty requests on loopback take far less than a few seconds.
            assert!(
                written < REQUESTS && written % 3 == 0,
                "{written} lines: {lines:?}"
            );
            assert!(suppressed > 0);
            // Refused requests are kept down the same way: a stale token in a loop.
            let stale = "AQAE".repeat(14);
            for _ in 0..REQUESTS {
                let r = raw(
                    d.addr(),
                    "GET",
                    CREDS,
                    &[("X-aws-ec2-metadata-token", &stale)],
                );
                assert_eq!(r.status, 401);
            }
            assert_eq!(raw(d.addr(), "GET", "/latest/meta-data/", &[]).status, 200);
            let deadline = Instant::now() + Duration::from_secs(5);
            let lines = loop {
                let lines = access_lines(&d);
                if lines.iter().any(|l| l["path"] == "/latest/meta-data/") {
                    break lines;
                }
                assert!(
                    Instant::now() < deadline,
                    "no listing line: {}",
                    d.log_text()
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            let refused = lines.iter().filter(|l| l["status"] == 401).count() as u64;
            let after = lines
                .iter()
                .find(|l| l["path"] == "/latest/meta-data/")
                .expect("listing line");
            let left_out = after["suppressed"].as_u64().unwrap_or(0);
            assert_eq!(refused + left_out, REQUESTS, "{lines:?}");
            assert!(
                refused < REQUESTS && refused % 3 == 0,
                "{refused}: {lines:?}"
            );
        } else {
            assert_eq!(written, REQUESTS);
            assert!(last.get("suppressed").is_none(), "{last}");
        }
        // Every request is counted in the metrics all the same.
        let admin = d.admin_addr().expect("admin address");
        let (_, metrics) = get(admin, "/metrics");
        assert_eq!(
            sample(
                &metrics,
                r#"imdsd_requests_total{route="credentials",status="200"}"#
            ),
            REQUESTS as f64
        );
        d.terminate();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_a_slow_request_in_flight() {
    let sts = ScriptedSts::start().await;
    // A cold role behind a slow STS: the request is in flight for about two seconds.
    sts.set_delay(Duration::from_secs(2));
    let (mut d, _state) = sts_daemon(&sts.url, &["app"]);
    let addr = d.addr();
    let in_flight = std::thread::spawn(move || {
        let started = Instant::now();
        let r = raw(addr, "GET", CREDS, &[]);
        (r.status, r.text(), started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    d.terminate();
    let (status, body, took) = in_flight.join().expect("join");
    assert_eq!(status, 200, "answered in full, not cut off: {body}");
    assert!(body.contains("AccessKeyId"), "{body}");
    assert!(
        took >= Duration::from_millis(1500),
        "it really was in flight: {took:?}"
    );
    assert_eq!(d.wait(Duration::from_secs(15)), Some(0), "{}", d.log_text());
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "no longer accepting"
    );
    assert!(d.log_text().contains("SIGTERM"), "{}", d.log_text());
}

/// Each line of a process's JSON log, parsed.
fn log_lines(d: &Process) -> Vec<Value> {
    d.log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// Waits until the log has a line for which `found` holds, and returns every line.
fn wait_for_line(d: &Process, what: &str, found: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines = log_lines(d);
        if lines.iter().any(&found) {
            return lines;
        }
        assert!(Instant::now() < deadline, "no {what}: {}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A request refused for its Host is written with the reason and the value (short and escaped),
/// a flood of them is kept down like any other, and each is counted per listener.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_host_is_logged_with_its_reason_and_counted() {
    let state = tempfile::tempdir().expect("tempdir");
    let path = state.path().to_str().expect("utf8").to_string();
    let d = Process::spawn(
        &[
            "--fake-credentials",
            "--listen",
            "127.0.0.1:0",
            "--ecs-listen",
            "127.0.0.1:0",
            "--state-dir",
            &path,
            "--access-log-burst",
            "3",
            "app",
        ],
        &[],
    );
    let (imds, ecs) = (d.addr(), d.ecs_addr().expect("ecs address"));
    let admin = d.admin_addr().expect("admin address");

    let r = raw_with_hosts(imds, "GET", CREDS, &["attacker.example.com"], &[]);
    assert_eq!(r.status, 403);
    let long = "x".repeat(100);
    assert_eq!(
        raw_with_hosts(imds, "GET", CREDS, &[&long], &[]).status,
        403
    );
    let odd = common::raw_bytes(
        imds,
        &[
            format!("GET {CREDS} HTTP/1.1\r\nHost: evil").as_bytes(),
            b"\xff\"x\".example\r\n\r\n",
        ]
        .concat(),
    );
    assert_eq!(odd.status, 403);
    let r = raw_with_hosts(
        ecs,
        "GET",
        "/v2/credentials",
        &["attacker.example.com"],
        &[],
    );
    assert_eq!(r.status, 403);

    let lines = wait_for_line(&d, "access line of the refused ECS request", |l| {
        l["endpoint"] == "container-credentials" && l["refused"] == "host"
    });
    let access = |host: &str| {
        lines
            .iter()
            .find(|l| l["target"] == "imdsd::access" && l["host"] == host)
            .unwrap_or_else(|| panic!("no access line for Host {host:?}: {lines:?}"))
    };
    let line = access("attacker.example.com");
    assert_eq!(line["refused"], "host", "{line}");
    assert_eq!(line["status"], 403);
    assert_eq!(line["path"], CREDS);
    assert_eq!(line["caller"], "127.0.0.1");
    assert!(
        line.get("role").is_none(),
        "a refused request names no role: {line}"
    );
    let line = access(&format!("{}…", &long[..64]));
    assert_eq!(line["status"], 403);
    let line = access("evil\\xff\"x\".example");
    assert_eq!(line["refused"], "host");

    // A flood of one refused request: a few lines a second, the rest counted.
    const FLOOD: u64 = 40;
    for _ in 0..FLOOD {
        let r = raw_with_hosts(imds, "GET", "/latest/meta-data/", &["rebound.example"], &[]);
        assert_eq!(r.status, 403);
    }
    assert_eq!(
        raw(imds, "GET", "/latest/meta-data/instance-id", &[]).status,
        200
    );
    let lines = wait_for_line(&d, "the line after the flood", |l| {
        l["path"] == "/latest/meta-data/instance-id"
    });
    let written = lines
        .iter()
        .filter(|l| l["host"] == "rebound.example")
        .count() as u64;
    let after = lines
        .iter()
        .find(|l| l["path"] == "/latest/meta-data/instance-id")
        .expect("line after the flood");
    assert!(written < FLOOD, "{written} lines for {FLOOD} refusals");
    assert_eq!(written + after["suppressed"].as_u64().unwrap_or(0), FLOOD);

    // The admin API warns, at most a few lines a second whatever the requests look like.
    const ADMIN_FLOOD: u64 = 30;
    for i in 0..ADMIN_FLOOD {
        let r = raw_with_hosts(
            admin,
            "GET",
            &format!("/v1/workloads?n={i}"),
            &["rebound.example"],
            &[],
        );
        assert_eq!(r.status, 403);
    }
    std::thread::sleep(Duration::from_millis(1100));
    let r = raw_with_hosts(
        admin,
        "GET",
        "/v1/container-token?ip=127.0.0.1",
        &["last.example"],
        &[],
    );
    assert_eq!(r.status, 403);
    let lines = wait_for_line(&d, "the admin API's last warning", |l| {
        l["host"] == "last.example"
    });
    let warnings: Vec<&Value> = lines
        .iter()
        .filter(|l| l["target"] == "imdsd::admin" && l["level"] == "WARN")
        .collect();
    let suppressed: u64 = warnings
        .iter()
        .filter_map(|l| l["suppressed"].as_u64())
        .sum();
    assert!(
        (warnings.len() as u64) < ADMIN_FLOOD,
        "{} warnings: {warnings:?}",
        warnings.len()
    );
    assert_eq!(
        warnings.len() as u64 + suppressed,
        ADMIN_FLOOD + 1,
        "{warnings:?}"
    );
    let last = warnings.last().expect("a warning");
    assert_eq!(last["path"], "/v1/container-token");
    assert_eq!(last["caller"], "127.0.0.1");
    assert_eq!(last["status"], 403);

    let (status, metrics) = get(admin, "/metrics");
    assert_eq!(status, 200);
    let refused = |listener: &str| {
        sample(
            &metrics,
            &format!(r#"imdsd_requests_refused_total{{listener="{listener}",reason="host"}}"#),
        )
    };
    assert_eq!(refused("metadata"), 3.0 + FLOOD as f64, "{metrics}");
    assert_eq!(refused("container-credentials"), 1.0, "{metrics}");
    assert_eq!(refused("admin"), ADMIN_FLOOD as f64 + 1.0, "{metrics}");
    d.terminate();
}
