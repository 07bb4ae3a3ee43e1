//! Per-container roles end to end on rootful Podman (issue 16): each test runs its own Podman
//! (`support/podman.rs`: a private configuration and store, and its Docker-compatible API
//! service on a socket of its own), real containers from the test image imported into it, the
//! daemon on the Podman network's gateway following that socket (`--docker-host`), and moto as
//! STS.
//!
//! What makes Podman different here, and what these tests hold imdsd to:
//! - its events reach the API's stream late (it polls its event file: up to ~250 ms), so a
//!   container's first request usually comes before its start event: imdsd must ask the engine
//!   at once rather than wait for the event, and must never answer from a removed container's
//!   entry;
//! - netavark puts a network's gateway on the host only while a container is attached, so imdsd
//!   may start before its listen address exists.
//!
//! They fail, never skip, when Podman cannot be run (scripts/test installs it). Everything a test
//! creates is removed when its `Podman` is dropped, also when it fails.

mod common;
#[path = "support/docker.rs"]
mod docker;
#[path = "support/e2e.rs"]
mod e2e;
#[path = "support/podman.rs"]
mod podman;
#[path = "support/sts.rs"]
mod sts_support;

use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::Daemon;
use docker::{RunOpts, TestContainer, TestNetwork, run_to_completion};
use e2e::{RUN_TIMEOUT, eventually, fake_daemon, probe_args, probe_output};
use podman::Podman;

/// A container that only sleeps, keeping `net`'s bridge (and so its gateway) up.
fn sleeper(net: &TestNetwork, name: &str) -> TestContainer {
    TestContainer::run(
        &RunOpts::new(net, name)
            .entrypoint("/bin/busybox")
            .args(["sleep", "600"]),
    )
}

