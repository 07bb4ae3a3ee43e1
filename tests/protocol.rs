//! The IMDS wire contract, checked on the wire: every item of the checklist in
//! `reference/imds-protocol.md` §9 that applies to emulate mode (T01–T54 and T62; T51 needs a
//! failing STS and lives with the STS tests, T46's two-hour sampling is a unit test of the broker
//! with paused time, T55–T61 and T63–T67 belong to the SDK, latency and container tests).
//!
//! Each test starts the daemon in-process on a loopback port and talks to it with raw sockets, so
//! statuses, reason phrases, header values and body bytes are compared exactly. Every response
//! goes through [`send`], which checks what every EC2 response carries (T41).

mod common;

use std::collections::{HashSet, VecDeque};
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use common::{Daemon, RawResponse};
use http::StatusCode;
use imdsd::imds::response::error_page;

/// Emulate mode with a default role, as the checklist assumes unless it says otherwise.
const ROLE: &[&str] = &["--fake-credentials", "test-role"];
const TTL: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const TOKEN: &str = "X-aws-ec2-metadata-token";
const MD: &str = "/latest/meta-data";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/test-role";

/// The versions EC2 lists at `/` (the Snow-family capture plus 2021-07-15), then `latest`.
const VERSIONS: &[&str] = &[
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
    "2011-01-01",
    "2011-05-01",
    "2012-01-12",
    "2014-02-25",
    "2014-11-05",
    "2015-10-20",
    "2016-04-19",
    "2016-06-30",
    "2016-09-02",
    "2018-03-28",
    "2018-08-17",
    "2018-09-24",
    "2019-10-01",
    "2020-10-27",
    "2021-01-03",
    "2021-03-23",
    "2021-07-15",
];

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Sends one request on a fresh connection and checks the headers every IMDS response carries.
fn send(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> RawResponse {
    let r = common::raw(addr, method, path, headers);
    assert_ec2_headers(&r, &format!("{method} {path}"));
    r
}

fn get(addr: SocketAddr, path: &str) -> RawResponse {
    send(addr, "GET", path, &[])
}

fn get_with(addr: SocketAddr, path: &str, token: &str) -> RawResponse {
    send(addr, "GET", path, &[(TOKEN, token)])
}

fn put_token(addr: SocketAddr, headers: &[(&str, &str)]) -> RawResponse {
    send(addr, "PUT", "/latest/api/token", headers)
}

/// A fresh token, through [`send`] so that the PUT is checked like everything else.
fn token(addr: SocketAddr, ttl: u32) -> String {
    let r = put_token(addr, &[(TTL, &ttl.to_string())]);
    assert_eq!(r.status, 200, "token PUT: {r:?}");
    r.text()
}

/// T41: `Server: EC2ws`, `Connection: close` and a current `Date`, each once; and a
/// `Content-Length` that tells the truth (HEAD answers carry GET's length and no body).
fn assert_ec2_headers(r: &RawResponse, what: &str) {
    for name in ["Server", "Connection", "Date", "Content-Length"] {
        let n = r
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .count();
        assert_eq!(n, 1, "{what}: expected exactly one {name} header: {r:?}");
    }
    assert_eq!(r.header("Server"), Some("EC2ws"), "{what}: {r:?}");
    assert_eq!(r.header("Connection"), Some("close"), "{what}: {r:?}");
    let date = r.header("Date").unwrap_or_default();
    let date = httpdate::parse_http_date(date)
        .unwrap_or_else(|e| panic!("{what}: Date {date:?} is not an HTTP date: {e}"));
    let skew = match date.duration_since(SystemTime::now()) {
        Ok(ahead) => ahead,
        Err(behind) => behind.duration(),
    };
    assert!(
        skew < Duration::from_secs(60),
        "{what}: Date is {skew:?} off"
    );
    if !what.starts_with("HEAD ") {
        assert_eq!(
            r.header("Content-Length"),
            Some(r.body.len().to_string().as_str()),
            "{what}: Content-Length does not match the body"
        );
    }
}

/// The response is EC2's XHTML error page for `status`, byte for byte.
fn assert_page(r: &RawResponse, status: StatusCode, what: &str) {
    assert_eq!(r.status, status.as_u16(), "{what}: {r:?}");
    assert_eq!(r.header("Content-Type"), Some("text/html"), "{what}: {r:?}");
    assert_eq!(
        r.body,
        error_page(status).to_vec(),
        "{what}: not the standard {status} page"
    );
    let title = format!(
        "<title>{} - {}</title>",
        status.as_u16(),
        status.canonical_reason().unwrap_or_default()
    );
    assert!(r.text().contains(&title), "{what}: no {title} in the page");
    // EC2's error responses carry no Accept-Ranges or Last-Modified (recorded 404, §2.4).
    for name in ["Accept-Ranges", "Last-Modified"] {
        assert_eq!(r.header(name), None, "{what}: an error page with {name}");
    }
}

/// A 200 `text/plain` answer; returns the body as text.
fn ok_text(r: &RawResponse, what: &str) -> String {
    assert_eq!(r.status, 200, "{what}: {r:?}");
    assert_eq!(r.reason, "OK", "{what}");
    assert_eq!(
        r.header("Content-Type"),
        Some("text/plain"),
        "{what}: {r:?}"
    );
    r.text()
}

/// `GET path` must be a 200 `text/plain`; returns the body.
fn get_text(addr: SocketAddr, path: &str) -> String {
    ok_text(&get(addr, path), &format!("GET {path}"))
}

/// `YYYY-MM-DDTHH:MM:SSZ`, exactly: what botocore's expiry logic parses.
fn is_imds_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

fn parse_time(s: &str) -> SystemTime {
    humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"))
}

/// Parses a JSON object, keeping its key order.
fn json_object(body: &str) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::from_str(body) {
        Ok(serde_json::Value::Object(m)) => m,
        other => panic!("not a JSON object ({other:?}): {body}"),
    }
}

/// How IMDS writes a JSON object: `"Key" : value` lines with a two-space indent, no final LF.
fn imds_style(m: &serde_json::Map<String, serde_json::Value>) -> String {
    let lines: Vec<String> = m.iter().map(|(k, v)| format!("  {k:?} : {v}")).collect();
    format!("{{\n{}\n}}", lines.join(",\n"))
}

fn keys(m: &serde_json::Map<String, serde_json::Value>) -> Vec<&str> {
    m.keys().map(String::as_str).collect()
}

fn str_field<'a>(m: &'a serde_json::Map<String, serde_json::Value>, key: &str) -> &'a str {
    m.get(key)
        .and_then(serde_json::Value::as_str)
        .unwrap_or_else(|| panic!("{key} is not a string in {m:?}"))
}

/// A configuration file holding `toml`.
fn config_file(toml: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("create a config file");
    f.write_all(toml.as_bytes()).expect("write the config file");
    f
}

async fn start_with_config(extra: &[&str], toml: &str) -> (Daemon, tempfile::NamedTempFile) {
    let file = config_file(toml);
    let path = file.path().to_str().expect("utf-8 temp path").to_string();
    let mut args = ROLE.to_vec();
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--config", &path]);
    (Daemon::start(&args).await, file)
}

/// Sends bytes that the daemon may refuse before reading them all; returns whatever answer came
/// back, if any (a reset after the answer is not an error here).
///
/// Requests that do not parse are answered by hyper itself (400, 431), before the daemon sees
/// them: those answers carry `Connection: close` and `Date` but not `Server: EC2ws` or the XHTML
/// page, so they are checked for the first two only.
fn send_hostile(addr: SocketAddr, request: &[u8]) -> Option<RawResponse> {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = stream.write_all(request);
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    }
    (!bytes.is_empty()).then(|| common::parse_response(&bytes))
}

/// The daemon still answers a plain request.
fn assert_still_serving(addr: SocketAddr, after: &str) {
    let r = get(addr, &format!("{MD}/instance-id"));
    assert_eq!(r.status, 200, "after {after}: {r:?}");
    assert!(r.text().starts_with("i-"), "after {after}");
}

// ---------------------------------------------------------------------------------------------
// 1.1 Issuing tokens
// ---------------------------------------------------------------------------------------------

