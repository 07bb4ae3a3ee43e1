//! End-to-end harness on a real Docker Engine: builds the daemon's image from the binary under
//! test, creates throwaway bridge networks on link-local subnets and runs containers on them, all
//! through the `docker` CLI (simple, and exactly what an operator would type).
//!
//! Include it from an integration test with
//! `#[path = "support/docker.rs"] mod docker;`.
//!
//! The same networks and containers work on a test's own rootful Podman (`support/podman.rs`,
//! which includes this file's types): an [`Engine`] says which CLI runs the commands, and the
//! few places where the two CLIs differ (flags, messages) ask it.
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
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
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

/// Third octets of the `169.254.N.0/24` subnets that Podman test networks take, and Docker test
/// networks never do. Podman and Docker share the host's routing table but not their view of
/// networks: Docker creates a network whose subnet a Podman network (idle, so with no route on
/// the host yet) already has, and the two collide once both have containers. Kept clear of the
/// other ranges tests use: 169 (the metadata network), 170 (container credentials), and
/// 200–250 (tests/network.rs).
pub const PODMAN_OCTETS: std::ops::RangeInclusive<u8> = 100..=119;

static COUNTER: AtomicU32 = AtomicU32::new(0);

// ---------------------------------------------------------------------------------------------
// The engines' CLIs

/// Which engine a network or container lives in, and so which CLI runs the harness's commands:
/// the machine's Docker Engine, or a test's own rootful Podman, whose CLI needs that test's
/// configuration in its environment (see `support/podman.rs`).
#[derive(Debug, Clone, Default)]
pub enum Engine {
    #[default]
    Docker,
    Podman(Arc<PodmanCli>),
}

/// How to run one test's Podman.
#[derive(Debug)]
pub struct PodmanCli {
    /// `CONTAINERS_CONF` and `CONTAINERS_STORAGE_CONF`, for every `podman` command.
    pub env: Vec<(OsString, OsString)>,
    /// The test image, imported into this Podman's store (empty until it is).
    pub image: String,
    /// Its API service's socket, for what the CLI of Podman 4.3 cannot do.
    pub socket: PathBuf,
}

impl Engine {
    pub fn program(&self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman(_) => "podman",
        }
    }

    pub fn is_podman(&self) -> bool {
        matches!(self, Engine::Podman(_))
    }

    /// The engine's CLI with its environment, stdin closed.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(self.program());
        if let Engine::Podman(cli) = self {
            cmd.envs(cli.env.iter().map(|(k, v)| (k, v)));
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs `CLI ARGS` to completion. `Err` only when the CLI cannot be started at all.
    pub fn try_run<I, S>(&self, args: I) -> std::io::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command().args(args).output()
    }

    /// Runs `CLI ARGS`; panics if the CLI cannot be started (the caller judges the exit status).
    pub fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.try_run(args)
            .unwrap_or_else(|e| panic!("cannot run the {} CLI: {e}", self.program()))
    }

    /// Runs `CLI ARGS`, panicking with its stderr unless it succeeds; returns stdout, trimmed.
    pub fn run_ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<S> = args.into_iter().collect();
        let out = self.run(&args);
        if !out.status.success() {
            panic!(
                "`{} {}` failed ({}): {}",
                self.program(),
                show_args(&args),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The test image in this engine.
    pub fn image(&self) -> String {
        match self {
            Engine::Docker => test_image(),
            Engine::Podman(cli) => {
                assert!(!cli.image.is_empty(), "the test image is not imported yet");
                cli.image.clone()
            }
        }
    }

    /// `rm` of containers at once: Podman waits 10 s for a container that ignores SIGTERM
    /// (`sleep` as PID 1) unless told not to.
    fn rm_args(&self) -> &'static [&'static str] {
        match self {
            Engine::Docker => &["rm", "--force", "--volumes"],
            Engine::Podman(_) => &["rm", "--force", "--volumes", "--time", "0"],
        }
    }
}

/// Runs `docker ARGS` to completion. `Err` only when the CLI cannot be started at all.
fn try_docker<I, S>(args: I) -> std::io::Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Engine::Docker.try_run(args)
}

