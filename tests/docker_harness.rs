//! Smoke tests of the Docker end-to-end harness (tests/support/docker.rs) itself: the image of the
//! binary under test builds and runs, containers on a test network reach a listener the host
//! binds on the network's gateway (with their own source address, which the daemon relies on to
//! tell containers apart), and nothing the harness creates outlives a test, even a panicking one
//! or a killed test process.
//!
//! The in-container client is mostly busybox (`wget`) from the test image, so that a broken
//! `imdsd probe` fails one test here, not all of them.
//!
//! They need a running Docker Engine and fail without one.

#[path = "support/docker.rs"]
mod docker;

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use docker::{RunOpts, TestContainer, TestNetwork};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts one connection on `listener` (within `TIMEOUT`), answers it with a small HTTP
/// response, and yields the peer address and the request head.
fn serve_once(listener: TcpListener) -> JoinHandle<(SocketAddr, String)> {
    std::thread::spawn(move || {
        listener.set_nonblocking(true).expect("nonblocking");
        let deadline = Instant::now() + TIMEOUT;
        let (mut stream, peer) = loop {
            match listener.accept() {
                Ok(accepted) => break accepted,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "no connection within {TIMEOUT:?}"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).expect("blocking");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).expect("read request");
            assert!(n > 0, "connection closed mid-request");
            head.extend_from_slice(&buf[..n]);
        }
        let body = "hello from the host\n";
        write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("write response");
        (peer, String::from_utf8_lossy(&head).into_owned())
    })
}

/// `busybox wget` of `url`, printing the body to stdout. (No `-T`: Debian bookworm's
/// busybox-static 1.35 wget segfaults with it; `wait_exit`'s timeout bounds the run instead.)
fn wget(url: &str) -> Vec<String> {
    ["wget", "-q", "-O", "-", url]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn the_image_runs_the_binary_under_test() {
    let opts = RunOpts {
        name: "version".into(),
        network: "none".into(),
        image: docker::test_image(),
        args: vec!["--version".into()],
        ..RunOpts::default()
    };
    let (code, logs) = docker::run_to_completion(&opts, TIMEOUT);
    assert_eq!(code, 0, "imdsd --version in the image failed:\n{logs}");
    assert_eq!(logs.trim(), format!("imdsd {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn a_container_at_a_fixed_address_reaches_a_listener_on_the_gateway() {
    let net = TestNetwork::create("fixed");
    assert!(net.subnet.starts_with("169.254."), "{}", net.subnet);
    assert!(!net.subnet.starts_with("169.254.169."), "{}", net.subnet);
    // Bound before any container exists: the gateway address is on the bridge from creation.
    let listener = TcpListener::bind((net.gateway, 0)).expect("bind the gateway address");
    let url = format!("http://{}/hello", listener.local_addr().expect("addr"));
    let server = serve_once(listener);

    let ip = net.host(10);
    let opts = RunOpts::new(&net, "fixed")
        .ip(ip)
        .entrypoint("/bin/busybox")
        .args(wget(&url));
    let (code, logs) = docker::run_to_completion(&opts, TIMEOUT);
    assert_eq!(code, 0, "wget from the container failed:\n{logs}");
    assert_eq!(logs, "hello from the host\n");

    let (peer, head) = server.join().expect("server thread");
    assert_eq!(peer.ip(), ip, "the host sees the container's own address");
    assert!(head.starts_with("GET /hello HTTP/1.1\r\n"), "{head}");
}

#[test]
fn imdsd_probe_in_a_container_reaches_a_listener_on_the_gateway() {
    // The path the end-to-end tests take: `imdsd probe` in a container asking an endpoint on the
    // host. This listener is no metadata service: it answers the token request with a body and
    // then refuses, so the probe must report failure in its JSON line.
    let net = TestNetwork::create("probe");
    let listener = TcpListener::bind((net.gateway, 0)).expect("bind the gateway address");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let server = serve_once(listener);

    let ip = net.host(20);
    let container = TestContainer::run(&RunOpts::new(&net, "probe").ip(ip).args([
        "probe",
        "--endpoint",
        &endpoint,
    ]));
    let code = container.wait_exit(TIMEOUT);
    let (peer, head) = server.join().expect("server thread");
    assert_eq!(peer.ip(), ip, "the host sees the container's own address");
    assert!(
        head.starts_with("PUT /latest/api/token HTTP/1.1\r\n"),
        "an SDK starts with an IMDSv2 token: {head}"
    );
    assert_eq!(
        code,
        1,
        "no credentials from a fake endpoint:\n{}",
        container.logs()
    );
    let stdout = container.stdout();
    let line: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("probe output is not one JSON line ({e}): {stdout}"));
    assert_eq!(line["endpoint"], endpoint.as_str(), "{line}");
}

#[test]
fn a_running_container_knows_its_assigned_address_and_goes_away() {
    let net = TestNetwork::create("assigned");
    let listener = TcpListener::bind((net.gateway, 0)).expect("bind the gateway address");
    let url = format!("http://{}/", listener.local_addr().expect("addr"));
    let server = serve_once(listener);

    // Stays up after the request, like `imdsd probe --hold`.
    let script = format!("wget -q -O - {url} && exec sleep 60");
    let container = TestContainer::run(
        &RunOpts::new(&net, "assigned")
            .entrypoint("/bin/busybox")
            .args(["sh", "-c", &script])
            .env("IAM_ROLE", "harness-smoke")
            .label("com.example.purpose", "smoke"),
    );
    let ip = container.ip.expect("an address on the test network");
    let IpAddr::V4(v4) = ip else {
        panic!("IPv4 expected: {ip}")
    };
    assert_eq!(
        format!(
            "{}.{}.{}.0/24",
            v4.octets()[0],
            v4.octets()[1],
            v4.octets()[2]
        ),
        net.subnet
    );
    let (peer, _) = server.join().expect("server thread");
    assert_eq!(peer.ip(), ip);

    let (code, env) = container.exec(["/bin/busybox", "sh", "-c", "echo \"$IAM_ROLE\""]);
    assert_eq!((code, env.as_str()), (0, "harness-smoke\n"));
    assert_eq!(
        docker::docker_ok([
            "container",
            "inspect",
            "--format",
            "{{index .Config.Labels \"com.example.purpose\"}} {{index .Config.Labels \"imdsd-test\"}}",
            &container.id,
        ]),
        "smoke 1"
    );

    container.stop();
    let code = container.wait_exit(TIMEOUT);
    assert_ne!(code, 0, "killed by docker stop");
    assert_eq!(container.stdout(), "hello from the host\n");

    let (container_name, network_name) = (container.name.clone(), net.name.clone());
    drop(container);
    drop(net);
    assert!(!docker::container_exists(&container_name));
    assert!(!docker::network_exists(&network_name));
}

#[test]
fn a_panicking_test_leaves_no_network_or_container() {
    let names = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let net = TestNetwork::create("panics");
        let container = TestContainer::run(
            &RunOpts::new(&net, "panics")
                .entrypoint("/bin/busybox")
                .args(["sleep", "60"]),
        );
        *names.lock().expect("lock") = Some((container.name.clone(), net.name.clone()));
        // Leak the container: the network's drop must remove what is still attached.
        std::mem::forget(container);
        panic!("deliberate panic (expected): the harness must clean up while unwinding");
    }));
    assert!(result.is_err());
    let (container_name, network_name) = names.lock().expect("lock").take().expect("names");
    assert!(!docker::container_exists(&container_name));
    assert!(!docker::network_exists(&network_name));
}

