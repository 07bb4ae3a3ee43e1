//! Real, unmodified clients against a running daemon: the Rust SDK's IMDS providers (aws-config)
//! and boto3 get fake role credentials and the region in both `--http-tokens` modes, and get none
//! when no role is configured; the daemon as a real process honours an IMDSv2 token across a
//! restart and exits 64 with a useful message on configuration errors.
//!
//! Not covered here: byte-level protocol rules (tests/protocol.rs) and STS (tests/sts.rs).

mod common;

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, SystemTime};

use aws_config::imds;
use aws_config::imds::credentials::ImdsCredentialsProvider;
use aws_config::imds::region::ImdsRegionProvider;
use aws_credential_types::provider::ProvideCredentials as _;
use aws_credential_types::provider::error::CredentialsError;
use common::{Daemon, Process, raw, run_python, run_to_exit, token};

const ROLE: &str = "test-role";
/// The daemon's default fake-credential lifetime is 6 h.
const MIN_LEFT: Duration = Duration::from_secs(5 * 3600);
const MAX_LEFT: Duration = Duration::from_secs(6 * 3600 + 5);

fn imds_client(addr: SocketAddr) -> imds::Client {
    imds::Client::builder()
        .endpoint(format!("http://{addr}"))
        .expect("valid IMDS endpoint")
        .build()
}