// T01, T02, T41
#[tokio::test(flavor = "multi_thread")]
async fn a_token_put_returns_56_url_safe_characters_and_echoes_the_ttl() {
    let d = Daemon::start(ROLE).await;

    let r = put_token(d.addr, &[(TTL, "21600")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.reason, "OK");
    assert_eq!(r.header(TTL), Some("21600"));
    assert_eq!(r.header("Content-Type"), Some("text/plain"));
    assert_eq!(r.header("Content-Length"), Some("56"));
    let t = r.text();
    assert_eq!(t.len(), 56, "{t:?}");
    assert!(t.ends_with("=="), "{t:?}");
    assert!(
        t[..54]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{t:?} is not URL-safe base64"
    );
    assert!(!t.contains('\n') && !t.contains('"'), "{t:?}");

    // SDKs send the header name in lower case.
    let r = put_token(d.addr, &[("x-aws-ec2-metadata-token-ttl-seconds", "1")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header(TTL), Some("1"));
    assert_eq!(r.body.len(), 56);

    // Go asks for 300 s; every value in range is echoed as sent.
    for ttl in ["300", "21599", "60"] {
        let r = put_token(d.addr, &[(TTL, ttl)]);
        assert_eq!(r.status, 200, "TTL {ttl}: {r:?}");
        assert_eq!(r.header(TTL), Some(ttl));
    }
    assert_ne!(token(d.addr, 21600), token(d.addr, 21600), "tokens repeat");
}

// T03, T04, T05, T06 (and absurd TTLs in general)
#[tokio::test(flavor = "multi_thread")]
async fn missing_or_absurd_ttls_get_400_and_no_token() {
    let d = Daemon::start(ROLE).await;

    let r = put_token(d.addr, &[]);
    assert_page(&r, StatusCode::BAD_REQUEST, "PUT without a TTL");
    assert_eq!(r.header(TTL), None);

    for ttl in [
        "0",
        "21601",
        "abc",
        "-5",
        "",
        "1.5",
        "+5",
        "0x10",
        "1e3",
        "021601",
        "4294967297",
        "99999999999999999999999999",
        "21600abc",
        "5 5",
    ] {
        let what = format!("PUT with TTL {ttl:?}");
        let r = put_token(d.addr, &[(TTL, ttl)]);
        assert_page(&r, StatusCode::BAD_REQUEST, &what);
        assert_eq!(r.header(TTL), None, "{what}");
    }
    assert_eq!(token(d.addr, 21600).len(), 56, "after the bad TTLs");
    assert_still_serving(d.addr, "absurd TTLs");
}

// T07, T09
#[tokio::test(flavor = "multi_thread")]
async fn forwarded_and_versioned_token_puts_get_403() {
    let d = Daemon::start(ROLE).await;

    let r = put_token(d.addr, &[(TTL, "21600"), ("X-Forwarded-For", "10.0.0.1")]);
    assert_page(&r, StatusCode::FORBIDDEN, "PUT with X-Forwarded-For");
    assert_eq!(
        r.header(TTL),
        None,
        "a refused PUT must not look like a token"
    );

    // Known versions, and prefixes EC2 does not know: a 405 here would send SDKs to IMDSv1.
    for version in ["2021-03-23", "2009-04-04", "2021-07-15", "2099-01-01", "v2"] {
        let path = format!("/{version}/api/token");
        let r = send(d.addr, "PUT", &path, &[(TTL, "21600")]);
        assert_page(&r, StatusCode::FORBIDDEN, &format!("PUT {path}"));
        assert_eq!(r.header(TTL), None);
    }
    assert_eq!(token(d.addr, 21600).len(), 56);
}

// T08, T10
#[tokio::test(flavor = "multi_thread")]
async fn wrong_methods_on_the_token_path_get_405_not_allowed() {
    let d = Daemon::start(ROLE).await;
    for method in ["GET", "POST", "DELETE", "PATCH", "FOO"] {
        let r = send(d.addr, method, "/latest/api/token", &[(TTL, "21600")]);
        let what = format!("{method} /latest/api/token");
        assert_page(&r, StatusCode::METHOD_NOT_ALLOWED, &what);
        assert_eq!(r.reason, "Not Allowed", "{what}: nginx's reason phrase");
        assert_eq!(r.header("Allow"), Some("OPTIONS, PUT"), "{what}");
        assert_eq!(r.header(TTL), None, "{what}");
    }
    let r = send(d.addr, "HEAD", "/latest/api/token", &[]);
    assert_eq!(r.status, 405);
    assert_eq!(r.header("Allow"), Some("OPTIONS, PUT"));
    assert!(r.body.is_empty());

    // Emulator policy: OPTIONS answers with the allowed methods.
    let r = send(d.addr, "OPTIONS", "/latest/api/token", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("Allow"), Some("OPTIONS, PUT"));
    assert!(r.body.is_empty());
}

// T11
#[tokio::test(flavor = "multi_thread")]
async fn expect_100_continue_is_accepted_unless_strict() {
    let expect = ("Expect", "100-continue");

    let lenient = Daemon::start(ROLE).await;
    let r = put_token(lenient.addr, &[(TTL, "21600"), expect]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header(TTL), Some("21600"));
    assert_eq!(r.body.len(), 56);

    let strict = Daemon::start(&["--fake-credentials", "test-role", "--strict-expect"]).await;
    let r = put_token(strict.addr, &[(TTL, "21600"), expect]);
    assert_page(&r, StatusCode::EXPECTATION_FAILED, "strict PUT with Expect");
    assert_eq!(r.header(TTL), None);
    // Without the header the strict daemon issues tokens as usual.
    assert_eq!(token(strict.addr, 21600).len(), 56);
}

// ---------------------------------------------------------------------------------------------
// 1.2–1.3 Using tokens, modes
// ---------------------------------------------------------------------------------------------

// T12, T16, T18, T19
#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_reusable_and_report_their_remaining_ttl() {
    let d = Daemon::start(ROLE).await;
    let path = format!("{MD}/instance-id");
    let tok = token(d.addr, 21600);

    let first = get_with(d.addr, &path, &tok);
    let id = ok_text(&first, "first GET with the token");
    let left_first: u32 = first
        .header(TTL)
        .expect("a token-bearing 200 carries the remaining TTL")
        .parse()
        .expect("the remaining TTL is an integer");
    assert!((21590..=21600).contains(&left_first), "{left_first}");

    let second = get_with(d.addr, &path, &tok);
    assert_eq!(ok_text(&second, "second GET with the token"), id);

    std::thread::sleep(Duration::from_millis(1100));
    let third = get_with(d.addr, &path, &tok);
    assert_eq!(ok_text(&third, "GET a second later"), id);
    let left_third: u32 = third
        .header(TTL)
        .expect("remaining TTL")
        .parse()
        .expect("integer");
    assert!(
        left_third < left_first,
        "the remaining TTL did not decrease: {left_first} then {left_third}"
    );

    // IMDSv1 in optional mode: served, and without the TTL header.
    let v1 = get(d.addr, &path);
    assert_eq!(ok_text(&v1, "GET without a token"), id);
    assert_eq!(v1.header(TTL), None);
}

// T13 (and garbage tokens in general)
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_token_gets_401_in_both_modes() {
    let optional = Daemon::start(ROLE).await;
    let required = Daemon::start(&[
        "--fake-credentials",
        "test-role",
        "--http-tokens",
        "required",
    ])
    .await;
    let path = format!("{MD}/instance-id");

    for d in [&optional, &required] {
        let good = token(d.addr, 21600);
        // The same token with one character changed, truncated, or extended.
        let flipped = {
            let mut b = good.clone().into_bytes();
            b[10] = if b[10] == b'A' { b'B' } else { b'A' };
            String::from_utf8(b).expect("ascii")
        };
        let garbage = [
            "bogus".to_string(),
            String::new(),
            "A".repeat(56),
            format!("{}==", "_".repeat(54)),
            flipped,
            good[..55].to_string(),
            format!("{good}A"),
            format!("\"{good}\""),
            "x".repeat(4000),
        ];
        for bad in &garbage {
            let what = format!("GET with token {bad:?}");
            let r = get_with(d.addr, &path, bad);
            assert_page(&r, StatusCode::UNAUTHORIZED, &what);
            assert_eq!(r.reason, "Unauthorized", "{what}");
            assert_eq!(r.header(TTL), None, "{what}");
        }
        // Bytes that are not UTF-8 in the token header.
        let mut request =
            b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n".to_vec();
        request.extend_from_slice(b"X-aws-ec2-metadata-token: \xff\xfe\x80token\r\n\r\n");
        let r = common::raw_bytes(d.addr, &request);
        assert_ec2_headers(&r, "GET with a non-UTF-8 token");
        assert_page(&r, StatusCode::UNAUTHORIZED, "GET with a non-UTF-8 token");

        let r = get_with(d.addr, &path, &good);
        assert_eq!(r.status, 200, "the good token after the garbage: {r:?}");
    }
}

// T14
#[tokio::test(flavor = "multi_thread")]
async fn an_expired_token_gets_401() {
    let d = Daemon::start(ROLE).await;
    let short = token(d.addr, 1);
    std::thread::sleep(Duration::from_millis(2100));
    let r = get_with(d.addr, &format!("{MD}/instance-id"), &short);
    assert_page(&r, StatusCode::UNAUTHORIZED, "GET with an expired token");
    // IMDSv1 is still served in optional mode: only the stale token is refused.
    assert_still_serving(d.addr, "an expired token");
}

// T15
#[tokio::test(flavor = "multi_thread")]
async fn required_mode_refuses_requests_without_a_token() {
    let d = Daemon::start(&[
        "--fake-credentials",
        "test-role",
        "--http-tokens",
        "required",
    ])
    .await;
    for path in ["/", "/latest/", &format!("{MD}/instance-id"), CREDS] {
        let r = get(d.addr, path);
        assert_page(
            &r,
            StatusCode::UNAUTHORIZED,
            &format!("GET {path} without a token"),
        );
        assert_eq!(r.header(TTL), None);
    }
    let tok = token(d.addr, 21600);
    let r = get_with(d.addr, &format!("{MD}/instance-id"), &tok);
    assert!(ok_text(&r, "GET with a token").starts_with("i-"));
    assert!(r.header(TTL).is_some());
}

// T17
#[tokio::test(flavor = "multi_thread")]
async fn a_token_bearing_get_with_forwarded_for_gets_403() {
    let d = Daemon::start(ROLE).await;
    let tok = token(d.addr, 21600);
    let path = format!("{MD}/instance-id");
    let r = send(
        d.addr,
        "GET",
        &path,
        &[(TOKEN, &tok), ("X-Forwarded-For", "10.0.0.1")],
    );
    assert_page(
        &r,
        StatusCode::FORBIDDEN,
        "GET with a token and X-Forwarded-For",
    );
    let r = get_with(d.addr, &path, &tok);
    assert_eq!(r.status, 200, "the same token without the header: {r:?}");
}

// T20
#[tokio::test(flavor = "multi_thread")]
async fn head_has_the_headers_of_get_and_no_body() {
    let d = Daemon::start(ROLE).await;
    let tok = token(d.addr, 21600);
    for path in [
        format!("{MD}/instance-id"),
        format!("{MD}/"),
        CREDS.to_string(),
    ] {
        let g = get_with(d.addr, &path, &tok);
        let h = send(d.addr, "HEAD", &path, &[(TOKEN, &tok)]);
        assert_eq!(h.status, 200, "HEAD {path}: {h:?}");
        assert!(h.body.is_empty(), "HEAD {path} has a body");
        assert_eq!(
            h.header("Content-Length"),
            Some(g.body.len().to_string().as_str()),
            "HEAD {path}"
        );
        for name in ["Content-Type", "Accept-Ranges"] {
            assert_eq!(h.header(name), g.header(name), "HEAD {path}: {name}");
        }
        assert!(h.header(TTL).is_some(), "HEAD {path} with a token");
    }
    let h = send(d.addr, "HEAD", &format!("{MD}/no-such-thing"), &[]);
    assert_eq!(h.status, 404);
    assert_eq!(h.header("Content-Length"), Some("339"));
    assert!(h.body.is_empty());
}

// T21
#[tokio::test(flavor = "multi_thread")]
async fn a_disabled_endpoint_refuses_everything_with_403() {
    let d = Daemon::start(&[
        "--fake-credentials",
        "test-role",
        "--http-endpoint",
        "disabled",
    ])
    .await;
    let r = put_token(d.addr, &[(TTL, "21600")]);
    assert_page(&r, StatusCode::FORBIDDEN, "PUT token, disabled");
    assert_eq!(r.header(TTL), None);
    for (method, path) in [
        ("GET", format!("{MD}/instance-id")),
        ("GET", "/".to_string()),
        ("GET", "/latest/api/token".to_string()),
        ("GET", CREDS.to_string()),
        ("POST", format!("{MD}/")),
    ] {
        let r = send(d.addr, method, &path, &[]);
        assert_page(
            &r,
            StatusCode::FORBIDDEN,
            &format!("{method} {path}, disabled"),
        );
    }
    let r = get_with(d.addr, &format!("{MD}/instance-id"), "bogus");
    assert_page(&r, StatusCode::FORBIDDEN, "GET with a token, disabled");
}

// T22
#[tokio::test(flavor = "multi_thread")]
async fn a_token_is_bound_to_the_caller_address() {
    let d = Daemon::start(ROLE).await;
    let a: IpAddr = Ipv4Addr::new(127, 0, 0, 1).into();
    let b: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
    let path = format!("{MD}/instance-id");

    let addr = d.addr;
    let from_b = |method: &'static str, headers: Vec<(&'static str, String)>| {
        let path = if method == "PUT" {
            "/latest/api/token".to_string()
        } else {
            path.clone()
        };
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = common::raw_from(b, addr, method, &path, &h).await;
            assert_ec2_headers(&r, &format!("{method} {path} from {b}"));
            r
        }
    };

    let tok_a = token(d.addr, 21600);
    let r = common::raw_from(a, d.addr, "GET", &path, &[(TOKEN, &tok_a)]).await;
    assert_eq!(r.status, 200, "A's token from A: {r:?}");
    let r = from_b("GET", vec![(TOKEN, tok_a.clone())]).await;
    assert_page(&r, StatusCode::UNAUTHORIZED, "A's token used from B");

    let r = from_b("PUT", vec![(TTL, "21600".into())]).await;
    assert_eq!(r.status, 200, "PUT from B: {r:?}");
    let tok_b = r.text();
    let r = from_b("GET", vec![(TOKEN, tok_b.clone())]).await;
    assert_eq!(r.status, 200, "B's token from B: {r:?}");
    let r = get_with(d.addr, &path, &tok_b);
    assert_page(&r, StatusCode::UNAUTHORIZED, "B's token used from A");
}

