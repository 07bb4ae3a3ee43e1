//! End-to-end tests of `imdsd network up|down` (src/network.rs): the built binary run against this
//! machine's Docker Engine, `ip` and `iptables`, for the host and ec2 layouts, with names,
//! subnets and ports of their own so that nothing real is touched.
//!
//! They compare the machine's state before `up`, after `up` and after `down`: `ip -o link`/`ip -o
//! addr`, `docker network ls` and `iptables-save` (counters and comments stripped), one line each.
//! Other tests create and remove Docker networks and containers on the same engine meanwhile, so
//! the comparison is in two parts:
//! - **mine**: every line that names this test's network, bridge or interface must be exactly as
//!   expected (nothing before, the layout's pieces after `up`, nothing again after `down`);
//! - **the rest**, minus what other tests churn (lines naming `br-…` and `veth…` interfaces,
//!   other `imdsd…` names and `169.254.…` test subnets, container-specific Docker NAT rules)
//!   must not change at all.
//!
//! Everything a test creates is named with its pid (`imdsd-nettest-<pid>-<tag>`, bridge
//! `imdsdt<pid><tag>`) and removed by a guard's `Drop`, also when the test fails; what a killed
//! test process left behind is removed by the next run (see [`cleanup_stale`]).
//!
//! They need root, a running Docker Engine and iptables, and fail (never skip) without them.

#[path = "support/docker.rs"]
mod docker;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use docker::{RunOpts, TestContainer};

const TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Running things

/// What a command did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn show(&self) -> String {
        format!(
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn run(program: &str, args: &[&str]) -> Run {
    let out: Output = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{program}`: {e}"));
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let r = run(program, args);
    assert_eq!(
        r.code,
        0,
        "`{program} {}` failed: {}",
        args.join(" "),
        r.show()
    );
    r.stdout
}

/// `imdsd network ARGS`.
fn imdsd_network(args: &[&str]) -> Run {
    let mut full = vec!["network"];
    full.extend_from_slice(args);
    run(env!("CARGO_BIN_EXE_imdsd"), &full)
}

/// Lines of stdout that are commands (a dry run prints `#` comments besides).
fn commands(stdout: &str) -> Vec<&str> {
    stdout.lines().filter(|l| !l.starts_with('#')).collect()
}

/// Fails the test, never skips it, unless Docker, `ip` and a working `iptables-save` are here.
fn require_host_tools() {
    docker::require_docker();
    match Command::new("iptables-save").stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`iptables-save` failed: {}\nThese tests need root and a working iptables.",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!(
            "these tests need iptables, and running `iptables-save` failed: {e}\n\
             Install it (Debian/Ubuntu: apt-get update && apt-get install -y iptables); the tests \
             fail rather than skip without it."
        ),
    }
    run_ok("ip", &["-o", "link", "show"]);
    cleanup_stale_once();
}

/// This test's own names: `tag` tells apart the tests of one process (under `cargo test` they
/// are threads of one process).
struct Names {
    network: String,
    bridge: String,
}

fn names(tag: char) -> Names {
    let pid = std::process::id();
    Names {
        network: format!("imdsd-nettest-{pid}-{tag}"),
        // At most 6 + 7 + 1 characters: within Linux's 15.
        bridge: format!("imdsdt{pid}{tag}"),
    }
}

/// A port for the ec2 layout's redirect target, below the ephemeral range: the layout's DROP
/// rule closes it to every other interface, and other tests' daemons and containers use
/// ephemeral ports, which must stay reachable.
fn unique_port() -> u16 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_else(|_| "32768 60999".into());
    let first: u32 = range
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32768);
    assert!(first > 11000, "ephemeral ports start at {first}: no room");
    let port = 10000 + std::process::id() % (first - 10000);
    u16::try_from(port).expect("below 65536")
}

// ---------------------------------------------------------------------------------------------
// Free link-local subnets

/// Third octets of the `169.254.N.0/24`s Docker networks use now.
fn octets_in_use() -> Vec<u8> {
    let ids = run_ok("docker", &["network", "ls", "--quiet"]);
    let mut args = vec![
        "network",
        "inspect",
        "--format",
        "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
    ];
    args.extend(ids.split_whitespace());
    // A network removed between `ls` and `inspect` fails the inspect; Docker's (and imdsd's)
    // overlap check still catches a clash.
    run("docker", &args)
        .stdout
        .split_whitespace()
        .filter_map(|s| s.strip_prefix("169.254."))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect()
}