/// Runs `docker ARGS`; panics if the CLI cannot be started (the caller judges the exit status).
fn docker<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Engine::Docker.run(args)
}

/// Runs `docker ARGS`, panicking with its stderr unless it succeeds; returns stdout, trimmed.
pub fn docker_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Engine::Docker.run_ok(args)
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
pub fn unique_name(label: &str) -> String {
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
pub fn ownership_labels() -> [String; 4] {
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
    let hash = image_hash();
    let tag = format!("{IMAGE_REPO}:{hash}");
    if !docker(["image", "inspect", "--format", "{{.Id}}", &tag])
        .status
        .success()
    {
        // Checked again under the lock: another process may have built it while we waited.
        build_image_locked(
            &tag,
            r#"docker image inspect "$1" >/dev/null 2>&1 || exec "$2" --with-busybox --binary "$3" --tag "$1""#,
            &tag,
        );
    }
    prune_test_images(&hash);
    tag
}

/// The file system of the test image as a tarball (`scripts/build-image --rootfs-tar`), for
/// engines that import it (`podman import`) rather than build it with Docker, and its hash.
/// Built once per hash on this machine, under the same lock as the Docker image.
pub fn test_rootfs_tarball() -> (PathBuf, String) {
    let hash = image_hash();
    let dir = rootfs_dir();
    let _ = std::fs::create_dir_all(&dir);
    let tarball = dir.join(format!("{hash}.tar"));
    if !tarball.is_file() {
        build_image_locked(
            &tarball.display().to_string(),
            r#"[[ -f "$1" ]] || exec "$2" --with-busybox --binary "$3" --rootfs-tar "$1""#,
            &format!("the test image's file system {}", tarball.display()),
        );
    }
    prune_test_images(&hash);
    (tarball, hash)
}

/// The Dockerfile's instructions that describe the image rather than build it (`ENV`,
/// `ENTRYPOINT`, …), as `podman import --change` takes them: the image imported from
/// [`test_rootfs_tarball`] is configured exactly as the one Docker builds.
pub fn dockerfile_changes() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .map(str::trim)
        .filter(|line| {
            [
                "ENV ",
                "ENTRYPOINT ",
                "CMD ",
                "EXPOSE ",
                "WORKDIR ",
                "USER ",
                "LABEL ",
            ]
            .iter()
            .any(|k| line.starts_with(k))
        })
        .map(str::to_string)
        .collect()
}

/// The hash of what goes into the test image (the binary under test, `Dockerfile` and
/// `scripts/build-image`), marked as in use.
fn image_hash() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let binary = Path::new(env!("CARGO_BIN_EXE_imdsd"));
    let hash = content_hash(&[
        binary,
        &root.join("scripts/build-image"),
        &root.join("Dockerfile"),
    ]);
    mark_image_in_use(&hash);
    hash
}

