//! Real role credentials through STS (issue 3): the daemon as a real process, assuming roles with
//! the official Rust SDK against moto's STS server (the real wire protocol) and, for failures moto
//! cannot produce on demand, a scripted STS speaking the same XML. Clients are the AWS CLI, boto3 and
//! raw sockets.

mod common;
#[path = "support/sts.rs"]
mod sts_support;

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use common::{Process, raw, run_python};
use sts_support::{Behaviour, Moto, ScriptedSts, get_from};

/// Starts the daemon against `sts` with the operator's static keys.
fn daemon(sts: &str, args: &[&str]) -> (Process, tempfile::TempDir) {
    sts_support::sts_daemon(sts, args)
}

fn mapping_file(json: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("tempfile");
    std::io::Write::write_all(&mut f, json.as_bytes()).expect("write");
    f
}

fn credentials_path(role: &str) -> String {
    format!("/latest/meta-data/iam/security-credentials/{role}")
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn the_cli_sees_the_mapped_role_and_session_through_moto() {
    let moto = Moto::start();
    let mapping = mapping_file(
        r#"{"127.0.0.1": {"role": "arn:aws:iam::123456789012:role/web-app", "session_name": "web-session"}}"#,
    );
    let (d, _state) = daemon(
        &moto.url,
        &[
            "--role-mapping-file",
            mapping.path().to_str().expect("utf8"),
        ],
    );
    let addr = d.addr();

    // The unmodified AWS CLI: credentials from the daemon, identity from moto's STS.
    let output = common::aws_clean_command(&common::python().with_file_name("aws"))
        .args(["sts", "get-caller-identity", "--output", "json"])
        .env(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            format!("http://{addr}/"),
        )
        .env("AWS_ENDPOINT_URL_STS", &moto.url)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .output()
        .expect("run the AWS CLI");
    assert!(
        output.status.success(),
        "aws sts get-caller-identity failed: {}\ndaemon log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        d.log_text()
    );
    let identity = json(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(
        identity["Arn"],
        "arn:aws:sts::123456789012:assumed-role/web-app/web-session"
    );
    assert_eq!(identity["Account"], "123456789012");
}

#[test]
fn boto3_gets_the_default_role_by_name_through_moto() {
    let moto = Moto::start();
    // A bare name resolves in the account of the daemon's own identity (moto's 123456789012).
    let (d, _state) = daemon(&moto.url, &["reports", "--session-name", "box-{ip}"]);
    let addr = d.addr();
    let out = run_python(
        r#"
import boto3, json, os
s = boto3.Session()
c = s.get_credentials()
sts = s.client("sts", endpoint_url=os.environ["STS_URL"], region_name="us-east-1")
print(json.dumps({"method": c.method, "arn": sts.get_caller_identity()["Arn"]}))
"#,
        &[
            (
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                &format!("http://{addr}/"),
            ),
            ("STS_URL", &moto.url),
        ],
    );
    let v = json(&out);
    assert_eq!(v["method"], "iam-role");
    assert_eq!(
        v["arn"],
        "arn:aws:sts::123456789012:assumed-role/reports/box-127.0.0.1"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn served_credentials_carry_stss_own_expiration_and_every_assume_role_input() {
    let sts = ScriptedSts::start().await;
    sts.set_lifetime(Duration::from_secs(2 * 3600));
    let mapping = mapping_file(
        r#"{"127.0.0.1": {"role": "app@210987654321", "external_id": "ext-123", "session_name": "ci-job-42"}}"#,
    );
    let (d, _state) = daemon(
        &sts.url,
        &[
            "--role-mapping-file",
            mapping.path().to_str().expect("utf8"),
            "--role-duration",
            "7200",
        ],
    );
    let addr = d.addr();
    let r = tokio::task::spawn_blocking(move || raw(addr, "GET", &credentials_path("app"), &[]))
        .await
        .expect("join");
    assert_eq!(r.status, 200, "{}", d.log_text());
    let doc = json(&r.text());
    assert_eq!(doc["Code"], "Success");
    assert!(
        doc["AccessKeyId"]
            .as_str()
            .expect("key")
            .starts_with("ASIASCRIPTED")
    );

    let expiration =
        humantime::parse_rfc3339(doc["Expiration"].as_str().expect("exp")).expect("time");
    let left = expiration
        .duration_since(SystemTime::now())
        .expect("future");
    assert!(
        left > Duration::from_secs(7100) && left <= Duration::from_secs(7200),
        "{left:?}"
    );

    let calls = sts.assume_requests();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call["RoleArn"], "arn:aws:iam::210987654321:role/app");
    assert_eq!(call["RoleSessionName"], "ci-job-42");
    assert_eq!(call["ExternalId"], "ext-123");
    assert_eq!(call["DurationSeconds"], "7200");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_chained_source_asks_for_at_most_one_hour() {
    let sts = ScriptedSts::start().await;
    sts.set_caller_arn("arn:aws:sts::123456789012:assumed-role/admin/operator-session");
    let (d, _state) = daemon(&sts.url, &["--role-duration", "7200", "app"]);
    let addr = d.addr();
    let r = tokio::task::spawn_blocking(move || raw(addr, "GET", &credentials_path("app"), &[]))
        .await
        .expect("join");
    assert_eq!(r.status, 200, "{}", d.log_text());
    assert_eq!(sts.assume_requests()[0]["DurationSeconds"], "3600");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_callers_with_one_role_but_different_external_ids_get_different_sessions() {
    let sts = ScriptedSts::start().await;
    let mapping = mapping_file(
        r#"{
            "127.0.0.2": {"role": "shared", "external_id": "tenant-a", "session_name": "same"},
            "127.0.0.3": {"role": "shared", "external_id": "tenant-b", "session_name": "same"}
        }"#,
    );
    let (d, _state) = daemon(
        &sts.url,
        &[
            "--role-mapping-file",
            mapping.path().to_str().expect("utf8"),
        ],
    );
    let addr = d.addr();
    let a = get_from(
        "127.0.0.2".parse().expect("ip"),
        addr,
        &credentials_path("shared"),
    )
    .await;
    let b = get_from(
        "127.0.0.3".parse().expect("ip"),
        addr,
        &credentials_path("shared"),
    )
    .await;
    assert_eq!((a.0, b.0), (200, 200), "{}", d.log_text());
    assert_ne!(json(&a.1)["AccessKeyId"], json(&b.1)["AccessKeyId"]);
    let mut ids: Vec<String> = sts
        .assume_requests()
        .iter()
        .map(|r| r.get("ExternalId").cloned().unwrap_or_default())
        .collect();
    ids.sort();
    assert_eq!(ids, ["tenant-a", "tenant-b"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_cold_requests_make_exactly_one_assume_role_call() {
    let sts = ScriptedSts::start().await;
    // A slow STS widens the window in which requests pile up behind the first.
    sts.set_delay(Duration::from_millis(300));
    let (d, _state) = daemon(&sts.url, &["app"]);
    let addr = d.addr();
    let started = Instant::now();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            tokio::spawn(get_from(
                "127.0.0.1".parse().expect("ip"),
                addr,
                "/latest/meta-data/iam/security-credentials/app",
            ))
        })
        .collect();
    let mut keys = std::collections::HashSet::new();
    for t in tasks {
        let (status, body) = t.await.expect("join");
        assert_eq!(status, 200, "{body}");
        keys.insert(
            json(&body)["AccessKeyId"]
                .as_str()
                .expect("key")
                .to_string(),
        );
    }
    assert_eq!(keys.len(), 1, "every caller got the same session");
    assert_eq!(sts.assume_calls(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn access_denied_is_ec2s_200_with_a_code_and_boto3_reports_no_credentials() {
    let sts = ScriptedSts::start().await;
    sts.set(Some("role/forbidden"), Behaviour::Deny);
    let (d, _state) = daemon(&sts.url, &["forbidden"]);
    let addr = d.addr();
    let r =
        tokio::task::spawn_blocking(move || raw(addr, "GET", &credentials_path("forbidden"), &[]))
            .await
            .expect("join");
    assert_eq!(r.status, 200);
    let body = r.text();
    assert!(
        body.starts_with("{\n  \"Code\" : \"AssumeRoleUnauthorizedAccess\",\n"),
        "{body}"
    );
    let doc = json(&body);
    let message = doc["Message"].as_str().expect("message");
    assert!(
        message.contains("arn:aws:iam::123456789012:role/forbidden"),
        "{message}"
    );
    assert!(message.contains("AccessDenied"), "{message}");
    assert!(doc.get("AccessKeyId").is_none());
    assert!(doc["LastUpdated"].as_str().expect("time").ends_with('Z'));

    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        run_python(
            "import boto3; print(boto3.Session().get_credentials() is None)",
            &[(
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                &format!("http://{addr}/"),
            )],
        )
    })
    .await
    .expect("join");
    assert_eq!(out.trim(), "True");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "boto3 took {:?}",
        started.elapsed()
    );
    // The refusal is remembered, so boto3's attempts did not each call STS.
    assert!(sts.assume_calls() <= 2, "{} calls", sts.assume_calls());
    assert!(d.log_text().contains("could not obtain role credentials"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_sts_outage_keeps_serving_last_good_credentials_and_recovers() {
    let sts = ScriptedSts::start().await;
    // A CIDR entry: unlike exact addresses, it cannot be prefetched at startup.
    let mapping = mapping_file(r#"{"127.0.0.4/30": "cold"}"#);
    let (d, _state) = daemon(
        &sts.url,
        &[
            "--role-mapping-file",
            mapping.path().to_str().expect("utf8"),
            "warm",
        ],
    );
    let addr = d.addr();
    let local: IpAddr = "127.0.0.1".parse().expect("ip");
    let (status, before) = get_from(local, addr, &credentials_path("warm")).await;
    assert_eq!(status, 200);

    sts.set(None, Behaviour::Fail);
    let (status, during) = get_from(local, addr, &credentials_path("warm")).await;
    assert_eq!(status, 200, "last good credentials are served");
    assert_eq!(json(&during)["AccessKeyId"], json(&before)["AccessKeyId"]);

    // A role with nothing cached gets a retryable 5xx, not a hang and not a 200 error document.
    let cold: IpAddr = "127.0.0.5".parse().expect("ip");
    let started = Instant::now();
    let (status, _) = get_from(cold, addr, &credentials_path("cold")).await;
    assert_eq!(status, 503);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    // Said in the log, counted, and shown in /readyz.
    let line = d
        .wait_for_log(
            &[
                "could not obtain role credentials",
                "role/cold",
                "InternalFailure",
            ],
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("no log line for the failure:\n{}", d.log_text()));
    assert!(line.contains("\"level\":\"WARN\""), "{line}");
    let admin = d.admin_addr().expect("admin API");
    assert!(common::metric(admin, "imdsd_sts_errors_total").expect("metric") >= 1.0);
    let ready = raw(admin, "GET", "/readyz", &[]);
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(ready.text().contains("STS is unavailable"), "{ready:?}");

    sts.set(None, Behaviour::Grant);
    // Transient errors are remembered for a few seconds so that clients cannot hammer STS.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (status, body) = get_from(cold, addr, &credentials_path("cold")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["Code"], "Success");
    assert_eq!(raw(admin, "GET", "/readyz", &[]).status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_is_retried_not_reported_as_a_refusal() {
    let sts = ScriptedSts::start().await;
    sts.set(None, Behaviour::Throttle);
    let (d, _state) = daemon(&sts.url, &["busy"]);
    let addr = d.addr();
    let (status, _) = get_from(
        "127.0.0.1".parse().expect("ip"),
        addr,
        &credentials_path("busy"),
    )
    .await;
    assert_eq!(status, 503);
    // The SDK itself retried the throttled call before giving up.
    assert!(sts.assume_calls() >= 2, "{} calls", sts.assume_calls());
}

#[test]
fn without_an_identity_startup_fails_naming_what_was_tried() {
    let home = tempfile::tempdir().expect("tempdir");
    let (code, stderr) = common::run_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            home.path().to_str().expect("utf8"),
            "app",
        ],
        &[("HOME", home.path().to_str().expect("utf8"))],
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("Tried:"), "{stderr}");
    assert!(stderr.contains("AWS_ACCESS_KEY_ID"), "{stderr}");
    assert!(stderr.contains("--profile"), "{stderr}");
    assert!(stderr.contains("--fake-credentials"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_profile_with_static_keys_is_a_usable_identity() {
    let sts = ScriptedSts::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let credentials = dir.path().join("credentials");
    std::fs::write(
        &credentials,
        "[dev]\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n",
    )
    .expect("write");
    let state = dir.path().join("state");
    let p = Process::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state.to_str().expect("utf8"),
            "--sts-endpoint",
            &sts.url,
            "--profile",
            "dev",
            "--region",
            "eu-west-1",
            "arn:aws:iam::123456789012:role/x",
        ],
        &[(
            "AWS_SHARED_CREDENTIALS_FILE",
            credentials.to_str().expect("utf8"),
        )],
    );
    let addr = p.addr();
    let (status, body) = get_from(
        "127.0.0.1".parse().expect("ip"),
        addr,
        &credentials_path("x"),
    )
    .await;
    assert_eq!(status, 200, "{body}\n{}", p.log_text());
    assert!(
        p.log_text()
            .contains("arn:aws:iam::123456789012:user/operator")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exact_address_mappings_are_fetched_before_the_first_request() {
    let sts = ScriptedSts::start().await;
    let mapping = mapping_file(r#"{"127.0.0.6": "early"}"#);
    let (d, _state) = daemon(
        &sts.url,
        &[
            "--role-mapping-file",
            mapping.path().to_str().expect("utf8"),
        ],
    );
    let addr = d.addr();
    let deadline = Instant::now() + Duration::from_secs(5);
    while sts.assume_calls() == 0 {
        assert!(Instant::now() < deadline, "nothing was prefetched");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = get_from(
        "127.0.0.6".parse().expect("ip"),
        addr,
        &credentials_path("early"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(sts.assume_calls(), 1, "the first request was a cache hit");
}

/// The address of the `i`th of many mapped callers: 127.0.10.1, 127.0.10.2, …
fn many_callers(i: usize) -> IpAddr {
    let (hi, lo) = (10 + i / 200, 1 + i % 200);
    format!("127.0.{hi}.{lo}").parse().expect("ip")
}

/// Polls `series` on the admin API until `done(value)`, for up to 20 s.
async fn await_metric(admin: std::net::SocketAddr, series: &'static str, done: fn(f64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let value = tokio::task::spawn_blocking(move || common::metric(admin, series))
            .await
            .expect("join");
        if value.is_some_and(done) {
            return;
        }
        if Instant::now() >= deadline {
            let all =
                tokio::task::spawn_blocking(move || raw(admin, "GET", "/metrics", &[]).text())
                    .await
                    .expect("join");
            panic!("{series} stayed at {value:?}:\n{all}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A start with 240 roles known in advance (exact addresses in the mapping file, all prefetched
/// at once) and low limits: STS sees at most `--sts-max-concurrency` calls at once and no more
/// than the burst plus the rate allow in any two seconds; every role is assumed exactly once.
/// Midway, with STS holding the calls in flight so that the queue stands still, two callers ask:
/// one for a role nobody prefetches, one for a role whose prefetch is still queued (its fetch is
/// promoted to the callers' queue). When STS lets go, the next two calls are theirs, ahead of
/// the 200-odd background calls queued before them. The metrics show the queue throughout.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_with_hundreds_of_roles_stays_under_the_sts_limits_and_callers_go_first() {
    const ROLES: usize = 240;
    const RATE: usize = 40;
    const BURST: usize = 8;
    const CONCURRENCY: usize = 4;
    let sts = ScriptedSts::start().await;
    // Without the limiter four calls at a time of 30 ms each would be 130 a second.
    sts.set_delay(Duration::from_millis(30));
    let mut entries: Vec<String> = (0..ROLES)
        .map(|i| format!("\"{}\": \"prefetched-{i}\"", many_callers(i)))
        .collect();
    // A network entry: nothing to prefetch, so its first request needs a call of its own.
    entries.push("\"127.0.50.0/24\": \"on-demand\"".into());
    let mapping = mapping_file(&format!("{{{}}}", entries.join(",\n")));
    let (d, _state) = daemon(
        &sts.url,
        &[
            "--role-mapping-file",
            mapping.path().to_str().expect("utf8"),
            "--sts-max-rate",
            &RATE.to_string(),
            "--sts-burst",
            &BURST.to_string(),
            "--sts-max-concurrency",
            &CONCURRENCY.to_string(),
        ],
    );
    let addr = d.addr();
    let admin = d.admin_addr().expect("admin API");
    let role_arn = |name: &str| format!("arn:aws:iam::123456789012:role/{name}");

    // The burst is spent and the rest of the prefetch queues.
    let deadline = Instant::now() + Duration::from_secs(20);
    while sts.assume_calls() < 2 * BURST {
        assert!(Instant::now() < deadline, "the prefetch did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    await_metric(
        admin,
        "imdsd_sts_limiter_waiting{priority=\"background\"}",
        |n| n > 100.0,
    )
    .await;

    // STS holds what it gets: the calls in flight fill the cap, and the queue stands still.
    sts.hold();
    let deadline = Instant::now() + Duration::from_secs(10);
    while sts.held() < CONCURRENCY {
        assert!(Instant::now() < deadline, "the cap never filled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A caller with nothing prefetched.
    let on_demand = tokio::spawn(async move {
        get_from(
            "127.0.50.7".parse().expect("ip"),
            addr,
            &credentials_path("on-demand"),
        )
        .await
    });
    await_metric(
        admin,
        "imdsd_sts_limiter_waiting{priority=\"caller\"}",
        |n| n == 1.0,
    )
    .await;
    // A caller whose prefetch is still queued: its fetch moves to the callers' queue.
    let seen: std::collections::HashSet<String> = sts
        .assume_requests()
        .into_iter()
        .filter_map(|r| r.get("RoleArn").cloned())
        .collect();
    let waiting = (0..ROLES)
        .find(|i| !seen.contains(&role_arn(&format!("prefetched-{i}"))))
        .expect("a role still queued");
    let joined = tokio::spawn(async move {
        get_from(
            many_callers(waiting),
            addr,
            &credentials_path(&format!("prefetched-{waiting}")),
        )
        .await
    });
    await_metric(
        admin,
        "imdsd_sts_limiter_waiting{priority=\"caller\"}",
        |n| n == 2.0,
    )
    .await;
    // Every place was taken by a held call all along, so nothing could go meanwhile.
    assert_eq!(sts.held(), CONCURRENCY);
    let arrived_before = sts.assume_calls();
    sts.release();
    let (status, body) = on_demand.await.expect("join");
    assert_eq!(status, 200, "{body}");
    let on_demand = json(&body);
    let (status, body) = joined.await.expect("join");
    assert_eq!(status, 200, "{body}");
    let joined = json(&body);

    let deadline = Instant::now() + Duration::from_secs(60);
    while sts.assume_calls() < ROLES + 1 || sts.in_flight() > 0 {
        assert!(
            Instant::now() < deadline,
            "only {} calls made:\n{}",
            sts.assume_calls(),
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = sts.assume_log();
    assert_eq!(log.len(), ROLES + 1, "each role assumed exactly once");
    let distinct: std::collections::HashSet<&str> =
        log.iter().map(|c| c.role_arn.as_str()).collect();
    assert_eq!(distinct.len(), ROLES + 1);

    // When STS let go, the four places freed went to the two callers first (and then to the
    // next two background calls): their calls are among the first four to reach STS (let
    // through together, those reach it in any order), ahead of the 200-odd queued before them.
    let next: Vec<&str> = log[arrived_before..arrived_before + CONCURRENCY]
        .iter()
        .map(|c| c.role_arn.as_str())
        .collect();
    let promoted = role_arn(&format!("prefetched-{waiting}"));
    assert!(
        next.contains(&role_arn("on-demand").as_str()) && next.contains(&promoted.as_str()),
        "{next:?}"
    );
    // Each caller got its own role's credentials, from its call.
    for (doc, role) in [
        (&on_demand, role_arn("on-demand")),
        (&joined, promoted.clone()),
    ] {
        let call = log.iter().find(|c| c.role_arn == role).expect("its call");
        assert_eq!(doc["AccessKeyId"], call.access_key_id.as_str(), "{role}");
    }
    assert!(
        log.len() - arrived_before > 150,
        "the queue behind them was long"
    );

    // Never more in flight than allowed. Never more than the bucket allows (burst, then the rate)
    // in any two seconds, with half a second's worth of slack for calls that reach STS later
    // than they were let through on a busy machine; and the whole start took as long as the
    // rate says it must.
    let most = log.iter().map(|c| c.in_flight).max().unwrap_or(0);
    assert!(most <= CONCURRENCY, "{most} calls at once");
    for (i, c) in log.iter().enumerate() {
        let within = log[i..]
            .iter()
            .take_while(|o| o.started < c.started + Duration::from_secs(2))
            .count();
        assert!(
            within <= BURST + 2 * RATE + RATE / 2,
            "{within} calls in the two seconds after call {i}"
        );
    }
    let took = log[log.len() - 1].started - log[0].started;
    let least = Duration::from_secs_f64((ROLES + 1 - BURST) as f64 / RATE as f64);
    assert!(
        took >= least.mul_f64(0.9),
        "{took:?} for {} calls",
        log.len()
    );
    let metrics = tokio::task::spawn_blocking(move || {
        (
            common::metric(
                admin,
                "imdsd_sts_limiter_admitted_total{priority=\"caller\"}",
            ),
            common::metric(
                admin,
                "imdsd_sts_limiter_admitted_total{priority=\"background\"}",
            ),
            common::metric(
                admin,
                "imdsd_sts_limiter_wait_seconds_total{priority=\"background\"}",
            ),
            common::metric(admin, "imdsd_sts_limiter_waiting{priority=\"background\"}"),
            common::metric(admin, "imdsd_sts_limiter_in_flight"),
        )
    })
    .await
    .expect("join");
    let (Some(caller), Some(background), Some(waited), Some(waiting_now), Some(in_flight)) =
        metrics
    else {
        panic!("limiter metrics missing: {metrics:?}");
    };
    assert_eq!(caller, 2.0, "the on-demand call and the promoted one");
    assert_eq!(caller + background, (ROLES + 1) as f64);
    assert!(waited > 1.0, "{waited} s waited in the background");
    assert_eq!((waiting_now, in_flight), (0.0, 0.0));
}

/// How the scripted STS fails, for [`an_sts_fault_is_survived`].
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Nothing listens: connections are refused.
    Refuse,
    /// Calls are accepted and never answered within the SDK's timeouts.
    Hang,
    /// Calls get this answer.
    Answer(Behaviour),
}

/// What a role with nothing cached gets while STS fails.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cold {
    /// A retryable 503 (and no document at all).
    Unavailable,
    /// EC2's error document: 200 with this `Code`, no credentials.
    Refused(&'static str),
}

impl Fault {
    async fn start(self, sts: &ScriptedSts) {
        match self {
            Fault::Refuse => sts.refuse_connections(),
            Fault::Hang => sts.set_delay(Duration::from_secs(120)),
            Fault::Answer(b) => sts.set(None, b),
        }
    }

    async fn end(self, sts: &ScriptedSts) {
        match self {
            Fault::Refuse => sts.resume().await,
            Fault::Hang => sts.set_delay(Duration::ZERO),
            Fault::Answer(_) => sts.set(None, Behaviour::Grant),
        }
    }
}

/// Checks one answer for the cold role while STS fails: the fault's answer, and never
/// credentials of any kind.
fn assert_fault_answer(expected: Cold, status: u16, body: &str) {
    assert!(
        !body.contains("AccessKeyId") && !body.contains("Success"),
        "credentials during the fault: {status} {body}"
    );
    match expected {
        Cold::Unavailable => assert_eq!(status, 503, "{body}"),
        Cold::Refused(code) => {
            assert_eq!(status, 200, "{body}");
            let doc = json(body);
            assert_eq!(doc["Code"], code, "{body}");
            assert!(
                doc["Message"]
                    .as_str()
                    .is_some_and(|m| m.contains("role/cold")),
                "{body}"
            );
        }
    }
}

/// One STS fault end to end, against the daemon as a process: a role cached before the fault
/// keeps being served (the same credentials); a role with nothing cached gets `cold`'s answer and
/// never credentials; the daemon logs the failure with `logged` in the line, counts it in
/// `imdsd_sts_errors_total`, and (for transient faults) says in `/readyz` that STS is unavailable;
/// once the fault ends the cold role gets credentials of its own from STS, and nothing panicked.
async fn an_sts_fault_is_survived(fault: Fault, cold: Cold, logged: &[&str]) {
    let sts = ScriptedSts::start().await;
    // A network entry: not prefetched, so "cold" has nothing cached when the fault starts.
    let mapping = mapping_file(r#"{"127.0.0.4/30": "cold"}"#);
    let (d, _state) = daemon(
        &sts.url,
        &[
            "--role-mapping-file",
            mapping.path().to_str().expect("utf8"),
            "warm",
        ],
    );
    let addr = d.addr();
    let admin = d.admin_addr().expect("admin API");
    let local: IpAddr = "127.0.0.1".parse().expect("ip");
    let cold_caller: IpAddr = "127.0.0.5".parse().expect("ip");
    let (status, before) = get_from(local, addr, &credentials_path("warm")).await;
    assert_eq!(status, 200, "{before}");
    let warm_key = json(&before)["AccessKeyId"].clone();
    let errors_before = common::metric(admin, "imdsd_sts_errors_total").expect("metric");

    fault.start(&sts).await;
    let (status, during) = get_from(local, addr, &credentials_path("warm")).await;
    assert_eq!(status, 200, "last good credentials: {during}");
    assert_eq!(json(&during)["AccessKeyId"], warm_key);
    let (status, body) = get_from(cold_caller, addr, &credentials_path("cold")).await;
    assert_fault_answer(cold, status, &body);

    let mut needles = vec!["could not obtain role credentials", "role/cold"];
    needles.extend_from_slice(logged);
    let line = tokio::task::block_in_place(|| d.wait_for_log(&needles, Duration::from_secs(40)))
        .unwrap_or_else(|| panic!("no log line with {needles:?}:\n{}", d.log_text()));
    eprintln!("{fault:?}: {line}");
    assert!(line.contains("\"level\":\"WARN\""), "{line}");
    let errors = common::metric(admin, "imdsd_sts_errors_total").expect("metric");
    assert!(errors > errors_before, "{errors} STS errors counted");
    let ready = raw(admin, "GET", "/readyz", &[]);
    if cold == Cold::Unavailable {
        assert_eq!(ready.status, 503, "{ready:?}");
        assert!(ready.text().contains("STS"), "{ready:?}");
    } else {
        // A refusal for one role says nothing about STS.
        assert_eq!(ready.status, 200, "{ready:?}");
    }
    // Still the last good credentials, still the fault's answer for the cold role.
    let (status, during) = get_from(local, addr, &credentials_path("warm")).await;
    assert_eq!((status, &json(&during)["AccessKeyId"]), (200, &warm_key));
    let (status, body) = get_from(cold_caller, addr, &credentials_path("cold")).await;
    assert_fault_answer(cold, status, &body);

    fault.end(&sts).await;
    // Errors are remembered for a while (5 s, a refusal 30 s) so that callers cannot hammer STS;
    // until then the cold role keeps getting the fault's answer, never anything else.
    let deadline = Instant::now() + Duration::from_secs(90);
    let recovered = loop {
        let (status, body) = get_from(cold_caller, addr, &credentials_path("cold")).await;
        if status == 200 && body.contains("\"Success\"") {
            break json(&body);
        }
        assert_fault_answer(cold, status, &body);
        assert!(
            Instant::now() < deadline,
            "no recovery after the fault ended:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Its own role's credentials, as STS granted them.
    let key = recovered["AccessKeyId"].as_str().expect("key");
    assert!(
        sts.assume_log()
            .iter()
            .any(|c| c.role_arn.ends_with(":role/cold") && c.access_key_id == key),
        "{recovered}"
    );
    assert_ne!(recovered["AccessKeyId"], warm_key);
    assert!(
        !recovered["SecretAccessKey"]
            .as_str()
            .expect("secret")
            .is_empty()
    );
    let expiration =
        humantime::parse_rfc3339(recovered["Expiration"].as_str().expect("exp")).expect("time");
    assert!(expiration > SystemTime::now() + Duration::from_secs(50 * 60));
    assert_eq!(raw(admin, "GET", "/readyz", &[]).status, 200);
    let (status, after) = get_from(local, addr, &credentials_path("warm")).await;
    assert_eq!((status, &json(&after)["AccessKeyId"]), (200, &warm_key));

    let mut d = d;
    assert_eq!(d.child.try_wait().expect("wait"), None, "the daemon exited");
    assert!(!d.log_text().contains("panicked"), "{}", d.log_text());
}

#[tokio::test(flavor = "multi_thread")]
async fn sts_refusing_connections_serves_last_good_and_recovers() {
    an_sts_fault_is_survived(Fault::Refuse, Cold::Unavailable, &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sts_hanging_past_its_timeout_serves_last_good_and_recovers() {
    an_sts_fault_is_survived(Fault::Hang, Cold::Unavailable, &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sts_throttling_serves_last_good_and_recovers() {
    an_sts_fault_is_survived(
        Fault::Answer(Behaviour::Throttle),
        Cold::Unavailable,
        &["Throttling"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_html_502_from_a_proxy_before_sts_is_transient_and_recovers() {
    an_sts_fault_is_survived(
        Fault::Answer(Behaviour::BadGateway),
        Cold::Unavailable,
        &["HTTP 502"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_from_sts_is_never_served_and_recovers() {
    an_sts_fault_is_survived(
        Fault::Answer(Behaviour::Garbage),
        Cold::Unavailable,
        &["HTTP 200", "not an AssumeRole response"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_sts_answer_is_never_served_and_recovers() {
    an_sts_fault_is_survived(Fault::Answer(Behaviour::Truncated), Cold::Unavailable, &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_sts_answer_with_empty_credentials_is_never_served_as_success() {
    an_sts_fault_is_survived(
        Fault::Answer(Behaviour::EmptyCredentials),
        Cold::Unavailable,
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn access_denied_keeps_last_good_refuses_the_cold_role_as_ec2_does_and_recovers() {
    an_sts_fault_is_survived(
        Fault::Answer(Behaviour::Deny),
        Cold::Refused("AssumeRoleUnauthorizedAccess"),
        &["AccessDenied"],
    )
    .await;
}