/// Free third octets in 200..=250, starting at a place that differs between processes.
fn candidate_octets() -> Vec<u8> {
    let used = octets_in_use();
    let mut free: Vec<u8> = (200..=250u8).filter(|n| !used.contains(n)).collect();
    assert!(!free.is_empty(), "every 169.254.200-250.0/24 is in use");
    let start = std::process::id() as usize % free.len();
    free.rotate_left(start);
    free
}

/// `docker network create` by hand (not by imdsd: no `imdsd.managed` label), on a free
/// `169.254.N.0/24` with gateway `.1`. Returns N.
fn create_plain_network(names: &Names) -> u8 {
    let pid_label = format!("imdsd-nettest.pid={}", std::process::id());
    let bridge_opt = format!("com.docker.network.bridge.name={}", names.bridge);
    let mut last = String::new();
    for n in candidate_octets() {
        let subnet = format!("169.254.{n}.0/24");
        let gateway = format!("169.254.{n}.1");
        let r = run(
            "docker",
            &[
                "network",
                "create",
                "--subnet",
                &subnet,
                "--gateway",
                &gateway,
                "--opt",
                &bridge_opt,
                "--label",
                &pid_label,
                &names.network,
            ],
        );
        if r.code == 0 {
            return n;
        }
        assert!(
            r.stderr.contains("overlap"),
            "docker network create {}: {}",
            names.network,
            r.show()
        );
        last = r.stderr;
    }
    panic!("no free 169.254.200-250.0/24: {last}")
}

// ---------------------------------------------------------------------------------------------
// The machine's state

/// One line per interface, address, Docker network and iptables line, with a count (a rule
/// added twice must show).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot(BTreeMap<String, usize>);

fn snapshot() -> Snapshot {
    let mut lines = BTreeMap::new();
    let mut add = |line: String| *lines.entry(line).or_insert(0) += 1;
    // "12: imdsdt123h: <BROADCAST,...> ..." and "5: veth1@if4: ...": the name only; state and
    // flags change as containers come and go.
    for line in run_ok("ip", &["-o", "link", "show"]).lines() {
        if let Some(name) = line.split_whitespace().nth(1) {
            let name = name.trim_end_matches(':');
            add(format!("link|{}", name.split('@').next().unwrap_or(name)));
        }
    }
    // "12: imdsdt123h    inet 169.254.201.254/24 brd ...": name, family, address.
    for line in run_ok("ip", &["-o", "addr", "show"]).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        // IPv6 link-local addresses come and go with the link's state (a bridge gets one when
        // its first container attaches); neither imdsd nor Docker puts them there.
        if words.len() >= 4 && !words[3].starts_with("fe80:") {
            add(format!("addr|{} {} {}", words[1], words[2], words[3]));
        }
    }
    for name in run_ok("docker", &["network", "ls", "--format", "{{.Name}}"]).lines() {
        add(format!("net|{name}"));
    }
    let mut table = String::new();
    for line in run_ok("iptables-save", &[]).lines() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') || line == "COMMIT" {
            continue;
        }
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
            continue;
        }
        // Chains: ":INPUT ACCEPT [12:345]" without the packet and byte counters.
        let line = match (line.starts_with(':'), line.rfind(" [")) {
            (true, Some(i)) => &line[..i],
            _ => line,
        };
        add(format!("ipt|{table}|{line}"));
    }
    Snapshot(lines)
}

/// Lines other tests on this machine add and remove at any time.
fn churn(line: &str) -> bool {
    ["br-", "veth", "imdsd", "169.254.", "--to-destination"]
        .iter()
        .any(|p| line.contains(p))
        // A container's published port on the default bridge.
        || (line.contains("172.17.") && line.contains("/32"))
}

impl Snapshot {
    /// The lines naming any of `tokens` (this test's names).
    fn mine(&self, tokens: &[&str]) -> BTreeMap<String, usize> {
        self.0
            .iter()
            .filter(|(l, _)| tokens.iter().any(|t| l.contains(t)))
            .map(|(l, n)| (l.clone(), *n))
            .collect()
    }

    /// The lines that neither name this test's things nor are other tests' churn.
    fn rest(&self, tokens: &[&str]) -> BTreeMap<String, usize> {
        self.0
            .iter()
            .filter(|(l, _)| !tokens.iter().any(|t| l.contains(t)) && !churn(l))
            .map(|(l, n)| (l.clone(), *n))
            .collect()
    }
}

