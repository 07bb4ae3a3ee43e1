//! `imdsd network up|down`: sets up, idempotently, the host networking a layout needs, and removes
//! exactly what `up` added and nothing that was there before.
//!
//! Layouts (`--layout`):
//! - `host` (default): a dedicated Docker bridge network whose gateway is the metadata address, so
//!   imdsd on the host can `--listen 169.254.169.254:80` on an address Docker put on the bridge.
//!   The network is labelled `imdsd.managed=true`; `down` removes only a network with that label
//!   and no containers attached.
//! - `compose`: docker-compose.yml creates its own network, so there is nothing to add; `up` checks
//!   that nothing else claims the subnet or the metadata address and says what compose will do.
//! - `ec2`: on an EC2 host with containers on `docker0`, iptables rules that send the containers'
//!   metadata requests to imdsd (REDIRECT to a port imdsd listens on at the bridge's address)
//!   and keep every other interface off that port; each rule carries the comment `imdsd`.
//! - `swarm`: a Swarm node's `docker_gwbridge`, the bridge through which every service task
//!   reaches its host, created before the node joins a swarm with the metadata address as its
//!   gateway (Docker's documented way to choose that bridge's settings: Swarm takes the network
//!   it finds). Tasks then reach imdsd, a global service on the host network, at
//!   169.254.169.254 on their default route. Labelled `imdsd.managed=true` like the host
//!   layout's network; `down` removes only that, and only once the node has left the swarm.
//!
//! Everything is done with the operator's own tools (`docker` or `podman`, `ip`, `iptables`), so
//! `--dry-run` can print exactly the commands it would run, and an operator can check or undo any
//! step by hand.
//!
//! Engines (`--engine`): Docker, or rootful Podman, whose networks (netavark) differ in what
//! matters here: a network's bridge, with its gateway address, exists only while a container is
//! attached (imdsd binds the address ahead), the bridge is named with `--interface-name` (a
//! Podman too old for it names it `podmanN` itself), and the network's record lists no
//! containers (`podman ps --filter network=…` does). Rootless Podman is refused: its containers'
//! addresses live in the user's own network namespace, out of reach of imdsd on the host. `iptables` is whichever variant the host selects: iptables-nft takes the same commands, so
//! nftables hosts need no separate path (Docker itself uses the same `iptables`).
//!
//! Output: one line per step on stdout (`added:`, `exists:`, `removed:`, `absent:`, and `next:` /
//! `note:` for guidance). With `--dry-run` the lines that change something are the commands
//! themselves, shell-quoted, and the others are `#` comments: the output is a script. A failure is
//! reported on stderr with the command, its stderr and a fix. Exit codes: 0 done, 1 failed, 64 bad
//! arguments.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::process::{Output, Stdio};
use std::time::Duration;

use ipnet::Ipv4Net;
use serde_json::Value;

const EX_FAILURE: u8 = 1;
const EX_USAGE: u8 = 64;

/// The label that marks a Docker network as created by `imdsd network up` (value `true`).
pub const MANAGED_LABEL: &str = "imdsd.managed";
/// The comment every iptables rule of the ec2 layout carries.
pub const RULE_COMMENT: &str = "imdsd";

const DEFAULT_NETWORK_NAME: &str = "ec2_metadata";
const DEFAULT_SUBNET: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 169, 0), 24);
const METADATA_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The port the SDKs ask on; the ec2 layout redirects it.
const METADATA_PORT: u16 = 80;
const DEFAULT_BRIDGE: &str = "imdsd0";
const DEFAULT_BRIDGE_INTERFACE: &str = "docker0";
/// The bridge of Podman's default network.
const PODMAN_BRIDGE_INTERFACE: &str = "podman0";
const DEFAULT_PORT: u16 = 8169;

const BRIDGE_NAME_OPTION: &str = "com.docker.network.bridge.name";
/// The network, and its Linux bridge, through which Swarm tasks reach their host.
const GATEWAY_BRIDGE: &str = crate::docker::GATEWAY_BRIDGE;
/// What Swarm itself gives `docker_gwbridge` (Docker's documentation on customizing it): tasks
/// do not talk to each other over it, and their traffic leaves the host masqueraded.
const SWARM_BRIDGE_OPTIONS: [(&str, &str); 2] = [
    ("com.docker.network.bridge.enable_icc", "false"),
    ("com.docker.network.bridge.enable_ip_masquerade", "true"),
];
const COMPOSE_NETWORK_LABEL: &str = "com.docker.compose.network";
const COMPOSE_PROJECT_LABEL: &str = "com.docker.compose.project";

/// How long `up` waits for Docker to put the gateway address on a bridge it just created (Docker
/// 20.10 does it during `network create`; the wait covers a slower engine).
const ADDRESS_WAIT: Duration = Duration::from_secs(3);

/// `imdsd network` options.
#[derive(Debug, Clone, clap::Args)]
pub struct NetworkArgs {
    #[command(subcommand)]
    pub action: NetworkAction,
    #[command(flatten)]
    pub options: NetworkOptions,
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum NetworkAction {
    /// Create what the layout needs (idempotent: what exists is left as it is).
    Up,
    /// Remove what `up` created, and nothing else.
    Down,
}

/// Where imdsd runs and how containers reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// imdsd on the host, on a dedicated Docker network whose gateway is the metadata address.
    Host,
    /// imdsd in a container from docker-compose.yml (compose creates the network: checks only).
    Compose,
    /// imdsd on an EC2 host; iptables redirects the containers' metadata requests to it.
    Ec2,
    /// imdsd as a Swarm global service; the node's docker_gwbridge has the metadata address as
    /// its gateway (set up before the node joins the swarm).
    Swarm,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Host => "host",
            Layout::Compose => "compose",
            Layout::Ec2 => "ec2",
            Layout::Swarm => "swarm",
        })
    }
}

/// The container engine whose networks are set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    Docker,
    /// Rootful Podman (netavark).
    Podman,
}

impl Engine {
    fn program(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Engine::Docker => "Docker",
            Engine::Podman => "Podman",
        }
    }

    /// The engine an operator who did not say means: Podman when its own variable
    /// (`CONTAINER_HOST`) is set or `DOCKER_HOST` names a Podman socket, or when there is a
    /// `podman` but no `docker` on `PATH`; Docker otherwise.
    fn detect(env: &dyn Fn(&str) -> Option<String>, on_path: &dyn Fn(&str) -> bool) -> Engine {
        let set = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        if set("CONTAINER_HOST").is_some()
            || set("DOCKER_HOST").is_some_and(|h| h.contains("podman"))
            || (!on_path("docker") && on_path("podman"))
        {
            Engine::Podman
        } else {
            Engine::Docker
        }
    }
}

/// Whether an executable `program` is on `PATH`.
fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// The layout's settings. Each applies to some layouts only; giving one to another layout is an
/// error rather than silently ignored. They are accepted before or after `up`/`down`.
#[derive(Debug, Clone, clap::Args)]
pub struct NetworkOptions {
    /// The layout to set up or remove.
    #[arg(long, value_enum, default_value_t = Layout::Host, global = true)]
    pub layout: Layout,

    /// The container engine: docker, or podman (rootful). [default: podman when CONTAINER_HOST
    /// is set or DOCKER_HOST names a Podman socket, or when only podman is installed; else
    /// docker]
    #[arg(long, value_enum, env = "IMDSD_ENGINE", global = true)]
    pub engine: Option<Engine>,

    /// Print the commands that would change something (one per line, shell-quoted) and change
    /// nothing. The read-only checks still run, so it needs the same access as the real thing.
    #[arg(long, global = true)]
    pub dry_run: bool,

    /// host: the Docker network's name; compose: the network's key in docker-compose.yml.
    /// [default: ec2_metadata]
    #[arg(long, value_name = "NAME", global = true)]
    pub network_name: Option<String>,