/// The Rust SDK's own IMDS credentials and region providers, exactly as the default chain builds
/// them, pointed at the daemon.
async fn rust_sdk_gets_credentials_and_region(mode: &str) {
    let daemon = Daemon::start(&["--fake-credentials", "--http-tokens", mode, ROLE]).await;
    let client = imds_client(daemon.addr);

    let credentials = ImdsCredentialsProvider::builder()
        .imds_client(client.clone())
        .build()
        .provide_credentials()
        .await
        .unwrap_or_else(|e| panic!("the Rust SDK got no credentials ({mode}): {e:?}"));
    assert!(
        credentials.access_key_id().starts_with("ASIA"),
        "{}",
        credentials.access_key_id()
    );
    assert_eq!(credentials.secret_access_key().len(), 40);
    assert!(
        credentials.session_token().is_some_and(|t| !t.is_empty()),
        "no session token"
    );
    let expiry = credentials.expiry().expect("IMDS credentials expire");
    let left = expiry
        .duration_since(SystemTime::now())
        .expect("expiry in the future");
    assert!(
        (MIN_LEFT..=MAX_LEFT).contains(&left),
        "credentials expire in {left:?}, expected 5 to 6 hours"
    );

    let region = ImdsRegionProvider::builder()
        .imds_client(client.clone())
        .build()
        .region()
        .await
        .expect("the Rust SDK read the region");
    assert_eq!(region.as_ref(), "us-east-1");

    // The client caches its token; a later read on the same client reuses it.
    let instance_id = client
        .get("/latest/meta-data/instance-id")
        .await
        .expect("instance-id");
    assert!(instance_id.as_ref().starts_with("i-"), "{instance_id:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rust_sdk_gets_credentials_and_region_when_tokens_are_optional() {
    rust_sdk_gets_credentials_and_region("optional").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rust_sdk_gets_credentials_and_region_when_tokens_are_required() {
    rust_sdk_gets_credentials_and_region("required").await;
}

/// Asks boto3 for credentials and botocore for the IMDS region; prints one JSON object.
const BOTO3_SCRIPT: &str = r#"
import datetime, json
import boto3, botocore.utils

s = boto3.Session()
c = s.get_credentials()
out = {"region": botocore.utils.IMDSRegionProvider(s._session).provide(), "credentials": None}
if c is not None:
    f = c.get_frozen_credentials()
    expiry = getattr(c, "_expiry_time", None)
    out["credentials"] = {
        "method": c.method,
        "access_key": f.access_key,
        "secret_len": len(f.secret_key),
        "has_token": bool(f.token),
        "seconds_left": None if expiry is None
            else (expiry - datetime.datetime.now(datetime.timezone.utc)).total_seconds(),
    }
print(json.dumps(out))
"#;

/// Runs [`BOTO3_SCRIPT`] against the daemon with only the endpoint (and `extra`) set.
async fn boto3(addr: SocketAddr, extra: &[(&'static str, &'static str)]) -> serde_json::Value {
    let endpoint = format!("http://{addr}/");
    let extra = extra.to_vec();
    let stdout = tokio::task::spawn_blocking(move || {
        let mut env = vec![("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint.as_str())];
        env.extend(extra);
        run_python(BOTO3_SCRIPT, &env)
    })
    .await
    .expect("python task");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

async fn boto3_gets_credentials_and_region(mode: &str, extra: &[(&'static str, &'static str)]) {
    let daemon = Daemon::start(&["--fake-credentials", "--http-tokens", mode, ROLE]).await;
    let out = boto3(daemon.addr, extra).await;
    let c = &out["credentials"];
    assert_eq!(c["method"], "iam-role", "boto3 ({mode}): {out}");
    assert!(
        c["access_key"]
            .as_str()
            .is_some_and(|k| k.starts_with("ASIA")),
        "{out}"
    );
    assert_eq!(c["secret_len"], 40, "{out}");
    assert_eq!(c["has_token"], true, "{out}");
    let left = c["seconds_left"]
        .as_f64()
        .expect("botocore parsed Expiration");
    assert!(
        (MIN_LEFT.as_secs_f64()..=MAX_LEFT.as_secs_f64()).contains(&left),
        "boto3 sees the credentials expire in {left} s: {out}"
    );
    assert_eq!(out["region"], "us-east-1", "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn boto3_gets_role_credentials_and_region_when_tokens_are_optional() {
    boto3_gets_credentials_and_region("optional", &[]).await;
}

/// T56: boto3 forbidden to fall back to IMDSv1 still succeeds against `required`.
#[tokio::test(flavor = "multi_thread")]
async fn boto3_with_v1_disabled_gets_role_credentials_and_region_when_tokens_are_required() {
    boto3_gets_credentials_and_region("required", &[("AWS_EC2_METADATA_V1_DISABLED", "true")])
        .await;
}

/// The negative control: the same clients and assertions' inputs, but the daemon has no role, so
/// the tests above could fail.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_role_neither_sdk_gets_credentials() {
    let daemon = Daemon::start(&["--fake-credentials"]).await;

    let out = boto3(daemon.addr, &[]).await;
    assert!(
        out["credentials"].is_null(),
        "boto3 got credentials from a daemon without a role: {out}"
    );

    let result = ImdsCredentialsProvider::builder()
        .imds_client(imds_client(daemon.addr))
        .build()
        .provide_credentials()
        .await;
    match result {
        // "No role" must let a credential chain go on to its next provider.
        Err(CredentialsError::CredentialsNotLoaded(_)) => {}
        other => panic!("the Rust SDK should report no credentials loaded, got {other:?}"),
    }
}

fn free_loopback_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// T23 at the process level: the token key lives in the state directory, so a client holding a
/// token (the Rust SDK caches one for up to 6 h) keeps working after the daemon restarts.
#[test]
fn a_token_issued_before_a_restart_is_honoured_after_it() {
    let state = tempfile::tempdir().expect("tempdir");
    let state_path = state.path().to_str().expect("utf8").to_string();
    let listen = format!("127.0.0.1:{}", free_loopback_port());
    let args = [
        "--fake-credentials",
        "--listen",
        &listen,
        "--state-dir",
        &state_path,
        ROLE,
    ];

    let mut first = Process::spawn(&args, &[]);
    let addr = first.addr();
    let tok = token(addr, 21600);
    let before = raw(
        addr,
        "GET",
        "/latest/meta-data/instance-id",
        &[("X-aws-ec2-metadata-token", &tok)],
    );
    assert_eq!(before.status, 200, "{before:?}");
    first.terminate();
    assert_eq!(
        first.wait(Duration::from_secs(15)),
        Some(0),
        "SIGTERM should stop imdsd cleanly; log:\n{}",
        first.log_text()
    );

    let second = Process::spawn(&args, &[]);
    assert_eq!(second.addr(), addr);
    let after = raw(
        addr,
        "GET",
        "/latest/meta-data/instance-id",
        &[("X-aws-ec2-metadata-token", &tok)],
    );
    assert_eq!(
        after.status,
        200,
        "old token rejected after restart: {after:?}\nlog:\n{}",
        second.log_text()
    );
    assert_eq!(after.body, before.body);
}

#[test]
fn a_listen_address_not_on_this_host_exits_64_and_says_how_to_add_it() {
    // A state directory of its own, so the test never writes to /var/lib/imdsd.
    let state = tempfile::tempdir().expect("tempdir");
    let state_path = state.path().to_str().expect("utf8");
    let (code, stderr) = run_to_exit(
        &[
            "--fake-credentials",
            "--listen",
            "198.51.100.254:80",
            "--state-dir",
            state_path,
        ],
        &[],
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("ip addr add 198.51.100.254/32"), "{stderr}");
}

#[test]
fn a_bad_flag_and_an_unknown_file_key_are_both_reported_with_exit_64() {
    let mut file = tempfile::NamedTempFile::new().expect("tempfile");
    std::io::Write::write_all(
        &mut file,
        b"fake_credentials = true\nlisn = \"127.0.0.1:1\"\n",
    )
    .expect("write config");
    let path = file.path().to_str().expect("utf8");
    let (code, stderr) = run_to_exit(&["--config", path, "--http-tokens", "maybe"], &[]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("--http-tokens: \"maybe\" is not one of"),
        "{stderr}"
    );
    assert!(stderr.contains(path) && stderr.contains("lisn"), "{stderr}");
}

#[test]
fn a_bad_allowed_host_exits_64_naming_the_value_and_the_fix() {
    let state = tempfile::tempdir().expect("tempdir");
    let state_path = state.path().to_str().expect("utf8");
    let (code, stderr) = run_to_exit(
        &[
            "--fake-credentials",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state_path,
        ],
        &[("IMDSD_ALLOWED_HOSTS", "imdsd:8169,*.example.com")],
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("IMDSD_ALLOWED_HOSTS: \"imdsd:8169\" has a port")
            && stderr.contains("write the name alone (\"imdsd\")"),
        "{stderr}"
    );
    assert!(
        stderr.contains("IMDSD_ALLOWED_HOSTS: \"*.example.com\" contains '*'"),
        "{stderr}"
    );
}

/// The key the daemon serves on an IMDSv2 credentials GET (the same cached session).
fn served_key(addr: SocketAddr) -> String {
    let r = raw(
        addr,
        "GET",
        &format!("/latest/meta-data/iam/security-credentials/{ROLE}"),
        &[("X-aws-ec2-metadata-token", &token(addr, 60))],
    );
    assert_eq!(r.status, 200, "{r:?}");
    let doc: serde_json::Value = serde_json::from_str(&r.text()).expect("json");
    doc["AccessKeyId"].as_str().expect("key").to_string()
}

/// Reads the instance and its role's credentials with the `ec2-metadata` library (IMDSv2 only,
/// its own token handling). Its service URL is fixed at http://169.254.169.254/, and its
/// constructor takes the urllib3 pool manager to use: a `ProxyManager` sends each request to
/// the daemon in absolute form (`GET http://169.254.169.254/latest/… HTTP/1.1`).
const EC2_METADATA_SCRIPT: &str = r#"
import json, os, urllib3
from ec2_metadata import EC2Metadata

m = EC2Metadata(pool_manager=urllib3.ProxyManager(os.environ["IMDSD_URL"]))
c = m.iam_security_credentials
print(json.dumps({
    "instance_id": m.instance_id,
    "region": m.region,
    "role": m.instance_profile_name,
    "access_key": c and c["AccessKeyId"],
    "has_secret": bool(c and c["SecretAccessKey"]),
}))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn the_ec2_metadata_library_reads_the_instance_and_its_role() {
    for mode in ["optional", "required"] {
        let daemon = Daemon::start(&["--fake-credentials", "--http-tokens", mode, ROLE]).await;
        let key = served_key(daemon.addr);
        let url = daemon.url();
        let stdout = tokio::task::spawn_blocking(move || {
            run_python(EC2_METADATA_SCRIPT, &[("IMDSD_URL", &url)])
        })
        .await
        .expect("python task");
        let out: serde_json::Value =
            serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
        assert_eq!(out["role"], ROLE, "{mode}: {out}");
        assert_eq!(out["access_key"], key.as_str(), "{mode}: {out}");
        assert_eq!(out["has_secret"], true, "{mode}: {out}");
        assert_eq!(out["region"], "us-east-1", "{mode}: {out}");
        assert!(
            out["instance_id"]
                .as_str()
                .is_some_and(|i| i.starts_with("i-")),
            "{out}"
        );
    }
}

/// boto3 calling the daemon by a name (as a compose app would call a service `imdsd`): there is
/// no DNS for the name here, so botocore's own proxy support (HTTP_PROXY, which it honours for
/// IMDS) carries the requests to the daemon, with `Host: imdsd` and an absolute-form target.
async fn boto3_by_name(addr: SocketAddr) -> serde_json::Value {
    let proxy = format!("http://{addr}");
    let stdout = tokio::task::spawn_blocking(move || {
        run_python(
            BOTO3_SCRIPT,
            &[
                ("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://imdsd/"),
                ("HTTP_PROXY", &proxy),
                ("NO_PROXY", ""),
            ],
        )
    })
    .await
    .expect("python task");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn boto3_calling_imdsd_by_name_is_served_only_when_the_name_is_allowed() {
    let allowed = Daemon::start(&["--fake-credentials", "--allowed-host", "imdsd", ROLE]).await;
    let out = boto3_by_name(allowed.addr).await;
    assert_eq!(out["credentials"]["method"], "iam-role", "{out}");
    assert_eq!(
        out["credentials"]["access_key"],
        served_key(allowed.addr).as_str(),
        "{out}"
    );
    assert_eq!(out["region"], "us-east-1", "{out}");

    let plain = Daemon::start(&["--fake-credentials", ROLE]).await;
    let out = boto3_by_name(plain.addr).await;
    assert!(
        out["credentials"].is_null(),
        "boto3 got credentials through a name imdsd does not accept: {out}"
    );
    assert!(
        plain.metrics.refused_for(
            imdsd::metrics::LISTENER_METADATA,
            imdsd::metrics::REFUSED_HOST
        ) > 0
    );
}

/// `localhost` is accepted like an address: the Rust SDK and boto3 pointed at
/// http://localhost:PORT/ get credentials.
#[tokio::test(flavor = "multi_thread")]
async fn sdks_pointed_at_localhost_get_credentials() {
    let daemon = Daemon::start(&["--fake-credentials", ROLE]).await;
    let key = served_key(daemon.addr);
    let endpoint = format!("http://localhost:{}", daemon.addr.port());
    let client = imds::Client::builder()
        .endpoint(&endpoint)
        .expect("valid IMDS endpoint")
        .build();
    let credentials = ImdsCredentialsProvider::builder()
        .imds_client(client)
        .build()
        .provide_credentials()
        .await
        .unwrap_or_else(|e| panic!("the Rust SDK got no credentials from {endpoint}: {e:?}"));
    assert_eq!(credentials.access_key_id(), key);

    let endpoint = format!("{endpoint}/");
    let stdout = tokio::task::spawn_blocking(move || {
        run_python(
            BOTO3_SCRIPT,
            &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint.as_str())],
        )
    })
    .await
    .expect("python task");
    let out: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(out["credentials"]["access_key"], key.as_str(), "{out}");
}
