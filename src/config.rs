//! Configuration: command-line flags (each with an environment variable), an optional TOML file
//! (`--config`), and defaults, resolved into one validated [`Config`] before any socket is bound.
//!
//! Precedence is flag > environment > file > default. Every problem is collected and reported
//! together, each naming where the value came from (`--http-tokens`, `IMDSD_HTTP_TOKENS`, or the
//! file and key) and what to write instead; `main` exits with 64 (EX_USAGE).
//!
//! Values arrive as strings and are validated here rather than by clap, so that a bad flag and a
//! bad file key are reported in the same run.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory as _, FromArgMatches as _, Parser};
use serde::Deserialize;

use crate::credentials::broker::BrokerConfig;
use crate::credentials::fake::DEFAULT_LIFETIME;
use crate::credentials::limiter::LimiterOptions;
use crate::docker::{DockerOptions, NetworkScope};
use crate::host::AllowedHosts;
use crate::identity::container::{ContainerRules, DEFAULT_UNKNOWN_CALLER_WAIT, SessionKey};
use crate::identity::mapping::RoleMapping;
use crate::identity::role::{AccountContext, RoleSpec, parse_account_map};
use crate::identity::{IdentityConfig, check_session_name_template};
use crate::imds::response::Connection;
use crate::imds::{HttpTokens, ImdsOptions};
use crate::instance::{Instance, InstanceDefaults, InstanceSection, is_region};
use crate::server::ServerOptions;

/// Where EC2's metadata service listens.
pub const DEFAULT_LISTEN: &str = "169.254.169.254:80";

const AFTER_HELP: &str = "\
Every option can also be set in the TOML file given with --config (same name, with underscores), \
and through the environment variable shown. Precedence: flag, then environment, then file, then \
default.

Examples:
  imdsd --fake-credentials --listen 127.0.0.1:8169 demo-role
  imdsd --config /etc/imdsd/imdsd.toml arn:aws:iam::123456789012:role/app";

/// Gives each container its own AWS IAM role through an EC2 instance metadata service
/// (IMDSv1 and IMDSv2).
#[derive(Debug, Parser)]
#[command(
    name = "imdsd",
    version,
    after_long_help = AFTER_HELP,
    max_term_width = 100,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Role for callers that have no role of their own: an ARN, name, path/name, name@account-id
    /// or name@alias. Same as --default-role.
    #[arg(value_name = "DEFAULT_ROLE")]
    pub default_role_positional: Option<String>,

    /// Role for callers that have no role of their own (DEFAULT_ROLE is read too).
    #[arg(long, env = "DEFAULT_IAM_ROLE", value_name = "ROLE")]
    pub default_role: Option<String>,

    /// TOML configuration file.
    #[arg(long, env = "IMDSD_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Address to serve metadata on; repeat for several (an IPv6 one is written [fd00:ec2::254]:80).
    /// [default: 169.254.169.254:80]
    #[arg(
        help_heading = "Metadata service",
        long,
        env = "IMDSD_LISTEN",
        value_name = "ADDR",
        value_delimiter = ','
    )]
    pub listen: Vec<String>,

    /// A name callers may use for imdsd in the Host header (e.g. a compose service name), on
    /// every listener; repeat for several. IP addresses, localhost, instance-data and
    /// instance-data.ec2.internal are always accepted; other names get 403 (DNS rebinding).
    #[arg(
        help_heading = "Metadata service",
        long,
        env = "IMDSD_ALLOWED_HOSTS",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub allowed_host: Vec<String>,

    /// IMDSv2 policy: "optional" serves requests without a token too, "required" answers them 401.
    /// [default: optional]
    #[arg(
        help_heading = "Metadata service",
        long,
        env = "IMDSD_HTTP_TOKENS",
        value_name = "optional|required"
    )]
    pub http_tokens: Option<String>,

    /// "disabled" answers every request 403, like an instance with its metadata endpoint off.
    /// [default: enabled]
    #[arg(
        help_heading = "Metadata service",
        long,
        env = "IMDSD_HTTP_ENDPOINT",
        value_name = "enabled|disabled"
    )]
    pub http_endpoint: Option<String>,

    /// Serve locally minted credentials that look real but work nowhere; makes no AWS calls.
    #[arg(help_heading = "Credentials and roles", long, env = "IMDSD_FAKE_CREDENTIALS", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true")]
    pub fake_credentials: Option<String>,

    /// Lifetime of fake credentials, like "6h" or "90m". [default: 6h]
    #[arg(
        help_heading = "Credentials and roles",
        long,
        env = "IMDSD_FAKE_CREDENTIALS_LIFETIME",
        value_name = "DURATION"
    )]
    pub fake_credentials_lifetime: Option<String>,

    /// JSON file mapping caller IPs or CIDRs to roles (lyft/metadataproxy's format is accepted).
    #[arg(
        help_heading = "Credentials and roles",
        long,
        env = "ROLE_MAPPING_FILE",
        value_name = "PATH"
    )]
    pub role_mapping_file: Option<PathBuf>,

    /// Account for role names given without one (e.g. "app").
    #[arg(
        help_heading = "Credentials and roles",
        long,
        env = "DEFAULT_ACCOUNT_ID",
        value_name = "ID"
    )]
    pub default_account_id: Option<String>,

    /// JSON object of account alias to account id, for roles written name@alias.
    #[arg(
        help_heading = "Credentials and roles",
        long,
        env = "AWS_ACCOUNT_MAP",
        value_name = "JSON"
    )]
    pub account_map: Option<String>,

    /// RoleSessionName template for callers that are not containers; {ip} is the caller's address.
    /// [default: imdsd-{ip}]
    #[arg(
        help_heading = "Credentials and roles",
        long,
        env = "IMDSD_SESSION_NAME",
        value_name = "TEMPLATE"
    )]
    pub session_name: Option<String>,

    /// Credentials handed out keep at least this many minutes of validity (15 or more);
    /// they are refreshed in the background before that. [default: 30]
    #[arg(
        help_heading = "Credentials and roles",
        long,
        env = "ROLE_EXPIRATION_THRESHOLD",
        value_name = "MINUTES"
    )]
    pub refresh_threshold: Option<String>,

    /// The instance's region (and the region for STS). AWS_DEFAULT_REGION is read too.
    /// [default: us-east-1]
    #[arg(
        help_heading = "Credentials and roles",
        long,
        env = "AWS_REGION",
        value_name = "REGION"
    )]
    pub region: Option<String>,

    /// Shared-config profile of the daemon's own AWS identity (SSO, credential_process and
    /// source_profile chains work).
    #[arg(
        help_heading = "Credentials and roles",
        long,
        env = "AWS_PROFILE",
        value_name = "NAME"
    )]
    pub profile: Option<String>,

    /// STS endpoint URL, e.g. a LocalStack or moto server. AWS_ENDPOINT_URL is honoured too.
    /// [default: the regional endpoint]
    #[arg(
        help_heading = "Credentials and roles",
        long,
        env = "AWS_ENDPOINT_URL_STS",
        value_name = "URL"
    )]
    pub sts_endpoint: Option<String>,

    /// AssumeRole calls per second at most, once the burst is spent (STS throttles per account,
    /// for every caller in it). Callers waiting for a role go before background refreshes.
    /// [default: 50]
    #[arg(
        help_heading = "Credentials and roles",
        long,
        env = "IMDSD_STS_MAX_RATE",
        value_name = "CALLS"
    )]
    pub sts_max_rate: Option<String>,

    /// AssumeRole calls that may go at once after a quiet spell (a host's worth of cold requests).
    /// [default: 100]
    #[arg(
        help_heading = "Credentials and roles",
        long,
        env = "IMDSD_STS_BURST",
        value_name = "CALLS"
    )]
    pub sts_burst: Option<String>,

    /// AssumeRole calls in flight at once; more wait their turn. [default: 32]
    #[arg(
        help_heading = "Credentials and roles",
        long,
        env = "IMDSD_STS_MAX_CONCURRENCY",
        value_name = "CALLS"
    )]
    pub sts_max_concurrency: Option<String>,

    /// DurationSeconds of the sessions imdsd creates (900 to 43200; role chains are capped at 3600).
    /// [default: 3600]
    #[arg(
        help_heading = "Credentials and roles",
        long,
        env = "IMDSD_ROLE_DURATION",
        value_name = "SECONDS"
    )]
    pub role_duration: Option<String>,

    /// Let the daemon's own identity come from the instance metadata service (an EC2 instance
    /// profile). Off by default: the daemon usually is the metadata service on its host.
    #[arg(help_heading = "Credentials and roles", long, env = "IMDSD_SOURCE_IMDS", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true")]
    pub source_imds: Option<String>,

    /// Directory for state that must survive restarts (the IMDSv2 token key).
    /// [default: $STATE_DIRECTORY, /var/lib/imdsd, or ~/.local/state/imdsd]
    #[arg(
        help_heading = "Operation",
        long,
        env = "IMDSD_STATE_DIR",
        value_name = "PATH"
    )]
    pub state_dir: Option<PathBuf>,

    /// Log format. [default: text]
    #[arg(
        help_heading = "Operation",
        long,
        env = "IMDSD_LOG_FORMAT",
        value_name = "text|json"
    )]
    pub log_format: Option<String>,

    /// Log filter, e.g. "info", "debug", or "info,imdsd::access=warn". [default: info]
    #[arg(
        help_heading = "Operation",
        long,
        env = "IMDSD_LOG",
        value_name = "FILTER"
    )]
    pub log_level: Option<String>,

    /// Identical access lines (same method, path, status, user agent) written per caller and
    /// second, and ten times as many from all callers together; the rest are counted and
    /// reported on the caller's next line. 0 writes every request. [default: 10]
    #[arg(
        help_heading = "Operation",
        long,
        env = "IMDSD_ACCESS_LOG_BURST",
        value_name = "LINES"
    )]
    pub access_log_burst: Option<String>,

    /// Keep connections open between requests (EC2 closes them; useful under heavy load).
    #[arg(help_heading = "Operation", long, env = "IMDSD_KEEP_ALIVE", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true")]
    pub keep_alive: Option<String>,

    /// Open connections from all callers together, on every listener; when reached, the
    /// longest-idle connection is closed to make room (lowered to fit the open-file limit).
    /// [default: 8192]
    #[arg(
        help_heading = "Operation",
        long,
        env = "IMDSD_MAX_CONNECTIONS",
        value_name = "N"
    )]
    pub max_connections: Option<String>,

    /// Open connections from one caller address; when reached, that caller's longest-idle
    /// connection is closed to make room. [default: 512]
    #[arg(
        help_heading = "Operation",
        long,
        env = "IMDSD_MAX_CONNECTIONS_PER_CALLER",
        value_name = "N"
    )]
    pub max_connections_per_caller: Option<String>,

    /// Answer a token request carrying "Expect: 100-continue" with 417, as EC2 does.
    #[arg(help_heading = "Operation", long, env = "IMDSD_STRICT_EXPECT", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true")]
    pub strict_expect: Option<String>,

    /// "reject" refuses IMDSv2 requests carrying X-Forwarded-For with 403, as EC2 does.
    /// [default: reject]
    #[arg(
        help_heading = "Operation",
        long,
        env = "IMDSD_FORWARDED_FOR",
        value_name = "reject|allow"
    )]
    pub forwarded_for: Option<String>,

    /// Docker Engine (or rootful Podman) to follow: unix:///path, tcp://host:port, or "none" for
    /// no containers (DOCKER_URL and Podman's CONTAINER_HOST are read too). [default:
    /// unix:///var/run/docker.sock, else unix:///run/podman/podman.sock, when it exists]
    #[arg(help_heading = "Docker", long, env = "DOCKER_HOST", value_name = "URL")]
    pub docker_host: Option<String>,

    /// Serve only containers calling from these Docker networks (comma-separated names; '*' for
    /// every network). [default: the networks that carry a --listen or --ecs-listen address]
    #[arg(
        help_heading = "Docker",
        long,
        env = "IMDSD_NETWORKS",
        value_name = "NAMES",
        value_delimiter = ','
    )]
    pub networks: Vec<String>,

    /// Environment variable in which a container names its role. [default: IAM_ROLE]
    #[arg(
        help_heading = "Docker",
        long,
        env = "IMDSD_ROLE_ENV",
        value_name = "NAME"
    )]
    pub role_env: Option<String>,

    /// Prefix of the container labels imdsd reads (<prefix>.role, <prefix>.role-alias,
    /// <prefix>.external-id, <prefix>.policy). [default: imdsd]
    #[arg(
        help_heading = "Docker",
        long,
        env = "IMDSD_LABEL_PREFIX",
        value_name = "PREFIX"
    )]
    pub label_prefix: Option<String>,

    /// Roles containers may ask for (comma-separated globs; "arn:…" patterns match the ARN,
    /// others the role name). Role aliases are always allowed. [default: any role]
    #[arg(
        help_heading = "Docker",
        long,
        env = "IMDSD_ALLOWED_ROLES",
        value_name = "GLOBS",
        value_delimiter = ','
    )]
    pub allowed_roles: Vec<String>,

    /// Containers may only choose roles by alias (the [role_aliases] table in the config file).
    #[arg(help_heading = "Docker", long, env = "IMDSD_ALIASES_ONLY", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true")]
    pub aliases_only: Option<String>,

    /// Where a container's session name comes from: Env:KEY or Labels:KEY.
    /// [default: the session name template]
    #[arg(
        help_heading = "Docker",
        long,
        env = "ROLE_SESSION_KEY",
        value_name = "Env:KEY|Labels:KEY"
    )]
    pub role_session_key: Option<String>,

    /// How long a request from a container imdsd has not seen start yet waits for it (0 to 250ms).
    /// [default: 250ms]
    #[arg(
        help_heading = "Docker",
        long,
        env = "IMDSD_UNKNOWN_CALLER_WAIT",
        value_name = "DURATION"
    )]
    pub unknown_caller_wait: Option<String>,

    /// Address of the admin API (/healthz, /readyz, /metrics, /v1/workloads), or "none". Never
    /// the metadata address. [default: 127.0.0.1:9169]
    #[arg(
        help_heading = "Operation",
        long,
        env = "IMDSD_ADMIN_LISTEN",
        value_name = "ADDR"
    )]
    pub admin_listen: Option<String>,

    /// "emulate" serves a whole emulated instance; "proxy" forwards every path imdsd does not own
    /// to --upstream (on EC2). MOCK_API=true/false is read too. [default: emulate]
    #[arg(
        help_heading = "Metadata service",
        long,
        env = "IMDSD_MODE",
        value_name = "emulate|proxy"
    )]
    pub mode: Option<String>,

    /// Proxy mode: the real metadata service. [default: http://169.254.169.254]
    #[arg(
        help_heading = "Metadata service",
        long,
        env = "METADATA_URL",
        value_name = "URL"
    )]
    pub upstream: Option<String>,

    /// Proxy mode: forward only these paths (comma-separated globs such as
    /// "/latest/meta-data/placement/*", or presets such as "@node-termination-handler"); others
    /// get 404. [default: every path but the host's identity credentials]
    #[arg(
        help_heading = "Metadata service",
        long,
        env = "IMDSD_PROXY_ALLOW",
        value_name = "PATTERNS",
        value_delimiter = ','
    )]
    pub proxy_allow: Vec<String>,

    /// Proxy mode: never show the host's user-data to containers.
    #[arg(help_heading = "Metadata service", long, env = "IMDSD_HIDE_USER_DATA", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true")]
    pub hide_user_data: Option<String>,

    /// Also serve the container-credentials protocol (ECS / EKS Pod Identity) on these addresses,
    /// e.g. 169.254.170.2:80 for AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials.
    /// [default: off]
    #[arg(
        help_heading = "Metadata service",
        long,
        env = "IMDSD_ECS_LISTEN",
        value_name = "ADDR",
        value_delimiter = ','
    )]
    pub ecs_listen: Vec<String>,

    /// Require each container-credentials request to carry its caller's token in Authorization
    /// (AWS_CONTAINER_AUTHORIZATION_TOKEN); the admin API hands tokens out.
    #[arg(help_heading = "Metadata service", long, env = "IMDSD_ECS_AUTH", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true")]
    pub ecs_auth: Option<String>,

    /// How often the container index is compared with a full listing. [default: 5m]
    #[arg(
        help_heading = "Docker",
        long,
        env = "IMDSD_DOCKER_RESYNC",
        value_name = "DURATION"
    )]
    pub docker_resync: Option<String>,
}

