//! Proxy mode (issue 7): imdsd in front of a real metadata service, played by a second imdsd in
//! emulate mode with `--http-tokens required`. Callers read the upstream's instance data through
//! the proxy with IMDSv1 and IMDSv2, get their own role from the proxy (assumed with moto's STS
//! from the host's instance profile, read through the upstream), never the upstream's, and see
//! only what the allow-list lets through.

mod common;
#[path = "support/sts.rs"]
mod sts_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Process, raw};
use serde_json::Value;
use sts_support::{Moto, free_port};

const INSTANCE_ID: &str = "i-0feedface12345678";
const USER_DATA: &str = "#!/bin/sh\necho upstream\n";

/// The "real" metadata service: an emulating imdsd that demands tokens, with its own instance
/// profile role `hostrole`.
struct Upstream {
    process: Process,
    port: u16,
    _state: tempfile::TempDir,
    _config: tempfile::NamedTempFile,
}

impl Upstream {
    fn start(port: u16) -> Upstream {
        let state = tempfile::tempdir().expect("tempdir");
        let config = tempfile::NamedTempFile::new().expect("tempfile");
        std::fs::write(
            config.path(),
            format!("[instance]\ninstance_id = \"{INSTANCE_ID}\"\nuser_data = {USER_DATA:?}\n"),
        )
        .expect("write");
        let process = Process::spawn(
            &[
                "--fake-credentials",
                "--http-tokens",
                "required",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--state-dir",
                state.path().to_str().expect("utf8"),
                "--config",
                config.path().to_str().expect("utf8"),
                "hostrole",
            ],
            &[],
        );
        assert!(
            process.addr.is_some(),
            "upstream did not start: {}",
            process.log_text()
        );
        Upstream {
            process,
            port,
            _state: state,
            _config: config,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.process.addr()
    }

    /// A path read directly, as the host would.
    fn direct(&self, path: &str) -> common::RawResponse {
        let t = common::token(self.addr(), 60);
        raw(
            self.addr(),
            "GET",
            path,
            &[("X-aws-ec2-metadata-token", &t)],
        )
    }
}

fn proxy(upstream: u16, moto: &Moto, args: &[&str]) -> (Process, tempfile::TempDir) {
    let state = tempfile::tempdir().expect("tempdir");
    let state_path = state.path().to_str().expect("utf8").to_string();
    let upstream_url = format!("http://127.0.0.1:{upstream}");
    let mut all = vec![
        "--mode",
        "proxy",
        "--upstream",
        &upstream_url,
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        &state_path,
        "--sts-endpoint",
        &moto.url,
        "--region",
        "us-east-1",
    ];
    all.extend_from_slice(args);
    // No operator keys at all: the proxy's own identity must come from the upstream.
    let p = Process::spawn(&all, &[("AWS_EC2_METADATA_DISABLED", "false")]);
    assert!(p.addr.is_some(), "proxy did not start: {}", p.log_text());
    (p, state)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_host_data_comes_from_upstream_and_the_role_from_imdsd() {
    let moto = Moto::start();
    let up = Upstream::start(free_port());
    let (p, _state) = proxy(up.port, &moto, &["app"]);
    let addr = p.addr();

    for path in [
        "/latest/meta-data/instance-id",
        "/latest/user-data",
        "/latest/dynamic/instance-identity/document",
        "/latest/meta-data/placement/availability-zone",
        "/2021-07-15/meta-data/instance-id",
        "/latest/meta-data/nope",
    ] {
        let direct = up.direct(path);
        // IMDSv1 through the proxy, although the upstream requires tokens.
        let v1 = raw(addr, "GET", path, &[]);
        assert_eq!(v1.status, direct.status, "{path}");
        assert_eq!(v1.body, direct.body, "{path}: the bytes pass unchanged");
        assert_eq!(
            v1.header("content-type"),
            direct.header("content-type"),
            "{path}"
        );
        // IMDSv2 with the proxy's own token.
        let t = common::token(addr, 60);
        let v2 = raw(addr, "GET", path, &[("X-aws-ec2-metadata-token", &t)]);
        assert_eq!(
            (v2.status, &v2.body),
            (direct.status, &direct.body),
            "{path}"
        );
        assert_eq!(
            v2.header("x-aws-ec2-metadata-token-ttl-seconds"),
            Some("60")
        );
    }
    assert_eq!(
        raw(addr, "GET", "/latest/meta-data/instance-id", &[]).text(),
        INSTANCE_ID
    );
    assert_eq!(raw(addr, "GET", "/latest/user-data", &[]).text(), USER_DATA);

    // The upstream's token is not the proxy's, and the caller's token never reaches the upstream.
    let upstream_token = common::token(up.addr(), 60);
    let r = raw(
        addr,
        "GET",
        "/latest/meta-data/instance-id",
        &[("X-aws-ec2-metadata-token", &upstream_token)],
    );
    assert_eq!(r.status, 401);

    // The role is the proxy's: `app`, assumed from the host's identity, never `hostrole`.
    assert_eq!(
        raw(
            addr,
            "GET",
            "/latest/meta-data/iam/security-credentials/",
            &[]
        )
        .text(),
        "app"
    );
    let mine: Value = serde_json::from_str(
        &raw(
            addr,
            "GET",
            "/latest/meta-data/iam/security-credentials/app",
            &[],
        )
        .text(),
    )
    .expect("json");
    let host: Value = serde_json::from_str(
        &up.direct("/latest/meta-data/iam/security-credentials/hostrole")
            .text(),
    )
    .expect("json");
    assert_eq!(mine["Code"], "Success", "{mine}");
    assert_ne!(mine["AccessKeyId"], host["AccessKeyId"]);
    assert_eq!(
        raw(
            addr,
            "GET",
            "/latest/meta-data/iam/security-credentials/hostrole",
            &[]
        )
        .status,
        404
    );
    let listing = raw(addr, "GET", "/latest/meta-data/", &[]).text();
    assert!(
        listing.contains("instance-id") && listing.lines().filter(|l| *l == "iam/").count() == 1,
        "{listing}"
    );
    // The host's own identity credentials are not handed to containers.
    assert_eq!(
        raw(
            addr,
            "GET",
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            &[]
        )
        .status,
        404
    );
    let log = p.log_text();
    assert!(log.contains("proxy mode"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn deny_by_default_shows_only_the_allowed_paths() {
    let moto = Moto::start();
    let up = Upstream::start(free_port());
    let (p, _state) = proxy(
        up.port,
        &moto,
        &[
            "--proxy-allow",
            "/latest/meta-data/instance-id,/latest/meta-data/placement/*",
            "--hide-user-data",
            "app",
        ],
    );
    let addr = p.addr();
    assert_eq!(
        raw(addr, "GET", "/latest/meta-data/instance-id", &[]).text(),
        INSTANCE_ID
    );
    assert_eq!(
        raw(addr, "GET", "/latest/meta-data/placement/region", &[]).status,
        200
    );
    for denied in [
        "/latest/user-data",
        "/latest/meta-data/local-ipv4",
        "/latest/dynamic/instance-identity/document",
    ] {
        assert_eq!(raw(addr, "GET", denied, &[]).status, 404, "{denied}");
    }
    // Listings do not name what may not be read.
    let top = raw(addr, "GET", "/latest/", &[]).text();
    assert!(
        !top.contains("user-data") && top.lines().any(|l| l == "meta-data"),
        "{top}"
    );
    let listing = raw(addr, "GET", "/latest/meta-data/", &[]).text();
    assert!(
        listing.contains("instance-id") && listing.contains("placement/"),
        "{listing}"
    );
    assert!(
        !listing.contains("local-ipv4") && !listing.contains("identity-credentials"),
        "{listing}"
    );
    assert!(listing.lines().any(|l| l == "iam/"), "{listing}");
    // imdsd's own paths are not subject to the allow-list.
    assert_eq!(
        raw(
            addr,
            "GET",
            "/latest/meta-data/iam/security-credentials/",
            &[]
        )
        .text(),
        "app"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_outage_is_a_5xx_and_then_recovers() {
    let moto = Moto::start();
    let port = free_port();
    let up = Upstream::start(port);
    let (p, _state) = proxy(port, &moto, &["app"]);
    let addr = p.addr();
    assert_eq!(
        raw(addr, "GET", "/latest/meta-data/instance-id", &[]).status,
        200
    );

    drop(up);
    let started = Instant::now();
    let r = raw(addr, "GET", "/latest/meta-data/instance-id", &[]);
    assert!(matches!(r.status, 502 | 504), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bounded: {:?}",
        started.elapsed()
    );
    // Credentials are imdsd's own and stay available.
    assert_eq!(
        raw(
            addr,
            "GET",
            "/latest/meta-data/iam/security-credentials/app",
            &[]
        )
        .status,
        200
    );

    // Back, with a new key (its old tokens are void): the proxy gets a new session by itself.
    let _up = Upstream::start(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = raw(addr, "GET", "/latest/meta-data/instance-id", &[]);
        if r.status == 200 {
            assert_eq!(r.text(), INSTANCE_ID);
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
