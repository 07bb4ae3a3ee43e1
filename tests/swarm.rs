//! Swarm services end to end (issue 16): a real single-node swarm, imdsd deployed from
//! `deploy/swarm/imdsd-stack.yml` as a global service on the host network, and service tasks on
//! an overlay network that reach it through the node's `docker_gwbridge`, set up by
//! `imdsd network up --layout swarm`.
//!
//! Swarm state is the Docker daemon's, shared by every test process on this machine: the tests
//! here take an exclusive lock (`/tmp/imdsd-test-swarm.lock`) for their whole run, create the
//! swarm (and `docker_gwbridge`) only when none is active, and leave it, and remove the bridge,
//! only when they created them. A test process killed before its guards ran leaves a state file
//! behind, and the next holder of the lock undoes what it names. Everything else is named
//! `imdsd-test-…-<pid>` and removed by guards, also on failure. Without Docker, or when the swarm
//! cannot be created, the tests fail; they never skip.

#[path = "support/docker.rs"]
mod docker;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const LOCK: &str = "/tmp/imdsd-test-swarm.lock";
/// Present while a test owns a swarm or a `docker_gwbridge` it created: `<pid> swarm gwbridge`.
const STATE: &str = "/tmp/imdsd-test-swarm.state";
const GWBRIDGE: &str = "docker_gwbridge";

// ---------------------------------------------------------------------------------------------
// Commands

fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{program}`: {e}"))
}

fn show(out: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn docker_ok(args: &[&str]) -> String {
    docker::docker_ok(args)
}

/// `docker ARGS`, ignoring failure (guards and cleanup).
fn docker_quiet(args: &[&str]) -> Output {
    run("docker", args, &[])
}

fn imdsd_network(args: &[&str]) -> Output {
    let mut full = vec!["network"];
    full.extend_from_slice(args);
    run(env!("CARGO_BIN_EXE_imdsd"), &full, &[])
}

/// Polls `done` every 100 ms for up to `limit`; panics with `what` and `detail()` after.
fn eventually(
    limit: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
    detail: impl Fn() -> String,
) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            detail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------
// The swarm, its lock and its guard

/// Holds the machine's swarm for this test; undoes, when dropped, what this test created.
struct Swarm {
    _lock: nix::fcntl::Flock<File>,
    created_swarm: bool,
    created_gwbridge: bool,
}

impl Swarm {
    fn lock() -> nix::fcntl::Flock<File> {
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK)
            .unwrap_or_else(|e| panic!("open {LOCK}: {e}"));
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .unwrap_or_else(|(_, e)| panic!("lock {LOCK}: {e}"));
        // Whoever wrote the state file is gone (it held the lock until it died).
        if let Ok(state) = std::fs::read_to_string(STATE) {
            eprintln!("swarm test: undoing what a killed test left: {state}");
            undo(state.contains("swarm"), state.contains("gwbridge"));
            let _ = std::fs::remove_file(STATE);
        }
        lock
    }

    fn record(&self) {
        let mut state = std::process::id().to_string();
        if self.created_swarm {
            state.push_str(" swarm");
        }
        if self.created_gwbridge {
            state.push_str(" gwbridge");
        }
        std::fs::write(STATE, state).unwrap_or_else(|e| panic!("write {STATE}: {e}"));
    }
}

/// Leaves the swarm and removes `docker_gwbridge`, as far as asked; never panics.
fn undo(swarm: bool, gwbridge: bool) {
    remove_leftovers(&std::process::id().to_string());
    if swarm {
        let _ = docker_quiet(&["swarm", "leave", "--force"]);
    }
    if gwbridge {
        for _ in 0..20 {
            let out = docker_quiet(&["network", "rm", GWBRIDGE]);
            let err = String::from_utf8_lossy(&out.stderr);
            if out.status.success() || err.contains("not found") || err.contains("No such") {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        undo(self.created_swarm, self.created_gwbridge);
        let _ = std::fs::remove_file(STATE);
    }
}

/// Services, stacks, networks and volumes of this test (labelled with its pid), and those of
/// test processes that are gone.
fn remove_leftovers(me: &str) {
    let ours = |pid: &str| pid == me || docker::process_gone(pid);
    let ids = docker_quiet(&["service", "ls", "--quiet", "--filter", "label=imdsd-test=1"]);
    let mut waited = Vec::new();
    for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
        let out = docker_quiet(&[
            "service",
            "inspect",
            "--format",
            "{{.Spec.Name}} {{index .Spec.Labels \"imdsd-test.pid\"}}",
            id,
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some((name, pid)) = text.trim().split_once(' ')
            && ours(pid.trim())
        {
            let _ = docker_quiet(&["service", "rm", name]);
            waited.push(name.to_string());
        }
    }
    // Stacks: named imdsd-test-swarm-<pid>.
    let out = docker_quiet(&["stack", "ls", "--format", "{{.Name}}"]);
    for name in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(pid) = name.strip_prefix("imdsd-test-swarm-")
            && ours(pid)
        {
            let _ = docker_quiet(&["stack", "rm", name]);
            waited.push(format!("{name}_imdsd"));
        }
    }
    // Task containers go a moment after their service; the overlay network and the state volume
    // only then.
    let deadline = Instant::now() + Duration::from_secs(30);
    for service in &waited {
        while Instant::now() < deadline && !task_containers(service).is_empty() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let out = docker_quiet(&[
        "network",
        "ls",
        "--filter",
        "label=imdsd-test=1",
        "--format",
        "{{.Name}} {{.Label \"imdsd-test.pid\"}}",
    ]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((name, pid)) = line.split_once(' ')
            && ours(pid.trim())
        {
            let _ = docker_quiet(&["network", "rm", name]);
        }
    }
    let out = docker_quiet(&["volume", "ls", "--format", "{{.Name}}"]);
    for name in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(rest) = name.strip_prefix("imdsd-test-swarm-")
            && let Some(pid) = rest.split('_').next()
            && ours(pid)
        {
            let _ = docker_quiet(&["volume", "rm", name]);
        }
    }
}

fn swarm_state() -> String {
    docker_ok(&["info", "--format", "{{.Swarm.LocalNodeState}}"])
}

/// Third octets of the `169.254.N.0/24`s Docker networks use now.
fn octets_in_use() -> Vec<u8> {
    let ids = docker_ok(&["network", "ls", "--quiet"]);
    let mut args = vec![
        "network",
        "inspect",
        "--format",
        "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
    ];
    args.extend(ids.split_whitespace());
    String::from_utf8_lossy(&docker_quiet(&args).stdout)
        .split_whitespace()
        .filter_map(|s| s.strip_prefix("169.254."))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect()
}

/// `docker_gwbridge`'s gateway.
fn gwbridge_gateway() -> Ipv4Addr {
    docker_ok(&[
        "network",
        "inspect",
        "--format",
        "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
        GWBRIDGE,
    ])
    .parse()
    .expect("docker_gwbridge has an IPv4 gateway")
}

/// `docker_gwbridge`'s endpoints: container id → address.
fn gwbridge_endpoints() -> BTreeMap<String, Ipv4Addr> {
    let text = docker_ok(&[
        "network",
        "inspect",
        "--format",
        "{{range $id, $e := .Containers}}{{$id}} {{$e.IPv4Address}}\n{{end}}",
        GWBRIDGE,
    ]);
    text.lines()
        .filter_map(|l| {
            let (id, addr) = l.split_once(' ')?;
            Some((id.to_string(), addr.split('/').next()?.parse().ok()?))
        })
        .collect()
}

/// The running (or stopping) task containers of a service, by full id.
fn task_containers(service: &str) -> Vec<String> {
    let filter = format!("label=com.docker.swarm.service.name={service}");
    String::from_utf8_lossy(
        &docker_quiet(&["ps", "--all", "--quiet", "--no-trunc", "--filter", &filter]).stdout,
    )
    .split_whitespace()
    .map(str::to_string)
    .collect()
}

fn running_tasks(service: &str) -> Vec<String> {
    let filter = format!("label=com.docker.swarm.service.name={service}");
    String::from_utf8_lossy(
        &docker_quiet(&["ps", "--quiet", "--no-trunc", "--filter", &filter]).stdout,
    )
    .split_whitespace()
    .map(str::to_string)
    .collect()
}

fn scale(pairs: &[(&str, u32)]) {
    let mut args = vec!["service".to_string(), "scale".into(), "--detach".into()];
    args.extend(pairs.iter().map(|(s, n)| format!("{s}={n}")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    docker_ok(&args);
}

/// Waits until `service` runs exactly `n` tasks, and no stopped one still holds an address.
fn wait_scaled(service: &str, n: usize) {
    eventually(
        Duration::from_secs(60),
        &format!("{service} to run {n} tasks"),
        || {
            let running = running_tasks(service);
            let endpoints = gwbridge_endpoints();
            running.len() == n
                && task_containers(service).len() == n
                && running.iter().all(|id| endpoints.contains_key(id))
        },
        || docker_ok(&["service", "ps", service]),
    );
}

// ---------------------------------------------------------------------------------------------
// The test

/// What each task writes to the shared directory: the SDK probe's JSON line, then one line per
/// request of a tight loop of plain IMDSv1 role listings (`role=<name>`, or `role=none` when it
/// is refused), from its first moment until it is stopped.
fn task_script(endpoint: &str) -> String {
    format!(
        "/usr/local/bin/imdsd probe --endpoint {endpoint} --retry-for 20 \
           >/out/$SVC-$HOSTNAME.probe 2>/dev/null & \
         while true; do \
           echo \"role=$(/bin/busybox wget -q -O - {endpoint}/latest/meta-data/iam/security-credentials/ 2>/dev/null || echo none)\" >>/out/$SVC-$HOSTNAME; \
           /bin/busybox usleep 20000; \
         done"
    )
}

#[test]
fn swarm_tasks_get_their_own_services_roles_through_docker_gwbridge_and_scaling_never_crosses_them()
{
    docker::require_docker();
    let image = docker::test_image();
    let pid = std::process::id().to_string();
    let lock = Swarm::lock();
    remove_leftovers(&pid);
    let mut swarm = Swarm {
        _lock: lock,
        created_swarm: false,
        created_gwbridge: false,
    };

    // The node: docker_gwbridge with a gateway imdsd serves, made before the swarm, by
    // `imdsd network up --layout swarm` (on a link-local subnet of its own: 169.254.169.0/24
    // is the compose test's).
    let state = swarm_state();
    match state.as_str() {
        "inactive" if !docker::network_exists(GWBRIDGE) => {
            let used = octets_in_use();
            let mut made = None;
            for n in (200..=250u8).filter(|n| !used.contains(n)) {
                let subnet = format!("169.254.{n}.0/24");
                let address = format!("169.254.{n}.254");
                let flags = [
                    "--layout",
                    "swarm",
                    "--subnet",
                    &subnet,
                    "--address",
                    &address,
                ];
                let dry = imdsd_network(&[&["up", "--dry-run"][..], &flags].concat());
                assert!(dry.status.success(), "up --dry-run: {}", show(&dry));
                let up = imdsd_network(&[&["up"][..], &flags].concat());
                if !up.status.success() && String::from_utf8_lossy(&up.stderr).contains("overlap") {
                    continue;
                }
                swarm.created_gwbridge = up.status.success();
                swarm.record();
                assert!(up.status.success(), "up: {}", show(&up));
                let stdout = String::from_utf8_lossy(&up.stdout).into_owned();
                assert!(
                    stdout.starts_with("added: docker network docker_gwbridge ")
                        && stdout
                            .contains(&format!("exists: address {address}/24 on docker_gwbridge"))
                        && stdout.contains("next: join the swarm"),
                    "{}",
                    show(&up)
                );
                let again = imdsd_network(&[&["up"][..], &flags].concat());
                assert!(again.status.success(), "second up: {}", show(&again));
                assert!(
                    !String::from_utf8_lossy(&again.stdout).contains("added:"),
                    "a second up adds nothing: {}",
                    show(&again)
                );
                made = Some(address);
                break;
            }
            let address = made.expect("a free 169.254.200-250.0/24 for docker_gwbridge");
            let init = docker_quiet(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
            swarm.created_swarm = init.status.success();
            swarm.record();
            assert!(
                init.status.success(),
                "cannot create a single-node swarm: {}",
                show(&init)
            );
            assert_eq!(
                gwbridge_gateway().to_string(),
                address,
                "Swarm kept our bridge"
            );
            // While the node is in the swarm, down leaves the bridge and says why.
            let down = imdsd_network(&["down", "--layout", "swarm"]);
            assert_eq!(down.status.code(), Some(1), "{}", show(&down));
            assert!(
                String::from_utf8_lossy(&down.stderr).contains("docker swarm leave"),
                "{}",
                show(&down)
            );
        }
        "inactive" => {
            // Someone's docker_gwbridge: used as it is.
            let init = docker_quiet(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
            swarm.created_swarm = init.status.success();
            swarm.record();
            assert!(
                init.status.success(),
                "cannot create a swarm: {}",
                show(&init)
            );
        }
        "active" => eprintln!("swarm test: using the active swarm; it stays"),
        other => panic!("the node's swarm is {other:?}; this test needs it inactive or active"),
    }
    let gateway = gwbridge_gateway();
    let endpoint = format!("http://{gateway}");

    // The overlay network the services share.
    let overlay = format!("imdsd-test-swarm-{pid}");
    let pid_label = format!("imdsd-test.pid={pid}");
    docker_ok(&[
        "network",
        "create",
        "--driver",
        "overlay",
        "--attachable",
        "--label",
        "imdsd-test=1",
        "--label",
        &pid_label,
        &overlay,
    ]);

    // imdsd from the stack file, on every node (this one), at the bridge's gateway.
    let stack = format!("imdsd-test-swarm-{pid}");
    let listen = format!("{gateway}:80");
    let stack_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/swarm/imdsd-stack.yml");
    let deploy = run(
        "docker",
        &[
            "stack",
            "deploy",
            "--compose-file",
            stack_file.to_str().expect("utf8"),
            &stack,
        ],
        &[
            ("IMDSD_IMAGE", image.as_str()),
            ("IMDSD_LISTEN", listen.as_str()),
            ("IMDSD_FAKE_CREDENTIALS", "true"),
            ("IMDSD_ADMIN_LISTEN", "none"),
        ],
    );
    assert!(
        deploy.status.success(),
        "docker stack deploy: {}",
        show(&deploy)
    );
    let imdsd_service = format!("{stack}_imdsd");
    let logs = || {
        String::from_utf8_lossy(&docker_quiet(&["service", "logs", "--raw", &imdsd_service]).stdout)
            .into_owned()
    };
    eventually(
        Duration::from_secs(60),
        "imdsd (the stack's global service) to answer on the gateway",
        || {
            TcpStream::connect_timeout(&SocketAddr::from((gateway, 80)), Duration::from_secs(1))
                .is_ok()
        },
        || {
            format!(
                "{}\n{}",
                docker_ok(&["service", "ps", "--no-trunc", &imdsd_service]),
                logs()
            )
        },
    );

    // Two services: one names its role in its environment, the other only in a service label.
    let out = tempfile::tempdir().expect("tempdir");
    let mount = format!("type=bind,src={},dst=/out", out.path().display());
    let script = task_script(&endpoint);
    let service = |name: &str, svc: &str, role: &[&str]| {
        let mut args: Vec<String> = [
            "service",
            "create",
            "--detach",
            "--no-resolve-image",
            "--name",
            name,
            "--label",
            "imdsd-test=1",
            "--label",
            &pid_label,
            "--network",
            &overlay,
            "--endpoint-mode",
            "dnsrr",
            "--stop-grace-period",
            "1s",
            "--mount",
            &mount,
            "--env",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("SVC={svc}"));
        args.extend(role.iter().map(|s| s.to_string()));
        args.extend(["--entrypoint".into(), "/bin/busybox".into(), image.clone()]);
        args.extend(["sh".into(), "-c".into(), script.clone()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_ok(&args);
    };
    let a = format!("imdsd-test-a-{pid}");
    let b = format!("imdsd-test-b-{pid}");
    service(&a, "a", &["--env", "IAM_ROLE=role-a"]);
    service(&b, "b", &["--label", "imdsd.role=role-b"]);
    wait_scaled(&a, 1);
    wait_scaled(&b, 1);

    // Each task's SDK gets its own service's role.
    let probes = |svc: &str| -> Vec<serde_json::Value> {
        std::fs::read_dir(out.path())
            .expect("read the tasks' directory")
            .filter_map(|e| {
                let path: PathBuf = e.ok()?.path();
                let name = path.file_name()?.to_str()?.to_string();
                (name.starts_with(&format!("{svc}-")) && name.ends_with(".probe")).then_some(path)
            })
            .filter_map(|p| {
                let text = std::fs::read_to_string(&p).ok()?;
                serde_json::from_str(text.lines().last()?).ok()
            })
            .collect()
    };
    for (svc, role) in [("a", "role-a"), ("b", "role-b")] {
        eventually(
            Duration::from_secs(40),
            &format!("service {svc}'s probe"),
            || !probes(svc).is_empty(),
            logs,
        );
        for p in probes(svc) {
            assert_eq!(p["ok"], true, "{svc}: {p}\n{}", logs());
            assert_eq!(p["role"], role, "{svc}: {p}");
        }
    }

    // The swap: both services down, then the one that held the higher address up first. Docker
    // hands out docker_gwbridge addresses lowest first, at once: it takes the other's.
    let address_of = |service: &str| -> Ipv4Addr {
        let endpoints = gwbridge_endpoints();
        let ids = running_tasks(service);
        assert_eq!(ids.len(), 1, "{service}: {ids:?}");
        endpoints[&ids[0]]
    };
    let (old_a, old_b) = (address_of(&a), address_of(&b));
    eprintln!("swarm test: a at {old_a}, b at {old_b}");
    scale(&[(&a, 0), (&b, 0)]);
    wait_scaled(&a, 0);
    wait_scaled(&b, 0);
    let (first, second, lower) = if old_a > old_b {
        (&a, &b, old_b)
    } else {
        (&b, &a, old_a)
    };
    scale(&[(first, 1)]);
    wait_scaled(first, 1);
    scale(&[(second, 1)]);
    wait_scaled(second, 1);
    let (new_a, new_b) = (address_of(&a), address_of(&b));
    eprintln!("swarm test: after the swap, a at {new_a}, b at {new_b}");
    if swarm.created_swarm {
        // Nothing else runs tasks in a swarm of this test's own.
        assert_eq!(address_of(first), lower, "the addresses were swapped");
    }

    // Churn: one service stops while the other starts, back and forth, so that freed addresses
    // are taken by the other service's new tasks at once, each asking from its first moment.
    for _ in 0..3 {
        scale(&[(&a, 0), (&b, 3)]);
        wait_scaled(&a, 0);
        wait_scaled(&b, 3);
        scale(&[(&a, 3), (&b, 0)]);
        wait_scaled(&a, 3);
        wait_scaled(&b, 0);
    }
    scale(&[(&a, 0)]);
    wait_scaled(&a, 0);

    // Not one request of any task was ever answered with the other service's role, and every
    // service got its own many times.
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut tasks = BTreeMap::<String, usize>::new();
    for entry in std::fs::read_dir(out.path()).expect("read the tasks' directory") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if name.ends_with(".probe") {
            continue;
        }
        let svc = name.split('-').next().unwrap_or_default().to_string();
        *tasks.entry(svc.clone()).or_default() += 1;
        for line in std::fs::read_to_string(&path).expect("read").lines() {
            *counts.entry((svc.clone(), line.to_string())).or_default() += 1;
        }
    }
    eprintln!("swarm test: tasks {tasks:?}, answers {counts:?}");
    for ((svc, line), n) in &counts {
        let own = format!("role=role-{svc}");
        assert!(
            *line == own || line == "role=none",
            "a task of service {svc} got {line:?} ({n} times): another task's role\n{}",
            logs()
        );
    }
    for svc in ["a", "b"] {
        assert!(tasks.get(svc).copied().unwrap_or(0) >= 8, "{tasks:?}");
        assert!(
            counts
                .get(&(svc.to_string(), format!("role=role-{svc}")))
                .copied()
                .unwrap_or(0)
                > 100,
            "{counts:?}"
        );
        for p in probes(svc) {
            if let Some(role) = p["role"].as_str() {
                assert_eq!(role, format!("role-{svc}"), "{p}");
            }
        }
    }

    // Down leaves nothing: services, stack, overlay, then the swarm and the bridge if ours.
    remove_leftovers(&pid);
    assert!(task_containers(&a).is_empty() && task_containers(&b).is_empty());
    if swarm.created_swarm && swarm.created_gwbridge {
        docker_ok(&["swarm", "leave", "--force"]);
        swarm.created_swarm = false;
        swarm.record();
        let down = imdsd_network(&["down", "--layout", "swarm"]);
        assert!(down.status.success(), "down: {}", show(&down));
        assert_eq!(
            String::from_utf8_lossy(&down.stdout),
            "removed: docker network docker_gwbridge\n",
            "{}",
            show(&down)
        );
        swarm.created_gwbridge = false;
        swarm.record();
        assert!(!docker::network_exists(GWBRIDGE));
    }
}