/// Tools that run instead of the daemon.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Ask a metadata service for credentials as an AWS SDK does, and print what came back as
    /// one JSON line (secrets shortened). Run it inside a container to see what it gets.
    Probe(crate::probe::ProbeArgs),
    /// Check the setup (configuration, Docker, AWS identity, roles, addresses, network) and say
    /// how to fix what is broken. Takes the daemon's flags.
    Doctor(crate::doctor::DoctorArgs),
    /// Set up or remove the host networking a layout needs (Docker network, host address,
    /// redirect rules on EC2).
    Network(crate::network::NetworkArgs),
}

/// The configuration file. Keys mirror the flags, with underscores.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub default_role: Option<String>,
    pub listen: Option<Vec<String>>,
    pub allowed_host: Option<Vec<String>>,
    pub http_tokens: Option<String>,
    pub http_endpoint: Option<String>,
    pub fake_credentials: Option<bool>,
    pub fake_credentials_lifetime: Option<String>,
    pub role_mapping_file: Option<PathBuf>,
    pub default_account_id: Option<String>,
    pub account_map: Option<HashMap<String, String>>,
    pub session_name: Option<String>,
    pub refresh_threshold: Option<u64>,
    pub region: Option<String>,
    pub profile: Option<String>,
    pub sts_endpoint: Option<String>,
    pub sts_max_rate: Option<f64>,
    pub sts_burst: Option<u32>,
    pub sts_max_concurrency: Option<u32>,
    pub role_duration: Option<u32>,
    pub source_imds: Option<bool>,
    pub state_dir: Option<PathBuf>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
    pub access_log_burst: Option<u32>,
    pub keep_alive: Option<bool>,
    pub max_connections: Option<u64>,
    pub max_connections_per_caller: Option<u64>,
    pub strict_expect: Option<bool>,
    pub forwarded_for: Option<String>,
    pub docker_host: Option<String>,
    pub networks: Option<Vec<String>>,
    pub role_env: Option<String>,
    pub label_prefix: Option<String>,
    pub allowed_roles: Option<Vec<String>>,
    pub aliases_only: Option<bool>,
    pub role_session_key: Option<String>,
    pub unknown_caller_wait: Option<String>,
    pub docker_resync: Option<String>,
    pub admin_listen: Option<String>,
    pub ecs_listen: Option<Vec<String>>,
    pub ecs_auth: Option<bool>,
    pub mode: Option<String>,
    pub upstream: Option<String>,
    pub proxy_allow: Option<Vec<String>>,
    pub hide_user_data: Option<bool>,
    /// Alias → role spec, for containers that choose a role by alias.
    pub role_aliases: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    pub instance: InstanceSection,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    /// Offline, locally minted credentials.
    Fake { lifetime: Duration },
    /// STS, from the operator's own AWS identity.
    Sts {
        profile: Option<String>,
        endpoint: Option<String>,
        duration_seconds: u32,
        use_imds: bool,
        /// Proxy mode: the daemon's own identity is the host's instance profile, read through
        /// the upstream metadata service.
        imds_endpoint: Option<String>,
    },
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub config_file: Option<PathBuf>,
    pub listen: Vec<SocketAddr>,
    pub imds: ImdsOptions,
    pub server: ServerOptions,
    pub source: SourceConfig,
    pub broker: BrokerConfig,
    pub identity: IdentityConfig,
    pub default_account_id: Option<String>,
    pub account_map: HashMap<String, String>,
    /// The operator's region: STS's region, and the instance's unless the file says otherwise.
    pub region: Option<String>,
    pub instance: Instance,
    pub state_dir: Option<PathBuf>,
    pub log_format: LogFormat,
    pub log_filter: String,
    /// The Docker Engine to follow; `None` runs without containers.
    pub docker: Option<DockerOptions>,
    /// Where the admin API listens; `None` disables it.
    pub admin_listen: Option<SocketAddr>,
    /// Where the container-credentials endpoint listens (none: off).
    pub ecs_listen: Vec<SocketAddr>,
    pub ecs_auth: bool,
    /// Proxy mode (`--mode proxy`): the upstream and what callers may see of it.
    pub proxy: Option<crate::proxy::ProxyOptions>,
}

/// Everything wrong with the configuration, one line each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "the configuration has {n} problem{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The outcome of reading the command line.
#[derive(Debug)]
pub enum Parsed {
    Run(Box<Config>),
    /// `imdsd probe …`.
    Probe(crate::probe::ProbeArgs),
    /// `imdsd doctor …`.
    Doctor(crate::doctor::DoctorArgs),
    /// `imdsd network …`.
    Network(crate::network::NetworkArgs),
    /// `--help` or `--version`: print and exit 0.
    Info(String),
}