// T23
#[tokio::test(flavor = "multi_thread")]
async fn tokens_survive_a_restart_with_the_same_state_directory() {
    let d = Daemon::start(ROLE).await;
    let tok = token(d.addr, 21600);
    let path = format!("{MD}/instance-id");
    assert_eq!(get_with(d.addr, &path, &tok).status, 200);

    let state = d.stop().await;
    let d = Daemon::start_with_state(ROLE, state).await;
    let r = get_with(d.addr, &path, &tok);
    assert!(ok_text(&r, "GET with the old token after a restart").starts_with("i-"));
    assert!(r.header(TTL).is_some());

    // Control: a daemon with another state directory has another key and refuses the token.
    let other = Daemon::start(ROLE).await;
    let r = get_with(other.addr, &path, &tok);
    assert_page(
        &r,
        StatusCode::UNAUTHORIZED,
        "the token at a daemon with another key",
    );
}

// T24
#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_tokens_are_valid_at_once() {
    let d = Daemon::start(ROLE).await;
    let addr = d.addr;
    tokio::task::spawn_blocking(move || {
        let tokens: Vec<String> = (0..1000).map(|_| common::token(addr, 21600)).collect();
        let distinct: HashSet<&String> = tokens.iter().collect();
        assert_eq!(distinct.len(), 1000, "tokens repeat");
        for (i, t) in tokens.iter().enumerate() {
            let r = common::raw(addr, "GET", "/latest/meta-data/instance-id", &[(TOKEN, t)]);
            assert_eq!(r.status, 200, "token #{i} after 1000 issued: {r:?}");
        }
    })
    .await
    .expect("the token loop");
}

// ---------------------------------------------------------------------------------------------
// 2 Paths, listings, content types
// ---------------------------------------------------------------------------------------------