    /// host, compose, swarm: the network's IPv4 subnet. [default: 169.254.169.0/24]
    #[arg(long, value_name = "CIDR", global = true)]
    pub subnet: Option<Ipv4Net>,

    /// The metadata address. host, swarm: the network's gateway, the host's own address on it,
    /// where imdsd listens; compose: imdsd's container address; ec2: the destination redirected
    /// to imdsd. [default: 169.254.169.254]
    #[arg(long, value_name = "IPV4", global = true)]
    pub address: Option<Ipv4Addr>,

    /// host: the Linux bridge interface the engine creates for the network. [default: imdsd0]
    #[arg(long, value_name = "IFNAME", global = true)]
    pub bridge: Option<String>,

    /// ec2: the bridge the containers are on; imdsd listens on its address. [default: docker0,
    /// podman0 with Podman]
    #[arg(long, value_name = "IFNAME", global = true)]
    pub bridge_interface: Option<String>,

    /// ec2: the port imdsd listens on at the bridge's address; metadata requests (port 80) are
    /// redirected there. [default: 8169]
    #[arg(long, value_name = "PORT", global = true,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
}

/// Runs the action; returns the exit code (0 done, 1 failed, 64 bad arguments).
pub async fn run(args: NetworkArgs) -> u8 {
    let env = |k: &str| std::env::var(k).ok();
    let engine = args
        .options
        .engine
        .unwrap_or_else(|| Engine::detect(&env, &on_path));
    let plan = match resolve(&args.options, engine) {
        Ok(plan) => plan,
        Err(problems) => {
            for p in problems {
                eprintln!("imdsd network: {p}");
            }
            return EX_USAGE;
        }
    };
    let out = Out {
        dry_run: args.options.dry_run,
    };
    if engine == Engine::Podman
        && plan_uses_engine(&plan)
        && let Err(failure) = refuse_rootless_podman().await
    {
        eprintln!("{failure}");
        return EX_FAILURE;
    }
    let result = match (&plan, args.action) {
        (Plan::Host(h), NetworkAction::Up) => host_up(h, &out).await,
        (Plan::Host(h), NetworkAction::Down) => host_down(h, &out).await,
        (Plan::Compose(c), NetworkAction::Up) => compose_up(c, &out).await,
        (Plan::Compose(c), NetworkAction::Down) => compose_down(c, &out).await,
        (Plan::Ec2(e), NetworkAction::Up) => ec2_up(e, &out).await,
        (Plan::Ec2(e), NetworkAction::Down) => ec2_down(e, &out).await,
        (Plan::Swarm(h), NetworkAction::Up) => swarm_up(h, &out).await,
        (Plan::Swarm(h), NetworkAction::Down) => swarm_down(h, &out).await,
    };
    match result {
        Ok(()) => 0,
        Err(failure) => {
            eprintln!("{failure}");
            EX_FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Arguments

#[derive(Debug)]
enum Plan {
    Host(HostPlan),
    Compose(ComposePlan),
    Ec2(Ec2Plan),
    /// The host layout's plan for `docker_gwbridge`, with Swarm's bridge options.
    Swarm(HostPlan),
}

#[derive(Debug)]
struct HostPlan {
    engine: Engine,
    name: String,
    subnet: Ipv4Net,
    address: Ipv4Addr,
    bridge: String,
    /// Driver options besides the bridge's name (`--opt KEY=VALUE`).
    options: Vec<(&'static str, &'static str)>,
    /// Whether `--bridge` was given (a Podman that cannot name bridges then fails, rather than
    /// quietly name it otherwise).
    bridge_given: bool,
}

#[derive(Debug)]
struct ComposePlan {
    engine: Engine,
    key: String,
    subnet: Ipv4Net,
    address: Ipv4Addr,
}

/// Whether the plan asks the engine anything (the ec2 layout only touches iptables).
fn plan_uses_engine(plan: &Plan) -> bool {
    !matches!(plan, Plan::Ec2(_))
}

#[derive(Debug)]
struct Ec2Plan {
    interface: String,
    address: Ipv4Addr,
    port: u16,
}

/// Validates the options for the chosen layout; every problem is reported, one line each.
fn resolve(o: &NetworkOptions, engine: Engine) -> Result<Plan, Vec<String>> {
    let mut problems = Vec::new();
    let given: [(&str, bool); 6] = [
        ("--network-name", o.network_name.is_some()),
        ("--subnet", o.subnet.is_some()),
        ("--address", o.address.is_some()),
        ("--bridge", o.bridge.is_some()),
        ("--bridge-interface", o.bridge_interface.is_some()),
        ("--port", o.port.is_some()),
    ];
    let applies: &[&str] = match o.layout {
        Layout::Host => &["--network-name", "--subnet", "--address", "--bridge"],
        Layout::Compose => &["--network-name", "--subnet", "--address"],
        Layout::Ec2 => &["--address", "--bridge-interface", "--port"],
        Layout::Swarm => &["--subnet", "--address"],
    };
    for (flag, set) in given {
        if set && !applies.contains(&flag) {
            problems.push(format!(
                "{flag} does not apply to the {} layout (its settings: {})",
                o.layout,
                applies.join(", ")
            ));
        }
    }

    let name = o
        .network_name
        .clone()
        .unwrap_or_else(|| DEFAULT_NETWORK_NAME.into());
    if !valid_network_name(&name) {
        problems.push(format!(
            "--network-name {name:?}: Docker network names are letters, digits and _.- \
             (starting with a letter or digit)"
        ));
    }
    let subnet = o.subnet.unwrap_or(DEFAULT_SUBNET);
    if subnet.trunc() != subnet {
        problems.push(format!(
            "--subnet {subnet} has host bits set; did you mean {}?",
            subnet.trunc()
        ));
    }
    if subnet.prefix_len() > 30 {
        problems.push(format!(
            "--subnet {subnet} is too small for a network (at most /30)"
        ));
    }
    let address = o.address.unwrap_or(METADATA_ADDRESS);
    if o.layout != Layout::Ec2 {
        let trunc = subnet.trunc();
        if !trunc.contains(&address) {
            problems.push(format!(
                "--address {address} is not inside --subnet {subnet}"
            ));
        } else if address == trunc.network() || address == trunc.broadcast() {
            problems.push(format!(
                "--address {address} is the network or broadcast address of {subnet}"
            ));
        }
    }
    let bridge = o.bridge.clone().unwrap_or_else(|| DEFAULT_BRIDGE.into());
    let interface = o.bridge_interface.clone().unwrap_or_else(|| {
        match engine {
            Engine::Docker => DEFAULT_BRIDGE_INTERFACE,
            Engine::Podman => PODMAN_BRIDGE_INTERFACE,
        }
        .into()
    });
    for (flag, ifname) in [("--bridge", &bridge), ("--bridge-interface", &interface)] {
        if !valid_interface_name(ifname) {
            problems.push(format!(
                "{flag} {ifname:?}: interface names are 1 to 15 letters, digits and _.-"
            ));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(match o.layout {
        Layout::Host => Plan::Host(HostPlan {
            engine,
            name,
            subnet,
            address,
            bridge,
            options: Vec::new(),
            bridge_given: o.bridge.is_some(),
        }),
        Layout::Swarm => Plan::Swarm(HostPlan {
            // Swarm is Docker's: its gateway bridge is made with Docker's CLI.
            engine: Engine::Docker,
            name: GATEWAY_BRIDGE.into(),
            subnet,
            address,
            bridge: GATEWAY_BRIDGE.into(),
            options: SWARM_BRIDGE_OPTIONS.to_vec(),
            bridge_given: false,
        }),
        Layout::Compose => Plan::Compose(ComposePlan {
            engine,
            key: name,
            subnet,
            address,
        }),
        Layout::Ec2 => Plan::Ec2(Ec2Plan {
            interface,
            address,
            port: o.port.unwrap_or(DEFAULT_PORT),
        }),
    })
}

fn valid_network_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Linux allows almost anything in 15 bytes; this is the safe subset. It also keeps iptables'
/// `+` wildcard and shell metacharacters out of the rules.
fn valid_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

// ---------------------------------------------------------------------------------------------
// Output and failures

/// Prints the steps, or with `--dry-run` the commands.
struct Out {
    dry_run: bool,
}

impl Out {
    /// A step that changes nothing (`exists`, `absent`, `next`, `note`).
    fn say(&self, kind: &str, what: &str) {
        if self.dry_run {
            println!("# {kind}: {what}");
        } else {
            println!("{kind}: {what}");
        }
    }

    /// A step that changes something: runs `cmd` and prints `kind: what`, or only prints `cmd`.
    async fn change(&self, cmd: &Cmd, kind: &str, what: &str) -> Result<(), Failure> {
        if self.dry_run {
            println!("{}", cmd.shell());
        } else {
            cmd.run_ok().await?;
            println!("{kind}: {what}");
        }
        Ok(())
    }
}

/// Why the action stopped, and what to do about it.
#[derive(Debug)]
struct Failure {
    problem: String,
    fix: String,
}

impl Failure {
    fn new(problem: impl Into<String>, fix: impl Into<String>) -> Failure {
        Failure {
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "imdsd network: {}\n  fix: {}", self.problem, self.fix)
    }
}

/// A command line of one of the operator's tools.
struct Cmd {
    program: &'static str,
    args: Vec<String>,
}

impl Cmd {
    fn new<I, S>(program: &'static str, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Cmd {
            program,
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// The command as one would type it in a POSIX shell.
    fn shell(&self) -> String {
        std::iter::once(self.program)
            .chain(self.args.iter().map(String::as_str))
            .map(shell_quote)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs the command to completion. `Err` only when it cannot be started at all.
    async fn output(&self) -> Result<Output, Failure> {
        tokio::process::Command::new(self.program)
            .args(&self.args)
            // English messages: some outcomes are told apart by what the tool says.
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| {
                let fix = if e.kind() == std::io::ErrorKind::NotFound {
                    match self.program {
                        "docker" => {
                            "install the Docker CLI, or put `docker` on PATH (for Podman: \
                             --engine podman)"
                        }
                        "podman" => "install Podman, or put `podman` on PATH",
                        "iptables" => {
                            "install iptables (Debian/Ubuntu: apt-get install iptables; \
                             iptables-nft is fine on nftables hosts)"
                        }
                        "ip" => "install iproute2 (the `ip` command)",
                        _ => "install it, or put it on PATH",
                    }
                } else {
                    "check that this user may run it"
                };
                Failure::new(format!("cannot run `{}`: {e}", self.shell()), fix)
            })
    }

    /// Runs the command; a non-zero exit is a [`Failure`] naming it, its stderr and a fix.
    async fn run_ok(&self) -> Result<String, Failure> {
        let out = self.output().await?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(self.failed(&out))
        }
    }

    fn failed(&self, out: &Output) -> Failure {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim();
        Failure::new(
            format!(
                "`{}` failed ({}): {}",
                self.shell(),
                out.status,
                if stderr.is_empty() {
                    "(no message)"
                } else {
                    stderr
                }
            ),
            fix_for(self.program, stderr),
        )
    }
}

/// The usual remedy for a tool's error message.
fn fix_for(program: &str, stderr: &str) -> String {
    let has = |s: &str| {
        stderr
            .to_ascii_lowercase()
            .contains(&s.to_ascii_lowercase())
    };
    let fix = match program {
        "docker" if has("cannot connect to the docker daemon") || has("is the docker daemon") => {
            "is Docker running? Start it (systemctl start docker), or point DOCKER_HOST at the \
             engine"
        }
        "docker" if has("permission denied") => "run as root, or as a user in the docker group",
        "docker" if has("pool overlaps") => {
            "another Docker network uses part of this subnet (see `docker network inspect`); \
             remove it or choose another --subnet"
        }
        "docker" if has("same bridge name") => {
            "another Docker network uses this bridge name; choose another --bridge"
        }
        "docker" if has("active endpoints") => {
            "containers are attached to the network; stop or disconnect them \
             (docker network disconnect NETWORK CONTAINER) and try again"
        }
        "docker" => "see Docker's message above",
        "podman" if has("cannot connect to podman") || has("unable to connect to podman") => {
            "is the Podman service up? (sudo systemctl enable --now podman.socket) \
             CONTAINER_HOST, when set, makes podman use it"
        }
        "podman" if has("already used on the host or by another config") => {
            "another network or a route on this host uses part of this subnet (`ip route`, \
             `podman network ls`); remove it or choose another --subnet and --address"
        }
        "podman" if has("permission denied") || has("rootless") => {
            "run as root (sudo): imdsd needs rootful Podman"
        }
        "podman" if has("is being used") || has("in use") => {
            "containers use the network; stop or remove them (podman ps --all --filter \
             network=NAME) and try again"
        }
        "podman" => "see Podman's message above",
        "iptables" if has("permission denied") || has("must be root") => "run as root (sudo)",
        "iptables" if has("xtables lock") => "another program holds the xtables lock; try again",
        "iptables"
            if has("couldn't load")
                || has("no chain/target/match")
                || has("unknown option")
                || has("not supported") =>
        {
            "the kernel lacks a netfilter module these rules need (comment, addrtype, tcp, \
             REDIRECT): load it with modprobe (xt_comment, xt_addrtype, xt_REDIRECT or their \
             nft_* counterparts), and check that `iptables` is the variant Docker uses \
             (iptables-nft or iptables-legacy)"
        }
        "iptables" => "check that `iptables -S` works for this user (run as root)",
        "ip" => "check that `ip addr` (iproute2) works",
        _ => "see the message above",
    };
    fix.to_string()
}

/// Quotes one word for a POSIX shell; plain words stay as they are.
fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:=@,+%".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

// ---------------------------------------------------------------------------------------------
// Docker and the host's interfaces

/// What `docker network inspect` says about a network, as far as the layouts care.
#[derive(Debug, Clone)]
struct NetInfo {
    name: String,
    id: String,
    driver: String,
    subnets: Vec<Ipv4Net>,
    gateways: Vec<String>,
    /// `com.docker.network.bridge.name`, when set.
    bridge_option: Option<String>,
    labels: BTreeMap<String, String>,
    /// Names of the containers attached.
    containers: Vec<String>,
}

impl NetInfo {
    fn parse(v: &Value) -> Option<NetInfo> {
        let s = |v: &Value| v.as_str().map(str::to_string);
        let config = v["IPAM"]["Config"].as_array().cloned().unwrap_or_default();
        let map = |v: &Value| -> BTreeMap<String, String> {
            v.as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut containers: Vec<String> = v["Containers"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(id, c)| s(&c["Name"]).unwrap_or_else(|| id.clone()))
                    .collect()
            })
            .unwrap_or_default();
        containers.sort();
        Some(NetInfo {
            name: s(&v["Name"])?,
            id: s(&v["Id"])?,
            driver: s(&v["Driver"]).unwrap_or_default(),
            // IPv6 subnets (and anything unparsable) cannot overlap an IPv4 layout.
            subnets: config
                .iter()
                .filter_map(|c| c["Subnet"].as_str()?.parse().ok())
                .collect(),
            gateways: config
                .iter()
                .filter_map(|c| s(&c["Gateway"]))
                .filter(|g| !g.is_empty())
                .collect(),
            bridge_option: map(&v["Options"]).remove(BRIDGE_NAME_OPTION),
            labels: map(&v["Labels"]),
            containers,
        })
    }

    /// A network as `podman network inspect` describes it (Podman's own record: no
    /// containers; the bridge is `network_interface`).
    fn parse_podman(v: &Value) -> Option<NetInfo> {
        let s = |v: &Value| v.as_str().map(str::to_string);
        let subnets = v["subnets"].as_array().cloned().unwrap_or_default();
        Some(NetInfo {
            name: s(&v["name"])?,
            id: s(&v["id"]).unwrap_or_default(),
            driver: s(&v["driver"]).unwrap_or_default(),
            subnets: subnets
                .iter()
                .filter_map(|c| c["subnet"].as_str()?.parse().ok())
                .collect(),
            gateways: subnets
                .iter()
                .filter_map(|c| s(&c["gateway"]))
                .filter(|g| !g.is_empty())
                .collect(),
            bridge_option: s(&v["network_interface"]).filter(|i| !i.is_empty()),
            labels: v["labels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default(),
            containers: Vec::new(),
        })
    }

    fn managed(&self) -> bool {
        self.labels.get(MANAGED_LABEL).map(String::as_str) == Some("true")
    }

    /// The Linux interface of a bridge network (what `ip addr` shows).
    fn interface(&self) -> Option<String> {
        if self.driver != "bridge" {
            return None;
        }
        if let Some(name) = &self.bridge_option {
            return Some(name.clone());
        }
        if self.name == "bridge" {
            return Some("docker0".into());
        }
        Some(format!("br-{}", self.id.get(..12).unwrap_or(&self.id)))
    }

    /// `name (subnet …, docker-compose project p)`, for messages.
    fn describe(&self) -> String {
        let mut parts = vec![format!(
            "subnet {}",
            self.subnets
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        )];
        if let Some(project) = self.labels.get(COMPOSE_PROJECT_LABEL) {
            parts.push(format!("docker-compose project {project}"));
        }
        if self.managed() {
            parts.push(format!(
                "created by `imdsd network up`, label {MANAGED_LABEL}=true"
            ));
        }
        format!("{} ({})", self.name, parts.join(", "))
    }
}

fn docker_not_found(stderr: &str) -> bool {
    // Docker 20.10 says "network X not found"; other versions "No such network: X".
    stderr.contains("not found") || stderr.contains("No such network")
}

/// `network inspect` of `names`: Docker prints one JSON record a line (`--format '{{json .}}'`),
/// Podman a JSON array (it has no such format).
fn inspect_cmd(engine: Engine, names: &[&str]) -> Cmd {
    let mut args = vec!["network", "inspect"];
    if engine == Engine::Docker {
        args.extend(["--format", "{{json .}}"]);
    }
    args.extend(names);
    Cmd::new(engine.program(), args)
}

/// The networks in `network inspect` output, either engine's.
fn parse_inspected(engine: Engine, stdout: &str) -> Vec<NetInfo> {
    let values: Vec<Value> = match serde_json::from_str::<Value>(stdout.trim()) {
        Ok(Value::Array(values)) => values,
        _ => stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect(),
    };
    values
        .iter()
        .filter_map(|v| match engine {
            Engine::Docker => NetInfo::parse(v),
            Engine::Podman => NetInfo::parse_podman(v),
        })
        .collect()
}

/// The network named exactly `name`, if any, with its containers (Podman's record has none).
async fn inspect_network(engine: Engine, name: &str) -> Result<Option<NetInfo>, Failure> {
    let cmd = inspect_cmd(engine, &[name]);
    let out = cmd.output().await?;
    if !out.status.success() {
        return if docker_not_found(&String::from_utf8_lossy(&out.stderr)) {
            Ok(None)
        } else {
            Err(cmd.failed(&out))
        };
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut info = parse_inspected(engine, &text)
        .into_iter()
        .next()
        .ok_or_else(|| {
            Failure::new(
                format!("`{}` printed no network: {}", cmd.shell(), text.trim()),
                format!(
                    "check that the {} CLI and engine work ({} network ls)",
                    engine.name(),
                    engine.program()
                ),
            )
        })?;
    // Docker also resolves an id prefix; only an exact name is this network.
    if info.name != name {
        return Ok(None);
    }
    if engine == Engine::Podman {
        let filter = format!("network={name}");
        let names = Cmd::new(
            "podman",
            ["ps", "--all", "--filter", &filter, "--format", "{{.Names}}"],
        )
        .run_ok()
        .await?;
        info.containers = names.split_whitespace().map(str::to_string).collect();
        info.containers.sort();
    }
    Ok(Some(info))
}

/// Every network on the engine.
async fn list_networks(engine: Engine) -> Result<Vec<NetInfo>, Failure> {
    // Docker lists ids, Podman names: either is what inspect takes.
    let mut ls = vec!["network", "ls", "--quiet"];
    if engine == Engine::Docker {
        ls.push("--no-trunc");
    }
    let ids = Cmd::new(engine.program(), ls).run_ok().await?;
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let cmd = inspect_cmd(engine, &ids);
    let out = cmd.output().await?;
    // A network removed between the listing and the inspect fails the inspect for that one
    // only; the others are still printed, and the one that is gone cannot be in the way.
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success()
        && !stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .all(docker_not_found)
    {
        return Err(cmd.failed(&out));
    }
    Ok(parse_inspected(
        engine,
        &String::from_utf8_lossy(&out.stdout),
    ))
}

/// Fails unless the Podman the CLI reaches is rootful: a rootless Podman's containers have
/// their addresses in the user's own network namespace (behind slirp4netns or pasta), where
/// imdsd on the host can neither be reached at a gateway nor tell callers apart.
async fn refuse_rootless_podman() -> Result<(), Failure> {
    let rootless = Cmd::new(
        "podman",
        ["info", "--format", "{{.Host.Security.Rootless}}"],
    )
    .run_ok()
    .await?;
    if rootless.trim() == "true" {
        return Err(Failure::new(
            "this is rootless Podman: its containers' addresses live in the user's own network              namespace (slirp4netns or pasta), where imdsd on the host cannot be reached at a              network's gateway nor tell the callers apart",
            "use rootful Podman: run as root (sudo imdsd network up --engine podman), and have              imdsd follow /run/podman/podman.sock (sudo systemctl enable --now podman.socket)",
        ));
    }
    Ok(())
}

/// Whether this Podman's `network create` can name the bridge (`--interface-name`).
async fn podman_names_bridges() -> Result<bool, Failure> {
    let help = Cmd::new("podman", ["network", "create", "--help"])
        .run_ok()
        .await?;
    Ok(help.contains("--interface-name"))
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The IPv4 addresses on the host's interfaces (`dev`: one interface only), as (interface,
/// address/prefix). `Ok(None)` when `dev` does not exist.
async fn interface_addresses(dev: Option<&str>) -> Result<Option<Vec<(String, Ipv4Net)>>, Failure> {
    let mut args = vec!["-o", "-4", "addr", "show"];
    if let Some(dev) = dev {
        args.extend(["dev", dev]);
    }
    let cmd = Cmd::new("ip", args);
    let out = cmd.output().await?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return if dev.is_some() && stderr.contains("does not exist") {
            Ok(None)
        } else {
            Err(cmd.failed(&out))
        };
    }
    // "7: docker0    inet 172.17.0.1/16 brd 172.17.255.255 scope global docker0\ ..."
    Ok(Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace().skip(1);
                let ifname = words.next()?.trim_end_matches(':');
                let ifname = ifname.split('@').next().unwrap_or(ifname);
                (words.next()? == "inet").then_some(())?;
                Some((ifname.to_string(), words.next()?.parse().ok()?))
            })
            .collect(),
    ))
}

async fn interface_exists(dev: &str) -> Result<bool, Failure> {
    let cmd = Cmd::new("ip", ["link", "show", "dev", dev]);
    let out = cmd.output().await?;
    if out.status.success() {
        Ok(true)
    } else if String::from_utf8_lossy(&out.stderr).contains("does not exist") {
        Ok(false)
    } else {
        Err(cmd.failed(&out))
    }
}

// ---------------------------------------------------------------------------------------------
// host: a dedicated network whose gateway is the metadata address

impl HostPlan {
    fn describe(&self, bridge: &str) -> String {
        format!(
            "{} network {} (subnet {}, gateway {}, bridge {bridge}, label {MANAGED_LABEL}=true)",
            self.engine.program(),
            self.name,
            self.subnet,
            self.address
        )
    }

    /// The create command; `name_bridge` false for a Podman whose CLI cannot name it.
    fn create(&self, name_bridge: bool) -> Cmd {
        let mut args: Vec<String> = vec![
            "network".into(),
            "create".into(),
            "--driver".into(),
            "bridge".into(),
            "--subnet".into(),
            self.subnet.to_string(),
            "--gateway".into(),
            self.address.to_string(),
        ];
        match self.engine {
            Engine::Docker => {
                args.extend([
                    "--opt".into(),
                    format!("{BRIDGE_NAME_OPTION}={}", self.bridge),
                ]);
            }
            Engine::Podman if name_bridge => {
                args.extend(["--interface-name".into(), self.bridge.clone()]);
            }
            Engine::Podman => {}
        }
        args.extend(
            self.options
                .iter()
                .flat_map(|(k, v)| ["--opt".to_string(), format!("{k}={v}")]),
        );
        args.extend([
            "--label".into(),
            format!("{MANAGED_LABEL}=true"),
            self.name.clone(),
        ]);
        Cmd::new(self.engine.program(), args)
    }

    /// How an existing network differs from this plan. A Podman network's bridge is only
    /// compared when it could have been named (`name_bridge`).
    fn differences(&self, net: &NetInfo, name_bridge: bool) -> Vec<String> {
        let mut diffs = Vec::new();
        if net.driver != "bridge" {
            diffs.push(format!("driver {} (wanted bridge)", net.driver));
        }
        if net.subnets != [self.subnet] {
            diffs.push(format!(
                "subnet {} (wanted {})",
                net.subnets
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
                self.subnet
            ));
        }
        let address = self.address.to_string();
        if net.gateways != [address.as_str()] {
            diffs.push(format!(
                "gateway {} (wanted {address})",
                net.gateways.join(" ")
            ));
        }
        if (self.engine == Engine::Docker || name_bridge)
            && net.interface().as_deref() != Some(self.bridge.as_str())
        {
            diffs.push(format!(
                "bridge {} (wanted {})",
                net.interface().unwrap_or_else(|| "none".into()),
                self.bridge
            ));
        }
        diffs
    }
}

async fn host_up(h: &HostPlan, out: &Out) -> Result<(), Failure> {
    let engine = h.engine;
    let name_bridge = match engine {
        Engine::Docker => true,
        Engine::Podman => podman_names_bridges().await?,
    };
    if !name_bridge && h.bridge_given {
        return Err(Failure::new(
            format!(
                "this Podman's `podman network create` has no --interface-name, so it cannot \
                 name the network's bridge {}",
                h.bridge
            ),
            "leave out --bridge (Podman then names the bridge podmanN itself), or upgrade Podman",
        ));
    }
    match inspect_network(engine, &h.name).await? {
        Some(net) => {
            let diffs = h.differences(&net, name_bridge);
            if !diffs.is_empty() {
                let fix = if net.managed() {
                    format!(
                        "it was set up with other flags: remove it with `imdsd network down \
                         --network-name {}` and run up again, or choose another --network-name",
                        h.name
                    )
                } else {
                    format!(
                        "it was not created by `imdsd network up`: to use it as it is, pass \
                         the flags that match it; otherwise choose another --network-name, or \
                         remove it yourself ({} network rm {}) if nothing uses it",
                        engine.program(),
                        h.name
                    )
                };
                return Err(Failure::new(
                    format!(
                        "{} network {} exists but differs from what the host layout needs: {}",
                        engine.name(),
                        h.name,
                        diffs.join(", ")
                    ),
                    fix,
                ));
            }
            let whose = if net.managed() {
                ""
            } else {
                "; not created by `imdsd network up` (no label imdsd.managed=true), so `down` \
                 will leave it"
            };
            let bridge = net.interface().unwrap_or_else(|| h.bridge.clone());
            out.say(
                "exists",
                &format!(
                    "{} network {} (subnet {}, gateway {}, bridge {bridge}{whose})",
                    engine.program(),
                    h.name,
                    h.subnet,
                    h.address
                ),
            );
            host_address(h, &bridge, out, Duration::ZERO).await?;
        }
        None => {
            let clashes: Vec<String> = list_networks(engine)
                .await?
                .iter()
                .filter(|n| n.subnets.iter().any(|s| overlaps(s, &h.subnet)))
                .map(NetInfo::describe)
                .collect();
            if !clashes.is_empty() {
                return Err(Failure::new(
                    format!(
                        "--subnet {} overlaps {} network {}, so {} cannot create {}",
                        h.subnet,
                        engine.name(),
                        clashes.join("; "),
                        engine.name(),
                        h.name
                    ),
                    "remove that network (the compose layout: docker-compose down), or choose \
                     another --subnet and --address",
                ));
            }
            if name_bridge && interface_exists(&h.bridge).await? {
                return Err(Failure::new(
                    format!(
                        "the interface {} already exists (`ip link show dev {}`), and {} \
                         would take it over and delete it with the network",
                        h.bridge,
                        h.bridge,
                        engine.name()
                    ),
                    "choose another --bridge",
                ));
            }
            let bridge = if name_bridge {
                h.bridge.as_str()
            } else {
                "named by Podman"
            };
            out.change(&h.create(name_bridge), "added", &h.describe(bridge))
                .await?;
            if !name_bridge {
                out.say(
                    "note",
                    "this Podman's `network create` has no --interface-name, so Podman named the \
                     bridge itself (podmanN); `podman network inspect` shows it",
                );
            }
            if !out.dry_run {
                host_address(h, &h.bridge, out, ADDRESS_WAIT).await?;
            }
        }
    }
    let run = match engine {
        Engine::Docker => "docker run",
        Engine::Podman => "podman run",
    };
    let engine_flag = match engine {
        Engine::Docker => String::new(),
        Engine::Podman => " and --docker-host unix:///run/podman/podman.sock".into(),
    };
    out.say(
        "next",
        &format!(
            "run imdsd on the host with --listen {}:{METADATA_PORT}{engine_flag}; containers \
             started with `{run} --network {} -e IAM_ROLE=<role> …` reach it at http://{}",
            h.address, h.name, h.address
        ),
    );
    Ok(())
}

/// Checks that the gateway address is on the bridge (where imdsd binds it), waiting up to `wait`
/// for Docker to put it there. Podman puts it there only while a container is attached, and
/// imdsd binds it ahead (IP_FREEBIND): with Podman this says so instead.
async fn host_address(
    h: &HostPlan,
    bridge: &str,
    out: &Out,
    wait: Duration,
) -> Result<(), Failure> {
    if h.engine == Engine::Podman {
        out.say(
            "note",
            &format!(
                "Podman puts {} on the network's bridge only while a container is attached; \
                 imdsd listens there ahead of it",
                h.address
            ),
        );
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let found = interface_addresses(Some(bridge))
            .await?
            .unwrap_or_default()
            .into_iter()
            .find(|(_, a)| a.addr() == h.address);
        if let Some((ifname, addr)) = found {
            out.say(
                "exists",
                &format!("address {addr} on {ifname} (the host's address on the network)"),
            );
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Failure::new(
                format!(
                    "Docker network {} exists, but {} is not on its bridge {bridge} (`ip -o -4 addr \
                     show dev {bridge}`), so imdsd cannot listen there",
                    h.name, h.address
                ),
                format!(
                    "this Docker puts the gateway on the bridge only later: start a container \
                     on the network (docker run --rm --network {} <image> true), or add it by \
                     hand: ip addr add {}/{} dev {bridge}",
                    h.name,
                    h.address,
                    h.subnet.prefix_len(),
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn host_down(h: &HostPlan, out: &Out) -> Result<(), Failure> {
    let engine = h.engine;
    let Some(net) = inspect_network(engine, &h.name).await? else {
        out.say(
            "absent",
            &format!("{} network {}", engine.program(), h.name),
        );
        return Ok(());
    };
    if !net.managed() {
        return Err(Failure::new(
            format!(
                "{} network {} was not created by `imdsd network up` (it has no label \
                 {MANAGED_LABEL}=true), so down leaves it",
                engine.name(),
                h.name
            ),
            format!(
                "if it should go, remove it yourself: {} network rm {}",
                engine.program(),
                h.name
            ),
        ));
    }
    if !net.containers.is_empty() {
        let detach = match engine {
            Engine::Docker => format!("docker network disconnect {} <container>", h.name),
            Engine::Podman => format!("podman network disconnect {} <container>", h.name),
        };
        return Err(Failure::new(
            format!(
                "containers are still attached to {} network {}: {}",
                engine.name(),
                h.name,
                net.containers.join(", ")
            ),
            format!("stop them, or detach each with `{detach}`, then run down again"),
        ));
    }
    let rm = Cmd::new(engine.program(), ["network", "rm", h.name.as_str()]);
    out.change(
        &rm,
        "removed",
        &format!("{} network {}", engine.program(), h.name),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// swarm: docker_gwbridge, made before the node joins, with the metadata address as its gateway

async fn swarm_up(h: &HostPlan, out: &Out) -> Result<(), Failure> {
    if let Some(net) = inspect_network(Engine::Docker, &h.name).await? {
        let diffs = h.differences(&net, true);
        if !diffs.is_empty() {
            let gateway = net
                .gateways
                .first()
                .cloned()
                .unwrap_or_else(|| "none".into());
            return Err(Failure::new(
                format!(
                    "{} exists but differs from what the swarm layout needs: {} (Swarm creates \
                     it when the node joins a swarm, and keeps it)",
                    h.name,
                    diffs.join(", ")
                ),
                format!(
                    "with no task running on this node: docker swarm leave; docker network rm \
                     {name}; imdsd network up --layout swarm; then join the swarm again. Or \
                     keep it: run imdsd with --listen {gateway}:{METADATA_PORT} and give tasks \
                     AWS_EC2_METADATA_SERVICE_ENDPOINT=http://{gateway}/",
                    name = h.name
                ),
            ));
        }
        let whose = if net.managed() {
            ""
        } else {
            "; not created by `imdsd network up`, so down will leave it"
        };
        out.say(
            "exists",
            &format!(
                "docker network {} (subnet {}, gateway {}{whose})",
                h.name, h.subnet, h.address
            ),
        );
        host_address(h, &h.bridge, out, Duration::ZERO).await?;
    } else {
        let clashes: Vec<String> = list_networks(Engine::Docker)
            .await?
            .iter()
            .filter(|n| n.subnets.iter().any(|s| overlaps(s, &h.subnet)))
            .map(NetInfo::describe)
            .collect();
        if !clashes.is_empty() {
            return Err(Failure::new(
                format!(
                    "--subnet {} overlaps Docker network {}, so Docker cannot create {}",
                    h.subnet,
                    clashes.join("; "),
                    h.name
                ),
                "remove that network (the host layout's: imdsd network down), or choose another \
                 --subnet and --address",
            ));
        }
        out.change(&h.create(true), "added", &h.describe(&h.bridge))
            .await?;
        if !out.dry_run {
            host_address(h, &h.bridge, out, ADDRESS_WAIT).await?;
        }
    }
    out.say(
        "next",
        &format!(
            "join the swarm now if this node has not (docker swarm init, or docker swarm join): \
             Swarm uses this {name}. Then deploy deploy/swarm/imdsd-stack.yml (imdsd on every \
             node, --listen {address}:{METADATA_PORT}); service tasks reach it at http://{address}",
            name = h.name,
            address = h.address
        ),
    );
    Ok(())
}

async fn swarm_down(h: &HostPlan, out: &Out) -> Result<(), Failure> {
    // Docker lets the bridge go while the node is in a swarm (Swarm's own endpoint on it is not
    // always listed), and the node's tasks then lose their way out: ask Docker about the swarm.
    let state = Cmd::new("docker", ["info", "--format", "{{.Swarm.LocalNodeState}}"])
        .run_ok()
        .await?;
    let state = state.trim();
    if !matches!(state, "inactive" | "") {
        return Err(Failure::new(
            format!(
                "this node is in a swarm (state {state}), which uses {}",
                h.name
            ),
            format!(
                "leave the swarm on this node first (docker swarm leave), then run down again; \
                 Docker keeps {} after the node leaves",
                h.name
            ),
        ));
    }
    host_down(h, out).await
}

// ---------------------------------------------------------------------------------------------
// compose: docker-compose creates the network; check that nothing is in its way

async fn compose_up(c: &ComposePlan, out: &Out) -> Result<(), Failure> {
    let networks = list_networks(c.engine).await?;
    let is_compose_net =
        |n: &NetInfo| n.labels.get(COMPOSE_NETWORK_LABEL).map(String::as_str) == Some(&c.key);
    let overlapping: Vec<&NetInfo> = networks
        .iter()
        .filter(|n| n.subnets.iter().any(|s| overlaps(s, &c.subnet)))
        .collect();
    let clashes: Vec<String> = overlapping
        .iter()
        .filter(|n| !is_compose_net(n))
        .map(|n| n.describe())
        .collect();
    if !clashes.is_empty() {
        return Err(Failure::new(
            format!(
                "{} overlaps {} network {}, so docker-compose cannot create its {} network",
                c.subnet,
                c.engine.name(),
                clashes.join("; "),
                c.key
            ),
            "remove it (the host layout's network: imdsd network down), or give compose and this \
             command another subnet (docker-compose.yml's ipam subnet and --subnet)",
        ));
    }
    // An address in the subnet on a host interface other than a compose bridge (the host-mode
    // recipe's `ip addr add 169.254.169.254/32 dev docker0`, say) makes the host answer ARP for
    // imdsd's address and route it locally.
    let compose_bridges: Vec<String> = overlapping.iter().filter_map(|n| n.interface()).collect();
    let stray: Vec<String> = interface_addresses(None)
        .await?
        .unwrap_or_default()
        .into_iter()
        .filter(|(ifname, a)| c.subnet.contains(&a.addr()) && !compose_bridges.contains(ifname))
        .map(|(ifname, a)| format!("{a} on {ifname}"))
        .collect();
    if !stray.is_empty() {
        return Err(Failure::new(
            format!(
                "the host has addresses in {}: {}; the host, not imdsd's container, would answer \
                 for {}",
                c.subnet,
                stray.join(", "),
                c.address
            ),
            "remove them (ip addr del ADDRESS/PREFIX dev INTERFACE), or run `imdsd network down` \
             if the host layout put them there",
        ));
    }
    let ours: Vec<&&NetInfo> = overlapping.iter().filter(|n| is_compose_net(n)).collect();
    if ours.is_empty() {
        out.say(
            "absent",
            &format!(
                "{} network <project>_{} on {} (docker-compose up creates it)",
                c.engine.program(),
                c.key,
                c.subnet
            ),
        );
    } else {
        for n in ours {
            out.say(
                "exists",
                &format!("{} network {}", c.engine.program(), n.describe()),
            );
        }
    }
    out.say(
        "next",
        &format!(
            "docker-compose up -d; imdsd runs at {} and containers on the {} network reach it",
            c.address, c.key
        ),
    );
    Ok(())
}

async fn compose_down(c: &ComposePlan, out: &Out) -> Result<(), Failure> {
    out.say(
        "absent",
        &format!(
            "nothing imdsd set up: the compose layout's network <project>_{} belongs to \
             docker-compose (`docker-compose down` removes it)",
            c.key
        ),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// ec2: iptables sends the containers' metadata requests to imdsd

/// One iptables rule, in the words `iptables -C/-I/-D TABLE CHAIN …` take.
struct Rule {
    table: &'static str,
    chain: &'static str,
    spec: Vec<String>,
}

impl Rule {
    fn cmd(&self, op: &[&str]) -> Cmd {
        let mut args: Vec<String> = vec!["-w".into(), "-t".into(), self.table.into()];
        args.extend(op.iter().map(|s| s.to_string()));
        args.extend(self.spec.iter().cloned());
        Cmd::new("iptables", args)
    }

    fn describe(&self) -> String {
        format!(
            "iptables -t {} {} {}",
            self.table,
            self.chain,
            self.spec.join(" ")
        )
    }

    /// `iptables -C`: exit 0 present, 1 with "Bad rule" absent; anything else is an error (no
    /// permission, a missing kernel module), never taken for "absent".
    async fn present(&self) -> Result<bool, Failure> {
        let cmd = self.cmd(&["-C", self.chain]);
        let out = cmd.output().await?;
        if out.status.success() {
            return Ok(true);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.code() == Some(1)
            && (stderr.contains("does a matching rule exist") || stderr.contains("Bad rule"))
        {
            Ok(false)
        } else {
            Err(cmd.failed(&out))
        }
    }
}

impl Ec2Plan {
    /// In the order `up` adds them: the port is closed to strangers before traffic is sent to it.
    fn rules(&self) -> [Rule; 2] {
        let words = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        let port = self.port.to_string();
        let mut guard = vec!["!".into(), "-i".into(), self.interface.clone()];
        guard.extend(words("-p tcp -m tcp --dport"));
        guard.push(port.clone());
        // From the host itself (loopback, or its own address on any interface) stays allowed:
        // Linux drops packets that arrive from outside with a local source address.
        guard.extend(words("-m addrtype ! --src-type LOCAL"));
        guard.extend(words("-m comment --comment"));
        guard.push(RULE_COMMENT.into());
        guard.extend(words("-j DROP"));

        let mut redirect = vec!["-i".into(), self.interface.clone(), "-d".into()];
        redirect.push(format!("{}/32", self.address));
        redirect.extend(words("-p tcp -m tcp --dport"));
        redirect.push(METADATA_PORT.to_string());
        redirect.extend(words("-m comment --comment"));
        redirect.push(RULE_COMMENT.into());
        redirect.extend(words("-j REDIRECT --to-ports"));
        redirect.push(port);
        [
            Rule {
                table: "filter",
                chain: "INPUT",
                spec: guard,
            },
            Rule {
                table: "nat",
                chain: "PREROUTING",
                spec: redirect,
            },
        ]
    }
}

async fn ec2_up(e: &Ec2Plan, out: &Out) -> Result<(), Failure> {
    // REDIRECT delivers to the primary address of the interface the packet came in on, so that
    // is where imdsd must listen.
    let Some(addresses) = interface_addresses(Some(&e.interface)).await? else {
        return Err(Failure::new(
            format!("the interface {} does not exist", e.interface),
            if e.interface == DEFAULT_BRIDGE_INTERFACE {
                "is Docker running? (docker0 exists while dockerd runs) Or name the containers' \
                 bridge with --bridge-interface"
            } else {
                "name the containers' bridge with --bridge-interface (`ip link` lists them)"
            },
        ));
    };
    let Some((_, bridge_ip)) = addresses.first() else {
        return Err(Failure::new(
            format!(
                "the interface {} has no IPv4 address (`ip -o -4 addr show dev {}`)",
                e.interface, e.interface
            ),
            "give the bridge an address, or name the containers' bridge with --bridge-interface",
        ));
    };
    let listen = format!("{}:{}", bridge_ip.addr(), e.port);
    out.say(
        "exists",
        &format!("interface {} ({bridge_ip})", e.interface),
    );
    for rule in e.rules() {
        if rule.present().await? {
            out.say("exists", &rule.describe());
        } else {
            out.change(
                &rule.cmd(&["-I", rule.chain, "1"]),
                "added",
                &rule.describe(),
            )
            .await?;
        }
    }
    out.say(
        "next",
        &format!(
            "run imdsd on the host with --listen {listen} (and --mode proxy, so that \
             containers also see the real instance's metadata); containers on {} reach it at \
             http://{}",
            e.interface, e.address
        ),
    );
    Ok(())
}

async fn ec2_down(e: &Ec2Plan, out: &Out) -> Result<(), Failure> {
    let rules = e.rules();
    // Traffic stops being sent to the port before the port is opened again.
    for rule in rules.iter().rev() {
        if !rule.present().await? {
            out.say("absent", &rule.describe());
            continue;
        }
        // `-D` removes one copy; a rule added twice by hand goes too. Bounded, in case a
        // rule somehow keeps matching.
        for _ in 0..16 {
            out.change(&rule.cmd(&["-D", rule.chain]), "removed", &rule.describe())
                .await?;
            if out.dry_run || !rule.present().await? {
                break;
            }
        }
    }
    if !out.dry_run {
        note_other_tagged_rules(&rules, out).await?;
    }
    Ok(())
}

/// Rules tagged `imdsd` that this command's flags do not describe (set up with another
/// --port or --bridge-interface, say) are left alone, but mentioned.
async fn note_other_tagged_rules(rules: &[Rule], out: &Out) -> Result<(), Failure> {
    for rule in rules {
        let listing = Cmd::new("iptables", ["-w", "-t", rule.table, "-S", rule.chain])
            .run_ok()
            .await?;
        for line in listing.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words
                .windows(2)
                .any(|w| w[0] == "--comment" && w[1].trim_matches('"') == RULE_COMMENT)
            {
                out.say(
                    "note",
                    &format!(
                        "left alone, another rule tagged {RULE_COMMENT} (other flags?): \
                         iptables -t {} {line}",
                        rule.table
                    ),
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: NetworkArgs,
    }

    fn parse(args: &[&str]) -> Result<Plan, Vec<String>> {
        let cli = Cli::try_parse_from(std::iter::once("network").chain(args.iter().copied()))
            .map_err(|e| vec![e.to_string()])?;
        resolve(
            &cli.args.options,
            cli.args.options.engine.unwrap_or(Engine::Docker),
        )
    }

    #[test]
    fn defaults_per_layout() {
        match parse(&["up"]).expect("valid") {
            Plan::Host(h) => {
                assert_eq!(h.name, "ec2_metadata");
                assert_eq!(h.subnet.to_string(), "169.254.169.0/24");
                assert_eq!(h.address, METADATA_ADDRESS);
                assert_eq!(h.bridge, "imdsd0");
            }
            other => panic!("{other:?}"),
        }
        match parse(&["--layout", "ec2", "down"]).expect("valid") {
            Plan::Ec2(e) => {
                assert_eq!((e.interface.as_str(), e.port), ("docker0", 8169));
            }
            other => panic!("{other:?}"),
        }
        match parse(&["up", "--layout", "swarm"]).expect("valid") {
            Plan::Swarm(h) => {
                assert_eq!(
                    (h.name.as_str(), h.bridge.as_str()),
                    (GATEWAY_BRIDGE, GATEWAY_BRIDGE)
                );
                assert_eq!(h.address, METADATA_ADDRESS);
                // Swarm's own settings for the bridge, with the metadata address as gateway.
                assert_eq!(
                    h.create(true).shell(),
                    "docker network create --driver bridge --subnet 169.254.169.0/24 --gateway \
                     169.254.169.254 --opt com.docker.network.bridge.name=docker_gwbridge --opt \
                     com.docker.network.bridge.enable_icc=false --opt \
                     com.docker.network.bridge.enable_ip_masquerade=true --label \
                     imdsd.managed=true docker_gwbridge"
                );
            }
            other => panic!("{other:?}"),
        }
        // The bridge is Docker's: its name is not a setting of the swarm layout.
        let text = parse(&["up", "--layout", "swarm", "--bridge", "br0"])
            .expect_err("invalid")
            .join("\n");
        assert!(
            text.contains("--bridge does not apply to the swarm layout"),
            "{text}"
        );
        // Options go before or after the action.
        assert!(matches!(
            parse(&["up", "--layout", "compose"]),
            Ok(Plan::Compose(_))
        ));
    }

    #[test]
    fn bad_arguments_are_all_reported() {
        let problems = parse(&[
            "up",
            "--subnet",
            "169.254.5.0/24",
            "--address",
            "169.254.6.1",
            "--bridge",
            "much-too-long-bridge",
            "--port",
            "9000",
        ])
        .expect_err("invalid");
        let text = problems.join("\n");
        assert!(
            text.contains("--port does not apply to the host layout"),
            "{text}"
        );
        assert!(text.contains("not inside --subnet"), "{text}");
        assert!(text.contains("--bridge \"much-too-long-bridge\""), "{text}");
        let text = parse(&[
            "up",
            "--subnet",
            "169.254.5.7/24",
            "--address",
            "169.254.5.7",
        ])
        .expect_err("host bits")
        .join("\n");
        assert!(text.contains("did you mean 169.254.5.0/24"), "{text}");
        let text = parse(&["up", "--address", "169.254.169.255"])
            .expect_err("broadcast")
            .join("\n");
        assert!(text.contains("broadcast"), "{text}");
    }

    #[test]
    fn commands_are_shell_quoted() {
        let rules = Ec2Plan {
            interface: "docker0".into(),
            address: METADATA_ADDRESS,
            port: 8169,
        }
        .rules();
        assert_eq!(
            rules[0].cmd(&["-I", "INPUT", "1"]).shell(),
            "iptables -w -t filter -I INPUT 1 '!' -i docker0 -p tcp -m tcp --dport 8169 -m \
             addrtype '!' --src-type LOCAL -m comment --comment imdsd -j DROP"
        );
        assert_eq!(
            rules[1].cmd(&["-I", "PREROUTING", "1"]).shell(),
            "iptables -w -t nat -I PREROUTING 1 -i docker0 -d 169.254.169.254/32 -p tcp -m tcp \
             --dport 80 -m comment --comment imdsd -j REDIRECT --to-ports 8169"
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("{{json .}}"), "'{{json .}}'");
    }

    #[test]
    fn the_engine_is_podman_when_the_environment_says_so() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| (*v).to_string())
            }
        };
        let both = |_: &str| true;
        assert_eq!(Engine::detect(&env(&[]), &both), Engine::Docker);
        assert_eq!(
            Engine::detect(
                &env(&[("CONTAINER_HOST", "unix:///run/podman/podman.sock")]),
                &both
            ),
            Engine::Podman
        );
        assert_eq!(
            Engine::detect(
                &env(&[("DOCKER_HOST", "unix:///run/podman/podman.sock")]),
                &both
            ),
            Engine::Podman
        );
        assert_eq!(
            Engine::detect(&env(&[("DOCKER_HOST", "tcp://10.0.0.1:2375")]), &both),
            Engine::Docker
        );
        assert_eq!(
            Engine::detect(&env(&[]), &|p: &str| p == "podman"),
            Engine::Podman,
            "only Podman installed"
        );
    }

    #[test]
    fn podman_networks_are_created_with_podmans_own_flags() {
        let Plan::Host(h) = parse(&["up", "--engine", "podman"]).expect("valid") else {
            panic!("host layout");
        };
        assert_eq!(
            h.create(true).shell(),
            "podman network create --driver bridge --subnet 169.254.169.0/24 --gateway \
             169.254.169.254 --interface-name imdsd0 --label imdsd.managed=true ec2_metadata"
        );
        // A Podman whose CLI cannot name the bridge names it itself.
        assert_eq!(
            h.create(false).shell(),
            "podman network create --driver bridge --subnet 169.254.169.0/24 --gateway \
             169.254.169.254 --label imdsd.managed=true ec2_metadata"
        );
        let Plan::Ec2(e) = parse(&["up", "--engine", "podman", "--layout", "ec2"]).expect("valid")
        else {
            panic!("ec2 layout");
        };
        assert_eq!(e.interface, "podman0");
    }

    #[test]
    fn podmans_network_records_are_understood() {
        // `podman network inspect` (Podman 4.3): an array of Podman's own records.
        let text = r#"[
             {"name": "ec2_metadata", "id": "8c83ab52ca7f", "driver": "bridge",
              "network_interface": "podman1",
              "subnets": [{"subnet": "169.254.169.0/24", "gateway": "169.254.169.254"}],
              "labels": {"imdsd.managed": "true"}},
             {"name": "podman", "id": "2f259bab93aa", "driver": "bridge",
              "network_interface": "podman0",
              "subnets": [{"subnet": "10.88.0.0/16", "gateway": "10.88.0.1"}]}
        ]"#;
        let nets = parse_inspected(Engine::Podman, text);
        assert_eq!(nets.len(), 2);
        assert!(nets[0].managed() && !nets[1].managed());
        assert_eq!(nets[0].interface().as_deref(), Some("podman1"));
        assert_eq!(nets[0].gateways, ["169.254.169.254"]);
        assert_eq!(
            nets[0].subnets,
            ["169.254.169.0/24".parse::<Ipv4Net>().expect("net")]
        );
        let Plan::Host(h) = parse(&["up", "--engine", "podman"]).expect("valid") else {
            panic!("host layout");
        };
        // The bridge counts only where Podman could have been told its name.
        assert!(h.differences(&nets[0], false).is_empty());
        assert_eq!(
            h.differences(&nets[0], true),
            ["bridge podman1 (wanted imdsd0)"]
        );
        // Docker's one record a line is still read as Docker's.
        let docker = r#"{"Name":"n","Id":"d98392fa348a64a281d8196f","Driver":"bridge","IPAM":{"Config":[]}}"#;
        assert_eq!(parse_inspected(Engine::Docker, docker)[0].name, "n");
    }

    #[test]
    fn network_inspect_output_is_understood() {
        let v: Value = serde_json::from_str(
            r#"{"Name":"n","Id":"d98392fa348a64a281d8196f","Driver":"bridge",
                "IPAM":{"Config":[{"Subnet":"169.254.231.0/24","Gateway":"169.254.231.254"},
                                  {"Subnet":"fd00::/64"}]},
                "Containers":{"abc":{"Name":"web"}},
                "Options":{},"Labels":{"imdsd.managed":"true"}}"#,
        )
        .expect("json");
        let n = NetInfo::parse(&v).expect("parsed");
        assert!(n.managed());
        assert_eq!(n.subnets.len(), 1);
        assert_eq!(n.containers, ["web"]);
        assert_eq!(n.interface().as_deref(), Some("br-d98392fa348a"));
        let s = |s: &str| s.parse::<Ipv4Net>().expect("net");
        assert!(overlaps(&s("169.254.0.0/16"), &s("169.254.169.0/24")));
        assert!(!overlaps(&s("169.254.168.0/24"), &s("169.254.169.0/24")));
    }
}