/// Parses `args` and the environment into a [`Config`]. `env` is the environment lookup (tests pass
/// their own; clap reads the process environment for the flags' own variables).
pub fn parse<I, T>(args: I, env: &dyn Fn(&str) -> Option<String>) -> Result<Parsed, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = match Cli::command().try_get_matches_from(args) {
        Ok(m) => m,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    Ok(Parsed::Info(e.render().to_string()))
                }
                _ => Err(ConfigError {
                    problems: vec![
                        e.render()
                            .to_string()
                            .trim_end()
                            .trim_start_matches("error: ")
                            .to_string(),
                    ],
                }),
            };
        }
    };
    let cli = Cli::from_arg_matches(&matches).map_err(|e| ConfigError {
        problems: vec![e.to_string()],
    })?;
    match cli.command {
        Some(Command::Probe(args)) => return Ok(Parsed::Probe(args)),
        Some(Command::Doctor(args)) => return Ok(Parsed::Doctor(args)),
        Some(Command::Network(args)) => return Ok(Parsed::Network(args)),
        None => {}
    }
    resolve(&cli, &matches, env).map(|c| Parsed::Run(Box::new(c)))
}

/// Where a value came from, for error messages.
enum Origin {
    Flag(&'static str),
    Env(&'static str),
    File(&'static str),
    Default,
}

struct Resolver<'a> {
    matches: &'a ArgMatches,
    file_path: Option<&'a Path>,
    problems: Vec<String>,
}

impl Resolver<'_> {
    /// Describes where a value came from: `--flag`, `ENV_VAR`, `file.toml: key`.
    fn origin(&self, origin: &Origin) -> String {
        match origin {
            Origin::Flag(f) => format!("--{f}"),
            Origin::Env(e) => e.to_string(),
            Origin::File(k) => match self.file_path {
                Some(p) => format!("{}: {k}", p.display()),
                None => (*k).to_string(),
            },
            Origin::Default => "the default".into(),
        }
    }

    fn problem(&mut self, origin: &Origin, message: impl std::fmt::Display) {
        let at = self.origin(origin);
        self.problems.push(format!("{at}: {message}"));
    }

    /// The flag/env value if clap has one, else the file's, with its origin.
    fn pick<T>(
        &self,
        id: &str,
        flag: &'static str,
        env: &'static str,
        cli: Option<T>,
        file: Option<T>,
    ) -> Option<(T, Origin)> {
        if let Some(v) = cli {
            let origin = match self.matches.value_source(id) {
                Some(ValueSource::EnvVariable) => Origin::Env(env),
                _ => Origin::Flag(flag),
            };
            return Some((v, origin));
        }
        file.map(|v| (v, Origin::File(flag_to_key(flag))))
    }

    fn boolean(
        &mut self,
        id: &str,
        flag: &'static str,
        env: &'static str,
        cli: &Option<String>,
        file: Option<bool>,
    ) -> bool {
        match self.pick(id, flag, env, cli.clone(), file.map(|b| b.to_string())) {
            Some((v, origin)) => match parse_bool(&v) {
                Some(b) => b,
                None => {
                    self.problem(
                        &origin,
                        format!("{v:?} is not a boolean; write true or false"),
                    );
                    false
                }
            },
            None => false,
        }
    }

    /// A connection cap: a whole number from 1 to [`crate::server::MAX_CONNECTIONS_LIMIT`].
    fn connection_count(
        &mut self,
        id: &str,
        flag: &'static str,
        env: &'static str,
        cli: &Option<String>,
        file: Option<u64>,
        default: usize,
    ) -> usize {
        let Some((v, origin)) = self.pick(id, flag, env, cli.clone(), file.map(|n| n.to_string()))
        else {
            return default;
        };
        let max = crate::server::MAX_CONNECTIONS_LIMIT;
        match v.trim().parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => n,
            Ok(_) => {
                self.problem(
                    &origin,
                    format!(
                        "{v:?} is outside 1 to {max}; write a number of connections such as                          {default} (the default)"
                    ),
                );
                default
            }
            Err(_) => {
                self.problem(
                    &origin,
                    format!("{v:?} is not a number of connections; write e.g. {default}"),
                );
                default
            }
        }
    }

    fn choice<T: Copy>(
        &mut self,
        picked: Option<(String, Origin)>,
        choices: &[(&str, T)],
        default: T,
    ) -> T {
        let Some((v, origin)) = picked else {
            return default;
        };
        match choices
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(v.trim()))
        {
            Some((_, value)) => *value,
            None => {
                let names: Vec<String> = choices.iter().map(|(n, _)| format!("{n:?}")).collect();
                self.problem(&origin, format!("{v:?} is not one of {}", names.join(", ")));
                default
            }
        }
    }
}

/// `fake-credentials` → `fake_credentials`: file keys mirror flag names.
fn flag_to_key(flag: &'static str) -> &'static str {
    match flag {
        "default-role" => "default_role",
        "allowed-host" => "allowed_host",
        "http-tokens" => "http_tokens",
        "http-endpoint" => "http_endpoint",
        "fake-credentials" => "fake_credentials",
        "fake-credentials-lifetime" => "fake_credentials_lifetime",
        "role-mapping-file" => "role_mapping_file",
        "default-account-id" => "default_account_id",
        "account-map" => "account_map",
        "session-name" => "session_name",
        "refresh-threshold" => "refresh_threshold",
        "state-dir" => "state_dir",
        "log-format" => "log_format",
        "access-log-burst" => "access_log_burst",
        "log-level" => "log_level",
        "keep-alive" => "keep_alive",
        "max-connections" => "max_connections",
        "max-connections-per-caller" => "max_connections_per_caller",
        "strict-expect" => "strict_expect",
        "forwarded-for" => "forwarded_for",
        "sts-endpoint" => "sts_endpoint",
        "sts-max-rate" => "sts_max_rate",
        "sts-burst" => "sts_burst",
        "sts-max-concurrency" => "sts_max_concurrency",
        "role-duration" => "role_duration",
        "source-imds" => "source_imds",
        "docker-host" => "docker_host",
        "role-env" => "role_env",
        "label-prefix" => "label_prefix",
        "allowed-roles" => "allowed_roles",
        "aliases-only" => "aliases_only",
        "role-session-key" => "role_session_key",
        "unknown-caller-wait" => "unknown_caller_wait",
        "docker-resync" => "docker_resync",
        "admin-listen" => "admin_listen",
        "ecs-listen" => "ecs_listen",
        "ecs-auth" => "ecs_auth",
        "proxy-allow" => "proxy_allow",
        "hide-user-data" => "hide_user_data",
        other => other,
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" | "" => Some(false),
        _ => None,
    }
}

/// `169.254.169.254:80`, `[fd00:ec2::254]:80`, or a bare address meaning port 80.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = s
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok(SocketAddr::new(ip, 80));
    }
    Err(format!(
        "{s:?} is not an address to listen on; write an IP and port such as \"{DEFAULT_LISTEN}\" or \
         \"[fd00:ec2::254]:80\""
    ))
}

fn read_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "{}: cannot read the configuration file: {e}",
            path.display()
        )
    })?;
    toml::from_str(&text).map_err(|e| {
        let msg = e.message();
        let at = e
            .span()
            .map(|span| {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!(" (line {line})")
            })
            .unwrap_or_default();
        let hint = if msg.contains("unknown field") {
            "; see the commented example in imdsd.example.toml for every key"
        } else {
            ""
        };
        format!("{}{at}: {msg}{hint}", path.display())
    })
}