// T25, T26, T34, T35
#[tokio::test(flavor = "multi_thread")]
async fn the_root_lists_every_version_and_each_serves_the_latest_tree() {
    let d = Daemon::start(ROLE).await;

    let root = get_text(d.addr, "/");
    let mut expected = VERSIONS.to_vec();
    expected.push("latest");
    assert_eq!(root, expected.join("\n"));
    assert!(!root.ends_with('\n'));
    for v in [
        "2009-04-04",
        "2016-09-02",
        "2018-09-24",
        "2021-03-23",
        "2021-07-15",
    ] {
        assert!(root.split('\n').any(|l| l == v), "{v} not listed");
    }
    assert_eq!(root.rsplit('\n').next(), Some("latest"));

    for path in ["/latest", "/latest/"] {
        assert_eq!(get_text(d.addr, path), "dynamic\nmeta-data", "GET {path}");
    }
    let id = get_text(d.addr, &format!("{MD}/instance-id"));
    // Every dated version aliases latest (cloud-init probes 2021-03-23, 2018-09-24, 2016-09-02).
    for v in VERSIONS {
        assert_eq!(
            get_text(d.addr, &format!("/{v}/meta-data/instance-id")),
            id,
            "/{v}/meta-data/instance-id"
        );
    }
    assert_eq!(get_text(d.addr, "/2009-04-04/"), "dynamic\nmeta-data");
    assert_eq!(
        get_text(d.addr, "/2009-04-04/meta-data/"),
        get_text(d.addr, &format!("{MD}/"))
    );
}

// T27, T28
#[tokio::test(flavor = "multi_thread")]
async fn the_meta_data_listing_is_sorted_and_the_slash_is_optional() {
    let d = Daemon::start(ROLE).await;
    let listing = get_text(d.addr, &format!("{MD}/"));
    assert!(!listing.ends_with('\n') && !listing.starts_with('\n'));
    let entries: Vec<&str> = listing.split('\n').collect();
    assert!(entries.iter().all(|e| !e.is_empty()), "{listing:?}");
    let mut sorted = entries.clone();
    sorted.sort_by(|a, b| a.trim_end_matches('/').cmp(b.trim_end_matches('/')));
    assert_eq!(entries, sorted, "not sorted");
    for dir in [
        "iam/",
        "placement/",
        "network/",
        "block-device-mapping/",
        "events/",
        "services/",
    ] {
        assert!(entries.contains(&dir), "{dir} missing from {entries:?}");
    }
    for leaf in [
        "ami-id",
        "ami-launch-index",
        "ami-manifest-path",
        "hostname",
        "instance-action",
        "instance-id",
        "instance-life-cycle",
        "instance-type",
        "local-hostname",
        "local-ipv4",
        "mac",
        "reservation-id",
        "security-groups",
    ] {
        assert!(entries.contains(&leaf), "{leaf} missing from {entries:?}");
    }
    // Directories carry the slash and answer as listings; leaves do not.
    for e in &entries {
        let r = get(d.addr, &format!("{MD}/{e}"));
        assert_eq!(r.status, 200, "{e} is listed but answers {}", r.status);
    }
    assert_eq!(
        get_text(d.addr, MD),
        listing,
        "GET {MD} (no slash, as Go asks)"
    );
    assert_eq!(get_text(d.addr, &format!("{MD}//")), listing);
}

// T29, T30, T31
#[tokio::test(flavor = "multi_thread")]
async fn leaves_are_bare_values_with_ec2s_headers() {
    let d = Daemon::start(&["--fake-credentials", "test-role", "--region", "us-east-1"]).await;

    let r = get(d.addr, &format!("{MD}/instance-id"));
    let id = ok_text(&r, "instance-id");
    assert!(id.starts_with("i-") && id.len() > 2, "{id:?}");
    assert!(
        id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
        "{id:?}"
    );
    assert_eq!(
        r.header("Content-Length"),
        Some(id.len().to_string().as_str())
    );
    assert_eq!(r.header("Accept-Ranges"), Some("none"));
    let modified = r.header("Last-Modified").expect("Last-Modified");
    httpdate::parse_http_date(modified).expect("Last-Modified is an HTTP date");

    // botocore asks with a trailing slash and derives the region from the zone.
    let dashed = get_text(d.addr, &format!("{MD}/local-ipv4")).replace('.', "-");
    let host = format!("ip-{dashed}.ec2.internal");
    assert_eq!(get_text(d.addr, &format!("{MD}/local-hostname")), host);
    assert_eq!(get_text(d.addr, &format!("{MD}/hostname")), host);
    assert_eq!(
        get_text(d.addr, &format!("{MD}/services/domain")),
        "amazonaws.com"
    );
    assert_eq!(get_text(d.addr, &format!("{MD}/services/partition")), "aws");
    assert_eq!(
        get_text(d.addr, &format!("{MD}/ami-manifest-path")),
        "(unknown)"
    );

    let az = get_text(d.addr, &format!("{MD}/placement/availability-zone/"));
    assert_eq!(az, "us-east-1a");
    assert_eq!(
        get_text(d.addr, &format!("{MD}/placement/availability-zone")),
        az
    );
    let region = get_text(d.addr, &format!("{MD}/placement/region"));
    assert_eq!(region, "us-east-1");
    assert_eq!(region, az[..az.len() - 1]);
    let doc = json_object(&get_text(
        d.addr,
        "/latest/dynamic/instance-identity/document",
    ));
    assert_eq!(str_field(&doc, "region"), region);
    assert_eq!(str_field(&doc, "availabilityZone"), az);

    // Invariants between the leaves (§4).
    assert_eq!(str_field(&doc, "instanceId"), id);
    for (leaf, key) in [
        ("instance-type", "instanceType"),
        ("local-ipv4", "privateIp"),
        ("ami-id", "imageId"),
    ] {
        assert_eq!(
            get_text(d.addr, &format!("{MD}/{leaf}")),
            str_field(&doc, key),
            "{leaf}"
        );
    }
    let mac = get_text(d.addr, &format!("{MD}/mac"));
    let macs = get_text(d.addr, &format!("{MD}/network/interfaces/macs/"));
    assert_eq!(macs.split('\n').next(), Some(format!("{mac}/").as_str()));
    // No public address by default: 404, not an empty 200.
    for leaf in ["public-ipv4", "public-hostname", "ipv6"] {
        let r = get(d.addr, &format!("{MD}/{leaf}"));
        assert_page(&r, StatusCode::NOT_FOUND, leaf);
    }
}

// T32, T33
#[tokio::test(flavor = "multi_thread")]
async fn unknown_paths_get_the_339_byte_404_page() {
    let d = Daemon::start(ROLE).await;
    let page = error_page(StatusCode::NOT_FOUND);
    assert_eq!(page.len(), 339);
    for path in [
        format!("{MD}/no-such-thing"),
        format!("{MD}/placement/no-such-thing"),
        format!("{MD}/instance-id/deeper"),
        "/latest/no-such-category".to_string(),
        "/2099-01-01/meta-data/instance-id".to_string(),
        "/no-such-version".to_string(),
    ] {
        let r = get(d.addr, &path);
        assert_page(&r, StatusCode::NOT_FOUND, &format!("GET {path}"));
        assert_eq!(r.reason, "Not Found");
        assert_eq!(r.header("Content-Length"), Some("339"));
        assert_eq!(r.header(TTL), None);
    }
    // Real 404s to token-bearing requests carry the remaining TTL too.
    let tok = token(d.addr, 21600);
    let r = get_with(d.addr, &format!("{MD}/no-such-thing"), &tok);
    assert_page(
        &r,
        StatusCode::NOT_FOUND,
        "GET an unknown path with a token",
    );
    assert!(r.header(TTL).is_some(), "{r:?}");
}

