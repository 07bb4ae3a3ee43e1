//! A rootful Podman of the test's own, for the end-to-end tests on Podman: a private
//! configuration, store, event log and network configuration in a directory of its own, its
//! Docker-compatible API service (`podman system service`) on a socket there, and the test image
//! imported into its store. Networks and containers are `support/docker.rs`'s, run through the
//! `podman` CLI ([`Podman::engine`]); include both:
//!
//! ```ignore
//! #[path = "support/docker.rs"] mod docker;
//! #[path = "support/podman.rs"] mod podman;
//! ```
//!
//! Nothing on the machine is configured: every `podman` command, the API service and conmon's
//! cleanup command (which inherits the environment) see `CONTAINERS_CONF` and
//! `CONTAINERS_STORAGE_CONF` pointing into the directory, whose settings are those this sandbox
//! needs: `default_ulimits = []` (Podman's default limits exceed the hard limits here, and runc
//! fails with "error setting rlimit type 7"), runc (crun refuses hybrid cgroups), cgroupfs, and
//! the file event logger (no journald).
//!
//! The directory is `/tmp/imdsd-test-podman/<pid>-<n>`. Dropping the [`Podman`] removes its
//! containers and networks, stops the service, unmounts whatever is still mounted under the
//! directory (the store's overlay mounts) and removes it, also when the test panics;
//! [`cleanup_stale`] does the same for the directories of test processes that are gone (killed
//! before their `Drop`s ran), keyed by the pid in the name.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::docker::{
    Engine, PodmanCli, TestNetwork, dockerfile_changes, process_gone, test_rootfs_tarball,
};

/// How long the API service may take to answer its first `_ping` (it takes ~0.1 s here).
const SERVICE_START: Duration = Duration::from_secs(30);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// One test's Podman. Dropping it removes everything it made.
#[derive(Debug)]
pub struct Podman {
    /// Everything of this Podman lives here.
    pub dir: PathBuf,
    /// The API service's socket.
    pub socket: PathBuf,
    /// Runs networks and containers here (see `support/docker.rs`).
    pub engine: Engine,
    service: Option<Child>,
}

impl Podman {
    /// Sets up the directory, starts the API service and imports the test image. Panics (the
    /// test fails, never skips) when Podman is missing or does not start.
    pub fn start() -> Podman {
        Self::start_for(std::process::id())
    }

    /// [`Podman::start`], in a directory named as process `pid`'s.
    fn start_for(pid: u32) -> Podman {
        require_podman();
        cleanup_stale_once();
        let dir = base_dir().join(format!("{pid}-{}", COUNTER.fetch_add(1, Ordering::Relaxed)));
        if dir.exists() {
            // An earlier process that had our pid left it.
            teardown(&dir, None);
        }
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        write_config(&dir);
        let env = environment(&dir);
        let socket = dir.join("podman.sock");
        // From here on, Drop cleans up whatever the rest of this leaves.
        let mut podman = Podman {
            engine: Engine::Podman(Arc::new(PodmanCli {
                env: env.clone(),
                image: String::new(),
                socket: socket.clone(),
            })),
            socket,
            service: None,
            dir,
        };
        podman.start_service();
        let image = podman.import_test_image();
        podman.engine = Engine::Podman(Arc::new(PodmanCli {
            env,
            image,
            socket: podman.socket.clone(),
        }));
        podman
    }

    /// The API service, as `--docker-host` takes it.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// What a process that runs `podman` itself (`imdsd network`) needs in its environment to
    /// see this Podman.
    pub fn env(&self) -> Vec<(OsString, OsString)> {
        environment(&self.dir)
    }

    /// A test network on a free link-local subnet in this Podman.
    pub fn network(&self, label: &str) -> TestNetwork {
        TestNetwork::create_in(&self.engine, label)
    }