/// Runs the bash `snippet` with `$1` = `target`, `$2` = scripts/build-image and `$3` = the binary
/// under test, holding an exclusive `flock(1)` on `/tmp/imdsd-test-image.lock`; panics with the
/// script's output if it fails.
fn build_image_locked(target: &str, snippet: &str, what: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("scripts/build-image");
    let lock = coordination_dir().join("imdsd-test-image.lock");
    let out = Command::new("flock")
        .args(["--exclusive", "--timeout", "600"])
        .arg(&lock)
        .args(["bash", "-c", snippet, "build-image", target])
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_imdsd"))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run flock(1) (util-linux) to build {what}: {e}"));
    if !out.status.success() {
        panic!(
            "building {what} with {} failed ({}):\n{}\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
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

/// Directory of the test image's file system tarballs, `<hash>.tar`.
fn rootfs_dir() -> PathBuf {
    coordination_dir().join("imdsd-test-rootfs")
}

/// Whether no test has used the image of `hash` lately (see [`STALE_IMAGE_AGE`]).
fn image_stale(hash: &str) -> bool {
    match std::fs::metadata(image_marker_dir().join(hash)).and_then(|m| m.modified()) {
        Ok(used) => used.elapsed().is_ok_and(|age| age > STALE_IMAGE_AGE),
        Err(_) => true,
    }
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

/// Best effort: removes `imdsd-test:*` tags and file system tarballs other than `current`'s that
/// no test used lately.
fn prune_test_images(current: &str) {
    if let Ok(entries) = std::fs::read_dir(rootfs_dir()) {
        for entry in entries.flatten() {
            let path = entry.path();
            let hash = path.file_stem().map(|s| s.to_string_lossy().into_owned());
            // Only finished tarballs: `<hash>.tar.partial` is being written.
            let tarball = path.extension().is_some_and(|e| e == "tar");
            if let Some(hash) = hash.filter(|h| tarball && h != current)
                && image_stale(&hash)
            {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
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
        if image_stale(tag) {
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
///
/// On Podman the gateway is on the host only while a container is attached (netavark creates
/// the bridge with the first container and deletes it with the last): see
/// [`TestNetwork::wait_gateway`].
#[derive(Debug)]
pub struct TestNetwork {
    pub name: String,
    pub subnet: String,
    pub gateway: IpAddr,
    /// The host's IPv6 address on a dual-stack network (`fd00:db8:N::1`).
    pub gateway6: Option<IpAddr>,
    pub engine: Engine,
    /// The subnet's claim among Podman test processes (see [`OctetClaim`]).
    claim: Option<OctetClaim>,
}

impl TestNetwork {
    /// Creates `imdsd-test-<label>-<pid>-<n>` on a free `169.254.N.0/24`.
    pub fn create(label: &str) -> TestNetwork {
        Self::create_on_free_subnet(&Engine::Docker, label, false)
    }

    /// As [`TestNetwork::create`], in `engine`.
    pub fn create_in(engine: &Engine, label: &str) -> TestNetwork {
        Self::create_on_free_subnet(engine, label, false)
    }

    /// As [`TestNetwork::create`], plus IPv6 on `fd00:db8:N::/64` (the host at `::1`).
    pub fn create_dual_stack(label: &str) -> TestNetwork {
        Self::create_on_free_subnet(&Engine::Docker, label, true)
    }

    fn create_on_free_subnet(engine: &Engine, label: &str, ipv6: bool) -> TestNetwork {
        if !engine.is_podman() {
            require_docker();
            cleanup_stale_once();
        }
        let name = unique_name(label);
        let candidates = free_octets(engine);
        assert!(
            !candidates.is_empty(),
            "every 169.254.N.0/24 a {} test network may take is in use",
            engine.program()
        );
        // Concurrent test processes start at different places, and retry past each other's
        // choices: Docker refuses an overlapping subnet ("Pool overlaps ..."), Podman one that
        // is "already used on the host or by another config".
        let start = pseudo_random() as usize % candidates.len();
        let mut last_error = String::new();
        for i in 0..candidates.len() {
            let n = candidates[(start + i) % candidates.len()];
            // Podman test processes cannot see each other's networks (each has its own
            // configuration), so they claim a subnet before creating it.
            let claim = if engine.is_podman() {
                match OctetClaim::take(n) {
                    Some(claim) => Some(claim),
                    None => continue,
                }
            } else {
                None
            };
            // Podman checks the subnet against every host interface's addresses, and fails
            // when one of them (another test's veth) goes away meanwhile: try again.
            let mut created = Self::try_create(engine, &name, n, 1, ipv6);
            for _ in 0..5 {
                match &created {
                    Err(e) if e.contains("no such network interface") => {
                        std::thread::sleep(Duration::from_millis(100));
                        created = Self::try_create(engine, &name, n, 1, ipv6);
                    }
                    _ => break,
                }
            }
            match created {
                Ok(mut network) => {
                    network.claim = claim;
                    return network;
                }
                Err(e) if e.contains("overlap") || e.contains("already used on the host") => {
                    last_error = e;
                }
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
        Self::try_create(&Engine::Docker, &name, 170, 2, false).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `network create` on `169.254.<n>.0/24` with the gateway at `.<gateway_host>`.
    fn try_create(
        engine: &Engine,
        name: &str,
        n: u8,
        gateway_host: u8,
        ipv6: bool,
    ) -> Result<TestNetwork, String> {
        let subnet = format!("169.254.{n}.0/24");
        let gateway = Ipv4Addr::new(169, 254, n, gateway_host);
        let gateway6 = ipv6.then(|| {
            IpAddr::V6(std::net::Ipv6Addr::new(
                0xfd00,
                0x0db8,
                u16::from(n),
                0,
                0,
                0,
                0,
                1,
            ))
        });
        let subnet6 = format!("fd00:db8:{n:x}::/64");
        let create = || match engine {
            Engine::Docker => {
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
                if let Some(g6) = gateway6 {
                    args.extend([
                        "--ipv6".into(),
                        "--subnet".into(),
                        subnet6.clone(),
                        "--gateway".into(),
                        g6.to_string(),
                    ]);
                }
                args.extend(ownership_labels());
                args.push(name.to_string());
                let out = engine.run(&args);
                if out.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "`docker {}` failed: {}",
                        show_args(&args),
                        stderr_of(&out)
                    ))
                }
            }
            Engine::Podman(cli) => {
                let mut subnets = vec![serde_json::json!({"subnet": subnet, "gateway": gateway})];
                if let Some(g6) = gateway6 {
                    subnets.push(serde_json::json!({"subnet": subnet6, "gateway": g6}));
                }
                // Through the API: Podman 4.3's CLI cannot name the bridge, and Podman numbers
                // bridges by its own networks (podman1, podman2, …), so two tests' Podmans would
                // share `podman1`. The subnet's octet is this process's (see OctetClaim).
                // No DNS: aardvark-dns would take the gateway's port 53.
                let network = serde_json::json!({
                    "name": name,
                    "driver": "bridge",
                    "network_interface": format!("imdsdpm{n}"),
                    "subnets": subnets,
                    "ipv6_enabled": ipv6,
                    "dns_enabled": false,
                    "labels": {
                        TEST_LABEL: "1",
                        PID_LABEL: std::process::id().to_string(),
                    },
                });
                match podman_api(
                    &cli.socket,
                    "POST",
                    "/v4.0.0/libpod/networks/create",
                    &network.to_string(),
                ) {
                    Ok((200..=299, _)) => Ok(()),
                    Ok((status, body)) => Err(format!(
                        "creating Podman network {name} on {subnet}: {status} {body}"
                    )),
                    Err(e) => Err(format!("creating Podman network {name}: {e}")),
                }
            }
        };
        let mut created = create();
        if created
            .as_ref()
            .is_err_and(|e| e.contains("already exists"))
        {
            // Our name, from an earlier process that had our pid: it is stale.
            remove_network(engine, name);
            created = create();
        }
        created?;
        let network = TestNetwork {
            name: name.to_string(),
            subnet,
            gateway: IpAddr::V4(gateway),
            gateway6,
            engine: engine.clone(),
            claim: None,
        };
        if !engine.is_podman() {
            network.wait_gateway();
        }
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

    /// Waits until the host can bind the gateway address: at once on Docker, after a container
    /// has joined on Podman.
    pub fn wait_gateway(&self) {
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
        remove_network(&self.engine, &self.name);
    }
}

/// Force-removes the containers attached to a network, then the network. Never panics (it runs
/// in `Drop`, possibly while a failed test unwinds).
pub fn remove_network(engine: &Engine, name_or_id: &str) {
    let attached = match engine {
        Engine::Docker => "{{range $id, $c := .Containers}}{{$id}} {{end}}",
        // Podman's network record does not list containers.
        Engine::Podman(_) => "",
    };
    if !attached.is_empty()
        && let Ok(out) = engine.try_run(["network", "inspect", "--format", attached, name_or_id])
    {
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = engine.try_run(engine.rm_args().iter().chain([&id]));
        }
    }
    // Podman removes the containers with the network (`--force`), without waiting for them.
    let rm: &[&str] = match engine {
        Engine::Docker => &["network", "rm"],
        Engine::Podman(_) => &["network", "rm", "--force", "--time", "0"],
    };
    // `docker rm -f` returns once the container is gone, but give a racing removal a moment.
    for attempt in 0..5 {
        match engine.try_run(rm.iter().chain([&name_or_id])) {
            Ok(out) if out.status.success() => return,
            Ok(out) => {
                let err = stderr_of(&out);
                if err.contains("not found")
                    || err.contains("No such network")
                    || err.contains("network not found")
                {
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

/// One request to a Podman API service on its unix socket: the status and the body.
pub fn podman_api(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    use std::io::Read as _;
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Ok((status, body))
}

/// The third octets `engine`'s next test network may take: not in use by a Docker network, nor
/// routed or addressed on this host (a Podman network with a container, a Swarm's gateway
/// bridge), and in the engine's own range (see [`PODMAN_OCTETS`]).
fn free_octets(engine: &Engine) -> Vec<u8> {
    let mut used = link_local_octets_in_use();
    used.extend(link_local_octets_on_host());
    let range: Vec<u8> = match engine {
        Engine::Docker => (1..=254u8)
            .filter(|n| *n != 169 && *n != 170 && !PODMAN_OCTETS.contains(n))
            .collect(),
        Engine::Podman(_) => PODMAN_OCTETS.collect(),
    };
    range.into_iter().filter(|n| !used.contains(n)).collect()
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
    octets_of(&String::from_utf8_lossy(&out.stdout))
}

/// Third octets of the `169.254.N.…` routes and addresses on this host.
fn link_local_octets_on_host() -> HashSet<u8> {
    let mut text = String::new();
    for args in [["-4", "route", "show"], ["-4", "addr", "show"]] {
        if let Ok(out) = Command::new("ip").args(args).stdin(Stdio::null()).output() {
            text.push_str(&String::from_utf8_lossy(&out.stdout));
            text.push(' ');
        }
    }
    octets_of(&text)
}

/// The `N` of every `169.254.N.…` word in `text`, except the metadata network's own 169, which
/// the test subnets never take anyway.
fn octets_of(text: &str) -> HashSet<u8> {
    text.split_whitespace()
        .filter_map(|word| word.strip_prefix("169.254."))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect()
}

/// A Podman test process's claim on `169.254.N.0/24`: the file `/tmp/imdsd-test-subnets/<N>`,
/// holding the claimer's pid. Each Podman test process has its own network configuration, so
/// Podman itself cannot tell two of them apart until both have containers on the subnet.
/// Claims are made under a lock on the directory's `.lock`; a claim whose process is gone is
/// taken over, and a claim is released on drop.
#[derive(Debug)]
pub struct OctetClaim {
    path: PathBuf,
}

impl OctetClaim {
    fn dir() -> PathBuf {
        coordination_dir().join("imdsd-test-subnets")
    }

    /// The claims' lock, held until dropped.
    fn lock() -> Option<std::fs::File> {
        let _ = std::fs::create_dir_all(Self::dir());
        let lock = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Self::dir().join(".lock"))
            .ok()?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).ok()?;
        Some(lock)
    }

    fn take(n: u8) -> Option<OctetClaim> {
        let _lock = Self::lock()?;
        let path = Self::dir().join(n.to_string());
        if let Ok(holder) = std::fs::read_to_string(&path)
            && !process_gone(holder.trim())
        {
            return None;
        }
        std::fs::write(&path, std::process::id().to_string()).ok()?;
        Some(OctetClaim { path })
    }
}

/// A free `169.254.N.0/24` in the Podman range, claimed until the claim is dropped: for a test
/// that has something else (`imdsd network up`) create the network.
pub fn claim_podman_subnet() -> (u8, OctetClaim) {
    let used: HashSet<u8> = link_local_octets_in_use()
        .into_iter()
        .chain(link_local_octets_on_host())
        .collect();
    PODMAN_OCTETS
        .filter(|n| !used.contains(n))
        .find_map(|n| OctetClaim::take(n).map(|claim| (n, claim)))
        .expect("a free 169.254.N.0/24 in the Podman test range")
}

/// Removes the subnet claims of processes that are gone (a test killed before its `Drop`s ran).
pub fn remove_stale_octet_claims() {
    let Some(_lock) = OctetClaim::lock() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(OctetClaim::dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n != ".lock")
            && let Ok(holder) = std::fs::read_to_string(&path)
            && process_gone(holder.trim())
        {
            let _ = std::fs::remove_file(&path);
        }
    }
}

impl Drop for OctetClaim {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
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
    /// Where it runs (Docker unless set).
    pub engine: Engine,
}

impl RunOpts {
    /// The test image on `network`, in the network's engine.
    pub fn new(network: &TestNetwork, name: &str) -> RunOpts {
        RunOpts {
            name: name.to_string(),
            network: network.name.clone(),
            image: network.engine.image(),
            engine: network.engine.clone(),
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
    pub engine: Engine,
    removed: bool,
}

impl TestContainer {
    /// `docker run --detach` with the harness's labels; panics with Docker's error on failure.
    pub fn run(opts: &RunOpts) -> TestContainer {
        let engine = &opts.engine;
        if !engine.is_podman() {
            require_docker();
            cleanup_stale_once();
        }
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

        let mut out = engine.run(&args);
        if !out.status.success() && opts.exact_name && stderr_of(&out).contains("already in use") {
            // Someone else's container, or one the test has not removed yet: leave it alone.
            panic!("`{}` failed: {}", show_args(&args), stderr_of(&out));
        }
        if !out.status.success() && stderr_of(&out).contains("already in use") {
            // Our name, from an earlier process that had our pid: it is stale.
            let _ = engine.try_run(engine.rm_args().iter().chain([&name.as_str()]));
            out = engine.run(&args);
        }
        if !out.status.success() {
            // `docker run -d` can create the container and then fail to start it.
            let _ = engine.try_run(engine.rm_args().iter().chain([&name.as_str()]));
            panic!(
                "`{} {}` failed: {}",
                engine.program(),
                show_args(&args),
                stderr_of(&out)
            );
        }
        // Podman prints the id last, after what it did to get the image.
        let stdout = String::from_utf8_lossy(&out.stdout);
        let id = stdout.lines().last().unwrap_or_default().trim().to_string();
        let ip = opts.ip.or_else(|| {
            if opts.network.is_empty() || opts.network == "none" {
                return None;
            }
            let template = format!(
                "{{{{with index .NetworkSettings.Networks \"{}\"}}}}{{{{.IPAddress}}}}{{{{end}}}}",
                opts.network
            );
            let out = engine.run(["container", "inspect", "--format", &template, &id]);
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        });
        TestContainer {
            id,
            name,
            ip,
            engine: engine.clone(),
            removed: false,
        }
    }

    /// Everything the container wrote: stdout, then stderr.
    pub fn logs(&self) -> String {
        let out = self.engine.run(["logs", &self.id]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// What the container wrote to stdout only (`imdsd probe` prints its JSON line there).
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.engine.run(["logs", &self.id]).stdout).into_owned()
    }

    /// What the container wrote to stderr only (imdsd's logs).
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.engine.run(["logs", &self.id]).stderr).into_owned()
    }

    /// Waits for the container to exit and returns its exit code; panics, showing its logs, if
    /// it still runs after `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> i64 {
        let mut child = self
            .engine
            .command()
            .args(["wait", &self.id])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run `{} wait`: {e}", self.engine.program()));
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
        let out = child.wait_with_output().expect("`wait` output");
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim().parse().unwrap_or_else(|_| {
            panic!(
                "`{} wait {}` gave no exit code: {text:?} {}",
                self.engine.program(),
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
        let out = self.engine.run(&args);
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
        self.engine.run_ok(["stop", "--time", "1", &self.id]);
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
            let id = self.id.as_str();
            if let Ok(out) = self
                .engine
                .try_run(self.engine.rm_args().iter().chain([&id]))
            {
                let err = stderr_of(&out);
                if !out.status.success() && !err.to_lowercase().contains("no such container") {
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
                Some((id, pid)) if dead(pid.trim()) => remove_network(&Engine::Docker, id),
                _ => {}
            }
        }
    }
}