fn resolve(
    cli: &Cli,
    matches: &ArgMatches,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();
    let file = match &cli.config {
        Some(path) => match read_file(path) {
            Ok(f) => f,
            Err(e) => {
                problems.push(e);
                FileConfig::default()
            }
        },
        None => FileConfig::default(),
    };
    let mut r = Resolver {
        matches,
        file_path: cli.config.as_deref(),
        problems,
    };

    // --listen
    let listen_strings = if cli.listen.is_empty() {
        file.listen.clone().map(|l| (l, Origin::File("listen")))
    } else {
        let origin = match matches.value_source("listen") {
            Some(ValueSource::EnvVariable) => Origin::Env("IMDSD_LISTEN"),
            _ => Origin::Flag("listen"),
        };
        Some((cli.listen.clone(), origin))
    };
    let mut listen = Vec::new();
    match listen_strings {
        Some((list, origin)) => {
            for s in &list {
                match parse_listen(s) {
                    Ok(a) if !listen.contains(&a) => listen.push(a),
                    Ok(_) => {}
                    Err(e) => r.problem(&origin, e),
                }
            }
            if list.is_empty() {
                r.problem(&origin, "names no address; give at least one");
            }
        }
        None => listen
            .push(parse_listen(DEFAULT_LISTEN).map_err(|e| ConfigError { problems: vec![e] })?),
    }

    // Unlike other lists, an empty entry is a mistake worth naming, not one to drop.
    let allowed_hosts = match r.pick(
        "allowed_host",
        "allowed-host",
        "IMDSD_ALLOWED_HOSTS",
        (!cli.allowed_host.is_empty()).then(|| cli.allowed_host.clone()),
        file.allowed_host.clone(),
    ) {
        Some((names, origin)) => AllowedHosts::new(&names).unwrap_or_else(|problems| {
            for p in problems {
                r.problem(&origin, p);
            }
            AllowedHosts::default()
        }),
        None => AllowedHosts::default(),
    };

    let http_tokens = {
        let picked = r.pick(
            "http_tokens",
            "http-tokens",
            "IMDSD_HTTP_TOKENS",
            cli.http_tokens.clone(),
            file.http_tokens.clone(),
        );
        r.choice(
            picked,
            &[
                ("optional", HttpTokens::Optional),
                ("required", HttpTokens::Required),
            ],
            HttpTokens::Optional,
        )
    };
    let endpoint_enabled = {
        let picked = r.pick(
            "http_endpoint",
            "http-endpoint",
            "IMDSD_HTTP_ENDPOINT",
            cli.http_endpoint.clone(),
            file.http_endpoint.clone(),
        );
        r.choice(picked, &[("enabled", true), ("disabled", false)], true)
    };
    let reject_forwarded = {
        let picked = r.pick(
            "forwarded_for",
            "forwarded-for",
            "IMDSD_FORWARDED_FOR",
            cli.forwarded_for.clone(),
            file.forwarded_for.clone(),
        );
        r.choice(picked, &[("reject", true), ("allow", false)], true)
    };
    let log_format = {
        let picked = r.pick(
            "log_format",
            "log-format",
            "IMDSD_LOG_FORMAT",
            cli.log_format.clone(),
            file.log_format.clone(),
        );
        r.choice(
            picked,
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            LogFormat::Text,
        )
    };
    let log_filter = match r.pick(
        "log_level",
        "log-level",
        "IMDSD_LOG",
        cli.log_level.clone(),
        file.log_level.clone(),
    ) {
        Some((f, origin)) => {
            if let Err(e) = tracing_subscriber::EnvFilter::try_new(&f) {
                r.problem(
                    &origin,
                    format!("{f:?} is not a log filter ({e}); try \"info\" or \"debug\""),
                );
            }
            f
        }
        None => "info".into(),
    };
    let access_log_burst = match r.pick(
        "access_log_burst",
        "access-log-burst",
        "IMDSD_ACCESS_LOG_BURST",
        cli.access_log_burst.clone(),
        file.access_log_burst.map(|n| n.to_string()),
    ) {
        Some((s, origin)) => s.trim().parse::<u32>().unwrap_or_else(|_| {
            r.problem(
                &origin,
                format!("{s:?} is not a number of lines; write 0 to log every request, or e.g. 10"),
            );
            crate::logging::DEFAULT_ACCESS_LOG_BURST
        }),
        None => crate::logging::DEFAULT_ACCESS_LOG_BURST,
    };
    let fake = r.boolean(
        "fake_credentials",
        "fake-credentials",
        "IMDSD_FAKE_CREDENTIALS",
        &cli.fake_credentials,
        file.fake_credentials,
    );
    let keep_alive = r.boolean(
        "keep_alive",
        "keep-alive",
        "IMDSD_KEEP_ALIVE",
        &cli.keep_alive,
        file.keep_alive,
    );
    let max_connections = r.connection_count(
        "max_connections",
        "max-connections",
        "IMDSD_MAX_CONNECTIONS",
        &cli.max_connections,
        file.max_connections,
        crate::server::DEFAULT_MAX_CONNECTIONS,
    );
    let max_connections_per_caller = r.connection_count(
        "max_connections_per_caller",
        "max-connections-per-caller",
        "IMDSD_MAX_CONNECTIONS_PER_CALLER",
        &cli.max_connections_per_caller,
        file.max_connections_per_caller,
        crate::server::DEFAULT_MAX_CONNECTIONS_PER_CALLER,
    );
    let strict_expect = r.boolean(
        "strict_expect",
        "strict-expect",
        "IMDSD_STRICT_EXPECT",
        &cli.strict_expect,
        file.strict_expect,
    );

    let fake_lifetime = match r.pick(
        "fake_credentials_lifetime",
        "fake-credentials-lifetime",
        "IMDSD_FAKE_CREDENTIALS_LIFETIME",
        cli.fake_credentials_lifetime.clone(),
        file.fake_credentials_lifetime.clone(),
    ) {
        Some((s, origin)) => match humantime::parse_duration(s.trim()) {
            Ok(d) if (Duration::from_secs(60)..=Duration::from_secs(36 * 3600)).contains(&d) => d,
            Ok(_) => {
                r.problem(&origin, format!("{s:?} is outside 1m to 36h"));
                DEFAULT_LIFETIME
            }
            Err(e) => {
                r.problem(
                    &origin,
                    format!("{s:?} is not a duration such as \"6h\" or \"90m\" ({e})"),
                );
                DEFAULT_LIFETIME
            }
        },
        None => DEFAULT_LIFETIME,
    };

    let source_imds = r.boolean(
        "source_imds",
        "source-imds",
        "IMDSD_SOURCE_IMDS",
        &cli.source_imds,
        file.source_imds,
    );
    let profile = r
        .pick(
            "profile",
            "profile",
            "AWS_PROFILE",
            cli.profile.clone(),
            file.profile.clone(),
        )
        .map(|(p, _)| p)
        .filter(|p| !p.trim().is_empty());
    let sts_endpoint = match r.pick(
        "sts_endpoint",
        "sts-endpoint",
        "AWS_ENDPOINT_URL_STS",
        cli.sts_endpoint.clone(),
        file.sts_endpoint.clone(),
    ) {
        Some((url, origin)) => match url.parse::<http::Uri>() {
            Ok(u) if u.scheme().is_some() && u.host().is_some() => Some(url),
            _ => {
                r.problem(
                    &origin,
                    format!("{url:?} is not a URL such as \"http://127.0.0.1:5000\""),
                );
                None
            }
        },
        None => None,
    };
    let role_duration = match r.pick(
        "role_duration",
        "role-duration",
        "IMDSD_ROLE_DURATION",
        cli.role_duration.clone(),
        file.role_duration.map(|d| d.to_string()),
    ) {
        Some((s, origin)) => match s.trim().parse::<u32>() {
            Ok(d) if (900..=43_200).contains(&d) => d,
            _ => {
                r.problem(
                    &origin,
                    format!("{s:?} must be a number of seconds from 900 to 43200 (STS's limits)"),
                );
                crate::credentials::sts::ONE_HOUR
            }
        },
        None => crate::credentials::sts::ONE_HOUR,
    };

    let mut broker = BrokerConfig::default();
    let mut limiter = LimiterOptions::default();
    if let Some((s, origin)) = r.pick(
        "sts_max_rate",
        "sts-max-rate",
        "IMDSD_STS_MAX_RATE",
        cli.sts_max_rate.clone(),
        file.sts_max_rate.map(|v| v.to_string()),
    ) {
        match LimiterOptions::parse_rate(&s) {
            Ok(v) => limiter.rate = v,
            Err(e) => r.problem(&origin, e),
        }
    }
    if let Some((s, origin)) = r.pick(
        "sts_burst",
        "sts-burst",
        "IMDSD_STS_BURST",
        cli.sts_burst.clone(),
        file.sts_burst.map(|v| v.to_string()),
    ) {
        match LimiterOptions::parse_burst(&s) {
            Ok(v) => limiter.burst = v,
            Err(e) => r.problem(&origin, e),
        }
    }
    if let Some((s, origin)) = r.pick(
        "sts_max_concurrency",
        "sts-max-concurrency",
        "IMDSD_STS_MAX_CONCURRENCY",
        cli.sts_max_concurrency.clone(),
        file.sts_max_concurrency.map(|v| v.to_string()),
    ) {
        match LimiterOptions::parse_concurrency(&s) {
            Ok(v) => limiter.concurrency = v,
            Err(e) => r.problem(&origin, e),
        }
    }
    if let Some((s, origin)) = r.pick(
        "refresh_threshold",
        "refresh-threshold",
        "ROLE_EXPIRATION_THRESHOLD",
        cli.refresh_threshold.clone(),
        file.refresh_threshold.map(|m| m.to_string()),
    ) {
        match s.trim().parse::<u64>() {
            Ok(m) if (15..=720).contains(&m) => broker.min_remaining = Duration::from_secs(m * 60),
            Ok(m) => r.problem(
                &origin,
                format!(
                    "{m} minutes is outside 15 to 720: below 15 minutes of validity botocore refreshes \
                     on every call, so write 15 or more (30 is the default)"
                ),
            ),
            Err(_) => r.problem(&origin, format!("{s:?} is not a whole number of minutes")),
        }
    }

    // The role named for callers without one: --default-role / DEFAULT_IAM_ROLE, the positional
    // argument, then lyft's DEFAULT_ROLE, then the file.
    let default_role_text = match (&cli.default_role, &cli.default_role_positional) {
        (Some(flag), Some(pos)) if flag != pos => {
            let origin = r
                .pick(
                    "default_role",
                    "default-role",
                    "DEFAULT_IAM_ROLE",
                    Some(()),
                    None,
                )
                .map(|p| p.1);
            if let Some(o) = origin {
                r.problem(
                    &o,
                    format!("{flag:?} conflicts with the DEFAULT_ROLE argument {pos:?}; give the role once"),
                );
            }
            None
        }
        (Some(_), _) => r.pick(
            "default_role",
            "default-role",
            "DEFAULT_IAM_ROLE",
            cli.default_role.clone(),
            None,
        ),
        (None, Some(pos)) => Some((pos.clone(), Origin::Flag("default-role"))),
        (None, None) => env("DEFAULT_ROLE")
            .filter(|s| !s.trim().is_empty())
            .map(|s| (s, Origin::Env("DEFAULT_ROLE")))
            .or_else(|| {
                file.default_role
                    .clone()
                    .map(|s| (s, Origin::File("default_role")))
            }),
    };
    let default_role = default_role_text.and_then(|(text, origin)| match RoleSpec::parse(&text) {
        Ok(spec) => Some(spec),
        Err(e) => {
            r.problem(&origin, e);
            None
        }
    });

    let mapping = match r.pick(
        "role_mapping_file",
        "role-mapping-file",
        "ROLE_MAPPING_FILE",
        cli.role_mapping_file.clone(),
        file.role_mapping_file.clone(),
    ) {
        Some((path, origin)) => match RoleMapping::load(&path) {
            Ok(m) => m,
            Err(errors) => {
                for e in errors {
                    r.problem(&origin, format!("{}: {e}", path.display()));
                }
                RoleMapping::default()
            }
        },
        None => RoleMapping::default(),
    };

    let session_name_template = match r.pick(
        "session_name",
        "session-name",
        "IMDSD_SESSION_NAME",
        cli.session_name.clone(),
        file.session_name.clone(),
    ) {
        Some((t, origin)) => {
            if let Err(e) = check_session_name_template(&t) {
                r.problem(&origin, e);
            }
            Some(t)
        }
        None => None,
    };

    let (docker, containers) = resolve_containers(&mut r, cli, &file, env);
    let admin_listen = match r.pick(
        "admin_listen",
        "admin-listen",
        "IMDSD_ADMIN_LISTEN",
        cli.admin_listen.clone(),
        file.admin_listen.clone(),
    ) {
        Some((a, _)) if a.trim().eq_ignore_ascii_case("none") => None,
        Some((a, origin)) => match parse_listen(&a) {
            Ok(addr) => {
                // Whatever can reach the metadata address (every container on its network) must
                // not reach the admin API.
                if !addr.ip().is_loopback() && listen.iter().any(|l| l.ip() == addr.ip()) {
                    r.problem(
                        &origin,
                        format!(
                            "{addr} is on the metadata address {}, where every container could reach \
                             it; use a loopback address such as 127.0.0.1:9169",
                            addr.ip()
                        ),
                    );
                }
                Some(addr)
            }
            Err(e) => {
                r.problem(&origin, e);
                None
            }
        },
        None => Some(SocketAddr::from(([127, 0, 0, 1], DEFAULT_ADMIN_PORT))),
    };
    let mut ecs_listen = Vec::new();
    if let Some((list, origin)) = pick_list(
        &r,
        "ecs_listen",
        "ecs-listen",
        "IMDSD_ECS_LISTEN",
        &cli.ecs_listen,
        file.ecs_listen.as_ref(),
    ) {
        for a in &list {
            match parse_listen(a) {
                // Port 0 (any free port) cannot collide.
                Ok(addr)
                    if addr.port() != 0
                        && (listen.contains(&addr) || admin_listen == Some(addr)) =>
                {
                    r.problem(
                        &origin,
                        format!("{addr} is already the metadata or admin address; give the endpoint its own"),
                    )
                }
                Ok(addr) if !ecs_listen.contains(&addr) => ecs_listen.push(addr),
                Ok(_) => {}
                Err(e) => r.problem(&origin, e),
            }
        }
    }
    let ecs_auth = r.boolean(
        "ecs_auth",
        "ecs-auth",
        "IMDSD_ECS_AUTH",
        &cli.ecs_auth,
        file.ecs_auth,
    );
    if ecs_auth && ecs_listen.is_empty() {
        r.problems.push(
            "--ecs-auth is set but --ecs-listen is not: there is no container-credentials endpoint to protect"
                .into(),
        );
    }

    let default_account_id = match r.pick(
        "default_account_id",
        "default-account-id",
        "DEFAULT_ACCOUNT_ID",
        cli.default_account_id.clone(),
        file.default_account_id.clone(),
    ) {
        Some((id, origin)) => {
            let id = id.trim().to_string();
            if id.len() == 12 && id.bytes().all(|b| b.is_ascii_digit()) {
                Some(id)
            } else {
                r.problem(&origin, format!("{id:?} is not a 12-digit AWS account id"));
                None
            }
        }
        None => None,
    };

    let account_map = match (&cli.account_map, &file.account_map) {
        (Some(json), _) => {
            let origin = r
                .pick(
                    "account_map",
                    "account-map",
                    "AWS_ACCOUNT_MAP",
                    Some(()),
                    None,
                )
                .map_or(Origin::Default, |p| p.1);
            parse_account_map(json).unwrap_or_else(|e| {
                r.problem(&origin, e);
                HashMap::new()
            })
        }
        (None, Some(table)) => {
            let json = serde_json::to_string(table).unwrap_or_default();
            parse_account_map(&json).unwrap_or_else(|e| {
                r.problem(&Origin::File("account_map"), e);
                HashMap::new()
            })
        }
        (None, None) => HashMap::new(),
    };

    let region = match r.pick(
        "region",
        "region",
        "AWS_REGION",
        cli.region.clone(),
        file.region.clone(),
    ) {
        Some((reg, origin)) => {
            if is_region(reg.trim()) {
                Some(reg.trim().to_string())
            } else {
                r.problem(
                    &origin,
                    format!("{reg:?} is not an AWS region such as \"us-east-1\""),
                );
                None
            }
        }
        None => env("AWS_DEFAULT_REGION")
            .filter(|s| is_region(s.trim()))
            .map(|s| s.trim().to_string()),
    };

    let instance = match Instance::resolve(
        &file.instance,
        &InstanceDefaults {
            region: region.clone(),
            mocked_instance_id: env("MOCKED_INSTANCE_ID").filter(|s| !s.is_empty()),
            started: Some(SystemTime::now()),
        },
    ) {
        Ok(i) => Some(i),
        Err(problems) => {
            for p in problems {
                let origin_text = match r.file_path {
                    Some(path) => format!("{}: instance.{}", path.display(), p.key),
                    None => format!("instance.{}", p.key),
                };
                r.problems.push(format!("{origin_text}: {}", p.message));
            }
            None
        }
    };

    let state_dir = r
        .pick(
            "state_dir",
            "state-dir",
            "IMDSD_STATE_DIR",
            cli.state_dir.clone(),
            file.state_dir.clone(),
        )
        .map(|(p, _)| p);

    if !r.problems.is_empty() {
        return Err(ConfigError {
            problems: r.problems,
        });
    }
    let Some(instance) = instance else {
        return Err(ConfigError {
            problems: vec!["the [instance] table is invalid".into()],
        });
    };
    let proxy = resolve_proxy(&mut r, cli, &file, env, &listen);
    if !r.problems.is_empty() {
        return Err(ConfigError {
            problems: r.problems,
        });
    }
    // Fake credentials make no calls, so there is nothing to protect (and a benchmark's 10,000
    // synthetic containers are prefetched at once).
    broker.limiter = (!fake).then_some(limiter);
    let source = if fake {
        SourceConfig::Fake {
            lifetime: fake_lifetime,
        }
    } else {
        SourceConfig::Sts {
            profile,
            endpoint: sts_endpoint,
            duration_seconds: role_duration,
            use_imds: source_imds || proxy.is_some(),
            imds_endpoint: proxy.as_ref().map(|p| p.upstream.clone()),
        }
    };
    // Unless the operator named them, the networks served are those that carry an address imdsd
    // listens on: the metadata network of the host or compose layout, the bridge on EC2.
    let mut docker = docker;
    if let Some(NetworkScope::Carrying(addrs)) = docker.as_mut().map(|d| &mut d.networks) {
        *addrs = listen
            .iter()
            .chain(&ecs_listen)
            .map(SocketAddr::ip)
            .collect();
    }
    Ok(Config {
        config_file: cli.config.clone(),
        listen,
        imds: ImdsOptions {
            http_tokens,
            endpoint_enabled,
            reject_forwarded,
            strict_expect,
            access_log_limits: std::sync::Arc::new(crate::logging::RepeatLimits::new(
                access_log_burst,
            )),
            connection: if keep_alive {
                Connection::KeepAlive
            } else {
                Connection::Close
            },
            allowed_hosts,
        },
        server: ServerOptions {
            keep_alive,
            max_connections,
            max_connections_per_caller,
            ..ServerOptions::default()
        },
        source,
        broker,
        identity: IdentityConfig {
            default_role,
            mapping,
            session_name_template,
            containers,
        },
        default_account_id,
        account_map,
        region,
        instance,
        state_dir,
        log_format,
        log_filter,
        docker,
        admin_listen,
        ecs_listen,
        ecs_auth,
        proxy,
    })
}

