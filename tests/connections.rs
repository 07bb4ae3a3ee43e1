//! Descriptors and connections (issue 15, item 3): the daemon binary raises its soft descriptor
//! limit, and under a low hard limit a flood of idle connections from one caller neither makes
//! `accept` fail nor keeps another caller from being served.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::{Process, daemon_command, raw, raw_from};
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpSocket, TcpStream};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/app";

/// `sh -c '<limit>; exec imdsd …'`: the daemon started with a descriptor limit set by the shell.
fn limited(limit: &str, args: &[&str]) -> Process {
    let script = format!("{limit} && exec \"$@\"");
    let mut full = vec!["--log-format", "json"];
    full.extend_from_slice(args);
    Process::start(daemon_command(&["sh", "-c", &script, "sh"], &full, &[]))
}

/// The daemon's descriptor limits, from /proc: (soft, hard).
fn limits_of(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let mut figures = line["Max open files".len()..].split_whitespace();
    (
        figures.next().expect("soft").to_string(),
        figures.next().expect("hard").to_string(),
    )
}

#[test]
fn the_daemon_raises_its_soft_descriptor_limit_to_the_hard_one_and_logs_both() {
    let state = tempfile::tempdir().expect("tempdir");
    let state = state.path().to_str().expect("utf8");
    let p = limited(
        "ulimit -Sn 256",
        &[
            "--fake-credentials",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state,
            "app",
        ],
    );
    p.addr();
    let (soft, hard) = limits_of(p.child.id());
    assert_eq!(soft, hard, "the soft limit was raised to the hard one");
    let log = p.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("RLIMIT_NOFILE"))
        .unwrap_or_else(|| panic!("no line about the limit:\n{log}"));
    let v: serde_json::Value = serde_json::from_str(line).expect("JSON");
    assert_eq!(v["level"], "INFO", "{line}");
    assert_eq!(v["soft_before"], "256", "{line}");
    assert_eq!(v["soft"], hard.as_str(), "{line}");
    assert_eq!(v["hard"], hard.as_str(), "{line}");
}

/// Opens a connection from `source` and sends nothing: idle from the start, as a client that
/// opens connections and waits (until the header read timeout) does.
async fn idle_connection(source: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(source, 0))
        .expect("bind the client to its source address");
    tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
        .await
        .expect("the daemon's backlog takes the connection")
        .expect("connect")
}

/// Whether the daemon closed `c` (end of stream or reset) within 10 s.
async fn closed_by_daemon(c: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_idle_connections_under_a_low_descriptor_limit_starves_no_other_caller() {
    const LIMIT: usize = 256;
    const FLOOD: usize = 2 * LIMIT;
    let state = tempfile::tempdir().expect("tempdir");
    let state = state.path().to_str().expect("utf8");
    let p = limited(
        &format!("ulimit -n {LIMIT}"),
        &[
            "--fake-credentials",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state,
            "app",
        ],
    );
    let addr = p.addr();
    assert_eq!(
        limits_of(p.child.id()),
        (LIMIT.to_string(), LIMIT.to_string())
    );
    let admin = p.admin_addr().expect("admin API");
    let flooder: IpAddr = "127.0.0.2".parse().expect("ip");
    let other: IpAddr = "127.0.0.1".parse().expect("ip");

    // Twice as many idle connections from one address as the daemon has descriptors, with
    // another caller asking for credentials along the way.
    let mut flood = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        flood.push(idle_connection(flooder, addr).await);
        if i % 64 == 63 {
            let r = raw_from(other, addr, "GET", CREDS, &[]).await;
            assert_eq!(r.status, 200, "after {} flood connections: {r:?}", i + 1);
            assert!(r.text().contains("\"Code\" : \"Success\""), "{r:?}");
        }
    }
    let r = raw_from(other, addr, "GET", CREDS, &[]).await;
    assert_eq!(r.status, 200, "{r:?}");

    // The flooder's oldest connections made room; its newest are still served.
    for (i, c) in flood.iter_mut().take(16).enumerate() {
        assert!(
            closed_by_daemon(c).await,
            "flood connection {i} is still open"
        );
    }
    let newest = flood.last_mut().expect("flood");
    use tokio::io::AsyncWriteExt as _;
    newest
        .write_all(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), newest.read_to_end(&mut answer))
        .await
        .expect("answered within 10 s")
        .expect("read");
    assert!(
        answer.starts_with(b"HTTP/1.1 200 OK"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    let metrics = raw(admin, "GET", "/metrics", &[]).text();
    let closed: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("imdsd_connections_closed_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        closed >= (FLOOD - LIMIT) as f64,
        "{closed} closed to make room:\n{metrics}"
    );
    assert!(metrics.contains("imdsd_open_connections "), "{metrics}");

    let log = p.log_text();
    assert!(!log.contains("Too many open files"), "{log}");
    assert!(!log.contains("accept failed"), "{log}");
    assert!(
        log.contains("max_connections") && log.contains("lowered to fit the open-file limit"),
        "the cap was lowered to fit 256 descriptors:\n{log}"
    );
    // The flood is logged, but not line by line.
    let limit_lines = log
        .lines()
        .filter(|l| l.contains("connection limit reached"))
        .count();
    assert!(
        (1..=20).contains(&limit_lines),
        "{limit_lines} lines about the limit:\n{log}"
    );
}

#[test]
fn a_connection_cap_of_zero_is_a_configuration_error() {
    let (code, stderr) = common::run_to_exit(
        &[
            "--fake-credentials",
            "--listen",
            "127.0.0.1:0",
            "--max-connections",
            "0",
            "app",
        ],
        &[("IMDSD_MAX_CONNECTIONS_PER_CALLER", "0")],
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("--max-connections: \"0\""), "{stderr}");
    assert!(
        stderr.contains("IMDSD_MAX_CONNECTIONS_PER_CALLER: \"0\""),
        "{stderr}"
    );
}