    /// What the API service wrote (for failure messages).
    pub fn service_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("service.log")).unwrap_or_default()
    }

    fn start_service(&mut self) {
        let log = std::fs::File::create(self.dir.join("service.log")).expect("service log");
        let child = self
            .engine
            .command()
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", self.socket.display()))
            .stdout(log.try_clone().expect("service log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `podman system service`: {e}"));
        // For the stale cleanup of a killed test process.
        std::fs::write(self.dir.join("service.pid"), child.id().to_string())
            .expect("write service.pid");
        self.service = Some(child);
        let deadline = Instant::now() + SERVICE_START;
        loop {
            if ping(&self.socket) {
                return;
            }
            if let Some(Ok(Some(status))) = self.service.as_mut().map(Child::try_wait) {
                panic!(
                    "`podman system service` exited ({status}) before it answered:\n{}",
                    self.service_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "`podman system service` did not answer on {} within {SERVICE_START:?}:\n{}",
                self.socket.display(),
                self.service_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `podman import` of the test image's file system, configured as the Dockerfile says.
    fn import_test_image(&self) -> String {
        let (tarball, hash) = test_rootfs_tarball();
        let image = format!("localhost/imdsd-test:{hash}");
        let mut args: Vec<OsString> = vec!["import".into(), "--quiet".into()];
        for change in dockerfile_changes() {
            args.extend(["--change".into(), change.into()]);
        }
        args.push(tarball.into());
        args.push(image.clone().into());
        self.engine.run_ok(&args);
        image
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        teardown(&self.dir, self.service.take());
    }
}

/// Whether the API service answers `GET /_ping` with `OK`.
fn ping(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if stream
        .write_all(b"GET /_ping HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200") && response.ends_with("OK")
}

/// Fails the test, never skips it, unless a rootful `podman` can run here.
pub fn require_podman() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        match Command::new("podman")
            .arg("--version")
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "`podman --version` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => panic!(
                "these tests need rootful Podman, and running `podman` failed: {e}\n\
                 ./scripts/test installs it (Debian: apt-get install --no-install-recommends \
                 podman netavark aardvark-dns conmon runc uidmap slirp4netns fuse-overlayfs \
                 catatonit busybox-static); the tests fail rather than skip without it."
            ),
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let root = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|uids| uids.split_whitespace().nth(1))
            == Some("0");
        assert!(
            root,
            "the Podman tests need rootful Podman, so they run as root: rootless Podman keeps \
             container addresses in the user's own network namespace, where imdsd on the host \
             cannot see who calls"
        );
    });
}

/// Where every test's Podman directory lives: /tmp itself, as for the Docker harness's
/// coordination, so that any test process finds what a dead one left.
fn base_dir() -> PathBuf {
    Path::new("/tmp").join("imdsd-test-podman")
}

fn environment(dir: &Path) -> Vec<(OsString, OsString)> {
    vec![
        ("CONTAINERS_CONF".into(), dir.join("containers.conf").into()),
        (
            "CONTAINERS_STORAGE_CONF".into(),
            dir.join("storage.conf").into(),
        ),
    ]
}

fn write_config(dir: &Path) {
    let d = dir.display();
    let containers = format!(
        "[containers]\n\
         default_ulimits = []\n\
         log_driver = \"k8s-file\"\n\
         \n\
         [network]\n\
         network_backend = \"netavark\"\n\
         network_config_dir = \"{d}/networks\"\n\
         \n\
         [engine]\n\
         cgroup_manager = \"cgroupfs\"\n\
         events_logger = \"file\"\n\
         events_logfile_path = \"{d}/events.log\"\n\
         runtime = \"runc\"\n\
         tmp_dir = \"{d}/tmp\"\n"
    );
    let storage = format!(
        "[storage]\n\
         driver = \"overlay\"\n\
         graphroot = \"{d}/storage/graph\"\n\
         runroot = \"{d}/storage/run\"\n"
    );
    std::fs::write(dir.join("containers.conf"), containers).expect("write containers.conf");
    std::fs::write(dir.join("storage.conf"), storage).expect("write storage.conf");
}

/// Removes a test Podman's containers and networks, stops its API service (`service`, or the
/// process named in `service.pid`), unmounts what is mounted under `dir` and removes it. Never
/// panics: it runs in `Drop`, possibly while a failed test unwinds.
fn teardown(dir: &Path, service: Option<Child>) {
    if dir.join("containers.conf").is_file() {
        let engine = Engine::Podman(Arc::new(PodmanCli {
            env: environment(dir),
            image: String::new(),
            socket: dir.join("podman.sock"),
        }));
        let _ = engine.try_run(["rm", "--all", "--force", "--volumes", "--time", "0"]);
        if let Ok(out) = engine.try_run(["network", "ls", "--format", "{{.Name}}"]) {
            for name in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                // The built-in default network has no configuration file of its own.
                if name != "podman" {
                    super::docker::remove_network(&engine, name);
                }
            }
        }
    }
    // The service, and what it re-executed itself into (a rootless Podman enters a user
    // namespace through a child): every process whose command line names the directory.
    stop_processes_of(dir);
    if let Some(mut child) = service {
        let _ = child.kill();
        let _ = child.wait();
    }
    unmount_under(dir);
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!(
            "imdsd test harness: could not remove {}: {e}",
            dir.display()
        );
    }
}