/// `--mode proxy` and what goes with it.
fn resolve_proxy(
    r: &mut Resolver<'_>,
    cli: &Cli,
    file: &FileConfig,
    env: &dyn Fn(&str) -> Option<String>,
    listen: &[SocketAddr],
) -> Option<crate::proxy::ProxyOptions> {
    // lyft's MOCK_API: true is emulate, false is proxy; --mode / IMDSD_MODE win.
    let mode = r
        .pick("mode", "mode", "IMDSD_MODE", cli.mode.clone(), None)
        .or_else(|| {
            env("MOCK_API").filter(|v| !v.trim().is_empty()).map(|v| {
                let mode = match parse_bool(&v) {
                    Some(false) => "proxy".to_string(),
                    Some(true) => "emulate".to_string(),
                    None => v,
                };
                (mode, Origin::Env("MOCK_API"))
            })
        })
        .or_else(|| file.mode.clone().map(|m| (m, Origin::File("mode"))));
    let proxy = r.choice(mode, &[("emulate", false), ("proxy", true)], false);
    let upstream = r.pick(
        "upstream",
        "upstream",
        "METADATA_URL",
        cli.upstream.clone(),
        file.upstream.clone(),
    );
    let allow = pick_list(
        r,
        "proxy_allow",
        "proxy-allow",
        "IMDSD_PROXY_ALLOW",
        &cli.proxy_allow,
        file.proxy_allow.as_ref(),
    );
    let hide_user_data = r.boolean(
        "hide_user_data",
        "hide-user-data",
        "IMDSD_HIDE_USER_DATA",
        &cli.hide_user_data,
        file.hide_user_data,
    );
    if !proxy {
        // Proxy settings without proxy mode are a mistake worth saying out loud.
        let stray = upstream
            .map(|(_, o)| o)
            .or(allow.map(|(_, o)| o))
            .or(hide_user_data.then_some(Origin::Flag("hide-user-data")));
        if let Some(origin) = stray {
            r.problem(&origin, "only applies with --mode proxy (MOCK_API=false)");
        }
        return None;
    }
    let mut options = crate::proxy::ProxyOptions {
        hide_user_data,
        ..crate::proxy::ProxyOptions::default()
    };
    if let Some((url, origin)) = upstream {
        let url = url.trim().trim_end_matches('/').to_string();
        let on_self = url
            .strip_prefix("http://")
            .and_then(|rest| parse_listen(rest).ok())
            .is_some_and(|addr| listen.contains(&addr));
        if on_self {
            r.problem(
                &origin,
                format!("{url} is imdsd's own --listen address: it would forward to itself"),
            );
        }
        options.upstream = url;
    }
    if let Some((entries, origin)) = allow {
        match crate::proxy::expand_allow_list(&entries) {
            Ok(patterns) => options.allow = Some(patterns),
            Err(e) => r.problem(&origin, e),
        }
    }
    if let Err(e) = crate::proxy::Upstream::new(options.clone()) {
        r.problem(&Origin::Flag("upstream"), e);
    }
    Some(options)
}

impl Config {
    /// How role names without an account resolve, given the daemon's own account and partition
    /// (the emulated instance's offline, the AWS identity's otherwise): `DEFAULT_ACCOUNT_ID` wins
    /// over the own account, and `AWS_ACCOUNT_MAP` names the aliases.
    pub fn account_context(&self, own_account: &str, partition: &str) -> AccountContext {
        AccountContext {
            default_account: Some(
                self.default_account_id
                    .clone()
                    .unwrap_or_else(|| own_account.to_string()),
            ),
            partition: partition.to_string(),
            aliases: self.account_map.clone(),
        }
    }

    /// How to reach STS, unless the credentials are fake.
    pub fn sts_options(&self) -> Option<crate::credentials::sts::StsOptions> {
        match &self.source {
            SourceConfig::Fake { .. } => None,
            SourceConfig::Sts {
                profile,
                endpoint,
                duration_seconds,
                use_imds,
                imds_endpoint,
            } => Some(crate::credentials::sts::StsOptions {
                profile: profile.clone(),
                region: self.region.clone(),
                fallback_region: self.instance.region.clone(),
                endpoint: endpoint.clone(),
                duration_seconds: *duration_seconds,
                use_imds: *use_imds,
                imds_endpoint: imds_endpoint.clone(),
            }),
        }
    }
}

/// The admin API's default port, on loopback.
pub const DEFAULT_ADMIN_PORT: u16 = 9169;