/// Panics, listing the differing lines, unless `a == b`.
fn assert_same(what: &str, a: &BTreeMap<String, usize>, b: &BTreeMap<String, usize>) {
    if a == b {
        return;
    }
    let mut diff = String::new();
    for (l, n) in a {
        if b.get(l) != Some(n) {
            diff.push_str(&format!("  - {l} (x{n})\n"));
        }
    }
    for (l, n) in b {
        if a.get(l) != Some(n) {
            diff.push_str(&format!("  + {l} (x{n})\n"));
        }
    }
    panic!("{what}: the machine's state changed:\n{diff}");
}

/// A snapshot taken when two in a row agree: Docker rewrites some of its rules while other tests
/// create networks (it deletes and re-inserts `-A FORWARD -j DOCKER-USER` to keep it first), and
/// a snapshot taken in between would miss them.
fn settled_snapshot(tokens: &[&str]) -> Snapshot {
    let mut last = snapshot();
    for _ in 0..20 {
        let now = snapshot();
        if now.rest(tokens) == last.rest(tokens) {
            return now;
        }
        last = now;
        std::thread::sleep(Duration::from_millis(100));
    }
    last
}

/// Both parts of the comparison: this test's lines equal `expected_mine`, the rest is as in
/// `before`. A difference in the rest is given a few seconds to go away (see
/// [`settled_snapshot`]); what imdsd changed stays changed.
fn assert_state(
    what: &str,
    before: &Snapshot,
    tokens: &[&str],
    expected_mine: &BTreeMap<String, usize>,
) {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut now = snapshot();
    while now.rest(tokens) != before.rest(tokens) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        now = snapshot();
    }
    assert_same(
        &format!("{what} (this test's lines)"),
        expected_mine,
        &now.mine(tokens),
    );
    assert_same(
        &format!("{what} (everything else)"),
        &before.rest(tokens),
        &now.rest(tokens),
    );
}

// ---------------------------------------------------------------------------------------------
// Cleanup

/// Removes this test's networks (with any container attached) and iptables rules when dropped,
/// also while a failed test unwinds. Never panics.
struct Cleanup {
    networks: Vec<String>,
    /// `(table, chain and rule spec)`, as `iptables -t TABLE -D …` takes them.
    rules: Vec<(String, Vec<String>)>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (table, spec) in &self.rules {
            delete_rule(table, spec);
        }
        for network in &self.networks {
            remove_network(network);
        }
    }
}

fn quiet(program: &str, args: &[&str]) -> Option<Output> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
}

fn delete_rule(table: &str, spec: &[String]) {
    let with = |op: &str| {
        let mut args = vec!["-w", "-t", table, op];
        args.extend(spec.iter().map(String::as_str));
        quiet("iptables", &args).is_some_and(|o| o.status.success())
    };
    for _ in 0..16 {
        if !with("-C") || !with("-D") {
            return;
        }
    }
}