// T36, T37, T26 (user-data listed when set)
#[tokio::test(flavor = "multi_thread")]
async fn user_data_is_404_when_absent_and_the_exact_bytes_when_set() {
    let d = Daemon::start(ROLE).await;
    for path in [
        "/latest/user-data",
        "/latest/user-data/",
        "/2009-04-04/user-data",
    ] {
        assert_page(&get(d.addr, path), StatusCode::NOT_FOUND, path);
    }

    let bytes: Vec<u8> = b"#!/bin/sh\n\x00\xff\xfe\x80 not utf-8\r\n\x00"
        .iter()
        .copied()
        .chain((0..=255u8).rev())
        .collect();
    let mut file = tempfile::NamedTempFile::new().expect("user-data file");
    file.write_all(&bytes).expect("write user data");
    let path = file.path().to_str().expect("utf-8 temp path").to_string();
    let (d, _config) =
        start_with_config(&[], &format!("[instance]\nuser_data_file = {path:?}\n")).await;
    for p in [
        "/latest/user-data",
        "/latest/user-data/",
        "/2009-04-04/user-data",
    ] {
        let r = get(d.addr, p);
        assert_eq!(r.status, 200, "GET {p}: {r:?}");
        assert_eq!(
            r.header("Content-Type"),
            Some("application/octet-stream"),
            "{p}"
        );
        assert_eq!(r.body, bytes, "GET {p}: not the configured bytes");
    }
    assert_eq!(
        get_text(d.addr, "/latest/"),
        "dynamic\nmeta-data\nuser-data"
    );
}

// T38
#[tokio::test(flavor = "multi_thread")]
async fn the_identity_document_is_ec2s_json() {
    let d = Daemon::start(ROLE).await;
    let body = get_text(d.addr, "/latest/dynamic/instance-identity/document");
    let doc = json_object(&body);
    assert_eq!(
        keys(&doc),
        [
            "accountId",
            "architecture",
            "availabilityZone",
            "billingProducts",
            "devpayProductCodes",
            "marketplaceProductCodes",
            "imageId",
            "instanceId",
            "instanceType",
            "kernelId",
            "pendingTime",
            "privateIp",
            "ramdiskId",
            "region",
            "version"
        ]
    );
    assert_eq!(body, imds_style(&doc), "not in IMDS layout");
    assert_eq!(str_field(&doc, "version"), "2017-09-30");
    let account = str_field(&doc, "accountId");
    assert!(account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()));
    assert!(["x86_64", "arm64", "i386"].contains(&str_field(&doc, "architecture")));
    let pending = str_field(&doc, "pendingTime");
    assert!(is_imds_timestamp(pending), "{pending:?}");
    assert!(parse_time(pending) <= SystemTime::now() + Duration::from_secs(5));
    // Go decodes these into []string and string pointers.
    for key in [
        "billingProducts",
        "devpayProductCodes",
        "marketplaceProductCodes",
    ] {
        let v = &doc[key];
        let ok = v.is_null()
            || v.as_array()
                .is_some_and(|a| a.iter().all(|x| x.is_string()));
        assert!(ok, "{key} = {v}");
    }
    for key in ["kernelId", "ramdiskId"] {
        assert!(doc[key].is_null() || doc[key].is_string(), "{key}");
    }
    let region = str_field(&doc, "region");
    let az = str_field(&doc, "availabilityZone");
    assert!(!region.is_empty());
    assert_eq!(region, &az[..az.len() - 1]);
    assert_eq!(region, get_text(d.addr, &format!("{MD}/placement/region")));
    assert_eq!(
        az,
        get_text(d.addr, &format!("{MD}/placement/availability-zone"))
    );
}

