//! End-to-end harness on a real Docker Engine: builds the daemon's image from the binary under
//! test, creates throwaway bridge networks on link-local subnets and runs containers on them, all
//! through the `docker` CLI (simple, and exactly what an operator would type).
//!
//! Include it from an integration test with
//! `#[path = "support/docker.rs"] mod docker;`.
//!
//! Everything created here is labelled `imdsd-test=1` plus `imdsd-test.pid=<pid of the test
//! process>`, and named `imdsd-test-<label>-<pid>-<n>`. `Drop` removes networks and containers,
//! also when a test panics; [`cleanup_stale`] removes what a killed test process (a nextest
//! timeout, say) left behind, so a crashed run leaves nothing for the next one to trip over.
//!
//! The test image is the release layout of `scripts/build-image` plus Debian's static busybox at
//! `/bin/busybox` (the entrypoint is still imdsd): tests can run raw HTTP from a container
//! (`busybox wget`, `busybox nc`) independently of `imdsd probe`, and a developer can
//! `docker exec -it <container> /bin/busybox sh` into a failing test's container.
//!
//! Gateway addresses: the bridge driver creates the Linux bridge and assigns the gateway address
//! to it when the network is created (Docker 20.10 here: `br-<id>` shows `169.254.N.1/24` while
//! still DOWN, before any container attaches), so a host process can bind the gateway address
//! right after [`TestNetwork::create`]; the bridge comes up, and traffic flows, once a container
//! joins. `create` still checks that the address is bindable and waits briefly for it, so a
//! Docker that behaves differently fails there with a clear message, not as a mysterious timeout.
#![allow(dead_code)]

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Label carried by every network and container this harness creates (value "1").
pub const TEST_LABEL: &str = "imdsd-test";
/// Label holding the pid of the test process that created the resource.
pub const PID_LABEL: &str = "imdsd-test.pid";
/// Repository of the test images; the tag is a content hash.
pub const IMAGE_REPO: &str = "imdsd-test";

/// A test image whose hash no test process has asked for in this long is removed. Short on
/// purpose (every `cargo build` makes a new ~60 MB image), yet far longer than the seconds
/// between a process looking an image up and starting its container; an image that a container
/// still uses is never removed (`docker image rm` without `--force` refuses).
const STALE_IMAGE_AGE: Duration = Duration::from_secs(10 * 60);

static COUNTER: AtomicU32 = AtomicU32::new(0);

// ---------------------------------------------------------------------------------------------
// The docker CLI

/// Runs `docker ARGS` to completion. `Err` only when the CLI cannot be started at all.
fn try_docker<I, S>(args: I) -> std::io::Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
}

/// Runs `docker ARGS`; panics if the CLI cannot be started (the caller judges the exit status).
fn docker<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    try_docker(args).unwrap_or_else(|e| panic!("cannot run the docker CLI: {e}"))
}

/// Runs `docker ARGS`, panicking with its stderr unless it succeeds; returns stdout, trimmed.
pub fn docker_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<S> = args.into_iter().collect();
    let out = docker(&args);
    if !out.status.success() {
        panic!(
            "`docker {}` failed ({}): {}",
            show_args(&args),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn show_args<S: AsRef<OsStr>>(args: &[S]) -> String {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// Panics, failing the test (never skipping it), unless a Docker Engine answers `docker info`.
pub fn require_docker() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        match Command::new("docker")
            .args(["info", "--format", "{{.ServerVersion}}"])
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "these end-to-end tests need a running Docker Engine, and `docker info` failed: {}\n\
                 Start dockerd (or point DOCKER_HOST at one); the tests fail rather than skip \
                 without it.",
                stderr_of(&out)
            ),
            Err(e) => panic!(
                "these end-to-end tests need the docker CLI and a running Docker Engine; \
                 running `docker` failed: {e}"
            ),
        }
    });
}

/// `imdsd-test-<label>-<pid>-<n>`, unique within the machine while this process lives.
fn unique_name(label: &str) -> String {
    let label: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("imdsd-test-{label}-{}-{n}", std::process::id())
}

/// The labels every harness resource carries.
fn ownership_labels() -> [String; 4] {
    [
        "--label".into(),
        format!("{TEST_LABEL}=1"),
        "--label".into(),
        format!("{PID_LABEL}={}", std::process::id()),
    ]
}

