//! `imdsd doctor`, run as the built binary: a good setup passes every check and exits 0, and each
//! broken piece (configuration, Docker, AWS identity, a role, a listen address, the metadata
//! network) is named in a FAIL line with a fix, and the exit code is 1.
//!
//! Real components only: the machine's Docker Engine (test networks and containers from
//! `support/docker.rs`), a test's own rootful Podman and a rootless Podman service
//! (`support/podman.rs`), moto and a scripted STS (`support/sts.rs`). Other tests create networks
//! and containers at the same time, so the tests that follow Docker limit the doctor to their own
//! network (`--networks`), as an operator would, and never count the machine's containers.

mod common;
#[path = "support/docker.rs"]
mod docker;
#[path = "support/podman.rs"]
mod podman;
#[path = "support/sts.rs"]
mod sts_support;

use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Process, aws_clean_command, run_python};
use docker::{RunOpts, TestContainer, TestNetwork};
use sts_support::{Behaviour, Moto, OPERATOR_ENV, ScriptedSts, free_port};

const DOCKER_SOCKET: &str = "unix:///var/run/docker.sock";

/// What one doctor run printed, and how it ended.
struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Outcome {
    /// The lines `STATUS check: …` (e.g. `FAIL`, `roles`).
    fn lines(&self, status: &str, check: &str) -> Vec<&str> {
        let prefix = format!("{status} {check}:");
        self.stdout
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .collect()
    }

    /// The single line for `check` with `status`, failing the test with the whole report otherwise.
    fn one(&self, status: &str, check: &str) -> &str {
        let found = self.lines(status, check);
        assert_eq!(
            found.len(),
            1,
            "expected one {status} {check} line:\n{self}"
        );
        found[0]
    }

    fn has(&self, status: &str, check: &str) -> bool {
        !self.lines(status, check).is_empty()
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `imdsd doctor ARGS` with a clean AWS environment plus `env`. Fails the test if it takes
/// longer than a minute: the doctor bounds every network operation and must never hang.
fn doctor(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    doctor_in(None, args, env)
}

/// [`doctor`], inside the network namespace `netns` (`ip netns exec`) when given.
fn doctor_in(netns: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let binary = Path::new(env!("CARGO_BIN_EXE_imdsd"));
    let mut command = match netns {
        Some(ns) => {
            let mut c = aws_clean_command(Path::new("ip"));
            c.args(["netns", "exec", ns]).arg(binary);
            c
        }
        None => aws_clean_command(binary),
    };
    let mut child = command
        .arg("doctor")
        .args(args)
        .env_remove("DOCKER_HOST")
        .env_remove("DOCKER_URL")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run imdsd doctor");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "imdsd doctor {args:?} still ran after 60 s; stdout so far:\n{}",
                out.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code: status.code().expect("exited, not killed by a signal"),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// `127.0.0.1:<a free port>`.
fn free_loopback() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// A free port on `ip`, which must be an address of this host.
fn free_port_on(ip: IpAddr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A long-running container on `net` (busybox sleep), with `opts` applied.
fn sleeper(net: &TestNetwork, name: &str, opts: impl FnOnce(RunOpts) -> RunOpts) -> TestContainer {
    TestContainer::run(&opts(
        RunOpts::new(net, name)
            .entrypoint("/bin/busybox")
            .args(["sleep", "300"]),
    ))
}

fn check_common_passes(o: &Outcome) {
    for check in ["config", "docker", "identity", "roles", "listen"] {
        assert!(o.has("PASS", check), "no PASS {check}:\n{o}");
    }
}

#[test]
fn a_good_setup_passes_every_check() {
    docker::require_docker();
    let net = TestNetwork::create("doctor-good");
    let app = sleeper(&net, "app", |o| o.env("IAM_ROLE", "app-role"));
    let loopback = free_loopback();
    let gateway = format!("{}:{}", net.gateway, free_port_on(net.gateway));
    let o = doctor(
        &[
            "--fake-credentials",
            "--listen",
            &loopback,
            "--listen",
            &gateway,
            "--docker-host",
            DOCKER_SOCKET,
            "demo-role",
        ],
        &[],
    );
    assert_eq!(o.code, 0, "{o}");
    check_common_passes(&o);
    assert!(!o.stdout.contains("FAIL "), "{o}");
    let docker_line = o.one("PASS", "docker");
    assert!(
        docker_line.contains("Docker Engine") && docker_line.contains("running container"),
        "{docker_line}"
    );
    // Without --networks, the network whose gateway imdsd listens on is the one served, and
    // the default bridge (reachable through the host's routing) is named as refused.
    let networks_line = o.one("PASS", "networks");
    assert!(
        networks_line.contains(&format!(
            "serving containers on {} (1 running there",
            net.name
        )),
        "{networks_line}"
    );
    assert!(
        networks_line.contains("refused from") && networks_line.contains("bridge"),
        "{networks_line}"
    );
    assert!(o.one("PASS", "identity").contains("fake"), "{o}");
    let roles = o.lines("PASS", "roles");
    assert_eq!(roles.len(), 2, "{o}");
    assert!(
        roles
            .iter()
            .any(|l| l.contains("role/demo-role (default role)")),
        "{o}"
    );
    assert!(
        roles.iter().any(|l| l.contains("role/app-role")
            && l.contains(&format!("container {}", app.name))
            && l.contains("IAM_ROLE")),
        "{o}"
    );
    assert!(roles.iter().all(|l| l.contains("fake credentials")), "{o}");
    let listen = o.lines("PASS", "listen");
    assert_eq!(listen.len(), 2, "{o}");
    assert!(
        listen[0].contains(&loopback) && listen[0].contains("port is free"),
        "{o}"
    );
    // The host layout: the daemon listens on the test network's gateway.
    let network = o.lines("PASS", "network");
    assert_eq!(network.len(), 1, "{o}");
    assert!(
        network[0].contains(&format!("gateway of Docker network {}", net.name))
            && network[0].contains("host layout"),
        "{o}"
    );
    assert!(o.has("SKIP", "network"), "127.0.0.1 has no network: {o}");
    assert!(o.has("SKIP", "ec2-redirect"), "{o}");
}

#[test]
fn with_moto_as_sts_the_identity_is_motos_and_the_role_is_assumed() {
    let moto = Moto::start();
    let expected_arn = run_python(
        &format!(
            "import boto3\n\
             print(boto3.client('sts', endpoint_url='{}', region_name='us-east-1')\
             .get_caller_identity()['Arn'])",
            moto.url
        ),
        OPERATOR_ENV,
    )
    .trim()
    .to_string();
    assert!(expected_arn.starts_with("arn:aws:"), "{expected_arn}");
    let o = doctor(
        &[
            "--sts-endpoint",
            &moto.url,
            "--listen",
            &free_loopback(),
            "--docker-host",
            "none",
            "demo-role",
        ],
        OPERATOR_ENV,
    );
    assert_eq!(o.code, 0, "{o}");
    for check in ["config", "identity", "roles", "listen"] {
        assert!(o.has("PASS", check), "no PASS {check}:\n{o}");
    }
    assert!(o.has("SKIP", "docker"), "{o}");
    let identity = o.one("PASS", "identity");
    assert!(
        identity.contains(&format!("{expected_arn} (account ")),
        "{identity}"
    );
    let role = o.one("PASS", "roles");
    assert!(
        role.contains("arn:aws:iam::123456789012:role/demo-role (default role): assumed as arn:aws:sts::123456789012:assumed-role/demo-role/imdsd-doctor"),
        "{role}"
    );
}

#[test]
fn an_unknown_key_in_the_config_file_fails_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("imdsd.toml");
    std::fs::write(&file, "fake_credentials = true\nlisn = 3\n").expect("write");
    let file = file.to_str().expect("utf8");
    let o = doctor(&["--config", file, "--docker-host", "none"], &[]);
    assert_eq!(o.code, 1, "{o}");
    let line = o.one("FAIL", "config");
    assert!(
        line.contains(file) && line.contains("lisn") && line.contains("— fix: "),
        "{line}"
    );
    assert!(
        !o.stdout.contains("PASS "),
        "nothing is checked without a config: {o}"
    );
    assert!(o.has("SKIP", "docker") && o.has("SKIP", "roles"), "{o}");
}

#[test]
fn an_unreachable_docker_engine_fails_docker_and_only_docker() {
    let o = doctor(
        &[
            "--fake-credentials",
            "--listen",
            &free_loopback(),
            "--docker-host",
            "unix:///nonexistent.sock",
            "demo-role",
        ],
        &[],
    );
    assert_eq!(o.code, 1, "{o}");
    let line = o.one("FAIL", "docker");
    assert!(line.contains("unix:///nonexistent.sock"), "{line}");
    let fix = line.split_once("— fix: ").expect("a fix").1;
    assert!(
        fix.contains("is Docker running") && fix.contains("--docker-host"),
        "{line}"
    );
    assert_eq!(o.stdout.matches("FAIL ").count(), 1, "{o}");
    for check in ["config", "identity", "roles", "listen"] {
        assert!(o.has("PASS", check), "no PASS {check}:\n{o}");
    }
}

#[test]
fn no_aws_identity_fails_identity() {
    let o = doctor(
        &[
            "--listen",
            &free_loopback(),
            "--docker-host",
            "none",
            "demo-role",
        ],
        &[],
    );
    assert_eq!(o.code, 1, "{o}");
    let line = o.one("FAIL", "identity");
    assert!(line.contains("no usable AWS identity"), "{line}");
    assert!(line.contains("Tried: environment variables"), "{line}");
    assert!(
        line.contains("— fix: ") && line.contains("--fake-credentials"),
        "{line}"
    );
    assert!(o.has("SKIP", "roles"), "{o}");
    assert!(o.has("PASS", "config") && o.has("PASS", "listen"), "{o}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_sts_refuses_fails_roles_naming_it() {
    let sts = ScriptedSts::start().await;
    sts.set(Some("role/denied-role"), Behaviour::Deny);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("imdsd.toml");
    std::fs::write(&file, "[role_aliases]\nok = \"ok-role\"\n").expect("write");
    let args: Vec<String> = [
        "--config",
        file.to_str().expect("utf8"),
        "--sts-endpoint",
        &sts.url,
        "--listen",
        &free_loopback(),
        "--docker-host",
        "none",
        "denied-role",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let o = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        doctor(&args, OPERATOR_ENV)
    })
    .await
    .expect("join");
    assert_eq!(o.code, 1, "{o}");
    assert!(
        o.one("PASS", "identity")
            .contains("arn:aws:iam::123456789012:user/operator"),
        "{o}"
    );
    let denied = o.one("FAIL", "roles");
    assert!(
        denied.contains("arn:aws:iam::123456789012:role/denied-role (default role)")
            && denied.contains("AccessDenied"),
        "{denied}"
    );
    assert!(
        denied.contains("— fix: let arn:aws:iam::123456789012:user/operator assume the role"),
        "{denied}"
    );
    assert!(
        o.one("PASS", "roles")
            .contains("arn:aws:iam::123456789012:role/ok-role (role alias \"ok\"): assumed as"),
        "{o}"
    );
    // Both were really asked for, by the doctor's own session name.
    let asked: Vec<(String, String)> = sts
        .assume_requests()
        .iter()
        .map(|r| (r["RoleArn"].clone(), r["RoleSessionName"].clone()))
        .collect();
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert!(
        asked.iter().all(|(_, session)| session == "imdsd-doctor"),
        "{asked:?}"
    );
}

#[test]
fn a_container_asking_for_a_role_outside_the_allow_list_is_named() {
    docker::require_docker();
    let net = TestNetwork::create("doctor-refused");
    let admin = sleeper(&net, "admin", |o| o.env("IAM_ROLE", "admin"));
    let o = doctor(
        &[
            "--fake-credentials",
            "--allowed-roles",
            "app-*",
            "--listen",
            &free_loopback(),
            "--docker-host",
            DOCKER_SOCKET,
            "--networks",
            &net.name,
        ],
        &[],
    );
    assert_eq!(o.code, 1, "{o}");
    let line = o.one("FAIL", "roles");
    assert!(
        line.contains(&format!("container {}", admin.name))
            && line.contains("role/admin")
            && line.contains("not among the roles imdsd allows"),
        "{line}"
    );
    assert!(
        line.contains("— fix: add the role to --allowed-roles"),
        "{line}"
    );
}

#[test]
fn an_address_not_on_this_host_fails_listen_with_ip_addr_add() {
    let o = doctor(
        &[
            "--fake-credentials",
            "--listen",
            "192.0.2.10:80",
            "--docker-host",
            "none",
        ],
        &[],
    );
    assert_eq!(o.code, 1, "{o}");
    let line = o.one("FAIL", "listen");
    assert!(
        line.contains("192.0.2.10:80") && line.contains("not an address of this host"),
        "{line}"
    );
    assert!(
        line.contains("— fix: ") && line.contains("sudo ip addr add 192.0.2.10/32 dev lo"),
        "{line}"
    );
}

#[test]
fn a_port_held_by_imdsd_passes_and_one_held_by_something_else_fails() {
    let state = tempfile::tempdir().expect("tempdir");
    let daemon = Process::spawn(
        &[
            "--fake-credentials",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state.path().to_str().expect("utf8"),
        ],
        &[],
    );
    let addr = daemon.addr().to_string();
    let o = doctor(
        &[
            "--fake-credentials",
            "--listen",
            &addr,
            "--docker-host",
            "none",
        ],
        &[],
    );
    assert_eq!(o.code, 0, "{o}");
    assert!(
        o.one("PASS", "listen")
            .contains("imdsd (or EC2) already answers there"),
        "{o}"
    );

    // A listener that never answers: the doctor gives up after its timeout and says so.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = silent.local_addr().expect("addr").to_string();
    let o = doctor(
        &[
            "--fake-credentials",
            "--listen",
            &addr,
            "--docker-host",
            "none",
        ],
        &[],
    );
    assert_eq!(o.code, 1, "{o}");
    let line = o.one("FAIL", "listen");
    assert!(
        line.contains("in use by something that does not answer like imdsd")
            && line.contains("— fix: "),
        "{line}"
    );
}

/// Subnets of every Docker network, from the CLI.
fn docker_subnets() -> Vec<ipnet::IpNet> {
    let ids = Command::new("docker")
        .args(["network", "ls", "--quiet"])
        .output()
        .expect("docker network ls");
    let ids = String::from_utf8_lossy(&ids.stdout).into_owned();
    let out = Command::new("docker")
        .args([
            "network",
            "inspect",
            "--format",
            "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
        ])
        .args(ids.split_whitespace())
        .output()
        .expect("docker network inspect");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

#[test]
fn a_link_local_address_no_docker_network_contains_fails_network() {
    docker::require_docker();
    // 169.254.169.77 unless a network on 169.254.169.0/24 exists right now (`imdsd network up`
    // in another test, say); then any link-local /24 no network uses.
    let subnets = docker_subnets();
    let ip = [169u8]
        .into_iter()
        .chain(1..=254)
        .map(|n| IpAddr::V4(Ipv4Addr::new(169, 254, n, 77)))
        .find(|ip| !subnets.iter().any(|s| s.contains(ip)))
        .expect("a link-local /24 without a Docker network");
    let listen = SocketAddr::new(ip, 80).to_string();
    let o = doctor(
        &[
            "--fake-credentials",
            "--listen",
            &listen,
            "--docker-host",
            DOCKER_SOCKET,
            "--networks",
            "bridge",
        ],
        &[],
    );
    assert_eq!(o.code, 1, "{o}");
    // The address is not on this host either, so listen fails too; the network line is the point.
    assert!(o.has("FAIL", "listen"), "{o}");
    let line = o.one("FAIL", "network");
    assert!(
        line.contains(&format!("no Docker network contains {ip}")),
        "{line}"
    );
    let fix = line.split_once("— fix: ").expect("a fix").1;
    assert!(
        fix.contains("imdsd network up") && fix.contains("docker network create --subnet"),
        "{line}"
    );
}

/// A network namespace of this test's own (`ip netns add`), deleted when dropped.
struct Netns(String);

impl Netns {
    fn create(tag: &str) -> Netns {
        let name = format!("imdsd-doctor-{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap_or_else(|e| panic!("cannot run `ip netns add` (iproute2, root): {e}"));
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip ARGS` inside the namespace; panics with its message unless it succeeds.
    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "ip"])
            .args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run `ip netns exec` (iproute2, root): {e}"));
        assert!(
            out.status.success(),
            "ip {} in {}: {}",
            args.join(" "),
            self.0,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip route get ADDRESS` inside the namespace: its answer, or its error.
    fn route_get(&self, address: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "ip", "route", "get", address])
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .expect("ip route get");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn a_prohibit_route_for_the_metadata_address_fails_proxy_mode_and_not_a_local_listen_address() {
    // A host where systemd-imdsd's locked mode is in force, as far as routing goes: the test's
    // own namespace with the prohibit route the test adds itself.
    let ns = Netns::create("route");
    ns.ip(&["route", "add", "prohibit", "169.254.169.254/32"]);
    assert!(
        ns.route_get("169.254.169.254")
            .contains("Permission denied"),
        "the route prohibits: {}",
        ns.route_get("169.254.169.254")
    );
    let common = [
        "--docker-host",
        "none",
        "--fake-credentials",
        "--admin-listen",
        "none",
    ];

    // Proxy mode: imdsd itself must reach the real IMDS, which the route forbids.
    let proxy = doctor_in(
        Some(&ns.0),
        &[
            &common[..],
            &["--mode", "proxy", "--listen", "127.0.0.1:8169"],
        ]
        .concat(),
        &[],
    );
    assert_eq!(proxy.code, 1, "{proxy}");
    let line = proxy.one("FAIL", "metadata-route");
    assert!(
        line.contains("route `prohibit 169.254.169.254`")
            && line.contains("proxy mode")
            && line.contains("fix: boot with systemd.imds.network=unlocked")
            && line.contains("ip rule add uidrange"),
        "{proxy}"
    );

    // Host mode with the metadata address on this host: delivered through the local table,
    // before the prohibit route in main.
    ns.ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
    assert!(
        ns.route_get("169.254.169.254")
            .starts_with("local 169.254.169.254"),
        "a local address wins over the prohibit route: {}",
        ns.route_get("169.254.169.254")
    );
    let host = doctor_in(
        Some(&ns.0),
        &[&common[..], &["--listen", "169.254.169.254:80"]].concat(),
        &[],
    );
    assert!(!host.has("FAIL", "metadata-route"), "{host}");
    let line = host.one("PASS", "metadata-route");
    assert!(
        line.contains("route `prohibit 169.254.169.254`") && line.contains("local table"),
        "{host}"
    );

    // Without the route, nothing to report.
    ns.ip(&["route", "del", "prohibit", "169.254.169.254/32"]);
    let clear = doctor_in(
        Some(&ns.0),
        &[
            &common[..],
            &["--mode", "proxy", "--listen", "127.0.0.1:8169"],
        ]
        .concat(),
        &[],
    );
    assert!(
        clear
            .one("PASS", "metadata-route")
            .contains("no prohibit route or rule for the metadata address"),
        "{clear}"
    );
}

#[test]
fn with_podman_the_doctor_names_the_engine_its_networks_and_a_gateway_that_comes_with_a_container()
{
    let podman = podman::Podman::start();
    let net = podman.network("doctor-podman");
    // No container yet: netavark has not put the gateway on the host.
    let listen = format!("{}:80", net.gateway);
    let o = doctor(
        &[
            "--fake-credentials",
            "--listen",
            &listen,
            "--docker-host",
            &podman.url(),
            "demo-role",
        ],
        &[],
    );
    assert_eq!(o.code, 0, "{o}");
    check_common_passes(&o);
    let docker_line = o.one("PASS", "docker");
    assert!(
        docker_line.contains("Podman 4.") && docker_line.contains("0 running containers"),
        "{docker_line}"
    );
    let networks_line = o.one("PASS", "networks");
    assert!(
        networks_line.contains(&format!(
            "serving containers on {} (0 running there",
            net.name
        )) && networks_line.contains("refused from bridge"),
        "Podman's default network is listed as bridge: {networks_line}"
    );
    let listen_line = o.one("PASS", "listen");
    assert!(
        listen_line.contains(&format!("the gateway of Podman network {}", net.name))
            && listen_line.contains("ahead"),
        "{listen_line}"
    );
    let network_line = o.one("PASS", "network");
    assert!(
        network_line.contains(&format!("gateway of Podman network {}", net.name))
            && network_line.contains("host layout"),
        "{network_line}"
    );
}

#[test]
fn a_rootless_podman_is_refused_with_the_reason_and_the_fix() {
    let rootless = podman::RootlessService::start();
    let o = doctor(
        &[
            "--fake-credentials",
            "--listen",
            &free_loopback(),
            "--docker-host",
            &rootless.url(),
        ],
        &[],
    );
    assert_eq!(o.code, 1, "{o}");
    let line = o.one("FAIL", "docker");
    assert!(
        line.contains("Podman") && line.contains("rootless") && line.contains("network namespace"),
        "the reason: {line}"
    );
    assert!(
        line.contains("fix: ") && line.contains("podman.socket"),
        "the fix: {line}"
    );
    // The service re-executed itself into a user namespace; none of it outlives the test.
    let dir = rootless.dir.clone();
    drop(rootless);
    assert_eq!(podman::processes_of(&dir), Vec::<u32>::new());
    assert!(!dir.exists());
}