/// A list from a repeatable flag (or its comma-separated variable), else the file.
fn pick_list(
    r: &Resolver<'_>,
    id: &str,
    flag: &'static str,
    env: &'static str,
    cli: &[String],
    file: Option<&Vec<String>>,
) -> Option<(Vec<String>, Origin)> {
    let cli = (!cli.is_empty()).then(|| cli.to_vec());
    r.pick(id, flag, env, cli, file.cloned())
        .map(|(list, origin)| {
            let list = list
                .into_iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            (list, origin)
        })
}

/// A duration such as "250ms" or "5m" within `range`.
fn pick_duration(
    r: &mut Resolver<'_>,
    picked: Option<(String, Origin)>,
    range: std::ops::RangeInclusive<Duration>,
    default: Duration,
) -> Duration {
    let Some((s, origin)) = picked else {
        return default;
    };
    match humantime::parse_duration(s.trim()) {
        Ok(d) if range.contains(&d) => d,
        Ok(_) => {
            r.problem(
                &origin,
                format!(
                    "{s:?} is outside {} to {}",
                    humantime::format_duration(*range.start()),
                    humantime::format_duration(*range.end())
                ),
            );
            default
        }
        Err(e) => {
            r.problem(
                &origin,
                format!("{s:?} is not a duration such as \"250ms\" or \"5m\" ({e})"),
            );
            default
        }
    }
}