#[test]
fn cleanup_stale_removes_what_a_dead_test_process_left() {
    // A pid that no longer runs: a child that has exited and been reaped.
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("run true");
    let dead = child.id();
    child.wait().expect("wait for true");
    let network = format!("imdsd-test-stale-{dead}-0");
    let container = format!("imdsd-test-stale-{dead}-1");
    // Every test process runs cleanup_stale when it starts, so another one may remove these
    // leftovers between our two commands; then set them up again.
    let mut attempts = 0;
    while !make_leftovers(dead, &network, &container) {
        attempts += 1;
        assert!(attempts < 5, "could not set up the leftovers");
    }

    // This process's own network is alive and must survive.
    let live = TestNetwork::create("live");
    docker::cleanup_stale();
    assert!(!docker::container_exists(&container));
    assert!(!docker::network_exists(&network));
    assert!(docker::network_exists(&live.name));
}

/// What a killed test process leaves: a network labelled with its pid and a running container
/// on it. False (after removing whatever was made) if a command failed.
fn make_leftovers(dead_pid: u32, network: &str, container: &str) -> bool {
    let labels = [
        "--label".to_string(),
        "imdsd-test=1".to_string(),
        "--label".to_string(),
        format!("imdsd-test.pid={dead_pid}"),
    ];
    let run = |args: &[String]| {
        std::process::Command::new("docker")
            .args(args)
            .output()
            .expect("run docker")
            .status
            .success()
    };
    let mut create = vec!["network".to_string(), "create".to_string()];
    create.extend(labels.iter().cloned());
    create.push(network.to_string());
    let mut start: Vec<String> = ["run", "--detach", "--pull", "never", "--name", container]
        .iter()
        .map(|s| s.to_string())
        .collect();
    start.extend(labels.iter().cloned());
    start.extend(["--network".to_string(), network.to_string()]);
    start.extend(["--entrypoint".to_string(), "/bin/busybox".to_string()]);
    start.extend([docker::test_image(), "sleep".to_string(), "60".to_string()]);
    if run(&create) && run(&start) {
        return true;
    }
    run(&["rm".into(), "--force".into(), container.to_string()]);
    run(&["network".into(), "rm".into(), network.to_string()]);
    false
}