fn remove_network(name: &str) {
    if let Some(out) = quiet(
        "docker",
        &[
            "network",
            "inspect",
            "--format",
            "{{range $id, $c := .Containers}}{{$id}} {{end}}",
            name,
        ],
    ) {
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = quiet("docker", &["rm", "--force", id]);
        }
    }
    for _ in 0..5 {
        match quiet("docker", &["network", "rm", name]) {
            Some(out) if out.status.success() => return,
            Some(out) => {
                let err = String::from_utf8_lossy(&out.stderr);
                if err.contains("not found") || err.contains("No such network") {
                    return;
                }
                eprintln!("imdsd network test: cannot remove network {name}: {err}");
            }
            None => return,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn cleanup_stale_once() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(cleanup_stale);
}

/// Removes what test processes that no longer exist left behind (killed before their `Drop`s
/// ran): networks named `imdsd-nettest-<pid>-…`, and rules tagged `imdsd` that name a bridge
/// `imdsdt<pid>…`. Only those names are touched.
fn cleanup_stale() {
    let dead = docker::process_gone;
    if let Some(out) = quiet("docker", &["network", "ls", "--format", "{{.Name}}"]) {
        for name in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(pid) = name
                .strip_prefix("imdsd-nettest-")
                .and_then(|rest| rest.split('-').next())
            {
                if dead(pid) {
                    remove_network(name);
                }
            }
        }
    }
    if let Some(out) = quiet("iptables-save", &[]) {
        let mut table = String::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t.to_string();
            }
            let Some(rule) = line.strip_prefix("-A ") else {
                continue;
            };
            if !line.contains("--comment imdsd") {
                continue;
            }
            let stale = rule.split_whitespace().any(|w| {
                w.strip_prefix("imdsdt").is_some_and(|rest| {
                    let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    dead(&pid)
                })
            });
            if stale {
                let spec: Vec<String> = rule.split_whitespace().map(str::to_string).collect();
                delete_rule(&table, &spec);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A listener on the host

/// Answers HTTP requests on `listener` with `body` until dropped, and records who connected.
struct Listener {
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    fn serve(listener: TcpListener, body: &'static str) -> Listener {
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        listener.set_nonblocking(true).expect("nonblocking");
        let thread = {
            let (peers, stop) = (peers.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            peers.lock().expect("peers").push(peer);
                            answer(stream, body);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        Listener {
            peers,
            stop,
            thread: Some(thread),
        }
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers").clone()
    }
}

fn answer(mut stream: TcpStream, body: &str) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A busybox shell command in a throwaway container of the test image on `network` (empty: the
/// default bridge); returns its exit code and output.
fn in_container(network: &str, label: &str, script: &str) -> (i64, String) {
    let opts = RunOpts {
        name: label.into(),
        network: network.into(),
        image: docker::test_image(),
        entrypoint: Some("/bin/busybox".into()),
        args: vec!["sh".into(), "-c".into(), script.into()],
        ..RunOpts::default()
    };
    docker::run_to_completion(&opts, TIMEOUT)
}

/// `wget` that gives up after a few seconds. (Not `wget -T`: Debian's busybox-static 1.35 wget
/// segfaults with it.)
fn wget_script(url: &str) -> String {
    format!("timeout 5 wget -q -O - {url}; echo \" wget-exit=$?\"")
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn bad_arguments_exit_64_and_change_nothing() {
    for args in [
        &["up", "--layout", "nowhere"][..],
        &["up", "--layout", "ec2", "--bridge", "imdsd9"],
        &["up", "--layout", "compose", "--port", "9000"],
        &["up", "--address", "10.0.0.1"],
        &["up", "--subnet", "169.254.169.7/24"],
        &["up", "--subnet", "not-a-subnet"],
        &["down", "--bridge", "a-bridge-name-too-long"],
        &["down", "--network-name", "-bad"],
        &["down", "--layout", "ec2", "--port", "0"],
        &["sideways"],
    ] {
        let r = imdsd_network(args);
        assert_eq!(r.code, 64, "imdsd network {}: {}", args.join(" "), r.show());
        assert_eq!(r.stdout, "", "{}", r.show());
        assert!(!r.stderr.trim().is_empty(), "says why: {}", r.show());
    }
}

#[test]
fn host_layout_up_is_idempotent_and_down_restores_everything() {
    require_host_tools();
    let me = names('h');
    let tokens = [me.network.as_str(), me.bridge.as_str()];
    let _cleanup = Cleanup {
        networks: vec![me.network.clone()],
        rules: Vec::new(),
    };

    // Other processes pick subnets at the same time: on an overlap, try the next one.
    let mut chosen = None;
    for n in candidate_octets() {
        let subnet = format!("169.254.{n}.0/24");
        let address = format!("169.254.{n}.254");
        let flags: Vec<String> = [
            "--network-name",
            &me.network,
            "--subnet",
            &subnet,
            "--address",
            &address,
            "--bridge",
            &me.bridge,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
        let before = settled_snapshot(&tokens);
        assert_state("before up", &before, &tokens, &BTreeMap::new());

        // --dry-run: the command, and nothing changes.
        let dry = imdsd_network(&[&["up", "--dry-run"][..], &flag_refs].concat());
        if dry.code == 1 && dry.stderr.contains("overlap") {
            continue;
        }
        assert_eq!(dry.code, 0, "up --dry-run: {}", dry.show());
        assert_eq!(
            commands(&dry.stdout),
            [format!(
                "docker network create --driver bridge --subnet {subnet} --gateway {address} \
                 --opt com.docker.network.bridge.name={} --label imdsd.managed=true {}",
                me.bridge, me.network
            )],
            "{}",
            dry.show()
        );
        assert_state("after up --dry-run", &before, &tokens, &BTreeMap::new());

        let up = imdsd_network(&[&["up"][..], &flag_refs].concat());
        if up.code == 1 && up.stderr.contains("overlap") {
            continue;
        }
        assert_eq!(up.code, 0, "up: {}", up.show());
        chosen = Some((n, flags, before, up));
        break;
    }
    let (n, flags, before, up) = chosen.expect("a free subnet in 169.254.200-250");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let address = Ipv4Addr::new(169, 254, n, 254);

    let lines: Vec<&str> = up.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", up.show());
    assert!(
        lines[0].starts_with(&format!("added: docker network {} ", me.network)),
        "{}",
        up.show()
    );
    assert_eq!(
        lines[1],
        format!(
            "exists: address {address}/24 on {} (the host's address on the network)",
            me.bridge
        ),
        "{}",
        up.show()
    );
    assert!(lines[2].starts_with("next: "), "{}", up.show());
    let mine = snapshot().mine(&tokens);
    assert!(
        mine.contains_key(&format!("net|{}", me.network)),
        "{mine:?}"
    );
    assert!(
        mine.contains_key(&format!("link|{}", me.bridge)),
        "{mine:?}"
    );
    assert!(
        mine.contains_key(&format!("addr|{} inet {address}/24", me.bridge)),
        "{mine:?}"
    );
    // Docker's own rules for the bridge came with it (and must go with it).
    assert!(
        mine.keys()
            .any(|l| l.starts_with("ipt|filter|-A FORWARD") && l.contains(&me.bridge)),
        "{mine:?}"
    );
    assert_state("after up", &before, &tokens, &mine);
    let inspect = run_ok(
        "docker",
        &[
            "network",
            "inspect",
            "--format",
            "{{json .Labels}} {{json .IPAM.Config}} {{json .Options}}",
            &me.network,
        ],
    );
    assert_eq!(
        inspect.trim(),
        format!(
            "{{\"imdsd.managed\":\"true\"}} [{{\"Subnet\":\"169.254.{n}.0/24\",\"Gateway\":\"{address}\"}}] \
             {{\"com.docker.network.bridge.name\":\"{}\"}}",
            me.bridge
        )
    );

    // A second up finds everything in place and changes nothing.
    let again = imdsd_network(&[&["up"][..], &flags].concat());
    assert_eq!(again.code, 0, "second up: {}", again.show());
    assert!(
        again
            .stdout
            .lines()
            .all(|l| l.starts_with("exists: ") || l.starts_with("next: ")),
        "{}",
        again.show()
    );
    assert_eq!(again.stdout.lines().count(), 3, "{}", again.show());
    assert_state("after a second up", &before, &tokens, &mine);

    // The compose layout on the same subnet sees the clash and names the network.
    let compose = imdsd_network(&[
        "up",
        "--layout",
        "compose",
        "--subnet",
        &format!("169.254.{n}.0/24"),
        "--address",
        &address.to_string(),
    ]);
    assert_eq!(compose.code, 1, "{}", compose.show());
    assert!(
        compose.stderr.contains(&me.network) && compose.stderr.contains("fix: "),
        "{}",
        compose.show()
    );

    // The daemon's part: a host process listens on the gateway address, and a container on the
    // network reaches it there, from its own address.
    let listener = TcpListener::bind((address, 0)).expect("bind the network's gateway address");
    let url = format!("http://{}/", listener.local_addr().expect("addr"));
    let server = Listener::serve(listener, "host-layout");
    let container = TestContainer::run(&RunOpts {
        name: "nettest-attached".into(),
        network: me.network.clone(),
        image: docker::test_image(),
        entrypoint: Some("/bin/busybox".into()),
        args: vec!["sleep".into(), "120".into()],
        ..RunOpts::default()
    });
    let (code, output) = container.exec(["/bin/busybox", "sh", "-c", &wget_script(&url)]);
    assert_eq!(
        (code, output.as_str()),
        (0, "host-layout wget-exit=0\n"),
        "a container on the network reaches the host at {url}"
    );
    let peers = server.peers();
    assert_eq!(
        peers.iter().map(SocketAddr::ip).collect::<Vec<_>>(),
        [container.ip.expect("the container's address")],
        "the host sees the container's own address"
    );
    drop(server);

    // down refuses while a container is attached, and says which.
    let refused = imdsd_network(&[&["down"][..], &flags].concat());
    assert_eq!(
        refused.code,
        1,
        "down with a container attached: {}",
        refused.show()
    );
    assert!(
        refused.stderr.contains(&container.name) && refused.stderr.contains("fix: "),
        "{}",
        refused.show()
    );
    assert_eq!(refused.stdout, "", "{}", refused.show());
    container.rm();

    // --dry-run down: the command, and nothing changes.
    let dry = imdsd_network(&[&["down", "--dry-run"][..], &flags].concat());
    assert_eq!(dry.code, 0, "down --dry-run: {}", dry.show());
    assert_eq!(
        commands(&dry.stdout),
        [format!("docker network rm {}", me.network)],
        "{}",
        dry.show()
    );
    assert!(docker::network_exists(&me.network));

    let down = imdsd_network(&[&["down"][..], &flags].concat());
    assert_eq!(down.code, 0, "down: {}", down.show());
    assert_eq!(
        down.stdout,
        format!("removed: docker network {}\n", me.network),
        "{}",
        down.show()
    );
    assert_state("after down", &before, &tokens, &BTreeMap::new());

    let again = imdsd_network(&[&["down"][..], &flags].concat());
    assert_eq!(again.code, 0, "second down: {}", again.show());
    assert_eq!(
        again.stdout,
        format!("absent: docker network {}\n", me.network),
        "{}",
        again.show()
    );
}

#[test]
fn ec2_layout_redirects_metadata_requests_and_down_removes_exactly_its_rules() {
    require_host_tools();
    let me = names('e');
    let port = unique_port();
    let port_s = port.to_string();
    let tokens = [me.network.as_str(), me.bridge.as_str()];
    // The two rules, as iptables-save prints them.
    let expected_rules = [
        format!(
            "ipt|filter|-A INPUT ! -i {} -p tcp -m tcp --dport {port} -m addrtype ! --src-type \
             LOCAL -m comment --comment imdsd -j DROP",
            me.bridge
        ),
        format!(
            "ipt|nat|-A PREROUTING -d 169.254.169.254/32 -i {} -p tcp -m tcp --dport 80 -m \
             comment --comment imdsd -j REDIRECT --to-ports {port}",
            me.bridge
        ),
    ];
    let _cleanup = Cleanup {
        networks: vec![me.network.clone()],
        // The spec after `-A ` in iptables-save's words is what `iptables -D` takes.
        rules: expected_rules
            .iter()
            .map(|r| {
                let mut parts = r.splitn(3, '|').skip(1);
                let table = parts.next().unwrap_or_default().to_string();
                let spec = parts
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches("-A ")
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
                (table, spec)
            })
            .collect(),
    };
    // The containers' bridge: a network of this test's own, standing in for docker0.
    let n = create_plain_network(&me);
    let gateway = Ipv4Addr::new(169, 254, n, 1);
    let flags = [
        "--layout",
        "ec2",
        "--bridge-interface",
        &me.bridge,
        "--port",
        &port_s,
    ];
    let url_direct = format!("http://{gateway}:{port}/");
    let listener = TcpListener::bind((gateway, port))
        .unwrap_or_else(|e| panic!("bind {gateway}:{port} (where imdsd would listen): {e}"));
    let server = Listener::serve(listener, "ec2-layout");

    // Before: a container on another bridge reaches the port (the control for the DROP check).
    let (_, output) = in_container("", "nettest-control", &wget_script(&url_direct));
    assert_eq!(
        output, "ec2-layout wget-exit=0\n",
        "before up, the port is open"
    );

    let before = settled_snapshot(&tokens);
    let base = before.mine(&tokens);
    assert!(
        !base.keys().any(|l| l.contains("--comment imdsd")),
        "{base:?}"
    );

    // --dry-run: the two commands, and nothing changes.
    let dry = imdsd_network(&[&["up", "--dry-run"][..], &flags].concat());
    assert_eq!(dry.code, 0, "up --dry-run: {}", dry.show());
    assert_eq!(
        commands(&dry.stdout),
        [
            format!(
                "iptables -w -t filter -I INPUT 1 '!' -i {} -p tcp -m tcp --dport {port} -m \
                 addrtype '!' --src-type LOCAL -m comment --comment imdsd -j DROP",
                me.bridge
            ),
            format!(
                "iptables -w -t nat -I PREROUTING 1 -i {} -d 169.254.169.254/32 -p tcp -m tcp \
                 --dport 80 -m comment --comment imdsd -j REDIRECT --to-ports {port}",
                me.bridge
            ),
        ],
        "{}",
        dry.show()
    );
    assert_state("after up --dry-run", &before, &tokens, &base);

    let up = imdsd_network(&[&["up"][..], &flags].concat());
    assert_eq!(up.code, 0, "up: {}", up.show());
    let lines: Vec<&str> = up.stdout.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(format!("exists: interface {} ({gateway}/24)", me.bridge).as_str()),
        "{}",
        up.show()
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("added: iptables"))
            .count(),
        2,
        "{}",
        up.show()
    );
    assert!(
        up.stdout.contains(&format!(
            "next: run imdsd on the host with --listen {gateway}:{port}"
        )),
        "{}",
        up.show()
    );
    let mut mine = base.clone();
    for rule in &expected_rules {
        mine.insert(rule.clone(), 1);
    }
    assert_state("after up", &before, &tokens, &mine);

    // A second up finds both rules and adds no copy.
    let again = imdsd_network(&[&["up"][..], &flags].concat());
    assert_eq!(again.code, 0, "second up: {}", again.show());
    assert_eq!(
        again
            .stdout
            .lines()
            .filter(|l| l.starts_with("exists: iptables"))
            .count(),
        2,
        "{}",
        again.show()
    );
    assert!(!again.stdout.contains("added:"), "{}", again.show());
    assert_state("after a second up", &before, &tokens, &mine);

    // What the rules are for: a container on the bridge asking the metadata address lands on
    // the listener, from its own address ...
    let (code, output) = in_container(
        &me.network,
        "nettest-redirected",
        &wget_script("http://169.254.169.254/latest/meta-data/"),
    );
    assert_eq!(code, 0, "{output}");
    assert_eq!(
        output, "ec2-layout wget-exit=0\n",
        "169.254.169.254:80 is redirected to {gateway}:{port}: {output}"
    );
    let peers = server.peers();
    let redirected = peers.last().expect("a connection").ip();
    assert!(
        redirected.to_string().starts_with(&format!("169.254.{n}.")) && redirected != gateway,
        "the listener sees the container's own address, not {redirected} ({peers:?})"
    );
    // ... while a container on another bridge can no longer reach the port, and the host can.
    let count = server.peers().len();
    let (_, output) = in_container("", "nettest-dropped", &wget_script(&url_direct));
    assert!(
        !output.contains("wget-exit=0"),
        "the port is closed to other interfaces: {output}"
    );
    assert_eq!(server.peers().len(), count, "no connection got through");
    TcpStream::connect_timeout(&SocketAddr::from((gateway, port)), Duration::from_secs(5))
        .expect("the host itself still reaches the port");
    drop(server);

    // --dry-run down: the two deletions, in reverse order, and nothing changes.
    let dry = imdsd_network(&[&["down", "--dry-run"][..], &flags].concat());
    assert_eq!(dry.code, 0, "down --dry-run: {}", dry.show());
    let dry_commands = commands(&dry.stdout);
    assert_eq!(dry_commands.len(), 2, "{}", dry.show());
    assert!(dry_commands[0].starts_with("iptables -w -t nat -D PREROUTING -i "));
    assert!(dry_commands[1].starts_with("iptables -w -t filter -D INPUT '!' -i "));
    assert_state("after down --dry-run", &before, &tokens, &mine);

    let down = imdsd_network(&[&["down"][..], &flags].concat());
    assert_eq!(down.code, 0, "down: {}", down.show());
    assert_eq!(
        down.stdout
            .lines()
            .filter(|l| l.starts_with("removed: iptables"))
            .count(),
        2,
        "{}",
        down.show()
    );
    assert_state("after down", &before, &tokens, &base);

    let again = imdsd_network(&[&["down"][..], &flags].concat());
    assert_eq!(again.code, 0, "second down: {}", again.show());
    assert_eq!(
        again
            .stdout
            .lines()
            .filter(|l| l.starts_with("absent: iptables"))
            .count(),
        2,
        "{}",
        again.show()
    );
    assert!(!again.stdout.contains("removed:"), "{}", again.show());
}

#[test]
fn down_refuses_a_network_imdsd_did_not_create() {
    require_host_tools();
    let me = names('u');
    let tokens = [me.network.as_str(), me.bridge.as_str()];
    let _cleanup = Cleanup {
        networks: vec![me.network.clone()],
        rules: Vec::new(),
    };
    let n = create_plain_network(&me);
    let subnet = format!("169.254.{n}.0/24");
    let before = settled_snapshot(&tokens);
    let mine = before.mine(&tokens);
    assert!(
        mine.contains_key(&format!("net|{}", me.network)),
        "{mine:?}"
    );

    let flags = |address: &str| -> Vec<String> {
        [
            "--network-name",
            &me.network,
            "--subnet",
            &subnet,
            "--address",
            address,
            "--bridge",
            &me.bridge,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let same = flags(&format!("169.254.{n}.1"));
    let same: Vec<&str> = same.iter().map(String::as_str).collect();

    let down = imdsd_network(&[&["down"][..], &same].concat());
    assert_eq!(down.code, 1, "{}", down.show());
    assert_eq!(down.stdout, "", "{}", down.show());
    assert!(
        down.stderr.contains("imdsd.managed=true")
            && down
                .stderr
                .contains(&format!("docker network rm {}", me.network)),
        "{}",
        down.show()
    );
    let dry = imdsd_network(&[&["down", "--dry-run"][..], &same].concat());
    assert_eq!(dry.code, 1, "a dry run refuses too: {}", dry.show());
    assert_state("after a refused down", &before, &tokens, &mine);

    // up with matching flags accepts it as it is, and says down will leave it.
    let up = imdsd_network(&[&["up"][..], &same].concat());
    assert_eq!(up.code, 0, "{}", up.show());
    assert!(
        up.stdout
            .starts_with(&format!("exists: docker network {}", me.network))
            && up.stdout.contains("not created by `imdsd network up`"),
        "{}",
        up.show()
    );
    // up with flags it does not match refuses.
    let other = flags(&format!("169.254.{n}.254"));
    let other: Vec<&str> = other.iter().map(String::as_str).collect();
    let up = imdsd_network(&[&["up"][..], &other].concat());
    assert_eq!(up.code, 1, "{}", up.show());
    assert!(
        up.stderr
            .contains(&format!("gateway 169.254.{n}.1 (wanted 169.254.{n}.254)")),
        "{}",
        up.show()
    );
    assert_state("after up on a foreign network", &before, &tokens, &mine);

    remove_network(&me.network);
    assert!(!docker::network_exists(&me.network));
}

#[test]
fn down_with_nothing_there_reports_absent_and_changes_nothing() {
    require_host_tools();
    let me = names('a');
    let port = unique_port().to_string();
    let tokens = [me.network.as_str(), me.bridge.as_str()];
    let before = settled_snapshot(&tokens);

    let host = imdsd_network(&["down", "--network-name", &me.network]);
    assert_eq!(host.code, 0, "{}", host.show());
    assert_eq!(
        host.stdout,
        format!("absent: docker network {}\n", me.network)
    );

    let ec2 = [
        "--layout",
        "ec2",
        "--bridge-interface",
        &me.bridge,
        "--port",
        &port,
    ];
    let down = imdsd_network(&[&["down"][..], &ec2].concat());
    assert_eq!(down.code, 0, "{}", down.show());
    let absent: Vec<&str> = down
        .stdout
        .lines()
        .filter(|l| l.starts_with("absent: iptables"))
        .collect();
    assert_eq!(absent.len(), 2, "{}", down.show());
    assert!(
        absent.iter().all(|l| l.contains(&me.bridge)),
        "{}",
        down.show()
    );
    // Only `note:` lines besides (other tests' tagged rules, left alone).
    assert!(
        down.stdout
            .lines()
            .all(|l| l.starts_with("absent: ") || l.starts_with("note: ")),
        "{}",
        down.show()
    );
    let dry = imdsd_network(&[&["down", "--dry-run"][..], &ec2].concat());
    assert_eq!(dry.code, 0, "{}", dry.show());
    assert!(commands(&dry.stdout).is_empty(), "{}", dry.show());

    // ec2 up needs the bridge to exist, and says so.
    let up = imdsd_network(&[&["up"][..], &ec2].concat());
    assert_eq!(up.code, 1, "{}", up.show());
    assert!(
        up.stderr
            .contains(&format!("the interface {} does not exist", me.bridge))
            && up.stderr.contains("fix: "),
        "{}",
        up.show()
    );

    let compose = imdsd_network(&["down", "--layout", "compose"]);
    assert_eq!(compose.code, 0, "{}", compose.show());
    assert!(compose.stdout.starts_with("absent: "), "{}", compose.show());

    assert_state(
        "after downs with nothing there",
        &before,
        &tokens,
        &BTreeMap::new(),
    );
}