/// The first thing a container does: one plain IMDSv1 GET of the role listing, printed with
/// wget's exit status (`role-x v1-exit=0`).
fn first_request_script(endpoint: &str) -> Vec<String> {
    let script = format!(
        "/bin/busybox wget -q -O - {endpoint}/latest/meta-data/iam/security-credentials/; \
         echo \" v1-exit=$?\""
    );
    ["sh", "-c", &script]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_containers_on_a_podman_network_get_three_roles_checked_by_sts() {
    let podman = Podman::start();
    let net = podman.network("roles");
    // moto listens on the gateway too (the containers check their credentials with it), and it
    // cannot bind the address before Podman puts it on the host, with the first container.
    let _anchor = sleeper(&net, "anchor");
    net.wait_gateway();
    e2e::three_containers_get_three_roles(&net, &podman.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recycled_address_on_podman_never_carries_the_previous_containers_role_or_token() {
    let podman = Podman::start();
    let net = podman.network("reuse");
    let d = fake_daemon(&net, &podman.url(), &["--default-role", "fallback"]).await;
    e2e::recycle_one_address(&net, &d.url(), net.host(10), 20);
    // On the host, each removal was seen from the kernel, not only from Podman's late events.
    let exits = d
        .docker_stats
        .as_ref()
        .expect("stats")
        .exits_seen
        .load(Ordering::Relaxed);
    assert!(exits >= 20, "{exits} exits seen for 20 removals");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_container_started_while_imdsd_runs_is_answered_on_its_first_request() {
    let podman = Podman::start();
    let net = podman.network("first");
    let d = fake_daemon(&net, &podman.url(), &[]).await;
    let index = d.index.clone().expect("index");
    let unplaced = index.unplaced_callers();
    const CONTAINERS: u8 = 5;
    for i in 0..CONTAINERS {
        let role = format!("role-{i}");
        let (exit, logs) = run_to_completion(
            &RunOpts::new(&net, &format!("first{i}"))
                .ip(net.host(20 + i))
                .env("IAM_ROLE", &role)
                .entrypoint("/bin/busybox")
                .args(first_request_script(&d.url())),
            RUN_TIMEOUT,
        );
        assert_eq!(
            (exit, logs.trim()),
            (0, format!("{role} v1-exit=0").as_str()),
            "container {i}: its one and only request did not get its role"
        );
    }
    // Podman's start events come a quarter of a second after the containers asked: the index
    // could not place them, and asked the engine.
    let asked = index.unplaced_callers() - unplaced;
    eprintln!("{asked} of {CONTAINERS} containers asked before their start event was applied");
    assert!(
        asked > 0,
        "every container's start event came before its first request: this test did not \
         exercise the ask path"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn imdsd_started_before_any_container_is_attached_still_serves() {
    let podman = Podman::start();
    let net = podman.network("ahead");
    assert!(
        TcpListener::bind((net.gateway, 0)).is_err(),
        "the gateway {} is already on the host: netavark should add it with the first container",
        net.gateway
    );
    // No --networks: the network whose gateway imdsd listens on is served.
    let d = Daemon::start_on(
        &format!("{}:0", net.gateway),
        &["--fake-credentials", "--docker-host", &podman.url()],
        tempfile::tempdir().expect("tempdir"),
    )
    .await;
    let index = d.index.clone().expect("the daemon follows Podman");
    eventually(Duration::from_secs(20), "the first sync", || {
        index.is_ready()
    })
    .await;
    // Twice: the bridge goes with the first container and comes back with the second.
    for name in ["one", "two"] {
        let (exit, logs) = run_to_completion(
            &RunOpts::new(&net, name)
                .env("IAM_ROLE", &format!("role-{name}"))
                .args(probe_args(&d.url(), &[])),
            RUN_TIMEOUT,
        );
        assert_eq!(exit, 0, "{name}: {logs}");
        assert_eq!(
            probe_output(&logs)["role"],
            format!("role-{name}"),
            "{logs}"
        );
    }
}

/// `imdsd network ARGS` with `env`: its exit code, stdout and stderr.
fn imdsd_network(
    args: &[&str],
    env: &[(std::ffi::OsString, std::ffi::OsString)],
) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imdsd"))
        .arg("network")
        .args(args)
        .env_remove("DOCKER_HOST")
        .env_remove("CONTAINER_HOST")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run imdsd network");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn network_up_with_podman_creates_the_metadata_network_once_and_down_removes_only_it() {
    let podman = Podman::start();
    let env = podman.env();
    let (n, _claim) = docker::claim_podman_subnet();
    let name = docker::unique_name("netup");
    let subnet = format!("169.254.{n}.0/24");
    let address = format!("169.254.{n}.254");
    let flags = [
        "--network-name",
        name.as_str(),
        "--subnet",
        &subnet,
        "--address",
        &address,
    ];
    let exists = |name: &str| {
        podman
            .engine
            .run(["network", "exists", name])
            .status
            .success()
    };

    // CONTAINER_HOST says Podman (and makes the podman CLI use that service): the dry run
    // prints Podman's command, and changes nothing.
    let remote = [("CONTAINER_HOST".into(), podman.url().into())];
    let (code, out, err) = imdsd_network(&[&["up", "--dry-run"][..], &flags].concat(), &remote);
    assert_eq!(code, 0, "{out}{err}");
    let names_bridges =
        String::from_utf8_lossy(&podman.engine.run(["network", "create", "--help"]).stdout)
            .contains("--interface-name");
    let bridge = if names_bridges {
        " --interface-name imdsd0"
    } else {
        ""
    };
    assert_eq!(
        out.lines().next(),
        Some(
            format!(
                "podman network create --driver bridge --subnet {subnet} --gateway {address}\
                 {bridge} --label imdsd.managed=true {name}"
            )
            .as_str()
        ),
        "{out}"
    );
    assert!(!exists(&name), "a dry run creates nothing");

    // A bridge name this Podman cannot give is refused rather than quietly not given.
    let (code, out, err) = imdsd_network(
        &[
            &["up", "--engine", "podman", "--bridge", "imdsdpmx"][..],
            &flags,
        ]
        .concat(),
        &env,
    );
    if !names_bridges {
        assert_eq!(code, 1, "{out}{err}");
        assert!(
            err.contains("--interface-name") && err.contains("fix: "),
            "{err}"
        );
        assert!(!exists(&name));
    } else {
        assert_eq!(code, 0, "{out}{err}");
        podman.engine.run_ok(["network", "rm", &name]);
    }

    let (code, out, err) =
        imdsd_network(&[&["up", "--engine", "podman"][..], &flags].concat(), &env);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with(&format!(
            "added: podman network {name} (subnet {subnet}, gateway {address}, bridge "
        )),
        "{out}"
    );
    let record: serde_json::Value =
        serde_json::from_str(&podman.engine.run_ok(["network", "inspect", &name])).expect("json");
    assert_eq!(record[0]["labels"]["imdsd.managed"], "true", "{record}");
    assert_eq!(
        record[0]["subnets"][0]["subnet"],
        subnet.as_str(),
        "{record}"
    );
    assert_eq!(
        record[0]["subnets"][0]["gateway"],
        address.as_str(),
        "{record}"
    );

    // Again: everything is there, nothing changes.
    let (code, again, err) =
        imdsd_network(&[&["up", "--engine", "podman"][..], &flags].concat(), &env);
    assert_eq!(code, 0, "{again}{err}");
    assert!(
        again.starts_with(&format!("exists: podman network {name} ")),
        "{again}"
    );
    assert!(!again.contains("added: "), "{again}");

    // The layout works: imdsd on the gateway (before any container brought it up), following
    // Podman, serves a container on the network its role.
    let d = Daemon::start_on(
        &format!("{address}:0"),
        &["--fake-credentials", "--docker-host", &podman.url()],
        tempfile::tempdir().expect("tempdir"),
    )
    .await;
    let index = d.index.clone().expect("the daemon follows Podman");
    eventually(Duration::from_secs(20), "the first sync", || {
        index.is_ready()
    })
    .await;
    let image = podman.engine.image();
    let on_network = |label: &str| RunOpts {
        name: label.into(),
        network: name.clone(),
        image: image.clone(),
        engine: podman.engine.clone(),
        ..RunOpts::default()
    };
    let (exit, logs) = run_to_completion(
        &on_network("netup-app")
            .env("IAM_ROLE", "role-up")
            .args(probe_args(&d.url(), &[])),
        RUN_TIMEOUT,
    );
    assert_eq!(exit, 0, "{logs}");
    assert_eq!(probe_output(&logs)["role"], "role-up", "{logs}");
    drop(d);

    // down refuses while a container is attached, and says which.
    let attached = TestContainer::run(
        &on_network("netup-attached")
            .entrypoint("/bin/busybox")
            .args(["sleep", "600"]),
    );
    let (code, out, err) = imdsd_network(
        &[&["down", "--engine", "podman"][..], &flags].concat(),
        &env,
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&attached.name) && err.contains("fix: "),
        "{err}"
    );
    assert!(exists(&name));
    attached.rm();

    let (code, out, err) = imdsd_network(
        &[&["down", "--engine", "podman"][..], &flags].concat(),
        &env,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, format!("removed: podman network {name}\n"));
    assert!(!exists(&name));
    let (code, out, err) = imdsd_network(
        &[&["down", "--engine", "podman"][..], &flags].concat(),
        &env,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, format!("absent: podman network {name}\n"));

    // A network imdsd did not create is left alone.
    let other = podman.network("not-mine");
    let (code, out, err) = imdsd_network(
        &["down", "--engine", "podman", "--network-name", &other.name],
        &env,
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("was not created by `imdsd network up`"),
        "{err}"
    );
    assert!(exists(&other.name));
}

// ---------------------------------------------------------------------------------------------
// The harness itself

/// What of a test's Podman would outlive it: the directory, the API service, mounts under the
/// directory, the network's bridge.
fn leftovers(dir: &Path, service_pid: u32) -> Vec<String> {
    let mut found = Vec::new();
    if dir.exists() {
        found.push(format!("directory {}", dir.display()));
    }
    if !docker::process_gone(&service_pid.to_string()) {
        found.push(format!("service process {service_pid}"));
    }
    found.extend(
        podman::processes_of(dir)
            .into_iter()
            .map(|pid| format!("process {pid}")),
    );
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.display().to_string();
    found.extend(
        mountinfo
            .lines()
            .filter(|l| l.contains(&prefix))
            .map(|l| format!("mount {l}")),
    );
    found
}

#[test]
fn a_podman_test_leaves_nothing_behind_even_when_it_panics() {
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let podman = Podman::start();
        let service_pid = std::fs::read_to_string(podman.dir.join("service.pid"))
            .expect("service.pid")
            .trim()
            .parse::<u32>()
            .expect("a pid");
        let net = podman.network("panic");
        let c = sleeper(&net, "panic");
        net.wait_gateway();
        tx.send((podman.dir.clone(), service_pid, net.gateway, c.id.clone()))
            .expect("send");
        panic!("the test fails with a container running");
    }));
    assert!(outcome.is_err(), "the closure panicked");
    let (dir, service_pid, gateway, container) = rx.recv().expect("what the test made");
    assert_eq!(leftovers(&dir, service_pid), Vec::<String>::new());
    assert!(
        TcpListener::bind((gateway, 0)).is_err(),
        "the network's bridge (with {gateway}) is gone"
    );
    assert!(
        !Path::new("/proc")
            .read_dir()
            .expect("/proc")
            .flatten()
            .any(|p| std::fs::read(p.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&container))),
        "no process (conmon) of container {container} runs"
    );
}

#[test]
fn cleanup_stale_tears_down_the_podman_a_dead_test_process_left() {
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let dead = child.id();
    child.wait().expect("wait");
    let (dir, service_pid) = podman::leave_behind_as(dead);
    // Every test process cleans up when it starts its first Podman, so another may do it first.
    podman::cleanup_stale();
    assert_eq!(leftovers(&dir, service_pid), Vec::<String>::new());
}