/// True when a container with this name or id exists (in any state).
pub fn container_exists(name_or_id: &str) -> bool {
    docker(["container", "inspect", "--format", "{{.Id}}", name_or_id])
        .status
        .success()
}

/// True when a network with this name or id exists.
pub fn network_exists(name_or_id: &str) -> bool {
    docker(["network", "inspect", "--format", "{{.Id}}", name_or_id])
        .status
        .success()
}

// ---------------------------------------------------------------------------------------------
// The image

/// The image of the binary under test (`CARGO_BIN_EXE_imdsd`), tagged `imdsd-test:<hash>`.
///
/// The hash covers the binary, `Dockerfile` and `scripts/build-image`, so any change to what
/// goes into the image makes a new tag. It is built at most once per hash on this machine: a
/// `OnceLock` covers the threads of one test process, and an exclusive `flock(1)` on
/// `/tmp/imdsd-test-image.lock` covers the many processes nextest runs at once. Tags of other hashes
/// that no test has used lately are removed, so images do not pile up.
pub fn test_image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(build_test_image).clone()
}

fn build_test_image() -> String {
    require_docker();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let binary = Path::new(env!("CARGO_BIN_EXE_imdsd"));
    let script = root.join("scripts/build-image");
    let dockerfile = root.join("Dockerfile");
    let hash = content_hash(&[binary, &script, &dockerfile]);
    let tag = format!("{IMAGE_REPO}:{hash}");
    mark_image_in_use(&hash);

    if !docker(["image", "inspect", "--format", "{{.Id}}", &tag])
        .status
        .success()
    {
        // Checked again under the lock: another process may have built it while we waited.
        let lock = coordination_dir().join("imdsd-test-image.lock");
        let out = Command::new("flock")
            .args(["--exclusive", "--timeout", "600"])
            .arg(&lock)
            .args([
                "bash",
                "-c",
                r#"docker image inspect "$1" >/dev/null 2>&1 || exec "$2" --with-busybox --binary "$3" --tag "$1""#,
                "build-image",
                &tag,
            ])
            .arg(&script)
            .arg(binary)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run flock(1) (util-linux) to build {tag}: {e}"));
        if !out.status.success() {
            panic!(
                "building the test image {tag} with {} failed ({}):\n{}\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    prune_test_images(&hash);
    tag
}

/// First 12 hex digits of the SHA-256 of the files' SHA-256s (sha256sum(1): fast even on a
/// 50 MB debug binary, where a SHA-256 compiled at opt-level 0 would take seconds).
fn content_hash(files: &[&Path]) -> String {
    let out = Command::new("sha256sum")
        .args(files)
        .output()
        .expect("run sha256sum (coreutils)");
    assert!(
        out.status.success(),
        "sha256sum {files:?} failed: {}",
        stderr_of(&out)
    );
    // Only the digests: the same files in another checkout give the same tag.
    let digests: String = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .fold(String::new(), |mut acc, d| {
            let _ = writeln!(acc, "{d}");
            acc
        });
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum (coreutils)");
    child
        .stdin
        .take()
        .expect("sha256sum stdin")
        .write_all(digests.as_bytes())
        .expect("write to sha256sum");
    let out = child.wait_with_output().expect("sha256sum output");
    String::from_utf8_lossy(&out.stdout)
        .chars()
        .take(12)
        .collect()
}

/// Where test processes coordinate about images: /tmp itself, not `$TMPDIR`, because the Docker
/// engine is shared by the whole machine, and so must the lock and the markers be (a session with
/// its own `$TMPDIR` would otherwise prune images another one is about to use).
fn coordination_dir() -> PathBuf {
    let tmp = Path::new("/tmp");
    if tmp.is_dir() {
        tmp.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Directory of per-hash marker files whose mtime says when a test last used that image.
fn image_marker_dir() -> PathBuf {
    coordination_dir().join("imdsd-test-images")
}

fn mark_image_in_use(hash: &str) {
    let dir = image_marker_dir();
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(f) = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(hash))
    {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Best effort: removes `imdsd-test:*` tags other than `current` that no test used lately.
fn prune_test_images(current: &str) {
    let Ok(out) = try_docker(["image", "ls", IMAGE_REPO, "--format", "{{.Tag}}"]) else {
        return;
    };
    let dir = image_marker_dir();
    for tag in String::from_utf8_lossy(&out.stdout).lines() {
        let tag = tag.trim();
        if tag.is_empty() || tag == current || tag == "<none>" {
            continue;
        }
        let marker = dir.join(tag);
        let stale = match std::fs::metadata(&marker).and_then(|m| m.modified()) {
            Ok(used) => used.elapsed().is_ok_and(|age| age > STALE_IMAGE_AGE),
            Err(_) => true,
        };
        if stale {
            let removed = try_docker(["image", "rm", &format!("{IMAGE_REPO}:{tag}")])
                .is_ok_and(|o| o.status.success());
            if removed {
                let _ = std::fs::remove_file(marker);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Networks

/// A bridge network on a link-local subnet `169.254.N.0/24` (never 169, the compose layout's
/// `169.254.169.0/24`, nor 170), gateway `169.254.N.1`. The host owns the gateway address, so a
/// daemon started by the test can listen there and see containers' real source addresses.
/// Dropping it removes the network and any container still attached.
#[derive(Debug)]
pub struct TestNetwork {
    pub name: String,
    pub subnet: String,
    pub gateway: IpAddr,
    /// The host's IPv6 address on a dual-stack network (`fd00:db8:N::1`).
    pub gateway6: Option<IpAddr>,
}

impl TestNetwork {
    /// Creates `imdsd-test-<label>-<pid>-<n>` on a free `169.254.N.0/24`.
    pub fn create(label: &str) -> TestNetwork {
        Self::create_on_free_subnet(label, false)
    }

    /// As [`TestNetwork::create`], plus IPv6 on `fd00:db8:N::/64` (the host at `::1`).
    pub fn create_dual_stack(label: &str) -> TestNetwork {
        Self::create_on_free_subnet(label, true)
    }

    fn create_on_free_subnet(label: &str, ipv6: bool) -> TestNetwork {
        require_docker();
        cleanup_stale_once();
        let name = unique_name(label);
        let used = link_local_octets_in_use();
        let candidates: Vec<u8> = (1..=254u8)
            .filter(|n| *n != 169 && *n != 170 && !used.contains(n))
            .collect();
        assert!(
            !candidates.is_empty(),
            "every 169.254.N.0/24 is taken by a Docker network"
        );
        // Concurrent test processes start at different places, and retry past each other's
        // choices: Docker refuses an overlapping subnet ("Pool overlaps ...").
        let start = pseudo_random() as usize % candidates.len();
        let mut last_error = String::new();
        for i in 0..candidates.len() {
            let n = candidates[(start + i) % candidates.len()];
            match Self::try_create(&name, n, 1, ipv6) {
                Ok(network) => return network,
                Err(e) if e.contains("overlap") => last_error = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("no free link-local /24 for a test network; last error: {last_error}")
    }

    /// The container-credentials layout: `169.254.170.0/24` with the host at `169.254.170.2`,
    /// the address the SDKs use for `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`. Ordinary test
    /// networks never take this subnet; only one test may use it at a time.
    pub fn create_container_credentials(label: &str) -> TestNetwork {
        require_docker();
        cleanup_stale_once();
        let name = unique_name(label);
        Self::try_create(&name, 170, 2, false).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `docker network create` on `169.254.<n>.0/24` with the gateway at `.<gateway_host>`.
    fn try_create(name: &str, n: u8, gateway_host: u8, ipv6: bool) -> Result<TestNetwork, String> {
        let subnet = format!("169.254.{n}.0/24");
        let gateway = Ipv4Addr::new(169, 254, n, gateway_host);
        let mut args: Vec<String> = vec![
            "network".into(),
            "create".into(),
            "--driver".into(),
            "bridge".into(),
            "--subnet".into(),
            subnet.clone(),
            "--gateway".into(),
            gateway.to_string(),
        ];
        let gateway6: Option<IpAddr> = ipv6.then(|| {
            let g = std::net::Ipv6Addr::new(0xfd00, 0x0db8, u16::from(n), 0, 0, 0, 0, 1);
            args.extend([
                "--ipv6".into(),
                "--subnet".into(),
                format!("fd00:db8:{n:x}::/64"),
                "--gateway".into(),
                g.to_string(),
            ]);
            IpAddr::V6(g)
        });
        args.extend(ownership_labels());
        args.push(name.to_string());
        let mut out = docker(&args);
        if !out.status.success() && stderr_of(&out).contains("already exists") {
            // Our name, from an earlier process that had our pid: it is stale.
            remove_network(name);
            out = docker(&args);
        }
        if !out.status.success() {
            return Err(format!(
                "`docker {}` failed: {}",
                show_args(&args),
                stderr_of(&out)
            ));
        }
        let network = TestNetwork {
            name: name.to_string(),
            subnet,
            gateway: IpAddr::V4(gateway),
            gateway6,
        };
        network.wait_gateway_bindable();
        Ok(network)
    }

    /// The address `169.254.N.<host>` in this network (for a container's fixed `ip`).
    pub fn host(&self, host: u8) -> IpAddr {
        match self.gateway {
            IpAddr::V4(gw) => {
                let [a, b, c, _] = gw.octets();
                IpAddr::V4(Ipv4Addr::new(a, b, c, host))
            }
            IpAddr::V6(_) => unreachable!("test networks are IPv4"),
        }
    }

    fn wait_gateway_bindable(&self) {
        self.wait_bindable(self.gateway);
    }

    /// Waits until the host can bind its IPv6 gateway address. A new IPv6 address stays
    /// "tentative" until duplicate address detection is done, which needs the bridge up, i.e. a
    /// container attached: call this after starting one.
    pub fn wait_ipv6_gateway(&self) {
        if let Some(g6) = self.gateway6 {
            self.wait_bindable(g6);
        }
    }

    fn wait_bindable(&self, gateway: IpAddr) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match TcpListener::bind((gateway, 0)) {
                Ok(_) => return,
                Err(e) if Instant::now() >= deadline => panic!(
                    "network {} was created but its gateway {gateway} is not an address of this \
                     host ({e}); `ip addr` should show it on the network's bridge",
                    self.name
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        remove_network(&self.name);
    }
}

/// Force-removes the containers attached to a network, then the network. Never panics (it runs
/// in `Drop`, possibly while a failed test unwinds).
fn remove_network(name_or_id: &str) {
    if let Ok(out) = try_docker([
        "network",
        "inspect",
        "--format",
        "{{range $id, $c := .Containers}}{{$id}} {{end}}",
        name_or_id,
    ]) {
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = try_docker(["rm", "--force", "--volumes", id]);
        }
    }
    // `docker rm -f` returns once the container is gone, but give a racing removal a moment.
    for attempt in 0..5 {
        match try_docker(["network", "rm", name_or_id]) {
            Ok(out) if out.status.success() => return,
            Ok(out) => {
                let err = stderr_of(&out);
                if err.contains("not found") || err.contains("No such network") {
                    return;
                }
                if attempt == 4 {
                    eprintln!("imdsd test harness: could not remove network {name_or_id}: {err}");
                }
            }
            Err(e) => {
                eprintln!("imdsd test harness: could not remove network {name_or_id}: {e}");
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Third octets of the `169.254.N.0/24`-style subnets Docker networks use now.
fn link_local_octets_in_use() -> HashSet<u8> {
    let ids = docker_ok(["network", "ls", "--quiet"]);
    let mut args = vec![
        "network",
        "inspect",
        "--format",
        "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
    ];
    args.extend(ids.split_whitespace());
    // A network removed between `ls` and `inspect` fails the inspect; then there is nothing to
    // avoid from this list, and a clash is still caught by Docker's overlap check.
    let out = docker(&args);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|subnet| subnet.strip_prefix("169.254."))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect()
}

/// Differs between processes and calls; no need for a real random number here.
fn pseudo_random() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    (u64::from(std::process::id()) << 20) ^ nanos ^ u64::from(COUNTER.load(Ordering::Relaxed))
}

// ---------------------------------------------------------------------------------------------
// Containers

/// How to run a container. `network` may also be Docker's "none" or "bridge"; empty means the
/// default bridge. The image's entrypoint is imdsd, so `args` are imdsd's (e.g. `probe
/// --endpoint http://169.254.N.1:PORT --hold 60`); set `entrypoint` to `/bin/busybox` for a
/// shell tool instead.
#[derive(Debug, Clone, Default)]
pub struct RunOpts {
    /// Short label; the container is named `imdsd-test-<name>-<pid>-<n>`.
    pub name: String,
    /// Use `name` as the container's whole name (e.g. an earlier harness container's, to start
    /// a new incarnation under the same name once that one is removed).
    pub exact_name: bool,
    pub network: String,
    /// A fixed address on `network`.
    pub ip: Option<IpAddr>,
    pub image: String,
    pub env: Vec<(String, String)>,
    /// Labels besides the harness's own.
    pub labels: Vec<(String, String)>,
    pub entrypoint: Option<String>,
    pub args: Vec<String>,
    /// More `docker run` options, placed before the image (e.g. `-v`, `--cap-add`).
    pub extra: Vec<String>,
}

impl RunOpts {
    /// The test image on `network`.
    pub fn new(network: &TestNetwork, name: &str) -> RunOpts {
        RunOpts {
            name: name.to_string(),
            network: network.name.clone(),
            image: test_image(),
            ..RunOpts::default()
        }
    }

    /// Names the container exactly `name` (see [`RunOpts::exact_name`]).
    pub fn named_exactly(mut self, name: &str) -> RunOpts {
        self.name = name.to_string();
        self.exact_name = true;
        self
    }

    pub fn ip(mut self, ip: IpAddr) -> RunOpts {
        self.ip = Some(ip);
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> RunOpts {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> RunOpts {
        self.labels.push((key.to_string(), value.to_string()));
        self
    }

    pub fn entrypoint(mut self, entrypoint: &str) -> RunOpts {
        self.entrypoint = Some(entrypoint.to_string());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> RunOpts
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn extra<I, S>(mut self, extra: I) -> RunOpts
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra.extend(extra.into_iter().map(Into::into));
        self
    }
}

/// A detached container; dropping it force-removes it.
#[derive(Debug)]
pub struct TestContainer {
    pub id: String,
    pub name: String,
    /// Its address on the requested network: the fixed one, or what Docker assigned (read right
    /// after start; `None` if it had already exited, or on "none").
    pub ip: Option<IpAddr>,
    removed: bool,
}

impl TestContainer {
    /// `docker run --detach` with the harness's labels; panics with Docker's error on failure.
    pub fn run(opts: &RunOpts) -> TestContainer {
        require_docker();
        cleanup_stale_once();
        assert!(!opts.image.is_empty(), "RunOpts.image is empty");
        let name = if opts.exact_name {
            opts.name.clone()
        } else {
            unique_name(if opts.name.is_empty() {
                "container"
            } else {
                &opts.name
            })
        };
        let mut args: Vec<String> = vec![
            "run".into(),
            "--detach".into(),
            // No registry: a missing image must fail at once, not try a pull.
            "--pull".into(),
            "never".into(),
            "--name".into(),
            name.clone(),
        ];
        args.extend(ownership_labels());
        if !opts.network.is_empty() {
            args.extend(["--network".into(), opts.network.clone()]);
        }
        if let Some(ip) = opts.ip {
            args.extend(["--ip".into(), ip.to_string()]);
        }
        for (k, v) in &opts.labels {
            args.extend(["--label".into(), format!("{k}={v}")]);
        }
        for (k, v) in &opts.env {
            args.extend(["--env".into(), format!("{k}={v}")]);
        }
        if let Some(entrypoint) = &opts.entrypoint {
            args.extend(["--entrypoint".into(), entrypoint.clone()]);
        }
        args.extend(opts.extra.iter().cloned());
        args.push(opts.image.clone());
        args.extend(opts.args.iter().cloned());

        let mut out = docker(&args);
        if !out.status.success() && opts.exact_name && stderr_of(&out).contains("is already in use")
        {
            // Someone else's container, or one the test has not removed yet: leave it alone.
            panic!("`docker {}` failed: {}", show_args(&args), stderr_of(&out));
        }
        if !out.status.success() && stderr_of(&out).contains("is already in use") {
            // Our name, from an earlier process that had our pid: it is stale.
            let _ = try_docker(["rm", "--force", "--volumes", &name]);
            out = docker(&args);
        }
        if !out.status.success() {
            // `docker run -d` can create the container and then fail to start it.
            let _ = try_docker(["rm", "--force", "--volumes", &name]);
            panic!("`docker {}` failed: {}", show_args(&args), stderr_of(&out));
        }
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let ip = opts.ip.or_else(|| {
            if opts.network.is_empty() || opts.network == "none" {
                return None;
            }
            let template = format!(
                "{{{{with index .NetworkSettings.Networks \"{}\"}}}}{{{{.IPAddress}}}}{{{{end}}}}",
                opts.network
            );
            let out = docker(["container", "inspect", "--format", &template, &id]);
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        });
        TestContainer {
            id,
            name,
            ip,
            removed: false,
        }
    }

    /// Everything the container wrote: stdout, then stderr.
    pub fn logs(&self) -> String {
        let out = docker(["logs", &self.id]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// What the container wrote to stdout only (`imdsd probe` prints its JSON line there).
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&docker(["logs", &self.id]).stdout).into_owned()
    }

    /// What the container wrote to stderr only (imdsd's logs).
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&docker(["logs", &self.id]).stderr).into_owned()
    }

    /// Waits for the container to exit and returns its exit code; panics, showing its logs, if
    /// it still runs after `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> i64 {
        let mut child = Command::new("docker")
            .args(["wait", &self.id])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run `docker wait`");
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait().expect("poll `docker wait`") {
                Some(_) => break,
                None if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "container {} still running after {timeout:?}; its logs:\n{}",
                        self.name,
                        self.logs()
                    );
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        let out = child.wait_with_output().expect("`docker wait` output");
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim().parse().unwrap_or_else(|_| {
            panic!(
                "`docker wait {}` gave no exit code: {text:?} {}",
                self.name,
                stderr_of(&out)
            )
        })
    }

    /// `docker exec` in the running container; returns the exit code and stdout then stderr.
    pub fn exec<I, S>(&self, command: I) -> (i64, String)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut args: Vec<std::ffi::OsString> = vec!["exec".into(), self.id.clone().into()];
        args.extend(command.into_iter().map(|a| a.as_ref().to_os_string()));
        let out = docker(&args);
        let code = out.status.code().map_or(-1, i64::from);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (code, text)
    }

    /// `docker stop -t 1`: SIGTERM, then SIGKILL a second later.
    pub fn stop(&self) {
        docker_ok(["stop", "--time", "1", &self.id]);
    }

    /// `docker restart -t 1`: the same container (id, name, address) in a new incarnation.
    pub fn restart(&self) {
        docker_ok(["restart", "--time", "1", &self.id]);
    }

    /// Removes the container now (force), instead of at drop.
    pub fn rm(mut self) {
        self.remove();
    }

    fn remove(&mut self) {
        if !self.removed {
            self.removed = true;
            if let Ok(out) = try_docker(["rm", "--force", "--volumes", &self.id]) {
                let err = stderr_of(&out);
                if !out.status.success() && !err.contains("No such container") {
                    eprintln!(
                        "imdsd test harness: could not remove container {}: {err}",
                        self.name
                    );
                }
            }
        }
    }
}

impl Drop for TestContainer {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Runs a container to its end (give it no `--hold`): returns its exit code and its output
/// (stdout, then stderr), and removes it. Panics if it still runs after `timeout`.
pub fn run_to_completion(opts: &RunOpts, timeout: Duration) -> (i64, String) {
    let container = TestContainer::run(opts);
    let code = container.wait_exit(timeout);
    let logs = container.logs();
    container.rm();
    (code, logs)
}

// ---------------------------------------------------------------------------------------------
// Leftovers of dead test processes

fn cleanup_stale_once() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(cleanup_stale);
}

/// Whether the process `pid` (decimal) has ended: gone, or a zombie, which a killed process stays
/// until its parent (maybe a slow subreaper) reaps it. Anything that is not a pid is not "gone".
pub fn process_gone(pid: &str) -> bool {
    pid.parse::<u32>().is_ok_and(|pid| {
        match std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")) {
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            Err(_) => true,
        }
    })
}

/// Best effort: removes harness containers and networks whose creating process is gone (it was
/// killed before its `Drop`s ran). Only resources carrying the harness's pid label are touched.
pub fn cleanup_stale() {
    let dead = process_gone;
    let filter = format!("label={TEST_LABEL}=1");
    let format = format!("{{{{.ID}}}} {{{{.Label \"{PID_LABEL}\"}}}}");
    if let Ok(out) = try_docker(["ps", "--all", "--filter", &filter, "--format", &format]) {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            match line.split_once(' ') {
                Some((id, pid)) if dead(pid.trim()) => {
                    let _ = try_docker(["rm", "--force", "--volumes", id]);
                }
                _ => {}
            }
        }
    }
    if let Ok(out) = try_docker(["network", "ls", "--filter", &filter, "--format", &format]) {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            match line.split_once(' ') {
                Some((id, pid)) if dead(pid.trim()) => remove_network(id),
                _ => {}
            }
        }
    }
}