/// The Docker connection and the rules for containers.
fn resolve_containers(
    r: &mut Resolver<'_>,
    cli: &Cli,
    file: &FileConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> (Option<DockerOptions>, ContainerRules) {
    let mut rules = ContainerRules::default();

    if let Some((name, origin)) = r.pick(
        "role_env",
        "role-env",
        "IMDSD_ROLE_ENV",
        cli.role_env.clone(),
        file.role_env.clone(),
    ) {
        let name = name.trim().to_string();
        if name.is_empty() || name.contains(['=', ' ']) {
            r.problem(
                &origin,
                format!("{name:?} is not an environment variable name such as \"IAM_ROLE\""),
            );
        } else {
            rules.role_env = name;
        }
    }
    if let Some((prefix, origin)) = r.pick(
        "label_prefix",
        "label-prefix",
        "IMDSD_LABEL_PREFIX",
        cli.label_prefix.clone(),
        file.label_prefix.clone(),
    ) {
        let prefix = prefix.trim().trim_end_matches('.').to_string();
        if prefix.is_empty() || prefix.contains([' ', '=']) {
            r.problem(
                &origin,
                format!(
                    "{prefix:?} is not a label prefix such as \"imdsd\" or \"com.example.iam\""
                ),
            );
        } else {
            rules.label_prefix = prefix;
        }
    }
    if let Some((patterns, origin)) = pick_list(
        r,
        "allowed_roles",
        "allowed-roles",
        "IMDSD_ALLOWED_ROLES",
        &cli.allowed_roles,
        file.allowed_roles.as_ref(),
    ) {
        for p in &patterns {
            if let Err(e) = ContainerRules::check_allowed_pattern(p) {
                r.problem(&origin, e);
            }
        }
        rules.allowed_roles = patterns;
    }
    rules.aliases_only = r.boolean(
        "aliases_only",
        "aliases-only",
        "IMDSD_ALIASES_ONLY",
        &cli.aliases_only,
        file.aliases_only,
    );
    if let Some((key, origin)) = r.pick(
        "role_session_key",
        "role-session-key",
        "ROLE_SESSION_KEY",
        cli.role_session_key.clone(),
        file.role_session_key.clone(),
    ) && !key.trim().is_empty()
    {
        match SessionKey::parse(&key) {
            Ok(k) => rules.session_key = Some(k),
            Err(e) => r.problem(&origin, e),
        }
    }
    let wait = r.pick(
        "unknown_caller_wait",
        "unknown-caller-wait",
        "IMDSD_UNKNOWN_CALLER_WAIT",
        cli.unknown_caller_wait.clone(),
        file.unknown_caller_wait.clone(),
    );
    rules.unknown_caller_wait = pick_duration(
        r,
        wait,
        Duration::ZERO..=DEFAULT_UNKNOWN_CALLER_WAIT,
        DEFAULT_UNKNOWN_CALLER_WAIT,
    );
    for (alias, spec) in file.role_aliases.iter().flatten() {
        match RoleSpec::parse(spec) {
            Ok(s) => {
                rules.aliases.insert(alias.clone(), s);
            }
            Err(e) => r.problem(&Origin::File("role_aliases"), format!("{alias}: {e}")),
        }
    }
    if rules.aliases_only && rules.aliases.is_empty() {
        r.problems.push(
            "aliases only is set but the [role_aliases] table is empty, so no container could get a role; \
             add aliases to the configuration file or drop --aliases-only"
                .into(),
        );
    }

    let resync = r.pick(
        "docker_resync",
        "docker-resync",
        "IMDSD_DOCKER_RESYNC",
        cli.docker_resync.clone(),
        file.docker_resync.clone(),
    );
    let resync_every = pick_duration(
        r,
        resync,
        Duration::from_secs(5)..=Duration::from_secs(24 * 3600),
        Duration::from_secs(300),
    );
    let networks = pick_list(
        r,
        "networks",
        "networks",
        "IMDSD_NETWORKS",
        &cli.networks,
        file.networks.as_ref(),
    )
    .filter(|(n, _)| !n.is_empty());
    let networks = match networks {
        None => NetworkScope::Carrying(Vec::new()),
        Some((names, _)) if names.len() == 1 && names[0] == "*" => NetworkScope::All,
        Some((names, origin)) => {
            for name in &names {
                if !valid_network_name(name) {
                    r.problem(
                        &origin,
                        format!(
                            "{name:?} is not a Docker network name; name the networks whose \
                             containers are served (`docker network ls`), or '*' for every network"
                        ),
                    );
                }
            }
            NetworkScope::Named(names)
        }
    };

    let host = r
        .pick(
            "docker_host",
            "docker-host",
            "DOCKER_HOST",
            cli.docker_host.clone(),
            None,
        )
        .or_else(|| {
            env("DOCKER_URL")
                .filter(|s| !s.trim().is_empty())
                .map(|s| (s, Origin::Env("DOCKER_URL")))
        })
        // Podman's own name for the same thing.
        .or_else(|| {
            env("CONTAINER_HOST")
                .filter(|s| !s.trim().is_empty())
                .map(|s| (s, Origin::Env("CONTAINER_HOST")))
        })
        .or_else(|| {
            file.docker_host
                .clone()
                .map(|s| (s, Origin::File("docker_host")))
        });
    let host = match host {
        Some((h, _)) if h.trim().eq_ignore_ascii_case("none") => None,
        Some((h, origin)) => match normalise_docker_host(&h) {
            Ok(h) => Some(h),
            Err(e) => {
                r.problem(&origin, e);
                None
            }
        },
        None if Path::new(DEFAULT_DOCKER_SOCKET).exists() => {
            Some(format!("unix://{DEFAULT_DOCKER_SOCKET}"))
        }
        // Rootful Podman's Docker-compatible API, where Docker is not installed.
        None if Path::new(DEFAULT_PODMAN_SOCKET).exists() => {
            Some(format!("unix://{DEFAULT_PODMAN_SOCKET}"))
        }
        None => None,
    };
    let docker = host.map(|host| DockerOptions {
        host,
        resync_every,
        env_keys: rules.env_keys(),
        label_keys: rules.label_keys(),
        networks,
    });
    (docker, rules)
}

const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
const DEFAULT_PODMAN_SOCKET: &str = "/run/podman/podman.sock";

/// What Docker accepts as a network name (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`).
fn valid_network_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `unix:///var/run/docker.sock`, lyft's `unix://var/run/docker.sock`, a bare socket path,
/// `tcp://host:2375` or `http://host:2375`; or `synthetic:N`, made-up containers for benchmarks
/// (see [`crate::docker::synthetic`]).
fn normalise_docker_host(s: &str) -> Result<String, String> {
    let s = s.trim();
    if let Some(n) = crate::docker::synthetic::count(s) {
        return n.map(|n| format!("{}{n}", crate::docker::synthetic::SCHEME));
    }
    if let Some(path) = s.strip_prefix("unix://") {
        let path = path.trim_start_matches('/');
        if path.is_empty() {
            return Err(format!(
                "{s:?} names no socket; write e.g. \"unix:///var/run/docker.sock\""
            ));
        }
        return Ok(format!("unix:///{path}"));
    }
    if s.starts_with('/') {
        return Ok(format!("unix://{s}"));
    }
    if let Some(rest) = s
        .strip_prefix("tcp://")
        .or_else(|| s.strip_prefix("http://"))
        && !rest.is_empty()
    {
        return Ok(format!("http://{rest}"));
    }
    Err(format!(
        "{s:?} is not a Docker Engine address; write unix:///var/run/docker.sock, tcp://host:2375, or none \
         (TLS endpoints (https://, DOCKER_TLS_VERIFY) are not supported: mount the socket instead)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_none(_: &str) -> Option<String> {
        None
    }

    fn config(args: &[&str]) -> Result<Config, ConfigError> {
        let mut full = vec!["imdsd"];
        full.extend_from_slice(args);
        match parse(full, &env_none)? {
            Parsed::Run(c) => Ok(*c),
            other => panic!("unexpected parse outcome: {other:?}"),
        }
    }

    fn file(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("tempfile");
        std::io::Write::write_all(&mut f, contents.as_bytes()).expect("write");
        f
    }

    #[test]
    fn defaults_match_ec2() {
        let c = config(&[]).expect("valid");
        assert_eq!(
            c.listen,
            vec!["169.254.169.254:80".parse::<SocketAddr>().expect("addr")]
        );
        assert_eq!(c.imds.http_tokens, HttpTokens::Optional);
        assert!(c.imds.endpoint_enabled && c.imds.reject_forwarded && !c.imds.strict_expect);
        assert_eq!(c.imds.connection, Connection::Close);
        assert!(matches!(
            c.source,
            SourceConfig::Sts {
                duration_seconds: 3600,
                use_imds: false,
                ..
            }
        ));
        assert_eq!(c.broker.min_remaining, Duration::from_secs(30 * 60));
        assert!(c.identity.default_role.is_none());
    }

    #[test]
    fn flags_parse() {
        let c = config(&[
            "--listen",
            "127.0.0.1:8169",
            "--listen",
            "[::1]:8169",
            "--http-tokens",
            "required",
            "--fake-credentials",
            "app@123456789012",
        ])
        .expect("valid");
        assert_eq!(c.listen.len(), 2);
        assert_eq!(
            c.listen[1],
            "[::1]:8169".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(c.imds.http_tokens, HttpTokens::Required);
        assert_eq!(
            c.source,
            SourceConfig::Fake {
                lifetime: DEFAULT_LIFETIME
            }
        );
        assert_eq!(
            c.identity.default_role.as_ref().map(RoleSpec::name),
            Some("app")
        );
    }

    #[test]
    fn a_flag_beats_the_file_and_the_file_beats_the_default() {
        let f = file(
            "http_tokens = \"required\"\nlisten = [\"127.0.0.1:9000\"]\nfake_credentials = true\n[instance]\nregion = \"eu-west-1\"\n",
        );
        let path = f.path().to_str().expect("utf8");
        let c = config(&["--config", path]).expect("valid");
        assert_eq!(c.imds.http_tokens, HttpTokens::Required);
        assert_eq!(
            c.listen,
            vec!["127.0.0.1:9000".parse::<SocketAddr>().expect("addr")]
        );
        assert_eq!(c.instance.region, "eu-west-1");
        assert_eq!(c.instance.availability_zone, "eu-west-1a");
        let c = config(&[
            "--config",
            path,
            "--http-tokens",
            "optional",
            "--fake-credentials=false",
        ])
        .expect("valid");
        assert_eq!(c.imds.http_tokens, HttpTokens::Optional);
        assert!(matches!(c.source, SourceConfig::Sts { .. }));
    }

    #[test]
    fn connection_caps_come_from_flags_or_the_file_and_bad_ones_are_named() {
        let defaults = config(&[]).expect("valid");
        assert_eq!(
            defaults.server.max_connections,
            crate::server::DEFAULT_MAX_CONNECTIONS
        );
        assert_eq!(
            defaults.server.max_connections_per_caller,
            crate::server::DEFAULT_MAX_CONNECTIONS_PER_CALLER
        );
        let f = file("max_connections = 2000\nmax_connections_per_caller = 40\n");
        let path = f.path().to_str().expect("utf8").to_string();
        let c = config(&["--config", &path]).expect("valid");
        assert_eq!(
            (
                c.server.max_connections,
                c.server.max_connections_per_caller
            ),
            (2000, 40)
        );
        let c = config(&["--config", &path, "--max-connections-per-caller", "64"]).expect("valid");
        assert_eq!(c.server.max_connections_per_caller, 64, "the flag wins");

        let f = file("max_connections = 0\n");
        let path = f.path().to_str().expect("utf8").to_string();
        let err = config(&[
            "--config",
            &path,
            "--max-connections-per-caller",
            "99999999",
        ])
        .expect_err("invalid");
        let text = err.to_string();
        assert_eq!(err.problems.len(), 2, "{text}");
        assert!(
            text.contains(&format!(
                "{path}: max_connections: \"0\" is outside 1 to 1048576"
            )),
            "{text}"
        );
        assert!(
            text.contains("--max-connections-per-caller: \"99999999\" is outside 1 to 1048576"),
            "{text}"
        );
        let err = config(&["--max-connections", "many"]).expect_err("invalid");
        assert!(
            err.problems[0].contains("--max-connections: \"many\" is not a number of connections"),
            "{err}"
        );
    }

    #[test]
    fn sts_limits_come_from_flags_or_the_file_are_checked_and_are_off_for_fake_credentials() {
        let c = config(&[]).expect("valid");
        assert_eq!(c.broker.limiter, Some(LimiterOptions::default()));
        let f = file("sts_max_rate = 2.5\nsts_burst = 7\nsts_max_concurrency = 3\n");
        let path = f.path().to_str().expect("utf8").to_string();
        let c = config(&["--config", &path]).expect("valid");
        assert_eq!(
            c.broker.limiter,
            Some(LimiterOptions {
                rate: 2.5,
                burst: 7,
                concurrency: 3
            })
        );
        let c = config(&["--config", &path, "--sts-max-rate", "40"]).expect("valid");
        assert_eq!(c.broker.limiter.map(|l| (l.rate, l.burst)), Some((40.0, 7)));
        assert_eq!(
            config(&["--fake-credentials", "--sts-max-rate", "1"])
                .expect("valid")
                .broker
                .limiter,
            None
        );

        let bad = file("sts_burst = 0\n");
        let bad_path = bad.path().to_str().expect("utf8").to_string();
        let err = config(&[
            "--config",
            &bad_path,
            "--sts-max-rate",
            "0",
            "--sts-max-concurrency",
            "none",
        ])
        .expect_err("invalid");
        let text = err.to_string();
        assert_eq!(err.problems.len(), 3, "{text}");
        assert!(
            text.contains("--sts-max-rate: \"0\" is not a rate"),
            "{text}"
        );
        assert!(
            text.contains(&format!("{bad_path}: sts_burst: \"0\"")),
            "{text}"
        );
        assert!(text.contains("--sts-max-concurrency: \"none\""), "{text}");
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_origin() {
        let f = file("http_endpoint = \"sometimes\"\n[instance]\naccount_id = \"42\"\n");
        let path = f.path().to_str().expect("utf8").to_string();
        let err = config(&[
            "--config",
            &path,
            "--listen",
            "localhost:80",
            "--http-tokens",
            "maybe",
            "--refresh-threshold",
            "5",
            "--access-log-burst",
            "lots",
            "--fake-credentials=perhaps",
            "bad role name",
        ])
        .expect_err("invalid");
        let text = err.to_string();
        assert_eq!(err.problems.len(), 8, "{text}");
        assert!(
            text.contains("--access-log-burst: \"lots\" is not a number of lines"),
            "{text}"
        );
        assert!(
            text.contains("--listen: \"localhost:80\" is not an address"),
            "{text}"
        );
        assert!(
            text.contains("--http-tokens: \"maybe\" is not one of \"optional\", \"required\""),
            "{text}"
        );
        assert!(
            text.contains(&format!("{path}: http_endpoint: \"sometimes\"")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{path}: instance.account_id")),
            "{text}"
        );
        assert!(
            text.contains("--refresh-threshold: 5 minutes is outside 15 to 720"),
            "{text}"
        );
        assert!(
            text.contains("--fake-credentials: \"perhaps\" is not a boolean"),
            "{text}"
        );
        assert!(text.contains("contains ' '"), "{text}");
    }

    #[test]
    fn unknown_file_keys_name_the_file_the_line_and_the_key() {
        let f = file("listen = [\"127.0.0.1:1\"]\nlisn = 3\n");
        let path = f.path().to_str().expect("utf8").to_string();
        let err = config(&["--config", &path]).expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains(&path), "{text}");
        assert!(text.contains("(line 2)"), "{text}");
        assert!(text.contains("lisn"), "{text}");
    }

    #[test]
    fn a_missing_config_file_is_reported() {
        let err = config(&["--config", "/nonexistent/imdsd.toml"]).expect_err("missing");
        assert!(
            err.to_string()
                .contains("/nonexistent/imdsd.toml: cannot read"),
            "{err}"
        );
    }

    #[test]
    fn lyft_default_role_is_read_when_nothing_else_names_one() {
        let env = |k: &str| (k == "DEFAULT_ROLE").then(|| "lyft-role".to_string());
        let Parsed::Run(c) = parse(["imdsd"], &env).expect("valid") else {
            panic!("expected a config")
        };
        assert_eq!(
            c.identity.default_role.as_ref().map(RoleSpec::name),
            Some("lyft-role")
        );
        let Parsed::Run(c) = parse(["imdsd", "positional"], &env).expect("valid") else {
            panic!("expected a config")
        };
        assert_eq!(
            c.identity.default_role.as_ref().map(RoleSpec::name),
            Some("positional")
        );
    }

    #[test]
    fn allowed_hosts_come_from_the_flag_or_the_file_and_bad_ones_are_named() {
        let c = config(&[
            "--allowed-host",
            "imdsd",
            "--allowed-host",
            "Metadata.Internal.",
        ])
        .expect("valid");
        assert_eq!(
            c.imds.allowed_hosts.names().collect::<Vec<_>>(),
            ["imdsd", "metadata.internal"]
        );
        assert!(
            config(&[])
                .expect("valid")
                .imds
                .allowed_hosts
                .names()
                .next()
                .is_none()
        );

        let f = file("allowed_host = [\"from-file\"]\n");
        let path = f.path().to_str().expect("utf8").to_string();
        let c = config(&["--config", &path]).expect("valid");
        assert_eq!(
            c.imds.allowed_hosts.names().collect::<Vec<_>>(),
            ["from-file"]
        );
        let c = config(&["--config", &path, "--allowed-host", "flag"]).expect("valid");
        assert_eq!(c.imds.allowed_hosts.names().collect::<Vec<_>>(), ["flag"]);

        let err = config(&[
            "--allowed-host",
            "imdsd:8169",
            "--allowed-host",
            "",
            "--allowed-host",
            "*.example.com",
            "--allowed-host",
            "fine",
        ])
        .expect_err("invalid");
        assert_eq!(err.problems.len(), 3, "{err}");
        assert!(
            err.problems
                .iter()
                .all(|p| p.starts_with("--allowed-host: ")),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("\"imdsd:8169\" has a port"), "{text}");
        assert!(text.contains("\"\" is empty"), "{text}");
        assert!(text.contains("contains '*'"), "{text}");

        let f = file("allowed_host = [\"http://imdsd\"]\n");
        let path = f.path().to_str().expect("utf8").to_string();
        let err = config(&["--config", &path]).expect_err("invalid");
        assert!(
            err.problems[0].starts_with(&format!("{path}: allowed_host: ")),
            "{err}"
        );
    }

    #[test]
    fn listen_addresses_accept_ipv6_and_bare_ips() {
        assert_eq!(
            parse_listen("[fd00:ec2::254]:80"),
            Ok("[fd00:ec2::254]:80".parse().expect("addr"))
        );
        assert_eq!(
            parse_listen("169.254.169.254"),
            Ok("169.254.169.254:80".parse().expect("addr"))
        );
        assert_eq!(
            parse_listen("fd00:ec2::254"),
            Ok("[fd00:ec2::254]:80".parse().expect("addr"))
        );
        assert!(parse_listen("metadata:80").is_err());
    }

    /// The example file documents every key: uncommenting each `# key = value` line must give a
    /// valid configuration, and every file key must appear in it.
    #[test]
    fn the_example_file_is_valid_and_complete() {
        let example =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/imdsd.example.toml"))
                .expect("example file");
        assert!(
            toml::from_str::<FileConfig>(&example).is_ok(),
            "the example parses as shipped"
        );
        let uncommented: String = example
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.split(" = ").next().is_some_and(|k| {
                        !k.is_empty()
                            && k.bytes()
                                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                    }) && rest.contains(" = ") =>
                {
                    rest.split("  #").next().unwrap_or(rest).to_string()
                }
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let parsed: FileConfig = toml::from_str(&uncommented)
            .unwrap_or_else(|e| panic!("uncommented example does not parse: {e}\n{uncommented}"));
        // Keys that need something the test machine lacks (the mapping file) or another mode
        // (the proxy settings, checked in `proxy_mode_is_configured_and_checked`).
        let runnable: String = uncommented
            .lines()
            .filter(|l| {
                ![
                    "role_mapping_file =",
                    "upstream =",
                    "proxy_allow =",
                    "hide_user_data =",
                ]
                .iter()
                .any(|k| l.starts_with(k))
            })
            .collect::<Vec<_>>()
            .join("\n");
        let f = file(&runnable);
        let path = f.path().to_str().expect("utf8").to_string();
        match parse(["imdsd", "--config", &path], &env_none) {
            Ok(Parsed::Run(_)) => {}
            Ok(other) => panic!("{other:?}"),
            Err(e) => panic!("uncommented example is invalid: {e}"),
        }
        assert!(parsed.instance.tags_in_metadata.is_some() && parsed.account_map.is_some());
        let json = serde_json::to_value(FileKeys::default()).expect("keys");
        for key in json.as_object().expect("object").keys() {
            assert!(
                example.contains(&format!("# {key} = ")),
                "imdsd.example.toml does not document {key}"
            );
        }
    }

    /// Mirrors [`FileConfig`]'s top-level keys, so the completeness check above fails when a key
    /// is added without documenting it.
    #[derive(serde::Serialize, Default)]
    struct FileKeys {
        default_role: (),
        listen: (),
        allowed_host: (),
        http_tokens: (),
        http_endpoint: (),
        fake_credentials: (),
        fake_credentials_lifetime: (),
        role_mapping_file: (),
        default_account_id: (),
        account_map: (),
        session_name: (),
        refresh_threshold: (),
        region: (),
        profile: (),
        sts_endpoint: (),
        sts_max_rate: (),
        sts_burst: (),
        sts_max_concurrency: (),
        role_duration: (),
        source_imds: (),
        state_dir: (),
        log_format: (),
        log_level: (),
        access_log_burst: (),
        keep_alive: (),
        max_connections: (),
        max_connections_per_caller: (),
        strict_expect: (),
        forwarded_for: (),
        docker_host: (),
        networks: (),
        role_env: (),
        label_prefix: (),
        allowed_roles: (),
        aliases_only: (),
        role_aliases: (),
        role_session_key: (),
        unknown_caller_wait: (),
        docker_resync: (),
        admin_listen: (),
        ecs_listen: (),
        ecs_auth: (),
        mode: (),
        upstream: (),
        proxy_allow: (),
        hide_user_data: (),
    }

    #[test]
    fn container_options_parse_and_bad_ones_are_named() {
        let roles = file(
            "role_aliases = { db = \"arn:aws:iam::123456789012:role/Db\" }\naliases_only = true\n",
        );
        let c = config(&[
            "--config",
            roles.path().to_str().expect("utf8"),
            "--docker-host",
            "unix://var/run/other.sock",
            "--networks",
            "a,b",
            "--allowed-roles",
            "app-*",
            "--role-session-key",
            "Env:JOB",
            "--unknown-caller-wait",
            "100ms",
        ])
        .expect("valid");
        let docker = c.docker.expect("docker");
        assert_eq!(docker.host, "unix:///var/run/other.sock");
        assert_eq!(
            docker.networks,
            NetworkScope::Named(vec!["a".to_string(), "b".to_string()])
        );
        assert!(docker.env_keys.contains(&"JOB".to_string()));
        assert!(docker.label_keys.contains(&"imdsd.role".to_string()));
        let rules = &c.identity.containers;
        assert!(rules.aliases_only && rules.aliases.contains_key("db"));
        assert_eq!(rules.allowed_roles, vec!["app-*".to_string()]);
        assert_eq!(rules.unknown_caller_wait, Duration::from_millis(100));
        assert!(
            config(&["--docker-host", "none"])
                .expect("valid")
                .docker
                .is_none()
        );
        assert_eq!(
            config(&["--docker-host", "tcp://10.0.0.1:2375"])
                .expect("valid")
                .docker
                .expect("d")
                .host,
            "http://10.0.0.1:2375"
        );
        // The benchmarks' made-up containers.
        assert_eq!(
            config(&["--docker-host", "synthetic:10000"])
                .expect("valid")
                .docker
                .expect("d")
                .host,
            "synthetic:10000"
        );
        assert!(config(&["--docker-host", "synthetic:many"]).is_err());

        let err = config(&[
            "--docker-host",
            "https://x:2376",
            "--role-session-key",
            "JOB",
            "--unknown-caller-wait",
            "2s",
            "--aliases-only",
            "--allowed-roles",
            "arn:aws:iam::123456789012:user/x",
        ])
        .expect_err("invalid");
        let all = err.problems.join("\n");
        assert_eq!(err.problems.len(), 5, "{all}");
        assert!(all.contains("--docker-host: \"https://x:2376\""), "{all}");
        assert!(
            all.contains("--role-session-key") && all.contains("Env:KEY"),
            "{all}"
        );
        assert!(
            all.contains("--unknown-caller-wait") && all.contains("250ms"),
            "{all}"
        );
        assert!(all.contains("role_aliases"), "{all}");
        assert!(
            all.contains("--allowed-roles") && all.contains(":role/"),
            "{all}"
        );
    }

    /// The shipped systemd unit starts the daemon with a configuration that parses, and its
    /// pre-start command is a valid `imdsd network` invocation.
    #[test]
    fn the_systemd_unit_runs_valid_commands() {
        let unit = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/packaging/imdsd.service"
        ))
        .expect("unit file");
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/imdsd.example.toml");
        let command = |key: &str| -> Vec<String> {
            let line = unit
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in the unit"));
            line.trim_start_matches('+')
                .split_whitespace()
                .map(|w| w.replace("/etc/imdsd/imdsd.toml", example))
                .collect()
        };
        let start = command("ExecStart=");
        assert_eq!(start[0], "/usr/local/bin/imdsd");
        match parse(&start, &env_none) {
            Ok(Parsed::Run(c)) => assert_eq!(c.listen[0].to_string(), "169.254.169.254:80"),
            other => panic!("ExecStart does not start the daemon: {other:?}"),
        }
        assert!(matches!(
            parse(command("ExecStartPre="), &env_none),
            Ok(Parsed::Network(_))
        ));
        assert!(unit.contains("RestartPreventExitStatus=64"));
        // Room for the default connection cap, with the reserve for everything else.
        let nofile: u64 = unit
            .lines()
            .find_map(|l| l.strip_prefix("LimitNOFILE="))
            .expect("LimitNOFILE= in the unit")
            .trim()
            .parse()
            .expect("a number");
        let fitted = crate::server::fit_to_descriptors(
            &ServerOptions::default(),
            crate::server::DescriptorLimit {
                soft: Some(nofile),
                hard: Some(nofile),
            },
        );
        assert_eq!(
            fitted.max_connections,
            crate::server::DEFAULT_MAX_CONNECTIONS
        );
    }

    #[test]
    fn the_systemd_unit_is_sandboxed_to_an_exposure_of_two_or_less() {
        let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/imdsd.service");
        // The threshold is on systemd's 0-100 scale: 20 is an exposure level of 2.0.
        let out = std::process::Command::new("systemd-analyze")
            .args([
                "security",
                "--offline=yes",
                "--threshold=20",
                "--no-pager",
                unit,
            ])
            .output()
            .expect("systemd-analyze (Debian's systemd package) checks the unit's sandbox");
        let text = String::from_utf8_lossy(&out.stdout);
        let overall = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no overall exposure in:\n{text}"));
        assert!(out.status.success(), "{overall}\n{text}");
    }

    #[test]
    fn proxy_mode_is_configured_and_checked() {
        let c = config(&[
            "--mode",
            "proxy",
            "--listen",
            "127.0.0.1:8169",
            "--upstream",
            "http://127.0.0.1:9999/",
            "--proxy-allow",
            "/latest/meta-data/placement/*,@node-termination-handler",
            "--hide-user-data",
        ])
        .expect("valid");
        let p = c.proxy.expect("proxy mode");
        assert_eq!(p.upstream, "http://127.0.0.1:9999");
        assert!(p.hide_user_data);
        assert!(
            p.allow.expect("allow-list").len() > 2,
            "the preset is expanded"
        );
        // The daemon's own identity comes from the upstream's instance profile.
        assert!(matches!(
            c.source,
            SourceConfig::Sts { use_imds: true, imds_endpoint: Some(ref e), .. } if e == "http://127.0.0.1:9999"
        ));

        let lyft = |v: &str| {
            let env = |k: &str| (k == "MOCK_API").then(|| v.to_string());
            match parse(["imdsd", "--listen", "127.0.0.1:8169"], &env) {
                Ok(Parsed::Run(c)) => c.proxy.is_some(),
                other => panic!("{other:?}"),
            }
        };
        assert!(lyft("false") && !lyft("true"));

        let err = config(&[
            "--mode",
            "proxy",
            "--upstream",
            "http://169.254.169.254",
            "--proxy-allow",
            "no-slash,@nope",
        ])
        .expect_err("invalid");
        let all = err.problems.join("\n");
        assert!(all.contains("forward to itself"), "{all}");
        assert!(all.contains("--proxy-allow"), "{all}");
        let err = config(&["--upstream", "http://10.0.0.1"]).expect_err("stray");
        assert!(err.problems[0].contains("--mode proxy"), "{err}");
    }

    #[test]
    fn help_is_information_not_an_error() {
        match parse(["imdsd", "--help"], &env_none) {
            Ok(Parsed::Info(text)) => {
                assert!(text.contains("--http-tokens"));
                assert!(text.contains("[env: IMDSD_HTTP_TOKENS="));
                // Every flag sits under its topic; the general list keeps only the basics.
                let general = text
                    .split_once("\nOptions:\n")
                    .and_then(|(_, rest)| rest.split_once("\nMetadata service:\n"))
                    .map(|(general, _)| general)
                    .expect("Options, then the topics");
                let flags: Vec<&str> = general
                    .split_whitespace()
                    .filter(|w| w.starts_with("--"))
                    .collect();
                assert_eq!(
                    flags,
                    ["--default-role", "--config", "--help", "--version"],
                    "{text}"
                );
                for topic in ["Credentials and roles:", "Docker:", "Operation:"] {
                    assert!(text.contains(&format!("\n{topic}\n")), "{topic} in {text}");
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