/// The live processes whose command line names `dir` (the API service: its socket is there;
/// conmon: its container's files are).
pub fn processes_of(dir: &Path) -> Vec<u32> {
    let needle = format!("{}/", dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !process_gone(&pid.to_string()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

/// SIGTERM to every process of `dir`, up to 5 s for them to end (the service unmounts its store
/// on the way out), then SIGKILL to what is left.
fn stop_processes_of(dir: &Path) {
    let signal = |sig: &str, pids: &[u32]| {
        for pid in pids {
            let _ = Command::new("kill")
                .args([sig, &pid.to_string()])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    };
    let pids = processes_of(dir);
    if pids.is_empty() {
        return;
    }
    signal("-TERM", &pids);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_of(dir).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = processes_of(dir);
    if !left.is_empty() {
        eprintln!(
            "imdsd test harness: the Podman service of {} ignored SIGTERM: {left:?}",
            dir.display()
        );
        signal("-KILL", &left);
    }
}

/// Lazily unmounts every mount under `dir`, deepest first (the store's own bind mount, and any
/// container's root file system or /dev/shm that a killed process left mounted).
fn unmount_under(dir: &Path) {
    let prefix = format!("{}/", dir.display());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_point)
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for point in points {
        let _ = Command::new("umount")
            .args(["--lazy", &point])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `/proc/self/mountinfo` writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_point(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn cleanup_stale_once() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(cleanup_stale);
}

/// Best effort: tears down the Podman directories of test processes that are gone, and
/// releases their subnets.
pub fn cleanup_stale() {
    let Ok(entries) = std::fs::read_dir(base_dir()) else {
        super::docker::remove_stale_octet_claims();
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((pid, _)) = name.split_once('-')
            && process_gone(pid)
        {
            teardown(&entry.path(), None);
        }
    }
    super::docker::remove_stale_octet_claims();
}

/// For the harness's own test: a Podman in a directory named as process `pid`'s (a dead one),
/// with a container running, left exactly as a test process killed before its `Drop`s ran would
/// leave it: the API service, the container (with conmon) and the store's mounts stay. Returns
/// the directory and the service's pid.
pub fn leave_behind_as(pid: u32) -> (PathBuf, u32) {
    let mut podman = Podman::start_for(pid);
    let service = podman.service.take().expect("the service runs");
    let service_pid = service.id();
    let network = podman.network("stale");
    let container = super::docker::TestContainer::run(
        &super::docker::RunOpts::new(&network, "stale")
            .entrypoint("/bin/busybox")
            .args(["sleep", "600"]),
    );
    let dir = podman.dir.clone();
    std::mem::forget(container);
    std::mem::forget(network);
    std::mem::forget(service);
    std::mem::forget(podman);
    (dir, service_pid)
}

/// A rootless Podman API service, run as the unprivileged user `nobody` in a directory of its
/// own (its HOME and XDG_RUNTIME_DIR): what an operator has who started Podman as themselves. It
/// runs no container (rootless networking needs more than this sandbox gives); its `/info` is
/// what `imdsd doctor` judges. Dropping it stops the service and removes the directory.
#[derive(Debug)]
pub struct RootlessService {
    pub dir: PathBuf,
    pub socket: PathBuf,
    service: Option<Child>,
}

impl RootlessService {
    pub fn start() -> RootlessService {
        require_podman();
        cleanup_stale_once();
        let dir = base_dir().join(format!(
            "{}-rootless-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let chown = Command::new("chown")
            .args(["nobody:nogroup"])
            .arg(&dir)
            .status()
            .expect("run chown");
        assert!(chown.success(), "chown nobody {}", dir.display());
        let socket = dir.join("podman.sock");
        let mut service = RootlessService {
            dir: dir.clone(),
            socket: socket.clone(),
            service: None,
        };
        let log = std::fs::File::create(dir.join("service.log")).expect("service log");
        let child = Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .args(["podman", "system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .env("HOME", &dir)
            .env("XDG_RUNTIME_DIR", &dir)
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .env("XDG_DATA_HOME", dir.join("data"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("service log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start a rootless `podman system service`: {e}"));
        std::fs::write(dir.join("service.pid"), child.id().to_string()).expect("service.pid");
        service.service = Some(child);
        let deadline = Instant::now() + SERVICE_START;
        while !ping(&socket) {
            assert!(
                Instant::now() < deadline,
                "a rootless `podman system service` did not answer on {}:\n{}",
                socket.display(),
                std::fs::read_to_string(dir.join("service.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        service
    }

    /// The service, as `--docker-host` takes it.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

impl Drop for RootlessService {
    fn drop(&mut self) {
        teardown(&self.dir, self.service.take());
    }
}
