//! The container-credentials endpoint (issue 7): the protocol ECS and EKS Pod Identity use, served
//! to each caller for its own role. Clients are the Rust SDK's container provider (`imdsd probe
//! --container`) and boto3, pointed at the endpoint on loopback with
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI`; the in-container case with `…_RELATIVE_URI` is in
//! tests/docker.rs.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::{Daemon, raw, raw_with_hosts};
use serde_json::Value;

async fn daemon(args: &[&str]) -> (Daemon, SocketAddr) {
    let mut all = vec!["--fake-credentials", "--ecs-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let d = Daemon::start(&all).await;
    let ecs = d.ecs[0];
    (d, ecs)
}

/// The access key the metadata service gives the same caller (the same cached session).
fn imds_key(d: &Daemon) -> String {
    let r = raw(
        d.addr,
        "GET",
        "/latest/meta-data/iam/security-credentials/app",
        &[],
    );
    assert_eq!(r.status, 200);
    let doc: Value = serde_json::from_str(&r.text()).expect("json");
    doc["AccessKeyId"].as_str().expect("key").to_string()
}

fn full_uri(ecs: SocketAddr) -> String {
    format!("http://{ecs}/v2/credentials/test-id?x=1")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_document_is_what_the_sdks_expect() {
    let (d, ecs) = daemon(&["app"]).await;
    let r = raw(
        ecs,
        "GET",
        "/v2/credentials/abc",
        &[("Accept", "application/json")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let doc: Value = serde_json::from_str(&r.text()).expect("json");
    assert_eq!(
        doc["AccessKeyId"],
        imds_key(&d).as_str(),
        "the same session as IMDS"
    );
    assert!(
        doc["SecretAccessKey"]
            .as_str()
            .is_some_and(|s| s.len() == 40),
        "{doc}"
    );
    assert!(
        doc["Token"].as_str().is_some_and(|s| !s.is_empty()),
        "{doc}"
    );
    let exp = doc["Expiration"].as_str().expect("expiration");
    assert!(exp.ends_with('Z') && exp.len() == 20, "RFC 3339 UTC: {exp}");
    assert_eq!(doc["RoleArn"], "arn:aws:iam::123456789012:role/app");
    assert_eq!(doc["AccountId"], "123456789012");
    assert!(!r.text().contains('\n'), "compact JSON");
    // Both documented prefixes, nothing else.
    assert_eq!(raw(ecs, "GET", "/v1/credentials", &[]).status, 200);
    let r = raw(ecs, "GET", "/v3/credentials", &[]);
    assert_eq!(r.status, 404);
    let err: Value = serde_json::from_str(&r.text()).expect("json error");
    assert_eq!(err["code"], "NotFound");
    assert!(
        err["message"]
            .as_str()
            .expect("message")
            .contains("/v2/credentials")
    );
    assert_eq!(raw(ecs, "POST", "/v2/credentials", &[]).status, 405);
    // The metadata service is not on the endpoint's address.
    assert_eq!(raw(ecs, "GET", "/latest/meta-data/", &[]).status, 404);

    let (_none, ecs_none) = daemon(&[]).await;
    let r = raw(ecs_none, "GET", "/v2/credentials", &[]);
    assert_eq!(r.status, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&r.text()).expect("json")["code"],
        "NoRole"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rust_sdk_and_boto3_get_the_callers_role() {
    let (d, ecs) = daemon(&["app"]).await;
    let key = imds_key(&d);

    let out = common::aws_clean_command(Path::new(env!("CARGO_BIN_EXE_imdsd")))
        .args(["probe", "--container"])
        .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", full_uri(ecs))
        .output()
        .expect("probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let probe: Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(probe["source"], "container");
    assert_eq!(
        probe["access_key_id"],
        format!("…{}", &key[key.len() - 4..]),
        "{probe}"
    );
    assert!(probe["expiration"].as_str().is_some(), "{probe}");

    let py = common::run_python(
        "import boto3, json\n\
         c = boto3.Session().get_credentials()\n\
         f = c.get_frozen_credentials()\n\
         print(json.dumps([c.method, f.access_key]))",
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &full_uri(ecs))],
    );
    let got: Vec<String> = serde_json::from_str(py.trim()).expect("json");
    assert_eq!(got, ["container-role".to_string(), key]);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_auth_only_the_callers_own_token_works() {
    let (d, ecs) = daemon(&["--ecs-auth", "app"]).await;
    let admin = d.admin.expect("admin API");
    let token = raw(admin, "GET", "/v1/container-token?ip=127.0.0.1", &[]).text();
    assert_eq!(token.len(), 43, "{token}");
    let other = raw(admin, "GET", "/v1/container-token?container=web", &[]).text();
    assert_ne!(token, other);
    assert_eq!(raw(admin, "GET", "/v1/container-token", &[]).status, 400);

    for (presented, label) in [
        (None, "missing"),
        (Some("nonsense"), "wrong"),
        (Some(other.as_str()), "someone else's"),
    ] {
        let headers: Vec<(&str, &str)> = presented
            .map(|t| ("Authorization", t))
            .into_iter()
            .collect();
        let r = raw(ecs, "GET", "/v2/credentials", &headers);
        assert_eq!(r.status, 401, "{label} token: {}", r.text());
        let err: Value = serde_json::from_str(&r.text()).expect("json");
        assert_eq!(err["code"], "Unauthorized", "{label}");
        assert!(!r.text().contains("AccessKeyId"));
    }
    let r = raw(ecs, "GET", "/v2/credentials", &[("Authorization", &token)]);
    assert_eq!(r.status, 200, "{}", r.text());

    // The SDKs send the token verbatim from AWS_CONTAINER_AUTHORIZATION_TOKEN.
    let py = common::run_python(
        "import boto3\nprint(boto3.Session().get_credentials().get_frozen_credentials().access_key)",
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &full_uri(ecs)),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", &token),
        ],
    );
    assert_eq!(py.trim(), imds_key(&d));
    let out = common::aws_clean_command(Path::new(env!("CARGO_BIN_EXE_imdsd")))
        .args(["probe", "--container"])
        .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", full_uri(ecs))
        .env("AWS_CONTAINER_AUTHORIZATION_TOKEN", &token)
        .output()
        .expect("probe");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn auth_without_an_endpoint_is_a_configuration_error() {
    let (code, stderr) = common::run_to_exit(&["--fake-credentials", "--ecs-auth"], &[]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("--ecs-listen"), "{stderr}");
}

/// What a rebinding page would send (its own name as Host) gets the endpoint's JSON error and no
/// credentials; the addresses SDKs use, and localhost, are served.
#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_host_gets_403_and_no_credentials() {
    let (d, ecs) = daemon(&["app"]).await;
    let key = imds_key(&d);
    let refused = |hosts: &[&str], status: u16| {
        let r = raw_with_hosts(ecs, "GET", "/v2/credentials", hosts, &[]);
        assert_eq!(r.status, status, "Host {hosts:?}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        let err: Value = serde_json::from_str(&r.text()).expect("json error");
        assert_eq!(err["code"], "InvalidHost", "{err}");
        assert!(!r.text().contains(&key), "Host {hosts:?}: the key");
        assert!(!r.text().contains("SecretAccessKey"), "Host {hosts:?}");
        err["message"].as_str().expect("message").to_string()
    };
    for host in [
        "attacker.example.com",
        "127.0.0.1.nip.io:80",
        "fd00:ec2::23",
        "2130706433",
    ] {
        let message = refused(&[host], 403);
        assert!(message.contains("--allowed-host"), "{message}");
    }
    refused(&["169.254.170.2", "169.254.170.2"], 400);
    let absolute = raw_with_hosts(
        ecs,
        "GET",
        "http://attacker.example.com/v2/credentials",
        &["169.254.170.2"],
        &[],
    );
    assert_eq!(absolute.status, 403, "{}", absolute.text());

    let port = ecs.port();
    for host in [
        "169.254.170.2".to_string(),
        "169.254.170.23:80".into(),
        "[fd00:ec2::23]".into(),
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
    ] {
        let r = raw_with_hosts(ecs, "GET", "/v2/credentials", &[&host], &[]);
        assert_eq!(r.status, 200, "Host {host}: {}", r.text());
        assert!(r.text().contains(&key), "Host {host}");
    }
    assert_eq!(
        d.metrics.refused_for(
            imdsd::metrics::LISTENER_CONTAINER_CREDENTIALS,
            imdsd::metrics::REFUSED_HOST
        ),
        6
    );
}

/// With --ecs-auth on, a rebinding page must not get a caller's token from the admin API either
/// (it would unlock the endpoint), nor the list of workloads.
#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_gives_a_foreign_host_neither_a_token_nor_the_workloads() {
    let (d, _ecs) = daemon(&["--ecs-auth", "app"]).await;
    let admin = d.admin.expect("admin API");
    let token = raw(admin, "GET", "/v1/container-token?ip=127.0.0.1", &[]).text();
    assert_eq!(token.len(), 43, "{token}");
    for path in [
        "/v1/container-token?ip=127.0.0.1",
        "/v1/container-token?container=web",
        "/v1/workloads",
        "/metrics",
    ] {
        let r = raw_with_hosts(admin, "GET", path, &["attacker.example.com:9169"], &[]);
        assert_eq!(r.status, 403, "{path}: {}", r.text());
        assert!(!r.text().contains(&token), "{path}: the token");
        assert!(r.text().contains("--allowed-host"), "{path}: {}", r.text());
        let r = raw_with_hosts(admin, "GET", path, &["127.0.0.1", "127.0.0.1"], &[]);
        assert_eq!(r.status, 400, "{path}: {}", r.text());
    }
    let port = admin.port();
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let r = raw_with_hosts(
            admin,
            "GET",
            "/v1/container-token?ip=127.0.0.1",
            &[&host],
            &[],
        );
        assert_eq!(r.text(), token, "Host {host}");
    }
    assert_eq!(
        d.metrics
            .refused_for(imdsd::metrics::LISTENER_ADMIN, imdsd::metrics::REFUSED_HOST),
        8
    );
}