// T39, T40
#[tokio::test(flavor = "multi_thread")]
async fn identity_signatures_are_base64_without_armour() {
    let d = Daemon::start(ROLE).await;
    assert_eq!(
        get_text(d.addr, "/latest/dynamic/"),
        "fws/\ninstance-identity/"
    );
    assert_eq!(
        get_text(d.addr, "/latest/dynamic/instance-identity/"),
        "document\npkcs7\nrsa2048\nsignature"
    );
    let monitoring = get_text(d.addr, "/latest/dynamic/fws/instance-monitoring");
    assert!(
        ["enabled", "disabled"].contains(&monitoring.as_str()),
        "{monitoring:?}"
    );
    for leaf in ["signature", "pkcs7", "rsa2048"] {
        let text = get_text(d.addr, &format!("/latest/dynamic/instance-identity/{leaf}"));
        assert!(
            !text.contains("BEGIN") && !text.contains("END"),
            "{leaf} has PEM armour"
        );
        assert!(!text.ends_with('\n'), "{leaf} ends with LF");
        assert!(
            text.split('\n').all(|l| !l.is_empty() && l.len() <= 76),
            "{leaf}"
        );
        let joined: String = text.split('\n').collect();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&joined)
            .unwrap_or_else(|e| panic!("{leaf} is not base64: {e}"));
        assert!(
            decoded.len() >= 64,
            "{leaf} is only {} bytes",
            decoded.len()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3 IAM
// ---------------------------------------------------------------------------------------------

// T42, T43, T44, T47, T50
#[tokio::test(flavor = "multi_thread")]
async fn the_iam_subtree_names_the_role_without_a_newline() {
    let d = Daemon::start(ROLE).await;
    let tok = token(d.addr, 21600);
    for path in [format!("{MD}/iam/"), format!("{MD}/iam")] {
        assert_eq!(
            get_text(d.addr, &path),
            "info\nsecurity-credentials/",
            "{path}"
        );
    }
    for path in [
        format!("{MD}/iam/security-credentials/"),
        format!("{MD}/iam/security-credentials"),
    ] {
        for r in [get(d.addr, &path), get_with(d.addr, &path, &tok)] {
            assert_eq!(ok_text(&r, &path), "test-role", "{path}");
            assert_eq!(r.header("Content-Length"), Some("9"), "{path}");
        }
    }
    for path in [
        format!("{MD}/iam/security-credentials/wrong-role"),
        format!("{MD}/iam/security-credentials/test-role/extra"),
        format!("{MD}/iam/security-credentials/TEST-ROLE"),
        format!("{MD}/iam/security-credentials-extended/"),
        format!("{MD}/iam/security-credentials-extended"),
        format!("{MD}/iam/security-credentials-extended/test-role"),
        format!("{MD}/iam/no-such-thing"),
    ] {
        assert_page(&get(d.addr, &path), StatusCode::NOT_FOUND, &path);
        let r = get_with(d.addr, &path, &tok);
        assert_page(&r, StatusCode::NOT_FOUND, &path);
        assert!(r.header(TTL).is_some(), "{path}");
    }
}

// T45, T46 (the parts that need no waiting; the 2-hour sampling is a broker unit test)
#[tokio::test(flavor = "multi_thread")]
async fn credentials_are_ec2s_document_byte_for_byte() {
    let d = Daemon::start(ROLE).await;
    let tok = token(d.addr, 21600);

    let r = get_with(d.addr, CREDS, &tok);
    let body = ok_text(&r, "credentials with a token");
    assert!(r.header(TTL).is_some());
    let modified = r.header("Last-Modified").expect("Last-Modified");
    httpdate::parse_http_date(modified).expect("Last-Modified is an HTTP date");
    assert!(body.starts_with("{\n") && body.ends_with("\n}"), "{body}");

    let doc = json_object(&body);
    assert_eq!(
        keys(&doc),
        [
            "Code",
            "LastUpdated",
            "Type",
            "AccessKeyId",
            "SecretAccessKey",
            "Token",
            "Expiration"
        ]
    );
    assert!(doc.values().all(serde_json::Value::is_string), "{body}");
    let expected = format!(
        "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"{}\",\n  \"Type\" : \"AWS-HMAC\",\n  \
         \"AccessKeyId\" : \"{}\",\n  \"SecretAccessKey\" : \"{}\",\n  \"Token\" : \"{}\",\n  \
         \"Expiration\" : \"{}\"\n}}",
        str_field(&doc, "LastUpdated"),
        str_field(&doc, "AccessKeyId"),
        str_field(&doc, "SecretAccessKey"),
        str_field(&doc, "Token"),
        str_field(&doc, "Expiration"),
    );
    assert_eq!(body, expected, "not EC2's layout");
    assert_eq!(str_field(&doc, "Code"), "Success");
    assert_eq!(str_field(&doc, "Type"), "AWS-HMAC");
    let akid = str_field(&doc, "AccessKeyId");
    assert!(akid.starts_with("ASIA") && akid.len() == 20, "{akid}");
    assert_eq!(str_field(&doc, "SecretAccessKey").len(), 40);
    assert!(!str_field(&doc, "Token").is_empty());

    let last_updated = str_field(&doc, "LastUpdated");
    let expiration = str_field(&doc, "Expiration");
    assert!(is_imds_timestamp(last_updated), "{last_updated:?}");
    assert!(is_imds_timestamp(expiration), "{expiration:?}");
    let (updated, expires) = (parse_time(last_updated), parse_time(expiration));
    let now = SystemTime::now();
    assert!(
        expires > updated,
        "{expiration} is not after {last_updated}"
    );
    assert!(
        updated <= now + Duration::from_secs(5),
        "{last_updated} is in the future"
    );
    let left = expires.duration_since(now).unwrap_or_default();
    assert!(left >= Duration::from_secs(30 * 60), "only {left:?} left");

    // The same credentials again, with and without a token: LastUpdated moves only on rotation.
    for again in [get_with(d.addr, CREDS, &tok), get(d.addr, CREDS)] {
        assert_eq!(ok_text(&again, "credentials again"), body);
    }
}

// T49, T52
#[tokio::test(flavor = "multi_thread")]
async fn iam_info_and_identity_credentials_info_are_imds_json() {
    let d = Daemon::start(ROLE).await;
    let account = str_field(
        &json_object(&get_text(
            d.addr,
            "/latest/dynamic/instance-identity/document",
        )),
        "accountId",
    )
    .to_string();

    let body = get_text(d.addr, &format!("{MD}/iam/info"));
    let info = json_object(&body);
    assert_eq!(
        keys(&info),
        [
            "Code",
            "LastUpdated",
            "InstanceProfileArn",
            "InstanceProfileId"
        ]
    );
    assert_eq!(body, imds_style(&info));
    // Go's GetIAMInfo wants Code "success" in any case and an RFC 3339 LastUpdated.
    assert_eq!(str_field(&info, "Code"), "Success");
    assert!(is_imds_timestamp(str_field(&info, "LastUpdated")));
    assert_eq!(
        str_field(&info, "InstanceProfileArn"),
        format!("arn:aws:iam::{account}:instance-profile/test-role")
    );
    let id = str_field(&info, "InstanceProfileId");
    assert!(id.starts_with("AIPA") && id.len() == 21, "{id}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()),
        "{id}"
    );

    assert_eq!(
        get_text(d.addr, &format!("{MD}/identity-credentials/ec2/")),
        "info"
    );
    let body = get_text(d.addr, &format!("{MD}/identity-credentials/ec2/info"));
    let info = json_object(&body);
    assert_eq!(keys(&info), ["Code", "LastUpdated", "AccountId"]);
    assert_eq!(body, imds_style(&info));
    assert_eq!(str_field(&info, "Code"), "Success");
    assert!(is_imds_timestamp(str_field(&info, "LastUpdated")));
    assert_eq!(str_field(&info, "AccountId"), account);
    // The daemon cannot mint instance-identity credentials: a clean 404.
    let path = format!("{MD}/identity-credentials/ec2/security-credentials/ec2-instance");
    assert_page(&get(d.addr, &path), StatusCode::NOT_FOUND, &path);
}

// T48
#[tokio::test(flavor = "multi_thread")]
async fn a_caller_without_a_role_sees_no_iam() {
    let d = Daemon::start(&["--fake-credentials"]).await;
    let listing = get_text(d.addr, &format!("{MD}/"));
    assert!(
        !listing.split('\n').any(|e| e.starts_with("iam")),
        "{listing}"
    );
    assert!(listing.split('\n').any(|e| e == "instance-id"), "{listing}");
    assert!(
        !listing.ends_with('\n') && !listing.contains("\n\n"),
        "{listing:?}"
    );
    let tok = token(d.addr, 21600);
    for path in [
        format!("{MD}/iam/"),
        format!("{MD}/iam"),
        format!("{MD}/iam/security-credentials/"),
        format!("{MD}/iam/security-credentials"),
        format!("{MD}/iam/info"),
        CREDS.to_string(),
    ] {
        assert_page(&get(d.addr, &path), StatusCode::NOT_FOUND, &path);
        let r = get_with(d.addr, &path, &tok);
        assert_page(&r, StatusCode::NOT_FOUND, &path);
        assert!(r.header(TTL).is_some(), "{path}");
    }
    // The rest of the tree is unaffected.
    assert!(get_text(d.addr, &format!("{MD}/instance-id")).starts_with("i-"));
}

// ---------------------------------------------------------------------------------------------
// 4 Other leaves
// ---------------------------------------------------------------------------------------------

// T53
#[tokio::test(flavor = "multi_thread")]
async fn spot_and_rebalance_notices_appear_only_when_configured() {
    let d = Daemon::start(ROLE).await;
    for leaf in [
        "spot/instance-action",
        "spot/termination-time",
        "events/recommendations/rebalance",
    ] {
        let path = format!("{MD}/{leaf}");
        assert_page(&get(d.addr, &path), StatusCode::NOT_FOUND, &path);
    }

    let (d, _config) = start_with_config(
        &[],
        "[instance]\n\
         spot_instance_action = { action = \"terminate\", time = \"2030-01-01T00:00:00Z\" }\n\
         rebalance_notice_time = \"2030-01-01T00:00:00Z\"\n",
    )
    .await;
    assert_eq!(
        get_text(d.addr, &format!("{MD}/spot/instance-action")),
        "{\"action\": \"terminate\", \"time\": \"2030-01-01T00:00:00Z\"}"
    );
    assert_eq!(
        get_text(d.addr, &format!("{MD}/spot/termination-time")),
        "2030-01-01T00:00:00Z"
    );
    assert_eq!(
        get_text(d.addr, &format!("{MD}/spot/")),
        "instance-action\ntermination-time"
    );
    assert_eq!(
        get_text(d.addr, &format!("{MD}/events/recommendations/rebalance")),
        "{\"noticeTime\": \"2030-01-01T00:00:00Z\"}"
    );
    let listing = get_text(d.addr, &format!("{MD}/"));
    assert!(listing.split('\n').any(|e| e == "spot/"), "{listing}");
}

// T54
#[tokio::test(flavor = "multi_thread")]
async fn instance_tags_are_served_only_when_enabled() {
    let tags =
        "tags = { Name = \"web-1\", Env = \"test\", \"team:owner\" = \"ops@example.com\" }\n";

    let (off, _c1) = start_with_config(&[], &format!("[instance]\n{tags}")).await;
    for path in [
        format!("{MD}/tags/"),
        format!("{MD}/tags/instance"),
        format!("{MD}/tags/instance/Name"),
    ] {
        assert_page(&get(off.addr, &path), StatusCode::NOT_FOUND, &path);
    }
    let listing = get_text(off.addr, &format!("{MD}/"));
    assert!(!listing.split('\n').any(|e| e == "tags/"), "{listing}");

    let (on, _c2) =
        start_with_config(&[], &format!("[instance]\ntags_in_metadata = true\n{tags}")).await;
    let listing = get_text(on.addr, &format!("{MD}/"));
    assert!(listing.split('\n').any(|e| e == "tags/"), "{listing}");
    assert_eq!(get_text(on.addr, &format!("{MD}/tags/")), "instance/");
    for path in [
        format!("{MD}/tags/instance"),
        format!("{MD}/tags/instance/"),
    ] {
        assert_eq!(get_text(on.addr, &path), "Env\nName\nteam:owner", "{path}");
    }
    assert_eq!(
        get_text(on.addr, &format!("{MD}/tags/instance/Name")),
        "web-1"
    );
    assert_eq!(
        get_text(on.addr, &format!("{MD}/tags/instance/Env")),
        "test"
    );
    assert_eq!(
        get_text(on.addr, &format!("{MD}/tags/instance/team:owner")),
        "ops@example.com"
    );
    assert_eq!(
        get_text(on.addr, &format!("{MD}/tags/instance/team%3Aowner")),
        "ops@example.com"
    );
    let path = format!("{MD}/tags/instance/Missing");
    assert_page(&get(on.addr, &path), StatusCode::NOT_FOUND, &path);
}

// ---------------------------------------------------------------------------------------------
// Guard and bad input
// ---------------------------------------------------------------------------------------------

/// Everything the tree can hold, so the walk sees every kind of node.
const FULL_INSTANCE: &str = r##"[instance]
public_ipv4 = "203.0.113.25"
ipv6 = "2600:1f18:abcd:1200::10"
user_data = "#!/bin/sh\necho hello"
tags_in_metadata = true
tags = { Name = "web-1", Env = "test" }
public_keys = [
  { name = "my-key", openssh_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq my-key" },
  { name = "other", openssh_key = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC other" },
]
security_groups = [
  { name = "default", id = "sg-0f3b8d2a6c1e94570" },
  { name = "web", id = "sg-0a1b2c3d4e5f60718" },
]
spot_instance_action = { action = "terminate", time = "2030-01-01T00:00:00Z" }
rebalance_notice_time = "2030-01-01T00:00:00Z"
autoscaling_target_lifecycle_state = "InService"
"##;

// T62, T41, T28 (slash-optional everywhere)
#[tokio::test(flavor = "multi_thread")]
async fn walking_the_whole_tree_finds_no_trailing_newline_and_no_dead_entry() {
    let (d, _config) = start_with_config(&[], FULL_INSTANCE).await;
    let addr = d.addr;
    tokio::task::spawn_blocking(move || {
        let tok = token(addr, 21600);
        assert!(!tok.ends_with('\n'));
        let mut queue: VecDeque<(String, bool)> = VecDeque::from([("/latest/".to_string(), true)]);
        let mut seen = HashSet::new();
        let mut leaves = 0;
        while let Some((path, is_dir)) = queue.pop_front() {
            assert!(seen.insert(path.clone()), "{path} listed twice");
            assert!(seen.len() <= 400, "the walk does not end");
            let r = get_with(addr, &path, &tok);
            assert_eq!(r.status, 200, "{path} is listed but answers {r:?}");
            assert!(r.header(TTL).is_some(), "{path}");
            // The other spelling (with or without the final slash) answers the same.
            let other = match path.strip_suffix('/') {
                Some(p) => p.to_string(),
                None => format!("{path}/"),
            };
            let o = get_with(addr, &other, &tok);
            assert_eq!(
                (o.status, &o.body),
                (200, &r.body),
                "{other} differs from {path}"
            );
            // IMDSv1 sees the same bytes, without the TTL header.
            let v1 = get(addr, &path);
            assert_eq!(
                (v1.status, &v1.body),
                (200, &r.body),
                "{path} without a token"
            );
            assert_eq!(v1.header(TTL), None, "{path} without a token");
            assert_eq!(r.header("Accept-Ranges"), Some("none"), "{path}");
            let modified = r.header("Last-Modified").unwrap_or_default();
            httpdate::parse_http_date(modified)
                .unwrap_or_else(|e| panic!("{path}: Last-Modified {modified:?}: {e}"));

            if path == "/latest/user-data" {
                assert_eq!(r.header("Content-Type"), Some("application/octet-stream"));
                leaves += 1;
                continue;
            }
            assert_eq!(r.header("Content-Type"), Some("text/plain"), "{path}");
            let text =
                String::from_utf8(r.body.clone()).unwrap_or_else(|_| panic!("{path} is not UTF-8"));
            assert!(!text.ends_with('\n'), "{path} ends with LF: {text:?}");
            assert!(!text.ends_with('\r'), "{path} ends with CR: {text:?}");
            if !is_dir {
                leaves += 1;
                continue;
            }
            if text.is_empty() {
                continue;
            }
            let entries: Vec<&str> = text.split('\n').collect();
            let distinct: HashSet<&&str> = entries.iter().collect();
            assert_eq!(distinct.len(), entries.len(), "{path} repeats an entry");
            for entry in entries {
                assert!(
                    !entry.is_empty() && entry.trim() == entry,
                    "{path}: {entry:?}"
                );
                let child = if path == "/latest/" && entry != "user-data" {
                    // The version root lists categories without a slash, as EC2 does.
                    (format!("{path}{entry}/"), true)
                } else if entry.ends_with('/') {
                    (format!("{path}{entry}"), true)
                } else if path.ends_with("/public-keys/") {
                    // `0=my-key` stands for the directory `0/`.
                    let (index, name) = entry
                        .split_once('=')
                        .expect("public-keys entries are n=name");
                    assert!(index.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty());
                    (format!("{path}{index}/"), true)
                } else {
                    (format!("{path}{entry}"), false)
                };
                queue.push_back(child);
            }
        }
        // The configured extras were all reached.
        for must in [
            "/latest/user-data",
            "/latest/meta-data/public-keys/1/openssh-key",
            "/latest/meta-data/tags/instance/Name",
            "/latest/meta-data/spot/instance-action",
            "/latest/meta-data/events/recommendations/rebalance",
            "/latest/meta-data/autoscaling/target-lifecycle-state",
            "/latest/meta-data/public-ipv4",
            "/latest/meta-data/ipv6",
            "/latest/meta-data/iam/security-credentials/test-role",
            "/latest/meta-data/iam/info",
            "/latest/dynamic/instance-identity/document",
        ] {
            assert!(seen.contains(must), "the walk never reached {must}");
        }
        assert!(leaves >= 40, "only {leaves} leaves");
    })
    .await
    .expect("the walk");
}

// Bad input: unknown methods; T10 for metadata paths.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_methods_get_405_with_the_metadata_allow_list() {
    let d = Daemon::start(ROLE).await;
    for method in ["FOO", "POST", "PUT", "DELETE", "PATCH"] {
        for path in ["/", "/latest/", "/latest/meta-data/instance-id", CREDS] {
            let what = format!("{method} {path}");
            let r = send(d.addr, method, path, &[]);
            assert_page(&r, StatusCode::METHOD_NOT_ALLOWED, &what);
            assert_eq!(r.reason, "Not Allowed", "{what}");
            assert_eq!(r.header("Allow"), Some("OPTIONS, GET, HEAD"), "{what}");
        }
    }
    let r = send(d.addr, "OPTIONS", "/latest/meta-data/", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("Allow"), Some("OPTIONS, GET, HEAD"));
    assert!(r.body.is_empty());
    assert_still_serving(d.addr, "unknown methods");
}

// Bad input: paths that do not decode or that climb.
#[tokio::test(flavor = "multi_thread")]
async fn undecodable_or_climbing_paths_get_400() {
    let d = Daemon::start(ROLE).await;
    for path in [
        "/latest/meta-data/%ff",
        "/latest/%ff/instance-id",
        "/latest/meta-data/../user-data",
        "/latest/meta-data/./instance-id",
        "/../latest/meta-data/instance-id",
        "/latest/%2e%2e/meta-data",
        "/latest/meta-data/a%2fb",
        "/latest/meta-data/a%00b",
        "/latest/meta-data/a%0d%0ab",
    ] {
        let r = get(d.addr, path);
        assert_page(&r, StatusCode::BAD_REQUEST, &format!("GET {path}"));
        assert_still_serving(d.addr, path);
    }
    // Percent-encoding of ordinary characters is decoded, not refused.
    assert!(get_text(d.addr, "/latest/meta-data/instance%2Did").starts_with("i-"));
}

// Bad input: oversized and malformed requests.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_or_malformed_request_is_refused_and_the_daemon_keeps_serving() {
    let d = Daemon::start(ROLE).await;

    let big = format!(
        "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let r = send_hostile(d.addr, big.as_bytes()).expect("an answer to a 20 KB header");
    assert_eq!(r.header("Connection"), Some("close"), "{r:?}");
    assert!(r.header("Date").is_some(), "{r:?}");
    assert!(
        (400..500).contains(&r.status),
        "a 20 KB header got {}: {r:?}",
        r.status
    );
    assert_eq!(r.status, 431, "{r:?}");
    assert_still_serving(d.addr, "a 20 KB header");

    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let request = format!("GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    if let Some(r) = send_hostile(d.addr, request.as_bytes()) {
        assert!(
            r.status == 200 || (400..500).contains(&r.status),
            "200 headers got {r:?}"
        );
    }
    assert_still_serving(d.addr, "200 headers");

    for junk in [
        &b"\x00\x01\x02 garbage\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"GET /latest/meta-data/instance-id HTTP/9.9\r\n\r\n",
        b"GET /latest/meta-data/instance-id HTTP/1.1\r\nBad Header\r\n\r\n",
    ] {
        let what = String::from_utf8_lossy(junk).into_owned();
        if let Some(r) = send_hostile(d.addr, junk) {
            assert!((400..500).contains(&r.status), "{what:?} got {r:?}");
            assert_eq!(r.header("Connection"), Some("close"), "{what:?}: {r:?}");
        }
        assert_still_serving(d.addr, &what);
    }

    // A client that never finishes its request head does not hold up anyone else.
    let mut slow = TcpStream::connect(d.addr).expect("connect");
    slow.write_all(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n")
        .expect("write a partial head");
    assert_still_serving(d.addr, "a partial request head");
    drop(slow);
}

// ---------------------------------------------------------------------------------------------
// The Host rule (DNS rebinding) and duplicate TTLs
// ---------------------------------------------------------------------------------------------

/// [`common::raw_with_hosts`], checked like every other answer.
fn send_hosts(
    addr: SocketAddr,
    method: &str,
    target: &str,
    hosts: &[&str],
    headers: &[(&str, &str)],
) -> RawResponse {
    let r = common::raw_with_hosts(addr, method, target, hosts, headers);
    assert_ec2_headers(&r, &format!("{method} {target} with Host {hosts:?}"));
    r
}

/// The credentials document's secrets, to look for where they must not be.
fn secrets_of(d: &Daemon) -> Vec<String> {
    let doc = json_object(&get_text(d.addr, CREDS));
    ["AccessKeyId", "SecretAccessKey", "Token"]
        .iter()
        .map(|k| str_field(&doc, k).to_string())
        .collect()
}

/// The README's first command, then what a rebinding page would send: its own name as `Host`.
#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_host_gets_403_and_neither_credentials_nor_a_token() {
    let d = Daemon::start(ROLE).await;
    let secrets = secrets_of(&d);
    let tok = token(d.addr, 21600);
    for host in [
        "attacker.example.com",
        "attacker.example.com:8169",
        "127.0.0.1.nip.io",
        "169.254.169.254.nip.io",
        // Numeric forms that are not dotted quads: browsers send the dotted quad instead.
        "0x7f.1",
        "2130706433",
        "127.1",
        // IPv6 without brackets is no valid Host.
        "fd00:ec2::254",
        "localhost.attacker.example.com",
    ] {
        for (method, path, headers) in [
            ("GET", CREDS, vec![]),
            ("GET", CREDS, vec![(TOKEN, tok.as_str())]),
            ("GET", "/latest/meta-data/iam/security-credentials/", vec![]),
            ("PUT", "/latest/api/token", vec![(TTL, "21600")]),
        ] {
            let what = format!("{method} {path} with Host {host}");
            let r = send_hosts(d.addr, method, path, &[host], &headers);
            assert_page(&r, StatusCode::FORBIDDEN, &what);
            assert_eq!(r.header(TTL), None, "{what}: looks like a token answer");
            for secret in &secrets {
                assert!(!r.text().contains(secret.as_str()), "{what}: a secret");
            }
        }
    }
    // An absolute-form target names its host too, whatever the Host header says.
    let r = send_hosts(
        d.addr,
        "GET",
        &format!("http://attacker.example.com{CREDS}"),
        &["169.254.169.254"],
        &[],
    );
    assert_page(&r, StatusCode::FORBIDDEN, "absolute-form target by name");
    assert_eq!(
        d.metrics.refused_for(
            imdsd::metrics::LISTENER_METADATA,
            imdsd::metrics::REFUSED_HOST
        ),
        9 * 4 + 1
    );
    assert_eq!(secrets_of(&d), secrets, "the caller is still served");
}

#[tokio::test(flavor = "multi_thread")]
async fn addresses_localhost_and_ec2s_names_are_served_in_every_form() {
    let d = Daemon::start(ROLE).await;
    let expected = get_text(d.addr, CREDS);
    let port = d.addr.port().to_string();
    let with_port = |h: &str| format!("{h}:{port}");
    let hosts = [
        "169.254.169.254".to_string(),
        "169.254.169.254:80".into(),
        with_port("127.0.0.1"),
        "127.0.0.1:80".into(),
        "[::1]:8169".into(),
        "[fd00:ec2::254]".into(),
        "[fd00:ec2::254]:80".into(),
        "localhost".into(),
        with_port("localhost"),
        "LOCALHOST.".into(),
        "instance-data".into(),
        "instance-data.ec2.internal:80".into(),
        "Instance-Data.EC2.Internal.".into(),
        // An empty Host: nothing a page could have chosen.
        String::new(),
    ];
    for host in &hosts {
        let r = send_hosts(d.addr, "GET", CREDS, &[host], &[]);
        assert_eq!(
            ok_text(&r, &format!("Host {host:?}")),
            expected,
            "Host {host:?}"
        );
        let r = send_hosts(d.addr, "PUT", "/latest/api/token", &[host], &[(TTL, "60")]);
        assert_eq!(r.status, 200, "token PUT with Host {host:?}: {r:?}");
        assert_eq!(r.body.len(), 56);
    }
    // No Host at all (HTTP/1.1 without one, and HTTP/1.0, which has none).
    let r = send_hosts(d.addr, "GET", CREDS, &[], &[]);
    assert_eq!(ok_text(&r, "no Host"), expected);
    let mut old = TcpStream::connect(d.addr).expect("connect");
    old.write_all(format!("GET {CREDS} HTTP/1.0\r\n\r\n").as_bytes())
        .expect("write");
    let mut answer = Vec::new();
    old.read_to_end(&mut answer).expect("read");
    let answer = String::from_utf8(answer).expect("text");
    assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with(&expected), "{answer}");
    // Absolute form, as a client sends through a proxy.
    let r = send_hosts(
        d.addr,
        "GET",
        &format!("http://169.254.169.254{CREDS}"),
        &["169.254.169.254"],
        &[],
    );
    assert_eq!(ok_text(&r, "absolute-form target"), expected);
    assert_eq!(
        d.metrics.refused_for(
            imdsd::metrics::LISTENER_METADATA,
            imdsd::metrics::REFUSED_HOST
        ),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_host_headers_get_400() {
    let d = Daemon::start(ROLE).await;
    for hosts in [
        ["169.254.169.254", "169.254.169.254"],
        ["attacker.example.com", "127.0.0.1"],
        ["127.0.0.1", "attacker.example.com"],
    ] {
        let r = send_hosts(d.addr, "GET", CREDS, &hosts, &[]);
        assert_page(&r, StatusCode::BAD_REQUEST, &format!("Hosts {hosts:?}"));
        assert!(!r.text().contains("AccessKeyId"));
        let r = send_hosts(d.addr, "PUT", "/latest/api/token", &hosts, &[(TTL, "60")]);
        assert_page(
            &r,
            StatusCode::BAD_REQUEST,
            &format!("PUT, Hosts {hosts:?}"),
        );
        assert_eq!(r.header(TTL), None);
    }
    assert_still_serving(d.addr, "two Host headers");
}

#[tokio::test(flavor = "multi_thread")]
async fn allowed_host_lets_the_operators_name_through_and_no_other() {
    let d = Daemon::start(&[
        "--fake-credentials",
        "--allowed-host",
        "imdsd",
        "--allowed-host",
        "metadata.internal",
        "test-role",
    ])
    .await;
    let expected = get_text(d.addr, CREDS);
    for host in ["imdsd", "imdsd:80", "IMDSD.", "metadata.internal:8169"] {
        let r = send_hosts(d.addr, "GET", CREDS, &[host], &[]);
        assert_eq!(ok_text(&r, host), expected, "Host {host}");
    }
    for host in ["imdsd2", "imdsd.attacker.example.com", "internal"] {
        let r = send_hosts(d.addr, "GET", CREDS, &[host], &[]);
        assert_page(&r, StatusCode::FORBIDDEN, host);
    }
    // Without the flag, the same name is refused.
    let plain = Daemon::start(ROLE).await;
    let r = send_hosts(plain.addr, "GET", CREDS, &["imdsd"], &[]);
    assert_page(&r, StatusCode::FORBIDDEN, "imdsd without --allowed-host");
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_ttl_headers_get_400_and_no_token() {
    let d = Daemon::start(ROLE).await;
    for headers in [
        vec![(TTL, "21600"), (TTL, "21600")],
        vec![(TTL, "60"), (TTL, "21600")],
        vec![(TTL, "21600, 21600")],
        vec![(TTL, "21600,60")],
    ] {
        let r = put_token(d.addr, &headers);
        assert_page(
            &r,
            StatusCode::BAD_REQUEST,
            &format!("PUT with {headers:?}"),
        );
        assert_eq!(r.header(TTL), None, "{headers:?}");
    }
    assert_eq!(token(d.addr, 21600).len(), 56, "one TTL still works");
}
